"""Errors of the Flowgate client.

Every error is a :class:`FlowgateError`. Those that come from an HTTP response
carry ``.status`` (the HTTP status) and ``.problem`` (the JSON error document as a
dict, or ``None`` when the body was not JSON). Both shapes the API answers are
understood: today's ``{"error": CODE, "message": TEXT}`` and RFC 9457
``application/problem+json`` (``type``, ``title``, ``status``, ``detail``, with
``error`` kept as an extension member).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = [
    "FlowgateError",
    "TransportError",
    "ProtocolError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "TooManyRequests",
    "ServerError",
    "InstanceFailed",
    "WaitTimeout",
    "error_for_status",
]


class FlowgateError(Exception):
    """Base of every error raised by the client."""

    #: HTTP status of the response, or ``None`` when there was none.
    status: Optional[int]
    #: The JSON error document (``dict``), or ``None``.
    problem: Optional[dict]

    def __init__(self, message: str, *, status: Optional[int] = None, problem: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.problem = problem

    @property
    def code(self) -> Optional[str]:
        """The API's stable error code (``invalid``, ``not_found``, ``quota`` ...).

        Taken from the ``error`` member (both shapes have it), else from the last
        path segment of a problem ``type`` URI.
        """
        p = self.problem or {}
        code = p.get("error")
        if isinstance(code, str) and code:
            return code
        t = p.get("type")
        if isinstance(t, str) and t and t != "about:blank":
            return t.rstrip("/").rsplit("/", 1)[-1].split("#")[-1] or None
        return None

    @property
    def detail(self) -> Optional[str]:
        """The human-readable explanation (``detail``, else ``message``, else ``title``)."""
        p = self.problem or {}
        for key in ("detail", "message", "title"):
            v = p.get(key)
            if isinstance(v, str) and v:
                return v
        return None


class TransportError(FlowgateError):
    """The server could not be reached, or the connection broke (after the retries)."""


class ProtocolError(FlowgateError):
    """The server answered something that is not Flowgate's API (bad JSON, oversized body, ...)."""


class BadRequest(FlowgateError):
    """400/422: invalid input (URL scheme, checksum, TTL bounds, workload ...)."""


class Unauthorized(FlowgateError):
    """401: no token, or an unknown one."""


class Forbidden(FlowgateError):
    """403: another owner's instance, or an owner the token may not act for."""


class NotFound(FlowgateError):
    """404: no such instance (or it is gone)."""


class Conflict(FlowgateError):
    """409: the operation conflicts with the instance's state."""


class TooManyRequests(FlowgateError):
    """429: a quota is reached or the server asks to slow down (after the retries)."""

    #: Seconds the server asked to wait (``Retry-After``), when it said.
    retry_after: Optional[float] = None


class ServerError(FlowgateError):
    """5xx (after the retries)."""


class InstanceFailed(FlowgateError):
    """The instance will not become ready: it failed, expired or was deleted while waited for."""

    def __init__(self, instance_id: str, step: str, reason: str, *, event: Any = None):
        super().__init__(f"instance {instance_id} {step}: {reason}", problem=getattr(event, "raw", None))
        self.instance_id = instance_id
        #: The final step: ``failed``, ``expired`` or ``deleted``.
        self.step = step
        #: Why, as the server said it.
        self.reason = reason
        #: The :class:`~flowgate_client.Event` that ended the wait.
        self.event = event


class WaitTimeout(FlowgateError, TimeoutError):
    """:meth:`Client.wait_ready` ran out of time; the instance may still become ready."""

    def __init__(self, instance_id: str, timeout: float, last_step: Optional[str]):
        super().__init__(f"instance {instance_id} not ready after {timeout:g} s (last step: {last_step or 'none'})")
        self.instance_id = instance_id
        self.timeout = timeout
        self.last_step = last_step


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: NotFound,
    422: BadRequest,
    429: TooManyRequests,
}


def error_for_status(status: int, problem: Optional[dict], text: str = "", headers: Optional[Mapping[str, str]] = None) -> FlowgateError:
    """The error for a response with ``status`` >= 400."""
    if status >= 500:
        cls: type = ServerError
    else:
        cls = _BY_STATUS.get(status, FlowgateError)
    err = cls(f"HTTP {status}", status=status, problem=problem)
    what = err.detail or (text.strip()[:200] if text else "")
    code = err.code
    err.args = (f"HTTP {status}" + (f" {code}" if code else "") + (f": {what}" if what else ""),)
    if isinstance(err, TooManyRequests) and headers is not None:
        from ._retry import parse_retry_after

        err.retry_after = parse_retry_after(headers.get("retry-after"))
    return err
