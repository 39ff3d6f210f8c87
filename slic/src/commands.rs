//! The queue through which handles (senders, channels, handlers, credit returns) reach one
//! connection's task.
//!
//! A locked queue that the task empties whole, with the task's waker kept beside it: a sender
//! wakes the task only when the task found the queue empty and went to sleep on it, so a burst
//! of sends costs one lock each and one wake-up in all. (A tokio channel woke or touched the
//! receiver's waker for every message: ~20% of a small-message sender's CPU.) Memory is
//! bounded where the commands are made: messages hold send-buffer permits (`buffer_cap`), and
//! the other commands are one per request, channel or credit step.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

pub(crate) struct CommandQueue<T> {
    state: Mutex<State<T>>,
}

struct State<T> {
    items: VecDeque<T>,
    /// The task found the queue empty and waits for a push (its waker is in `waker`).
    waiting: bool,
    waker: Option<Waker>,
    /// The task has ended: pushes fail.
    closed: bool,
}

impl<T> Default for CommandQueue<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                waiting: false,
                waker: None,
                closed: false,
            }),
        }
    }
}

impl<T> std::fmt::Debug for CommandQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandQueue").finish_non_exhaustive()
    }
}

impl<T> CommandQueue<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Held for a push or a swap only, never across user code: a poisoned queue is intact.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `item` and wakes the task if it sleeps on the queue. `Err` hands the item back
    /// when the task has ended.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let waker = {
            let mut s = self.lock();
            if s.closed {
                return Err(item);
            }
            s.items.push_back(item);
            if s.waiting {
                s.waiting = false;
                s.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Moves everything queued to the back of `into`. True if anything was moved.
    pub(crate) fn take_all(&self, into: &mut VecDeque<T>) -> bool {
        let mut s = self.lock();
        s.waiting = false;
        Self::move_items(&mut s.items, into)
    }

    /// Like [`take_all`](Self::take_all), but with nothing queued registers the task's waker
    /// and stays pending until a push.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, into: &mut VecDeque<T>) -> Poll<()> {
        let mut s = self.lock();
        if Self::move_items(&mut s.items, into) {
            s.waiting = false;
            return Poll::Ready(());
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        s.waiting = true;
        Poll::Pending
    }

    fn move_items(items: &mut VecDeque<T>, into: &mut VecDeque<T>) -> bool {
        if items.is_empty() {
            return false;
        }
        if into.is_empty() {
            std::mem::swap(items, into);
        } else {
            into.append(items);
        }
        true
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Refuses further pushes and returns what is still queued, for the caller to drop
    /// outside the lock (dropping a command can run other code, e.g. a oneshot's waker).
    pub(crate) fn close(&self) -> VecDeque<T> {
        let mut s = self.lock();
        s.closed = true;
        s.waker = None;
        std::mem::take(&mut s.items)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_burst_of_sends_wakes_a_waiting_task_once_and_arrives_in_order() {
        let q = CommandQueue::default();
        let count = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut got = VecDeque::new();
        assert!(q.poll_take(&mut cx, &mut got).is_pending());
        for i in 0..100 {
            q.send(i).unwrap();
        }
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "one wake-up for the burst"
        );
        assert!(q.poll_take(&mut cx, &mut got).is_ready());
        assert_eq!(got, (0..100).collect::<VecDeque<_>>());
        assert!(q.is_empty());
        // Taken while running (no poll): sends do not wake a task that is not waiting.
        q.send(100).unwrap();
        assert!(q.take_all(&mut got));
        assert!(!q.take_all(&mut got));
        assert_eq!(got.back(), Some(&100));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Asleep again: the next send wakes it.
        assert!(q.poll_take(&mut cx, &mut got).is_pending());
        q.send(101).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_closed_queue_hands_items_back_and_returns_what_it_held() {
        let q = CommandQueue::default();
        q.send(1).unwrap();
        q.send(2).unwrap();
        assert_eq!(q.close(), VecDeque::from([1, 2]));
        assert_eq!(q.send(3), Err(3));
    }

    #[test]
    fn items_from_many_threads_all_arrive_each_thread_in_order() {
        let q = Arc::new(CommandQueue::default());
        let threads: Vec<_> = (0..4_u32)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000_u32 {
                        q.send((t, i)).unwrap();
                    }
                })
            })
            .collect();
        let mut got = VecDeque::new();
        for t in threads {
            t.join().unwrap();
        }
        q.take_all(&mut got);
        assert_eq!(got.len(), 40_000);
        for t in 0..4 {
            let mine: Vec<u32> = got.iter().filter(|x| x.0 == t).map(|x| x.1).collect();
            assert_eq!(mine, (0..10_000).collect::<Vec<_>>(), "thread {t}");
        }
    }
}
