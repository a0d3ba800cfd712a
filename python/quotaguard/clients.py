"""Guarded SDK clients: :func:`wrap_openai` and :func:`wrap_dashscope`.

OpenAI: the guarded client is a private copy of the user's client (sharing its
connection pool) whose transport step is hooked: every HTTP request any of its methods
sends (chat completions, completions, responses, embeddings, batches, through
``with_raw_response``, ``with_streaming_response``, ``with_options``, the beta
namespace, the stream helpers) passes one function that classifies it, reserves it,
sends it and reads its real usage from the bytes the service returns, whatever the
caller does with the response. The SDK's own retries are each a request of their own:
each attempt is reserved, and a refused attempt is not sent.

DashScope: the guarded module proxy guards the API classes it knows (``Generation``,
``MultiModalConversation``, ``TextEmbedding``, ``MultiModalEmbedding``, ``TextReRank``,
``Application`` and their ``Aio*`` variants), passes those that bill nothing (files,
models, the local tokenizer), and checks everything else as unguarded. Its one retry
on a dropped connection is seen through the session the guard hands it. The global
``dashscope`` module is never patched.

What the wrappers cannot guard is refused under Free Quota Only (``FreeTierOnly``,
reason ``"unguarded"``) and never sent; without the switch it goes through with an
:class:`~quotaguard.exceptions.UnguardedWarning`, once per method.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, NoReturn

from ._format import client_repr
from .exceptions import UnguardedWarning, _entry
from .wrap import (
    Guard,
    Options,
    _Call,
    _CallArgs,
    _plain,
    _raise_for,
    _Request,
    _returned_error,
    _Usage,
    acall_guarded,
    begin,
    call_guarded,
    fallback_models,
    never_sent,
    warn_once,
)

__all__ = ["GuardedDashScope", "GuardedOpenAI", "wrap_dashscope", "wrap_openai"]

# A per-call max_input_tokens travels to the transport hook inside the request body,
# under this key, and is taken out there before the request is sent.
BOUND_KEY = "__quotaguard_max_input_tokens__"

_warned_unguarded: set[str] = set()


def check_unguarded(guard: Guard, model: Any, what: str) -> None:
    """A call quotaguard cannot guard: refused wherever a chargeable call is (Free Quota
    Only on for its model, or any model when it names none; an unverified or overdue
    account), else let through with a warning once per method."""
    name = model if isinstance(model, str) and model else None
    guard._core._check_uncounted(name, "unguarded", what)
    warn_once(
        what,
        f"{what} cannot be guarded: it was sent unguarded, and what it bills is not in the "
        "ledger (turn on Free Quota Only to refuse it)",
        UnguardedWarning,
        _warned_unguarded,
    )


_OWN = frozenset(
    {
        "_target",
        "_guard",
        "_path",
        "_options",
        "_original",
        "_clip",
        "_max_input_tokens",
        "_fallback",
    }
)


class _Proxy:
    """Delegates every attribute it does not define itself to the wrapped object."""

    def __init__(self, target: Any, guard: Guard) -> None:
        self._target = target
        self._guard = guard

    def __getattr__(self, name: str) -> Any:
        if name in _OWN:  # not yet set: avoid recursing
            raise AttributeError(name)
        return getattr(self._target, name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._target)) | set(super().__dir__()))

    def __repr__(self) -> str:
        return f"<guarded {self._target!r}>"


# --------------------------------------------------------------------------------------
# OpenAI (pointed at DashScope's OpenAI-compatible endpoint)

# The billable endpoints the hook guards, by POST path (relative to the base URL).
_ENDPOINTS = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/responses": "responses",
    "/batches": "batches",
}
# POSTs that bill nothing: uploads, cancellations.
_FREE_POSTS = (
    re.compile(r"^/files$"),
    re.compile(r"^/uploads(/.*)?$"),
    re.compile(r"^/batches/[^/]+/cancel$"),
    re.compile(r"^/responses/[^/]+/cancel$"),
    re.compile(r"^/chat/completions/[^/]+$"),  # updating a stored completion's metadata
)
_ID = re.compile(r"/(?=[^/]*\d)[^/]{12,}")  # path segments that are ids, for warnings


def _rel_path(base: str, url: Any) -> str:
    full = str(url).split("?", 1)[0]
    path = full[len(base) :] if full.startswith(base) else "/" + full.split("/", 3)[-1]
    return "/" + path.strip("/")


class _Tracer:
    """The transport's trace: whether the request may have reached the service. It may
    from the moment its headers start going out (a cancellation can land after the bytes
    left but before the transport says so), so that is when it counts as sent. Once the
    body was written out in full, the rest of the request's events tell nothing more: the
    trace is taken off the request (the caller's own trace, if any, stays)."""

    def __init__(self, chained: Any, extensions: dict[str, Any] | None = None) -> None:
        self._chained = chained
        self._extensions = extensions
        self.events = False
        self.sent = False

    def _body_sent(self) -> None:
        self.sent = True
        extensions = self._extensions
        if extensions is not None:
            self._extensions = None
            if self._chained is None:
                extensions.pop("trace", None)
            else:
                extensions["trace"] = self._chained

    # Called for every event until the body is sent: kept to a few operations.
    def sync(self, name: str, info: Any) -> None:
        self.events = True
        if name.endswith("send_request_headers.started"):
            self.sent = True
        elif name.endswith("send_request_body.complete"):
            self._body_sent()
        if self._chained is not None:
            self._chained(name, info)

    async def asynchronous(self, name: str, info: Any) -> None:
        self.events = True
        if name.endswith("send_request_headers.started"):
            self.sent = True
        elif name.endswith("send_request_body.complete"):
            self._body_sent()
        if self._chained is not None:
            await self._chained(name, info)

    def verdict(self, exc: BaseException) -> bool | None:
        """Whether the failed request may have reached the service (None: unknown)."""
        if self.events:
            return self.sent
        return False if never_sent(exc) else None


# ---- reading a response body as it passes --------------------------------------------

_SSE_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class _BodyReader:
    """Reads a response body as its bytes pass: JSON (at its end) or server-sent events
    (each in turn), settling the call; drops the events the caller must not see."""

    def __init__(self, call: _Call, sse: bool, opaque: bool) -> None:
        self.call = call
        self.sse = sse
        self.opaque = opaque  # compressed or unknown: usage cannot be read, never dropped
        self.buffer = b""
        self.body: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        if self.opaque:
            return data
        if not self.sse:
            self.body.append(data)
            return data
        self.buffer += data
        out: list[bytes] = []
        while True:
            m = _SSE_END.search(self.buffer)
            if m is None:
                break
            event, self.buffer = self.buffer[: m.end()], self.buffer[m.end() :]
            if self._show(event):
                out.append(event)
        return b"".join(out)

    def _show(self, event: bytes) -> bool:
        lines = event.decode("utf-8", "replace").splitlines()
        data = "\n".join(line[5:].removeprefix(" ") for line in lines if line.startswith("data:"))
        if not data or data.startswith("[DONE]"):
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        return self.call.observe(chunk)

    def end(self) -> bytes:
        """The body ended: the bytes still held, once the call is settled."""
        rest, self.buffer = self.buffer, b""
        if self.sse and rest and not self._show(rest):
            rest = b""
        if self.opaque:
            self.call.no_usage()
        elif self.sse:
            self.call.end_stream()
        else:
            _settle_json(self.call, b"".join(self.body))
        return rest

    def closed(self) -> None:
        """The caller closed the body before its end."""
        if not self.call.ended:
            self.call.end_stream()


def _settle_json(call: _Call, raw: bytes) -> None:
    """Settle a call from a whole JSON answer (its usage; the worst case without)."""
    try:
        body = json.loads(raw)
    except ValueError:
        call.no_usage()
        return
    call.finish(body)


def _is_sse(response: Any) -> bool:
    return "event-stream" in response.headers.get("content-type", "")


def _byte_stream_bases(response: Any) -> tuple[type, type]:
    module = sys.modules[type(response).__module__.split(".")[0]]
    return module.SyncByteStream, module.AsyncByteStream


# By response class: (its library's sync observer, async observer, async byte stream).
_stream_classes: dict[type, tuple[type, type, type]] = {}
_stream_lock = threading.Lock()


def _stream_types(response: Any) -> tuple[type, type, type]:
    """Byte-stream classes of the response's own HTTP library (httpx2 or httpx)."""
    found = _stream_classes.get(type(response))
    if found is not None:
        return found
    bases = _byte_stream_bases(response)
    with _stream_lock:
        for known in _stream_classes.values():
            if issubclass(known[0], bases[0]):  # the same library: the same classes
                found = known
                break
        else:
            sync = type("GuardedByteStream", (_SyncObserver, bases[0]), {})
            asyn = type("GuardedAsyncByteStream", (_AsyncObserver, bases[1]), {})
            found = (sync, asyn, bases[1])
        _stream_classes[type(response)] = found
    return found


class _Observer:
    """A response body's byte stream as it passes the reader (sync or async below):
    each piece fed to it, a failure mid-body ending the call, the end settling it."""

    def __init__(self, inner: Any, reader: _BodyReader) -> None:
        self._inner = inner
        self._reader = reader

    def _failed(self, exc: BaseException) -> None:
        if not isinstance(exc, GeneratorExit) and not self._reader.call.ended:
            _end_failed(self._reader.call, exc)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.closed()


class _SyncObserver(_Observer):
    def __iter__(self) -> Iterator[bytes]:
        feed = self._reader.feed
        try:
            for data in self._inner:
                out = feed(data)
                if out:
                    yield out
        except BaseException as exc:
            self._failed(exc)
            raise
        rest = self._reader.end()
        if rest:
            yield rest

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._reader.closed()


class _AsyncObserver(_Observer):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        feed = self._reader.feed
        try:
            async for data in self._inner:
                out = feed(data)
                if out:
                    yield out
        except BaseException as exc:
            self._failed(exc)
            raise
        rest = self._reader.end()
        if rest:
            yield rest

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._reader.closed()


def _end_failed(call: _Call, exc: BaseException) -> None:
    """A body cut while it was read (a timeout, a reset, a cancellation): the request
    reached the service, so the call is in doubt unless its final usage was seen."""
    call.sent = True
    call.fail(exc)


def _unsent(call: _Call, tracer: _Tracer, exc: BaseException) -> NoReturn:
    """Sending failed: the call ends as far as the request went (the tracer knows)."""
    call.sent = tracer.verdict(exc)
    _raise_for(call, exc)


def _unread(call: _Call, exc: BaseException) -> None:
    """The answer could not be read: the request was sent."""
    if not call.ended:
        _end_failed(call, exc)


def _json_body(request: Any) -> Any:
    """A request's JSON body; None when it has none that can be read (multipart)."""
    try:
        content = request.content
        return json.loads(content) if content else {}
    except Exception:  # not JSON, or a streamed body not read yet
        return None


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body)
    except ValueError:
        return "", ""
    error = _returned_error(data) or _returned_error({"status_code": 400, **data})
    return error if error is not None else ("", "")


