"""How quotaguard looks: the one place that turns its objects into text and HTML.

The command line, the notebook views, the reprs and the demo all format through here.

Days and expiry dates are shown in China Standard Time, where the platform counts them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core import Bill, Forecast, Quota
    from .guard import QuotaGuard

__all__ = [
    "CST",
    "bar",
    "cst",
    "format_bill",
    "format_quota",
    "money",
    "state",
    "status_html",
    "status_text",
    "table",
    "tier_label",
]

CST = timezone(timedelta(hours=8), "CST")


def cst(dt: datetime) -> str:
    """An instant as a China Standard Time wall-clock string."""
    return dt.astimezone(CST).strftime("%Y-%m-%d %H:%M CST")


def bar(fraction: float, width: int = 20) -> str:
    """A text bar of ``width`` cells, ``fraction`` of them full."""
    full = max(0, min(width, round(fraction * width)))
    return "█" * full + "░" * (width - full)


def state(q: Quota) -> str:
    """A quota's state in one word or two: active, free only, used up, expired, no free quota."""
    if q.expired:
        return "expired"
    if q.total == 0:
        return "no free quota"
    if q.remaining == 0:
        return "used up"
    return "free only" if q.free_only else "active"


def status_text(guard: QuotaGuard) -> str:
    quotas = guard.quotas()
    head = f"quotaguard · account {guard.account!r} · {guard.region} · ledger {guard.ledger}"
    if not quotas:
        return head + "\n(no free quota granted yet: guard.grant(model) or `quotaguard grant`)"
    width = max(len(q.model) for q in quotas)
    lines = [head]
    for q in quotas:
        lines.append(
            f"{q.model:<{width}}  {q.console:>21}  {bar(q.fraction_left)}  "
            f"expires {cst(q.expires_at)}  {state(q)}"
            + (f"  ({q.reserved:,} reserved)" if q.reserved else "")
        )
    blocked = guard.blocked
    if blocked is not None:
        lines.append(f"BLOCKED: every call is refused ({blocked}); `quotaguard unblock` lifts it")
    overdue = guard.overdue
    balance = guard.balance
    if balance is not None or overdue:
        money = (
            f"balance {balance} {guard.currency}" if balance is not None else "balance untracked"
        )
        lines.append(money + ("  OVERDUE: every call is refused" if overdue else ""))
    return "\n".join(lines)


def _outlook(f: Forecast) -> str:
    """A forecast in a few words: when the quota runs out, or what expires unused."""
    if f.runs_out_at is not None:
        return f"runs out {cst(f.runs_out_at)}"
    if f.expires_at is None or f.remaining == 0:
        return ""
    if f.burn_per_hour == 0:
        return "unused so far"
    return f"{f.unused_at_expiry:,} will expire unused"


def status_html(guard: QuotaGuard) -> str:
    """A table with one bar per model and its forecast, for Jupyter."""
    rows = []
    forecasts = {f.model: f for f in guard.forecasts()}
    for q in guard.quotas():
        pct = 100.0 * q.fraction_left
        color = "#d9534f" if pct <= 20 else ("#f0ad4e" if pct <= 50 else "#5cb85c")
        f = forecasts.get(q.model)
        outlook = "" if f is None else _outlook(f)
        rows.append(
            "<tr>"
            f"<td><code>{html.escape(q.model)}</code></td>"
            f"<td style='text-align:right'>{html.escape(q.console)}</td>"
            "<td><div style='width:180px;background:#eee;border-radius:3px'>"
            f"<div style='width:{pct:.1f}%;background:{color};height:12px;border-radius:3px'>"
            "</div></div></td>"
            f"<td>{html.escape(cst(q.expires_at))}</td>"
            f"<td>{html.escape(state(q))}</td>"
            f"<td>{html.escape(outlook)}</td>"
            "</tr>"
        )
    body = "".join(rows) or "<tr><td colspan=6>no free quota granted yet</td></tr>"
    blocked = guard.blocked
    banner = (
        ""
        if blocked is None
        else f"<div style='color:#d9534f'><b>blocked</b>: {html.escape(blocked)}</div>"
    )
    return (
        f"<div><b>quotaguard</b> · account <code>{html.escape(guard.account)}</code> · "
        f"{html.escape(guard.region)}{banner}"
        "<table><thead><tr><th>model</th><th>remaining/total</th><th></th>"
        "<th>expires</th><th>state</th><th>at the last 24 h's rate</th></tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


# ---------------------------------------------------------------------- text


def money(amount: Decimal) -> str:
    """An exact amount: two decimals unless it has more (never rounded away)."""
    cents = amount.quantize(Decimal("0.01"))
    if cents == amount:
        return f"{cents:,.2f}"
    return f"{amount.normalize():,f}"


def format_quota(q: Quota, width: int = 0) -> str:
    """One model as the console shows it: ``qwen-max  362,917/1,000,000  ███░░  expires ...``."""
    return (
        f"{q.model:<{width}}  {q.console:>21}  {bar(q.fraction_left)}  "
        f"expires {cst(q.expires_at)}  {state(q)}"
        + (f"  ({q.reserved:,} reserved)" if q.reserved else "")
    )


def format_bill(bill: Bill, account: str | None = None) -> str:
    """A bill as a table: per model the free tokens deducted, the billable tokens, the cost."""
    who = f", account {account!r}" if account is not None else ""
    head = f"Bill {bill.period} ({bill.currency}{who})"
    lines = list(bill.lines)
    width = max([len("model"), *(len(line.model) for line in lines)])
    rows = [
        head,
        f"{'model':<{width}}  {'calls':>7}  {'free tokens':>13}  {'billable tokens':>15}  "
        f"{'cost':>12}",
    ]
    for line in lines:
        note = f"  ({line.unpriced_calls:,} unpriced calls)" if line.unpriced_calls else ""
        rows.append(
            f"{line.model:<{width}}  {line.calls:>7,}  {line.free_tokens:>13,}  "
            f"{line.billable_tokens:>15,}  {money(line.cost):>12}{note}"
        )
    if not lines:
        rows.append("(no calls in this period)")
    blank = " " * (7 + 2 + 13 + 2 + 15)
    rows.append(f"{'total':<{width}}  {blank}  {money(bill.total):>12} {bill.currency}")
    charged = ", ".join(bill.charged_models) or "none"
    rows.append(f"models that incurred charges: {charged}")
    return "\n".join(rows)


def tier_label(up_to: int | None, previous: int | None) -> str:
    def k(n: int) -> str:  # K = 1,000 tokens, as the pricing page says
        return f"{n // 1000:,}K" if n % 1000 == 0 else f"{n:,}"

    if up_to is None:
        return "flat" if previous is None else f"> {k(previous)}"
    return f"<= {k(up_to)}"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Rows under a header; the first ``left`` columns flush left, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [head, *rows]
    ]
