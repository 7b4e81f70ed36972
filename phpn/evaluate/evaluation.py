"""Evaluate a saved run: exactness, attribution axioms, deletion curves, and (with part
annotations) consistency and stability. The entry point the CLI and the app call.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from phpn.device import resolve_device
from phpn.errors import ConfigError, DataError
from phpn.evaluate import consistency as M
from phpn.evaluate import faithfulness as FA
from phpn.evaluate.explainers import NetworkExplainer, PrototypeExplainer
from phpn.evaluate.interpretability import interpretability_of
from phpn.evaluate.parts import PartDataset, is_cub_layout, load_cub_parts
from phpn.evaluate.separation import class_separation, summarise
from phpn.images.batches import load_batch
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess
from phpn.method.baselines import equal_split_prototypes, random_prototypes
from phpn.method.network import PrototypeNetwork
from phpn.progress import ProgressFn, report

DEFAULTS = dict(
    half_size=M.HALF_SIZE,  # box half-size in pixels at reference_size
    reference_size=M.REFERENCE_SIZE,
    threshold=M.THRESHOLD,
    sigma=M.SIGMA,
    clip=M.CLIP,  # the clipped stability variant; None computes only the unclipped one
    seed=0,
    parts_split="test",  # which split of the part-annotated dataset to score
    parts_images_per_class=None,  # cap per class for consistency/stability (None: all)
    images_per_class=8,  # images per class from --data for exactness and the axioms
    axiom_images=64,  # at most this many of them in total
    deletion=True,
    separation=True,  # peak purity and top-region overlap beside random directions and the equal split
    deletion_images_per_class=4,
    deletion_max_classes=20,  # classes spread evenly over the run's classes
    fractions=FA.FRACTIONS,
    fill=0.0,  # masked pixels, in normalised input space (0 = the mean colour)
    baselines=(),  # also score "nmf" (the NMF parts before refinement), "random", "equal"
    batch_size=32,
    device="auto",
)


def _jsonable(x):
    """Floats that JSON can hold (NaN/inf -> None), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _spread(items: Sequence[int], n: Optional[int]) -> list:
    items = list(items)
    if n is None or len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


class _Images:
    """Images per class for the faithfulness checks: from a CUB layout or an image folder."""

    def __init__(self, parts: Optional[PartDataset], root, folder, preprocess: Preprocess):
        self.parts, self.root, self.folder, self.preprocess = parts, root, folder, preprocess

    def classes(self) -> list:
        if self.parts is not None:
            return self.parts.class_indices
        return self.folder.class_indices

    def load(self, class_index: int, n: int) -> torch.Tensor:
        if self.parts is not None:
            idx = self.parts.by_class().get(class_index, [])[:n]
            x, _, _, _, _ = self.parts.load_batch(idx, self.preprocess)
            return x
        try:
            paths = self.folder.by_index(class_index).paths[:n]
        except DataError:
            return torch.empty(0)
        x, _, _ = load_batch(self.folder.root, paths, self.preprocess)
        return x


