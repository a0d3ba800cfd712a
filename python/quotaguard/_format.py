"""How quotaguard looks: the one place that turns its objects into text and HTML.

The command line, the notebook views, the reprs of the core's objects (``Quota``,
``Bill``, ``UsageRecord``, ...: the compiled core calls :func:`render`), the wrapped
clients and the demo all format through here. Nothing here imports the guard at run
time: the guard imports this module, never the other way round.

Days, hours and expiry dates are shown in China Standard Time, where the platform counts
them; token counts with thousands separators; amounts exactly.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, SupportsIndex, cast, overload

if TYPE_CHECKING:
    from ._core import (
        Alert,
        Bill,
        BillLine,
        Forecast,
        HourStats,
        Quota,
        Reservation,
        UsageRecord,
    )
    from .guard import Budget, QuotaGuard

__all__ = [
    "CST",
    "RECORD_FIELDS",
    "RecordList",
    "StatsList",
    "bar",
    "call_sizes",
    "cst",
    "format_bill",
    "format_quota",
    "money",
    "plot",
    "quota_state",
    "record_to_dict",
    "render",
    "state",
    "status_html",
    "status_text",
    "table",
    "tier_label",
]

CST = timezone(timedelta(hours=8), "CST")

# The columns of a record as plain data (`record_to_dict`, exports, data frames).
RECORD_FIELDS = (
    "id",
    "time",
    "account",
    "user",
    "workspace",
    "model",
    "kind",
    "request_id",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "thinking",
    "free_tokens",
    "billable_input_tokens",
    "billable_output_tokens",
    "cost",
    "currency",
    "cost_type",
    "in_doubt",
)

# How many rows a list view shows: the first HEAD and the last TAIL, then a count.
HEAD, TAIL = 20, 5

# The notebook's colours (the terminal's SGR codes, RED etc., are further down).
HTML_GREEN, HTML_AMBER, HTML_RED, HTML_GREY = "#5cb85c", "#f0ad4e", "#d9534f", "#999"


class _Guard(Protocol):
    """The part of ``QuotaGuard`` the views read."""

    @property
    def account(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def ledger(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def balance(self) -> Decimal | None: ...
    @property
    def overdue(self) -> bool: ...
    @property
    def blocked(self) -> str | None: ...
    def quotas(self) -> list[Quota]: ...
    def forecasts(self) -> list[Forecast]: ...
    def model_info(self, model: str) -> dict[str, Any]: ...
    def input_bound(
        self,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        input: str | list[str] | None = None,
        extra_tokens: int | None = None,
    ) -> int: ...
    def records(self, model: str | None = None) -> list[UsageRecord]: ...
    def now(self) -> datetime: ...


# ---------------------------------------------------------------------- pieces


def cst(dt: datetime) -> str:
    """An instant as a China Standard Time wall-clock string."""
    return dt.astimezone(CST).strftime("%Y-%m-%d %H:%M CST")


def bar(fraction: float, width: int = 20) -> str:
    """A text bar of ``width`` cells, ``fraction`` of them full."""
    full = max(0, min(width, round(fraction * width)))
    return "█" * full + "░" * (width - full)


def percent(fraction: float) -> str:
    """A share as a percentage: one decimal, never 0.0% for something nor 100.0% for less."""
    if 0 < fraction < 0.001:
        return "<0.1%"
    if 0.999 < fraction < 1:
        return ">99.9%"
    return f"{100 * fraction:.1f}%"


def money(amount: Decimal) -> str:
    """An exact amount: two decimals unless it has more (never rounded away)."""
    cents = amount.quantize(Decimal("0.01"))
    if cents == amount:
        return f"{cents:,.2f}"
    return f"{amount.normalize():,f}"


def _e(value: object) -> str:
    return html.escape(str(value))


def _code(value: object) -> str:
    return f"<code>{_e(value)}</code>"


def _html_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()
) -> str:
    """An HTML table; ``rows`` are already escaped HTML; columns in ``right`` flush right."""
    flush = set(right)

    def cell(tag: str, i: int, body: str) -> str:
        style = " style='text-align:right'" if i in flush else ""
        return f"<{tag}{style}>{body}</{tag}>"

    thead = "".join(cell("th", i, _e(h)) for i, h in enumerate(head))
    tbody = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>"


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


def _shown(n: int) -> tuple[range, range]:
    """Which of ``n`` rows a list view shows: all, or the first HEAD and the last TAIL."""
    if n <= HEAD + TAIL:
        return range(n), range(0)
    return range(HEAD), range(n - TAIL, n)


def tier_label(up_to: int | None, previous: int | None) -> str:
    def k(n: int) -> str:  # K = 1,000 tokens, as the pricing page says
        return f"{n // 1000:,}K" if n % 1000 == 0 else f"{n:,}"

    if up_to is None:
        return "flat" if previous is None else f"> {k(previous)}"
    return f"<= {k(up_to)}"


# ---------------------------------------------------------------------- quota state

# The smallest chat request there is: an empty system message and an empty user message.
_SMALLEST_CHAT = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]


def call_sizes(guard: _Guard, model: str) -> tuple[int, int]:
    """What the smallest call to ``model`` and a call left at its defaults reserve (R8).

    The smallest call: the input bound of the smallest request (chat: an empty system and
    an empty user message, with their framing; an embedding model: one token) plus one
    output token (and one of reasoning for a model that always thinks). A call at its
    defaults: one user message without a system message (so the default one is counted)
    plus the model's default output, and its longest reasoning when it thinks by default.
    A model whose free quota is below the first refuses (under Free Quota Only) or bills
    every call; one below the second refuses every call that does not set a smaller
    ``max_tokens``."""
    info = guard.model_info(model)
    if info["max_output_tokens"] == 0:  # an embedding model: input only
        return 1, 1
    thinking = info["thinking"]
    smallest = guard.input_bound(messages=_SMALLEST_CHAT) + 1 + (thinking == "always")
    default = guard.input_bound(messages=[{"role": "user", "content": ""}])
    default += info["default_max_output_tokens"]
    if thinking in ("default", "always"):
        default += info["max_reasoning_tokens"]
    return smallest, max(default, smallest)


def state(q: Quota, sizes: tuple[int, int] | None = None) -> str:
    """A quota's state in a few words.

    ``expired``, ``no free quota``, ``used up``; with ``sizes`` (see :func:`call_sizes`)
    also ``too low for a call`` (what is left cannot cover the smallest call) and ``too
    low for a default call``; else ``active``. Free Quota Only adds ``free only``: the
    state alone when the quota is healthy, after a comma otherwise."""
    if q.expired:
        return "expired"
    if q.total == 0:
        return "no free quota"
    if q.remaining == 0:
        level = "used up"
    elif sizes is not None and q.remaining < sizes[0]:
        level = "too low for a call"
    elif sizes is not None and q.remaining < sizes[1]:
        level = "too low for a default call"
    else:
        return "free only" if q.free_only else "active"
    return f"{level}, free only" if q.free_only else level


def quota_state(guard: _Guard, q: Quota) -> str:
    """``q``'s state as every view of the guard shows it (:func:`state` with the model's
    :func:`call_sizes`): the library's status, the notebook table and the command line."""
    return state(q, call_sizes(guard, q.model))


