"""quotaguard.testing.FakeDashScope, driven by the real dashscope and openai SDKs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

dashscope = pytest.importorskip("dashscope")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from quotaguard.testing import FakeDashScope  # noqa: E402
from quotaguard.testing import tokens as qg_tokens  # noqa: E402

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test"
USER = [{"role": "user", "content": "Hello, how are you?"}]
DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
LOREM = (
    "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua"
).split()

# (native code, status, compatible-mode code, openai exception)
ERRORS = [
    ("AllocationQuota.FreeTierOnly", 403, "AllocationQuota.FreeTierOnly", "PermissionDeniedError"),
    ("Arrearage", 400, "Arrearage", "BadRequestError"),
    ("InvalidApiKey", 401, "invalid_api_key", "AuthenticationError"),
    ("Throttling.RateQuota", 429, "limit_requests", "RateLimitError"),
]


# --------------------------------------------------------------------------- independent counting

_tokenizer: Any = None


def tokens(text: str) -> int:
    """Qwen tokens, with dashscope's own tiktoken-based tokenizer."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = dashscope.get_tokenizer("qwen-7b-chat")
    return len(_tokenizer.encode(text))


def framed(messages: list[dict[str, Any]]) -> int:
    """SPEC R8: 5 per message, 3 for the reply, the default system message if none."""
    total = 3 + sum(5 + tokens(m["content"]) for m in messages)
    if not any(m["role"] == "system" for m in messages):
        total += 5 + tokens(DEFAULT_SYSTEM)
    return total


def lorem(n: int) -> str:
    words = [LOREM[i % len(LOREM)].lower() for i in range(n)]
    return " ".join(words)[:1].upper() + " ".join(words)[1:]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def server() -> Iterator[Any]:
    with FakeDashScope() as fake:
        yield fake


@pytest.fixture
def native(server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(dashscope, "base_http_api_url", server.native_base)
    return server


@pytest.fixture
def client(server: Any) -> Iterator[Any]:
    with openai.OpenAI(api_key=KEY, base_url=server.openai_base, max_retries=0) as c:
        yield c


def chat(client: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", USER)
    return client.chat.completions.create(model="qwen-plus", **kwargs)


def generate(**kwargs: Any) -> Any:
    kwargs.setdefault("prompt", "Hello, how are you?")
    return dashscope.Generation.call(model="qwen-plus", api_key=KEY, **kwargs)


# --------------------------------------------------------------------------- token counting


def test_counter_is_the_qwen_vocabulary(server: Any) -> None:
    assert server.token_counter_name == "qwen.tiktoken"
    samples = [
        "Hello, how are you?",
        "你好\uff0c世界\uff01今天天气怎么样\uff1f"  # full-width punctuation,
        "line one\nline two\n\n  indented\ttab",
        "emoji 🤖🚀 and café (NFC: cafe\u0301)",
        "<|im_start|>user\nspecial<|im_end|>",
        "",
    ]
    for text in samples:
        assert server.count_tokens(text) == tokens(text), text
    long_text = ("lorem ipsum dolor sit amet, consectetur adipiscing elit 42\n" * 5000).strip()
    assert len(long_text) > 200_000
    assert server.count_tokens(long_text) == tokens(long_text)


def test_default_system_message_fits_the_r8_bound(server: Any) -> None:
    assert 5 + tokens(DEFAULT_SYSTEM) == 11 <= 21
    assert 5 + tokens(QWEN25_SYSTEM) == 21
    assert server.count_chat_tokens(USER) == framed(USER)
    server.default_system_prompt = QWEN25_SYSTEM
    assert server.count_chat_tokens(USER) == 3 + 5 + tokens(USER[0]["content"]) + 21


def test_fallback_counter_is_utf8_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qg_tokens, "_counter", None)
    monkeypatch.setattr(qg_tokens, "_load_qwen_counter", lambda: None)
    monkeypatch.setattr(qg_tokens, "_load_core_counter", lambda: None)
    with FakeDashScope() as server:
        assert server.token_counter_name == "utf8-bytes"
        assert server.count_tokens("héllo") == 6
        with openai.OpenAI(api_key=KEY, base_url=server.openai_base, max_retries=0) as c:
            rsp = chat(c, max_tokens=12)
        assert rsp.usage.completion_tokens == len(rsp.choices[0].message.content.encode())
        assert rsp.usage.completion_tokens <= 12


# --------------------------------------------------------------------------- native API


def test_native_plain_text(native: Any) -> None:
    rsp = generate()
    assert rsp.status_code == 200
    assert rsp.request_id
    assert rsp.output.text == lorem(20)
    assert rsp.output.finish_reason == "stop"
    assert rsp.usage.input_tokens == framed([{"role": "user", "content": "Hello, how are you?"}])
    assert rsp.usage.output_tokens == 20 == tokens(rsp.output.text)
    assert rsp.usage.total_tokens == rsp.usage.input_tokens + 20
    assert native.usage_log == [("qwen-plus", rsp.usage.input_tokens, 20)]
    sent = native.requests[-1]
    assert sent.path == "/api/v1/services/aigc/text-generation/generation"
    assert sent.body["input"] == {"prompt": "Hello, how are you?"}


def test_native_messages_with_system_and_max_tokens(native: Any) -> None:
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "Ça va ?"},
    ]
    rsp = generate(prompt=None, messages=messages, result_format="message", max_tokens=5)
    assert rsp.status_code == 200
    choice = rsp.output.choices[0]
    assert choice.message.content == lorem(5)
    assert choice.finish_reason == "length"
    assert rsp.usage.input_tokens == framed(messages)  # no default system message
    assert rsp.usage.output_tokens == 5


