"""Every bad input is refused with a message naming the bad value, and changes nothing
already recorded (SPEC "Errors a caller sees")."""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock

import quotaguard as qg
from quotaguard import LeaseExpiredWarning, LedgerError, QuotaGuardError

MakeGuard = Callable[..., qg.QuotaGuard]
Snapshot = tuple[Any, ...]


def snapshot(guard: qg.QuotaGuard) -> Snapshot:
    """Everything a bad input must leave alone: records, quotas, the account."""
    records = tuple(tuple(sorted(qg.record_to_dict(r).items())) for r in guard.records())
    fields: tuple[str, ...] = ("model", "total", "used", "reserved", "remaining")
    fields += ("activated_at", "expires_at", "expired", "free_only")
    quotas = tuple(
        tuple(getattr(q, f) for f in fields) for q in sorted(guard.quotas(), key=lambda q: q.model)
    )
    return (records, quotas, guard.overdue, guard.balance)


@pytest.fixture
def busy(any_guard: qg.QuotaGuard) -> qg.QuotaGuard:
    """A guard whose ledger already holds a grant, a record and a balance."""
    any_guard.grant("qwen-max", tokens=100_000)
    any_guard.grant("qwen-plus")
    any_guard.reserve("qwen-max", 1_000, 500).settle(900, 400, request_id="req-1")
    any_guard.set_balance("12.34")
    return any_guard


# --------------------------------------------------------------------------- token counts

# (value, exception, text the message must contain)
BAD_COUNTS: list[tuple[object, type[Exception], str]] = [
    (-1, ValueError, "-1"),
    (-(10**30), ValueError, str(-(10**30))),
    (10**30, ValueError, str(10**30)),
    (10**40, ValueError, str(10**40)),
    (1_000_000_001, ValueError, "1000000001"),
    (1.5, ValueError, "1.5"),
    (2.0, ValueError, "2.0"),
    (math.nan, ValueError, "nan"),
    (math.inf, ValueError, "inf"),
    (Decimal("7.5"), ValueError, "7.5"),
    (True, TypeError, "True"),
    (False, TypeError, "False"),
    (None, TypeError, "None"),
    ("5", TypeError, "'5'"),
    ([3], TypeError, "[3]"),
]
COUNT_IDS = [f"{type(v).__name__}:{v!r}"[:30] for v, _, _ in BAD_COUNTS]


@pytest.mark.parametrize(("value", "exc", "shown"), BAD_COUNTS, ids=COUNT_IDS)
@pytest.mark.parametrize("where", ["input_tokens", "max_output_tokens"])
def test_reserve_rejects_bad_token_counts(
    busy: qg.QuotaGuard, where: str, value: object, exc: type[Exception], shown: str
) -> None:
    before = snapshot(busy)
    args: dict[str, object] = {"input_tokens": 10, "max_output_tokens": 10, where: value}
    with pytest.raises(exc) as e:
        busy.reserve("qwen-max", **args)  # type: ignore[arg-type]
    assert where in str(e.value)
    assert shown in str(e.value)
    assert snapshot(busy) == before


@pytest.mark.parametrize(("value", "exc", "shown"), BAD_COUNTS, ids=COUNT_IDS)
@pytest.mark.parametrize("where", ["input_tokens", "output_tokens"])
def test_settle_rejects_bad_token_counts_and_stays_open(
    busy: qg.QuotaGuard, where: str, value: object, exc: type[Exception], shown: str
) -> None:
    r = busy.reserve("qwen-max", 100, 100)
    before = snapshot(busy)
    args: dict[str, object] = {"input_tokens": 10, "output_tokens": 10, where: value}
    with pytest.raises(exc) as e:
        r.settle(**args)  # type: ignore[arg-type]
    assert where in str(e.value)
    assert shown in str(e.value)
    assert snapshot(busy) == before
    # The reservation is still open: the real usage can still be recorded.
    assert r.done is False
    assert r.settle(10, 10).free_tokens == 20


# For grant, tokens=None is no mistake: it means the catalogue's default.
GRANT_BAD = [c for c in BAD_COUNTS if c[0] is not None]


