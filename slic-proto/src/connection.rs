//! The connection state machine: handshake, channels, flow control, keepalive and close.

use std::collections::VecDeque;

use crate::idmap::IdMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tracing::debug;

use crate::config::{Compression, Config};
use crate::error::{ConnectionError, DecodeError, ErrorCode, Initiator, OpenError, SendError};
use crate::frame::{
    CHECKSUM_LEN, CodecId, Decoder, Frame, FrameType, HANDSHAKE_MAX_PAYLOAD, HEADER_LEN, Header,
    checksum, flags,
};
use crate::handshake::{Hello, HelloError};
use crate::limit::TokenBucket;

/// Protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// Longest channel label, in bytes.
pub const MAX_LABEL_LEN: usize = 255;

/// Longest GOAWAY/ERROR reason sent or kept, in bytes.
const MAX_REASON_LEN: usize = 256;

/// Cost of a data frame (MESSAGE, REQUEST, RESPONSE) against the flow-control windows (PROTOCOL.md, "Flow control").
fn frame_cost(payload_len: usize) -> u32 {
    // Payloads are bounded by max_frame_size (<= 16 MiB), so this fits in u32.
    u32::try_from(HEADER_LEN + payload_len).unwrap_or(u32::MAX)
}

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The side that connected; sends HELLO, opens odd channel ids.
    Client,
    /// The side that accepted; answers WELCOME, opens even channel ids.
    Server,
}

/// One frame ready to be written: the header bytes and the payload, kept apart so that a
/// payload is written from the buffer the application gave, without a copy.
#[derive(Clone, Debug)]
pub struct Transmit {
    /// Encoded header.
    pub header: [u8; HEADER_LEN],
    /// Payload bytes.
    pub payload: Bytes,
    /// CRC-32 trailer, written after the payload, once checksums are agreed.
    pub trailer: Option<[u8; CHECKSUM_LEN]>,
}

impl Transmit {
    fn new(header: Header, payload: Bytes) -> Self {
        Self {
            header: header.encode(),
            payload,
            trailer: None,
        }
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload.len() + self.trailer.map_or(0, |t| t.len())
    }

    /// Appends the frame's bytes (header, payload, trailer) to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.payload);
        if let Some(t) = &self.trailer {
            out.extend_from_slice(t);
        }
    }

    /// Always false: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The kinds of application data a connection carries (PROTOCOL.md, "Requests").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A one-way message (MESSAGE).
    Message,
    /// A request to a named resource (REQUEST); `id` is the request id.
    Request,
    /// The answer to a request (RESPONSE); `id` is the request's id.
    Response,
}

impl Kind {
    fn frame_type(self) -> FrameType {
        match self {
            Self::Message => FrameType::Message,
            Self::Request => FrameType::Request,
            Self::Response => FrameType::Response,
        }
    }

    fn of(ty: FrameType) -> Self {
        match ty {
            FrameType::Request => Self::Request,
            FrameType::Response => Self::Response,
            _ => Self::Message,
        }
    }
}

/// A complete message, request or response received from the peer.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    /// The payload is compressed with the negotiated algorithm; the driver decompresses it,
    /// bounded by the local maximum message size.
    pub compressed: bool,
    /// What it is.
    pub kind: Kind,
    /// Channel it arrived on.
    pub channel: u32,
    /// Sender-assigned message or request id.
    pub id: u64,
    /// Codec the sender used.
    pub codec: CodecId,
    /// The message bytes.
    pub payload: Bytes,
    /// Credit to hand back with [`Connection::release`] once the application consumed it.
    pub credit: u32,
}

/// What the connection reports to its driver.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The handshake completed; the peer's declared parameters.
    Connected(Box<Hello>),
    /// A whole message arrived.
    Message(IncomingMessage),
    /// The peer opened a channel.
    ChannelOpened {
        /// Channel id.
        channel: u32,
        /// The label the opener gave it (may be empty).
        label: String,
    },
    /// The peer cancelled the request it sent with this id.
    Cancel {
        /// Request id.
        id: u64,
    },
    /// A channel is closed in both directions.
    ChannelClosed {
        /// Channel id.
        channel: u32,
        /// Who asked for the close.
        initiator: Initiator,
    },
    /// The connection ended; nothing more will be delivered. Transmits may still be pending
    /// (an ERROR or GOAWAY frame): write them, then close the socket.
    Closed(ConnectionError),
}

/// Connection life cycle.
///
/// ```text
///  Handshake --HELLO/WELCOME ok--> Open --close()--> Draining --queues empty, GOAWAY--> Closed
///      |                            |                                                  ^
///      +---- violation, timeout, peer ERROR/GOAWAY/EOF -------------------------------+
/// ```
#[derive(Debug)]
enum State {
    Handshake,
    Open,
    Draining { code: ErrorCode, reason: String },
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalHalf {
    Open,
    /// CHANNEL_CLOSE with this code goes out once the channel's queue is empty.
    Closing(ErrorCode),
    /// CHANNEL_CLOSE sent.
    Closed,
}

#[derive(Debug)]
struct Outgoing {
    compressed: bool,
    kind: Kind,
    id: u64,
    codec: CodecId,
    payload: Bytes,
    offset: usize,
}

#[derive(Debug)]
struct Reassembly {
    compressed: bool,
    kind: Kind,
    id: u64,
    codec: CodecId,
    buf: BytesMut,
}

#[derive(Debug)]
struct ChannelState {
    opened_by: Initiator,
    local: LocalHalf,
    remote_closed: bool,
    /// Refused or locally closed: incoming data is dropped (credit returned).
    discard: bool,
    refused: bool,
    /// The peer's CHANNEL_CLOSE arrived while our half was still open: the close was the
    /// peer's, and [`Event::ChannelClosed`] with [`Initiator::Remote`] was already reported.
    remote_initiated: bool,
    send_credit: u32,
    recv_window: u32,
    recv_unacked: u32,
    queue: VecDeque<Outgoing>,
    in_ready: bool,
    reassembly: Option<Reassembly>,
}

impl ChannelState {
    fn new(opened_by: Initiator, send_credit: u32, recv_window: u32) -> Self {
        Self {
            opened_by,
            local: LocalHalf::Open,
            remote_closed: false,
            discard: false,
            refused: false,
            remote_initiated: false,
            send_credit,
            recv_window,
            recv_unacked: 0,
            queue: VecDeque::new(),
            in_ready: false,
            reassembly: None,
        }
    }