def test_native_reply_text(native: Any) -> None:
    native.reply_text = "你好\uff0c世界! Hello\nworld, again and again."
    rsp = generate()
    assert rsp.output.text == native.reply_text
    assert rsp.usage.output_tokens == tokens(native.reply_text)
    cut = generate(max_tokens=4)
    assert cut.output.finish_reason == "length"
    assert native.reply_text.startswith(cut.output.text)
    assert cut.usage.output_tokens == tokens(cut.output.text) <= 4


def test_native_stream_incremental(native: Any) -> None:
    chunks = list(generate(stream=True, incremental_output=True))
    assert all(c.status_code == 200 for c in chunks)
    assert len(chunks) == 20
    assert "".join(c.output.text for c in chunks) == lorem(20)
    assert [c.usage.output_tokens for c in chunks] == list(range(1, 21))
    assert {c.usage.input_tokens for c in chunks} == {framed(USER)}
    assert all(c.usage.total_tokens == c.usage.input_tokens + c.usage.output_tokens for c in chunks)
    assert [c.output.finish_reason for c in chunks] == ["null"] * 19 + ["stop"]
    assert native.requests[-1].headers["x-dashscope-sse"] == "enable"
    assert native.usage_log == [("qwen-plus", framed(USER), 20)]


def test_native_stream_cumulative(native: Any) -> None:
    chunks = list(generate(stream=True, max_tokens=6))
    texts = [c.output.text for c in chunks]
    assert texts == [lorem(i) for i in range(1, 7)]
    assert [c.usage.output_tokens for c in chunks] == list(range(1, 7))
    assert chunks[-1].output.finish_reason == "length"
    assert "incremental_output" not in native.requests[-1].body["parameters"]


def test_native_stream_incremental_false_is_merged_by_the_sdk(native: Any) -> None:
    chunks = list(generate(stream=True, incremental_output=False, max_tokens=4))
    # dashscope rewrites incremental_output=False to True and merges the deltas itself
    assert native.requests[-1].body["parameters"]["incremental_output"] is True
    assert [c.output.text for c in chunks] == [lorem(i) for i in range(1, 5)]
    assert chunks[-1].usage.output_tokens == 4


def test_native_thinking(native: Any) -> None:
    # Reasoning is billed on top of max_tokens (which limits the answer), up to
    # thinking_budget, else the server's reasoning length.
    rsp = generate(enable_thinking=True, result_format="message", max_tokens=10)
    message = rsp.output.choices[0].message
    assert message.reasoning_content == lorem(native.reasoning_tokens)
    assert message.content == lorem(10)
    assert rsp.usage.output_tokens == 10 + native.reasoning_tokens
    assert rsp.usage.output_tokens_details == {"reasoning_tokens": native.reasoning_tokens}
    rsp = generate(enable_thinking=True, result_format="message", max_tokens=10, thinking_budget=7)
    assert rsp.usage.output_tokens_details == {"reasoning_tokens": 7}


