"""The exception classes: hierarchy, attributes, messages with the values, pickling."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

import quotaguard as qg
from quotaguard import (
    AccountOverdue,
    BudgetExceeded,
    FreeTierOnly,
    LeaseExpiredWarning,
    LedgerError,
    QuotaGuardError,
)

MILLION = 1_000_000
MODEL = "qwen-max"


E = TypeVar("E", bound=QuotaGuardError)


def raised(call: Callable[[], object], cls: type[E]) -> E:
    """The exception ``call`` raises (it must raise a ``cls``)."""
    with pytest.raises(cls) as e:
        call()
    return e.value


def roundtrip(e: BaseException) -> BaseException:
    copied = pickle.loads(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(copied) is type(e)
    assert copied.args == e.args
    assert str(copied) == str(e)
    assert vars(copied) == vars(e)
    return copied


# --------------------------------------------------------------------------- hierarchy


def test_hierarchy() -> None:
    assert issubclass(QuotaGuardError, Exception)
    assert issubclass(FreeTierOnly, QuotaGuardError)
    assert issubclass(AccountOverdue, FreeTierOnly)
    assert issubclass(BudgetExceeded, QuotaGuardError)
    assert issubclass(LedgerError, QuotaGuardError)
    assert not issubclass(BudgetExceeded, FreeTierOnly)
    assert not issubclass(LedgerError, FreeTierOnly)
    assert issubclass(LeaseExpiredWarning, UserWarning)


def test_codes() -> None:
    assert FreeTierOnly.code == "AllocationQuota.FreeTierOnly"
    assert AccountOverdue.code == "Arrearage"


def test_classes_are_the_public_ones() -> None:
    import quotaguard.exceptions as ex

    for name in (
        "QuotaGuardError",
        "FreeTierOnly",
        "AccountOverdue",
        "BudgetExceeded",
        "LedgerError",
        "LeaseExpiredWarning",
    ):
        assert getattr(qg, name) is getattr(ex, name)
        assert name in qg.__all__


def test_except_free_tier_only_catches_every_refusal() -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max")
    guard.mark_overdue()
    try:
        guard.reserve("qwen-max", 1, 1)
    except FreeTierOnly as e:
        assert isinstance(e, AccountOverdue)
    else:
        pytest.fail("an overdue account admitted a call")


# --------------------------------------------------------------------------- from Rust


@pytest.fixture
def guard() -> qg.QuotaGuard:
    g = qg.QuotaGuard("memory://")
    g.grant("qwen-max")
    g.sync("qwen-max", "800/1,000,000")
    g.set_free_only("qwen-max")
    return g


def test_exhausted_attributes_and_message(guard: qg.QuotaGuard) -> None:
    e = raised(lambda: guard.reserve("qwen-max", 1_000, 200), FreeTierOnly)
    assert type(e) is FreeTierOnly
    assert (e.code, e.model, e.remaining, e.requested, e.reason) == (
        "AllocationQuota.FreeTierOnly",
        "qwen-max",
        800,
        1_200,
        "exhausted",
    )
    assert str(e).startswith(
        'free quota of "qwen-max" exhausted: requested 1,200 tokens, 800 of 1,000,000 left. '
        "It was not sent; to go on:\n"
    )
    assert e.args == (str(e), "qwen-max", 800, 1_200, "exhausted", None)
    assert e.service_code is None  # refused here, not by the service


def test_unverified_expired_message() -> None:
    unverified = qg.QuotaGuard("memory://", verified=False)
    unverified.grant("qwen-max", activated_at="2025-01-01T00:00:00+08:00", valid_days=30)
    e = raised(lambda: unverified.reserve("qwen-max", 10, 10), FreeTierOnly)
    assert (e.reason, e.remaining, e.requested) == ("unverified", 0, 20)
    assert str(e).startswith(
        'account is not identity-verified and the free quota of "qwen-max" has expired: '
        "requested 20 tokens, 0 of 1,000,000 left. It was not sent"
    )
    assert "QuotaGuard(verified=True)" in str(e)


def test_expired_message_under_free_only() -> None:
    now = {"t": "2026-01-01T00:00:00+08:00"}
    guard = qg.QuotaGuard("memory://", clock=lambda: now["t"])
    guard.grant("qwen-max", tokens=5_000, valid_days=30)
    guard.set_free_only("qwen-max")
    now["t"] = "2026-02-01T00:00:00+08:00"
    e = raised(lambda: guard.reserve("qwen-max", 1_000, 234), FreeTierOnly)
    assert (e.model, e.reason, e.remaining, e.requested) == ("qwen-max", "expired", 0, 1_234)
    assert str(e).startswith(
        'free quota of "qwen-max" expired: requested 1,234 tokens, 0 of 5,000 left. It was not sent'
    )


def test_no_quota_message() -> None:
    guard = qg.QuotaGuard("memory://", region="ap-southeast-1", verified=False)
    e = raised(lambda: guard.reserve("qwen-plus", 1_500, 500), FreeTierOnly)
    assert (e.reason, e.requested) == ("unverified", 2_000)
    assert '"qwen-plus"' in str(e)
    assert "2,000" in str(e)


def test_not_covered_message(guard: qg.QuotaGuard) -> None:
    e = raised(lambda: guard.reserve("qwen-max", 100, 100, kind="batch"), FreeTierOnly)
    assert (e.reason, e.model, e.requested, e.remaining) == ("not_covered", "qwen-max", 200, 800)
    assert '"qwen-max"' in str(e)
    assert "batch" in str(e)


def test_overdue_attributes_and_message(guard: qg.QuotaGuard) -> None:
    guard.mark_overdue()
    e = raised(lambda: guard.reserve("qwen-max", 10, 10), FreeTierOnly)
    assert type(e) is AccountOverdue
    assert (e.code, e.model, e.reason, e.requested, e.remaining) == (
        "Arrearage",
        "qwen-max",
        "overdue",
        20,
        800,
    )
    assert "overdue" in str(e)
    assert '"qwen-max"' in str(e)


def test_rejected_operations_are_plain_quota_guard_errors(guard: qg.QuotaGuard) -> None:
    e = raised(lambda: guard.set_free_only("qwen-max", enabled=False), QuotaGuardError)
    assert type(e) is QuotaGuardError
    assert "800" in str(e)
    r = guard.reserve("qwen-max", 1, 1)
    r.release()
    e = raised(r.release, QuotaGuardError)
    assert type(e) is QuotaGuardError
    assert f"reservation {r.id}" in str(e)


def test_ledger_error_names_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"not a database" * 100)
    e = raised(lambda: qg.QuotaGuard(path), LedgerError)
    assert type(e) is LedgerError
    assert e.ledger == str(path)
    assert str(path) in str(e)
    assert e.args == (str(e), str(path))


def test_budget_exceeded_message(guard: qg.QuotaGuard) -> None:
    with guard.budget(tokens=100, name="tests"):
        e = raised(lambda: guard.reserve("qwen-max", 100, 1), BudgetExceeded)
    assert type(e) is BudgetExceeded
    assert str(e).startswith(
        'budget "tests" exceeded: the call may use 101 tokens, 100 of 100 left. It was not sent'
    )
    assert "lower max_tokens" in str(e)


# --------------------------------------------------------------------------- pickling


def rust_raised() -> list[QuotaGuardError]:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max", tokens=1_000)
    guard.set_free_only("qwen-max")
    out: list[QuotaGuardError] = [raised(lambda: guard.reserve(MODEL, 1_000, 1), FreeTierOnly)]
    r = guard.reserve("qwen-max", 1, 1)
    r.settle(1, 1)
    out.append(raised(lambda: r.settle(1, 1), QuotaGuardError))
    with guard.budget(tokens=1):
        out.append(raised(lambda: guard.reserve(MODEL, 1, 1), BudgetExceeded))
    guard.mark_overdue()
    out.append(raised(lambda: guard.reserve(MODEL, 1, 1), AccountOverdue))
    out.append(raised(lambda: qg.QuotaGuard("/nonexistent-dir-for-quotaguard/x.db"), LedgerError))
    return out


def test_rust_raised_exceptions_cover_every_class() -> None:
    assert [type(e) for e in rust_raised()] == [
        FreeTierOnly,
        QuotaGuardError,
        BudgetExceeded,
        AccountOverdue,
        LedgerError,
    ]


@pytest.mark.parametrize("index", range(5))
def test_rust_raised_exceptions_pickle(index: int) -> None:
    e = rust_raised()[index]
    copied = roundtrip(e)
    for attr in ("code", "model", "remaining", "requested", "reason", "ledger", "message"):
        assert getattr(copied, attr, None) == getattr(e, attr, None)
    assert copy.copy(e).args == e.args


@pytest.mark.parametrize(
    "e",
    [
        QuotaGuardError("plain"),
        FreeTierOnly("refused", "qwen-max", 800, 1_200, "exhausted"),
        FreeTierOnly("only a message"),
        AccountOverdue("overdue", "qwen-plus", 5, 6),
        AccountOverdue("overdue", "qwen-plus", 5, 0, "overdue", "PrepaidBillOverdue"),
        FreeTierOnly("quota", "qwen-plus", 0, 0, "exhausted", "Throttling.AllocationQuota"),
        BudgetExceeded("budget"),
        LedgerError("ledger /x: broken", "/x"),
        LedgerError("no name"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_python_built_exceptions_pickle(e: BaseException) -> None:
    copied = roundtrip(e)
    if isinstance(e, FreeTierOnly):
        assert isinstance(copied, FreeTierOnly)
        assert (copied.code, copied.model, copied.remaining, copied.requested, copied.reason) == (
            e.code,
            e.model,
            e.remaining,
            e.requested,
            e.reason,
        )
        assert copied.service_code == e.service_code


def test_account_overdue_defaults() -> None:
    e = AccountOverdue("x")
    assert (e.code, e.reason, e.model, e.remaining, e.requested) == (
        "Arrearage",
        "overdue",
        None,
        0,
        0,
    )
    f = FreeTierOnly("y")
    assert (f.code, f.reason) == ("AllocationQuota.FreeTierOnly", "exhausted")


# --------------------------------------------------------------------------- service answers


@pytest.mark.parametrize(
    ("service_code", "cls", "canonical"),
    [
        ("AllocationQuota.FreeTierOnly", FreeTierOnly, "AllocationQuota.FreeTierOnly"),
        ("Throttling.AllocationQuota", FreeTierOnly, "AllocationQuota.FreeTierOnly"),
        ("insufficient_quota", FreeTierOnly, "AllocationQuota.FreeTierOnly"),
        ("Arrearage", AccountOverdue, "Arrearage"),
        ("PrepaidBillOverdue", AccountOverdue, "Arrearage"),
        ("PostpaidBillOverdue", AccountOverdue, "Arrearage"),
    ],
)
def test_service_answers_update_the_ledger_and_keep_both_codes(
    service_code: str, cls: type[FreeTierOnly], canonical: str
) -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant(MODEL)
    e = guard.service_error(MODEL, service_code, "said the service")
    assert type(e) is cls
    assert isinstance(e, FreeTierOnly)
    assert (e.code, e.service_code) == (canonical, service_code)
    assert service_code in str(e) and "said the service" in str(e)
    if cls is AccountOverdue:
        assert guard.overdue  # R12: the account is overdue; every call is refused
        assert guard.remaining(MODEL) == MILLION
        with pytest.raises(AccountOverdue):
            guard.reserve("qwen-plus", 1, 1)
    else:
        assert not guard.overdue
        assert guard.remaining(MODEL) == 0  # R12: the model's free quota is used up
    assert roundtrip(e).service_code == service_code  # type: ignore[attr-defined]


def test_other_service_codes_change_nothing() -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant(MODEL)
    for code in ("Throttling.RateQuota", "InternalError", "InvalidParameter", ""):
        assert guard.service_error(MODEL, code) is None
    assert guard.remaining(MODEL) == MILLION and not guard.overdue


def test_unbounded_and_unguarded_refusals() -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant(MODEL)
    guard._core._check_uncounted(MODEL, "unbounded", "enable_search")  # switch off: goes ahead
    guard.set_free_only(MODEL)
    e = raised(
        lambda: guard._core._check_uncounted(MODEL, "unbounded", "enable_search"), FreeTierOnly
    )
    assert (e.reason, e.model, e.remaining, e.service_code) == (
        "unbounded",
        MODEL,
        MILLION,
        None,
    )
    assert "enable_search" in str(e) and "max_input_tokens=" in str(e)
    speech = "POST /audio/speech"
    e = raised(lambda: guard._core._check_uncounted(None, "unguarded", speech), FreeTierOnly)
    assert (e.reason, e.model) == ("unguarded", "")
    assert str(e).startswith("POST /audio/speech cannot be guarded")
    roundtrip(e)
    unverified = qg.QuotaGuard("memory://", verified=False)
    e = raised(
        lambda: unverified._core._check_uncounted("qwen-plus", "unguarded", "X"), FreeTierOnly
    )
    assert "not identity-verified" in str(e)
    with pytest.raises(ValueError, match="sideways"):
        guard._core._check_uncounted(MODEL, "sideways", "x")
