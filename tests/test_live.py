"""The live view (``guard.track``) and the IPython extension (``%quota``, ``%%quota``),
over real guarded calls: the openai SDK against quotaguard.testing's local server.

The terminal path writes into a stream that says it is a TTY; the notebook path runs on
a real kernel through nbclient and reads the display messages the kernel sent; the
extension runs in IPython's own InteractiveShell.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import quotaguard as qg
from quotaguard.testing import FakeDashScope

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("isolated_home")]

KEY = "sk-live"
MODEL = "qwen-plus"


class Tty(io.StringIO):
    """Standard output as a terminal would be."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def server() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=KEY, reply_tokens=30) as s:
        yield s


@pytest.fixture
def live_guard(tmp_path: Path) -> qg.QuotaGuard:
    guard = qg.QuotaGuard(ledger=str(tmp_path / "ledger.db"))
    guard.grant(MODEL, tokens=1_000)
    guard.set_free_only(MODEL)
    return guard


def _client(guard: qg.QuotaGuard, server: FakeDashScope) -> Any:
    return guard.wrap_openai(openai.OpenAI(base_url=server.openai_base, api_key=KEY, max_retries=0))


def _ask(client: Any, model: str = MODEL, max_tokens: int = 40) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )


def _figures(frame: str) -> dict[str, int]:
    found = {
        name: int(m.group(1).replace(",", ""))
        for name, m in (
            ("calls", re.search(r"([\d,]+) calls", frame)),
            ("refused", re.search(r"([\d,]+) refused", frame)),
            ("tokens", re.search(r"([\d,]+) tokens", frame)),
        )
        if m is not None
    }
    assert len(found) == 3, frame
    return found


