#!/usr/bin/env python3
"""bench/charts.py RESULTS_DIR: PNG charts from RESULTS_DIR/results.json (matplotlib).

throughput.png  requests/s per workload (one panel each), contenders side by side
                per connection count (the MB/s for the 64 MiB artifact)
latency.png     p99 (and p50) at a fixed rate per workload and contender
cpu.png         the proxy's CPU seconds per 10k requests per workload
mlflow.png      the same req/s and p99 against a real mlflow server
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#9e9e9e", "adapter": "#1f77b4", "nginx": "#2ca02c"}
CONTENDERS = ["direct", "adapter", "nginx"]


def panels(n):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat


def bars(ax, summary, group, wl, value, contenders, ylabel, err=None):
    levels = sorted({s["conns"] for s in summary if s["group"] == group and s["workload"] == wl
                     and s["mode"] == "throughput"})
    width = 0.8 / len(contenders)
    for i, c in enumerate(contenders):
        xs, ys, lo, hi = [], [], [], []
        for j, lvl in enumerate(levels):
            s = next((s for s in summary if (s["group"], s["mode"], s["workload"], s["conns"], s["contender"])
                      == (group, "throughput", wl, lvl, c)), None)
            v = value(s) if s else None
            if v is None:
                continue
            xs.append(j + (i - (len(contenders) - 1) / 2) * width)
            ys.append(v)
            if err and s:
                a, b = err(s)
                lo.append(max(0, v - a))
                hi.append(max(0, b - v))
        if xs:
            ax.bar(xs, ys, width, label=c, color=COLORS[c],
                   yerr=[lo, hi] if err and lo else None, capsize=2)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{lvl} conn" for lvl in levels])
    ax.set_ylabel(ylabel)


def throughput_chart(res, group, path, title):
    sm = res["summary"]
    wls = list(dict.fromkeys(s["workload"] for s in sm if s["group"] == group and s["mode"] == "throughput"))
    if not wls:
        return
    fig, axes = panels(len(wls))
    for ax, wl in zip(axes, wls):
        if wl == "big":
            bars(ax, sm, group, wl, lambda s: s["bytes_per_s"] / 1e6, CONTENDERS, "MB/s")
        else:
            bars(ax, sm, group, wl, lambda s: s["rps"], CONTENDERS, "requests/s",
                 err=lambda s: s["rps_range"])
        ax.set_title(wl)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_chart(res, path):
    sm = res["summary"]
    wls = list(dict.fromkeys(s["workload"] for s in sm if s["group"] == "corpus" and s["mode"] == "throughput"))
    fig, axes = panels(len(wls))
    for ax, wl in zip(axes, wls):
        bars(ax, sm, "corpus", wl, lambda s: s["cpu_s_per_10k"], ["adapter", "nginx"], "proxy CPU s / 10k req",
             err=lambda s: s["cpu_range"])
        ax.set_title(wl)
    axes[0].legend(fontsize=8)
    fig.suptitle("Proxy CPU per request (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_chart(res, group, path, title):
    sm = [s for s in res["summary"] if s["group"] == group and s["mode"] == "latency"]
    if not sm:
        return
    wls = list(dict.fromkeys(s["workload"] for s in sm))
    fig, axes = panels(len(wls))
    for ax, wl in zip(axes, wls):
        rows = [s for s in sm if s["workload"] == wl]
        names = [c for c in CONTENDERS if any(s["contender"] == c for s in rows)]
        for i, c in enumerate(names):
            s = next(s for s in rows if s["contender"] == c)
            lo, hi = s["p99_range"]
            ax.bar(i, s["p99"], 0.6, color=COLORS[c], label=c,
                   yerr=[[max(0, s["p99"] - lo)], [max(0, hi - s["p99"])]], capsize=3)
            ax.plot([i - 0.3, i + 0.3], [s["p50"], s["p50"]], color="black", lw=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylabel("p99 latency, ms (line: p50)")
        ax.set_title(f"{wl} @ {rows[0]['rate']}/s, {rows[0]['conns']} conn")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    out = sys.argv[1]
    res = json.load(open(os.path.join(out, "results.json")))
    throughput_chart(res, "corpus", os.path.join(out, "throughput.png"),
                     "Throughput, upstream = nginx serving MLflow's bytes (higher is better)")
    latency_chart(res, "corpus", os.path.join(out, "latency.png"),
                  "p99 latency at a fixed rate (lower is better)")
    cpu_chart(res, os.path.join(out, "cpu.png"))
    if any(s["group"] == "mlflow" for s in res["summary"]):
        throughput_chart(res, "mlflow", os.path.join(out, "mlflow-throughput.png"),
                         "Throughput, upstream = real mlflow server")
        latency_chart(res, "mlflow", os.path.join(out, "mlflow-latency.png"),
                      "p99 latency at a fixed rate, real mlflow server")
    print(f"charts: written to {out}")


if __name__ == "__main__":
    main()