@pytest.mark.parametrize(
    ("value", "exc", "shown"),
    GRANT_BAD,
    ids=[f"{type(v).__name__}:{v!r}"[:30] for v, _, _ in GRANT_BAD],
)
def test_grant_rejects_bad_token_counts(
    busy: qg.QuotaGuard, value: object, exc: type[Exception], shown: str
) -> None:
    before = snapshot(busy)
    with pytest.raises(exc) as e:
        busy.grant("qwen-max", tokens=value)  # type: ignore[arg-type]
    assert "tokens" in str(e.value)
    assert shown in str(e.value)
    assert snapshot(busy) == before


def test_cached_tokens_above_input_tokens(busy: qg.QuotaGuard) -> None:
    r = busy.reserve("qwen-max", 100, 100)
    before = snapshot(busy)
    with pytest.raises(ValueError, match="cached_tokens 11") as e:
        r.settle(10, 10, cached_tokens=11)
    assert "10" in str(e.value)
    assert snapshot(busy) == before
    assert r.done is False
    r.release()


def test_empty_model_name(busy: qg.QuotaGuard) -> None:
    before = snapshot(busy)
    for call in (
        lambda: busy.reserve("", 1, 1),
        lambda: busy.grant("", tokens=5),
        lambda: busy.sync("  ", "1/2"),
    ):
        with pytest.raises(ValueError, match="model"):
            call()
    assert snapshot(busy) == before


# --------------------------------------------------------------------------- R2 region and site


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"region": "mars-north-1"}, '"mars-north-1"'),
        ({"region": ""}, '""'),
        ({"region": "cn-beijing "}, '"cn-beijing "'),
        ({"site": "moon"}, '"moon"'),
        ({"site": "China"}, '"China"'),
    ],
)
def test_unknown_region_or_site(
    sqlite_guard: qg.QuotaGuard,
    make_guard: MakeGuard,
    kwargs: dict[str, str],
    shown: str,
) -> None:
    sqlite_guard.grant("qwen-max")
    sqlite_guard.reserve("qwen-max", 5, 5).settle(5, 5)
    before = snapshot(sqlite_guard)
    with pytest.raises(ValueError, match=shown):
        make_guard(**kwargs)
    assert snapshot(sqlite_guard) == before


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf])
def test_bad_lease_seconds(value: float) -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        qg.QuotaGuard("memory://", lease_seconds=value)


def test_bad_kind(busy: qg.QuotaGuard) -> None:
    before = snapshot(busy)
    with pytest.raises(ValueError, match='"Realtime"'):
        busy.reserve("qwen-max", 1, 1, kind="Realtime")
    assert snapshot(busy) == before


# --------------------------------------------------------------------------- R3 grants


@pytest.mark.parametrize("days", [29, 91, 0, -30, 10**30])
def test_valid_days_outside_30_to_90(busy: qg.QuotaGuard, days: int) -> None:
    before = snapshot(busy)
    with pytest.raises(ValueError, match=f"valid_days {days}\\b"):
        busy.grant("qwen-max", valid_days=days)
    with pytest.raises(ValueError, match=str(days)):
        busy.grant("qwen-turbo", valid_days=days)
    assert snapshot(busy) == before


@pytest.mark.parametrize("days", [45.0, True, "60"])
def test_valid_days_of_the_wrong_type(busy: qg.QuotaGuard, days: object) -> None:
    before = snapshot(busy)
    with pytest.raises(TypeError, match="valid_days") as e:
        busy.grant("qwen-max", valid_days=days)  # type: ignore[arg-type]
    assert repr(days) in str(e.value)
    assert snapshot(busy) == before


@pytest.mark.parametrize(
    ("when", "shown"),
    [
        (dt.datetime(2026, 1, 1, 8, 0), "2026, 1, 1, 8, 0"),
        ("2026-01-01T08:00:00", "2026-01-01T08:00:00"),
        ("yesterday", "yesterday"),
        ("", '""'),
    ],
)
def test_activated_at_without_a_time_zone_or_unreadable(
    busy: qg.QuotaGuard, when: object, shown: str
) -> None:
    before = snapshot(busy)
    with pytest.raises(ValueError) as e:
        busy.grant("qwen-max", activated_at=when)  # type: ignore[arg-type]
    assert shown in str(e.value)
    assert snapshot(busy) == before