def _color(q: Quota, st: str) -> str:
    if st in ("active", "free only"):
        left = q.fraction_left
        return HTML_RED if left <= 0.2 else (HTML_AMBER if left <= 0.5 else HTML_GREEN)
    return HTML_GREY if st in ("expired", "no free quota") else HTML_RED


def format_quota(q: Quota, width: int = 0, sizes: tuple[int, int] | None = None) -> str:
    """One model as the console shows it, and more:
    ``qwen-max  362,917/1,000,000  ███████░░░  36.3% left  637,083 used  expires ... CST  active``.
    """
    reserved = f"  {q.reserved:,} reserved" if q.reserved else ""
    return (
        f"{q.model:<{width}}  {q.console:>21}  {bar(q.fraction_left)}  "
        f"{percent(q.fraction_left):>6} left  {q.used:>9,} used{reserved}  "
        f"expires {cst(q.expires_at)}  {state(q, sizes)}"
    )


def _quota_repr(q: Quota) -> str:
    reserved = f", {q.reserved:,} reserved" if q.reserved else ""
    return (
        f"<Quota {q.model} {q.console} ({percent(q.fraction_left)} left, {q.used:,} used"
        f"{reserved}), expires {cst(q.expires_at)}, {state(q)}>"
    )


def _bar_html(q: Quota, st: str) -> str:
    pct = 100.0 * q.fraction_left
    return (
        "<div style='width:180px;background:#eee;border-radius:3px'>"
        f"<div style='width:{pct:.1f}%;min-width:{2 if q.remaining else 0}px;"
        f"background:{_color(q, st)};height:12px;border-radius:3px'></div></div>"
    )


QUOTA_HEAD = ["model", "remaining/total", "", "left", "used", "reserved", "expires", "state"]


def _quota_cells(q: Quota, st: str) -> list[str]:
    return [
        _code(q.model),
        _e(q.console),
        _bar_html(q, st),
        _e(percent(q.fraction_left)),
        f"{q.used:,}",
        f"{q.reserved:,}",
        _e(cst(q.expires_at)),
        _e(st),
    ]


def _quota_html(q: Quota) -> str:
    return _html_table(QUOTA_HEAD, [_quota_cells(q, state(q))], right=(1, 3, 4, 5))


# ---------------------------------------------------------------------- the guard


def _outlook(f: Forecast) -> str:
    """A forecast in a few words: when the quota runs out, or what expires unused."""
    if f.runs_out_at is not None:
        return f"runs out {cst(f.runs_out_at)}"
    if f.expires_at is None or f.remaining == 0:
        return ""
    if f.burn_per_hour == 0:
        return "unused so far"
    return f"{f.unused_at_expiry:,} will expire unused"


def _money_line(guard: _Guard) -> str | None:
    """The balance when tracked, and whether the account is overdue (R7)."""
    balance, overdue = guard.balance, guard.overdue
    if balance is None and not overdue:
        return None
    parts = [
        "balance untracked" if balance is None else f"balance {money(balance)} {guard.currency}"
    ]
    if overdue:
        parts.append("OVERDUE: every call is refused")
    return " · ".join(parts)


def status_text(guard: _Guard, quotas: Sequence[Quota] | None = None) -> str:
    """The guard as text: a heading, one line per model (see :func:`format_quota`; the
    models of ``quotas`` when given), then the kill switch and the balance when they
    apply."""
    quotas = guard.quotas() if quotas is None else quotas
    head = f"quotaguard · account {guard.account!r} · {guard.region} · ledger {guard.ledger}"
    if not quotas:
        lines = [head, "(no free quota granted yet: guard.grant(model) or `quotaguard grant`)"]
    else:
        width = max(len(q.model) for q in quotas)
        lines = [head, *(format_quota(q, width, call_sizes(guard, q.model)) for q in quotas)]
    blocked = guard.blocked
    if blocked is not None:
        lines.append(f"BLOCKED: every call is refused ({blocked}); `quotaguard unblock` lifts it")
    money_line = _money_line(guard)
    if money_line is not None:
        lines.append(money_line)
    return "\n".join(lines)


def status_html(guard: _Guard) -> str:
    """The guard as a table for Jupyter: per model its figure, a bar, % left, used,
    reserved, expiry (CST), state and forecast; the kill switch and the balance."""
    forecasts = {f.model: f for f in guard.forecasts()}
    rows = []
    for q in guard.quotas():
        st = quota_state(guard, q)
        f = forecasts.get(q.model)
        rows.append([*_quota_cells(q, st), _e("" if f is None else _outlook(f))])
    if not rows:
        rows.append(["no free quota granted yet", *[""] * len(QUOTA_HEAD)])
    blocked = guard.blocked
    banner = (
        ""
        if blocked is None
        else f"<div style='color:{HTML_RED}'><b>blocked</b>: {_e(blocked)}</div>"
    )
    money_line = _money_line(guard)
    foot = "" if money_line is None else f"<div>{_e(money_line)}</div>"
    return (
        f"<div><b>quotaguard</b> · account {_code(guard.account)} · {_e(guard.region)}"
        f"{banner}"
        + _html_table([*QUOTA_HEAD, "at the last 24 h's rate"], rows, right=(1, 3, 4, 5))
        + f"{foot}</div>"
    )


