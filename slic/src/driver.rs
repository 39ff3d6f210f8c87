//! The task that owns one socket and one protocol [`Connection`], and the handle that talks to it.
//!
//! Each wake-up runs, in order: feed input, drain transmits (written with one vectored write),
//! handle timers, forward events (STYLE.md §5). Handles reach the task through an unbounded
//! command queue whose memory is bounded by the peer's send semaphore (`buffer_cap` bytes).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use slic_proto::{
    CodecId, Compression, Connection, ConnectionError, ErrorCode, Event as ProtoEvent, HEADER_LEN,
    IdMap, Initiator, Kind, SendError, Side, Transmit, id_map,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use crate::channel::Channel;
use crate::commands::CommandQueue;
use crate::compress;
use crate::error::Error;
use crate::idle::{IdleStrategy, Phase};
use crate::inbox::{Entry, Run};
use crate::node::{
    ChannelId, ConnectionSlot, DisconnectReason, Event, Message, MessageId, NodeInner, PeerId,
    PeerInfo,
};
use crate::resource::{self, Reply, Status};
use crate::tls::PeerIdentity;
use crate::upload;

/// Bytes of frames the task moves out of the protocol core before it writes them.
const OUT_HIGH_WATER: usize = 256 << 10;
/// Payloads up to this size are copied next to their header, so a burst of small messages
/// leaves in one contiguous write; larger ones are written from their own buffer.
const COPY_THRESHOLD: usize = 1024;
/// Most segments passed to one `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 64;
/// Room made in the read buffer before a read.
const READ_CHUNK: usize = 64 << 10;
/// Commands drained per wake-up.
const COMMAND_BUDGET: usize = 256;
/// How long a closing connection may spend writing its last frames (GOAWAY or ERROR).
const LINGER: Duration = Duration::from_secs(2);

pub(crate) enum Command {
    Send(Outgoing),
    Open(&'static str, oneshot::Sender<Result<Channel, Error>>),
    /// A handler finished the request with this id: an encoded (and, when worthwhile,
    /// compressed) response. `tracked`: the handler ran in a task listed in `serving` (and is
    /// answered only if still there, not cancelled); otherwise it was answered inline.
    Respond {
        id: u64,
        codec: CodecId,
        payload: Bytes,
        compressed: bool,
        tracked: bool,
    },
    /// This side gave up on its request with this id.
    Cancel(u64),
    CloseChannel(u32),
    Release(u32),
    Close,
}

/// Credit of consumed messages, gathered on the consumer side and handed to the task in
/// batches so that a busy receiver does not wake the task for every message.
#[derive(Debug)]
pub(crate) struct CreditReturn {
    channel: u32,
    pending: AtomicU32,
    threshold: u32,
    cmd: Arc<CommandQueue<Command>>,
}

impl CreditReturn {
    pub(crate) fn consume(&self, credit: u32) {
        if self.add(credit) {
            self.release();
        }
    }

    /// Counts `credit` as consumed; true when the pending credit just reached the step at
    /// which it goes back to the connection ([`release`](Self::release)).
    pub(crate) fn add(&self, credit: u32) -> bool {
        let before = self.pending.fetch_add(credit, Ordering::AcqRel);
        before < self.threshold && before.saturating_add(credit) >= self.threshold
    }

    /// The pending credit at which it goes back to the connection.
    pub(crate) fn step(&self) -> u32 {
        self.threshold
    }

    /// Asks the connection to hand the pending credit back to the peer.
    pub(crate) fn release(&self) {
        let _ = self.cmd.send(Command::Release(self.channel));
    }

    /// A credit counter of no connection, which never asks for a release.
    #[cfg(test)]
    pub(crate) fn for_test() -> Arc<Self> {
        Self::for_test_with_step(u32::MAX)
    }

    /// The same with a release step of `step` (its releases go nowhere).
    #[cfg(test)]
    pub(crate) fn for_test_with_step(step: u32) -> Arc<Self> {
        Arc::new(Self {
            channel: 0,
            pending: AtomicU32::new(0),
            threshold: step,
            cmd: Arc::default(),
        })
    }

