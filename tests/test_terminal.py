"""The command line on a terminal and off it: widths, colour, --json everywhere,
status --fail-below, top-up, stats, export, and the demo's progress and last lines."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

import quotaguard
from quotaguard._format import cell_width, plain
from quotaguard.cli import main

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("isolated_home")]

LONG = "qwen3-coder-plus"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Ticks:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    """Two models, calls by two users, one partly charged, a reservation in flight."""
    path = str(tmp_path / "ledger.db")
    g = quotaguard.QuotaGuard(ledger=path, user="alice", clock=Ticks())
    g.alert_threshold = None
    g.grant("qwen-max", tokens=1000)
    g.grant(LONG)
    g.reserve("qwen-max", 100, 200).settle(100, 150, "req-1")
    g.reserve("qwen-max", 900, 500).settle(900, 400, "req-2")
    g.reserve(LONG, 1000, 2000).settle(1000, 1500, "req-3")
    return path


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("QUOTAGUARD_LEDGER", "COLUMNS", "NO_COLOR", "FORCE_COLOR", "TERM")
    }
    env.update(HOME=str(home), PYTHONIOENCODING="utf-8", TERM="xterm")
    env.update(extra)
    return env


def run_pipe(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quotaguard", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        env=env_for(home, **env),
        cwd=home,
        check=False,
    )


def run_pty(home: Path, *args: str, columns: int = 80, **env: str) -> tuple[int, str, str]:
    """The command with a terminal of ``columns`` as its stdout (stderr a pipe): exit
    code, what the terminal received, stderr."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # keep "\n" as written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotaguard", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env_for(home, **env),
        cwd=home,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    code = proc.wait(timeout=120)
    return code, b"".join(chunks).decode("utf-8"), err


def screen_lines(out: str) -> Iterator[str]:
    """What a terminal shows: each piece after a carriage return is a line of its own."""
    for line in out.split("\n"):
        for piece in line.split("\r"):
            yield plain(piece.replace("\x1b[K", ""))


# ---------------------------------------------------------------------- widths

COMMANDS_WITH_TEXT = [
    ["status"],
    ["records"],
    ["bill"],
    ["stats"],
    ["forecast"],
    ["doctor"],
    ["prices"],
    ["grant", "qwen-turbo"],
    ["sync", "qwen-max", "0/1,000"],
    ["top-up", "12.50"],
    ["block", "--reason", "a reason long enough to need wrapping on a narrow terminal"],
    ["unblock"],
]


@pytest.mark.parametrize("width", [60, 120])
@pytest.mark.parametrize("args", COMMANDS_WITH_TEXT, ids=lambda a: a[0])
def test_every_line_fits_the_width(
    ledger: str, isolated_home: Path, width: int, args: list[str]
) -> None:
    proc = run_pipe(isolated_home, *args, "--ledger", ledger, COLUMNS=str(width))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    for line in proc.stdout.splitlines():
        assert cell_width(line) <= width, (width, line)


def test_text_wraps_between_words_never_inside_a_model_name(isolated_home: Path) -> None:
    proc = run_pipe(isolated_home, "prices", COLUMNS="120")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    free = next(i for i, line in enumerate(lines) if "free tokens for 90 days" in line)
    wrapped = lines[free : free + 2]
    assert wrapped[1].startswith("  ")  # a continuation, indented
    names = " ".join(line.strip() for line in wrapped).split(": ", 1)[1].split(", ")
    catalogue = quotaguard.QuotaGuard(ledger="memory://").catalog_info()["models"]
    assert set(names) <= set(catalogue)  # every name whole
    assert LONG in names


def test_narrow_status_keeps_the_model_and_its_figure(ledger: str, isolated_home: Path) -> None:
    proc = run_pipe(isolated_home, "status", "--ledger", ledger, COLUMNS="60")
    row = next(line for line in proc.stdout.splitlines() if line.startswith(LONG))
    assert "/1,000,000" in row and "active" in row
    assert re.search(r"  \d{4}-\d\d-\d\d  ", row)  # the expiry date stays
    wide = run_pipe(isolated_home, "status", "--ledger", ledger, COLUMNS="120")
    row = next(line for line in wide.stdout.splitlines() if line.startswith(LONG))
    assert "█" in row and "CST" in row  # room for the bar and the time


