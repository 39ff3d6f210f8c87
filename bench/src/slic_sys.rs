//! slic over TCP, used the way its README shows: a `Node` on each side, raw-bytes messages
//! (`send_bytes`, `recv`) for round trips and streams, resources (`get_resource`) for
//! request/response.
//!
//! Variant `tcp`: default settings. Nothing here is tuned beyond what a user would write.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use slic::{Event, FrameChecksum, IdleStrategy, Node, PeerId, Request, Status, Target};

use crate::case::{Case, Outcome, RoundTrips, payload};

const ECHO: &str = "echo";

/// Serves `case` with a slic node.
pub fn serve(variant: &str, case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let builder = builder(variant)?;
    crate::runtime().block_on(async {
        // 1,000 connections from one address: past the default per-address limit (256),
        // which guards a server against one host hogging it.
        let node = builder
            .name("bench-server")
            .max_connections_per_ip(100_000)
            .build()?;
        node.create_resource(ECHO, |req: Request<Vec<u8>>| async move {
            Ok::<_, Status>(req.body)
        })?;
        let mut events = node.events();
        let addr = node.listen("127.0.0.1:0").await?;
        ready(addr);
        match *case {
            Case::Stream {
                size,
                count,
                warmup,
            } => {
                let body = Bytes::from(payload(size));
                loop {
                    let Some(event) = events.recv().await else {
                        return Ok(());
                    };
                    if let Event::PeerConnected(peer) = event {
                        // On a worker thread, as an application's task would be.
                        let (node, body) = (node.clone(), body.clone());
                        tokio::spawn(async move {
                            for _ in 0..count + warmup {
                                node.send_bytes(Target::Peer(peer.id), body.clone()).await?;
                            }
                            Ok::<_, slic::Error>(())
                        })
                        .await??;
                    }
                }
            }
            // Echo every message back to its sender (requests are answered by the resource),
            // in a task on a worker thread, as an application would.
            _ => {
                tokio::spawn(async move {
                    loop {
                        let m = node.recv().await?;
                        let from = m.from.id;
                        // A peer that left while its echo was on the way is not an error here.
                        let _ = node.send_bytes(Target::Peer(from), m.body).await;
                    }
                })
                .await?
            }
        }
    })
}

/// Runs `case` against a slic server.
pub fn client(
    variant: &str,
    case: &Case,
    addr: SocketAddr,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    let builder = builder(variant)?;
    crate::runtime().block_on(async {
        let node = builder.name("bench-client").build()?;
        let outcome = if let Case::Connections {
            conns,
            size,
            seconds,
        } = *case
        {
            connections(&node, addr, conns, size, seconds, idle).await
        } else {
            // On a worker thread, as an application's tasks would be: the code in `block_on`
            // runs on the main thread, where every wake-up crosses threads.
            let (n, c) = (node.clone(), case.clone());
            tokio::spawn(async move { run_client(&n, &c, addr).await }).await?
        };
        node.shutdown().await;
        outcome
    })
}

/// The node settings a variant names: `tcp` (defaults), `tcp-park` (idle strategy PARK:
/// never poll), `tcp-checksum` / `tcp-nochecksum` (frame checksums always / never),
/// `tcp-spinN` (poll N µs), `tcp-spinN-yieldM` (then M µs yielding).
fn builder(variant: &str) -> Result<slic::NodeBuilder> {
    let b = Node::builder();
    Ok(match variant {
        "tcp" => b,
        "tcp-park" => b.idle_strategy(IdleStrategy::PARK),
        "tcp-checksum" => b.frame_checksum(FrameChecksum::Always),
        "tcp-nochecksum" => b.frame_checksum(FrameChecksum::Never),
        v if v.starts_with("tcp-window") => {
            // tcp-windowN: channel window of N KiB (connection window 4x that)
            let kib: u32 = v["tcp-window".len()..].parse()?;
            b.channel_window(kib << 10).connection_window(kib << 12)
        }
        v => {
            // tcp-spinN or tcp-spinN-yieldM (microseconds)
            let rest = v.strip_prefix("tcp-spin").context("unknown slic variant")?;
            let (spin, yield_for) = match rest.split_once("-yield") {
                Some((a, b)) => (a.parse()?, b.parse()?),
                None => (rest.parse()?, 0),
            };
            b.idle_strategy(IdleStrategy::spin_then_yield(
                Duration::from_micros(spin),
                Duration::from_micros(yield_for),
            ))
        }
    })
}

