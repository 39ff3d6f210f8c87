//! The checks behind the cargo-fuzz targets of `fuzz/`, shared with `tests/corpus.rs`.
//!
//! Each target in `fuzz/fuzz_targets/` includes this file with `#[path]` and calls one entry
//! point; `tests/corpus.rs` replays the committed corpus (`fuzz/corpus/<target>/`) and the kept
//! crashes (`fuzz/regressions/<target>/`) through the same entry points on every `cargo test`.
//! A broken invariant panics, which is what the fuzzer reports as a crash.
//!
//! - [`check_frame_decoder`]: a byte stream through [`Decoder`], whole and cut in arbitrary
//!   chunks, under three payload limits, without and with CRC-32 trailers.
//! - [`check_handshake`]: bytes fed to a fresh server as if from a client, or to a client after
//!   its HELLO as if from a server, under two configurations (small limits and compression;
//!   frames larger than messages and checksums).
//! - [`run_connection_ops`]: a client and a server joined by in-memory buffers, driven by an
//!   arbitrary sequence of [`Operation`]s, with the invariants two honest peers must keep
//!   (limits, compression and checksums are part of the input).
//!
//! Only slic-proto's public API is used.

// Each fuzz target uses one entry point; the corpus replay uses them all.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use slic_proto::frame::{CHECKSUM_LEN, HANDSHAKE_MAX_PAYLOAD, checksum};
use slic_proto::handshake::{MAX_FRAME_SIZE, MAX_WINDOW};
use slic_proto::{
    CodecId, Compression, Config, Connection, ConnectionError, DecodeError, Decoder, ErrorCode,
    Event, Frame, FrameType, HEADER_LEN, Header, Hello, Initiator, Kind, MAX_LABEL_LEN, OpenError,
    SendError, Side, Transmit,
};

/// Most frames one `poll_transmit` loop may yield before it is declared endless.
const TRANSMIT_CAP: usize = 1_000_000;
/// Most pump rounds one `drive` may take before it is declared a livelock.
const DRIVE_CAP: usize = 10_000;
/// Most timer firings one clock advance may take before it is declared a busy timer.
const TIMER_CAP: usize = 10_000;
/// Most release-and-drive rounds the final settling may take.
const SETTLE_CAP: usize = 1_000;
/// Longest a GOAWAY/ERROR payload may be: code and a reason of at most 256 bytes.
const MAX_CLOSE_PAYLOAD: usize = 4 + 256;

// ----- shared helpers ------------------------------------------------------------------------

/// Deterministic pseudo-random numbers derived from the input (splitmix64), so that replaying
/// an input takes exactly the path the fuzzer took.
struct Rng(u64);

impl Rng {
    fn from_input(data: &[u8], salt: u64) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ salt;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self(h)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Where to cut `data` into chunks: the end of every chunk, increasing, the last one
/// `data.len()`. Short inputs are sometimes fed byte by byte.
fn chunk_ends(data: &[u8], salt: u64) -> Vec<usize> {
    let mut rng = Rng::from_input(data, salt);
    let mut ends: Vec<usize> = if data.len() <= 512 && rng.below(4) == 0 {
        (1..=data.len()).collect()
    } else {
        let cuts = rng.below(16) + 1;
        (0..cuts).map(|_| rng.below(data.len() + 1)).collect()
    };
    ends.push(data.len());
    ends.sort_unstable();
    ends.dedup();
    ends
}

/// Checks a transmit and decodes it: every transmit must be exactly one valid frame, with a
/// correct CRC-32 trailer if it has one (never on HELLO or WELCOME).
fn transmit_frame(t: &Transmit) -> Frame {
    let header = Header::decode(&t.header, u32::MAX)
        .unwrap_or_else(|e| panic!("transmitted an invalid frame header: {e}"));
    assert_eq!(
        header.len as usize,
        t.payload.len(),
        "header length differs from the payload length"
    );
    let trailer = t.trailer.map_or(0, |_| CHECKSUM_LEN);
    assert_eq!(t.len(), HEADER_LEN + t.payload.len() + trailer);
    assert!(!t.is_empty());
    if let Some(trailer) = t.trailer {
        assert_eq!(trailer, checksum(&t.header, &t.payload), "wrong trailer");
        assert!(
            !matches!(header.ty, FrameType::Hello | FrameType::Welcome),
            "trailer on {:?}",
            header.ty
        );
    }
    let mut bytes = BytesMut::new();
    t.write_to(&mut bytes);
    assert_eq!(bytes.len(), t.len());
    Frame {
        header,
        payload: t.payload.clone(),
    }
}

/// Checks the payload of a frame a connection transmitted against PROTOCOL.md, section 3.
fn check_control_payload(who: &str, frame: &Frame) {
    let p = &frame.payload;
    match frame.header.ty {
        FrameType::Error | FrameType::GoAway => assert!(
            (4..=MAX_CLOSE_PAYLOAD).contains(&p.len()),
            "{who}: close payload of {} bytes",
            p.len()
        ),
        FrameType::WindowUpdate => {
            let inc = p
                .first_chunk::<4>()
                .filter(|_| p.len() == 4)
                .map(|b| u32::from_be_bytes(*b))
                .unwrap_or_else(|| panic!("{who}: WINDOW_UPDATE payload of {} bytes", p.len()));
            assert!(
                (1..=MAX_WINDOW).contains(&inc),
                "{who}: WINDOW_UPDATE increment {inc}"
            );
        }
        FrameType::ChannelClose => {
            assert_eq!(p.len(), 4, "{who}: CHANNEL_CLOSE payload");
            assert_ne!(frame.header.channel, 0, "{who}: CHANNEL_CLOSE on channel 0");
        }
        FrameType::ChannelOpen => {
            assert!(
                p.len() <= MAX_LABEL_LEN,
                "{who}: label of {} bytes",
                p.len()
            );
            assert!(std::str::from_utf8(p).is_ok(), "{who}: label not UTF-8");
        }
        FrameType::Ping | FrameType::Pong | FrameType::Cancel => {
            assert!(p.is_empty(), "{who}: {:?} with a payload", frame.header.ty)
        }
        _ => {}
    }
}

/// A deterministic payload for message `id`, so that the receiver can check every byte.
fn pattern(id: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (id.wrapping_mul(131).wrapping_add(i as u64) % 251) as u8)
        .collect()
}

// ----- frame_decoder -------------------------------------------------------------------------

/// How decoding a stream ended.
#[derive(Debug, PartialEq)]
enum StreamEnd {
    /// More bytes are needed; this many are buffered.
    NeedMore(usize),
    /// The decoder refused a header.
    Failed(DecodeError),
}

