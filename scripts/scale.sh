#!/usr/bin/env bash
# scale.sh: hold CONNS (default 300,000) proxied connections through one ringproxy process on this
# host, with heartbeats, and report what it took.
#
#   1. tunes the host for the run (saved first, restored on exit, also on Ctrl-C):
#        net.ipv4.ip_local_port_range  1024 65535 (every listener here binds port 0, so it is taken
#                                      before any outgoing connection could take it)
#        net.ipv4.ip_local_reserved_ports  the backends' ports (what `ringproxy check` asks for)
#        net.core.somaxconn, net.ipv4.tcp_max_syn_backlog  65535
#        net.ipv4.tcp_mem              for 4 sockets per proxied connection (client, proxy x2, server)
#        net.ipv4.tcp_rmem/tcp_wmem    default buffers 4096 (idle sockets stay small)
#      and runs everything in a network namespace of its own (removed on exit) whose TCP hash table
#      of established sockets is sized for the run (net.ipv4.tcp_child_ehash_entries: 4 sockets per
#      connection; the host's own table is sized at boot, 262,144 buckets here: at 4 million sockets
#      every packet's socket lookup would walk chains of ~16)
#   2. starts `ringload serve --mode echo` (SERVE_WORKERS workers, two listening addresses)
#   3. starts ringproxy: WORKERS workers pinned over the CPUs (each worker's io_uring file table is
#      capped by RLIMIT_NOFILE: 9,936 connections per worker under 20,000), maxconn MAXCONN, two servers
#      with SOURCES_PER_SERVER source IPs each (127.0.2.0/24); scripts/fixtures/two-servers.yaml
#   4. `ringload hold --conns CONNS --sources 127.0.1.0/24 --ramp RAMP --heartbeat HEARTBEAT`, held HOLD_S
#      seconds after the ramp (ringload splits itself into processes of < 20,000 connections)
#   5. reports established, failed, dropped, lost, corrupted, ramp time, heartbeat RTT percentiles,
#      ringproxy's per-core table (stats socket), memory per connection: ringproxy's RSS growth (user)
#      and the machine's Slab growth (kernel; 4 sockets per proxied connection, of which ringproxy's
#      are 2), sampled once every connection is up; then (BASELINE=1) the same hold straight to the
#      backends, without the proxy, as a control for what the host itself loses.
#
# Usage: scripts/scale.sh                    300,000 connections, held 60 s, then the control (~7 min; root)
#        QUICK=1 scripts/scale.sh            20,000 connections, held 10 s
#        CONNS=1000000 scripts/scale.sh      one million: heartbeat 60 s, ramp 4,000/s (~109 workers; ~21 GiB;
#                                            ~10 min, twice that with the control; see docs/tuning.md)
# Memory guard: the run is stopped cleanly (the clients are told to stop, every figure is still
# reported) as soon as MemAvailable falls under MEM_FLOOR_MB (default 1024), never by the OOM killer;
# memory-guard.txt then says where the memory went (meminfo, the largest slab caches, each side's RSS).
# Knobs: SKIP_BUILD=1 BASELINE=0|1 IOWQ LOAD_NICE CONNS HOLD_S RAMP WORKERS MAXCONN SERVE_WORKERS SOURCES_PER_SERVER HEARTBEAT OUT UPDATE_DOCS IMG MEM_FLOOR_MB
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    CONNS=${CONNS:-20000}; HOLD_S=${HOLD_S:-10}; UPDATE_DOCS=${UPDATE_DOCS:-0}
else
    CONNS=${CONNS:-300000}; HOLD_S=${HOLD_S:-60}; UPDATE_DOCS=${UPDATE_DOCS:-1}
fi
# A million heartbeats every 10 s (100,000 round trips/s) is more than this host's 2 CPUs carry with
# the clients and backends on them: from 500,000 connections the defaults are those of the
# documented 1,000,000 run (docs/tuning.md section 6), a heartbeat every 60 s and a 4,000/s ramp.
if [ "$CONNS" -ge 500000 ]; then
    RAMP=${RAMP:-4000}; HEARTBEAT=${HEARTBEAT:-60}