    #[cfg(test)]
    pub(crate) fn pending_for_test(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }
}

/// What a consumer receives: the message and where its credit goes.
pub(crate) struct Delivery {
    pub(crate) msg: Message,
    pub(crate) credit: Arc<CreditReturn>,
    pub(crate) amount: u32,
}

impl Delivery {
    pub(crate) fn consume(self) -> Message {
        self.credit.consume(self.amount);
        self.msg
    }
}

#[cfg(test)]
impl Message {
    /// An empty message from nowhere whose id is `id`.
    pub(crate) fn for_test(id: u64) -> Self {
        Self {
            from: PeerInfo {
                id: PeerId(1),
                name: Arc::from("test"),
                addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                identity: None,
            },
            id: MessageId(id),
            channel: ChannelId(0),
            codec: CodecId::Raw,
            body: Bytes::new(),
        }
    }
}

/// The handle side of one connection, shared by the node's peer table and channels.
#[derive(Debug)]
pub(crate) struct PeerLink {
    pub(crate) info: PeerInfo,
    pub(crate) cmd: Arc<CommandQueue<Command>>,
    sem: Arc<Semaphore>,
    buffer_cap: usize,
    /// The peer's handshake limits (set when the link is rebuilt at the handshake; zero
    /// before, so nothing can be queued on a link that has not completed it).
    codecs: u8,
    max_message: u32,
    /// Negotiated compression, and the payload size from which it applies.
    compression: Option<Compression>,
    compression_threshold: usize,
    pub(crate) done: CancellationToken,
    pub(crate) kill: CancellationToken,
    /// Requests this side sent and awaits, by request id.
    pending: Arc<Mutex<IdMap<u64, oneshot::Sender<Reply>>>>,
    next_request: Arc<AtomicU64>,
}

/// Forgets a request whose caller stopped waiting (timeout or dropped future) and tells the
/// peer to cancel it.
struct CallGuard<'a> {
    link: &'a PeerLink,
    id: u64,
    armed: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.link.pending).remove(&self.id);
            let _ = self.link.cmd.send(Command::Cancel(self.id));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Held only for a map insert or remove, never across user code: a poisoned map is intact.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PeerLink {
    /// Sends a request and waits for its response, up to `timeout`. Dropping the future, or
    /// the timeout, cancels the request on the peer.
    pub(crate) async fn call(
        &self,
        codec: CodecId,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(CodecId, Bytes), Error> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut guard = CallGuard {
            link: self,
            id,
            armed: true,
        };
        let work = async {
            self.enqueue_kind(Kind::Request, 0, id, codec, payload)
                .await?;
            rx.await
                .map_err(|_| Error::Status(Status::Unavailable("connection closed".into())))
        };
        let reply = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::Status(Status::Timeout))??;
        guard.armed = false;
        reply.map_err(Error::Status)
    }

    /// Queues a message, waiting while the peer's send buffer is full.
    pub(crate) async fn enqueue(
        &self,
        channel: u32,
        id: MessageId,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<(), Error> {
        self.enqueue_kind(Kind::Message, channel, id.0, codec, payload)
            .await
    }

    async fn enqueue_kind(
        &self,
        kind: Kind,
        channel: u32,
        id: u64,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<(), Error> {
        let out = self.prepare(
            kind,
            channel,
            id,
            codec,
            payload,
            &mut CompressMemo::default(),
        )?;
        self.submit(out).await
    }

    /// Checks, compresses and sizes a message for this peer: the part of queueing that does
    /// not depend on room in the send buffer, done once however often the caller retries.
    pub(crate) fn prepare(
        &self,
        kind: Kind,
        channel: u32,
        id: u64,
        codec: CodecId,
        payload: Bytes,
        memo: &mut CompressMemo,
    ) -> Result<Outgoing, Error> {
        self.check(codec, payload.len())?;
        let (payload, compressed) = self.maybe_compress(payload, memo);
        Ok(Outgoing {
            peer: self.info.id.0,
            permits: self.permits_for(payload.len()),
            compressed,
            kind,
            channel,
            id,
            codec,
            payload,
        })
    }

    /// Queues a prepared message, waiting while the peer's send buffer is full.
    pub(crate) async fn submit(&self, out: Outgoing) -> Result<(), Error> {
        let acquired = self
            .sem
            .acquire_many(out.permits as u32)
            .await
            .map_err(|_| Error::UnknownPeer(self.info.id))?;
        acquired.forget();
        self.push(out)
    }

    /// Queues a prepared message if the send buffer has room now; otherwise hands it back.
    pub(crate) fn try_submit(&self, out: Outgoing) -> Result<(), TrySubmitError> {
        match self.sem.try_acquire_many(out.permits as u32) {
            Ok(p) => p.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySubmitError::Full(out)),
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(TrySubmitError::Gone(self.info.id));
            }
        }
        self.push(out)
            .map_err(|_| TrySubmitError::Gone(self.info.id))
    }

    /// Compresses a payload at or above the threshold when the connection negotiated an
    /// algorithm and compressing makes it smaller. Runs in the sender's task, not the
    /// connection's, so a busy connection does not also pay for its senders' compression
    /// (except for replies of handlers answered inline, which run in the connection's task).
    fn maybe_compress(&self, payload: Bytes, memo: &mut CompressMemo) -> (Bytes, bool) {
        match self.compression {
            Some(alg) if payload.len() >= self.compression_threshold => {
                match memo.compress(alg, &payload) {
                    Some(c) => (c, true),
                    None => (payload, false),
                }
            }
            _ => (payload, false),
        }
    }

    fn check(&self, codec: CodecId, len: usize) -> Result<(), Error> {
        let max = self.max_message;
        if len > max as usize {
            return Err(Error::MessageTooLarge { len, max });
        }
        if self.codecs & codec.mask_bit() == 0 {
            return Err(Error::CodecRefused(codec));
        }
        Ok(())
    }

    /// A message larger than the whole buffer takes all of it rather than waiting forever.
    fn permits_for(&self, len: usize) -> usize {
        (len + HEADER_LEN).min(self.buffer_cap)
    }

    fn push(&self, out: Outgoing) -> Result<(), Error> {
        self.cmd
            .send(Command::Send(out))
            .map_err(|_| Error::UnknownPeer(self.info.id))
    }
}

/// The compressed forms of one payload, by algorithm, so a message sent to many peers is
/// compressed once per algorithm rather than once per peer.
#[derive(Debug, Default)]
pub(crate) struct CompressMemo(Vec<(Compression, Option<Bytes>)>);

impl CompressMemo {
    fn compress(&mut self, alg: Compression, payload: &[u8]) -> Option<Bytes> {
        if let Some((_, done)) = self.0.iter().find(|(a, _)| *a == alg) {
            return done.clone();
        }
        let done = compress::compress(alg, payload);
        self.0.push((alg, done.clone()));
        done
    }
}

/// Why [`PeerLink::try_submit`] did not queue a message.
#[derive(Debug)]
pub(crate) enum TrySubmitError {
    /// The send buffer is full: here is the message back, to wait with.
    Full(Outgoing),
    /// The connection is gone.
    Gone(PeerId),
}

impl From<TrySubmitError> for Error {
    fn from(e: TrySubmitError) -> Self {
        match e {
            TrySubmitError::Full(out) => Self::Full(PeerId(out.peer)),
            TrySubmitError::Gone(p) => Self::UnknownPeer(p),
        }
    }
}

