"""Every token counted (R8): input the bound cannot see, reasoning, tools, images, caches.

FakeDashScope bills like the service (search results, referenced files, built-in tools
and stored conversations add input; thinking models reason by default; tools are
rendered with the chat template; images cost their pixels), so an under-count shows.
The invariant: under Free Quota Only, what the server billed never exceeds the grant,
and the ledger never says less was used than the server billed.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from conftest import SDK_KEY, recorded, server_usage

import quotaguard
from quotaguard import FreeTierOnly
from quotaguard.testing import FakeDashScope
from quotaguard.wrap import vision_tokens

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen-plus"
GRANT = 5_000
MESSAGES = [{"role": "user", "content": "What changed in the free quota rules?"}]


@pytest.fixture
def guard() -> Iterator[Any]:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    for model in (MODEL, "qwen-long", "qwen3.5-plus", "qwen-vl-max"):
        guard.grant(model, tokens=GRANT)
        guard.set_free_only(model)
    yield guard
    assert all(q.reserved == 0 for q in guard.quotas()), "a reservation leaked"


@pytest.fixture
def client(guard: Any, server: FakeDashScope) -> Iterator[Any]:
    raw = openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base, max_retries=0)
    with guard.wrap_openai(raw) as wrapped:
        yield wrapped


@pytest.fixture
def raw_client(server: FakeDashScope) -> Iterator[Any]:
    with openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base, max_retries=0) as c:
        yield c


def assert_invariant(guard: Any, server: FakeDashScope, model: str = MODEL) -> None:
    assert server.idle()
    spent = sum(i + o for m, i, o in server.usage_log if m == model)
    assert spent <= GRANT
    assert guard.quota(model).used >= spent
    assert sum(r.input_tokens + r.output_tokens for r in guard.records(model=model)) >= spent


def reserved_by(
    guard: Any, model: str, call: Callable[..., Any]
) -> tuple[Callable[..., Any], list[int]]:
    """``call`` guarded by ``@guard.wrap``, and the list of what each call of it reserved
    (the guard's hold while the server answers)."""
    seen: list[int] = []

    @guard.wrap(model=model)
    def probe(**kwargs: Any) -> Any:
        seen.append(guard.quota(model).reserved)
        return call(**kwargs)

    return probe, seen


# ------------------------------------------------------------------------------ unbounded


def test_web_search_is_unbounded(guard: Any, client: Any, server: FakeDashScope) -> None:
    search = {"enable_search": True}
    with pytest.raises(FreeTierOnly) as refused:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=20, extra_body=search
        )
    assert (refused.value.reason, server.request_count) == ("unbounded", 0)
    assert "enable_search" in str(refused.value)
    # A stated bound (consumed, never sent) is reserved and covers the search results.
    client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, extra_body=search, max_input_tokens=3_000
    )
    [(_, billed_in, _)] = server_usage(server, 1)
    assert billed_in > server.search_tokens
    assert recorded(guard) == server.usage_log
    assert_invariant(guard, server)


def test_web_search_through_dashscope_and_a_wrapper_bound(
    guard: Any, server: FakeDashScope
) -> None:
    ds = guard.wrap_dashscope()
    with pytest.raises(FreeTierOnly):
        ds.Generation.call(
            model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20, enable_search=True
        )
    bounded = guard.wrap_dashscope(max_input_tokens=3_000)
    answer = bounded.Generation.call(
        model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20, enable_search=True
    )
    assert answer.status_code == 200
    assert recorded(guard) == server_usage(server, 1)
    assert_invariant(guard, server)


def test_unbounded_input_without_the_switch_goes_and_is_recorded_truly(
    server: FakeDashScope,
) -> None:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    guard.grant(MODEL, tokens=GRANT)
    ds = guard.wrap_dashscope()
    ds.Generation.call(
        model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20, enable_search=True
    )
    assert recorded(guard) == server_usage(server, 1)  # search results included


def test_file_references_are_unbounded(guard: Any, client: Any, server: FakeDashScope) -> None:
    document = "The free quota is shared by the account and its RAM users. " * 40
    upload = client.files.create(file=("rules.txt", document.encode()), purpose="file-extract")
    messages = [
        {"role": "system", "content": f"fileid://{upload.id}"},
        {"role": "user", "content": "Summarize the document."},
    ]
    with pytest.raises(FreeTierOnly) as refused:
        client.chat.completions.create(model="qwen-long", messages=messages, max_tokens=20)
    assert refused.value.reason == "unbounded" and "fileid://" in str(refused.value)
    client.chat.completions.create(
        model="qwen-long", messages=messages, max_tokens=20, max_input_tokens=1_000
    )
    [(_, billed_in, _)] = server_usage(server, 1)
    assert billed_in > server.count_tokens(document)  # the whole file, on every call
    assert_invariant(guard, server, "qwen-long")


def test_built_in_tools_and_stored_conversations_are_unbounded(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    with pytest.raises(FreeTierOnly) as refused:
        client.responses.create(
            model=MODEL, input="Search the news.", tools=[{"type": "web_search"}]
        )
    assert "built-in tool 'web_search'" in str(refused.value)
    first = client.responses.create(model=MODEL, input="Remember 42.", max_output_tokens=20)
    with pytest.raises(FreeTierOnly) as refused:
        client.responses.create(
            model=MODEL, input="What number?", previous_response_id=first.id, max_output_tokens=20
        )
    assert "previous_response_id" in str(refused.value)
    client.responses.create(
        model=MODEL,
        input="What number?",
        previous_response_id=first.id,
        max_output_tokens=20,
        max_input_tokens=500,
    )
    assert recorded(guard) == server_usage(server, 2)
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ reasoning


def test_models_that_think_by_default_reserve_their_reasoning(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    model = "qwen3.5-plus"
    longest = guard.model_info(model)["max_reasoning_tokens"]
    bound = guard.input_bound(messages=MESSAGES)
    with pytest.raises(FreeTierOnly) as refused:  # its longest chain of thought does not fit
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20)
    assert refused.value.requested == bound + 20 + longest
    budget = {"thinking_budget": 100}
    answer = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=20, extra_body=budget
    )
    assert answer.usage.completion_tokens_details.reasoning_tokens == server.reasoning_tokens
    assert answer.usage.completion_tokens > 20  # reasoning is billed beyond max_tokens
    off = {"enable_thinking": False}
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, extra_body=off)
    assert recorded(guard) == server_usage(server, 2)
    thinking, plain = guard.records()
    assert (thinking.thinking, plain.thinking) == (True, False)
    assert_invariant(guard, server, model)


