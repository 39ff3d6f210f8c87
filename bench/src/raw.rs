//! Raw TCP, the baseline every other figure is divided by: a 4-byte big-endian length prefix
//! and the payload, `TCP_NODELAY` on.
//!
//! - `blocking`: std's blocking sockets, one thread per connection. The practical limit of
//!   what an application can get from the kernel's loopback without a framework.
//! - `tokio`: the same framing on tokio, to separate what the runtime costs from what a
//!   protocol on top of it costs.
//!
//! Both buffer reads and coalesce writes the way a careful hand-written server would: an echo
//! server answers every request it has in its read buffer before it writes them all at once.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::case::{Case, Outcome, RoundTrips, payload};

/// Serves `case` over raw TCP (`variant`: `blocking` or `tokio`).
pub fn serve(variant: &str, case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    match variant {
        "blocking" => serve_blocking(case, ready),
        "tokio" => crate::runtime().block_on(serve_tokio(case, ready)),
        other => bail!("unknown raw variant {other}"),
    }
}

/// Runs `case` against a raw TCP server (`variant`: `blocking` or `tokio`).
pub fn client(
    variant: &str,
    case: &Case,
    addr: SocketAddr,
    idle: &mut dyn FnMut(),
) -> Result<Outcome> {
    match variant {
        "blocking" => client_blocking(case, addr, idle),
        "tokio" => crate::runtime().block_on(async {
            if matches!(case, Case::Connections { .. }) {
                client_tokio(case, addr, idle).await
            } else {
                // On a worker thread, as an application's tasks would be (the code in
                // `block_on` runs on the main thread, where every wake-up crosses threads).
                let case = case.clone();
                tokio::spawn(async move { client_tokio(&case, addr, &mut || ()).await }).await?
            }
        }),
        other => bail!("unknown raw variant {other}"),
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + body.len());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

fn stream_count(case: &Case) -> Option<(usize, usize)> {
    match *case {
        Case::Stream {
            size,
            count,
            warmup,
        } => Some((size, count + warmup)),
        _ => None,
    }
}

// ---- blocking ----

fn serve_blocking(case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    ready(listener.local_addr()?);
    for conn in listener.incoming() {
        let conn = conn?;
        conn.set_nodelay(true)?;
        let case = case.clone();
        std::thread::spawn(move || {
            let _ = match stream_count(&case) {
                Some((size, n)) => blocking_stream_out(conn, size, n),
                None => blocking_echo(conn),
            };
        });
    }
    Ok(())
}

/// Echoes frames; answers everything already read before writing, in one write.
fn blocking_echo(conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(64 << 10, conn.try_clone()?);
    let mut writer = conn;
    let mut out = Vec::with_capacity(64 << 10);
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if let Err(e) = reader.read_exact(&mut len) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        let n = u32::from_be_bytes(len) as usize;
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
        out.extend_from_slice(&len);
        out.extend_from_slice(&body);
        if !has_frame(reader.buffer()) {
            writer.write_all(&out)?;
            out.clear();
        }
    }
}

