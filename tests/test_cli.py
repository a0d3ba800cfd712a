"""The command line: every subcommand on a temporary ledger, errors on one line, the demo."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import quotaguard
from quotaguard._format import CST
from quotaguard.cli import main

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("isolated_home")]

MODEL = "qwen-max"


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quotaguard: error: "), err
    return lines[0]


# ---------------------------------------------------------------------- status, grant, sync


def test_status_of_an_empty_ledger(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    code, out, err = run(capsys, "status", "--ledger", ledger)
    assert code == 0, err
    assert "no free quota granted yet" in out


def test_grant_then_status_shows_the_full_quota(
    capsys: pytest.CaptureFixture[str], ledger: str
) -> None:
    code, out, err = run(capsys, "grant", MODEL, "--ledger", ledger)
    assert code == 0, err
    assert "1,000,000/1,000,000" in out

    code, out, err = run(capsys, "status", "--ledger", ledger)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(MODEL))
    assert "1,000,000/1,000,000" in line
    assert re.search(r"expires \d{4}-\d\d-\d\d \d\d:\d\d CST", line)
    assert "█" in line
    assert line.rstrip().endswith("active")


def test_status_json(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    run(capsys, "grant", MODEL, "--ledger", ledger)
    code, out, _ = run(capsys, "status", "--json", "--ledger", ledger)
    assert code == 0
    data = json.loads(out)
    assert data["account"] == "default"
    [q] = data["quotas"]
    assert q["model"] == MODEL
    assert (q["remaining"], q["total"], q["console"]) == (
        1_000_000,
        1_000_000,
        "1,000,000/1,000,000",
    )
    assert q["state"] == "active"
    assert q["expires_cst"].endswith("CST")


def test_sync_sets_the_console_figure(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    run(capsys, "grant", MODEL, "--ledger", ledger)
    code, out, err = run(capsys, "sync", MODEL, "362,917/1,000,000", "--ledger", ledger)
    assert code == 0, err
    assert "362,917/1,000,000" in out
    _, out, _ = run(capsys, "status", "--ledger", ledger)
    assert "362,917/1,000,000" in out
    assert quotaguard.QuotaGuard(ledger=ledger).remaining(MODEL) == 362_917


def test_sync_never_raises_the_remaining_unless_forced(
    capsys: pytest.CaptureFixture[str], ledger: str
) -> None:
    run(capsys, "grant", MODEL, "--ledger", ledger)
    run(capsys, "sync", MODEL, "362,917/1,000,000", "--ledger", ledger)
    code, out, err = run(capsys, "sync", MODEL, "500,000/1,000,000", "--ledger", ledger)
    assert code == 0, err
    assert quotaguard.QuotaGuard(ledger=ledger).remaining(MODEL) == 362_917
    code, out, err = run(capsys, "sync", MODEL, "500,000/1,000,000", "--force", "--ledger", ledger)
    assert code == 0, err
    assert "500,000/1,000,000" in out
    assert quotaguard.QuotaGuard(ledger=ledger).remaining(MODEL) == 500_000


@pytest.mark.parametrize("figure", ["362917 of 1000000", "2/1", "abc/def", ""])
def test_sync_refuses_a_bad_figure(
    capsys: pytest.CaptureFixture[str], ledger: str, figure: str
) -> None:
    run(capsys, "grant", MODEL, "--ledger", ledger)
    code, out, err = run(capsys, "sync", MODEL, figure, "--ledger", ledger)
    assert code == 2
    assert out == ""
    assert_one_line_error(err)
    assert quotaguard.QuotaGuard(ledger=ledger).remaining(MODEL) == 1_000_000


def test_grant_options(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    code, out, err = run(
        capsys,
        "grant",
        "qwen-turbo",
        "--tokens",
        "100,000",
        "--activated-at",
        "2026-11-01",  # a bare date is midnight CST
        "--valid-days",
        "30",
        "--ledger",
        ledger,
    )
    assert code == 0, err
    assert "activated 2026-11-01 00:00 CST" in out
    assert "expires 2026-12-01 00:00 CST" in out
    assert "/100,000" in out
    q = quotaguard.QuotaGuard(ledger=ledger).quota("qwen-turbo")
    assert q.total == 100_000


@pytest.mark.parametrize(
    "args",
    [
        ["grant", MODEL, "--valid-days", "5"],
        ["grant", MODEL, "--valid-days", "91"],
        ["grant", "no-such-model"],
        ["grant", MODEL, "--tokens", "lots"],
        ["grant", MODEL, "--tokens", "-5"],
        ["grant", MODEL, "--activated-at", "yesterday"],
        ["grant"],
    ],
)
def test_grant_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], ledger: str, args: list[str]
) -> None:
    code, _, err = run(capsys, *args, "--ledger", ledger)
    assert code == 2
    assert_one_line_error(err)
    assert quotaguard.QuotaGuard(ledger=ledger).quotas() == []


# ---------------------------------------------------------------------- free-only (R5)


def test_free_only_on_and_off(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    # No quota yet: enabling is refused, with one line, exit 1.
    code, out, err = run(capsys, "free-only", "on", MODEL, "--ledger", ledger)
    assert code == 1
    assert MODEL in assert_one_line_error(err)

    run(capsys, "grant", MODEL, "--ledger", ledger)
    # Free quota left: disabling is refused.
    code, out, err = run(capsys, "free-only", "off", MODEL, "--ledger", ledger)
    assert code == 1
    assert MODEL in assert_one_line_error(err)

    code, out, err = run(capsys, "free-only", "on", MODEL, "--ledger", ledger)
    assert code == 0, err
    assert "Free Quota Only on" in out and MODEL in out
    assert quotaguard.QuotaGuard(ledger=ledger).quota(MODEL).free_only
    _, out, _ = run(capsys, "status", "--ledger", ledger)
    assert "free only" in out

    # Used up: now it may be switched off.
    run(capsys, "sync", MODEL, "0/1,000,000", "--ledger", ledger)
    code, out, err = run(capsys, "free-only", "off", MODEL, "--ledger", ledger)
    assert code == 0, err
    assert not quotaguard.QuotaGuard(ledger=ledger).quota(MODEL).free_only


def test_free_only_on_all(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    run(capsys, "grant", "qwen-max", "--ledger", ledger)
    run(capsys, "grant", "qwen-plus", "--ledger", ledger)
    code, out, err = run(capsys, "free-only", "on", "--all", "--ledger", ledger)
    assert code == 0, err
    assert "qwen-max" in out and "qwen-plus" in out
    assert all(q.free_only for q in quotaguard.QuotaGuard(ledger=ledger).quotas())
    code, out, _ = run(capsys, "free-only", "on", "--all", "--ledger", ledger)
    assert code == 0
    assert "nothing changed" in out


@pytest.mark.parametrize(
    "args",
    [
        ["free-only", "off", "--all"],
        ["free-only", "on"],
        ["free-only", "on", MODEL, "--all"],
        ["free-only", "maybe", MODEL],
    ],
)
def test_free_only_usage_errors(
    capsys: pytest.CaptureFixture[str], ledger: str, args: list[str]
) -> None:
    code, _, err = run(capsys, *args, "--ledger", ledger)
    assert code == 2
    assert_one_line_error(err)


# ---------------------------------------------------------------------- records and bills


class Ticks:
    """A clock that moves 10 ms forward at every reading, from the real now: records of
    different guards get distinct times, so their order is known."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now


