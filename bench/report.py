#!/usr/bin/env python3
"""Turns the raw results of scripts/bench.sh into the table and ratio lines.

Inputs (all written by scripts/bench.sh into one results directory):
  inproc.json   Google Benchmark JSON of hsmstek_bench: the paired benchmarks
                (pair/*, scaling/*) and the in-memory seal/open reference
  full.jsonl    hsmstek_bench --process-pair: one JSON line per process
                (plain, process-wide) with per-turn microseconds per handshake
  nginx.jsonl   one JSON object per nginx load run, the worker counters and
                peak RSS, or a line {"na": "<reason>"}
  meta.json     machine and version facts collected by bench.sh

Every figure is a median over repetitions (or turns); every ratio is a
ratio of medians. Paired benchmarks time each variant with the thread's CPU
clock and the wall clock; the ticket and resumption ratios use CPU time,
the 2-thread scaling and nginx ratios wall-clock throughput (see
docs/BENCHMARKS.md).
"""
import json
import os
import re
import statistics
import sys


def median(values):
    return statistics.median(values) if values else float("nan")


def load_gbench(path):
    """run_name -> list of per-repetition dicts (iteration runs only)."""
    with open(path) as f:
        data = json.load(f)
    runs = {}
    errors = []
    for b in data.get("benchmarks", []):
        if b.get("run_type") != "iteration":
            continue
        if b.get("error_occurred"):
            errors.append(f"{b['name']}: {b.get('error_message', '')}")
            continue
        scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}[b["time_unit"]]
        entry = {
            "real_ns": b["real_time"] * scale,  # wall time per operation
            "cpu_ns": b["cpu_time"] * scale,    # CPU time per operation
            "ips": b.get("items_per_second", float("nan")),
            "threads": b.get("threads", 1),
        }
        # User counters of the paired benchmarks (<variant>_cpu_us, ...).
        entry.update({k: v for k, v in b.items() if k.endswith(("_us", "_per_s"))})
        runs.setdefault(b["run_name"], []).append(entry)
    return data.get("context", {}), runs, errors


def key(name, threads=1):
    return f"{name}/real_time/threads:{threads}"


class InProc:
    def __init__(self, runs):
        self.runs = runs

    def has(self, name, threads=1):
        return key(name, threads) in self.runs

    def cpu_us(self, name, threads=1):
        return median([r["cpu_ns"] for r in self.runs.get(key(name, threads), [])]) / 1e3

    def wall_us(self, name, threads=1):
        return median([r["real_ns"] for r in self.runs.get(key(name, threads), [])]) / 1e3

    def per_cpu_s(self, name, threads=1):
        return 1e6 / self.cpu_us(name, threads)

    def per_wall_s(self, name, threads=1):
        return median([r["ips"] for r in self.runs.get(key(name, threads), [])])

    def counter(self, name, counter, threads=1):
        return median([r[counter] for r in self.runs.get(key(name, threads), [])
                       if counter in r])

    def reps(self, name, threads=1):
        return len(self.runs.get(key(name, threads), []))


def fmt(x, digits=1):
    if x != x:  # NaN
        return "n/a"
    return f"{x:,.{digits}f}"


