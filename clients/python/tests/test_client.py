"""flowgate_client against a real `flowgate serve --backend local` with real MLflow."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from conftest import QUOTA_PER_OWNER, TOKENS, FaultProxy, reply

from flowgate_client import (
    BadRequest,
    Client,
    Forbidden,
    InstanceFailed,
    NotFound,
    Phase,
    TooManyRequests,
    Unauthorized,
    WaitTimeout,
)


def client(server, who="alice", **kw) -> Client:
    return Client(server.url, token=TOKENS[who], **kw)


def test_lifecycle_create_wait_get_list_extend_delete(server, archive):
    with client(server) as fg, client(server, "bob") as bob:
        inst = fg.create("client-lifecycle", url=archive.url, sha256=archive.sha256, ttl="2h")
        assert inst.created is True
        assert inst.owner == "alice" and inst.workload == "client-lifecycle"
        assert inst.artifacts.sha256 == archive.sha256
        assert inst.expires_at - inst.created_at == timedelta(hours=2)

        again = fg.create("client-lifecycle", url=archive.url, sha256=archive.sha256)
        assert again.created is False and again.id == inst.id

        steps = []
        ready = fg.wait_ready(inst.id, on_progress=lambda step, ev: steps.append((step, ev)), timeout=300)
        names = [s for s, _ in steps]
        assert names[0] == "created" and names[-1] == "ready", names
        assert len(names) == len(set(names)), f"each step once: {names}"
        assert {"downloading", "verified", "starting"} <= set(names), names
        assert steps[-1][1].url == ready.url
        assert ready.phase is Phase.READY and ready.ready
        # access `link` (the default): the plain URL is refused; what the portal
        # redirects to, the access link, signs the browser in and lands on MLflow
        assert inst.access == "link" and ready.access_url.startswith(ready.url + "?flowgate_access=")
        assert ready.open_url == ready.access_url
        assert httpx.get(ready.url, timeout=30).status_code == 401
        with httpx.Client(follow_redirects=True, timeout=30) as browser:
            page = browser.get(ready.open_url)
            assert page.status_code == 200 and "mlflow" in page.text.lower()
            assert str(page.url) == ready.url, "the token leaves the address"
        shared = fg.link(inst.id, ttl="1h")
        assert shared.startswith(ready.url + "?flowgate_access=")
        with httpx.Client(follow_redirects=True, timeout=30) as other_browser:
            assert other_browser.get(shared).status_code == 200

        assert inst.id in [i.id for i in fg.list(workload="client-lifecycle")]
        assert inst.id in [i.id for i in fg.list()]
        assert fg.list(workload="no-such-workload") == []
        assert inst.id not in [i.id for i in bob.list()]
        with pytest.raises(Forbidden) as e:
            bob.get(inst.id)
        assert e.value.status == 403 and e.value.code == "forbidden"
        assert e.value.problem["error"] == "forbidden"

        longer = fg.extend(inst.id, ttl="12h")
        assert longer.expires_at > ready.expires_at
        assert fg.extend(inst.id, timedelta(hours=13)).expires_at > longer.expires_at

        fg.delete(inst.id)
        with pytest.raises(NotFound) as e:
            fg.get(inst.id)
        assert e.value.status == 404 and e.value.code == "not_found"
        with pytest.raises(NotFound):
            fg.delete(inst.id)


def test_failed_launch_raises_instance_failed_with_the_reason(server, archive):
    with client(server) as fg:
        wrong = "0" * 64
        inst = fg.create("client-bad-checksum", url=archive.url, sha256=wrong)
        steps = []
        with pytest.raises(InstanceFailed) as e:
            fg.wait_ready(inst.id, on_progress=lambda s, ev: steps.append(s), timeout=120)
        assert e.value.step == "failed" and steps[-1] == "failed"
        assert "sha256" in e.value.reason.lower() or "checksum" in e.value.reason.lower(), e.value.reason
        assert fg.get(inst.id).phase is Phase.FAILED
        fg.delete(inst.id)


def test_errors_carry_status_and_problem(server, archive):
    with client(server) as fg:
        with pytest.raises(BadRequest) as e:
            fg.create("client-bad", url="ftp://example.org/x.tgz", sha256=archive.sha256)
        assert e.value.status == 400 and e.value.code == "invalid"
        assert "ftp" in e.value.detail or "scheme" in e.value.detail
        with pytest.raises(BadRequest):
            fg.create("client-bad", url=archive.url, sha256="not-hex")
        with pytest.raises(NotFound) as e:
            fg.get("zzzzzzz")
        assert e.value.status == 404
        with pytest.raises(NotFound):
            fg.get("../../healthz")  # quoted into one path segment: never another endpoint
    with Client(server.url, token="not-a-known-token-0123456789") as stranger:
        with pytest.raises(Unauthorized) as e:
            stranger.list()
        assert e.value.status == 401 and e.value.code == "unauthorized"
    with Client(server.url) as anonymous:
        with pytest.raises(Unauthorized):
            anonymous.list()


def test_quota_429_is_retried_then_raised(server, archive, loopback):
    # artefacts that never arrive keep instances Pending, so live, so counted
    stall = loopback(lambda h: time.sleep(60))
    with client(server, "quota", retries=2, backoff=0.05) as fg:
        made = [fg.create(f"client-quota-{i}", url=f"{stall.url}/job{i}.tgz", sha256=archive.sha256)
                for i in range(QUOTA_PER_OWNER)]
        before = server.requests_with_status(429)
        t0 = time.monotonic()
        with pytest.raises(TooManyRequests) as e:
            fg.create("client-quota-over", url=f"{stall.url}/over.tgz", sha256=archive.sha256)
        assert e.value.status == 429 and e.value.code == "quota"
        assert time.monotonic() - t0 < 5
        # one try and two retries, as the server counted them
        assert server.requests_with_status(429) - before == 3
        for inst in made:
            fg.delete(inst.id)


def test_events_stream_cut_is_resumed_and_steps_come_once(server, archive):
    proxy = FaultProxy(server.url, cut_events=2)
    try:
        with Client(proxy.url, token=TOKENS["alice"], backoff=0.05) as fg:
            inst = fg.create("client-reconnect", url=archive.url, sha256=archive.sha256)
            steps = []
            ready = fg.wait_ready(inst.id, on_progress=lambda s, ev: steps.append(s), timeout=300)
            assert ready.ready
            assert steps[0] == "created" and steps[-1] == "ready"
            assert len(steps) == len(set(steps)), steps
            events_requests = [line for line in proxy.request_lines if "/events" in line]
            assert len(events_requests) >= 3, proxy.request_lines
            fg.delete(inst.id)
    finally:
        proxy.close()


def test_wait_ready_timeout(server, archive, loopback):
    stall = loopback(lambda h: time.sleep(30))
    with client(server) as fg:
        inst = fg.create("client-timeout", url=f"{stall.url}/job.tgz", sha256=archive.sha256)
        t0 = time.monotonic()
        with pytest.raises(WaitTimeout) as e:
            fg.wait_ready(inst.id, timeout=2)
        took = time.monotonic() - t0
        assert 1.9 <= took < 6, took
        assert isinstance(e.value, TimeoutError) and e.value.last_step is not None
        fg.delete(inst.id)


# --- faults the real server does not make on demand: small loopback servers -----------------


INSTANCE = {
    "id": "abcdefg", "workload": "w", "owner": "o",
    "artifacts": {"url": "https://h/a.tgz", "sha256": "a" * 64},
    "created_at": "2026-12-01T07:00:00.123456789Z", "expires_at": "2026-12-02T07:00:00Z",
    "url": "https://h/abcdefg/", "phase": "Ready",
}


def test_503_and_429_are_retried_honouring_retry_after(loopback):
    faults = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"})]

    def handle(h):
        if faults:
            status, headers = faults.pop(0)
            reply(h, status, {"error": "upstream", "message": "try later"}, headers)
        else:
            reply(h, 200, INSTANCE)

    srv = loopback(handle)
    with Client(srv.url, backoff=0.01) as fg:
        t0 = time.monotonic()
        inst = fg.get("abcdefg")
        took = time.monotonic() - t0
    assert inst.id == "abcdefg" and inst.created_at.microsecond == 123456
    assert len(srv.requests) == 3
    assert 2.0 <= took < 4, f"waited {took:.2f} s, Retry-After said 1 s twice"


def test_retry_after_too_long_raises_at_once_and_problem_json_is_read(loopback):
    problem = {"type": "https://flowgate.io/problems/quota", "title": "Quota reached", "status": 429,
               "detail": "alice already has 20 live instances", "error": "quota"}
    srv = loopback(lambda h: reply(h, 429, problem, {"Retry-After": "3600"}, "application/problem+json"))
    with Client(srv.url) as fg:
        t0 = time.monotonic()
        with pytest.raises(TooManyRequests) as e:
            fg.list()
    assert time.monotonic() - t0 < 1 and len(srv.requests) == 1
    assert e.value.retry_after == 3600 and e.value.problem == problem
    assert e.value.code == "quota" and e.value.detail == "alice already has 20 live instances"


def test_problem_type_without_error_member_gives_the_code(loopback):
    srv = loopback(lambda h: reply(h, 404, {"type": "https://flowgate.io/problems/not_found", "title": "Not Found",
                                            "status": 404}, content_type="application/problem+json"))
    with Client(srv.url) as fg, pytest.raises(NotFound) as e:
        fg.get("abcdefg")
    assert e.value.code == "not_found" and e.value.detail == "Not Found"


def test_5xx_retries_run_out(loopback):
    srv = loopback(lambda h: reply(h, 502, b"<html>Bad Gateway</html>", content_type="text/html"))
    from flowgate_client import ServerError

    with Client(srv.url, retries=2, backoff=0.01) as fg, pytest.raises(ServerError) as e:
        fg.get("abcdefg")
    assert e.value.status == 502 and e.value.problem is None and "Bad Gateway" in str(e.value)
    assert len(srv.requests) == 3


def test_connection_refused_is_retried_until_the_server_is_up(loopback):
    from conftest import free_port

    port = free_port()
    started = []
    threading_timer = __import__("threading").Timer(
        0.6, lambda: started.append(loopback(lambda h: reply(h, 200, INSTANCE), port=port)))
    threading_timer.start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=8, backoff=0.1, max_backoff=0.4) as fg:
            assert fg.get("abcdefg").id == "abcdefg"
    finally:
        threading_timer.join()


def test_connection_refused_gives_transport_error():
    from conftest import free_port

    from flowgate_client import TransportError

    with Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as fg, pytest.raises(TransportError) as e:
        fg.list()
    assert e.value.status is None


def test_list_follows_continue_tokens(loopback):
    pages = {None: (["aaaaaaa", "bbbbbbb"], "t1"), "t1": (["ccccccc"], "t2"), "t2": (["ddddddd"], None)}

    def handle(h):
        q = httpx.URL(h.path).params
        ids, token = pages[q.get("continue")]
        body = {"items": [dict(INSTANCE, id=i) for i in ids]}
        if token:
            body["continue"] = token
        reply(h, 200, body)

    srv = loopback(handle)
    with Client(srv.url) as fg:
        got = fg.list(workload="w", page_size=2)
    assert [i.id for i in got] == ["aaaaaaa", "bbbbbbb", "ccccccc", "ddddddd"]
    assert len(srv.requests) == 3
    assert all("workload=w" in path and "limit=2" in path for _, path, _ in srv.requests)


def test_list_with_a_repeating_token_stops(loopback):
    from flowgate_client import ProtocolError

    srv = loopback(lambda h: reply(h, 200, {"items": [INSTANCE], "continue": "same"}))
    with Client(srv.url) as fg, pytest.raises(ProtocolError):
        fg.list()
    assert len(srv.requests) == 2


def sse(h, body: bytes):
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(body)
    h.wfile.flush()
    h.close_connection = True


def test_reconnect_sends_last_event_id(loopback):
    def handle(h):
        if h.path.endswith("/events"):
            if h.headers.get("Last-Event-ID") == "1":
                sse(h, b'id: 2\nevent: ready\ndata: {"step":"ready","phase":"Ready","url":"https://h/abcdefg/"}\n\n')
            else:
                # two events, then the connection drops before the launch ends
                sse(h, b'retry: 50\r\nid: 0\r\nevent: created\r\ndata: {"step":"created","phase":"Pending"}\r\n\r\n'
                       b': heartbeat\r\n\r\nid: 1\r\nevent: downloading\r\ndata: {"step":"downloading",\r\n'
                       b'data: "phase":"Pending"}\r\n\r\n')
        else:
            reply(h, 200, INSTANCE)

    srv = loopback(handle)
    steps = []
    with Client(srv.url) as fg:
        inst = fg.wait_ready("abcdefg", on_progress=lambda s, ev: steps.append((s, ev.id)), timeout=10)
    assert inst.ready
    assert steps == [("created", "0"), ("downloading", "1"), ("ready", "2")]
    events = [hdrs for _, path, hdrs in srv.requests if path.endswith("/events")]
    assert len(events) == 2 and "Last-Event-ID" not in events[0] and events[1]["Last-Event-ID"] == "1"


def test_silent_stream_is_reopened(loopback):
    def handle(h):
        if not h.path.endswith("/events"):
            reply(h, 200, INSTANCE)
        elif len([r for r in srv.requests if r[1].endswith("/events")]) == 1:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.end_headers()
            h.wfile.write(b'event: created\ndata: {"step":"created","phase":"Pending"}\n\n')
            h.wfile.flush()
            time.sleep(20)  # then nothing, not even a heartbeat: a dead path
        else:
            sse(h, b'event: created\ndata: {"step":"created","phase":"Pending"}\n\n'
                   b'event: ready\ndata: {"step":"ready","phase":"Ready","url":"https://h/abcdefg/"}\n\n')

    srv = loopback(handle)
    steps = []
    t0 = time.monotonic()
    with Client(srv.url, stream_idle_timeout=1, backoff=0.01) as fg:
        assert fg.wait_ready("abcdefg", on_progress=lambda s, ev: steps.append(s), timeout=15).ready
    assert steps == ["created", "ready"]
    assert 1 <= time.monotonic() - t0 < 5


def test_endless_event_line_is_refused_in_bounded_memory(loopback):
    from flowgate_client import ProtocolError

    def handle(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        try:
            for _ in range(1024):  # 64 MiB of one line, unless the client hangs up first
                h.wfile.write(b"x" * 65536)
        except OSError:
            pass

    srv = loopback(handle)
    with Client(srv.url) as fg, pytest.raises(ProtocolError):
        fg.wait_ready("abcdefg", timeout=30)
