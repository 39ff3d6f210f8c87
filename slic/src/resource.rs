//! Named resources: request/response calls with a status (SLIC's `create_resource` /
//! `get_resource`), and their wire encoding (PROTOCOL.md, "Requests and responses").

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use slic_proto::CodecId;

use crate::codec::{self, Codec};
use crate::error::Error;
use crate::node::PeerInfo;

/// Longest resource name, in bytes (it travels behind a one-byte length).
pub const MAX_RESOURCE_NAME: usize = 255;
/// Longest status detail kept, in bytes.
const MAX_DETAIL: usize = 1024;

/// The outcome of a request that did not succeed, as the caller sees it in
/// [`Error::Status`]; handlers return it to refuse a request.
///
/// # Examples
///
/// ```
/// use slic::Status;
/// let refused = Status::BadRequest("a must be positive".into());
/// assert_eq!(refused.code(), 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The payload does not decode into the handler's type, or the handler refused it.
    BadRequest(String),
    /// No resource of that name.
    NotFound(String),
    /// The handler failed or panicked.
    Internal(String),
    /// The caller's deadline passed.
    Timeout,
    /// The server cannot take the request now (shutting down, too many requests in flight,
    /// connection lost).
    Unavailable(String),
    /// Too many requests; try again after this long.
    RateLimited {
        /// How long to wait before retrying.
        retry_after: Duration,
    },
    /// The request was cancelled.
    Cancelled,
    /// A status code this version does not know.
    Other {
        /// Wire code.
        code: u16,
        /// Detail text.
        detail: String,
    },
}

impl Status {
    /// The wire code (0 is success and never a `Status`).
    pub fn code(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 1,
            Self::NotFound(_) => 2,
            Self::Internal(_) => 3,
            Self::Timeout => 4,
            Self::Unavailable(_) => 5,
            Self::RateLimited { .. } => 6,
            Self::Cancelled => 7,
            Self::Other { code, .. } => *code,
        }
    }

    pub(crate) fn detail(&self) -> &str {
        match self {
            Self::BadRequest(d)
            | Self::NotFound(d)
            | Self::Internal(d)
            | Self::Unavailable(d)
            | Self::Other { detail: d, .. } => d,
            Self::Timeout | Self::RateLimited { .. } | Self::Cancelled => "",
        }
    }

    pub(crate) fn from_wire(code: u16, extra: u32, detail: String) -> Self {
        match code {
            1 => Self::BadRequest(detail),
            2 => Self::NotFound(detail),
            3 => Self::Internal(detail),
            4 => Self::Timeout,
            5 => Self::Unavailable(detail),
            6 => Self::RateLimited {
                retry_after: Duration::from_millis(u64::from(extra)),
            },
            7 => Self::Cancelled,
            code => Self::Other { code, detail },
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest(d) => write!(f, "bad request: {d}"),
            Self::NotFound(d) => write!(f, "not found: {d}"),
            Self::Internal(d) => write!(f, "internal error: {d}"),
            Self::Timeout => write!(f, "timed out"),
            Self::Unavailable(d) => write!(f, "unavailable: {d}"),
            Self::RateLimited { retry_after } => {
                write!(f, "rate limited: retry after {retry_after:?}")
            }
            Self::Cancelled => write!(f, "cancelled"),
            Self::Other { code, detail } => write!(f, "status {code}: {detail}"),
        }
    }
}

impl std::error::Error for Status {}

/// A request as a resource handler sees it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Request<T> {
    /// The decoded payload.
    pub body: T,
    /// Who called.
    pub from: PeerInfo,
    /// The resource name called.
    pub resource: Arc<str>,
}

pub(crate) type Reply = Result<(CodecId, Bytes), Status>;
pub(crate) type BoxReply = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A handler with its types erased: decodes, runs, encodes the reply in the caller's codec.
pub(crate) type Handler = Arc<dyn Fn(PeerInfo, Arc<str>, CodecId, Bytes) -> BoxReply + Send + Sync>;

pub(crate) fn erase<T, R, F, Fut>(fallback: Codec, f: F) -> Handler
where
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(Request<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, Status>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |from, resource, codec_id, body| {
        let f = f.clone();
        Box::pin(async move {
            let body: T =
                codec::decode(codec_id, &body).map_err(|e| Status::BadRequest(e.to_string()))?;
            let reply = f(Request {
                body,
                from,
                resource,
            })
            .await?;
            // The reply goes back in the caller's codec, so a JSON caller reads JSON.
            let codec = Codec::from_id(codec_id).unwrap_or(fallback);
            let bytes = codec
                .encode(&reply)
                .map_err(|e| Status::Internal(e.to_string()))?;
            Ok((codec.id(), bytes))
        })
    })
}

