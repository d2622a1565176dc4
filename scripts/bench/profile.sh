#!/usr/bin/env bash
# profile.sh: where ringproxy spends its time compared with HAProxy, for the workloads where the
# benchmark shows it behind. For each workload (ka: keep-alive 64-byte request/response, closed loop;
# rate: connect-echo-close; tput4: 4 bulk streams) and each proxy, while ringload drives it:
#   - perf stat (software events; this VM has no hardware counters): task-clock, context switches,
#     migrations, and for ringproxy the io_uring tracepoints (requests submitted, requests punted to
#     io-wq, task work)
#   - io_uring requests and io-wq punts by opcode (perf record of the two tracepoints + perf script)
#   - perf record -g (cpu-clock sampling) of the proxy: the top symbols, io-wq threads included
# Everything is normalised per request / connection / MB. Loopback only, bounded (~2 min).
# The churn test connects the way bench.sh's does: SOURCES (default 8, bench.sh's CHURN_SOURCES)
# client addresses 127.0.6.x and, on each proxy, as many source addresses 127.0.3.x toward the echo
# server (ringproxy's `source` range; one HAProxy server line per address); SOURCES=1 gives the single
# address pair, whose ~28,000 ephemeral ports bound the rate. TESTS picks workloads (default "ka rate tput4").
# Usage: scripts/bench/profile.sh [SECONDS per measurement, default 4]   (root; installs linux-perf)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
S=${1:-4}
WORKERS=${WORKERS:-$(nproc)}
SOURCES=${SOURCES:-8}
TESTS=${TESTS:-ka rate tput4}
OUT=${OUT:-$(mktemp -d /tmp/ringproxy-profile.XXXXXX)}
trap stop_all_bg EXIT
trap 'exit 130' INT TERM
command -v perf >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
command -v haproxy >/dev/null || die "haproxy missing: run scripts/bench.sh once (it installs the peers)"
build_binaries "$ROOT" "$OUT/bin"
RL=$OUT/bin/ringload
RP=$OUT/bin/ringproxy

start_ready serve-echo "$OUT" "$RL" serve --listen 127.0.0.1:0 --mode echo --workers "$WORKERS"
start_ready serve-sink "$OUT" "$RL" serve --listen 127.0.0.1:0 --mode sink --workers "$WORKERS"
ECHO=$(ready_addr "$OUT/serve-echo.ready")
SINK=$(ready_addr "$OUT/serve-sink.ready")

cat >"$OUT/ringproxy.yaml" <<YAML
global: { workers: $WORKERS, pin_cpus: true, maxconn: 9400 }
defaults: { timeout: { connect: 5s, client: 50s, server: 50s, drain: 1s } }
frontends:
  - { name: echo, bind: "127.0.0.1:0", backend: echo }
  - { name: sink, bind: "127.0.0.1:0", backend: sink }
backends:
  - { name: echo, servers: [{ name: s1, address: "$ECHO", source: "127.0.3.1-127.0.3.$SOURCES" }] }
  - { name: sink, servers: [{ name: s1, address: "$SINK" }] }
YAML
start_ready ringproxy "$OUT" "$RP" -c "$OUT/ringproxy.yaml"
RPID=$BG_PID
declare -A A
A[ringproxy:echo]=$(ready_addr "$OUT/ringproxy.ready" echo)
A[ringproxy:sink]=$(ready_addr "$OUT/ringproxy.ready" sink)

HE=$(free_port); HS=$(free_port)
while [ "$HS" = "$HE" ]; do HS=$(free_port); done
cat >"$OUT/haproxy.cfg" <<CFG
global
    nbthread $WORKERS
    cpu-map auto:1/1-$WORKERS 0-$((WORKERS - 1))
    maxconn 9400
    fd-hard-limit $(ulimit -Hn)
    maxpipes 512
    tune.pipesize 262144
defaults
    mode tcp
    timeout connect 5s
    timeout client 50s
    timeout server 50s
    maxconn 9400
    option splice-auto
frontend echo
    bind 127.0.0.1:$HE
    default_backend echo
backend echo
    balance roundrobin
$(for i in $(seq 1 "$SOURCES"); do echo "    server s$i $ECHO source 127.0.3.$i"; done)
frontend sink
    bind 127.0.0.1:$HS
    default_backend sink
backend sink
    server s1 $SINK
CFG
start_bg haproxy haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1
HPID=$BG_PID
A[haproxy:echo]=127.0.0.1:$HE
A[haproxy:sink]=127.0.0.1:$HS
wait_port "${A[haproxy:echo]}" && wait_port "${A[haproxy:sink]}" || die "haproxy: $(cat "$OUT/haproxy.log")"
declare -A PID=([ringproxy]=$RPID [haproxy]=$HPID)

