"""Hostile files, processes and inputs (issue 9): no crash, no poisoned ledger, nobody
else's file touched. One section per numbered finding; each test failed before the fix."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock

import quotaguard as qg
from quotaguard import FreeTierOnly, LedgerError, LedgerPermissionWarning
from quotaguard.cli import main

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("isolated_home")]

MODEL = "qwen-max"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quotaguard: error: "), err
    return lines[0]


def python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------- 1. a segfault from Python


class SelfIndex:
    """An integer-like object whose ``__index__`` returns itself."""

    def __index__(self) -> SelfIndex:
        return self


class FloatIndex:
    def __index__(self) -> float:
        return 2.5


class RaisingIndex:
    def __index__(self) -> int:
        raise ArithmeticError("no index today")


class GoodIndex:
    def __index__(self) -> int:
        return 7


def test_an_index_returning_itself_does_not_kill_the_interpreter() -> None:
    # In a child: before the fix the interpreter died here (unbounded recursion).
    done = python(
        """
        import quotaguard as qg
        class N:
            def __index__(self):
                return self
        g = qg.QuotaGuard("memory://")
        g.grant("qwen-plus")
        try:
            g.reserve("qwen-plus", N(), 1)
        except TypeError as e:
            print("TypeError:", e)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TypeError: input_tokens must be an int" in done.stdout


