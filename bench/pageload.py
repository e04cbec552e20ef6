#!/usr/bin/env python3
"""Page loads as a user feels them: MLflow's runs table and a metric chart in
Debian's Chromium over an emulated link, through flowgate-adapter, through NGINX
configured as the paper's adapter, and direct.

Run through `bench/pageload` (which builds the adapter first). This script
populates an MLflow store (testenv/mlflow/populate.py), starts `mlflow server`
(one worker, core 0) and the contenders exactly as bench/harness.py does
(adapter --threads 1 and nginx with PROXY_HTTP, both on core 1), then runs
bench/pageload.mjs (playwright-core + CDP network emulation) and writes the
medians as a table (results.md), results.json and a chart (pageload.png, with
bench/.venv's matplotlib).
"""

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import harness  # noqa: E402

LINKS = {
    "20ms/100Mbit": {"latency_ms": 20, "down_mbit": 100, "up_mbit": 100},
    "80ms/20Mbit": {"latency_ms": 80, "down_mbit": 20, "up_mbit": 20},
    "150ms/5Mbit": {"latency_ms": 150, "down_mbit": 5, "up_mbit": 5},
}
CACHES = ["cold", "warm"]
PAGE_TITLES = {"runs": "experiment page: runs table", "chart": "run page: metric chart"}


def pages(exp_id, run_id):
    return [
        # the experiment's runs table, a row showing demo-run-1's link
        {"name": "runs", "path": f"#/experiments/{exp_id}/runs", "selector": ".ag-row a", "text": "demo-run-1"},
        # the run's model-metrics tab, a plotly line with its path drawn
        {"name": "chart", "path": f"#/experiments/{exp_id}/runs/{run_id}/model-metrics",
         "selector": ".js-plotly-plot .scatterlayer path.js-line", "attr": "d"},
    ]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rows):
    out = []
    keys = sorted({(r["page"], r["cache"], r["link"], r["contender"]) for r in rows})
    for page, cache, link, c in keys:
        rs = [r for r in rows if (r["page"], r["cache"], r["link"], r["contender"]) == (page, cache, link, c)]
        t = [r["ready_ms"] for r in rs if r["ready_ms"] is not None]
        out.append({
            "page": page, "cache": cache, "link": link, "contender": c, "runs": len(rs), "shown": len(t),
            "ready_ms": median(t), "ready_min": min(t) if t else None, "ready_max": max(t) if t else None,
            "bytes_at_ready": median([r["at_ready"]["bytes"] for r in rs]),
            "requests_at_ready": median([r["at_ready"]["requests"] for r in rs]),
            "bytes_total": median([r["total"]["bytes"] for r in rs]),
            "requests_total": median([r["total"]["requests"] for r in rs]),
            "from_cache": median([r["total"]["from_cache"] for r in rs]),
            "not_modified": median([r["total"]["not_modified"] for r in rs]),
            "static_encodings": sorted({e for r in rs for e in r["static"]["encodings"]}),
        })
    return out


def fmt_ms(s):
    if s["ready_ms"] is None:
        return "not shown"
    if s["runs"] > 1:
        return f"{s['ready_ms'] / 1e3:.2f} s [{s['ready_min'] / 1e3:.2f}–{s['ready_max'] / 1e3:.2f}]"
    return f"{s['ready_ms'] / 1e3:.2f} s"


