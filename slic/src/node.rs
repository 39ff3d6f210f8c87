//! [`Node`]: one object that listens, connects to many peers, sends and receives.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use slic_proto::{CodecId, Compression, ConnectionError, Initiator, Kind, Side};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span};

use crate::channel::Channel;
use crate::codec::{self, Codec};
use crate::driver::{self, Command, CompressMemo, PeerLink, TrySubmitError};
use crate::error::Error;
use crate::idle::{IdleStrategy, SpinSlot};
use crate::inbox::Inbox;
use crate::resource::{self, Registry, Request, Status};
use crate::tls::{self, PeerIdentity, Scheme, TlsConfig, ToEndpoint};
use crate::upload::{self, StoredFile, UploadOptions, UploadRequest, UploadTarget};

/// Identifies one connection of a node. Ids are never reused within a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Identifies a message sent by a node; unique per sending node. A message sent to several
/// peers has one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

/// A channel id on one connection; channel 0 is the connection's default channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u32);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who a peer is: its id on this node, the name it announced, and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The connection's id on this node.
    pub id: PeerId,
    /// The name the peer announced in its handshake.
    pub name: Arc<str>,
    /// The peer's socket address.
    pub addr: SocketAddr,
    /// What the peer's TLS certificate proves (`None` over plain TCP, or when a TLS client
    /// presented no certificate).
    pub identity: Option<Arc<PeerIdentity>>,
}

/// Where [`Node::send`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// Every connected peer.
    All,
    /// One peer.
    Peer(PeerId),
    /// Some peers.
    Peers(Vec<PeerId>),
}

/// A message received from a peer.
#[derive(Clone, Debug)]
pub struct Message {
    /// Who sent it.
    pub from: PeerInfo,
    /// The sender's id for it.
    pub id: MessageId,
    /// The channel it arrived on (0 for [`Node::send`]).
    pub channel: ChannelId,
    /// The codec the sender encoded it with.
    pub codec: CodecId,
    /// The encoded body, shared with the receive buffer.
    pub body: Bytes,
}

impl Message {
    /// Decodes the body with the codec the sender used.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the body is not a `T`, or was sent as raw bytes.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        codec::decode(self.codec, &self.body)
    }

    /// The raw body bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// Why a peer's connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// This node closed it (disconnect or shutdown).
    Local,
    /// The peer closed it (GOAWAY, ERROR or end of stream).
    Remote(ConnectionError),
    /// The peer broke the protocol or went silent.
    Protocol(ConnectionError),
    /// The peer kept its send buffer full for longer than `slow_consumer_timeout`.
    SlowConsumer,
    /// The socket failed.
    Io(String),
}

impl DisconnectReason {
    pub(crate) fn from_connection_error(e: ConnectionError) -> Self {
        match e.initiator() {
            Initiator::Local => Self::Local,
            Initiator::Remote => Self::Remote(e),
            Initiator::Protocol => Self::Protocol(e),
        }
    }
}

/// Something that happened to a node's connections.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A peer completed its handshake.
    PeerConnected(PeerInfo),
    /// A peer's connection ended.
    PeerDisconnected {
        /// The peer.
        peer: PeerInfo,
        /// Why.
        reason: DisconnectReason,
    },
    /// A channel was opened by the peer.
    ChannelOpened {
        /// The peer.
        peer: PeerInfo,
        /// The channel.
        channel: ChannelId,
        /// Who opened it.
        initiator: Initiator,
    },
    /// A channel is closed on both sides.
    ChannelClosed {
        /// The peer.
        peer: PeerInfo,
        /// The channel.
        channel: ChannelId,
        /// Who closed it.
        initiator: Initiator,
    },
    /// An incoming or outgoing connection failed before its handshake completed.
    HandshakeFailed {
        /// The remote address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// This subscriber fell behind and missed this many events.
    Lagged(u64),
}

/// When a node asks for frame checksums; see [`NodeBuilder::frame_checksum`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameChecksum {
    /// Never: rely on TCP's own checksum (weak: 16 bits, and blind to bugs in middleboxes).
    Never,
    /// On plain TCP connections that cross a network; not on loopback ones (127.0.0.0/8,
    /// `::1`), whose bytes the kernel copies from memory to memory and no wire or middlebox
    /// touches, and not on TLS ones. The default.
    ///
    /// A server accepting a loopback connection follows the client: it asks for checksums
    /// when the client does. So a server behind a local TCP forwarder (socat, a port
    /// forward), which sees every peer as 127.0.0.1, still gets checksums from remote clients
    /// that ask for them. A *client* that reaches the network through a local proxy or tunnel
    /// sees a loopback address too and does not ask: it wants
    /// [`PlainOnly`](Self::PlainOnly) or [`Always`](Self::Always).
    #[default]
    Network,
    /// On plain TCP connections, loopback ones included; not on TLS ones.
    PlainOnly,
    /// On every connection.
    Always,
}

/// Node settings that live outside the protocol core.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) codec: Codec,
    pub(crate) buffer_cap: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) channel_window: u32,
    pub(crate) connection_window: u32,
    pub(crate) max_channels: u32,
    pub(crate) request_timeout: Duration,
    pub(crate) max_requests_in_flight: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_pending_channels: usize,
    pub(crate) slow_consumer_timeout: Option<Duration>,
    pub(crate) compression_threshold: usize,
    pub(crate) idle: IdleStrategy,
}

