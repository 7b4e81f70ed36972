"""Write quickstart.ipynb from quickstart.py (cells split at ``# %%``), so the two never differ.

    python examples/make_notebook.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cells(source: str) -> list:
    """[(kind, text)] from a percent-format script: ``# %%`` starts code, ``# %% [markdown]`` text."""
    out = []
    for chunk in source.split("# %%")[1:]:
        head, _, body = chunk.partition("\n")
        if head.strip() == "[markdown]":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            out.append(("markdown", text.strip()))
        else:
            out.append(("code", body.strip()))
    return out


def notebook(source: str) -> dict:
    def lines(text: str) -> list:
        return text.splitlines(keepends=True)

    return {
        "cells": [({"cell_type": "markdown", "id": f"cell-{i}", "metadata": {}, "source": lines(text)}
                   if kind == "markdown" else
                   {"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {}, "outputs": [],
                    "source": lines(text)}) for i, (kind, text) in enumerate(cells(source))],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


if __name__ == "__main__":
    nb = notebook((HERE / "quickstart.py").read_text(encoding="utf-8"))
    (HERE / "quickstart.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'quickstart.ipynb'}")
