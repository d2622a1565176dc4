#!/usr/bin/env bash
# What servers coming and going at run time (service discovery) cost and leave behind
# (docs/operations.md, the runtime API): for each binary given, a proxy (WORKERS workers, one
# backend with one server, an admin socket) takes CYCLES rounds of `add server be/x ECHO source
# SOURCES` and `del server be/x`; every STEP rounds it prints the proxy's RSS growth since the
# first round and the time per round so far, and at the end the rows each worker keeps (deleted
# servers' included, from `show json`). With HAPROXY=1, HAProxy (nbthread WORKERS, `stats socket ... level
# admin`) takes the same rounds as its runtime API has them: `add server be/x ECHO source IP`,
# `enable server`, `disable server`, `del server` (HAProxy takes one source address per server:
# give SOURCES a single address to compare). At the end one echo through each proxy checks that it
# still proxies. Loopback only, bounded (CYCLES rounds per proxy; nothing is connected but that echo).
# Usage: scripts/servers-churn.sh [RINGPROXY_BINARY...]   (default: a release build of this tree)
# CYCLES=2000, STEP=500, WORKERS=2, SOURCES=127.0.9.1-127.0.9.64 (defaults); CHECK=1 gives the
# backend a health check (every 1s), so that each deletion waits for the checker to drop the
# server; HAPROXY=1 adds HAProxy (`haproxy` on the PATH, or HAPROXY_BIN); FILE_SOURCES=SET gives
# the file's server those source addresses (a /16: what a command that reads the stats copies);
# ADD_WORDS="maxconn 100" adds those words to each `add server` (both proxies take maxconn).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$(ringproxy_bin)")
cargo build --release -q -p ringload
RL=target/release/ringload
CYCLES=${CYCLES:-2000}
STEP=${STEP:-500}
WORKERS=${WORKERS:-2}
SOURCES=${SOURCES:-127.0.9.1-127.0.9.64}
CHECK=${CHECK:-0}
HAPROXY=${HAPROXY:-0}
FILE_SOURCES=${FILE_SOURCES:-}
ADD_WORDS=${ADD_WORDS:-}
S_SOURCES=""
[ -z "$FILE_SOURCES" ] || S_SOURCES=", source: \"$FILE_SOURCES\""
CHECKED=""
HA_CHECK=""
if [ "$CHECK" = 1 ]; then
    CHECKED=", check: { interval: 1s, timeout: 1s }"
    HA_CHECK=" check inter 1s"
fi
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_bg echo "$RL" serve --listen 127.0.0.1:0 --mode echo --ready-file "$TMP/echo.ready" > "$TMP/echo.log" 2>&1
wait_ready "$TMP/echo.ready" 15 "$BG_PID" || die "echo server did not start: $(tail -n 5 "$TMP/echo.log")"
ECHO=$(ready_addr "$TMP/echo.ready")

# rounds KIND NAME PID FRONTEND: the rounds against the admin socket $TMP/admin.sock.
rounds() {
    python3 - "$TMP/admin.sock" "$3" "$ECHO" "$SOURCES" "$CYCLES" "$STEP" "$4" "$2" "$1" "$HA_CHECK" "$ADD_WORDS" <<'PY'
import json, socket, sys, time
sock, pid, echo, sources, cycles, step, front, name, kind, ha_check, words = sys.argv[1:]
words = f" {words}" if words else ""
cycles, step = int(cycles), int(step)

def cmd(line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(sock)
    s.sendall((line + "\n").encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out.decode()

def ok(line, want):
    out = cmd(line)
    if not out.strip().startswith(want):
        sys.exit(f"{name}: {line}: {out.strip()}")

if kind == "ringproxy":
    steps = [(f"add server be/x {echo} source {sources}{words}", "OK"), ("del server be/x", "OK")]
else:
    steps = [(f"add server be/x {echo} source {sources}{words}{ha_check}", "New server registered"),
             ("enable server be/x", ""), ("disable server be/x", ""), ("del server be/x", "Server deleted")]

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

def rows():
    if kind != "ringproxy":
        return "-"
    text = cmd("show json")
    return str([len(w["servers"]) for w in json.loads(text[text.index("{"):])["workers"]])

print(f"{name} ({len(steps)} commands per round)")
print(f"{'rounds':>7} {'RSS growth KiB':>15} {'per round B':>12} {'rows per worker':>16} {'ms per round':>13}")
base, t0 = None, time.monotonic()
for i in range(1, cycles + 1):
    for line, want in steps:
        ok(line, want)
    if i == 1:
        base, t0 = rss_kb(), time.monotonic()
    elif i % step == 0 or i == cycles:
        grow = rss_kb() - base
        took = (time.monotonic() - t0) * 1000 / (i - 1)
        # (The rows only at the end: `show json` makes its answer in the proxy, and the memory
        # that takes would count in the next RSS reading.)
        kept = rows() if i == cycles else ""
        print(f"{i:>7} {grow:>15} {grow * 1024 / (i - 1):>12.0f} {kept:>16} {took:>13.2f}", flush=True)
host, port = front.rsplit(":", 1)
c = socket.create_connection((host, int(port)), timeout=10)
c.sendall(b"still proxying")
got = b""
while len(got) < 14 and (chunk := c.recv(64)):
    got += chunk
if got != b"still proxying":
    sys.exit(f"{name}: the echo through the proxy came back as {got!r}")
print("an echo through the proxy came back whole")
PY
}

for bin in "${BINS[@]}"; do
    cat > "$TMP/proxy.yaml" <<EOF
global: { workers: $WORKERS, stats: { admin_socket: $TMP/admin.sock } }
frontends: [{ name: fe, bind: "127.0.0.1:0", backend: be }]
backends: [{ name: be$CHECKED, servers: [{ name: s, address: "$ECHO"$S_SOURCES }] }]
EOF
    rm -f "$TMP/proxy.ready" "$TMP/admin.sock"
    start_bg proxy "$bin" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" > "$TMP/proxy.log" 2>&1
    pid=$BG_PID
    wait_ready "$TMP/proxy.ready" 60 "$pid" || die "$bin did not start: $(tail -n 5 "$TMP/proxy.log")"
    log "$bin: $CYCLES rounds of add server / del server (sources $SOURCES)"
    rounds ringproxy "$bin" "$pid" "$(ready_addr "$TMP/proxy.ready")"
    stop_bg "$pid"
done

if [ "$HAPROXY" = 1 ]; then
    HA=${HAPROXY_BIN:-$(command -v haproxy)} || die "HAPROXY=1: no haproxy on the PATH (apt-get install haproxy)"
    port=$(free_port)
    cat > "$TMP/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
    stats socket $TMP/admin.sock level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 50s
    timeout server 50s
frontend fe
    bind 127.0.0.1:$port
    default_backend be
backend be
    balance roundrobin
    server s $ECHO$HA_CHECK
EOF
    rm -f "$TMP/admin.sock"
    start_bg haproxy "$HA" -db -f "$TMP/haproxy.cfg" > "$TMP/haproxy.log" 2>&1
    pid=$BG_PID
    wait_port "127.0.0.1:$port" 15 || die "haproxy did not start: $(tail -n 5 "$TMP/haproxy.log")"
    log "$HA: $CYCLES rounds of add / enable / disable / del server (source $SOURCES)"
    rounds haproxy "HAProxy $("$HA" -v | awk 'NR == 1 { print $3 }')" "$pid" "127.0.0.1:$port"
    stop_bg "$pid"
fi
