"""Friendly refusals: messages that say the call was not sent and what to do, tracebacks
that start at the caller's line, log lines that say they come from quotaguard, and the
warning for calls to a model without free quota (with the closest catalogue names)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import dashscope
import openai
import pytest

import quotaguard as qg
from quotaguard import FreeTierOnly, NoFreeQuotaWarning
from quotaguard.cli import main
from quotaguard.testing import FakeDashScope

KEY = "sk-test"
SRC = Path(qg.__file__).resolve().parent


def refused(call: Any, cls: type[BaseException] = FreeTierOnly) -> Any:
    with pytest.raises(cls) as e:
        call()
    return e.value


def free_only(remaining: str = "800/1,000,000", model: str = "qwen-max") -> qg.QuotaGuard:
    guard = qg.QuotaGuard("memory://")
    guard.grant(model)
    guard.sync(model, remaining)
    guard.set_free_only(model)
    return guard


# --------------------------------------------------------------------------- messages


def test_exhausted_with_tokens_left_says_lower_max_tokens_clip_and_sync() -> None:
    e = refused(lambda: free_only().reserve("qwen-max", 200, 1_000))
    assert (e.reason, e.model, e.remaining, e.requested) == ("exhausted", "qwen-max", 800, 1_200)
    text = str(e)
    assert "It was not sent" in text.splitlines()[0]
    assert "lower max_tokens" in text and "clip=True" in text
    assert 'guard.sync("qwen-max", "LEFT/TOTAL")' in text
    # R5: the switch cannot be turned off while free tokens remain: not offered as a fix.
    assert "set_free_only" not in text and "800 free tokens left are used up" in text
    # An input that alone does not fit: a smaller output would not help.
    text = str(refused(lambda: free_only().reserve("qwen-max", 1_000, 200)))
    assert "clip=True" not in text
    assert "shorten the input: its 1,000 tokens alone do not fit the 800 free tokens left" in text


def test_exhausted_to_zero_offers_the_switch_not_clip() -> None:
    guard = free_only()
    guard.reserve("qwen-max", 700, 100).settle(700, 100)  # the last free tokens
    e = refused(lambda: guard.reserve("qwen-max", 10, 10))
    text = str(e)
    assert e.remaining == 0 and "It was not sent" in text
    assert "clip=True" not in text  # nothing is left to clip to
    assert 'guard.set_free_only("qwen-max", False)' in text
    assert "quotaguard free-only off qwen-max" in text


def test_other_reasons_say_not_sent_and_their_own_fix() -> None:
    now = {"t": "2026-01-01T00:00:00+08:00"}
    guard = qg.QuotaGuard("memory://", clock=lambda: now["t"])
    guard.grant("qwen-max", tokens=5_000, valid_days=30)
    guard.set_free_only("qwen-max")
    e = refused(lambda: guard.reserve("qwen-max", 10, 10, kind="batch"))
    assert e.reason == "not_covered" and "real-time" in str(e)
    now["t"] = "2026-02-01T00:00:00+08:00"
    e = refused(lambda: guard.reserve("qwen-max", 10, 10))
    assert e.reason == "expired" and 'guard.grant("qwen-max"' in str(e)
    for e in (
        refused(lambda: qg.QuotaGuard("memory://", verified=False).reserve("qwen-max", 1, 1)),
    ):
        assert e.reason == "unverified" and "QuotaGuard(verified=True)" in str(e)
    overdue = free_only()
    overdue.mark_overdue()
    e = refused(lambda: overdue.reserve("qwen-max", 1, 1), qg.AccountOverdue)
    assert "guard.top_up(amount)" in str(e) and "It was not sent" in str(e)
    e = refused(
        lambda: free_only()._core._check_uncounted("qwen-max", "unbounded", "enable_search")
    )
    assert "max_input_tokens=N" in str(e) and "It was not sent" in str(e)
    e = refused(lambda: free_only()._core._check_uncounted(None, "unguarded", "POST /x"))
    assert "POST /x" in str(e) and "It was not sent" in str(e)
    assert e.args[0] == str(e)  # the message is the first argument, as before


def test_blocked_and_budget_refusals_say_not_sent() -> None:
    guard = free_only()
    guard.block("bill too high")
    e = refused(lambda: guard.reserve("qwen-max", 1, 1), qg.Blocked)
    assert e.reason == "bill too high"
    assert "was not sent" in str(e) and "quotaguard unblock" in str(e)
    guard.unblock()
    with guard.budget(tokens=10, name="tight"):
        e = refused(lambda: guard.reserve("qwen-max", 10, 10), qg.BudgetExceeded)
    assert "It was not sent" in str(e) and "lower max_tokens" in str(e)


def test_service_refusal_says_nothing_was_charged() -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max")
    with FakeDashScope(api_key=KEY) as server:
        server.free_tier_only = True
        client = guard.wrap_openai(openai.OpenAI(api_key=KEY, base_url=server.openai_base))
        chat = client.chat.completions
        e = refused(
            lambda: chat.create(model="qwen-max", messages=[{"role": "user", "content": "hi"}])
        )
    assert e.service_code == "AllocationQuota.FreeTierOnly" and e.reason == "exhausted"
    assert "nothing was charged" in str(e) and "fallback=" in str(e)
    assert isinstance(e.__cause__, openai.APIStatusError)  # the service's answer stays


# --------------------------------------------------------------------------- tracebacks

SCRIPT = """
import sys, dashscope, openai
import quotaguard as qg
from quotaguard.testing import FakeDashScope

