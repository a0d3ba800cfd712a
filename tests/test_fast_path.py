"""The one-step paths of a guarded call: a chat request counted and reserved in one step
into the core, and a JSON answer settled from its usage in one step, must agree exactly
with the full reading in Python (which stays the reference and takes every other shape).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest

import quotaguard as qg
import quotaguard.wrap as qw
from quotaguard import FreeTierOnly
from quotaguard.exceptions import NoUsageWarning
from quotaguard.wrap import Options, _Call, _CallArgs, _Request, _usage, read_request

TALK = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something short about quotas. 配额有限。"},
]

# Bodies the fast path reads: what it finds must be what the full reading finds.
READ = [
    {"model": "qwen-plus", "messages": TALK, "max_tokens": 20},
    {"model": "qwen-plus", "messages": TALK},  # the catalogue's default output
    {"model": "qwen-plus", "messages": TALK, "max_completion_tokens": 33},
    {"model": "qwen-plus", "messages": TALK, "max_tokens": True, "max_completion_tokens": 7},
    {"model": "qwen-plus", "messages": TALK, "max_tokens": 5.0},  # not an int: ignored
    {"model": "qwen-plus", "messages": TALK, "n": 3, "max_tokens": 10},
    {"model": "qwen-plus", "messages": TALK, "n": 0, "max_tokens": 10},
    {"model": "qwen-plus", "messages": TALK, "enable_thinking": True, "max_tokens": 10},
    {
        "model": "qwen-plus",
        "messages": TALK,
        "enable_thinking": True,
        "thinking_budget": 100,
        "max_tokens": 10,
    },
    {"model": "qwen3-32b", "messages": TALK, "max_tokens": 10},  # thinking by default
    {"model": "qwen3-32b", "messages": TALK, "enable_thinking": False, "max_tokens": 10},
    {"model": "qwen-max", "messages": TALK, "enable_thinking": True},  # no thinking mode
    {"model": "qwen-plus", "messages": [], "max_tokens": 1},
    {"model": "qwen-plus", "messages": [{"role": "", "content": None}, {"content": "x"}]},
    {
        "model": "qwen-plus",
        "messages": TALK,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "seed": 7,
        "stop": ["\n"],
    },
    {"model": "some-model-not-in-the-catalogue", "messages": TALK, "max_tokens": 9},
]

# Bodies it leaves to the full reading: it returns None and holds nothing.
LEFT = [
    {"model": "qwen-plus", "messages": TALK, "tools": [{"type": "function"}]},
    {"model": "qwen-plus", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": "qwen-plus", "messages": [{"role": "user", "content": "see fileid://abc"}]},
    {"model": "qwen-plus", "messages": [{"role": "tool", "content": "42"}]},
    {"model": "qwen-plus", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
    {"model": "qwen-plus", "messages": [{"role": 3, "content": "x"}]},
    {"model": "qwen-plus", "messages": TALK, "enable_search": True},
    {"model": "qwen-plus", "messages": TALK, "enable_thinking": "yes"},
    {"model": "qwen-plus", "messages": TALK, "parameters": {"max_tokens": 3}},
    {"model": "qwen-plus", "messages": TALK, "max_tokens": -1},
    {"model": "qwen-plus", "messages": TALK, "n": 10**12},
    {"model": "qwen-plus", "messages": TALK, "thinking_budget": -5, "enable_thinking": True},
    {"model": "qwen-plus", "prompt": "hello"},
    {"model": "", "messages": TALK},
    {"messages": TALK},
    {"model": "qwen-plus", "messages": "hello"},
    {"model": "qwen-plus", "messages": TALK, "max_input_tokens": 5},
]


@pytest.fixture
def granted(any_guard: qg.QuotaGuard) -> qg.QuotaGuard:
    for model in ("qwen-plus", "qwen3-32b", "qwen-max", "some-model-not-in-the-catalogue"):
        any_guard.grant(model, tokens=10**8)
    return any_guard


@pytest.mark.parametrize("body", READ)
def test_the_one_step_reading_agrees_with_the_full_one(
    granted: qg.QuotaGuard, body: dict[str, Any]
) -> None:
    full = read_request(granted, _CallArgs.of_body(copy.deepcopy(body)), endpoint="chat")
    before = granted.remaining(full.model)
    held = granted._core._reserve_chat(copy.deepcopy(body))
    assert held is not None
    reservation, *fields = held
    assert tuple(fields) == (
        full.model,
        full.input_tokens,
        full.max_tokens,
        full.thinking_tokens,
        full.choices,
        full.thinking,
    )
    assert reservation.worst_case == full.input_tokens + full.max_output
    assert reservation.thinking is full.thinking
    assert granted.remaining(full.model) == before - reservation.worst_case
    reservation.release()
    assert granted.remaining(full.model) == before


@pytest.mark.parametrize("body", LEFT)
def test_shapes_it_does_not_read_are_left_to_the_full_reading(
    granted: qg.QuotaGuard, body: dict[str, Any]
) -> None:
    before = granted.remaining("qwen-plus")
    assert granted._core._reserve_chat(body) is None
    assert granted.remaining("qwen-plus") == before


def test_a_refusal_in_one_step_holds_nothing(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-plus", tokens=50)
    guard.set_free_only("qwen-plus")
    with pytest.raises(FreeTierOnly):
        guard._core._reserve_chat({"model": "qwen-plus", "messages": TALK, "max_tokens": 100})
    assert guard.remaining("qwen-plus") == 50
    held = guard._core._reserve_chat({"model": "qwen-plus", "messages": [], "max_tokens": 1})
    assert held is not None
    held[0].release()


def _answer(usage: Any, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "chatcmpl-7", "object": "chat.completion", "choices": []}
    if usage is not ...:
        body["usage"] = usage
    body.update(more)
    return body


SETTLED = [
    {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19},
    {
        "prompt_tokens": 400,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 256},
        "completion_tokens_details": {"reasoning_tokens": 4},
    },
    {
        "input_tokens": 300,
        "output_tokens": 2,
        "input_tokens_details": {
            "cached_tokens": 100,
            "cache_creation_input_tokens": 500,
            "cache_type": "ephemeral",
        },
    },
    {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 50}},
    {"total_tokens": 12},  # embeddings: only the total
    {"text_tokens": 3, "image_tokens": 40},  # multimodal embeddings
    {"prompt_tokens": True, "input_tokens": 8, "output_tokens": 1},
]


def _call(guard: qg.QuotaGuard, thinking: bool = False) -> _Call:
    body: dict[str, Any] = {"model": "qwen-plus", "messages": TALK, "max_tokens": 50}
    if thinking:
        body["enable_thinking"] = True
    held = guard._core._reserve_chat(body)
    assert held is not None
    return _Call(guard, _Request(*held[1:]), held[0], name="fast-path test")


def _fields(record: Any) -> tuple[Any, ...]:
    names = ("input_tokens", "output_tokens", "cached_tokens", "thinking", "cost", "in_doubt")
    return (*(getattr(record, n) for n in names), record.request_id)


@pytest.mark.parametrize("usage", SETTLED)
@pytest.mark.parametrize("thinking", [False, True])
def test_one_step_settling_agrees_with_the_full_reading(
    granted: qg.QuotaGuard, usage: dict[str, Any], thinking: bool
) -> None:
    body = _answer(usage)
    fast = _call(granted, thinking)
    assert fast.finish(body) is body
    full = _call(granted, thinking)
    assert full._claim()
    read = _usage(body)
    assert read is not None
    full._settle_claimed(read)
    assert fast.ended and fast.record is not None and full.record is not None
    assert _fields(fast.record) == _fields(full.record)


@pytest.mark.parametrize(
    "body",
    [
        _answer(...),
        _answer(None),
        _answer({"prompt_tokens": 0, "completion_tokens": 0}),
        _answer({"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}),
    ],
)
def test_an_answer_without_usage_is_its_worst_case_with_a_warning(
    granted: qg.QuotaGuard, body: dict[str, Any]
) -> None:
    call = _call(granted)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        qw._warned_no_usage.discard("fast-path test")
        call.finish(body)
    assert any(issubclass(x.category, NoUsageWarning) for x in seen)
    record = call.record
    assert record is not None
    assert record.input_tokens + record.output_tokens == call.request.input_tokens + 50
    assert not record.in_doubt


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -3, "completion_tokens": 5},  # refused, as the full reading does
        {"total_tokens": 2, "output_tokens": 5},
        {"prompt_tokens": 10**30, "completion_tokens": 1},
        {"prompt_tokens": 2 * 10**9, "completion_tokens": 1},
        {
            "prompt_tokens": 10,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": -1},
        },
    ],
)
def test_counts_it_cannot_take_are_left_to_the_full_reading(
    granted: qg.QuotaGuard, usage: dict[str, Any]
) -> None:
    call = _call(granted)
    assert call._reservation._settle_from(_answer(usage)) is None
    assert not call._reservation.done
    with pytest.raises((ValueError, TypeError, OverflowError)):
        call.finish(_answer(usage))


def test_a_batch_answer_without_usage_records_its_id(granted: qg.QuotaGuard) -> None:
    reservation = granted._core.reserve("qwen-plus", 0, 0, "batch")
    record, found = reservation._settle_from({"id": "batch_1", "status": "validating"})
    assert found and record.request_id == "batch_1"
    assert (record.input_tokens, record.output_tokens) == (0, 0)


def test_a_guarded_client_with_clip_or_fallback_reads_in_full(guard: qg.QuotaGuard) -> None:
    from quotaguard.clients import _OpenAIHook

    class Client:
        base_url = "http://127.0.0.1:1/v1/"

    assert _OpenAIHook(guard, Client(), None, Options()).direct
    assert not _OpenAIHook(guard, Client(), None, Options(clip=True)).direct
    assert not _OpenAIHook(guard, Client(), None, Options(fallback=("qwen-max",))).direct


# ---- the transport hook on a whole answer ------------------------------------------------


def _mock_client(
    guard: qg.QuotaGuard, answer: bytes, headers: dict[str, str], seen: list[Any]
) -> Any:
    """A guarded openai client over a transport that returns ``answer`` and fires the
    transport's trace events as httpcore does (looking the trace up for each one)."""
    import httpx2
    import openai

    events = (
        "http11.send_request_headers.started",
        "http11.send_request_headers.complete",
        "http11.send_request_body.started",
        "http11.send_request_body.complete",
        "http11.receive_response_headers.started",
        "http11.receive_response_headers.complete",
    )

    def handler(request: Any) -> Any:
        request.read()
        seen.append(request)
        for name in events:
            trace = request.extensions.get("trace")
            if trace is not None:
                trace(name, {})
        return httpx2.Response(200, headers=headers, content=answer)

    transport = httpx2.MockTransport(handler)
    client = openai.OpenAI(
        base_url="http://quotaguard.test/v1",
        api_key="sk-test",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )
    return guard.wrap_openai(client)


