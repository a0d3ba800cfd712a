"""The quota surface: grants, reservations, records and money (SPEC R1..R13)."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import pickle
import pydoc
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import CST, Clock

import quotaguard as qg
from quotaguard import AccountOverdue, FreeTierOnly, QuotaGuardError, _core

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)
CUTOVER = dt.datetime(2025, 9, 8, 11, 0, tzinfo=CST)
MILLION = 1_000_000

MakeGuard = Callable[..., qg.QuotaGuard]


def spend(
    guard: qg.QuotaGuard, model: str, input_tokens: int, output_tokens: int
) -> qg.UsageRecord:
    """One call that reserves exactly what it then uses."""
    return guard.reserve(model, input_tokens, output_tokens).settle(input_tokens, output_tokens)


def write_catalog(tmp_path: Path, text: str, name: str = "catalog.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- grant


def test_grant_uses_catalogue_defaults(any_guard: qg.QuotaGuard, clock: Clock) -> None:
    q = any_guard.grant("qwen-max")
    assert isinstance(q, qg.Quota)
    assert (q.model, q.total, q.used, q.reserved, q.remaining) == (
        "qwen-max",
        MILLION,
        0,
        0,
        MILLION,
    )
    assert q.activated_at == clock.now
    assert q.activated_at.tzinfo is not None
    assert q.expires_at == clock.now + 90 * DAY
    assert q.expired is False
    assert q.free_only is False
    assert q.fraction_left == 1.0
    assert any_guard.remaining("qwen-max") == MILLION


def test_grant_tokens_overrides_the_catalogue(any_guard: qg.QuotaGuard) -> None:
    q = any_guard.grant("qwen-max", tokens=100_000)
    assert (q.total, q.remaining) == (100_000, 100_000)


def test_grant_of_a_model_outside_the_catalogue_needs_tokens(guard: qg.QuotaGuard) -> None:
    with pytest.raises(ValueError, match="my-model"):
        guard.grant("my-model")
    assert guard.quotas() == []
    assert guard.grant("my-model", tokens=5_000).total == 5_000


def test_activated_at_accepts_aware_datetime_and_iso_string(make_guard: MakeGuard) -> None:
    when = dt.datetime(2025, 10, 1, 9, 30, tzinfo=CST)
    a = make_guard("memory://").grant("qwen-plus", activated_at=when)
    b = make_guard("memory://").grant("qwen-plus", activated_at="2025-10-01T09:30:00+08:00")
    c = make_guard("memory://").grant("qwen-plus", activated_at="2025-10-01T01:30:00Z")
    assert a.activated_at == b.activated_at == c.activated_at == when
    assert a.expires_at == b.expires_at == c.expires_at == when + 90 * DAY


@pytest.mark.parametrize("days", [30, 45, 90])
def test_valid_days_from_30_to_90(guard: qg.QuotaGuard, clock: Clock, days: int) -> None:
    q = guard.grant("qwen-max", valid_days=days)
    assert q.expires_at == clock.now + days * DAY


def test_regrant_corrects_the_grant_and_keeps_what_was_used(
    any_guard: qg.QuotaGuard, clock: Clock
) -> None:
    any_guard.grant("qwen-max")
    spend(any_guard, "qwen-max", 200, 100)
    later = clock.now - 10 * DAY
    q = any_guard.grant("qwen-max", tokens=500_000, activated_at=later, valid_days=60)
    assert (q.total, q.used, q.remaining) == (500_000, 300, 499_700)
    assert q.activated_at == later
    assert q.expires_at == later + 60 * DAY
    assert len(any_guard.records()) == 1


def test_regrant_keeps_the_free_only_switch(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max")
    guard.set_free_only("qwen-max")
    assert guard.grant("qwen-max", tokens=2_000).free_only is True


def test_remaining_subtracts_reservations_in_flight(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=10_000)
    r = any_guard.reserve("qwen-max", 1_000, 500)
    q = any_guard.quota("qwen-max")
    assert (q.used, q.reserved, q.remaining) == (0, 1_500, 8_500)
    assert any_guard.remaining("qwen-max") == 8_500
    assert q.fraction_left == pytest.approx(0.85)
    r.settle(900, 300)
    q = any_guard.quota("qwen-max")
    assert (q.used, q.reserved, q.remaining) == (1_200, 0, 8_800)


def test_quota_of_a_model_never_granted_is_zero(guard: qg.QuotaGuard) -> None:
    q = guard.quota("qwen-max")
    assert (q.total, q.used, q.reserved, q.remaining) == (0, 0, 0, 0)
    assert q.fraction_left == 0.0
    assert guard.remaining("qwen-max") == 0


def test_quotas_lists_every_granted_model(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    any_guard.grant("qwen-plus", tokens=100_000)
    spend(any_guard, "qwen-plus", 1_000, 0)
    by_model = {q.model: q for q in any_guard.quotas()}
    assert set(by_model) == {"qwen-max", "qwen-plus"}
    assert by_model["qwen-plus"].remaining == 99_000
    assert by_model["qwen-max"].remaining == MILLION
    assert by_model["qwen-plus"].console == "99,000/100,000"


# --------------------------------------------------------------------------- R1


def test_r1_root_and_ram_user_share_one_counter(make_guard: MakeGuard) -> None:
    root = make_guard(user="root")
    alice = make_guard(user="alice")
    root.grant("qwen-max", tokens=MILLION)
    spend(root, "qwen-max", 60_000, 40_000)
    spend(alice, "qwen-max", 150_000, 50_000)
    assert root.remaining("qwen-max") == 700_000
    assert alice.remaining("qwen-max") == 700_000
    assert sorted(r.user for r in root.records()) == ["alice", "root"]
    assert [r.free_tokens for r in alice.records(user="alice")] == [200_000]
    assert [r.free_tokens for r in alice.records(user="root")] == [100_000]


def test_memory_ledgers_are_private_to_their_guard(make_guard: MakeGuard) -> None:
    a = make_guard("memory://")
    b = make_guard("memory://")
    a.grant("qwen-max")
    spend(a, "qwen-max", 1, 1)
    assert b.quotas() == []
    assert b.records() == []


def test_r1_accounts_have_separate_quotas(make_guard: MakeGuard) -> None:
    a = make_guard(account="a")
    b = make_guard(account="b")
    a.grant("qwen-max", tokens=1_000)
    assert b.remaining("qwen-max") == 0
    spend(a, "qwen-max", 100, 0)
    assert a.remaining("qwen-max") == 900
    assert b.records() == []


# --------------------------------------------------------------------------- R2


def test_r2_china_site_has_free_quota_in_beijing_only(make_guard: MakeGuard) -> None:
    beijing = make_guard(region="cn-beijing")
    singapore = make_guard(region="ap-southeast-1")
    hangzhou = make_guard(region="cn-hangzhou")
    beijing.grant("qwen-max")
    assert beijing.remaining("qwen-max") == MILLION
    assert singapore.remaining("qwen-max") == 0
    assert hangzhou.quota("qwen-max").remaining == 0
    assert singapore.quota("qwen-max").total == MILLION  # granted, just not usable there


def test_r2_international_site_has_free_quota_in_singapore_only(make_guard: MakeGuard) -> None:
    singapore = make_guard(site="international", region="ap-southeast-1")
    beijing = make_guard(site="international", region="cn-beijing")
    singapore.grant("qwen-max")
    assert singapore.remaining("qwen-max") == MILLION
    assert beijing.remaining("qwen-max") == 0


def test_r2_a_call_outside_the_free_region_is_charged(
    make_guard: MakeGuard, tmp_path: Path
) -> None:
    beijing = make_guard(region="cn-beijing")
    beijing.grant("qwen-max")
    # R13: a China-site account calling Singapore pays Singapore's column, never
    # Beijing's; the bundled catalogue has none, so the call is unpriced, not free.
    singapore = make_guard(region="ap-southeast-1")
    rec = spend(singapore, "qwen-max", 1_000, 1_000)
    assert rec.free_tokens == 0
    assert (rec.cost_type, rec.cost) == ("unpriced", None)
    column = tmp_path / "singapore.toml"
    column.write_text(
        "[models.qwen-max.prices.china.regions.ap-southeast-1]\n"
        'tiers = [{ input = "10", output = "20" }]\n'  # a user's figures, for the test
    )
    priced = make_guard(region="ap-southeast-1", catalog=column)
    rec = spend(priced, "qwen-max", 1_000, 1_000)
    assert (rec.cost_type, rec.currency) == ("pay_as_you_go", "CNY")
    assert rec.cost == Decimal("0.03")  # 1,000 x 10 + 1,000 x 20 per million
    assert beijing.remaining("qwen-max") == MILLION
    assert spend(beijing, "qwen-max", 1_000, 1_000).free_tokens == 2_000


def test_r2_outside_the_free_region_enabling_free_only_is_refused(make_guard: MakeGuard) -> None:
    make_guard(region="cn-beijing").grant("qwen-max")
    singapore = make_guard(region="ap-southeast-1")
    with pytest.raises(QuotaGuardError, match="qwen-max"):
        singapore.set_free_only("qwen-max")


def test_r2_outside_the_free_region_unverified_is_refused(make_guard: MakeGuard) -> None:
    make_guard(region="cn-beijing").grant("qwen-max")
    singapore = make_guard(region="ap-southeast-1", verified=False)
    with pytest.raises(FreeTierOnly) as e:
        singapore.reserve("qwen-max", 10, 10)
    assert e.value.reason == "unverified"
    assert e.value.remaining == 0


@pytest.mark.parametrize("region", ["mars-1", "cn-beijingg", "", "CN-BEIJING"])
def test_r2_unknown_region_is_a_value_error_naming_it(region: str) -> None:
    with pytest.raises(ValueError, match=f'"{region}"'):
        qg.QuotaGuard("memory://", region=region)


def test_r2_unknown_site_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match='"moon"'):
        qg.QuotaGuard("memory://", site="moon")


# --------------------------------------------------------------------------- R3


@pytest.fixture
def catalog_30_days(tmp_path: Path) -> Path:
    """qwen-plus valid 30 days under the catalogue (before the cut-over)."""
    return write_catalog(tmp_path, "[models.qwen-plus]\nvalid_days = 30\n")


@pytest.mark.parametrize(
    ("activated", "days"),
    [
        (CUTOVER - dt.timedelta(milliseconds=1), 30),
        (CUTOVER - 100 * DAY, 30),
        (CUTOVER, 90),
        ("2025-09-08T03:00:00Z", 90),
        (CUTOVER + dt.timedelta(milliseconds=1), 90),
        ("2025-09-08T10:59:59+08:00", 30),
    ],
)
def test_r3_validity_follows_the_cutover(
    make_guard: MakeGuard,
    catalog_30_days: Path,
    activated: dt.datetime | str,
    days: int,
) -> None:
    guard = make_guard("memory://", catalog=catalog_30_days)
    q = guard.grant("qwen-plus", activated_at=activated)
    assert q.expires_at - q.activated_at == days * DAY


def test_r3_stated_days_override_either_default(
    make_guard: MakeGuard, catalog_30_days: Path
) -> None:
    guard = make_guard("memory://", catalog=catalog_30_days)
    before = guard.grant("qwen-plus", activated_at=CUTOVER - DAY, valid_days=60)
    assert before.expires_at == CUTOVER - DAY + 60 * DAY
    after = guard.grant("qwen-max", activated_at=CUTOVER + DAY, valid_days=45)
    assert after.expires_at == CUTOVER + DAY + 45 * DAY


def test_r3_expired_quota_is_zero_and_reported_expired(
    any_guard: qg.QuotaGuard, clock: Clock
) -> None:
    any_guard.grant("qwen-max", valid_days=30)
    spend(any_guard, "qwen-max", 1_000, 0)
    expires = any_guard.quota("qwen-max").expires_at
    clock.set(expires - dt.timedelta(seconds=1))
    assert any_guard.remaining("qwen-max") == MILLION - 1_000
    assert any_guard.quota("qwen-max").expired is False
    clock.set(expires)
    q = any_guard.quota("qwen-max")
    assert q.expired is True
    assert q.remaining == 0
    # Expired, not used: the used count is what calls consumed.
    assert (q.total, q.used) == (MILLION, 1_000)
    assert any_guard.remaining("qwen-max") == 0


def test_r3_expiry_refuses_with_reason_expired(any_guard: qg.QuotaGuard, clock: Clock) -> None:
    any_guard.grant("qwen-max", valid_days=30)
    any_guard.set_free_only("qwen-max")
    clock.advance(31 * 86_400)
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve("qwen-max", 10, 10)
    assert e.value.reason == "expired"
    assert e.value.model == "qwen-max"
    assert e.value.remaining == 0
    assert e.value.requested == 20
    assert "expired" in str(e.value)
    assert any_guard.records() == []


def test_r3_expired_quota_cannot_switch_free_only_on(guard: qg.QuotaGuard, clock: Clock) -> None:
    guard.grant("qwen-max", valid_days=30)
    clock.advance(30 * 86_400)
    with pytest.raises(QuotaGuardError, match="qwen-max"):
        guard.set_free_only("qwen-max")
    assert guard.quota("qwen-max").free_only is False


def test_r3_regrant_revives_an_expired_quota(guard: qg.QuotaGuard, clock: Clock) -> None:
    guard.grant("qwen-max", valid_days=30)
    spend(guard, "qwen-max", 500, 0)
    clock.advance(40 * 86_400)
    assert guard.remaining("qwen-max") == 0
    q = guard.grant("qwen-max", activated_at=clock.now)
    assert (q.expired, q.used, q.remaining) == (False, 500, MILLION - 500)


# --------------------------------------------------------------------------- R4


@pytest.mark.parametrize("kind", ["batch", "custom"])
def test_r4_batch_and_custom_are_refused_under_free_only(
    any_guard: qg.QuotaGuard, kind: str
) -> None:
    any_guard.grant("qwen-max")
    any_guard.set_free_only("qwen-max")
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve("qwen-max", 10, 10, kind=kind)
    assert e.value.reason == "not_covered"
    assert any_guard.remaining("qwen-max") == MILLION


@pytest.mark.parametrize(
    ("kind", "cost"),
    [("batch", Decimal("0.006")), ("custom", Decimal("0.012")), ("realtime", Decimal(0))],
)
def test_r4_batch_and_custom_are_always_charged(
    any_guard: qg.QuotaGuard, kind: str, cost: Decimal
) -> None:
    any_guard.grant("qwen-max")
    r = any_guard.reserve("qwen-max", 1_000, 1_000, kind=kind)
    assert r.kind == kind
    rec = r.settle(1_000, 1_000)
    assert rec.kind == kind
    assert rec.cost == cost
    if kind == "realtime":
        assert (rec.free_tokens, rec.cost_type) == (2_000, "free_quota")
        assert any_guard.remaining("qwen-max") == MILLION - 2_000
    else:
        assert (rec.free_tokens, rec.cost_type) == (0, "pay_as_you_go")
        assert (rec.billable_input_tokens, rec.billable_output_tokens) == (1_000, 1_000)
        assert any_guard.remaining("qwen-max") == MILLION


def test_r4_unknown_kind_is_a_value_error(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max")
    with pytest.raises(ValueError, match='"stream"'):
        guard.reserve("qwen-max", 1, 1, kind="stream")
    assert guard.quota("qwen-max").reserved == 0


# --------------------------------------------------------------------------- R5


def test_r5_free_only_is_off_by_default_and_enables_for_one_model(
    any_guard: qg.QuotaGuard,
) -> None:
    any_guard.grant("qwen-max")
    any_guard.grant("qwen-plus")
    assert any_guard.quota("qwen-max").free_only is False
    assert any_guard.set_free_only("qwen-max") == ["qwen-max"]
    assert any_guard.quota("qwen-max").free_only is True
    assert any_guard.quota("qwen-plus").free_only is False


def test_r5_batch_enable_for_a_list(any_guard: qg.QuotaGuard) -> None:
    for m in ("qwen-max", "qwen-plus", "qwen-turbo"):
        any_guard.grant(m)
    assert sorted(any_guard.set_free_only(["qwen-max", "qwen-plus"])) == ["qwen-max", "qwen-plus"]
    flags = {q.model: q.free_only for q in any_guard.quotas()}
    assert flags == {"qwen-max": True, "qwen-plus": True, "qwen-turbo": False}


def test_r5_enable_for_all_eligible_unconfigured(any_guard: qg.QuotaGuard) -> None:
    # qwen-max: configured by the user and now off again; it must stay off.
    any_guard.grant("qwen-max", tokens=100)
    any_guard.set_free_only("qwen-max")
    spend(any_guard, "qwen-max", 100, 0)
    any_guard.set_free_only("qwen-max", enabled=False)
    any_guard.grant("qwen-max", tokens=1_000)
    # qwen-turbo: used up, so not eligible.
    any_guard.grant("qwen-turbo")
    any_guard.sync("qwen-turbo", "0/1,000,000")
    # qwen-plus, qwen-flash: eligible and unconfigured.
    any_guard.grant("qwen-plus")
    any_guard.grant("qwen-flash")
    changed = any_guard.set_free_only("all")
    assert sorted(changed) == ["qwen-flash", "qwen-plus"]
    flags = {q.model: q.free_only for q in any_guard.quotas()}
    assert flags == {
        "qwen-max": False,
        "qwen-turbo": False,
        "qwen-plus": True,
        "qwen-flash": True,
    }
    assert any_guard.set_free_only("all") == []


def test_r5_all_only_enables(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max")
    guard.set_free_only("qwen-max")
    with pytest.raises(ValueError, match='"all"'):
        guard.set_free_only("all", enabled=False)
    assert guard.quota("qwen-max").free_only is True


def test_r5_enable_is_refused_without_free_quota(any_guard: qg.QuotaGuard) -> None:
    with pytest.raises(QuotaGuardError, match="qwen-max") as e:
        any_guard.set_free_only("qwen-max")  # never granted
    assert not isinstance(e.value, FreeTierOnly)
    any_guard.grant("qwen-plus", tokens=100)
    spend(any_guard, "qwen-plus", 60, 40)  # used up
    with pytest.raises(QuotaGuardError, match="qwen-plus"):
        any_guard.set_free_only("qwen-plus")
    assert any_guard.quota("qwen-plus").free_only is False


def test_r5_a_refused_batch_change_changes_nothing(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    with pytest.raises(QuotaGuardError, match="qwen-plus"):
        any_guard.set_free_only(["qwen-max", "qwen-plus"])
    assert any_guard.quota("qwen-max").free_only is False


def test_r5_disable_is_refused_while_quota_is_left(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    with pytest.raises(QuotaGuardError, match="qwen-max") as e:
        any_guard.set_free_only("qwen-max", enabled=False)
    assert "1000" in str(e.value).replace(",", "")
    assert any_guard.quota("qwen-max").free_only is True
    spend(any_guard, "qwen-max", 1_000, 0)
    assert any_guard.set_free_only("qwen-max", enabled=False) == ["qwen-max"]
    assert any_guard.quota("qwen-max").free_only is False


def test_r5_disable_is_refused_while_quota_is_only_reserved(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    r = any_guard.reserve("qwen-max", 500, 500)
    try:
        with pytest.raises(QuotaGuardError):
            any_guard.set_free_only("qwen-max", enabled=False)
    finally:
        r.release()
    assert any_guard.quota("qwen-max").free_only is True


def test_r5_enable_is_allowed_while_quota_is_only_reserved(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    r = any_guard.reserve("qwen-max", 500, 500)
    try:
        assert any_guard.set_free_only("qwen-max") == ["qwen-max"]
    finally:
        r.release()


def test_r5_free_only_models_must_be_names(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max")
    with pytest.raises(TypeError):
        guard.set_free_only(["qwen-max", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        guard.set_free_only(42)  # type: ignore[arg-type]
    assert guard.quota("qwen-max").free_only is False


# --------------------------------------------------------------------------- R6


def test_r6_unverified_account_is_refused_a_chargeable_call(make_guard: MakeGuard) -> None:
    guard = make_guard("memory://", verified=False)
    guard.grant("qwen-max", tokens=1_000)
    ok = spend(guard, "qwen-max", 600, 400)  # fits: free
    assert ok.cost_type == "free_quota"
    guard.grant("qwen-max", tokens=2_000)
    with pytest.raises(FreeTierOnly) as e:
        guard.reserve("qwen-max", 600, 500)
    assert e.value.reason == "unverified"
    assert e.value.code == "AllocationQuota.FreeTierOnly"
    assert (e.value.remaining, e.value.requested) == (1_000, 1_100)
    assert "identity-verified" in str(e.value)
    with pytest.raises(FreeTierOnly) as e:
        guard.reserve("qwen-plus", 1, 1)  # no quota at all
    assert e.value.reason == "unverified"
    assert len(guard.records()) == 1
    assert guard.remaining("qwen-max") == 1_000


def test_r6_switch_on_refuses_a_chargeable_call(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve("qwen-max", 800, 201)
    assert e.value.reason == "exhausted"
    assert (e.value.remaining, e.value.requested) == (1_000, 1_001)
    assert any_guard.quota("qwen-max").reserved == 0
    assert any_guard.records() == []


def test_r6_switch_off_charges_pay_as_you_go(any_guard: qg.QuotaGuard) -> None:
    rec = spend(any_guard, "qwen-max", 1_000, 500)  # no free quota at all
    assert rec.cost_type == "pay_as_you_go"
    assert rec.free_tokens == 0
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (1_000, 500)
    # 1,000 x 2.4 + 500 x 9.6 per million
    assert rec.cost == Decimal("0.0072")
    assert rec.currency == "CNY"


def test_r6_split_covers_input_first(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    rec = spend(any_guard, "qwen-max", 800, 500)
    assert rec.cost_type == "split"
    assert rec.free_tokens == 1_000
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (0, 300)
    assert rec.cost == Decimal("0.00288")  # 300 x 9.6 / 1e6
    assert any_guard.remaining("qwen-max") == 0


def test_r6_split_when_input_exceeds_what_is_left(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=500)
    rec = spend(any_guard, "qwen-max", 800, 200)
    assert rec.cost_type == "split"
    assert rec.free_tokens == 500
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (300, 200)
    assert rec.cost == Decimal("0.00264")  # 300 x 2.4 + 200 x 9.6, per million


# --------------------------------------------------------------------------- R7


def test_r7_overdue_refuses_every_call(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    assert any_guard.overdue is False
    any_guard.mark_overdue()
    assert any_guard.overdue is True
    for kind in ("realtime", "batch"):
        with pytest.raises(AccountOverdue) as e:
            any_guard.reserve("qwen-max", 10, 10, kind=kind)
        assert e.value.code == "Arrearage"
        assert e.value.reason == "overdue"
        assert e.value.model == "qwen-max"
        assert isinstance(e.value, FreeTierOnly)
    assert any_guard.remaining("qwen-max") == MILLION
    assert any_guard.records() == []


def test_r7_top_up_clears_overdue(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    any_guard.mark_overdue()
    assert any_guard.top_up(Decimal("10.50")) == Decimal("10.5")
    assert any_guard.balance == Decimal("10.5")
    assert any_guard.overdue is False
    spend(any_guard, "qwen-max", 10, 10)


def test_r7_set_balance_clears_or_sets_overdue(any_guard: qg.QuotaGuard) -> None:
    any_guard.mark_overdue()
    any_guard.set_balance(0)
    assert (any_guard.balance, any_guard.overdue) == (Decimal(0), False)
    any_guard.set_balance("-5")
    assert (any_guard.balance, any_guard.overdue) == (Decimal(-5), True)
    any_guard.top_up(2)
    assert (any_guard.balance, any_guard.overdue) == (Decimal(-3), True)
    any_guard.top_up(3)
    assert (any_guard.balance, any_guard.overdue) == (Decimal(0), False)


def test_r7_charges_below_a_tracked_balance_make_the_account_overdue(
    any_guard: qg.QuotaGuard,
) -> None:
    any_guard.grant("qwen-plus")
    any_guard.set_balance(Decimal("0.005"))
    spend(any_guard, "qwen-max", 1_000, 0)  # 0.0024
    assert (any_guard.balance, any_guard.overdue) == (Decimal("0.0026"), False)
    spend(any_guard, "qwen-max", 1_000, 0)
    assert (any_guard.balance, any_guard.overdue) == (Decimal("0.0002"), False)
    spend(any_guard, "qwen-max", 1_000, 0)
    assert (any_guard.balance, any_guard.overdue) == (Decimal("-0.0022"), True)
    with pytest.raises(AccountOverdue):
        any_guard.reserve("qwen-plus", 1, 1)  # even with free quota left


def test_r7_free_calls_do_not_draw_on_the_balance(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    any_guard.set_balance(0)
    spend(any_guard, "qwen-max", 1_000, 1_000)
    assert (any_guard.balance, any_guard.overdue) == (Decimal(0), False)


def test_r7_an_untracked_balance_never_makes_the_account_overdue(
    any_guard: qg.QuotaGuard,
) -> None:
    assert any_guard.balance is None
    for _ in range(5):
        spend(any_guard, "qwen-max", 100_000, 8_000)
    assert any_guard.balance is None
    assert any_guard.overdue is False


def test_r7_overdue_is_shared_through_the_ledger(make_guard: MakeGuard) -> None:
    a = make_guard(user="root")
    b = make_guard(user="bob")
    a.grant("qwen-max")
    a.mark_overdue()
    assert b.overdue is True
    with pytest.raises(AccountOverdue):
        b.reserve("qwen-max", 1, 1)
    b.top_up(1)
    assert a.overdue is False


def test_r7_overdue_is_per_account(make_guard: MakeGuard) -> None:
    a = make_guard(account="a")
    b = make_guard(account="b")
    b.grant("qwen-max")
    a.mark_overdue()
    assert (a.overdue, b.overdue) == (True, False)
    spend(b, "qwen-max", 1, 1)


@pytest.mark.parametrize("amount", [0, -1, "-0.01"])
def test_r7_top_up_must_be_positive(guard: qg.QuotaGuard, amount: object) -> None:
    guard.set_balance(5)
    with pytest.raises(ValueError):
        guard.top_up(amount)  # type: ignore[arg-type]
    assert guard.balance == Decimal(5)


def test_r7_money_is_never_a_float(guard: qg.QuotaGuard) -> None:
    with pytest.raises(TypeError, match=r"0\.1"):
        guard.set_balance(0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float"):
        guard.top_up(1.5)  # type: ignore[arg-type]
    assert guard.balance is None


# --------------------------------------------------------------------------- R8


def test_r8_admission_is_by_worst_case(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve("qwen-max", 600, 401)
    assert (e.value.requested, e.value.remaining) == (1_001, 1_000)
    r = any_guard.reserve("qwen-max", 600, 400)  # exactly fits
    assert (r.worst_case, r.free_tokens) == (1_000, 1_000)
    assert any_guard.remaining("qwen-max") == 0
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve("qwen-max", 0, 1)
    assert (e.value.requested, e.value.remaining, e.value.reason) == (1, 0, "exhausted")
    r.release()
    assert any_guard.remaining("qwen-max") == 1_000
    assert any_guard.records() == []


def test_r8_settled_usage_below_worst_case_returns_the_rest(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    any_guard.reserve("qwen-max", 300, 700).settle(300, 100)
    assert any_guard.remaining("qwen-max") == 600
    any_guard.reserve("qwen-max", 100, 500).settle(100, 500)
    assert any_guard.remaining("qwen-max") == 0


def test_r8_refusal_counts_in_flight_reservations_of_other_guards(make_guard: MakeGuard) -> None:
    a = make_guard(user="a")
    b = make_guard(user="b")
    a.grant("qwen-max", tokens=1_000)
    a.set_free_only("qwen-max")
    held = a.reserve("qwen-max", 500, 200)
    with pytest.raises(FreeTierOnly) as e:
        b.reserve("qwen-max", 200, 101)
    assert e.value.remaining == 300
    b.reserve("qwen-max", 200, 100).release()
    held.release()


def test_r9_overrun_under_free_only_reports_used_up(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    rec = any_guard.reserve("qwen-max", 100, 100).settle(900, 300)  # more than reserved
    assert rec.free_tokens == 1_000
    assert (rec.billable_input_tokens, rec.billable_output_tokens) == (0, 200)
    assert rec.cost_type == "split"
    q = any_guard.quota("qwen-max")
    assert (q.used, q.remaining) == (1_000, 0)


def test_r9_an_overrun_takes_what_remained_and_leaves_the_model_used_up(
    any_guard: qg.QuotaGuard,
) -> None:
    # SPEC R9: past its reservation a call's record tells the truth: the service gave it
    # free tokens up to what remained (it knows nothing of our reservations), billed the
    # rest, and a model under R6 refusal is then used up. A call still in flight is then
    # billed by the service too, and its record says so.
    any_guard.grant("qwen-max", tokens=1_000)
    any_guard.set_free_only("qwen-max")
    a = any_guard.reserve("qwen-max", 300, 200)  # admitted: all 500 held from free quota
    b = any_guard.reserve("qwen-max", 100, 100)
    over = b.settle(900, 300)  # B overruns its 200-token worst case
    assert (over.free_tokens, over.billable_input_tokens, over.billable_output_tokens) == (
        1_000,
        0,
        200,
    )
    assert any_guard.remaining("qwen-max") == 0
    with pytest.raises(qg.FreeTierOnly):
        any_guard.reserve("qwen-max", 1, 1)
    rec = a.settle(300, 200)
    assert (rec.cost_type, rec.free_tokens) == ("pay_as_you_go", 0)
    q = any_guard.quota("qwen-max")
    assert q.used == sum(r.free_tokens for r in any_guard.records()) == 1_000


# --------------------------------------------------------------------------- R9


def test_r9_reservation_attributes(guard: qg.QuotaGuard, clock: Clock) -> None:
    guard.grant("qwen-max")
    r = guard.reserve("qwen-max", 120, 80)
    assert isinstance(r, qg.Reservation)
    assert (r.model, r.kind, r.input_tokens, r.max_output_tokens) == (
        "qwen-max",
        "realtime",
        120,
        80,
    )
    assert (r.worst_case, r.free_tokens, r.done) == (200, 200, False)
    assert r.expires_at == clock.now + dt.timedelta(seconds=600)
    r.release()
    assert r.done is True


def test_r9_with_block_exception_releases(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), any_guard.reserve("qwen-max", 300, 300) as r:
        assert any_guard.remaining("qwen-max") == 400
        raise Boom
    assert r.done is True
    assert any_guard.remaining("qwen-max") == 1_000
    assert any_guard.records() == []


def test_r9_with_block_keyboard_interrupt_releases(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    with pytest.raises(KeyboardInterrupt), any_guard.reserve("qwen-max", 300, 300):
        raise KeyboardInterrupt
    assert any_guard.quota("qwen-max").reserved == 0
    assert any_guard.records() == []


def test_r9_with_block_without_settle_settles_the_worst_case(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=10_000)
    with any_guard.reserve("qwen-max", 300, 700) as r:
        pass
    assert r.done is True
    [rec] = any_guard.records()
    assert (rec.input_tokens, rec.output_tokens, rec.free_tokens) == (300, 700, 1_000)
    assert any_guard.remaining("qwen-max") == 9_000


def test_r9_with_block_settled_inside_records_once(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=10_000)
    with any_guard.reserve("qwen-max", 300, 700) as r:
        r.settle(250, 50, request_id="req-7")
    [rec] = any_guard.records()
    assert (rec.input_tokens, rec.output_tokens, rec.request_id) == (250, 50, "req-7")
    assert any_guard.remaining("qwen-max") == 9_700


@pytest.mark.parametrize(
    ("first", "second"),
    [("settle", "settle"), ("release", "release"), ("settle", "release"), ("release", "settle")],
)
def test_r9_a_reservation_ends_once(any_guard: qg.QuotaGuard, first: str, second: str) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    r = any_guard.reserve("qwen-max", 100, 100)

    def end(how: str) -> None:
        if how == "settle":
            r.settle(50, 50)
        else:
            r.release()

    end(first)
    before = (any_guard.quota("qwen-max").used, len(any_guard.records()))
    with pytest.raises(QuotaGuardError, match="already settled or released"):
        end(second)
    assert (any_guard.quota("qwen-max").used, len(any_guard.records())) == before


def test_r9_lease_expiry_returns_the_tokens(make_guard: MakeGuard, clock: Clock) -> None:
    guard = make_guard(lease_seconds=30)
    guard.grant("qwen-max", tokens=1_000)
    guard.reserve("qwen-max", 400, 400)
    clock.advance(29)
    assert guard.remaining("qwen-max") == 200
    clock.advance(1)
    q = guard.quota("qwen-max")
    assert (q.reserved, q.remaining, q.used) == (0, 1_000, 0)


def test_r9_settle_after_the_lease_records_and_warns(make_guard: MakeGuard, clock: Clock) -> None:
    guard = make_guard(lease_seconds=30)
    guard.grant("qwen-max", tokens=1_000)
    r = guard.reserve("qwen-max", 400, 400)
    clock.advance(31)
    with pytest.warns(qg.LeaseExpiredWarning, match="lease"):
        rec = r.settle(300, 200)
    assert rec.free_tokens == 500
    assert guard.remaining("qwen-max") == 500
    assert [x.free_tokens for x in guard.records()] == [500]


def test_r9_default_lease_is_600_seconds(guard: qg.QuotaGuard, clock: Clock) -> None:
    assert guard.lease_seconds == 600
    guard.grant("qwen-max", tokens=1_000)
    guard.reserve("qwen-max", 100, 0)
    clock.advance(599)
    assert guard.remaining("qwen-max") == 900
    clock.advance(1)
    assert guard.remaining("qwen-max") == 1_000


def test_r9_a_refused_call_consumes_nothing(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=100)
    any_guard.set_free_only("qwen-max")
    for _ in range(3):
        with pytest.raises(FreeTierOnly):
            any_guard.reserve("qwen-max", 100, 1)
    q = any_guard.quota("qwen-max")
    assert (q.used, q.reserved, q.remaining) == (0, 0, 100)
    assert any_guard.records() == []


# --------------------------------------------------------------------------- R11


def test_r11_record_fields(make_guard: MakeGuard, clock: Clock) -> None:
    guard = make_guard(account="acme", user="bob", workspace="ws-1")
    guard.grant("qwen-max", tokens=1_000)
    rec = guard.reserve("qwen-max", 800, 500).settle(800, 400, request_id="req-42")
    [stored] = guard.records()
    for r in (rec, stored):
        assert r.time == clock.now
        assert r.time.tzinfo is not None
        assert (r.account, r.user, r.workspace) == ("acme", "bob", "ws-1")
        assert (r.model, r.kind, r.request_id) == ("qwen-max", "realtime", "req-42")
        assert (r.input_tokens, r.output_tokens) == (800, 400)
        assert (r.free_tokens, r.billable_input_tokens, r.billable_output_tokens) == (1_000, 0, 200)
        assert r.cost == Decimal("0.00192")
        assert isinstance(r.cost, Decimal)
        assert (r.currency, r.cost_type) == ("CNY", "split")
    row = qg.record_to_dict(stored)
    assert set(row) >= {
        "time",
        "account",
        "user",
        "workspace",
        "model",
        "kind",
        "request_id",
        "input_tokens",
        "output_tokens",
        "free_tokens",
        "billable_input_tokens",
        "billable_output_tokens",
        "cost",
        "currency",
        "cost_type",
    }


def test_r11_cost_types(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max", tokens=1_500)
    free = spend(any_guard, "qwen-max", 500, 500)
    split = spend(any_guard, "qwen-max", 400, 200)
    paid = spend(any_guard, "qwen-max", 100, 100)
    assert [r.cost_type for r in (free, split, paid)] == ["free_quota", "split", "pay_as_you_go"]
    assert free.cost == Decimal(0)
    assert split.cost == Decimal("0.00096")  # 100 output x 9.6 / 1e6
    assert paid.cost == Decimal("0.0012")
    stored = {r.id: r.cost_type for r in any_guard.records()}
    assert stored == {free.id: "free_quota", split.id: "split", paid.id: "pay_as_you_go"}


def test_r11_unpriced_model_is_never_costed_at_zero(
    any_guard: qg.QuotaGuard, caplog: pytest.LogCaptureFixture
) -> None:
    any_guard.grant("my-model", tokens=100)
    covered = spend(any_guard, "my-model", 50, 0)
    assert (covered.cost_type, covered.cost) == ("free_quota", Decimal(0))
    with caplog.at_level(logging.WARNING, logger="quotaguard"):
        rec = spend(any_guard, "my-model", 80, 50)
    assert rec.cost_type == "unpriced"
    assert rec.cost is None
    assert (rec.free_tokens, rec.billable_input_tokens, rec.billable_output_tokens) == (50, 30, 50)
    assert any("my-model" in m and "unpriced" in m for m in caplog.messages)
    [stored] = [r for r in any_guard.records(model="my-model") if r.id == rec.id]
    assert (stored.cost_type, stored.cost) == ("unpriced", None)
    bill = any_guard.bill()
    assert "my-model" in bill.charged_models


def test_r11_records_filters(any_guard: qg.QuotaGuard, clock: Clock) -> None:
    t0 = clock.now
    spend(any_guard, "qwen-max", 1, 1)
    clock.advance(60)
    spend(any_guard, "qwen-plus", 2, 2)
    clock.advance(60)
    spend(any_guard, "qwen-max", 3, 3)
    assert [r.input_tokens for r in any_guard.records()] == [1, 2, 3]
    assert [r.input_tokens for r in any_guard.records(model="qwen-max")] == [1, 3]
    assert [r.input_tokens for r in any_guard.records(since=t0 + dt.timedelta(seconds=60))] == [
        2,
        3,
    ]
    assert [r.input_tokens for r in any_guard.records(until=t0 + dt.timedelta(seconds=60))] == [1]
    assert any_guard.records(user="nobody") == []


@pytest.mark.parametrize(
    "ledger",
    [
        "memory",
        "sqlite",
    ],
)
def test_r11_records_come_back_in_call_order(
    make_guard: MakeGuard, ledger_path: Path, ledger: str
) -> None:
    guard = make_guard("memory://" if ledger == "memory" else ledger_path)
    ids = [spend(guard, "qwen-max", i, 0).id for i in range(1, 21)]  # one clock instant
    assert [r.id for r in guard.records()] == ids
    assert [r.input_tokens for r in guard.records()] == list(range(1, 21))


def test_r11_records_survive_reopening(make_guard: MakeGuard) -> None:
    guard = make_guard()
    guard.grant("qwen-max")
    ids = [spend(guard, "qwen-max", 10 * i, i).id for i in range(1, 4)]
    del guard
    again = make_guard()
    assert sorted(r.id for r in again.records()) == sorted(ids)
    assert again.remaining("qwen-max") == MILLION - sum(11 * i for i in range(1, 4))


# --------------------------------------------------------------------------- R12


def test_r12_sync_sets_remaining_and_total(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    q = any_guard.sync("qwen-max", "362,917/1,000,000")
    assert isinstance(q, qg.Quota)
    assert (q.remaining, q.total, q.used) == (362_917, MILLION, 637_083)
    assert any_guard.remaining("qwen-max") == 362_917
    assert q.console == "362,917/1,000,000"


def test_r12_sync_lowers_but_never_raises_unless_forced(any_guard: qg.QuotaGuard) -> None:
    """The console lags and may show quota already gone: its figure lowers the remaining,
    never raises it above the ledger's own; ``force=True`` (a user's correction) sets it."""
    any_guard.grant("qwen-max")
    any_guard.reserve("qwen-max", 100_000, 0).settle(100_000, 0)
    assert any_guard.sync("qwen-max", "950,000/1,000,000").remaining == 900_000
    assert any_guard.sync("qwen-max", "800,000/1,000,000").remaining == 800_000
    assert any_guard.sync("qwen-max", "900,000/1,000,000").remaining == 800_000
    forced = any_guard.sync("qwen-max", "900,000/1,000,000", force=True)
    assert (forced.remaining, forced.used) == (900_000, 100_000)


def test_r9_a_reservation_swept_by_a_guard_a_day_later_is_still_recorded(
    make_guard: MakeGuard, clock: Clock
) -> None:
    """Another guard opens the ledger a day later and sweeps the expired hold: the late
    settle still records its usage, as LeaseExpiredWarning says."""
    first = make_guard()
    first.grant("qwen-max", tokens=10_000)
    held = first.reserve("qwen-max", 1_000, 1_000)
    clock.advance(days=1)
    later = make_guard()
    assert later.quota("qwen-max").reserved == 0  # swept
    later.reserve("qwen-max", 500, 0).settle(500, 0)
    with pytest.warns(qg.LeaseExpiredWarning, match="recorded"):
        record = held.settle(900, 700)
    assert (record.input_tokens, record.output_tokens, record.free_tokens) == (900, 700, 1_600)
    assert later.remaining("qwen-max") == 10_000 - 500 - 1_600
    assert [r.input_tokens for r in later.records()] == [500, 900]


def test_r12_sync_of_a_model_never_granted_creates_it(any_guard: qg.QuotaGuard) -> None:
    q = any_guard.sync("qwen-plus", "50,000/100,000")
    assert (q.remaining, q.total) == (50_000, 100_000)


def test_r12_sync_keeps_reservations_in_flight(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    r = any_guard.reserve("qwen-max", 1_000, 0)
    assert any_guard.sync("qwen-max", "10,000/1,000,000").remaining == 9_000
    r.release()
    assert any_guard.remaining("qwen-max") == 10_000


def test_r12_service_free_tier_only_sets_remaining_to_zero(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    err = any_guard.service_error("qwen-max", "AllocationQuota.FreeTierOnly")
    assert type(err) is FreeTierOnly
    assert err.code == "AllocationQuota.FreeTierOnly"
    assert err.model == "qwen-max"
    assert any_guard.remaining("qwen-max") == 0
    assert any_guard.quota("qwen-max").total == MILLION
    assert any_guard.overdue is False


def test_r12_service_arrearage_marks_overdue(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    err = any_guard.service_error("qwen-max", "Arrearage", "Access denied")
    assert type(err) is AccountOverdue
    assert err.code == "Arrearage"
    assert "Access denied" in str(err)
    assert any_guard.overdue is True
    assert any_guard.remaining("qwen-max") == MILLION


def test_r12_other_service_errors_change_nothing(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-max")
    assert any_guard.service_error("qwen-max", "Throttling.RateQuota") is None
    assert any_guard.remaining("qwen-max") == MILLION
    assert any_guard.overdue is False


# --------------------------------------------------------------------------- R13


def test_r13_a_million_input_tokens_of_qwen_plus_cost_0_8_cny(any_guard: qg.QuotaGuard) -> None:
    records = [spend(any_guard, "qwen-plus", 100_000, 0) for _ in range(10)]
    assert all(r.cost == Decimal("0.08") for r in records)
    total = sum((r.cost for r in records if r.cost is not None), Decimal(0))
    assert total == Decimal("0.8")
    bill = any_guard.bill()
    assert bill.total == Decimal("0.8")
    assert [(line.model, line.billable_tokens) for line in bill.lines] == [("qwen-plus", MILLION)]
    assert bill.charged_models == ["qwen-plus"]


def test_r13_costs_add_up_exactly(any_guard: qg.QuotaGuard) -> None:
    # 0.1 + 0.2 style sums that binary floats get wrong: 0.3 CNY per million for qwen-turbo.
    records = [spend(any_guard, "qwen-turbo", 1, 0) for _ in range(10)]
    assert sum((r.cost for r in records if r.cost is not None), Decimal(0)) == Decimal("0.000003")
    assert any_guard.bill().total == Decimal("0.000003")


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "cost"),
    [
        (128_000, 0, Decimal("0.1024")),  # 128,000 x 0.8 / 1e6 (K = 1,000)
        (128_001, 0, Decimal("0.3072024")),  # 128,001 x 2.4 / 1e6
        (128_000, 1_000, Decimal("0.1044")),  # + 1,000 x 2 / 1e6
        (130_000, 1_000, Decimal("0.332")),  # 130,000 x 2.4 + 1,000 x 20: the second tier
        (256_001, 0, Decimal("1.2288048")),  # 256,001 x 4.8 / 1e6
    ],
)
def test_r13_tier_is_set_by_the_request_input(
    any_guard: qg.QuotaGuard, input_tokens: int, output_tokens: int, cost: Decimal
) -> None:
    assert spend(any_guard, "qwen-plus", input_tokens, output_tokens).cost == cost


def test_r13_tier_is_set_by_all_input_even_when_part_is_free(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant("qwen-plus", tokens=100_000)
    rec = spend(any_guard, "qwen-plus", 131_073, 0)
    assert rec.billable_input_tokens == 31_073
    assert rec.cost == Decimal("0.0745752")  # 31,073 x 2.4 / 1e6: tier 2


def test_r13_thinking_output_price(guard: qg.QuotaGuard) -> None:
    r = guard.reserve("qwen-plus", 1_000, 1_000)
    rec = r.settle(1_000, 1_000, thinking=True)
    assert rec.cost == Decimal("0.0088")  # 1,000 x 0.8 + 1,000 x 8, per million


def test_r13_currency_follows_the_site(make_guard: MakeGuard) -> None:
    china = make_guard("memory://")
    intl = make_guard("memory://", site="international", region="ap-southeast-1")
    assert (china.currency, intl.currency) == ("CNY", "USD")
    c = spend(china, "qwen-max", 1_000, 1_000)
    i = spend(intl, "qwen-max", 1_000, 1_000)
    assert (c.currency, c.cost) == ("CNY", Decimal("0.012"))
    assert (i.currency, i.cost) == ("USD", Decimal("0.008"))
    assert intl.bill().currency == "USD"


def test_r13_catalogue_override_file(make_guard: MakeGuard, tmp_path: Path) -> None:
    path = write_catalog(
        tmp_path,
        """
