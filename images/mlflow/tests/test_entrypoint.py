"""Tests of images/mlflow/flowgate-mlflow, the MLflow entrypoint.

Plain unittest (no pytest needed). Run through testenv/manifests/test-entrypoint,
which makes the MLflow venvs and closes with `entrypoint: N passed, M failed`:

    testenv/manifests/test-entrypoint            # everything
    testenv/manifests/test-entrypoint -k Unit    # unittest -k patterns

Two kinds of tests:
- Unit*: the store finder and the relocation logic on synthetic stores, imported
  in-process (needs PyYAML: run with an MLflow venv's python);
- Served*: real stores written by testenv/mlflow/populate.py with MLflow 3.x and
  1.9.1, MOVED elsewhere (so every recorded artefact location is stale), served by
  the entrypoint on a free loopback port with the real `mlflow server`, and checked
  through MLflow's REST API: experiments, runs, metric history, artefact listing and
  byte-exact artefact downloads. One test first serves a moved store without the
  entrypoint to show the 404 it fixes; two run the entrypoint like a pod (read-only
  root filesystem, an arbitrary UID in group 0, only the store and /tmp writable:
  a private mount namespace, root only).
"""

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
ENTRY = os.path.join(ROOT, "images", "mlflow", "flowgate-mlflow")
POPULATE = os.path.join(ROOT, "testenv", "mlflow", "populate.py")
SERVE = os.path.join(ROOT, "testenv", "mlflow", "serve")
# Not below /tmp: the pod-like tests mount a private /tmp over it.
WORK = os.environ.get("FLOWGATE_TEST_TMP") or os.path.join(ROOT, "target", "entrypoint-tests")
START_TIMEOUT = float(os.environ.get("FLOWGATE_TEST_START_TIMEOUT", "120"))
SANDBOX_UID = 54321

_venvs = {}


def venv(name):
    if name not in _venvs:
        out = subprocess.run([os.path.join(ROOT, "testenv", "mlflow", "venv"), name],
                             check=True, capture_output=True, text=True)
        _venvs[name] = out.stdout.strip().splitlines()[-1]
    return _venvs[name]


def py(name):
    return os.path.join(venv(name), "bin", "python")


def load_entrypoint():
    sys.dont_write_bytecode = True  # no __pycache__ beside the entrypoint
    loader = importlib.machinery.SourceFileLoader("flowgate_mlflow", ENTRY)
    spec = importlib.util.spec_from_loader("flowgate_mlflow", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_left(pgid, wait=5.0):
    """Live (not zombie) processes of a process group, after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:150]
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                left.append(f"{name} {fields[0]} {cmd}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def quiet_env(**extra):
    e = dict(os.environ)
    e.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", GIT_PYTHON_REFRESH="quiet",
             PYTHONWARNINGS="ignore")
    e.update(extra)
    return e


def populate(name, store, sqlite=False):
    """Writes the demo store with MLflow `name`; returns populate.py's summary."""
    os.makedirs(os.path.dirname(store), exist_ok=True)
    args = [py(name), POPULATE, "--store", store] + (["--sqlite"] if sqlite else [])
    # cwd: MLflow puts the Default experiment's artefacts at ./mlruns
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=quiet_env(),
                         cwd=os.path.dirname(store))
    return json.loads(out.stdout)


def snapshot(top):
    """Bytes of every metadata file and a dump of every database below `top`."""
    snap = {}
    for d, _, files in os.walk(top):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith(".db"):
                con = sqlite3.connect(p)
                snap[p] = "\n".join(con.iterdump())
                con.close()
            elif f.endswith(".yaml") or "/tags/" in p:
                with open(p, "rb") as fh:
                    snap[p] = fh.read()
    return snap


class Http:
    def __init__(self, port, prefix=""):
        self.base = f"http://127.0.0.1:{port}{prefix}"

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, method, path, body=None):
        status, data = self.call(method, path, body)
        if status != 200:
            raise AssertionError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data)