else
    RAMP=${RAMP:-8000}; HEARTBEAT=${HEARTBEAT:-10}
fi
NOFILE=$(ulimit -Hn)
PER_WORKER=$(((NOFILE - 64) / 2))
# enough workers that the busiest one (SO_REUSEPORT spreads by hash) stays under its table: 8% headroom
MIN_WORKERS=$(((CONNS * 108 / 100 + PER_WORKER - 1) / PER_WORKER))
[ "$MIN_WORKERS" -ge "$(nproc)" ] || MIN_WORKERS=$(nproc)
WORKERS=${WORKERS:-$MIN_WORKERS}
MAXCONN=${MAXCONN:-$((CONNS + CONNS / 30))}
SERVE_WORKERS=${SERVE_WORKERS:-$((CONNS / 12500 + 2))}
SOURCES_PER_SERVER=${SOURCES_PER_SERVER:-32}
IOWQ=${IOWQ:-}                    # global.tune.iowq_workers (empty: the engine's default)
# Scheduling priority of the clients and backends (ringload hold and serve). They share the 2 CPUs with
# ringproxy's workers. 0, the same as the proxy: at a million connections the clients and backends,
# with the kernel's TCP work for their sockets, keep about one CPU busy, and ahead of the proxy (-5, this script's default
# until 2026-12-03) they starve it: it falls behind on accepts and on relaying, its queues grow and
# heartbeats are lost (docs/tuning.md section 6 has both runs).
LOAD_NICE=${LOAD_NICE:-0}
BASELINE=${BASELINE:-1}           # 1: also run the same hold without the proxy, as a control
MEM_FLOOR_MB=${MEM_FLOOR_MB:-1024}
OUT=${OUT:-$(mktemp -d /tmp/ringproxy-scale.XXXXXX)}
if [ "$UPDATE_DOCS" = 1 ]; then IMG=${IMG:-$ROOT/docs/img}; else IMG=${IMG:-$OUT}; fi
mkdir -p "$OUT" "$IMG"
DURATION=$((CONNS / RAMP + HOLD_S + 15))   # ramp (estimated) + hold + margin; the real hold is reported

[ "$(id -u)" = 0 ] || die "scale.sh changes sysctls: run it as root"
[ "$SOURCES_PER_SERVER" -le 128 ] || die "SOURCES_PER_SERVER must be <= 128 (two servers share 127.0.2.0/24)"

# --- sysctls: save, set, restore ------------------------------------------------------------------
SYSCTLS=(net.ipv4.ip_local_port_range net.ipv4.ip_local_reserved_ports net.core.somaxconn net.ipv4.tcp_max_syn_backlog
    net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.ipv4.tcp_child_ehash_entries)