def test_models_that_think_by_default(native: Any) -> None:
    assert "qwen3.5-plus" in native.thinking_models
    rsp = dashscope.Generation.call(
        model="qwen3.5-plus", prompt="Hi", api_key=KEY, result_format="message", max_tokens=5
    )
    assert rsp.usage.output_tokens_details == {"reasoning_tokens": native.reasoning_tokens}
    off = dashscope.Generation.call(
        model="qwen3.5-plus",
        prompt="Hi",
        api_key=KEY,
        result_format="message",
        max_tokens=5,
        enable_thinking=False,
    )
    assert off.usage.output_tokens == 5
    assert "output_tokens_details" not in off.usage


def test_native_multimodal(native: Any) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"image": "https://example.com/cat.png"}, {"text": "What is this?"}],
        }
    ]
    rsp = dashscope.MultiModalConversation.call(
        model="qwen-vl-plus", messages=messages, api_key=KEY
    )
    assert rsp.status_code == 200
    assert rsp.output.choices[0].message.content == [{"text": lorem(20)}]
    expected = 3 + 5 + tokens("What is this?") + native.image_tokens + 5 + tokens(DEFAULT_SYSTEM)
    assert rsp.usage.input_tokens == expected
    assert rsp.usage.image_tokens == native.image_tokens == 1280
    assert native.requests[-1].path == "/api/v1/services/aigc/multimodal-generation/generation"


def test_native_embedding(native: Any) -> None:
    texts = ["The quick brown fox", "跳过懒狗"]
    rsp = dashscope.TextEmbedding.call(
        model="text-embedding-v3", input=texts, dimension=64, api_key=KEY
    )
    assert rsp.status_code == 200
    assert [e["text_index"] for e in rsp.output["embeddings"]] == [0, 1]
    assert all(len(e["embedding"]) == 64 for e in rsp.output["embeddings"])
    assert rsp.usage == {"total_tokens": sum(tokens(t) for t in texts)}
    assert native.usage_log == [("text-embedding-v3", sum(tokens(t) for t in texts), 0)]


def test_native_async(native: Any) -> None:
    async def run() -> tuple[Any, list[Any]]:
        try:
            plain = await dashscope.AioGeneration.call(
                model="qwen-plus", prompt="Hello, how are you?", api_key=KEY, max_tokens=3
            )
            stream = await dashscope.AioGeneration.call(
                model="qwen-plus",
                prompt="Hello, how are you?",
                api_key=KEY,
                stream=True,
                incremental_output=True,
            )
            return plain, [c async for c in stream]
        finally:
            await dashscope.close_shared_aio_session()

    plain, chunks = asyncio.run(run())
    assert plain.status_code == 200
    assert plain.output.text == lorem(3)
    assert plain.usage.input_tokens == framed(USER)
    assert "".join(c.output.text for c in chunks) == lorem(20)
    assert chunks[-1].usage.output_tokens == 20


# --------------------------------------------------------------------------- OpenAI-compatible API


def test_compat_chat(server: Any, client: Any) -> None:
    rsp = chat(client, max_tokens=7)
    assert rsp.object == "chat.completion"
    assert rsp.choices[0].message.content == lorem(7)
    assert rsp.choices[0].finish_reason == "length"
    assert rsp.usage.prompt_tokens == framed(USER)
    assert rsp.usage.completion_tokens == 7
    assert rsp.usage.total_tokens == framed(USER) + 7
    assert rsp.usage.completion_tokens_details is None
    assert server.usage_log == [("qwen-plus", framed(USER), 7)]
    assert server.requests[-1].path == "/compatible-mode/v1/chat/completions"


def test_compat_content_parts(client: Any) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            ],
        },
    ]
    rsp = chat(client, messages=messages)
    expected = 3 + 5 + tokens("Be brief.") + 5 + tokens("Describe") + 1280
    assert rsp.usage.prompt_tokens == expected


