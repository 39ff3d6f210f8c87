//! gRPC with tonic: HTTP/2 over TCP, messages encoded with prost (see `proto/bench.proto`).
//!
//! One service, `bench.Bench`, serves every variant; `bytes` fields are `bytes::Bytes`, so
//! the server echoes the buffer it decoded and streams one shared buffer, without copying
//! them in the handler (tonic's codec still copies into and out of its frame buffers).
//!
//! Variants:
//! - `unary`: the `Echo` rpc. `RoundTrip`: one call at a time. `Requests`: `in_flight`
//!   calls outstanding on one channel (one TCP connection, one HTTP/2 stream per call).
//!   `Connections`: one channel (one TCP connection) per connection, one call
//!   outstanding on each.
//! - `stream`: `Stream` (server streaming) for `Stream`; `Chat` (one bidirectional
//!   stream, send one message, await its echo) for `RoundTrip`.
//!
//! Both processes run on [`crate::runtime`]. The client's work runs in a task spawned on
//! that runtime (as a `#[tokio::main]` program's would), not on the thread that blocks on
//! it. Paced round trips wait in [`crate::case::RoundTrips`], which blocks the worker running the
//! client task: that is fine here, since one round trip at a time is outstanding and
//! nothing else of the client's has work to do while it waits (the other workers keep the
//! connection going).
//!
//! tonic's defaults are kept (HTTP/2 windows, no compression) except `TCP_NODELAY` on both
//! sides and no limit on decoded message sizes.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use crate::case::{Case, Outcome, RoundTrips, payload};

/// The code `tonic-prost-build` generates from `proto/bench.proto`.
#[allow(clippy::all, missing_docs)]
mod pb {
    tonic::include_proto!("bench");
}

use pb::bench_client::BenchClient;
use pb::bench_server::{Bench, BenchServer};
use pb::{Msg, StreamReq};

/// Whether this module runs `case` as `variant`.
fn supported(variant: &str, case: &Case) -> bool {
    matches!(
        (variant, case),
        (
            "unary",
            Case::RoundTrip { .. } | Case::Requests { .. } | Case::Connections { .. }
        ) | ("stream", Case::Stream { .. } | Case::RoundTrip { .. })
    )
}

/// The service: stateless, every call stands alone.
struct Service;

#[tonic::async_trait]
impl Bench for Service {
    async fn echo(&self, request: Request<Msg>) -> Result<Response<Msg>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<StreamReq>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let StreamReq { size, count } = request.into_inner();
        let count = usize::try_from(count).map_err(|_| Status::invalid_argument("count"))?;
        // One buffer, shared by every message (cloning `Bytes` only counts a reference).
        let msg = Msg {
            data: Bytes::from(payload(size as usize)),
        };
        let messages = std::iter::repeat_n(msg, count).map(Ok);
        Ok(Response::new(Box::pin(futures_util::stream::iter(
            messages,
        ))))
    }

    type ChatStream = Streaming<Msg>;

    async fn chat(
        &self,
        request: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        // The incoming messages, as they are decoded, are the replies.
        Ok(Response::new(request.into_inner()))
    }
}

/// Serves `bench.Bench` on 127.0.0.1, an ephemeral port, for `variant` and `case`; calls
/// `ready` with the address once it listens, then serves until the process ends.
pub fn serve(variant: &str, case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    if !supported(variant, case) {
        bail!("unsupported");
    }
    let rt = crate::runtime();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("bind")?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        ready(addr);
        let service = BenchServer::new(Service).max_decoding_message_size(usize::MAX);
        Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .context("serve")
    })
}

/// Connects to the server at `addr` and runs `case` as `variant`; `idle` is called (in
/// `Connections`) once every connection is open and has made one round trip.
pub fn client(
    variant: &str,
    case: &Case,
    addr: SocketAddr,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    if !supported(variant, case) {
        bail!("unsupported");
    }
    let rt = crate::runtime();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    // Runs `fut` in a task of the runtime, like a `#[tokio::main]` client would.
    let run = |fut: Task| -> Result<Outcome> {
        rt.block_on(async { tokio::spawn(fut).await })
            .context("client task")?
    };
    match (variant, case.clone()) {
        (
            "unary",
            Case::RoundTrip {
                size,
                count,
                warmup,
                rate,
            },
        ) => run(Box::pin(async move {
            let mut client = connect(&endpoint).await?;
            unary_round_trips(&mut client, size, count, warmup, rate).await
        })),
        (
            "unary",
            Case::Requests {
                size,
                count,
                warmup,
                in_flight,
            },
        ) => run(Box::pin(async move {
            let client = connect(&endpoint).await?;
            requests(client, size, count, warmup, in_flight).await
        })),
        (
            "unary",
            Case::Connections {
                conns,
                size,
                seconds,
            },
        ) => {
            let data = Bytes::from(payload(size));
            // Opens the connections and makes one round trip on each, in a task.
            let clients = rt
                .block_on(rt.spawn({
                    let data = data.clone();
                    async move {
                        let mut clients = Vec::with_capacity(conns);
                        for _ in 0..conns {
                            clients.push(connect(&endpoint).await?);
                        }
                        let calls = clients.iter().map(|client| {
                            let mut client = client.clone();
                            let data = data.clone();
                            async move { echo(&mut client, data).await }
                        });
                        for done in futures_util::future::join_all(calls).await {
                            done?;
                        }
                        anyhow::Ok(clients)
                    }
                }))
                .context("client task")??;
            // The connections stay open (their tasks run on the runtime's workers).
            idle();
            run(Box::pin(connections(clients, data, seconds)))
        }
        (
            "stream",
            Case::Stream {
                size,
                count,
                warmup,
            },
        ) => run(Box::pin(async move {
            let mut client = connect(&endpoint).await?;
            stream(&mut client, size, count, warmup).await
        })),
        (
            "stream",
            Case::RoundTrip {
                size,
                count,
                warmup,
                rate,
            },
        ) => run(Box::pin(async move {
            let mut client = connect(&endpoint).await?;
            chat_round_trips(&mut client, size, count, warmup, rate).await
        })),
        _ => bail!("unsupported"),
    }
}

