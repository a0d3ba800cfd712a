"""The ``quotaguard`` command line: the ledger as the Model Studio console shows it.

``quotaguard status | records | bill | grant | free-only | sync | forecast | block |
unblock | prices | doctor | demo``, each
reading the same ledger as the library (``--ledger URL``, else ``$QUOTAGUARD_LEDGER``,
else ``~/.quotaguard/ledger.db``). Bad input is reported on one line of stderr
(``quotaguard: error: ...``) with exit code 2; an operation the rules refuse, or a
ledger that cannot be used, exits 1. Never a traceback (``QUOTAGUARD_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any, NoReturn

from ._format import CST, cst, format_bill, format_quota, money, state, table, tier_label
from .exceptions import QuotaGuardError

if TYPE_CHECKING:
    from ._core import Quota
    from .guard import QuotaGuard

__all__ = ["format_bill", "format_quota", "main"]

PROG = "quotaguard"
COMMANDS = (
    "status",
    "records",
    "bill",
    "grant",
    "free-only",
    "sync",
    "forecast",
    "block",
    "unblock",
    "prices",
    "doctor",
    "demo",
)


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit code 2."""


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


def _quota_dict(q: Quota) -> dict[str, Any]:
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


def _print_json(data: Any, out: IO[str]) -> None:
    json.dump(data, out, indent=2, ensure_ascii=False, default=_plain)
    out.write("\n")


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


def cmd_status(args: argparse.Namespace) -> int:
    guard = _guard(args)
    if args.json:
        _print_json(
            {
                "account": guard.account,
                "region": guard.region,
                "site": guard.site,
                "ledger": guard.ledger,
                "balance": guard.balance,
                "currency": guard.currency,
                "overdue": guard.overdue,
                "quotas": [_quota_dict(q) for q in guard.quotas()],
            },
            sys.stdout,
        )
    else:
        print(guard.status())
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


def cmd_records(args: argparse.Namespace) -> int:
    from .guard import RECORD_FIELDS, record_to_dict

    guard = _guard(args)
    records = guard.records(model=args.model, user=args.user, since=args.since, until=args.until)
    if args.limit is not None:
        records = records[-args.limit :] if args.limit else []  # the most recent ones
    if args.json:
        _print_json([record_to_dict(r) for r in records], sys.stdout)
        return 0
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=RECORD_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: _plain(v) for k, v in record_to_dict(r).items()})
        return 0
    if not records:
        print("no usage records match")
        return 0
    rows = [
        (
            r.time.astimezone(CST).strftime("%Y-%m-%d %H:%M:%S"),
            r.user,
            r.model,
            r.kind,
            r.cost_type,
            f"{r.input_tokens:,}",
            f"{r.output_tokens:,}",
            f"{r.free_tokens:,}",
            f"{r.billable_input_tokens + r.billable_output_tokens:,}",
            "-" if r.cost is None else f"{money(r.cost)} {r.currency}",
        )
        for r in records
    ]
    for line in table(RECORD_COLUMNS, rows, 5):
        print(line)
    return 0


def cmd_bill(args: argparse.Namespace) -> int:
    guard = _guard(args)
    bill = guard.bill(day=args.day) if args.day else guard.bill(args.month)
    if args.json:
        _print_json(
            {
                "period": bill.period,
                "currency": bill.currency,
                "total": bill.total,
                "charged_models": bill.charged_models,
                "lines": [
                    {
                        "model": line.model,
                        "calls": line.calls,
                        "free_tokens": line.free_tokens,
                        "billable_input_tokens": line.billable_input_tokens,
                        "billable_output_tokens": line.billable_output_tokens,
                        "billable_tokens": line.billable_tokens,
                        "cost": line.cost,
                        "unpriced_calls": line.unpriced_calls,
                    }
                    for line in bill.lines
                ],
            },
            sys.stdout,
        )
    else:
        print(format_bill(bill, guard.account))
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
    print(
        f"granted {q.model!r} {q.total:,} free tokens, activated {cst(q.activated_at)}, "
        f"in {guard.region} (account {guard.account!r})"
    )
    print(format_quota(q))
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
    state = "on" if enable else "off"
    if not changed:
        print("no eligible model without Free Quota Only: nothing changed")
        return 0
    print(f"Free Quota Only {state} for {', '.join(changed)}")
    if enable:
        print("calls that would be charged are now refused with AllocationQuota.FreeTierOnly")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    guard = _guard(args)
    q = guard.sync(args.model, args.figure, force=args.force)
    print(format_quota(q))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    guard = _guard(args)
    forecasts = (
        [guard.forecast(args.model, args.window)] if args.model else guard.forecasts(args.window)
    )
    if args.json:
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
            ],
            sys.stdout,
        )
        return 0
    if not forecasts:
        print("no free quota granted in this ledger (see `quotaguard grant`)")
        return 0
    rows = []
    for f in forecasts:
        out = "-" if f.runs_out_at is None else f"{f.runs_out_at.astimezone(CST):%Y-%m-%d %H:%M}"
        expires = "-" if f.expires_at is None else f"{f.expires_at.astimezone(CST):%Y-%m-%d}"
        rows.append(
            [
                f.model,
                f"{f.remaining:,}",
                f"{f.burn_per_hour:,.0f}/h",
                out,
                expires,
                f"{f.unused_at_expiry:,}",
            ]
        )
    head = ["model", "left", "burn", "runs out (CST)", "expires", "unused at expiry"]
    print("\n".join(table(head, rows, 1)))
    print(f"burn rate over the last {args.window:g} h")
    return 0


