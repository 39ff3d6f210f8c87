//! Raw TCP clients that break the protocol: each gets an ERROR frame with the code PROTOCOL.md
//! prescribes and is disconnected, while a well-behaved client of the same server is served.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::wire::{self, HELLO, expect_closed, raw_connect, raw_handshake, read_error};
use common::{builder, peer_named, shutdown_all, start_client, start_server, wait_event, within};
use slic::{Event, Node, PeerId, Target};
use tokio::io::AsyncWriteExt;

// Error codes of PROTOCOL.md section 13.
const UNSUPPORTED_VERSION: u32 = 2;
const BAD_MAGIC: u32 = 3;
const FRAME_TOO_LARGE: u32 = 4;
const HANDSHAKE_TIMEOUT: u32 = 11;

const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(300);

/// A server with a short handshake deadline, and a good client connected to it.
async fn server_and_good_client() -> (Node, SocketAddr, Node, PeerId) {
    let (server, addr) =
        start_server(builder("hub").handshake_timeout(SERVER_HANDSHAKE_TIMEOUT)).await;
    let (good, peer) = start_client(builder("good"), addr).await;
    (server, addr, good, peer)
}

/// One round trip between the good client and the server, both directions.
async fn round_trip(server: &Node, good: &Node, peer: PeerId, n: u32) {
    within("good send", good.send(Target::Peer(peer), &n))
        .await
        .unwrap();
    let m = within("server receive", server.receive()).await.unwrap();
    assert_eq!(&*m.from.name, "good");
    assert_eq!(m.decode::<u32>().unwrap(), n);
    within(
        "server reply",
        server.send(Target::Peer(m.from.id), &(n + 1)),
    )
    .await
    .unwrap();
    let r = within("good receive", good.receive()).await.unwrap();
    assert_eq!(r.decode::<u32>().unwrap(), n + 1);
}

/// Sends `bytes` on a fresh raw connection and expects ERROR `code`, then the close.
async fn expect_refused(addr: SocketAddr, bytes: &[u8], code: u32) {
    let mut s = raw_connect(addr).await;
    within("raw write", s.write_all(bytes)).await.unwrap();
    assert_eq!(read_error(&mut s).await, code);
    expect_closed(&mut s).await;
}

fn oversized_header() -> [u8; 20] {
    wire::header(HELLO, 0, 0, u32::MAX)
}

fn bad_magic_hello() -> Vec<u8> {
    wire::handshake_frame(HELLO, *b"SLIX", b"evil")
}

