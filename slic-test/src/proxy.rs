//! [`FaultProxy`]: an in-process TCP proxy on loopback that forwards every accepted connection
//! to a target address and damages the byte stream on purpose, per direction, as a [`Faults`]
//! says.
//!
//! Each direction of each connection is a pipeline of two stages. The reader takes whatever
//! the source socket has and stamps it with the time it may leave (now plus the latency,
//! never earlier than the chunk before, so order is kept). The writer waits for that time and
//! writes the bytes to the destination socket, cutting them into segments at every byte offset
//! where a fault is due, in the segment sizes and at the pace the faults ask for.
//!
//! Byte offsets count the bytes of one direction of one connection, from 0, as forwarded by
//! the proxy; the handshake bytes are included. Each connection starts at offset 0 again.
//!
//! # Reproducibility
//!
//! Every random choice comes from [`Rng`] streams derived from the seed, the connection's
//! number (0 for the first accepted) and the direction. Which bit a flip at a given offset
//! changes, and which bytes a flip probability hits, depend on nothing else, so they repeat
//! exactly from run to run. Segment sizes and jitter are drawn from seeded streams too, but how
//! the kernel groups bytes into reads varies between runs, and with it where those draws land.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use crate::rng::Rng;

/// Bytes the reader takes from its socket at most per read.
const READ_CHUNK: usize = 64 << 10;
/// Chunks a direction holds between its reader and its writer. With [`READ_CHUNK`] this
/// bounds a direction's memory at 4 MiB; a full pipeline stops reading, which pushes back
/// on the sender as a slow network would.
const PIPELINE_CHUNKS: usize = 64;
/// After a [`Faults::close_at`], how long the proxy keeps reading and discarding what the two
/// ends still send, so that they see a clean end of stream rather than a reset.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the side that connected to the proxy towards the target.
    ClientToServer,
    /// From the target back to the side that connected to the proxy.
    ServerToClient,
}

impl Direction {
    fn index(self) -> u64 {
        match self {
            Self::ClientToServer => 0,
            Self::ServerToClient => 1,
        }
    }
}

/// The faults applied to one direction of every connection. [`Faults::none`] forwards bytes
/// unchanged; each method adds one fault. Several faults combine: latency is applied first,
/// then stalls, the bandwidth cap, slicing, flips, and a reset or close ends it all.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    latency: Duration,
    jitter: Duration,
    max_segment: Option<usize>,
    bandwidth: Option<u64>,
    stall: Option<(u64, Duration)>,
    reset_at: Option<u64>,
    close_at: Option<u64>,
    flip_at: BTreeSet<u64>,
    flip_probability: f64,
}

impl Faults {
    /// No fault: bytes are forwarded as they come.
    pub fn none() -> Self {
        Self::default()
    }

    /// Delays every byte by `base` plus a uniform random amount in `-jitter..=jitter`
    /// (clamped at zero), without reordering: a chunk never leaves before the one read
    /// before it.
    pub fn latency(mut self, base: Duration, jitter: Duration) -> Self {
        self.latency = base;
        self.jitter = jitter;
        self
    }

    /// Writes the bytes in segments of a random size in `1..=max_segment`, each its own
    /// write (the proxy's sockets have `TCP_NODELAY`, so each leaves as its own TCP segment).
    /// `slice(1)` writes one byte at a time.
    ///
    /// # Panics
    ///
    /// If `max_segment` is 0.
    pub fn slice(mut self, max_segment: usize) -> Self {
        assert!(max_segment > 0, "segments of at least one byte");
        self.max_segment = Some(max_segment);
        self
    }

    /// Caps the direction at `bytes_per_second`, paced in slices of a hundredth of a second
    /// with no burst allowance: forwarding `n` bytes takes at least
    /// `(n - rate / 100) / rate` seconds.
    ///
    /// # Panics
    ///
    /// If the rate is 0.
    pub fn bandwidth(mut self, bytes_per_second: u64) -> Self {
        assert!(bytes_per_second > 0, "a bandwidth of at least 1 byte/s");
        self.bandwidth = Some(bytes_per_second);
        self
    }

