"""Beyond the console: the kill switch (R15), fallback's question (R16), the burn-rate
forecast (R17), several alert thresholds and the expiry alert (R10), across processes
on SQLite and across machines' worth of guards on Redis."""

from __future__ import annotations

import datetime as dt
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Clock

import quotaguard as qg
from quotaguard.cli import main

MODEL = "qwen-max"


@pytest.fixture(params=["sqlite", "redis"])
def shared_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger several processes share: a SQLite file, or a Redis server."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    url: str = request.getfixturevalue("redis_ledger")
    return url


def in_another_process(ledger: str, code: str) -> str:
    """Runs `code` with `guard` on `ledger` in a fresh interpreter; its stdout."""
    script = f"import quotaguard as qg\nguard = qg.QuotaGuard({ledger!r})\n{code}"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# ---------------------------------------------------------------- R15 kill switch


def test_a_block_reaches_every_process_and_lifts(shared_ledger: str) -> None:
    guard = qg.QuotaGuard(shared_ledger)
    guard.grant(MODEL, tokens=10_000)
    in_flight = guard.reserve(MODEL, 10, 10)
    assert guard.blocked is None

    in_another_process(shared_ledger, 'guard.block("runaway eval loop")')
    assert guard.blocked == "runaway eval loop"
    with pytest.raises(qg.Blocked) as e:
        guard.reserve(MODEL, 10, 10)
    assert e.value.reason == "runaway eval loop"
    assert "runaway eval loop" in str(e.value)
    assert isinstance(e.value, qg.QuotaGuardError)
    # The refused call reserved nothing; the call already sent is still recorded.
    assert guard.quota(MODEL).reserved == 20
    assert in_flight.settle(5, 5).free_tokens == 10
    out = in_another_process(
        shared_ledger,
        "try:\n    guard.reserve('qwen-max', 1, 1)\n"
        "except qg.Blocked as e:\n    print('refused', e.reason)",
    )
    assert out == "refused runaway eval loop"

    in_another_process(shared_ledger, "guard.unblock()")
    assert guard.blocked is None
    guard.reserve(MODEL, 10, 10).settle(1, 1)


def test_a_block_needs_a_reason(guard: qg.QuotaGuard) -> None:
    for bad in ["", "   ", "two\nlines"]:
        with pytest.raises(ValueError):
            guard.block(bad)
    with pytest.raises(TypeError):
        guard.block(None)  # type: ignore[arg-type]
    assert guard.blocked is None


def test_the_command_line_blocks_and_unblocks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ledger = str(tmp_path / "l.db")
    guard = qg.QuotaGuard(ledger)
    guard.grant(MODEL, tokens=1_000)
    assert main(["block", "--reason", "bill too high", "--ledger", ledger]) == 0
    assert "bill too high" in capsys.readouterr().out
    with pytest.raises(qg.Blocked, match="bill too high"):
        guard.reserve(MODEL, 1, 1)
    assert main(["unblock", "--ledger", ledger]) == 0
    assert capsys.readouterr().out.strip() == "unblocked"
    guard.reserve(MODEL, 1, 1).release()


# ----------------------------------------------------------- R10 several thresholds


def test_each_threshold_fires_once_across_processes(shared_ledger: str) -> None:
    guard = qg.QuotaGuard(shared_ledger)
    guard.grant(MODEL, tokens=1_000)
    guard.alert_thresholds = [0.5, 0.2, 0.05]
    assert guard.alert_thresholds == [0.5, 0.2, 0.05]
    seen: list[tuple[str, float | None]] = []
    guard.on_alert(lambda a: seen.append((a.kind, a.threshold)))
    guard.reserve(MODEL, 300, 300).settle(300, 300)  # 400 left: the 50 % mark
    # Another process crosses 20 % and 5 % and sees them fire there, once.
    code = (
        "guard.alert_thresholds = [0.5, 0.2, 0.05]\n"
        "fired = []\n"
        "guard.on_alert(lambda a: fired.append([a.kind, a.threshold]))\n"
        "guard.reserve('qwen-max', 200, 200).settle(200, 200)\n"
        "guard.reserve('qwen-max', 10, 10).settle(5, 5)\n"
        "import json; print(json.dumps(fired))"
    )
    assert json.loads(in_another_process(shared_ledger, code)) == [
        ["quota_low", 0.2],
        ["quota_low", 0.05],
        ["quota_depleted", None],
    ]
    guard.sync(MODEL, "0/1,000")
    assert seen == [("quota_low", 0.5)]


