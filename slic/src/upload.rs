//! Upload resources: a client streams a file into a server-side folder over a channel.
//!
//! The exchange, on a channel labelled [`UPLOAD_LABEL`] (PROTOCOL.md, "Uploads"):
//!
//! ```text
//! client                                   server
//!   Offer { resource, name, size }  ---->   checks resource, name, size, existing file
//!                                   <----   Answer::Accept | Answer::Refuse(status)
//!   raw chunks ...                  ---->   written to a temporary file in the folder
//!   End { blake3 digest }           ---->   size and digest checked, fsync file and folder,
//!                                           renamed into place
//!                                   <----   Done::Stored(file) | Done::Failed(status)
//! ```
//!
//! Control messages are postcard-encoded; chunks travel as raw bytes. A channel closed before
//! `End`, a size or digest mismatch, or any error removes the temporary file.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slic_proto::CodecId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::channel::Channel;
use crate::codec::{self, Codec};
use crate::error::Error;
use crate::resource::Status;

/// Label of the channels that carry uploads.
pub(crate) const UPLOAD_LABEL: &str = "slic.upload";
/// Bytes per chunk message.
const CHUNK: usize = 128 << 10;
/// How long the server waits for the next message of an upload before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of temporary files; uploads may not use it as their own name.
const TEMP_PREFIX: &str = ".slic-upload-";
/// Longest file name, in bytes (the common file-system limit).
const MAX_FILE_NAME: usize = 255;

/// Settings of an upload resource.
///
/// # Examples
///
/// ```
/// let opts = slic::UploadOptions::default().max_size(10 << 20).replace(true);
/// # let _ = opts;
/// ```
#[derive(Clone, Debug)]
pub struct UploadOptions {
    max_size: u64,
    replace: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            max_size: 1 << 30,
            replace: false,
        }
    }
}

impl UploadOptions {
    /// Largest file accepted, in bytes. Default 1 GiB. A larger offer is refused before any
    /// data is sent.
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    /// Whether an upload may replace an existing file of the same name. Default `false`:
    /// the upload is refused.
    pub fn replace(mut self, yes: bool) -> Self {
        self.replace = yes;
        self
    }
}

/// A file stored by an upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredFile {
    /// The file name inside the server's folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3 digest, lower-case hex.
    pub digest: String,
}

/// Progress callback: `(bytes sent, total bytes)`.
pub type Progress = Box<dyn Fn(u64, u64) + Send + Sync>;

/// How a client uploads: under which name, and with what progress reports.
#[derive(Default)]
pub struct UploadRequest {
    pub(crate) stored_name: Option<String>,
    pub(crate) progress: Option<Progress>,
}

impl fmt::Debug for UploadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadRequest")
            .field("stored_name", &self.stored_name)
            .finish_non_exhaustive()
    }
}

impl UploadRequest {
    /// Store the file under `name` instead of its own file name.
    pub fn stored_name(mut self, name: impl Into<String>) -> Self {
        self.stored_name = Some(name.into());
        self
    }

    /// Call `f(sent, total)` after every chunk.
    pub fn progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Offer {
    resource: String,
    name: String,
    size: u64,
}

#[derive(Serialize, Deserialize, Debug)]
enum Answer {
    Accept,
    Refuse { code: u16, detail: String },
}

#[derive(Serialize, Deserialize, Debug)]
struct End {
    digest: [u8; 32],
}

#[derive(Serialize, Deserialize, Debug)]
enum Done {
    Stored(StoredFile),
    Failed { code: u16, detail: String },
}

fn status_parts(s: &Status) -> (u16, String) {
    (s.code(), s.detail().to_owned())
}

fn status_from(code: u16, detail: String) -> Status {
    Status::from_wire(code, 0, detail)
}

/// Where an upload resource stores its files.
#[derive(Debug)]
pub(crate) struct UploadTarget {
    pub(crate) dir: PathBuf,
    pub(crate) options: UploadOptions,
}

/// Checks a file name sent by a peer: exactly one plain path component, nothing a file
/// system could read as a path, a device or a drive. Runs before the file system is touched.
pub fn validate_file_name(name: &str) -> Result<(), Status> {
    let bad = |why: &str| Err(Status::BadRequest(format!("file name refused: {why}")));
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_FILE_NAME {
        return bad("longer than 255 bytes");
    }
    if name == "." || name == ".." {
        return bad("dot entry");
    }
    if name
        .chars()
        .any(|c| c.is_control() || matches!(c, '/' | '\\' | ':'))
    {
        return bad("separator, drive or control character");
    }
    if name.starts_with(TEMP_PREFIX) {
        return bad("reserved prefix");
    }
    if name.trim() != name || name.ends_with('.') {
        return bad("leading or trailing space or dot");
    }
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(c)), None) if c == OsStr::new(name) => Ok(()),
        _ => bad("not a plain file name"),
    }
}

