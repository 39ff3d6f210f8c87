//! TLS 1.3 (rustls, ring provider) with optional mutual authentication, and the addresses
//! (`tcp://`, `tls://`) that pick the transport.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::Error;

/// Who the peer proved to be with its certificate (TLS connections only).
///
/// Available on every [`PeerInfo`](crate::PeerInfo), hence on every message, request and
/// event, so routing, metrics and rate limits can key on it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerIdentity {
    /// The DNS names in the certificate's subject alternative names, in order.
    pub dns_names: Vec<String>,
    /// The whole end-entity certificate, DER-encoded, for checks of your own.
    pub certificate: Vec<u8>,
}

impl PeerIdentity {
    fn from_certificate(der: &CertificateDer<'_>) -> Self {
        let dns_names = webpki::EndEntityCert::try_from(der)
            .map(|c| c.valid_dns_names().map(str::to_owned).collect())
            .unwrap_or_default();
        Self {
            dns_names,
            certificate: der.to_vec(),
        }
    }
}

/// TLS settings of a node: its identity (for listening, and as a client certificate), the
/// roots it trusts, and whether it requires client certificates.
///
/// Built with [`TlsConfig::builder`], or from rustls configurations with
/// [`TlsConfig::from_rustls`]. Only TLS 1.3 is offered.
///
/// # Examples
///
/// ```no_run
/// use slic::{Node, TlsConfig};
///
/// # async fn f() -> Result<(), slic::Error> {
/// let tls = TlsConfig::builder()
///     .identity_pem_files("server.pem", "server.key")?
///     .require_client_certs_pem_file("clients-ca.pem")?
///     .build()?;
/// let server = Node::builder().tls(tls).build()?;
/// server.listen("tls://0.0.0.0:7443").await?;
///
/// let tls = TlsConfig::builder()
///     .trust_pem_file("ca.pem")?
///     .identity_pem_files("client.pem", "client.key")?
///     .build()?;
/// let client = Node::builder().tls(tls).build()?;
/// client.connect("tls://server.example:7443").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) server: Option<Arc<ServerConfig>>,
    pub(crate) client: Arc<ClientConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("can_listen", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// A builder with no identity and no trusted roots.
    pub fn builder() -> TlsConfigBuilder {
        TlsConfigBuilder::default()
    }

    /// Uses rustls configurations as they are: `server` for `tls://` listeners (none: the
    /// node cannot listen with TLS), `client` for `tls://` connections.
    pub fn from_rustls(server: Option<Arc<ServerConfig>>, client: Arc<ClientConfig>) -> Self {
        Self { server, client }
    }
}

/// Builds a [`TlsConfig`]; see there.
#[derive(Default)]
pub struct TlsConfigBuilder {
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    roots: Vec<CertificateDer<'static>>,
    client_roots: Option<Vec<CertificateDer<'static>>>,
    accept_any_server: bool,
}

impl fmt::Debug for TlsConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsConfigBuilder")
            .field("has_identity", &self.identity.is_some())
            .field("roots", &self.roots.len())
            .field("requires_client_certs", &self.client_roots.is_some())
            .field("accept_any_server", &self.accept_any_server)
            .finish()
    }
}

