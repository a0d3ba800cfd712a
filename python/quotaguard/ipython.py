"""The IPython extension: ``%load_ext quotaguard``.

``%quota [GUARD]``
    The status view: each model's remaining quota with a bar, its expiry and state.
``%%quota [guard=GUARD] [tokens=N] [cost=X] [name=LABEL]``
    Runs the cell inside ``guard.budget(tokens=N, cost=X, name=LABEL)``: a call that
    does not fit what the budget has left raises ``BudgetExceeded`` before it is sent.
    When the cell ends, however it ends, a summary shows what it used and spent; a
    cell that raised (``BudgetExceeded`` included) then fails as any cell does.

GUARD names a ``QuotaGuard`` in the namespace. Without it the magics use the one
``QuotaGuard`` the namespace holds; with none, a guard on the default ledger
(``$QUOTAGUARD_LEDGER``, else ``~/.quotaguard/ledger.db``).
"""

from __future__ import annotations

import html
import importlib
from decimal import Decimal
from typing import Any

from ._format import money, status_html, status_text
from .exceptions import BudgetExceeded
from .guard import Budget, QuotaGuard

__all__ = ["load_ipython_extension"]

_OPTIONS = ("guard", "tokens", "cost", "name")


def load_ipython_extension(ipython: Any) -> None:
    """Registers ``%quota`` and ``%%quota``."""
    ipython.register_magic_function(_quota_magic(ipython), "line_cell", "quota")


class _UsageError(Exception):
    pass


def _usage_error(message: str) -> Exception:
    try:
        from IPython.core.error import UsageError
    except ImportError:  # pragma: no cover - the extension runs inside IPython
        return _UsageError(message)
    return UsageError(message)


class StatusView:
    """A guard's status: HTML in a notebook, text elsewhere."""

    def __init__(self, guard: QuotaGuard) -> None:
        self.guard = guard

    def _repr_html_(self) -> str:
        return status_html(self.guard)

    def __repr__(self) -> str:
        return status_text(self.guard)


class CellBudget:
    """What a ``%%quota`` cell used and spent against its budget."""

    def __init__(self, budget: Budget, currency: str, refused: BudgetExceeded | None) -> None:
        self.name = budget.name
        self.tokens_limit = budget.tokens_limit
        self.cost_limit = budget.cost_limit
        self.used = budget.used
        self.cost = budget.cost
        self.remaining = budget.remaining
        self.cost_remaining = budget.cost_remaining
        self.currency = currency
        self.refused = refused

    def _parts(self) -> list[str]:
        tokens = f"{self.used:,} tokens"
        if self.tokens_limit is not None:
            tokens += f" of {self.tokens_limit:,} ({self.remaining or 0:,} left)"
        spent = f"{money(self.cost)} {self.currency}"
        if self.cost_limit is not None:
            left = self.cost_remaining if self.cost_remaining is not None else Decimal(0)
            spent += f" of {money(self.cost_limit)} ({money(left)} left)"
        return [tokens, spent]

    def __repr__(self) -> str:
        label = f"budget {self.name!r}" if self.name else "cell budget"
        text = f"{label}: used {self._parts()[0]}, spent {self._parts()[1]}"
        if self.refused is not None:
            text += f"\nstopped: {self.refused}"
        return text

    def _repr_html_(self) -> str:
        label = f"budget <code>{html.escape(self.name)}</code>" if self.name else "cell budget"
        tokens, spent = (html.escape(p) for p in self._parts())
        stopped = ""
        if self.refused is not None:
            why = html.escape(str(self.refused))
            stopped = f"<div style='color:#d9534f'><b>stopped</b>: {why}</div>"
        bars = ""
        if self.tokens_limit:
            pct = min(100.0, 100.0 * self.used / self.tokens_limit)
            color = "#d9534f" if pct >= 80 else ("#f0ad4e" if pct >= 50 else "#5cb85c")
            bars = (
                "<div style='width:240px;background:#eee;border-radius:3px;margin:3px 0'>"
                f"<div style='width:{pct:.1f}%;background:{color};height:10px;"
                "border-radius:3px'></div></div>"
            )
        return (
            f"<div class='quotaguard-budget'><b>quotaguard</b> · {label}: used "
            f"<b>{tokens}</b>, spent <b>{spent}</b>{bars}{stopped}</div>"
        )


def _parse(line: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for word in line.split():
        key, eq, value = word.partition("=")
        if not eq or key not in _OPTIONS or not value:
            raise _usage_error(
                f"%%quota takes {', '.join(k + '=...' for k in _OPTIONS)}; not {word!r}"
            )
        if key in options:
            raise _usage_error(f"%%quota: {key} given twice")
        options[key] = value
    return options


def _guard(ipython: Any, name: str | None) -> QuotaGuard:
    namespace: dict[str, Any] = ipython.user_ns
    if name is not None:
        if name not in namespace:
            raise _usage_error(f"no variable {name!r} in the namespace")
        guard = namespace[name]
        if not isinstance(guard, QuotaGuard):
            raise _usage_error(f"{name!r} is a {type(guard).__name__}, not a QuotaGuard")
        return guard
    found: dict[int, tuple[str, QuotaGuard]] = {}
    for key, value in namespace.items():
        if not key.startswith("_") and isinstance(value, QuotaGuard):
            found.setdefault(id(value), (key, value))
    if len(found) == 1:
        return next(iter(found.values()))[1]
    if found:
        names = ", ".join(sorted(key for key, _ in found.values()))
        raise _usage_error(f"several guards in the namespace ({names}): name one, e.g. %quota NAME")
    return QuotaGuard()  # $QUOTAGUARD_LEDGER, else ~/.quotaguard/ledger.db


def _quota_magic(ipython: Any) -> Any:
    display: Any = importlib.import_module("IPython.display").display

    def quota(line: str, cell: str | None = None) -> None:
        if cell is None:
            words = line.split()
            if len(words) > 1:
                raise _usage_error(f"%quota takes at most one guard's name, not {line!r}")
            display(StatusView(_guard(ipython, words[0] if words else None)))
            return
        options = _parse(line)
        guard = _guard(ipython, options.get("guard"))
        tokens: int | None = None
        if "tokens" in options:
            try:
                tokens = int(options["tokens"].replace("_", "").replace(",", ""))
            except ValueError:
                raise _usage_error(
                    f"%%quota tokens must be a whole number, not {options['tokens']!r}"
                ) from None
        try:
            budget = guard.budget(tokens=tokens, cost=options.get("cost"), name=options.get("name"))
        except (ValueError, TypeError) as e:
            raise _usage_error(f"%%quota: {e}") from None
        code = compile(ipython.transform_cell(cell), "<%%quota cell>", "exec")
        refused: BudgetExceeded | None = None
        try:
            with budget:
                exec(code, ipython.user_global_ns, ipython.user_ns)
        except BudgetExceeded as e:
            refused = e
            raise
        finally:  # the summary shows however the cell ends; an error then shows as usual
            display(CellBudget(budget, guard.currency, refused))

    return quota
