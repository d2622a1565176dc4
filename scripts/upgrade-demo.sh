#!/usr/bin/env bash
# upgrade-demo.sh: three reloads and one binary upgrade of ringproxy under load, and not one
# connection closed; then HAProxy's reload (-sf) under the same load, as the comparison.
#
#   1. tunes the host for the run (saved first, restored on exit): ip_local_port_range 1024-65535,
#      the backends' ports reserved, somaxconn and tcp_max_syn_backlog 65535, tcp_mem for 4 sockets
#      per proxied connection, 4096-byte default socket buffers (as scripts/scale.sh)
#   2. starts `ringload serve --mode echo` with three listening addresses (servers a, b and c)
#   3. starts ringproxy: enough workers for CONNS under this host's descriptor limit, servers a and
#      b with 32 source IPs each, an admin socket, timeout.drain 10s
#   4. `ringload hold --conns CONNS --heartbeat 5s --reconnect 1s` (several processes: < 20,000
#      connections each): every connection the proxy dropped would be dialed again and counted
#   5. once every connection is up, `ringload rate --concurrency 2` (new connections, each one
#      echo, then closed) runs through:
#        reload 1: server weights 1:1 -> 3:1    reload 2: timeouts changed    reload 3: server c added
#        upgrade: `ringproxy upgrade` to a copy of the binary at another path (a freshly installed
#                 binary, as a package upgrade puts it)
#      each reload waits for the old engine's "exited" line, the upgrade for the old process to exit
#   6. the hold ends by itself: dropped, reconnects, heartbeats lost and corrupted; the churn's
#      failures by cause; the time each move took; the new process's active connections
#   7. the same with HAProxy (HAPROXY_CONNS: one HAProxy process holds fewer than 10,000
#      connections under a 20,000-descriptor limit) and three `haproxy -sf` reloads
#      (hard-stop-after 10s, as ringproxy's timeout.drain)
#
# PASS when, through ringproxy: 0 held connections dropped, 0 reconnects, 0 heartbeats lost or
# corrupted, 0 churn connections failed, the old process gone, the new one serving every held
# connection. Bounded: every wait has a deadline; loopback only.
#
# Usage: scripts/upgrade-demo.sh                 100,000 connections (~5 min; root)
#        QUICK=1 scripts/upgrade-demo.sh         20,000 connections
# Knobs: SKIP_BUILD=1 CONNS RAMP HEARTBEAT WORKERS HAPROXY=0|1 HAPROXY_CONNS OUT
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then CONNS=${CONNS:-20000}; else CONNS=${CONNS:-100000}; fi
RAMP=${RAMP:-8000}
HEARTBEAT=${HEARTBEAT:-5}
HAPROXY=${HAPROXY:-1}
HAPROXY_CONNS=${HAPROXY_CONNS:-9000}
NOFILE=$(ulimit -Hn)
PER_WORKER=$(((NOFILE - 128) / 2))
MIN_WORKERS=$(((CONNS * 108 / 100 + PER_WORKER - 1) / PER_WORKER))
[ "$MIN_WORKERS" -ge "$(nproc)" ] || MIN_WORKERS=$(nproc)
WORKERS=${WORKERS:-$MIN_WORKERS}
SERVE_WORKERS=${SERVE_WORKERS:-$((CONNS / 12500 + 2))}
OUT=${OUT:-$(mktemp -d /tmp/ringproxy-upgrade-demo.XXXXXX)}
mkdir -p "$OUT"
# The ramp, four moves (each well under 30 s), heartbeats through the new process, margins: the
# hold ends by itself after this.
DURATION=$((CONNS / RAMP + 75))

[ "$(id -u)" = 0 ] || die "upgrade-demo.sh changes sysctls: run it as root"
if [ "$HAPROXY" = 1 ] && ! command -v haproxy >/dev/null; then
    log "installing haproxy (apt-get) for the comparison row"
    apt-get install -y -q haproxy >/dev/null 2>&1 || die "haproxy is not installed and apt-get could not install it"
fi

# --- sysctls: save, set, restore -----------------------------------------------------------------
SYSCTLS=(net.ipv4.ip_local_port_range net.ipv4.ip_local_reserved_ports net.core.somaxconn net.ipv4.tcp_max_syn_backlog
    net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem)
