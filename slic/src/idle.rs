//! How a node waits when it has nothing to do: spin, yield, then park.
//!
//! A thread that blocks in the kernel lets its CPU halt, and on virtual machines a halted CPU
//! takes tens of microseconds to wake: more than a whole round trip on loopback. A node that
//! keeps polling for a short while after its last message answers the next one without that
//! wake-up, at the price of the CPU time it polls for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long a node keeps polling before it lets its thread sleep; see
/// [`NodeBuilder::idle_strategy`](crate::NodeBuilder::idle_strategy).
///
/// After its last read or write, a plain-TCP connection with nothing else to do keeps
/// reading its socket directly:
///
/// 1. for `spin`, re-reading at once (the thread stays busy, the CPU stays awake);
/// 2. for `yield_for` more, re-reading after offering the thread to the OS
///    (`sched_yield`), so other runnable threads go first;
/// 3. then it parks in the runtime's I/O driver (epoll) until woken.
///
/// Polling runs inside the connection's task and holds its worker thread, so it only starts
/// when no other task waits on the connection: not right after it handed a message on (the
/// receiver may be queued on the same thread), and only on one connection per node at a
/// time, so a node with thousands of connections spends at most one thread on it. It never
/// polls on tokio's current-thread runtime, where it would hold the only thread, nor on TLS
/// connections, whose bytes need the TLS layer, which reads through the runtime. Keep the
/// budget short (well under a millisecond): a task queued behind a polling connection on
/// the same worker waits for it.
///
/// Measured on two cores (BENCHMARKING.md): polling cut back-to-back 64 B round trips from
/// 86 µs to 12 µs p50 for a second busy core, but it slowed round trips paced slower than
/// the budget (the woken peer waits for the CPU the poller holds) and cut a 64 B stream
/// twentyfold. Hence the default, [`PARK`](Self::PARK).
///
/// ```
/// use std::time::Duration;
/// use slic::{IdleStrategy, Node};
///
/// // Back-to-back traffic with a core to spare: poll up to 200 µs after each message.
/// let node = Node::builder()
///     .idle_strategy(IdleStrategy::spin(Duration::from_micros(200)))
///     .build()?;
/// // Never poll: park at once (the lowest CPU use; wake-ups cost what the OS charges).
/// let quiet = Node::builder().idle_strategy(IdleStrategy::PARK).build()?;
/// # drop((node, quiet));
/// # Ok::<(), slic::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleStrategy {
    spin: Duration,
    yield_for: Duration,
}

impl IdleStrategy {
    /// Park at once: no polling, no CPU spent waiting.
    pub const PARK: Self = Self {
        spin: Duration::ZERO,
        yield_for: Duration::ZERO,
    };

    /// Poll for `spin`, then park.
    pub const fn spin(spin: Duration) -> Self {
        Self {
            spin,
            yield_for: Duration::ZERO,
        }
    }

    /// Poll for `spin`, then poll while yielding the thread for `yield_for`, then park.
    pub const fn spin_then_yield(spin: Duration, yield_for: Duration) -> Self {
        Self { spin, yield_for }
    }

    /// How long polling lasts in all.
    pub fn budget(&self) -> Duration {
        self.spin.saturating_add(self.yield_for)
    }

    /// What to do `idle` after the last activity: `None` to park.
    pub(crate) fn phase(&self, idle: Duration) -> Option<Phase> {
        if idle < self.spin {
            Some(Phase::Spin)
        } else if idle < self.budget() {
            Some(Phase::Yield)
        } else {
            None
        }
    }
}

impl Default for IdleStrategy {
    /// [`PARK`](Self::PARK), chosen by measurement (BENCHMARKING.md, "Idle strategy"): on
    /// a two-core machine polling wins only while the next message comes within the budget
    /// (back-to-back round trips: p50 about 0.2x raw TCP's), and loses otherwise, because the
    /// peer woken by a message is placed on the CPU the polling thread occupies and waits
    /// for the budget to run out. Choose polling where cores are to spare.
    fn default() -> Self {
        Self::PARK
    }
}

/// The two polling phases of an [`IdleStrategy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Spin,
    Yield,
}

/// The node's one polling slot for connections.
#[derive(Debug, Default)]
pub(crate) struct SpinSlot(AtomicUsize);

impl SpinSlot {
    /// Takes the slot for connection `id` (non-zero); true if it holds it now.
    pub(crate) fn take(&self, id: usize) -> bool {
        match self
            .0
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(holder) => holder == id,
        }
    }

    /// Gives the slot back if connection `id` holds it (a plain load when it does not).
    pub(crate) fn release(&self, id: usize) {
        if self.0.load(Ordering::Relaxed) == id {
            let _ = self
                .0
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_budget() {
        let s = IdleStrategy::spin_then_yield(Duration::from_micros(10), Duration::from_micros(5));
        assert_eq!(s.phase(Duration::ZERO), Some(Phase::Spin));
        assert_eq!(s.phase(Duration::from_micros(12)), Some(Phase::Yield));
        assert_eq!(s.phase(Duration::from_micros(15)), None);
        assert_eq!(IdleStrategy::PARK.phase(Duration::ZERO), None);
    }

    #[test]
    fn one_connection_holds_the_slot() {
        let slot = SpinSlot::default();
        assert!(slot.take(1));
        assert!(slot.take(1));
        assert!(!slot.take(2));
        slot.release(2);
        assert!(!slot.take(2));
        slot.release(1);
        assert!(slot.take(2));
    }
}
