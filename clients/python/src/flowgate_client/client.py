"""The synchronous client of Flowgate's REST API (``/api/v1``)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import quote

import httpx

from . import _sse
from ._retry import RETRY_STATUSES, backoff_delay, parse_retry_after
from .errors import (
    InstanceFailed,
    ProtocolError,
    TransportError,
    WaitTimeout,
    error_for_status,
)
from .models import Event, Instance

__all__ = ["Client", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 30.0
#: The server sends a heartbeat every 15 s: silence for this long means a dead stream.
STREAM_IDLE_TIMEOUT = 45.0
#: Bodies larger than this are refused (a list of every instance stays far below).
MAX_BODY = 32 * 1024 * 1024
#: Error bodies are read up to this much.
MAX_ERROR_BODY = 64 * 1024
#: A token that comes back unchanged this often means a broken server.
MAX_PAGES = 100_000

ProgressCallback = Callable[[str, Event], Any]
#: A TTL: the API's notation (``"12h"``), seconds, or a ``timedelta``.
Ttl = Union[str, int, float, timedelta]


def _ttl(value: Any) -> str:
    """A TTL as the API writes it (``90s``, ``12h``): strings pass, numbers are seconds."""
    if isinstance(value, str):
        return value
    seconds = value.total_seconds() if hasattr(value, "total_seconds") else value
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ValueError(f"ttl must be a positive duration, not {value!r}")
    return f"{int(round(seconds))}s"


class Client:
    """Flowgate's REST API.

    ``base_url`` is where the API is served (``https://flowgate.example.org`` or
    ``.../api/v1``); ``token`` the bearer token; ``timeout`` seconds for connecting
    and for each read. Connection errors, 5xx and 429 are retried up to ``retries``
    times with exponential backoff from ``backoff`` seconds (at most
    ``max_backoff``), waiting what ``Retry-After`` says when it says it (unless it
    asks for more than ``max_retry_after``: then the error is raised at once). An
    events stream silent for ``stream_idle_timeout`` seconds (the server sends a
    heartbeat every 15) is taken as dead and reopened.
    Every call that changes something is safe to repeat: a repeated ``create``
    returns the instance made by the first, ``extend`` sends one
    ``Idempotency-Key`` for all its tries, and a ``delete`` whose retry finds the
    instance gone is done.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        stream_idle_timeout: float = STREAM_IDLE_TIMEOUT,
        transport: Optional[httpx.BaseTransport] = None,
        verify: Union[bool, str] = True,
        user_agent: str = "flowgate-client-python/0.1",
    ):
        root = base_url.rstrip("/")
        if not root.endswith("/api/v1"):
            root += "/api/v1"
        headers = {"User-Agent": user_agent, "Accept": "application/json, application/problem+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.timeout = float(timeout)
        self.stream_idle_timeout = float(stream_idle_timeout)
        self._http = httpx.Client(
            base_url=root + "/",
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            transport=transport,
            verify=verify,
            follow_redirects=False,
        )

    # --- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the API -------------------------------------------------------------------

    def create(
        self,
        workload: str,
        url: str,
        sha256: str,
        ttl: Optional[Ttl] = None,
        owner: Optional[str] = None,
        access: Optional[str] = None,
        credentials: Optional[str] = None,
        idle_after: Optional[Ttl] = None,
    ) -> Instance:
        """An instance for the job ``workload`` serving the archive at ``url``.

        ``access`` is ``link`` (the server's default: only the instance's
        :attr:`~Instance.access_url` opens it) or ``public`` (the URL alone).
        ``credentials`` names the credentials set a private archive is fetched
        with (one the server grants this owner; :class:`Forbidden` otherwise).
        ``idle_after`` (e.g. ``"2h"``, ``0`` never) is how long it may go
        unvisited before it sleeps (backends that sleep only).

        When one is live for the same workload and checksum, that one is returned:
        ``Instance.created`` is ``True`` for a new instance (HTTP 201), ``False``
        for the live one (200), also when a retry finds the instance that a try
        whose answer was lost made.
        """
        body: Dict[str, Any] = {"workload": workload, "artifacts": {"url": url, "sha256": sha256}}
        if ttl is not None:
            body["ttl"] = _ttl(ttl)
        if owner is not None:
            body["owner"] = owner
        if access is not None:
            body["access"] = access
        if credentials is not None:
            body["credentials"] = credentials
        if idle_after is not None:
            body["idle_after"] = "0" if idle_after in (0, "0") else _ttl(idle_after)
        status, doc, _ = self._call("POST", "instances", json_body=body)
        return Instance.from_json(doc, created=(status == 201))

    def get(self, instance_id: str) -> Instance:
        """One instance (:class:`NotFound` when there is none)."""
        _, doc, _ = self._call("GET", self._path(instance_id))
        return Instance.from_json(doc)

    def list(self, workload: Optional[str] = None, owner: Optional[str] = None, *, page_size: Optional[int] = None) -> List[Instance]:
        """Every instance (a token sees its owner's only), filtered; all pages."""
        return list(self.iter_instances(workload=workload, owner=owner, page_size=page_size))

    def iter_instances(
        self, workload: Optional[str] = None, owner: Optional[str] = None, *, page_size: Optional[int] = None
    ) -> Iterator[Instance]:
        """Like :meth:`list`, one page at a time.

        Understands both answers of ``GET /instances``: a JSON array (everything at
        once), and a page ``{"items": [...], "continue": TOKEN}`` whose token (absent
        or empty on the last page) is sent back as ``continue`` for the next one, as
        Kubernetes lists do. ``page_size`` is sent as ``limit``.
        """
        params: Dict[str, Any] = {}
        if workload is not None:
            params["workload"] = workload
        if owner is not None:
            params["owner"] = owner
        if page_size is not None:
            params["limit"] = int(page_size)
        seen = set()
        for _ in range(MAX_PAGES):
            _, doc, _ = self._call("GET", "instances", params=params)
            if isinstance(doc, list):
                items, token = doc, None
            elif isinstance(doc, dict) and isinstance(doc.get("items"), list):
                items = doc["items"]
                token = doc.get("continue") or (doc.get("metadata") or {}).get("continue")
            else:
                raise ProtocolError("the instance list is neither an array nor {items, continue}")
            for item in items:
                yield Instance.from_json(item)
            if not token:
                return
            if not isinstance(token, str) or token in seen:
                raise ProtocolError("the instance list's continue token repeats or is not a string")
            seen.add(token)
            params["continue"] = token
        raise ProtocolError(f"the instance list has more than {MAX_PAGES} pages")

    def extend(self, instance_id: str, ttl: Ttl) -> Instance:
        """Push the expiry further (the server caps it at its maximum TTL from now)."""
        key = str(uuid.uuid4())
        _, doc, _ = self._call(
            "POST", self._path(instance_id) + "/extend", json_body={"ttl": _ttl(ttl)},
            headers={"Idempotency-Key": key},
        )
        return Instance.from_json(doc)

    def link(self, instance_id: str, ttl: Optional[Ttl] = None) -> str:
        """Another access link to a ``link`` instance (to share it), valid for
        ``ttl`` (the server's default, 10 minutes, when ``None``)."""
        body: Dict[str, Any] = {} if ttl is None else {"ttl": _ttl(ttl)}
        _, doc, _ = self._call("POST", self._path(instance_id) + "/links", json_body=body)
        if not isinstance(doc, dict) or not isinstance(doc.get("access_url"), str):
            raise ProtocolError("the links answer has no access_url")
        return doc["access_url"]

    def delete(self, instance_id: str) -> None:
        """Delete an instance. A retry that finds it gone counts as done."""
        self._call("DELETE", self._path(instance_id), gone_ok_on_retry=True)

    def events(self, instance_id: str, *, timeout: Optional[float] = None) -> Iterator[Event]:
        """The instance's launch steps, each once, until a final one (``ready``,
        ``failed``, ``expired``, ``deleted``) or ``timeout`` seconds.

        Follows ``GET /instances/{id}/events`` (server-sent events). When the stream
        breaks or goes silent past the heartbeats, it reconnects (waiting the
        stream's ``retry:`` or a backoff), sending ``Last-Event-ID`` when the
        server gave event ids; a server that replays the launch from its start
        instead is understood too (steps already seen are not yielded again).
        Raises :class:`WaitTimeout` when ``timeout`` passes first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        path = self._path(instance_id) + "/events"
        last_id: Optional[str] = None
        seen_ids = set()
        seen_steps = set()
        last_step: Optional[str] = None
        reconnects = 0
        retry_ms: Optional[int] = None
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(instance_id, timeout or 0.0, last_step)
            idle = self.stream_idle_timeout
            read = idle if remaining is None else max(0.05, min(idle, remaining))
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            progressed = False
            try:
                with self._open("GET", path, headers=headers, deadline=deadline,
                                timeout=httpx.Timeout(self.timeout, read=read)) as response:
                    for msg in _sse.parse(response.iter_bytes()):
                        if msg.retry is not None:
                            retry_ms = msg.retry
                        if msg.id is not None:
                            last_id = msg.id
                        try:
                            doc = json.loads(msg.data)
                        except (ValueError, RecursionError) as e:
                            raise ProtocolError(f"event data is not JSON: {msg.data[:80]!r}") from e
                        event = Event.from_json(doc, event_name=msg.event, event_id=msg.id)
                        if event.id is not None:
                            if event.id in seen_ids:
                                continue
                            seen_ids.add(event.id)
                        else:
                            key = (event.step, event.message, event.url)
                            if key in seen_steps:
                                continue
                            seen_steps.add(key)
                        progressed = True
                        last_step = event.step
                        yield event
                        if event.final:
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            raise WaitTimeout(instance_id, timeout or 0.0, last_step)
            except httpx.TimeoutException:
                pass  # silent past the heartbeats, or the deadline: reconnect or time out
            except httpx.TransportError:
                pass  # the stream broke: reconnect
            # the stream ended without a final step
            reconnects = 0 if progressed else reconnects + 1
            if reconnects > max(self.retries, 1) * 4:
                raise TransportError(f"the events stream of {instance_id} keeps ending without progress")
            if retry_ms is not None:  # the server's `retry:`, within our own bound
                delay = min(retry_ms / 1000.0, self.max_backoff)
            else:
                delay = backoff_delay(reconnects, self.backoff, self.max_backoff)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)

    def wait_ready(
        self,
        instance_id: str,
        on_progress: Optional[ProgressCallback] = None,
        timeout: float = 600.0,
    ) -> Instance:
        """Waits until the instance is ready and returns it.

        ``on_progress(step, event)`` is called once for each launch step
        (``created``, ``downloading``, ``verified``, ``starting``, ``ready``; the
        :class:`Event` has ``message``, ``at``, ``url`` and the raw JSON). Raises
        :class:`InstanceFailed` (with ``.reason``) when the instance fails,
        expires or is deleted, and :class:`WaitTimeout` after ``timeout`` seconds.
        """
        for event in self.events(instance_id, timeout=timeout):
            if on_progress is not None:
                on_progress(event.step, event)
            if event.step == "ready":
                return self.get(instance_id)
            if event.final:
                raise InstanceFailed(instance_id, event.step, event.message or event.step, event=event)
        raise TransportError(f"the events stream of {instance_id} ended without a final step")  # pragma: no cover

    # --- plumbing ------------------------------------------------------------------

    @staticmethod
    def _path(instance_id: str) -> str:
        if not isinstance(instance_id, str) or not instance_id:
            raise ValueError("an instance id is a non-empty string")
        return "instances/" + quote(instance_id, safe="")

    def _retry_delay(self, attempt: int, response: Optional[httpx.Response]) -> Optional[float]:
        """Seconds to wait before try ``attempt + 1``, or ``None`` to give up."""
        if attempt >= self.retries:
            return None
        if response is not None:
            after = parse_retry_after(response.headers.get("retry-after"))
            if after is not None:
                return after if after <= self.max_retry_after else None
        return backoff_delay(attempt, self.backoff, self.max_backoff)

    def _open(self, method: str, path: str, *, headers: Optional[Dict[str, str]] = None,
              params: Optional[Dict[str, Any]] = None, json_body: Any = None,
              deadline: Optional[float] = None, timeout: Optional[httpx.Timeout] = None,
              gone_ok_on_retry: bool = False) -> "_Opened":
        """Sends a request with the retries; returns the open response (2xx).

        Raises the :class:`FlowgateError` for the final failure.
        """
        attempt = 0
        while True:
            response: Optional[httpx.Response] = None
            request = self._http.build_request(
                method, path, params=params, json=json_body, headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as e:
                delay = self._retry_delay(attempt, None)
                if delay is None or (deadline is not None and time.monotonic() + delay >= deadline):
                    raise TransportError(f"{method} {request.url}: {type(e).__name__}: {e}") from e
            else:
                status = response.status_code
                if status < 400:
                    return _Opened(response)
                if gone_ok_on_retry and attempt > 0 and status == 404:
                    response.close()
                    return _Opened(None)
                delay = self._retry_delay(attempt, response) if status in RETRY_STATUSES else None
                if delay is not None and deadline is not None and time.monotonic() + delay >= deadline:
                    delay = None
                if delay is None:
                    try:
                        text = _read(response, MAX_ERROR_BODY, truncate=True)
                    finally:
                        response.close()
                    raise error_for_status(status, _problem(text), text.decode("utf-8", "replace"), response.headers)
                response.close()
            time.sleep(delay)
            attempt += 1

    def _call(self, method: str, path: str, *, params: Optional[Dict[str, Any]] = None,
              json_body: Any = None, headers: Optional[Dict[str, str]] = None,
              gone_ok_on_retry: bool = False) -> Tuple[int, Any, httpx.Headers]:
        """One JSON call: (status, decoded body or None, headers). A connection
        that breaks while the body is read is retried like one that failed."""
        attempt = 0
        while True:
            with self._open(method, path, params=params, json_body=json_body, headers=headers,
                            gone_ok_on_retry=gone_ok_on_retry) as r:
                if r is None:
                    return 404, None, httpx.Headers()
                try:
                    body = _read(r, MAX_BODY)
                except httpx.TransportError as e:
                    delay = self._retry_delay(attempt, None)
                    if delay is None:
                        raise TransportError(f"{method} {path}: reading the response: {e}") from e
                    time.sleep(delay)
                    attempt += 1
                    continue
                status, resp_headers = r.status_code, r.headers
            if status == 204 or not body.strip():
                return status, None, resp_headers
            try:
                return status, json.loads(body), resp_headers
            except (ValueError, RecursionError) as e:
                raise ProtocolError(f"{method} {path}: the response is not JSON", status=status) from e


class _Opened:
    """A context manager around an open streamed response (or ``None``)."""

    def __init__(self, response: Optional[httpx.Response]):
        self.response = response

    def __enter__(self) -> Optional[httpx.Response]:
        return self.response

    def __exit__(self, *exc: Any) -> None:
        if self.response is not None:
            self.response.close()


def _read(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """The body, at most ``limit`` bytes (beyond: truncated, or a ProtocolError)."""
    out = bytearray()
    for chunk in response.iter_bytes():
        out += chunk
        if len(out) > limit:
            if truncate:
                return bytes(out[:limit])
            raise ProtocolError(f"response body larger than {limit} bytes", status=response.status_code)
    return bytes(out)


def _problem(body: bytes) -> Optional[dict]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None

