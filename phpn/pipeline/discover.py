"""The pipeline: features -> NMF -> refinement -> a run.

Classes are processed in groups whose features fit a memory budget; each group is
factorised and refined as one batched problem, then only its prototypes, statistics and
top patches are kept, so memory stays bounded however many classes there are.

The images stream through once: decoding workers read ahead while the model runs, and with
``certify=True`` each batch is one forward pass of the whole model that yields both the
features at the cut and the model's own logits, so the certificate on the discovery images
costs a pooling and a matrix product. Finished groups can be saved (``progress_dir``) so an
interrupted discovery resumes, and groups can be shared out among torchrun ranks; both give
the same run, since a group's result depends only on the group.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

from phpn import __version__
from phpn import config as D
from phpn.device import check_device_name, resolve_device
from phpn.errors import ConfigError, DataError
from phpn.head import (
    NONNEGATIVE_FEATURES_NMF,
    SIGNED_FEATURES_NMF,
    HeadSplit,
    LoadedModel,
)
from phpn.images.batches import batch_decode_device, describe_decode, iter_batches, load_batch
from phpn.images.folders import ImageFolderData
from phpn.images.preprocess import Preprocess
from phpn.method.certify import CertificateAccumulator, checks_inside
from phpn.method.network import PrototypeNetwork, prototype_maps
from phpn.method.nmf import NMFConfig, NMFResult, nmf, suggest_k
from phpn.method.part_metrics import (
    class_part_metrics,
    fidelity_and_specificity,
    warnings_for,
)
from phpn.method.refine import RefineConfig, part_signs, refine
from phpn.models.doctor import feature_positions_problem
from phpn.pipeline.features import FeatureTap, backbone_features, prepare_backbone
from phpn.progress import ProgressFn, RepeatLast, report
from phpn.runs.resume import GroupResult, fingerprint, open_store
from phpn.runs.store import Run
from phpn.show.viz import similar_prototypes
from phpn.validation import check_at_least, check_seed


@dataclass(frozen=True)
class DiscoveryConfig:
    # Defaults from phpn.config, the table the CLI, the app and the API share.
    k: int = D.K
    images_per_class: Optional[int] = D.IMAGES_PER_CLASS  # cap per class (deterministic sample); None: all
    solver: str = D.SOLVER  # lbfgs | nelder-mead | none
    objective: str = D.OBJECTIVE  # prototype | residual
    scaling: str = D.SCALING  # lstsq | nnls
    seed: int = D.SEED
    device: str = D.DEVICE
    batch_size: int = D.BATCH_SIZE
    top_patches: int = D.TOP_PATCHES
    nmf_solver: str = D.NMF_SOLVER  # hals | sklearn (the reference, class by class on the CPU)
    nmf_max_iter: int = 400
    nmf_tol: float = 1e-5
    lbfgs_iter: int = D.LBFGS_ITER
    nelder_mead_evaluations: int = 2000
    subspace_rank: int = 128
    memory_budget_mb: int = 2048  # features held at once (per group of classes); 0: one class at a time
    # bfloat16 autocast for discovery features on CUDA only: rounding can shift which parts
    # are found and the run's statistics, never exactness (the decomposed network and the
    # certificate run the float32 backbone). A certificate taken from discovery's own pass
    # needs the model's float32 logits, so that pass runs in float32.
    autocast: bool = True
    classes: Optional[tuple] = None  # model class indices to decompose; None: every class with images
    contributions: str = D.CONTRIBUTION  # part: mean contributions held at the NMF parts' shares; free (see refine)
    ridge: float = 1e-2  # refinement's ridge on the residual split (makes the solution unique)
    norm: str = "zscore"  # how refinement compares maps: zscore (smooth, converges) | minmax (the paper's)
    suggest_k: Optional[int] = None  # also try k = 2..this per class and record the elbow of NMF's error
    auto_k: Optional[int] = None  # give each class its own k in 2..this, at the elbow of NMF's error (k is unused)
    nmf_data: str = D.NMF_DATA  # signed features: clamped (NMF on max(F, 0)) | signed (semi-NMF, P signed)
    holdout: float = D.HOLDOUT  # fraction of each class's images kept out of discovery, for held-out fidelity

    def __post_init__(self):
        if not D.K_MIN <= self.k <= D.K_MAX:
            raise ConfigError(f"k = {self.k} is out of range.", f"Choose between {D.K_MIN} and {D.K_MAX} prototypes per class.")
        RefineConfig(solver=self.solver, objective=self.objective, scaling=self.scaling,
                     contributions=self.contributions, ridge=self.ridge, norm=self.norm)  # validates names
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"The held-out fraction must be at least 0 and below 1, got {self.holdout}.",
                              "Use --holdout-fraction 0.2, for example, to keep a fifth of each class's images out of discovery.")
        NMFConfig(k=self.k, solver=self.nmf_solver, data=self.nmf_data)
        check_at_least("top patches", self.top_patches), check_at_least("L-BFGS iterations", self.lbfgs_iter)
        if self.suggest_k is not None:
            check_at_least("suggest_k", self.suggest_k, 2)
        if self.auto_k is not None and not 2 <= self.auto_k <= D.K_MAX:
            raise ConfigError(f"The largest automatic k must be between 2 and {D.K_MAX}, got {self.auto_k}.",
                              f"Use --k auto --k-max {D.AUTO_K_MAX}, for example.")
        check_seed(self.seed), check_at_least("batch size", self.batch_size), check_device_name(self.device)
        if self.images_per_class is not None:
            check_at_least("images per class", self.images_per_class)

    @property
    def width(self) -> int:
        """Prototype slots per class in the run: k, or with ``auto_k`` the largest k a class may get
        (a class with fewer prototypes has zero rows in its remaining slots)."""
        return self.auto_k or self.k

    def nmf_config(self) -> NMFConfig:
        return NMFConfig(k=self.k, solver=self.nmf_solver, max_iter=self.nmf_max_iter, tol=self.nmf_tol, seed=self.seed,
                         data=self.nmf_data)

    def refine_config(self) -> RefineConfig:
        return RefineConfig(solver=self.solver, objective=self.objective, scaling=self.scaling,
                            max_iter=self.lbfgs_iter, max_evaluations=self.nelder_mead_evaluations,
                            subspace_rank=self.subspace_rank, seed=self.seed, contributions=self.contributions,
                            ridge=self.ridge, norm=self.norm)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d


def resolve_k(k, k_max: Optional[int] = None, default_k: int = D.K) -> tuple:
    """(k, auto_k) for :class:`DiscoveryConfig` from a k that may be "auto" (each class its own
    k, 2..``k_max``, default ``AUTO_K_MAX``): the one home of that rule, for the CLI and the API."""
    if k == "auto":
        return default_k, k_max or D.AUTO_K_MAX
    if k_max is not None:
        raise ConfigError("A largest k (--k-max, auto_k) applies only to an automatic k.",
                          "Ask for k = auto (--k auto), or leave the largest k out.")
    return (default_k if k is None else k), None


def patch_box(position, grid, crop: int, scale: float = 2.0) -> list:
    """Box [x0, y0, x1, y1] in input pixels around a feature-grid cell, ``scale`` cells wide."""
    (row, col), (h, w) = position, grid
    cell_h, cell_w = crop / h, crop / w
    cy, cx = (row + 0.5) * cell_h, (col + 0.5) * cell_w
    half_h, half_w = scale * cell_h / 2, scale * cell_w / 2
    return [max(0, round(cx - half_w)), max(0, round(cy - half_h)), min(crop, round(cx + half_w)),
            min(crop, round(cy + half_h))]


PATCH_MIN_STRENGTH = 0.1  # a patch must peak at >= this fraction of the prototype's strongest patch
PATCH_DUPLICATE_COSINE = 0.98  # patches whose features are this similar show the same thing: keep one


def top_patches(maps: torch.Tensor, paths: Sequence[str], count: int, crop: int,
                features: Optional[torch.Tensor] = None, min_strength: float = PATCH_MIN_STRENGTH,
                duplicate_cosine: float = PATCH_DUPLICATE_COSINE, signs: Optional[Sequence[float]] = None) -> list:
    """Per prototype, up to ``count`` images where its map peaks highest (at most one patch per image).

    ``maps`` is (n, k, H, W) for one class; returns k lists of {path, score, position, box}.
    Images where the prototype barely fires (peak ≤ 0 or below ``min_strength`` of its highest
    peak) are skipped, and with ``features`` (n, D, H, W) a patch whose feature vector is within
    ``duplicate_cosine`` of one already kept (a near-identical crop) is skipped too. A prototype
    whose sign is −1 (its part counts against the class) is shown where it subtracts most.
    """
    n, k, h, w = maps.shape
    flat = maps.reshape(n, k, h * w)
    if signs is not None:
        flat = flat * torch.as_tensor(signs, dtype=flat.dtype, device=flat.device)[None, :, None]
    peak, where = flat.max(dim=2)  # (n, k)
    cells = None
    if features is not None:
        cells = torch.nn.functional.normalize(features.reshape(n, features.shape[1], h * w).float(), dim=1)
    out = []
    for i in range(k):
        order = torch.argsort(peak[:, i], descending=True).tolist()
        best = float(peak[order[0], i]) if order else 0.0
        entries, kept_vectors = [], []
        for j in order:
            if len(entries) == count:
                break
            score = float(peak[j, i])
            if score <= 0 or score < min_strength * best:
                break  # sorted: every later image fires less
            if cells is not None:
                vector = cells[j, :, int(where[j, i])]
                if any(float(vector @ other) >= duplicate_cosine for other in kept_vectors):
                    continue
                kept_vectors.append(vector)
            pos = divmod(int(where[j, i]), w)
            entries.append({"path": paths[j], "score": float(maps[j, i, pos[0], pos[1]]), "position": list(pos),
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


def hold_out(wanted: list, fraction: float) -> tuple:
    """Keep the last ``round(fraction · n)`` images of each class out of discovery (at least one
    image stays for discovery). Returns (classes with their discovery images, {class index: held-out paths})."""
    kept, held = [], {}
    for entry in wanted:
        n = len(entry.paths)
        count = min(int(round(fraction * n)), n - 1) if fraction > 0 else 0
        held[entry.class_index] = list(entry.paths[n - count:]) if count else []
        kept.append(replace(entry, paths=list(entry.paths[:n - count])) if count else entry)
    return kept, held


HELDOUT_FRACTION = "images held back from each class folder (--holdout-fraction)"
HELDOUT_FOLDER = "the held-out folder that was certified (--held-out)"


def add_heldout_metrics(records: list, run: Run, root, held_paths: dict, preprocess: Preprocess, forward,
                        batch_size: int, workers: Optional[int] = None, pin_memory: bool = False,
                        decode: str = "cpu", device=None) -> None:
    """Fidelity and specificity of each class's prototypes on its held-out images, into its record."""
    for row, record in enumerate(records):
        paths = held_paths.get(record["index"]) or []
        chunks, kept = [], []
        for x, ok, _ in iter_batches(root, paths, preprocess, batch_size, workers, pin_memory, decode, device):
            if ok:
                chunks.append(forward(x)[0].float())
                kept += ok
        set_heldout_metrics(record, run, row, torch.cat(chunks) if chunks else None, kept)


