# Shared helpers for scripts/bench.sh and scripts/scale.sh (sourced, not run).
# Everything here works on loopback only and keeps track of what it starts, so the caller's trap can
# stop exactly those processes (by pid, never by name).

# Pids started by the caller's script; cleanup_pids stops them (TERM, then KILL after a grace period).
BENCH_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# track PID: remember a pid for cleanup.
track() { BENCH_PIDS+=("$1"); }

cleanup_pids() {
    local p
    for p in "${BENCH_PIDS[@]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
    done
    # up to 5 s for everything to exit, then KILL what is left
    local i alive
    for i in $(seq 50); do
        alive=0
        for p in "${BENCH_PIDS[@]:-}"; do
            [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${BENCH_PIDS[@]:-}"; do
        [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
    done
    for p in "${BENCH_PIDS[@]:-}"; do
        [ -n "$p" ] && wait "$p" 2>/dev/null || true
    done
    BENCH_PIDS=()
}

# wait_for_file_match FILE REGEX [TENTHS]: until a line of FILE matches (default 10 s).
wait_for_file_match() {
    local f=$1 re=$2 n=${3:-100} i
    for i in $(seq "$n"); do
        grep -qE "$re" "$f" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on, below the ephemeral range (so outgoing
# connections cannot take it between now and the bind), chosen at random in [20000, 32000) or just
# below the range's start if the range was moved.
free_port() {
    python3 - <<'PY'
import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
hi = min(32000, lo)
base = 20000 if hi > 21000 else 1100
for _ in range(2000):
    p = random.randrange(base, hi)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
else:
    raise SystemExit("no free port below the ephemeral range")
PY
}

# cpu_ticks PID...: utime+stime of the processes (all their threads, io_uring io-wq threads included;
# threads that exited are folded into their process's totals by the kernel), in clock ticks.
cpu_ticks() {
    local t=0 p v
    for p in "$@"; do
        # fields after the ")" of comm: state is field 3, utime 14, stime 15
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# rss_kb PID...: summed VmRSS.
rss_kb() {
    local t=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

slab_kb() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
# SUnreclaim: the unreclaimable part of Slab (sockets' tcp_sock, files, io_uring requests, epoll items);
# it leaves out the dentry and inode caches that other work on the host (builds) moves a lot
sunreclaim_kb() { awk '/^SUnreclaim:/ {print $2}' /proc/meminfo; }

# sys_ticks: "busy total" CPU ticks of the whole machine (/proc/stat).
sys_ticks() { awk '/^cpu / {t=0; for (i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }

# children PID: the pid and its direct children (nginx master + workers).
with_children() {
    local p=$1
    echo "$p"
    pgrep -P "$p" 2>/dev/null || true
}

# established_to PORT: established TCP connections whose remote port is PORT (client side of a
# frontend on this host).
established_to() {
    ss -Htn state established "( dport = :$1 )" 2>/dev/null | wc -l
}

# thread_stats PID...: "iowq_ticks iowq_threads ctxsw" over every thread of the processes: CPU ticks
# of the io_uring io-wq threads (comm iou-wrk-*) alive now, their number, and context switches
# (voluntary + involuntary) of all threads alive now.
thread_stats() {
    local p t comm ticks=0 n=0 cs=0 v
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            comm=$(cat "$t/comm" 2>/dev/null) || continue
            if [[ "$comm" == iou-wrk* ]]; then
                v=$(sed 's/^.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
                ticks=$((ticks + ${v:-0})); n=$((n + 1))
            fi
            v=$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status" 2>/dev/null) || v=0
            cs=$((cs + ${v:-0}))
        done
    done
    echo "$ticks $n $cs"
}

# build_binaries ROOT DIR: `cargo build --release -p ringproxy -p ringload` (into target/, what users
# run), then copy both binaries to DIR so that a rebuild during the run cannot change what is
# measured. SKIP_BUILD=1, or a failing build with binaries already in target/release, uses those
# (with a warning). Sets BUILD_INFO (commit, work-tree state, binary date).
build_binaries() {
    local root=$1 dir=$2 built=1
    if [ "${SKIP_BUILD:-0}" = 1 ]; then
        built=0
    else
        log "building release binaries (cargo build --release -p ringproxy -p ringload)"
        if ! (cd "$root" && cargo build --release -q -p ringproxy -p ringload); then
            [ -x "$root/target/release/ringproxy" ] && [ -x "$root/target/release/ringload" ] ||
                die "build failed and no binaries in target/release"
            log "warning: build failed; using the binaries already in target/release"
            built=0
        fi
    fi
    mkdir -p "$dir"
    cp "$root/target/release/ringproxy" "$root/target/release/ringload" "$dir/"
    BUILD_INFO="commit $(cd "$root" && git rev-parse --short HEAD)"
    (cd "$root" && git diff --quiet HEAD -- engine loadgen) || BUILD_INFO="$BUILD_INFO (engine/ or loadgen/ modified in the work tree)"
    [ "$built" = 1 ] || BUILD_INFO="$BUILD_INFO, prebuilt binary of $(date -r "$root/target/release/ringproxy" '+%Y-%m-%d %H:%M')"
    return 0
}

# untrack PID: forget a pid that has been waited for (so cleanup never signals a reused pid).
untrack() {
    local p keep=()
    for p in "${BENCH_PIDS[@]:-}"; do [ -n "$p" ] && [ "$p" != "$1" ] && keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
}

# stop_pid PID: TERM, up to 5 s, then KILL; wait for it and untrack it.
stop_pid() {
    local p=$1 i
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    untrack "$p"
}

# descendants PID: the pid and all its descendants (a split ringload run under `timeout`).
descendants() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1" 2>/dev/null || true); do descendants "$c"; done
}
