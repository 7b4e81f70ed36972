"""The pipeline: features -> NMF -> refinement -> a run.

Classes are processed in groups whose features fit a memory budget; each group is
factorised and refined as one batched problem, then only its prototypes, statistics and
top patches are kept, so memory stays bounded however many classes there are.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence

import torch

from . import __version__
from .data import ImageFolderData, Preprocess
from .device import resolve_device
from .errors import ConfigError, DataError
from .features import extract_features
from .models.head import HeadSplit, LoadedModel
from .nmf import NMFConfig, nmf
from .progress import ProgressFn, report
from .refine import RefineConfig, refine
from .runs import Run


@dataclass(frozen=True)
class DiscoveryConfig:
    k: int = 3
    images_per_class: Optional[int] = None  # cap per class (deterministic sample); None: all
    solver: str = "lbfgs"  # lbfgs | nelder-mead | none
    objective: str = "prototype"  # prototype | residual
    scaling: str = "lstsq"  # lstsq | nnls
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    top_patches: int = 6
    nmf_solver: str = "hals"  # hals | sklearn (the reference, class by class on the CPU)
    nmf_max_iter: int = 400
    nmf_tol: float = 1e-5
    lbfgs_iter: int = 100
    nelder_mead_evaluations: int = 2000
    subspace_rank: int = 128
    memory_budget_mb: int = 2048  # features held at once (per group of classes)
    # bfloat16 autocast for discovery features on CUDA only: rounding can shift which parts
    # are found and the run's statistics, never exactness (the decomposed network and the
    # certificate run the float32 backbone).
    autocast: bool = True
    classes: Optional[tuple] = None  # model class indices to decompose; None: every class with images

    def __post_init__(self):
        if not 1 <= self.k <= 20:
            raise ConfigError(f"k = {self.k} is out of range.", "Choose between 1 and 20 prototypes per class.")
        RefineConfig(solver=self.solver, objective=self.objective, scaling=self.scaling)  # validates names
        NMFConfig(k=self.k, solver=self.nmf_solver)
        if self.top_patches < 1:
            raise ConfigError("top_patches must be at least 1.", "")

    def nmf_config(self) -> NMFConfig:
        return NMFConfig(k=self.k, solver=self.nmf_solver, max_iter=self.nmf_max_iter, tol=self.nmf_tol, seed=self.seed)

    def refine_config(self) -> RefineConfig:
        return RefineConfig(solver=self.solver, objective=self.objective, scaling=self.scaling,
                            max_iter=self.lbfgs_iter, max_evaluations=self.nelder_mead_evaluations,
                            subspace_rank=self.subspace_rank, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d


def patch_box(position, grid, crop: int, scale: float = 2.0) -> list:
    """Box [x0, y0, x1, y1] in input pixels around a feature-grid cell, ``scale`` cells wide."""
    (row, col), (h, w) = position, grid
    cell_h, cell_w = crop / h, crop / w
    cy, cx = (row + 0.5) * cell_h, (col + 0.5) * cell_w
    half_h, half_w = scale * cell_h / 2, scale * cell_w / 2
    return [max(0, round(cx - half_w)), max(0, round(cy - half_h)), min(crop, round(cx + half_w)),
            min(crop, round(cy + half_h))]


def top_patches(maps: torch.Tensor, paths: Sequence[str], count: int, crop: int) -> list:
    """Per prototype, the ``count`` images where its map peaks highest (at most one patch per image).

    ``maps`` is (n, k, H, W) for one class; returns k lists of {path, score, position, box}.
    """
    n, k, h, w = maps.shape
    flat = maps.reshape(n, k, h * w)
    peak, where = flat.max(dim=2)  # (n, k)
    out = []
    for i in range(k):
        order = torch.argsort(peak[:, i], descending=True)[:count]
        entries = []
        for j in order.tolist():
            pos = divmod(int(where[j, i]), w)
            entries.append({"path": paths[j], "score": float(peak[j, i]), "position": list(pos),
                            "box": patch_box(pos, (h, w), crop)})
        out.append(entries)
    return out


def _groups(classes: list, per_class_bytes: list, budget: int) -> list:
    groups, current, size = [], [], 0
    for c, b in zip(classes, per_class_bytes):
        if current and size + b > budget:
            groups.append(current)
            current, size = [], 0
        current.append(c)
        size += b
    if current:
        groups.append(current)
    return groups


def _class_record(entry, feats: torch.Tensor, paths: list, refined, found, i: int, split: HeadSplit,
                  top: int, crop: int) -> dict:
    """What a run keeps of one class: the refinement's numbers, mean contributions, top patches."""
    pooled = feats.mean(dim=(2, 3))
    final = refined.prototypes[i].to(feats.device).float()
    maps = split.image_scale(pooled)[:, None, None, None] * torch.einsum("ndhw,kd->nkhw", feats, final)
    return {
        "index": entry.class_index,
        "folder": entry.folder,
        "images": len(paths),
        "alpha": refined.alpha[i].tolist(),
        "negative_alpha": int(refined.negative_alpha[i]),
        "residual_ratio": float(refined.residual_ratio[i]),
        "objective_before": float(refined.objective_before[i]),
        "objective_after": float(refined.objective_after[i]),
        "fidelity": refined.fidelity[i].tolist(),
        "nmf_relative_error": float(found.relative_error[i]),
        "mean_contribution": maps.mean(dim=(2, 3)).mean(0).tolist(),
        "top_patches": top_patches(maps, paths, top, crop),
        "paths": paths,
    }


