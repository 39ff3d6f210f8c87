//! Limits under hostile and extreme peers, over real 127.0.0.1 sockets: oversized length
//! prefixes, streams written one byte at a time or cut off, malformed frames and handshakes,
//! protocol-state violations, control-frame floods, a thousand trickling handshakes, a stalled
//! broadcast receiver, and two peers writing large messages at each other.
//!
//! Each offender gets its typed error (the ERROR or GOAWAY code on the wire, and the reason in
//! the node's `PeerDisconnected` / `HandshakeFailed` event), only the offender is closed, and
//! an honest client is served meanwhile (a request/reply round trip that completes).
//!
//! Heap growth is measured with a counting global allocator (`mod heap`). It counts every
//! thread of this binary, so a test that measures runs alone and the others share ([`run`]).

// `unsafe` is needed for one thing only: implementing `GlobalAlloc`, an unsafe trait, for the
// counting allocator in `mod heap`. Why that impl is sound: each of its four methods passes
// its arguments unchanged to `std::alloc::System` and returns System's result unchanged, so
// whatever contract a caller upholds towards this allocator it upholds towards System. The
// only other work is arithmetic on two atomic integers, which neither allocates nor reads or
// writes the memory being managed.
#![allow(unsafe_code)]

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use common::wire::{
    self, CANCEL, CHANNEL_CLOSE, CHANNEL_OPEN, ERROR, GOAWAY, HELLO, MESSAGE, PING, PONG, REQUEST,
    RESPONSE, WELCOME, WINDOW_UPDATE, expect_closed, raw_connect, raw_handshake, read_error,
    read_frame,
};
use common::{
    STEP, assert_nothing_more, builder, peer_named, receive, shutdown_all, start_client,
    start_server, wait_event, within,
};
use slic::{
    CodecId, ConnectionError, DisconnectReason, ErrorCode, Event, Events, Node, NodeBuilder,
    PeerId, Request, Status, Target,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Counts the bytes allocated through the global allocator: now, and the peak since a mark.
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicIsize, Ordering};

    /// `System`, counting.
    pub(crate) struct Counting;

    static CURRENT: AtomicIsize = AtomicIsize::new(0);
    static PEAK: AtomicIsize = AtomicIsize::new(0);

    fn signed(bytes: usize) -> isize {
        isize::try_from(bytes).unwrap_or(isize::MAX)
    }

    fn grew(bytes: usize) {
        let bytes = signed(bytes);
        let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(bytes: usize) {
        CURRENT.fetch_sub(signed(bytes), Ordering::Relaxed);
    }

    // SAFETY: every method forwards to `System` with its arguments unchanged and returns
    // System's result unchanged (see the comment at the top of this file).
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's guarantees for `alloc` (a non-zero size) are System's.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as for `alloc`.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` was allocated by this allocator, that is by System, with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            shrank(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `ptr` was allocated by System with `layout`; `new_size` is the caller's,
            // with the guarantees `realloc` demands of it.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                if new_size >= layout.size() {
                    grew(new_size - layout.size());
                } else {
                    shrank(layout.size() - new_size);
                }
            }
            p
        }
    }

    /// Heap use relative to the moment it was started.
    #[derive(Debug)]
    pub(crate) struct Window {
        base: isize,
    }

    impl Window {
        /// Marks the current heap use as the base and resets the peak to it.
        pub(crate) fn start() -> Self {
            let base = CURRENT.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            Self { base }
        }

        /// Largest growth over the base since the start, in bytes.
        pub(crate) fn peak_growth(&self) -> isize {
            PEAK.load(Ordering::Relaxed) - self.base
        }

        /// Growth over the base now, in bytes (negative if memory was freed).
        pub(crate) fn growth(&self) -> isize {
            CURRENT.load(Ordering::Relaxed) - self.base
        }
    }
}

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// Whether a test measures heap growth (and so must run alone) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heap {
    Shared,
    Measured,
}

/// The allocator counts every thread, and the test harness runs tests on parallel threads: a
/// test that measures holds this lock exclusively, every other test holds it shared.
static HEAP_LOCK: RwLock<()> = RwLock::new(());

/// Runs `test` on a runtime of its own with two worker threads (as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` would) while holding
/// [`HEAP_LOCK`]. The runtime, and with it every task and socket of the test, is dropped
/// before the lock is released, so the next measuring test does not see it being freed.
fn run<F: Future<Output = ()>>(heap: Heap, test: F) {
    let _shared =
        (heap == Heap::Shared).then(|| HEAP_LOCK.read().unwrap_or_else(PoisonError::into_inner));
    let _exclusive =
        (heap == Heap::Measured).then(|| HEAP_LOCK.write().unwrap_or_else(PoisonError::into_inner));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(test);
    drop(rt);
}

/// Error codes of PROTOCOL.md section 13, as they travel on the wire.
mod code {
    pub(crate) const PROTOCOL_ERROR: u32 = 1;
    pub(crate) const UNSUPPORTED_VERSION: u32 = 2;
    pub(crate) const BAD_MAGIC: u32 = 3;
    pub(crate) const FRAME_TOO_LARGE: u32 = 4;
    pub(crate) const CHANNEL_CLOSED: u32 = 7;
    pub(crate) const CHANNEL_REFUSED: u32 = 8;
    pub(crate) const HANDSHAKE_TIMEOUT: u32 = 11;
    pub(crate) const ENHANCE_YOUR_CALM: u32 = 13;
    pub(crate) const UNKNOWN_FRAME: u32 = 14;
    pub(crate) const BAD_NAME: u32 = 15;
}

/// MORE, the one flag a MESSAGE may carry on a connection without compression.
const MORE: u8 = 0x01;

/// The resource every test server publishes: answers `n` with `n + 1`.
const ECHO: &str = ":echo";
/// A resource whose handler takes far longer than any test, so only a CANCEL ends it.
const SLOW: &str = ":slow";

/// Pause between two round trips of a [`Probe`], leaving the cores to the work under test.
const PROBE_PAUSE: Duration = Duration::from_millis(5);

// ----- helpers --------------------------------------------------------------------------------

/// A listening node built from `b`, with the [`ECHO`] and [`SLOW`] resources.
async fn server(b: NodeBuilder) -> (Node, SocketAddr) {
    let (node, addr) = start_server(b).await;
    node.create_resource(ECHO, |req: Request<u64>| async move {
        Ok::<_, Status>(req.body + 1)
    })
    .expect("create :echo");
    node.create_resource(SLOW, |_req: Request<u64>| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Status>(0_u64)
    })
    .expect("create :slow");
    (node, addr)
}

/// An honest client of `addr` named `name`, which has made one round trip.
async fn honest(addr: SocketAddr, name: &str) -> (Node, PeerId) {
    let (node, peer) = start_client(builder(name), addr).await;
    echo(&node, peer, 0).await;
    (node, peer)
}

