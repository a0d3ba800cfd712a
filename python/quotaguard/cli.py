"""The ``quotaguard`` command line: the ledger as the Model Studio console shows it.

``quotaguard status | records | bill | stats | grant | free-only | sync | top-up |
prices | forecast | block | unblock | export | doctor | demo``, each reading the same
ledger as the library (``--ledger URL``, else ``$QUOTAGUARD_LEDGER``, else
``~/.quotaguard/ledger.db``) and each taking ``--json``. Bad input is reported on one
line of stderr (``quotaguard: error: ...``) with exit code 2; an operation the rules
refuse, or a ledger that cannot be used, exits 1; ``status --fail-below`` exits 3 when a
model is below. Never a traceback (``QUOTAGUARD_DEBUG=1`` shows one).

On a terminal the output fits its width and is coloured (never with ``NO_COLOR``);
piped, it is the library's own text, whole.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from ._format import (
    BOLD,
    CST,
    GREEN,
    RED,
    YELLOW,
    Cell,
    Column,
    Terminal,
    bill_data,
    bill_lines,
    cell,
    colour_enabled,
    cst,
    format_bill,
    format_quota,
    ledger_accounts,
    money,
    paint,
    print_json,
    quota_data,
    quota_lines,
    stats_data,
    status_lines,
    tier_label,
)
from .exceptions import QuotaGuardError

if TYPE_CHECKING:
    from .guard import QuotaGuard

__all__ = ["format_bill", "format_quota", "main"]

PROG = "quotaguard"
COMMANDS = (
    "status",
    "records",
    "bill",
    "stats",
    "grant",
    "free-only",
    "sync",
    "top-up",
    "prices",
    "forecast",
    "block",
    "unblock",
    "export",
    "doctor",
    "demo",
)
BELOW = 3  # status --fail-below: a model is below the line

LEDGER_HELP = (
    "memory://, a file path or sqlite:///path.db, redis://[:password@]host:port/db, "
    "rediss://... (TLS), redis+cluster://host:port,host:port... "
    "(default: $QUOTAGUARD_LEDGER, else ~/.quotaguard/ledger.db)"
)


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit code 2."""


class Refused(Exception):
    """An operation the command line will not do as asked (say, overwrite a file that
    is not its own): reported on one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage and exits; a one-line message is kinder in scripts.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------- parsing values


def _token_count(text: str) -> int:
    """``1000000``, ``1,000,000`` or ``1_000_000``."""
    cleaned = text.strip().replace(",", "").replace("_", "")
    if not cleaned.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(cleaned)


def _positive_int(text: str) -> int:
    n = _token_count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def parse_instant(text: str, *, end_of_day: bool = False) -> datetime:
    """An ISO-8601 date or time as an aware datetime. Without an offset it is read in
    China Standard Time, where the platform counts days; a bare date is that day's
    midnight (with ``end_of_day``, the next midnight, so ``--until 2026-11-26`` takes
    the whole day in)."""
    raw = text.strip()
    if raw.endswith(("Z", "z")):  # fromisoformat learnt "Z" only in Python 3.11
        raw = raw[:-1] + "+00:00"
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        pass
    else:
        start = datetime.combine(day, time(0), tzinfo=CST)
        return start + timedelta(days=1) if end_of_day else start
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 date or time (e.g. 2026-11-26 or "
            "2026-11-26T09:30:00+08:00)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=CST)


def _percent(text: str) -> float:
    """``20%``, ``20`` or ``12.5 %``: a share of each quota's total, more than 0, at most
    100, returned as a fraction."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 20%)") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0% and at most 100%")
    return value / 100


def _instant(text: str) -> datetime:
    return parse_instant(text)


def _instant_end(text: str) -> datetime:
    return parse_instant(text, end_of_day=True)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _print_json(data: Any, out: IO[str] | None = None) -> None:
    print_json(data, sys.stdout if out is None else out)


def _say(text: str, term: Terminal, indent: int = 2) -> None:
    print(term.wrap(text, indent))


# ---------------------------------------------------------------------- commands