with FakeDashScope(api_key="sk-test") as server:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max")
    guard.sync("qwen-max", "800/1,000,000")
    guard.set_free_only("qwen-max")
    messages = [{"role": "user", "content": "hi"}]
    how = sys.argv[1]
    if how == "openai":
        raw = openai.OpenAI(api_key="sk-test", base_url=server.openai_base, max_retries=0)
        client = guard.wrap_openai(raw)
        client.chat.completions.create(model="qwen-max", messages=messages, max_tokens=2000)
    elif how == "async":
        import asyncio
        raw = openai.AsyncOpenAI(api_key="sk-test", base_url=server.openai_base)
        client = guard.wrap_openai(raw)
        async def main():
            await client.chat.completions.create(
                model="qwen-max", messages=messages, max_tokens=2000
            )
        asyncio.run(main())
    elif how == "dashscope":
        dashscope.base_http_api_url = server.native_base
        ds = guard.wrap_dashscope()
        ds.Generation.call(model="qwen-max", messages=messages, api_key="sk-test", max_tokens=2000)
    elif how == "service":
        server.free_tier_only = True
        raw = openai.OpenAI(api_key="sk-test", base_url=server.openai_base, max_retries=0)
        client = guard.wrap_openai(raw)
        client.chat.completions.create(model="qwen-max", messages=messages, max_tokens=5)
    else:
        @guard.wrap(model="qwen-max")
        def ask(prompt, max_tokens=2000):
            return None
        def outer():
            return ask("hi")
        outer()
"""


def run_script(tmp_path: Path, how: str) -> str:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), how], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    return done.stderr


def frames(text: str) -> list[str]:
    return re.findall(r'^  File "([^"]+)", line \d+, in (\S+)', text, re.M)


@pytest.mark.parametrize("how", ["openai", "async", "dashscope", "decorator"])
def test_plain_traceback_starts_at_the_callers_line(tmp_path: Path, how: str) -> None:
    err = run_script(tmp_path, how)
    traceback = err[err.index("Traceback (most recent call last):") :]
    seen = frames(traceback)
    ours = [f for f in seen if str(SRC) in f[0]]
    # Only the public entry point the script called is left of quotaguard; no frame of
    # wrap.py, clients.py or the SDK under it.
    assert [name for _, name in ours] in (["entry"], ["_awaited"]), seen
    assert not [f for f in seen if "site-packages" in f[0] and "asyncio" not in f[0]], seen
    callers = [f for f in seen if f not in ours and "asyncio" not in f[0]]
    assert all(path.endswith("user_script.py") for path, _ in callers), seen
    assert 'free quota of "qwen-max" exhausted' in traceback and "It was not sent" in traceback
    lines = traceback.splitlines()
    before_message = next(i for i, line in enumerate(lines) if line.startswith("quotaguard."))
    limit = 20 if how == "async" else 8  # asyncio.run adds its own frames above the call
    assert before_message <= limit, traceback
    if how == "decorator":  # the caller's frames are all there: outer() and the module
        assert [name for _, name in seen if name != "entry"] == ["<module>", "outer"]


def test_service_refusal_keeps_its_cause(tmp_path: Path) -> None:
    err = run_script(tmp_path, "service")
    assert "PermissionDeniedError" in err  # the SDK's error, as the cause
    assert "The above exception was the direct cause of the following exception" in err
    last = err[err.rindex("Traceback (most recent call last):") :]
    assert [name for path, name in frames(last) if str(SRC) in path] == ["entry"], last
    assert "nothing was charged" in last


IPYTHON = """
import re, sys
from IPython.core.interactiveshell import InteractiveShell

