"""R7, R11, R13, R14: what calls cost, how bills add up, and call statistics.

Unless a test says otherwise the account is verified and no free quota is granted,
so every token is billed pay-as-you-go at the catalogue's China-site prices.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock
from hypothesis import given, settings
from hypothesis import strategies as st

import quotaguard as qg

UTC = dt.timezone.utc
CST = dt.timezone(dt.timedelta(hours=8), "CST")
START = dt.datetime(2026, 1, 10, 10, 0, tzinfo=CST)
UNPRICED = "my-finetune"


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def guard(clock: Clock) -> qg.QuotaGuard:
    return qg.QuotaGuard("memory://", clock=clock)


@pytest.fixture(params=["memory", "sqlite"])
def any_guard(request: pytest.FixtureRequest, clock: Clock, tmp_path: Path) -> qg.QuotaGuard:
    ledger = "memory://" if request.param == "memory" else str(tmp_path / "ledger.db")
    return qg.QuotaGuard(ledger, clock=clock)


def per_million(tokens: int, price: str | Decimal) -> Decimal:
    """The exact cost of ``tokens`` at ``price`` per million tokens."""
    return (tokens * Decimal(price)).scaleb(-6)


def call(
    guard: qg.QuotaGuard,
    model: str,
    input_tokens: int,
    output_tokens: int,
    *,
    kind: str = "realtime",
    cached: int | None = None,
    thinking: bool = False,
    max_output: int | None = None,
) -> qg.UsageRecord:
    """One reserve + settle pair."""
    r = guard.reserve(
        model, input_tokens, output_tokens if max_output is None else max_output, kind=kind
    )
    return r.settle(input_tokens, output_tokens, cached_tokens=cached, thinking=thinking)


def cost_of(rec: qg.UsageRecord) -> Decimal:
    """A priced record's cost."""
    assert rec.cost is not None, rec
    return rec.cost


def reference_cost(prices: dict[str, Any], rec: qg.UsageRecord) -> Decimal | None:
    """R13 recomputed in Python from the catalogue, independently of the core.

    ``prices`` is the model's price table for the guard's site (``None``: unpriced)."""
    if rec.billable_input_tokens + rec.billable_output_tokens == 0:
        return Decimal(0)
    if prices is None:
        return None
    tier = next(t for t in prices["tiers"] if t["up_to"] is None or rec.input_tokens <= t["up_to"])
    out_price = tier["output"]
    if rec.thinking and tier["thinking_output"] is not None:
        out_price = tier["thinking_output"]
    if rec.kind == "batch":  # batch and cache discounts do not stack
        full = per_million(rec.billable_input_tokens, tier["input"]) + per_million(
            rec.billable_output_tokens, out_price
        )
        return full * prices["batch_percent"] / 100
    # Free quota covers cached input first, so only cache hits beyond it are billed cheaply.
    free_input = rec.input_tokens - rec.billable_input_tokens
    cached = min(max(rec.cached_tokens - free_input, 0), rec.billable_input_tokens)
    cached_price = tier["input"] * prices["cache_hit_percent"] / 100
    return (
        per_million(rec.billable_input_tokens - cached, tier["input"])
        + per_million(cached, cached_price)
        + per_million(rec.billable_output_tokens, out_price)
    )


HOME_REGION = {"china": "cn-beijing", "international": "ap-southeast-1"}


def site_prices(guard: qg.QuotaGuard, model: str) -> Any:
    """The model's prices for the guard's site in the region it calls (R13)."""
    info = guard.catalog_info()["models"].get(model)
    table = None if info is None else info["prices"].get(guard.site)
    if table is None or guard.region == HOME_REGION[guard.site]:
        return table
    return table["regions"].get(guard.region)


@pytest.fixture
def qg_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="quotaguard"):
        yield caplog


