"""@guard.wrap: reserve before the call, settle after it, whatever way the call ends."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dashscope
import pytest
from conftest import SDK_KEY, recorded, server_usage

import quotaguard
from quotaguard.exceptions import AccountOverdue, FreeTierOnly, NoUsageWarning
from quotaguard.testing import FakeDashScope
from quotaguard.wrap import IMAGE_TOKENS, GuardedAsyncStream, GuardedStream, wrap

pytestmark = pytest.mark.timeout(60)

KEY = SDK_KEY
MODEL = "qwen-plus"
FREE = 1_000_000
MESSAGES = [{"role": "user", "content": "Say hello to the quota guard."}]


@pytest.fixture
def guard() -> Iterator[Any]:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    guard.grant(MODEL, tokens=FREE)
    yield guard
    assert guard.quota(MODEL).reserved == 0, "a reservation leaked"


def bound(guard: Any, messages: list[dict[str, Any]] = MESSAGES) -> int:
    return int(guard.input_bound(messages=messages))


def failures(guard: Any) -> int:
    return sum(s.failures for s in guard.stats())


def usage_dict(input_tokens: int, output_tokens: int, finish: str = "stop") -> dict[str, Any]:
    return {
        "request_id": "req-1",
        "output": {"text": "hi", "finish_reason": finish},
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


# ------------------------------------------------------------------------------ results


def test_plain_http_call_returning_a_dict(guard: Any, server: FakeDashScope) -> None:
    reserved = []

    @wrap(guard)
    def generate(model: str, input: dict[str, Any], parameters: dict[str, Any]) -> Any:
        reserved.append(guard.quota(model).reserved)
        body = json.dumps({"model": model, "input": input, "parameters": parameters}).encode()
        request = urllib.request.Request(
            server.native_base + "/services/aigc/text-generation/generation",
            data=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    reply = generate(MODEL, {"messages": MESSAGES}, {"max_tokens": 30})
    assert reserved == [bound(guard) + 30]  # the worst case: input bound + max tokens
    assert recorded(guard) == server_usage(server, 1)
    assert guard.records()[0].request_id == reply["request_id"]


def test_sdk_call_and_stream_in_a_wrapped_function(guard: Any, server: FakeDashScope) -> None:
    @guard.wrap
    def ask(model: str, messages: list[dict[str, Any]], stream: bool = False) -> Any:
        return dashscope.Generation.call(model=model, messages=messages, api_key=KEY, stream=stream)

    assert ask(MODEL, MESSAGES).status_code == 200
    stream = ask(MODEL, MESSAGES, stream=True)
    assert isinstance(stream, GuardedStream)
    assert len(list(stream)) == server.reply_tokens
    assert recorded(guard) == server_usage(server, 2)


def test_async_function(guard: Any, server: FakeDashScope) -> None:
    @guard.wrap(model=MODEL)
    async def ask(prompt: str) -> Any:
        return await dashscope.AioGeneration.call(model=MODEL, prompt=prompt, api_key=KEY)

    async def main() -> Any:
        try:
            return await ask("Hello")
        finally:
            await dashscope.close_shared_aio_session()

    assert asyncio.run(main()).status_code == 200
    assert recorded(guard) == server_usage(server, 1)


def test_result_without_usage_settles_the_worst_case_with_one_warning(guard: Any) -> None:
    @wrap(guard)
    def ask(model: str, prompt: str, max_tokens: int) -> str:
        return "an answer, but no usage"

    with pytest.warns(NoUsageWarning, match="ask returned no usage"):
        assert ask(MODEL, "Hi", max_tokens=12) == "an answer, but no usage"
    assert ask(MODEL, "Hi", max_tokens=12) == "an answer, but no usage"  # warned once
    first, second = guard.records()
    assert (first.input_tokens, first.output_tokens) == (guard.input_bound(prompt="Hi"), 12)
    assert not first.in_doubt  # the call ended; only its usage is unknown
    assert (second.input_tokens, second.output_tokens) == (first.input_tokens, 12)


def test_defaults_of_the_wrapped_function_are_read(guard: Any) -> None:
    """Item 7: model, messages and max_tokens from the function's own defaults."""
    guard.grant(MODEL, tokens=1_000)
    guard.set_free_only(MODEL)
    reserved = []

    @guard.wrap
    def ask(model: str = MODEL, messages: Any = MESSAGES, max_tokens: int = 512) -> Any:
        reserved.append(guard.quota(model).reserved)
        return usage_dict(10, 5)

    ask()  # the catalogue default for qwen-plus (32,768) would not fit in 1,000
    assert reserved == [bound(guard) + 512]
    ask(max_tokens=20)
    assert reserved[-1] == bound(guard) + 20

    @guard.wrap
    def summarize(text: str, model: str = MODEL, prompt: str = "Summarize this.") -> Any:
        reserved.append(guard.quota(model).reserved)
        return usage_dict(10, 5)

    with pytest.raises(FreeTierOnly):  # no max_tokens default: the catalogue's 32,768
        summarize("x")
    assert recorded(guard) == [(MODEL, 10, 5)] * 2