async fn run_client(node: &Node, case: &Case, addr: SocketAddr) -> Result<Outcome> {
    match *case {
        Case::RoundTrip {
            size,
            count,
            warmup,
            rate,
        } => {
            let peer = node.connect(addr).await.context("connect")?;
            let body = Bytes::from(payload(size));
            let mut rt = RoundTrips::new(count, warmup, rate);
            for i in 0..rt.total() {
                let t = rt.begin(i);
                node.send_bytes(Target::Peer(peer), body.clone()).await?;
                let m = node.recv().await?;
                rt.end(i, t);
                if m.body.len() != size {
                    bail!("echo of {} bytes, sent {size}", m.body.len());
                }
            }
            Ok(rt.finish())
        }
        Case::Stream {
            size,
            count,
            warmup,
        } => {
            node.connect(addr).await.context("connect")?;
            for _ in 0..warmup {
                node.recv().await?;
            }
            let mut start = None;
            for _ in 0..count {
                let m = node.recv().await?;
                start.get_or_insert_with(Instant::now);
                if m.body.len() != size {
                    bail!("message of {} bytes, expected {size}", m.body.len());
                }
            }
            Ok(Outcome::throughput(count, size, start))
        }
        Case::Requests {
            size,
            count,
            warmup,
            in_flight,
        } => {
            let peer = node.connect(addr).await.context("connect")?;
            let body = payload(size);
            requests(node, peer, &body, warmup, in_flight).await?;
            let start = Instant::now();
            requests(node, peer, &body, count, in_flight).await?;
            Ok(Outcome::Rate {
                requests: count as u64,
                seconds: start.elapsed().as_secs_f64(),
            })
        }
        Case::Connections { .. } => bail!("run by connections()"),
    }
}

/// `conns` connections from one node, one echo outstanding on each.
async fn connections(
    node: &Node,
    addr: SocketAddr,
    conns: usize,
    size: usize,
    seconds: f64,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    {
        {
            // One node with `conns` connections to the server; one echo outstanding on each.
            let body = Bytes::from(payload(size));
            let mut peers = Vec::with_capacity(conns);
            for _ in 0..conns {
                let peer = node.connect(addr).await.context("connect")?;
                node.send_bytes(Target::Peer(peer), body.clone()).await?;
                node.recv().await?;
                peers.push(peer);
            }
            tokio::task::block_in_place(&mut *idle);
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(seconds);
            for &peer in &peers {
                node.send_bytes(Target::Peer(peer), body.clone()).await?;
            }
            let mut done = 0u64;
            let mut outstanding = conns;
            while outstanding > 0 {
                let m = node.recv().await?;
                done += 1;
                if Instant::now() < end {
                    node.send_bytes(Target::Peer(m.from.id), body.clone())
                        .await?;
                } else {
                    outstanding -= 1;
                }
            }
            Ok(Outcome::Rate {
                requests: done,
                seconds: start.elapsed().as_secs_f64(),
            })
        }
    }
}

/// `n` echo requests with `in_flight` callers sharing the connection.
async fn requests(
    node: &Node,
    peer: PeerId,
    body: &[u8],
    n: usize,
    in_flight: usize,
) -> Result<()> {
    let callers = in_flight.clamp(1, n.max(1));
    let mut tasks = Vec::with_capacity(callers);
    for c in 0..callers {
        let node = node.clone();
        let body = body.to_vec();
        let mine = n / callers + usize::from(c < n % callers);
        tasks.push(tokio::spawn(async move {
            for _ in 0..mine {
                let r: Vec<u8> = node.get_resource_from(peer, ECHO, &body).await?;
                if r.len() != body.len() {
                    bail!("echo of {} bytes, sent {}", r.len(), body.len());
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