/// A message ready for one peer's connection task: checked, compressed if worthwhile, with
/// the send-buffer permits it holds once queued.
#[derive(Debug)]
pub(crate) struct Outgoing {
    peer: u64,
    compressed: bool,
    kind: Kind,
    channel: u32,
    id: u64,
    codec: CodecId,
    payload: Bytes,
    permits: usize,
}

/// The byte streams a connection can run over (TCP, TLS, ...).
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Reads what the socket holds right now with a direct non-blocking read, for the idle
    /// strategy's polling: the runtime's own read only looks at the socket after its I/O
    /// driver reported it readable, which a polling thread that does not hold the driver
    /// would never see. `None`: this transport cannot (TLS, whose bytes need decrypting).
    fn read_now(&self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
}

impl Transport for tokio::net::TcpStream {
    fn read_now(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        use std::io::Read;
        let socket = socket2::SockRef::from(self);
        // The socket is non-blocking (tokio made it so): an empty one gives WouldBlock.
        Some((&*socket).read(buf))
    }
}

impl Transport for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {}

impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

/// Starts the task for a new connection, with the protocol settings of its transport.
/// `establish` yields the byte stream (a TLS handshake may run in it); it and the slic handshake share one deadline, counted from now. `ready`
/// hears once the handshake is done (or failed).
#[allow(clippy::too_many_arguments)] // each is a separate fact about the new connection
pub(crate) fn spawn<S, F>(
    node: Arc<NodeInner>,
    establish: F,
    addr: SocketAddr,
    side: Side,
    ready: Option<oneshot::Sender<Result<PeerId, Error>>>,
    slot: Option<ConnectionSlot>,
    proto: Arc<slic_proto::Config>,
) where
    S: Transport,
    F: Future<Output = io::Result<(S, Option<PeerIdentity>)>> + Send + 'static,
{
    let id = node.next_peer_id();
    let cmd = Arc::new(CommandQueue::default());
    let buffer_cap = node.settings.buffer_cap;
    let link = Arc::new(PeerLink {
        info: PeerInfo {
            id,
            name: Arc::from(""),
            addr,
            identity: None,
        },
        cmd,
        sem: Arc::new(Semaphore::new(buffer_cap)),
        buffer_cap,
        codecs: 0,
        max_message: 0,
        compression: None,
        compression_threshold: node.settings.compression_threshold,
        done: CancellationToken::new(),
        kill: node.shutdown.child_token(),
        pending: Arc::default(),
        next_request: Arc::new(AtomicU64::new(1)),
    });
    let started = TokioInstant::now();
    let deadline = started + node.proto.handshake_deadline();
    let span = debug_span!("conn", id = id.0, %addr, ?side);
    let task_node = node.clone();
    let task = async move {
        // The connection holds its place in the node's connection counts until it ends.
        let _slot = slot;
        let node = task_node;
        let (stream, identity) = tokio::select! {
            r = tokio::time::timeout_at(deadline, establish) => match r {
                Ok(Ok(established)) => established,
                Ok(Err(e)) => return fail_early(&node, &link, ready, Error::Io(e)),
                Err(_) => {
                    let e = Error::Connection(ConnectionError::HandshakeTimeout);
                    return fail_early(&node, &link, ready, e);
                }
            },
            () = link.kill.cancelled() => return fail_early(&node, &link, ready, Error::Shutdown),
        };
        let conn = Connection::new(proto, side, started.into_std());
        let driver = Driver {
            conn,
            stream,
            cmds: std::collections::VecDeque::new(),
            link,
            node,
            rbuf: BytesMut::with_capacity(8 << 10),
            out: OutBuf::default(),
            need_flush: false,
            eof: false,
            held: 0,
            sinks: id_map(),
            credits: id_map(),
            inbox_credit: None,
            inbox_batch: std::collections::VecDeque::new(),
            ready,
            closed: None,
            connected: false,
            close_requested: false,
            serving: id_map(),
            slow_since: None,
            slow_cut: false,
            reinject: std::collections::VecDeque::new(),
            identity: identity.map(Arc::new),
            dispatches: 0,
            settled: 0,
            multi_threaded: tokio::runtime::Handle::current().runtime_flavor()
                != tokio::runtime::RuntimeFlavor::CurrentThread,
        };
        driver.run().await;
    };
    node.tracker.spawn(task.instrument(span));
}

/// Ends a connection that failed before its byte stream existed (TCP or TLS trouble).
fn fail_early(
    node: &NodeInner,
    link: &PeerLink,
    ready: Option<oneshot::Sender<Result<PeerId, Error>>>,
    err: Error,
) {
    debug!(error = %err, "connection failed before the handshake");
    node.emit(Event::HandshakeFailed {
        addr: link.info.addr,
        reason: err.to_string(),
    });
    if let Some(ready) = ready {
        let _ = ready.send(Err(err));
    }
    link.sem.close();
    link.done.cancel();
}

