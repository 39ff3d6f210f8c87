//! ZeroMQ (libzmq through the `zmq` crate), with the socket pattern that fits each case:
//!
//! - `reqrep`: REQ client, REP server, for one request outstanding at a time: round trips
//!   (`Case::RoundTrip`), requests with `in_flight == 1` (`Case::Requests`) and many
//!   connections (`Case::Connections`, one REQ socket, so one TCP connection, per
//!   connection). REQ/REP is ZeroMQ's plain request/reply and the fairest counterpart to a
//!   blocking client writing a frame and reading the answer.
//! - `pushpull`: PUSH server, PULL client, for `Case::Stream`: one-way messages with
//!   ZeroMQ's flow control (high-water marks) and its batching of small messages.
//! - `dealer`: DEALER client, ROUTER server, for `Case::Requests` with any `in_flight`.
//!   REQ/REP cannot pipeline (a REQ socket refuses a second send before the answer to the
//!   first), so keeping 64 requests outstanding on one connection needs DEALER, which sends
//!   and receives freely, and ROUTER, which prefixes each request with its peer's routing id
//!   so the echo finds its way back.
//!
//! Other combinations fail with "unsupported", which the orchestrator reports as n/a.
//!
//! Every process has one ZeroMQ context with libzmq's default of one I/O thread; the
//! application thread does the sends and receives. Servers bind `tcp://127.0.0.1:*` and
//! learn the port from `ZMQ_LAST_ENDPOINT`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::case::{Case, Outcome, RoundTrips, payload};

/// libzmq allows 1023 sockets per context by default (`ZMQ_MAX_SOCKETS`), and the `zmq`
/// crate does not expose the setting, so the `Connections` client opens a further context
/// for every this many sockets.
const SOCKETS_PER_CONTEXT: usize = 1000;

/// Listen backlog of the server sockets (libzmq's default is 100, too few for 1000 REQ
/// sockets connecting at once; the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Serves `case` over ZeroMQ (`variant`: `reqrep`, `pushpull` or `dealer`, see the module
/// documentation for which cases each serves). Binds `tcp://127.0.0.1:*`, calls `ready`
/// with the bound address and serves until the process is killed.
pub fn serve(variant: &str, case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    match (variant, case) {
        (
            "reqrep",
            Case::RoundTrip { .. } | Case::Requests { in_flight: 1, .. } | Case::Connections { .. },
        ) => serve_rep(ready),
        (
            "pushpull",
            &Case::Stream {
                size,
                count,
                warmup,
            },
        ) => serve_push(size, warmup + count, ready),
        ("dealer", Case::Requests { .. }) => serve_router(ready),
        _ => bail!("unsupported"),
    }
}

/// Runs `case` against the ZeroMQ server at `addr` (`variant`: `reqrep`, `pushpull` or
/// `dealer`) and returns what it measured. For `Case::Connections` it calls `idle` once all
/// connections are open and have made one round trip each.
pub fn client(
    variant: &str,
    case: &Case,
    addr: SocketAddr,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    let endpoint = format!("tcp://{addr}");
    match (variant, case) {
        (
            "reqrep",
            &Case::RoundTrip {
                size,
                count,
                warmup,
                rate,
            },
        ) => round_trips(&endpoint, size, count, warmup, rate),
        (
            "reqrep",
            &Case::Requests {
                size,
                count,
                warmup,
                in_flight: 1,
            },
        ) => requests(zmq::REQ, &endpoint, size, count, warmup, 1),
        (
            "reqrep",
            &Case::Connections {
                conns,
                size,
                seconds,
            },
        ) => connections(&endpoint, conns, size, seconds, idle),
        (
            "pushpull",
            &Case::Stream {
                size,
                count,
                warmup,
            },
        ) => pull(&endpoint, size, count, warmup),
        (
            "dealer",
            &Case::Requests {
                size,
                count,
                warmup,
                in_flight,
            },
        ) => requests(zmq::DEALER, &endpoint, size, count, warmup, in_flight),
        _ => bail!("unsupported"),
    }
}

// ---- servers ----

