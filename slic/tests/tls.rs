//! TLS 1.3 over real loopback connections: mutual authentication with identities on
//! messages, requests and events; certificates that must be refused (untrusted, misnamed,
//! expired, missing); plain and TLS peers that meet by mistake; a trickling TLS handshake
//! cut at the deadline; plain and TLS listeners side by side; the insecure accept-any mode;
//! compression under TLS; and configuration from PEM files.
//!
//! Certificates are made fresh by each test with rcgen: a server CA signs a server
//! certificate for "localhost" (clients connect to `tls://localhost:PORT`, which resolves to
//! the 127.0.0.1 listener), a client CA signs client certificates.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TempDir, builder, receive, shutdown_all, wait_event, within};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use slic::{
    Codec, Compression, Error, Event, Node, NodeBuilder, PeerId, Request, Status, Target, TlsConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// --- Test certificates ---------------------------------------------------------------------

/// A certificate authority that issues certificates for the tests.
struct TestCa {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A fresh CA whose certificate names it `name`.
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { ca }
    }

    /// The CA certificate, to trust.
    fn der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    fn pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `names`, valid from 1975 to 4096.
    fn issue(&self, names: &[&str]) -> Leaf {
        self.issue_with(names, |_| {})
    }

    /// A certificate for `names`, with `adjust` applied to its parameters first.
    fn issue_with(&self, names: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.ca).unwrap();
        Leaf { cert, key }
    }
}

/// An end-entity certificate with its private key.
struct Leaf {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Leaf {
    /// A self-signed certificate for `names`, signed by nobody anyone trusts.
    fn self_signed(names: &[&str]) -> Self {
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let ck = rcgen::generate_simple_self_signed(sans).unwrap();
        Self {
            cert: ck.cert,
            key: ck.signing_key,
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// A TLS configuration builder with this certificate as the node's identity.
    fn identity(&self) -> slic::TlsConfigBuilder {
        TlsConfig::builder().identity(vec![self.der()], self.key_der())
    }

    /// Writes `<stem>.pem` and `<stem>.key` into `dir`; returns their paths.
    fn write_pem(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, self.cert.pem()).unwrap();
        std::fs::write(&key, self.key.serialize_pem()).unwrap();
        (cert, key)
    }
}

/// The usual cast: a server CA and its "localhost" server, a client CA and its "pc2.example"
/// client.
struct Pki {
    server_ca: TestCa,
    server: Leaf,
    client_ca: TestCa,
    client: Leaf,
}

impl Pki {
    fn new() -> Self {
        let server_ca = TestCa::new("slic test server CA");
        let server = server_ca.issue(&["localhost"]);
        let client_ca = TestCa::new("slic test client CA");
        let client = client_ca.issue(&["pc2.example"]);
        Self {
            server_ca,
            server,
            client_ca,
            client,
        }
    }

    /// The server's settings: its identity, and client certificates from the client CA.
    fn server_tls(&self) -> TlsConfig {
        self.server
            .identity()
            .require_client_certs(vec![self.client_ca.der()])
            .build()
            .unwrap()
    }

    /// The client's settings: trusts the server CA, presents its certificate.
    fn client_tls(&self) -> TlsConfig {
        self.client
            .identity()
            .trust(self.server_ca.der())
            .build()
            .unwrap()
    }

