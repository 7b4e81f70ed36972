"""The audit: every prototype of a run ranked by how much a person should look at it first.

Each prototype is measured on labelled images (a few per class) by signals that a shortcut
(a watermark, a ruler, a border artefact) leaves behind, and each signal is set beside the same
signal of baseline prototypes that also sum exactly to the head row but carry no discovered
part (random directions, the equal split; :mod:`phpn.method.baselines`), on the same images:

- fixed place: its map peaks at the same position on most of its class's images
  (1 − entropy of the peak position, normalised), and the share of its map mass in the border band;
- one look: its top patches are near-duplicates (1 − their pixel diversity);
- everywhere: its peak response on other classes' images relative to its own class's;
- causal, paste: its highest-map region (on the image where it peaks highest: the patches around
  every cell at REGION_SHARE of the peak or more) pasted at the same place onto other classes'
  images: the share whose prediction turns into the class, and the class logit's change;
- causal, remove: the highest-map region blurred on each of its own class's images: the share
  of predictions lost, and the logit's drop;
- reliance: the share of the class's correct predictions that change when the prototype is
  switched off (the switch-off's edited logits, for every prototype at once).

Each signal's *excess* is how far it lies above the random baseline's mean, in units of that
baseline's spread (or of the signal's own standard error over its images, when larger; a floor
keeps a spread of zero from making noise look large). A prototype's score is the sum of its
positive excesses: the ranking. Its reasons are the signals whose excess reaches
:data:`REASON_EXCESS` and whose value is above the equal split's, in words with their numbers
(causal ones first). The same score is computed for every random-direction baseline prototype;
a prototype *stands out* when it scores above all of them, and when none does the audit says
that nothing stands out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from phpn import config
from phpn.config import class_name
from phpn.errors import DataError
from phpn.images.batches import load_batch
from phpn.images.folders import ImageFolderData
from phpn.method.baselines import equal_split_prototypes, random_prototypes
from phpn.method.network import prototype_maps
from phpn.progress import report

IMAGES_PER_CLASS = config.AUDIT_IMAGES_PER_CLASS
OTHER_IMAGES = 48  # other classes' images a region is pasted onto, at most
TOP_PATCHES = 6  # top patches compared for "one look"
BORDER_CELLS = 1  # the border band: this many cells of the feature grid along each edge
PATCH_CELLS = 2.0  # a patch is this many feature cells wide (as the run's top patches)
REGION_SHARE = 0.5  # the highest-map region: the patches around its highest cells at this share of the peak or more
REASON_EXCESS = 1.5  # spreads above the random baseline for a signal to be given as a reason
BASELINE_SEED = 0

# name: (plain words for the reason, spread floor, unit "%" for rates or "" for numbers)
SIGNALS = {
    "paste_flip": ("pasting its highest-map region onto other classes' images turns their prediction into this class",
                   0.05, "%"),
    "paste_logit": ("pasting its highest-map region onto other classes' images raises this class's logit", 0.25, ""),
    "remove_drop": ("blurring its highest-map region on its own class's images loses the prediction", 0.05, "%"),
    "remove_logit": ("blurring its highest-map region on its own class's images lowers the class's logit", 0.25, ""),
    "reliance": ("switching it off changes its class's correct predictions", 0.05, "%"),
    "fixed_place": ("its map peaks at the same place on most images", 0.05, ""),
    "border": ("its map mass lies in the border band of the image", 0.05, "%"),
    "one_look": ("its top patches look alike (near-duplicates)", 0.05, ""),
    "everywhere": ("it responds on other classes' images as strongly as on its own", 0.05, ""),
}
CAUSAL = ("paste_flip", "paste_logit", "remove_drop", "remove_logit")
NOTHING_STANDS_OUT = ("Nothing stands out: no prototype scores above every random-direction baseline prototype of "
                      "this run (prototypes that sum to the same head rows but carry no discovered part).")

NO_SINGLE_REASON = (f"no single signal is {REASON_EXCESS:g} spreads above the random directions; the score adds smaller "
                    "excesses")


@dataclass
class AuditEntry:
    """One prototype: its score (0: nothing stands out), its reasons and every signal with its baselines."""

    class_index: int
    class_name: str
    prototype: int  # counted from 0
    score: float  # the sum of its signals' positive excesses over the random baseline
    reasons: list
    signals: dict  # name -> {"value", "spread" (when measured over images), "random", "random_sd", "equal", "excess"}
    stands_out: bool = False  # it scores above every random-direction baseline prototype of the run

    @property
    def causal(self) -> bool:
        return any(r.startswith("causal") for r in self.reasons)

    @classmethod
    def from_dict(cls, d: dict) -> "AuditEntry":
        return cls(class_index=int(d["class"]), class_name=str(d["class_name"]), prototype=int(d["prototype"]),
                   score=float(d["score"]), reasons=list(d["reasons"]), signals=dict(d["signals"]),
                   stands_out=bool(d["stands_out"]))

    def to_dict(self) -> dict:
        return {"class": self.class_index, "class_name": self.class_name, "prototype": self.prototype,
                "score": self.score, "stands_out": self.stands_out, "reasons": list(self.reasons),
                "signals": self.signals}


@dataclass
class Audit:
    entries: list  # AuditEntry, highest score first
    images: int
    images_per_class: int
    baselines: dict  # signal -> {"random_mean", "random_sd", "equal_mean"} over the run's classes
    settings: dict = field(default_factory=dict)

    baseline_scores: list = field(default_factory=list)  # the same score for each random-direction prototype
    image_paths: list = field(default_factory=list)  # the labelled images measured on, as the image folder names them
    data_root: str = ""  # that image folder
    # Where the audit was kept beside its run, or why it was not (set by the one who saves it).
    saved_to: Optional[str] = None
    save_note: str = ""

    @property
    def stands_out(self) -> bool:
        return any(e.stands_out for e in self.entries)

    @property
    def summary(self) -> str:
        highest = max(self.baseline_scores, default=0.0)
        flagged = [e for e in self.entries if e.stands_out]
        if not flagged:
            top = self.entries[0].score if self.entries else 0.0
            return f"{NOTHING_STANDS_OUT} Highest score here {top:.2f}; highest baseline score {highest:.2f}."
        first = flagged[0]
        why = first.reasons[0] if first.reasons else NO_SINGLE_REASON
        return (f"{len(flagged)} of {len(self.entries)} prototypes stand out: they score above every random-direction "
                f"baseline prototype of this run (highest baseline score {highest:.2f}). Look first at "
                f"{first.class_name} prototype {first.prototype + 1} (score {first.score:.2f}): {why}")

    def to_dict(self) -> dict:
        return {"summary": self.summary, "stands_out": self.stands_out, "images": self.images,
                "images_per_class": self.images_per_class, "baselines": self.baselines,
                "baseline_scores": list(self.baseline_scores), "settings": self.settings,
                "data_root": self.data_root, "image_paths": list(self.image_paths),
                "prototypes": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "Audit":
        """The audit :meth:`to_dict` wrote (its summary and flags follow from the entries again)."""
        return cls(entries=[AuditEntry.from_dict(e) for e in d["prototypes"]], images=int(d["images"]),
                   images_per_class=int(d["images_per_class"]), baselines=dict(d["baselines"]),
                   settings=dict(d.get("settings", {})), baseline_scores=[float(v) for v in d["baseline_scores"]],
                   image_paths=[str(p) for p in d.get("image_paths", [])], data_root=str(d.get("data_root", "")))

    def text(self, top: Optional[int] = None) -> str:
        lines = [self.summary, f"({self.images} labelled images, up to {self.images_per_class} per class; "
                 "each number beside the random-direction baseline's mean ± spread and the equal split's)"]
        for e in self.entries[:top]:
            flag = "  stands out" if e.stands_out else ""
            lines.append(f"{e.score:7.2f}  {e.class_name} (class {e.class_index}), prototype {e.prototype + 1}{flag}")
            lines += [f"         - {r}" for r in e.reasons] or [f"         - {NO_SINGLE_REASON}"]
        return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _fmt(name: str, v: float) -> str:
    return _pct(v) if SIGNALS[name][2] == "%" else f"{v:+.2f}" if name.endswith("logit") else f"{v:.2f}"


def _box(pos, grid, size) -> tuple:
    """(y0, y1, x0, x1) in input pixels: PATCH_CELLS cells around the feature cell ``pos``, kept inside."""
    (row, col), (h, w), (height, width) = pos, grid, size
    bh, bw = max(1, round(PATCH_CELLS * height / h)), max(1, round(PATCH_CELLS * width / w))
    cy, cx = (row + 0.5) * height / h, (col + 0.5) * width / w
    y0 = int(min(max(0, round(cy - bh / 2)), height - bh))
    x0 = int(min(max(0, round(cx - bw / 2)), width - bw))
    return y0, y0 + bh, x0, x0 + bw


def _region(cell_map: torch.Tensor, size) -> torch.Tensor:
    """(H, W) bool in input pixels: the patches around the highest cells of ``cell_map`` (h, w) at
    REGION_SHARE of its peak or more, as many as the grid's longer side at most (a corner mark
    gives its corner, a border stripe the stripe, an object a part of it)."""
    h, w = cell_map.shape
    mask = torch.zeros(size, dtype=torch.bool)
    peak = float(cell_map.max())
    flat = cell_map.flatten()
    order = torch.argsort(flat, descending=True)[:max(h, w)]  # a part, not the whole object: one row's worth at most
    cells = [divmod(int(o), w) for n, o in enumerate(order) if n == 0 or float(flat[o]) >= REGION_SHARE * peak > 0]
    for row, col in cells:
        y0, y1, x0, x1 = _box((row, col), (h, w), size)
        mask[y0:y1, x0:x1] = True
    return mask


def _blurred(x: torch.Tensor) -> torch.Tensor:
    """A heavy blur of each image (box filter a quarter of the image wide): what "removed" looks like."""
    r = max(1, min(x.shape[-2:]) // 8)
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


class _Images:
    """The audit's labelled images, their features and the model's logits."""

    def __init__(self, network, split, preprocess, data: ImageFolderData, classes, per_class: int, batch_size: int):
        self.network, self.split = network, split
        paths, labels = [], []
        for c in classes:
            chosen = data.by_index(c).paths[:per_class]
            paths += chosen
            labels += [c] * len(chosen)
        xs, kept = [], []
        for start in range(0, len(paths), batch_size):
            batch, ok, _ = load_batch(data.root, paths[start:start + batch_size], preprocess)
            if ok:
                xs.append(batch)
                kept += list(ok)
        if not kept:
            raise DataError("None of the labelled images could be read.", "Check the image folder.")
        label_of = dict(zip(paths, labels))
        self.x = torch.cat(xs).float()
        self.paths = [str(p) for p in kept]
        self.y = torch.tensor([label_of[p] for p in kept])
        self.feats, self.logits = self.forward(self.x)
        self.pred = self.logits.argmax(1)
        self.batch_size = batch_size

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple:
        feats, logits = [], []
        device = self.network.backbone_device
        for start in range(0, len(x), 64):
            f = self.network.backbone(x[start:start + 64].to(device)).float().cpu()
            feats.append(f)
            logits.append(self.split.logits_from_features(f.to(self.split.weight.device, self.split.weight.dtype))
                          .float().cpu())
        return torch.cat(feats), torch.cat(logits)

    def scale(self, feats: torch.Tensor) -> torch.Tensor:
        return self.split.image_scale(feats.mean((2, 3)).to(self.split.weight.dtype)).float().cpu()


def _signals(images: _Images, c: int, protos: torch.Tensor, own: torch.Tensor, others: torch.Tensor) -> dict:
    """Every signal for the prototypes ``protos`` (m, D) of class ``c``: name -> (values (m,), spreads (m,) or None)."""
    feats_own = images.feats[own]
    n_own, m = len(feats_own), protos.shape[0]
    maps = prototype_maps(feats_own, protos.float(), images.scale(feats_own))  # (n, m, h, w)
    h, w = maps.shape[-2:]
    size = tuple(images.x.shape[-2:])
    flat = maps.reshape(n_own, m, h * w)
    peak, where = flat.max(2)  # (n, m)
    out = {name: (np.zeros(m), None) for name in SIGNALS}
    # fixed place: how concentrated the peak positions are (0: spread evenly, 1: always the same cell)
    norm = math.log(max(2, min(n_own, h * w)))
    fixed = []
    for i in range(m):
        counts = torch.bincount(where[:, i], minlength=h * w).double()
        p = counts[counts > 0] / n_own
        fixed.append(1.0 - float(-(p * p.log()).sum()) / norm)
    out["fixed_place"] = (np.array(fixed), None)
    band = torch.ones(h, w, dtype=torch.bool)
    band[BORDER_CELLS:h - BORDER_CELLS, BORDER_CELLS:w - BORDER_CELLS] = False
    pos = maps.clamp(min=0)
    mass = pos.sum((0, 2, 3)).clamp(min=1e-12)
    out["border"] = ((pos * band).sum((0, 2, 3)) / mass).numpy(), None
    # one look: top patches (in pixels) against the images' own pixel spread
    sigma = float(images.x.std()) or 1.0
    looks = []
    for i in range(m):
        order = torch.argsort(peak[:, i], descending=True)[:TOP_PATCHES].tolist()
        crops = []
        for j in order:
            y0, y1, x0, x1 = _box(divmod(int(where[j, i]), w), (h, w), size)
            crops.append(images.x[own][j, :, y0:y1, x0:x1].reshape(-1))
        if len(crops) < 2:
            looks.append(0.0)
            continue
        crops = torch.stack(crops)
        d = torch.cdist(crops[None], crops[None])[0]
        mean_d = float(d.sum() / (len(crops) * (len(crops) - 1)))
        looks.append(1.0 - mean_d / (math.sqrt(2 * crops.shape[1]) * sigma))
    out["one_look"] = (np.array(looks), None)
    # everywhere: peak response on other classes' images against its own class's
    if len(others):
        feats_other = images.feats[others]
        other_peak = prototype_maps(feats_other, protos.float(), images.scale(feats_other)).amax((2, 3))
        own_peak = peak.mean(0)
        ratio = torch.where(own_peak > 0, other_peak.mean(0) / own_peak.clamp(min=1e-12), torch.zeros_like(own_peak))
        out["everywhere"] = (ratio.clamp(0, 10).numpy(), None)  # a prototype that never fires on its own: 0
    # reliance: correct predictions of the class that change with the prototype switched off
    contrib = flat.mean(2)  # (n, m): the prototype's contribution to class c's logit
    base_logits = images.logits[own]
    correct = base_logits.argmax(1) == c
    if bool(correct.any()):
        rel = []
        for i in range(m):
            edited = base_logits.clone()
            edited[:, c] -= contrib[:, i]
            rel.append(float((edited.argmax(1)[correct] != c).double().mean()))
        out["reliance"] = (np.array(rel), None)
    # causal tests: paste the highest-map region of its top image onto other classes' images (at
    # the same place); blur each own image's highest-map region
    own_x, others_x = images.x[own], images.x[others]
    sd_logit = float(images.logits[:, c].std()) or 1.0
    flips, flip_sd, gains, gain_sd, drops, drop_sd, losses, loss_sd = ([] for _ in range(8))
    blurred = _blurred(own_x)
    for i in range(m):
        if len(others_x):
            j = int(peak[:, i].argmax())
            region = _region(maps[j, i], size)
            pasted = torch.where(region, own_x[j], others_x)
            _, logits = images.forward(pasted)
            before = images.logits[others]
            turned = ((logits.argmax(1) == c) & (before.argmax(1) != c)).double()
            delta = (logits[:, c] - before[:, c]) / sd_logit
            flips.append(float(turned.mean()))
            flip_sd.append(float(turned.std()) if len(turned) > 1 else 0.0)
            gains.append(float(delta.mean()))
            gain_sd.append(float(delta.std()) if len(delta) > 1 else 0.0)
        regions = torch.stack([_region(maps[j, i], size) for j in range(n_own)])[:, None]
        edited = torch.where(regions, blurred, own_x)
        _, logits = images.forward(edited)
        lost = ((base_logits.argmax(1) == c) & (logits.argmax(1) != c)).double()
        delta = (base_logits[:, c] - logits[:, c]) / sd_logit
        drops.append(float(lost.mean()))
        drop_sd.append(float(lost.std()) if n_own > 1 else 0.0)
        losses.append(float(delta.mean()))
        loss_sd.append(float(delta.std()) if n_own > 1 else 0.0)
    if flips:
        out["paste_flip"] = (np.array(flips), np.array(flip_sd))
        out["paste_logit"] = (np.array(gains), np.array(gain_sd))
    out["remove_drop"] = (np.array(drops), np.array(drop_sd))
    out["remove_logit"] = (np.array(losses), np.array(loss_sd))
    return out


def _reason(name: str, value: float, spread, random_mean: float, random_sd: float, equal: float, n: dict,
            excess: float) -> str:
    words = SIGNALS[name][0]
    kind = "causal" if name in CAUSAL else {"fixed_place": "fixed place", "border": "fixed place",
                                            "one_look": "one look"}.get(name, name)
    shown = _fmt(name, value) + (f" ± {_fmt(name, spread).lstrip('+')}" if spread is not None else "")
    unit = " (class-logit spreads)" if name.endswith("logit") else ""
    where = {"paste_flip": f" on {n['others']} images", "paste_logit": f" on {n['others']} images",
             "remove_drop": f" on {n['own']} images", "remove_logit": f" on {n['own']} images"}.get(name, "")
    return (f"{kind}: {words}: {shown}{unit}{where}; random directions of this run "
            f"{_fmt(name, random_mean)} ± {_fmt(name, random_sd).lstrip('+')}, equal split {_fmt(name, equal)} "
            f"({excess:.1f} spreads above the random directions)")


def audit_run(run, split, preprocess, data: ImageFolderData, *, images_per_class: int = IMAGES_PER_CLASS,
              other_images: int = OTHER_IMAGES, batch_size: int = 64, seed: int = BASELINE_SEED,
              progress=None) -> Audit:
    """Audit every prototype of ``run`` (on the model cut as ``split``) with up to
    ``images_per_class`` labelled images of each decomposed class from ``data``."""
    network = run.lazy_network(split)
    names = run.class_names
    classes = [c for c in data.class_indices if c in set(run.class_indices.tolist())]
    if not classes:
        raise DataError("None of the image folders is a class this run decomposed.",
                        "Give the labelled images of the run's classes (one sub-folder per class).")
    images = _Images(network, split, preprocess, data, classes, images_per_class, batch_size)
    g = torch.Generator().manual_seed(int(seed))
    raw, base = {}, {}
    report(progress, "audit", 0, len(classes))
    for step, c in enumerate(classes):
        own = (images.y == c).nonzero().flatten()
        others = (images.y != c).nonzero().flatten()
        if len(others) > other_images:
            others = others[torch.randperm(len(others), generator=g)[:other_images]]
        protos = run.class_prototypes(c).float()
        k = protos.shape[0]
        raw[c] = _signals(images, c, protos, own, others)
        rand = random_prototypes(split.weight, [c], k, seed=seed + c)[0]
        equal = equal_split_prototypes(split.weight, [c], k)[0, :1]
        base[c] = (_signals(images, c, rand, own, others), _signals(images, c, equal, own, others))
        report(progress, "audit", step + 1, len(classes))
    baselines = {}
    for name in SIGNALS:
        rvals = np.concatenate([base[c][0][name][0] for c in classes])
        evals = np.array([base[c][1][name][0][0] for c in classes])
        baselines[name] = {"random_mean": float(rvals.mean()), "random_sd": float(rvals.std()),
                           "equal_mean": float(evals.mean()), "words": SIGNALS[name][0]}
    def excesses(signals: dict, i: int, c: int, n: dict) -> dict:
        out = {}
        for name, (_, floor, _) in SIGNALS.items():
            values, spreads = signals[name]
            value = float(values[i])
            spread = None if spreads is None else float(spreads[i])
            count = n["others"] if name.startswith("paste") else n["own"]
            error = 0.0 if spread is None else spread / math.sqrt(max(1, count))  # its own sampling error
            rmean, rsd = baselines[name]["random_mean"], baselines[name]["random_sd"]
            out[name] = {"value": value, "spread": spread, "random": rmean, "random_sd": rsd,
                         "equal": float(base[c][1][name][0][0]),
                         "excess": float((value - rmean) / max(rsd, floor, error))}
        return out

    def score(signals: dict) -> float:
        return round(float(sum(max(0.0, s["excess"]) for s in signals.values())), 4)

    counts = {c: {"own": int((images.y == c).sum()), "others": min(other_images, int((images.y != c).sum()))}
              for c in classes}
    baseline_scores = [score(excesses(base[c][0], i, c, counts[c])) for c in classes
                       for i in range(len(base[c][0]["reliance"][0]))]
    highest = max(baseline_scores, default=0.0)
    entries = []
    for c in classes:
        for i in range(len(raw[c]["reliance"][0])):
            signals = excesses(raw[c], i, c, counts[c])
            reasons = [(s["excess"], _reason(name, s["value"], s["spread"], s["random"], s["random_sd"], s["equal"],
                                             counts[c], s["excess"]))
                       for name, s in signals.items() if s["excess"] >= REASON_EXCESS and s["value"] > s["equal"]]
            reasons.sort(key=lambda r: (not r[1].startswith("causal"), -r[0]))  # causal reasons first
            total = score(signals)
            entries.append(AuditEntry(class_index=c, class_name=class_name(names, c), prototype=i, score=total,
                                      reasons=[r for _, r in reasons], signals=signals, stands_out=total > highest))
    entries.sort(key=lambda e: (-e.score, e.class_index, e.prototype))
    return Audit(entries=entries, images=len(images.y), images_per_class=images_per_class, baselines=baselines,
                 baseline_scores=baseline_scores, image_paths=images.paths, data_root=str(data.root),
                 settings={"reason_excess": REASON_EXCESS, "other_images": other_images, "top_patches": TOP_PATCHES,
                           "border_cells": BORDER_CELLS, "patch_cells": PATCH_CELLS, "region_share": REGION_SHARE,
                           "seed": seed})
