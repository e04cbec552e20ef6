#!/usr/bin/env python3
"""Fill an MLflow tracking store with a small, deterministic demo.

Run it with the python of the MLflow venv you want the store written by:

    .cache/venvs/1.9.1/bin/python testenv/mlflow/populate.py --store /tmp/s/mlruns
    .cache/venvs/current/bin/python testenv/mlflow/populate.py --store /tmp/s/mlruns
    .cache/venvs/current/bin/python testenv/mlflow/populate.py --store /tmp/s --sqlite

Default layout is a file store: DIR *is* the mlruns/ folder (tracking URI file://DIR),
artifacts inside it (DIR/<exp>/<run>/artifacts).  With --sqlite: DIR/mlflow.db plus
DIR/artifacts/.

Works with MLflow 1.9.1 and 3.x (only APIs that exist in both are used; artifacts are
written to files and logged with log_artifact(s)).  Everything a test may assert is fixed:

  experiment "flowgate-demo": runs "demo-run-1" (accuracy ends at 0.9375),
                              "demo-run-2", "demo-run-3"
  experiment "flowgate-second": run "second-run-1"
  demo-run-1 artifacts: notes.txt, plots/accuracy.png, report.html, model/MLmodel,
                        model/weights.txt

The bytes of every artifact are fixed (see ARTIFACTS below); report.html contains
root-relative links on purpose so that a proxy which rewrites it is caught.

Prints a JSON summary (ids, artifact sha256) on stdout.  A second run against a store
that already has the experiment does nothing but print the summary again.
"""

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
import zlib

# MLflow 3.x refuses the file store without this (client side as well as server side).
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# Keep the client quiet and offline.
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "flowgate-demo"
SECOND_EXPERIMENT = "flowgate-second"
RUN = "demo-run-1"
FINAL_ACCURACY = 0.9375
STEPS = 20
# 2021-03-01T12:00:00Z, in ms: metric timestamps are fixed so histories are identical.
T0 = 1614600000000

NOTES_TXT = (
    "Flowgate demo run\n"
    "==================\n"
    "This text artifact was written by testenv/mlflow/populate.py.\n"
    "final accuracy: 0.9375\n"
)

# Known bytes: compared byte for byte after passing through the adapter.  The
# root-relative href/action values must come back untouched (an artifact is data,
# not the app's own page).  Nothing here makes a browser load anything.
REPORT_HTML = (
    "<!doctype html>\n"
    "<html lang=\"en\"><head><meta charset=\"utf-8\"><title>flowgate report</title></head>\n"
    "<body>\n"
    "<h1>flowgate-demo: demo-run-1</h1>\n"
    "<p>accuracy = 0.9375 \u00b5 \u2713</p>\n"
    "<a href=\"/static-files/not-rewritten\">root-relative link</a>\n"
    "<a href=\"/ajax-api/2.0/mlflow/runs/get\">api link</a>\n"
    "<form action=\"/get-artifact\"></form>\n"
    "</body></html>\n"
).encode("utf-8")

MLMODEL = (
    "artifact_path: model\n"
    "flavors:\n"
    "  flowgate_demo:\n"
    "    data: weights.txt\n"
    "    version: 1\n"
    "run_id: RUN_ID\n"
    "utc_time_created: '2021-03-01 12:00:00.000000'\n"
)


def accuracy_curve(final, steps=STEPS, start=0.5):
    """Rising curve start..final over `steps` points, exact at the last step."""
    vals = []
    for i in range(steps):
        frac = (i + 1) / steps
        vals.append(round(start + (final - start) * (1 - (1 - frac) ** 2), 6))
    vals[-1] = final
    return vals


def loss_curve(final_acc, steps=STEPS):
    return [round(1.2 * (1 - a) + 0.05 / (i + 1), 6) for i, a in enumerate(accuracy_curve(final_acc, steps))]


def png_plot(values, width=320, height=200):
    """A line plot of `values` as an RGB PNG, pure python (no matplotlib needed)."""
    bg, axis, line = (255, 255, 255), (60, 60, 60), (31, 119, 180)
    px = [[bg] * width for _ in range(height)]
    left, bottom, top, right = 30, height - 25, 15, width - 15
    for x in range(left, right + 1):
        px[bottom][x] = axis
    for y in range(top, bottom + 1):
        px[y][left] = axis
    lo, hi = 0.0, 1.0

    def pt(i, v):
        x = left + round(i * (right - left) / (len(values) - 1))
        y = bottom - round((v - lo) / (hi - lo) * (bottom - top))
        return x, y

    pts = [pt(i, v) for i, v in enumerate(values)]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            x = x0 + round((x1 - x0) * k / n)
            y = y0 + round((y1 - y0) * k / n)
            for dy in (-1, 0, 1):
                if 0 <= y + dy < height:
                    px[y + dy][x] = line
    for x, y in pts:
        for dx in (-2, -1, 0, 1, 2):
            for dy in (-2, -1, 0, 1, 2):
                px[y + dy][x + dx] = (214, 39, 40)
    raw = b"".join(b"\x00" + bytes(c for p in row for c in p) for row in px)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def get_experiment_id(client, name, artifact_location=None):
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id, False
    if artifact_location:
        return client.create_experiment(name, artifact_location=artifact_location), True
    return client.create_experiment(name), True


