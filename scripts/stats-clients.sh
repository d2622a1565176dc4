#!/usr/bin/env bash
# How long a real query waits behind hostile monitoring clients (security review items 1c, 1d, 1f):
# one client that sends a byte every 1.5 s and 100 that connect and send nothing, on the stats
# socket and on /metrics; then `show info` and a scrape are timed, and SIGTERM must end the process.
# Loopback only, bounded (a second; at most 80 s when queries go unanswered: 30 s each, 20 s for the exit).
# Usage: scripts/stats-clients.sh [RINGPROXY_BINARY]   (default: a release build of this tree)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=$(ringproxy_bin "${1:-}")
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

cat > "$TMP/proxy.yaml" <<YAML
global: { workers: 2, stats: { socket: $TMP/stats.sock, prometheus: "127.0.0.1:0" } }
defaults: { timeout: { drain: 1s } }
frontends: [{ name: fe, bind: "127.0.0.1:0", backend: be }]
backends: [{ name: be, servers: [{ name: s, address: "127.0.9.1:9" }] }]
YAML
start_ready proxy "$TMP" "$BIN" -c "$TMP/proxy.yaml"
PID=$BG_PID
METRICS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"])' "$TMP/proxy.ready")

python3 - "$TMP/stats.sock" "$METRICS" "$PID" <<'PY'
import os, signal, socket, sys, threading, time
path, metrics, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = metrics.rsplit(":", 1)
def unix():
    s = socket.socket(socket.AF_UNIX); s.connect(path); return s
def tcp():
    return socket.create_connection((host, int(port)))
def drip(s):
    try:
        while True:
            s.send(b"x"); time.sleep(1.5)
    except OSError:
        pass
def timed(connect, request, want):
    t = time.monotonic()
    s = connect(); s.settimeout(30); s.sendall(request)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except socket.timeout:
        return "no answer within 30 s"
    ms = (time.monotonic() - t) * 1000
    return f"{ms:.1f} ms" if want in out else f"{ms:.1f} ms, but no answer ({len(out)} bytes)"
for name, connect, request, want in [
    ("stats socket: show info", unix, b"show info\n", b"workers: 2"),
    ("/metrics", tcp, b"GET /metrics HTTP/1.1\r\n\r\n", b"200 OK"),
]:
    d = connect(); threading.Thread(target=drip, args=(d,), daemon=True).start()
    held = [connect() for _ in range(100)]
    time.sleep(0.2)
    print(f"{name} with 100 idle clients and 1 dripping: {timed(connect, request, want)}")
    globals()["keep_" + name] = (held, d)
# SIGTERM while all of them are still connected: the process must end (a zombie until reaped).
t = time.monotonic()
os.kill(pid, signal.SIGTERM)
def state():
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
while state() not in ("Z", "gone") and time.monotonic() - t < 20:
    time.sleep(0.01)
ended = state() in ("Z", "gone")
print(f"SIGTERM with those clients connected: {'exited' if ended else 'still running'} after {(time.monotonic() - t) * 1000:.0f} ms")
PY
if reap_bg "$PID"; then rc=0; else rc=$?; fi
echo "exit status $rc"