/// Creates a socket of `kind`, sets its high-water marks to `hwm` if given, binds it to an
/// ephemeral loopback port and returns it with the address it bound. Options must be set
/// before `bind`: libzmq's listener copies them then, and connections it accepts use that
/// copy.
fn bind(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    hwm: Option<i32>,
) -> Result<(zmq::Socket, SocketAddr)> {
    let sock = ctx.socket(kind).context("create server socket")?;
    sock.set_backlog(BACKLOG).context("set ZMQ_BACKLOG")?;
    if let Some(hwm) = hwm {
        sock.set_sndhwm(hwm).context("set ZMQ_SNDHWM")?;
        sock.set_rcvhwm(hwm).context("set ZMQ_RCVHWM")?;
    }
    sock.bind("tcp://127.0.0.1:*")
        .context("bind tcp://127.0.0.1:*")?;
    let endpoint = sock
        .get_last_endpoint()
        .context("get ZMQ_LAST_ENDPOINT")?
        .map_err(|raw| anyhow::anyhow!("ZMQ_LAST_ENDPOINT is not UTF-8: {raw:?}"))?;
    let addr = endpoint
        .strip_prefix("tcp://")
        .unwrap_or(&endpoint)
        .parse()
        .with_context(|| format!("parse bound endpoint {endpoint}"))?;
    Ok((sock, addr))
}

/// One REP socket echoing every request. REP answers one request at a time, taking them
/// fairly (round robin) from all its peers, which is all a single server thread could do
/// anyway; with every REQ client keeping only one request outstanding, REP keeps up with
/// 1000 connections without a ROUTER.
fn serve_rep(ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let ctx = zmq::Context::new();
    let (sock, addr) = bind(&ctx, zmq::REP, None)?;
    ready(addr);
    loop {
        let msg = sock.recv_msg(0).context("REP receive")?;
        // Sending the received message hands its buffer back to libzmq: no copy.
        sock.send(msg, 0).context("REP send")?;
    }
}

/// One ROUTER socket echoing every request, routing id frame and all, to whichever DEALER
/// (or REQ) sent it.
fn serve_router(ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let ctx = zmq::Context::new();
    let (sock, addr) = bind(&ctx, zmq::ROUTER, None)?;
    ready(addr);
    let mut frame = zmq::Message::new();
    loop {
        // A request is [routing id, body] from a DEALER ([id, empty, body] from a REQ); the
        // reply is the same frames, so each goes straight back out as it arrives.
        loop {
            sock.recv(&mut frame, 0).context("ROUTER receive")?;
            let more = frame.get_more();
            let out = std::mem::replace(&mut frame, zmq::Message::new());
            sock.send(out, if more { zmq::SNDMORE } else { 0 })
                .context("ROUTER send")?;
            if !more {
                break;
            }
        }
    }
}

/// The high-water mark (in messages, each direction) for a stream of `size`-byte
/// messages: libzmq's default of 1000, but no more than about 16 MiB queued, so 1 MiB
/// messages queue 16 deep rather than a gigabyte in each process.
fn stream_hwm(size: usize) -> i32 {
    ((16 << 20) / size.max(1)).clamp(16, 1000) as i32
}