    /// A client that trusts the server CA but has no certificate of its own.
    fn anonymous_client_tls(&self) -> TlsConfig {
        TlsConfig::builder()
            .trust(self.server_ca.der())
            .build()
            .unwrap()
    }
}

// --- Nodes, folders, timing ----------------------------------------------------------------

/// Builds a node from `builder` and listens with TLS on 127.0.0.1 with an OS-picked port.
async fn start_tls_server(builder: NodeBuilder) -> (Node, SocketAddr) {
    let node = builder.build().expect("build server node");
    let addr = within("listen", node.listen("tls://127.0.0.1:0"))
        .await
        .expect("listen on tls://127.0.0.1:0");
    assert!(addr.ip().is_loopback(), "bound to {addr}");
    (node, addr)
}

/// The TLS address of a loopback listener, by the name its certificate carries.
fn tls_addr(addr: SocketAddr) -> String {
    format!("tls://localhost:{}", addr.port())
}

/// Connects `node` to the TLS listener at `addr` and returns the result, within the step.
async fn connect_tls(node: &Node, addr: SocketAddr) -> Result<PeerId, Error> {
    within("connect", node.connect(tls_addr(addr))).await
}

/// Builds a node from `builder` and connects it with TLS to `addr`; must succeed.
async fn start_tls_client(builder: NodeBuilder, addr: SocketAddr) -> (Node, PeerId) {
    let node = builder.build().expect("build client node");
    let peer = connect_tls(&node, addr).await.expect("TLS connect");
    (node, peer)
}

/// Awaits `fut` for at most `limit`, failing the test with `what` otherwise.
async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Sends `text` from `from` to `peer` and checks that `to` receives it; returns the message.
async fn exchange(from: &Node, peer: PeerId, to: &Node, text: &str) -> slic::Message {
    within("send", from.send(Target::Peer(peer), text))
        .await
        .expect("send");
    let m = receive(to).await;
    assert_eq!(m.decode::<String>().unwrap(), text);
    m
}

/// `len` pseudo-random bytes (xorshift64) from `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The text of `r`'s error; the connect must have failed.
fn connect_error(r: Result<PeerId, Error>, what: &str) -> String {
    match r {
        Ok(peer) => panic!("{what}: connect succeeded (peer {peer}) but should have failed"),
        Err(e) => e.to_string(),
    }
}

// --- 1. Mutual TLS -------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Whoami {
    caller_names: Vec<String>,
    echo: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_carries_messages_calls_and_uploads_with_both_identities() {
    let pki = Pki::new();
    let dir = TempDir::new("mutual");
    let store = dir.sub("store");

    let (server, addr) = start_tls_server(builder("hub").tls(pki.server_tls())).await;
    server
        .create_resource(":whoami", |req: Request<String>| async move {
            let caller_names = req
                .from
                .identity
                .as_ref()
                .map(|id| id.dns_names.clone())
                .unwrap_or_default();
            Ok::<_, Status>(Whoami {
                caller_names,
                echo: req.body,
            })
        })
        .unwrap();
    server.create_upload_resource(":upload", &store).unwrap();
    let mut events = server.events();

    let (client, peer) = start_tls_client(builder("pc2").tls(pki.client_tls()), addr).await;

    // The server learns who connected from the event...
    let ev = wait_event(&mut events, "PeerConnected", |e| {
        matches!(e, Event::PeerConnected(_))
    })
    .await;
    let Event::PeerConnected(info) = ev else {
        unreachable!()
    };
    assert_eq!(&*info.name, "pc2");
    let id = info.identity.expect("client identity on PeerConnected");
    assert_eq!(id.dns_names, vec!["pc2.example".to_owned()]);
    assert_eq!(id.certificate, pki.client.der().to_vec());

    // ... and the client knows whom it reached.
    let peers = client.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].id, peer);
    let server_id = peers[0].identity.clone().expect("server identity");
    assert_eq!(server_id.dns_names, vec!["localhost".to_owned()]);
    assert_eq!(server_id.certificate, pki.server.der().to_vec());

    // Messages both ways, each carrying the sender's identity.
    let m = exchange(&client, peer, &server, "hello over TLS").await;
    assert_eq!(
        m.from
            .identity
            .as_ref()
            .expect("identity on Message")
            .dns_names,
        vec!["pc2.example".to_owned()]
    );
    let back = exchange(&server, m.from.id, &client, "hello back").await;
    assert_eq!(
        back.from
            .identity
            .as_ref()
            .expect("server identity")
            .dns_names,
        vec!["localhost".to_owned()]
    );
    // A message of several TLS records and slic frames arrives whole.
    let big = noise(3 << 20, 7);
    within(
        "send big",
        client.send_bytes(Target::Peer(peer), big.clone()),
    )
    .await
    .unwrap();
    assert_eq!(&receive(&server).await.body[..], &big[..]);

