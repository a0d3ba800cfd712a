"""Ledger throughput: reserve + settle pairs per second, against a baseline of the same kind.

    python benches/ledger.py [--seconds 2] [--quick] [--redis URL]

For the memory and the SQLite ledger, from one thread and from 4 processes, it measures
how many ``guard.reserve(...).settle(...)`` pairs run per second, and the ratio to a no-op
pair measured in the same run: two calls of an O(1) method of the same extension
(``guard.default_max_output("qwen-max")``), so interpreter and call overhead cancel out.

For the Redis ledger (``--redis URL``, else ``$QUOTAGUARD_TEST_REDIS``, else a throwaway
``redis-server`` without persistence started on a free 127.0.0.1 port), from one process
and from 4 processes sharing one account, the floor is what any Redis ledger pays: two
``EVALSHA`` round trips of trivial scripts through redis-py, on the same server in the
same run. Round trips per pair are the read events the server processed
(``total_reads_processed``) over a counted run of pairs; the commands column counts those
run inside scripts too.

The 4-process figures are the pairs all four completed inside one common window of wall
time (they start on a barrier), over the window's length.

Targets: the memory ledger within 5x of the no-op pair; SQLite at least 20,000 pairs/s
from one process; Redis at least as fast as its floor (1 and 4 processes) in at most 2
round trips per guarded call. A MISS exits non-zero. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import quotaguard as qg

MODEL = "qwen-max"
PROCESSES = 4
MEMORY_MAX_RATIO = 5.0
SQLITE_MIN_RATE = 20_000.0
REDIS_MIN_FLOOR_RATIO = 1.0  # quotaguard's pairs/s over the floor's
REDIS_MAX_ROUND_TRIPS = 2.0  # per guarded call: reserve + settle
ROUND_TRIP_PAIRS = 2_000
BATCH = 200
WINDOW_BATCH = 10  # pairs between clock reads inside a common window
FLOOR_SCRIPTS = ("return 1", "return 2")  # trivial: the cost is the round trip


def make_guard(ledger: str, account: str = "default") -> qg.QuotaGuard:
    guard = qg.QuotaGuard(ledger, account=account)
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


def floor_loop(url: str, account: str) -> Callable[[int], None]:
    """Two EVALSHA round trips per pair through redis-py, on a key of the account's slot."""
    import redis

    client = redis.Redis.from_url(url)
    first, second = (client.script_load(s) for s in FLOOR_SCRIPTS)
    key = f"qg-bench:{{{account}}}:floor"
    evalsha = client.evalsha

    def run(n: int) -> None:
        for _ in range(n):
            evalsha(first, 1, key, "10")
            evalsha(second, 1, key, "6")

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


def loop_for(kind: str, ledger: str, account: str = "default") -> Callable[[int], None]:
    if kind == "floor":
        return floor_loop(ledger, account)
    guard = make_guard(ledger, account)
    return noop_loop(guard) if kind == "noop" else pair_loop(guard)


def pairs_in_window(loop: Callable[[int], None], start_at: float, end_at: float) -> int:
    """The pairs completed between ``start_at`` and ``end_at`` (``time.monotonic()``, one
    clock for every process of the machine); a batch that ends after ``end_at`` is not
    counted."""
    while (wait := start_at - time.monotonic()) > 0:
        time.sleep(min(wait, 0.001))
    done = 0
    while True:
        loop(WINDOW_BATCH)
        if time.monotonic() > end_at:
            return done
        done += WINDOW_BATCH


def worker(
    kind: str, ledger: str, account: str, seconds: float, ready: Any, start_at: Any, results: Any
) -> None:
    try:
        loop = loop_for(kind, ledger, account)
        loop(BATCH)  # warm up
        ready.wait()
        ready.wait()  # the parent has set the window meanwhile
        results.put(pairs_in_window(loop, start_at.value, start_at.value + seconds))
    except BaseException as e:
        ready.abort()  # nobody waits for this process
        results.put(f"{kind} process failed: {e!r}")
        raise


