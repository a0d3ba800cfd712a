"""How much of a free quota a workload uses before its first refusal.

    python benches/quota_share.py [--quick]

Under Free Quota Only a call is admitted only if its worst case (input bound +
``max_tokens``) fits what is left, so without help the last worst case of a quota is
never used. With ``clip=True`` the guard shrinks ``max_tokens`` to what is left instead
of refusing, and the quota is used to within one call's input bound.

For a few workloads and quota sizes it makes guarded calls through the real ``openai``
SDK against the local ``FakeDashScope`` (which writes every output token a call allows,
and keeps its own count of the free quota, as the platform does) until the guard
refuses one, with and without ``clip``, and prints the share of the quota used.

Target: the short-call workload (inputs of 20-40 tokens, ``max_tokens=150``) uses at
least 99 % of a 10,000-token quota with ``clip=True``. A MISS exits non-zero. The
baseline, measured in the same run, is the same workload without ``clip``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import _report
import openai

import quotaguard as qg
from quotaguard.testing import FakeDashScope

MODEL = "qwen-plus"
WORDS = (
    "quota token model reply cache price region call budget ledger stream limit guard "
    "account batch window forecast alert switch remaining expiry"
).split()
TARGET = 0.99


@dataclass(frozen=True)
class Workload:
    name: str
    input_words: tuple[int, int]
    max_tokens: int


WORKLOADS = (
    Workload("short calls (20-40 in, 150 out)", (16, 34), 150),
    Workload("chat turns (200-400 in, 800 out)", (190, 390), 800),
)


def share(workload: Workload, quota: int, clip: bool, seed: int) -> tuple[float, int, int]:
    """(share used, calls made, billed by the server beyond the grant)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d, FakeDashScope(reply_tokens=1_000_000) as server:
        server.free_quota = quota
        guard = qg.QuotaGuard(Path(d) / "ledger.db")
        guard.alert_thresholds = []  # quiet: the alerts are not what is measured
        guard.grant(MODEL, tokens=quota)
        guard.set_free_only(MODEL)
        client = guard.wrap_openai(
            openai.OpenAI(base_url=server.openai_base, api_key="sk-bench", max_retries=0),
            clip=clip,
        )
        calls = 0
        while True:
            words = rng.randint(*workload.input_words)
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            try:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": text}],
                    max_tokens=workload.max_tokens,
                )
            except qg.FreeTierOnly:
                break
            calls += 1
        used = quota - guard.remaining(MODEL)
        overspent = max(0, -(server.free_quota_remaining or 0))
        return used / quota, calls, overspent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer quota sizes")
    parser.add_argument("--full", action="store_true", help="every quota size (the default)")
    args = parser.parse_args()
    sizes = (3_000, 10_000) if args.quick else (3_000, 10_000, 100_000)
    print(f"quotaguard {qg.__version__}: share of a free quota used before the first refusal")
    print()
    head = f"{'workload':<36} {'quota':>8} {'clip':>5} {'calls':>6} {'used':>7}  target    result"
    print(head)
    print("-" * len(head))
    misses = []
    shared: list[float] = []
    for w in WORKLOADS:
        for size in sizes:
            for clip in (False, True):
                used, calls, over = share(w, size, clip, seed=size)
                if over:
                    misses.append(f"{w.name}: the server billed {over} tokens past the grant")
                targeted = clip and w is WORKLOADS[0] and size == 10_000
                target = f">= {TARGET:.0%}" if targeted else ("baseline" if not clip else "-")
                result = ("PASS" if used >= TARGET else "MISS") if targeted else ""
                if result == "MISS":
                    misses.append(f"{w.name}, {size:,} tokens, clip: {used:.1%}")
                print(
                    f"{w.name:<36} {size:>8,} {'yes' if clip else 'no':>5} {calls:>6} "
                    f"{used:>7.1%}  {target:<9} {result}"
                )
                if targeted:
                    shared.append(used)
    print()
    for used in shared:
        _report.figure(
            "quota_share",
            f"quota used with clip, {WORKLOADS[0].name}, 10,000 tokens",
            100 * used,
            "%",
            target=f">= {TARGET:.0%}",
            ok=used >= TARGET,
            note="share of the grant used before the first refusal",
        )
    _report.figure(
        "quota_share",
        "workloads the server billed past a grant",
        sum(1 for m in misses if "billed" in m),
        "workloads",
        target="0",
        ok=not any("billed" in m for m in misses),
    )
    if misses:
        print("MISS: " + "; ".join(misses))
        return 1
    print("all targets met; the server never billed past a grant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
