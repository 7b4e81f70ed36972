"""Two runs compared: the prototypes of each class matched one-to-one across the runs.

The similarity the matching maximises is stated in every result: the Pearson correlation of
two prototypes' maps on the same images of their class (each run's model with its own
preprocessing; maps on different grids are resized to the finer one). It is always defined,
whatever the two models are. When the two runs decompose the same model (same checkpoint,
same cut), the prototype vectors live in one feature space and their cosine is reported beside
it. Matching is one-to-one (the Hungarian method, scipy's ``linear_sum_assignment``); a pair
whose similarity is below :data:`MATCH_THRESHOLD` is not a match, and both its prototypes are
listed as unmatched. Per class, the mean contributions of both sides on the same images say
what changed.

A second piece of evidence, from each run's own record: the overlap of a pair's top training
patches (:data:`PATCH_OVERLAP`). Only patches on images both runs' discoveries read count
(two runs that sampled different images cannot share a patch elsewhere); a class whose runs
share no such patch has no overlap (None). Every number of a pair (similarity, cosine, patch
overlap) is shown beside its baseline in the same comparison: the mean over the *other* pairs
of the same class (each prototype of A with every prototype of B but its assigned partner),
what two prototypes of that class that are not the same part give.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from phpn import config
from phpn.config import class_name
from phpn.errors import ConfigError, DataError
from phpn.images.batches import load_batch
from phpn.images.folders import ImageFolderData
from phpn.method.network import prototype_maps
from phpn.progress import report

MATCH_THRESHOLD = config.MATCH_THRESHOLD
IMAGES_PER_CLASS = config.COMPARE_IMAGES_PER_CLASS
SIMILARITY = "Pearson correlation of the two prototypes' maps on the same images of their class"
PATCH_OVERLAP = ("share of the two prototypes' top training patches, on images both discoveries read, that overlap "
                 "a top patch of the other on the same image")
BASELINE = "the other pairs of the same class (each prototype with every one but its assigned partner)"
EVIDENCE = ("similarity", "cosine", "patch_overlap")  # each pair's numbers, each beside its baseline


@dataclass
class Comparison:
    classes: list  # per class: {"class", "class_name", "images", "pairs", "unmatched_a", "unmatched_b", ...}
    vectors_comparable: bool
    threshold: float = MATCH_THRESHOLD
    similarity: str = SIMILARITY
    labels: tuple = ("A", "B")
    notes: list = field(default_factory=list)
    patch_overlap: str = PATCH_OVERLAP
    baseline: str = BASELINE

    @property
    def matched(self) -> int:
        return sum(len(c["pairs"]) for c in self.classes)

    @property
    def mutual(self) -> int:
        """Matched pairs whose two prototypes are each other's closest (by map similarity)."""
        return sum(bool(p.get("mutual_best")) for c in self.classes for p in c["pairs"])

    @property
    def prototypes(self) -> tuple:
        return (sum(c["k_a"] for c in self.classes), sum(c["k_b"] for c in self.classes))

    def evidence(self) -> dict:
        """Each of :data:`EVIDENCE` over the whole comparison: {"matched": mean over the matched
        pairs, "baseline": mean over the other pairs of their classes (:data:`BASELINE`)}, None
        where nothing was measured."""
        out = {}
        for key in EVIDENCE:
            matched = [p[key] for c in self.classes for p in c["pairs"] if p.get(key) is not None]
            other = [v for c in self.classes for v in c.get("other_pairs", {}).get(key, [])]
            out[key] = {"matched": float(np.mean(matched)) if matched else None,
                        "baseline": float(np.mean(other)) if other else None}
        return out

    def evidence_text(self) -> str:
        """"matched pairs: similarity 0.93 (other pairs 0.12), ..." for the numbers measured."""
        words = {"similarity": "similarity", "cosine": "cosine", "patch_overlap": "top-patch overlap"}
        parts = [f"{words[key]} {e['matched']:.2f} (other pairs {_num(e['baseline'])})"
                 for key, e in self.evidence().items() if e["matched"] is not None]
        return f"Matched pairs, mean {', '.join(parts)}." if parts else ""

    def baseline_text(self, c: dict) -> str:
        """A class's baseline in words: "other pairs of this class (baseline): similarity 0.74, ..."."""
        base = c.get("baseline", {})
        shown = [("similarity", "similarity")] + ([("cosine", "cosine")] if self.vectors_comparable else []) \
            + [("top-patch overlap", "patch_overlap")]
        return "other pairs of this class (baseline): " + ", ".join(f"{words} {_num(base.get(key))}"
                                                                     for words, key in shown)

    @property
    def summary(self) -> str:
        ka, kb = self.prototypes
        sims = [p["similarity"] for c in self.classes for p in c["pairs"]]
        median = f", median similarity {np.median(sims):.2f}" if sims else ""
        evidence = self.evidence_text()
        return (f"{self.matched} of {ka} prototypes of {self.labels[0]} matched one-to-one with {kb} of "
                f"{self.labels[1]} over {len(self.classes)} classes{median} (similarity: {self.similarity}; a match "
                f"needs at least {self.threshold:g}); unmatched: {ka - self.matched} of {self.labels[0]}, "
                f"{kb - self.matched} of {self.labels[1]}. {self.mutual} of the {self.matched} matched pairs are each "
                f"other's closest prototypes; the others matched only because the one-to-one assignment paired them."
                + (f" {evidence}" if evidence else ""))

    def to_dict(self) -> dict:
        ka, kb = self.prototypes
        return {"summary": self.summary, "similarity": self.similarity, "threshold": self.threshold,
                "patch_overlap": self.patch_overlap, "baseline": self.baseline, "evidence": self.evidence(),
                "vectors_comparable": self.vectors_comparable, "runs": list(self.labels), "matched": self.matched,
                "mutual_best": self.mutual,
                "prototypes_a": ka, "prototypes_b": kb, "notes": list(self.notes), "classes": self.classes}

    def text(self) -> str:
        lines = [self.summary] + self.notes
        for c in self.classes:
            lines.append(f"{c['class_name']} (class {c['class']}, {c['images']} images): mean logit "
                         f"{c['mean_logit_a']:+.3f} -> {c['mean_logit_b']:+.3f}")
            lines.append(f"  {self.baseline_text(c)}")
            for p in c["pairs"]:
                cos = f", cosine {p['cosine']:.2f}" if p.get("cosine") is not None else ""
                closest = "" if p.get("mutual_best", True) else " (not each other's closest)"
                lines.append(f"  prototype {p['a'] + 1} <-> {p['b'] + 1}{closest}: similarity {p['similarity']:.2f}{cos}, "
                             f"top-patch overlap {_num(p.get('patch_overlap'))}; "
                             f"contribution {p['contribution_a']:+.3f} -> {p['contribution_b']:+.3f}")
            for side, key in (("A", "unmatched_a"), ("B", "unmatched_b")):
                for u in c[key]:
                    best = f" (best {u['best_similarity']:.2f})" if u["best_similarity"] is not None else ""
                    lines.append(f"  unmatched in {side}: prototype {u['prototype'] + 1}, contribution "
                                 f"{u['contribution']:+.3f}{best}")
        return "\n".join(lines)