def test_the_one_threshold_form(guard: qg.QuotaGuard) -> None:
    assert guard.alert_threshold == 0.2
    assert guard.alert_thresholds == [0.2]
    guard.alert_thresholds = [0.1, 0.3]
    assert guard.alert_threshold == 0.3  # the first to fire
    guard.alert_threshold = None
    assert guard.alert_thresholds == []
    guard.alert_thresholds = None
    assert guard.alert_thresholds == []
    for bad in [[1.5], [-0.1], [float("nan")]]:
        with pytest.raises(ValueError, match="alert_thresholds"):
            guard.alert_thresholds = bad
    for wrong in ["0.2", [True], 0.2]:
        with pytest.raises(TypeError):
            guard.alert_thresholds = wrong  # type: ignore[assignment]


# ------------------------------------------------------------------- expiry alert


def test_a_quota_about_to_expire_unused_alerts_once(
    make_guard: object, clock: Clock, tmp_path: Path
) -> None:
    ledger = tmp_path / "l.db"
    guard = qg.QuotaGuard(ledger, clock=clock)
    other = qg.QuotaGuard(ledger, clock=clock)
    guard.grant(MODEL, tokens=1_000_000, activated_at=clock.now, valid_days=90)
    seen: list[qg.Alert] = []
    guard.on_alert(seen.append)
    other_seen: list[qg.Alert] = []
    other.on_alert(other_seen.append)
    assert guard.expiry_alert_days == 7
    clock.advance(days=82, hours=23)
    assert guard.check_alerts() == []
    clock.advance(hours=2)  # 6 days 23 hours before expiry
    guard.reserve(MODEL, 10, 10).settle(10, 10)
    assert [(a.kind, a.model, a.remaining) for a in seen] == [("quota_expiring", MODEL, 999_980)]
    assert other.check_alerts() == []
    other.reserve(MODEL, 10, 10).settle(10, 10)
    assert other_seen == []
    guard.expiry_alert_days = None
    assert guard.expiry_alert_days is None
    with pytest.raises(TypeError):
        guard.expiry_alert_days = 1.5  # type: ignore[assignment]
    with pytest.raises(ValueError):
        guard.expiry_alert_days = -1


def test_a_used_up_quota_does_not_alert_for_expiry(guard: qg.QuotaGuard, clock: Clock) -> None:
    guard.grant(MODEL, tokens=100, activated_at=clock.now, valid_days=30)
    guard.reserve(MODEL, 50, 50).settle(50, 50)
    clock.advance(days=29)
    assert [a.kind for a in guard.check_alerts()] == []


# ----------------------------------------------------------------- R16 first_free


def test_first_free_names_the_first_model_that_covers_the_call(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=1_000)
    guard.grant("qwen-plus", tokens=100_000)
    models = ["qwen-max", "qwen-plus", "qwen-turbo"]
    assert guard.first_free(models, input_tokens=400, max_output_tokens=600) == "qwen-max"
    assert guard.first_free(models, input_tokens=400, max_output_tokens=601) == "qwen-plus"
    assert guard.first_free(models, 100_000, 1) is None
    # Without max_output_tokens, each model's default output limit counts.
    assert guard.first_free(models, 10) == "qwen-plus"
    assert guard.first_free([], 1, 1) is None
    with pytest.raises(ValueError, match="-1"):
        guard.first_free(models, -1, 1)


# ----------------------------------------------------------------- R17 forecast


def test_the_forecast_follows_the_burn_rate(shared_ledger: str, clock: Clock) -> None:
    guard = qg.QuotaGuard(shared_ledger, clock=clock)
    guard.grant(MODEL, tokens=100_000, activated_at=clock.now, valid_days=90)
    for _ in range(10):
        guard.reserve(MODEL, 500, 500).settle(500, 500)
        clock.advance(hours=1)
    f = guard.forecast(MODEL, window_hours=10)
    assert (f.model, f.remaining, f.burn_per_hour) == (MODEL, 90_000, 1_000.0)
    assert f.runs_out_at == clock.now + dt.timedelta(hours=90)
    assert f.unused_at_expiry == 0
    assert f.expires_at == guard.quota(MODEL).expires_at
    slow = guard.forecast(MODEL, window_hours=24 * 90)
    assert slow.runs_out_at is None and slow.unused_at_expiry > 0
    assert [x.model for x in guard.forecasts()] == [MODEL]
    with pytest.raises(ValueError, match="window_hours"):
        guard.forecast(MODEL, window_hours=0)