/// Feeds `data` to a fresh decoder in the chunks ending at `ends`, decoding after each one,
/// and checks every step.
fn decode_stream(
    data: &[u8],
    (max, trailers): (u32, bool),
    ends: &[usize],
) -> (Vec<Frame>, StreamEnd) {
    let mut decoder = Decoder::new(max);
    decoder.set_checksum(trailers);
    assert_eq!(decoder.max_payload(), max);
    let trailer = if trailers { CHECKSUM_LEN } else { 0 };
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    // Stream offset of `buf[0]`.
    let mut at = 0;
    for &end in ends {
        buf.extend_from_slice(&data[fed..end]);
        fed = end;
        loop {
            let before = buf.clone();
            let capacity = buf.capacity();
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let n = HEADER_LEN + frame.payload.len() + trailer;
                    check_decoded_frame(&frame, max, trailers, &data[at..]);
                    assert_eq!(&buf[..], &before[n..], "decode took more than its frame");
                    at += n;
                    frames.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) must leave the buffer untouched");
                    if let Some(raw) = buf.first_chunk::<HEADER_LEN>() {
                        let header = Header::decode(raw, max)
                            .expect("Ok(None) for a header that does not decode");
                        let total = HEADER_LEN + header.len as usize + trailer;
                        assert!(buf.len() < total, "Ok(None) with a whole frame buffered");
                        // Room is reserved for the declared frame only, which the limit bounds.
                        assert!(
                            buf.capacity() <= capacity.max(4 * total).max(1 << 17),
                            "reserved {} bytes for a frame of {total}",
                            buf.capacity()
                        );
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(
                        buf, before,
                        "a refused header must leave the buffer untouched"
                    );
                    assert_eq!(
                        buf.capacity(),
                        capacity,
                        "memory reserved for a refused frame"
                    );
                    let raw = buf
                        .first_chunk::<HEADER_LEN>()
                        .expect("an error before a whole header arrived");
                    if e == DecodeError::ChecksumMismatch {
                        // Decided on the whole frame: a good header with a trailer that does
                        // not match the header and payload.
                        assert!(trailers, "checksum error without checksums");
                        let header = Header::decode(raw, max).expect("header of a bad trailer");
                        let body = HEADER_LEN + header.len as usize;
                        assert!(buf.len() >= body + CHECKSUM_LEN, "checked a partial frame");
                        assert_ne!(
                            &buf[body..body + CHECKSUM_LEN],
                            &checksum(&buf[..HEADER_LEN], &buf[HEADER_LEN..body])[..],
                            "a matching trailer refused"
                        );
                    } else {
                        assert_eq!(
                            Header::decode(raw, max),
                            Err(e.clone()),
                            "the error is not decided by the header alone"
                        );
                    }
                    let _ = ErrorCode::from(&e);
                    return (frames, StreamEnd::Failed(e));
                }
            }
        }
    }
    (frames, StreamEnd::NeedMore(buf.len()))
}

/// A decoded frame obeys its limit and the header rules, and re-encodes (with its trailer) to
/// the bytes it was decoded from (`stream` starts at the frame).
fn check_decoded_frame(frame: &Frame, max: u32, trailers: bool, stream: &[u8]) {
    let h = frame.header;
    assert_eq!(
        h.len as usize,
        frame.payload.len(),
        "length differs from payload"
    );
    assert!(
        h.len <= max,
        "frame of {} bytes passed a limit of {max}",
        h.len
    );
    let mut out = BytesMut::new();
    frame.encode_into(&mut out);
    if trailers {
        let sum = checksum(&out[..HEADER_LEN], &out[HEADER_LEN..]);
        out.extend_from_slice(&sum);
    }
    assert_eq!(
        &out[..],
        &stream[..out.len()],
        "frame does not re-encode to its bytes"
    );
    assert_eq!(Header::decode(&h.encode(), max), Ok(h));
    assert_eq!(FrameType::from_u8(h.ty as u8), Some(h.ty));
    assert!(!h.ty.is_reserved(), "reserved type {:?} decoded", h.ty);
    assert_eq!(
        h.flags & !h.ty.allowed_flags(),
        0,
        "undefined flags decoded"
    );
    assert_eq!(CodecId::from_u8(h.codec as u8), Some(h.codec));
    if !h.ty.is_data() {
        assert_eq!(h.codec, CodecId::Raw, "codec on a {:?}", h.ty);
    }
}

/// `frame_decoder`: arbitrary bytes through [`Decoder`], under the handshake limit, a middle one
/// and the largest a peer may declare, without and with CRC-32 trailers. Never panics; decoding
/// does not depend on how the bytes were cut; every frame re-encodes to the same bytes; errors
/// are decided from the header alone (a bad trailer from its whole frame); a larger limit
/// decodes at least the frames a smaller one did.
pub(crate) fn check_frame_decoder(data: &[u8]) {
    let modes = [
        (HANDSHAKE_MAX_PAYLOAD, false),
        (64 << 10, false),
        (MAX_FRAME_SIZE, false),
        (HANDSHAKE_MAX_PAYLOAD, true),
        (MAX_FRAME_SIZE, true),
    ];
    let mut smaller: Option<(Vec<Frame>, StreamEnd)> = None;
    for (salt, mode) in modes.into_iter().enumerate() {
        if mode.0 == HANDSHAKE_MAX_PAYLOAD {
            smaller = None;
        }
        let whole = decode_stream(data, mode, &[data.len()]);
        let split = decode_stream(data, mode, &chunk_ends(data, salt as u64));
        assert_eq!(whole, split, "decoding depends on how the bytes were cut");
        if let Some((frames, end)) = &smaller {
            assert!(whole.0.starts_with(frames), "a larger limit lost frames");
            if !matches!(end, StreamEnd::Failed(DecodeError::FrameTooLarge { .. })) {
                assert_eq!(
                    (&whole.0, &whole.1),
                    (frames, end),
                    "the limit changed more than FRAME_TOO_LARGE"
                );
            }
        }
        smaller = Some(whole);
    }
}

// ----- handshake_server, handshake_client ----------------------------------------------------