@pytest.mark.parametrize("where", ["input_tokens", "max_output_tokens"])
@pytest.mark.parametrize("value", [SelfIndex(), FloatIndex()], ids=["self", "float"])
def test_an_index_that_gives_no_int_is_a_type_error(
    any_guard: qg.QuotaGuard, where: str, value: object
) -> None:
    any_guard.grant(MODEL)
    args: dict[str, Any] = {"input_tokens": 1, "max_output_tokens": 1, where: value}
    with pytest.raises(TypeError, match=where):
        any_guard.reserve(MODEL, **args)
    r = any_guard.reserve(MODEL, 1, 1)
    with pytest.raises(TypeError, match="output_tokens"):
        r.settle(1, value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tokens"):
        any_guard.grant(MODEL, tokens=value)  # type: ignore[arg-type]
    r.settle(1, 1)
    assert any_guard.quota(MODEL).used == 2


def test_an_index_that_raises_is_passed_on_and_a_good_one_is_used(guard: qg.QuotaGuard) -> None:
    guard.grant(MODEL)
    with pytest.raises(ArithmeticError, match="no index today"):
        guard.reserve(MODEL, RaisingIndex(), 1)  # type: ignore[arg-type]
    r = guard.reserve(MODEL, GoodIndex(), GoodIndex())  # type: ignore[arg-type]
    assert r.worst_case == 14


# ----------------------------------------------- 2. another application's database


def other_app(path: Path, *, wal: bool = False, app_id: int = 0) -> None:
    c = sqlite3.connect(path)
    if wal:
        c.execute("PRAGMA journal_mode=WAL")
    if app_id:
        c.execute(f"PRAGMA application_id = {app_id}")
    c.executescript(
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, user INTEGER REFERENCES users(id),
                             total NUMERIC, placed TEXT DEFAULT CURRENT_TIMESTAMP);
        CREATE INDEX orders_by_user ON orders(user);
        INSERT INTO users (name, email) VALUES ('ann', 'ann@example.com');
        """
    )
    c.commit()
    c.close()


@pytest.mark.parametrize(
    ("wal", "app_id", "said"),
    [
        (False, 0, '"orders", "users"'),
        (True, 0, '"orders", "users"'),
        (False, 0x12345678, "0x12345678"),
    ],
    ids=["rollback-journal", "wal", "application-id"],
)
def test_another_applications_database_is_refused_untouched(
    tmp_path: Path, wal: bool, app_id: int, said: str
) -> None:
    path = tmp_path / "app.db"
    other_app(path, wal=wal, app_id=app_id)
    before = path.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    for form in (str(path), f"sqlite://{path}"):
        with pytest.raises(LedgerError) as e:
            qg.QuotaGuard(form)
        message = str(e.value)
        assert e.value.ledger == str(path)
        assert str(path) in message and "not a quotaguard ledger" in message, message
        assert said in message and "left untouched" in message, message
        assert "\n" not in message and "CREATE" not in message and len(message) < 300, message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    c = sqlite3.connect(path)
    assert c.execute("SELECT name FROM users").fetchall() == [("ann",)]
    c.close()


def test_the_command_line_refuses_it_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    other_app(path)
    before = path.read_bytes()
    for command in ("status", "doctor"):
        code, _, err = cli(capsys, command, "--ledger", str(path))
        assert code == 1
        assert "not a quotaguard ledger" in one_line_error(err)
    assert path.read_bytes() == before


def test_a_ledger_is_marked_as_quotaguards(ledger_path: Path) -> None:
    qg.QuotaGuard(ledger_path).grant(MODEL)
    c = sqlite3.connect(ledger_path)
    assert c.execute("PRAGMA application_id").fetchone() == (0x51474C44,)
    c.close()
    again = qg.QuotaGuard(ledger_path)
    assert again.quota(MODEL).total == 1_000_000


# --------------------------------------------------------------- 3. a poisoned ledger


def test_a_time_in_milliseconds_is_refused_with_a_hint(any_guard: qg.QuotaGuard) -> None:
    for when in (time.time() * 1000, int(time.time() * 1000)):
        with pytest.raises(ValueError, match="milliseconds") as e:
            any_guard.grant(MODEL, activated_at=when)
        assert "activated_at" in str(e.value)
    for when_dt in (
        dt.datetime(2014, 12, 31, tzinfo=dt.timezone.utc),
        dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc),
    ):
        with pytest.raises(ValueError, match=r"2015\.\.2100"):
            any_guard.grant(MODEL, activated_at=when_dt)
    assert any_guard.quotas() == []
    q = any_guard.grant(MODEL, activated_at=time.time())
    assert q.total == 1_000_000


@pytest.mark.parametrize("reading", [lambda: time.time() * 1000, lambda: 0, lambda: 5e9])
def test_a_clock_in_milliseconds_is_refused(reading: Callable[[], float]) -> None:
    guard = qg.QuotaGuard("memory://", clock=reading)
    with pytest.raises(ValueError, match="clock"):
        guard.grant(MODEL)
    with pytest.raises(ValueError, match="clock"):
        guard.reserve(MODEL, 1, 1)


def test_compacting_with_a_time_in_milliseconds_deletes_nothing(
    any_guard: qg.QuotaGuard, clock: Clock
) -> None:
    any_guard.grant(MODEL)
    any_guard.reserve(MODEL, 1, 1).settle(1, 1)
    with pytest.raises(ValueError, match="milliseconds"):
        any_guard.compact(clock.now.timestamp() * 1000)
    assert len(any_guard.records()) == 1


def poison(path: Path, model: str, activated_ms: int) -> None:
    """A row as an older quotaguard wrote it from `activated_at=time.time() * 1000`."""
    c = sqlite3.connect(path)
    c.execute(
        "UPDATE quotas SET activated_ms = ? WHERE model = ?",
        (activated_ms, model),
    )
    c.commit()
    c.close()


def test_one_bad_row_never_breaks_the_views_of_the_others(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant(MODEL)
    guard.grant("qwen-plus")
    guard.reserve("qwen-plus", 10, 10).settle(10, 10)
    poison(ledger_path, MODEL, int(time.time() * 1000) * 1000)
    q = guard.quota(MODEL)
    assert q.expires_at.year == 9999 and q.activated_at.year == 9999
    assert {q.model for q in guard.quotas()} == {MODEL, "qwen-plus"}
    assert guard.quota("qwen-plus").remaining == 999_980
    assert "qwen-plus" in guard.status() and "9999-12" in guard.status()
    assert "qwen-plus" in guard._repr_html_()
    assert guard.to_pandas().shape[0] == 1
    code, out, err = cli(capsys, "status", "--ledger", str(ledger_path))
    assert code == 0, err
    assert "999,980/1,000,000" in out
    code, out, err = cli(capsys, "status", "--json", "--ledger", str(ledger_path))
    assert code == 0, err
    assert len(json.loads(out)["quotas"]) == 2
    # The doctor names the bad row and what to do.
    code, out, _ = cli(capsys, "doctor", "--ledger", str(ledger_path))
    assert code == 1
    assert f'PROBLEM  "{MODEL}": its quota was activated in year' in out
    assert "grant it again" in out
    guard.grant(MODEL, activated_at=time.time())
    assert guard.check() == []


def test_a_far_away_time_given_to_a_reader_is_a_value_error(any_guard: qg.QuotaGuard) -> None:
    for bad in (10**30, -(10**30), 1e300, float("nan"), dt.timedelta(days=1)):
        with pytest.raises((ValueError, TypeError)):
            any_guard.records(since=bad)
    assert any_guard.records(since=0) == []  # the epoch is a fine lower bound to read from
    assert any_guard.stats(since=-(10**9)) == []


# -------------------------------------------------------------- 4. fork() under load


FORK_CHILDREN = 20


def hammer_in_threads(guard: qg.QuotaGuard, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            guard.reserve(MODEL, 3, 2).settle(3, 2)
            guard.reserve(MODEL, 1, 1).release()
            guard.quotas()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))
            return


def fork_under_load(ledger: str) -> None:
    guard = qg.QuotaGuard(ledger)
    guard.grant(MODEL, tokens=10_000_000)
    stop = threading.Event()
    errors: list[str] = []
    threads = [
        threading.Thread(target=hammer_in_threads, args=(guard, stop, errors)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    children: list[int] = []
    try:
        for _ in range(FORK_CHILDREN):
            time.sleep(0.01)
            with warnings.catch_warnings():
                # 3.12+: "this process is multi-threaded": the point of the test.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: one call on the inherited guard, then out
                code = 1
                try:
                    guard.reserve(MODEL, 5, 5).settle(5, 5)
                    code = 0 if guard.check() == [] else 3
                finally:
                    os._exit(code)
            children.append(pid)
        deadline = time.monotonic() + 60
        hung: list[int] = []
        codes: list[int] = []
        for pid in children:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes.append(os.waitstatus_to_exitcode(status))
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung.append(pid)
                    break
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert hung == [], f"{len(hung)} of {FORK_CHILDREN} children hung"
    assert codes == [0] * FORK_CHILDREN, codes
    assert errors == []
    # Nothing recorded was lost: every settle of the parent and of each child is there.
    records = guard.records()
    assert guard.quota(MODEL).used == sum(r.free_tokens for r in records)
    assert sum(1 for r in records if r.input_tokens == 5) == FORK_CHILDREN
    assert guard.check() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_threads_are_inside_sqlite_ledger_calls(ledger_path: Path) -> None:
    fork_under_load(str(ledger_path))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_threads_are_inside_redis_ledger_calls(redis_ledger: str) -> None:
    fork_under_load(redis_ledger)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_never_repeats_its_parents_ids(ledger_path: Path) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant(MODEL)
    guard.reserve(MODEL, 1, 1).settle(1, 1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        r = guard.reserve(MODEL, 1, 1)
        os.write(write, str(r.id).encode())
        r.settle(1, 1)
        os._exit(0)
    os.close(write)
    child_id = int(os.read(read, 64))
    os.close(read)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    mine = guard.reserve(MODEL, 1, 1)
    assert mine.id >> 32 != child_id >> 32  # each process its own prefix
    mine.settle(1, 1)
    assert len(guard.records()) == 3


# ------------------------------------------------------------------ 5. permissions


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_an_existing_loose_ledger_is_tightened_with_its_wal_and_shm(ledger_path: Path) -> None:
    qg.QuotaGuard(ledger_path).grant(MODEL)
    for p in ledger_path.parent.glob("ledger.db*"):
        p.chmod(0o666)
    guard = qg.QuotaGuard(ledger_path)
    guard.reserve(MODEL, 1, 1).settle(1, 1)
    files = sorted(p for p in ledger_path.parent.iterdir() if p.name != "home")
    assert [p.name for p in files] == ["ledger.db", "ledger.db-shm", "ledger.db-wal"]
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_new_wal_and_shm_files_are_private_even_under_a_loose_umask(ledger_path: Path) -> None:
    old = os.umask(0)
    try:
        guard = qg.QuotaGuard(ledger_path)  # kept open: the -wal and -shm stay
        guard.grant(MODEL)
    finally:
        os.umask(old)
    assert {p.name: mode(p) for p in ledger_path.parent.glob("ledger.db*")} == {
        "ledger.db": 0o600,
        "ledger.db-wal": 0o600,
        "ledger.db-shm": 0o600,
    }


@pytest.mark.parametrize(("bits", "who"), [(0o777, "every user"), (0o770, "its group")])
def test_a_directory_others_can_write_is_warned_about(tmp_path: Path, bits: int, who: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(bits)
    try:
        with pytest.warns(LedgerPermissionWarning, match=who) as w:
            guard = qg.QuotaGuard(shared / "ledger.db")
        assert str(shared) in str(w[0].message)
        assert mode(shared) == bits  # a directory the user named is not changed
        problems = guard.check()
        assert any("writable by" in p for p in problems), problems
    finally:
        shared.chmod(0o700)


def test_quotaguards_own_directory_is_tightened(isolated_home: Path) -> None:
    own = isolated_home / ".quotaguard"
    own.mkdir(mode=0o755)
    own.chmod(0o777)
    qg.QuotaGuard().grant(MODEL)
    assert mode(own) == 0o700
    assert mode(own / "ledger.db") == 0o600


def give_away(path: Path, uid: int) -> bool:
    """Makes `path` belong to `uid`: directly as root, else through `sudo -n`."""
    if os.geteuid() == 0:
        os.chown(path, uid, -1)
        return True
    done = subprocess.run(["sudo", "-n", "chown", str(uid), str(path)], capture_output=True)
    return done.returncode == 0


def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    other = 65534 if os.geteuid() != 65534 else 65533
    if not give_away(theirs, other):
        pytest.skip("cannot give a directory to another user (not root, no sudo -n)")
    try:
        with pytest.raises(LedgerError, match=f"uid {other}") as e:
            qg.QuotaGuard(theirs / "ledger.db")
        assert str(theirs) in str(e.value)
        assert list(theirs.iterdir()) == []
    finally:
        give_away(theirs, os.geteuid())


# ---------------------------------------------------------- 6. silent wrong values


def test_a_console_figure_above_the_stated_maximum_is_refused(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant(MODEL)
    before = any_guard.quota(MODEL)
    for figure in (
        "1/1,000,000,001",
        "9,223,372,036,854,775,807/9,223,372,036,854,775,807",
        "18,446,744,073,709,551,615/18,446,744,073,709,551,615",
    ):
        with pytest.raises(ValueError, match=r"too large \(at most 1,000,000,000 tokens\)"):
            any_guard.sync(MODEL, figure)
    after = any_guard.quota(MODEL)
    assert (after.total, after.used) == (before.total, before.used)
    top = any_guard.sync("qwen-plus", "1,000,000,000/1,000,000,000", force=True)
    assert top.console == "1,000,000,000/1,000,000,000"


@pytest.mark.parametrize("name", ["x.db ", " x.db", "odd?name.db", "a?b=c.db"])
def test_a_path_is_taken_exactly_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    qg.QuotaGuard(name).grant(MODEL)
    made = {p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    assert made == {"home", name}


@pytest.mark.parametrize("uri", ["file:u.db", "file:u.db?mode=memory", "FILE:u.db"])
def test_a_file_uri_is_refused_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="file: URI") as e:
        qg.QuotaGuard(uri)
    assert repr(uri).strip("'") in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["home"]


@pytest.mark.parametrize("name", ["\x01\x02", "led\nger.db", "a\x00b.db", "x\x1b[31m.db", "\x7f"])
def test_a_ledger_name_with_control_characters_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="control character") as e:
        qg.QuotaGuard(name)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["home"]


@pytest.mark.parametrize(
    ("cost", "exc"),
    [
        ("0x10", ValueError),
        ("", ValueError),
        ("1,000", ValueError),
        ("NaN", ValueError),
        ("-1", ValueError),
        (True, TypeError),
        (b"5", TypeError),
        (1.5, TypeError),
        ([1], TypeError),
    ],
)
def test_a_bad_budget_cost_is_a_value_or_type_error(
    guard: qg.QuotaGuard, cost: object, exc: type[Exception]
) -> None:
    with pytest.raises(exc) as e:
        guard.budget(cost=cost)  # type: ignore[arg-type]
    assert "cost" in str(e.value)


def test_a_good_budget_cost_is_read_exactly(guard: qg.QuotaGuard) -> None:
    for given, read in (("1.50", Decimal("1.5")), (2, Decimal(2)), (Decimal("0.001"), None)):
        b = guard.budget(cost=given)
        assert b.cost_limit == (read if read is not None else Decimal("0.001"))


@pytest.mark.parametrize("value", [True, False, "600", b"1", None.__class__])
def test_lease_seconds_must_be_a_number(value: object) -> None:
    with pytest.raises(TypeError, match="lease_seconds"):
        qg.QuotaGuard("memory://", lease_seconds=value)  # type: ignore[arg-type]


def test_lease_seconds_take_ints_and_floats() -> None:
    assert qg.QuotaGuard("memory://", lease_seconds=2).lease_seconds == 2.0
    assert qg.QuotaGuard("memory://", lease_seconds=0.5).lease_seconds == 0.5
    assert qg.QuotaGuard("memory://").lease_seconds == 600.0
    with pytest.raises(ValueError, match="lease_seconds"):
        qg.QuotaGuard("memory://", lease_seconds=10**100)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account", "\x00"),
        ("account", "a\nb"),
        ("account", " "),
        ("account", "x" * 257),
        ("user", "\x1b"),
        ("user", ""),
        ("workspace", "\t"),
        ("workspace", "w\x00"),
    ],
)
def test_names_with_control_characters_or_blank_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        qg.QuotaGuard("memory://", **{field: value})


def test_a_model_name_with_control_characters_is_refused(any_guard: qg.QuotaGuard) -> None:
    for bad in ("qwen\x00max", "\n", "qwen-max\x1b[0m"):
        with pytest.raises(ValueError, match="model"):
            any_guard.grant(bad, tokens=10)
        with pytest.raises(ValueError, match="model"):
            any_guard.reserve(bad, 1, 1)
    assert any_guard.quotas() == []


@pytest.mark.parametrize("option", ["--account", "--region", "--site"])
def test_an_empty_option_on_the_command_line_is_refused(
    capsys: pytest.CaptureFixture[str], ledger_path: Path, option: str
) -> None:
    code, out, err = cli(capsys, "status", option, "", "--ledger", str(ledger_path))
    assert code == 2, out
    assert '""' in one_line_error(err) or "''" in err


# ----------------------------------------------------------- 7. secrets in errors


SECRET = "hunter2-secret"
SECRET_URLS = [
    f"Redis://:{SECRET}@127.0.0.1:1/0",
    f"REDISS://user:{SECRET}@127.0.0.1:1/0",
    f"redis+cluster://:{SECRET}@127.0.0.1:1,127.0.0.1:2",
    f"postgres://u:{SECRET}@h/db",
    f"mysql://root:{SECRET}@localhost:3306/x?password={SECRET}",
    f"ftp://{SECRET}@host/x.db",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_no_password_in_any_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((ValueError, LedgerError)) as e:
        qg.QuotaGuard(url)
    assert SECRET not in str(e.value) and SECRET not in repr(e.value.args)
    for command in ("status", "doctor", "records"):
        code, out, err = cli(capsys, command, "--ledger", url)
        assert code in (1, 2)
        assert SECRET not in out + err, err
        one_line_error(err)


def test_no_password_on_the_command_lines_stderr_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUOTAGUARD_LEDGER", SECRET_URLS[0])
    code, _, err = cli(capsys, "status")
    assert code == 1 and SECRET not in err


# ---------------------------------------------------- 8. Ctrl-C during a busy wait


HOLD_LOCK = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("UPDATE accounts SET overdue = overdue")
print("LOCKED", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""

WAIT_AND_INTERRUPT = """
import sys, time
import quotaguard as qg
g = qg.QuotaGuard(sys.argv[1])
print("READY", flush=True)
sys.stdin.readline()
t = time.monotonic()
try:
    g.reserve("qwen-max", 10, 10)
    print("RESERVED", flush=True)
except KeyboardInterrupt:
    print(f"INTERRUPTED {time.monotonic() - t:.3f}", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT")
@pytest.mark.parametrize("when", ["reserve", "open"])
def test_ctrl_c_ends_a_wait_for_a_locked_ledger(ledger_path: Path, when: str) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant(MODEL, tokens=1_000)
    pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    script = (
        WAIT_AND_INTERRUPT
        if when == "reserve"
        else WAIT_AND_INTERRUPT.replace("g = qg.QuotaGuard(sys.argv[1])\nprint", "print").replace(
            "g.reserve(", "qg.QuotaGuard(sys.argv[1]).reserve("
        )
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(ledger_path)], stderr=subprocess.PIPE, **pipes
    ) as waiter:
        assert waiter.stdout is not None and waiter.stdin is not None
        assert waiter.stdout.readline().strip() == "READY"
        with subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(ledger_path)], **pipes
        ) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            try:
                assert holder.stdout.readline().strip() == "LOCKED"
                waiter.stdin.write("\n")
                waiter.stdin.flush()
                time.sleep(0.5)  # inside the wait by now
                sent = time.monotonic()
                waiter.send_signal(signal.SIGINT)
                out, err = waiter.communicate(timeout=10)
                took = time.monotonic() - sent
                assert "INTERRUPTED" in out, (out, err)
                assert took < 3, f"Ctrl-C took {took:.1f} s"
                holder.stdin.write("\n")
                holder.stdin.flush()
                assert holder.wait(10) == 0
            finally:
                for p in (holder, waiter):
                    if p.poll() is None:
                        p.kill()
    # Nothing recorded half-way: no reservation, no statistics of the interrupted call.
    q = guard.quota(MODEL)
    assert (q.used, q.reserved, q.remaining) == (0, 0, 1_000)
    assert guard.stats() == []
    assert guard.check() == []