    // A resource call: the handler saw the caller's identity in Request::from.
    let reply: Whoami = within("call", client.get_resource(":whoami", "ping"))
        .await
        .unwrap();
    assert_eq!(
        reply,
        Whoami {
            caller_names: vec!["pc2.example".to_owned()],
            echo: "ping".to_owned(),
        }
    );

    // An upload of a few MiB, byte-identical on arrival.
    let content = noise((2 << 20) + 12_345, 42);
    let src = dir.path.join("payload.bin");
    std::fs::write(&src, &content).unwrap();
    let stored = within("upload", client.upload_resource(":upload", &src))
        .await
        .expect("upload over TLS");
    assert_eq!(stored.name, "payload.bin");
    assert_eq!(stored.size, content.len() as u64);
    assert_eq!(stored.digest, blake3::hash(&content).to_hex().to_string());
    assert_eq!(std::fs::read(store.join("payload.bin")).unwrap(), content);

    shutdown_all(&[&client, &server]).await;
}

// --- 2. Server certificates the client must refuse -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_misnamed_or_expired_server_certificates_fail_connect_and_the_server_goes_on() {
    let pki = Pki::new();
    let other_ca = TestCa::new("some other CA");
    let misnamed = pki.server_ca.issue(&["other.example"]);
    let expired = pki.server_ca.issue_with(&["localhost"], |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let trusting_server_ca = || {
        TlsConfig::builder()
            .trust(pki.server_ca.der())
            .build()
            .unwrap()
    };
    // Neither a misnamed nor an expired certificate can be accepted by a verifying client;
    // for those servers the client that shows they still serve accepts any certificate.
    let accept_any = || {
        TlsConfig::builder()
            .dangerous()
            .accept_any_server_certificate()
            .build()
            .unwrap()
    };
    let cases: [(&str, &Leaf, TlsConfig, TlsConfig, &[&str]); 3] = [
        (
            "untrusted",
            &pki.server,
            TlsConfig::builder().trust(other_ca.der()).build().unwrap(),
            trusting_server_ca(),
            &["invalid peer certificate", "UnknownIssuer"],
        ),
        (
            "misnamed",
            &misnamed,
            trusting_server_ca(),
            accept_any(),
            &["invalid peer certificate", "not valid for name"],
        ),
        (
            "expired",
            &expired,
            trusting_server_ca(),
            accept_any(),
            &["invalid peer certificate", "expired"],
        ),
    ];
    for (case, leaf, refusing, honest, expected) in cases {
        let server_tls = leaf.identity().build().unwrap();
        let (server, addr) = start_tls_server(builder("hub").tls(server_tls)).await;
        let mut events = server.events();
        let (honest, peer) = start_tls_client(builder("honest").tls(honest), addr).await;
        exchange(&honest, peer, &server, "before").await;

        let refused = builder("refused").tls(refusing).build().unwrap();
        let err = connect_error(connect_tls(&refused, addr).await, case);
        assert!(err.contains("TLS handshake failed"), "{case}: {err}");
        for part in expected {
            assert!(err.contains(part), "{case}: {err:?} lacks {part:?}");
        }
        assert!(refused.peers().is_empty(), "{case}");
        // The server saw that handshake fail...
        wait_event(&mut events, "HandshakeFailed", |e| {
            matches!(e, Event::HandshakeFailed { .. })
        })
        .await;
        // ... and still serves the connected client and new ones.
        exchange(&honest, peer, &server, "after").await;
        let m = exchange(&server, server.peers()[0].id, &honest, "reply").await;
        assert!(m.from.identity.is_some(), "{case}");
        let again = honest.clone();
        let peer2 = connect_tls(&again, addr).await.expect("reconnect");
        assert_ne!(peer2, peer);
        exchange(&honest, peer2, &server, "second connection").await;
        assert_eq!(server.peers().len(), 2, "{case}");
        shutdown_all(&[&refused, &honest, &server]).await;
    }
}

