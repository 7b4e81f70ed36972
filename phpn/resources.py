"""Where the files phpn ships are: the demos' weights, images and precomputed runs.

In the repository they are in ``assets/`` at its root; an installed phpn carries them as
``phpn/assets`` (see setup.py). One place decides, so demos and benchmarks agree.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The folder of shipped assets: ``phpn/assets`` when installed, else the repository's ``assets/``."""
    installed = _PACKAGE / "assets"
    return installed if installed.is_dir() else _PACKAGE.parent / "assets"


ASSETS = assets_dir()