def main():
    outdir = sys.argv[1]
    lines = []
    ratios = {}
    notes = []

    meta = {}
    if os.path.exists(os.path.join(outdir, "meta.json")):
        with open(os.path.join(outdir, "meta.json")) as f:
            meta = json.load(f)

    ctx, runs, errors = load_gbench(os.path.join(outdir, "inproc.json"))
    ip = InProc(runs)
    plain = ctx.get("ticket_plaintext_tls13", "?")
    reps = max((len(v) for v in runs.values()), default=0)

    lines.append("hsmstek benchmarks (scripts/bench.sh%s)" %
                 (" --quick" if meta.get("quick") else ""))
    for k in ("date", "cpu", "nproc", "memory", "load_before", "load_after",
              "openssl", "softhsm", "nginx"):
        if k in meta:
            lines.append(f"  {k:12} {meta[k]}")
    if "parallelism_before" in meta:
        lines.append(f"  {'parallelism':12} {meta['parallelism_before']} before, "
                     f"{meta.get('parallelism_after', '?')} after (openssl speed sha256: "
                     "2 processes / 1; 2.00 = two free CPUs)")
    lines.append(f"  {'repetitions':12} {reps} per in-process benchmark (randomly interleaved)")
    lines.append(f"  {'ticket':12} TLS 1.3 session plaintext {plain} bytes as sealed by "
                 f"libssl here (TLS 1.2: {ctx.get('ticket_plaintext_tls12', '?')}); "
                 "ticket = 16 name + 16 IV + CBC + 32 MAC")
    lines.append("")

    # [1]-[2] one ticket: paired runs (floor and hsmstek alternate).
    lines.append("[1-2] one ticket, microseconds per operation, paired: floor and hsmstek "
                 "alternate in batches")
    lines.append(f"      of 8 in one loop (median of {ip.reps('pair/seal')} repetitions; "
                 "CPU time of the thread, wall time)")
    lines.append(f"  {'':22}{'floor (raw PKCS#11)':>22}{'hsmstek (EVP+provider)':>25}"
                 f"{'hsmstek/floor':>16}")
    for op in ("seal", "open", "seal_cold", "open_cold"):
        name = f"pair/{op}"
        if not ip.has(name):
            continue
        f_cpu, f_wall = ip.counter(name, "floor_cpu_us"), ip.counter(name, "floor_wall_us")
        h_cpu, h_wall = ip.counter(name, "hsmstek_cpu_us"), ip.counter(name, "hsmstek_wall_us")
        label = op.replace("_cold", " (cold caches)")
        lines.append(f"  {label:22}{fmt(f_cpu) + ' | ' + fmt(f_wall):>22}"
                     f"{fmt(h_cpu) + ' | ' + fmt(h_wall):>25}"
                     f"{fmt(h_cpu / f_cpu, 3) + ' | ' + fmt(h_wall / f_wall, 3):>16}")
        if op in ("seal", "open"):
            ratios[f"{op}_vs_floor"] = h_cpu / f_cpu
    lines.append("  (cold caches: 8 MiB written before every operation, not timed, as a "
                 "handshake does between tickets)")
    lines.append("  in-memory keys (nginx-style callback, same libssl call pattern, separate "
                 f"benchmark): seal {fmt(ip.cpu_us('evp/seal/nginx_style'))}, "
                 f"open {fmt(ip.cpu_us('evp/open/nginx_style'))} us CPU")
    lines.append("")

    # [3] resumption, 1 thread: paired runs (variants rotate per handshake).
    lines.append("[3] in-process resumption handshakes per second, 1 thread, paired: the "
                 "server variants")
    lines.append("    rotate handshake by handshake in one loop (client + server in this "
                 f"process; median of {ip.reps('pair/resume/tls13')} repetitions)")
    variants = ("builtin", "nginx_style", "hsmstek", "builtin_scoped")
    lines.append(f"  {'':18}{'builtin':>11}{'nginx-style':>13}{'hsmstek':>11}"
                 f"{'hsmstek/builtin':>17}{'builtin, scoped routing':>25}")
    for tls, label in (("tls13", "TLS 1.3"), ("tls12", "TLS 1.2")):
        name = f"pair/resume/{tls}"
        for kind in ("cpu", "wall"):
            per_s = {v: 1e6 / ip.counter(name, f"{v}_{kind}_us") for v in variants}
            lines.append(f"  {label + ' /' + kind.upper().replace('WALL', 'wall') + '-s':18}"
                         f"{fmt(per_s['builtin'], 0):>11}{fmt(per_s['nginx_style'], 0):>13}"
                         f"{fmt(per_s['hsmstek'], 0):>11}"
                         f"{fmt(per_s['hsmstek'] / per_s['builtin'], 3):>17}"
                         f"{fmt(per_s['builtin_scoped'], 0) + ' (' + fmt(per_s['builtin_scoped'] / per_s['builtin'], 3) + ')':>25}")
            if kind == "cpu":
                ratios[f"{tls}_resume_vs_builtin"] = per_s["hsmstek"] / per_s["builtin"]
        # What the token alone allows: builtin's handshake with its software
        # ticket work replaced by the raw PKCS#11 floor (hot loop / cold caches).
        ops = ["open", "seal"] if tls == "tls13" else ["open"]
        b_us = ip.counter(name, "builtin_cpu_us")
        sw = sum(ip.cpu_us(f"evp/{o}/nginx_style") for o in ops)
        bounds = []
        for suffix in ("", "_cold"):
            floor = sum(ip.counter(f"pair/{o}{suffix}", "floor_cpu_us") for o in ops)
            bounds.append(b_us / (b_us - sw + floor))
        lines.append(f"  {'':18}bound if the ticket work cost exactly the floor "
                     f"({' + '.join(ops)}): {fmt(bounds[0], 3)} (hot), "
                     f"{fmt(bounds[1], 3)} (cold caches)")
    lines.append("")

    # [4] 2 threads: paired phases (1 thread, then 2 threads).
    lines.append("[4] 2 threads: phases of 1 thread and of 2 threads (sharing the server "
                 "SSL_CTX, the token)")
    lines.append("    alternate in one loop; operations per second, wall clock (median of "
                 f"{ip.reps('scaling/resume/tls13')} repetitions)")
    lines.append(f"  {'':28}{'1 thread':>10}{'2 threads':>11}{'scaling':>9}")
    scaling = {}
    for tls, label in (("tls13", "TLS 1.3"), ("tls12", "TLS 1.2")):
        name = f"scaling/resume/{tls}"
        for v in ("builtin", "nginx_style", "hsmstek"):
            t1 = ip.counter(name, f"{v}_1t_per_s")
            t2 = ip.counter(name, f"{v}_2t_per_s")
            lines.append(f"  {label + ' resume ' + v.replace('_', '-'):28}{fmt(t1, 0):>10}"
                         f"{fmt(t2, 0):>11}{fmt(t2 / t1, 2):>9}")
            if v == "hsmstek":
                scaling[tls] = t2 / t1
    for w in ("floor_seal", "hsmstek_seal", "floor_open", "hsmstek_open"):
        t1 = ip.counter("scaling/tickets", f"{w}_1t_per_s")
        t2 = ip.counter("scaling/tickets", f"{w}_2t_per_s")
        lines.append(f"  {'ticket ' + w.replace('_', ' '):28}{fmt(t1, 0):>10}{fmt(t2, 0):>11}"
                     f"{fmt(t2 / t1, 2):>9}")
    ratios["threads2_scaling"] = min(scaling.values()) if scaling else float("nan")
    builtin_scaling = [ip.counter(f"scaling/resume/{t}", "builtin_2t_per_s") /
                       ip.counter(f"scaling/resume/{t}", "builtin_1t_per_s")
                       for t in ("tls13", "tls12")]
    notes.append(f"threads2_scaling: OpenSSL's built-in tickets reached "
                 f"{fmt(min(builtin_scaling), 2)} in the same run (what the machine allowed)")
    lines.append("  threads2_scaling = the lower of hsmstek's TLS 1.3 and TLS 1.2 resumption "
                 "scaling; builtin's")
    lines.append("  shows what the machine allowed at the time, the floor's what SoftHSM "
                 "allows")
    lines.append("")

    # [5] full handshakes: two processes taking turns.
    pair = {}
    npairs = 0
    path = os.path.join(outdir, "full.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    o = json.loads(line)
                    kind = pair.setdefault(o["process_wide"], {})
                    if o["process_wide"] == 0:
                        npairs += 1
                    for name, v in o["variants"].items():
                        k = kind.setdefault(name, {"cpu_us": [], "wall_us": []})
                        k["cpu_us"] += v["cpu_us"]
                        k["wall_us"] += v["wall_us"]
    turns = len(next(iter(pair.get(0, {}).values()), {}).get("cpu_us", []))
    lines.append(f"[5] full handshakes per second: {npairs} pairs of processes, one plain and "
                 "one process-wide, take")
    lines.append(f"    turns ({turns} turns each in all, of 6 handshakes per variant; median "
                 "over turns)")
    lines.append(f"  {'':22}{'plain /CPU-s':>14}{'process-wide':>14}{'ratio':>8}"
                 f"{'plain /wall-s':>15}{'process-wide':>14}{'ratio':>8}")
    pw_ratios = []
    for tls, label in (("tls13", "TLS 1.3"), ("tls12", "TLS 1.2")):
        for variant in ("builtin", "hsmstek"):
            k = f"{tls}/{variant}"
            if k not in pair.get(0, {}) or k not in pair.get(1, {}):
                continue
            a, p = pair[0][k], pair[1][k]
            a_cpu, p_cpu = 1e6 / median(a["cpu_us"]), 1e6 / median(p["cpu_us"])
            a_w, p_w = 1e6 / median(a["wall_us"]), 1e6 / median(p["wall_us"])
            lines.append(f"  {label + ' ' + variant:22}{fmt(a_cpu, 0):>14}{fmt(p_cpu, 0):>14}"
                         f"{fmt(p_cpu / a_cpu, 3):>8}{fmt(a_w, 0):>15}{fmt(p_w, 0):>14}"
                         f"{fmt(p_w / a_w, 3):>8}")
            if variant == "builtin":
                pw_ratios.append(p_cpu / a_cpu)
    ratios["full_handshake_process_wide"] = min(pw_ratios) if pw_ratios else float("nan")
    lines.append("  builtin: OpenSSL's own tickets, so under process-wide routing every HMAC "
                 "of the process,")
    lines.append("  tickets included, goes through the delegating HMAC; the ratio line is the "
                 "lower of TLS 1.3/1.2")
    lines.append("")

    # [6] nginx.
    lines.append("[6] nginx 1 worker, loopback, resumption handshakes per second (median)")
    nginx_path = os.path.join(outdir, "nginx.jsonl")
    ng = {}
    rss = {}
    counters = {}
    na = None
    if os.path.exists(nginx_path):
        with open(nginx_path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                o = json.loads(line)
                if "na" in o:
                    na = o["na"]
                elif "rss_kb" in o:
                    rss = o["rss_kb"]
                elif "counters" in o:
                    counters = o["counters"]
                else:
                    ng.setdefault((o["tls"], o["variant"]), []).append(o)
    else:
        na = "nginx part not run"
    if na or not ng:
        lines.append(f"  n/a: {na or 'no results'}")
        ratios["nginx_resume_vs_builtin"] = None
        notes.append(f"nginx_resume_vs_builtin n/a ({na or 'no results'})")
    else:
        lines.append(f"  {'':14}{'builtin /s':>12}{'hsmstek /s':>12}{'ratio':>8}"
                     f"{'worker CPU us/handshake':>26}{'ratio':>8}{'resumed':>10}")
        ng_ratios = []
        ng_cpu_ratios = []
        for tls, tool in (("1.3", "hsmstek_tls_loader"), ("1.2", "openssl s_time -reuse")):
            b, h = ng.get((tls, "builtin"), []), ng.get((tls, "hsmstek"), [])
            if not b or not h:
                continue
            tb = median([x["handshakes"] / x["seconds"] for x in b])
            th = median([x["handshakes"] / x["seconds"] for x in h])
            cb = median([1e6 * x["worker_cpu_s"] / x["handshakes"] for x in b])
            ch = median([1e6 * x["worker_cpu_s"] / x["handshakes"] for x in h])
            res = min(x["resumed"] / max(x["handshakes"], 1) for x in b + h)
            lines.append(f"  {'TLS ' + tls:14}{fmt(tb, 0):>12}{fmt(th, 0):>12}{fmt(th / tb, 3):>8}"
                         f"{fmt(cb, 1) + ' | ' + fmt(ch, 1):>26}{fmt(cb / ch, 3):>8}"
                         f"{fmt(100 * res, 0) + '%':>10}  ({tool}, {len(b)}+{len(h)} runs)")
            ng_ratios.append(th / tb)
            ng_cpu_ratios.append(cb / ch)
        if counters:
            lines.append(f"  hsmstek worker counters: issued {counters.get('issued')}, "
                         f"resumed {counters.get('resumed')}, renewed {counters.get('renewed')}, "
                         f"token errors {counters.get('token_errors')}")
        if rss:
            lines.append(f"  worker peak RSS (VmHWM) after the same load: builtin "
                         f"{rss.get('builtin', '?')} kB, hsmstek {rss.get('hsmstek', '?')} kB")
        ratios["nginx_resume_vs_builtin"] = min(ng_ratios) if ng_ratios else None
        notes.append(f"nginx_resume_vs_builtin: the loader and nginx share the machine, so "
                     f"throughput also counts the client's time; the worker's own CPU ratio "
                     f"is {fmt(min(ng_cpu_ratios), 3)} (lower of TLS 1.3/1.2)")
    lines.append("")

    if errors:
        lines.append("ERRORS (benchmarks that failed):")
        lines += [f"  {e}" for e in errors]
        lines.append("")

    goals = {"seal_vs_floor": ("<=", 1.15), "open_vs_floor": ("<=", 1.15),
             "tls13_resume_vs_builtin": (">=", 0.90),
             "tls12_resume_vs_builtin": (">=", 0.90), "threads2_scaling": (">=", 1.7),
             "full_handshake_process_wide": (">=", 0.98),
             "nginx_resume_vs_builtin": (">=", 0.90)}
    lines.append("goals (docs/BENCHMARKS.md explains each miss and what bounds it):")
    for name, (op, goal) in goals.items():
        v = ratios.get(name)
        if v is None or v != v:
            verdict = "n/a"
        else:
            verdict = "met" if (v <= goal if op == "<=" else v >= goal) else "missed"
        lines.append(f"  {name:28} goal {op} {goal:<5} {verdict}")
        for n in notes:
            if n.startswith(name + ":"):
                lines.append(f"    {n[len(name) + 2:]}")
    lines.append("")

    print("\n".join(lines))
    for name in ("seal_vs_floor", "open_vs_floor", "tls13_resume_vs_builtin",
                 "tls12_resume_vs_builtin", "threads2_scaling",
                 "full_handshake_process_wide", "nginx_resume_vs_builtin"):
        v = ratios.get(name)
        if v is None or v != v:
            print(f"ratio {name} n/a")  # the reason is in the table above
        else:
            print(f"ratio {name} {v:.3f}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