/// Whether `buf` starts with a whole frame.
fn has_frame(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf.len() - 4 >= u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

fn blocking_stream_out(conn: TcpStream, size: usize, n: usize) -> std::io::Result<()> {
    let body = payload(size);
    let mut w = BufWriter::with_capacity(64 << 10, conn.try_clone()?);
    for _ in 0..n {
        w.write_all(&(size as u32).to_be_bytes())?;
        w.write_all(&body)?;
    }
    w.flush()?;
    // Keep the connection open until the client has read everything and leaves.
    let mut sink = [0u8; 64];
    let mut c = conn;
    while c.read(&mut sink)? > 0 {}
    Ok(())
}

fn connect_blocking(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn read_frame(r: &mut impl Read, body: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    body.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(body)
}

fn client_blocking(case: &Case, addr: SocketAddr, idle: &mut dyn FnMut()) -> Result<Outcome> {
    match *case {
        Case::RoundTrip {
            size,
            count,
            warmup,
            rate,
        } => {
            let mut s = connect_blocking(addr)?;
            let msg = frame(&payload(size));
            let mut body = Vec::new();
            let mut rt = RoundTrips::new(count, warmup, rate);
            for i in 0..rt.total() {
                let t = rt.begin(i);
                s.write_all(&msg)?;
                read_frame(&mut s, &mut body)?;
                rt.end(i, t);
            }
            Ok(rt.finish())
        }
        Case::Stream {
            size,
            count,
            warmup,
        } => {
            let s = connect_blocking(addr)?;
            let mut r = BufReader::with_capacity(256 << 10, s);
            let mut body = Vec::with_capacity(size);
            for _ in 0..warmup {
                read_frame(&mut r, &mut body)?;
            }
            let mut start = None;
            for _ in 0..count {
                read_frame(&mut r, &mut body)?;
                start.get_or_insert_with(Instant::now);
            }
            Ok(Outcome::throughput(count, size, start))
        }
        Case::Requests {
            size,
            count,
            warmup,
            in_flight,
        } => {
            let s = connect_blocking(addr)?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::with_capacity(64 << 10, s);
            let msg = frame(&payload(size));
            let mut body = Vec::new();
            let run = |n: usize,
                       w: &mut TcpStream,
                       r: &mut BufReader<TcpStream>,
                       body: &mut Vec<u8>|
             -> std::io::Result<()> {
                let first = in_flight.min(n);
                w.write_all(&msg.repeat(first))?;
                let mut sent = first;
                for _ in 0..n {
                    read_frame(r, body)?;
                    if sent < n {
                        w.write_all(&msg)?;
                        sent += 1;
                    }
                }
                Ok(())
            };
            run(warmup, &mut w, &mut r, &mut body)?;
            let start = Instant::now();
            run(count, &mut w, &mut r, &mut body)?;
            Ok(Outcome::Rate {
                requests: count as u64,
                seconds: start.elapsed().as_secs_f64(),
            })
        }
        Case::Connections {
            conns,
            size,
            seconds,
        } => {
            let barrier = Arc::new(Barrier::new(conns + 1));
            let done = Arc::new(AtomicU64::new(0));
            let deadline = Arc::new(std::sync::OnceLock::<Instant>::new());
            let msg = Arc::new(frame(&payload(size)));
            let mut threads = Vec::with_capacity(conns);
            for _ in 0..conns {
                let (barrier, done, deadline, msg) =
                    (barrier.clone(), done.clone(), deadline.clone(), msg.clone());
                let mut s = connect_blocking(addr)?;
                threads.push(std::thread::Builder::new().stack_size(64 << 10).spawn(
                    move || -> std::io::Result<()> {
                        let mut body = Vec::new();
                        s.write_all(&msg)?;
                        read_frame(&mut s, &mut body)?;
                        barrier.wait();
                        let end = *deadline.get().expect("set before the barrier");
                        let mut n = 0;
                        while Instant::now() < end {
                            s.write_all(&msg)?;
                            read_frame(&mut s, &mut body)?;
                            n += 1;
                        }
                        done.fetch_add(n, Ordering::Relaxed);
                        Ok(())
                    },
                )?);
            }
            idle();
            let start = Instant::now();
            let _ = deadline.set(start + Duration::from_secs_f64(seconds));
            barrier.wait();
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            }
            Ok(Outcome::Rate {
                requests: done.load(Ordering::Relaxed),
                seconds: start.elapsed().as_secs_f64(),
            })
        }
    }
}

// ---- tokio ----

async fn serve_tokio(case: &Case, ready: &mut dyn FnMut(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    ready(listener.local_addr()?);
    loop {
        let (conn, _) = listener.accept().await?;
        conn.set_nodelay(true)?;
        let stream = stream_count(case);
        tokio::spawn(async move {
            let _ = match stream {
                Some((size, n)) => tokio_stream_out(conn, size, n).await,
                None => tokio_echo(conn).await,
            };
        });
    }
}

async fn tokio_echo(conn: tokio::net::TcpStream) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut out = Vec::with_capacity(64 << 10);
    let mut body = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if let Err(e) = r.read_exact(&mut len).await {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e)
            };
        }
        body.resize(u32::from_be_bytes(len) as usize, 0);
        r.read_exact(&mut body).await?;
        out.extend_from_slice(&len);
        out.extend_from_slice(&body);
        if !has_frame(r.buffer()) {
            w.write_all(&out).await?;
            out.clear();
        }
    }
}

