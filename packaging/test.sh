#!/usr/bin/env bash
# packaging/test.sh: builds and checks what packaging/ ships, as far as this machine allows (run by
# scripts/test.sh; as root, on Debian 12 or similar). PASS/FAIL per check, exit 1 on any FAIL.
#
#   unit       systemd-analyze security of packaging/systemd/ringproxy.service (exposure <= 2.5)
#   syscalls   every system call the engine makes through start, connections from a source
#              address, health checks, the stats socket, a reload, a dump, a binary upgrade with
#              connections held (the new process traced too) and a drain (strace -f) is allowed
#              by the unit's SystemCallFilter=
#   deb        `cargo deb`: file list, control fields, conffile, maintainer scripts; installed with
#              dpkg: the system user, the configuration's owner and mode, the binaries, the unit
#              (systemd-analyze verify), `ringproxy check` on the shipped configuration; purged:
#              user and files gone. Skipped (FAIL) if ringproxy is already installed from elsewhere.
#   container  the Kubernetes manifest's embedded configuration loads; the files the Dockerfile
#              copies exist
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=../scripts/lib.sh
. scripts/lib.sh

UNIT=packaging/systemd/ringproxy.service
WORK=$(mktemp -d /tmp/ringproxy-packaging.XXXXXX)
FAILED=0
pass() { log "PASS $*"; }
fail() { log "FAIL $*"; FAILED=1; }
cleanup() {
    stop_all_bg
    if [ "${INSTALLED:-0}" = 1 ]; then dpkg --purge ringproxy >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { # COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null && return
    log "installing $2 (for $1)"
    apt-get install -y -q "$2" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }
}
need strace strace
need systemd-analyze systemd
need dpkg-deb dpkg
need readelf binutils
if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb (cargo install --locked)"
    cargo install cargo-deb --locked --quiet
fi

cargo build --release -q -p ringproxy -p ringload
RP=$ROOT/target/release/ringproxy
RL=$ROOT/target/release/ringload

# --- unit ------------------------------------------------------------------------------------------
score=$(systemd-analyze security --offline=true "$UNIT" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -n "$score" ] && awk "BEGIN { exit !($score <= 2.5) }"; then
    pass "unit: systemd-analyze security exposure $score (<= 2.5)"
else
    fail "unit: systemd-analyze security exposure '${score:-?}' (want <= 2.5)"
fi

# --- syscalls --------------------------------------------------------------------------------------
BACKEND=$WORK/backend.ready
start_bg "backend" "$RL" serve --listen 127.0.0.1:0 --ready-file "$BACKEND" >"$WORK/backend.log" 2>&1
wait_ready "$BACKEND"
cat >"$WORK/trace.yaml" <<EOF
global: { workers: 2, stats: { socket: "$WORK/stats.sock" } }
defaults: { timeout: { drain: 2s } }
frontends: [ { name: fe, bind: "127.0.0.1:0", backend: be } ]
backends:
  - name: be
    check: { interval: 200ms }
    servers: [ { name: s, address: "$(ready_addr "$BACKEND")", source: 127.0.9.1 } ]
EOF
start_bg "traced ringproxy" strace -f -qq -o "$WORK/trace" "$RP" -c "$WORK/trace.yaml" --ready-file "$WORK/rp.ready" \
    >"$WORK/rp.log" 2>&1
TRACED=$BG_PID
wait_ready "$WORK/rp.ready"
pid=$(ready_pid "$WORK/rp.ready")
"$RL" hold --target "$(ready_addr "$WORK/rp.ready")" --conns 50 --heartbeat 100ms --duration 1s >/dev/null
"$RP" stats --socket "$WORK/stats.sock" >/dev/null
kill -HUP "$pid"; sleep 0.5
kill -USR1 "$pid"; sleep 0.2
# A binary upgrade (SIGUSR2) while connections are held: the new process is this one's child, so
# strace -f traces it too — the fork and exec, the socketpair, the descriptors passed over it.
start_bg "held through the upgrade" "$RL" hold --target "$(ready_addr "$WORK/rp.ready")" --conns 50 \
    --heartbeat 100ms --duration 3s >"$WORK/hold.log" 2>&1
