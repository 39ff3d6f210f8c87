//! `connection_ops`: a client and a server joined by in-memory buffers, driven by an arbitrary
//! sequence of `Operation`s. See slic-proto/tests/fuzz_checks/mod.rs, which holds the harness
//! and its invariants so that `cargo test -p slic-proto --test corpus` replays
//! fuzz/corpus/connection_ops through the same code.
#![no_main]

#[path = "../../slic-proto/tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|input: fuzz_checks::OpsInput| {
    fuzz_checks::run_connection_ops(&input);
});
