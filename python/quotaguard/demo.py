"""``quotaguard demo``: watch a free quota drain and the guard refuse the call that
would have been charged, against a local DashScope stand-in. Nothing leaves the machine.

The demo grants a small free quota in a temporary ledger (or ``--ledger``), switches
Free Quota Only on (so the guard refuses rather than lets the platform charge), then
makes guarded chat calls through the real ``openai`` SDK when it is installed, else
through ``urllib``. One call gives up waiting before the server answers: the server
bills it all the same, and the ledger records it in doubt, at its worst case. The
server's request count, before and after, shows that the refused call was never sent.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shlex
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from ._format import (
    BOLD,
    GREEN,
    RED,
    YELLOW,
    bar,
    bill_data,
    bill_lines,
    cell_width,
    colour_enabled,
    paint,
    quota_data,
    status_lines,
    terminal_width,
    wrap,
)
from .exceptions import FreeTierOnly
from .guard import QuotaGuard
from .testing import FakeDashScope

__all__ = ["run_demo"]

API_KEY = "sk-demo"
MAX_TOKENS = 150  # the most output a demo call allows: part of its worst case (R8)
REPLY_TOKENS = 120  # what the server writes back
IN_DOUBT_CALL = 3  # this call times out after it was sent
SLOW_SERVER, SHORT_TIMEOUT = 0.4, 0.2  # seconds

QUESTIONS = (
    "In one sentence, what is a free token quota?",
    "Name three Qwen models.",
    "Why reserve a call's worst case before sending it?",
    "What does AllocationQuota.FreeTierOnly mean?",
    "Translate 'free quota' into Chinese.",
    "Write a haiku about running out of tokens.",
    "How many days is a new free quota valid?",
    "What is the difference between qwen-plus and qwen-max?",
)

ChatFn = Callable[..., Any]


@contextmanager
def _quiet_alert_log() -> Iterator[None]:
    # The demo prints alerts itself; without a handler, logging's last resort would
    # print each one again to stderr.
    logger = logging.getLogger("quotaguard")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _stdlib_chat(base: str) -> ChatFn:
    """A chat call with nothing but the standard library: POST to the OpenAI-compatible
    endpoint, return the parsed JSON (an error body too, for the guard to read)."""
    url = base.rstrip("/") + "/chat/completions"

    def chat(
        *, model: str, messages: list[dict[str, str]], max_tokens: int, timeout: float = 30
    ) -> dict[str, Any]:
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens})
        request = urllib.request.Request(
            url,
            data=body.encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as e:
            with e:
                raw = e.read()
            try:
                error: dict[str, Any] = json.loads(raw)
            except ValueError:
                raise e from None
            return error

    return chat


def _openai_module(use_openai: bool) -> Any:
    if not use_openai or importlib.util.find_spec("openai") is None:
        return None
    return importlib.import_module("openai")


class _Progress:
    """One line updated in place on a terminal when it fits the terminal's width, else
    one line per call; every other line wrapped between words to the width."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.colour = colour_enabled(out)
        self.open = False

    def paint(self, text: str, sgr: str) -> str:
        return paint(text, sgr, self.colour)

    def update(self, *variants: tuple[str, str]) -> None:
        """Shows the longest of ``variants`` (plain text, the same painted) that fits;
        in place on a terminal only when it fits (a line that wraps cannot be rewritten
        in place: it would leave a stack of fragments)."""
        width = terminal_width(self.out)
        chosen, fits = variants[-1][1], False
        for text, painted in variants:
            if width is None or cell_width(text) < width:
                chosen, fits = painted, True
                break
        if self.tty and fits:
            self.out.write("\r\x1b[K" + chosen)
            self.open = True
        else:
            if self.open:
                self.out.write("\n")
                self.open = False
            self.out.write(chosen + "\n")
        self.out.flush()

    def line(self, text: str = "", sgr: str = "") -> None:
        """A line of its own, below the progress line, wrapped to the width."""
        if self.open:
            self.out.write("\n")
            self.open = False
        for part in wrap(text, terminal_width(self.out)):
            self.out.write(self.paint(part, sgr) + "\n")
        self.out.flush()

    def lines(self, lines: list[str]) -> None:
        """Lines already fitted (and painted)."""
        if self.open:
            self.out.write("\n")
            self.open = False
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()


