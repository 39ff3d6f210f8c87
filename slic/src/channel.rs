//! [`Channel`]: an ordered stream of messages of its own, multiplexed on a peer's connection.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde::Serialize;
use slic_proto::CodecId;
use tokio::sync::{Mutex, mpsc};

use crate::driver::{Command, CreditReturn, Delivery, PeerLink};
use crate::error::Error;
use crate::node::{ChannelId, Message, MessageId, NodeInner, PeerInfo};

/// A channel on one connection, from [`Node::open_channel`](crate::Node::open_channel) or
/// [`Node::accept_channel`](crate::Node::accept_channel).
///
/// Messages sent on a channel arrive in order, on that channel only; each channel has its own
/// flow-control window, so a channel whose reader is slow does not hold up the others. Methods
/// take `&self`, so one task may send while another receives. Dropping the handle closes it.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), slic::Error> {
/// # let server = slic::Node::builder().build()?;
/// # let addr = server.listen("127.0.0.1:0").await?;
/// # let client = slic::Node::builder().build()?;
/// let peer = client.connect(addr).await?;
/// let ch = client.open_channel(peer).await?;
/// ch.send(&"on a channel").await?;
///
/// let theirs = server.accept_channel().await?;
/// assert_eq!(theirs.receive().await?.decode::<String>()?, "on a channel");
/// ch.close();
/// assert!(theirs.receive().await.is_err()); // closed by the peer
/// # Ok(()) }
/// ```
pub struct Channel {
    id: ChannelId,
    link: Arc<PeerLink>,
    node: Arc<NodeInner>,
    inbox: Mutex<mpsc::UnboundedReceiver<Delivery>>,
    _credit: Arc<CreditReturn>,
    closed: AtomicBool,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .field("peer", &self.link.info)
            .finish_non_exhaustive()
    }
}

impl Channel {
    pub(crate) fn new(
        id: ChannelId,
        link: Arc<PeerLink>,
        node: Arc<NodeInner>,
        inbox: mpsc::UnboundedReceiver<Delivery>,
        credit: Arc<CreditReturn>,
    ) -> Self {
        Self {
            id,
            link,
            node,
            inbox: Mutex::new(inbox),
            _credit: credit,
            closed: AtomicBool::new(false),
        }
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// The peer at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.link.info
    }

    /// Serializes `value` with the node's codec and queues it on this channel, waiting while
    /// the peer's send buffer is full.
    ///
    /// # Errors
    ///
    /// [`Error::ChannelClosed`] after [`close`](Self::close), [`Error::UnknownPeer`] when the
    /// connection is gone, [`Error::Encode`], [`Error::MessageTooLarge`].
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<MessageId, Error> {
        let codec = self.node.settings.codec;
        self.send_encoded(codec.id(), codec.encode(value)?).await
    }

    /// Queues raw bytes on this channel.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn send_bytes(&self, bytes: impl Into<Bytes>) -> Result<MessageId, Error> {
        self.send_encoded(CodecId::Raw, bytes.into()).await
    }

    pub(crate) async fn send_encoded(
        &self,
        codec: CodecId,
        payload: Bytes,
    ) -> Result<MessageId, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ChannelClosed(self.id));
        }
        let id = self.node.next_message_id();
        self.link.enqueue(self.id.0, id, codec, payload).await?;
        Ok(id)
    }

    /// Waits for the next message on this channel.
    ///
    /// # Errors
    ///
    /// [`Error::ChannelClosed`] once the channel is closed (by either side) and every message
    /// that arrived before the close has been received.
    pub async fn receive(&self) -> Result<Message, Error> {
        let mut rx = self.inbox.lock().await;
        rx.recv()
            .await
            .map(Delivery::consume)
            .ok_or(Error::ChannelClosed(self.id))
    }

    /// Closes the channel: messages already queued are sent first, then the peer is told.
    /// Messages that arrive afterwards are dropped. Closing twice does nothing.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.link.cmd.send(Command::CloseChannel(self.id.0));
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.close();
    }
}
