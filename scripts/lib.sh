# scripts/lib.sh: what every script under scripts/ shares. Sourced, never run:
#     . "$(dirname "$0")/lib.sh"          (scripts/bench/*: "$(dirname "$0")/../lib.sh")
# Loopback only. It keeps track of what it starts, so a script's EXIT trap can stop exactly those
# processes (by pid, never by name).
#
# Processes
#   start_bg NAME CMD...     run CMD in the background (redirections written on the call apply to
#                            it); its pid in BG_PID, remembered for stop_all_bg. Call it in the
#                            script's own shell, never inside $(...).
#   stop_bg PID [SECS]       SIGTERM, up to SECS (5) to exit, then SIGKILL; reaped and forgotten.
#                            Returns its exit status.
#   reap_bg PID              wait for a process that ends by itself; forgotten; its exit status.
#   stop_all_bg [SECS]       stop_bg everything still remembered, all at once (from the EXIT trap).
#                            BG_VERBOSE=1: say what is stopped on stderr.
# Readiness (ringproxy --ready-file and ringload serve --ready-file write the same JSON)
#   wait_ready FILE [SECS] [PID]   until FILE exists (it appears whole: written beside, renamed);
#                            fails after SECS (15) or as soon as PID (if given) has exited.
#   ready_addr FILE [NAME]   the first listener's address (the first of frontend NAME).
#   ready_addrs FILE         every listener's address, one a line, in the file's order.
#   ready_pid FILE           the pid that wrote FILE.
#   start_ready NAME DIR CMD...   start_bg CMD with `--ready-file DIR/NAME.ready` added at the end,
#                            stdout and stderr to DIR/NAME.log, and wait_ready (15 s); dies showing
#                            the log if it does not get ready. For ringload serve and ringproxy.
#   wait_port ADDR [SECS]    until something accepts on ADDR (peers without a ready file).
# Running a measured command
#   run_logged FILE CMD...   write the command line to FILE (CMD by its base name, words quoted
#                            only where needed), then run it: exactly what FILE shows. Bounded by
#                            RUN_TIMEOUT seconds when that is set. Returns the command's status.
#   log_cmd FILE CMD...      only write FILE (for a command run otherwise, e.g. with start_bg).
# Configuration
#   render_fixture NAME VAR=VALUE...   scripts/fixtures/NAME with each ${VAR} replaced (all must
#                            be given) on stdout.
#   stats_total KEY          ringproxy `stats --json` on stdin: KEY (dotted; a map counts as the
#                            sum of its values) summed over workers (scripts/bench/report.py tot).
# Build and host
#   ringproxy_bin [BINARY]   BINARY if given, else this tree's release build (built first).
#   build_binaries ROOT DIR, free_port, cpu_ticks, rss_kb, anon_kb, slab_kb, sunreclaim_kb, sys_ticks, steal_ticks,
#   with_children, descendants, established_to, thread_stats, log, die, now_ms (see each below).

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONDONTWRITEBYTECODE=1 # scripts/bench/report.py is imported (stats_total): no __pycache__ in the tree

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# now_ms: milliseconds since the epoch. Waits here are bounded by the clock, not by a count of
# sleeps, so they stay bounded on a host too busy to run `sleep 0.1` on time.
now_ms() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        local t=${EPOCHREALTIME/[.,]/}
        echo $((t / 1000))
    else
        date +%s%3N
    fi
}

# --- processes -------------------------------------------------------------------------------------
BG_PIDS=()
BG_NAMES=()

start_bg() {
    local name=$1
    shift
    "$@" &
    BG_PID=$!
    BG_PIDS+=("$BG_PID")
    BG_NAMES+=("$name")
}

# bg_name PID: the name start_bg was given (or "pid PID").
bg_name() {
    local i
    for i in "${!BG_PIDS[@]}"; do
        [ "${BG_PIDS[$i]}" = "$1" ] && { echo "${BG_NAMES[$i]}"; return; }
    done
    echo "pid $1"
}

# forget_bg PID: no longer stop it on exit (it has been reaped: its pid may be reused).
forget_bg() {
    local i
    for i in "${!BG_PIDS[@]}"; do
        [ "${BG_PIDS[$i]}" = "$1" ] && unset 'BG_PIDS[i]' 'BG_NAMES[i]'
    done
    BG_PIDS=("${BG_PIDS[@]}")
    BG_NAMES=("${BG_NAMES[@]}")
}