def test_a_model_outside_the_catalogue_needs_tokens(busy: qg.QuotaGuard) -> None:
    before = snapshot(busy)
    with pytest.raises(ValueError, match='"qwen-unknown"'):
        busy.grant("qwen-unknown")
    assert snapshot(busy) == before


# --------------------------------------------------------------------------- R12 console figures


@pytest.mark.parametrize(
    ("figure", "why"),
    [
        ("362917", "no '/'"),
        ("362,917 of 1,000,000", "no '/'"),
        ("abc/1,000,000", "whole numbers"),
        ("362,917/1,000,000 tokens", "whole numbers"),
        ("12.5/100", "whole numbers"),
        ("1,00/1000", "whole numbers"),
        ("1/2/3", "whole numbers"),
        ("2,000,000/1,000,000", "remaining above total"),
        ("-5/1,000,000", "negative"),
        ("5/-1,000,000", "negative"),
        ("", "no '/'"),
        ("/", "empty"),
        ("362,917/", "empty"),
        ("99999999999999999999999/99999999999999999999999", "too large"),
    ],
)
def test_malformed_console_figures(busy: qg.QuotaGuard, figure: str, why: str) -> None:
    before = snapshot(busy)
    with pytest.raises(ValueError) as e:
        busy.sync("qwen-max", figure)
    assert f'"{figure}"' in str(e.value)
    assert why in str(e.value)
    assert snapshot(busy) == before


def test_console_figure_must_be_a_str(busy: qg.QuotaGuard) -> None:
    before = snapshot(busy)
    with pytest.raises(TypeError):
        busy.sync("qwen-max", 362_917)  # type: ignore[arg-type]
    assert snapshot(busy) == before


# --------------------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("amount", "exc", "shown"),
    [
        (0.1, TypeError, "0.1"),
        (True, TypeError, "bool"),
        ("ten", ValueError, '"ten"'),
        ("1e400", ValueError, "1e400"),
        (Decimal("0.0000000000001"), ValueError, "12 decimal places"),
        ([1], TypeError, "[1]"),
    ],
)
def test_bad_amounts(busy: qg.QuotaGuard, amount: object, exc: type[Exception], shown: str) -> None:
    before = snapshot(busy)
    for call in (busy.set_balance, busy.top_up):
        with pytest.raises(exc) as e:
            call(amount)  # type: ignore[arg-type]
        assert shown in str(e.value)
    assert snapshot(busy) == before


# --------------------------------------------------------------------------- R9 reservations


def test_settling_twice(busy: qg.QuotaGuard) -> None:
    r = busy.reserve("qwen-max", 100, 100)
    r.settle(50, 50)
    before = snapshot(busy)
    with pytest.raises(QuotaGuardError, match="already settled or released") as e:
        r.settle(50, 50)
    assert str(r.id) in str(e.value)
    assert "qwen-max" in str(e.value)
    assert snapshot(busy) == before


def test_settling_after_the_lease_expired(make_guard: MakeGuard, clock: Clock) -> None:
    guard = make_guard(lease_seconds=5)
    guard.grant("qwen-max", tokens=1_000)
    guard.reserve("qwen-max", 10, 10).settle(10, 10)
    earlier = snapshot(guard)[0]
    r = guard.reserve("qwen-max", 100, 100)
    clock.advance(6)
    assert guard.quota("qwen-max").reserved == 0
    with pytest.warns(LeaseExpiredWarning) as w:
        rec = r.settle(60, 40)
    assert str(r.id) in str(w[0].message)
    assert "5 s" in str(w[0].message)
    records = guard.records()
    assert records[-1].id == rec.id
    assert (rec.input_tokens, rec.output_tokens, rec.free_tokens) == (60, 40, 100)
    # Earlier records untouched; the late one counted once.
    assert snapshot(guard)[0][:-1] == earlier
    assert guard.quota("qwen-max").used == 120
    with pytest.raises(QuotaGuardError):
        r.settle(60, 40)
    assert guard.quota("qwen-max").used == 120


def test_lease_expired_warning_shows_a_fractional_lease(
    make_guard: MakeGuard, clock: Clock
) -> None:
    guard = make_guard(lease_seconds=0.25)
    guard.grant("qwen-max")
    r = guard.reserve("qwen-max", 1, 1)
    clock.advance(1)
    with pytest.warns(LeaseExpiredWarning) as w:
        r.settle(1, 1)
    assert "0.25 s" in str(w[0].message)


