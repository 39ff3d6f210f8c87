//! slic nodes talking through a [`FaultProxy`] that damages the TCP stream: slow, sliced,
//! capped, stalled, cut and corrupted connections. The client connects to the proxy, the
//! proxy forwards to the server. Every test prints its seed; the proxy's log of what it did
//! is printed too, so a failure can be repeated and read.

mod common;

use std::time::{Duration, Instant};

use common::{
    HEADER, QUIET, STEP, announce, assert_body, assert_nothing_more, body, builder, disconnected,
    handshake_len, only_peer, print_proxy_log, shutdown_all, start_client, start_server, within,
    within_for,
};
use slic::{ConnectionError, DisconnectReason, ErrorCode, Node, PeerId, Target};
use slic_test::proxy::{FaultKind, FaultProxy, Faults};
use slic_test::rng::Rng;

const CLIENT: &str = "client";
const SERVER: &str = "server";

/// A server, a proxy in front of it with `c2s` and `s2c` faults, and a client connected
/// through the proxy: (server, client, the client's id on the server, the server's id on the
/// client, proxy).
async fn through_proxy(
    seed: u64,
    server_builder: slic::NodeBuilder,
    client_builder: slic::NodeBuilder,
    c2s: Faults,
    s2c: Faults,
) -> (Node, Node, PeerId, PeerId, FaultProxy) {
    let (server, addr) = start_server(server_builder).await;
    let proxy = within(
        "start proxy",
        FaultProxy::builder(addr)
            .seed(seed)
            .client_to_server(c2s)
            .server_to_client(s2c)
            .start(),
    )
    .await
    .expect("start the proxy");
    let (client, server_on_client) = start_client(client_builder, proxy.addr()).await;
    let client_on_server = only_peer(&server);
    (server, client, client_on_server, server_on_client, proxy)
}

