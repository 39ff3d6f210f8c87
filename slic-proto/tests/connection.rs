//! Deterministic state-machine tests of `Connection`, through the public API only.
//!
//! A [`Pair`] holds a client and a server connected by in-memory byte buffers, with a simulated
//! clock that only moves when a test says so. Raw frames are crafted with [`Header::encode`] to
//! play a misbehaving peer, and everything a connection transmits is decoded with [`Decoder`]
//! and logged so that tests can assert what went on the wire.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use slic_proto::frame::flags;
use slic_proto::{
    CodecId, Compression, Config, Connection, ConnectionError, Decoder, ErrorCode, Event, Frame,
    FrameType, HEADER_LEN, Header, Hello, IncomingMessage, Initiator, Kind, OpenError, SendError,
    Side,
};

// ----- harness -------------------------------------------------------------------------------

/// Most pump rounds one `drive` may take before it is declared a livelock.
const DRIVE_CAP: usize = 10_000;
/// Most timer firings one `advance` may take before it is declared a busy timer.
const TIMER_CAP: usize = 10_000;

/// One end of a [`Pair`], or a lone connection fed by hand.
struct Peer {
    conn: Connection,
    /// Bytes written by the other end and not yet consumed by `conn`.
    inbox: BytesMut,
    /// Events polled from `conn`, in order, until a test takes them.
    events: Vec<Event>,
    /// Every frame `conn` transmitted, decoded.
    sent: Vec<Frame>,
    /// The error `handle_input` returned, if any.
    input_error: Option<ConnectionError>,
    /// Release the credit of each message as soon as it is polled (an eager application).
    auto_release: bool,
}

impl Peer {
    fn new(config: Config, side: Side, now: Instant) -> Self {
        Self {
            conn: Connection::new(Arc::new(config), side, now),
            inbox: BytesMut::new(),
            events: Vec::new(),
            sent: Vec::new(),
            input_error: None,
            auto_release: true,
        }
    }

    /// Moves every pending transmit onto `wire`, logging the decoded frames. Returns whether
    /// anything was transmitted.
    fn flush(&mut self, now: Instant, wire: &mut BytesMut) -> bool {
        let mut any = false;
        while let Some(t) = self.conn.poll_transmit(now) {
            let before = wire.len();
            t.write_to(wire);
            assert_eq!(wire.len() - before, t.len());
            if let Some(trailer) = t.trailer {
                assert_eq!(trailer, slic_proto::frame::checksum(&t.header, &t.payload));
            }
            let header = Header::decode(&t.header, u32::MAX)
                .expect("the connection transmitted an invalid frame");
            assert_eq!(
                header.len as usize,
                t.payload.len(),
                "a transmit was not a whole frame"
            );
            self.sent.push(Frame {
                header,
                payload: t.payload,
            });
            any = true;
        }
        any
    }

    /// Feeds the inbox to the connection. Returns whether any byte was consumed.
    fn receive(&mut self, now: Instant) -> bool {
        let before = self.inbox.len();
        if before > 0
            && let Err(e) = self.conn.handle_input(now, &mut self.inbox)
        {
            assert!(self.input_error.is_none(), "input handled after an error");
            self.input_error = Some(e);
        }
        self.collect_events();
        self.inbox.len() != before
    }

    fn collect_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            if self.auto_release
                && let Event::Message(m) = &ev
            {
                self.conn.release(m.channel, m.credit);
            }
            self.events.push(ev);
        }
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.collect_events();
        std::mem::take(&mut self.events)
    }

    /// Frames of type `ty` this end transmitted.
    fn sent_of(&self, ty: FrameType) -> Vec<&Frame> {
        self.sent.iter().filter(|f| f.header.ty == ty).collect()
    }
}

/// A client and a server joined by in-memory buffers, with a hand-driven clock.
struct Pair {
    now: Instant,
    client: Peer,
    server: Peer,
}

impl Pair {
    /// Both connections created, nothing exchanged yet.
    fn new(client: Config, server: Config) -> Self {
        let now = Instant::now();
        Self {
            now,
            client: Peer::new(client, Side::Client, now),
            server: Peer::new(server, Side::Server, now),
        }
    }

    /// Both connections created and the handshake done; the Connected events are consumed.
    fn connected(client: Config, server: Config) -> Self {
        let mut pair = Self::new(client, server);
        pair.drive();
        for (name, peer) in [("client", &mut pair.client), ("server", &mut pair.server)] {
            let events = peer.take_events();
            assert!(
                matches!(events.as_slice(), [Event::Connected(_)]),
                "{name}: {events:?}"
            );
            assert!(peer.conn.is_open(), "{name} not open");
        }
        pair
    }

    /// Pumps bytes both ways until neither side transmits nor consumes anything.
    fn drive(&mut self) {
        let now = self.now;
        for _ in 0..DRIVE_CAP {
            self.client.collect_events();
            self.server.collect_events();
            let mut busy = self.client.flush(now, &mut self.server.inbox);
            busy |= self.server.flush(now, &mut self.client.inbox);
            busy |= self.client.receive(now);
            busy |= self.server.receive(now);
            if !busy {
                return;
            }
        }
        panic!("drive: no quiescence after {DRIVE_CAP} rounds (livelock)");
    }

    /// Moves the clock forward by `d` like a real driver would: firing every timer at its
    /// deadline (as given by `poll_timeout`) and driving after each.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        for _ in 0..TIMER_CAP {
            let next = [
                self.client.conn.poll_timeout(),
                self.server.conn.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.client.conn.handle_timeout(self.now);
                    self.server.conn.handle_timeout(self.now);
                    self.drive();
                }
                _ => {
                    self.now = target;
                    self.client.conn.handle_timeout(self.now);
                    self.server.conn.handle_timeout(self.now);
                    self.drive();
                    return;
                }
            }
        }
        panic!("advance: timer fired {TIMER_CAP} times without moving on");
    }
}

// ----- helpers -------------------------------------------------------------------------------

fn config(name: &str) -> Config {
    let mut c = Config::default();
    c.name(name).unwrap();
    c
}

fn with_heartbeat(name: &str, ms: u64) -> Config {
    let mut c = config(name);
    c.heartbeat(Duration::from_millis(ms)).unwrap();
    c
}

fn with_channel_window(name: &str, window: u32) -> Config {
    let mut c = config(name);
    c.channel_window(window).unwrap();
    c
}

/// A valid client HELLO payload.
fn hello(name: &str) -> Hello {
    Hello {
        version: 1,
        codecs: 0x0f,
        max_frame_size: 256 << 10,
        max_message_size: 16 << 20,
        channel_window: 1 << 20,
        connection_window: 4 << 20,
        max_channels: 256,
        heartbeat_ms: 10_000,
        compression: Vec::new(),
        name: name.to_owned(),
        checksum: false,
    }
}

/// Encodes one frame by hand.
fn raw(ty: FrameType, flags: u8, channel: u32, id: u64, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        ty,
        flags,
        codec: CodecId::Raw,
        channel,
        id,
        len: u32::try_from(payload.len()).unwrap(),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

fn raw_message(channel: u32, id: u64, payload: &[u8]) -> Vec<u8> {
    raw(FrameType::Message, 0, channel, id, payload)
}

fn raw_hello(hello: &Hello) -> Vec<u8> {
    raw(FrameType::Hello, 0, 0, 0, &hello.encode())
}

/// A deterministic payload for message `id`.
fn pattern(id: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (id.wrapping_mul(131).wrapping_add(i as u64) % 251) as u8)
        .collect()
}

/// The code carried by an ERROR, GOAWAY or CHANNEL_CLOSE frame.
fn code_of(frame: &Frame) -> ErrorCode {
    let bytes = frame.payload.first_chunk::<4>().expect("code missing");
    ErrorCode::from_u32(u32::from_be_bytes(*bytes))
}

/// The only ERROR frame `peer` sent, and its code.
fn sent_error_code(peer: &Peer) -> ErrorCode {
    let errors = peer.sent_of(FrameType::Error);
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one ERROR, sent {:?}",
        peer.sent
    );
    assert_eq!(
        peer.sent.last().unwrap().header.ty,
        FrameType::Error,
        "ERROR must be the last frame"
    );
    code_of(errors[0])
}

/// The `Event::Closed` that must end `events`.
fn closed(events: &[Event]) -> &ConnectionError {
    let n = events
        .iter()
        .filter(|e| matches!(e, Event::Closed(_)))
        .count();
    assert_eq!(n, 1, "expected exactly one Closed event: {events:?}");
    match events.last() {
        Some(Event::Closed(e)) => e,
        _ => panic!("Closed is not the last event: {events:?}"),
    }
}

fn violation_code(events: &[Event]) -> ErrorCode {
    match closed(events) {
        ConnectionError::ProtocolViolation { code, .. } => *code,
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

fn messages(events: &[Event]) -> Vec<&IncomingMessage> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn channel_closed_events(events: &[Event]) -> Vec<(u32, Initiator)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelClosed { channel, initiator } => Some((*channel, *initiator)),
            _ => None,
        })
        .collect()
}

fn channel_opened_events(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ChannelOpened { channel, .. } => Some(*channel),
            _ => None,
        })
        .collect()
}

/// A lone server fed `input` at once; its transmits are logged.
fn lone_server_fed(input: &[u8]) -> Peer {
    let now = Instant::now();
    let mut server = Peer::new(config("server"), Side::Server, now);
    server.inbox.extend_from_slice(input);
    server.receive(now);
    server.flush(now, &mut BytesMut::new());
    server
}

/// Asserts that a server given `input` as its first bytes answers ERROR `code` and closes.
fn assert_server_rejects_first_bytes(input: &[u8], code: ErrorCode) {
    let mut server = lone_server_fed(input);
    assert_eq!(sent_error_code(&server), code);
    assert!(
        server.sent_of(FrameType::Welcome).is_empty(),
        "no WELCOME after a bad first frame"
    );
    let events = server.take_events();
    assert_eq!(violation_code(&events), code);
    assert_eq!(
        server.input_error.as_ref().map(ConnectionError::code),
        Some(code)
    );
    assert!(server.conn.is_closed());
    assert_eq!(server.conn.poll_timeout(), None);
}

// ----- 1. handshake --------------------------------------------------------------------------

