"""Ledger throughput: reserve + settle pairs per second, against a baseline of the same kind.

    python benches/ledger.py [--quick | --full] [--seconds S] [--repeats N] [--redis URL]

Every figure is a median over repeats that interleave the things compared, so that a
machine busy with other work slows them alike; ratios are taken within each repeat.

- **Memory**, from one thread and from 4 processes (each its own ledger): pairs per
  second, against a no-op pair of the same extension, two calls of an O(1) method
  (``guard.default_max_output("qwen-max")``), so interpreter and call overhead cancel
  out. Target: within 5x of the no-op pair.
- **SQLite**, from one process: at least 30,000 pairs per second. From 4 processes on
  one file: at least as many pairs in total as one of those processes alone on the same
  file, in the same rounds; and after those rounds the ledger holds every pair's record,
  its quota's used tokens are its records' free tokens and within the grant, and
  ``guard.check()`` finds nothing wrong (the no-overspend invariant).
- **Redis** (``--redis URL``, else ``$QUOTAGUARD_TEST_REDIS``, else a throwaway
  ``redis-server`` without persistence on a free 127.0.0.1 port), from one process and
  from 4 sharing one account: at least as fast as the floor any Redis ledger pays, two
  ``EVALSHA`` round trips of trivial scripts through redis-py on the same server, in at
  most 2 round trips per pair (the read events the server processed,
  ``total_reads_processed``, over a counted run of pairs).

The 4-process figures are the pairs all processes completed inside one common window of
wall time (they start on a barrier, on the machine's monotonic clock), over the window's
length. ``--quick`` (what ``benches/run.py`` uses) runs in well under a minute; ``--full``
measures longer and more often. A MISS exits non-zero. Not part of the test suite.
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

import _report

import quotaguard as qg

BENCH = "ledger"
MODEL = "qwen-max"
PROCESSES = 4
GRANT = 1_000_000_000
MEMORY_MAX_RATIO = 5.0
SQLITE_MIN_RATE = 30_000.0
SQLITE_MIN_SCALING = 1.0  # 4 processes on one file over 1 process on it
REDIS_MIN_FLOOR_RATIO = 1.0  # quotaguard's pairs/s over the floor's
REDIS_MAX_ROUND_TRIPS = 2.0  # per guarded call: reserve + settle
ROUND_TRIP_PAIRS = 2_000
BATCH = 200
WINDOW_BATCH = 10  # pairs between clock reads inside a common window
FLOOR_SCRIPTS = ("return 1", "return 2")  # trivial: the cost is the round trip


@dataclass(frozen=True)
class Plan:
    seconds: float  # per measurement
    repeats: int  # interleaved rounds; figures are their medians


QUICK = Plan(seconds=0.25, repeats=3)
DEFAULT = Plan(seconds=1.0, repeats=5)
FULL = Plan(seconds=2.0, repeats=9)


def make_guard(ledger: str, account: str = "default") -> qg.QuotaGuard:
    guard = qg.QuotaGuard(ledger, account=account)
    guard.grant(MODEL, tokens=GRANT)
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


def loop_for(kind: str, ledger: str, account: str = "default") -> Callable[[int], None]:
    if kind == "floor":
        return floor_loop(ledger, account)
    guard = make_guard(ledger, account)
    return noop_loop(guard) if kind == "noop" else pair_loop(guard)


def rate(loop: Callable[[int], None], seconds: float) -> float:
    """Pairs per second of ``loop`` run in batches for about ``seconds``."""
    loop(BATCH)  # warm up
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        loop(BATCH)
        done += BATCH
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def interleaved(loops: dict[str, Callable[[int], None]], plan: Plan) -> dict[str, list[float]]:
    """Each loop's rate in every round; within a round the loops run one after another,
    in an order that turns each round."""
    names = list(loops)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(plan.repeats):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            out[name].append(rate(loops[name], plan.seconds))
    return out


# ------------------------------------------------------------ processes, one window


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
    index: int,
    specs: dict[str, tuple[str, str, str]],
    seconds: float,
    ready: Any,
    start_at: Any,
    what: Any,
    active: Any,
    results: Any,
) -> None:
    """Builds a loop per spec, then runs rounds: the parent names the loop and how many
    processes take part; a process past that number sits the round out."""
    names = list(specs)
    try:
        loops = {n: loop_for(*specs[n]) for n in names}
        for loop in loops.values():
            loop(BATCH)  # warm up
        while True:
            ready.wait()
            ready.wait()  # the parent has set the round meanwhile
            if what.value < 0:
                return
            name = names[what.value]
            done = 0
            if index < active.value:
                done = pairs_in_window(loops[name], start_at.value, start_at.value + seconds)
            results.put((index, done))
    except BaseException as e:
        ready.abort()  # nobody waits for this process
        results.put((index, f"process {index} failed: {e!r}"))
        raise


class Pool:
    """``PROCESSES`` processes, each with its own guard (or client) per spec, that run
    rounds of one common window each."""

    def __init__(self, specs: dict[str, tuple[str, str, str]], seconds: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.names = list(specs)
        self.seconds = seconds
        self.ready = ctx.Barrier(PROCESSES + 1)
        self.start_at = ctx.Value("d", 0.0)
        self.what = ctx.Value("i", 0)
        self.active = ctx.Value("i", PROCESSES)
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=worker,
                args=(
                    i,
                    specs,
                    seconds,
                    self.ready,
                    self.start_at,
                    self.what,
                    self.active,
                    self.results,
                ),
            )
            for i in range(PROCESSES)
        ]
        for p in self.procs:
            p.start()

    def _go(self, index: int, active: int) -> None:
        try:
            self.ready.wait(180)  # all built and warmed up, or done with the last round
            self.what.value = index
            self.active.value = active
            self.start_at.value = time.monotonic() + 0.05
            self.ready.wait(180)
        except threading.BrokenBarrierError:
            pass  # a process failed; it says why below

    def round(self, name: str, active: int = PROCESSES) -> float:
        """Pairs per second of the first ``active`` processes running ``name`` together:
        all they completed in one common window, over its length."""
        self._go(self.names.index(name), active)
        out = [self.results.get(timeout=self.seconds * 20 + 120) for _ in self.procs]
        failed = [r for _, r in out if isinstance(r, str)]
        if failed:
            self.close()
            raise RuntimeError(failed[0])
        return float(sum(r for _, r in out)) / self.seconds

    def close(self) -> None:
        if any(p.is_alive() for p in self.procs):
            self._go(-1, 0)
        for p in self.procs:
            p.join(60)
            if p.is_alive():
                p.kill()


def rounds(pool: Pool, plan: Plan, order: list[tuple[str, int]]) -> dict[str, list[float]]:
    """``plan.repeats`` rounds of each (name, processes), interleaved, the order turning."""
    out: dict[str, list[float]] = {f"{n}/{a}": [] for n, a in order}
    for i in range(plan.repeats):
        turn = i % len(order)
        for name, active in order[turn:] + order[:turn]:
            out[f"{name}/{active}"].append(pool.round(name, active))
    return out


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


# ---------------------------------------------------------------------- figures


def ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den, strict=True)]


def median_note(plan: Plan, extra: str = "") -> str:
    note = f"median of {plan.repeats} interleaved x {plan.seconds:g} s"
    return f"{note}; {extra}" if extra else note


@dataclass
class Measured:
    single: dict[str, list[float]]  # one thread, interleaved
    procs: dict[str, list[float]]  # "name/processes" -> one rate per round
    problems: list[str]  # the shared SQLite ledger's, after the rounds
    trips: dict[str, tuple[float, float]]  # Redis: (round trips, commands) per pair


def measure(plan: Plan, url: str | None) -> Measured:
    """Every measurement, local and (with ``url``) Redis; one pool of processes serves
    all the rounds."""
    account = f"bench-{uuid.uuid4().hex[:12]}"  # never another user's data on Redis
    # What the Redis ledger keeps locally for this throwaway account (the epoch it saw)
    # goes to a temporary directory, not ~/.quotaguard.
    saved = os.environ.get("QUOTAGUARD_SPILL_DIR")
    with (
        tempfile.TemporaryDirectory(prefix="quotaguard-bench-") as d,
        tempfile.TemporaryDirectory(prefix="quotaguard-bench-spill-") as spill,
    ):
        os.environ["QUOTAGUARD_SPILL_DIR"] = spill
        try:
            one = str(Path(d) / "one.db")
            many = str(Path(d) / "many.db")
            loops = {
                "noop": loop_for("noop", "memory://"),
                "memory": loop_for("pair", "memory://"),
                "sqlite": loop_for("pair", one),
            }
            specs = {
                "noop": ("noop", "memory://", "default"),
                "memory": ("pair", "memory://", "default"),
                "sqlite": ("pair", many, "default"),
            }
            order = [(n, PROCESSES) for n in ("noop", "memory", "sqlite")] + [("sqlite", 1)]
            if url is not None:
                loops["floor"] = loop_for("floor", url, account)
                loops["redis"] = loop_for("pair", url, account)
                specs["floor"] = ("floor", url, account)
                specs["redis"] = ("pair", url, account)
                order += [("floor", PROCESSES), ("redis", PROCESSES)]
            single = interleaved(loops, plan)
            make_guard(many)  # created once, shared by the processes
            pool = Pool(specs, plan.seconds)
            try:
                procs = rounds(pool, plan, order)
            finally:
                pool.close()
            problems = overspend_problems(many)
            trips = {}
            if url is not None:
                trips = {k: round_trips(k, url, account) for k in ("floor", "pair")}
        finally:
            if url is not None:
                forget(url, account)
            if saved is None:
                del os.environ["QUOTAGUARD_SPILL_DIR"]
            else:
                os.environ["QUOTAGUARD_SPILL_DIR"] = saved
    return Measured(single, procs, problems, trips)


def local_figures(plan: Plan, got: Measured) -> None:
    m = _report.median
    single = got.single
    note = median_note(plan)
    _report.figure(BENCH, "no-op pair, 1 thread", m(single["noop"]), "pairs/s", note=note)
    _report.figure(BENCH, "memory pair, 1 thread", m(single["memory"]), "pairs/s", note=note)
    mem_x = m(ratios(single["noop"], single["memory"]))
    _report.figure(
        BENCH,
        "memory pair / no-op pair, 1 thread",
        mem_x,
        "x",
        target=f"<= {MEMORY_MAX_RATIO:g}x",
        ok=mem_x <= MEMORY_MAX_RATIO,
        note=note,
    )
    sq_1 = m(single["sqlite"])
    _report.figure(
        BENCH,
        "sqlite pairs, 1 process",
        sq_1,
        "pairs/s",
        target=f">= {SQLITE_MIN_RATE:,.0f}",
        ok=sq_1 >= SQLITE_MIN_RATE,
        note=note,
    )
    _report.figure(
        BENCH,
        "sqlite pair / no-op pair, 1 thread",
        m(ratios(single["noop"], single["sqlite"])),
        "x",
        note=note,
    )
    procs = got.procs
    noop_n, mem_n = procs[f"noop/{PROCESSES}"], procs[f"memory/{PROCESSES}"]
    sq_n, sq_alone = procs[f"sqlite/{PROCESSES}"], procs["sqlite/1"]
    note = median_note(plan, "one common window per round")
    _report.figure(BENCH, f"no-op pair, {PROCESSES} processes", m(noop_n), "pairs/s", note=note)
    _report.figure(BENCH, f"memory pairs, {PROCESSES} processes", m(mem_n), "pairs/s", note=note)
    mem_nx = m(ratios(noop_n, mem_n))
    _report.figure(
        BENCH,
        f"memory pair / no-op pair, {PROCESSES} processes",
        mem_nx,
        "x",
        target=f"<= {MEMORY_MAX_RATIO:g}x",
        ok=mem_nx <= MEMORY_MAX_RATIO,
        note=note,
    )
    _report.figure(BENCH, "sqlite pairs, 1 of the processes", m(sq_alone), "pairs/s", note=note)
    _report.figure(
        BENCH, f"sqlite pairs, {PROCESSES} processes (one file)", m(sq_n), "pairs/s", note=note
    )
    scale = m(ratios(sq_n, sq_alone))
    _report.figure(
        BENCH,
        f"sqlite {PROCESSES} processes / 1 process",
        scale,
        "x",
        target=f">= {SQLITE_MIN_SCALING:g}x",
        ok=scale >= SQLITE_MIN_SCALING,
        note=note,
    )
    _report.figure(
        BENCH,
        f"sqlite invariant after {PROCESSES} processes",
        float(len(got.problems)),
        "problems",
        target="0",
        ok=not got.problems,
        note="; ".join(got.problems[:3]) or "every pair recorded; used = records' free <= grant",
    )


def overspend_problems(ledger: str) -> list[str]:
    """What is wrong with the shared ledger after the rounds: free tokens used beyond the
    grant, used tokens that its records do not account for, a pair without its record,
    or anything ``guard.check()`` finds."""
    guard = qg.QuotaGuard(ledger)
    problems = list(guard.check())
    q = guard.quota(MODEL)
    records = guard.records(model=MODEL)
    free = sum(r.free_tokens for r in records)
    if q.used > q.total:
        problems.append(f"used {q.used:,} is more than the grant of {q.total:,}")
    if free != q.used:
        problems.append(f"records hold {free:,} free tokens, the quota says {q.used:,} used")
    if q.reserved:
        problems.append(f"{q.reserved:,} tokens still held after every pair settled")
    if any(r.input_tokens + r.output_tokens != 10 for r in records):
        problems.append("a record does not hold its pair's 10 tokens")
    return problems


def redis_figures(plan: Plan, got: Measured) -> None:
    m = _report.median
    single = got.single
    target = f">= {REDIS_MIN_FLOOR_RATIO:g}x"
    note = median_note(plan)
    floor_1 = m(single["floor"])
    _report.figure(BENCH, "redis floor (2 EVALSHA), 1 process", floor_1, "pairs/s", note=note)
    _report.figure(BENCH, "redis pairs, 1 process", m(single["redis"]), "pairs/s", note=note)
    x1 = m(ratios(single["redis"], single["floor"]))
    _report.figure(
        BENCH,
        "redis pairs / floor, 1 process",
        x1,
        "x",
        target=target,
        ok=x1 >= REDIS_MIN_FLOOR_RATIO,
        note=note,
    )
    floor_n, redis_n = got.procs[f"floor/{PROCESSES}"], got.procs[f"redis/{PROCESSES}"]
    note = median_note(plan, "one common window per round, one account")
    _report.figure(BENCH, f"redis floor, {PROCESSES} processes", m(floor_n), "pairs/s", note=note)
    _report.figure(BENCH, f"redis pairs, {PROCESSES} processes", m(redis_n), "pairs/s", note=note)
    xn = m(ratios(redis_n, floor_n))
    _report.figure(
        BENCH,
        f"redis pairs / floor, {PROCESSES} processes",
        xn,
        "x",
        target=target,
        ok=xn >= REDIS_MIN_FLOOR_RATIO,
        note=note,
    )
    floor_trips, redis_trips = got.trips["floor"], got.trips["pair"]
    note = f"over {ROUND_TRIP_PAIRS:,} pairs; floor {floor_trips[0]:.2f}"
    trips = round(redis_trips[0], 2)  # as printed: others' reads on the server count too
    _report.figure(
        BENCH,
        "redis round trips per pair",
        trips,
        "trips",
        target=f"<= {REDIS_MAX_ROUND_TRIPS:g}",
        ok=trips <= REDIS_MAX_ROUND_TRIPS,
        note=note,
    )
    _report.figure(
        BENCH,
        "redis commands per pair (scripts' included)",
        redis_trips[1],
        "commands",
        note=f"floor {floor_trips[1]:.2f}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.repeats} rounds of {QUICK.seconds:g} s (well under a minute)",
    )
    size.add_argument(
        "--full", action="store_true", help=f"{FULL.repeats} rounds of {FULL.seconds:g} s"
    )
    parser.add_argument("--seconds", type=float, help="time per measurement")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (figures are medians)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="a Redis server to measure on (default: $QUOTAGUARD_TEST_REDIS, else one "
        "started here); only the benchmark's own keys are written and removed",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL if args.full else DEFAULT
    plan = Plan(args.seconds or plan.seconds, args.repeats or plan.repeats)
    if plan.seconds <= 0 or plan.repeats < 1:
        parser.error("--seconds must be positive and --repeats at least 1")
    url, server, where = redis_url(args.redis)
    print(f"quotaguard {qg.__version__} ledger benchmark: {_report.machine()}")
    print(f"{plan.repeats} interleaved rounds of {plan.seconds:g} s; redis: {where}\n")
    try:
        got = measure(plan, url)
    finally:
        if server is not None:
            server.close()
    local_figures(plan, got)
    if url is not None:
        redis_figures(plan, got)
    return _report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