/// `n` message sizes: the sizes around frame and window boundaries first, then random ones
/// up to `max_random`, in a seeded random order.
fn sizes(seed: u64, n: usize, edges: &[usize], max_random: usize) -> Vec<usize> {
    let mut rng = Rng::derive(seed, u64::MAX);
    let mut v = edges.to_vec();
    while v.len() < n {
        v.push(rng.between(0, max_random as u64) as usize);
    }
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// Sends messages of `sizes` (bodies seeded by `seed`) from `from` to `peer`.
async fn send_all(from: &Node, peer: PeerId, seed: u64, sizes: &[usize]) {
    for (i, &len) in sizes.iter().enumerate() {
        let b = body(seed, i as u64, len);
        within("send", from.send_bytes(Target::Peer(peer), b))
            .await
            .expect("send");
    }
}

/// Receives `sizes.len()` messages on `node` and checks each, in order, byte for byte.
async fn receive_all(node: &Node, who: &str, seed: u64, sizes: &[usize]) {
    for (i, &len) in sizes.iter().enumerate() {
        let m = within("receive", node.receive()).await.expect("receive");
        assert_body(who, i, &m.body, &body(seed, i as u64, len));
    }
}

/// Both directions at once: the client sends `up` sizes, the server `down` sizes; each side
/// checks what it receives. Returns how long it took.
async fn exchange(
    server: &Node,
    client: &Node,
    client_on_server: PeerId,
    server_on_client: PeerId,
    seed: u64,
    up: &[usize],
    down: &[usize],
) -> Duration {
    let (seed_up, seed_down) = (seed ^ 1, seed ^ 2);
    let started = Instant::now();
    tokio::join!(
        send_all(client, server_on_client, seed_up, up),
        send_all(server, client_on_server, seed_down, down),
        receive_all(server, "server", seed_up, up),
        receive_all(client, "client", seed_down, down),
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_one_byte_slicing_in_both_directions() {
    let seed = announce("slicing", 0x511c_e001);
    let one_byte = Faults::none().slice(1);
    let (server, client, c, s, proxy) = through_proxy(
        seed,
        builder(SERVER),
        builder(CLIENT),
        one_byte.clone(),
        one_byte,
    )
    .await;
    // Sizes around the header, 1 KiB, 64 KiB and the 256 KiB frame limit (a larger message is
    // fragmented), the largest 300 KB; most are small, to keep to about 1.5 million one-byte
    // writes.
    let edges = [0, 1, 19, 20, 21, 1023, 1024, 1025, 300_000];
    let up = sizes(seed, 100, &[&edges[..], &[65_535, 262_144]].concat(), 2048);
    let down = sizes(
        seed ^ 0xD0,
        100,
        &[&edges[..], &[65_537, 262_145]].concat(),
        2048,
    );
    let total: usize = up.iter().chain(&down).sum();
    let took = exchange(&server, &client, c, s, seed, &up, &down).await;
    println!(
        "200 messages, {total} bytes, one byte per write, in {took:?} ({:.0} kB/s)",
        total as f64 / took.as_secs_f64() / 1e3
    );
    assert_nothing_more(&server, "server").await;
    assert_nothing_more(&client, "client").await;
    assert!(proxy.events().is_empty(), "{:?}", proxy.events());
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_jittered_latency_of_50_ms_in_both_directions_in_order() {
    let seed = announce("latency", 0x01a7_e0c1);
    let (base, jitter) = (Duration::from_millis(50), Duration::from_millis(25));
    let slow = Faults::none().latency(base, jitter);
    let started = Instant::now();
    let (server, client, c, s, _proxy) =
        through_proxy(seed, builder(SERVER), builder(CLIENT), slow.clone(), slow).await;
    let connect_took = started.elapsed();
    // HELLO there and WELCOME back: at least twice the shortest delay.
    assert!(
        connect_took >= 2 * (base - jitter),
        "the handshake took only {connect_took:?}"
    );
    let up = sizes(seed, 100, &[0, 20, 70_000], 8192);
    let down = sizes(seed ^ 0xD0, 100, &[0, 20, 70_000], 8192);
    let first_sent = Instant::now();
    within(
        "first message",
        client.send_bytes(Target::Peer(s), body(seed, 999, 10)),
    )
    .await
    .unwrap();
    let first = within("first receive", server.receive()).await.unwrap();
    let one_way = first_sent.elapsed();
    assert_body("server", 999, &first.body, &body(seed, 999, 10));
    assert!(one_way >= base - jitter, "one way took only {one_way:?}");
    let took = exchange(&server, &client, c, s, seed, &up, &down).await;
    println!("handshake {connect_took:?}, one way {one_way:?}, 2 x 100 messages in {took:?}");
    assert_nothing_more(&server, "server").await;
    assert_nothing_more(&client, "client").await;
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_cap_makes_a_one_mebibyte_message_take_as_long_as_the_cap_implies() {
    const RATE: u64 = 2 << 20; // bytes per second
    const LEN: usize = 1 << 20;
    let seed = announce("bandwidth", 0xba4d_0001);
    let capped = Faults::none().bandwidth(RATE);
    let (server, client, _c, s, _proxy) = through_proxy(
        seed,
        builder(SERVER),
        builder(CLIENT),
        capped.clone(),
        capped,
    )
    .await;
    let b = body(seed, 0, LEN);
    let started = Instant::now();
    within("send 1 MiB", client.send_bytes(Target::Peer(s), b.clone()))
        .await
        .unwrap();
    let m = within("receive 1 MiB", server.receive()).await.unwrap();
    let took = started.elapsed();
    assert_body("server", 0, &m.body, &b);
    // The message and its frame headers, less the one 10 ms slice that may leave at once.
    let floor = Duration::from_secs_f64((LEN as u64 - RATE / 100) as f64 / RATE as f64);
    println!(
        "1 MiB at a cap of {RATE} B/s took {took:?} (at least {floor:?}; {:.0} kB/s)",
        LEN as f64 / took.as_secs_f64() / 1e3
    );
    assert!(
        took >= floor,
        "1 MiB took only {took:?}, under the cap's {floor:?}"
    );
    assert_nothing_more(&server, "server").await;
    shutdown_all(&[&client, &server]).await;
}

/// How a cut connection is expected to look at both ends.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Reset,
    Close,
}

/// Streams 64 KiB messages from one end to the other through a proxy that cuts the stream at
/// 100 000 bytes (mid-frame: a frame is 65 556 bytes), then checks that both ends see the
/// connection end with the reason `cut` implies, that every message the receiver got is whole
/// and in order, and that the sender cannot send to the gone peer.
async fn cut_mid_frame(test: &str, seed: u64, cut: Cut, client_sends: bool) {
    const MSG: usize = 64 << 10;
    const COUNT: u64 = 20;
    const AT: u64 = 100_000;
    let seed = announce(test, seed);
    let faults = match cut {
        Cut::Reset => Faults::none().reset_at(AT),
        Cut::Close => Faults::none().close_at(AT),
    };
    let (c2s, s2c) = if client_sends {
        (faults, Faults::none())
    } else {
        (Faults::none(), faults)
    };
    let (server, addr) = start_server(builder(SERVER)).await;
    let proxy = within(
        "start proxy",
        FaultProxy::builder(addr)
            .seed(seed)
            .client_to_server(c2s)
            .server_to_client(s2c)
            .start(),
    )
    .await
    .unwrap();
    let mut server_events = server.events();
    let client = builder(CLIENT).build().unwrap();
    let mut client_events = client.events();
    let server_on_client = within("connect", client.connect(proxy.addr()))
        .await
        .unwrap();
    let client_on_server = only_peer(&server);
    let (sender, receiver, to, sender_name, receiver_name) = if client_sends {
        (&client, &server, server_on_client, CLIENT, SERVER)
    } else {
        (&server, &client, client_on_server, SERVER, CLIENT)
    };

    let mut sent = 0;
    let mut send_error = None;
    for i in 0..COUNT {
        match within(
            "send",
            sender.send_bytes(Target::Peer(to), body(seed, i, MSG)),
        )
        .await
        {
            Ok(_) => sent += 1,
            Err(e) => {
                send_error = Some(e);
                break;
            }
        }
    }
    let server_reason = disconnected(&mut server_events, "server").await;
    let client_reason = disconnected(&mut client_events, "client").await;
    println!(
        "{sender_name} queued {sent} messages (send error: {send_error:?}); \
         server: {server_reason:?}; client: {client_reason:?}"
    );
    print_proxy_log(&proxy);

    // Whatever reached the receiver is whole, in order, and less than the cut allows.
    let mut received = 0_u64;
    for _ in 0..COUNT {
        let got = within("receive_timeout", receiver.receive_timeout(QUIET))
            .await
            .unwrap();
        let Some(m) = got else { break };
        assert_body(
            receiver_name,
            received as usize,
            &m.body,
            &body(seed, received, MSG),
        );
        received += 1;
    }
    let frame = HEADER + MSG as u64;
    println!("{receiver_name} received {received} whole messages");
    assert!(
        received <= AT / frame,
        "{received} messages got through a cut at {AT} bytes"
    );
    assert_nothing_more(receiver, receiver_name).await;

    // The peer is gone on both sides: sending to it fails at once.
    let err = within(
        "send after the cut",
        sender.send_bytes(Target::Peer(to), vec![1]),
    )
    .await
    .expect_err("sending to a disconnected peer");
    assert!(matches!(err, slic::Error::UnknownPeer(_)), "{err:?}");
    assert!(server.peers().is_empty() && client.peers().is_empty());

    for (who, reason) in [(SERVER, &server_reason), (CLIENT, &client_reason)] {
        match cut {
            // A reset: the socket reports it, as a read or a write error.
            Cut::Reset => assert!(
                matches!(reason, DisconnectReason::Io(e) if e.contains("reset") || e.contains("pipe")),
                "{who}: {reason:?}"
            ),
            // An orderly close in the middle of a frame: end of stream without GOAWAY.
            Cut::Close => assert_eq!(
                reason,
                &DisconnectReason::Remote(ConnectionError::Eof),
                "{who}"
            ),
        }
    }
    assert_eq!(proxy.connections(), 1);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_frame_from_client_to_server_ends_both_sides_without_a_partial_message() {
    cut_mid_frame("reset c2s", 0x7e5e_7001, Cut::Reset, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_frame_from_server_to_client_ends_both_sides_without_a_partial_message() {
    cut_mid_frame("reset s2c", 0x7e5e_7002, Cut::Reset, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_mid_frame_from_client_to_server_ends_both_sides_without_a_partial_message() {
    cut_mid_frame("close c2s", 0xc105_e001, Cut::Close, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_mid_frame_from_server_to_client_ends_both_sides_without_a_partial_message() {
    cut_mid_frame("close s2c", 0xc105_e002, Cut::Close, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_three_heartbeats_ends_the_connection_on_both_sides_with_a_keepalive_timeout()
 {
    let seed = announce("stall", 0x57a1_1001);
    let heartbeat = Duration::from_millis(200);
    let stall = Duration::from_secs(4);
    // Everything after the handshake is held back, in both directions, PINGs included.
    let (server, addr) = start_server(builder(SERVER).heartbeat(heartbeat)).await;
    let proxy = within(
        "start proxy",
        FaultProxy::builder(addr)
            .seed(seed)
            .client_to_server(Faults::none().stall(handshake_len(CLIENT), stall))
            .server_to_client(Faults::none().stall(handshake_len(SERVER), stall))
            .start(),
    )
    .await
    .unwrap();
    let mut server_events = server.events();
    let client = builder(CLIENT).heartbeat(heartbeat).build().unwrap();
    let mut client_events = client.events();
    // The client's last sign of life from the server, the WELCOME, comes after this.
    let started = Instant::now();
    within("connect", client.connect(proxy.addr()))
        .await
        .unwrap();
    let (server_reason, client_reason) = tokio::join!(
        disconnected(&mut server_events, "server"),
        disconnected(&mut client_events, "client"),
    );
    let took = started.elapsed();
    println!("server: {server_reason:?}; client: {client_reason:?}; after {took:?}");
    print_proxy_log(&proxy);
    for (who, reason) in [(SERVER, &server_reason), (CLIENT, &client_reason)] {
        assert_eq!(
            reason,
            &DisconnectReason::Protocol(ConnectionError::KeepaliveTimeout),
            "{who}"
        );
    }
    // Three intervals of silence, and well before the stall would have ended.
    assert!(took >= 3 * heartbeat, "{took:?}");
    assert!(took < stall, "{took:?}");
    let stalls = proxy
        .events()
        .iter()
        .filter(|e| matches!(e.kind, FaultKind::Stall(_)))
        .count();
    assert_eq!(stalls, 2, "{:?}", proxy.events());
    shutdown_all(&[&client, &server]).await;
}

/// What each end saw of a corrupted frame: the messages the receiver got, and the reasons the
/// receiver and the sender gave for their disconnects, if they disconnected.
struct Seen {
    got: Vec<slic::Message>,
    receiver: Option<DisconnectReason>,
    sender: Option<DisconnectReason>,
    proxy: FaultProxy,
}

/// A message from one end whose frame has one bit flipped at `offset_in_frame` (counted from
/// the frame's first header byte; it is the first frame after the handshake).
async fn flip_in_first_frame(
    seed: u64,
    client_sends: bool,
    offset_in_frame: u64,
    len: usize,
) -> Seen {
    let (server, addr) = start_server(builder(SERVER)).await;
    let (sender_name, receiver_name) = if client_sends {
        (CLIENT, SERVER)
    } else {
        (SERVER, CLIENT)
    };
    let flip = Faults::none().flip_at(handshake_len(sender_name) + offset_in_frame);
    let (c2s, s2c) = if client_sends {
        (flip, Faults::none())
    } else {
        (Faults::none(), flip)
    };
    let proxy = within(
        "start proxy",
        FaultProxy::builder(addr)
            .seed(seed)
            .client_to_server(c2s)
            .server_to_client(s2c)
            .start(),
    )
    .await
    .unwrap();
    let mut server_events = server.events();
    let client = builder(CLIENT).build().unwrap();
    let mut client_events = client.events();
    let server_on_client = within("connect", client.connect(proxy.addr()))
        .await
        .unwrap();
    let client_on_server = only_peer(&server);
    let (sender, receiver, to) = if client_sends {
        (&client, &server, server_on_client)
    } else {
        (&server, &client, client_on_server)
    };
    within(
        "send",
        sender.send_bytes(Target::Peer(to), body(seed, 0, len)),
    )
    .await
    .unwrap();

    // The receiver either gets the message or drops the connection; collect what it got
    // until both ends report the disconnect, or until a quiet period says nothing else comes.
    let mut got = Vec::new();
    let (mut server_reason, mut client_reason) = (None, None);
    within_for(STEP, "the message or the disconnects", async {
        for _ in 0..16 {
            tokio::select! {
                m = receiver.receive_timeout(QUIET * 5) => match m.unwrap() {
                    Some(m) => got.push(m),
                    None => return,
                },
                r = disconnected(&mut server_events, "server"), if server_reason.is_none() => {
                    server_reason = Some(r);
                }
                r = disconnected(&mut client_events, "client"), if client_reason.is_none() => {
                    client_reason = Some(r);
                }
            }
            if server_reason.is_some() && client_reason.is_some() {
                return;
            }
        }
    })
    .await;
    print_proxy_log(&proxy);
    let flips: Vec<_> = proxy
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, FaultKind::Flip { .. }))
        .collect();
    assert_eq!(flips.len(), 1, "the proxy flipped one bit: {flips:?}");
    println!(
        "{receiver_name} got {} message(s); server: {server_reason:?}; client: {client_reason:?}",
        got.len()
    );
    let (receiver_reason, sender_reason) = if client_sends {
        (server_reason, client_reason)
    } else {
        (client_reason, server_reason)
    };
    // Nothing more may trickle in after the connection is gone.
    assert_nothing_more(receiver, receiver_name).await;
    shutdown_all(&[&client, &server]).await;
    Seen {
        got,
        receiver: receiver_reason,
        sender: sender_reason,
        proxy,
    }
}

/// Asserts the receiver refused the corrupted frame with `code` and delivered nothing, and
/// the sender heard of it.
fn assert_refused(seen: &Seen, code: ErrorCode) {
    assert!(
        seen.got.is_empty(),
        "{} message(s) delivered from a corrupted frame",
        seen.got.len()
    );
    let receiver = seen.receiver.as_ref().expect("the receiver disconnected");
    assert!(
        matches!(receiver, DisconnectReason::Protocol(e) if e.code() == code),
        "receiver: {receiver:?}, expected a protocol error {code:?}"
    );
    // The receiver sends ERROR with the code and closes; the sender reads it (or, if the
    // close overtakes it, a socket error).
    let sender = seen.sender.as_ref().expect("the sender disconnected");
    assert!(
        matches!(sender, DisconnectReason::Remote(ConnectionError::PeerError { code: c, .. }) if *c == code)
            || matches!(sender, DisconnectReason::Io(_)),
        "sender: {sender:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_frame_header_version_closes_the_connection_with_a_protocol_error() {
    let seed = announce("flip version", 0xf11b_0001);
    // Byte 0 of the header is the version, 1: any single flipped bit makes it unsupported.
    let seen = flip_in_first_frame(seed, true, 0, 100).await;
    assert_refused(&seen, ErrorCode::UnsupportedVersion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_frame_header_length_closes_the_connection_with_a_protocol_error() {
    let seed = announce("flip length", 0xf11b_0002);
    // Byte 16 is the length's most significant byte: any flipped bit there adds at least
    // 16 MiB, above any frame limit. Server to client this time.
    let seen = flip_in_first_frame(seed, false, 16, 100).await;
    assert_refused(&seen, ErrorCode::FrameTooLarge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_message_payload_is_detected_and_the_message_is_not_delivered() {
    let seed = announce("flip payload", 0xf11b_0003);
    let len = 1000;
    let seen = flip_in_first_frame(seed, true, HEADER + 500, len).await;
    let flip = &seen.proxy.events()[0];
    // The frame checksum (on by default over plain TCP) catches it: the connection is closed
    // with a protocol error and the damaged message never reaches the application.
    for m in &seen.got {
        assert_body(
            &format!("server (after {flip:?})"),
            0,
            &m.body,
            &body(seed, 0, len),
        );
    }
    assert!(
        matches!(seen.receiver, Some(DisconnectReason::Protocol(_))),
        "receiver: {:?}; sender: {:?}",
        seen.receiver,
        seen.sender
    );
}
