//! Connection configuration: what this side declares in its handshake, and its local limits.

use std::time::Duration;

use crate::frame::CodecId;
use crate::handshake::{self, MAX_FRAME_SIZE, MAX_WINDOW, MIN_FRAME_SIZE, MIN_WINDOW};

/// A compression algorithm that can be negotiated (PROTOCOL.md, "Compression").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// LZ4 block format with the uncompressed size prepended (lz4_flex): fast.
    Lz4 = 1,
    /// A Zstandard frame: smaller output, more CPU.
    Zstd = 2,
}

impl Compression {
    /// The algorithm for a wire id; `None` for unknown ids.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Lz4),
            2 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A setting was given a value outside its allowed range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The value is outside the documented bounds.
    #[error("{0} is out of bounds")]
    OutOfBounds(&'static str),
}

/// Settings of one connection. Shared as `Arc<Config>` by every connection of a node.
///
/// Every limit has a safe default; each setter documents it and what memory it can cost.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) name: String,
    pub(crate) codecs: u8,
    pub(crate) max_frame_size: u32,
    pub(crate) max_message_size: u32,
    pub(crate) channel_window: u32,
    pub(crate) connection_window: u32,
    pub(crate) max_channels: u32,
    pub(crate) max_reassembly: usize,
    pub(crate) heartbeat: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) control_budget: (u32, u32),
    pub(crate) compression: Vec<Compression>,
    pub(crate) checksum: bool,
    pub(crate) checksum_if_asked: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "slic".to_owned(),
            codecs: CodecId::ALL.iter().fold(0, |m, c| m | c.mask_bit()),
            max_frame_size: 256 << 10,
            max_message_size: 16 << 20,
            channel_window: 1 << 20,
            connection_window: 4 << 20,
            max_channels: 256,
            max_reassembly: 64 << 20,
            heartbeat: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            control_budget: (2_000, 1_000),
            compression: Vec::new(),
            checksum: false,
            checksum_if_asked: false,
        }
    }
}

impl Config {
    /// The node name sent in the handshake. Default `"slic"`.
    ///
    /// # Errors
    ///
    /// Empty or longer than 255 bytes.
    pub fn name(&mut self, name: impl Into<String>) -> Result<&mut Self, ConfigError> {
        let name = name.into();
        if !handshake::validate_name(&name) {
            return Err(ConfigError::OutOfBounds("name"));
        }
        self.name = name;
        Ok(self)
    }

