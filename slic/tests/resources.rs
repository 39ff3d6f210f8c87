//! Named resources over loopback: the seed's examples, statuses, the resource table's life
//! cycle, caller identity, codec interoperability, many concurrent requests, timeouts and
//! cancellation, peer choice, and malformed requests from a raw TCP client.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::wire::{self, HELLO};
use common::{builder, peer_named, shutdown_all, start_client, start_server, within};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use slic::{Codec, Error, Node, Request, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Greeting {
    message: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Add {
    a: i64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Answer {
    answer: i64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Login {
    user: String,
    password: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct LoginReply {
    login: bool,
}

/// Publishes the seed's three resources on `node`.
fn publish_seed_resources(node: &Node) {
    node.create_resource(":my_resource", |_req: Request<()>| async move {
        Ok::<_, Status>(Greeting {
            message: "Hello, World!".into(),
        })
    })
    .unwrap();
    node.create_resource(":add", |req: Request<Add>| async move {
        Ok::<_, Status>(Answer {
            answer: req.body.a + 1,
        })
    })
    .unwrap();
    node.create_resource(":login", |req: Request<Login>| async move {
        Ok::<_, Status>(LoginReply {
            login: req.body.user == "admin" && req.body.password == "secret",
        })
    })
    .unwrap();
}

/// The status inside an `Error::Status`, failing the test on any other outcome.
fn status_of<T: std::fmt::Debug>(r: Result<T, Error>) -> Status {
    match r {
        Err(Error::Status(s)) => s,
        other => panic!("expected Error::Status, got {other:?}"),
    }
}

/// Records that the handler future it lives in was dropped (finished or cancelled).
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Polls `flag` until it is set, for at most `limit`.
async fn wait_flag(flag: &AtomicBool, limit: Duration, what: &str) {
    let started = Instant::now();
    for _ in 0..10_000 {
        if flag.load(Ordering::Acquire) {
            return;
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up polling: {what}");
}

#[tokio::test]
async fn the_seed_examples_answer_hello_world_eleven_and_login_true() {
    let (server, addr) = start_server(builder("hub")).await;
    publish_seed_resources(&server);

    // A JSON client reads the replies as plain JSON values, as the seed shows them.
    let (json_client, _) = start_client(builder("pc-json").codec(Codec::Json), addr).await;
    let hello: Value = within("my_resource", json_client.get_resource(":my_resource", &()))
        .await
        .unwrap();
    assert_eq!(hello, json!({"message": "Hello, World!"}));
    let sum: Value = within("add", json_client.get_resource(":add", &json!({"a": 10})))
        .await
        .unwrap();
    assert_eq!(sum, json!({"answer": 11}));
    let login: Value = within(
        "login",
        json_client.get_resource(":login", &json!({"user": "admin", "password": "secret"})),
    )
    .await
    .unwrap();
    assert_eq!(login, json!({"login": true}));

    // A default (postcard) client reads the same replies as structs.
    let (typed, _) = start_client(builder("pc-typed"), addr).await;
    let hello: Greeting = within("typed my_resource", typed.get_resource(":my_resource", &()))
        .await
        .unwrap();
    assert_eq!(hello.message, "Hello, World!");
    let sum: Answer = within(
        "typed add",
        typed.get_resource_from(typed.peers()[0].id, ":add", &Add { a: 10 }),
    )
    .await
    .unwrap();
    assert_eq!(sum, Answer { answer: 11 });
    let wrong = Login {
        user: "admin".into(),
        password: "guess".into(),
    };
    let login: LoginReply = within("typed login", typed.get_resource(":login", &wrong))
        .await
        .unwrap();
    assert_eq!(login, LoginReply { login: false });
    shutdown_all(&[&json_client, &typed, &server]).await;
}

#[tokio::test]
async fn an_unknown_resource_name_is_not_found() {
    let (server, addr) = start_server(builder("hub")).await;
    publish_seed_resources(&server);
    let (client, _) = start_client(builder("pc"), addr).await;
    let r = within("unknown", client.get_resource::<_, Answer>(":nope", &())).await;
    match status_of(r) {
        Status::NotFound(detail) => assert!(detail.contains(":nope"), "{detail:?}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Names are exact: no prefix or case folding.
    let r = within(
        "prefix",
        client.get_resource::<_, Answer>(":ad", &Add { a: 1 }),
    )
    .await;
    assert!(matches!(status_of(r), Status::NotFound(_)));
    let r = within(
        "case",
        client.get_resource::<_, Answer>(":ADD", &Add { a: 1 }),
    )
    .await;
    assert!(matches!(status_of(r), Status::NotFound(_)));
    // A name the wire cannot carry is refused locally.
    let long = format!(":{}", "x".repeat(slic::MAX_RESOURCE_NAME));
    let r = within("too long", client.get_resource::<_, Answer>(&long, &())).await;
    assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test]
async fn a_payload_of_the_wrong_shape_is_a_bad_request_and_the_handler_is_not_called() {
    let (server, addr) = start_server(builder("hub")).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    server
        .create_resource(":add", move |req: Request<Add>| {
            seen.fetch_add(1, Ordering::Relaxed);
            async move {
                Ok::<_, Status>(Answer {
                    answer: req.body.a + 1,
                })
            }
        })
        .unwrap();
    let (json_client, _) = start_client(builder("pc-json").codec(Codec::Json), addr).await;
    for bad in [
        json!({"b": 10}),
        json!({"a": "ten"}),
        json!("ten"),
        json!(null),
    ] {
        let r = within(
            "bad json",
            json_client.get_resource::<_, Value>(":add", &bad),
        )
        .await;
        assert!(
            matches!(status_of(r), Status::BadRequest(_)),
            "payload {bad}"
        );
    }
    // postcard is not self-describing: an empty body is too short for an i64.
    let (typed, _) = start_client(builder("pc-typed"), addr).await;
    let r = within("bad postcard", typed.get_resource::<_, Answer>(":add", &())).await;
    assert!(matches!(status_of(r), Status::BadRequest(_)));
    assert_eq!(
        calls.load(Ordering::Relaxed),
        0,
        "handler ran for a bad payload"
    );
    // The same connection then serves a good payload.
    let ok: Value = within(
        "good json",
        json_client.get_resource(":add", &json!({"a": 1})),
    )
    .await
    .unwrap();
    assert_eq!(ok, json!({"answer": 2}));
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    shutdown_all(&[&json_client, &typed, &server]).await;
}

#[tokio::test]
async fn a_handler_that_panics_is_internal_and_the_next_call_on_the_same_connection_works() {
    let (server, addr) = start_server(builder("hub")).await;
    server
        .create_resource(":sqrt", |req: Request<Add>| async move {
            assert!(req.body.a >= 0, "negative input, the handler panics");
            Ok::<_, Status>(Answer {
                answer: req.body.a.isqrt(),
            })
        })
        .unwrap();
    let (client, peer) = start_client(builder("pc"), addr).await;
    for round in 0..3 {
        let r = within(
            "panic",
            client.get_resource::<_, Answer>(":sqrt", &Add { a: -1 }),
        )
        .await;
        assert!(matches!(status_of(r), Status::Internal(_)), "round {round}");
        let ok: Answer = within("after panic", client.get_resource(":sqrt", &Add { a: 49 }))
            .await
            .unwrap();
        assert_eq!(ok, Answer { answer: 7 });
    }
    // Still the same connection on both sides.
    assert_eq!(client.peers().len(), 1);
    assert_eq!(client.peers()[0].id, peer);
    peer_named(&server, "pc");
    shutdown_all(&[&client, &server]).await;
}

/// The tokio task a handler's code ran in, one per call.
type TaskIds = Arc<Mutex<Vec<tokio::task::Id>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_ready_at_once_is_served_in_the_connection_task_and_one_that_waits_in_its_own() {
    let (server, addr) = start_server(builder("hub")).await;
    let (at_once, waits): (TaskIds, TaskIds) = Default::default();
    let ids = at_once.clone();
    server
        .create_resource(":now", move |req: Request<Add>| {
            let ids = ids.clone();
            async move {
                ids.lock().unwrap().push(tokio::task::id());
                Ok::<_, Status>(Answer { answer: req.body.a })
            }
        })
        .unwrap();
    let ids = waits.clone();
    server
        .create_resource(":later", move |req: Request<Add>| {
            let ids = ids.clone();
            async move {
                // Registers a timer at the first poll, whose waker must be replaced by the
                // one of the task the handler moves into, or the reply never comes.
                tokio::time::sleep(Duration::from_millis(5)).await;
                ids.lock().unwrap().push(tokio::task::id());
                Ok::<_, Status>(Answer {
                    answer: -req.body.a,
                })
            }
        })
        .unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;
    for a in 0..4 {
        let now: Answer = within("now", client.get_resource(":now", &Add { a }))
            .await
            .unwrap();
        let later: Answer = within("later", client.get_resource(":later", &Add { a }))
            .await
            .unwrap();
        assert_eq!((now.answer, later.answer), (a, -a));
    }
    let at_once = at_once.lock().unwrap().clone();
    let waits = waits.lock().unwrap().clone();
    assert_eq!(at_once.len(), 4);
    assert!(
        at_once.iter().all(|id| *id == at_once[0]),
        "ready handlers ran in one task, the connection's: {at_once:?}"
    );
    let mut distinct = waits.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        4,
        "each waiting handler had its own task: {waits:?}"
    );
    assert!(!waits.contains(&at_once[0]));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test]
async fn creating_a_taken_name_is_resource_exists_and_a_removed_resource_is_not_found() {
    let (server, addr) = start_server(builder("hub")).await;
    publish_seed_resources(&server);
    let again = server.create_resource(":add", |_r: Request<Add>| async move {
        Ok::<_, Status>(Answer { answer: 0 })
    });
    assert!(
        matches!(again, Err(Error::ResourceExists(ref n)) if n == ":add"),
        "{again:?}"
    );
    // Resources and upload resources share one name space.
    let dir = std::env::temp_dir();
    let upload = server.create_upload_resource(":add", &dir);
    assert!(
        matches!(upload, Err(Error::ResourceExists(_))),
        "{upload:?}"
    );
    // Empty and over-long names are configuration errors.
    let empty = server.create_resource("", |_r: Request<()>| async move { Ok::<_, Status>(()) });
    assert!(matches!(empty, Err(Error::Config(_))), "{empty:?}");
    let long = "n".repeat(slic::MAX_RESOURCE_NAME + 1);
    let long = server.create_resource(&long, |_r: Request<()>| async move { Ok::<_, Status>(()) });
    assert!(matches!(long, Err(Error::Config(_))), "{long:?}");

    let (client, _) = start_client(builder("pc"), addr).await;
    // The first handler still answers: the refused create changed nothing.
    let ok: Answer = within("add", client.get_resource(":add", &Add { a: 10 }))
        .await
        .unwrap();
    assert_eq!(ok.answer, 11);

    assert!(server.remove_resource(":add"));
    assert!(!server.remove_resource(":add"), "removed twice");
    let r = within(
        "removed",
        client.get_resource::<_, Answer>(":add", &Add { a: 10 }),
    )
    .await;
    assert!(matches!(status_of(r), Status::NotFound(_)));
    // The others are untouched, and the name can be published again.
    let hello: Greeting = within("my_resource", client.get_resource(":my_resource", &()))
        .await
        .unwrap();
    assert_eq!(hello.message, "Hello, World!");
    server
        .create_resource(":add", |req: Request<Add>| async move {
            Ok::<_, Status>(Answer {
                answer: req.body.a + 100,
            })
        })
        .unwrap();
    let ok: Answer = within("re-added", client.get_resource(":add", &Add { a: 10 }))
        .await
        .unwrap();
    assert_eq!(ok.answer, 110);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_resource_changes_the_answer_while_a_request_to_the_old_handler_finishes() {
    let (server, addr) = start_server(builder("hub")).await;
    let release = Arc::new(tokio::sync::Notify::new());
    let entered = Arc::new(AtomicBool::new(false));
    let (r, e) = (release.clone(), entered.clone());
    server
        .create_resource(":version", move |_req: Request<()>| {
            let (r, e) = (r.clone(), e.clone());
            async move {
                e.store(true, Ordering::Release);
                r.notified().await;
                Ok::<_, Status>(1_u32)
            }
        })
        .unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;

    // A request is running in the old handler when the update happens.
    let old_call = {
        let client = client.clone();
        tokio::spawn(async move { client.get_resource::<_, u32>(":version", &()).await })
    };
    wait_flag(&entered, Duration::from_secs(5), "old handler entered").await;
    server
        .update_resource(":version", |_req: Request<()>| async move {
            Ok::<_, Status>(2_u32)
        })
        .unwrap();
    for _ in 0..3 {
        let v: u32 = within("new version", client.get_resource(":version", &()))
            .await
            .unwrap();
        assert_eq!(v, 2);
    }
    release.notify_one();
    let old = within("old call", old_call).await.unwrap().unwrap();
    assert_eq!(
        old, 1,
        "the request already running finished with the old handler"
    );

    // Updating a name that does not exist is NotFound and creates nothing.
    let missing = server.update_resource(":missing", |_r: Request<()>| async move {
        Ok::<_, Status>(0_u32)
    });
    assert!(
        matches!(missing, Err(Error::Status(Status::NotFound(_)))),
        "{missing:?}"
    );
    let r = within("missing", client.get_resource::<_, u32>(":missing", &())).await;
    assert!(matches!(status_of(r), Status::NotFound(_)));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test]
async fn clear_resources_removes_every_resource_and_upload_resource() {
    let (server, addr) = start_server(builder("hub")).await;
    publish_seed_resources(&server);
    server
        .create_upload_resource(":upload", std::env::temp_dir())
        .unwrap();
    let (client, _) = start_client(builder("pc"), addr).await;
    let ok: Answer = within("add", client.get_resource(":add", &Add { a: 1 }))
        .await
        .unwrap();
    assert_eq!(ok.answer, 2);

    server.clear_resources();
    for name in [":my_resource", ":add", ":login"] {
        let r = within("cleared", client.get_resource::<_, Value>(name, &())).await;
        assert!(matches!(status_of(r), Status::NotFound(_)), "{name}");
    }
    assert!(
        !server.remove_resource(":upload"),
        "upload resource survived"
    );
    // Every name is free again.
    publish_seed_resources(&server);
    server
        .create_upload_resource(":upload", std::env::temp_dir())
        .unwrap();
    let ok: Answer = within("add again", client.get_resource(":add", &Add { a: 2 }))
        .await
        .unwrap();
    assert_eq!(ok.answer, 3);
    shutdown_all(&[&client, &server]).await;
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Caller {
    name: String,
    resource: String,
    loopback: bool,
    id: u64,
}

#[tokio::test]
async fn the_handler_sees_the_name_of_the_node_that_called() {
    let (server, addr) = start_server(builder("hub")).await;
    server
        .create_resource(":whoami", |req: Request<()>| async move {
            Ok::<_, Status>(Caller {
                name: req.from.name.to_string(),
                resource: req.resource.to_string(),
                loopback: req.from.addr.ip().is_loopback(),
                id: req.from.id.0,
            })
        })
        .unwrap();
    let (alice, _) = start_client(builder("alice"), addr).await;
    let (bob, _) = start_client(builder("bob").codec(Codec::MessagePack), addr).await;
    for (node, name) in [(&alice, "alice"), (&bob, "bob"), (&alice, "alice")] {
        let who: Caller = within("whoami", node.get_resource(":whoami", &()))
            .await
            .unwrap();
        assert_eq!(who.name, name);
        assert_eq!(who.resource, ":whoami");
        assert!(who.loopback);
        assert_eq!(who.id, peer_named(&server, name).0);
    }
    shutdown_all(&[&alice, &bob, &server]).await;
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Order {
    item: String,
    qty: u32,
    price_cents: i64,
    tags: Vec<String>,
    note: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Invoice {
    total_cents: i64,
    lines: Vec<(String, u32)>,
    served_by: String,
    urgent: bool,
}

#[tokio::test]
async fn every_client_codec_gets_a_correct_typed_reply_from_every_server_codec() {
    let codecs = [Codec::Postcard, Codec::Json, Codec::MessagePack];
    for server_codec in codecs {
        let name = format!("srv-{server_codec:?}");
        let (server, addr) = start_server(builder(&name).codec(server_codec)).await;
        server
            .create_resource(":invoice", |req: Request<Order>| async move {
                let o = req.body;
                Ok::<_, Status>(Invoice {
                    total_cents: o.price_cents * i64::from(o.qty),
                    lines: o.tags.iter().map(|t| (t.clone(), o.qty)).collect(),
                    served_by: req.from.name.to_string(),
                    urgent: o.note.is_some(),
                })
            })
            .unwrap();
        for client_codec in codecs {
            let cname = format!("cli-{client_codec:?}");
            let (client, _) = start_client(builder(&cname).codec(client_codec), addr).await;
            let order = Order {
                item: "héllo wörld".into(),
                qty: 3,
                price_cents: -250,
                tags: vec!["a".into(), String::new(), "ç".into()],
                note: Some("fast".into()),
            };
            let inv: Invoice = within("invoice", client.get_resource(":invoice", &order))
                .await
                .unwrap_or_else(|e| panic!("{client_codec:?} -> {server_codec:?}: {e}"));
            assert_eq!(
                inv,
                Invoice {
                    total_cents: -750,
                    lines: vec![("a".into(), 3), (String::new(), 3), ("ç".into(), 3)],
                    served_by: cname.clone(),
                    urgent: true,
                },
                "{client_codec:?} -> {server_codec:?}"
            );
            // Self-describing codecs can also be read without the type.
            if client_codec != Codec::Postcard {
                let v: Value = within("untyped", client.get_resource(":invoice", &order))
                    .await
                    .unwrap();
                assert_eq!(v["total_cents"], json!(-750), "{client_codec:?}");
                assert_eq!(v["served_by"], json!(cname));
            }
            shutdown_all(&[&client]).await;
        }
        shutdown_all(&[&server]).await;
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Copy)]
struct Job {
    client: u32,
    seq: u32,
    x: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct JobDone {
    client: u32,
    seq: u32,
    y: u64,
}

/// A pseudo-random delay of 0 to 20 ms derived from the job (splitmix64).
fn delay_for(job: &Job) -> Duration {
    let mut z =
        (u64::from(job.client) << 32 | u64::from(job.seq)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    Duration::from_millis(z % 21)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_with_a_thousand_concurrent_requests_each_get_every_reply_to_the_right_caller()
{
    const CLIENTS: u32 = 10;
    const REQUESTS: u32 = 1_000;
    let (server, addr) = start_server(builder("hub")).await;
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    server
        .create_resource(":work", move |req: Request<Job>| {
            let count = count.clone();
            async move {
                let job = req.body;
                // The reply says who the server thinks called, so a mix-up of connections
                // shows too.
                let expected = format!("worker-{}", job.client);
                if *req.from.name != *expected {
                    return Err(Status::BadRequest(format!(
                        "{} sent {job:?}",
                        req.from.name
                    )));
                }
                tokio::time::sleep(delay_for(&job)).await;
                count.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Status>(JobDone {
                    client: job.client,
                    seq: job.seq,
                    y: job.x.wrapping_mul(3).wrapping_add(1),
                })
            }
        })
        .unwrap();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (node, _) = start_client(builder(&format!("worker-{c}")), addr).await;
        clients.push(node);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, node) in (0..CLIENTS).zip(clients.iter().cloned()) {
        tasks.push(tokio::spawn(async move {
            // Order in which the replies came back to their callers.
            let finished = Mutex::new(Vec::with_capacity(REQUESTS as usize));
            let calls = (0..REQUESTS).map(|seq| {
                let (node, finished) = (&node, &finished);
                async move {
                    let job = Job {
                        client: c,
                        seq,
                        x: u64::from(c) * 1_000_003 + u64::from(seq) * 7,
                    };
                    let done: JobDone = node.get_resource(":work", &job).await?;
                    finished.lock().unwrap().push(seq);
                    Ok::<_, Error>((job, done))
                }
            });
            let results = join_all(calls).await;
            (results, finished.into_inner().unwrap())
        }));
    }
    let mut out_of_order = 0;
    for (c, task) in (0..CLIENTS).zip(tasks) {
        let (results, finished) = within("client batch", task).await.unwrap();
        assert_eq!(results.len(), REQUESTS as usize);
        for r in results {
            let (job, done) = r.unwrap_or_else(|e| panic!("client {c}: {e}"));
            assert_eq!(
                done,
                JobDone {
                    client: c,
                    seq: job.seq,
                    y: job.x * 3 + 1,
                }
            );
        }
        assert_eq!(finished.len(), REQUESTS as usize);
        out_of_order += finished.windows(2).filter(|w| w[0] > w[1]).count();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{} requests from {CLIENTS} clients answered in {elapsed:?}",
        CLIENTS * REQUESTS
    );
    assert_eq!(
        served.load(Ordering::Relaxed),
        (CLIENTS * REQUESTS) as usize
    );
    // With delays of 0 to 20 ms, later requests overtake earlier ones all the time; each
    // still reached the caller that asked.
    assert!(
        out_of_order > 100,
        "only {out_of_order} replies out of order"
    );
    let nodes: Vec<&Node> = clients.iter().chain([&server]).collect();
    shutdown_all(&nodes).await;
}

/// A resource whose handler would sleep 5 s, recording whether it started, finished its
/// sleep, and was dropped.
struct Sleeper {
    started: Arc<AtomicBool>,
    completed: Arc<AtomicBool>,
    dropped: Arc<AtomicBool>,
}

fn publish_sleeper(node: &Node) -> Sleeper {
    let s = Sleeper {
        started: Arc::default(),
        completed: Arc::default(),
        dropped: Arc::default(),
    };
    let (started, completed, dropped) = (s.started.clone(), s.completed.clone(), s.dropped.clone());
    node.create_resource(":sleep", move |_req: Request<()>| {
        let (started, completed, dropped) = (started.clone(), completed.clone(), dropped.clone());
        async move {
            let _guard = DropFlag(dropped);
            started.store(true, Ordering::Release);
            tokio::time::sleep(Duration::from_secs(5)).await;
            completed.store(true, Ordering::Release);
            Ok::<_, Status>(0_u8)
        }
    })
    .unwrap();
    node.create_resource(":fast", |req: Request<u32>| async move {
        Ok::<_, Status>(req.body + 1)
    })
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_client_timeout_is_timeout_and_the_handler_is_cancelled() {
    let (server, addr) = start_server(builder("hub")).await;
    let sleeper = publish_sleeper(&server);
    let (client, _) = start_client(
        builder("pc").request_timeout(Duration::from_millis(200)),
        addr,
    )
    .await;
    let t0 = Instant::now();
    let r = within("slow call", client.get_resource::<_, u8>(":sleep", &())).await;
    let took = t0.elapsed();
    assert_eq!(status_of(r), Status::Timeout);
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
        "timed out after {took:?}"
    );
    assert!(sleeper.started.load(Ordering::Acquire), "handler never ran");
    // The CANCEL reaches the server and its handler future is dropped mid-sleep.
    wait_flag(
        &sleeper.dropped,
        Duration::from_secs(2),
        "handler dropped after the client's timeout",
    )
    .await;
    assert!(
        !sleeper.completed.load(Ordering::Acquire),
        "the handler ran to completion"
    );
    // The connection carries on.
    let n: u32 = within("fast call", client.get_resource(":fast", &41_u32))
        .await
        .unwrap();
    assert_eq!(n, 42);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_get_resource_future_cancels_the_handler_on_the_server() {
    let (server, addr) = start_server(builder("hub")).await;
    let sleeper = publish_sleeper(&server);
    let (client, _) = start_client(builder("pc"), addr).await;
    let t0 = Instant::now();
    tokio::select! {
        r = client.get_resource::<_, u8>(":sleep", &()) => panic!("answered: {r:?}"),
        () = tokio::time::sleep(Duration::from_millis(150)) => {}
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    wait_flag(&sleeper.started, Duration::from_secs(2), "handler started").await;
    wait_flag(
        &sleeper.dropped,
        Duration::from_secs(2),
        "handler dropped after the caller gave up",
    )
    .await;
    assert!(!sleeper.completed.load(Ordering::Acquire));
    let n: u32 = within("fast call", client.get_resource(":fast", &1_u32))
        .await
        .unwrap();
    assert_eq!(n, 2);
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_the_server_shuts_down_fails_unavailable_at_once() {
    let (server, addr) = start_server(builder("hub")).await;
    let sleeper = publish_sleeper(&server);
    let (client, _) = start_client(builder("pc"), addr).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.get_resource::<_, u8>(":sleep", &()).await })
    };
    wait_flag(&sleeper.started, Duration::from_secs(5), "handler started").await;
    let t0 = Instant::now();
    within("server shutdown", server.shutdown()).await;
    let r = within("call after shutdown", call).await.unwrap();
    assert!(
        matches!(status_of(r), Status::Unavailable(_)),
        "the caller was not told the connection is gone"
    );
    // Long before the client's 30 s request timeout.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    wait_flag(&sleeper.dropped, Duration::from_secs(2), "handler dropped").await;
    assert!(!sleeper.completed.load(Ordering::Acquire));
    shutdown_all(&[&client, &server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_requests_in_flight_are_unavailable_at_once_for_that_peer_only() {
    let (server, addr) = start_server(builder("hub").max_requests_in_flight(2)).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let (g, n) = (gate.clone(), inside.clone());
    server
        .create_resource(":gate", move |req: Request<u32>| {
            let (g, n) = (g.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::AcqRel);
                let _permit = g
                    .acquire()
                    .await
                    .map_err(|e| Status::Internal(e.to_string()))?;
                Ok::<_, Status>(req.body)
            }
        })
        .unwrap();
    let (busy, _) = start_client(builder("busy"), addr).await;
    let (other, _) = start_client(builder("other"), addr).await;
    let held: Vec<_> = (0..2_u32)
        .map(|i| {
            let busy = busy.clone();
            tokio::spawn(async move { busy.get_resource::<_, u32>(":gate", &i).await })
        })
        .collect();
    let started = Instant::now();
    for _ in 0..1_000 {
        if inside.load(Ordering::Acquire) == 2 {
            break;
        }
        assert!(started.elapsed() < common::STEP, "handlers did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let r = within("third call", busy.get_resource::<_, u32>(":gate", &9_u32)).await;
    assert!(matches!(status_of(r), Status::Unavailable(_)));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Another peer has its own budget.
    let third = {
        let other = other.clone();
        tokio::spawn(async move { other.get_resource::<_, u32>(":gate", &7_u32).await })
    };
    gate.add_permits(3);
    assert_eq!(within("other", third).await.unwrap().unwrap(), 7);
    for (i, h) in (0..2_u32).zip(held) {
        assert_eq!(within("held", h).await.unwrap().unwrap(), i);
    }
    // Once answered, the slots are free again.
    gate.add_permits(1);
    let v: u32 = within("after", busy.get_resource(":gate", &5_u32))
        .await
        .unwrap();
    assert_eq!(v, 5);
    shutdown_all(&[&busy, &other, &server]).await;
}

#[tokio::test]
async fn with_two_peers_get_resource_is_ambiguous_and_get_resource_from_reaches_either() {
    let (a, addr_a) = start_server(builder("server-a")).await;
    let (b, addr_b) = start_server(builder("server-b")).await;
    for node in [&a, &b] {
        let me = node.name().to_owned();
        node.create_resource(":who", move |_req: Request<()>| {
            let me = me.clone();
            async move { Ok::<_, Status>(me) }
        })
        .unwrap();
    }
    let client = builder("pc").build().unwrap();
    let r = within("no peers", client.get_resource::<_, String>(":who", &())).await;
    assert!(matches!(r, Err(Error::NoPeers)), "{r:?}");

    let pa = within("connect a", client.connect(addr_a)).await.unwrap();
    let only: String = within("one peer", client.get_resource(":who", &()))
        .await
        .unwrap();
    assert_eq!(only, "server-a");
    let pb = within("connect b", client.connect(addr_b)).await.unwrap();
    let r = within("ambiguous", client.get_resource::<_, String>(":who", &())).await;
    assert!(matches!(r, Err(Error::AmbiguousPeer)), "{r:?}");
    for (peer, expected) in [(pa, "server-a"), (pb, "server-b"), (pa, "server-a")] {
        let who: String = within("from", client.get_resource_from(peer, ":who", &()))
            .await
            .unwrap();
        assert_eq!(who, expected);
    }
    shutdown_all(&[&client, &a, &b]).await;
}

// --- Raw TCP client speaking the wire format by hand ---------------------------------------

const REQUEST: u8 = 4;
const RESPONSE: u8 = 5;
const JSON: u8 = 3;

/// Completes a handshake by hand and returns the socket.
async fn raw_handshake(addr: SocketAddr, name: &[u8]) -> TcpStream {
    let mut s = within("raw connect", TcpStream::connect(addr))
        .await
        .unwrap();
    // Small frames written one by one: without this, Nagle's algorithm and delayed ACKs
    // stall each exchange by some 40 ms.
    s.set_nodelay(true).unwrap();
    let hello = wire::handshake_frame(HELLO, *b"SLIC", name);
    within("write HELLO", s.write_all(&hello)).await.unwrap();
    let (h, _) = wire::read_frame(&mut s).await;
    assert_eq!(h.ty, wire::WELCOME, "{h:?}");
    s
}

/// Sends a REQUEST frame with a JSON codec byte and returns the matching RESPONSE:
/// (status code, detail, codec byte, body).
async fn raw_request(s: &mut TcpStream, id: u64, payload: &[u8]) -> (u16, String, u8, Vec<u8>) {
    let mut frame = wire::header(REQUEST, 0, id, u32::try_from(payload.len()).unwrap()).to_vec();
    frame[3] = JSON;
    frame.extend_from_slice(payload);
    within("write REQUEST", s.write_all(&frame)).await.unwrap();
    // Skip what else the server sends (PING, WINDOW_UPDATE); bounded.
    for _ in 0..100 {
        let (h, p) = wire::read_frame(s).await;
        assert_ne!(h.ty, wire::ERROR, "the server closed the connection: {p:?}");
        assert_ne!(h.ty, wire::GOAWAY, "the server closed the connection");
        if h.ty != RESPONSE {
            continue;
        }
        assert_eq!((h.id, h.channel), (id, 0), "{h:?}");
        assert!(p.len() >= 8, "short RESPONSE payload {p:?}");
        let code = u16::from_be_bytes([p[0], p[1]]);
        let detail_len = usize::from(u16::from_be_bytes([p[6], p[7]]));
        let detail = String::from_utf8(p[8..8 + detail_len].to_vec()).unwrap();
        return (code, detail, h.codec, p[8 + detail_len..].to_vec());
    }
    panic!("no RESPONSE among 100 frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_a_handler_sends_before_it_returns_goes_out_before_the_reply() {
    let (server, addr) = start_server(builder("hub")).await;
    let node = server.clone();
    server
        .create_resource(":notify", move |req: Request<Add>| {
            let node = node.clone();
            async move {
                node.send(slic::Target::Peer(req.from.id), &req.body.a)
                    .await
                    .map_err(|e| Status::Internal(e.to_string()))?;
                Ok::<_, Status>(Answer {
                    answer: -req.body.a,
                })
            }
        })
        .unwrap();
    let mut s = raw_handshake(addr, b"raw").await;
    for id in 1..=20_u64 {
        let payload = format!("\x07:notify{{\"a\":{id}}}");
        let len = u32::try_from(payload.len()).unwrap();
        let mut frame = wire::header(REQUEST, 0, id, len).to_vec();
        frame[3] = JSON;
        frame.extend_from_slice(payload.as_bytes());
        within("write REQUEST", s.write_all(&frame)).await.unwrap();
        // The frames up to the RESPONSE, in wire order (PING, WINDOW_UPDATE may mix in).
        let mut seen = Vec::new();
        for _ in 0..100 {
            let (h, _) = wire::read_frame(&mut s).await;
            assert!(
                ![wire::ERROR, wire::GOAWAY].contains(&h.ty),
                "closed: {h:?}"
            );
            seen.push(h.ty);
            if h.ty == RESPONSE {
                break;
            }
        }
        assert_eq!(seen.last(), Some(&RESPONSE), "no RESPONSE: {seen:?}");
        assert!(
            seen.contains(&wire::MESSAGE),
            "request {id}: the reply went out before the message its handler sent: {seen:?}"
        );
    }
    shutdown_all(&[&server]).await;
}

#[tokio::test]
async fn malformed_request_headers_from_a_raw_client_are_bad_requests_and_the_connection_stays() {
    let (server, addr) = start_server(builder("hub")).await;
    publish_seed_resources(&server);
    let mut s = raw_handshake(addr, b"raw").await;

    let malformed: [&[u8]; 6] = [
        b"",                  // no name length
        b"\x00",              // zero-length name
        b"\x00{}",            // zero-length name with a body
        b"\x05:ad",           // name shorter than its length
        b"\x02\xff\xfe{}",    // name not UTF-8
        b"\xff:add{\"a\":1}", // length far past the payload
    ];
    for (i, bad) in (1_u64..).zip(malformed) {
        let (code, detail, _, body) = raw_request(&mut s, i, bad).await;
        assert_eq!(
            code, 1,
            "BadRequest expected for {bad:?}, got {code} {detail:?}"
        );
        assert!(body.is_empty(), "{body:?}");
    }
    // A well-formed request on the same connection is served.
    let (code, detail, codec, body) = raw_request(&mut s, 100, b"\x04:add{\"a\":10}").await;
    assert_eq!((code, detail.as_str()), (0, ""));
    assert_eq!(codec, JSON, "a JSON request gets a JSON reply");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, json!({"answer": 11}));
    // A well-formed header with a body of the wrong shape, and an unknown name.
    let (code, _, _, _) = raw_request(&mut s, 101, b"\x04:add{\"a\":true}").await;
    assert_eq!(code, 1);
    let (code, detail, _, _) = raw_request(&mut s, 102, b"\x05:nope{}").await;
    assert_eq!(code, 2);
    assert!(detail.contains(":nope"), "{detail:?}");
    let (code, _, _, body) = raw_request(&mut s, 103, b"\x04:add{\"a\":-5}").await;
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"answer": -4})
    );

    // The raw client is still a peer, and a normal client is served alongside it.
    peer_named(&server, "raw");
    let (client, _) = start_client(builder("pc"), addr).await;
    let ok: Answer = within("normal client", client.get_resource(":add", &Add { a: 1 }))
        .await
        .unwrap();
    assert_eq!(ok.answer, 2);
    drop(s);
    shutdown_all(&[&client, &server]).await;
}