    fn has_work(&self) -> bool {
        !self.queue.is_empty() || matches!(self.local, LocalHalf::Closing(_))
    }
}

/// A slic connection as a pure state machine: no sockets, no clock, no tasks.
///
/// Feed it bytes with [`handle_input`](Self::handle_input) and time with
/// [`handle_timeout`](Self::handle_timeout); give it work with [`send_message`](Self::send_message),
/// [`open_channel`](Self::open_channel), [`close_channel`](Self::close_channel),
/// [`release`](Self::release) and [`close`](Self::close). After any of these, drain, in this
/// order: [`poll_transmit`](Self::poll_transmit) until `None` (write the frames),
/// [`poll_timeout`](Self::poll_timeout) (arm a timer), [`poll_event`](Self::poll_event) until
/// `None` (deliver). Once [`Event::Closed`] was returned, write the remaining transmits and close.
///
/// Nothing the peer sends panics this type or makes it allocate beyond the configured limits:
/// frame size is checked from the header, messages against `max_message_size`, buffered data
/// against the flow-control windows, channels against `max_channels`.
#[derive(Debug)]
pub struct Connection {
    config: Arc<Config>,
    side: Side,
    state: State,
    decoder: Decoder,
    peer: Option<Hello>,
    heartbeat: Option<Duration>,
    handshake_deadline: Instant,
    last_send: Instant,
    last_recv: Instant,
    control: VecDeque<Transmit>,
    events: VecDeque<Event>,
    channels: IdMap<u32, ChannelState>,
    ready: VecDeque<u32>,
    conn_send_credit: u32,
    conn_recv_window: u32,
    conn_recv_unacked: u32,
    reassembly_bytes: usize,
    next_local_channel: u32,
    last_peer_channel: u32,
    local_channels: u32,
    peer_channels: u32,
    queued_bytes: usize,
    ping_seq: u64,
    ping_sent: Option<(u64, Instant)>,
    control_budget: TokenBucket,
    rtt: Option<Duration>,
    compression: Option<Compression>,
    /// Frames after the handshake carry a CRC-32 trailer (both sides asked for it).
    checksum: bool,
    stats: Stats,
}

/// Traffic counters of one connection.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames written.
    pub frames_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Bytes written (headers included).
    pub bytes_sent: u64,
    /// Bytes read (headers included).
    pub bytes_received: u64,
    /// Whole messages delivered.
    pub messages_received: u64,
    /// Messages queued for sending.
    pub messages_sent: u64,
}

impl Connection {
    /// A new connection. A client queues its HELLO at once; a server waits for one. The
    /// handshake deadline starts now.
    pub fn new(config: Arc<Config>, side: Side, now: Instant) -> Self {
        let mut conn = Self {
            decoder: Decoder::new(HANDSHAKE_MAX_PAYLOAD),
            side,
            state: State::Handshake,
            peer: None,
            heartbeat: None,
            // A huge configured timeout must not overflow Instant: treat it as "a year".
            handshake_deadline: now
                .checked_add(config.handshake_timeout)
                .unwrap_or(now + Duration::from_secs(365 * 86_400)),
            last_send: now,
            last_recv: now,
            control: VecDeque::new(),
            events: VecDeque::new(),
            channels: crate::idmap::id_map(),
            ready: VecDeque::new(),
            conn_send_credit: 0,
            conn_recv_window: config.connection_window,
            conn_recv_unacked: 0,
            reassembly_bytes: 0,
            next_local_channel: match side {
                Side::Client => 1,
                Side::Server => 2,
            },
            last_peer_channel: 0,
            local_channels: 0,
            peer_channels: 0,
            queued_bytes: 0,
            ping_seq: 0,
            ping_sent: None,
            control_budget: TokenBucket::new(config.control_budget.0, config.control_budget.1, now),
            rtt: None,
            compression: None,
            checksum: false,
            stats: Stats::default(),
            config,
        };
        if side == Side::Client {
            let hello = conn.local_hello(PROTOCOL_VERSION);
            conn.push_control(FrameType::Hello, 0, 0, hello.encode());
        }
        conn
    }

    // ----- getters -------------------------------------------------------------------------

    /// Which side this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Whether the handshake has completed and the connection is not closed.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Whether the connection has ended (transmits may still be pending).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The peer's handshake parameters, once known.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Bytes of messages queued and not yet handed to [`poll_transmit`](Self::poll_transmit),
    /// counting one header per message.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The last measured round-trip time (from PING/PONG).
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The compression algorithm agreed in the handshake, if any.
    pub fn compression(&self) -> Option<Compression> {
        self.compression
    }

    /// Traffic counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Number of channels currently tracked, channel 0 included once open.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    // ----- commands ------------------------------------------------------------------------

