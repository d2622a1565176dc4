#!/usr/bin/env bash
# The one-command demo: 15,000 connections held through ringproxy, every one checked.
#
#   1. builds ringproxy and ringload in release (cargo build --release -p ringproxy -p ringload)
#   2. starts two `ringload serve` echo backends (the article's 1883/1884 pair, here on free ports)
#   3. renders config-examples/demo.yaml with those ports, a free frontend port and a per-run stats
#      socket, runs `ringproxy check` on it, and starts ringproxy (4 workers, 4 servers with source
#      IPs 127.0.2.1-4, round robin)
#   4. `ringload hold`: 15,000 client connections from 127.0.1.0/28 through the proxy for 20 s, a
#      16-byte heartbeat on each every 5 s whose echo must come back byte for byte
#   5. while they are held: the kernel's count of established sockets, ringproxy's memory and its
#      per-core stats (`ringproxy stats`); then ringload's summary
#   6. stops everything it started (also on Ctrl-C) and prints a one-line verdict; exit 0 on PASS
#
# Loopback only, no fixed ports, nothing to set up. Takes about 30 s after the build.
# Usage: scripts/demo.sh    (CONNS=N SECS=S scripts/demo.sh to change the size; CONNS up to 18000:
#                            demo.yaml has maxconn 19000)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CONNS=${CONNS:-15000}
SECS=${SECS:-20}
HEARTBEAT=5s
CLIENT_SOURCES=127.0.1.0/28
CONFIG=config-examples/demo.yaml

TMP=""
KEEP_TMP=0
BG_VERBOSE=1 # say what is stopped at the end

step() { printf '\n== %s\n' "$*"; }
indent() { sed '/./s/^/    /'; }
die() {
    printf '\nFAIL: %s\n' "$*"
    KEEP_TMP=1
    exit 1
}

cleanup() {
    # Finish cleaning up even if Ctrl-C is pressed again (bounded: 10 s, then SIGKILL).
    trap '' INT TERM HUP
    stop_all_bg 10
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$KEEP_TMP" = 1 ]; then
            echo "logs and the rendered configuration are in $TMP" >&2
        else
            rm -rf "$TMP"
        fi
    fi
}
interrupted() {
    printf '\ninterrupted (%s): stopping everything the demo started\n' "$1" >&2
    exit 130
}
trap cleanup EXIT
trap 'interrupted SIGINT' INT
trap 'interrupted SIGTERM' TERM
trap 'interrupted SIGHUP' HUP

# established_count FILTER: established TCP sockets matching an ss filter (empty without ss)
established_count() {
    command -v ss >/dev/null || return 0
    ss -Htn state established "$1" 2>/dev/null | wc -l
}

[ "$(uname -s)" = Linux ] || die "ringproxy needs Linux (io_uring)"
[ -n "${EPOCHREALTIME:-}" ] || die "this script needs bash 5 or later"
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run this again"

step "build: cargo build --release -p ringproxy -p ringload"
cargo build --release -p ringproxy -p ringload
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p') || true
BIN=${TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}}/release
for b in ringproxy ringload; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing after the build"
done
SECONDS=0
TMP=$(mktemp -d /tmp/ringproxy-demo.XXXXXX)
SOCK=$TMP/stats.sock

step "backends: two ringload serve echo servers (the article's 1883/1884 pair, on free ports)"
BACKENDS=()
BACKEND_PIDS=()
for name in backend-1883 backend-1884; do
    # --duration: a backstop, in case this script is killed without a chance to clean up
    start_bg "ringload serve ($name)" "$BIN/ringload" serve --listen 127.0.0.1:0 --mode echo --workers 2 \
        --duration 300s --ready-file "$TMP/$name.ready" >"$TMP/$name.out" 2>"$TMP/$name.err"
    BACKEND_PIDS+=("$BG_PID")
    if ! wait_ready "$TMP/$name.ready" 10 "$BG_PID"; then
        indent <"$TMP/$name.err"
        die "ringload serve ($name) did not start within 10 s"
    fi
    addr=$(ready_addr "$TMP/$name.ready")
    BACKENDS+=("$addr")
    echo "    $name: ringload serve --mode echo --workers 2 listening on $addr"
done