#[test]
fn handshake_completes_both_ways_with_the_peers_name() {
    let mut pair = Pair::new(config("alice"), config("bob"));
    pair.drive();
    let client_events = pair.client.take_events();
    let server_events = pair.server.take_events();
    match client_events.as_slice() {
        [Event::Connected(h)] => assert_eq!(h.name, "bob"),
        other => panic!("client: {other:?}"),
    }
    match server_events.as_slice() {
        [Event::Connected(h)] => assert_eq!(h.name, "alice"),
        other => panic!("server: {other:?}"),
    }
    assert!(pair.client.conn.is_open() && pair.server.conn.is_open());
    assert_eq!(pair.client.conn.peer().unwrap().name, "bob");
    assert_eq!(pair.server.conn.peer().unwrap().name, "alice");
    // Exactly HELLO one way and WELCOME the other, nothing else.
    let types = |p: &Peer| p.sent.iter().map(|f| f.header.ty).collect::<Vec<_>>();
    assert_eq!(types(&pair.client), [FrameType::Hello]);
    assert_eq!(types(&pair.server), [FrameType::Welcome]);
}

#[test]
fn client_cannot_send_or_open_before_the_handshake_completes() {
    let mut pair = Pair::new(config("c"), config("s"));
    assert_eq!(
        pair.client
            .conn
            .send_message(0, 1, CodecId::Raw, Bytes::new()),
        Err(SendError::NotReady)
    );
    assert_eq!(pair.client.conn.open_channel(), Err(OpenError::NotReady));
    pair.drive();
    assert!(
        pair.client
            .conn
            .send_message(0, 1, CodecId::Raw, Bytes::new())
            .is_ok()
    );
}

#[test]
fn negotiated_heartbeat_is_the_smaller_non_zero_interval() {
    let cases = [
        (5_000, 2_000, Some(2_000)),
        (2_000, 5_000, Some(2_000)),
        (0, 3_000, Some(3_000)),
        (3_000, 0, Some(3_000)),
        (0, 0, None),
    ];
    for (client_ms, server_ms, expected) in cases {
        let pair = Pair::connected(
            with_heartbeat("c", client_ms),
            with_heartbeat("s", server_ms),
        );
        let expected = expected.map(Duration::from_millis);
        // Right after the handshake both sides last sent and received at `now`, so the next
        // timer is exactly one heartbeat away.
        for peer in [&pair.client, &pair.server] {
            let interval = peer.conn.poll_timeout().map(|t| t - pair.now);
            assert_eq!(
                interval, expected,
                "client {client_ms} ms, server {server_ms} ms"
            );
        }
    }
}

// ----- 2. bad handshakes ---------------------------------------------------------------------

#[test]
fn server_answers_a_non_hello_first_frame_with_protocol_error() {
    assert_server_rejects_first_bytes(
        &raw(FrameType::Ping, 0, 0, 7, &[]),
        ErrorCode::ProtocolError,
    );
    assert_server_rejects_first_bytes(&raw_message(0, 1, b"hi"), ErrorCode::ProtocolError);
}

#[test]
fn server_answers_bad_magic_with_bad_magic() {
    let mut payload = hello("c").encode().to_vec();
    payload[..4].copy_from_slice(b"SLID");
    assert_server_rejects_first_bytes(
        &raw(FrameType::Hello, 0, 0, 0, &payload),
        ErrorCode::BadMagic,
    );
}

#[test]
fn server_answers_hello_version_zero_with_unsupported_version() {
    let mut h = hello("c");
    h.version = 0;
    assert_server_rejects_first_bytes(&raw_hello(&h), ErrorCode::UnsupportedVersion);
}

#[test]
fn server_answers_a_frame_header_version_other_than_one_with_unsupported_version() {
    let mut bytes = raw_hello(&hello("c"));
    bytes[0] = 0;
    assert_server_rejects_first_bytes(&bytes, ErrorCode::UnsupportedVersion);
}

#[test]
fn server_answers_an_empty_name_with_bad_name() {
    assert_server_rejects_first_bytes(&raw_hello(&hello("")), ErrorCode::BadName);
}

#[test]
fn server_answers_a_hello_without_raw_codec_with_handshake_failed() {
    let mut h = hello("c");
    h.codecs = 0b1110;
    assert_server_rejects_first_bytes(&raw_hello(&h), ErrorCode::HandshakeFailed);
}

#[test]
fn server_refuses_an_oversized_handshake_frame_from_its_header() {
    // 1025 bytes declared before the handshake: refused before any payload arrives.
    let mut header = raw(FrameType::Hello, 0, 0, 0, &[]);
    header[16..20].copy_from_slice(&1025u32.to_be_bytes());
    assert_server_rejects_first_bytes(&header, ErrorCode::FrameTooLarge);
}

#[test]
fn server_picks_its_own_version_when_the_client_speaks_a_higher_one() {
    let mut h = hello("c");
    h.version = 9;
    let mut server = lone_server_fed(&raw_hello(&h));
    let welcomes = server.sent_of(FrameType::Welcome);
    assert_eq!(welcomes.len(), 1);
    let welcome = Hello::decode(&welcomes[0].payload).expect("valid WELCOME");
    assert_eq!(welcome.version, 1);
    assert!(matches!(
        server.take_events().as_slice(),
        [Event::Connected(_)]
    ));
}

#[test]
fn second_hello_after_the_handshake_is_a_protocol_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server
        .inbox
        .extend_from_slice(&raw_hello(&hello("again")));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::ProtocolError
    );
    // The client learns why.
    match closed(&pair.client.take_events()) {
        ConnectionError::PeerError { code, .. } => assert_eq!(*code, ErrorCode::ProtocolError),
        other => panic!("client: {other:?}"),
    }
}

#[test]
fn second_welcome_after_the_handshake_is_a_protocol_violation_for_the_client() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.client
        .inbox
        .extend_from_slice(&raw(FrameType::Welcome, 0, 0, 0, &hello("s").encode()));
    pair.drive();
    assert_eq!(sent_error_code(&pair.client), ErrorCode::ProtocolError);
    assert_eq!(
        violation_code(&pair.client.take_events()),
        ErrorCode::ProtocolError
    );
}

#[test]
fn client_refuses_a_welcome_with_a_version_it_does_not_speak() {
    let now = Instant::now();
    let mut client = Peer::new(config("c"), Side::Client, now);
    client.flush(now, &mut BytesMut::new());
    let mut w = hello("s");
    w.version = 2;
    client
        .inbox
        .extend_from_slice(&raw(FrameType::Welcome, 0, 0, 0, &w.encode()));
    client.receive(now);
    client.flush(now, &mut BytesMut::new());
    assert_eq!(sent_error_code(&client), ErrorCode::UnsupportedVersion);
    assert_eq!(
        violation_code(&client.take_events()),
        ErrorCode::UnsupportedVersion
    );
}

// ----- 3. handshake timeout ------------------------------------------------------------------

#[test]
fn server_times_out_a_handshake_when_nothing_arrives() {
    let t0 = Instant::now();
    let mut cfg = config("s");
    cfg.handshake_timeout(Duration::from_secs(2));
    let mut server = Peer::new(cfg, Side::Server, t0);
    let deadline = t0 + Duration::from_secs(2);
    assert_eq!(server.conn.poll_timeout(), Some(deadline));

    // Just before the deadline nothing happens.
    server
        .conn
        .handle_timeout(deadline - Duration::from_millis(1));
    assert!(!server.flush(deadline, &mut BytesMut::new()));
    assert!(server.take_events().is_empty());
    assert_eq!(server.conn.poll_timeout(), Some(deadline));

    server.conn.handle_timeout(deadline);
    let events = server.take_events();
    assert!(matches!(closed(&events), ConnectionError::HandshakeTimeout));
    server.flush(deadline, &mut BytesMut::new());
    assert_eq!(sent_error_code(&server), ErrorCode::HandshakeTimeout);
    assert!(server.conn.is_closed());
    assert_eq!(server.conn.poll_timeout(), None);
}

#[test]
fn a_trickled_partial_hello_does_not_extend_the_handshake_deadline() {
    let t0 = Instant::now();
    let mut server = Peer::new(config("s"), Side::Server, t0);
    let deadline = server.conn.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(10));
    let hello = raw_hello(&hello("c"));
    server.inbox.extend_from_slice(&hello[..hello.len() - 1]);
    server.receive(t0 + Duration::from_secs(9));
    assert_eq!(server.conn.poll_timeout(), Some(deadline));
    server.conn.handle_timeout(deadline);
    assert!(matches!(
        closed(&server.take_events()),
        ConnectionError::HandshakeTimeout
    ));
}

// ----- 4. keepalive --------------------------------------------------------------------------

#[test]
fn idle_side_pings_after_one_heartbeat_and_the_peer_answers_pong() {
    let mut pair = Pair::connected(with_heartbeat("c", 1_000), with_heartbeat("s", 1_000));
    let t0 = pair.now;
    assert_eq!(pair.client.conn.rtt(), None);
    assert_eq!(
        pair.client.conn.poll_timeout(),
        Some(t0 + Duration::from_secs(1))
    );

    // Not yet due.
    pair.client
        .conn
        .handle_timeout(t0 + Duration::from_millis(999));
    assert!(!pair.client.flush(pair.now, &mut BytesMut::new()));

    // Due: the client pings; the PONG comes back 50 ms later.
    pair.now = t0 + Duration::from_secs(1);
    pair.client.conn.handle_timeout(pair.now);
    let Pair {
        client,
        server,
        now,
    } = &mut pair;
    assert!(client.flush(*now, &mut server.inbox));
    let ping = client.sent.last().unwrap().clone();
    assert_eq!(ping.header.ty, FrameType::Ping);
    assert!(ping.payload.is_empty());
    pair.now += Duration::from_millis(50);
    pair.drive();

    let pongs = pair.server.sent_of(FrameType::Pong);
    assert_eq!(pongs.len(), 1);
    assert_eq!(
        pongs[0].header.id, ping.header.id,
        "PONG echoes the PING id"
    );
    assert_eq!(pair.client.conn.rtt(), Some(Duration::from_millis(50)));
    assert!(pair.client.take_events().is_empty());
    assert!(pair.server.take_events().is_empty());
}