def _guard(args: argparse.Namespace, **overrides: Any) -> QuotaGuard:
    from .guard import QuotaGuard

    # An option given is passed as given: `--account ""` is an error, not the default.
    def given(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    options: dict[str, Any] = {
        "ledger": given("ledger", None),
        "account": given("account", "default"),
        "region": given("region", "cn-beijing"),
        "site": given("site", "china"),
        "catalog": given("catalog", None),
    }
    options.update(overrides)
    return QuotaGuard(**options)


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _nothing_here(guard: QuotaGuard) -> str:
    """Why an account shows nothing, and which accounts the ledger does hold."""
    accounts = ledger_accounts(guard)
    others = [a for a in accounts or () if a != guard.account]
    if others:
        names = ", ".join(others)
        hint = f"--account {others[0]}" if len(others) == 1 else "--account NAME"
        return (
            f"no quota for account {guard.account!r} in this ledger; accounts here: "
            f"{names} — use {hint}"
        )
    if accounts is None:
        return (
            f"no free quota granted for account {guard.account!r} in this ledger "
            "(`quotaguard grant MODEL`; another account: --account NAME; the demo's is "
            "'demo')"
        )
    return "(no free quota granted yet: guard.grant(model) or `quotaguard grant`)"


def cmd_status(args: argparse.Namespace) -> int:
    guard = _guard(args)
    quotas = [guard.quota(m) for m in args.model] if args.model else guard.quotas()
    threshold: float | None = args.fail_below
    below = [] if threshold is None else [q for q in quotas if q.fraction_left < threshold]
    failed = threshold is not None and (bool(below) or not quotas)
    if _json(args):
        data: dict[str, Any] = {
            "account": guard.account,
            "region": guard.region,
            "site": guard.site,
            "ledger": guard.ledger,
            "balance": guard.balance,
            "currency": guard.currency,
            "overdue": guard.overdue,
            "blocked": guard.blocked,
            "quotas": [quota_data(q, guard) for q in quotas],
        }
        if not quotas:
            data["note"] = _nothing_here(guard)
        if threshold is not None:
            data["fail_below"] = threshold
            data["below"] = [q.model for q in below]
        _print_json(data)
    else:
        term = Terminal.of()
        empty = _nothing_here(guard) if not quotas else None
        print(
            "\n".join(
                status_lines(
                    guard,
                    term.width,
                    term.colour,
                    quotas=quotas if args.model else None,
                    empty=empty,
                )
            )
        )
    if failed and threshold is not None:
        line = f"{threshold * 100:g}%"
        colour = colour_enabled(sys.stderr)
        if below:
            which = ", ".join(f"{q.model} {q.fraction_left:.1%} ({q.console})" for q in below)
            print(f"{PROG}: {paint(f'below {line}', RED, colour)}: {which}", file=sys.stderr)
        else:
            print(
                f"{PROG}: {paint(f'below {line}', RED, colour)}: no quota to check for "
                f"account {guard.account!r}",
                file=sys.stderr,
            )
        return BELOW
    return 0


RECORD_COLUMNS = (
    "time (CST)",
    "user",
    "model",
    "kind",
    "cost type",
    "input",
    "output",
    "free",
    "billable",
    "cost",
)
RECORD_FIT = (
    Column("time (CST)", keep=8, drop=False, squeeze=2),
    Column("user", keep=3),
    Column("model", keep=9, drop=False, shrink=True),
    Column("kind", keep=1),
    Column(("cost type", "type"), keep=4),
    Column(("input", "in"), right=True, keep=7),
    Column(("output", "out"), right=True, keep=7),
    Column("free", right=True, keep=6),
    Column("billable", right=True, keep=5),
    Column("cost", right=True, keep=8),
)
COST_TYPE_SGR = {"free_quota": GREEN, "split": YELLOW, "pay_as_you_go": YELLOW, "unpriced": RED}


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "user": args.user, "since": args.since, "until": args.until}


def cmd_records(args: argparse.Namespace) -> int:
    from ._format import RECORD_FIELDS, record_to_dict

    if _json(args) and args.csv:
        raise UsageError("give --json or --csv, not both")
    guard = _guard(args)
    records = guard.records(**_filters(args))
    if args.limit is not None:
        records = records[-args.limit :] if args.limit else records[:0]  # the most recent ones
    if _json(args):
        _print_json([record_to_dict(r) for r in records])
        return 0
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: _plain(v) for k, v in record_to_dict(r).items()})
        return 0
    term = Terminal.of()
    if not records:
        print("no usage records match")
        if not guard.quotas() and not guard.records(limit=1):
            _say(_nothing_here(guard), term)
        return 0
    rows: list[list[str | Cell]] = []
    for r in records:
        when = r.time.astimezone(CST)
        cost = "-" if r.cost is None else f"{money(r.cost)} {r.currency}"
        rows.append(
            [
                cell(f"{when:%Y-%m-%d %H:%M:%S}", f"{when:%m-%d %H:%M:%S}", f"{when:%m-%d %H:%M}"),
                r.user,
                r.model,
                r.kind,
                cell(r.cost_type, sgr=COST_TYPE_SGR.get(r.cost_type, "")),
                f"{r.input_tokens:,}",
                f"{r.output_tokens:,}",
                f"{r.free_tokens:,}",
                f"{r.billable_input_tokens + r.billable_output_tokens:,}",
                cell(cost, money(r.cost) if r.cost is not None else "-"),
            ]
        )
    print(term.table(RECORD_FIT, rows))
    return 0