# ---------------------------------------------------------------------- bills


BILL_HEAD = ["model", "calls", "free tokens", "billable tokens", "cost"]


def _bill_rows(bill: Bill) -> list[list[str]]:
    return [
        [
            line.model,
            f"{line.calls:,}",
            f"{line.free_tokens:,}",
            f"{line.billable_tokens:,}",
            money(line.cost),
        ]
        for line in bill.lines
    ]


def format_bill(bill: Bill, account: str | None = None) -> str:
    """A bill as a table: a heading, a header row, per model the calls, the free tokens
    deducted, the billable tokens and the cost, then the total and the charged models."""
    who = f", account {account!r}" if account is not None else ""
    rows = _bill_rows(bill)
    body = [*rows, ["total", "", "", "", money(bill.total)]]
    lines = table(BILL_HEAD, body, left=1)
    notes = [
        f"{line.model}: {line.unpriced_calls:,} unpriced calls, not in the cost"
        for line in bill.lines
        if line.unpriced_calls
    ]
    if not rows:
        lines.insert(1, "(no calls in this period)")
    lines[-1] += f" {bill.currency}"
    charged = ", ".join(bill.charged_models) or "none"
    return "\n".join(
        [
            f"Bill {bill.period} ({bill.currency}{who})",
            *lines,
            *notes,
            f"models that incurred charges: {charged}",
        ]
    )


def _bill_html(bill: Bill) -> str:
    rows = [[_code(r[0]), *(_e(c) for c in r[1:])] for r in _bill_rows(bill)]
    rows.append(["<b>total</b>", "", "", "", f"<b>{_e(money(bill.total))}</b>"])
    charged = ", ".join(bill.charged_models) or "none"
    return (
        f"<div><b>Bill {_e(bill.period)}</b> ({_e(bill.currency)})"
        + _html_table([*BILL_HEAD[:4], f"cost ({bill.currency})"], rows, right=(1, 2, 3, 4))
        + f"<div>models that incurred charges: {_e(charged)}</div></div>"
    )


def _bill_repr(bill: Bill) -> str:
    charged = ", ".join(bill.charged_models) or "none"
    models = len(bill.lines)
    return (
        f"<Bill {bill.period}: {money(bill.total)} {bill.currency}, "
        f"{models} model{'s' * (models != 1)}, charged: {charged}>"
    )


def _bill_line_repr(line: BillLine) -> str:
    return (
        f"<BillLine {line.model}: {line.calls:,} calls, {line.free_tokens:,} free tokens, "
        f"{line.billable_tokens:,} billable, {money(line.cost)} {line.currency}>"
    )


# ---------------------------------------------------------------------- records


def record_to_dict(record: UsageRecord) -> dict[str, Any]:
    """A record as plain data (``time`` an aware UTC datetime, ``cost`` a Decimal or None)."""
    return {name: getattr(record, name) for name in RECORD_FIELDS}


RECORD_HEAD = [
    "time (CST)",
    "user",
    "model",
    "kind",
    "input",
    "output",
    "free",
    "billable",
    "cost",
    "cost type",
]


def _cost(r: UsageRecord) -> str:
    return "unpriced" if r.cost is None else money(r.cost)


def _record_cells(r: UsageRecord) -> list[str]:
    return [
        r.time.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S"),
        r.user,
        r.model,
        r.kind,
        f"{r.input_tokens:,}",
        f"{r.output_tokens:,}",
        f"{r.free_tokens:,}",
        f"{r.billable_input_tokens + r.billable_output_tokens:,}",
        _cost(r),
        r.cost_type + (" (in doubt)" if r.in_doubt else ""),
    ]


def _record_repr(r: UsageRecord) -> str:
    doubt = ", in doubt" if r.in_doubt else ""
    cost = _cost(r) + ("" if r.cost is None else f" {r.currency}")
    return (
        f"<UsageRecord {r.id} {cst(r.time)} {r.model} by {r.user}: "
        f"{r.input_tokens:,} in, {r.output_tokens:,} out, {r.free_tokens:,} free, "
        f"{cost} ({r.cost_type}{doubt})>"
    )


def _count(n: int, kind: str) -> str:
    """``1 record``, ``2 records``: ``kind`` is the plural."""
    return f"{n:,} {kind if n != 1 else kind[:-1]}"


def _rows_text(
    kind: str, items: Sequence[Any], head: list[str], cells: Callable[[Any], list[str]], left: int
) -> str:
    if not items:
        return f"(no {kind})"
    first, last = _shown(len(items))
    rows = [cells(items[i]) for i in first]
    if last:
        rows.append(["…", *[""] * (len(head) - 1)])
        rows += [cells(items[i]) for i in last]
    lines = table(head, rows, left)
    hidden = len(items) - len(first) - len(last)
    note = f" ({hidden:,} not shown)" if hidden else ""
    return "\n".join([_count(len(items), kind) + note, *lines])


def _rows_html(
    kind: str,
    items: Sequence[Any],
    head: list[str],
    cells: Callable[[Any], list[str]],
    right: Iterable[int],
) -> str:
    if not items:
        return f"<div>no {_e(kind)}</div>"
    first, last = _shown(len(items))
    rows = [[_e(c) for c in cells(items[i])] for i in first]
    if last:
        rows.append(["…", *[""] * (len(head) - 1)])
        rows += [[_e(c) for c in cells(items[i])] for i in last]
    hidden = len(items) - len(first) - len(last)
    note = f" ({hidden:,} not shown)" if hidden else ""
    return f"<div><b>{_e(_count(len(items), kind))}</b>{note}{_html_table(head, rows, right)}</div>"


