//! The sans-IO core of slic: frames, handshake, and the connection state machine with its
//! channels, flow control, keepalive and close.
//!
//! This crate does no I/O. It has no sockets, no tasks and no clock: bytes come in through
//! [`Connection::handle_input`], frames go out through [`Connection::poll_transmit`], events
//! come out of [`Connection::poll_event`], and time is passed in as an argument
//! ([`Connection::handle_timeout`], [`Connection::poll_timeout`]). The `slic` crate drives it
//! with tokio; tests drive it with a simulated clock and in-memory buffers.
//!
//! ```text
//! slic-cli  ->  slic (tokio driver, Node API)  ->  slic-proto (this crate)
//! ```
//!
//! The wire format is specified in PROTOCOL.md at the repository root.
//!
//! # Example
//!
//! Two connections talking through in-memory buffers:
//!
//! ```
//! use std::{sync::Arc, time::Instant};
//! use bytes::{Bytes, BytesMut};
//! use slic_proto::{CodecId, Config, Connection, Event, Side};
//!
//! let now = Instant::now();
//! let config = Arc::new(Config::default());
//! let mut client = Connection::new(config.clone(), Side::Client, now);
//! let mut server = Connection::new(config, Side::Server, now);
//!
//! fn pump(from: &mut Connection, to: &mut Connection, now: Instant) {
//!     let mut wire = BytesMut::new();
//!     while let Some(t) = from.poll_transmit(now) {
//!         wire.extend_from_slice(&t.header);
//!         wire.extend_from_slice(&t.payload);
//!     }
//!     to.handle_input(now, &mut wire).unwrap();
//! }
//! pump(&mut client, &mut server, now); // HELLO
//! pump(&mut server, &mut client, now); // WELCOME
//! client.send_message(0, 1, CodecId::Raw, Bytes::from_static(b"hi")).unwrap();
//! pump(&mut client, &mut server, now);
//! let mut got = None;
//! while let Some(ev) = server.poll_event() {
//!     if let Event::Message(m) = ev {
//!         got = Some(m.payload);
//!     }
//! }
//! assert_eq!(got.as_deref(), Some(&b"hi"[..]));
//! ```

pub mod config;
pub mod connection;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod idmap;
pub mod limit;

pub use config::{Compression, Config, ConfigError};
pub use connection::{
    Connection, Event, IncomingMessage, Kind, MAX_LABEL_LEN, PROTOCOL_VERSION, Side, Stats,
    Transmit,
};
pub use error::{ConnectionError, DecodeError, ErrorCode, Initiator, OpenError, SendError};
pub use frame::{CodecId, Decoder, Frame, FrameType, HEADER_LEN, Header};
pub use handshake::Hello;
pub use idmap::{IdMap, id_map};
