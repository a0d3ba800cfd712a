"""Shared fixtures.

- ``clock``: a :class:`Clock` the test moves by hand (``clock.now``, ``clock.advance(s)``);
  pass it as ``QuotaGuard(clock=clock)``. It starts at :data:`START` (after the R3 cut-over).
- ``guard``: a guard on ``memory://`` driven by ``clock``.
- ``ledger_path``: a fresh SQLite file path under ``tmp_path`` (not created yet).
- ``sqlite_guard``: a guard on ``ledger_path`` driven by ``clock``.
- ``any_guard``: ``guard`` and then ``sqlite_guard`` (parametrized over both ledgers).
- ``make_guard``: ``make_guard(ledger=..., **kwargs)`` builds more guards on ``clock``
  (default ledger: ``ledger_path``, so guards made this way share one file).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import quotaguard as qg
from quotaguard.testing import FakeDashScope

CST = dt.timezone(dt.timedelta(hours=8), "CST")
START = dt.datetime(2026, 1, 10, 12, 0, tzinfo=CST)
"""Where every ``clock`` starts: 2026-01-10 12:00 CST, well after the 2025-09-08 cut-over."""


class Clock:
    """A controllable clock: ``QuotaGuard(clock=clock)`` calls it for the current time."""

    def __init__(self, start: dt.datetime = START) -> None:
        if start.tzinfo is None:
            raise ValueError("the clock needs an aware datetime")
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float = 0.0, **delta: float) -> dt.datetime:
        """Moves the clock on: ``advance(90)`` or ``advance(hours=2, minutes=5)``."""
        self.now += dt.timedelta(seconds=seconds, **delta)
        return self.now

    def set(self, when: dt.datetime) -> dt.datetime:
        self.now = when
        return self.now


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$HOME`` and no ``$QUOTAGUARD_LEDGER``: a test never reaches the user's
    real ledger. Modules that start guards without a ledger use it for every test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("QUOTAGUARD_LEDGER", raising=False)
    monkeypatch.delenv("QUOTAGUARD_DEBUG", raising=False)
    for name in ("COLUMNS", "NO_COLOR", "FORCE_COLOR"):  # output as a pipe gets it
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def guard(clock: Clock) -> qg.QuotaGuard:
    return qg.QuotaGuard("memory://", clock=clock)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def sqlite_guard(ledger_path: Path, clock: Clock) -> qg.QuotaGuard:
    return qg.QuotaGuard(ledger_path, clock=clock)


@pytest.fixture(params=["memory", "sqlite"])
def any_guard(request: pytest.FixtureRequest) -> qg.QuotaGuard:
    name = "guard" if request.param == "memory" else "sqlite_guard"
    guard: qg.QuotaGuard = request.getfixturevalue(name)
    return guard


@pytest.fixture
def make_guard(ledger_path: Path, clock: Clock) -> Callable[..., qg.QuotaGuard]:
    def make(ledger: Any = ledger_path, **kwargs: Any) -> qg.QuotaGuard:
        kwargs.setdefault("clock", clock)
        return qg.QuotaGuard(ledger, **kwargs)

    return make


# ---- the local test server, for the SDK tests --------------------------------------

SDK_KEY = "sk-test"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDashScope]:
    """A FakeDashScope that wants ``SDK_KEY``, with dashscope's base URL pointed at it."""
    import dashscope

    with FakeDashScope(api_key=SDK_KEY) as fake:
        monkeypatch.setattr(dashscope, "base_http_api_url", fake.native_base)
        yield fake


def recorded(guard: Any) -> list[tuple[str, int, int]]:
    """The guard's records as (model, input tokens, output tokens)."""
    return [(r.model, r.input_tokens, r.output_tokens) for r in guard.records()]


def server_usage(server: FakeDashScope, calls: int) -> list[tuple[str, int, int]]:
    """The server's usage log once it holds ``calls`` entries."""
    deadline = time.monotonic() + 5
    while len(server.usage_log) < calls and time.monotonic() < deadline:
        time.sleep(0.005)
    return server.usage_log


# ---- Redis servers, for the Redis ledger tests --------------------------------------
# A missing redis-server skips these tests with the reason, except under CI or with
# QUOTAGUARD_REQUIRE_REDIS=1, where it is an error (see redis_harness).

from redis_harness import RedisCluster, RedisServer, flush  # noqa: E402


@pytest.fixture
def redis_spill_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ``$QUOTAGUARD_SPILL_DIR`` (not created yet): a settle that cannot reach
    Redis spills here, never into the user's ``~/.quotaguard``."""
    spill = tmp_path / "spill"
    monkeypatch.setenv("QUOTAGUARD_SPILL_DIR", str(spill))
    return spill


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A standalone Redis for the session: ``$QUOTAGUARD_TEST_REDIS``, else a server started
    here (append-only file on). Tests take ``redis_ledger``, which empties it first."""
    import os

    given = os.environ.get("QUOTAGUARD_TEST_REDIS")
    if given:
        yield given
        return
    with RedisServer(appendonly=True) as server:
        yield server.url


@pytest.fixture
def redis_ledger(redis_url: str, redis_spill_dir: Path) -> str:
    """``redis_url`` after ``FLUSHDB``: a ledger URL with nothing in it."""
    flush(redis_url)
    return redis_url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A 3-master Redis Cluster for the session: ``$QUOTAGUARD_TEST_REDIS_CLUSTER``, else
    one started here. Tests take ``redis_cluster_ledger``, which empties it first."""
    import os

    given = os.environ.get("QUOTAGUARD_TEST_REDIS_CLUSTER")
    if given:
        yield given
        return
    with RedisCluster() as cluster:
        yield cluster.url


@pytest.fixture
def redis_cluster_ledger(redis_cluster_url: str, redis_spill_dir: Path) -> str:
    """``redis_cluster_url`` with every master flushed: a ledger URL with nothing in it."""
    flush(redis_cluster_url)
    return redis_cluster_url


@pytest.fixture
def own_redis(redis_spill_dir: Path) -> Iterator[RedisServer]:
    """A private Redis server (append-only file on, fsynced before each reply) that the
    test may stop, kill and restart: ``own_redis.url``, ``.stop()``, ``.kill()``,
    ``.restart()``."""
    with RedisServer(appendonly=True) as server:
        yield server