def cmd_block(args: argparse.Namespace) -> int:
    guard = _guard(args)
    guard.block(args.reason)
    print(f"blocked: every guard on {guard.ledger} now refuses every call ({args.reason})")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    guard = _guard(args)
    was = guard.blocked
    guard.unblock()
    print("unblocked" if was is not None else "was not blocked")
    return 0


def cmd_prices(args: argparse.Namespace) -> int:
    guard = _guard(args, ledger="memory://")  # the catalogue needs no ledger
    info = guard.catalog_info()
    models: dict[str, Any] = info["models"]
    if args.model:
        for name in args.model:
            if name not in models:
                known = ", ".join(models)
                raise ValueError(f"model {name!r} is not in the catalogue (known: {known})")
        models = {m: models[m] for m in args.model}
    sites = [args.site] if args.site else ["china", "international"]
    if args.json:
        for model in models.values():
            model["prices"] = {s: t for s, t in model["prices"].items() if s in sites}
        data = {"prices_read": info["prices_read"], "source": info["source"], "models": models}
        _print_json(data, sys.stdout)
        return 0
    print(f"prices read {info['prices_read']} from {info['source']}")
    print("per million tokens; a request's input tokens choose the tier of both its prices")
    batch: set[int] = set()
    cache: set[tuple[int, int, int]] = set()
    for site in sites:
        rows: list[tuple[str, str, str, str, str]] = []
        currencies: set[str] = set()
        checked: list[str] = []
        for name, model in models.items():
            site_prices = model["prices"].get(site)
            if site_prices is None:
                rows.append((name, "no known price", "", "", ""))
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
                        (
                            label if i == 0 else "",
                            tier_label(tier["up_to"], previous),
                            money(tier["input"]),
                            money(tier["output"]),
                            "-" if thinking is None else money(thinking),
                        )
                    )
                    previous = tier["up_to"]
        region = "cn-beijing" if site == "china" else "ap-southeast-1"
        print()
        print(
            f"{site} site, {'/'.join(sorted(currencies)) or 'no prices'} (free quota in {region}; "
            "[region]: another deployment region's prices)"
        )
        head = ("model", "tier (input)", "input", "output", "thinking output")
        for line in table(head, rows, 2):
            print(line)
        if checked:
            print(f"checked since: {', '.join(checked)}")
    groups: dict[tuple[int, int], list[str]] = {}
    for name, model in models.items():
        groups.setdefault((model["free_tokens"], model["valid_days"]), []).append(name)
    print()
    for (tokens, days), names in sorted(groups.items(), reverse=True):
        what = f"{tokens:,} free tokens for {days} days" if tokens else "no free quota"
        print(f"{what}: {', '.join(names)}")
    if len(cache) == 1:
        implicit, explicit, write = cache.pop()
        print(
            f"cache hits cost {implicit} % of the input price ({explicit} % for an explicit "
            f"cache); input that creates an explicit cache, {write} %"
        )
    if len(batch) == 1:
        print(
            f"batch calls cost {batch.pop()} % of these prices, with no cache discount on top, "
            "and free quota never covers them"
        )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    guard = _guard(args)
    found = guard._core._check_all()
    problems = [text for problem, text in found if problem]
    if args.json:
        _print_json(
            {
                "ledger": guard.ledger,
                "account": guard.account,
                "ok": not problems,
                "findings": [{"problem": p, "text": t} for p, t in found],
            },
            sys.stdout,
        )
    else:
        print(f"quotaguard doctor · ledger {guard.ledger} · account {guard.account!r}")
        for problem, text in found:
            print(f"{'PROBLEM' if problem else 'ok':<8} {text}")
        if problems:
            print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found")
        else:
            print("every check holds")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        ledger=args.ledger,
        account="demo" if args.account is None else args.account,
        model=args.model,
        quota=args.quota,
        calls=args.calls,
        delay=args.delay,
        use_openai=not args.no_openai,
        out=sys.stdout,
    )


# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the command is not reset by the command's parser.
    common = _Parser(add_help=False)
    common.add_argument(
        "--ledger",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="memory://, sqlite:///path.db, a file path or redis://host:port/db "
        "(default: $QUOTAGUARD_LEDGER, else ~/.quotaguard/ledger.db)",
    )
    common.add_argument("--account", default=argparse.SUPPRESS, help='account id ("default")')
    common.add_argument(
        "--region", default=argparse.SUPPRESS, help='region of the calls ("cn-beijing")'
    )
    common.add_argument(
        "--site",
        choices=("china", "international"),
        default=argparse.SUPPRESS,
        help='the site the account was opened on ("china")',
    )
    common.add_argument(
        "--catalog", metavar="PATH", default=argparse.SUPPRESS, help="a TOML catalogue override"
    )

    parser = _Parser(
        prog=PROG,
        description="Guard Alibaba Cloud Model Studio (DashScope/Qwen) calls against the free "
        "token quota: the shared ledger, as the console shows it.",
        parents=[common],
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, *, shared: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common] if shared else [])
        p.set_defaults(func=func)
        return p

    p = command("status", cmd_status, "each model's remaining free quota, expiry (CST) and state")
    p.add_argument("--json", action="store_true", help="as JSON")

    p = command("records", cmd_records, "usage records (one per settled call), oldest first")
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
    p.add_argument("--limit", type=_token_count, metavar="N", help="only the N most recent")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="as JSON")
    fmt.add_argument("--csv", action="store_true", help="as CSV")

    p = command("bill", cmd_bill, "the bill of a CST month or day, per model")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--month", metavar="YYYY-MM", help="default: the current CST month")
    when.add_argument("--day", metavar="YYYY-MM-DD", help="one CST day instead of a month")
    p.add_argument("--json", action="store_true", help="as JSON")

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
        "forecast", cmd_forecast, "burn rate, when each free quota runs out, what expires unused"
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="default: every granted model")
    p.add_argument(
        "--window", type=float, default=24.0, metavar="HOURS", help="the burn rate's window"
    )
    p.add_argument("--json", action="store_true", help="as JSON")

    p = command("block", cmd_block, "kill switch: every guard on the ledger refuses every call")
    p.add_argument(
        "--reason", default="blocked from the command line", help="shown in every refusal"
    )

    p = command("unblock", cmd_unblock, "lift the kill switch")

    p = command(
        "prices",
        cmd_prices,
        "the model catalogue's prices, the date they were read, tiers",
        shared=False,
    )
    p.add_argument("--site", choices=("china", "international"), help="default: both sites")
    p.add_argument("--catalog", metavar="PATH", help="a TOML catalogue override")
    p.add_argument("--model", action="append", metavar="MODEL", help="only this model (repeat)")
    p.add_argument("--json", action="store_true", help="as JSON")

    p = command(
        "doctor",
        cmd_doctor,
        "check the ledger: its integrity, its invariants, its permissions (exit 0 when all hold)",
    )
    p.add_argument("--json", action="store_true", help="as JSON")

    p = command(
        "demo",
        cmd_demo,
        "guarded calls against a local test server until the free quota refuses one",
        shared=False,
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        help="keep the demo's records in this ledger (default: a temporary one)",
    )
    p.add_argument("--account", metavar="NAME", help='account id ("demo")')
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
    print(f"{PROG}: error: {_redact(_printable(message))}", file=sys.stderr)
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
    print(f"{PROG}: warning: {_redact(_printable(str(message)))}", file=sys.stderr)


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