class _OpenAIHook:
    """The guard on one private OpenAI client: each HTTP request, each attempt."""

    def __init__(self, guard: Guard, client: Any, send: Any, options: Options) -> None:
        self.guard = guard
        self.client = client
        self.send_raw = send
        self.options = options
        # Clipping and fallback change a request: those calls take the full reading.
        self.direct = not options.clip and not options.fallback
        self.base = str(client.base_url).rstrip("/")

    # ---- what a request is ----

    def route(self, request: Any) -> tuple[str, str] | None:
        """(endpoint, path) of a request to guard, ("unguarded", path) of one that
        cannot be, None for one that bills nothing."""
        if request.method.upper() != "POST":
            return None  # listing, retrieving, deleting: nothing is billed
        path = _rel_path(self.base, request.url)
        if path in _ENDPOINTS:
            return _ENDPOINTS[path], path
        if any(p.match(path) for p in _FREE_POSTS):
            return None
        return "unguarded", path

    def prepare(
        self,
        request: Any,
        route: tuple[str, str],
        models: list[str] | None = None,
        *,
        stream: bool = True,
    ) -> tuple[Any, _Call | None, Any]:
        """The request to send (rewritten), its call (None: let through), the tracer.
        ``models``: a batch's models, when already read from its input file. ``stream``:
        whether the SDK reads the answer as a stream (a whole answer is read by the HTTP
        library, decoded, before it is settled; a stream's bytes are read as they pass,
        so they are asked for uncompressed)."""
        endpoint, path = route
        body = _json_body(request)
        if endpoint == "unguarded" or not isinstance(body, dict):
            model = body.get("model") if isinstance(body, dict) else None
            check_unguarded(self.guard, model, f"POST {_ID.sub('/{id}', path)}")
            return request, None, None
        sent_body = dict(body)
        bound = body.pop(BOUND_KEY, None)
        hide = False
        if endpoint in ("chat", "completions") and body.get("stream") is True:
            stream_options = body.get("stream_options")
            stream_options = stream_options if isinstance(stream_options, Mapping) else {}
            if not stream_options.get("include_usage"):
                # Without it the stream never reports usage; the chunk added is hidden.
                body["stream_options"] = {**stream_options, "include_usage": True}
                hide = True
        held = None
        if endpoint == "chat" and self.direct:
            # One step into the core: the input counted from the messages as they are,
            # and the worst case reserved (None: a request it leaves to the full reading).
            held = self.guard._core._reserve_chat(body)
        if held is not None:
            call = _Call(
                self.guard,
                _Request(*held[1:]),
                held[0],
                hide_usage_chunk=hide,
                sent=False,
                name=f"POST {path}",
            )
            args = None
        elif endpoint == "batches":
            args = _CallArgs.of_body(body)
            call = self._batch(args, models)
        else:
            args = _CallArgs.of_body(body)
            options = Options(
                clip=self.options.clip,
                fallback=self.options.fallback,
                max_input_tokens=bound if bound is not None else self.options.max_input_tokens,
                hide_usage_chunk=hide,
                endpoint=endpoint,
                name=f"POST {path}",
            )
            call = begin(self.guard, args, options, sent=False)
        final = body if args is None else args.kwargs
        if final == sent_body:  # the body goes as it is: the request is kept
            if stream or final.get("stream") is True:
                request.headers["accept-encoding"] = "identity"
            request.extensions = extensions = dict(request.extensions)
            tracer = _Tracer(extensions.get("trace"), extensions)
            extensions["trace"] = self._trace_fn(tracer)
            return request, call, tracer
        request, tracer = self._rebuild(request, final)
        return request, call, tracer

    def _batch(self, args: _CallArgs, models: list[str] | None) -> _Call:
        """A batch never draws on free quota (R4): refused under Free Quota Only or for an
        unverified account, else recorded at 0/0 under its id (its usage comes later,
        with its results). Its models: ``metadata={"model": ...}``, else its input file."""
        models = models or _stated_models(args.kwargs)
        if models is None:
            models = self._file_models(args.get("input_file_id"))
        for model in models[1:]:
            self.guard._core.reserve(model, 0, 0, "batch").release()  # refused like the first
        options = Options(model=models[0], kind="batch", input_tokens=0, max_output=0)
        call = begin(self.guard, args, options, sent=False)
        call.others = models[1:]  # type: ignore[attr-defined]
        return call

    def _file_models(self, file_id: Any) -> list[str]:
        content = self.client.files.content(file_id)
        if inspect.isawaitable(content):
            raise TypeError("async batch input is read by the async hook")  # pragma: no cover
        return _models_in_jsonl(content.text)

    def _rebuild(self, request: Any, body: dict[str, Any]) -> tuple[Any, _Tracer]:
        """A new request for a rewritten body, and its tracer."""
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        # An uncompressed answer can be read as it passes.
        headers["accept-encoding"] = "identity"
        extensions = dict(request.extensions)
        tracer = _Tracer(extensions.get("trace"), extensions)
        extensions["trace"] = self._trace_fn(tracer)
        rebuilt = type(request)(
            request.method,
            request.url,
            headers=headers,
            content=json.dumps(body, ensure_ascii=False).encode("utf-8"),
            extensions=extensions,
        )
        # The request keeps the dict it was given: the tracer takes itself off that one.
        tracer._extensions = rebuilt.extensions
        return rebuilt, tracer

    def _trace_fn(self, tracer: _Tracer) -> Any:
        return tracer.sync

    # ---- the answer ----

    def answer(self, call: _Call, response: Any, stream: bool) -> Any:
        """A response arrived: release on an error status; settle a whole answer from its
        body once read; a streamed one is read as it passes."""
        call.sent = True  # the request reached the service
        if response.status_code >= 400:
            response.read()
            self._error(call, response)
        elif stream or _is_sse(response):
            self._observe(call, response)
        else:
            response.read()  # what the SDK does for a whole answer; decoded if compressed
            _settle_json(call, response.content)
        return response

    async def aanswer(self, call: _Call, response: Any, stream: bool) -> Any:
        call.sent = True
        if response.status_code >= 400:
            await response.aread()
            self._error(call, response)
        elif stream or _is_sse(response):
            self._observe(call, response)
        else:
            await response.aread()
            _settle_json(call, response.content)
        return response

    def _error(self, call: _Call, response: Any) -> None:
        call.release()  # an error answer bills nothing
        code, message = _error_of(response.content)
        mapped = self.guard.service_error(call.request.model, code, message) if code else None
        if mapped is not None:
            make = getattr(self.client, "_make_status_error_from_response", None)
            raise mapped from (make(response) if callable(make) else None)

    def _observe(self, call: _Call, response: Any) -> None:
        content_type = response.headers.get("content-type", "")
        encoding = response.headers.get("content-encoding", "identity").lower()
        reader = _BodyReader(
            call, sse="event-stream" in content_type, opaque=encoding not in ("", "identity")
        )
        sync_cls, async_cls, async_base = _stream_types(response)
        observer = async_cls if isinstance(response.stream, async_base) else sync_cls
        response.stream = observer(response.stream, reader)

    def _ended_batch(self, call: _Call) -> None:
        for model in getattr(call, "others", ()):
            record = call.record
            self.guard._core._record_usage(
                model, 0, 0, getattr(record, "request_id", None), kind="batch"
            )

    # ---- one attempt ----

    def send(self, request: Any, *, stream: bool, **kwargs: Any) -> Any:
        route = self.route(request)
        if route is None:
            return self.send_raw(request, stream=stream, **kwargs)
        request, call, tracer = self.prepare(request, route, stream=stream)
        if call is None:
            return self.send_raw(request, stream=stream, **kwargs)
        try:
            response = self.send_raw(request, stream=True, **kwargs)
        except BaseException as exc:
            _unsent(call, tracer, exc)
        try:
            response = self.answer(call, response, stream)
        except BaseException as exc:  # the answer could not be read: it was sent
            _unread(call, exc)
            raise
        return self._answered_in_full(call, response)

    async def asend(self, request: Any, *, stream: bool, **kwargs: Any) -> Any:
        route = self.route(request)
        if route is None:
            return await self.send_raw(request, stream=stream, **kwargs)
        if route[0] == "batches":
            request, call, tracer = await self._aprepare_batch(request, route)
        else:
            request, call, tracer = self.prepare(request, route, stream=stream)
        if call is None:
            return await self.send_raw(request, stream=stream, **kwargs)
        try:
            response = await self.send_raw(request, stream=True, **kwargs)
        except BaseException as exc:
            _unsent(call, tracer, exc)
        try:
            response = await self.aanswer(call, response, stream)
        except BaseException as exc:
            _unread(call, exc)
            raise
        return self._answered_in_full(call, response)

    def _answered_in_full(self, call: _Call, response: Any) -> Any:
        if call.ended and call.request.kind == "batch":
            self._ended_batch(call)
        return response

    async def _aprepare_batch(
        self, request: Any, route: tuple[str, str]
    ) -> tuple[Any, _Call | None, Any]:
        body = _json_body(request)
        models = _stated_models(body) if isinstance(body, Mapping) else None
        if isinstance(body, Mapping) and models is None:  # read the input file first
            content = await self.client.files.content(body.get("input_file_id"))
            models = _models_in_jsonl(content.text)
        return self.prepare(request, route, models)