def test_narrow_records_drop_columns_not_rows(ledger: str, isolated_home: Path) -> None:
    wide = run_pipe(isolated_home, "records", "--ledger", ledger)  # a pipe: whole lines
    narrow = run_pipe(isolated_home, "records", "--ledger", ledger, COLUMNS="60")
    assert len(wide.stdout.splitlines()) == len(narrow.stdout.splitlines()) == 4
    assert "user" in wide.stdout.splitlines()[0] and "alice" in wide.stdout
    head = narrow.stdout.splitlines()[0].split()
    assert "model" in head and "cost" in head and "user" not in head
    assert max(len(line) for line in wide.stdout.splitlines()) > 60


def test_a_pipe_gets_the_librarys_own_text(ledger: str, isolated_home: Path) -> None:
    proc = run_pipe(isolated_home, "status", "--ledger", ledger)
    guard = quotaguard.QuotaGuard(ledger=ledger)
    assert proc.stdout == guard.status() + "\n"
    assert "\x1b[" not in proc.stdout


def test_a_quota_too_low_for_a_default_call_says_so_everywhere(
    tmp_path: Path, isolated_home: Path
) -> None:
    """88 of 1,000,000 left covers the smallest call but not one left at its defaults:
    the library's status, the notebook table and every form of `quotaguard status` say
    so alike."""
    path = str(tmp_path / "low.db")
    guard = quotaguard.QuotaGuard(ledger=path)
    guard.alert_threshold = None
    guard.grant("qwen-max")
    guard.grant(LONG)
    guard.sync("qwen-max", "88/1,000,000")
    said = "too low for a default call"
    row = next(line for line in guard.status().splitlines() if line.startswith("qwen-max"))
    assert row.endswith(said)
    assert f">{said}</td>" in guard._repr_html_()

    piped = run_pipe(isolated_home, "status", "--ledger", path)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == guard.status() + "\n"  # the same figures, % left, used, state
    for width, short in ((120, said), (60, "too low by default")):  # fewer words at 60
        proc = run_pipe(isolated_home, "status", "--ledger", path, COLUMNS=str(width))
        row = next(line for line in proc.stdout.splitlines() if line.startswith("qwen-max"))
        assert "88/1,000,000" in row and row.endswith(short), (width, row)
        other = next(line for line in proc.stdout.splitlines() if line.startswith(LONG))
        assert other.endswith("active"), (width, other)
    wide = run_pipe(isolated_home, "status", "--ledger", path, COLUMNS="140").stdout
    assert "<0.1% left" in wide and "999,912 used" in wide

    code, out, _ = run_pty(isolated_home, "status", "--ledger", path, columns=140)
    assert code == 0 and ANSI.search(out)
    row = next(line for line in screen_lines(out) if line.startswith("qwen-max"))
    assert row.endswith(said) and "<0.1% left" in row and "999,912 used" in row

    one = run_pipe(isolated_home, "status", "--model", "qwen-max", "--ledger", path)
    assert one.stdout.splitlines()[-1].endswith(said)

    data = json.loads(run_pipe(isolated_home, "status", "--json", "--ledger", path).stdout)
    states = {q["model"]: q["state"] for q in data["quotas"]}
    assert states == {"qwen-max": said, LONG: "active"}
    synced = run_pipe(isolated_home, "sync", "qwen-max", "88/1,000,000", "--ledger", path)
    assert synced.stdout.splitlines()[-1].endswith(said), synced.stdout


# ---------------------------------------------------------------------- colour


def test_colour_on_a_terminal_only(ledger: str, isolated_home: Path) -> None:
    code, out, _ = run_pty(isolated_home, "status", "--ledger", ledger)
    assert code == 0
    assert ANSI.search(out), out
    assert "1,000,000" in plain(out)

    piped = run_pipe(isolated_home, "status", "--ledger", ledger)
    assert "\x1b[" not in piped.stdout

    code, out, _ = run_pty(isolated_home, "status", "--ledger", ledger, NO_COLOR="1")
    assert code == 0 and "\x1b[" not in out and "1,000,000" in out

    forced = run_pipe(isolated_home, "status", "--ledger", ledger, FORCE_COLOR="1")
    assert ANSI.search(forced.stdout)
    both = run_pipe(isolated_home, "status", "--ledger", ledger, FORCE_COLOR="1", NO_COLOR="1")
    assert "\x1b[" not in both.stdout  # NO_COLOR wins

    code, out, _ = run_pty(isolated_home, "status", "--ledger", ledger, TERM="dumb")
    assert "\x1b[" not in out


