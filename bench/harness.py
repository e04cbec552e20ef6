#!/usr/bin/env python3
"""Flowgate load-test harness: flowgate-adapter vs. NGINX (the paper's adapter)
vs. direct, in front of the same upstream, on pinned cores.

Run through `bench/run` (which captures the corpus, builds the adapter and the
tools first); this file only needs the Python standard library.

Layout of one run:
  core 0: upstream (nginx serving MLflow's captured bytes, or a real
          `mlflow server`) + the load generator (wrk for throughput, oha for
          fixed-rate latency) + this script
  core 1: the contender proxy (flowgate-adapter --threads 1, or nginx with
          worker_processes 1); `direct` has no proxy.
Every measurement is preceded by a warm-up at the same connection count and
followed by a check of the bytes each contender returns (status + sha256 of the
body against the expected rewritten or untouched bytes). A wrong byte, an error
or a non-2xx answer fails the run (exit 1).
"""

import argparse
import atexit
import datetime as dt
import hashlib
import html.parser
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

PREFIX = "/k3x9q2a"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
CONTENDERS = ["direct", "adapter", "nginx"]

# ---------------------------------------------------------------- expected bytes
# Reference rewrites: what a correct prefix proxy must send for each kind of
# response. Both contenders are configured so that these are exactly their
# outputs on the corpus (the adapter by its own rules, nginx by sub_filter).

_HTML_ATTR = re.compile(rb'(\s(?:href|src|action)=")/(?!/)(?!' + re.escape(PREFIX[1:].encode()) + rb'/)')
_CSS_URL = re.compile(rb'(url\(\s*["\']?)/(?!/)')


def expected_body(kind, body):
    p = PREFIX.encode()
    if kind == "html":
        return _HTML_ATTR.sub(lambda m: m.group(1) + p + b"/", body)
    if kind == "js":
        for q in (b'"', b"'", b"`"):
            body = body.replace(q + b"/#", q + p + b"/#")
        return body
    if kind == "css":
        return _CSS_URL.sub(lambda m: m.group(1) + p + b"/", body)
    return body


# ---------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=60.0, path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            if path is None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            else:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", path)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status < 500:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path or ''} within {timeout}s")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (all threads)


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


class Proc:
    """A process we started (in its own session), stopped by its own pid."""

    def __init__(self, name, argv, env=None, log=None):
        self.name = name
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


NGINX_COMMON = """
worker_processes 1;
daemon off;
master_process on;
pid {work}/{name}.pid;
error_log {work}/{name}.error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {work}/{name}-tmp/body;
  proxy_temp_path {work}/{name}-tmp/proxy;
  fastcgi_temp_path {work}/{name}-tmp/fastcgi;
  uwsgi_temp_path {work}/{name}-tmp/uwsgi;
  scgi_temp_path {work}/{name}-tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  tcp_nodelay on;
{body}
}}
"""

UPSTREAM_HTTP = """
  sendfile on;
  tcp_nopush on;
  types {{ text/html html; text/css css; text/javascript js; application/json json;
          image/png png; application/octet-stream bin; }}
  default_type application/octet-stream;
  charset utf-8;
  charset_types text/html text/css text/javascript;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {www};
    location = / {{ try_files /index.html =404; }}
    # MLflow 3's own headers on its static files (Flask's send_file, 28 days)
    location /static-files/ {{ add_header Cache-Control "public, max-age=2419200"; add_header Vary Origin; }}
    location = /links.html {{ }}
    location = /ajax-api/2.0/mlflow/runs/search {{
      types {{ }} default_type application/json;
      try_files /ajax-api/2.0/mlflow/runs/search =404;
    }}
    location = /get-artifact {{ try_files /artifacts/$arg_path =404; }}
    location = /health {{ default_type text/plain; return 200 "OK"; }}
  }}
"""