    /// Queues a message on `channel` with the given id and codec. Large messages are split
    /// into frames of the peer's maximum frame size and sent as flow control allows.
    ///
    /// # Errors
    ///
    /// Before the handshake, after close, on a channel not open for sending, above the peer's
    /// maximum message size, or in a codec the peer does not decode.
    pub fn send_message(
        &mut self,
        channel: u32,
        id: u64,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<(), SendError> {
        self.send(Kind::Message, channel, id, codec, payload)
    }

    /// Queues application data of any [`Kind`]: a message, a request (its `id` is the request
    /// id the response will carry) or a response (its `id` is the request's). Flow control and
    /// fragmentation are the same for all three.
    ///
    /// # Errors
    ///
    /// As [`send_message`](Self::send_message).
    pub fn send(
        &mut self,
        kind: Kind,
        channel: u32,
        id: u64,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<(), SendError> {
        self.send_compressed(kind, channel, id, codec, payload, false)
    }

    /// As [`send`](Self::send), for a payload the caller compressed with the negotiated
    /// algorithm ([`compression`](Self::compression)) when `compressed` is true: every frame
    /// of it carries the COMPRESSED flag.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send), and [`SendError::NotNegotiated`] for a compressed payload on
    /// a connection that negotiated no compression.
    pub fn send_compressed(
        &mut self,
        kind: Kind,
        channel: u32,
        id: u64,
        codec: CodecId,
        payload: Bytes,
        compressed: bool,
    ) -> Result<(), SendError> {
        if compressed && self.compression.is_none() {
            return Err(SendError::NotNegotiated);
        }
        let peer = match (&self.state, &self.peer) {
            (State::Open, Some(peer)) => peer,
            (State::Handshake, _) => return Err(SendError::NotReady),
            _ => return Err(SendError::Closed),
        };
        if payload.len() > peer.max_message_size as usize {
            return Err(SendError::MessageTooLarge {
                len: payload.len(),
                max: peer.max_message_size,
            });
        }
        if peer.codecs & codec.mask_bit() == 0 {
            return Err(SendError::CodecRefused(codec));
        }
        let ch = self
            .channels
            .get_mut(&channel)
            .filter(|c| c.local == LocalHalf::Open && !c.remote_closed)
            .ok_or(SendError::ChannelClosed(channel))?;
        self.queued_bytes += HEADER_LEN + payload.len();
        self.stats.messages_sent += 1;
        ch.queue.push_back(Outgoing {
            kind,
            id,
            codec,
            payload,
            offset: 0,
            compressed,
        });
        if !ch.in_ready && ch.send_credit as usize >= HEADER_LEN {
            ch.in_ready = true;
            self.ready.push_back(channel);
        }
        Ok(())
    }

    /// Opens a channel and returns its id. Messages may be sent on it at once.
    ///
    /// # Errors
    ///
    /// Before the handshake, after close, or when the peer's channel limit is reached.
    pub fn open_channel(&mut self) -> Result<u32, OpenError> {
        self.open_labeled_channel("")
    }

    /// Opens a channel carrying `label` in its CHANNEL_OPEN (at most 255 bytes; the peer sees
    /// it in [`Event::ChannelOpened`]). slic uses labels to route channels to built-in services
    /// such as uploads.
    ///
    /// # Errors
    ///
    /// As [`open_channel`](Self::open_channel), and [`OpenError::Label`] for a label over
    /// 255 bytes.
    pub fn open_labeled_channel(&mut self, label: &str) -> Result<u32, OpenError> {
        if label.len() > MAX_LABEL_LEN {
            return Err(OpenError::Label);
        }
        let peer = match (&self.state, &self.peer) {
            (State::Open, Some(peer)) => peer,
            (State::Handshake, _) => return Err(OpenError::NotReady),
            _ => return Err(OpenError::Closed),
        };
        if self.local_channels >= peer.max_channels {
            return Err(OpenError::Limit(peer.max_channels));
        }
        let id = self.next_local_channel;
        self.next_local_channel = id.checked_add(2).ok_or(OpenError::Exhausted)?;
        let state = ChannelState::new(
            Initiator::Local,
            peer.channel_window,
            self.config.channel_window,
        );
        self.channels.insert(id, state);
        self.local_channels += 1;
        self.push_control(
            FrameType::ChannelOpen,
            id,
            0,
            Bytes::copy_from_slice(label.as_bytes()),
        );
        Ok(id)
    }

    /// Asks the peer to cancel the request it is serving under `id` (a CANCEL frame). Does
    /// nothing before the handshake or after close.
    pub fn cancel_request(&mut self, id: u64) {
        if self.is_open() {
            self.push_control(FrameType::Cancel, 0, id, Bytes::new());
        }
    }

    /// Closes a channel: CHANNEL_CLOSE goes out after the messages already queued on it; what
    /// arrives on it afterwards is dropped. [`Event::ChannelClosed`] follows once the peer has
    /// answered. Closing channel 0, an unknown or an already closed channel does nothing.
    pub fn close_channel(&mut self, channel: u32) {
        if channel == 0 {
            return;
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        if ch.local != LocalHalf::Open {
            return;
        }
        ch.local = LocalHalf::Closing(ErrorCode::NoError);
        ch.discard = true;
        if let Some(r) = ch.reassembly.take() {
            self.reassembly_bytes -= r.buf.len();
        }
        if !ch.in_ready {
            ch.in_ready = true;
            self.ready.push_back(channel);
        }
    }

    /// Hands back the credit of a message the application has consumed
    /// ([`IncomingMessage::credit`]). WINDOW_UPDATE frames go out once half a window is free.
    pub fn release(&mut self, channel: u32, credit: u32) {
        if self.is_closed() {
            return;
        }
        self.conn_recv_unacked = self.conn_recv_unacked.saturating_add(credit);
        if self.conn_recv_unacked >= self.config.connection_window / 2 {
            let inc = std::mem::take(&mut self.conn_recv_unacked);
            self.conn_recv_window = self.conn_recv_window.saturating_add(inc);
            let mut h = Header::control(FrameType::WindowUpdate, 0, 0, 4);
            h.flags = flags::CONNECTION;
            self.control
                .push_back(Transmit::new(h, Bytes::copy_from_slice(&inc.to_be_bytes())));
        }
        let half = self.config.channel_window / 2;
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        ch.recv_unacked = ch.recv_unacked.saturating_add(credit);
        if ch.recv_unacked >= half && !ch.remote_closed {
            let inc = std::mem::take(&mut ch.recv_unacked);
            ch.recv_window = ch.recv_window.saturating_add(inc);
            self.push_control(
                FrameType::WindowUpdate,
                channel,
                0,
                Bytes::copy_from_slice(&inc.to_be_bytes()),
            );
        }
    }

    /// Starts a graceful close: no new messages are accepted, queued ones are sent, then
    /// GOAWAY with `code`; [`Event::Closed`] follows. Before the handshake completes, or when
    /// already closing, it sends GOAWAY at once.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        match self.state {
            State::Open => {
                self.state = State::Draining {
                    code,
                    reason: truncate_reason(reason),
                };
                self.maybe_finish_drain();
            }
            State::Handshake | State::Draining { .. } => {
                self.drop_queues();
                self.control.clear();
                self.state = State::Draining {
                    code,
                    reason: truncate_reason(reason),
                };
                self.maybe_finish_drain();
            }
            State::Closed => {}
        }
    }

    /// Ends the connection because the peer broke a rule only the driver can see (for
    /// example a response to a request it never sent): queues ERROR with `code` and reports
    /// [`Event::Closed`] with [`ConnectionError::ProtocolViolation`]. Does nothing once closed.
    pub fn abort(&mut self, code: ErrorCode, reason: &str) {
        if !self.is_closed() {
            self.violation(code, reason.to_owned());
        }
    }

    /// The peer closed its byte stream. Anything after a GOAWAY or ERROR is already handled;
    /// otherwise the connection ends with [`ConnectionError::Eof`].
    pub fn handle_eof(&mut self) {
        if !self.is_closed() {
            self.terminate(ConnectionError::Eof);
        }
    }

    // ----- input ---------------------------------------------------------------------------

    /// Consumes every complete frame at the front of `buf`, leaving a partial frame in it.
    /// Payloads are split off `buf` without copying.
    ///
    /// # Errors
    ///
    /// A protocol violation by the peer: an ERROR frame for it is queued, the connection is
    /// closed and [`Event::Closed`] is queued too. Input after close is ignored.
    pub fn handle_input(
        &mut self,
        now: Instant,
        buf: &mut BytesMut,
    ) -> Result<(), ConnectionError> {
        // Bounded by the buffer: each iteration consumes at least one header.
        while !self.is_closed() {
            let frame = match self.decoder.decode(buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    // The stream cannot be resynchronised: drop what is buffered.
                    buf.clear();
                    let reason = match (&self.state, &e) {
                        // 0x15 and 0x16 start TLS alert and handshake records: say so, the
                        // usual cause is a tls:// peer on a plain address or the reverse.
                        (State::Handshake, DecodeError::UnsupportedVersion(0x15 | 0x16)) => {
                            "peer speaks TLS, not plain slic: use a tls:// address on both sides"
                                .to_owned()
                        }
                        _ => e.to_string(),
                    };
                    return Err(self.violation(ErrorCode::from(&e), reason));
                }
            };
            self.last_recv = now;
            self.stats.frames_received += 1;
            let trailer = if self.checksum { CHECKSUM_LEN } else { 0 };
            self.stats.bytes_received += (HEADER_LEN + frame.payload.len() + trailer) as u64;
            if let Err((code, reason)) = self.handle_frame(now, frame) {
                buf.clear();
                return Err(self.violation(code, reason));
            }
        }
        if self.is_closed() {
            buf.clear();
        }
        Ok(())
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), (ErrorCode, String)> {
        let Frame { header, payload } = frame;
        if let State::Handshake = self.state {
            return self.handle_handshake(header, &payload);
        }
        if matches!(
            header.ty,
            FrameType::Ping
                | FrameType::Pong
                | FrameType::ChannelOpen
                | FrameType::ChannelClose
                | FrameType::Cancel
        ) && !self.control_budget.try_take(now)
        {
            // Cheap for the peer, work for us: past the budget the peer is flooding.
            return Err((
                ErrorCode::EnhanceYourCalm,
                format!("control frame budget exceeded ({:?})", header.ty),
            ));
        }
        match header.ty {
            FrameType::Hello | FrameType::Welcome => {
                Err((ErrorCode::ProtocolError, "second handshake".into()))
            }
            FrameType::Message | FrameType::Request | FrameType::Response => {
                self.handle_message(header, payload)
            }
            FrameType::Cancel => {
                expect_empty(&payload)?;
                self.events.push_back(Event::Cancel { id: header.id });
                Ok(())
            }
            FrameType::ChannelOpen => self.handle_channel_open(header, &payload),
            FrameType::ChannelClose => self.handle_channel_close(header, &payload),
            FrameType::WindowUpdate => self.handle_window_update(header, &payload),
            FrameType::Ping => {
                expect_empty(&payload)?;
                self.push_control(FrameType::Pong, 0, header.id, Bytes::new());
                Ok(())
            }
            FrameType::Pong => {
                expect_empty(&payload)?;
                if let Some((id, sent)) = self.ping_sent
                    && id == header.id
                {
                    self.rtt = Some(now.saturating_duration_since(sent));
                    self.ping_sent = None;
                }
                Ok(())
            }
            FrameType::GoAway | FrameType::Error => {
                let (code, reason) = parse_close_payload(&payload)?;
                let err = if header.ty == FrameType::GoAway {
                    ConnectionError::GoAway { code, reason }
                } else {
                    ConnectionError::PeerError { code, reason }
                };
                debug!(error = %err, "peer ended the connection");
                self.terminate(err);
                Ok(())
            }
            // Reserved types are refused by the decoder; nothing else reaches here.
            _ => Err((ErrorCode::UnknownFrame, format!("{:?}", header.ty))),
        }
    }

