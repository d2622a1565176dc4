#!/usr/bin/env bash
# bench.sh: ringproxy against HAProxy and nginx (and no proxy at all), on loopback, in one run.
#
# Paths, measured interleaved (direct ringproxy haproxy haproxy-splice nginx, then again, ...) so
# that drift of the machine (other builds, thermal, caches) hits them alike; each round starts one
# path further along the list (round 2: ringproxy haproxy ... direct), so that no path is always
# the first after the previous test (measured: 1,000 bulk flows 0.79 x in one order, 1.02 x in
# the other, same two binaries):
#   direct          the client talks to the backend itself
#   ringproxy       target/release/ringproxy, workers = WORKERS, pinned, every tune key at its default
#                   (tune.batch_wait: auto since ad05e39)
#   ringproxy-base  (only with BASE_BIN or BASE_REV) an older ringproxy binary, run exactly like the
#                   ringproxy path (same configuration, pinning, sampling); the report puts it
#                   beside ringproxy with the ratio new / base
#   ringproxy-auto, ringproxy-always, ringproxy-never
#                   target/release/ringproxy with that `tune.splice` (the ringproxy path runs the
#                   default): the modes side by side, for choosing the default
#   ringproxy-batch target/release/ringproxy with `tune.batch_wait: BATCH_WAIT` (2ms): what an
#                   operator of many mostly idle connections would set, CPU against latency; in
#                   the full run beside the default, so both the heartbeats' saving and what
#                   latency and request rate pay for it are in the tables
#   haproxy         HAProxy `mode tcp`, nbthread = WORKERS, cpu-map, no splicing
#   haproxy-splice  the same with `option splice-auto` (tune.pipesize = ringproxy's pipe size)
#   haproxy-splice-always
#                   the same with `option splice-request` and `option splice-response`: every
#                   transfer spliced (HAProxy's splice-auto splices only when its heuristics say so)
#   nginx           nginx `stream`, worker_processes = WORKERS, worker_cpu_affinity auto, reuseport
# Every proxy gets the same maxconn, timeouts (connect 5s, client/server 50s) and one server per
# backend (roundrobin).
#
# Tests (each path, each round):
#   tput1, tput4   ringload throughput, 1 and 4 streams, up into `ringload serve --mode sink`
#   iperf1, iperf4 iperf3 -P 1 / -P 4 (cross-check of the above)
#   down1, down4   ringload throughput the other way: down from `ringload serve --mode source`
#   iperf1r, iperf4r  iperf3 -R -P 1 / -P 4 (server -> client)
#   both1, both4   ringload throughput both directions at once (source server): up + down
#   curl           one download of a CURL_MIB file (default 1 GiB) by curl from an nginx http
#                  backend; its bytes compared with the file's (integrity), Gbit/s
#   rate           ringload rate: connect, 64-byte echo, close; CONC loops
#   wrk            wrk -H 'Connection: close' against an nginx http backend (cross-check of rate)
#   ka             keep-alive request/response: ringload latency at an unreachable rate (closed
#                  loop, KA_CONNS connections): requests/s
#   lat            ringload latency at a fixed LAT_RATE req/s for 2 x DUR: coordinated-omission-
#                  corrected p50/p99/p99.9
#   hb9k, hb18k    the workload this proxy exists for: 9,000 / 18,000 connections held through a
#                  freshly started instance of the proxy, a 16-byte heartbeat on each every second
#                  (`ringload hold --heartbeat 1s --phase spread`: connection i of N heartbeats at
#                  i/N of the second, an even rate; before 2026-12-07 one second after its connect,
#                  so the ramp's bursts of connects came back as bursts of heartbeats every
#                  second, and the rounds' RTT varied with them); the proxy's CPU over HB_WINDOW s once all are
#                  established -> CPU µs per heartbeat round trip, and the heartbeats' p50 and p99
#                  RTT once the ramp is over (--latency-after; heartbeats sent in the ramp and
#                  echoed after the next was due are reported apart, "late in the ramp", and fail
#                  nothing: every path has some at 18,000 on 2 CPUs; late ones after it fail the
#                  round, and every late echo's RTT is in the percentiles).
#                  HAProxy cannot hold 18,000 (36,000 descriptors) in one process under
#                  RLIMIT_NOFILE 20000: above MAXCONN it runs as WORKERS processes of one thread
#                  each on one SO_REUSEPORT port (each its own CPU), the way it is run on such hosts
#   hb5s           the same at 9,000 connections with a heartbeat every 5 s: the clients connected
#                  within a second, so each period's heartbeats come within a second and four pass
#                  without any, as the keep-alives of clients that reconnected together do; the
#                  window is HB_WINDOW rounded up to whole periods (15 s: three)
#   flows          FLOWS (default 1,000) bulk streams both ways at once (`ringload throughput
#                  --direction both`, source server) through a freshly started instance of the
#                  proxy, 2 x DUR: Gbit/s up + down, and the proxy's peak RSS growth (sampled every
#                  0.2 s): the memory that many bulk flows cost
#   idle           IDLE_CONNS connections held with heartbeats through a freshly started instance of
#                  the proxy: its RSS growth / connection, the machine's Slab growth / connection
#                  (minus direct's in the same round: the proxy's kernel share), nothing lost; taken
#                  IDLE_SETTLE_S after a first sample 2.5 s past the ramp, the connections still
#                  held (what holding them costs: the median of IDLE_SAMPLES samples 0.5 s apart
#                  at the end of that span); the first sample's RSS is reported too (what the
#                  ramp's burst took); IDLE_HEARTBEAT s (2) between two heartbeats of a connection
#   idle60         the same with a heartbeat a minute (MQTT's default keep-alive) and the second
#                  sample IDLE60_SETTLE_S (12) s later: connections silent since the ramp, past
#                  ringproxy's tune.idle_poll_after (10 s), as most of a push or MQTT fleet is
# CPU of the proxy = utime+stime of all its processes and threads (/proc/PID/stat; io_uring io-wq
# threads are threads of ringproxy's process and count) over the tput4 test (-> CPU s per GB moved)
# and over the rate test (-> CPU s per 10,000 connections).
#
# Each figure is the median over ROUNDS rounds, with min-max; scripts/bench/report.py writes the
# tables (medians, ratios to direct and to HAProxy, targets) and the charts.
#
# Usage:  scripts/bench.sh                 full run (~75 min on 2 CPUs); charts go to docs/img/ and
#                                          the tables into docs/benchmarks.md (between markers)
#         QUICK=1 scripts/bench.sh         smoke run (~1.5 min), nothing under docs/ is touched
#         BASE_REV=a1f32ab scripts/bench.sh        this tree's ringproxy against commit a1f32ab's, in
#                                          the same run (adds the ringproxy-base path)
#         BASE_BIN=/path/to/old/ringproxy PATHS="ringproxy ringproxy-base" QUICK=1 scripts/bench.sh
# Knobs:  SKIP_BUILD=1 (use target/release as it is) ROUNDS DUR (s per test) WORKERS MAXCONN CONC KA_CONNS LAT_RATE IDLE_CONNS IDLE_SETTLE_S IDLE_HEARTBEAT PATHS OUT
#         TESTS CHURN_SOURCES HB_WINDOW CURL_MIB FLOWS BATCH_WAIT
#         UPDATE_DOCS=0|1 IMG=dir
#         BASE_BIN=FILE  the ringproxy-base binary (copied into the run's directory first)
#         BASE_REV=REV   build ringproxy at git revision REV in release, in a temporary worktree
#                        outside the repository (target dir BASE_TARGET_DIR, default
#                        target/bench-base, kept so the next build is incremental), and use that
#         With either, PATHS defaults to "direct ringproxy ringproxy-base ringproxy-batch haproxy
#         haproxy-splice haproxy-splice-always nginx".
#         A base older than ringproxy's --ready-file (a1f32ab) is located by its "listening on" lines.
# Needs root for apt-get when a peer or tool the chosen PATHS and TESTS use is missing (haproxy,
# nginx + stream module, iperf3, wrk, jq).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}; DUR=${DUR:-1}; IDLE_CONNS=${IDLE_CONNS:-2000}; UPDATE_DOCS=${UPDATE_DOCS:-0}
else
    ROUNDS=${ROUNDS:-3}; DUR=${DUR:-4}; IDLE_CONNS=${IDLE_CONNS:-9000}; UPDATE_DOCS=${UPDATE_DOCS:-1}