def cmd_bill(args: argparse.Namespace) -> int:
    guard = _guard(args)
    bill = guard.bill(day=args.day) if args.day else guard.bill(args.month)
    if _json(args):
        _print_json(bill_data(bill))
    else:
        term = Terminal.of()
        print("\n".join(bill_lines(bill, guard.account, term.width, term.colour)))
    return 0


STATS_FIT = (
    Column("hour (CST)", keep=8, drop=False, squeeze=2),
    Column("model", keep=9, drop=False, shrink=True),
    Column("calls", right=True, keep=7),
    Column(("refusals", "refused"), right=True, keep=5),
    Column(("failures", "failed"), right=True, keep=4),
    Column(("input", "in"), right=True, keep=6),
    Column(("output", "out"), right=True, keep=6),
)


def cmd_stats(args: argparse.Namespace) -> int:
    guard = _guard(args)
    stats = guard.stats(args.model, args.since)
    if _json(args):
        _print_json(stats_data(stats))
        return 0
    term = Terminal.of()
    if not stats:
        print("no calls recorded" + (" since then" if args.since else ""))
        return 0
    rows: list[list[str | Cell]] = []
    for s in stats:
        hour = s.hour.astimezone(CST)
        rows.append(
            [
                cell(f"{hour:%Y-%m-%d %H:00}", f"{hour:%m-%d %H:00}"),
                s.model,
                f"{s.calls:,}",
                cell(f"{s.refusals:,}", sgr=YELLOW if s.refusals else ""),
                cell(f"{s.failures:,}", sgr=RED if s.failures else ""),
                f"{s.input_tokens:,}",
                f"{s.output_tokens:,}",
            ]
        )
    print(term.table(STATS_FIT, rows))
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    guard = _guard(args)
    try:
        q = guard.grant(
            args.model,
            tokens=args.tokens,
            activated_at=args.activated_at,
            valid_days=args.valid_days,
        )
    except ValueError as e:
        if args.tokens is None and "tokens=" in str(e):  # the library's advice, in CLI words
            raise ValueError(str(e).replace("tokens=", "--tokens N")) from None
        raise
    if _json(args):
        _print_json(
            {"account": guard.account, "region": guard.region, "quota": quota_data(q, guard)}
        )
        return 0
    term = Terminal.of()
    _say(
        f"granted {q.model!r} {q.total:,} free tokens, activated {cst(q.activated_at)}, "
        f"in {guard.region} (account {guard.account!r})",
        term,
    )
    print("\n".join(quota_lines([q], term.width, term.colour, guard)))
    return 0


def cmd_free_only(args: argparse.Namespace) -> int:
    enable = args.switch == "on"
    if args.all and args.models:
        raise UsageError("give model names or --all, not both")
    if args.all and not enable:
        raise UsageError('--all only enables (as the console\'s "enable for all"); name models')
    if not args.all and not args.models:
        raise UsageError(f"free-only {args.switch} needs one or more MODEL names (or on --all)")
    guard = _guard(args)
    changed = guard.set_free_only("all" if args.all else list(args.models), enable)
    if _json(args):
        _print_json({"account": guard.account, "free_only": enable, "changed": changed})
        return 0
    term = Terminal.of()
    if not changed:
        print("no eligible model without Free Quota Only: nothing changed")
        return 0
    _say(f"Free Quota Only {args.switch} for {', '.join(changed)}", term)
    if enable:
        _say("calls that would be charged are now refused with AllocationQuota.FreeTierOnly", term)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    guard = _guard(args)
    q = guard.sync(args.model, args.figure, force=args.force)
    if _json(args):
        _print_json({"account": guard.account, "quota": quota_data(q, guard)})
        return 0
    term = Terminal.of()
    print("\n".join(quota_lines([q], term.width, term.colour, guard)))
    return 0