def test_compat_stream_with_usage(server: Any, client: Any) -> None:
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == lorem(20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == framed(USER)
    assert last.usage.completion_tokens == 20
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert server.usage_log == [("qwen-plus", framed(USER), 20)]


def test_compat_stream_without_usage(client: Any) -> None:
    chunks = list(chat(client, stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_compat_thinking(server: Any, client: Any) -> None:
    thinking = {"enable_thinking": True}
    rsp = chat(client, max_tokens=8, extra_body=thinking)
    assert rsp.choices[0].message.reasoning_content == lorem(server.reasoning_tokens)
    assert rsp.choices[0].message.content == lorem(8)
    assert rsp.usage.completion_tokens == 8 + server.reasoning_tokens
    assert rsp.usage.completion_tokens_details.reasoning_tokens == server.reasoning_tokens

    budget = {**thinking, "thinking_budget": 10}
    stream = chat(client, stream=True, stream_options={"include_usage": True}, extra_body=budget)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == lorem(10)
    assert "".join(d.content or "" for d in deltas) == lorem(20)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == tokens(reasoning) == 10
    assert chunks[-1].usage.completion_tokens == 30


def test_compat_async(server: Any) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(
            api_key=KEY, base_url=server.openai_base, max_retries=0
        ) as aclient:
            plain = await aclient.chat.completions.create(model="qwen-plus", messages=USER)
            stream = await aclient.chat.completions.create(
                model="qwen-plus",
                messages=USER,
                stream=True,
                stream_options={"include_usage": True},
            )
            return plain, [c async for c in stream]

    plain, chunks = asyncio.run(run())
    assert plain.usage.prompt_tokens == framed(USER)
    assert plain.choices[0].message.content == lorem(20)
    assert chunks[-1].usage.completion_tokens == 20


def test_compat_embeddings(server: Any, client: Any) -> None:
    texts = ["hello world", "你好"]
    rsp = client.embeddings.create(model="text-embedding-v3", input=texts, dimensions=8)
    assert [len(d.embedding) for d in rsp.data] == [8, 8]
    assert rsp.usage.prompt_tokens == rsp.usage.total_tokens == sum(tokens(t) for t in texts)
    ids = client.embeddings.create(model="text-embedding-v3", input=[1, 2, 3])
    assert ids.usage.prompt_tokens == 3
    assert [u[1] for u in server.usage_log] == [sum(tokens(t) for t in texts), 3]


def test_compat_files_and_batches(server: Any, client: Any) -> None:
    lines = [
        '{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
        '"body":{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}],"max_tokens":3}}',
        '{"custom_id":"b","method":"POST","url":"/v1/chat/completions",'
        '"body":{"model":"qwen-plus","messages":[{"role":"user","content":"yo"}]}}',
    ]
    upload = client.files.create(
        file=("batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch"
    )
    assert upload.object == "file" and upload.purpose == "batch"
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.object == "batch"
    assert batch.status == "validating"
    assert batch.input_file_id == upload.id
    assert batch.completion_window == "24h"

    done = client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == done.request_counts.completed == 2
    assert done.output_file_id
    results = [
        json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()
    ]
    assert [r["custom_id"] for r in results] == ["a", "b"]
    assert results[0]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert server.usage_log == []  # batches never draw on the free quota


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_native_error_plain(
    native: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    native.fail_next(code)
    rsp = generate()
    assert (rsp.status_code, rsp.code) == (status, code)
    assert rsp.request_id and rsp.message
    assert rsp.output is None
    assert generate().status_code == 200  # times=1
    assert len(native.usage_log) == 1


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_native_error_stream_up_front(
    native: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    native.fail_next(code)
    chunks = list(generate(stream=True, incremental_output=True))
    assert [(c.status_code, c.code) for c in chunks] == [(status, code)]
    assert chunks[0].request_id


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_native_error_in_stream(
    native: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    native.fail_next(code, in_stream_after=2)
    chunks = list(generate(stream=True, incremental_output=True))
    assert [c.status_code for c in chunks[:2]] == [200, 200]
    assert "".join(c.output.text for c in chunks[:2]) == lorem(2)
    # The frame says :HTTP_STATUS/<status>, but dashscope only reads `status:` lines
    # (which the platform does not send) and reports 400 for every in-stream error.
    assert (chunks[2].status_code, chunks[2].code) == (400, code)
    assert len(chunks) == 3
    assert native.usage_log == []


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_native_error_non_stream_ignores_in_stream_after(
    native: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    native.fail_next(code, in_stream_after=3)
    rsp = generate()
    assert (rsp.status_code, rsp.code) == (status, code)


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_native_error_async(
    native: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    async def run() -> tuple[Any, list[Any], list[Any]]:
        try:
            native.fail_next(code)
            plain = await dashscope.AioGeneration.call(model="qwen-plus", prompt="x", api_key=KEY)
            native.fail_next(code)
            up_front = await dashscope.AioGeneration.call(
                model="qwen-plus", prompt="x", api_key=KEY, stream=True, incremental_output=True
            )
            first = [c async for c in up_front]
            native.fail_next(code, in_stream_after=1)
            late = await dashscope.AioGeneration.call(
                model="qwen-plus", prompt="x", api_key=KEY, stream=True, incremental_output=True
            )
            return plain, first, [c async for c in late]
        finally:
            await dashscope.close_shared_aio_session()

    plain, up_front, late = asyncio.run(run())
    assert (plain.status_code, plain.code) == (status, code)
    assert [(c.status_code, c.code) for c in up_front] == [(status, code)]
    assert [(c.status_code, c.code) for c in late] == [(200, ""), (400, code)]


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_compat_error_plain(
    server: Any, client: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    server.fail_next(code)
    with pytest.raises(getattr(openai, exc)) as info:
        chat(client)
    err = info.value
    assert err.status_code == status
    assert err.code == compat_code
    assert err.body["code"] == compat_code and err.body["message"]
    assert err.request_id  # from the x-request-id header
    assert chat(client).usage.completion_tokens == 20


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_compat_error_stream_up_front(
    server: Any, client: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    server.fail_next(code)
    with pytest.raises(getattr(openai, exc)) as info:
        chat(client, stream=True)
    assert (info.value.status_code, info.value.code) == (status, compat_code)


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_compat_error_in_stream(
    server: Any, client: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    server.fail_next(code, in_stream_after=2)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in chat(client, stream=True, stream_options={"include_usage": True}):
            received.append(chunk)
    err = info.value
    assert type(err) is openai.APIError  # not an APIStatusError: the stream said 200
    assert not hasattr(err, "status_code")
    assert err.code == compat_code
    assert err.body["code"] == compat_code
    assert len(received) == 2
    assert server.usage_log == []


@pytest.mark.parametrize(("code", "status", "compat_code", "exc"), ERRORS)
def test_compat_error_async(
    server: Any, code: str, status: int, compat_code: str, exc: str
) -> None:
    async def run() -> tuple[Any, Any]:
        async with openai.AsyncOpenAI(
            api_key=KEY, base_url=server.openai_base, max_retries=0
        ) as aclient:
            server.fail_next(code)
            try:
                await aclient.chat.completions.create(model="qwen-plus", messages=USER)
            except openai.APIError as e:
                plain: Any = e
            server.fail_next(code, in_stream_after=1)
            stream = await aclient.chat.completions.create(
                model="qwen-plus", messages=USER, stream=True
            )
            try:
                async for _ in stream:
                    pass
            except openai.APIError as e:
                late: Any = e
            return plain, late

    plain, late = asyncio.run(run())
    assert isinstance(plain, getattr(openai, exc))
    assert (plain.status_code, plain.code) == (status, compat_code)
    assert type(late) is openai.APIError and late.code == compat_code


def test_fail_next_times_custom_codes_and_queue(native: Any, client: Any) -> None:
    native.fail_next("Arrearage", times=2)
    native.fail_next("Teapot", status=418, message="short and stout")
    assert generate().code == "Arrearage"
    with pytest.raises(openai.BadRequestError):
        chat(client)
    rsp = generate()
    assert (rsp.status_code, rsp.code, rsp.message) == (418, "Teapot", "short and stout")
    assert generate().status_code == 200
    with pytest.raises(ValueError, match="unknown error code"):
        native.fail_next("Teapot")
    with pytest.raises(ValueError):
        native.fail_next("Arrearage", times=0)


def test_switches_and_reset(native: Any, client: Any) -> None:
    native.free_tier_only = True
    assert generate().code == "AllocationQuota.FreeTierOnly"
    with pytest.raises(openai.PermissionDeniedError):
        chat(client)
    native.arrearage = True  # overdue wins: every call is refused
    rsp = dashscope.TextEmbedding.call(model="text-embedding-v3", input="x", api_key=KEY)
    assert (rsp.status_code, rsp.code) == (400, "Arrearage")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="text-embedding-v3", input="x")
    assert info.value.code == "Arrearage"
    native.fail_next("Throttling.RateQuota")
    native.reset()
    assert native.request_count == 0 and native.usage_log == []
    assert not native.free_tier_only and not native.arrearage
    assert generate().status_code == 200
    assert chat(client).usage.completion_tokens == 20


def test_free_quota_runs_out(native: Any, client: Any) -> None:
    per_call = framed(USER) + 20
    native.free_quota = per_call * 2 + 1
    assert generate().status_code == 200
    assert native.free_quota_remaining == per_call + 1
    assert chat(client).usage.total_tokens == per_call
    assert native.free_quota_remaining == 1
    assert generate().status_code == 200  # the call that crosses the line still goes through
    assert native.free_quota_remaining == 0
    refused = generate()
    assert (refused.status_code, refused.code) == (403, "AllocationQuota.FreeTierOnly")
    with pytest.raises(openai.PermissionDeniedError):
        chat(client)
    native.free_quota = None
    assert generate().status_code == 200


def test_api_key_is_checked() -> None:
    with FakeDashScope(api_key="sk-right") as server:
        wrong = dashscope.Generation.call(
            model="qwen-plus", prompt="x", api_key="sk-wrong", base_address=server.native_base
        )
        assert (wrong.status_code, wrong.code) == (401, "InvalidApiKey")
        right = dashscope.Generation.call(
            model="qwen-plus", prompt="x", api_key="sk-right", base_address=server.native_base
        )
        assert right.status_code == 200
        with openai.OpenAI(api_key="sk-wrong", base_url=server.openai_base, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as info:
                chat(c)
            assert info.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                c.files.list()
        assert all("authorization" not in r.headers for r in server.requests)
        assert server.request_count == 4


def test_close_stream_after(native: Any, client: Any) -> None:
    native.close_stream_after = 2
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in generate(stream=True, incremental_output=True):
            received.append(chunk)
    assert len(received) == 2
    got = []
    with pytest.raises(openai.APIConnectionError):
        for c in chat(client, stream=True, stream_options={"include_usage": True}):
            got.append(c)
    assert len(got) == 2
    # The service generated both replies: they are billed, though nobody read them.
    assert [u[2] for u in native.usage_log] == [20, 20]
    native.close_stream_after = None
    assert len(list(generate(stream=True, incremental_output=True))) == 20


def test_latency_and_chunk_delay(native: Any) -> None:
    native.latency = 0.2
    started = time.monotonic()
    assert generate().status_code == 200
    assert time.monotonic() - started >= 0.2
    native.latency = 0.0
    native.chunk_delay = 0.02
    started = time.monotonic()
    assert len(list(generate(stream=True, max_tokens=6))) == 6
    assert time.monotonic() - started >= 0.1


def test_concurrent_calls(native: Any) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                assert generate(max_tokens=3).status_code == 200
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert native.request_count == 40
    assert native.usage_log == [("qwen-plus", framed(USER), 3)] * 40


def test_lifecycle_leaves_no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(threading.enumerate())
    server = FakeDashScope()
    with pytest.raises(RuntimeError):
        server.base_url  # noqa: B018
    server.start()
    with pytest.raises(RuntimeError):
        server.start()
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.native_base == server.base_url + "/api/v1"
    assert server.openai_base == server.base_url + "/compatible-mode/v1"
    monkeypatch.setattr(dashscope, "base_http_api_url", server.native_base)
    generate()  # leaves a keep-alive connection in dashscope's shared pool
    stream = generate(stream=True, incremental_output=True)
    next(stream)  # an abandoned stream
    with openai.OpenAI(api_key=KEY, base_url=server.openai_base, max_retries=0) as c:
        chat(c)
        abandoned = chat(c, stream=True)
        next(iter(abandoned))
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 3
        abandoned.close()
    server.stop()  # idempotent
    assert not server.running
    stream.close()
    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leaked == []
