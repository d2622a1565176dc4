#!/usr/bin/env bash
# Soak: 1,000,000 connect-send-echo-close cycles through ringproxy, then proof that nothing leaked:
#   * descriptors: ringproxy's /proc/PID/fd count at the end equals the count after warm-up, give or
#     take the splice pipes its pool grew by (2 descriptors each, from the engine's own stats);
#     sockets are io_uring direct descriptors and never appear in /proc/PID/fd, so also:
#   * sockets: no socket on the frontend or the server port in any state but LISTEN/TIME-WAIT once
#     the run is over (ss), and the engine's `active`, `parked`, `queued` and pipes lent are 0;
#   * memory: VmRSS growth from after warm-up to the end stays below SOAK_RSS_BOUND_KB (2048);
#   * nothing lost: every connection ringload established was echoed intact (no failed, dropped,
#     lost or corrupted exchange), the engine accepted and closed exactly as many, with no failed
#     connection, connect error or timeout.
# Bounded: the load phase stops after SOAK_LIMIT seconds (600) even if the cycles are not reached
# (that is a FAIL). Loopback only; ringload serve is the echo backend. Ctrl-C cleans up.
#
# Usage: scripts/soak.sh [CYCLES]
#   env: SOAK_CONCURRENCY (64) SOAK_RUN (30 s per ringload run) SOAK_LIMIT (600 s)
#        SOAK_WARMUP (10000 cycles) SOAK_WARMUP_S (45 s) SOAK_RSS_BOUND_KB (2048)
#        SOAK_SIZE (64 bytes per message) SOAK_IDLE_TIMEOUT (5s: client and server timeouts)
# Exit status: 0 PASS, 1 FAIL, 2 set-up error.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CYCLES=${1:-1000000}
CONC=${SOAK_CONCURRENCY:-64}
RUN=${SOAK_RUN:-30}
LIMIT=${SOAK_LIMIT:-600}
WARMUP=${SOAK_WARMUP:-10000}
RSS_BOUND_KB=${SOAK_RSS_BOUND_KB:-2048}
SIZE=${SOAK_SIZE:-64}
IDLE=${SOAK_IDLE_TIMEOUT:-5s}
WARMUP_S=${SOAK_WARMUP_S:-45}

