"""A local stand-in for Alibaba Cloud Model Studio (DashScope), for tests.

:class:`FakeDashScope` is a loopback HTTP server that the real ``dashscope``
and ``openai`` SDKs talk to unchanged: only their base URL changes. It speaks

* DashScope's native API: ``POST /api/v1/services/aigc/text-generation/generation``,
  ``.../aigc/multimodal-generation/generation``,
  ``.../embeddings/text-embedding/text-embedding``,
  ``.../embeddings/multimodal-embedding/multimodal-embedding``,
  ``.../rerank/text-rerank/text-rerank`` and ``/api/v1/apps/<app_id>/completion``,
  plain JSON or server-sent events (when the request carries
  ``X-DashScope-SSE: enable`` or ``Accept: text/event-stream``), with
  ``incremental_output`` deltas or cumulative text, and cumulative usage on every
  chunk;
* the OpenAI-compatible API under ``/compatible-mode/v1``: ``chat/completions`` and
  ``completions`` (JSON or SSE, with the final usage chunk when
  ``stream_options.include_usage`` is true, and ``reasoning_content`` in thinking
  mode), ``responses`` (JSON or SSE events, ``previous_response_id`` too),
  ``embeddings``, ``models``, and enough of ``files`` and ``batches`` for
  ``client.batches.create(...)`` (a batch completes when it is first retrieved);
* the platform's error bodies and status codes, before a response or inside a
  stream that already answered HTTP 200.

Usage figures are real, and billed as the service bills, not as a bound: input
tokens are counted with the Qwen vocabulary (tiktoken over the ``qwen.tiktoken``
file that ships with ``dashscope``) plus the chat template, and output tokens are
the tokens of the text the server produced. A reply is billed in full once it is
generated: a client that gives up waiting, closes a stream early or loses the
connection is billed all the same (a stream that ends in an error frame bills
nothing). :meth:`FakeDashScope.idle` waits until every request is answered.

Example, in a user's own test::

    import dashscope
    import openai
    from quotaguard.testing import FakeDashScope

    def test_my_code_survives_the_free_tier_running_out():
        with FakeDashScope() as server:
            dashscope.base_http_api_url = server.native_base
            rsp = dashscope.Generation.call(model="qwen-plus", prompt="hi", api_key="sk-test")
            assert rsp.status_code == 200
            assert server.usage_log == [("qwen-plus", rsp.usage.input_tokens, 20)]

            server.free_tier_only = True
            with openai.OpenAI(api_key="sk-test", base_url=server.openai_base) as client:
                try:
                    client.chat.completions.create(
                        model="qwen-plus", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.PermissionDeniedError as e:
                    assert e.code == "AllocationQuota.FreeTierOnly"

Token counting
--------------
Content tokens: tiktoken with the Qwen pattern and vocabulary (the same
encoding as ``dashscope.get_tokenizer("qwen-7b-chat")``: NFC-normalised text,
special tokens allowed). If tiktoken or the vocabulary file is missing, a
``count_tokens(text) -> int`` function of ``quotaguard._core`` is used when it
exists, else the UTF-8 byte length (never fewer than the real count). The one
in use is :attr:`FakeDashScope.token_counter_name`.

Chat input (native ``messages`` or ``prompt``, compatible-mode ``messages``):
``sum(5 + content tokens of each message) + 3``, plus, when no message has the
role ``system``, the default system message the platform adds:
``5 + tokens(server.default_system_prompt)``. The default prompt is
``"You are a helpful assistant."`` (6 tokens), so the default system message
costs 11 tokens, within the 21 that SPEC R8 allows for (Qwen2.5's
``"You are Qwen, created by Alibaba Cloud. You are a helpful assistant."`` is
5 + 16 = 21; set ``default_system_prompt`` to it to bill the bound exactly).
A native ``prompt`` is one user message. On top, as the service bills:

* function tools are rendered with Qwen2.5's chat template into the system turn
  (after its text, or after the default prompt), tool calls into the assistant
  turn, consecutive tool results into one user turn;
* a built-in tool (a ``type`` other than ``"function"``) or a plugin adds
  ``server.builtin_tool_tokens`` (default 1,500), ``enable_search`` adds
  ``server.search_tokens`` (default 2,000);
* a ``fileid://<id>`` in a message adds every token of that uploaded file;
* a Responses API ``previous_response_id`` bills the stored conversation again;
* an image given as a PNG ``data:`` URL costs Qwen-VL's count from its pixels
  (28-pixel patches, 4 to 1,280 of them, 16,384 with
  ``vl_high_resolution_images``, plus 2); any other image, audio or video part
  ``server.image_tokens`` (default 1,280);
* a content part marked ``cache_control: {"type": "ephemeral"}`` creates an
  explicit cache of the prefix up to it, hit by the same prefix within 5 minutes
  (``cache_creation_input_tokens`` / ``cached_tokens``, ``cache_type``).

Embeddings count content tokens only, without framing; multimodal embeddings add
the image tokens; a reranker bills each (query, document) pair plus
``server.rerank_pair_tokens``; an application bills ``server.app_model`` with
``server.app_extra_tokens`` of retrieved input added.

Output: ``min(max_tokens, server.reply_tokens)`` tokens of "Lorem ipsum ..."
(every word is one Qwen token), or ``server.reply_text`` cut at ``max_tokens``.
``finish_reason`` is ``"length"`` when ``max_tokens`` cut the reply. In thinking
mode (``enable_thinking``, else the default of models in ``server.thinking_models``;
natively only with ``result_format="message"``) the reply is preceded by
``server.reasoning_tokens`` (default 40) of reasoning, capped by
``thinking_budget`` and not by ``max_tokens`` (``reasoning_content``, reported as
``reasoning_tokens``).

Errors
------
Error codes and what they answer (the native body is
``{"request_id", "code", "message"}``; the compatible-mode body is
``{"error": {"message", "type", "param": null, "code"}, "request_id"}``, whose
code differs for two of them, as on the platform):

==================================  ======  ==================================
native code                         status  compatible-mode code
==================================  ======  ==================================
``AllocationQuota.FreeTierOnly``    403     ``AllocationQuota.FreeTierOnly``
``Arrearage``                       400     ``Arrearage``
``PrepaidBillOverdue``              400     ``PrepaidBillOverdue``
``PostpaidBillOverdue``             400     ``PostpaidBillOverdue``
``InvalidApiKey``                   401     ``invalid_api_key``
``Throttling.RateQuota``            429     ``limit_requests``
``Throttling.AllocationQuota``      429     ``insufficient_quota``
``InvalidParameter``                400     ``invalid_parameter_error``
``InternalError``                   500     ``internal_error``
==================================  ======  ==================================

Any other code works too when ``fail_next`` is given its ``status``.

A streamed native request refused up front gets the status above with a
``text/event-stream`` body holding one ``event:error`` frame, as the platform
does. An error inside a stream is, natively, an ``event:error`` frame with
``:HTTP_STATUS/<status>`` (the ``dashscope`` SDK then yields a response with
that ``code`` but ``status_code`` 400: it reads the status from ``status:``
lines, which the platform does not send), and in compatible mode a
``data: {"error": {...}}`` frame (``openai`` raises ``APIError`` with
``code`` set and no ``status_code``).

"Model calls" are the generation, multimodal, embedding, rerank, application,
chat-completion, completion, response and batch-creation requests: the switches
(``arrearage``, ``free_tier_only``, ``free_quota``), :meth:`FakeDashScope.fail_next`
and :meth:`FakeDashScope.drop_next` (bill, then reset the connection without an
answer) apply to them only; the API key is checked on every request.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import socket
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, cast
from urllib.parse import urlsplit

__all__ = ["FakeDashScope"]

# --------------------------------------------------------------------------- errors

_FREE_TIER_MESSAGE: Final = (
    "The free tier of the model has been exhausted. If you wish to continue access the model "
    'on a paid basis, please disable the "use free tier only" mode in the management console.'
)
_ARREARAGE_MESSAGE: Final = "Access denied, please make sure your account is in good standing."
_DOCS: Final = "https://help.aliyun.com/zh/model-studio/error-code"


@dataclass(frozen=True)
class _ErrorKind:
    status: int
    message: str
    compat_code: str
    compat_type: str
    compat_message: str


_ERRORS: Final[dict[str, _ErrorKind]] = {
    "AllocationQuota.FreeTierOnly": _ErrorKind(
        403,
        _FREE_TIER_MESSAGE,
        "AllocationQuota.FreeTierOnly",
        "AllocationQuota.FreeTierOnly",
        _FREE_TIER_MESSAGE,
    ),
    "Arrearage": _ErrorKind(
        400,
        _ARREARAGE_MESSAGE,
        "Arrearage",
        "Arrearage",
        f"{_ARREARAGE_MESSAGE} For details, see: {_DOCS}#overdue-payment",
    ),
    "PrepaidBillOverdue": _ErrorKind(
        400,
        "The prepaid bill is overdue.",
        "PrepaidBillOverdue",
        "PrepaidBillOverdue",
        "The prepaid bill is overdue.",
    ),
    "PostpaidBillOverdue": _ErrorKind(
        400,
        "The postpaid bill is overdue.",
        "PostpaidBillOverdue",
        "PostpaidBillOverdue",
        "The postpaid bill is overdue.",
    ),
    "InvalidApiKey": _ErrorKind(
        401,
        "Invalid API-key provided.",
        "invalid_api_key",
        "invalid_request_error",
        f"Incorrect API key provided. For details, see: {_DOCS}#apikey-error",
    ),
    "Throttling.RateQuota": _ErrorKind(
        429,
        "Requests rate limit exceeded, please try again later.",
        "limit_requests",
        "limit_requests",
        f"You have exceeded your current request limit. For details, see: {_DOCS}#rate-limit",
    ),
    "Throttling.AllocationQuota": _ErrorKind(
        429,
        "Allocated quota exceeded, please increase your quota limit.",
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details. "
        f"For details, see: {_DOCS}#token-limit",
    ),
    "InvalidParameter": _ErrorKind(
        400,
        "The request is invalid.",
        "invalid_parameter_error",
        "invalid_request_error",
        "The request is invalid.",
    ),
    "InternalError": _ErrorKind(
        500,
        "An internal error has occured, please try again later.",
        "internal_error",
        "internal_error",
        "An internal error has occured, please try again later.",
    ),
}


@dataclass(frozen=True)
class _Refusal:
    """One error answer, in both dialects."""

    code: str
    status: int
    message: str
    compat_code: str
    compat_type: str
    compat_message: str
    in_stream_after: int | None = None

    @staticmethod
    def of(
        code: str,
        status: int | None = None,
        message: str | None = None,
        in_stream_after: int | None = None,
    ) -> _Refusal:
        kind = _ERRORS.get(code)
        if kind is None:
            if status is None:
                known = ", ".join(sorted(_ERRORS))
                raise ValueError(f"unknown error code {code!r}: pass status= (known: {known})")
            kind = _ErrorKind(status, message or code, code, code, message or code)
        return _Refusal(
            code=code,
            status=kind.status if status is None else status,
            message=kind.message if message is None else message,
            compat_code=kind.compat_code,
            compat_type=kind.compat_type,
            compat_message=kind.compat_message if message is None else message,
            in_stream_after=in_stream_after,
        )

    def native_body(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "code": self.code, "message": self.message}

    def compat_body(self, request_id: str) -> dict[str, Any]:
        error = {
            "message": self.compat_message,
            "type": self.compat_type,
            "param": None,
            "code": self.compat_code,
        }
        return {"error": error, "request_id": request_id}


@dataclass
class _PendingFailure:
    refusal: _Refusal
    remaining: int


# --------------------------------------------------------------------------- tokens

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

# Each of these is exactly one Qwen token with its leading space, and so is "Lorem".
_LOREM: Final = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua"
).split()

# Qwen2.5's chat template for function calling, as the service renders it: the tool
# definitions go into the system turn, after its text (or the default system prompt).
_TOOLS_HEADER: Final = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER: Final = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_FILEID: Final = re.compile(r"fileid://([\w.-]+)")

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


# --------------------------------------------------------------------------- records


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


@dataclass
class _Piece:
    reasoning: bool
    text: str
    tokens: int


@dataclass
class _Reply:
    """What the model "generates" for one call."""

    model: str
    input_tokens: int
    pieces: list[_Piece]
    finish_reason: str
    thinking: bool
    image_tokens: int = 0
    cached_tokens: int = 0
    cache_creation_tokens: int = 0

    def output_tokens(self, upto: int | None = None) -> int:
        return sum(p.tokens for p in self.pieces[:upto])

    def reasoning_tokens(self, upto: int | None = None) -> int:
        return sum(p.tokens for p in self.pieces[:upto] if p.reasoning)

    def text(self, *, reasoning: bool, upto: int | None = None) -> str:
        return "".join(p.text for p in self.pieces[:upto] if p.reasoning == reasoning)


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _cache_details(reply: _Reply) -> dict[str, Any]:
    """Usage details of an explicit-cache request (nothing for the others)."""
    if not (reply.cached_tokens or reply.cache_creation_tokens):
        return {}
    return {
        "cached_tokens": reply.cached_tokens,
        "cache_creation_input_tokens": reply.cache_creation_tokens,
        "cache_type": "ephemeral",
    }


@dataclass(frozen=True)
class _Input:
    tokens: int
    images: int


def _png_size(source: str) -> tuple[int, int] | None:
    """(width, height) of a PNG given as a ``data:`` URL; None otherwise."""
    if not source.startswith("data:"):
        return None
    try:
        data = base64.b64decode(source.partition(",")[2][:64])
    except ValueError:
        return None
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Stream:
    """An SSE answer: frames, then maybe an error frame, or a dropped connection."""

    frames: list[bytes]
    error_frame: bytes | None = None
    error_after: int | None = None
    close_after: int | None = None
    on_complete: Callable[[], None] | None = None


class _HttpError(Exception):
    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.code)
        self.refusal = refusal


def _bad_request(message: str) -> _HttpError:
    return _HttpError(_Refusal.of("InvalidParameter", message=message))


def _not_found(message: str) -> _HttpError:
    return _HttpError(_Refusal.of("NotFound", status=404, message=message))


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


# --------------------------------------------------------------------------- server


class FakeDashScope:
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

    # ------------------------------------------------------------------ token counting

    @property
    def token_counter_name(self) -> str:
        """``"qwen.tiktoken"``, ``"quotaguard._core"`` or ``"utf8-bytes"``."""
        return _token_counter()[0]

    def count_tokens(self, text: str) -> int:
        """Content tokens of ``text``, without any framing."""
        return _token_counter()[1](text)

    def count_chat_tokens(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] = ()
    ) -> int:
        """Input tokens the server bills for these chat messages (framing, the tools of
        the chat template, images and referenced files included)."""
        return self._chat_input(messages, tools).tokens

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

    def _image_part_tokens(self, part: Mapping[str, Any], hires: bool) -> int:
        """An image's tokens: from its pixels when it is a PNG given inline (Qwen-VL's
        rule: 28-pixel patches, between 4 and 1,280 of them, 16,384 in high resolution,
        plus 2 markers), else ``image_tokens``."""
        source: Any = part.get("image_url") or part.get("image")
        if isinstance(source, Mapping):
            source = source.get("url")
        size = _png_size(source) if isinstance(source, str) else None
        if size is None:
            return self.image_tokens
        width, height = size
        patch, low = 28, 4
        high = 16_384 if hires else 1_280
        h = max(patch, round(height / patch) * patch)
        w = max(patch, round(width / patch) * patch)
        if h * w > high * patch * patch:
            beta = math.sqrt(height * width / (high * patch * patch))
            h = max(patch, math.floor(height / beta / patch) * patch)
            w = max(patch, math.floor(width / beta / patch) * patch)
        elif h * w < low * patch * patch:
            beta = math.sqrt(low * patch * patch / (height * width))
            h = math.ceil(height * beta / patch) * patch
            w = math.ceil(width * beta / patch) * patch
        return (h // patch) * (w // patch) + 2

    def _content_tokens(self, content: object, hires: bool = False) -> tuple[int, int]:
        """(tokens, of which image tokens) of a message's content."""
        if content is None:
            return 0, 0
        if isinstance(content, str):
            return self._text_tokens(content), 0
        if isinstance(content, Mapping):
            content = [content]
        if not isinstance(content, list):
            return self.count_tokens(json.dumps(content, ensure_ascii=False)), 0
        tokens = images = 0
        for part in content:
            if isinstance(part, str):
                tokens += self._text_tokens(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str) and part.get("type", "text") in ("text", "input_text"):
                    tokens += self._text_tokens(text)
                elif part.get("type") in ("image_url", "image", "input_image") or "image" in part:
                    images += self._image_part_tokens(part, hires)
                elif part.get("type") not in (None, "text") or set(part) - {"type", "text"}:
                    images += self.image_tokens
        return tokens + images, images

    def _text_tokens(self, text: str) -> int:
        """A text's tokens, and those of every file it references (``fileid://``): the
        service reads the whole file into the input, on every call."""
        tokens = self.count_tokens(text)
        for file_id in _FILEID.findall(text):
            with self._lock:
                file = self._files.get(file_id)
            if file is None:
                raise _bad_request(f"File [id:{file_id}] not found.")
            tokens += self.count_tokens(file.data.decode("utf-8", "replace"))
        return tokens

    def _chat_input(
        self,
        messages: Iterable[Mapping[str, Any]],
        tools: Sequence[Any] = (),
        hires: bool = False,
    ) -> _Input:
        """What a chat request bills as input, rendered as the chat template does: 5
        tokens of framing per turn, 3 to open the reply, the default system prompt when
        the request has none, the tools block in the system turn, tool calls in the
        assistant turn, consecutive tool results in one user turn."""
        msgs = [m for m in messages if isinstance(m, Mapping)]
        functions = [
            t
            for t in tools
            if not isinstance(t, Mapping) or t.get("type", "function") == "function"
        ]
        builtin = len(tools) - len(functions)
        block = ""
        if functions:
            block = (
                _TOOLS_HEADER
                + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in functions)
                + _TOOLS_FOOTER
            )
        total, images, previous_role = 3, 0, ""
        has_system = any(m.get("role") == "system" for m in msgs)
        if not has_system:
            total += 5 + self.count_tokens(self.default_system_prompt + block)
        for message in msgs:
            role = message.get("role")
            tokens, image = self._content_tokens(message.get("content"), hires)
            images += image
            if role == "system" and block:
                tokens += self.count_tokens(block)
                block = ""
            for call in message.get("tool_calls") or ():
                fn = call.get("function", call) if isinstance(call, Mapping) else {}
                arguments = fn.get("arguments", {})
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                name = json.dumps(fn.get("name", ""), ensure_ascii=False)
                tokens += self.count_tokens(
                    f'\n<tool_call>\n{{"name": {name}, "arguments": {arguments}}}\n</tool_call>'
                )
            if role == "tool":
                tokens += self.count_tokens("\n<tool_response>\n\n</tool_response>")
                total += tokens + (0 if previous_role == "tool" else 5)
            else:
                total += 5 + tokens
            previous_role = str(role)
        return _Input(total + builtin * self.builtin_tool_tokens, images)

    def _cache(self, messages: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
        """Explicit cache: (tokens created, tokens hit) for the prefix up to the last
        content part marked ``cache_control: {"type": "ephemeral"}``; a prefix lives 5
        minutes from its last hit."""
        end = None
        for i, m in enumerate(messages):
            content = m.get("content")
            parts = content if isinstance(content, list) else []
            if any(isinstance(p, Mapping) and p.get("cache_control") for p in parts):
                end = i
        if end is None:
            return 0, 0
        prefix = list(messages[: end + 1])
        tokens = self._chat_input(prefix).tokens - 3
        key = json.dumps(prefix, sort_keys=True, ensure_ascii=False)
        now = time.monotonic()
        with self._lock:
            hit = self._explicit_cache.get(key, 0.0) > now
            self._explicit_cache[key] = now + 300
        return (0, tokens) if hit else (tokens, 0)

    def _reply(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None,
        thinking: bool,
        *,
        tools: Sequence[Any] = (),
        extra_input: int = 0,
        thinking_budget: int | None = None,
        hires: bool = False,
    ) -> _Reply:
        billed = self._chat_input(messages, tools, hires)
        created, hit = self._cache(messages)
        reply_tokens, reply_text = max(0, self.reply_tokens), self.reply_text
        limit = max_tokens if max_tokens is not None and max_tokens >= 0 else None
        budget = reply_tokens if limit is None else min(limit, reply_tokens)
        pieces: list[_Piece] = []
        if thinking:  # reasoning is not limited by max_tokens, only by thinking_budget
            reasoning = max(0, self.reasoning_tokens)
            if thinking_budget is not None and thinking_budget >= 0:
                reasoning = min(reasoning, thinking_budget)
            pieces.extend(self._lorem(reasoning, reasoning=True))
        used = 0
        cut = False
        if reply_text is None:
            pieces.extend(self._lorem(budget, reasoning=False))
            cut = limit is not None and reply_tokens > limit
        else:
            for text in _pieces(reply_text):
                tokens = self.count_tokens(text)
                if limit is not None and used + tokens > limit:
                    cut = True
                    break
                pieces.append(_Piece(False, text, tokens))
                used += tokens
        return _Reply(
            model=model,
            input_tokens=billed.tokens + extra_input,
            pieces=pieces,
            finish_reason="length" if cut else "stop",
            thinking=thinking,
            image_tokens=billed.images,
            cached_tokens=hit,
            cache_creation_tokens=created,
        )

    def _thinks(self, model: str, asked: object) -> bool:
        """Thinking mode: as the request says, else the model's default."""
        if isinstance(asked, bool):
            return asked
        return model in self.thinking_models

    def _extra_input(self, options: Mapping[str, Any]) -> int:
        """Input the service adds to a request: web search results, plugin output."""
        extra = 0
        if options.get("enable_search") is True:
            extra += self.search_tokens
        if options.get("plugins"):
            extra += self.builtin_tool_tokens
        return extra

    def _lorem(self, budget: int, *, reasoning: bool) -> Iterator[_Piece]:
        used, i = 0, 0
        while True:
            word = _LOREM[i % len(_LOREM)]
            text = word.capitalize() if i == 0 else " " + word
            tokens = self.count_tokens(text)
            if used + tokens > budget:
                return
            yield _Piece(reasoning, text, tokens)
            used += tokens
            i += 1

    # ---------------------------------------------------------------- native API

    def _native_generation(
        self, body: Mapping[str, Any], streamed: bool, multimodal: bool
    ) -> tuple[dict[str, Any] | _Stream, _Reply]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("Model not exist.")
        input_ = body.get("input")
        params = body.get("parameters") or {}
        if not isinstance(input_, Mapping) or not isinstance(params, Mapping):
            raise _bad_request("input and parameters must be objects.")
        messages: list[Mapping[str, Any]] = []
        raw_messages = input_.get("messages")
        if isinstance(raw_messages, list):
            messages.extend(m for m in raw_messages if isinstance(m, Mapping))
        for turn in input_.get("history") or []:
            if isinstance(turn, Mapping):
                messages.append({"role": "user", "content": turn.get("user")})
                messages.append({"role": "assistant", "content": turn.get("bot")})
        prompt = input_.get("prompt")
        if prompt:
            messages.append({"role": "user", "content": prompt})
        if not messages:
            raise _bad_request("Input should have messages or prompt.")
        thinking = self._thinks(model, params.get("enable_thinking"))
        result_format = params.get("result_format")
        if multimodal:
            result_format = "message"
        elif result_format not in ("text", "message"):
            result_format = "message" if thinking else "text"
        thinking = thinking and result_format == "message"
        incremental = params.get("incremental_output") is True
        tools = _list(params.get("tools"))
        reply = self._reply(
            model,
            messages,
            _as_int(params.get("max_tokens")),
            thinking,
            tools=tools,
            extra_input=self._extra_input(params),
            thinking_budget=_as_int(params.get("thinking_budget")),
            hires=params.get("vl_high_resolution_images") is True,
        )

        def usage(upto: int | None = None) -> dict[str, Any]:
            output = reply.output_tokens(upto)
            fields: dict[str, Any] = {
                "input_tokens": reply.input_tokens,
                "output_tokens": output,
                "total_tokens": reply.input_tokens + output,
            }
            if reply.thinking:
                fields["output_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens(upto)}
            if multimodal and reply.image_tokens:
                fields["image_tokens"] = reply.image_tokens
            details = _cache_details(reply)
            if details:
                fields["prompt_tokens_details"] = details
            return fields

        def output(content: str, reasoning: str, finish: str) -> dict[str, Any]:
            if result_format == "text":
                return {"text": content, "finish_reason": finish}
            message: dict[str, Any] = {
                "role": "assistant",
                "content": [{"text": content}] if multimodal else content,
            }
            if reply.thinking:
                message["reasoning_content"] = reasoning
            return {"choices": [{"finish_reason": finish, "message": message}]}

        request_id = str(uuid.uuid4())
        if not streamed:
            payload = {
                "output": output(
                    reply.text(reasoning=False), reply.text(reasoning=True), reply.finish_reason
                ),
                "usage": usage(),
                "request_id": request_id,
            }
            return payload, reply
        frames = []
        count = max(1, len(reply.pieces))
        for i in range(count):
            upto = i + 1
            finish = reply.finish_reason if upto == count else "null"
            if incremental:
                piece = reply.pieces[i] if reply.pieces else None
                content = piece.text if piece and not piece.reasoning else ""
                reasoning = piece.text if piece and piece.reasoning else ""
            else:
                content = reply.text(reasoning=False, upto=upto)
                reasoning = reply.text(reasoning=True, upto=upto)
            chunk = {
                "output": output(content, reasoning, finish),
                "usage": usage(upto),
                "request_id": request_id,
            }
            frames.append(_native_frame(upto, "result", 200, chunk))
        return _Stream(frames), reply

    def _native_embedding(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str, int]:
        model = body.get("model")
        input_ = body.get("input")
        params = body.get("parameters") or {}
        if not isinstance(model, str) or not model:
            raise _bad_request("Model not exist.")
        texts = input_.get("texts") if isinstance(input_, Mapping) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise _bad_request("input.texts should be a list of strings.")
        dimension = _as_int(params.get("dimension") if isinstance(params, Mapping) else None)
        dimension = dimension or self.embedding_dimension
        tokens = sum(self.count_tokens(t) for t in texts)
        payload = {
            "output": {
                "embeddings": [
                    {"text_index": i, "embedding": _embedding(t, dimension)}
                    for i, t in enumerate(texts)
                ]
            },
            "usage": {"total_tokens": tokens},
            "request_id": str(uuid.uuid4()),
        }
        return payload, model, tokens

    # ---------------------------------------------------------------- OpenAI-compatible API

    def _compat_chat(
        self, body: Mapping[str, Any], streamed: bool
    ) -> tuple[dict[str, Any] | _Stream, _Reply]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("you must provide a model parameter")
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise _bad_request("messages must be a non-empty list")
        messages = [m for m in raw if isinstance(m, Mapping)]
        max_tokens = _as_int(body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = _as_int(body.get("max_completion_tokens"))
        thinking = self._thinks(model, body.get("enable_thinking"))
        tools = _list(body.get("tools"))
        reply = self._reply(
            model,
            messages,
            max_tokens,
            thinking,
            tools=tools,
            extra_input=self._extra_input(body),
            thinking_budget=_as_int(body.get("thinking_budget")),
            hires=body.get("vl_high_resolution_images") is True,
        )
        completion_id = f"chatcmpl-{uuid.uuid4()}"
        created = int(time.time())

        def usage() -> dict[str, Any]:
            output = reply.output_tokens()
            fields: dict[str, Any] = {
                "prompt_tokens": reply.input_tokens,
                "completion_tokens": output,
                "total_tokens": reply.input_tokens + output,
                "prompt_tokens_details": {"cached_tokens": 0, **_cache_details(reply)},
            }
            if reply.thinking:
                fields["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens()}
            return fields

        def envelope(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "choices": choices,
                "object": obj,
                **extra,
                "created": created,
                "system_fingerprint": None,
                "model": model,
                "id": completion_id,
            }

        if not streamed:
            message: dict[str, Any] = {"role": "assistant", "content": reply.text(reasoning=False)}
            if reply.thinking:
                message["reasoning_content"] = reply.text(reasoning=True)
            choice = {
                "message": message,
                "finish_reason": reply.finish_reason,
                "index": 0,
                "logprobs": None,
            }
            return envelope("chat.completion", [choice], usage=usage()), reply

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"delta": delta, "finish_reason": finish, "index": 0, "logprobs": None}
            return _compat_frame(envelope("chat.completion.chunk", [choice], usage=None))

        first: dict[str, Any] = {"content": "", "role": "assistant"}
        if reply.thinking:
            first["reasoning_content"] = ""
        frames = [chunk(first, None)]
        for piece in reply.pieces:
            if piece.reasoning:
                frames.append(chunk({"content": None, "reasoning_content": piece.text}, None))
            else:
                frames.append(chunk({"content": piece.text}, None))
        frames.append(chunk({"content": ""}, reply.finish_reason))
        options = body.get("stream_options")
        if isinstance(options, Mapping) and options.get("include_usage") is True:
            frames.append(_compat_frame(envelope("chat.completion.chunk", [], usage=usage())))
        frames.append(b"data: [DONE]\n\n")
        return _Stream(frames), reply

    def _compat_embedding(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str, int]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("you must provide a model parameter")
        raw = body.get("input")
        items: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        if raw and isinstance(raw, list) and all(_as_int(x) is not None for x in raw):
            items = [raw]  # one input given as token ids
        if not items:
            raise _bad_request("input must be a string or a list")
        dimension = _as_int(body.get("dimensions")) or self.embedding_dimension
        tokens = 0
        data = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                tokens += self.count_tokens(item)
                key = item
            elif isinstance(item, list):
                tokens += len(item)
                key = json.dumps(item)
            else:
                raise _bad_request("input items must be strings or lists of token ids")
            data.append(
                {"embedding": _embedding(key, dimension), "index": i, "object": "embedding"}
            )
        payload = {
            "data": data,
            "model": model,
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": str(uuid.uuid4()),
        }
        return payload, model, tokens

    def _compat_completion(
        self, body: Mapping[str, Any], streamed: bool
    ) -> tuple[dict[str, Any] | _Stream, _Reply]:
        """The legacy completions API: the prompt billed as it is, without a template."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("you must provide a model parameter")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise _bad_request("prompt must be a string or a list of strings")
        reply = self._reply(model, [], _as_int(body.get("max_tokens")), False)
        reply.input_tokens = sum(self._text_tokens(p) for p in prompts)
        count = len(prompts) * max(1, _as_int(body.get("n")) or 1)
        completion_id = f"cmpl-{uuid.uuid4()}"
        output = reply.output_tokens() * count
        reply.pieces = reply.pieces * count  # every prompt and choice is billed
        usage = {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": output,
            "total_tokens": reply.input_tokens + output,
        }

        def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                **extra,
            }

        text = "".join(p.text for p in reply.pieces[: len(reply.pieces) // count])
        choices = [
            {"text": text, "index": i, "logprobs": None, "finish_reason": reply.finish_reason}
            for i in range(count)
        ]
        if not streamed:
            return envelope(choices, usage=usage), reply
        frames = [_compat_frame(envelope([c])) for c in choices]
        options = body.get("stream_options")
        if isinstance(options, Mapping) and options.get("include_usage") is True:
            frames.append(_compat_frame(envelope([], usage=usage)))
        frames.append(b"data: [DONE]\n\n")
        return _Stream(frames), reply

    def _compat_response(
        self, body: Mapping[str, Any], streamed: bool
    ) -> tuple[dict[str, Any] | _Stream, _Reply]:
        """The Responses API. A ``previous_response_id`` bills the stored conversation
        again, as input the caller cannot see."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("you must provide a model parameter")
        raw = body.get("input")
        messages: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            with self._lock:
                stored = self._responses.get(previous)
            if stored is None:
                raise _not_found(f"Response {previous} not found.")
            messages.extend(stored)
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            messages.insert(0, {"role": "system", "content": instructions})
        if isinstance(raw, str):
            messages.append({"role": "user", "content": raw})
        elif isinstance(raw, list):
            for item in raw:
                if not isinstance(item, Mapping):
                    continue
                kind = item.get("type")
                if kind in (None, "message"):
                    messages.append(
                        {"role": item.get("role", "user"), "content": item.get("content")}
                    )
                elif kind == "function_call_output":
                    messages.append({"role": "tool", "content": str(item.get("output"))})
                else:
                    messages.append({"role": "user", "content": json.dumps(item)})
        if not messages:
            raise _bad_request("input is required")
        tools = _list(body.get("tools"))
        reasoning = body.get("reasoning")
        asked = body.get("enable_thinking")
        if asked is None and isinstance(reasoning, Mapping) and reasoning.get("effort"):
            asked = reasoning.get("effort") != "none"
        reply = self._reply(
            model,
            messages,
            _as_int(body.get("max_output_tokens")),
            self._thinks(model, asked),
            tools=tools,
            extra_input=self._extra_input(body),
            thinking_budget=_as_int(body.get("thinking_budget")),
        )
        response_id = f"resp_{uuid.uuid4().hex}"
        answer = reply.text(reasoning=False)
        with self._lock:
            self._responses[response_id] = [*messages, {"role": "assistant", "content": answer}]
        output = reply.output_tokens()
        message = {
            "type": "message",
            "id": f"msg_{uuid.uuid4().hex}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}],
        }

        def response(status: str, out: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "response",
                "created_at": time.time(),
                "status": status,
                "model": model,
                "output": out,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                **extra,
            }

        usage = {
            "input_tokens": reply.input_tokens,
            "output_tokens": output,
            "total_tokens": reply.input_tokens + output,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens()},
        }
        done = response("completed", [message], usage=usage)
        if not streamed:
            return done, reply
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response("in_progress", [])}
        ]
        for piece in reply.pieces:
            if not piece.reasoning:
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "item_id": message["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece.text,
                        "logprobs": [],
                    }
                )
        events.append({"type": "response.completed", "response": done})
        frames = [
            f"event: {e['type']}\n".encode() + _compat_frame({**e, "sequence_number": i})
            for i, e in enumerate(events)
        ]
        return _Stream(frames), reply

    def _native_rerank(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str, int]:
        """Reranking: every (query, document) pair is billed, with its template."""
        model = body.get("model")
        input_ = body.get("input")
        if not isinstance(model, str) or not model or not isinstance(input_, Mapping):
            raise _bad_request("model and input are required.")
        query, documents = input_.get("query"), input_.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise _bad_request("input.query and input.documents are required.")
        texts = [d if isinstance(d, str) else json.dumps(d) for d in documents]
        q = self._text_tokens(query)
        tokens = sum(q + self.count_tokens(d) + self.rerank_pair_tokens for d in texts)
        results = [
            {"index": i, "relevance_score": round(1 / (i + 1), 4), "document": {"text": d}}
            for i, d in enumerate(texts)
        ]
        payload = {
            "output": {"results": results},
            "usage": {"total_tokens": tokens},
            "request_id": str(uuid.uuid4()),
        }
        return payload, model, tokens

    def _native_multimodal_embedding(
        self, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], str, int]:
        """Multimodal embeddings: text tokens plus image tokens, both as input."""
        model = body.get("model")
        input_ = body.get("input")
        contents = input_.get("contents") if isinstance(input_, Mapping) else None
        if not isinstance(model, str) or not model or not isinstance(contents, list):
            raise _bad_request("model and input.contents are required.")
        tokens, images = self._content_tokens([c for c in contents if isinstance(c, Mapping)])
        count = sum(1 for c in contents if isinstance(c, Mapping) and "image" in c)
        payload = {
            "output": {
                "embeddings": [
                    {"index": i, "embedding": _embedding(json.dumps(c), 8), "type": "vl"}
                    for i, c in enumerate(contents)
                ]
            },
            "usage": {"input_tokens": tokens, "image_tokens": images, "image_count": count},
            "request_id": str(uuid.uuid4()),
        }
        return payload, model, tokens

    def _native_application(
        self, app_id: str, body: Mapping[str, Any], streamed: bool
    ) -> tuple[dict[str, Any] | _Stream, _Reply]:
        """An application: its model (``app_model``) reads what its retrieval adds
        (``app_extra_tokens``), which the caller cannot see."""
        input_ = body.get("input")
        params = body.get("parameters") or {}
        if not isinstance(input_, Mapping):
            raise _bad_request("input must be an object.")
        messages = [m for m in input_.get("messages") or [] if isinstance(m, Mapping)]
        if isinstance(input_.get("prompt"), str):
            messages.append({"role": "user", "content": input_["prompt"]})
        if not messages:
            raise _bad_request("prompt or messages is required!")
        reply = self._reply(
            self.app_model,
            messages,
            _as_int(params.get("max_tokens")),
            False,
            extra_input=self.app_extra_tokens,
        )
        request_id = str(uuid.uuid4())

        def payload(upto: int | None, finish: str) -> dict[str, Any]:
            usage = {
                "model_id": self.app_model,
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens(upto),
            }
            return {
                "output": {
                    "text": reply.text(reasoning=False, upto=upto),
                    "finish_reason": finish,
                    "session_id": app_id,
                },
                "usage": {"models": [usage]},
                "request_id": request_id,
            }

        if not streamed:
            return payload(None, reply.finish_reason), reply
        count = max(1, len(reply.pieces))
        frames = [
            _native_frame(i + 1, "result", 200, payload(i + 1, "null" if i + 1 < count else "stop"))
            for i in range(count)
        ]
        return _Stream(frames), reply

    def _upload_file(self, content_type: str, raw: bytes) -> dict[str, Any]:
        if "multipart/form-data" not in content_type:
            raise _bad_request("files must be uploaded as multipart/form-data")
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
        message = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
        if not isinstance(message, EmailMessage):  # pragma: no cover - policy.HTTP makes these
            raise _bad_request("unreadable multipart body")
        data, filename, purpose = None, "upload.jsonl", "batch"
        for part in message.iter_parts():
            if not isinstance(part, EmailMessage):  # pragma: no cover
                continue
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            if name == "file":
                data = payload
                filename = part.get_filename() or filename
            elif name == "purpose":
                purpose = payload.decode("utf-8", "replace")
        if data is None:
            raise _bad_request("a file part is required")
        file = _File(f"file-batch-{uuid.uuid4().hex}", filename, purpose, data, int(time.time()))
        with self._lock:
            self._files[file.id] = file
        return file.as_object()

    def _file(self, file_id: str) -> _File:
        with self._lock:
            file = self._files.get(file_id)
        if file is None:
            raise _not_found(f"No such File object: {file_id}")
        return file

    def _create_batch(self, body: Mapping[str, Any]) -> dict[str, Any]:
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        if not isinstance(input_file_id, str):
            raise _bad_request("input_file_id is required")
        if endpoint not in ("/v1/chat/completions", "/v1/embeddings"):
            raise _bad_request(f"unsupported endpoint: {endpoint!r}")
        self._file(input_file_id)
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4()}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": window if isinstance(window, str) else "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        with self._lock:
            self._batches[batch["id"]] = batch
        return dict(batch)

    def _batch(self, batch_id: str, *, run: bool) -> dict[str, Any]:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise _not_found(f"No such Batch object: {batch_id}")
        if run and batch["status"] == "validating":
            self._run_batch(batch)
        with self._lock:
            return dict(batch)

    def _run_batch(self, batch: dict[str, Any]) -> None:
        lines, completed, failed = [], 0, 0
        for raw in self._file(batch["input_file_id"]).data.decode("utf-8").splitlines():
            if not raw.strip():
                continue
            request_id = str(uuid.uuid4())
            item: Any = {}
            try:
                item = json.loads(raw)
                body = item.get("body") or {}
                if batch["endpoint"] == "/v1/embeddings":
                    result: dict[str, Any] = self._compat_embedding(body)[0]
                else:
                    result = cast("dict[str, Any]", self._compat_chat(body, False)[0])
                response = {"status_code": 200, "request_id": request_id, "body": result}
                error = None
                completed += 1
            except (ValueError, AttributeError, _HttpError) as exc:
                message = exc.refusal.compat_message if isinstance(exc, _HttpError) else str(exc)
                response = None
                error = {"code": "InvalidParameter", "message": message}
                failed += 1
            lines.append(
                {
                    "id": request_id,
                    "custom_id": item.get("custom_id") if isinstance(item, dict) else None,
                    "response": response,
                    "error": error,
                }
            )
        data = b"".join(_json_bytes(line) + b"\n" for line in lines)
        now = int(time.time())
        output = _File(
            f"file-batch_output-{uuid.uuid4().hex}", "result.jsonl", "batch_output", data, now
        )
        with self._lock:
            self._files[output.id] = output
            if batch["status"] == "validating":
                batch.update(
                    status="completed",
                    output_file_id=output.id,
                    in_progress_at=now,
                    finalizing_at=now,
                    completed_at=now,
                    request_counts={
                        "total": completed + failed,
                        "completed": completed,
                        "failed": failed,
                    },
                )

    def _cancel_batch(self, batch_id: str) -> dict[str, Any]:
        batch = self._batch(batch_id, run=False)
        with self._lock:
            live = self._batches[batch_id]
            if live["status"] in ("validating", "in_progress"):
                now = int(time.time())
                live.update(status="cancelled", cancelling_at=now, cancelled_at=now)
            batch = dict(live)
        return batch


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # FakeDashScope.stop() joins the handler threads itself
    allow_reuse_address = True
    # Many clients connect at once: a short accept queue drops connections the clients
    # already sent a request on, which reads as a reset after sending (in doubt).
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        fake: FakeDashScope,
    ) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that vanish mid-answer are expected here; stay quiet."""


_NATIVE_GENERATION: Final = "/api/v1/services/aigc/text-generation/generation"
_NATIVE_MULTIMODAL: Final = "/api/v1/services/aigc/multimodal-generation/generation"
_NATIVE_EMBEDDING: Final = "/api/v1/services/embeddings/text-embedding/text-embedding"
_NATIVE_RERANK: Final = "/api/v1/services/rerank/text-rerank/text-rerank"
_NATIVE_MM_EMBEDDING: Final = (
    "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"
)
_NATIVE_APP: Final = re.compile(r"^/api/v1/apps/([^/]+)/completion$")
_COMPAT: Final = "/compatible-mode/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK hold each response up by tens of milliseconds.
    disable_nagle_algorithm = True
    server_version = "FakeDashScope"
    sys_version = ""

    @property
    def fake(self) -> FakeDashScope:
        return cast(_Server, self.server).fake

    def setup(self) -> None:
        super().setup()
        self.fake._register(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake._unregister(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # ------------------------------------------------------------------ request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self, method: str) -> None:
        self.fake._busy(1)
        try:
            self._serve_unsafe(method)
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True
        finally:
            self.fake._busy(-1)

    def _serve_unsafe(self, method: str) -> None:
        fake = self.fake
        path = urlsplit(self.path).path.rstrip("/") or "/"
        raw = self._read_body()
        content_type = self.headers.get("Content-Type", "")
        body: Any = None
        body_error = False
        if raw and "multipart/form-data" not in content_type:
            try:
                body = json.loads(raw)
            except ValueError:
                body_error = True
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
        fake._record(ReceivedRequest(method, path, body, headers))
        compat = path.startswith(_COMPAT + "/") or path == _COMPAT
        if fake._wait(fake.latency):
            self.close_connection = True
            return
        accept = self.headers.get("Accept", "")
        native_sse = (
            self.headers.get("X-DashScope-SSE", "").lower() == "enable"
            or "text/event-stream" in accept
        )
        if compat:
            streamed = isinstance(body, dict) and body.get("stream") is True
        else:
            streamed = native_sse
        try:
            if fake.api_key is not None:
                if self.headers.get("Authorization", "") != f"Bearer {fake.api_key}":
                    raise _HttpError(_Refusal.of("InvalidApiKey"))
            if body_error or (raw and body is not None and not isinstance(body, dict)):
                raise _bad_request("The request body is not a JSON object.")
            self._route(method, path, compat, streamed, body if isinstance(body, dict) else {}, raw)
        except _HttpError as exc:
            self._send_error(exc.refusal, compat=compat, streamed=streamed)

    def _route(
        self,
        method: str,
        path: str,
        compat: bool,
        streamed: bool,
        body: dict[str, Any],
        raw: bytes,
    ) -> None:
        fake = self.fake
        if method == "POST" and path in (_NATIVE_GENERATION, _NATIVE_MULTIMODAL):
            in_stream = self._gate(streamed)
            answer, reply = fake._native_generation(body, streamed, path == _NATIVE_MULTIMODAL)
            self._answer(answer, reply, compat=False, in_stream=in_stream)
        elif method == "POST" and path == _NATIVE_EMBEDDING:
            self._gate(False)
            payload, model, tokens = fake._native_embedding(body)
            fake._record_usage(model, tokens, 0)
            self._send_json(200, payload, payload["request_id"])
        elif method == "POST" and path == _COMPAT + "/chat/completions":
            in_stream = self._gate(streamed)
            answer, reply = fake._compat_chat(body, streamed)
            self._answer(answer, reply, compat=True, in_stream=in_stream)
        elif method == "POST" and path == _COMPAT + "/embeddings":
            self._gate(False)
            payload, model, tokens = fake._compat_embedding(body)
            fake._record_usage(model, tokens, 0)
            self._send_json(200, payload, payload["id"])
        elif method == "POST" and path == _COMPAT + "/completions":
            in_stream = self._gate(streamed)
            answer, reply = fake._compat_completion(body, streamed)
            self._answer(answer, reply, compat=True, in_stream=in_stream)
        elif method == "POST" and path == _COMPAT + "/responses":
            in_stream = self._gate(streamed)
            answer, reply = fake._compat_response(body, streamed)
            self._answer(answer, reply, compat=True, in_stream=in_stream)
        elif method == "POST" and path in (_NATIVE_RERANK, _NATIVE_MM_EMBEDDING):
            self._gate(False)
            if path == _NATIVE_RERANK:
                payload, model, tokens = fake._native_rerank(body)
            else:
                payload, model, tokens = fake._native_multimodal_embedding(body)
            fake._record_usage(model, tokens, 0)
            self._send_json(200, payload, payload["request_id"])
        elif method == "POST" and _NATIVE_APP.match(path):
            in_stream = self._gate(streamed)
            app = _NATIVE_APP.match(path)
            answer, reply = fake._native_application(app.group(1) if app else "", body, streamed)
            self._answer(answer, reply, compat=False, in_stream=in_stream)
        elif method == "GET" and path == _COMPAT + "/models":
            models = [
                {"id": m, "object": "model", "created": 0, "owned_by": "system"}
                for m in ("qwen-plus", "qwen-max", "qwen-turbo")
            ]
            self._send_json(200, {"object": "list", "data": models}, str(uuid.uuid4()))
        elif compat and path.startswith(_COMPAT + "/files"):
            self._files(method, path[len(_COMPAT + "/files") :], raw)
        elif compat and path.startswith(_COMPAT + "/batches"):
            self._batches(method, path[len(_COMPAT + "/batches") :], body)
        else:
            raise _not_found(f"{method} {path} is not served by FakeDashScope")

    def _gate(self, streamed: bool) -> _Refusal | None:
        """Raise the refusal of a model call, or return it if it comes inside the stream."""
        refusal = self.fake._gate(streamed)
        if refusal is None:
            return None
        if streamed and refusal.in_stream_after is not None:
            return refusal
        raise _HttpError(refusal)

    def _files(self, method: str, rest: str, raw: bytes) -> None:
        fake = self.fake
        request_id = str(uuid.uuid4())
        parts = [p for p in rest.split("/") if p]
        if method == "POST" and not parts:
            payload = fake._upload_file(self.headers.get("Content-Type", ""), raw)
            self._send_json(200, payload, request_id)
        elif method == "GET" and not parts:
            with fake._lock:
                files = [f.as_object() for f in fake._files.values()]
            listing = {"object": "list", "data": files, "has_more": False}
            self._send_json(200, listing, request_id)
        elif method == "GET" and len(parts) == 1:
            self._send_json(200, fake._file(parts[0]).as_object(), request_id)
        elif method == "GET" and len(parts) == 2 and parts[1] == "content":
            data = fake._file(parts[0]).data
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", request_id)
            self.end_headers()
            self.wfile.write(data)
        elif method == "DELETE" and len(parts) == 1:
            fake._file(parts[0])
            with fake._lock:
                fake._files.pop(parts[0], None)
            deleted = {"id": parts[0], "object": "file", "deleted": True}
            self._send_json(200, deleted, request_id)
        else:
            raise _not_found(f"{method} {_COMPAT}/files{rest} is not served by FakeDashScope")

    def _batches(self, method: str, rest: str, body: dict[str, Any]) -> None:
        fake = self.fake
        request_id = str(uuid.uuid4())
        parts = [p for p in rest.split("/") if p]
        if method == "POST" and not parts:
            self._gate(False)
            self._send_json(200, fake._create_batch(body), request_id)
        elif method == "GET" and not parts:
            with fake._lock:
                ids = list(fake._batches)
            batches = [fake._batch(i, run=False) for i in reversed(ids)]
            listing = {
                "object": "list",
                "data": batches,
                "first_id": batches[0]["id"] if batches else None,
                "last_id": batches[-1]["id"] if batches else None,
                "has_more": False,
            }
            self._send_json(200, listing, request_id)
        elif method == "GET" and len(parts) == 1:
            self._send_json(200, fake._batch(parts[0], run=True), request_id)
        elif method == "POST" and len(parts) == 2 and parts[1] == "cancel":
            self._send_json(200, fake._cancel_batch(parts[0]), request_id)
        else:
            raise _not_found(f"{method} {_COMPAT}/batches{rest} is not served by FakeDashScope")

    # ------------------------------------------------------------------ responses

    def _send_json(self, status: int, payload: object, request_id: str) -> None:
        data = _json_bytes(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", request_id)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, refusal: _Refusal, *, compat: bool, streamed: bool) -> None:
        request_id = str(uuid.uuid4())
        if compat:
            self._send_json(refusal.status, refusal.compat_body(request_id), request_id)
        elif streamed:
            # The platform refuses a streamed native call with its status and one SSE frame.
            frame = _native_frame(1, "error", refusal.status, refusal.native_body(request_id))
            self.send_response(refusal.status)
            self.send_header("Content-Type", "text/event-stream;charset=UTF-8")
            self.send_header("Content-Length", str(len(frame)))
            self.send_header("x-request-id", request_id)
            self.end_headers()
            self.wfile.write(frame)
        else:
            self._send_json(refusal.status, refusal.native_body(request_id), request_id)

    def _answer(
        self,
        answer: dict[str, Any] | _Stream,
        reply: _Reply,
        *,
        compat: bool,
        in_stream: _Refusal | None,
    ) -> None:
        fake = self.fake

        def complete() -> None:
            fake._record_usage(reply.model, reply.input_tokens, reply.output_tokens())

        drop = fake._take_drop()
        if drop is not None:
            if drop:
                complete()
            self._drop()
            return
        if isinstance(answer, dict):
            request_id = str(answer.get("request_id") or answer.get("id"))
            complete()  # before the client can see the answer, so tests never race the log
            self._send_json(200, answer, request_id)
            return
        answer.on_complete = complete
        answer.close_after = fake.close_stream_after
        refusal = in_stream
        if refusal is not None and refusal.in_stream_after is not None:
            error_id = str(uuid.uuid4())
            answer.error_after = refusal.in_stream_after
            if compat:
                answer.error_frame = _compat_frame(refusal.compat_body(error_id))
            else:
                seq = min(refusal.in_stream_after, len(answer.frames)) + 1
                body = refusal.native_body(error_id)
                answer.error_frame = _native_frame(seq, "error", refusal.status, body)
        self._send_stream(answer)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send_stream(self, stream: _Stream) -> None:
        fake = self.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream;charset=UTF-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-request-id", str(uuid.uuid4()))
        self.end_headers()
        # The service generates the whole reply and bills it, whether the client reads
        # it to its end, closes it early or loses the connection; a stream that ends
        # in an error frame bills nothing.
        if stream.error_frame is None and stream.on_complete is not None:
            stream.on_complete()
        frames = stream.frames
        for i in range(len(frames) + 1):
            if stream.error_frame is not None and (
                i == stream.error_after or (i == len(frames) and stream.error_after is not None)
            ):
                self._write_chunk(stream.error_frame)
                self.wfile.write(b"0\r\n\r\n")
                return
            if i == len(frames):
                break
            if i == stream.close_after or (i > 0 and fake._wait(fake.chunk_delay)):
                self._drop()
                return
            self._write_chunk(frames[i])
        self.wfile.write(b"0\r\n\r\n")

    def _drop(self) -> None:
        """Simulate a network drop: shut the socket without ending the chunked body."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
