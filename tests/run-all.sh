#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, and the whole test suite.
# Installs what the tests need (idempotent: skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest (once per machine)"
  cargo install cargo-nextest --locked
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --profile ci
