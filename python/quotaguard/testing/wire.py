"""What goes over the wire: the request record, JSON bodies, server-sent-event frames of
both dialects, and small readers of request values."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the server received."""

    method: str
    path: str
    """The URL path, without the query string."""
    body: Any
    """The decoded JSON body, or None (no body, or not JSON)."""
    headers: dict[str, str]
    """Request headers, names in lower case, without ``authorization``."""


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass
class _Stream:
    """An SSE answer: frames, then maybe an error frame, or a dropped connection."""

    frames: list[bytes]
    error_frame: bytes | None = None
    error_after: int | None = None
    close_after: int | None = None
    on_complete: Callable[[], None] | None = None


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _native_frame(seq: int, event: str, status: int, payload: object) -> bytes:
    data = _json_bytes(payload).decode("utf-8")
    return f"id:{seq}\nevent:{event}\n:HTTP_STATUS/{status}\ndata:{data}\n\n".encode()


def _compat_frame(payload: object) -> bytes:
    return b"data: " + _json_bytes(payload) + b"\n\n"


def _as_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _embedding(text: str, dimension: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode("utf-8")).digest())
    vector = [rng.uniform(-1.0, 1.0) for _ in range(dimension)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]
