"""In-doubt calls and retries (R9): the real openai and dashscope SDKs against FakeDashScope.

The invariant of every test here: under Free Quota Only, what the server billed never
exceeds the grant, and the ledger never says less was used than the server billed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from conftest import SDK_KEY, recorded, server_usage

import quotaguard
from quotaguard import FreeTierOnly
from quotaguard.testing import FakeDashScope

pytestmark = pytest.mark.timeout(60)

MODEL = "qwen-plus"
GRANT = 1_000
MESSAGES = [{"role": "user", "content": "Say hello to the quota guard."}]


@pytest.fixture
def guard() -> Iterator[Any]:
    guard = quotaguard.QuotaGuard(ledger="memory://")
    guard.grant(MODEL, tokens=GRANT)
    guard.set_free_only(MODEL)
    yield guard
    assert guard.quota(MODEL).reserved == 0, "a reservation leaked"


def billed(server: FakeDashScope, model: str = MODEL) -> int:
    assert server.idle(), "the server is still answering"
    return sum(i + o for m, i, o in server.usage_log if m == model)


def assert_invariant(guard: Any, server: FakeDashScope, grant: int = GRANT) -> int:
    """What the server billed never exceeds the grant; the ledger never says less."""
    spent = billed(server)
    assert spent <= grant
    assert guard.quota(MODEL).used >= spent
    assert sum(r.input_tokens + r.output_tokens for r in guard.records(model=MODEL)) >= spent
    return spent


def openai_client(server: FakeDashScope, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=SDK_KEY, base_url=server.openai_base, **options)


# ------------------------------------------------------------------------------ timeouts


def test_a_timeout_after_sending_is_in_doubt_never_released(
    guard: Any, server: FakeDashScope
) -> None:
    """The issue's case: 30 calls that time out while the service goes on and bills."""
    server.latency = 0.3
    client = guard.wrap_openai(openai_client(server, timeout=0.2, max_retries=0))
    outcomes: list[str] = []
    for _ in range(30):
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
            outcomes.append("answered")
        except openai.APITimeoutError:
            outcomes.append("timeout")
        except FreeTierOnly:
            outcomes.append("refused")
    assert "timeout" in outcomes and outcomes[-1] == "refused"
    spent = assert_invariant(guard, server)
    assert spent > 0  # the service billed calls the client gave up on
    timed_out = [r for r in guard.records() if r.in_doubt]
    assert len(timed_out) == outcomes.count("timeout") == server.request_count
    assert all(r.output_tokens == 20 for r in timed_out)  # the worst case


def test_every_retry_of_the_sdk_is_reserved(guard: Any, server: FakeDashScope) -> None:
    """openai resends a timed-out request (max_retries=2 by default): each attempt is a
    call of its own, and an attempt the quota refuses is never sent."""
    guard.grant(MODEL, tokens=300)  # a few attempts: the SDK backs off between them
    server.latency = 0.3
    client = guard.wrap_openai(openai_client(server, timeout=0.2))
    refused = None
    for _ in range(30):
        before = server.request_count
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
        except openai.APITimeoutError:
            continue
        except FreeTierOnly as e:
            refused = (e, server.request_count - before)
            break
    assert refused is not None
    assert refused[0].reason == "exhausted"
    assert_invariant(guard, server, grant=300)
    # Every attempt that went out is in the ledger, in doubt.
    assert len(guard.records()) == server.request_count
    assert all(r.in_doubt for r in guard.records())


def test_dashscope_timeout_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    server.latency = 0.3
    ds = guard.wrap_dashscope()
    with pytest.raises(requests.exceptions.Timeout):
        ds.Generation.call(
            model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20, request_timeout=0.2
        )
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (20, True)
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ resets


def test_a_reset_after_sending_is_in_doubt_and_each_retry_reserved(
    guard: Any, server: FakeDashScope
) -> None:
    server.drop_next(3)  # the service billed each request, the connection died after
    client = guard.wrap_openai(openai_client(server, max_retries=2))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert server.request_count == 3
    assert [r.in_doubt for r in guard.records()] == [True] * 3
    assert_invariant(guard, server)


def test_dashscope_resend_after_a_reset_is_reserved_again(
    guard: Any, server: FakeDashScope
) -> None:
    """dashscope resends once on a dropped connection: the first attempt is in doubt,
    the second a call of its own."""
    server.drop_next(1)
    ds = guard.wrap_dashscope()
    response = ds.Generation.call(model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20)
    assert response.status_code == 200
    first, second = guard.records()
    assert (first.in_doubt, second.in_doubt) == (True, False)
    assert (second.input_tokens, second.output_tokens) == server_usage(server, 2)[1][1:]
    assert_invariant(guard, server)