fn tls_err(what: &str, e: impl fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(&format!("reading {}", path.display()), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&format!("parsing {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

impl TlsConfigBuilder {
    /// This node's certificate chain and private key, from PEM files. Used to listen with
    /// TLS, and as the client certificate when connecting.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] if a file cannot be read or holds no certificate or key.
    pub fn identity_pem_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let certs = read_certs(cert.as_ref())?;
        let key = PrivateKeyDer::from_pem_file(key.as_ref())
            .map_err(|e| tls_err(&format!("reading key {}", key.as_ref().display()), e))?;
        Ok(self.identity(certs, key))
    }

    /// This node's certificate chain and private key.
    pub fn identity(
        mut self,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Self {
        self.identity = Some((certs, key));
        self
    }

    /// Trusts the CA certificates in a PEM file for servers this node connects to.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] if the file cannot be read or holds no certificate.
    pub fn trust_pem_file(mut self, path: impl AsRef<Path>) -> Result<Self, Error> {
        self.roots.extend(read_certs(path.as_ref())?);
        Ok(self)
    }

    /// Trusts a CA certificate for servers this node connects to.
    pub fn trust(mut self, ca: CertificateDer<'static>) -> Self {
        self.roots.push(ca);
        self
    }

    /// Requires every client to present a certificate signed by a CA in this PEM file.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] if the file cannot be read or holds no certificate.
    pub fn require_client_certs_pem_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let certs = read_certs(path.as_ref())?;
        Ok(self.require_client_certs(certs))
    }

    /// Requires every client to present a certificate signed by one of these CAs.
    pub fn require_client_certs(mut self, cas: Vec<CertificateDer<'static>>) -> Self {
        self.client_roots.get_or_insert_with(Vec::new).extend(cas);
        self
    }

    /// Settings that give up security, for tests and development only.
    pub fn dangerous(self) -> DangerousTlsConfigBuilder {
        DangerousTlsConfigBuilder(self)
    }

    /// Builds the configuration.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] if rustls refuses the identity (key does not match, unsupported key
    /// type) or a CA certificate.
    pub fn build(self) -> Result<TlsConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = &[&rustls::version::TLS13];
        let mut roots = RootCertStore::empty();
        for ca in self.roots {
            roots.add(ca).map_err(|e| tls_err("trusted CA", e))?;
        }
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| tls_err("client config", e))?;
        let client = if self.accept_any_server {
            client
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider.clone())))
        } else {
            client.with_root_certificates(roots)
        };
        let client = match &self.identity {
            Some((certs, key)) => client
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| tls_err("client certificate", e))?,
            None => client.with_no_client_auth(),
        };
        let server = match self.identity {
            None => None,
            Some((certs, key)) => {
                let builder = ServerConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(versions)
                    .map_err(|e| tls_err("server config", e))?;
                let builder = match self.client_roots {
                    Some(cas) => {
                        let mut store = RootCertStore::empty();
                        for ca in cas {
                            store.add(ca).map_err(|e| tls_err("client CA", e))?;
                        }
                        let verifier =
                            WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                                .build()
                                .map_err(|e| tls_err("client verifier", e))?;
                        builder.with_client_cert_verifier(verifier)
                    }
                    None => builder.with_no_client_auth(),
                };
                let config = builder
                    .with_single_cert(certs, key)
                    .map_err(|e| tls_err("server certificate", e))?;
                Some(Arc::new(config))
            }
        };
        Ok(TlsConfig {
            server,
            client: Arc::new(client),
        })
    }
}

/// The insecure corner of [`TlsConfigBuilder`]; see [`TlsConfigBuilder::dangerous`].
#[derive(Debug)]
pub struct DangerousTlsConfigBuilder(TlsConfigBuilder);

impl DangerousTlsConfigBuilder {
    /// Accepts any server certificate, for any name, signed by anyone: the link is encrypted
    /// but the server is NOT authenticated, so anyone in the path can impersonate it. For
    /// tests and development only.
    pub fn accept_any_server_certificate(mut self) -> TlsConfigBuilder {
        self.0.accept_any_server = true;
        self.0
    }
}

/// Verifies signatures (so the handshake is sound) but not who signed the certificate.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The transport an address asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Tcp,
    Tls,
}

/// A parsed address: `[tcp://|tls://]host:port`, with `[v6]:port` for IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub(crate) scheme: Scheme,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Endpoint {
    pub(crate) async fn resolve(&self) -> Result<Vec<SocketAddr>, Error> {
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Config(format!(
                "{} resolves to no address",
                self.host
            )));
        }
        Ok(addrs)
    }

    /// The name the server's certificate must carry.
    pub(crate) fn server_name(&self) -> Result<ServerName<'static>, Error> {
        ServerName::try_from(self.host.clone())
            .map_err(|e| Error::Config(format!("{} is not a valid server name: {e}", self.host)))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Anything [`Node::listen`](crate::Node::listen) and [`Node::connect`](crate::Node::connect)
