"""Is the "where" faithful? Attribution axioms and deletion curves.

- Completeness: the contributions of a class's prototypes sum to logit - bias, and each
  map averages to its contribution.
- Linearity: the maps of a sum of prototypes are the sum of their maps (merge two
  prototypes into one and compare).
- Deletion: mask the top region of a prototype's map in input space (the pixels where its
  upsampled map is highest), and measure how much its own contribution and the class
  logit drop; compare with masking a random region of the same size (the top pixels of
  a smooth random field, so that it is a blob of similar shape, not scattered pixels).
  A faithful map shows a larger drop for its own region than for a random one.

The pure helpers work on arrays; the ``*_of`` functions take an *explainer*: a callable
``explainer(images, class_index) -> (maps (B, k, h, w), contributions (B, k), logit (B,))``
(see :mod:`phpn.evaluate.explainers`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from phpn.evaluate.consistency import upsample_maps

FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def top_region(upsampled: torch.Tensor, fraction: float) -> torch.Tensor:
    """(..., H, W) maps -> bool masks of their top ``round(fraction * H * W)`` pixels
    (ties broken by position, first in row-major order)."""
    H, W = upsampled.shape[-2:]
    n = int(round(float(fraction) * H * W))
    flat = upsampled.reshape(-1, H * W)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if n > 0:
        # A stable sort so that ties keep row-major order.
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :n]
        mask.scatter_(1, order, True)
    return mask.reshape(upsampled.shape)


def random_region(count: int, size, fraction: float, generator: Optional[torch.Generator] = None,
                  grid: int = 6) -> torch.Tensor:
    """(count, H, W) bool masks of the top pixels of smooth random fields (bicubic
    upsampled ``grid x grid`` noise): random blobs covering ``fraction`` of the image."""
    H, W = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    field = torch.randn(count, grid, grid, generator=generator)
    up = upsample_maps(field, (H, W))
    return top_region(up, fraction)


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """images (B, ch, H, W), mask (B, H, W) bool -> masked images (fill in normalised space;
    0 is the dataset's mean colour)."""
    return torch.where(mask[:, None, :, :], torch.as_tensor(fill, dtype=images.dtype, device=images.device), images)


@torch.no_grad()
def deletion_curves_of(explainer, images: torch.Tensor, class_index: int,
                       fractions: Sequence[float] = FRACTIONS, fill: float = 0.0,
                       generator: Optional[torch.Generator] = None) -> dict:
    """Deletion curves of every prototype of ``class_index`` on ``images`` (all of that class).

    Returns per prototype, for each fraction: the mean drop of its own contribution and of
    the class logit when its top region is masked ("top") and when a random region of the
    same size is masked ("random"), plus the unmasked means.
    """
    B = images.shape[0]
    S = images.shape[-2:]
    maps, contrib, logit = explainer(images, class_index)
    k = maps.shape[1]
    up = upsample_maps(maps.detach().float().cpu(), tuple(S))  # (B, k, H, W)
    own_top = np.zeros((k, len(fractions)))
    logit_top = np.zeros((k, len(fractions)))
    own_rand = np.zeros((k, len(fractions)))
    logit_rand = np.zeros((k, len(fractions)))
    c0 = contrib.detach().double().cpu()  # (B, k)
    l0 = logit.detach().double().cpu()  # (B,)
    for j, f in enumerate(fractions):
        if f <= 0:
            continue
        # Top regions: one masked copy per image and prototype.
        masks = top_region(up, f).to(images.device)  # (B, k, H, W)
        batch = apply_mask(images.repeat_interleave(k, dim=0), masks.reshape(B * k, *S), fill)
        _, c, lg = explainer(batch, class_index)
        c = c.detach().double().cpu().reshape(B, k, k)
        lg = lg.detach().double().cpu().reshape(B, k)
        own = torch.diagonal(c, dim1=1, dim2=2)  # (B, k): prototype i with its own region masked
        own_top[:, j] = (c0 - own).mean(0).numpy()
        logit_top[:, j] = (l0[:, None] - lg).mean(0).numpy()
        # Random regions: one per image, shared by all prototypes.
        rmask = random_region(B, tuple(S), f, generator).to(images.device)
        _, c, lg = explainer(apply_mask(images, rmask, fill), class_index)
        own_rand[:, j] = (c0 - c.detach().double().cpu()).mean(0).numpy()
        logit_rand[:, j] = (l0 - lg.detach().double().cpu()).mean().item()
    scale = c0.abs().mean(0).numpy()  # (k,) mean |contribution|, to compare prototypes
    out = []
    for i in range(k):
        out.append({
            "fractions": [float(f) for f in fractions],
            "contribution": float(c0[:, i].mean()),
            "mean_abs_contribution": float(scale[i]),
            "logit": float(l0.mean()),
            "own_drop_top": own_top[i].tolist(),
            "own_drop_random": own_rand[i].tolist(),
            "logit_drop_top": logit_top[i].tolist(),
            "logit_drop_random": logit_rand[i].tolist(),
            # Mean over the masked fractions of (top - random) / mean |contribution|: > 0
            # means the map's own region matters more to the prototype than a random one.
            "own_gap": float(np.mean((own_top[i] - own_rand[i])[1:]) / max(scale[i], 1e-12))
            if len(fractions) > 1 else float("nan"),
            "images": int(B),
        })
    return {"prototypes": out}


def completeness(contributions: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor,
                 classes: Sequence[int]) -> float:
    """max |sum_i contributions - (logit - bias)|; contributions (B, Cd, k), logits (B, C)."""
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
    target = logits[:, idx] - bias.to(logits.device, logits.dtype)[idx][None, :]
    return float((contributions.sum(-1) - target).abs().max())


def map_means(maps: torch.Tensor, contributions: torch.Tensor) -> float:
    """max |mean over positions of each map - its contribution|."""
    return float((maps.mean(dim=(-2, -1)) - contributions).abs().max())


def linearity(maps_a: torch.Tensor, maps_b: torch.Tensor, maps_sum: torch.Tensor) -> float:
    """max |maps(p_a + p_b) - maps(p_a) - maps(p_b)|."""
    return float((maps_sum - maps_a - maps_b).abs().max())


def relative(err: float, scale: float) -> float:
    return float(err) / max(float(scale), 1e-12)


def deletion_summary(per_prototype: Sequence[dict]) -> dict:
    """Means over prototypes of the curves (same fractions everywhere)."""
    if not per_prototype:
        return {}
    fr = per_prototype[0]["fractions"]

    def mean(key):
        return np.mean([p[key] for p in per_prototype], axis=0).tolist()

    def rel(key):
        return np.mean([np.asarray(p[key]) / max(p["mean_abs_contribution"], 1e-12) for p in per_prototype],
                       axis=0).tolist()

    gaps = [p["own_gap"] for p in per_prototype]
    return {
        "fractions": fr,
        "own_drop_top": mean("own_drop_top"),
        "own_drop_random": mean("own_drop_random"),
        "own_drop_top_relative": rel("own_drop_top"),
        "own_drop_random_relative": rel("own_drop_random"),
        "logit_drop_top": mean("logit_drop_top"),
        "logit_drop_random": mean("logit_drop_random"),
        "mean_own_gap": float(np.mean(gaps)),
        "prototypes_with_positive_gap": float(np.mean([g > 0 for g in gaps]) * 100.0),
    }

