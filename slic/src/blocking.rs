//! The same API for code without an async runtime: every call blocks the calling thread.
//!
//! A [`blocking::Node`](Node) owns a small tokio runtime (one worker thread) that runs its
//! connections in the background, so receiving goes on while the caller does other work.
//!
//! # Examples
//!
//! ```
//! use slic::{Target, blocking::Node};
//!
//! let server = Node::new(slic::Node::builder().name("hub"))?;
//! let addr = server.listen("127.0.0.1:0")?;
//! let client = Node::new(slic::Node::builder().name("pc2"))?;
//! client.connect(addr)?;
//! client.send(Target::All, &"hello")?;
//! assert_eq!(server.receive()?.decode::<String>()?, "hello");
//! # Ok::<(), slic::Error>(())
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::runtime::Runtime;

use crate::{Error, Message, MessageId, NodeBuilder, PeerId, PeerInfo, Target};

/// A [`crate::Node`] driven by its own runtime; see the [module docs](self).
#[derive(Debug)]
pub struct Node {
    node: crate::Node,
    rt: Runtime,
}

impl Node {
    /// Builds the node and starts its runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] from the builder, or [`Error::Io`] if the runtime cannot start.
    pub fn new(builder: NodeBuilder) -> Result<Self, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("slic-blocking")
            .enable_all()
            .build()?;
        let node = builder.build()?;
        Ok(Self { node, rt })
    }

    /// The async node behind this one.
    pub fn as_async(&self) -> &crate::Node {
        &self.node
    }

    /// See [`crate::Node::listen`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn listen(&self, addr: impl crate::ToEndpoint) -> Result<SocketAddr, Error> {
        self.rt.block_on(self.node.listen(addr))
    }

    /// See [`crate::Node::connect`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn connect(&self, addr: impl crate::ToEndpoint) -> Result<PeerId, Error> {
        self.rt.block_on(self.node.connect(addr))
    }

    /// See [`crate::Node::peers`].
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.node.peers()
    }

    /// See [`crate::Node::send`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn send<T: Serialize + ?Sized>(
        &self,
        target: Target,
        value: &T,
    ) -> Result<MessageId, Error> {
        self.rt.block_on(self.node.send(target, value))
    }

    /// See [`crate::Node::send_bytes`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn send_bytes(&self, target: Target, bytes: impl Into<Bytes>) -> Result<MessageId, Error> {
        self.rt.block_on(self.node.send_bytes(target, bytes))
    }

    /// See [`crate::Node::try_send`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn try_send<T: Serialize + ?Sized>(
        &self,
        target: Target,
        value: &T,
    ) -> Result<MessageId, Error> {
        self.node.try_send(target, value)
    }

    /// See [`crate::Node::receive`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn receive(&self) -> Result<Message, Error> {
        self.rt.block_on(self.node.receive())
    }

    /// See [`crate::Node::try_receive`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn try_receive(&self) -> Result<Option<Message>, Error> {
        self.node.try_receive()
    }

    /// See [`crate::Node::receive_timeout`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn receive_timeout(&self, timeout: Duration) -> Result<Option<Message>, Error> {
        self.rt.block_on(self.node.receive_timeout(timeout))
    }

    /// See [`crate::Node::open_channel`]; the channel's calls block through [`Channel`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn open_channel(&self, peer: PeerId) -> Result<Channel<'_>, Error> {
        let ch = self.rt.block_on(self.node.open_channel(peer))?;
        Ok(Channel { ch, rt: &self.rt })
    }

    /// See [`crate::Node::accept_channel`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn accept_channel(&self) -> Result<Channel<'_>, Error> {
        let ch = self.rt.block_on(self.node.accept_channel())?;
        Ok(Channel { ch, rt: &self.rt })
    }

    /// See [`crate::Node::disconnect`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn disconnect(&self, target: Target, timeout: Duration) -> Result<(), Error> {
        self.rt.block_on(self.node.disconnect(target, timeout))
    }

    /// See [`crate::Node::shutdown`].
    pub fn shutdown(&self) {
        self.rt.block_on(self.node.shutdown());
    }

    /// See [`crate::Node::events`]; [`Events::recv`] blocks.
    pub fn events(&self) -> Events {
        Events {
            events: self.node.events(),
            rt: self.rt.handle().clone(),
        }
    }

    /// See [`crate::Node::create_resource`]. The handler is async and runs on this node's
    /// runtime.
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn create_resource<T, R, F, Fut>(&self, name: &str, handler: F) -> Result<(), Error>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(crate::Request<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, crate::Status>> + Send + 'static,
    {
        self.node.create_resource(name, handler)
    }

    /// See [`crate::Node::get_resource`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn get_resource<T, R>(&self, name: &str, body: &T) -> Result<R, Error>
    where
        T: Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
    {
        self.rt.block_on(self.node.get_resource(name, body))
    }

    /// See [`crate::Node::get_resource_from`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn get_resource_from<T, R>(&self, peer: PeerId, name: &str, body: &T) -> Result<R, Error>
    where
        T: Serialize + ?Sized,
        R: serde::de::DeserializeOwned,
    {
        self.rt
            .block_on(self.node.get_resource_from(peer, name, body))
    }

    /// See [`crate::Node::create_upload_resource`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn create_upload_resource(
        &self,
        name: &str,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<(), Error> {
        self.node.create_upload_resource(name, dir)
    }

    /// See [`crate::Node::upload_resource`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn upload_resource(
        &self,
        name: &str,
        path: impl AsRef<std::path::Path>,
    ) -> Result<crate::StoredFile, Error> {
        self.rt.block_on(self.node.upload_resource(name, path))
    }
}

/// Connection events, received by blocking; from [`Node::events`].
#[derive(Debug)]
pub struct Events {
    events: crate::Events,
    rt: tokio::runtime::Handle,
}

impl Events {
    /// Blocks for the next event; `None` once the node is gone.
    pub fn recv(&mut self) -> Option<crate::Event> {
        self.rt.block_on(self.events.recv())
    }
}

/// A [`crate::Channel`] with blocking calls.
#[derive(Debug)]
pub struct Channel<'a> {
    ch: crate::Channel,
    rt: &'a Runtime,
}

impl Channel<'_> {
    /// See [`crate::Channel::send`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<MessageId, Error> {
        self.rt.block_on(self.ch.send(value))
    }

    /// See [`crate::Channel::receive`].
    ///
    /// # Errors
    ///
    /// As the async version.
    pub fn receive(&self) -> Result<Message, Error> {
        self.rt.block_on(self.ch.receive())
    }

    /// See [`crate::Channel::close`].
    pub fn close(&self) {
        self.ch.close();
    }
}