    /// The node name.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// Largest frame payload accepted from the peer. Default 256 KiB, range 1 KiB ..= 16 MiB.
    ///
    /// # DoS mitigation
    ///
    /// A declared length above it is refused from the header alone; the read buffer never
    /// grows beyond one frame of this size.
    ///
    /// # Errors
    ///
    /// Outside the range.
    pub fn max_frame_size(&mut self, v: u32) -> Result<&mut Self, ConfigError> {
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&v) {
            return Err(ConfigError::OutOfBounds("max_frame_size"));
        }
        self.max_frame_size = v;
        Ok(self)
    }

    /// Largest message (after reassembly of its fragments) accepted from the peer. Default
    /// 16 MiB, at least 1 KiB.
    ///
    /// # Errors
    ///
    /// Below 1 KiB.
    pub fn max_message_size(&mut self, v: u32) -> Result<&mut Self, ConfigError> {
        if v < MIN_FRAME_SIZE {
            return Err(ConfigError::OutOfBounds("max_message_size"));
        }
        self.max_message_size = v;
        Ok(self)
    }

    /// The peer's largest message, for a caller checking before it serializes.
    pub fn message_size_limit(&self) -> u32 {
        self.max_message_size
    }

    /// The largest frame payload this side accepts.
    pub fn frame_size_limit(&self) -> u32 {
        self.max_frame_size
    }

    /// Credit granted to the peer per channel: bytes (frame headers included) it may send on
    /// one channel before the application here has consumed them. Default 1 MiB.
    ///
    /// # Errors
    ///
    /// Outside 1 KiB ..= 2^31 - 1.
    pub fn channel_window(&mut self, v: u32) -> Result<&mut Self, ConfigError> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&v) {
            return Err(ConfigError::OutOfBounds("channel_window"));
        }
        self.channel_window = v;
        Ok(self)
    }

    /// Credit granted to the peer for the whole connection. Default 4 MiB.
    ///
    /// # DoS mitigation
    ///
    /// Bounds the unconsumed messages one peer can make this side hold.
    ///
    /// # Errors
    ///
    /// Outside 1 KiB ..= 2^31 - 1.
    pub fn connection_window(&mut self, v: u32) -> Result<&mut Self, ConfigError> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&v) {
            return Err(ConfigError::OutOfBounds("connection_window"));
        }
        self.connection_window = v;
        Ok(self)
    }

    /// Most channels the peer may keep open at once. Default 256; further opens are refused
    /// with CHANNEL_REFUSED, and a peer holding more than twice this many is disconnected.
    pub fn max_channels(&mut self, v: u32) -> &mut Self {
        self.max_channels = v;
        self
    }

    /// Most bytes of partially received (fragmented) messages held at once per connection.
    /// Default 64 MiB; a peer exceeding it is disconnected with MESSAGE_TOO_LARGE.
    ///
    /// # DoS mitigation
    ///
    /// The credit of non-final fragments is returned as soon as they are buffered (so that a
    /// message larger than the window can pass), so this is what bounds reassembly memory.
    pub fn max_reassembly(&mut self, v: usize) -> &mut Self {
        self.max_reassembly = v;
        self
    }

    /// Keepalive interval: a PING goes out after this long without sending, and the peer is
    /// declared dead after three intervals of silence. Default 10 s; zero disables it (the
    /// peer's interval then applies, if it has one).
    ///
    /// # Errors
    ///
    /// Longer than `u32::MAX` milliseconds.
    pub fn heartbeat(&mut self, v: Duration) -> Result<&mut Self, ConfigError> {
        if u32::try_from(v.as_millis()).is_err() {
            return Err(ConfigError::OutOfBounds("heartbeat"));
        }
        self.heartbeat = v;
        Ok(self)
    }

    /// Compression algorithms this side accepts, most preferred first. Default: none. A
    /// client offers them in its HELLO; a server picks its most preferred one that the client
    /// offered. Nodes with no algorithm in common do not compress.
    ///
    /// # Errors
    ///
    /// More than 8 algorithms.
    pub fn compression(&mut self, algorithms: &[Compression]) -> Result<&mut Self, ConfigError> {
        if algorithms.len() > handshake::MAX_COMPRESSION_OFFERS {
            return Err(ConfigError::OutOfBounds("compression"));
        }
        self.compression = algorithms.to_vec();
        Ok(self)
    }

    /// Whether to ask for a CRC-32 trailer on every frame after the handshake, so that a
    /// frame damaged in transit is a CORRUPT_FRAME error instead of wrong data delivered.
    /// Used only when both sides ask. Default `false` in this core; `slic` turns it on for
    /// plain TCP across a network (not on loopback, and not on TLS, which already
    /// authenticates every record).
    pub fn checksum(&mut self, on: bool) -> &mut Self {
        self.checksum = on;
        self
    }

    /// Whether this side asks for frame checksums (see [`checksum`](Self::checksum)).
    pub fn wants_checksum(&self) -> bool {
        self.checksum
    }

    /// On the server side of a connection: when [`checksum`](Self::checksum) is off, ask for
    /// frame checksums anyway if the client's HELLO asks for them, so that the client's wish
    /// decides. Default `false`. `slic` sets it for loopback connections, where the client's
    /// side may know better: a server reached through a local TCP forwarder sees a loopback
    /// peer while the client's bytes crossed a network. A client ignores it (it speaks
    /// first, before it knows the server's wish).
    pub fn checksum_if_asked(&mut self, on: bool) -> &mut Self {
        self.checksum_if_asked = on;
        self
    }

    /// Whether a server asks for frame checksums when the client does (see
    /// [`checksum_if_asked`](Self::checksum_if_asked)).
    pub fn follows_checksum(&self) -> bool {
        self.checksum_if_asked
    }

    /// The handshake deadline, for drivers that run a transport handshake (TLS) within it.
    pub fn handshake_deadline(&self) -> Duration {
        self.handshake_timeout
    }

    /// Budget for cheap control frames from the peer (PING, PONG, CHANNEL_OPEN,
    /// CHANNEL_CLOSE, CANCEL): a token bucket of `burst` frames refilled at `per_second`.
    /// Default 2,000 and 1,000/s. A peer that exceeds it is sent GOAWAY with
    /// ENHANCE_YOUR_CALM and disconnected.
    ///
    /// # DoS mitigation
    ///
    /// Each of these frames costs the peer 20 bytes and this side real work (a PONG, a
    /// channel's state, a task to abort); without a budget a peer could keep a core busy.
    pub fn control_budget(&mut self, burst: u32, per_second: u32) -> &mut Self {
        self.control_budget = (burst, per_second);
        self
    }

    /// Deadline for the handshake, counted from the connection's creation. Default 10 s.
    ///
    /// # DoS mitigation
    ///
    /// Runs even when the peer sends nothing, so silent or trickling connections are closed.
    pub fn handshake_timeout(&mut self, v: Duration) -> &mut Self {
        self.handshake_timeout = v;
        self
    }
}