class RecordList(list["UsageRecord"]):
    """What ``guard.records()`` returns: a plain ``list`` of :class:`UsageRecord` that also
    shows itself as a table (text and notebook) and turns into a data frame."""

    @overload
    def __getitem__(self, i: SupportsIndex) -> UsageRecord: ...
    @overload
    def __getitem__(self, i: slice) -> RecordList: ...
    def __getitem__(self, i: SupportsIndex | slice) -> UsageRecord | RecordList:
        if isinstance(i, slice):
            return RecordList(super().__getitem__(i))
        return super().__getitem__(i)

    def __repr__(self) -> str:
        return _rows_text("records", self, RECORD_HEAD, _record_cells, left=4)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        return _rows_html("records", self, RECORD_HEAD, _record_cells, right=range(4, 9))

    def to_pandas(self, tz: str = "Asia/Shanghai", cost: str = "decimal") -> Any:
        """The records as a ``pandas.DataFrame``: the columns of :func:`record_to_dict`,
        ``id`` as text, ``time`` in ``tz`` (``"Asia/Shanghai"`` or ``"UTC"``), ``cost`` as
        ``Decimal`` (``cost="decimal"``, exact) or ``float`` (``cost="float"``, NaN when
        unpriced). Needs pandas (``pip install 'quotaguard[pandas]'``)."""
        return records_frame(self, tz=tz, cost=cost)


def records_frame(records: Iterable[UsageRecord], tz: str, cost: str) -> Any:
    if tz not in ("Asia/Shanghai", "UTC"):
        raise ValueError(f"tz must be 'Asia/Shanghai' or 'UTC', not {tz!r}")
    if cost not in ("decimal", "float"):
        raise ValueError(f"cost must be 'decimal' or 'float', not {cost!r}")
    try:
        import pandas as pd  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as e:
        raise ImportError(
            "to_pandas() needs pandas: pip install 'quotaguard[pandas]' (or pandas)"
        ) from e
    rows = [record_to_dict(r) for r in records]
    df = pd.DataFrame(rows, columns=list(RECORD_FIELDS))
    df["id"] = df["id"].map(str).astype("string")
    df["time"] = pd.to_datetime(df["time"], utc=True).dt.tz_convert(tz)
    if cost == "float":
        df["cost"] = pd.Series(
            [float("nan") if c is None else float(c) for c in df["cost"]],
            dtype="float64",
            index=df.index,
        )
    else:
        df["cost"] = pd.Series(list(df["cost"]), dtype=object, index=df.index)
    return df


# ---------------------------------------------------------------------- statistics

STATS_HEAD = ["hour (CST)", "model", "calls", "refusals", "failures", "input", "output"]


def _stats_cells(s: HourStats) -> list[str]:
    return [
        s.hour.astimezone(CST).strftime("%Y-%m-%d %H:00"),
        s.model,
        f"{s.calls:,}",
        f"{s.refusals:,}",
        f"{s.failures:,}",
        f"{s.input_tokens:,}",
        f"{s.output_tokens:,}",
    ]


def _stats_repr(s: HourStats) -> str:
    return (
        f"<HourStats {s.hour.astimezone(CST):%Y-%m-%d %H:00} CST {s.model}: {s.calls:,} calls, "
        f"{s.refusals:,} refused, {s.failures:,} failed, {s.input_tokens:,} in, "
        f"{s.output_tokens:,} out>"
    )


class StatsList(list["HourStats"]):
    """What ``guard.stats()`` returns: a plain ``list`` of :class:`HourStats` that shows
    itself as a table, hours in CST."""

    @overload
    def __getitem__(self, i: SupportsIndex) -> HourStats: ...
    @overload
    def __getitem__(self, i: slice) -> StatsList: ...
    def __getitem__(self, i: SupportsIndex | slice) -> HourStats | StatsList:
        if isinstance(i, slice):
            return StatsList(super().__getitem__(i))
        return super().__getitem__(i)

    def __repr__(self) -> str:
        return _rows_text("hours", self, STATS_HEAD, _stats_cells, left=2)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        return _rows_html("hours", self, STATS_HEAD, _stats_cells, right=range(2, 7))


# ---------------------------------------------------------------------- the rest


def _reservation_repr(r: Reservation) -> str:
    """``<Reservation 42 qwen-max realtime: worst case 8,221 tokens (8,221 free), lease
    until ... CST, open>``: the worst case held, its free part, the lease's end in CST."""
    left = "settled or released" if r.done else "open"
    return (
        f"<Reservation {r.id} {r.model} {r.kind}: worst case {r.worst_case:,} tokens "
        f"({r.free_tokens:,} free), lease until {cst(r.expires_at)}, {left}>"
    )


def _forecast_repr(f: Forecast) -> str:
    outlook = _outlook(f) or ("no quota" if f.expires_at is None else "nothing left")
    return (
        f"<Forecast {f.model}: {f.remaining:,} left, {f.burn_per_hour:,.1f} an hour over "
        f"{f.window_hours:g} h, {outlook}>"
    )


def _alert_text(a: Alert) -> str:
    if a.kind == "daily_spend":
        limit = a.threshold if isinstance(a.threshold, Decimal) else Decimal(0)
        return (
            f"daily spend alert: bill of {a.model or 'the account'} for {a.day or ''} was "
            f"{money(a.amount or Decimal(0))} {a.currency}, above {money(limit)} {a.currency}"
        )
    model = a.model or ""
    return f'{a.kind}: free quota of "{model}" at {a.remaining:,}/{a.total:,}'


def _alert_repr(a: Alert) -> str:
    return f"<Alert {_alert_text(a)} at {cst(a.time)}>"


def budget_text(b: Budget) -> str:
    """``<Budget 'eval': 1,200/10,000 tokens used, 8,800 left · 0.12/1.00 CNY spent>``."""
    used, spent, left, cost_left = b._state()
    name = "" if b.name is None else f" {b.name!r}"
    parts = []
    if b.tokens_limit is not None:
        parts.append(f"{used:,}/{b.tokens_limit:,} tokens used, {left or 0:,} left")
    else:
        parts.append(f"{used:,} tokens used")
    currency = b._core.currency
    if b.cost_limit is not None:
        parts.append(
            f"{money(spent)}/{money(b.cost_limit)} {currency} spent, "
            f"{money(cost_left or Decimal(0))} left"
        )
    else:
        parts.append(f"{money(spent)} {currency} spent")
    return f"<Budget{name}: {' · '.join(parts)}>"


