"""No unguarded exits: every call shape of the real openai and dashscope SDKs, guarded.

Each billable shape reserves, then settles the usage the server reported (the ledger
equals the server's log, call for call); shapes that bill nothing pass; what the
wrappers cannot guard is refused under Free Quota Only and never sent, else warned once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import dashscope
import openai
import pytest
from conftest import SDK_KEY, recorded, server_usage

import quotaguard
from quotaguard import FreeTierOnly, UnguardedWarning
from quotaguard.testing import FakeDashScope

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen-plus"
FREE = 1_000_000
MESSAGES = [{"role": "user", "content": "Say hello to the quota guard."}]
USAGE_LINE = '"choices":[],'  # the usage-only chunk of a compatible-mode stream


@pytest.fixture
def guard() -> Iterator[Any]:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    for model in (MODEL, "text-embedding-v4", "gte-rerank-v2", "multimodal-embedding-v1"):
        guard.grant(model, tokens=FREE)
    yield guard
    assert all(q.reserved == 0 for q in guard.quotas()), "a reservation leaked"


@pytest.fixture
def client(guard: Any, server: FakeDashScope) -> Iterator[Any]:
    raw = openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base, max_retries=0)
    with guard.wrap_openai(raw) as wrapped:
        yield wrapped


def settled_exactly(guard: Any, server: FakeDashScope) -> None:
    assert server.idle()
    assert sorted(recorded(guard)) == sorted(server.usage_log)
    assert not any(r.in_doubt for r in guard.records())


# ------------------------------------------------------------------------------ openai


def chat_kwargs(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 30, **extra}


SYNC_SHAPES: dict[str, Callable[[Any], Any]] = {
    "create": lambda c: c.chat.completions.create(**chat_kwargs()),
    "stream": lambda c: list(c.chat.completions.create(**chat_kwargs(stream=True))),
    "raw": lambda c: c.chat.completions.with_raw_response.create(**chat_kwargs()).parse(),
    "raw stream": lambda c: list(
        c.chat.completions.with_raw_response.create(**chat_kwargs(stream=True)).parse()
    ),
    "streaming response": lambda c: _read_streaming(
        c.chat.completions.with_streaming_response.create(**chat_kwargs())
    ),
    "client raw": lambda c: c.with_raw_response.chat.completions.create(**chat_kwargs()).parse(),
    "client streaming": lambda c: _read_streaming(
        c.with_streaming_response.chat.completions.create(**chat_kwargs(stream=True))
    ),
    "with_options": lambda c: c.with_options(timeout=30).chat.completions.create(**chat_kwargs()),
    "copy": lambda c: c.copy(max_retries=1).chat.completions.create(**chat_kwargs()),
    "beta create": lambda c: c.beta.chat.completions.create(**chat_kwargs()),
    "beta parse": lambda c: c.beta.chat.completions.parse(**chat_kwargs()),
    "beta stream": lambda c: _drain_helper(c.beta.chat.completions.stream(**chat_kwargs())),
    "beta raw": lambda c: c.beta.chat.completions.with_raw_response.create(**chat_kwargs()).parse(),
    "parse": lambda c: c.chat.completions.parse(**chat_kwargs()),
    "stream helper": lambda c: _drain_helper(c.chat.completions.stream(**chat_kwargs())),
    "completions": lambda c: c.completions.create(model=MODEL, prompt="def f(", max_tokens=30),
    "completions stream": lambda c: list(
        c.completions.create(model=MODEL, prompt=["a(", "b("], max_tokens=30, stream=True)
    ),
    "responses": lambda c: c.responses.create(model=MODEL, input="Hi", max_output_tokens=30),
    "responses stream": lambda c: list(
        c.responses.create(model=MODEL, input="Hi", max_output_tokens=30, stream=True)
    ),
    "responses raw": lambda c: c.responses.with_raw_response.create(
        model=MODEL, input=[{"role": "user", "content": "Hi"}], max_output_tokens=30
    ).parse(),
    "embeddings": lambda c: c.embeddings.create(model="text-embedding-v4", input=["a", "b c"]),
}


def _read_streaming(manager: Any) -> list[str]:
    with manager as response:
        return list(response.iter_lines())


def _drain_helper(manager: Any) -> str:
    with manager as stream:
        return "".join(e.delta for e in stream if e.type == "content.delta")


@pytest.mark.parametrize("shape", list(SYNC_SHAPES))
def test_every_openai_shape_settles_the_real_usage(
    guard: Any, client: Any, server: FakeDashScope, shape: str
) -> None:
    SYNC_SHAPES[shape](client)
    assert server.usage_log, "the call reached the server"
    settled_exactly(guard, server)


ASYNC_SHAPES: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "create": lambda c: c.chat.completions.create(**chat_kwargs()),
    "raw": lambda c: c.chat.completions.with_raw_response.create(**chat_kwargs()),
    "responses": lambda c: c.responses.create(model=MODEL, input="Hi", max_output_tokens=30),
    "completions": lambda c: c.completions.create(model=MODEL, prompt="x", max_tokens=30),
    "embeddings": lambda c: c.embeddings.create(model="text-embedding-v4", input="a b"),
}


async def _consume(result: Any) -> None:
    if hasattr(result, "__aiter__"):
        async for _ in result:
            pass


def test_every_async_openai_shape_settles_the_real_usage(guard: Any, server: FakeDashScope) -> None:
    async def main() -> None:
        raw = openai.AsyncOpenAI(api_key=SDK_KEY, base_url=server.openai_base, max_retries=0)
        async with guard.wrap_openai(raw) as c:
            for shape in ASYNC_SHAPES.values():
                await shape(c)
            await _consume(await c.chat.completions.create(**chat_kwargs(stream=True)))
            await _consume(
                await c.responses.create(model=MODEL, input="Hi", max_output_tokens=9, stream=True)
            )
            async with c.chat.completions.with_streaming_response.create(
                **chat_kwargs(stream=True)
            ) as response:
                lines = [line async for line in response.iter_lines()]
            assert not any(USAGE_LINE in line for line in lines)

    asyncio.run(main())
    assert len(server.usage_log) == len(ASYNC_SHAPES) + 3
    settled_exactly(guard, server)


def test_the_injected_usage_chunk_is_hidden_in_every_form(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    kwargs = chat_kwargs(stream=True)
    assert all(c.choices for c in client.chat.completions.create(**kwargs))
    raw = client.with_raw_response.chat.completions.create(**kwargs)
    assert all(c.choices for c in raw.parse())
    lines = _read_streaming(client.chat.completions.with_streaming_response.create(**kwargs))
    assert lines and not any(USAGE_LINE in line for line in lines)
    with client.chat.completions.with_streaming_response.create(**kwargs) as response:
        body = b"".join(response.iter_bytes())
    assert b'"choices":[]' not in body and body.endswith(b"data: [DONE]\n\n")
    assert server.requests[-1].body["stream_options"] == {"include_usage": True}
    # Asked for, it is shown.
    asked = list(client.chat.completions.create(**kwargs, stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage is not None
    settled_exactly(guard, server)


def test_requests_that_bill_nothing_pass(guard: Any, client: Any, server: FakeDashScope) -> None:
    guard.grant(MODEL, tokens=10)
    guard.set_free_only(MODEL)  # nothing billable fits, yet these go through
    upload = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert client.files.retrieve(upload.id).id == upload.id
    assert client.files.content(upload.id).text == "{}\n"
    assert [f.id for f in client.files.list()] == [upload.id]
    assert [m.id for m in client.models.list()][:1] == ["qwen-plus"]
    client.files.delete(upload.id)
    assert guard.records() == []


@pytest.mark.parametrize(
    ("what", "send"),
    [
        ("POST /images/generations", lambda c: c.images.generate(model=MODEL, prompt="a cat")),
        ("POST /moderations", lambda c: c.moderations.create(model=MODEL, input="hello")),
        (
            "POST /audio/speech",
            lambda c: c.audio.speech.create(model=MODEL, voice="alloy", input="hello"),
        ),
    ],
    ids=["images", "moderations", "speech"],
)
def test_what_cannot_be_guarded_is_refused_under_free_quota_only(
    guard: Any, client: Any, server: FakeDashScope, what: str, send: Callable[[Any], Any]
) -> None:
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly) as refused:
        send(client)
    assert (refused.value.reason, refused.value.model) == ("unguarded", MODEL)
    assert what in str(refused.value)
    assert server.request_count == 0  # never sent


def test_without_the_switch_an_unguarded_method_warns_once_and_goes(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    with pytest.warns(UnguardedWarning, match="POST /images/generations"):
        with pytest.raises(openai.NotFoundError):  # FakeDashScope does not draw
            client.images.generate(model="wan2.5-t2i", prompt="a cat")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="wan2.5-t2i", prompt="a dog")  # warned once per method
    assert server.request_count == 2


def test_websocket_connections_are_unguarded(guard: Any, client: Any) -> None:
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly) as refused:
        client.realtime.connect(model=MODEL)
    assert refused.value.reason == "unguarded"
    assert "realtime.connect" in str(refused.value)


def test_a_call_names_its_input_bound_and_it_is_never_sent(
    guard: Any, client: Any, server: FakeDashScope
) -> None:
    client.chat.completions.create(**chat_kwargs(max_input_tokens=5_000))
    assert "max_input_tokens" not in json.dumps(server.requests[-1].body)
    assert not any("quotaguard" in key for key in server.requests[-1].body)
    settled_exactly(guard, server)


def test_a_client_without_the_private_hook_is_guarded_through_its_http_client(
    guard: Any, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDK versions without the transport method ``_send_request`` send through the
    HTTP client: the guard hooks its ``send`` instead."""
    from quotaguard import clients

    monkeypatch.setattr(clients, "_sends_through_method", lambda client: False)
    raw = openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base, max_retries=0)
    client = guard.wrap_openai(raw)
    assert isinstance(client._target._client, clients._SendProxy)
    client.chat.completions.create(**chat_kwargs())
    list(client.chat.completions.create(**chat_kwargs(stream=True)))
    settled_exactly(guard, server)
    assert len(server.usage_log) == 2


