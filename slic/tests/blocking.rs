//! The blocking facade from plain `#[test]` functions: no async runtime in the test, nodes on
//! their own std threads.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use slic::{Target, blocking};

const STEP: Duration = Duration::from_secs(10);

fn builder(name: &str) -> slic::NodeBuilder {
    slic::Node::builder().name(name)
}

/// Joins `handles`, each of which reports on `done` when it finishes; fails instead of hanging
/// if one does not finish in time, and re-raises a thread's panic.
fn join_all(handles: Vec<thread::JoinHandle<()>>, done: &mpsc::Receiver<&'static str>) {
    for _ in 0..handles.len() {
        match done.recv_timeout(2 * STEP) {
            Ok(_) => {}
            // A thread died without reporting: its panic is re-raised by join below.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a thread did not finish in time"),
        }
    }
    for h in handles {
        if let Err(panic) = h.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn the_blocking_node_round_trips_messages_between_two_std_threads() {
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    let (done_tx, done_rx) = mpsc::channel();

    let server = {
        let done = done_tx.clone();
        thread::spawn(move || {
            let node = blocking::Node::new(builder("hub")).unwrap();
            let addr = node.listen("127.0.0.1:0").unwrap();
            addr_tx.send(addr).unwrap();
            for expected in 0..3_u32 {
                let m = node
                    .receive_timeout(STEP)
                    .unwrap()
                    .expect("a message within the step");
                assert_eq!(&*m.from.name, "pc");
                let (n, text): (u32, String) = m.decode().unwrap();
                assert_eq!((n, text.as_str()), (expected, "ping"));
                node.send(Target::Peer(m.from.id), &(n, "pong")).unwrap();
            }
            let raw = node.receive_timeout(STEP).unwrap().expect("raw bytes");
            assert_eq!(&raw.body()[..], b"bye");
            assert!(
                node.receive_timeout(Duration::from_millis(200))
                    .unwrap()
                    .is_none()
            );
            node.shutdown();
            assert_eq!(node.as_async().task_count(), 0);
            done.send("server").unwrap();
        })
    };

    let client = {
        let done = done_tx;
        thread::spawn(move || {
            let addr = addr_rx.recv_timeout(STEP).expect("server address");
            let node = blocking::Node::new(builder("pc")).unwrap();
            let peer = node.connect(addr).unwrap();
            assert_eq!(node.peers().len(), 1);
            assert_eq!(&*node.peers()[0].name, "hub");
            for n in 0..3_u32 {
                node.send(Target::Peer(peer), &(n, "ping")).unwrap();
                let r = node.receive_timeout(STEP).unwrap().expect("a reply");
                assert_eq!(r.decode::<(u32, String)>().unwrap(), (n, "pong".into()));
                assert_eq!(&*r.from.name, "hub");
            }
            node.send_bytes(Target::All, &b"bye"[..]).unwrap();
            // Let the last message go out before the node disappears.
            node.disconnect(Target::All, STEP).unwrap();
            assert!(node.peers().is_empty());
            done.send("client").unwrap();
        })
    };
    join_all(vec![server, client], &done_rx);
}

/// Runs `f` on its own thread and fails if it does not finish within `2 * STEP`: the channel
/// calls of the blocking facade have no timeout of their own.
fn with_deadline(f: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = mpsc::channel();
    let h = thread::spawn(move || {
        f();
        done_tx.send("body").unwrap();
    });
    join_all(vec![h], &done_rx);
}

#[test]
fn blocking_channels_try_send_and_try_receive_work_without_a_runtime() {
    with_deadline(channels_try_send_and_try_receive);
}

fn channels_try_send_and_try_receive() {
    let server = blocking::Node::new(builder("hub")).unwrap();
    let addr = server.listen("127.0.0.1:0").unwrap();
    let client = blocking::Node::new(builder("pc")).unwrap();
    let peer = client.connect(addr).unwrap();

    // Nothing has arrived yet.
    assert!(server.try_receive().unwrap().is_none());
    client.try_send(Target::Peer(peer), &5_u64).unwrap();
    let mut got = None;
    for _ in 0..500 {
        if let Some(m) = server.try_receive().unwrap() {
            got = Some(m);
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let got = got.expect("try_receive saw the message within 5 s");
    assert_eq!(got.decode::<u64>().unwrap(), 5);

    let ours = client.open_channel(peer).unwrap();
    // The accepting side blocks in another thread while this one sends.
    thread::scope(|scope| {
        let acceptor = scope.spawn(|| {
            let theirs = server.accept_channel().unwrap();
            for i in 0..100_u32 {
                assert_eq!(theirs.receive().unwrap().decode::<u32>().unwrap(), i);
            }
            theirs.send(&"done").unwrap();
            // Keep the channel open until the opener has read the reply.
            theirs.receive().unwrap_err()
        });
        for i in 0..100_u32 {
            ours.send(&i).unwrap();
        }
        let reply = ours.receive().unwrap();
        assert_eq!(reply.decode::<String>().unwrap(), "done");
        ours.close();
        let err = acceptor.join().unwrap();
        assert!(matches!(err, slic::Error::ChannelClosed(_)), "{err}");
    });
    client.shutdown();
    server.shutdown();
}

#[test]
fn the_blocking_node_serves_and_calls_resources_uploads_and_reports_events() {
    let server = blocking::Node::new(builder("hub")).unwrap();
    server
        .create_resource(":add", |req: slic::Request<i64>| async move {
            Ok::<_, slic::Status>(req.body + 1)
        })
        .unwrap();
    let dir = std::env::temp_dir().join(format!("slic-blocking-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("store")).unwrap();
    server
        .create_upload_resource(":upload", dir.join("store"))
        .unwrap();
    let mut events = server.events();
    let addr = server.listen("127.0.0.1:0").unwrap();

    let client = blocking::Node::new(builder("pc2").request_timeout(STEP)).unwrap();
    client.connect(addr).unwrap();
    match events.recv() {
        Some(slic::Event::PeerConnected(p)) => assert_eq!(&*p.name, "pc2"),
        other => panic!("expected PeerConnected, got {other:?}"),
    }
    let answer: i64 = client.get_resource(":add", &10i64).unwrap();
    assert_eq!(answer, 11);
    assert!(matches!(
        client.get_resource::<_, i64>(":nope", &1i64),
        Err(slic::Error::Status(slic::Status::NotFound(_)))
    ));
    let src = dir.join("notes.txt");
    std::fs::write(&src, b"written without a runtime").unwrap();
    let stored = client.upload_resource(":upload", &src).unwrap();
    assert_eq!(stored.size, 25);
    assert_eq!(
        std::fs::read(dir.join("store").join("notes.txt")).unwrap(),
        b"written without a runtime"
    );
    client.shutdown();
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