def cmd_top_up(args: argparse.Namespace) -> int:
    guard = _guard(args)
    was_overdue = guard.overdue
    before = guard.balance
    balance = guard.set_balance(args.amount) if args.set else guard.top_up(args.amount)
    overdue = guard.overdue
    if _json(args):
        _print_json(
            {
                "account": guard.account,
                "balance": balance,
                "previous_balance": before,
                "currency": guard.currency,
                "overdue": overdue,
            }
        )
        return 0
    term = Terminal.of()
    was = "untracked" if before is None else f"{before} {guard.currency}"
    verb = "balance set" if args.set else f"topped up {args.amount.strip()} {guard.currency}"
    _say(
        f"{verb}: balance {term.paint(f'{balance} {guard.currency}', BOLD)} "
        f"(was {was}), account {guard.account!r}",
        term,
    )
    if overdue:
        _say(
            term.paint("still overdue", RED)
            + ": every call is refused until the balance is 0 or more",
            term,
        )
    elif was_overdue:
        _say(term.paint("no longer overdue", GREEN) + ": calls are admitted again", term)
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    guard = _guard(args)
    forecasts = (
        [guard.forecast(args.model, args.window)] if args.model else guard.forecasts(args.window)
    )
    if _json(args):
        _print_json(
            [
                {
                    "model": f.model,
                    "remaining": f.remaining,
                    "burn_per_hour": f.burn_per_hour,
                    "runs_out_at": f.runs_out_at,
                    "expires_at": f.expires_at,
                    "unused_at_expiry": f.unused_at_expiry,
                    "window_hours": f.window_hours,
                }
                for f in forecasts
            ]
        )
        return 0
    term = Terminal.of()
    if not forecasts:
        _say("no free quota granted in this ledger (see `quotaguard grant`)", term)
        return 0
    rows: list[list[str | Cell]] = []
    for f in forecasts:
        out: str | Cell = "-"
        if f.runs_out_at is not None:
            at = f.runs_out_at.astimezone(CST)
            out = cell(f"{at:%Y-%m-%d %H:%M}", f"{at:%m-%d %H:%M}", sgr=YELLOW)
        expires = "-" if f.expires_at is None else f"{f.expires_at.astimezone(CST):%Y-%m-%d}"
        rows.append(
            [
                f.model,
                f"{f.remaining:,}",
                f"{f.burn_per_hour:,.0f}/h",
                out,
                expires,
                cell(f"{f.unused_at_expiry:,}", sgr=YELLOW if f.unused_at_expiry else ""),
            ]
        )
    columns = (
        Column("model", keep=9, drop=False, shrink=True),
        Column("left", right=True, keep=8),
        Column("burn", right=True, keep=5),
        Column(("runs out (CST)", "runs out"), right=True, keep=7),
        Column("expires", right=True, keep=4),
        Column(("unused at expiry", "unused"), right=True, keep=6),
    )
    print(term.table(columns, rows))
    _say(f"burn rate over the last {args.window:g} h", term)
    return 0


def cmd_block(args: argparse.Namespace) -> int:
    guard = _guard(args)
    guard.block(args.reason)
    if _json(args):
        _print_json({"ledger": guard.ledger, "account": guard.account, "blocked": args.reason})
        return 0
    _say(
        f"blocked: every guard on {guard.ledger} now refuses every call ({args.reason})",
        Terminal.of(),
    )
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    guard = _guard(args)
    was = guard.blocked
    guard.unblock()
    if _json(args):
        _print_json({"ledger": guard.ledger, "account": guard.account, "blocked": None, "was": was})
        return 0
    print("unblocked" if was is not None else "was not blocked")
    return 0


EXPORT_FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_KEY_FIELDS = {"id", "time", "account", "model"}


def _export_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise UsageError(
            f"export path {path!r} must end in .csv, .json, .jsonl, .ndjson or .parquet"
        )
    return EXPORT_FORMATS[suffix]