    /// Stops forwarding for `duration` once `after` bytes have been forwarded (once per
    /// connection). The reader goes on reading meanwhile, up to the pipeline's bound, as a
    /// network that buffers but does not deliver.
    pub fn stall(mut self, after: u64, duration: Duration) -> Self {
        self.stall = Some((after, duration));
        self
    }

    /// Resets the whole connection once `offset` bytes have been forwarded: both of the
    /// proxy's sockets get `SO_LINGER` 0 and are closed, so both ends receive a TCP RST.
    /// Bytes still in the proxy's send buffers are discarded, so the far end may see fewer
    /// than `offset` bytes.
    pub fn reset_at(mut self, offset: u64) -> Self {
        self.reset_at = Some(offset);
        self
    }

    /// Closes the whole connection once `offset` bytes have been forwarded: both ends get an
    /// orderly end of stream (FIN) right after what was forwarded, and whatever they still
    /// send is read and discarded.
    pub fn close_at(mut self, offset: u64) -> Self {
        self.close_at = Some(offset);
        self
    }

    /// Flips one bit, chosen by the seeded generator, of the byte at `offset`. May be given
    /// several times for several bytes.
    pub fn flip_at(mut self, offset: u64) -> Self {
        self.flip_at.insert(offset);
        self
    }

    /// Flips one random bit of each forwarded byte with probability `p`.
    ///
    /// # Panics
    ///
    /// If `p` is not in `0.0..=1.0`.
    pub fn flip_probability(mut self, p: f64) -> Self {
        assert!((0.0..=1.0).contains(&p), "a probability, not {p}");
        self.flip_probability = p;
        self
    }
}

/// Something the proxy did to a connection, or saw happen to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// The connection's number, 0 for the first the proxy accepted.
    pub connection: u64,
    /// The direction it happened in.
    pub direction: Direction,
    /// The direction's byte offset at that point.
    pub offset: u64,
    /// What happened.
    pub kind: FaultKind,
}

/// What a [`FaultEvent`] was.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultKind {
    /// Bit `bit` (0 = least significant) of the byte at the offset was flipped.
    Flip {
        /// The bit flipped.
        bit: u8,
        /// The byte as read.
        before: u8,
        /// The byte as forwarded.
        after: u8,
    },
    /// Forwarding stopped for this long.
    Stall(Duration),
    /// The connection was reset ([`Faults::reset_at`]).
    Reset,
    /// The connection was closed ([`Faults::close_at`]).
    Close,
    /// The source ended its stream; the proxy passed the end on.
    EndOfStream,
    /// A socket failed (the error is given); the proxy reset the connection.
    Failed(String),
}

/// Builds a [`FaultProxy`]; from [`FaultProxy::builder`].
#[derive(Clone, Debug)]
pub struct FaultProxyBuilder {
    target: SocketAddr,
    seed: u64,
    client_to_server: Faults,
    server_to_client: Faults,
}

impl FaultProxyBuilder {
    /// The seed every random choice derives from. Default 0; tests should set and print it.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Faults for the bytes from the connecting side to the target.
    pub fn client_to_server(mut self, faults: Faults) -> Self {
        self.client_to_server = faults;
        self
    }

    /// Faults for the bytes from the target to the connecting side.
    pub fn server_to_client(mut self, faults: Faults) -> Self {
        self.server_to_client = faults;
        self
    }

    /// The same faults in both directions (each direction draws its own random numbers).
    pub fn both(self, faults: Faults) -> Self {
        self.client_to_server(faults.clone())
            .server_to_client(faults)
    }

    /// Listens on 127.0.0.1 with a port chosen by the OS and starts forwarding.
    ///
    /// # Errors
    ///
    /// The listener cannot be bound.
    pub async fn start(self) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let span = debug_span!("fault_proxy", %addr, target = %self.target, seed = self.seed);
        let accept =
            tokio::spawn(accept_loop(listener, Arc::new(self), shared.clone()).instrument(span));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }
}

