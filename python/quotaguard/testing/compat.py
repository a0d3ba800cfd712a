"""The OpenAI-compatible API (``/compatible-mode/v1``): chat completions, completions,
responses and embeddings, in JSON or server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from .billing import _Billing, _cache_details, _Reply
from .errors import _bad_request, _not_found
from .wire import _as_int, _compat_frame, _embedding, _list, _Stream


class _CompatAPI(_Billing):
    """Answers of the OpenAI-compatible API."""

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
