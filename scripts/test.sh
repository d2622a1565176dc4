#!/usr/bin/env bash
# The project's one test command (README.md, .ci/run): formatting, lints, every test.
# Tests run against real sockets on loopback and the real kernel io_uring; nothing to set up.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