def _not_ours(target: Path, fmt: str) -> str | None:
    """Why an existing file is not an export of records (``None`` when it is one, or
    empty): the command overwrites only what it wrote."""
    from ._format import RECORD_FIELDS

    fields = set(RECORD_FIELDS)

    def looks_like_records(keys: Iterable[str]) -> bool:
        names = set(keys)
        return _KEY_FIELDS <= names <= fields

    if target.is_symlink():
        return "is a symbolic link"
    if not target.is_file():
        return "is not a regular file"
    if target.stat().st_size == 0:
        return None
    what = {"csv": "CSV", "json": "JSON", "jsonl": "JSON Lines", "parquet": "Parquet"}[fmt]
    not_ours = f"is not a quotaguard export (not {what} of usage records)"
    try:
        if fmt == "parquet":
            with target.open("rb") as raw:
                if raw.read(4) != b"PAR1":
                    return not_ours
            try:
                import pyarrow.parquet as pq  # type: ignore[import-not-found,import-untyped,unused-ignore]
            except ImportError:
                return "cannot be checked without pyarrow"
            return None if looks_like_records(pq.read_schema(target).names) else not_ours
        with target.open(encoding="utf-8", newline="") as f:
            if fmt == "csv":
                first = next(csv.reader(f), [])
                return None if looks_like_records(first) else not_ours
            if fmt == "jsonl":
                line = f.readline()
                row = json.loads(line)
                return None if isinstance(row, dict) and looks_like_records(row) else not_ours
            data = json.load(f)
    except (UnicodeDecodeError, ValueError, OSError):
        return not_ours
    if isinstance(data, list) and all(isinstance(r, dict) and looks_like_records(r) for r in data):
        return None
    return not_ours


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from .guard import record_to_dict

    fmt = _export_format(args.path)
    target = Path(args.path)
    if target.exists() or target.is_symlink():
        if target.is_dir():
            raise UsageError(f"export path {args.path!r} is a directory")
        why = None if args.force else _not_ours(target, fmt)
        if why is not None:
            raise Refused(
                f"will not overwrite {args.path!r}: it exists and {why}; --force overwrites it"
            )
    guard = _guard(args)
    filters = _filters(args)
    # Written beside the target, then moved over it: a failure leaves the old file whole.
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=directory)
    try:
        if fmt == "json":
            rows = [
                {k: _plain(v) for k, v in record_to_dict(r).items()}
                for r in guard.records(**filters)
            ]
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=2, ensure_ascii=False)
                f.write("\n")
            count = len(rows)
        else:
            os.close(fd)
            count = guard.export(tmp, **filters)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if _json(args):
        _print_json({"path": str(target), "format": fmt, "records": count})
        return 0
    _say(f"wrote {count:,} record{'s' if count != 1 else ''} to {args.path} ({fmt})", Terminal.of())
    return 0


PRICE_FIT = (
    Column("model", keep=9, drop=False, shrink=True),
    Column(("tier (input)", "tier"), keep=8),
    Column("input", right=True, keep=7, drop=False),
    Column("output", right=True, keep=7, drop=False),
    Column(("thinking output", "thinking"), right=True, keep=3),
)


