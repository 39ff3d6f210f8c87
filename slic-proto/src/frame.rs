//! Frame layout and the frame decoder (PROTOCOL.md, "Frame header").
//!
//! Every frame is a fixed 20-byte header followed by `length` payload bytes. The decoder checks
//! the declared length against its limit from the header alone, before buffering any payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 20;

/// Protocol version written in every v1 frame header.
pub const VERSION: u8 = 1;

/// Size of the CRC-32 trailer frames carry once both sides agreed on checksums.
pub const CHECKSUM_LEN: usize = 4;

/// The frame trailer: CRC-32 (IEEE, as in Ethernet and zlib) of the header and the payload,
/// big-endian.
pub fn checksum(header: &[u8], payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize().to_be_bytes()
}

/// Largest payload accepted before the handshake has negotiated a limit. HELLO and WELCOME are
/// far smaller than this; a bigger declared length is refused from the header alone.
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 1024;

/// The kind of a frame (PROTOCOL.md, "Frame types").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameType {
    /// Client's opening handshake frame.
    Hello = 1,
    /// Server's answer to HELLO.
    Welcome = 2,
    /// One fragment (or the whole) of an application message.
    Message = 3,
    /// A request to a named resource.
    Request = 4,
    /// The response to a request.
    Response = 5,
    /// Reserved: message acknowledgement.
    Ack = 6,
    /// Opens a channel.
    ChannelOpen = 7,
    /// Closes a channel.
    ChannelClose = 8,
    /// Returns flow-control credit.
    WindowUpdate = 9,
    /// Keepalive probe.
    Ping = 10,
    /// Answer to PING.
    Pong = 11,
    /// Graceful close.
    GoAway = 12,
    /// Fatal protocol error.
    Error = 13,
    /// Cancels a request.
    Cancel = 14,
}

impl FrameType {
    /// Maps a wire byte to a frame type; `None` for unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Message,
            4 => Self::Request,
            5 => Self::Response,
            6 => Self::Ack,
            7 => Self::ChannelOpen,
            8 => Self::ChannelClose,
            9 => Self::WindowUpdate,
            10 => Self::Ping,
            11 => Self::Pong,
            12 => Self::GoAway,
            13 => Self::Error,
            14 => Self::Cancel,
            _ => return None,
        })
    }

    /// Flag bits that v1 defines for this type; any other bit set is a protocol error.
    pub fn allowed_flags(self) -> u8 {
        match self {
            Self::Message | Self::Request | Self::Response => flags::MORE | flags::COMPRESSED,
            Self::WindowUpdate => flags::CONNECTION,
            _ => 0,
        }
    }

    /// Whether v1 reserves this type for a later version (receiving one is an error).
    pub fn is_reserved(self) -> bool {
        matches!(self, Self::Ack)
    }

    /// Whether frames of this type carry application data: flow-controlled, fragmentable and
    /// tagged with a codec (MESSAGE, REQUEST, RESPONSE).
    pub fn is_data(self) -> bool {
        matches!(self, Self::Message | Self::Request | Self::Response)
    }
}

/// Flag bits of the header's `flags` byte.
pub mod flags {
    /// MESSAGE, REQUEST, RESPONSE: another fragment follows on the same channel.
    pub const MORE: u8 = 0b0000_0001;
    /// MESSAGE: reserved for acknowledgements (must be 0 in v1).
    pub const ACK_REQUESTED: u8 = 0b0000_0010;
    /// MESSAGE, REQUEST, RESPONSE: the payload is compressed with the negotiated algorithm
    /// (only allowed when the handshake agreed on one).
    pub const COMPRESSED: u8 = 0b0000_0100;
    /// WINDOW_UPDATE: the increment is for the connection window.
    pub const CONNECTION: u8 = 0b0000_0001;
}

/// How a message payload was serialized; travels in every MESSAGE header so that a receiver
/// decodes with the sender's codec whatever its own default is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CodecId {
    /// Raw bytes, no serialization.
    Raw = 0,
    /// postcard (compact binary serde format), slic's default.
    #[default]
    Postcard = 1,
    /// MessagePack through rmp-serde.
    MessagePack = 2,
    /// JSON through serde_json.
    Json = 3,
}

impl CodecId {
    /// All codecs v1 defines.
    pub const ALL: [Self; 4] = [Self::Raw, Self::Postcard, Self::MessagePack, Self::Json];

