"""How every object looks: reprs, strs and notebook HTML of the guard, quotas, bills,
records, statistics, budgets and wrapped clients; the quota states; data frames; the
plot. Times are shown in CST, numbers with separators, amounts exactly.

The test clock starts at 2026-01-10 12:00 CST (04:00 UTC): a 90-day quota granted then
expires 2026-04-10 12:00 CST.
"""

from __future__ import annotations

import ast
import datetime as dt
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Clock

import quotaguard as qg
from quotaguard import _format
from quotaguard.testing import FakeDashScope

MODEL = "qwen-max"
EXPIRES = "2026-04-10 12:00 CST"
UTC = dt.timezone.utc
KEY = "sk-views-secret"


def spend(guard: qg.QuotaGuard, model: str, inp: int, out: int) -> qg.UsageRecord:
    return guard.reserve(model, inp, out).settle(inp, out)


@pytest.fixture
def used(guard: qg.QuotaGuard) -> qg.QuotaGuard:
    """qwen-max: 1,000,000 granted, 637,083 used (the console's 362,917/1,000,000)."""
    guard.grant(MODEL, tokens=1_000_000)
    spend(guard, MODEL, 600_000, 37_083)
    return guard


# ---------------------------------------------------------------------- Quota


def test_quota_repr_str_and_html(used: qg.QuotaGuard) -> None:
    q = used.quota(MODEL)
    assert repr(q) == (
        f"<Quota {MODEL} 362,917/1,000,000 (36.3% left, 637,083 used), expires {EXPIRES}, active>"
    )
    line = str(q)
    assert line.startswith(MODEL) and line.endswith(f"expires {EXPIRES}  active")
    assert "362,917/1,000,000" in line and "36.3% left" in line and "637,083 used" in line
    assert "███████░" in line  # 36.3% of 20 cells: 7 full
    page = q._repr_html_()
    assert "<table" in page and f"<code>{MODEL}</code>" in page
    for cell in ("362,917/1,000,000", "36.3%", "637,083", EXPIRES, "active"):
        assert f">{cell}</td>" in page, cell
    assert "width:36.3%" in page


def test_quota_reserved_shows_in_the_views(used: qg.QuotaGuard) -> None:
    r = used.reserve(MODEL, 10_000, 2_345)
    q = used.quota(MODEL)
    assert "12,345 reserved" in repr(q) and "12,345 reserved" in str(q)
    assert ">12,345</td>" in q._repr_html_()
    assert "12,345 reserved" in used.status()
    r.release()
    assert "reserved" not in str(used.quota(MODEL))


def test_tiny_fractions_never_read_as_zero_or_full() -> None:
    assert _format.percent(88 / 1_000_000) == "<0.1%"
    assert _format.percent(999_999 / 1_000_000) == ">99.9%"
    assert _format.percent(0) == "0.0%" and _format.percent(1) == "100.0%"


# ---------------------------------------------------------------------- states


@pytest.fixture
def server() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=KEY, reply_tokens=1) as fake:
        yield fake


def smallest_call(client: Any) -> None:
    """The smallest chat call there is: an empty system and user message, one token out."""
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": ""}],
        max_tokens=1,
    )


def default_call(client: Any) -> None:
    """One empty user message, no system message, max_tokens left to the catalogue."""
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}])


def test_call_sizes_follow_the_rules(guard: qg.QuotaGuard) -> None:
    # R8: 5 tokens a message, 3 to open the reply, 21 for a missing system message.
    smallest, default = _format.call_sizes(guard, MODEL)
    assert smallest == 5 + 5 + 3 + 1
    assert default == 21 + 5 + 3 + guard.default_max_output(MODEL) == 8_221
    # Thinking by default: the call at its defaults reserves the longest reasoning too.
    info = guard.model_info("qwen3.5-plus")
    assert info["thinking"] == "default"
    assert _format.call_sizes(guard, "qwen3.5-plus")[1] == (
        29 + info["default_max_output_tokens"] + info["max_reasoning_tokens"]
    )
    assert _format.call_sizes(guard, "text-embedding-v4") == (1, 1)  # input only


