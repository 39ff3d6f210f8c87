//! Connection life cycle over loopback: events, graceful disconnect, shutdown and restart.

mod common;

use std::time::Duration;

use common::{
    builder, peer_named, receive, shutdown_all, start_client, start_server, wait_event, within,
};
use slic::{ConnectionError, DisconnectReason, ErrorCode, Event, Target};

#[tokio::test]
async fn a_server_shut_down_and_restarted_on_the_same_port_serves_a_new_client() {
    let (first, addr) = start_server(builder("first")).await;
    let (old_client, _) = start_client(builder("old"), addr).await;
    let mut old_events = old_client.events();

    within("first shutdown", first.shutdown()).await;
    assert_eq!(first.task_count(), 0);
    // The old client hears the GOAWAY and drops the peer.
    wait_event(
        &mut old_events,
        "old client sees the server go",
        |e| matches!(e, Event::PeerDisconnected { peer, .. } if &*peer.name == "first"),
    )
    .await;
    assert!(old_client.peers().is_empty());
    // A shut-down node refuses new work.
    assert!(matches!(
        within("listen after shutdown", first.listen("127.0.0.1:0")).await,
        Err(slic::Error::Shutdown)
    ));

    // Re-bind exactly the port the OS gave the first server.
    let second = builder("second").build().unwrap();
    let addr2 = within("listen again", second.listen(addr)).await.unwrap();
    assert_eq!(addr2, addr);
    let (new_client, peer) = start_client(builder("new"), addr).await;
    within("send", new_client.send(Target::Peer(peer), "again"))
        .await
        .unwrap();
    let m = receive(&second).await;
    assert_eq!(m.decode::<String>().unwrap(), "again");
    assert_eq!(&*m.from.name, "new");
    within("reply", second.send(Target::Peer(m.from.id), &1_u8))
        .await
        .unwrap();
    let r = receive(&new_client).await;
    assert_eq!(r.decode::<u8>().unwrap(), 1);
    assert_eq!(&*r.from.name, "second");
    shutdown_all(&[&new_client, &old_client, &second]).await;
}

/// Current-thread runtime: the alive-task metric is exact there once tasks have been reaped.
#[tokio::test(flavor = "current_thread")]
async fn after_shutdown_no_task_of_the_node_is_left_running() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let (server, addr) = start_server(builder("hub")).await;
    let (client, peer) = start_client(builder("pc"), addr).await;
    let server_peer = peer_named(&server, "pc");
    within("send", client.send(Target::Peer(peer), &1_u32))
        .await
        .unwrap();
    assert_eq!(receive(&server).await.decode::<u32>().unwrap(), 1);
    let ch = within("open channel", client.open_channel(peer))
        .await
        .unwrap();
    within("channel send", ch.send(&2_u32)).await.unwrap();
    let theirs = within("accept", server.accept_channel()).await.unwrap();
    let on_channel = within("channel receive", theirs.receive()).await.unwrap();
    assert_eq!(on_channel.decode::<u32>().unwrap(), 2);
    within("reply", server.send(Target::Peer(server_peer), &3_u32))
        .await
        .unwrap();
    assert_eq!(receive(&client).await.decode::<u32>().unwrap(), 3);

    // One listener plus one connection on the server, one connection on the client.
    assert_eq!(server.task_count(), 2);
    assert_eq!(client.task_count(), 1);
    assert_eq!(metrics.num_alive_tasks(), baseline + 3);

    within("server shutdown", server.shutdown()).await;
    within("client shutdown", client.shutdown()).await;
    assert_eq!(server.task_count(), 0);
    assert_eq!(client.task_count(), 0);
    // A finished task leaves the runtime's count when it is reaped; give that a few turns.
    let mut alive = metrics.num_alive_tasks();
    for _ in 0..100 {
        if alive == baseline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        alive = metrics.num_alive_tasks();
    }
    assert_eq!(alive, baseline, "tasks still alive after shutdown");
    // Receiving on a shut-down node reports it instead of hanging.
    assert!(matches!(
        within("receive after shutdown", server.receive()).await,
        Err(slic::Error::Shutdown)
    ));
}