cargo build --release -q -p ringproxy -p ringload
BIN=target/release
TMP=$(mktemp -d /tmp/ringproxy-soak.XXXXXX)
SOCK=$TMP/stats.sock
cleanup() {
  stop_all_bg
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM

die() { echo "soak: $*" >&2; exit 2; }

# --- backend and proxy -------------------------------------------------------------------------
start_ready serve "$TMP" $BIN/ringload serve --listen 127.0.0.1:0 --mode echo --workers 2
SERVER=$(ready_addr "$TMP/serve.ready")

cat > "$TMP/proxy.yaml" <<YAML
global:
  workers: 2
  maxconn: 10000
  stats: { socket: $SOCK }
defaults: { timeout: { connect: 5s, client: $IDLE, server: $IDLE } }
frontends: [{ name: soak, bind: "127.0.0.1:0", backend: echo, backlog: 4096 }]
backends: [{ name: echo, servers: [{ name: s, address: "$SERVER", source: 127.0.6.0/28 }] }]
YAML
start_ready proxy "$TMP" $BIN/ringproxy -c "$TMP/proxy.yaml"
PID=$BG_PID
PROXY=$(ready_addr "$TMP/proxy.ready" soak)
[ -S "$SOCK" ] || die "no stats socket"
FE_PORT=${PROXY##*:}
BE_PORT=${SERVER##*:}

# --- measurements ------------------------------------------------------------------------------
fds() { find "/proc/$PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$PID/status"; }
stats_json() { $BIN/ringproxy stats --socket "$SOCK" --json; }
# One engine figure summed over workers: stat KEY (dotted paths allowed, e.g. timeouts.client).
engine_stat() { stats_json | stats_total "$1"; }
# Sockets on a port in a state other than LISTEN or TIME-WAIT.
open_sockets() { ss -Htan "( sport = :$1 or dport = :$1 )" | awk '$1 != "LISTEN" && $1 != "TIME-WAIT"' | wc -l; }
wait_idle() {
  for _ in $(seq 200); do
    if [ "$(engine_stat active)" = 0 ] && [ "$(engine_stat parked)" = 0 ] && [ "$(engine_stat queued)" = 0 ] && [ "$(engine_stat pipes_in_use)" = 0 ]; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}
wait_no_sockets() {
  for _ in $(seq 200); do
    [ "$(open_sockets "$FE_PORT")" = 0 ] && [ "$(open_sockets "$BE_PORT")" = 0 ] && return 0
    sleep 0.05
  done
  return 1
}
snapshot() { # NAME: saves the engine's JSON stats
  stats_json > "$TMP/$1.json"
}

# Totals over every ringload run of a phase, appended by run_rate.
run_rate() { # PHASE DURATION_S
  local out="$TMP/rate-$1-$(date +%s%N).json"
  $BIN/ringload rate --target "$PROXY" --concurrency "$CONC" --size "$SIZE" --duration "${2}s" \
    --sources 127.0.7.0/28 --json --no-progress > "$out" 2> "$TMP/rate.err" || true
  [ -s "$out" ] || { cat "$TMP/rate.err" >&2; die "ringload rate printed no report"; }
  python3 - "$out" >> "$TMP/$1.runs" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, m = r["connections"], r["messages"]
print(c["attempted"], c["established"], m["echoed_ok"], m["corrupted"], c["failed"], c["dropped"], m["lost"])
PY
}
sum_runs() { # PHASE -> "attempted established echoed corrupted failed dropped lost"
  awk '{for (i = 1; i <= NF; i++) t[i] += $i} END {printf "%d %d %d %d %d %d %d\n", t[1], t[2], t[3], t[4], t[5], t[6], t[7]}' "$TMP/$1.runs"
}

echo "soak: ringproxy pid $PID on $PROXY -> ringload serve $SERVER; $CYCLES cycles of connect, send $SIZE bytes, read the echo, close; $CONC at a time"

# --- warm-up -----------------------------------------------------------------------------------
# At full rate for at least SOAK_WARMUP_S seconds: the timer wheel (4096 ticks of 10 ms = 41 s)
# keeps one vector per tick whose capacity follows the most deadlines ever filed in one tick, so
# its memory reaches steady state only after one full turn at the run's rate. Whatever grows after
# that grows with the number of connections, which is what the soak looks for.
: > "$TMP/warmup.runs"
W0=$(date +%s)
while :; do
  run_rate warmup 5
  read -r _ _ ok _ <<< "$(sum_runs warmup)"
  [ "$ok" -ge "$WARMUP" ] && [ $(( $(date +%s) - W0 )) -ge "$WARMUP_S" ] && break
done
wait_idle || die "the engine did not go idle after the warm-up"
wait_no_sockets || true
snapshot start
FD0=$(fds); RSS0=$(rss_kb)
echo "soak: after warm-up ($ok cycles in $(( $(date +%s) - W0 )) s): fds $FD0, VmRSS $RSS0 KiB, pipes pooled $(engine_stat pipes_pooled)"

# --- soak --------------------------------------------------------------------------------------
: > "$TMP/soak.runs"
T0=$(date +%s)
done_cycles=0
while [ "$done_cycles" -lt "$CYCLES" ]; do
  elapsed=$(( $(date +%s) - T0 ))
  [ "$elapsed" -ge "$LIMIT" ] && break
  left=$(( LIMIT - elapsed ))
  run_rate soak $(( left < RUN ? left : RUN ))
  read -r _ _ ok corrupt failed dropped lost <<< "$(sum_runs soak)"
  done_cycles=$ok
  echo "soak: $(( $(date +%s) - T0 ))s: $done_cycles cycles ($(( done_cycles / ( $(date +%s) - T0 + 1 ) ))/s), failed $failed, dropped $dropped, lost $lost, corrupted $corrupt; ringproxy fds $(fds), VmRSS $(rss_kb) KiB, pipes pooled $(engine_stat pipes_pooled)"
done
SOAK_S=$(( $(date +%s) - T0 ))

# --- after -------------------------------------------------------------------------------------
idle=ok; wait_idle || idle=FAIL
sockets=ok; wait_no_sockets || sockets=FAIL
snapshot end
FD1=$(fds); RSS1=$(rss_kb); HWM=$(hwm_kb)
FE_OPEN=$(open_sockets "$FE_PORT"); BE_OPEN=$(open_sockets "$BE_PORT")
FE_TW=$(ss -Htan "( sport = :$FE_PORT or dport = :$FE_PORT )" | awk '$1 == "TIME-WAIT"' | wc -l)

PYTHONPATH="$SCRIPTS/bench" python3 - "$TMP/start.json" "$TMP/end.json" "$(sum_runs soak)" "$CYCLES" "$FD0" "$FD1" "$RSS0" "$RSS1" "$HWM" \
  "$RSS_BOUND_KB" "$FE_OPEN" "$BE_OPEN" "$FE_TW" "$idle" "$sockets" "$SOAK_S" <<'PY'
import json, sys
from report import tot
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
attempted, established, echoed, corrupted, failed, dropped, lost = map(int, sys.argv[3].split())
cycles_wanted = int(sys.argv[4])
fd0, fd1, rss0, rss1, hwm, bound, fe_open, be_open, fe_tw = map(int, sys.argv[5:14])
idle, sockets, soak_s = sys.argv[14], sys.argv[15], int(sys.argv[16])

def d(key):
    return tot(b, key) - tot(a, key)

pipes0 = tot(a, "pipes_in_use") + tot(a, "pipes_pooled")
pipes1 = tot(b, "pipes_in_use") + tot(b, "pipes_pooled")
checks = []
def check(ok, what):
    checks.append((ok, what))

not_served = established - echoed
check(echoed >= cycles_wanted, f"cycles: {echoed:,} connect-send-echo-close cycles completed (wanted {cycles_wanted:,}) in {soak_s} s")
check(failed + dropped + lost + corrupted + not_served == 0,
      f"lost: {failed} failed connects, {dropped} dropped, {lost} lost, {corrupted} corrupted, {not_served} established but not echoed")
check(d("accepted") == established and d("closed") == established,
      f"engine: accepted {d('accepted'):,}, closed {d('closed'):,} during the soak (clients established {established:,})")
check(tot(b, "active") == 0 and tot(b, "parked") == 0 and tot(b, "queued") == 0 and idle == "ok",
      f"engine at the end: active {tot(b, 'active')}, parked {tot(b, 'parked')}, queued {tot(b, 'queued')}, pipes lent {tot(b, 'pipes_in_use')}")
check(d("failed") == 0 and d("connect_errors") == 0 and d("timeouts") == 0,
      f"engine: failed {d('failed')}, connect errors {d('connect_errors')}, timeouts {d('timeouts')}, "
      f"resets from clients {d('resets_from_client')}, from servers {d('resets_from_server')}, retries {d('retries')}")
check(fd1 - fd0 == 2 * (pipes1 - pipes0),
      f"descriptors: {fd0} -> {fd1} (pipes pooled {pipes0} -> {pipes1}, 2 descriptors each: expected {fd0 + 2 * (pipes1 - pipes0)})")
check(fe_open == 0 and be_open == 0 and sockets == "ok",
      f"sockets: {fe_open} open on the frontend port, {be_open} on the server port (TIME-WAIT on the frontend port: {fe_tw})")
check(rss1 - rss0 <= bound,
      f"memory: VmRSS {rss0} KiB -> {rss1} KiB ({rss1 - rss0:+d} KiB, bound {bound} KiB); peak VmHWM {hwm} KiB")
for ok, what in checks:
    print(("  ok   " if ok else "  FAIL ") + what)
verdict = all(ok for ok, _ in checks)
print(f"soak verdict: {'PASS' if verdict else 'FAIL'}")
sys.exit(0 if verdict else 1)
PY