# The paper's adapter: proxy_pass with the prefix stripped, Origin cleared (MLflow
# 3.5+ checks it), Location/cookie paths given the prefix back, sub_filter for
# root-relative URLs in HTML and CSS and for MLflow's "/#" route literals in its
# own bundles; artefact downloads go through without sub_filter (as the adapter
# never rewrites them); keep-alive to the upstream. One worker, like the
# adapter's --threads 1.
PROXY_HTTP = """
  upstream app {{
    server 127.0.0.1:{up};
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host 127.0.0.1:{up};
    proxy_set_header Origin "";
    proxy_set_header Accept-Encoding "";
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    proxy_set_header X-Forwarded-Prefix {prefix};
    proxy_redirect http://127.0.0.1:{up}/ {prefix}/;
    proxy_redirect / {prefix}/;
    proxy_cookie_path / {prefix}/;

    location = {prefix} {{ return 308 {prefix}/; }}
    location {prefix}/ {{
      proxy_pass http://app/;
      sub_filter 'href="/' 'href="{prefix}/';
      sub_filter 'src="/' 'src="{prefix}/';
      sub_filter 'action="/' 'action="{prefix}/';
      sub_filter 'url(/' 'url({prefix}/';
      sub_filter_once off;
      sub_filter_types text/css;
    }}
    location {prefix}/static-files/ {{
      proxy_pass http://app/static-files/;
      sub_filter '"/#' '"{prefix}/#';
      sub_filter "'/#" "'{prefix}/#";
      sub_filter '`/#' '`{prefix}/#';
      sub_filter 'url(/' 'url({prefix}/';
      sub_filter_once off;
      sub_filter_types text/css text/javascript application/javascript;
    }}
    location {prefix}/get-artifact {{ proxy_pass http://app/get-artifact; }}
    location {prefix}/model-versions/get-artifact {{ proxy_pass http://app/model-versions/get-artifact; }}
    location ~ ^{prefix}/(ajax-api|api)/.*artifact {{
      rewrite ^{prefix}(/.*)$ $1 break;
      proxy_pass http://app;
    }}
    location / {{ return 404; }}
  }}
"""


def start_nginx(name, work, http_body, cpu, **kw):
    # The workers run as `nobody` when started by root: they must be able to
    # write their temp files (NGINX buffers large responses to disk).
    os.chmod(work, 0o755)
    os.makedirs(f"{work}/{name}-tmp", exist_ok=True)
    os.chmod(f"{work}/{name}-tmp", 0o777)
    conf = f"{work}/{name}.conf"
    with open(conf, "w") as f:
        f.write(NGINX_COMMON.format(work=work, name=name, body=http_body.format(**kw)))
    p = Proc(name, ["taskset", "-c", str(cpu), "nginx", "-c", conf, "-p", work, "-e", f"{work}/{name}.error.log"],
             log=f"{work}/{name}.out")
    wait_port(kw["port"], p.proc)
    return p


def adapter_diagnosis(c):
    """What the adapter says about its failed answers: its non-zero 4xx/5xx and
    upstream-error counters, and its last warnings (the log is deleted at exit)."""
    lines = []
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.port}/metrics", timeout=5) as r:
            lines += [l for l in r.read().decode().splitlines()
                      if re.match(r'flowgate_adapter_(requests_total\{.*status="[45]xx"|upstream_errors_total)', l)
                      and not l.endswith(" 0")]
    except OSError as e:
        lines.append(f"(no /metrics: {e})")
    log = getattr(c.proc.log, "name", None) if c.proc else None
    if log:
        with open(log, "rb") as f:
            warns = [l.decode(errors="replace").rstrip() for l in f if b"WARN" in l or b"ERROR" in l]
        lines += warns[-5:]
    return "\n".join("    adapter: " + l for l in lines)


class Contender:
    def __init__(self, name, port, proc=None):
        self.name, self.port, self.proc = name, port, proc

    def base(self):
        return PREFIX if self.name != "direct" else ""

    def pids(self):
        """Processes whose CPU and memory are the proxy's: (all, the one for RSS)."""
        if self.proc is None:
            return [], []
        if self.name == "nginx":
            kids = children(self.proc.pid)
            return [self.proc.pid] + kids, kids
        return [self.proc.pid], [self.proc.pid]

    def stop(self):
        if self.proc is not None:
            self.proc.stop(signal.SIGQUIT if self.name == "nginx" else signal.SIGTERM)