def markdown(results):
    m = results["meta"]
    summ = results["summary"]
    cs = m["contenders"]
    lines = [f"# Page loads over an emulated link ({m['date']})", "",
             f"MLflow {m['mlflow_version']} (one worker), Chromium {m['chromium']}, adapter `{m['adapter_rev']}`, "
             f"{m['nginx']}. Median of {m['reps']} runs [min–max]; time from navigation start to the element "
             f"in the DOM; bytes = CDP encodedDataLength (headers included) up to that moment; "
             f"requests = requests issued up to that moment (cached ones included). "
             f"Load average at start: {' '.join(m['loadavg_at_start'])} on {m['cores']} cores (shared machine: "
             f"JS parse and render time is inflated and noisy; the emulated link dominates cold loads).", ""]
    for page in [p for p in PAGE_TITLES if any(s["page"] == p for s in summ)]:
        for cache in CACHES:
            rows = [s for s in summ if s["page"] == page and s["cache"] == cache]
            if not rows:
                continue
            lines += [f"## {PAGE_TITLES[page]}, {cache} cache", "",
                      "| link | " + " | ".join(f"{c} time" for c in cs) + " | " + " | ".join(f"{c} KiB" for c in cs)
                      + " | requests (" + "/".join(cs) + ") | from cache (" + "/".join(cs) + ") |",
                      "|---|" + "---:|" * (2 * len(cs) + 2)]
            for link in [lk for lk in LINKS if any(s["link"] == lk for s in rows)]:
                by = {s["contender"]: s for s in rows if s["link"] == link}
                cell = lambda c, f: f(by[c]) if c in by else "—"  # noqa: E731
                lines.append(f"| {link} | " + " | ".join(cell(c, fmt_ms) for c in cs) + " | "
                             + " | ".join(cell(c, lambda s: f"{s['bytes_at_ready'] / 1024:,.0f}") for c in cs) + " | "
                             + "/".join(cell(c, lambda s: f"{s['requests_at_ready']:.0f}") for c in cs) + " | "
                             + "/".join(cell(c, lambda s: f"{s['from_cache']:.0f}") for c in cs) + " |")
            lines.append("")
    enc = {}
    for s in summ:
        if s["cache"] == "cold":
            enc.setdefault(s["contender"], set()).update(s["static_encodings"])
    lines += ["Content-Encoding of static files as received: "
              + "; ".join(f"{c}: {', '.join(sorted(enc.get(c, []))) or '—'}" for c in cs) + ".", ""]
    hdr = m.get("bundle_headers", {})
    if hdr:
        lines += ["Main bundle as Chromium fetched it (cold):", "",
                  "| contender | KiB on the wire | Content-Encoding | Cache-Control | ETag |", "|---|---:|---|---|---|"]
        for c in cs:
            h = hdr.get(c)
            if h:
                lines.append(f"| {c} | {h['bytes'] / 1024:,.0f} | {h['encoding'] or 'identity'} | "
                             f"{h['cache_control'] or '—'} | {'yes' if h['etag'] else '—'} |")
        lines.append("")
    docs = m.get("document_headers", {})
    if docs:
        lines += ["index.html (the document) as Chromium fetched it, cold / warm:", "",
                  "| contender | cold: status, bytes, encoding | warm: bytes on the wire (headers only = 304) "
                  "| Cache-Control | ETag |",
                  "|---|---|---|---|---|"]
        for c in cs:
            d = docs.get(c, {})
            cold, warm = d.get("cold"), d.get("warm")
            if cold:
                lines.append(f"| {c} | {cold['status']}, {cold['bytes']}, {cold['encoding'] or 'identity'} | "
                             + (f"{warm['bytes']}" if warm else "—")
                             + f" | {cold['cache_control'] or '—'} | {'yes' if cold['etag'] else '—'} |")
        lines.append("")
    if m["failures"]:
        lines += ["**Failures:**", ""] + [f"- {f}" for f in m["failures"]] + [""]
    return "\n".join(lines)