#[test]
fn keepalive_keeps_an_idle_connection_open() {
    let mut pair = Pair::connected(with_heartbeat("c", 1_000), with_heartbeat("s", 1_000));
    pair.advance(Duration::from_secs(30));
    assert!(pair.client.conn.is_open() && pair.server.conn.is_open());
    assert!(pair.client.take_events().is_empty());
    assert!(pair.server.take_events().is_empty());
    let pings =
        pair.client.sent_of(FrameType::Ping).len() + pair.server.sent_of(FrameType::Ping).len();
    assert!(pings >= 15, "only {pings} pings in 30 heartbeats");
    assert!(pair.client.conn.rtt().is_some() || pair.server.conn.rtt().is_some());
}

#[test]
fn peer_silent_for_three_heartbeats_is_closed_with_keepalive_timeout() {
    let pair = Pair::connected(with_heartbeat("c", 1_000), with_heartbeat("s", 1_000));
    let t0 = pair.now;
    let mut client = pair.client;
    // The server is gone silent: the client's frames go nowhere and nothing comes back.
    let mut pings_at = Vec::new();
    for _ in 0..10 {
        let Some(t) = client.conn.poll_timeout() else {
            break;
        };
        client.conn.handle_timeout(t);
        let before = client.sent.len();
        client.flush(t, &mut BytesMut::new());
        for f in &client.sent[before..] {
            if f.header.ty == FrameType::Ping {
                pings_at.push(t - t0);
            }
        }
        if client.conn.is_closed() {
            assert_eq!(t - t0, Duration::from_secs(3), "closed at the wrong time");
            break;
        }
    }
    assert_eq!(
        pings_at,
        [Duration::from_secs(1), Duration::from_secs(2)],
        "one PING per silent heartbeat"
    );
    assert!(matches!(
        closed(&client.take_events()),
        ConnectionError::KeepaliveTimeout
    ));
    assert_eq!(sent_error_code(&client), ErrorCode::KeepaliveTimeout);
    assert_eq!(client.conn.poll_timeout(), None);
}

// ----- 5. messages and fragmentation ---------------------------------------------------------

#[test]
fn messages_on_channel_zero_arrive_in_order_with_id_and_codec() {
    let mut pair = Pair::connected(config("c"), config("s"));
    for i in 0..20u64 {
        let codec = CodecId::ALL[(i % 4) as usize];
        pair.client
            .conn
            .send_message(0, 1000 + i, codec, pattern(i, (i * 37) as usize))
            .unwrap();
        pair.server
            .conn
            .send_message(0, 2000 + i, codec, pattern(i + 50, 3))
            .unwrap();
    }
    pair.drive();
    let got = pair.server.take_events();
    let got = messages(&got);
    assert_eq!(got.len(), 20);
    for (i, m) in got.iter().enumerate() {
        let i = i as u64;
        assert_eq!(m.channel, 0);
        assert_eq!(m.id, 1000 + i);
        assert_eq!(m.codec, CodecId::ALL[(i % 4) as usize]);
        assert_eq!(m.payload, pattern(i, (i * 37) as usize));
        assert_eq!(m.credit as usize, HEADER_LEN + m.payload.len());
    }
    let back = pair.client.take_events();
    let back: Vec<u64> = messages(&back).iter().map(|m| m.id).collect();
    assert_eq!(back, (2000..2020).collect::<Vec<_>>());
    assert_eq!(pair.server.conn.stats().messages_received, 20);
    assert_eq!(pair.client.conn.queued_bytes(), 0);
}

#[test]
fn empty_message_is_one_frame_of_length_zero() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.client
        .conn
        .send_message(0, 5, CodecId::Json, Bytes::new())
        .unwrap();
    assert_eq!(pair.client.conn.queued_bytes(), HEADER_LEN);
    pair.drive();
    let frames = pair.client.sent_of(FrameType::Message);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].header.len, 0);
    assert_eq!(frames[0].header.flags, 0);
    let events = pair.server.take_events();
    let got = messages(&events);
    assert_eq!(got.len(), 1);
    assert!(got[0].payload.is_empty());
    assert_eq!((got[0].id, got[0].codec), (5, CodecId::Json));
}

#[test]
fn message_larger_than_max_frame_size_is_fragmented_and_reassembled() {
    let mut small = config("c");
    small.max_frame_size(1024).unwrap();
    let mut small_server = config("s");
    small_server.max_frame_size(1024).unwrap();
    let mut pair = Pair::connected(small, small_server);
    let len = 10 * 1024 + 5;
    let body = pattern(77, len);
    pair.client
        .conn
        .send_message(0, 77, CodecId::MessagePack, body.clone())
        .unwrap();
    pair.drive();

    let frames = pair.client.sent_of(FrameType::Message);
    assert_eq!(frames.len(), 11);
    for (i, f) in frames.iter().enumerate() {
        assert!(f.header.len <= 1024);
        assert_eq!(f.header.id, 77);
        assert_eq!(f.header.codec, CodecId::MessagePack);
        let last = i == frames.len() - 1;
        assert_eq!(
            f.header.flags & flags::MORE != 0,
            !last,
            "MORE on frame {i}"
        );
    }
    assert_eq!(frames.last().unwrap().header.len, 5);

    let events = pair.server.take_events();
    let got = messages(&events);
    assert_eq!(got.len(), 1, "one message, not one per fragment");
    assert_eq!(got[0].id, 77);
    assert_eq!(got[0].codec, CodecId::MessagePack);
    assert_eq!(got[0].payload, body);
}

#[test]
fn sender_refuses_a_message_above_the_peers_max_message_size() {
    let mut server = config("s");
    server.max_message_size(4096).unwrap();
    let mut pair = Pair::connected(config("c"), server);
    assert_eq!(
        pair.client
            .conn
            .send_message(0, 1, CodecId::Raw, pattern(1, 4097)),
        Err(SendError::MessageTooLarge {
            len: 4097,
            max: 4096
        })
    );
    assert!(
        pair.client
            .conn
            .send_message(0, 1, CodecId::Raw, pattern(1, 4096))
            .is_ok()
    );
}

#[test]
fn reassembled_message_above_max_message_size_is_a_violation() {
    let mut server = config("s");
    server.max_message_size(2048).unwrap();
    let mut pair = Pair::connected(config("c"), server);
    let mut bytes = raw(FrameType::Message, flags::MORE, 0, 1, &[0; 1500]);
    bytes.extend(raw(FrameType::Message, 0, 0, 1, &[0; 1000]));
    pair.server.inbox.extend_from_slice(&bytes);
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::MessageTooLarge);
    let events = pair.server.take_events();
    assert!(messages(&events).is_empty());
    assert_eq!(violation_code(&events), ErrorCode::MessageTooLarge);
}

#[test]
fn fragment_with_a_different_id_is_a_protocol_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let mut bytes = raw(FrameType::Message, flags::MORE, 0, 1, b"part one");
    bytes.extend(raw_message(0, 2, b"part two"));
    pair.server.inbox.extend_from_slice(&bytes);
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::ProtocolError
    );
}

// ----- 6. flow control -----------------------------------------------------------------------

#[test]
fn sender_stops_at_the_channel_window_until_the_receiver_releases() {
    let mut pair = Pair::connected(config("c"), with_channel_window("s", 4096));
    pair.server.auto_release = false;
    for i in 0..10 {
        pair.client
            .conn
            .send_message(0, i, CodecId::Raw, pattern(i, 1000))
            .unwrap();
    }
    pair.drive();
    // 4 messages cost 4 * 1020 = 4080 <= 4096; the 16 left cannot carry even one byte.
    let first = pair.server.take_events();
    let first = messages(&first);
    assert_eq!(first.len(), 4);
    assert_eq!(pair.client.sent_of(FrameType::Message).len(), 4);
    assert_eq!(pair.client.conn.queued_bytes(), 6 * 1020);
    let credits: Vec<u32> = first.iter().map(|m| m.credit).collect();

    // Nothing moves with time alone.
    pair.drive();
    assert!(messages(&pair.server.take_events()).is_empty());
    assert!(pair.client.conn.queued_bytes() > 0);

    // Releasing the delivered messages' credit lets the rest flow.
    for c in credits {
        pair.server.conn.release(0, c);
    }
    pair.drive();
    assert!(!pair.server.sent_of(FrameType::WindowUpdate).is_empty());
    let mut ids: Vec<u64> = first.iter().map(|m| m.id).collect();
    for _ in 0..20 {
        let events = pair.server.take_events();
        let batch = messages(&events);
        if batch.is_empty() {
            break;
        }
        for m in batch {
            assert_eq!(m.payload, pattern(m.id, 1000));
            ids.push(m.id);
            pair.server.conn.release(m.channel, m.credit);
        }
        pair.drive();
    }
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    assert_eq!(pair.client.conn.queued_bytes(), 0);
}

#[test]
fn sender_stops_at_the_connection_window_across_channels() {
    let mut server = config("s");
    server.connection_window(4096).unwrap();
    let mut pair = Pair::connected(config("c"), server);
    pair.server.auto_release = false;
    let a = pair.client.conn.open_channel().unwrap();
    let b = pair.client.conn.open_channel().unwrap();
    for i in 0..4 {
        pair.client
            .conn
            .send_message(a, i, CodecId::Raw, pattern(i, 1000))
            .unwrap();
        pair.client
            .conn
            .send_message(b, 10 + i, CodecId::Raw, pattern(i, 1000))
            .unwrap();
    }
    pair.drive();
    let sent: usize = pair
        .client
        .sent_of(FrameType::Message)
        .iter()
        .map(|f| HEADER_LEN + f.payload.len())
        .sum();
    assert!(sent <= 4096, "{sent} bytes of credit used");
    assert!(pair.client.conn.queued_bytes() > 0);
    // Release everything delivered until all arrived.
    let mut got = 0;
    for _ in 0..20 {
        let events = pair.server.take_events();
        for m in messages(&events) {
            got += 1;
            pair.server.conn.release(m.channel, m.credit);
        }
        pair.drive();
    }
    assert_eq!(got, 8);
    assert_eq!(pair.client.conn.queued_bytes(), 0);
}

#[test]
fn message_larger_than_the_window_gets_through_without_release() {
    let mut pair = Pair::connected(config("c"), with_channel_window("s", 4096));
    pair.server.auto_release = false;
    let body = pattern(9, 20 * 1024);
    pair.client
        .conn
        .send_message(0, 9, CodecId::Raw, body.clone())
        .unwrap();
    pair.drive();
    let events = pair.server.take_events();
    let got = messages(&events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, body);
    assert!(got[0].credit <= 4096);
    assert!(pair.client.sent_of(FrameType::Message).len() > 5);
    assert_eq!(pair.client.conn.queued_bytes(), 0);
}

