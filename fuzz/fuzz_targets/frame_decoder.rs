//! `frame_decoder`: see slic-proto/tests/fuzz_checks/mod.rs, which holds the checks so that
//! `cargo test -p slic-proto --test corpus` replays fuzz/corpus/frame_decoder through the same code.
#![no_main]

#[path = "../../slic-proto/tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    fuzz_checks::check_frame_decoder(data);
});