def chromium_version():
    try:
        out = subprocess.run([os.environ.get("FLOWGATE_CHROMIUM", "/usr/bin/chromium"), "--version"],
                             capture_output=True, text=True, timeout=30).stdout
        return out.split()[1] if out else "?"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="one link, one run per contender, cold and warm; fails if an element never appears")
    ap.add_argument("--reps", type=int, default=None, help="runs per cell (default 3, smoke 1)")
    ap.add_argument("--links", help=f"comma list of {', '.join(LINKS)} (default all; smoke 20ms/100Mbit)")
    ap.add_argument("--pages", default="runs,chart")
    ap.add_argument("--contenders", default=",".join(harness.CONTENDERS))
    ap.add_argument("--timeout", type=int, default=120, help="seconds until an element must be shown")
    ap.add_argument("--adapter-bin", default=os.path.join(ROOT, "target/release/flowgate-adapter"))
    ap.add_argument("--out", help="results directory (default bench/results/<date>-pageload, none with --smoke)")
    args = ap.parse_args()
    reps = args.reps or (1 if args.smoke else 3)
    links = (args.links or ("20ms/100Mbit" if args.smoke else ",".join(LINKS))).split(",")
    for lk in links:
        if lk not in LINKS:
            ap.error(f"unknown link {lk}")
    names = args.contenders.split(",")

    info = harness.machine_info({}, args.adapter_bin)
    work = tempfile.mkdtemp(prefix="flowgate-pageload.")
    rows_file = os.path.join(work, "rows.jsonl")
    venv = subprocess.run([os.path.join(ROOT, "testenv/mlflow/venv"), "current"], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    store = os.path.join(work, "mlruns")
    summary = json.loads(subprocess.run(
        [os.path.join(venv, "bin/python"), os.path.join(ROOT, "testenv/mlflow/populate.py"), "--store", store],
        check=True, capture_output=True, text=True).stdout)
    port = harness.free_port()
    srv = harness.Proc("mlflow", ["taskset", "-c", "0", os.path.join(ROOT, "testenv/mlflow/serve"), "current",
                                  store, str(port)], log=os.path.join(work, "mlflow.log"))
    contenders = {}
    status = 0
    try:
        harness.wait_port(port, srv.proc, timeout=120, path="/health")
        contenders = harness.start_contenders(work, port, args.adapter_bin, names)
        cfg = {
            "contenders": [{"name": c.name, "base": f"http://127.0.0.1:{c.port}{c.base()}/"} for c in contenders.values()],
            "pages": [p for p in pages(summary["experiment"]["id"], summary["run"]["id"])
                      if p["name"] in args.pages.split(",")],
            "links": [dict(LINKS[lk], name=lk) for lk in links],
            "caches": CACHES, "reps": reps, "timeout_ms": args.timeout * 1000,
            "quiet_ms": 500, "settle_max_ms": 10000 if args.smoke else 20000,
            "out": rows_file,
        }
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump(cfg, f)
        print(f"pageload: mlflow {summary['mlflow_version']} :{port}, "
              + ", ".join(f"{c['name']} {c['base']}" for c in cfg["contenders"]), file=sys.stderr, flush=True)
        r = subprocess.run(["node", os.path.join(HERE, "pageload.mjs"), os.path.join(work, "config.json")])
        if r.returncode != 0:
            print(f"pageload: the browser driver failed ({r.returncode})", file=sys.stderr)
            status = 1
    finally:
        for c in contenders.values():
            c.stop()
        srv.stop()

    rows = [json.loads(line) for line in open(rows_file)] if os.path.exists(rows_file) else []
    failures = [f"{r['contender']} {r['page']} {r['cache']} {r['link']} rep{r['rep']}: not shown ({r['error']})"
                for r in rows if r["ready_ms"] is None]
    # MLflow's own 404 (no auth app: /users/current) is there without any proxy too
    failures += [f"{r['contender']} {r['page']} {r['cache']} {r['link']} rep{r['rep']}: {e}"
                 for r in rows for e in r["errors"] if not e.endswith("/ajax-api/2.0/mlflow/users/current")]
    want = len(names) * len(cfg["pages"]) * len(links) * len(CACHES) * reps
    if len(rows) != want:
        failures.append(f"{len(rows)} measurements, want {want}")
    bundle = {}
    for r in rows:
        if r["cache"] == "cold" and r["largest"] and "/static-files/" in r["largest"]["path"]:
            bundle.setdefault(r["contender"], r["largest"])
    docs = {}
    for r in rows:
        if r.get("document"):
            docs.setdefault(r["contender"], {}).setdefault(r["cache"], r["document"])
    results = {
        "meta": dict(info, date=dt.datetime.now().isoformat(timespec="seconds"), prefix=harness.PREFIX,
                     mlflow_version=summary["mlflow_version"], chromium=chromium_version(), reps=reps,
                     links={lk: LINKS[lk] for lk in links}, pages=cfg["pages"], contenders=names,
                     smoke=args.smoke, failures=failures, bundle_headers=bundle, document_headers=docs,
                     emulation="Network.emulateNetworkConditions (CDP): latency added per request, "
                               "throughput shaped per browser target; no TCP handshake or slow-start model"),
        "summary": summarize(rows),
        "rows": rows,
    }
    md = markdown(results)
    print(md)
    out = args.out
    if out is None and not args.smoke:
        out = os.path.join(HERE, "results", dt.date.today().isoformat() + "-pageload")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(md)
        print(f"pageload: results in {out}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"pageload: FAILED: {len(failures)}", file=sys.stderr)
        for f in failures[:20]:
            print("  " + f, file=sys.stderr)
        return 1
    if status == 0:
        print(f"pageload: {len(rows)} page loads, every element shown through {', '.join(names)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