fi
WORKERS=${WORKERS:-$(nproc)}
MAXCONN=${MAXCONN:-9400}          # HAProxy needs 2 fds per connection + pipes under RLIMIT_NOFILE 20000
CONC=${CONC:-64}
KA_CONNS=${KA_CONNS:-64}
LAT_RATE=${LAT_RATE:-10000}
IDLE_SETTLE_S=${IDLE_SETTLE_S:-6}  # idle: how long after the first sample the second is taken
IDLE_HEARTBEAT=${IDLE_HEARTBEAT:-2} # idle: seconds between two heartbeats of a connection
IDLE_SAMPLES=${IDLE_SAMPLES:-7}     # idle, idle60: the second sample is the median of this many, 0.5 s apart
IDLE60_SETTLE_S=${IDLE60_SETTLE_S:-12} # idle60: as IDLE_SETTLE_S; 2.5 + 12 s: past idle_poll_after (10 s)
PIPE_SIZE=${PIPE_SIZE:-262144}
# Source addresses on each side of the churn test (client -> proxy, proxy -> echo backend): one
# address pair has ~28,000 ephemeral ports, and a port in TIME-WAIT is reusable only after 1-2 s,
# which caps one pair at ~14,000 connections/s for every path alike.
CHURN_SOURCES=${CHURN_SOURCES:-8}
# Extra `global.tune` keys for the ringproxy path only (not ringproxy-base): with BASE_BIN set to
# the same binary, a knob is measured against its default in one run, e.g. RP_TUNE='batch_wait: 50us'.
# BASE_TUNE does the same for ringproxy-base (both set: e.g. two binaries compared in one mode,
# RP_TUNE='splice: never' BASE_TUNE='splice: never').
RP_TUNE=${RP_TUNE:-}
BASE_TUNE=${BASE_TUNE:-}
# Extra lines for every HAProxy path's `global` section, separated by ';' (e.g. the same socket
# buffer sizes as an RP_TUNE: HAPROXY_GLOBAL='tune.sndbuf.client 262144; tune.sndbuf.server 262144').
HAPROXY_GLOBAL=${HAPROXY_GLOBAL:-}
BASE_BIN=${BASE_BIN:-}
BASE_REV=${BASE_REV:-}
BASE_TARGET_DIR=${BASE_TARGET_DIR:-$ROOT/target/bench-base}
if [ -n "$BASE_BIN$BASE_REV" ]; then
    PATHS=${PATHS:-direct ringproxy ringproxy-base ringproxy-batch haproxy haproxy-splice haproxy-splice-always nginx}
else
    PATHS=${PATHS:-direct ringproxy ringproxy-batch haproxy haproxy-splice haproxy-splice-always nginx}
fi
# The ringproxy-batch path's tune.batch_wait.
BATCH_WAIT=${BATCH_WAIT:-2ms}
TESTS=${TESTS:-tput1 iperf1 tput4 iperf4 down1 iperf1r down4 iperf4r both1 both4 curl rate wrk ka lat hb9k hb18k hb5s flows idle idle60}
HB_WINDOW=${HB_WINDOW:-$([ "$QUICK" = 1 ] && echo 5 || echo 15)}
CURL_MIB=${CURL_MIB:-1024}
FLOWS=${FLOWS:-1000}
has() { [[ " $1 " == *" $2 "* ]]; } # has LIST WORD
if has "$PATHS" ringproxy-base && [ -z "$BASE_BIN$BASE_REV" ]; then
    die "the ringproxy-base path needs BASE_BIN=/path/to/ringproxy or BASE_REV=<git revision>"
fi
[ -z "$BASE_BIN" ] || [ -z "$BASE_REV" ] || die "set BASE_BIN or BASE_REV, not both"
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "BASE_BIN $BASE_BIN is not an executable file"

OUT=${OUT:-$(mktemp -d /tmp/ringproxy-bench.XXXXXX)}
if [ "$UPDATE_DOCS" = 1 ]; then IMG=${IMG:-$ROOT/docs/img}; else IMG=${IMG:-$OUT/img}; fi
mkdir -p "$OUT/raw" "$OUT/run" "$IMG"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

