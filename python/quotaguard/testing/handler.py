"""The HTTP side: the threaded server, routing, error answers, JSON and SSE streams."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

from .billing import _Reply
from .errors import _bad_request, _HttpError, _not_found, _Refusal
from .wire import ReceivedRequest, _compat_frame, _json_bytes, _native_frame, _Stream

if TYPE_CHECKING:
    from .server import FakeDashScope


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
