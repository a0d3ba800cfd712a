"""A live view of a guarded loop: ``guard.track(iterable, desc=None)``.

``track`` yields the items of an iterable and, at each step and when the loop ends,
reads what the ledger saw since the loop began (calls settled, calls refused, tokens
used, spend, what is left of each model in play) and updates one display in place:

* in a notebook (an IPython kernel), one display handle whose HTML is updated;
* on a terminal (standard output is a TTY), one line rewritten with ``\\r`` that fits
  the terminal's width, ended by a newline when the loop ends;
* anywhere else (a pipe, a log file), nothing at all.

The figures are the ledger's for the guard's account since the loop began, so calls
that another process makes on the same account show too, as they do in the quota.
"""

from __future__ import annotations

import html
import importlib
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ._format import bar, money, quota_state, state

if TYPE_CHECKING:
    from ._core import Quota
    from .guard import QuotaGuard

__all__ = ["Progress", "track"]

logger = logging.getLogger("quotaguard")

T = TypeVar("T")


@dataclass
class Progress:
    """What the ledger saw since a loop began."""

    desc: str | None
    done: int = 0
    """Items the loop has taken so far."""
    total: int | None = None
    """Items in the iterable, when it has a length."""
    calls: int = 0
    """Calls settled."""
    refusals: int = 0
    """Calls the ledger refused (free quota exhausted, expired, not covered...)."""
    failures: int = 0
    """Calls that failed without usage (released)."""
    tokens: int = 0
    """Input plus output tokens of the calls settled."""
    spend: Decimal = field(default_factory=Decimal)
    """What the calls settled cost (unpriced calls add nothing)."""
    currency: str = "CNY"
    quotas: list[Quota] = field(default_factory=list)
    """The quota of each model in play (a model called or refused since the loop began)."""
    states: list[str] = field(default_factory=list)
    """Their states as the guard's status shows them (``too low for a default call``...)."""
    finished: bool = False

    def text(self, width: int | None = None) -> str:
        """The whole view on one line; within ``width`` characters when given (the bars
        go first, then the line is cut)."""
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        parts = [
            f"{head}{count}",
            f"{self.calls:,} calls",
            f"{self.refusals:,} refused",
            f"{self.tokens:,} tokens",
            f"{money(self.spend)} {self.currency}",
        ]
        if self.failures:
            parts.insert(3, f"{self.failures:,} failed")
        states = [_state(self, i) for i in range(len(self.quotas))]
        bars = [_quota_text(q, st, bars=True) for q, st in zip(self.quotas, states, strict=True)]
        line = " · ".join(parts + bars)
        if width is None or len(line) <= width:
            return line
        short = [_quota_text(q, st, bars=False) for q, st in zip(self.quotas, states, strict=True)]
        line = " · ".join(parts + short)
        return line if len(line) <= width else line[: max(1, width - 1)] + "…"

    def _repr_html_(self) -> str:
        return progress_html(self)

    def __repr__(self) -> str:
        return self.text()


def _state(p: Progress, i: int) -> str:
    """The state of ``p.quotas[i]``: the guard's when known, else the quota's own."""
    return p.states[i] if i < len(p.states) else state(p.quotas[i])


def _quota_text(q: Quota, st: str, *, bars: bool) -> str:
    if q.total == 0:
        return f"{q.model} {st}"
    return f"{q.model} {q.console}" + (f" {bar(q.fraction_left, 10)}" if bars else "")


