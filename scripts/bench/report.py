#!/usr/bin/env python3
"""Summarise a scripts/bench.sh run: medians (min-max) per path, ratios to direct and to HAProxy,
ringproxy against its baseline (the ringproxy-base path, BASE_BIN/BASE_REV) when it ran, the issue's
targets, charts (SVG) and, with --doc, the generated section of docs/benchmarks.md.

Input: OUT/results.jsonl (one line per test, path and round, written by bench.sh) and the raw files
it names (ringload JSON `ringload.v1`, iperf3 -J JSON, wrk text). Output: markdown on stdout,
OUT/summary.json, charts in --img.
"""
import argparse
import json
import os
import re
import statistics
import sys

PATH_ORDER = ["direct", "ringproxy", "ringproxy-base", "ringproxy-batch", "ringproxy-auto", "ringproxy-always", "ringproxy-never", "haproxy",
              "haproxy-splice", "haproxy-splice-always", "nginx"]
LABEL = {
    "direct": "direct",
    "ringproxy": "ringproxy",
    "ringproxy-base": "ringproxy (base)",
    "ringproxy-batch": "ringproxy batch_wait",
    "ringproxy-auto": "ringproxy splice: auto",
    "ringproxy-always": "ringproxy splice: always",
    "ringproxy-never": "ringproxy splice: never",
    "haproxy": "HAProxy",
    "haproxy-splice": "HAProxy splice-auto",
    "haproxy-splice-always": "HAProxy splice always",
    "nginx": "nginx stream",
}

# metric: (title, unit, higher_is_better, decimals)
METRICS = {
    "tput1": ("throughput, 1 stream (ringload)", "Gbit/s", True, 2),
    "iperf1": ("throughput, 1 stream (iperf3)", "Gbit/s", True, 2),
    "tput4": ("throughput, 4 streams (ringload)", "Gbit/s", True, 2),
    "iperf4": ("throughput, 4 streams (iperf3)", "Gbit/s", True, 2),
    "down1": ("throughput, 1 stream server -> client (ringload)", "Gbit/s", True, 2),
    "iperf1r": ("throughput, 1 stream server -> client (iperf3 -R)", "Gbit/s", True, 2),
    "down4": ("throughput, 4 streams server -> client (ringload)", "Gbit/s", True, 2),
    "iperf4r": ("throughput, 4 streams server -> client (iperf3 -R)", "Gbit/s", True, 2),
    "both1": ("throughput, 1 stream both ways at once, up + down (ringload)", "Gbit/s", True, 2),
    "both4": ("throughput, 4 streams both ways at once, up + down (ringload)", "Gbit/s", True, 2),
    "curl": ("one 1 GiB download by curl from nginx (integrity checked)", "Gbit/s", True, 2),
    "rate": ("new connections/s (ringload rate)", "conn/s", True, 0),
    "wrk": ("new connections/s (wrk, Connection: close)", "conn/s", True, 0),
    "ka": ("keep-alive requests/s (closed loop)", "req/s", True, 0),
    "lat_p50": ("latency p50 at fixed rate", "ms", False, 3),
    "lat_p99": ("latency p99 at fixed rate", "ms", False, 3),
    "lat_p999": ("latency p99.9 at fixed rate", "ms", False, 3),
    "idle_user": ("user-space memory per idle connection (RSS growth, connections held)", "bytes", False, 0),
    "idle_pool": ("of it: ringproxy's receive-buffer ring, pages resident ÷ connections (shared by a worker's connections; follows the heartbeats' bursts, not their number)", "bytes", False, 0),
    "idle_user_ramp": ("user-space memory per idle connection right after the ramp (RSS growth)", "bytes", False, 0),
    "idle_slab": ("kernel Slab growth per connection, whole machine", "bytes", False, 0),
    "idle_kernel": ("kernel memory per connection added by the proxy (Slab minus direct's)", "bytes", False, 0),
    "idle_sunr": ("unreclaimable Slab per connection added by the proxy (SUnreclaim minus direct's)", "bytes", False, 0),
    "idle60_user": ("connections silent for a minute (heartbeat every 60 s): user-space memory per connection", "bytes", False, 0),
    "idle60_pool": ("connections silent for a minute: of it, ringproxy's receive-buffer ring, pages resident ÷ connections", "bytes", False, 0),
    "idle60_slab": ("connections silent for a minute: kernel Slab growth per connection, whole machine", "bytes", False, 0),
    "idle60_kernel": ("connections silent for a minute: kernel memory per connection added by the proxy (Slab minus direct's)", "bytes", False, 0),
    "idle60_sunr": ("connections silent for a minute: unreclaimable Slab per connection added by the proxy", "bytes", False, 0),
    "idle60_cpu": ("connections silent for a minute: proxy CPU while holding them (ms per second)", "ms/s", False, 2),
    "cpu_gb": ("proxy CPU per GB moved (4 streams)", "CPU s/GB", False, 3),
    "cpu_10k": ("proxy CPU per 10,000 connections (rate test)", "CPU s", False, 3),
    "tput4_cpu_util": ("proxy CPU use during 4-stream throughput", "CPUs", False, 2),
    "hb9k_cpu": ("9,000 connections, 16-byte heartbeat each per second: proxy CPU per heartbeat", "µs", False, 1),
    "hb9k_p50": ("9,000 connections, heartbeat p50 RTT (after the ramp)", "ms", False, 3),
    "hb9k_p99": ("9,000 connections, heartbeat p99 RTT (after the ramp)", "ms", False, 3),
    "hb18k_cpu": ("18,000 connections, 16-byte heartbeat each per second: proxy CPU per heartbeat", "µs", False, 1),
    "hb18k_p50": ("18,000 connections, heartbeat p50 RTT (after the ramp)", "ms", False, 3),
    "hb18k_p99": ("18,000 connections, heartbeat p99 RTT (after the ramp)", "ms", False, 3),
    "hb5s_cpu": ("9,000 connections, a heartbeat each every 5 s, all within a second: proxy CPU per heartbeat", "µs", False, 1),
    "hb5s_p50": ("9,000 connections, a heartbeat every 5 s within a second: p50 RTT (after the ramp)", "ms", False, 3),
    "hb5s_p99": ("9,000 connections, a heartbeat every 5 s within a second: p99 RTT (after the ramp)", "ms", False, 3),
    "hb9k_machine": ("9,000 connections: the whole machine's CPU per heartbeat (clients, server, proxy, softirq)", "µs", False, 1),
    "hb9k_machine_added": ("9,000 connections: the whole machine's CPU per heartbeat added by the proxy (minus direct's)", "µs", False, 1),
    "hb18k_machine": ("18,000 connections: the whole machine's CPU per heartbeat (clients, server, proxy, softirq)", "µs", False, 1),
    "hb18k_machine_added": ("18,000 connections: the whole machine's CPU per heartbeat added by the proxy (minus direct's)", "µs", False, 1),
    "hb5s_machine": ("9,000 connections, heartbeats every 5 s: the whole machine's CPU per heartbeat", "µs", False, 1),
    "hb5s_machine_added": ("9,000 connections, heartbeats every 5 s: the whole machine's CPU per heartbeat added by the proxy", "µs", False, 1),
    "flows_tput": ("1,000 bulk flows both ways at once, up + down (ringload)", "Gbit/s", True, 2),
    "flows_rss": ("1,000 bulk flows both ways: the proxy's peak RSS growth", "MiB", False, 1),
    "flows_pressure": ("1,000 bulk flows both ways: time the host's TCP stack spent under memory pressure (tcp_mem)", "s", False, 1),
}

