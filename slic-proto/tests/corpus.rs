//! Replays the fuzz corpus on every `cargo test`: each file under `fuzz/corpus/<target>/` (the
//! committed seeds) and `fuzz/regressions/<target>/` (inputs that once crashed a target) goes
//! through the same checks as the cargo-fuzz target of that name (`fuzz_checks`, shared with
//! `fuzz/fuzz_targets/*.rs`).
//!
//! The seeds are written by `write_seed_corpus` below:
//! `SLIC_WRITE_SEED_CORPUS=1 cargo test -p slic-proto --test corpus -- --ignored`.

mod fuzz_checks;

use std::path::{Path, PathBuf};

use slic_proto::frame::flags;
use slic_proto::{CodecId, ErrorCode, FrameType, Header, Hello, Side};

use fuzz_checks::{Limits, Operation, OpsInput};

// ----- replay --------------------------------------------------------------------------------

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every input kept for `target`: its seed corpus and its regressions, sorted by path.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable directory").path();
            if path.is_file() {
                let data = std::fs::read(&path).expect("readable corpus file");
                files.push((path, data));
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` on every input of `target`, naming the file that fails.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= 5,
        "only {} inputs for {target}: is fuzz/corpus/{target} there?",
        files.len()
    );
    for (path, data) in &files {
        eprintln!("replaying {}", path.display());
        check(data);
    }
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", fuzz_checks::check_frame_decoder);
}

#[test]
fn handshake_server_corpus() {
    replay("handshake_server", |d| {
        fuzz_checks::check_handshake(Side::Server, d);
    });
}

#[test]
fn handshake_client_corpus() {
    replay("handshake_client", |d| {
        fuzz_checks::check_handshake(Side::Client, d);
    });
}

#[test]
fn connection_ops_corpus() {
    replay("connection_ops", |d| {
        fuzz_checks::check_connection_ops(d).expect("input decodes to operations");
    });
}

// ----- seed corpus ---------------------------------------------------------------------------

/// Named inputs for one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// One frame, encoded by hand.
fn frame(
    ty: FrameType,
    flags: u8,
    codec: CodecId,
    channel: u32,
    id: u64,
    payload: &[u8],
) -> Vec<u8> {
    let header = Header {
        ty,
        flags,
        codec,
        channel,
        id,
        len: u32::try_from(payload.len()).expect("small payload"),
    };
    let mut out = header.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

fn control(ty: FrameType, channel: u32, id: u64, payload: &[u8]) -> Vec<u8> {
    frame(ty, 0, CodecId::Raw, channel, id, payload)
}

fn message(channel: u32, id: u64, more: bool, payload: &[u8]) -> Vec<u8> {
    let f = if more { flags::MORE } else { 0 };
    frame(
        FrameType::Message,
        f,
        CodecId::Postcard,
        channel,
        id,
        payload,
    )
}

/// The HELLO of PROTOCOL.md, section 15 (name "pc2").
fn hello(name: &str) -> Hello {
    Hello {
        version: 1,
        codecs: 0x0f,
        max_frame_size: 256 << 10,
        max_message_size: 16 << 20,
        channel_window: 1 << 20,
        connection_window: 4 << 20,
        max_channels: 256,
        heartbeat_ms: 10_000,
        compression: Vec::new(),
        name: name.to_owned(),
        checksum: false,
    }
}

fn hello_frame(h: &Hello) -> Vec<u8> {
    control(FrameType::Hello, 0, 0, &h.encode())
}

fn welcome_frame(h: &Hello) -> Vec<u8> {
    control(FrameType::Welcome, 0, 0, &h.encode())
}

fn code(c: ErrorCode) -> Vec<u8> {
    c.to_u32().to_be_bytes().to_vec()
}

fn close_payload(c: ErrorCode, reason: &str) -> Vec<u8> {
    let mut p = code(c);
    p.extend_from_slice(reason.as_bytes());
    p
}

fn window_update(channel: u32, inc: u32) -> Vec<u8> {
    let f = if channel == 0 { flags::CONNECTION } else { 0 };
    frame(
        FrameType::WindowUpdate,
        f,
        CodecId::Raw,
        channel,
        0,
        &inc.to_be_bytes(),
    )
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Channel-level traffic as the peer of a side would send it; `first` is the peer's first
/// channel id (1 for a client, 2 for a server).
fn traffic(first: u32) -> Vec<u8> {
    let second = first + 2;
    cat(&[
        control(FrameType::ChannelOpen, first, 0, b"upload"),
        frame(FrameType::Message, 0, CodecId::Json, 0, 1, b"\"hi\""),
        message(first, 2, true, &bytes(600, 1)),
        message(first, 2, false, &bytes(300, 2)),
        frame(FrameType::Request, 0, CodecId::Raw, first, 3, b"get /x"),
        frame(
            FrameType::Response,
            0,
            CodecId::MessagePack,
            0,
            4,
            &[0x93, 1, 2, 3],
        ),
        window_update(0, 1000),
        window_update(first, 1000),
        control(FrameType::Ping, 0, 7, b""),
        control(FrameType::Pong, 0, 1, b""),
        control(FrameType::Cancel, 0, 3, b""),
        control(FrameType::ChannelOpen, second, 0, b""),
        control(FrameType::ChannelClose, first, 0, &code(ErrorCode::NoError)),
        message(second, 5, false, b""),
        control(
            FrameType::GoAway,
            0,
            0,
            &close_payload(ErrorCode::NoError, "bye"),
        ),
    ])
}

fn frame_decoder_seeds() -> Seeds {
    let h = hello("pc2");
    let mut too_large = control(FrameType::Ping, 0, 0, b"");
    too_large[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut just_over = message(1, 1, false, b"");
    just_over[16..20].copy_from_slice(&1025u32.to_be_bytes());
    let mut ack = control(FrameType::Ping, 0, 0, b"");
    ack[1] = FrameType::Ack as u8;
    let mut compressed = message(1, 1, false, b"x");
    compressed[2] = flags::COMPRESSED;
    let mut bad_version = hello_frame(&h);
    bad_version[0] = 2;
    let mut ping_on_channel = control(FrameType::Ping, 0, 0, b"");
    ping_on_channel[7] = 1;
    let mut codec_on_control = control(FrameType::Pong, 0, 0, b"");
    codec_on_control[3] = 2;
    let whole_hello = hello_frame(&h);
    vec![
        ("hello", hello_frame(&h)),
        ("welcome", welcome_frame(&hello("server"))),
        // PROTOCOL.md, section 15: HELLO and the JSON "hi" message as one stream.
        (
            "hello_and_message",
            cat(&[
                hello_frame(&h),
                frame(FrameType::Message, 0, CodecId::Json, 0, 1, b"\"hi\""),
            ]),
        ),
        (
            "fragments",
            cat(&[
                message(1, 9, true, &bytes(1004, 3)),
                message(1, 9, true, &bytes(100, 4)),
                message(1, 9, false, b""),
            ]),
        ),
        (
            "window_updates",
            cat(&[window_update(0, 4096), window_update(3, (1 << 31) - 1)]),
        ),
        ("traffic", traffic(1)),
        ("partial_frame", whole_hello[..30].to_vec()),
        ("too_large", too_large),
        ("just_over_handshake_limit", just_over),
        ("reserved_ack", ack),
        ("compressed_flag", compressed),
        ("bad_version", bad_version),
        ("ping_on_channel", ping_on_channel),
        ("codec_on_control", codec_on_control),
        ("garbage", bytes(200, 0x5a)),
    ]
}

fn handshake_server_seeds() -> Seeds {
    let h = hello("client");
    let hf = hello_frame(&h);
    let mut bad_magic = hf.clone();
    bad_magic[20] = b'X';
    let mut version0 = h.clone();
    version0.version = 0;
    let mut version9 = h.clone();
    version9.version = 9;
    let mut no_raw = h.clone();
    no_raw.codecs = 0x0e;
    let mut small = h;
    small.max_frame_size = 1024;
    small.channel_window = 1024;
    small.connection_window = 2048;
    small.max_channels = 1;
    small.heartbeat_ms = 0;
    let mut truncated = hf.clone();
    truncated[16..20].copy_from_slice(&30u32.to_be_bytes());
    truncated.truncate(HEADER + 30);
    vec![
        ("hello", hf.clone()),
        ("hello_then_traffic", cat(&[hf.clone(), traffic(1)])),
        (
            "small_hello_then_traffic",
            cat(&[hello_frame(&small), traffic(1)]),
        ),
        (
            "flow_control_violation",
            cat(&[
                hf.clone(),
                message(0, 1, false, &bytes(1000, 5)),
                message(0, 2, false, &bytes(100, 6)),
            ]),
        ),
        (
            "channel_limit",
            cat(&[
                hf.clone(),
                control(FrameType::ChannelOpen, 1, 0, b""),
                control(FrameType::ChannelOpen, 3, 0, b""),
                control(FrameType::ChannelOpen, 5, 0, b""),
                message(5, 1, false, b"dropped"),
                control(FrameType::ChannelOpen, 7, 0, b""),
                control(FrameType::ChannelOpen, 9, 0, b""),
            ]),
        ),
        (
            "reassembly_budget",
            cat(&[
                hf.clone(),
                control(FrameType::ChannelOpen, 1, 0, b""),
                control(FrameType::ChannelOpen, 3, 0, b""),
                message(0, 1, true, &bytes(1000, 7)),
                message(0, 1, true, &bytes(1000, 8)),
                message(1, 2, true, &bytes(1000, 9)),
                message(3, 3, true, &bytes(100, 10)),
            ]),
        ),
        (
            "second_hello",
            cat(&[hf.clone(), message(0, 1, false, b"x"), hf]),
        ),
        ("bad_magic", bad_magic),
        ("version_0", hello_frame(&version0)),
        ("version_9", hello_frame(&version9)),
        ("no_raw_codec", hello_frame(&no_raw)),
        ("truncated_hello", truncated),
        ("message_first", message(0, 1, false, b"hi")),
        (
            "goaway_first",
            control(
                FrameType::GoAway,
                0,
                0,
                &close_payload(ErrorCode::NoError, ""),
            ),
        ),
        ("garbage", bytes(300, 0x11)),
    ]
}

fn handshake_client_seeds() -> Seeds {
    let w = hello("server");
    let wf = welcome_frame(&w);
    let mut version2 = w.clone();
    version2.version = 2;
    let mut heartbeat = w.clone();
    heartbeat.heartbeat_ms = 100;
    heartbeat.max_frame_size = 1024;
    heartbeat.channel_window = 1024;
    heartbeat.connection_window = 1024;
    heartbeat.max_channels = 0;
    vec![
        ("welcome", wf.clone()),
        ("welcome_then_traffic", cat(&[wf.clone(), traffic(2)])),
        (
            "small_welcome_then_traffic",
            cat(&[welcome_frame(&heartbeat), traffic(2)]),
        ),
        (
            "welcome_with_extension_bytes",
            control(
                FrameType::Welcome,
                0,
                0,
                &cat(&[w.encode().to_vec(), b"ext".to_vec()]),
            ),
        ),
        ("welcome_version_2", welcome_frame(&version2)),
        (
            "refused_with_error",
            control(
                FrameType::Error,
                0,
                0,
                &close_payload(ErrorCode::HandshakeFailed, "no"),
            ),
        ),
        ("hello_instead", hello_frame(&w)),
        ("second_welcome", cat(&[wf.clone(), wf.clone()])),
        (
            "client_parity_channel",
            cat(&[wf, control(FrameType::ChannelOpen, 1, 0, b"")]),
        ),
        ("garbage", bytes(300, 0x77)),
    ]
}

const HEADER: usize = slic_proto::HEADER_LEN;

/// The bytes `arbitrary` (1.x) decodes to `input`: integers little-endian, a bool as one
/// byte, an enum variant as a `u32` scaled to the variant count, a vector as its elements each
/// preceded by a continue byte (1) and closed by a 0. `connection_ops_seeds` checks the result
/// by decoding it back.
fn encode_ops(input: &OpsInput) -> Vec<u8> {
    const VARIANTS: u64 = 11;
    fn variant(out: &mut Vec<u8>, index: u64) {
        let v = u32::try_from((index << 32).div_ceil(VARIANTS)).expect("u32");
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn limits(out: &mut Vec<u8>, l: &Limits) {
        out.extend_from_slice(&[
            l.frame,
            l.message,
            l.window,
            l.connection_window,
            l.channels,
            l.heartbeat,
            l.compression,
            u8::from(l.checksum),
        ]);
    }
    fn byte_vec(out: &mut Vec<u8>, v: &[u8]) {
        for &b in v {
            out.extend_from_slice(&[1, b]);
        }
        out.push(0);
    }
    let mut out = Vec::new();
    limits(&mut out, &input.client);
    limits(&mut out, &input.server);
    for op in &input.ops {
        out.push(1);
        match op {
            Operation::Send {
                server,
                channel,
                size,
                kind,
                compressed,
            } => {
                variant(&mut out, 0);
                out.extend_from_slice(&[u8::from(*server), *channel]);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&[*kind, u8::from(*compressed)]);
            }
            Operation::OpenChannel { server, label } => {
                variant(&mut out, 1);
                out.extend_from_slice(&[u8::from(*server), *label]);
            }
            Operation::CloseChannel { server, channel } => {
                variant(&mut out, 2);
                out.extend_from_slice(&[u8::from(*server), *channel]);
            }
            Operation::Release { server, count } => {
                variant(&mut out, 3);
                out.extend_from_slice(&[u8::from(*server), *count]);
            }
            Operation::AdvanceClock { ms } => {
                variant(&mut out, 4);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Operation::Deliver { to_server, bytes } => {
                variant(&mut out, 5);
                out.push(u8::from(*to_server));
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            Operation::Drive => variant(&mut out, 6),
            Operation::InjectBytes { to_server, bytes } => {
                variant(&mut out, 7);
                out.push(u8::from(*to_server));
                byte_vec(&mut out, bytes);
            }
            Operation::InjectFrame {
                to_server,
                ty,
                flags,
                codec,
                channel,
                id,
                payload,
                pad,
            } => {
                variant(&mut out, 8);
                out.extend_from_slice(&[u8::from(*to_server), *ty, *flags, *codec, *channel, *id]);
                byte_vec(&mut out, payload);
                out.extend_from_slice(&pad.to_le_bytes());
            }
            Operation::CancelRequest { server, id } => {
                variant(&mut out, 9);
                out.push(u8::from(*server));
                out.extend_from_slice(&id.to_le_bytes());
            }
            Operation::Close { server, code } => {
                variant(&mut out, 10);
                out.extend_from_slice(&[u8::from(*server), *code]);
            }
        }
    }
    out.push(0);
    out
}

/// Scenarios for `connection_ops`, each a short, meaningful run of two honest peers (and one
/// with injected frames).
fn connection_ops_seeds() -> Seeds {
    use Operation::*;
    const C: bool = false;
    const S: bool = true;
    let send = |server, channel, size, kind| Send {
        server,
        channel,
        size,
        kind,
        compressed: false,
    };
    // Frames of 1024 bytes, messages up to 20000, windows of 1024/2048, two channels, 1 s
    // heartbeat: small enough that fragmentation and flow control show in a few operations.
    let small = Limits {
        frame: 0,
        message: 2,
        window: 0,
        connection_window: 1,
        channels: 2,
        heartbeat: 2,
        compression: 3,
        checksum: true,
    };
    let roomy = Limits {
        frame: 3,
        message: 3,
        window: 3,
        connection_window: 3,
        channels: 4,
        heartbeat: 0,
        compression: 1,
        checksum: false,
    };
    let scenarios: Vec<(&'static str, Limits, Limits, Vec<Operation>)> = vec![
        (
            "messages",
            roomy,
            roomy,
            vec![
                Drive,
                send(C, 0, 100, 0),
                send(S, 0, 200, 1),
                send(C, 0, 0, 2),
                Drive,
                Release {
                    server: S,
                    count: 0,
                },
                send(C, 0, 1000, 0),
                Drive,
            ],
        ),
        (
            "fragmented_under_flow_control",
            small,
            small,
            vec![
                Drive,
                send(C, 0, 4999, 0),
                send(C, 0, 10, 0),
                Drive,
                Release {
                    server: S,
                    count: 1,
                },
                Drive,
                Release {
                    server: S,
                    count: 0,
                },
                Drive,
            ],
        ),
        (
            "compressed",
            small,
            roomy,
            vec![
                Drive,
                Send {
                    server: C,
                    channel: 0,
                    size: 1500,
                    kind: 0,
                    compressed: true,
                },
                Send {
                    server: S,
                    channel: 0,
                    size: 10,
                    kind: 1,
                    compressed: true,
                },
                Drive,
            ],
        ),
        (
            "big_message",
            roomy,
            roomy,
            vec![
                Drive,
                send(S, 0, 65_000, 0),
                Deliver {
                    to_server: C,
                    bytes: 9000,
                },
                Drive,
            ],
        ),
        (
            "channels",
            small,
            small,
            vec![
                Drive,
                OpenChannel {
                    server: C,
                    label: 6,
                },
                OpenChannel {
                    server: S,
                    label: 0,
                },
                Drive,
                send(C, 1, 300, 0),
                send(S, 2, 300, 1),
                CloseChannel {
                    server: C,
                    channel: 1,
                },
                send(C, 1, 10, 0),
                Drive,
                CloseChannel {
                    server: S,
                    channel: 1,
                },
                Drive,
                OpenChannel {
                    server: C,
                    label: 1,
                },
                Drive,
            ],
        ),
        (
            "simultaneous_channel_close",
            small,
            small,
            vec![
                Drive,
                OpenChannel {
                    server: C,
                    label: 0,
                },
                Drive,
                send(S, 1, 2000, 0),
                CloseChannel {
                    server: C,
                    channel: 1,
                },
                CloseChannel {
                    server: S,
                    channel: 1,
                },
                Drive,
            ],
        ),
        (
            "channel_limit",
            roomy,
            Limits {
                channels: 1,
                ..small
            },
            vec![
                Drive,
                OpenChannel {
                    server: C,
                    label: 0,
                },
                OpenChannel {
                    server: C,
                    label: 0,
                },
                OpenChannel {
                    server: C,
                    label: 255,
                },
                CloseChannel {
                    server: C,
                    channel: 1,
                },
                Drive,
                OpenChannel {
                    server: C,
                    label: 3,
                },
                Drive,
            ],
        ),
        (
            "graceful_close",
            small,
            small,
            vec![
                Drive,
                send(C, 0, 3000, 0),
                send(S, 0, 10, 0),
                Close { server: C, code: 0 },
                send(C, 0, 10, 0),
                Drive,
                Release {
                    server: S,
                    count: 0,
                },
                Drive,
            ],
        ),
        (
            "close_during_handshake",
            small,
            small,
            vec![Close { server: S, code: 0 }, Drive],
        ),
        (
            // With checksums agreed on the client's HELLO, the server cannot read the GOAWAY
            // the client sent before its handshake completed (PROTOCOL.md, section 6).
            "client_close_during_handshake_with_checksums",
            small,
            small,
            vec![Close { server: C, code: 0 }, Drive],
        ),
        (
            "cancel",
            roomy,
            roomy,
            vec![
                Drive,
                send(C, 0, 20, 1),
                CancelRequest { server: C, id: 0 },
                send(S, 0, 0, 2),
                Drive,
            ],
        ),
        (
            "keepalive",
            small,
            small,
            vec![
                Drive,
                AdvanceClock { ms: 2500 },
                send(S, 0, 50, 0),
                AdvanceClock { ms: 4000 },
            ],
        ),
        (
            "partial_delivery",
            small,
            roomy,
            vec![
                Drive,
                send(C, 0, 2500, 0),
                Deliver {
                    to_server: S,
                    bytes: 7,
                },
                Deliver {
                    to_server: S,
                    bytes: 30,
                },
                send(C, 0, 10, 1),
                Deliver {
                    to_server: S,
                    bytes: 1500,
                },
                Drive,
            ],
        ),
        (
            "injected_frames",
            small,
            small,
            vec![
                Drive,
                send(C, 0, 100, 0),
                InjectFrame {
                    to_server: S,
                    ty: FrameType::WindowUpdate as u8,
                    flags: 1,
                    codec: 0,
                    channel: 0,
                    id: 0,
                    payload: 4096u32.to_be_bytes().to_vec(),
                    pad: 0,
                },
                Drive,
                // A MESSAGE on a channel the client never heard of: CHANNEL_CLOSED.
                InjectFrame {
                    to_server: C,
                    ty: FrameType::Message as u8,
                    flags: 0,
                    codec: 1,
                    channel: 8,
                    id: 1,
                    payload: b"x".to_vec(),
                    pad: 0,
                },
                Drive,
                // Half a header with version 2, then whatever follows: UNSUPPORTED_VERSION.
                InjectBytes {
                    to_server: S,
                    bytes: vec![2, 3, 0, 0, 0, 0, 0, 9],
                },
                send(C, 0, 100, 0),
                Drive,
            ],
        ),
    ];
    scenarios
        .into_iter()
        .map(|(name, client, server, ops)| {
            let input = OpsInput {
                client,
                server,
                ops,
            };
            let data = encode_ops(&input);
            let decoded = <OpsInput as arbitrary::Arbitrary>::arbitrary_take_rest(
                arbitrary::Unstructured::new(&data),
            )
            .expect("decodes");
            assert_eq!(
                format!("{decoded:?}"),
                format!("{input:?}"),
                "encode_ops does not match arbitrary's format"
            );
            (name, data)
        })
        .collect()
}

/// Crashes found while the operations' format was still changing, re-encoded as the scenario
/// they were (the original bytes decode to other operations now).
fn connection_ops_regressions() -> Seeds {
    let input = |ops| {
        encode_ops(&OpsInput {
            client: Limits::default(),
            server: Limits::default(),
            ops,
        })
    };
    vec![(
        // The server closes before the client's HELLO reached it: its GOAWAY was reported to
        // the client as PeerError instead of GoAway.
        "goaway-during-handshake-reported-as-peer-error",
        input(vec![
            Operation::OpenChannel {
                server: false,
                label: 0,
            },
            Operation::Close {
                server: true,
                code: 17,
            },
            Operation::Drive,
        ]),
    )]
}

/// Writes the seed corpus into `fuzz/corpus/<target>/`. Run by hand after a format change:
/// `SLIC_WRITE_SEED_CORPUS=1 cargo test -p slic-proto --test corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    if std::env::var_os("SLIC_WRITE_SEED_CORPUS").is_none() {
        eprintln!("set SLIC_WRITE_SEED_CORPUS=1 to write the seed corpus");
        return;
    }
    let targets: [(&str, Seeds); 4] = [
        ("frame_decoder", frame_decoder_seeds()),
        ("handshake_server", handshake_server_seeds()),
        ("handshake_client", handshake_client_seeds()),
        ("connection_ops", connection_ops_seeds()),
    ];
    for (target, seeds) in targets {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
        }
    }
    let dir = fuzz_dir().join("regressions/connection_ops");
    std::fs::create_dir_all(&dir).expect("create regressions dir");
    for (name, data) in connection_ops_regressions() {
        std::fs::write(dir.join(name), data).expect("write regression");
    }
}