def test_forecast_on_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ledger = str(tmp_path / "l.db")
    guard = qg.QuotaGuard(ledger)
    guard.grant(MODEL, tokens=1_000_000)
    guard.reserve(MODEL, 1_000, 1_000).settle(1_000, 1_000)
    assert main(["forecast", "--ledger", ledger]) == 0
    out = capsys.readouterr().out
    assert MODEL in out and "998,000" in out
    assert main(["forecast", MODEL, "--json", "--ledger", ledger]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["model"] == MODEL and data[0]["remaining"] == 998_000


# ------------------------------------------------------- using the quota, not guarding it


def test_clip_uses_99_percent_of_the_quota_before_the_first_refusal(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    from quotaguard.testing import FakeDashScope

    rng = random.Random(7)
    words = "quota token model reply cache price region call budget ledger".split()
    with FakeDashScope(reply_tokens=1_000_000) as server:
        server.free_quota = 10_000
        guard = qg.QuotaGuard(tmp_path / "l.db")
        guard.grant("qwen-plus", tokens=10_000)
        guard.set_free_only("qwen-plus")
        client = guard.wrap_openai(
            openai.OpenAI(base_url=server.openai_base, api_key="sk-test", max_retries=0),
            clip=True,
        )
        outputs = []
        while True:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(16, 34)))
            try:
                reply = client.chat.completions.create(
                    model="qwen-plus", messages=[{"role": "user", "content": text}], max_tokens=150
                )
            except qg.FreeTierOnly as e:
                assert e.reason == "exhausted"
                break
            outputs.append(reply.usage.completion_tokens)
        used = 10_000 - guard.remaining("qwen-plus")
        assert used >= 9_900, f"used {used} of 10,000"
        assert server.free_quota_remaining == guard.remaining("qwen-plus") >= 0
        assert len(outputs) >= 50 and outputs[0] == 150


def test_the_notebook_view_shows_the_forecast_and_a_block(guard: qg.QuotaGuard) -> None:
    guard.grant("qwen-max", tokens=1_000_000)
    guard.reserve("qwen-max", 1_000, 1_000).settle(1_000, 1_000)
    page = guard._repr_html_()
    assert "will expire unused" in page or "runs out" in page
    assert "blocked" not in page
    guard.block("<script>")
    page = guard._repr_html_()
    assert "blocked</b>: &lt;script&gt;" in page
    assert "BLOCKED" in guard.status()


# --------------------------------------------------------------------- R16 fallback

FALLBACK = ["qwen-plus", "qwen-turbo", "qwen-flash"]
ASK = [{"role": "user", "content": "Name three Qwen models."}]


def granted(guard: qg.QuotaGuard, **quotas: int) -> None:
    for model, tokens in quotas.items():
        guard.grant(model.replace("_", "-"), tokens=tokens)
        guard.set_free_only(model.replace("_", "-"))


def test_fallback_through_the_openai_sdk(server: Any, tmp_path: Path) -> None:
    import openai

    guard = qg.QuotaGuard(tmp_path / "l.db")
    granted(guard, qwen_max=100, qwen_plus=50, qwen_turbo=100_000)
    raw = openai.OpenAI(base_url=server.openai_base, api_key="sk-test", max_retries=0)
    client = guard.wrap_openai(raw, fallback=FALLBACK)
    reply = client.chat.completions.create(model="qwen-max", messages=ASK, max_tokens=200)
    # qwen-max (100 left) and qwen-plus (50) cannot hold the call: qwen-turbo serves it.
    assert reply.model == "qwen-turbo"
    assert server.requests[-1].body["model"] == "qwen-turbo"
    assert server.requests[-1].body["max_tokens"] == 200  # nothing else changed
    [rec] = guard.records()
    assert (rec.model, rec.cost_type) == ("qwen-turbo", "free_quota")
    assert guard.quota("qwen-max").used == 0 and guard.quota("qwen-plus").reserved == 0
    # A call its own model covers stays on it.
    small = client.chat.completions.create(model="qwen-max", messages=ASK, max_tokens=10)
    assert small.model == "qwen-max"
    # None covers it: refused before sending, as without fallback.
    sent = len(server.requests)
    with pytest.raises(qg.FreeTierOnly) as e:
        client.chat.completions.create(model="qwen-max", messages=ASK, max_tokens=200_000)
    assert e.value.model == "qwen-max" and len(server.requests) == sent