def test_openai_shaped_dict_and_model_from_wrap(guard: Any) -> None:
    @wrap(guard, model=MODEL)
    def ask(messages: list[dict[str, Any]]) -> dict[str, Any]:
        usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        return {"id": "chatcmpl-1", "choices": [], "usage": usage}

    ask(MESSAGES)
    assert recorded(guard) == [(MODEL, 9, 4)]
    assert guard.records()[0].request_id == "chatcmpl-1"


# ------------------------------------------------------------------------------ streams


def test_generator_settles_the_last_cumulative_usage(guard: Any) -> None:
    @wrap(guard)
    def stream(model: str, prompt: str) -> Iterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        yield usage_dict(10, 2, finish="null")
        yield usage_dict(10, 3)

    assert len(list(stream(MODEL, "Hi"))) == 3
    assert recorded(guard) == [(MODEL, 10, 3)]


def test_async_generator(guard: Any) -> None:
    @wrap(guard)
    async def stream(model: str, prompt: str) -> AsyncIterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        yield usage_dict(10, 2)

    async def main() -> None:
        chunks = stream(MODEL, "Hi")
        assert isinstance(chunks, GuardedAsyncStream)
        assert len([c async for c in chunks]) == 2

    asyncio.run(main())
    assert recorded(guard) == [(MODEL, 10, 2)]


def test_stream_closed_early_settles_the_worst_case(guard: Any) -> None:
    @wrap(guard)
    def stream(model: str, prompt: str, max_tokens: int) -> Iterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        yield usage_dict(10, 2, finish="null")
        yield usage_dict(10, 3)

    with stream(MODEL, "Hi", max_tokens=50) as chunks:
        next(chunks)
        next(chunks)
    assert recorded(guard) == [(MODEL, guard.input_bound(prompt="Hi"), 50)]


def test_stream_dropped_unread_settles_the_worst_case(guard: Any) -> None:
    @wrap(guard)
    def stream(model: str, prompt: str, max_tokens: int) -> Iterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        yield usage_dict(10, 2)

    chunks = stream(MODEL, "Hi", max_tokens=50)
    next(chunks)
    del chunks
    gc.collect()
    assert recorded(guard) == [(MODEL, guard.input_bound(prompt="Hi"), 50)]


def test_async_stream_closed_early_settles_the_worst_case(guard: Any) -> None:
    @wrap(guard)
    async def stream(model: str, prompt: str, max_tokens: int) -> AsyncIterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        yield usage_dict(10, 2)

    async def main() -> None:
        async with stream(MODEL, "Hi", max_tokens=50) as chunks:
            await chunks.__anext__()

    asyncio.run(main())
    assert recorded(guard) == [(MODEL, guard.input_bound(prompt="Hi"), 50)]


def test_stream_failing_midway_reraises_and_never_under_counts(guard: Any) -> None:
    boom = ConnectionResetError("cut")

    @wrap(guard)
    def stream(model: str, prompt: str, max_tokens: int) -> Iterator[dict[str, Any]]:
        yield usage_dict(10, 1, finish="null")
        raise boom

    with pytest.raises(ConnectionResetError) as raised:
        list(stream(MODEL, "Hi", max_tokens=50))
    assert raised.value is boom
    assert recorded(guard) == [(MODEL, guard.input_bound(prompt="Hi"), 50)]


# ------------------------------------------------------------------------------ errors


