#!/usr/bin/env python3
"""bench/pageload_chart.py RESULTS_DIR: pageload.png from RESULTS_DIR/results.json.

One panel per page and cache state: the median time until the element was shown,
per link, contenders side by side, [min-max] as error bars, KiB on the wire above
each bar.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#9e9e9e", "adapter": "#1f77b4", "nginx": "#2ca02c"}
TITLES = {"runs": "runs table", "chart": "metric chart"}


def main(out):
    res = json.load(open(os.path.join(out, "results.json")))
    summ, meta = res["summary"], res["meta"]
    cs = meta["contenders"]
    links = list(meta["links"])
    panels = [(p, c) for p in TITLES for c in ("cold", "warm") if any(s["page"] == p and s["cache"] == c for s in summ)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
    width = 0.8 / len(cs)
    for ax, (page, cache) in zip(axes[0], panels):
        for i, c in enumerate(cs):
            xs, ys, lo, hi, kib = [], [], [], [], []
            for j, lk in enumerate(links):
                s = next((s for s in summ if (s["page"], s["cache"], s["link"], s["contender"]) == (page, cache, lk, c)), None)
                if not s or s["ready_ms"] is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(s["ready_ms"] / 1e3)
                lo.append((s["ready_ms"] - s["ready_min"]) / 1e3)
                hi.append((s["ready_max"] - s["ready_ms"]) / 1e3)
                kib.append(s["bytes_at_ready"] / 1024)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=COLORS.get(c), label=c)
            for x, y, k in zip(xs, ys, kib):
                ax.text(x, y, f"{k / 1024:.1f}M" if k >= 1024 else f"{k:.0f}K", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(links)), links, fontsize=8)
        ax.set_title(f"{TITLES[page]}, {cache} cache", fontsize=10)
        ax.set_ylabel("seconds to element shown (median)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"MLflow {meta['mlflow_version']} page loads, Chromium {meta['chromium']} with CDP network emulation "
                 f"(labels: bytes on the wire)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pageload.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