def test_native_thinking_by_default(guard: Any, server: FakeDashScope) -> None:
    ds = guard.wrap_dashscope()
    with pytest.raises(FreeTierOnly):
        ds.Generation.call(
            model="qwen3.5-plus",
            prompt="Hi",
            api_key=SDK_KEY,
            max_tokens=5,
            result_format="message",
        )
    ds.Generation.call(
        model="qwen3.5-plus",
        prompt="Hi",
        api_key=SDK_KEY,
        max_tokens=5,
        result_format="message",
        thinking_budget=64,
    )
    assert recorded(guard) == server_usage(server, 1)
    assert_invariant(guard, server, "qwen3.5-plus")


# ------------------------------------------------------------------------------ tools


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "remaining_quota",
            "description": "剩余免费额度 of a model, as the console shows it.",
            "parameters": {
                "type": "object",
                "properties": {"model": {"type": "string", "description": "e.g. qwen-plus"}},
                "required": ["model"],
            },
        },
    }
]
HISTORY = [
    {"role": "user", "content": "How much qwen-plus quota is left?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "remaining_quota", "arguments": '{"model": "qwen-plus"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "362,917/1,000,000"},
    {"role": "tool", "tool_call_id": "call_2", "content": "expires 2026-03-01"},
]


def test_tools_are_counted_with_the_chat_template(
    guard: Any, raw_client: Any, server: FakeDashScope
) -> None:
    probe, seen = reserved_by(guard, MODEL, raw_client.chat.completions.create)
    probe(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=20)
    [(_, billed_in, _)] = server_usage(server, 1)
    bound = seen[0] - 20
    # Never under what the service bills, and close to it: the template, not an allowance.
    assert billed_in <= bound <= billed_in + 64
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ images


def png(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(("width", "height"), [(280, 280), (500, 90), (10, 10)])
def test_an_image_of_known_size_costs_its_pixels(
    guard: Any, raw_client: Any, server: FakeDashScope, width: int, height: int
) -> None:
    picture = [
        {"type": "image_url", "image_url": {"url": png(width, height)}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    messages = [{"role": "user", "content": picture}]
    probe, seen = reserved_by(guard, "qwen-vl-max", raw_client.chat.completions.create)
    probe(model="qwen-vl-max", messages=messages, max_tokens=20)
    [(_, billed_in, _)] = server_usage(server, 1)
    text_only = guard.input_bound(messages=[{"role": "user", "content": picture[1]["text"]}])
    bound = seen[0] - 20
    assert bound == text_only + vision_tokens(width, height)
    # Never under the service's count; above it by the default system message and the
    # rounding of the image's sides (up, where the service rounds to the nearest).
    assert billed_in <= bound <= billed_in + 40
    assert_invariant(guard, server, "qwen-vl-max")


def test_an_image_of_unknown_size_costs_the_catalogue_maximum(guard: Any) -> None:
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    probe, seen = reserved_by(guard, MODEL, lambda **kwargs: {"usage": {"input_tokens": 1}})
    guard.grant(MODEL, tokens=100_000)
    probe(messages=[{"role": "user", "content": remote}], max_tokens=1)
    assert seen[0] >= guard.model_info(MODEL)["max_image_tokens"] == 16_386


# ------------------------------------------------------------------------------ caches


def test_explicit_cache_writes_and_hits_are_priced_at_their_rates(server: FakeDashScope) -> None:
    guard = quotaguard.QuotaGuard(ledger="memory://")  # no free quota: every token billed
    document = "Rules of the free quota, chapter and verse. " * 60
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": document, "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": "Summarize."},
    ]
    raw = openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base)
    client = guard.wrap_openai(raw)
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    created = first.usage.prompt_tokens_details.cache_creation_input_tokens
    hits = second.usage.prompt_tokens_details.cached_tokens
    assert created > 0 and hits == created
    write, hit = guard.records()

    def per_million(tokens: int, price: str) -> Decimal:
        return tokens * Decimal(price) / 1_000_000

    plain = first.usage.prompt_tokens - created
    assert write.cost == (
        per_million(plain, "0.8") + per_million(created, "1.0") + per_million(20, "2")
    )
    assert hit.cost == (
        per_million(plain, "0.8") + per_million(hits, "0.08") + per_million(20, "2")
    )
    assert hit.cached_tokens == hits


def test_a_stated_bound_below_the_count_is_never_used(
    guard: Any, raw_client: Any, server: FakeDashScope
) -> None:
    probe, seen = reserved_by(guard, MODEL, raw_client.chat.completions.create)
    probe(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        extra_body={"enable_search": True},
        max_input_tokens=1,
    )
    assert seen[0] - 10 == guard.input_bound(messages=MESSAGES)  # the count, not 1
    assert "max_input_tokens" not in server.requests[-1].body
    # The search results went past the stated bound: the record tells the truth (R9).
    assert recorded(guard) == server_usage(server, 1)
    assert guard.records()[0].input_tokens > seen[0]