class Server:
    """A process serving on `port`, with its log in a file."""

    def __init__(self, argv, port, log_path, env=None, prefix=""):
        self.port, self.log_path = port, log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or quiet_env(),
                                     start_new_session=True)
        self.http = Http(port, prefix)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.http.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server not up after {START_TIMEOUT:g}s:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self, n=40):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])

    def stop(self, sig=signal.SIGTERM, timeout=30, group=False):
        """Signals the process itself, as the kubelet signals PID 1; or, with `group`,
        its whole process group, as the local backend stops an instance."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        return rc

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ unit tests


class UnitLocations(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m = load_entrypoint()

    def test_parse_local(self):
        p = self.m.parse_local
        self.assertEqual(p("file:///a%20b/mlruns/1"), ("file", "/a b/mlruns/1"))
        self.assertEqual(p("file:/a/b"), ("file", "/a/b"))
        self.assertEqual(p("/tmp/x/artifacts"), ("plain", "/tmp/x/artifacts"))
        self.assertEqual(p("./mlruns/0"), ("plain", "./mlruns/0"))
        self.assertEqual(p("C:/Users/x/mlruns/1"), ("plain", "C:/Users/x/mlruns/1"))
        for remote in ("mlflow-artifacts:/1/abc/artifacts", "mlflow-artifacts://h:5000/1/a",
                       "s3://bucket/x", "https://h/x", "gs://b/x", "runs:/abc/model", "models:/m/1", "", None):
            self.assertIsNone(p(remote), remote)

    def test_to_location_round_trips(self):
        for path in ("/data/store/mlruns/1/r/artifacts", "/a b/ü#%/x"):
            uri = self.m.to_location("file", path)
            self.assertTrue(uri.startswith("file:///"))
            self.assertEqual(self.m.parse_local(uri), ("file", path))

    def test_remap(self):
        with tempfile.TemporaryDirectory() as top:
            os.makedirs(os.path.join(top, "mlruns", "1", "r" * 32, "artifacts"))
            rel = self.m.Relocator(top, [])
            rel.learn_from_layout("file:///scratch/job/mlruns/1/" + "r" * 32 + "/artifacts",
                                  ("1", "r" * 32), os.path.join(top, "mlruns"), "t")
            new = rel.remap("file:///scratch/job/mlruns/1")
            self.assertEqual(new, "file://" + os.path.join(top, "mlruns", "1"))
            # plain paths stay plain
            self.assertEqual(rel.remap("/scratch/job/mlruns/2/x"), os.path.join(top, "mlruns", "2", "x"))
            # idempotent: what it wrote is inside, so stays
            self.assertIsNone(rel.remap(new))
            # remote and proxied locations are never touched
            self.assertIsNone(rel.remap("s3://b/scratch/job/mlruns/1"))
            self.assertIsNone(rel.remap("mlflow-artifacts:/1/abc/artifacts"))
            # unmatched and outside: contained, never outside the store
            out = rel.remap("file:///etc")
            self.assertEqual(out, "file://" + os.path.join(top, ".flowgate-outside", "etc"))
            self.assertIsNone(rel.remap(out))
            out = rel.remap("/home/u/../../etc/passwd")
            self.assertTrue(out.startswith(os.path.join(top, ".flowgate-outside") + "/"), out)
            # relative locations become absolute inside the store
            self.assertEqual(rel.remap("mlruns/1"), os.path.join(top, "mlruns", "1"))

    def test_allowed_roots_stay(self):
        with tempfile.TemporaryDirectory() as top, tempfile.TemporaryDirectory() as shared:
            rel = self.m.Relocator(top, [shared])
            self.assertIsNone(rel.remap("file://" + shared + "/job/artifacts"))
            self.assertIsNotNone(rel.remap("file:///elsewhere/job/artifacts"))

    def test_learn_from_disk_needs_the_identity(self):
        with tempfile.TemporaryDirectory() as top:
            rid = "a" * 32
            os.makedirs(os.path.join(top, "job", "artifacts", "exp", rid, "artifacts"))
            rel = self.m.Relocator(top, [])
            bases = self.m.parent_chain(os.path.join(top, "job"), top)
            self.assertFalse(rel.learn_from_disk("/old/place/artifacts/exp/x/artifacts", rid, bases, "t"))
            self.assertTrue(rel.learn_from_disk(f"/old/place/artifacts/exp/{rid}/artifacts", rid, bases, "t"))
            self.assertEqual(rel.remap("file:///old/place/artifacts/exp"),
                             "file://" + os.path.join(top, "job", "artifacts", "exp"))

    def test_rewrite_yaml_keeps_other_lines(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "meta.yaml")
            text = ("artifact_uri: 'file:///old place/with: colon/artifacts'\n"
                    "end_time: 1614600021000\n"
                    "experiment_id: '1'\n"
                    "name: ''\n"
                    "tags: []\n")
            with open(p, "w") as f:
                f.write(text)
            self.m.rewrite_yaml(p, {"artifact_uri": "file:///new place/with: colon/artifacts"})
            with open(p) as f:
                out = f.read()
            import yaml

            self.assertEqual(yaml.safe_load(out)["artifact_uri"], "file:///new place/with: colon/artifacts")
            self.assertEqual(out.splitlines()[1:], text.splitlines()[1:])


class UnitFindStore(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.m = load_entrypoint()

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def file_store(self, path, runs=1):
        os.makedirs(path, exist_ok=True)
        e = os.path.join(path, "1")
        os.makedirs(e, exist_ok=True)
        with open(os.path.join(e, "meta.yaml"), "w") as f:
            f.write("artifact_location: file:///old/mlruns/1\nexperiment_id: '1'\nlifecycle_stage: active\nname: x\n")
        for i in range(runs):
            rid = f"{i:032x}"
            os.makedirs(os.path.join(e, rid, "artifacts"))
            with open(os.path.join(e, rid, "meta.yaml"), "w") as f:
                f.write(f"artifact_uri: file:///old/mlruns/1/{rid}/artifacts\nexperiment_id: '1'\n"
                        f"run_id: {rid}\nrun_uuid: {rid}\n")
        return path

    def db(self, path, runs=1):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        con = sqlite3.connect(path)
        con.execute("create table experiments (experiment_id integer primary key, name text, artifact_location text)")
        con.execute("create table runs (run_uuid text primary key, experiment_id integer, artifact_uri text)")
        con.execute("create table alembic_version (version_num text)")
        for i in range(runs):
            con.execute("insert into runs values (?, 1, ?)", (f"{i:032x}", f"/old/artifacts/{i:032x}/artifacts"))
        con.commit()
        con.close()
        return path

    def find(self):
        kind, path, _ = self.m.find_store(self.tmp)
        return kind, os.path.relpath(path, self.tmp)

    def test_top_is_mlruns(self):
        self.file_store(self.tmp)
        self.assertEqual(self.find(), ("file", "."))

    def test_single_experiment_top_is_not_mistaken_for_a_store(self):
        self.file_store(self.tmp, runs=2)  # top has one folder, "1", whose runs have meta.yaml
        self.assertEqual(self.find(), ("file", "."))

    def test_mlruns_below(self):
        self.file_store(os.path.join(self.tmp, "mlruns"))
        self.assertEqual(self.find(), ("file", "mlruns"))

    def test_single_top_folder(self):
        self.file_store(os.path.join(self.tmp, "job-123", "mlruns"))
        self.assertEqual(self.find(), ("file", "job-123/mlruns"))
        with open(os.path.join(self.tmp, ".flowgate-sha256"), "w") as f:
            f.write("x")  # fetch's marker does not count as content
        self.assertEqual(self.find(), ("file", "job-123/mlruns"))

    def test_single_top_folder_is_the_store(self):
        self.file_store(os.path.join(self.tmp, "job-123"))
        self.assertEqual(self.find(), ("file", "job-123"))

    def test_sqlite_any_name(self):
        self.db(os.path.join(self.tmp, "job", "tracking.db"))
        os.makedirs(os.path.join(self.tmp, "job", "artifacts"))
        self.assertEqual(self.find(), ("sqlite", "job/tracking.db"))

    def test_not_every_db_is_mlflow(self):
        con = sqlite3.connect(os.path.join(self.tmp, "other.db"))
        con.execute("create table t (x)")
        con.close()
        with open(os.path.join(self.tmp, "junk.db"), "w") as f:
            f.write("not sqlite")
        self.file_store(os.path.join(self.tmp, "mlruns"))
        self.assertEqual(self.find(), ("file", "mlruns"))

    def test_more_runs_wins_tie_goes_to_the_database(self):
        self.file_store(os.path.join(self.tmp, "mlruns"), runs=2)
        self.db(os.path.join(self.tmp, "mlflow.db"), runs=0)  # MLflow 3's accidental default db
        self.assertEqual(self.find(), ("file", "mlruns"))
        os.unlink(os.path.join(self.tmp, "mlflow.db"))
        self.db(os.path.join(self.tmp, "mlflow.db"), runs=2)
        self.assertEqual(self.find(), ("sqlite", "mlflow.db"))

    def test_nothing(self):
        os.makedirs(os.path.join(self.tmp, "a"))
        with self.assertRaises(self.m.Fatal):
            self.m.find_store(self.tmp)
        with self.assertRaises(self.m.Fatal):
            self.m.find_store(os.path.join(self.tmp, "missing"))

    def test_links_out_are_refused(self):
        self.file_store(os.path.join(self.tmp, "mlruns"))
        art = os.path.join(self.tmp, "mlruns", "1", f"{0:032x}", "artifacts")
        os.symlink(os.path.join(self.tmp, "mlruns", "1"), os.path.join(art, "inside"))
        self.m.check_links(self.tmp, [])
        os.symlink("/etc", os.path.join(art, "etc"))
        with self.assertRaises(self.m.Fatal):
            self.m.check_links(self.tmp, [])
        self.m.check_links(self.tmp, ["/etc"])


class UnitRelocate(unittest.TestCase):
    """Synthetic MLflow 3 entities: logged models, traces, registry, proxied artefacts."""

    @classmethod
    def setUpClass(cls):
        cls.m = load_entrypoint()

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def write(self, rel, text):
        p = os.path.join(self.tmp, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        return p

    def read(self, rel):
        with open(os.path.join(self.tmp, rel)) as f:
            return f.read()

    def test_file_store_entities(self):
        old = "/scratch/u/job/mlruns"
        rid, mid, tid = "b" * 32, "m-" + "c" * 32, "tr-" + "d" * 32
        self.write("mlruns/1/meta.yaml", f"artifact_location: file://{old}/1\nexperiment_id: '1'\nname: e\n")
        self.write(f"mlruns/1/{rid}/meta.yaml", f"artifact_uri: file://{old}/1/{rid}/artifacts\nexperiment_id: '1'\nrun_uuid: {rid}\n")
        self.write(f"mlruns/1/{rid}/artifacts/model/MLmodel", "x")
        self.write(f"mlruns/1/models/{mid}/meta.yaml", f"artifact_location: file://{old}/1/models/{mid}/artifacts\nmodel_id: {mid}\n")
        self.write(f"mlruns/1/traces/{tid}/trace_info.yaml", "x: 1\n")
        self.write(f"mlruns/1/traces/{tid}/tags/mlflow.artifactLocation", f"file://{old}/1/traces/{tid}/artifacts")
        self.write("mlruns/models/m/version-1/meta.yaml",
                   f"source: file://{old}/1/{rid}/artifacts/model\nstorage_location: file://{old}/1/{rid}/artifacts/model\nversion: 1\n")
        self.write("mlruns/2/meta.yaml", "artifact_location: s3://bucket/2\nexperiment_id: '2'\nname: remote\n")
        self.write("mlruns/.trash/3/meta.yaml", f"artifact_location: file://{old}/3\nexperiment_id: '3'\nname: gone\n")
        rel = self.m.Relocator(self.tmp, [])
        changes = self.m.relocate_file_store(os.path.join(self.tmp, "mlruns"), rel)
        new = os.path.join(self.tmp, "mlruns")
        self.assertIn(f"artifact_uri: file://{new}/1/{rid}/artifacts", self.read(f"mlruns/1/{rid}/meta.yaml"))
        self.assertIn(f"artifact_location: file://{new}/1/models/{mid}/artifacts", self.read(f"mlruns/1/models/{mid}/meta.yaml"))
        self.assertEqual(self.read(f"mlruns/1/traces/{tid}/tags/mlflow.artifactLocation"), f"file://{new}/1/traces/{tid}/artifacts")
        self.assertIn(f"source: file://{new}/1/{rid}/artifacts/model", self.read("mlruns/models/m/version-1/meta.yaml"))
        self.assertIn("artifact_location: s3://bucket/2", self.read("mlruns/2/meta.yaml"))
        self.assertIn(f"artifact_location: file://{new}/3", self.read("mlruns/.trash/3/meta.yaml"))
        self.assertEqual(len(changes), 7)
        self.assertEqual(self.m.relocate_file_store(new, self.m.Relocator(self.tmp, [])), [])

    def test_sqlite_entities(self):
        rid = "e" * 32
        db = os.path.join(self.tmp, "job", "mlflow.db")
        os.makedirs(os.path.join(self.tmp, "job", "artifacts", "1", rid, "artifacts"))
        con = sqlite3.connect(db)
        con.executescript(f"""
            create table experiments (experiment_id integer primary key, name text, artifact_location text);
            create table runs (run_uuid text primary key, experiment_id integer, artifact_uri text);
            create table model_versions (name text, version integer, source text, storage_location text);
            create table trace_tags (request_id text, key text, value text);
            insert into experiments values (1, 'e', 'file:///old/job/artifacts/1');
            insert into experiments values (2, 'p', 'mlflow-artifacts:/2');
            insert into runs values ('{rid}', 1, '/old/job/artifacts/1/{rid}/artifacts');
            insert into runs values ('{"f" * 32}', 1, 'mlflow-artifacts:/1/{"f" * 32}/artifacts');
            insert into model_versions values ('m', 1, 'file:///old/job/artifacts/1/{rid}/artifacts/model', NULL);
            insert into model_versions values ('m', 2, 'runs:/{rid}/model', 's3://b/x');
            insert into trace_tags values ('tr-1', 'mlflow.artifactLocation', 'file:///old/job/artifacts/1/traces/tr-1/artifacts');
            insert into trace_tags values ('tr-1', 'other', '/old/job/x');
        """)
        con.commit()
        con.close()
        changes = self.m.relocate_sqlite(db, self.m.Relocator(self.tmp, []))
        self.assertEqual(len(changes), 4)
        con = sqlite3.connect(db)
        j = os.path.join(self.tmp, "job")
        self.assertEqual(dict(con.execute("select experiment_id, artifact_location from experiments")),
                         {1: f"file://{j}/artifacts/1", 2: "mlflow-artifacts:/2"})
        self.assertEqual(con.execute("select artifact_uri from runs where run_uuid=?", (rid,)).fetchone()[0],
                         f"{j}/artifacts/1/{rid}/artifacts")
        self.assertEqual([r[0] for r in con.execute("select source from model_versions order by version")],
                         [f"file://{j}/artifacts/1/{rid}/artifacts/model", f"runs:/{rid}/model"])
        self.assertEqual(dict(con.execute("select key, value from trace_tags")),
                         {"mlflow.artifactLocation": f"file://{j}/artifacts/1/traces/tr-1/artifacts",
                          "other": "/old/job/x"})
        con.close()
        self.assertEqual(self.m.relocate_sqlite(db, self.m.Relocator(self.tmp, [])), [])

    def test_artifacts_destination_follows_proxied_runs(self):
        rid = "a" * 32
        self.write("job/mlruns/1/meta.yaml", "artifact_location: mlflow-artifacts:/1\nexperiment_id: '1'\nname: e\n")
        self.write(f"job/mlruns/1/{rid}/meta.yaml", f"artifact_uri: mlflow-artifacts:/1/{rid}/artifacts\nexperiment_id: '1'\nrun_uuid: {rid}\n")
        os.makedirs(os.path.join(self.tmp, "job", "mlruns", "1", rid, "artifacts"))  # not there: metadata only
        self.write(f"job/server-artifacts/1/{rid}/artifacts/notes.txt", "x")
        dest, n = self.m.artifacts_destination(self.tmp, "file", os.path.join(self.tmp, "job", "mlruns"))
        self.assertEqual(n, 1)
        # server-artifacts is not a known name and not a parent: falls back to <top>/mlartifacts
        self.assertEqual(dest, os.path.join(self.tmp, "mlartifacts"))
        os.rename(os.path.join(self.tmp, "job", "server-artifacts"), os.path.join(self.tmp, "job", "mlartifacts"))
        dest, _ = self.m.artifacts_destination(self.tmp, "file", os.path.join(self.tmp, "job", "mlruns"))
        self.assertEqual(dest, os.path.join(self.tmp, "job", "mlartifacts"))

    def test_server_flags_by_version(self):
        a = self.m.parse_args(["--store", self.tmp, "--port", "5999", "--workers", "2", "--static-prefix", "/k3x9q2a"])
        old = self.m.server_command(a, "/v/bin/mlflow", "1.9.1", "sqlite", "/s/mlflow.db", "/s", "/s/artifacts", "/s/mlartifacts")
        self.assertEqual(old, ["/v/bin/mlflow", "server", "--backend-store-uri", "sqlite:////s/mlflow.db",
                               "--host", "127.0.0.1", "--port", "5999", "--workers", "2",
                               "--default-artifact-root", "file:///s/artifacts", "--static-prefix", "/k3x9q2a"])
        new = self.m.server_command(a, "/v/bin/mlflow", "3.17.2", "file", "/s/mlruns", "/s", "/s/mlruns", "/s/mlartifacts")
        self.assertIn("--serve-artifacts", new)
        self.assertEqual(new[new.index("--artifacts-destination") + 1], "/s/mlartifacts")
        self.assertNotIn("--default-artifact-root", new)
        self.assertEqual(self.m.child_environment("/v/bin/mlflow", "3.17.2", "file")["MLFLOW_ALLOW_FILE_STORE"], "true")
        self.assertNotIn("MLFLOW_ALLOW_FILE_STORE", self.m.child_environment("/v/bin/mlflow", "1.9.1", "file"))

    def test_env_fallbacks_and_bad_flags(self):
        old = dict(os.environ)
        try:
            os.environ.update(FLOWGATE_STORE="/x", MLFLOW_HOST="0.0.0.0", MLFLOW_PORT="5050",
                              MLFLOW_WORKERS="3", FLOWGATE_STATIC_PREFIX="/p")
            a = self.m.parse_args([])
            self.assertEqual((a.store, a.host, a.port, a.workers, a.static_prefix), ("/x", "0.0.0.0", 5050, 3, "/p"))
            self.assertEqual(self.m.parse_args(["--port", "6000"]).port, 6000)
        finally:
            os.environ.clear()
            os.environ.update(old)
        for bad in (["--port", "0"], ["--workers", "0"], ["--static-prefix", "p/"]):
            with self.assertRaises(SystemExit):
                with open(os.devnull, "w") as devnull:
                    stderr, sys.stderr = sys.stderr, devnull
                    try:
                        self.m.parse_args(bad)
                    finally:
                        sys.stderr = stderr


class UnitHostileStores(unittest.TestCase):
    """Stores that try to keep an artefact location outside themselves."""

    @classmethod
    def setUpClass(cls):
        cls.m = load_entrypoint()

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.rid = "e" * 32
        self.db = os.path.join(self.tmp, "job", "mlflow.db")
        os.makedirs(os.path.join(self.tmp, "job", "artifacts", "1", self.rid, "artifacts"))
        con = sqlite3.connect(self.db)
        con.executescript(f"""
            create table experiments (experiment_id integer primary key, name text, artifact_location text);
            create table runs (run_uuid text primary key, experiment_id integer, artifact_uri text);
            create table secrets (secret_id text, secret_name text);
            insert into experiments values (1, 'e', 'file:///old/job/artifacts/1');
            insert into runs values ('{self.rid}', 1, 'file:///etc');
        """)
        con.commit()
        con.close()

    def sql(self, script):
        con = sqlite3.connect(self.db)
        con.executescript(script)
        con.commit()
        con.close()

    def test_foreign_triggers_and_views_are_refused(self):
        for script in ("create trigger keep before update on runs begin select raise(ignore); end;",
                       "create trigger undo after update on runs begin update runs set artifact_uri = old.artifact_uri; end;",
                       "create view runs_v as select * from runs;",
                       # MLflow's trigger's name on another table
                       "create trigger prevent_secrets_aad_mutation before update on runs begin select raise(ignore); end;"):
            with self.subTest(script=script):
                self.sql(script)
                with self.assertRaises(self.m.Fatal) as cm:
                    self.m.relocate_sqlite(self.db, self.m.Relocator(self.tmp, []))
                self.assertIn("refused", str(cm.exception))
                self.assertIn("MLflow never creates", str(cm.exception))
                con = sqlite3.connect(self.db)
                self.assertEqual(con.execute("select artifact_uri from runs").fetchone()[0], "file:///etc")
                for t, n in con.execute("select type, name from sqlite_master where type in ('trigger', 'view')").fetchall():
                    con.execute(f"drop {t} {n}")
                con.commit()
                con.close()

    def test_mlflows_own_trigger_is_accepted(self):
        self.sql(self.m.MLFLOW_TRIGGERS["prevent_secrets_aad_mutation"].replace(" BEFORE", "\nBEFORE") + ";")
        self.m.relocate_sqlite(self.db, self.m.Relocator(self.tmp, []))
        self.m.verify_locations("sqlite", self.db, self.m.Relocator(self.tmp, []))

    def test_an_update_that_does_not_take_is_refused(self):
        # with the schema check out of the way, the rewrite itself notices
        self.sql("create trigger keep before update on runs begin select raise(ignore); end;")
        check, self.m.check_schema = self.m.check_schema, lambda db: None
        try:
            with self.assertRaises(self.m.Fatal) as cm:
                self.m.relocate_sqlite(self.db, self.m.Relocator(self.tmp, []))
        finally:
            self.m.check_schema = check
        self.assertIn("did not take", str(cm.exception))

    def test_locations_are_read_back(self):
        # a BLOB is not a str: the rewrite passes it by, the read-back does not
        self.sql("update runs set artifact_uri = cast('file:///etc' as blob);")
        rel = self.m.Relocator(self.tmp, [])
        self.m.relocate_sqlite(self.db, rel)
        with self.assertRaises(self.m.Fatal) as cm:
            self.m.verify_locations("sqlite", self.db, rel)
        self.assertIn("still point outside the store", str(cm.exception))
        self.assertIn("file:///etc", str(cm.exception))
        self.sql("update runs set artifact_uri = 'relative/path';")
        with self.assertRaises(self.m.Fatal):
            self.m.verify_locations("sqlite", self.db, rel)
        self.sql(f"update runs set artifact_uri = 'file://{self.tmp}/job/artifacts';")
        self.assertEqual(self.m.verify_locations("sqlite", self.db, rel), 2)

    def test_connections_distrust_the_schema(self):
        for ro in (True, False):
            con = self.m.sqlite_open(self.db, readonly=ro)
            self.assertEqual(con.execute("pragma trusted_schema").fetchone()[0], 0)
            con.close()

    def test_file_store_run_behind_a_link_is_relocated(self):
        root = os.path.join(self.tmp, "fs", "mlruns")
        os.makedirs(os.path.join(root, "1"))
        with open(os.path.join(root, "1", "meta.yaml"), "w") as f:
            f.write("artifact_location: file:///old/mlruns/1\nexperiment_id: '1'\nname: e\n")
        hidden = os.path.join(self.tmp, "fs", "elsewhere", self.rid)
        os.makedirs(hidden)
        with open(os.path.join(hidden, "meta.yaml"), "w") as f:
            f.write(f"artifact_uri: file:///etc\nexperiment_id: '1'\nrun_uuid: {self.rid}\n")
        os.symlink(hidden, os.path.join(root, "1", self.rid))
        rel = self.m.Relocator(os.path.join(self.tmp, "fs"), [])
        self.m.check_links(rel.top, [])
        self.m.relocate_file_store(root, rel)
        with open(os.path.join(hidden, "meta.yaml")) as f:
            self.assertNotIn("file:///etc", f.read())
        self.m.verify_locations("file", root, rel)


# ------------------------------------------------------------------ real MLflow


class Served(unittest.TestCase):
    """Real stores, moved, served by the entrypoint, checked over REST."""

    def setUp(self):
        os.makedirs(WORK, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=WORK)
        os.chmod(self.tmp, 0o755)  # the pod-like tests run as another user
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def make_store(self, writer, layout, sqlite=False):
        """Populates with MLflow `writer` in a job folder, then moves it to `layout` below
        a fresh DIR. Returns (DIR, summary)."""
        job = os.path.join(self.tmp, "job-machine", "scratch", "job")
        summary = populate(writer, os.path.join(job, "store") if sqlite else os.path.join(job, "mlruns"), sqlite)
        top = os.path.join(tempfile.mkdtemp(prefix="served-", dir=self.tmp), "data-store")
        os.chmod(os.path.dirname(top), 0o755)
        dest = os.path.join(top, layout)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(job, "store") if sqlite else os.path.join(job, "mlruns"), dest)
        shutil.rmtree(os.path.join(self.tmp, "job-machine"))
        # the bug: every recorded location is stale now
        self.assertTrue(summary["run"]["artifact_uri"].startswith("file://" + job))
        self.assertFalse(os.path.exists(urllib.parse.urlparse(summary["run"]["artifact_uri"]).path))
        return top, summary

    def serve(self, server_venv, top, extra=(), sandbox=False, prefix=""):
        port = free_port()
        argv = [py(server_venv), ENTRY, "--store", top, "--port", str(port)] + list(extra)
        env = quiet_env(HOME=os.path.join(self.tmp, "home"))
        os.makedirs(env["HOME"], exist_ok=True)
        if sandbox:
            argv, env = self.sandboxed(argv, top)
        srv = Server(argv, port, os.path.join(self.tmp, "server.log"), env=env, prefix=prefix)
        self.addCleanup(srv.kill)
        return srv

    def sandboxed(self, argv, top):
        """Like a pod: read-only root filesystem, only the store and a private
        temp folder writable (HOME and TMPDIR, as the pod's /tmp emptyDir), an
        arbitrary non-root UID in group 0. Nothing is mounted over /tmp itself:
        the checkout (and so this test's folders) may live below it."""
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
            self.skipTest("needs root, unshare and setpriv")
        podtmp = os.path.join(self.tmp, "pod-tmp")
        os.makedirs(podtmp)
        for d in (podtmp, top):
            subprocess.run(["chown", "-R", f"{SANDBOX_UID}:0", d], check=True)
        # The venv's python may live below a folder other users cannot enter (e.g. a
        # pyenv build in /root, mode 700): inside the namespace only, cover that folder
        # with an empty tmpfs (mode 755) and bind the one entry needed back into it.
        expose = ""
        blocked = self.unreachable_ancestor(os.path.realpath(argv[0]))
        if blocked:
            parent, child = blocked
            hold = os.path.join(self.tmp, "hold")
            os.makedirs(hold)
            expose = (f'mount --bind "{os.path.join(parent, child)}" "{hold}"; '
                      f'mount -t tmpfs -o mode=755,size=1m tmpfs "{parent}"; '
                      f'mkdir "{os.path.join(parent, child)}"; '
                      f'mount --bind "{hold}" "{os.path.join(parent, child)}"; ')
        script = ('set -e; mount --make-rprivate /; mount --bind "$1" "$1"; mount --bind "$2" "$2"; '
                  + expose +
                  'mount -o remount,bind,ro /; shift 2; '
                  f'exec setpriv --reuid={SANDBOX_UID} --regid=0 --clear-groups -- "$@"')
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": podtmp, "TMPDIR": podtmp, "LANG": "C.UTF-8",
               "PYTHONWARNINGS": "ignore"}
        return ["unshare", "--mount", "sh", "-c", script, "sh", top, podtmp] + argv, env

    @staticmethod
    def unreachable_ancestor(path):
        """(folder, entry) for the first folder on `path` that others cannot search."""
        parts = path.strip("/").split("/")
        d = "/"
        for p in parts[:-1]:
            if not os.stat(d).st_mode & 0o001:
                return d, p
            d = os.path.join(d, p)
        return None

    def check(self, srv, summary, served_by, static_prefix=""):
        http = srv.http
        new = served_by == "current"
        # experiments
        if new:
            exps = http.json("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
        else:
            exps = http.json("GET", "/api/2.0/mlflow/experiments/list")["experiments"]
        names = {e["name"]: e for e in exps}
        self.assertIn("flowgate-demo", names)
        self.assertIn("flowgate-second", names)
        exp_id = names["flowgate-demo"]["experiment_id"]
        self.assertEqual(exp_id, summary["experiment"]["id"])
        # runs
        runs = http.json("POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"]
        by_name = {}
        for r in runs:
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            by_name[tags.get("mlflow.runName")] = r
        self.assertEqual(set(by_name), {"demo-run-1", "demo-run-2", "demo-run-3"})
        run = by_name["demo-run-1"]
        rid = run["info"]["run_id"] if "run_id" in run["info"] else run["info"]["run_uuid"]
        self.assertEqual(rid, summary["run"]["id"])
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        self.assertEqual(metrics["accuracy"], 0.9375)
        # metric history
        hist = http.json("GET", f"/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=accuracy")["metrics"]
        self.assertEqual(len(hist), summary["run"]["steps"])
        self.assertEqual(sorted(hist, key=lambda m: int(m.get("step", 0)))[-1]["value"], 0.9375)
        # artefacts: listed where they now lie, and downloaded byte for byte
        listed = http.json("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}")
        self.assertEqual({f["path"] for f in listed["files"]}, {"model", "notes.txt", "plots", "report.html"})
        plots = http.json("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}&path=plots")
        self.assertEqual([f["path"] for f in plots["files"]], ["plots/accuracy.png"])
        for path, want in summary["artifacts"].items():
            query = urllib.parse.urlencode({"path": path, "run_uuid": rid})
            status, body = http.call("GET", f"{static_prefix}/get-artifact?{query}")
            self.assertEqual(status, 200, f"get-artifact {path}: {body[:200]!r}\n{srv.tail()}")
            self.assertEqual(sha256(body), want["sha256"], path)
        return rid

    def stop_cleanly(self, srv, group=False):
        rc = srv.stop(signal.SIGTERM, timeout=40, group=group)
        self.assertEqual(rc, 0, srv.tail())
        left = group_left(srv.proc.pid)
        self.assertEqual(left, [], "processes of the server's group outlived it")
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", srv.port)), 0, "port still open")

    # -- file stores

    def test_1_9_1_file_store_served_by_1_9_1(self):
        top, summary = self.make_store("1.9.1", ".")  # DIR is the mlruns folder itself
        srv = self.serve("1.9.1", top)
        self.check(srv, summary, "1.9.1")
        self.stop_cleanly(srv)

    def test_current_file_store_served_by_current(self):
        top, summary = self.make_store("current", "mlruns")  # DIR/mlruns
        srv = self.serve("current", top)
        self.check(srv, summary, "current")
        self.assertIn("MLFLOW_ALLOW_FILE_STORE=true", srv.tail(200))
        self.stop_cleanly(srv)

    def test_1_9_1_file_store_served_by_current_like_a_pod(self):
        # the usual case: an old job's archive (single top folder), today's image
        top, summary = self.make_store("1.9.1", "job-4711/mlruns")
        srv = self.serve("current", top, sandbox=True)
        self.check(srv, summary, "current")
        self.stop_cleanly(srv)
        with open(os.path.join(top, ".flowgate-mlflow.json")) as f:
            journal = json.load(f)
        self.assertTrue(any(r["from"] == summary["run"]["artifact_uri"] for r in journal["relocated"]))

    def test_moved_store_is_a_404_without_the_entrypoint(self):
        top, summary = self.make_store("current", "mlruns")
        rid = summary["run"]["id"]
        port = free_port()
        plain = Server([SERVE, "current", os.path.join(top, "mlruns"), str(port)], port,
                       os.path.join(self.tmp, "plain.log"))
        self.addCleanup(plain.kill)
        status, _ = plain.http.call("GET", "/get-artifact?" + urllib.parse.urlencode({"path": "notes.txt", "run_uuid": rid}))
        self.assertNotEqual(status, 200, "a moved store served as is should not find its artefacts")
        listed = plain.http.json("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}")
        self.assertEqual(listed.get("files", []), [])
        plain.stop()
        srv = self.serve("current", top)
        self.check(srv, summary, "current")

    def test_current_file_store_migrated_to_sqlite(self):
        top, summary = self.make_store("current", "mlruns")
        srv = self.serve("current", top, extra=["--file-store", "migrate"])
        self.check(srv, summary, "current")
        self.stop_cleanly(srv, group=True)
        self.assertNotIn("MLFLOW_ALLOW_FILE_STORE=true", srv.tail(200))
        self.assertTrue(os.path.isfile(os.path.join(top, ".flowgate", "mlflow.db")))

    # -- SQLite stores

    def test_current_sqlite_served_by_current_like_a_pod(self):
        top, summary = self.make_store("current", "job", sqlite=True)  # DIR/job/mlflow.db + artifacts/
        srv = self.serve("current", top, sandbox=True)
        self.check(srv, summary, "current")
        self.stop_cleanly(srv)

    def test_1_9_1_sqlite_upgraded_and_served_by_current(self):
        top, summary = self.make_store("1.9.1", ".", sqlite=True)
        srv = self.serve("current", top)
        self.check(srv, summary, "current")
        self.assertIn("mlflow db upgrade", srv.tail(400))

    def test_1_9_1_sqlite_served_by_1_9_1_with_static_prefix(self):
        top, summary = self.make_store("1.9.1", ".", sqlite=True)
        srv = self.serve("1.9.1", top, extra=["--static-prefix", "/k3x9q2a"])
        # the UI, its assets and get-artifact move under the prefix; /api/2.0 stays at the root
        status, body = srv.http.call("GET", "/k3x9q2a/")
        self.assertEqual(status, 200, body[:200])
        self.assertEqual(srv.http.call("GET", "/get-artifact?path=x&run_uuid=y")[0], 404)
        self.check(srv, summary, "1.9.1", static_prefix="/k3x9q2a")
        self.stop_cleanly(srv, group=True)  # gunicorn's workers go too


    # -- hostile stores: refused, or made safe; /etc is never served

    def hostile_sqlite(self, writer):
        top, summary = self.make_store(writer, "job", sqlite=True)
        db = os.path.join(top, "job", "mlflow.db")
        con = sqlite3.connect(db)
        con.execute("update runs set artifact_uri = 'file:///etc' where run_uuid = ?", (summary["run"]["id"],))
        con.execute("create trigger keep_paths before update on runs begin select raise(ignore); end")
        con.commit()
        con.close()
        return top, summary

    def test_sqlite_store_with_a_trigger_is_refused(self):
        for server in ("current", "1.9.1"):
            with self.subTest(server=server):
                top, summary = self.hostile_sqlite(server)
                port = free_port()
                r = subprocess.run([py(server), ENTRY, "--store", top, "--port", str(port)], capture_output=True,
                                   text=True, env=quiet_env(HOME=self.tmp), timeout=300)
                self.assertEqual(r.returncode, 2, r.stderr)
                self.assertIn("refused", r.stderr)
                self.assertIn("trigger 'keep_paths' on 'runs'", r.stderr)
                self.assertNotIn("exec:", r.stderr, "mlflow server must not start")
                with socket.socket() as s:
                    self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0, "nothing may listen")

    def test_the_trigger_store_serves_etc_without_the_checks(self):
        # why the test above matters: MLflow given that store serves /etc
        top, summary = self.hostile_sqlite("current")
        port = free_port()
        plain = Server([SERVE, "current", os.path.join(top, "job"), str(port)], port,
                       os.path.join(self.tmp, "plain.log"))
        self.addCleanup(plain.kill)
        q = urllib.parse.urlencode({"path": "passwd", "run_uuid": summary["run"]["id"]})
        status, body = plain.http.call("GET", f"/get-artifact?{q}")
        self.assertEqual(status, 200)
        self.assertIn(b"root:", body)

    def test_sqlite_location_left_outside_is_refused(self):
        top, summary = self.make_store("current", "job", sqlite=True)
        con = sqlite3.connect(os.path.join(top, "job", "mlflow.db"))
        con.execute("update runs set artifact_uri = cast('file:///etc' as blob) where run_uuid = ?",
                    (summary["run"]["id"],))
        con.commit()
        con.close()
        r = subprocess.run([py("current"), ENTRY, "--store", top, "--port", str(free_port())], capture_output=True,
                           text=True, env=quiet_env(HOME=self.tmp), timeout=300)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("still point outside the store", r.stderr)
        self.assertNotIn("exec:", r.stderr)

    def test_file_store_run_behind_a_link_never_serves_etc(self):
        top, summary = self.make_store("current", "job/mlruns")
        rid, exp = summary["run"]["id"], summary["experiment"]["id"]
        run_dir = os.path.join(top, "job", "mlruns", exp, rid)
        hidden = os.path.join(top, "job", "elsewhere", rid)
        os.makedirs(os.path.dirname(hidden))
        shutil.move(run_dir, hidden)
        os.symlink(os.path.join("..", "..", "elsewhere", rid), run_dir)
        meta = os.path.join(hidden, "meta.yaml")
        with open(meta) as f:
            text = f.read()
        with open(meta, "w") as f:
            f.write("\n".join("artifact_uri: file:///etc" if line.startswith("artifact_uri:") else line
                              for line in text.splitlines()) + "\n")
        srv = self.serve("current", top)
        q = urllib.parse.urlencode({"path": "passwd", "run_uuid": rid})
        status, body = srv.http.call("GET", f"/get-artifact?{q}")
        self.assertNotIn(b"root:", body)
        self.assertNotEqual(status, 200)
        listed = srv.http.json("GET", f"/api/2.0/mlflow/artifacts/list?run_id={rid}")
        self.assertNotIn("passwd", {f["path"] for f in listed.get("files", [])})
        self.assertIn("none points outside the store", srv.tail(400))

    # -- preparation only

    def test_prepare_only_is_idempotent(self):
        for writer, sqlite in (("current", False), ("current", True), ("1.9.1", False)):
            with self.subTest(writer=writer, sqlite=sqlite):
                top, summary = self.make_store(writer, f"{writer}-{sqlite}", sqlite=sqlite)
                run = lambda: subprocess.run([py("current"), ENTRY, "--store", top, "--prepare-only"],
                                             capture_output=True, text=True, env=quiet_env())
                first = run()
                self.assertEqual(first.returncode, 0, first.stderr)
                done = json.loads(first.stdout)
                self.assertGreater(len(done["relocated"]), 0)
                self.assertTrue(all(r["to"].startswith(("file://" + top, top)) for r in done["relocated"]))
                before = snapshot(top)
                second = run()
                self.assertEqual(second.returncode, 0, second.stderr)
                self.assertEqual(json.loads(second.stdout)["relocated"], [])
                self.assertEqual(snapshot(top), before, "a second run changed the store")

    def test_no_store_is_a_clear_error(self):
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(os.path.join(empty, "something"))
        r = subprocess.run([py("current"), ENTRY, "--store", empty, "--prepare-only"],
                           capture_output=True, text=True, env=quiet_env())
        self.assertEqual(r.returncode, 2)
        self.assertIn("no MLflow store", r.stderr)


def main():
    loader = unittest.TestLoader()
    argv = sys.argv[1:]
    if argv[:1] == ["-k"]:
        loader.testNamePatterns = [f"*{p}*" for p in argv[1:]]
    suite = loader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    line = f"entrypoint: {passed} passed, {failed} failed"
    print(line + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
