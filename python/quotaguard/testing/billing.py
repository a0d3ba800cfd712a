"""What a call bills: input rendered as the chat template does (tools, images, files,
the explicit cache), and the reply the model "generates"."""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .errors import _bad_request
from .state import _State
from .tokens import _pieces, _token_counter

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


class _Billing(_State):
    """Token counting and billing, as the service does it."""

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