# ---- R13: prices ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_input", "input_price", "output_price"),
    [
        (128_000, "0.8", "2"),  # exactly 128K (K = 1,000): still the first tier
        (128_001, "2.4", "20"),
        (130_000, "2.4", "20"),  # past 128K, though below 128 x 1,024
        (256_000, "2.4", "20"),  # exactly 256K: still the second tier
        (256_001, "4.8", "48"),
    ],
)
def test_tier_boundary_sets_input_and_output_price(
    any_guard: qg.QuotaGuard, request_input: int, input_price: str, output_price: str
) -> None:
    rec = call(any_guard, "qwen-plus", request_input, 1_000)
    assert rec.cost_type == "pay_as_you_go"
    assert rec.free_tokens == 0
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (request_input, 1_000)
    assert rec.cost == per_million(request_input, input_price) + per_million(1_000, output_price)
    assert rec.currency == "CNY"


def test_tier_is_chosen_by_the_whole_request_not_its_billable_part(
    guard: qg.QuotaGuard,
) -> None:
    guard.grant("qwen-plus", tokens=100_000)
    rec = call(guard, "qwen-plus", 150_000, 1_000)
    assert rec.cost_type == "split"
    assert rec.free_tokens == 100_000
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (50_000, 1_000)
    # 150,000 input tokens put the request in the second tier (> 128K).
    assert rec.cost == per_million(50_000, "2.4") + per_million(1_000, "20")


def test_thinking_mode_output_price(guard: qg.QuotaGuard) -> None:
    plain = call(guard, "qwen-plus", 1_000, 2_000)
    thinking = call(guard, "qwen-plus", 1_000, 2_000, thinking=True)
    assert plain.thinking is False and thinking.thinking is True
    assert plain.cost == per_million(1_000, "0.8") + per_million(2_000, "2")
    assert thinking.cost == per_million(1_000, "0.8") + per_million(2_000, "8")
    # Second tier: its own thinking price.
    big = call(guard, "qwen-plus", 200_000, 2_000, thinking=True)
    assert big.cost == per_million(200_000, "2.4") + per_million(2_000, "24")
    # A model without a separate thinking price charges its ordinary output price.
    qmax = call(guard, "qwen-max", 1_000, 2_000, thinking=True)
    assert qmax.cost == per_million(1_000, "2.4") + per_million(2_000, "9.6")


@pytest.mark.parametrize("thinking", [False, True])
def test_a_worst_case_settle_is_priced_as_the_call_was_held(
    any_guard: qg.QuotaGuard, thinking: bool
) -> None:
    # Regression: a thinking-mode stream cut off before its usage was settled at its
    # worst case priced as plain output, a quarter of what the hold had priced.
    r = any_guard.reserve("qwen-plus", 1_000, 2_000, thinking=thinking)
    assert r.thinking is thinking
    with any_guard.budget(cost=Decimal("1")) as b:
        pass
    rec = r.settle_worst_case(in_doubt=True)
    assert (rec.thinking, rec.in_doubt) == (thinking, True)
    out_price = "8" if thinking else "2"
    assert rec.cost == per_million(1_000, "0.8") + per_million(2_000, out_price)
    assert b.cost == 0  # opened after the hold: the call counts in no budget
    # And a budget that holds the call prices its worst case the same way.
    with any_guard.budget(cost=per_million(1_000, "0.8") + per_million(2_000, out_price)):
        held = any_guard.reserve("qwen-plus", 1_000, 2_000, thinking=thinking)
        assert held.settle_worst_case().cost == rec.cost
    with (
        any_guard.budget(
            cost=per_million(1_000, "0.8") + per_million(2_000, out_price) - Decimal("0.000001")
        ),
        pytest.raises(qg.BudgetExceeded),
    ):
        any_guard.reserve("qwen-plus", 1_000, 2_000, thinking=thinking)


