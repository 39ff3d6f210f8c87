#!/usr/bin/env bash
# Runs every cargo-fuzz target of slic-proto for SECONDS each (default 60), one after the
# other, and prints the executions per target. Exits non-zero if any target crashed; the crash
# input is in fuzz/artifacts/<target>/ (copy it to fuzz/regressions/<target>/ once fixed, so
# that `cargo test -p slic-proto --test corpus` keeps replaying it).
#
#   fuzz/run.sh [SECONDS]          CI smoke test: fuzz/run.sh 20
#
# Starts from the committed seeds (fuzz/corpus/<target>/) and the regressions; what libFuzzer
# finds on the way goes to fuzz/work/<target>/ (ignored by git), never into fuzz/corpus/.
# Builds with its own target dir, fuzz/target/. FUZZ_SANITIZER=none builds without ASan.
set -euo pipefail

secs="${1:-60}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# cargo-fuzz passes nightly-only flags (-Zsanitizer, sancov passes) to rustc; the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version 2>/dev/null | grep -q '^cargo-fuzz 0\.13\.'; then
    echo "== installing cargo-fuzz 0.13"
    cargo install cargo-fuzz --locked --version '~0.13'
fi

sanitizer="${FUZZ_SANITIZER:-address}"
# Release build with debug assertions and overflow checks (cargo-fuzz 0.13's default).
flags=(--sanitizer "$sanitizer" --target-dir "$root/fuzz/target")
targets=(frame_decoder handshake_server handshake_client connection_ops)

echo "== building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "   built in $((SECONDS - build_start)) s"

failed=()
summary=()
for t in "${targets[@]}"; do
    work="fuzz/work/$t"
    log="fuzz/work/$t.log"
    mkdir -p "$work" "fuzz/artifacts/$t"
    corpora=("$work" "fuzz/corpus/$t")
    if [ -d "fuzz/regressions/$t" ]; then
        corpora+=("fuzz/regressions/$t")
    fi
    echo "== $t: ${secs} s"
    status=0
    # cargo-fuzz writes crash inputs to fuzz/artifacts/<target>/.
    cargo fuzz run "${flags[@]}" "$t" "${corpora[@]}" -- \
        -max_total_time="$secs" -timeout=60 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    cov="$({ grep -o 'cov: [0-9]*' "$log" || true; } | tail -n 1 | cut -d' ' -f2)"
    if [ "$status" -eq 0 ]; then
        result=ok
    else
        result="CRASH (exit $status)"
        failed+=("$t")
        echo "-- $t failed; end of $log:"
        { grep -v '^#[0-9]' "$log" || true; } | tail -n 40
    fi
    line="$(printf '%-18s %12s execs %8s exec/s  cov %6s  %s' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$result")"
    echo "   $line"
    summary+=("$line")
done

echo "== fuzz summary (${secs} s per target)"
printf '   %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