@pytest.mark.parametrize("sdk", ["openai", "dashscope"])
def test_a_refused_retry_is_never_sent(guard: Any, server: FakeDashScope, sdk: str) -> None:
    bound = guard.input_bound(messages=MESSAGES)
    guard.grant(MODEL, tokens=bound + 20 + 10)  # room for one attempt, not two
    server.drop_next(1)
    with pytest.raises(FreeTierOnly):
        if sdk == "openai":
            client = guard.wrap_openai(openai_client(server, max_retries=2))
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
        else:
            guard.wrap_dashscope().Generation.call(
                model=MODEL, messages=MESSAGES, api_key=SDK_KEY, max_tokens=20
            )
    assert server.request_count == 1
    [record] = guard.records()
    assert record.in_doubt
    assert_invariant(guard, server, grant=bound + 30)


def test_a_request_that_never_left_is_released(guard: Any) -> None:
    with FakeDashScope(api_key=SDK_KEY) as server:
        url = server.openai_base
    client = guard.wrap_openai(openai.OpenAI(api_key=SDK_KEY, base_url=url, max_retries=2))
    with pytest.raises(openai.APIConnectionError):  # connection refused, three times
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert guard.records() == []
    assert guard.remaining(MODEL) == GRANT
    assert sum(s.failures for s in guard.stats()) == 3


def test_error_answers_are_released_and_retried(guard: Any, server: FakeDashScope) -> None:
    server.fail_next("InternalError", times=2)  # 500, 500, then an answer
    client = guard.wrap_openai(openai_client(server, max_retries=2))
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert server.request_count == 3
    assert recorded(guard) == server_usage(server, 1)  # the answer; errors bill nothing
    assert sum(s.failures for s in guard.stats()) == 2
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ interruptions


def test_async_cancellation_after_sending_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    server.latency = 0.3

    async def main() -> int:
        raw = openai.AsyncOpenAI(api_key=SDK_KEY, base_url=server.openai_base)
        cancelled = 0
        async with guard.wrap_openai(raw) as client:
            for _ in range(30):
                before = server.request_count
                task = asyncio.create_task(
                    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
                )
                while server.request_count == before and not task.done():
                    await asyncio.sleep(0.005)
                if task.done():  # refused before sending
                    with pytest.raises(FreeTierOnly):
                        task.result()
                    return cancelled
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                cancelled += 1
        raise AssertionError("never refused")

    cancelled = asyncio.run(main())
    assert cancelled > 0
    assert [r.in_doubt for r in guard.records()] == [True] * cancelled
    assert_invariant(guard, server)


def test_keyboard_interrupt_after_sending_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    """Ctrl-C while the answer is awaited: the request went out, its outcome is unknown."""
    server.latency = 1.0

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    client = guard.wrap_openai(openai_client(server, max_retries=0))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (20, True)
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ streams


def test_a_stream_cut_before_its_usage_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    server.close_stream_after = 2
    client = guard.wrap_openai(openai_client(server, max_retries=0))
    with pytest.raises(openai.APIConnectionError):
        list(
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, max_tokens=20
            )
        )
    ds = guard.wrap_dashscope()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(
            ds.Generation.call(
                model=MODEL, messages=MESSAGES, api_key=SDK_KEY, stream=True, max_tokens=20
            )
        )
    assert [r.in_doubt for r in guard.records()] == [True, True]
    assert_invariant(guard, server, grant=GRANT)


def test_a_stream_closed_early_is_in_doubt(guard: Any, server: FakeDashScope) -> None:
    client = guard.wrap_openai(openai_client(server))
    with client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, max_tokens=25
    ) as stream:
        next(stream)
    [record] = guard.records()
    assert (record.output_tokens, record.in_doubt) == (25, True)
    assert_invariant(guard, server)


# ------------------------------------------------------------------------------ correction


def test_the_console_corrects_an_in_doubt_count_only_when_forced(
    guard: Any, server: FakeDashScope
) -> None:
    """An in-doubt call counts its worst case; the console later shows what was billed.
    A plain sync never raises the remaining above the ledger's own (a stale figure
    must not give tokens back); a forced sync, the user's correction, sets it."""
    server.latency = 0.3
    client = guard.wrap_openai(openai_client(server, timeout=0.2, max_retries=0))
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
    spent = billed(server)
    left = guard.remaining(MODEL)
    console = f"{GRANT - spent:,}/{GRANT:,}"
    assert guard.sync(MODEL, console).remaining == left  # never raised by a stale figure
    assert guard.sync(MODEL, console, force=True).remaining == GRANT - spent
