"""Packaging metadata lives in pyproject.toml; this adds the one thing it cannot say.

The repository keeps the demos' files in assets/ and the app's page scripts in pages/ at its
root (``streamlit run app.py`` finds them there); an installed phpn carries them as
phpn/assets and phpn/app/pages (``phpn app``).
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["phpn", "phpn.*"]) + ["phpn.assets", "phpn.app.pages"],
    package_dir={"phpn.assets": "assets", "phpn.app.pages": "pages"},
)