// --- 3. Client certificates ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_when_the_server_requires_one() {
    let pki = Pki::new();
    let (server, addr) = start_tls_server(builder("hub").tls(pki.server_tls())).await;
    let mut events = server.events();

    let anonymous = builder("anonymous")
        .tls(pki.anonymous_client_tls())
        .build()
        .unwrap();
    let err = connect_error(connect_tls(&anonymous, addr).await, "no client certificate");
    assert!(
        err.contains("CertificateRequired"),
        "the error names the missing certificate: {err}"
    );
    assert!(anonymous.peers().is_empty());
    assert!(server.peers().is_empty());
    let ev = wait_event(&mut events, "HandshakeFailed", |e| {
        matches!(e, Event::HandshakeFailed { .. })
    })
    .await;
    let Event::HandshakeFailed { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.contains("TLS handshake failed"), "{reason}");

    // A client certificate from another CA is refused too.
    let stranger_ca = TestCa::new("stranger CA");
    let stranger = stranger_ca
        .issue(&["pc2.example"])
        .identity()
        .trust(pki.server_ca.der())
        .build()
        .unwrap();
    let stranger = builder("stranger").tls(stranger).build().unwrap();
    let err = connect_error(connect_tls(&stranger, addr).await, "foreign client CA");
    assert!(
        err.contains("UnknownCA") || err.contains("BadCertificate"),
        "{err}"
    );

    // The server is up: a client with a proper certificate gets in.
    let (client, peer) = start_tls_client(builder("pc2").tls(pki.client_tls()), addr).await;
    let m = exchange(&client, peer, &server, "let me in").await;
    assert_eq!(
        m.from.identity.unwrap().dns_names,
        vec!["pc2.example".to_owned()]
    );
    shutdown_all(&[&anonymous, &stranger, &client, &server]).await;
}

// --- 4. Plain and TLS peers that meet by mistake -------------------------------------------