@torch.no_grad()
def exactness_and_axioms(net, split, run, images: torch.Tensor, batch_size: int = 32) -> dict:
    """Exactness against the split's own logits, completeness, map means, linearity."""
    classes = run.class_indices.tolist()
    device = net.prototypes.device
    errs = {"logit": 0.0, "completeness": 0.0, "map_mean": 0.0, "linearity": 0.0}
    agree, n, scale = 0, 0, 0.0
    merged = None
    if run.k >= 2:
        p = net.prototypes
        merged = PrototypeNetwork(split, torch.cat([p[:, :1] + p[:, 1:2], p[:, 2:]], dim=1), classes).to(device)
    for b in range(0, images.shape[0], batch_size):
        x = images[b:b + batch_size].to(device)
        feats = split.backbone(x)
        out = net.explain_features(feats, classes)
        ref = split.logits_from_features(feats.float())
        scale = max(scale, float(ref.abs().max()))
        errs["logit"] = max(errs["logit"], float((out.logits - ref).abs().max()))
        agree += int((out.logits.argmax(1) == ref.argmax(1)).sum())
        n += x.shape[0]
        errs["completeness"] = max(errs["completeness"], FA.completeness(out.contributions, out.logits,
                                                                         out.bias, classes))
        errs["map_mean"] = max(errs["map_mean"], FA.map_means(out.maps, out.contributions))
        if merged is not None:
            m2 = merged.explain_features(feats, classes).maps
            lin = FA.linearity(out.maps[:, :, 0], out.maps[:, :, 1], m2[:, :, 0])
            rest = float((m2[:, :, 1:] - out.maps[:, :, 2:]).abs().max()) if run.k > 2 else 0.0
            errs["linearity"] = max(errs["linearity"], lin, rest)
    head = run.head_error()
    # float32 arithmetic: errors relative to the size of the logits.
    tol = 1e-4 * max(1.0, scale)
    return {
        "images": n,
        "max_abs_logit_diff": errs["logit"],
        "max_logit": scale,
        "top1_agreement": 100.0 * agree / max(n, 1),
        "head_error_max": float(head.max()),
        "head_error_mean": float(head.mean()),
        "completeness_max_error": errs["completeness"],
        "map_mean_max_error": errs["map_mean"],
        "linearity_max_error": errs["linearity"] if merged is not None else None,
        "tolerance": tol,
        "passed": bool(n > 0 and errs["logit"] <= tol and agree == n and errs["completeness"] <= tol
                       and errs["map_mean"] <= tol and errs["linearity"] <= tol and float(head.max()) <= 1e-6),
    }


def deletion_of(explainer, images: _Images, classes: Sequence[int], *, per_class: int, fractions, fill: float,
                seed: int, device, progress: Optional[ProgressFn] = None) -> dict:
    g = torch.Generator().manual_seed(int(seed))
    per_proto = []
    for ci, c in enumerate(classes):
        report(progress, "deletion curves", ci, len(classes))
        x = images.load(c, per_class)
        if x.numel() == 0:
            continue
        res = FA.deletion_curves_of(explainer, x.to(device), c, fractions=fractions, fill=fill, generator=g)
        for i, p in enumerate(res["prototypes"]):
            per_proto.append({"class_index": int(c), "prototype": i, **p})
    report(progress, "deletion curves", len(classes), len(classes))
    return {"summary": FA.deletion_summary(per_proto), "prototypes": per_proto}


@torch.no_grad()
def separation_of(split, run, images: "_Images", classes: Sequence[int], *, per_class: int, device,
                  progress: Optional[ProgressFn] = None) -> dict:
    """Peak purity and top-region overlap of the run's prototypes and of both baselines (see
    :mod:`phpn.evaluate.separation`), per class and summarised with the random draws' spread."""
    rows = {int(c): i for i, c in enumerate(run.class_indices.tolist())}
    records = []
    for ci, c in enumerate(classes):
        report(progress, "separation", ci, len(classes))
        x = images.load(c, per_class)
        if x.numel() == 0:
            continue
        feats = split.backbone(x.to(device)).float()
        scores = class_separation(feats, run.prototypes[rows[int(c)]].float(), split.weight[int(c)].detach().float())
        records.append({"class_index": int(c), **scores})
    report(progress, "separation", len(classes), len(classes))
    return {"summary": summarise(records) if records else {}, "classes": records}


