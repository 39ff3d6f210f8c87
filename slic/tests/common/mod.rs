//! Helpers shared by the integration tests: timeouts around every awaited step, nodes on
//! loopback ports chosen by the OS, and bounded waits for events.

// Each test crate compiles this module on its own and uses a different subset of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use slic::{Event, Events, Message, Node, NodeBuilder, PeerId};

/// Longest any single awaited step may take before the test fails instead of hanging.
pub(crate) const STEP: Duration = Duration::from_secs(10);

/// How long "nothing else arrives" is watched for.
pub(crate) const QUIET: Duration = Duration::from_millis(200);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// A builder with the given node name and default settings otherwise.
pub(crate) fn builder(name: &str) -> NodeBuilder {
    Node::builder().name(name)
}

/// Builds a node from `builder` and listens on 127.0.0.1 with a port picked by the OS.
pub(crate) async fn start_server(builder: NodeBuilder) -> (Node, SocketAddr) {
    let node = builder.build().expect("build server node");
    let addr = within("listen", node.listen("127.0.0.1:0"))
        .await
        .expect("listen on 127.0.0.1:0");
    assert!(addr.ip().is_loopback(), "bound to {addr}");
    assert_ne!(addr.port(), 0, "the OS picked no port");
    (node, addr)
}

/// Builds a node from `builder` and connects it to `addr`.
pub(crate) async fn start_client(builder: NodeBuilder, addr: SocketAddr) -> (Node, PeerId) {
    let node = builder.build().expect("build client node");
    let peer = within("connect", node.connect(addr))
        .await
        .expect("connect");
    (node, peer)
}

/// The next message on channel 0 of `node`.
pub(crate) async fn receive(node: &Node) -> Message {
    within("receive", node.receive()).await.expect("receive")
}

/// Asserts that no message arrives on channel 0 of `node` within [`QUIET`].
pub(crate) async fn assert_nothing_more(node: &Node, who: &str) {
    let extra = within("receive_timeout", node.receive_timeout(QUIET))
        .await
        .expect("receive_timeout");
    assert!(
        extra.is_none(),
        "{who} got an unexpected extra message: {extra:?}"
    );
}

/// The id `node` gave the peer that announced `name`.
pub(crate) fn peer_named(node: &Node, name: &str) -> PeerId {
    let peers = node.peers();
    let found: Vec<_> = peers.iter().filter(|p| &*p.name == name).collect();
    assert_eq!(found.len(), 1, "peers named {name:?} among {peers:?}");
    found[0].id
}

/// Waits for the first event `pred` accepts, skipping others; bounded in count and time.
pub(crate) async fn wait_event(
    events: &mut Events,
    what: &str,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    within(what, async {
        for _ in 0..10_000 {
            match events.recv().await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!("event stream ended while waiting for {what}"),
            }
        }
        panic!("no event matched among 10000 while waiting for {what}");
    })
    .await
}

/// Shuts every node down, each within [`STEP`].
pub(crate) async fn shutdown_all(nodes: &[&Node]) {
    for node in nodes {
        within("shutdown", node.shutdown()).await;
        assert_eq!(
            node.task_count(),
            0,
            "{node:?} has tasks left after shutdown"
        );
    }
}

