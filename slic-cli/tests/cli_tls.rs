//! The `slic` binary over TLS, run as processes: a server requiring client certificates,
//! calls and uploads with and without one, exit codes and error lines checked.

mod common;

use std::path::{Path, PathBuf};

use common::{run, scratch, start, stderr, stdout};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// A fresh CA named `name`.
fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Writes `<stem>.pem` and `<stem>.key` for `name`, signed by `ca`, into `dir`.
fn issue(ca: &CertifiedIssuer<'static, KeyPair>, name: &str, dir: &Path, stem: &str) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &**ca).unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
}

/// PEM files in a scratch folder: `ca.pem` (server CA), `server.pem`/`.key` for localhost,
/// `client-ca.pem`, `client.pem`/`.key` for pc2.example.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = scratch(tag);
        let server_ca = new_ca("slic cli test server CA");
        let client_ca = new_ca("slic cli test client CA");
        std::fs::write(dir.join("ca.pem"), server_ca.pem()).unwrap();
        std::fs::write(dir.join("client-ca.pem"), client_ca.pem()).unwrap();
        issue(&server_ca, "localhost", &dir, "server");
        issue(&client_ca, "pc2.example", &dir, "client");
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The port of a "127.0.0.1:PORT" address.
fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').expect("ADDR:PORT").1
}

#[test]
fn serve_with_client_certificates_answers_calls_and_uploads_only_from_certified_clients() {
    let pki = Pki::new("mtls");
    let store = pki.dir.join("store");
    let (_server, addr, _lines) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--client-ca",
        &pki.path("client-ca.pem"),
        "--upload-dir",
        store.to_str().unwrap(),
    ]);
    // The certificate is for "localhost": reach the loopback listener by that name.
    let target = format!("localhost:{}", port_of(&addr));
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );

    // With a client certificate: answered.
    let out = run(&[
        "call",
        &target,
        ":echo",
        r#"{"a":1}"#,
        "--ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reply, serde_json::json!({"a": 1}));
    assert!(stderr(&out).contains("status: OK"), "{}", stderr(&out));

    // Without one: refused, exit 1 with one error line.
    let out = run(&["call", &target, ":echo", r#"{"a":1}"#, "--ca", &ca]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(err.starts_with("error: cannot connect"), "{err}");
    assert!(err.contains("CertificateRequired"), "{err}");
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));

    // An upload over TLS arrives byte for byte.
    let src = pki.dir.join("notes.txt");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &content).unwrap();
    let out = run(&[
        "upload",
        &target,
        ":upload",
        src.to_str().unwrap(),
        "--quiet",
        "--ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("stored notes.txt (300000 bytes"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read(store.join("notes.txt")).unwrap(), content);
}

#[test]
fn calls_to_a_tls_server_fail_with_one_line_when_the_ca_is_wrong_or_tls_is_missing() {
    let pki = Pki::new("refused");
    let (_server, addr, _lines) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
    ]);
    let target = format!("localhost:{}", port_of(&addr));

    // Trusting the wrong CA: the server's certificate is refused.
    let out = run(&[
        "call",
        &target,
        ":echo",
        "1",
        "--ca",
        &pki.path("client-ca.pem"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Plain TCP to the TLS listener: told TLS is required.
    let out = run(&["call", &addr, ":echo", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("requires TLS"), "{err}");

    // A missing PEM file is named in the error.
    let missing = pki.path("missing.pem");
    let out = run(&["call", &target, ":echo", "1", "--ca", &missing]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&missing), "{err}");

    // The right CA, no client certificate needed by this server: answered.
    let out = run(&["call", &target, ":echo", "1", "--ca", &pki.path("ca.pem")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "1");
}
