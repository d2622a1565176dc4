"""The reconnect-storm run of scripts/storm.sh, for one proxy (ringproxy or HAProxy).

Starts `ringload hold --reconnect` through the proxy, waits until every connection is proxied,
then plays the operator's rolling restart on the proxy's runtime API and samples each server's
open connections and connection total every 250 ms:

    T0+5   server a out:  set server be/a state maint; shutdown sessions server be/a
    T0+20  server a back: set server be/a state ready           (slowstart 20s)
    T0+22  server b out:  set server be/b state maint; shutdown sessions server be/b
    T0+37  server b back: set server be/b state ready
    T0+45  end of the clients' run

Writes OUT/storm-KIND.json (timeline, events, ringload's report) and prints one JSON line.
"""

import json
import os
import socket
import subprocess
import sys
import time

EVENTS = [
    (5.0, "a out", ["set server be/a state maint", "shutdown sessions server be/a"]),
    (20.0, "a back", ["set server be/a state ready"]),
    (22.0, "b out", ["set server be/b state maint", "shutdown sessions server be/b"]),
    (37.0, "b back", ["set server be/b state ready"]),
]
END = 45.0
SERVERS = ["a", "b", "c"]


def ask(sock_path, line, timeout=10.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall((line + "\n").encode())
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return out.decode(errors="replace")


def sample(kind, stats_sock):
    """{server: (open, total)} for servers a, b, c of backend be."""
    if kind == "ringproxy":
        j = json.loads(ask(stats_sock, "show json"))
        return {r["server"]: (r["active"], r["total"]) for r in j["servers"] if r["backend"] == "be"}
    rows = {}
    for line in ask(stats_sock, "show stat").splitlines():
        f = line.split(",")
        if len(f) > 8 and f[0] == "be" and f[1] in SERVERS:
            rows[f[1]] = (int(f[4] or 0), int(f[7] or 0))
    return rows


def main():
    kind, ringload, target, conns, stats_sock, admin_sock, out = sys.argv[1:8]
    conns = int(conns)
    ramp = 4000
    duration = conns / ramp + END + 25
    cmd = [ringload, "hold", "--target", target, "--conns", str(conns), "--sources", "127.0.1.0/28",
           "--ramp", f"{ramp}/s", "--heartbeat", "5s", "--reconnect", "1s", "--duration", f"{duration:.0f}s",
           "--connect-timeout", "10s", "--json", "--no-progress"]
    hold = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(f"{out}/hold-{kind}.err", "w"))
    start = time.time()
    # All proxied: every connection open through the proxy.
    while True:
        if hold.poll() is not None:
            sys.exit(f"ringload hold ended before every connection was up: {open(f'{out}/hold-{kind}.err').read()[-2000:]}")
        s = sample(kind, stats_sock)
        if sum(v[0] for v in s.values()) >= conns:
            break
        if time.time() - start > conns / ramp + 60:
            sys.exit(f"only {sum(v[0] for v in s.values())} of {conns} connections proxied after {time.time() - start:.0f}s")
        time.sleep(0.25)
    t0 = time.time()
    timeline, done, answers = [], [], []
    pending = list(EVENTS)
    while time.time() - t0 < END:
        t = time.time() - t0
        while pending and pending[0][0] <= t:
            at, name, lines = pending.pop(0)
            for line in lines:
                answers.append((name, line, ask(admin_sock, line).strip()))
            done.append((round(time.time() - t0, 2), name))
        s = sample(kind, stats_sock)
        timeline.append([round(time.time() - t0, 3)] + [v for srv in SERVERS for v in s.get(srv, (0, 0))])
        time.sleep(0.25)
    report_text, _ = hold.communicate(timeout=duration + 120)
    report = json.loads(report_text)
    result = {"kind": kind, "conns": conns, "hold_cmd": " ".join(["ringload"] + cmd[1:]), "events": done,
              "answers": answers, "timeline": timeline, "ringload": report}
    json.dump(result, open(f"{out}/storm-{kind}.json", "w"))
    print(json.dumps({"kind": kind, "exit": report["exit_code"], "open_at_end": report["connections"]["open_at_end"]}))


if __name__ == "__main__":
    main()
