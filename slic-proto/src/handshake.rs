//! HELLO and WELCOME payloads (PROTOCOL.md, "HELLO / WELCOME payload").

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::ErrorCode;

/// The four bytes every HELLO and WELCOME payload starts with.
pub const MAGIC: [u8; 4] = *b"SLIC";

/// Fixed part of the payload, before the compression list and the name.
const FIXED_LEN: usize = 33;

/// Most compression algorithms a HELLO may offer.
pub const MAX_COMPRESSION_OFFERS: usize = 8;

/// Longest node name in bytes (the length travels in one byte).
pub const MAX_NAME_LEN: usize = 255;

/// Smallest maximum frame size a peer may declare.
pub const MIN_FRAME_SIZE: u32 = 1024;
/// Largest maximum frame size a peer may declare (16 MiB).
pub const MAX_FRAME_SIZE: u32 = 16 << 20;
/// Smallest window a peer may grant.
pub const MIN_WINDOW: u32 = 1024;
/// Largest window (2^31 - 1, as in HTTP/2).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The parameters one side declares in its HELLO (client) or WELCOME (server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// HELLO: highest version spoken; WELCOME: version chosen.
    pub version: u8,
    /// Bit i set: this side decodes codec i.
    pub codecs: u8,
    /// Largest frame payload this side accepts.
    pub max_frame_size: u32,
    /// Largest reassembled message this side accepts.
    pub max_message_size: u32,
    /// Initial credit granted per channel.
    pub channel_window: u32,
    /// Initial credit granted for the connection.
    pub connection_window: u32,
    /// Most channels the peer may keep open on this side.
    pub max_channels: u32,
    /// Keepalive interval in milliseconds, 0 for none.
    pub heartbeat_ms: u32,
    /// Compression algorithm ids, in preference order.
    pub compression: Vec<u8>,
    /// The node's name.
    pub name: String,
    /// This side wants a CRC-32 trailer on every frame after the handshake (flag bit 0);
    /// checksums are used when both sides want them.
    pub checksum: bool,
}

/// HELLO/WELCOME flag: the sender wants frame checksums.
pub const FLAG_CHECKSUM: u8 = 0b0000_0001;

/// Why a HELLO or WELCOME payload is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// Payload shorter than its fields say.
    #[error("handshake payload truncated")]
    Truncated,
    /// Magic bytes wrong.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Version 0 or otherwise unusable.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Reserved flags set.
    #[error("reserved handshake flags {0:#04x}")]
    ReservedFlags(u8),
    /// Empty, too long or not UTF-8.
    #[error("bad node name")]
    BadName,
    /// A limit outside its allowed range, or raw bytes not decodable.
    #[error("handshake parameter out of range: {0}")]
    OutOfRange(&'static str),
}