/// One PUSH socket: sends `n` messages of `size` bytes as fast as it can once the client
/// has connected (a PUSH socket without peers blocks on send), then idles so the queued
/// messages drain, until the process is killed.
fn serve_push(size: usize, n: usize, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let ctx = zmq::Context::new();
    let (sock, addr) = bind(&ctx, zmq::PUSH, Some(stream_hwm(size)))?;
    ready(addr);
    let body = payload(size);
    for _ in 0..n {
        sock.send(&body[..], 0).context("PUSH send")?;
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// ---- clients ----

/// A client socket of `kind` connected to `endpoint`, not lingering on close.
fn connect(ctx: &zmq::Context, kind: zmq::SocketType, endpoint: &str) -> Result<zmq::Socket> {
    let sock = ctx.socket(kind).context("create client socket")?;
    sock.set_linger(0).context("set ZMQ_LINGER")?;
    sock.connect(endpoint)
        .with_context(|| format!("connect {endpoint}"))?;
    Ok(sock)
}

/// Receives one reply into `msg` and checks it is `size` bytes.
fn recv_reply(sock: &zmq::Socket, msg: &mut zmq::Message, size: usize) -> Result<()> {
    sock.recv(msg, 0).context("receive reply")?;
    if msg.len() != size {
        bail!("reply of {} bytes, expected {size}", msg.len());
    }
    Ok(())
}

/// `Case::RoundTrip` on one REQ socket: send, wait for the echo, `warmup + count` times,
/// paced at `rate` per second if given.
fn round_trips(
    endpoint: &str,
    size: usize,
    count: usize,
    warmup: usize,
    rate: Option<u32>,
) -> Result<Outcome> {
    let ctx = zmq::Context::new();
    let sock = connect(&ctx, zmq::REQ, endpoint)?;
    let body = payload(size);
    let mut msg = zmq::Message::new();
    let mut rt = RoundTrips::new(count, warmup, rate);
    for i in 0..rt.total() {
        let t = rt.begin(i);
        sock.send(&body[..], 0).context("REQ send")?;
        recv_reply(&sock, &mut msg, size)?;
        rt.end(i, t);
    }
    Ok(rt.finish())
}

/// `Case::Requests` on one socket of `kind` (REQ for one in flight, DEALER for any number):
/// `warmup` untimed requests, then `count` timed ones, `in_flight` outstanding throughout.
fn requests(
    kind: zmq::SocketType,
    endpoint: &str,
    size: usize,
    count: usize,
    warmup: usize,
    in_flight: usize,
) -> Result<Outcome> {
    if in_flight == 0 {
        bail!("in_flight must be at least 1");
    }
    let ctx = zmq::Context::new();
    let sock = connect(&ctx, kind, endpoint)?;
    if kind == zmq::DEALER {
        // Room for every outstanding request and reply, whatever `in_flight` is.
        let hwm = i32::try_from(in_flight.max(1000)).unwrap_or(i32::MAX);
        sock.set_sndhwm(hwm).context("set ZMQ_SNDHWM")?;
        sock.set_rcvhwm(hwm).context("set ZMQ_RCVHWM")?;
    }
    let body = payload(size);
    let mut msg = zmq::Message::new();
    let mut run = |n: usize| -> Result<()> {
        let first = in_flight.min(n);
        for _ in 0..first {
            sock.send(&body[..], 0).context("send request")?;
        }
        let mut sent = first;
        for _ in 0..n {
            recv_reply(&sock, &mut msg, size)?;
            if sent < n {
                sock.send(&body[..], 0).context("send request")?;
                sent += 1;
            }
        }
        Ok(())
    };
    run(warmup)?;
    let start = Instant::now();
    run(count)?;
    Ok(Outcome::Rate {
        requests: count as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `Case::Connections`: `conns` REQ sockets, each its own TCP connection. All make one round
/// trip, then `idle()`, then for `seconds` every socket keeps one request outstanding; one
/// `zmq_poll` over all of them finds the answered ones. Counts the replies taken in until
/// the deadline passes; `seconds` in the outcome is the time that took.
fn connections(
    endpoint: &str,
    conns: usize,
    size: usize,
    seconds: f64,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    let contexts: Vec<zmq::Context> = (0..conns.div_ceil(SOCKETS_PER_CONTEXT))
        .map(|_| zmq::Context::new())
        .collect();
    let socks = (0..conns)
        .map(|i| connect(&contexts[i / SOCKETS_PER_CONTEXT], zmq::REQ, endpoint))
        .collect::<Result<Vec<_>>>()?;
    let body = payload(size);
    let mut msg = zmq::Message::new();
    // One round trip on every connection: all requests out first, so the connections come
    // up in parallel, then every reply.
    for sock in &socks {
        sock.send(&body[..], 0).context("REQ send")?;
    }
    for sock in &socks {
        recv_reply(sock, &mut msg, size)?;
    }
    idle();

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    for sock in &socks {
        sock.send(&body[..], 0).context("REQ send")?;
    }
    let mut items: Vec<zmq::PollItem> = socks.iter().map(|s| s.as_poll_item(zmq::POLLIN)).collect();
    let mut done: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        // Round up, so the last poll does not return early and spin.
        let left_ms = (end - now).as_micros().div_ceil(1000) as i64;
        if zmq::poll(&mut items, left_ms).context("zmq_poll")? == 0 {
            continue;
        }
        for (item, sock) in items.iter().zip(&socks) {
            if !item.is_readable() {
                continue;
            }
            match sock.recv(&mut msg, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => continue,
                Err(e) => return Err(e).context("REQ receive"),
            }
            if msg.len() != size {
                bail!("reply of {} bytes, expected {size}", msg.len());
            }
            done += 1;
            sock.send(&body[..], 0).context("REQ send")?;
        }
    }
    Ok(Outcome::Rate {
        requests: done,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `Case::Stream` on one PULL socket: `warmup` messages untimed, then `count` timed from
/// the first of them received to the last.
fn pull(endpoint: &str, size: usize, count: usize, warmup: usize) -> Result<Outcome> {
    let ctx = zmq::Context::new();
    let sock = ctx.socket(zmq::PULL).context("create PULL socket")?;
    sock.set_linger(0).context("set ZMQ_LINGER")?;
    sock.set_rcvhwm(stream_hwm(size))
        .context("set ZMQ_RCVHWM")?;
    sock.connect(endpoint)
        .with_context(|| format!("connect {endpoint}"))?;
    let mut msg = zmq::Message::new();
    for _ in 0..warmup {
        recv_reply(&sock, &mut msg, size)?;
    }
    let mut start = None;
    for _ in 0..count {
        recv_reply(&sock, &mut msg, size)?;
        start.get_or_insert_with(Instant::now);
    }
    Ok(Outcome::throughput(count, size, start))
}