/// Builds a [`Node`]. Every setting has a default; see each setter.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use slic::{Codec, Node};
///
/// let node = Node::builder()
///     .name("hub")
///     .codec(Codec::Json)
///     .buffer_cap(1 << 20)
///     .heartbeat(Duration::from_secs(5))
///     .build()?;
/// assert_eq!(node.name(), "hub");
/// # Ok::<(), slic::Error>(())
/// ```
#[derive(Debug)]
pub struct NodeBuilder {
    proto: slic_proto::Config,
    checksum: FrameChecksum,
    settings: Settings,
    tls: Option<TlsConfig>,
    error: Option<Error>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        let proto = slic_proto::Config::default();
        Self {
            settings: Settings {
                codec: Codec::default(),
                buffer_cap: DEFAULT_BUFFER_CAP,
                connect_timeout: Duration::from_secs(10),
                channel_window: 1 << 20,
                connection_window: 4 << 20,
                max_channels: 256,
                request_timeout: Duration::from_secs(30),
                max_requests_in_flight: 1024,
                max_connections: 10_000,
                max_connections_per_ip: 256,
                max_pending_channels: 1024,
                slow_consumer_timeout: Some(Duration::from_secs(30)),
                compression_threshold: 512,
                idle: IdleStrategy::default(),
            },
            proto,
            checksum: FrameChecksum::default(),
            tls: None,
            error: None,
        }
    }
}

/// Default `buffer_cap`: 4 MiB of queued messages per peer.
const DEFAULT_BUFFER_CAP: usize = 4 << 20;

impl NodeBuilder {
    fn record(&mut self, r: Result<(), slic_proto::ConfigError>) {
        if let Err(e) = r
            && self.error.is_none()
        {
            self.error = Some(Error::Config(e.to_string()));
        }
    }

