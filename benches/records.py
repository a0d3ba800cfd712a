"""How the SQLite ledger scales with the records it holds.

    python benches/records.py [--quick | --full] [--ledger-dir DIR]

It fills one SQLite ledger with reserve + settle pairs (four models, some free, some
billed), a fake clock spreading them over about 60 days, and at 1,000, 100,000 and
1,000,000 records (``--quick``: up to 100,000, in well under a minute; ``--full``: up to
1,000,000, the default) measures:

- reserve + settle pairs per second (the median of several batches; each batch adds
  records),
- ``guard.bill(month)`` and ``guard.bill(day=...)`` for the busiest month and day,
- ``guard.stats()`` over everything, and ``guard.stats(since=...)`` for the last day.

Targets: the per-call cost at 1,000,000 records within 1.3x of that at 1,000 (the ratio
is taken within this run), and a month's bill in under 50 ms at 1,000,000 records (with
``--quick``, judged at 100,000). Every figure goes through ``_report``; a MISS exits
non-zero. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _report

import quotaguard as qg

BENCH = "records"
SIZES = (1_000, 100_000, 1_000_000)
QUICK_CAP = 100_000
SPAN_SECONDS = 60 * 86_400.0
START = 1_767_196_800.0  # 2026-01-01 00:00 CST
CST = dt.timezone(dt.timedelta(hours=8), "CST")
BILL_MONTH = "2026-01"  # the fill starts on its first day, so it holds records at every size
MODELS = ("qwen-max", "qwen-plus", "qwen-turbo", "qwen-flash")
PAIR_BATCH = 500
PAIR_BATCHES = 7
QUERY_REPEATS = 7
MAX_PER_CALL_RATIO = 1.3
MAX_BILL_MS = 50.0


class FakeClock:
    """Epoch seconds that the bench moves forward itself."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Row:
    records: int
    pairs_per_second: float
    bill_month_ms: float
    bill_day_ms: float
    stats_ms: float
    stats_day_ms: float

    @property
    def per_call_us(self) -> float:
        return 1e6 / self.pairs_per_second


class Filler:
    """Adds reserve + settle pairs, moving the clock so the records cover ``SPAN_SECONDS``."""

    def __init__(self, guard: qg.QuotaGuard, clock: FakeClock, target: int) -> None:
        self.guard = guard
        self.clock = clock
        self.step = SPAN_SECONDS / target
        self.done = 0

    def add(self, n: int) -> None:
        reserve = self.guard.reserve
        clock = self.clock
        step = self.step
        i = self.done
        for _ in range(n):
            clock.now += step
            model = MODELS[i % len(MODELS)]
            size = 50 + i % 200
            reserve(model, size, 100).settle(size, 20 + i % 80)
            i += 1
        self.done = i