/// accept: `"127.0.0.1:7070"`, `"tcp://host:7070"`, `"tls://host:7443"`, `"[::1]:7070"`, or
/// a `SocketAddr` (plain TCP).
pub trait ToEndpoint {
    /// Parses the address.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an unknown scheme, a missing or bad port.
    fn to_endpoint(&self) -> Result<Endpoint, Error>;
}

fn bad_address(addr: &str, why: &str) -> Error {
    Error::Config(format!("bad address {addr:?}: {why}"))
}

impl ToEndpoint for str {
    fn to_endpoint(&self) -> Result<Endpoint, Error> {
        let bad = |why| bad_address(self, why);
        let (scheme, rest) = match self.split_once("://") {
            None => (Scheme::Tcp, self),
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some((other, _)) => {
                return Err(bad_address(self, &format!("unknown scheme {other}")));
            }
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Endpoint {
            scheme,
            host: host.to_owned(),
            port,
        })
    }
}

impl ToEndpoint for String {
    fn to_endpoint(&self) -> Result<Endpoint, Error> {
        self.as_str().to_endpoint()
    }
}

impl ToEndpoint for SocketAddr {
    fn to_endpoint(&self) -> Result<Endpoint, Error> {
        Ok(Endpoint {
            scheme: Scheme::Tcp,
            host: self.ip().to_string(),
            port: self.port(),
        })
    }
}

impl ToEndpoint for Endpoint {
    fn to_endpoint(&self) -> Result<Endpoint, Error> {
        Ok(self.clone())
    }
}

impl<T: ToEndpoint + ?Sized> ToEndpoint for &T {
    fn to_endpoint(&self) -> Result<Endpoint, Error> {
        (**self).to_endpoint()
    }
}

/// Turns a TLS handshake failure into an error that says what probably went wrong.
pub(crate) fn explain_handshake_error(e: std::io::Error) -> std::io::Error {
    let not_tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        });
    if not_tls {
        std::io::Error::other(
            "TLS handshake failed: the peer does not speak TLS (a plain tcp:// listener?)",
        )
    } else {
        std::io::Error::other(format!("TLS handshake failed: {e}"))
    }
}

/// On a TLS listener, answers a client that opens with a plain slic HELLO (first byte: frame
/// version 1, where TLS would send 0x16) with a slic ERROR frame saying TLS is required, so
/// the client reports a clear error instead of a closed connection. Otherwise hands the
/// untouched stream to the TLS handshake.
pub(crate) async fn refuse_plain_slic(
    mut stream: tokio::net::TcpStream,
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 1 && first[0] == slic_proto::frame::VERSION {
        let reason = b"this listener requires TLS: connect with a tls:// address";
        let mut frame = slic_proto::Header::control(
            slic_proto::FrameType::Error,
            0,
            0,
            (4 + reason.len()) as u32,
        )
        .encode()
        .to_vec();
        frame.extend_from_slice(
            &slic_proto::ErrorCode::HandshakeFailed
                .to_u32()
                .to_be_bytes(),
        );
        frame.extend_from_slice(reason);
        // Best effort: the client may already be gone.
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
        return Err(std::io::Error::other(
            "plain slic client on a TLS listener: refused",
        ));
    }
    Ok(stream)
}

/// The peer's identity from an established TLS session, if it presented a certificate.
pub(crate) fn identity_of(certs: Option<&[CertificateDer<'static>]>) -> Option<PeerIdentity> {
    certs
        .and_then(<[_]>::first)
        .map(PeerIdentity::from_certificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_scheme() {
        let e = "127.0.0.1:7070".to_endpoint().unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Tcp, "127.0.0.1", 7070)
        );
        let e = "tls://localhost:7443".to_endpoint().unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Tls, "localhost", 7443)
        );
        let e = "tcp://[::1]:80".to_endpoint().unwrap();
        assert_eq!((e.scheme, e.host.as_str()), (Scheme::Tcp, "::1"));
        assert_eq!(e.to_string(), "tcp://[::1]:80");
        for bad in [
            "",
            "host",
            "udp://h:1",
            "h:port",
            "h:70000",
            ":80",
            "tls://:1",
        ] {
            assert!(bad.to_endpoint().is_err(), "{bad:?}");
        }
    }
}
