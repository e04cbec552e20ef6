"""Python client of Flowgate's REST API: short-lived MLflow instances for job results.

    from flowgate_client import Client

    with Client("https://flowgate.example.org", token=TOKEN) as fg:
        inst = fg.create("6543210", url=ARCHIVE_URL, sha256=SHA256, ttl="24h")
        inst = fg.wait_ready(inst.id, on_progress=lambda step, ev: print(step, ev.message or ""))
        print(inst.url)
"""

from .client import DEFAULT_TIMEOUT, Client
from .errors import (
    BadRequest,
    Conflict,
    FlowgateError,
    Forbidden,
    InstanceFailed,
    NotFound,
    ProtocolError,
    ServerError,
    TooManyRequests,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from .models import Artifacts, Event, Instance, Phase

__version__ = "0.1.0"

__all__ = [
    "Client",
    "DEFAULT_TIMEOUT",
    "Instance",
    "Artifacts",
    "Event",
    "Phase",
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
]