def budget_html(b: Budget) -> str:
    used, spent, left, cost_left = b._state()
    currency = b._core.currency
    rows = []
    if b.tokens_limit is not None:
        frac = 0.0 if b.tokens_limit == 0 else (left or 0) / b.tokens_limit
        rows.append(
            ["tokens", f"{used:,}", f"{b.tokens_limit:,}", f"{left or 0:,}", _e(percent(frac))]
        )
    else:
        rows.append(["tokens", f"{used:,}", "no limit", "", ""])
    if b.cost_limit is not None:
        frac = 0.0 if b.cost_limit == 0 else float((cost_left or 0) / b.cost_limit)
        rows.append(
            [
                _e(f"cost ({currency})"),
                _e(money(spent)),
                _e(money(b.cost_limit)),
                _e(money(cost_left or Decimal(0))),
                _e(percent(frac)),
            ]
        )
    else:
        rows.append([_e(f"cost ({currency})"), _e(money(spent)), "no limit", "", ""])
    name = "" if b.name is None else f" {_code(b.name)}"
    return (
        f"<div><b>Budget</b>{name}"
        + _html_table(["", "used", "limit", "left", "% left"], rows, right=(1, 2, 3, 4))
        + "</div>"
    )


def client_repr(
    client: object,
    wrapped: object,
    guard: Any,
    clip: bool = False,
    max_input_tokens: int | None = None,
    fallback: Sequence[str] = (),
) -> str:
    """A wrapped client: what it wraps, where it sends, which ledger guards it, and the
    options that change its calls (never its API key)."""
    what = type(wrapped)
    name = (
        getattr(wrapped, "__name__", "module")
        if isinstance(wrapped, ModuleType)
        else (f"{what.__module__.split('.')[0]}.{what.__name__}")
    )
    base = getattr(wrapped, "base_url", None)
    parts = [name + ("" if base is None else f" at {base}")]
    parts.append(f"account {guard.account!r}, ledger {guard.ledger}")
    if clip:
        parts.append("clip")
    if max_input_tokens is not None:
        parts.append(f"max_input_tokens {max_input_tokens:,}")
    if fallback:
        parts.append("fallback " + ", ".join(fallback))
    return f"<{type(client).__name__}: {' · '.join(parts)}>"


# ---------------------------------------------------------------------- dispatch

_RENDERERS: dict[tuple[str, str], Callable[[Any], str]] = {
    ("Quota", "repr"): _quota_repr,
    ("Quota", "str"): format_quota,
    ("Quota", "html"): _quota_html,
    ("Bill", "repr"): _bill_repr,
    ("Bill", "str"): format_bill,
    ("Bill", "html"): _bill_html,
    ("BillLine", "repr"): _bill_line_repr,
    ("UsageRecord", "repr"): _record_repr,
    ("UsageRecord", "html"): lambda r: _html_table(
        RECORD_HEAD, [[_e(c) for c in _record_cells(r)]], right=range(4, 9)
    ),
    ("HourStats", "repr"): _stats_repr,
    ("HourStats", "html"): lambda s: _html_table(
        STATS_HEAD, [[_e(c) for c in _stats_cells(s)]], right=range(2, 7)
    ),
    ("Forecast", "repr"): _forecast_repr,
    ("Reservation", "repr"): _reservation_repr,
    ("Alert", "repr"): _alert_repr,
    ("Alert", "str"): _alert_text,
}


def render(obj: object, how: str) -> str:
    """``obj`` (an object of the core) as ``how`` says: ``"repr"``, ``"str"`` or ``"html"``.
    The compiled core's ``__repr__``, ``__str__`` and ``_repr_html_`` call this."""
    try:
        renderer = _RENDERERS[type(obj).__name__, how]
    except KeyError:
        raise ValueError(f"no {how!r} view of {type(obj).__name__}") from None
    return renderer(obj)


# ---------------------------------------------------------------------- plot


def plot(guard: _Guard, model: str | None = None) -> Any:
    """Free tokens remaining over time, one line per model, with each quota's expiry as
    a dashed vertical line; times in CST. Returns a ``matplotlib.figure.Figure``."""
    try:
        from matplotlib import dates
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plot() needs matplotlib: pip install 'quotaguard[plot]' (or matplotlib)"
        ) from e
    quotas = guard.quotas()
    if model is not None:
        quotas = [q for q in quotas if q.model == model]
        if not quotas:
            raise ValueError(f"model {model!r} has no free quota granted: nothing to plot")
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax: Any = fig.add_subplot()  # matplotlib's stubs do not take datetimes
    now = guard.now()
    for q in quotas:
        times, left = [q.activated_at], [q.total]
        used = 0
        for r in sorted(guard.records(q.model), key=lambda r: r.time):
            if r.time < q.activated_at or r.free_tokens == 0:
                continue
            used += r.free_tokens
            times.append(r.time)
            left.append(max(q.total - used, 0))
        end = min(now, q.expires_at) if q.expires_at > q.activated_at else now
        times.append(max(end, times[-1]))
        left.append(q.remaining)
        (line,) = ax.step(times, left, where="post", label=q.model)
        ax.axvline(
            q.expires_at,
            color=line.get_color(),
            linestyle="--",
            linewidth=1,
            label=f"{q.model} expires {cst(q.expires_at)}",
        )
    ax.set_ylabel("free tokens remaining")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda y, _pos: f"{y:,.0f}")
    ax.xaxis.set_major_formatter(cast(Any, dates).DateFormatter("%m-%d %H:%M", tz=CST))
    ax.set_xlabel("time (CST)")
    title = f"{model}: free quota" if model is not None else "free quota by model"
    ax.set_title(f"{title} · account {guard.account}")
    if quotas:
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no free quota granted yet", ha="center", transform=ax.transAxes)
    return fig