#[test]
fn peer_sending_beyond_the_window_gets_flow_control_error() {
    let mut pair = Pair::connected(config("c"), with_channel_window("s", 4096));
    pair.server.auto_release = false;
    let mut bytes = Vec::new();
    for id in 1..=4 {
        bytes.extend(raw_message(0, id, &[7; 1000])); // 4 * 1020 = 4080 of 4096
    }
    bytes.extend(raw_message(0, 5, &[])); // costs 20 > 16 left
    pair.server.inbox.extend_from_slice(&bytes);
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::FlowControlError);
    let events = pair.server.take_events();
    assert_eq!(
        messages(&events).len(),
        4,
        "frames within the window are delivered"
    );
    assert_eq!(violation_code(&events), ErrorCode::FlowControlError);
}

#[test]
fn window_update_overflowing_the_window_is_a_flow_control_error() {
    let mut pair = Pair::connected(config("c"), config("s"));
    // The server's send window on channel 0 is the client's 1 MiB; add 2^31 - 1 more.
    let inc = ((1u32 << 31) - 1).to_be_bytes();
    pair.server
        .inbox
        .extend_from_slice(&raw(FrameType::WindowUpdate, 0, 0, 0, &inc));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::FlowControlError);
}

#[test]
fn window_update_of_zero_is_a_protocol_error() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server.inbox.extend_from_slice(&raw(
        FrameType::WindowUpdate,
        0,
        0,
        0,
        &0u32.to_be_bytes(),
    ));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
}

#[test]
fn window_update_for_an_unknown_channel_is_ignored() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server.inbox.extend_from_slice(&raw(
        FrameType::WindowUpdate,
        0,
        41,
        0,
        &100u32.to_be_bytes(),
    ));
    pair.drive();
    assert!(pair.server.sent_of(FrameType::Error).is_empty());
    assert!(pair.server.conn.is_open());
}

// ----- 7. channels ---------------------------------------------------------------------------

#[test]
fn channel_opened_on_the_client_appears_on_the_server() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    let b = pair.client.conn.open_channel().unwrap();
    assert_eq!((a, b), (1, 3), "clients open odd ids, increasing");
    // Messages may follow the open at once.
    pair.client
        .conn
        .send_message(a, 1, CodecId::Raw, pattern(1, 10))
        .unwrap();
    pair.drive();
    let events = pair.server.take_events();
    assert_eq!(channel_opened_events(&events), [1, 3]);
    let got = messages(&events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].channel, 1);
    // And back from the server on the client's channel.
    pair.server
        .conn
        .send_message(b, 2, CodecId::Raw, pattern(2, 10))
        .unwrap();
    let s = pair.server.conn.open_channel().unwrap();
    assert_eq!(s, 2, "servers open even ids");
    pair.drive();
    let events = pair.client.take_events();
    assert_eq!(channel_opened_events(&events), [2]);
    assert_eq!(messages(&events)[0].channel, 3);
    assert_eq!(pair.server.conn.channel_count(), 4);
}

#[test]
fn four_interleaved_channels_each_deliver_in_order() {
    let mut c = config("c");
    c.max_frame_size(1024).unwrap();
    let mut s = config("s");
    s.max_frame_size(1024).unwrap();
    let mut pair = Pair::connected(c, s);
    let channels: Vec<u32> = (0..4)
        .map(|_| pair.client.conn.open_channel().unwrap())
        .collect();
    let mut id = 0;
    for round in 0..5 {
        for &ch in &channels {
            id += 1;
            pair.client
                .conn
                .send_message(ch, id, CodecId::Raw, pattern(id, 2500 + round))
                .unwrap();
        }
    }
    pair.drive();

    // The wire really interleaves: frames of different channels alternate.
    let wire: Vec<u32> = pair
        .client
        .sent_of(FrameType::Message)
        .iter()
        .map(|f| f.header.channel)
        .collect();
    let switches = wire.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > 20, "frames not interleaved: {wire:?}");

    let events = pair.server.take_events();
    let mut per_channel: HashMap<u32, Vec<u64>> = HashMap::new();
    for m in messages(&events) {
        assert_eq!(m.payload, pattern(m.id, m.payload.len()));
        per_channel.entry(m.channel).or_default().push(m.id);
    }
    for (i, &ch) in channels.iter().enumerate() {
        let expected: Vec<u64> = (0..5).map(|round| 1 + i as u64 + 4 * round).collect();
        assert_eq!(per_channel[&ch], expected, "channel {ch}");
    }
}

#[test]
fn closing_a_channel_reports_local_on_the_closer_and_remote_on_the_peer() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    let b = pair.client.conn.open_channel().unwrap();
    pair.client
        .conn
        .send_message(a, 1, CodecId::Raw, pattern(1, 5000))
        .unwrap();
    // Closing after queueing: the message still goes out before CHANNEL_CLOSE.
    pair.client.conn.close_channel(a);
    assert_eq!(
        pair.client
            .conn
            .send_message(a, 2, CodecId::Raw, Bytes::new()),
        Err(SendError::ChannelClosed(a))
    );
    pair.drive();

    let client_events = pair.client.take_events();
    let server_events = pair.server.take_events();
    assert_eq!(
        channel_closed_events(&client_events),
        [(a, Initiator::Local)]
    );
    assert_eq!(
        channel_closed_events(&server_events),
        [(a, Initiator::Remote)]
    );
    let got = messages(&server_events);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].channel, got[0].id), (a, 1));
    // The message comes before the close.
    let msg_pos = server_events
        .iter()
        .position(|e| matches!(e, Event::Message(_)))
        .unwrap();
    let close_pos = server_events
        .iter()
        .position(|e| matches!(e, Event::ChannelClosed { .. }))
        .unwrap();
    assert!(msg_pos < close_pos);
    let closes = pair.client.sent_of(FrameType::ChannelClose);
    assert_eq!(closes.len(), 1);
    assert_eq!(code_of(closes[0]), ErrorCode::NoError);

    // The channel is gone on both sides; the other one keeps working both ways.
    assert_eq!(
        pair.server
            .conn
            .send_message(a, 3, CodecId::Raw, Bytes::new()),
        Err(SendError::ChannelClosed(a))
    );
    assert_eq!(pair.client.conn.channel_count(), 2);
    assert_eq!(pair.server.conn.channel_count(), 2);
    pair.client
        .conn
        .send_message(b, 4, CodecId::Raw, pattern(4, 100))
        .unwrap();
    pair.server
        .conn
        .send_message(b, 5, CodecId::Raw, pattern(5, 100))
        .unwrap();
    pair.drive();
    let s = pair.server.take_events();
    let c = pair.client.take_events();
    assert_eq!(
        messages(&s)
            .iter()
            .map(|m| (m.channel, m.id))
            .collect::<Vec<_>>(),
        [(b, 4)]
    );
    assert_eq!(
        messages(&c)
            .iter()
            .map(|m| (m.channel, m.id))
            .collect::<Vec<_>>(),
        [(b, 5)]
    );
}

#[test]
fn server_closing_a_client_opened_channel_reports_local_on_the_server_once() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    pair.drive();
    assert_eq!(channel_opened_events(&pair.server.take_events()), [a]);

    pair.server.conn.close_channel(a);
    pair.drive();
    let client_events = pair.client.take_events();
    let server_events = pair.server.take_events();
    assert_eq!(
        channel_closed_events(&server_events),
        [(a, Initiator::Local)],
        "the closer is told its close completed"
    );
    assert_eq!(
        channel_closed_events(&client_events),
        [(a, Initiator::Remote)],
        "the peer is told once, as Remote"
    );
    assert_eq!(pair.client.conn.channel_count(), 1);
    assert_eq!(pair.server.conn.channel_count(), 1);
}

#[test]
fn simultaneous_close_reports_local_on_both_sides() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    pair.drive();
    pair.server.take_events();
    pair.client.conn.close_channel(a);
    pair.server.conn.close_channel(a);
    pair.drive();
    assert_eq!(
        channel_closed_events(&pair.client.take_events()),
        [(a, Initiator::Local)]
    );
    assert_eq!(
        channel_closed_events(&pair.server.take_events()),
        [(a, Initiator::Local)]
    );
    assert!(pair.client.conn.is_open() && pair.server.conn.is_open());
    assert_eq!(pair.client.conn.channel_count(), 1);
}

#[test]
fn receiver_closing_a_channel_drops_the_senders_unsent_messages() {
    let mut pair = Pair::connected(config("c"), with_channel_window("s", 4096));
    pair.server.auto_release = false;
    let a = pair.client.conn.open_channel().unwrap();
    for i in 0..10 {
        pair.client
            .conn
            .send_message(a, i, CodecId::Raw, pattern(i, 1000))
            .unwrap();
    }
    pair.drive();
    assert!(pair.client.conn.queued_bytes() > 0, "blocked on the window");
    pair.server.conn.close_channel(a);
    pair.drive();
    assert_eq!(
        pair.client.conn.queued_bytes(),
        0,
        "unsent messages dropped"
    );
    assert_eq!(
        channel_closed_events(&pair.client.take_events()),
        [(a, Initiator::Remote)]
    );
    let server_events = pair.server.take_events();
    assert_eq!(
        channel_closed_events(&server_events),
        [(a, Initiator::Local)]
    );
    assert_eq!(messages(&server_events).len(), 4);
    assert!(pair.client.conn.is_open() && pair.server.conn.is_open());
}

#[test]
fn closing_channel_zero_does_nothing_and_a_peer_closing_it_is_a_protocol_error() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.client.conn.close_channel(0);
    pair.drive();
    assert!(pair.client.sent_of(FrameType::ChannelClose).is_empty());
    pair.client
        .conn
        .send_message(0, 1, CodecId::Raw, Bytes::new())
        .unwrap();
    pair.server.inbox.extend_from_slice(&raw(
        FrameType::ChannelClose,
        0,
        0,
        0,
        &0u32.to_be_bytes(),
    ));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
}

#[test]
fn message_on_an_unknown_channel_is_a_channel_closed_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server
        .inbox
        .extend_from_slice(&raw_message(7, 1, b"?"));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ChannelClosed);
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::ChannelClosed
    );
    match closed(&pair.client.take_events()) {
        ConnectionError::PeerError { code, .. } => assert_eq!(*code, ErrorCode::ChannelClosed),
        other => panic!("client: {other:?}"),
    }
}

