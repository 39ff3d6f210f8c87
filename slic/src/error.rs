//! The one error type of the `slic` crate.

use std::io;

use slic_proto::{ConnectionError, OpenError};

use crate::node::{ChannelId, PeerId};
use crate::resource::Status;

/// Everything that can go wrong in `slic`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error from the operating system (bind, connect, read, write).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The connection ended, or the handshake failed, for this protocol reason.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// A builder setting is out of bounds.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A value could not be serialized.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A message body does not decode into the requested type.
    #[error("cannot decode message: {0}")]
    Decode(String),
    /// `Target::All` with no peer connected.
    #[error("no peer connected")]
    NoPeers,
    /// The target peer is not (or no longer) connected.
    #[error("peer {0} is not connected")]
    UnknownPeer(PeerId),
    /// The send buffer (`buffer_cap`) of a peer is full and the call would wait.
    #[error("send buffer of peer {0} is full")]
    Full(PeerId),
    /// The message is bigger than the peer accepts.
    #[error("message of {len} bytes exceeds the peer's maximum of {max}")]
    MessageTooLarge {
        /// Encoded length.
        len: usize,
        /// Peer's maximum message size.
        max: u32,
    },
    /// The peer does not decode the node's codec.
    #[error("peer does not accept codec {0:?}")]
    CodecRefused(slic_proto::CodecId),
    /// A channel could not be opened.
    #[error("cannot open channel: {0}")]
    Open(#[from] OpenError),
    /// The channel is closed.
    #[error("channel {0} is closed")]
    ChannelClosed(ChannelId),
    /// An operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The node was shut down.
    #[error("node is shut down")]
    Shutdown,
    /// A request was refused or failed; the status says why.
    #[error(transparent)]
    Status(#[from] Status),
    /// A resource of that name already exists on this node.
    #[error("resource {0} already exists")]
    ResourceExists(String),
    /// A TLS setting could not be used (unreadable PEM, key and certificate that do not
    /// match, ...).
    #[error("TLS: {0}")]
    Tls(String),
    /// Several peers are connected: name one (`get_resource_from`, `upload_resource_to`).
    #[error("several peers are connected; name the one to call")]
    AmbiguousPeer,
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            Error::Timeout => Self::new(io::ErrorKind::TimedOut, e),
            Error::Full(_) => Self::new(io::ErrorKind::WouldBlock, e),
            Error::UnknownPeer(_) | Error::NoPeers => Self::new(io::ErrorKind::NotConnected, e),
            Error::Shutdown | Error::Connection(_) | Error::ChannelClosed(_) => {
                Self::new(io::ErrorKind::ConnectionAborted, e)
            }
            Error::Status(Status::Timeout) => Self::new(io::ErrorKind::TimedOut, e),
            Error::Config(_) | Error::MessageTooLarge { .. } => {
                Self::new(io::ErrorKind::InvalidInput, e)
            }
            other => Self::other(other),
        }
    }
}