HOLD=$BG_PID
sleep 1
kill -USR2 "$pid"
end=$(($(now_ms) + 20000))
while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$end" ]; do sleep 0.1; done
upgraded=$("$RP" stats --socket "$WORK/stats.sock" --json 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])' 2>/dev/null || echo "")
held=0
reap_bg "$HOLD" || held=$?
if [ -n "$upgraded" ] && [ "$upgraded" != "$pid" ] && ! kill -0 "$pid" 2>/dev/null && [ "$held" = 0 ]; then
    pass "upgrade: pid $pid handed over to pid $upgraded and exited; 50 connections held through it"
else
    fail "upgrade: old pid $pid, new '${upgraded:-none}', hold exit $held: $(tail -3 "$WORK/hold.log")"
fi
kill -TERM "${upgraded:-$pid}" 2>/dev/null || true
reap_bg "$TRACED" || true
sed -n 's/^[0-9]* *\([a-z_0-9]*\)(.*/\1/p' "$WORK/trace" | sort -u >"$WORK/calls"
filter=$(sed -n 's/^SystemCallFilter=//p' "$UNIT" | tr '\n' ' ')
denied=$(/usr/bin/python3 - "$filter" "$WORK/calls" <<'EOF'
import subprocess, sys
out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True).stdout
groups, cur = {}, None
for line in out.splitlines():
    if line.startswith("@"):
        cur = line.strip(); groups[cur] = []
    elif cur and line.strip() and not line.strip().startswith("#"):
        groups[cur].append(line.strip())
def expand(name, seen):
    if not name.startswith("@"):
        return {name}
    r = set()
    for x in groups.get(name, []):
        if x not in seen:
            seen.add(x); r |= expand(x, seen)
    return r
allow, deny = set(), set()
for word in sys.argv[1].split():
    (deny if word.startswith("~") else allow).update(expand(word.lstrip("~"), set()))
calls = [l.strip() for l in open(sys.argv[2]) if l.strip()]
print(" ".join(c for c in calls if c not in allow or c in deny))
EOF
)
n=$(wc -l <"$WORK/calls")
if [ "$n" -gt 20 ] && [ -z "$denied" ]; then
    pass "syscalls: all $n system calls the engine made are allowed by SystemCallFilter=$filter"
else
    fail "syscalls: $n traced; not allowed by the unit: ${denied:-none} (filter: $filter)"
fi

# --- deb -------------------------------------------------------------------------------------------
cargo deb -p ringproxy --no-build -q -o "$WORK/" >/dev/null
DEB=$(ls "$WORK"/ringproxy_*.deb)
dpkg-deb -c "$DEB" | awk '{print $1, $6}' >"$WORK/contents"
missing=""
for f in ./usr/bin/ringproxy ./usr/bin/ringload ./usr/lib/systemd/system/ringproxy.service \
    ./etc/ringproxy/ringproxy.yaml ./usr/share/ringproxy/seccomp.json ./usr/share/doc/ringproxy/README.md \
    ./usr/share/doc/ringproxy/configuration.md ./usr/share/doc/ringproxy/copyright \
    ./usr/share/doc/ringproxy/examples/haproxy-300k.yaml; do
    grep -q " $f\$" "$WORK/contents" || missing="$missing $f"
done
grep -q '^-rw-r----- ./etc/ringproxy/ringproxy.yaml$' "$WORK/contents" || missing="$missing (config mode 0640)"
[ -z "$missing" ] && pass "deb: $(wc -l <"$WORK/contents") entries, every expected file" || fail "deb: missing$missing"
info=$(dpkg-deb -I "$DEB")
ctrl_ok=1
for want in "Package: ringproxy" "Depends: adduser" "Section: net" "conffiles" "postinst" "postrm" "prerm"; do
    grep -q "$want" <<<"$info" || { ctrl_ok=0; fail "deb: control lacks '$want'"; }
