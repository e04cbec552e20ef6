"""A server-sent events parser (the WHATWG event-stream format) with bounded memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from .errors import ProtocolError


@dataclass
class SseMessage:
    event: str
    data: str
    id: Optional[str]
    retry: Optional[int]


def parse(chunks: Iterable[bytes], max_line: int = 64 * 1024, max_data: int = 1024 * 1024) -> Iterator[SseMessage]:
    """Yields each dispatched message of a byte stream.

    Lines end in CRLF, LF or CR; comment lines (``:`` heartbeats) are skipped; a
    message is dispatched on a blank line. ``id`` sticks until changed (as the
    last event id of the spec); ``retry`` is reported with the message it came
    with. A line longer than ``max_line`` or data beyond ``max_data`` bytes is a
    :class:`ProtocolError`: a hostile or broken server cannot make us buffer
    without bound. A message not terminated by a blank line when the stream ends
    is dropped, as the spec says.
    """
    buf = bytearray()
    event, data, data_len, last_id, retry, have_data = "", [], 0, None, None, False
    pending_cr = False
    for chunk in chunks:
        if not chunk:
            continue
        if pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        pending_cr = False
        buf += chunk
        while True:
            cr, lf = buf.find(b"\r"), buf.find(b"\n")
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                if len(buf) > max_line:
                    raise ProtocolError(f"event stream line longer than {max_line} bytes")
                break
            end = min(ends)
            raw = bytes(buf[:end])
            if buf[end:end + 1] == b"\r":
                if end + 1 < len(buf):
                    drop = 2 if buf[end + 1:end + 2] == b"\n" else 1
                else:
                    drop, pending_cr = 1, True
            else:
                drop = 1
            del buf[:end + drop]
            if len(raw) > max_line:
                raise ProtocolError(f"event stream line longer than {max_line} bytes")
            line = raw.decode("utf-8", "replace")
            if line == "":
                if have_data:
                    yield SseMessage(event or "message", "\n".join(data), last_id, retry)
                event, data, data_len, retry, have_data = "", [], 0, None, False
                continue
            if line.startswith(":"):
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "event":
                event = value
            elif name == "data":
                data_len += len(value) + 1
                if data_len > max_data:
                    raise ProtocolError(f"event data larger than {max_data} bytes")
                data.append(value)
                have_data = True
            elif name == "id":
                if "\0" not in value:
                    last_id = value
            elif name == "retry":
                if value.isdigit():
                    retry = int(value[:9])