declare -A SAVED
for k in "${SYSCTLS[@]}"; do SAVED[$k]=$(sysctl -n "$k" | tr '\t' ' '); done
NEW_PID=""
on_exit() {
    local rc=$?
    # The process the upgrade started is not ours to reap (its parent was the old one): by pid.
    if [ -n "$NEW_PID" ] && kill -0 "$NEW_PID" 2>/dev/null; then kill -TERM "$NEW_PID" 2>/dev/null || true; fi
    stop_all_bg
    for k in "${!SAVED[@]}"; do sysctl -q -w "$k=${SAVED[$k]}" >/dev/null 2>&1 || log "could not restore $k"; done
    [ "$rc" = 0 ] || log "upgrade-demo.sh failed (exit $rc); logs in $OUT"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# (Before the port range is widened: free_port picks below it.)
HA_PORT=$(free_port)
build_binaries "$ROOT" "$OUT/bin"
RL=$OUT/bin/ringload
RP=$OUT/bin/ringproxy
# The binary the upgrade goes to: installed at another path, as a package upgrade installs it.
cp "$RP" "$OUT/bin/ringproxy.new"

PAGES=$((4 * CONNS * 8192 / 4096))
read -r m0 m1 m2 <<<"${SAVED[net.ipv4.tcp_mem]}"
TCP_MEM="$PAGES $((PAGES * 3 / 2)) $((PAGES * 2))"
[ $((PAGES * 2)) -gt "$m2" ] || TCP_MEM="$m0 $m1 $m2"
read -r _ _ r2 <<<"${SAVED[net.ipv4.tcp_rmem]}"
read -r _ _ w2 <<<"${SAVED[net.ipv4.tcp_wmem]}"

start_ready serve "$OUT" nice -n -5 "$RL" serve --listen 127.0.0.1:0 --listen 127.0.0.1:0 --listen 127.0.0.1:0 \
    --mode echo --workers "$SERVE_WORKERS"
mapfile -t SERVERS < <(ready_addrs "$OUT/serve.ready")
[ "${#SERVERS[@]}" = 3 ] || die "expected three listening addresses from ringload serve"
sysctl -q -w net.ipv4.ip_local_port_range="1024 65535" net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
    net.ipv4.tcp_mem="$TCP_MEM" net.ipv4.tcp_rmem="4096 4096 $r2" net.ipv4.tcp_wmem="4096 4096 $w2" \
    net.ipv4.ip_local_reserved_ports="$(for a in "${SERVERS[@]}"; do echo "${a##*:}"; done | paste -sd, -)" >/dev/null

# --- ringproxy ------------------------------------------------------------------------------------
CFG=$OUT/ringproxy.yaml
STATS=$OUT/stats.sock
ADMIN=$OUT/admin.sock
# config WEIGHT_A TIMEOUTS WITH_C
config() {
    cat >"$CFG" <<EOF
# generated by scripts/upgrade-demo.sh
global: { workers: $WORKERS, pin_cpus: true, maxconn: $((CONNS + CONNS / 10)), stats: { socket: "$STATS", admin_socket: "$ADMIN" } }
defaults:
  timeout: { $2, drain: 10s }
  backlog: 65535
frontends: [{ name: hold, bind: "127.0.0.1:0", backend: echo }]
backends:
  - name: echo
    balance: roundrobin
    servers:
      - { name: a, address: "${SERVERS[0]}", source: "127.0.2.0-127.0.2.31", weight: $1 }
      - { name: b, address: "${SERVERS[1]}", source: "127.0.2.64-127.0.2.95" }
EOF
    if [ "$3" = 1 ]; then
        echo "      - { name: c, address: \"${SERVERS[2]}\", source: \"127.0.2.128-127.0.2.159\" }" >>"$CFG"
    fi
}
config 1 "connect: 5s, client: 5m, server: 5m" 0
start_ready ringproxy "$OUT" "$RP" -c "$CFG"
OLD_PID=$BG_PID
PROXY=$(ready_addr "$OUT/ringproxy.ready" hold)
stats_json() { timeout 30 "$RP" stats --socket "$STATS" --json 2>/dev/null; }
stat() { stats_json | stats_total "$1" 2>/dev/null || echo 0; }
log "ringproxy $PROXY (pid $OLD_PID, $WORKERS workers)"

# hold_and_churn NAME TARGET CONNS: starts the hold, waits until every connection is up, starts the
# churn; sets HOLD_PID and CHURN_PID.
hold_and_churn() {
    local name=$1 target=$2 conns=$3 t0
    start_bg "$name hold" timeout $((DURATION + 120)) nice -n -5 "$RL" hold --target "$target" --conns "$conns" \
        --sources 127.0.1.0/24 --ramp "${RAMP}/s" --heartbeat "${HEARTBEAT}s" --reconnect 1s \
        --duration "${DURATION}s" --connect-timeout 10s --json --no-progress >"$OUT/$name-hold.json" 2>"$OUT/$name-hold.err"
    HOLD_PID=$BG_PID
    t0=$(now_ms)
    until [ "$(established_to "${target##*:}")" -ge "$conns" ]; do
        kill -0 "$HOLD_PID" 2>/dev/null || die "$name: ringload hold exited early: $(tail -3 "$OUT/$name-hold.err")"
        [ $(($(now_ms) - t0)) -lt $((conns / RAMP * 1000 + 60000)) ] || die "$name: the ramp did not finish"
        sleep 1
    done
    log "$name: $conns connections held, heartbeats every ${HEARTBEAT}s"
    start_bg "$name churn" timeout $((DURATION + 60)) "$RL" rate --target "$target" --concurrency 2 \
        --duration "$((DURATION - (($(now_ms) - t0) / 1000) - 20))s" --json --no-progress \
        >"$OUT/$name-churn.json" 2>"$OUT/$name-churn.err"
    CHURN_PID=$BG_PID
    sleep 3
}

# wait_line FILE TEXT SECS: until a line of FILE contains TEXT (printed).
wait_line() {
    local t0
    t0=$(now_ms)
    until grep -q -- "$2" "$1"; do
        [ $(($(now_ms) - t0)) -lt $(($3 * 1000)) ] || die "no \"$2\" in $1 within $3 s"
        sleep 0.2
    done
    grep -- "$2" "$1" | tail -1
}

hold_and_churn ringproxy "$PROXY" "$CONNS"
MOVES=()
reload_with() {
    local n=$1 what=$2 out
    config "${@:3}"
    out=$("$RP" reload --socket "$ADMIN") || die "reload $n refused: $out"
    log "reload $n ($what): $(head -1 <<<"$out")"
    MOVES+=("reload $n ($what)|$(wait_line "$OUT/ringproxy.log" "replaced by reload $n exited" 120)")
    log "  ${MOVES[-1]#*|}"
}
reload_with 1 "weights 1:1 -> 3:1" 3 "connect: 5s, client: 5m, server: 5m" 0
reload_with 2 "timeouts changed" 3 "connect: 3s, client: 10m, server: 10m" 0
reload_with 3 "server c added" 3 "connect: 3s, client: 10m, server: 10m" 1
ACTIVE_BEFORE=$(stat active)
out=$("$RP" upgrade --socket "$ADMIN" "$OUT/bin/ringproxy.new") || die "upgrade refused: $out"
log "upgrade: $out"
MOVES+=("upgrade to a new binary|$(wait_line "$OUT/ringproxy.log" "upgrade: handed the listening sockets" 180)")
log "  ${MOVES[-1]#*|}"
t0=$(now_ms)
while kill -0 "$OLD_PID" 2>/dev/null; do
    [ $(($(now_ms) - t0)) -lt 30000 ] || die "the old process (pid $OLD_PID) did not exit"
    sleep 0.2
done
reap_bg "$OLD_PID" || die "the old process exited with status $?"
NEW_PID=$(ready_pid "$OUT/ringproxy.ready")
[ "$NEW_PID" != "$OLD_PID" ] || die "the ready file still names the old process"
ACTIVE_AFTER=$(stat active)
log "old process $OLD_PID gone; new process $NEW_PID serves $ACTIVE_AFTER connections (before the upgrade: $ACTIVE_BEFORE)"
"$RP" stats --socket "$STATS" >"$OUT/stats-after-upgrade.txt" 2>&1 || true
rc=0; reap_bg "$HOLD_PID" || rc=$?
reap_bg "$CHURN_PID" || true
log "ringload hold exited $rc"
kill -TERM "$NEW_PID" 2>/dev/null || true

# --- HAProxy, reloaded with -sf ---------------------------------------------------------------------
HA_MOVES=()
if [ "$HAPROXY" = 1 ]; then
    HA_CFG=$OUT/haproxy.cfg
    ha_config() {
        cat >"$HA_CFG" <<EOF
global
    maxconn $((HAPROXY_CONNS + 500))
    nbthread 2
    hard-stop-after 10s
defaults
    mode tcp
    timeout connect $1
    timeout client 5m
    timeout server 5m
frontend hold
    bind 127.0.0.1:$HA_PORT
    default_backend echo
backend echo
    balance roundrobin
    server a ${SERVERS[0]} weight $2 source 127.0.2.0
    server b ${SERVERS[1]} source 127.0.2.64
EOF
        if [ "$3" = 1 ]; then echo "    server c ${SERVERS[2]} source 127.0.2.128" >>"$HA_CFG"; fi
    }
    ha_config 5s 1 0
    start_bg haproxy haproxy -db -f "$HA_CFG" >"$OUT/haproxy-0.log" 2>&1
    HA_PIDS=("$BG_PID")
    wait_port "127.0.0.1:$HA_PORT" 15
    hold_and_churn haproxy "127.0.0.1:$HA_PORT" "$HAPROXY_CONNS"
    ha_reload() {
        local n=$1 what=$2 t0
        ha_config "${@:3}"
        t0=$(now_ms)
        start_bg "haproxy-$n" haproxy -db -f "$HA_CFG" -sf "${HA_PIDS[-1]}" >"$OUT/haproxy-$n.log" 2>&1
        HA_PIDS+=("$BG_PID")
        # The old process exits once its connections are done, or at hard-stop-after.
        while kill -0 "${HA_PIDS[-2]}" 2>/dev/null; do
            [ $(($(now_ms) - t0)) -lt 60000 ] || die "the old haproxy did not exit"
            sleep 0.2
        done
        HA_MOVES+=("reload $n ($what)|the old process exited $(awk -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%.2f", ms / 1000 }')s after haproxy -sf")
        log "haproxy reload $n ($what): ${HA_MOVES[-1]#*|}"
    }
    ha_reload 1 "weights 1:1 -> 3:1" 5s 3 0
    ha_reload 2 "timeouts changed" 3s 3 0
    ha_reload 3 "server c added" 3s 3 1
    rc_ha=0; reap_bg "$HOLD_PID" || rc_ha=$?
    reap_bg "$CHURN_PID" || true
    log "haproxy: ringload hold exited $rc_ha"
fi

# --- report -------------------------------------------------------------------------------------------
printf '%s\n' "${MOVES[@]}" >"$OUT/moves.txt"
printf '%s\n' "${HA_MOVES[@]+"${HA_MOVES[@]}"}" >"$OUT/haproxy-moves.txt"
status=0
python3 - "$OUT" "$CONNS" "$HAPROXY_CONNS" "$HAPROXY" "$ACTIVE_AFTER" "$OLD_PID" "$NEW_PID" "$WORKERS" \
    "${BUILD_INFO:-}" >"$OUT/report.md" <<'PY' || status=$?
import json, sys
out, conns, ha_conns, ha, active_after, old_pid, new_pid, workers, build = sys.argv[1:10]
conns, ha_conns, active_after = int(conns), int(ha_conns), int(active_after)
def load(name):
    try:
        return json.load(open(f"{out}/{name}.json"))
    except Exception:
        return None
w = print
w(f"Generated by `scripts/upgrade-demo.sh` ({build}): {conns:,} connections through ringproxy ({workers} workers), "
  f"heartbeats every 5 s, `ringload rate --concurrency 2` churning meanwhile.\n")
w("| move | how long |\n|---|---|")
for line in open(f"{out}/moves.txt").read().splitlines():
    what, said = line.split("|", 1)
    w(f"| ringproxy {what} | {said.split('ringproxy: ')[-1]} |")
for line in open(f"{out}/haproxy-moves.txt").read().splitlines():
    if line:
        what, said = line.split("|", 1)
        w(f"| HAProxy {what} | {said} |")
w("")
w("| path | held | dropped | reconnects | heartbeats sent / lost / corrupted | churn: established / failed (by cause) |")
w("|---|---|---|---|---|---|")
ok = True
for name, n in [("ringproxy", conns)] + ([("haproxy", ha_conns)] if ha == "1" else []):
    h, c = load(f"{name}-hold"), load(f"{name}-churn")
    if h is None or c is None:
        w(f"| {name} | no report | | | | |")
        ok = ok and name != "ringproxy"
        continue
    hc, hm, cc = h["connections"], h["messages"], c["connections"]
    causes = ", ".join(f"{k} {cc['failed_by_cause'][k] + cc['dropped_by_cause'][k]}" for k in cc["failed_by_cause"]
                       if cc["failed_by_cause"][k] + cc["dropped_by_cause"][k]) or "none"
    w(f"| {name} | {n:,} | {hc['dropped']:,} | {hc['reconnects']:,} | {hm['sent']:,} / {hm['lost']:,} / {hm['corrupted']:,} "
      f"| {cc['established']:,} / {cc['failed'] + cc['dropped']:,} ({causes}) |")
    if name == "ringproxy":
        bad = {
            "held connections dropped": hc["dropped"],
            "reconnects": hc["reconnects"],
            "heartbeats lost": hm["lost"],
            "heartbeats corrupted": hm["corrupted"],
            "churn connections failed": cc["failed"] + cc["dropped"],
            "connections not established": n - hc["established"],
        }
        for k, v in bad.items():
            if v:
                ok = False
                print(f"FAIL: {k}: {v}", file=sys.stderr)
if active_after < conns:
    ok = False
    print(f"FAIL: the new process serves {active_after} connections, not {conns}", file=sys.stderr)
w("")
w(f"The old process (pid {old_pid}) exited after the upgrade; the new one (pid {new_pid}) served {active_after:,} "
  f"connections right after it.")
print("PASS" if ok else "FAIL", file=sys.stderr)
sys.exit(0 if ok else 1)
PY
cat "$OUT/report.md"
if [ "$status" = 0 ]; then
    echo "PASS: $CONNS connections through 3 reloads and a binary upgrade: 0 dropped, 0 heartbeats lost, 0 churn failures (report: $OUT/report.md)"
else
    echo "FAIL: see $OUT/report.md and $OUT/*.log"
fi
exit "$status"
