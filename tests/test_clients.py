"""wrap_dashscope and wrap_openai: the real SDKs against FakeDashScope, on loopback only."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import dashscope
import openai
import pytest
import requests
from conftest import SDK_KEY, recorded, server_usage

import quotaguard
from quotaguard.clients import GuardedOpenAI, wrap_dashscope, wrap_openai
from quotaguard.exceptions import AccountOverdue, FreeTierOnly
from quotaguard.testing import FakeDashScope
from quotaguard.wrap import GuardedAsyncStream, GuardedStream

pytestmark = pytest.mark.timeout(60)

KEY = SDK_KEY
MODEL = "qwen-plus"
VL_MODEL = "qwen-vl-max"
EMBEDDING_MODEL = "text-embedding-v4"
FREE = 1_000_000
MESSAGES = [{"role": "user", "content": "Say hello to the quota guard."}]
REFUSALS = [
    ("AllocationQuota.FreeTierOnly", FreeTierOnly),
    ("Arrearage", AccountOverdue),
]


@pytest.fixture
def guard() -> Iterator[Any]:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    for model in (MODEL, VL_MODEL, EMBEDDING_MODEL):
        guard.grant(model, tokens=FREE)
    yield guard
    assert [q.reserved for q in guard.quotas()] == [0, 0, 0], "a reservation leaked"


@pytest.fixture
def ds(guard: Any) -> Any:
    return guard.wrap_dashscope()


@pytest.fixture
def client(guard: Any, server: FakeDashScope) -> Iterator[GuardedOpenAI]:
    with guard.wrap_openai(openai.OpenAI(api_key=KEY, base_url=server.openai_base)) as wrapped:
        yield wrapped


def run_with_client(
    guard: Any, server: FakeDashScope, test: Callable[[Any], Awaitable[None]]
) -> None:
    """Run ``test(client)`` on a new event loop with a guarded AsyncOpenAI client."""

    async def main() -> None:
        raw = openai.AsyncOpenAI(api_key=KEY, base_url=server.openai_base)
        async with wrap_openai(guard, raw) as client:
            await test(client)

    asyncio.run(main())


def used(guard: Any, model: str = MODEL) -> int:
    return FREE - int(guard.remaining(model))


def failures(guard: Any) -> int:
    return sum(s.failures for s in guard.stats())


def chat(client: Any, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)


def generate(ds: Any, **kwargs: Any) -> Any:
    return ds.Generation.call(model=MODEL, messages=MESSAGES, api_key=KEY, **kwargs)


def make_refusal(server: FakeDashScope, code: str) -> None:
    if code == "Arrearage":
        server.arrearage = True
    else:
        server.free_tier_only = True


# ------------------------------------------------------------------------------ dashscope


def test_native_call_settles_the_reported_usage(guard: Any, ds: Any, server: FakeDashScope) -> None:
    response = generate(ds)
    assert response.status_code == 200
    assert recorded(guard) == server_usage(server, len(guard.records()))
    assert guard.records()[0].request_id == response.request_id
    assert used(guard) == response.usage.input_tokens + response.usage.output_tokens


@pytest.mark.parametrize("incremental", [True, False])
def test_native_stream_counts_the_cumulative_usage_once(
    guard: Any, ds: Any, server: FakeDashScope, incremental: bool
) -> None:
    stream = generate(ds, stream=True, incremental_output=incremental, result_format="message")
    assert isinstance(stream, GuardedStream)
    chunks = list(stream)
    assert len(chunks) == server.reply_tokens  # every chunk reports usage; it counts once
    assert recorded(guard) == server_usage(server, len(guard.records()))
    assert used(guard) == chunks[-1].usage.input_tokens + chunks[-1].usage.output_tokens


def test_native_multimodal_and_embeddings(guard: Any, ds: Any, server: FakeDashScope) -> None:
    picture = [{"image": "https://example.com/dog.png"}, {"text": "What is in the picture?"}]
    response = ds.MultiModalConversation.call(
        model=VL_MODEL, messages=[{"role": "user", "content": picture}], api_key=KEY
    )
    assert response.status_code == 200
    vectors = ds.TextEmbedding.call(model=EMBEDDING_MODEL, input=["one", "two three"], api_key=KEY)
    assert vectors.status_code == 200
    assert recorded(guard) == server_usage(server, len(guard.records()))
    assert ds.Generation.Models.qwen_plus == "qwen-plus"  # everything else passes through
    assert ds.base_http_api_url == server.native_base


def test_native_async_call_and_stream(guard: Any, ds: Any, server: FakeDashScope) -> None:
    async def main() -> None:
        try:
            response = await ds.AioGeneration.call(model=MODEL, prompt="Hello", api_key=KEY)
            assert response.status_code == 200
            stream = await ds.AioGeneration.call(model=MODEL, prompt="Hi", api_key=KEY, stream=True)
            assert isinstance(stream, GuardedAsyncStream)
            assert len([chunk async for chunk in stream]) == server.reply_tokens
        finally:
            await dashscope.close_shared_aio_session()

    asyncio.run(main())
    assert recorded(guard) == server_usage(server, len(guard.records()))


def test_native_refused_call_never_reaches_the_server(
    guard: Any, ds: Any, server: FakeDashScope
) -> None:
    guard.grant(MODEL, tokens=50)
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly):
        generate(ds, max_tokens=100)
    assert server.request_count == 0
    assert guard.remaining(MODEL) == 50


@pytest.mark.parametrize(("code", "exception"), REFUSALS)
def test_native_returned_refusal_raises(
    guard: Any, ds: Any, server: FakeDashScope, code: str, exception: type[Exception]
) -> None:
    make_refusal(server, code)
    with pytest.raises(exception) as raised:
        generate(ds)
    assert raised.value.code == code
    assert server.request_count == 1
    assert guard.records() == []
    assert failures(guard) == 1
    if code == "Arrearage":
        assert guard.overdue
    else:
        assert guard.remaining(MODEL) == 0  # R12


@pytest.mark.parametrize(("code", "exception"), REFUSALS)
def test_native_refusal_inside_a_stream_raises(
    guard: Any, ds: Any, server: FakeDashScope, code: str, exception: type[Exception]
) -> None:
    server.fail_next(code, in_stream_after=2)
    seen = []
    with pytest.raises(exception):
        for chunk in generate(ds, stream=True):
            seen.append(chunk)
    assert len(seen) == 2
    # The stream had reported usage before the error: that much is recorded.
    assert recorded(guard) == [(MODEL, seen[-1].usage.input_tokens, 2)]


def test_native_401_is_returned_and_releases(guard: Any, ds: Any, server: FakeDashScope) -> None:
    response = ds.Generation.call(model=MODEL, messages=MESSAGES, api_key="sk-wrong")
    assert response.status_code == 401
    assert response.code == "InvalidApiKey"
    assert guard.records() == []
    assert guard.remaining(MODEL) == FREE
    assert failures(guard) == 1


def test_native_other_error_in_stream_is_yielded(
    guard: Any, ds: Any, server: FakeDashScope
) -> None:
    server.fail_next("InternalError", in_stream_after=2)
    chunks = list(generate(ds, stream=True))
    assert [c.status_code for c in chunks][:2] == [200, 200]
    assert chunks[-1].code == "InternalError"  # returned, DashScope's way
    assert recorded(guard) == [(MODEL, chunks[1].usage.input_tokens, 2)]


def test_native_stream_closed_early_settles_the_worst_case(
    guard: Any, ds: Any, server: FakeDashScope
) -> None:
    stream = generate(ds, stream=True, max_tokens=15)
    first, second = next(stream), next(stream)
    assert second.usage.output_tokens == 2
    stream.close()
    [record] = guard.records()
    assert record.output_tokens == 15  # the usage seen was not final: never under-count
    assert record.input_tokens >= first.usage.input_tokens


def test_native_stream_cut_by_the_server(guard: Any, ds: Any, server: FakeDashScope) -> None:
    server.close_stream_after = 2
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(generate(ds, stream=True, max_tokens=15))
    [record] = guard.records()
    assert record.output_tokens == 15


def test_native_stream_dropped_unread(guard: Any, ds: Any, server: FakeDashScope) -> None:
    stream = generate(ds, stream=True, max_tokens=15)
    next(stream)
    del stream
    gc.collect()
    [record] = guard.records()
    assert record.output_tokens == 15


def test_native_clip_shrinks_max_tokens(guard: Any, server: FakeDashScope) -> None:
    guard.grant(MODEL, tokens=200)
    guard.set_free_only(MODEL)
    clipped = wrap_dashscope(guard, clip=True)
    response = clipped.Generation.call(model=MODEL, prompt="Hi", api_key=KEY, max_tokens=5000)
    assert response.status_code == 200
    sent = server.requests[-1].body["parameters"]["max_tokens"]
    assert 0 < sent < 200
    assert recorded(guard) == server_usage(server, len(guard.records()))


# ------------------------------------------------------------------------------ openai


def test_openai_call_settles_the_reported_usage(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    completion = chat(client)
    assert recorded(guard) == server_usage(server, len(guard.records()))
    assert guard.records()[0].request_id == completion.id
    assert used(guard) == completion.usage.total_tokens


def test_openai_stream_adds_and_hides_the_usage_chunk(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    chunks = list(chat(client, stream=True))
    assert server.requests[-1].body["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks)  # the usage chunk was not asked for
    asked = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].choices == []
    assert asked[-1].usage is not None
    assert recorded(guard) == server_usage(server, 2)


def test_openai_stream_helper_is_guarded(guard: Any, client: Any, server: FakeDashScope) -> None:
    with client.chat.completions.stream(model=MODEL, messages=MESSAGES) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
    assert text
    assert recorded(guard) == server_usage(server, len(guard.records()))


def test_openai_embeddings(guard: Any, client: Any, server: FakeDashScope) -> None:
    response = client.embeddings.create(model=EMBEDDING_MODEL, input=["one", "two three"])
    assert len(response.data) == 2
    assert recorded(guard) == server_usage(server, 1)
    assert guard.records()[0].model == EMBEDDING_MODEL


def test_openai_async_twenty_concurrent_calls(guard: Any, server: FakeDashScope) -> None:
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(20)]
    results: list[Any] = []

    async def test(client: Any) -> None:
        calls = (client.chat.completions.create(model=MODEL, messages=m) for m in prompts)
        results.extend(await asyncio.gather(*calls))

    run_with_client(guard, server, test)
    assert len(results) == 20
    assert sorted(recorded(guard)) == sorted(server_usage(server, 20))
    assert used(guard) == sum(r.usage.total_tokens for r in results)


def test_openai_async_stream(guard: Any, server: FakeDashScope) -> None:
    async def test(client: Any) -> None:
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert all(chunk.choices for chunk in chunks)

    run_with_client(guard, server, test)
    assert recorded(guard) == server_usage(server, len(guard.records()))


def test_openai_refused_call_never_reaches_the_server(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    guard.grant(MODEL, tokens=50)
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly):
        chat(client, max_tokens=100)
    assert server.request_count == 0


@pytest.mark.parametrize(
    ("code", "exception", "sdk_error"),
    [
        ("AllocationQuota.FreeTierOnly", FreeTierOnly, openai.PermissionDeniedError),
        ("Arrearage", AccountOverdue, openai.BadRequestError),
    ],
)
def test_openai_raised_refusal_is_mapped(
    guard: Any,
    client: Any,
    server: FakeDashScope,
    code: str,
    exception: type[Exception],
    sdk_error: type[Exception],
) -> None:
    make_refusal(server, code)
    with pytest.raises(exception) as raised:
        chat(client)
    assert isinstance(raised.value.__cause__, sdk_error)
    assert guard.records() == []
    assert failures(guard) == 1


@pytest.mark.parametrize(("code", "exception"), REFUSALS)
def test_openai_refusal_inside_a_stream_is_mapped(
    guard: Any, client: Any, server: FakeDashScope, code: str, exception: type[Exception]
) -> None:
    server.fail_next(code, in_stream_after=2)
    seen = []
    with pytest.raises(exception) as raised:
        for chunk in chat(client, stream=True):
            seen.append(chunk)
    assert len(seen) == 2
    assert raised.value.service_code == code
    assert guard.records() == []  # the error answer bills nothing: released


def test_openai_401_reraises_the_sdk_error(guard: Any, server: FakeDashScope) -> None:
    raw = openai.OpenAI(api_key="sk-wrong", base_url=server.openai_base, max_retries=0)
    with wrap_openai(guard, raw) as client, pytest.raises(openai.AuthenticationError) as raised:
        chat(client)
    assert raised.value.code == "invalid_api_key"
    assert raised.value.__cause__ is None  # untouched
    assert guard.remaining(MODEL) == FREE
    assert failures(guard) == 1


def test_openai_stream_closed_early_settles_the_worst_case(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    with chat(client, stream=True, max_tokens=15) as stream:
        next(stream)
        next(stream)
    [record] = guard.records()
    assert record.output_tokens == 15


def test_openai_stream_cut_by_the_server(guard: Any, client: Any, server: FakeDashScope) -> None:
    server.close_stream_after = 2
    with pytest.raises(openai.APIConnectionError):
        list(chat(client, stream=True, max_tokens=15))
    [record] = guard.records()
    assert record.output_tokens == 15


def test_openai_cancelled_after_sending_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    server.latency = 0.5

    async def test(client: Any) -> None:
        task = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=25)
        )
        while server.request_count == 0:  # reserved, sent, waiting for the answer
            await asyncio.sleep(0.01)
        assert guard.quota(MODEL).reserved > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_with_client(guard, server, test)
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (25, True)
    [(_, billed_in, billed_out)] = server_usage(server, 1)  # the service went on
    assert record.input_tokens >= billed_in and record.output_tokens >= billed_out


def test_openai_with_options_stays_guarded(guard: Any, client: Any, server: FakeDashScope) -> None:
    other = client.with_options(timeout=30)
    assert isinstance(other, GuardedOpenAI)
    chat(other)
    assert recorded(guard) == server_usage(server, len(guard.records()))
    assert client.base_url == server.openai_base + "/"  # other attributes pass through


def test_openai_batch_counts_as_batch(guard: Any, client: Any, server: FakeDashScope) -> None:
    line = (
        '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "Hi"}]}}\n'
    )
    upload = client.files.create(file=("batch.jsonl", line.encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    [record] = guard.records()
    assert (record.model, record.kind, record.request_id) == (MODEL, "batch", batch.id)
    assert (record.input_tokens, record.output_tokens) == (0, 0)

    guard.set_free_only(MODEL)  # a batch is never free (R4)
    before = server.request_count
    with pytest.raises(FreeTierOnly):
        client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"model": MODEL},
        )
    assert server.request_count == before


def test_openai_parse_and_raw_responses(guard: Any, client: Any, server: FakeDashScope) -> None:
    parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES)
    assert parsed.usage.total_tokens > 0
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=50
    )
    assert raw.parse().usage.completion_tokens == 20
    # A raw response is read as it passes: the real usage, not the worst case.
    assert recorded(guard) == server_usage(server, 2)


def test_openai_thinking_call(guard: Any, client: Any, server: FakeDashScope) -> None:
    completion = chat(client, extra_body={"enable_thinking": True, "thinking_budget": 50})
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0
    assert recorded(guard) == server_usage(server, 1)


@pytest.mark.parametrize(
    ("code", "exception", "service_code"),
    [
        ("Throttling.AllocationQuota", FreeTierOnly, "insufficient_quota"),
        ("PrepaidBillOverdue", AccountOverdue, "PrepaidBillOverdue"),
        ("PostpaidBillOverdue", AccountOverdue, "PostpaidBillOverdue"),
    ],
)
def test_openai_quota_answers_are_mapped_and_never_retried(
    guard: Any,
    server: FakeDashScope,
    code: str,
    exception: type[FreeTierOnly],
    service_code: str,
) -> None:
    server.fail_next(code, times=3)  # 429 and 400: openai would retry the 429
    raw = openai.OpenAI(api_key=KEY, base_url=server.openai_base, max_retries=2)
    with wrap_openai(guard, raw) as client, pytest.raises(exception) as raised:
        chat(client)
    assert (raised.value.code, raised.value.service_code) == (exception.code, service_code)
    assert server.request_count == 1
    assert guard.records() == []
    if exception is AccountOverdue:
        assert guard.overdue
    else:
        assert guard.remaining(MODEL) == 0


@pytest.mark.parametrize(
    ("code", "exception"),
    [("Throttling.AllocationQuota", FreeTierOnly), ("PostpaidBillOverdue", AccountOverdue)],
)
def test_native_quota_answers_are_mapped(
    guard: Any, ds: Any, server: FakeDashScope, code: str, exception: type[FreeTierOnly]
) -> None:
    server.fail_next(code)
    with pytest.raises(exception) as raised:
        generate(ds)
    assert raised.value.service_code == code
    assert guard.records() == []


def test_openai_clip_rewrites_the_request(guard: Any, server: FakeDashScope) -> None:
    guard.grant(MODEL, tokens=200)
    guard.set_free_only(MODEL)
    raw = openai.OpenAI(api_key=KEY, base_url=server.openai_base, max_retries=0)
    with wrap_openai(guard, raw, clip=True) as client:
        completion = chat(client, max_tokens=5_000)
    sent = server.requests[-1].body["max_tokens"]
    assert 0 < sent < 200
    assert completion.usage.completion_tokens <= sent
    assert recorded(guard) == server_usage(server, 1)


def test_openai_async_batch_reads_its_models_from_the_input_file(
    guard: Any, server: FakeDashScope
) -> None:
    line = (
        '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "Hi"}]}}\n'
    )

    async def test(client: Any) -> None:
        upload = await client.files.create(file=("b.jsonl", line.encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        [record] = guard.records()
        assert (record.model, record.kind, record.request_id) == (MODEL, "batch", batch.id)

    run_with_client(guard, server, test)
    assert "metadata" not in server.requests[-1].body or not server.requests[-1].body["metadata"]
