"""Do the prototypes find parts, or would any split of the head row do as well?

Annotation-free scores on the features of a class's images, each computed for phpn's
prototypes and, in the same call, for the two baselines that sum to the same head row:
random directions (several draws: mean and standard deviation) and the class map split in k
equal parts. A score separates parts from noise only where phpn's value lies beyond both
baselines by more than the random draws' spread; :func:`separates` says so per score.

- ``peak_purity``: at each image, the feature vector at each prototype's peak. Mean cosine
  between peaks of the *same* prototype on different images, minus mean cosine between
  peaks of *different* prototypes of the class on different images. High: each prototype
  fires on one kind of feature, and not the kind its siblings fire on. The equal split
  scores 0 by construction (its k maps are one map).
- ``overlap_iou``: mean IoU of the prototypes' top-20% cells on the same image (lower is
  more distinct). The equal split scores 1 by construction.
"""
from __future__ import annotations

from typing import Sequence

import torch

from phpn.method.baselines import equal_split_prototypes, random_prototypes
from phpn.method.part_metrics import RANDOM_SEEDS, _pair_mean, maps_of, overlap_iou

HIGHER_IS_BETTER = {"peak_purity": True, "overlap_iou": False}


def peak_purity(features: torch.Tensor, maps: torch.Tensor) -> float:
    """(n, D, h, w) features, (n, k, h, w) maps -> same-prototype minus cross-prototype peak cosine."""
    n, k = maps.shape[:2]
    if n < 2 or k < 2:
        return float("nan")
    where = maps.reshape(n, k, -1).argmax(2)  # (n, k)
    cells = features.reshape(n, features.shape[1], -1).double()
    peaks = torch.stack([cells[j, :, where[j]] for j in range(n)])  # (n, D, k)
    peaks = torch.nn.functional.normalize(peaks, dim=1).permute(2, 0, 1).reshape(k * n, -1)  # (k·n, D)
    cos = peaks @ peaks.T
    owner = torch.arange(k).repeat_interleave(n)
    image = torch.arange(n).repeat(k)
    same = (owner[:, None] == owner[None, :]) & (image[:, None] != image[None, :])
    other = (owner[:, None] != owner[None, :]) & (image[:, None] != image[None, :])
    return float(cos[same].mean() - cos[other].mean())


def _scores(features: torch.Tensor, directions: torch.Tensor) -> dict:
    maps = maps_of(features, directions)
    return {"peak_purity": peak_purity(features, maps), "overlap_iou": _pair_mean(overlap_iou(maps))[0]}


def class_separation(features: torch.Tensor, prototypes: torch.Tensor, head_row: torch.Tensor,
                     seeds: Sequence[int] = RANDOM_SEEDS) -> dict:
    """Scores of one class's prototypes (k, D) and of both baselines on its images' features."""
    k = prototypes.shape[0]
    out = {"phpn": _scores(features, prototypes.to(features))}
    draws = [_scores(features, random_prototypes(head_row[None].cpu(), [0], k, s)[0].to(features)) for s in seeds]
    out["random"] = {name: [d[name] for d in draws] for name in HIGHER_IS_BETTER}
    out["equal"] = _scores(features, equal_split_prototypes(head_row[None].cpu(), [0], k)[0].to(features))
    return out


def summarise(per_class: Sequence[dict]) -> dict:
    """Mean over classes for phpn and the equal split; for random directions the mean over
    classes of each draw, then mean and standard deviation over draws; and whether phpn beats
    both baselines by more than that spread."""
    out = {}
    for name, higher in HIGHER_IS_BETTER.items():
        phpn = torch.tensor([c["phpn"][name] for c in per_class], dtype=torch.float64).nanmean()
        equal = torch.tensor([c["equal"][name] for c in per_class], dtype=torch.float64).nanmean()
        draws = torch.tensor([c["random"][name] for c in per_class], dtype=torch.float64).nanmean(0)
        spread = float(draws.std()) if draws.numel() > 1 else 0.0
        out[name] = {"phpn": float(phpn), "random_mean": float(draws.mean()), "random_std": spread,
                     "equal": float(equal), "higher_is_better": higher,
                     "separates": separates(float(phpn), float(draws.mean()), spread, float(equal), higher)}
    return out


def separates(phpn: float, random_mean: float, random_std: float, equal: float, higher_is_better: bool) -> bool:
    """True when phpn is better than both baselines by more than the random draws' spread."""
    sign = 1.0 if higher_is_better else -1.0
    margin = max(random_std, 1e-12)
    return sign * (phpn - random_mean) > margin and sign * (phpn - equal) > margin