def evaluate_run(run, split, preprocess: Preprocess, data_root, parts_root=None, **params) -> dict:
    """Evaluate ``run`` (a :class:`phpn.runs.store.Run`) on the model ``split``.

    data_root: an image folder (one sub-folder per class) for exactness, the axioms and the
        deletion curves; or a CUB-layout root, which then also serves as ``parts_root``.
    parts_root: a CUB-layout part-annotated dataset for consistency and stability.
    params: see ``DEFAULTS`` (box half-size, threshold, noise, caps, device, progress=...).

    Returns a JSON-serialisable dict: ``summary`` (headline numbers), ``exactness``,
    ``interpretability`` (per prototype set: scores and per-prototype details),
    ``deletion`` (summary and per-prototype curves) and ``params``.
    """
    progress = params.pop("progress", None)
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"Unknown evaluation option(s): {', '.join(sorted(unknown))}.",
                          f"Known options: {', '.join(DEFAULTS)}.")
    p = {**DEFAULTS, **params}
    for b in p["baselines"]:
        if b not in ("nmf", "random", "equal"):
            raise ConfigError(f"Unknown baseline '{b}'.", "Choose among nmf, random, equal.")
    if not 0 < float(p["threshold"]) <= 1:
        raise ConfigError(f"threshold must be in (0, 1], got {p['threshold']}.", "")
    if float(p["half_size"]) <= 0 or float(p["sigma"]) < 0:
        raise ConfigError("half_size must be positive and sigma non-negative.", "")
    start = time.time()
    device = resolve_device(p["device"])
    net = run.network(split).to(device).eval()
    split.backbone.eval()
    classes = run.class_indices.tolist()

    data_root = Path(data_root) if data_root is not None else None
    parts = None
    if parts_root is None and data_root is not None and is_cub_layout(data_root):
        parts_root = data_root
    if parts_root is not None:
        parts = load_cub_parts(parts_root).select(p["parts_split"], classes=classes,
                                                   per_class=p["parts_images_per_class"], seed=p["seed"])
    if data_root is not None and is_cub_layout(data_root):
        images = _Images(parts, data_root, None, preprocess)
    elif data_root is not None:
        folder = scan_image_folder(data_root, class_names=run.model_info.get("class_names"),
                                   num_classes=split.num_classes, images_per_class=p["images_per_class"],
                                   seed=p["seed"])
        images = _Images(None, data_root, folder, preprocess)
    elif parts is not None:
        images = _Images(parts, parts_root, None, preprocess)
    else:
        raise DataError("No images to evaluate on.", "Give --data (an image folder) and/or --parts (a CUB folder).")

    # Exactness and axioms on a few images per class.
    report(progress, "exactness", 0, 1)
    avail = [c for c in classes if c in set(images.classes())]
    per = max(1, min(p["images_per_class"], math.ceil(p["axiom_images"] / max(len(avail), 1))))
    pool = [images.load(c, per) for c in _spread(avail, p["axiom_images"])]
    pool = [x for x in pool if x.numel()]
    if not pool:
        raise DataError("None of the run's classes has readable images in the data given.",
                        "Check that the folders match the model's classes.")
    pool = torch.cat(pool)[: p["axiom_images"]]
    exact = exactness_and_axioms(net, split, run, pool, p["batch_size"])
    report(progress, "exactness", 1, 1)

    # Consistency and stability.
    sets = {"refined": NetworkExplainer(net)}
    if "nmf" in p["baselines"]:
        sets["nmf"] = PrototypeExplainer(split, run.nmf_prototypes.to(device), classes)
    if "random" in p["baselines"]:
        sets["random"] = PrototypeExplainer(split, random_prototypes(split.weight, classes, run.k, p["seed"]).to(device),
                                            classes)
    if "equal" in p["baselines"]:
        sets["equal"] = PrototypeExplainer(split, equal_split_prototypes(split.weight, classes, run.k).to(device),
                                           classes)
    interp = {}
    if parts is not None:
        names = dict(enumerate(run.class_names))
        for name, explainer in sets.items():
            interp[name] = interpretability_of(
                explainer, parts, preprocess, classes, half_size=p["half_size"], reference_size=p["reference_size"],
                threshold=p["threshold"], sigma=p["sigma"], clip=p["clip"], seed=p["seed"],
                batch_size=p["batch_size"], device=device, progress=progress, class_names=names)

    deletion = None
    if p["deletion"]:
        deletion = deletion_of(sets["refined"], images, _spread(avail, p["deletion_max_classes"]),
                               per_class=p["deletion_images_per_class"], fractions=p["fractions"], fill=p["fill"],
                               seed=p["seed"], device=device, progress=progress)

    separation = None
    if p["separation"]:
        separation = separation_of(split, run, images, avail, per_class=p["images_per_class"], device=device,
                                   progress=progress)

    summary = {
        "exact": exact["passed"],
        "max_abs_logit_diff": exact["max_abs_logit_diff"],
        "top1_agreement": exact["top1_agreement"],
    }
    if "refined" in interp:
        summary["consistency"] = interp["refined"]["consistency"]
        for name, v in interp["refined"]["stability"].items():
            summary[f"stability_{name}"] = v
    if deletion is not None and deletion["summary"]:
        summary["deletion_mean_own_gap"] = deletion["summary"]["mean_own_gap"]
        summary["deletion_positive_gap_percent"] = deletion["summary"]["prototypes_with_positive_gap"]
    if separation is not None:
        for name, v in separation["summary"].items():
            summary[f"{name}_separates"] = v["separates"]
    out = {
        "kind": "phpn-evaluation",
        "version": 1,
        "run": {"path": str(run.path) if run.path else None, "classes": len(classes), "k": run.k,
                "settings": run.settings or None},
        "data_root": str(data_root) if data_root is not None else None,
        "parts_root": str(parts_root) if parts_root is not None else None,
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
        "summary": summary,
        "exactness": exact,
        "interpretability": interp,
        "deletion": deletion,
        "separation": separation,
        "seconds": round(time.time() - start, 2),
    }
    out["params"]["device"] = str(device)
    return _jsonable(out)


