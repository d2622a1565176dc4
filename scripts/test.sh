#!/usr/bin/env bash
# The project's one test command (README.md, .ci/run): formatting, lints, every test.
# Tests run against real sockets on loopback and the real kernel io_uring; nothing to set up.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Build first, then run under a time limit: a test that hangs fails the run instead of stalling CI.
cargo test --workspace --no-run
timeout --kill-after=30 1200 cargo test --workspace
