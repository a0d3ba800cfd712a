"""The settings and stores that the parts of the server share.

:class:`~quotaguard.testing.server.FakeDashScope` sets every one of them in its
constructor; the billing, the two API dialects and the files and batches read them
through these declarations."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .files import _File


class _State:
    _lock: threading.Lock
    reply_tokens: int
    reply_text: str | None
    default_system_prompt: str
    image_tokens: int
    embedding_dimension: int
    search_tokens: int
    builtin_tool_tokens: int
    reasoning_tokens: int
    thinking_models: set[str]
    app_model: str
    app_extra_tokens: int
    rerank_pair_tokens: int
    _explicit_cache: dict[str, float]
    _responses: dict[str, list[dict[str, Any]]]
    _files: dict[str, _File]
    _batches: dict[str, dict[str, Any]]
