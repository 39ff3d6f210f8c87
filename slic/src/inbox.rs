//! The node's queue of received messages: connection tasks push, any number of receivers pop.
//!
//! Two locked queues with a [`Notify`], not a channel behind an async mutex. Connection tasks
//! push everything one read produced under the *producer* lock, with at most one wake-up. A
//! receiver takes messages from the *consumer* side, which holds one run (the messages of
//! one connection, in order) at a time: it touches the producer lock only to take the next
//! whole run when its own is empty, so a receiver that keeps up with a stream and the
//! connection task feeding it meet once per batch, not once per message (on a two-core
//! machine the shared lock cost a 64 B stream's receiver ~16% of its CPU).
//!
//! What sits in a run is the least the receiver needs: the sender's [`PeerInfo`] is kept
//! once per run and cloned into each [`Message`] by the receiver as it takes it, so the
//! reference counts of the peer's name move on the receiver's core only. Runs share their
//! connection's credit counter, so taking one message does not move a reference count
//! between threads either.
//!
//! Memory is bounded by flow control: every message in here holds credit its connection
//! has not returned, and its credit is counted as returned when a receiver takes it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use slic_proto::CodecId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::driver::CreditReturn;
use crate::node::{ChannelId, Message, MessageId, PeerInfo};

/// One received message of channel 0 as it waits in the inbox, with the credit it returns
/// once taken; its sender is its run's.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: MessageId,
    pub(crate) codec: CodecId,
    pub(crate) body: Bytes,
    pub(crate) credit: u32,
}

/// Messages of one connection, in order.
pub(crate) type Run = VecDeque<Entry>;

#[derive(Default)]
pub(crate) struct Inbox {
    /// The producer side: runs pushed by connection tasks, oldest first.
    state: Mutex<State>,
    /// The consumer side: the run receivers are taking from. Locked before `state` when both
    /// are needed (producers take `state` only), so the two cannot deadlock.
    taken: Mutex<Taken>,
    /// Receivers asleep in [`pop`](Inbox::pop) (or about to be): pushes wake one only when
    /// there are any. Counted before a receiver looks under the producer lock, and read by a
    /// producer after its push under that lock, so one of the two sees the other.
    sleepers: AtomicUsize,
    /// Wakes receivers asleep in `pop`. A receiver that takes a message and leaves more
    /// behind passes the wake-up on, so concurrent receivers all get their turn.
    ready: Notify,
}

#[derive(Default)]
struct State {
    runs: VecDeque<Batch>,
    /// Emptied runs, kept for their buffers: a stream fills and empties runs all the time,
    /// and fresh buffers of that size cost page faults.
    spare: Vec<Run>,
}

/// A run with what its messages share: their connection's credit counter and sender.
struct Batch {
    credit: Arc<CreditReturn>,
    from: PeerInfo,
    run: Run,
}

/// The run being taken from, if any: a batch here always has a message left, it leaves as
/// its last message is taken (so a closed connection's counter and info go with it).
#[derive(Default)]
struct Taken {
    batch: Option<Batch>,
    /// The buffer of the run emptied last, handed to the producer side at the next refill.
    spare: Option<Run>,
    /// Credit of messages taken from `batch` and not yet counted on its connection's
    /// counter: counted in steps (see [`CREDIT_STEP`]) rather than with an atomic operation
    /// per message, and always before the batch is left or emptied.
    owed: u32,
}

/// Emptied runs kept for reuse, at most.
const SPARE_RUNS: usize = 4;