[models.qwen-max.prices.china]
currency = "CNY"
tiers = [{ input = "1", output = "2" }]

[models.my-model]
free_tokens = 5_000
[models.my-model.prices.china]
currency = "CNY"
tiers = [{ input = "0.5", output = "1.5" }]
""",
    )
    guard = make_guard("memory://", catalog=path)
    assert spend(guard, "qwen-max", 1_000, 1_000).cost == Decimal("0.003")
    assert guard.grant("my-model").total == 5_000
    spend(guard, "my-model", 5_000, 0)
    rec = spend(guard, "my-model", 2_000, 2_000)
    assert (rec.cost_type, rec.cost) == ("pay_as_you_go", Decimal("0.004"))
    # Entries not overridden keep the bundled values.
    assert spend(guard, "qwen-turbo", MILLION, 0).cost == Decimal("0.3")
    assert guard.catalog_info()["models"]["qwen-max"]["free_tokens"] == MILLION


def test_r13_a_catalogue_accepts_a_pathlike_and_a_str(
    make_guard: MakeGuard, tmp_path: Path
) -> None:
    path = write_catalog(tmp_path, "[models.qwen-max]\nfree_tokens = 7\n")
    for cat in (path, str(path)):
        assert make_guard("memory://", catalog=cat).grant("qwen-max").total == 7


def test_r13_a_malformed_catalogue_names_file_and_line(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, "[models.qwen-max]\nfree_tokens = 1\nvalid_days = = 3\n")
    with pytest.raises(ValueError) as e:
        qg.QuotaGuard("memory://", catalog=path)
    assert str(path) in str(e.value)
    assert "line 3" in str(e.value)


def test_r13_a_large_bill_stays_exact(any_guard: qg.QuotaGuard) -> None:
    # qwen-plus above 256K input, thinking: 1e9 x 4.8 + 1e9 x 64 per million = 68,800 CNY.
    calls = 140
    for _ in range(calls):
        rec = any_guard.reserve("qwen-plus", 10**9, 10**9).settle(10**9, 10**9, thinking=True)
        assert rec.cost == Decimal(68_800)
    assert any_guard.bill().total == Decimal(68_800 * calls)


def test_r13_bill_month(any_guard: qg.QuotaGuard, clock: Clock) -> None:
    any_guard.grant("qwen-max", tokens=1_000)
    spend(any_guard, "qwen-max", 1_000, 1_000)
    bill = any_guard.bill(clock.now.strftime("%Y-%m"))
    [line] = bill.lines
    assert (line.model, line.free_tokens, line.billable_tokens) == ("qwen-max", 1_000, 1_000)
    assert line.cost == bill.total == Decimal("0.0096")
    assert bill.charged_models == ["qwen-max"]
    assert any_guard.bill("2020-01").lines == []


# --------------------------------------------------------------------------- values


def test_value_classes_are_immutable(guard: qg.QuotaGuard) -> None:
    q = guard.grant("qwen-max")
    with pytest.raises(AttributeError):
        q.total = 5  # type: ignore[misc]
    rec = spend(guard, "qwen-max", 1, 1)
    with pytest.raises(AttributeError):
        rec.cost = Decimal(0)  # type: ignore[misc]


def test_guard_reports_its_configuration(make_guard: MakeGuard, ledger_path: Path) -> None:
    g = make_guard(account="acme", user="bob", workspace="w", region="cn-beijing", verified=False)
    assert (g.account, g.user, g.workspace, g.region, g.site, g.verified) == (
        "acme",
        "bob",
        "w",
        "cn-beijing",
        "china",
        False,
    )
    assert str(ledger_path) in g.ledger
    assert "acme" in repr(g)


def test_quota_guard_is_not_picklable_by_accident(guard: qg.QuotaGuard) -> None:
    # A guard holds a ledger connection: it must not silently pickle into a copy.
    with pytest.raises((TypeError, pickle.PicklingError)):
        pickle.dumps(guard)
    with pytest.raises(TypeError, match="cannot pickle or copy a QuotaGuard"):
        copy.copy(guard)


def test_the_public_class_shows_none_of_the_cores_hooks() -> None:
    # QuotaGuard holds the Rust core rather than extending it: the core's private hooks
    # (budgets, alert sink, uncounted checks...) are not attributes of the public class.
    hooks = {n for n in dir(_core.QuotaGuard) if n.startswith("_") and not n.startswith("__")}
    assert {"_check_uncounted", "_record_usage", "_open_budget", "_set_alert_sink"} <= hooks
    shown = set(dir(qg.QuotaGuard))
    assert not hooks & shown, sorted(hooks & shown)
    assert not issubclass(qg.QuotaGuard, _core.QuotaGuard)
    # Every public name of the core is on the public class, with help text of its own.
    public = {n for n in dir(_core.QuotaGuard) if not n.startswith("_")}
    assert public <= shown, sorted(public - shown)
    page = pydoc.render_doc(qg.QuotaGuard, renderer=pydoc.plaintext)
    for hook in hooks:
        assert f"{hook}(" not in page and f" {hook}\n" not in page, hook
    assert "reserve(self, model: 'str', input_tokens: 'int'" in page
