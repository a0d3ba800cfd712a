"""Budgets (``guard.budget``), usage records (R11), exports and compaction (R14)."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock

import quotaguard as qg

UTC = dt.timezone.utc
CST = dt.timezone(dt.timedelta(hours=8), "CST")
START = dt.datetime(2026, 1, 10, 10, 0, tzinfo=CST)
MODEL = "qwen-max"
INT_FIELDS = (
    "id",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "free_tokens",
    "billable_input_tokens",
    "billable_output_tokens",
)


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture(params=["memory", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else str(tmp_path / "ledger.db")


@pytest.fixture
def guard(ledger: str, clock: Clock) -> qg.QuotaGuard:
    g = qg.QuotaGuard(ledger, clock=clock)
    g.grant(MODEL, tokens=1_000_000)
    return g


# ---- budgets ----------------------------------------------------------------------


def test_budget_refuses_before_sending(guard: qg.QuotaGuard) -> None:
    with guard.budget(tokens=1_000, name="tests") as b:
        assert (b.used, b.cost, b.remaining) == (0, Decimal(0), 1_000)
        r = guard.reserve(MODEL, 600, 300)
        assert b.remaining == 100  # the call in flight is held at its worst case
        r.settle(500, 200)
        assert (b.used, b.remaining) == (700, 300)
        before = (guard.remaining(MODEL), len(guard.records()))
        with pytest.raises(qg.BudgetExceeded, match='"tests"') as info:
            guard.reserve(MODEL, 200, 200)
        assert "400" in str(info.value) and "300" in str(info.value)
        assert isinstance(info.value, qg.QuotaGuardError)
        # Refused before anything was sent or held: nothing recorded, quota unchanged.
        assert (guard.remaining(MODEL), len(guard.records())) == before
        assert guard.quota(MODEL).reserved == 0
        assert (b.used, b.remaining) == (700, 300)
        # What still fits goes through.
        guard.reserve(MODEL, 150, 150).settle(100, 100)
        assert (b.used, b.remaining) == (900, 100)


def test_released_call_gives_the_budget_back(guard: qg.QuotaGuard) -> None:
    with guard.budget(tokens=1_000) as b:
        r = guard.reserve(MODEL, 500, 500)
        assert b.remaining == 0
        with pytest.raises(qg.BudgetExceeded):
            guard.reserve(MODEL, 1, 0)
        r.release()
        assert (b.used, b.remaining) == (0, 1_000)
        with guard.reserve(MODEL, 100, 100):
            pass
        # Leaving the reservation's block without settling charges its worst case.
        assert (b.used, b.remaining) == (200, 800)


def test_nested_budgets_tightest_wins(guard: qg.QuotaGuard) -> None:
    with guard.budget(tokens=1_000, name="outer") as outer:
        with guard.budget(tokens=300, name="inner") as inner:
            with pytest.raises(qg.BudgetExceeded, match='"inner"'):
                guard.reserve(MODEL, 200, 200)
            guard.reserve(MODEL, 100, 100).settle(100, 100)
            assert (inner.used, outer.used) == (200, 200)
            assert (inner.remaining, outer.remaining) == (100, 800)
        # The inner budget is gone: the same call now fits the outer one.
        guard.reserve(MODEL, 200, 200).settle(200, 200)
        assert (inner.used, outer.used) == (200, 600)
        with guard.budget(tokens=5_000, name="loose") as loose:
            with pytest.raises(qg.BudgetExceeded, match='"outer"'):
                guard.reserve(MODEL, 300, 200)
            guard.reserve(MODEL, 200, 200).settle(200, 200)
            assert (loose.used, outer.used, outer.remaining) == (400, 1_000, 0)


def test_cost_budget(clock: Clock) -> None:
    # No free quota: every token of qwen-max is billed (2.4 / 9.6 CNY per million).
    guard = qg.QuotaGuard("memory://", clock=clock)
    with guard.budget(cost=Decimal("0.01"), name="cents") as b:
        assert b.remaining is None
        assert b.cost_remaining == Decimal("0.01")
        with pytest.raises(qg.BudgetExceeded, match='"cents"'):
            guard.reserve(MODEL, 1_000, 1_000)  # worst case 0.012
        assert guard.records() == []
        r = guard.reserve(MODEL, 1_000, 500)  # worst case 0.0072
        assert b.cost_remaining == Decimal("0.0028")
        rec = r.settle(1_000, 200)
        assert rec.cost == Decimal("0.00432")
        assert (b.cost, b.cost_remaining, b.used) == (Decimal("0.00432"), Decimal("0.00568"), 1_200)
        with pytest.raises(qg.BudgetExceeded):
            guard.reserve(MODEL, 1_000, 500)
        guard.reserve(MODEL, 1_000, 300).settle(1_000, 300)  # 0.00528
        assert b.cost == Decimal("0.0096")


def test_cost_budget_lets_free_calls_through(guard: qg.QuotaGuard) -> None:
    with guard.budget(cost=0) as b:
        rec = guard.reserve(MODEL, 10_000, 10_000).settle(10_000, 10_000)
        assert rec.cost_type == "free_quota"
        assert (b.cost, b.used) == (Decimal(0), 20_000)
        with pytest.raises(qg.BudgetExceeded):
            guard.reserve(MODEL, 1_000, 0, kind="batch")  # batch is always charged


def test_cost_budget_does_not_admit_unpriced_billable_calls(clock: Clock) -> None:
    guard = qg.QuotaGuard("memory://", clock=clock)
    with guard.budget(cost=Decimal("0.01")), pytest.raises(qg.BudgetExceeded):
        guard.reserve("my-finetune", 100_000, 100_000)


def test_budget_exited_no_longer_limits(guard: qg.QuotaGuard) -> None:
    b = guard.budget(tokens=100)
    with b:
        guard.reserve(MODEL, 50, 50).settle(50, 50)
    guard.reserve(MODEL, 5_000, 5_000).settle(5_000, 5_000)
    assert b.used == 100  # still readable, and unchanged by calls after it
    with pytest.raises(RuntimeError):
        b.__enter__()


def test_budget_limits_are_checked_where_written(guard: qg.QuotaGuard) -> None:
    with pytest.raises(ValueError, match="-1"):
        guard.budget(tokens=-1)
    with pytest.raises(ValueError, match="negative"):
        guard.budget(cost=Decimal("-0.5"))
    with pytest.raises(TypeError, match="float"):
        guard.budget(cost=0.5)  # type: ignore[arg-type]


def test_budget_works_with_async_with(guard: qg.QuotaGuard) -> None:
    async def main() -> int:
        async with guard.budget(tokens=100) as b:
            with pytest.raises(qg.BudgetExceeded):
                guard.reserve(MODEL, 100, 1)
            guard.reserve(MODEL, 50, 50).settle(40, 40)
            return b.used

    assert asyncio.run(main()) == 80


@pytest.mark.timeout(120)
def test_budget_is_thread_safe(guard: qg.QuotaGuard) -> None:
    """Eight threads race inside one budget: exactly as many calls fit as it allows."""
    admitted = [0] * 8
    refused = [0] * 8
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait(30)
        for _ in range(60):
            try:
                r = guard.reserve(MODEL, 50, 50)
            except qg.BudgetExceeded:
                refused[i] += 1
                continue
            r.settle(50, 50)
            admitted[i] += 1

    with guard.budget(tokens=10_000) as b:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not any(t.is_alive() for t in threads)
        assert sum(admitted) == 100
        assert sum(refused) == 8 * 60 - 100
        assert (b.used, b.remaining) == (10_000, 0)
    assert sum(r.input_tokens + r.output_tokens for r in guard.records()) == 10_000


# ---- records ---------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path, clock: Clock) -> qg.QuotaGuard:
    """Records from three users of one account (two workspaces), and one other account."""
    path = tmp_path / "shared.db"
    root = qg.QuotaGuard(path, clock=clock)
    alice = qg.QuotaGuard(path, clock=clock, user="alice", workspace="ws-a")
    bob = qg.QuotaGuard(path, clock=clock, user="bob", workspace="ws-b")
    other = qg.QuotaGuard(path, clock=clock, account="acme")
    root.grant(MODEL, tokens=1_000_000)
    root.grant("qwen-plus", tokens=1_000_000)
    plan = [
        (root, MODEL, "realtime", "r0"),
        (root, "qwen-plus", "realtime", "r1"),
        (alice, MODEL, "batch", "r2"),
        (alice, MODEL, "realtime", "r3"),
        (bob, "qwen-plus", "realtime", "r4"),
        (other, MODEL, "realtime", "x5"),
        (bob, MODEL, "realtime", "r6"),
    ]
    for i, (g, model, kind, rid) in enumerate(plan):
        clock.now = START + dt.timedelta(hours=i)
        g.reserve(model, 100 + i, 10, kind=kind).settle(100 + i, 10, rid)
    return root


def ids(records: list[qg.UsageRecord]) -> list[str | None]:
    return [r.request_id for r in records]


def test_every_settle_leaves_one_record_with_every_field(populated: qg.QuotaGuard) -> None:
    records = populated.records()
    assert ids(records) == ["r0", "r1", "r2", "r3", "r4", "r6"]
    r3 = records[3]
    assert r3.time == START + dt.timedelta(hours=3)
    assert r3.time.tzinfo is not None
    assert (r3.account, r3.user, r3.workspace, r3.model, r3.kind) == (
        "default",
        "alice",
        "ws-a",
        MODEL,
        "realtime",
    )
    assert (r3.input_tokens, r3.output_tokens, r3.free_tokens) == (103, 10, 113)
    assert (r3.billable_input_tokens, r3.billable_output_tokens) == (0, 0)
    assert (r3.cost, r3.currency, r3.cost_type) == (Decimal(0), "CNY", "free_quota")
    r2 = records[2]
    assert (r2.kind, r2.cost_type, r2.free_tokens) == ("batch", "pay_as_you_go", 0)
    assert records[0].workspace is None


def test_record_filters(populated: qg.QuotaGuard) -> None:
    g = populated
    assert ids(g.records(model=MODEL)) == ["r0", "r2", "r3", "r6"]
    assert ids(g.records(model="qwen-plus")) == ["r1", "r4"]
    assert ids(g.records(user="alice")) == ["r2", "r3"]
    assert ids(g.records(user="root")) == ["r0", "r1"]
    assert ids(g.records(workspace="ws-b")) == ["r4", "r6"]
    assert ids(g.records(kind="batch")) == ["r2"]
    assert ids(g.records(kind="realtime", model=MODEL, user="bob")) == ["r6"]
    assert g.records(model="qwen-turbo") == []
    assert g.records(workspace="nowhere") == []
    # since is inclusive, until exclusive.
    since = START + dt.timedelta(hours=2)
    until = START + dt.timedelta(hours=4)
    assert ids(g.records(since=since)) == ["r2", "r3", "r4", "r6"]
    assert ids(g.records(until=until)) == ["r0", "r1", "r2", "r3"]
    assert ids(g.records(since=since, until=until)) == ["r2", "r3"]
    assert ids(g.records(since=since.isoformat(), until=until.astimezone(UTC))) == ["r2", "r3"]
    assert ids(g.records(limit=3)) == ["r0", "r1", "r2"]
    assert ids(g.records(model=MODEL, limit=2)) == ["r0", "r2"]
    assert g.records(limit=0) == []
    # Another account on the same ledger keeps its own records.
    other = qg.QuotaGuard(g.ledger, account="acme")
    assert ids(other.records()) == ["x5"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": "weekly"}, ValueError),
        ({"since": dt.datetime(2026, 1, 1)}, ValueError),  # naive: UTC or CST?
        ({"until": "yesterday"}, ValueError),
        ({"limit": -1}, ValueError),
        ({"limit": 1.5}, ValueError),
    ],
)
def test_bad_record_filters(
    populated: qg.QuotaGuard, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        populated.records(**kwargs)


# ---- export --------------------------------------------------------------------------


@pytest.fixture
def varied(clock: Clock, tmp_path: Path) -> qg.QuotaGuard:
    """Records with every kind of value: None and set, free, split, unpriced, cached."""
    g = qg.QuotaGuard(tmp_path / "export.db", clock=clock, workspace="team-1")
    plain = qg.QuotaGuard(g.ledger, clock=clock, user="ram-user")
    g.grant(MODEL, tokens=1_500)
    g.reserve(MODEL, 1_000, 100).settle(1_000, 100, "req-1", cached_tokens=300)
    clock.advance(seconds=0.25)
    g.reserve(MODEL, 1_000, 100).settle(1_000, 100)  # split
    clock.advance(minutes=7)
    plain.reserve("qwen-plus", 200_000, 500, kind="batch").settle(200_000, 500, "req,3")
    clock.advance(hours=20)
    g.reserve("my-finetune", 10, 10).settle(10, 5, 'quote"4', thinking=True)  # unpriced
    return g


def expected_rows(guard: qg.QuotaGuard, **filters: Any) -> list[dict[str, Any]]:
    return [qg.record_to_dict(r) for r in guard.records(**filters)]


def parse_text_row(row: dict[str, Any], *, empty_is_none: bool) -> dict[str, Any]:
    """A row read back from CSV or JSON Lines, in the types ``record_to_dict`` gives."""
    out = dict(row)
    out["time"] = dt.datetime.fromisoformat(row["time"])
    out["cost"] = None if row["cost"] in (None, "") else Decimal(row["cost"])
    for name in INT_FIELDS:
        out[name] = int(row[name])
    out["thinking"] = row["thinking"] in (True, "True")
    out["in_doubt"] = row["in_doubt"] in (True, "True")
    if empty_is_none:
        for name in ("workspace", "request_id"):
            out[name] = row[name] or None
    return out


def test_varied_records_cover_the_cases(varied: qg.QuotaGuard) -> None:
    types = [r.cost_type for r in varied.records()]
    assert types == ["free_quota", "split", "pay_as_you_go", "unpriced"]


def test_csv_export_round_trips(varied: qg.QuotaGuard, tmp_path: Path) -> None:
    path = tmp_path / "records.csv"
    assert varied.export(path) == 4
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        assert set(reader.fieldnames) == set(qg.record_to_dict(varied.records()[0]))
        rows = [parse_text_row(row, empty_is_none=True) for row in reader]
    assert rows == expected_rows(varied)


def test_jsonl_export_round_trips(varied: qg.QuotaGuard, tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    assert varied.export(str(path)) == 4
    lines = path.read_text(encoding="utf-8").splitlines()
    raw = [json.loads(line) for line in lines]
    # JSON keeps types: token counts are numbers, missing values null, money a string.
    assert all(isinstance(r["input_tokens"], int) for r in raw)
    assert raw[0]["workspace"] == "team-1"
    assert raw[2]["workspace"] is None
    assert raw[3]["cost"] is None
    assert all(r["cost"] is None or isinstance(r["cost"], str) for r in raw)
    rows = [parse_text_row(r, empty_is_none=False) for r in raw]
    assert rows == expected_rows(varied)


def test_export_with_filters(varied: qg.QuotaGuard, tmp_path: Path) -> None:
    path = tmp_path / "max.ndjson"
    assert varied.export(path, model=MODEL) == 2
    rows = [
        parse_text_row(json.loads(x), empty_is_none=False) for x in path.read_text().splitlines()
    ]
    assert rows == expected_rows(varied, model=MODEL)
    empty = tmp_path / "none.csv"
    assert varied.export(empty, user="nobody") == 0
    with empty.open(newline="", encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == []


def test_parquet_export_round_trips(varied: qg.QuotaGuard, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "records.parquet"
    assert varied.export(path) == 4
    rows = [parse_text_row(r, empty_is_none=False) for r in pq.read_table(path).to_pylist()]
    assert rows == expected_rows(varied)


def test_to_pandas(varied: qg.QuotaGuard) -> None:
    pd = pytest.importorskip("pandas")
    df = varied.to_pandas(model=MODEL)
    assert len(df) == 2
    assert list(df.columns) == list(qg.record_to_dict(varied.records()[0]))
    assert df["request_id"].iloc[0] == "req-1"
    assert pd.isna(df["request_id"].iloc[1])  # missing, however this pandas spells it
    assert list(df["cost"]) == [r.cost for r in varied.records(model=MODEL)]


@pytest.mark.parametrize("name", ["records.txt", "records", "records.csv.gz"])
def test_export_with_a_bad_suffix_is_refused(
    varied: qg.QuotaGuard, tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    with pytest.raises(ValueError, match=r"\.csv"):
        varied.export(path)
    assert not path.exists()


# ---- compaction -----------------------------------------------------------------------


def bill_key(bill: qg.Bill) -> tuple[Any, ...]:
    lines = [
        (
            li.model,
            li.calls,
            li.free_tokens,
            li.billable_input_tokens,
            li.billable_output_tokens,
            li.cost,
            li.unpriced_calls,
        )
        for li in bill.lines
    ]
    return (bill.period, bill.total, bill.currency, bill.charged_models, lines)


def stats_key(guard: qg.QuotaGuard) -> list[tuple[Any, ...]]:
    return [
        (s.hour, s.model, s.calls, s.refusals, s.failures, s.input_tokens, s.output_tokens)
        for s in guard.stats()
    ]


def test_compact_drops_old_records_and_keeps_bills_and_stats(ledger: str, clock: Clock) -> None:
    guard = qg.QuotaGuard(ledger, clock=clock)
    guard.grant(MODEL, tokens=300_000)
    models = [MODEL, "qwen-plus", "my-finetune"]
    clock.now = dt.datetime(2026, 1, 5, 9, 0, tzinfo=CST)
    for i in range(400):
        clock.advance(hours=6, minutes=i % 17)
        model = models[i % 3]
        r = guard.reserve(model, 1_000 + i, 500, kind="batch" if i % 7 == 0 else "realtime")
        if i % 11 == 0:
            r.release(failed=True)
        else:
            r.settle(1_000 + i, 100 + i)
    assert clock.now.astimezone(CST).month == 4
    months = ["2026-01", "2026-02", "2026-03", "2026-04"]
    days = sorted({r.time.astimezone(CST).date().isoformat() for r in guard.records()})
    bills = [bill_key(guard.bill(m)) for m in months]
    day_bills = [bill_key(guard.bill(day=d)) for d in days]
    stats = stats_key(guard)
    remaining = guard.remaining(MODEL)
    everything = guard.records()

    before = dt.datetime(2026, 2, 15, 0, 0, tzinfo=CST)
    old = [r for r in everything if r.time < before]
    assert 0 < len(old) < len(everything)
    assert guard.compact(before) == len(old)
    assert [r.id for r in guard.records()] == [r.id for r in everything if r.time >= before]
    assert guard.records(until=before) == []
    assert [bill_key(guard.bill(m)) for m in months] == bills
    assert [bill_key(guard.bill(day=d)) for d in days] == day_bills
    assert stats_key(guard) == stats
    assert guard.remaining(MODEL) == remaining
    assert guard.compact(before) == 0

    # Calls after compaction still add to the same totals.
    rec = guard.reserve("qwen-plus", 1_000, 0, kind="batch").settle(1_000, 0)
    assert rec.cost is not None
    assert guard.bill("2026-04").total == bills[3][1] + rec.cost
    assert bill_key(guard.bill("2026-01")) == bills[0]


def test_compact_needs_an_aware_time(guard: qg.QuotaGuard) -> None:
    with pytest.raises(ValueError, match="time zone"):
        guard.compact(dt.datetime(2026, 1, 1))