BASE_WT=""
on_exit() {
    local rc=$?
    stop_all_bg
    [ -z "$BASE_WT" ] || git -C "$ROOT" worktree remove --force "$BASE_WT" 2>/dev/null || true
    rm -f "${BIG:-}" "${DL:-}"
    [ "$rc" = 0 ] || log "bench.sh failed (exit $rc); partial results in $OUT"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

[ "$(uname -s)" = Linux ] || die "Linux only"

# --- peers and tools -------------------------------------------------------------------------------
# what the chosen paths and tests use (the http backend, nginx, is wrk's)
need=()
if has "$PATHS" haproxy || has "$PATHS" haproxy-splice || has "$PATHS" haproxy-splice-always; then command -v haproxy >/dev/null || need+=(haproxy); fi
if has "$PATHS" nginx || has "$TESTS" wrk || has "$TESTS" curl; then
    [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)
fi
if has "$PATHS" nginx; then [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream); fi
if has "$TESTS" iperf1 || has "$TESTS" iperf4 || has "$TESTS" iperf1r || has "$TESTS" iperf4r; then
    command -v iperf3 >/dev/null || need+=(iperf3)
fi
if has "$TESTS" curl; then command -v curl >/dev/null || need+=(curl); fi
if has "$TESTS" wrk; then command -v wrk >/dev/null || need+=(wrk); fi
command -v jq >/dev/null || need+=(jq)
command -v ss >/dev/null || need+=(iproute2)
command -v pgrep >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}; run as root or install them"
    log "installing ${need[*]}"
    # policy-rc.d exit 101: the packages must not start their system services
    rcd=/usr/sbin/policy-rc.d made_rcd=0
    if [ ! -e "$rcd" ]; then printf '#!/bin/sh\nexit 101\n' >"$rcd"; chmod +x "$rcd"; made_rcd=1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || { [ "$made_rcd" = 0 ] || rm -f "$rcd"; die "apt-get install failed"; }
    [ "$made_rcd" = 0 ] || rm -f "$rcd"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
python3 -c 'import matplotlib' 2>/dev/null || {
    log "installing matplotlib (pip) for the charts"
    python3 -m pip install -q matplotlib || log "matplotlib unavailable: tables only, no charts"
}

build_binaries "$ROOT" "$OUT/bin"
RL=$OUT/bin/ringload
RP=$OUT/bin/ringproxy

# build_base REV: ringproxy at git revision REV, built in release in a temporary worktree outside the
# repository (target dir BASE_TARGET_DIR), copied to $OUT/bin/ringproxy-base. Sets BASE_INFO.
build_base() {
    local rev=$1 commit
    commit=$(git -C "$ROOT" rev-parse --verify -q "$rev^{commit}") || die "BASE_REV $rev is not a commit of this repository"
    BASE_WT=$(mktemp -d /tmp/ringproxy-base.XXXXXX)
    git -C "$ROOT" worktree add -q --detach "$BASE_WT" "$commit"
    log "building ringproxy at $rev (${commit:0:7}) in $BASE_WT (target dir $BASE_TARGET_DIR)"
    (cd "$BASE_WT" && CARGO_TARGET_DIR=$BASE_TARGET_DIR cargo build --release -q -p ringproxy) ||
        die "building ringproxy at $rev failed"
    cp "$BASE_TARGET_DIR/release/ringproxy" "$OUT/bin/ringproxy-base"
    git -C "$ROOT" worktree remove --force "$BASE_WT"
    BASE_WT=""
    BASE_INFO="commit ${commit:0:7} (BASE_REV=$rev)"
}
declare -A RP_BIN=([ringproxy]=$RP [ringproxy-auto]=$RP [ringproxy-always]=$RP [ringproxy-never]=$RP [ringproxy-batch]=$RP)
if [ -n "$BASE_REV" ]; then
    build_base "$BASE_REV"
elif [ -n "$BASE_BIN" ]; then
    cp "$BASE_BIN" "$OUT/bin/ringproxy-base"
    BASE_INFO="$BASE_BIN ($(date -r "$BASE_BIN" '+%Y-%m-%d %H:%M'))"
fi
[ -z "$BASE_BIN$BASE_REV" ] || RP_BIN[ringproxy-base]=$OUT/bin/ringproxy-base

# --- machine ---------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(nproc) x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -r)"
    echo "RLIMIT_NOFILE: $(ulimit -Sn) soft / $(ulimit -Hn) hard"
    echo "ringproxy: $BUILD_INFO"
    [ -z "$BASE_BIN$BASE_REV" ] || echo "ringproxy-base: $BASE_INFO"
    echo "haproxy: $(haproxy -v | head -1)"
    echo "nginx: $("$NGINX" -v 2>&1)"
    echo "iperf3: $(iperf3 --version | head -1)"
    echo "wrk: $(wrk --version 2>&1 | head -1)"
    [ -z "$RP_TUNE" ] || echo "ringproxy tune: $RP_TUNE"
    [ -z "$BASE_TUNE" ] || echo "ringproxy-base tune: $BASE_TUNE"
    ! has "$PATHS" ringproxy-batch || echo "ringproxy-batch tune: batch_wait: $BATCH_WAIT"
    [ -z "$HAPROXY_GLOBAL" ] || echo "haproxy global: $HAPROXY_GLOBAL"
    echo "rounds: $ROUNDS, $DUR s per test, workers $WORKERS, maxconn $MAXCONN, rate/wrk concurrency $CONC, keep-alive connections $KA_CONNS, fixed rate $LAT_RATE/s, idle $IDLE_CONNS connections"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# --- backends --------------------------------------------------------------------------------------
declare -A ADDR PIDS_OF
PICKED=" "
pick_port() {
    local p
    while :; do
        p=$(free_port)
        case "$PICKED" in *" $p "*) continue ;; esac
        PICKED="$PICKED$p "
        echo "$p"
        return
    done
}

# start_serve MODE: ringload serve; sets ADDR[direct:MODE]. Not called in $(...): the pid must be
# remembered by this shell to be stopped on exit.
start_serve() {
    start_ready "serve-$1" "$OUT/run" "$RL" serve --listen 127.0.0.1:0 --mode "$1" --workers "$WORKERS"
    ADDR[direct:$1]=$(ready_addr "$OUT/run/serve-$1.ready")
}
start_serve echo
start_serve sink
start_serve source
SERVICES="echo sink source"

if has "$TESTS" iperf1 || has "$TESTS" iperf4 || has "$TESTS" iperf1r || has "$TESTS" iperf4r; then
    IPERF_PORT=$(pick_port)
    start_bg "iperf3 -s" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$OUT/run/iperf3-server.log" 2>&1
    ADDR[direct:iperf]=127.0.0.1:$IPERF_PORT
    SERVICES="$SERVICES iperf"
fi

if has "$TESTS" wrk || has "$TESTS" curl; then
HTTP_PORT=$(pick_port)
mkdir -p "$OUT/run/http/www" "$OUT/run/http/tmp"
echo ok >"$OUT/run/http/www/index.html"
if has "$TESTS" curl; then
    # in memory (tmpfs), so a download measures the path and not the disk; removed on exit
    BIG=/dev/shm/ringproxy-bench-big.$$ DL=/dev/shm/ringproxy-bench-dl.$$
    log "writing the ${CURL_MIB} MiB file for the curl test"
    head -c "$((CURL_MIB << 20))" /dev/urandom >"$BIG"
    ln -sfn "$BIG" "$OUT/run/http/www/big.bin"  # (-f: an OUT of an earlier run has its link)
