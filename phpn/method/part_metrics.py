"""Honest numbers about each class's prototypes, stored in every class record of a run.

What a user is shown (a map, a contribution, top patches) is only as good as these say:

- the map of a final prototype should still look like its NMF part (fidelity), on the
  discovery images and on images discovery did not see (held-out fidelity);
- it should look like *its own* part more than like the class's other parts (specificity),
  because a class's parts often correlate with each other;
- the prototypes' contributions should add up rather than cancel (cancellation);
- their top regions should overlap less than those of random directions that sum to the
  same head row (distinctness, against that baseline computed here with its spread);
- a prototype that holds no NMF part (α = 0) or holds it negatively (α < 0) is flagged.

:data:`FIELDS` gives each field's meaning in one line (the one place it is written);
:data:`WARNING_LIMITS` are the thresholds behind the warnings.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from phpn.method.baselines import random_prototypes
from phpn.method.network import prototype_maps
from phpn.method.refine import part_signs

EPS = 1e-12
TOP_FRACTION = 0.2  # the "top region" of a map: its highest 20% of feature cells on each image
RANDOM_SEEDS = (0, 1, 2, 3, 4)  # draws of the random-direction baseline

FIELDS = {
    "fidelity": "correlation of each prototype's map with its NMF part's map over the discovery images "
                "(1: the same shape; the part's map is negated where its share is negative)",
    "fidelity_heldout": "the same correlation on images held out of discovery (None when none were held out)",
    "specificity": "fidelity minus the prototype map's best correlation with another part of the class "
                   "(> 0: it shows its own part more than any other)",
    "specificity_heldout": "specificity on the held-out images",
    "part_share": "each NMF part's share of the class's mean logit minus bias on the discovery images",
    "mean_contribution": "each prototype's mean contribution to the class logit on the discovery images",
    "cancellation": "|sum of mean contributions| / sum of |mean contributions| (1: nothing cancels; "
                    "low: large contributions of opposite signs cancel)",
    "overlap_iou": "mean IoU of the prototypes' top-20% regions on the same image (low: distinct regions)",
    "overlap_iou_per_prototype": "each prototype's mean top-region IoU with the class's other prototypes",
    "overlap_iou_random": "the same IoU for random directions summing to the head row: mean and spread "
                          "(standard deviation) over draws",
    "alpha_flags": "per prototype: 'zero' (α = 0: holds no NMF part), 'negative' (α < 0: holds its part "
                   "reversed) or None",
    "refine_iterations": "L-BFGS iterations the refinement took for this class (0 for the other solvers)",
    "refine_converged": "whether the refinement reached its convergence test before its iteration cap "
                        "(false: the prototypes depend on rounding, e.g. the thread count)",
    "warnings": "plain-language warnings from the numbers above",
    "similar_prototypes": "per prototype, the most similar prototypes of other classes (cosine of the prototype "
                          "vectors, best first, at least 0): {class_index, prototype, cosine}",
    "k_suggested": "with --suggest-k: the k where NMF's error for k = 2..K_MAX bends most (the run keeps its own k)",
    "k_reason": "why that k: the error at each k and where the curve bends",
}

WARNING_LIMITS = {
    "specificity": 0.0,  # a prototype at or below this is not specific
    "cancellation": 0.95,  # a class below this cancels
}


def maps_of(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(n, D, h, w) features, (k, D) directions -> (n, k, h, w) maps, unscaled."""
    return prototype_maps(features, prototypes)


def correlation_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, k, h, w) and (n, k', h, w) maps -> (k, k') Pearson correlations over all positions."""
    x = a.transpose(0, 1).reshape(a.shape[1], -1).double()
    y = b.transpose(0, 1).reshape(b.shape[1], -1).double()
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]).clamp(min=EPS)


def specificity(corr: torch.Tensor) -> Optional[torch.Tensor]:
    """(k, k) correlations of final maps (rows) with NMF maps (columns) -> (k,) own minus best other."""
    k = corr.shape[0]
    if k < 2:
        return None
    others = corr.masked_fill(torch.eye(k, dtype=torch.bool, device=corr.device), float("-inf"))
    return corr.diagonal() - others.max(dim=1).values


def cancellation(contributions: torch.Tensor) -> float:
    """|Σ c_i| / Σ |c_i| of (k,) mean contributions (1 when all share a sign)."""
    c = contributions.double()
    return float(c.sum().abs() / c.abs().sum().clamp(min=EPS))


def top_cells(maps: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(n, k, h, w) maps -> bool masks of each map's top ``fraction`` of cells on its image."""
    n, k, h, w = maps.shape
    count = max(1, int(round(fraction * h * w)))
    flat = maps.reshape(n, k, h * w)
    idx = torch.topk(flat, count, dim=2).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(2, idx, True).reshape(n, k, h, w)


