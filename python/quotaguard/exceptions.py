"""The exceptions quotaguard raises.

Every refusal is a :class:`FreeTierOnly` (``except FreeTierOnly`` catches them
all); :class:`AccountOverdue` is the one for an overdue account. Each class
keeps all of its attributes in ``args``, so instances pickle and cross process
boundaries intact.
"""

from __future__ import annotations

__all__ = [
    "AccountOverdue",
    "BudgetExceeded",
    "FreeTierOnly",
    "LeaseExpiredWarning",
    "LedgerError",
    "LedgerPermissionWarning",
    "NoUsageWarning",
    "QuotaGuardError",
    "UnguardedWarning",
]


class QuotaGuardError(Exception):
    """Base class of quotaguard's errors; also raised for rejected operations
    such as settling a reservation twice or an R5 switch change the platform
    would refuse."""


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