/// Serves one upload channel to the end. Never panics on peer input; every failure removes
/// the temporary file and is reported to the peer when the channel still works.
pub(crate) async fn serve(channel: Channel, lookup: impl Fn(&str) -> Option<Arc<UploadTarget>>) {
    let result = serve_inner(&channel, lookup).await;
    match result {
        Ok(()) => {}
        Err(Some(status)) => {
            debug!(%status, "upload failed");
            let (code, detail) = status_parts(&status);
            let _ = send_ctl(&channel, &Done::Failed { code, detail }).await;
        }
        Err(None) => debug!("upload channel closed before the end"),
    }
    channel.close();
}

async fn send_ctl<T: Serialize>(channel: &Channel, v: &T) -> Result<(), Error> {
    let bytes = Codec::Postcard.encode(v)?;
    channel
        .send_encoded(CodecId::Postcard, bytes)
        .await
        .map(drop)
}

async fn recv_ctl<T: serde::de::DeserializeOwned>(channel: &Channel) -> Result<T, Option<Status>> {
    let msg = tokio::time::timeout(IDLE_TIMEOUT, channel.receive())
        .await
        .map_err(|_| Some(Status::Timeout))?
        .map_err(|_| None)?;
    if msg.codec != CodecId::Postcard {
        return Err(Some(Status::BadRequest(
            "expected a control message".into(),
        )));
    }
    codec::decode(msg.codec, &msg.body).map_err(|e| Some(Status::BadRequest(e.to_string())))
}

/// Removes the temporary file unless the upload completed.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn serve_inner(
    channel: &Channel,
    lookup: impl Fn(&str) -> Option<Arc<UploadTarget>>,
) -> Result<(), Option<Status>> {
    let offer: Offer = recv_ctl(channel).await?;
    let refuse = |s: Status| async move {
        let (code, detail) = status_parts(&s);
        let _ = send_ctl(channel, &Answer::Refuse { code, detail }).await;
        Err::<(), _>(None)
    };
    let Some(target) = lookup(&offer.resource) else {
        return refuse(Status::NotFound(offer.resource)).await;
    };
    if let Err(s) = validate_file_name(&offer.name) {
        return refuse(s).await;
    }
    if offer.size > target.options.max_size {
        return refuse(Status::BadRequest(format!(
            "file of {} bytes exceeds the maximum of {}",
            offer.size, target.options.max_size
        )))
        .await;
    }
    let final_path = target.dir.join(&offer.name);
    if !target.options.replace && std::fs::symlink_metadata(&final_path).is_ok() {
        return refuse(Status::BadRequest(format!("{} already exists", offer.name))).await;
    }
    let internal = |e: std::io::Error| Some(Status::Internal(e.to_string()));
    let (mut file, temp) = create_temp(&target.dir).await.map_err(internal)?;
    send_ctl(channel, &Answer::Accept).await.map_err(|_| None)?;

    let mut hasher = blake3::Hasher::new();
    let mut received: u64 = 0;
    let end: End = loop {
        let msg = tokio::time::timeout(IDLE_TIMEOUT, channel.receive())
            .await
            .map_err(|_| Some(Status::Timeout))?
            .map_err(|_| None)?;
        if msg.codec == CodecId::Postcard {
            break codec::decode(msg.codec, &msg.body)
                .map_err(|e| Some(Status::BadRequest(e.to_string())))?;
        }
        received += msg.body.len() as u64;
        if received > offer.size {
            return Err(Some(Status::BadRequest("more data than offered".into())));
        }
        hasher.update(&msg.body);
        file.write_all(&msg.body).await.map_err(internal)?;
    };
    if received != offer.size {
        return Err(Some(Status::BadRequest(format!(
            "received {received} bytes, offered {}",
            offer.size
        ))));
    }
    let digest = hasher.finalize();
    if digest.as_bytes() != &end.digest {
        return Err(Some(Status::BadRequest("digest mismatch".into())));
    }
    file.flush().await.map_err(internal)?;
    file.sync_all().await.map_err(internal)?;
    drop(file);
    let temp_path = temp.path.clone().unwrap_or_default();
    let replace = target.options.replace;
    let dir = target.dir.clone();
    let placed = final_path.clone();
    tokio::task::spawn_blocking(move || place(&temp_path, &placed, &dir, replace))
        .await
        .map_err(|e| Some(Status::Internal(e.to_string())))?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Some(Status::BadRequest(format!("{} already exists", offer.name)))
            } else {
                internal(e)
            }
        })?;
    // The temporary name is gone (renamed or unlinked after the link): nothing to clean up.
    let mut temp = temp;
    temp.path = None;
    let stored = StoredFile {
        name: offer.name,
        size: received,
        digest: digest.to_hex().to_string(),
    };
    send_ctl(channel, &Done::Stored(stored))
        .await
        .map_err(|_| None)?;
    Ok(())
}