    /// Maps a wire byte to a codec; `None` for unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// The bit of this codec in the handshake's codec mask.
    pub fn mask_bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A decoded frame header (PROTOCOL.md, "Frame header").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub ty: FrameType,
    /// Flag bits, already checked against [`FrameType::allowed_flags`].
    pub flags: u8,
    /// Codec of the payload (MESSAGE), otherwise [`CodecId::Raw`].
    pub codec: CodecId,
    /// Channel id.
    pub channel: u32,
    /// Message id, ping id, or 0.
    pub id: u64,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// A header for a frame with no codec and no flags.
    pub fn control(ty: FrameType, channel: u32, id: u64, len: u32) -> Self {
        Self {
            ty,
            flags: 0,
            codec: CodecId::Raw,
            channel,
            id,
            len,
        }
    }

    /// Writes the 20 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = &mut out[..];
        w.put_u8(VERSION);
        w.put_u8(self.ty as u8);
        w.put_u8(self.flags);
        w.put_u8(self.codec as u8);
        w.put_u32(self.channel);
        w.put_u64(self.id);
        w.put_u32(self.len);
        out
    }

    /// Parses and validates a header. `max_payload` is the receiver's current limit.
    ///
    /// # Errors
    ///
    /// A wrong version, an unknown type, an undefined flag, an unknown codec, a channel on a
    /// connection-level frame or a length above `max_payload`.
    pub fn decode(raw: &[u8; HEADER_LEN], max_payload: u32) -> Result<Self, DecodeError> {
        let mut r = &raw[..];
        let version = r.get_u8();
        let ty = r.get_u8();
        let flags = r.get_u8();
        let codec = r.get_u8();
        let channel = r.get_u32();
        let id = r.get_u64();
        let len = r.get_u32();
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        // The length is checked before anything else that could make us wait for the payload:
        // a hostile length is refused from the header alone.
        if len > max_payload {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: max_payload,
            });
        }
        let ty = FrameType::from_u8(ty).ok_or(DecodeError::UnknownFrameType(ty))?;
        if ty.is_reserved() {
            return Err(DecodeError::UnknownFrameType(ty as u8));
        }
        if flags & !ty.allowed_flags() != 0 {
            return Err(DecodeError::ReservedFlags { ty, flags });
        }
        let codec = CodecId::from_u8(codec).ok_or(DecodeError::UnknownCodec(codec))?;
        if !ty.is_data() && codec != CodecId::Raw {
            return Err(DecodeError::UnknownCodec(codec as u8));
        }
        let channel_ok = match ty {
            FrameType::Hello
            | FrameType::Welcome
            | FrameType::Ping
            | FrameType::Pong
            | FrameType::GoAway
            | FrameType::Error
            | FrameType::Cancel => channel == 0,
            FrameType::WindowUpdate if flags & flags::CONNECTION != 0 => channel == 0,
            _ => true,
        };
        if !channel_ok {
            return Err(DecodeError::UnexpectedChannel { ty, channel });
        }
        Ok(Self {
            ty,
            flags,
            codec,
            channel,
            id,
            len,
        })
    }
}

/// A whole frame: header and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header; `header.len == payload.len()`.
    pub header: Header,
    /// The payload bytes, shared with the receive buffer (no copy).
    pub payload: Bytes,
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.payload.len());
        out.put_slice(&self.header.encode());
        out.put_slice(&self.payload);
    }
}

/// Splits a byte stream into frames, refusing any frame whose declared length exceeds the limit.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_payload: u32,
    checksum: bool,
}

impl Decoder {
    /// A decoder whose payload limit is `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            checksum: false,
        }
    }

    /// The current payload limit.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Changes the payload limit (after the handshake has negotiated one).
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload;
    }

    /// Expects every further frame to end in a CRC-32 trailer over its header and payload
    /// (PROTOCOL.md, "Frame checksum"), and refuses frames whose trailer does not match.
    pub fn set_checksum(&mut self, on: bool) {
        self.checksum = on;
    }

    /// Takes one frame off the front of `buf`. `Ok(None)` means more bytes are needed; the
    /// buffer is left untouched then. The payload is split off `buf` without copying.
    ///
    /// # Errors
    ///
    /// See [`Header::decode`]. After an error the stream cannot be resynchronised.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::decode(raw, self.max_payload)?;
        // `len <= max_payload <= u32::MAX`, so this sum cannot overflow a 64-bit usize; use
        // checked arithmetic anyway so 32-bit targets are safe too.
        let trailer = if self.checksum { CHECKSUM_LEN } else { 0 };
        let total = usize::try_from(header.len)
            .ok()
            .and_then(|len| len.checked_add(HEADER_LEN + trailer))
            .ok_or(DecodeError::FrameTooLarge {
                len: header.len,
                max: self.max_payload,
            })?;
        if buf.len() < total {
            // Reserve only what the (already bounded) frame needs.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        if self.checksum {
            let body = total - CHECKSUM_LEN;
            let mut expected = [0u8; CHECKSUM_LEN];
            expected.copy_from_slice(&buf[body..total]);
            if checksum(&buf[..HEADER_LEN], &buf[HEADER_LEN..body]) != expected {
                return Err(DecodeError::ChecksumMismatch);
            }
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(total - HEADER_LEN - trailer).freeze();
        buf.advance(trailer);
        Ok(Some(Frame { header, payload }))
    }
}