def run_demo(
    *,
    ledger: str | None = None,
    account: str = "demo",
    model: str = "qwen-plus",
    quota: int = 3000,
    calls: int = 60,
    delay: float = 0.05,
    use_openai: bool = True,
    out: IO[str] | None = None,
    report: dict[str, Any] | None = None,
) -> int:
    """Runs the demo, writing to ``out`` (stdout); returns the exit code, 0. ``report``,
    a dict, receives what happened as plain data (what ``quotaguard demo --json``
    prints)."""
    out = sys.stdout if out is None else out
    report = {} if report is None else report
    stack = ExitStack()
    try:
        kept = ledger is not None and str(ledger) != "memory://"
        if ledger is None:
            tmp = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="quotaguard-demo-", ignore_cleanup_errors=True)
            )
            ledger = str(Path(tmp) / "ledger.db")
            ledger_note = "(temporary; --ledger URL keeps it)"
        else:
            ledger_note = f"(account {account!r})"
        stack.enter_context(_quiet_alert_log())
        guard = QuotaGuard(ledger=ledger, account=account)
        server = stack.enter_context(FakeDashScope(api_key=API_KEY, reply_tokens=REPLY_TOKENS))
        # The server keeps its own count of the free quota, as the platform does.
        server.free_quota = quota
        demo = _Demo(guard, server, model, quota, use_openai, _Progress(out), stack)
        demo.run(calls, delay, ledger_note)
        demo.finish(kept, report)
        return 0
    finally:
        stack.close()


