//! The `slic` binary run as a process: serve + call + send + listen + upload, exit codes
//! checked.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_slic");
/// Longest any step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(20);

/// A child process killed when the test ends, whatever happens.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a long-running subcommand and returns it with the address from its first line
/// ("listening on ADDR") and a receiver of its later stdout lines.
fn start(args: &[&str]) -> (Guard, String, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn slic");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(STEP).expect("no first line");
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    (Guard(child), addr, rx)
}

/// Runs a subcommand to completion, killing it if it outlives `STEP`.
fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn slic");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(STEP) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("slic {args:?} did not finish in {STEP:?}");
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("slic-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

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
