"""R10: quota and high-spending alerts fire once, across threads and processes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import threading
import time
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


class Inbox:
    """An alert callback that keeps what it was given, with the thread it ran in."""

    def __init__(self) -> None:
        self.alerts: list[qg.Alert] = []
        self.threads: list[int] = []

    def __call__(self, alert: qg.Alert) -> None:
        self.alerts.append(alert)
        self.threads.append(threading.get_ident())

    def kinds(self) -> list[str]:
        return [a.kind for a in self.alerts]

    def take(self) -> list[qg.Alert]:
        out, self.alerts = self.alerts, []
        return out


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture(params=["memory", "sqlite"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else str(tmp_path / "ledger.db")


@pytest.fixture
def guard(ledger: str, clock: Clock) -> qg.QuotaGuard:
    return qg.QuotaGuard(ledger, clock=clock)


@pytest.fixture
def inbox(guard: qg.QuotaGuard) -> Inbox:
    box = Inbox()
    guard.on_alert(box)
    return box


def use(guard: qg.QuotaGuard, tokens: int, model: str = MODEL) -> qg.UsageRecord:
    """Settles one call of ``tokens`` input tokens."""
    return guard.reserve(model, tokens, 0).settle(tokens, 0)


# ---- quota alerts -----------------------------------------------------------------


def test_quota_alerts_fire_once_each_over_a_scripted_sequence(
    guard: qg.QuotaGuard, inbox: Inbox, clock: Clock
) -> None:
    assert guard.alert_threshold == pytest.approx(0.2)
    guard.grant(MODEL, tokens=1_000)
    use(guard, 799)
    assert guard.remaining(MODEL) == 201
    assert inbox.alerts == []  # 20.1 % left: above the line
    use(guard, 1)
    (low,) = inbox.take()  # 20 % left: on the line
    assert low.kind == "quota_low"
    assert (low.model, low.remaining, low.total) == (MODEL, 200, 1_000)
    assert low.threshold == pytest.approx(0.2)
    assert low.amount is None
    assert low.time == clock.now
    for _ in range(3):
        use(guard, 50)
    assert inbox.alerts == []  # still low, already told
    use(guard, 50)
    (depleted,) = inbox.take()
    assert depleted.kind == "quota_depleted"
    assert (depleted.model, depleted.remaining, depleted.total) == (MODEL, 0, 1_000)
    # Verified account, switch off: calls go on, charged, and no alert repeats.
    for _ in range(3):
        assert use(guard, 100).cost_type == "pay_as_you_go"
    assert inbox.alerts == []


def test_one_settle_crossing_both_lines_fires_both_in_order(
    guard: qg.QuotaGuard, inbox: Inbox
) -> None:
    guard.grant(MODEL, tokens=1_000)
    use(guard, 500)
    assert inbox.alerts == []
    rec = use(guard, 700)  # 500 left -> 0, the rest billed
    assert rec.cost_type == "split"
    assert inbox.kinds() == ["quota_low", "quota_depleted"]
    assert [a.remaining for a in inbox.alerts] == [0, 0]


def test_alerts_are_per_model(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.grant(MODEL, tokens=1_000)
    guard.grant("qwen-plus", tokens=1_000)
    use(guard, 900)
    use(guard, 900, model="qwen-plus")
    assert [(a.kind, a.model) for a in inbox.alerts] == [
        ("quota_low", MODEL),
        ("quota_low", "qwen-plus"),
    ]


def test_batch_calls_do_not_alert(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.grant(MODEL, tokens=1_000)
    guard.reserve(MODEL, 2_000, 0, kind="batch").settle(2_000, 0)  # R4: never covered
    assert guard.remaining(MODEL) == 1_000
    assert inbox.alerts == []


def test_granting_again_rearms_the_alerts(guard: qg.QuotaGuard, inbox: Inbox, clock: Clock) -> None:
    guard.grant(MODEL, tokens=1_000)
    use(guard, 1_000)
    assert inbox.kinds() == ["quota_low", "quota_depleted"]
    inbox.take()
    # A new grant (activated later) is a new quota: it is warned about afresh.
    clock.now += dt.timedelta(days=1)
    guard.grant(MODEL, tokens=2_000, activated_at=clock.now)
    use(guard, 700)
    assert inbox.kinds() == ["quota_low"]
    assert inbox.alerts[0].total == 2_000


def test_threshold_changed_fires_at_the_new_line(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.alert_threshold = 0.5
    assert guard.alert_threshold == pytest.approx(0.5)
    guard.grant(MODEL, tokens=1_000)
    use(guard, 400)
    assert inbox.alerts == []
    use(guard, 100)  # 50 % left
    (low,) = inbox.take()
    assert (low.kind, low.remaining) == ("quota_low", 500)
    assert low.threshold == pytest.approx(0.5)
    use(guard, 100)
    assert inbox.alerts == []
    guard.alert_threshold = 0.25
    use(guard, 100)  # 30 % left: above the new line
    assert inbox.alerts == []
    use(guard, 50)  # 25 % left
    (low,) = inbox.take()
    assert (low.kind, low.remaining) == ("quota_low", 250)
    assert low.threshold == pytest.approx(0.25)
    use(guard, 50)
    assert inbox.alerts == []


def test_threshold_raised_above_what_is_left_fires_on_the_next_settle(
    guard: qg.QuotaGuard, inbox: Inbox
) -> None:
    guard.grant(MODEL, tokens=1_000)
    use(guard, 400)
    guard.alert_threshold = 0.9
    assert inbox.alerts == []  # alerts are evaluated on settle
    use(guard, 1)
    (low,) = inbox.take()
    assert (low.kind, low.remaining) == ("quota_low", 599)
    assert low.threshold == pytest.approx(0.9)


def test_threshold_none_switches_the_low_alert_off(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.alert_threshold = None
    assert guard.alert_threshold is None
    guard.grant(MODEL, tokens=1_000)
    for _ in range(9):
        use(guard, 100)
    assert inbox.alerts == []
    # R10 switches off the threshold; reaching zero is still reported, once.
    use(guard, 100)
    use(guard, 100)
    assert inbox.kinds() == ["quota_depleted"]


def test_threshold_zero_and_one(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.alert_threshold = 1
    guard.grant(MODEL, tokens=1_000)
    use(guard, 1)
    assert inbox.kinds() == ["quota_low"]
    inbox.take()
    guard.alert_threshold = 0
    use(guard, 998)
    assert inbox.alerts == []
    use(guard, 1)
    assert inbox.kinds() == ["quota_low", "quota_depleted"]


@pytest.mark.parametrize(
    ("value", "error"),
    [(1.5, ValueError), (-0.1, ValueError), (True, TypeError), ("0.2", TypeError)],
)
def test_bad_thresholds_are_refused(
    guard: qg.QuotaGuard, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        guard.alert_threshold = value
    assert guard.alert_threshold == pytest.approx(0.2)


def test_on_alert_is_a_decorator_and_checks_its_argument(guard: qg.QuotaGuard) -> None:
    seen: list[str] = []

    @guard.on_alert
    def remember(alert: qg.Alert) -> None:
        seen.append(alert.kind)

    assert callable(remember)
    with pytest.raises(TypeError, match="callable"):
        guard.on_alert("not a function")  # type: ignore[arg-type]
    guard.grant(MODEL, tokens=100)
    use(guard, 100)
    assert seen == ["quota_low", "quota_depleted"]


def test_callbacks_run_in_the_thread_whose_settle_crossed_the_line(
    guard: qg.QuotaGuard, inbox: Inbox
) -> None:
    guard.grant(MODEL, tokens=1_000)
    idents: list[int] = []

    def worker() -> None:
        idents.append(threading.get_ident())
        use(guard, 900)

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert inbox.kinds() == ["quota_low"]
    assert inbox.threads == idents


def test_callback_that_raises_is_logged_and_does_not_break_the_call(
    guard: qg.QuotaGuard, inbox: Inbox, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(alert: qg.Alert) -> None:
        raise RuntimeError("pager is down")

    guard.on_alert(broken)
    after = Inbox()
    guard.on_alert(after)
    guard.grant(MODEL, tokens=1_000)
    with caplog.at_level(logging.WARNING, logger="quotaguard"):
        rec = use(guard, 850)
    assert rec.free_tokens == 850  # the call returned its record
    assert len(guard.records()) == 1
    # Callbacks before and after the broken one still ran.
    assert inbox.kinds() == after.kinds() == ["quota_low"]
    failures = [r for r in caplog.records if r.name == "quotaguard" and r.exc_info]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert "broken" in failures[0].getMessage()
    exc = failures[0].exc_info
    assert exc is not None and isinstance(exc[1], RuntimeError)
    assert "pager is down" in caplog.text


def test_alerts_also_go_to_the_quotaguard_logger(
    guard: qg.QuotaGuard, caplog: pytest.LogCaptureFixture
) -> None:
    guard.grant(MODEL, tokens=1_000)
    with caplog.at_level(logging.WARNING, logger="quotaguard"):
        use(guard, 800)
        use(guard, 200)
    logged = [r for r in caplog.records if r.name == "quotaguard"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.WARNING]
    low, depleted = (r.getMessage() for r in logged)
    assert "quota_low" in low and MODEL in low and "200/1,000" in low
    assert "quota_depleted" in depleted and MODEL in depleted and "0/1,000" in depleted


def test_alerts_are_logged_without_any_callback(
    guard: qg.QuotaGuard, caplog: pytest.LogCaptureFixture
) -> None:
    guard.grant(MODEL, tokens=10)
    with caplog.at_level(logging.WARNING, logger="quotaguard"):
        use(guard, 10)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "quota_low",
        "quota_depleted",
    ]


def test_alerts_fire_once_across_guards_sharing_a_ledger(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    guards = [qg.QuotaGuard(path, clock=clock, user=f"user{i}") for i in range(3)]
    boxes = [Inbox() for _ in guards]
    for g, box in zip(guards, boxes, strict=True):
        g.on_alert(box)
    guards[0].grant(MODEL, tokens=1_000)
    for i in range(10):
        use(guards[i % 3], 100)
    kinds = [k for box in boxes for k in box.kinds()]
    assert sorted(kinds) == ["quota_depleted", "quota_low"]


def test_a_settle_after_its_lease_still_alerts(clock: Clock, ledger: str) -> None:
    guard = qg.QuotaGuard(ledger, clock=clock, lease_seconds=1)
    box = Inbox()
    guard.on_alert(box)
    guard.grant(MODEL, tokens=1_000)
    r = guard.reserve(MODEL, 900, 0)
    clock.now += dt.timedelta(seconds=5)
    with pytest.warns(qg.LeaseExpiredWarning):
        rec = r.settle(900, 0)
    assert rec.free_tokens == 900
    assert box.kinds() == ["quota_low"]


def test_console_sync_below_the_line_fires_quota_low(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.grant(MODEL, tokens=1_000)
    guard.sync(MODEL, "100/1,000")
    assert inbox.kinds() == ["quota_low"]


def test_service_free_tier_only_fires_quota_depleted(guard: qg.QuotaGuard, inbox: Inbox) -> None:
    guard.grant(MODEL, tokens=1_000)
    error = guard.service_error(MODEL, "AllocationQuota.FreeTierOnly")
    assert isinstance(error, qg.FreeTierOnly)
    assert guard.remaining(MODEL) == 0
    assert "quota_depleted" in inbox.kinds()


# ---- four processes around the threshold ----------------------------------------------


def settle_until_refused(ledger: str, out: str, barrier: Any) -> None:
    """One process: its own guard on the shared ledger, settling 10-token calls until the
    free quota refuses; every alert it sees goes to its own file as a JSON line."""
    guard = qg.QuotaGuard(ledger, verified=False)
    seen = Path(out)

    def write(alert: qg.Alert) -> None:
        with seen.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": alert.kind, "remaining": alert.remaining}) + "\n")

    guard.on_alert(write)
    calls = 0
    barrier.wait(60)
    while True:
        try:
            r = guard.reserve(MODEL, 5, 5)
        except qg.FreeTierOnly:
            break
        time.sleep(0.0005)  # the request in flight: others reserve meanwhile
        r.settle(5, 5)
        calls += 1
    with seen.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"calls": calls}) + "\n")


@pytest.mark.timeout(120)
def test_four_processes_around_the_threshold_see_each_alert_exactly_once(
    tmp_path: Path,
) -> None:
    ledger = str(tmp_path / "shared.db")
    setup = qg.QuotaGuard(ledger, verified=False)
    setup.grant(MODEL, tokens=40_000)
    # 20,000 left: the line (8,000) is 1,200 calls away, so all four are settling then.
    setup.reserve(MODEL, 20_000, 0).settle(20_000, 0)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"alerts-{i}.jsonl" for i in range(4)]
    procs = [
        ctx.Process(target=settle_until_refused, args=(ledger, str(out), barrier)) for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    lines = [[json.loads(x) for x in out.read_text().splitlines()] for out in outs]
    calls = [line["calls"] for ls in lines for line in ls if "calls" in line]
    assert sum(calls) == 2_000
    # SQLite's lock is not fair, so the split varies; it must not be one process alone.
    assert sum(n > 0 for n in calls) >= 2, calls
    seen = [[line for line in ls if "kind" in line] for ls in lines]
    low = [(i, a) for i, alerts in enumerate(seen) for a in alerts if a["kind"] == "quota_low"]
    depleted = [
        (i, a) for i, alerts in enumerate(seen) for a in alerts if a["kind"] == "quota_depleted"
    ]
    assert len(low) == 1, seen
    assert len(depleted) == 1, seen
    assert low[0][1]["remaining"] == 8_000  # the settle that crossed the line
    assert depleted[0][1]["remaining"] == 0
    assert setup.remaining(MODEL) == 0
    assert len(setup.records()) == 2_001


# ---- high-spending alerts (daily_spend) ------------------------------------------------


def spend(guard: qg.QuotaGuard, clock: Clock, when: dt.datetime, model: str = MODEL) -> Decimal:
    """A pay-as-you-go call at ``when`` (no free quota is granted); returns its cost."""
    clock.now = when
    cost = guard.reserve(model, 1_000, 1_000).settle(1_000, 1_000).cost
    assert cost is not None and cost > 0
    return cost


def test_daily_spend_fires_once_on_the_first_settle_of_the_next_cst_day(
    guard: qg.QuotaGuard, inbox: Inbox, clock: Clock
) -> None:
    guard.daily_spend_alert = Decimal("0.01")
    assert guard.daily_spend_alert == Decimal("0.01")
    day = dt.date(2026, 1, 10)
    # Day D (CST): 0.012 + 0.012 + 0.012, the last at 23:59:59 CST = 15:59:59 UTC.
    spent = spend(guard, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    spent += spend(guard, clock, dt.datetime(2026, 1, 10, 20, 0, tzinfo=CST))
    spent += spend(guard, clock, dt.datetime(2026, 1, 10, 15, 59, 59, tzinfo=UTC))
    assert spent == Decimal("0.036")
    assert inbox.alerts == []  # day D-1 cost nothing
    assert guard.bill(day="2026-01-10").total == spent

    # 16:00 UTC is midnight CST: the first settle of D+1 fires, with D's bill.
    midnight = dt.datetime(2026, 1, 10, 16, 0, tzinfo=UTC)
    next_day = spend(guard, clock, midnight)
    (alert,) = inbox.take()
    assert alert.kind == "daily_spend"
    assert alert.amount == spent == guard.bill(day=day.isoformat()).total
    assert alert.threshold == Decimal("0.01")
    assert alert.model is None
    assert alert.day == day.isoformat()
    assert alert.currency == "CNY"
    assert alert.time == midnight

    # Later the same CST day: nothing.
    next_day += spend(guard, clock, dt.datetime(2026, 1, 10, 20, 0, tzinfo=UTC))
    # 00:00 UTC is 08:00 CST: not a new day either.
    next_day += spend(guard, clock, dt.datetime(2026, 1, 11, 0, 0, tzinfo=UTC))
    next_day += spend(guard, clock, dt.datetime(2026, 1, 11, 15, 59, 59, tzinfo=UTC))
    assert inbox.alerts == []
    assert guard.bill(day="2026-01-11").total == next_day

    # The next CST midnight: D+1's bill, which includes the call at 00:00 UTC.
    spend(guard, clock, dt.datetime(2026, 1, 11, 16, 0, tzinfo=UTC))
    (alert,) = inbox.take()
    assert alert.amount == next_day == Decimal("0.048")
    assert alert.day == "2026-01-11"


def test_daily_spend_equal_to_the_limit_does_not_fire(
    guard: qg.QuotaGuard, inbox: Inbox, clock: Clock
) -> None:
    guard.daily_spend_alert = Decimal("0.012")
    spend(guard, clock, dt.datetime(2026, 1, 10, 12, 0, tzinfo=CST))  # exactly 0.012
    spend(guard, clock, dt.datetime(2026, 1, 11, 0, 5, tzinfo=CST))
    assert inbox.alerts == []
    spend(guard, clock, dt.datetime(2026, 1, 11, 0, 6, tzinfo=CST))
    spend(guard, clock, dt.datetime(2026, 1, 12, 0, 5, tzinfo=CST))
    assert inbox.kinds() == ["daily_spend"]
    assert inbox.alerts[0].amount == Decimal("0.024")


def test_daily_spend_skips_a_quiet_day(guard: qg.QuotaGuard, inbox: Inbox, clock: Clock) -> None:
    guard.daily_spend_alert = Decimal("0.01")
    spend(guard, clock, dt.datetime(2026, 1, 10, 12, 0, tzinfo=CST))
    spend(guard, clock, dt.datetime(2026, 1, 10, 13, 0, tzinfo=CST))
    # No call on the 11th; on the 12th the previous day (the 11th) cost nothing.
    spend(guard, clock, dt.datetime(2026, 1, 12, 9, 0, tzinfo=CST))
    assert inbox.alerts == []


def test_daily_spend_per_model(guard: qg.QuotaGuard, inbox: Inbox, clock: Clock) -> None:
    guard.daily_spend_alert = {"qwen-max": Decimal("0.01")}
    assert guard.daily_spend_alert == {"qwen-max": Decimal("0.01")}
    # Day 10: qwen-max 0.024 (above), qwen-plus too (not watched).
    spend(guard, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    spend(guard, clock, dt.datetime(2026, 1, 10, 10, 0, tzinfo=CST))
    for hour in (11, 12, 13):
        spend(guard, clock, dt.datetime(2026, 1, 10, hour, 0, tzinfo=CST), model="qwen-plus")
    bill = guard.bill(day="2026-01-10")
    qmax = next(line for line in bill.lines if line.model == "qwen-max")
    assert bill.total > qmax.cost == Decimal("0.024")
    # Day 11: only qwen-plus is used; the first settle still evaluates yesterday.
    spend(guard, clock, dt.datetime(2026, 1, 11, 9, 0, tzinfo=CST), model="qwen-plus")
    (alert,) = inbox.take()
    assert (alert.kind, alert.model, alert.amount) == ("daily_spend", "qwen-max", qmax.cost)
    assert alert.threshold == Decimal("0.01")
    # Day 12: qwen-max spent nothing on the 11th, though the account did.
    spend(guard, clock, dt.datetime(2026, 1, 12, 9, 0, tzinfo=CST), model="qwen-plus")
    assert inbox.alerts == []


def test_daily_spend_per_model_below_its_limit_is_quiet(
    guard: qg.QuotaGuard, inbox: Inbox, clock: Clock
) -> None:
    guard.daily_spend_alert = {"qwen-max": Decimal("0.02"), "qwen-plus": Decimal("1")}
    spend(guard, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))  # 0.012 < 0.02
    for hour in (10, 11):
        spend(guard, clock, dt.datetime(2026, 1, 10, hour, 0, tzinfo=CST), model="qwen-plus")
    spend(guard, clock, dt.datetime(2026, 1, 11, 9, 0, tzinfo=CST))
    assert inbox.alerts == []


def test_daily_spend_off_and_bad_values(guard: qg.QuotaGuard, inbox: Inbox, clock: Clock) -> None:
    assert guard.daily_spend_alert is None
    spend(guard, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    spend(guard, clock, dt.datetime(2026, 1, 11, 9, 0, tzinfo=CST))
    assert inbox.alerts == []
    with pytest.raises(TypeError, match="float"):
        guard.daily_spend_alert = 0.5  # type: ignore[assignment]
    with pytest.raises(ValueError, match="negative"):
        guard.daily_spend_alert = Decimal("-1")
    with pytest.raises(ValueError, match="negative"):
        guard.daily_spend_alert = {"qwen-max": Decimal("-1")}
    guard.daily_spend_alert = "0.5"
    assert guard.daily_spend_alert == Decimal("0.5")
    guard.daily_spend_alert = None
    assert guard.daily_spend_alert is None


def test_check_alerts_for_a_guard_that_makes_no_calls(clock: Clock, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    worker = qg.QuotaGuard(path, clock=clock)
    worker.daily_spend_alert = Decimal("0.01")
    worker_box = Inbox()
    worker.on_alert(worker_box)
    watcher = qg.QuotaGuard(path, clock=clock)
    watcher.daily_spend_alert = Decimal("0.01")
    watcher_box = Inbox()
    watcher.on_alert(watcher_box)

    spent = spend(worker, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    spent += spend(worker, clock, dt.datetime(2026, 1, 10, 10, 0, tzinfo=CST))
    assert watcher.check_alerts() == []  # the same day: nothing to report

    clock.now = dt.datetime(2026, 1, 11, 0, 0, 1, tzinfo=CST)
    (alert,) = watcher.check_alerts()
    assert (alert.kind, alert.amount, alert.day) == ("daily_spend", spent, "2026-01-10")
    assert [a.amount for a in watcher_box.alerts] == [spent]  # callbacks ran too
    assert watcher.check_alerts() == []
    # The worker's first settle of the day does not fire it again.
    spend(worker, clock, dt.datetime(2026, 1, 11, 9, 0, tzinfo=CST))
    assert worker_box.alerts == []


def test_check_alerts_without_rules_is_empty(guard: qg.QuotaGuard, clock: Clock) -> None:
    spend(guard, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    clock.now = dt.datetime(2026, 1, 11, 9, 0, tzinfo=CST)
    assert guard.check_alerts() == []


def check_in_another_process(ledger: str, when: str, out: str) -> None:
    """A process that makes no calls: it only asks for alerts at ``when``."""
    fixed = dt.datetime.fromisoformat(when)
    guard = qg.QuotaGuard(ledger, clock=lambda: fixed)
    guard.daily_spend_alert = Decimal("0.01")
    seen: list[dict[str, str | None]] = []
    guard.on_alert(lambda a: seen.append({"kind": a.kind, "amount": str(a.amount)}))
    returned = [a.kind for a in guard.check_alerts()]
    Path(out).write_text(json.dumps({"returned": returned, "seen": seen}), encoding="utf-8")


@pytest.mark.timeout(120)
def test_check_alerts_in_a_process_that_makes_no_calls(clock: Clock, tmp_path: Path) -> None:
    ledger = str(tmp_path / "shared.db")
    worker = qg.QuotaGuard(ledger, clock=clock)
    worker.daily_spend_alert = Decimal("0.01")
    box = Inbox()
    worker.on_alert(box)
    spent = spend(worker, clock, dt.datetime(2026, 1, 10, 9, 0, tzinfo=CST))
    spent += spend(worker, clock, dt.datetime(2026, 1, 10, 10, 0, tzinfo=CST))
    out = tmp_path / "seen.json"
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(
        target=check_in_another_process,
        args=(ledger, "2026-01-11T00:30:00+08:00", str(out)),
    )
    p.start()
    p.join(100)
    assert p.exitcode == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result == {
        "returned": ["daily_spend"],
        "seen": [{"kind": "daily_spend", "amount": str(spent)}],
    }
    spend(worker, clock, dt.datetime(2026, 1, 11, 1, 0, tzinfo=CST))
    assert box.alerts == []