def progress_html(p: Progress) -> str:
    """The view as a small HTML block: one line of figures, then one bar per model."""
    head = f"<b>{html.escape(p.desc)}</b> · " if p.desc else ""
    count = f"{p.done:,}" if p.total is None else f"{p.done:,}/{p.total:,}"
    done = "" if p.finished or p.total is None else _item_bar(p.done, p.total)
    figures = (
        f"{count} items · <b>{p.calls:,}</b> calls · <b>{p.refusals:,}</b> refused · "
        + (f"<b>{p.failures:,}</b> failed · " if p.failures else "")
        + f"<b>{p.tokens:,}</b> tokens · spend <b>{money(p.spend)}</b> {html.escape(p.currency)}"
    )
    rows = []
    for i, q in enumerate(p.quotas):
        st = _state(p, i)
        if q.total == 0:  # no free quota: every call is paid for, or refused
            rows.append(
                f"<tr><td><code>{html.escape(q.model)}</code></td><td></td><td></td>"
                f"<td>{html.escape(st)}</td></tr>"
            )
            continue
        pct = 100.0 * q.fraction_left
        color = "#d9534f" if pct <= 20 else ("#f0ad4e" if pct <= 50 else "#5cb85c")
        rows.append(
            "<tr>"
            f"<td><code>{html.escape(q.model)}</code></td>"
            "<td><div style='width:160px;background:#eee;border-radius:3px'>"
            f"<div style='width:{pct:.1f}%;background:{color};height:10px;border-radius:3px'>"
            "</div></div></td>"
            f"<td style='text-align:right'>{html.escape(q.console)}</td>"
            f"<td>{html.escape(st)}</td>"
            "</tr>"
        )
    table = f"<table class='quotaguard-live'>{''.join(rows)}</table>" if rows else ""
    return f"<div class='quotaguard-live'>{head}{figures}{done}{table}</div>"


def _item_bar(done: int, total: int) -> str:
    pct = 100.0 * done / total if total else 100.0
    return (
        "<div style='width:320px;background:#eee;border-radius:3px;margin:3px 0'>"
        f"<div style='width:{pct:.1f}%;background:#5b9bd5;height:4px;border-radius:3px'>"
        "</div></div>"
    )


# ---------------------------------------------------------------------- reading the ledger


class _Totals:
    """The ledger's hourly statistics, summed per model, since a fixed instant."""

    def __init__(self, guard: QuotaGuard, since: datetime) -> None:
        self.per_model: dict[str, tuple[int, int, int, int]] = {}
        for h in guard.stats(since=since):
            calls, refusals, failures, tokens = self.per_model.get(h.model, (0, 0, 0, 0))
            self.per_model[h.model] = (
                calls + h.calls,
                refusals + h.refusals,
                failures + h.failures,
                tokens + h.input_tokens + h.output_tokens,
            )


class _Reader:
    """Reads the figures of a loop: counters against a baseline taken when it began,
    spend from the usage records since then (read once each, as they come)."""

    def __init__(self, guard: QuotaGuard, desc: str | None, total: int | None) -> None:
        self.guard = guard
        self.began = guard.now()
        # Statistics are kept per hour: read whole hours, the baseline takes off what
        # came before the loop.
        self.since = self.began.replace(minute=0, second=0, microsecond=0)
        self.base = _Totals(guard, self.since)
        self.progress = Progress(desc, total=total, currency=guard.currency)
        self._seen: set[int] = set()
        self._records_since = self.began
        self._stats: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()

    def read(self) -> bool:
        """Brings the figures up to date; True if any changed."""
        now = _Totals(self.guard, self.since)
        delta: dict[str, tuple[int, int, int, int]] = {}
        for model, figures in now.per_model.items():
            base = self.base.per_model.get(model, (0, 0, 0, 0))
            diff = tuple(a - b for a, b in zip(figures, base, strict=True))
            if any(diff):
                delta[model] = (diff[0], diff[1], diff[2], diff[3])
        stats = tuple(sorted(delta.items()))
        if stats == self._stats:
            return False
        self._stats = stats
        p = self.progress
        p.calls = sum(d[0] for d in delta.values())
        p.refusals = sum(d[1] for d in delta.values())
        p.failures = sum(d[2] for d in delta.values())
        p.tokens = sum(d[3] for d in delta.values())
        for r in self.guard.records(since=self._records_since):
            if r.id in self._seen:
                continue
            self._seen.add(r.id)
            if r.cost is not None:
                p.spend += r.cost
            self._records_since = max(self._records_since, r.time)
        quotas = {q.model: q for q in self.guard.quotas()}
        p.quotas = [quotas.get(m) or self.guard.quota(m) for m in sorted(delta)]
        p.states = [quota_state(self.guard, q) for q in p.quotas]
        return True


