//! Serialization: the serde codecs a node can send with, and decoding by the codec a frame names.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use slic_proto::CodecId;

use crate::error::Error;

/// The serialization format a node uses for what it sends.
///
/// Every frame carries the codec that encoded it and a receiver always decodes with that one,
/// so nodes with different codecs interoperate as long as the types match: a JSON sender and
/// a postcard receiver understand each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// postcard: compact binary, the fastest; not self-describing. The default. It checks the
    /// shape of what it decodes, not its types: an `i32` decoded as `u32` gives a different
    /// number, not an error, so both sides must agree on the exact types.
    #[default]
    Postcard,
    /// MessagePack (rmp-serde), with field names: self-describing and compact.
    MessagePack,
    /// JSON (serde_json): readable, and what the command line speaks.
    Json,
}

impl Codec {
    /// The id written in frame headers.
    pub fn id(self) -> CodecId {
        match self {
            Self::Postcard => CodecId::Postcard,
            Self::MessagePack => CodecId::MessagePack,
            Self::Json => CodecId::Json,
        }
    }

    /// The serde codec a frame's codec id names; `None` for raw bytes.
    pub fn from_id(id: CodecId) -> Option<Self> {
        match id {
            CodecId::Postcard => Some(Self::Postcard),
            CodecId::MessagePack => Some(Self::MessagePack),
            CodecId::Json => Some(Self::Json),
            _ => None,
        }
    }

    /// Serializes `value`.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] when serde refuses the value.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, Error> {
        let bytes = match self {
            Self::Postcard => {
                postcard::to_stdvec(value).map_err(|e| Error::Encode(e.to_string()))?
            }
            Self::MessagePack => {
                rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))?
            }
            Self::Json => serde_json::to_vec(value).map_err(|e| Error::Encode(e.to_string()))?,
        };
        Ok(Bytes::from(bytes))
    }
}

/// Deserializes `bytes` with the codec named by `id`.
///
/// # Errors
///
/// [`Error::Decode`] when the bytes do not decode into `T`, or the message was sent as raw
/// bytes (read those with [`crate::Message::body`]).
pub(crate) fn decode<T: DeserializeOwned>(id: CodecId, bytes: &[u8]) -> Result<T, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Decode(e.to_string());
    match id {
        CodecId::Postcard => postcard::from_bytes(bytes).map_err(|e| err(&e)),
        CodecId::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| err(&e)),
        CodecId::Json => serde_json::from_slice(bytes).map_err(|e| err(&e)),
        _ => Err(Error::Decode(
            "message was sent as raw bytes; read it with Message::body".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Add {
        a: i64,
        tag: String,
    }

    #[test]
    fn every_codec_round_trips_a_struct() {
        let v = Add {
            a: -7,
            tag: "x".into(),
        };
        for c in [Codec::Postcard, Codec::MessagePack, Codec::Json] {
            let b = c.encode(&v).unwrap();
            assert_eq!(decode::<Add>(c.id(), &b).unwrap(), v, "{c:?}");
        }
    }

    #[test]
    fn decoding_the_wrong_shape_is_an_error_not_a_panic() {
        let b = Codec::Json.encode(&"text").unwrap();
        assert!(matches!(
            decode::<Add>(CodecId::Json, &b),
            Err(Error::Decode(_))
        ));
        assert!(matches!(
            decode::<Add>(CodecId::Postcard, &[0xff; 3]),
            Err(Error::Decode(_))
        ));
        assert!(matches!(
            decode::<u8>(CodecId::Raw, b"x"),
            Err(Error::Decode(_))
        ));
    }
}