    fn handle_handshake(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        let expected = match self.side {
            Side::Server => FrameType::Hello,
            Side::Client => FrameType::Welcome,
        };
        if header.ty == FrameType::Error || header.ty == FrameType::GoAway {
            let (code, reason) = parse_close_payload(payload)?;
            // A GOAWAY is a graceful close also before the handshake completes (a server that
            // shuts down before answering HELLO sends one): report it as such, as after the
            // handshake. Reporting it as PeerError (found by fuzz/connection_ops) made a close
            // of an honest peer look like a fatal error.
            let err = if header.ty == FrameType::GoAway {
                ConnectionError::GoAway { code, reason }
            } else {
                ConnectionError::PeerError { code, reason }
            };
            self.terminate(err);
            return Ok(());
        }
        if header.ty != expected {
            return Err((
                ErrorCode::ProtocolError,
                format!("expected {expected:?}, got {:?}", header.ty),
            ));
        }
        let hello = Hello::decode(payload).map_err(|e: HelloError| (e.code(), e.to_string()))?;
        if self.side == Side::Client {
            // The server committed to checksums when it sent this WELCOME: even our refusal of
            // it must carry a trailer, or the server would read the ERROR as corrupt.
            self.checksum = self.config.checksum && hello.checksum;
        }
        let version = match self.side {
            // Client speaks `hello.version` at most; we speak PROTOCOL_VERSION.
            Side::Server => hello.version.min(PROTOCOL_VERSION),
            Side::Client if hello.version == PROTOCOL_VERSION => PROTOCOL_VERSION,
            Side::Client => {
                return Err((
                    ErrorCode::UnsupportedVersion,
                    format!("server chose version {}", hello.version),
                ));
            }
        };
        self.compression = match self.side {
            // The server picks its most preferred algorithm among those the client offered.
            Side::Server => self
                .config
                .compression
                .iter()
                .copied()
                .find(|c| hello.compression.contains(&(*c as u8))),
            // The client accepts nothing it did not offer, and at most one choice.
            Side::Client => match hello.compression.as_slice() {
                [] => None,
                [id] => Some(
                    Compression::from_u8(*id)
                        .filter(|c| self.config.compression.contains(c))
                        .ok_or_else(|| {
                            (
                                ErrorCode::HandshakeFailed,
                                format!("server chose compression {id}, which was not offered"),
                            )
                        })?,
                ),
                _ => {
                    return Err((
                        ErrorCode::HandshakeFailed,
                        "WELCOME names more than one compression".into(),
                    ));
                }
            },
        };
        // A server may follow the client's wish (Config::checksum_if_asked); a client's own
        // wish is what its HELLO said.
        let wants_checksum = self.config.checksum
            || (self.side == Side::Server && self.config.checksum_if_asked && hello.checksum);
        if self.side == Side::Server {
            let mut welcome = self.local_hello(version);
            welcome.compression = self.compression.map(|c| c as u8).into_iter().collect();
            welcome.checksum = wants_checksum;
            self.push_control(FrameType::Welcome, 0, 0, welcome.encode());
        }
        let ours = self.config.heartbeat.as_millis();
        let theirs = u128::from(hello.heartbeat_ms);
        let hb = match (ours, theirs) {
            (0, 0) => 0,
            (0, t) => t,
            (o, 0) => o,
            (o, t) => o.min(t),
        };
        self.heartbeat = (hb > 0).then(|| Duration::from_millis(hb as u64));
        self.conn_send_credit = hello.connection_window;
        self.decoder.set_max_payload(self.config.max_frame_size);
        self.checksum = wants_checksum && hello.checksum;
        self.decoder.set_checksum(self.checksum);
        self.channels.insert(
            0,
            ChannelState::new(
                Initiator::Local,
                hello.channel_window,
                self.config.channel_window,
            ),
        );
        self.peer = Some(hello.clone());
        self.state = State::Open;
        self.events.push_back(Event::Connected(Box::new(hello)));
        Ok(())
    }

