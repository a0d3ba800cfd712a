"""Ledger throughput: reserve + settle pairs per second, against a no-op baseline.

    python benches/ledger.py [--seconds 2] [--quick]

For the memory and the SQLite ledger, from one thread and from 4 processes, it measures
how many ``guard.reserve(...).settle(...)`` pairs run per second, and the ratio to a no-op
pair measured in the same run: two calls of an O(1) method of the same extension
(``guard.default_max_output("qwen-max")``), so interpreter and call overhead cancel out.

Targets: the memory ledger within 5x of the no-op pair; SQLite at least 20,000 pairs/s
from one process. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import quotaguard as qg

MODEL = "qwen-max"
PROCESSES = 4
MEMORY_MAX_RATIO = 5.0
SQLITE_MIN_RATE = 20_000.0
BATCH = 200


def make_guard(ledger: str) -> qg.QuotaGuard:
    guard = qg.QuotaGuard(ledger)
    guard.grant(MODEL, tokens=1_000_000_000)
    return guard


def noop_loop(guard: qg.QuotaGuard) -> Callable[[int], None]:
    f = guard.default_max_output

    def run(n: int) -> None:
        for _ in range(n):
            f(MODEL)
            f(MODEL)

    return run


def pair_loop(guard: qg.QuotaGuard) -> Callable[[int], None]:
    reserve = guard.reserve

    def run(n: int) -> None:
        for _ in range(n):
            reserve(MODEL, 10, 10).settle(6, 4)

    return run


def rate(loop: Callable[[int], None], seconds: float) -> tuple[int, float]:
    """Runs ``loop`` in batches for about ``seconds``; returns (pairs, elapsed)."""
    loop(BATCH)  # warm up
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        loop(BATCH)
        done += BATCH
        now = time.perf_counter()
        if now >= deadline:
            return done, now - start


def loop_for(kind: str, ledger: str) -> Callable[[int], None]:
    guard = make_guard(ledger)
    return noop_loop(guard) if kind == "noop" else pair_loop(guard)


def worker(kind: str, ledger: str, seconds: float, start: Any, results: Any) -> None:
    loop = loop_for(kind, ledger)
    start.wait()
    results.put(rate(loop, seconds))


def rate_in_processes(kind: str, ledger: str, seconds: float) -> float:
    """Pairs per second summed over ``PROCESSES`` processes (each with its own guard)."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(kind, ledger, seconds, start, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=seconds * 20 + 60) for _ in procs]
    for p in procs:
        p.join()
    return float(sum(n / t for n, t in out))


@dataclass
class Row:
    what: str
    rate: float
    baseline: float
    target: str
    ok: bool | None

    @property
    def ratio(self) -> float:
        return self.baseline / self.rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time per measurement (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement")
    args = parser.parse_args(argv)
    seconds = 0.3 if args.quick else args.seconds

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quotaguard-bench-") as d:
        one = Path(d) / "one.db"
        many = Path(d) / "many.db"
        make_guard(str(many))  # created once, shared by the processes

        n, t = rate(loop_for("noop", "memory://"), seconds)
        noop_1 = n / t
        n, t = rate(loop_for("pair", "memory://"), seconds)
        memory_1 = n / t
        n, t = rate(loop_for("pair", str(one)), seconds)
        sqlite_1 = n / t
        noop_n = rate_in_processes("noop", "memory://", seconds)
        memory_n = rate_in_processes("pair", "memory://", seconds)
        sqlite_n = rate_in_processes("pair", str(many), seconds)

    rows.append(Row("no-op pair, 1 thread", noop_1, noop_1, "baseline", None))
    rows.append(
        Row(
            "memory, 1 thread",
            memory_1,
            noop_1,
            f"<= {MEMORY_MAX_RATIO:g}x no-op",
            noop_1 / memory_1 <= MEMORY_MAX_RATIO,
        )
    )
    rows.append(
        Row(
            "sqlite, 1 thread",
            sqlite_1,
            noop_1,
            f">= {SQLITE_MIN_RATE:,.0f}/s",
            sqlite_1 >= SQLITE_MIN_RATE,
        )
    )
    rows.append(Row(f"no-op pair, {PROCESSES} processes", noop_n, noop_n, "baseline", None))
    rows.append(
        Row(
            f"memory, {PROCESSES} processes (own ledgers)",
            memory_n,
            noop_n,
            f"<= {MEMORY_MAX_RATIO:g}x no-op",
            noop_n / memory_n <= MEMORY_MAX_RATIO,
        )
    )
    rows.append(Row(f"sqlite, {PROCESSES} processes (one file)", sqlite_n, noop_n, "-", None))

    print(f"quotaguard {qg.__version__} ledger benchmark, {seconds:g} s per measurement")
    print(f"python {sys.version.split()[0]}, {sys.platform}")
    print()
    header = f"{'measurement':<36} {'pairs/s':>12} {'x no-op':>9}  {'target':<18} result"
    print(header)
    print("-" * len(header))
    for r in rows:
        result = "" if r.ok is None else ("PASS" if r.ok else "MISS")
        print(f"{r.what:<36} {r.rate:>12,.0f} {r.ratio:>8.1f}x  {r.target:<18} {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
