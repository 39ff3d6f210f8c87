//! Quick TLS smoke test (replaced by the full TLS suite).

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use slic::{Node, Target, TlsConfig};

#[tokio::test]
async fn mutual_tls_round_trip_carries_the_identity() {
    let server_ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let client_ck = rcgen::generate_simple_self_signed(vec!["pc2.example".to_string()]).unwrap();
    let s_cert: CertificateDer<'static> = server_ck.cert.der().clone();
    let c_cert: CertificateDer<'static> = client_ck.cert.der().clone();
    let s_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        server_ck.signing_key.serialize_der(),
    ));
    let c_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        client_ck.signing_key.serialize_der(),
    ));
    let server_tls = TlsConfig::builder()
        .identity(vec![s_cert.clone()], s_key)
        .require_client_certs(vec![c_cert.clone()])
        .build()
        .unwrap();
    let client_tls = TlsConfig::builder()
        .identity(vec![c_cert], c_key)
        .trust(s_cert)
        .build()
        .unwrap();
    let server = Node::builder().name("hub").tls(server_tls).build().unwrap();
    let addr = server.listen("tls://127.0.0.1:0").await.unwrap();
    let client = Node::builder().name("pc2").tls(client_tls).build().unwrap();
    let peer = client
        .connect(format!("tls://localhost:{}", addr.port()))
        .await
        .unwrap();
    client.send(Target::Peer(peer), &"secret").await.unwrap();
    let m = server.receive().await.unwrap();
    assert_eq!(m.decode::<String>().unwrap(), "secret");
    let id = m.from.identity.clone().expect("client identity");
    assert_eq!(id.dns_names, vec!["pc2.example".to_string()]);
    let p = client.peers();
    assert_eq!(
        p[0].identity.as_ref().unwrap().dns_names,
        vec!["localhost".to_string()]
    );
    client.shutdown().await;
    server.shutdown().await;
}