def test_a_compressed_whole_answer_is_settled_from_its_usage(granted: qg.QuotaGuard) -> None:
    import gzip
    import json

    body = _answer({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17})
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    seen: list[Any] = []
    client = _mock_client(granted, gzip.compress(json.dumps(body).encode()), headers, seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NoUsageWarning: the usage was read
        out = client.chat.completions.create(model="qwen-plus", messages=TALK, max_tokens=20)
    assert out.usage is not None and out.usage.completion_tokens == 5
    (record,) = granted.records()
    assert (record.input_tokens, record.output_tokens, record.in_doubt) == (12, 5, False)
    # A whole answer is read by the HTTP library: the request asks for no special encoding.
    assert seen[0].headers.get("accept-encoding") != "identity"


def test_the_trace_stops_once_the_body_is_sent_and_the_callers_own_goes_on(
    granted: qg.QuotaGuard,
) -> None:
    import json

    body = _answer({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17})
    headers = {"content-type": "application/json"}
    seen: list[Any] = []
    mine: list[str] = []
    client = _mock_client(granted, json.dumps(body).encode(), headers, seen)
    client.chat.completions.create(model="qwen-plus", messages=TALK, max_tokens=20)
    assert "trace" not in seen[0].extensions  # taken off after the body was sent
    assert len(granted.records()) == 1
    # The caller's own trace sees every event, before and after the body was sent.
    import httpx2

    base = _mock_client(granted, json.dumps(body).encode(), headers, seen)
    request = base._target._client.build_request(
        "POST",
        "http://quotaguard.test/v1/chat/completions",
        json={"model": "qwen-plus", "messages": TALK, "max_tokens": 20},
        extensions={"trace": lambda name, info: mine.append(name)},
    )
    assert isinstance(request, httpx2.Request)
    response = base._target._send_request(request, stream=False)
    assert response.status_code == 200
    assert [n.split(".", 1)[1] for n in mine] == [
        "send_request_headers.started",
        "send_request_headers.complete",
        "send_request_body.started",
        "send_request_body.complete",
        "receive_response_headers.started",
        "receive_response_headers.complete",
    ]
    assert len(granted.records()) == 2