def progress(done: int, goal: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    left = (goal - done) / rate if rate else 0.0
    print(
        f"\r  filling: {done:>9,} / {goal:,} records  {rate:>8,.0f} pairs/s  ~{left:4.0f} s left",
        end="",
        file=sys.stderr,
        flush=True,
    )


def fill_to(filler: Filler, goal: int) -> None:
    started = time.perf_counter()
    first = filler.done
    chunk = max(1_000, (goal - first) // 200)
    while filler.done < goal:
        filler.add(min(chunk, goal - filler.done))
        progress(filler.done - first, goal - first, started)
    print(file=sys.stderr)


def median_ms(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(QUERY_REPEATS):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def pairs_per_second(filler: Filler) -> float:
    """The median rate of ``PAIR_BATCHES`` batches of ``PAIR_BATCH`` pairs."""
    rates = []
    for _ in range(PAIR_BATCHES):
        t = time.perf_counter()
        filler.add(PAIR_BATCH)
        rates.append(PAIR_BATCH / (time.perf_counter() - t))
    return statistics.median(rates)


def measure(guard: qg.QuotaGuard, clock: FakeClock, filler: Filler) -> Row:
    records = filler.done
    rate = pairs_per_second(filler)
    day = dt.datetime.fromtimestamp(clock.now, CST).date().isoformat()  # holds the last records
    since = clock.now - 86_400
    if not guard.bill(BILL_MONTH).lines or not guard.bill(day=day).lines:
        raise RuntimeError(f"the bills measured ({BILL_MONTH}, {day}) should hold records")
    return Row(
        records=records,
        pairs_per_second=rate,
        bill_month_ms=median_ms(lambda: guard.bill(BILL_MONTH)),
        bill_day_ms=median_ms(lambda: guard.bill(day=day)),
        stats_ms=median_ms(guard.stats),
        stats_day_ms=median_ms(lambda: guard.stats(since=since)),
    )


def report(rows: list[Row], quick: bool) -> None:
    head = (
        f"{'records':>10} {'pairs/s':>9} {'us/pair':>8} {'bill(month)':>12} "
        f"{'bill(day)':>10} {'stats()':>9} {'stats(1 day)':>13}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.records:>10,} {r.pairs_per_second:>9,.0f} {r.per_call_us:>8.1f} "
            f"{r.bill_month_ms:>9.2f} ms {r.bill_day_ms:>7.2f} ms {r.stats_ms:>6.2f} ms "
            f"{r.stats_day_ms:>10.2f} ms"
        )
    print(
        f"(pairs/s: median of {PAIR_BATCHES} batches of {PAIR_BATCH}; "
        f"queries: median of {QUERY_REPEATS})\n"
    )
    pairs_note = f"median of {PAIR_BATCHES} batches of {PAIR_BATCH}"
    query_note = f"median of {QUERY_REPEATS}"
    for r in rows:
        _report.figure(
            BENCH, f"pairs at {r.records:,} records", r.pairs_per_second, "pairs/s", note=pairs_note
        )
    base, last = rows[0], rows[-1]
    scope = "" if not quick and last.records >= SIZES[-1] else "; --quick"
    ratio = last.per_call_us / base.per_call_us
    _report.figure(
        BENCH,
        f"per-call cost, {last.records:,} / {base.records:,} records",
        ratio,
        "x",
        target=f"<= {MAX_PER_CALL_RATIO:g}x",
        ok=ratio <= MAX_PER_CALL_RATIO,
        note=pairs_note + scope,
    )
    _report.figure(
        BENCH,
        f"month bill at {last.records:,} records",
        last.bill_month_ms,
        "ms",
        target=f"< {MAX_BILL_MS:g} ms",
        ok=last.bill_month_ms < MAX_BILL_MS,
        note=query_note + scope,
    )
    _report.figure(
        BENCH, f"day bill at {last.records:,} records", last.bill_day_ms, "ms", note=query_note
    )
    _report.figure(
        BENCH, f"stats() at {last.records:,} records", last.stats_ms, "ms", note=query_note
    )
    _report.figure(
        BENCH,
        f"stats(1 day) at {last.records:,} records",
        last.stats_day_ms,
        "ms",
        note=query_note,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help=f"stop at {QUICK_CAP:,} records")
    scope.add_argument(
        "--full", action="store_true", help=f"go up to {SIZES[-1]:,} records (the default)"
    )
    parser.add_argument(
        "--ledger-dir", type=Path, help="where to put the ledger (default: a temporary dir)"
    )
    args = parser.parse_args(argv)
    sizes = [s for s in SIZES if not args.quick or s <= QUICK_CAP]
    with tempfile.TemporaryDirectory(dir=args.ledger_dir) as tmp:
        ledger = Path(tmp) / "records.db"
        clock = FakeClock(START)
        guard = qg.QuotaGuard(ledger, clock=clock)
        # Enough free quota for a third of the calls; the rest is billed.
        guard.grant("qwen-turbo", tokens=1_000_000_000)
        print(f"quotaguard {qg.__version__}: SQLite ledger {ledger}", file=sys.stderr)
        filler = Filler(guard, clock, sizes[-1] + PAIR_BATCH * PAIR_BATCHES * len(sizes))
        rows: list[Row] = []
        for size in sizes:
            fill_to(filler, size)
            rows.append(measure(guard, clock, filler))
        report(rows, args.quick)
    return _report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
