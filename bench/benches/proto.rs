//! Criterion micro-benchmarks of the sans-IO core, `slic-proto`: no sockets, no runtime, no
//! clock, so these numbers are the CPU cost of the protocol itself, the floor under anything
//! the `slic-bench` binary measures over real transports.
//!
//! Groups:
//!
//! - `header`: encoding and decoding (with validation) of one 20-byte frame header of a
//!   MESSAGE with a 64 B payload; also appending a whole 64 B frame to a buffer.
//! - `decoder`: the frame [`Decoder`] splitting a buffer of 1024 back-to-back 64 B MESSAGE
//!   frames, without and with the CRC-32 trailer (the checksum option negotiated in the
//!   handshake). Building the input buffer is setup and is not timed.
//! - `connection`: one message through two [`Connection`]s after an in-memory handshake:
//!   `send_message` on the client, `poll_transmit` until empty, `handle_input` on the server,
//!   `poll_event` for the message, then `release` of its credit and the resulting
//!   WINDOW_UPDATE frames fed back to the client, so flow control never stalls. Payloads of
//!   64 B, 1 KiB and 64 KiB, without and with checksums.
//!
//! Run from `bench/`:
//!
//! ```text
//! cargo bench --bench proto                  # everything, about a minute
//! cargo bench --bench proto -- decoder       # one group (a substring filter)
//! cargo bench --bench proto -- --quick       # fewer samples, a rough figure in seconds
//! ```
//!
//! Criterion prints time per iteration and a rate (bytes/s or elements/s) per benchmark, and
//! keeps its reports under `target/criterion/`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slic_proto::frame::{CHECKSUM_LEN, checksum};
use slic_proto::{
    CodecId, Config, Connection, Decoder, Event, Frame, FrameType, HEADER_LEN, Header, Side,
};

/// Payload of the frame-level benchmarks.
const SMALL: usize = 64;
/// Frames in the buffer the `decoder` group splits.
const FRAMES: usize = 1024;
/// Payload limit given to the decoders: the default `max_frame_size`.
const MAX_PAYLOAD: u32 = 256 << 10;

fn message_header(len: usize) -> Header {
    Header {
        ty: FrameType::Message,
        flags: 0,
        codec: CodecId::Raw,
        channel: 1,
        id: 42,
        len: len as u32,
    }
}

fn payload(len: usize) -> Bytes {
    (0..len).map(|i| i as u8).collect::<Vec<u8>>().into()
}