def start_contenders(work, up_port, adapter_bin, names):
    out = {}
    for name in names:
        if name == "direct":
            out[name] = Contender("direct", up_port)
        elif name == "adapter":
            port = free_port()
            env = dict(os.environ, RUST_LOG="warn", FLOWGATE_LOG_FORMAT="text")
            p = Proc("adapter", ["taskset", "-c", "1", adapter_bin, "--listen", f"127.0.0.1:{port}",
                                 "--prefix", PREFIX, "--upstream", f"http://127.0.0.1:{up_port}",
                                 "--threads", "1"], env=env, log=f"{work}/adapter-{up_port}.log")
            wait_port(port, p.proc, path="/healthz")
            out[name] = Contender("adapter", port, p)
        elif name == "nginx":
            port = free_port()
            p = start_nginx(f"proxy-{up_port}", work, PROXY_HTTP, 1, port=port, up=up_port, prefix=PREFIX)
            out[name] = Contender("nginx", port, p)
    return out


# ---------------------------------------------------------------- workloads

class Target:
    """One URL of a workload: what to request and what must come back."""

    def __init__(self, key, path, kind, body, method="GET", data=None):
        self.key, self.path, self.kind, self.method, self.data = key, path, kind, method, data
        self.upstream_sha = hashlib.sha256(body).hexdigest()
        want = expected_body(kind, body)
        self.rewritten = want != body
        # HTML is also compared by content (a rewriter that re-serialises a tag,
        # e.g. `<img .../>` as `<img ... />`, is right if the parse is the same).
        self.expected_html = html_events(want) if kind == "html" else None
        self.proxy_sha, self.proxy_size = hashlib.sha256(want).hexdigest(), len(want)
        self.direct_size = len(body)

    def want(self, contender):
        if contender == "direct":
            return self.upstream_sha, self.direct_size
        return self.proxy_sha, self.proxy_size


class Workload:
    def __init__(self, name, title, targets, levels, latency=True):
        self.name, self.title, self.targets, self.levels, self.latency = name, title, targets, levels, latency


def fetch(port, method, path, data=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} if data else {}
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    h = hashlib.sha256()
    n = 0
    keep = []
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
        if n <= (4 << 20):
            keep.append(chunk)
    c.close()
    return r.status, h.hexdigest(), n, r.getheader("Content-Encoding"), b"".join(keep)