    /// The name this node announces in handshakes: 1 to 255 bytes of UTF-8. Default: `slic-`
    /// followed by the process id.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let r = self.proto.name(name).map(drop);
        self.record(r);
        self
    }

    /// The codec this node serializes with. Default [`Codec::Postcard`]. Receiving works with
    /// every codec whatever this is.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.settings.codec = codec;
        self
    }

    /// Largest frame accepted from a peer, 1 KiB ..= 16 MiB. Default 256 KiB. Larger messages
    /// travel as several frames.
    pub fn max_frame_size(mut self, bytes: u32) -> Self {
        let r = self.proto.max_frame_size(bytes).map(drop);
        self.record(r);
        self
    }

    /// Largest message accepted from a peer, at least 1 KiB. Default 16 MiB.
    pub fn max_message_size(mut self, bytes: u32) -> Self {
        let r = self.proto.max_message_size(bytes).map(drop);
        self.record(r);
        self
    }

    /// Bytes of messages that may wait to be sent to one peer. Default 4 MiB. When it is
    /// reached, [`Node::send`] waits and [`Node::try_send`] fails with [`Error::Full`]; this is
    /// what bounds memory when a peer reads slower than this node writes.
    pub fn buffer_cap(mut self, bytes: usize) -> Self {
        if bytes < 64 || bytes > u32::MAX as usize {
            self.error
                .get_or_insert_with(|| Error::Config("buffer_cap must be 64 ..= 4 GiB".into()));
        }
        self.settings.buffer_cap = bytes;
        self
    }

    /// How long [`Node::connect`] waits for the TCP connection and the handshake. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.settings.connect_timeout = timeout;
        self
    }

    /// Keepalive interval: a PING after this long without sending, and a peer silent for three
    /// intervals is disconnected. Default 10 s; zero turns it off on this side.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        let r = self.proto.heartbeat(interval).map(drop);
        self.record(r);
        self
    }

    /// Deadline for a peer's handshake, from accept or connect. Default 10 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.proto.handshake_timeout(timeout);
        self
    }

    /// Flow-control credit granted to a peer per channel. Default 1 MiB.
    pub fn channel_window(mut self, bytes: u32) -> Self {
        let r = self.proto.channel_window(bytes).map(drop);
        self.record(r);
        self.settings.channel_window = bytes;
        self
    }

    /// Flow-control credit granted to a peer for a whole connection. Default 4 MiB. Bounds the
    /// received but unread messages one peer can make this node hold.
    pub fn connection_window(mut self, bytes: u32) -> Self {
        let r = self.proto.connection_window(bytes).map(drop);
        self.record(r);
        self.settings.connection_window = bytes;
        self
    }

    /// Most channels a peer may keep open on one connection. Default 256.
    pub fn max_channels(mut self, n: u32) -> Self {
        self.proto.max_channels(n);
        self.settings.max_channels = n;
        self
    }

    /// Budget for cheap control frames from a peer (PING, PONG, CHANNEL_OPEN, CHANNEL_CLOSE,
    /// CANCEL), per connection: a token bucket of `burst` frames refilled at `per_second`.
    /// Default 2,000 and 1,000/s. A peer that exceeds it is sent GOAWAY with
    /// ENHANCE_YOUR_CALM and disconnected.
    ///
    /// # DoS mitigation
    ///
    /// Each of these frames costs the peer 20 bytes and this node real work (a PONG, a
    /// channel's state, a handler to abort); the budget stops a peer from keeping a core busy.
    pub fn control_budget(mut self, burst: u32, per_second: u32) -> Self {
        self.proto.control_budget(burst, per_second);
        self
    }

    /// How long [`Node::get_resource`] waits for a reply before it cancels the request and
    /// fails with [`Status::Timeout`]. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.request_timeout = timeout;
        self
    }

    /// Most requests from one peer served at once. Default 1024; further requests are
    /// answered [`Status::Unavailable`] at once.
    ///
    /// # DoS mitigation
    ///
    /// A request's body is held, and its handler runs, until it answers: this bounds both.
    pub fn max_requests_in_flight(mut self, n: usize) -> Self {
        self.settings.max_requests_in_flight = n;
        self
    }

    /// Most connections this node accepts at once, over all its listeners. Default 10,000;
    /// connections past it are closed at accept.
    ///
    /// # DoS mitigation
    ///
    /// Each connection costs a task, buffers and a descriptor; this bounds them.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.settings.max_connections = n;
        self
    }

    /// Most connections accepted at once from one IP address. Default 256; connections past
    /// it are closed at accept, so one host cannot take every slot of `max_connections`.
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.settings.max_connections_per_ip = n;
        self
    }

    /// Most channels opened by peers and not yet taken with [`Node::accept_channel`], over
    /// all connections. Default 1024; further channels are closed at once (the opener sees
    /// them closed). A connection that ends takes its unaccepted channels with it.
    ///
    /// # DoS mitigation
    ///
    /// A node that never accepts channels would otherwise keep every channel (and what it
    /// buffered) of every peer that opened some.
    pub fn max_pending_channels(mut self, n: usize) -> Self {
        self.settings.max_pending_channels = n;
        self
    }

    /// How long a peer may keep its send buffer (`buffer_cap`) full before it is
    /// disconnected as a slow consumer. Default 30 s.
    ///
    /// # DoS mitigation
    ///
    /// A peer that stops reading would otherwise hold `buffer_cap` bytes and stall every
    /// `send` to [`Target::All`] forever; with the cut-off, the other peers keep receiving.
    /// `None` turns the cut-off off: then a reader that never reads blocks senders forever.
    /// Keep it well above the time a healthy reader needs to consume half its
    /// `channel_window` (credit returns in such steps), or busy readers get cut too.
    pub fn slow_consumer_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.settings.slow_consumer_timeout = timeout;
        self
    }

    /// TLS 1.3 settings: an identity to listen on `tls://` addresses (and to present as a
    /// client certificate), the roots to trust when connecting to `tls://` addresses, and
    /// whether clients must present certificates. Plain and TLS listeners can coexist on one
    /// node. See [`TlsConfig`].
    pub fn tls(mut self, config: TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// When to ask for a CRC-32 trailer on every frame, so that a frame damaged in transit
    /// is a CORRUPT_FRAME error rather than wrong data delivered. Used when both sides ask.
    /// Default [`FrameChecksum::Network`]: on plain TCP to and from other hosts; not on
    /// loopback (nothing there can damage a byte, and the CRC costs about a tenth of the
    /// CPU a small message takes on each side) unless this node is the server and the
    /// client asks, and not on TLS (whose records are already authenticated).
    ///
    /// ```
    /// use slic::{FrameChecksum, Node};
    /// // Checksums on loopback too, e.g. for a client that reaches its server through a
    /// // local tunnel.
    /// let node = Node::builder().frame_checksum(FrameChecksum::PlainOnly).build()?;
    /// # Ok::<(), slic::Error>(())
    /// ```
    pub fn frame_checksum(mut self, when: FrameChecksum) -> Self {
        self.checksum = when;
        self
    }

    /// Compression algorithms to negotiate, most preferred first. Default: none. The side
    /// that accepts picks its most preferred algorithm that the connecting side offered; with
    /// none in common, nothing is compressed. Messages are decompressed within
    /// `max_message_size`: a payload that would inflate beyond it is a protocol error at the
    /// cap, never a large allocation.
    ///
    /// ```
    /// use slic::{Compression, Node};
    /// let node = Node::builder()
    ///     .compression(&[Compression::Lz4, Compression::Zstd])
    ///     .compression_threshold(1024)
    ///     .build()?;
    /// # Ok::<(), slic::Error>(())
    /// ```
    pub fn compression(mut self, algorithms: &[Compression]) -> Self {
        let r = self.proto.compression(algorithms).map(drop);
        self.record(r);
        self
    }

    /// Messages smaller than this many bytes are sent uncompressed. Default 512. A message
    /// that does not shrink (already compressed, random) is also sent as it is.
    pub fn compression_threshold(mut self, bytes: usize) -> Self {
        self.settings.compression_threshold = bytes;
        self
    }

    /// How long the node keeps polling for input after its last message before it lets
    /// its thread sleep (default: [`IdleStrategy::PARK`], no polling). Polling answers a
    /// message that comes soon without waiting for a sleeping CPU to wake, which on virtual
    /// machines takes tens of microseconds; it costs the CPU time spent polling, and pays
    /// only where a core is free for it (see [`IdleStrategy`]).
    pub fn idle_strategy(mut self, strategy: IdleStrategy) -> Self {
        self.settings.idle = strategy;
        self
    }

    /// Builds the node. No socket is opened until [`Node::listen`] or [`Node::connect`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for the first setting that was out of bounds.
    pub fn build(mut self) -> Result<Node, Error> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.proto.node_name() == "slic" {
            let name = format!("slic-{}", std::process::id());
            let r = self.proto.name(name).map(drop);
            self.record(r);
        }
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let inner = Arc::new(NodeInner {
            proto_tls: {
                let mut c = self.proto.clone();
                c.checksum(self.checksum == FrameChecksum::Always);
                Arc::new(c)
            },
            proto_loopback: {
                let mut c = self.proto.clone();
                c.checksum(matches!(
                    self.checksum,
                    FrameChecksum::PlainOnly | FrameChecksum::Always
                ));
                // A server behind a local forwarder sees loopback peers whose bytes crossed a
                // network: there the client, which sees the real address, decides.
                c.checksum_if_asked(self.checksum == FrameChecksum::Network);
                Arc::new(c)
            },
            proto: {
                let mut c = self.proto;
                c.checksum(self.checksum != FrameChecksum::Never);
                Arc::new(c)
            },
            settings: self.settings,
            peers: Mutex::new(slic_proto::id_map()),
            inbox: Inbox::default(),
            pending_channels: Mutex::new(std::collections::VecDeque::new()),
            pending_notify: tokio::sync::Notify::new(),
            events,
            next_peer: AtomicU64::new(1),
            next_message: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            shut: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            resources: Registry::default(),
            uploads: RwLock::new(HashMap::new()),
            tls: self.tls,
            connections: Mutex::new(ConnectionCount::default()),
            spin_slot: SpinSlot::default(),
        });
        Ok(Node {
            owner: Arc::new(Owner { inner }),
        })
    }
}

/// Events kept for a slow subscriber before it sees [`Event::Lagged`].
const EVENT_CAPACITY: usize = 1024;