/// Clear errors come quickly: well under the default ten-second connect timeout.
const QUICK: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_on_a_tls_listener_is_told_tls_is_required_without_hanging() {
    let pki = Pki::new();
    let (server, addr) = start_tls_server(builder("hub").tls(pki.server_tls())).await;
    let plain = builder("plain").build().unwrap();
    let started = Instant::now();
    let r = within_for(QUICK, "plain connect to TLS", plain.connect(addr)).await;
    let err = connect_error(r, "plain client on TLS listener");
    assert!(err.contains("requires TLS"), "{err}");
    assert!(started.elapsed() < QUICK);

    // Nothing broke: a TLS client is served.
    let (client, peer) = start_tls_client(builder("pc2").tls(pki.client_tls()), addr).await;
    exchange(&client, peer, &server, "fine").await;
    shutdown_all(&[&plain, &client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_on_a_plain_listener_is_told_the_peer_does_not_speak_tls_without_hanging() {
    let pki = Pki::new();
    let (server, addr) = common::start_server(builder("plain-hub")).await;
    let tls_client = builder("pc2").tls(pki.client_tls()).build().unwrap();
    let started = Instant::now();
    let r = within_for(
        QUICK,
        "TLS connect to plain",
        tls_client.connect(tls_addr(addr)),
    )
    .await;
    let err = connect_error(r, "TLS client on plain listener");
    assert!(err.contains("does not speak TLS"), "{err}");
    assert!(started.elapsed() < QUICK);

    // Nothing broke: a plain client is served.
    let (plain, peer) = common::start_client(builder("plain"), addr).await;
    exchange(&plain, peer, &server, "fine").await;
    shutdown_all(&[&tls_client, &plain, &server]).await;
}

// --- 5. A trickling TLS handshake ----------------------------------------------------------

/// The first flight of a real TLS 1.3 client: a ClientHello record.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    assert_eq!(&out[..3], &[0x16, 0x03, 0x01], "a TLS handshake record");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_deadline_cuts_a_tls_client_hello_trickled_byte_by_byte() {
    const DEADLINE: Duration = Duration::from_secs(1);
    const PACE: Duration = Duration::from_millis(300);
    let pki = Pki::new();
    let (server, addr) = start_tls_server(
        builder("hub")
            .tls(pki.server_tls())
            .handshake_timeout(DEADLINE),
    )
    .await;
    let mut events = server.events();

    let hello = client_hello();
    let started = Instant::now();
    let stream = within("raw connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0_usize;
        // Bounded by the hello's length (a few hundred bytes) and ends at the first failed
        // write; the test aborts it long before either.
        for b in hello {
            if wr.write_all(&[b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(PACE).await;
        }
        sent
    });

    // Meanwhile an honest client connects and is served.
    let (client, peer) = start_tls_client(builder("pc2").tls(pki.client_tls()), addr).await;
    exchange(&client, peer, &server, "not stalled").await;

    // The server closes the trickler at the deadline: end of stream or a reset.
    let mut buf = [0_u8; 64];
    let read = within_for(
        DEADLINE + Duration::from_secs(2),
        "server closes",
        rd.read(&mut buf),
    )
    .await;
    let elapsed = started.elapsed();
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected the stream closed, got {n} bytes: {:?}", &buf[..n]),
    }
    assert!(
        elapsed <= DEADLINE + Duration::from_secs(1),
        "closed after {elapsed:?}"
    );
    assert!(
        elapsed >= DEADLINE - Duration::from_millis(100),
        "closed after {elapsed:?}, before the deadline: not by the deadline"
    );
    writer.abort();
    let ev = wait_event(&mut events, "HandshakeFailed", |e| {
        matches!(e, Event::HandshakeFailed { .. })
    })
    .await;
    let Event::HandshakeFailed { reason, .. } = ev else {
        unreachable!()
    };
    assert!(reason.contains("handshake timed out"), "{reason}");

    // The honest client is still connected and served.
    exchange(&client, peer, &server, "still here").await;
    assert_eq!(server.peers().len(), 1);
    shutdown_all(&[&client, &server]).await;
}

// --- 6. Plain and TLS listeners on one node ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tls_listeners_coexist_on_one_node() {
    let pki = Pki::new();
    let server = builder("hub").tls(pki.server_tls()).build().unwrap();
    let plain_addr = within("listen plain", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let tls_listen = within("listen tls", server.listen("tls://127.0.0.1:0"))
        .await
        .unwrap();
    assert_ne!(plain_addr, tls_listen);

    let (plain, plain_peer) = common::start_client(builder("plain"), plain_addr).await;
    let (secure, secure_peer) =
        start_tls_client(builder("secure").tls(pki.client_tls()), tls_listen).await;

    let m = exchange(&plain, plain_peer, &server, "from plain").await;
    assert_eq!(&*m.from.name, "plain");
    assert!(m.from.identity.is_none(), "plain TCP proves no identity");
    let back = exchange(&server, m.from.id, &plain, "to plain").await;
    assert!(back.from.identity.is_none());

    let m = exchange(&secure, secure_peer, &server, "from secure").await;
    assert_eq!(&*m.from.name, "secure");
    assert_eq!(
        m.from.identity.as_ref().unwrap().dns_names,
        vec!["pc2.example".to_owned()]
    );
    let back = exchange(&server, m.from.id, &secure, "to secure").await;
    assert_eq!(
        back.from.identity.as_ref().unwrap().dns_names,
        vec!["localhost".to_owned()]
    );

    // A broadcast reaches both.
    within("broadcast", server.send(Target::All, "to all"))
        .await
        .unwrap();
    assert_eq!(receive(&plain).await.decode::<String>().unwrap(), "to all");
    assert_eq!(receive(&secure).await.decode::<String>().unwrap(), "to all");
    assert_eq!(server.peers().len(), 2);
    shutdown_all(&[&plain, &secure, &server]).await;
}

// --- 7. Accepting any server certificate ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_any_server_certificate_reaches_a_self_signed_server_that_otherwise_fails() {
    let self_signed = Leaf::self_signed(&["localhost"]);
    let server_tls = self_signed.identity().build().unwrap();
    let (server, addr) = start_tls_server(builder("hub").tls(server_tls)).await;

    // Without the dangerous setting: refused, whether trusting nothing or another CA.
    let nothing = builder("strict").tls(TlsConfig::builder().build().unwrap());
    let strict = nothing.build().unwrap();
    let err = connect_error(connect_tls(&strict, addr).await, "trusting nothing");
    assert!(err.contains("UnknownIssuer"), "{err}");
    let other = TestCa::new("other CA");
    let strict2 = builder("strict2")
        .tls(TlsConfig::builder().trust(other.der()).build().unwrap())
        .build()
        .unwrap();
    let err = connect_error(connect_tls(&strict2, addr).await, "trusting another CA");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // With it: connected, and the server's certificate is still reported.
    let lax_tls = TlsConfig::builder()
        .dangerous()
        .accept_any_server_certificate()
        .build()
        .unwrap();
    let (lax, peer) = start_tls_client(builder("lax").tls(lax_tls.clone()), addr).await;
    exchange(&lax, peer, &server, "encrypted, not authenticated").await;
    let id = lax.peers()[0].identity.clone().unwrap();
    assert_eq!(id.dns_names, vec!["localhost".to_owned()]);
    assert_eq!(id.certificate, self_signed.der().to_vec());

    // Any name, too: the certificate says "localhost", the address an IP.
    let lax2 = builder("lax2").tls(lax_tls).build().unwrap();
    let peer2 = within(
        "connect by IP",
        lax2.connect(format!("tls://127.0.0.1:{}", addr.port())),
    )
    .await
    .expect("accept-any ignores the name");
    exchange(&lax2, peer2, &server, "by IP").await;
    shutdown_all(&[&strict, &strict2, &lax, &lax2, &server]).await;
}

// --- 8. Compression under TLS --------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Doc {
    title: String,
    body: String,
    n: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_with_every_compression_round_trips_over_tls() {
    let pki = Pki::new();
    let server_tls = pki.server_tls();
    let client_tls = pki.client_tls();
    let doc = Doc {
        title: "compressible".to_owned(),
        body: "over TLS, compressed first ".repeat(800),
        n: 7,
    };
    for codec in [Codec::Postcard, Codec::MessagePack, Codec::Json] {
        for alg in [None, Some(Compression::Lz4), Some(Compression::Zstd)] {
            let algs: Vec<Compression> = alg.into_iter().collect();
            let (server, addr) = start_tls_server(
                builder("hub")
                    .tls(server_tls.clone())
                    .codec(codec)
                    .compression(&algs),
            )
            .await;
            server
                .create_resource(":echo", |req: Request<Doc>| async move {
                    Ok::<_, Status>(req.body)
                })
                .unwrap();
            let (client, peer) = start_tls_client(
                builder("pc2")
                    .tls(client_tls.clone())
                    .codec(codec)
                    .compression(&algs),
                addr,
            )
            .await;
            within("send", client.send(Target::Peer(peer), &doc))
                .await
                .unwrap();
            let m = receive(&server).await;
            assert_eq!(m.decode::<Doc>().unwrap(), doc, "{codec:?} {alg:?}");
            assert!(m.from.identity.is_some());
            within("reply", server.send(Target::Peer(m.from.id), &doc))
                .await
                .unwrap();
            assert_eq!(receive(&client).await.decode::<Doc>().unwrap(), doc);
            let echoed: Doc = within("call", client.get_resource(":echo", &doc))
                .await
                .unwrap();
            assert_eq!(echoed, doc, "{codec:?} {alg:?}");
            shutdown_all(&[&client, &server]).await;
        }
    }
}

// --- 9. PEM files --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pem_files_configure_mutual_tls() {
    let pki = Pki::new();
    let dir = TempDir::new("pem");
    let (server_cert, server_key) = pki.server.write_pem(&dir.path, "server");
    let (client_cert, client_key) = pki.client.write_pem(&dir.path, "client");
    let ca = dir.path.join("ca.pem");
    let client_ca = dir.path.join("client-ca.pem");
    std::fs::write(&ca, pki.server_ca.pem()).unwrap();
    std::fs::write(&client_ca, pki.client_ca.pem()).unwrap();

    let server_tls = TlsConfig::builder()
        .identity_pem_files(&server_cert, &server_key)
        .unwrap()
        .require_client_certs_pem_file(&client_ca)
        .unwrap()
        .build()
        .unwrap();
    let client_tls = TlsConfig::builder()
        .trust_pem_file(&ca)
        .unwrap()
        .identity_pem_files(&client_cert, &client_key)
        .unwrap()
        .build()
        .unwrap();
    let (server, addr) = start_tls_server(builder("hub").tls(server_tls)).await;
    let (client, peer) = start_tls_client(builder("pc2").tls(client_tls), addr).await;
    let m = exchange(&client, peer, &server, "from PEM files").await;
    assert_eq!(
        m.from.identity.unwrap().dns_names,
        vec!["pc2.example".to_owned()]
    );
    assert_eq!(
        client.peers()[0].identity.as_ref().unwrap().dns_names,
        vec!["localhost".to_owned()]
    );

    // Without the client's certificate the server refuses, as configured from the file.
    let anonymous_tls = TlsConfig::builder()
        .trust_pem_file(&ca)
        .unwrap()
        .build()
        .unwrap();
    let anonymous = builder("anonymous").tls(anonymous_tls).build().unwrap();
    connect_error(connect_tls(&anonymous, addr).await, "no client certificate");
    shutdown_all(&[&anonymous, &client, &server]).await;
}

