"""Typed models of the API's documents (dataclasses).

Each keeps the JSON it was made from in ``.raw`` (not compared, not shown), so a
member the API adds later is not lost to a caller that needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Optional

from .errors import ProtocolError

__all__ = ["Phase", "Artifacts", "Instance", "Event", "parse_time"]


class Phase(str, Enum):
    """Where an instance is in its life. ``UNKNOWN`` stands for a phase this client does not know."""

    PENDING = "Pending"
    READY = "Ready"
    #: Idle, MLflow stopped; the next visit to its URL wakes it (same id and URL).
    SLEEPING = "Sleeping"
    FAILED = "Failed"
    EXPIRED = "Expired"
    UNKNOWN = "Unknown"

    @classmethod
    def parse(cls, value: Any) -> "Phase":
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


_TIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$"
)


def parse_time(value: Any) -> datetime:
    """An RFC 3339 timestamp (any number of fraction digits) as an aware ``datetime``."""
    m = _TIME.match(value) if isinstance(value, str) else None
    if not m:
        raise ProtocolError(f"not an RFC 3339 timestamp: {value!r:.80}")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    tz = timezone.utc
    if not z:
        off = timedelta(hours=int(oh), minutes=int(om))
        tz = timezone(-off if sign == "-" else off)
    try:
        return datetime(int(y), int(mo), int(d), int(h), int(mi), min(int(s), 59),
                        int((frac or "0")[:6].ljust(6, "0")), tzinfo=tz)
    except ValueError as e:
        raise ProtocolError(f"not an RFC 3339 timestamp: {value!r:.80}") from e


def _str(doc: dict, key: str, *, optional: bool = False) -> Optional[str]:
    v = doc.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise ProtocolError(f"member {key!r} missing or not a string")
    return v


def _obj(doc: Any, what: str) -> dict:
    if not isinstance(doc, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return doc


@dataclass(frozen=True)
class Artifacts:
    """The job's artefact archive."""

    url: str
    sha256: str

    @classmethod
    def from_json(cls, doc: Any) -> "Artifacts":
        doc = _obj(doc, "artifacts")
        return cls(url=_str(doc, "url"), sha256=_str(doc, "sha256"))


@dataclass(frozen=True)
class Instance:
    """One MLflow instance."""

    id: str
    workload: str
    owner: str
    artifacts: Artifacts
    created_at: datetime
    expires_at: datetime
    #: Where a browser opens it: ``https://<host>/<id>/``.
    url: str
    phase: Phase
    #: Why it failed, when it did, or why visitors cannot reach it yet (a Gateway
    #: that refuses its HTTPRoute).
    message: Optional[str] = None
    #: Who may open it: ``link`` (only through :attr:`access_url`) or ``public``.
    access: str = "public"
    #: A ``link`` instance's access link, fresh on every read, valid for a few
    #: minutes: send the user here (it signs the browser in until the instance
    #: expires), never to :attr:`url`. ``None`` for ``public`` instances.
    access_url: Optional[str] = None
    #: The credentials set its archive is fetched with (a name, never a secret).
    credentials: Optional[str] = None
    #: Its own idle time before sleeping (``"0"``: never); ``None``: the server's.
    idle_after: Optional[str] = None
    #: ``True`` when :meth:`Client.create` made it; ``False`` when it returned the
    #: live instance for the same workload and artefacts (``None`` from other calls).
    created: Optional[bool] = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any, *, created: Optional[bool] = None) -> "Instance":
        doc = _obj(doc, "instance")
        return cls(
            id=_str(doc, "id"),
            workload=_str(doc, "workload"),
            owner=_str(doc, "owner"),
            artifacts=Artifacts.from_json(doc.get("artifacts")),
            created_at=parse_time(doc.get("created_at")),
            expires_at=parse_time(doc.get("expires_at")),
            url=_str(doc, "url"),
            phase=Phase.parse(doc.get("phase")),
            message=_str(doc, "message", optional=True),
            access=_str(doc, "access", optional=True) or "public",
            access_url=_str(doc, "access_url", optional=True),
            credentials=_str(doc, "credentials", optional=True),
            idle_after=_str(doc, "idle_after", optional=True),
            created=created,
            raw=doc,
        )

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def open_url(self) -> str:
        """Where to send a user: the access link, or the URL of a public instance."""
        return self.access_url or self.url


#: Steps after which the events stream ends.
FINAL_STEPS = frozenset({"ready", "failed", "expired", "deleted"})


@dataclass(frozen=True)
class Event:
    """One launch step from the events stream.

    ``step`` is ``created``, ``downloading``, ``verified``, ``starting``, then
    ``ready`` (with ``url``) or ``failed`` (with the reason in ``message``);
    ``expired`` and ``deleted`` end the stream too.
    """

    step: str
    phase: Phase
    at: Optional[datetime] = None
    message: Optional[str] = None
    url: Optional[str] = None
    #: The server-sent event's ``id:`` field, when it sent one.
    id: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any, *, event_name: Optional[str] = None, event_id: Optional[str] = None) -> "Event":
        doc = _obj(doc, "event data")
        step = doc.get("step", event_name)
        if not isinstance(step, str) or not step:
            raise ProtocolError("event without a step")
        at = doc.get("at")
        return cls(
            step=step,
            phase=Phase.parse(doc.get("phase")),
            at=parse_time(at) if at is not None else None,
            message=_str(doc, "message", optional=True),
            url=_str(doc, "url", optional=True),
            id=event_id,
            raw=doc,
        )

    @property
    def final(self) -> bool:
        return self.step in FINAL_STEPS