#[test]
fn message_on_a_closed_channel_is_a_channel_closed_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    pair.client
        .conn
        .send_message(a, 1, CodecId::Raw, pattern(1, 10))
        .unwrap();
    pair.client.conn.close_channel(a);
    pair.drive();
    assert_eq!(pair.server.conn.channel_count(), 1, "channel gone");
    pair.server.take_events();
    pair.server
        .inbox
        .extend_from_slice(&raw_message(a, 2, b"late"));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ChannelClosed);
    let events = pair.server.take_events();
    assert!(messages(&events).is_empty());
    assert_eq!(violation_code(&events), ErrorCode::ChannelClosed);
}

#[test]
fn message_after_the_peers_channel_close_is_a_channel_closed_violation() {
    // The server has not answered yet (it never transmits here): the channel is half-closed.
    let mut server = lone_server_fed(&raw_hello(&hello("c")));
    server.take_events();
    let mut bytes = raw(FrameType::ChannelOpen, 0, 1, 0, &[]);
    bytes.extend(raw(FrameType::ChannelClose, 0, 1, 0, &0u32.to_be_bytes()));
    bytes.extend(raw_message(1, 1, b"late"));
    server.inbox.extend_from_slice(&bytes);
    server.receive(Instant::now());
    let events = server.take_events();
    assert_eq!(channel_closed_events(&events), [(1, Initiator::Remote)]);
    assert_eq!(violation_code(&events), ErrorCode::ChannelClosed);
}

#[test]
fn duplicate_channel_open_id_is_a_protocol_error() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let a = pair.client.conn.open_channel().unwrap();
    pair.drive();
    pair.server.take_events();
    pair.server
        .inbox
        .extend_from_slice(&raw(FrameType::ChannelOpen, 0, a, 0, &[]));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::ProtocolError
    );
}

#[test]
fn channel_open_with_wrong_parity_or_zero_is_a_protocol_error() {
    for id in [0, 2, 4] {
        let mut server = lone_server_fed(&raw_hello(&hello("c")));
        server.take_events();
        server
            .inbox
            .extend_from_slice(&raw(FrameType::ChannelOpen, 0, id, 0, &[]));
        server.receive(Instant::now());
        assert_eq!(
            violation_code(&server.take_events()),
            ErrorCode::ProtocolError,
            "open of {id}"
        );
    }
}

#[test]
fn server_refuses_a_channel_past_max_channels() {
    let mut server_cfg = config("s");
    server_cfg.max_channels(2);
    let mut pair = Pair::new(config("c"), server_cfg);
    // Handshake by hand, rewriting the WELCOME so that the client believes the server allows
    // 8 channels: the client's own check passes and the server has to refuse.
    let now = pair.now;
    pair.client.flush(now, &mut pair.server.inbox);
    pair.server.receive(now);
    let mut welcome = BytesMut::new();
    pair.server.flush(now, &mut welcome);
    welcome[HEADER_LEN + 24..HEADER_LEN + 28].copy_from_slice(&8u32.to_be_bytes());
    pair.client.inbox.extend_from_slice(&welcome);
    pair.drive();
    match pair.client.take_events().as_slice() {
        [Event::Connected(h)] => assert_eq!(h.max_channels, 8),
        other => panic!("client: {other:?}"),
    }
    pair.server.take_events();

    let ids: Vec<u32> = (0..3)
        .map(|_| pair.client.conn.open_channel().unwrap())
        .collect();
    assert_eq!(ids, [1, 3, 5]);
    for &ch in &ids {
        pair.client
            .conn
            .send_message(ch, u64::from(ch), CodecId::Raw, pattern(1, 100))
            .unwrap();
    }
    pair.drive();

    let server_events = pair.server.take_events();
    assert_eq!(channel_opened_events(&server_events), [1, 3]);
    let delivered: Vec<u32> = messages(&server_events).iter().map(|m| m.channel).collect();
    assert_eq!(
        delivered,
        [1, 3],
        "data on the refused channel is discarded"
    );
    assert!(channel_closed_events(&server_events).is_empty());
    let closes = pair.server.sent_of(FrameType::ChannelClose);
    assert_eq!(closes.len(), 1);
    assert_eq!(closes[0].header.channel, 5);
    assert_eq!(code_of(closes[0]), ErrorCode::ChannelRefused);

    assert_eq!(
        channel_closed_events(&pair.client.take_events()),
        [(5, Initiator::Remote)]
    );
    assert_eq!(
        pair.client
            .conn
            .send_message(5, 9, CodecId::Raw, Bytes::new()),
        Err(SendError::ChannelClosed(5))
    );
    // Both sides forgot channel 5; the accepted channels still work.
    assert_eq!(pair.client.conn.channel_count(), 3);
    assert_eq!(pair.server.conn.channel_count(), 3);
    pair.client
        .conn
        .send_message(3, 42, CodecId::Raw, pattern(42, 10))
        .unwrap();
    pair.drive();
    let events = pair.server.take_events();
    assert_eq!(messages(&events)[0].id, 42);
    assert!(pair.client.conn.is_open() && pair.server.conn.is_open());
}

#[test]
fn client_open_fails_locally_at_the_servers_channel_limit() {
    let mut server_cfg = config("s");
    server_cfg.max_channels(1);
    let mut pair = Pair::connected(config("c"), server_cfg);
    pair.client.conn.open_channel().unwrap();
    assert_eq!(pair.client.conn.open_channel(), Err(OpenError::Limit(1)));
    pair.drive();
    assert!(pair.client.sent_of(FrameType::ChannelOpen).len() == 1);
}

#[test]
fn server_accepts_a_peer_channel_while_holding_many_of_its_own() {
    // The server allows the client 1 channel; the client allows the server 256. The server's
    // own channels must not count against the client's limit.
    let mut server_cfg = config("s");
    server_cfg.max_channels(1);
    let mut pair = Pair::connected(config("c"), server_cfg);
    for _ in 0..4 {
        pair.server.conn.open_channel().unwrap();
    }
    pair.drive();
    assert_eq!(
        channel_opened_events(&pair.client.take_events()),
        [2, 4, 6, 8]
    );
    let a = pair.client.conn.open_channel().unwrap();
    pair.drive();
    let events = pair.server.take_events();
    assert_eq!(channel_opened_events(&events), [a]);
    assert!(pair.server.sent_of(FrameType::Error).is_empty());
    assert!(pair.server.conn.is_open());
}

#[test]
fn peer_holding_more_than_twice_max_channels_gets_channel_limit() {
    let mut cfg = config("s");
    cfg.max_channels(1);
    let now = Instant::now();
    let mut server = Peer::new(cfg, Side::Server, now);
    server.inbox.extend_from_slice(&raw_hello(&hello("c")));
    server.receive(now);
    server.take_events();
    // 1 accepted + 1 refused (never answered) = 2 = twice max_channels: still tolerated.
    for id in [1, 3] {
        server
            .inbox
            .extend_from_slice(&raw(FrameType::ChannelOpen, 0, id, 0, &[]));
    }
    server.receive(now);
    server.flush(now, &mut BytesMut::new());
    let refused: Vec<u32> = server
        .sent_of(FrameType::ChannelClose)
        .iter()
        .filter(|f| code_of(f) == ErrorCode::ChannelRefused)
        .map(|f| f.header.channel)
        .collect();
    assert_eq!(refused, [3]);
    assert!(server.conn.is_open());
    // A third one held at once is more than twice the limit.
    server
        .inbox
        .extend_from_slice(&raw(FrameType::ChannelOpen, 0, 5, 0, &[]));
    server.receive(now);
    server.flush(now, &mut BytesMut::new());
    assert_eq!(sent_error_code(&server), ErrorCode::ChannelLimit);
    assert_eq!(
        violation_code(&server.take_events()),
        ErrorCode::ChannelLimit
    );
}

// ----- 8. graceful close ---------------------------------------------------------------------

#[test]
fn graceful_close_sends_every_queued_message_then_goaway() {
    // A small window so that draining needs WINDOW_UPDATEs from the peer.
    let mut pair = Pair::connected(config("c"), with_channel_window("s", 4096));
    let a = pair.client.conn.open_channel().unwrap();
    for i in 0..8 {
        pair.client
            .conn
            .send_message(0, i, CodecId::Raw, pattern(i, 1500))
            .unwrap();
    }
    for i in 8..10 {
        pair.client
            .conn
            .send_message(a, i, CodecId::Raw, pattern(i, 10))
            .unwrap();
    }
    pair.client.conn.close(ErrorCode::NoError, "bye");
    assert!(!pair.client.conn.is_open());
    assert!(!pair.client.conn.is_closed(), "draining, not closed yet");
    assert_eq!(
        pair.client
            .conn
            .send_message(0, 99, CodecId::Raw, Bytes::new()),
        Err(SendError::Closed)
    );
    assert_eq!(pair.client.conn.open_channel(), Err(OpenError::Closed));
    pair.drive();

    let server_events = pair.server.take_events();
    let got = messages(&server_events);
    let ch0: Vec<u64> = got
        .iter()
        .filter(|m| m.channel == 0)
        .map(|m| m.id)
        .collect();
    let cha: Vec<u64> = got
        .iter()
        .filter(|m| m.channel == a)
        .map(|m| m.id)
        .collect();
    assert_eq!(ch0, (0..8).collect::<Vec<_>>());
    assert_eq!(cha, [8, 9]);
    for m in &got {
        assert_eq!(m.payload, pattern(m.id, m.payload.len()));
    }
    match closed(&server_events) {
        ConnectionError::GoAway { code, reason } => {
            assert_eq!(*code, ErrorCode::NoError);
            assert_eq!(reason, "bye");
        }
        other => panic!("server: {other:?}"),
    }
    assert!(!pair.server.sent_of(FrameType::WindowUpdate).is_empty());

    let last = pair.client.sent.last().unwrap();
    assert_eq!(
        last.header.ty,
        FrameType::GoAway,
        "GOAWAY is the last frame"
    );
    assert_eq!(code_of(last), ErrorCode::NoError);
    assert_eq!(pair.client.sent_of(FrameType::GoAway).len(), 1);
    assert!(matches!(
        closed(&pair.client.take_events()),
        ConnectionError::LocallyClosed {
            code: ErrorCode::NoError
        }
    ));
    assert!(pair.client.conn.is_closed() && pair.server.conn.is_closed());
    assert_eq!(pair.client.conn.queued_bytes(), 0);
    assert_eq!(
        pair.client
            .conn
            .send_message(0, 100, CodecId::Raw, Bytes::new()),
        Err(SendError::Closed)
    );
    assert_eq!(pair.client.conn.poll_timeout(), None);
}