shell = InteractiveShell.instance(colors="nocolor")
setup = '''
import dashscope, openai, quotaguard as qg
from quotaguard.testing import FakeDashScope
server = FakeDashScope(api_key="sk-test").start()
guard = qg.QuotaGuard("memory://")
guard.grant("qwen-max")
guard.sync("qwen-max", "800/1,000,000")
guard.set_free_only("qwen-max")
client = guard.wrap_openai(openai.OpenAI(api_key="sk-test", base_url=server.openai_base))
dashscope.base_http_api_url = server.native_base
ds = guard.wrap_dashscope()
@guard.wrap(model="qwen-max")
def ask(prompt, max_tokens=2000):
    return None
messages = [{"role": "user", "content": "hi"}]
'''
assert shell.run_cell(setup).success
for cell in [
    'client.chat.completions.create(model="qwen-max", messages=messages, max_tokens=2000)',
    'ds.Generation.call(model="qwen-max", messages=messages, api_key="sk-test", max_tokens=2000)',
    'ask("hi")',
    'guard.reserve("qwen-max", 1000, 1000)',
]:
    print("=== CELL", cell)
    result = shell.run_cell(cell)
    assert type(result.error_in_exec).__name__ == "FreeTierOnly", result
    print("=== END")
shell.run_cell("server.stop()")
"""


def test_ipython_shows_no_internal_frame(tmp_path: Path) -> None:
    pytest.importorskip("IPython")
    script = tmp_path / "ipython_cells.py"
    script.write_text(IPYTHON)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout)
    cells = re.findall(r"=== CELL (.*?)\n(.*?)=== END", out, re.S)
    assert len(cells) == 4, out
    for _cell, shown in cells:
        assert "FreeTierOnly" in shown and "It was not sent" in shown, shown
        assert str(SRC) not in shown and "quotaguard/" not in shown, shown
        assert "site-packages" not in shown, shown
        assert "Cell In[" in shown, shown  # the user's own line is there


# --------------------------------------------------------------------------- log lines

LOGGING = """
import logging, sys
import quotaguard as qg
how = sys.argv[1]
if how == "configured":
    logging.basicConfig(format="%(name)s|%(levelname)s|%(message)s")
elif how == "own-handler":
    logging.getLogger("quotaguard").addHandler(logging.NullHandler())