def set_heldout_metrics(record: dict, run: Run, row: int, feats: Optional[torch.Tensor], paths: list) -> None:
    """One class's held-out fields from its held-out images' features (n, D, h, w), or None."""
    record["heldout_images"] = len(paths)
    record["heldout_paths"] = list(paths)
    if feats is None:
        return
    signs = part_signs(torch.tensor(record["part_share"], dtype=torch.float64)).tolist()
    k = len(signs)  # the class's own k (fewer than the run's slots with an automatic k)
    fid, spec = fidelity_and_specificity(feats, run.prototypes[row, :k].to(feats),
                                         run.nmf_prototypes[row, :k].to(feats), signs)
    record["fidelity_heldout"], record["specificity_heldout"] = fid, spec
    record["warnings"] = warnings_for(record)


def _class_record(entry, feats: torch.Tensor, paths: list, refined, found, i: int, split: HeadSplit,
                  top: int, crop: int) -> dict:
    """What a run keeps of one class: the refinement's numbers, part metrics, top patches."""
    pooled = feats.mean(dim=(2, 3))
    final = refined.prototypes[i].to(feats.device).float()
    scale = split.image_scale(pooled)
    raw = prototype_maps(feats, final)  # computed once: the metrics and the top patches both read it
    maps = raw * scale.to(raw)[:, None, None, None]
    metrics = class_part_metrics(feats, final, found.prototypes[i].to(feats), split.weight[entry.class_index],
                                 scale, refined.alpha[i].tolist(), refined.part_share[i].tolist(), final_maps=raw)
    return {
        "index": entry.class_index,
        "folder": entry.folder,
        "images": len(paths),
        "alpha": refined.alpha[i].tolist(),
        "negative_alpha": int(refined.negative_alpha[i]),
        "residual_ratio": float(refined.residual_ratio[i]),
        "objective_before": float(refined.objective_before[i]),
        "objective_after": float(refined.objective_after[i]),
        "nmf_relative_error": float(found.relative_error[i]),
        "refine_iterations": int(refined.iterations[i]),
        "refine_converged": bool(refined.converged[i]),
        **metrics,
        "top_patches": top_patches(maps, paths, top, crop, features=feats,
                                   signs=part_signs(torch.tensor(metrics["part_share"])).tolist()),
        "paths": paths,
    }


