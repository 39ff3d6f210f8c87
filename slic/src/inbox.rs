//! The node's queue of received messages: connection tasks push, any number of receivers pop.
//!
//! A plain locked queue with a [`Notify`], not a channel behind an async mutex: a connection
//! task pushes everything one read produced under one lock, and a receiver that keeps up takes
//! a message with one uncontended lock (a 64 B stream spent ~30% of its receiver in the
//! channel, the async mutex and their wake-ups). Messages are kept in runs from one connection
//! that share that connection's credit counter, so that taking one does not move a reference
//! count between the threads; and a push wakes a receiver only when one waits. Memory is
//! bounded by flow control: every message in here holds credit its connection has not
//! returned.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::driver::CreditReturn;
use crate::node::Message;

/// Messages of one connection, in order, each with the credit it returns once taken.
pub(crate) type Run = VecDeque<(Message, u32)>;

#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    /// Wakes receivers asleep in [`pop`](Inbox::pop). A receiver that takes a message and
    /// leaves more behind passes the wake-up on, so concurrent receivers all get their turn.
    ready: Notify,
}

#[derive(Default)]
struct State {
    runs: VecDeque<(Arc<CreditReturn>, Run)>,
    /// Emptied runs, kept for their buffers: a stream fills and empties runs all the time,
    /// and fresh buffers of that size cost page faults.
    spare: Vec<Run>,
    /// Receivers asleep in `pop` (or about to be): pushes wake one only when there are any.
    sleepers: usize,
}

/// Emptied runs kept for reuse, at most.
const SPARE_RUNS: usize = 4;

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// Takes a sleeper off the count when its `pop` ends, however it ends.
struct Sleeper<'a>(&'a Inbox);

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.0.lock().sleepers -= 1;
    }
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Held for a push or a pop only, never across user code: a poisoned queue is intact.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `run` (emptying it, its buffer stays), messages of the connection whose credit
    /// is `credit`, and wakes a receiver if one sleeps.
    pub(crate) fn push_all(&self, credit: &Arc<CreditReturn>, run: &mut Run) {
        if run.is_empty() {
            return;
        }
        let wake = {
            let mut s = self.lock();
            match s.runs.back_mut() {
                Some((c, last)) if Arc::ptr_eq(c, credit) => last.append(run),
                _ => {
                    let mut fresh = s.spare.pop().unwrap_or_default();
                    fresh.append(run);
                    s.runs.push_back((credit.clone(), fresh));
                }
            }
            s.sleepers > 0
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// The oldest message, if one is waiting; its credit counts as returned.
    pub(crate) fn try_pop(&self) -> Option<Message> {
        let mut s = self.lock();
        let (credit, run) = s.runs.front_mut()?;
        let (msg, amount) = run.pop_front()?;
        // Counted under the lock, without a reference of our own; the rare command that
        // hands the credit back to the connection is sent after unlocking.
        let release = credit.add(amount).then(|| credit.clone());
        if run.is_empty()
            && let Some((_, emptied)) = s.runs.pop_front()
            && s.spare.len() < SPARE_RUNS
        {
            s.spare.push(emptied);
        }
        let wake_another = s.sleepers > 0 && !s.runs.is_empty();
        drop(s);
        if wake_another {
            // More are waiting: another receiver may be asleep.
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
        self.lock().sleepers += 1;
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

    /// A run of messages with these ids, from a connection that takes no credit back.
    fn run_of(ids: impl IntoIterator<Item = u64>) -> Run {
        ids.into_iter().map(|i| (Message::for_test(i), 0)).collect()
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
                inbox.push_all(&credits[(i % 2) as usize], &mut batch);
                assert!(batch.is_empty());
                tokio::task::yield_now().await;
            }
        }
        inbox.push_all(&credits[0], &mut batch);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !inbox.lock().runs.is_empty() && tokio::time::Instant::now() < deadline {
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
        assert_eq!(inbox.lock().sleepers, 1, "the receiver sleeps");
        inbox.push_all(&CreditReturn::for_test(), &mut run_of([42]));
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
        assert_eq!(inbox.lock().sleepers, 0, "sleepers leave the count");
    }

    #[test]
    fn taking_messages_returns_their_credit_to_their_own_connection() {
        let inbox = Inbox::default();
        let (a, b) = (CreditReturn::for_test(), CreditReturn::for_test());
        let mut run: Run = (0..3).map(|i| (Message::for_test(i), 10)).collect();
        inbox.push_all(&a, &mut run);
        let mut run: Run = (3..5).map(|i| (Message::for_test(i), 100)).collect();
        inbox.push_all(&b, &mut run);
        let mut run: Run = [(Message::for_test(5), 1)].into();
        inbox.push_all(&b, &mut run);
        assert_eq!(inbox.lock().runs.len(), 2, "b's two pushes share a run");
        let ids: Vec<u64> = std::iter::from_fn(|| inbox.try_pop())
            .map(|m| m.id.0)
            .collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        assert_eq!((a.pending_for_test(), b.pending_for_test()), (30, 201));
        assert!(inbox.lock().runs.is_empty());
    }
}