/// One request/reply round trip from `client` to the [`ECHO`] resource of `peer`; returns
/// how long it took.
async fn echo(client: &Node, peer: PeerId, n: u64) -> Duration {
    let started = Instant::now();
    let reply: u64 = within("echo round trip", client.get_resource_from(peer, ECHO, &n))
        .await
        .expect("echo round trip");
    assert_eq!(reply, n + 1);
    started.elapsed()
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// Round trips an honest client keeps making while something else happens.
struct Probe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl Probe {
    /// Starts making [`ECHO`] round trips from `client` to `peer`, one every
    /// [`PROBE_PAUSE`].
    fn start(client: &Node, peer: PeerId) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, flag) = (client.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut times = Vec::new();
            for n in 0..1_000_000 {
                if flag.load(Ordering::Acquire) {
                    break;
                }
                times.push(echo(&client, peer, n).await);
                tokio::time::sleep(PROBE_PAUSE).await;
            }
            times
        });
        Self { stop, task }
    }

    /// Stops after the round trip in progress; returns the duration of each. At least one
    /// round trip must have completed.
    async fn finish(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Release);
        let times = within("probe", self.task).await.expect("probe task");
        assert!(!times.is_empty(), "the honest client made no round trip");
        times
    }
}

/// Waits for the `PeerDisconnected` event of the peer named `name`; returns its reason.
async fn disconnected(events: &mut Events, name: &str) -> DisconnectReason {
    let what = format!("{name} disconnected");
    let ev = wait_event(
        events,
        &what,
        |e| matches!(e, Event::PeerDisconnected { peer, .. } if &*peer.name == name),
    )
    .await;
    let Event::PeerDisconnected { reason, .. } = ev else {
        unreachable!()
    };
    reason
}

/// Asserts that a peer was disconnected for breaking the protocol, with wire code `code`.
fn assert_violation(reason: &DisconnectReason, code: u32) {
    assert!(
        matches!(reason, DisconnectReason::Protocol(e) if e.code().to_u32() == code),
        "expected a protocol violation with code {code}, got {reason:?}"
    );
}

/// Waits for the `HandshakeFailed` event of the connection from `from`; returns its reason.
async fn handshake_failed(events: &mut Events, from: SocketAddr) -> String {
    let ev = wait_event(
        events,
        "HandshakeFailed",
        |e| matches!(e, Event::HandshakeFailed { addr, .. } if *addr == from),
    )
    .await;
    let Event::HandshakeFailed { reason, .. } = ev else {
        unreachable!()
    };
    reason
}

/// Writes `bytes` (`what` describes them) on `s` and expects ERROR `code`, then the end of
/// the stream.
async fn expect_error(s: &mut TcpStream, what: &str, bytes: &[u8], code: u32) {
    within("raw write", s.write_all(bytes))
        .await
        .expect("raw write");
    let got = read_error(s).await;
    assert_eq!(
        got,
        code,
        "ERROR code after {what}: {:02x?}",
        &bytes[..bytes.len().min(40)]
    );
    expect_closed(s).await;
}

/// A fresh raw client sends `bytes` as its first bytes: ERROR `code`, a closed socket, and a
/// `HandshakeFailed` event on the server naming the violation.
async fn refused_before_handshake(
    addr: SocketAddr,
    events: &mut Events,
    what: &str,
    bytes: &[u8],
    code: u32,
) {
    let mut s = raw_connect(addr).await;
    let local = s.local_addr().unwrap();
    expect_error(&mut s, what, bytes, code).await;
    let reason = handshake_failed(events, local).await;
    let name = ErrorCode::from_u32(code).to_string();
    assert!(reason.contains(&name), "{reason:?} does not say {name}");
}

/// A raw client named `name` completes the handshake, then sends `bytes`: ERROR `code`, a
/// closed socket, and a `PeerDisconnected` event on the server with that violation.
async fn refused_after_handshake(
    addr: SocketAddr,
    events: &mut Events,
    name: &str,
    what: &str,
    bytes: &[u8],
    code: u32,
) {
    let mut s = raw_handshake(addr, name.as_bytes()).await;
    expect_error(&mut s, what, bytes, code).await;
    assert_violation(&disconnected(events, name).await, code);
}

/// Reads until the end of the stream, which must come cleanly (FIN, no reset) and without
/// another byte.
async fn expect_clean_eof<R: AsyncRead + Unpin>(r: &mut R) {
    let mut buf = [0_u8; 64];
    let n = within("read until end of stream", r.read(&mut buf))
        .await
        .expect("a clean end of stream, not a reset");
    assert_eq!(n, 0, "unexpected bytes before the end: {:?}", &buf[..n]);
}