# ----------------------------------------------------------------- doctor and check


def test_doctor_on_a_healthy_ledger(
    capsys: pytest.CaptureFixture[str], ledger_path: Path, clock: Clock
) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant(MODEL)
    guard.reserve(MODEL, 100, 50).settle(90, 40)
    guard.sync(MODEL, "900,000/1,000,000")
    guard.reserve(MODEL, 1, 1)  # in flight
    assert guard.check() == []
    code, out, err = cli(capsys, "doctor", "--ledger", str(ledger_path))
    assert code == 0, out + err
    assert "every check holds" in out and "PROBLEM" not in out
    assert (
        f'"{MODEL}": 100,000 free tokens used = 130 in records + 99,870 from console syncs' in out
    )
    code, out, _ = cli(capsys, "doctor", "--json", "--ledger", str(ledger_path))
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and all(not f["problem"] for f in data["findings"])


def test_doctor_finds_a_ledger_changed_behind_its_back(
    capsys: pytest.CaptureFixture[str], ledger_path: Path
) -> None:
    guard = qg.QuotaGuard(ledger_path)
    guard.grant(MODEL)
    for _ in range(3):
        guard.reserve(MODEL, 10, 10).settle(10, 10)
    c = sqlite3.connect(ledger_path)
    c.execute("UPDATE quotas SET used = 5")
    c.commit()
    c.close()
    problems = guard.check()
    assert len(problems) == 1 and "55 tokens missing" in problems[0], problems
    code, out, _ = cli(capsys, "doctor", "--ledger", str(ledger_path))
    assert code == 1
    assert "PROBLEM" in out and "quotaguard sync qwen-max FIGURE --force" in out
    assert out.strip().endswith("1 problem found")


