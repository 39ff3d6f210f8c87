//! `slic bench`: figures measured in one run, every one next to its raw-TCP baseline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use slic::{Compression, Node, Request, Status, Target, TlsConfig};

use crate::{micros, runtime, step};

struct Figures {
    p50: Duration,
    p99: Duration,
}

fn figures(mut v: Vec<Duration>) -> Figures {
    v.sort_unstable();
    Figures {
        p50: v[v.len() / 2],
        p99: v[v.len() * 99 / 100],
    }
}

pub(crate) fn run(
    rounds: usize,
    size: usize,
    requests: usize,
    upload_mib: u64,
    stream_mib: usize,
) -> Result<()> {
    if rounds == 0 || size == 0 {
        bail!("--rounds and --size must be positive");
    }
    let raw = raw_tcp_pingpong(rounds, size)?;
    let rt = runtime()?;
    let slic = rt.block_on(async {
        let (server, client) = pair(Link::Plain).await?;
        slic_pingpong(&server, &client, rounds, size).await
    })?;
    println!("| system | size | rounds | p50 µs | p99 µs | p50 ratio | p99 ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (name, f) in [("raw blocking TCP", &raw), ("slic (tokio, TCP)", &slic)] {
        println!(
            "| {name} | {size} B | {rounds} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
            micros(f.p50),
            micros(f.p99),
            f.p50.as_secs_f64() / raw.p50.as_secs_f64(),
            f.p99.as_secs_f64() / raw.p99.as_secs_f64()
        );
    }
    if requests > 0 {
        println!();
        println!("| slic requests, one connection | requests | requests/s |");
        println!("|---|---|---|");
        for in_flight in [1, 64] {
            let rate = rt.block_on(request_rate(requests, in_flight))?;
            println!("| {in_flight} in flight | {requests} | {rate:.0} |");
        }
    }
    if stream_mib > 0 {
        println!();
        println!(
            "| link | {size} B round trip p50 µs | p99 µs | 1 MiB stream, compressible MB/s | \
             incompressible MB/s |"
        );
        println!("|---|---|---|---|---|");
        for link in [Link::Plain, Link::Tls, Link::TlsLz4] {
            let (p, text, noise) = rt.block_on(async {
                let (server, client) = pair(link).await?;
                let p = slic_pingpong(&server, &client, rounds, size).await?;
                let text = stream_rate(&server, &client, stream_mib, true).await?;
                let noise = stream_rate(&server, &client, stream_mib, false).await?;
                client.shutdown().await;
                server.shutdown().await;
                Ok::<_, anyhow::Error>((p, text, noise))
            })?;
            println!(
                "| {} | {:.1} | {:.1} | {text:.0} | {noise:.0} |",
                link.name(),
                micros(p.p50),
                micros(p.p99)
            );
        }
    }
    if upload_mib > 0 {
        println!();
        let (raw_rate, slic_rate) = rt.block_on(upload_rates(upload_mib))?;
        println!("| {upload_mib} MiB file to disk, fsynced | MB/s | ratio |");
        println!("|---|---|---|");
        println!("| raw TCP copy | {raw_rate:.0} | 1.00x |");
        println!(
            "| slic upload (BLAKE3-checked) | {slic_rate:.0} | {:.2}x |",
            slic_rate / raw_rate
        );
    }
    Ok(())
}

/// Requests/s of `:bench` calls on one connection with `in_flight` callers.
async fn request_rate(requests: usize, in_flight: usize) -> Result<f64> {
    let server = Node::builder().name("bench-server").build()?;
    server.create_resource(":bench", |req: Request<u64>| async move {
        Ok::<_, Status>(req.body + 1)
    })?;
    let addr = server.listen("127.0.0.1:0").await?;
    let client = Node::builder().name("bench-client").build()?;
    client.connect(addr).await?;
    let per_task = requests.div_ceil(in_flight);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(in_flight);
    for t in 0..in_flight {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task as u64 {
                let v = (t as u64) << 32 | i;
                let r: u64 = client.get_resource(":bench", &v).await?;
                if r != v + 1 {
                    return Err(anyhow::anyhow!("wrong reply {r} to {v}"));
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (per_task * in_flight) as f64 / start.elapsed().as_secs_f64();
    client.shutdown().await;
    server.shutdown().await;
    Ok(rate)
}

/// MB/s of a raw TCP copy and of a slic upload of the same file, each written and fsynced.
async fn upload_rates(mib: u64) -> Result<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("slic-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store"))?;
    let src = dir.join("payload.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src)?);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block)?;
        }
        f.flush()?;
    }
    let bytes = (mib << 20) as f64;
    let raw = {
        let src = src.clone();
        let dst = dir.join("raw.bin");
        tokio::task::spawn_blocking(move || raw_copy(&src, &dst)).await??
    };
    let server = Node::builder().name("bench-server").build()?;
    server.create_upload_resource_with(
        ":upload",
        dir.join("store"),
        slic::UploadOptions::default().max_size(u64::MAX),
    )?;
    let addr = server.listen("127.0.0.1:0").await?;
    let client = Node::builder().name("bench-client").build()?;
    client.connect(addr).await?;
    let start = Instant::now();
    client.upload_resource(":upload", &src).await?;
    let slic = start.elapsed();
    client.shutdown().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok((
        bytes / raw.as_secs_f64() / 1e6,
        bytes / slic.as_secs_f64() / 1e6,
    ))
}