/// Writes `bytes` one at a time, flushing and pausing after each, so the peer reads them
/// one by one.
async fn trickle(s: &mut TcpStream, bytes: &[u8]) {
    for b in bytes {
        within("write one byte", async {
            s.write_all(std::slice::from_ref(b)).await?;
            s.flush().await
        })
        .await
        .expect("write one byte");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Asserts that `node`'s peers are exactly those named in `names`.
fn assert_peers(node: &Node, names: &[&str]) {
    let mut got: Vec<String> = node.peers().iter().map(|p| p.name.to_string()).collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(ToString::to_string).collect();
    want.sort();
    assert_eq!(got, want, "peers of {node:?}");
}

fn kib(bytes: isize) -> f64 {
    bytes as f64 / 1024.0
}

// ----- 1. length prefixes ----------------------------------------------------------------------

#[test]
fn oversized_length_prefixes_are_refused_from_the_header_alone_without_heap_growth() {
    const MAX_FRAME: u32 = 64 << 10;
    const LIMIT: isize = 64 << 10;
    // 20 + this = 2^32: a receiver adding header and length in u32 would wrap to 0.
    const WRAPS: u32 = u32::MAX - 19;
    run(Heap::Measured, async {
        let (server, addr) = server(builder("hub").max_frame_size(MAX_FRAME)).await;
        let (good, peer) = honest(addr, "good").await;
        let mut events = server.events();
        let mut n = 0;
        // The first pass warms up what is allocated once (runtime slabs, lazy statics); the
        // second is measured.
        for measured in [false, true] {
            // Before the handshake the limit is 1024 bytes.
            for len in [u32::MAX, 1025, WRAPS] {
                let window = heap::Window::start();
                let mut s = raw_connect(addr).await;
                let local = s.local_addr().unwrap();
                let started = Instant::now();
                // Only the header: a server waiting for the payload would never answer.
                expect_error(
                    &mut s,
                    "a HELLO header alone",
                    &wire::header(HELLO, 0, 0, len),
                    code::FRAME_TOO_LARGE,
                )
                .await;
                let answered = started.elapsed();
                drop(s);
                let reason = handshake_failed(&mut events, local).await;
                assert!(reason.contains("FrameTooLarge"), "{reason}");
                let (peak, now) = (window.peak_growth(), window.growth());
                println!(
                    "limits: HELLO length {len:#x}: answered in {answered:?}, heap peak {:+.1} KiB, \
                     after {:+.1} KiB",
                    kib(peak),
                    kib(now)
                );
                assert!(
                    answered < Duration::from_secs(2),
                    "answered after {answered:?}"
                );
                if measured {
                    assert!(
                        peak < LIMIT,
                        "heap grew by {peak} bytes for length {len:#x}"
                    );
                }
                n += 1;
                echo(&good, peer, n).await;
            }
            // After it, the limit is the server's max_frame_size.
            for len in [u32::MAX, MAX_FRAME + 1, WRAPS] {
                n += 1;
                let name = format!("big-{n}");
                let mut s = raw_handshake(addr, name.as_bytes()).await;
                let window = heap::Window::start();
                let started = Instant::now();
                expect_error(
                    &mut s,
                    "a MESSAGE header alone",
                    &wire::header(MESSAGE, 0, 1, len),
                    code::FRAME_TOO_LARGE,
                )
                .await;
                let answered = started.elapsed();
                drop(s);
                assert_violation(
                    &disconnected(&mut events, &name).await,
                    code::FRAME_TOO_LARGE,
                );
                let (peak, now) = (window.peak_growth(), window.growth());
                println!(
                    "limits: MESSAGE length {len:#x}: answered in {answered:?}, heap peak {:+.1} \
                     KiB, after {:+.1} KiB",
                    kib(peak),
                    kib(now)
                );
                assert!(
                    answered < Duration::from_secs(2),
                    "answered after {answered:?}"
                );
                if measured {
                    assert!(
                        peak < LIMIT,
                        "heap grew by {peak} bytes for length {len:#x}"
                    );
                }
                echo(&good, peer, n).await;
            }
        }
        assert_peers(&server, &["good"]);
        shutdown_all(&[&good, &server]).await;
    });
}

// ----- 2. byte-at-a-time streams and streams cut short ----------------------------------------

#[test]
fn a_stream_written_one_byte_at_a_time_arrives_intact() {
    run(Heap::Shared, async {
        let (server, addr) = server(builder("hub")).await;
        let (good, peer) = honest(addr, "good").await;
        let probe = Probe::start(&good, peer);

        let mut s = raw_connect(addr).await;
        s.set_nodelay(true).unwrap();
        trickle(&mut s, &wire::handshake_frame(HELLO, *b"SLIC", b"trickle")).await;
        let (h, p) = read_frame(&mut s).await;
        assert_eq!(h.ty, WELCOME, "{h:?}");
        assert_eq!(&p[..4], b"SLIC");

        // An empty message, a short one, one in two fragments, and a last one.
        let bodies: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"one".to_vec(),
            (0..=255).collect(),
            b"last".to_vec(),
        ];
        let mut stream = Vec::new();
        for (id, body) in (1_u64..).zip(&bodies) {
            if body.len() > 100 {
                let (first, rest) = body.split_at(100);
                stream.extend(wire::frame(MESSAGE, MORE, 0, 0, id, first));
                stream.extend(wire::frame(MESSAGE, 0, 0, 0, id, rest));
            } else {
                stream.extend(wire::frame(MESSAGE, 0, 0, 0, id, body));
            }
        }
        trickle(&mut s, &stream).await;

        for (id, body) in (1_u64..).zip(&bodies) {
            let m = receive(&server).await;
            assert_eq!(&*m.from.name, "trickle");
            assert_eq!(m.id.0, id);
            assert_eq!(m.codec, CodecId::Raw);
            assert_eq!(&m.body[..], &body[..], "message {id}");
        }
        assert_nothing_more(&server, "server").await;
        let times = probe.finish().await;
        println!(
            "limits: byte-at-a-time: {} bytes, {} honest round trips meanwhile, median {:?}",
            stream.len() + 56,
            times.len(),
            median(&times)
        );
        assert_peers(&server, &["good", "trickle"]);
        drop(s);
        shutdown_all(&[&good, &server]).await;
    });
}

#[test]
fn eof_in_the_middle_of_a_frame_or_of_the_handshake_closes_cleanly_and_delivers_nothing_partial() {
    run(Heap::Shared, async {
        let (server, addr) = server(builder("hub")).await;
        let (good, peer) = honest(addr, "good").await;
        let mut events = server.events();
        let probe = Probe::start(&good, peer);

        // In the handshake: inside the HELLO's header, then inside its payload.
        let hello = wire::handshake_frame(HELLO, *b"SLIC", b"cut-hello");
        for cut in [10, 30] {
            let mut s = raw_connect(addr).await;
            let local = s.local_addr().unwrap();
            within("write", s.write_all(&hello[..cut])).await.unwrap();
            within("shutdown", s.shutdown()).await.unwrap();
            let reason = handshake_failed(&mut events, local).await;
            assert!(reason.contains("without GOAWAY"), "{reason}");
            expect_clean_eof(&mut s).await;
        }

        // After the handshake: a first fragment, then half of the last fragment's payload.
        let mut s = raw_handshake(addr, b"cut-payload").await;
        let mut bytes = wire::frame(MESSAGE, MORE, 0, 0, 1, &[1; 50]);
        let last = wire::frame(MESSAGE, 0, 0, 0, 1, &[2; 50]);
        bytes.extend_from_slice(&last[..20 + 25]);
        within("write", s.write_all(&bytes)).await.unwrap();
        within("shutdown", s.shutdown()).await.unwrap();
        let reason = disconnected(&mut events, "cut-payload").await;
        assert!(
            matches!(reason, DisconnectReason::Remote(ConnectionError::Eof)),
            "{reason:?}"
        );
        expect_clean_eof(&mut s).await;

        // A whole message, then half of the next header: the whole one only is delivered.
        let mut s = raw_handshake(addr, b"cut-header").await;
        let mut bytes = wire::frame(MESSAGE, 0, 0, 0, 7, b"whole");
        bytes.extend_from_slice(&wire::frame(MESSAGE, 0, 0, 0, 8, b"never")[..9]);
        within("write", s.write_all(&bytes)).await.unwrap();
        within("shutdown", s.shutdown()).await.unwrap();
        let reason = disconnected(&mut events, "cut-header").await;
        assert!(
            matches!(reason, DisconnectReason::Remote(ConnectionError::Eof)),
            "{reason:?}"
        );
        expect_clean_eof(&mut s).await;

        let m = receive(&server).await;
        assert_eq!(
            (&*m.from.name, m.id.0, &m.body[..]),
            ("cut-header", 7, &b"whole"[..])
        );
        assert_nothing_more(&server, "server").await;
        probe.finish().await;
        assert_peers(&server, &["good"]);
        echo(&good, peer, 1).await;
        shutdown_all(&[&good, &server]).await;
    });
}

// ----- 3. malformed frames and handshakes ------------------------------------------------------

#[test]
fn malformed_frames_and_handshakes_each_get_their_error_code() {
    run(Heap::Shared, async {
        let (server, addr) = server(builder("hub")).await;
        let (good, peer) = honest(addr, "good").await;
        let mut events = server.events();
        let probe = Probe::start(&good, peer);

        let hello = |name: &[u8]| wire::handshake_frame(HELLO, *b"SLIC", name);
        // Offsets in a HELLO frame: header fields, then the payload of section 5.
        let with = |mut f: Vec<u8>, at: usize, v: u8| {
            f[at] = v;
            f
        };
        let mut before: Vec<(&str, Vec<u8>, u32)> = Vec::new();
        for ty in [0, 6, 15, 255] {
            before.push((
                "unknown type",
                wire::header(ty, 0, 0, 0).to_vec(),
                code::UNKNOWN_FRAME,
            ));
        }
        before.extend([
            (
                "HELLO flag",
                with(hello(b"x"), 2, 0x01),
                code::PROTOCOL_ERROR,
            ),
            (
                "HELLO flag",
                with(hello(b"x"), 2, 0x80),
                code::PROTOCOL_ERROR,
            ),
            (
                "bad magic",
                wire::handshake_frame(HELLO, *b"SLIX", b"x"),
                code::BAD_MAGIC,
            ),
            (
                "bad magic",
                wire::handshake_frame(HELLO, *b"slic", b"x"),
                code::BAD_MAGIC,
            ),
            (
                "header version 2",
                with(hello(b"x"), 0, 2),
                code::UNSUPPORTED_VERSION,
            ),
            (
                "header version 0",
                with(hello(b"x"), 0, 0),
                code::UNSUPPORTED_VERSION,
            ),
            (
                "HELLO version 0",
                with(hello(b"x"), 20 + 4, 0),
                code::UNSUPPORTED_VERSION,
            ),
            ("empty name", hello(b""), code::BAD_NAME),
            // The length byte cannot say 256: 255 with 3 name bytes points past the payload.
            (
                "name past payload",
                with(hello(b"abc"), 20 + 7, 255),
                code::PROTOCOL_ERROR,
            ),
            ("name not UTF-8", hello(&[0xC3, 0x28]), code::BAD_NAME),
            ("name not UTF-8", hello(&[b'o', b'k', 0xFF]), code::BAD_NAME),
        ]);
        for (what, bytes, code) in &before {
            refused_before_handshake(addr, &mut events, what, bytes, *code).await;
        }

        // The longest name there is, 255 bytes, is fine.
        let long = "n".repeat(255);
        let s = raw_handshake(addr, long.as_bytes()).await;
        drop(s);
        let reason = disconnected(&mut events, &long).await;
        assert!(
            matches!(reason, DisconnectReason::Remote(ConnectionError::Eof)),
            "{reason:?}"
        );

        let msg = |flags: u8, codec: u8| wire::frame(MESSAGE, flags, codec, 0, 1, b"hi");
        let mut after: Vec<(&str, Vec<u8>, u32)> = Vec::new();
        for ty in [0, 6, 15, 200, 255] {
            after.push((
                "unknown type",
                wire::header(ty, 0, 0, 0).to_vec(),
                code::UNKNOWN_FRAME,
            ));
        }
        after.extend([
            ("MESSAGE ACK_REQUESTED", msg(0x02, 0), code::PROTOCOL_ERROR),
            (
                "MESSAGE COMPRESSED, none agreed",
                msg(0x04, 0),
                code::PROTOCOL_ERROR,
            ),
            ("MESSAGE flag 7", msg(0x80, 0), code::PROTOCOL_ERROR),
            ("MESSAGE codec 4", msg(0, 4), code::PROTOCOL_ERROR),
            (
                "PING flag",
                wire::frame(PING, 0x01, 0, 0, 1, b""),
                code::PROTOCOL_ERROR,
            ),
            (
                "WINDOW_UPDATE flag 1",
                wire::frame(WINDOW_UPDATE, 0x02, 0, 0, 0, &1024_u32.to_be_bytes()),
                code::PROTOCOL_ERROR,
            ),
            (
                "header version 0",
                with(msg(0, 0), 0, 0),
                code::UNSUPPORTED_VERSION,
            ),
            (
                "header version 2",
                with(msg(0, 0), 0, 2),
                code::UNSUPPORTED_VERSION,
            ),
        ]);
        for (i, (what, bytes, code)) in after.iter().enumerate() {
            let name = format!("bad-{i}");
            refused_after_handshake(addr, &mut events, &name, what, bytes, *code).await;
        }

        let times = probe.finish().await;
        println!(
            "limits: malformed: {} honest round trips meanwhile, median {:?}",
            times.len(),
            median(&times)
        );
        assert_peers(&server, &["good"]);
        echo(&good, peer, 1).await;
        shutdown_all(&[&good, &server]).await;
    });
}

// ----- 4. protocol-state violations ------------------------------------------------------------

#[test]
fn protocol_state_violations_by_a_client_each_get_their_error_code() {
    run(Heap::Shared, async {
        let (server, addr) = server(builder("hub")).await;
        let (good, peer) = honest(addr, "good").await;
        let mut events = server.events();
        let probe = Probe::start(&good, peer);

        // Data (and anything else but HELLO) before the handshake.
        let request = [&[5][..], b":echo", &[0]].concat();
        for (what, bytes) in [
            ("MESSAGE first", wire::frame(MESSAGE, 0, 0, 0, 1, b"early")),
            ("REQUEST first", wire::frame(REQUEST, 0, 1, 0, 1, &request)),
            (
                "CHANNEL_OPEN first",
                wire::frame(CHANNEL_OPEN, 0, 0, 1, 0, b""),
            ),
            ("PING first", wire::frame(PING, 0, 0, 0, 1, b"")),
            (
                "WELCOME from a client",
                wire::handshake_frame(WELCOME, *b"SLIC", b"upside"),
            ),
        ] {
            refused_before_handshake(addr, &mut events, what, &bytes, code::PROTOCOL_ERROR).await;
        }

        // The same channel opened twice.
        let mut twice = wire::frame(CHANNEL_OPEN, 0, 0, 1, 0, b"");
        twice.extend(wire::frame(CHANNEL_OPEN, 0, 0, 1, 0, b""));
        let what = "channel 1 opened twice";
        refused_after_handshake(
            addr,
            &mut events,
            "dup-open",
            what,
            &twice,
            code::PROTOCOL_ERROR,
        )
        .await;

        // Data on a channel closed by both sides.
        let mut s = raw_handshake(addr, b"closed-ch").await;
        let mut open_close = wire::frame(CHANNEL_OPEN, 0, 0, 1, 0, b"");
        open_close.extend(wire::frame(CHANNEL_CLOSE, 0, 0, 1, 0, &0_u32.to_be_bytes()));
        within("write", s.write_all(&open_close)).await.unwrap();
        let answer = within("the server's CHANNEL_CLOSE", async {
            for _ in 0..100 {
                let (h, p) = read_frame(&mut s).await;
                if h.ty == CHANNEL_CLOSE {
                    return (h, p);
                }
            }
            panic!("no CHANNEL_CLOSE among 100 frames");
        })
        .await;
        assert_eq!((answer.0.channel, &answer.1[..]), (1, &[0, 0, 0, 0][..]));
        let data = wire::frame(MESSAGE, 0, 0, 1, 1, b"late");
        expect_error(
            &mut s,
            "data on closed channel 1",
            &data,
            code::CHANNEL_CLOSED,
        )
        .await;
        assert_violation(
            &disconnected(&mut events, "closed-ch").await,
            code::CHANNEL_CLOSED,
        );

        // A second HELLO.
        let again = wire::handshake_frame(HELLO, *b"SLIC", b"again");
        refused_after_handshake(
            addr,
            &mut events,
            "hello-twice",
            "a second HELLO",
            &again,
            code::PROTOCOL_ERROR,
        )
        .await;

        probe.finish().await;
        assert_peers(&server, &["good"]);
        echo(&good, peer, 1).await;
        shutdown_all(&[&good, &server]).await;
    });
}

#[test]
fn a_response_to_a_request_never_sent_makes_the_slic_client_close_with_protocol_error() {
    run(Heap::Shared, async {
        // The client is also connected to a real server, which keeps serving it.
        let (real, real_addr) = server(builder("real")).await;
        let (client, real_peer) = honest(real_addr, "client").await;
        let mut events = client.events();

        // A raw server speaking WELCOME by hand.
        let listener = within("bind", TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        let raw_addr = listener.local_addr().unwrap();
        let connecting = {
            let client = client.clone();
            tokio::spawn(async move { client.connect(raw_addr).await })
        };
        let (mut s, _) = within("accept", listener.accept()).await.unwrap();
        let (h, p) = read_frame(&mut s).await;
        assert_eq!((h.ty, &p[..4]), (HELLO, &b"SLIC"[..]), "{h:?}");
        let welcome = wire::handshake_frame(WELCOME, *b"SLIC", b"rawsrv");
        within("write WELCOME", s.write_all(&welcome))
            .await
            .unwrap();
        let raw_peer = within("connect", connecting)
            .await
            .unwrap()
            .expect("connect to the raw server");

        // A response to a request that was sent is taken: request 1, answered 42.
        let call = {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .get_resource_from::<_, u64>(raw_peer, ":x", &5_u64)
                    .await
            })
        };
        let (h, p) = read_frame(&mut s).await;
        assert_eq!((h.ty, h.id, h.channel), (REQUEST, 1, 0), "{h:?}");
        assert_eq!(&p[..3], b"\x02:x");
        // status 0, extra 0, no detail, postcard 42.
        let ok = wire::frame(RESPONSE, 0, 1, 0, 1, &[0, 0, 0, 0, 0, 0, 0, 0, 42]);
        within("write RESPONSE", s.write_all(&ok)).await.unwrap();
        let reply = within("call", call).await.unwrap().expect("reply");
        assert_eq!(reply, 42);
        echo(&client, real_peer, 1).await;

        // Request 2 was never sent.
        let never = wire::frame(RESPONSE, 0, 0, 0, 2, &[0, 0, 0, 0, 0, 0, 0, 0]);
        expect_error(
            &mut s,
            "RESPONSE to request 2",
            &never,
            code::PROTOCOL_ERROR,
        )
        .await;
        assert_violation(
            &disconnected(&mut events, "rawsrv").await,
            code::PROTOCOL_ERROR,
        );

        assert_peers(&client, &["real"]);
        echo(&client, real_peer, 2).await;
        shutdown_all(&[&client, &real]).await;
    });
}

