#!/usr/bin/python3
"""Plots resumptions/s against per-call token latency (docs/BENCHMARKS.md, "Network HSM").

    bench/latency_plot.py OUT.png LABEL=LATENCY.jsonl [LABEL=LATENCY.jsonl ...]

(Debian's /usr/bin/python3 with python3-matplotlib.)

Each input is a bench/latency.sh result (e.g. "before" from the on-demand
design, "after" from pre-armed operations). Plots, per input, the median
TLS 1.3 (solid) and TLS 1.2 (dashed) resumptions/s of one nginx worker
against the delay added to every token call, with the blocking model of
the on-demand design, 1/(calls x delay), for reference. Delay 0 is drawn
at 10 us (SoftHSM's own cost, about 20 us a call, is on every point).
"""
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ZERO_AT_US = 10.0


def micros(delay):
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if delay.endswith(unit):
            return float(delay[: -len(unit)]) * scale
    return float(delay) * 1e6


def series(path, tls):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    by_delay = {}
    for r in rows:
        if r["phase"] == "resume" and r["tls"] == tls:
            by_delay.setdefault(micros(r["delay"]), []).append(r["per_s"])
    xs = sorted(by_delay)
    return ([x if x > 0 else ZERO_AT_US for x in xs],
            [statistics.median(by_delay[x]) for x in xs])


def main():
    out = sys.argv[1]
    runs = [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    xmax = 0.0
    for (label, path), color in zip(runs, colors):
        for tls, style in (("1.3", "-"), ("1.2", "--")):
            xs, ys = series(path, tls)
            if xs:
                xmax = max(xmax, max(xs))
                ax.plot(xs, ys, style, marker="o", color=color,
                        label="%s, TLS %s" % (label, tls))
    model_x = [x for x in (50, 100, 200, 500, 1000, 2000, 5000) if x <= xmax]
    for calls, style in ((8, ":"), (4, "-.")):
        ax.plot(model_x, [1e6 / (calls * x) for x in model_x], style,
                color="gray",
                label="blocking model 1/(%d x latency)" % calls)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency added to every PKCS#11 call (us; 0 drawn at %g)"
                  % ZERO_AT_US)
    ax.set_ylabel("resumptions/s, one nginx worker, 8 clients")
    ax.set_title("hsmstek: ticket resumption against a slow (network) token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
