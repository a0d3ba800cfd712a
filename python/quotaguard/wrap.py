"""The machinery behind ``@guard.wrap``: reserve before a call, settle after it.

A guarded call reads the request (model, an upper bound of its input tokens, the most
output it allows), reserves that worst case (R8), calls the function, then reads the
usage the service reports and settles (R9). Every way out ends the reservation: a
result, an exception, ``KeyboardInterrupt``, asyncio cancellation, a stream read to
its end, closed early or dropped. A service answer ``AllocationQuota.FreeTierOnly`` or
``Arrearage`` updates the ledger (R12) and raises the matching quotaguard exception.

Knowledge of SDK shapes lives here and in :mod:`quotaguard.clients` only. Neither SDK
is imported: DashScope responses are dicts, OpenAI objects are read by attribute.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, Protocol, TypeVar, cast, overload

from .exceptions import AccountOverdue, FreeTierOnly, QuotaGuardError

__all__ = ["GuardedAsyncStream", "GuardedStream", "wrap"]

P = ParamSpec("P")
R = TypeVar("R")

# Service answers that R12 turns into ledger updates. Only used to choose how a failed
# stream ends; the mapping to exceptions is the guard's (``guard.service_error``).
QUOTA_CODES = frozenset({"AllocationQuota.FreeTierOnly", "Arrearage"})

# Upper bounds of the input tokens a non-text content part can bill. An image is at
# most 16,384 tokens on Qwen-VL (with ``vl_high_resolution_images``); a video as a URL
# is bounded by a 128K context window, a video given as frames by 16,384 per frame.
IMAGE_TOKENS = 16_384
VIDEO_TOKENS = 131_072
AUDIO_TOKENS = 32_768
# What the chat template adds around function calling: the tools preamble, and the
# <tool_call> / <tool_response> wrappers of each call and answer in the history.
TOOLS_PREAMBLE_TOKENS = 256
TOOL_TURN_TOKENS = 16


class Reservation(Protocol):
    """The part of ``quotaguard.Reservation`` this module uses."""

    def settle(
        self,
        input_tokens: int,
        output_tokens: int,
        request_id: str | None = None,
        *,
        cached_tokens: int = 0,
        thinking: bool = False,
    ) -> object: ...

    def release(self, *, failed: bool = False) -> None: ...

    def settle_worst_case(self) -> object: ...


class Guard(Protocol):
    """The part of ``quotaguard.QuotaGuard`` this module uses."""

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
        extra_tokens: int = 0,
    ) -> int: ...

    def default_max_output(self, model: str) -> int: ...

    def remaining(self, model: str) -> int: ...

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


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_jsonable)


@dataclass(frozen=True)
class _Shape:
    """What a function's signature says about where arguments go."""

    positional: tuple[str, ...]  # names of the leading positional parameters, in order
    keywords: frozenset[str]
    any_keyword: bool  # takes **kwargs (or its signature is unknown)


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
    )


def _shape(fn: Callable[..., Any]) -> _Shape:
    # Bound methods are new objects on every attribute access: cache on the function.
    func = getattr(fn, "__func__", None)
    try:
        if func is not None and getattr(fn, "__self__", None) is not None:
            return _shape_of(func, True)
        return _shape_of(fn, False)
    except TypeError:  # unhashable callable
        return _shape_of.__wrapped__(fn, False)


