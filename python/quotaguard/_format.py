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
from collections.abc import Callable, Iterable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import IO, Any  # noqa: E402

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
    "used up": RED,
    "expired": RED,
    "no free quota": DIM,
}


def _quota_rows(quotas: Iterable[Quota]) -> list[list[str | Cell]]:
    rows: list[list[str | Cell]] = []
    for q in quotas:
        expires = q.expires_at.astimezone(CST)
        s = state(q)
        rows.append(
            [
                cell(q.model, sgr=BOLD),
                cell(q.console, sgr=level_sgr(q.fraction_left)),
                cell(
                    bar(q.fraction_left), bar(q.fraction_left, 10), sgr=level_sgr(q.fraction_left)
                ),
                cell(
                    f"expires {cst(q.expires_at)}",
                    f"expires {expires:%Y-%m-%d}",
                    f"{expires:%Y-%m-%d}",
                ),
                cell(s, sgr=STATE_SGR.get(s, "")),
                cell(f"({q.reserved:,} reserved)", f"+{q.reserved:,}") if q.reserved else "",
            ]
        )
    return rows


QUOTA_COLUMNS = (
    Column(keep=9, drop=False, shrink=True),  # model
    Column(right=True, keep=8, drop=False),  # 362,917/1,000,000
    Column(keep=2),  # bar
    Column(keep=4, squeeze=2),  # expiry
    Column(keep=7),  # state
    Column(keep=1),  # reserved
)


def quota_lines(
    quotas: Sequence[Quota], width: int | None = None, colour: bool = False
) -> list[str]:
    """One line per model, as the console shows it, fitted to ``width``."""
    return fit_table(QUOTA_COLUMNS, _quota_rows(quotas), width, colour=colour, header=False)


def status_lines(
    guard: QuotaGuard,
    width: int | None = None,
    colour: bool = False,
    *,
    quotas: Sequence[Quota] | None = None,
    empty: str | None = None,
) -> list[str]:
    """:func:`status_text`, fitted to ``width`` and coloured: the same heading, a line
    per model, the kill switch and the balance. ``quotas`` replaces the guard's list;
    ``empty`` what is said when there is none."""
    if quotas is None and empty is None and not colour:
        text = status_text(guard)
        if width is None or all(cell_width(line) <= width for line in text.split("\n")):
            return text.split("\n")
    quotas = guard.quotas() if quotas is None else quotas
    head = f"quotaguard · account {guard.account!r} · {guard.region} · ledger {guard.ledger}"
    lines = [paint(line, BOLD, colour) for line in wrap(head, width)]
    if not quotas:
        note = empty or "(no free quota granted yet: guard.grant(model) or `quotaguard grant`)"
        return lines + wrap(note, width)
    lines += quota_lines(quotas, width, colour)
    blocked = guard.blocked
    if blocked is not None:
        text = f"BLOCKED: every call is refused ({blocked}); `quotaguard unblock` lifts it"
        lines += [paint(line, "1;31", colour) for line in wrap(text, width)]
    overdue = guard.overdue
    balance = guard.balance
    if balance is not None or overdue:
        said = f"balance {balance} {guard.currency}" if balance is not None else "balance untracked"
        if overdue:
            said += "  " + paint("OVERDUE: every call is refused", "1;31", colour)
        lines += wrap(said, width)
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


def quota_data(q: Quota) -> dict[str, Any]:
    """A quota as plain data (what ``quotaguard status --json`` lists)."""
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
        "state": state(q),
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