async fn create_temp(dir: &Path) -> std::io::Result<(tokio::fs::File, TempFile)> {
    // Bounded: a name collision is astronomically rare, and each try uses a fresh name.
    for attempt in 0..16u32 {
        let nonce = blake3::hash(
            format!("{:?}{attempt}{:p}", std::time::SystemTime::now(), &attempt).as_bytes(),
        );
        let path = dir.join(format!("{TEMP_PREFIX}{}.tmp", &nonce.to_hex()[..16]));
        // create_new: never opens an existing file, and never follows a symlink planted there.
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
        {
            Ok(f) => return Ok((f, TempFile { path: Some(path) })),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary name"))
}

/// Moves the finished temporary file into place, then makes the rename durable.
fn place(temp: &Path, target: &Path, dir: &Path, replace: bool) -> std::io::Result<()> {
    if replace {
        // rename replaces a symlink at `target` itself; it never writes through it.
        std::fs::rename(temp, target)?;
    } else {
        // A hard link fails if `target` exists (even as a dangling symlink): an atomic
        // create-new for the final name. Then drop the temporary name.
        std::fs::hard_link(temp, target)?;
        std::fs::remove_file(temp)?;
    }
    std::fs::File::open(dir)?.sync_all()
}

/// The client side: offers, streams and confirms one file over `channel`.
pub(crate) async fn send_file(
    channel: &Channel,
    resource: &str,
    path: &Path,
    request: UploadRequest,
) -> Result<StoredFile, Error> {
    let name = match &request.stored_name {
        Some(n) => n.clone(),
        None => path
            .file_name()
            .and_then(OsStr::to_str)
            .ok_or_else(|| Error::Config(format!("{} has no usable file name", path.display())))?
            .to_owned(),
    };
    validate_file_name(&name).map_err(Error::Status)?;
    let mut file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    send_ctl(
        channel,
        &Offer {
            resource: resource.to_owned(),
            name,
            size,
        },
    )
    .await?;
    let answer: Answer = recv_reply(channel).await?;
    if let Answer::Refuse { code, detail } = answer {
        return Err(Error::Status(status_from(code, detail)));
    }
    let mut hasher = blake3::Hasher::new();
    let mut sent = 0u64;
    // Bounded by the file size read at the offer: a file that grows is cut at `size`.
    while sent < size {
        let want = CHUNK.min(usize::try_from(size - sent).unwrap_or(CHUNK));
        // Read straight into the buffer that travels: the chunk is not copied again.
        let mut buf = bytes::BytesMut::with_capacity(want);
        let n = (&mut file).take(want as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank during upload",
            )));
        }
        hasher.update(&buf);
        channel.send_encoded(CodecId::Raw, buf.freeze()).await?;
        sent += n as u64;
        if let Some(p) = &request.progress {
            p(sent, size);
        }
    }
    send_ctl(
        channel,
        &End {
            digest: *hasher.finalize().as_bytes(),
        },
    )
    .await?;
    match recv_reply(channel).await? {
        Done::Stored(f) => Ok(f),
        Done::Failed { code, detail } => Err(Error::Status(status_from(code, detail))),
    }
}

async fn recv_reply<T: serde::de::DeserializeOwned>(channel: &Channel) -> Result<T, Error> {
    let msg = channel.receive().await?;
    msg.decode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        for ok in [
            "notes.txt",
            "a",
            "file with spaces.tar.gz",
            "ünïcode.bin",
            "..a",
            "a..b",
        ] {
            assert!(validate_file_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        let long = "x".repeat(256);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/abs",
            "a/../../x",
            "..\\x",
            "C:\\x",
            "C:x",
            "a\0b",
            "a/b",
            "x\n",
            " lead",
            "trail ",
            "trail.",
            &long,
            ".slic-upload-x.tmp",
        ] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
    }
}
