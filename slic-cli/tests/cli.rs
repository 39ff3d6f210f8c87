//! The `slic` binary run as a process: serve + call + send + listen + upload, exit codes
//! checked.

mod common;

use common::{STEP, run, scratch, start, stderr, stdout};

#[test]
fn serve_call_and_upload_round_trip_with_exit_codes() {
    let dir = scratch("serve");
    let store = dir.join("store");
    let (_server, addr, _lines) = start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upload-dir",
        store.to_str().unwrap(),
    ]);

    let out = run(&["call", &addr, ":echo", r#"{"a": 10}"#]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(reply, serde_json::json!({"a": 10}));
    assert!(stderr(&out).contains("status: OK"));

    let out = run(&["call", &addr, ":time"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(reply["unix_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let out = run(&["call", &addr, ":nope", "1"]);
    assert_eq!(out.status.code(), Some(2), "refused call exits 2");
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "one clear line");

    let out = run(&["call", &addr, ":echo", "{not json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not valid JSON"));

    let src = dir.join("notes.txt");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &content).unwrap();
    let out = run(&["upload", &addr, ":upload", src.to_str().unwrap(), "--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("stored notes.txt (300000 bytes"));
    assert_eq!(std::fs::read(store.join("notes.txt")).unwrap(), content);

    let out = run(&["upload", &addr, ":upload", src.to_str().unwrap(), "--quiet"]);
    assert_eq!(out.status.code(), Some(2), "existing file is refused");
    assert!(stderr(&out).contains("already exists"));

    let out = run(&[
        "upload",
        &addr,
        ":upload",
        src.to_str().unwrap(),
        "--as",
        "../escape.txt",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.join("escape.txt").exists());

    let out = run(&["upload", &addr, ":upload", "/no/such/file", "--quiet"]);
    assert_eq!(out.status.code(), Some(1));

    let entries: Vec<_> = std::fs::read_dir(&store).unwrap().collect();
    assert_eq!(entries.len(), 1, "only notes.txt, no temporary left");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn send_reaches_a_listening_slic_listen() {
    let (_listener, addr, lines) = start(&["listen", "127.0.0.1:0", "--count", "1"]);
    let out = run(&["send", &addr, r#"{"hello": "world"}"#]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = lines.recv_timeout(STEP).expect("listen printed nothing");
    assert!(line.contains("from 'slic-cli'"), "{line}");
    assert!(line.contains(r#"{"hello":"world"}"#), "{line}");
}

#[test]
fn connecting_to_a_closed_port_fails_with_one_line_and_exit_1() {
    // Bind then drop a listener: the port is known to be closed (nothing listens).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(&["call", &format!("127.0.0.1:{port}"), ":echo", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: cannot connect"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["demo", "serve", "call", "send", "listen", "upload", "bench"] {
        let out = run(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{sub}");
        assert!(
            stdout(&out).contains("Example: slic"),
            "{sub} help lacks an example"
        );
    }
}