done
dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./postinst | grep -q "adduser --system --group" || { ctrl_ok=0; fail "deb: postinst makes no system user"; }
[ "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" = /etc/ringproxy/ringproxy.yaml ] || { ctrl_ok=0; fail "deb: conffiles"; }
[ "$ctrl_ok" = 1 ] && pass "deb: control (Depends: adduser, Section: net), conffile, maintainer scripts"
mkdir -p "$WORK/x" && dpkg-deb -x "$DEB" "$WORK/x"
if ls "$WORK"/ringproxy-dbgsym_*.ddeb >/dev/null 2>&1 &&
    ! readelf -SW "$WORK/x/usr/bin/ringproxy" "$WORK/x/usr/bin/ringload" | grep -Eq '\.debug_(info|line|abbrev|str) '; then
    # (.debug_gdb_scripts, rustc's pointer to gdb's pretty printers, is no debug info and stays)
    pass "deb: binaries stripped ($(du -sh "$WORK/x/usr/bin" | cut -f1)), debug info in $(basename "$WORK"/ringproxy-dbgsym_*.ddeb)"
else
    fail "deb: binaries carry debug sections, or no dbgsym package was made"
fi

if dpkg -s ringproxy >/dev/null 2>&1 || getent passwd ringproxy >/dev/null; then
    fail "deb: ringproxy is already installed on this host (or its user exists): not touching it"
else
    INSTALLED=1
    if dpkg -i "$DEB" >"$WORK/dpkg.log" 2>&1; then
        problems=""
        getent passwd ringproxy | grep -q ':/nonexistent:/usr/sbin/nologin$' || problems="$problems user"
        [ "$(stat -c '%U:%G %a' /etc/ringproxy/ringproxy.yaml)" = "root:ringproxy 640" ] || problems="$problems config-owner"
        /usr/bin/ringproxy --version | grep -q '^ringproxy ' || problems="$problems ringproxy-binary"
        /usr/bin/ringload --help >/dev/null || problems="$problems ringload-binary"
        systemd-analyze verify /usr/lib/systemd/system/ringproxy.service >"$WORK/verify" 2>&1 || problems="$problems unit-verify($(head -c 300 "$WORK/verify"))"
        /usr/bin/ringproxy check -c /etc/ringproxy/ringproxy.yaml >"$WORK/check" 2>&1 || true
        grep -q '^OK    config ' "$WORK/check" || problems="$problems shipped-config"
        [ -z "$problems" ] && pass "deb: installed: system user ringproxy, /etc/ringproxy/ringproxy.yaml root:ringproxy 0640, both binaries run, systemd-analyze verify clean, the shipped configuration loads" \
            || fail "deb: installed, but:$problems"
    else
        fail "deb: dpkg -i failed: $(tail -3 "$WORK/dpkg.log")"
    fi
    dpkg --purge ringproxy >"$WORK/purge.log" 2>&1 || true
    INSTALLED=0
    if ! getent passwd ringproxy >/dev/null && [ ! -e /usr/bin/ringproxy ] && [ ! -e /etc/ringproxy/ringproxy.yaml ]; then
        pass "deb: purged: user, binaries and configuration gone"
    else
        fail "deb: purge left the user or files behind"
    fi
fi

# --- container -------------------------------------------------------------------------------------
/usr/bin/python3 - packaging/container/ringproxy-k8s.yaml "$WORK/k8s.yaml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"ringproxy\.yaml: \|\n((?:    .*\n|\n)+)", text)
open(sys.argv[2], "w").write("".join(l[4:] + "\n" for l in m.group(1).splitlines()))
EOF
"$RP" check -c "$WORK/k8s.yaml" >"$WORK/k8s.check" 2>&1 || true
copies_ok=1
for f in $(sed -n 's/.*install -D -m [0-7]* \([^ ]*\) .*/\1/p' packaging/container/Dockerfile); do
    case "$f" in target/*) ;; *) [ -e "$f" ] || { copies_ok=0; fail "container: the Dockerfile copies $f, which does not exist"; } ;; esac
done
if grep -q '^OK    config ' "$WORK/k8s.check" && grep -q 'localhostProfile: ringproxy-seccomp.json' packaging/container/ringproxy-k8s.yaml && [ "$copies_ok" = 1 ]; then
    pass "container: the manifest's configuration loads, it names the seccomp profile, the Dockerfile's files exist (the image itself is not built here: no container runtime)"
else
    fail "container: $(grep -m1 -v '^OK' "$WORK/k8s.check" || true)"
fi

[ "$FAILED" = 0 ] && log "packaging: PASS" || { log "packaging: FAIL"; exit 1; }