// ----- 5. floods ---------------------------------------------------------------------------------

/// What a flooding raw client saw from the server.
#[derive(Debug, Default)]
struct Seen {
    /// Frames received, by type.
    frames: BTreeMap<u8, usize>,
    /// Ids of the PONGs, in order.
    pong_ids: Vec<u64>,
    /// Channels the server closed with CHANNEL_REFUSED, in order.
    refused: Vec<u32>,
    /// The type (GOAWAY or ERROR) and code of the frame that ended the connection.
    end: Option<(u8, u32)>,
    /// Batches written before the server closed the connection.
    batches_written: u64,
}

impl Seen {
    /// Records one frame; returns true for the GOAWAY or ERROR that ends the connection.
    fn take(&mut self, ty: u8, channel: u32, id: u64, payload: &[u8]) -> bool {
        *self.frames.entry(ty).or_default() += 1;
        let code = || u32::from_be_bytes(payload[..4].try_into().expect("a 4-byte code"));
        match ty {
            PONG => self.pong_ids.push(id),
            CHANNEL_CLOSE => {
                assert_eq!(code(), code::CHANNEL_REFUSED, "channel {channel} closed");
                self.refused.push(channel);
            }
            GOAWAY | ERROR => {
                self.end = Some((ty, code()));
                return true;
            }
            _ => {}
        }
        false
    }