def test_every_engine_checks_clean(any_guard: qg.QuotaGuard, clock: Clock) -> None:
    any_guard.grant(MODEL)
    any_guard.reserve(MODEL, 10, 10).settle(10, 10)
    any_guard._core._mark_depleted("qwen-plus")
    any_guard.compact(clock.now + dt.timedelta(seconds=1))
    assert any_guard.check() == []


def test_check_on_redis(redis_ledger: str, clock: Clock) -> None:
    guard = qg.QuotaGuard(redis_ledger, clock=clock)
    guard.grant(MODEL)
    guard.reserve(MODEL, 10, 10).settle(10, 10)
    guard.sync(MODEL, "990,000/1,000,000")
    guard.reserve(MODEL, 5, 5)
    assert guard.check() == []


# ------------------------------------------------------------- boundaries no test pinned


def test_a_settle_of_exactly_its_worst_case_takes_no_tokens_held_by_others(
    any_guard: qg.QuotaGuard,
) -> None:
    any_guard.grant(MODEL, tokens=1_000)
    a = any_guard.reserve(MODEL, 300, 300)
    b = any_guard.reserve(MODEL, 200, 200)
    any_guard.sync(MODEL, "700/1,000")  # someone else used 300 meanwhile
    exact = b.settle(200, 200)
    # 700 left, 600 of it held by `a`: exactly its worst case, `b` may take 100 only.
    assert (exact.free_tokens, exact.billable_input_tokens + exact.billable_output_tokens) == (
        100,
        300,
    )
    over = a.settle(300, 301)
    assert over.free_tokens == 600  # past its worst case: what is left, whoever held it


