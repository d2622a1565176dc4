#!/usr/bin/env bash
# What the number of source addresses toward a server costs per connection (docs/configuration.md,
# section 11): ringload rate (connect, 64-byte echo, close; CONC loops, DUR s) through
# ringproxy to one echo server whose `source` is each of SETS in turn (one address, a /24, a /16),
# for each binary given, alternated round by round; prints new connections/s and the proxy's CPU
# per 10,000 connections, medians over ROUNDS, and each binary's ratio to the first one's.
# Loopback only, bounded (DUR s per run; WORKERS workers).
# Usage: scripts/sources-churn.sh [RINGPROXY_BINARY...]   (default: a release build of this tree)
# SETS="127.64.0.1 127.64.0.0/24 127.64.0.0/16", ROUNDS=3, DUR=5, CONC=64, WORKERS=2 (defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=("$(ringproxy_bin)")
cargo build --release -q -p ringload
RL=target/release/ringload
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
CONC=${CONC:-64}
WORKERS=${WORKERS:-2}
TMP=$(mktemp -d)
cleanup() { stop_all_bg; rm -rf "$TMP"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_bg echo "$RL" serve --listen 127.0.0.1:0 --mode echo --ready-file "$TMP/echo.ready" > "$TMP/echo.log" 2>&1
wait_ready "$TMP/echo.ready" 15 "$BG_PID" || die "echo server did not start: $(tail -n 5 "$TMP/echo.log")"
ECHO=$(ready_addr "$TMP/echo.ready")
HZ=$(getconf CLK_TCK)

# run SET BINARY ROUND: one measurement; appends "set bin conns/s cpu_s_per_10k" to $TMP/results.
run() {
    local set=$1 bin=$2 r=$3 pid t0 t1 rate
    cat > "$TMP/proxy.yaml" <<EOF
global: { workers: $WORKERS }
frontends: [{ name: fe, bind: "127.0.0.1:0", backend: be }]
backends: [{ name: be, servers: [{ name: s, address: "$ECHO", source: "$set" }] }]
EOF
    rm -f "$TMP/proxy.ready"
    start_bg proxy "$bin" -c "$TMP/proxy.yaml" --ready-file "$TMP/proxy.ready" > "$TMP/proxy.log" 2>&1
    pid=$BG_PID
    wait_ready "$TMP/proxy.ready" 60 "$pid" || die "$bin did not start: $(tail -n 5 "$TMP/proxy.log")"
    t0=$(cpu_ticks "$pid")
    "$RL" rate --target "$(ready_addr "$TMP/proxy.ready")" --concurrency "$CONC" --size 64 --duration "${DUR}s" \
        --sources 127.0.6.1-127.0.6.8 --json --no-progress > "$TMP/rate.json" 2> "$TMP/rate.err" ||
        die "ringload rate failed: $(tail -n 5 "$TMP/rate.err")"
    t1=$(cpu_ticks "$pid")
    stop_bg "$pid"
    rate=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["connections_per_s"])' "$TMP/rate.json")
    echo "$set $bin $rate $(awk -v t=$((t1 - t0)) -v hz="$HZ" -v r="$rate" -v d="$DUR" \
        'BEGIN { printf "%.4f", (r > 0 ? t / hz / (r * d) * 10000 : 0) }')" >> "$TMP/results"
    log "round $r, source $set, $bin: $rate connections/s"
}

for r in $(seq 1 "$ROUNDS"); do
    for set in ${SETS:-127.64.0.1 127.64.0.0/24 127.64.0.0/16}; do
        for bin in "${BINS[@]}"; do run "$set" "$bin" "$r"; done
    done
done

python3 - "$TMP/results" "${BINS[@]}" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
bins = sys.argv[2:]
sets = list(dict.fromkeys(r[0] for r in rows))
print(f"{'source':<16} {'binary':<40} {'conn/s':>9} {'ratio':>6} {'CPU s/10k':>10} {'ratio':>6}")
for s in sets:
    base = None
    for b in bins:
        rate = statistics.median(float(r[2]) for r in rows if r[0] == s and r[1] == b)
        cpu = statistics.median(float(r[3]) for r in rows if r[0] == s and r[1] == b)
        base = base or (rate, cpu)
        print(f"{s:<16} {b[-40:]:<40} {rate:>9.0f} {rate / base[0]:>6.2f} {cpu:>10.3f} {cpu / base[1]:>6.2f}")
PY