SHORT = {
    "tput1": "1 stream\n(ringload)", "iperf1": "1 stream\n(iperf3)", "tput4": "4 streams\n(ringload)",
    "iperf4": "4 streams\n(iperf3)", "rate": "new conn/s\n(ringload)", "wrk": "new conn/s\n(wrk)",
    "ka": "keep-alive\nreq/s", "lat_p99": "p99 latency\nfixed rate", "cpu_gb": "CPU\nper GB",
    "cpu_10k": "CPU per\n10k conns", "idle_user": "user bytes\nper idle conn", "idle_kernel": "kernel bytes\nper conn (Slab)",
    "idle_sunr": "kernel bytes\n(SUnreclaim)", "down1": "1 stream\ndown", "down4": "4 streams\ndown",
    "both1": "1 stream\nboth ways", "both4": "4 streams\nboth ways", "curl": "1 GiB\ncurl",
    "hb9k_cpu": "CPU per\nheartbeat 9k", "hb18k_cpu": "CPU per\nheartbeat 18k",
    "flows_tput": "1,000 flows\nboth ways", "flows_rss": "RSS with\n1,000 flows",
}

PEERS = ["haproxy", "haproxy-splice", "nginx"]
TARGETS = [
    # metric, text, comparison, factor, references: ringproxy must be >= factor x the best reference
    # (higher is better) or <= factor x the best (lower is better); "abs<=": at most factor
    ("tput1", "1 stream up (ringload) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("iperf1", "1 stream up (iperf3) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("tput4", "4 streams up (ringload) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("iperf4", "4 streams up (iperf3) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("down1", "1 stream down (ringload) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("iperf1r", "1 stream down (iperf3 -R) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("down4", "4 streams down (ringload) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("iperf4r", "4 streams down (iperf3 -R) >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("both1", "1 stream both ways >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("both4", "4 streams both ways >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("curl", "1 GiB curl download >= 1.2 x the best peer", ">=", 1.2, PEERS),
    ("rate", "new connections/s (ringload) >= 1.5 x HAProxy", ">=", 1.5, ["haproxy", "haproxy-splice"]),
    ("rate", "new connections/s (ringload) >= 1.5 x nginx", ">=", 1.5, ["nginx"]),
    ("wrk", "new connections/s (wrk) >= 1.5 x HAProxy", ">=", 1.5, ["haproxy", "haproxy-splice"]),
    ("wrk", "new connections/s (wrk) >= 1.5 x nginx", ">=", 1.5, ["nginx"]),
    ("ka", "keep-alive requests/s >= 1.3 x the best peer", ">=", 1.3, PEERS),
    ("lat_p99", "p99 latency at the fixed rate <= 0.9 x the best peer's", "<=", 0.9, PEERS),
    ("cpu_gb", "CPU per GB moved <= 0.6 x HAProxy splice-auto's", "<=", 0.6, ["haproxy-splice"]),
    ("hb9k_cpu", "9,000 heartbeating connections: CPU per heartbeat <= 0.6 x HAProxy's", "<=", 0.6, ["haproxy"]),
    ("hb9k_p99", "9,000 heartbeating connections: p99 RTT no worse than HAProxy's", "<=", 1.0, ["haproxy"]),
    ("hb18k_cpu", "18,000 heartbeating connections: CPU per heartbeat <= 0.6 x HAProxy's", "<=", 0.6, ["haproxy"]),
    ("hb18k_p99", "18,000 heartbeating connections: p99 RTT no worse than HAProxy's", "<=", 1.0, ["haproxy"]),
    # Not one of issue 11's: the same CPU target for heartbeats that come in bursts (since 2026-12-07).
    ("hb5s_cpu", "9,000 connections heartbeating every 5 s in bursts: CPU per heartbeat <= 0.6 x HAProxy's", "<=", 0.6,
     ["haproxy"]),
    # The same four for ringproxy with `tune.batch_wait` (the ringproxy-batch path), what an operator
    # of many mostly idle connections sets.
    ("hb9k_cpu", "9,000 heartbeating connections: CPU per heartbeat <= 0.6 x HAProxy's, with tune.batch_wait", "<=",
     0.6, ["haproxy"], "ringproxy-batch"),
    ("hb9k_p99", "9,000 heartbeating connections: p99 RTT no worse than HAProxy's, with tune.batch_wait", "<=", 1.0,
     ["haproxy"], "ringproxy-batch"),
    ("hb18k_cpu", "18,000 heartbeating connections: CPU per heartbeat <= 0.6 x HAProxy's, with tune.batch_wait", "<=",
     0.6, ["haproxy"], "ringproxy-batch"),
    ("hb18k_p99", "18,000 heartbeating connections: p99 RTT no worse than HAProxy's, with tune.batch_wait", "<=", 1.0,
     ["haproxy"], "ringproxy-batch"),
    ("idle_user", "idle connection: <= 512 B user-space memory", "abs<=", 512, []),
    ("idle_kernel", "idle connection: kernel memory <= HAProxy's", "<=", 1.0, ["haproxy", "haproxy-splice"]),
    ("idle60_kernel", "connection silent for a minute: kernel memory <= HAProxy's", "<=", 1.0, ["haproxy", "haproxy-splice"]),
]


def tot(snap, key):
    """KEY (dotted, e.g. "ring.submitted") of a `ringproxy stats --json` snapshot, summed over its
    workers; a map (e.g. "timeouts") counts as the sum of its values. scripts/soak.sh and
    scripts/scale.sh use it too."""
    t = 0
    for w in snap["workers"]:
        v = w
        for k in key.split("."):
            v = v[k]
        t += sum(v.values()) if isinstance(v, dict) else v
    return t


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# A measurement during which the hypervisor took more than this share of the host's CPU is listed
# under "Problems seen during the run".
STEAL_WARN = 0.10
# A tail-latency measurement (the heartbeats' p99, the fixed-rate percentiles) during which the
# hypervisor took more than this much CPU time is listed too, whatever its share: one stretch of
# ~0.2 s stolen from a 15 s window (1%) delays a few thousand heartbeats and decides the round's p99
# (2026-12-05: the one ringproxy round of three whose p99 read 17 ms and its maximum 154 ms had
# 210 ms stolen, the two others 10-20 ms; docs/benchmarks.md, "Where ringproxy loses").
STEAL_TAIL_MS = 100
# The heartbeat tests (bench.sh hb_test).
HB_TESTS = ("hb9k", "hb18k", "hb5s")
TAIL_TESTS = HB_TESTS + ("lat",)


def tail_stolen_ms(r):
    """CPU time in ms the hypervisor stole while tail-latency row `r` measured, when above
    STEAL_TAIL_MS (else None)."""
    if r["test"] not in TAIL_TESTS or stolen(r) is None:
        return None
    ms = r["steal_ticks"] * 1000 / r.get("clk_tck", 100)
    return ms if ms > STEAL_TAIL_MS else None


def stolen(r):
    """The share of the host's CPU stolen by the hypervisor while test row `r` measured (None when
    the row has no such record: tests that sample otherwise, or runs from before it was kept)."""
    total = r.get("sys_total_ticks")
    if not total or "steal_ticks" not in r:
        return None
    return r["steal_ticks"] / total


def load_run(f, rnd, t, p, problems):
    """The JSON report of a ringload or iperf3 run (None if missing); a run that did not exit 0
    is listed in `problems`."""
    j = load(f + ".json")
    if not j or j.get("exit_code") != 0:
        problems.append(f"round {rnd} {t} {p}: exit {j and j.get('exit_code')} ({j and j.get('verdict')})")
    return j


def parse(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl")) if l.strip()]
    vals = {}  # (metric, path) -> {round: value}
    lat_curves = {}  # path -> {round: [(nines, ms)]}
    problems = []
    direct_slab = {}
    direct_sunr, sunr_by = {}, {}
    slow = {}  # (tail test, ringproxy path) -> loop turns of >= 1, 10, 100 ms over its rounds
    late = {}  # (heartbeat test, path) -> its rounds' heartbeats late in the ramp (`late_in_warmup`)

    def put(metric, path, rnd, v):
        if v is not None:
            vals.setdefault((metric, path), {})[rnd] = v

    for r in rows:
        t, p, rnd, f = r["test"], r["path"], r["round"], r["file"]
        cpu_s = r.get("cpu_ticks", 0) / r.get("clk_tck", 100)
        steal = stolen(r)
        if steal is not None and steal > STEAL_WARN:
            problems.append(f"round {rnd} {t} {p}: {steal:.0%} of the host's CPU stolen by the hypervisor "
                            "during the measurement (every path slows alike; heartbeats may be lost)")
        if t in ("tput1", "tput4"):
            j = load_run(f, rnd, t, p, problems)
            if j and j.get("throughput"):
                put(t, p, rnd, j["throughput"]["up_gbps"])
                if t == "tput4" and r.get("proxied"):
                    gb = j["throughput"]["up_bytes"] / 1e9
                    if gb > 0:
                        put("cpu_gb", p, rnd, cpu_s / gb)
                    put("tput4_cpu_util", p, rnd, cpu_s / max(r.get("wall_s", 1), 1e-9))
        elif t in ("down1", "down4", "both1", "both4"):
            j = load_run(f, rnd, t, p, problems)
            if j and j.get("throughput"):
                T = j["throughput"]
                put(t, p, rnd, T["down_gbps"] + (T["up_gbps"] if t.startswith("both") else 0))
        elif t == "curl":
            try:
                lines = open(f + ".txt").read().split("\n")
                code, size, speed, _ = lines[0].split()
                intact = "intact" in lines
            except (OSError, ValueError):
                code, size, speed, intact = "-", 0, 0, False
            if code != "200" or not intact:
                problems.append(f"round {rnd} curl {p}: HTTP {code}, {size} bytes, {'intact' if intact else 'NOT the file'}")
            else:
                put("curl", p, rnd, float(speed) * 8 / 1e9)
        elif t == "flows":
            j = load_run(f, rnd, t, p, problems)
            if j and j.get("throughput"):
                T = j["throughput"]
                put("flows_tput", p, rnd, T["down_gbps"] + T["up_gbps"])
            if p != "direct":
                put("flows_rss", p, rnd, (r["peak_kb"] - r["rss0_kb"]) / 1024)
            if "tcp_pressure_ms" in r:
                put("flows_pressure", p, rnd, int(r["tcp_pressure_ms"]) / 1000)
        elif t in HB_TESTS:
            j = load_run(f, rnd, t, p, problems)
            n = r["conns"]
            # heartbeats a second: each connection's one every heartbeat_s
            per_s = n / r.get("heartbeat_s", 1)
            if r.get("seen_established", 0) < n:
                problems.append(f"round {rnd} {t} {p}: CPU sampled with {r.get('seen_established')} of {n} established")
            if n_late := j and j.get("messages", {}).get("late_in_warmup"):
                late.setdefault((t, p), []).append(f"{n_late:,} in round {rnd}")
            if j and j.get("latency_us"):
                put(f"{t}_p50", p, rnd, j["latency_us"]["p50"] / 1e3)
                put(f"{t}_p99", p, rnd, j["latency_us"]["p99"] / 1e3)
            if r.get("proxied") and r.get("window_s"):
                put(f"{t}_cpu", p, rnd, cpu_s * 1e6 / (per_s * r["window_s"]))
            if r.get("window_s") and r.get("cpus") and "sys_busy_ticks" in r:
                # Busy = CPUs x window minus idle (and iowait) and steal: idle is measured exactly,
                # /proc/stat's busy fields are tick samples that miss short bursts (bench.sh).
                idle = r["sys_total_ticks"] - r["sys_busy_ticks"]
                busy_s = r["cpus"] * r["window_s"] - (idle + r.get("steal_ticks", 0)) / r.get("clk_tck", 100)
                put(f"{t}_machine", p, rnd, busy_s * 1e6 / (per_s * r["window_s"]))
        elif t in ("iperf1", "iperf4", "iperf1r", "iperf4r"):
            j = load(f + ".json")
            try:
                put(t, p, rnd, j["end"]["sum_received"]["bits_per_second"] / 1e9)
            except (TypeError, KeyError):
                problems.append(f"round {rnd} {t} {p}: iperf3 failed ({j and j.get('error')})")
        elif t == "rate":
            j = load_run(f, rnd, t, p, problems)
            if j and j.get("connections_per_s"):
                put("rate", p, rnd, j["connections_per_s"])
                done = j["connections_per_s"] * j["elapsed_s"]
                if r.get("proxied") and done > 0:
                    put("cpu_10k", p, rnd, cpu_s / done * 1e4)
        elif t == "wrk":
            try:
                txt = open(f + ".txt").read()
            except OSError:
                txt = ""
            m = re.search(r"Requests/sec:\s+([\d.]+)", txt)
            if m:
                put("wrk", p, rnd, float(m.group(1)))
            else:
                problems.append(f"round {rnd} wrk {p}: no result")
            m = re.search(r"Socket errors: (.*)", txt)
            if m:
                problems.append(f"round {rnd} wrk {p}: socket errors: {m.group(1)}")
            m = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
            if m:
                problems.append(f"round {rnd} wrk {p}: {m.group(1)} non-2xx responses")
        elif t == "ka":
            j = load(f + ".json")
            if j and j.get("requests_per_s"):
                put("ka", p, rnd, j["requests_per_s"])
            if not j or j.get("messages", {}).get("corrupted") or j.get("connections", {}).get("failed"):
                problems.append(f"round {rnd} ka {p}: {j and j.get('verdict')}")
        elif t == "lat":
            j = load_run(f, rnd, t, p, problems)
            if j and j.get("latency_us"):
                L = j["latency_us"]
                put("lat_p50", p, rnd, L["p50"] / 1e3)
                put("lat_p99", p, rnd, L["p99"] / 1e3)
                put("lat_p999", p, rnd, L["p999"] / 1e3)
                curve = [(0.301, L["p50"]), (1, L["p90"]), (2, L["p99"]), (3, L["p999"]), (4, L["p9999"])]
                lat_curves.setdefault(p, {})[rnd] = [(x, y / 1e3) for x, y in curve]
                if j.get("requests_per_s") and j["requests_per_s"] < 0.95 * float(j["command"].split("--rate ")[1].split()[0]):
                    problems.append(f"round {rnd} lat {p}: only {j['requests_per_s']:.0f} req/s achieved")
        elif t in IDLE_TESTS:
            j = load(f + ".json")
            n = r["conns"]
            ok = bool(j) and j["connections"]["established"] == n and j["messages"]["lost"] == 0 \
                and j["messages"].get("late", 0) == 0 and j["messages"]["corrupted"] == 0 \
                and j["connections"]["dropped"] == 0
            if not ok:
                problems.append(f"round {rnd} {t} {p}: established {j and j['connections']['established']} of {n}, "
                                f"lost {j and j['messages']['lost']}, late {j and j['messages'].get('late')}, "
                                f"dropped {j and j['connections']['dropped']}")
            if r.get("seen_established", 0) < n:
                problems.append(f"round {rnd} {t} {p}: memory sampled with {r.get('seen_established')} of {n} established")
            # the sample taken once the connections had been held a while (runs from before it
            # was taken have only the one right after the ramp)
            k = "2" if "rss2_kb" in r else "1"
            slab = (r[f"slab{k}_kb"] - r["slab0_kb"]) * 1024 / n
            put(f"{t}_slab", p, rnd, slab)
            if f"sunr{k}_kb" in r:
                sunr = (r[f"sunr{k}_kb"] - r["sunr0_kb"]) * 1024 / n
                if p == "direct":
                    direct_sunr[(t, rnd)] = sunr
                else:
                    sunr_by[(t, p, rnd)] = sunr
            put(f"{t}_ok", p, rnd, 1 if ok else 0)
            if p == "direct":
                direct_slab[(t, rnd)] = slab
            else:
                put(f"{t}_user", p, rnd, (r[f"rss{k}_kb"] - r["rss0_kb"]) * 1024 / n)
                st = load(f + ".stats.json")
                if st and all("recv_buffers_resident" in w for w in st.get("workers", [])):
                    put(f"{t}_pool", p, rnd, sum(w["recv_buffers_resident"] for w in st["workers"]) / n)
                if t == "idle60" and "cpu_ticks" in r:
                    # between the two samples: the swap to polls (ringproxy) and whatever the
                    # proxy does per second while nothing moves
                    put("idle60_cpu", p, rnd, r["cpu_ticks"] * 1000 / r.get("clk_tck", 100) / float(r.get("cpu_span_s") or r["settle_s"]))
                if k == "2" and t == "idle":
                    put("idle_user_ramp", p, rnd, (r["rss1_kb"] - r["rss0_kb"]) * 1024 / n)
    # what the host allows: the rate each path would reach if its own user-space time were zero
    # and everything else it costs per unit stayed (its kernel work, the clients', the servers'),
    # on a host its test saturated: value x busy / (busy - user)
    for r in rows:
        t, p, rnd = r["test"], r["path"], r["round"]
        v = vals.get((t, p), {}).get(rnd)
        if t not in CEILING_TESTS or v is None or not r.get("proxied") or "user_ticks" not in r:
            continue
        busy = r["sys_busy_ticks"] - r.get("steal_ticks", 0)
        total = r["sys_total_ticks"] - r.get("steal_ticks", 0)
        if total <= 0 or busy <= r["user_ticks"]:
            continue
        put(f"c:{t}:busy", p, rnd, 100.0 * busy / total)
        if r.get("cpu_ticks"):
            put(f"c:{t}:user", p, rnd, 100.0 * r["user_ticks"] / r["cpu_ticks"])
        put(f"c:{t}:ceil", p, rnd, v * busy / (busy - r["user_ticks"]))
    # work per unit: context switches of the proxy's threads, io-wq CPU share, ringproxy's ring counters
    for r in rows:
        t, p, rnd, f = r["test"], r["path"], r["round"], r["file"]
        if not r.get("proxied") or t not in UNITS:
            continue
        j = load(f + ".json")
        if not j:
            continue
        units = unit_count(t, j)
        if not units:
            continue
        if "ctxsw" in r:
            put(f"w:{t}:ctxsw", p, rnd, r["ctxsw"] / units)
        if r.get("cpu_ticks"):
            put(f"w:{t}:cpu_us", p, rnd, r["cpu_ticks"] / r.get("clk_tck", 100) * 1e6 / units)
            if p.startswith("ringproxy"):
                put(f"w:{t}:iowq_share", p, rnd, 100.0 * r.get("iowq_ticks", 0) / r["cpu_ticks"])
        s0, s1 = load(f + ".stats0.json"), load(f + ".stats1.json")
        if s0 and s1:
            for key, name in (("ring.submitted", "sqes"), ("ring.completions", "cqes"),
                              ("ring.enter_calls", "enters"), ("splices", "splices"),
                              ("loop_iterations", "loops")):
                put(f"w:{t}:{name}", p, rnd, (tot(s1, key) - tot(s0, key)) / units)
    # ringproxy's long event-loop turns during the tail-latency tests (builds that count them)
    for r in rows:
        t, p, f = r["test"], r["path"], r["file"]
        if t not in TAIL_TESTS or not p.startswith("ringproxy"):
            continue
        s0, s1 = load(f + ".stats0.json"), load(f + ".stats1.json")
        if s0 and s1 and all("slow_turns" in w for w in s0["workers"] + s1["workers"]):
            slow[(t, p)] = [a + b for a, b in zip(slow.get((t, p), [0, 0, 0]),
                            [tot(s1, f"slow_turns.over_{ms}ms") - tot(s0, f"slow_turns.over_{ms}ms")
                             for ms in (1, 10, 100)])]
    for (t, p, rnd), v in sunr_by.items():
        if (t, rnd) in direct_sunr:
            put(f"{t}_sunr", p, rnd, v - direct_sunr[(t, rnd)])
    # kernel memory the proxy adds: Slab growth through the proxy minus direct's, same test and round
    for t in IDLE_TESTS:
        for (m, p), d in list(vals.items()):
            if m == f"{t}_slab" and p != "direct":
                for rnd, v in d.items():
                    if (t, rnd) in direct_slab:
                        put(f"{t}_kernel", p, rnd, v - direct_slab[(t, rnd)])
    # the machine's CPU per heartbeat the proxy adds: through it minus direct's, same round
    for t in HB_TESTS:
        direct = vals.get((f"{t}_machine", "direct"), {})
        for (m, p), d in list(vals.items()):
            if m == f"{t}_machine" and p != "direct":
                for rnd, v in d.items():
                    if rnd in direct:
                        put(f"{t}_machine_added", p, rnd, v - direct[rnd])
    return rows, vals, lat_curves, problems, slow, late


# The memory tests: idle connections with a heartbeat every 2 s, and silent for a minute.
IDLE_TESTS = ("idle", "idle60")
# Tests whose rate the CPU time of every process bounds once they keep the host's CPUs busy (the
# report checks that they did, round by round).
CEILING_TESTS = ("tput1", "iperf1", "tput4", "iperf4", "down1", "iperf1r", "down4", "iperf4r", "both1", "both4",
                 "curl", "rate", "wrk", "ka")
# Busy share of the host's CPU from which a test counts as CPU-bound.
SATURATED = 97.0

UNITS = {"tput4": "MB moved", "tput1": "MB moved", "rate": "connection", "ka": "request", "lat": "request"}


def unit_count(t, j):
    if t in ("tput1", "tput4"):
        return (j.get("throughput") or {}).get("up_bytes", 0) / 1e6
    if t == "rate":
        return (j.get("connections_per_s") or 0) * j.get("elapsed_s", 0)
    return j.get("messages", {}).get("echoed_ok", 0)


def med(d):
    return statistics.median(d.values()) if d else None


def fmt(v, dec):
    if v is None:
        return "–"
    if dec == 0:
        return f"{v:,.0f}"
    return f"{v:,.{dec}f}"


def cell(d, dec):
    """A table cell: the median of the rounds, with min–max when there are several."""
    if not d:
        return "–"
    if len(d) == 1:
        return fmt(med(d), dec)
    return f"{fmt(med(d), dec)} ({fmt(min(d.values()), dec)}–{fmt(max(d.values()), dec)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--img", required=True)
    ap.add_argument("--doc")
    a = ap.parse_args()
    rows, vals, curves, problems, slow, late = parse(a.out)
    paths = [p for p in PATH_ORDER if any(k[1] == p for k in vals)]
    rounds = sorted({r["round"] for r in rows})
    machine = open(os.path.join(a.out, "machine.txt")).read().strip()

    M = {(m, p): med(d) for (m, p), d in vals.items()}
    out = []
    w = out.append
    w(f"Generated by `scripts/bench.sh` ({len(rounds)} rounds; every figure is the median of the rounds, "
      f"min–max in brackets).\n")
    w("```\n" + machine + "\n```\n")
    w("### Results\n")
    w("| measurement | unit | " + " | ".join(LABEL[p] for p in paths) + " |")
    w("|---|---|" + "---|" * len(paths))
    for m, (title, unit, hib, dec) in METRICS.items():
        if not any((m, p) in vals for p in paths):
            continue
        cells = [cell(vals.get((m, p)), dec) for p in paths]
        w(f"| {title} | {unit} | " + " | ".join(cells) + " |")
    for t, title in (("idle", "idle connections held with nothing lost (rounds)"),
                     ("idle60", "connections silent for a minute held, none dropped (rounds)")):
        idle = [(p, vals.get((f"{t}_ok", p), {})) for p in paths]
        if any(d for _, d in idle):
            w(f"| {title} | | " + " | ".join(f"{sum(d.values())}/{len(d)}" if d else "–" for _, d in idle) + " |")
    w("")

    def ratio_table(ref, title):
        if not any(k[1] == ref for k in vals):
            return
        w(f"### {title}\n")
        w("Higher is better for throughput and rates; lower is better for latency, memory and CPU.\n")
        w("| measurement | " + " | ".join(LABEL[p] for p in paths if p != ref) + " |")
        w("|---|" + "---|" * (len(paths) - 1))
        for m, (title_m, unit, hib, dec) in METRICS.items():
            r = M.get((m, ref))
            if r is None or r == 0 or m in {f"{t}_slab" for t in IDLE_TESTS}:
                continue
            cells = []
            for p in paths:
                if p == ref:
                    continue
                v = M.get((m, p))
                cells.append("–" if v is None else f"{v / r:.2f}")
            if all(c == "–" for c in cells):
                continue
            w(f"| {title_m} {'↑' if hib else '↓'} | " + " | ".join(cells) + " |")
        w("")

    base_table(paths, M, vals, w)
    ratio_table("direct", "Ratio to direct (no proxy)")
    ratio_table("haproxy-splice", "Ratio to HAProxy with `option splice-auto`")
    ratio_table("haproxy-splice-always", "Ratio to HAProxy with `option splice-request` and `splice-response`")
    ratio_table("haproxy", "Ratio to HAProxy without splicing")

    # targets
    summary_targets = []
    if "ringproxy" in paths:
        w("### Targets (issue 11)\n")
        w("The reference is the best of the peers named by the target for that measurement (\"the best peer\": "
          "HAProxy, HAProxy splice-auto and nginx stream). *Ratio of medians*: ringproxy's median over the "
          "median of the best reference. *Per round*: in each round, ringproxy against the best reference of "
          "that round (the paths of one round are measured minutes apart, while the host's speed can change "
          "between rounds), the median of those ratios with their min–max and the rounds that meet the "
          "target; **met** is judged on that median.\n")
        w("| target | ringproxy | reference | ratio of medians | per round: median (min–max), rounds met | met |")
        w("|---|---|---|---|---|---|")
        for m, text, cmp, factor, refs, *who in TARGETS:
            title, unit, hib, dec = METRICS[m]
            me = who[0] if who else "ringproxy"
            v = M.get((m, me))
            if v is None:
                continue
            mine = vals.get((m, me), {})
            if cmp == "abs<=":
                ok = v <= factor
                rounds_ok = sum(1 for x in mine.values() if x <= factor)
                w(f"| {text} | {fmt(v, dec)} {unit} | {factor} {unit} | {v / factor:.2f} | "
                  f"{rounds_ok}/{len(mine)} rounds at most {factor} {unit} | {'yes' if ok else '**no**'} |")
                summary_targets.append({"target": text, "path": me, "ringproxy": v, "reference": factor, "met": ok})
                continue
            cand = [(M.get((m, r)), r) for r in refs if M.get((m, r)) is not None]
            if not cand:
                continue
            ref, refp = (max(cand) if hib else min(cand))
            ratio = v / ref if ref else float("inf")
            paired = []
            for rnd, x in sorted(mine.items()):
                peers = [vals[(m, r)][rnd] for r in refs if rnd in vals.get((m, r), {})]
                best = (max(peers) if hib else min(peers)) if peers else None
                if best:
                    paired.append(x / best)
            meets = (lambda q: q >= factor) if cmp == ">=" else (lambda q: q <= factor)
            pm = statistics.median(paired) if paired else ratio
            ok = meets(pm)
            per_round = (f"{pm:.2f} ({min(paired):.2f}–{max(paired):.2f}), {sum(map(meets, paired))}/{len(paired)}"
                         if paired else "–")
            w(f"| {text} | {fmt(v, dec)} {unit} | {LABEL[refp]}: {fmt(ref, dec)} {unit} | {ratio:.2f} "
              f"(target {cmp} {factor}) | {per_round} | {'yes' if ok else '**no**'} |")
            summary_targets.append({"target": text, "path": me, "ringproxy": v, "reference": ref, "reference_path": refp,
                                    "ratio": ratio, "paired_ratios": paired, "met": ok})
        w("")

    ceiling_table(vals, M, w)

    # work per unit
    wk = sorted({k[0] for k in vals if k[0].startswith("w:")})
    if wk:
        w("### Work per unit (median of rounds)\n")
        w("Context switches: all threads of the proxy's processes (voluntary + involuntary). io-wq share: CPU "
          "time of ringproxy's `iou-wrk-*` threads (the kernel threads io_uring runs blocking work on) as a "
          "share of ringproxy's CPU. SQEs, CQEs, `io_uring_enter` calls, splices and event-loop turns: "
          "ringproxy's stats socket, summed over workers.\n")
        proxies = [p for p in paths if p != "direct"]
        w("| test (unit) | counter | " + " | ".join(LABEL[p] for p in proxies) + " |")
        w("|---|---|" + "---|" * len(proxies))
        names = {"cpu_us": "proxy CPU µs", "ctxsw": "context switches", "iowq_share": "io-wq share of CPU, %",
                 "sqes": "SQEs submitted", "cqes": "CQEs reaped", "enters": "io_uring_enter calls",
                 "splices": "splices", "loops": "event-loop turns"}
        for t in ("tput4", "rate", "ka", "lat"):
            for n in ("cpu_us", "ctxsw", "iowq_share", "sqes", "cqes", "enters", "splices", "loops"):
                key = f"w:{t}:{n}"
                if key not in wk:
                    continue
                cells = [fmt(M.get((key, p)), 1 if n == "iowq_share" else 2) for p in proxies]
                w(f"| {t} (per {UNITS[t]}) | {names[n]} | " + " | ".join(cells) + " |")
        w("")

    # commands
    w("### Commands (per path; ADDR is the path's frontend, or the backend for direct)\n")
    w("```")
    seen = set()
    for r in rows:
        if r["test"] in seen:
            continue
        seen.add(r["test"])
        try:
            cmd = open(r["file"] + ".cmd").read().strip()
        except OSError:
            continue
        cmd = re.sub(r"127\.0\.0\.1:\d+", "ADDR", cmd)
        cmd = re.sub(r"-c 127\.0\.0\.1 -p \d+", "-c ADDR_IP -p ADDR_PORT", cmd)
        w(f"{r['test']:6} {cmd}")
    w("```\n")
    steals = sorted(x for x in (stolen(r) for r in rows) if x is not None)
    if steals:
        w(f"CPU stolen by the hypervisor while measuring (`/proc/stat` steal, per test): median "
          f"{statistics.median(steals):.0%}, most {steals[-1]:.0%}.\n")
    if late:
        w("Heartbeats sent during the ramp and echoed after the next one was due (`late_in_warmup`: before "
          "`--latency-after`, left out of the figures and not failures; late ones after it fail their round, "
          "and an echo that never came is lost: both would be listed under the problems): " +
          "; ".join(f"{t} {LABEL[p]} {', '.join(v)}" for (t, p), v in sorted(late.items())) + ".\n")
    tails = [(r, ms) for r in rows if (ms := tail_stolen_ms(r)) is not None]
    if tails:
        w(f"Tail-latency rounds during which the hypervisor stole more than {STEAL_TAIL_MS} ms of CPU (their "
          "percentiles measure that as much as the path): " +
          ", ".join(f"round {r['round']} {r['test']} {r['path']} ({ms:.0f} ms)" for r, ms in tails) + ".\n")
    if slow:
        w("ringproxy's event-loop turns of at least 1 / 10 / 100 ms during the tail-latency tests, all rounds "
          "(stats socket, `slow_turns`; a turn's wall time counts any time its thread was preempted or its "
          "vCPU stolen): " + ", ".join(f"{t} {LABEL[p]} {n[0]} / {n[1]} / {n[2]}"
                                        for (t, p), n in sorted(slow.items())) + ".\n")
    if problems:
        w("### Problems seen during the run\n")
        for p in problems:
            w(f"- {p}")
        w("")
    else:
        w("No failed, dropped, lost or corrupted connection or message in any test.\n")

    charts = make_charts(a.img, paths, M, vals, curves)
    if charts:
        w("### Charts\n")
        rel = os.path.relpath(a.img, os.path.dirname(os.path.abspath(a.doc))) if a.doc else a.img
        for name, alt in charts:
            w(f"![{alt}]({rel}/{name})\n")

    text = "\n".join(out)
    print(text)
    json.dump({"medians": {f"{m}|{p}": v for (m, p), v in M.items()},
               "rounds": {f"{m}|{p}": d for (m, p), d in vals.items()},
               "targets": summary_targets, "problems": problems},
              open(os.path.join(a.out, "summary.json"), "w"), indent=1)
    if a.doc:
        doc = open(a.doc).read() if os.path.exists(a.doc) else ""
        b, e = "<!-- bench:begin -->", "<!-- bench:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + text + "\n" + doc[doc.index(e):]
        else:
            doc += f"\n{b}\n{text}\n{e}\n"
        open(a.doc, "w").write(doc)


def ceiling_table(vals, M, w):
    """The targets ringproxy misses on rates and throughput, against what the host allows it."""
    rows = []
    for m, text, cmp, factor, refs, *who in TARGETS:
        me = who[0] if who else "ringproxy"
        if cmp != ">=" or m not in CEILING_TESTS or (f"c:{m}:ceil", me) not in vals:
            continue
        mine, ceil = vals.get((m, me), {}), vals[(f"c:{m}:ceil", me)]
        busy, direct = vals.get((f"c:{m}:busy", me), {}), vals.get((m, "direct"), {})
        paired, paired_ceil, paired_direct, bound = [], [], [], []
        for rnd, x in sorted(mine.items()):
            peers = [vals[(m, r)][rnd] for r in refs if rnd in vals.get((m, r), {})]
            if not peers or rnd not in ceil:
                continue
            best = max(peers)
            paired.append(x / best)
            # the tighter of the two bounds this round has: no user-space time, and no proxy at all
            b = []
            if busy.get(rnd, 0) >= SATURATED:
                paired_ceil.append(ceil[rnd] / best)
                b.append(paired_ceil[-1])
            if rnd in direct:
                paired_direct.append(direct[rnd] / best)
                b.append(paired_direct[-1])
            if b:
                bound.append(min(b))
        if not paired or statistics.median(paired) >= factor:
            continue
        pc = statistics.median(paired_ceil) if paired_ceil else None
        pd = statistics.median(paired_direct) if paired_direct else None
        pb = statistics.median(bound) if bound else None
        verdict = "–" if pb is None else ("yes" if pb >= factor else "**no**")
        title, unit, hib, dec = METRICS[m]
        rows.append(f"| {text} | {fmt(M.get((f'c:{m}:busy', me)), 0)} % | {fmt(M.get((f'c:{m}:user', me)), 1)} % | "
                    f"{statistics.median(paired):.2f} | {fmt(M.get((f'c:{m}:ceil', me)), dec)} {unit} | "
                    f"{'–' if pc is None else f'{pc:.2f}'} ({len(paired_ceil)} of {len(paired)} rounds saturated) | "
                    f"{'–' if pd is None else f'{pd:.2f}'} | {verdict} |")
    if not rows:
        return
    w("### What the host allows, for the targets missed\n")
    w("Each test below kept the host's CPUs busy; clients, servers and proxy share them, so a path's "
      "rate is bounded by the CPU time of all of them. *Ceiling*: the rate ringproxy would reach if its "
      "own user-space time (utime, `/proc/PID/stat`) were zero and all else it costs per unit stayed — its "
      "kernel work (system calls, the TCP stack, softirq charged to it) and the clients' and servers' "
      "work: the measured rate × busy ÷ (busy − user), per round where the host was at least "
      f"{SATURATED:.0f} % busy, against the best reference of that round. Where the ceiling is below "
      "the target, no change to ringproxy's own code meets it on this host; only less kernel work per "
      "unit, or CPUs the clients and servers do not share, would. *Direct ÷ reference*: no proxy at all, "
      "the same round — a bound too, the only one where the host was not saturated (a single stream "
      "paced by its client and server). *Reachable* is judged on the tighter of the two, round by "
      "round.\n")
    w("| target | host busy | ringproxy's CPU in user space | ringproxy ÷ reference (per round) | "
      "ceiling | ceiling ÷ reference (per round) | direct ÷ reference (per round) | reachable by user-space changes |")
    w("|---|---|---|---|---|---|---|---|")
    for row in rows:
        w(row)
    w("")


def base_table(paths, M, vals, w):
    """ringproxy beside ringproxy-base, the same binary's older build run the same way, with new / base."""
    if "ringproxy" not in paths or "ringproxy-base" not in paths:
        return
    w("### ringproxy against its baseline (ringproxy-base)\n")
    w("The same tests, configuration and pinning, interleaved in the same rounds. new / base above 1 is "
      "better for throughput and rates (↑), below 1 for latency, memory and CPU (↓). *Per round*: new / base "
      "of each round, the two measured one after the other (a pair sees the same moment of the host, so "
      "the pairs say more than the medians where rounds swing), and in how many rounds the new one did "
      "better.\n")
    w("| measurement | unit | ringproxy | ringproxy (base) | new / base | per round | new better |")
    w("|---|---|---|---|---|---|---|")
    for m, (title, unit, hib, dec) in METRICS.items():
        new, base = M.get((m, "ringproxy")), M.get((m, "ringproxy-base"))
        if new is None and base is None:
            continue
        ratio = f"{new / base:.2f}" if new is not None and base else "–"
        cells = [cell(vals.get((m, p)), dec) for p in ("ringproxy", "ringproxy-base")]
        pairs = paired(vals.get((m, "ringproxy"), {}), vals.get((m, "ringproxy-base"), {}))
        per_round = ", ".join(f"{r:.2f}" for r in pairs) or "–"
        better = f"{sum(1 for r in pairs if (r > 1 if hib else r < 1))} of {len(pairs)}" if pairs else "–"
        w(f"| {title} {'↑' if hib else '↓'} | {unit} | {cells[0]} | {cells[1]} | {ratio} | {per_round} | {better} |")
    w("")


def paired(new, base):
    """new / base for each round that measured both (and a base above 0), in round order."""
    return [new[r] / base[r] for r in sorted(new) if r in base and base[r]]


def save(fig, img, name):
    fig.savefig(os.path.join(img, name + ".svg"))
    if os.environ.get("BENCH_PNG"):  # for a quick look in tools that do not render SVG
        fig.savefig(os.path.join(img, name + ".png"), dpi=80)


def make_charts(img, paths, M, vals, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "ringproxy", "svg.fonttype": "none"})
    colors = {"direct": "#888888", "ringproxy": "#d62728", "ringproxy-base": "#ff9896", "ringproxy-batch": "#bcbd22",
              "ringproxy-auto": "#e377c2",
              "ringproxy-always": "#8c564b", "ringproxy-never": "#ff7f0e", "haproxy": "#1f77b4",
              "haproxy-splice": "#17becf", "haproxy-splice-always": "#9467bd", "nginx": "#2ca02c"}
    made = []

    def bars(ax, metrics, series, ref, ylabel, title):
        import numpy as np
        x = np.arange(len(metrics))
        width = 0.8 / max(len(series), 1)
        for i, p in enumerate(series):
            ys = []
            lo, hi = [], []
            for m in metrics:
                r = M.get((m, ref))
                v = M.get((m, p))
                d = vals.get((m, p), {})
                if r and v is not None:
                    ys.append(v / r)
                    lo.append(v / r - min(d.values()) / r)
                    hi.append(max(d.values()) / r - v / r)
                else:
                    ys.append(0); lo.append(0); hi.append(0)
            ax.bar(x + (i - (len(series) - 1) / 2) * width, ys, width, yerr=[lo, hi], capsize=2,
                   label=LABEL[p], color=colors[p])
        ax.axhline(1.0, color="black", lw=0.8)
        # whiskers of a noisy tail must not flatten the bars: cap the axis at 1.5 x the tallest median
        top = max([M.get((m, p)) / M.get((m, ref)) for m in metrics for p in series
                   if M.get((m, p)) is not None and M.get((m, ref))] + [1.0])
        ax.set_ylim(0, top * 1.5)
        ax.set_xticks(x)
        ax.set_xticklabels([SHORT.get(m, m) for m in metrics], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)

    hib = [m for m in ("tput1", "iperf1", "tput4", "iperf4", "rate", "wrk", "ka") if (m, "direct") in M]
    proxies = [p for p in paths if p != "direct"]
    if hib and proxies:
        fig, ax = plt.subplots(figsize=(10, 4))
        bars(ax, hib, proxies, "direct", "fraction of direct (higher is better)",
             "Each proxy relative to no proxy (median of rounds; whiskers: min–max)")
        fig.tight_layout()
        save(fig, img, "bench-ratio-direct")
        plt.close(fig)
        made.append(("bench-ratio-direct.svg", "ratio to direct"))
    ref = "haproxy-splice" if "haproxy-splice" in paths else ("haproxy" if "haproxy" in paths else None)
    if ref:
        others = [p for p in paths if p not in ("direct", ref)]
        up = [m for m in ("tput1", "tput4", "rate", "wrk", "ka") if (m, ref) in M]
        down = [m for m in ("lat_p99", "cpu_gb", "cpu_10k", "idle_user", "idle_kernel", "idle_sunr") if M.get((m, ref))]
        fig, axs = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [len(up) or 1, len(down) or 1]})
        bars(axs[0], up, others, ref, f"÷ {LABEL[ref]} (higher is better)", "Rates")
        bars(axs[1], down, others, ref, f"÷ {LABEL[ref]} (lower is better)", "Latency, CPU, memory")
        fig.suptitle(f"Relative to {LABEL[ref]} (median of rounds; whiskers: min–max)")
        fig.tight_layout()
        save(fig, img, "bench-ratio-haproxy")
        plt.close(fig)
        made.append(("bench-ratio-haproxy.svg", f"ratio to {LABEL[ref]}"))
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for p in paths:
            c = curves.get(p)
            if not c:
                continue
            # the round whose p99 is the median one
            rs = sorted(c, key=lambda r: c[r][2][1])
            r = rs[len(rs) // 2]
            xs, ys = zip(*c[r])
            ax.plot(xs, ys, marker="o", label=LABEL[p], color=colors[p])
        ax.set_xticks([0.301, 1, 2, 3, 4])
        ax.set_xticklabels(["p50", "p90", "p99", "p99.9", "p99.99"])
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (log), corrected for coordinated omission")
        ax.set_title("Keep-alive request/response latency at a fixed rate (round with the median p99)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save(fig, img, "bench-latency")
        plt.close(fig)
        made.append(("bench-latency.svg", "latency distribution"))
    proxies = [p for p in paths if p != "direct"]
    mem = [m for m in ("idle_user", "idle_kernel", "cpu_gb", "cpu_10k") if any((m, p) in M for p in proxies)]
    if mem:
        fig, axs = plt.subplots(1, len(mem), figsize=(3.2 * len(mem), 3.6))
        for ax, m in zip(axs if len(mem) > 1 else [axs], mem):
            ys = [M.get((m, p)) or 0 for p in proxies]
            ax.bar(range(len(proxies)), ys, color=[colors[p] for p in proxies])
            ax.set_xticks(range(len(proxies)))
            ax.set_xticklabels([LABEL[p].replace(" ", "\n") for p in proxies], fontsize=7)
            ax.set_title(METRICS[m][0].replace(" (", "\n("), fontsize=8)
            ax.set_ylabel(METRICS[m][1])
            for i, y in enumerate(ys):
                ax.annotate(fmt(y, METRICS[m][3]), (i, y), ha="center", va="bottom", fontsize=7)
        fig.tight_layout()
        save(fig, img, "bench-cost")
        plt.close(fig)
        made.append(("bench-cost.svg", "memory and CPU per connection / per GB"))
    return made


if __name__ == "__main__":
    sys.exit(main())
