//! `slic-bench`: slic against raw TCP, ZeroMQ and gRPC, each case with its client and its
//! server in separate processes on loopback. See BENCHMARKING.md.
//!
//! `slic-bench run [--quick]` runs everything and prints one markdown table. The
//! orchestrator starts itself as `slic-bench server SYSTEM VARIANT CASE` (prints
//! `READY addr`) and `slic-bench client SYSTEM VARIANT ADDR CASE` (prints the outcome as
//! one JSON line); CASE is a `Case` as JSON.

mod case;
mod grpc;
mod raw;
mod report;
mod run;
mod slic_sys;
mod zeromq;

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::case::{Case, Outcome};

/// The tokio runtime every async system (raw tokio, slic, tonic) runs on, in both
/// processes: the multi-threaded one `#[tokio::main]` gives, one worker per core.
/// `SLIC_BENCH_RUNTIME=current` switches to the current-thread runtime, to see what
/// wake-ups across worker threads cost.
pub fn runtime() -> tokio::runtime::Runtime {
    let mut b = if std::env::var("SLIC_BENCH_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all().build().expect("tokio runtime")
}

fn serve(system: &str, variant: &str, case: &Case) -> Result<()> {
    let mut ready = |addr: SocketAddr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {addr}");
        let _ = out.flush();
    };
    match system {
        "raw" => raw::serve(variant, case, &mut ready),
        "slic" => slic_sys::serve(variant, case, &mut ready),
        "zmq" => zeromq::serve(variant, case, &mut ready),
        "grpc" => grpc::serve(variant, case, &mut ready),
        other => bail!("unknown system {other}"),
    }
}

fn client(system: &str, variant: &str, addr: SocketAddr, case: &Case) -> Result<Outcome> {
    // Tells the orchestrator the connections are open and idle, then waits for its go.
    let mut idle = || {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "IDLE");
        let _ = out.flush();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    };
    match system {
        "raw" => raw::client(variant, case, addr, &mut idle),
        "slic" => slic_sys::client(variant, case, addr, &mut idle),
        "zmq" => zeromq::client(variant, case, addr, &mut idle),
        "grpc" => grpc::client(variant, case, addr, &mut idle),
        other => bail!("unknown system {other}"),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["server", system, variant, case] => {
            let case: Case = serde_json::from_str(case).context("CASE")?;
            serve(system, variant, &case)
        }
        ["client", system, variant, addr, case] => {
            let case: Case = serde_json::from_str(case).context("CASE")?;
            let addr: SocketAddr = addr.parse().context("ADDR")?;
            let outcome = client(system, variant, addr, &case)?;
            let cpu = run::cpu_seconds(std::process::id()).unwrap_or(0.0);
            println!("RESULT {}", serde_json::to_string(&(outcome, cpu))?);
            Ok(())
        }
        ["spin"] => run::spin(),
        ["run", rest @ ..] => {
            let mut plan = run::Plan {
                quick: false,
                out: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
                only: None,
                systems: Vec::new(),
                slic_variants: Vec::new(),
            };
            let mut it = rest.iter();
            while let Some(&arg) = it.next() {
                match arg {
                    "--quick" => plan.quick = true,
                    "--out" => plan.out = it.next().context("--out DIR")?.into(),
                    "--only" => plan.only = Some(it.next().context("--only TEXT")?.to_string()),
                    "--systems" => {
                        let list = it.next().context("--systems A,B")?;
                        plan.systems = list.split(',').map(str::to_string).collect();
                    }
                    "--slic" => {
                        let list = it.next().context("--slic VARIANT,...")?;
                        plan.slic_variants = list.split(',').map(str::to_string).collect();
                    }
                    "--help" | "-h" => {
                        println!("{USAGE}");
                        return Ok(());
                    }
                    other => bail!("unknown option {other}\n{USAGE}"),
                }
            }
            run::run(&plan)
        }
        ["--help" | "-h" | "help", ..] => {
            println!(
                "{USAGE}\n\nSee BENCHMARKING.md for the cases, the options and how to read the table."
            );
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

const USAGE: &str = "usage: slic-bench run [--quick] [--out DIR] [--only TEXT] [--systems A,B] [--slic VARIANTS] | spin | server SYSTEM VARIANT CASE | client SYSTEM VARIANT ADDR CASE";
