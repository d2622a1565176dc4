#!/usr/bin/env bash
# What stats queries cost the workers' loops on an engine with many servers (docs/operations.md,
# "What stats cost"): for each view, QUERIES queries in a row on the stats socket, then the time
# each took (the stats thread's work included) and, from the workers' own counters, their longest
# loop turn over those queries and how many turns of 1 ms or more they made meanwhile. Every
# server points at an address nothing listens on; no client connects.
# Loopback only, bounded (seconds per case).
# Usage: scripts/stats-turns.sh [RINGPROXY_BINARY]   (default: a release build of this tree)
# SERVERS=40000, BACKENDS="1 2000" (the servers spread over that many backends), WORKERS=2,
# QUERIES=10 and VIEWS="info cores servers prometheus" (the defaults) choose the cases; SOURCES
# (e.g. 127.64.0.0/16) gives the first server that source set (each worker's share of it is copied
# a slice at a time like the server rows; `show sources` lists them). The view `add` is not a
# query: QUERIES `add server` on the admin socket, each a server with the source set ADD_SOURCE
# (default 127.80.0.0/16) — what setting up a large source set costs the workers. HOLD=N holds N
# connections through the proxy meanwhile (`ringload hold`, 30 s heartbeats, to a `ringload serve`
# echo backend that is the first server; the first backend balances by `source`, so the workers
# know the clients' addresses), for the view `conns`: `show conns limit 10000`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=$(ringproxy_bin "${1:-}")
HOLD=${HOLD:-0}
RL=${RINGLOAD:-target/release/ringload}
SERVERS=${SERVERS:-40000}
WORKERS=${WORKERS:-2}
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

FIRST=127.0.9.1:9
if [ "$HOLD" -gt 0 ]; then
    [ -x "$RL" ] || cargo build --release -q -p ringload
    start_ready serve "$TMP" "$RL" serve --listen 127.0.0.1:0 --mode echo --workers 1
    FIRST=$(ready_addr "$TMP/serve.ready")
fi

for backends in ${BACKENDS:-1 2000}; do
    python3 - "$SERVERS" "$backends" "$WORKERS" "$TMP/stats.sock" "${SOURCES:-}" "$FIRST" "$HOLD" > "$TMP/proxy.yaml" <<'PY'
import sys
servers, backends, workers, sock = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sources, first, hold = sys.argv[5], sys.argv[6], int(sys.argv[7])
admin = sock.replace("stats.sock", "admin.sock")
print(f"global: {{ workers: {workers}, maxconn: {max(1000, 2 * hold)}, stats: {{ socket: {sock}, admin_socket: {admin} }} }}")
print('frontends: [{ name: fe, bind: "127.0.0.1:0", backend: b0 }]')
print("backends:")
each = -(-servers // backends)
for b in range(backends):
    n = min(each, servers - each * b)
    if n > 0:
        extra = lambda s: f', source: "{sources}"' if sources and b == 0 and s == 0 else ""
        address = lambda s: first if b == 0 and s == 0 else "127.0.9.1:9"
        names = ", ".join(f'{{ name: s{s}, address: "{address(s)}"{extra(s)} }}' for s in range(n))
        balance = ", balance: source" if hold and b == 0 else ""
        print(f"  - {{ name: b{b}{balance}, servers: [{names}] }}")
PY
    rm -f "$TMP/proxy.ready" "$TMP/stats.sock"
    start_bg proxy "$BIN" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" > "$TMP/proxy.log" 2>&1
    PID=$BG_PID
    if ! wait_ready "$TMP/proxy.ready" 120 "$PID"; then
        echo "$SERVERS servers in $backends backends: did not start: $(tail -n 1 "$TMP/proxy.log")"
        reap_bg "$PID" || true
        continue
    fi
    if [ "$HOLD" -gt 0 ]; then
        # (Started like the others, so that the clean-up on exit stops it whatever happens.)
        start_bg hold "$RL" hold --target "$(ready_addr "$TMP/proxy.ready")" --conns "$HOLD" --heartbeat 30s \
            --duration 600s --no-progress > "$TMP/hold.log" 2>&1
        HOLD_PID=$BG_PID
        python3 - "$TMP/stats.sock" "$HOLD" <<'PY' || { echo "the $HOLD connections did not open"; exit 1; }
import json, socket, sys, time
sock, want = sys.argv[1], int(sys.argv[2])
end = time.monotonic() + 120
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"show json\n")
    data = b"".join(iter(lambda: s.recv(1 << 20), b""))
    if sum(w["active"] for w in json.loads(data)["workers"]) >= want:
        sys.exit(0)
    time.sleep(0.5)
sys.exit(1)
PY
    fi
    sleep 3 # (longest_turn_us covers the last one to two seconds: not the start, nor the ramp)
    echo "$SERVERS servers in $backends backend(s)${SOURCES:+, the first with source $SOURCES}, $WORKERS workers, ${QUERIES:-10} queries per view ($BIN):"
    python3 - "$TMP/stats.sock" "${QUERIES:-10}" "${ADD_SOURCE:-127.80.0.0/16}" ${VIEWS:-info cores servers prometheus} <<'PY'
import json, socket, sys, time
sock, queries, add_source, views = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
admin = sock.replace("stats.sock", "admin.sock")
added = 0

def ask(line, path=sock):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(120)
    s.connect(path)
    s.sendall(line.encode() + b"\n")
    parts = []
    while True:
        b = s.recv(1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)

def workers():
    return json.loads(ask("show json"))["workers"]

print(f"{'view':>12} {'ms per query':>13} {'bytes':>11}   per worker: longest turn (us), turns >= 1 ms, turns")
for view in views:
    before = workers()
    t = time.monotonic()
    for _ in range(queries):
        if view == "conns":
            answer = ask("show conns limit 10000", admin)
            if not answer.startswith(b"OK"):
                sys.exit(f"show conns: {answer.decode()}")
            size = len(answer)
        elif view == "add":
            answer = ask(f"add server b0/added{added} 127.0.9.1:9 source {add_source}", admin)
            if not answer.startswith(b"OK"):
                sys.exit(f"add server: {answer.decode()}")
            added += 1
            size = len(answer)
        else:
            size = len(ask("show " + view))
    ms = (time.monotonic() - t) * 1000 / queries
    # (The longest turn is kept for the last one to two seconds: read at once.)
    after = workers()
    each = ", ".join(
        f"{a['longest_turn_us']} / {a['slow_turns']['over_1ms'] - b['slow_turns']['over_1ms']}"
        f" / {a['loop_iterations'] - b['loop_iterations']}"
        for b, a in zip(before, after)
    )
    print(f"{view:>12} {ms:>13.1f} {size:>11}   {each}")
PY
    [ -z "${HOLD_PID:-}" ] || { stop_bg "$HOLD_PID" 10 || true; HOLD_PID=; }
    stop_bg "$PID" 30 || true
done
