"""How every benchmark reports a figure: one line for people, one JSON line for run.py.

``figure(...)`` prints the figure with its target and PASS or MISS; when the environment
names a file in ``QUOTAGUARD_BENCH_OUT`` it also appends the figure there as one JSON
object per line, which ``benches/run.py`` collects into its table. ``exit_code()`` is 1
when any figure reported so far missed its target.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["Figure", "exit_code", "figure", "machine", "median"]


@dataclass(frozen=True)
class Figure:
    bench: str  # the script, e.g. "ledger"
    name: str  # what was measured, e.g. "memory pair / no-op pair"
    value: float
    unit: str  # "x", "%", "pairs/s", "ms", "s"
    target: str | None  # e.g. "<= 5x"; None: reported, not judged
    ok: bool | None  # None when there is no target
    note: str = ""  # how it was measured: "median of 7", "best of 5", ...

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


_seen: list[Figure] = []


def _show(value: float, unit: str) -> str:
    if unit in ("pairs/s", "calls/s", "records"):
        return f"{value:,.0f} {unit}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:,.2f} {unit}"


def figure(
    bench: str,
    name: str,
    value: float,
    unit: str,
    *,
    target: str | None = None,
    ok: bool | None = None,
    note: str = "",
) -> Figure:
    """Print one figure (and record it for run.py); returns it."""
    if (target is None) != (ok is None):
        raise ValueError(f"{name}: a target needs a verdict and a verdict a target")
    f = Figure(bench, name, value, unit, target, ok, note)
    _seen.append(f)
    judged = "" if target is None else f"  target {target}  {f.verdict}"
    extra = f"  ({note})" if note else ""
    print(f"{name:<46} {_show(value, unit):>16}{judged}{extra}", flush=True)
    out = os.environ.get("QUOTAGUARD_BENCH_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(f)) + "\n")
    return f


def exit_code() -> int:
    """1 when any figure missed its target (a MISS fails the run), else 0."""
    missed = [f.name for f in _seen if f.ok is False]
    if missed:
        print("\nMISS: " + "; ".join(missed), flush=True)
        return 1
    return 0


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def machine() -> str:
    """The machine in a few words: CPU count, system, Python."""
    system = f"{platform.system()} {platform.machine()}"
    return f"{os.cpu_count()} cores, {system}, Python {platform.python_version()}"