class _AsyncOpenAIHook(_OpenAIHook):
    def _trace_fn(self, tracer: _Tracer) -> Any:
        return tracer.asynchronous


class _SendProxy:
    """For SDK versions without ``_send_request``: the HTTP client, ``send`` hooked."""

    def __init__(self, inner: Any, send: Callable[..., Any]) -> None:
        self._inner = inner
        self.send = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _sends_through_method(client: Any) -> bool:
    """Whether the SDK sends each attempt through ``client._send_request`` (openai 2 and
    later), else straight through its HTTP client."""
    return hasattr(type(client), "_send_request")


def _install(guard: Guard, client: Any, options: Options) -> Any:
    """A private copy of ``client`` (same settings, same connection pool) whose every
    HTTP request passes the guard."""
    private = client.copy() if hasattr(client, "copy") else client.with_options()
    is_async = inspect.iscoroutinefunction(getattr(type(private), "request", None))
    hook_cls = _AsyncOpenAIHook if is_async else _OpenAIHook
    if _sends_through_method(private):
        hook = hook_cls(guard, private, private._send_request, options)
        private._send_request = hook.asend if is_async else hook.send
    else:  # older SDKs send through the HTTP client directly
        raw = private._client
        hook = hook_cls(guard, private, raw.send, options)
        private._client = _SendProxy(raw, hook.asend if is_async else hook.send)
    return private