struct Driver<S> {
    conn: Connection,
    stream: S,
    /// Written bytes may sit in the transport (TLS) until flushed.
    need_flush: bool,
    /// The peer closed its side; no more reads.
    eof: bool,
    /// Commands taken from the link's queue and not yet carried out.
    cmds: std::collections::VecDeque<Command>,
    link: Arc<PeerLink>,
    node: Arc<NodeInner>,
    rbuf: BytesMut,
    out: OutBuf,
    /// Send-buffer permits taken by queued messages and not yet given back.
    held: usize,
    sinks: IdMap<u32, mpsc::UnboundedSender<Delivery>>,
    credits: IdMap<u32, Arc<CreditReturn>>,
    /// `credits` of channel 0, where every `send` goes: kept at hand for the stream of
    /// messages, instead of a map lookup each.
    inbox_credit: Option<Arc<CreditReturn>>,
    /// Messages for the node's inbox from this round of events, handed over together.
    inbox_batch: Run,
    ready: Option<oneshot::Sender<Result<PeerId, Error>>>,
    closed: Option<ConnectionError>,
    connected: bool,
    close_requested: bool,
    /// Requests from the peer being served here, by request id.
    serving: IdMap<u64, tokio::task::AbortHandle>,
    /// Since when the peer's send buffer has been full.
    slow_since: Option<TokioInstant>,
    /// What the peer's certificate proved, set on its `PeerInfo` at the handshake.
    identity: Option<Arc<PeerIdentity>>,
    /// Messages inflated by `dispatch_events`, to dispatch next.
    reinject: std::collections::VecDeque<slic_proto::IncomingMessage>,
    /// The peer was cut off as a slow consumer.
    slow_cut: bool,
    /// Whether the runtime has other worker threads: on a current-thread runtime, polling
    /// would hold the only thread, and the peer's or the consumer's task could not run.
    multi_threaded: bool,
    /// Counts events handed on (their consumers woken); see `poll_idle`.
    dispatches: u64,
    /// `dispatches` as of the task's last suspension: the consumers of those have had a
    /// chance to run. Fewer than `dispatches` means some may still wait behind this task.
    settled: u64,
}

/// Also when the task panics: senders must learn that nobody takes their messages any more.
impl<S> Drop for Driver<S> {
    fn drop(&mut self) {
        self.close_handles();
    }
}

impl<S> Driver<S> {
    /// Refuses further commands and sends (queued ones are dropped) and wakes senders that
    /// wait for room. Idempotent.
    fn close_handles(&mut self) {
        drop(self.link.cmd.close());
        self.cmds.clear();
        self.link.sem.close();
    }
}