def test_too_low_for_a_call_is_what_the_guard_refuses(
    guard: qg.QuotaGuard, server: FakeDashScope
) -> None:
    """The state's threshold is the refusal's: one token below it the smallest call is
    refused and never sent; at it, the same call goes through."""
    smallest, _ = _format.call_sizes(guard, MODEL)
    client = guard.wrap_openai(openai.OpenAI(api_key=KEY, base_url=server.openai_base))
    guard.grant(MODEL, tokens=1_000_000)
    guard.set_free_only(MODEL)

    guard.sync(MODEL, f"{smallest - 1}/1,000,000", force=True)
    assert _format.state(guard.quota(MODEL), _format.call_sizes(guard, MODEL)) == (
        "too low for a call, free only"
    )
    line = next(li for li in guard.status().splitlines() if li.startswith(MODEL))
    assert line.endswith("too low for a call, free only")
    assert ">too low for a call, free only</td>" in guard._repr_html_()
    with pytest.raises(qg.FreeTierOnly):
        smallest_call(client)
    assert server.request_count == 0

    guard.sync(MODEL, f"{smallest}/1,000,000", force=True)
    assert "too low for a call" not in guard.status()
    smallest_call(client)
    assert server.request_count == 1


def test_too_low_for_a_default_call_is_what_the_guard_refuses(
    guard: qg.QuotaGuard, server: FakeDashScope
) -> None:
    _, default = _format.call_sizes(guard, MODEL)
    client = guard.wrap_openai(openai.OpenAI(api_key=KEY, base_url=server.openai_base))
    guard.grant(MODEL, tokens=1_000_000)
    guard.set_free_only(MODEL)
    guard.sync(MODEL, f"{default - 1:,}/1,000,000", force=True)
    assert guard.status().endswith("too low for a default call, free only")
    with pytest.raises(qg.FreeTierOnly):
        default_call(client)
    smallest_call(client)  # a call with a small max_tokens still fits
    guard.sync(MODEL, f"{default + 1:,}/1,000,000", force=True)  # the small call used 1+
    assert guard.status().endswith("free only")
    assert "too low" not in guard.status()
    default_call(client)


def test_88_of_a_million_is_not_just_free_only(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL, tokens=1_000_000)
    guard.set_free_only(MODEL)
    guard.sync(MODEL, "88/1,000,000", force=True)
    line = guard.status().splitlines()[1]
    assert "88/1,000,000" in line and "<0.1% left" in line
    assert line.endswith("too low for a default call, free only")
    guard.sync(MODEL, "9/1,000,000", force=True)
    assert guard.status().endswith("too low for a call, free only")
    # The bar keeps a sliver while anything is left.
    assert "min-width:2px" in guard._repr_html_()


@pytest.mark.parametrize(
    ("figure", "free_only", "expected"),
    [
        ("1,000,000/1,000,000", False, "active"),
        ("1,000,000/1,000,000", True, "free only"),
        ("0/1,000,000", False, "used up"),
        ("0/1,000,000", True, "used up, free only"),
        ("10/1,000,000", False, "too low for a call"),
    ],
)
def test_states(guard: qg.QuotaGuard, figure: str, free_only: bool, expected: str) -> None:
    guard.grant(MODEL, tokens=1_000_000)
    if free_only:
        guard.set_free_only(MODEL)
    guard.sync(MODEL, figure, force=True)
    assert guard.status().endswith(f"  {expected}")
    assert f">{expected}</td>" in guard._repr_html_()


def test_expired_and_ungranted_states(guard: qg.QuotaGuard, clock: Clock) -> None:
    guard.grant(MODEL, tokens=1_000, valid_days=30)
    clock.advance(days=31)
    assert guard.status().endswith("  expired")
    assert _format.state(guard.quota("qwen-plus")) == "no free quota"


# ---------------------------------------------------------------------- the guard


def test_guard_view_shows_percent_used_reserved_and_balance(used: qg.QuotaGuard) -> None:
    text = used.status()
    assert "balance" not in text  # untracked
    used.set_balance(Decimal("1234.5"))
    held = used.reserve(MODEL, 1_000, 0)
    text = used.status()
    head, line, money = text.splitlines()
    assert head.startswith("quotaguard · account 'default' · cn-beijing · ledger memory://")
    assert line.startswith(MODEL)
    for part in ("361,917/1,000,000", "36.2% left", "637,083 used", "1,000 reserved"):
        assert part in line, part
    assert line.endswith(f"expires {EXPIRES}  active")
    assert money == "balance 1,234.50 CNY"
    page = used._repr_html_()
    for cell in ("361,917/1,000,000", "36.2%", "637,083", "1,000", EXPIRES, "active"):
        assert f">{cell}</td>" in page, cell
    assert "balance 1,234.50 CNY" in page
    assert "background:#f0ad4e;" in page  # 36.2% left: an amber bar, in a web colour
    used.block("testing")
    assert "<div style='color:#d9534f'><b>blocked</b>: testing</div>" in used._repr_html_()
    used.unblock()
    used.mark_overdue()
    assert "OVERDUE: every call is refused" in used.status()
    assert "OVERDUE" in used._repr_html_()
    held.release()