def _stated_models(body: Mapping[str, Any]) -> list[str] | None:
    """The models a batch says it uses: ``metadata={"model": "qwen-plus[,qwen-max]"}``."""
    metadata = body.get("metadata")
    stated = metadata.get("model") if isinstance(metadata, Mapping) else None
    if isinstance(stated, str) and stated.strip():
        return [m.strip() for m in stated.split(",") if m.strip()]
    return None


def _models_in_jsonl(text: str) -> list[str]:
    """The distinct ``body.model`` of the request lines of a batch input file."""
    models: list[str] = []
    for line in text.splitlines():
        if line.strip():
            body = json.loads(line).get("body")
            model = body.get("model") if isinstance(body, Mapping) else None
            if isinstance(model, str) and model not in models:
                models.append(model)
    if not models:
        raise ValueError("the batch input file names no model")
    return models


def _is_resource(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith(("openai.resources", "openai._client")) and not isinstance(value, type)


class _Resource(_Proxy):
    """A resource of the guarded client: its methods take ``max_input_tokens=`` (handed
    to the hook in the body, never sent), and a websocket ``connect`` is checked as
    unguarded (its calls do not pass the HTTP hook)."""

    def __init__(self, target: Any, guard: Guard, path: str) -> None:
        super().__init__(target, guard)
        self._path = path

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name.startswith("_"):
            return value
        path = f"{self._path}.{name}"
        if _is_resource(value):
            # The SDK's resources and their methods are fixed for a client: kept here,
            # the next access finds them without passing this method.
            self.__dict__[name] = wrapped = _Resource(value, self._guard, path)
            return wrapped
        if callable(value) and not isinstance(value, type):
            if name == "connect":
                return _unguarded_method(self._guard, value, f"client.{path}")
            method = _bound_method(value)
            if getattr(value, "__self__", None) is self._target:
                self.__dict__[name] = method
            return method
        return value


def _bound_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(*args: Any, **kwargs: Any) -> Any:
        bound = kwargs.pop("max_input_tokens", None)
        if bound is not None:
            kwargs["extra_body"] = {**(kwargs.get("extra_body") or {}), BOUND_KEY: bound}
        return fn(*args, **kwargs)

    return _entry(method)


def _unguarded_method(guard: Guard, fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(*args: Any, **kwargs: Any) -> Any:
        check_unguarded(guard, kwargs.get("model"), what)
        return fn(*args, **kwargs)

    return _entry(method)


class GuardedOpenAI(_Resource):
    """An ``openai.OpenAI`` / ``openai.AsyncOpenAI`` whose every billable request is guarded.

    Every HTTP request of the client passes the guard: chat completions (streamed too),
    completions, responses, embeddings and batches are reserved and settled from the
    usage the service returns (raw and streamed responses alike); requests that bill
    nothing (listing models, files, retrieving a batch) pass; anything else, and the
    websocket ``connect`` methods, are refused under Free Quota Only (reason
    ``"unguarded"``). Each attempt of the SDK's retries is reserved.
    """

    def __init__(
        self,
        guard: Guard,
        client: Any,
        *,
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
    ) -> None:
        options = Options(
            clip=clip, max_input_tokens=max_input_tokens, fallback=fallback_models(fallback)
        )
        super().__init__(_install(guard, client, options), guard, "")
        self._original = client
        self._options = options

    def with_options(self, *args: Any, **kwargs: Any) -> GuardedOpenAI:
        return GuardedOpenAI(
            self._guard,
            self._original.with_options(*args, **kwargs),
            clip=self._options.clip,
            max_input_tokens=self._options.max_input_tokens,
            fallback=self._options.fallback,
        )

    def copy(self, *args: Any, **kwargs: Any) -> GuardedOpenAI:
        return GuardedOpenAI(
            self._guard,
            self._original.copy(*args, **kwargs),
            clip=self._options.clip,
            max_input_tokens=self._options.max_input_tokens,
            fallback=self._options.fallback,
        )

    def __enter__(self) -> GuardedOpenAI:
        self._original.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._original.__exit__(*exc_info)

    async def __aenter__(self) -> GuardedOpenAI:
        await self._original.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._original.__aexit__(*exc_info)

    def __repr__(self) -> str:
        o = self._options
        return client_repr(
            self, self._original, self._guard, o.clip, o.max_input_tokens, o.fallback
        )


def wrap_openai(
    guard: Guard,
    client: Any,
    *,
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] | None = None,
) -> GuardedOpenAI:
    """A guarded ``client`` (``openai.OpenAI`` or ``AsyncOpenAI``); see :class:`GuardedOpenAI`.

    A streamed chat completion gets ``stream_options={"include_usage": True}`` so its
    usage can be settled; the extra usage chunk is hidden unless the caller asked for it.
    With ``clip=True`` a call's max tokens shrink to what the free quota has left.
    ``max_input_tokens`` bounds input the guard cannot count (search, built-in tools,
    ``fileid://``); one call can state its own with ``max_input_tokens=``.
    """
    return GuardedOpenAI(
        guard, client, clip=clip, max_input_tokens=max_input_tokens, fallback=fallback
    )


# --------------------------------------------------------------------------------------
# DashScope's own SDK

# The API classes wrap_dashscope guards: (endpoint, output bound (None: read it)).
_DASHSCOPE_APIS: dict[str, tuple[str | None, int | None]] = {
    "Generation": (None, None),
    "AioGeneration": (None, None),
    "MultiModalConversation": (None, None),
    "AioMultiModalConversation": (None, None),
    "TextEmbedding": ("embeddings", 0),
    "AioTextEmbedding": ("embeddings", 0),
    "MultiModalEmbedding": ("multimodal_embedding", 0),
    "AioMultiModalEmbedding": ("multimodal_embedding", 0),
    "TextReRank": ("rerank", 0),
    "AioTextReRank": ("rerank", 0),
}
# Names that bill nothing: files, models, the local tokenizer, settings, helpers.
_DASHSCOPE_FREE = frozenset(
    {
        "Files",
        "Models",
        "Tokenization",
        "Tokenizer",
        "get_tokenizer",
        "list_tokenizers",
        "save_api_key",
        "set_region",
        "close_shared_aio_session",
        "close_shared_sync_session",
        "settings",
        "History",
        "HistoryItem",
        "DeleteResponse",
        "BatchTextEmbeddingResponse",
        "MultiModalEmbeddingItemAudio",
        "MultiModalEmbeddingItemImage",
        "MultiModalEmbeddingItemText",
        "validate_workspace_id",
    }
)
# Methods of an unguarded API that send a billable request; others (list, get, ...) pass.
_BILLABLE_METHODS = frozenset(
    {"call", "async_call", "stream_call", "streaming_call", "create", "submit", "start", "run"}
)
_UNGUARDED_FUNCTIONS = frozenset({"chat"})


@functools.cache
def _session_support() -> bool:
    """Whether the installed dashscope takes a caller's HTTP session (``session=``)."""
    try:
        factory = importlib.import_module("dashscope.api_entities.api_request_factory")
        return "session" in inspect.signature(factory._build_api_request).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


class _Session:
    """The session dashscope sends through, seen by the guard: a second send of one call
    (dashscope resends once on a dropped connection) is an attempt of its own, reserved
    anew; each send tells whether the request may have left."""

    def __init__(self, inner: Any, call: _Call) -> None:
        self._inner = inner
        self._call = call
        self._sends = 0

    def _attempt(self) -> None:
        self._sends += 1
        if self._sends > 1:
            self._call.renew()

    def _failed(self, exc: BaseException) -> None:
        self._call.sent = not never_sent(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _RequestsSession(_Session):
    """A ``requests`` session."""

    def post(self, url: Any, **kwargs: Any) -> Any:
        self._attempt()
        try:
            response = self._inner.post(url, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._call.sent = True
        return response


class _AioSession(_Session):
    """An aiohttp session."""

    async def _send(self, send: Callable[[], Any]) -> Any:
        self._attempt()
        try:
            response = await send()
        except BaseException as exc:
            self._failed(exc)
            raise
        self._call.sent = True
        return response

    async def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        return await self._send(lambda: self._inner.request(method, url, **kwargs))

    async def post(self, url: Any, **kwargs: Any) -> Any:
        return await self._send(lambda: self._inner.post(url, **kwargs))


# dashscope tells an aiohttp session from a requests one by its class: named
# "ClientSession", from a module whose name holds "aiohttp".
_AioClientSession = type(
    "ClientSession", (_AioSession,), {"__module__": "quotaguard.clients.aiohttp_session"}
)


def _shared_sync_session() -> Any:
    module = importlib.import_module("dashscope.api_entities.http_request")
    return module._get_shared_sync_session()


async def _shared_aio_session() -> Any:
    module = importlib.import_module("dashscope.api_entities.aio_session")
    return await module.get_shared_aio_session()


class _DashScopeApi(_Proxy):
    def __init__(
        self,
        target: Any,
        guard: Guard,
        options: Options,
        sessions: bool,
    ) -> None:
        super().__init__(target, guard)
        self._options = options
        self._sessions = sessions

    @_entry
    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The API's ``call``, guarded; errors are still returned, as DashScope does."""
        fn = self._target.call
        if inspect.iscoroutinefunction(fn):
            return self._acall(fn, args, kwargs)

        def attach(call: _Call, call_args: _CallArgs) -> None:
            if self._sessions:
                inner = call_args.kwargs.get("session") or _shared_sync_session()
                call_args.kwargs["session"] = _RequestsSession(inner, call)

        return call_guarded(self._guard, fn, args, kwargs, self._options, on_call=attach)

    async def _acall(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        inner = kwargs.get("session")
        if self._sessions and inner is None:
            inner = await _shared_aio_session()

        def attach(call: _Call, call_args: _CallArgs) -> None:
            if self._sessions:
                call_args.kwargs["session"] = _AioClientSession(inner, call)

        return await acall_guarded(self._guard, fn, args, kwargs, self._options, on_call=attach)


class _Application(_Proxy):
    """``Application.call``: an application's models and input (its knowledge base,
    plugins, memory) are not known before the call. It is unbounded: refused under Free
    Quota Only unless ``model=`` (the model the application calls) and
    ``max_input_tokens=`` state a bound, which is then reserved; both are consumed.
    Without the switch it goes through. The usage of every model the response reports
    is recorded."""

    def __init__(self, target: Any, guard: Guard, options: Options) -> None:
        super().__init__(target, guard)
        self._options = options

    @_entry
    def call(self, *args: Any, **kwargs: Any) -> Any:
        model = kwargs.pop("model", None)
        bound = kwargs.pop("max_input_tokens", None)
        if bound is None:
            bound = self._options.max_input_tokens
        if model is None or bound is None:
            self._guard._core._check_uncounted(model, "unbounded", "application")
            result = self._target.call(*args, **kwargs)
            return _AppResult(self._guard, None, model).finish(result)
        options = Options(model=model, input_tokens=int(bound), name="Application.call")
        call = begin(self._guard, _CallArgs(self._target.call, args, kwargs), options)
        try:
            result = self._target.call(*args, **kwargs)
        except BaseException as exc:
            _raise_for(call, exc)
        return _AppResult(self._guard, call, model).finish(result)


class _AppResult:
    """Records an application's usage: per model (``usage.models``)."""

    def __init__(self, guard: Guard, call: _Call | None, model: str | None) -> None:
        self.guard = guard
        self.call = call
        self.model = model
        self.last: Any = None

    def finish(self, result: Any) -> Any:
        if hasattr(result, "__next__"):
            return self._stream(result)
        self._record(result)
        return result

    def _stream(self, chunks: Iterator[Any]) -> Iterator[Any]:
        done = False
        try:
            for chunk in chunks:
                self.last = chunk
                yield chunk
            done = True
        except BaseException as exc:
            if self.call is not None:
                self.call.sent = True
                _raise_for(self.call, exc)
            raise
        finally:
            if done:
                self._record(self.last)
            elif self.call is not None:
                self.call.end_stream()

    def _record(self, result: Any) -> None:
        error = _returned_error(result)
        if error is not None:
            if self.call is not None:
                self.call.release()
            mapped = self.guard.service_error(self.model or "", *error) if self.model else None
            if mapped is not None:
                raise mapped
            return
        usage = _plain(_plain(_field_of(result, "usage")))
        models = usage.get("models") if isinstance(usage, Mapping) else None
        request_id = _field_of(result, "request_id")
        for item in models or ():
            item = _plain(item)
            name = item.get("model_id") if isinstance(item, Mapping) else None
            inp, out = item.get("input_tokens") or 0, item.get("output_tokens") or 0
            if self.call is not None and name == self.model and not self.call.ended:
                self.call.settle(_Usage(inp, out, request_id=request_id))
            elif isinstance(name, str):
                self.guard._core._record_usage(name, inp, out, request_id)
        if self.call is not None and not self.call.ended:
            self.call.no_usage()


def _field_of(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class _Unguarded(_Proxy):
    """A dashscope API quotaguard cannot guard: its billable methods are checked
    (refused under Free Quota Only, else warned once); others pass."""

    def __init__(self, target: Any, guard: Guard, path: str) -> None:
        super().__init__(target, guard)
        self._path = path

    @_entry
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self._target, type):  # a function: the call itself bills
            check_unguarded(self._guard, kwargs.get("model"), f"{self._path}()")
            return self._target(*args, **kwargs)
        return _Unguarded(self._target(*args, **kwargs), self._guard, self._path)

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name.startswith("_"):
            return value
        path = f"{self._path}.{name}"
        if callable(value) and not isinstance(value, type) and name in _BILLABLE_METHODS:
            return _unguarded_method(self._guard, value, path)
        if _is_dashscope_api(value):
            return _Unguarded(value, self._guard, path)
        return value


def _is_dashscope_api(value: Any) -> bool:
    """An object of the dashscope package that may send billable requests."""
    module = getattr(value, "__module__", None) or type(value).__module__
    if not isinstance(module, str) or not module.startswith("dashscope"):
        return False
    if isinstance(value, ModuleType):
        return False
    cls = value if isinstance(value, type) else type(value)
    return any(hasattr(cls, m) for m in _BILLABLE_METHODS) or module.startswith("dashscope.v2")


class GuardedDashScope(_Proxy):
    """The ``dashscope`` module with guarded ``Generation``, ``MultiModalConversation``,
    ``TextEmbedding``, ``MultiModalEmbedding``, ``TextReRank``, ``Application`` and their
    ``Aio*`` variants (those the installed SDK has). Files, models and the tokenizer pass;
    every other API (image, video and speech synthesis, the 2.0 ``Client``, ...) is
    refused under Free Quota Only and warned otherwise (reason ``"unguarded"``)."""

    def __init__(
        self,
        guard: Guard,
        module: ModuleType | Any,
        *,
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
        path: str = "dashscope",
    ) -> None:
        super().__init__(module, guard)
        self._path = path
        self._clip = clip
        self._max_input_tokens = max_input_tokens
        self._fallback = fallback_models(fallback)
        sessions = _session_support()
        for name, (endpoint, max_output) in _DASHSCOPE_APIS.items():
            api = getattr(module, name, None)
            if api is not None:
                options = Options(
                    clip=clip if max_output is None else False,
                    fallback=self._fallback if max_output is None else (),
                    max_output=max_output,
                    max_input_tokens=max_input_tokens,
                    endpoint=endpoint,
                    name=f"{path}.{name}.call",
                )
                setattr(self, name, _DashScopeApi(api, guard, options, sessions))
        app = getattr(module, "Application", None)
        if app is not None:
            self.Application = _Application(app, guard, Options(max_input_tokens=max_input_tokens))

    def __repr__(self) -> str:
        return client_repr(
            self, self._target, self._guard, self._clip, self._max_input_tokens, self._fallback
        )

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if name.startswith("_") or name in _DASHSCOPE_FREE:
            return value
        path = f"{self._path}.{name}"
        if isinstance(value, ModuleType) and value.__name__.startswith("dashscope"):
            return GuardedDashScope(
                self._guard,
                value,
                clip=self._clip,
                max_input_tokens=self._max_input_tokens,
                fallback=self._fallback,
                path=path,
            )
        if name in _UNGUARDED_FUNCTIONS or _is_dashscope_api(value):
            return _Unguarded(value, self._guard, path)
        return value


def wrap_dashscope(
    guard: Guard,
    module: ModuleType | Any | None = None,
    *,
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] | None = None,
) -> GuardedDashScope:
    """A proxy of the ``dashscope`` module (imported if not given) whose calls are guarded.
    ``fallback``: models to send a call to when its own model's free quota cannot cover
    it (R16)."""
    if module is None:
        module = importlib.import_module("dashscope")
    return GuardedDashScope(
        guard, module, clip=clip, max_input_tokens=max_input_tokens, fallback=fallback
    )
