"""Finds the Qwen vocabulary and starts loading it, first thing at import.

The extension parses the vocabulary in a thread of its own, so that the rest of the
import (and whatever the program does before its first call) overlaps with it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import _core


def find_vocabulary() -> Path | None:
    """The Qwen vocabulary for exact input bounds: ``$QUOTAGUARD_VOCAB``, else the
    ``qwen.tiktoken`` that the ``dashscope`` package ships (found without importing it)."""
    env = os.environ.get("QUOTAGUARD_VOCAB")
    if env:
        return Path(env)
    try:
        spec = importlib.util.find_spec("dashscope")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    return candidate if candidate.is_file() else None


_core.set_vocabulary(find_vocabulary())