def test_empty_guard_views(guard: qg.QuotaGuard) -> None:
    assert "no free quota granted yet" in guard.status()
    assert "no free quota granted yet" in guard._repr_html_()


def test_model_names_are_escaped_in_html(guard: qg.QuotaGuard) -> None:
    guard.grant("<b>x</b>", tokens=10)
    page = guard._repr_html_()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


# ---------------------------------------------------------------------- bills


def test_bill_has_one_renderer_with_a_header_row(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL, tokens=1_000)
    spend(guard, MODEL, 1_500, 500)  # 1,000 free, 1,000 billable
    spend(guard, "qwen-plus", 12_000, 3_000)  # no free quota: all billable
    bill = guard.bill("2026-01")
    text = str(bill)
    assert text == _format.format_bill(bill)
    lines = text.splitlines()
    assert lines[0] == "Bill 2026-01 (CNY)"
    assert re.fullmatch(r"model +calls +free tokens +billable tokens +cost", lines[1])
    assert re.fullmatch(r"qwen-max +1 +1,000 +1,000 +[\d.]+", lines[2])
    assert re.fullmatch(r"qwen-plus +1 +0 +15,000 +[\d.]+", lines[3])
    assert lines[4].startswith("total") and lines[4].endswith(f"{bill.total} CNY")
    assert lines[5] == "models that incurred charges: qwen-max, qwen-plus"
    assert repr(bill) == (
        f"<Bill 2026-01: {_format.money(bill.total)} CNY, 2 models, charged: qwen-max, qwen-plus>"
    )
    page = bill._repr_html_()
    assert ">free tokens</th>" in page and ">15,000</td>" in page
    assert f"<b>{_format.money(bill.total)}</b>" in page
    line = bill.lines[1]
    assert repr(line) == (
        f"<BillLine qwen-plus: 1 calls, 0 free tokens, 15,000 billable, "
        f"{_format.money(line.cost)} CNY>"
    )