    fn handle_message(
        &mut self,
        header: Header,
        payload: Bytes,
    ) -> Result<(), (ErrorCode, String)> {
        let cost = frame_cost(payload.len());
        let channel = header.channel;
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Err((
                ErrorCode::ChannelClosed,
                format!("message on unknown channel {channel}"),
            ));
        };
        if ch.remote_closed {
            return Err((
                ErrorCode::ChannelClosed,
                format!("message after close on channel {channel}"),
            ));
        }
        if cost > ch.recv_window || cost > self.conn_recv_window {
            return Err((
                ErrorCode::FlowControlError,
                format!("frame of cost {cost} exceeds the window on channel {channel}"),
            ));
        }
        ch.recv_window -= cost;
        self.conn_recv_window -= cost;
        if ch.discard {
            self.release(channel, cost);
            return Ok(());
        }
        let more = header.flags & flags::MORE != 0;
        let compressed = header.flags & flags::COMPRESSED != 0;
        if compressed && self.compression.is_none() {
            return Err((
                ErrorCode::ProtocolError,
                "COMPRESSED flag without negotiated compression".into(),
            ));
        }
        let kind = Kind::of(header.ty);
        let max_message = self.config.max_message_size as usize;
        let fragmented = ch.reassembly.is_some();
        // A message of one frame is bounded by max_message_size too: max_frame_size may be the
        // larger of the two, and only fragments were checked (found by fuzz/handshake_server:
        // an 1800-byte single-frame message was delivered under a 1024-byte message limit).
        if payload.len() > max_message {
            return Err((ErrorCode::MessageTooLarge, "message too large".into()));
        }
        let message = match ch.reassembly.take() {
            None if !more => Some((header.id, header.codec, compressed, payload)),
            None => {
                if payload.len() > max_message {
                    return Err((ErrorCode::MessageTooLarge, "message too large".into()));
                }
                let mut buf = BytesMut::new();
                buf.extend_from_slice(&payload);
                ch.reassembly = Some(Reassembly {
                    compressed,
                    kind,
                    id: header.id,
                    codec: header.codec,
                    buf,
                });
                None
            }
            Some(mut r) => {
                if r.id != header.id
                    || r.codec != header.codec
                    || r.kind != kind
                    || r.compressed != compressed
                {
                    return Err((
                        ErrorCode::ProtocolError,
                        "fragment type, id or codec differs from its message".into(),
                    ));
                }
                if r.buf.len() + payload.len() > max_message {
                    return Err((ErrorCode::MessageTooLarge, "message too large".into()));
                }
                r.buf.extend_from_slice(&payload);
                if more {
                    ch.reassembly = Some(r);
                    None
                } else {
                    self.reassembly_bytes -= r.buf.len() - payload.len();
                    Some((r.id, r.codec, r.compressed, r.buf.freeze()))
                }
            }
        };
        match message {
            Some((id, codec, compressed, payload)) => {
                self.stats.messages_received += 1;
                // The last fragment of a data item sent in several went into the reassembly
                // buffer like the others, so its credit goes back at once too, all but one
                // header's worth, held until the application consumes the item. Holding the
                // whole last fragment let completed but unread items pin the window: two peers
                // each writing large messages before reading deadlocked once those last
                // fragments added up to a window (tests/limits.rs in slic). The 20 bytes
                // still bound how many unread items the peer can queue here.
                let credit = if fragmented {
                    self.release(channel, cost - HEADER_LEN as u32);
                    HEADER_LEN as u32
                } else {
                    cost
                };
                self.events.push_back(Event::Message(IncomingMessage {
                    compressed,
                    kind,
                    channel,
                    id,
                    codec,
                    payload,
                    credit,
                }));
            }
            None => {
                // A non-final fragment: the reassembly buffer now holds it, so its credit goes
                // back at once (a message may be larger than the window); the reassembly budget
                // bounds the memory instead.
                self.reassembly_bytes += cost as usize - HEADER_LEN;
                if self.reassembly_bytes > self.config.max_reassembly {
                    return Err((
                        ErrorCode::MessageTooLarge,
                        "reassembly budget exceeded".into(),
                    ));
                }
                self.release(channel, cost);
            }
        }
        Ok(())
    }

    fn handle_channel_open(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        if payload.len() > MAX_LABEL_LEN {
            return Err((ErrorCode::ProtocolError, "channel label too long".into()));
        }
        let label = std::str::from_utf8(payload)
            .map_err(|_| {
                (
                    ErrorCode::ProtocolError,
                    "channel label not UTF-8".to_owned(),
                )
            })?
            .to_owned();
        let id = header.channel;
        let peer_parity = match self.side {
            Side::Server => 1,
            Side::Client => 0,
        };
        if id == 0 || id % 2 != peer_parity || id <= self.last_peer_channel {
            return Err((
                ErrorCode::ProtocolError,
                format!("bad channel id {id} in open"),
            ));
        }
        self.last_peer_channel = id;
        let max = self.config.max_channels;
        // Count only the channels the peer opened (open, refused or half-closed): our own
        // channels and channel 0 are not the peer's doing. Counting `self.channels` made a
        // side holding many channels of its own kill a peer that opened a single one, and
        // allowed one channel more than "more than twice max_channels" (PROTOCOL.md).
        if u64::from(self.peer_channels) >= 2 * u64::from(max) {
            return Err((
                ErrorCode::ChannelLimit,
                "too many channels held open".into(),
            ));
        }
        let send_credit = self.peer.as_ref().map_or(0, |p| p.channel_window);
        let mut state =
            ChannelState::new(Initiator::Remote, send_credit, self.config.channel_window);
        if self.peer_channels >= max {
            debug!(channel = id, "refusing channel: limit reached");
            state.local = LocalHalf::Closing(ErrorCode::ChannelRefused);
            state.discard = true;
            state.refused = true;
            state.in_ready = true;
            self.ready.push_back(id);
        } else {
            self.events
                .push_back(Event::ChannelOpened { channel: id, label });
        }
        self.channels.insert(id, state);
        self.peer_channels += 1;
        Ok(())
    }

    fn handle_channel_close(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        let id = header.channel;
        if id == 0 {
            return Err((ErrorCode::ProtocolError, "close of channel 0".into()));
        }
        let code = payload
            .first_chunk::<4>()
            .filter(|_| payload.len() == 4)
            .map(|b| ErrorCode::from_u32(u32::from_be_bytes(*b)))
            .ok_or_else(|| {
                (
                    ErrorCode::ProtocolError,
                    "CHANNEL_CLOSE payload must be 4 bytes".into(),
                )
            })?;
        let Some(ch) = self.channels.get_mut(&id) else {
            return Err((
                ErrorCode::ChannelClosed,
                format!("close of unknown channel {id}"),
            ));
        };
        if ch.remote_closed {
            return Err((
                ErrorCode::ChannelClosed,
                format!("second close of channel {id}"),
            ));
        }
        if code == ErrorCode::ChannelRefused {
            debug!(channel = id, "peer refused channel");
        }
        ch.remote_closed = true;
        ch.discard = true;
        let dropped: usize = ch
            .queue
            .drain(..)
            .map(|m| HEADER_LEN + m.payload.len() - m.offset)
            .sum();
        self.queued_bytes -= dropped;
        if let Some(r) = ch.reassembly.take() {
            self.reassembly_bytes -= r.buf.len();
        }
        match ch.local {
            LocalHalf::Open => {
                ch.local = LocalHalf::Closing(ErrorCode::NoError);
                ch.remote_initiated = true;
                if !ch.in_ready {
                    ch.in_ready = true;
                    self.ready.push_back(id);
                }
                self.events.push_back(Event::ChannelClosed {
                    channel: id,
                    initiator: Initiator::Remote,
                });
            }
            LocalHalf::Closing(_) => {
                if !ch.in_ready {
                    ch.in_ready = true;
                    self.ready.push_back(id);
                }
            }
            LocalHalf::Closed => self.remove_channel(id),
        }
        Ok(())
    }

    fn handle_window_update(
        &mut self,
        header: Header,
        payload: &[u8],
    ) -> Result<(), (ErrorCode, String)> {
        let inc = payload
            .first_chunk::<4>()
            .filter(|_| payload.len() == 4)
            .map(|b| u32::from_be_bytes(*b))
            .ok_or_else(|| {
                (
                    ErrorCode::ProtocolError,
                    "WINDOW_UPDATE payload must be 4 bytes".into(),
                )
            })?;
        if inc == 0 || inc > crate::handshake::MAX_WINDOW {
            return Err((ErrorCode::ProtocolError, "bad window increment".into()));
        }
        let overflow = || (ErrorCode::FlowControlError, "window overflow".to_owned());
        if header.flags & flags::CONNECTION != 0 {
            self.conn_send_credit = self
                .conn_send_credit
                .checked_add(inc)
                .filter(|w| *w <= crate::handshake::MAX_WINDOW)
                .ok_or_else(overflow)?;
            return Ok(());
        }
        // An update for a closed or unknown channel can race with its close: ignore it.
        if let Some(ch) = self.channels.get_mut(&header.channel) {
            ch.send_credit = ch
                .send_credit
                .checked_add(inc)
                .filter(|w| *w <= crate::handshake::MAX_WINDOW)
                .ok_or_else(overflow)?;
            if !ch.in_ready && ch.has_work() {
                ch.in_ready = true;
                self.ready.push_back(header.channel);
            }
        }
        Ok(())
    }

    // ----- timers --------------------------------------------------------------------------

    /// The next instant at which [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Handshake => Some(self.handshake_deadline),
            State::Open | State::Draining { .. } => {
                let hb = self.heartbeat?;
                Some((self.last_send + hb).min(self.last_recv + hb * 3))
            }
            State::Closed => None,
        }
    }

    /// Lets timers fire: the handshake deadline, keepalive PINGs and the idle cut-off. Safe to
    /// call at any time, with any instant (also one earlier than before).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Handshake if now >= self.handshake_deadline => {
                self.send_error(ErrorCode::HandshakeTimeout, "handshake timed out");
                self.terminate(ConnectionError::HandshakeTimeout);
            }
            State::Open | State::Draining { .. } => {
                let Some(hb) = self.heartbeat else { return };
                if now >= self.last_recv + hb * 3 {
                    self.send_error(ErrorCode::KeepaliveTimeout, "nothing received");
                    self.terminate(ConnectionError::KeepaliveTimeout);
                } else if now >= self.last_send + hb {
                    self.ping_seq += 1;
                    self.ping_sent = Some((self.ping_seq, now));
                    self.push_control(FrameType::Ping, 0, self.ping_seq, Bytes::new());
                    // Count the queued PING as sent so the timer does not fire again at once.
                    self.last_send = now;
                }
            }
            _ => {}
        }
    }

    // ----- output --------------------------------------------------------------------------

    /// The next frame to write, or `None` when nothing can be sent now. Control frames come
    /// first; messages of different channels are interleaved frame by frame, each within the
    /// flow-control windows and the peer's maximum frame size.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let mut t = self.next_transmit()?;
        let handshake =
            t.header[1] == FrameType::Hello as u8 || t.header[1] == FrameType::Welcome as u8;
        if self.checksum && !handshake {
            t.trailer = Some(checksum(&t.header, &t.payload));
        }
        self.last_send = now;
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += t.len() as u64;
        Some(t)
    }

    fn next_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        if !matches!(self.state, State::Open | State::Draining { .. }) {
            return None;
        }
        let max_frame = self.peer.as_ref().map_or(0, |p| p.max_frame_size) as usize;
        // Each iteration either returns or removes one entry from `ready`, so this ends.
        while let Some(id) = self.ready.pop_front() {
            let Some(ch) = self.channels.get_mut(&id) else {
                continue;
            };
            ch.in_ready = false;
            if let Some(msg) = ch.queue.front_mut() {
                let remaining = msg.payload.len() - msg.offset;
                let credit = ch.send_credit.min(self.conn_send_credit) as usize;
                let needed = HEADER_LEN + remaining.min(1);
                if credit < needed {
                    if self.conn_send_credit as usize >= needed {
                        // Blocked on this channel's window: WINDOW_UPDATE puts it back.
                        continue;
                    }
                    // Blocked on the connection window: keep the order, stop for now.
                    ch.in_ready = true;
                    self.ready.push_front(id);
                    return None;
                }
                let chunk = remaining.min(max_frame).min(credit - HEADER_LEN);
                let more = chunk < remaining;
                // A message sent in one frame hands its payload over: a slice would take a
                // reference and the queue's copy drop one, two atomic operations per
                // message on a count the sender's thread touches too.
                let payload = if msg.offset == 0 && !more {
                    std::mem::take(&mut msg.payload)
                } else {
                    msg.payload.slice(msg.offset..msg.offset + chunk)
                };
                msg.offset += chunk;
                let header = Header {
                    ty: msg.kind.frame_type(),
                    flags: if more { flags::MORE } else { 0 }
                        | if msg.compressed { flags::COMPRESSED } else { 0 },
                    codec: msg.codec,
                    channel: id,
                    id: msg.id,
                    len: chunk as u32,
                };
                let cost = frame_cost(chunk);
                ch.send_credit -= cost;
                self.conn_send_credit -= cost;
                self.queued_bytes -= chunk;
                if !more {
                    ch.queue.pop_front();
                    self.queued_bytes -= HEADER_LEN;
                }
                if ch.has_work() {
                    ch.in_ready = true;
                    self.ready.push_back(id);
                }
                return Some(Transmit::new(header, payload));
            }
            if let LocalHalf::Closing(code) = ch.local {
                ch.local = LocalHalf::Closed;
                let remote_closed = ch.remote_closed;
                let t = Transmit::new(
                    Header::control(FrameType::ChannelClose, id, 0, 4),
                    Bytes::copy_from_slice(&code.to_u32().to_be_bytes()),
                );
                if remote_closed {
                    self.remove_channel(id);
                }
                return Some(t);
            }
        }
        self.maybe_finish_drain();
        self.control.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- internals -----------------------------------------------------------------------

    fn local_hello(&self, version: u8) -> Hello {
        let c = &self.config;
        Hello {
            version,
            codecs: c.codecs,
            max_frame_size: c.max_frame_size,
            max_message_size: c.max_message_size,
            channel_window: c.channel_window,
            connection_window: c.connection_window,
            max_channels: c.max_channels,
            heartbeat_ms: u32::try_from(c.heartbeat.as_millis()).unwrap_or(u32::MAX),
            compression: c.compression.iter().map(|c| *c as u8).collect(),
            checksum: c.checksum,
            name: c.name.clone(),
        }
    }

    fn push_control(&mut self, ty: FrameType, channel: u32, id: u64, payload: Bytes) {
        let header = Header::control(ty, channel, id, payload.len() as u32);
        self.control.push_back(Transmit::new(header, payload));
    }

    fn remove_channel(&mut self, id: u32) {
        if let Some(ch) = self.channels.remove(&id) {
            match ch.opened_by {
                Initiator::Remote => self.peer_channels -= 1,
                _ => self.local_channels -= 1,
            }
            // Report the end of a close this side initiated, whoever opened the channel. A
            // close the peer initiated was reported (Remote) when its CHANNEL_CLOSE arrived;
            // keying this on `opened_by` reported the opener twice (Remote, then Local) and
            // the closer of a peer-opened channel never. A refused channel was never reported
            // as opened, so its end is not reported either.
            if !ch.refused && !ch.remote_initiated {
                self.events.push_back(Event::ChannelClosed {
                    channel: id,
                    initiator: Initiator::Local,
                });
            }
        }
    }

    fn maybe_finish_drain(&mut self) {
        if let State::Draining { code, reason } = &self.state
            && self.queued_bytes == 0
        {
            let (code, reason) = (*code, reason.clone());
            self.push_control(FrameType::GoAway, 0, 0, close_payload(code, &reason));
            self.terminate(ConnectionError::LocallyClosed { code });
        }
    }

    fn send_error(&mut self, code: ErrorCode, reason: &str) {
        self.control.clear();
        self.push_control(FrameType::Error, 0, 0, close_payload(code, reason));
    }

    fn violation(&mut self, code: ErrorCode, reason: String) -> ConnectionError {
        debug!(%code, %reason, "protocol violation by peer");
        if code == ErrorCode::EnhanceYourCalm {
            // A flood is not a malformed stream: the peer gets a GOAWAY saying why.
            self.control.clear();
            self.push_control(FrameType::GoAway, 0, 0, close_payload(code, &reason));
        } else {
            self.send_error(code, &reason);
        }
        let err = ConnectionError::ProtocolViolation { code, reason };
        self.terminate(err.clone());
        err
    }

    fn drop_queues(&mut self) {
        for ch in self.channels.values_mut() {
            ch.queue.clear();
            ch.reassembly = None;
        }
        self.ready.clear();
        self.queued_bytes = 0;
        self.reassembly_bytes = 0;
    }

    fn terminate(&mut self, err: ConnectionError) {
        if self.is_closed() {
            return;
        }
        self.drop_queues();
        self.state = State::Closed;
        self.events.push_back(Event::Closed(err));
    }
}

fn expect_empty(payload: &[u8]) -> Result<(), (ErrorCode, String)> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err((ErrorCode::ProtocolError, "payload must be empty".into()))
    }
}

fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn close_payload(code: ErrorCode, reason: &str) -> Bytes {
    let reason = truncate_reason(reason);
    let mut b = BytesMut::with_capacity(4 + reason.len());
    b.put_u32(code.to_u32());
    b.put_slice(reason.as_bytes());
    b.freeze()
}

fn parse_close_payload(payload: &[u8]) -> Result<(ErrorCode, String), (ErrorCode, String)> {
    let (code, reason) = payload.split_first_chunk::<4>().ok_or_else(|| {
        (
            ErrorCode::ProtocolError,
            "close payload shorter than 4 bytes".into(),
        )
    })?;
    let reason = &reason[..reason.len().min(MAX_REASON_LEN)];
    Ok((
        ErrorCode::from_u32(u32::from_be_bytes(*code)),
        String::from_utf8_lossy(reason).into_owned(),
    ))
}