/// The configurations the handshake targets run every input against, with the frame limit
/// each declares. `small`: small limits, so that flow control, fragmentation, the channel
/// limit and the reassembly budget are within the fuzzer's reach; zstd and lz4 accepted.
/// `wide`: frames larger than messages, windows larger than frames, one channel, no keepalive
/// of its own, frame checksums wanted.
fn handshake_configs() -> [(&'static str, Config, u32); 2] {
    let mut small = Config::default();
    small.name("small").expect("valid name");
    small.max_frame_size(1024).expect("valid");
    small.max_message_size(2048).expect("valid");
    small.channel_window(1024).expect("valid");
    small.connection_window(2048).expect("valid");
    small.max_channels(2);
    small.max_reassembly(3000);
    small.heartbeat(Duration::from_millis(500)).expect("valid");
    small
        .compression(&[Compression::Zstd, Compression::Lz4])
        .expect("valid");
    let mut wide = Config::default();
    wide.name("wide").expect("valid name");
    wide.max_frame_size(4096).expect("valid");
    wide.max_message_size(1024).expect("valid");
    wide.channel_window(16_384).expect("valid");
    wide.connection_window(16_384).expect("valid");
    wide.max_channels(1);
    wide.heartbeat(Duration::ZERO).expect("valid");
    wide.checksum(true);
    [("small", small, 1024), ("wide", wide, 4096)]
}

/// What one connection did with some input.
struct Trace {
    conn: Connection,
    config: Arc<Config>,
    /// The frame limit `config` declares.
    max_frame: u32,
    /// When the timers were last given a chance to fire.
    later: Instant,
    events: Vec<Event>,
    sent: Vec<Frame>,
    errors: Vec<ConnectionError>,
}

fn poll_all_transmits(conn: &mut Connection, now: Instant, sent: &mut Vec<Frame>) {
    for _ in 0..TRANSMIT_CAP {
        let Some(t) = conn.poll_transmit(now) else {
            return;
        };
        sent.push(transmit_frame(&t));
    }
    panic!("poll_transmit never returns None");
}

/// Polls every event, handing back each message's credit like an eager application.
fn poll_all_events(conn: &mut Connection, events: &mut Vec<Event>) {
    while let Some(ev) = conn.poll_event() {
        if let Event::Message(m) = &ev {
            conn.release(m.channel, m.credit);
        }
        events.push(ev);
    }
}

/// Feeds `data` in the chunks ending at `ends`. With `interleave`, transmits and events are
/// drained (and credit released) after every chunk, as a driver would; without, only at the
/// end, so that the connection's state depends on the input alone. Then time jumps an hour
/// ahead: the handshake deadline or the keepalive must end the connection.
fn feed(
    side: Side,
    (config, max_frame): (&Config, u32),
    data: &[u8],
    ends: &[usize],
    interleave: bool,
) -> Trace {
    let now = Instant::now();
    let config = Arc::new(config.clone());
    let mut t = Trace {
        conn: Connection::new(config.clone(), side, now),
        config,
        max_frame,
        later: now + Duration::from_secs(3600),
        events: Vec::new(),
        sent: Vec::new(),
        errors: Vec::new(),
    };
    let conn = &mut t.conn;
    // A client's HELLO goes out before anything can arrive.
    poll_all_transmits(conn, now, &mut t.sent);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    for &end in ends {
        buf.extend_from_slice(&data[fed..end]);
        fed = end;
        if let Err(e) = conn.handle_input(now, &mut buf) {
            t.errors.push(e);
        }
        if conn.is_closed() {
            assert!(buf.is_empty(), "input kept after close");
        }
        if interleave {
            poll_all_transmits(conn, now, &mut t.sent);
            poll_all_events(conn, &mut t.events);
        }
    }
    poll_all_transmits(conn, now, &mut t.sent);
    poll_all_events(conn, &mut t.events);
    let later = t.later;
    conn.handle_timeout(later);
    poll_all_transmits(conn, later, &mut t.sent);
    poll_all_events(conn, &mut t.events);
    t
}

/// What must hold for any input, whatever the peer sent.
fn check_trace(side: Side, t: &mut Trace) {
    let who = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    let peer_parity = match side {
        Side::Client => 0,
        Side::Server => 1,
    };
    let max_frame = t.max_frame;
    let mut connected = false;
    let mut closed: Option<&ConnectionError> = None;
    let mut opened: Vec<u32> = Vec::new();
    let mut channel_closed: HashSet<u32> = HashSet::new();
    for (i, ev) in t.events.iter().enumerate() {
        assert!(closed.is_none(), "{who}: event after Closed: {ev:?}");
        match ev {
            Event::Connected(hello) => {
                assert!(!connected && i == 0, "{who}: Connected not first or twice");
                connected = true;
                assert_eq!(t.conn.peer(), Some(&**hello), "{who}: peer() differs");
                assert_eq!(Hello::decode(&hello.encode()).as_ref(), Ok(&**hello));
            }
            Event::Message(m) => {
                assert!(connected, "{who}: message before Connected");
                assert!(
                    m.payload.len() <= t.config.message_size_limit() as usize,
                    "{who}: message of {} bytes delivered",
                    m.payload.len()
                );
                assert!(
                    (HEADER_LEN as u32..=HEADER_LEN as u32 + max_frame).contains(&m.credit),
                    "{who}: credit {}",
                    m.credit
                );
                assert!(
                    m.channel == 0
                        || (opened.contains(&m.channel) && !channel_closed.contains(&m.channel)),
                    "{who}: message on channel {} that is not open",
                    m.channel
                );
            }
            Event::ChannelOpened { channel, label } => {
                assert!(connected, "{who}: channel opened before Connected");
                assert_eq!(channel % 2, peer_parity, "{who}: channel {channel} parity");
                assert!(
                    opened.last().is_none_or(|last| last < channel),
                    "{who}: channel {channel} opened out of order"
                );
                assert!(label.len() <= MAX_LABEL_LEN);
                opened.push(*channel);
            }
            Event::ChannelClosed { channel, initiator } => {
                assert!(
                    opened.contains(channel),
                    "{who}: close of unknown {channel}"
                );
                assert!(
                    channel_closed.insert(*channel),
                    "{who}: channel {channel} closed twice"
                );
                // This side never closes a channel itself, and a refused one is not reported.
                assert_eq!(*initiator, Initiator::Remote, "{who}: channel {channel}");
            }
            Event::Cancel { .. } => assert!(connected, "{who}: cancel before Connected"),
            Event::Closed(e) => closed = Some(e),
            other => panic!("{who}: unexpected event {other:?}"),
        }
    }
    assert!(t.errors.len() <= 1, "{who}: handle_input failed twice");
    let Some(closed) = closed else {
        // Only an open connection whose keepalive (if any) is longer than the hour outlives it.
        assert!(
            t.errors.is_empty(),
            "{who}: handle_input failed, not closed"
        );
        assert!(
            t.conn.is_open(),
            "{who}: neither open nor closed an hour later"
        );
        assert!(
            t.conn.poll_timeout().is_none_or(|d| d > t.later),
            "{who}: a timer due before the hour did not fire"
        );
        check_sent(side, t, connected, None);
        return;
    };
    assert!(t.conn.is_closed() && !t.conn.is_open());
    assert_eq!(
        t.conn.poll_timeout(),
        None,
        "{who}: timer armed after close"
    );
    assert_eq!(
        t.conn.send_message(0, 0, CodecId::Raw, Bytes::new()),
        Err(SendError::Closed),
        "{who}: send accepted after close"
    );
    assert_eq!(t.conn.open_channel(), Err(OpenError::Closed));
    match (t.errors.first(), closed) {
        (Some(e), closed) => assert_eq!(e, closed, "{who}: error and Closed differ"),
        (None, ConnectionError::ProtocolViolation { .. }) => {
            panic!("{who}: violation not returned by handle_input")
        }
        (None, _) => {}
    }
    check_sent(side, t, connected, Some(closed));
}

/// What the connection under test transmitted: one ERROR, last, for a violation or a timeout;
/// nothing it was not asked for.
fn check_sent(side: Side, t: &Trace, connected: bool, closed: Option<&ConnectionError>) {
    let who = match side {
        Side::Client => "client",
        Side::Server => "server",
    };
    // The frame that must end what this side sent, if any: ERROR for a violation or a
    // timeout, GOAWAY for a flood of control frames (ENHANCE_YOUR_CALM).
    let last_frame = match closed {
        Some(ConnectionError::ProtocolViolation {
            code: ErrorCode::EnhanceYourCalm,
            ..
        }) => Some(FrameType::GoAway),
        Some(
            ConnectionError::ProtocolViolation { .. }
            | ConnectionError::HandshakeTimeout
            | ConnectionError::KeepaliveTimeout,
        ) => Some(FrameType::Error),
        _ => None,
    };
    let closing: Vec<&Frame> = t
        .sent
        .iter()
        .filter(|f| matches!(f.header.ty, FrameType::Error | FrameType::GoAway))
        .collect();
    match (closed, last_frame) {
        (Some(closed), Some(ty)) => {
            assert_eq!(closing.len(), 1, "{who}: {closed}: sent {closing:?}");
            let last = t.sent.last().expect("frames");
            assert_eq!(last.header.ty, ty, "{who}: {ty:?} not last for {closed}");
            let code = u32::from_be_bytes(*last.payload.first_chunk::<4>().expect("code"));
            assert_eq!(
                ErrorCode::from_u32(code),
                closed.code(),
                "{who}: {ty:?} code"
            );
        }
        _ => assert!(closing.is_empty(), "{who}: sent {closing:?} for {closed:?}"),
    }
    for (i, f) in t.sent.iter().enumerate() {
        check_control_payload(who, f);
        match (side, f.header.ty) {
            (Side::Client, FrameType::Hello) => {
                assert_eq!(i, 0, "{who}: HELLO not first");
                let hello = Hello::decode(&f.payload).expect("own HELLO decodes");
                assert_eq!(hello.name, t.config.node_name());
            }
            (Side::Server, FrameType::Welcome) => {
                assert_eq!(i, 0, "{who}: WELCOME not first or twice");
                assert!(connected, "{who}: WELCOME without Connected");
                let welcome = Hello::decode(&f.payload).expect("own WELCOME decodes");
                assert_eq!(welcome.name, t.config.node_name());
                assert!(welcome.compression.len() <= 1, "{who}: WELCOME compression");
            }
            (_, FrameType::Error | FrameType::GoAway) => {}
            (_, FrameType::WindowUpdate | FrameType::ChannelClose | FrameType::Pong) => {
                assert!(connected, "{who}: {:?} before the handshake", f.header.ty)
            }
            (_, FrameType::Ping) => {}
            (_, ty) => panic!("{who}: transmitted {ty:?} though it was never asked to"),
        }
    }
}

/// `handshake_server` (`side` = server: `data` comes from a client) and `handshake_client`
/// (`side` = client, after its HELLO: `data` comes from a server). Never panics; handling does
/// not depend on how the input was cut; events come in a valid order (Connected first, Closed
/// last, nothing on a channel that is not open); a violation is returned, reported and answered
/// with exactly one ERROR of its code, sent last; nothing but WELCOME (server), flow control,
/// channel answers, PONG and ERROR is ever sent; an hour later the connection is closed.
pub(crate) fn check_handshake(side: Side, data: &[u8]) {
    for (name, config, max_frame) in handshake_configs() {
        let config = (&config, max_frame);
        let mut whole = feed(side, config, data, &[data.len()], false);
        let mut split = feed(side, config, data, &chunk_ends(data, 0), false);
        check_trace(side, &mut whole);
        check_trace(side, &mut split);
        assert_eq!(
            format!("{:?}", whole.events),
            format!("{:?}", split.events),
            "{name}: events depend on how the input was cut"
        );
        assert_eq!(whole.errors, split.errors, "{name}");
        assert_eq!(
            whole.sent, split.sent,
            "{name}: frames depend on how the input was cut"
        );
        assert_eq!(whole.conn.stats(), split.conn.stats(), "{name}");
        // A driver that writes and delivers between reads may see other (valid) behaviour.
        let mut interleaved = feed(side, config, data, &chunk_ends(data, 1), true);
        check_trace(side, &mut interleaved);
    }
}

// ----- connection_ops ------------------------------------------------------------------------

/// Limits of one side, each picked from a few values around the interesting boundaries.
#[derive(Arbitrary, Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub(crate) frame: u8,
    pub(crate) message: u8,
    pub(crate) window: u8,
    pub(crate) connection_window: u8,
    pub(crate) channels: u8,
    pub(crate) heartbeat: u8,
    /// Compression accepted: none, lz4, zstd, or zstd then lz4.
    pub(crate) compression: u8,
    /// Whether this side asks for frame checksums.
    pub(crate) checksum: bool,
}