NETNS=rpscale
NSX=(ip netns exec "$NETNS")
declare -A SAVED
for k in "${SYSCTLS[@]}"; do SAVED[$k]=$(sysctl -n "$k" | tr '\t' ' '); done
restore_sysctls() {
    local k
    for k in "${!SAVED[@]}"; do
        sysctl -q -w "$k=${SAVED[$k]}" >/dev/null 2>&1 || log "could not restore $k=${SAVED[$k]}"
    done
}
on_exit() {
    local rc=$?
    stop_all_bg
    ip netns del "$NETNS" 2>/dev/null || true
    restore_sysctls
    log "sysctls restored: $(for k in "${SYSCTLS[@]}"; do printf '%s=%s; ' "$k" "$(sysctl -n "$k" | tr '\t' ' ')"; done)"
    [ "$rc" = 0 ] || log "scale.sh failed (exit $rc); logs in $OUT"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

build_binaries "$ROOT" "$OUT/bin"

# --- the namespace: a TCP hash table of 4 x CONNS buckets (a power of two, at most 2^24) ----------
EHASH=65536
while [ "$EHASH" -lt $((4 * CONNS)) ] && [ "$EHASH" -lt 16777216 ]; do EHASH=$((EHASH * 2)); done
ip netns del "$NETNS" 2>/dev/null || true
sysctl -q -w net.ipv4.tcp_child_ehash_entries="$EHASH"
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
RL=$OUT/bin/ringload
RP=$OUT/bin/ringproxy

# tcp_mem in pages: every socket of the run (4 per proxied connection) at its 4096+4096 floor, x1.5
# for pressure and x2 for the hard limit, never below what is set now
PAGES=$((4 * CONNS * 8192 / 4096))
read -r m0 m1 m2 <<<"${SAVED[net.ipv4.tcp_mem]}"
[ "$PAGES" -gt "$m0" ] || PAGES=$m0
TCP_MEM="$PAGES $((PAGES * 3 / 2)) $((PAGES * 2))"
[ $((PAGES * 2)) -gt "$m2" ] || TCP_MEM="$m0 $m1 $m2"
read -r _ r1 r2 <<<"${SAVED[net.ipv4.tcp_rmem]}"
read -r _ w1 w2 <<<"${SAVED[net.ipv4.tcp_wmem]}"
declare -A SET=(
    [net.ipv4.ip_local_port_range]="1024 65535"
    [net.core.somaxconn]=65535
    [net.ipv4.tcp_max_syn_backlog]=65535
    [net.ipv4.tcp_mem]="$TCP_MEM"
    [net.ipv4.tcp_rmem]="4096 4096 $r2"
    [net.ipv4.tcp_wmem]="4096 4096 $w2"
)
: "$r1" "$w1"

# --- backends ----------------------------------------------------------------------------------
start_ready serve "$OUT" "${NSX[@]}" nice -n "$LOAD_NICE" "$RL" serve --listen 127.0.0.1:0 --listen 127.0.0.1:0 --mode echo \
    --workers "$SERVE_WORKERS"
SERVE_PID=$BG_PID
mapfile -t SERVERS < <(ready_addrs "$OUT/serve.ready")
[ "${#SERVERS[@]}" = 2 ] || die "expected two listening addresses from ringload serve"

# the backends' ports were bound (port 0) before the range is widened; reserve them all the same
SET[net.ipv4.ip_local_reserved_ports]=$(for a in "${SERVERS[@]}"; do echo "${a##*:}"; done | paste -sd, -)

# --- ringproxy configuration -------------------------------------------------------------------
STATS=$OUT/stats.sock
{
    echo "# generated by scripts/scale.sh: $CONNS connections under RLIMIT_NOFILE $NOFILE ($PER_WORKER per worker)"
    render_fixture two-servers.yaml WORKERS="$WORKERS" MAXCONN="$MAXCONN" STATS="socket: \"$STATS\"" \
        TUNE="${IOWQ:+iowq_workers: $IOWQ}" FRONTEND=hold BIND=127.0.0.1:0 BALANCE=roundrobin \
        SERVER_A="${SERVERS[0]}" SOURCES_A="127.0.2.0-127.0.2.$((SOURCES_PER_SERVER - 1))" \
        SERVER_B="${SERVERS[1]}" SOURCES_B="127.0.2.128-127.0.2.$((128 + SOURCES_PER_SERVER - 1))"
} >"$OUT/scale.yaml"
"${NSX[@]}" "$RP" check -c "$OUT/scale.yaml" >"$OUT/check-before.txt" 2>&1 || true

# tcp_mem is the host's; the others belong to the namespace
for k in "${!SET[@]}"; do
    if [ "$k" = net.ipv4.tcp_mem ]; then sysctl -q -w "$k=${SET[$k]}"; else "${NSX[@]}" sysctl -q -w "$k=${SET[$k]}"; fi
done
log "sysctls set (in namespace $NETNS, TCP hash table $EHASH buckets): $(for k in "${SYSCTLS[@]}"; do
    if [ "$k" = net.ipv4.tcp_mem ]; then v=$(sysctl -n "$k"); else v=$("${NSX[@]}" sysctl -n "$k" 2>/dev/null); fi
    printf '%s=%s; ' "$k" "$(tr '\t' ' ' <<<"$v")"; done)"
