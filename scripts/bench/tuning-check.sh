#!/usr/bin/env bash
# tuning-check.sh: `ringproxy check` for 300k, 1M and 10M connections on this host, the numbers that
# docs/tuning.md quotes. Each configuration has the fewest workers whose io_uring file tables hold the
# connections under this host's RLIMIT_NOFILE (+8% for uneven SO_REUSEPORT spread, at most 1024), and
# two servers with 64 source IPs each (scripts/fixtures/two-servers.yaml). Nothing is started; no
# sysctl is changed.
# Usage: scripts/bench/tuning-check.sh [CONNS...]        (default: 300000 1000000 10000000)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
RP=${RP:-$ROOT/target/release/ringproxy}
[ -x "$RP" ] || (cd "$ROOT" && cargo build --release -q -p ringproxy)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
NOFILE=$(ulimit -Hn)
PER_WORKER=$(((NOFILE - 64) / 2))
[ $# -gt 0 ] || set -- 300000 1000000 10000000
for n in "$@"; do
    w=$(((n * 108 / 100 + PER_WORKER - 1) / PER_WORKER))
    [ "$w" -le 1024 ] || w=1024
    [ "$w" -ge "$(nproc)" ] || w=$(nproc)
    render_fixture two-servers.yaml WORKERS="$w" MAXCONN="$n" STATS= TUNE= FRONTEND=fe BIND=0.0.0.0:1883 \
        BALANCE=leastconn SERVER_A=127.0.0.1:9001 SOURCES_A=127.0.2.0/26 SERVER_B=127.0.0.1:9002 \
        SOURCES_B=127.0.2.64/26 >"$TMP/c$n.yaml"
    echo "### maxconn $n, workers $w (RLIMIT_NOFILE $NOFILE: $PER_WORKER connections per worker)"
    echo
    echo '```'
    "$RP" check -c "$TMP/c$n.yaml" 2>&1 | sed "s|$TMP/||" || true
    echo '```'
    echo
done