def mutual_best(sim: np.ndarray, i: int, j: int) -> bool:
    """Whether prototypes ``i`` (of A) and ``j`` (of B) are each other's closest in ``sim``."""
    return bool(sim[i, j] >= sim[i, :].max() and sim[i, j] >= sim[:, j].max())


def _num(value) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def _boxes(run, c: int, k: int, shared, crop) -> list:
    """Per prototype of class ``c``: its top patches on the shared images, as (path, box) with
    the box [x0, y0, x1, y1] in fractions of the run's input side (``crop`` pixels)."""
    recorded = run.class_meta(c).get("top_patches") or []
    scale = float(crop) if crop else 1.0
    out = []
    for i in range(k):
        patches = recorded[i] if i < len(recorded) else []
        out.append([(str(p["path"]), [float(v) / scale for v in p["box"]]) for p in patches
                    if shared is None or str(p["path"]) in shared])
    return out


def _overlaps(box_a, box_b) -> bool:
    return min(box_a[2], box_b[2]) > max(box_a[0], box_b[0]) and min(box_a[3], box_b[3]) > max(box_a[1], box_b[1])


def patch_overlap(patches_a: list, patches_b: list):
    """The share of both prototypes' top patches (each a list of (path, box)) that overlap a top
    patch of the other on the same image: 1 for the same patches, None when neither has one."""
    total = len(patches_a) + len(patches_b)
    if not total:
        return None

    def hits(mine, theirs):
        return sum(any(path == other and _overlaps(box, b) for other, b in theirs) for path, box in mine)

    return (hits(patches_a, patches_b) + hits(patches_b, patches_a)) / total


