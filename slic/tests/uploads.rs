//! Upload resources over loopback: byte-identical files with the right digest, progress,
//! uploads cut off midway, size limits, replacing, hostile file names (through the public
//! API and, past the client's own check, through a raw TCP client speaking the upload
//! protocol by hand), and unknown resources.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::wire::{self, HELLO};
use common::{TempDir, builder, shutdown_all, start_client, start_server, within};
use slic::{Error, Node, Request, Status, StoredFile, UploadOptions, UploadRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const MIB: u64 = 1 << 20;

/// Awaits `fut` for at most `limit`, for steps longer than the usual ten seconds.
async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

// --- Temporary folders and files -----------------------------------------------------------

/// Writes `size` pseudo-random bytes (xorshift64*, from `seed`) to `path` in 1 MiB chunks;
/// returns their BLAKE3 digest in hex.
fn write_random_file(path: &Path, size: u64, seed: u64) -> String {
    let mut state = seed | 1;
    let mut hasher = blake3::Hasher::new();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0_u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(MIB)).unwrap();
        for word in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
    file.get_ref().sync_all().unwrap();
    hasher.finalize().to_hex().to_string()
}

/// Compares two files chunk by chunk; returns whether they are equal and the BLAKE3 digest
/// of `copy`.
fn compare_files(original: &Path, copy: &Path) -> (bool, String) {
    let mut a = std::fs::File::open(original).unwrap();
    let mut b = std::fs::File::open(copy).unwrap();
    let mut hasher = blake3::Hasher::new();
    let (mut ba, mut bb) = (vec![0_u8; MIB as usize], vec![0_u8; MIB as usize]);
    let mut equal = true;
    // Bounded: each round consumes at least one byte of `copy` or ends.
    loop {
        let nb = read_full(&mut b, &mut bb);
        let na = read_full(&mut a, &mut ba);
        hasher.update(&bb[..nb]);
        if na != nb || ba[..na] != bb[..nb] {
            equal = false;
        }
        if nb == 0 || na == 0 {
            // Hash whatever remains of `copy` so the digest covers all of it.
            loop {
                let n = read_full(&mut b, &mut bb);
                if n == 0 {
                    break;
                }
                equal = false;
                hasher.update(&bb[..n]);
            }
            break;
        }
    }
    (equal, hasher.finalize().to_hex().to_string())
}