def test_releasing_after_the_lease_expired_is_harmless(make_guard: MakeGuard, clock: Clock) -> None:
    guard = make_guard(lease_seconds=5)
    guard.grant("qwen-max", tokens=1_000)
    r = guard.reserve("qwen-max", 100, 100)
    clock.advance(6)
    before = snapshot(guard)
    r.release()
    assert snapshot(guard) == before
    with pytest.raises(QuotaGuardError):
        r.release()


# --------------------------------------------------------------------------- ledgers


def test_ledger_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="int"):
        qg.QuotaGuard(ledger=42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x.db", "postgres://db", "sqlite:///x.db?fast=yes", "x.db?synchronous=no", ""],
)
def test_unreadable_ledger_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError) as e:
        qg.QuotaGuard(url)
    shown = url.split("?")[-1] if "?" in url else url
    assert shown in str(e.value)


def test_a_question_mark_in_a_file_name_is_part_of_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    guard = qg.QuotaGuard("odd?name.db")
    guard.grant("qwen-max", tokens=10)
    assert (tmp_path / "odd?name.db").exists()
    assert not (tmp_path / "odd").exists()


@pytest.mark.parametrize("form", ["path", "url"])
def test_ledger_in_a_missing_directory(tmp_path: Path, form: str) -> None:
    path = tmp_path / "missing" / "deeper" / "ledger.db"
    ledger = str(path) if form == "path" else f"sqlite://{path}"
    with pytest.raises(LedgerError) as e:
        qg.QuotaGuard(ledger)
    assert str(path) in str(e.value)
    assert e.value.ledger == str(path)
    assert "does not exist" in str(e.value)
    assert not path.parent.exists()


def test_ledger_in_a_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    path = ro / "ledger.db"
    if os.geteuid() == 0:
        # Root ignores permission bits; an immutable directory stops root too.
        made = subprocess.run(["chattr", "+i", str(ro)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"running as root and chattr +i failed: {made.stderr.strip()}")
        undo = ["chattr", "-i", str(ro)]
    else:
        ro.chmod(0o500)
        undo = ["chmod", "700", str(ro)]
    try:
        with pytest.raises(LedgerError) as e:
            qg.QuotaGuard(path)
        assert e.value.ledger == str(path)
        assert str(path) in str(e.value)
        assert not path.exists()
    finally:
        subprocess.run(undo, check=True)


def test_a_file_that_is_not_a_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    content = b"These are my notes, not a database.\n" * 200
    path.write_bytes(content)
    mode = path.stat().st_mode
    with pytest.raises(LedgerError) as e:
        qg.QuotaGuard(path)
    assert str(path) in str(e.value)
    assert e.value.ledger == str(path)
    assert "not a SQLite database" in str(e.value)
    assert path.read_bytes() == content
    assert path.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_a_ledger_with_a_newer_schema(ledger_path: Path) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant("qwen-max")
    guard.reserve("qwen-max", 10, 10).settle(10, 10)
    before = snapshot(guard)
    del guard
    with sqlite3.connect(ledger_path) as c:
        c.execute("INSERT INTO schema_version VALUES (99)")
    c.close()
    with pytest.raises(LedgerError) as e:
        qg.QuotaGuard(ledger_path)
    assert "99" in str(e.value)
    assert str(ledger_path) in str(e.value)
    with sqlite3.connect(ledger_path) as c:
        assert c.execute("SELECT count(*) FROM records").fetchone() == (1,)
        versions = sorted(c.execute("SELECT version FROM schema_version"))
        assert versions == [*((v,) for v in range(1, qg._core.SCHEMA_VERSION + 1)), (99,)]
        c.execute("DELETE FROM schema_version WHERE version = 99")
    c.close()
    assert snapshot(qg.QuotaGuard(ledger_path)) == before


def test_ledger_file_is_private(ledger_path: Path) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant("qwen-max")
    guard.reserve("qwen-max", 1, 1).settle(1, 1)
    for p in ledger_path.parent.iterdir():  # the file, and its -wal and -shm
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("QUOTAGUARD_LEDGER", raising=False)
    old = os.umask(0o022)
    try:
        yield home
    finally:
        os.umask(old)


def test_default_ledger_is_private(home: Path) -> None:
    guard = qg.QuotaGuard(ledger=None)
    guard.grant("qwen-max")
    guard.reserve("qwen-max", 1, 1).settle(1, 1)
    d = home / ".quotaguard"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "ledger.db").stat().st_mode) == 0o600
    assert str(d / "ledger.db") in guard.ledger
    again = qg.QuotaGuard()
    assert len(again.records()) == 1