# ---- terminal
# What the command line and the demo print on a terminal: the output fits the
# terminal's width (columns shorten, then go; text wraps between words, never inside a
# model name), and colour is used only on a terminal, never with NO_COLOR (any
# non-empty value), always with FORCE_COLOR (unless NO_COLOR). Piped output keeps the
# library's own text above, unchanged, unless COLUMNS or FORCE_COLOR ask otherwise.
# (Imports here keep this section one block of its own.)

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import unicodedata  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import IO  # noqa: E402

if TYPE_CHECKING:
    from ._core import HourStats

MIN_WIDTH = 20  # a narrower COLUMNS is taken as this: nothing readable fits in less

BOLD, DIM, RED, GREEN, YELLOW, CYAN = "1", "2", "31", "32", "33", "36"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def terminal_width(stream: IO[str] | None = None) -> int | None:
    """The columns output to ``stream`` may use: ``$COLUMNS`` when set, else the
    terminal's width when ``stream`` is a terminal, else ``None`` (no limit: a pipe or a
    file gets whole lines)."""
    stream = sys.stdout if stream is None else stream
    env = os.environ.get("COLUMNS", "").strip()
    if env.isdigit() and int(env) > 0:
        return max(MIN_WIDTH, int(env))
    if not _isatty(stream):
        return None
    columns = shutil.get_terminal_size(fallback=(0, 0)).columns
    try:  # the stream's own terminal, when it is not stdout's
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        pass
    return max(MIN_WIDTH, columns) if columns > 0 else None


def colour_enabled(stream: IO[str] | None = None) -> bool:
    """Whether to colour output to ``stream``: never with ``NO_COLOR`` set (not empty);
    always with ``FORCE_COLOR`` set (not empty, ``0`` or ``false``); else only on a
    terminal that is not ``TERM=dumb``."""
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force and force.strip().lower() not in ("0", "false"):
        return True
    stream = sys.stdout if stream is None else stream
    return _isatty(stream) and os.environ.get("TERM") != "dumb"


def paint(text: str, sgr: str, on: bool = True) -> str:
    """``text`` in the SGR style ``sgr`` (e.g. ``RED`` or ``"1;31"``) when ``on``."""
    if not on or not sgr or not text:
        return text
    return f"\x1b[{sgr}m{text}\x1b[0m"


def plain(text: str) -> str:
    """``text`` without its colour codes."""
    return _ANSI.sub("", text)