fi
cat >"$OUT/run/http/nginx.conf" <<CONF
user root;
worker_processes $WORKERS;
pid $OUT/run/http/nginx.pid;
error_log $OUT/run/http/error.log;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $OUT/run/http/tmp;
    proxy_temp_path $OUT/run/http/tmp;
    fastcgi_temp_path $OUT/run/http/tmp;
    uwsgi_temp_path $OUT/run/http/tmp;
    scgi_temp_path $OUT/run/http/tmp;
    server {
        listen 127.0.0.1:$HTTP_PORT backlog=4096;
        root $OUT/run/http/www;
    }
}
CONF
start_bg "nginx (http backend)" "$NGINX" -p "$OUT/run/http" -c "$OUT/run/http/nginx.conf" -g 'daemon off;' \
    2>"$OUT/run/http/stderr"
ADDR[direct:http]=127.0.0.1:$HTTP_PORT
SERVICES="$SERVICES http"
fi

# --- proxies ---------------------------------------------------------------------------------------
backend_of() { # SERVICE -> backend address
    echo "${ADDR[direct:$1]}"
}

# each ringproxy binary's stats socket, when that build has one: io_uring counters per test; and
# whether it has --ready-file (a base built before a1f32ab does not)
declare -A RP_STATS RP_READY STATS_OF
for p in "${!RP_BIN[@]}"; do
    RP_STATS[$p]=""
    "${RP_BIN[$p]}" stats --help >/dev/null 2>&1 && RP_STATS[$p]=$OUT/run/$p-stats.sock
    RP_READY[$p]=0
    [[ "$("${RP_BIN[$p]}" --help 2>&1)" == *--ready-file* ]] && RP_READY[$p]=1
done

# start_PROXY INSTANCE [options] SERVICE...: one proxy process with a frontend per service, each to
# that service's backend; sets ADDR[INSTANCE:SERVICE] and PIDS_OF[INSTANCE]. The main instances
# (named after their path) serve every test but idle; idle gets a fresh instance per round, so that
# its RSS growth is not hidden by memory an earlier round freed into the allocator.
start_ringproxy() { # PATH INSTANCE SERVICE...
    local path=$1 inst=$2 d=$OUT/run/$2 s bin
    shift 2
    bin=${RP_BIN[$path]}
    mkdir -p "$d"
    {
        echo "global:"
        echo "  workers: $WORKERS"
        echo "  pin_cpus: true"
        echo "  maxconn: ${INST_MAXCONN:-$MAXCONN}"
        case "$path" in
            ringproxy-auto | ringproxy-always | ringproxy-never) echo "  tune: { pipe_size: $PIPE_SIZE, splice: ${path#ringproxy-} }" ;;
            ringproxy) echo "  tune: { pipe_size: $PIPE_SIZE${RP_TUNE:+, $RP_TUNE} }" ;;
            ringproxy-base) echo "  tune: { pipe_size: $PIPE_SIZE${BASE_TUNE:+, $BASE_TUNE} }" ;;
            ringproxy-batch) echo "  tune: { pipe_size: $PIPE_SIZE, batch_wait: $BATCH_WAIT }" ;;
            *) echo "  tune: { pipe_size: $PIPE_SIZE }" ;;
        esac
        # (A fresh instance has a socket of its own: STATS_OF.)
        if [ -n "${RP_STATS[$path]:-}" ]; then
            STATS_OF[$inst]=${RP_STATS[$path]}
            [ "$inst" = "$path" ] || STATS_OF[$inst]=$OUT/run/$inst-stats.sock
            echo "  stats: { socket: \"${STATS_OF[$inst]}\" }"
        fi
        echo "defaults:"
        echo "  timeout: { connect: 5s, client: 50s, server: 50s, drain: 1s }"
        echo "  balance: roundrobin"
        echo "frontends:"
        for s in "$@"; do echo "  - { name: $s, bind: \"127.0.0.1:0\", backend: $s }"; done
        echo "backends:"
        for s in "$@"; do
            if [ "$s" = echo ]; then
                echo "  - { name: $s, servers: [{ name: s1, address: \"$(backend_of "$s")\", source: \"127.0.3.1-127.0.3.$CHURN_SOURCES\" }] }"
            else
                echo "  - { name: $s, servers: [{ name: s1, address: \"$(backend_of "$s")\" }] }"
            fi
        done
    } >"$d/ringproxy.yaml"
    if [ "${RP_READY[$path]}" = 1 ]; then
        start_bg "$inst" "$bin" -c "$d/ringproxy.yaml" --ready-file "$d/ready.json" 2>"$d/stderr"
        wait_ready "$d/ready.json" 15 "$BG_PID" || die "$path did not start: $(cat "$d/stderr")"
    else
        # a base older than --ready-file: the same JSON from its "listening on" lines
        start_bg "$inst" "$bin" -c "$d/ringproxy.yaml" 2>"$d/stderr"
        ready_from_log "$d/stderr" "$d/ready.json" "$BG_PID" "$@" || die "$path did not start: $(cat "$d/stderr")"
    fi
    for s in "$@"; do
        ADDR[$inst:$s]=$(ready_addr "$d/ready.json" "$s")
    done
    PIDS_OF[$inst]=$BG_PID
}

# ready_from_log STDERR READY PID FRONTEND...: for a ringproxy without --ready-file, wait (15 s, or
# until PID exits) until STDERR says every FRONTEND is listening, then write READY from those lines.
ready_from_log() {
    local err=$1 ready=$2 pid=$3 end
    shift 3
    end=$(($(now_ms) + 15000))
    until grep -q "frontend \"${*: -1}\" listening on" "$err" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$end" ] || return 1
        sleep 0.1
    done
    python3 - "$err" "$pid" >"$ready.tmp" <<'PY'
import json, re, sys
ls = [{"name": m[1], "addr": m[2]} for m in re.finditer(r'frontend "([^"]*)" listening on (\S+)', open(sys.argv[1]).read())]
print(json.dumps({"pid": int(sys.argv[2]), "generation": 0, "listeners": ls, "stats_socket": None, "metrics": None}))
PY
    mv "$ready.tmp" "$ready"
}

