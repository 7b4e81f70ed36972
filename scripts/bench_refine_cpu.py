"""Refinement against the feature pass on a CPU, in the same run: a ResNet-18 (random weights,
nothing downloaded) on 10 classes of 32-px pictures at 224 px (the setting of a CIFAR model left
at the default size), k = 8. Prints each stage's seconds, refinement / features (the target: at
most 1) and the per-class refinement iterations.

    PYTHONPATH=. python scripts/bench_refine_cpu.py [--images-per-class 30] [--k 8] [--size 224]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from phpn.api import decompose
from phpn.images.preprocess import Preprocess


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=args.classes).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for c in range(args.classes):
            (root / f"class{c}").mkdir()
            tint = rng.integers(0, 255, 3)
            for i in range(args.images_per_class):
                arr = np.clip(rng.normal(0, 60, (32, 32, 3)) + tint, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / f"class{c}" / f"{i:03d}.png")
        started = time.perf_counter()
        run = decompose(model, root, k=args.k, device="cpu", progress=False,
                        preprocess=Preprocess(resize=args.size, crop=args.size))
        wall = time.perf_counter() - started
    t = run.meta["timings"]
    iterations = [c.get("refine_iterations") for c in run.meta["classes"]]
    out = {"threads": torch.get_num_threads(), "images": args.classes * args.images_per_class, "k": args.k,
           "size": args.size, "features_s": round(t.get("features_s", 0), 2), "nmf_s": round(t.get("nmf_s", 0), 2),
           "refine_s": round(t.get("refine_s", 0), 2), "total_s": round(wall, 2), "refine_iterations": iterations}
    # The machine's load moves both stages alike: the ratio is what to compare between runs.
    out["refine_to_features"] = round(out["refine_s"] / max(out["features_s"], 1e-9), 3)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['images']} images at {args.size} px, k = {args.k}, {out['threads']} threads: features "
              f"{out['features_s']} s, NMF {out['nmf_s']} s, refinement {out['refine_s']} s (total {out['total_s']} s); "
              f"refinement / features {out['refine_to_features']}")
        print(f"refinement iterations per class: {iterations}")


if __name__ == "__main__":
    main()
