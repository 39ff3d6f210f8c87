//! `slic`: the command-line tool of the slic messaging library.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use slic::{Event, Node, Target};

mod bench;
mod commands;

/// slic: low-latency messages between processes and machines.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a server and a client on loopback in this process: they connect, exchange
    /// messages both ways, open a channel, and the demo prints what happened and the
    /// round-trip time.
    ///
    /// Example: slic demo
    Demo,
    /// Serves the built-in resources on ADDR until interrupted: `:echo` returns its payload
    /// (a self-describing codec such as JSON is needed), `:time` returns the server's clock.
    /// With --upload-dir, `:upload` stores uploaded files in that folder. Messages sent to
    /// the server are printed.
    ///
    /// Example: slic serve --listen 127.0.0.1:7070 --upload-dir ./storage
    /// With TLS: slic serve --listen 127.0.0.1:7443 --tls-cert s.pem --tls-key s.key
    /// (add --client-ca ca.pem to require client certificates).
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:7070 (port 0 lets the OS pick; the chosen
        /// address is printed).
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
        /// Folder for the `:upload` resource.
        #[arg(long)]
        upload_dir: Option<PathBuf>,
        /// Largest upload accepted, in bytes.
        #[arg(long, default_value_t = 1 << 30)]
        max_upload: u64,
        /// Node name announced to peers.
        #[arg(long, default_value = "slic-serve")]
        name: String,
        #[command(flatten)]
        tls: commands::TlsArgs,
    },
    /// Calls a resource with a JSON payload and prints the JSON reply; the status goes to
    /// standard error. Exit code 0 on success, 2 when the server answered with an error
    /// status, 1 on any other error.
    ///
    /// Example: slic call 127.0.0.1:7070 :echo '{"a": 10}'
    /// With TLS: slic call tls://localhost:7443 :echo 1 --ca ca.pem
    Call {
        /// Server address.
        addr: String,
        /// Resource name, e.g. :echo.
        resource: String,
        /// Payload as JSON.
        #[arg(default_value = "null")]
        json: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        #[command(flatten)]
        tls: commands::TlsArgs,
    },
    /// Sends one JSON message to the node at ADDR.
    ///
    /// Example: slic send 127.0.0.1:7070 '"hello"'
    Send {
        /// Node address.
        addr: String,
        /// Message as JSON.
        json: String,
        #[command(flatten)]
        tls: commands::TlsArgs,
    },
    /// Listens on ADDR and prints each incoming message as a line: sender, channel, body
    /// (as JSON when the sender used JSON or MessagePack).
    ///
    /// Example: slic listen 127.0.0.1:7071 --count 10
    Listen {
        /// Address to listen on.
        addr: String,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        tls: commands::TlsArgs,
    },
    /// Uploads FILE to upload resource NAME on the server at ADDR, with a progress bar, and
    /// prints the stored name, size and BLAKE3 digest.
    ///
    /// Example: slic upload 127.0.0.1:7070 :upload ./notes.txt
    Upload {
        /// Server address.
        addr: String,
        /// Upload resource name, e.g. :upload.
        resource: String,
        /// File to upload.
        file: PathBuf,
        /// Store it under this name instead of the file's own.
        #[arg(long = "as")]
        stored_name: Option<String>,
        /// Do not draw a progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        tls: commands::TlsArgs,
    },
    /// Measures, in one run on loopback: a 64-byte ping-pong with slic and with raw blocking
    /// TCP (4-byte length prefix), p50/p99 and their ratio; slic requests/s with 1 and 64
    /// requests in flight on one connection; and an upload's MB/s next to a raw TCP copy of
    /// the same file (both written to disk and fsynced).
    ///
    /// Example: slic bench --rounds 20000 --size 64
    Bench {
        /// Round trips per system (after a warm-up of a tenth as many).
        #[arg(long, default_value_t = 20_000)]
        rounds: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Requests for the request/response figures (0 skips them).
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Size of the upload figure's file in MiB (0 skips it).
        #[arg(long, default_value_t = 200)]
        upload_mib: u64,
        /// 1 MiB messages per stream in the plain/TLS/TLS+lz4 table (0 skips it).
        #[arg(long, default_value_t = 256)]
        stream_mib: usize,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => runtime().and_then(|rt| rt.block_on(demo())),
        Command::Bench {
            rounds,
            size,
            requests,
            upload_mib,
            stream_mib,
        } => bench::run(rounds, size, requests, upload_mib, stream_mib),
        Command::Serve {
            listen,
            upload_dir,
            max_upload,
            name,
            tls,
        } => runtime().and_then(|rt| {
            rt.block_on(commands::serve(
                &listen, upload_dir, max_upload, &name, &tls,
            ))
        }),
        Command::Call {
            addr,
            resource,
            json,
            timeout,
            tls,
        } => runtime()
            .and_then(|rt| rt.block_on(commands::call(&addr, &resource, &json, timeout, &tls))),
        Command::Send { addr, json, tls } => {
            runtime().and_then(|rt| rt.block_on(commands::send(&addr, &json, &tls)))
        }
        Command::Listen { addr, count, tls } => {
            runtime().and_then(|rt| rt.block_on(commands::listen(&addr, count, &tls)))
        }
        Command::Upload {
            addr,
            resource,
            file,
            stored_name,
            quiet,
            tls,
        } => runtime().and_then(|rt| {
            rt.block_on(commands::upload(
                &addr,
                &resource,
                &file,
                stored_name,
                quiet,
                &tls,
            ))
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        let refused = e
            .downcast_ref::<slic::Error>()
            .is_some_and(|e| matches!(e, slic::Error::Status(_)));
        std::process::exit(if refused { 2 } else { 1 });
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Bounds every step of the demo so a bug shows as an error, not a hang.
const STEP: Duration = Duration::from_secs(5);

pub(crate) async fn step<T>(
    what: &str,
    f: impl Future<Output = Result<T, slic::Error>>,
) -> Result<T> {
    tokio::time::timeout(STEP, f)
        .await
        .with_context(|| format!("{what}: timed out"))?
        .with_context(|| what.to_owned())
}

async fn demo() -> Result<()> {
    let server = Node::builder().name("hub").build()?;
    let mut server_events = server.events();
    let addr = server.listen("127.0.0.1:0").await?;
    println!("server 'hub' listening on {addr}");

    let client = Node::builder().name("pc2").build()?;
    let peer = step("connect", client.connect(addr)).await?;
    println!("client 'pc2' connected to {addr} (peer {peer})");
    if let Ok(Some(Event::PeerConnected(p))) =
        tokio::time::timeout(STEP, server_events.recv()).await
    {
        println!("server saw peer '{}' connect from {}", p.name, p.addr);
    }

    client.send(Target::All, &"hello from pc2").await?;
    let msg = step("server receive", server.receive()).await?;
    println!(
        "server got {:?} from '{}' (message {})",
        msg.decode::<String>()?,
        msg.from.name,
        msg.id.0
    );
    server
        .send(Target::Peer(msg.from.id), &("welcome", 42u32))
        .await?;
    let reply = step("client receive", client.receive()).await?;
    println!(
        "client got {:?} from '{}'",
        reply.decode::<(String, u32)>()?,
        reply.from.name
    );

    let channel = step("open channel", client.open_channel(peer)).await?;
    let accepted = step("accept channel", server.accept_channel()).await?;
    for i in 0..3u32 {
        channel.send(&format!("channel message {i}")).await?;
    }
    for _ in 0..3 {
        let m = step("channel receive", accepted.receive()).await?;
        println!(
            "server got {:?} on channel {}",
            m.decode::<String>()?,
            m.channel
        );
    }
    channel.close();
    if accepted.receive().await.is_err() {
        println!("channel {} closed by the client", accepted.id());
    }

    let rounds = 1_000;
    let payload = vec![7u8; 64];
    let echo = {
        let server = server.clone();
        tokio::spawn(async move {
            for _ in 0..rounds {
                let m = server.receive().await?;
                server.send_bytes(Target::Peer(m.from.id), m.body).await?;
            }
            Ok::<_, slic::Error>(())
        })
    };
    let mut rtts = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        client.send_bytes(Target::All, payload.clone()).await?;
        step("echo", client.receive()).await?;
        rtts.push(t.elapsed());
    }
    echo.await??;
    rtts.sort_unstable();
    println!(
        "round trip of 64 bytes over {rounds} pings: p50 {:.1} µs, p99 {:.1} µs",
        micros(rtts[rounds / 2]),
        micros(rtts[rounds * 99 / 100])
    );

    client.disconnect(Target::All, STEP).await?;
    client.shutdown().await;
    server.shutdown().await;
    println!("both nodes shut down cleanly");
    Ok(())
}

pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
