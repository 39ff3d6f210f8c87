//! Helpers shared by the fault tests: timeouts around every awaited step, nodes on loopback
//! ports chosen by the OS, bounded waits for events, and message bodies that can be checked
//! byte for byte.

// Each test crate compiles this module on its own and uses a different subset of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use slic::{DisconnectReason, Event, Events, FrameChecksum, Node, NodeBuilder, PeerId};
use slic_test::proxy::FaultProxy;
use slic_test::rng::Rng;

/// Longest any single awaited step may take before the test fails instead of hanging.
pub(crate) const STEP: Duration = Duration::from_secs(10);

/// How long "nothing else arrives" is watched for.
pub(crate) const QUIET: Duration = Duration::from_millis(200);

/// Frame header length (PROTOCOL.md section 2).
pub(crate) const HEADER: u64 = 20;

/// Bytes of a HELLO or WELCOME frame from a node named `name` (section 5: 33 fixed bytes, no
/// compression offers, then the name).
pub(crate) fn handshake_len(name: &str) -> u64 {
    HEADER + 33 + name.len() as u64
}

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(STEP, what, fut).await
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub(crate) async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Prints the seed so a failing run can be repeated, and returns it.
pub(crate) fn announce(test: &str, seed: u64) -> u64 {
    println!("{test}: seed = {seed:#x}");
    seed
}

/// A builder with the given node name and default settings otherwise, except for frame
/// checksums: the proxy stands in for a network between the nodes, so they check frames as
/// nodes on two hosts would (by default, loopback connections carry no checksum).
pub(crate) fn builder(name: &str) -> NodeBuilder {
    Node::builder()
        .name(name)
        .frame_checksum(FrameChecksum::PlainOnly)
}

/// Builds a node from `builder` and listens on 127.0.0.1 with a port picked by the OS.
pub(crate) async fn start_server(builder: NodeBuilder) -> (Node, SocketAddr) {
    let node = builder.build().expect("build server node");
    let addr = within("listen", node.listen("127.0.0.1:0"))
        .await
        .expect("listen on 127.0.0.1:0");
    assert!(addr.ip().is_loopback(), "bound to {addr}");
    (node, addr)
}

/// Builds a node from `builder` and connects it to `addr` (the proxy).
pub(crate) async fn start_client(builder: NodeBuilder, addr: SocketAddr) -> (Node, PeerId) {
    let node = builder.build().expect("build client node");
    let peer = within("connect", node.connect(addr))
        .await
        .expect("connect through the proxy");
    (node, peer)
}

/// The id the server gave its only peer.
pub(crate) fn only_peer(node: &Node) -> PeerId {
    let peers = node.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    peers[0].id
}

/// Waits for the first event `pred` accepts, skipping others; bounded in count and time.
pub(crate) async fn wait_event(
    events: &mut Events,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    within(what, async {
        for _ in 0..10_000 {
            match events.recv().await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!("event stream ended while waiting for {what}"),
            }
        }
        panic!("no event matched among 10000 while waiting for {what}");
    })
    .await
}

/// Waits for `PeerDisconnected` and returns its reason.
pub(crate) async fn disconnected(events: &mut Events, who: &str) -> DisconnectReason {
    let what = format!("{who}: PeerDisconnected");
    match wait_event(events, &what, |e| {
        matches!(e, Event::PeerDisconnected { .. })
    })
    .await
    {
        Event::PeerDisconnected { reason, .. } => reason,
        _ => unreachable!(),
    }
}

/// Asserts that no message arrives on channel 0 of `node` within [`QUIET`].
pub(crate) async fn assert_nothing_more(node: &Node, who: &str) {
    let extra = within("receive_timeout", node.receive_timeout(QUIET))
        .await
        .expect("receive_timeout");
    assert!(
        extra.is_none(),
        "{who} got an unexpected extra message of {} bytes",
        extra.map_or(0, |m| m.body.len())
    );
}

/// Shuts every node down, each within [`STEP`].
pub(crate) async fn shutdown_all(nodes: &[&Node]) {
    for node in nodes {
        within("shutdown", node.shutdown()).await;
        assert_eq!(node.task_count(), 0, "{node:?} has tasks left");
    }
}

/// The body of message `index` of a stream: `len` bytes from the seeded generator, so the
/// receiver can check every byte without any framing of its own.
pub(crate) fn body(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0_u8; len];
    Rng::derive(seed, index).fill(&mut b);
    b
}

/// Asserts `got` is exactly message `index` of `expected`; says where it first differs.
pub(crate) fn assert_body(who: &str, index: usize, got: &[u8], expected: &[u8]) {
    if got == expected {
        return;
    }
    let first = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .map_or_else(|| "none in the common prefix".to_owned(), |i| i.to_string());
    panic!(
        "{who}: message {index} is damaged: {} bytes, expected {}; first differing byte: {first}",
        got.len(),
        expected.len()
    );
}

/// Prints what the proxy did, for the test log.
pub(crate) fn print_proxy_log(proxy: &FaultProxy) {
    for e in proxy.events() {
        println!("proxy: {e:?}");
    }
}