fn pick(sel: u8, values: &[u32]) -> u32 {
    values[usize::from(sel) % values.len()]
}

impl Limits {
    fn compression(self) -> &'static [Compression] {
        const CHOICES: [&[Compression]; 4] = [
            &[],
            &[Compression::Lz4],
            &[Compression::Zstd],
            &[Compression::Zstd, Compression::Lz4],
        ];
        CHOICES[usize::from(self.compression) % CHOICES.len()]
    }

    fn max_frame_size(self) -> u32 {
        pick(self.frame, &[1024, 1500, 4096, 16_384])
    }

    fn config(self, name: &str) -> Config {
        let mut c = Config::default();
        c.name(name).expect("valid name");
        c.max_frame_size(self.max_frame_size()).expect("valid");
        c.max_message_size(pick(self.message, &[1024, 3000, 20_000, 70_000]))
            .expect("valid");
        c.channel_window(pick(self.window, &[1024, 1100, 4096, 65_536]))
            .expect("valid");
        c.connection_window(pick(
            self.connection_window,
            &[1024, 2048, 8192, MAX_WINDOW],
        ))
        .expect("valid");
        c.max_channels(u32::from(self.channels % 5));
        let hb = pick(self.heartbeat, &[0, 250, 1000]);
        c.heartbeat(Duration::from_millis(u64::from(hb)))
            .expect("valid");
        c.compression(self.compression()).expect("valid");
        c.checksum(self.checksum);
        // The default reassembly budget (64 MiB) is far above what these limits let an honest
        // peer have in flight, so hitting it would be a bug.
        c
    }
}

/// One step of the `connection_ops` target. `server` picks the side that acts; channel
/// selectors index the channels that side knows (0, its own, those the peer announced).
#[derive(Arbitrary, Clone, Debug)]
pub(crate) enum Operation {
    /// Queues a message, request or response (`kind` % 3) of `size` bytes (modulo 5000 below
    /// 60000, else as is), flagged as compressed or not (slic-proto does not look inside).
    Send {
        server: bool,
        channel: u8,
        size: u16,
        kind: u8,
        compressed: bool,
    },
    /// Opens a channel with a label of `label` bytes (256 for 255: refused locally).
    OpenChannel { server: bool, label: u8 },
    /// Closes a channel (channel 0 included: a no-op).
    CloseChannel { server: bool, channel: u8 },
    /// Hands back the credit of the `count` oldest delivered messages (all for 0).
    Release { server: bool, count: u8 },
    /// Moves the clock `ms` (at most 10 s) forward, firing timers at their deadlines. The
    /// network is fast: everything in flight is delivered first and after every timer.
    AdvanceClock { ms: u16 },
    /// Hands up to `bytes` of what is in flight toward one side to it (all for 0): frames
    /// arrive cut anywhere.
    Deliver { to_server: bool, bytes: u16 },
    /// Delivers everything both ways until nothing moves.
    Drive,
    /// Appends raw bytes to what is in flight toward one side.
    InjectBytes { to_server: bool, bytes: Vec<u8> },
    /// Appends a frame with a well-formed-looking header (type % 16, codec % 5) and any flags,
    /// channel, id and payload (`payload`, then `pad` zero bytes) to what is in flight toward
    /// one side.
    InjectFrame {
        to_server: bool,
        ty: u8,
        flags: u8,
        codec: u8,
        channel: u8,
        id: u8,
        payload: Vec<u8>,
        pad: u16,
    },
    /// Asks the peer to cancel request `id`.
    CancelRequest { server: bool, id: u64 },
    /// Starts a graceful close with the code `code` % 20.
    Close { server: bool, code: u8 },
}

/// The whole input of `connection_ops`.
#[derive(Arbitrary, Clone, Debug)]
pub(crate) struct OpsInput {
    pub(crate) client: Limits,
    pub(crate) server: Limits,
    pub(crate) ops: Vec<Operation>,
}

