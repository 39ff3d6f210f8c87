//! What one benchmark case asks of a system, and what its client reports.
//!
//! Every system module (raw, slic, zmq, grpc) offers the same two entry points:
//!
//! ```text
//! pub fn serve(variant: &str, case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> anyhow::Result<()>
//! pub fn client(variant: &str, case: &Case, addr: SocketAddr, idle: &mut dyn FnMut()) -> anyhow::Result<Outcome>
//! ```
//!
//! `serve` binds 127.0.0.1 port 0, calls `ready` with the bound address once it accepts
//! connections, and serves until the process is killed. `client` connects to `addr`, runs the
//! case and returns what it measured. Server and client run in separate processes, started
//! by the orchestrator in `main.rs`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One benchmark case. The server process gets the same case as its client, so it knows
/// what to do without any control messages on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Case {
    /// The client sends `size` bytes, the server echoes them back, one message outstanding.
    /// `rate`: round trips per second (paced, starting on a fixed schedule), or `None` for
    /// back to back. The first `warmup` round trips are not recorded.
    RoundTrip {
        size: usize,
        count: usize,
        warmup: usize,
        rate: Option<u32>,
    },
    /// The server sends `count` messages of `size` bytes to the client as fast as it can,
    /// starting when the client connects (after `warmup` messages, which are not timed).
    /// The client times from the first timed message to the last one.
    Stream {
        size: usize,
        count: usize,
        warmup: usize,
    },
    /// Request/response on one connection, `in_flight` requests outstanding at all times,
    /// `count` requests in all (after `warmup` untimed ones). Requests and responses carry
    /// `size` bytes.
    Requests {
        size: usize,
        count: usize,
        warmup: usize,
        in_flight: usize,
    },
    /// `conns` connections. The client opens them all, makes one round trip on each, calls
    /// `idle()` (the orchestrator reads the server's memory then), and then keeps one round
    /// trip of `size` bytes outstanding on every connection for `seconds`.
    Connections {
        conns: usize,
        size: usize,
        seconds: f64,
    },
}

/// What a client measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// Round-trip times in nanoseconds, one per timed round trip, in the order measured.
    Latencies(Vec<u64>),
    /// Messages (and payload bytes) received in `seconds`.
    Throughput {
        messages: u64,
        bytes: u64,
        seconds: f64,
    },
    /// Requests completed in `seconds`.
    Rate { requests: u64, seconds: f64 },
}

/// Waits until `at`: sleeps while far off, then spins the last stretch, so paced sends
/// leave on time without the client keeping a core busy between them.
fn wait_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > Duration::from_micros(200) {
            std::thread::sleep(left - Duration::from_micros(150));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// When the `i`-th paced round trip is due, for `rate` per second from `start`.
fn due(start: Instant, i: usize, rate: u32) -> Instant {
    start + Duration::from_nanos((i as u64).saturating_mul(1_000_000_000) / u64::from(rate))
}

/// A payload of `size` bytes that does not compress to nothing (no system here compresses,
/// but the bytes should not be all zeros either).
pub fn payload(size: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Paces and times the round trips of a [`Case::RoundTrip`], the same way for every system:
///
/// ```text
/// let mut rt = RoundTrips::new(count, warmup, rate);
/// for i in 0..rt.total() {
///     let t = rt.begin(i);
///     // send, await the echo
///     rt.end(i, t);
/// }
/// Ok(rt.finish())
/// ```
///
/// `begin` blocks the calling thread until a paced round trip is due, async clients too: the
/// client has nothing else to do between round trips, and tokio's timer has only millisecond
/// precision, too coarse for pacing at 10,000/s.
pub struct RoundTrips {
    warmup: usize,
    total: usize,
    rate: Option<u32>,
    start: Instant,
    latencies: Vec<u64>,
}

impl RoundTrips {
    /// `warmup` untimed round trips, then `count` timed ones, paced at `rate` per second.
    pub fn new(count: usize, warmup: usize, rate: Option<u32>) -> Self {
        Self {
            warmup,
            total: warmup + count,
            rate,
            start: Instant::now(),
            latencies: Vec::with_capacity(count),
        }
    }

    /// How many round trips to make, warm-up included.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Waits until round trip `i` is due (when paced); its timing starts at the returned
    /// instant.
    pub fn begin(&self, i: usize) -> Instant {
        if let Some(rate) = self.rate {
            wait_until(due(self.start, i, rate));
        }
        Instant::now()
    }

    /// Records round trip `i`, begun at `t`, unless it is a warm-up one.
    pub fn end(&mut self, i: usize, t: Instant) {
        if i >= self.warmup {
            self.latencies.push(t.elapsed().as_nanos() as u64);
        }
    }

    /// The recorded latencies.
    pub fn finish(self) -> Outcome {
        Outcome::Latencies(self.latencies)
    }
}

impl Outcome {
    /// `count` messages of `size` bytes received since `first` (the first timed message; none
    /// when `count` is zero).
    pub fn throughput(count: usize, size: usize, first: Option<Instant>) -> Self {
        Self::Throughput {
            messages: count as u64,
            bytes: (count * size) as u64,
            seconds: first.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        }
    }
}