def test_a_terminal_gets_one_line_updated_after_each_settled_call(
    live_guard: qg.QuotaGuard, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    client = _client(live_guard, server)
    refusals = 0
    items = list(range(30))
    seen = []
    for i in live_guard.track(items, desc="questions"):
        seen.append(i)
        try:
            _ask(client)
        except qg.FreeTierOnly:
            refusals += 1
    monkeypatch.undo()

    assert seen == items
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    frames = [f.rstrip() for f in text.rstrip("\n").split("\r")[1:]]
    assert all(len(f) <= 119 for f in frames), max(frames, key=len)
    # One frame before the loop, one after each step, and the last one when it ends.
    assert len(frames) == len(items) + 2
    assert frames[0].startswith("questions: 0/30 · 0 calls · 0 refused · 0 tokens")
    calls = 0
    for step, frame in enumerate(frames[1:-1], start=1):
        assert frame.startswith(f"questions: {step}/30 · "), frame
        figures = _figures(frame)
        assert figures["calls"] + figures["refused"] == step
        assert figures["calls"] >= calls  # settled calls only ever grow
        calls = figures["calls"]

    usage = server.usage_log
    last = _figures(frames[-1])
    assert refusals > 0, "the quota of 1,000 tokens should refuse some of 30 calls"
    assert last == {
        "calls": len(usage),
        "refused": refusals,
        "tokens": sum(i + o for _, i, o in usage),
    }
    assert f"{MODEL} {live_guard.quota(MODEL).console}" in frames[-1]


def test_a_narrow_terminal_still_gets_one_line(
    live_guard: qg.QuotaGuard, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    client = _client(live_guard, server)
    for _ in live_guard.track(range(3), desc="a rather long description of the loop"):
        _ask(client)
    monkeypatch.undo()
    frames = out.getvalue().rstrip("\n").split("\r")[1:]
    assert all(len(f.rstrip()) <= 39 for f in frames), frames
    assert frames[-1].rstrip().endswith("…")


def test_a_pipe_gets_nothing(
    live_guard: qg.QuotaGuard, server: FakeDashScope, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _client(live_guard, server)
    replies = [_ask(client).usage.completion_tokens for _ in live_guard.track(range(4))]
    assert replies == [30] * 4
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_loop_left_early_ends_its_line_with_the_figures(
    live_guard: qg.QuotaGuard, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    client = _client(live_guard, server)
    endless = iter(int, 1)  # no length: the view counts without a total
    for n, _ in enumerate(live_guard.track(endless), start=1):
        _ask(client)
        if n == 3:
            break
    monkeypatch.undo()
    text = out.getvalue()
    assert text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("3 · 3 calls · 0 refused"), last


def test_spend_is_what_the_records_cost(
    live_guard: qg.QuotaGuard, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qwen-max has no free quota here: a verified account pays for it."""
    monkeypatch.setenv("COLUMNS", "200")
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    client = _client(live_guard, server)
    for _ in live_guard.track(range(2), desc="paid"):
        _ask(client, model="qwen-max", max_tokens=100)
    monkeypatch.undo()
    cost = sum((r.cost or Decimal(0)) for r in live_guard.records(model="qwen-max"))
    assert cost > 0
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert f"· {qg._format.money(cost)} {live_guard.currency}" in last, last


def test_the_live_view_says_the_state_the_status_says(
    live_guard: qg.QuotaGuard, server: FakeDashScope, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 free tokens cannot cover a call at qwen-plus's defaults: the live view says
    so as guard.status() does, in the notebook's HTML and on a terminal's line."""
    from quotaguard import live

    shown: list[str] = []

    class Recorder:
        def show(self, progress: Any) -> None:
            shown.append(live.progress_html(progress))

        def close(self, progress: Any) -> None:
            self.show(progress)
            shown.append(progress.text())

    monkeypatch.setattr(live, "_display", Recorder)
    client = _client(live_guard, server)
    for _ in live_guard.track(range(2)):
        _ask(client)
    said = "too low for a default call, free only"
    assert live_guard.status().endswith(said)
    assert f"<td>{said}</td>" in shown[-2], shown[-2]
    live_guard.grant("qwen-max", tokens=0)  # no free quota: the line names the state
    for _ in live_guard.track(range(1)):
        _ask(client, model="qwen-max")
    assert shown[-1].endswith("qwen-max no free quota"), shown[-1]


def test_bad_desc_is_named(live_guard: qg.QuotaGuard) -> None:
    with pytest.raises(TypeError, match="desc must be a str or None, not int"):
        live_guard.track([1], desc=5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- notebook


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed (CI runs the notebook tests)")
        pytest.skip(f"{module} is not installed")


@pytest.mark.timeout(300)
def test_a_notebook_gets_one_display_updated_in_place(tmp_path: Path) -> None:
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    code = textwrap.dedent(
        f"""
        import openai
        import quotaguard as qg
        from quotaguard.testing import FakeDashScope

        server = FakeDashScope(api_key="{KEY}", reply_tokens=30).start()
        guard = qg.QuotaGuard(ledger="ledger.db")
        guard.grant("{MODEL}", tokens=1_000)
        client = guard.wrap_openai(
            openai.OpenAI(base_url=server.openai_base, api_key="{KEY}", max_retries=0)
        )
        for question in guard.track(["a", "b", "c", "d", "e"], desc="questions"):
            client.chat.completions.create(
                model="{MODEL}", messages=[{{"role": "user", "content": question}}],
                max_tokens=40,
            )
        print("usage", sum(i + o for _, i, o in server.usage_log))
        print("left", guard.quota("{MODEL}").console)
        server.stop()
        """
    )
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(code))
    messages: list[dict[str, Any]] = []

    class Recording(nbclient.NotebookClient):  # type: ignore[misc]
        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            messages.append(msg)
            return super().process_message(msg, cell, cell_index)

    Recording(
        nb,
        kernel_name="python3",
        timeout=120,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()

    shown = [m for m in messages if m["msg_type"] == "display_data"]
    updates = [m for m in messages if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1, shown
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert display_id
    # One update after each of the 5 steps, and one when the loop ends.
    assert len(updates) == 6
    assert {u["content"]["transient"]["display_id"] for u in updates} == {display_id}
    first = shown[0]["content"]["data"]["text/html"]
    assert "0/5 items" in first and "<b>0</b> calls" in first
    for step, update in enumerate(updates[:5], start=1):
        assert f"{step}/5 items · <b>{step}</b> calls" in update["content"]["data"]["text/html"]

    printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    usage = re.search(r"usage (\d+)", printed)
    left = re.search(r"left (\S+)", printed)
    assert usage is not None and left is not None, printed
    final = updates[-1]["content"]["data"]["text/html"]
    assert f"<b>{int(usage.group(1)):,}</b> tokens" in final
    assert f"<code>{MODEL}</code>" in final and left.group(1) in final
    assert "width:" in final  # the model's bar
    # The stored notebook keeps the one display, as it was last updated.
    outputs = nb.cells[0].outputs
    kept = [o for o in outputs if o.output_type == "display_data"]
    assert len(kept) == 1 and kept[0].data["text/html"] == final


# --------------------------------------------------------------------------- extension


@pytest.fixture
def shell() -> Iterator[Any]:
    _require("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    try:
        yield sh
    finally:
        InteractiveShell.clear_instance()


def _captured(shell: Any, cell: str) -> Any:
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = shell.run_cell(cell)
    return result, captured


def test_the_extension_shows_the_status(
    shell: Any, live_guard: qg.QuotaGuard, server: FakeDashScope
) -> None:
    shell.run_line_magic("load_ext", "quotaguard")
    shell.user_ns["guard"] = live_guard
    _ask(_client(live_guard, server))
    result, captured = _captured(shell, "%quota")
    assert result.success
    [view] = captured.outputs
    html = view.data["text/html"]
    assert f"<code>{MODEL}</code>" in html and live_guard.quota(MODEL).console in html
    assert view.data["text/plain"] == live_guard.status()

    other = qg.QuotaGuard(ledger="memory://")
    shell.user_ns["other"] = other
    result, _ = _captured(shell, "%quota")
    assert not result.success
    assert "several guards in the namespace (guard, other)" in str(result.error_in_exec)
    result, captured = _captured(shell, "%quota other")
    assert result.success
    assert "no free quota granted yet" in captured.outputs[0].data["text/html"]


def test_a_cell_budget_stops_the_cell_and_shows_its_summary(
    shell: Any, live_guard: qg.QuotaGuard, server: FakeDashScope
) -> None:
    shell.run_line_magic("load_ext", "quotaguard")
    shell.user_ns.update(guard=live_guard, client=_client(live_guard, server), sent=[])
    cell = textwrap.dedent(
        """\
        %%quota tokens=300 cost=0.5 name=cell
        for _ in range(10):
            client.chat.completions.create(
                model="qwen-plus", messages=[{"role": "user", "content": "hi"}], max_tokens=40
            )
            sent.append(1)
        """
    )
    result, captured = _captured(shell, cell)
    assert isinstance(result.error_in_exec, qg.BudgetExceeded)  # the cell fails
    sent = len(shell.user_ns["sent"])
    usage = server.usage_log
    assert 0 < sent < 10 and len(usage) == sent
    used = sum(i + o for _, i, o in usage)
    summary = captured.outputs[-1]
    plain = summary.data["text/plain"]
    assert plain.startswith(f"budget 'cell': used {used:,} tokens of 300 ({300 - used:,} left)")
    assert "spent 0.00 CNY of 0.50 (0.50 left)" in plain
    assert "stopped:" in plain and "stopped" in summary.data["text/html"]
    # The budget ended with the cell: the next call goes through.
    _ask(shell.user_ns["client"])
    assert len(server.usage_log) == sent + 1


def test_cell_budget_options_are_checked(shell: Any, live_guard: qg.QuotaGuard) -> None:
    from IPython.core.error import UsageError

    shell.run_line_magic("load_ext", "quotaguard")
    shell.user_ns["guard"] = live_guard
    with pytest.raises(UsageError, match="tokens must be a whole number, not 'lots'"):
        shell.run_cell_magic("quota", "tokens=lots", "pass")
    with pytest.raises(UsageError, match="not 'budget=5'"):
        shell.run_cell_magic("quota", "budget=5", "pass")
    with pytest.raises(UsageError, match="-1"):
        shell.run_cell_magic("quota", "cost=-1", "pass")
    with pytest.raises(UsageError, match="'nothing' in the namespace"):
        shell.run_cell_magic("quota", "guard=nothing", "pass")


def test_a_cell_within_its_budget_runs_in_the_namespace(
    shell: Any, live_guard: qg.QuotaGuard, server: FakeDashScope
) -> None:
    shell.run_line_magic("load_ext", "quotaguard")
    shell.user_ns.update(guard=live_guard, client=_client(live_guard, server))
    cell = '%%quota tokens=1000\nreply = client.chat.completions.create(model="qwen-plus", '
    cell += 'messages=[{"role": "user", "content": "hi"}], max_tokens=40)\n'
    result, captured = _captured(shell, cell)
    assert result.success
    reply = shell.user_ns["reply"]
    used = reply.usage.prompt_tokens + reply.usage.completion_tokens
    [summary] = captured.outputs
    assert summary.data["text/plain"] == (
        f"cell budget: used {used:,} tokens of 1,000 ({1000 - used:,} left), spent 0.00 CNY"
    )


def test_without_a_guard_the_magic_reads_the_default_ledger(
    shell: Any, isolated_home: Path
) -> None:
    shell.run_line_magic("load_ext", "quotaguard")
    result, captured = _captured(shell, "%quota")
    assert result.success
    assert "no free quota granted yet" in captured.outputs[0].data["text/html"]
    assert (isolated_home / ".quotaguard" / "ledger.db").exists()


def test_a_broken_display_never_breaks_the_loop(
    live_guard: qg.QuotaGuard,
    server: FakeDashScope,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    client = _client(live_guard, server)
    done = []
    for n in live_guard.track(range(4)):
        _ask(client)
        done.append(n)
        if n == 1:
            out.close()  # the terminal goes away: writing raises ValueError
    monkeypatch.undo()
    assert done == [0, 1, 2, 3]
    assert len(server.usage_log) == 4
    warned = [r for r in caplog.records if "live view stopped updating" in r.getMessage()]
    assert len(warned) == 1
