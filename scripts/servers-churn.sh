#!/usr/bin/env bash
# What servers coming and going at run time (service discovery) leave behind (docs/operations.md,
# the runtime API): for each binary given, a proxy (WORKERS workers, one backend with one server,
# an admin socket) takes CYCLES rounds of `add server be/x ECHO source SOURCES` and `del server
# be/x`; every STEP rounds it prints the proxy's RSS growth since the first round, the rows each
# worker keeps (deleted servers' included, from `show json`) and the time per round so far. At
# the end one echo through the proxy checks that it still proxies. Loopback only, bounded
# (CYCLES rounds per binary; nothing is connected but that echo).
# Usage: scripts/servers-churn.sh [RINGPROXY_BINARY...]   (default: a release build of this tree)
# CYCLES=2000, STEP=500, WORKERS=2, SOURCES=127.0.9.1-127.0.9.64 (defaults); CHECK=1 gives the
# backend a health check (every 1s), so that each deletion waits for the checker to drop the server.
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
CHECKED=""
[ "$CHECK" = 1 ] && CHECKED=", check: { interval: 1s, timeout: 1s }"
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_bg echo "$RL" serve --listen 127.0.0.1:0 --mode echo --ready-file "$TMP/echo.ready" > "$TMP/echo.log" 2>&1
wait_ready "$TMP/echo.ready" 15 "$BG_PID" || die "echo server did not start: $(tail -n 5 "$TMP/echo.log")"
ECHO=$(ready_addr "$TMP/echo.ready")

for bin in "${BINS[@]}"; do
    cat > "$TMP/proxy.yaml" <<EOF
global: { workers: $WORKERS, stats: { admin_socket: $TMP/admin.sock } }
frontends: [{ name: fe, bind: "127.0.0.1:0", backend: be }]
backends: [{ name: be$CHECKED, servers: [{ name: s, address: "$ECHO" }] }]
EOF
    rm -f "$TMP/proxy.ready" "$TMP/admin.sock"
    start_bg proxy "$bin" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" > "$TMP/proxy.log" 2>&1
    pid=$BG_PID
    wait_ready "$TMP/proxy.ready" 60 "$pid" || die "$bin did not start: $(tail -n 5 "$TMP/proxy.log")"
    log "$bin: $CYCLES rounds of add server / del server (sources $SOURCES)"
    python3 - "$TMP/admin.sock" "$pid" "$ECHO" "$SOURCES" "$CYCLES" "$STEP" "$(ready_addr "$TMP/proxy.ready")" "$bin" <<'PY'
import json, socket, sys, time
sock, pid, echo, sources, cycles, step, front, binary = sys.argv[1:]
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

def ok(line):
    out = cmd(line)
    if not out.startswith("OK"):
        sys.exit(f"{line}: {out.strip()}")

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

def rows():
    text = cmd("show json")
    return [len(w["servers"]) for w in json.loads(text[text.index("{"):])["workers"]]

print(f"binary {binary}")
print(f"{'rounds':>7} {'RSS growth KiB':>15} {'per round B':>12} {'rows per worker':>16} {'ms per round':>13}")
base, t0 = None, time.monotonic()
for i in range(1, cycles + 1):
    ok(f"add server be/x {echo} source {sources}")
    ok("del server be/x")
    if i == 1:
        base, t0 = rss_kb(), time.monotonic()
    elif i % step == 0 or i == cycles:
        grow = rss_kb() - base
        took = (time.monotonic() - t0) * 1000 / (i - 1)
        print(f"{i:>7} {grow:>15} {grow * 1024 / (i - 1):>12.0f} {str(rows()):>16} {took:>13.2f}", flush=True)
host, port = front.rsplit(":", 1)
c = socket.create_connection((host, int(port)), timeout=10)
c.sendall(b"still proxying")
got = b""
while len(got) < 14 and (chunk := c.recv(64)):
    got += chunk
if got != b"still proxying":
    sys.exit(f"the echo through the proxy came back as {got!r}")
print("an echo through the proxy came back whole")
PY
    stop_bg "$pid"
done