class _CallArgs:
    """The arguments of one call, readable and rewritable by parameter name."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args = list(args)
        self.kwargs = dict(kwargs)
        shape = _shape(fn)
        self._positional = {name: i for i, name in enumerate(shape.positional[: len(args)])}
        self._keywords = shape.keywords
        self._any_keyword = shape.any_keyword

    def get(self, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        index = self._positional.get(name)
        return self.args[index] if index is not None else None

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
# The request: model, input bound, output bound


def _part_tokens(part: Mapping[str, Any]) -> tuple[str | None, int]:
    """(text, extra tokens) of one content part, OpenAI (``type``) or DashScope (key) style."""
    kind = part.get("type")
    if kind in ("text", "input_text") or (kind is None and isinstance(part.get("text"), str)):
        return str(part.get("text") or ""), 0
    if kind in ("image_url", "image", "input_image") or (kind is None and "image" in part):
        return None, IMAGE_TOKENS
    if kind in ("video_url", "video") or (kind is None and "video" in part):
        frames = part.get("video")
        if isinstance(frames, list | tuple):  # a video given as a list of frames
            return None, IMAGE_TOKENS * len(frames)
        return None, VIDEO_TOKENS
    if kind in ("input_audio", "audio") or (kind is None and "audio" in part):
        return None, AUDIO_TOKENS
    return _json(part), 0  # unknown part: bound it by its text


def _message(msg: Any) -> tuple[dict[str, str], int]:
    """One chat message flattened to ``{"role", "content"}`` text, plus its extra tokens."""
    if not isinstance(msg, Mapping):  # an SDK message object appended to the history
        dump = getattr(msg, "model_dump", None)
        msg = (
            dump(exclude_none=True)
            if callable(dump)
            else {
                "role": getattr(msg, "role", "user"),
                "content": getattr(msg, "content", None),
            }
        )
    texts: list[str] = []
    extra = 0
    content = msg.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list | tuple):
        for part in content:
            if isinstance(part, Mapping):
                text, tokens = _part_tokens(part)
                extra += tokens
                if text is not None:
                    texts.append(text)
            else:
                texts.append(part if isinstance(part, str) else _json(part))
    elif content is not None:
        texts.append(_json(content))
    for key in ("reasoning_content", "name"):
        if isinstance(msg.get(key), str):
            texts.append(msg[key])
    for key in ("tool_calls", "function_call"):
        calls = msg.get(key)
        if calls:
            texts.append(_json(calls))
            extra += TOOL_TURN_TOKENS * (len(calls) if isinstance(calls, list) else 1)
    role = str(msg.get("role") or "user")
    if role in ("tool", "function"):
        extra += TOOL_TURN_TOKENS
    return {"role": role, "content": "\n".join(texts)}, extra


@dataclass(frozen=True)
class _Request:
    model: str
    input_tokens: int
    max_tokens: int  # per choice, the answer
    thinking_tokens: int  # per choice, the reasoning (0 unless thinking was asked for)
    choices: int
    thinking: bool

    @property
    def max_output(self) -> int:
        return (self.max_tokens + self.thinking_tokens) * self.choices


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


def _input_tokens(guard: Guard, call: _CallArgs) -> int:
    """R8: an upper bound of the billed input tokens, from messages / prompt / input."""
    messages = call.materialize("messages")
    prompt = call.get("prompt")
    raw_input = call.materialize("input")
    text = call.get("text")  # MultiModalConversation's text-to-speech input
    history = call.get("history")  # Generation's deprecated [{"user":..,"bot":..}]
    if isinstance(raw_input, Mapping):  # DashScope's native body: input={"messages": ...}
        messages = messages if _given(messages) else raw_input.get("messages")
        prompt = prompt if _given(prompt) else raw_input.get("prompt")
        history = history if _given(history) else raw_input.get("history")
        text = text if _given(text) else raw_input.get("text")
        raw_input = raw_input.get("texts")
    for name in ("tools", "functions"):
        call.materialize(name)
    tools = [t for t in (call.option("tools"), call.option("functions")) if _given(t) and t]
    instruct = call.option("instruct")

    extra = TOOLS_PREAMBLE_TOKENS if tools else 0
    chat: list[dict[str, str]] = []
    for turn in history if _given(history) else ():
        for role, said in turn.items() if isinstance(turn, Mapping) else ():
            chat.append({"role": "user" if role == "user" else "assistant", "content": str(said)})
    for msg in messages if _given(messages) else ():
        flat, tokens = _message(msg)
        chat.append(flat)
        extra += tokens
    said = [s if isinstance(s, str) else _json(s) for s in (prompt, text) if _given(s) and s]
    if len(said) == 1 and not chat and not tools and not _given(messages):
        return guard.input_bound(prompt=said[0])
    chat.extend({"role": "user", "content": s} for s in said)
    if tools:  # rendered into the system turn; one more turn, the default system kept
        chat.append({"role": "user", "content": _json(tools)})
    if chat or _given(messages):
        return guard.input_bound(messages=chat, extra_tokens=extra)
    if _given(raw_input):
        texts, ids = _embedding_input(raw_input)
        if isinstance(instruct, str):
            texts.append(instruct)
        return guard.input_bound(input=texts, extra_tokens=extra + ids)
    raise TypeError(
        "a guarded call needs messages=, prompt= or input= to bound its input tokens (R8)"
    )


def _read_request(
    guard: Guard,
    call: _CallArgs,
    model: str | None,
    input_tokens: int | None,
    max_output: int | None,
) -> _Request:
    if model is None:
        model = call.get("model")
    if not isinstance(model, str) or not model:
        raise TypeError("a guarded call needs a model: pass model= to the call or to wrap()")
    if input_tokens is None:
        input_tokens = _input_tokens(guard, call)
    if max_output is not None:
        return _Request(model, input_tokens, max_output, 0, 1, thinking=False)
    max_tokens = _int(call.option("max_tokens"))
    if max_tokens is None:
        max_tokens = _int(call.option("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = guard.default_max_output(model)
    thinking = bool(call.option("enable_thinking"))
    budget = _int(call.option("thinking_budget"))
    thinking_tokens = 0
    if thinking or budget is not None:
        thinking_tokens = budget if budget is not None else guard.default_max_output(model)
    choices = max(1, _int(call.option("n")) or 1)
    return _Request(model, input_tokens, max_tokens, thinking_tokens, choices, thinking)


def _reserve(
    guard: Guard, call: _CallArgs, request: _Request, kind: str, clip: bool
) -> Reservation:
    """Reserve the worst case; with ``clip``, shrink the call's max tokens to what is left."""
    try:
        return guard.reserve(
            request.model,
            request.input_tokens,
            request.max_output,
            kind,
            thinking=request.thinking_tokens > 0,
        )
    except FreeTierOnly as refused:
        if not clip or isinstance(refused, AccountOverdue):
            raise
        per_choice = (guard.remaining(request.model) - request.input_tokens) // request.choices
        if request.thinking_tokens:
            thinking = min(request.thinking_tokens, per_choice // 2)
            answer = min(request.max_tokens, per_choice - thinking)
        else:
            thinking, answer = 0, min(request.max_tokens, per_choice)
        if answer < 1 or (request.thinking_tokens and thinking < 1):
            raise  # not even one output token fits
        if call.option("max_completion_tokens") is not None and call.option("max_tokens") is None:
            done = call.set_option("max_completion_tokens", answer)
        else:
            done = call.set_option("max_tokens", answer)
        if request.thinking_tokens:
            done = done and call.set_option("thinking_budget", thinking)
        if not done:
            raise  # the function takes no max tokens: it cannot be clipped
        out = (answer + thinking) * request.choices
        return guard.reserve(
            request.model, request.input_tokens, out, kind, thinking=request.thinking_tokens > 0
        )


# --------------------------------------------------------------------------------------
# Reading responses: usage, errors, the end of a stream


@dataclass(frozen=True)
class _Usage:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    request_id: str | None = None


def _detail(usage: Any, groups: tuple[str, ...], name: str) -> int:
    for group in groups:
        value = _int(_field(_field(usage, group), name))
        if value:
            return value
    return 0


def _request_id(obj: Any) -> str | None:
    for name in ("request_id", "id"):
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
    if not inp and not out:
        # DashScope fills an absent usage with zeros; a real call bills at least one token.
        return None
    return _Usage(
        input_tokens=inp or 0,
        output_tokens=out or 0,
        cached_tokens=_detail(
            usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens"
        ),
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


def _choices(chunk: Any) -> Any:
    output = _field(chunk, "output")
    return _field(output, "choices") if output is not None else _field(chunk, "choices")


def _finished(obj: Any) -> bool:
    reason = _field(obj, "finish_reason")
    return isinstance(reason, str) and reason not in ("", "null")


# --------------------------------------------------------------------------------------
# One guarded call


class _Call:
    """A reservation and what the service has reported so far; ends exactly once."""

    def __init__(
        self,
        guard: Guard,
        request: _Request,
        reservation: Reservation,
        *,
        hide_usage_chunk: bool = False,
    ) -> None:
        self._guard = guard
        self._request = request
        self._reservation = reservation
        self._hide_usage_chunk = hide_usage_chunk
        self._lock = threading.Lock()
        self._ended = False
        self._chunks = 0
        self._total: _Usage | None = None  # an OpenAI-style final usage chunk
        self._by_choice: dict[int, _Usage] = {}  # DashScope's cumulative usage, per choice
        self._finished: set[int] = set()

    # ending the reservation ------------------------------------------------------------

    def _claim(self) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            return True

    def _settle(self, usage: _Usage) -> None:
        if self._claim():
            thinking = self._request.thinking and usage.reasoning_tokens > 0
            self._reservation.settle(
                usage.input_tokens,
                usage.output_tokens,
                usage.request_id,
                cached_tokens=usage.cached_tokens,
                thinking=thinking,
            )

    def _release(self) -> None:
        if self._claim():
            self._reservation.release(failed=True)

    def _worst_case(self) -> None:
        if self._claim():
            self._reservation.settle_worst_case()

    def _service_error(self, code: str, message: str) -> BaseException | None:
        if not code:
            return None
        return self._guard.service_error(self._request.model, code, message)

    # outcomes --------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> BaseException:
        """End the reservation for a call that raised; the exception to raise instead."""
        error = _raised_error(exc)
        refused = error is not None and error[0] in QUOTA_CODES
        usage = self._seen()
        if usage is not None and (refused or self._final()):
            self._settle(usage)
        elif refused or self._chunks == 0:
            self._release()
        else:  # broken off after output began: never under-count
            self._worst_case()
        mapped = self._service_error(*error) if error else None
        return mapped if mapped is not None else exc

    def finish(self, result: Any) -> Any:
        """Settle on a returned result; a stream is wrapped to settle when it ends."""
        if hasattr(result, "__anext__"):
            return GuardedAsyncStream(result, self)
        if hasattr(result, "__next__"):
            return GuardedStream(result, self)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return self._finish_awaitable(result)
        error = _returned_error(result)
        if error is not None:
            self._release()
            mapped = self._service_error(*error)
            if mapped is not None:
                raise mapped
            return result  # DashScope's style: errors are returned, not raised
        usage = _usage(result)
        if usage is None and self._request.max_output + self._request.input_tokens == 0:
            usage = _Usage(0, 0, request_id=_request_id(result))  # a batch: nothing reserved
        if usage is None:
            self._worst_case()
        else:
            self._settle(usage)
        return result

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
            reasoning_tokens=sum(u.reasoning_tokens for u in parts),
            request_id=parts[-1].request_id,
        )

    def _final(self) -> bool:
        return self._total is not None or len(self._finished) >= self._request.choices

    def observe(self, chunk: Any) -> bool:
        """Take note of one streamed chunk; False if the caller must not see it."""
        self._chunks += 1
        error = _returned_error(chunk)
        if error is not None:  # DashScope reports an in-stream error as a chunk
            usage = self._seen()
            if usage is not None:
                self._settle(usage)
            else:
                self._release()
            mapped = self._service_error(*error)
            if mapped is not None:
                raise mapped
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
        """The stream ended, was closed or dropped: settle what it reported, if final."""
        usage = self._seen()
        if usage is not None and self._final():
            self._settle(usage)
        else:
            self._worst_case()

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
    end the reservation too (at the worst case unless the final usage was seen). Other
    attributes are the wrapped stream's.
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


def _begin(
    guard: Guard,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    model: str | None,
    kind: str,
    clip: bool,
    input_tokens: int | None,
    max_output: int | None,
    hide_usage_chunk: bool,
) -> tuple[_Call, tuple[Any, ...], dict[str, Any]]:
    call_args = _CallArgs(fn, args, kwargs)
    request = _read_request(guard, call_args, model, input_tokens, max_output)
    reservation = _reserve(guard, call_args, request, kind, clip)
    call = _Call(guard, request, reservation, hide_usage_chunk=hide_usage_chunk)
    return call, tuple(call_args.args), call_args.kwargs


def call_guarded(
    guard: Guard,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
    input_tokens: int | None = None,
    max_output: int | None = None,
    hide_usage_chunk: bool = False,
) -> Any:
    """Call ``fn(*args, **kwargs)`` under a reservation (see :func:`wrap`).

    ``input_tokens`` / ``max_output`` replace what would be read from the arguments;
    ``hide_usage_chunk`` drops an OpenAI usage-only chunk the caller did not ask for.
    """
    call, args, kwargs = _begin(
        guard, fn, args, kwargs, model=model, kind=kind, clip=clip,
        input_tokens=input_tokens, max_output=max_output, hide_usage_chunk=hide_usage_chunk,
    )  # fmt: skip
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        _raise_for(call, exc)
    return call.finish(result)


async def acall_guarded(
    guard: Guard,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
    input_tokens: int | None = None,
    max_output: int | None = None,
    hide_usage_chunk: bool = False,
) -> Any:
    """The async counterpart of :func:`call_guarded`, for coroutine functions."""
    call, args, kwargs = _begin(
        guard, fn, args, kwargs, model=model, kind=kind, clip=clip,
        input_tokens=input_tokens, max_output=max_output, hide_usage_chunk=hide_usage_chunk,
    )  # fmt: skip
    try:
        result = await fn(*args, **kwargs)
    except BaseException as exc:
        _raise_for(call, exc)
    return call.finish(result)


@overload
def wrap(
    guard: Guard,
    fn: Callable[P, R],
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
) -> Callable[P, R]: ...


@overload
def wrap(
    guard: Guard,
    fn: None = None,
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def wrap(
    guard: Guard,
    fn: Callable[P, R] | None = None,
    *,
    model: str | None = None,
    kind: str = "realtime",
    clip: bool = False,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Guard a function that calls the service: ``@guard.wrap`` or ``@guard.wrap(...)``.

    The model comes from ``model`` or the call's ``model=`` argument; the input bound
    from its ``messages`` / ``prompt`` / ``input`` (also DashScope's ``input={...}``);
    the output bound from ``max_tokens`` or ``max_completion_tokens`` (top level, in
    ``parameters=`` or ``extra_body=``), else the catalogue's default for the model.
    With ``clip=True`` a call that would be refused has its max tokens shrunk to what
    is left instead, and is refused only if not even one output token fits.

    Sync and async functions are supported; a returned stream (generator, async
    generator, SDK stream) comes back wrapped in :class:`GuardedStream` or
    :class:`GuardedAsyncStream`, which settle when the stream ends.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        options: dict[str, Any] = {"model": model, "kind": kind, "clip": clip}
        if inspect.iscoroutinefunction(func):
            async_func = cast(Callable[..., Awaitable[Any]], func)

            @functools.wraps(func)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                return await acall_guarded(guard, async_func, args, kwargs, **options)

            return cast(Callable[P, R], guarded_async)

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return call_guarded(guard, func, args, kwargs, **options)

        return cast(Callable[P, R], guarded)

    return decorate if fn is None else decorate(fn)
