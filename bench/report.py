"""Summaries, target checks and the Markdown report of a bench run (stdlib only)."""

import statistics

CONTENDERS = ["direct", "adapter", "nginx"]


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def summarize(results):
    """Median (and min/max) per group, mode, workload, connection count and contender."""
    groups = {}
    for r in results["rows"]:
        key = (r["group"], r["mode"], r["workload"], r["conns"], r["contender"])
        groups.setdefault(key, []).append(r)
    out = []
    for (group, mode, wl, conns, contender), rs in groups.items():
        s = {"group": group, "mode": mode, "workload": wl, "conns": conns, "contender": contender, "n": len(rs),
             "rps": _med(r["rps"] for r in rs), "rps_range": _spread([r["rps"] for r in rs]),
             "cpu_s_per_10k": _med(r.get("cpu_s_per_10k") for r in rs),
             "cpu_range": _spread([r.get("cpu_s_per_10k") for r in rs]),
             "rss_peak_mib": (lambda v: v / 1024 if v is not None else None)(_med(r.get("rss_peak_kib") for r in rs)),
             "correct": all(r["correct"] for r in rs), "errors": sum(r["errors"] for r in rs)}
        if mode == "throughput":
            s["bytes_per_s"] = _med(r["bytes_per_s"] for r in rs)
            s["proxy_core_util"] = _med(r.get("proxy_core_util") for r in rs)
            s["core0_util"] = _med(r.get("core0_util") for r in rs)
        else:
            s["rate"] = rs[0]["rate"]
            # Repetitions where the load generator did not keep the rate are
            # left out of the medians (unless no repetition kept it).
            kept = [r for r in rs if not r.get("behind")] or rs
            s["behind"] = len(rs) - len([r for r in rs if not r.get("behind")])
            for k in ("p50", "p90", "p99", "p99.9"):
                s[k] = _med(r["latency_ms"][k] for r in kept)
            s["p99_range"] = _spread([r["latency_ms"]["p99"] for r in kept])
        out.append(s)
    return out


def _get(summary, group, mode, wl, conns, contender):
    for s in summary:
        if (s["group"], s["mode"], s["workload"], s["conns"], s["contender"]) == (group, mode, wl, conns, contender):
            return s
    return None


def _levels(summary, group, mode, wl):
    return sorted({s["conns"] for s in summary if (s["group"], s["mode"], s["workload"]) == (group, mode, wl)})