class _Events(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.events = []

    def handle_starttag(self, tag, attrs):
        self.events.append(("start", tag, tuple(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.events.append(("start", tag, tuple(attrs)))

    def handle_endtag(self, tag):
        self.events.append(("end", tag))

    def handle_data(self, data):
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def handle_comment(self, data):
        self.events.append(("comment", data))

    def handle_decl(self, decl):
        self.events.append(("decl", decl.lower()))


def html_events(body):
    """The parse of an HTML document: tags, attributes (values decoded), text."""
    p = _Events()
    p.feed(body.decode("utf-8", "replace"))
    p.close()
    return p.events


class Checker:
    def __init__(self):
        self.failures = []
        self.checks = 0
        self.by_content = set()  # (contender, target): right by parse, not byte for byte

    def verify(self, contender, target, when):
        self.checks += 1
        path = contender.base() + target.path
        try:
            status, sha, n, enc, body = fetch(contender.port, target.method, path, target.data)
        except OSError as e:
            status, sha, n, enc, body = None, str(e), 0, None, b""
        want_sha, want_n = target.want(contender.name)
        same = sha == want_sha
        if not same and contender.name != "direct" and target.expected_html is not None and status == 200:
            same = html_events(body) == target.expected_html
            if same:
                self.by_content.add((contender.name, target.key))
        if status != 200 or not same or enc not in (None, "identity"):
            msg = (f"WRONG {contender.name} {target.key} {path} ({when}): status {status}, "
                   f"{n} B sha256 {sha[:16]}, encoding {enc}; want 200, {want_n} B sha256 {want_sha[:16]}")
            print("  " + msg, flush=True)
            self.failures.append(msg)
            return False
        return True


# ---------------------------------------------------------------- load generators

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max))
end
"""


def wrk_script(work, name, targets, base):
    """A wrk script: one request (GET or POST) or a fixed cycle over several."""
    path = f"{work}/{name}.lua"
    lines = []
    if len(targets) == 1:
        t = targets[0]
        if t.method != "GET":
            lines.append(f'wrk.method = "{t.method}"')
            lines.append(f"wrk.body = {lua_str(t.data)}")
            lines.append('wrk.headers["Content-Type"] = "application/json"')
    else:
        reqs = ", ".join(lua_str((base + t.path).encode()) for t in targets)
        lines.append(f"local paths = {{{reqs}}}")
        lines.append("local i = 0")
        lines.append("request = function() i = i % #paths + 1; return wrk.format('GET', paths[i]) end")
    lines.append(WRK_DONE)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def lua_str(b):
    return '"' + "".join(f"\\{c:03d}" if chr(c) in '"\\' or not 32 <= c < 127 else chr(c) for c in b) + '"'


def run_child(argv):
    """Runs a load generator; returns (stdout, its CPU seconds)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    ru = resource_usage_of_last_child()
    if p.returncode != 0:
        raise RuntimeError(f"{argv[3] if len(argv) > 3 else argv[0]} failed ({p.returncode}): {err.decode()[-500:]}")
    return out.decode(), err.decode(), ru


_last_children_cpu = [0.0]


def resource_usage_of_last_child():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = r.ru_utime + r.ru_stime
    delta = total - _last_children_cpu[0]
    _last_children_cpu[0] = total
    return delta


class Sampler:
    """CPU ticks and peak RSS of a contender's processes (and the upstream's) across one run."""

    def __init__(self, contender, upstream_pids):
        self.all, self.rss = contender.pids()
        self.up = upstream_pids

    def __enter__(self):
        for pid in self.rss:
            reset_peak_rss(pid)
        self.t0 = time.monotonic()
        self.c0 = sum(cpu_ticks(p) for p in self.all)
        self.u0 = sum(cpu_ticks(p) for p in self.up)
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        self.cpu = (sum(cpu_ticks(p) for p in self.all) - self.c0) / CLK
        self.up_cpu = (sum(cpu_ticks(p) for p in self.up) - self.u0) / CLK
        self.rss_kib = sum(status_kib(p, "VmHWM") for p in self.rss)
        self.rss_all_kib = sum(status_kib(p, "VmHWM") for p in self.all)
        return False


class Bench:
    def __init__(self, args, work, tools):
        self.args, self.work, self.tools = args, work, tools
        self.checker = Checker()
        self.rows = []
        self.upstream_pids = []

    def wrk(self, contender, wl, conns, duration):
        script = wrk_script(self.work, f"{wl.name}-{contender.name}", wl.targets, contender.base())
        url = f"http://127.0.0.1:{contender.port}{contender.base()}{wl.targets[0].path}"
        argv = ["taskset", "-c", "0", self.tools["wrk"], "-t1", f"-c{conns}", f"-d{duration}s",
                "--timeout", "30s", "-s", script, url]
        out, err, lg_cpu = run_child(argv)
        m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
        if not m:
            raise RuntimeError(f"wrk printed no summary:\n{out}\n{err}")
        return json.loads(m.group(1)), lg_cpu

    def oha(self, contender, wl, conns, duration, rate):
        t = wl.targets[0]
        url = f"http://127.0.0.1:{contender.port}{contender.base()}{t.path}"
        argv = ["taskset", "-c", "0", self.tools["oha"], "--no-tui", "--output-format", "json",
                "-z", f"{duration}s", "-c", str(conns), "-q", str(rate), "--latency-correction",
                "--disable-compression", "-t", "30s", "--worker-threads", "1"]
        if t.method != "GET":
            argv += ["-m", t.method, "-d", t.data.decode(), "-T", "application/json"]
        if len(wl.targets) > 1:
            urls = f"{self.work}/{wl.name}-{contender.name}.urls"
            with open(urls, "w") as f:
                for x in wl.targets:
                    f.write(f"http://127.0.0.1:{contender.port}{contender.base()}{x.path}\n")
            argv += ["--urls-from-file", urls]
        else:
            argv += [url]
        out, err, lg_cpu = run_child(argv)
        return json.loads(out), lg_cpu

    def verify_all(self, contenders, wl, when):
        ok = True
        for c in contenders.values():
            for t in unique_targets(wl.targets):
                ok &= self.checker.verify(c, t, when)
        return ok

    def throughput(self, group, contenders, wl, conns, rep):
        a = self.args
        for c in rotate(list(contenders.values()), rep):
            self.wrk(c, wl, conns, a.warmup)
            with Sampler(c, self.upstream_pids) as s:
                res, lg_cpu = self.wrk(c, wl, conns, a.duration)
            secs = res["duration_us"] / 1e6
            errors = res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
            ok = all(self.checker.verify(c, t, f"after {conns}-conn run") for t in unique_targets(wl.targets))
            if errors:
                msg = f"ERRORS {c.name} {wl.name} c={conns}: {errors} (status {res['status']}, read {res['read']}, connect {res['connect']}, timeout {res['timeout']})"
                print("  " + msg, flush=True)
                self.checker.failures.append(msg)
                if c.name == "adapter":
                    print(adapter_diagnosis(c), flush=True)
            row = {
                "group": group, "mode": "throughput", "workload": wl.name, "contender": c.name,
                "conns": conns, "rep": rep, "requests": res["requests"], "seconds": secs,
                "rps": res["requests"] / secs, "bytes_per_s": res["bytes"] / secs, "errors": errors,
                "proxy_cpu_s": s.cpu if c.proc else None,
                "cpu_s_per_10k": (s.cpu / res["requests"] * 1e4) if c.proc and res["requests"] else None,
                "proxy_core_util": (s.cpu / s.wall) if c.proc else None,
                "upstream_cpu_s": s.up_cpu, "lg_cpu_s": lg_cpu,
                "core0_util": (s.up_cpu + lg_cpu) / s.wall,
                "rss_peak_kib": s.rss_kib if c.proc else None,
                "rss_peak_all_kib": s.rss_all_kib if c.proc else None,
                "wrk_latency_us": {k: res[k] for k in ("p50", "p90", "p99", "p999", "max")},
                "correct": ok,
            }
            self.rows.append(row)
            print(f"  {wl.name:8} c={conns:<3} {c.name:7} rep{rep}: {row['rps']:>9.0f} req/s "
                  f"{row['bytes_per_s'] / 1e6:>8.1f} MB/s"
                  + (f"  cpu {row['cpu_s_per_10k']:.3f} s/10k  rss {row['rss_peak_kib'] / 1024:.1f} MiB"
                     if c.proc and row["cpu_s_per_10k"] is not None else "")
                  + f"  core0 {row['core0_util'] * 100:.0f}%" + ("" if ok and not errors else "  WRONG"),
                  flush=True)

    def latency(self, group, contenders, wl, conns, rate, rep):
        a = self.args
        for c in rotate(list(contenders.values()), rep):
            self.wrk(c, wl, conns, a.warmup)
            with Sampler(c, self.upstream_pids) as s:
                res, lg_cpu = self.oha(c, wl, conns, a.duration, rate)
            summ = res["summary"]
            codes = res.get("statusCodeDistribution", {})
            n = sum(codes.values())
            # oha -z cuts the requests still in flight at the deadline: not errors.
            errs = {k: v for k, v in res.get("errorDistribution", {}).items() if "deadline" not in k}
            bad = n - codes.get("200", 0) + sum(errs.values())
            ok = all(self.checker.verify(c, t, f"after fixed-rate run") for t in unique_targets(wl.targets))
            if len(wl.targets) == 1 and n and (c.name, wl.targets[0].key) not in self.checker.by_content:
                want = wl.targets[0].want(c.name)[1]
                if abs(summ.get("sizePerRequest", want) - want) > 0.5:
                    msg = f"SIZE {c.name} {wl.name}: {summ.get('sizePerRequest')} B per response, want {want}"
                    print("  " + msg)
                    self.checker.failures.append(msg)
                    ok = False
            if bad:
                msg = f"ERRORS {c.name} {wl.name} fixed rate {rate}/s: {bad} of {n} ({codes}, {errs})"
                print("  " + msg)
                self.checker.failures.append(msg)
            lp = res["latencyPercentiles"]
            row = {
                "group": group, "mode": "latency", "workload": wl.name, "contender": c.name,
                "conns": conns, "rate": rate, "rep": rep, "requests": n, "rps": summ["requestsPerSec"],
                "errors": bad, "latency_ms": {k: (lp[k] * 1e3 if lp.get(k) is not None else None)
                                              for k in ("p50", "p90", "p99", "p99.9")},
                "proxy_cpu_s": s.cpu if c.proc else None,
                "cpu_s_per_10k": (s.cpu / n * 1e4) if c.proc and n else None,
                "rss_peak_kib": s.rss_kib if c.proc else None,
                "correct": ok,
                # oha could not keep the rate (core 0 busy, or a stall): its
                # corrected latencies then measure the backlog, not the proxy.
                "behind": summ["requestsPerSec"] < 0.95 * rate,
            }
            self.rows.append(row)
            l = row["latency_ms"]
            print(f"  {wl.name:8} c={conns:<3} {c.name:7} rep{rep}: {rate}/s fixed -> {row['rps']:.0f}/s "
                  + " ".join(f"{k} {l[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9") if l[k] is not None) + " ms"
                  + (" (rate not kept)" if row["behind"] else "")
                  + ("" if ok and not bad else "  WRONG"), flush=True)


def unique_targets(targets):
    seen, out = set(), []
    for t in targets:
        if t.key not in seen:
            seen.add(t.key)
            out.append(t)
    return out


def rotate(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def median_rps(rows, group, wl, contender, conns):
    xs = [r["rps"] for r in rows if r["group"] == group and r["mode"] == "throughput" and r["workload"] == wl
          and r["contender"] == contender and r["conns"] == conns]
    return statistics.median(xs) if xs else None


def fixed_rate(rows, group, wl, conns, fraction):
    """The rate for latency runs: a fraction of the slowest contender's throughput."""
    cands = [median_rps(rows, group, wl.name, c, conns) for c in CONTENDERS]
    cands = [x for x in cands if x]
    if not cands:
        cands = [median_rps(rows, group, wl.name, c, lvl) for c in CONTENDERS for lvl in wl.levels]
        cands = [x for x in cands if x]
    return max(1, int(min(cands) * fraction))


# ---------------------------------------------------------------- main

def corpus_workloads(corpus, smoke):
    m = json.load(open(os.path.join(corpus, "manifest.json")))
    www = os.path.join(corpus, "www")

    def target(key, kind):
        f = m["files"][key]
        body = open(os.path.join(www, f["file"]), "rb").read()
        return Target(key, f["url"], kind, body)

    t = {k: target(k, kind) for k, kind in [("json", None), ("index", "html"), ("links", "html"),
                                             ("bundle", "js"), ("css", "css"), ("png", None),
                                             ("big", None)]}
    assert t["links"].rewritten and t["bundle"].rewritten, "corpus has nothing to rewrite"
    page = [t["index"], t["css"], t["bundle"]] + [t["json"]] * 6 + [t["png"]] * 3
    L = (lambda *x: [16]) if smoke else (lambda *x: list(x))
    wls = [
        Workload("json", "small JSON (runs/search, keep-alive)", [t["json"]], L(1, 16, 64, 256)),
        Workload("index", "MLflow index.html (HTML rewriter)", [t["index"]], L(16, 256)),
        Workload("links", "128 KiB HTML, 2k links (rewritten)", [t["links"]], L(16, 64)),
        Workload("bundle", "MLflow main JS bundle, 4.4 MB (literal rewrite)", [t["bundle"]], L(1, 16)),
        Workload("png", "PNG artifact (pass-through)", [t["png"]], L(16, 256)),
        Workload("big", "64 MiB artifact (pass-through)", [t["big"]], [1] if smoke else [1, 16], latency=False),
        Workload("mixed", "page load: index, css, bundle, 6 JSON, 3 PNG", page, L(16, 256)),
    ]
    return m, wls


def mlflow_workloads(port, exp_id, run_id, smoke):
    def grab(key, path, kind, method="GET", data=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"mlflow {path}: {r.status} {body[:200]!r}")
        return Target(key, path, kind, body, method, data)

    index = grab("index", "/", "html")
    js = re.search(rb'src="\.?/?(static-files/static/js/main\.[0-9a-f]+\.js)"', fetch_body(port, "/")).group(1).decode()
    search = json.dumps({"experiment_ids": [exp_id], "max_results": 100, "run_view_type": "ACTIVE_ONLY",
                         "order_by": ["attributes.start_time DESC"]}).encode()
    small = [16]
    big = [2]
    return [
        Workload("json", "runs/search (POST, JSON)", [grab("json", "/ajax-api/2.0/mlflow/runs/search", None, "POST", search)], small),
        Workload("index", "index.html", [index], small),
        Workload("bundle", "main JS bundle", [grab("bundle", "/" + js, "js")], big, latency=False),
        Workload("png", "PNG artifact", [grab("png", f"/get-artifact?path=plots/accuracy.png&run_uuid={run_id}", None)], small),
    ]


def fetch_body(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path)
    body = c.getresponse().read()
    c.close()
    return body


def run_group(bench, group, contenders, wls, args):
    for wl in wls:
        print(f"== {group}: {wl.name} — {wl.title}", flush=True)
        if not bench.verify_all(contenders, wl, "before"):
            print(f"  skipping measurements of {wl.name}: wrong bytes", flush=True)
            continue
        for conns in wl.levels:
            for rep in range(args.reps):
                bench.throughput(group, contenders, wl, conns, rep)
        if wl.latency and bench.tools.get("oha"):
            conns = 16 if 16 in wl.levels else wl.levels[0]
            rate = fixed_rate(bench.rows, group, wl, conns, args.rate_fraction)
            for rep in range(args.reps):
                bench.latency(group, contenders, wl, conns, rate, rep)


def machine_info(tools, adapter_bin):
    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip() or \
                   subprocess.run(argv, capture_output=True, text=True, timeout=30).stderr.strip()
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "nginx": out(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": out([tools["wrk"], "-v"]).splitlines()[0] if tools.get("wrk") else None,
        "oha": out([tools["oha"], "--version"]) if tools.get("oha") else None,
        "adapter_rev": out(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
        "adapter_bin": adapter_bin,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few seconds per contender and workload (CI)")
    ap.add_argument("--adapter-bin", default=os.path.join(ROOT, "target/release/flowgate-adapter"))
    ap.add_argument("--corpus", default=os.path.join(HERE, ".corpus"))
    ap.add_argument("--out", help="results directory (default bench/results/<date>, none with --smoke)")
    ap.add_argument("--oha", default=shutil.which("oha") or os.path.join(HERE, ".tools/bin/oha"))
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--duration", type=int, default=None, help="seconds per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each measurement")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rate-fraction", type=float, default=0.25,
                    help="fixed rate for latency runs, as a fraction of the slowest contender's req/s")
    ap.add_argument("--only", help="comma-separated workloads to run (default: all)")
    ap.add_argument("--no-mlflow", action="store_true", help="skip the run against a real mlflow server")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 1 if args.smoke else 3
    if args.reps is None:
        args.reps = 1 if args.smoke else 3

    os.sched_setaffinity(0, {0})
    tools = {"wrk": args.wrk, "oha": args.oha if os.access(args.oha, os.X_OK) else None}
    if not tools["oha"]:
        print("bench: oha not found: fixed-rate latency runs are skipped", file=sys.stderr)
    info = machine_info(tools, args.adapter_bin)
    if float(info["loadavg_at_start"][0]) > 1.0:
        print(f"bench: warning: load average {info['loadavg_at_start'][0]} at start (other jobs running?)",
              file=sys.stderr)
    work = tempfile.mkdtemp(prefix="flowgate-bench.")
    atexit.register(shutil.rmtree, work, True)
    bench = Bench(args, work, tools)
    procs = []
    started = time.monotonic()
    manifest, wls = corpus_workloads(args.corpus, args.smoke)
    if args.only:
        keep = set(args.only.split(","))
        wls = [w for w in wls if w.name in keep]
    info["mlflow_corpus"] = manifest["mlflow_version"]
    try:
        up_port = free_port()
        upstream = start_nginx("upstream", work, UPSTREAM_HTTP, 0, port=up_port,
                               www=os.path.join(args.corpus, "www"))
        procs.append(upstream)
        bench.upstream_pids = [upstream.pid] + children(upstream.pid)
        contenders = start_contenders(work, up_port, args.adapter_bin, CONTENDERS)
        print(f"bench: upstream nginx :{up_port}, " + ", ".join(f"{c.name} :{c.port}" for c in contenders.values()),
              flush=True)
        try:
            run_group(bench, "corpus", contenders, wls, args)
        finally:
            for c in contenders.values():
                c.stop()
        upstream.stop(signal.SIGQUIT)

        if not args.no_mlflow and (not args.only or "mlflow" in args.only.split(",")):
            run_mlflow(bench, work, args)
    finally:
        for p in procs:
            p.stop(signal.SIGQUIT)
    info["elapsed_s"] = round(time.monotonic() - started, 1)

    results = {"meta": dict(info, date=dt.datetime.now().isoformat(timespec="seconds"), prefix=PREFIX,
                            duration_s=args.duration, warmup_s=args.warmup, reps=args.reps,
                            rate_fraction=args.rate_fraction, smoke=args.smoke,
                            checks=bench.checker.checks, failures=bench.checker.failures,
                            html_equal_by_content=sorted(f"{c}:{t}" for c, t in bench.checker.by_content)),
               "workloads": {w.name: {"title": w.title, "levels": w.levels,
                                      "targets": [{"key": t.key, "path": t.path, "rewritten": t.rewritten,
                                                   "bytes": t.direct_size, "proxy_bytes": t.proxy_size}
                                                  for t in unique_targets(w.targets)]} for w in wls},
               "rows": bench.rows}
    import report
    results["summary"] = report.summarize(results)
    md = report.markdown(results)
    print()
    print(md)
    out = args.out
    if out is None and not args.smoke:
        out = os.path.join(HERE, "results", dt.date.today().isoformat())
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(md)
        print(f"bench: results in {out}", flush=True)
    if bench.checker.failures:
        print(f"bench: FAILED: {len(bench.checker.failures)} wrong answers or errors", file=sys.stderr)
        for f in bench.checker.failures[:20]:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"bench: {bench.checker.checks} correctness checks passed, {len(bench.rows)} measurements", flush=True)
    return 0


def run_mlflow(bench, work, args):
    """The end-to-end check: a real `mlflow server` (one worker, core 0) as upstream."""
    print("== mlflow: populating a store and starting mlflow server", flush=True)
    venv = subprocess.run([os.path.join(ROOT, "testenv/mlflow/venv"), "current"], check=True,
                          capture_output=True, text=True).stdout.strip()
    store = os.path.join(work, "mlruns")
    summary = subprocess.run([os.path.join(venv, "bin/python"), os.path.join(ROOT, "testenv/mlflow/populate.py"),
                              "--store", store], check=True, capture_output=True, text=True).stdout
    summary = json.loads(summary)
    port = free_port()
    srv = Proc("mlflow", ["taskset", "-c", "0", os.path.join(ROOT, "testenv/mlflow/serve"), "current", store,
                          str(port)], log=f"{work}/mlflow.log")
    contenders = {}
    try:
        wait_port(port, srv.proc, timeout=120, path="/health")
        bench.upstream_pids = [srv.pid] + all_descendants(srv.pid)
        contenders = start_contenders(work, port, args.adapter_bin, CONTENDERS)
        wls = mlflow_workloads(port, summary["experiment"]["id"], summary["run"]["id"], args.smoke)
        run_group(bench, "mlflow", contenders, wls, args)
    finally:
        for c in contenders.values():
            c.stop()
        srv.stop()


def all_descendants(pid):
    out = []
    for k in children(pid):
        out.append(k)
        out += all_descendants(k)
    return out


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
