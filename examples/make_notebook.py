"""Write quickstart.ipynb from quickstart.py (cells split at ``# %%``), so the two never differ,
and run it so that it ships with its outputs.

    python examples/make_notebook.py            # cells and outputs (runs the quickstart, about a minute)
    python examples/make_notebook.py --no-run   # cells only

The cells run one after the other in one namespace, as a kernel runs them: what a cell prints
becomes a stream output (progress bars as they ended), its last expression a display output with
the text and, when the object has one, the HTML a notebook shows (``_repr_html_``).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import sys
import warnings
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


def _screen(text: str) -> str:
    """Terminal output as a screen shows it: each line as its last carriage return left it."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # cursor movements of progress bars
    return "".join(line.rsplit("\r", 1)[-1] for line in text.splitlines(keepends=True))


def _streams(name: str, text: str) -> list:
    text = _screen(text)
    return [{"name": name, "output_type": "stream", "text": text.splitlines(keepends=True)}] if text.strip() else []


class _Printer:
    """The little of IPython's pretty printer that ``_repr_pretty_`` methods use."""

    def __init__(self):
        self.parts = []

    def text(self, text: str) -> None:
        self.parts.append(text)


def _plain(value) -> str:
    """The text a notebook shows for a value: its ``_repr_pretty_`` when it has one, else its repr."""
    if hasattr(value, "_repr_pretty_"):
        printer = _Printer()
        value._repr_pretty_(printer, False)
        return "".join(printer.parts)
    return repr(value)


def execute(nb: dict, cwd: Path) -> dict:
    """Run the notebook's code cells in order in one namespace (in ``cwd``); their outputs are stored."""
    namespace = {"__name__": "__main__"}
    count, here = 0, Path.cwd()
    os.chdir(cwd)
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            count += 1
            tree = ast.parse("".join(cell["source"]))
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("always")
                exec(compile(tree, f"<cell {count}>", "exec"), namespace)  # noqa: S102 - the example's own code
                value = eval(compile(ast.Expression(last.value), f"<cell {count}>", "eval"), namespace) \
                    if last is not None else None
            outputs = _streams("stdout", out.getvalue()) + _streams("stderr", err.getvalue())
            if value is not None:
                data = {"text/plain": _plain(value).splitlines(keepends=True)}
                if hasattr(value, "_repr_html_"):
                    data["text/html"] = value._repr_html_().splitlines(keepends=True)
                outputs.append({"data": data, "execution_count": count, "metadata": {},
                                "output_type": "execute_result"})
            cell["execution_count"], cell["outputs"] = count, outputs
    finally:
        os.chdir(here)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write the cells without running them")
    parser.add_argument("--out", type=Path, default=HERE / "quickstart.ipynb")
    args = parser.parse_args()
    nb = notebook((HERE / "quickstart.py").read_text(encoding="utf-8"))
    if not args.no_run:
        import tempfile

        sys.path.insert(0, str(HERE.parent))  # the phpn of this checkout
        with tempfile.TemporaryDirectory() as scratch:  # the files the quickstart saves are not kept
            nb = execute(nb, Path(scratch))
    args.out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