/// What a `connection_ops` run went through (used to pick seed inputs).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Summary {
    pub(crate) delivered: usize,
    pub(crate) fragmented: usize,
    pub(crate) channels_opened: usize,
    pub(crate) channels_closed: usize,
    pub(crate) cancels: usize,
    pub(crate) closes: usize,
    pub(crate) injected: bool,
    pub(crate) violations: usize,
    pub(crate) pings: usize,
    pub(crate) partial_deliveries: usize,
}

const CLIENT: usize = 0;
const SERVER: usize = 1;
const NAMES: [&str; 2] = ["client", "server"];
const REASON: &str = "fuzz close";

/// A message a side queued successfully.
#[derive(Debug)]
struct Sent {
    from: usize,
    channel: u32,
    len: usize,
    kind: Kind,
    codec: CodecId,
    compressed: bool,
}

/// One side of the pair: the connection, the bytes in flight toward it, and what its
/// application knows.
struct End {
    conn: Connection,
    config: Arc<Config>,
    /// The limits this side was configured with.
    limits: Limits,
    /// The largest frame payload this side accepts.
    max_frame_size: u32,
    /// Bytes the other side transmitted (or that were injected) not yet handed to `conn`.
    wire: BytesMut,
    /// Bytes handed to `conn`; a partial frame may stay here.
    inbox: BytesMut,
    /// `handle_input`'s error, until the Closed event that must repeat it.
    input_error: Option<ConnectionError>,
    /// An ERROR or GOAWAY went out: nothing may follow it.
    finished: bool,
    frames_sent: u64,
    bytes_sent: u64,
    /// The HELLO or WELCOME this side sent, decoded.
    declared: Option<Hello>,
    connected: bool,
    closed: Option<ConnectionError>,
    /// Channels the application can name: 0, its own, those the peer announced.
    known: Vec<u32>,
    /// Channels this side opened, with their labels, in order.
    opened: Vec<(u32, String)>,
    /// ChannelOpened events, in order.
    announced: Vec<(u32, String)>,
    /// Message ids queued per channel, in order.
    sent_on: HashMap<u32, Vec<u64>>,
    /// Message ids delivered per channel, in order.
    delivered: HashMap<u32, Vec<u64>>,
    /// Channels on which `close_channel` took effect.
    close_called: HashSet<u32>,
    /// ChannelClosed events per channel.
    closed_events: HashMap<u32, Vec<Initiator>>,
    cancels_sent: Vec<u64>,
    cancels_received: Vec<u64>,
    /// Codes of the `close` calls that took effect.
    close_codes: Vec<ErrorCode>,
    /// `close` was called before this side's handshake completed.
    closed_early: bool,
    /// Credit of delivered messages not handed back yet.
    unreleased: VecDeque<(u32, u32)>,
}

impl End {
    fn new(limits: Limits, side: Side, now: Instant) -> Self {
        let name = match side {
            Side::Client => NAMES[CLIENT],
            Side::Server => NAMES[SERVER],
        };
        let config = Arc::new(limits.config(name));
        Self {
            conn: Connection::new(config.clone(), side, now),
            config,
            limits,
            max_frame_size: limits.max_frame_size(),
            wire: BytesMut::new(),
            inbox: BytesMut::new(),
            input_error: None,
            finished: false,
            frames_sent: 0,
            bytes_sent: 0,
            declared: None,
            connected: false,
            closed: None,
            known: vec![0],
            opened: Vec::new(),
            announced: Vec::new(),
            sent_on: HashMap::new(),
            delivered: HashMap::new(),
            close_called: HashSet::new(),
            closed_events: HashMap::new(),
            cancels_sent: Vec::new(),
            cancels_received: Vec::new(),
            close_codes: Vec::new(),
            closed_early: false,
            unreleased: VecDeque::new(),
        }
    }

    /// Whether anyone closed `channel` as far as this side's application knows.
    fn channel_ended(&self, channel: u32) -> bool {
        self.close_called.contains(&channel) || self.closed_events.contains_key(&channel)
    }

    fn closing(&self) -> bool {
        self.closed.is_some() || !self.close_codes.is_empty()
    }
}

/// PROTOCOL.md, section 6: a GOAWAY sent before the sender's handshake completed carries no
/// trailer, so a server that agreed on checksums with the client (on its HELLO) cannot read the
/// client's early GOAWAY: it sees only the end of the stream.
fn blind_to_early_goaway(s: usize, me: &End, other: &End) -> bool {
    s == SERVER && other.closed_early && me.limits.checksum && other.limits.checksum
}

/// A client and a server joined by in-memory buffers, with a hand-driven clock and a model of
/// what two honest applications may expect.
struct Harness {
    now: Instant,
    ends: [End; 2],
    messages: HashMap<u64, Sent>,
    next_id: u64,
    /// Bytes were injected: from then on only the invariants that hold for any peer apply.
    tainted: bool,
    summary: Summary,
}

impl Harness {
    fn new(input: &OpsInput) -> Self {
        let now = Instant::now();
        let mut h = Self {
            now,
            ends: [
                End::new(input.client, Side::Client, now),
                End::new(input.server, Side::Server, now),
            ],
            messages: HashMap::new(),
            next_id: 0,
            tainted: false,
            summary: Summary::default(),
        };
        h.flush(CLIENT);
        h
    }

    /// This side and the other one.
    fn pair(ends: &mut [End; 2], s: usize) -> (&mut End, &mut End) {
        let [client, server] = ends;
        if s == CLIENT {
            (client, server)
        } else {
            (server, client)
        }
    }

    /// Moves everything side `s` transmits onto the wire toward the other side, checking each
    /// frame. Returns whether anything went out.
    fn flush(&mut self, s: usize) -> bool {
        let now = self.now;
        let who = NAMES[s];
        let tainted = self.tainted;
        let (me, other) = Self::pair(&mut self.ends, s);
        let peer = me.conn.peer().cloned();
        let mut any = false;
        for _ in 0..TRANSMIT_CAP {
            let Some(t) = me.conn.poll_transmit(now) else {
                return any;
            };
            any = true;
            let frame = transmit_frame(&t);
            let ty = frame.header.ty;
            assert!(
                !me.finished,
                "{who}: {ty:?} transmitted after ERROR or GOAWAY"
            );
            me.frames_sent += 1;
            me.bytes_sent += t.len() as u64;
            check_control_payload(who, &frame);
            // Trailers once both sides asked and this side is past its handshake.
            let trailers = me.limits.checksum && other.limits.checksum && me.connected;
            let handshake = matches!(ty, FrameType::Hello | FrameType::Welcome);
            if !tainted {
                assert_eq!(
                    t.trailer.is_some(),
                    trailers && !handshake,
                    "{who}: trailer on {ty:?}"
                );
            }
            match ty {
                FrameType::Hello | FrameType::Welcome => {
                    let expected = if s == CLIENT {
                        FrameType::Hello
                    } else {
                        FrameType::Welcome
                    };
                    assert_eq!(ty, expected, "{who}: sent {ty:?}");
                    assert!(me.declared.is_none(), "{who}: second {ty:?}");
                    assert_eq!(me.frames_sent, 1, "{who}: {ty:?} not first");
                    me.declared = Some(Hello::decode(&frame.payload).expect("own hello decodes"));
                }
                FrameType::Message | FrameType::Request | FrameType::Response => {
                    let peer = peer.as_ref().expect("data before the handshake");
                    assert!(
                        frame.payload.len() <= peer.max_frame_size as usize,
                        "{who}: frame of {} bytes, peer's limit {}",
                        frame.payload.len(),
                        peer.max_frame_size
                    );
                    assert_ne!(peer.codecs & frame.header.codec.mask_bit(), 0);
                }
                FrameType::Error | FrameType::GoAway => me.finished = true,
                FrameType::Ping => self.summary.pings += 1,
                _ => {}
            }
            t.write_to(&mut other.wire);
        }
        panic!("{who}: poll_transmit never returns None");
    }

