"""quotaguard: never be charged, or refused, by surprise on Alibaba Cloud Model Studio.

A shared, exact ledger of the DashScope free token quota that admits each Qwen call
against its worst case before it is sent::

    import quotaguard as qg

    guard = qg.QuotaGuard()            # ~/.quotaguard/ledger.db, shared by every process
    guard.grant("qwen-plus")           # 1,000,000 free tokens for 90 days
    client = guard.wrap_openai(openai.OpenAI(base_url=..., api_key=...))
"""

from __future__ import annotations

from typing import Any

from . import _core
from ._autoload import find_vocabulary
from ._core import (
    Alert,
    Bill,
    BillLine,
    Forecast,
    HourStats,
    Quota,
    Reservation,
    UsageRecord,
    count_tokens,
)
from ._format import RecordList, StatsList
from .exceptions import (
    AccountOverdue,
    Blocked,
    BudgetExceeded,
    FreeTierOnly,
    LeaseExpiredWarning,
    LedgerError,
    LedgerPermissionWarning,
    NoFreeQuotaWarning,
    NoUsageWarning,
    QuotaGuardError,
    UnguardedWarning,
)
from .guard import Budget, QuotaGuard, record_to_dict

__version__: str = _core.__version__

__all__ = [
    "AccountOverdue",
    "Alert",
    "Bill",
    "BillLine",
    "Blocked",
    "Budget",
    "BudgetExceeded",
    "Forecast",
    "FreeTierOnly",
    "HourStats",
    "LeaseExpiredWarning",
    "LedgerError",
    "LedgerPermissionWarning",
    "NoFreeQuotaWarning",
    "NoUsageWarning",
    "Quota",
    "QuotaGuard",
    "QuotaGuardError",
    "RecordList",
    "Reservation",
    "StatsList",
    "UnguardedWarning",
    "UsageRecord",
    "__version__",
    "count_tokens",
    "find_vocabulary",
    "record_to_dict",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext quotaguard``: the ``%quota`` and ``%%quota`` magics
    (see ``quotaguard.ipython``)."""
    from .ipython import load_ipython_extension as load

    load(ipython)
