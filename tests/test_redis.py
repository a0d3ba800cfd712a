"""The Redis ledger, against real servers: one shared ledger for many machines.

The contract: the same surface as the SQLite ledger; every key of an account under the
hash tag ``{account}`` (one Cluster slot per account); leases judged by the server's
clock unless a test clock is given; fail-closed (an unreachable server raises
``LedgerError`` naming host:port, never the password, and no call is sent unguarded); a
settle that cannot reach the server spills to ``$QUOTAGUARD_SPILL_DIR`` and is replayed
exactly once; a server that lost its data is reported, and its models refused until
granted again; ``SCRIPT FLUSH`` is harmless.

Servers come from ``$QUOTAGUARD_TEST_REDIS`` / ``$QUOTAGUARD_TEST_REDIS_CLUSTER`` or are
started here (see ``redis_harness`` and the fixtures in ``conftest``).
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock
from redis_harness import RedisServer, free_port, masters
from test_alerts import settle_until_refused
from test_concurrency import TOTAL, Outcome, check_invariants, hammer

import quotaguard as qg
from quotaguard import FreeTierOnly, LedgerError

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="needs redis-server and SIGKILL"),
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("isolated_home"),
]

MODEL = "qwen-max"
HOST = "127.0.0.1"


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> str:
    """An empty ledger URL: a standalone server, then a 3-master cluster."""
    name = "redis_ledger" if request.param == "standalone" else "redis_cluster_ledger"
    url: str = request.getfixturevalue(name)
    return url


def spill_files(spill: Path) -> list[Path]:
    return sorted(p for p in spill.rglob("*") if p.is_file()) if spill.exists() else []


def use(guard: qg.QuotaGuard, input_tokens: int, output_tokens: int = 0) -> qg.UsageRecord:
    """One call that used exactly what it reserved."""
    reservation = guard.reserve(MODEL, input_tokens, output_tokens)
    return reservation.settle(input_tokens, output_tokens)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------- the surface


def test_the_same_surface_as_sqlite(any_redis: str, clock: Clock) -> None:
    alice = qg.QuotaGuard(any_redis, clock=clock, user="alice")
    bob = qg.QuotaGuard(any_redis, clock=clock, user="bob")  # another machine, say
    assert alice.ledger.startswith(("redis://", "redis+cluster://"))
    assert HOST in alice.ledger
    alerts: list[qg.Alert] = []
    alice.on_alert(alerts.append)
    bob.on_alert(alerts.append)

    q = alice.grant(MODEL, tokens=1_000)
    assert (q.total, q.used, q.reserved, q.remaining) == (1_000, 0, 0, 1_000)
    assert bob.quota(MODEL).total == 1_000  # one ledger, seen from both

    r = alice.reserve(MODEL, 300, 200)
    assert (bob.quota(MODEL).reserved, bob.remaining(MODEL)) == (500, 500)
    rec = r.settle(250, 150, request_id="req-1")
    assert (rec.free_tokens, rec.cost, rec.cost_type) == (400, Decimal(0), "free_quota")
    assert (rec.user, rec.account, rec.model, rec.request_id) == (
        "alice",
        "default",
        MODEL,
        "req-1",
    )
    q = bob.quota(MODEL)
    assert (q.used, q.reserved, q.remaining) == (400, 0, 600)

    bob.reserve(MODEL, 100, 100).release()
    bob.reserve(MODEL, 10, 10).release(failed=True)
    assert (alice.quota(MODEL).reserved, alice.remaining(MODEL)) == (0, 600)

    alice.set_free_only(MODEL)
    assert bob.quota(MODEL).free_only
    with pytest.raises(FreeTierOnly) as refused:
        bob.reserve(MODEL, 500, 101)
    e = refused.value
    assert (e.code, e.reason, e.model, e.requested, e.remaining) == (
        "AllocationQuota.FreeTierOnly",
        "exhausted",
        MODEL,
        601,
        600,
    )

    use(bob, 400)  # 200 left: the 20 % line
    assert [a.kind for a in alerts] == ["quota_low"]
    assert alerts[0].remaining == 200
    use(alice, 100)
    assert [a.kind for a in alerts] == ["quota_low"]
    use(alice, 100)  # 0 left
    assert [a.kind for a in alerts] == ["quota_low", "quota_depleted"]
    with pytest.raises(FreeTierOnly):
        alice.reserve(MODEL, 1, 0)

    fresh = qg.QuotaGuard(any_redis, clock=clock)
    q = fresh.quota(MODEL)
    assert (q.total, q.used, q.reserved, q.remaining, q.free_only) == (1_000, 1_000, 0, 0, True)
    records = fresh.records()
    assert sorted((r.user, r.input_tokens, r.output_tokens, r.free_tokens) for r in records) == [
        ("alice", 100, 0, 100),
        ("alice", 100, 0, 100),
        ("alice", 250, 150, 400),
        ("bob", 400, 0, 400),
    ]
    assert len(fresh.records(user="bob")) == 1
    assert sum(r.free_tokens for r in records) == q.used

    bill = fresh.bill(month="2026-01")
    (line,) = bill.lines
    assert (line.model, line.free_tokens, line.billable_tokens, line.cost) == (MODEL, 1_000, 0, 0)
    assert (bill.total, bill.charged_models) == (Decimal(0), [])

    stats = fresh.stats(model=MODEL)
    assert sum(s.calls for s in stats) == 4
    assert sum(s.refusals for s in stats) == 2
    assert sum(s.failures for s in stats) == 1
    assert sum(s.input_tokens for s in stats) == 850
    assert sum(s.output_tokens for s in stats) == 150


def test_balance_and_paid_calls(any_redis: str, clock: Clock) -> None:
    guard = qg.QuotaGuard(any_redis, clock=clock)
    other = qg.QuotaGuard(any_redis, clock=clock, user="ram-user")
    assert guard.balance is None
    guard.set_balance("10")
    assert other.balance == Decimal("10")

    rec = other.reserve("qwen-plus", 1_000, 1_000).settle(1_000, 1_000)  # no free quota
    assert rec.cost_type == "pay_as_you_go"
    assert rec.cost is not None and rec.cost > 0
    assert guard.balance == Decimal("10") - rec.cost
    bill = guard.bill(month="2026-01")
    assert (bill.total, bill.charged_models) == (rec.cost, ["qwen-plus"])

    guard.set_balance("-1")
    assert other.overdue
    with pytest.raises(qg.AccountOverdue):
        other.reserve("qwen-plus", 1, 1)
    other.top_up("2")
    assert guard.balance == Decimal("1")
    assert not guard.overdue
    other.reserve("qwen-plus", 1, 1).release()


def test_sync_as_the_memory_ledger_does(any_redis: str, clock: Clock) -> None:
    guard = qg.QuotaGuard(any_redis, clock=clock)
    other = qg.QuotaGuard(any_redis, clock=clock)  # sees every sync
    memory = qg.QuotaGuard("memory://", clock=clock)
    for g in (guard, memory):
        g.grant(MODEL, tokens=1_000_000)
        use(g, 1_000)
    steps = [
        ("362,917/1,000,000", False),
        ("500,000/1,000,000", False),  # the console lags: never raised...
        ("500,000/1,000,000", True),  # ...unless forced
        ("7/100", False),
    ]
    for figure, force in steps:
        synced = guard.sync(MODEL, figure, force=force)
        expected = memory.sync(MODEL, figure, force=force)
        seen = other.quota(MODEL)
        for q in (synced, seen):
            assert (q.total, q.used, q.remaining, q.console) == (
                expected.total,
                expected.used,
                expected.remaining,
                expected.console,
            ), figure
        if figure == "500,000/1,000,000":
            assert seen.remaining == (500_000 if force else 362_917)
    assert [q.model for q in other.quotas()] == [MODEL]


def test_the_ledger_from_the_environment(
    redis_ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAGUARD_LEDGER", redis_ledger)
    qg.QuotaGuard().grant(MODEL, tokens=5_000)
    assert qg.QuotaGuard(redis_ledger).quota(MODEL).total == 5_000
    assert HOST in qg.QuotaGuard().ledger


def test_script_flush_mid_run_is_harmless(any_redis: str) -> None:
    calls = 50
    guard = qg.QuotaGuard(any_redis)
    guard.grant(MODEL, tokens=1_000_000)
    held = guard.reserve(MODEL, 10, 10)  # reserved before the flush, settled after
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                use(guard, 3, 2)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    clients = masters(any_redis)
    try:
        for _ in range(10):
            for client in clients:
                client.script_flush()
            time.sleep(0.01)
    finally:
        for client in clients:
            client.close()
    worker.join(30)
    assert not worker.is_alive()
    assert not errors, errors
    held.settle(10, 10)
    use(guard, 1)
    q = guard.quota(MODEL)
    assert (q.used, q.reserved) == (calls * 5 + 20 + 1, 0)
    assert len(guard.records()) == calls + 2


# ---------------------------------------------------------------------- keys and slots

ACCOUNTS = ("alpha", "beta", "default")  # three slots, on three different masters
KEY = re.compile(r"qg:\{([^}]*)\}:")


def exercise(url: str, account: str) -> qg.Reservation:
    """Leaves every kind of state an account has: quota, free-only, records, hourly stats,
    fired alerts, a balance; returns a reservation it left open."""
    guard = qg.QuotaGuard(url, account=account, user="root")
    guard.grant(MODEL, tokens=1_000)
    guard.grant("qwen-plus", tokens=1_000)
    guard.set_free_only(MODEL)
    guard.set_balance("5")
    for _ in range(10):
        use(guard, 100)  # crosses 20 % and reaches 0: both alerts fired
    with pytest.raises(FreeTierOnly):
        guard.reserve(MODEL, 500, 0)
    guard.reserve("qwen-plus", 10, 10).release(failed=True)
    guard.reserve("qwen-turbo", 10, 10).settle(10, 10)  # paid: the balance moves
    assert guard.records()
    return guard.reserve("qwen-plus", 10, 10)


def test_every_key_lies_under_its_account_hash_tag(any_redis: str) -> None:
    held = [exercise(any_redis, account) for account in ACCOUNTS]
    clients = masters(any_redis)
    try:
        keys = {
            key.decode(): client
            for client in clients
            for key in client.scan_iter(match="*", count=1_000)
        }
        by_account: dict[str, list[str]] = {a: [] for a in ACCOUNTS}
        for key in keys:
            m = KEY.match(key)
            assert m is not None and m.group(1) in ACCOUNTS, f"a key outside any account: {key}"
            by_account[m.group(1)].append(key)
        assert all(len(k) >= 2 for k in by_account.values()), by_account

        if any_redis.startswith("redis+cluster://"):
            slot_of = clients[0].cluster
            slots = {a: slot_of("KEYSLOT", a) for a in ACCOUNTS}
            assert len(set(slots.values())) == len(ACCOUNTS)
            for account, account_keys in by_account.items():
                where = {slot_of("KEYSLOT", k) for k in account_keys}
                assert where == {slots[account]}, (account, account_keys)
                # ...and so on one master: the one that owns the slot.
                owners = {id(keys[k]) for k in account_keys}
                assert len(owners) == 1, (account, account_keys)
    finally:
        for client in clients:
            client.close()
    for r in held:
        r.release()


# ---------------------------------------------------------------------- no overspend

# Two of the four processes run on test clocks 5 minutes apart, as two machines' clocks
# would be; the other two on the server's. The lease (600 s) outlasts the disagreement, so
# no guard sees another's reservation as expired, and every admission is exact.
SKEWS: list[float | None] = [150.0, -150.0, None, None]
THREADS = 4


def hammer_process(url: str, index: int, skew: float | None, start: Any, results: Any) -> None:
    """One machine: its own guard shared by ``THREADS`` threads, each hammering."""
    try:
        clock = None if skew is None else (lambda: time.time() + skew)
        guard = qg.QuotaGuard(url, user=f"p{index}", clock=clock)
        outcomes = [Outcome() for _ in range(THREADS)]

        def run(i: int) -> None:
            try:
                outcomes[i] = hammer(guard, seed=100 * index + i)
            except BaseException as e:
                outcomes[i].errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
        start.wait(30)
        for t in threads:
            t.start()
        for t in threads:
            t.join(45)
        if any(t.is_alive() for t in threads):
            outcomes.append(Outcome(errors=["a thread did not finish"]))
        results.put((index, outcomes))
    except BaseException as e:
        results.put((index, [Outcome(errors=[repr(e)])]))


def test_processes_threads_and_skewed_clocks_never_overspend(redis_ledger: str) -> None:
    guard = qg.QuotaGuard(redis_ledger)
    # Activated an hour ago: active on every clock, the one 150 s behind too.
    hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    guard.grant(MODEL, tokens=TOTAL, activated_at=hour_ago)
    guard.set_free_only(MODEL)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(SKEWS))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=hammer_process, args=(redis_ledger, i, skew, start, results))
        for i, skew in enumerate(SKEWS)
    ]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=50) for _ in procs)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    outcomes = [o for i in range(len(procs)) for o in got[i]]
    assert len(outcomes) == len(SKEWS) * THREADS
    check_invariants(guard, outcomes)
    assert {r.user for r in guard.records()} <= {f"p{i}" for i in range(len(procs))}


# ---------------------------------------------------------------------- child processes


class Worker:
    """A child ``python -c script args...``; a thread collects the lines it prints."""

    def __init__(self, script: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line was read
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):  # cut short by a kill: never acknowledged
                continue
            self.times.append(time.monotonic())
            self.lines.append(line.rstrip("\n"))

    def seen(self, word: str) -> list[list[str]]:
        """The printed lines that start with ``word``, split into fields."""
        return [line.split(" ", 2) for line in list(self.lines) if line.split(" ", 1)[0] == word]

    def first(self, word: str) -> tuple[float, list[str]]:
        """When the first line starting with ``word`` was read, and its fields."""
        i = next(i for i, line in enumerate(list(self.lines)) if line.split(" ", 1)[0] == word)
        return self.times[i], self.lines[i].split(" ", 2)

    def acked(self) -> dict[int, int]:
        """Record id -> free tokens, for each record the child got back."""
        return {int(f[1]): int(f[2]) for f in self.seen("ACK")}

    def wait_for(self, word: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen(word)) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(5)
                raise AssertionError(
                    f"child (exit {self.proc.poll()}) printed {len(self.seen(word))} x {word},"
                    f" not {count}: ...{self.lines[-5:]}"
                )
            time.sleep(0.01)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.finish()
        assert self.proc.returncode == -signal.SIGKILL, "it died before it was killed"

    def finish(self, timeout: float = 30.0) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)  # what it printed before it ended is still in the pipe
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode


# ---------------------------------------------------------------------- SIGKILL

# The children print each line with one write (say), so that a kill never leaves half a
# line behind, even with PYTHONUNBUFFERED set: print() then writes its pieces one by one.
KILLED_CHILD = """
import random, sys, time
import quotaguard as qg