def test_refused_call_is_never_made(guard: Any) -> None:
    guard.grant(MODEL, tokens=100)
    guard.set_free_only(MODEL)
    calls = []

    @wrap(guard)
    def ask(model: str, prompt: str, max_tokens: int) -> None:
        calls.append(1)

    with pytest.raises(FreeTierOnly):
        ask(MODEL, "Hi", max_tokens=1000)
    assert calls == []
    assert guard.remaining(MODEL) == 100


def test_an_exception_is_reraised_untouched_and_in_doubt(guard: Any) -> None:
    """Whether a failed function's request reached the service is unknown: its worst case
    is recorded, marked in doubt (R9), never released."""
    boom = RuntimeError("network down")

    @wrap(guard)
    def ask(model: str, prompt: str, max_tokens: int = 40) -> None:
        raise boom

    with pytest.raises(RuntimeError) as raised:
        ask(MODEL, "Hi")
    assert raised.value is boom
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (40, True)
    assert guard.remaining(MODEL) == FREE - record.input_tokens - 40


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "refused"), socket.gaierror(-2, "Name or service not known")],
    ids=["refused", "no-such-host"],
)
def test_an_error_that_proves_nothing_was_sent_releases(guard: Any, error: Exception) -> None:
    @wrap(guard)
    def ask(model: str, prompt: str) -> None:
        raise RuntimeError("the SDK wraps it") from error

    with pytest.raises(RuntimeError):
        ask(MODEL, "Hi")
    assert guard.records() == []
    assert guard.remaining(MODEL) == FREE
    assert failures(guard) == 1


def test_an_http_error_answer_releases(guard: Any) -> None:
    class StatusError(Exception):
        status_code = 503

    @wrap(guard)
    def ask(model: str, prompt: str) -> None:
        raise StatusError("service unavailable")

    with pytest.raises(StatusError):
        ask(MODEL, "Hi")
    assert guard.records() == []
    assert guard.remaining(MODEL) == FREE


def test_keyboard_interrupt_is_in_doubt(guard: Any) -> None:
    @wrap(guard)
    def ask(model: str, prompt: str, max_tokens: int = 30) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ask(MODEL, "Hi")
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (30, True)


def test_cancellation_is_in_doubt(guard: Any) -> None:
    started = asyncio.Event()

    @wrap(guard)
    async def ask(model: str, prompt: str, max_tokens: int = 30) -> None:
        started.set()
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(ask(MODEL, "Hi"))
        await started.wait()
        assert guard.quota(MODEL).reserved > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (30, True)


@pytest.mark.parametrize(
    ("code", "exception"),
    [("AllocationQuota.FreeTierOnly", FreeTierOnly), ("Arrearage", AccountOverdue)],
)
def test_returned_refusal_raises(guard: Any, code: str, exception: type[Exception]) -> None:
    @wrap(guard)
    def ask(model: str, prompt: str) -> dict[str, Any]:
        return {"status_code": 403, "code": code, "message": "refused", "request_id": "r"}

    with pytest.raises(exception):
        ask(MODEL, "Hi")
    assert guard.records() == []
    assert failures(guard) == 1


def test_other_returned_error_is_returned(guard: Any) -> None:
    answer = {"status_code": 429, "code": "Throttling.RateQuota", "message": "slow down"}

    @wrap(guard)
    def ask(model: str, prompt: str) -> dict[str, Any]:
        return answer

    assert ask(MODEL, "Hi") is answer
    assert guard.remaining(MODEL) == FREE
    assert failures(guard) == 1


def test_a_call_without_model_or_input_is_a_type_error(guard: Any) -> None:
    @wrap(guard)
    def ask(**kwargs: Any) -> None:
        raise AssertionError("not called")

    with pytest.raises(TypeError, match="model"):
        ask(prompt="Hi")
    with pytest.raises(TypeError, match="messages"):
        ask(model=MODEL)


# ------------------------------------------------------------------------------ bounds


