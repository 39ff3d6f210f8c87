//! The orchestrator: starts a server and a client process per case, collects what the
//! clients measured, and prints one markdown table with every figure next to its ratio to
//! raw blocking TCP in the same case and condition.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::case::{Case, Outcome};

/// A system under test: `(system, variant, label)`. Owned strings only for the slic
/// variants named on the command line.
type System = (&'static str, Cow<'static, str>, Cow<'static, str>);

const fn system(name: &'static str, variant: &'static str, label: &'static str) -> System {
    (name, Cow::Borrowed(variant), Cow::Borrowed(label))
}

const RAW: System = system("raw", "blocking", "raw blocking TCP");
const RAW_TOKIO: System = system("raw", "tokio", "raw tokio TCP");
const SLIC: System = system("slic", "tcp", "slic (TCP)");
const ZMQ_REQ: System = system("zmq", "reqrep", "ZeroMQ REQ/REP");
const ZMQ_PUSH: System = system("zmq", "pushpull", "ZeroMQ PUSH/PULL");
const ZMQ_DEALER: System = system("zmq", "dealer", "ZeroMQ DEALER/ROUTER");
const GRPC_UNARY: System = system("grpc", "unary", "gRPC tonic unary");
const GRPC_STREAM: System = system("grpc", "stream", "gRPC tonic stream");

/// Whether the cores idle between messages or have a low-priority busy loop each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Condition {
    /// Nothing else runs: a waiting thread's CPU halts and wakes slowly.
    Idle,
    /// One `nice -n 19` spin loop per core beside the benchmark.
    Busy,
}

/// One measured row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// The case's title, e.g. "round trip 64 B, saturated".
    pub case: String,
    /// The condition it ran in.
    pub condition: Condition,
    /// Which system.
    pub system: String,
    /// What the client measured, or why not.
    pub result: Result<Measured, String>,
}

/// A client's outcome, with the CPU time both processes spent and the server's memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    /// What the client reported.
    pub outcome: Outcome,
    /// CPU seconds of client and server together while the client ran.
    pub cpu_seconds: f64,
    /// Wall-clock seconds the client ran.
    pub wall_seconds: f64,
    /// Server memory (resident set) added per connection, in bytes, for `Connections`.
    pub bytes_per_conn: Option<f64>,
}

/// Extra slic variants to measure beside the default (`--slic tcp-park,tcp-spin200`).
fn extra_slic(plan: &Plan) -> Vec<System> {
    plan.slic_variants
        .iter()
        .map(|v| {
            (
                "slic",
                Cow::Owned(v.clone()),
                Cow::Owned(format!("slic ({v})")),
            )
        })
        .collect()
}

/// What `slic-bench run` was asked for.
pub struct Plan {
    /// Smaller counts and fewer cases: a smoke run that checks everything still works.
    pub quick: bool,
    /// Where the table, the JSON rows and the SVG go.
    pub out: PathBuf,
    /// Only cases whose title contains this.
    pub only: Option<String>,
    /// Only these systems (labels containing one of these), when not empty.
    pub systems: Vec<String>,
    /// More slic variants to run beside `tcp`, e.g. `tcp-park`, `tcp-spin200`.
    pub slic_variants: Vec<String>,
}

struct Job {
    case: Case,
    title: String,
    conditions: &'static [Condition],
    systems: Vec<System>,
}