load() { # TEST ADDR JSON
    case "$1" in
        ka) "$RL" latency --target "$2" --conns 64 --rate 2000000 --duration "${S}s" --json --no-progress >"$3" ;;
        rate) "$RL" rate --target "$2" --concurrency 64 --duration "${S}s" --sources "127.0.6.1-127.0.6.$SOURCES" --json --no-progress >"$3" ;;
        tput4) "$RL" throughput --target "$2" --streams 4 --duration "${S}s" --json --no-progress >"$3" ;;
    esac
}
units() { # TEST JSON -> number of units
    case "$1" in
        ka) jq '.messages.echoed_ok' "$2" ;;
        rate) jq '.connections_per_s * .elapsed_s | floor' "$2" ;;
        tput4) jq '.throughput.up_bytes / 1e6 | floor' "$2" ;;
    esac
}
declare -A UNIT=([ka]=request [rate]=connection [tput4]="MB moved")
TP=io_uring:io_uring_submit_req,io_uring:io_uring_queue_async_work,io_uring:io_uring_task_add,io_uring:io_uring_local_work_run

{
    echo "# profile: $S s per measurement, $WORKERS workers, $SOURCES source addresses for churn, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for t in $TESTS; do
        svc="echo"; [ "$t" = tput4 ] && svc="sink"
        for p in ringproxy haproxy; do
            pid=${PID[$p]}
            f=$OUT/$t-$p
            # 1. perf stat (software events + io_uring tracepoints)
            ev=task-clock,context-switches,cpu-migrations
            [ "$p" = ringproxy ] && ev=$ev,$TP
            perf stat -x, -e "$ev" -p "$pid" -o "$f.stat" -- sleep "$((S + 1))" &
            sp=$!
            sleep 0.3
            load "$t" "${A[$p:$svc]}" "$f.stat.json"
            wait "$sp" || true
            n=$(units "$t" "$f.stat.json")
            echo
            echo "## $t through $p: $n ${UNIT[$t]}s in ${S}s"
            awk -F, -v n="$n" -v u="${UNIT[$t]}" '$1 ~ /^[0-9.]+$/ {
                printf "  %-40s %14.0f  %10.3f per %s\n", $3, $1, $1 / n, u }' "$f.stat"
            # 2. io_uring requests and io-wq punts by opcode
            if [ "$p" = ringproxy ]; then
                perf record -q -e io_uring:io_uring_submit_req -e io_uring:io_uring_queue_async_work \
                    -p "$pid" -o "$f.tp.data" -- sleep "$((S + 1))" 2>/dev/null &
                sp=$!
                sleep 0.3
                load "$t" "${A[$p:$svc]}" "$f.tp.json"
                wait "$sp" || true
                n2=$(units "$t" "$f.tp.json")
                echo "  io_uring requests by opcode (submitted / punted to io-wq), per ${UNIT[$t]}:"
                perf script -i "$f.tp.data" 2>/dev/null | awk -v n="$n2" '
                    /io_uring_submit_req/ { match($0, /opcode [A-Z_]+/); op = substr($0, RSTART + 7, RLENGTH - 7); s[op]++ }
                    /io_uring_queue_async_work/ { match($0, /opcode [A-Z_]+/); op = substr($0, RSTART + 7, RLENGTH - 7); q[op]++ }
                    END { for (o in s) printf "    %-16s %8.3f submitted  %8.3f punted to io-wq\n", o, s[o] / n, q[o] / n }' | sort
            fi
            # 3. where the CPU goes (cpu-clock samples, all threads)
            perf record -q -F 1999 -g -p "$pid" -o "$f.perf.data" -- sleep "$((S + 1))" 2>/dev/null &
            sp=$!
            sleep 0.3
            load "$t" "${A[$p:$svc]}" "$f.rec.json"
            wait "$sp" || true
            echo "  CPU by thread kind (samples):"
            perf report -i "$f.perf.data" --no-children --sort comm --stdio 2>/dev/null |
                awk '/^ +[0-9.]+%/ {c=$2; sub(/-[0-9]+$/, "", c); sub(/[0-9]+$/, "", c); s[c] += $1} END {for (k in s) printf "    %-20s %5.1f%%\n", k, s[k]}' | sort -k2 -rn
            echo "  top symbols (self):"
            perf report -i "$f.perf.data" --no-children --sort sym --stdio 2>/dev/null |
                grep -E '^ +[0-9.]+%' | sed -n '1,25s/^/   /p'
        done
    done
} | tee "$OUT/profile.txt"
log "profile in $OUT/profile.txt; perf data files in $OUT"