def overlap_iou(maps: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """(n, k, h, w) maps -> (k, k) mean over images of the IoU of the prototypes' top regions."""
    masks = top_cells(maps, fraction).reshape(maps.shape[0], maps.shape[1], -1).double()
    inter = masks @ masks.transpose(1, 2)  # (n, k, k)
    size = masks.sum(2)
    union = size[:, :, None] + size[:, None, :] - inter
    return (inter / union.clamp(min=1)).mean(0)


def _pair_mean(iou: torch.Tensor) -> tuple:
    k = iou.shape[0]
    if k < 2:
        return None, [None] * k
    off = ~torch.eye(k, dtype=torch.bool)
    per = [float(iou[i][off[i]].mean()) for i in range(k)]
    return float(iou[off].mean()), per


def random_overlap(features: torch.Tensor, head_row: torch.Tensor, k: int, scale: torch.Tensor,
                   seeds: Sequence[int] = RANDOM_SEEDS, fraction: float = TOP_FRACTION) -> dict:
    """Top-region IoU of k random directions summing to ``head_row`` (the baseline), over draws."""
    values = []
    for seed in seeds:
        directions = random_prototypes(head_row[None, :].cpu(), [0], k, seed)[0]
        maps = maps_of(features, directions) * scale[:, None, None, None]
        values.append(_pair_mean(overlap_iou(maps, fraction))[0])
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "draws": len(values)}


def alpha_flags(alpha: Sequence[float]) -> list:
    return ["zero" if a == 0 else "negative" if a < 0 else None for a in alpha]


def fidelity_and_specificity(features: torch.Tensor, final: torch.Tensor, nmf: torch.Tensor,
                             signs: Optional[Sequence[float]] = None,
                             final_maps: Optional[torch.Tensor] = None) -> tuple:
    """(fidelity (k,), specificity (k,) or None) of the final prototypes against the NMF parts,
    each part negated where its share is negative (``signs``: ±1 per part; None: all +1).
    ``final_maps``: the final prototypes' unscaled maps, when the caller has them already."""
    if signs is not None:
        nmf = nmf * torch.as_tensor(signs, dtype=nmf.dtype, device=nmf.device)[:, None]
    if final_maps is None:
        final_maps = maps_of(features, final)
    corr = correlation_matrix(final_maps, maps_of(features, nmf))
    spec = specificity(corr)
    return corr.diagonal().tolist(), (spec.tolist() if spec is not None else None)


def class_part_metrics(features: torch.Tensor, final: torch.Tensor, nmf: torch.Tensor, head_row: torch.Tensor,
                       scale: torch.Tensor, alpha: Sequence[float], part_share: Sequence[float],
                       seeds: Sequence[int] = RANDOM_SEEDS, final_maps: Optional[torch.Tensor] = None) -> dict:
    """The part metrics of one class (see :data:`FIELDS`).

    features (n, D, h, w) of the discovery images as the head sees them; final (k, D) the
    refined prototypes; nmf (k, D) the NMF parts; head_row (D,); scale (n,) the model's
    per-image factor on the maps (ones unless a normalisation follows the pooling). The
    held-out fields stay None here; discovery fills them in once the held-out images are read.
    ``final_maps``: the final prototypes' unscaled maps, when the caller has them already.
    """
    final = final.to(features)
    k = final.shape[0]
    signs = part_signs(torch.as_tensor(part_share, dtype=torch.float64)).tolist()
    raw = maps_of(features, final) if final_maps is None else final_maps
    fidelity, spec = fidelity_and_specificity(features, final, nmf, signs, final_maps=raw)
    shown = raw * scale[:, None, None, None]
    contributions = shown.mean(dim=(2, 3)).mean(0)
    iou, iou_per = _pair_mean(overlap_iou(shown))
    out = {
        "fidelity": fidelity,
        "specificity": spec,
        "part_share": [float(x) for x in part_share],
        "mean_contribution": contributions.tolist(),
        "cancellation": cancellation(contributions),
        "overlap_iou": iou,
        "overlap_iou_per_prototype": iou_per,
        "overlap_iou_random": random_overlap(features, head_row, k, scale, seeds) if k > 1 else None,
        "alpha_flags": alpha_flags(alpha),
        "fidelity_heldout": None,
        "specificity_heldout": None,
    }
    out["warnings"] = warnings_for(out)
    return out