    /// Hands up to `n` bytes in flight (all for 0) to side `s`. Returns whether any moved.
    fn deliver(&mut self, s: usize, n: usize) -> bool {
        let who = NAMES[s];
        let me = &mut self.ends[s];
        let n = if n == 0 {
            me.wire.len()
        } else {
            n.min(me.wire.len())
        };
        if n == 0 {
            return false;
        }
        if n < me.wire.len() {
            self.summary.partial_deliveries += 1;
        }
        let chunk = me.wire.split_to(n);
        me.inbox.extend_from_slice(&chunk);
        if let Err(e) = me.conn.handle_input(self.now, &mut me.inbox) {
            assert!(
                matches!(e, ConnectionError::ProtocolViolation { .. }),
                "{who}: handle_input failed with {e:?}"
            );
            assert!(me.input_error.is_none(), "{who}: handle_input failed twice");
            assert!(
                self.tainted,
                "{who}: protocol violation between honest peers: {e}"
            );
            me.input_error = Some(e);
            self.summary.violations += 1;
        }
        if me.conn.is_closed() {
            assert!(me.inbox.is_empty(), "{who}: input kept after close");
        }
        self.absorb(s);
        true
    }

    /// Polls side `s`'s events and checks them against the model.
    fn absorb(&mut self, s: usize) {
        let o = 1 - s;
        let who = NAMES[s];
        let tainted = self.tainted;
        let Self {
            ends,
            messages,
            summary,
            ..
        } = self;
        let (me, other) = Self::pair(ends, s);
        while let Some(ev) = me.conn.poll_event() {
            assert!(me.closed.is_none(), "{who}: {ev:?} after Closed");
            match ev {
                Event::Connected(hello) => {
                    assert!(!me.connected, "{who}: second Connected");
                    me.connected = true;
                    assert_eq!(me.conn.peer(), Some(&*hello));
                    if !tainted {
                        assert_eq!(Some(&*hello), other.declared.as_ref(), "{who}: peer hello");
                        // The server's most preferred algorithm among the client's offers.
                        let (client, server) = if s == CLIENT {
                            (me.limits, other.limits)
                        } else {
                            (other.limits, me.limits)
                        };
                        let expected = server
                            .compression()
                            .iter()
                            .copied()
                            .find(|c| client.compression().contains(c));
                        assert_eq!(me.conn.compression(), expected, "{who}: compression");
                    }
                }
                Event::Message(m) => {
                    assert!(me.connected, "{who}: message before Connected");
                    assert!(m.payload.len() <= me.config.message_size_limit() as usize);
                    let own_frame = me.max_frame_size;
                    assert!(
                        (HEADER_LEN as u32..=HEADER_LEN as u32 + own_frame).contains(&m.credit),
                        "{who}: credit {}",
                        m.credit
                    );
                    assert!(
                        !me.closed_events.contains_key(&m.channel),
                        "{who}: message on channel {} after its ChannelClosed",
                        m.channel
                    );
                    me.unreleased.push_back((m.channel, m.credit));
                    if tainted {
                        continue;
                    }
                    let sent = messages
                        .get(&m.id)
                        .unwrap_or_else(|| panic!("{who}: message with unknown id {}", m.id));
                    assert_eq!(sent.from, o, "{who}: got its own message {}", m.id);
                    assert_eq!(m.channel, sent.channel, "{who}: message {} channel", m.id);
                    assert_eq!(m.kind, sent.kind, "{who}: message {} kind", m.id);
                    assert_eq!(m.codec, sent.codec, "{who}: message {} codec", m.id);
                    assert_eq!(m.compressed, sent.compressed, "{who}: message {}", m.id);
                    assert!(
                        m.payload == pattern(m.id, sent.len),
                        "{who}: message {} payload corrupted ({} bytes, sent {})",
                        m.id,
                        m.payload.len(),
                        sent.len
                    );
                    if m.payload.len() + HEADER_LEN > m.credit as usize {
                        summary.fragmented += 1;
                    }
                    summary.delivered += 1;
                    let got = me.delivered.entry(m.channel).or_default();
                    got.push(m.id);
                    let queued = other.sent_on.get(&m.channel).map_or(&[][..], Vec::as_slice);
                    assert!(
                        queued.starts_with(got),
                        "{who}: channel {} delivered {got:?}, queued in order {queued:?}",
                        m.channel
                    );
                }
                Event::ChannelOpened { channel, label } => {
                    assert!(me.connected, "{who}: channel opened before Connected");
                    let parity = if o == CLIENT { 1 } else { 0 };
                    assert_eq!(channel % 2, parity, "{who}: channel {channel} parity");
                    assert!(
                        me.announced.last().is_none_or(|(last, _)| *last < channel),
                        "{who}: channel {channel} announced out of order"
                    );
                    assert!(label.len() <= MAX_LABEL_LEN);
                    if !tainted {
                        let i = me.announced.len();
                        assert_eq!(
                            other.opened.get(i).map(|(c, l)| (*c, l.as_str())),
                            Some((channel, label.as_str())),
                            "{who}: announced channel differs from the one opened"
                        );
                    }
                    me.announced.push((channel, label));
                    me.known.push(channel);
                }
                Event::ChannelClosed { channel, initiator } => {
                    assert!(
                        channel != 0 && me.known.contains(&channel),
                        "{who}: ChannelClosed for unknown channel {channel}"
                    );
                    assert_ne!(initiator, Initiator::Protocol);
                    let seen = me.closed_events.entry(channel).or_default();
                    assert!(seen.is_empty(), "{who}: channel {channel} closed twice");
                    seen.push(initiator);
                    if !tainted {
                        let expected = if me.close_called.contains(&channel) {
                            Initiator::Local
                        } else {
                            Initiator::Remote
                        };
                        assert_eq!(initiator, expected, "{who}: channel {channel} initiator");
                        assert!(
                            me.close_called.contains(&channel)
                                || other.close_called.contains(&channel),
                            "{who}: channel {channel} closed though nobody closed it"
                        );
                    }
                }
                Event::Cancel { id } => {
                    assert!(me.connected, "{who}: cancel before Connected");
                    if !tainted {
                        me.cancels_received.push(id);
                        assert!(
                            other.cancels_sent.starts_with(&me.cancels_received),
                            "{who}: cancels {:?}, sent {:?}",
                            me.cancels_received,
                            other.cancels_sent
                        );
                    }
                }
                Event::Closed(e) => {
                    assert!(me.conn.is_closed() && !me.conn.is_open());
                    assert_eq!(me.conn.poll_timeout(), None, "{who}: timer after close");
                    match me.input_error.take() {
                        Some(input) => assert_eq!(input, e, "{who}: error and Closed differ"),
                        None => assert!(
                            !matches!(e, ConnectionError::ProtocolViolation { .. }),
                            "{who}: violation not returned by handle_input"
                        ),
                    }
                    if !tainted {
                        match &e {
                            ConnectionError::LocallyClosed { code } => assert!(
                                me.close_codes.contains(code),
                                "{who}: closed with {code} it was not asked for"
                            ),
                            ConnectionError::GoAway { code, reason } => {
                                assert!(
                                    other.close_codes.contains(code),
                                    "{who}: GOAWAY {code} the peer was not asked for"
                                );
                                assert_eq!(reason, REASON);
                            }
                            ConnectionError::Eof if blind_to_early_goaway(s, me, other) => {}
                            e => panic!("{who}: honest peers, connection ended with {e:?}"),
                        }
                    }
                    me.closed = Some(e);
                }
                other => panic!("{who}: unexpected event {other:?}"),
            }
        }
        assert!(
            me.input_error.is_none(),
            "{who}: handle_input failed without a Closed event"
        );
    }