/// A TCP proxy on 127.0.0.1 that forwards each accepted connection to a target, applying
/// [`Faults`] to each direction. Dropping it stops it: its listener and every connection it
/// carries are aborted (their sockets closed).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// A builder forwarding to `target`, without faults and with seed 0.
    pub fn builder(target: SocketAddr) -> FaultProxyBuilder {
        FaultProxyBuilder {
            target,
            seed: 0,
            client_to_server: Faults::none(),
            server_to_client: Faults::none(),
        }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Everything the proxy did or saw so far, in order.
    pub fn events(&self) -> Vec<FaultEvent> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the connections' JoinSet: aborting it aborts them all.
        self.accept.abort();
    }
}

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicU64,
    log: Mutex<Vec<FaultEvent>>,
}

impl Shared {
    fn record(&self, connection: u64, direction: Direction, offset: u64, kind: FaultKind) {
        debug!(connection, ?direction, offset, ?kind, "fault proxy");
        lock(&self.log).push(FaultEvent {
            connection,
            direction,
            offset,
            kind,
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Held only for a push or a clone: a poisoned log is still intact.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, config: Arc<FaultProxyBuilder>, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, from)) => {
                    let index = shared.accepted.fetch_add(1, Ordering::Relaxed);
                    let span = debug_span!("proxied", index, %from);
                    connections.spawn(
                        connection(index, inbound, config.clone(), shared.clone()).instrument(span),
                    );
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reaps finished connections; disabled while there are none.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// How one direction, or the whole connection, ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The source's end of stream was passed on.
    Eof,
    /// A reset fault fired.
    Reset,
    /// A close fault fired.
    Close,
    /// A socket failed.
    Failed,
}

async fn connection(
    index: u64,
    inbound: TcpStream,
    config: Arc<FaultProxyBuilder>,
    shared: Arc<Shared>,
) {
    let outbound = match TcpStream::connect(config.target).await {
        Ok(s) => s,
        Err(e) => {
            let kind = FaultKind::Failed(format!("connect to {}: {e}", config.target));
            shared.record(index, Direction::ClientToServer, 0, kind);
            return;
        }
    };
    for s in [&inbound, &outbound] {
        if let Err(e) = s.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }
    }
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let end = {
        let up = Pipe::new(index, Direction::ClientToServer, &config, &shared)
            .run(&mut in_read, &mut out_write);
        let down = Pipe::new(index, Direction::ServerToClient, &config, &shared)
            .run(&mut out_read, &mut in_write);
        both_directions(up, down).await
    };
    match end {
        End::Eof => {}
        End::Reset | End::Failed => {
            for r in [&in_read, &out_read] {
                // SO_LINGER 0 makes close() send RST and discard unsent data; it never blocks,
                // which is what the deprecation of `set_linger` warns about.
                #[allow(deprecated)]
                if let Err(e) = r.as_ref().set_linger(Some(Duration::ZERO)) {
                    debug!(error = %e, "set_linger failed");
                }
            }
            // Dropping a write half would shut the write side down (FIN) before the reset.
            in_write.forget();
            out_write.forget();
        }
        End::Close => {
            let _ = tokio::join!(in_write.shutdown(), out_write.shutdown());
            let _ = tokio::time::timeout(CLOSE_DRAIN, async {
                tokio::join!(drain(&mut in_read), drain(&mut out_read))
            })
            .await;
        }
    }
}

/// Reads and discards until end of stream or an error (callers bound it in time).
async fn drain(r: &mut OwnedReadHalf) {
    let mut buf = vec![0_u8; 16 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs both directions until both have passed on an end of stream, or until either ends
/// otherwise (a fault or a failure), which ends the connection.
async fn both_directions(up: impl Future<Output = End>, down: impl Future<Output = End>) -> End {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            end = &mut up, if !up_done => {
                up_done = true;
                end
            }
            end = &mut down, if !down_done => {
                down_done = true;
                end
            }
        };
        if end != End::Eof {
            return end;
        }
    }
    End::Eof
}

/// What the reader hands the writer.
enum Chunk {
    Data(BytesMut),
    Eof,
    Failed(String),
}

/// One direction of one connection.
struct Pipe<'a> {
    connection: u64,
    direction: Direction,
    faults: &'a Faults,
    shared: &'a Shared,
    /// Jitter draws (reader).
    jitter_rng: Rng,
    /// Segment sizes (writer).
    slice_rng: Rng,
    /// Per-byte flip draws, one draw per forwarded byte when a probability is set.
    flip_rng: Rng,
    /// Seed for the bit flipped at a given [`Faults::flip_at`] offset.
    flip_seed: u64,
    offset: u64,
    stalled: bool,
    next_slot: Option<Instant>,
}