impl From<&DecodeError> for ErrorCode {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::UnsupportedVersion(_) => Self::UnsupportedVersion,
            DecodeError::FrameTooLarge { .. } => Self::FrameTooLarge,
            DecodeError::ChecksumMismatch => Self::CorruptFrame,
            DecodeError::UnknownFrameType(_) => Self::UnknownFrame,
            DecodeError::ReservedFlags { .. }
            | DecodeError::UnknownCodec(_)
            | DecodeError::UnexpectedChannel { .. } => Self::ProtocolError,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn message(channel: u32, id: u64, more: bool, payload: &[u8]) -> Frame {
        Frame {
            header: Header {
                ty: FrameType::Message,
                flags: if more { flags::MORE } else { 0 },
                codec: CodecId::Json,
                channel,
                id,
                len: payload.len() as u32,
            },
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn header_layout_matches_protocol_md() {
        let f = message(0, 1, false, b"\"hi\"");
        let mut out = BytesMut::new();
        f.encode_into(&mut out);
        assert_eq!(
            &out[..],
            &[
                1, 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, b'"', b'h', b'i', b'"'
            ]
        );
    }

    #[test]
    fn decoder_rejects_length_above_max_frame_from_header_alone() {
        let mut d = Decoder::new(1024);
        let mut h = Header::control(FrameType::Ping, 0, 0, 0).encode();
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut buf = BytesMut::from(&h[..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(DecodeError::FrameTooLarge { len: u32::MAX, .. })
        ));
        assert!(
            buf.capacity() < 4096,
            "nothing reserved for a refused frame"
        );
    }

    #[test]
    fn decoder_waits_for_more_bytes_without_consuming() {
        let mut d = Decoder::new(1024);
        let mut all = BytesMut::new();
        message(3, 9, false, b"abcdef").encode_into(&mut all);
        let mut buf = BytesMut::from(&all[..10]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 10);
        buf.extend_from_slice(&all[10..]);
        let f = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&f.payload[..], b"abcdef");
        assert!(buf.is_empty());
    }

    #[test]
    fn decoder_rejects_bad_version_type_flags_codec_and_channel() {
        let good = Header::control(FrameType::Ping, 0, 7, 0).encode();
        let cases: [(usize, u8); 6] = [(0, 2), (1, 0), (1, 200), (1, 6), (2, 1), (3, 1)];
        for (at, v) in cases {
            let mut raw = good;
            raw[at] = v;
            assert!(Header::decode(&raw, 1024).is_err(), "byte {at} = {v}");
        }
        let mut raw = good;
        raw[7] = 1; // PING on channel 1
        assert!(matches!(
            Header::decode(&raw, 1024),
            Err(DecodeError::UnexpectedChannel { .. })
        ));
        let mut raw = message(1, 1, false, b"").header.encode();
        raw[2] = flags::ACK_REQUESTED;
        assert!(matches!(
            Header::decode(&raw, 1024),
            Err(DecodeError::ReservedFlags { .. })
        ));
        raw[2] = 0;
        raw[3] = 4;
        assert!(matches!(
            Header::decode(&raw, 1024),
            Err(DecodeError::UnknownCodec(4))
        ));
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            0usize..4,
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(channel, id, more, codec, payload)| {
                let mut f = message(channel, id, more, &payload);
                f.header.codec = CodecId::ALL[codec];
                f
            })
    }

    proptest! {
        #[test]
        fn encode_decode_is_identity(frames in proptest::collection::vec(arb_frame(), 1..20)) {
            let mut buf = BytesMut::new();
            for f in &frames {
                f.encode_into(&mut buf);
            }
            let mut d = Decoder::new(1024);
            for f in &frames {
                let got = d.decode(&mut buf).unwrap();
                prop_assert_eq!(got.as_ref(), Some(f));
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn decoding_is_independent_of_split_points(
            frames in proptest::collection::vec(arb_frame(), 1..10),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode_into(&mut wire);
            }
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut d = Decoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut prev = 0;
            for p in points {
                buf.extend_from_slice(&wire[prev..p]);
                prev = p;
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = Decoder::new(1024);
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..200 {
                match d.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