def test_terminal_width_from_the_terminal_itself(ledger: str, isolated_home: Path) -> None:
    for columns in (60, 120):
        code, out, _ = run_pty(isolated_home, "records", "--ledger", ledger, columns=columns)
        assert code == 0
        lines = [line for line in screen_lines(out) if line]
        assert len(lines) == 4
        assert max(cell_width(line) for line in lines) <= columns
    assert "alice" in out  # at 120, the user column is back


def test_json_is_never_coloured(ledger: str, isolated_home: Path) -> None:
    code, out, _ = run_pty(isolated_home, "status", "--json", "--ledger", ledger, FORCE_COLOR="1")
    assert code == 0
    assert json.loads(out)["account"] == "default"


# ---------------------------------------------------------------------- --json everywhere

JSON_COMMANDS = [
    ["status"],
    ["records"],
    ["bill"],
    ["stats"],
    ["grant", "qwen-turbo"],
    ["free-only", "on", LONG],
    ["sync", "qwen-max", "100/1,000"],
    ["top-up", "5"],
    ["prices", "--model", "qwen-max"],
    ["forecast"],
    ["block"],
    ["unblock"],
    ["export", "out.csv"],
    ["doctor"],
    ["demo", "--quota", "600", "--delay", "0", "--no-openai"],
]