def test_default_ledger_follows_the_environment(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = home / "elsewhere.db"
    monkeypatch.setenv("QUOTAGUARD_LEDGER", str(target))
    qg.QuotaGuard().grant("qwen-max")
    assert target.exists()
    assert not (home / ".quotaguard").exists()


HOLD_LOCK = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("UPDATE accounts SET overdue = overdue")
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
c.close()
"""


def test_a_short_lock_is_waited_out(ledger_path: Path) -> None:
    # The lock is held from another process: the extension bundles its own SQLite, and
    # POSIX file locks do not separate two SQLite copies inside one process.
    guard = qg.QuotaGuard(ledger_path)
    guard.grant("qwen-max", tokens=1_000)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(ledger_path), "0.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "LOCKED"
        start = time.monotonic()
        rec = guard.reserve("qwen-max", 10, 10).settle(10, 10)
        waited = time.monotonic() - start
    finally:
        assert holder.wait(10) == 0
        if holder.stdout is not None:
            holder.stdout.close()
    assert waited >= 0.3, f"the call did not wait for the lock ({waited:.3f} s)"
    assert rec.free_tokens == 20
    assert guard.remaining("qwen-max") == 980


# --------------------------------------------------------------------------- catalogues


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my catalogue.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("[models.qwen-max]\nfree_tokens = 1\nvalid_days = = 3\n", 3, "="),
        ("[models.qwen-max]\nfree_tokens = 1\nfree_tokens = 2\n", 3, "duplicate"),
        ("\n\n[models.my-model]\nvalid_days = 200\n", 3, "200"),
        (
            '\n[models.m1.prices.china]\ncurrency = "CNY"\n'
            'tiers = [{ input = "x", output = "1" }]\n',
            2,
            '"x"',
        ),
        (
            '\n[models.m1.prices.china]\ncurrency = "CNY"\n'
            'tiers = [{ input = "-1", output = "1" }]\n',
            2,
            '"-1"',
        ),
        (
            '[models.m1.prices.china]\ncurrency = "USD"\ntiers = [{ input = "1", output = "1" }]\n',
            1,
            "USD",
        ),
        ("[models.qwen-max\nfree_tokens = 1\n", 1, ""),
    ],
)
def test_a_malformed_catalogue_names_file_and_line(
    busy: qg.QuotaGuard, tmp_path: Path, text: str, line: int, shown: str
) -> None:
    path = write(tmp_path, text)
    before = snapshot(busy)
    with pytest.raises(ValueError) as e:
        qg.QuotaGuard("memory://", catalog=path)
    message = str(e.value)
    assert f'"{path}"' in message
    assert f"line {line}" in message
    assert shown in message
    assert snapshot(busy) == before


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("# comment\n\n[models.qwen-max]\nfree_tokenz = 5\n", {3, 4}),
        ('# comment\n[models.qwen-max]\nfree_tokens = "many"\n', {2, 3}),
        (
            '# comment\n[models.m1.prices.china]\ncurrency = "CNY"\n'
            'tiers = [{ input = 1.5, output = "1" }]\n',
            {2, 4},
        ),
        (
            '# cheaper m1 prices\n\n[models.m1.prices.china]\ncurrency = "CNY"\n'
            'tiers = [{ input = "x", output = "1" }]\n',
            {3, 5},
        ),
    ],
    ids=["unknown-key", "wrong-type", "float-price", "name-in-comment"],
)
def test_a_catalogue_schema_error_names_the_right_line(
    tmp_path: Path, text: str, lines: set[int]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        qg.QuotaGuard("memory://", catalog=path)
    assert f'"{path}"' in str(e.value)
    assert any(f"line {n}:" in str(e.value) for n in lines), str(e.value)


def test_a_missing_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ValueError, match=r"nope\.toml"):
        qg.QuotaGuard("memory://", catalog=path)