step "ringproxy -c $CONFIG (rendered with those ports into $TMP/demo.yaml)"
{
    echo "# Rendered by scripts/demo.sh from $CONFIG: free ports, per-run stats socket."
    sed -e "s|127\.0\.0\.1:1880|127.0.0.1:0|g" \
        -e "s|127\.0\.0\.1:1883|${BACKENDS[0]}|g" \
        -e "s|127\.0\.0\.1:1884|${BACKENDS[1]}|g" \
        -e "s|/tmp/ringproxy-demo\.sock|$SOCK|g" "$CONFIG"
} >"$TMP/demo.yaml"
if grep -v '^[[:space:]]*#' "$TMP/demo.yaml" | grep -qE '127\.0\.0\.1:188[034]([^0-9]|$)|/tmp/ringproxy-demo\.sock'; then
    die "$CONFIG no longer has the frontend 127.0.0.1:1880, servers 127.0.0.1:1883/1884 and socket /tmp/ringproxy-demo.sock this script renders"
fi
check_rc=0
timeout 60 "$BIN/ringproxy" check -c "$TMP/demo.yaml" >"$TMP/check.txt" 2>&1 || check_rc=$?
if [ "$check_rc" -ge 2 ]; then
    indent <"$TMP/check.txt"
    die "ringproxy check found a problem on this host (above; exit $check_rc)"
fi
# The summary and the non-OK items; the full report (with a fix under each) is long.
echo "    ringproxy check (host preflight): $(sed -n 's/^summary: //p' "$TMP/check.txt")"
grep -E '^(WARN|FAIL) ' "$TMP/check.txt" | awk '{ print (length($0) > 110 ? substr($0, 1, 107) "..." : $0) }' | indent
if grep -qE '^WARN +reserved ports' "$TMP/check.txt"; then
    echo "    (reserved ports: the backends listen on ports the kernel picked, from the ephemeral range; harmless here)"
fi

start_bg ringproxy "$BIN/ringproxy" -c "$TMP/demo.yaml" --ready-file "$TMP/proxy.ready" 2>"$TMP/proxy.err"
PROXY_PID=$BG_PID
if ! wait_ready "$TMP/proxy.ready" 15 "$PROXY_PID"; then
    indent <"$TMP/proxy.err"
    die "ringproxy did not start within 15 s"
