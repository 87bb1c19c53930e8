#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, and the whole test suite.
# Installs what the tests need (idempotent: skips what is already there):
# cargo-nextest, iptables for the fault-injection run, and the Kubernetes
# API server (and etcd) the operator and benchmark tests run against
# (tests/envtest/install.sh: built once per machine). Needs root: apt-get,
# and the fault run's network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest (once per machine)"
  cargo install cargo-nextest --locked
fi

# The fault-injection run partitions nodes with iptables in a namespace.
if ! command -v iptables >/dev/null 2>&1; then
  echo "installing iptables (once per machine)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null
fi

# The envtest build (minutes, once per machine) overlaps the compile below.
mkdir -p target
envtest_log=target/envtest-install.log
tests/envtest/install.sh >"$envtest_log" 2>&1 &
envtest_pid=$!

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

if ! wait "$envtest_pid"; then
  echo "tests/envtest/install.sh failed:" >&2
  tail -30 "$envtest_log" >&2
  exit 1
fi
cargo nextest run --workspace --locked --profile ci