const GARBAGE: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_get_an_error_frame_and_a_closed_socket() {
    let (server, addr, good, peer) = server_and_good_client().await;
    // 'G' is not protocol version 1, the first thing a header is checked for.
    expect_refused(addr, GARBAGE, UNSUPPORTED_VERSION).await;
    round_trip(&server, &good, peer, 1).await;
    shutdown_all(&[&good, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_a_wrong_magic_gets_bad_magic_and_a_closed_socket() {
    let (server, addr, good, peer) = server_and_good_client().await;
    let mut events = server.events();
    expect_refused(addr, &bad_magic_hello(), BAD_MAGIC).await;
    let ev = wait_event(&mut events, "HandshakeFailed", |e| {
        matches!(e, Event::HandshakeFailed { .. })
    })
    .await;
    let Event::HandshakeFailed { addr: from, reason } = ev else {
        unreachable!()
    };
    assert!(from.ip().is_loopback());
    assert!(!reason.is_empty());
    // The refused connection never became a peer.
    assert_eq!(server.peers().len(), 1);
    peer_named(&server, "good");
    round_trip(&server, &good, peer, 2).await;
    shutdown_all(&[&good, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_with_an_oversized_length_gets_frame_too_large_and_a_closed_socket() {
    let (server, addr, good, peer) = server_and_good_client().await;
    // Judged from the header alone: no payload follows, and none is waited for.
    expect_refused(addr, &oversized_header(), FRAME_TOO_LARGE).await;
    // Just above the handshake limit of 1024 is too large as well.
    expect_refused(addr, &wire::header(HELLO, 0, 0, 1025), FRAME_TOO_LARGE).await;
    round_trip(&server, &good, peer, 3).await;
    shutdown_all(&[&good, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_handshake_deadline() {
    let (server, addr, good, peer) = server_and_good_client().await;
    let started = Instant::now();
    let mut s = raw_connect(addr).await;
    assert_eq!(read_error(&mut s).await, HANDSHAKE_TIMEOUT);
    let waited = started.elapsed();
    expect_closed(&mut s).await;
    assert!(
        waited >= SERVER_HANDSHAKE_TIMEOUT - Duration::from_millis(50),
        "closed after {waited:?}, before the deadline"
    );
    assert!(
        waited < Duration::from_secs(3),
        "closed only after {waited:?}"
    );
    // The good client, connected for longer than the deadline, is unaffected.
    round_trip(&server, &good, peer, 4).await;
    shutdown_all(&[&good, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_a_good_client_that_keeps_talking() {
    const MIN_ROUNDS: u32 = 50;
    let (server, addr, good, peer) = server_and_good_client().await;

    // The good client and the server exchange messages until the hostile clients are done.
    let hostile_done = Arc::new(AtomicBool::new(false));
    let talker = {
        let (server, good, done) = (server.clone(), good.clone(), hostile_done.clone());
        tokio::spawn(async move {
            let mut rounds = 0;
            for n in 0..100_000 {
                if rounds >= MIN_ROUNDS && done.load(Ordering::Acquire) {
                    break;
                }
                round_trip(&server, &good, peer, n * 2).await;
                rounds += 1;
            }
            rounds
        })
    };
    let (bad_magic, oversized) = (bad_magic_hello(), oversized_header());
    let hostile = async {
        let silent = async {
            let mut s = raw_connect(addr).await;
            assert_eq!(read_error(&mut s).await, HANDSHAKE_TIMEOUT);
            expect_closed(&mut s).await;
        };
        tokio::join!(
            expect_refused(addr, GARBAGE, UNSUPPORTED_VERSION),
            expect_refused(addr, &bad_magic, BAD_MAGIC),
            expect_refused(addr, &oversized, FRAME_TOO_LARGE),
            silent,
        );
    };
    within("hostile clients", hostile).await;
    hostile_done.store(true, Ordering::Release);
    let rounds = within("good client", talker).await.unwrap();
    assert!(rounds >= MIN_ROUNDS);
    assert_eq!(server.peers().len(), 1, "only the good client is a peer");
    assert_eq!(good.peers().len(), 1, "the good client is still connected");
    shutdown_all(&[&good, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_after_the_handshake_close_only_the_offending_connection() {
    const CHANNEL_CLOSED: u32 = 7;
    const UNKNOWN_FRAME: u32 = 14;
    let (server, addr, good, peer) = server_and_good_client().await;
    let mut events = server.events();

    // A MESSAGE on a channel that was never opened.
    let mut s = raw_handshake(addr, b"rogue1").await;
    let mut frame = wire::header(wire::MESSAGE, 5, 1, 2).to_vec();
    frame.extend_from_slice(b"hi");
    within("write", s.write_all(&frame)).await.unwrap();
    assert_eq!(read_error(&mut s).await, CHANNEL_CLOSED);
    expect_closed(&mut s).await;
    let ev = wait_event(
        &mut events,
        "rogue1 disconnected",
        |e| matches!(e, Event::PeerDisconnected { peer, .. } if &*peer.name == "rogue1"),
    )
    .await;
    let Event::PeerDisconnected { reason, .. } = ev else {
        unreachable!()
    };
    assert!(
        matches!(
            reason,
            slic::DisconnectReason::Protocol(ref e) if e.code() == slic::ErrorCode::ChannelClosed
        ),
        "{reason:?}"
    );

    // An unknown frame type (15..=255 are unknown to every version).
    let mut s = raw_handshake(addr, b"rogue2").await;
    within("write", s.write_all(&wire::header(200, 0, 0, 0)))
        .await
        .unwrap();
    assert_eq!(read_error(&mut s).await, UNKNOWN_FRAME);
    expect_closed(&mut s).await;

    round_trip(&server, &good, peer, 10).await;
    assert_eq!(server.peers().len(), 1);
    peer_named(&server, "good");
    shutdown_all(&[&good, &server]).await;
}
