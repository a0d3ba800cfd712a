"""A longer run of the property tests: every parser and public method with random and
hostile values, for a set time.

    python benches/fuzz.py --minutes N [--seed S]

Runs each property of ``tests/properties.py`` (hostile arguments to every method and
to the constructor, any text as a ledger, console figures, amounts, the command line)
in rounds of fresh random examples until the time is up, and prints per property the
examples run and what they came to. Target: no failure. A failure prints the example
hypothesis shrank it to, and the exit code is 1 (a MISS).
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from collections.abc import Callable

import _report
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as seed_with
from hypothesis import strategies as st
from properties import PROPERTIES

ROUND = 200  # examples per property per round


def one_round(
    name: str,
    prop: Callable[[st.DataObject], str],
    seed: int,
    examples: collections.Counter[str],
    outcomes: dict[str, collections.Counter[str]],
) -> None:
    @seed_with(seed)
    @settings(
        max_examples=ROUND,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        examples[name] += 1
        outcomes[name][prop(data)] += 1

    run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (1)")
    parser.add_argument("--seed", type=int, default=None, help="for a repeatable run")
    args = parser.parse_args()
    logging.getLogger("quotaguard").disabled = True  # alerts of random quotas: not news
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    examples: collections.Counter[str] = collections.Counter()
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    rounds = 0
    started = time.monotonic()
    while time.monotonic() < deadline and not failures:
        rounds += 1
        for name, prop in PROPERTIES.items():
            if time.monotonic() >= deadline:
                break

            seed = rng.getrandbits(64)
            try:
                one_round(name, prop, seed, examples, outcomes)
            except Exception:
                failures.append(f"{name} (seed {seed}):\n{traceback.format_exc()}")
                break
    took = time.monotonic() - started
    print(f"fuzz: {rounds} rounds in {took / 60:.1f} min, {sum(examples.values()):,} examples")
    for name in PROPERTIES:
        top = ", ".join(f"{k} {v:,}" for k, v in outcomes[name].most_common(4))
        print(f"  {name:<12} {examples[name]:>8,} examples   {top}")
    _report.figure(
        "fuzz",
        f"properties failed in {took / 60:.1f} min",
        len(failures),
        "failures",
        target="0",
        ok=not failures,
        note=f"{sum(examples.values()):,} examples, {rounds} rounds",
    )
    if failures:
        print("MISS: a property failed")
        for f in failures:
            # Hostile examples hold lone surrogates: shown escaped, never a crash here.
            print(f.encode("utf-8", "backslashreplace").decode("utf-8"))
        return 1
    print("PASS: no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