def say(*parts):
    sys.stdout.write(" ".join(map(str, parts)) + "\\n")
    sys.stdout.flush()

url, seed, lease, hold_after = sys.argv[1:5]
rng = random.Random(int(seed))
guard = qg.QuotaGuard(url, user="child" + seed, lease_seconds=float(lease))
say("READY")
calls = 0
while True:
    r = guard.reserve("qwen-max", 100, 200)
    if int(hold_after) >= 0 and calls >= int(hold_after):
        say("RESERVED", r.id)
        time.sleep(60)
    rec = r.settle(rng.randint(0, 100), rng.randint(0, 200), request_id=f"req-{seed}-{calls}")
    say("ACK", rec.id, rec.free_tokens)
    calls += 1
"""

WORST = 300  # 100 input + 200 max output, as the children reserve
LEASE = 1.0
HOLDER_LEASE = 3.0  # time enough to see the killed holder's reservation still held
BIG = 1_000_000_000


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_workers_lose_nothing_and_their_reservations_return(
    redis_ledger: str, seed: int
) -> None:
    guard = qg.QuotaGuard(redis_ledger)
    guard.grant(MODEL, tokens=BIG)
    rng = random.Random(seed)
    runners = [Worker(KILLED_CHILD, redis_ledger, seed * 10 + i, LEASE, -1) for i in range(3)]
    holder = Worker(KILLED_CHILD, redis_ledger, seed * 10 + 9, HOLDER_LEASE, rng.randint(5, 40))
    children = [*runners, holder]
    try:
        for w in runners:
            w.wait_for("ACK", 20)
        holder.wait_for("RESERVED")
        # Killed now: the holder mid-call, the runners anywhere in their loop.
        holder.kill()
        time.sleep(rng.uniform(0, 0.05))
        for w in runners:
            w.kill()
    finally:
        for w in children:
            if w.proc.poll() is None:
                w.kill()

    q = guard.quota(MODEL)
    reserved_at, (_, open_id) = holder.first("RESERVED")
    if time.monotonic() - reserved_at < HOLDER_LEASE - 1:
        assert q.reserved >= WORST, "the open reservation is held until its lease ends"
    assert q.reserved % WORST == 0 and q.reserved <= WORST * len(children)

    records = guard.records()
    by_id = {r.id: r.free_tokens for r in records}
    acked = {i: free for w in children for i, free in w.acked().items()}
    assert len(acked) >= 60
    lost = {i: free for i, free in acked.items() if by_id.get(i) != free}
    assert not lost, f"acknowledged records lost or changed: {list(lost.items())[:10]}"
    # At most one call per runner committed without being acknowledged; none of the holder.
    assert len(acked) <= len(records) <= len(acked) + len(runners)
    assert int(open_id) not in by_id
    assert q.used == sum(by_id.values())

    # After the lease (judged by the server's clock) every reservation has returned.
    wait_until(
        "the killed children's reservations returned",
        lambda: guard.quota(MODEL).reserved == 0,
        timeout=5 * HOLDER_LEASE,
    )
    assert guard.remaining(MODEL) == BIG - q.used


# ---------------------------------------------------------------------- restarts and outages

RESTARTED_CHILD = """
import os, random, sys, time
import quotaguard as qg