#[test]
fn close_with_nothing_queued_sends_goaway_at_once() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server
        .conn
        .close(ErrorCode::Other(4242), "maintenance");
    assert!(pair.server.conn.is_closed());
    assert!(matches!(
        closed(&pair.server.take_events()),
        ConnectionError::LocallyClosed {
            code: ErrorCode::Other(4242)
        }
    ));
    assert_eq!(
        pair.server
            .conn
            .send_message(0, 1, CodecId::Raw, Bytes::new()),
        Err(SendError::Closed)
    );
    pair.drive();
    match closed(&pair.client.take_events()) {
        ConnectionError::GoAway { code, reason } => {
            assert_eq!(
                *code,
                ErrorCode::Other(4242),
                "unknown codes are kept as-is"
            );
            assert_eq!(reason, "maintenance");
        }
        other => panic!("client: {other:?}"),
    }
}

#[test]
fn eof_without_goaway_closes_with_eof() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server.conn.handle_eof();
    assert!(matches!(
        closed(&pair.server.take_events()),
        ConnectionError::Eof
    ));
    assert_eq!(
        pair.server
            .conn
            .send_message(0, 1, CodecId::Raw, Bytes::new()),
        Err(SendError::Closed)
    );
}

// ----- 9. random operations ------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Send {
        server: bool,
        channel: Index,
        size: usize,
    },
    Open {
        server: bool,
    },
    Close {
        server: bool,
        channel: Index,
    },
    Release {
        server: bool,
    },
    Advance {
        ms: u64,
    },
    Drive,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), any::<Index>(), 0usize..5000)
            .prop_map(|(server, channel, size)| Op::Send { server, channel, size }),
        1 => any::<bool>().prop_map(|server| Op::Open { server }),
        1 => (any::<bool>(), any::<Index>())
            .prop_map(|(server, channel)| Op::Close { server, channel }),
        2 => any::<bool>().prop_map(|server| Op::Release { server }),
        2 => (0u64..1500).prop_map(|ms| Op::Advance { ms }),
        2 => Just(Op::Drive),
    ]
}

/// What the random-operations test knows; index 0 is the client, 1 the server.
#[derive(Default)]
struct Model {
    next_id: u64,
    /// Message id -> (sender index, channel, length).
    sent: HashMap<u64, (usize, u32, usize)>,
    /// Channels each side can name (channel 0, its own, and those it was told of).
    known: [Vec<u32>; 2],
    /// Channels on which each side called `close_channel`.
    close_called: [HashSet<u32>; 2],
    /// Message ids delivered to each side, per channel.
    delivered: [HashMap<u32, Vec<u64>>; 2],
    /// Credit of delivered messages not released yet.
    unreleased: [Vec<(u32, u32)>; 2],
    /// ChannelClosed events seen by each side.
    closed_events: [HashMap<u32, Vec<Initiator>>; 2],
}

impl Model {
    fn any_close(&self, ch: u32) -> bool {
        self.close_called.iter().any(|s| s.contains(&ch))
    }

