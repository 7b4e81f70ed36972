"""Consistency and stability of an explainer's prototypes on a part-annotated dataset.

For every class that has prototypes and images, the images of that class go through the
explainer clean and with noise (the same draw, unclipped and clipped); the part sets of
:mod:`phpn.evaluate.consistency` are computed per image and prototype, and the scores follow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from phpn.errors import DataError
from phpn.evaluate import consistency as M
from phpn.evaluate.parts import PartDataset
from phpn.progress import ProgressFn, report

NOISE_VARIANTS = {"unclipped": None, "clipped": M.CLIP}


def _noise_generator(seed: int, class_index: int, start: int) -> torch.Generator:
    # The noise of an image depends on the seed, its class and its position only.
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(class_index) * 10_007 + int(start))


@torch.no_grad()
def class_part_sets(explainer, images: torch.Tensor, keypoints: np.ndarray, visible: np.ndarray,
                    class_index: int, *, half_size: float, sigma: float = M.SIGMA,
                    noise: Optional[dict] = None, seed: int = 0, batch_size: int = 32,
                    device="cpu", start: int = 0) -> dict:
    """Part sets (N, k, M) of one class's prototypes on its images: "clean" and one per
    noise variant (name -> clip, None for unclipped)."""
    noise = NOISE_VARIANTS if noise is None else noise
    S = tuple(images.shape[-2:])
    out = {"clean": []}
    out.update({name: [] for name in noise})
    for b in range(0, images.shape[0], batch_size):
        x = images[b:b + batch_size].to(device)
        kp, vis = keypoints[b:b + batch_size], visible[b:b + batch_size]
        maps, _, _ = explainer(x, class_index)
        out["clean"].append(M.part_sets(maps.float().cpu(), kp, vis, S, half_size))
        if noise:
            g = _noise_generator(seed, class_index, start + b)
            raw = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype) * float(sigma)
            for name, clip in noise.items():
                n = raw if clip is None else raw.clamp(-float(clip), float(clip))
                maps, _, _ = explainer(x + n, class_index)
                out[name].append(M.part_sets(maps.float().cpu(), kp, vis, S, half_size))
    return {name: np.concatenate(v, axis=0) if v else np.zeros((0, 0, keypoints.shape[1]), bool)
            for name, v in out.items()}


def interpretability_of(explainer, dataset: PartDataset, preprocess, classes: Sequence[int], *,
                        half_size: float = M.HALF_SIZE, reference_size: int = M.REFERENCE_SIZE,
                        threshold: float = M.THRESHOLD, sigma: float = M.SIGMA, clip: Optional[float] = M.CLIP,
                        seed: int = 0, batch_size: int = 32, device="cpu",
                        progress: Optional[ProgressFn] = None, class_names: Optional[dict] = None) -> dict:
    """Consistency and stability of the prototypes of ``classes`` on ``dataset`` (already
    the split to evaluate, e.g. ``dataset.select("test")``).

    ``half_size`` is in pixels at ``reference_size``; it is scaled to the input size.
    Returns JSON-ready scores (percentages) and per-prototype details.
    """
    noise = {"unclipped": None}
    if clip is not None:
        noise["clipped"] = float(clip)
    by_class = dataset.by_class()
    classes = [int(c) for c in classes if int(c) in by_class]
    if not classes:
        raise DataError("No class with prototypes has images in the part-annotated dataset.",
                        "Check that the dataset's class ids match the model's classes (CUB ids count from 1).")
    S = preprocess.crop
    h = M.scaled_half_size(S, half_size, reference_size)
    per_proto, skipped = [], []
    flags = []
    stable = {name: [] for name in noise}
    for ci, c in enumerate(classes):
        report(progress, "consistency and stability", ci, len(classes))
        x, kp, vis, kept, skip = dataset.load_batch(by_class[c], preprocess)
        skipped.extend(skip)
        if not kept:
            continue
        sets = class_part_sets(explainer, x, kp, vis, c, half_size=h, sigma=sigma, noise=noise, seed=seed,
                               batch_size=batch_size, device=device)
        frac = M.part_fractions(sets["clean"], vis)  # (k, M)
        cons = frac >= threshold
        stab = {name: M.stable_fraction(sets["clean"], sets[name]) for name in noise}
        visible_counts = vis.sum(axis=0)
        for i in range(frac.shape[0]):
            best = int(np.argmax(frac[i]))
            flags.append(bool(cons[i].any()))
            for name in noise:
                stable[name].append(float(stab[name][i]))
            per_proto.append({
                "class_index": c,
                "class_name": (class_names or {}).get(c, dataset.class_names.get(c, str(c))),
                "prototype": i,
                "consistent": bool(cons[i].any()),
                "best_part": best,
                "best_part_name": dataset.part_names[best],
                "best_part_fraction": float(frac[i, best]),
                "part_fractions": {dataset.part_names[m]: float(frac[i, m])
                                   for m in range(frac.shape[1]) if visible_counts[m] > 0},
                "stability": {name: float(stab[name][i]) for name in noise},
                "images": int(len(kept)),
            })
    report(progress, "consistency and stability", len(classes), len(classes))
    return {
        "consistency": M.consistency_score(flags),
        "stability": {name: M.stability_score(v) for name, v in stable.items()},
        "prototypes": per_proto,
        "classes": len(classes),
        "images": int(sum(p["images"] for p in per_proto if p["prototype"] == 0)),
        "skipped": [list(s) for s in skipped],
        "params": {"half_size": half_size, "reference_size": reference_size, "half_size_pixels": h,
                   "input_size": S, "threshold": threshold, "sigma": sigma, "clip": clip, "seed": seed},
    }
