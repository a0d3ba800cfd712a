"""`QuotaGuard`: the Rust core's guard plus what Python does best — decorators,
client wrappers, alert callbacks, budgets, exports and notebook display."""

from __future__ import annotations

import csv
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast, overload

from . import _core, _format
from ._core import Alert, Bill, Forecast, HourStats, Quota, Reservation
from ._format import RECORD_FIELDS, RecordList, StatsList, record_to_dict
from ._log import logger
from .exceptions import AccountOverdue, FreeTierOnly

if TYPE_CHECKING:
    from .clients import GuardedDashScope, GuardedOpenAI

__all__ = ["Budget", "QuotaGuard", "record_to_dict"]


# fork() while other threads are inside a ledger call: the core waits for them and
# keeps new calls out across the fork, so the child finds no lock held; the child's
# ledgers then open connections of their own.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_core._fork_prepare,
        after_in_parent=_core._fork_parent,
        after_in_child=_core._fork_child,
    )

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# Service answers that R12 turns into ledger updates: the model's free quota is gone,
# or the account is overdue.
DEPLETED_CODES = frozenset(
    {"AllocationQuota.FreeTierOnly", "Throttling.AllocationQuota", "insufficient_quota"}
)
OVERDUE_CODES = frozenset({"Arrearage", "PrepaidBillOverdue", "PostpaidBillOverdue"})
AlertCallback = Callable[[Alert], object]


def _sink(ref: weakref.ref[QuotaGuard]) -> Callable[[list[Alert]], None]:
    # A weak reference: the core must not keep its own Python wrapper alive.
    def deliver(alerts: list[Alert]) -> None:
        guard = ref()
        if guard is not None:
            _deliver(guard, alerts)

    return deliver


def _deliver(guard: QuotaGuard, alerts: list[Alert]) -> None:
    with guard._callbacks_lock:
        callbacks = list(guard._callbacks)
    for alert in alerts:
        logger.warning("%s", alert)
        for cb in callbacks:
            try:
                cb(alert)
            except Exception:
                logger.exception("alert callback %r raised; the call goes on", cb)