    fn absorb(&mut self, pair: &mut Pair) -> Result<(), TestCaseError> {
        for side in 0..2 {
            let peer = if side == 0 {
                &mut pair.client
            } else {
                &mut pair.server
            };
            for ev in peer.take_events() {
                match ev {
                    Event::Message(m) => {
                        let Some(&(from, ch, len)) = self.sent.get(&m.id) else {
                            return Err(TestCaseError::fail(format!("unknown id {}", m.id)));
                        };
                        prop_assert_eq!(from, 1 - side, "message delivered to its sender");
                        prop_assert_eq!(m.channel, ch);
                        prop_assert_eq!(m.codec, CodecId::ALL[(m.id % 4) as usize]);
                        prop_assert_eq!(&m.payload, &pattern(m.id, len));
                        prop_assert!(
                            !self.closed_events[side].contains_key(&ch),
                            "message on channel {} after its ChannelClosed",
                            ch
                        );
                        let ids = self.delivered[side].entry(ch).or_default();
                        if let Some(&prev) = ids.last() {
                            prop_assert!(
                                prev < m.id,
                                "channel {} out of order: {} then {}",
                                ch,
                                prev,
                                m.id
                            );
                        }
                        ids.push(m.id);
                        self.unreleased[side].push((m.channel, m.credit));
                    }
                    Event::ChannelOpened { channel, .. } => {
                        prop_assert!(!self.known[side].contains(&channel));
                        self.known[side].push(channel);
                    }
                    Event::ChannelClosed { channel, initiator } => {
                        self.closed_events[side]
                            .entry(channel)
                            .or_default()
                            .push(initiator);
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "side {side}: unexpected event {other:?}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn release_all(&mut self, pair: &mut Pair, side: usize) {
        let conn = if side == 0 {
            &mut pair.client.conn
        } else {
            &mut pair.server.conn
        };
        for (ch, credit) in self.unreleased[side].drain(..) {
            conn.release(ch, credit);
        }
    }
}

fn run_ops(ops: &[Op]) -> Result<(), TestCaseError> {
    let mk = |name: &str| {
        let mut c = config(name);
        c.max_frame_size(1024).unwrap();
        c.channel_window(4096).unwrap();
        c.connection_window(16 * 1024).unwrap();
        c.heartbeat(Duration::from_secs(1)).unwrap();
        c
    };
    let mut pair = Pair::connected(mk("c"), mk("s"));
    pair.client.auto_release = false;
    pair.server.auto_release = false;
    let mut model = Model {
        known: [vec![0], vec![0]],
        ..Model::default()
    };

    for op in ops {
        match *op {
            Op::Send {
                server,
                channel,
                size,
            } => {
                let side = usize::from(server);
                let ch = *channel.get(&model.known[side]);
                let id = model.next_id;
                model.next_id += 1;
                let codec = CodecId::ALL[(id % 4) as usize];
                let conn = if server {
                    &mut pair.server.conn
                } else {
                    &mut pair.client.conn
                };
                match conn.send_message(ch, id, codec, pattern(id, size)) {
                    Ok(()) => {
                        model.sent.insert(id, (side, ch, size));
                    }
                    Err(SendError::ChannelClosed(c)) => {
                        prop_assert_eq!(c, ch);
                        prop_assert!(
                            model.any_close(ch),
                            "send on channel {} refused though nobody closed it",
                            ch
                        );
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("send failed: {e}"))),
                }
            }
            Op::Open { server } => {
                let side = usize::from(server);
                let conn = if server {
                    &mut pair.server.conn
                } else {
                    &mut pair.client.conn
                };
                let ch = conn
                    .open_channel()
                    .map_err(|e| TestCaseError::fail(format!("open failed: {e}")))?;
                prop_assert_eq!(ch % 2, if server { 0 } else { 1 });
                model.known[side].push(ch);
            }
            Op::Close { server, channel } => {
                let side = usize::from(server);
                let candidates: Vec<u32> = model.known[side]
                    .iter()
                    .copied()
                    .filter(|&c| c != 0)
                    .collect();
                if candidates.is_empty() {
                    continue;
                }
                let ch = *channel.get(&candidates);
                if server {
                    pair.server.conn.close_channel(ch);
                } else {
                    pair.client.conn.close_channel(ch);
                }
                // A close after the peer's close was seen is a no-op, not a close of ours.
                if !model.closed_events[side].contains_key(&ch) {
                    model.close_called[side].insert(ch);
                }
            }
            Op::Release { server } => model.release_all(&mut pair, usize::from(server)),
            Op::Advance { ms } => pair.advance(Duration::from_millis(ms)),
            Op::Drive => pair.drive(),
        }
        model.absorb(&mut pair)?;
    }

    // Settle: hand back every credit until nothing moves any more.
    for _ in 0..200 {
        pair.drive();
        model.absorb(&mut pair)?;
        if model.unreleased.iter().all(Vec::is_empty) {
            break;
        }
        model.release_all(&mut pair, 0);
        model.release_all(&mut pair, 1);
    }
    prop_assert!(model.unreleased.iter().all(Vec::is_empty), "never settled");

    prop_assert!(pair.client.conn.is_open(), "client closed");
    prop_assert!(pair.server.conn.is_open(), "server closed");
    prop_assert_eq!(pair.client.conn.queued_bytes(), 0);
    prop_assert_eq!(pair.server.conn.queued_bytes(), 0);

    // Everything sent on a channel nobody closed arrived.
    for (&id, &(from, ch, _)) in &model.sent {
        if model.any_close(ch) {
            continue;
        }
        let got = model.delivered[1 - from]
            .get(&ch)
            .is_some_and(|ids| ids.contains(&id));
        prop_assert!(
            got,
            "message {} on channel {} from side {} lost",
            id,
            ch,
            from
        );
    }
    // Every closed channel was reported exactly once on each side, with the right initiator
    // when only one side asked for the close.
    let closed: HashSet<u32> = model.close_called.iter().flatten().copied().collect();
    for &ch in &closed {
        for side in 0..2 {
            let events = model.closed_events[side]
                .get(&ch)
                .cloned()
                .unwrap_or_default();
            prop_assert_eq!(
                events.len(),
                1,
                "side {} channel {}: {:?}",
                side,
                ch,
                events
            );
            let mine = model.close_called[side].contains(&ch);
            let theirs = model.close_called[1 - side].contains(&ch);
            if mine && !theirs {
                prop_assert_eq!(events[0], Initiator::Local);
            } else if theirs && !mine {
                prop_assert_eq!(events[0], Initiator::Remote);
            }
        }
    }
    for side in 0..2 {
        for ch in model.closed_events[side].keys() {
            prop_assert!(
                closed.contains(ch),
                "ChannelClosed for {} nobody closed",
                ch
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_operations_keep_order_and_deliver_everything(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        run_ops(&ops)?;
    }
}

// ----- 10. hostile input ---------------------------------------------------------------------

/// Drains a connection's transmits (checking each is a valid frame) and events.
fn drain(conn: &mut Connection, now: Instant) {
    let mut decoder = Decoder::new(u32::MAX);
    for _ in 0..100_000 {
        let Some(t) = conn.poll_transmit(now) else {
            break;
        };
        let mut bytes = BytesMut::from(&t.header[..]);
        bytes.extend_from_slice(&t.payload);
        let frame = decoder.decode(&mut bytes).expect("invalid transmit");
        assert!(frame.is_some() && bytes.is_empty());
    }
    while conn.poll_event().is_some() {}
    if conn.is_closed() {
        assert_eq!(conn.poll_timeout(), None);
    }
}

/// Feeds `data` into `conn` in chunks cut at `cuts`.
fn feed_chunks(conn: &mut Connection, now: Instant, data: &[u8], cuts: &[Index]) {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    points.push(data.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut prev = 0;
    for p in points {
        buf.extend_from_slice(&data[prev..p]);
        prev = p;
        let _ = conn.handle_input(now, &mut buf);
        drain(conn, now);
    }
}

fn small_limits(name: &str) -> Config {
    let mut c = config(name);
    c.max_frame_size(1024).unwrap();
    c.max_message_size(2048).unwrap();
    c.channel_window(1024).unwrap();
    c.connection_window(2048).unwrap();
    c.max_channels(2);
    c.max_reassembly(3000);
    c.heartbeat(Duration::from_millis(500)).unwrap();
    c
}

/// One frame with a well-formed-looking header, to get past the decoder into the state machine.
fn arb_frame_bytes() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        Just(Vec::new()),
        (0u32..5000).prop_map(|v| v.to_be_bytes().to_vec()),
        any::<u32>().prop_map(|v| v.to_be_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..1100),
    ];
    (
        1u8..=15,
        prop_oneof![4 => Just(0u8), 2 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![4 => Just(0u8), 1 => 0u8..=4],
        0u32..8,
        0u64..4,
        payload,
    )
        .prop_map(|(ty, flags, codec, channel, id, payload)| {
            let mut out = vec![1, ty, flags, codec];
            out.extend_from_slice(&channel.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
            out.extend_from_slice(&payload);
            out
        })
}

#[derive(Clone, Debug)]
enum FuzzOp {
    Frame(Vec<u8>),
    Open,
    Close(u32),
    Send(u32, usize),
    Release(u32, u32),
    Timeout(u64),
    GoAway,
}

fn fuzz_op() -> impl Strategy<Value = FuzzOp> {
    prop_oneof![
        8 => arb_frame_bytes().prop_map(FuzzOp::Frame),
        1 => Just(FuzzOp::Open),
        1 => (0u32..8).prop_map(FuzzOp::Close),
        2 => (0u32..8, 0usize..3000).prop_map(|(c, n)| FuzzOp::Send(c, n)),
        1 => (0u32..8, 0u32..5000).prop_map(|(c, n)| FuzzOp::Release(c, n)),
        1 => (0u64..3000).prop_map(FuzzOp::Timeout),
        1 => Just(FuzzOp::GoAway),
    ]
}

/// A connection of `side` that completed its handshake with a forged peer.
fn opened(side: Side, now: Instant) -> Connection {
    let mut conn = Connection::new(Arc::new(small_limits("me")), side, now);
    drain(&mut conn, now);
    let mut peer = hello("peer");
    peer.max_frame_size = 1024;
    peer.channel_window = 1024;
    peer.connection_window = 2048;
    peer.max_channels = 3;
    let ty = match side {
        Side::Server => FrameType::Hello,
        Side::Client => FrameType::Welcome,
    };
    let mut buf = BytesMut::from(&raw(ty, 0, 0, 0, &peer.encode())[..]);
    conn.handle_input(now, &mut buf).unwrap();
    assert!(conn.is_open());
    drain(&mut conn, now);
    conn
}

fn run_fuzz_ops(mut conn: Connection, t0: Instant, ops: Vec<FuzzOp>) {
    let mut now = t0;
    for op in ops {
        match op {
            FuzzOp::Frame(bytes) => {
                let mut buf = BytesMut::from(&bytes[..]);
                let _ = conn.handle_input(now, &mut buf);
            }
            FuzzOp::Open => {
                let _ = conn.open_channel();
            }
            FuzzOp::Close(ch) => conn.close_channel(ch),
            FuzzOp::Send(ch, n) => {
                let _ = conn.send_message(ch, 1, CodecId::Raw, pattern(1, n));
            }
            FuzzOp::Release(ch, credit) => conn.release(ch, credit),
            FuzzOp::Timeout(ms) => {
                now += Duration::from_millis(ms);
                conn.handle_timeout(now);
            }
            FuzzOp::GoAway => conn.close(ErrorCode::NoError, "fuzz"),
        }
        drain(&mut conn, now);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_a_server(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let now = Instant::now();
        let mut server = Connection::new(Arc::new(small_limits("s")), Side::Server, now);
        feed_chunks(&mut server, now, &data, &cuts);
        server.handle_timeout(now + Duration::from_secs(11));
        drain(&mut server, now);
        prop_assert!(!server.is_open() || server.peer().is_some());
    }

    #[test]
    fn arbitrary_bytes_never_panic_a_client_after_its_hello(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let now = Instant::now();
        let mut client = Connection::new(Arc::new(small_limits("c")), Side::Client, now);
        let hello = client.poll_transmit(now).expect("HELLO");
        prop_assert_eq!(Header::decode(&hello.header, 1024).unwrap().ty, FrameType::Hello);
        feed_chunks(&mut client, now, &data, &cuts);
        client.handle_timeout(now + Duration::from_secs(11));
        drain(&mut client, now);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_hello_never_panic_a_server(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let now = Instant::now();
        let mut input = raw_hello(&hello("c"));
        input.extend_from_slice(&data);
        let mut server = Connection::new(Arc::new(small_limits("s")), Side::Server, now);
        feed_chunks(&mut server, now, &input, &cuts);
    }

    #[test]
    fn random_frames_and_calls_never_panic_an_open_server(
        ops in proptest::collection::vec(fuzz_op(), 0..60)
    ) {
        let now = Instant::now();
        run_fuzz_ops(opened(Side::Server, now), now, ops);
    }

    #[test]
    fn random_frames_and_calls_never_panic_an_open_client(
        ops in proptest::collection::vec(fuzz_op(), 0..60)
    ) {
        let now = Instant::now();
        run_fuzz_ops(opened(Side::Client, now), now, ops);
    }
}

// ----- requests, responses, cancel, labels ---------------------------------------------------

#[test]
fn request_and_response_arrive_with_their_kind_and_id() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.client
        .conn
        .send(
            Kind::Request,
            0,
            7,
            CodecId::Json,
            Bytes::from_static(b"{\"a\":1}"),
        )
        .unwrap();
    pair.drive();
    let events = pair.server.take_events();
    let got = messages(&events);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].kind, got[0].id), (Kind::Request, 7));
    pair.server
        .conn
        .send(
            Kind::Response,
            0,
            7,
            CodecId::Json,
            Bytes::from_static(b"2"),
        )
        .unwrap();
    pair.drive();
    let events = pair.client.take_events();
    let got = messages(&events);
    assert_eq!(
        (got[0].kind, got[0].id, &got[0].payload[..]),
        (Kind::Response, 7, &b"2"[..])
    );
    assert_eq!(pair.server.sent_of(FrameType::Response).len(), 1);
}

#[test]
fn large_request_is_fragmented_and_reassembled_as_a_request() {
    let mut c = config("c");
    c.max_frame_size(1024).unwrap();
    let mut pair = Pair::connected(config("c"), c);
    let body = pattern(3, 10_000);
    pair.client
        .conn
        .send(Kind::Request, 0, 3, CodecId::Postcard, body.clone())
        .unwrap();
    pair.drive();
    assert!(pair.client.sent_of(FrameType::Request).len() >= 10);
    let events = pair.server.take_events();
    let got = messages(&events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, Kind::Request);
    assert_eq!(got[0].payload, body);
}

#[test]
fn fragment_of_another_kind_is_a_protocol_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let mut bytes = raw(FrameType::Request, flags::MORE, 0, 1, b"part one");
    bytes.extend(raw(FrameType::Message, 0, 0, 1, b"part two"));
    pair.server.inbox.extend_from_slice(&bytes);
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
}

#[test]
fn cancel_reaches_the_peer_as_an_event_with_the_request_id() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.client.conn.cancel_request(42);
    pair.drive();
    let events = pair.server.take_events();
    assert!(
        events.iter().any(|e| matches!(e, Event::Cancel { id: 42 })),
        "{events:?}"
    );
}

#[test]
fn cancel_with_a_payload_or_on_a_channel_is_a_protocol_violation() {
    for bytes in [
        raw(FrameType::Cancel, 0, 0, 1, b"x"),
        raw(FrameType::Cancel, 0, 1, 1, b""),
    ] {
        let mut pair = Pair::connected(config("c"), config("s"));
        pair.server.inbox.extend_from_slice(&bytes);
        pair.drive();
        assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
    }
}

#[test]
fn channel_label_travels_with_the_open() {
    let mut pair = Pair::connected(config("c"), config("s"));
    let id = pair
        .client
        .conn
        .open_labeled_channel("slic.upload")
        .unwrap();
    pair.drive();
    let events = pair.server.take_events();
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::ChannelOpened { channel, label } if *channel == id && label == "slic.upload"
        )),
        "{events:?}"
    );
    let long = "x".repeat(256);
    assert_eq!(
        pair.client.conn.open_labeled_channel(&long),
        Err(OpenError::Label)
    );
}

#[test]
fn channel_label_that_is_not_utf8_is_a_protocol_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server
        .inbox
        .extend_from_slice(&raw(FrameType::ChannelOpen, 0, 1, 0, &[0xff, 0xfe]));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
}

// ----- control-frame budget ------------------------------------------------------------------

#[test]
fn ping_flood_past_the_budget_gets_goaway_enhance_your_calm() {
    let mut server = config("s");
    server.control_budget(100, 10);
    let mut pair = Pair::connected(config("c"), server);
    let flood = |range: std::ops::Range<u64>| {
        range
            .flat_map(|id| raw(FrameType::Ping, 0, 0, id, b""))
            .collect::<Vec<u8>>()
    };
    pair.server.inbox.extend_from_slice(&flood(0..100));
    pair.drive();
    assert_eq!(
        pair.server.sent_of(FrameType::Pong).len(),
        100,
        "within budget"
    );
    assert!(pair.server.conn.is_open());
    pair.server.inbox.extend_from_slice(&flood(100..150));
    pair.drive();
    assert_eq!(
        pair.server.sent_of(FrameType::Pong).len(),
        100,
        "no answer past it"
    );
    let goaways = pair.server.sent_of(FrameType::GoAway);
    assert_eq!(goaways.len(), 1);
    assert_eq!(code_of(goaways[0]), ErrorCode::EnhanceYourCalm);
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::EnhanceYourCalm
    );
}