@pytest.fixture
def used_ledger(ledger: str) -> str:
    """Two calls by alice (one partly charged) and one by bob."""
    clock = Ticks()
    alice = quotaguard.QuotaGuard(ledger=ledger, user="alice", clock=clock)
    alice.alert_threshold = None
    alice.grant(MODEL, tokens=1000)
    alice.reserve(MODEL, 100, 200).settle(100, 150, "req-1")
    alice.reserve(MODEL, 900, 500).settle(900, 400, "req-2")  # 750 free left: split
    bob = quotaguard.QuotaGuard(ledger=ledger, user="bob", clock=clock)
    bob.reserve("qwen-plus", 10, 50).settle(10, 50, "req-3")  # no quota: pay as you go
    return ledger


def test_records_table(capsys: pytest.CaptureFixture[str], used_ledger: str) -> None:
    code, out, err = run(capsys, "records", "--ledger", used_ledger)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("time (CST)")
    assert len(lines) == 4
    assert "alice" in lines[1] and "free_quota" in lines[1]
    assert "split" in lines[2] and "CNY" in lines[2]
    assert "bob" in lines[3] and "pay_as_you_go" in lines[3]


def test_records_filters(capsys: pytest.CaptureFixture[str], used_ledger: str) -> None:
    def ids(*args: str) -> list[str]:
        code, out, err = run(capsys, "records", "--json", "--ledger", used_ledger, *args)
        assert code == 0, err
        return [r["request_id"] for r in json.loads(out)]

    assert ids() == ["req-1", "req-2", "req-3"]
    assert ids("--model", MODEL) == ["req-1", "req-2"]
    assert ids("--user", "bob") == ["req-3"]
    assert ids("--limit", "2") == ["req-2", "req-3"]  # the most recent
    assert ids("--since", "2999-01-01") == []
    assert ids("--until", "2000-01-01T00:00:00Z") == []
    assert ids("--since", "2000-01-01", "--until", "2999-12-31") == ["req-1", "req-2", "req-3"]


