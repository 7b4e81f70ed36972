"""Packaging: phpn installs (wheel and editable) and runs from any folder; no Streamlit needed.

The install test builds from a copy of the source with the setuptools already installed and
installs with --no-deps into a virtual environment that sees this interpreter's packages:
nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import phpn

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(args, cwd, timeout=180) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


def _source_copy(dest: Path) -> Path:
    """The files a source distribution holds (no caches, no build leftovers)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "phpn", src / "phpn", ignore=ignore)
    shutil.copytree(ROOT / "assets", src / "assets", ignore=ignore)
    shutil.copytree(ROOT / "pages", src / "pages", ignore=ignore)  # installed as phpn/app/pages
    return src


def build_wheel(tmp_path: Path) -> Path:
    """phpn's wheel, built from a source copy with the installed setuptools (nothing downloaded)."""
    src = _source_copy(tmp_path)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], tmp_path)
    return next(wheels.glob("phpn-*.whl"))


def install_in_venv(wheel: Path, tmp_path: Path) -> Path:
    """A fresh virtual environment (seeing this interpreter's packages) with the wheel installed;
    returns the environment's folder."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", wheel], tmp_path)
    return venv


def _pip_version() -> tuple:
    import pip

    return tuple(int(p) for p in pip.__version__.split(".")[:2] if p.isdigit())


@pytest.mark.slow
@pytest.mark.skipif(_pip_version() < (22, 3), reason="pip --python (installing into another environment) needs pip 22.3")
def test_wheel_and_editable_install_run_from_another_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"phpn-{phpn.__version__}-")
    venv = install_in_venv(wheel, tmp_path)
    py, script = venv / "bin" / "python", venv / "bin" / "phpn"
    src = tmp_path / "src"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    assert _run([script, "--version"], elsewhere).stdout.strip() == f"phpn {phpn.__version__}"
    helptext = _run([script, "--help"], elsewhere).stdout
    for command in ("discover", "certify", "explain", "doctor", "evaluate", "app"):
        assert command in helptext
    where = json.loads(_run([py, "-c", "import json, phpn, phpn.resources as r; "
                             "print(json.dumps([phpn.__file__, str(r.ASSETS)]))"], elsewhere).stdout)
    assert Path(where[0]).is_relative_to(venv) and Path(where[1]) == Path(where[0]).parent / "assets"
    # The demos' files came with the package: the doctor runs on the installed fashion-mnist model.
    doctor = json.loads(_run([script, "doctor", "--demo", "fashion-mnist", "--json"], elsewhere).stdout)
    assert doctor["verdict"] == "exact" and doctor["input_size"] == [1, 28, 28]

    # Editable: the installed phpn is the source folder itself.
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-build-isolation", "-e", src],
         tmp_path)
    where = _run([py, "-c", "import phpn; print(phpn.__file__)"], elsewhere).stdout.strip()
    assert Path(where) == src / "phpn" / "__init__.py"


@pytest.mark.slow
def test_library_and_cli_import_without_streamlit():
    """Every library module (all but the app, installed with phpn[app]) imports, and the CLI
    answers, with Streamlit made unimportable."""
    modules = sorted(m.name for m in pkgutil.walk_packages(phpn.__path__, "phpn.")
                     if not m.name.endswith("__main__") and not m.name.startswith("phpn.app."))
    assert "phpn.api" in modules and "phpn.cli" in modules
    code = ("import sys; sys.modules['streamlit'] = None\n"  # 'import streamlit' now raises ImportError
            "import importlib\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "import phpn\n"
            "phpn.decompose, phpn.load_run, phpn.Run\n"
            "from phpn.cli import main\n"
            "sys.exit(main(['--version']))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(_env(), PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"phpn {phpn.__version__}"


def test_pyproject_declares_ranges_extras_and_the_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("=")[0].strip(): d for d in meta["dependencies"]}
    assert deps["torch"] == "torch>=2.4" and deps["torchvision"] == "torchvision>=0.19"
    assert not any("==" in d for d in meta["dependencies"])  # ranges, never pins
    assert "streamlit" not in deps
    extras = meta["optional-dependencies"]
    assert {"app", "timm", "hf", "dev"} <= set(extras)
    assert any(d.startswith("streamlit") for d in extras["app"])
    assert meta["scripts"]["phpn"] == "phpn.cli:main"
    # requirements.txt stays the pinned, tested set.
    pins = (ROOT / "requirements.txt").read_text()
    assert "torch==" in pins and "torchvision==" in pins