impl<S: Transport> Driver<S> {
    async fn run(mut self) {
        let result = self.drive().await;
        self.close_handles();
        self.node.spin_slot.release(self.link.info.id.0 as usize);
        let reason = match (result, self.closed.take()) {
            _ if self.slow_cut => DisconnectReason::SlowConsumer,
            (Err(e), _) => DisconnectReason::Io(e.to_string()),
            (Ok(()), Some(e)) => DisconnectReason::from_connection_error(e),
            (Ok(()), None) => DisconnectReason::Local,
        };
        self.sinks.clear();
        self.node.forget_channels_of(self.link.info.id);
        // Callers waiting for a response learn that the connection is gone; handlers still
        // running for the peer are stopped, nobody would read their answer.
        lock(&self.link.pending).clear();
        for (_, h) in self.serving.drain() {
            h.abort();
        }
        if self.connected {
            self.node.remove_peer(self.link.info.id);
            self.node.emit(Event::PeerDisconnected {
                peer: self.link.info.clone(),
                reason,
            });
        } else {
            let err = match &reason {
                DisconnectReason::Protocol(e) | DisconnectReason::Remote(e) => {
                    Error::Connection(e.clone())
                }
                DisconnectReason::Io(e) => Error::Io(io::Error::other(e.clone())),
                _ => Error::Shutdown,
            };
            self.node.emit(Event::HandshakeFailed {
                addr: self.link.info.addr,
                reason: err.to_string(),
            });
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(Err(err));
            }
        }
        self.link.done.cancel();
    }

    async fn drive(&mut self) -> io::Result<()> {
        let mut sleep = Box::pin(tokio::time::sleep_until(far_future()));
        let mut armed = None;
        let mut killed = false;
        let mut linger_deadline: Option<TokioInstant> = None;
        // The idle strategy: poll the socket for a while after the last activity.
        let slot = self.link.info.id.0 as usize;
        let max_frame = self.node.proto.frame_size_limit() as usize;
        let mut last_active = Instant::now();
        loop {
            self.dispatch_events();
            self.fill_out();
            // poll_transmit can queue events too: the GOAWAY that ends a drain queues Closed,
            // and an answering CHANNEL_CLOSE completes a channel close. Forward them now, not
            // at the next wake-up, which may never come: a peer need not answer a GOAWAY, and
            // disconnect() would then wait for its full timeout.
            self.dispatch_events();
            self.return_permits();
            if self.closed.is_some() {
                if self.out.is_empty() && !self.need_flush {
                    let _ = tokio::time::timeout(LINGER, self.stream.shutdown()).await;
                    return Ok(());
                }
                linger_deadline.get_or_insert_with(|| TokioInstant::now() + LINGER);
            }
            let slow_cut_at = self.slow_consumer_deadline();
            if slow_cut_at.is_some_and(|t| TokioInstant::now() >= t) {
                debug!("slow consumer: send buffer full too long, disconnecting");
                self.slow_cut = true;
                return Ok(());
            }
            let deadline = [
                self.conn.poll_timeout().map(TokioInstant::from_std),
                linger_deadline,
                slow_cut_at,
            ]
            .into_iter()
            .flatten()
            .min();
            if deadline != armed {
                armed = deadline;
                sleep.as_mut().reset(deadline.unwrap_or_else(far_future));
            }
            if self.poll_idle(last_active, slot) {
                last_active = Instant::now();
                continue;
            }
            // Counts the polls of the select below: a second poll means the task was
            // suspended in between, so the consumers it woke have had their turn.
            let polls = AtomicU32::new(0);
            let before = self.dispatches;
            tokio::select! {
                biased;
                () = std::future::poll_fn(|_| {
                    polls.fetch_add(1, Ordering::Relaxed);
                    Poll::<()>::Pending
                }) => {}
                () = self.link.kill.cancelled(), if !killed => {
                    killed = true;
                    if self.close_requested || self.closed.is_some() {
                        // A graceful close already ran out of time: drop the socket.
                        return Ok(());
                    }
                    self.conn.close(ErrorCode::NoError, "shutdown");
                    linger_deadline = Some(TokioInstant::now() + LINGER);
                }
                progress = std::future::poll_fn(|cx| poll_io(
                    &mut self.stream,
                    &mut self.rbuf,
                    max_frame,
                    &mut self.out,
                    &mut self.need_flush,
                    self.eof,
                    cx,
                )) => {
                    last_active = Instant::now();
                    match progress? {
                        Some(0) => {
                            self.eof = true;
                            self.feed();
                            self.conn.handle_eof();
                        }
                        Some(_) => self.feed(),
                        None => {}
                    }
                }
                () = std::future::poll_fn(|cx| {
                    if self.cmds.is_empty() {
                        self.link.cmd.poll_take(cx, &mut self.cmds)
                    } else {
                        Poll::Ready(())
                    }
                }), if self.closed.is_none() => {
                    last_active = Instant::now();
                    self.run_commands();
                }
                () = &mut sleep, if armed.is_some() => {
                    if linger_deadline.is_some_and(|l| TokioInstant::now() >= l) {
                        return Ok(());
                    }
                    self.conn.handle_timeout(TokioInstant::now().into_std());
                }
            }
            // Suspended in between: what was handed on before it has been seen to.
            if polls.load(Ordering::Relaxed) > 1 {
                self.settled = before;
            }
        }
    }

    /// The idle strategy: with nothing to do, keeps reading the socket directly for a while
    /// instead of parking, so that input arriving soon is taken without waiting for a
    /// sleeping thread (and CPU) to wake. True when input or a command came meanwhile.
    ///
    /// It runs inside this task's poll and holds its worker thread, so it only starts on a
    /// multi-threaded runtime, and when no other task waits on this one: not right after
    /// events were handed on (their consumers may be queued on this very thread), not before
    /// the write buffer is empty, and only on the one connection of the node that holds the
    /// polling slot.
    fn poll_idle(&mut self, last_active: Instant, slot: usize) -> bool {
        let strategy = self.node.settings.idle;
        if strategy == IdleStrategy::PARK {
            return false; // the default: nothing to check, no clock to read
        }
        let eligible = self.multi_threaded
            && self.connected
            && self.closed.is_none()
            && !self.eof
            && self.dispatches == self.settled
            && self.out.is_empty()
            && !self.need_flush
            && strategy.phase(last_active.elapsed()).is_some()
            && self.node.spin_slot.take(slot);
        if !eligible {
            self.node.spin_slot.release(slot);
            return false;
        }
        let mut buf = [0u8; 8 << 10];
        // Bounded by the strategy's budget: every round re-reads the clock.
        while let Some(phase) = strategy.phase(last_active.elapsed()) {
            match self.stream.read_now(&mut buf) {
                None => break,
                Some(Ok(n)) => {
                    self.rbuf.extend_from_slice(&buf[..n]);
                    if n == 0 {
                        self.eof = true;
                        self.feed();
                        self.conn.handle_eof();
                    } else {
                        self.feed();
                    }
                    return true;
                }
                Some(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                // Let the regular read meet and report the error.
                Some(Err(_)) => break,
            }
            if !self.cmds.is_empty() || self.link.cmd.take_all(&mut self.cmds) {
                self.run_commands();
                return true;
            }
            if self.link.kill.is_cancelled() {
                break;
            }
            match phase {
                Phase::Spin => std::hint::spin_loop(),
                Phase::Yield => std::thread::yield_now(),
            }
        }
        self.node.spin_slot.release(slot);
        false
    }

    fn feed(&mut self) {
        let now = TokioInstant::now().into_std();
        if let Err(e) = self.conn.handle_input(now, &mut self.rbuf) {
            debug!(error = %e, "closing connection");
        }
        // Deliver as we go so a large read does not pile up events.
        self.dispatch_events();
    }

    /// Carries out queued commands, at most `COMMAND_BUDGET` before the socket gets its turn.
    fn run_commands(&mut self) {
        for _ in 0..COMMAND_BUDGET {
            let Some(cmd) = self.cmds.pop_front() else {
                break;
            };
            self.command(cmd);
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send(Outgoing {
                peer: _,
                compressed,
                kind,
                channel,
                id,
                codec,
                payload,
                permits,
            }) => {
                self.held += permits;
                let sent = self
                    .conn
                    .send_compressed(kind, channel, id, codec, payload, compressed);
                if let Err(e) = sent {
                    debug!(error = %e, channel, "message dropped");
                }
            }
            Command::Open(label, reply) => {
                let result = self
                    .conn
                    .open_labeled_channel(label)
                    .map(|ch| self.new_channel(ch));
                let _ = reply.send(result.map_err(Error::from));
            }
            Command::CloseChannel(ch) => self.conn.close_channel(ch),
            Command::Respond {
                id,
                codec,
                payload,
                compressed,
                tracked,
            } => {
                // A cancelled request is no longer in `serving`: its answer is not wanted.
                if !tracked || self.serving.remove(&id).is_some() {
                    self.send_response(id, codec, payload, compressed);
                }
            }
            Command::Cancel(id) => self.conn.cancel_request(id),
            Command::Release(ch) => {
                if let Some(c) = self.credits.get(&ch) {
                    let n = c.pending.swap(0, Ordering::AcqRel);
                    self.conn.release(ch, n);
                }
            }
            Command::Close => {
                self.close_requested = true;
                self.conn.close(ErrorCode::NoError, "disconnect");
            }
        }
    }

    fn credit_for(&mut self, channel: u32) -> Arc<CreditReturn> {
        if channel == 0 {
            if let Some(c) = &self.inbox_credit {
                return c.clone();
            }
            let c = self.channel_credit(0);
            self.inbox_credit = Some(c.clone());
            return c;
        }
        self.channel_credit(channel)
    }

    fn channel_credit(&mut self, channel: u32) -> Arc<CreditReturn> {
        let cfg = &self.node.settings;
        let threshold = (cfg.channel_window / 4)
            .min(cfg.connection_window / (4 * (cfg.max_channels.saturating_add(1))))
            .max(1);
        self.credits
            .entry(channel)
            .or_insert_with(|| {
                Arc::new(CreditReturn {
                    channel,
                    pending: AtomicU32::new(0),
                    threshold,
                    cmd: self.link.cmd.clone(),
                })
            })
            .clone()
    }

    fn new_channel(&mut self, id: u32) -> Channel {
        let (tx, rx) = mpsc::unbounded_channel();
        self.sinks.insert(id, tx);
        let credit = self.credit_for(id);
        Channel::new(
            ChannelId(id),
            self.link.clone(),
            self.node.clone(),
            rx,
            credit,
        )
    }

    fn dispatch_events(&mut self) {
        // Inflated messages go through the loop again, before any later event.
        while let Some(ev) = self
            .reinject
            .pop_front()
            .map(ProtoEvent::Message)
            .or_else(|| self.conn.poll_event())
        {
            self.dispatches = self.dispatches.wrapping_add(1);
            // Messages wait in `inbox_batch` only while more plain messages follow: anything
            // else (a response waking its caller, a request, a channel event) sees the
            // messages that arrived before it already delivered.
            let to_inbox = matches!(&ev, ProtoEvent::Message(m)
                if m.kind == Kind::Message && m.channel == 0 && !m.compressed);
            if !to_inbox {
                self.flush_inbox();
            }
            match ev {
                ProtoEvent::Connected(hello) => self.on_connected(&hello),
                ProtoEvent::Message(mut m) if m.compressed => {
                    // Inflate here, bounded by our maximum message size, then handle the
                    // plain message as if it had arrived so.
                    let Some(alg) = self.conn.compression() else {
                        continue; // the core refuses COMPRESSED without negotiation
                    };
                    let max = self.node.proto.message_size_limit() as usize;
                    match compress::decompress(alg, &m.payload, max) {
                        Ok(plain) => {
                            m.payload = plain;
                            m.compressed = false;
                            self.reinject.push_back(m);
                        }
                        Err(e) => {
                            let (code, why) = match e {
                                compress::InflateError::TooLarge => (
                                    ErrorCode::MessageTooLarge,
                                    "compressed message inflates beyond the maximum",
                                ),
                                compress::InflateError::Corrupt => {
                                    (ErrorCode::ProtocolError, "corrupt compressed payload")
                                }
                            };
                            self.conn.abort(code, why);
                        }
                    }
                }
                ProtoEvent::Message(m) if m.kind == Kind::Request => {
                    // The handler owns the body from here; the in-flight limit bounds memory.
                    self.conn.release(m.channel, m.credit);
                    self.on_request(m.id, m.codec, m.payload);
                }
                ProtoEvent::Message(m) if m.kind == Kind::Response => {
                    self.conn.release(m.channel, m.credit);
                    let reply = resource::decode_response(m.payload).map(|b| (m.codec, b));
                    let waiting = lock(&self.link.pending).remove(&m.id);
                    match waiting {
                        Some(tx) => {
                            let _ = tx.send(reply);
                        }
                        // An id never handed out (ids start at 1): the peer answers a request
                        // nobody sent.
                        None if m.id == 0
                            || m.id >= self.link.next_request.load(Ordering::Relaxed) =>
                        {
                            self.conn.abort(
                                ErrorCode::ProtocolError,
                                "response to a request never sent",
                            );
                        }
                        // A known id no longer waited for: cancelled or timed out meanwhile.
                        None => {}
                    }
                }
                ProtoEvent::Cancel { id } => {
                    if let Some(h) = self.serving.remove(&id) {
                        h.abort();
                    }
                }
                ProtoEvent::Message(m) if m.channel == 0 => {
                    // Its sender and credit go with the run: see `flush_inbox`.
                    self.inbox_batch.push_back(Entry {
                        id: MessageId(m.id),
                        codec: m.codec,
                        body: m.payload,
                        credit: m.credit,
                    });
                }
                ProtoEvent::Message(m) => {
                    let msg = Message {
                        from: self.link.info.clone(),
                        id: MessageId(m.id),
                        channel: ChannelId(m.channel),
                        codec: m.codec,
                        body: m.payload,
                    };
                    let delivery = Delivery {
                        msg,
                        credit: self.credit_for(m.channel),
                        amount: m.credit,
                    };
                    let undelivered = match self.sinks.get(&m.channel) {
                        Some(sink) => sink.send(delivery).err().map(|e| e.0),
                        None => Some(delivery),
                    };
                    // Nobody will read it (the channel handle was dropped): free its credit.
                    if let Some(d) = undelivered {
                        d.consume();
                    }
                }
                ProtoEvent::ChannelOpened { channel, label } if label == upload::UPLOAD_LABEL => {
                    let ch = self.new_channel(channel);
                    let node = self.node.clone();
                    self.node.tracker.spawn(async move {
                        upload::serve(ch, |name| node.upload_target(name)).await;
                    });
                }
                ProtoEvent::ChannelOpened { channel, .. } => {
                    let ch = self.new_channel(channel);
                    self.node.emit(Event::ChannelOpened {
                        peer: self.link.info.clone(),
                        channel: ChannelId(channel),
                        initiator: Initiator::Remote,
                    });
                    self.node.offer_channel(ch);
                }
                ProtoEvent::ChannelClosed { channel, initiator } => {
                    self.sinks.remove(&channel);
                    self.credits.remove(&channel);
                    self.node.emit(Event::ChannelClosed {
                        peer: self.link.info.clone(),
                        channel: ChannelId(channel),
                        initiator,
                    });
                }
                ProtoEvent::Closed(e) => {
                    debug!(error = %e, "connection closed");
                    self.closed = Some(e);
                }
                _ => {}
            }
        }
        self.flush_inbox();
    }

    /// Hands the messages gathered for the node's inbox over, with one lock and at most one
    /// wake-up for all of them.
    fn flush_inbox(&mut self) {
        if !self.inbox_batch.is_empty() {
            let credit = self.credit_for(0);
            self.node
                .inbox
                .push_all(&credit, &self.link.info, &mut self.inbox_batch);
        }
    }

    fn respond(&mut self, id: u64, reply: &Reply) {
        let (codec, payload) = resource::encode_response(reply);
        self.send_response(id, codec, payload, false);
    }

    fn send_response(&mut self, id: u64, codec: CodecId, payload: Bytes, compressed: bool) {
        let sent = self
            .conn
            .send_compressed(Kind::Response, 0, id, codec, payload, compressed);
        match sent {
            Ok(()) => {}
            // The caller must not wait for its timeout because the reply cannot travel: tell
            // it why instead (a status has no body, so this one always fits).
            Err(e @ (SendError::MessageTooLarge { .. } | SendError::CodecRefused(_))) => {
                let status = Err(Status::Internal(format!("reply cannot be sent: {e}")));
                let (codec, payload) = resource::encode_response(&status);
                let _ = self.conn.send(Kind::Response, 0, id, codec, payload);
            }
            Err(e) => debug!(error = %e, "response dropped"),
        }
    }

    fn on_request(&mut self, id: u64, codec: CodecId, payload: Bytes) {
        if self.serving.contains_key(&id) {
            return self.respond(id, &Err(Status::BadRequest("duplicate request id".into())));
        }
        if self.serving.len() >= self.node.settings.max_requests_in_flight {
            return self.respond(
                id,
                &Err(Status::Unavailable("too many requests in flight".into())),
            );
        }
        let (name, body) = match resource::decode_request(payload) {
            Ok(parts) => parts,
            Err(status) => return self.respond(id, &Err(status)),
        };
        let Some(handler) = self.node.resources.get(&name) else {
            return self.respond(id, &Err(Status::NotFound(name)));
        };
        let mut handler = handler(self.link.info.clone(), Arc::from(name), codec, body);
        // Most handlers finish at their first poll (nothing of theirs to wait for): answer
        // those here, without a task, a wake-up and a command each. The waker is a no-op:
        // a handler that is not ready is polled again at once by its own task below, which
        // registers that task's waker instead.
        let first = poll_handler(
            &mut handler,
            &mut Context::from_waker(std::task::Waker::noop()),
        );
        if let Poll::Ready(reply) = first {
            let (codec, payload) = resource::encode_response(&reply);
            let (payload, compressed) = self
                .link
                .maybe_compress(payload, &mut CompressMemo::default());
            // The task takes no commands while the handler runs, so empty queues mean nothing
            // was sent to this peer that is still waiting: not before the request (by any
            // task), and not by the handler itself.
            if self.cmds.is_empty() && self.link.cmd.is_empty() {
                return self.send_response(id, codec, payload, compressed);
            }
            // Commands wait for this connection: the reply goes behind them, so the peer sees
            // what was sent first.
            let _ = self.link.cmd.send(Command::Respond {
                id,
                codec,
                payload,
                compressed,
                tracked: false,
            });
            return;
        }
        // The rest run in a task of their own, which a CANCEL aborts.
        let link = self.link.clone();
        let work = self.node.tracker.spawn(async move {
            let reply = std::future::poll_fn(move |cx| poll_handler(&mut handler, cx)).await;
            // Encode and compress here, in the handler's task, not the connection's.
            let (codec, payload) = resource::encode_response(&reply);
            let (payload, compressed) = link.maybe_compress(payload, &mut CompressMemo::default());
            let _ = link.cmd.send(Command::Respond {
                id,
                codec,
                payload,
                compressed,
                tracked: true,
            });
        });
        self.serving.insert(id, work.abort_handle());
    }

    fn on_connected(&mut self, hello: &slic_proto::Hello) {
        let mut info = self.link.info.clone();
        info.name = Arc::from(hello.name.as_str());
        info.identity = self.identity.clone();
        // The link was created before the name was known; rebuild it with the name. Handles
        // cloned before this point do not exist: nothing saw the link yet.
        let link = Arc::new(PeerLink {
            info: info.clone(),
            cmd: self.link.cmd.clone(),
            sem: self.link.sem.clone(),
            buffer_cap: self.link.buffer_cap,
            codecs: hello.codecs,
            max_message: hello.max_message_size,
            compression: self.conn.compression(),
            compression_threshold: self.link.compression_threshold,
            done: self.link.done.clone(),
            kill: self.link.kill.clone(),
            pending: self.link.pending.clone(),
            next_request: self.link.next_request.clone(),
        });
        self.link = link.clone();
        self.connected = true;
        self.node.add_peer(link);
        self.node.emit(Event::PeerConnected(info.clone()));
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(info.id));
        }
    }

    fn return_permits(&mut self) {
        let queued = self.conn.queued_bytes();
        if self.held > queued {
            let n = self.held - queued;
            self.held = queued;
            self.link.sem.add_permits(n);
        }
    }

    /// When the peer is to be cut off as a slow consumer: its send buffer has stayed (nearly)
    /// full since `slow_since`. Tracks the start of the full spell as a side effect.
    fn slow_consumer_deadline(&mut self) -> Option<TokioInstant> {
        let limit = self.node.settings.slow_consumer_timeout?;
        // "Full": 90% of buffer_cap waits to be sent. A sender needing the last few bytes
        // is as stuck as one needing all of them.
        let full = self.connected
            && self.closed.is_none()
            && self.held.saturating_mul(10) >= self.link.buffer_cap.saturating_mul(9);
        if !full {
            self.slow_since = None;
            return None;
        }
        let since = *self.slow_since.get_or_insert_with(TokioInstant::now);
        Some(since + limit)
    }

    /// Moves ready frames out of the core into the write buffer, up to its high-water mark.
    fn fill_out(&mut self) {
        let now = TokioInstant::now().into_std();
        while self.out.len() < OUT_HIGH_WATER {
            match self.conn.poll_transmit(now) {
                Some(t) => self.out.push(t),
                None => break,
            }
        }
    }
}