def cmd_prices(args: argparse.Namespace) -> int:
    # The catalogue needs no ledger: --ledger and --account are taken, and not opened.
    guard = _guard(args, ledger="memory://", account="default")
    info = guard.catalog_info()
    models: dict[str, Any] = info["models"]
    if args.model:
        for name in args.model:
            if name not in models:
                known = ", ".join(models)
                close = " or ".join(f'"{m}"' for m in guard.model_info(name)["closest"])
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(f"model {name!r} is not in the catalogue{hint}; known: {known}")
        models = {m: models[m] for m in args.model}
    site_given = getattr(args, "site", None)
    sites = [site_given] if site_given else ["china", "international"]
    if _json(args):
        for model in models.values():
            model["prices"] = {s: t for s, t in model["prices"].items() if s in sites}
        data = {"prices_read": info["prices_read"], "source": info["source"], "models": models}
        _print_json(data)
        return 0
    term = Terminal.of()
    _say(f"prices read {info['prices_read']} from {info['source']}", term)
    _say("per million tokens; a request's input tokens choose the tier of both its prices", term)
    batch: set[int] = set()
    cache: set[tuple[int, int, int]] = set()
    for site in sites:
        rows: list[list[str | Cell]] = []
        currencies: set[str] = set()
        checked: list[str] = []
        for name, model in models.items():
            site_prices = model["prices"].get(site)
            if site_prices is None:
                rows.append([name, cell("no known price", "none", sgr=YELLOW), "", "", ""])
                continue
            currencies.add(site_prices["currency"])
            if site_prices.get("prices_read"):
                checked.append(f"{name} {site_prices['prices_read']}")
            columns = [
                (name, site_prices),
                *((f"{name} [{r}]", t) for r, t in site_prices["regions"].items()),
            ]
            for label, column in columns:
                batch.add(column["batch_percent"])
                cache.add(
                    (
                        column["cache_hit_percent"],
                        column["explicit_cache_hit_percent"],
                        column["cache_write_percent"],
                    )
                )
                previous: int | None = None
                for i, tier in enumerate(column["tiers"]):
                    thinking = tier["thinking_output"]
                    rows.append(
                        [
                            label if i == 0 else "",
                            tier_label(tier["up_to"], previous),
                            money(tier["input"]),
                            money(tier["output"]),
                            "-" if thinking is None else money(thinking),
                        ]
                    )
                    previous = tier["up_to"]
        region = "cn-beijing" if site == "china" else "ap-southeast-1"
        print()
        _say(
            f"{site} site, {'/'.join(sorted(currencies)) or 'no prices'} (free quota in {region}; "
            "[region]: another deployment region's prices)",
            term,
        )
        print(term.table(PRICE_FIT, rows))
        if checked:
            _say(f"checked since: {', '.join(checked)}", term)
    groups: dict[tuple[int, int], list[str]] = {}
    for name, model in models.items():
        groups.setdefault((model["free_tokens"], model["valid_days"]), []).append(name)
    print()
    for (tokens, days), names in sorted(groups.items(), reverse=True):
        what = f"{tokens:,} free tokens for {days} days" if tokens else "no free quota"
        _say(f"{what}: {', '.join(names)}", term)
    if len(cache) == 1:
        implicit, explicit, write = cache.pop()
        _say(
            f"cache hits cost {implicit} % of the input price ({explicit} % for an explicit "
            f"cache); input that creates an explicit cache, {write} %",
            term,
        )
    if len(batch) == 1:
        _say(
            f"batch calls cost {batch.pop()} % of these prices, with no cache discount on top, "
            "and free quota never covers them",
            term,
        )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    guard = _guard(args)
    found = guard._core._check_all()
    problems = [text for problem, text in found if problem]
    if _json(args):
        _print_json(
            {
                "ledger": guard.ledger,
                "account": guard.account,
                "ok": not problems,
                "findings": [{"problem": p, "text": t} for p, t in found],
            }
        )
    else:
        term = Terminal.of()
        _say(f"quotaguard doctor · ledger {guard.ledger} · account {guard.account!r}", term)
        for problem, text in found:
            label = term.paint("PROBLEM", "1;31") if problem else term.paint("ok", GREEN)
            pad = " " * (8 - len("PROBLEM" if problem else "ok"))
            _say(f"{label}{pad} {text}", term, indent=9)
        if problems:
            summary = f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found"
            print(term.paint(summary, RED))
        else:
            print(term.paint("every check holds", GREEN))
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    for option in ("region", "site", "catalog"):
        if getattr(args, option, None) is not None:
            raise UsageError(
                f"demo runs in cn-beijing on the China site with the bundled catalogue: "
                f"--{option} does not apply"
            )
    report: dict[str, Any] = {}
    code = run_demo(
        ledger=getattr(args, "ledger", None),
        account="demo" if getattr(args, "account", None) is None else args.account,
        model=args.model,
        quota=args.quota,
        calls=args.calls,
        delay=args.delay,
        use_openai=not args.no_openai,
        out=io.StringIO() if _json(args) else sys.stdout,
        report=report,
    )
    if _json(args):
        _print_json(report)
    return code


# ---------------------------------------------------------------------- the parser