/// Asserts `r` is [`Error::Tls`] and its message names `path` (and `also`, if given).
fn assert_tls_error<T: std::fmt::Debug>(r: Result<T, Error>, path: &Path, also: &str) {
    match r {
        Err(Error::Tls(msg)) => {
            let shown = path.display().to_string();
            assert!(msg.contains(&shown), "{msg:?} does not name {shown}");
            assert!(msg.contains(also), "{msg:?} lacks {also:?}");
        }
        other => panic!(
            "expected Error::Tls naming {}, got {other:?}",
            path.display()
        ),
    }
}

#[test]
fn missing_or_certificate_less_pem_files_are_tls_errors_naming_the_file() {
    let pki = Pki::new();
    let dir = TempDir::new("bad-pem");
    let (cert, key) = pki.server.write_pem(&dir.path, "server");
    let missing = dir.path.join("missing.pem");
    let junk = dir.path.join("junk.pem");
    std::fs::write(&junk, "this is not a certificate\n").unwrap();
    let empty = dir.path.join("empty.pem");
    std::fs::write(&empty, "").unwrap();

    // Missing files, for each way of naming one.
    let b = TlsConfig::builder;
    assert_tls_error(b().identity_pem_files(&missing, &key), &missing, "");
    assert_tls_error(b().identity_pem_files(&cert, &missing), &missing, "key");
    assert_tls_error(b().trust_pem_file(&missing), &missing, "");
    assert_tls_error(b().require_client_certs_pem_file(&missing), &missing, "");

    // Files with no certificate in them: junk, empty, or a key where a certificate belongs.
    for path in [&junk, &empty, &key] {
        assert_tls_error(b().trust_pem_file(path), path, "no certificate");
        assert_tls_error(
            b().require_client_certs_pem_file(path),
            path,
            "no certificate",
        );
        assert_tls_error(b().identity_pem_files(path, &key), path, "no certificate");
    }
    // A certificate where the key belongs.
    assert_tls_error(b().identity_pem_files(&cert, &cert), &cert, "key");
    // The right files work.
    b().identity_pem_files(&cert, &key)
        .unwrap()
        .build()
        .expect("a valid identity");
}