    /// Reads frames until the GOAWAY or ERROR, then expects the end of the stream.
    async fn read_to_end<R: AsyncRead + Unpin>(&mut self, r: &mut R) {
        for _ in 0..10_000_000 {
            let (h, p) = read_frame(r).await;
            if self.take(h.ty, h.channel, h.id, &p) {
                expect_closed(r).await;
                return;
            }
        }
        panic!("no GOAWAY or ERROR among 10,000,000 frames");
    }
}

/// Writes `batches` buffers, `fill` rewriting `buf` for each, until done or the server
/// closes the connection; returns how many were written whole.
async fn flood_write<W: AsyncWrite + Unpin>(
    w: &mut W,
    batches: u64,
    buf: &mut [u8],
    mut fill: impl FnMut(u64, &mut [u8]),
) -> u64 {
    for b in 0..batches {
        fill(b, buf);
        match tokio::time::timeout(STEP, w.write_all(buf)).await {
            Ok(Ok(())) => {}
            // Reset or broken pipe: the server has closed the connection.
            Ok(Err(_)) => return b,
            Err(_) => panic!("a flood write made no progress for {STEP:?}"),
        }
    }
    batches
}

/// Numbers the `frame_len`-byte frames of `buf` in their id field: `first_id`, the next one,
/// and so on.
fn set_ids(buf: &mut [u8], frame_len: usize, first_id: u64) {
    for (id, f) in (first_id..).zip(buf.chunks_exact_mut(frame_len)) {
        f[8..16].copy_from_slice(&id.to_be_bytes());
    }
}

/// The bound on heap growth during a flood.
const FLOOD_HEAP_LIMIT: isize = 16 << 20;
/// The bound on the median honest round trip during a flood.
const FLOOD_LATENCY_LIMIT: Duration = Duration::from_millis(100);