fn jobs(quick: bool) -> Vec<Job> {
    let both: &'static [Condition] = &[Condition::Idle, Condition::Busy];
    let idle: &'static [Condition] = &[Condition::Idle];
    let scale = |n: usize| if quick { (n / 50).max(20) } else { n };
    let mut jobs = Vec::new();
    let rtt_systems = vec![RAW, RAW_TOKIO, SLIC, ZMQ_REQ, GRPC_UNARY, GRPC_STREAM];
    let sizes: &[usize] = if quick { &[64] } else { &[64, 1024, 65536] };
    for &size in sizes {
        let sat = if size >= 65536 { 5_000 } else { 20_000 };
        let paced: &[(u32, usize)] = if quick {
            &[(1000, 20)]
        } else {
            &[(1000, 3_000), (10_000, 20_000)]
        };
        jobs.push(Job {
            case: Case::RoundTrip {
                size,
                count: scale(sat),
                warmup: scale(sat / 10),
                rate: None,
            },
            title: format!("round trip {}, saturated", bytes(size)),
            conditions: both,
            systems: rtt_systems.clone(),
        });
        for &(rate, count) in paced {
            jobs.push(Job {
                case: Case::RoundTrip {
                    size,
                    count,
                    warmup: count / 20,
                    rate: Some(rate),
                },
                title: format!("round trip {}, paced {rate}/s", bytes(size)),
                conditions: both,
                systems: rtt_systems.clone(),
            });
        }
    }
    let stream: &[(usize, usize)] = if quick {
        &[(64, 20_000), (1 << 20, 20)]
    } else {
        &[(64, 3_000_000), (1024, 1_000_000), (1 << 20, 3_000)]
    };
    for &(size, count) in stream {
        jobs.push(Job {
            case: Case::Stream {
                size,
                count,
                warmup: count / 10,
            },
            title: format!("one-way stream {}", bytes(size)),
            conditions: idle,
            systems: vec![RAW, RAW_TOKIO, SLIC, ZMQ_PUSH, GRPC_STREAM],
        });
    }
    for in_flight in [1usize, 64] {
        let count = if in_flight == 1 { 30_000 } else { 300_000 };
        let zmq = if in_flight == 1 { ZMQ_REQ } else { ZMQ_DEALER };
        jobs.push(Job {
            case: Case::Requests {
                size: 64,
                count: scale(count),
                warmup: scale(count / 10),
                in_flight,
            },
            title: format!("requests 64 B, {in_flight} in flight"),
            conditions: idle,
            systems: vec![RAW, RAW_TOKIO, SLIC, zmq, GRPC_UNARY],
        });
    }
    jobs.push(Job {
        case: Case::Connections {
            conns: if quick { 50 } else { 1000 },
            size: 64,
            seconds: if quick { 0.5 } else { 3.0 },
        },
        title: format!(
            "{} connections, round trips 64 B",
            if quick { 50 } else { 1000 }
        ),
        conditions: idle,
        systems: vec![RAW, RAW_TOKIO, SLIC, ZMQ_REQ, GRPC_UNARY],
    });
    jobs
}

fn bytes(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1024 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

/// Runs the plan, prints the table and writes it, the rows and the picture to `plan.out`.
pub fn run(plan: &Plan) -> Result<()> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(&plan.out)?;
    let mut rows = Vec::new();
    let mut all = jobs(plan.quick);
    let extra = extra_slic(plan);
    for job in &mut all {
        if let Some(i) = job.systems.iter().position(|s| *s == SLIC) {
            for (k, e) in extra.iter().enumerate() {
                job.systems.insert(i + 1 + k, e.clone());
            }
        }
        if !plan.systems.is_empty() {
            job.systems
                .retain(|s| s.2 == RAW.2 || plan.systems.iter().any(|f| s.2.contains(f.as_str())));
        }
    }
    for condition in [Condition::Idle, Condition::Busy] {
        let todo: Vec<&Job> = all
            .iter()
            .filter(|j| j.conditions.contains(&condition))
            .filter(|j| {
                plan.only
                    .as_ref()
                    .is_none_or(|o| j.title.contains(o.as_str()))
            })
            .collect();
        if todo.is_empty() {
            continue;
        }
        let _load = (condition == Condition::Busy)
            .then(|| Load::start(&exe))
            .transpose()?;
        for job in todo {
            for (system, variant, label) in &job.systems {
                eprint!(
                    "{:<40} {:<5} {label:<24} ",
                    job.title,
                    format!("{condition:?}")
                );
                let runs = if plan.quick { 1 } else { repeats(&job.case) };
                let result = run_median(&exe, system, variant, &job.case, runs)
                    .map_err(|e| format!("{e:#}"));
                match &result {
                    Ok(m) => eprintln!("{}", summary(&m.outcome)),
                    Err(e) => eprintln!("n/a: {e}"),
                }
                rows.push(Row {
                    case: job.title.clone(),
                    condition,
                    system: label.to_string(),
                    result,
                });
            }
        }
    }
    let table = crate::report::table(&rows);
    println!("{table}");
    let stamp = crate::report::machine_line();
    std::fs::write(plan.out.join("table.md"), format!("{stamp}\n\n{table}"))?;
    std::fs::write(
        plan.out.join("rows.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    let svg = crate::report::latency_svg(&rows);
    std::fs::write(plan.out.join("latency.svg"), svg)?;
    eprintln!("wrote {}", plan.out.display());
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} cases failed (n/a in the table)", rows.len());
    }
    Ok(())
}