# start_haproxy INSTANCE SPLICE(0|1) SERVICE...: one process of WORKERS threads; when the instance
# must hold more than MAXCONN connections (INST_MAXCONN; 2 descriptors each under RLIMIT_NOFILE),
# WORKERS processes of one thread each, pinned one per CPU, on the same SO_REUSEPORT ports (HAProxy
# sets SO_REUSEPORT on its listeners), each with maxconn MAXCONN.
start_haproxy() {
    local inst=$1 splice=$2 d=$OUT/run/$1 s procs=1 threads=$WORKERS k
    shift 2
    mkdir -p "$d"
    [ "${INST_MAXCONN:-$MAXCONN}" -le "$MAXCONN" ] || { procs=$WORKERS; threads=1; }
    for s in "$@"; do ADDR[$inst:$s]=127.0.0.1:$(pick_port); done
    PIDS_OF[$inst]=""
    for k in $(seq 0 $((procs - 1))); do
        {
            echo "global"
            echo "    nbthread $threads"
            if [ "$procs" = 1 ]; then
                echo "    cpu-map auto:1/1-$WORKERS 0-$((WORKERS - 1))"
            else
                echo "    cpu-map 1/1 $k"
            fi
            echo "    maxconn $MAXCONN"
            echo "    fd-hard-limit $(ulimit -Hn)"
            echo "    maxpipes 512"
            echo "    tune.pipesize $PIPE_SIZE"
            echo "    pidfile $d/haproxy-$k.pid"
            if [ -n "$HAPROXY_GLOBAL" ]; then
                IFS=';' read -ra extra <<<"$HAPROXY_GLOBAL"
                for line in "${extra[@]}"; do echo "    ${line# }"; done
            fi
            echo "defaults"
            echo "    mode tcp"
            echo "    timeout connect 5s"
            echo "    timeout client 50s"
            echo "    timeout server 50s"
            echo "    maxconn $MAXCONN"
            echo "    balance roundrobin"
            [ "$splice" = 1 ] && echo "    option splice-auto"
            [ "$splice" = 2 ] && printf '    option splice-request\n    option splice-response\n'
            for s in "$@"; do
                echo "frontend $s"
                echo "    bind ${ADDR[$inst:$s]}"
                echo "    default_backend $s"
                echo "backend $s"
                if [ "$s" = echo ]; then
                    # The classic recipe: one server line per source address.
                    for i in $(seq 1 "$CHURN_SOURCES"); do
                        echo "    server s$i $(backend_of "$s") source 127.0.3.$i"
                    done
                else
                    echo "    server s1 $(backend_of "$s")"
                fi
            done
        } >"$d/haproxy-$k.cfg"
        start_bg "$inst-$k" haproxy -db -f "$d/haproxy-$k.cfg" >"$d/stdout-$k" 2>"$d/stderr-$k"
        PIDS_OF[$inst]="${PIDS_OF[$inst]}${PIDS_OF[$inst]:+ }$BG_PID"
    done
}

start_nginx() { # INSTANCE SERVICE...
    local inst=$1 d=$OUT/run/$1 s port share
    shift
    mkdir -p "$d"
    {
        echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        echo "user root;"
        echo "worker_processes $WORKERS;"
        echo "worker_cpu_affinity auto;"
        echo "worker_rlimit_nofile $(ulimit -Hn);"
        echo "pid $d/nginx.pid;"
        echo "error_log $d/error.log warn;"
        # each proxied connection is two nginx connections; reuseport spreads clients over workers
        echo "events { worker_connections $((2 * ${INST_MAXCONN:-$MAXCONN} / WORKERS + 1024)); }"
        echo "stream {"
        echo "    proxy_connect_timeout 5s;"
        echo "    proxy_timeout 50s;"
        for s in "$@"; do
            port=$(pick_port)
            ADDR[$inst:$s]=127.0.0.1:$port
            if [ "$s" = echo ]; then
                share=$(awk "BEGIN { printf \"%.2f\", 100 / $CHURN_SOURCES }") # nginx takes 2 decimals
                echo "    split_clients \"\$remote_addr\$remote_port\" \$churn_source {"
                for i in $(seq 1 "$CHURN_SOURCES"); do
                    if [ "$i" -lt "$CHURN_SOURCES" ]; then
                        echo "        $share% 127.0.3.$i;"
                    else
                        echo "        * 127.0.3.$i;"
                    fi
                done
                echo "    }"
                echo "    server { listen 127.0.0.1:$port reuseport backlog=4096; proxy_bind \$churn_source; proxy_pass $(backend_of "$s"); }"
            else
                echo "    server { listen 127.0.0.1:$port reuseport backlog=4096; proxy_pass $(backend_of "$s"); }"
            fi
        done
        echo "}"
    } >"$d/nginx.conf"
    start_bg "$inst" "$NGINX" -p "$d" -c "$d/nginx.conf" -g 'daemon off;' 2>"$d/stderr"
    PIDS_OF[$inst]=$BG_PID
}

declare -A PROC
# start_path PATH INSTANCE SERVICE...: start, wait until every frontend accepts, set PROC[INSTANCE]
# (the processes whose CPU and memory are the proxy's: nginx's master and workers)
start_path() {
    local path=$1 inst=$2 s
    shift 2
    case "$path" in
        ringproxy*) start_ringproxy "$path" "$inst" "$@" ;; # ready once its file is there
        haproxy) start_haproxy "$inst" 0 "$@" ;;
        haproxy-splice) start_haproxy "$inst" 1 "$@" ;;
        haproxy-splice-always) start_haproxy "$inst" 2 "$@" ;;
        nginx) start_nginx "$inst" "$@" ;;
        *) die "unknown path $path" ;;
    esac
    case "$path" in
        ringproxy*) ;;
        *)
            for s in "$@"; do
                wait_port "${ADDR[$inst:$s]}" 10 ||
                    die "$path: $s (${ADDR[$inst:$s]}) does not accept connections; see $OUT/run/$inst/"
            done
            ;;
    esac
    sleep 0.3
    case "$path" in
        nginx) PROC[$inst]=$(with_children "${PIDS_OF[$inst]}" | tr '\n' ' ') ;;
        haproxy*) PROC[$inst]=${PIDS_OF[$inst]} ;;
        *) PROC[$inst]=${PIDS_OF[$inst]} ;;
    esac
}

for p in $PATHS; do
    case "$p" in
        direct) PROC[direct]="" ;;
        ringproxy | ringproxy-base | ringproxy-batch | ringproxy-auto | ringproxy-always | ringproxy-never | haproxy | haproxy-splice | haproxy-splice-always | nginx)
            # shellcheck disable=SC2086 # SERVICES is a list of words
            start_path "$p" "$p" $SERVICES
            ;;
        *) die "unknown path $p" ;;
    esac
    log "$p: echo ${ADDR[$p:echo]} sink ${ADDR[$p:sink]} iperf3 ${ADDR[$p:iperf]:--} http ${ADDR[$p:http]:--} pids ${PROC[$p]:--}"
done
for p in ringproxy ringproxy-base; do
    grep -h . "$OUT/run/$p/stderr" 2>/dev/null | sed "s/^/  $p: /" >&2 || true