def test_records_json_and_csv(capsys: pytest.CaptureFixture[str], used_ledger: str) -> None:
    code, out, _ = run(capsys, "records", "--json", "--ledger", used_ledger)
    assert code == 0
    first = json.loads(out)[0]
    assert first["user"] == "alice"
    assert first["cost_type"] == "free_quota"
    assert first["time"].endswith("+00:00")

    code, out, _ = run(capsys, "records", "--csv", "--ledger", used_ledger)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["request_id"] for r in rows] == ["req-1", "req-2", "req-3"]
    assert rows[1]["cost_type"] == "split"
    assert rows[2]["cost"] and rows[2]["currency"] == "CNY"


def test_records_bad_input(capsys: pytest.CaptureFixture[str], used_ledger: str) -> None:
    code, _, err = run(capsys, "records", "--since", "last week", "--ledger", used_ledger)
    assert code == 2
    assert "last week" in assert_one_line_error(err)
    code, _, err = run(capsys, "records", "--json", "--csv", "--ledger", used_ledger)
    assert code == 2
    assert_one_line_error(err)


def test_bill(capsys: pytest.CaptureFixture[str], used_ledger: str) -> None:
    guard = quotaguard.QuotaGuard(ledger=used_ledger)
    expected = guard.bill()
    code, out, err = run(capsys, "bill", "--ledger", used_ledger)
    assert code == 0, err
    assert f"Bill {expected.period} (CNY" in out
    assert "total" in out
    assert "models that incurred charges: qwen-max, qwen-plus" in out

    code, out, _ = run(capsys, "bill", "--json", "--ledger", used_ledger)
    data = json.loads(out)
    assert data["period"] == expected.period
    assert data["total"] == str(expected.total)
    assert {line["model"] for line in data["lines"]} == {"qwen-max", "qwen-plus"}
    free = {line["model"]: line["free_tokens"] for line in data["lines"]}
    assert free["qwen-max"] == 1000

    code, out, _ = run(capsys, "bill", "--month", "2000-01", "--ledger", used_ledger)
    assert code == 0
    assert "no calls in this period" in out

    day = guard.records()[0].time.astimezone(CST).date().isoformat()
    code, out, _ = run(capsys, "bill", "--day", day, "--ledger", used_ledger)
    assert code == 0
    assert f"Bill {day}" in out and "qwen-max" in out