/// A future the client runs in a task.
type Task = Pin<Box<dyn Future<Output = Result<Outcome>> + Send>>;

/// Opens one channel (one TCP connection) to the server.
async fn connect(endpoint: &Endpoint) -> Result<BenchClient<Channel>> {
    let channel = endpoint.connect().await.context("connect")?;
    Ok(BenchClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// One `Echo` call; checks the reply is as long as the request.
async fn echo(client: &mut BenchClient<Channel>, data: Bytes) -> Result<()> {
    let len = data.len();
    let reply = client.echo(Msg { data }).await?.into_inner();
    ensure!(
        reply.data.len() == len,
        "echo of {} bytes",
        reply.data.len()
    );
    Ok(())
}

/// `RoundTrip` over unary calls: `warmup + count` calls one after the other, each timed
/// from just before the call to its reply.
async fn unary_round_trips(
    client: &mut BenchClient<Channel>,
    size: usize,
    count: usize,
    warmup: usize,
    rate: Option<u32>,
) -> Result<Outcome> {
    let data = Bytes::from(payload(size));
    let mut rt = RoundTrips::new(count, warmup, rate);
    for i in 0..rt.total() {
        let t = rt.begin(i);
        echo(client, data.clone()).await?;
        rt.end(i, t);
    }
    Ok(rt.finish())
}

/// `RoundTrip` over one `Chat` stream: send a message, await its echo, `warmup + count`
/// times, each timed from just before the send to the echo.
async fn chat_round_trips(
    client: &mut BenchClient<Channel>,
    size: usize,
    count: usize,
    warmup: usize,
    rate: Option<u32>,
) -> Result<Outcome> {
    let data = Bytes::from(payload(size));
    let (tx, rx) = mpsc::channel::<Msg>(1);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut replies = client.chat(outgoing).await?.into_inner();
    let mut rt = RoundTrips::new(count, warmup, rate);
    for i in 0..rt.total() {
        let t = rt.begin(i);
        tx.send(Msg { data: data.clone() })
            .await
            .map_err(|_| anyhow::anyhow!("chat stream closed"))?;
        let reply = replies.message().await?.context("chat stream ended")?;
        ensure!(
            reply.data.len() == size,
            "echo of {} bytes",
            reply.data.len()
        );
        rt.end(i, t);
    }
    // Ends the request stream; the server then ends the replies.
    drop(tx);
    while replies.message().await?.is_some() {}
    Ok(rt.finish())
}

/// `Requests`: `in_flight` tasks share one channel, each making calls one after the other
/// until `n` calls have been started in all; `warmup` calls first, then `count` timed.
async fn requests(
    client: BenchClient<Channel>,
    size: usize,
    count: usize,
    warmup: usize,
    in_flight: usize,
) -> Result<Outcome> {
    ensure!(in_flight > 0, "in_flight 0");
    let data = Bytes::from(payload(size));
    // Runs `n` calls, `in_flight` at a time.
    let calls = |n: usize| {
        let next = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..in_flight.min(n))
            .map(|_| {
                let mut client = client.clone();
                let data = data.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        echo(&mut client, data.clone()).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        async move {
            for worker in workers {
                worker.await??;
            }
            anyhow::Ok(())
        }
    };
    calls(warmup).await?;
    let t0 = Instant::now();
    calls(count).await?;
    Ok(Outcome::Rate {
        requests: count as u64,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `Connections` after `idle`: one task per connection makes calls one after the other
/// until `seconds` have passed; the rate counts every call completed, over the time until
/// the last one completed.
async fn connections(
    clients: Vec<BenchClient<Channel>>,
    data: Bytes,
    seconds: f64,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let data = data.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < end {
                    echo(&mut client, data.clone()).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut requests = 0;
    for worker in workers {
        requests += worker.await??;
    }
    Ok(Outcome::Rate {
        requests,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `Stream` over the `Stream` rpc: asks for `warmup + count` messages and times from the
/// first timed message's arrival to the last one's.
async fn stream(
    client: &mut BenchClient<Channel>,
    size: usize,
    count: usize,
    warmup: usize,
) -> Result<Outcome> {
    let req = StreamReq {
        size: u32::try_from(size).context("size")?,
        count: (warmup + count) as u64,
    };
    let mut messages = client.stream(req).await?.into_inner();
    let mut t0 = Instant::now();
    let mut bytes = 0u64;
    for i in 0..warmup + count {
        let msg = messages.message().await?.context("stream ended early")?;
        ensure!(
            msg.data.len() == size,
            "message of {} bytes",
            msg.data.len()
        );
        if i == warmup {
            t0 = Instant::now();
        }
        if i >= warmup {
            bytes += msg.data.len() as u64;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    ensure!(messages.message().await?.is_none(), "stream too long");
    Ok(Outcome::Throughput {
        messages: count as u64,
        bytes,
        seconds,
    })
}
