"""The examples run as written, and the notebook is the script's code."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from make_notebook import cells, execute, notebook  # noqa: E402


def _sources(nb: dict) -> list:
    return [(c["cell_type"], c["source"]) for c in nb["cells"]]


def _text(output: dict) -> str:
    return "".join(output.get("text") or output["data"]["text/plain"])


def _check_outputs(nb: dict) -> None:
    """The quickstart's outputs: the certificate, the run's summary, the explanation as text and HTML."""
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == [1, 2, 3]
    printed = [_text(o) for o in code[1]["outputs"] if o.get("name") == "stdout"]
    assert printed[0].startswith("PASSED: agrees with the model on 500 of 500 images"), printed
    shown = [o for o in code[1]["outputs"] if o["output_type"] == "execute_result"]
    summary = _text(shown[0]).splitlines()
    assert summary[0] == "phpn run: 10 classes × k = 3 prototypes of module:FashionCNN"
    assert summary[1].startswith("certificate: PASSED: agrees with the model on 200 of 200 images")
    assert not any(line.startswith("WARNING") for line in summary)  # the model reads its inputs
    explanation = [o for o in code[2]["outputs"] if o["output_type"] == "execute_result"][0]["data"]
    assert _text({"data": explanation}).startswith("<Explanation: 00_t-shirt-top (class 0), logit ")
    page = "".join(explanation["text/html"])
    assert "data:image/png;base64," in page and "<script" not in page and len(page) < 400_000
    # Compact inline: the answer shows, the details (each prototype's section included) fold.
    assert page.count("<details>") == 3 and "<summary><b>This looks like that</b></summary>" in page
    streams = [_text(o) for c in code for o in c["outputs"] if o["output_type"] == "stream"]
    assert all("\r" not in text for text in streams)
    errors = "".join(_text(o) for c in code for o in c["outputs"] if o.get("name") == "stderr")
    assert "Warning" not in errors and "refine: 100%" in errors  # text progress bars, no advice to install widgets


def test_notebook_is_the_script_with_its_outputs():
    script = (EXAMPLES / "quickstart.py").read_text(encoding="utf-8")
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    assert _sources(nb) == _sources(notebook(script)), "run: python examples/make_notebook.py"
    assert nb["metadata"] == notebook(script)["metadata"]
    code = [text for kind, text in cells(script) if kind == "code"]
    assert len(code) == 3 and all(c.strip() for c in code)
    _check_outputs(nb)  # shipped executed: a reader sees the results without running it


@pytest.mark.slow
def test_notebook_runs_as_stored(tmp_path):
    """The suite runs the notebook in a real Jupyter kernel; the outputs are of the kinds shipped."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    fresh = tmp_path / "fresh.ipynb"
    out = subprocess.run([sys.executable, str(EXAMPLES / "make_notebook.py"), "--out", str(fresh)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ran, stored = (json.loads(p.read_text(encoding="utf-8")) for p in (fresh, EXAMPLES / "quickstart.ipynb"))
    _check_outputs(ran)
    assert _sources(ran) == _sources(stored)
    kinds = [[(o["output_type"], o.get("name")) for o in c.get("outputs", [])] for c in ran["cells"]]
    assert kinds == [[(o["output_type"], o.get("name")) for o in c.get("outputs", [])] for c in stored["cells"]]
    assert not list(EXAMPLES.glob("quickstart.png"))  # the files the quickstart saves stay in its scratch folder


@pytest.mark.slow
def test_quickstart_runs_and_certifies(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("PASSED: agrees with the model on 500 of 500 images"), lines[0]
    # "class: logit L = bias b + c1 + c2 + c3" and the numbers add up.
    m = re.match(r"(.+): logit (\S+) = bias (\S+) \+ (\S+) \+ (\S+) \+ (\S+)$", lines[1])
    assert m, lines[1]
    logit, *parts = (float(v) for v in m.groups()[1:])
    assert abs(logit - sum(parts)) < 2e-3
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000
    page = (tmp_path / "quickstart.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "<script" not in page
    assert (tmp_path / "quickstart-run" / "run.json").is_file()


def test_packaging_is_honest():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["requires-python"] == ">=3.11"  # zip(strict=), tomllib
    assert (ROOT / "phpn" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["phpn"]


@pytest.mark.slow
def test_a_real_kernel_hears_about_labels_in_another_order(tmp_path):
    """In a Jupyter kernel, a live model on a Subset with labels one class off: the warning shows as
    the cell runs, the run's display names it, and numpy pictures are explained with the names."""
    source = [
        f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from torch.utils.data import DataLoader, Subset\n"
        "import phpn\n"
        "from test_notebook_inputs import NORMALISED, ColourNet, Pictures\n"
        "data = Pictures(NORMALISED)\n"
        "data.targets = [(t + 1) % 3 for t in data.targets]",
        "run = phpn.decompose(ColourNet(), DataLoader(Subset(data, list(range(30))), batch_size=8), k=2)\n"
        "run",
        "run.explain(data.arrays[2])  # a numpy picture, read by the dataset's own transform",
    ]
    nb = {**notebook(""), "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {},
                                     "outputs": [], "source": text} for i, text in enumerate(source)]}
    ran = execute(nb, tmp_path, timeout=300)  # the quickstart's own runner: a real kernel
    outputs = ran["cells"][1]["outputs"]
    errors = "".join(_text(o) for o in outputs if o.get("name") == "stderr")
    assert "InputWarning: The labels look like another class order than the model's: label 0 (red) is read as " \
           "class 2 (blue)" in errors
    shown = [_text(o) for o in outputs if o["output_type"] == "execute_result"][0]
    assert "WARNING (class order): The labels look like" in shown and "WARNING (chance)" in shown
    explained = [o["data"] for o in ran["cells"][2]["outputs"] if o["output_type"] == "execute_result"][0]
    explained = {kind: "".join(text) for kind, text in explained.items()}
    assert explained["text/plain"].startswith("<Explanation: blue (class 2), logit ")  # a numpy HWC picture
    assert "<details>" in explained["text/html"] and "Why “blue”?" in explained["text/html"]