impl HelloError {
    /// The code sent to the peer in the ERROR frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Truncated | Self::ReservedFlags(_) => ErrorCode::ProtocolError,
            Self::BadMagic(_) => ErrorCode::BadMagic,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::BadName => ErrorCode::BadName,
            Self::OutOfRange(_) => ErrorCode::HandshakeFailed,
        }
    }
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FIXED_LEN + self.compression.len() + self.name.len());
        b.put_slice(&MAGIC);
        b.put_u8(self.version);
        b.put_u8(self.codecs);
        b.put_u8(if self.checksum { FLAG_CHECKSUM } else { 0 });
        // Names are validated where they are set; clamp defensively so the length byte is right.
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME_LEN)];
        b.put_u8(name.len() as u8);
        b.put_u32(self.max_frame_size);
        b.put_u32(self.max_message_size);
        b.put_u32(self.channel_window);
        b.put_u32(self.connection_window);
        b.put_u32(self.max_channels);
        b.put_u32(self.heartbeat_ms);
        let comp = &self.compression[..self.compression.len().min(MAX_COMPRESSION_OFFERS)];
        b.put_u8(comp.len() as u8);
        b.put_slice(comp);
        b.put_slice(name);
        b.freeze()
    }

    /// Decodes and validates a payload. Bytes after the name are ignored (extension room).
    ///
    /// # Errors
    ///
    /// Any field missing, the wrong magic, version 0, reserved flags, a bad name, or a limit
    /// outside the ranges in PROTOCOL.md.
    pub fn decode(mut p: &[u8]) -> Result<Self, HelloError> {
        let Some(fixed) = p.first_chunk::<FIXED_LEN>() else {
            return Err(HelloError::Truncated);
        };
        let mut f = &fixed[..];
        let mut magic = [0u8; 4];
        f.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(HelloError::BadMagic(magic));
        }
        let version = f.get_u8();
        let codecs = f.get_u8();
        let flags = f.get_u8();
        let name_len = usize::from(f.get_u8());
        let max_frame_size = f.get_u32();
        let max_message_size = f.get_u32();
        let channel_window = f.get_u32();
        let connection_window = f.get_u32();
        let max_channels = f.get_u32();
        let heartbeat_ms = f.get_u32();
        let comp_len = usize::from(f.get_u8());
        p.advance(FIXED_LEN);
        if version == 0 {
            return Err(HelloError::UnsupportedVersion(version));
        }
        if flags & !FLAG_CHECKSUM != 0 {
            return Err(HelloError::ReservedFlags(flags));
        }
        if comp_len > MAX_COMPRESSION_OFFERS {
            return Err(HelloError::OutOfRange("compression count"));
        }
        let (comp, rest) = p.split_at_checked(comp_len).ok_or(HelloError::Truncated)?;
        let (name, _extensions) = rest
            .split_at_checked(name_len)
            .ok_or(HelloError::Truncated)?;
        if name.is_empty() {
            return Err(HelloError::BadName);
        }
        let name = std::str::from_utf8(name).map_err(|_| HelloError::BadName)?;
        if codecs & 1 == 0 {
            return Err(HelloError::OutOfRange("codec mask lacks raw"));
        }
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&max_frame_size) {
            return Err(HelloError::OutOfRange("max_frame_size"));
        }
        if max_message_size < MIN_FRAME_SIZE {
            return Err(HelloError::OutOfRange("max_message_size"));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&channel_window) {
            return Err(HelloError::OutOfRange("channel window"));
        }
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&connection_window) {
            return Err(HelloError::OutOfRange("connection window"));
        }
        Ok(Self {
            version,
            codecs,
            max_frame_size,
            max_message_size,
            channel_window,
            connection_window,
            max_channels,
            heartbeat_ms,
            compression: comp.to_vec(),
            name: name.to_owned(),
            checksum: flags & FLAG_CHECKSUM != 0,
        })
    }
}

/// Checks a node name against the rules of PROTOCOL.md: 1 to 255 bytes of UTF-8.
pub fn validate_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Hello {
        Hello {
            version: 1,
            codecs: 0x0f,
            max_frame_size: 256 << 10,
            max_message_size: 16 << 20,
            channel_window: 1 << 20,
            connection_window: 4 << 20,
            max_channels: 256,
            heartbeat_ms: 10_000,
            compression: vec![],
            name: "pc2".into(),
            checksum: false,
        }
    }

    #[test]
    fn hello_round_trips_and_ignores_extension_bytes() {
        let h = sample();
        let mut bytes = h.encode().to_vec();
        assert_eq!(bytes.len(), 36);
        assert_eq!(Hello::decode(&bytes).unwrap(), h);
        bytes.extend_from_slice(b"future");
        assert_eq!(Hello::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn hello_rejects_bad_fields() {
        let good = sample().encode().to_vec();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Hello::decode(&b), Err(HelloError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 0;
        assert!(matches!(
            Hello::decode(&b),
            Err(HelloError::UnsupportedVersion(0))
        ));
        let mut b = good.clone();
        b[6] = 2;
        assert!(matches!(
            Hello::decode(&b),
            Err(HelloError::ReservedFlags(2))
        ));
        let mut b = good.clone();
        b[7] = 0;
        assert!(matches!(Hello::decode(&b), Err(HelloError::BadName)));
        let mut b = good.clone();
        b[7] = 200;
        assert!(matches!(Hello::decode(&b), Err(HelloError::Truncated)));
        let mut b = good.clone();
        b[33] = 0xff;
        assert!(matches!(Hello::decode(&b), Err(HelloError::BadName)));
        let mut b = good.clone();
        b[5] = 0x0e;
        assert!(matches!(Hello::decode(&b), Err(HelloError::OutOfRange(_))));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(Hello::decode(&b), Err(HelloError::OutOfRange(_))));
        assert!(matches!(
            Hello::decode(&good[..20]),
            Err(HelloError::Truncated)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_handshake_payloads_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Hello::decode(&data);
        }
    }
}