"${NSX[@]}" "$RP" check -c "$OUT/scale.yaml" >"$OUT/check-after.txt" 2>&1 || true

start_ready ringproxy "$OUT" "${NSX[@]}" "$RP" -c "$OUT/scale.yaml"
RP_PID=$BG_PID
PROXY=$(ready_addr "$OUT/ringproxy.ready" hold)
cat "$OUT/ringproxy.log" >&2
sleep 1

stats_json() { timeout 10 "$RP" stats --socket "$STATS" --json 2>/dev/null; }
active() { stats_json | stats_total active 2>/dev/null || echo 0; }
# inuse (the namespace's), mem (pages: the host's, as tcp_mem)
sockstat_tcp() { echo "$("${NSX[@]}" awk '/^TCP:/ {print $3}' /proc/net/sockstat) $(awk '/^TCP:/ {print $NF}' /proc/net/sockstat)"; }

RSS0=$(rss_kb "$RP_PID"); SLAB0=$(slab_kb); read -r SOCK0 TCPMEM0 < <(sockstat_tcp)
CPU0=$(cpu_ticks "$RP_PID")
log "ringproxy $PROXY (pid $RP_PID, $WORKERS workers); RSS $RSS0 KiB, Slab $SLAB0 KiB before"

HOLD_CMD=(hold --target "$PROXY" --conns "$CONNS" --sources 127.0.1.0/24 --ramp "${RAMP}/s"
    --heartbeat "${HEARTBEAT}s" --duration "${DURATION}s" --connect-timeout 10s)
echo "nice -n $LOAD_NICE ringload ${HOLD_CMD[*]} --json --report ${IMG#"$ROOT"/}/scale-hold.svg" >"$OUT/hold.cmd"
log "ringload ${HOLD_CMD[*]}"
T0=$(date +%s)
start_bg "ringload hold" timeout $((DURATION + 120)) "${NSX[@]}" nice -n "$LOAD_NICE" "$RL" "${HOLD_CMD[@]}" --json --no-progress \
    --report "$IMG/scale-hold.svg" >"$OUT/hold.json" 2>"$OUT/hold.err"
HOLD_PID=$BG_PID