/// Writes what is buffered (vectored), flushes the transport once the buffer is empty, and
/// reads what has arrived. Ready with `Some(n)` after a read of `n` bytes (0: end of stream),
/// `None` after write progress only; pending while neither can move.
fn poll_io<S: Transport>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    max_frame: usize,
    out: &mut OutBuf,
    need_flush: &mut bool,
    eof: bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<usize>>> {
    let mut wrote = false;
    // Bounded: each round writes at least one byte of a finite buffer, or stops.
    while !out.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = out.slices(&mut slices);
        match Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(w)) => {
                out.advance(w);
                wrote = true;
                *need_flush = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => break,
        }
    }
    if out.is_empty() && *need_flush {
        match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => *need_flush = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    if !eof {
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(frame_rest(rbuf, max_frame).max(READ_CHUNK));
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, rbuf) {
            Poll::Ready(Ok(n)) => return Poll::Ready(Ok(Some(n))),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    if wrote {
        Poll::Ready(Ok(None))
    } else {
        Poll::Pending
    }
}

/// Polls a request handler, catching a panic in it: a panicked handler answers `Internal`
/// and is never polled again (its poll returned `Ready`).
fn poll_handler(handler: &mut resource::BoxReply, cx: &mut Context<'_>) -> Poll<Reply> {
    let poll = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.as_mut().poll(cx)));
    poll.unwrap_or_else(|_| Poll::Ready(Err(Status::Internal("handler panicked".into()))))
}