pub(crate) struct NodeInner {
    /// Protocol settings for plain TCP connections.
    pub(crate) proto: Arc<slic_proto::Config>,
    /// The same for TLS connections (which differ in the frame checksum only).
    pub(crate) proto_tls: Arc<slic_proto::Config>,
    /// The same for plain TCP connections over loopback (frame checksum only).
    proto_loopback: Arc<slic_proto::Config>,
    pub(crate) settings: Settings,
    peers: Mutex<slic_proto::IdMap<PeerId, Arc<PeerLink>>>,
    /// Messages received on channel 0 of every connection.
    pub(crate) inbox: Inbox,
    /// Channels opened by peers and not yet accepted, oldest first.
    pending_channels: Mutex<std::collections::VecDeque<Channel>>,
    pending_notify: tokio::sync::Notify,
    events: broadcast::Sender<Event>,
    next_peer: AtomicU64,
    next_message: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: a check for the receive path that costs one
    /// load, where the token's own check takes its lock.
    shut: AtomicBool,
    pub(crate) tracker: TaskTracker,
    pub(crate) resources: Registry,
    uploads: RwLock<HashMap<String, Arc<UploadTarget>>>,
    tls: Option<TlsConfig>,
    connections: Mutex<ConnectionCount>,
    /// The one connection allowed to poll its socket while idle.
    pub(crate) spin_slot: SpinSlot,
}

/// Accepted connections, in total and per IP address.
#[derive(Debug, Default)]
struct ConnectionCount {
    total: usize,
    per_ip: HashMap<std::net::IpAddr, usize>,
}

/// Holds one accepted connection's place in the counts; gives it back when dropped.
pub(crate) struct ConnectionSlot {
    node: Arc<NodeInner>,
    ip: std::net::IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self
            .node
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl fmt::Debug for NodeInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.proto.node_name())
            .finish_non_exhaustive()
    }
}

