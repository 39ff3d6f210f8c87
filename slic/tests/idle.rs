//! The idle strategy: a connection that keeps reading its socket after its last message
//! (instead of parking) must lose nothing, take commands while it polls, and stop polling
//! for shutdown. The budgets here are far longer than any step, so every read, send and
//! close below happens while a connection is polling.
//!
//! Polling holds a worker thread, and a task queued behind it on that worker waits for it
//! (documented on `IdleStrategy`); the budgets are long enough to catch a poll that ignores
//! its socket or its commands, and short enough that an occasional wait of that kind
//! cannot fail a test on a busy two-core machine.

mod common;

use std::time::{Duration, Instant};

use common::{builder, receive, start_client, start_server, within};
use slic::{Bytes, Event, IdleStrategy, Target};

/// 20 ms of polling after every message: 500 round trips that each waited for a poll to
/// end would take 10 s.
const POLL: IdleStrategy = IdleStrategy::spin(Duration::from_millis(20));

/// Polls for longer than the test allows for noticing a peer that left.
const LONG: IdleStrategy = IdleStrategy::spin(Duration::from_secs(2));

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_polling_connection_delivers_every_message_in_order_both_ways() {
    let (server, addr) = start_server(builder("server").idle_strategy(POLL)).await;
    let (client, server_id) = start_client(builder("client").idle_strategy(POLL), addr).await;
    let echo = {
        let server = server.clone();
        tokio::spawn(async move {
            for _ in 0..500 {
                let m = receive(&server).await;
                let from = m.from.id;
                within("echo", server.send_bytes(Target::Peer(from), m.body))
                    .await
                    .unwrap();
            }
        })
    };
    let start = Instant::now();
    for i in 0u32..500 {
        // Sizes from 1 byte to beyond the 8 KiB a single direct read takes.
        let body: Vec<u8> = (0..1 + (i as usize * 37) % 20_000)
            .map(|k| (k as u32 ^ i) as u8)
            .collect();
        within(
            "send",
            client.send_bytes(Target::Peer(server_id), Bytes::from(body.clone())),
        )
        .await
        .unwrap();
        let back = receive(&client).await;
        assert_eq!(back.body.as_ref(), body.as_slice(), "round trip {i}");
    }
    within("echo task", echo).await.unwrap();
    // 500 round trips on loopback take well under a second; ones that waited for their
    // polls to end would take 10 s.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "500 round trips took {:?}",
        start.elapsed()
    );
    let t = Instant::now();
    within("client shutdown", client.shutdown()).await;
    within("server shutdown", server.shutdown()).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown waited for polling connections: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_polling_connection_sees_its_peer_leave() {
    let (server, addr) = start_server(builder("server").idle_strategy(LONG)).await;
    let mut events = server.events();
    let (client, server_id) = start_client(builder("client"), addr).await;
    within(
        "send",
        client.send_bytes(Target::Peer(server_id), Bytes::from_static(b"hi")),
    )
    .await
    .unwrap();
    // The server reads this and then polls its socket for 2 s.
    assert_eq!(receive(&server).await.body.as_ref(), b"hi");
    let t = Instant::now();
    within("client shutdown", client.shutdown()).await;
    loop {
        match within("event", events.recv()).await {
            Some(Event::PeerDisconnected { .. }) => break,
            Some(_) => {}
            None => panic!("events ended before the disconnect"),
        }
    }
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the peer's leaving was noticed after {:?}",
        t.elapsed()
    );
    within("server shutdown", server.shutdown()).await;
}

#[test]
fn budgets_add_up_and_the_default_parks() {
    let s = IdleStrategy::spin_then_yield(Duration::from_micros(20), Duration::from_micros(200));
    assert_eq!(s.budget(), Duration::from_micros(220));
    assert_eq!(
        IdleStrategy::spin(Duration::from_micros(5)).budget(),
        Duration::from_micros(5)
    );
    assert_eq!(IdleStrategy::PARK.budget(), Duration::ZERO);
    assert_eq!(IdleStrategy::default(), IdleStrategy::PARK);
}
