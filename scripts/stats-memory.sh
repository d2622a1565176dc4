#!/usr/bin/env bash
# What per-server stats cost ringproxy in memory (security review item 1g): for 1,000 and 10,000
# servers on 2 and 4 workers, the RSS when idle, after one `show info` and after one `show json`
# on the stats socket, each with the peak so far (VmHWM). No connection is made: every server points at an
# address nothing listens on, and no client connects.
# Loopback only, bounded (a few seconds per case).
# Usage: scripts/stats-memory.sh [RINGPROXY_BINARY]   (default: a release build of this tree)
# SERVERS="1000 10000" and WORKERS="2 4" (the defaults) choose the cases.
# AS_LIMIT_MB=N runs each engine under RLIMIT_AS N MiB (as the review did, with 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=$(ringproxy_bin "${1:-}")
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# config SERVERS WORKERS: backends of 100 servers each, all pointing at 127.0.9.1:9.
config() {
    python3 - "$1" "$2" "$TMP/stats.sock" <<'PY'
import sys
servers, workers, sock = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print(f"global: {{ workers: {workers}, maxconn: 1000, stats: {{ socket: {sock} }} }}")
print('frontends: [{ name: fe, bind: "127.0.0.1:0", backend: b0 }]')
print("backends:")
for b in range((servers + 99) // 100):
    print(f"  - name: b{b}")
    print("    servers:")
    for s in range(min(100, servers - 100 * b)):
        print(f'      - {{ name: s{s}, address: "127.0.9.1:9" }}')
PY
}

# ask COMMAND: sends one line to the stats socket, discards the answer.
ask() {
    python3 - "$TMP/stats.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
while s.recv(1 << 16):
    pass
PY
}

# mib FIELD PID: a field of /proc/PID/status in MiB, or "died" once the process is gone.
mib() {
    local v
    v=$(awk '/^'"$1"':/ {print $2}' "/proc/$2/status" 2>/dev/null) || v=
    if [ -n "$v" ]; then echo "scale=1; $v / 1024" | bc; else echo died; fi
}

printf '%8s %7s %10s %22s %22s\n' servers workers "idle MiB" "show info: MiB (peak)" "show json: MiB (peak)"
for servers in ${SERVERS:-1000 10000}; do
    for workers in ${WORKERS:-2 4}; do
        config "$servers" "$workers" > "$TMP/proxy.yaml"
        rm -f "$TMP/proxy.ready" "$TMP/stats.sock"
        if [ -n "${AS_LIMIT_MB:-}" ]; then
            start_bg proxy prlimit --as=$((AS_LIMIT_MB << 20)) "$BIN" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" \
                > "$TMP/proxy.log" 2>&1
        else
            start_bg proxy "$BIN" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" > "$TMP/proxy.log" 2>&1
        fi
        PID=$BG_PID
        if ! wait_ready "$TMP/proxy.ready" 60 "$PID"; then
            printf '%8s %7s   did not start: %s\n' "$servers" "$workers" "$(tail -n 1 "$TMP/proxy.log")"
            reap_bg "$PID" || true
            continue
        fi
        sleep 1
        idle=$(mib VmRSS "$PID")
        ask "show info" 2>/dev/null || true
        info="$(mib VmRSS "$PID") ($(mib VmHWM "$PID"))"
        ask "show json" 2>/dev/null || true
        json="$(mib VmRSS "$PID") ($(mib VmHWM "$PID"))"
        printf '%8s %7s %10s %22s %22s\n' "$servers" "$workers" "$idle" "$info" "$json"
        stop_bg "$PID" 30 || true
        [ "$info" = "died (died)" ] && printf '         (%s)\n' "$(grep -m1 -i 'memory\|abort' "$TMP/proxy.log")"
    done
done