class _Demo:
    def __init__(
        self,
        guard: QuotaGuard,
        server: FakeDashScope,
        model: str,
        quota: int,
        use_openai: bool,
        say: _Progress,
        stack: ExitStack,
    ) -> None:
        self.guard, self.server, self.model, self.quota, self.say = (
            guard,
            server,
            model,
            quota,
            say,
        )
        openai = _openai_module(use_openai)
        if openai is not None:
            raw = stack.enter_context(
                openai.OpenAI(base_url=server.openai_base, api_key=API_KEY, max_retries=0)
            )
            self.chat: ChatFn = guard.wrap_openai(raw, clip=True).chat.completions.create
            impatient = guard.wrap_openai(raw.with_options(timeout=SHORT_TIMEOUT))
            self.hasty: ChatFn = impatient.chat.completions.create
            self.timeouts: tuple[type[BaseException], ...] = (openai.APITimeoutError,)
            self.client = f"openai {openai.__version__} SDK, guard.wrap_openai(client, clip=True)"
            self.client_kind = "openai"
        else:
            chat = guard.wrap(clip=True)(_stdlib_chat(server.openai_base))

            def hasty(**kwargs: Any) -> Any:
                return chat(**kwargs, timeout=SHORT_TIMEOUT)

            self.chat, self.hasty = chat, hasty
            self.timeouts = (TimeoutError, urllib.error.URLError)
            self.client = "standard library (urllib), guard.wrap(chat, clip=True)"
            self.client_kind = "urllib"
        self.refusal: FreeTierOnly | None = None
        self.refused_call = 0
        self.before = self.after = 0
        self.made = 0
        self.calls = 0

    def run(self, calls: int, delay: float, ledger_note: str) -> None:
        guard, server, model, quota, say = self.guard, self.server, self.model, self.quota, self.say
        self.calls = calls
        guard.grant(model, tokens=quota)
        if guard.remaining(model) != quota:  # a reused ledger: start the demo full again (R12)
            guard.sync(model, f"{quota:,}/{quota:,}", force=True)
        guard.set_free_only(model, True)
        alerts: list[str] = []
        guard.on_alert(lambda a: alerts.append(f"  alert: {a}"))

        say.line("quotaguard demo: guarded Qwen calls against a local DashScope stand-in", BOLD)
        say.line(f"  server  {server.openai_base}  (quotaguard.testing.FakeDashScope)")
        say.line(f"  client  {self.client}")
        say.line(f"  ledger  {guard.ledger}  {ledger_note}")
        say.line(
            f"  quota   {model}: {quota:,} free tokens; Free Quota Only on, so a call that would "
            "be charged is refused"
        )
        say.line(
            f"  each call asks for at most {MAX_TOKENS} output tokens; clip=True shrinks that "
            "to what is left, rather than refuse"
        )
        say.line()

        self.before = self.after = server.request_count
        for n in range(1, calls + 1):
            messages = [{"role": "user", "content": QUESTIONS[(n - 1) % len(QUESTIONS)]}]
            self.before = server.request_count
            try:
                if n == IN_DOUBT_CALL:
                    server.latency = SLOW_SERVER
                    try:
                        answer = self.hasty(model=model, messages=messages, max_tokens=MAX_TOKENS)
                    except self.timeouts:
                        self.made = n
                        server.idle()
                        self._in_doubt(n)
                        continue
                    finally:
                        server.latency = 0.0
                else:
                    answer = self.chat(model=model, messages=messages, max_tokens=MAX_TOKENS)
            except FreeTierOnly as e:
                self.refusal, self.refused_call = e, n
                self.after = server.request_count
                break
            self.made = n
            self._progress(n, _usage(answer))
            for alert in alerts:
                say.line(alert, YELLOW)
            alerts.clear()
            if delay:
                time.sleep(delay)

    def _progress(self, n: int, usage: tuple[int, int]) -> None:
        q = self.guard.quota(self.model)
        full, half = bar(q.fraction_left), bar(q.fraction_left, 10)
        sgr = RED if q.fraction_left <= 0.2 else (YELLOW if q.fraction_left <= 0.5 else GREEN)
        p = self.say.paint
        inout = f"in {usage[0]:>3}  out {usage[1]:>3}"
        self.say.update(
            (
                f"call {n:>3}  {inout}  {full}  {q.console:>15} free tokens left",
                f"call {n:>3}  {inout}  {p(full, sgr)}  {q.console:>15} free tokens left",
            ),
            (
                f"call {n:>3}  {inout}  {half}  {q.console} left",
                f"call {n:>3}  {inout}  {p(half, sgr)}  {q.console} left",
            ),
            (f"call {n}  {inout}  {q.console} left", f"call {n}  {inout}  {q.console} left"),
            (f"call {n}  {q.console}", f"call {n}  {q.console}"),
        )

    def _in_doubt(self, n: int) -> None:
        record = self.guard.records(model=self.model)[-1]
        q = self.guard.quota(self.model)
        self.say.line(
            f"call {n:>3}  timed out after sending: in doubt, its worst case "
            f"({record.input_tokens + record.output_tokens}) counted; {q.console} free tokens left",
            YELLOW,
        )

    def finish(self, kept: bool, report: dict[str, Any]) -> None:
        guard, server, model, quota, say = self.guard, self.server, self.model, self.quota, self.say
        refusal, n = self.refusal, self.refused_call
        say.line()
        if refusal is not None:
            say.line(
                f"call {n:>3}  refused before sending: {refusal.code} (reason: {refusal.reason})",
                "1;31",
            )
            say.line(textwrap.indent(str(refusal), "  "))
            sent = self.after != self.before
            verdict = "IT WAS SENT" if sent else "it never reached the server"
            say.line(
                f"  server requests: {self.before} before the refused call, {self.after} after: "
                + say.paint(verdict, RED if sent else GREEN)
            )
            say.line(
                f"  the last {refusal.remaining:,} free tokens cannot hold even one output token "
                f"after this call's input bound: it would have been charged"
            )
        else:
            say.line(f"no call refused within {self.calls} calls (--calls N, --quota N to see one)")
        left = server.free_quota_remaining
        say.line(
            f"  {self.made} calls made; the server's own free-quota count says {left:,} left, "
            f"the ledger {guard.remaining(model):,}"
        )
        in_doubt = sum(r.in_doubt for r in guard.records(model=model))
        if in_doubt:
            say.line(
                "  the ledger counts the in-doubt call at its worst case; once the console shows "
                "its figure, `quotaguard sync --force` sets it"
            )
        used = quota - guard.remaining(model)
        say.line(f"  free quota used: {used:,} of {quota:,} tokens ({used / quota:.1%})")
        say.line()
        width = terminal_width(say.out)
        say.lines(status_lines(guard, width, say.colour))
        say.line()
        bill = guard.bill()
        say.lines(bill_lines(bill, guard.account, width, say.colour))
        say.line()
        look = self._look(kept)
        for text in look["say"]:
            say.line(text)
        report.update(
            {
                "ledger": guard.ledger,
                "ledger_kept": kept,
                "account": guard.account,
                "model": model,
                "quota": quota,
                "client": self.client_kind,
                "calls_made": self.made,
                "refused": None
                if refusal is None
                else {
                    "call": n,
                    "code": refusal.code,
                    "reason": refusal.reason,
                    "remaining": refusal.remaining,
                    "requested": refusal.requested,
                    "message": str(refusal),
                    "server_requests_before": self.before,
                    "server_requests_after": self.after,
                    "sent": self.after != self.before,
                },
                "in_doubt_calls": in_doubt,
                "server_free_quota_left": left,
                "free_tokens_used": used,
                "status": quota_data(guard.quota(model), guard),
                "bill": bill_data(bill),
                "look": look["commands"],
            }
        )

    def _look(self, kept: bool) -> dict[str, list[str]]:
        """The demo's last words: how to look at its ledger afterwards."""
        account = self.guard.account
        where = f"--account {shlex.quote(account)}"
        if kept:
            ledger = shlex.quote(self.guard.ledger)
            commands = [
                f"quotaguard {command} --ledger {ledger} {where}"
                for command in ("status", "records", "bill")
            ]
            return {
                "say": [
                    f"the demo's ledger is kept; its calls are under account {account!r}, "
                    "so name it to look at them:",
                    *(f"  {c}" for c in commands),
                ],
                "commands": commands,
            }
        again = "" if account == "demo" else f" {where}"
        commands = [
            f"quotaguard demo --ledger demo.db{again}",
            f"quotaguard status --ledger demo.db {where}",
        ]
        return {
            "say": [
                "the demo's ledger was temporary and is gone; to keep one and look at it after:",
                f"  {commands[0]}",
                f"  {commands[1]}",
            ],
            "commands": commands,
        }


def _usage(answer: Any) -> tuple[int, int]:
    usage = answer.get("usage") if isinstance(answer, dict) else getattr(answer, "usage", None)
    if usage is None:
        return (0, 0)
    if isinstance(usage, dict):
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return int(usage.prompt_tokens), int(usage.completion_tokens)
