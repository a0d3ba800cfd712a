"""The exceptions and warnings quotaguard raises.

Every refusal of the free-quota rules is a :class:`FreeTierOnly` (``except
FreeTierOnly`` catches them all); :class:`AccountOverdue` is the one for an overdue
account. A refusal's message says that the call was not sent and what to do. Each class
keeps all of its attributes in ``args``, so instances pickle and cross process
boundaries intact.

A refusal raised through a guarded function or client carries a traceback that starts
at the caller's line: quotaguard's own frames (and those of the SDK it runs under) are
cut at the public entry point, and IPython shows none of them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType, TracebackType
from typing import Any, TypeVar, cast

__all__ = [
    "AccountOverdue",
    "Blocked",
    "BudgetExceeded",
    "FreeTierOnly",
    "LeaseExpiredWarning",
    "LedgerError",
    "LedgerPermissionWarning",
    "NoFreeQuotaWarning",
    "NoUsageWarning",
    "QuotaGuardError",
    "UnguardedWarning",
]

# Packages whose frames a refusal's traceback does not show: quotaguard's own, and the
# SDKs and HTTP stacks its guard runs inside (the OpenAI client calls the guard from its
# transport step). Only frames of the call path under the caller's line are cut.
_INTERNAL = frozenset(
    {"quotaguard", "openai", "dashscope", "httpx", "httpcore", "requests", "urllib3", "aiohttp"}
)


def _internal(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__")
    return isinstance(name, str) and name.partition(".")[0] in _INTERNAL


def _outside(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the entries of internal frames (the caller's frames stay)."""
    kept: list[TracebackType] = []
    while tb is not None:
        if not _internal(tb.tb_frame):
            kept.append(tb)
        tb = tb.tb_next
    out: TracebackType | None = None
    for entry in reversed(kept):
        out = TracebackType(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


class QuotaGuardError(Exception):
    """Base class of quotaguard's errors; also raised for rejected operations
    such as settling a reservation twice or an R5 switch change the platform
    would refuse."""

    def _render_traceback_(self) -> list[str]:
        """IPython's hook for an exception's traceback: a refusal's shows no frame of
        quotaguard or of the SDK it runs under, only the caller's."""
        tb = self.__traceback__
        if isinstance(self, _REFUSALS):
            tb = _outside(tb)
        shell: Any = None
        try:
            shell = importlib.import_module("IPython").get_ipython()
        except Exception:  # not under IPython
            pass
        if shell is None:
            return traceback.format_exception(type(self), self, tb)
        lines: list[str] = shell.InteractiveTB.structured_traceback(type(self), self, tb)
        return lines


class FreeTierOnly(QuotaGuardError):
    """The call was refused before it was sent: it would have been charged (or
    refused by the platform with ``AllocationQuota.FreeTierOnly``).

    ``reason`` is one of ``"exhausted"``, ``"expired"``, ``"no_quota"``,
    ``"not_covered"``, ``"unverified"``, ``"unbounded"`` (input that cannot be bounded
    and no ``max_input_tokens=``), ``"unguarded"`` (a method quotaguard cannot guard)
    (``"overdue"`` for :class:`AccountOverdue`). ``code`` is always the canonical one;
    ``service_code`` is the service's own when the refusal came from the service
    (``"Throttling.AllocationQuota"``, ``"PrepaidBillOverdue"``, ...), else ``None``.
    """

    code: str = "AllocationQuota.FreeTierOnly"

    def __init__(
        self,
        message: str,
        model: str | None = None,
        remaining: int = 0,
        requested: int = 0,
        reason: str = "exhausted",
        service_code: str | None = None,
    ) -> None:
        super().__init__(message, model, remaining, requested, reason, service_code)
        self.message = message
        self.model = model
        self.remaining = remaining
        self.requested = requested
        self.reason = reason
        self.service_code = service_code

    def __str__(self) -> str:
        return self.message


class AccountOverdue(FreeTierOnly):
    """The account has an overdue balance: every call is refused (code ``Arrearage``)."""

    code: str = "Arrearage"

    def __init__(
        self,
        message: str,
        model: str | None = None,
        remaining: int = 0,
        requested: int = 0,
        reason: str = "overdue",
        service_code: str | None = None,
    ) -> None:
        super().__init__(message, model, remaining, requested, reason, service_code)


class BudgetExceeded(QuotaGuardError):
    """A call's worst case does not fit what an active ``guard.budget()`` has left."""


class LedgerError(QuotaGuardError):
    """The ledger could not be opened, read or written. ``ledger`` names it."""

    def __init__(self, message: str, ledger: str | None = None) -> None:
        super().__init__(message, ledger)
        self.message = message
        self.ledger = ledger

    def __str__(self) -> str:
        return self.message


class Blocked(QuotaGuardError):
    """The ledger's kill switch is on (``guard.block(reason)``): every call of every guard
    on it is refused, before it is sent, until ``guard.unblock()``. ``reason`` says why."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message, reason)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message


_REFUSALS = (FreeTierOnly, BudgetExceeded, Blocked)

E = TypeVar("E", bound=BaseException)
F = TypeVar("F", bound=Callable[..., Any])


def _cut(exc: E) -> E:
    """``exc`` with the internal frames taken out of its traceback, to be raised again
    at a public entry point: the traceback then runs from the caller's line to that
    entry point. Its cause and context stay."""
    return exc.with_traceback(_outside(exc.__traceback__))


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    __tracebackhide__ = True  # IPython and pytest hide this frame
    try:
        return await awaitable
    except _REFUSALS as refused:
        refused_before_sending = _cut(refused)
    raise refused_before_sending  # its cause and context stay


def _entry(fn: F) -> F:
    """Marks ``fn`` as a public entry point: a refusal raised under it (or under the
    coroutine it returns) comes out with quotaguard's frames cut from its traceback."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def entry_async(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            try:
                return await fn(*args, **kwargs)
            except _REFUSALS as refused:
                refused_before_sending = _cut(refused)
            raise refused_before_sending

        return cast(F, entry_async)

    @functools.wraps(fn)
    def entry(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            result = fn(*args, **kwargs)
        except _REFUSALS as refused:
            refused_before_sending = _cut(refused)
        else:
            if inspect.iscoroutine(result):
                return _awaited(cast(Coroutine[Any, Any, Any], result))
            return result
        raise refused_before_sending

    return cast(F, entry)


def _warn_outside(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointed at the first frame outside quotaguard and the SDK it
    runs under: the line that made the call."""
    level = 2
    frame = sys._getframe(1)
    while frame.f_back is not None and _internal(frame):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


class LeaseExpiredWarning(UserWarning):
    """A reservation was settled after its lease ended; the usage was recorded anyway."""


class LedgerPermissionWarning(UserWarning):
    """The ledger's directory or files are open to other users and quotaguard could not
    tighten them (it tightens what it owns to ``0600``/``0700`` by itself)."""


class NoUsageWarning(UserWarning):
    """A guarded function returned no usage: its calls are recorded at their worst case.
    Warned once per function."""


class UnguardedWarning(UserWarning):
    """A client method quotaguard cannot guard was sent unguarded (Free Quota Only is off
    for its model). Warned once per method."""


class NoFreeQuotaWarning(UserWarning):
    """A call went to a model with no free quota here, so it is charged: the model was
    never granted in the ledger (its name may be misspelt: the closest catalogue names
    are suggested), or the guard's region has no free quota. Warned once per guard and
    model, with what to do."""
