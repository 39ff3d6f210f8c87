//! Errors of the protocol core, and the one place where they map to wire codes.

use crate::frame::FrameType;

/// A frame header that cannot be accepted. Every variant is fatal to the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header's version byte is not 1.
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The declared payload length is above the negotiated maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Declared length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A frame type this version does not define (or reserves).
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A flag bit not defined for the frame type.
    #[error("reserved flags {flags:#04x} set on {ty:?}")]
    ReservedFlags {
        /// Frame type.
        ty: FrameType,
        /// The flags byte as received.
        flags: u8,
    },
    /// An unknown codec byte, or a codec on a frame that carries none.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// The frame's CRC-32 trailer does not match: it was damaged in transit.
    #[error("frame checksum mismatch")]
    ChecksumMismatch,
    /// A non-zero channel on a connection-level frame.
    #[error("{ty:?} frame on channel {channel}, must be 0")]
    UnexpectedChannel {
        /// Frame type.
        ty: FrameType,
        /// Channel as received.
        channel: u32,
    },
}

/// Error codes carried by ERROR, GOAWAY and CHANNEL_CLOSE frames (PROTOCOL.md, "Error codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Graceful close, no error.
    NoError,
    /// A generic protocol violation.
    ProtocolError,
    /// Frame or handshake version not supported.
    UnsupportedVersion,
    /// The handshake did not start with the magic bytes.
    BadMagic,
    /// A frame exceeded the receiver's maximum frame size.
    FrameTooLarge,
    /// A reassembled message exceeded the receiver's maximum message size.
    MessageTooLarge,
    /// A frame exceeded the flow-control window, or a window overflowed.
    FlowControlError,
    /// A frame for a channel that is closed or was never opened.
    ChannelClosed,
    /// A channel open was refused (channel-level, in CHANNEL_CLOSE).
    ChannelRefused,
    /// Too many channels kept open.
    ChannelLimit,
    /// The handshake parameters cannot be accepted.
    HandshakeFailed,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// Nothing was received for three heartbeat intervals.
    KeepaliveTimeout,
    /// The peer exceeded a budget of cheap frames.
    EnhanceYourCalm,
    /// A frame type this version does not define.
    UnknownFrame,
    /// A node name that is empty, too long or not UTF-8.
    BadName,
    /// The sender hit an internal error.
    InternalError,
    /// A frame failed its checksum: damaged in transit.
    CorruptFrame,
    /// A code this version does not know, kept as received.
    Other(u32),
}

impl ErrorCode {
    /// The code's wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::NoError => 0,
            Self::ProtocolError => 1,
            Self::UnsupportedVersion => 2,
            Self::BadMagic => 3,
            Self::FrameTooLarge => 4,
            Self::MessageTooLarge => 5,
            Self::FlowControlError => 6,
            Self::ChannelClosed => 7,
            Self::ChannelRefused => 8,
            Self::ChannelLimit => 9,
            Self::HandshakeFailed => 10,
            Self::HandshakeTimeout => 11,
            Self::KeepaliveTimeout => 12,
            Self::EnhanceYourCalm => 13,
            Self::UnknownFrame => 14,
            Self::BadName => 15,
            Self::InternalError => 16,
            Self::CorruptFrame => 17,
            Self::Other(v) => v,
        }
    }

    /// The code for a wire value; unknown values are kept as [`ErrorCode::Other`].
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::NoError,
            1 => Self::ProtocolError,
            2 => Self::UnsupportedVersion,
            3 => Self::BadMagic,
            4 => Self::FrameTooLarge,
            5 => Self::MessageTooLarge,
            6 => Self::FlowControlError,
            7 => Self::ChannelClosed,
            8 => Self::ChannelRefused,
            9 => Self::ChannelLimit,
            10 => Self::HandshakeFailed,
            11 => Self::HandshakeTimeout,
            12 => Self::KeepaliveTimeout,
            13 => Self::EnhanceYourCalm,
            14 => Self::UnknownFrame,
            15 => Self::BadName,
            16 => Self::InternalError,
            17 => Self::CorruptFrame,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(v) => write!(f, "code {v}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// Who caused a connection to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// This side's application asked for it.
    Local,
    /// The peer sent GOAWAY or ERROR, or closed the stream.
    Remote,
    /// This side's protocol core detected a violation or a timeout.
    Protocol,
}