def test_json_on_every_subcommand(
    ledger: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from quotaguard.cli import COMMANDS

    assert {a[0] for a in JSON_COMMANDS} == set(COMMANDS)
    monkeypatch.chdir(tmp_path)
    for args in JSON_COMMANDS:
        for where in (["--json", *args], [*args, "--json"]):  # before or after
            if where[0] == "--json" and args[0] in ("free-only", "export", "demo"):
                continue
            code = main([*where, "--ledger", ledger])
            out, err = capsys.readouterr()
            assert code == 0, (args, err)
            data = json.loads(out)
            assert data is not None, args
    assert json.loads(capsys.readouterr().out or "null") is None


def test_json_contents(ledger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> object:
        assert main([*args, "--json", "--ledger", ledger]) == 0
        return json.loads(capsys.readouterr().out)

    stats = run("stats")
    assert isinstance(stats, list)
    assert {s["model"] for s in stats} == {"qwen-max", LONG}
    assert sum(s["calls"] for s in stats) == 3
    topped = run("top-up", "7.25")
    assert topped == {
        "account": "default",
        "balance": "7.25",
        "previous_balance": None,
        "currency": "CNY",
        "overdue": False,
    }
    granted = run("grant", "qwen-turbo", "--tokens", "5000")
    assert isinstance(granted, dict) and granted["quota"]["total"] == 5000
    blocked = run("block", "--reason", "stop")
    assert isinstance(blocked, dict) and blocked["blocked"] == "stop"
    unblocked = run("unblock")
    assert isinstance(unblocked, dict) and unblocked["was"] == "stop"


# ---------------------------------------------------------------------- status


def test_fail_below_exit_code(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    # qwen-max: 0 of 1,000 left; qwen3-coder-plus: 997,500 of 1,000,000.
    code = main(["status", "--fail-below", "20%", "--ledger", ledger])
    out, err = capsys.readouterr()
    assert code == 3
    assert "qwen-max" in out and LONG in out  # the status is printed all the same
    assert err.startswith("quotaguard: below 20%: qwen-max 0.0% (0/1,000)")
    assert LONG not in err

    assert main(["status", "--model", LONG, "--fail-below", "20", "--ledger", ledger]) == 0
    assert capsys.readouterr().err == ""
    assert main(["status", "--model", LONG, "--fail-below", "99.9%", "--ledger", ledger]) == 3
    assert LONG in capsys.readouterr().err

    code = main(["status", "--json", "--fail-below", "20%", "--ledger", ledger])
    data = json.loads(capsys.readouterr().out)
    assert code == 3 and data["below"] == ["qwen-max"] and data["fail_below"] == 0.2

    assert main(["status", "--ledger", ledger]) == 0  # without it, 0 whatever is left


def test_fail_below_with_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = str(tmp_path / "empty.db")
    assert main(["status", "--fail-below", "20%", "--ledger", empty]) == 3
    assert "no quota to check for account 'default'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "101%", "-5%", "lots", "20%%", ""])
def test_fail_below_bad_value(ledger: str, capsys: pytest.CaptureFixture[str], value: str) -> None:
    assert main(["status", f"--fail-below={value}", "--ledger", ledger]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quotaguard: error: ") and len(err.strip().splitlines()) == 1
    assert repr(value) in err


def test_status_says_which_accounts_the_ledger_holds(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "demo.db")
    assert main(["demo", "--ledger", path, "--quota", "600", "--delay", "0", "--no-openai"]) == 0
    capsys.readouterr()
    assert main(["status", "--ledger", path]) == 0
    out = capsys.readouterr().out
    assert (
        "no quota for account 'default' in this ledger; accounts here: demo — use --account demo"
        in out
    )
    assert main(["status", "--ledger", path, "--account", "demo"]) == 0
    assert "qwen-plus" in capsys.readouterr().out
    assert main(["records", "--ledger", path]) == 0
    assert "use --account demo" in capsys.readouterr().out
    # A ledger that cannot be listed (memory://) still says what to try.
    assert main(["status", "--ledger", "memory://"]) == 0
    assert "--account NAME" in capsys.readouterr().out


# ---------------------------------------------------------------------- top-up, stats


def test_top_up_changes_the_balance(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    guard = quotaguard.QuotaGuard(ledger=ledger)
    assert guard.balance is None
    assert main(["top-up", "10", "--ledger", ledger]) == 0
    out = capsys.readouterr().out
    assert "balance 10 CNY" in out and "was untracked" in out
    assert guard.balance == Decimal("10")
    assert main(["top-up", "2.50", "--ledger", ledger]) == 0
    assert guard.balance == Decimal("12.50")

    assert main(["top-up", "--set", "-3", "--ledger", ledger]) == 0
    assert "still overdue" in capsys.readouterr().out
    assert guard.overdue and guard.balance == Decimal("-3")
    assert main(["top-up", "3", "--ledger", ledger]) == 0
    assert "no longer overdue" in capsys.readouterr().out
    assert not guard.overdue and guard.balance == 0
    _ = main(["status", "--ledger", ledger])
    assert "balance 0.00 CNY" in capsys.readouterr().out


@pytest.mark.parametrize("amount", ["-5", "0", "ten", "1,000", ""])
def test_top_up_bad_amount(ledger: str, capsys: pytest.CaptureFixture[str], amount: str) -> None:
    assert main(["top-up", amount, "--ledger", ledger]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quotaguard: error: ") and len(err.strip().splitlines()) == 1
    assert quotaguard.QuotaGuard(ledger=ledger).balance is None


def test_stats_table(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--ledger", ledger]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["hour", "(CST)", "model"]
    rows = {line.split()[2]: line.split() for line in lines[1:]}
    assert rows["qwen-max"][3] == "2" and rows[LONG][3] == "1"
    assert main(["stats", "--model", LONG, "--ledger", ledger]) == 0
    assert "qwen-max" not in capsys.readouterr().out
    assert main(["stats", "--since", "2999-01-01", "--ledger", ledger]) == 0
    assert "no calls recorded" in capsys.readouterr().out


# ---------------------------------------------------------------------- export


def test_export_csv_json_jsonl(
    ledger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("r.csv", "r.json", "r.jsonl"):
        path = tmp_path / name
        assert main(["export", str(path), "--ledger", ledger]) == 0
        assert "wrote 3 records" in capsys.readouterr().out
        text = path.read_text(encoding="utf-8")
        if name.endswith(".csv"):
            ids = [r["request_id"] for r in csv.DictReader(text.splitlines())]
        elif name.endswith(".jsonl"):
            ids = [json.loads(line)["request_id"] for line in text.splitlines()]
        else:
            ids = [r["request_id"] for r in json.loads(text)]
        assert ids == ["req-1", "req-2", "req-3"]
        assert path.stat().st_mode & 0o077 == 0  # private, as the ledger is
        # Its own export may be written again (with a filter this time).
        assert main(["export", str(path), "--model", LONG, "--ledger", ledger]) == 0
        assert "wrote 1 record " in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "home",
        "ledger.db",
        "r.csv",
        "r.json",
        "r.jsonl",
    ]


@pytest.mark.parametrize("name", ["notes.csv", "data.json", "log.jsonl"])
def test_export_will_not_overwrite_a_file_that_is_not_its_own(
    ledger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    path = tmp_path / name
    path.write_text("name,phone\nann,555\n" if name.endswith(".csv") else '{"a": 1}\n')
    before = path.read_bytes()
    assert main(["export", str(path), "--ledger", ledger]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"will not overwrite {str(path)!r}" in err
    assert "is not a quotaguard export" in err and "--force" in err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["home", "ledger.db", name])

    assert main(["export", str(path), "--force", "--ledger", ledger]) == 0
    assert path.read_bytes() != before


def test_export_refuses_a_directory_and_a_bad_suffix(
    ledger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.csv").mkdir()
    assert main(["export", str(tmp_path / "d.csv"), "--ledger", ledger]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "r.xlsx"), "--ledger", ledger]) == 2
    assert "r.xlsx" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.touch()
    assert main(["export", str(empty), "--ledger", ledger]) == 0  # an empty file is fair game


# ---------------------------------------------------------------------- --ledger, --help


def test_ledger_on_every_subcommand(ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
    from quotaguard.cli import COMMANDS

    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--ledger" in out, command
        assert "--json" in out, command
    assert main(["prices", "--ledger", ledger, "--model", "qwen-max"]) == 0
    assert "qwen-max" in capsys.readouterr().out


def test_help_names_every_ledger_scheme_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in ("stats", "top-up", "export", "doctor", "demo"):
        assert command in top
    assert "NO_COLOR" in top and "3" in top and "--fail-below" in top
    assert main(["status", "--help"]) == 0
    status = " ".join(capsys.readouterr().out.split())
    for scheme in ("memory://", "sqlite:///path.db", "redis://", "rediss://", "redis+cluster://"):
        assert scheme in status
    assert "--fail-below PERCENT" in status and "20%" in status


# ---------------------------------------------------------------------- the demo


def test_demo_says_how_to_look_at_its_ledger(
    tmp_path: Path, isolated_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "kept.db")
    assert main(["demo", "--ledger", path, "--quota", "600", "--delay", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-4:]
    assert "account 'demo'" in last[0]
    assert last[1].strip() == f"quotaguard status --ledger {path} --account demo"
    # ... and that command shows it.
    assert main(last[1].split()[1:]) == 0
    assert "qwen-plus" in capsys.readouterr().out

    assert main(["demo", "--quota", "600", "--delay", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert "temporary" in last[0]
    assert last[1].strip() == "quotaguard demo --ledger demo.db"
    assert last[2].strip() == "quotaguard status --ledger demo.db --account demo"


def test_demo_progress_in_place_when_it_fits(isolated_home: Path) -> None:
    code, out, err = run_pty(
        isolated_home, "demo", "--quota", "1500", "--delay", "0", "--no-openai", columns=60
    )
    assert code == 0, err
    assert "\r\x1b[K" in out  # updated in place
    for line in screen_lines(out):
        assert cell_width(line) <= 60, line
    assert re.search(r"call +2 .*/1,500", plain(out))
    assert "refused before sending" in out


def test_demo_progress_one_line_per_call_when_it_cannot_fit(isolated_home: Path) -> None:
    # A 20-column terminal cannot hold "call 1  1,000,000/1,000,000" on one line.
    code, out, err = run_pty(
        isolated_home,
        "demo",
        "--quota",
        "1,000,000",
        "--calls",
        "4",
        "--delay",
        "0",
        "--no-openai",
        columns=20,
    )
    assert code == 0, err
    assert "\r" not in out
    calls = [line for line in plain(out).splitlines() if line.startswith("call ")]
    assert [line.split()[1] for line in calls[:2]] == ["1", "2"]
