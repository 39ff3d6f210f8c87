#!/usr/bin/env bash
# Runs slic's benchmark against raw TCP, ZeroMQ and gRPC (see ../BENCHMARKING.md).
# Installs what it needs first: Debian's libzmq (for the zmq crate) and protoc (for tonic).
#   bash bench/run.sh                 # everything, ~15 minutes on two cores
#   bash bench/run.sh --quick         # a smoke run with small counts (CI runs this)
#   bash bench/run.sh --only "round trip 64 B" --slic tcp-park,tcp-spin20
set -euo pipefail
cd "$(dirname "$0")"

need=()
pkg-config --exists libzmq 2>/dev/null || need+=(libzmq3-dev pkg-config)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --bin slic-bench
exec ./target/release/slic-bench run "$@"