# ------------------------------------------------------------------------------ dashscope


def test_dashscope_rerank_and_multimodal_embeddings(guard: Any, server: FakeDashScope) -> None:
    ds = guard.wrap_dashscope()
    docs = ["The quota is shared.", "Refresh the console.", "Batches are never free."]
    ranked = ds.TextReRank.call(
        model="gte-rerank-v2", query="free?", documents=docs, api_key=SDK_KEY
    )
    assert ranked.status_code == 200
    vectors = ds.MultiModalEmbedding.call(
        model="multimodal-embedding-v1",
        input=[{"text": "a dog"}, {"image": "https://example.com/dog.png"}],
        api_key=SDK_KEY,
    )
    assert vectors.status_code == 200

    async def main() -> None:
        try:
            again = await ds.AioTextReRank.call(
                model="gte-rerank-v2", query="q", documents=docs, api_key=SDK_KEY
            )
            assert again.status_code == 200
        finally:
            await dashscope.close_shared_aio_session()

    asyncio.run(main())
    settled_exactly(guard, server)


def test_dashscope_application_is_unbounded(guard: Any, server: FakeDashScope) -> None:
    """An application's knowledge base and model are not known before the call."""
    ds = guard.wrap_dashscope()
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly) as refused:
        ds.Application.call(app_id="app-1", prompt="What is free?", api_key=SDK_KEY)
    assert refused.value.reason == "unbounded"
    assert server.request_count == 0
    # Stated, the bound is reserved and the model's usage settled.
    answer = ds.Application.call(
        app_id="app-1",
        prompt="What is free?",
        api_key=SDK_KEY,
        model=MODEL,
        max_input_tokens=1_000,
        max_tokens=50,
    )
    assert answer.status_code == 200
    assert "model" not in server.requests[-1].body["parameters"]
    settled_exactly(guard, server)
    [(_, billed_in, _)] = server.usage_log
    assert billed_in > guard.input_bound(prompt="What is free?")  # retrieval added input
    # Without the switch it goes, and every model the answer reports is recorded.
    free = quotaguard.QuotaGuard(ledger="memory://")
    free.grant(MODEL, tokens=FREE)
    free.wrap_dashscope().Application.call(app_id="app-1", prompt="Hi", api_key=SDK_KEY)
    assert recorded(free) == server_usage(server, 2)[1:]


def test_dashscope_apis_that_cannot_be_guarded(guard: Any, server: FakeDashScope) -> None:
    ds = guard.wrap_dashscope()
    guard.set_free_only(MODEL)
    with pytest.raises(FreeTierOnly) as refused:
        ds.ImageSynthesis.call(model=MODEL, prompt="a cat", api_key=SDK_KEY)
    assert "dashscope.ImageSynthesis.call" in str(refused.value)
    v2 = ds.Client(api_key=SDK_KEY, base_url=server.native_base, workspace="ws-test")
    with pytest.raises(FreeTierOnly):  # the SDK's 2.0 client, on loopback
        v2.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(FreeTierOnly):
        ds.aigc.image_synthesis.ImageSynthesis.call(model=MODEL, prompt="x", api_key=SDK_KEY)
    assert server.request_count == 0
    # Files, models and the tokenizer bill nothing: they are the SDK's own.
    assert ds.Files is dashscope.Files and ds.get_tokenizer is dashscope.get_tokenizer
    assert ds.Generation.call(model=MODEL, prompt="Hi", api_key=SDK_KEY, max_tokens=5)
