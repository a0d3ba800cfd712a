"""DashScope's native API: generation (text and multimodal), embeddings, reranking and
applications, in plain JSON or server-sent events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from .billing import _Billing, _cache_details, _Reply
from .errors import _bad_request
from .wire import _as_int, _embedding, _list, _native_frame, _Stream


class _NativeAPI(_Billing):
    """Answers of the native API (``/api/v1/...``)."""

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