done

# --- one measurement -------------------------------------------------------------------------------
# record KEY=VALUE...: one JSON line in results.jsonl (numbers stay numbers)
record() {
    python3 - "$@" >>"$RESULTS" <<'PY'
import json, sys
d = {}
for kv in sys.argv[1:]:
    k, v = kv.split("=", 1)
    try:
        d[k] = int(v)
    except ValueError:
        try:
            d[k] = float(v)
        except ValueError:
            d[k] = v
print(json.dumps(d))
PY
}

# snap_stats PATH FILE [INSTANCE]: the counters (JSON) of a ringproxy path's main instance, or of
# INSTANCE of that path, when its binary has a stats socket
snap_stats() {
    local sock=${STATS_OF[${3:-$1}]:-}
    [ -n "$sock" ] || return 0
    timeout 5 "${RP_BIN[$1]}" stats --socket "$sock" --json >"$2" 2>/dev/null || rm -f "$2"
}

host_of() { echo "${1%:*}"; }
port_of() { echo "${1##*:}"; }
TO=$((DUR * 3 + 40))   # hard bound on any one client command
RUN_TIMEOUT=$TO        # run_logged bounds every measured command by it

run_test() { # TEST PATH ROUND
    local t=$1 p=$2 r=$3 f a cpu0 cpu1 usr0 usr1 sys0 sys1 w0 w1 st0 st1 rc=0
    f=$OUT/raw/r$r-$t-$p
    snap_stats "$p" "$f.stats0.json"
    # shellcheck disable=SC2086
    read -r iowq0 _ cs0 < <(thread_stats ${PROC[$p]})
    # shellcheck disable=SC2086
    cpu0=$(cpu_ticks ${PROC[$p]}); read -r sys0 tot0 < <(sys_ticks); w0=$(date +%s.%N); st0=$(steal_ticks)
    # shellcheck disable=SC2086
    usr0=$(cpu_user_ticks ${PROC[$p]})
    case "$t" in
        tput1 | tput4)
            a=${ADDR[$p:sink]}
            run_logged "$f.cmd" "$RL" throughput --target "$a" --streams "${t#tput}" --direction up \
                --duration "${DUR}s" --json --no-progress >"$f.json" 2>"$f.err" || rc=$?
            ;;
        down1 | down4 | both1 | both4)
            a=${ADDR[$p:source]}
            run_logged "$f.cmd" "$RL" throughput --target "$a" --streams "${t: -1}" \
                --direction "$([ "${t%?}" = down ] && echo down || echo both)" \
                --duration "${DUR}s" --json --no-progress >"$f.json" 2>"$f.err" || rc=$?
            ;;
        iperf1 | iperf4 | iperf1r | iperf4r)
            a=${ADDR[$p:iperf]}
            local streams=${t#iperf}
            run_logged "$f.cmd" iperf3 -c "$(host_of "$a")" -p "$(port_of "$a")" -P "${streams%r}" -t "$DUR" -J \
                $([ "${t: -1}" = r ] && echo -R) >"$f.json" 2>"$f.err" || rc=$?
            ;;
        curl)
            a=${ADDR[$p:http]}
            rm -f "$DL"
            run_logged "$f.cmd" curl -sS --max-time "$TO" -o "$DL" \
                -w '%{http_code} %{size_download} %{speed_download} %{time_total}\n' "http://$a/big.bin" \
                >"$f.txt" 2>"$f.err" || rc=$?
            # integrity: the bytes that arrived are the file's
            if cmp -s "$DL" "$BIG"; then echo intact >>"$f.txt"; else echo "DIFFERENT from the file" >>"$f.txt"; fi
            rm -f "$DL"
            ;;
        hb9k) hb_test "$t" "$p" "$r" 9000; return ;;
        hb18k) hb_test "$t" "$p" "$r" 18000; return ;;
        hb5s) hb_test "$t" "$p" "$r" 9000 5; return ;;
        rate)
            a=${ADDR[$p:echo]}
            run_logged "$f.cmd" "$RL" rate --target "$a" --concurrency "$CONC" --size 64 --duration "${DUR}s" \
                --sources "127.0.6.1-127.0.6.$CHURN_SOURCES" --json --no-progress >"$f.json" 2>"$f.err" || rc=$?
            ;;
        wrk)
            a=${ADDR[$p:http]}
            run_logged "$f.cmd" wrk -t2 -c"$CONC" -d"${DUR}s" -H 'Connection: close' "http://$a/" \
                >"$f.txt" 2>"$f.err" || rc=$?
            ;;
        ka)
            a=${ADDR[$p:echo]}
            run_logged "$f.cmd" "$RL" latency --target "$a" --conns "$KA_CONNS" --rate 2000000 --size 64 \
                --duration "${DUR}s" --json --no-progress >"$f.json" 2>"$f.err" || rc=$?
            ;;
        lat)
            a=${ADDR[$p:echo]}
            # twice as long: tails need samples, and a stall of the shared host hits fewer of them
            run_logged "$f.cmd" "$RL" latency --target "$a" --conns "$KA_CONNS" --rate "$LAT_RATE" --size 64 \
                --duration "$((2 * DUR))s" --json --no-progress >"$f.json" 2>"$f.err" || rc=$?
            ;;
        idle) idle_test "$p" "$r" idle "$IDLE_HEARTBEAT" "$IDLE_SETTLE_S"; return ;;
        idle60) idle_test "$p" "$r" idle60 60 "$IDLE60_SETTLE_S"; return ;;
        flows) flows_test "$p" "$r"; return ;;
    esac
    w1=$(date +%s.%N)
    # shellcheck disable=SC2086
    cpu1=$(cpu_ticks ${PROC[$p]}); read -r sys1 tot1 < <(sys_ticks); st1=$(steal_ticks)
    # shellcheck disable=SC2086
    usr1=$(cpu_user_ticks ${PROC[$p]})
    # shellcheck disable=SC2086
    read -r iowq1 iowqn1 cs1 < <(thread_stats ${PROC[$p]})
    snap_stats "$p" "$f.stats1.json"
    record test="$t" path="$p" round="$r" file="$f" rc="$rc" wall_s="$(awk "BEGIN {print $w1 - $w0}")" \
        iowq_ticks="$((iowq1 - iowq0))" iowq_threads="$iowqn1" ctxsw="$((cs1 - cs0))" \
        cpu_ticks="$((cpu1 - cpu0))" user_ticks="$((usr1 - usr0))" sys_busy_ticks="$((sys1 - sys0))" \
        sys_total_ticks="$((tot1 - tot0))" steal_ticks="$((st1 - st0))" clk_tck="$(getconf CLK_TCK)" proxied="$([ "$p" = direct ] && echo 0 || echo 1)"
    [ "$rc" = 0 ] || log "  $t $p: exit $rc (see $f.*)"
}