def _overlap_matrix(run_a, run_b, c: int, ka: int, kb: int, crop_a, crop_b) -> np.ndarray:
    """(k_a, k_b) top-patch overlap of every pair of class ``c`` (NaN where not measured)."""
    paths_a, paths_b = run_a.class_meta(c).get("paths"), run_b.class_meta(c).get("paths")
    shared = set(map(str, paths_a)) & set(map(str, paths_b)) if paths_a is not None and paths_b is not None else None
    boxes_a = _boxes(run_a, c, ka, shared, crop_a)
    boxes_b = _boxes(run_b, c, kb, shared, crop_b)
    out = np.full((ka, kb), np.nan)
    for i in range(ka):
        for j in range(kb):
            value = patch_overlap(boxes_a[i], boxes_b[j])
            if value is not None:
                out[i, j] = value
    return out


def _crop(run, pre):
    """The input side the run's patch boxes are measured in (None: not known; boxes as they are)."""
    return getattr(pre, "crop", None) or run.preprocess_info.get("crop")


def _value(matrix, i: int, j: int):
    if matrix is None or not np.isfinite(matrix[i, j]):
        return None
    return float(matrix[i, j])


def check_comparable(run_a, run_b) -> list:
    """The classes both runs decomposed; a ConfigError when the runs cannot be compared."""
    ca, cb = int(run_a.head_bias.shape[0]), int(run_b.head_bias.shape[0])
    if ca != cb:
        raise ConfigError(f"The runs cannot be compared: their models have different classes ({ca} and {cb}).",
                          "Compare runs of models trained on the same classes.")
    names_a, names_b = run_a.model_info.get("class_names"), run_b.model_info.get("class_names")
    if names_a and names_b and [str(n).lower() for n in names_a] != [str(n).lower() for n in names_b]:
        first = next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if str(x).lower() != str(y).lower())
        raise ConfigError(f"The runs cannot be compared: their models have different classes (class {first} is "
                          f"'{names_a[first]}' in one and '{names_b[first]}' in the other).",
                          "Compare runs of models trained on the same classes, in the same order.")
    common = sorted(set(run_a.class_indices.tolist()) & set(run_b.class_indices.tolist()))
    if not common:
        raise ConfigError("The runs cannot be compared: they decomposed no class in common.",
                          "Compare runs that decomposed some of the same classes.")
    return common


def _same_feature_space(run_a, split_a, run_b, split_b) -> bool:
    ma, mb = run_a.model_info, run_b.model_info
    return (bool(run_a.checkpoint_sha256) and run_a.checkpoint_sha256 == run_b.checkpoint_sha256
            and ma.get("feature_layer") == mb.get("feature_layer") and split_a.num_features == split_b.num_features)


@torch.inference_mode()
def _maps(run, split, preprocess, data: ImageFolderData, paths: list, c: int) -> tuple:
    """(maps (n, k, H, W), contributions (n, k), logits of class c (n,), kept paths)."""
    batch, kept, _ = load_batch(data.root, paths, preprocess)
    if not kept:
        return None, None, None, []
    device = next(split.backbone.parameters()).device
    feats = split.backbone(batch.to(device)).float().cpu()
    pooled = feats.mean((2, 3))
    scale = split.image_scale(pooled.to(split.weight.dtype)).float()
    maps = prototype_maps(feats, run.class_prototypes(c).float(), scale)
    logits = split.logits_from_features(feats.to(split.weight.dtype)).float()[:, c]
    return maps, maps.mean((2, 3)), logits, list(kept)


def _correlation(maps_a: torch.Tensor, maps_b: torch.Tensor) -> np.ndarray:
    """(k_a, k_b) Pearson correlation of the maps over images and positions, on a common grid."""
    size = tuple(max(a, b) for a, b in zip(maps_a.shape[-2:], maps_b.shape[-2:]))
    if tuple(maps_a.shape[-2:]) != size:
        maps_a = F.interpolate(maps_a, size=size, mode="bilinear", align_corners=False)
    if tuple(maps_b.shape[-2:]) != size:
        maps_b = F.interpolate(maps_b, size=size, mode="bilinear", align_corners=False)
    a = maps_a.transpose(0, 1).reshape(maps_a.shape[1], -1).double()
    b = maps_b.transpose(0, 1).reshape(maps_b.shape[1], -1).double()
    a = F.normalize(a - a.mean(1, keepdim=True), dim=1)
    b = F.normalize(b - b.mean(1, keepdim=True), dim=1)
    return (a @ b.T).numpy()