#[test]
fn control_frames_within_the_refill_rate_never_trip_the_budget() {
    let mut server = config("s");
    server.control_budget(10, 100);
    let mut pair = Pair::connected(config("c"), server);
    // 500 pings, 5 every 100 ms: 50/s against a refill of 100/s.
    for round in 0..100u64 {
        for i in 0..5 {
            let ping = raw(FrameType::Ping, 0, 0, round * 5 + i, b"");
            pair.server.inbox.extend_from_slice(&ping);
        }
        pair.drive();
        pair.now += Duration::from_millis(100);
    }
    assert_eq!(pair.server.sent_of(FrameType::Pong).len(), 500);
    assert!(pair.server.conn.is_open());
}

#[test]
fn channel_open_and_close_churn_counts_against_the_budget() {
    let mut server = config("s");
    server.control_budget(50, 1);
    let mut pair = Pair::connected(config("c"), server);
    let mut closed = false;
    for _ in 0..100 {
        let Ok(id) = pair.client.conn.open_channel() else {
            closed = true;
            break;
        };
        pair.client.conn.close_channel(id);
        pair.drive();
        if !pair.server.conn.is_open() {
            closed = true;
            break;
        }
    }
    assert!(closed, "churn past the budget must end the connection");
    assert_eq!(
        violation_code(&pair.server.take_events()),
        ErrorCode::EnhanceYourCalm
    );
}

// ----- compression negotiation ---------------------------------------------------------------

fn with_compression(name: &str, algs: &[Compression]) -> Config {
    let mut c = config(name);
    c.compression(algs).unwrap();
    c
}

#[test]
fn server_picks_its_most_preferred_algorithm_the_client_offered() {
    let pair = Pair::connected(
        with_compression("c", &[Compression::Lz4, Compression::Zstd]),
        with_compression("s", &[Compression::Zstd, Compression::Lz4]),
    );
    assert_eq!(pair.client.conn.compression(), Some(Compression::Zstd));
    assert_eq!(pair.server.conn.compression(), Some(Compression::Zstd));
}

#[test]
fn nodes_with_no_algorithm_in_common_fall_back_to_none() {
    for (c, s) in [
        (vec![Compression::Lz4], vec![Compression::Zstd]),
        (vec![], vec![Compression::Lz4]),
        (vec![Compression::Lz4], vec![]),
    ] {
        let pair = Pair::connected(with_compression("c", &c), with_compression("s", &s));
        assert_eq!(pair.client.conn.compression(), None);
        assert_eq!(pair.server.conn.compression(), None);
        let mut pair = pair;
        assert_eq!(
            pair.client.conn.send_compressed(
                Kind::Message,
                0,
                1,
                CodecId::Raw,
                Bytes::from_static(b"x"),
                true
            ),
            Err(SendError::NotNegotiated)
        );
        pair.drive();
    }
}

#[test]
fn compressed_flag_travels_on_every_fragment_and_is_reported() {
    let mut small = with_compression("s", &[Compression::Lz4]);
    small.max_frame_size(1024).unwrap();
    let mut pair = Pair::connected(with_compression("c", &[Compression::Lz4]), small);
    let body = pattern(9, 5000);
    pair.client
        .conn
        .send_compressed(Kind::Message, 0, 9, CodecId::Raw, body.clone(), true)
        .unwrap();
    pair.drive();
    let frames = pair.client.sent_of(FrameType::Message);
    assert!(frames.len() > 1);
    assert!(
        frames
            .iter()
            .all(|f| f.header.flags & flags::COMPRESSED != 0)
    );
    let events = pair.server.take_events();
    let got = messages(&events);
    assert!(got[0].compressed);
    assert_eq!(got[0].payload, body);
}

#[test]
fn compressed_flag_without_negotiation_is_a_protocol_violation() {
    let mut pair = Pair::connected(config("c"), config("s"));
    pair.server
        .inbox
        .extend_from_slice(&raw(FrameType::Message, flags::COMPRESSED, 0, 1, b"zz"));
    pair.drive();
    assert_eq!(sent_error_code(&pair.server), ErrorCode::ProtocolError);
}

#[test]
fn client_refuses_a_welcome_choosing_an_algorithm_it_did_not_offer() {
    let mut client = Peer::new(
        with_compression("c", &[Compression::Lz4]),
        Side::Client,
        Instant::now(),
    );
    let mut welcome = hello("s");
    welcome.compression = vec![2];
    client
        .inbox
        .extend_from_slice(&raw(FrameType::Welcome, 0, 0, 0, &welcome.encode()));
    client.receive(Instant::now());
    assert_eq!(
        violation_code(&client.take_events()),
        ErrorCode::HandshakeFailed
    );
}

// ----- frame checksum ------------------------------------------------------------------------

fn with_checksum(name: &str, on: bool) -> Config {
    let mut c = config(name);
    c.checksum(on);
    c
}

#[test]
fn checksums_are_used_only_when_both_sides_ask() {
    for (c, s, expect) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
        (false, false, false),
    ] {
        let mut pair = Pair::connected(with_checksum("c", c), with_checksum("s", s));
        pair.client
            .conn
            .send_message(0, 1, CodecId::Raw, Bytes::from_static(b"hello"))
            .unwrap();
        pair.drive();
        let events = pair.server.take_events();
        assert_eq!(messages(&events).len(), 1, "{c} {s}");
        // The message frame is followed by a trailer exactly when both asked: the wire
        // count of the client's bytes tells.
        let mut wire = BytesMut::new();
        pair.client
            .conn
            .send_message(0, 2, CodecId::Raw, Bytes::from_static(b"again"))
            .unwrap();
        while let Some(t) = pair.client.conn.poll_transmit(pair.now) {
            assert_eq!(t.trailer.is_some(), expect, "{c} {s}");
            t.write_to(&mut wire);
        }
        let trailer = if expect { 4 } else { 0 };
        assert_eq!(wire.len(), HEADER_LEN + 5 + trailer);
        pair.server.inbox.extend_from_slice(&wire);
        pair.drive();
        assert_eq!(messages(&pair.server.take_events()).len(), 1);
    }
}

#[test]
fn a_server_set_to_follow_asks_for_checksums_exactly_when_the_client_does() {
    for client_asks in [true, false] {
        let mut server = config("s");
        server.checksum_if_asked(true);
        assert!(!server.wants_checksum() && server.follows_checksum());
        let mut pair = Pair::new(with_checksum("c", client_asks), server);
        pair.drive();
        // The client learns the server's wish from WELCOME: bit 0 set only if it asked.
        match pair.client.take_events().as_slice() {
            [Event::Connected(welcome)] => assert_eq!(welcome.checksum, client_asks),
            other => panic!("client: {other:?}"),
        }
        for (side, name) in [(&mut pair.client, "client"), (&mut pair.server, "server")] {
            side.conn
                .send_message(0, 1, CodecId::Raw, Bytes::from_static(b"hello"))
                .unwrap();
            let t = side.conn.poll_transmit(pair.now).expect("a frame");
            assert_eq!(
                t.trailer.is_some(),
                client_asks,
                "{name}, client asks {client_asks}"
            );
        }
    }
    // A client set to follow has nothing to follow: it asks only if told to.
    let mut client = config("c");
    client.checksum_if_asked(true);
    let mut pair = Pair::connected(client, with_checksum("s", true));
    pair.client
        .conn
        .send_message(0, 1, CodecId::Raw, Bytes::from_static(b"hello"))
        .unwrap();
    assert!(
        pair.client
            .conn
            .poll_transmit(pair.now)
            .unwrap()
            .trailer
            .is_none()
    );
}

#[test]
fn a_flipped_payload_bit_is_a_corrupt_frame_and_never_delivered() {
    let mut pair = Pair::connected(with_checksum("c", true), with_checksum("s", true));
    pair.client
        .conn
        .send_message(0, 7, CodecId::Raw, Bytes::from(vec![0x3a; 1000]))
        .unwrap();
    let mut wire = BytesMut::new();
    while let Some(t) = pair.client.conn.poll_transmit(pair.now) {
        t.write_to(&mut wire);
    }
    wire[HEADER_LEN + 500] ^= 0x80;
    pair.server.inbox.extend_from_slice(&wire);
    pair.drive();
    let events = pair.server.take_events();
    assert!(messages(&events).is_empty(), "damaged data was delivered");
    assert_eq!(violation_code(&events), ErrorCode::CorruptFrame);
    assert_eq!(sent_error_code(&pair.server), ErrorCode::CorruptFrame);
}

#[test]
fn a_flipped_message_id_bit_is_caught_too() {
    let mut pair = Pair::connected(with_checksum("c", true), with_checksum("s", true));
    pair.client
        .conn
        .send_message(0, 7, CodecId::Raw, Bytes::from_static(b"x"))
        .unwrap();
    let mut wire = BytesMut::new();
    while let Some(t) = pair.client.conn.poll_transmit(pair.now) {
        t.write_to(&mut wire);
    }
    wire[15] ^= 0x01; // last byte of the message id
    pair.server.inbox.extend_from_slice(&wire);
    pair.drive();
    let events = pair.server.take_events();
    assert!(messages(&events).is_empty());
    assert_eq!(violation_code(&events), ErrorCode::CorruptFrame);
}

#[test]
fn a_client_refusing_a_checksummed_welcome_sends_its_error_with_a_trailer() {
    let mut client = Peer::new(
        {
            let mut c = with_checksum("c", true);
            c.compression(&[Compression::Lz4]).unwrap();
            c
        },
        Side::Client,
        Instant::now(),
    );
    let mut welcome = hello("s");
    welcome.checksum = true;
    welcome.compression = vec![2]; // zstd, which the client did not offer
    client
        .inbox
        .extend_from_slice(&raw(FrameType::Welcome, 0, 0, 0, &welcome.encode()));
    client.receive(Instant::now());
    let mut errors = Vec::new();
    while let Some(t) = client.conn.poll_transmit(Instant::now()) {
        if t.header[1] == FrameType::Error as u8 {
            errors.push(t);
        }
    }
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].trailer.is_some(),
        "the server expects a trailer now"
    );
}