def targets(results):
    """The issue's targets, reported (never asserted): (name, measured, met)."""
    sm = results["summary"]
    g = "corpus"
    rows = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    for wl, need, label in (("json", 1.3, "small JSON"), ("links", 1.5, "rewritten HTML (links)"),
                            ("index", 1.5, "MLflow index.html (HTML rewriter, nothing to change)")):
        for conns in _levels(sm, g, "throughput", wl):
            a, n = _get(sm, g, "throughput", wl, conns, "adapter"), _get(sm, g, "throughput", wl, conns, "nginx")
            if not a or not n:
                continue
            cr = ratio(n["cpu_s_per_10k"], a["cpu_s_per_10k"])
            rr = ratio(a["rps"], n["rps"])
            if cr is None or rr is None:
                continue
            rows.append((f"{label}, {conns} conn: CPU/request ≤ 1/{need} of NGINX's, req/s not lower",
                         f"NGINX/adapter CPU per request {cr:.2f}x; req/s {rr:.2f}x",
                         cr >= need and rr >= 0.98))
    for conns in _levels(sm, g, "throughput", "bundle"):
        a, n = _get(sm, g, "throughput", "bundle", conns, "adapter"), _get(sm, g, "throughput", "bundle", conns, "nginx")
        if a and n and n["rps"]:
            r = a["rps"] / n["rps"]
            rows.append((f"MLflow bundle, {conns} conn: req/s ≥ 1.5x NGINX (aim 3x)", f"{r:.2f}x", r >= 1.5))
    for conns in _levels(sm, g, "throughput", "big"):
        a, d = _get(sm, g, "throughput", "big", conns, "adapter"), _get(sm, g, "throughput", "big", conns, "direct")
        n = _get(sm, g, "throughput", "big", conns, "nginx")
        if a and d and d["bytes_per_s"]:
            r = a["bytes_per_s"] / d["bytes_per_s"]
            extra = f" (NGINX {n['bytes_per_s'] / d['bytes_per_s'] * 100:.0f}%)" if n else ""
            rows.append((f"64 MiB artifact, {conns} conn: ≥ 90% of direct bandwidth",
                         f"{r * 100:.0f}% ({a['bytes_per_s'] / 1e6:.0f} of {d['bytes_per_s'] / 1e6:.0f} MB/s){extra}",
                         r >= 0.9))
    for s in sm:
        if s["group"] == g and s["mode"] == "latency" and s["contender"] == "adapter":
            n = _get(sm, g, "latency", s["workload"], s["conns"], "nginx")
            if n and n["p99"] is not None and s["p99"] is not None:
                rows.append((f"{s['workload']}: p99 at {s['rate']}/s fixed ≤ NGINX's",
                             f"{s['p99']:.2f} ms vs {n['p99']:.2f} ms", s["p99"] <= n["p99"]))
    rss = [s for s in sm if s["group"] == g and s["mode"] == "throughput" and s["contender"] == "adapter"
           and s["conns"] == 256 and s["rss_peak_mib"] is not None]
    if rss:
        worst = max(rss, key=lambda s: s["rss_peak_mib"])
        rows.append(("peak RSS ≤ 16 MiB at 256 connections",
                     f"{worst['rss_peak_mib']:.1f} MiB (worst: {worst['workload']})", worst["rss_peak_mib"] <= 16))
    return rows


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(results):
    m = results["meta"]
    sm = results["summary"]
    wls = results["workloads"]
    out = [f"# Flowgate adapter benchmark — {m['date']}", ""]
    out.append(f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average at start "
               f"{' '.join(m['loadavg_at_start'])}")
    out.append(f"- contenders: `direct` (no proxy), `adapter` (flowgate-adapter {m['adapter_rev']}, "
               f"`--threads 1`, rewriting on), `nginx` ({m['nginx']}, worker_processes 1, proxy_pass + sub_filter)")
    out.append(f"- upstream: nginx serving the bytes captured from MLflow {m.get('mlflow_corpus')} "
               f"(and, group `mlflow`, a real `mlflow server`, 1 worker); prefix `{m['prefix']}`")
    out.append(f"- core 0: upstream + load generator ({m['wrk']}; {m['oha'] or 'no oha'}); core 1: the proxy")
    out.append(f"- each point: {m['warmup_s']} s warm-up, {m['duration_s']} s measured, median of {m['reps']} "
               f"[min–max]; latency at a fixed rate = {m['rate_fraction']:.0%} of the slowest contender's "
               f"req/s (oha, latency-corrected); total {m.get('elapsed_s', '?')} s")
    out.append(f"- correctness: {m['checks']} body checks (status + sha256 against the expected "
               f"rewritten/untouched bytes), {len(m['failures'])} failures"
               + ("" if not m["failures"] else ": " + "; ".join(m["failures"][:5]))
               + ("" if not m.get("html_equal_by_content") else
                  "; HTML equal by parse, not byte for byte: " + ", ".join(m["html_equal_by_content"])
                  + " (lol_html re-serialises a rewritten tag: `<img .../>` becomes `<img ... />`)"))
    out.append("")
    if not m.get("smoke"):
        tg = targets(results)
        if tg:
            out += ["## Targets (reported, not asserted)", "", "| target | measured | met |", "|---|---|---|"]
            for name, measured, met in tg:
                out.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
            out.append("")
    for group, title in (("corpus", "Upstream: nginx serving MLflow's captured bytes"),
                         ("mlflow", "Upstream: a real `mlflow server` (end to end)")):
        rows = [s for s in sm if s["group"] == group]
        if not rows:
            continue
        out += [f"## {title}", "", "### Throughput (wrk, closed loop)", "",
                "| workload | conns | contender | req/s | [min–max] | MB/s | proxy CPU s / 10k req | "
                "proxy peak RSS MiB | proxy core | core 0 |",
                "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        order = list(dict.fromkeys(s["workload"] for s in rows))
        for wl in order:
            for conns in _levels(sm, group, "throughput", wl):
                for c in CONTENDERS:
                    s = _get(sm, group, "throughput", wl, conns, c)
                    if not s:
                        continue
                    lo, hi = s["rps_range"]
                    flag = "" if s["correct"] and not s["errors"] else " **WRONG**"
                    out.append(f"| {wl} | {conns} | {c}{flag} | {s['rps']:,.0f} | {lo:,.0f}–{hi:,.0f} | "
                               f"{s['bytes_per_s'] / 1e6:,.1f} | {_fmt(s['cpu_s_per_10k'], '.3f')} | "
                               f"{_fmt(s['rss_peak_mib'], '.1f')} | {_fmt(s['proxy_core_util'] and s['proxy_core_util'] * 100, '.0f')}"
                               f"{'%' if s['proxy_core_util'] is not None else ''} | {s['core0_util'] * 100:.0f}% |")
        lat = [s for s in rows if s["mode"] == "latency"]
        if lat:
            out += ["", "### Latency at a fixed rate (oha, latency-corrected, ms)", "",
                    "| workload | conns | rate/s | contender | p50 | p90 | p99 | p99.9 | p99 [min–max] | proxy CPU s / 10k req |",
                    "|---|---:|---:|---|---:|---:|---:|---:|---|---:|"]
            for wl in order:
                for conns in _levels(sm, group, "latency", wl):
                    for c in CONTENDERS:
                        s = _get(sm, group, "latency", wl, conns, c)
                        if not s:
                            continue
                        lo, hi = s["p99_range"]
                        flag = "" if s["correct"] and not s["errors"] else " **WRONG**"
                        if s.get("behind"):
                            flag += f" ({s['behind']} of {s['n']} runs left out: rate not kept)"
                        out.append(f"| {wl} | {conns} | {s['rate']} | {c}{flag} | {_fmt(s['p50'], '.2f')} | "
                                   f"{_fmt(s['p90'], '.2f')} | {_fmt(s['p99'], '.2f')} | {_fmt(s['p99.9'], '.2f')} | "
                                   f"{_fmt(lo, '.2f')}–{_fmt(hi, '.2f')} | {_fmt(s['cpu_s_per_10k'], '.3f')} |")
        out += ["", "Workloads: " + "; ".join(f"`{k}` {v['title']}" for k, v in wls.items() if k in order)
                if group == "corpus" else "", ""]
    out.append("`proxy core` is the proxy's CPU time over wall time (100% = its core is saturated); "
               "`core 0` the same for the upstream + load generator (near 100%: the numbers are bounded by "
               "core 0, compare CPU per request instead). NGINX's RSS is its worker's (the idle master "
               "shares most pages with it; the sum is in results.json).")
    return "\n".join(out) + "\n"