fn summary(o: &Outcome) -> String {
    match o {
        Outcome::Latencies(v) => {
            let p = crate::report::percentiles(v);
            format!(
                "p50 {:.1} µs p99 {:.1} µs ({} samples)",
                p[0],
                p[1],
                v.len()
            )
        }
        Outcome::Throughput {
            messages,
            bytes,
            seconds,
        } => format!(
            "{:.0} msg/s {:.0} MB/s",
            *messages as f64 / seconds,
            *bytes as f64 / seconds / 1e6
        ),
        Outcome::Rate { requests, seconds } => format!("{:.0} req/s", *requests as f64 / seconds),
    }
}

/// Runs of a case whose median is reported. A throughput case takes a second or two, and
/// on two virtual CPUs its figure depends on where the kernel places the sender and the
/// receiver (run to run: 0.5x to 1.5x for the same build); the median of five damps that
/// for every system alike. Round trips report percentiles of many samples already.
fn repeats(case: &Case) -> usize {
    match case {
        Case::Stream { .. } | Case::Requests { .. } => 5,
        Case::RoundTrip { .. } | Case::Connections { .. } => 1,
    }
}

/// Runs a case `runs` times and keeps the run with the median figure (messages, bytes or
/// requests per second); any failed run fails the case.
fn run_median(
    exe: &Path,
    system: &str,
    variant: &str,
    case: &Case,
    runs: usize,
) -> Result<Measured> {
    let mut done = (0..runs.max(1))
        .map(|_| run_one(exe, system, variant, case))
        .collect::<Result<Vec<_>>>()?;
    done.sort_by(|a, b| rate(&a.outcome).total_cmp(&rate(&b.outcome)));
    Ok(done.swap_remove(done.len() / 2))
}

/// The figure runs are ranked by: events per second (0 for latencies, kept in run order).
fn rate(o: &Outcome) -> f64 {
    match o {
        Outcome::Latencies(_) => 0.0,
        Outcome::Throughput {
            messages, seconds, ..
        } => *messages as f64 / seconds,
        Outcome::Rate { requests, seconds } => *requests as f64 / seconds,
    }
}

/// How long one client may take before it is killed.
const CLIENT_LIMIT: Duration = Duration::from_secs(180);