impl<'a> Pipe<'a> {
    fn new(
        connection: u64,
        direction: Direction,
        config: &'a FaultProxyBuilder,
        shared: &'a Shared,
    ) -> Self {
        let stream = connection * 2 + direction.index();
        let mut base = Rng::derive(config.seed, stream);
        let faults = match direction {
            Direction::ClientToServer => &config.client_to_server,
            Direction::ServerToClient => &config.server_to_client,
        };
        Self {
            connection,
            direction,
            faults,
            shared,
            jitter_rng: Rng::new(base.next_u64()),
            slice_rng: Rng::new(base.next_u64()),
            flip_rng: Rng::new(base.next_u64()),
            flip_seed: base.next_u64(),
            offset: 0,
            stalled: false,
            next_slot: None,
        }
    }

    fn record(&self, kind: FaultKind) {
        self.shared
            .record(self.connection, self.direction, self.offset, kind);
    }

    async fn run(mut self, src: &mut OwnedReadHalf, dst: &mut OwnedWriteHalf) -> End {
        let (tx, rx) = mpsc::channel(PIPELINE_CHUNKS);
        let (latency, jitter) = (self.faults.latency, self.faults.jitter);
        let mut jitter_rng = self.jitter_rng.clone();
        let reader = async move {
            read_side(src, &tx, latency, jitter, &mut jitter_rng).await;
            // The writer decides when the direction is over.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            end = self.write_side(dst, rx) => end,
            () = reader => End::Failed,
        }
    }

    async fn write_side(
        &mut self,
        dst: &mut OwnedWriteHalf,
        mut rx: mpsc::Receiver<(Instant, Chunk)>,
    ) -> End {
        loop {
            if let Some(end) = self.due().await {
                return end;
            }
            let Some((at, chunk)) = rx.recv().await else {
                return End::Failed;
            };
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            let mut data = match chunk {
                Chunk::Data(data) => data,
                Chunk::Eof => {
                    self.record(FaultKind::EndOfStream);
                    // The other direction may still be talking: a half close.
                    let _ = dst.shutdown().await;
                    return End::Eof;
                }
                Chunk::Failed(e) => {
                    self.record(FaultKind::Failed(format!("read: {e}")));
                    return End::Failed;
                }
            };
            let mut pos = 0;
            while pos < data.len() {
                if let Some(end) = self.due().await {
                    return end;
                }
                let n = self.segment_len(data.len() - pos);
                let segment = &mut data[pos..pos + n];
                self.flip(segment);
                self.pace(n).await;
                let written = match dst.write_all(segment).await {
                    Ok(()) if self.faults.max_segment.is_some() => dst.flush().await,
                    other => other,
                };
                if let Err(e) = written {
                    self.record(FaultKind::Failed(format!("write: {e}")));
                    return End::Failed;
                }
                self.offset += n as u64;
                pos += n;
            }
        }
    }