# fresh_instance PATH NAME SERVICE: for a test that measures a proxy from its start, a new instance
# NAME of PATH serving SERVICE; INST names it (the direct path has no instance: INST=direct)
fresh_instance() {
    INST=direct
    [ "$1" = direct ] && return
    INST=$2
    start_path "$1" "$INST" "$3"
}

# The idle test: IDLE_CONNS connections held through the path (heartbeat every IDLE_HEARTBEAT s, 2
# by default, so each is really proxied); RSS of the proxy and the machine's Slab sampled before, once all are established and a
# heartbeat round has passed (1: right after the ramp), and IDLE_SETTLE_S later while they are still
# held (2: what holding them costs; a proxy may keep part of what the ramp's burst took, or give it
# back — ringproxy's receive-buffer ring narrows once a second).
# mem_kb INSTANCE: the instance's RSS and its anonymous part, the machine's Slab and SUnreclaim, in
# KiB, on one line
mem_kb() {
    # shellcheck disable=SC2086
    echo "$(rss_kb ${PROC[$1]}) $(anon_kb ${PROC[$1]}) $(slab_kb) $(sunreclaim_kb)"
}

idle_test() { # PATH ROUND TEST HEARTBEAT_S SETTLE_S
    local p=$1 r=$2 t=$3 hb=$4 settle=$5 f a port rss0 rss1 rss2 anon0 anon1 anon2 slab0 slab1 slab2 sunr0 sunr1 sunr2 hold n=0 rc=0
    local hold_s inst cmd cpu1=0 cpu2=0 w1 span
    f=$OUT/raw/r$r-$t-$p
    fresh_instance "$p" "$t-$p-r$r" echo
    inst=$INST
    a=${ADDR[$inst:echo]}
    port=$(port_of "$a")
    hold_s=$((IDLE_CONNS / 5000 + 7 + settle))
    sleep 1
    read -r rss0 anon0 slab0 sunr0 < <(mem_kb "$inst")
    cmd=("$RL" hold --target "$a" --conns "$IDLE_CONNS" --ramp 10000/s --heartbeat "${hb}s" --duration "${hold_s}s"
        --sources 127.0.5.0/28 --json --no-progress)
    log_cmd "$f.cmd" "${cmd[@]}"
    start_bg "ringload hold ($t)" timeout $((hold_s + 60)) "${cmd[@]}" >"$f.json" 2>"$f.err"
    hold=$BG_PID
    # until every client connection is established (at most hold_s - 3 s), then one heartbeat round
    for _ in $(seq $(((hold_s - 3) * 10))); do
        n=$(established_to "$port")
        [ "$n" -ge "$IDLE_CONNS" ] && break
        sleep 0.1
    done
    sleep 2.5
    read -r rss1 anon1 slab1 sunr1 < <(mem_kb "$inst")
    # shellcheck disable=SC2086
    cpu1=$(cpu_ticks ${PROC[$inst]})
    w1=$(date +%s.%N)
    # The second sample is the median of IDLE_SAMPLES taken 0.5 s apart at the end of the settle:
    # what holding them costs, not the moment a burst of heartbeats met the sample (ringproxy's
    # receive-buffer ring widens for a burst and gives the pages back within a second or two,
    # ~0.5-1 MiB per worker; a single sample read 385-565 B per connection for one build).
    sleep "$(awk -v s="$settle" -v n="$IDLE_SAMPLES" 'BEGIN { w = s - (n - 1) * 0.5; print (w > 0 ? w : 0) }')"
    read -r rss2 anon2 slab2 sunr2 < <(for _ in $(seq "$IDLE_SAMPLES"); do mem_kb "$inst"; sleep 0.5; done | median_cols)
    # (what holding them cost the proxy between the two samples, over the time that really took)
    # shellcheck disable=SC2086
    cpu2=$(cpu_ticks ${PROC[$inst]})
    span=$(awk -v a="$w1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
    # (ringproxy's gauges then: what of the RSS is the receive-buffer ring's pages, per worker;
    # after the CPU sample, which the query would add to)
    [ "$inst" = direct ] || snap_stats "$p" "$f.stats.json" "$inst"
    reap_bg "$hold" || rc=$?
    record test="$t" path="$p" round="$r" file="$f" rc="$rc" conns="$IDLE_CONNS" seen_established="$n" heartbeat_s="$hb" \
        rss0_kb="$rss0" rss1_kb="$rss1" anon0_kb="$anon0" anon1_kb="$anon1" anon2_kb="$anon2" slab0_kb="$slab0" slab1_kb="$slab1" sunr0_kb="$sunr0" sunr1_kb="$sunr1" \
        settle_s="$settle" rss2_kb="$rss2" slab2_kb="$slab2" sunr2_kb="$sunr2" \
        cpu_ticks="$((cpu2 - cpu1))" cpu_span_s="$span" clk_tck="$(getconf CLK_TCK)" \
        proxied="$([ "$p" = direct ] && echo 0 || echo 1)"
    [ "$rc" = 0 ] || log "  $t $p: exit $rc (see $f.*)"
    [ "$inst" = direct ] || stop_inst "$inst"
    # let the closed connections' memory go back before the next path's baseline
    sleep 1
}

# The bulk-flows test: FLOWS streams both ways at once through a fresh instance of the path (as
# idle: a long-running instance would reuse what earlier tests left); the proxy's RSS sampled every
# 0.2 s: its peak growth over the start is what so many bulk flows cost in memory.
flows_test() { # PATH ROUND
    local p=$1 r=$2 f a inst rss0 rss peak run rc=0 cmd pr0
    f=$OUT/raw/r$r-flows-$p
    fresh_instance "$p" "flows-$p-r$r" source
    inst=$INST
    a=${ADDR[$inst:source]}
    sleep 0.5
    # shellcheck disable=SC2086
    rss0=$(rss_kb ${PROC[$inst]})
    peak=$rss0
    cmd=("$RL" throughput --target "$a" --streams "$FLOWS" --direction both --duration "$((2 * DUR))s"
        --json --no-progress)
    log_cmd "$f.cmd" "${cmd[@]}"
    pr0=$(tcp_pressure_ms)
    start_bg "ringload throughput (flows)" timeout "$TO" "${cmd[@]}" >"$f.json" 2>"$f.err"
    run=$BG_PID
    while kill -0 "$run" 2>/dev/null; do
        # shellcheck disable=SC2086
        rss=$(rss_kb ${PROC[$inst]})
        [ "$rss" -le "$peak" ] || peak=$rss
        sleep 0.2
    done
    reap_bg "$run" || rc=$?
    [ "$rc" = 0 ] || log "  flows $p: exit $rc (see $f.*)"
    [ "$inst" = direct ] || stop_inst "$inst"
    sleep 1
    # (After the sockets are gone: an episode of pressure is counted when it ends.)
    record test=flows path="$p" round="$r" file="$f" rc="$rc" flows="$FLOWS" rss0_kb="$rss0" peak_kb="$peak" \
        tcp_pressure_ms="$(($(tcp_pressure_ms) - pr0))" proxied="$([ "$p" = direct ] && echo 0 || echo 1)"
}

# stop_inst INSTANCE: stops every process of a proxy instance
stop_inst() {
    local pid
    for pid in ${PIDS_OF[$1]}; do stop_bg "$pid" || true; done
}

# The heartbeat test: N connections held through a fresh instance of the path (as idle, but every
# connection sends a 16-byte heartbeat each second, or each HEARTBEAT_S, and checks its echo); once
# all are established and a heartbeat round has passed, the proxy's CPU over HB_WINDOW s (whole
# periods). -> CPU per heartbeat round trip (cpu / (N x window / HEARTBEAT_S)) and the heartbeats'
# p99 RTT over the whole hold; and the whole machine's busy CPU over the same window (the
# client's, the server's and the kernel's work in softirq too, which no process is charged for):
# CPUs x window minus idle, iowait and steal, as report.py computes it. (Not /proc/stat's busy fields: this kernel samples them at each tick,
# and the tick does not run on an idle CPU, so the short bursts of work between idle spells that
# heartbeats make go largely uncounted; idle time is measured exactly. A process's utime + stime
# are scaled to its exact run time, so the proxy's own CPU is exact.)
hb_test() { # TEST PATH ROUND CONNS [HEARTBEAT_S]
    local t=$1 p=$2 r=$3 n=$4 hb=${5:-1} win f a port inst hold hold_s ramp_s est=0 cpu0 cpu1 w0 w1 st0 st1 busy0 busy1 tot0 tot1 rc=0 cmd
    f=$OUT/raw/r$r-$t-$p
    INST_MAXCONN=$((n + 1000)) fresh_instance "$p" "$t-$p-r$r" echo
    inst=$INST
    a=${ADDR[$inst:echo]}
    port=$(port_of "$a")
    ramp_s=$((n / 10000 + 1))
    # whole periods: each burst of a bursty test counted once
    win=$(((HB_WINDOW + hb - 1) / hb * hb))
    hold_s=$((ramp_s + 4 + win + 3))
    cmd=("$RL" hold --target "$a" --conns "$n" --ramp 10000/s --heartbeat "${hb}s" --phase spread
        --duration "${hold_s}s" --latency-after "$((ramp_s + 2))s" --sources 127.0.5.0/28 --json --no-progress)
    log_cmd "$f.cmd" "${cmd[@]}"
    start_bg "ringload hold ($t)" timeout $((hold_s + 60)) "${cmd[@]}" >"$f.json" 2>"$f.err"
    hold=$BG_PID
    for _ in $(seq $(((ramp_s + 3) * 10))); do
        est=$(established_to "$port")
        [ "$est" -ge "$n" ] && break
        sleep 0.1
    done
    sleep 2
    # ringproxy's long loop turns during the window: its counters, read just outside it
    [ "$inst" = direct ] || snap_stats "$p" "$f.stats0.json" "$inst"
    # shellcheck disable=SC2086
    cpu0=$(cpu_ticks ${PROC[$inst]}); w0=$(date +%s.%N); st0=$(steal_ticks); read -r busy0 tot0 < <(sys_ticks)
    sleep "$win"
    # shellcheck disable=SC2086
    cpu1=$(cpu_ticks ${PROC[$inst]}); w1=$(date +%s.%N); st1=$(steal_ticks); read -r busy1 tot1 < <(sys_ticks)
    [ "$inst" = direct ] || snap_stats "$p" "$f.stats1.json" "$inst"
    reap_bg "$hold" || rc=$?
    record test="$t" path="$p" round="$r" file="$f" rc="$rc" conns="$n" heartbeat_s="$hb" seen_established="$est" \
        window_s="$(awk "BEGIN {print $w1 - $w0}")" cpu_ticks="$((cpu1 - cpu0))" clk_tck="$(getconf CLK_TCK)" \
        steal_ticks="$((st1 - st0))" sys_total_ticks="$((tot1 - tot0))" sys_busy_ticks="$((busy1 - busy0))" \
        cpus="$(grep -c '^cpu[0-9]' /proc/stat)" \
        proxied="$([ "$p" = direct ] && echo 0 || echo 1)"
    [ "$rc" = 0 ] || log "  $t $p: exit $rc (see $f.*)"
    [ "$inst" = direct ] || stop_inst "$inst"
    sleep 1
}

# One download straight from nginx, not measured, right before each measured one: the first 1 GiB
# written to tmpfs after other tests runs at about half the speed of the next (2026-12-04: every
# round's first curl, whichever path, 420-540 MB/s, the second 1.0-1.2 GB/s; on this virtual
# machine memory freed a while ago costs more to fill again), so without it the rotation decided
# the row.
warm_curl() {
    rm -f "$DL"
    curl -sS --max-time "$TO" -o "$DL" "http://${ADDR[direct:http]}/big.bin" >/dev/null 2>&1 || true
    rm -f "$DL"
}

# --- the run ---------------------------------------------------------------------------------------
START=$(date +%s)
read -ra PATH_LIST <<<"$PATHS"
for r in $(seq "$ROUNDS"); do
    for t in $TESTS; do
        log "round $r/$ROUNDS: $t"
        # Rotated by one path per round.
        for ((k = 0; k < ${#PATH_LIST[@]}; k++)); do
            [ "$t" = curl ] && warm_curl
            run_test "$t" "${PATH_LIST[$(((k + r - 1) % ${#PATH_LIST[@]}))]}" "$r"
        done
    done
done
log "measurements done in $(( $(date +%s) - START )) s"

# every proxy should still be alive (a crash would make its numbers meaningless)
for p in $PATHS; do
    [ "$p" = direct ] && continue
    kill -0 "${PIDS_OF[$p]}" 2>/dev/null || die "$p exited during the run; see $OUT/run/$p/"
done

DOC_ARGS=()
[ "$UPDATE_DOCS" = 1 ] && DOC_ARGS=(--doc "$ROOT/docs/benchmarks.md")
python3 "$ROOT/scripts/bench/report.py" --out "$OUT" --img "$IMG" "${DOC_ARGS[@]}" >"$OUT/report.md"
cat "$OUT/report.md"
log "raw results, configs and logs in $OUT; charts in $IMG"
