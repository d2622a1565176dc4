#!/usr/bin/env bash
# Measures what an idle proxied connection costs ringproxy in user space: RSS growth divided by the
# number of connections held (default 9000, with heartbeats so every connection is really proxied).
# Also reports the machine's kernel Slab growth (all sockets of the run: clients, proxy, servers).
# Bounded: about 30 s. Loopback only. Usage: scripts/idle-memory.sh [CONNS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
CONNS=${1:-9000}
cargo build --release -q -p ringproxy -p ringload
BIN=target/release
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_ready serve "$TMP" $BIN/ringload serve --listen 127.0.0.1:0 --mode echo --workers 2
SERVER=$(ready_addr "$TMP/serve.ready")

cat > "$TMP/proxy.yaml" <<YAML
global: { workers: 2, maxconn: 19000 }
defaults: { timeout: { client: 5m, server: 5m } }
frontends: [{ name: idle, bind: "127.0.0.1:0", backend: echo }]
backends: [{ name: echo, servers: [{ name: s, address: "$SERVER", source: 127.0.4.0/30 }] }]
YAML
start_ready proxy "$TMP" $BIN/ringproxy -c "$TMP/proxy.yaml"
PROXY_PID=$BG_PID
PROXY=$(ready_addr "$TMP/proxy.ready" idle)

sleep 1
RSS0=$(rss_kb "$PROXY_PID"); SLAB0=$(slab_kb)
start_bg "ringload hold" $BIN/ringload hold --target "$PROXY" --conns "$CONNS" --ramp 5000/s --heartbeat 5s \
  --duration 20s --sources 127.0.5.0/28 --no-progress --json > "$TMP/hold.json"
HOLD=$BG_PID
# Measure while every connection is held (after the ramp, before the end of the run).
sleep 15
RSS1=$(rss_kb "$PROXY_PID"); SLAB1=$(slab_kb)
reap_bg "$HOLD" || true
python3 - "$TMP/hold.json" "$CONNS" "$RSS0" "$RSS1" "$SLAB0" "$SLAB1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
conns = int(sys.argv[2]); rss0, rss1, slab0, slab1 = map(int, sys.argv[3:7])
c, m = r["connections"], r["messages"]
print(f"held {c['established']} of {conns} connections through ringproxy "
      f"(failed {c['failed']}, dropped {c['dropped']}), heartbeats echoed {m['echoed_ok']}, lost {m['lost']}, late {m['late']}, corrupted {m['corrupted']}")
print(f"ringproxy RSS: {rss0} KiB -> {rss1} KiB: {(rss1 - rss0) * 1024 / conns:.0f} bytes per idle proxied connection")
print(f"kernel Slab (whole machine: client, proxy and server sockets): {(slab1 - slab0) * 1024 / conns:.0f} bytes per proxied connection")
PY