def say(*parts):
    sys.stdout.write(" ".join(map(str, parts)) + "\\n")
    sys.stdout.flush()

url, seed, stop = sys.argv[1:4]
rng = random.Random(int(seed))
guard = qg.QuotaGuard(url, user="child" + seed, lease_seconds=2)
say("READY")
calls = 0
while not os.path.exists(stop):
    calls += 1
    try:
        r = guard.reserve("qwen-max", 100, 200)
    except qg.LedgerError as e:
        say("DOWN", calls, str(e).replace("\\n", " "))
        time.sleep(0.02)
        continue
    used_in, used_out = rng.randint(0, 100), rng.randint(0, 200)
    try:
        rec = r.settle(used_in, used_out, request_id=f"req-{seed}-{calls}")
    except qg.LedgerError as e:
        say("SPILLED", used_in + used_out, str(e).replace("\\n", " "))
        continue
    say("ACK", rec.id, rec.free_tokens)
say("DONE")
"""


@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_a_server_restarted_mid_run_loses_nothing_acknowledged(
    own_redis: RedisServer, redis_spill_dir: Path, tmp_path: Path, how: str
) -> None:
    url = own_redis.url
    address = f"{HOST}:{own_redis.port}"
    qg.QuotaGuard(url).grant(MODEL, tokens=BIG)
    stop = tmp_path / "stop"
    children = [Worker(RESTARTED_CHILD, url, seed, stop) for seed in (1, 2)]
    try:
        for w in children:
            w.wait_for("ACK", 20)
        # Append-only file, fsynced before each reply: a kill keeps what was acknowledged.
        if how == "kill":
            own_redis.kill()
        else:
            own_redis.stop()
        time.sleep(1.5)  # longer than a settle's retries: some calls meet a dead server
        own_redis.start()
        for w in children:
            w.wait_for("ACK", len(w.seen("ACK")) + 20)
        stop.touch()
        for w in children:
            w.wait_for("DONE")
            assert w.finish() == 0
    finally:
        stop.touch()
        for w in children:
            if w.proc.poll() is None:
                w.kill()

    down = [f for w in children for f in w.seen("DOWN")]
    spilled = [f for w in children for f in w.seen("SPILLED")]
    assert down or spilled, "no call met the server down"
    for fields in down + spilled:
        assert address in fields[2], fields
        assert "lost" not in fields[2].lower(), f"the data survived, yet: {fields}"

    guard = qg.QuotaGuard(url)  # replays whatever a child spilled and did not replay
    records = guard.records()
    by_id = {r.id: r.free_tokens for r in records}
    acked = {i: free for w in children for i, free in w.acked().items()}
    lost = {i: free for i, free in acked.items() if by_id.get(i) != free}
    assert not lost, f"acknowledged records lost or changed: {list(lost.items())[:10]}"
    # Every spilled settle is recorded, once.
    assert len(records) == len(acked) + len(spilled)
    q = guard.quota(MODEL)
    assert q.used == sum(by_id.values()) == sum(acked.values()) + sum(int(f[1]) for f in spilled)
    assert len(qg.QuotaGuard(url).records()) == len(records)  # a second replay adds nothing
    wait_until("orphaned reservations returned", lambda: guard.quota(MODEL).reserved == 0)


REPORT = """
import sys
import quotaguard as qg