/// Why a connection ended. Returned by [`crate::Connection::handle_input`] and reported in
/// [`crate::Event::Closed`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The peer broke the protocol; an ERROR frame with `code` was queued for it.
    #[error("protocol violation by peer ({code}): {reason}")]
    ProtocolViolation {
        /// Wire code sent to the peer.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// The peer reported a fatal error with an ERROR frame.
    #[error("peer reported an error ({code}): {reason}")]
    PeerError {
        /// Code the peer sent.
        code: ErrorCode,
        /// Reason the peer sent (lossy UTF-8, capped).
        reason: String,
    },
    /// The peer closed gracefully with GOAWAY.
    #[error("peer went away ({code}): {reason}")]
    GoAway {
        /// Code the peer sent.
        code: ErrorCode,
        /// Reason the peer sent.
        reason: String,
    },
    /// This side closed the connection.
    #[error("closed locally ({code})")]
    LocallyClosed {
        /// Code sent in our GOAWAY.
        code: ErrorCode,
    },
    /// The handshake did not complete before its deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Nothing was received for three heartbeat intervals.
    #[error("keepalive timeout: peer silent")]
    KeepaliveTimeout,
    /// The peer closed the byte stream without GOAWAY (possibly in the middle of a frame).
    #[error("peer closed the connection without GOAWAY")]
    Eof,
}

impl ConnectionError {
    /// Who ended the connection.
    pub fn initiator(&self) -> Initiator {
        match self {
            Self::ProtocolViolation { .. } | Self::HandshakeTimeout | Self::KeepaliveTimeout => {
                Initiator::Protocol
            }
            Self::PeerError { .. } | Self::GoAway { .. } | Self::Eof => Initiator::Remote,
            Self::LocallyClosed { .. } => Initiator::Local,
        }
    }

    /// The wire code associated with the error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::ProtocolViolation { code, .. }
            | Self::PeerError { code, .. }
            | Self::GoAway { code, .. }
            | Self::LocallyClosed { code } => *code,
            Self::HandshakeTimeout => ErrorCode::HandshakeTimeout,
            Self::KeepaliveTimeout => ErrorCode::KeepaliveTimeout,
            Self::Eof => ErrorCode::ProtocolError,
        }
    }
}

/// Why a message could not be queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The handshake has not completed yet.
    #[error("handshake not complete")]
    NotReady,
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The channel is not open for sending.
    #[error("channel {0} is not open")]
    ChannelClosed(u32),
    /// The message exceeds the peer's maximum message size.
    #[error("message of {len} bytes exceeds the peer's maximum of {max}")]
    MessageTooLarge {
        /// Message length.
        len: usize,
        /// Peer's limit.
        max: u32,
    },
    /// The peer cannot decode this codec.
    #[error("peer does not accept codec {0:?}")]
    CodecRefused(crate::frame::CodecId),
    /// A compressed payload on a connection without negotiated compression.
    #[error("no compression was negotiated")]
    NotNegotiated,
}

/// Why a channel could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The handshake has not completed yet.
    #[error("handshake not complete")]
    NotReady,
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The peer's channel limit is reached.
    #[error("peer's channel limit of {0} reached")]
    Limit(u32),
    /// Channel ids are exhausted on this connection.
    #[error("channel ids exhausted")]
    Exhausted,
    /// The channel label is longer than 255 bytes.
    #[error("channel label longer than 255 bytes")]
    Label,
}