def test_batch_costs_half_and_never_draws_on_free_quota(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=1_000_000)
    realtime_cost = per_million(10_000, "2.4") + per_million(3_000, "9.6")
    rec = call(guard, "qwen-max", 10_000, 3_000, kind="batch")
    assert rec.kind == "batch"
    assert rec.cost_type == "pay_as_you_go"
    assert rec.free_tokens == 0
    assert rec.cost == realtime_cost / 2
    assert guard.remaining("qwen-max") == 1_000_000  # R4


def test_cached_input_tokens_cost_a_fifth_of_the_input_price(guard: qg.QuotaGuard) -> None:
    rec = call(guard, "qwen-max", 1_000, 100, cached=400)
    assert rec.cached_tokens == 400
    assert rec.cost == (
        per_million(600, "2.4") + per_million(400, Decimal("2.4") / 5) + per_million(100, "9.6")
    )
    # A batch pays half the real-time price, with no cache discount on top (no stacking).
    batch = call(guard, "qwen-max", 1_000, 100, cached=400, kind="batch")
    assert batch.cost == (per_million(1_000, "2.4") + per_million(100, "9.6")) / 2


def test_cached_tokens_above_input_tokens_are_refused(guard: qg.QuotaGuard) -> None:
    r = guard.reserve("qwen-max", 100, 100)
    with pytest.raises(ValueError, match="cached_tokens 101"):
        r.settle(100, 10, cached_tokens=101)
    # Nothing was recorded; the reservation can still be settled.
    assert guard.records() == []
    assert r.settle(100, 10, cached_tokens=100).cached_tokens == 100


def test_split_call_costs_only_its_billable_part_output_side(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=1_000)
    rec = call(guard, "qwen-max", 800, 500)
    # Free quota covers the input first (800), then 200 of the output.
    assert rec.cost_type == "split"
    assert rec.free_tokens == 1_000
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (0, 300)
    assert rec.cost == per_million(300, "9.6")
    assert guard.remaining("qwen-max") == 0


def test_split_call_costs_only_its_billable_part_input_side(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=500)
    rec = call(guard, "qwen-max", 800, 200)
    assert rec.cost_type == "split"
    assert rec.free_tokens == 500
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (300, 200)
    assert rec.cost == per_million(300, "2.4") + per_million(200, "9.6")


def test_free_quota_covers_cached_input_first(guard: qg.QuotaGuard) -> None:
    # 600 of 800 input tokens were cache hits; 500 are free, so at least 100 billable
    # input tokens are cache hits: the bill never under-states.
    guard.grant("qwen-max", tokens=500)
    rec = call(guard, "qwen-max", 800, 0, cached=600, max_output=10)
    assert rec.billable_input_tokens == 300
    assert rec.cost == per_million(200, "2.4") + per_million(100, Decimal("2.4") / 5)


def test_call_inside_free_quota_costs_zero(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=10_000)
    rec = call(guard, "qwen-max", 800, 200)
    assert rec.cost_type == "free_quota"
    assert rec.cost == 0
    assert (rec.free_tokens, rec.billable_input_tokens, rec.billable_output_tokens) == (
        1_000,
        0,
        0,
    )


