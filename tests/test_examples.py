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

from make_notebook import cells, notebook  # noqa: E402


def test_notebook_is_the_script():
    script = (EXAMPLES / "quickstart.py").read_text(encoding="utf-8")
    nb = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    assert nb == notebook(script), "run: python examples/make_notebook.py"
    code = [text for kind, text in cells(script) if kind == "code"]
    assert len(code) == 3 and all(c.strip() for c in code)
    assert all(c["outputs"] == [] for c in nb["cells"] if c["cell_type"] == "code")  # committed without outputs


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
