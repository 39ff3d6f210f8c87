//! Messages on channel 0 over real loopback sockets: payload kinds, sender identity, targets,
//! ordering and codec interoperability.

mod common;

use common::{
    assert_nothing_more, builder, peer_named, receive, shutdown_all, start_client, start_server,
    within,
};
use serde::{Deserialize, Serialize};
use slic::{Bytes, ChannelId, Codec, CodecId, Target};

#[tokio::test]
async fn bytes_a_string_and_an_integer_from_a_client_arrive_intact_and_name_the_client() {
    let (server, addr) = start_server(builder("hub")).await;
    let (client, server_peer) = start_client(builder("alice"), addr).await;
    let alice = peer_named(&server, "alice");

    let raw = Bytes::from_static(b"\x00\x01raw bytes\xff");
    within(
        "send_bytes",
        client.send_bytes(Target::Peer(server_peer), raw.clone()),
    )
    .await
    .unwrap();
    within(
        "send string",
        client.send(Target::Peer(server_peer), "héllo"),
    )
    .await
    .unwrap();
    within(
        "send integer",
        client.send(Target::Peer(server_peer), &-1_234_567_i64),
    )
    .await
    .unwrap();

    let m1 = receive(&server).await;
    assert_eq!(m1.body(), &raw);
    assert_eq!(m1.codec, CodecId::Raw);
    let m2 = receive(&server).await;
    assert_eq!(m2.decode::<String>().unwrap(), "héllo");
    assert_eq!(m2.codec, CodecId::Postcard);
    let m3 = receive(&server).await;
    assert_eq!(m3.decode::<i64>().unwrap(), -1_234_567);

    for m in [&m1, &m2, &m3] {
        assert_eq!(&*m.from.name, "alice");
        assert_eq!(m.from.id, alice);
        assert!(m.from.addr.ip().is_loopback());
        assert_eq!(m.channel, ChannelId(0));
    }
    assert!(m1.id < m2.id && m2.id < m3.id, "ids increase per node");
    // A raw body is not something serde can decode.
    assert!(m1.decode::<String>().is_err());
    assert_nothing_more(&server, "server").await;
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test]
async fn a_message_to_one_peer_reaches_that_client_only() {
    let (server, addr) = start_server(builder("hub")).await;
    let (a, _) = start_client(builder("a"), addr).await;
    let (b, _) = start_client(builder("b"), addr).await;
    let a_id = peer_named(&server, "a");
    let b_id = peer_named(&server, "b");
    assert_ne!(a_id, b_id);

    within("send to a", server.send(Target::Peer(a_id), "for a"))
        .await
        .unwrap();
    let got = receive(&a).await;
    assert_eq!(got.decode::<String>().unwrap(), "for a");
    assert_eq!(&*got.from.name, "hub");
    assert_nothing_more(&b, "b").await;

    within("send to b", server.send(Target::Peer(b_id), "for b"))
        .await
        .unwrap();
    assert_eq!(receive(&b).await.decode::<String>().unwrap(), "for b");
    assert_nothing_more(&a, "a").await;
    shutdown_all(&[&a, &b, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_all_reaches_each_of_three_clients_exactly_once() {
    let (server, addr) = start_server(builder("hub")).await;
    let mut clients = Vec::new();
    for name in ["c1", "c2", "c3"] {
        clients.push(start_client(builder(name), addr).await.0);
    }
    assert_eq!(server.peers().len(), 3);

    let id = within("send to all", server.send(Target::All, &7_u32))
        .await
        .unwrap();
    for c in &clients {
        let m = receive(c).await;
        assert_eq!(m.decode::<u32>().unwrap(), 7);
        assert_eq!(m.id, id, "one message, one id for every peer");
        assert_eq!(&*m.from.name, "hub");
    }
    for c in &clients {
        assert_nothing_more(c, c.name()).await;
    }
    for c in &clients {
        within("client shutdown", c.shutdown()).await;
    }
    shutdown_all(&[&server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connected_to_two_servers_reaches_both_with_target_all() {
    let (s1, addr1) = start_server(builder("s1")).await;
    let (s2, addr2) = start_server(builder("s2")).await;
    let (client, p1) = start_client(builder("both"), addr1).await;
    let p2 = within("connect second", client.connect(addr2))
        .await
        .unwrap();
    assert_ne!(p1, p2);
    let names: Vec<_> = client.peers().iter().map(|p| p.name.to_string()).collect();
    assert_eq!(names, ["s1", "s2"]);

    within("send to all", client.send(Target::All, "to everyone"))
        .await
        .unwrap();
    for s in [&s1, &s2] {
        let m = receive(s).await;
        assert_eq!(m.decode::<String>().unwrap(), "to everyone");
        assert_eq!(&*m.from.name, "both");
        assert_nothing_more(s, s.name()).await;
    }
    shutdown_all(&[&client, &s1, &s2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_arrive_in_the_order_they_were_sent() {
    const N: u32 = 10_000;
    let (server, addr) = start_server(builder("hub")).await;
    let (client, peer) = start_client(builder("pc"), addr).await;

    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..N {
                client.send(Target::Peer(peer), &i).await.unwrap();
            }
        })
    };
    for expected in 0..N {
        let m = receive(&server).await;
        assert_eq!(m.decode::<u32>().unwrap(), expected, "out of order");
    }
    within("sender task", sender).await.unwrap();
    assert_nothing_more(&server, "server").await;
    shutdown_all(&[&client, &server]).await;
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Reading {
    sensor: String,
    values: Vec<f64>,
    ok: bool,
    code: Option<u16>,
}

#[tokio::test]
async fn a_json_sender_and_a_postcard_receiver_understand_each_other() {
    let (server, addr) = start_server(builder("postcard-hub")).await;
    assert_eq!(server.codec(), Codec::Postcard, "postcard is the default");
    let (client, peer) = start_client(builder("json-pc").codec(Codec::Json), addr).await;
    assert_eq!(client.codec(), Codec::Json);

    let reading = Reading {
        sensor: "t1".into(),
        values: vec![1.5, -2.25],
        ok: true,
        code: Some(3),
    };
    within("json send", client.send(Target::Peer(peer), &reading))
        .await
        .unwrap();
    let m = receive(&server).await;
    assert_eq!(m.codec, CodecId::Json);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&m.body).is_ok(),
        "the body is JSON text"
    );
    assert_eq!(m.decode::<Reading>().unwrap(), reading);

    // And back: postcard to the JSON node.
    let reply = Reading {
        sensor: "t2".into(),
        values: vec![],
        ok: false,
        code: None,
    };
    within(
        "postcard reply",
        server.send(Target::Peer(m.from.id), &reply),
    )
    .await
    .unwrap();
    let r = receive(&client).await;
    assert_eq!(r.codec, CodecId::Postcard);
    assert_eq!(r.decode::<Reading>().unwrap(), reply);
    shutdown_all(&[&client, &server]).await;
}

/// Frame checksums over loopback: off by default (the kernel copies loopback bytes from memory
/// to memory, nothing can damage them on the way), on with `PlainOnly` and `Always`. A raw
/// client that asks for them reads the node's wish in the WELCOME's flag bit 0, then sends a
/// message framed accordingly (with a CRC-32 trailer when both asked), which must arrive.
#[tokio::test]
async fn frame_checksums_on_loopback_follow_the_servers_policy_and_the_clients_wish() {
    use common::wire::{HELLO, MESSAGE, WELCOME, frame, handshake_frame, raw_connect, read_frame};
    use slic::FrameChecksum;
    use tokio::io::AsyncWriteExt;

    // (policy, WELCOME asks when the client asks, WELCOME asks when it does not). The
    // default, Network, does not ask on loopback on its own but follows a client that asks:
    // the server may sit behind a local forwarder.
    let policies = [
        (None, true, false),
        (Some(FrameChecksum::Network), true, false),
        (Some(FrameChecksum::Never), false, false),
        (Some(FrameChecksum::PlainOnly), true, true),
        (Some(FrameChecksum::Always), true, true),
    ];
    for (policy, if_asked, if_not) in policies {
        for (client_asks, server_asks) in [(true, if_asked), (false, if_not)] {
            let b = match policy {
                Some(p) => builder("hub").frame_checksum(p),
                None => builder("hub"),
            };
            let (server, addr) = start_server(b).await;
            let mut s = raw_connect(addr).await;
            let mut hello = handshake_frame(HELLO, *b"SLIC", b"raw");
            hello[20 + 6] = u8::from(client_asks); // flags, bit 0: wants frame checksums
            within("write HELLO", s.write_all(&hello)).await.unwrap();
            let (h, welcome) = read_frame(&mut s).await;
            assert_eq!(h.ty, WELCOME, "{h:?}");
            let case = format!("{policy:?}, client asks {client_asks}");
            assert_eq!(welcome[6] & 1 == 1, server_asks, "{case}: WELCOME flags");
            let mut msg = frame(MESSAGE, 0, 0, 0, 1, b"checked");
            if client_asks && server_asks {
                let crc = slic_proto::frame::checksum(&msg[..20], &msg[20..]);
                msg.extend_from_slice(&crc);
            }
            within("write MESSAGE", s.write_all(&msg)).await.unwrap();
            let m = receive(&server).await;
            assert_eq!(&m.body[..], b"checked", "{case}");
            shutdown_all(&[&server]).await;
        }
    }
}