fn raw_copy(src: &std::path::Path, dst: &std::path::Path) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dst = dst.to_owned();
    let start = Instant::now();
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut out = std::fs::File::create(&dst)?;
        std::io::copy(&mut s, &mut out)?;
        out.sync_all()
    });
    let mut file = std::fs::File::open(src)?;
    let mut s = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    drop(s);
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(start.elapsed())
}

/// The practical limit: blocking std sockets, a 4-byte length prefix, an echo thread.
fn raw_tcp_pingpong(rounds: usize, size: usize) -> Result<Figures> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let total = rounds + rounds / 10;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 4 + size];
        for _ in 0..total {
            s.read_exact(&mut buf)?;
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut msg = vec![1u8; 4 + size];
    msg[..4].copy_from_slice(&(size as u32).to_be_bytes());
    let mut back = vec![0u8; 4 + size];
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..total {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        if i >= rounds / 10 {
            rtts.push(t.elapsed());
        }
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(figures(rtts))
}

/// The links the transport table compares.
#[derive(Clone, Copy, Debug)]
enum Link {
    /// Plain TCP (with the default frame checksum policy: none on loopback).
    Plain,
    /// TLS 1.3.
    Tls,
    /// TLS 1.3 with lz4 compression.
    TlsLz4,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain TCP",
            Self::Tls => "TLS 1.3",
            Self::TlsLz4 => "TLS 1.3 + lz4",
        }
    }
}

/// A connected server and client over `link`; TLS with a certificate made for this run.
async fn pair(link: Link) -> Result<(Node, Node)> {
    let mut server = Node::builder().name("bench-server");
    let mut client = Node::builder().name("bench-client");
    let listen = match link {
        Link::Plain => "127.0.0.1:0",
        Link::Tls | Link::TlsLz4 => {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
            let cert = slic::CertificateDer::from(ck.cert.der().to_vec());
            let key = slic::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                .map_err(|e| anyhow::anyhow!("key: {e}"))?;
            server = server.tls(
                TlsConfig::builder()
                    .identity(vec![cert.clone()], key)
                    .build()?,
            );
            client = client.tls(TlsConfig::builder().trust(cert).build()?);
            "tls://127.0.0.1:0"
        }
    };
    if let Link::TlsLz4 = link {
        server = server.compression(&[Compression::Lz4]);
        client = client.compression(&[Compression::Lz4]);
    }
    let server = server.build()?;
    let addr = server.listen(listen).await?;
    let client = client.build()?;
    let target = match link {
        Link::Plain => addr.to_string(),
        Link::Tls | Link::TlsLz4 => format!("tls://localhost:{}", addr.port()),
    };
    client.connect(target.as_str()).await?;
    Ok((server, client))
}

/// MB/s at the receiver of a one-way stream of 1 MiB messages.
async fn stream_rate(server: &Node, client: &Node, mib: usize, compressible: bool) -> Result<f64> {
    let body: Vec<u8> = if compressible {
        b"slic streams messages; "
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect()
    } else {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let body = slic::Bytes::from(body);
    let start = Instant::now();
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..mib {
                client.send_bytes(Target::All, body.clone()).await?;
            }
            Ok::<_, slic::Error>(())
        })
    };
    let mut bytes = 0usize;
    for _ in 0..mib {
        bytes += step("stream receive", server.receive()).await?.body.len();
    }
    sender.await??;
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

async fn slic_pingpong(
    server: &Node,
    client: &Node,
    rounds: usize,
    size: usize,
) -> Result<Figures> {
    let total = rounds + rounds / 10;
    let echo = {
        let server = server.clone();
        tokio::spawn(async move {
            for _ in 0..total {
                let m = server.receive().await?;
                server.send_bytes(Target::Peer(m.from.id), m.body).await?;
            }
            Ok::<_, slic::Error>(())
        })
    };
    let payload = slic::Bytes::from(vec![1u8; size]);
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..total {
        let t = Instant::now();
        client.send_bytes(Target::All, payload.clone()).await?;
        step("echo", client.receive()).await?;
        if i >= rounds / 10 {
            rtts.push(t.elapsed());
        }
    }
    echo.await??;
    Ok(figures(rtts))
}