# ---------------------------------------------------------------------- where it shows


class _Display(Protocol):
    def show(self, progress: Progress) -> None: ...

    def close(self, progress: Progress) -> None: ...


class _Notebook:
    """One display handle, updated in place."""

    def __init__(self) -> None:
        self._handle: Any = None

    def show(self, progress: Progress) -> None:
        shown: Any = importlib.import_module("IPython.display")
        view = shown.HTML(progress_html(progress))
        if self._handle is None:
            self._handle = shown.display(view, display_id=True)
        else:
            self._handle.update(view)

    def close(self, progress: Progress) -> None:
        self.show(progress)


class _Terminal:
    """One line, rewritten with a carriage return, never wider than the terminal."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._width = 0

    def show(self, progress: Progress) -> None:
        columns = shutil.get_terminal_size((80, 24)).columns
        line = progress.text(max(10, columns - 1))
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        self._stream.write("\r" + line + pad)
        self._stream.flush()

    def close(self, progress: Progress) -> None:
        self.show(progress)
        self._stream.write("\n")
        self._stream.flush()


class _Nowhere:
    def show(self, progress: Progress) -> None:
        pass

    def close(self, progress: Progress) -> None:
        pass


def _in_notebook() -> bool:
    """True inside an IPython kernel (Jupyter, VS Code, ...), not a terminal IPython."""
    shell_module = sys.modules.get("IPython")
    if shell_module is None:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython half-installed
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _display() -> _Display:
    if _in_notebook():
        return _Notebook()
    stream = sys.stdout
    isatty = getattr(stream, "isatty", None)
    if stream is not None and callable(isatty) and isatty():
        return _Terminal(stream)
    return _Nowhere()


def track(guard: QuotaGuard, iterable: Iterable[T], desc: str | None = None) -> Iterator[T]:
    """Yields the items of ``iterable``; at each step, and when the loop ends (however it
    ends), shows the calls, refusals, tokens, spend and the quota of each model in play
    since the loop began. See the module's docstring for where it shows."""
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"desc must be a str or None, not {type(desc).__name__}")
    try:
        total: int | None = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return _track(guard, iter(iterable), desc, total)


class _View:
    """The reader and the display together. The view never breaks the loop: an error
    while reading the ledger or showing (a ledger briefly out of reach, a closed
    stream) is logged once and the view stops updating."""

    def __init__(self, guard: QuotaGuard, desc: str | None, total: int | None) -> None:
        self.progress = Progress(desc, total=total, currency=guard.currency)
        self._reader: _Reader | None = None
        self._out: _Display = _Nowhere()
        self._safely(lambda: self._start(guard, desc, total))

    def _start(self, guard: QuotaGuard, desc: str | None, total: int | None) -> None:
        self._reader = _Reader(guard, desc, total)
        self.progress = self._reader.progress
        self._out = _display()
        self._out.show(self.progress)

    def _safely(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            logger.warning("the live view stopped updating; the loop goes on", exc_info=True)
            self._reader, self._out = None, _Nowhere()

    def step(self) -> None:
        self.progress.done += 1

    def update(self) -> None:
        reader, out = self._reader, self._out
        if reader is not None:

            def refresh() -> None:
                reader.read()
                out.show(self.progress)

            self._safely(refresh)

    def close(self) -> None:
        reader, out = self._reader, self._out
        if reader is not None:
            self.progress.finished = True

            def finish() -> None:
                reader.read()
                out.close(self.progress)

            self._safely(finish)


def _track(
    guard: QuotaGuard, items: Iterator[T], desc: str | None, total: int | None
) -> Iterator[T]:
    view = _View(guard, desc, total)
    try:
        for item in items:
            view.step()  # taken: counted even if the loop stops inside it
            yield item
            view.update()
    finally:
        view.close()