def test_command_line_bill_is_the_same_renderer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quotaguard.cli import main

    ledger = str(tmp_path / "l.db")
    g = qg.QuotaGuard(ledger)
    spend(g, "qwen-plus", 10_000, 0)
    assert main(["bill", "--ledger", ledger]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == _format.format_bill(g.bill(), "default")
    assert out.splitlines()[1].startswith("model ")


def test_empty_bill(guard: qg.QuotaGuard) -> None:
    text = str(guard.bill("2026-01"))
    assert "(no calls in this period)" in text
    assert text.splitlines()[1].startswith("model")


# ---------------------------------------------------------------------- records


def test_records_are_a_list_that_shows_itself(used: qg.QuotaGuard, clock: Clock) -> None:
    clock.advance(hours=1, minutes=30)
    spend(used, MODEL, 1_234, 56)
    records = used.records()
    assert isinstance(records, list) and isinstance(records, _format.RecordList)
    assert records == list(records) and len(records) == 2
    assert isinstance(records[-1:], _format.RecordList)
    assert isinstance(records[0], qg.UsageRecord)
    text = repr(records)
    assert str(records) == text
    lines = text.splitlines()
    assert lines[0] == "2 records"
    assert lines[1].split() == [
        "time",
        "(CST)",
        "user",
        "model",
        "kind",
        "input",
        "output",
        "free",
        "billable",
        "cost",
        "cost",
        "type",
    ]
    assert lines[2].startswith("2026-01-10 12:00:00  root  qwen-max")
    assert "600,000" in lines[2] and "37,083" in lines[2] and "637,083" in lines[2]
    assert lines[3].startswith("2026-01-10 13:30:00")
    page = records._repr_html_()
    assert "<b>2 records</b>" in page and "<td>2026-01-10 13:30:00</td>" in page
    assert ">1,234</td>" in page
    assert repr(used.records(model="qwen-plus")) == "(no records)"


def test_one_record_repr_and_html(used: qg.QuotaGuard) -> None:
    r = used.records()[0]
    assert repr(r) == (
        f"<UsageRecord {r.id} 2026-01-10 12:00 CST qwen-max by root: 600,000 in, "
        "37,083 out, 637,083 free, 0.00 CNY (free_quota)>"
    )
    assert "<td>2026-01-10 12:00:00</td>" in r._repr_html_()


def test_long_record_lists_show_head_and_tail(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL, tokens=1_000_000)
    for i in range(40):
        spend(guard, MODEL, 100 + i, 1)
    records = guard.records()
    lines = repr(records).splitlines()
    assert lines[0] == "40 records (15 not shown)"
    assert len(lines) == 1 + 1 + 20 + 1 + 5
    assert lines[22].startswith("…")
    assert " 139 " in lines[-1]  # the last record
    assert "(15 not shown)" in records._repr_html_()
    assert repr(records[:1]).splitlines()[0] == "1 record"


def test_to_pandas_times_ids_and_costs(guard: qg.QuotaGuard) -> None:
    pd = pytest.importorskip("pandas")
    guard.grant(MODEL, tokens=1_000)
    spend(guard, MODEL, 1_500, 500)
    spend(guard, "unpriced-model", 10, 5)  # no known price: cost None
    records = guard.records()
    df = guard.to_pandas()
    assert list(df.columns) == list(_format.RECORD_FIELDS)
    assert str(df["id"].dtype) == "string"
    assert list(df["id"]) == [str(r.id) for r in records]
    assert len(df["id"].iloc[0]) >= 16  # a 64-bit id stays exact as text
    assert str(df["time"].dt.tz) == "Asia/Shanghai"
    assert df["time"].iloc[0] == pd.Timestamp("2026-01-10 12:00", tz="Asia/Shanghai")
    assert df["time"].iloc[0].hour == 12
    assert df["cost"].dtype == object
    assert df["cost"].iloc[0] == records[0].cost and isinstance(df["cost"].iloc[0], Decimal)
    assert df["cost"].iloc[1] is None

    utc = guard.to_pandas(tz="UTC", cost="float", model=MODEL)
    assert len(utc) == 1
    assert str(utc["time"].dt.tz) == "UTC" and utc["time"].iloc[0].hour == 4
    assert str(utc["cost"].dtype) == "float64"
    assert utc["cost"].iloc[0] == float(records[0].cost or 0)
    floats = records.to_pandas(cost="float")
    assert pd.isna(floats["cost"].iloc[1])
    assert len(guard.records().to_pandas()) == 2

    with pytest.raises(ValueError, match="'Europe/Paris'"):
        guard.to_pandas(tz="Europe/Paris")
    with pytest.raises(ValueError, match="'exact'"):
        guard.to_pandas(cost="exact")


def test_to_pandas_of_no_records(guard: qg.QuotaGuard) -> None:
    pytest.importorskip("pandas")
    df = guard.to_pandas()
    assert len(df) == 0 and list(df.columns) == list(_format.RECORD_FIELDS)
    assert str(df["time"].dt.tz) == "Asia/Shanghai"


def test_missing_extras_name_themselves(
    used: qg.QuotaGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"quotaguard\[pandas\]"):
        used.to_pandas()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"quotaguard\[plot\]"):
        used.plot()


# ---------------------------------------------------------------------- statistics


def test_hour_stats_in_cst(used: qg.QuotaGuard, clock: Clock) -> None:
    clock.advance(hours=13)  # 2026-01-11 01:00 CST
    spend(used, MODEL, 1_000, 10)
    stats = used.stats()
    assert isinstance(stats, list) and len(stats) == 2
    assert repr(stats[0]) == (
        "<HourStats 2026-01-10 12:00 CST qwen-max: 1 calls, 0 refused, 0 failed, "
        "600,000 in, 37,083 out>"
    )
    lines = repr(stats).splitlines()
    assert lines[0] == "2 hours"
    assert lines[1].split()[:3] == ["hour", "(CST)", "model"]
    assert lines[2].startswith("2026-01-10 12:00  qwen-max")
    assert lines[3].startswith("2026-01-11 01:00  qwen-max")
    page = stats._repr_html_()
    assert "<td>2026-01-11 01:00</td>" in page and ">600,000</td>" in page
    assert "<td>2026-01-10 12:00</td>" in stats[0]._repr_html_()


# ---------------------------------------------------------------------- the rest


