//! The fault proxy itself, checked with raw TCP sockets: faults fire at the byte offsets they
//! were given, in the direction they were given, and repeat from the seed.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{announce, body, within};
use slic_test::proxy::{Direction, FaultKind, FaultProxy, Faults};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A listener on loopback, a proxy in front of it with `faults`, and a connection through it:
/// (client side, server side, proxy).
async fn pair(seed: u64, c2s: Faults, s2c: Faults) -> (TcpStream, TcpStream, FaultProxy) {
    let listener = within("bind", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let target: SocketAddr = listener.local_addr().unwrap();
    let proxy = within(
        "start proxy",
        FaultProxy::builder(target)
            .seed(seed)
            .client_to_server(c2s)
            .server_to_client(s2c)
            .start(),
    )
    .await
    .unwrap();
    let client = within("connect", TcpStream::connect(proxy.addr()))
        .await
        .unwrap();
    let (server, _) = within("accept", listener.accept()).await.unwrap();
    (client, server, proxy)
}

/// Reads until end of stream or an error; returns the bytes and how it ended.
async fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0_u8; 8192];
    let end = within("read to end", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    (got, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_unchanged_in_both_directions_through_one_byte_slices() {
    let seed = announce("slices", 0x0051_11ce);
    let (mut client, mut server, proxy) =
        pair(seed, Faults::none().slice(1), Faults::none().slice(3)).await;
    let up = body(seed, 0, 20_000);
    let down = body(seed, 1, 30_000);
    within("write up", client.write_all(&up)).await.unwrap();
    within("write down", server.write_all(&down)).await.unwrap();
    client.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
    let (got_up, end_up) = read_to_end(&mut server).await;
    let (got_down, end_down) = read_to_end(&mut client).await;
    end_up.unwrap();
    end_down.unwrap();
    assert!(got_up == up, "client to server bytes differ");
    assert!(got_down == down, "server to client bytes differ");
    let ends: Vec<_> = proxy
        .events()
        .into_iter()
        .map(|e| (e.direction, e.offset, e.kind))
        .collect();
    assert!(ends.contains(&(Direction::ClientToServer, 20_000, FaultKind::EndOfStream)));
    assert!(ends.contains(&(Direction::ServerToClient, 30_000, FaultKind::EndOfStream)));
}

async fn flipped_zeros(seed: u64) -> (Vec<u8>, Vec<(u64, FaultKind)>) {
    let faults = Faults::none()
        .flip_at(0)
        .flip_at(17)
        .flip_at(999)
        .flip_probability(0.01);
    let (mut client, mut server, proxy) = pair(seed, faults, Faults::none()).await;
    within("write", client.write_all(&[0_u8; 1000]))
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let (got, end) = read_to_end(&mut server).await;
    end.unwrap();
    let flips = proxy
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, FaultKind::Flip { .. }))
        .map(|e| (e.offset, e.kind))
        .collect();
    (got, flips)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flips_change_one_bit_of_the_chosen_bytes_and_repeat_with_the_seed() {
    let seed = announce("flips", 0xf11b);
    let (got, flips) = flipped_zeros(seed).await;
    assert_eq!(got.len(), 1000);
    for offset in [0, 17, 999] {
        assert_eq!(
            got[offset].count_ones(),
            1,
            "byte {offset}: {:#04x}",
            got[offset]
        );
    }
    // Every changed byte has exactly one bit set and is in the log, and nothing else changed.
    let changed: Vec<u64> = (0..got.len() as u64)
        .filter(|&i| got[i as usize] != 0)
        .collect();
    let logged: Vec<u64> = flips.iter().map(|(o, _)| *o).collect();
    assert_eq!(changed, logged);
    assert!(got.iter().all(|b| b.count_ones() <= 1));
    assert!(
        logged.len() > 3,
        "a 1% probability over 1000 bytes flipped nothing"
    );
    // The same seed flips the same bits.
    let (again, flips_again) = flipped_zeros(seed).await;
    assert_eq!(got, again);
    assert_eq!(flips, flips_again);
    // Another seed does not.
    let (other, _) = flipped_zeros(seed + 1).await;
    assert_ne!(got, other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_at_ends_both_streams_cleanly_right_after_the_offset() {
    let seed = announce("close", 0xc105e);
    let (mut client, mut server, proxy) = pair(
        seed,
        Faults::none().close_at(5000).slice(700),
        Faults::none(),
    )
    .await;
    let data = body(seed, 0, 8000);
    // The proxy reads and discards what comes after the close, so this write completes.
    within("write", client.write_all(&data)).await.unwrap();
    let (got, end) = read_to_end(&mut server).await;
    end.expect("a clean end of stream at the server");
    assert!(
        got == data[..5000],
        "got {} bytes, not the first 5000",
        got.len()
    );
    let (back, end) = read_to_end(&mut client).await;
    end.expect("a clean end of stream at the client");
    assert!(back.is_empty());
    assert!(
        proxy
            .events()
            .iter()
            .any(|e| e.kind == FaultKind::Close && e.offset == 5000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_at_gives_both_ends_a_connection_reset() {
    let seed = announce("reset", 0x7e5e7);
    let (mut client, mut server, proxy) =
        pair(seed, Faults::none(), Faults::none().reset_at(3000)).await;
    let data = body(seed, 0, 8000);
    within("write", server.write_all(&data)).await.unwrap();
    let (got, end) = read_to_end(&mut client).await;
    let e = end.expect_err("the client reads a reset, not an end of stream");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        got.len() <= 3000 && got == data[..got.len()],
        "{} bytes",
        got.len()
    );
    // The server learns of the reset on its next read.
    let (_, end) = read_to_end(&mut server).await;
    let e = end.expect_err("the server reads a reset, not an end of stream");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        proxy
            .events()
            .iter()
            .any(|e| e.kind == FaultKind::Reset && e.offset == 3000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_stall_and_bandwidth_hold_bytes_back_as_long_as_they_say() {
    let seed = announce("timing", 0x71e);
    let faults = Faults::none()
        .latency(Duration::from_millis(100), Duration::from_millis(20))
        .stall(10, Duration::from_millis(200))
        .bandwidth(100_000);
    let (mut client, mut server, _proxy) = pair(seed, faults, Faults::none()).await;
    let data = body(seed, 0, 20_010);
    let started = Instant::now();
    within("write", client.write_all(&data)).await.unwrap();
    let mut first = [0_u8; 10];
    within("first bytes", server.read_exact(&mut first))
        .await
        .unwrap();
    let first_at = started.elapsed();
    let mut rest = vec![0_u8; 20_000];
    within("the rest", server.read_exact(&mut rest))
        .await
        .unwrap();
    let all_at = started.elapsed();
    println!("first 10 bytes after {first_at:?}, all after {all_at:?}");
    assert!(first_at >= Duration::from_millis(80), "{first_at:?}");
    // 80 ms latency at least, a 200 ms stall, and 20 000 bytes at 100 kB/s (200 ms, less
    // one 10 ms slice).
    assert!(
        all_at >= Duration::from_millis(80 + 200 + 190),
        "{all_at:?}"
    );
    assert!(first[..] == data[..10] && rest[..] == data[10..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_its_listener_and_its_connections() {
    let seed = announce("drop", 0xd70b);
    let (mut client, _server, proxy) = pair(seed, Faults::none(), Faults::none()).await;
    let addr = proxy.addr();
    drop(proxy);
    let (_, _) = read_to_end(&mut client).await;
    // The abort takes effect on the runtime's next turn: retry a bounded number of times.
    let mut refused = false;
    for _ in 0..200 {
        match within("connect after drop", TcpStream::connect(addr)).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(
        refused,
        "the proxy still accepts on {addr} after being dropped"
    );
}
