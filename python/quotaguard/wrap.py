"""The machinery behind ``@guard.wrap`` and the SDK wrappers: reserve, call, settle.

A guarded call reads the request (model, an upper bound of its input tokens, the most
output it allows, reasoning included), reserves that worst case (R8), calls, then reads
the usage the service reports and settles (R9). Every way out ends the reservation:

* a result that reports usage settles it (a stream, once its final usage arrived);
* an error the service answered (HTTP 4xx or 5xx, or DashScope's returned errors)
  releases it; ``AllocationQuota.FreeTierOnly``, ``Throttling.AllocationQuota``,
  ``Arrearage`` and the bill-overdue codes update the ledger (R12) and raise the
  matching quotaguard exception;
* a request that provably never left (the connection was never made) releases it;
* anything else once the request may have reached the service (a timeout, a reset,
  asyncio cancellation, ``KeyboardInterrupt``, a stream cut, closed or dropped before
  its usage) settles the worst case, marked in doubt. ``guard.sync()`` with the
  console's figure corrects the count later.

Input that cannot be bounded before sending (web search, built-in tools, ``fileid://``
references, a stored conversation) makes a call unbounded: refused under Free Quota
Only (reason ``"unbounded"``) unless ``max_input_tokens=`` states a bound.

Knowledge of SDK shapes lives here and in :mod:`quotaguard.clients` only. Neither SDK
is imported: DashScope responses are dicts, OpenAI objects are read by attribute.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import math
import socket
import struct
import threading
import types
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, ParamSpec, Protocol, TypeVar, cast, overload

from . import _core
from .exceptions import AccountOverdue, FreeTierOnly, NoUsageWarning, QuotaGuardError, _entry

__all__ = ["GuardedAsyncStream", "GuardedStream", "wrap"]

P = ParamSpec("P")
R = TypeVar("R")

# Service answers that R12 turns into ledger updates. Only used to choose how a failed
# call ends; the mapping to exceptions is the guard's (``guard.service_error``).
QUOTA_CODES = frozenset(
    {
        "AllocationQuota.FreeTierOnly",
        "Throttling.AllocationQuota",
        "insufficient_quota",
        "Arrearage",
        "PrepaidBillOverdue",
        "PostpaidBillOverdue",
    }
)

# An image is cut into 28 x 28 pixel patches, one token each, at least 4, plus its two
# vision markers (Qwen-VL; Qwen3-VL's 32-pixel patches give fewer). An image whose
# size is unknown bills at most the catalogue's ``max_image_tokens``.
IMAGE_PATCH = 28
IMAGE_MIN_PATCHES = 4
VISION_MARKERS = 2
IMAGE_TOKENS = 16_384
# A video as a URL is bounded by a 128K context window, a video given as frames by the
# image rule per frame; audio by 32K.
VIDEO_TOKENS = 131_072
AUDIO_TOKENS = 32_768
# What a reranker adds around each (query, document) pair: its instruction template.
RERANK_PAIR_TOKENS = 64

# The Qwen chat template's function-calling text (Qwen2.5 and Qwen3): tool definitions
# go into the system turn, tool calls into the assistant turn, tool results into a
# user turn. The default system message is Qwen2.5's, used when a request with tools
# has none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


class Reservation(Protocol):
    """The part of ``quotaguard.Reservation`` this module uses."""

    @property
    def free_tokens(self) -> int: ...

    @property
    def worst_case(self) -> int: ...

    def settle(
        self,
        input_tokens: int,
        output_tokens: int,
        request_id: str | None = None,
        *,
        cached_tokens: int | None = None,
        cache_creation_tokens: int | None = None,
        explicit_cache: bool = False,
        thinking: bool | None = None,
    ) -> object: ...

    def release(self, *, failed: bool = False) -> None: ...

    def settle_worst_case(self, *, in_doubt: bool = False) -> object: ...

    def _settle_from(self, body: object) -> tuple[object, bool] | None: ...


class Core(Protocol):
    """The part of the Rust core's guard (``QuotaGuard._core``) this module uses."""

    def reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        kind: str = "realtime",
        *,
        thinking: bool = False,
    ) -> Reservation: ...

    def input_bound(
        self,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        input: str | list[str] | None = None,
        extra_tokens: int | None = None,
    ) -> int: ...

    def default_max_output(self, model: str) -> int: ...

    def model_info(self, model: str) -> dict[str, Any]: ...

    def remaining(self, model: str) -> int: ...

    def _reserve_chat(
        self, body: dict[str, Any], kind: str = "realtime"
    ) -> tuple[Reservation, str, int, int, int, int, bool] | None: ...

    def _check_uncounted(self, model: str | None, reason: str, detail: str) -> None: ...

    def _record_usage(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        request_id: str | None = None,
        *,
        kind: str = "realtime",
        cached_tokens: int | None = None,
        thinking: bool = False,
    ) -> object: ...


class Guard(Protocol):
    """The part of ``quotaguard.QuotaGuard`` this module uses: its core, and its
    mapping of service errors."""

    @property
    def _core(self) -> Core: ...

    def service_error(self, model: str, code: str, message: str = "") -> BaseException | None: ...