class QuotaGuard:
    """Guards DashScope / Qwen calls against the free token quota.

    See the README for a tour; docs/api.md is the reference and docs/rules.md the rules.
    """

    def __init__(
        self,
        ledger: str | PathLike[str] | None = None,
        account: str = "default",
        user: str = "root",
        workspace: str | None = None,
        region: str = "cn-beijing",
        site: str = "china",
        verified: bool = True,
        catalog: str | PathLike[str] | None = None,
        lease_seconds: float = 600,
        clock: Callable[[], Any] | None = None,
    ) -> None:
        # The Rust core does the work; this object holds it (its private hooks stay
        # on it, off the public class) and adds what Python does best.
        self._core = _core.QuotaGuard(
            ledger, account, user, workspace, region, site, verified, catalog, lease_seconds, clock
        )
        self._callbacks: list[AlertCallback] = []
        self._callbacks_lock = threading.Lock()
        self._core._set_alert_sink(_sink(weakref.ref(self)))

    def __repr__(self) -> str:
        return (
            f"QuotaGuard(ledger={self.ledger!r}, account={self.account!r}, user={self.user!r}, "
            f"region={self.region!r}, site={self.site!r})"
        )

    def __reduce__(self) -> NoReturn:
        # A guard holds an open ledger (a connection, a private memory ledger): a copy
        # would not be the same guard. Open one in each process instead.
        raise TypeError(
            "cannot pickle or copy a QuotaGuard: it holds an open ledger; "
            "create a QuotaGuard in each process with the same ledger"
        )

    # ---- configuration --------------------------------------------------------

    @property
    def ledger(self) -> str:
        """Where the ledger lives: a path or URL, any password shown as ``***``."""
        return self._core.ledger

    @property
    def account(self) -> str:
        return self._core.account

    @property
    def user(self) -> str:
        return self._core.user

    @property
    def workspace(self) -> str | None:
        return self._core.workspace

    @property
    def region(self) -> str:
        return self._core.region

    @property
    def site(self) -> str:
        return self._core.site

    @property
    def verified(self) -> bool:
        return self._core.verified

    @property
    def lease_seconds(self) -> float:
        return self._core.lease_seconds

    @property
    def currency(self) -> str:
        """``"CNY"`` on the China site, ``"USD"`` on the international site."""
        return self._core.currency

    def now(self) -> datetime:
        """The current time as the guard's clock reads it, an aware UTC datetime."""
        return self._core.now()

    # ---- quota ----------------------------------------------------------------

    def grant(
        self,
        model: str,
        tokens: int | None = None,
        activated_at: datetime | str | float | None = None,
        valid_days: int | None = None,
    ) -> Quota:
        """Records a model's free quota (R3): the catalogue's figure unless ``tokens``."""
        return self._core.grant(model, tokens, activated_at, valid_days)

    def remaining(self, model: str) -> int:
        """The free tokens a new call could use now (0 when expired or never granted)."""
        return self._core.remaining(model)

    def quota(self, model: str) -> Quota:
        """One model's free quota (a model never granted reads as a quota of 0)."""
        return self._core.quota(model)

    def quotas(self) -> list[Quota]:
        """Every granted model's free quota."""
        return self._core.quotas()

    def set_free_only(self, models: str | Sequence[str], enabled: bool = True) -> list[str]:
        """The Free Quota Only switch (R5): a model, a list, or ``"all"`` (every model
        with tokens left whose switch was never set). Returns the models changed."""
        return self._core.set_free_only(models, enabled)

    def sync(self, model: str, console_text: str, force: bool = False) -> Quota:
        """Reconciles with the console's figure, ``"362,917/1,000,000"`` (R12)."""
        return self._core.sync(model, console_text, force)

    # ---- calls ----------------------------------------------------------------

    def default_max_output(self, model: str) -> int:
        """The output limit assumed for a call that states no ``max_tokens``."""
        return self._core.default_max_output(model)

    def input_bound(
        self,
        *,
        messages: Iterable[Mapping[str, Any] | Any] | None = None,
        prompt: str | None = None,
        input: str | Iterable[str] | None = None,
        extra_tokens: int | None = None,
    ) -> int:
        """An upper bound of the input tokens the service bills for a request (R8)."""
        return self._core.input_bound(
            messages=messages, prompt=prompt, input=input, extra_tokens=extra_tokens
        )

    def reserve(
        self,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        kind: str = "realtime",
        *,
        thinking: bool = False,
    ) -> Reservation:
        """Holds a call's worst case, ``input_tokens + max_output_tokens``, before the
        call is sent (R8, R9); raises when the call may not go, holding nothing."""
        return self._core.reserve(model, input_tokens, max_output_tokens, kind, thinking=thinking)

    def model_info(self, model: str) -> dict[str, Any]:
        """What the catalogue says of a model's reasoning and output limits."""
        return self._core.model_info(model)

    def first_free(
        self,
        models: Sequence[str],
        input_tokens: int | None = None,
        max_output_tokens: int | None = None,
    ) -> str | None:
        """The first of ``models`` whose free quota covers the worst case now (R16)."""
        return self._core.first_free(models, input_tokens, max_output_tokens)

    # ---- money ----------------------------------------------------------------

    @property
    def balance(self) -> Decimal | None:
        """The tracked balance (R7), or ``None`` until one is stated."""
        return self._core.balance

    @property
    def overdue(self) -> bool:
        return self._core.overdue

    def top_up(self, amount: Decimal | int | str) -> Decimal | None:
        """Adds to the balance (starting to track it); a balance of zero or more clears
        overdue."""
        return self._core.top_up(amount)

    def set_balance(self, amount: Decimal | int | str) -> Decimal | None:
        return self._core.set_balance(amount)

    def mark_overdue(self) -> None:
        self._core.mark_overdue()

    # ---- kill switch and forecasts ---------------------------------------------

    def block(self, reason: str) -> None:
        """Refuses every call of every guard on this ledger and account (R15) until
        :meth:`unblock`."""
        self._core.block(reason)

    def unblock(self) -> None:
        self._core.unblock()

    @property
    def blocked(self) -> str | None:
        """The reason of the block while the ledger is blocked, else ``None``."""
        return self._core.blocked

    def forecast(self, model: str, window_hours: float | None = 24.0) -> Forecast:
        """The burn rate of a model's free quota, when it runs out, what expires (R17)."""
        return self._core.forecast(model, window_hours)

    def forecasts(self, window_hours: float | None = 24.0) -> list[Forecast]:
        """:meth:`forecast` of every granted model."""
        return self._core.forecasts(window_hours)

    # ---- records, bills, statistics --------------------------------------------

    def bill(self, month: str | None = None, *, day: str | None = None) -> Bill:
        """The bill of a CST month (``"2026-11"``, default: this month) or day (R14)."""
        return self._core.bill(month, day=day)

    def check(self) -> list[str]:
        """The ledger's integrity and invariants: what does not hold, one line each."""
        return self._core.check()

    def compact(self, before: datetime | str | float) -> int:
        """Deletes records before ``before``; bills and statistics are unchanged."""
        return self._core.compact(before)

    def catalog_info(self) -> dict[str, Any]:
        """The model catalogue as plain data."""
        return self._core.catalog_info()

    # ---- alerts -------------------------------------------------------------

    def on_alert(self, callback: AlertCallback) -> AlertCallback:
        """Calls ``callback(alert)`` for every alert (R10); usable as a decorator.

        Callbacks run synchronously in the thread whose settle crossed the line. One
        that raises is logged and never breaks the call."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        with self._callbacks_lock:
            self._callbacks.append(callback)
        return callback

    @property
    def alert_threshold(self) -> float | None:
        """Quota alerts fire at or below this fraction of a model's total; ``None``: off."""
        return self._core.alert_threshold

    @alert_threshold.setter
    def alert_threshold(self, value: float | None) -> None:
        self._core.alert_threshold = value

    @property
    def alert_thresholds(self) -> list[float]:
        """Quota alert thresholds, each a fraction firing once per model; ``[]``: off."""
        return self._core.alert_thresholds

    @alert_thresholds.setter
    def alert_thresholds(self, value: Iterable[float] | None) -> None:
        self._core.alert_thresholds = value

    @property
    def daily_spend_alert(self) -> Decimal | dict[str | None, Decimal] | None:
        """High-spending alert: an amount (whole account) or ``{model: amount}``."""
        return self._core.daily_spend_alert

    @daily_spend_alert.setter
    def daily_spend_alert(
        self, value: Decimal | int | str | Mapping[str | None, Decimal | int | str] | None
    ) -> None:
        self._core.daily_spend_alert = value

    @property
    def expiry_alert_days(self) -> int | None:
        """Days before expiry at which a model with free quota left alerts once."""
        return self._core.expiry_alert_days

    @expiry_alert_days.setter
    def expiry_alert_days(self, value: int | None) -> None:
        self._core.expiry_alert_days = value

    def check_alerts(self) -> list[Alert]:
        """Evaluates the alerts that come with time rather than with a call, now."""
        return self._core.check_alerts()

    # ---- the service's own answers (R12) ------------------------------------

    def service_error(self, model: str, code: str, message: str = "") -> Exception | None:
        """Applies a service error code to the ledger and returns the exception to raise.

        ``AllocationQuota.FreeTierOnly`` and ``Throttling.AllocationQuota`` (compatible
        mode: ``insufficient_quota``; a model without pay-as-you-go whose free quota is
        gone) set the model's remaining to 0 and return a :class:`FreeTierOnly`;
        ``Arrearage``, ``PrepaidBillOverdue`` and ``PostpaidBillOverdue`` mark the
        account overdue and return an :class:`AccountOverdue` (R12). The exception keeps
        its canonical ``code``; ``service_code`` is the service's. Any other code
        returns ``None``."""
        said = f": {message}" if message else ""
        if code in DEPLETED_CODES:
            self._core._mark_depleted(model)
            return FreeTierOnly(
                f"the service refused {model!r} with {code}{said}; nothing was charged, and "
                "its free quota is now recorded as used up. To go on:\n"
                "  - send the call to a model with free quota left (fallback=[...] does it)\n"
                "  - or switch Free Quota Only off for it in the console to let it be charged",
                model,
                0,
                0,
                "exhausted",
                code,
            )
        if code in OVERDUE_CODES:
            self.mark_overdue()
            q = self.quota(model)
            return AccountOverdue(
                f"the service refused {model!r} with {code}{said}: the account is overdue; "
                "nothing was charged. To go on:\n"
                "  - top up the account, then record it: guard.top_up(amount) or "
                "guard.set_balance(amount)",
                model,
                q.remaining,
                0,
                "overdue",
                code,
            )
        return None

    # ---- guarding calls -----------------------------------------------------

    @overload
    def wrap(self, fn: F, /) -> F: ...

    @overload
    def wrap(
        self,
        fn: None = None,
        /,
        *,
        model: str | None = None,
        kind: str = "realtime",
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
    ) -> Callable[[F], F]: ...

    def wrap(
        self,
        fn: F | None = None,
        /,
        *,
        model: str | None = None,
        kind: str = "realtime",
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
    ) -> F | Callable[[F], F]:
        """Guards a function that calls the service: ``@guard.wrap`` or
        ``@guard.wrap(model="qwen-max")``. Sync, async and streaming functions; see
        :func:`quotaguard.wrap.wrap`."""
        from .wrap import wrap as _wrap

        return cast(
            "F | Callable[[F], F]",
            _wrap(
                self,
                fn,
                model=model,
                kind=kind,
                clip=clip,
                max_input_tokens=max_input_tokens,
                fallback=fallback,
            ),
        )

    def wrap_openai(
        self,
        client: Any,
        *,
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
    ) -> GuardedOpenAI:
        """An ``openai.OpenAI`` / ``AsyncOpenAI`` client whose every billable request is
        guarded; see :func:`quotaguard.clients.wrap_openai`."""
        from .clients import wrap_openai

        return wrap_openai(
            self, client, clip=clip, max_input_tokens=max_input_tokens, fallback=fallback
        )

    def wrap_dashscope(
        self,
        module: Any = None,
        *,
        clip: bool = False,
        max_input_tokens: int | None = None,
        fallback: Sequence[str] | None = None,
    ) -> GuardedDashScope:
        """The ``dashscope`` module with its billable APIs guarded (``Generation``,
        ``MultiModalConversation``, ``TextEmbedding``, ``MultiModalEmbedding``,
        ``TextReRank``, ``Application`` and their ``Aio*`` variants) and every other
        API refused under Free Quota Only; see :func:`quotaguard.clients.wrap_dashscope`."""
        from .clients import wrap_dashscope

        return wrap_dashscope(
            self, module, clip=clip, max_input_tokens=max_input_tokens, fallback=fallback
        )

    # ---- budgets ------------------------------------------------------------

    def budget(
        self,
        tokens: int | None = None,
        cost: Decimal | int | str | None = None,
        name: str | None = None,
    ) -> Budget:
        """A sub-limit on everything this guard admits inside ``with``: a call whose
        worst case does not fit raises :class:`BudgetExceeded` before it is sent."""
        return Budget(self, tokens=tokens, cost=cost, name=name)

    # ---- records and export -------------------------------------------------

    def export(self, path: str | PathLike[str], **filters: Any) -> int:
        """Writes records to ``path``: CSV (``.csv``), JSON Lines (``.jsonl``/``.ndjson``)
        or Parquet (``.parquet``, needs pyarrow). Filters as for :meth:`records`.
        Returns the number of records written."""
        target = Path(path)
        rows = [record_to_dict(r) for r in self.records(**filters)]
        suffix = target.suffix.lower()
        if suffix == ".csv":
            with target.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
                w.writeheader()
                for row in rows:
                    w.writerow({k: _plain(v) for k, v in row.items()})
        elif suffix in (".jsonl", ".ndjson"):
            with target.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
        elif suffix == ".parquet":
            try:
                import pyarrow as pa  # type: ignore[import-not-found,import-untyped,unused-ignore]
                import pyarrow.parquet as pq  # type: ignore[import-not-found,import-untyped,unused-ignore]
            except ImportError as e:
                raise ImportError("writing Parquet needs pyarrow: pip install pyarrow") from e
            table = pa.Table.from_pylist([{k: _plain(v) for k, v in r.items()} for r in rows])
            pq.write_table(table, target)
        else:
            raise ValueError(
                f"export path {str(path)!r} must end in .csv, .jsonl, .ndjson or .parquet"
            )
        return len(rows)

    def to_pandas(self, tz: str = "Asia/Shanghai", cost: str = "decimal", **filters: Any) -> Any:
        """Records as a ``pandas.DataFrame`` (needs pandas): ``id`` as text, ``time`` in
        ``tz`` (``"Asia/Shanghai"`` or ``"UTC"``), ``cost`` as ``Decimal`` or, with
        ``cost="float"``, ``float``. Filters as for :meth:`records`."""
        return self.records(**filters).to_pandas(tz=tz, cost=cost)

    # ---- display ------------------------------------------------------------
    # Thin: how things look is in _format.

    def status(self) -> str:
        """Each model's remaining quota as the console writes it, % left, used, reserved,
        expiry (CST) and state; then the kill switch and the balance when they apply."""
        return _format.status_text(self)

    def _repr_html_(self) -> str:
        return _format.status_html(self)

    def records(
        self,
        model: str | None = None,
        user: str | None = None,
        since: Any = None,
        until: Any = None,
        *,
        workspace: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> RecordList:
        """R11: the usage records, oldest first, as a list that also shows itself as a
        table and has ``to_pandas()``."""
        return RecordList(
            self._core.records(
                model, user, since, until, workspace=workspace, kind=kind, limit=limit
            )
        )

    def stats(self, model: str | None = None, since: Any = None) -> list[HourStats]:
        """R14: calls per model per hour, as a list that shows itself as a table."""
        return StatsList(self._core.stats(model, since))

    def plot(self, model: str | None = None) -> Any:
        """A matplotlib figure of the free tokens remaining over time, with each quota's
        expiry (needs matplotlib: ``pip install 'quotaguard[plot]'``)."""
        return _format.plot(self, model)

    # ---- live view ----------------------------------------------------------

    def track(self, iterable: Iterable[T], desc: str | None = None) -> Iterator[T]:
        """Yields the items of ``iterable`` and, at each step and at the end, updates one
        live view of the calls, refusals, tokens, spend and quotas since the loop began:
        a display in a notebook, one line on a terminal, nothing elsewhere."""
        from .live import track

        return track(self, iterable, desc)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


class Budget:
    """A sub-limit on what one guard admits while it is active (``with guard.budget(...)``).

    Budgets nest (the tightest wins), are thread-safe, and work as ``async with`` too.
    """

    def __init__(
        self,
        guard: QuotaGuard,
        *,
        tokens: int | None = None,
        cost: Decimal | int | str | None = None,
        name: str | None = None,
    ) -> None:
        # Validated by the core now, not at __enter__, so a bad limit fails where it is
        # written (ValueError or TypeError naming it); the limits are then as it read them.
        core = guard._core
        probe = core._open_budget(tokens, cost, name)
        try:
            _, _, tokens_limit, cost_limit = core._budget_state(probe)
        finally:
            core._close_budget(probe)
            core._drop_budget(probe)
        self._core = core
        self.name = name
        self.tokens_limit = tokens_limit
        self.cost_limit = cost_limit
        self._id: int | None = None
        self._final: tuple[int, Decimal, int | None, Decimal | None] | None = None

    def __enter__(self) -> Budget:
        if self._id is not None:
            raise RuntimeError("a budget can be entered once")
        self._id = self._core._open_budget(self.tokens_limit, self.cost_limit, self.name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._id is not None and self._final is None:
            self._core._close_budget(self._id)
            # Keep the figures, then let the guard forget the budget.
            self._final = self._core._budget_state(self._id)
            self._core._drop_budget(self._id)

    async def __aenter__(self) -> Budget:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _state(self) -> tuple[int, Decimal, int | None, Decimal | None]:
        if self._final is not None:
            return self._final
        if self._id is None:
            return (0, Decimal(0), self.tokens_limit, self.cost_limit)
        return self._core._budget_state(self._id)

    @property
    def used(self) -> int:
        """Tokens used by calls settled inside the budget."""
        return self._state()[0]

    @property
    def cost(self) -> Decimal:
        """What calls settled inside the budget cost (unpriced calls add nothing)."""
        return self._state()[1]

    @property
    def remaining(self) -> int | None:
        """Tokens left (calls in flight held at their worst case); None without a token limit."""
        return self._state()[2]

    @property
    def cost_remaining(self) -> Decimal | None:
        return self._state()[3]

    def __repr__(self) -> str:
        return _format.budget_text(self)

    def _repr_html_(self) -> str:
        return _format.budget_html(self)
