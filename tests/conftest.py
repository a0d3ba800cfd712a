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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import quotaguard as qg

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

    def advance(self, seconds: float) -> dt.datetime:
        self.now += dt.timedelta(seconds=seconds)
        return self.now

    def set(self, when: dt.datetime) -> dt.datetime:
        self.now = when
        return self.now


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