async fn tokio_stream_out(
    conn: tokio::net::TcpStream,
    size: usize,
    n: usize,
) -> std::io::Result<()> {
    let body = payload(size);
    let (mut r, w) = conn.into_split();
    let mut w = tokio::io::BufWriter::with_capacity(64 << 10, w);
    for _ in 0..n {
        w.write_all(&(size as u32).to_be_bytes()).await?;
        w.write_all(&body).await?;
    }
    w.flush().await?;
    let mut sink = [0u8; 64];
    while r.read(&mut sink).await? > 0 {}
    Ok(())
}

async fn connect_tokio(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn read_frame_tokio(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    body: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    body.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(body).await.map(drop)
}

async fn client_tokio<F: FnMut() + ?Sized>(
    case: &Case,
    addr: SocketAddr,
    idle: &mut F,
) -> Result<Outcome> {
    match *case {
        Case::RoundTrip {
            size,
            count,
            warmup,
            rate,
        } => {
            let mut s = connect_tokio(addr).await?;
            let msg = frame(&payload(size));
            let mut body = Vec::new();
            let mut rt = RoundTrips::new(count, warmup, rate);
            for i in 0..rt.total() {
                let t = rt.begin(i);
                s.write_all(&msg).await?;
                read_frame_tokio(&mut s, &mut body).await?;
                rt.end(i, t);
            }
            Ok(rt.finish())
        }
        Case::Stream {
            size,
            count,
            warmup,
        } => {
            let s = connect_tokio(addr).await?;
            let mut r = tokio::io::BufReader::with_capacity(256 << 10, s);
            let mut body = Vec::with_capacity(size);
            for _ in 0..warmup {
                read_frame_tokio(&mut r, &mut body).await?;
            }
            let mut start = None;
            for _ in 0..count {
                read_frame_tokio(&mut r, &mut body).await?;
                start.get_or_insert_with(Instant::now);
            }
            Ok(Outcome::throughput(count, size, start))
        }
        Case::Requests {
            size,
            count,
            warmup,
            in_flight,
        } => {
            let s = connect_tokio(addr).await?;
            let (r, w) = s.into_split();
            let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
            let mut w = w;
            let msg = frame(&payload(size));
            let mut body = Vec::new();
            for (n, timed) in [(warmup, false), (count, true)] {
                let start = Instant::now();
                let first = in_flight.min(n);
                w.write_all(&msg.repeat(first)).await?;
                let mut sent = first;
                for _ in 0..n {
                    read_frame_tokio(&mut r, &mut body).await?;
                    if sent < n {
                        w.write_all(&msg).await?;
                        sent += 1;
                    }
                }
                if timed {
                    return Ok(Outcome::Rate {
                        requests: count as u64,
                        seconds: start.elapsed().as_secs_f64(),
                    });
                }
            }
            unreachable!("the timed round returns")
        }
        Case::Connections {
            conns,
            size,
            seconds,
        } => {
            let msg = Arc::new(frame(&payload(size)));
            let mut streams = Vec::with_capacity(conns);
            for _ in 0..conns {
                let mut s = connect_tokio(addr).await?;
                let mut body = Vec::new();
                s.write_all(&msg).await?;
                read_frame_tokio(&mut s, &mut body).await?;
                streams.push(s);
            }
            tokio::task::block_in_place(&mut *idle);
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(seconds);
            let mut tasks = Vec::with_capacity(conns);
            for mut s in streams {
                let msg = msg.clone();
                tasks.push(tokio::spawn(async move {
                    let mut body = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < end {
                        s.write_all(&msg).await?;
                        read_frame_tokio(&mut s, &mut body).await?;
                        n += 1;
                    }
                    Ok::<_, std::io::Error>(n)
                }));
            }
            let mut requests = 0;
            for t in tasks {
                requests += t.await??;
            }
            Ok(Outcome::Rate {
                requests,
                seconds: start.elapsed().as_secs_f64(),
            })
        }
    }
}
