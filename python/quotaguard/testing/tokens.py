"""Counting tokens as the service does: the Qwen vocabulary through tiktoken, else the
core's counter, else UTF-8 bytes (never fewer than the real count)."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import os
import re
import threading
import unicodedata
from collections.abc import Callable
from typing import Final

# The pre-tokenizer pattern and special tokens of dashscope's QwenTokenizer.
_QWEN_PATTERN: Final = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN_SPECIAL: Final = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{i}|>" for i in range(205)),
)
_QWEN_SPECIAL_START: Final = 151643
# tiktoken's recursive merge can overflow its stack on very long inputs.
_ENCODE_CHUNK_CHARS: Final = 100_000

# Splitting text just before a space that starts a word never cuts through a
# pre-token of the Qwen pattern (nor an NFC composition), so the token count of
# a text is the sum of the counts of its pieces. Stream chunks are such pieces.
_PIECE_SPLIT: Final = re.compile(r"(?= \S)")

_TokenCounter = Callable[[str], int]
_counter_lock = threading.Lock()
_counter: tuple[str, _TokenCounter] | None = None


def _pieces(text: str) -> list[str]:
    return [piece for piece in _PIECE_SPLIT.split(text) if piece]


def _load_qwen_counter() -> _TokenCounter | None:
    """tiktoken over dashscope's qwen.tiktoken, found without importing dashscope."""
    try:
        tiktoken = importlib.import_module("tiktoken")
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "resources", "qwen.tiktoken")
        if os.path.isfile(path):
            break
    else:
        return None
    with open(path, "rb") as vocab:
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in vocab.read().splitlines() if line)
        }
    special = {token: _QWEN_SPECIAL_START + i for i, token in enumerate(_QWEN_SPECIAL)}
    encoding = tiktoken.Encoding(
        "Qwen", pat_str=_QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special
    )

    def encode_len(text: str) -> int:
        return len(encoding.encode(text, allowed_special="all", disallowed_special=()))

    def count(text: str) -> int:
        text = unicodedata.normalize("NFC", text)
        if len(text) <= _ENCODE_CHUNK_CHARS:
            return encode_len(text)
        total, size = 0, 0
        batch: list[str] = []
        for piece in _pieces(text):
            if size + len(piece) > _ENCODE_CHUNK_CHARS and batch:
                total += encode_len("".join(batch))
                batch, size = [], 0
            if len(piece) > _ENCODE_CHUNK_CHARS:
                total += sum(
                    encode_len(piece[i : i + _ENCODE_CHUNK_CHARS])
                    for i in range(0, len(piece), _ENCODE_CHUNK_CHARS)
                )
                continue
            batch.append(piece)
            size += len(piece)
        return total + (encode_len("".join(batch)) if batch else 0)

    return count


def _load_core_counter() -> _TokenCounter | None:
    try:
        core = importlib.import_module("quotaguard._core")
    except Exception:  # the compiled module may be absent or the package half-built
        return None
    counter = getattr(core, "count_tokens", None)
    # The core counts only with the Qwen vocabulary at hand; without it, it says None.
    if not callable(counter) or counter("") is None:
        return None

    def count(text: str) -> int:
        return int(counter(text))

    return count


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _token_counter() -> tuple[str, _TokenCounter]:
    """The best counter available, loaded once per process."""
    global _counter
    with _counter_lock:
        if _counter is None:
            qwen = _load_qwen_counter()
            if qwen is not None:
                _counter = ("qwen.tiktoken", qwen)
            else:
                core = _load_core_counter()
                _counter = ("quotaguard._core", core) if core else ("utf8-bytes", _utf8_len)
        return _counter
