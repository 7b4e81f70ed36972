"""Write quickstart.ipynb from quickstart.py (cells split at ``# %%``), so the two never differ,
and run it so that it ships with its outputs.

    python examples/make_notebook.py            # cells and outputs (runs the quickstart, about a minute)
    python examples/make_notebook.py --no-run   # cells only

The notebook runs in a real Jupyter kernel (``nbclient`` and ``ipykernel``, development
requirements); its streams are stored as a screen shows them (progress bars as they ended).
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


def _screen_streams(nb: dict) -> dict:
    """Each cell's streams merged per name and shown as a screen shows them (progress bars as they
    ended), so that the stored notebook reads as it did in Jupyter and stays small."""
    for cell in nb["cells"]:
        merged, rest = {}, []
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                merged.setdefault(output["name"], []).append("".join(output["text"]))
            else:
                rest.append(output)
        streams = []
        for name in merged:  # in the order they first appeared, as Jupyter shows them
            text = _screen("".join(merged.get(name, [])))
            if text.strip():
                streams.append({"name": name, "output_type": "stream", "text": text.splitlines(keepends=True)})
        if cell["cell_type"] == "code":
            cell["outputs"] = streams + rest
    return nb


def execute(nb: dict, cwd: Path, timeout: int = 600) -> dict:
    """Run the notebook in a real Jupyter kernel (nbclient + ipykernel), in ``cwd``; outputs are stored."""
    import nbformat  # noqa: PLC0415 - development dependency, needed only to run the notebook
    from nbclient import NotebookClient  # noqa: PLC0415 - development dependency

    node = nbformat.reads(json.dumps(nb), as_version=4)
    client = NotebookClient(node, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), before]))  # the kernel's phpn: this checkout's
    try:
        client.execute()
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    ran = _screen_streams(json.loads(nbformat.writes(node)))
    ran["metadata"] = nb["metadata"]  # not the kernel's language_info: the shipped file names no local Python
    return ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="write the cells without running them")
    parser.add_argument("--out", type=Path, default=HERE / "quickstart.ipynb")
    args = parser.parse_args()
    nb = notebook((HERE / "quickstart.py").read_text(encoding="utf-8"))
    if not args.no_run:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:  # the files the quickstart saves are not kept
            nb = execute(nb, Path(scratch))
    args.out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
