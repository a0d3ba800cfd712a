"""Every benchmark in one run: one table of figures, targets and verdicts.

    python benches/run.py [--full] [--install] [--only NAME ...] [--markdown]

Runs each benchmark script of this directory in its own process, ``--quick`` by default
(well under a minute each) or ``--full`` (the long versions), shows each one's output as
it runs, then prints one table: bench, figure, value, target, PASS or MISS, and how it was
measured, with the date and the machine. A benchmark reports its figures through
``_report.figure`` (collected here from the file named in ``QUOTAGUARD_BENCH_OUT``); one
that does not (yet) shows as "no figures" with its exit code.

``benches/install.py`` (a ``pip install .`` from a clean clone, minutes of building) runs
only with ``--full``, ``--install`` or ``--only install``. ``--markdown`` prints the table as
Markdown, as the README shows it.

Exit code 1 when any figure is a MISS, or a benchmark crashed (a non-zero exit, a timeout).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import _report

HERE = Path(__file__).resolve().parent

# In the order they run; a missing script is skipped (tokens.py may not exist yet).
BENCHES = ("ledger", "records", "overhead", "quota_share", "tokens", "fuzz", "install")
SLOW = {"install"}  # minutes of work: only with --full, --install or --only
# A benchmark that does not take --quick / --full yet: how to ask it for a short or long run.
FALLBACK = {"fuzz": {"quick": ["--minutes", "0.25"], "full": ["--minutes", "5"]}}
TIMEOUT = {"quick": 600.0, "full": 7200.0}  # seconds, per benchmark


@dataclass
class Outcome:
    bench: str
    argv: list[str]
    returncode: int | None = None  # None: timed out
    seconds: float = 0.0
    figures: list[_report.Figure] = field(default_factory=list)

    @property
    def crashed(self) -> bool:
        return self.returncode is None or (
            self.returncode != 0 and not any(f.ok is False for f in self.figures)
        )

    @property
    def exit_text(self) -> str:
        if self.returncode is None:
            return "timed out"
        return f"exit {self.returncode}"


def options_of(script: Path) -> str:
    """The script's --help text: which of --quick / --full it takes."""
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout


def arguments(bench: str, script: Path, mode: str) -> list[str]:
    """--quick or --full when the script takes it, else its own way of saying so."""
    flag = f"--{mode}"
    if flag in options_of(script):
        return [flag]
    if bench in FALLBACK:
        return FALLBACK[bench][mode]
    return []  # a script without --quick runs its one version


def run_one(bench: str, argv: list[str], mode: str, echo: bool) -> Outcome:
    outcome = Outcome(bench, argv)
    with tempfile.TemporaryDirectory(prefix="qg-bench-") as tmp:
        out = Path(tmp) / "figures.jsonl"
        env = dict(os.environ, QUOTAGUARD_BENCH_OUT=str(out), PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / f"{bench}.py"), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            cwd=HERE.parent,
        )
        assert proc.stdout is not None
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            proc.kill()

        watchdog = threading.Timer(TIMEOUT[mode], stop)
        watchdog.start()
        try:
            for line in proc.stdout:
                if echo:
                    print(f"    {line.rstrip()}", flush=True)
            code = proc.wait()
        finally:
            watchdog.cancel()
        outcome.returncode = None if timed_out.is_set() else code
        outcome.seconds = time.perf_counter() - start
        if out.exists():
            for line in out.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    outcome.figures.append(_report.Figure(**json.loads(line)))
    return outcome


def rows(outcomes: list[Outcome]) -> list[tuple[str, str, str, str, str, str]]:
    table = []
    for o in outcomes:
        for f in o.figures:
            shown = _report._show(f.value, f.unit)
            table.append((o.bench, f.name, shown, f.target or "", f.verdict, f.note))
        if not o.figures:
            verdict = "" if o.returncode == 0 else "FAIL"
            table.append((o.bench, "no figures", "", "", verdict, o.exit_text))
        elif o.crashed:
            table.append((o.bench, "(crashed)", "", "", "FAIL", o.exit_text))
    return table


HEAD = ("bench", "figure", "value", "target", "verdict", "note")


def plain(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEAD, *table]) for i in range(len(HEAD))]
    right = {2}  # values line up on the right

    def line(r: tuple[str, ...]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(HEAD), rule, *(line(r) for r in table)])


def markdown(table: list[tuple[str, ...]]) -> str:
    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

    return "\n".join([line(HEAD), "|---|---|--:|---|---|---|", *(line(r) for r in table)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="the long version of every bench")
    parser.add_argument("--install", action="store_true", help="also time `pip install .`")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"some of: {', '.join(BENCHES)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="do not echo each bench's output")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "quick"

    if args.only:
        unknown = [n for n in args.only if n not in BENCHES]
        if unknown:
            parser.error(f"unknown bench {', '.join(unknown)}; there are {', '.join(BENCHES)}")
        chosen = [b for b in BENCHES if b in args.only]
    else:
        chosen = [b for b in BENCHES if b not in SLOW or args.full or args.install]
    chosen = [b for b in chosen if (HERE / f"{b}.py").exists()]

    started = dt.datetime.now(dt.timezone.utc)
    outcomes = []
    for i, bench in enumerate(chosen, 1):
        script = HERE / f"{bench}.py"
        argv_b = arguments(bench, script, mode)
        print(f"[{i}/{len(chosen)}] {bench} {' '.join(argv_b)}".rstrip(), flush=True)
        o = run_one(bench, argv_b, mode, echo=not args.quiet)
        judged = [f for f in o.figures if f.ok is not None]
        missed = sum(f.ok is False for f in judged)
        print(
            f"[{i}/{len(chosen)}] {bench}: {o.exit_text}, {len(o.figures)} figures"
            f" ({len(judged) - missed} PASS, {missed} MISS) in {o.seconds:.0f} s",
            flush=True,
        )
        outcomes.append(o)

    table = rows(outcomes)
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"{mode} run, {when}; {_report.machine()}")
    print(markdown(table) if args.markdown else plain(table))
    failed = [o.bench for o in outcomes if o.crashed]
    missed = [f"{o.bench}: {f.name}" for o in outcomes for f in o.figures if f.ok is False]
    if missed:
        print("\nMISS: " + "; ".join(missed))
    if failed:
        print("\nFAILED (crashed or timed out): " + ", ".join(failed))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