/// The resources a node serves.
#[derive(Default)]
pub(crate) struct Registry {
    map: RwLock<HashMap<Arc<str>, Handler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Arc<str>, Handler>> {
        // Never held across user code or an await: a poisoned lock still holds a valid map.
        self.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Handler> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(crate) fn insert(&self, name: &str, h: Handler) -> Result<(), Error> {
        validate_name(name)?;
        let mut map = self.write();
        if map.contains_key(name) {
            return Err(Error::ResourceExists(name.to_owned()));
        }
        map.insert(Arc::from(name), h);
        Ok(())
    }

    pub(crate) fn replace(&self, name: &str, h: Handler) -> Result<(), Error> {
        let mut map = self.write();
        let slot = map
            .get_mut(name)
            .ok_or_else(|| Error::Status(Status::NotFound(name.to_owned())))?;
        *slot = h;
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> bool {
        self.write().remove(name).is_some()
    }

    pub(crate) fn clear(&self) {
        self.write().clear();
    }
}

pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_RESOURCE_NAME {
        return Err(Error::Config(format!(
            "resource name must be 1 to {MAX_RESOURCE_NAME} bytes"
        )));
    }
    Ok(())
}

/// REQUEST payload: name length (u8), name, body encoded by the frame's codec.
pub(crate) fn encode_request<T: Serialize + ?Sized>(
    codec: Codec,
    name: &str,
    body: &T,
) -> Result<Bytes, Error> {
    validate_name(name)?;
    let encoded = codec.encode(body)?;
    let mut b = BytesMut::with_capacity(1 + name.len() + encoded.len());
    b.put_u8(name.len() as u8);
    b.put_slice(name.as_bytes());
    b.put_slice(&encoded);
    Ok(b.freeze())
}

/// Splits a REQUEST payload into the resource name and the body (sharing the buffer).
pub(crate) fn decode_request(mut payload: Bytes) -> Result<(String, Bytes), Status> {
    let bad = || Status::BadRequest("malformed request header".into());
    let len = usize::from(*payload.first().ok_or_else(bad)?);
    if len == 0 || payload.len() < 1 + len {
        return Err(bad());
    }
    payload.advance(1);
    let name = payload.split_to(len);
    let name = std::str::from_utf8(&name).map_err(|_| bad())?.to_owned();
    Ok((name, payload))
}

/// RESPONSE payload: status (u16), extra (u32: retry-after in ms), detail length (u16),
/// detail (UTF-8), body.
pub(crate) fn encode_response(reply: &Reply) -> (CodecId, Bytes) {
    let (status, codec, body) = match reply {
        Ok((codec, body)) => (None, *codec, body.clone()),
        Err(s) => (Some(s), CodecId::Raw, Bytes::new()),
    };
    let code = status.map_or(0, Status::code);
    let extra = match status {
        Some(Status::RateLimited { retry_after }) => {
            u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX)
        }
        _ => 0,
    };
    let detail = status.map_or("", Status::detail);
    let mut end = detail.len().min(MAX_DETAIL);
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    let detail = &detail[..end];
    let mut b = BytesMut::with_capacity(8 + detail.len() + body.len());
    b.put_u16(code);
    b.put_u32(extra);
    b.put_u16(detail.len() as u16);
    b.put_slice(detail.as_bytes());
    b.put_slice(&body);
    (codec, b.freeze())
}

/// Parses a RESPONSE payload: the body on success, the status otherwise.
pub(crate) fn decode_response(mut payload: Bytes) -> Result<Bytes, Status> {
    let bad = || Status::Internal("malformed response from peer".into());
    let Some(head) = payload.first_chunk::<8>() else {
        return Err(bad());
    };
    let mut h = &head[..];
    let code = h.get_u16();
    let extra = h.get_u32();
    let detail_len = usize::from(h.get_u16());
    payload.advance(8);
    if payload.len() < detail_len {
        return Err(bad());
    }
    let detail = payload.split_to(detail_len);
    if code == 0 {
        return Ok(payload);
    }
    let detail = String::from_utf8_lossy(&detail).into_owned();
    Err(Status::from_wire(code, extra, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips_and_rejects_garbage() {
        let p = encode_request(Codec::Json, ":add", &serde_json::json!({"a": 10})).unwrap();
        let (name, body) = decode_request(p).unwrap();
        assert_eq!(name, ":add");
        assert_eq!(&body[..], br#"{"a":10}"#);
        for bad in [&b""[..], b"\x00", b"\x05ab", b"\x02\xff\xfe"] {
            assert!(
                decode_request(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_status_survives_the_wire() {
        let all = [
            Status::BadRequest("b".into()),
            Status::NotFound("n".into()),
            Status::Internal("i".into()),
            Status::Timeout,
            Status::Unavailable("u".into()),
            Status::RateLimited {
                retry_after: Duration::from_millis(1500),
            },
            Status::Cancelled,
            Status::Other {
                code: 99,
                detail: "x".into(),
            },
        ];
        for s in all {
            let (_, p) = encode_response(&Err(s.clone()));
            assert_eq!(decode_response(p), Err(s));
        }
        let (_, p) = encode_response(&Ok((CodecId::Json, Bytes::from_static(b"{}"))));
        assert_eq!(decode_response(p).unwrap(), Bytes::from_static(b"{}"));
        assert!(decode_response(Bytes::from_static(b"\x00\x01")).is_err());
        assert!(decode_response(Bytes::from_static(b"\x00\x01\x00\x00\x00\x00\xff\xff")).is_err());
    }
}
