"""Figures, PASS/FAIL and SVG charts of scripts/storm.sh's runs (storm.py's JSON files).

    storm_report.py OUT IMG CLOSE_SPREAD_S SLOWSTART_S KIND...

For each run: connections per server over time and new connections per second per server (from
the servers' connection totals, per second), with the events marked; the peak rate into any server
after the first event, and the ceiling that close_spread implies for ringproxy; what ringload says
(open at the end, reconnects, heartbeats lost). Prints a Markdown report; exit 1 if a check fails.
"""

import json
import sys

COLORS = {"a": "#1f77b4", "b": "#d62728", "c": "#2ca02c"}
SERVERS = ["a", "b", "c"]


def per_second(timeline):
    """[(t, {server: new connections/s over the last second up to t})], at every sample that has one
    a second or more before it."""
    out = []
    j = 0
    for row in timeline:
        while j + 1 < len(timeline) and timeline[j + 1][0] <= row[0] - 1.0:
            j += 1
        dt = row[0] - timeline[j][0]
        if dt < 1.0:
            continue
        out.append((row[0], {srv: (row[2 + 2 * k] - timeline[j][2 + 2 * k]) / dt for k, srv in enumerate(SERVERS)}))
    return out


def svg(run, title):
    w, h, pad, gap = 760, 520, 60, 40
    ph = (h - 2 * pad - gap) / 2
    tl = run["timeline"]
    tmax = max(r[0] for r in tl)
    opens = [[r[1 + 2 * k] for r in tl] for k in range(3)]
    rates = per_second(tl)
    ymax1 = max(max(o) for o in opens) * 1.1 or 1
    ymax2 = max([max(r[1].values()) for r in rates] + [1]) * 1.1
    x = lambda t: pad + (w - 2 * pad) * t / tmax
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for p, (ymax, label) in enumerate([(ymax1, "open connections per server"), (ymax2, "new connections/s per server")]):
        top = pad + p * (ph + gap)
        y = lambda v, top=top, ymax=ymax: top + ph - ph * v / ymax
        parts.append(f'<rect x="{pad}" y="{top}" width="{w - 2 * pad}" height="{ph}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{pad}" y="{top - 6}">{label}</text>')
        for frac in (0, 0.5, 1):
            v = ymax / 1.1 * frac
            parts.append(f'<text x="{pad - 6}" y="{y(v) + 4}" text-anchor="end">{v:,.0f}</text>')
        for n, (at, name) in enumerate(run["events"]):
            parts.append(f'<line x1="{x(at)}" y1="{top}" x2="{x(at)}" y2="{top + ph}" stroke="#bbb" stroke-dasharray="4 3"/>')
            if p == 0:
                parts.append(f'<text x="{x(at) + 3}" y="{top + 12 + 13 * (n % 2)}" fill="#555">{name}</text>')
        if p == 1:
            for sec in range(0, int(tmax) + 1, 5):
                parts.append(f'<text x="{x(sec)}" y="{top + ph + 14}" text-anchor="middle" fill="#555">{sec}</text>')
        for k, srv in enumerate(SERVERS):
            if p == 0:
                pts = " ".join(f"{x(r[0]):.1f},{y(r[1 + 2 * k]):.1f}" for r in tl)
            else:
                pts = " ".join(f"{x(t):.1f},{y(r[srv]):.1f}" for t, r in rates)
            parts.append(f'<polyline fill="none" stroke="{COLORS[srv]}" stroke-width="1.6" points="{pts}"/>')
    for k, srv in enumerate(SERVERS):
        parts.append(f'<text x="{w - pad - 210 + 70 * k}" y="{h - 18}" fill="{COLORS[srv]}">server {srv}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle" fill="#555">seconds since every connection was up</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    out, img, spread, slow = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    kinds = sys.argv[5:]
    ok = True
    w = print
    w("| | " + " | ".join(kinds) + " |")
    w("|---|" + "---|" * len(kinds))
    rows = {}
    for kind in kinds:
        run = json.load(open(f"{out}/storm-{kind}.json"))
        r = run["ringload"]
        c, m = r["connections"], r["messages"]
        tl = run["timeline"]
        first = run["events"][0][0]
        rates = [(t, v) for t, v in per_second(tl) if t > first]
        peak = max((max(v.values()), t, max(v, key=v.get)) for t, v in rates)
        # The servers' open connections when a and b were taken out.
        def open_at(srv, t):
            k = SERVERS.index(srv)
            return min(tl, key=lambda row: abs(row[0] - t))[1 + 2 * k]
        ev = dict((name, at) for at, name in run["events"])
        killed_a, killed_b = open_at("a", ev["a out"] - 0.3), open_at("b", ev["b out"] - 0.3)
        # Where b's clients went in the first 10 s after it was taken out (a was ramping up).
        t_b = ev["b out"]
        before = min(tl, key=lambda row: abs(row[0] - t_b))
        after = min(tl, key=lambda row: abs(row[0] - (t_b + 10)))
        to_a = after[2 + 2 * 0] - before[2 + 2 * 0]
        to_c = after[2 + 2 * 2] - before[2 + 2 * 2]
        rows[kind] = dict(
            conns=run["conns"], open_at_end=c["open_at_end"], reconnects=c["reconnects"], lost=m["lost"],
            corrupted=m["corrupted"], failed=c["failed"], peak=peak, killed_a=killed_a, killed_b=killed_b,
            to_a=to_a, to_c=to_c, exit=r["exit_code"])
        open(f"{img}/storm-{kind}.svg", "w").write(
            svg(run, f"{kind}: {run['conns']:,} held connections, servers a then b taken out and back"))
    line = lambda label, f: w(f"| {label} | " + " | ".join(f(rows[k]) for k in kinds) + " |")
    line("connections held", lambda r: f"{r['conns']:,}")
    line("open at the end (every client back)", lambda r: f"{r['open_at_end']:,}")
    line("reconnects", lambda r: f"{r['reconnects']:,}")
    line("heartbeats lost / corrupted", lambda r: f"{r['lost']} / {r['corrupted']}")
    line("failed dials", lambda r: f"{r['failed']}")
    line("connections closed with a / with b", lambda r: f"{r['killed_a']:,} / {r['killed_b']:,}")
    line("peak new connections/s into one server", lambda r: f"**{r['peak'][0]:,.0f}** (server {r['peak'][2]}, t={r['peak'][1]:.1f}s)")
    line("b's clients in the 10 s after it went out: to a (ramping) / to c", lambda r: f"{r['to_a']:,} / {r['to_c']:,}")
    w("")
    for kind, r in rows.items():
        checks = [
            (r["open_at_end"] == r["conns"], f"{kind}: every client reconnected ({r['open_at_end']:,} of {r['conns']:,} open at the end)"),
            (r["lost"] == 0 and r["corrupted"] == 0, f"{kind}: 0 heartbeats lost or corrupted ({r['lost']}, {r['corrupted']})"),
        ]
        if kind == "ringproxy":
            ceiling = 1.5 * max(r["killed_a"], r["killed_b"]) / spread
            checks.append((r["peak"][0] <= ceiling,
                           f"{kind}: peak rate into one server {r['peak'][0]:,.0f}/s <= {ceiling:,.0f}/s "
                           f"(1.5 x the largest shutdown / close_spread {spread:.0f}s)"))
            checks.append((r["to_a"] < r["to_c"],
                           f"{kind}: slowstart {slow:.0f}s: the returning server a took fewer of b's clients than c "
                           f"({r['to_a']:,} vs {r['to_c']:,})"))
        for good, text in checks:
            w(f"- {'PASS' if good else 'FAIL'}: {text}")
            ok = ok and good
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