@pytest.mark.parametrize(
    "args", [["--month", "2026-13"], ["--month", "November"], ["--day", "2026-02-30"]]
)
def test_bill_bad_period(capsys: pytest.CaptureFixture[str], ledger: str, args: list[str]) -> None:
    code, _, err = run(capsys, "bill", *args, "--ledger", ledger)
    assert code == 2
    assert_one_line_error(err)


# ---------------------------------------------------------------------- prices


def test_prices_show_the_date_they_were_read(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "prices")
    assert code == 0, err
    read = quotaguard.QuotaGuard(ledger="memory://").catalog_info()["prices_read"]
    assert re.match(r"prices read \d{4}-\d\d-\d\d", out)
    assert f"prices read {read}" in out
    assert "china site, CNY" in out and "international site, USD" in out
    assert "qwen-plus" in out and "<= 128K" in out  # a tiered model
    assert "qwen-max" in out and "2.40" in out and "9.60" in out  # SPEC R13, China site


def test_prices_one_site_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prices", "--site", "international", "--model", "qwen-max")
    assert code == 0
    assert "international site, USD" in out and "china site" not in out
    code, out, _ = run(capsys, "prices", "--json", "--site", "china", "--model", "qwen-plus")
    data = json.loads(out)
    assert data["prices_read"]
    tiers = data["models"]["qwen-plus"]["prices"]["china"]["tiers"]
    assert [t["input"] for t in tiers][:1] == ["0.8"]
    assert list(data["models"]["qwen-plus"]["prices"]) == ["china"]
    code, _, err = run(capsys, "prices", "--model", "qwen-9000")
    assert code == 2
    assert "qwen-9000" in assert_one_line_error(err)


# ---------------------------------------------------------------------- the ledger, bad input


