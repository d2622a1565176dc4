#!/usr/bin/env bash
# The project's one test command (README.md, .ci/run): formatting, lints, every test.
# Tests run against real sockets on loopback and the real kernel io_uring.
set -euo pipefail
cd "$(dirname "$0")/.."
# Beyond the Rust toolchain the tests need one Debian package, installed here if missing (as root):
# python3-seccomp, which packaging/seccomp/run-under.py uses to run the engine under the shipped
# seccomp profile (engine/tests/process/access.rs).
if ! /usr/bin/python3 -c 'import seccomp' 2>/dev/null; then
    echo "test.sh: installing python3-seccomp (for the seccomp-profile tests)"
    apt-get install -y -q python3-seccomp >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q python3-seccomp >/dev/null; }
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Build first, then run under a time limit: a test that hangs fails the run instead of stalling CI.
cargo test --workspace --no-run
timeout --kill-after=30 1200 cargo test --workspace
# Again under the Linux 6.1 feature set (engine/src/features.rs: every fallback for what 6.1 lacks),
# the suites that cover proxying, the PROXY protocol, faults, reloads and the connection lifecycle.
RINGPROXY_IO_FEATURES=6.1 timeout --kill-after=30 600 \
    cargo test -p ringproxy --test it --test process --test lifecycle --test leaks
# What packaging/ ships: the systemd unit (security score, every system call the engine makes
# allowed by its filter), the Debian package (built, inspected, installed, purged), the container
# manifest's configuration.
timeout --kill-after=30 900 bash packaging/test.sh