# timeline every 5 s: proxied connections (stats), RSS, Slab, TCP sockets. Memory at the peak is the
# median of the samples taken while every connection is up, from one heartbeat round after the last
# one was established (other work on the host moves Slab too; the median shrugs off a transient).
mem_available_mb() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
# memory_guard: every 0.5 s, on its own (the sampling below waits on the stats socket, which a
# starved host answers late); once MemAvailable is under the floor, it writes where the memory went
# and stops the clients (SIGINT: they still report), then exits.
memory_guard() {
    local t0 m; t0=$(date +%s)
    while kill -0 "$HOLD_PID" 2>/dev/null; do
        m=$(mem_available_mb)
        if [ "$m" -lt "$MEM_FLOOR_MB" ]; then
            {
                echo "MemAvailable fell to $m MiB (floor $MEM_FLOOR_MB MiB) $(($(date +%s) - t0)) s into the hold, with $(
                    "${NSX[@]}" awk '/^TCP:/ {print $3}' /proc/net/sockstat) TCP sockets open"
                echo; grep -E '^(MemTotal|MemFree|MemAvailable|Cached|Slab|SReclaimable|SUnreclaim|PageTables|KernelStack|Percpu):' /proc/meminfo
                echo; echo "largest slab caches (name, objects, object size, MiB):"
                awk 'NR > 2 {printf "%-28s %10d %6d %8.1f\n", $1, $3, $4, $3 * $4 / 1048576}' /proc/slabinfo | sort -k4 -n -r | head -12
                # shellcheck disable=SC2046
                echo; echo "RSS: ringproxy $(rss_kb "$RP_PID") KiB, ringload serve $(rss_kb "$SERVE_PID") KiB, ringload hold (all processes) $(
                    rss_kb $(descendants "$HOLD_PID")) KiB"
                echo; "${NSX[@]}" grep -E '^(TCP|sockets):' /proc/net/sockstat
            } >"$OUT/memory-guard.txt"
            log "memory guard: $(head -1 "$OUT/memory-guard.txt"); stopping the clients (details: $OUT/memory-guard.txt)"
            kill -INT "$HOLD_PID" 2>/dev/null || true
            return
        fi
        sleep 0.5
    done
}
start_bg "memory guard" memory_guard
echo "t_s active rss_kb slab_kb tcp_inuse tcp_mem_pages" >"$OUT/timeline.txt"
PEAK_DONE=0 FULL_AT=""
: >"$OUT/peak-samples.txt"
while kill -0 "$HOLD_PID" 2>/dev/null; do
    t=$(($(date +%s) - T0))
    a=$(active); [[ "$a" =~ ^[0-9]+$ ]] || a=0   # 0 also when the stats socket did not answer in 10 s
    r=$(rss_kb "$RP_PID"); sl=$(slab_kb)
    read -r si sm < <(sockstat_tcp)
    echo "$t $a $r $sl $si $sm" >>"$OUT/timeline.txt"
    log "t=${t}s proxied $a, ringproxy RSS $r KiB, Slab $sl KiB, TCP sockets $si, MemAvailable $(mem_available_mb) MiB"
    # every connection up: by the proxy's count, or (when its stats socket answers late, as with
    # 100+ workers on 2 CPUs) by the kernel's, 4 sockets per connection
    if [ "$a" -ge "$CONNS" ] || [ "$si" -ge $((4 * CONNS)) ]; then
        [ -n "$FULL_AT" ] || FULL_AT=$t
        if [ $((t - FULL_AT)) -ge $((HEARTBEAT + 5)) ]; then
            echo "$r $sl $si $sm" >>"$OUT/peak-samples.txt"
            # CPU of each side while every connection is held (first to last such sample, all
            # taken before the clients' planned end, while every client process is alive)
            if [ "$t" -lt $((DURATION - 3)) ]; then
                # shellcheck disable=SC2046
                cl=$(cpu_ticks $(descendants "$HOLD_PID"))
                read -r iw _ _ < <(thread_stats "$RP_PID")
                now="$(date +%s.%N) $(cpu_ticks "$RP_PID") $iw $(cpu_ticks "$SERVE_PID") $cl $(sys_ticks)"
                [ "$PEAK_DONE" = 1 ] || echo "$now" >"$OUT/cpu-hold-start.txt"
                echo "$now" >"$OUT/cpu-hold-end.txt"
            fi
            if [ "$PEAK_DONE" = 0 ]; then
                # in the background: a worker starved of CPU answers the stats socket late, and the
                # sampling must go on meanwhile
                ps -L -o tid,psr,time,comm -p "$RP_PID" >"$OUT/threads-peak.txt" 2>&1 || true
                start_bg "ringproxy stats" bash -c '
                    timeout 60 "$1" stats --socket "$2" >"$3/stats-peak.txt" 2>&1
                    timeout 60 "$1" stats --socket "$2" --json >"$3/stats-peak.json" 2>/dev/null' _ "$RP" "$STATS" "$OUT"
                STATS_BG=$BG_PID
                PEAK_DONE=1
            fi
        fi
    fi
    sleep 5