/// Reads until `buf` is full or the end of the file.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// The names in a folder.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Polls `dir` until its listing equals `expected`, for at most ten seconds.
async fn wait_listing(dir: &Path, expected: &[&str]) {
    let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    let started = Instant::now();
    for _ in 0..2_000 {
        let now = listing(dir);
        if now == expected {
            return;
        }
        assert!(
            started.elapsed() < common::STEP,
            "{} still holds {now:?}, expected {expected:?}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for {expected:?} in {}", dir.display());
}

fn status_of<T: std::fmt::Debug>(r: Result<T, Error>) -> Status {
    match r {
        Err(Error::Status(s)) => s,
        other => panic!("expected Error::Status, got {other:?}"),
    }
}

/// Uploads `path` from `client` (connected to one server) under `name`.
async fn upload_as(
    client: &Node,
    resource: &str,
    path: &Path,
    name: &str,
) -> Result<StoredFile, Error> {
    let peer = client.peers()[0].id;
    within(
        "upload",
        client.upload_resource_to(
            peer,
            resource,
            path,
            UploadRequest::default().stored_name(name),
        ),
    )
    .await
}

// --- A TCP proxy that can pause and cut the client-to-server direction ----------------------

enum ProxyAction {
    /// Drop both sockets at once.
    Cut,
    /// Forward everything again, until either side ends.
    Resume,
}

struct Proxy {
    addr: SocketAddr,
    /// Bytes forwarded from the client to the server so far.
    forwarded: Arc<AtomicU64>,
    /// Fires when `pause_after` bytes went through; forwarding is then paused.
    paused: Option<oneshot::Receiver<()>>,
    action: Option<oneshot::Sender<ProxyAction>>,
    task: tokio::task::JoinHandle<()>,
}

/// Proxies one connection to `server`; pauses the client-to-server direction once
/// `pause_after` bytes went through (never with `u64::MAX`) and waits for an action.
async fn start_proxy(server: SocketAddr, pause_after: u64) -> Proxy {
    let listener = within("proxy bind", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let forwarded = Arc::new(AtomicU64::new(0));
    let (paused_tx, paused_rx) = oneshot::channel();
    let (action_tx, action_rx) = oneshot::channel();
    let count = forwarded.clone();
    let task = tokio::spawn(async move {
        let (client, _) = within("proxy accept", listener.accept()).await.unwrap();
        let upstream = within("proxy connect", TcpStream::connect(server))
            .await
            .unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = upstream.into_split();
        let up = async move {
            let mut buf = vec![0_u8; 64 << 10];
            let mut paused_tx = Some(paused_tx);
            let mut action_rx = Some(action_rx);
            // Bounded by the bytes the client sends; each round moves at least one.
            loop {
                let total = count.load(Ordering::Relaxed);
                if total >= pause_after
                    && let (Some(p), Some(a)) = (paused_tx.take(), action_rx.take())
                {
                    let _ = p.send(());
                    match a.await {
                        Ok(ProxyAction::Resume) => {}
                        Ok(ProxyAction::Cut) | Err(_) => return,
                    }
                }
                let want = usize::try_from(pause_after.saturating_sub(total))
                    .unwrap_or(usize::MAX)
                    .clamp(1, buf.len());
                let want = if paused_tx.is_none() { buf.len() } else { want };
                match cr.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        };
        let down = async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        };
        // Either direction ending drops all four halves: both sockets close.
        tokio::select! {
            () = up => {}
            () = down => {}
        }
    });
    Proxy {
        addr,
        forwarded,
        paused: Some(paused_rx),
        action: Some(action_tx),
        task,
    }
}

// --- Tests -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_file_and_a_one_mib_file_arrive_byte_identical_with_the_right_digest() {
    let tmp = TempDir::new("small");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":upload", &up).unwrap();
    let (client, peer) = start_client(builder("pc"), addr).await;

    let empty = src.join("empty.bin");
    let empty_digest = write_random_file(&empty, 0, 1);
    assert_eq!(empty_digest, blake3::hash(b"").to_hex().to_string());
    // upload_resource stores under the file's own name.
    let stored = within("empty upload", client.upload_resource(":upload", &empty))
        .await
        .unwrap();
    assert_eq!(stored.name, "empty.bin");
    assert_eq!(stored.size, 0);
    assert_eq!(stored.digest, empty_digest);
    assert_eq!(std::fs::metadata(up.join("empty.bin")).unwrap().len(), 0);

    let one = src.join("one.bin");
    let one_digest = write_random_file(&one, MIB, 2);
    let stored = within(
        "1 MiB upload",
        client.upload_resource_to(
            peer,
            ":upload",
            &one,
            UploadRequest::default().stored_name("renamed one.bin"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(stored.name, "renamed one.bin");
    assert_eq!(stored.size, MIB);
    assert_eq!(stored.digest, one_digest);
    let (equal, digest) = compare_files(&one, &up.join("renamed one.bin"));
    assert!(equal, "1 MiB copy differs");
    assert_eq!(digest, one_digest);
    // Nothing else in the folder: no temporary left behind.
    assert_eq!(
        listing(&up),
        BTreeSet::from(["empty.bin".to_owned(), "renamed one.bin".to_owned()])
    );
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_upload_arrives_byte_identical_with_the_right_digest_and_reports_its_speed() {
    const SIZE: u64 = 200 * MIB;
    let tmp = TempDir::new("large");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let source = src.join("large.bin");
    let s = source.clone();
    let digest = within_for(
        Duration::from_secs(120),
        "write 200 MiB",
        tokio::task::spawn_blocking(move || write_random_file(&s, SIZE, 0xDEAD_BEEF)),
    )
    .await
    .unwrap();

    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":upload", &up).unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;
    let started = Instant::now();
    let stored = within_for(
        Duration::from_secs(300),
        "200 MiB upload",
        client.upload_resource(":upload", &source),
    )
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "200 MiB upload: {secs:.2} s, {:.1} MB/s ({:.1} MiB/s)",
        SIZE as f64 / 1e6 / secs,
        SIZE as f64 / MIB as f64 / secs
    );
    assert_eq!(stored.name, "large.bin");
    assert_eq!(stored.size, SIZE);
    assert_eq!(stored.digest, digest);
    let (s, c) = (source.clone(), up.join("large.bin"));
    let (equal, copy_digest) = within_for(
        Duration::from_secs(120),
        "compare 200 MiB",
        tokio::task::spawn_blocking(move || compare_files(&s, &c)),
    )
    .await
    .unwrap();
    assert!(equal, "200 MiB copy differs");
    assert_eq!(copy_digest, digest);
    assert_eq!(listing(&up), BTreeSet::from(["large.bin".to_owned()]));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_reported_in_increasing_steps_that_end_at_size_of_size() {
    let tmp = TempDir::new("progress");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":upload", &up).unwrap();
    let (client, peer) = start_client(builder("pc"), addr).await;

    // Not a multiple of any chunk size: the last step is a short one.
    let size = 3 * MIB + 12_345;
    let path = src.join("p.bin");
    let digest = write_random_file(&path, size, 3);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let request = UploadRequest::default().progress(move |sent, total| {
        log.lock().unwrap().push((sent, total));
    });
    let stored = within(
        "upload",
        client.upload_resource_to(peer, ":upload", &path, request),
    )
    .await
    .unwrap();
    assert_eq!(stored.digest, digest);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "only {} progress reports", seen.len());
    assert!(seen.iter().all(|&(_, total)| total == size), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "not strictly increasing: {seen:?}"
    );
    assert!(seen[0].0 > 0);
    assert_eq!(*seen.last().unwrap(), (size, size));

    // An empty file sends no chunk: the callback is not called at all.
    let empty = src.join("e.bin");
    write_random_file(&empty, 0, 4);
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let request = UploadRequest::default().progress(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    within(
        "empty upload",
        client.upload_resource_to(peer, ":upload", &empty, request),
    )
    .await
    .unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    shutdown_all(&[&client, &server]).await;
}

/// Starts an upload of a 32 MiB file through a proxy that pauses after 4 MiB; returns once
/// the pause began and the server's temporary file exists.
struct CutSetup {
    _tmp: TempDir,
    up: PathBuf,
    server: Node,
    server_addr: SocketAddr,
    client: Node,
    proxy: Proxy,
    upload: tokio::task::JoinHandle<Result<StoredFile, Error>>,
}

async fn start_cut_upload(tag: &str) -> CutSetup {
    let tmp = TempDir::new(tag);
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let path = src.join("big.bin");
    write_random_file(&path, 32 * MIB, 5);
    let (server, server_addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":upload", &up).unwrap();
    let mut proxy = start_proxy(server_addr, 4 * MIB).await;
    let (client, peer) = start_client(builder("pc"), proxy.addr).await;
    let upload = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .upload_resource_to(peer, ":upload", &path, UploadRequest::default())
                .await
        })
    };
    within("proxy paused", proxy.paused.take().unwrap())
        .await
        .unwrap();
    // Mid-upload: the server writes into exactly one temporary file, the final name is
    // not there.
    let started = Instant::now();
    for _ in 0..1_000 {
        let names = listing(&up);
        if names.len() == 1 && names.iter().all(|n| n.starts_with(".slic-upload-")) {
            let temp = up.join(names.first().unwrap());
            if std::fs::metadata(&temp).map(|m| m.len()).unwrap_or(0) > MIB {
                break;
            }
        }
        assert!(
            started.elapsed() < common::STEP,
            "no growing temporary file in {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!up.join("big.bin").exists());
    assert!(
        !upload.is_finished(),
        "the upload finished through a paused proxy"
    );
    CutSetup {
        _tmp: tmp,
        up,
        server,
        server_addr,
        client,
        proxy,
        upload,
    }
}

/// After a cut: the folder is empty again, and the server still takes a new upload.
async fn assert_clean_and_serving(s: &CutSetup) {
    wait_listing(&s.up, &[]).await;
    let (other, _) = start_client(builder("after"), s.server_addr).await;
    let small = s.up.parent().unwrap().join("src").join("small.bin");
    let digest = write_random_file(&small, 1000, 6);
    let stored = within("upload after cut", other.upload_resource(":upload", &small))
        .await
        .unwrap();
    assert_eq!(stored.digest, digest);
    assert_eq!(listing(&s.up), BTreeSet::from(["small.bin".to_owned()]));
    shutdown_all(&[&other]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_connection_drops_halfway_leaves_nothing_in_the_folder() {
    let mut s = start_cut_upload("drop").await;
    let _ = s.proxy.action.take().unwrap().send(ProxyAction::Cut);
    within("proxy ends", &mut s.proxy.task).await.unwrap();
    let r = within("cut upload", &mut s.upload).await.unwrap();
    assert!(r.is_err(), "an upload cut off succeeded: {r:?}");
    assert!(s.proxy.forwarded.load(Ordering::Relaxed) < 32 * MIB);
    assert_clean_and_serving(&s).await;
    shutdown_all(&[&s.client, &s.server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_client_node_shuts_down_halfway_leaves_nothing_in_the_folder() {
    let mut s = start_cut_upload("shutdown").await;
    // The client shuts down while its data is stuck in the paused proxy; then the proxy
    // passes on everything the client managed to write, and the end of its stream.
    within("client shutdown", s.client.shutdown()).await;
    let _ = s.proxy.action.take().unwrap().send(ProxyAction::Resume);
    let r = within("upload of a shut-down node", &mut s.upload)
        .await
        .unwrap();
    assert!(r.is_err(), "an upload cut off succeeded: {r:?}");
    within("proxy ends", &mut s.proxy.task).await.unwrap();
    assert!(s.proxy.forwarded.load(Ordering::Relaxed) < 32 * MIB);
    assert_clean_and_serving(&s).await;
    shutdown_all(&[&s.client, &s.server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_future_is_dropped_halfway_leaves_nothing_and_the_connection_lives() {
    let mut s = start_cut_upload("abort").await;
    // Dropping the upload closes its channel only; the connection stays up.
    s.upload.abort();
    let r = within("aborted upload", &mut s.upload).await;
    assert!(r.unwrap_err().is_cancelled());
    let _ = s.proxy.action.take().unwrap().send(ProxyAction::Resume);
    wait_listing(&s.up, &[]).await;
    assert_eq!(s.client.peers().len(), 1, "the connection went down");
    // The same client, through the same connection, uploads again.
    let small = s.up.parent().unwrap().join("src").join("again.bin");
    let digest = write_random_file(&small, 5000, 7);
    let stored = within("upload again", s.client.upload_resource(":upload", &small))
        .await
        .unwrap();
    assert_eq!(stored.digest, digest);
    assert_eq!(listing(&s.up), BTreeSet::from(["again.bin".to_owned()]));
    shutdown_all(&[&s.client, &s.server]).await;
    within("proxy ends", &mut s.proxy.task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_server_shuts_down_halfway_leaves_nothing_in_the_folder() {
    let mut s = start_cut_upload("server-down").await;
    // The server's GOAWAY cannot be answered through the paused proxy: the server drops
    // the connection after its linger, and its upload task with it.
    within("server shutdown", s.server.shutdown()).await;
    assert_eq!(s.server.task_count(), 0);
    wait_listing(&s.up, &[]).await;
    let _ = s.proxy.action.take().unwrap().send(ProxyAction::Resume);
    let r = within("upload to a shut-down server", &mut s.upload)
        .await
        .unwrap();
    assert!(r.is_err(), "an upload cut off succeeded: {r:?}");
    within("proxy ends", &mut s.proxy.task).await.unwrap();
    wait_listing(&s.up, &[]).await;
    shutdown_all(&[&s.client, &s.server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_max_size_is_refused_before_any_data_is_sent() {
    let tmp = TempDir::new("maxsize");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let (server, addr) = start_server(builder("hub")).await;
    server
        .create_upload_resource_with(":upload", &up, UploadOptions::default().max_size(MIB))
        .unwrap();
    // Through a proxy that counts what the client sends.
    let proxy = start_proxy(addr, u64::MAX).await;
    let (client, peer) = start_client(builder("pc"), proxy.addr).await;

    let big = src.join("big.bin");
    write_random_file(&big, 16 * MIB + 1, 8);
    let progressed = Arc::new(AtomicBool::new(false));
    let p = progressed.clone();
    let before = proxy.forwarded.load(Ordering::Relaxed);
    let started = Instant::now();
    let r = within(
        "oversized upload",
        client.upload_resource_to(
            peer,
            ":upload",
            &big,
            UploadRequest::default().progress(move |_, _| p.store(true, Ordering::Relaxed)),
        ),
    )
    .await;
    let took = started.elapsed();
    match status_of(r) {
        Status::BadRequest(detail) => assert!(detail.contains("exceeds"), "{detail:?}"),
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    assert!(!progressed.load(Ordering::Relaxed), "a chunk was sent");
    let sent = proxy.forwarded.load(Ordering::Relaxed) - before;
    assert!(
        sent < 4096,
        "{sent} bytes went to the server for a refused upload"
    );
    assert!(listing(&up).is_empty(), "{:?}", listing(&up));

    // One byte over the limit is refused; exactly the limit is fine.
    let over = src.join("over.bin");
    write_random_file(&over, MIB + 1, 9);
    let r = upload_as(&client, ":upload", &over, "over.bin").await;
    assert!(matches!(status_of(r), Status::BadRequest(_)));
    let exact = src.join("exact.bin");
    let digest = write_random_file(&exact, MIB, 10);
    let stored = upload_as(&client, ":upload", &exact, "exact.bin")
        .await
        .unwrap();
    assert_eq!((stored.size, stored.digest), (MIB, digest));
    assert_eq!(listing(&up), BTreeSet::from(["exact.bin".to_owned()]));
    shutdown_all(&[&client, &server]).await;
    within("proxy ends", proxy.task).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_file_is_kept_without_replace_and_replaced_with_it() {
    let tmp = TempDir::new("replace");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":keep", &up).unwrap();
    server
        .create_upload_resource_with(":replace", &up, UploadOptions::default().replace(true))
        .unwrap();
    let (client, peer) = start_client(builder("pc"), addr).await;

    std::fs::write(up.join("data.bin"), b"original contents").unwrap();
    let mtime = std::fs::metadata(up.join("data.bin"))
        .unwrap()
        .modified()
        .unwrap();
    let new = src.join("new.bin");
    let new_digest = write_random_file(&new, 200_000, 11);

    // Refused at the offer, before any chunk is sent.
    let progressed = Arc::new(AtomicBool::new(false));
    let p = progressed.clone();
    let request = UploadRequest::default()
        .stored_name("data.bin")
        .progress(move |_, _| p.store(true, Ordering::Relaxed));
    let r = within(
        "upload onto an existing file",
        client.upload_resource_to(peer, ":keep", &new, request),
    )
    .await;
    match status_of(r) {
        Status::BadRequest(detail) => assert!(detail.contains("exists"), "{detail:?}"),
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert!(!progressed.load(Ordering::Relaxed), "data was sent");
    assert_eq!(
        std::fs::read(up.join("data.bin")).unwrap(),
        b"original contents"
    );
    assert_eq!(
        std::fs::metadata(up.join("data.bin"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    assert_eq!(listing(&up), BTreeSet::from(["data.bin".to_owned()]));

    let stored = upload_as(&client, ":replace", &new, "data.bin")
        .await
        .unwrap();
    assert_eq!(stored.digest, new_digest);
    let (equal, _) = compare_files(&new, &up.join("data.bin"));
    assert!(equal, "the file was not replaced");
    assert_eq!(listing(&up), BTreeSet::from(["data.bin".to_owned()]));

    // A file that an upload stored is just as protected.
    let r = upload_as(&client, ":keep", &src.join("new.bin"), "data.bin").await;
    assert!(matches!(status_of(r), Status::BadRequest(_)));
    let fresh = upload_as(&client, ":keep", &new, "fresh.bin")
        .await
        .unwrap();
    assert_eq!(fresh.digest, new_digest);
    let r = upload_as(&client, ":keep", &new, "fresh.bin").await;
    assert!(matches!(status_of(r), Status::BadRequest(_)));
    let (equal, _) = compare_files(&new, &up.join("fresh.bin"));
    assert!(equal);
    shutdown_all(&[&client, &server]).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbolic_links_and_folders_in_the_way_are_never_written_through() {
    let tmp = TempDir::new("links");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let outside = tmp.path.join("outside.txt");
    std::fs::write(&outside, b"outside: must not change").unwrap();
    let nowhere = tmp.path.join("nowhere.txt");
    std::os::unix::fs::symlink(&outside, up.join("link.bin")).unwrap();
    std::os::unix::fs::symlink(&nowhere, up.join("dangling.bin")).unwrap();
    std::fs::create_dir(up.join("dir.bin")).unwrap();
    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":keep", &up).unwrap();
    server
        .create_upload_resource_with(":replace", &up, UploadOptions::default().replace(true))
        .unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;
    let new = src.join("new.bin");
    let digest = write_random_file(&new, 100_000, 13);

    // Without replacing, anything in the way refuses the upload, a dangling link too.
    for name in ["link.bin", "dangling.bin", "dir.bin"] {
        let r = upload_as(&client, ":keep", &new, name).await;
        assert!(matches!(status_of(r), Status::BadRequest(_)), "{name}");
    }
    assert!(!nowhere.exists(), "written through a dangling link");
    // Replacing replaces the links themselves, never their targets.
    for name in ["link.bin", "dangling.bin"] {
        let stored = upload_as(&client, ":replace", &new, name).await.unwrap();
        assert_eq!(stored.digest, digest);
        let meta = std::fs::symlink_metadata(up.join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name} is still a link");
        assert!(compare_files(&new, &up.join(name)).0);
    }
    assert!(!nowhere.exists(), "written through a dangling link");
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        b"outside: must not change"
    );
    // A folder cannot be replaced by a file: the upload fails and the folder stays.
    let r = upload_as(&client, ":replace", &new, "dir.bin").await;
    // PROTOCOL.md section 16: an I/O error while storing is INTERNAL.
    let status = status_of(r);
    assert!(matches!(status, Status::Internal(_)), "{status:?}");
    assert!(up.join("dir.bin").is_dir());
    wait_listing(&up, &["dangling.bin", "dir.bin", "link.bin"]).await;
    assert_eq!(
        listing(&tmp.path),
        BTreeSet::from(["outside.txt".to_owned(), "src".to_owned(), "up".to_owned()])
    );
    shutdown_all(&[&client, &server]).await;
}

/// File names the server must refuse (see `slic::validate_file_name`). `base` is the folder
/// that holds the upload folder and the sentinel file.
fn hostile_names(base: &Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        ".",
        "..",
        "...",
        "../",
        "..\\",
        "../x",
        "../sentinel.txt",
        "../../sentinel.txt",
        "a/../../sentinel.txt",
        "a/../sentinel.txt",
        "./a",
        "a/.",
        "a/b",
        "a/",
        "/",
        "//",
        "/abs",
        "\\",
        "..\\x",
        "..\\sentinel.txt",
        "\\\\server\\share\\x",
        "C:\\x",
        "C:x",
        "C:",
        "file.txt:stream",
        "~/x",
        "a\0b",
        "\0",
        "x\n",
        "\ny",
        "a\rb",
        "a\tb",
        "\t",
        "esc\u{1b}[31m",
        "del\u{7f}",
        "nel\u{85}",
        "trail.",
        "trail ",
        " lead",
        " ",
        ". ",
        " .",
        ".slic-upload-x.tmp",
        ".slic-upload-",
        ".slic-upload-0123456789abcdef.tmp",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.push("x".repeat(256));
    v.push("é".repeat(128)); // 256 bytes, 128 characters
    v.push(format!("{}.txt", "n".repeat(252)));
    // Absolute paths to the sentinel and into the folder next to the upload folder.
    v.push(base.join("sentinel.txt").to_string_lossy().into_owned());
    v.push(base.join("escaped.txt").to_string_lossy().into_owned());
    v
}

#[test]
fn the_hostile_name_corpus_is_refused_by_validate_file_name_and_plain_names_pass() {
    let base = std::env::temp_dir().join("base");
    let names = hostile_names(&base);
    assert!(names.len() >= 30);
    for name in &names {
        match slic::validate_file_name(name) {
            Err(Status::BadRequest(d)) => assert!(d.contains("file name refused"), "{d:?}"),
            other => panic!("{name:?} gave {other:?}"),
        }
    }
    for ok in [
        "~",
        "a",
        "..a",
        "a..b",
        ".hidden",
        "notes.txt",
        "with space.txt",
        "ünïcødé ∕ slash look-alike.bin",
        "CON",
        &"y".repeat(255),
    ] {
        assert!(slic::validate_file_name(ok).is_ok(), "{ok:?}");
    }
}

// --- The upload protocol by hand over raw TCP --------------------------------------------------

const MESSAGE: u8 = 3;
const CHANNEL_OPEN: u8 = 7;
const CHANNEL_CLOSE: u8 = 8;
const RAW: u8 = 0;
const POSTCARD: u8 = 1;

fn varint(mut n: u64, out: &mut Vec<u8>) {
    // Bounded: ten groups of seven bits cover a u64.
    for _ in 0..10 {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn read_varint(p: &mut &[u8]) -> u64 {
    let mut v = 0_u64;
    for shift in (0..70).step_by(7) {
        let (b, rest) = p.split_first().expect("truncated varint");
        *p = rest;
        v |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint too long");
}

fn read_str(p: &mut &[u8]) -> String {
    let n = usize::try_from(read_varint(p)).unwrap();
    let (s, rest) = p.split_at(n);
    *p = rest;
    String::from_utf8(s.to_vec()).unwrap()
}

/// A raw client with an upload channel protocol spoken by hand (postcard control
/// messages, raw chunks; see `slic/src/upload.rs`).
struct RawClient {
    s: TcpStream,
    next_channel: u32,
    next_id: u64,
}

/// What the server answered on an upload channel: (variant, code or 0, text).
/// Variant 0 is Accept / Stored, 1 is Refuse / Failed.
#[derive(Debug)]
struct Reply {
    variant: u64,
    code: u64,
    text: String,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let mut s = within("raw connect", TcpStream::connect(addr))
            .await
            .unwrap();
        // Small frames written one by one: without this, Nagle's algorithm and delayed ACKs
        // stall each exchange by some 40 ms.
        s.set_nodelay(true).unwrap();
        let hello = wire::handshake_frame(HELLO, *b"SLIC", b"raw-uploader");
        within("write HELLO", s.write_all(&hello)).await.unwrap();
        let (h, _) = wire::read_frame(&mut s).await;
        assert_eq!(h.ty, wire::WELCOME, "{h:?}");
        Self {
            s,
            next_channel: 1,
            next_id: 1,
        }
    }

    async fn frame(&mut self, ty: u8, channel: u32, codec: u8, payload: &[u8]) {
        let id = self.next_id;
        self.next_id += 1;
        let mut f = wire::header(ty, channel, id, u32::try_from(payload.len()).unwrap()).to_vec();
        f[3] = codec;
        f.extend_from_slice(payload);
        within("raw write", self.s.write_all(&f)).await.unwrap();
    }

    /// Opens an upload channel and sends an offer on it.
    async fn offer(&mut self, resource: &str, name: &str, size: u64) -> u32 {
        let ch = self.next_channel;
        self.next_channel += 2;
        self.frame(CHANNEL_OPEN, ch, RAW, b"slic.upload").await;
        let mut p = Vec::new();
        varint(resource.len() as u64, &mut p);
        p.extend_from_slice(resource.as_bytes());
        varint(name.len() as u64, &mut p);
        p.extend_from_slice(name.as_bytes());
        varint(size, &mut p);
        self.frame(MESSAGE, ch, POSTCARD, &p).await;
        ch
    }

    /// Opens an upload channel and sends raw bytes where the offer belongs.
    async fn offer_garbage(&mut self) -> u32 {
        let ch = self.next_channel;
        self.next_channel += 2;
        self.frame(CHANNEL_OPEN, ch, RAW, b"slic.upload").await;
        self.chunk(ch, b"not an offer").await;
        ch
    }

    async fn chunk(&mut self, ch: u32, data: &[u8]) {
        self.frame(MESSAGE, ch, RAW, data).await;
    }

    async fn end(&mut self, ch: u32, digest: [u8; 32]) {
        self.frame(MESSAGE, ch, POSTCARD, &digest).await;
    }

    /// The next control message on `ch`, skipping other frames; bounded.
    async fn reply(&mut self, ch: u32, stored: bool) -> Reply {
        for _ in 0..100 {
            let (h, p) = wire::read_frame(&mut self.s).await;
            assert_ne!(h.ty, wire::ERROR, "connection closed by the server: {p:?}");
            assert_ne!(h.ty, wire::GOAWAY, "connection closed by the server");
            if h.ty == CHANNEL_CLOSE && h.channel == ch {
                panic!("channel {ch} closed without a reply");
            }
            if h.ty != MESSAGE || h.channel != ch {
                continue;
            }
            assert_eq!(h.codec, POSTCARD);
            let mut rest = &p[..];
            let variant = read_varint(&mut rest);
            return match (variant, stored) {
                (0, false) => Reply {
                    variant,
                    code: 0,
                    text: String::new(),
                },
                // Stored(StoredFile { name, size, digest }): the text is the name.
                (0, true) => {
                    let name = read_str(&mut rest);
                    let _size = read_varint(&mut rest);
                    let _digest = read_str(&mut rest);
                    Reply {
                        variant,
                        code: 0,
                        text: name,
                    }
                }
                (1, _) => {
                    let code = read_varint(&mut rest);
                    let text = read_str(&mut rest);
                    Reply {
                        variant,
                        code,
                        text,
                    }
                }
                _ => panic!("unknown reply variant {variant}: {p:?}"),
            };
        }
        panic!("no reply on channel {ch} among 100 frames");
    }

    /// Waits for the server's CHANNEL_CLOSE of `ch` and answers it.
    async fn finish(&mut self, ch: u32) {
        for _ in 0..100 {
            let (h, p) = wire::read_frame(&mut self.s).await;
            assert_ne!(h.ty, wire::ERROR, "connection closed by the server: {p:?}");
            if h.ty == CHANNEL_CLOSE && h.channel == ch {
                self.frame(CHANNEL_CLOSE, ch, RAW, &0_u32.to_be_bytes())
                    .await;
                return;
            }
        }
        panic!("channel {ch} never closed");
    }

    /// A whole upload by hand: offer, chunks, end with `digest`; returns the final reply
    /// (or the refusal of the offer).
    async fn upload(
        &mut self,
        resource: &str,
        name: &str,
        offered: u64,
        data: &[u8],
        digest: [u8; 32],
    ) -> Reply {
        let ch = self.offer(resource, name, offered).await;
        let answer = self.reply(ch, false).await;
        if answer.variant != 0 {
            self.finish(ch).await;
            return answer;
        }
        for part in data.chunks(1000) {
            self.chunk(ch, part).await;
        }
        self.end(ch, digest).await;
        let done = self.reply(ch, true).await;
        self.finish(ch).await;
        done
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_are_refused_by_client_and_server_and_nothing_outside_is_touched() {
    let tmp = TempDir::new("hostile");
    let (src, up, control) = (tmp.sub("src"), tmp.sub("up"), tmp.sub("control"));
    let base = tmp.path.clone();
    let sentinel = base.join("sentinel.txt");
    std::fs::write(&sentinel, b"sentinel: must not change").unwrap();
    let sentinel_mtime = std::fs::metadata(&sentinel).unwrap().modified().unwrap();
    let payload = b"PWNED!!\n";
    let source = src.join("payload.bin");
    std::fs::write(&source, payload).unwrap();
    let digest = *blake3::hash(payload).as_bytes();

    let (server, addr) = start_server(builder("hub")).await;
    // Replacing allowed: a name that escaped the folder could overwrite the sentinel.
    server
        .create_upload_resource_with(":upload", &up, UploadOptions::default().replace(true))
        .unwrap();
    server.create_upload_resource(":control", &control).unwrap();
    let names = hostile_names(&base);
    assert!(names.len() >= 30, "{} names", names.len());

    // 1. Through the public API: the client refuses before it sends the offer.
    let (client, _) = start_client(builder("pc"), addr).await;
    for name in &names {
        let r = upload_as(&client, ":upload", &source, name).await;
        match status_of(r) {
            Status::BadRequest(d) => assert!(d.contains("file name refused"), "{name:?}: {d:?}"),
            other => panic!("{name:?}: expected BadRequest, got {other:?}"),
        }
    }

    // 2. Past the client's check: a raw client speaks the upload protocol by hand. First a
    // control upload proves the hand-made messages are right.
    let mut raw = RawClient::connect(addr).await;
    let ok = raw
        .upload(
            ":control",
            "plain.bin",
            payload.len() as u64,
            payload,
            digest,
        )
        .await;
    assert_eq!((ok.variant, ok.text.as_str()), (0, "plain.bin"), "{ok:?}");
    assert_eq!(std::fs::read(control.join("plain.bin")).unwrap(), payload);
    for name in &names {
        let r = raw
            .upload(":upload", name, payload.len() as u64, payload, digest)
            .await;
        assert_eq!(r.variant, 1, "{name:?} was accepted: {r:?}");
        assert_eq!(r.code, 1, "{name:?}: {r:?}");
        assert!(r.text.contains("file name refused"), "{name:?}: {r:?}");
    }
    // The connection survived every refusal.
    let ok = raw
        .upload(
            ":control",
            "plain2.bin",
            payload.len() as u64,
            payload,
            digest,
        )
        .await;
    assert_eq!(ok.variant, 0, "{ok:?}");

    // Nothing was written: not in the folder, not next to it, not at the absolute paths.
    assert!(listing(&up).is_empty(), "{:?}", listing(&up));
    assert_eq!(
        listing(&base),
        BTreeSet::from([
            "control".to_owned(),
            "sentinel.txt".to_owned(),
            "src".to_owned(),
            "up".to_owned()
        ])
    );
    assert_eq!(listing(&src), BTreeSet::from(["payload.bin".to_owned()]));
    assert_eq!(
        std::fs::read(&sentinel).unwrap(),
        b"sentinel: must not change"
    );
    assert_eq!(
        std::fs::metadata(&sentinel).unwrap().modified().unwrap(),
        sentinel_mtime
    );
    assert!(!Path::new("/abs").exists());
    drop(raw);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_driven_upload_that_lies_about_its_size_or_digest_fails_and_leaves_nothing() {
    let tmp = TempDir::new("liar");
    let up = tmp.sub("up");
    let (server, addr) = start_server(builder("hub")).await;
    server.create_upload_resource(":upload", &up).unwrap();
    let mut raw = RawClient::connect(addr).await;
    let data: Vec<u8> = (0..5000_u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = *blake3::hash(&data).as_bytes();

    // Wrong digest.
    let mut wrong = digest;
    wrong[0] ^= 1;
    let r = raw
        .upload(":upload", "x.bin", data.len() as u64, &data, wrong)
        .await;
    assert_eq!((r.variant, r.code), (1, 1), "{r:?}");
    assert!(r.text.contains("digest"), "{r:?}");
    // More data than offered.
    let r = raw
        .upload(":upload", "x.bin", data.len() as u64 - 1, &data, digest)
        .await;
    assert_eq!((r.variant, r.code), (1, 1), "{r:?}");
    assert!(r.text.contains("more data"), "{r:?}");
    // Less data than offered.
    let r = raw
        .upload(":upload", "x.bin", data.len() as u64 + 1, &data, digest)
        .await;
    assert_eq!((r.variant, r.code), (1, 1), "{r:?}");
    assert!(r.text.contains("received"), "{r:?}");
    // An offer for an unknown resource.
    let r = raw
        .upload(":nope", "x.bin", data.len() as u64, &data, digest)
        .await;
    assert_eq!((r.variant, r.code), (1, 2), "{r:?}");
    // An offer that is not a control message at all.
    let ch = raw.offer_garbage().await;
    let r = raw.reply(ch, true).await;
    assert_eq!((r.variant, r.code), (1, 1), "{r:?}");
    raw.finish(ch).await;
    // A channel closed right after the offer was accepted.
    let ch = raw.offer(":upload", "x.bin", data.len() as u64).await;
    let r = raw.reply(ch, false).await;
    assert_eq!(r.variant, 0, "{r:?}");
    raw.chunk(ch, &data[..100]).await;
    raw.frame(CHANNEL_CLOSE, ch, RAW, &0_u32.to_be_bytes())
        .await;
    wait_listing(&up, &[]).await;

    // After all that, an honest upload on the same connection works.
    let r = raw
        .upload(":upload", "x.bin", data.len() as u64, &data, digest)
        .await;
    assert_eq!((r.variant, r.text.as_str()), (0, "x.bin"), "{r:?}");
    assert_eq!(std::fs::read(up.join("x.bin")).unwrap(), data);
    assert_eq!(listing(&up), BTreeSet::from(["x.bin".to_owned()]));
    drop(raw);
    shutdown_all(&[&server]).await;
}

#[tokio::test]
async fn uploading_to_an_unknown_upload_resource_is_not_found() {
    let tmp = TempDir::new("unknown");
    let (src, up) = (tmp.sub("src"), tmp.sub("up"));
    let (server, addr) = start_server(builder("hub")).await;
    server
        .create_resource(
            ":plain",
            |_r: Request<()>| async move { Ok::<_, Status>(()) },
        )
        .unwrap();
    server.create_upload_resource(":upload", &up).unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;
    let path = src.join("f.bin");
    write_random_file(&path, 10_000, 12);

    for name in [":nope", ":plain", ":UPLOAD", ""] {
        let r = within("unknown", client.upload_resource(name, &path)).await;
        match status_of(r) {
            Status::NotFound(d) => assert!(d.contains(name), "{d:?}"),
            other => panic!("{name:?}: expected NotFound, got {other:?}"),
        }
    }
    // A removed upload resource is unknown too.
    assert!(server.remove_resource(":upload"));
    let r = within("removed", client.upload_resource(":upload", &path)).await;
    assert!(matches!(status_of(r), Status::NotFound(_)));
    assert!(listing(&up).is_empty());
    // A missing local file is an I/O error, and a folder that does not exist is refused.
    let r = within(
        "missing file",
        client.upload_resource(":plain", src.join("missing")),
    )
    .await;
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
    let r = server.create_upload_resource(":x", tmp.path.join("no-such-folder"));
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
    shutdown_all(&[&client, &server]).await;
}