/// The seeds are what they claim: checked here so that a format change that breaks them shows.
#[test]
fn seeds_are_what_their_names_say() {
    use slic_proto::{Config, Connection, Event};
    use std::sync::Arc;
    use std::time::Instant;

    let now = Instant::now();
    let server_connects = |input: &[u8]| {
        let mut c = Connection::new(Arc::new(Config::default()), Side::Server, now);
        let mut buf = bytes::BytesMut::from(input);
        let _ = c.handle_input(now, &mut buf);
        std::iter::from_fn(|| c.poll_event()).any(|e| matches!(e, Event::Connected(_)))
    };
    let seeds = handshake_server_seeds();
    let get = |name: &str| &seeds.iter().find(|(n, _)| *n == name).expect("seed").1;
    assert!(server_connects(get("hello")));
    assert!(server_connects(get("hello_then_traffic")));
    assert!(!server_connects(get("bad_magic")));
    assert!(!server_connects(get("message_first")));
    // The operations of a seed run in the debug build as in the fuzzer.
    let input = OpsInput {
        client: Limits::default(),
        // The server accepts messages of 3000 bytes, frames of 1024 and pings every 250 ms.
        server: Limits {
            message: 1,
            heartbeat: 1,
            ..Limits::default()
        },
        ops: vec![
            Operation::Drive,
            Operation::Send {
                server: false,
                channel: 0,
                size: 2500,
                kind: 0,
                compressed: false,
            },
            Operation::AdvanceClock { ms: 2000 },
        ],
    };
    let summary = fuzz_checks::run_connection_ops(&input);
    assert_eq!(summary.delivered, 1);
    assert!(summary.fragmented == 1 && summary.pings >= 1);
}

/// Prints the operations an input of `connection_ops` decodes to, then runs it:
/// `SLIC_FUZZ_INPUT=path cargo test -p slic-proto --test corpus show -- --ignored --nocapture`.
#[test]
#[ignore = "a triage tool; run by hand"]
fn show_connection_ops_input() {
    use arbitrary::{Arbitrary, Unstructured};
    let Some(path) = std::env::var_os("SLIC_FUZZ_INPUT") else {
        eprintln!("set SLIC_FUZZ_INPUT to a connection_ops input file");
        return;
    };
    let data = std::fs::read(path).expect("readable input");
    let input = OpsInput::arbitrary_take_rest(Unstructured::new(&data)).expect("decodes");
    println!("{input:#?}");
    println!("{:?}", fuzz_checks::run_connection_ops(&input));
}
