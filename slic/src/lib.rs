//! slic: low-latency, message-based communication between processes and machines.
//!
//! A [`Node`] listens on any number of addresses and connects to any number of peers. It sends
//! typed messages (serialized with serde: postcard, MessagePack or JSON) or raw bytes to all,
//! one or some peers, receives them with the sender's identity attached, and multiplexes
//! ordered [`Channel`]s over each connection with per-channel flow control.
//!
//! ```text
//! slic-cli   (binary `slic`)
//!    |
//! slic       (this crate: tokio driver, Node, channels, blocking facade)
//!    |
//! slic-proto (sans-IO protocol core: frames, handshake, channels, flow control, timers)
//! ```
//!
//! Named resources ([`Node::create_resource`], [`Node::get_resource`]) answer requests with a
//! reply or a [`Status`]; upload resources ([`Node::create_upload_resource`],
//! [`Node::upload_resource`]) store files streamed by clients, checked and fsynced.
//!
//! Links can be TLS 1.3 with mutual authentication ([`TlsConfig`], `tls://` addresses) and
//! compressed with lz4 or zstd ([`NodeBuilder::compression`]), both negotiated per
//! connection.
//!
//! What it does not do (yet): rate limits, traffic accounting, discovery, QUIC. The wire format
//! is specified in PROTOCOL.md.
//!
//! # Example
//!
//! ```
//! use slic::{Node, Target};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), slic::Error> {
//! let server = Node::builder().name("hub").build()?;
//! let addr = server.listen("127.0.0.1:0").await?;
//! let client = Node::builder().name("pc2").build()?;
//! let peer = client.connect(addr).await?;
//! client.send(Target::Peer(peer), &(1u8, "one".to_string())).await?;
//! let msg = server.receive().await?;
//! assert_eq!(msg.decode::<(u8, String)>()?, (1, "one".to_string()));
//! # Ok(()) }
//! ```
//!
//! Code without a runtime uses [`blocking::Node`], which has the same methods.
//!
//! # Performance
//!
//! Each connection is one task that owns its socket (TCP_NODELAY on) and its protocol state.
//! It writes every frame that is ready in one vectored write and writes as soon as its queue
//! has something, so a lone message leaves at once and a burst leaves batched. Payloads are
//! `bytes::Bytes`, shared rather than copied, from serialization to the socket.

pub mod blocking;

/// The README's examples, compiled and run as doctests so they cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
mod channel;
mod codec;
mod commands;
mod compress;
mod driver;
mod error;
mod idle;
mod inbox;
mod node;
mod resource;
mod tls;
mod upload;

pub use bytes::Bytes;
pub use channel::Channel;
pub use codec::Codec;
pub use error::Error;
pub use idle::IdleStrategy;
pub use node::{
    ChannelId, DisconnectReason, Event, Events, FrameChecksum, Message, MessageId, Messages, Node,
    NodeBuilder, PeerId, PeerInfo, Target,
};
pub use resource::{MAX_RESOURCE_NAME, Request, Status};
/// Certificate and key types of the TLS settings, re-exported from rustls.
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use slic_proto::{CodecId, Compression, ConnectionError, ErrorCode, Initiator};
pub use tls::{
    DangerousTlsConfigBuilder, Endpoint, PeerIdentity, TlsConfig, TlsConfigBuilder, ToEndpoint,
};
pub use upload::{Progress, StoredFile, UploadOptions, UploadRequest, validate_file_name};