/// Credit taken messages may owe their connection before it is counted there: a quarter of
/// the step in which the default settings hand credit back to the peer (~4 KiB), and never
/// more than the connection's own step (small windows have steps of a few bytes), so the
/// peer hears of consumed messages as soon as before, while a stream of 64 B messages
/// counts once per dozen messages, not once each. Whatever is owed is counted when a run
/// empties.
const CREDIT_STEP: u32 = 1 << 10;

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// Takes a sleeper off the count when its `pop` ends, however it ends.
struct Sleeper<'a>(&'a Inbox);

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.0.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Both locks are held for a push, a swap or a pop only, never across user code: a poisoned
/// queue is intact.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inbox {
    /// Appends `run` (emptying it, its buffer stays), messages from `from` whose credit goes
    /// to `credit`, and wakes a receiver if one sleeps.
    pub(crate) fn push_all(&self, credit: &Arc<CreditReturn>, from: &PeerInfo, run: &mut Run) {
        if run.is_empty() {
            return;
        }
        {
            let mut s = lock(&self.state);
            match s.runs.back_mut() {
                Some(last) if Arc::ptr_eq(&last.credit, credit) => last.run.append(run),
                _ => {
                    let mut fresh = s.spare.pop().unwrap_or_default();
                    fresh.append(run);
                    s.runs.push_back(Batch {
                        credit: credit.clone(),
                        from: from.clone(),
                        run: fresh,
                    });
                }
            }
        }
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.ready.notify_one();
        }
    }

    /// The oldest message, if one is waiting; its credit counts as returned.
    pub(crate) fn try_pop(&self) -> Option<Message> {
        let mut guard = lock(&self.taken);
        let t = &mut *guard;
        let mut more_queued = false;
        if t.batch.is_none() {
            // Refill from the producer side: the next whole run; the last one's buffer goes
            // back for reuse.
            let mut s = lock(&self.state);
            let next = s.runs.pop_front()?;
            more_queued = !s.runs.is_empty();
            if let Some(run) = t.spare.take()
                && s.spare.len() < SPARE_RUNS
            {
                s.spare.push(run);
            }
            drop(s);
            t.batch = Some(next);
        }
        let b = t.batch.as_mut()?;
        // Runs are pushed non-empty and leave `taken` as they empty: never `None`.
        let e = b.run.pop_front()?;
        let emptied = b.run.is_empty();
        t.owed = t.owed.saturating_add(e.credit);
        // Counted under the lock, without a reference of our own; the rare command that
        // hands the credit back to the connection is sent after unlocking.
        let mut release = None;
        if emptied || t.owed >= CREDIT_STEP.min(b.credit.step()) {
            release = b
                .credit
                .add(std::mem::take(&mut t.owed))
                .then(|| b.credit.clone());
        }
        let msg = Message {
            from: b.from.clone(),
            id: e.id,
            channel: ChannelId(0),
            codec: e.codec,
            body: e.body,
        };
        // An emptied batch leaves now; what it holds is dropped after unlocking.
        let mut retired = None;
        if emptied && let Some(mut old) = t.batch.take() {
            t.spare = Some(std::mem::take(&mut old.run));
            retired = Some(old);
        }
        drop(guard);
        drop(retired);
        // More are waiting (in this run, or in runs the producer side holds): another receiver
        // may be asleep. Its own wake-up, from the push, may have gone to a receiver that then
        // took from this run instead.
        if self.sleepers.load(Ordering::SeqCst) > 0
            && (!emptied || more_queued || !lock(&self.state).runs.is_empty())
        {
            self.ready.notify_one();
        }
        if let Some(c) = release {
            c.release();
        }
        Some(msg)
    }

    /// Waits for a message; `None` once `shutdown` is cancelled.
    pub(crate) async fn pop(&self, shutdown: &CancellationToken) -> Option<Message> {
        if let Some(m) = self.try_pop() {
            return Some(m);
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let _sleeper = Sleeper(self);
        // Bounded by the messages pushed: each round either takes one or sleeps until the
        // next push (or shutdown).
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered (and counted as a sleeper) before looking, so a push between the
            // look and the wait is seen.
            notified.as_mut().enable();
            if let Some(m) = self.try_pop() {
                return Some(m);
            }
            tokio::select! {
                () = notified => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A run of messages with these ids, each taking `credit`.
    fn run_with(ids: impl IntoIterator<Item = u64>, credit: u32) -> Run {
        ids.into_iter()
            .map(|i| Entry {
                id: MessageId(i),
                codec: CodecId::Raw,
                body: Bytes::new(),
                credit,
            })
            .collect()
    }

    /// A run of messages with these ids, from a connection that takes no credit back.
    fn run_of(ids: impl IntoIterator<Item = u64>) -> Run {
        run_with(ids, 0)
    }

    fn from() -> PeerInfo {
        Message::for_test(0).from
    }

    impl Inbox {
        /// Whether no message waits on either side.
        fn is_empty(&self) -> bool {
            let t = lock(&self.taken);
            t.batch.is_none() && lock(&self.state).runs.is_empty()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pushed_message_reaches_one_of_several_receivers_in_order() {
        let inbox = Arc::new(Inbox::default());
        let stop = CancellationToken::new();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            receivers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(m) = inbox.pop(&stop).await {
                    got.push(m.id.0);
                }
                got
            }));
        }
        // Two connections, taking turns in runs of up to seven messages.
        let credits = [CreditReturn::for_test(), CreditReturn::for_test()];
        let mut batch = VecDeque::new();
        for i in 0..2_000u64 {
            batch.extend(run_of([i]));
            if i % 7 == 0 {
                inbox.push_all(&credits[(i % 2) as usize], &from(), &mut batch);
                assert!(batch.is_empty());
                tokio::task::yield_now().await;
            }
        }
        inbox.push_all(&credits[0], &from(), &mut batch);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !inbox.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.cancel();
        let mut all = Vec::new();
        for r in receivers {
            let got = tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .expect("a receiver hung")
                .unwrap();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "each receiver in order"
            );
            all.extend(got);
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (0..2_000).collect::<Vec<_>>(),
            "nothing lost, nothing twice"
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_push_and_for_shutdown() {
        let inbox = Arc::new(Inbox::default());
        let stop = CancellationToken::new();
        let waiter = {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            tokio::spawn(async move { inbox.pop(&stop).await.map(|m| m.id.0) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            inbox.sleepers.load(Ordering::SeqCst),
            1,
            "the receiver sleeps"
        );
        inbox.push_all(&CreditReturn::for_test(), &from(), &mut run_of([42]));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(got.expect("woken by the push").unwrap(), Some(42));

        let waiter = {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            tokio::spawn(async move { inbox.pop(&stop).await.is_none() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.cancel();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(got.expect("woken by shutdown").unwrap());
        assert_eq!(
            inbox.sleepers.load(Ordering::SeqCst),
            0,
            "sleepers leave the count"
        );
    }

    #[test]
    fn taking_messages_returns_their_credit_to_their_own_connection() {
        let inbox = Inbox::default();
        let (a, b) = (CreditReturn::for_test(), CreditReturn::for_test());
        inbox.push_all(&a, &from(), &mut run_with(0..3, 10));
        inbox.push_all(&b, &from(), &mut run_with(3..5, 100));
        inbox.push_all(&b, &from(), &mut run_with([5], 1));
        assert_eq!(
            lock(&inbox.state).runs.len(),
            2,
            "b's two pushes share a run"
        );
        let ids: Vec<u64> = std::iter::from_fn(|| inbox.try_pop())
            .map(|m| m.id.0)
            .collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert_eq!((a.pending_for_test(), b.pending_for_test()), (30, 201));
        assert!(inbox.is_empty());
    }

    #[test]
    fn credit_of_taken_messages_is_counted_in_steps_and_at_the_end_of_a_run() {
        let inbox = Inbox::default();
        let credit = CreditReturn::for_test();
        inbox.push_all(&credit, &from(), &mut run_with(0..10, 300));
        let mut pending = Vec::new();
        for _ in 0..10 {
            inbox.try_pop().expect("a message");
            pending.push(credit.pending_for_test());
        }
        // 300 B each: counted once 1 KiB is owed (after the 4th), and the rest when the run
        // ends, before the message that emptied it is handed out.
        assert_eq!(pending, [0, 0, 0, 1200, 1200, 1200, 1200, 2400, 2400, 3000]);
        assert!(inbox.try_pop().is_none());
    }

    #[test]
    fn a_connection_with_a_small_credit_step_has_every_taken_message_counted_at_once() {
        // A 1 KiB window hands credit back in steps of 1 byte: holding 300 B of it back
        // while the caller waits for something else could stall the peer.
        let inbox = Inbox::default();
        let credit = CreditReturn::for_test_with_step(1);
        inbox.push_all(&credit, &from(), &mut run_with(0..3, 300));
        inbox.try_pop().expect("a message");
        assert_eq!(credit.pending_for_test(), 300);
        inbox.try_pop().expect("a message");
        assert_eq!(credit.pending_for_test(), 600);
    }

    #[test]
    fn an_emptied_run_lets_go_of_its_connection() {
        let inbox = Inbox::default();
        let credit = CreditReturn::for_test();
        inbox.push_all(&credit, &from(), &mut run_of([1, 2]));
        assert_eq!(Arc::strong_count(&credit), 2, "the inbox holds the counter");
        inbox.try_pop().expect("a message");
        assert_eq!(Arc::strong_count(&credit), 2, "a message is left");
        inbox.try_pop().expect("a message");
        assert_eq!(Arc::strong_count(&credit), 1, "the emptied run let go");
        assert!(inbox.is_empty());
    }
}