/// A fresh folder under the system temp dir, removed with everything in it on drop.
pub(crate) struct TempDir {
    pub(crate) path: std::path::PathBuf,
}

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "slic-test-{}-{tag}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        // create_dir, not create_dir_all: fails rather than reuse an existing folder.
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }

    pub(crate) fn sub(&self, name: &str) -> std::path::PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir(&p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Hand-built frames and a frame reader for tests that speak the wire format directly
/// (PROTOCOL.md sections 2, 3 and 5).
pub(crate) mod wire {
    use std::net::SocketAddr;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::within;

    pub(crate) const HELLO: u8 = 1;
    pub(crate) const WELCOME: u8 = 2;
    pub(crate) const MESSAGE: u8 = 3;
    pub(crate) const REQUEST: u8 = 4;
    pub(crate) const RESPONSE: u8 = 5;
    pub(crate) const CHANNEL_OPEN: u8 = 7;
    pub(crate) const CHANNEL_CLOSE: u8 = 8;
    pub(crate) const WINDOW_UPDATE: u8 = 9;
    pub(crate) const PING: u8 = 10;
    pub(crate) const PONG: u8 = 11;
    pub(crate) const GOAWAY: u8 = 12;
    pub(crate) const ERROR: u8 = 13;
    pub(crate) const CANCEL: u8 = 14;

    /// A decoded 20-byte frame header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Header {
        pub(crate) version: u8,
        pub(crate) ty: u8,
        pub(crate) flags: u8,
        pub(crate) codec: u8,
        pub(crate) channel: u32,
        pub(crate) id: u64,
        pub(crate) len: u32,
    }

    /// Encodes a frame header, big-endian as section 2 lays it out.
    pub(crate) fn header(ty: u8, channel: u32, id: u64, len: u32) -> [u8; 20] {
        let mut h = [0_u8; 20];
        h[0] = 1;
        h[1] = ty;
        h[4..8].copy_from_slice(&channel.to_be_bytes());
        h[8..16].copy_from_slice(&id.to_be_bytes());
        h[16..20].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// A whole frame: a header with the given flags and codec bytes, then `payload`.
    pub(crate) fn frame(
        ty: u8,
        flags: u8,
        codec: u8,
        channel: u32,
        id: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("payload of at most 4 GiB");
        let mut f = header(ty, channel, id, len).to_vec();
        f[2] = flags;
        f[3] = codec;
        f.extend_from_slice(payload);
        f
    }

    /// A HELLO/WELCOME payload (section 5) with the given magic and name, codecs raw to
    /// JSON, 64 KiB frames and windows, 16 channels, no heartbeat, no compression.
    pub(crate) fn hello_payload(magic: [u8; 4], name: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(33 + name.len());
        p.extend_from_slice(&magic);
        p.push(1); // version
        p.push(0x0F); // codecs
        p.push(0); // flags
        p.push(u8::try_from(name.len()).expect("name of at most 255 bytes"));
        p.extend_from_slice(&(64_u32 << 10).to_be_bytes()); // max_frame_size
        p.extend_from_slice(&(1_u32 << 20).to_be_bytes()); // max_message_size
        p.extend_from_slice(&(64_u32 << 10).to_be_bytes()); // channel window
        p.extend_from_slice(&(64_u32 << 10).to_be_bytes()); // connection window
        p.extend_from_slice(&16_u32.to_be_bytes()); // max_channels
        p.extend_from_slice(&0_u32.to_be_bytes()); // heartbeat_ms
        p.push(0); // compression count
        p.extend_from_slice(name);
        p
    }

    /// A whole HELLO (or WELCOME) frame.
    pub(crate) fn handshake_frame(ty: u8, magic: [u8; 4], name: &[u8]) -> Vec<u8> {
        let payload = hello_payload(magic, name);
        let len = u32::try_from(payload.len()).unwrap();
        let mut f = header(ty, 0, 0, len).to_vec();
        f.extend_from_slice(&payload);
        f
    }

    /// Reads one frame (header and payload) within the step timeout; payloads are capped at
    /// 1 MiB so a wrong length cannot make the test allocate without bound.
    pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> (Header, Vec<u8>) {
        let mut raw = [0_u8; 20];
        within("read frame header", r.read_exact(&mut raw))
            .await
            .expect("a 20-byte frame header");
        let h = Header {
            version: raw[0],
            ty: raw[1],
            flags: raw[2],
            codec: raw[3],
            channel: u32::from_be_bytes(raw[4..8].try_into().unwrap()),
            id: u64::from_be_bytes(raw[8..16].try_into().unwrap()),
            len: u32::from_be_bytes(raw[16..20].try_into().unwrap()),
        };
        assert_eq!(h.version, 1, "{h:?}");
        assert!(h.len <= 1 << 20, "implausible frame length in {h:?}");
        let mut payload = vec![0_u8; h.len as usize];
        within("read frame payload", r.read_exact(&mut payload))
            .await
            .expect("the frame payload");
        (h, payload)
    }

    /// Reads an ERROR frame and returns its code; the reason must be valid, short UTF-8.
    pub(crate) async fn read_error<R: AsyncRead + Unpin>(r: &mut R) -> u32 {
        let (h, p) = read_frame(r).await;
        assert_eq!(h.ty, ERROR, "expected an ERROR frame, got {h:?}");
        assert_eq!((h.channel, h.id, h.flags, h.codec), (0, 0, 0, 0), "{h:?}");
        assert!(
            (4..=260).contains(&p.len()),
            "ERROR payload of {} bytes",
            p.len()
        );
        std::str::from_utf8(&p[4..]).expect("UTF-8 reason");
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }

    /// Asserts the peer has closed the stream: a read returns end of stream (or a reset)
    /// within the step timeout, with no further bytes.
    pub(crate) async fn expect_closed<R: AsyncRead + Unpin>(r: &mut R) {
        let mut buf = [0_u8; 64];
        match within("read until closed", r.read(&mut buf)).await {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!(
                "expected the stream closed, got {n} more bytes: {:?}",
                &buf[..n]
            ),
        }
    }

    /// A raw TCP connection to `addr`, within the step timeout.
    pub(crate) async fn raw_connect(addr: SocketAddr) -> TcpStream {
        within("raw connect", TcpStream::connect(addr))
            .await
            .expect("raw connect")
    }

    /// Completes a handshake by hand and returns the socket, open on both sides.
    pub(crate) async fn raw_handshake(addr: SocketAddr, name: &[u8]) -> TcpStream {
        let mut s = raw_connect(addr).await;
        let hello = handshake_frame(HELLO, *b"SLIC", name);
        within("write HELLO", s.write_all(&hello)).await.unwrap();
        let (h, p) = read_frame(&mut s).await;
        assert_eq!(h.ty, WELCOME, "{h:?}");
        assert_eq!(&p[..4], b"SLIC");
        s
    }
}