def test_ledger_from_the_environment(
    capsys: pytest.CaptureFixture[str], ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUOTAGUARD_LEDGER", ledger)
    assert run(capsys, "grant", MODEL)[0] == 0
    monkeypatch.delenv("QUOTAGUARD_LEDGER")
    _, out, _ = run(capsys, "--ledger", ledger, "status")  # before the command works too
    assert "1,000,000/1,000,000" in out


def test_default_ledger_is_in_home(capsys: pytest.CaptureFixture[str], isolated_home: Path) -> None:
    assert run(capsys, "grant", MODEL)[0] == 0
    assert (isolated_home / ".quotaguard" / "ledger.db").is_file()


def test_accounts_are_separate(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    run(capsys, "grant", MODEL, "--account", "team-a", "--ledger", ledger)
    _, out, _ = run(capsys, "status", "--account", "team-b", "--ledger", ledger)
    assert "no quota for account 'team-b' in this ledger; accounts here: team-a" in out
    assert "use --account team-a" in out
    _, out, _ = run(capsys, "status", "--account", "team-a", "--ledger", ledger)
    assert "1,000,000/1,000,000" in out


def test_unknown_region(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    code, out, err = run(capsys, "status", "--region", "mars-north-1", "--ledger", ledger)
    assert code in (1, 2)
    assert out == ""
    assert "mars-north-1" in assert_one_line_error(err)


def test_other_region_has_no_free_quota(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    run(capsys, "grant", MODEL, "--ledger", ledger)
    _, out, _ = run(capsys, "status", "--region", "ap-southeast-1", "--ledger", ledger)
    assert "0/1,000,000" in out  # R2: a China-site quota is worth nothing in Singapore


@pytest.mark.parametrize(
    ("ledger_arg", "code"),
    [("ftp://example.com/ledger", 2), ("/nonexistent-dir-quotaguard/x.db", 1)],
)
def test_bad_ledger(capsys: pytest.CaptureFixture[str], ledger_arg: str, code: int) -> None:
    got, _, err = run(capsys, "status", "--ledger", ledger_arg)
    assert got == code
    assert_one_line_error(err)


def test_corrupt_ledger_is_a_ledger_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    code, _, err = run(capsys, "status", "--ledger", str(bad))
    assert code == 1
    assert str(bad) in assert_one_line_error(err)
    assert bad.read_bytes() == b"this is not sqlite" * 100


@pytest.mark.parametrize("args", [[], ["bogus"], ["status", "--frobnicate"], ["sync", MODEL]])
def test_usage_errors(capsys: pytest.CaptureFixture[str], ledger: str, args: list[str]) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    assert_one_line_error(err)


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("status", "records", "bill", "grant", "free-only", "sync", "prices", "demo"):
        assert command in out
    code, out, _ = run(capsys, "sync", "--help")
    assert code == 0 and "FIGURE" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and quotaguard.__version__ in out


# ---------------------------------------------------------------------- demo

REQUESTS = re.compile(r"server requests: (\d+) before the refused call, (\d+) after")


def check_demo_output(out: str) -> None:
    assert "AllocationQuota.FreeTierOnly" in out
    assert "reason: exhausted" in out
    match = REQUESTS.search(out)
    assert match, out
    before, after = int(match[1]), int(match[2])
    assert before == after > 0
    assert "never reached the server" in out
    assert re.search(r"call +1 .*/\d", out)  # progress with the console figure
    assert re.search(r"call +3 +timed out after sending: in doubt", out)
    assert "free only" in out  # the status table
    assert "Bill " in out and "models that incurred charges: none" in out


@pytest.mark.parametrize("no_openai", [False, True])
def test_demo_in_process(
    capsys: pytest.CaptureFixture[str], isolated_home: Path, no_openai: bool
) -> None:
    args = ["demo", "--quota", "1000", "--delay", "0"] + (["--no-openai"] if no_openai else [])
    code, out, err = run(capsys, *args)
    assert code == 0, err
    check_demo_output(out)
    assert ("urllib" in out) == no_openai
    assert not (isolated_home / ".quotaguard").exists()  # never the user's ledger


def test_demo_with_a_ledger_runs_again(capsys: pytest.CaptureFixture[str], ledger: str) -> None:
    for _ in range(2):
        code, out, err = run(capsys, "demo", "--quota", "600", "--delay", "0", "--ledger", ledger)
        assert code == 0, err
        check_demo_output(out)
    records = quotaguard.QuotaGuard(ledger=ledger, account="demo").records()
    assert len(records) >= 2
    assert all(r.cost_type == "free_quota" for r in records)
    assert quotaguard.QuotaGuard(ledger=ledger).quotas() == []  # the default account untouched


def test_demo_stops_after_calls(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--calls", "2", "--delay", "0", "--quota", "1,000,000")
    assert code == 0
    assert "no call refused within 2 calls" in out
    assert "call   3" not in out


@pytest.mark.parametrize("extra", [[], ["--no-openai"]])
def test_demo_subprocess(tmp_path: Path, isolated_home: Path, extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "QUOTAGUARD_LEDGER"}
    env.update(HOME=str(isolated_home), PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "quotaguard", "demo", "--quota", "1500", "--delay", "0", *extra],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=90,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    check_demo_output(proc.stdout)
    assert not (isolated_home / ".quotaguard").exists()


def test_demo_runs_without_any_qwen_vocabulary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh `pip install .` has neither tiktoken nor dashscope: the demo still runs."""
    import quotaguard.testing as testing
    from quotaguard import _core
    from quotaguard.testing import tokens

    path = _core.vocabulary_path()
    monkeypatch.setattr(tokens, "_load_qwen_counter", lambda: None)
    monkeypatch.setattr(tokens, "_counter", None)
    _core.set_vocabulary(None)
    try:
        assert main(["demo", "--no-openai", "--delay", "0"]) == 0
        with testing.FakeDashScope() as server:
            assert server.token_counter_name == "utf8-bytes"
    finally:
        _core.set_vocabulary(path)
        tokens._counter = None
    out = capsys.readouterr().out
    assert "AllocationQuota.FreeTierOnly" in out