#[tokio::test]
async fn both_sides_see_peer_connected_with_the_other_name_and_peer_disconnected_with_a_reason() {
    let server = builder("hub").build().unwrap();
    let mut server_events = server.events();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let client = builder("pc7").build().unwrap();
    let mut client_events = client.events();
    let peer = within("connect", client.connect(addr)).await.unwrap();

    let Event::PeerConnected(seen_by_client) =
        wait_event(&mut client_events, "client PeerConnected", |e| {
            matches!(e, Event::PeerConnected(_))
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(&*seen_by_client.name, "hub");
    assert_eq!(seen_by_client.id, peer);
    assert_eq!(seen_by_client.addr, addr);

    let Event::PeerConnected(seen_by_server) =
        wait_event(&mut server_events, "server PeerConnected", |e| {
            matches!(e, Event::PeerConnected(_))
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(&*seen_by_server.name, "pc7");
    assert_eq!(seen_by_server.id, peer_named(&server, "pc7"));

    within(
        "disconnect",
        server.disconnect(Target::Peer(seen_by_server.id), Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert!(server.peers().is_empty());

    let Event::PeerDisconnected { peer: p, reason } =
        wait_event(&mut server_events, "server PeerDisconnected", |e| {
            matches!(e, Event::PeerDisconnected { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(p, seen_by_server);
    assert_eq!(reason, DisconnectReason::Local);

    let Event::PeerDisconnected { peer: p, reason } =
        wait_event(&mut client_events, "client PeerDisconnected", |e| {
            matches!(e, Event::PeerDisconnected { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(p, seen_by_client);
    match reason {
        DisconnectReason::Remote(ConnectionError::GoAway { code, .. }) => {
            assert_eq!(code, ErrorCode::NoError);
        }
        other => panic!("client saw {other:?}, expected a GOAWAY from the server"),
    }
    assert!(client.peers().is_empty());
    // The peer is gone for sending, too.
    assert!(matches!(
        within(
            "send to a gone peer",
            client.send(Target::Peer(peer), &0_u8)
        )
        .await,
        Err(slic::Error::UnknownPeer(_))
    ));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_sends_every_queued_message_before_the_connection_ends() {
    const N: u32 = 1_000;
    let (server, addr) = start_server(builder("hub")).await;
    let mut server_events = server.events();
    let (client, peer) = start_client(builder("pc"), addr).await;
    let mut client_events = client.events();

    for i in 0..N {
        within("send", client.send(Target::Peer(peer), &i))
            .await
            .unwrap();
    }
    within(
        "disconnect",
        client.disconnect(Target::All, Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert!(client.peers().is_empty());
    assert!(matches!(
        within("send to nobody", client.send(Target::All, &0_u32)).await,
        Err(slic::Error::NoPeers)
    ));

    for expected in 0..N {
        let m = receive(&server).await;
        assert_eq!(m.decode::<u32>().unwrap(), expected);
    }
    let Event::PeerDisconnected { peer, reason } =
        wait_event(&mut server_events, "server PeerDisconnected", |e| {
            matches!(e, Event::PeerDisconnected { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(&*peer.name, "pc");
    assert!(
        matches!(
            reason,
            DisconnectReason::Remote(ConnectionError::GoAway {
                code: ErrorCode::NoError,
                ..
            })
        ),
        "server saw {reason:?}"
    );
    let client_side = wait_event(&mut client_events, "client PeerDisconnected", |e| {
        matches!(e, Event::PeerDisconnected { .. })
    })
    .await;
    assert!(
        matches!(
            client_side,
            Event::PeerDisconnected {
                reason: DisconnectReason::Local,
                ..
            }
        ),
        "{client_side:?}"
    );
    assert!(server.peers().is_empty());
    shutdown_all(&[&client, &server]).await;
}

/// A peer written by hand that completes the handshake, then only reads: it never answers the
/// GOAWAY and never closes its socket, which PROTOCOL.md allows ("It need not answer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_disconnect_puts_goaway_after_every_queued_message_and_does_not_wait_for_the_peer()
 {
    use common::wire::{self, GOAWAY, HELLO, MESSAGE, WELCOME};
    use tokio::io::AsyncWriteExt;

    const N: u32 = 200;
    let listener = within("bind", tokio::net::TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let raw_peer = tokio::spawn(async move {
        let (mut s, _) = within("accept", listener.accept()).await.unwrap();
        let (h, p) = wire::read_frame(&mut s).await;
        assert_eq!(h.ty, HELLO);
        assert_eq!(&p[..4], b"SLIC");
        let welcome = wire::handshake_frame(WELCOME, *b"SLIC", b"raw");
        within("write WELCOME", s.write_all(&welcome))
            .await
            .unwrap();
        let mut seqs = Vec::new();
        // Every frame until GOAWAY; bounded by the message count plus slack.
        for _ in 0..N + 100 {
            let (h, p) = wire::read_frame(&mut s).await;
            match h.ty {
                MESSAGE => {
                    assert_eq!(h.channel, 0);
                    assert_eq!(h.codec, 1, "postcard");
                    let seq = postcard_decode(&p);
                    assert_eq!(seq as usize, seqs.len(), "out of order");
                    seqs.push(seq);
                }
                GOAWAY => {
                    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 0);
                    // Nothing follows a GOAWAY: the client closes its write side.
                    wire::expect_closed(&mut s).await;
                    // Keep the socket open, unread, until the test is over.
                    return (seqs.len(), s);
                }
                other => panic!("unexpected frame type {other}"),
            }
        }
        panic!("no GOAWAY after {} frames", N + 100);
    });

    let (client, peer) = start_client(builder("pc"), addr).await;
    let mut events = client.events();
    for i in 0..N {
        within("send", client.send(Target::Peer(peer), &i))
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    within(
        "disconnect",
        client.disconnect(Target::All, Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let (received, _socket) = within("raw peer", raw_peer).await.unwrap();
    assert_eq!(received, N as usize);
    assert!(
        took < Duration::from_secs(2),
        "disconnect took {took:?}: it waited for the peer instead of finishing after GOAWAY"
    );
    let ev = wait_event(&mut events, "PeerDisconnected", |e| {
        matches!(e, Event::PeerDisconnected { .. })
    })
    .await;
    assert!(
        matches!(
            ev,
            Event::PeerDisconnected {
                reason: DisconnectReason::Local,
                ..
            }
        ),
        "{ev:?}"
    );
    shutdown_all(&[&client]).await;
}

fn postcard_decode(bytes: &[u8]) -> u32 {
    // postcard encodes a u32 as a LEB128 varint.
    let mut v = 0_u32;
    for (i, b) in bytes.iter().enumerate() {
        v |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            assert_eq!(i + 1, bytes.len(), "trailing bytes after the varint");
            return v;
        }
    }
    panic!("truncated varint {bytes:?}");
}
