"""How long the README's install takes: ``pip install -v .`` from a clean clone, fresh venv.

    python benches/install.py [--quick | --full] [--repeat N] [--keep]

Clones this repository's committed tree (``HEAD``: uncommitted changes are not measured)
into a temporary directory, so the build starts without a ``target/`` directory, makes a
fresh virtual environment there, and times the README's install line in it, showing its
output as it runs. It then checks that ``quotaguard`` imports in that environment.

Figures: the install's wall time (target: at most 90 s) and the CPU time (user + system)
of everything it ran, which is what the build costs and depends far less than wall time
on what else the machine is doing; the load average when it started is in the note.
pip's download cache and cargo's registry of downloaded crates are used as they are: a
machine that has never built quotaguard also downloads maturin and the crates.

It takes minutes: ``benches/run.py`` runs it only with ``--full`` or ``--install``.
``--quick`` and ``--full`` run one install (there is no shorter version); ``--repeat N``
runs N and reports the medians. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 90.0
# The README's first line, without `quotaguard demo`.
INSTALL = ["-m", "pip", "install", "-v", "--disable-pip-version-check", "."]


def children_cpu() -> float:
    """User + system seconds of every finished descendant so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_install(work: Path, echo: bool) -> tuple[float, float]:
    """Clone, make a venv, time the install; returns (wall s, cpu s)."""
    src, venv = work / "src", work / "venv"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(src)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = dict(os.environ, VIRTUAL_ENV=str(venv), PYTHONUNBUFFERED="1")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    for name in ("CARGO_TARGET_DIR", "PYTHONHOME", "PYTHONPATH", "MATURIN_PEP517_ARGS"):
        env.pop(name, None)  # the build starts from nothing, as on a fresh machine

    cpu0, wall0 = children_cpu(), time.perf_counter()
    proc = subprocess.Popen(
        [str(python), *INSTALL],
        cwd=src,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-40:], line.rstrip()]
        if echo:
            print(f"  {line.rstrip()}", flush=True)
    code = proc.wait()
    wall, cpu = time.perf_counter() - wall0, children_cpu() - cpu0
    if code != 0:
        if not echo:
            print("\n".join(tail))
        raise SystemExit(f"benches/install.py: the install failed (exit {code})")
    check = subprocess.run(
        [str(python), "-c", "import quotaguard, quotaguard._core; print(quotaguard.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0 or str(venv) not in check.stdout:
        raise SystemExit(f"benches/install.py: the installed package does not import:\n{check}")
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one install (the default)")
    parser.add_argument("--full", action="store_true", help="one install (the default)")
    parser.add_argument("--repeat", type=int, default=1, help="installs to take the median of")
    parser.add_argument("--keep", action="store_true", help="keep the clone and the venv")
    parser.add_argument("--quiet", action="store_true", help="do not show the install's output")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    if shutil.which("git") is None:
        raise SystemExit("benches/install.py: needs git (it clones the repository)")
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if dirty.strip():
        print("note: uncommitted changes are not measured (the clone is of HEAD)", flush=True)

    load = os.getloadavg()[0]
    walls, cpus = [], []
    for i in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="qg-install-"))
        try:
            print(f"install {i + 1}/{args.repeat} in {work}", flush=True)
            wall, cpu = one_install(work, echo=not args.quiet)
            print(f"install {i + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
            walls.append(wall)
            cpus.append(cpu)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)

    how = f"median of {args.repeat}" if args.repeat > 1 else "one install"
    note = f"{how}; load {load:.1f} at start, {os.cpu_count()} cores"
    wall = _report.median(walls)
    _report.figure(
        "install",
        "pip install -v . wall time (clean clone)",
        wall,
        "s",
        target=f"<= {TARGET_S:.0f} s",
        ok=wall <= TARGET_S,
        note=note,
    )
    _report.figure("install", "install CPU time (user+sys)", _report.median(cpus), "s", note=note)
    return _report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
