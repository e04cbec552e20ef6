"""Fixtures: a real `flowgate serve --backend local` (token auth, real MLflow), the
example job's archive, and small loopback servers for what the real server does not
do on demand (faults, paging, event ids).

Env: FLOWGATE_BIN (default <repo>/target/debug/flowgate), FLOWGATE_TEST_MLFLOW (the
mlflow executable of an MLflow venv; its python writes the example store).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]

TOKENS = {
    "alice": "alice-token-0123456789abcdef",
    "bob": "bob-token-0123456789abcdef0",
    "quota": "quota-token-0123456789abcdef",
    "portal": "portal-token-0123456789abcdef",
}
QUOTA_PER_OWNER = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(path: str, what: str) -> str:
    if not path or not os.access(path, os.X_OK):
        pytest.exit(f"{what} not found at {path!r}", returncode=2)
    return path


@pytest.fixture(scope="session")
def flowgate_bin() -> str:
    return _need(os.environ.get("FLOWGATE_BIN", str(ROOT / "target" / "debug" / "flowgate")), "flowgate (FLOWGATE_BIN)")


@pytest.fixture(scope="session")
def mlflow_bin() -> str:
    return _need(os.environ.get("FLOWGATE_TEST_MLFLOW", ""), "mlflow (FLOWGATE_TEST_MLFLOW)")


class Archive:
    """The job's archive, served over loopback HTTP as a portal's store would serve
    it (an API with tokens refuses file:// URLs)."""

    def __init__(self, path: Path):
        self.path = path
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
        handler.log_message = lambda *args: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def archive(tmp_path_factory, mlflow_bin) -> Archive:
    """The example job of ./quickstart: testenv/mlflow/populate.py's store, as a .tgz."""
    d = tmp_path_factory.mktemp("job")
    python = Path(mlflow_bin).parent / "python"
    subprocess.run([str(python), str(ROOT / "testenv/mlflow/populate.py"), "--store", str(d / "mlruns")],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    out = d / "example-job.tgz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(d / "mlruns", arcname="mlruns")
    return Archive(out)


class Server:
    def __init__(self, api: str, log: Path):
        self.url = f"http://{api}"
        self.log = log

    def requests_with_status(self, status: int) -> float:
        """The API's own count of responses with this status (/metrics)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or f'status="{status}"' not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="session")
def server(tmp_path_factory, flowgate_bin, mlflow_bin):
    d = tmp_path_factory.mktemp("flowgate")
    tokens = d / "tokens"
    tokens.write_text("".join(f"{t} {owner}\n" for owner, t in TOKENS.items()))
    api, listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log = d / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [flowgate_bin, "serve", "--backend", "local", "--listen", api, "--local-listen", listen,
             "--data-dir", str(d / "data"), "--mlflow", mlflow_bin, "--tokens", str(tokens),
             "--quota-per-owner", str(QUOTA_PER_OWNER)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "FLOWGATE_LOG_FORMAT": "text", "RUST_LOG": "info"},
        )
    srv = Server(api, log)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.exit(f"flowgate serve exited {proc.returncode}:\n{log.read_text()[-2000:]}", returncode=2)
            try:
                if httpx.get(srv.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.exit("flowgate serve did not answer /healthz within 30 s", returncode=2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.environ.get("FLOWGATE_CLIENT_TEST_LOG"):
            sys.stderr.write(log.read_text())


# --- small loopback servers -------------------------------------------------------------


class Loopback:
    """A threaded HTTP server on 127.0.0.1 whose handler is a plain function
    ``handle(handler) -> None``; it records every request (method, path, headers)."""

    def __init__(self, handle, port: int = 0):
        self.requests = []
        loop = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_any(self):
                n = int(self.headers.get("content-length") or 0)
                self.body = self.rfile.read(n) if n else b""
                loop.requests.append((self.command, self.path, dict(self.headers)))
                handle(self)

            do_GET = do_POST = do_DELETE = do_any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler, status: int, body=b"", headers=None, content_type="application/json"):
    if not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode()
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def loopback():
    servers = []

    def make(handle, port: int = 0) -> Loopback:
        s = Loopback(handle, port)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


class FaultProxy:
    """A TCP proxy on loopback in front of the real server. ``cut_events`` makes it
    close the client's events connection (once each) after the first server-sent
    event has passed; every connection is counted by its request line."""

    def __init__(self, upstream: str, cut_events: int = 0):
        host, port = upstream.split("//", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.cut_events = cut_events
        self.request_lines = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        u = socket.create_connection(self.upstream)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode()
            cut = False
            with self.lock:
                self.request_lines.append(line)
                if "/events" in line and self.cut_events > 0:
                    self.cut_events -= 1
                    cut = True
            # one request per connection, so that every request is seen here
            first, rest = head.split(b"\r\n", 1)
            # as a reverse proxy in front of it would: the server answers only
            # its public host names (421 otherwise)
            rest = re.sub(rb"(?im)^host:[^\r\n]*", b"Host: %s:%d" % (self.upstream[0].encode(), self.upstream[1]), rest)
            u.sendall(first + b"\r\nConnection: close\r\n" + rest)
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            seen = b""
            while True:
                data = u.recv(65536)
                if not data:
                    return
                if not cut:
                    c.sendall(data)
                    continue
                # pass the response up to the end of its first event, then drop the connection
                seen += data
                start = seen.find(b"data:")
                end = seen.find(b"\n\n", start) if start >= 0 else -1
                if end >= 0:
                    c.sendall(seen[:end + 2])
                    return
        except OSError:
            return
        finally:
            # shutdown, not just close: the pump thread blocked in recv() would keep
            # the connection open otherwise
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.closed = True
        self.sock.close()