# --------------------------------------------------------------------------------------
# Reading values out of SDK objects, dicts and call arguments


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for mappings (DashScope responses are dicts), else the attribute."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _given(value: Any) -> bool:
    """False for None and for the OpenAI SDK's ``omit`` / ``NOT_GIVEN`` sentinels."""
    return value is not None and type(value).__name__ not in ("Omit", "NotGiven")


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _jsonable(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(exclude_none=True)
    return str(obj)


def _json(obj: Any, *, ascii: bool = False) -> str:
    return json.dumps(obj, ensure_ascii=ascii, default=_jsonable)


def _plain(obj: Any) -> Any:
    """An SDK object (a pydantic model) as plain data; anything else unchanged."""
    if isinstance(obj, Mapping | str | int | float | bool) or obj is None:
        return obj
    dump = getattr(obj, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else obj


@dataclass(frozen=True)
class _Shape:
    """What a function's signature says about where arguments go."""

    positional: tuple[str, ...]  # names of the leading positional parameters, in order
    keywords: frozenset[str]
    any_keyword: bool  # takes **kwargs (or its signature is unknown)
    defaults: Mapping[str, Any] = field(default_factory=dict)


_UNKNOWN_SHAPE = _Shape((), frozenset(), True)


@functools.lru_cache(maxsize=512)
def _shape_of(func: Callable[..., Any], bound: bool) -> _Shape:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # builtins and C callables: keywords only
        return _UNKNOWN_SHAPE
    if bound and params:
        params = params[1:]
    kinds = inspect.Parameter
    positional: list[str] = []
    for p in params:
        if p.kind not in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            break
        positional.append(p.name)
    return _Shape(
        tuple(positional),
        frozenset(
            p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        ),
        any(p.kind is kinds.VAR_KEYWORD for p in params),
        types.MappingProxyType(
            {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        ),
    )


def _shape(fn: Callable[..., Any] | None) -> _Shape:
    if fn is None:
        return _UNKNOWN_SHAPE
    # Bound methods are new objects on every attribute access: cache on the function.
    func = getattr(fn, "__func__", None)
    try:
        if func is not None and getattr(fn, "__self__", None) is not None:
            return _shape_of(func, True)
        return _shape_of(fn, False)
    except TypeError:  # unhashable callable
        return _shape_of.__wrapped__(fn, False)


class _CallArgs:
    """The arguments of one call, readable and rewritable by parameter name.

    A parameter the call did not pass reads as the function's own default (item 7 of
    R8: ``def ask(model, messages, max_tokens=512)`` reserves 512).
    """

    def __init__(
        self, fn: Callable[..., Any] | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ):
        self.args = list(args)
        self.kwargs = dict(kwargs)
        shape = _shape(fn)
        self._positional = {name: i for i, name in enumerate(shape.positional[: len(args)])}
        self._keywords = shape.keywords
        self._any_keyword = shape.any_keyword
        self._defaults = shape.defaults

    @classmethod
    def of_body(cls, body: Mapping[str, Any]) -> _CallArgs:
        """A JSON request body, read and rewritten like keyword arguments."""
        return cls(None, (), body)

    def get(self, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        index = self._positional.get(name)
        if index is not None:
            return self.args[index]
        return self._defaults.get(name)

    def pop(self, name: str) -> Any:
        """Take a keyword the callee must not see (``max_input_tokens``)."""
        return self.kwargs.pop(name, None)

    def set(self, name: str, value: Any) -> bool:
        """Set a parameter where it was given, else as a keyword if the function takes it."""
        index = self._positional.get(name)
        if name not in self.kwargs and index is not None:
            self.args[index] = value
        elif name in self.kwargs or self._any_keyword or name in self._keywords:
            self.kwargs[name] = value
        else:
            return False
        return True

    def materialize(self, name: str) -> Any:
        """The argument, a one-shot iterable (the OpenAI SDK takes any) made a list first."""
        value = self.get(name)
        if isinstance(value, Iterator):
            value = list(value)
            self.set(name, value)
        return value

    # Request options sit at the top level (SDK keywords), in DashScope's native
    # ``parameters`` object, or in the OpenAI SDK's ``extra_body`` (``enable_thinking``).
    _NESTED = ("parameters", "extra_body")

    def option(self, name: str) -> Any:
        value = self.get(name)
        if _given(value):
            return value
        for nest in self._NESTED:
            inner = self.get(nest)
            value = inner.get(name) if isinstance(inner, Mapping) else None
            if _given(value):
                return value
        return None

    def set_option(self, name: str, value: Any) -> bool:
        if _given(self.get(name)):
            return self.set(name, value)
        for nest in self._NESTED:
            inner = self.get(nest)
            if isinstance(inner, Mapping) and _given(inner.get(name)):
                return self.set(nest, {**inner, name: value})
        if self.set(name, value):
            return True
        for nest in self._NESTED:
            inner = self.get(nest)
            if isinstance(inner, Mapping):
                return self.set(nest, {**inner, name: value})
        return False


# --------------------------------------------------------------------------------------
# Images: the model's rule from pixels when the size is known


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, JPEG, WebP or BMP header; None if unknown."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if data[:2] == b"BM":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            kind = data[12:16]
            if kind == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if kind == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        if data[:2] == b"\xff\xd8":  # JPEG: the first start-of-frame marker
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                    i += 2
                    continue
                length = struct.unpack(">H", data[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except (struct.error, IndexError):
        return None
    return None


def _image_bytes(source: Any) -> bytes | None:
    """The bytes of an image given inline (a ``data:`` URL or raw base64) or as a local
    file; None for a remote URL, whose size is unknown before sending."""
    if isinstance(source, Mapping):  # OpenAI's {"url": ...}
        source = source.get("url")
    if not isinstance(source, str):
        return None
    if source.startswith("data:"):
        _, _, payload = source.partition(",")
        try:
            return base64.b64decode(payload, validate=False)
        except ValueError:
            return None
    if source.startswith("file://"):
        try:
            with open(source[len("file://") :], "rb") as f:
                return f.read(1 << 16)
        except OSError:
            return None
    return None


def vision_tokens(width: int, height: int) -> int:
    """Input tokens of an image of ``width`` x ``height`` pixels, at most: one token per
    28-pixel patch (each side rounded up), at least 4 patches, plus 2 markers."""
    if width <= 0 or height <= 0:
        return IMAGE_MIN_PATCHES + VISION_MARKERS
    rows = max(1, math.ceil(height / IMAGE_PATCH))
    cols = max(1, math.ceil(width / IMAGE_PATCH))
    if rows * cols < IMAGE_MIN_PATCHES:  # small images are scaled up to the minimum
        beta = math.sqrt(IMAGE_MIN_PATCHES * IMAGE_PATCH**2 / (width * height))
        rows = math.ceil(height * beta / IMAGE_PATCH)
        cols = math.ceil(width * beta / IMAGE_PATCH)
    return rows * cols + VISION_MARKERS


def image_tokens(source: Any, cap: int) -> int:
    """The input bound of one image: from its pixels when its size is known, never above
    ``cap`` (the catalogue's per-image maximum), else ``cap``."""
    data = _image_bytes(source)
    size = _image_size(data) if data else None
    if size is None:
        return cap
    return min(cap, vision_tokens(*size))


# --------------------------------------------------------------------------------------
# The request: model, input bound, output bound


class _Request(NamedTuple):
    """What a call may bill at most (a tuple: made once per call, cheaply)."""

    model: str
    input_tokens: int
    max_tokens: int  # per choice, the answer
    thinking_tokens: int  # per choice, the reasoning (0 unless in thinking mode)
    choices: int
    thinking: bool
    kind: str = "realtime"

    @property
    def max_output(self) -> int:
        return (self.max_tokens + self.thinking_tokens) * self.choices


class _Input:
    """The input bound of one request, and what makes it unbounded."""

    def __init__(self, guard: Guard, call: _CallArgs, info: Mapping[str, Any]) -> None:
        self.guard = guard
        self.call = call
        self.image_cap = int(info.get("max_image_tokens") or IMAGE_TOKENS)
        self.extra = 0  # tokens of non-text parts (images, audio, video)
        self.unbounded: list[str] = []

    def _unbounded(self, what: str) -> None:
        if what not in self.unbounded:
            self.unbounded.append(what)

    def _text(self, text: str) -> str:
        if "fileid://" in text:
            self._unbounded("fileid://")
        return text

    def part(self, part: Mapping[str, Any]) -> str | None:
        """The text of one content part (OpenAI ``type`` or DashScope key style); the
        tokens of a non-text part go to ``extra``."""
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") or (
            kind is None and isinstance(part.get("text"), str)
        ):
            return self._text(str(part.get("text") or ""))
        if kind in ("image_url", "image", "input_image") or (kind is None and "image" in part):
            source = part.get("image_url") if kind == "image_url" else part.get("image")
            if kind == "input_image":
                source = part.get("image_url") or part.get("file_id")
            self.extra += image_tokens(source, self.image_cap)
            return None
        if kind in ("video_url", "video") or (kind is None and "video" in part):
            frames = part.get("video")
            if isinstance(frames, list | tuple):  # a video given as a list of frames
                self.extra += sum(image_tokens(f, self.image_cap) for f in frames)
            else:
                self.extra += VIDEO_TOKENS
            return None
        if kind in ("input_audio", "audio") or (kind is None and "audio" in part):
            self.extra += AUDIO_TOKENS
            return None
        if kind in ("file", "input_file") or (kind is None and "file" in part):
            self._unbounded("file input")
            return None
        return self._text(_json(part))  # unknown part: bound it by its text

    def content(self, content: Any) -> str:
        if isinstance(content, str):
            return self._text(content)
        texts: list[str] = []
        if isinstance(content, Mapping):
            content = [content]
        if isinstance(content, list | tuple):
            for part in content:
                part = _plain(part)
                if isinstance(part, Mapping):
                    text = self.part(part)
                    if text is not None:
                        texts.append(text)
                else:
                    texts.append(self._text(part if isinstance(part, str) else _json(part)))
        elif content is not None:
            texts.append(self._text(_json(content)))
        return "\n".join(texts)

    def message(self, msg: Any) -> dict[str, str]:
        """One chat message as the template renders it: role and text."""
        msg = _plain(msg)
        if not isinstance(msg, Mapping):
            msg = {"role": getattr(msg, "role", "user"), "content": getattr(msg, "content", None)}
        role = str(msg.get("role") or "user")
        texts = [self.content(msg.get("content"))]
        if isinstance(msg.get("reasoning_content"), str):
            texts.append(msg["reasoning_content"])
        calls = msg.get("tool_calls") or msg.get("function_call")
        if calls:
            calls = calls if isinstance(calls, list) else [calls]
            texts.extend(_tool_call_text(c) for c in calls)
        if role in ("tool", "function"):
            return {"role": role, "content": f"<tool_response>\n{texts[0]}\n</tool_response>"}
        if isinstance(msg.get("name"), str):
            texts.append(msg["name"])
        return {"role": role, "content": "\n".join(t for t in texts if t)}

    def responses_items(self, items: Any) -> list[dict[str, str]]:
        """Responses API ``input``: a string, or a list of messages and items."""
        if isinstance(items, str):
            return [{"role": "user", "content": self._text(items)}]
        chat: list[dict[str, str]] = []
        for item in items if isinstance(items, list | tuple) else [items]:
            item = _plain(item)
            kind = item.get("type") if isinstance(item, Mapping) else None
            if not isinstance(item, Mapping) or kind in (None, "message"):
                chat.append(self.message(item))
            elif kind == "function_call":
                chat.append({"role": "assistant", "content": _tool_call_text(item)})
            elif kind == "function_call_output":
                output = item.get("output")
                text = output if isinstance(output, str) else _json(output)
                chat.append({"role": "tool", "content": self._tool_result(text)})
            elif kind == "item_reference":
                self._unbounded("item_reference")
            else:
                chat.append({"role": "user", "content": self._text(_json(item))})
        return chat

    def _tool_result(self, text: str) -> str:
        return f"<tool_response>\n{self._text(text)}\n</tool_response>"

    def tools(self, tools: list[Any]) -> str:
        """The tools block of the system turn; built-in tools make the call unbounded."""
        plain = [_plain(t) for t in tools]
        for tool in plain:
            kind = tool.get("type", "function") if isinstance(tool, Mapping) else "function"
            if kind != "function":
                self._unbounded(f"built-in tool {kind!r}")
        text = TOOLS_HEADER + "".join("\n" + _json(t) for t in plain) + TOOLS_FOOTER
        if text.isascii():
            return text
        # The template may escape non-ASCII characters: bound by the longer form.
        escaped = TOOLS_HEADER + "".join("\n" + _json(t, ascii=True) for t in plain)
        return max(text, escaped + TOOLS_FOOTER, key=_count)


def _count(text: str) -> int:
    n = _core.count_tokens(text)
    return len(text.encode("utf-8")) if n is None else n


def _tool_call_text(call: Any) -> str:
    call = _plain(call)
    if not isinstance(call, Mapping):
        return _json(call)
    inner = call.get("function")
    fn: Mapping[str, Any] = inner if isinstance(inner, Mapping) else call
    name = fn.get("name", "")
    arguments = fn.get("arguments", {})
    # Qwen2.5's template encodes string arguments again; Qwen3's does not: the longer.
    args = _json(arguments)
    head = json.dumps(name, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {head}, "arguments": {args}}}\n</tool_call>'


def _embedding_input(value: Any) -> tuple[list[str], int]:
    """Texts, and the count of tokens given as token ids (OpenAI accepts both)."""
    if isinstance(value, str):
        return [value], 0
    if not isinstance(value, list | tuple):
        raise TypeError(f"cannot bound the input tokens of {type(value).__name__} input")
    texts: list[str] = []
    ids = 0
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, int):
            ids += 1
        elif isinstance(item, list | tuple):
            ids += len(item)
        else:
            raise TypeError(f"cannot bound the input tokens of {type(item).__name__} input")
    return texts, ids


def _input_tokens(
    guard: Guard, call: _CallArgs, info: Mapping[str, Any], endpoint: str | None
) -> tuple[int, list[str]]:
    """R8: an upper bound of the billed input tokens, and what makes it unbounded."""
    reader = _Input(guard, call, info)
    messages = call.materialize("messages")
    prompt = call.get("prompt")
    raw_input = call.materialize("input")
    text = call.get("text")  # MultiModalConversation's text-to-speech input
    history = call.get("history")  # Generation's deprecated [{"user":..,"bot":..}]
    instructions = call.get("instructions")  # the Responses API's system message
    if isinstance(raw_input, Mapping):  # DashScope's native body: input={"messages": ...}
        messages = messages if _given(messages) else raw_input.get("messages")
        prompt = prompt if _given(prompt) else raw_input.get("prompt")
        history = history if _given(history) else raw_input.get("history")
        text = text if _given(text) else raw_input.get("text")
        raw_input = raw_input.get("texts")
    for name in ("tools", "functions"):
        call.materialize(name)
    tools = [
        t
        for group in (call.option("tools"), call.option("functions"))
        if _given(group) and group
        for t in group
    ]
    for flag in ("enable_search", "enable_code_interpreter"):
        if call.option(flag):
            reader._unbounded(flag)
    if _given(call.option("plugins")):
        reader._unbounded("plugins")
    for name in ("previous_response_id", "conversation"):
        if _given(call.get(name)):
            reader._unbounded(name)

    documents = call.get("documents")
    query = call.get("query")
    if _given(documents) and _given(query):  # a reranker: every (query, document) pair
        docs = [d if isinstance(d, str) else _json(d) for d in documents]
        q = query if isinstance(query, str) else _json(query)
        instruct = call.option("instruct")
        pairs = [f"{instruct or ''}\n{q}\n{d}" for d in docs]
        tokens = guard._core.input_bound(input=pairs, extra_tokens=RERANK_PAIR_TOKENS * len(docs))
        return tokens, reader.unbounded

    chat: list[dict[str, str]] = []
    if _given(instructions) and instructions:
        chat.append({"role": "system", "content": reader._text(str(instructions))})
    for turn in history if _given(history) else ():
        for role, said in turn.items() if isinstance(turn, Mapping) else ():
            chat.append({"role": "user" if role == "user" else "assistant", "content": str(said)})
    for msg in messages if _given(messages) else ():
        chat.append(reader.message(msg))
    if endpoint == "responses" and _given(raw_input):
        chat.extend(reader.responses_items(raw_input))
        raw_input = None
    if endpoint == "completions" and isinstance(prompt, list | tuple):
        prompts = [p if isinstance(p, str) else _json(p) for p in prompt]
        bound = sum(guard._core.input_bound(prompt=reader._text(p)) for p in prompts)
        return bound, reader.unbounded
    said = [s if isinstance(s, str) else _json(s) for s in (prompt, text) if _given(s) and s]
    if len(said) == 1 and not chat and not tools and not _given(messages):
        if endpoint not in ("embeddings",):
            return guard._core.input_bound(prompt=reader._text(said[0])), reader.unbounded
    chat.extend({"role": "user", "content": reader._text(s)} for s in said)
    if tools:
        block = reader.tools(tools)
        system = next((m for m in chat if m["role"] == "system"), None)
        if system is None:
            chat.insert(0, {"role": "system", "content": QWEN_DEFAULT_SYSTEM + block})
        else:
            system["content"] += block
    if chat or _given(messages):
        return guard._core.input_bound(messages=chat, extra_tokens=reader.extra), reader.unbounded
    if _given(raw_input):
        if endpoint == "multimodal_embedding" or (
            isinstance(raw_input, list | tuple) and any(isinstance(x, Mapping) for x in raw_input)
        ):
            parts = [_plain(x) for x in raw_input]
            texts = [reader.content([p]) for p in parts]
            return (
                guard._core.input_bound(input=[t for t in texts if t], extra_tokens=reader.extra),
                reader.unbounded,
            )
        texts, ids = _embedding_input(raw_input)
        instruct = call.option("instruct")
        if isinstance(instruct, str):
            texts.append(instruct)
        return guard._core.input_bound(
            input=texts, extra_tokens=reader.extra + ids
        ), reader.unbounded
    raise TypeError(
        "a guarded call needs messages=, prompt= or input= to bound its input tokens (R8)"
    )


def _thinking(call: _CallArgs, info: Mapping[str, Any]) -> bool:
    """Thinking mode: as the call says, else the model's default (the catalogue)."""
    mode = info.get("thinking", "none")
    if mode == "always":
        return True
    asked = call.option("enable_thinking")
    if asked is not None:
        return bool(asked)
    reasoning = _plain(call.get("reasoning"))  # the Responses API's {"effort": ...}
    if isinstance(reasoning, Mapping) and _given(reasoning.get("effort")):
        return bool(reasoning.get("effort") != "none")
    return bool(mode == "default")


def read_request(
    guard: Guard,
    call: _CallArgs,
    *,
    model: str | None = None,
    input_tokens: int | None = None,
    max_output: int | None = None,
    max_input_tokens: int | None = None,
    endpoint: str | None = None,
    kind: str = "realtime",
) -> _Request:
    """What a call may bill at most; raises ``FreeTierOnly`` (``"unbounded"``) for input
    that cannot be bounded under Free Quota Only when no bound is stated."""
    if model is None:
        model = call.get("model")
    if not isinstance(model, str) or not model:
        raise TypeError("a guarded call needs a model: pass model= to the call or to wrap()")
    info = guard._core.model_info(model)
    stated = call.pop("max_input_tokens")
    if stated is None:
        stated = max_input_tokens
    if stated is not None and (_int(stated) is None or stated < 0):
        raise ValueError(f"max_input_tokens must be a non-negative int, not {stated!r}")
    if input_tokens is None:
        input_tokens, unbounded = _input_tokens(guard, call, info, endpoint)
        if unbounded:
            if stated is None:
                guard._core._check_uncounted(model, "unbounded", ", ".join(unbounded))
            else:
                input_tokens = max(input_tokens, stated)
    if max_output is not None:
        return _Request(model, input_tokens, max_output, 0, 1, thinking=False, kind=kind)
    max_tokens = _int(call.option("max_tokens"))
    for name in ("max_completion_tokens", "max_output_tokens"):
        if max_tokens is None:
            max_tokens = _int(call.option(name))
    if max_tokens is None:
        max_tokens = int(
            info.get("default_max_output_tokens") or guard._core.default_max_output(model)
        )
    thinking = _thinking(call, info)
    thinking_tokens = 0
    if thinking:
        budget = _int(call.option("thinking_budget"))
        thinking_tokens = budget if budget is not None else int(info["max_reasoning_tokens"])
    choices = max(1, _int(call.option("n")) or 1, _int(call.option("best_of")) or 1)
    prompt = call.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list | tuple):
        choices *= max(1, len(prompt))  # the legacy API completes each prompt
    return _Request(model, input_tokens, max_tokens, thinking_tokens, choices, thinking, kind)


def reserve(guard: Guard, call: _CallArgs, request: _Request, clip: bool) -> Reservation:
    """Reserve the worst case; with ``clip``, shrink the call's max tokens to what is left."""
    try:
        return guard._core.reserve(
            request.model,
            request.input_tokens,
            request.max_output,
            request.kind,
            thinking=request.thinking,
        )
    except FreeTierOnly as refused:
        if not clip or isinstance(refused, AccountOverdue):
            raise
        per_choice = (
            guard._core.remaining(request.model) - request.input_tokens
        ) // request.choices
        if request.thinking_tokens:
            thinking = min(request.thinking_tokens, per_choice // 2)
            answer = min(request.max_tokens, per_choice - thinking)
        else:
            thinking, answer = 0, min(request.max_tokens, per_choice)
        if answer < 1 or (request.thinking_tokens and thinking < 1):
            raise  # not even one output token fits
        limit = "max_tokens"
        for name in ("max_completion_tokens", "max_output_tokens"):
            if call.option(name) is not None and call.option("max_tokens") is None:
                limit = name
        done = call.set_option(limit, answer)
        if request.thinking_tokens:
            done = done and call.set_option("thinking_budget", thinking)
        if not done:
            raise  # the function takes no max tokens: it cannot be clipped
        out = (answer + thinking) * request.choices
        return guard._core.reserve(
            request.model, request.input_tokens, out, request.kind, thinking=request.thinking
        )


def reserve_with_fallback(
    guard: Guard, call: _CallArgs, request: _Request, options: Options
) -> tuple[Reservation, _Request]:
    """R16: the call's own model when its free quota covers the whole worst case, else
    the first fallback model whose free quota does, with the call's ``model`` rewritten
    and nothing else changed. A call is never moved from free to paid: when no listed
    model covers it free, it is reserved as it would be without fallback (refused under
    Free Quota Only, clipped with ``clip=True``, or paid where paying is allowed)."""
    if not options.fallback or request.kind != "realtime":
        return reserve(guard, call, request, options.clip), request
    for model in dict.fromkeys((request.model, *options.fallback)):
        candidate = request
        if model != request.model:
            candidate = read_request(
                guard,
                call,
                model=model,
                input_tokens=request.input_tokens,
                max_output=options.max_output,
                max_input_tokens=options.max_input_tokens,
                endpoint=options.endpoint,
                kind=request.kind,
            )
        try:
            held = guard._core.reserve(
                model,
                candidate.input_tokens,
                candidate.max_output,
                candidate.kind,
                thinking=candidate.thinking,
            )
        except FreeTierOnly as refused:
            if isinstance(refused, AccountOverdue):
                raise
            continue
        if held.free_tokens >= held.worst_case:
            if model == request.model or call.set("model", model):
                return held, candidate
            held.release()
            raise TypeError(
                f"fallback to {model!r}: the guarded function takes no model argument to set"
            )
        held.release()  # partly paid: try the next model
    return reserve(guard, call, request, options.clip), request


# --------------------------------------------------------------------------------------
# Reading responses: usage, errors, the end of a stream


@dataclass(frozen=True)
class _Usage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_creation_tokens: int = 0
    explicit_cache: bool = False
    reasoning_tokens: int = 0
    request_id: str | None = None


_INPUT_DETAILS = ("prompt_tokens_details", "input_tokens_details")


def _detail(usage: Any, groups: tuple[str, ...], name: str) -> int:
    for group in groups:
        value = _int(_field(_field(usage, group), name))
        if value:
            return value
    return 0


def _request_id(obj: Any) -> str | None:
    for name in ("request_id", "id", "_request_id"):
        value = _field(obj, name)
        if isinstance(value, str) and value:
            return value
    return None


def _usage(obj: Any) -> _Usage | None:
    """Usage of a DashScope response, an OpenAI object, or a dict with the same fields."""
    usage = _field(obj, "usage")
    if usage is None:
        return None
    inp = _int(_field(usage, "input_tokens"))
    if inp is None:
        inp = _int(_field(usage, "prompt_tokens"))
    out = _int(_field(usage, "output_tokens"))
    if out is None:
        out = _int(_field(usage, "completion_tokens"))
    total = _int(_field(usage, "total_tokens"))
    if inp is None and total is not None:  # DashScope embeddings report only the total
        inp = total - (out or 0)
    images = _int(_field(usage, "image_tokens"))
    if images and _int(_field(usage, "input_tokens")) is None and total is None:
        inp = (inp or 0) + images  # multimodal embeddings: text tokens + image tokens
    if not inp and not out:
        # DashScope fills an absent usage with zeros; a real call bills at least one token.
        return None
    cache_type = ""
    for group in _INPUT_DETAILS:
        value = _field(_field(usage, group), "cache_type")
        if isinstance(value, str):
            cache_type = value
    created = _detail(usage, _INPUT_DETAILS, "cache_creation_input_tokens")
    return _Usage(
        input_tokens=inp or 0,
        output_tokens=out or 0,
        cached_tokens=_detail(usage, _INPUT_DETAILS, "cached_tokens"),
        cache_creation_tokens=created,
        explicit_cache=cache_type == "ephemeral" or created > 0,
        reasoning_tokens=_detail(
            usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens"
        ),
        request_id=_request_id(obj),
    )


def _returned_error(obj: Any) -> tuple[str, str] | None:
    """(code, message) of an error DashScope returned instead of raising, or a dict's error."""
    status = _field(obj, "status_code")
    if _int(status) is not None and status != 200:
        code, message = _field(obj, "code"), _field(obj, "message")
        return (code if isinstance(code, str) else "", message if isinstance(message, str) else "")
    error = _field(obj, "error") if isinstance(obj, Mapping) else None
    if isinstance(error, Mapping):
        code = error.get("code") or error.get("type")
        message = error.get("message")
        return (code if isinstance(code, str) else "", message if isinstance(message, str) else "")
    return None


def _raised_error(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) of a service error raised by an SDK (OpenAI's ``APIError``)."""
    if isinstance(exc, QuotaGuardError):  # a refusal of a nested guarded call, not the service
        return None
    code = getattr(exc, "code", None)
    if not isinstance(code, str) or not code:
        body = getattr(exc, "body", None)
        if isinstance(body, Mapping):
            inner = body.get("error", body)
            code = _field(inner, "code") or _field(inner, "type")
    if not isinstance(code, str) or not code:
        return None
    message = getattr(exc, "message", None)
    return code, message if isinstance(message, str) else str(exc)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """An exception, its causes and contexts, and the ``reason`` urllib3 wraps."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        todo.extend(a for a in e.args if isinstance(a, BaseException))


# Errors raised before a request could leave: no connection was made.
_NOT_SENT = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "PoolTimeout",
        "NewConnectionError",
        "ConnectTimeoutError",
        "NameResolutionError",
        "ClientConnectorError",
        "ClientConnectorDNSError",
        "ClientConnectorSSLError",
        "ClientConnectorCertificateError",
        "ConnectionTimeoutError",
        "UnsupportedProtocol",
        "InvalidURL",
        "MissingSchema",
        "InvalidSchema",
    }
)


def never_sent(exc: BaseException) -> bool:
    """True when ``exc`` shows the request never left: the connection was never made."""
    for e in _chain(exc):
        if type(e).__name__ in _NOT_SENT or isinstance(e, ConnectionRefusedError | socket.gaierror):
            return True
    return False


def answered(exc: BaseException) -> bool:
    """True when ``exc`` is an HTTP error answer (4xx or 5xx): the service billed nothing."""
    for e in _chain(exc):
        for value in (
            getattr(e, "status_code", None),
            getattr(getattr(e, "response", None), "status_code", None),
            getattr(e, "status", None),
        ):
            status = _int(value)
            if status is not None and 400 <= status <= 599:
                return True
    return False


def _choices(chunk: Any) -> Any:
    output = _field(chunk, "output")
    return _field(output, "choices") if output is not None else _field(chunk, "choices")


def _finished(obj: Any) -> bool:
    reason = _field(obj, "finish_reason")
    return isinstance(reason, str) and reason not in ("", "null")


_warned_no_usage: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(
    key: str, message: str, category: type[Warning], registry: set[str], stacklevel: int = 4
) -> None:
    """``warnings.warn`` once per key and process."""
    with _warned_lock:
        if key in registry:
            return
        registry.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


# --------------------------------------------------------------------------------------
# One guarded call


class _Call:
    """A reservation and what the service has reported so far; ends exactly once.

    ``sent``: whether the request may have reached the service (None: unknown, as for a
    decorated function; the SDK wrappers know).
    """

    def __init__(
        self,
        guard: Guard,
        request: _Request,
        reservation: Reservation,
        *,
        hide_usage_chunk: bool = False,
        sent: bool | None = None,
        name: str | None = None,
    ) -> None:
        self._guard = guard
        self._request = request
        self._reservation = reservation
        self._hide_usage_chunk = hide_usage_chunk
        self.sent = sent
        self._name = name
        self._lock = threading.Lock()
        self._ended = False
        self._chunks = 0
        self._total: _Usage | None = None  # an OpenAI-style final usage chunk
        self._by_choice: dict[int, _Usage] = {}  # DashScope's cumulative usage, per choice
        self._finished: set[int] = set()
        self.record: object | None = None

    @property
    def request(self) -> _Request:
        return self._request

    # ending the reservation ------------------------------------------------------------

    def _claim(self) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            return True

    def settle(self, usage: _Usage) -> None:
        if self._claim():
            self._settle_claimed(usage)

    def _settle_claimed(self, usage: _Usage) -> None:
        # A call made in thinking mode is priced as one (R13), reasoning reported or not.
        thinking = self._request.thinking or usage.reasoning_tokens > 0
        self.record = self._reservation.settle(
            usage.input_tokens,
            usage.output_tokens,
            usage.request_id,
            cached_tokens=min(usage.cached_tokens, usage.input_tokens),
            cache_creation_tokens=min(
                usage.cache_creation_tokens,
                max(0, usage.input_tokens - usage.cached_tokens),
            ),
            explicit_cache=usage.explicit_cache,
            thinking=thinking,
        )

    def release(self) -> None:
        if self._claim():
            self._reservation.release(failed=True)

    def worst_case(self, *, in_doubt: bool) -> None:
        if self._claim():
            self.record = self._reservation.settle_worst_case(in_doubt=in_doubt)

    def renew(self) -> None:
        """The SDK sends the request again (a retry): the attempt before ends (in doubt
        unless it provably never left) and this one reserves anew (R9: each attempt is
        a call of its own). A refused attempt raises and is not sent."""
        with self._lock:
            if self._ended:
                return
            old = self._reservation
            self._ended = True
        if self.sent is False:
            old.release(failed=True)
        else:
            old.settle_worst_case(in_doubt=True)
        self._reservation = self._guard._core.reserve(
            self._request.model,
            self._request.input_tokens,
            self._request.max_output,
            self._request.kind,
            thinking=self._request.thinking,
        )
        self.sent = None
        with self._lock:
            self._ended = False
            self._chunks = 0
            self._total = None
            self._by_choice.clear()
            self._finished.clear()

    def _service_error(self, code: str, message: str) -> BaseException | None:
        if not code:
            return None
        return self._guard.service_error(self._request.model, code, message)

    # outcomes --------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> BaseException:
        """End the reservation for a call that raised; the exception to raise instead."""
        error = _raised_error(exc)
        usage = self._seen()
        if isinstance(exc, QuotaGuardError):
            self.release()  # a refusal of a nested call or a retry: this one never left
        elif (error is not None and error[0] in QUOTA_CODES) or answered(exc):
            if usage is not None:
                self.settle(usage)  # a stream that reported usage before the error
            else:
                self.release()
        elif self.sent is False or (self.sent is None and never_sent(exc)):
            self.release()
        elif usage is not None and self._final():
            self.settle(usage)
        else:  # it may have reached the service: never under-count
            self.worst_case(in_doubt=True)
        mapped = self._service_error(*error) if error else None
        return mapped if mapped is not None else exc

    def finish(self, result: Any) -> Any:
        """Settle on a returned result; a stream is wrapped to settle when it ends."""
        if type(result) is not dict:  # a plain dict (a JSON body) is neither of these
            if hasattr(result, "__anext__"):
                return GuardedAsyncStream(result, self)
            if hasattr(result, "__next__"):
                return GuardedStream(result, self)
            if inspect.isawaitable(result):  # a plain function that returned a coroutine
                return self._finish_awaitable(result)
        error = _returned_error(result)
        if error is not None:
            self.release()
            mapped = self._service_error(*error)
            if mapped is not None:
                raise mapped
            return result  # DashScope's style: errors are returned, not raised
        if type(result) is dict:  # a JSON body: one step into the core reads and settles it
            if self._claim():
                done = self._reservation._settle_from(result)
                if done is None:  # a shape the core leaves to the reading here
                    self._end_claimed(_usage(result), result)
                else:
                    self.record, found = done
                    if not found:
                        self._warn_no_usage()
            return result
        usage = _usage(result)
        if usage is None and self._request.max_output + self._request.input_tokens == 0:
            usage = _Usage(0, 0, request_id=_request_id(result))  # a batch: nothing reserved
        if usage is None:
            self.no_usage()
        else:
            self.settle(usage)
        return result

    def _end_claimed(self, usage: _Usage | None, result: Any) -> None:
        if usage is None and self._request.max_output + self._request.input_tokens == 0:
            usage = _Usage(0, 0, request_id=_request_id(result))  # a batch: nothing reserved
        if usage is None:
            self.record = self._reservation.settle_worst_case(in_doubt=False)
            self._warn_no_usage()
        else:
            self._settle_claimed(usage)

    def no_usage(self) -> None:
        """A result without usage: the worst case, with a warning once per function."""
        self.worst_case(in_doubt=False)
        self._warn_no_usage(stacklevel=5)

    def _warn_no_usage(self, stacklevel: int = 4) -> None:
        name = self._name or "a guarded call"
        warn_once(
            name,
            f"{name} returned no usage: its calls are recorded at their worst case "
            f"({self._request.input_tokens + self._request.max_output:,} tokens for this one)",
            NoUsageWarning,
            _warned_no_usage,
            stacklevel,
        )

    async def _finish_awaitable(self, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except BaseException as exc:
            _raise_for(self, exc)
        return self.finish(result)

    # streams ---------------------------------------------------------------------------

    def _seen(self) -> _Usage | None:
        if self._total is not None:
            return self._total
        if not self._by_choice:
            return None
        parts = list(self._by_choice.values())
        return _Usage(
            input_tokens=max(u.input_tokens for u in parts),
            output_tokens=sum(u.output_tokens for u in parts),
            cached_tokens=max(u.cached_tokens for u in parts),
            cache_creation_tokens=max(u.cache_creation_tokens for u in parts),
            explicit_cache=any(u.explicit_cache for u in parts),
            reasoning_tokens=sum(u.reasoning_tokens for u in parts),
            request_id=parts[-1].request_id,
        )

    def _final(self) -> bool:
        return self._total is not None or len(self._finished) >= self._request.choices

    def observe(self, chunk: Any) -> bool:
        """Take note of one streamed chunk; False if the caller must not see it."""
        self._chunks += 1
        error = _returned_error(chunk)
        if error is not None:  # an in-stream error (DashScope's chunk, OpenAI's frame)
            usage = self._seen()
            if usage is not None:
                self.settle(usage)
            else:
                self.release()
            mapped = self._service_error(*error)
            if mapped is not None:
                raise mapped
            return True
        kind = _field(chunk, "type")
        if isinstance(kind, str) and kind.startswith("response."):  # the Responses API
            usage = _usage(_field(chunk, "response"))
            if usage is not None and kind in (
                "response.completed",
                "response.incomplete",
                "response.failed",
            ):
                self._total = usage
            return True
        usage = _usage(chunk)
        choices = _choices(chunk)
        if usage is not None and not choices and _field(chunk, "output") is None:
            self._total = usage  # OpenAI's usage chunk: no choices, the totals
            return not self._hide_usage_chunk
        first = choices[0] if choices else None
        index = _int(_field(first, "index")) or 0
        if usage is not None:
            self._by_choice[index] = usage  # cumulative: the last one counts
        if _finished(_field(chunk, "output")) or any(_finished(c) for c in choices or ()):
            self._finished.add(index)
        return True

    def end_stream(self) -> None:
        """The stream ended, was closed or dropped: settle what it reported, if final;
        else the worst case, in doubt (the real usage never arrived)."""
        usage = self._seen()
        if usage is not None and self._final():
            self.settle(usage)
        else:
            self.worst_case(in_doubt=True)

    @property
    def ended(self) -> bool:
        return self._ended


def _raise_for(call: _Call, exc: BaseException) -> NoReturn:
    mapped = call.fail(exc)
    if mapped is exc:
        raise exc
    raise mapped from exc


class GuardedStream:
    """A stream that settles its call's reservation when it ends, however it ends.

    Iterate it like the SDK's stream; ``close()``, ``with`` and being garbage-collected
    end the reservation too (at the worst case, in doubt, unless the final usage was
    seen). Other attributes are the wrapped stream's.
    """

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._call = call

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                chunk = next(self._inner)
            except StopIteration:
                self._call.end_stream()
                raise
            except BaseException as exc:
                _raise_for(self._call, exc)
            try:
                show = self._call.observe(chunk)
            except BaseException:
                self._close_inner()
                raise
            if show:
                return chunk

    def _close_inner(self) -> None:
        close = getattr(self._inner, "close", None)
        if callable(close):
            close()

    def close(self) -> None:
        try:
            self._close_inner()
        finally:
            self._call.end_stream()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._call.ended:
            try:
                self.close()
            except Exception:  # a finaliser must not raise; the lease expires otherwise
                pass

    def __getattr__(self, name: str) -> Any:
        if name in ("_inner", "_call"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class GuardedAsyncStream:
    """The async counterpart of :class:`GuardedStream` (``aclose()``, ``async with``)."""

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._call = call

    def __aiter__(self) -> GuardedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                chunk = await self._inner.__anext__()
            except StopAsyncIteration:
                self._call.end_stream()
                raise
            except BaseException as exc:
                _raise_for(self._call, exc)
            try:
                show = self._call.observe(chunk)
            except BaseException:
                await self._close_inner()
                raise
            if show:
                return chunk

    async def _close_inner(self) -> None:
        close = getattr(self._inner, "aclose", None) or getattr(self._inner, "close", None)
        if callable(close):
            result = close()
            if inspect.isawaitable(result):
                await result

    async def aclose(self) -> None:
        try:
            await self._close_inner()
        finally:
            self._call.end_stream()

    async def close(self) -> None:
        await self.aclose()

    async def __aenter__(self) -> GuardedAsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Nothing can be awaited here: the inner stream is finalised by its own owner.
        if not self._call.ended:
            try:
                self._call.end_stream()
            except Exception:
                pass

    def __getattr__(self, name: str) -> Any:
        if name in ("_inner", "_call"):
            raise AttributeError(name)
        return getattr(self._inner, name)


# --------------------------------------------------------------------------------------
# Entry points


@dataclass(frozen=True)
class Options:
    """How a wrapper guards its calls."""

    model: str | None = None
    kind: str = "realtime"
    clip: bool = False
    input_tokens: int | None = None
    max_output: int | None = None
    max_input_tokens: int | None = None
    # R16: models to send a call to, unchanged otherwise, when its own model's free
    # quota cannot cover it.
    fallback: tuple[str, ...] = ()
    hide_usage_chunk: bool = False
    endpoint: str | None = None
    name: str | None = None


def begin(
    guard: Guard,
    call_args: _CallArgs,
    options: Options,
    *,
    sent: bool | None = None,
) -> _Call:
    """Read the request and reserve its worst case: a call ready to be sent."""
    request = read_request(
        guard,
        call_args,
        model=options.model,
        input_tokens=options.input_tokens,
        max_output=options.max_output,
        max_input_tokens=options.max_input_tokens,
        endpoint=options.endpoint,
        kind=options.kind,
    )
    reservation, request = reserve_with_fallback(guard, call_args, request, options)
    return _Call(
        guard,
        request,
        reservation,
        hide_usage_chunk=options.hide_usage_chunk,
        sent=sent,
        name=options.name,
    )


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def call_guarded(
    guard: Guard,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options = Options(),
    *,
    on_call: Callable[[_Call, _CallArgs], None] | None = None,
) -> Any:
    """Call ``fn(*args, **kwargs)`` under a reservation (see :func:`wrap`).

    ``on_call(call, args)`` runs after the reservation, before the call (the SDK
    wrappers attach a transport hook there).
    """
    call_args = _CallArgs(fn, args, kwargs)
    call = begin(guard, call_args, options)
    if on_call is not None:
        on_call(call, call_args)
    try:
        result = fn(*call_args.args, **call_args.kwargs)
    except BaseException as exc:
        _raise_for(call, exc)
    return call.finish(result)


async def acall_guarded(
    guard: Guard,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: Options = Options(),
    *,
    on_call: Callable[[_Call, _CallArgs], None] | None = None,
) -> Any:
    """The async counterpart of :func:`call_guarded`, for coroutine functions."""
    call_args = _CallArgs(fn, args, kwargs)
    call = begin(guard, call_args, options)
    if on_call is not None:
        on_call(call, call_args)
    try:
        result = await fn(*call_args.args, **call_args.kwargs)
    except BaseException as exc:
        _raise_for(call, exc)
    return call.finish(result)


def fallback_models(models: Sequence[str] | str | None) -> tuple[str, ...]:
    """A fallback list, checked: model names, in order."""
    if models is None:
        return ()
    if isinstance(models, str):
        raise TypeError(f"fallback must be a list of model names, not the string {models!r}")
    names = tuple(models)
    for m in names:
        if not isinstance(m, str) or not m.strip():
            raise TypeError(f"fallback must hold model names, not {m!r}")
    return names


@overload
def wrap(
    guard: Guard,
    fn: Callable[P, R],
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] | None = None,
) -> Callable[P, R]: ...


@overload
def wrap(
    guard: Guard,
    fn: None = None,
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def wrap(
    guard: Guard,
    fn: Callable[P, R] | None = None,
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Guard a function that calls the service: ``@guard.wrap`` or ``@guard.wrap(...)``.

    The model comes from ``model`` or the call's ``model=`` argument; the input bound
    from its ``messages`` / ``prompt`` / ``input`` (also DashScope's ``input={...}``);
    the output bound from ``max_tokens`` or ``max_completion_tokens`` (top level, in
    ``parameters=`` or ``extra_body=``), else the catalogue's default for the model. An
    argument the call does not pass is read from the function's own defaults. In
    thinking mode (asked for, or the model's default) the reasoning is reserved too:
    ``thinking_budget``, else the model's longest chain of thought.

    Input that cannot be bounded (``enable_search``, built-in tools, ``fileid://``) is
    refused under Free Quota Only unless ``max_input_tokens`` (here, or as a keyword of
    one call, which is consumed) states a bound. With ``clip=True`` a call that would be
    refused has its max tokens shrunk to what is left instead, and is refused only if
    not even one output token fits. With ``fallback=[models]`` a call whose model's free
    quota cannot cover it goes, unchanged otherwise, to the first listed model whose free
    quota can (the function must take a ``model`` argument); it never moves a call from
    free to paid.

    Sync and async functions are supported; a returned stream (generator, async
    generator, SDK stream) comes back wrapped in :class:`GuardedStream` or
    :class:`GuardedAsyncStream`, which settle when the stream ends. A function that
    raises is in doubt (its worst case, ``in_doubt=True``) unless the error shows that
    nothing was sent or billed (a connection never made, an HTTP error answer); one
    that returns no usage is settled at its worst case, with a warning once.
    """

    fallback_list = fallback_models(fallback)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        options = Options(
            model=model,
            kind=kind,
            clip=clip,
            max_input_tokens=max_input_tokens,
            fallback=fallback_list,
            name=_name_of(func),
        )
        if inspect.iscoroutinefunction(func):
            async_func = cast(Callable[..., Awaitable[Any]], func)

            @functools.wraps(func)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                return await acall_guarded(guard, async_func, args, kwargs, options)

            return cast(Callable[P, R], _entry(guarded_async))

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return call_guarded(guard, func, args, kwargs, options)

        return cast(Callable[P, R], _entry(guarded))  # a refusal's traceback: the caller's

    return decorate if fn is None else decorate(fn)
