"""Does a whole discovery stay put when only the thread count changes?

Discovers the fashion-mnist demo twice, with OMP_NUM_THREADS=1 and =2 (each in its own
process, so torch reads the setting at start-up), and prints per class how far the NMF parts
moved (relative to the largest part) and how far the final prototypes moved (relative to the
class's head row), plus the largest change of a mean contribution.

    python scripts/thread_stability.py --k 5 [--classes 0,9] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def discover(out: Path, threads: int, k: int, classes) -> None:
    cmd = [sys.executable, "-m", "phpn", "discover", "--demo", "fashion-mnist", "--k", str(k), "--out", str(out),
           "--quiet"] + (["--classes", classes] if classes else [])
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def compare(a: Path, b: Path) -> dict:
    ta, tb = load_file(str(a / "tensors.safetensors")), load_file(str(b / "tensors.safetensors"))
    parts = (np.linalg.norm(ta["nmf_prototypes"] - tb["nmf_prototypes"], axis=-1).max(1)
             / np.linalg.norm(ta["nmf_prototypes"], axis=-1).max(1))
    final = np.linalg.norm(ta["prototypes"] - tb["prototypes"], axis=-1).max(1) / np.linalg.norm(ta["head_rows"], axis=-1)
    ca = [c["mean_contribution"] for c in json.loads((a / "run.json").read_text())["classes"]]
    cb = [c["mean_contribution"] for c in json.loads((b / "run.json").read_text())["classes"]]
    contrib = float(np.abs(np.array(ca) - np.array(cb)).max())
    return {"nmf_parts_moved": parts.round(5).tolist(), "prototypes_moved_of_head_row": final.round(5).tolist(),
            "largest_mean_contribution_change": round(contrib, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--classes", default=None, help="a subset, as discover's --classes")
    parser.add_argument("--keep", type=Path, default=None, help="keep both runs in this new folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        runs = [base / f"threads-{t}" for t in (1, 2)]
        for threads, out in zip((1, 2), runs):
            discover(out, threads, args.k, args.classes)
        print(json.dumps({"k": args.k, "classes": args.classes, **compare(*runs)}))


if __name__ == "__main__":
    main()
