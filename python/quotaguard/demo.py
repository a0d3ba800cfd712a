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

from ._format import bar, format_bill
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
    """One line per call, or a single line updated in place on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        try:
            self.tty = out.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.open = False

    def update(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.open = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def line(self, text: str = "") -> None:
        """A line of its own, below the progress line."""
        if self.open:
            self.out.write("\n")
            self.open = False
        self.out.write(text + "\n")
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
) -> int:
    """Runs the demo, writing to ``out`` (stdout); returns the exit code, 0."""
    out = sys.stdout if out is None else out
    stack = ExitStack()
    try:
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
        return _run(guard, server, model, quota, calls, delay, use_openai, ledger_note, out, stack)
    finally:
        stack.close()


def _run(
    guard: QuotaGuard,
    server: FakeDashScope,
    model: str,
    quota: int,
    calls: int,
    delay: float,
    use_openai: bool,
    ledger_note: str,
    out: IO[str],
    stack: ExitStack,
) -> int:
    say = _Progress(out)
    openai = _openai_module(use_openai)
    if openai is not None:
        raw = stack.enter_context(
            openai.OpenAI(base_url=server.openai_base, api_key=API_KEY, max_retries=0)
        )
        chat: ChatFn = guard.wrap_openai(raw, clip=True).chat.completions.create
        impatient = guard.wrap_openai(raw.with_options(timeout=SHORT_TIMEOUT))
        hasty: ChatFn = impatient.chat.completions.create
        timeouts: tuple[type[BaseException], ...] = (openai.APITimeoutError,)
        client = f"openai {openai.__version__} SDK, guard.wrap_openai(client, clip=True)"
    else:
        chat = guard.wrap(clip=True)(_stdlib_chat(server.openai_base))

        def hasty(**kwargs: Any) -> Any:
            return chat(**kwargs, timeout=SHORT_TIMEOUT)

        timeouts = (TimeoutError, urllib.error.URLError)
        client = "standard library (urllib), guard.wrap(chat, clip=True)"

    guard.grant(model, tokens=quota)
    if guard.remaining(model) != quota:  # a reused ledger: start the demo full again (R12)
        guard.sync(model, f"{quota:,}/{quota:,}", force=True)
    guard.set_free_only(model, True)
    alerts: list[str] = []
    guard.on_alert(lambda a: alerts.append(f"  alert: {a}"))

    say.line("quotaguard demo: guarded Qwen calls against a local DashScope stand-in")
    say.line(f"  server  {server.openai_base}  (quotaguard.testing.FakeDashScope)")
    say.line(f"  client  {client}")
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

    refusal: FreeTierOnly | None = None
    before = after = server.request_count
    made = 0
    n = 0
    for n in range(1, calls + 1):
        messages = [{"role": "user", "content": QUESTIONS[(n - 1) % len(QUESTIONS)]}]
        before = server.request_count
        try:
            if n == IN_DOUBT_CALL:
                server.latency = SLOW_SERVER
                try:
                    answer = hasty(model=model, messages=messages, max_tokens=MAX_TOKENS)
                except timeouts:
                    made = n
                    server.idle()
                    _in_doubt(say, guard, model, n)
                    continue
                finally:
                    server.latency = 0.0
            else:
                answer = chat(model=model, messages=messages, max_tokens=MAX_TOKENS)
        except FreeTierOnly as e:
            refusal = e
            after = server.request_count
            break
        made = n
        q = guard.quota(model)
        usage = _usage(answer)
        say.update(
            f"call {n:>3}  in {usage[0]:>3}  out {usage[1]:>3}  "
            f"{bar(q.fraction_left)}  {q.console:>15} free tokens left"
        )
        for alert in alerts:
            say.line(alert)
        alerts.clear()
        if delay:
            time.sleep(delay)

    say.line()
    if refusal is not None:
        say.line(f"call {n:>3}  refused before sending: {refusal.code} (reason: {refusal.reason})")
        say.line(textwrap.indent(str(refusal), "  "))
        verdict = "it never reached the server" if after == before else "IT WAS SENT"
        say.line(f"  server requests: {before} before the refused call, {after} after: {verdict}")
        say.line(
            f"  the last {refusal.remaining:,} free tokens cannot hold even one output token "
            f"after this call's input bound: it would have been charged"
        )
    else:
        say.line(f"no call refused within {calls} calls (--calls N, --quota N to see one)")
    left = server.free_quota_remaining
    say.line(
        f"  {made} calls made; the server's own free-quota count says {left:,} left, the "
        f"ledger {guard.remaining(model):,}"
    )
    if any(r.in_doubt for r in guard.records(model=model)):
        say.line(
            "  the ledger counts the in-doubt call at its worst case; once the console shows "
            "its figure, `quotaguard sync --force` sets it"
        )
    used = quota - guard.remaining(model)
    say.line(f"  free quota used: {used:,} of {quota:,} tokens ({used / quota:.1%})")
    say.line()
    say.line(guard.status())
    say.line()
    say.line(format_bill(guard.bill(), guard.account))
    return 0


def _in_doubt(say: _Progress, guard: QuotaGuard, model: str, n: int) -> None:
    record = guard.records(model=model)[-1]
    q = guard.quota(model)
    say.update(
        f"call {n:>3}  timed out after sending: in doubt, its worst case "
        f"({record.input_tokens + record.output_tokens}) counted  {q.console:>15} free tokens left"
    )


def _usage(answer: Any) -> tuple[int, int]:
    usage = answer.get("usage") if isinstance(answer, dict) else getattr(answer, "usage", None)
    if usage is None:
        return (0, 0)
    if isinstance(usage, dict):
        return int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    return int(usage.prompt_tokens), int(usage.completion_tokens)
