"""Packaging metadata lives in pyproject.toml; this adds the one thing it cannot say.

The repository keeps the demos' files in assets/ at its root (the app and the scripts read
them there); an installed phpn finds them as the data folder phpn/assets.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["phpn", "phpn.*"]) + ["phpn.assets"],
    package_dir={"phpn.assets": "assets"},
)