def test_forecast_and_alert_reprs(guard: qg.QuotaGuard, clock: Clock) -> None:
    alerts: list[qg.Alert] = []
    guard.on_alert(alerts.append)
    guard.grant(MODEL, tokens=10_000)
    clock.advance(hours=1)
    spend(guard, MODEL, 8_000, 500)
    f = guard.forecast(MODEL)
    assert repr(f).startswith(f"<Forecast {MODEL}: 1,500 left, 354.2 an hour over 24 h, ")
    assert "runs out 2026-01-" in repr(f) and "CST" in repr(f)
    [low] = alerts
    assert str(low) == f'quota_low: free quota of "{MODEL}" at 1,500/10,000'
    assert repr(low) == f"<Alert {low} at 2026-01-10 13:00 CST>"


def test_reservation_repr_shows_its_lease_in_cst(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL, tokens=10_000)
    held = guard.reserve(MODEL, 1_000, 2_500)
    lease = held.expires_at.astimezone(_format.CST).strftime("%Y-%m-%d %H:%M")
    assert repr(held) == (
        f"<Reservation {held.id} {MODEL} {held.kind}: worst case 3,500 tokens "
        f"(3,500 free), lease until {lease} CST, open>"
    )
    held.settle(900, 100)
    assert repr(held).endswith(", settled or released>")


def test_budget_views(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL, tokens=1_000_000)
    with guard.budget(tokens=10_000, cost="1.5", name="eval") as b:
        spend(guard, MODEL, 1_000, 234)
        assert repr(b) == (
            "<Budget 'eval': 1,234/10,000 tokens used, 8,766 left · 0.00/1.50 CNY spent, 1.50 left>"
        )
        page = b._repr_html_()
        assert "<code>eval</code>" in page and ">8,766</td>" in page and ">87.7%</td>" in page
    assert repr(guard.budget()) == "<Budget: 0 tokens used · 0.00 CNY spent>"


def test_wrapped_clients_show_what_they_wrap_and_never_the_key(guard: qg.QuotaGuard) -> None:
    raw = openai.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1")
    text = repr(guard.wrap_openai(raw, fallback=["qwen-plus"], max_input_tokens=5_000))
    assert text == (
        "<GuardedOpenAI: openai.OpenAI at http://127.0.0.1:9/v1/ · account 'default', "
        "ledger memory:// · max_input_tokens 5,000 · fallback qwen-plus>"
    )
    assert KEY not in text and "0x" not in text
    ds = repr(guard.wrap_dashscope(clip=True))
    assert ds == "<GuardedDashScope: dashscope · account 'default', ledger memory:// · clip>"


# ---------------------------------------------------------------------- plot


def test_plot_draws_remaining_over_time_and_the_expiry(used: qg.QuotaGuard, clock: Clock) -> None:
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    clock.advance(hours=2)
    spend(used, MODEL, 62_917, 0)  # 300,000 left
    used.grant("qwen-plus", tokens=5_000)
    fig = used.plot(MODEL)
    assert isinstance(fig, Figure)
    [ax] = fig.axes
    [step] = [li for li in ax.get_lines() if li.get_label() == MODEL]
    assert list(step.get_ydata()) == [1_000_000, 362_917, 300_000, 300_000]
    [expiry] = [li for li in ax.get_lines() if li.get_label().startswith(f"{MODEL} expires")]
    assert expiry.get_label() == f"{MODEL} expires {EXPIRES}"
    expires = used.quota(MODEL).expires_at
    assert list(expiry.get_xdata()) == [expires, expires]
    assert date2num(expires) == pytest.approx(date2num(dt.datetime(2026, 4, 10, 4, tzinfo=UTC)))
    assert ax.get_xlabel() == "time (CST)"
    # Every model without model=.
    labels = {li.get_label() for li in used.plot().axes[0].get_lines()}
    assert {MODEL, "qwen-plus"} <= labels
    with pytest.raises(ValueError, match="'qwen-turbo'"):
        used.plot("qwen-turbo")


def test_plot_renders_to_png(used: qg.QuotaGuard, tmp_path: Path) -> None:
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    path = tmp_path / "quota.png"
    used.plot().savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# ---------------------------------------------------------------------- structure


def test_format_never_imports_the_guard_at_run_time() -> None:
    """The guard imports _format; _format reaches the guard only for type checking."""
    tree = ast.parse(Path(_format.__file__).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            assert node.module not in ("guard", "clients", "cli"), ast.unparse(node)


def test_unknown_view_is_refused() -> None:
    with pytest.raises(ValueError, match="'json'"):
        _format.render(object(), "json")
