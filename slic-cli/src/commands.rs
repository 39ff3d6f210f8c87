//! The network subcommands: serve, call, send, listen, upload.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use slic::{
    Codec, CodecId, Event, Node, Request, Status, Target, TlsConfig, UploadOptions, UploadRequest,
};

/// TLS options shared by every network subcommand.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct TlsArgs {
    /// PEM certificate chain of this node: the server's identity, or the client certificate
    /// to present. Makes `serve` listen with TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) to trust when connecting; makes a client address default to
    /// tls://.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to; `serve` then refuses
    /// clients without one.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn config(&self) -> Result<Option<TlsConfig>> {
        if self.tls_cert.is_none() && self.ca.is_none() {
            return Ok(None);
        }
        let mut b = TlsConfig::builder();
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            b = b.identity_pem_files(cert, key)?;
        }
        if let Some(ca) = &self.ca {
            b = b.trust_pem_file(ca)?;
        }
        if let Some(ca) = &self.client_ca {
            b = b.require_client_certs_pem_file(ca)?;
        }
        Ok(Some(b.build()?))
    }

    /// `addr` with `tls://` in front when TLS options are given and it names no scheme.
    fn address(&self, addr: &str, tls_flag: bool) -> String {
        if tls_flag && !addr.contains("://") {
            format!("tls://{addr}")
        } else {
            addr.to_owned()
        }
    }

    fn builder(&self, name: &str) -> Result<slic::NodeBuilder> {
        let mut b = Node::builder().name(name).codec(Codec::Json);
        if let Some(tls) = self.config()? {
            b = b.tls(tls);
        }
        Ok(b)
    }
}

/// Builds a client node that speaks JSON, connected to `addr`.
async fn client(addr: &str, timeout: Duration, tls: &TlsArgs) -> Result<Node> {
    let node = tls
        .builder("slic-cli")?
        .request_timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let addr = tls.address(addr, tls.ca.is_some());
    node.connect(addr.as_str())
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(node)
}

fn parse_json(json: &str) -> Result<Value> {
    serde_json::from_str(json).with_context(|| format!("payload is not valid JSON: {json}"))
}

pub(crate) async fn serve(
    listen: &str,
    upload_dir: Option<PathBuf>,
    max_upload: u64,
    name: &str,
    tls: &TlsArgs,
) -> Result<()> {
    let node = tls.builder(name)?.build()?;
    let listen = tls.address(listen, tls.tls_cert.is_some());
    let listen = listen.as_str();
    node.create_resource(":echo", |req: Request<Value>| async move {
        Ok::<_, Status>(req.body)
    })?;
    node.create_resource(":time", |_: Request<Value>| async move {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| Status::Internal(e.to_string()))?;
        Ok::<_, Status>(serde_json::json!({ "unix_ms": now.as_millis() as u64 }))
    })?;
    if let Some(dir) = &upload_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        node.create_upload_resource_with(
            ":upload",
            dir,
            UploadOptions::default().max_size(max_upload),
        )?;
    }
    let addr = node
        .listen(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {addr}");
    if let Some(dir) = &upload_dir {
        println!("uploads to :upload are stored in {}", dir.display());
    }
    let mut events = node.events();
    let printer = {
        let node = node.clone();
        async move {
            loop {
                tokio::select! {
                    msg = node.receive() => match msg {
                        Ok(m) => println!("{}", describe(&m)),
                        Err(_) => return,
                    },
                    ev = events.recv() => match ev {
                        Some(Event::PeerConnected(p)) => println!("peer '{}' connected from {}", p.name, p.addr),
                        Some(Event::PeerDisconnected { peer, .. }) => println!("peer '{}' disconnected", peer.name),
                        Some(_) => {}
                        None => return,
                    },
                }
            }
        }
    };
    tokio::select! {
        () = printer => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    node.shutdown().await;
    Ok(())
}

pub(crate) async fn call(
    addr: &str,
    resource: &str,
    json: &str,
    timeout: f64,
    tls: &TlsArgs,
) -> Result<()> {
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let payload = parse_json(json)?;
    let node = client(addr, Duration::from_secs_f64(timeout), tls).await?;
    let result = node.get_resource::<Value, Value>(resource, &payload).await;
    node.disconnect(Target::All, Duration::from_secs(1))
        .await
        .ok();
    node.shutdown().await;
    let reply = result.with_context(|| format!("{resource} failed"))?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    eprintln!("status: OK");
    Ok(())
}

pub(crate) async fn send(addr: &str, json: &str, tls: &TlsArgs) -> Result<()> {
    let payload = parse_json(json)?;
    let node = client(addr, Duration::from_secs(10), tls).await?;
    let id = node.send(Target::All, &payload).await?;
    match node.disconnect(Target::All, Duration::from_secs(5)).await {
        // The peer closed first (`slic listen --count 1` does, once it has the message).
        Ok(()) | Err(slic::Error::NoPeers) => {}
        Err(e) => return Err(e.into()),
    }
    node.shutdown().await;
    eprintln!("sent message {}", id.0);
    Ok(())
}

pub(crate) async fn listen(addr: &str, count: Option<u64>, tls: &TlsArgs) -> Result<()> {
    let node = tls.builder("slic-listen")?.build()?;
    let addr = tls.address(addr, tls.tls_cert.is_some());
    let addr = addr.as_str();
    let bound = node
        .listen(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    println!("listening on {bound}");
    let mut seen = 0u64;
    loop {
        if count.is_some_and(|c| seen >= c) {
            break;
        }
        tokio::select! {
            msg = node.receive() => {
                let m = msg?;
                println!("{}", describe(&m));
                seen += 1;
            }
            r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; break; }
        }
    }
    node.shutdown().await;
    Ok(())
}

/// One line for a received message: who, which channel, and the body as JSON when possible.
fn describe(m: &slic::Message) -> String {
    let body = match m.codec {
        CodecId::Json | CodecId::MessagePack => match m.decode::<Value>() {
            Ok(v) => v.to_string(),
            Err(e) => format!("<undecodable: {e}>"),
        },
        CodecId::Raw => format!(
            "<{} raw bytes> {:?}",
            m.body.len(),
            String::from_utf8_lossy(&m.body)
        ),
        other => format!("<{} bytes of {other:?}>", m.body.len()),
    };
    format!(
        "from '{}' ({}) channel {}: {body}",
        m.from.name, m.from.addr, m.channel
    )
}

pub(crate) async fn upload(
    addr: &str,
    resource: &str,
    file: &Path,
    stored_name: Option<String>,
    quiet: bool,
    tls: &TlsArgs,
) -> Result<()> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let node = client(addr, Duration::from_secs(30), tls).await?;
    let peer = node
        .peers()
        .first()
        .map(|p| p.id)
        .context("not connected")?;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .context("progress template")?,
    );
    let mut req = UploadRequest::default();
    if let Some(name) = stored_name {
        req = req.stored_name(name);
    }
    let progress_bar = bar.clone();
    req = req.progress(move |sent, _| progress_bar.set_position(sent));
    let result = node.upload_resource_to(peer, resource, file, req).await;
    bar.finish_and_clear();
    node.disconnect(Target::All, Duration::from_secs(1))
        .await
        .ok();
    node.shutdown().await;
    let stored = result.with_context(|| format!("upload of {} failed", file.display()))?;
    println!(
        "stored {} ({} bytes, blake3 {})",
        stored.name, stored.size, stored.digest
    );
    Ok(())
}