reap_bg() {
    local rc=0
    wait "$1" 2>/dev/null || rc=$?
    forget_bg "$1"
    return "$rc"
}

stop_bg() {
    local pid=$1 secs=${2:-5} end
    kill -TERM "$pid" 2>/dev/null || true
    end=$(($(now_ms) + secs * 1000))
    while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$end" ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$(bg_name "$pid") (pid $pid) did not stop within $secs s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    reap_bg "$pid"
}

stop_all_bg() {
    local secs=${1:-5} i p end alive
    [ ${#BG_PIDS[@]} -gt 0 ] || return 0
    for i in "${!BG_PIDS[@]}"; do
        [ "${BG_VERBOSE:-0}" = 1 ] && echo "stopping ${BG_NAMES[$i]} (pid ${BG_PIDS[$i]})" >&2
        kill -TERM "${BG_PIDS[$i]}" 2>/dev/null || true
    done
    end=$(($(now_ms) + secs * 1000))
    while [ "$(now_ms)" -lt "$end" ]; do
        alive=0
        for p in "${BG_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    for p in "${BG_PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            log "$(bg_name "$p") (pid $p) did not stop within $secs s: SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
    done
    BG_PIDS=()
    BG_NAMES=()
}

# descendants PID: the pid and all its descendants (a split ringload run under `timeout`).
descendants() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1" 2>/dev/null || true); do descendants "$c"; done
}

# with_children PID: the pid and its direct children (nginx master + workers).
with_children() {
    echo "$1"
    pgrep -P "$1" 2>/dev/null || true
}

# --- readiness -------------------------------------------------------------------------------------
wait_ready() {
    local file=$1 secs=${2:-15} pid=${3:-} end
    end=$(($(now_ms) + secs * 1000))
    while :; do
        [ -s "$file" ] && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            [ -s "$file" ]
            return
        fi
        [ "$(now_ms)" -lt "$end" ] || return 1
        sleep 0.05
    done
}

start_ready() {
    local name=$1 dir=$2
    shift 2
    start_bg "$name" "$@" --ready-file "$dir/$name.ready" >"$dir/$name.log" 2>&1
    wait_ready "$dir/$name.ready" 15 "$BG_PID" || die "$name did not start: $(tail -20 "$dir/$name.log")"
}

# ready_query FILE addr|addrs|pid [NAME]
ready_query() {
    python3 - "$@" <<'PY'
import json, sys
path, what, name = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "")
r = json.load(open(path))
if what == "pid":
    print(r["pid"])
    sys.exit(0)
addrs = [l["addr"] for l in r["listeners"] if not name or l["name"] == name]
if not addrs:
    sys.exit(f"{path}: no listener{' named ' + name if name else ''}")
print("\n".join(addrs[:1] if what == "addr" else addrs))
PY
}
ready_addr() { ready_query "$1" addr "${2:-}"; }
ready_addrs() { ready_query "$1" addrs; }
ready_pid() { ready_query "$1" pid; }

wait_port() {
    local a=$1 secs=${2:-10} end
    end=$(($(now_ms) + secs * 1000))
    until (exec 3<>"/dev/tcp/${a%:*}/${a##*:}") 2>/dev/null; do
        [ "$(now_ms)" -lt "$end" ] || return 1
        sleep 0.1
    done
}

# --- running a measured command --------------------------------------------------------------------
# shell_words WORD...: the words as one command line, each quoted only where it needs to be.
shell_words() {
    local w out=() q="'"
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$w")
        else
            out+=("$q${w//$q/$q\\$q$q}$q")
        fi
    done
    echo "${out[*]}"
}

# log_cmd FILE CMD...: only write the command line (for a command started with start_bg).
log_cmd() { shell_words "$(basename "$2")" "${@:3}" >"$1"; }

run_logged() {
    log_cmd "$@"
    shift
    if [ -n "${RUN_TIMEOUT:-}" ]; then
        timeout "$RUN_TIMEOUT" "$@"
    else
        "$@"
    fi
}

# --- configuration ---------------------------------------------------------------------------------
render_fixture() {
    python3 - "$SCRIPTS/fixtures/$1" "${@:2}" <<'PY'
import string, sys
values = dict(kv.split("=", 1) for kv in sys.argv[2:])
try:
    print(string.Template(open(sys.argv[1]).read()).substitute(values), end="")
except KeyError as e:
    sys.exit(f"render_fixture {sys.argv[1]}: no value given for {e}")
PY
}

stats_total() {
    PYTHONPATH="$SCRIPTS/bench" python3 -c \
        'import json, sys; from report import tot; print(tot(json.load(sys.stdin), sys.argv[1]))' "$1"
}

# --- build -----------------------------------------------------------------------------------------
# ringproxy_bin [BINARY]: prints BINARY when given; otherwise builds this tree's release binary
# (from the repository's top directory, where the scripts run) and prints its path. A failed build
# fails the command substitution, which ends a `set -e` script.
ringproxy_bin() {
    if [ -n "${1:-}" ]; then
        echo "$1"
        return
    fi
    cargo build --release -q -p ringproxy >&2 || return
    echo target/release/ringproxy
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

# --- host ------------------------------------------------------------------------------------------
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

# proc_ticks EXPR PID...: an awk expression of the fields of /proc/PID/stat that follow the ")" of
# comm (state is $1, utime $12, stime $13), summed over the processes (all their threads, io_uring
# io-wq threads included; threads that exited are folded into their process's totals by the
# kernel), in clock ticks.
proc_ticks() {
    local e=$1 t=0 p v
    shift
    for p in "$@"; do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk "{print $e}") || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

# cpu_ticks PID...: utime + stime. cpu_user_ticks PID...: utime alone (the processes' own code, not
# the kernel's on their behalf).
cpu_ticks() { proc_ticks '$12 + $13' "$@"; }
cpu_user_ticks() { proc_ticks '$12' "$@"; }

# rss_kb PID...: summed VmRSS.
rss_kb() { status_kb VmRSS "$@"; }
# anon_kb PID...: summed RssAnon, the private memory of RSS (without the executable's and the
# libraries' pages, which are shared with every process that maps them and do not grow with load).
anon_kb() { status_kb RssAnon "$@"; }
# status_kb FIELD PID...: a /proc/PID/status field (in kB), summed over the processes.
status_kb() {
    local f=$1 t=0 p v
    shift
    for p in "$@"; do
        v=$(awk -v f="$f:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

slab_kb() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
# tcp_pressure_ms: the time the host's TCP stack has spent under memory pressure (tcp_mem's second
# value crossed: sockets are pruned, packets dropped, senders wait for retransmission timeouts),
# in ms since boot; the kernel adds each episode when it ends.
tcp_pressure_ms() {
    awk '/^TcpExt:/ { if (!h) { for (i = 2; i <= NF; i++) if ($i == "TCPMemoryPressuresChrono") k = i; h = 1 }
                      else { print (k ? $k : 0) } }' /proc/net/netstat
}
# median_cols: lines of numbers on stdin (as many columns each) -> one line, each column's median
# (the upper one of an even count).
median_cols() {
    awk '{ for (i = 1; i <= NF; i++) v[i, NR] = $i; if (NF > nf) nf = NF }
         END { for (i = 1; i <= nf; i++) { n = 0; for (r = 1; r <= NR; r++) a[++n] = v[i, r]
                   for (x = 2; x <= n; x++) { t = a[x]; for (y = x - 1; y >= 1 && a[y] > t; y--) a[y + 1] = a[y]; a[y + 1] = t }
                   printf "%s%s", (i > 1 ? " " : ""), a[int(n / 2) + 1] }
               print "" }'
}
# SUnreclaim: the unreclaimable part of Slab (sockets' tcp_sock, files, io_uring requests, epoll items);
# it leaves out the dentry and inode caches that other work on the host (builds) moves a lot
sunreclaim_kb() { awk '/^SUnreclaim:/ {print $2}' /proc/meminfo; }

# sys_ticks: "busy total" CPU ticks of the whole machine (/proc/stat).
sys_ticks() { awk '/^cpu / {t=0; for (i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }

# steal_ticks: CPU ticks of the whole machine that the hypervisor gave to others (/proc/stat
# `steal`; counted in sys_ticks' busy and total). On a shared virtual machine a measurement taken
# while much is stolen is slower for every path alike, and heartbeats are lost whatever the proxy.
steal_ticks() { awk '/^cpu / {print $9}' /proc/stat; }

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
