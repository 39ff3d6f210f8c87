//! Test support for slic, never published.
//!
//! [`proxy::FaultProxy`] sits between two slic nodes on loopback and damages the TCP byte
//! stream on purpose: latency with jitter, tiny segments, a bandwidth cap, stalls, resets,
//! early closes and bit flips, each at a chosen byte offset and direction. Every random choice
//! comes from a [`rng::Rng`] seeded by the test, so a failing run reproduces from its seed.
//!
//! ```no_run
//! use std::time::Duration;
//! use slic_test::proxy::{FaultProxy, Faults};
//!
//! # async fn f(server: std::net::SocketAddr) -> std::io::Result<()> {
//! let proxy = FaultProxy::builder(server)
//!     .seed(7)
//!     .both(Faults::none().latency(Duration::from_millis(50), Duration::from_millis(25)))
//!     .start()
//!     .await?;
//! // Connect the client to `proxy.addr()` instead of `server`.
//! # let _ = proxy.addr(); Ok(()) }
//! ```

pub mod proxy;
pub mod rng;