def summary_text(result: dict) -> str:
    """A few lines for a terminal: the headline numbers of :func:`evaluate_run`."""
    def pct(v):
        return "n/a" if v is None else f"{v:.1f}%"

    ex = result["exactness"]
    lines = [
        f"exactness: {'passed' if ex['passed'] else 'FAILED'} on {ex['images']} images "
        f"(max |logit diff| {ex['max_abs_logit_diff']:.2e}, top-1 agreement {pct(ex['top1_agreement'])}, "
        f"head error {ex['head_error_max']:.1e})",
        f"axioms: completeness {ex['completeness_max_error']:.1e}, map means {ex['map_mean_max_error']:.1e}, "
        f"linearity {'n/a (k = 1)' if ex['linearity_max_error'] is None else format(ex['linearity_max_error'], '.1e')}",
    ]
    for name, res in result.get("interpretability", {}).items():
        st = res["stability"]
        lines.append(f"{name}: consistency {pct(res['consistency'])}, stability {pct(st.get('unclipped'))} "
                     f"(clipped noise {pct(st.get('clipped'))}) over {res['classes']} classes, {res['images']} images")
    dl = result.get("deletion")
    if dl and dl.get("summary"):
        s = dl["summary"]
        lines.append(f"deletion: own region vs random, mean gap {s['mean_own_gap']:.2f} "
                     f"(positive for {s['prototypes_with_positive_gap']:.0f}% of prototypes)")
    sep = (result.get("separation") or {}).get("summary") or {}
    for name, s in sep.items():
        verdict = ("separates parts from both baselines" if s["separates"]
                   else "does NOT separate parts from the baselines")
        better = "higher" if s["higher_is_better"] else "lower"
        lines.append(f"{name.replace('_', ' ')}: phpn {s['phpn']:.3f}, random directions {s['random_mean']:.3f} "
                     f"± {s['random_std']:.3f}, equal split {s['equal']:.3f} ({better} is better): {verdict}")
    return "\n".join(lines)