fi
PROXY=$(ready_addr "$TMP/proxy.ready")
STARTUP_LINES=$(wc -l <"$TMP/proxy.err")
indent <"$TMP/proxy.err"
PROXY_PORT=${PROXY##*:}

step "ringload hold: $CONNS connections through ringproxy ($PROXY) for ${SECS} s, heartbeat every $HEARTBEAT"
HOLD_ARGS=(hold --target "$PROXY" --conns "$CONNS" --sources "$CLIENT_SOURCES" --ramp 5000/s
    --heartbeat "$HEARTBEAT" --duration "${SECS}s")
echo "    ringload ${HOLD_ARGS[*]}"
# The table goes to a file; the live line (on a terminal) and any warning go to stderr.
start_bg "ringload hold" "$BIN/ringload" "${HOLD_ARGS[@]}" >"$TMP/hold.txt"
HOLD_PID=$BG_PID
HOLD_START=$(now_ms)
since_start() { echo $((($(now_ms) - HOLD_START) / 1000)); }

# While they are held: wait (bounded) until the kernel shows every client connection established at
# the proxy, then take the snapshot.
SERVER_FILTER="( dport = :${BACKENDS[0]##*:} or dport = :${BACKENDS[1]##*:} )"
CLIENT_FILTER="( sport = :$PROXY_PORT )"
held_at=""
snap_by=$((HOLD_START + SECS * 1000 * 6 / 10)) # at the latest 60% into the run
while [ "$(now_ms)" -lt "$snap_by" ] && kill -0 "$HOLD_PID" 2>/dev/null; do
    if command -v ss >/dev/null && [ "$(established_count "$CLIENT_FILTER")" -ge "$CONNS" ]; then
        held_at=$(since_start)
        break
    fi
    sleep 0.2
done
# A few seconds in (so heartbeats have gone through every connection), but before the end.
snap_at=$((HOLD_START + 6000))
[ "$snap_at" -le "$snap_by" ] || snap_at=$snap_by
while [ "$(now_ms)" -lt "$snap_at" ] && kill -0 "$HOLD_PID" 2>/dev/null; do
    sleep 0.1
done
SNAP_AT=$(since_start)
{
    if command -v ss >/dev/null; then
        up=""
        [ -z "$held_at" ] || up=" (all $CONNS client connections were up ~${held_at} s in)"
        echo "kernel (ss), ${SNAP_AT} s into the run: $(established_count "$CLIENT_FILTER") client -> ringproxy and" \
            "$(established_count "$SERVER_FILTER") ringproxy -> backend connections established$up"
    fi
    rss=$(awk '/^VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$PROXY_PID/status" 2>/dev/null || true)
    [ -z "$rss" ] || echo "ringproxy resident memory: $rss"
} >"$TMP/snapshot.txt"
stats_rc=0
timeout 10 "$BIN/ringproxy" stats --socket "$SOCK" >"$TMP/stats.txt" 2>&1 || stats_rc=$?

# ringload stops by itself after --duration plus a bounded drain; allow 30 s more, then stop it.
hold_rc=0
hold_end=$((HOLD_START + (SECS + 30) * 1000))
while [ "$(now_ms)" -lt "$hold_end" ] && kill -0 "$HOLD_PID" 2>/dev/null; do
    sleep 0.1
done
if kill -0 "$HOLD_PID" 2>/dev/null; then
    echo "ringload hold did not finish $((SECS + 30)) s after it started: stopping it" >&2
    stop_bg "$HOLD_PID" 5 || hold_rc=$?
else
    reap_bg "$HOLD_PID" || hold_rc=$?
fi

step "while the connections were held"
indent <"$TMP/snapshot.txt"
echo "    per-core stats (ringproxy stats --socket $SOCK, ${SNAP_AT} s into the run):"
if [ "$stats_rc" = 0 ] && [ -s "$TMP/stats.txt" ]; then
    sed '/./s/^/      /' "$TMP/stats.txt"
else
    echo "      (per-core stats not available in this build)"
fi

step "ringload summary"
indent <"$TMP/hold.txt"

step "stopping ringproxy (SIGTERM: drain) and the backends"
proxy_rc=0
stop_bg "$PROXY_PID" 15 || proxy_rc=$?
tail -n +"$((STARTUP_LINES + 1))" "$TMP/proxy.err" | indent
echo "    ringproxy exit status $proxy_rc"
for pid in "${BACKEND_PIDS[@]}"; do stop_bg "$pid" 5 || true; done
accepted=0
for name in backend-1883 backend-1884; do
    sed "s/^/    $name: /" "$TMP/$name.err"
    n=$(sed -n 's/.*ringload serve: \([0-9]*\) connections accepted.*/\1/p' "$TMP/$name.err" | head -n 1)
    accepted=$((accepted + ${n:-0}))
done

# The verdict, from ringload's table (and its exit status).
field() { awk -v k="$1" -v n="$2" '$1 == k {print $n; exit}' "$TMP/hold.txt"; }
established=$(field connections 2)
failed=$(field failed 2)
dropped=$(field dropped 2)
sent=$(field messages 2)
echoed=$(field messages 4)
lost=$(field messages 7)
late=$(field late 3)
corrupted=$(field messages 9)
elapsed=$SECONDS
summary="${established:-?} of $CONNS connections held through ringproxy for ${SECS} s: ${failed:-?} failed,"
summary="$summary ${dropped:-?} dropped, ${sent:-?} heartbeats, ${lost:-?} lost, ${late:-?} late, ${corrupted:-?} corrupted;"
summary="$summary backends accepted $accepted; ${elapsed} s after the build"
if [ "$hold_rc" = 130 ]; then
    # ringload was interrupted on its own (Ctrl-C reached it, but not this script's trap).
    printf '\ninterrupted: %s\n' "$summary"
    exit 130
fi
if [ "$hold_rc" = 0 ] && [ "$proxy_rc" = 0 ] && [ "${established:-}" = "$CONNS" ] && [ "${failed:-}" = 0 ] &&
    [ "${dropped:-}" = 0 ] && [ "${lost:-}" = 0 ] && [ "${late:-}" = 0 ] && [ "${corrupted:-}" = 0 ]; then
    printf '\nPASS: %s\n' "$summary"
else
    reason="ringload exit $hold_rc"
    [ "$proxy_rc" = 0 ] || reason="$reason, ringproxy exit $proxy_rc"
    KEEP_TMP=1
    if [ "${late:-0}" != 0 ] && [ "${lost:-}" = 0 ] && [ "${corrupted:-}" = 0 ] && [ "${echoed:-}" = "${sent:-}" ]; then
        echo
        echo "note: every heartbeat came back intact, but ${late} of them later than the ${HEARTBEAT} heartbeat interval"
        echo "      (ringload counts those as late, a failure). Load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs:"
        echo "      on a busy host, run it again when the host is quieter."
    fi
    printf '\nFAIL (%s): %s\n' "$reason" "$summary"
    exit 1
fi
