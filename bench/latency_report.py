#!/usr/bin/env python3
"""Summarises bench/latency.sh results (docs/BENCHMARKS.md, "Network HSM").

    latency_report.py LATENCY.jsonl

Prints, per per-call delay: handshakes/s of the TLS 1.3 and TLS 1.2
resumption load, the blocking model 1/(calls x delay) with the on-demand
design's calls (8 per TLS 1.3 resumption with renewal, 4 per TLS 1.2
resumption: every call a round trip on the event-loop thread), the probe's
p50/p99 and the round trips per handshake counted from the trace; then the
lines

    ratio nginx_tls13_resume_1ms_vs_blocking <x>
    ratio nginx_tls12_resume_1ms_vs_blocking <x>
    rtt tls13_resume <n>
    rtt tls12_resume <n>
    rtt tls13_full <n>

(rtt from the 1 ms run, else the largest delay measured; "n/a" when
missing). Several runs of a phase are reduced to their median.
"""
import json
import statistics
import sys

BLOCKING_CALLS = {"1.3": 8, "1.2": 4}


def seconds(delay):
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if delay.endswith(unit):
            return float(delay[: -len(unit)]) * scale
    return float(delay)


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    delays = sorted({r["delay"] for r in rows}, key=seconds)
    print("network HSM model: nginx, 1 worker, every token call delayed")
    print("%-7s %-4s %12s %10s %8s %10s %10s %6s %9s" % (
        "delay", "tls", "resumed/s", "blocking", "ratio", "probe p50",
        "probe p99", "rtt", "cpu us/hs"))
    lines = {}
    for delay in delays:
        d = seconds(delay)
        for tls in ("1.3", "1.2"):
            sel = [r for r in rows if r["delay"] == delay and
                   r["phase"] == "resume" and r["tls"] == tls]
            if not sel:
                continue
            per_s = median(sel, "per_s")
            blocking = 1.0 / (BLOCKING_CALLS[tls] * d) if d > 0 else None
            ratio = per_s / blocking if blocking else None
            cpu = median(sel, "cpu_us_per_handshake")
            print("%-7s %-4s %12.0f %10s %8s %8.1fms %8.1fms %6.2f %9s" % (
                delay, tls, per_s,
                "%.0f" % blocking if blocking else "-",
                "%.2f" % ratio if ratio else "-",
                median(sel, "probe_p50_ms"), median(sel, "probe_p99_ms"),
                median(sel, "rtt"), "%.0f" % cpu if cpu else "-"))
            if delay == "1ms" and ratio is not None:
                lines["ratio nginx_tls%s_resume_1ms_vs_blocking" %
                      tls.replace(".", "")] = "%.2f" % ratio
        full = [r for r in rows if r["delay"] == delay and r["phase"] == "full"]
        if full:
            print("%-7s %-4s %12s %10s %8s %10s %10s %6.2f   (full handshake, "
                  "2 tickets)" % (delay, "1.3", "-", "-", "-", "-", "-",
                                  median(full, "rtt")))
    # rtt lines: the 1 ms run, else the largest delay.
    pick = "1ms" if "1ms" in delays else (delays[-1] if delays else None)
    for name, phase, tls in (("tls13_resume", "resume", "1.3"),
                             ("tls12_resume", "resume", "1.2"),
                             ("tls13_full", "full", "1.3")):
        sel = [r for r in rows if r["delay"] == pick and r["phase"] == phase
               and r["tls"] == tls]
        value = median(sel, "rtt")
        lines["rtt " + name] = "%.2f" % value if value is not None else "n/a"
    for key in ("ratio nginx_tls13_resume_1ms_vs_blocking",
                "ratio nginx_tls12_resume_1ms_vs_blocking"):
        print("%s %s" % (key, lines.get(key, "n/a")))
    for key in ("rtt tls13_resume", "rtt tls12_resume", "rtt tls13_full"):
        print("%s %s" % (key, lines[key]))


if __name__ == "__main__":
    main()