def _model_record(loaded: LoadedModel, split: HeadSplit, feature_shape: tuple) -> dict:
    return {
        "arch": loaded.arch,
        "sha256": loaded.sha256,
        "source": loaded.source,
        "num_classes": split.num_classes,
        "class_names": list(loaded.class_names) if loaded.class_names else None,
        "feature_shape": list(feature_shape),
        "folded_norm": split.folded,
        "signed_features": split.signed_features,
        "feature_layer": split.feature_layer,
        "head_layer": split.head_layer,
    }


def discover(loaded: LoadedModel, split: HeadSplit, data: ImageFolderData, preprocess: Preprocess,
             config: DiscoveryConfig = DiscoveryConfig(), progress: Optional[ProgressFn] = None,
             data_label: Optional[str] = None) -> Run:
    """Decompose the head of ``split`` for every class of ``data`` (or ``config.classes``)."""
    device = resolve_device(config.device)
    started = time.perf_counter()
    timings = {"features_s": 0.0, "nmf_s": 0.0, "refine_s": 0.0}
    wanted = data.classes
    if config.classes is not None:
        wanted = [data.by_index(c) for c in config.classes]
    for entry in wanted:
        if entry.class_index >= split.num_classes:
            raise DataError(f"Class folder '{entry.folder}' maps to class {entry.class_index}, but the model has "
                            f"{split.num_classes} classes.", "Rename the folder or check the class-names file.")

    # Probe one image for the feature-map shape, to size the groups of classes.
    probe, kept, _ = extract_features(split, data.root, wanted[0].paths[:1], preprocess, device)
    if not kept:
        raise DataError(f"The first image of '{wanted[0].folder}' could not be read.", "Check the image folder.")
    _, d, h, w = probe.shape
    per_class = [len(c.paths) * h * w * d * 4 for c in wanted]
    groups = _groups(wanted, per_class, config.memory_budget_mb * 2 ** 20)
    total_images = sum(len(c.paths) for c in wanted)

    prototypes, nmf_protos, alphas, class_meta, skipped_all = [], [], [], [], list(data.skipped)
    images_done = classes_done = 0
    nmf_cfg, refine_cfg = config.nmf_config(), config.refine_config()
    report(progress, "features", 0, total_images)
    for group in groups:
        # 1. Features, class by class.
        t0 = time.perf_counter()
        feats, paths = [], []
        for entry in group:
            f, kept, bad = extract_features(split, data.root, entry.paths, preprocess, device, config.batch_size,
                                            autocast=config.autocast, progress=progress, stage="features",
                                            done_offset=images_done, total=total_images)
            images_done += len(entry.paths)
            skipped_all += bad
            if not kept:
                raise DataError(f"No image of class folder '{entry.folder}' could be read.", "Check its files.")
            feats.append(f)
            paths.append(kept)
        timings["features_s"] += time.perf_counter() - t0

        # 2. One padded batch: (B, N, D) with N = most positions of any class in the group.
        counts = torch.tensor([f.shape[0] * h * w for f in feats])
        n_max = int(counts.max())
        stacked = torch.zeros(len(group), n_max, d, device=device)
        for i, f in enumerate(feats):
            stacked[i, :counts[i]] = f.permute(0, 2, 3, 1).reshape(-1, d)
        # From here on each class's features are read back from the batch: one copy in memory.
        images_in = [f.shape[0] for f in feats]
        del feats
        nmf_input = stacked.clamp(min=0) if split.signed_features else stacked

        t0 = time.perf_counter()
        report(progress, "nmf", classes_done, len(wanted))
        # Ticks inside the solvers let a cancelling progress callback stop them promptly.
        found = nmf(nmf_input, nmf_cfg, counts, tick=lambda: report(progress, "nmf", classes_done, len(wanted)))
        timings["nmf_s"] += time.perf_counter() - t0
        if not bool(torch.isfinite(found.prototypes).all()):
            bad = [e.folder for e, ok in zip(group, torch.isfinite(found.prototypes).all(2).all(1).tolist()) if not ok]
            raise ConfigError(f"NMF failed numerically for the class folder(s) {', '.join(bad[:5])}.",
                              "Run discovery again with --nmf-solver sklearn (or on the CPU), and report the case.")
        report(progress, "nmf", classes_done + len(group), len(wanted))
        del nmf_input

        # 3. Scaling and refinement against the effective head rows.
        t0 = time.perf_counter()
        report(progress, "refine", classes_done, len(wanted))
        heads = split.weight.detach().to(device).float()[[e.class_index for e in group]]
        refined = refine(stacked, found.prototypes, heads, refine_cfg, counts,
                         tick=lambda: report(progress, "refine", classes_done, len(wanted)))
        timings["refine_s"] += time.perf_counter() - t0

        # 4. Per-class statistics and top patches from the final prototypes' maps.
        for i, entry in enumerate(group):
            class_feats = stacked[i, :counts[i]].reshape(images_in[i], h, w, d).permute(0, 3, 1, 2)
            class_meta.append(_class_record(entry, class_feats, paths[i], refined, found, i, split,
                                            config.top_patches, preprocess.crop))
        del stacked
        prototypes.append(refined.prototypes.cpu())
        nmf_protos.append(found.prototypes.float().cpu())
        alphas.append(refined.alpha.cpu())
        classes_done += len(group)
        report(progress, "refine", classes_done, len(wanted))

    timings["total_s"] = time.perf_counter() - started
    class_indices = torch.tensor([m["index"] for m in class_meta], dtype=torch.long)
    meta = {
        "phpn_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": _model_record(loaded, split, (d, h, w)),
        "preprocess": preprocess.to_dict(),
        "data": {"root": data_label or str(data.root), "skipped": [list(s) for s in skipped_all]},
        "config": config.to_dict(),
        "nmf": nmf_cfg.to_dict(),
        "refine": refine_cfg.to_dict(),
        "device": str(device),
        "timings": timings,
        "classes": class_meta,
    }
    return Run(prototypes=torch.cat(prototypes), nmf_prototypes=torch.cat(nmf_protos), alpha=torch.cat(alphas),
               class_indices=class_indices, head_rows=split.weight.detach().cpu()[class_indices].clone(),
               head_bias=split.bias.detach().cpu().clone(), meta=meta)