    /// Delivers everything both ways until nothing moves. A side that closed and sent all it
    /// had closes its socket: the other side sees the end of the stream once it read it all.
    fn drive(&mut self) {
        for _ in 0..DRIVE_CAP {
            let mut busy = self.flush(CLIENT) | self.flush(SERVER);
            busy |= self.deliver(CLIENT, 0) | self.deliver(SERVER, 0);
            self.absorb(CLIENT);
            self.absorb(SERVER);
            if !busy {
                for s in [CLIENT, SERVER] {
                    let (me, other) = Self::pair(&mut self.ends, s);
                    if other.closed.is_some() && me.wire.is_empty() && !me.conn.is_closed() {
                        me.conn.handle_eof();
                        self.absorb(s);
                    }
                }
                return;
            }
        }
        panic!("drive: no quiescence after {DRIVE_CAP} rounds (livelock)");
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for end in &mut self.ends {
            end.conn.handle_timeout(now);
        }
        self.absorb(CLIENT);
        self.absorb(SERVER);
        self.drive();
    }

    /// Moves the clock forward by `d` as a driver would: firing every timer at its deadline
    /// (as given by `poll_timeout`), with everything in flight delivered before and after.
    fn advance(&mut self, d: Duration) {
        self.drive();
        let target = self.now + d;
        for _ in 0..TIMER_CAP {
            let next = self.ends.iter().filter_map(|e| e.conn.poll_timeout()).min();
            match next {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.fire_timers();
                }
                _ => {
                    self.now = target;
                    self.fire_timers();
                    return;
                }
            }
        }
        panic!("advance: timers fired {TIMER_CAP} times without reaching the target");
    }

    fn release(&mut self, s: usize, count: usize) {
        let me = &mut self.ends[s];
        let n = if count == 0 {
            me.unreleased.len()
        } else {
            count.min(me.unreleased.len())
        };
        for (channel, credit) in me.unreleased.drain(..n) {
            me.conn.release(channel, credit);
        }
    }

    fn apply(&mut self, op: &Operation) {
        match *op {
            Operation::Send {
                server,
                channel,
                size,
                kind,
                compressed,
            } => self.send(usize::from(server), channel, size, kind, compressed),
            Operation::OpenChannel { server, label } => self.open(usize::from(server), label),
            Operation::CloseChannel { server, channel } => {
                let me = &mut self.ends[usize::from(server)];
                let ch = me.known[usize::from(channel) % me.known.len()];
                let effective = ch != 0 && !me.channel_ended(ch);
                me.conn.close_channel(ch);
                if effective {
                    me.close_called.insert(ch);
                    self.summary.channels_closed += 1;
                }
            }
            Operation::Release { server, count } => {
                self.release(usize::from(server), usize::from(count));
            }
            Operation::AdvanceClock { ms } => {
                self.advance(Duration::from_millis(u64::from(ms.min(10_000))));
            }
            Operation::Deliver { to_server, bytes } => {
                self.deliver(usize::from(to_server), usize::from(bytes));
            }
            Operation::Drive => self.drive(),
            Operation::InjectBytes {
                to_server,
                ref bytes,
            } => {
                self.tainted = true;
                self.summary.injected = true;
                self.ends[usize::from(to_server)]
                    .wire
                    .extend_from_slice(bytes);
            }
            Operation::InjectFrame {
                to_server,
                ty,
                flags,
                codec,
                channel,
                id,
                ref payload,
                pad,
            } => {
                self.tainted = true;
                self.summary.injected = true;
                let wire = &mut self.ends[usize::from(to_server)].wire;
                wire.extend_from_slice(&[1, ty % 16, flags, codec % 5]);
                wire.extend_from_slice(&u32::from(channel).to_be_bytes());
                wire.extend_from_slice(&u64::from(id).to_be_bytes());
                let len = payload.len() + usize::from(pad);
                wire.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
                wire.extend_from_slice(payload);
                wire.resize(wire.len() + usize::from(pad), 0);
            }
            Operation::CancelRequest { server, id } => {
                let me = &mut self.ends[usize::from(server)];
                if me.conn.is_open() {
                    me.cancels_sent.push(id);
                    self.summary.cancels += 1;
                }
                me.conn.cancel_request(id);
            }
            Operation::Close { server, code } => {
                let me = &mut self.ends[usize::from(server)];
                let code = ErrorCode::from_u32(u32::from(code) % 20);
                if !me.conn.is_closed() {
                    me.close_codes.push(code);
                    me.closed_early |= !me.connected;
                    self.summary.closes += 1;
                }
                me.conn.close(code, REASON);
            }
        }
        self.flush(CLIENT);
        self.flush(SERVER);
        self.absorb(CLIENT);
        self.absorb(SERVER);
    }

    fn send(&mut self, s: usize, channel: u8, size: u16, kind: u8, compressed: bool) {
        let who = NAMES[s];
        let tainted = self.tainted;
        let me = &mut self.ends[s];
        let ch = me.known[usize::from(channel) % me.known.len()];
        let size = usize::from(size);
        let size = if size >= 60_000 { size } else { size % 5000 };
        let kind = [Kind::Message, Kind::Request, Kind::Response][usize::from(kind % 3)];
        let id = self.next_id;
        self.next_id += 1;
        let codec = CodecId::ALL[(id % 4) as usize];
        let negotiated = me.conn.compression().is_some();
        match me
            .conn
            .send_compressed(kind, ch, id, codec, pattern(id, size), compressed)
        {
            Err(SendError::NotNegotiated) => {
                assert!(compressed && !negotiated, "{who}: NotNegotiated");
            }
            Ok(()) => {
                assert!(me.connected && !me.closing(), "{who}: send accepted");
                me.sent_on.entry(ch).or_default().push(id);
                self.messages.insert(
                    id,
                    Sent {
                        from: s,
                        channel: ch,
                        len: size,
                        kind,
                        codec,
                        compressed,
                    },
                );
            }
            Err(SendError::NotReady) => assert!(!me.connected, "{who}: NotReady when open"),
            Err(SendError::Closed) => assert!(me.closing(), "{who}: Closed when open"),
            Err(SendError::ChannelClosed(c)) => {
                assert_eq!(c, ch);
                assert!(
                    tainted || me.channel_ended(ch),
                    "{who}: send on channel {ch} refused though nobody closed it"
                );
            }
            Err(SendError::MessageTooLarge { len, max }) => {
                assert_eq!(len, size);
                assert_eq!(Some(max), me.conn.peer().map(|p| p.max_message_size));
                assert!(len > max as usize);
            }
            Err(e) => panic!("{who}: send failed: {e}"),
        }
    }

    fn open(&mut self, s: usize, label: u8) {
        let who = NAMES[s];
        let me = &mut self.ends[s];
        let len = if label == u8::MAX {
            MAX_LABEL_LEN + 1
        } else {
            usize::from(label)
        };
        let label: String = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        match me.conn.open_labeled_channel(&label) {
            Ok(ch) => {
                assert!(me.connected && !me.closing(), "{who}: open accepted");
                assert_eq!(ch % 2, if s == CLIENT { 1 } else { 0 }, "{who}: parity");
                assert!(
                    me.opened.last().is_none_or(|(last, _)| *last < ch),
                    "{who}: channel ids not increasing"
                );
                me.opened.push((ch, label));
                me.known.push(ch);
                self.summary.channels_opened += 1;
            }
            Err(OpenError::Label) => assert!(len > MAX_LABEL_LEN),
            Err(OpenError::NotReady) => assert!(!me.connected, "{who}: NotReady when open"),
            Err(OpenError::Closed) => assert!(me.closing(), "{who}: Closed when open"),
            Err(OpenError::Limit(n)) => {
                assert_eq!(Some(n), me.conn.peer().map(|p| p.max_channels));
                assert!(me.opened.len() >= n as usize, "{who}: limit {n} too early");
            }
            Err(e) => panic!("{who}: open failed: {e}"),
        }
    }

    /// Hands back every credit and delivers until nothing moves any more.
    fn settle(&mut self) {
        for _ in 0..SETTLE_CAP {
            self.drive();
            if self.ends.iter().all(|e| e.unreleased.is_empty()) {
                return;
            }
            self.release(CLIENT, 0);
            self.release(SERVER, 0);
        }
        panic!("never settled: credit keeps coming back");
    }

    /// What two honest peers must have achieved once everything settled.
    fn check_settled(&self) {
        let [client, server] = &self.ends;
        let closed_by_anyone =
            |ch: u32| client.close_called.contains(&ch) || server.close_called.contains(&ch);
        match (client.close_codes.is_empty(), server.close_codes.is_empty()) {
            (true, true) => {
                for (s, me) in self.ends.iter().enumerate() {
                    let who = NAMES[s];
                    let other = &self.ends[1 - s];
                    assert!(me.conn.is_open(), "{who}: not open, nobody closed it");
                    assert_eq!(me.conn.queued_bytes(), 0, "{who}: bytes still queued");
                    assert!(me.wire.is_empty() && me.inbox.is_empty());
                    let stats = me.conn.stats();
                    assert_eq!(stats.frames_sent, me.frames_sent, "{who}: frames_sent");
                    assert_eq!(stats.bytes_sent, me.bytes_sent, "{who}: bytes_sent");
                    assert_eq!(
                        stats.frames_received, other.frames_sent,
                        "{who}: frames_received"
                    );
                    assert_eq!(
                        stats.bytes_received, other.bytes_sent,
                        "{who}: bytes_received"
                    );
                    let delivered: usize = me.delivered.values().map(Vec::len).sum();
                    assert_eq!(stats.messages_received, delivered as u64);
                    assert_eq!(me.announced, other.opened, "{who}: channels announced");
                    assert_eq!(me.cancels_received, other.cancels_sent, "{who}: cancels");
                    for (&ch, ids) in &other.sent_on {
                        if !closed_by_anyone(ch) {
                            let got = me.delivered.get(&ch).map_or(&[][..], Vec::as_slice);
                            assert_eq!(got, &ids[..], "{who}: channel {ch} lost messages");
                        }
                    }
                    for &ch in client.close_called.iter().chain(&server.close_called) {
                        let n = me.closed_events.get(&ch).map_or(0, Vec::len);
                        assert_eq!(n, 1, "{who}: channel {ch} closed but reported {n} times");
                    }
                    // Closed channels are forgotten once both CHANNEL_CLOSEs crossed: channel
                    // 0 and the channels nobody closed are all that is left.
                    let live = me
                        .opened
                        .iter()
                        .chain(&me.announced)
                        .filter(|(ch, _)| !closed_by_anyone(*ch))
                        .count();
                    assert_eq!(
                        me.conn.channel_count(),
                        1 + live,
                        "{who}: channels tracked after settling"
                    );
                }
            }
            (client_open, server_open) if client_open != server_open => {
                // Exactly one side closed: it drains everything it queued, then GOAWAY.
                let (closer, peer) = if client_open {
                    (SERVER, CLIENT)
                } else {
                    (CLIENT, SERVER)
                };
                let (c, p) = (&self.ends[closer], &self.ends[peer]);
                if blind_to_early_goaway(peer, p, c) {
                    assert_eq!(p.closed, Some(ConnectionError::Eof), "server");
                    return;
                }
                assert!(
                    matches!(c.closed, Some(ConnectionError::LocallyClosed { .. })),
                    "{}: {:?} after close",
                    NAMES[closer],
                    c.closed
                );
                assert!(
                    matches!(p.closed, Some(ConnectionError::GoAway { .. })),
                    "{}: {:?} after the peer's close",
                    NAMES[peer],
                    p.closed
                );
                // A second `close` while draining sends GOAWAY at once, dropping what is queued.
                let graceful = c.close_codes.len() == 1;
                for (&ch, ids) in &c.sent_on {
                    if graceful && !closed_by_anyone(ch) {
                        let got = p.delivered.get(&ch).map_or(&[][..], Vec::as_slice);
                        assert_eq!(
                            got,
                            &ids[..],
                            "{}: channel {ch} lost messages of a graceful close",
                            NAMES[peer]
                        );
                    }
                }
            }
            _ => {
                for (s, me) in self.ends.iter().enumerate() {
                    assert!(me.closed.is_some(), "{}: open after both closed", NAMES[s]);
                }
            }
        }
    }
}

