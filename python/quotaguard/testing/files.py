"""Uploaded files and batches of the OpenAI-compatible API (a batch completes when it is
first retrieved)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, cast

from .compat import _CompatAPI
from .errors import _bad_request, _HttpError, _not_found
from .wire import _json_bytes


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


class _FilesAndBatches(_CompatAPI):
    """Files and batches, kept in memory."""

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