def warnings_for(m: dict) -> list:
    """Plain-language warnings from a class's part metrics."""
    out = []
    for name, key in (("discovery", "specificity"), ("held-out", "specificity_heldout")):
        spec = m.get(key)
        if spec:
            weak = [i + 1 for i, s in enumerate(spec) if s <= WARNING_LIMITS["specificity"]]
            if weak:
                out.append(f"Prototype{'s' if len(weak) > 1 else ''} {', '.join(map(str, weak))} "
                           f"{'are' if len(weak) > 1 else 'is'} not specific on the {name} images: "
                           f"{'their maps look' if len(weak) > 1 else 'its map looks'} as much like another "
                           "part of the class as like its own.")
    if m.get("cancellation") is not None and m["cancellation"] < WARNING_LIMITS["cancellation"]:
        out.append(f"Contributions cancel: they sum to {m['cancellation']:.0%} of their total size, so large "
                   "positive and negative prototypes offset each other.")
    rnd = m.get("overlap_iou_random")
    if m.get("overlap_iou") is not None and rnd and m["overlap_iou"] >= rnd["mean"]:
        out.append(f"Parts collapse: the prototypes' top regions overlap (IoU {m['overlap_iou']:.2f}) as much as "
                   f"those of random directions summing to the head row (IoU {rnd['mean']:.2f}).")
    if m.get("refine_converged") is False:
        out.append(f"Refinement stopped at its iteration cap ({m.get('refine_iterations')}) before converging, so "
                   "these prototypes can move with rounding (thread count, device): raise --lbfgs-iter.")
    flags = m.get("alpha_flags") or []
    zero = [i + 1 for i, f in enumerate(flags) if f == "zero"]
    if zero:
        out.append(f"Prototype{'s' if len(zero) > 1 else ''} {', '.join(map(str, zero))} "
                   f"hold{'' if len(zero) > 1 else 's'} no NMF part (α = 0): "
                   f"{'they are' if len(zero) > 1 else 'it is'} only a share of the residual.")
    negative = [i + 1 for i, f in enumerate(flags) if f == "negative"]
    if negative:
        out.append(f"Prototype{'s' if len(negative) > 1 else ''} {', '.join(map(str, negative))} "
                   f"hold{'' if len(negative) > 1 else 's'} {'their' if len(negative) > 1 else 'its'} "
                   "NMF part with a negative weight (α < 0).")
    return out


def part_metrics_summary(records: Sequence[dict]) -> str:
    """A few lines for a terminal: the part metrics over a run's classes, warnings counted."""
    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    spec = [s for r in records for s in (r.get("specificity") or [])]
    held = [f for r in records for f in (r.get("fidelity_heldout") or [])]
    canc = [r.get("cancellation") for r in records if r.get("cancellation") is not None]
    iou = [r.get("overlap_iou") for r in records]
    rnd = [(r.get("overlap_iou_random") or {}).get("mean") for r in records]
    lines = [
        f"held-out fidelity: median {fmt(median(held))}" + (f", min {min(held):.3f}" if held else
                                                          " (no images held out; use --holdout-fraction 0.2, or "
                                                          "--held-out DIR to measure it on a folder you certify)"),
        f"specificity: median {fmt(median(spec))}, positive for {sum(s > 0 for s in spec)} of {len(spec)} prototypes",
        f"cancellation |sum c| / sum |c|: mean {fmt(sum(canc) / len(canc) if canc else None)}, "
        f"min {fmt(min(canc) if canc else None)}",
        f"top-region overlap (IoU): median {fmt(median(iou))}, random directions {fmt(median(rnd))}",
    ]
    warned = [r for r in records if r.get("warnings")]
    if warned:
        lines.append(f"warnings for {len(warned)} of {len(records)} classes (see each class record's warnings)")
    return "\n".join(lines)