done
rc=0
reap_bg "$HOLD_PID" || rc=$?
if [ -n "${STATS_BG:-}" ]; then reap_bg "$STATS_BG" || true; fi
CPU1=$(cpu_ticks "$RP_PID")
timeout 30 "$RP" stats --socket "$STATS" >"$OUT/stats-end.txt" 2>&1 || true
stats_json >"$OUT/stats-end.json" || true
kill -0 "$RP_PID" 2>/dev/null || die "ringproxy exited during the run: $(tail -5 "$OUT/ringproxy.log")"
if [ -s "$OUT/peak-samples.txt" ]; then
    read -r RSS1 SLAB1 SOCK1 TCPMEM1 < <(python3 -c '
import statistics, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
print(*[int(statistics.median(c)) for c in zip(*rows)])' "$OUT/peak-samples.txt")
    log "memory at the peak: median of $(wc -l <"$OUT/peak-samples.txt") samples"
else
    # Never all at once for a heartbeat round: memory from the sample with the most sockets, per
    # connection proxied then (the report says so and how many that was)
    read -r RSS1 SLAB1 SOCK1 TCPMEM1 < <(sort -k5 -n "$OUT/timeline.txt" | tail -1 | awk '{print $3, $4, $5, $6}')
    PARTIAL=1
    log "never saw all $CONNS connections proxied for a heartbeat round; memory from the sample with the most sockets ($SOCK1)"
fi

PARTIAL=${PARTIAL:-0} BUILD_INFO=$BUILD_INFO RUN_DATE=$(date -u +%Y-%m-%dT%H:%MZ) PYTHONPATH="$SCRIPTS/bench" python3 - "$OUT" "$CONNS" "$HOLD_S" "$RSS0" "$RSS1" "$SLAB0" "$SLAB1" "$SOCK0" "$SOCK1" "$TCPMEM0" "$TCPMEM1" \
    "$((CPU1 - CPU0))" "$(getconf CLK_TCK)" "$rc" "$WORKERS" "$SERVE_WORKERS" "$SOURCES_PER_SERVER" "$HEARTBEAT" \
    >"$OUT/scale-report.md" <<'PY'
import json, os, sys
from report import tot
out = sys.argv[1]
conns, hold_s, rss0, rss1, slab0, slab1, sock0, sock1, tm0, tm1, cpu, tck, rc, workers, swork, nsrc, heartbeat = map(int, sys.argv[2:19])
j = json.load(open(f"{out}/hold.json"))
c, m, L = j["connections"], j["messages"], j["latency_us"] or {}
ramp = c["ramp_time_s"]
held = (j["elapsed_s"] - ramp) if ramp is not None else None
cmd = open(f"{out}/hold.cmd").read().strip()
w = print
w(f"Generated by `scripts/scale.sh` on this host ({os.environ.get('BUILD_INFO', '')}, "
  f"{os.environ.get('RUN_DATE', '')}): {conns:,} connections, {workers} ringproxy workers, `ringload serve` with "
  f"{swork} workers, {nsrc} source IPs per server (2 servers).\n")
w("```\n" + cmd + "\n```\n")
w("| measurement | result |")
w("|---|---|")
w(f"| established | {c['established']:,} of {conns:,} (peak open {c['peak_open']:,}) |")
w(f"| failed | {c['failed']:,} {json.dumps(c['failed_by_cause'])} |")
w(f"| dropped (established, then lost) | {c['dropped']:,} {json.dumps(c['dropped_by_cause'])} |")
w(f"| heartbeats | {m['sent']:,} sent, {m['echoed_ok']:,} echoed ok, **{m['lost']:,} lost**, "
  f"{m.get('late', 0):,} late ({m.get('late_in_warmup', 0):,} more in the ramp), {m['corrupted']:,} corrupted |")
w(f"| ramp time | {ramp:.1f} s ({conns / ramp:,.0f} connections/s) |" if ramp else "| ramp time | never completed |")
w(f"| held after the ramp | {held:.1f} s with heartbeats (target: {hold_s} s) |" if held is not None else "| held | – |")
if L:
    w(f"| heartbeat RTT | p50 {L['p50']/1e3:.2f} ms, p90 {L['p90']/1e3:.2f} ms, p99 {L['p99']/1e3:.2f} ms, "
      f"p99.9 {L['p999']/1e3:.2f} ms, max {L['max']/1e3:.1f} ms (n={L['count']:,}) |")
n = conns
if os.environ.get("PARTIAL") == "1":
    # each client holds 1 socket, each proxied connection 3 more (ringproxy x2, server)
    n = max(1, (sock1 - sock0 - c["established"]) // 3)
    w(f"| proxied at once | never all {conns:,}: at most **~{n:,}** (the kernel's count: {sock1:,} TCP sockets, "
      f"1 per client and 3 per proxied connection); the rest waited in the listening sockets' queues |")
w(f"| ringproxy RSS | {rss0/1024:.1f} MiB before, {rss1/1024:.1f} MiB at the peak: "
  f"**{(rss1-rss0)*1024/n:.0f} bytes per proxied connection** (user space) |")
w(f"| kernel Slab (whole machine) | +{(slab1-slab0)/1048576:.2f} GiB: {(slab1-slab0)*1024/(sock1-sock0):,.0f} bytes per TCP "
  f"socket; a proxied connection has 4 (client, ringproxy x2, server): **~{2*(slab1-slab0)*1024/(sock1-sock0):,.0f} bytes "
  f"are ringproxy's 2** |")
w(f"| TCP sockets in use | {sock0:,} before, {sock1:,} at the peak; socket buffer memory {tm0*4/1024:.0f} → {tm1*4/1024:.0f} MiB |")
w(f"| ringproxy CPU over the run | {cpu/tck:.1f} CPU s |")
w(f"| ringload exit | {j['exit_code']} ({j['verdict']}); script saw exit {rc} |")
w("")
if os.path.exists(f"{out}/memory-guard.txt"):
    g = open(f"{out}/memory-guard.txt").read()
    w(f"**Stopped by the memory guard**: {g.splitlines()[0]}. Where the memory was:\n")
    w("```\n" + g.split("\n", 2)[2].rstrip() + "\n```\n")
try:
    a = list(map(float, open(f"{out}/cpu-hold-start.txt").read().split()))
    b = list(map(float, open(f"{out}/cpu-hold-end.txt").read().split()))
    dt = b[0] - a[0]
    if dt > 0:
        c = lambda i: (b[i] - a[i]) / tck / dt
        rp = c(1)
        w(f"CPU while all {conns:,} connections were held ({dt:.0f} s, heartbeats only): ringproxy {rp:.2f} CPUs "
          f"(of which its live io-wq threads {c(2):.2f}), `ringload serve` {c(3):.2f}, `ringload hold` {c(4):.2f}; "
          f"the whole machine {100 * (1 - ((b[6] - a[6]) - (b[5] - a[5])) / (os.cpu_count() * dt * tck)):.0f}% busy "
          f"of {os.cpu_count()} CPUs (all but its idle time, which the kernel measures exactly, unlike the "
          f"busy fields' tick samples; what the three above leave: other work on the host). "
          f"{conns / heartbeat:,.0f} heartbeats/s expected: ringproxy "
          f"{rp * 1e6 / (conns / heartbeat):.0f} CPU µs per heartbeat round trip.\n")
except (OSError, ValueError, IndexError):
    pass
try:
    w("ringproxy's per-core table (`ringproxy stats`) with every connection up:\n")
    # the per-core and per-server sections (the per-source one has a line per worker and source)
    txt = open(f"{out}/stats-peak.txt").read().split("\n\ncore backend/server")[0]
    w("```\n" + txt.rstrip() + "\n```\n")
except OSError:
    pass
try:
    s = json.load(open(f"{out}/stats-end.json"))
    W = s["workers"]
    t = lambda k: tot(s, k)
    w(f"At the end of the hold: accepted {t('accepted'):,}, closed {t('closed'):,}, failed {t('failed'):,}, "
      f"connect errors {t('connect_errors'):,}, timeouts {t('timeouts'):,}, "
      f"SQEs {t('ring.submitted'):,}, CQEs {t('ring.completions'):,}, io_uring_enter {t('ring.enter_calls'):,}, "
      f"SQ full {t('ring.sq_full'):,}, CQ overflow {t('ring.cq_overflow'):,}; "
      f"active per worker: min {min(x['active'] for x in W):,}, max {max(x['active'] for x in W):,} (at the end).\n")
    s2 = json.load(open(f"{out}/stats-peak.json"))
    act = [x["active"] for x in s2["workers"]]
    w(f"Proxied connections per worker at the peak: min {min(act):,}, max {max(act):,} "
      f"(cap {(int(s2['nofile']) - 64) // 2:,} per worker).\n")
except (OSError, ValueError, KeyError):
    pass
PY
# Control: the same clients against the same backends with no proxy, right after, under the same
# host conditions. What it loses, the host (clients, backends, other work) loses without any proxy.
if [ "$BASELINE" = 1 ] && [ -f "$OUT/memory-guard.txt" ]; then
    log "no control run: the memory guard stopped this one"
elif [ "$BASELINE" = 1 ]; then
    stop_bg "$RP_PID" || true
    sleep 5
    log "control run without the proxy: ringload hold --target ${SERVERS[0]},${SERVERS[1]} ..."
    BASE_CMD=(hold --target "${SERVERS[0]},${SERVERS[1]}" --conns "$CONNS" --sources 127.0.1.0/24 --ramp "${RAMP}/s"
        --heartbeat "${HEARTBEAT}s" --duration "${DURATION}s" --connect-timeout 10s)
    brc=0
    timeout $((DURATION + 120)) "${NSX[@]}" nice -n "$LOAD_NICE" "$RL" "${BASE_CMD[@]}" --json --no-progress \
        >"$OUT/baseline.json" 2>"$OUT/baseline.err" || brc=$?
    python3 - "$OUT/baseline.json" "$brc" "nice -n $LOAD_NICE ringload ${BASE_CMD[*]}" >>"$OUT/scale-report.md" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except ValueError:
    print(f"Control run without the proxy failed (exit {sys.argv[2]}).\n")
    raise SystemExit(0)
c, m, L = j["connections"], j["messages"], j["latency_us"] or {}
print("Control run right after, **without the proxy** (same clients, backends, sources and heartbeats; the clients "
      "connect to the backends directly):\n")
print("```\n" + sys.argv[3] + "\n```\n")
print(f"Without the proxy: established {c['established']:,} of {c['planned']:,}, failed {c['failed']:,}, "
      f"dropped {c['dropped']:,}; heartbeats {m['sent']:,} sent, **{m['lost']:,} lost**, {m.get('late', 0):,} late; "
      f"ramp {c['ramp_time_s'] or float('nan'):.1f} s; heartbeat RTT p50 {L.get('p50', 0)/1e3:.2f} ms, "
      f"p99 {L.get('p99', 0)/1e3:.2f} ms, max {L.get('max', 0)/1e3:.1f} ms.\n")
PY
fi
cat "$OUT/scale-report.md"
if [ "$UPDATE_DOCS" = 1 ] && [ -f "$ROOT/docs/tuning.md" ]; then
    python3 - "$ROOT/docs/tuning.md" "$OUT/scale-report.md" <<'PY'
import sys
doc, rep = open(sys.argv[1]).read(), open(sys.argv[2]).read()
b, e = "<!-- scale:begin -->", "<!-- scale:end -->"
if b in doc and e in doc:
    doc = doc[: doc.index(b) + len(b)] + "\n" + rep + doc[doc.index(e):]
    open(sys.argv[1], "w").write(doc)
PY
fi
log "logs, configs and raw results in $OUT"
[ "$rc" = 0 ] || exit "$rc"
