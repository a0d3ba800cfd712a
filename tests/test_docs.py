"""The documentation in docs/: the example notebook runs on a real kernel and shows what
it promises, the API reference names the whole public surface, the rules page names
every rule, and nothing in docs/ points outside the repository.

The notebook needs nbclient, nbformat and ipykernel (and matplotlib and openai, which
it uses). Without them the notebook tests skip, except under CI (``$CI`` set), where
they fail.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import quotaguard as qg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOK = DOCS / "example.ipynb"
MODEL = "qwen-plus"  # the model the notebook guards
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed: the example notebook cannot be executed"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI runs it: pip install {module})")
        pytest.skip(message)


def _outputs(nb: dict[str, Any]) -> list[dict[str, Any]]:
    return [out for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell["outputs"]]


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _cell_outputs(nb: dict[str, Any], last_line: str) -> list[dict[str, Any]]:
    """The outputs of the one code cell whose last line is ``last_line``."""
    [cell] = [
        c
        for c in nb["cells"]
        if c["cell_type"] == "code" and _text(c["source"]).strip().splitlines()[-1:] == [last_line]
    ]
    outputs: list[dict[str, Any]] = cell["outputs"]
    return outputs


def _cell_html(nb: dict[str, Any], last_line: str) -> str:
    """The HTML shown by the one code cell whose last line is ``last_line``."""
    return "".join(
        _text(o["data"]["text/html"])
        for o in _cell_outputs(nb, last_line)
        if "text/html" in o.get("data", {})
    )


def _check_outputs(nb: dict[str, Any]) -> None:
    """The guard's table, the object views, the refusal and the plot are all in the
    notebook's outputs."""
    outputs = _outputs(nb)
    assert not [o for o in outputs if o["output_type"] == "error"]

    html = [_text(o["data"]["text/html"]) for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table" in h and f"<code>{MODEL}</code>" in h for h in html), html
    # guard.track's live view, as its last update left it, and a %%quota cell's summary.
    assert any("quotaguard-live" in h and "12/12 items · <b>12</b> calls" in h for h in html)
    assert any("quotaguard-budget" in h and "tokens of 800" in h for h in html), html

    printed = "".join(_text(o["text"]) for o in outputs if o["output_type"] == "stream")
    assert [o for o in outputs if o.get("name") == "stderr"] == [], "warnings on stderr"
    assert 'NoFreeQuotaWarning: calls to "qwen-max" are charged' in printed, printed
    assert f'refused: free quota of "{MODEL}" exhausted' in printed, printed
    assert "code: AllocationQuota.FreeTierOnly | reason: exhausted" in printed, printed
    sent = re.search(r"received: (\d+) before the call, (\d+) after", printed)
    assert sent is not None, printed
    assert sent.group(1) == sent.group(2), "the refused call reached the server"

    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert images, "no chart in the notebook's outputs"
    assert all(base64.b64decode(_text(i)).startswith(PNG_SIGNATURE) for i in images)

    # The object views: a Quota, a Bill and a RecordList as tables, and guard.plot()'s
    # picture in its own cell.
    quota = _cell_html(nb, f'guard.quota("{MODEL}")')
    assert f"<code>{MODEL}</code>" in quota and ">3,000/3,000</td>" in quota, quota
    bill = _cell_html(nb, "bill")
    assert "<b>Bill " in bill and "<code>qwen-max</code>" in bill, bill
    records = _cell_html(nb, f'guard.records(model="{MODEL}")')
    assert "<b>12 records</b>" in records and "<th>cost type</th>" in records, records
    plot = _cell_outputs(nb, "guard.plot()")
    pictures = [o["data"]["image/png"] for o in plot if "image/png" in o.get("data", {})]
    assert pictures, "guard.plot() showed no picture"
    assert base64.b64decode(_text(pictures[0])).startswith(PNG_SIGNATURE)


@pytest.mark.timeout(300)
def test_example_notebook_runs_on_a_real_kernel(tmp_path: Path) -> None:
    for module in ("ipykernel", "matplotlib", "openai"):
        _require(module)
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # an error in any cell raises CellExecutionError
    _check_outputs(nb)
    assert list(tmp_path.iterdir()) == [], "the notebook left files behind"


def test_example_notebook_is_stored_with_its_outputs() -> None:
    stored = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert stored["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "run every cell before saving"
    _check_outputs(stored)


def test_api_reference_names_every_public_name() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [
        name
        for name in qg.__all__
        if not re.search(rf"`[^`\n]*(?<![\w]){re.escape(name)}(?![\w])[^`\n]*`", text)
    ]
    assert missing == [], f"docs/api.md does not mention {missing}"


def test_rules_name_r1_to_r17() -> None:
    text = (DOCS / "rules.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (R\d+)\b", text, flags=re.MULTILINE)
    assert headings == [f"R{n}" for n in range(1, 18)]


def _readable(path: Path) -> bytes:
    """A file's bytes; a notebook's without its images, whose base64 could spell anything."""
    if path.suffix != ".ipynb":
        return path.read_bytes()
    nb = json.loads(path.read_text(encoding="utf-8"))
    for out in _outputs(nb):
        out.get("data", {}).pop("image/png", None)
    return json.dumps(nb, ensure_ascii=False).encode()


def test_docs_stand_on_their_own() -> None:
    """Nothing in docs/ points at files outside the repository or at this machine."""
    forbidden = ["SPEC.md", "API.md", "../shared", "site-packages", str(ROOT)]
    home = os.path.expanduser("~")
    if len(home) > 1:
        forbidden.append(home)
    files = sorted(p for p in DOCS.rglob("*") if p.is_file())
    assert files, "docs/ is empty"
    found = [
        (str(p.relative_to(ROOT)), word)
        for p in files
        for word in forbidden
        if word.encode() in _readable(p)
    ]
    assert found == []
