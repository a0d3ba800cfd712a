"""The server object: its settings, lifecycle, records and controls."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from types import TracebackType
from typing import Any

from .errors import _PendingFailure, _Refusal
from .files import _File, _FilesAndBatches
from .handler import _Handler, _Server
from .native import _NativeAPI
from .tokens import _token_counter
from .wire import ReceivedRequest, _as_int

__all__ = ["FakeDashScope"]


class FakeDashScope(_NativeAPI, _FilesAndBatches):
    """A local DashScope (native and OpenAI-compatible) server for tests.

    ``with FakeDashScope() as server:`` starts it on 127.0.0.1 and a free port
    and stops it on exit; :meth:`start` and :meth:`stop` do the same by hand.

    Point the SDKs at it::

        dashscope.base_http_api_url = server.native_base      # .../api/v1
        openai.OpenAI(api_key="sk-test", base_url=server.openai_base)

    Every attribute may be read or set from any thread at any time; a request
    reads the settings once when it arrives.

    Attributes:
        api_key: when set, a request whose ``Authorization: Bearer ...`` differs
            is answered 401 (``InvalidApiKey``).
        latency: seconds the server waits before answering each request.
        chunk_delay: seconds between two chunks of a stream.
        reply_tokens: length of the generated reply in tokens (capped by the
            request's ``max_tokens``).
        reply_text: a fixed reply instead of "Lorem ipsum ..." (cut at
            ``max_tokens``); its output tokens are its Qwen tokens.
        free_tier_only: every model call answers 403 ``AllocationQuota.FreeTierOnly``.
        arrearage: every model call answers 400 ``Arrearage``.
        close_stream_after: when set to k, a stream is cut (the connection is
            shut without ending the chunked body) after k chunks.
        default_system_prompt: the system message billed when a chat request
            has none.
        image_tokens: input tokens billed for each non-text content part whose
            size is not read from its pixels.
        embedding_dimension: default length of embedding vectors.
        search_tokens: input a web search adds (``enable_search``).
        builtin_tool_tokens: input a built-in tool or a plugin adds.
        reasoning_tokens: reasoning a call in thinking mode produces (capped by
            its ``thinking_budget``).
        thinking_models: models that think unless ``enable_thinking`` is false.
        app_model, app_extra_tokens: the model an application calls, and the
            input its retrieval adds.
        rerank_pair_tokens: what a reranker adds to each (query, document) pair.
    """

    def __init__(
        self,
        api_key: str | None = None,
        latency: float = 0.0,
        *,
        chunk_delay: float = 0.0,
        reply_tokens: int = 20,
        reply_text: str | None = None,
        free_quota: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key: str | None = api_key
        self.latency: float = latency
        self.chunk_delay: float = chunk_delay
        self.reply_tokens: int = reply_tokens
        self.reply_text: str | None = reply_text
        self.free_tier_only: bool = False
        self.arrearage: bool = False
        self.close_stream_after: int | None = None
        self.default_system_prompt: str = "You are a helpful assistant."
        self.image_tokens: int = 1280
        self.embedding_dimension: int = 1024
        self.search_tokens: int = 2_000
        self.builtin_tool_tokens: int = 1_500
        self.reasoning_tokens: int = 40
        self.thinking_models: set[str] = {"qwen3.5-plus", "qwen3.6-plus", "qwen3-32b"}
        self.app_model: str = "qwen-plus"
        self.app_extra_tokens: int = 300
        self.rerank_pair_tokens: int = 8
        self._explicit_cache: dict[str, float] = {}
        self._responses: dict[str, list[dict[str, Any]]] = {}
        self._drops: list[bool] = []
        self._active = 0
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._usage: list[tuple[str, int, int]] = []
        self._failures: list[_PendingFailure] = []
        self._free_quota: int | None = None
        self._free_used = 0
        self._files: dict[str, _File] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self.free_quota = free_quota

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeDashScope:
        """Bind and serve in a background thread; returns self."""
        _token_counter()  # load the vocabulary now, not inside the first call's answer
        with self._lock:
            if self._httpd is not None:
                raise RuntimeError("FakeDashScope is already running")
            self._stopping.clear()
            httpd = _Server((self._host, self._port), _Handler, fake=self)
            thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeDashScope:{httpd.server_address[1]}",
                daemon=True,
            )
            self._httpd, self._thread = httpd, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and join every thread. Idempotent."""
        with self._lock:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        for handler_thread in connections.values():
            handler_thread.join(timeout=5)

    def __enter__(self) -> FakeDashScope:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        httpd = self._httpd
        if httpd is None:
            raise RuntimeError("FakeDashScope is not running: call start() or use `with`")
        return int(httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``"""
        return f"http://{self._host}:{self.port}"

    @property
    def native_base(self) -> str:
        """For ``dashscope.base_http_api_url``: ``base_url + "/api/v1"``."""
        return self.base_url + "/api/v1"

    @property
    def openai_base(self) -> str:
        """For ``openai.OpenAI(base_url=...)``: ``base_url + "/compatible-mode/v1"``."""
        return self.base_url + "/compatible-mode/v1"

    # ------------------------------------------------------------------ records and controls

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A copy of every request received since the start or the last reset."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def usage_log(self) -> list[tuple[str, int, int]]:
        """``(model, input_tokens, output_tokens)`` of each call the server billed.

        A stream is billed in full when it starts, however it ends (unless it ends in
        an error frame); a call whose client gave up waiting is billed all the same.
        Batch results are not logged (batches never draw on the free quota).
        """
        with self._lock:
            return list(self._usage)

    @property
    def free_quota(self) -> int | None:
        """Tokens the server grants before it answers 403 FreeTierOnly; None: unlimited.

        Setting it restarts the count. A call is refused once the tokens used
        reach the quota; the call that crosses it still succeeds.
        """
        return self._free_quota

    @free_quota.setter
    def free_quota(self, tokens: int | None) -> None:
        if tokens is not None and (_as_int(tokens) is None or tokens < 0):
            raise ValueError(f"free_quota must be a non-negative int or None, not {tokens!r}")
        with self._lock:
            self._free_quota = tokens
            self._free_used = 0

    @property
    def free_quota_remaining(self) -> int | None:
        with self._lock:
            if self._free_quota is None:
                return None
            return max(0, self._free_quota - self._free_used)

    def fail_next(
        self,
        code: str,
        status: int | None = None,
        message: str | None = None,
        in_stream_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` model calls fail with ``code``.

        ``status`` defaults from the code (see the module docstring; an unknown
        code needs one). With ``in_stream_after=k`` a streamed call answers 200,
        sends k chunks, then the error frame; a call that is not streamed fails
        up front. Calls queue: a second ``fail_next`` applies after the first.
        """
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        if in_stream_after is not None and in_stream_after < 0:
            raise ValueError(f"in_stream_after must be >= 0, not {in_stream_after}")
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400..599), not {status}")
        refusal = _Refusal.of(code, status, message, in_stream_after)
        with self._lock:
            self._failures.append(_PendingFailure(refusal, times))

    def idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being answered (a client that gave up waiting does
        not stop the server from answering, and billing, its request); True if so."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._active == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _busy(self, delta: int) -> None:
        with self._lock:
            self._active += delta

    def drop_next(self, times: int = 1, *, billed: bool = True) -> None:
        """Make the next ``times`` generation calls end in a dropped connection: the
        request is read and (with ``billed``) billed as the service would, then the
        connection is shut without an answer, as when a connection resets after the
        request was sent. Clients see a reset with no response."""
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        with self._lock:
            self._drops.extend([billed] * times)

    def _take_drop(self) -> bool | None:
        with self._lock:
            return self._drops.pop(0) if self._drops else None

    def reset(self) -> None:
        """Forget requests, usage, files and batches; clear pending failures,
        ``free_tier_only``, ``arrearage``, ``close_stream_after`` and the free-quota
        count. Settings (api_key, latency, reply_tokens, ...) are kept."""
        with self._lock:
            self._requests.clear()
            self._usage.clear()
            self._failures.clear()
            self._drops.clear()
            self._files.clear()
            self._batches.clear()
            self._free_used = 0
            self.free_tier_only = False
            self.arrearage = False
            self.close_stream_after = None

    # ------------------------------------------------------------------ internals for the handler

    def _register(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections[conn] = threading.current_thread()
            stopping = self._stopping.is_set()
        if stopping:  # accepted while stop() ran: do not leave it waiting for a request
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _unregister(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    def _wait(self, seconds: float) -> bool:
        """Sleep; True if the server is stopping."""
        if seconds > 0:
            return self._stopping.wait(seconds)
        return self._stopping.is_set()

    def _record(self, request: ReceivedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _record_usage(self, model: str, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self._usage.append((model, input_tokens, output_tokens))
            if self._free_quota is not None:
                self._free_used += input_tokens + output_tokens

    def _gate(self, streamed: bool) -> _Refusal | None:
        """The refusal a model call gets, if any (consumes one pending failure)."""
        with self._lock:
            if self.arrearage:
                return _Refusal.of("Arrearage")
            if self._failures:
                pending = self._failures[0]
                pending.remaining -= 1
                if pending.remaining <= 0:
                    self._failures.pop(0)
                if not streamed:
                    return dataclasses.replace(pending.refusal, in_stream_after=None)
                return pending.refusal
            if self.free_tier_only:
                return _Refusal.of("AllocationQuota.FreeTierOnly")
            if self._free_quota is not None and self._free_used >= self._free_quota:
                return _Refusal.of("AllocationQuota.FreeTierOnly")
        return None