def run_ids_by_name(client, exp_id):
    out = {}
    # search_runs exists (with this signature) in 1.9.1 and 3.x
    for r in client.search_runs([exp_id], "", max_results=1000):
        name = r.data.tags.get("mlflow.runName") or getattr(r.info, "run_name", None)
        out[name] = r.info.run_id
    return out


def log_run(client, exp_id, name, params, tags, final_acc, artifacts=None):
    # client.create_run + explicit tags behaves the same on 1.9.1 and 3.x
    all_tags = {"mlflow.runName": name, "mlflow.user": "flowgate", "mlflow.source.name": "populate.py",
                "mlflow.source.type": "LOCAL"}
    all_tags.update(tags)
    run = client.create_run(exp_id, start_time=T0, tags=all_tags)
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, v)
    for i, (a, l) in enumerate(zip(accuracy_curve(final_acc), loss_curve(final_acc))):
        ts = T0 + 1000 * (i + 1)
        client.log_metric(rid, "accuracy", a, timestamp=ts, step=i)
        client.log_metric(rid, "loss", l, timestamp=ts, step=i)
    if artifacts:
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in artifacts.items():
                if isinstance(data, str):
                    data = data.replace("RUN_ID", rid).encode("utf-8")
                p = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    f.write(data)
            # one log_artifacts call keeps the sub-folders (plots/, model/)
            client.log_artifacts(rid, tmp)
    client.set_terminated(rid, "FINISHED", end_time=T0 + 1000 * (STEPS + 1))
    return rid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="file store folder (mlruns/), or with --sqlite the folder for mlflow.db + artifacts/")
    ap.add_argument("--sqlite", action="store_true", help="write DIR/mlflow.db with artifacts in DIR/artifacts")
    ap.add_argument("--summary", help="also write the JSON summary to this file")
    args = ap.parse_args()

    store = os.path.abspath(args.store)
    os.makedirs(store, exist_ok=True)
    if args.sqlite:
        uri = "sqlite:///" + os.path.join(store, "mlflow.db")
        art_root = os.path.join(store, "artifacts")
        os.makedirs(art_root, exist_ok=True)
    else:
        uri = "file://" + store
        art_root = None
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    png = png_plot(accuracy_curve(FINAL_ACCURACY))
    artifacts = {
        "notes.txt": NOTES_TXT,
        "plots/accuracy.png": png,
        "report.html": REPORT_HTML,
        "model/MLmodel": MLMODEL,
        "model/weights.txt": "w = [0.25, -1.5, 3.0]\nb = 0.125\n",
    }

    exp_id, created = get_experiment_id(
        client, EXPERIMENT, art_root and "file://" + os.path.join(art_root, EXPERIMENT)
    )
    if created:
        client.set_experiment_tag(exp_id, "project", "flowgate")
        base = {"optimizer": "adam", "batch_size": "32", "epochs": str(STEPS)}
        log_run(client, exp_id, RUN, dict(base, lr="0.001"), {"team": "flowgate", "dataset": "synthetic"},
                FINAL_ACCURACY, artifacts)
        log_run(client, exp_id, "demo-run-2", dict(base, lr="0.01"), {"team": "flowgate", "dataset": "synthetic"},
                0.875, {"notes.txt": "second run\n"})
        log_run(client, exp_id, "demo-run-3", dict(base, lr="0.1"), {"team": "flowgate", "dataset": "noisy"},
                0.8125)
        exp2, _ = get_experiment_id(
            client, SECOND_EXPERIMENT, art_root and "file://" + os.path.join(art_root, SECOND_EXPERIMENT)
        )
        log_run(client, exp2, "second-run-1", {"optimizer": "sgd", "lr": "0.05"}, {"team": "flowgate"}, 0.75)

    runs = run_ids_by_name(client, exp_id)
    summary = {
        "mlflow_version": mlflow.__version__,
        "tracking_uri": uri,
        "store": store,
        "experiment": {"name": EXPERIMENT, "id": exp_id},
        "second_experiment": {"name": SECOND_EXPERIMENT,
                              "id": client.get_experiment_by_name(SECOND_EXPERIMENT).experiment_id},
        "runs": runs,
        "run": {"name": RUN, "id": runs[RUN], "final_accuracy": FINAL_ACCURACY, "steps": STEPS,
                "artifact_uri": client.get_run(runs[RUN]).info.artifact_uri},
        "artifacts": {k: {"sha256": sha256(b), "size": len(b)}
                      for k, b in ((k, v if isinstance(v, bytes) else v.encode("utf-8")) for k, v in artifacts.items())
                      if k != "model/MLmodel"},
        "created": created,
    }
    text = json.dumps(summary, indent=2, sort_keys=True)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
