#!/usr/bin/env bash
# loadgen-selfcheck.sh: is ringload the bottleneck? Measures, on this
# machine and in one run, ringload direct to `ringload serve` (no proxy):
#   - rate: connections/s (connect, 64-byte echo, close)
#   - throughput: Gbit/s with 1 and 4 streams (up, against a sink)
#   - hold: the number of connections held (default 30000; HOLD=300000 works
#     on a 24 GiB host with 254 loopback sources)
# and cross-checks with well-known tools on the same loopback:
#   - iperf3 -P 1 and -P 4 (throughput)
#   - wrk -H 'Connection: close' against nginx serving a tiny file
#     (connections/s)
# Everything binds 127.0.0.1 on free ports, every step is bounded in time,
# and everything started here is stopped on exit.
#
# Usage: scripts/loadgen-selfcheck.sh            (DUR=5 HOLD=30000 by default)
#        DUR=10 HOLD=100000 scripts/loadgen-selfcheck.sh
# Needs: cargo; installs iperf3, wrk and nginx-light with apt-get if missing
# (as root). Prints a summary table at the end; raw JSON stays in $OUT.
set -euo pipefail

DUR=${DUR:-5}
HOLD=${HOLD:-30000}
CONC=${CONC:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-loadgen}
OUT=${OUT:-$(mktemp -d /tmp/ringload-selfcheck.XXXXXX)}

cleanup() {
    stop_all_bg
    if [ -f "$OUT/nginx/nginx.pid" ]; then
        kill "$(cat "$OUT/nginx/nginx.pid")" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "building ringload (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p ringload)
BIN=$CARGO_TARGET_DIR/release/ringload

# start_serve NAME MODE WORKERS: sets SERVE_ADDR (not run in a subshell, so the
# pid is remembered and stopped on exit)
start_serve() {
    start_ready "serve-$1" "$OUT" "$BIN" serve --listen 127.0.0.1:0 --mode "$2" --workers "$3" --duration 900s
    SERVE_ADDR=$(ready_addr "$OUT/serve-$1.ready")
}

start_serve echo echo 2
ECHO=$SERVE_ADDR
start_serve sink sink 2
SINK=$SERVE_ADDR
echo "ringload serve: echo on $ECHO, sink on $SINK" >&2

run() { # name, then the ringload command line
    local name=$1; shift
    echo "+ ringload $*" >&2
    RUN_TIMEOUT=$(( DUR * 4 + 120 )) run_logged "$OUT/$name.cmd" "$BIN" "$@" --json --no-progress >"$OUT/$name.json" || true
}

# nginx for wrk
NP=$(free_port)
mkdir -p "$OUT/nginx/www" "$OUT/nginx/tmp"
echo ok >"$OUT/nginx/www/index.html"
cat >"$OUT/nginx/nginx.conf" <<CONF
worker_processes auto;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx/tmp;
    server {
        listen 127.0.0.1:$NP backlog=4096;
        root $OUT/nginx/www;
    }
}
CONF
"$NGINX" -c "$OUT/nginx/nginx.conf" -p "$OUT/nginx" -g 'daemon on;'

# iperf3 server
IP=$(free_port)
start_bg "iperf3 -s" timeout $(( DUR * 6 + 120 )) iperf3 -s -p "$IP" -B 127.0.0.1 >"$OUT/iperf3-server.log" 2>&1
sleep 0.5

# Each ringload figure right next to its cross-check, so background load
# on the host hits both alike.
# Several source addresses: from one, ~28,000 ephemeral ports and TIME-WAIT's 1-2 s reuse delay cap
# the rate at ~14,000/s whatever the tool (wrk's connections end in TIME-WAIT on nginx's side).
run rate rate --target "$ECHO" --concurrency "$CONC" --duration "${DUR}s" --sources 127.0.1.0/28
echo "+ wrk -t2 -c$CONC -d${DUR}s -H 'Connection: close' http://127.0.0.1:$NP/" >&2
timeout $(( DUR + 30 )) wrk -t2 -c"$CONC" -d"${DUR}s" -H 'Connection: close' "http://127.0.0.1:$NP/" >"$OUT/wrk.txt" 2>&1 || true
run tput1 throughput --target "$SINK" --streams 1 --duration "${DUR}s"
echo "+ iperf3 -c 127.0.0.1 -p $IP -P 1 -t $DUR" >&2
timeout $(( DUR + 30 )) iperf3 -c 127.0.0.1 -p "$IP" -P 1 -t "$DUR" -J >"$OUT/iperf3-p1.json" || true
run tput4 throughput --target "$SINK" --streams 4 --duration "${DUR}s"
echo "+ iperf3 -c 127.0.0.1 -p $IP -P 4 -t $DUR" >&2
timeout $(( DUR + 30 )) iperf3 -c 127.0.0.1 -p "$IP" -P 4 -t "$DUR" -J >"$OUT/iperf3-p4.json" || true

# hold: a backend with enough workers (each holds up to RLIMIT_NOFILE
# connections as direct descriptors; SO_REUSEPORT spreads by hash)
start_serve hold echo $(( HOLD / 14000 + 2 ))
HOLD_ECHO=$SERVE_ADDR
run hold hold --target "$HOLD_ECHO" --conns "$HOLD" --sources 127.0.1.0/24 --ramp 20000/s --heartbeat 5s --duration "$(( HOLD / 20000 + 15 ))s"

j() { jq -r "$2" "$OUT/$1" 2>/dev/null || echo "n/a"; }
printf '\n%-44s %s\n' "measurement (same run, loopback, $(nproc) CPUs)" "result"
printf '%-44s %s conns/s (exit %s)\n' "ringload rate -c $CONC -> ringload serve" "$(j rate.json '.connections_per_s|floor')" "$(j rate.json .exit_code)"
printf '%-44s %s req(=conn)/s\n' "wrk -c $CONC Connection: close -> nginx" "$(awk '/Requests\/sec/ {print int($2)}' "$OUT/wrk.txt")"
printf '%-44s %s Gbit/s\n' "ringload throughput 1 stream -> sink" "$(j tput1.json '.throughput.up_gbps*100|floor/100')"
printf '%-44s %s Gbit/s\n' "iperf3 -P 1" "$(j iperf3-p1.json '.end.sum_received.bits_per_second/1e7|floor/100')"
printf '%-44s %s Gbit/s\n' "ringload throughput 4 streams -> sink" "$(j tput4.json '.throughput.up_gbps*100|floor/100')"
printf '%-44s %s Gbit/s\n' "iperf3 -P 4" "$(j iperf3-p4.json '.end.sum_received.bits_per_second/1e7|floor/100')"
printf '%-44s %s of %s established, lost %s, late %s, corrupted %s, ramp %ss, %s processes (exit %s)\n' "ringload hold" \
    "$(j hold.json .connections.established)" "$HOLD" "$(j hold.json .messages.lost)" "$(j hold.json .messages.late)" "$(j hold.json .messages.corrupted)" \
    "$(j hold.json '.connections.ramp_time_s*10|floor/10')" "$(j hold.json .processes)" "$(j hold.json .exit_code)"
echo
echo "command lines:"
cat "$OUT"/*.cmd
echo "raw results in $OUT"