    /// Fires the reset, close or stall due at the current offset.
    async fn due(&mut self) -> Option<End> {
        if self.faults.reset_at == Some(self.offset) {
            self.record(FaultKind::Reset);
            return Some(End::Reset);
        }
        if self.faults.close_at == Some(self.offset) {
            self.record(FaultKind::Close);
            return Some(End::Close);
        }
        if let Some((after, duration)) = self.faults.stall
            && after == self.offset
            && !self.stalled
        {
            self.stalled = true;
            self.record(FaultKind::Stall(duration));
            tokio::time::sleep(duration).await;
            // Time spent stalled is not bandwidth credit.
            self.next_slot = None;
        }
        None
    }

    /// How many of the `available` bytes to write next: a slice, at most a hundredth of a
    /// second's worth under a cap, and never past the offset of a pending fault.
    fn segment_len(&mut self, available: usize) -> usize {
        let mut n = available as u64;
        if let Some(max) = self.faults.max_segment {
            n = n.min(self.slice_rng.between(1, max as u64));
        }
        if let Some(rate) = self.faults.bandwidth {
            n = n.min((rate / 100).max(1));
        }
        let stall = self
            .faults
            .stall
            .filter(|_| !self.stalled)
            .map(|(after, _)| after);
        for due in [self.faults.reset_at, self.faults.close_at, stall]
            .into_iter()
            .flatten()
        {
            if due > self.offset {
                n = n.min(due - self.offset);
            }
        }
        n as usize
    }

    fn flip(&mut self, segment: &mut [u8]) {
        let p = self.faults.flip_probability;
        if p == 0.0 && self.faults.flip_at.is_empty() {
            return;
        }
        let start = self.offset;
        for (i, byte) in segment.iter_mut().enumerate() {
            let offset = start + i as u64;
            let bit = if self.faults.flip_at.contains(&offset) {
                Some(Rng::derive(self.flip_seed, offset).below(8) as u8)
            } else if p > 0.0 && self.flip_rng.unit() < p {
                Some(self.flip_rng.below(8) as u8)
            } else {
                None
            };
            if let Some(bit) = bit {
                let before = *byte;
                *byte ^= 1 << bit;
                self.shared.record(
                    self.connection,
                    self.direction,
                    offset,
                    FaultKind::Flip {
                        bit,
                        before,
                        after: *byte,
                    },
                );
            }
        }
    }

    /// Waits until the cap allows `n` more bytes.
    async fn pace(&mut self, n: usize) {
        let Some(rate) = self.faults.bandwidth else {
            return;
        };
        let now = Instant::now();
        let slot = self.next_slot.map_or(now, |s| s.max(now));
        if slot > now {
            tokio::time::sleep_until(slot).await;
        }
        self.next_slot = Some(slot + Duration::from_secs_f64(n as f64 / rate as f64));
    }
}

/// Reads the source into chunks stamped with the time they may leave, until its end of
/// stream, a read error, or the writer is gone.
async fn read_side(
    src: &mut OwnedReadHalf,
    tx: &mpsc::Sender<(Instant, Chunk)>,
    latency: Duration,
    jitter: Duration,
    rng: &mut Rng,
) {
    let mut last = Instant::now();
    loop {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let chunk = match src.read_buf(&mut buf).await {
            Ok(0) => Chunk::Eof,
            Ok(_) => Chunk::Data(buf),
            Err(e) => Chunk::Failed(e.to_string()),
        };
        let more = matches!(chunk, Chunk::Data(_));
        let mut delay = latency;
        if !jitter.is_zero() {
            let span = jitter.as_nanos().min(u128::from(u64::MAX / 2)) as u64;
            let offset = rng.between(0, span * 2);
            delay = (latency + Duration::from_nanos(offset)).saturating_sub(jitter);
        }
        // Ends and errors are stamped too, so they never overtake data.
        let at = last.max(Instant::now() + delay);
        last = at;
        if tx.send((at, chunk)).await.is_err() || !more {
            return;
        }
    }
}