guard = qg.QuotaGuard("memory://")
guard.grant("qwen-max", tokens=1000)
guard.reserve("qwen-max", 850, 0).settle(850, 0)     # quota_low alert
guard._core._record_usage("my-own-model", 10, 10)          # unpriced model
"""


@pytest.mark.parametrize("how", ["bare", "configured", "own-handler"])
def test_log_lines_say_quotaguard_once(tmp_path: Path, how: str) -> None:
    script = tmp_path / "log_script.py"
    script.write_text(LOGGING)
    done = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), how],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    if how == "bare":  # no logging configured: quotaguard's own last resort, named
        assert len(lines) == 2, lines
        assert lines[0].startswith("quotaguard: quota_low: ")
        assert lines[1].startswith("quotaguard: 'my-own-model' has no known price")
    elif how == "configured":  # the application's format, and nothing twice
        assert len(lines) == 2, lines
        assert lines[0].startswith("quotaguard|WARNING|quota_low: ")
        assert lines[1].startswith("quotaguard|WARNING|'my-own-model'")
    else:  # a handler of the application's own on quotaguard's logger: silence here
        assert lines == []


def test_every_record_comes_from_a_quotaguard_logger(caplog: pytest.LogCaptureFixture) -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max", tokens=1000)
    guard.on_alert(lambda alert: 1 / 0)  # a callback that raises is logged too
    guard.reserve("qwen-max", 850, 0).settle(850, 0)
    guard._core._record_usage("my-own-model", 10, 10)
    assert len(caplog.records) >= 3
    assert all(r.name.split(".")[0] == "quotaguard" for r in caplog.records)


# --------------------------------------------------------------------------- no free quota


def test_never_granted_model_warns_once_per_guard_with_the_fix() -> None:
    guard = qg.QuotaGuard("memory://")
    with pytest.warns(NoFreeQuotaWarning) as caught:
        guard.reserve("qwen-turbo", 10, 10).settle(10, 10)
    (w,) = caught
    assert w.filename == __file__  # pointed at the caller's line
    assert 'guard.grant("qwen-turbo")' in str(w.message)
    assert "quotaguard grant qwen-turbo" in str(w.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.reserve("qwen-turbo", 10, 10).release()  # once per guard and model
        granted = qg.QuotaGuard("memory://")
        granted.grant("qwen-turbo")
        granted.reserve("qwen-turbo", 10, 10).release()  # a granted model: no warning
        granted.sync("qwen-turbo", "0/1,000,000")
        granted.reserve("qwen-turbo", 10, 10).release()  # used up, not missing: no warning
    with pytest.warns(NoFreeQuotaWarning):
        qg.QuotaGuard("memory://").reserve("qwen-turbo", 10, 10).release()  # another guard


def test_region_without_free_quota_warns_with_the_region() -> None:
    guard = qg.QuotaGuard("memory://", region="cn-hangzhou")
    guard.grant("qwen-max")
    with pytest.warns(NoFreeQuotaWarning, match="region cn-hangzhou has no free quota") as w:
        guard.reserve("qwen-max", 10, 10).release()
    assert 'QuotaGuard(region="cn-beijing")' in str(w[0].message)


def test_a_warning_made_an_error_leaves_nothing_held() -> None:
    guard = qg.QuotaGuard("memory://")
    with warnings.catch_warnings(), guard.budget(tokens=100) as budget:
        warnings.simplefilter("error", NoFreeQuotaWarning)
        with pytest.raises(NoFreeQuotaWarning):
            guard.reserve("qwen-turbo", 10, 10)
        assert budget.remaining == 100


@pytest.mark.parametrize("typo", ["qwen-maxx", "Qwen-Max"])
def test_misspelt_model_through_the_sdks_suggests_the_catalogue_name(typo: str) -> None:
    guard = qg.QuotaGuard("memory://")
    guard.grant("qwen-max")
    messages = [{"role": "user", "content": "hi"}]
    with FakeDashScope(api_key=KEY) as server:
        client = guard.wrap_openai(openai.OpenAI(api_key=KEY, base_url=server.openai_base))
        with pytest.warns(NoFreeQuotaWarning) as caught:
            client.chat.completions.create(model=typo, messages=messages, max_tokens=5)
        (w,) = caught
        assert f'"{typo}"' in str(w.message)
        assert 'did you mean "qwen-max"' in str(w.message)
        assert w.filename == __file__
        ds_guard = qg.QuotaGuard("memory://")
        ds_guard.grant("qwen-max")
        old = dashscope.base_http_api_url
        dashscope.base_http_api_url = server.native_base
        try:
            ds = ds_guard.wrap_dashscope()
            with pytest.warns(NoFreeQuotaWarning, match='did you mean "qwen-max"'):
                ds.Generation.call(model=typo, messages=messages, api_key=KEY, max_tokens=5)
        finally:
            dashscope.base_http_api_url = old
    assert guard.model_info(typo)["closest"][0] == "qwen-max"
    assert guard.model_info("qwen-max")["closest"] == []
    assert guard.model_info("Qwen-Max")["closest"] == ["qwen-max"]
    assert guard.model_info("llama-3-70b")["closest"] == []


def test_errors_naming_an_unknown_model_suggest_the_closest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    guard = qg.QuotaGuard("memory://")
    with pytest.raises(
        ValueError, match=r'"qwen-maxx" is not in the catalogue \(did you mean "qwen-max"'
    ):
        guard.grant("qwen-maxx")
    assert main(["prices", "--model", "qwen-maxx"]) == 2
    err = capsys.readouterr().err
    assert 'did you mean "qwen-max"' in err and len(err.strip().splitlines()) == 1
    ledger = str(tmp_path / "l.db")
    assert main(["--ledger", ledger, "grant", "Qwen-Max"]) != 0
    assert 'did you mean "qwen-max"' in capsys.readouterr().err