/// Room for the rest of a large frame whose first `READ_CHUNK` bytes already arrived, so it
/// lands in one buffer instead of being moved each time the buffer grows. A peer earns the
/// room by sending: a header alone reserves nothing, and never more than the largest frame
/// this side accepts (the header is checked only later, by the decoder).
fn frame_rest(rbuf: &BytesMut, max_frame: usize) -> usize {
    if rbuf.len() < READ_CHUNK {
        return 0;
    }
    let len = u32::from_be_bytes([rbuf[16], rbuf[17], rbuf[18], rbuf[19]]) as usize;
    let whole = HEADER_LEN + len.min(max_frame) + slic_proto::frame::CHECKSUM_LEN;
    whole.saturating_sub(rbuf.len())
}

fn far_future() -> TokioInstant {
    TokioInstant::now() + Duration::from_secs(86_400 * 365)
}

/// Frames waiting for the socket, as a list of buffers ready for one vectored write.
#[derive(Default)]
struct OutBuf {
    segs: std::collections::VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl OutBuf {
    fn push(&mut self, t: Transmit) {
        self.len += t.len();
        self.tail.extend_from_slice(&t.header);
        if t.payload.len() <= COPY_THRESHOLD {
            self.tail.extend_from_slice(&t.payload);
        } else {
            self.segs.push_back(self.tail.split().freeze());
            self.segs.push_back(t.payload);
        }
        if let Some(trailer) = t.trailer {
            self.tail.extend_from_slice(&trailer);
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slices<'a>(&'a mut self, out: &mut [IoSlice<'a>; MAX_IOVECS]) -> usize {
        if !self.tail.is_empty() {
            self.segs.push_back(self.tail.split().freeze());
        }
        let mut n = 0;
        for seg in self.segs.iter().filter(|s| !s.is_empty()).take(MAX_IOVECS) {
            out[n] = IoSlice::new(seg);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut written: usize) {
        self.len -= written;
        while written > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            if front.len() <= written {
                written -= front.len();
                self.segs.pop_front();
            } else {
                let _ = front.split_to(written);
                written = 0;
            }
        }
        while self.segs.front().is_some_and(Bytes::is_empty) {
            self.segs.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer_with_frame_of(len: u32, arrived: usize) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&len.to_be_bytes());
        b.resize(arrived, 7);
        b
    }

    #[test]
    fn room_for_the_rest_of_a_frame_is_earned_by_sending_and_capped() {
        let max = 256 << 10;
        // A header alone, or a frame's first bytes, reserve nothing beyond the usual chunk.
        assert_eq!(frame_rest(&buffer_with_frame_of(200_000, 20), max), 0);
        assert_eq!(
            frame_rest(&buffer_with_frame_of(200_000, READ_CHUNK - 1), max),
            0
        );
        // Once a chunk of it is here: the rest of the frame (and its checksum trailer).
        let b = buffer_with_frame_of(200_000, READ_CHUNK);
        assert_eq!(frame_rest(&b, max), HEADER_LEN + 200_000 + 4 - READ_CHUNK);
        // A header that claims more than this side accepts gets no more than that.
        let b = buffer_with_frame_of(u32::MAX, READ_CHUNK);
        assert_eq!(frame_rest(&b, max), HEADER_LEN + max + 4 - READ_CHUNK);
        // A frame already complete needs nothing.
        assert_eq!(frame_rest(&buffer_with_frame_of(100, READ_CHUNK), max), 0);
    }

    #[test]
    fn a_payload_is_compressed_once_per_algorithm_however_many_peers() {
        let data = b"abc".repeat(10_000);
        let mut memo = CompressMemo::default();
        let a = memo.compress(Compression::Lz4, &data).unwrap();
        let b = memo.compress(Compression::Lz4, &data).unwrap();
        // The same buffer, not a second compression.
        assert_eq!(a.as_ptr(), b.as_ptr());
        let z = memo.compress(Compression::Zstd, &data).unwrap();
        assert_ne!(z.as_ptr(), a.as_ptr());
        assert_eq!(memo.0.len(), 2);
    }
}