def test_a_worst_case_exactly_what_remains_is_admitted(any_guard: qg.QuotaGuard) -> None:
    any_guard.grant(MODEL, tokens=1_000)
    any_guard.set_free_only(MODEL)
    any_guard.reserve(MODEL, 200, 200).settle(200, 200)
    r = any_guard.reserve(MODEL, 300, 300)  # exactly the 600 left
    assert r.free_tokens == 600
    with pytest.raises(FreeTierOnly) as e:
        any_guard.reserve(MODEL, 0, 1)
    assert (e.value.remaining, e.value.requested) == (0, 1)
    r.settle(300, 300)
    assert any_guard.quota(MODEL).console == "0/1,000"


def test_a_settle_exactly_at_the_lease_expiry_is_late(
    make_guard: Callable[..., qg.QuotaGuard], clock: Clock
) -> None:
    guard = make_guard(lease_seconds=10)
    guard.grant(MODEL, tokens=1_000)
    early = guard.reserve(MODEL, 10, 10)
    late = guard.reserve(MODEL, 10, 10)
    clock.advance(9.999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        early.settle(10, 10)  # a millisecond before: no warning
    clock.advance(0.001)
    assert clock.now == late.expires_at
    with pytest.warns(qg.LeaseExpiredWarning):
        late.settle(10, 10)
    assert guard.quota(MODEL).used == 40


def test_the_console_shows_a_full_quota_as_remaining_over_total(guard: qg.QuotaGuard) -> None:
    assert guard.grant(MODEL, tokens=1_000_000).console == "1,000,000/1,000,000"
    assert guard.quota(MODEL).fraction_left == 1.0


# ------------------------------------------------------------- found by the fuzz run


def test_an_argument_that_was_not_utf8_is_one_line_of_error(tmp_path: Path) -> None:
    # Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape).
    done = subprocess.run(
        [sys.executable, "-m", "quotaguard", "status", b"\xed\xa0\x80\xff"],  # type: ignore[list-item]
        capture_output=True,
        env={**os.environ, "HOME": str(tmp_path), "QUOTAGUARD_LEDGER": "memory://"},
    )
    assert done.returncode == 2
    err = done.stderr.decode("utf-8", "backslashreplace")
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("quotaguard: error: unrecognized arguments: \\udced"), err


@pytest.mark.parametrize(
    ("window", "exc"), [(10**100, ValueError), (True, TypeError), ("24", TypeError)]
)
def test_a_forecast_window_that_is_no_number_of_hours(
    guard: qg.QuotaGuard, window: object, exc: type[Exception]
) -> None:
    guard.grant(MODEL)
    with pytest.raises(exc, match="window_hours"):
        guard.forecast(MODEL, window)  # type: ignore[arg-type]
    with pytest.raises(exc, match="window_hours"):
        guard.forecasts(window)  # type: ignore[arg-type]
    assert guard.forecast(MODEL).window_hours == 24.0
    assert guard.forecast(MODEL, 2).window_hours == 2.0