SIGNED_FEATURES_SEMI_NMF = ("the features can be negative, and semi-NMF factorises them as they are (encodings "
                            "non-negative, parts signed); the prototypes still sum exactly to each head row")


def _model_record(loaded: LoadedModel, split: HeadSplit, feature_shape: tuple, nmf_data: str = "clamped") -> dict:
    return {
        "arch": loaded.arch,
        "sha256": loaded.sha256,
        "source": loaded.source,
        "num_classes": split.num_classes,
        "class_names": list(loaded.class_names) if loaded.class_names else None,
        "feature_shape": list(feature_shape),
        "folded_norm": split.folded,
        "signed_features": split.signed_features,
        "nmf_input": (SIGNED_FEATURES_SEMI_NMF if nmf_data == "signed" else SIGNED_FEATURES_NMF)
        if split.signed_features else NONNEGATIVE_FEATURES_NMF,
        "feature_layer": split.feature_layer,
        "head_layer": split.head_layer,
    }


def _wanted(data: ImageFolderData, config: DiscoveryConfig, split: HeadSplit) -> list:
    wanted = data.classes
    if config.classes is not None:
        wanted = [data.by_index(c) for c in config.classes]
    for entry in wanted:
        if entry.class_index >= split.num_classes:
            raise DataError(f"Class folder '{entry.folder}' maps to class {entry.class_index}, but the model has "
                            f"{split.num_classes} classes.", "Rename the folder or check the class-names file.")
    if not wanted:
        raise DataError("No class to decompose.", "Check --classes and the image folder.")
    if len({e.class_index for e in wanted}) != len(wanted):
        raise ConfigError("A class is listed twice in the classes to decompose.", "List each class once.")
    return wanted