def rate_in_processes(kind: str, ledger: str, seconds: float, account: str = "default") -> float:
    """Pairs per second of ``PROCESSES`` processes (each with its own guard or client):
    every pair they completed inside one common window, over its length."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(PROCESSES + 1)
    start_at = ctx.Value("d", 0.0)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(kind, ledger, account, seconds, ready, start_at, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        try:
            ready.wait(120)  # all built and warmed up
            start_at.value = time.monotonic() + 0.05
            ready.wait(120)
        except threading.BrokenBarrierError:
            pass  # a process failed; every one of them says why below
        out = [results.get(timeout=seconds * 20 + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    failed = [e for e in out if isinstance(e, str)]
    if failed:
        raise RuntimeError(failed[0])
    return float(sum(out)) / seconds


# ---------------------------------------------------------------------- Redis


class ThrowawayRedis:
    """A ``redis-server`` on a free 127.0.0.1 port, without persistence, in a temporary
    directory; stopped and removed by :meth:`close`."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="quotaguard-bench-redis-")
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir]
        args += ["--save", "", "--appendonly", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(
            [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError as e:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.close()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from e
                    time.sleep(0.02)
        finally:
            client.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def server_counters(client: Any) -> tuple[int, int]:
    """(read events, commands) the server has processed so far."""
    stats = client.info("stats")
    return int(stats["total_reads_processed"]), int(stats["total_commands_processed"])


def round_trips(kind: str, url: str, account: str) -> tuple[float, float]:
    """(round trips, commands) per pair over ``ROUND_TRIP_PAIRS`` pairs: the read events
    and the commands (those run inside scripts included) the server processed meanwhile.
    The loop and the counting client connect before the count; the second reading's own
    INFO is taken off."""
    import redis

    loop = loop_for(kind, url, account)
    loop(BATCH)
    counter = redis.Redis.from_url(url)
    try:
        reads, commands = server_counters(counter)
        loop(ROUND_TRIP_PAIRS)
        reads_after, commands_after = server_counters(counter)
    finally:
        counter.close()
    return (
        (reads_after - reads - 1) / ROUND_TRIP_PAIRS,
        (commands_after - commands - 1) / ROUND_TRIP_PAIRS,
    )


def forget(url: str, account: str) -> None:
    """Removes the benchmark's own keys (its account and the floor's key)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for pattern in (f"qg:{{{account}}}:*", f"qg-bench:{{{account}}}:*"):
            keys = list(client.scan_iter(match=pattern, count=1_000))
            for i in range(0, len(keys), 1_000):
                client.unlink(*keys[i : i + 1_000])
    finally:
        client.close()


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


@dataclass
class Trips:
    what: str
    round_trips: float
    commands: float
    target: str
    ok: bool | None


def redis_rows(url: str, seconds: float) -> tuple[list[Row], list[Trips]]:
    account = f"bench-{uuid.uuid4().hex[:12]}"  # never another user's data
    # What the Redis ledger keeps locally for this throwaway account (the epoch it saw)
    # goes to a temporary directory, not ~/.quotaguard.
    spill = tempfile.TemporaryDirectory(prefix="quotaguard-bench-spill-")
    saved = os.environ.get("QUOTAGUARD_SPILL_DIR")
    os.environ["QUOTAGUARD_SPILL_DIR"] = spill.name
    try:
        n, t = rate(loop_for("floor", url, account), seconds)
        floor_1 = n / t
        n, t = rate(loop_for("pair", url, account), seconds)
        redis_1 = n / t
        floor_n = rate_in_processes("floor", url, seconds, account)
        redis_n = rate_in_processes("pair", url, seconds, account)
        floor_trips = round_trips("floor", url, account)
        redis_trips = round_trips("pair", url, account)
    finally:
        forget(url, account)
        if saved is None:
            del os.environ["QUOTAGUARD_SPILL_DIR"]
        else:
            os.environ["QUOTAGUARD_SPILL_DIR"] = saved
        spill.cleanup()
    target = f">= {REDIS_MIN_FLOOR_RATIO:g}x floor"
    rows = [
        Row("redis floor (2 EVALSHA), 1 process", floor_1, floor_1, "baseline", None),
        Row(
            "redis, 1 process",
            redis_1,
            floor_1,
            target,
            redis_1 >= REDIS_MIN_FLOOR_RATIO * floor_1,
        ),
        Row(f"redis floor, {PROCESSES} processes", floor_n, floor_n, "baseline", None),
        Row(
            f"redis, {PROCESSES} processes (one account)",
            redis_n,
            floor_n,
            target,
            redis_n >= REDIS_MIN_FLOOR_RATIO * floor_n,
        ),
    ]
    trips = [
        Trips("redis floor (2 EVALSHA)", *floor_trips, "baseline", None),
        Trips(
            "redis reserve + settle",
            *redis_trips,
            f"<= {REDIS_MAX_ROUND_TRIPS:g}",
            round(redis_trips[0], 2) <= REDIS_MAX_ROUND_TRIPS,  # as printed: others' reads
        ),
    ]
    return rows, trips


def redis_url(given: str | None) -> tuple[str | None, ThrowawayRedis | None, str]:
    """The server to measure on: (url, the server started here or None, what it is)."""
    url = given or os.environ.get("QUOTAGUARD_TEST_REDIS")
    if url:
        if "+cluster" in url.split("://", 1)[0]:
            raise SystemExit("benches/ledger.py: --redis takes one server, not a cluster")
        return url, None, "given server"
    try:
        import redis  # noqa: F401
    except ImportError:
        return None, None, "skipped: redis-py is not installed (pip install redis)"
    try:
        server = ThrowawayRedis()
    except FileNotFoundError as e:
        return None, None, f"skipped: {e}; give --redis URL"
    return server.url, server, "redis-server started here, no persistence"


def measure(seconds: float, url: str | None) -> tuple[list[Row], list[Trips]]:
    """Every row of both tables; the Redis ones when ``url`` is given."""
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

    trips: list[Trips] = []
    if url is not None:
        redis_table, trips = redis_rows(url, seconds)
        rows += redis_table
    return rows, trips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time per measurement (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="0.3 s per measurement")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="a Redis server to measure on (default: $QUOTAGUARD_TEST_REDIS, else one "
        "started here); only the benchmark's own keys are written and removed",
    )
    args = parser.parse_args(argv)
    seconds = 0.3 if args.quick else args.seconds
    url, server, where = redis_url(args.redis)
    try:
        rows, trips = measure(seconds, url)
    finally:
        if server is not None:
            server.close()

    print(f"quotaguard {qg.__version__} ledger benchmark, {seconds:g} s per measurement")
    print(f"python {sys.version.split()[0]}, {sys.platform}; redis: {where}")
    print()
    header = f"{'measurement':<40} {'pairs/s':>12} {'x base':>8}  {'target':<18} result"
    print(header)
    print("-" * len(header))
    for r in rows:
        result = "" if r.ok is None else ("PASS" if r.ok else "MISS")
        print(f"{r.what:<40} {r.rate:>12,.0f} {r.ratio:>7.2f}x  {r.target:<18} {result}")
    if trips:
        print()
        header = f"{'per pair':<40} {'round trips':>12} {'commands':>8}  {'target':<18} result"
        print(header)
        print("-" * len(header))
        for tr in trips:
            result = "" if tr.ok is None else ("PASS" if tr.ok else "MISS")
            print(
                f"{tr.what:<40} {tr.round_trips:>12.2f} {tr.commands:>8.2f}  "
                f"{tr.target:<18} {result}"
            )
    missed = [r.what for r in rows if r.ok is False] + [t.what for t in trips if t.ok is False]
    if missed:
        print(f"\nMISS: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