@pytest.mark.filterwarnings("ignore::quotaguard.NoUsageWarning")
def test_output_bound_counts_choices_and_thinking(guard: Any) -> None:
    reserved = []

    @wrap(guard)
    def ask(model: str, messages: list[dict[str, Any]], **options: Any) -> None:
        reserved.append(guard.quota(model).reserved - bound(guard))

    ask(MODEL, MESSAGES, max_tokens=10, n=3)
    ask(MODEL, MESSAGES, parameters={"max_tokens": 10})
    ask(MODEL, MESSAGES, max_completion_tokens=10, extra_body={"enable_thinking": True})
    ask(MODEL, MESSAGES, max_tokens=10, enable_thinking=True, thinking_budget=20)
    ask(MODEL, MESSAGES)
    default = guard.default_max_output(MODEL)
    reasoning = guard.model_info(MODEL)["max_reasoning_tokens"]  # the longest chain of thought
    assert reserved == [30, 10, 10 + reasoning, 30, default]


@pytest.mark.filterwarnings("ignore::quotaguard.NoUsageWarning")
def test_input_bound_counts_images_and_tools(guard: Any) -> None:
    reserved = []
    picture = [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "What is this?"},
    ]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]

    @wrap(guard)
    def ask(model: str, messages: list[dict[str, Any]], max_tokens: int, **options: Any) -> None:
        reserved.append(guard.quota(model).reserved - max_tokens)

    ask(MODEL, [{"role": "user", "content": picture}], max_tokens=1)
    ask(MODEL, MESSAGES, max_tokens=1, tools=tools)
    text_only = bound(guard, [{"role": "user", "content": "What is this?"}])
    assert reserved[0] >= text_only + IMAGE_TOKENS
    assert reserved[1] > bound(guard) + len(json.dumps(tools)) // 4


def test_clip_shrinks_max_tokens_to_what_is_left(guard: Any) -> None:
    guard.grant(MODEL, tokens=200)
    guard.set_free_only(MODEL)
    seen: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []

    @wrap(guard, clip=True)
    def ask(model: str, prompt: str, **options: Any) -> dict[str, Any]:
        seen.append(options)
        return {"usage": {"input_tokens": 1, "output_tokens": 1}}

    def room() -> int:
        return int(guard.remaining(MODEL)) - guard.input_bound(prompt="Hi")

    expected.append({"max_tokens": room()})
    ask(MODEL, "Hi", max_tokens=5000)
    expected.append({"parameters": {"max_tokens": room(), "seed": 1}})
    ask(MODEL, "Hi", parameters={"max_tokens": 5000, "seed": 1})
    expected.append({"max_tokens": room()})
    ask(MODEL, "Hi")  # no max tokens given: the catalogue default, clipped, is added
    assert seen == expected
    assert recorded(guard) == [(MODEL, 1, 1)] * 3

    guard.grant(MODEL, tokens=6 + guard.input_bound(prompt="Hi"))  # not one output token fits
    with pytest.raises(FreeTierOnly):
        ask(MODEL, "Hi", max_tokens=5000)
    assert len(seen) == 3


def test_nested_refusal_is_not_a_service_answer(guard: Any) -> None:
    other = "qwen-max"
    guard.grant(other, tokens=10)
    guard.set_free_only(other)

    @wrap(guard)
    def inner(model: str, prompt: str) -> None:
        raise AssertionError("not called")

    @wrap(guard)
    def outer(model: str, prompt: str) -> None:
        inner(other, prompt)

    with pytest.raises(FreeTierOnly) as raised:
        outer(MODEL, "Hi")
    assert raised.value.model == other
    assert guard.remaining(MODEL) == FREE  # the outer model's quota is untouched (not R12)


def test_plain_function_returning_a_coroutine(guard: Any) -> None:
    async def answer() -> dict[str, Any]:
        return usage_dict(7, 3)

    @wrap(guard)
    def ask(model: str, prompt: str) -> Any:
        return answer()

    assert asyncio.run(ask(MODEL, "Hi"))["usage"]["output_tokens"] == 3
    assert recorded(guard) == [(MODEL, 7, 3)]


@pytest.mark.filterwarnings("ignore::quotaguard.NoUsageWarning")
def test_one_shot_iterables_reach_the_function_intact(guard: Any) -> None:
    seen = []

    @wrap(guard)
    def ask(model: str, messages: Any, tools: Any) -> None:
        seen.append((list(messages), list(tools)))

    ask(MODEL, iter(MESSAGES), tools=iter([{"type": "function"}]))
    assert seen == [(MESSAGES, [{"type": "function"}])]