def _probe(data: ImageFolderData, entry, preprocess: Preprocess, forward) -> tuple:
    """(D, H, W) of the feature map, from the first readable image of ``entry``."""
    for rel in entry.paths[:5]:
        batch, kept, _ = load_batch(data.root, [rel], preprocess)
        if kept:
            return tuple(forward(batch)[0].shape[1:])
    raise DataError(f"The first images of '{entry.folder}' could not be read.", "Check the image folder.")


def plan_groups(wanted: list, feature_shape: tuple, budget_mb: int) -> list:
    """Classes in order, cut into groups whose features fit ``budget_mb``. The groups decide the
    result (each is factorised and refined as one batch), so resuming and sharding reuse them."""
    if budget_mb < 0:  # 0: one class at a time
        raise ConfigError(f"The memory budget cannot be negative, got {budget_mb} MB.",
                          "Use --memory-budget 2048, for example (0: one class at a time).")
    d, h, w = feature_shape
    return _groups(wanted, [len(c.paths) * h * w * d * 4 for c in wanted], budget_mb * 2 ** 20)


class _Features:
    """Per batch: (features, model logits or None), with the certificate's pass when asked."""

    tick = None  # called between layers (a cancel stops a forward pass mid-batch)

    def __init__(self, loaded: LoadedModel, split: HeadSplit, device: torch.device, config: DiscoveryConfig,
                 certify: bool):
        self.device, self.autocast = device, config.autocast
        self.tap = FeatureTap(split, loaded.model, device) if certify else None
        self.backbone = None if certify else prepare_backbone(split, device)

    def __call__(self, images: torch.Tensor):
        modules = [self.tap.model, self.tap.backbone] if self.tap is not None else [self.backbone]
        with checks_inside(modules, self.tick) if self.tick is not None else contextlib.nullcontext():
            if self.tap is not None:
                return self.tap(images)
            return backbone_features(self.backbone, images, self.device, self.autocast), None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _factorise_group(g: int, group: list, stacked: torch.Tensor, counts: torch.Tensor, images_in: list,
                     paths: list, shape: tuple, split: HeadSplit, config: DiscoveryConfig, preprocess: Preprocess,
                     progress, classes_done: int, classes_total: int, device: torch.device, timings: dict) -> tuple:
    """NMF, refinement and per-class records of one group from its padded features (B, N, D).

    With ``auto_k`` each class gets its own k; classes of equal k are factorised and refined
    together, and the group's tensors are padded with zero prototypes to the run's width
    (zero rows add nothing to a logit, so the sum stays exact)."""
    d, h, w = shape
    nmf_input = stacked.clamp(min=0) if split.signed_features and config.nmf_data == "clamped" else stacked
    # NMF factorises the group's classes together: its bar moves by the share of the iteration
    # budget spent (classes stop early, so it may then jump to done), never past the group's end.
    tries = max(1, (config.auto_k or config.suggest_k or 2) - 1)  # suggesting k factorises at k = 2, 3, ...
    nmf_budget = max(1, (config.nmf_config().max_iter + NMFConfig().polish_iter) * tries)
    nmf_ticks = [0]

    def nmf_tick():
        nmf_ticks[0] += 1
        report(progress, "nmf", classes_done + min(len(group) - 1, len(group) * nmf_ticks[0] // nmf_budget),
               classes_total)

    t0 = time.perf_counter()
    report(progress, "nmf", classes_done, classes_total)
    k_most = config.auto_k or config.suggest_k
    suggestions, tried = (suggest_k(nmf_input, config.nmf_config(), counts, k_most, nmf_tick, keep=True)
                          if k_most else (None, {}))
    ks = [s[0] for s in suggestions] if config.auto_k else [config.k] * len(group)
    width = config.width
    prototypes = torch.zeros(len(group), width, d, dtype=torch.float64)
    nmf_prototypes = torch.zeros(len(group), width, d)
    alpha = torch.zeros(len(group), width, dtype=torch.float64)
    records = [None] * len(group)
    heads = split.weight.detach().to(device).float()[[e.class_index for e in group]]
    timings["nmf_s"] = timings["refine_s"] = 0.0
    refined_rows = 0
    for k in sorted(set(ks)):
        rows = [i for i, kk in enumerate(ks) if kk == k]
        whole = len(rows) == len(group)
        pick = torch.tensor(rows, device=stacked.device)
        sub_counts = counts if whole else counts[pick.cpu()]
        if config.auto_k:  # the factorisation the class's error curve was made of, not a second one
            found = _rows_of(tried[k], pick)
        else:  # ticks inside the solvers let a cancelling progress callback stop them promptly
            found = nmf(nmf_input if whole else nmf_input[pick], replace(config.nmf_config(), k=k), sub_counts,
                        tick=nmf_tick)
        _sync(device)
        timings["nmf_s"] += time.perf_counter() - t0
        if k == max(ks):  # the group's last factorisation: NMF is done before its refinement reports
            report(progress, "nmf", classes_done + len(group), classes_total)
        if not bool(torch.isfinite(found.prototypes).all()):
            ok = torch.isfinite(found.prototypes).all(2).all(1).tolist()
            bad = [group[i].folder for i, fine in zip(rows, ok) if not fine]
            raise ConfigError(f"NMF failed numerically for the class folder(s) {', '.join(bad[:5])}.",
                              "Run discovery again with --nmf-solver sklearn (or on the CPU), and report the case.")
        t0 = time.perf_counter()
        report(progress, "refine", classes_done, classes_total)
        sub_feats = stacked if whole else stacked[pick]
        usage = found.encodings.sum(1) / sub_counts.to(found.encodings)[:, None]  # each part's mean encoding
        # The refinement's bar moves class by class, as each class's solver stops (ticks repeat it).
        at = [classes_done + refined_rows]

        def solved(n, before=at[0], at=at):
            at[0] = before + n
            report(progress, "refine", at[0], classes_total)

        refined = refine(sub_feats, found.prototypes, heads if whole else heads[pick], config.refine_config(),
                         sub_counts, tick=lambda at=at: report(progress, "refine", at[0], classes_total),
                         usage=usage, solved=solved)
        refined_rows += len(rows)
        _sync(device)
        timings["refine_s"] += time.perf_counter() - t0
        for j, i in enumerate(rows):
            class_feats = stacked[i, :counts[i]].reshape(images_in[i], h, w, d).permute(0, 3, 1, 2)
            records[i] = _class_record(group[i], class_feats, paths[i], refined, found, j, split,
                                       config.top_patches, preprocess.crop)
            records[i]["k"] = k
        prototypes[rows, :k] = refined.prototypes.cpu()
        nmf_prototypes[rows, :k] = found.prototypes.float().cpu()
        alpha[rows, :k] = refined.alpha.cpu()
        del sub_feats
        t0 = time.perf_counter()
    del nmf_input
    for record, (k, reason, errors) in zip(records, suggestions or []):
        record["k_suggested"], record["k_reason"], record["k_relative_errors"] = k, reason, errors
    return records, prototypes, nmf_prototypes, alpha


def _rows_of(found: NMFResult, rows: torch.Tensor) -> NMFResult:
    """Some classes' rows of a batched NMF result."""
    rows = rows.to(found.prototypes.device)
    return replace(found, prototypes=found.prototypes[rows], encodings=found.encodings[rows],
                   error=found.error[rows], relative_error=found.relative_error[rows])


def _stream_groups(todo: list, groups: list, data: ImageFolderData, preprocess: Preprocess, forward, shape: tuple,
                   split: HeadSplit, config: DiscoveryConfig, device: torch.device, progress, workers,
                   images_total: int, images_done: int, classes_total: int, classes_done: dict,
                   decode: str = "cpu"):
    """Yield a GroupResult per group index in ``todo``, in order, from one stream of decoded batches.

    Features go straight into their group's padded (B, N, D) batch; a group is factorised as
    soon as its last image has passed, while the decoding workers read ahead.
    """
    d, h, w = shape
    certify = isinstance(forward, _Features) and forward.tap is not None
    where, order = {}, []
    for g in todo:
        for ci, entry in enumerate(groups[g]):
            for rel in entry.paths:
                where[rel] = (g, ci)
                order.append(rel)
    pending = {g: sum(len(e.paths) for e in groups[g]) for g in todo}
    state = {}

    def open_group(g):
        """The group's padded (B, N, D) batch, allocated once, when its first image arrives."""
        if g not in state:
            group = groups[g]
            n_max = max(len(e.paths) for e in group) * h * w
            state[g] = {"stacked": torch.zeros(len(group), n_max, d, device=device), "rows": [0] * len(group),
                        "paths": [[] for _ in group], "pooled": [], "logits": [], "labels": [], "skipped": []}
        return state[g]

    def add(g, ci, feats, rels, pooled, logits):
        s = open_group(g)
        n = feats.shape[0] * h * w
        s["stacked"][ci, s["rows"][ci]:s["rows"][ci] + n] = feats.permute(0, 2, 3, 1).reshape(-1, d)
        s["rows"][ci] += n
        s["paths"][ci] += rels
        if pooled is not None:
            s["pooled"].append(pooled)
            s["logits"].append(logits)
            s["labels"].append(torch.full((feats.shape[0],), groups[g][ci].class_index, dtype=torch.long))

    wait = fwd = cert = 0.0
    next_todo = 0
    batches = iter(iter_batches(data.root, order, preprocess, config.batch_size, workers, device.type == "cuda",
                                decode, device))
    report(progress, "features", images_done, images_total)
    while next_todo < len(todo):
        t0 = time.perf_counter()
        item = next(batches, None)
        wait += time.perf_counter() - t0
        if item is None:
            break
        x, kept, bad = item
        for rel, why in bad:
            g, _ = where[rel]
            open_group(g)["skipped"].append((rel, why))
            pending[g] -= 1
        if kept:
            t0 = time.perf_counter()
            feats, logits = forward(x)
            _sync(device)
            fwd += time.perf_counter() - t0
            t0 = time.perf_counter()
            pooled = feats.mean(dim=(2, 3)).cpu() if certify else None
            logits = logits.cpu() if certify else None
            cert += time.perf_counter() - t0
            t0 = time.perf_counter()  # placing the features in their groups' batches counts as features
            start = 0
            for j in range(1, len(kept) + 1):  # consecutive rows of one class go in together
                if j == len(kept) or where[kept[j]] != where[kept[start]]:
                    g, ci = where[kept[start]]
                    add(g, ci, feats[start:j], kept[start:j], pooled[start:j] if certify else None,
                        logits[start:j] if certify else None)
                    pending[g] -= j - start
                    start = j
            del feats
            _sync(device)
            fwd += time.perf_counter() - t0
        images_done += len(kept) + len(bad)
        report(progress, "features", images_done, images_total)
        while next_todo < len(todo) and pending[todo[next_todo]] == 0:
            g = todo[next_todo]
            s = open_group(g)
            del state[g]
            group = groups[g]
            empty = [e.folder for e, p in zip(group, s["paths"]) if not p]
            if empty:
                raise DataError(f"No image of class folder '{empty[0]}' could be read.", "Check its files.")
            timings = {"decode_wait_s": wait, "features_s": fwd}
            counts = torch.tensor(s["rows"])
            done_before = classes_done["n"]
            records, protos, nmf_protos, alpha = _factorise_group(
                g, group, s["stacked"], counts, [len(p) for p in s["paths"]], s["paths"], shape, split, config,
                preprocess, progress, done_before, classes_total, device, timings)
            del s["stacked"]
            classes_done["n"] += len(group)
            report(progress, "refine", classes_done["n"], classes_total)
            t0 = time.perf_counter()
            empty_d = torch.empty(0, d)
            result = GroupResult(
                index=g, records=records, prototypes=protos, nmf_prototypes=nmf_protos, alpha=alpha,
                pooled=torch.cat(s["pooled"]) if s["pooled"] else empty_d,
                logits=torch.cat(s["logits"]) if s["logits"] else torch.empty(0, split.num_classes),
                labels=torch.cat(s["labels"]) if s["labels"] else torch.empty(0, dtype=torch.long),
                skipped=s["skipped"], timings=timings)
            timings["certify_s"] = cert + time.perf_counter() - t0
            wait = fwd = cert = 0.0
            next_todo += 1
            yield result


def add_similar_prototypes(records: list, prototypes: torch.Tensor, class_indices: torch.Tensor,
                           device: torch.device) -> None:
    """Each record's "shared parts" (``similar_prototypes``), computed while every prototype is
    in memory, so that showing one class of a saved run needs its shard only."""
    found = similar_prototypes(prototypes, class_indices, device=device)
    for record, similar in zip(records, found):
        record["similar_prototypes"] = similar[:record.get("k", prototypes.shape[1])]


def discovery_key(loaded: LoadedModel, split: HeadSplit, preprocess: Preprocess, config: DiscoveryConfig,
                  groups: list, shape: tuple, certify: bool) -> str:
    """What decides a discovery's result: a resumed or sharded discovery must agree on it."""
    settings = config.to_dict()
    settings.pop("device", None)
    return fingerprint({"version": __version__, "model": loaded.sha256, "arch": loaded.arch,
                        "cut": [split.feature_layer, split.head_layer], "preprocess": preprocess.to_dict(),
                        "config": settings, "shape": list(shape), "certify": certify,
                        "groups": [[(e.class_index, e.folder, list(e.paths)) for e in g] for g in groups]})


def certificate_from_results(split: HeadSplit, prototypes: torch.Tensor, class_indices: torch.Tensor,
                             head_error: torch.Tensor, parts: Sequence[tuple], device: torch.device,
                             progress: Optional[ProgressFn] = None, chunk: int = 4096):
    """The certificate from pooled features and the model's own logits captured in discovery's pass,
    ``parts`` [(pooled (n, D), logits (n, C), labels (n,))] group by group (never concatenated):
    the decomposed network's logits for a pooled vector z are those of the map z (1×1)."""
    network = PrototypeNetwork(split, prototypes, class_indices)
    network.prototypes = network.prototypes.to(device)
    for name in ("class_indices", "head_weight", "head_bias"):
        setattr(network, name, getattr(network, name).to(device))
    acc = CertificateAccumulator()
    total, done = sum(p[0].shape[0] for p in parts), 0
    with torch.inference_mode():
        for pooled, logits, labels in parts:
            for start in range(0, pooled.shape[0], chunk):
                z = pooled[start:start + chunk].to(device)
                ours = network.explain_features(z[:, :, None, None], classes=[], with_maps=False).logits
                acc.add(logits[start:start + chunk].to(device), ours, labels[start:start + chunk].to(device))
                done += z.shape[0]
                report(progress, "certify", done, total)
    return acc.certificate(head_error)


def discover(loaded: LoadedModel, split: HeadSplit, data: ImageFolderData, preprocess: Preprocess,
             config: DiscoveryConfig = DiscoveryConfig(), progress: Optional[ProgressFn] = None,
             data_label: Optional[str] = None, *, certify: bool = False, held_out: Optional[ImageFolderData] = None,
             progress_dir=None, resume: bool = False, workers: Optional[int] = None, shard=None,
             decode: str = D.DECODE) -> Run:
    """Decompose the head of ``split`` for every class of ``data`` (or ``config.classes``).

    ``certify``: one forward pass of the whole model per batch gives the features and the
    model's own logits, and the run's certificate is computed from them (plus ``held_out``
    images, certified separately). ``progress_dir``: each finished group of classes is saved
    there, and with ``resume`` the groups already saved are not redone. ``workers``: decoding
    processes (None: from the cores). ``decode``: where JPEGs are decoded (data.DECODES).
    ``shard``: a :class:`phpn.pipeline.distributed.Shard`; each rank does every world-th group and rank 0
    gathers and returns the run (other ranks return None).
    """
    device = resolve_device(config.device)
    batch_decode_device(decode, device)  # a bad decode mode fails before any work
    started = time.perf_counter()
    wanted, held_paths = hold_out(_wanted(data, config, split), config.holdout)
    forward = _Features(loaded, split, device, config, certify)
    if progress is not None:
        progress = RepeatLast(progress)
        forward.tick = progress.repeat
    shape = _probe(data, wanted[0], preprocess, forward)
    problem = feature_positions_problem(shape, k=2 if config.auto_k else config.k,
                                        class_images={e.folder: len(e.paths) for e in wanted})
    if problem is not None:  # before any heavy work: the CLI, the app and the API all stop here
        raise problem
    if certify and forward.tap.anchors is None:
        warnings.warn(f"The certificate takes a second forward pass: {forward.tap.mode}.")
    groups = plan_groups(wanted, shape, config.memory_budget_mb)
    key = discovery_key(loaded, split, preprocess, config, groups, shape, certify)
    rank, world = (shard.rank, shard.world) if shard is not None else (0, 1)
    if shard is not None:
        shard.agree(key)
    store = open_store(Path(progress_dir) if progress_dir is not None else None, key, resume) if rank == 0 or \
        progress_dir is None else None
    if shard is not None:
        shard.barrier()  # rank 0 has set up the progress folder
        if store is None and progress_dir is not None:
            store = open_store(Path(progress_dir), key, True)
    results = {g: r for g, r in (store.finished() if store is not None else {}).items() if g % world == rank}
    todo = [g for g in range(len(groups)) if g % world == rank and g not in results]
    images_total = sum(len(e.paths) for g in todo for e in groups[g])
    classes_total = sum(len(groups[g]) for g in todo)
    for result in _stream_groups(todo, groups, data, preprocess, forward, shape, split, config, device, progress,
                                 workers, images_total, 0, classes_total, {"n": 0}, decode):
        if store is not None:
            store.save(result)
        results[result.index] = result
    if shard is not None:
        results = shard.gather(results)
        if rank != 0:
            return None
    ordered = [results[g] for g in range(len(groups))]

    timings = {name: sum(r.timings.get(name, 0.0) for r in ordered)
               for name in ("decode_wait_s", "features_s", "nmf_s", "refine_s", "certify_s")}
    class_meta = [m for r in ordered for m in r.records]
    # With an automatic k the run keeps as many slots as its largest class needs.
    width = max(m.get("k", config.width) for m in class_meta)
    prototypes = torch.cat([r.prototypes[:, :width] for r in ordered])
    class_indices = torch.tensor([m["index"] for m in class_meta], dtype=torch.long)
    run = Run(prototypes=prototypes, nmf_prototypes=torch.cat([r.nmf_prototypes[:, :width] for r in ordered]),
              alpha=torch.cat([r.alpha[:, :width] for r in ordered]), class_indices=class_indices,
              head_rows=split.weight.detach().cpu()[class_indices].clone(),
              head_bias=split.bias.detach().cpu().clone(), meta={})
    add_similar_prototypes(class_meta, prototypes, class_indices, device)
    skipped_all = list(data.skipped) + [s for r in ordered for s in r.skipped]
    if any(held_paths.values()):
        add_heldout_metrics(class_meta, run, data.root, held_paths, preprocess, forward, config.batch_size, workers,
                            device.type == "cuda", decode, device)
    meta = {
        "phpn_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Without names of its own, the model's classes are named by the folders when they name them.
        "model": _model_record(replace(loaded, class_names=loaded.class_names or data.class_names), split, shape,
                               config.nmf_data),
        "preprocess": preprocess.to_dict(),
        "data": {"root": data_label or str(data.root), "skipped": [list(s) for s in skipped_all],
                 "class_mapping": data.class_mapping, "decode": describe_decode(batch_decode_device(decode, device)),
                 # where the class records' held-out images come from (their heldout_paths)
                 "heldout_from": HELDOUT_FRACTION if any(held_paths.values()) else None},
        "config": config.to_dict(),
        "nmf": config.nmf_config().to_dict(),
        "refine": config.refine_config().to_dict(),
        "device": str(device),
        # The certificate's one pass runs float32; without it CUDA features may be bfloat16.
        "features_dtype": "bfloat16" if not certify and config.autocast and device.type == "cuda" else "float32",
        "groups": len(groups),
        "ranks": world,
        "timings": timings,
        "classes": class_meta,
    }
    if certify:
        t0 = time.perf_counter()
        head_error = run.head_error()
        cert = certificate_from_results(split, prototypes, class_indices, head_error,
                                        [(r.pooled, r.logits, r.labels) for r in ordered], device, progress)
        timings["certify_s"] += time.perf_counter() - t0
        cert.seconds = round(timings["certify_s"], 3)
        meta["certificate"] = cert.to_dict()
        meta["certificate"]["pass"] = forward.tap.mode
        if held_out is not None:
            # Without images held back from discovery, the certified folder gives the held-out metrics,
            # from the same pass.
            seen = {} if not any(held_paths.values()) else None
            meta["certificate_held_out"] = certify_images(forward, split, run, held_out, preprocess, config,
                                                          device, progress, workers, decode, collect=seen).to_dict()
            for row, record in enumerate(class_meta if seen is not None else []):
                feats, paths = seen.get(record["index"], ([], []))
                set_heldout_metrics(record, run, row, torch.cat(feats) if feats else None, paths)
            if seen is not None:
                meta["data"]["heldout_from"] = HELDOUT_FOLDER
    timings["total_s"] = time.perf_counter() - started
    run.meta = meta
    return run


def certify_images(forward: "_Features", split: HeadSplit, run: Run, data: ImageFolderData, preprocess: Preprocess,
                   config: DiscoveryConfig, device: torch.device, progress=None, workers=None, decode: str = "cpu",
                   collect: Optional[dict] = None):
    """The certificate on other images (held out from discovery), one tapped pass per batch.
    ``collect``: filled with {class index: ([features (n, D, h, w)], [paths])} of the read images."""
    label_of = {rel: c.class_index for c in data.classes for rel in c.paths}
    order = list(label_of)
    pooled, logits, labels = [], [], []
    done = 0
    for x, kept, bad in iter_batches(data.root, order, preprocess, config.batch_size, workers, device.type == "cuda",
                                     decode, device):
        if kept:
            feats, lg = forward(x)
            pooled.append(feats.mean(dim=(2, 3)).cpu())
            logits.append(lg.cpu())
            labels.append(torch.tensor([label_of[r] for r in kept]))
            if collect is not None:
                for i, rel in enumerate(kept):
                    chunks, paths = collect.setdefault(label_of[rel], ([], []))
                    chunks.append(feats[i:i + 1].float().cpu())
                    paths.append(rel)
        done += len(kept) + len(bad)
        report(progress, "certify", done, len(order))
    if not pooled:
        raise DataError("None of the held-out images could be read.", "Check the held-out image folder.")
    return certificate_from_results(split, run.prototypes, run.class_indices, run.head_error(),
                                    list(zip(pooled, logits, labels)), device, progress)