/// `connection_ops`: runs `input` on a fresh client+server pair. Never panics; frames are valid
/// and within the peer's limits; nothing follows ERROR or GOAWAY; events come in a valid order.
/// While no bytes were injected (two honest peers): no violation, no timeout; every message
/// arrives intact, once, in order per channel, with its kind and codec; channels, cancels and
/// closes are reported as the other side made them; once settled, nothing is lost or stuck.
pub(crate) fn run_connection_ops(input: &OpsInput) -> Summary {
    let summary = run_ops(input);
    // After an injection only the invariants that hold for any peer apply, and most inputs of
    // some length hold one: run the same operations without the injections too, so that every
    // input also checks two honest peers.
    if summary.injected {
        let honest = OpsInput {
            ops: input
                .ops
                .iter()
                .filter(|op| {
                    !matches!(
                        op,
                        Operation::InjectBytes { .. } | Operation::InjectFrame { .. }
                    )
                })
                .cloned()
                .collect(),
            ..input.clone()
        };
        run_ops(&honest);
    }
    summary
}

fn run_ops(input: &OpsInput) -> Summary {
    let mut h = Harness::new(input);
    for op in &input.ops {
        h.apply(op);
    }
    h.settle();
    if !h.tainted {
        h.check_settled();
    }
    h.summary
}

/// `connection_ops` from raw bytes, as libFuzzer hands them over (`None` if they do not make
/// an input).
pub(crate) fn check_connection_ops(data: &[u8]) -> Option<Summary> {
    let input = OpsInput::arbitrary_take_rest(Unstructured::new(data)).ok()?;
    Some(run_connection_ops(&input))
}