def compare_runs(run_a, split_a, pre_a, run_b, split_b, pre_b, data: ImageFolderData, *,
                 images_per_class: int = IMAGES_PER_CLASS, threshold: float = MATCH_THRESHOLD,
                 labels: tuple = ("A", "B"), progress=None) -> Comparison:
    """Match each common class's prototypes of ``run_a`` and ``run_b`` on ``data``'s images of that class."""
    common = check_comparable(run_a, run_b)
    folders = set(data.class_indices)
    classes = [c for c in common if c in folders]
    if not classes:
        raise DataError("None of the image folders is a class both runs decomposed.",
                        "Give labelled images of the runs' classes (one sub-folder per class).")
    vectors = _same_feature_space(run_a, split_a, run_b, split_b)
    names = run_a.class_names
    out = []
    report(progress, "compare", 0, len(classes))
    for step, c in enumerate(classes):
        paths = data.by_index(c).paths[:images_per_class]
        maps_a, con_a, logit_a, kept_a = _maps(run_a, split_a, pre_a, data, paths, c)
        maps_b, con_b, logit_b, kept_b = _maps(run_b, split_b, pre_b, data, paths, c)
        if not kept_a or kept_a != kept_b:
            continue
        sim = _correlation(maps_a, maps_b)
        rows, cols = linear_sum_assignment(sim, maximize=True)
        cos = None
        if vectors:
            pa = F.normalize(run_a.class_prototypes(c).double(), dim=1)
            pb = F.normalize(run_b.class_prototypes(c).double(), dim=1)
            cos = (pa @ pb.T).numpy()
        overlap = _overlap_matrix(run_a, run_b, c, *sim.shape, _crop(run_a, pre_a), _crop(run_b, pre_b))
        pairs, matched_a, matched_b = [], set(), set()
        for i, j in zip(rows.tolist(), cols.tolist()):
            if sim[i, j] >= threshold:
                # Each other's closest: the threshold alone lets a pair through that two unrelated
                # prototypes of the same class would also pass (their maps share the object).
                mutual = mutual_best(sim, i, j)
                pairs.append({"a": i, "b": j, "similarity": float(sim[i, j]), "mutual_best": mutual,
                              "cosine": None if cos is None else float(cos[i, j]),
                              "patch_overlap": _value(overlap, i, j),
                              "contribution_a": float(con_a[:, i].mean()), "contribution_b": float(con_b[:, j].mean()),
                              "contribution_change": float(con_b[:, j].mean() - con_a[:, i].mean())})
                matched_a.add(i)
                matched_b.add(j)
        partner = dict(zip(rows.tolist(), cols.tolist()))
        partner_b = {j: i for i, j in partner.items()}

        def unmatched(k, matched, con, best_of):
            return [{"prototype": i, "contribution": float(con[:, i].mean()), "best_similarity": best_of(i)}
                    for i in range(k) if i not in matched]

        ka, kb = sim.shape
        assigned = set(zip(rows.tolist(), cols.tolist()))
        others = [(i, j) for i in range(ka) for j in range(kb) if (i, j) not in assigned]
        other_pairs = {key: [v for v in (_value(m, i, j) for i, j in others) if v is not None]
                       for key, m in (("similarity", sim), ("cosine", cos), ("patch_overlap", overlap))}
        out.append({
            "class": c, "class_name": class_name(names, c), "images": len(kept_a), "k_a": ka, "k_b": kb,
            "similarity_matrix": sim.round(4).tolist(),
            "patch_overlap_matrix": [[_value(overlap, i, j) for j in range(kb)] for i in range(ka)],
            "pairs": pairs,
            "other_pairs": other_pairs,
            "baseline": {key: float(np.mean(v)) if v else None for key, v in other_pairs.items()},
            "unmatched_a": unmatched(ka, matched_a, con_a,
                                     lambda i: float(sim[i, partner[i]]) if i in partner else None),
            "unmatched_b": unmatched(kb, matched_b, con_b,
                                     lambda j: float(sim[partner_b[j], j]) if j in partner_b else None),
            "mean_logit_a": float(logit_a.mean()), "mean_logit_b": float(logit_b.mean()),
            "logit_change": float(logit_b.mean() - logit_a.mean()),
        })
        report(progress, "compare", step + 1, len(classes))
    notes = [] if vectors else ["The runs decompose different models (or cuts), so their prototype vectors are not "
                                "in one feature space: only their maps are compared."]
    return Comparison(classes=out, vectors_comparable=vectors, threshold=threshold, labels=tuple(labels),
                      notes=notes)