impl NodeInner {
    pub(crate) fn next_peer_id(&self) -> PeerId {
        PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn next_message_id(&self) -> MessageId {
        MessageId(self.next_message.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn add_peer(&self, link: Arc<PeerLink>) {
        self.peers_lock().insert(link.info.id, link);
    }

    pub(crate) fn remove_peer(&self, id: PeerId) {
        self.peers_lock().remove(&id);
    }

    /// Takes a place for an accepted connection from `ip`, or `None` past the limits.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<ConnectionSlot> {
        let mut c = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.settings.max_connections
            || per_ip >= self.settings.max_connections_per_ip
        {
            return None;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Some(ConnectionSlot {
            node: self.clone(),
            ip,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Channel>> {
        // Held only to push, pop or filter; a poisoned queue is still a valid queue.
        self.pending_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a channel a peer opened for [`Node::accept_channel`]; past
    /// `max_pending_channels` the channel is dropped, which closes it (the opener sees it
    /// closed), so a node that never accepts holds a bounded number.
    pub(crate) fn offer_channel(&self, ch: Channel) {
        let mut q = self.pending();
        if q.len() >= self.settings.max_pending_channels {
            drop(q);
            debug!(peer = %ch.peer().id, channel = %ch.id(), "accept queue full: closing channel");
            return;
        }
        q.push_back(ch);
        drop(q);
        self.pending_notify.notify_one();
    }

    /// Forgets the unaccepted channels of a connection that ended, with what they buffered.
    pub(crate) fn forget_channels_of(&self, peer: PeerId) {
        let gone: std::collections::VecDeque<Channel> = {
            let mut q = self.pending();
            let (gone, keep) = q.drain(..).partition(|c| c.peer().id == peer);
            *q = keep;
            gone
        };
        // Dropped outside the lock: a channel's drop sends its close command.
        drop(gone);
    }

    pub(crate) fn upload_target(&self, name: &str) -> Option<Arc<UploadTarget>> {
        self.uploads
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn only_peer(&self) -> Result<PeerId, Error> {
        let peers = self.peers_lock();
        let mut ids = peers.keys();
        match (ids.next(), ids.next()) {
            (Some(id), None) => Ok(*id),
            (None, _) => Err(Error::NoPeers),
            (Some(_), Some(_)) => Err(Error::AmbiguousPeer),
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        // No subscriber is fine: events are optional to observe.
        let _ = self.events.send(event);
    }

    fn peers_lock(&self) -> std::sync::MutexGuard<'_, slic_proto::IdMap<PeerId, Arc<PeerLink>>> {
        // The lock is never held across an await or user code, so poisoning can only follow a
        // panic inside this module's short critical sections; the map is still consistent.
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The protocol settings for a plain TCP connection with the peer at `peer`.
    fn plain_proto(&self, peer: SocketAddr) -> Arc<slic_proto::Config> {
        if peer.ip().to_canonical().is_loopback() {
            self.proto_loopback.clone()
        } else {
            self.proto.clone()
        }
    }

    fn link(&self, id: PeerId) -> Result<Arc<PeerLink>, Error> {
        self.peers_lock()
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownPeer(id))
    }

    fn targets(&self, target: &Target) -> Result<Vec<Arc<PeerLink>>, Error> {
        let peers = self.peers_lock();
        let links: Vec<_> = match target {
            Target::All => {
                let mut all: Vec<_> = peers.values().cloned().collect();
                all.sort_by_key(|l| l.info.id);
                all
            }
            Target::Peer(id) => vec![peers.get(id).cloned().ok_or(Error::UnknownPeer(*id))?],
            Target::Peers(ids) => ids
                .iter()
                .map(|id| peers.get(id).cloned().ok_or(Error::UnknownPeer(*id)))
                .collect::<Result<_, _>>()?,
        };
        if links.is_empty() {
            return Err(Error::NoPeers);
        }
        Ok(links)
    }

    /// Cancels every task of the node (the flag first, for `receive`'s fast path).
    fn shut_down(&self) {
        self.shut.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    pub(crate) async fn receive(&self) -> Result<Message, Error> {
        if self.shut.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        // Fast path, for a receiver that keeps up with a stream: no wait list, no shutdown
        // listener.
        if let Some(m) = self.inbox.try_pop() {
            return Ok(m);
        }
        self.inbox.pop(&self.shutdown).await.ok_or(Error::Shutdown)
    }
}

/// Cancels the node's tasks when the last [`Node`] handle is dropped.
struct Owner {
    inner: Arc<NodeInner>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.inner.shut_down();
    }
}

/// A slic node: listens on any number of addresses, connects to any number of peers, sends to
/// all, one or some of them, and receives from all of them.
///
/// Cloning is cheap and every clone is the same node. Dropping the last clone stops the
/// node's tasks; [`shutdown`](Self::shutdown) does so and waits for them.
///
/// # Examples
///
/// ```
/// use slic::{Node, Target};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), slic::Error> {
/// let server = Node::builder().name("hub").build()?;
/// let addr = server.listen("127.0.0.1:0").await?;
///
/// let client = Node::builder().name("pc2").build()?;
/// client.connect(addr).await?;
/// client.send(Target::All, &"hello").await?;
///
/// let msg = server.receive().await?;
/// assert_eq!(msg.decode::<String>()?, "hello");
/// assert_eq!(&*msg.from.name, "pc2");
/// server.send(Target::Peer(msg.from.id), &42u32).await?;
/// assert_eq!(client.receive().await?.decode::<u32>()?, 42);
/// # client.shutdown().await; server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    owner: Arc<Owner>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner().fmt(f)
    }
}

impl Node {
    /// A builder with default settings.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    fn inner(&self) -> &Arc<NodeInner> {
        &self.owner.inner
    }

    /// The name this node announces.
    pub fn name(&self) -> &str {
        self.inner().proto.node_name()
    }

    /// The codec this node sends with.
    pub fn codec(&self) -> Codec {
        self.inner().settings.codec
    }

    /// Listens on `addr` and returns the bound address (with port 0 the OS picks one). A node
    /// may listen on several addresses; each accepted connection becomes a peer once its
    /// handshake completes ([`Event::PeerConnected`]).
    ///
    /// # Errors
    ///
    /// The address does not resolve or cannot be bound, or the node is shut down.
    pub async fn listen(&self, addr: impl ToEndpoint) -> Result<SocketAddr, Error> {
        let inner = self.inner();
        if inner.shutdown.is_cancelled() {
            return Err(Error::Shutdown);
        }
        let endpoint = addr.to_endpoint()?;
        let acceptor = match endpoint.scheme {
            Scheme::Tcp => None,
            Scheme::Tls => {
                let server = inner
                    .tls
                    .as_ref()
                    .and_then(|t| t.server.clone())
                    .ok_or_else(|| {
                        Error::Config(
                            "a tls:// listener needs Node::builder().tls(..) with an identity"
                                .into(),
                        )
                    })?;
                Some(tokio_rustls::TlsAcceptor::from(server))
            }
        };
        let listener = TcpListener::bind(endpoint.resolve().await?.as_slice()).await?;
        let local = listener.local_addr()?;
        let node = inner.clone();
        let span = debug_span!("listen", %local);
        inner
            .tracker
            .spawn(accept_loop(node, listener, acceptor).instrument(span));
        Ok(local)
    }

    /// Connects to a listening node and completes the handshake. Returns the new peer's id.
    ///
    /// # Errors
    ///
    /// The connection is refused, the handshake fails, or `connect_timeout` passes.
    pub async fn connect(&self, addr: impl ToEndpoint) -> Result<PeerId, Error> {
        let inner = self.inner();
        if inner.shutdown.is_cancelled() {
            return Err(Error::Shutdown);
        }
        let endpoint = addr.to_endpoint()?;
        let tls = match endpoint.scheme {
            Scheme::Tcp => None,
            Scheme::Tls => {
                let client = inner
                    .tls
                    .as_ref()
                    .map(|t| t.client.clone())
                    .ok_or_else(|| {
                        Error::Config("a tls:// address needs Node::builder().tls(..)".into())
                    })?;
                Some((
                    tokio_rustls::TlsConnector::from(client),
                    endpoint.server_name()?,
                ))
            }
        };
        let timeout = inner.settings.connect_timeout;
        let work = async {
            let stream = TcpStream::connect(endpoint.resolve().await?.as_slice()).await?;
            stream.set_nodelay(true)?;
            let peer_addr = stream.peer_addr()?;
            let (tx, rx) = oneshot::channel();
            match tls {
                None => driver::spawn(
                    inner.clone(),
                    std::future::ready(Ok((stream, None))),
                    peer_addr,
                    Side::Client,
                    Some(tx),
                    None,
                    inner.plain_proto(peer_addr),
                ),
                Some((connector, name)) => driver::spawn(
                    inner.clone(),
                    async move {
                        let tls = connector
                            .connect(name, stream)
                            .await
                            .map_err(tls::explain_handshake_error)?;
                        let identity = tls::identity_of(tls.get_ref().1.peer_certificates());
                        Ok((tls, identity))
                    },
                    peer_addr,
                    Side::Client,
                    Some(tx),
                    None,
                    inner.proto_tls.clone(),
                ),
            }
            rx.await.map_err(|_| Error::Shutdown)?
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// The connected peers, in the order they connected.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<_> = self
            .inner()
            .peers_lock()
            .values()
            .map(|l| l.info.clone())
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Serializes `value` once with the node's codec and queues it for every peer in
    /// `target`, waiting while a peer's send buffer (`buffer_cap`) is full. Returns when the
    /// message is queued for all of them.
    ///
    /// # Errors
    ///
    /// [`Error::NoPeers`], [`Error::UnknownPeer`], [`Error::Encode`],
    /// [`Error::MessageTooLarge`].
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        target: Target,
        value: &T,
    ) -> Result<MessageId, Error> {
        let codec = self.inner().settings.codec;
        self.send_encoded(target, codec.id(), codec.encode(value)?)
            .await
    }

    /// Sends raw bytes, without serialization; the receiver reads them with [`Message::body`].
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn send_bytes(
        &self,
        target: Target,
        bytes: impl Into<Bytes>,
    ) -> Result<MessageId, Error> {
        self.send_encoded(target, CodecId::Raw, bytes.into()).await
    }

    async fn send_encoded(
        &self,
        target: Target,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<MessageId, Error> {
        let inner = self.inner();
        if let Target::Peer(peer) = target {
            // The common case, without the lists the general path below builds.
            let link = inner.link(peer)?;
            let id = inner.next_message_id();
            let out = link.prepare(
                Kind::Message,
                0,
                id.0,
                codec,
                payload,
                &mut CompressMemo::default(),
            )?;
            return match link.try_submit(out) {
                Ok(()) => Ok(id),
                Err(TrySubmitError::Full(out)) => link.submit(out).await.map(|()| id),
                Err(TrySubmitError::Gone(p)) => Err(Error::UnknownPeer(p)),
            };
        }
        let broadcast = matches!(target, Target::All);
        let links = inner.targets(&target)?;
        let id = inner.next_message_id();
        // Queue for every peer that has room first, so one slow peer does not hold up the
        // others; then wait for the full ones. A peer that leaves meanwhile is skipped by a
        // broadcast and is an error for an explicit target.
        let mut full = Vec::new();
        let mut delivered = 0usize;
        let mut gone = None;
        let mut memo = CompressMemo::default();
        for link in links {
            let out = link.prepare(Kind::Message, 0, id.0, codec, payload.clone(), &mut memo)?;
            match link.try_submit(out) {
                Ok(()) => delivered += 1,
                Err(TrySubmitError::Full(out)) => full.push((link, out)),
                Err(TrySubmitError::Gone(p)) => gone = Some(p),
            }
        }
        for (link, out) in full {
            match link.submit(out).await {
                Ok(()) => delivered += 1,
                Err(Error::UnknownPeer(p)) => gone = Some(p),
                Err(e) => return Err(e),
            }
        }
        match gone {
            Some(p) if !broadcast => Err(Error::UnknownPeer(p)),
            Some(_) if delivered == 0 => Err(Error::NoPeers),
            _ => Ok(id),
        }
    }

    /// Like [`send`](Self::send) but never waits: fails with [`Error::Full`] when a peer's
    /// send buffer is full. With several targets, the peers before the full one have the
    /// message queued.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send), plus [`Error::Full`].
    pub fn try_send<T: Serialize + ?Sized>(
        &self,
        target: Target,
        value: &T,
    ) -> Result<MessageId, Error> {
        let inner = self.inner();
        let codec = inner.settings.codec;
        let payload = codec.encode(value)?;
        let links = inner.targets(&target)?;
        let id = inner.next_message_id();
        let mut memo = CompressMemo::default();
        for link in links {
            let out = link.prepare(
                Kind::Message,
                0,
                id.0,
                codec.id(),
                payload.clone(),
                &mut memo,
            )?;
            link.try_submit(out)?;
        }
        Ok(id)
    }

    /// Waits for the next message from any peer (channel 0).
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] once the node is shut down.
    pub async fn receive(&self) -> Result<Message, Error> {
        self.inner().receive().await
    }

    /// Alias of [`receive`](Self::receive), for users of the seeds.
    ///
    /// # Errors
    ///
    /// As [`receive`](Self::receive).
    pub async fn recv(&self) -> Result<Message, Error> {
        self.receive().await
    }

    /// Returns a message if one is waiting, without blocking.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] once the node is shut down.
    pub fn try_receive(&self) -> Result<Option<Message>, Error> {
        let inner = self.inner();
        if inner.shut.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        Ok(inner.inbox.try_pop())
    }

    /// Waits up to `timeout` for a message; `Ok(None)` when none came.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] once the node is shut down.
    pub async fn receive_timeout(&self, timeout: Duration) -> Result<Option<Message>, Error> {
        match tokio::time::timeout(timeout, self.receive()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The received messages as a [`Stream`]; it ends when the node shuts down.
    ///
    /// ```no_run
    /// # async fn f(node: slic::Node) {
    /// use futures_util::StreamExt;
    /// let mut messages = node.messages();
    /// while let Some(msg) = messages.next().await {
    ///     println!("{} says {:?}", msg.from.name, msg.body);
    /// }
    /// # }
    /// ```
    pub fn messages(&self) -> Messages {
        Messages {
            node: self.inner().clone(),
            pending: None,
        }
    }

    /// Subscribes to connection events from now on.
    pub fn events(&self) -> Events {
        Events {
            rx: self.inner().events.subscribe(),
        }
    }

    /// Opens a channel to `peer`: an ordered stream of messages of its own, multiplexed on the
    /// peer's connection. The peer gets it from [`accept_channel`](Self::accept_channel).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownPeer`], or [`Error::Open`] when the peer's channel limit is reached.
    pub async fn open_channel(&self, peer: PeerId) -> Result<Channel, Error> {
        let link = self.inner().link(peer)?;
        let (tx, rx) = oneshot::channel();
        link.cmd
            .send(Command::Open("", tx))
            .map_err(|_| Error::UnknownPeer(peer))?;
        rx.await.map_err(|_| Error::UnknownPeer(peer))?
    }

    /// Waits for a channel opened by any peer.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] once the node is shut down.
    pub async fn accept_channel(&self) -> Result<Channel, Error> {
        let inner = self.inner();
        // Bounded by the node's lifetime: each round either returns or waits for a push.
        loop {
            if let Some(ch) = inner.pending().pop_front() {
                return Ok(ch);
            }
            tokio::select! {
                () = inner.pending_notify.notified() => {}
                () = inner.shutdown.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    /// Closes the connections to `target` gracefully: what is queued is sent, then GOAWAY.
    /// Waits up to `timeout` for that, then drops the connections that are not done.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownPeer`] / [`Error::NoPeers`] for a bad target.
    pub async fn disconnect(&self, target: Target, timeout: Duration) -> Result<(), Error> {
        let links = self.inner().targets(&target)?;
        for link in &links {
            let _ = link.cmd.send(Command::Close);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for link in &links {
            if tokio::time::timeout_at(deadline, link.done.cancelled())
                .await
                .is_err()
            {
                link.kill.cancel();
            }
        }
        for link in &links {
            // A killed task only drops its socket; this wait is short.
            link.done.cancelled().await;
        }
        Ok(())
    }

    /// Closes every connection and listener and waits until every task the node started has
    /// ended. Connections get a GOAWAY and up to two seconds to send it.
    pub async fn shutdown(&self) {
        let inner = self.inner();
        inner.shut_down();
        inner.tracker.close();
        inner.tracker.wait().await;
    }

    /// Publishes a named resource. `handler` is an async function from a typed
    /// [`Request`] to `Result<Reply, Status>`; it sees who called in `req.from`. A payload
    /// that does not decode into `T` is answered [`Status::BadRequest`] without calling it; a
    /// handler that panics is answered [`Status::Internal`] and the connection carries on.
    /// The reply is encoded in the caller's codec.
    ///
    /// The handler's future is first polled inside the connection's task: one that is ready
    /// at once (it awaits nothing that waits) is answered there, with no task of its own,
    /// which is what makes many small requests cheap. One that has to wait goes on in a task
    /// of its own, so the connection keeps serving. Either way, CPU-heavy work belongs in
    /// [`tokio::task::spawn_blocking`], as in any async code: until it returns, the
    /// connection waits too.
    ///
    /// # Errors
    ///
    /// [`Error::ResourceExists`] if the name is taken (also by an upload resource),
    /// [`Error::Config`] for an empty name or one over 255 bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use slic::{Node, Request, Status};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Add { a: i64 }
    /// #[derive(Serialize, Deserialize, Debug, PartialEq)]
    /// struct Answer { answer: i64 }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), slic::Error> {
    /// let server = Node::builder().name("hub").build()?;
    /// server.create_resource(":add", |req: Request<Add>| async move {
    ///     Ok::<_, Status>(Answer { answer: req.body.a + 1 })
    /// })?;
    /// let addr = server.listen("127.0.0.1:0").await?;
    ///
    /// let client = Node::builder().build()?;
    /// client.connect(addr).await?;
    /// let reply: Answer = client.get_resource(":add", &Add { a: 10 }).await?;
    /// assert_eq!(reply, Answer { answer: 11 });
    /// # Ok(()) }
    /// ```
    pub fn create_resource<T, R, F, Fut>(&self, name: &str, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        let inner = self.inner();
        if inner.upload_target(name).is_some() {
            return Err(Error::ResourceExists(name.to_owned()));
        }
        inner
            .resources
            .insert(name, resource::erase(inner.settings.codec, handler))
    }

    /// Replaces the handler of an existing resource; requests already running finish with
    /// the old one.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] with [`Status::NotFound`] if there is no such resource.
    pub fn update_resource<T, R, F, Fut>(&self, name: &str, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, Status>> + Send + 'static,
    {
        let inner = self.inner();
        inner
            .resources
            .replace(name, resource::erase(inner.settings.codec, handler))
    }

    /// Removes a resource (or upload resource); later calls get [`Status::NotFound`]. Returns
    /// whether it existed.
    pub fn remove_resource(&self, name: &str) -> bool {
        let inner = self.inner();
        let upload = inner
            .uploads
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .is_some();
        inner.resources.remove(name) || upload
    }

    /// Removes every resource and upload resource.
    pub fn clear_resources(&self) {
        let inner = self.inner();
        inner.resources.clear();
        inner
            .uploads
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Calls resource `name` on the connected peer and decodes its reply.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] when the server refused or failed (not found, bad request,
    /// internal, timeout, ...), [`Error::NoPeers`], [`Error::AmbiguousPeer`] when several
    /// peers are connected (use [`get_resource_from`](Self::get_resource_from)),
    /// [`Error::Decode`] when the reply is not an `R`.
    pub async fn get_resource<T, R>(&self, name: &str, body: &T) -> Result<R, Error>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let peer = self.inner().only_peer()?;
        self.get_resource_from(peer, name, body).await
    }

    /// Calls resource `name` on `peer`. Many calls may be in flight on one connection at
    /// once; each gets its own reply. Dropping the future, or the node's
    /// `request_timeout`, cancels the request on the server.
    ///
    /// # Errors
    ///
    /// As [`get_resource`](Self::get_resource), and [`Error::UnknownPeer`].
    pub async fn get_resource_from<T, R>(
        &self,
        peer: PeerId,
        name: &str,
        body: &T,
    ) -> Result<R, Error>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let inner = self.inner();
        let link = inner.link(peer)?;
        let codec = inner.settings.codec;
        let payload = resource::encode_request(codec, name, body)?;
        let (reply_codec, bytes) = link
            .call(codec.id(), payload, inner.settings.request_timeout)
            .await?;
        codec::decode(reply_codec, &bytes)
    }

    /// Publishes an upload resource: clients stream files into `dir` with
    /// [`upload_resource`](Self::upload_resource). Default options: files up to 1 GiB, no
    /// replacing of existing files.
    ///
    /// # Errors
    ///
    /// As [`create_upload_resource_with`](Self::create_upload_resource_with).
    pub fn create_upload_resource(&self, name: &str, dir: impl AsRef<Path>) -> Result<(), Error> {
        self.create_upload_resource_with(name, dir, UploadOptions::default())
    }

    /// Publishes an upload resource with options.
    ///
    /// Each upload is written to a temporary file inside `dir`, checked against the size and
    /// BLAKE3 digest the client sends, fsynced with its folder, and only then renamed into
    /// place; an upload cut off leaves nothing behind. File names from clients are refused
    /// unless they are one plain file name (no `..`, separators, drive letters, NUL, ...), so
    /// nothing outside `dir` can be written.
    ///
    /// # Errors
    ///
    /// [`Error::ResourceExists`] if the name is taken, [`Error::Io`] if `dir` is not a
    /// folder.
    pub fn create_upload_resource_with(
        &self,
        name: &str,
        dir: impl AsRef<Path>,
        options: UploadOptions,
    ) -> Result<(), Error> {
        resource::validate_name(name)?;
        let dir: PathBuf = dir.as_ref().canonicalize()?;
        if !dir.is_dir() {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a folder", dir.display()),
            )));
        }
        let inner = self.inner();
        if inner.resources.contains(name) {
            return Err(Error::ResourceExists(name.to_owned()));
        }
        let mut uploads = inner
            .uploads
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if uploads.contains_key(name) {
            return Err(Error::ResourceExists(name.to_owned()));
        }
        uploads.insert(name.to_owned(), Arc::new(UploadTarget { dir, options }));
        Ok(())
    }

    /// Uploads the file at `path` to upload resource `name` on the connected peer, stored
    /// under the file's own name. Returns the stored name, size and digest.
    ///
    /// # Errors
    ///
    /// [`Error::Status`] when the server refuses (unknown resource, bad name, too large,
    /// exists) or the upload fails its checks; [`Error::Io`] reading the file;
    /// [`Error::NoPeers`] / [`Error::AmbiguousPeer`].
    pub async fn upload_resource(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<StoredFile, Error> {
        let peer = self.inner().only_peer()?;
        self.upload_resource_to(peer, name, path, UploadRequest::default())
            .await
    }

    /// Uploads to `peer`, with a stored name and a progress callback if given.
    ///
    /// ```no_run
    /// # async fn f(node: slic::Node, peer: slic::PeerId) -> Result<(), slic::Error> {
    /// let req = slic::UploadRequest::default()
    ///     .stored_name("backup.tar")
    ///     .progress(|sent, total| eprintln!("{sent}/{total}"));
    /// let stored = node.upload_resource_to(peer, ":upload", "/tmp/b.tar", req).await?;
    /// println!("{} bytes, blake3 {}", stored.size, stored.digest);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`upload_resource`](Self::upload_resource).
    pub async fn upload_resource_to(
        &self,
        peer: PeerId,
        name: &str,
        path: impl AsRef<Path>,
        request: UploadRequest,
    ) -> Result<StoredFile, Error> {
        let link = self.inner().link(peer)?;
        let (tx, rx) = oneshot::channel();
        link.cmd
            .send(Command::Open(upload::UPLOAD_LABEL, tx))
            .map_err(|_| Error::UnknownPeer(peer))?;
        let channel = rx.await.map_err(|_| Error::UnknownPeer(peer))??;
        let result = upload::send_file(&channel, name, path.as_ref(), request).await;
        channel.close();
        result
    }

    /// Number of tasks of this node still running (listeners and connections).
    pub fn task_count(&self) -> usize {
        self.inner().tracker.len()
    }
}

async fn accept_loop(
    node: Arc<NodeInner>,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        tokio::select! {
            () = node.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let Some(slot) = node.admit(addr.ip()) else {
                        debug!(%addr, "connection limit reached: closing at accept");
                        node.emit(Event::HandshakeFailed {
                            addr,
                            reason: "connection limit reached".into(),
                        });
                        drop(stream);
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "set_nodelay failed");
                    }
                    match &acceptor {
                        None => driver::spawn(
                            node.clone(),
                            std::future::ready(Ok((stream, None))),
                            addr,
                            Side::Server,
                            None,
                            Some(slot),
                            node.plain_proto(addr),
                        ),
                        Some(acceptor) => {
                            // The TLS handshake runs in the connection's task, within the
                            // handshake deadline, so a trickling client stalls nobody.
                            let acceptor = acceptor.clone();
                            driver::spawn(
                                node.clone(),
                                async move {
                                    let stream = tls::refuse_plain_slic(stream).await?;
                                    let tls = acceptor
                                        .accept(stream)
                                        .await
                                        .map_err(tls::explain_handshake_error)?;
                                    let identity =
                                        tls::identity_of(tls.get_ref().1.peer_certificates());
                                    Ok((tls, identity))
                                },
                                addr,
                                Side::Server,
                                None,
                                Some(slot),
                                node.proto_tls.clone(),
                            );
                        }
                    }
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// The receive in progress of a [`Messages`] stream.
type PendingReceive = Pin<Box<dyn Future<Output = Result<Message, Error>> + Send>>;

/// A [`Stream`] of the messages a node receives; from [`Node::messages`].
pub struct Messages {
    node: Arc<NodeInner>,
    pending: Option<PendingReceive>,
}

impl fmt::Debug for Messages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

impl Stream for Messages {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let node = self.node.clone();
        let fut = self
            .pending
            .get_or_insert_with(|| Box::pin(async move { node.receive().await }));
        match fut.as_mut().poll(cx) {
            Poll::Ready(r) => {
                self.pending = None;
                Poll::Ready(r.ok())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Connection events of a node; from [`Node::events`].
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the node is gone. A subscriber that falls more than 1024
    /// events behind gets [`Event::Lagged`] with the number it missed.
    pub async fn recv(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Event::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which plain TCP connections ask for frame checksums, by policy and peer address.
    #[test]
    fn frame_checksums_follow_the_policy_and_whether_the_peer_is_on_loopback() {
        let loopback = [
            "127.0.0.1:9",
            "127.8.9.10:9",
            "[::1]:9",
            "[::ffff:127.0.0.1]:9",
        ];
        let remote = [
            "10.1.2.3:9",
            "192.0.2.7:9",
            "[2001:db8::1]:9",
            "[::ffff:10.0.0.1]:9",
        ];
        let cases = [
            (FrameChecksum::Network, false, true),
            (FrameChecksum::PlainOnly, true, true),
            (FrameChecksum::Always, true, true),
            (FrameChecksum::Never, false, false),
        ];
        for (policy, on_loopback, on_remote) in cases {
            let node = Node::builder().frame_checksum(policy).build().unwrap();
            let inner = node.inner();
            for (addrs, want) in [(&loopback, on_loopback), (&remote, on_remote)] {
                for a in addrs {
                    let proto = inner.plain_proto(a.parse().unwrap());
                    assert_eq!(proto.wants_checksum(), want, "{policy:?} to {a}");
                    // Only a loopback server that does not ask on its own follows the
                    // client (a server behind a local forwarder).
                    let follows = policy == FrameChecksum::Network && addrs == &loopback;
                    assert_eq!(proto.follows_checksum(), follows, "{policy:?} to {a}");
                }
            }
            let tls = inner.proto_tls.wants_checksum();
            assert_eq!(tls, policy == FrameChecksum::Always, "{policy:?} over TLS");
        }
        assert_eq!(FrameChecksum::default(), FrameChecksum::Network);
    }
}