fn bench_header(c: &mut Criterion) {
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(1));
    let header = message_header(SMALL);
    let raw = header.encode();

    g.bench_function("encode", |b| b.iter(|| black_box(&header).encode()));
    g.bench_function("decode", |b| {
        b.iter(|| Header::decode(black_box(&raw), MAX_PAYLOAD).unwrap())
    });

    let frame = Frame {
        header,
        payload: payload(SMALL),
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + SMALL);
    g.throughput(Throughput::Bytes((HEADER_LEN + SMALL) as u64));
    g.bench_function("frame_encode_into_64B", |b| {
        b.iter(|| {
            out.clear();
            black_box(&frame).encode_into(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

/// `FRAMES` MESSAGE frames of `SMALL` bytes, each with a CRC-32 trailer when `crc` is set.
fn frame_stream(crc: bool) -> Bytes {
    let p = payload(SMALL);
    let mut buf = BytesMut::new();
    for i in 0..FRAMES {
        let mut h = message_header(SMALL);
        h.id = i as u64;
        let raw = h.encode();
        buf.extend_from_slice(&raw);
        buf.extend_from_slice(&p);
        if crc {
            buf.extend_from_slice(&checksum(&raw, &p));
        }
    }
    buf.freeze()
}

fn bench_decoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("decoder");
    for (name, crc) in [("plain", false), ("crc32", true)] {
        let stream = frame_stream(crc);
        assert_eq!(
            stream.len(),
            FRAMES * (HEADER_LEN + SMALL + if crc { CHECKSUM_LEN } else { 0 })
        );
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_with_input(
            BenchmarkId::new(name, format!("{FRAMES}x{SMALL}B")),
            &stream,
            |b, stream| {
                b.iter_batched_ref(
                    || BytesMut::from(&stream[..]),
                    |buf| {
                        let mut d = Decoder::new(MAX_PAYLOAD);
                        d.set_checksum(crc);
                        let mut n = 0;
                        while let Some(f) = d.decode(buf).unwrap() {
                            black_box(&f);
                            n += 1;
                        }
                        debug_assert_eq!(n, FRAMES);
                        debug_assert!(buf.is_empty());
                        n
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

/// A client and a server `Connection` past the handshake, joined by one reusable buffer.
struct Pair {
    now: Instant,
    client: Connection,
    server: Connection,
    wire: BytesMut,
    next_id: u64,
}

impl Pair {
    fn connected(crc: bool) -> Self {
        let mut config = Config::default();
        config.checksum(crc);
        let config = Arc::new(config);
        let now = Instant::now();
        let mut pair = Self {
            now,
            client: Connection::new(config.clone(), Side::Client, now),
            server: Connection::new(config, Side::Server, now),
            wire: BytesMut::with_capacity(128 << 10),
            next_id: 0,
        };
        pair.flush_to_server(); // HELLO
        pair.flush_to_client(); // WELCOME
        assert!(pair.client.is_open() && pair.server.is_open());
        for conn in [&mut pair.client, &mut pair.server] {
            assert!(matches!(conn.poll_event(), Some(Event::Connected(_))));
            assert!(conn.poll_event().is_none());
        }
        pair
    }

    /// Writes every pending client frame and feeds them to the server.
    fn flush_to_server(&mut self) {
        while let Some(t) = self.client.poll_transmit(self.now) {
            t.write_to(&mut self.wire);
        }
        self.server.handle_input(self.now, &mut self.wire).unwrap();
        debug_assert!(self.wire.is_empty());
    }

    /// Writes every pending server frame (WELCOME, WINDOW_UPDATE) and feeds them to the client.
    fn flush_to_client(&mut self) {
        while let Some(t) = self.server.poll_transmit(self.now) {
            t.write_to(&mut self.wire);
        }
        if !self.wire.is_empty() {
            self.client.handle_input(self.now, &mut self.wire).unwrap();
            debug_assert!(self.wire.is_empty());
        }
    }

    /// One message from client to server on channel 0, its credit released and returned.
    fn round(&mut self, payload: &Bytes) -> usize {
        self.next_id += 1;
        self.client
            .send_message(0, self.next_id, CodecId::Raw, payload.clone())
            .unwrap();
        self.flush_to_server();
        let mut got = 0;
        while let Some(ev) = self.server.poll_event() {
            let Event::Message(m) = ev else {
                panic!("unexpected event {ev:?}");
            };
            debug_assert_eq!(m.id, self.next_id);
            debug_assert_eq!(m.payload, *payload);
            got += m.payload.len();
            self.server.release(m.channel, m.credit);
        }
        // Cheap, and keeps a stalled window from passing for a very fast benchmark.
        assert_eq!(got, payload.len(), "message did not arrive");
        self.flush_to_client();
        got
    }
}

fn bench_connection(c: &mut Criterion) {
    let mut g = c.benchmark_group("connection");
    for (name, crc) in [("plain", false), ("crc32", true)] {
        for (label, len) in [("64B", 64), ("1KiB", 1 << 10), ("64KiB", 64 << 10)] {
            let payload = payload(len);
            let mut pair = Pair::connected(crc);
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_with_input(BenchmarkId::new(name, label), &payload, |b, payload| {
                b.iter(|| pair.round(payload))
            });
            // Every window update made it back: the client is not left without credit.
            assert_eq!(pair.client.queued_bytes(), 0);
            assert_eq!(pair.server.stats().messages_received, pair.next_id);
        }
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_header, bench_decoder, bench_connection
}
criterion_main!(benches);