guard = qg.QuotaGuard(sys.argv[1])
q = guard.quota(sys.argv[2])
print(q.used, q.reserved, len(guard.records()))
"""


def test_a_stopped_server_fails_closed_and_the_settle_spills(
    own_redis: RedisServer, redis_spill_dir: Path
) -> None:
    url = own_redis.url
    address = f"{HOST}:{own_redis.port}"
    guard = qg.QuotaGuard(url)
    guard.grant(MODEL, tokens=10_000)
    use(guard, 60, 40)
    r = guard.reserve(MODEL, 300, 200)  # the call is out when the server goes away
    own_redis.stop()

    started = time.monotonic()
    with pytest.raises(LedgerError) as e:
        guard.reserve(MODEL, 10, 10)
    assert address in str(e.value)
    assert time.monotonic() - started < 10

    sent: list[object] = []

    @guard.wrap(model=MODEL)
    def ask(messages: list[dict[str, str]], max_tokens: int = 20) -> dict[str, Any]:
        sent.append(messages)
        return {"usage": {"input_tokens": 5, "output_tokens": 5}}

    with pytest.raises(LedgerError):
        ask([{"role": "user", "content": "hello"}])
    assert sent == [], "a call went out unguarded"

    before = set(spill_files(redis_spill_dir))
    started = time.monotonic()
    with pytest.raises(LedgerError) as e:
        r.settle(250, 150, request_id="req-spilled")
    took = time.monotonic() - started
    assert address in str(e.value)
    assert 0.5 <= took < 10, f"a settle retries briefly (about 1 s) before it spills: {took:.2f} s"
    spilled = set(spill_files(redis_spill_dir)) - before
    assert spilled, f"nothing spilled into {redis_spill_dir}"
    for f in spill_files(redis_spill_dir):  # whatever quotaguard keeps there
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    own_redis.start()
    # Another process's first operation replays the spill...
    env = {**os.environ, "QUOTAGUARD_SPILL_DIR": str(redis_spill_dir)}
    report = subprocess.run(
        [sys.executable, "-c", REPORT, url, MODEL],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.split() == ["500", "0", "2"]
    # ...exactly once: neither this guard nor a new one replays it again.
    for g in (guard, qg.QuotaGuard(url), guard):
        q = g.quota(MODEL)
        assert (q.used, q.reserved) == (500, 0)
        assert sorted(
            (x.request_id or "", x.input_tokens, x.output_tokens, x.free_tokens)
            for x in g.records()
        ) == [("", 60, 40, 100), ("req-spilled", 250, 150, 400)]
    use(guard, 1)  # and calls go through again
    assert guard.quota(MODEL).used == 501


def test_a_replay_that_died_half_way_is_finished_once(
    own_redis: RedisServer, redis_spill_dir: Path
) -> None:
    guard = qg.QuotaGuard(own_redis.url)
    guard.grant(MODEL, tokens=10_000)
    held = [guard.reserve(MODEL, 100, 100) for _ in range(3)]
    own_redis.stop()
    for r in held:
        with pytest.raises(LedgerError):
            r.settle(60, 40)
    spills = [f for f in spill_files(redis_spill_dir) if f.name.startswith("redis-spill-")]
    assert spills
    # A process claimed the spill to replay it and was killed before it finished.
    for f in spills:
        f.rename(f.with_name(f.name.rsplit(".", 1)[0] + ".replaying-999999"))
    own_redis.start()
    fresh = qg.QuotaGuard(own_redis.url)
    assert len(fresh.records(model=MODEL)) == 3
    assert fresh.quota(MODEL).used == 300
    assert not [f for f in spill_files(redis_spill_dir) if "spill" in f.name]
    # A second look finds nothing left to replay, and counts nothing twice.
    assert len(qg.QuotaGuard(own_redis.url).records(model=MODEL)) == 3


def test_an_unreachable_server_fails_closed_at_construction(redis_spill_dir: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(LedgerError) as e:
        qg.QuotaGuard(f"redis://{HOST}:{port}/0")
    assert f"{HOST}:{port}" in str(e.value)
    assert time.monotonic() - started < 10


def test_rediss_never_falls_back_to_plain_text(redis_url: str, redis_spill_dir: Path) -> None:
    """A TLS URL to a server without TLS fails: it is never sent in the clear instead."""
    tls = "rediss://" + redis_url.split("://", 1)[1]
    started = time.monotonic()
    with pytest.raises(LedgerError):
        qg.QuotaGuard(tls).grant(MODEL, tokens=1_000)
    assert time.monotonic() - started < 15  # a handshake that never completes times out


def test_a_server_that_lost_its_data_is_reported(redis_spill_dir: Path) -> None:
    # No append-only file, no snapshot: a restart comes back empty.
    with RedisServer(appendonly=False, save=None) as server:
        guard = qg.QuotaGuard(server.url)
        guard.grant(MODEL, tokens=10_000)
        guard.set_free_only(MODEL)
        use(guard, 100)
        server.restart()

        with pytest.raises(LedgerError) as e:
            guard.reserve(MODEL, 10, 10)
        assert "lost" in str(e.value).lower(), str(e.value)
        assert f"{HOST}:{server.port}" in str(e.value)
        # The quota and the switch are gone with the data: refused, not sent as if free.
        for _ in range(2):
            with pytest.raises(FreeTierOnly) as refused:
                guard.reserve(MODEL, 10, 10)
            assert refused.value.model == MODEL

        guard.grant(MODEL, tokens=10_000)  # granted again: calls go through
        assert use(guard, 10, 10).free_tokens == 20
        assert guard.quota(MODEL).used == 20


# ---------------------------------------------------------------------- alerts


def test_four_processes_see_each_alert_exactly_once(redis_ledger: str, tmp_path: Path) -> None:
    setup = qg.QuotaGuard(redis_ledger, verified=False)
    setup.grant(MODEL, tokens=40_000)
    # 20,000 left: the line (8,000) is 1,200 calls away, so all four are settling then.
    use(setup, 20_000)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    outs = [tmp_path / f"alerts-{i}.jsonl" for i in range(4)]
    procs = [
        ctx.Process(target=settle_until_refused, args=(redis_ledger, str(out), barrier))
        for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(50)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    lines = [[json.loads(x) for x in out.read_text().splitlines()] for out in outs]
    calls = [line["calls"] for ls in lines for line in ls if "calls" in line]
    assert sum(calls) == 2_000
    assert sum(n > 0 for n in calls) >= 2, calls
    seen = [line for ls in lines for line in ls if "kind" in line]
    assert sorted(a["kind"] for a in seen) == ["quota_depleted", "quota_low"], seen
    low = next(a for a in seen if a["kind"] == "quota_low")
    assert low["remaining"] == 8_000  # the settle that crossed the line
    assert setup.remaining(MODEL) == 0
    assert len(setup.records()) == 2_001


# ---------------------------------------------------------------------- the password

SECRET = "Pa55-w0rd-NEVER-SHOWN"


def shown(*texts: object) -> list[str]:
    """The texts that give the password away."""
    return [repr(t) for t in texts if SECRET in str(t) or SECRET in repr(t)]


def test_the_password_is_never_shown(
    redis_spill_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with RedisServer(password=SECRET) as server:
        address = f"{HOST}:{server.port}"
        assert SECRET in server.url
        guard = qg.QuotaGuard(server.url)
        guard.grant(MODEL, tokens=1_000)
        assert address in guard.ledger
        assert not shown(repr(guard), guard.ledger, guard.status(), guard._repr_html_())

        monkeypatch.setenv("QUOTAGUARD_LEDGER", server.url)
        from_env = qg.QuotaGuard()
        assert from_env.quota(MODEL).total == 1_000
        assert not shown(repr(from_env), from_env.ledger)

        for wrong in (server.url.replace(SECRET, "Wr0ng-Guess-XYZ"), f"redis://{address}/0"):
            with pytest.raises(LedgerError) as e:
                qg.QuotaGuard(wrong)
            assert "Wr0ng-Guess-XYZ" not in f"{e.value} {e.value!r} {e.value.ledger}"

        r = guard.reserve(MODEL, 10, 10)
        server.stop()
        before = set(spill_files(redis_spill_dir))
        failures = []
        with pytest.raises(LedgerError) as e:
            guard.reserve(MODEL, 1, 1)
        failures.append(e.value)
        with pytest.raises(LedgerError) as e:
            r.settle(5, 5)  # spilled
        failures.append(e.value)
        with pytest.raises(LedgerError) as e:
            qg.QuotaGuard(server.url)
        failures.append(e.value)
        for exc in failures:
            assert address in str(exc)
            assert not shown(str(exc), repr(exc), exc.ledger, *exc.args), exc
        assert set(spill_files(redis_spill_dir)) - before, "the settle did not spill"
        files = spill_files(redis_spill_dir)
        assert not [f for f in files if SECRET.encode() in f.read_bytes()]
        assert not shown(repr(guard), guard.ledger)
    assert SECRET not in caplog.text


# ---------------------------------------------------------------------- the command line


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "QUOTAGUARD_LEDGER"}
    env.update(HOME=str(home), PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "quotaguard", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=40,
        env=env,
        check=False,
    )


def test_the_command_line_on_a_redis_ledger(redis_ledger: str, tmp_path: Path) -> None:
    granted = cli(tmp_path, "grant", MODEL, "--ledger", redis_ledger)
    assert granted.returncode == 0, granted.stderr
    assert "1,000,000/1,000,000" in granted.stdout
    use(qg.QuotaGuard(redis_ledger), 1_000)
    status = cli(tmp_path, "status", "--ledger", redis_ledger)
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith(MODEL))
    assert "999,000/1,000,000" in line


def test_the_command_line_never_shows_the_password(tmp_path: Path, redis_spill_dir: Path) -> None:
    port = free_port()  # nothing listens there
    done = cli(tmp_path, "status", "--ledger", f"redis://:{SECRET}@{HOST}:{port}/0")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quotaguard: error: "), done.stderr
    assert f"{HOST}:{port}" in lines[0]
    assert SECRET not in done.stderr + done.stdout