/// Runs `flood` from a raw client named `offender` against a server built from `b` while two
/// honest clients make round trips (one connected before, one connecting during the flood).
/// Asserts the offender is cut off with GOAWAY ENHANCE_YOUR_CALM, heap growth stays under
/// [`FLOOD_HEAP_LIMIT`] and the median round trip under [`FLOOD_LATENCY_LIMIT`]. Returns what
/// the offender saw.
async fn under_flood<F, Fut>(b: NodeBuilder, offender: &'static str, flood: F) -> Seen
where
    F: FnOnce(TcpStream) -> Fut,
    Fut: Future<Output = Seen> + Send + 'static,
{
    let (server, addr) = server(b).await;
    let (a, a_peer) = honest(addr, "honest-a").await;
    // Warm-up of what a second connection allocates once.
    let (warm, _) = honest(addr, "warm-up").await;
    shutdown_all(&[&warm]).await;
    let mut events = server.events();
    let s = raw_handshake(addr, offender.as_bytes()).await;

    let window = heap::Window::start();
    let started = Instant::now();
    let probe = Probe::start(&a, a_peer);
    let flooding = tokio::spawn(flood(s));
    // An honest client connecting while the flood runs.
    let (b, b_peer) = start_client(builder("honest-b"), addr).await;
    let b_connected = started.elapsed();
    let b_round_trip = echo(&b, b_peer, 1).await;
    let seen = within("flood", flooding).await.expect("flood task");
    let flood_time = started.elapsed();
    let mut times = probe.finish().await;
    let reason = disconnected(&mut events, offender).await;
    let (peak, now) = (window.peak_growth(), window.growth());

    times.push(b_round_trip);
    let (med, max) = (
        median(&times),
        times.iter().max().copied().unwrap_or_default(),
    );
    println!(
        "limits: {offender}: cut off after {flood_time:?} ({} batches written), frames seen {:?}, \
         heap peak {:+.1} KiB, after {:+.1} KiB; honest-b connected at {b_connected:?}, first \
         round trip {b_round_trip:?}; {} honest round trips, median {med:?}, max {max:?}",
        seen.batches_written,
        seen.frames,
        kib(peak),
        kib(now),
        times.len(),
    );
    assert_eq!(
        seen.end,
        Some((GOAWAY, code::ENHANCE_YOUR_CALM)),
        "{seen:?}"
    );
    assert_violation(&reason, code::ENHANCE_YOUR_CALM);
    assert!(
        peak < FLOOD_HEAP_LIMIT,
        "heap grew by {peak} bytes during the flood"
    );
    assert!(
        med < FLOOD_LATENCY_LIMIT,
        "median honest round trip {med:?}: {times:?}"
    );

    assert_peers(&server, &["honest-a", "honest-b"]);
    echo(&a, a_peer, 2).await;
    echo(&b, b_peer, 2).await;
    shutdown_all(&[&a, &b, &server]).await;
    seen
}

#[test]
fn a_channel_open_flood_is_refused_past_max_channels_then_cut_off_with_enhance_your_calm() {
    const OPENS: u32 = 10_000;
    const MAX_CHANNELS: u32 = 256;
    /// The control budget's burst; it refills one frame a second, next to nothing here.
    const BURST: u32 = 400;
    /// Opens sent before waiting for the refusals: all within the budget.
    const FIRST: u32 = 300;
    const BATCH: u32 = 500;
    run(Heap::Measured, async {
        let b = builder("hub")
            .max_channels(MAX_CHANNELS)
            .control_budget(BURST, 1);
        let seen = under_flood(b, "channel-flood", |s| async move {
            let (mut r, mut w) = s.into_split();
            let mut seen = Seen::default();
            // Channel i (from 0) has the odd id 2i + 1.
            let open = |i: u32| wire::frame(CHANNEL_OPEN, 0, 0, 2 * i + 1, 0, b"");
            let first: Vec<u8> = (0..FIRST).flat_map(open).collect();
            within("write", w.write_all(&first)).await.unwrap();
            // Past max_channels, each open is answered CHANNEL_CLOSE with CHANNEL_REFUSED.
            for _ in 0..100_000 {
                if seen.refused.len() == (FIRST - MAX_CHANNELS) as usize {
                    break;
                }
                let (h, p) = read_frame(&mut r).await;
                assert!(
                    !seen.take(h.ty, h.channel, h.id, &p),
                    "closed early: {seen:?}"
                );
            }
            let expected: Vec<u32> = (MAX_CHANNELS..FIRST).map(|i| 2 * i + 1).collect();
            assert_eq!(seen.refused, expected);
            // Then the rest, in batches, until the budget runs out.
            let mut buf: Vec<u8> = (0..BATCH).flat_map(open).collect();
            let batches = u64::from((OPENS - FIRST) / BATCH);
            let writer = flood_write(&mut w, batches, &mut buf, |b, buf| {
                let first_channel = 2 * (FIRST + b as u32 * BATCH) + 1;
                for (i, f) in buf.chunks_exact_mut(20).enumerate() {
                    let ch = first_channel + 2 * i as u32;
                    f[4..8].copy_from_slice(&ch.to_be_bytes());
                }
            });
            let (written, ()) = tokio::join!(writer, seen.read_to_end(&mut r));
            seen.batches_written = written;
            seen
        })
        .await;
        // No refusal after the first phase: the connection is gone before a second
        // max_channels' worth of channels could be held.
        assert!(seen.refused.len() >= (FIRST - MAX_CHANNELS) as usize);
        assert!(
            seen.refused.len() < (BURST - MAX_CHANNELS) as usize + 10,
            "{seen:?}"
        );
    });
}

#[test]
fn a_request_and_cancel_flood_is_cut_off_with_enhance_your_calm() {
    const PAIRS: u64 = 100_000;
    const BATCH: u64 = 1_000;
    run(Heap::Measured, async {
        // Windows large enough for every REQUEST of the flood: it breaks no rule but the
        // control budget (default: 2,000 frames, then 1,000 a second).
        let b = builder("hub")
            .channel_window(8 << 20)
            .connection_window(8 << 20);
        let seen = under_flood(b, "cancel-flood", |s| async move {
            let (mut r, mut w) = s.into_split();
            let mut seen = Seen::default();
            // REQUEST for :slow with a postcard 0, then its CANCEL.
            let body = [&[5][..], SLOW.as_bytes(), &[0]].concat();
            let request = wire::frame(REQUEST, 0, 1, 0, 0, &body);
            let cancel = wire::frame(CANCEL, 0, 0, 0, 0, b"");
            let pair = [request.as_slice(), cancel.as_slice()].concat();
            let pair_len = pair.len();
            let mut buf = pair.repeat(BATCH as usize);
            let writer = flood_write(&mut w, PAIRS / BATCH, &mut buf, |b, buf| {
                for (i, f) in buf.chunks_exact_mut(pair_len).enumerate() {
                    let id = (b * BATCH + i as u64 + 1).to_be_bytes();
                    f[8..16].copy_from_slice(&id);
                    f[request.len() + 8..request.len() + 16].copy_from_slice(&id);
                }
            });
            let (written, ()) = tokio::join!(writer, seen.read_to_end(&mut r));
            seen.batches_written = written;
            seen
        })
        .await;
        // Every request was cancelled: none is answered.
        assert_eq!(seen.frames.get(&RESPONSE), None, "{seen:?}");
    });
}

#[test]
fn a_ping_flood_is_cut_off_with_enhance_your_calm() {
    const PINGS: u64 = 1_000_000;
    const BATCH: u64 = 1_000;
    run(Heap::Measured, async {
        let seen = under_flood(builder("hub"), "ping-flood", |s| async move {
            let (mut r, mut w) = s.into_split();
            let mut seen = Seen::default();
            let mut buf = wire::frame(PING, 0, 0, 0, 0, b"").repeat(BATCH as usize);
            let writer = flood_write(&mut w, PINGS / BATCH, &mut buf, |b, buf| {
                set_ids(buf, 20, b * BATCH + 1);
            });
            let (written, ()) = tokio::join!(writer, seen.read_to_end(&mut r));
            seen.batches_written = written;
            seen
        })
        .await;
        // PONGs echo the PINGs in order, and stop at the budget (2,000 plus the refill).
        let pongs = seen.pong_ids.len() as u64;
        assert!(
            seen.pong_ids.iter().copied().eq(1..=pongs),
            "PONG ids out of order"
        );
        assert!(pongs <= 4_000, "{pongs} PONGs");
        assert!(
            seen.batches_written < PINGS / BATCH,
            "the whole flood was taken"
        );
    });
}

// ----- 6. trickling handshakes ------------------------------------------------------------------

/// Connects, then sends one byte of a HELLO a second until the server closes the connection.
/// Returns the ERROR code and how long after connecting the stream ended.
async fn trickling_handshake(addr: SocketAddr, hello: Arc<Vec<u8>>) -> (u32, Duration) {
    let s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    s.set_nodelay(true).unwrap();
    let connected = Instant::now();
    let (mut r, mut w) = s.into_split();
    let writer = async {
        for b in hello.iter() {
            let wrote = within("write one byte", w.write_all(std::slice::from_ref(b))).await;
            if wrote.is_err() {
                // The server has closed the connection; the reader sees why.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let reader = async {
        let code = read_error(&mut r).await;
        expect_closed(&mut r).await;
        (code, connected.elapsed())
    };
    tokio::select! {
        out = reader => out,
        () = writer => panic!("the whole HELLO went through, one byte a second"),
    }
}

#[test]
fn a_thousand_trickling_handshakes_are_all_closed_at_the_deadline() {
    const CONNECTIONS: usize = 1_000;
    const DEADLINE: Duration = Duration::from_secs(1);
    run(Heap::Shared, async {
        let (server, addr) = server(
            builder("hub")
                .handshake_timeout(DEADLINE)
                .max_connections_per_ip(2_000),
        )
        .await;
        let (good, peer) = honest(addr, "good").await;
        let mut events = server.events();
        // Counts the server's reports as they come, so the event queue cannot overflow.
        let reports = tokio::spawn(async move {
            let mut timed_out = 0;
            for _ in 0..100_000 {
                if timed_out == CONNECTIONS {
                    break;
                }
                match events.recv().await {
                    Some(Event::HandshakeFailed { reason, .. }) => {
                        assert!(reason.contains("handshake timed out"), "{reason}");
                        timed_out += 1;
                    }
                    Some(Event::Lagged(n)) => panic!("lost {n} events"),
                    Some(_) => {}
                    None => break,
                }
            }
            timed_out
        });
        let probe = Probe::start(&good, peer);
        let started = Instant::now();
        let hello = Arc::new(wire::handshake_frame(HELLO, *b"SLIC", b"trickler"));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            set.spawn(trickling_handshake(addr, hello.clone()));
        }
        let mut slowest = Duration::ZERO;
        for _ in 0..CONNECTIONS {
            let (code, after) = within("a trickling connection", set.join_next())
                .await
                .expect("a connection task")
                .expect("connection task succeeded");
            assert_eq!(code, code::HANDSHAKE_TIMEOUT);
            slowest = slowest.max(after);
        }
        let all_closed = started.elapsed();
        let times = probe.finish().await;
        let timed_out = within("server reports", reports).await.unwrap();
        println!(
            "limits: {CONNECTIONS} trickling handshakes: all closed {all_closed:?} after the \
             first connect, slowest {slowest:?} after its own; {} honest round trips meanwhile, \
             median {:?}, max {:?}",
            times.len(),
            median(&times),
            times.iter().max().unwrap()
        );
        assert!(
            slowest <= DEADLINE + Duration::from_secs(1),
            "a connection was closed {slowest:?} after it connected"
        );
        assert_eq!(timed_out, CONNECTIONS);
        assert_peers(&server, &["good"]);
        echo(&good, peer, 1).await;
        shutdown_all(&[&good, &server]).await;
    });
}

// ----- 7. a stalled broadcast receiver -----------------------------------------------------------

#[test]
fn a_broadcast_cuts_off_a_stalled_receiver_and_the_others_get_every_message_in_order() {
    const RECEIVERS: usize = 50;
    const MESSAGES: u32 = 100_000;
    const SMALL: usize = 16 << 10;
    const STALLED_WINDOW: u32 = 4 << 10;
    const READER_WINDOW: u32 = 64 << 10;
    const SLOW_CONSUMER: Duration = Duration::from_secs(1);
    run(Heap::Shared, async {
        let (hub, addr) = server(
            builder("hub")
                .buffer_cap(SMALL)
                .channel_window(SMALL as u32)
                .connection_window(SMALL as u32)
                .slow_consumer_timeout(Some(SLOW_CONSUMER)),
        )
        .await;
        let mut events = hub.events();
        // rx-00 never calls receive. Its small windows make it stop the hub's writes after a
        // few hundred messages (with the default 1 MiB it would take some 40,000 first).
        let (stalled, stalled_peer) = start_client(
            builder("rx-00")
                .channel_window(STALLED_WINDOW)
                .connection_window(STALLED_WINDOW),
            addr,
        )
        .await;
        echo(&stalled, stalled_peer, 0).await;
        let mut receivers = vec![(stalled.clone(), stalled_peer)];
        // The others read all the time. A receiver returns credit once half of its window is
        // consumed; with the default 1 MiB that is some 21,000 of these messages, which can
        // take a loaded debug build longer than the 1 s cut-off, and the hub would take a
        // reader for a stalled one. 64 KiB windows return credit every 32 KiB. (One channel
        // at most, so the credit returned by consumers is batched at 8 KiB, not 63 bytes.)
        for i in 1..RECEIVERS {
            let name = format!("rx-{i:02}");
            let reader = builder(&name)
                .channel_window(READER_WINDOW)
                .connection_window(READER_WINDOW)
                .max_channels(1);
            let (node, peer) = start_client(reader, addr).await;
            echo(&node, peer, 0).await;
            receivers.push((node, peer));
        }
        let mut readers = Vec::new();
        for (node, _) in &receivers[1..] {
            let node = node.clone();
            readers.push(tokio::spawn(async move {
                for expected in 0..MESSAGES {
                    let m = receive(&node).await;
                    assert_eq!(&*m.from.name, "hub");
                    let seq = u32::from_be_bytes(m.body[..].try_into().expect("4 bytes"));
                    assert_eq!(seq, expected, "{} lost or reordered a message", node.name());
                }
                assert_nothing_more(&node, node.name()).await;
            }));
        }
        let started = Instant::now();
        let sender = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for seq in 0..MESSAGES {
                    let body = slic::Bytes::copy_from_slice(&seq.to_be_bytes());
                    within("broadcast", hub.send_bytes(Target::All, body))
                        .await
                        .expect("broadcast");
                }
            })
        };
        // The first peer to go must be rx-00; it may take longer than one step to stall.
        let first_gone = async {
            for _ in 0..100_000 {
                match events.recv().await {
                    Some(Event::PeerDisconnected { peer, reason }) => return (peer, reason),
                    Some(_) => {}
                    None => break,
                }
            }
            panic!("no PeerDisconnected event");
        };
        let (gone, reason) = tokio::time::timeout(Duration::from_secs(60), first_gone)
            .await
            .expect("the stalled receiver was never cut off");
        assert_eq!(
            &*gone.name, "rx-00",
            "an honest receiver went first: {reason:?}"
        );
        let cut_at = started.elapsed();
        assert_eq!(reason, DisconnectReason::SlowConsumer);
        assert!(cut_at >= SLOW_CONSUMER, "cut off after {cut_at:?}");
        // The stalled node sees its connection end too.
        within("stalled node loses its peer", async {
            for _ in 0..1_000 {
                if stalled.peers().is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the stalled node still has its peer");
        })
        .await;
        // A round trip while the broadcast goes on.
        let rtt = echo(&receivers[1].0, receivers[1].1, 1).await;

        let long = Duration::from_secs(300);
        tokio::time::timeout(long, sender)
            .await
            .expect("the broadcast did not finish")
            .expect("sender task");
        let sent = started.elapsed();
        // Nobody else was cut off, whatever the readers still have to read.
        let mut others_gone = Vec::new();
        for _ in 0..1_000 {
            match tokio::time::timeout(Duration::from_millis(10), events.recv()).await {
                Ok(Some(Event::PeerDisconnected { peer, reason })) => {
                    others_gone.push((peer.name, reason));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        assert!(
            others_gone.is_empty(),
            "honest receivers cut off: {others_gone:?}"
        );
        for r in readers {
            tokio::time::timeout(long, r)
                .await
                .expect("a receiver did not finish")
                .expect("receiver task");
        }
        let received = started.elapsed();
        println!(
            "limits: broadcast of {MESSAGES} to {RECEIVERS}: stalled receiver cut at {cut_at:?}, \
             all sent at {sent:?}, all received at {received:?}; round trip {rtt:?}"
        );
        assert_eq!(hub.peers().len(), RECEIVERS - 1);
        assert!(hub.peers().iter().all(|p| &*p.name != "rx-00"));
        let mut nodes: Vec<&Node> = receivers.iter().map(|(n, _)| n).collect();
        nodes.push(&hub);
        shutdown_all(&nodes).await;
    });
}

// ----- 8. two writers, nobody reading -------------------------------------------------------------

#[test]
fn two_peers_writing_large_messages_at_each_other_through_tiny_buffers_both_complete() {
    const MIB: usize = 1 << 20;
    const COUNT: u8 = 8;
    const TINY: u32 = 64 << 10;
    run(Heap::Shared, async {
        let tiny = |name: &str| {
            builder(name)
                .buffer_cap(TINY as usize)
                .channel_window(TINY)
                .connection_window(TINY)
        };
        let (a, addr) = server(tiny("a")).await;
        let (b, a_peer) = start_client(tiny("b"), addr).await;
        let b_peer = peer_named(&a, "b");
        let (watcher, w_peer) = honest(addr, "watcher").await;
        let probe = Probe::start(&watcher, w_peer);

        // Each side sends all of its messages before it reads any.
        let side = |node: Node, to: PeerId, mine: u8, theirs: u8| async move {
            for i in 0..COUNT {
                let body = vec![mine + i; MIB];
                node.send_bytes(Target::Peer(to), body)
                    .await
                    .expect("send 1 MiB");
            }
            for i in 0..COUNT {
                let m = node.receive().await.expect("receive");
                assert_eq!(m.body.len(), MIB);
                assert!(
                    m.body.iter().all(|&x| x == theirs + i),
                    "message {i} of {} is not the expected one",
                    node.name()
                );
            }
        };
        let started = Instant::now();
        let both = async {
            tokio::join!(
                side(a.clone(), b_peer, 0, 100),
                side(b.clone(), a_peer, 100, 0)
            )
        };
        tokio::time::timeout(Duration::from_secs(60), both)
            .await
            .expect("both sides complete");
        let took = started.elapsed();
        let times = probe.finish().await;
        println!(
            "limits: 2 x {COUNT} x 1 MiB crossing through 64 KiB buffers and windows: {took:?}; \
             {} honest round trips meanwhile, median {:?}",
            times.len(),
            median(&times)
        );
        assert_peers(&a, &["b", "watcher"]);
        shutdown_all(&[&watcher, &b, &a]).await;
    });
}

// ----- known issue ---------------------------------------------------------------------------------

/// Channels a peer opens wait in the node's accept queue (`Node::accept_channel`) as
/// `Channel` handles, each with its own message queue. When the connection ends they stay
/// there: a node that never accepts channels keeps about 1.2 MiB for every connection that
/// opened its 256 channels and left, without bound. Not fixed here: it needs a decision on the
/// accept queue (drop the unaccepted channels of a closed connection, or bound the queue and
/// refuse past it).
#[test]
fn a_node_that_never_accepts_channels_does_not_keep_those_of_closed_connections() {
    const ROUNDS: u32 = 5;
    const LIMIT: isize = 256 << 10;
    run(Heap::Measured, async {
        let (server, addr) = server(builder("hub").max_channels(256)).await;
        let mut events = server.events();
        let opens: Vec<u8> = (0..256_u32)
            .flat_map(|i| wire::frame(CHANNEL_OPEN, 0, 0, 2 * i + 1, 0, b""))
            .collect();
        let mut window = None;
        // Round 0 warms up; the others are measured.
        for round in 0..=ROUNDS {
            let name = format!("opener-{round}");
            let mut s = raw_handshake(addr, name.as_bytes()).await;
            within("write", s.write_all(&opens)).await.unwrap();
            for _ in 0..256 {
                wait_event(&mut events, "ChannelOpened", |e| {
                    matches!(e, Event::ChannelOpened { peer, .. } if peer.name.as_ref() == name)
                })
                .await;
            }
            drop(s);
            let reason = disconnected(&mut events, &name).await;
            assert!(
                matches!(reason, DisconnectReason::Remote(ConnectionError::Eof)),
                "{reason:?}"
            );
            if round == 0 {
                window = Some(heap::Window::start());
            }
        }
        let kept = window.expect("measured").growth();
        println!(
            "limits: {ROUNDS} connections that opened 256 channels each and left: {:+.1} KiB kept",
            kib(kept)
        );
        assert!(
            kept < LIMIT,
            "{kept} bytes kept for connections that are gone"
        );
        shutdown_all(&[&server]).await;
    });
}