def cell_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: colour codes take none, wide (CJK)
    characters two, combining marks none."""
    width = 0
    for c in plain(text):
        if unicodedata.combining(c):
            continue
        width += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return width


def cut(text: str, width: int) -> str:
    """Plain ``text`` cut to ``width`` columns, an ellipsis marking the cut."""
    if cell_width(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = cell_width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * max(0, width - cell_width(text))
    return fill + text if right else text + fill


def wrap(text: str, width: int | None, indent: int = 2) -> list[str]:
    """The lines of ``text``, each longer than ``width`` wrapped between words (never
    inside a word that fits on a line, so never inside a model name; a path longer than
    the width is cut where the terminal would have cut it); a continuation is indented
    ``indent`` more than its line."""
    lines = text.split("\n")
    if width is None:
        return lines
    out: list[str] = []
    for line in lines:
        if cell_width(line) <= width:
            out.append(line)
            continue
        lead = " " * (len(line) - len(line.lstrip(" ")))
        out.extend(
            textwrap.wrap(
                line,
                width,
                subsequent_indent=lead + " " * indent,
                break_long_words=True,  # only a word longer than a whole line: a path
                break_on_hyphens=False,
            )
            or [line]
        )
    return out


@dataclass(frozen=True)
class Cell:
    """A table cell: its texts, longest first (the table takes a shorter one when it
    must), and its colour."""

    variants: tuple[str, ...]
    sgr: str = ""


def cell(*variants: str, sgr: str = "") -> Cell:
    return Cell(variants or ("",), sgr)


@dataclass(frozen=True)
class Column:
    """A column of :func:`fit_table`. When a table is too wide, the column with the
    lowest ``keep`` first takes its shorter texts (at ``squeeze``, when given), then goes
    (unless ``drop`` is false);
    a ``shrink`` column (a name) is cut with an ellipsis only when nothing else helps."""

    head: str | tuple[str, ...] = ""
    right: bool = False
    keep: int = 5
    drop: bool = True
    shrink: bool = False
    squeeze: int | None = None  # when to take shorter texts, if before `keep`

    @property
    def squeeze_at(self) -> int:
        return self.keep if self.squeeze is None else self.squeeze


def fit_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str | Cell]],
    width: int | None = None,
    *,
    colour: bool = False,
    header: bool = True,
) -> list[str]:
    """Rows under a header (left-aligned columns flush left, the others right, two
    spaces between), fitted to ``width`` columns: no line is longer. With ``width=None``
    the table is whole, as :func:`table` draws it."""
    n = len(columns)
    cells = [[c if isinstance(c, Cell) else Cell((c,)) for c in row] for row in rows]
    heads = [c.head if isinstance(c.head, tuple) else (c.head,) for c in columns]
    level = [0] * n
    shown = [True] * n
    limit: list[int | None] = [None] * n

    def text(variants: tuple[str, ...], i: int) -> str:
        return variants[min(level[i], len(variants) - 1)]

    def levels(i: int) -> int:
        return max(len(heads[i]) if header else 1, *(len(r[i].variants) for r in cells))

    def col_width(i: int) -> int:
        natural = max(
            cell_width(text(heads[i], i)) if header else 0,
            *(cell_width(text(r[i].variants, i)) for r in cells),
            0,
        )
        cap = limit[i]
        return natural if cap is None else min(natural, cap)

    def total() -> int:
        widths = [col_width(i) for i in range(n) if shown[i]]
        return sum(widths) + 2 * max(0, len(widths) - 1)

    if width is not None:
        # Each column's steps: its shorter texts (at its `squeeze`), then going (at its
        # `keep`); the lowest first, the rightmost first among equals.
        steps = sorted(
            [(columns[i].squeeze_at, 0, -i, i) for i in range(n)]
            + [(columns[i].keep, 1, -i, i) for i in range(n) if columns[i].drop],
        )
        for _, go, _, i in steps:
            if total() <= width:
                break
            if not go:
                # A column that may go keeps its shortest text for its `keep` step.
                last = levels(i) - (2 if columns[i].drop else 1)
                while total() > width and level[i] < last:
                    level[i] += 1
            elif shown[i] and sum(shown) > 1:
                while level[i] < levels(i) - 1:  # the shortest first
                    level[i] += 1
                if total() > width:
                    shown[i] = False
        excess = total() - width
        for i in sorted(range(n), key=lambda i: -col_width(i)):
            if excess <= 0:
                break
            if shown[i] and columns[i].shrink:
                w = col_width(i)
                cap = max(6, w - excess)
                limit[i] = cap
                excess -= w - cap

    widths = [col_width(i) for i in range(n)]
    lines: list[str] = []
    body: list[list[Cell]] = cells
    if header:
        body = [[Cell((text(heads[i], i),), BOLD) for i in range(n)], *cells]
    for row in body:
        parts = []
        for i in range(n):
            if not shown[i]:
                continue
            value = cut(text(row[i].variants, i), widths[i])
            padded = _pad(value, widths[i], columns[i].right)
            if colour and row[i].sgr and value:
                padded = padded.replace(value, paint(value, row[i].sgr), 1)
            parts.append(padded)
        line = "  ".join(parts).rstrip()
        if width is not None and cell_width(line) > width:
            line = paint(cut(plain(line), width), "", colour)
        lines.append(line)
    return lines


def level_sgr(fraction: float) -> str:
    """Green above half, yellow above a fifth, red at a fifth or less (the notebook's)."""
    return RED if fraction <= 0.2 else (YELLOW if fraction <= 0.5 else GREEN)


STATE_SGR = {
    "active": GREEN,
    "free only": CYAN,
    "too low for a default call": YELLOW,
    "too low for a call": RED,
    "used up": RED,
    "expired": RED,
    "no free quota": DIM,
}


def state_sgr(st: str) -> str:
    """The colour of a state: by its first part (``used up, free only`` is red)."""
    return STATE_SGR.get(st.split(",")[0], "")


# What a narrow terminal shows of a long state.
_SHORT_STATE = {"too low for a default call": "too low by default", "too low for a call": "too low"}


def state_cell(st: str) -> Cell:
    """A state, then shorter: without ``, free only``, then in fewer words."""
    level = st.split(",")[0]
    variants = [st, level, _SHORT_STATE.get(level, level)]
    return cell(*dict.fromkeys(variants), sgr=state_sgr(st))


def _quota_rows(quotas: Iterable[Quota], states: Sequence[str]) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    for q, st in zip(quotas, states, strict=True):
        expires = q.expires_at.astimezone(CST)
        level = level_sgr(q.fraction_left)
        left = percent(q.fraction_left)
        rows.append(
            [
                cell(q.model, sgr=BOLD),
                cell(q.console, sgr=level),
                cell(bar(q.fraction_left), bar(q.fraction_left, 10), sgr=level),
                cell(f"{left} left", left, sgr=level),
                f"{q.used:,} used",
                cell(f"{q.reserved:,} reserved", f"+{q.reserved:,}") if q.reserved else "",
                cell(
                    f"expires {cst(q.expires_at)}",
                    f"expires {expires:%Y-%m-%d}",
                    f"{expires:%Y-%m-%d}",
                ),
                state_cell(st),
            ]
        )
    return rows


# The columns of format_quota's line; on a narrow terminal the reserved tokens go first,
# then the bar and the expiry shorten, the used tokens go, the % left shortens, the bar
# goes, then the % left, then the expiry; the model, its figure and its state stay.
QUOTA_COLUMNS = (
    Column(keep=9, drop=False, shrink=True),  # model
    Column(right=True, keep=8, drop=False),  # 362,917/1,000,000
    Column(keep=4, squeeze=2),  # bar
    Column(right=True, keep=5, squeeze=3),  # 36.3% left
    Column(right=True, keep=3),  # 637,083 used
    Column(right=True, keep=1),  # reserved
    Column(keep=6, squeeze=2),  # expiry
    Column(keep=7),  # state
)


def _states(guard: _Guard | None, quotas: Sequence[Quota]) -> list[str]:
    return [state(q) if guard is None else quota_state(guard, q) for q in quotas]


def quota_lines(
    quotas: Sequence[Quota],
    width: int | None = None,
    colour: bool = False,
    guard: _Guard | None = None,
) -> list[str]:
    """One line per model, as :func:`status_text` shows it, fitted to ``width``; the
    states as ``guard`` sees them (see :func:`quota_state`) when given."""
    if not colour and guard is not None:
        name = max((len(q.model) for q in quotas), default=0)
        lines = [format_quota(q, name, call_sizes(guard, q.model)) for q in quotas]
        if width is None or all(cell_width(line) <= width for line in lines):
            return lines
    rows = _quota_rows(quotas, _states(guard, quotas))
    return fit_table(QUOTA_COLUMNS, rows, width, colour=colour, header=False)


def status_lines(
    guard: QuotaGuard,
    width: int | None = None,
    colour: bool = False,
    *,
    quotas: Sequence[Quota] | None = None,
    empty: str | None = None,
) -> list[str]:
    """:func:`status_text`, fitted to ``width`` and coloured: the same heading, a line
    per model with the same figures and state, the kill switch and the balance.
    ``quotas`` replaces the guard's list; ``empty`` what is said when there is none."""
    quotas = guard.quotas() if quotas is None else quotas
    if not colour and (quotas or empty is None):
        text = status_text(guard, quotas)
        if width is None or all(cell_width(line) <= width for line in text.split("\n")):
            return text.split("\n")
    head = f"quotaguard · account {guard.account!r} · {guard.region} · ledger {guard.ledger}"
    lines = [paint(line, BOLD, colour) for line in wrap(head, width)]
    if not quotas:
        note = empty or "(no free quota granted yet: guard.grant(model) or `quotaguard grant`)"
        return lines + wrap(note, width)
    lines += quota_lines(quotas, width, colour, guard)
    blocked = guard.blocked
    if blocked is not None:
        text = f"BLOCKED: every call is refused ({blocked}); `quotaguard unblock` lifts it"
        lines += [paint(line, "1;31", colour) for line in wrap(text, width)]
    money_line = _money_line(guard)
    if money_line is not None:
        overdue = "OVERDUE: every call is refused"
        lines += [
            line.replace(overdue, paint(overdue, "1;31", colour))
            for line in wrap(money_line, width)
        ]
    return lines


BILL_COLUMNS = (
    Column("model", keep=9, drop=False, shrink=True),
    Column("calls", right=True, keep=3),
    Column(("free tokens", "free"), right=True, keep=6),
    Column(("billable tokens", "billable"), right=True, keep=7),
    Column("cost", right=True, keep=8, drop=False),
    Column(keep=2),  # unpriced calls
)


def bill_lines(
    bill: Bill, account: str | None = None, width: int | None = None, colour: bool = False
) -> list[str]:
    """:func:`format_bill`, fitted to ``width`` and coloured."""
    if not colour:
        text = format_bill(bill, account)
        if width is None or all(cell_width(line) <= width for line in text.split("\n")):
            return text.split("\n")
    who = f", account {account!r}" if account is not None else ""
    lines = [
        paint(line, BOLD, colour)
        for line in wrap(f"Bill {bill.period} ({bill.currency}{who})", width)
    ]
    rows: list[list[str | Cell]] = []
    for line in bill.lines:
        unpriced = line.unpriced_calls
        rows.append(
            [
                line.model,
                f"{line.calls:,}",
                f"{line.free_tokens:,}",
                f"{line.billable_tokens:,}",
                cell(money(line.cost), sgr=YELLOW if line.cost else ""),
                cell(f"({unpriced:,} unpriced calls)", f"{unpriced:,} unpriced", sgr=YELLOW)
                if unpriced
                else "",
            ]
        )
    total = cell(f"{money(bill.total)} {bill.currency}", sgr=BOLD)
    rows.append([cell("total", sgr=BOLD), "", "", "", total, ""])
    table_lines = fit_table(BILL_COLUMNS, rows, width, colour=colour)
    if not bill.lines:
        table_lines.insert(1, "(no calls in this period)")
    charged = ", ".join(bill.charged_models) or "none"
    tail = wrap(f"models that incurred charges: {charged}", width)
    return lines + table_lines + tail


# ---- plain data, for --json


def quota_data(q: Quota, guard: _Guard | None = None) -> dict[str, Any]:
    """A quota as plain data (what ``quotaguard status --json`` lists); its state as
    ``guard`` sees it (see :func:`quota_state`) when given."""
    return {
        "model": q.model,
        "remaining": q.remaining,
        "total": q.total,
        "used": q.used,
        "reserved": q.reserved,
        "console": q.console,
        "fraction_left": q.fraction_left,
        "activated_at": q.activated_at.isoformat(),
        "expires_at": q.expires_at.isoformat(),
        "expires_cst": cst(q.expires_at),
        "expired": q.expired,
        "free_only": q.free_only,
        "state": state(q) if guard is None else quota_state(guard, q),
    }


def bill_data(bill: Bill) -> dict[str, Any]:
    """A bill as plain data (amounts as decimal strings)."""
    return {
        "period": bill.period,
        "currency": bill.currency,
        "total": str(bill.total),
        "charged_models": list(bill.charged_models),
        "lines": [
            {
                "model": line.model,
                "calls": line.calls,
                "free_tokens": line.free_tokens,
                "billable_input_tokens": line.billable_input_tokens,
                "billable_output_tokens": line.billable_output_tokens,
                "billable_tokens": line.billable_tokens,
                "cost": str(line.cost),
                "unpriced_calls": line.unpriced_calls,
            }
            for line in bill.lines
        ],
    }


def stats_data(stats: Iterable[HourStats]) -> list[dict[str, Any]]:
    return [
        {
            "hour": s.hour.isoformat(),
            "model": s.model,
            "calls": s.calls,
            "refusals": s.refusals,
            "failures": s.failures,
            "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
        }
        for s in stats
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON data")


def print_json(data: Any, out: IO[str]) -> None:
    """``data`` as indented JSON (amounts as decimal strings, times in ISO-8601)."""
    json.dump(data, out, indent=2, ensure_ascii=False, default=_json_default)
    out.write("\n")


# ---- which accounts a ledger holds


def ledger_accounts(guard: QuotaGuard) -> list[str] | None:
    """The accounts with a quota or calls in the guard's SQLite ledger, read without
    writing (``None`` when the ledger is not a file or cannot be read so)."""
    where = guard.ledger
    if where == "memory://" or where.lower().startswith("redis"):
        return None
    try:
        uri = "file:" + where.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=1.0) as db:
            found = db.execute(
                "SELECT account FROM quotas UNION SELECT account FROM totals ORDER BY 1"
            ).fetchall()
        db.close()
    except sqlite3.Error:
        return None
    return [str(a) for (a,) in found]


@dataclass
class Terminal:
    """Where output goes: its width (``None``: unlimited) and whether it takes colour."""

    width: int | None = None
    colour: bool = False

    @classmethod
    def of(cls, stream: IO[str] | None = None) -> Terminal:
        stream = sys.stdout if stream is None else stream
        return cls(terminal_width(stream), colour_enabled(stream))

    def wrap(self, text: str, indent: int = 2) -> str:
        return "\n".join(wrap(text, self.width, indent))

    def paint(self, text: str, sgr: str) -> str:
        return paint(text, sgr, self.colour)

    def table(
        self,
        columns: Sequence[Column],
        rows: Sequence[Sequence[str | Cell]],
        header: bool = True,
    ) -> str:
        return "\n".join(fit_table(columns, rows, self.width, colour=self.colour, header=header))


def progress_line(
    variants: Sequence[tuple[str, Callable[[str], str]]], width: int | None
) -> tuple[str, bool] | None:
    """The longest of ``variants`` (plain text, painter) that fits in ``width`` less one
    column (a line filling the last column may wrap), painted; and whether it fit.
    ``None`` for no variants."""
    if not variants:
        return None
    for text, painter in variants:
        if width is None or cell_width(text) < width:
            return painter(text), True
    text, painter = variants[-1]
    return painter(text), False
