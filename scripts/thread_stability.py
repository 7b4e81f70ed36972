"""Does a whole discovery stay put when only the thread count changes?

Discovers the fashion-mnist demo twice, with OMP_NUM_THREADS=1 and =2 (each in its own
process, so torch reads the setting at start-up), and prints per class how far the NMF parts
moved (relative to the largest part) and how far the final prototypes moved (relative to the
class's head row), plus the largest change of a mean contribution.

    python scripts/thread_stability.py --k 5 [--classes 0,9] [--keep DIR]
    python scripts/thread_stability.py --k 5 --perturbation 1e-6

With ``--perturbation EPS`` it instead refines the demo's classes twice from the same NMF
parts, once on features multiplied by (1 + EPS · noise), and prints how far each class's
prototypes moved (relative to its head row): the refinement's own sensitivity.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phpn.runs.store import load_run  # noqa: E402


def discover(out: Path, threads: int, k: int, classes) -> None:
    cmd = [sys.executable, "-m", "phpn", "discover", "--demo", "fashion-mnist", "--k", str(k), "--out", str(out),
           "--quiet"] + (["--classes", classes] if classes else [])
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def compare(a: Path, b: Path) -> dict:
    ra, rb = load_run(a), load_run(b)
    pa, pb = ra.nmf_prototypes.double().numpy(), rb.nmf_prototypes.double().numpy()
    fa, fb = ra.prototypes.double().numpy(), rb.prototypes.double().numpy()
    parts = np.linalg.norm(pa - pb, axis=-1).max(1) / np.linalg.norm(pa, axis=-1).max(1)
    final = np.linalg.norm(fa - fb, axis=-1).max(1) / np.linalg.norm(ra.head_rows.double().numpy(), axis=-1)
    own = (np.linalg.norm(fa - fb, axis=-1) / np.linalg.norm(fa, axis=-1)).max(1)
    indices = ra.class_indices.tolist()
    ca = np.array([ra.class_meta(c)["mean_contribution"] for c in indices])
    cb = np.array([rb.class_meta(c)["mean_contribution"] for c in indices])
    return {"nmf_parts_moved": parts.round(6).tolist(), "prototypes_moved_of_head_row": final.round(6).tolist(),
            "prototypes_moved_of_own_norm": own.round(6).tolist(),
            "largest_mean_contribution_change": float(np.abs(ca - cb).max())}


def perturbation(k: int, eps: float) -> dict:
    import torch

    import phpn.pipeline.discover as discovery
    from phpn.cli import main as cli
    from phpn.method.refine import refine

    captured = []

    def spy(features, prototypes, heads, config, counts=None, tick=None, usage=None):
        captured.append((features, prototypes, heads, config, counts, usage))
        return refine(features, prototypes, heads, config, counts, tick=tick, usage=usage)

    discovery.refine = spy  # the inputs discovery gives its refinement
    with tempfile.TemporaryDirectory() as tmp:
        cli(["discover", "--demo", "fashion-mnist", "--k", str(k), "--out", str(Path(tmp) / "run"), "--quiet"])
    moved = []
    for features, prototypes, heads, config, counts, usage in captured:
        noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1))
        a = refine(features, prototypes, heads, config, counts, usage=usage).prototypes
        b = refine(features * (1 + eps * noise), prototypes, heads, config, counts, usage=usage).prototypes
        moved += ((a - b).norm(dim=-1).amax(1) / heads.double().norm(dim=1)).tolist()
    return {"k": k, "perturbation": eps, "prototypes_moved_of_head_row": [float(f"{m:.2g}") for m in moved]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--classes", default=None, help="a subset, as discover's --classes")
    parser.add_argument("--keep", type=Path, default=None, help="keep both runs in this new folder")
    parser.add_argument("--perturbation", type=float, default=None,
                        help="refine twice, once on features perturbed by this relative amount")
    args = parser.parse_args()
    if args.perturbation is not None:
        print(json.dumps(perturbation(args.k, args.perturbation)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        runs = [base / f"threads-{t}" for t in (1, 2)]
        for threads, out in zip((1, 2), runs):
            discover(out, threads, args.k, args.classes)
        print(json.dumps({"k": args.k, "classes": args.classes, **compare(*runs)}))


if __name__ == "__main__":
    main()
