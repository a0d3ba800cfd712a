"""Properties over every parser and every public method, with random and hostile values.

Shared by ``tests/test_properties.py`` (a bounded run in CI) and ``benches/fuzz.py``
(a longer run). Each property takes hypothesis's ``data`` and asserts:

- no Python value crashes the process or escapes as anything but ``ValueError``,
  ``TypeError``, a ``QuotaGuardError`` or the hostile object's own exception;
- a refused call changes nothing recorded;
- what is accepted is read exactly (console figures, amounts round-trip);
- messages are one printable line and never show a password.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

import quotaguard as qg
from quotaguard import QuotaGuardError
from quotaguard.cli import COMMANDS as CLI_COMMANDS
from quotaguard.cli import main

UTC = dt.timezone.utc
START = dt.datetime(2026, 1, 10, 4, 0, tzinfo=UTC)
SECRET = "s3cr3t-pw"


class Hostile(Exception):
    """What hostile objects raise: passing it on is the right answer."""


class SelfIndex:
    def __index__(self) -> Any:
        return self

    def __repr__(self) -> str:
        return "SelfIndex()"


class RaisingIndex:
    def __index__(self) -> int:
        raise Hostile("__index__")


class BoolIndex:
    def __index__(self) -> bool:
        return True


class BadRepr:
    def __repr__(self) -> str:
        raise Hostile("__repr__")

    def __str__(self) -> str:
        raise Hostile("__str__")


class FloatSelf:
    def __float__(self) -> Any:
        return self


class NanTimestamp:
    """A duck-typed datetime whose numbers are nonsense."""

    tzinfo = UTC

    def utcoffset(self) -> dt.timedelta:
        return dt.timedelta(0)

    def timestamp(self) -> float:
        return math.nan


class RaisingDatetime:
    tzinfo = UTC

    def utcoffset(self) -> dt.timedelta:
        raise Hostile("utcoffset")

    def timestamp(self) -> float:
        raise Hostile("timestamp")


class BadFspath:
    def __fspath__(self) -> Any:
        return 42


class RaisingFspath:
    def __fspath__(self) -> str:
        raise Hostile("__fspath__")


class BadIter:
    def __iter__(self) -> Any:
        raise Hostile("__iter__")

    def __len__(self) -> int:
        return -1


class StrSub(str):
    def __str__(self) -> str:
        raise Hostile("__str__ of a str")


class IntSub(int):
    def __index__(self) -> int:
        raise Hostile("__index__ of an int")


class BigLen:
    def __len__(self) -> int:
        return 2**100

    def __getitem__(self, i: int) -> str:
        raise IndexError(i)


ODD_OBJECTS: list[object] = [
    SelfIndex(),
    RaisingIndex(),
    BoolIndex(),
    BadRepr(),
    FloatSelf(),
    NanTimestamp(),
    RaisingDatetime(),
    BadFspath(),
    RaisingFspath(),
    BadIter(),
    StrSub("qwen-max"),
    IntSub(5),
    BigLen(),
    object(),
    type,
    print,
    Ellipsis,
    NotImplemented,
    float("nan"),
    float("inf"),
    -0.0,
    2**63,
    -(2**63) - 1,
    10**400,
    Decimal("NaN"),
    Decimal("-Infinity"),
    Decimal("1e-30"),
    Decimal("1e30"),
    "\x00",
    "\ud800",
    "\u202e",
    "qwen-max\x00",
    " ",
    "",
    b"5",
    bytearray(b"x"),
    memoryview(b"x"),
    [1],
    (1, 2),
    {"a": 1},
    {1},
    dt.date(2026, 1, 1),
    dt.datetime(2026, 1, 1),
    dt.datetime(1, 1, 1, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
    dt.timedelta(days=1),
    complex(1, 2),
]

CHARS = st.characters(codec=None, exclude_categories=())
NEAR_MISSES = st.sampled_from(
    [
        "362,917/1,000,000",
        "1/1",
        "0/0",
        "1,000,000,001/1,000,000,001",
        "2026-11",
        "2026-13",
        "2026-11-26",
        "2026-11-26T09:30:00+08:00",
        "2026-11-26T09:30:00",
        "realtime",
        "batch",
        "custom",
        "cn-beijing",
        "china",
        "international",
        "qwen-max",
        "qwen-plus",
        "all",
        "12.34",
        "-1",
        "1e3",
        "0x10",
        "1,000",
        "NaN",
        "Infinity",
    ]
)


def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.text(CHARS, max_size=40), NEAR_MISSES, st.text(max_size=5).map(str.upper))


def hostile() -> st.SearchStrategy[Any]:
    """Any value a caller may pass, most of them wrong."""
    return st.one_of(
        st.sampled_from(ODD_OBJECTS),
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(allow_nan=True, allow_infinity=True),
        texts(),
        st.binary(max_size=10),
        st.decimals(allow_nan=True, allow_infinity=True),
        st.datetimes(timezones=st.none() | st.just(UTC)),
        st.lists(st.one_of(st.integers(), texts(), st.none()), max_size=4),
        st.dictionaries(texts(), st.one_of(st.integers(), texts()), max_size=3),
    )


ALLOWED: tuple[type[BaseException], ...] = (ValueError, TypeError, QuotaGuardError, Hostile)


def snapshot(guard: qg.QuotaGuard) -> tuple[Any, ...]:
    records = tuple(tuple(sorted(qg.record_to_dict(r).items())) for r in guard.records())
    quotas = tuple(
        (q.model, q.total, q.used, q.reserved, q.activated_at, q.expires_at, q.free_only)
        for q in sorted(guard.quotas(), key=lambda q: q.model)
    )
    return (records, quotas, guard.overdue, guard.balance)


def busy_guard(ledger: str = "memory://") -> qg.QuotaGuard:
    guard = qg.QuotaGuard(ledger, clock=lambda: START)
    guard.grant("qwen-max", tokens=100_000)
    guard.grant("qwen-plus")
    guard.reserve("qwen-max", 100, 50).settle(90, 40, request_id="r1")
    guard.set_balance("10")
    return guard


def check_message(e: BaseException) -> None:
    if isinstance(e, Hostile):
        return
    text = str(e)
    assert text, repr(e)
    assert "\n" not in text and "\x00" not in text, repr(text)
    assert SECRET not in text


# One entry per public method and argument: (name, call with the value in that place).
Call = Callable[[qg.QuotaGuard, Any], object]
CALLS: list[tuple[str, Call]] = [
    ("reserve.model", lambda g, v: g.reserve(v, 1, 1)),
    ("reserve.input_tokens", lambda g, v: g.reserve("qwen-max", v, 1)),
    ("reserve.max_output_tokens", lambda g, v: g.reserve("qwen-max", 1, v)),
    ("reserve.kind", lambda g, v: g.reserve("qwen-max", 1, 1, v)),
    ("reserve.thinking", lambda g, v: g.reserve("qwen-max", 1, 1, thinking=v)),
    ("settle.input_tokens", lambda r, v: r.settle(v, 1)),
    ("settle.output_tokens", lambda r, v: r.settle(1, v)),
    ("settle.request_id", lambda r, v: r.settle(1, 1, v)),
    ("settle.cached_tokens", lambda r, v: r.settle(2, 1, cached_tokens=v)),
    ("settle.thinking", lambda r, v: r.settle(2, 1, thinking=v)),
    ("release.failed", lambda r, v: r.release(failed=v)),
    ("settle_worst_case.in_doubt", lambda r, v: r.settle_worst_case(in_doubt=v)),
    ("grant.model", lambda g, v: g.grant(v, tokens=10)),
    ("grant.tokens", lambda g, v: g.grant("qwen-turbo", tokens=v)),
    ("grant.activated_at", lambda g, v: g.grant("qwen-turbo", activated_at=v)),
    ("grant.valid_days", lambda g, v: g.grant("qwen-turbo", valid_days=v)),
    ("remaining", lambda g, v: g.remaining(v)),
    ("quota", lambda g, v: g.quota(v)),
    ("sync.model", lambda g, v: g.sync(v, "1/2")),
    ("sync.console_text", lambda g, v: g.sync("qwen-plus", v)),
    ("sync.force", lambda g, v: g.sync("qwen-plus", "999,000/1,000,000", force=v)),
    ("set_free_only.models", lambda g, v: g.set_free_only(v)),
    ("set_free_only.enabled", lambda g, v: g.set_free_only("qwen-max", v)),
    ("first_free.models", lambda g, v: g.first_free(v)),
    ("first_free.input_tokens", lambda g, v: g.first_free(["qwen-max"], v)),
    ("first_free.max_output_tokens", lambda g, v: g.first_free(["qwen-max"], 1, v)),
    ("forecast.model", lambda g, v: g.forecast(v)),
    ("forecast.window_hours", lambda g, v: g.forecast("qwen-max", v)),
    ("forecasts.window_hours", lambda g, v: g.forecasts(v)),
    ("block.reason", lambda g, v: (g.block(v), g.unblock())),
    ("alert_thresholds", lambda g, v: setattr(g, "alert_thresholds", v)),
    ("expiry_alert_days", lambda g, v: setattr(g, "expiry_alert_days", v)),
    ("top_up", lambda g, v: g.top_up(v)),
    ("set_balance", lambda g, v: g.set_balance(v)),
    ("budget.tokens", lambda g, v: g.budget(tokens=v)),
    ("budget.cost", lambda g, v: g.budget(cost=v)),
    ("budget.name", lambda g, v: g.budget(name=v)),
    ("records.model", lambda g, v: g.records(model=v)),
    ("records.since", lambda g, v: g.records(since=v)),
    ("records.until", lambda g, v: g.records(until=v)),
    ("records.kind", lambda g, v: g.records(kind=v)),
    ("records.limit", lambda g, v: g.records(limit=v)),
    ("bill.month", lambda g, v: g.bill(v)),
    ("bill.day", lambda g, v: g.bill(day=v)),
    ("stats.model", lambda g, v: g.stats(model=v)),
    ("stats.since", lambda g, v: g.stats(since=v)),
    ("compact", lambda g, v: g.compact(v)),
    ("alert_threshold", lambda g, v: setattr(g, "alert_threshold", v)),
    ("daily_spend_alert", lambda g, v: setattr(g, "daily_spend_alert", v)),
    ("on_alert", lambda g, v: g.on_alert(v)),
    ("input_bound.messages", lambda g, v: g.input_bound(messages=v)),
    ("input_bound.message", lambda g, v: g.input_bound(messages=[v])),
    ("input_bound.content", lambda g, v: g.input_bound(messages=[{"role": "user", "content": v}])),
    ("input_bound.prompt", lambda g, v: g.input_bound(prompt=v)),
    ("input_bound.input", lambda g, v: g.input_bound(input=v)),
    ("input_bound.extra_tokens", lambda g, v: g.input_bound(prompt="hi", extra_tokens=v)),
    ("count_tokens", lambda g, v: qg.count_tokens(v)),
    ("export", lambda g, v: g.export(v) if isinstance(v, str) and "/" not in v else None),
]

CONSTRUCTOR_ARGS = [
    "account",
    "user",
    "workspace",
    "region",
    "site",
    "verified",
    "lease_seconds",
    "clock",
]


def hostile_method_call(data: st.DataObject) -> str:
    """A public method called with one hostile argument: refused cleanly, nothing changed."""
    name, call = data.draw(st.sampled_from(CALLS), label="call")
    value = data.draw(hostile(), label="value")
    guard = busy_guard()
    # A reservation's methods are called on one made first.
    target: Any = (
        guard.reserve("qwen-max", 5, 5) if name.startswith(("settle", "release")) else guard
    )
    before = snapshot(guard)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qg.LeaseExpiredWarning)
        try:
            call(target, value)
        except ALLOWED as e:
            check_message(e)
            assert snapshot(guard) == before, f"{name}({value!r}) changed the ledger"
            return f"{name}: {type(e).__name__}"
    return f"{name}: ok"


def hostile_constructor(data: st.DataObject) -> str:
    """`QuotaGuard(...)` with one hostile argument (or a clock returning it)."""
    arg = data.draw(st.sampled_from(CONSTRUCTOR_ARGS), label="argument")
    value = data.draw(hostile(), label="value")
    kwargs: dict[str, Any] = {arg: value}
    if arg == "clock":
        kwargs[arg] = lambda: value
    try:
        with warnings.catch_warnings():
            # A lease of a microsecond ends before the settle: warned about, rightly.
            warnings.simplefilter("ignore", qg.LeaseExpiredWarning)
            guard = qg.QuotaGuard("memory://", **kwargs)
            guard.grant("qwen-max", tokens=10)
            guard.reserve("qwen-max", 1, 1).settle(1, 1)
            guard.status()
            guard._repr_html_()
    except ALLOWED as e:
        check_message(e)
        return f"QuotaGuard({arg}=): {type(e).__name__}"
    return f"QuotaGuard({arg}=): ok"


SAFE_URLS = st.sampled_from(
    [
        "memory://",
        ":memory:",
        f"redis://:{SECRET}@127.0.0.1:1/0",
        f"Redis://u:{SECRET}@127.0.0.1:1",
        f"rediss+cluster://:{SECRET}@127.0.0.1:1,127.0.0.1:2",
        f"postgres://u:{SECRET}@h/db",
        "redis://",
        "redis://h:1/x",
        "sqlite://",
        "sqlite:///",
        "file:x.db",
        "x.db?synchronous=full",
        "x.db?synchronous=fast",
        "x.db ",
        "odd?name.db",
        ".",
        "..",
    ]
)


def ledger_text(data: st.DataObject) -> str:
    """Any text as a ledger, opened in an empty directory: refused in one line, or a
    ledger made there and nowhere else."""
    text = data.draw(st.one_of(SAFE_URLS, st.text(CHARS, max_size=30)), label="ledger")
    if ("/" in text or "\\" in text) and not text.startswith(
        ("memory", "redis", "Redis", "rediss", "postgres", "sqlite://", "file:")
    ):
        text = text.replace("/", "_").replace("\\", "_")
    if text.startswith("sqlite://") and len(text) > len("sqlite://"):
        text = "sqlite://" + text[len("sqlite://") :].lstrip("/")  # relative: stays here
    with tempfile.TemporaryDirectory() as d:
        old = os.getcwd()
        os.chdir(d)
        try:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", qg.LedgerPermissionWarning)
                    guard = qg.QuotaGuard(text)
            except ALLOWED as e:
                check_message(e)
                assert os.listdir(d) == [], (text, os.listdir(d))
                return f"ledger: {type(e).__name__}"
            guard.grant("qwen-max", tokens=5)
            made = {p.name for p in Path(d).iterdir()} - {"x", ""}
            if guard.ledger != "memory://":
                named = Path(guard.ledger).name
                assert made <= {named, named + "-wal", named + "-shm"}, (text, made)
            del guard
            return "ledger: opened"
        finally:
            os.chdir(old)


def console_figures(data: st.DataObject) -> str:
    """A console figure either round-trips exactly, or is refused naming itself."""
    guard = qg.QuotaGuard("memory://", clock=lambda: START)
    if data.draw(st.booleans(), label="well formed"):
        total = data.draw(st.integers(0, qg._core.MAX_TOKENS), label="total")
        remaining = data.draw(st.integers(0, total), label="remaining")
        q = guard.sync("qwen-max", f" {remaining:,} / {total:,} ", force=True)
        assert (q.total, q.remaining, q.console) == (total, remaining, f"{remaining:,}/{total:,}")
        return "figure: exact"
    text = data.draw(texts(), label="figure")
    try:
        q = guard.sync("qwen-max", text, force=True)
    except ValueError as e:
        check_message(e)
        return "figure: refused"
    assert q.total <= qg._core.MAX_TOKENS and q.remaining <= q.total
    return "figure: exact"


def amounts(data: st.DataObject) -> str:
    """An amount is read exactly (a str, an int or a Decimal) or refused."""
    guard = qg.QuotaGuard("memory://", clock=lambda: START)
    value = data.draw(
        st.one_of(
            st.decimals(
                allow_nan=False, allow_infinity=False, places=data.draw(st.integers(0, 14))
            ),
            st.integers(-(10**7), 10**7),
            texts(),
        ),
        label="amount",
    )
    try:
        balance = guard.set_balance(value)
    except (ValueError, TypeError) as e:
        check_message(e)
        return "amount: refused"
    assert balance == Decimal(str(value).strip()), (value, balance)
    return "amount: exact"


# Every subcommand but the demo (which serves and calls for a while).
COMMANDS = [c for c in CLI_COMMANDS if c != "demo"]

SAFE_WORDS = st.sampled_from(
    [
        *COMMANDS,
        "--json",
        "--csv",
        "--ledger",
        "--account",
        "--region",
        "--site",
        "--month",
        "--day",
        "--model",
        "--limit",
        "--since",
        "--until",
        "--tokens",
        "--force",
        "--all",
        "--set",
        "--fail-below",
        "--user",
        "--window",
        "--reason",
        "--valid-days",
        "--activated-at",
        "on",
        "off",
        "qwen-max",
        "1/2",
        "2026-11",
        "20%",
        "12.50",
        "-3",
        "records.csv",
        "records.jsonl",
        "records.parquet",
        "",
        "-",
        "--",
    ]
)


def command_lines(data: st.DataObject) -> str:
    """The command line with random words: an exit code and at most one line on stderr
    when it fails, never a traceback. Every ledger is a private temporary one, and so
    is the directory an export writes to (no word leads out of it)."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    # Half the time a subcommand first, so that each one's options get random words too.
    first = data.draw(
        st.one_of(st.just([]), st.sampled_from(COMMANDS).map(lambda c: [c])), label="command"
    )
    rest = data.draw(st.lists(st.one_of(SAFE_WORDS, texts()), max_size=6), label="argv")
    words = first + rest
    with tempfile.TemporaryDirectory() as d:
        ledger = str(Path(d) / "ledger.db")
        argv = [w.replace("/", "_") if w.startswith(("/", "~")) or ".." in w else w for w in words]
        argv = [a for a in argv if a not in ("demo", "--help", "-h", "--version")]
        argv += ["--ledger", data.draw(st.sampled_from([ledger, "memory://"]), label="ledger")]
        out, err = StringIO(), StringIO()
        old_home, old_cwd = os.environ.get("HOME"), os.getcwd()
        os.environ["HOME"] = d
        os.chdir(d)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main(argv)
        finally:
            os.chdir(old_cwd)
            if old_home is not None:
                os.environ["HOME"] = old_home
        # 3: status --fail-below found a model below the share (or nothing to check).
        below = code == 3 and "status" in argv and "--fail-below" in argv
        assert isinstance(code, int) and (code in (0, 1, 2) or below), (argv, code)
        assert "Traceback" not in err.getvalue()
        if code:
            lines = err.getvalue().strip().splitlines()
            said = "quotaguard: below " if below else "quotaguard: error: "
            assert len(lines) == 1 and lines[0].startswith(said), (argv, lines)
        return f"cli: exit {code}"


PROPERTIES: dict[str, Callable[[st.DataObject], str]] = {
    "method": hostile_method_call,
    "constructor": hostile_constructor,
    "ledger": ledger_text,
    "figure": console_figures,
    "amount": amounts,
    "cli": command_lines,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit("import this module; run tests/test_properties.py or benches/fuzz.py")
