//! Negotiated compression over real loopback connections: every codec with every algorithm,
//! fallback when nodes share none, and a compression bomb refused at the cap.

mod common;

use std::io::Read;

use common::{builder, receive, shutdown_all, start_client, start_server, wire, within};
use serde::{Deserialize, Serialize};
use slic::{Codec, Compression, Request, Status, Target};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Doc {
    title: String,
    body: String,
    n: u64,
}

fn doc(n: u64, len: usize) -> Doc {
    Doc {
        title: format!("doc {n}"),
        body: "compress me please ".repeat(len / 19 + 1),
        n,
    }
}

/// Sends small and large messages both ways and calls a resource, with `codec` on both
/// sides and `client`/`server` as the algorithms each offers.
async fn round_trip(codec: Codec, client: &[Compression], server: &[Compression]) {
    let (srv, addr) = start_server(builder("srv").codec(codec).compression(server)).await;
    srv.create_resource(":echo", |req: Request<Doc>| async move {
        Ok::<_, Status>(req.body)
    })
    .unwrap();
    let (cli, peer) = start_client(builder("cli").codec(codec).compression(client), addr).await;
    for (i, len) in [10usize, 600, 100_000, 3 << 20].into_iter().enumerate() {
        let d = doc(i as u64, len);
        within("send", cli.send(Target::Peer(peer), &d))
            .await
            .unwrap();
        let m = receive(&srv).await;
        assert_eq!(
            m.decode::<Doc>().unwrap(),
            d,
            "{codec:?} {client:?}/{server:?} {len}"
        );
        within("reply", srv.send(Target::Peer(m.from.id), &d))
            .await
            .unwrap();
        assert_eq!(receive(&cli).await.decode::<Doc>().unwrap(), d);
        let echoed: Doc = within("call", cli.get_resource(":echo", &d)).await.unwrap();
        assert_eq!(echoed, d);
    }
    // Incompressible bytes pass too (sent as they are).
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..50_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    within("send bytes", cli.send_bytes(Target::All, noise.clone()))
        .await
        .unwrap();
    assert_eq!(&receive(&srv).await.body[..], &noise[..]);
    shutdown_all(&[&cli, &srv]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_with_every_algorithm_round_trips_messages_and_resources() {
    for codec in [Codec::Postcard, Codec::MessagePack, Codec::Json] {
        for alg in [None, Some(Compression::Lz4), Some(Compression::Zstd)] {
            let algs: Vec<Compression> = alg.into_iter().collect();
            round_trip(codec, &algs, &algs).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_no_algorithm_in_common_fall_back_to_none_and_still_talk() {
    round_trip(Codec::Postcard, &[Compression::Lz4], &[Compression::Zstd]).await;
    round_trip(Codec::Json, &[], &[Compression::Lz4]).await;
    // Mixed preferences still agree on one the client offered.
    round_trip(
        Codec::Postcard,
        &[Compression::Zstd, Compression::Lz4],
        &[Compression::Lz4],
    )
    .await;
}

/// A raw client that offers `alg` in its HELLO and reads the WELCOME.
async fn raw_client_offering(addr: std::net::SocketAddr, alg: u8) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    let mut payload = wire::hello_payload(*b"SLIC", b"bomber");
    // The compression count sits at offset 32 (PROTOCOL.md section 5): offer one algorithm.
    payload[32] = 1;
    payload.insert(33, alg);
    let mut frame = wire::header(wire::HELLO, 0, 0, payload.len() as u32).to_vec();
    frame.extend_from_slice(&payload);
    within("hello", s.write_all(&frame)).await.unwrap();
    let (h, welcome) = wire::read_frame(&mut s).await;
    assert_eq!(h.ty, wire::WELCOME);
    assert_eq!(welcome[32], 1, "server agreed on one algorithm");
    assert_eq!(welcome[33], alg);
    s
}

/// A MESSAGE frame with the COMPRESSED flag (bit 2).
fn compressed_message(payload: &[u8]) -> Vec<u8> {
    let mut h = wire::header(wire::MESSAGE, 0, 1, payload.len() as u32);
    h[2] = 0b100;
    let mut f = h.to_vec();
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_frame_inflating_to_a_gibibyte_is_refused_at_the_cap() {
    let algs = [Compression::Zstd, Compression::Lz4];
    let (srv, addr) = start_server(builder("srv").compression(&algs)).await;
    let (honest, _) = start_client(builder("honest").compression(&algs), addr).await;

    // zstd: 1 GiB of zeros streamed through the encoder into a few tens of KiB.
    let mut bomb = Vec::new();
    zstd::stream::copy_encode(std::io::repeat(0).take(1 << 30), &mut bomb, 3).unwrap();
    assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
    let mut s = raw_client_offering(addr, 2).await;
    within("send bomb", s.write_all(&compressed_message(&bomb)))
        .await
        .unwrap();
    assert_eq!(wire::read_error(&mut s).await, 5, "MESSAGE_TOO_LARGE");
    wire::expect_closed(&mut s).await;

    // lz4: a header declaring 1 GiB is refused before anything is allocated.
    let mut s = raw_client_offering(addr, 1).await;
    let mut lying = (1u32 << 30).to_le_bytes().to_vec();
    lying.extend_from_slice(&[0x1f, 0, 1, 0]);
    within("send lz4 bomb", s.write_all(&compressed_message(&lying)))
        .await
        .unwrap();
    assert_eq!(wire::read_error(&mut s).await, 5, "MESSAGE_TOO_LARGE");
    wire::expect_closed(&mut s).await;

    // Corrupt compressed bytes are a protocol error, not a panic.
    let mut s = raw_client_offering(addr, 2).await;
    within(
        "send junk",
        s.write_all(&compressed_message(b"not zstd at all")),
    )
    .await
    .unwrap();
    assert_eq!(wire::read_error(&mut s).await, 1, "PROTOCOL_ERROR");

    // The honest client was not disturbed.
    within("honest send", honest.send(Target::All, &doc(1, 5000)))
        .await
        .unwrap();
    assert_eq!(receive(&srv).await.decode::<Doc>().unwrap(), doc(1, 5000));
    shutdown_all(&[&honest, &srv]).await;
}