EPILOG = f"""\
Every command takes --ledger URL and --json, before or after the command.
On a terminal, output fits its width and is coloured; NO_COLOR (any value) turns colour
off, FORCE_COLOR turns it on anywhere; COLUMNS sets the width.

exit status: 0 done; 1 refused by the rules, an unusable ledger, `doctor` found a
problem, `export` would overwrite a file that is not its own; 2 bad input; {BELOW}
`status --fail-below` found a model below the line; 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    def common(p: argparse.ArgumentParser, *own: str) -> None:
        """The options every command takes, less those in ``own`` (the command says
        more of them). SUPPRESS: an option given before the command is not reset by the
        command's parser."""
        options: dict[str, dict[str, Any]] = {
            "--ledger": {"metavar": "URL", "help": LEDGER_HELP},
            "--account": {"help": 'account id ("default")'},
            "--region": {"help": 'region of the calls ("cn-beijing")'},
            "--site": {
                "choices": ("china", "international"),
                "help": 'the site the account was opened on ("china")',
            },
            "--catalog": {"metavar": "PATH", "help": "a TOML catalogue override"},
            "--json": {"action": "store_true", "help": "print JSON"},
        }
        for flag, spec in options.items():
            if flag not in own:
                p.add_argument(flag, default=argparse.SUPPRESS, **spec)

    parser = _Parser(
        prog=PROG,
        description="Guard Alibaba Cloud Model Studio (DashScope/Qwen) calls against the free "
        "token quota: the shared ledger, as the console shows it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(parser)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        *,
        epilog: str | None = None,
        own: tuple[str, ...] = (),
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=epilog)
        common(p, *own)
        p.set_defaults(func=func)
        return p

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="only this model")
        p.add_argument("--user", help='only this user ("root" or a RAM user)')
        p.add_argument(
            "--since", type=_instant, metavar="TIME", help="ISO date or time (CST without offset)"
        )
        p.add_argument(
            "--until",
            type=_instant_end,
            metavar="TIME",
            help="ISO date (whole day included) or time (CST without offset)",
        )

    p = command(
        "status",
        cmd_status,
        "each model's remaining free quota, expiry (CST) and state",
        epilog=f"With --fail-below, the exit status is {BELOW} when any model shown has less "
        "than that share of its total left (an expired quota, or none, has nothing left), "
        "or when there is no quota to check; which ones is said on stderr.",
    )
    p.add_argument("--model", action="append", metavar="MODEL", help="only this model (repeat)")
    p.add_argument(
        "--fail-below",
        type=_percent,
        metavar="PERCENT",
        help=f"exit {BELOW} when a model has less than PERCENT of its total left (e.g. 20%%)",
    )

    p = command("records", cmd_records, "usage records (one per settled call), oldest first")
    filters(p)
    p.add_argument("--limit", type=_token_count, metavar="N", help="only the N most recent")
    p.add_argument("--csv", action="store_true", help="as CSV")

    p = command("bill", cmd_bill, "the bill of a CST month or day, per model")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--month", metavar="YYYY-MM", help="default: the current CST month")
    when.add_argument("--day", metavar="YYYY-MM-DD", help="one CST day instead of a month")

    p = command("stats", cmd_stats, "calls, refusals, failures and tokens per model per hour (CST)")
    p.add_argument("--model", help="only this model")
    p.add_argument(
        "--since",
        type=_instant,
        metavar="TIME",
        help="from the hour this falls in (ISO date or time, CST without offset)",
    )

    p = command("grant", cmd_grant, "record a model's free quota (again: corrects it)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--tokens", type=_token_count, metavar="N", help="free tokens (default: the catalogue's)"
    )
    p.add_argument(
        "--activated-at",
        type=_instant,
        metavar="ISO",
        help="when the quota was activated (default: now; CST without offset)",
    )
    p.add_argument("--valid-days", type=_token_count, metavar="N", help="validity in days, 30..90")

    p = command(
        "free-only",
        cmd_free_only,
        "switch Free Quota Only (stop upon free quota exhaustion) on or off",
    )
    p.add_argument("switch", choices=("on", "off"))
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--all", action="store_true", help="on: every eligible model not yet configured")

    p = command("sync", cmd_sync, "lower a model's quota to the console's figure")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("figure", metavar="FIGURE", help='remaining/total, e.g. "362,917/1,000,000"')
    p.add_argument(
        "--force",
        action="store_true",
        help="set the figure exactly, even above the ledger's own remaining (the console lags)",
    )

    p = command(
        "top-up",
        cmd_top_up,
        "add to the account's tracked balance (a balance of 0 or more clears overdue)",
        epilog="The balance is tracked from the first top-up or --set on; while it is, "
        "each call's pay-as-you-go cost is taken from it, and below 0 the account is "
        "overdue: every call is refused (Arrearage).",
    )
    p.add_argument("amount", metavar="AMOUNT", help="in the site's currency, e.g. 50 or 12.50")
    p.add_argument(
        "--set", action="store_true", help="state the balance as AMOUNT instead of adding it"
    )

    p = command(
        "prices",
        cmd_prices,
        "the model catalogue's prices, the date they were read, tiers",
        epilog="The catalogue needs no ledger: --ledger and --account are accepted (as by "
        "every command) and not opened.",
        own=("--site",),
    )
    p.add_argument(
        "--site",
        choices=("china", "international"),
        default=argparse.SUPPRESS,
        help="only this site's prices (default: both)",
    )
    p.add_argument("--model", action="append", metavar="MODEL", help="only this model (repeat)")

    p = command(
        "forecast", cmd_forecast, "burn rate, when each free quota runs out, what expires unused"
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="default: every granted model")
    p.add_argument(
        "--window", type=float, default=24.0, metavar="HOURS", help="the burn rate's window"
    )

    p = command("block", cmd_block, "kill switch: every guard on the ledger refuses every call")
    p.add_argument(
        "--reason", default="blocked from the command line", help="shown in every refusal"
    )

    command("unblock", cmd_unblock, "lift the kill switch")

    p = command(
        "export",
        cmd_export,
        "write usage records to a file: .csv, .json, .jsonl (.ndjson) or .parquet",
        epilog="An existing file is overwritten only when it is an export of records (or "
        "empty); --force overwrites anything else. The file is written beside the target "
        "and then moved over it, readable by its owner only, as the ledger is.",
    )
    p.add_argument("path", metavar="PATH", help="the file; its suffix chooses the format")
    filters(p)
    p.add_argument(
        "--force", action="store_true", help="overwrite PATH even if it is not an export"
    )

    p = command(
        "doctor",
        cmd_doctor,
        "check the ledger: its integrity, its invariants, its permissions (exit 0 when all hold)",
    )

    p = command(
        "demo",
        cmd_demo,
        "guarded calls against a local test server until the free quota refuses one",
        epilog="Its last lines say how to look at its ledger afterwards "
        "(quotaguard status --ledger URL --account demo).",
        own=("--ledger", "--account"),
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="keep the demo's records in this ledger (default: a temporary one); "
        + LEDGER_HELP.split(" (default")[0],
    )
    p.add_argument(
        "--account", metavar="NAME", default=argparse.SUPPRESS, help='account id ("demo")'
    )
    p.add_argument("--model", default="qwen-plus", help="model to call (qwen-plus)")
    p.add_argument(
        "--quota", type=_positive_int, default=3000, metavar="N", help="free tokens (3,000)"
    )
    p.add_argument(
        "--calls", type=_positive_int, default=60, metavar="N", help="at most N calls (60)"
    )
    p.add_argument(
        "--delay", type=_seconds, default=0.05, metavar="SECONDS", help="between calls (0.05)"
    )
    p.add_argument(
        "--no-openai", action="store_true", help="use the standard library, not the openai SDK"
    )
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str, code: int) -> int:
    # Printable first: an argument that was not UTF-8 (a lone surrogate) is escaped
    # before the message meets anything that wants real text.
    error = paint("error", RED, colour_enabled(sys.stderr))
    print(f"{PROG}: {error}: {_redact(_printable(message))}", file=sys.stderr)
    return code