def test_fallback_never_moves_a_call_from_free_to_paid(server: Any, tmp_path: Path) -> None:
    import openai

    guard = qg.QuotaGuard(tmp_path / "l.db")
    guard.grant("qwen-max", tokens=100)  # Free Quota Only off: it may be charged
    guard.grant("qwen-plus", tokens=50)
    raw = openai.OpenAI(base_url=server.openai_base, api_key="sk-test", max_retries=0)
    client = guard.wrap_openai(raw, fallback=["qwen-plus"])
    reply = client.chat.completions.create(model="qwen-max", messages=ASK, max_tokens=200)
    # No listed model covers it free: it goes to its own model, partly paid, as asked.
    assert reply.model == "qwen-max"
    [rec] = guard.records()
    assert rec.model == "qwen-max"
    assert guard.quota("qwen-plus").used == 0 and guard.quota("qwen-plus").reserved == 0


def test_fallback_through_dashscope_and_the_decorator(server: Any, tmp_path: Path) -> None:
    import dashscope

    guard = qg.QuotaGuard(tmp_path / "l.db")
    granted(guard, qwen_max=10, qwen_plus=100_000)
    ds = guard.wrap_dashscope(dashscope, fallback=["qwen-plus"])
    rsp = ds.Generation.call(
        model="qwen-max", messages=ASK, result_format="message", max_tokens=100, api_key="sk-test"
    )
    assert rsp.status_code == 200
    assert server.requests[-1].body["model"] == "qwen-plus"
    assert guard.records()[-1].model == "qwen-plus"

    seen: list[str] = []

    @guard.wrap(fallback=["qwen-plus"])
    def ask(model: str, messages: list[dict[str, str]], max_tokens: int = 100) -> dict[str, Any]:
        seen.append(model)
        return {"model": model, "usage": {"input_tokens": 20, "output_tokens": 30}}

    assert ask("qwen-max", ASK)["model"] == "qwen-plus"
    assert seen == ["qwen-plus"] and guard.records()[-1].model == "qwen-plus"

    @guard.wrap(model="qwen-max", fallback=["qwen-plus"])
    def no_model_argument(messages: list[dict[str, str]], max_tokens: int = 100) -> Any:
        return {"usage": {"input_tokens": 1, "output_tokens": 1}}

    with pytest.raises(TypeError, match="model"):
        no_model_argument(ASK)
    assert guard.quota("qwen-plus").reserved == 0
    with pytest.raises(TypeError):
        guard.wrap(fallback="qwen-plus")  # type: ignore[arg-type]


def test_a_block_also_stops_calls_the_guard_cannot_count(server: Any, tmp_path: Path) -> None:
    import openai

    guard = qg.QuotaGuard(tmp_path / "l.db")
    guard.grant("qwen-max", tokens=1_000)  # Free Quota Only off: unguarded calls may go
    guard.block("maintenance")
    raw = openai.OpenAI(base_url=server.openai_base, api_key="sk-test", max_retries=0)
    client = guard.wrap_openai(raw)
    sent = len(server.requests)
    with pytest.raises(qg.Blocked, match="maintenance"):
        client.images.generate(model="qwen-max", prompt="a cat")
    assert len(server.requests) == sent


def test_an_in_doubt_record_keeps_its_mark_on_export(guard: qg.QuotaGuard, tmp_path: Path) -> None:
    guard.grant("qwen-max", tokens=1_000)
    guard.reserve("qwen-max", 10, 10).settle_worst_case(in_doubt=True)
    guard.reserve("qwen-max", 10, 10).settle(5, 5)
    assert [qg.record_to_dict(r)["in_doubt"] for r in guard.records()] == [True, False]
    guard.export(tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["in_doubt"] for r in rows] == [True, False]