def test_unpriced_model_is_never_costed_at_zero(
    guard: qg.QuotaGuard, qg_log: pytest.LogCaptureFixture
) -> None:
    rec = call(guard, UNPRICED, 100, 50)
    assert rec.cost is None
    assert rec.cost_type == "unpriced"
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (100, 50)
    warnings = [r for r in qg_log.records if r.name == "quotaguard"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert UNPRICED in warnings[0].getMessage()
    call(guard, UNPRICED, 10, 5)
    priced = call(guard, "qwen-max", 1_000, 0, max_output=10)
    bill = guard.bill("2026-01")
    line = next(li for li in bill.lines if li.model == UNPRICED)
    assert (line.calls, line.unpriced_calls) == (2, 2)
    assert line.cost == 0
    assert (line.billable_input_tokens, line.billable_output_tokens) == (110, 55)
    assert line.billable_tokens == 165
    assert UNPRICED in bill.charged_models
    assert bill.total == priced.cost


def test_unpriced_model_inside_free_quota_is_free(
    guard: qg.QuotaGuard, qg_log: pytest.LogCaptureFixture
) -> None:
    guard.grant(UNPRICED, tokens=1_000)
    rec = call(guard, UNPRICED, 100, 50)
    assert rec.cost_type == "free_quota"
    assert rec.cost == 0
    assert not [r for r in qg_log.records if r.name == "quotaguard"]
    bill = guard.bill("2026-01")
    assert bill.lines[0].unpriced_calls == 0
    assert bill.charged_models == []


def test_catalogue_override_prices_a_model(clock: Clock, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        f'[models.{UNPRICED}.prices.china]\ncurrency = "CNY"\n'
        'tiers = [{ input = "1.5", output = "3" }]\n',
        encoding="utf-8",
    )
    guard = qg.QuotaGuard("memory://", clock=clock, catalog=catalog)
    rec = call(guard, UNPRICED, 1_000, 100)
    assert rec.cost_type == "pay_as_you_go"
    assert rec.cost == per_million(1_000, "1.5") + per_million(100, "3")


def test_international_site_bills_in_usd(clock: Clock) -> None:
    guard = qg.QuotaGuard("memory://", clock=clock, site="international", region="ap-southeast-1")
    assert guard.currency == "USD"
    rec = call(guard, "qwen-max", 1_000, 10)
    assert rec.currency == "USD"
    assert rec.cost == per_million(1_000, "1.6") + per_million(10, "6.4")
    # The international qwen-plus tiers differ from the China site's.
    plus = call(guard, "qwen-plus", 200_000, 10)
    assert plus.cost == per_million(200_000, "0.4") + per_million(10, "1.2")
    bill = guard.bill("2026-01")
    assert bill.currency == "USD"
    assert {line.currency for line in bill.lines} == {"USD"}
    assert bill.total == cost_of(rec) + cost_of(plus)


def test_china_site_bills_in_cny(guard: qg.QuotaGuard) -> None:
    rec = call(guard, "qwen-max", 1_000, 10)
    assert guard.currency == rec.currency == "CNY"
    assert guard.bill("2026-01").currency == "CNY"


# ---- R14: bills -------------------------------------------------------------------


def test_bill_lines_and_charged_models(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-turbo", tokens=1_000_000)
    free = call(guard, "qwen-turbo", 5_000, 1_000)
    paid = call(guard, "qwen-max", 2_000, 500)
    paid2 = call(guard, "qwen-max", 1_000, 100, kind="batch")
    bill = guard.bill("2026-01")
    assert bill.period == "2026-01"
    assert [line.model for line in bill.lines] == ["qwen-max", "qwen-turbo"]
    qmax, turbo = bill.lines
    assert (qmax.calls, qmax.free_tokens, qmax.billable_input_tokens) == (2, 0, 3_000)
    assert qmax.billable_output_tokens == 600
    assert qmax.cost == cost_of(paid) + cost_of(paid2)
    assert (turbo.calls, turbo.free_tokens, turbo.billable_tokens) == (1, 6_000, 0)
    assert turbo.cost == 0
    assert free.cost == 0
    assert bill.charged_models == ["qwen-max"]
    assert bill.total == cost_of(paid) + cost_of(paid2)


def test_bill_of_a_day_follows_cst_midnight(guard: qg.QuotaGuard, clock: Clock) -> None:
    clock.now = dt.datetime(2026, 1, 10, 15, 59, 59, tzinfo=UTC)  # 23:59:59 CST on the 10th
    late = call(guard, "qwen-max", 1_000, 0, max_output=10)
    clock.now = dt.datetime(2026, 1, 10, 16, 0, tzinfo=UTC)  # 00:00 CST on the 11th
    early = call(guard, "qwen-max", 3_000, 0, max_output=10)
    clock.now = dt.datetime(2026, 1, 11, 0, 30, tzinfo=UTC)  # 08:30 CST, still the 11th
    morning = call(guard, "qwen-max", 5_000, 0, max_output=10)
    day10 = guard.bill(day="2026-01-10")
    day11 = guard.bill(day="2026-01-11")
    assert day10.period == "2026-01-10"
    assert (day10.total, day10.lines[0].calls) == (late.cost, 1)
    assert day11.total == cost_of(early) + cost_of(morning)
    assert day11.lines[0].calls == 2
    assert guard.bill(day="2026-01-12").lines == []
    assert guard.bill(day="2026-01-12").total == 0


def test_month_bill_follows_cst_and_defaults_to_this_month(
    guard: qg.QuotaGuard, clock: Clock
) -> None:
    clock.now = dt.datetime(2026, 1, 31, 15, 59, tzinfo=UTC)  # 23:59 CST, January
    jan = call(guard, "qwen-max", 1_000, 0, max_output=10)
    clock.now = dt.datetime(2026, 1, 31, 16, 0, tzinfo=UTC)  # 00:00 CST, February
    feb = call(guard, "qwen-max", 2_000, 0, max_output=10)
    assert guard.bill("2026-01").total == jan.cost
    assert guard.bill("2026-02").total == feb.cost
    this_month = guard.bill()
    assert this_month.period == "2026-02"
    assert this_month.total == feb.cost


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"month": "2026-13"}, "2026-13"),
        ({"month": "January"}, "January"),
        ({"day": "2026-02-30"}, "2026-02-30"),
        ({"month": "2026-01", "day": "2026-01-10"}, "not both"),
    ],
)
def test_bad_bill_periods(guard: qg.QuotaGuard, kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        guard.bill(**kwargs)


MODELS = ["qwen-max", "qwen-plus", "qwen-turbo", "qwen3-coder-plus", "qwen-flash", UNPRICED]


def check_record(guard: qg.QuotaGuard, rec: qg.UsageRecord, expected_free: int) -> None:
    """A record's split and cost, recomputed independently (R6, R11, R13)."""
    assert rec.free_tokens == expected_free
    free_in = min(expected_free, rec.input_tokens)
    assert rec.billable_input_tokens == rec.input_tokens - free_in
    assert rec.billable_output_tokens == rec.output_tokens - (expected_free - free_in)
    assert rec.cost == reference_cost(site_prices(guard, rec.model), rec)
    billable = rec.billable_input_tokens + rec.billable_output_tokens
    if billable == 0:
        assert rec.cost_type == "free_quota"
    elif site_prices(guard, rec.model) is None:
        assert rec.cost_type == "unpriced"
    else:
        assert rec.cost_type == ("split" if expected_free else "pay_as_you_go")


def assert_bill_matches(bill: qg.Bill, records: list[qg.UsageRecord]) -> None:
    """A bill equals the sums of its records, to the last minor unit."""
    by_model: dict[str, list[qg.UsageRecord]] = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    assert [line.model for line in bill.lines] == sorted(by_model)
    assert bill.total == sum((r.cost for r in records if r.cost is not None), Decimal(0))
    for line in bill.lines:
        rs = by_model[line.model]
        assert line.calls == len(rs)
        assert line.free_tokens == sum(r.free_tokens for r in rs)
        assert line.billable_input_tokens == sum(r.billable_input_tokens for r in rs)
        assert line.billable_output_tokens == sum(r.billable_output_tokens for r in rs)
        assert line.cost == sum((r.cost for r in rs if r.cost is not None), Decimal(0))
        assert line.unpriced_calls == sum(r.cost_type == "unpriced" for r in rs)
    assert bill.charged_models == [
        line.model for line in bill.lines if line.cost > 0 or line.unpriced_calls > 0
    ]


def random_call(rng: random.Random) -> dict[str, Any]:
    input_tokens = rng.choice([rng.randint(0, 2_000), rng.randint(0, 300_000)])
    output_tokens = rng.randint(0, 4_000)
    return {
        "model": rng.choice(MODELS),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "kind": rng.choice(["realtime"] * 4 + ["batch"]),
        "cached": rng.choice([None, rng.randint(0, input_tokens)]),
        "thinking": rng.random() < 0.2,
        # Now and then the service reports more than was reserved (R9).
        "max_output": max(output_tokens - rng.choice([0, 0, 0, 50]), 0),
    }


@pytest.mark.timeout(300)
def test_bills_add_up_to_the_records_over_thousands_of_calls(clock: Clock, tmp_path: Path) -> None:
    rng = random.Random(20260110)
    clock.now = dt.datetime(2026, 1, 5, 9, 0, tzinfo=CST)
    guard = qg.QuotaGuard(tmp_path / "ledger.db", clock=clock)
    left: dict[str, int] = {}
    expires: dict[str, dt.datetime] = {}
    for model, tokens, days in [
        ("qwen-max", 2_000_000, 90),
        ("qwen-plus", 5_000_000, 30),
        ("qwen-turbo", 300_000, 90),
        (UNPRICED, 400_000, 60),
    ]:
        guard.grant(model, tokens=tokens, valid_days=days)
        left[model] = tokens
        expires[model] = clock.now + dt.timedelta(days=days)
    for _ in range(3_000):
        # ~3,000 calls spread over about three CST months, crossing midnights.
        clock.advance(seconds=rng.randint(1, 4_000))
        c = random_call(rng)
        model = c.pop("model")
        covered = c["kind"] == "realtime" and model in left and clock.now < expires[model]
        free = min(left[model], c["input_tokens"] + c["output_tokens"]) if covered else 0
        rec = call(guard, model, **c)
        check_record(guard, rec, free)
        if covered:
            left[model] -= free
    assert clock.now.astimezone(CST).month == 3
    records = guard.records()
    assert len(records) == 3_000
    months = ["2026-01", "2026-02", "2026-03"]
    by_month: dict[str, list[qg.UsageRecord]] = defaultdict(list)
    by_day: dict[str, list[qg.UsageRecord]] = defaultdict(list)
    for r in records:
        local = r.time.astimezone(CST)
        by_month[local.strftime("%Y-%m")].append(r)
        by_day[local.strftime("%Y-%m-%d")].append(r)
    assert sorted(by_month) == months
    for month in months:
        start = dt.datetime.strptime(month + "-01", "%Y-%m-%d").replace(tzinfo=CST)
        until = (start + dt.timedelta(days=32)).replace(day=1)
        in_month = guard.records(since=start, until=until)
        assert [r.id for r in in_month] == [r.id for r in by_month[month]]
        assert_bill_matches(guard.bill(month), in_month)
    assert len(by_day) > 60
    for day, rs in by_day.items():
        assert_bill_matches(guard.bill(day=day), rs)
    total = sum((guard.bill(m).total for m in months), Decimal(0))
    assert total == sum((r.cost for r in records if r.cost is not None), Decimal(0))
    assert total > 0


call_strategy = st.fixed_dictionaries(
    {
        "model": st.sampled_from(MODELS),
        "input_tokens": st.integers(0, 300_000),
        "output_tokens": st.integers(0, 40_000),
        "kind": st.sampled_from(["realtime", "batch"]),
        "cached_fraction": st.sampled_from([None, 0.0, 0.5, 1.0]),
        "thinking": st.booleans(),
        "hours": st.integers(0, 30),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(call_strategy, min_size=1, max_size=40),
    grants=st.dictionaries(st.sampled_from(MODELS), st.integers(0, 500_000), max_size=4),
    international=st.booleans(),
)
def test_property_bills_equal_record_sums(
    calls: list[dict[str, Any]], grants: dict[str, int], international: bool
) -> None:
    clock = Clock(dt.datetime(2026, 1, 30, 20, 0, tzinfo=CST))
    if international:
        guard = qg.QuotaGuard(
            "memory://", clock=clock, site="international", region="ap-southeast-1"
        )
    else:
        guard = qg.QuotaGuard("memory://", clock=clock)
    left = dict(grants)
    for model, tokens in grants.items():
        guard.grant(model, tokens=tokens)
    for c in calls:
        clock.advance(hours=c["hours"])
        fraction = c["cached_fraction"]
        cached = None if fraction is None else int(c["input_tokens"] * fraction)
        covered = c["kind"] == "realtime" and c["model"] in left
        total = c["input_tokens"] + c["output_tokens"]
        free = min(left[c["model"]], total) if covered else 0
        rec = call(
            guard,
            c["model"],
            c["input_tokens"],
            c["output_tokens"],
            kind=c["kind"],
            cached=cached,
            thinking=c["thinking"],
        )
        check_record(guard, rec, free)
        if covered:
            left[c["model"]] -= free
    records = guard.records()
    months = sorted({r.time.astimezone(CST).strftime("%Y-%m") for r in records})
    for month in months:
        in_month = [r for r in records if r.time.astimezone(CST).strftime("%Y-%m") == month]
        bill = guard.bill(month)
        assert bill.currency == ("USD" if international else "CNY")
        assert_bill_matches(bill, in_month)


# ---- R7: overdue from money ---------------------------------------------------------


def test_untracked_balance_never_makes_the_account_overdue(guard: qg.QuotaGuard) -> None:
    assert guard.balance is None
    call(guard, "qwen-max", 100_000, 10_000)
    assert guard.balance is None
    assert guard.overdue is False
    guard.reserve("qwen-max", 10, 10).release()


def test_pay_as_you_go_settle_below_zero_marks_overdue_and_top_up_clears_it(
    any_guard: qg.QuotaGuard,
) -> None:
    guard = any_guard
    guard.grant("qwen-turbo", tokens=1_000_000)
    assert guard.set_balance(Decimal("0.01")) == Decimal("0.01")
    # Free calls never touch the balance.
    call(guard, "qwen-turbo", 1_000, 1_000)
    assert guard.balance == Decimal("0.01")
    first = call(guard, "qwen-max", 1_000, 0, max_output=10)  # 0.0024
    assert guard.balance == Decimal("0.0076")
    assert guard.overdue is False
    second = call(guard, "qwen-max", 1_000, 500)  # 0.0024 + 0.0048 = 0.0072
    third = call(guard, "qwen-max", 1_000, 0, max_output=10)  # 0.0024 -> -0.002
    assert cost_of(first) + cost_of(second) + cost_of(third) == Decimal("0.012")
    assert guard.balance == Decimal("-0.002")
    assert guard.overdue is True
    # Every call is refused now, even to a model with free quota left (R7).
    with pytest.raises(qg.AccountOverdue) as info:
        guard.reserve("qwen-turbo", 10, 10)
    assert info.value.code == "Arrearage"
    assert isinstance(info.value, qg.FreeTierOnly)
    assert guard.remaining("qwen-turbo") == 1_000_000 - 2_000
    assert guard.top_up(Decimal("0.001")) == Decimal("-0.001")
    assert guard.overdue is True
    with pytest.raises(qg.AccountOverdue):
        guard.reserve("qwen-max", 10, 10)
    assert guard.top_up(Decimal("0.001")) == 0
    assert guard.overdue is False
    call(guard, "qwen-turbo", 10, 10)


def test_overdue_from_a_settle_is_seen_by_every_guard_on_the_ledger(
    clock: Clock, tmp_path: Path
) -> None:
    ledger = tmp_path / "shared.db"
    a = qg.QuotaGuard(ledger, clock=clock, user="alice")
    b = qg.QuotaGuard(ledger, clock=clock, user="bob")
    a.set_balance("0.001")
    held = b.reserve("qwen-max", 10, 10)  # admitted before the account went overdue
    call(a, "qwen-max", 1_000, 0, max_output=10)  # 0.0024 > 0.001
    assert b.overdue is True
    assert b.balance == Decimal("-0.0014")
    with pytest.raises(qg.AccountOverdue):
        b.reserve("qwen-max", 10, 10)
    # A call admitted earlier still settles truthfully and is charged.
    rec = held.settle(10, 10)
    assert rec.cost == per_million(10, "2.4") + per_million(10, "9.6")
    assert a.balance == Decimal("-0.0014") - rec.cost
    b.set_balance(0)
    assert a.overdue is False


def test_negative_stated_balance_is_overdue_and_topping_up_to_zero_clears(
    guard: qg.QuotaGuard,
) -> None:
    guard.set_balance(Decimal("-5"))
    assert guard.overdue is True
    with pytest.raises(qg.AccountOverdue):
        guard.reserve("qwen-max", 1, 1)
    guard.top_up(5)
    assert guard.balance == 0
    assert guard.overdue is False


# ---- R14: statistics ------------------------------------------------------------------


def test_stats_count_calls_refusals_failures_and_tokens_per_hour(clock: Clock) -> None:
    clock.now = dt.datetime(2026, 1, 10, 10, 15, tzinfo=UTC)
    guard = qg.QuotaGuard("memory://", clock=clock, verified=False)
    guard.grant("qwen-max", tokens=1_000)
    guard.grant("qwen-plus", tokens=1_000_000)
    guard.reserve("qwen-max", 100, 50).settle(80, 40)
    guard.reserve("qwen-max", 200, 100).settle(150, 60)
    with pytest.raises(qg.FreeTierOnly):
        guard.reserve("qwen-max", 600, 600)  # more than the 670 left: refused (R6)
    guard.reserve("qwen-max", 10, 10).release(failed=True)
    guard.reserve("qwen-max", 10, 10).release()  # not sent at all: not a failure
    guard.reserve("qwen-plus", 1_000, 100).settle(900, 90)
    clock.now = dt.datetime(2026, 1, 10, 11, 59, 59, tzinfo=UTC)
    guard.reserve("qwen-plus", 500, 100).settle(500, 7)
    guard.reserve("qwen-plus", 500, 100).release(failed=True)

    rows = guard.stats()
    summary = [
        (
            r.hour,
            r.model,
            r.calls,
            r.refusals,
            r.failures,
            r.input_tokens,
            r.output_tokens,
        )
        for r in rows
    ]
    ten = dt.datetime(2026, 1, 10, 10, tzinfo=UTC)
    eleven = dt.datetime(2026, 1, 10, 11, tzinfo=UTC)
    assert summary == [
        (ten, "qwen-max", 2, 1, 1, 230, 100),
        (ten, "qwen-plus", 1, 0, 0, 900, 90),
        (eleven, "qwen-plus", 1, 0, 1, 500, 7),
    ]
    assert rows[0].hour.tzinfo is not None
    assert [r.hour for r in guard.stats(model="qwen-max")] == [ten]
    assert [(r.hour, r.model) for r in guard.stats(since=eleven)] == [(eleven, "qwen-plus")]
    assert guard.stats(since=eleven + dt.timedelta(hours=1)) == []
    assert guard.stats(model="qwen-turbo") == []


def test_stats_refusals_include_overdue_refusals(guard: qg.QuotaGuard, clock: Clock) -> None:
    clock.now = dt.datetime(2026, 1, 10, 3, 5, tzinfo=UTC)
    guard.mark_overdue()
    for _ in range(3):
        with pytest.raises(qg.AccountOverdue):
            guard.reserve("qwen-max", 1, 1)
    (row,) = guard.stats()
    assert (row.model, row.calls, row.refusals, row.failures) == ("qwen-max", 0, 3, 0)