def _printable(text: str) -> str:
    """One line of printable text: runs of white space (line breaks included) become one
    space, and any other unprintable character its escape."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "?"


def _redact(text: str) -> str:
    """The text with the password of every URL in it hidden, whatever the scheme."""
    from ._core import _redact as redact

    return redact(text)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    # One line on stderr, as errors are: no file name and line of the library.
    warning = paint("warning", YELLOW, colour_enabled(sys.stderr))
    print(f"{PROG}: {warning}: {_redact(_printable(str(message)))}", file=sys.stderr)


def _tolerant_output() -> None:
    # Bars and dots on a terminal that cannot show them: replaced, not a crash.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            try:
                "█░·".encode(stream.encoding or "ascii")
            except (UnicodeEncodeError, LookupError):
                stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (``quotaguard`` exits with it)."""
    _tolerant_output()
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except UsageError as e:
        return _fail(str(e), 2)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    if getattr(args, "func", None) is None:
        return _fail(f"choose a command: {', '.join(COMMANDS)} (see `{PROG} --help`)", 2)
    debug = bool(os.environ.get("QUOTAGUARD_DEBUG"))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code: int = args.func(args)
        return code
    except UsageError as e:
        return _fail(str(e), 2)
    except Refused as e:
        return _fail(str(e), 1)
    except QuotaGuardError as e:  # a refused operation, or a LedgerError
        return _fail(_one_line(e), 1)
    except (ValueError, TypeError) as e:
        if debug:
            raise
        return _fail(_one_line(e), 2)
    except BrokenPipeError:
        # `quotaguard records | head`: the reader left; say nothing more.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        hint = "(QUOTAGUARD_DEBUG=1 shows the traceback)"
        return _fail(f"unexpected {type(e).__name__}: {_one_line(e)} {hint}", 1)


if __name__ == "__main__":
    sys.exit(main())