fn run_one(exe: &Path, system: &str, variant: &str, case: &Case) -> Result<Measured> {
    let case_json = serde_json::to_string(case)?;
    let mut server = Reaper(
        Command::new(exe)
            .args(["server", system, variant, &case_json])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start server")?,
    );
    let mut server_out = BufReader::new(server.0.stdout.take().expect("piped"));
    let addr = match read_line(&mut server_out)? {
        Some(l) if l.starts_with("READY ") => l["READY ".len()..].trim().to_string(),
        _ => {
            let mut err = String::new();
            if let Some(mut e) = server.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("server did not start: {}", last_line(&err));
        }
    };
    let server_pid = server.0.id();
    // Let the server settle (threads started, allocations made) before its baseline.
    std::thread::sleep(Duration::from_millis(100));
    let rss_before = rss(server_pid);
    let cpu_server_before = cpu_seconds(server_pid);
    let started = Instant::now();
    let mut client = Reaper(
        Command::new(exe)
            .args(["client", system, variant, &addr, &case_json])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start client")?,
    );
    let client_pid = client.0.id();
    let watchdog = Watchdog::arm(client_pid, CLIENT_LIMIT);
    let mut out = BufReader::new(client.0.stdout.take().expect("piped"));
    let mut stdin = client.0.stdin.take();
    let mut bytes_per_conn = None;
    let mut reply = None;
    while let Some(line) = read_line(&mut out)? {
        if line.trim() == "IDLE" {
            std::thread::sleep(Duration::from_millis(300));
            if let (Some(before), Some(after), Case::Connections { conns, .. }) =
                (rss_before, rss(server_pid), case)
            {
                bytes_per_conn = Some((after as f64 - before as f64) / *conns as f64);
            }
            if let Some(s) = stdin.as_mut() {
                writeln!(s)?;
                s.flush()?;
            }
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            reply = Some(serde_json::from_str::<(Outcome, f64)>(json)?);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let status = client.0.wait()?;
    watchdog.disarm();
    let cpu_server = cpu_seconds(server_pid)
        .zip(cpu_server_before)
        .map_or(0.0, |(a, b)| a - b);
    let Some((outcome, cpu_client)) = reply else {
        let mut err = String::new();
        if let Some(mut e) = client.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        if watchdog.fired() {
            bail!("client killed after {CLIENT_LIMIT:?}");
        }
        bail!("client failed ({status}): {}", last_line(&err));
    };
    Ok(Measured {
        outcome,
        cpu_seconds: cpu_client + cpu_server,
        wall_seconds: wall,
        bytes_per_conn,
    })
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .chars()
        .take(200)
        .collect()
}

fn read_line(r: &mut BufReader<ChildStdout>) -> Result<Option<String>> {
    let mut line = String::new();
    Ok((r.read_line(&mut line)? > 0).then_some(line))
}

/// Kills the child when dropped, so no server outlives its case.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Watchdog {
    disarmed: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
}

impl Watchdog {
    fn arm(pid: u32, limit: Duration) -> Self {
        let disarmed = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (disarmed.clone(), fired.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !d.load(Ordering::Relaxed) {
                f.store(true, Ordering::Relaxed);
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        Self { disarmed, fired }
    }

    fn disarm(&self) {
        self.disarmed.store(true, Ordering::Relaxed);
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }
}

/// One low-priority busy loop per core, for the `Busy` condition; stopped when dropped.
/// Held for its `Drop`, which stops the loops.
struct Load(#[allow(dead_code)] Vec<Reaper>);

impl Load {
    fn start(exe: &Path) -> Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut v = Vec::with_capacity(cores);
        for _ in 0..cores {
            v.push(Reaper(
                Command::new("nice")
                    .args(["-n", "19"])
                    .arg(exe)
                    .arg("spin")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("start busy loop (nice)")?,
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self(v))
    }
}

/// The body of a busy-loop process: spins until killed.
pub fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
        std::hint::spin_loop();
    }
}

/// Resident set size of a process, in bytes (Linux).
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU seconds of a process so far (Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Rows grouped by case title, in first-seen order (used by the report).
pub fn by_case(rows: &[Row]) -> Vec<(String, Condition, Vec<&Row>)> {
    let mut order: Vec<(String, Condition)> = Vec::new();
    let mut map: BTreeMap<(String, Condition), Vec<&Row>> = BTreeMap::new();
    for r in rows {
        let k = (r.case.clone(), r.condition);
        if !map.contains_key(&k) {
            order.push(k.clone());
        }
        map.entry(k).or_default().push(r);
    }
    order
        .into_iter()
        .map(|k| {
            let v = map.remove(&k).unwrap_or_default();
            (k.0, k.1, v)
        })
        .collect()
}
