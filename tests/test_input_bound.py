"""The input bound (R8): never below what the service bills, and close to it.

The server counts with tiktoken over dashscope's own Qwen vocabulary, independently
of quotaguard's Rust BPE, so these tests compare two implementations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import tiktoken
from conftest import SDK_KEY
from hypothesis import given, settings
from hypothesis import strategies as st

import quotaguard as qg
from quotaguard import _core
from quotaguard.testing import FakeDashScope

MODEL = "qwen-plus"
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TEXTS = {
    "english": "The free quota is shared by the account and all of its RAM users; "
    "the console shows it a minute late, and people get charged in that minute. " * 6,
    "chinese": "阿里云百炼为每个账号的每个模型发放免费额度，主账号与其下所有子账号共享。"
    "控制台的剩余额度每分钟更新一次，请在调用前刷新页面。" * 6,
    "mixed": "qwen-plus 的免费额度是 1,000,000 tokens，有效期 90 天 (valid 90 days). "
    "Call `guard.reserve()` 前先算 worst case：input + max_tokens。🙂 " * 6,
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\n" * 12,
}


def conversations(text: str) -> dict[str, list[dict[str, str]]]:
    half = len(text) // 2
    return {
        "user only": [{"role": "user", "content": text}],
        "with system": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": text},
        ],
        "multi-turn": [
            {"role": "user", "content": text[:half]},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": text[half:]},
        ],
    }


CASES = [
    pytest.param(messages, id=f"{lang}-{shape}")
    for lang, text in TEXTS.items()
    for shape, messages in conversations(text).items()
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDashScope]:
    with FakeDashScope(api_key=SDK_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def client(fake: FakeDashScope) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=SDK_KEY, base_url=fake.openai_base, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def guard() -> qg.QuotaGuard:
    assert _core.vocabulary_path() is not None, "the tests need dashscope's qwen.tiktoken"
    return qg.QuotaGuard(ledger="memory://")


def billed(client: openai.OpenAI, messages: list[dict[str, str]]) -> int:
    rsp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert rsp.usage is not None
    return rsp.usage.prompt_tokens


@pytest.mark.parametrize("default_system", ["server default", "Qwen2.5 default"])
@pytest.mark.parametrize("messages", CASES)
def test_bound_is_safe_and_tight_against_the_servers_count(
    fake: FakeDashScope,
    client: openai.OpenAI,
    guard: qg.QuotaGuard,
    messages: list[dict[str, str]],
    default_system: str,
) -> None:
    fake.default_system_prompt = (
        QWEN25_SYSTEM if default_system == "Qwen2.5 default" else "You are a helpful assistant."
    )
    served = billed(client, messages)
    bound = guard.input_bound(messages=messages)
    assert bound >= served, f"bound {bound} is below the {served} tokens the service bills"
    assert bound <= served * 1.1 + 64, f"bound {bound} is loose against {served}"


def test_the_qwen25_default_system_message_is_the_21_tokens_r8_names(
    fake: FakeDashScope, client: openai.OpenAI
) -> None:
    fake.default_system_prompt = QWEN25_SYSTEM
    without = billed(client, [{"role": "user", "content": "hi"}])
    with_system = billed(
        client, [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    )
    assert without - with_system == 21 - 5  # the default system message less an empty one


def test_prompt_and_embedding_inputs(guard: qg.QuotaGuard) -> None:
    text = TEXTS["mixed"]
    exact = qg.count_tokens(text)
    assert exact is not None
    # A native `prompt` is one user message: framing 5 + 3, and the default system 21.
    assert guard.input_bound(prompt=text) == exact + 5 + 3 + 21
    # Embedding inputs carry no chat framing.
    assert guard.input_bound(input=[text, text]) == 2 * exact
    assert guard.input_bound(input=text, extra_tokens=7) == exact + 7


def test_without_the_vocabulary_the_byte_bound_is_still_safe(
    fake: FakeDashScope, client: openai.OpenAI, guard: qg.QuotaGuard
) -> None:
    fake.default_system_prompt = QWEN25_SYSTEM
    path = _core.vocabulary_path()
    _core.set_vocabulary(None)
    try:
        assert qg.count_tokens("hello") is None
        for lang, text in TEXTS.items():
            messages = [{"role": "user", "content": text}]
            served = billed(client, messages)
            bound = guard.input_bound(messages=messages)
            assert bound >= served, lang
            assert bound >= len(text.encode()), lang
    finally:
        _core.set_vocabulary(path)
    assert qg.count_tokens("hello") is not None


def _qwen_encoding() -> Any:
    path = _core.vocabulary_path()
    assert path is not None
    ranks: dict[bytes, int] = {}
    import base64

    with open(path, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    pattern = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
        r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    return tiktoken.Encoding("qwen-test", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})


ENCODING = None


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=400))
def test_exact_count_equals_tiktokens_on_any_text(text: str) -> None:
    global ENCODING
    if ENCODING is None:
        ENCODING = _qwen_encoding()
    clean = text.encode("utf-8", "replace").decode("utf-8")
    exact = len(ENCODING.encode_ordinary(clean))
    guard_bound = qg.QuotaGuard(ledger="memory://").input_bound(input=clean)
    assert guard_bound >= exact
    assert qg.count_tokens(clean) == exact


# The vocabulary loads in a thread of its own from import on: a first call made at once
# waits for that load (never a looser count), in any number of threads, and a child
# forked while it is under way (the thread does not exist there) loads on its own.
BACKGROUND_LOAD = """
import json, os, sys, threading
import quotaguard as qg
text = sys.argv[1]
out = {}
if sys.argv[2] == "threads":
    counts = []
    def call():
        counts.append(qg.count_tokens(text))
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["counts"] = counts
else:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps(qg.count_tokens(text)).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    out["counts"] = [json.loads(os.read(r, 100)), qg.count_tokens(text)]
    out["status"] = status
print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["threads", "fork"])
def test_first_calls_at_import_wait_for_the_background_load(how: str) -> None:
    if how == "fork" and not hasattr(os, "fork"):
        pytest.skip("no fork here")
    text = TEXTS["mixed"]
    expected = qg.count_tokens(text)
    assert expected is not None
    out = subprocess.run(
        [sys.executable, "-c", BACKGROUND_LOAD, text, how],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    assert result["counts"] == [expected] * len(result["counts"])
    assert result.get("status", 0) == 0
