"""When to retry and how long to wait."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Optional

#: Statuses worth another try: 429 and the 5xx that mean "not now".
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 507, 509})


def parse_retry_after(value: Optional[str], now: Optional[datetime] = None) -> Optional[float]:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP-date), or ``None``."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(min(int(value[:12]), 10**9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: about ``base * 2**attempt``, at most ``cap``."""
    return min(cap, base * (2 ** min(attempt, 30))) * random.uniform(0.5, 1.0)
