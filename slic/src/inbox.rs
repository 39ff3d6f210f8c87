//! The node's queue of received messages: connection tasks push, any number of receivers pop.
//!
//! A plain locked queue with a [`Notify`], not a channel behind an async mutex: a connection
//! task pushes everything one read produced under one lock with one wake-up, and a receiver
//! that keeps up takes a message with one uncontended lock (a 64 B stream spent ~30% of its
//! receiver in the channel, the async mutex and their wake-ups). Memory is bounded by flow
//! control: every message in here holds credit its connection has not returned.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::driver::Delivery;

#[derive(Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Delivery>>,
    /// One permit per push batch; a receiver that takes a message and leaves more behind
    /// passes the wake-up on, so concurrent receivers all get their turn.
    ready: Notify,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Delivery>> {
        // Held for a push or a pop only, never across user code: a poisoned queue is intact.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `batch` (emptying it) and wakes one receiver.
    pub(crate) fn push_all(&self, batch: &mut VecDeque<Delivery>) {
        if batch.is_empty() {
            return;
        }
        {
            let mut q = self.lock();
            if q.is_empty() {
                std::mem::swap(&mut *q, batch);
            } else {
                q.append(batch);
            }
        }
        self.ready.notify_one();
    }

    /// The oldest message, if one is waiting.
    pub(crate) fn try_pop(&self) -> Option<Delivery> {
        let mut q = self.lock();
        let d = q.pop_front();
        if d.is_some() && !q.is_empty() {
            drop(q);
            // More are waiting: another receiver may be asleep.
            self.ready.notify_one();
        }
        d
    }

    /// Waits for a message; `None` once `shutdown` is cancelled.
    pub(crate) async fn pop(&self, shutdown: &CancellationToken) -> Option<Delivery> {
        // Bounded by the messages pushed: each round either takes one or sleeps until the
        // next push (or shutdown).
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the wait is seen.
            notified.as_mut().enable();
            if let Some(d) = self.try_pop() {
                return Some(d);
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
    use crate::driver::Delivery;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pushed_message_reaches_one_of_several_receivers_in_order() {
        let inbox = Arc::new(Inbox::default());
        let stop = CancellationToken::new();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let (inbox, stop) = (inbox.clone(), stop.clone());
            receivers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(d) = inbox.pop(&stop).await {
                    got.push(d.test_id());
                }
                got
            }));
        }
        let mut batch = VecDeque::new();
        for i in 0..2_000u64 {
            batch.push_back(Delivery::for_test(i));
            if i % 7 == 0 {
                inbox.push_all(&mut batch);
                assert!(batch.is_empty());
                tokio::task::yield_now().await;
            }
        }
        inbox.push_all(&mut batch);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !inbox.lock().is_empty() && tokio::time::Instant::now() < deadline {
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
            tokio::spawn(async move { inbox.pop(&stop).await.map(|d| d.test_id()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        inbox.push_all(&mut VecDeque::from([Delivery::for_test(42)]));
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
    }
}
