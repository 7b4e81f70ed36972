"""Check preprocessing: which input size and normalisation does the model actually read?

A model fed the wrong input size, the wrong mean/std or the wrong channels still decomposes
exactly (the certificate passes), but it is near chance and its explanations describe
nothing. :func:`check_preprocessing` tries the plausible settings on a few labelled images
per class and ranks them by the model's accuracy:

1. the setting in use, the one recorded with the model, the model family's reference
   setting (torchvision's weights metadata);
2. common input sizes (28, 32, 64, 96, 128, 224, 256, 299, 384), each as an exact resize
   and as resize-then-centre-crop (crop fraction 0.875), with the normalisation in use; with
   more than :data:`SCREEN_PER_CLASS` images per class they are screened on that many, and the
   best :data:`BEST_SCREENED` run on every image;
3. the best few sizes again with the usual normalisations (ImageNet, 0.5, none);
4. for a 3-channel model, the best few settings again with the colours arranged otherwise
   (:data:`COLOUR_VARIANTS`): the channels in BGR order (a model trained on images read by
   OpenCV or Caffe) and the grey image repeated in the three channels (a model trained on
   grey pictures stored as RGB).

The number of channels is the model's own (its first layer fixes it); a 1-channel model gets
the grey image, so stage 4 does not apply to it.

A change is proposed only when it beats the setting in use beyond chance: every setting runs
on the same images, so each candidate is compared with the one in use by an exact McNemar test
on the images where exactly one of the two is right (one-sided binomial test of the candidate's
wins among them), at level :data:`SIGNIFICANCE` divided by the number of candidates tried
(Bonferroni). A candidate that is right on a few more images than a correct setting is noise,
and is never proposed; nor is anything when the setting in use is already the most accurate.
The result says plainly when no setting tried reads the images (then the class order is the
likely cause).

:func:`setup_check` is the cheap check made as soon as a model and labelled images are known:
the accuracy at the setting in use on a sample, and how far the images are scaled up to reach
the model's input size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from phpn.config import CHECK_IMAGES_PER_CLASS, CHECK_MAX_IMAGES, UPSAMPLING_WARN
from phpn.errors import DataError
from phpn.images.folders import ImageFolderData
from phpn.images.preprocess import Preprocess, load_image
from phpn.method.certify import CHANCE_P_VALUE, CancelCheck, binomial_p_value, check_cancel, near_chance
from phpn.models import zoo
from phpn.pipeline.mistakes import class_order_hint, majorities
from phpn.progress import ProgressFn, report

COMMON_SIZES = (28, 32, 64, 96, 128, 224, 256, 299, 384)
CROP_FRACTION = 0.875  # resize to size / 0.875, then centre-crop to size (the ImageNet habit)
NORMALISATIONS = {  # name -> (mean, std) for one channel; RGB presets per channel
    "ImageNet": (Preprocess().mean, Preprocess().std),  # phpn's default preprocessing is ImageNet's
    "0.5": ((0.5,), (0.5,)),
    "none": ((0.0,), (1.0,)),
}
# Every arrangement of a 3-channel model's colours (Preprocess.colour) -> how the table names it;
# stage 4 tries the ones not in use (earlier stages keep the colour in use).
COLOUR_VARIANTS = {"rgb": "RGB (as decoded)", "bgr": "BGR (channel order reversed)",
                   "grey": "grey as RGB (grey image in each channel)"}
BEST_SIZES_RENORMALISED = 3  # how many of the best geometries are tried with every normalisation
BEST_SETTINGS_RECOLOURED = 2  # how many of the best settings are tried with every colour variant
SCREEN_PER_CLASS = 3  # with more images per class, the size grid is first tried on this many per class ...
BEST_SCREENED = 3  # ... and its best few settings then on every image
DEFAULT_IMAGES_PER_CLASS = CHECK_IMAGES_PER_CLASS  # (or all of a smaller class): enough to tell settings apart
# A candidate is proposed only when the McNemar test against the setting in use gives a p-value
# below this level divided by the number of candidates tried (Bonferroni).
SIGNIFICANCE = 0.05
# Among the candidates that beat the setting in use, a plausible prior (recorded, the family's)
# is preferred to one right on barely more images (less than this share of them, or 2).
MIN_GAIN = 0.05


@dataclass
class SettingResult:
    """One preprocessing setting and how the model does with it."""

    label: str  # where the setting comes from ("in use", "recorded with the model", "size 32", ...)
    preprocess: Preprocess
    correct: int = 0
    images: int = 0
    error: Optional[str] = None  # the model could not run on this input (e.g. a fixed-size layer)
    seconds: float = 0.0
    predicted: list = field(default_factory=list, repr=False)  # the model's class for each image
    screened: bool = False  # run on the screening images only (not among the best sizes there)

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.images if self.images and self.error is None else None

    def to_dict(self) -> dict:
        return {"setting": self.label, "preprocess": self.preprocess.to_dict(), "accuracy": self.accuracy,
                "correct": self.correct, "images": self.images, "error": self.error, "screened": self.screened,
                "seconds": round(self.seconds, 3)}


@dataclass
class PreprocessCheck:
    """The settings tried, best first, and the one in use."""

    results: list  # list[SettingResult], ranked (best accuracy first; failures last)
    current: SettingResult
    images: int
    classes: int
    notes: list = field(default_factory=list)
    tried: list = field(default_factory=list)  # the same results in the order tried (in use, recorded, ...)
    labels: list = field(default_factory=list)  # each image's true class (its folder's)
    folders: dict = field(default_factory=dict)  # class index -> folder name

    def within_noise(self, a: int, b: int) -> bool:
        """Right on ``a`` and ``b`` images: too close to prefer one to a more plausible other."""
        return abs(a - b) < max(2, MIN_GAIN * self.images)

    def against_current(self, r: SettingResult) -> tuple:
        """(wins, losses): images ``r`` gets right and the setting in use wrong, and the reverse.
        A setting in use that cannot run counts as wrong on every image."""
        if r.error is not None or len(r.predicted) != len(self.labels):
            return 0, 0
        cur = self.current.predicted if self.current.error is None and len(self.current.predicted) == len(
            self.labels) else [None] * len(self.labels)
        wins = losses = 0
        for truth, a, b in zip(self.labels, r.predicted, cur):
            wins += a == truth and b != truth
            losses += a != truth and b == truth
        return wins, losses

    def p_value(self, r: SettingResult) -> float:
        """Exact one-sided McNemar test: how likely ``r`` wins this often among the images where
        exactly one of ``r`` and the setting in use is right, were both equally good."""
        wins, losses = self.against_current(r)
        return binomial_p_value(wins, wins + losses, 0.5) if wins > losses else 1.0

    @property
    def candidates(self) -> int:
        """Settings compared with the one in use (the Bonferroni divisor)."""
        return max(1, sum(1 for r in self.tried or self.results if r is not self.current))

    @property
    def level(self) -> float:
        """The p-value a candidate must beat: :data:`SIGNIFICANCE` over the number of candidates."""
        return SIGNIFICANCE / self.candidates

    def beats_current(self, r: SettingResult) -> bool:
        return (r is not self.current and r.error is None and r.preprocess != self.current.preprocess
                and (self.current.error is not None or r.correct > self.current.correct)
                and self.p_value(r) < self.level)

    @property
    def winners(self) -> list:
        """The candidates that beat the setting in use beyond chance, in the order tried."""
        return [r for r in self.tried or self.results if self.beats_current(r)]

    @property
    def best(self) -> SettingResult:
        """The setting to use: among the candidates that beat the one in use beyond chance, the
        first tried (recorded, the family's, then the grid) within the noise of the most accurate
        of them; else the setting in use (when it runs; else the most accurate)."""
        winners = self.winners
        if winners:
            top = max(r.correct for r in winners)
            return next(r for r in winners if self.within_noise(r.correct, top))
        return self.current if self.current.error is None else self.results[0]

    @property
    def best_near_chance(self) -> bool:
        """The most accurate setting is not clearly better than guessing, allowing for having
        picked it among many (the binomial test's level divided by the number of settings tried)."""
        top = self.results[0]
        if top.error is not None:
            return True
        return near_chance(top.correct, top.images, self.classes,
                           p_value=CHANCE_P_VALUE / max(1, len(self.results)))

    @property
    def improves(self) -> bool:
        """A setting beats the one in use beyond chance (see :meth:`p_value`)."""
        return not self.best_near_chance and bool(self.winners)

    def evidence(self) -> str:
        """Why the proposal is what it is: the paired comparison behind it, in one sentence."""
        if self.improves:
            best = self.best
            wins, losses = self.against_current(best)
            return (f"On the {self.images} images both settings saw, {describe(best.preprocess)} is right where the "
                    f"setting in use is wrong on {wins}, and the reverse on {losses}: chance would do this with "
                    f"probability {_p_text(self.p_value(best))}, below {_p_text(self.level)} "
                    f"({SIGNIFICANCE:g} shared among the {self.candidates} settings tried).")
        others = [r for r in self.results if r is not self.current and r.error is None]
        better = [r for r in others if r.correct > self.current.correct]
        if self.current.error is None and not better:
            return f"No setting tried is right on more of these {self.images} images than the setting in use."
        if better:
            top = better[0]
            return (f"The most accurate, {top.label} ({top.correct} of {self.images}), could be ahead by chance "
                    f"(probability {_p_text(self.p_value(top))}; a change needs below {_p_text(self.level)}, "
                    f"{SIGNIFICANCE:g} shared among the {self.candidates} settings tried).")
        return ""

    def class_order_hint(self) -> Optional[str]:
        """When the model reads most folders consistently as *another* class (at the setting
        where its reading is most consistent), the folders are matched to the wrong classes."""
        usable = [r for r in self.tried or self.results if r.error is None and len(r.predicted) == len(self.labels)]
        if not usable or not self.labels:
            return None
        # The most consistent reading: images of a folder mostly go to one class, whichever it is.
        consistent = max(usable, key=lambda r: sum(n for _, n, _ in majorities(self.labels, r.predicted).values()))
        return class_order_hint(self.labels, consistent.predicted, self.folders,
                                setting=describe(consistent.preprocess))

    def proposal(self) -> str:
        """What to do, in one or two sentences, with the numbers."""
        cur, best = self.current, self.best
        if self.best_near_chance:
            hint = self.class_order_hint()
            return (f"No setting tried reads these images: the best, {best.label} ({describe(best.preprocess)}), is "
                    f"right on {best.correct} of {best.images} images. "
                    + (hint or "The class order (which folder is which class) or the model itself is the likely "
                               "cause; check the class-names file and the folders."))
        if not self.improves:
            top = self.results[0]
            lead = "" if top.preprocess == cur.preprocess or top.correct <= cur.correct else (
                f" ({top.label} is right on {top.correct}: a lead chance can explain on {self.images} images)")
            return (f"Keep the setting in use ({describe(cur.preprocess)}): right on {cur.correct} of "
                    f"{cur.images} images ({100 * (cur.accuracy or 0):.0f}%){lead}.")
        return (f"Use {describe(best.preprocess)} ({best.label}): right on {best.correct} of {best.images} images "
                f"({100 * (best.accuracy or 0):.0f}%), against {cur.correct} ({100 * (cur.accuracy or 0):.0f}%) with the "
                f"setting in use. CLI: {cli_flags(best.preprocess, cur.preprocess)}")

    def to_dict(self) -> dict:
        return {"images": self.images, "classes": self.classes, "current": self.current.to_dict(),
                "best": self.best.to_dict(), "improves": self.improves, "best_near_chance": self.best_near_chance,
                "proposal": self.proposal(), "evidence": self.evidence(), "p_value": self.p_value(self.best),
                "level": self.level, "results": [r.to_dict() for r in self.results], "notes": self.notes}

    def table(self) -> list:
        """Rows for display: setting, size, normalisation, accuracy."""
        rows = []
        for r in self.results:
            p = r.preprocess
            rows.append({"setting": r.label, "resize": p.resize, "crop": p.crop,
                         "normalisation": normalisation_name(p), "channels": colour_name(p),
                         "accuracy": r.accuracy, "right": f"{r.correct}/{r.images}" if r.error is None else "—",
                         "note": r.error or (f"screened out on {r.images} images" if r.screened else "")})
        return rows


def _p_text(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "below 0.0001"


def normalisation_name(pre: Preprocess) -> str:
    for name, (mean, std) in NORMALISATIONS.items():
        if _fit(mean, pre.channels) == tuple(pre.mean) and _fit(std, pre.channels) == tuple(pre.std):
            return name
    return "mean " + "/".join(f"{m:g}" for m in pre.mean) + ", std " + "/".join(f"{s:g}" for s in pre.std)


def colour_name(pre: Preprocess) -> str:
    """How the model gets the image's colours: "grey" (a 1-channel model), "RGB", or a variant's name."""
    if pre.channels == 1:
        return "grey"
    return "RGB" if pre.colour == "rgb" else COLOUR_VARIANTS[pre.colour]


def describe(pre: Preprocess) -> str:
    size = f"{pre.crop} px" if pre.resize == pre.crop else f"resize {pre.resize}, crop {pre.crop}"
    colours = f", {colour_name(pre)}" if pre.colour != "rgb" else ""
    return f"{size}, {normalisation_name(pre)} normalisation{colours}"


def cli_flags(pre: Preprocess, current: Optional[Preprocess] = None) -> str:
    """The CLI flags for ``pre``; --colour when it is not RGB, or differs from the ``current`` setting's."""
    colour = pre.colour != "rgb" or (current is not None and current.colour != pre.colour)
    return (f"--resize {pre.resize} --crop {pre.crop} --mean {' '.join(f'{m:g}' for m in pre.mean)} "
            f"--std {' '.join(f'{s:g}' for s in pre.std)}" + (f" --colour {pre.colour}" if colour else ""))


def _fit(values: Sequence[float], channels: int) -> tuple:
    """A preset for ``channels`` channels: a grey preset repeated for RGB, an RGB one averaged for grey."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (round(sum(values) / len(values), 4),)
    return values * channels if len(values) == 1 else values[:channels]


def candidate_settings(current: Preprocess, recorded: Optional[Preprocess] = None,
                       family: Optional[Preprocess] = None, sizes: Sequence[int] = COMMON_SIZES) -> list:
    """(label, Preprocess) of the first two stages, without duplicates (the first label wins)."""
    out, seen = [], set()

    def add(label, pre):
        if pre is not None and pre not in seen:
            seen.add(pre)
            out.append((label, pre))

    add("in use", current)
    add("recorded with the model", recorded)
    add("the model family's reference", family and replace(family, channels=current.channels,
                                                             mean=_fit(family.mean, current.channels),
                                                             std=_fit(family.std, current.channels)))
    for size in sizes:
        add(f"size {size}", replace(current, resize=size, crop=size))
        add(f"size {size}, centre crop", replace(current, resize=round(size / CROP_FRACTION), crop=size))
    return out


def _renormalised(pre: Preprocess) -> list:
    return [(f"{name} normalisation", replace(pre, mean=_fit(mean, pre.channels), std=_fit(std, pre.channels)))
            for name, (mean, std) in NORMALISATIONS.items()]


def colour_variants(pre: Preprocess) -> list:
    """(label, Preprocess): ``pre`` with each of :data:`COLOUR_VARIANTS` (none for a 1-channel model)."""
    if pre.channels != 3:
        return []
    return [(name, replace(pre, colour=colour)) for colour, name in COLOUR_VARIANTS.items() if colour != pre.colour]


def _sample(data: ImageFolderData, per_class: int) -> list:
    """(class index, path): ``per_class`` images of each class, spread over its (sorted) list."""
    chosen = []
    for c in data.classes:
        paths = list(c.paths)
        if len(paths) > per_class:
            step = len(paths) / per_class
            paths = [paths[int(i * step)] for i in range(per_class)]
        chosen += [(c.class_index, p) for p in paths]
    return chosen


@torch.inference_mode()
def _evaluate(model, images: list, labels: torch.Tensor, result: SettingResult, batch_size: int,
              cancel: CancelCheck) -> SettingResult:
    started = time.perf_counter()
    correct, predicted = 0, []
    try:
        for start in range(0, len(images), batch_size):
            check_cancel(cancel)
            batch = torch.stack([result.preprocess(im) for im in images[start:start + batch_size]])
            out = model(batch)
            guess = getattr(out, "logits", out).argmax(1)
            correct += int((guess == labels[start:start + batch_size]).sum())
            predicted += guess.tolist()
    except (RuntimeError, ValueError) as exc:  # e.g. a fixed-size layer refuses this input size
        result.error = f"the model cannot run on this input ({str(exc).splitlines()[0][:120]})"
    else:
        result.correct, result.images, result.predicted = correct, len(images), predicted
    result.seconds = time.perf_counter() - started
    return result


def _rank(results: list) -> list:
    """Best first: settings run on every image by their count right, then the screened-out ones by
    their accuracy on the screening images, then failures."""
    order = {id(r): i for i, r in enumerate(results)}  # ties: the earlier (in use, recorded, family) first
    return sorted(results, key=lambda r: (r.error is not None, r.screened,
                                          -(r.accuracy or 0) if r.screened else -r.correct, order[id(r)]))


def _screen_positions(labels: list, per_class: int) -> torch.Tensor:
    """Positions of ``per_class`` images of each class, spread over the class's images in the sample."""
    by_class: dict = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    chosen = []
    for positions in by_class.values():
        step = max(1.0, len(positions) / per_class)
        chosen += sorted({positions[int(j * step)] for j in range(min(per_class, len(positions)))})
    return torch.tensor(sorted(chosen), dtype=torch.long)


def check_preprocessing(session, data: ImageFolderData, *, images_per_class: int = DEFAULT_IMAGES_PER_CLASS,
                        sizes: Sequence[int] = COMMON_SIZES, batch_size: int = 32,
                        progress: Optional[ProgressFn] = None, cancel: CancelCheck = None) -> PreprocessCheck:
    """Try the plausible preprocessing settings on ``images_per_class`` labelled images per class.

    ``session`` is a :class:`phpn.api.ModelSession` (the model, its recorded preprocessing and
    the one in use). Runs on the CPU with the original model; returns the ranked settings.
    """
    if images_per_class < 1:
        raise DataError(f"images per class must be at least 1, got {images_per_class}.", "")
    chosen = _sample(data, images_per_class)
    if not chosen:
        raise DataError("The image folder has no labelled images to check with.",
                        "Scan a folder with one sub-folder of images per class.")
    images, labels, notes = [], [], []
    for c, rel in chosen:
        try:
            images.append(load_image(data.root / rel))
            labels.append(c)
        except DataError as exc:
            notes.append(f"skipped {rel}: {exc.problem}")
    if not images:
        raise DataError("None of the sampled images could be read.", "Check the image folder.")
    labels = torch.tensor(labels)
    classes = len(set(labels.tolist()))

    model = session.loaded.model.eval()
    current, recorded = session.preprocess, session.loaded.preprocess
    family = None
    try:
        family_pre = zoo.default_preprocess(session.loaded.arch)
        family = family_pre if zoo.family_of(session.loaded.arch) else None
    except Exception:  # noqa: BLE001 - not a torchvision model: no family reference
        family = None

    first = candidate_settings(current, recorded, family, sizes)
    priors = sum(1 for label, _ in first if not label.startswith("size "))
    # The grid is screened on a few images per class (a 384 px pass over every image is what makes
    # the check slow); the best few sizes then run on every image, so that the comparison with the
    # setting in use is on the same images. Screened-out settings still count as tried.
    screen = _screen_positions(labels.tolist(), SCREEN_PER_CLASS) if images_per_class > SCREEN_PER_CLASS else None
    # Stage 3 runs the best few geometries with every normalisation, stage 4 the best few settings
    # with every colour variant; count them in the total.
    total = (len(first) + BEST_SIZES_RENORMALISED * len(NORMALISATIONS)
             + (BEST_SETTINGS_RECOLOURED * (len(COLOUR_VARIANTS) - 1) if current.channels == 3 else 0))
    results, seen = [], set()
    report(progress, "check", 0, total)
    for i, (label, pre) in enumerate(first):
        seen.add(pre)
        if screen is None or i < priors:
            results.append(_evaluate(model, images, labels, SettingResult(label, pre), batch_size, cancel))
        else:
            results.append(_evaluate(model, [images[j] for j in screen], labels[screen],
                                     SettingResult(label, pre, screened=True), batch_size, cancel))
        report(progress, "check", len(results), total)
    if screen is not None:
        for r in [r for r in _rank(results) if r.screened and r.error is None][:BEST_SCREENED]:
            full = _evaluate(model, images, labels, SettingResult(r.label, r.preprocess), batch_size, cancel)
            full.seconds += r.seconds
            results[results.index(r)] = full
    geometries = []
    for r in _rank(results):
        key = (r.preprocess.resize, r.preprocess.crop)
        if r.error is None and key not in geometries:
            geometries.append(key)
    def try_variants(base: SettingResult, variants: list) -> None:
        for name, pre in variants:
            if pre not in seen:
                seen.add(pre)
                results.append(_evaluate(model, images, labels, SettingResult(f"{base.label}, {name}", pre),
                                         batch_size, cancel))
                report(progress, "check", len(results), total)

    for resize, crop in geometries[:BEST_SIZES_RENORMALISED]:
        base = next(r for r in results if (r.preprocess.resize, r.preprocess.crop) == (resize, crop))
        try_variants(base, _renormalised(base.preprocess))
    for base in [r for r in _rank(results) if r.error is None][:BEST_SETTINGS_RECOLOURED]:
        try_variants(base, colour_variants(base.preprocess))
    report(progress, "check", total, total)
    current_result = next(r for r in results if r.preprocess == current)
    return PreprocessCheck(results=_rank(results), current=current_result, images=len(images), classes=classes,
                           notes=notes, tried=results, labels=labels.tolist(),
                           folders={c.class_index: c.folder for c in data.classes})


# --- the quick setup check -------------------------------------------------------------------------

@dataclass
class SetupCheck:
    """The model at the setting in use on a labelled sample, and how much the images are scaled
    up to reach its input: what to know before any heavy work."""

    preprocess: Preprocess
    correct: int
    images: int
    classes: int
    image_side: Optional[int]  # the sample's median shorter side, in pixels
    error: Optional[str] = None  # the model cannot run at this setting

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.images if self.images and self.error is None else None

    @property
    def upsampling(self) -> Optional[float]:
        """How many times the images' shorter side is scaled up (the model's resize over the images' side)."""
        return self.preprocess.resize / self.image_side if self.image_side else None

    @property
    def near_chance(self) -> bool:
        return self.error is not None or near_chance(self.correct, self.images, self.classes)

    @property
    def upsampled(self) -> bool:
        return (self.upsampling or 0) > UPSAMPLING_WARN

    @property
    def ok(self) -> bool:
        return not (self.near_chance or self.upsampled)

    def warnings(self) -> list:
        """Plain sentences, the most serious first; empty when the setup looks right."""
        out = []
        if self.error is not None:
            out.append(f"The model cannot run on these images at the setting in use ({describe(self.preprocess)}): "
                       f"{self.error}.")
        elif self.near_chance:
            out.append(f"At the setting in use ({describe(self.preprocess)}) the model is right on only {self.correct} "
                       f"of {self.images} labelled images ({100 * self.correct / self.images:.0f}%), not clearly better "
                       f"than guessing among {self.classes} classes ({100 / self.classes:.0f}%): a discovery now would "
                       "explain a model that cannot read these inputs.")
        if self.upsampled:
            out.append(f"The images are about {self.image_side} px on their shorter side and are scaled up "
                       f"{self.upsampling:.1f}× to the model's {self.preprocess.resize} px: if the model was trained on "
                       f"images this small, its input size is likely {self.image_side} px (and a discovery at "
                       f"{self.preprocess.crop} px costs about {(self.preprocess.crop / self.image_side) ** 2:.0f}× "
                       "the work).")
        return out

    def summary(self) -> str:
        """One sentence: the accuracy at the setting in use on the sample."""
        if self.error is not None:
            return self.warnings()[0]
        return (f"At the setting in use ({describe(self.preprocess)}) the model is right on {self.correct} of "
                f"{self.images} labelled images ({100 * self.correct / self.images:.0f}%; guessing: "
                f"{100 / self.classes:.0f}%).")

    def to_dict(self) -> dict:
        return {"preprocess": self.preprocess.to_dict(), "correct": self.correct, "images": self.images,
                "classes": self.classes, "accuracy": self.accuracy, "image_side": self.image_side,
                "upsampling": self.upsampling, "near_chance": self.near_chance, "upsampled": self.upsampled,
                "error": self.error, "summary": self.summary(), "warnings": self.warnings()}


def setup_images_per_class(classes: int) -> int:
    """:data:`CHECK_IMAGES_PER_CLASS`, fewer when the classes are so many that the sample would pass
    :data:`CHECK_MAX_IMAGES` (accuracy against chance needs fewer per class then)."""
    return max(1, min(CHECK_IMAGES_PER_CLASS, CHECK_MAX_IMAGES // max(1, classes)))


@torch.inference_mode()
def setup_check(session, data: ImageFolderData, *, images_per_class: Optional[int] = None, batch_size: int = 32,
                cancel: CancelCheck = None) -> SetupCheck:
    """The model's accuracy at the setting in use on a labelled sample of ``data`` and the images'
    own size against the model's input: cheap (one pass over the sample), made before discovery."""
    per_class = images_per_class or setup_images_per_class(len(data.classes))
    chosen = _sample(data, per_class)
    if not chosen:
        raise DataError("The image folder has no labelled images to check with.",
                        "Scan a folder with one sub-folder of images per class.")
    images, labels, sides = [], [], []
    for c, rel in chosen:
        try:
            im = load_image(data.root / rel)
        except DataError:
            continue
        images.append(im)
        labels.append(c)
        sides.append(min(im.size))
    if not images:
        raise DataError("None of the sampled images could be read.", "Check the image folder.")
    sides.sort()
    result = _evaluate(session.loaded.model.eval(), images, torch.tensor(labels),
                       SettingResult("in use", session.preprocess), batch_size, cancel)
    return SetupCheck(preprocess=session.preprocess, correct=result.correct, images=len(images),
                      classes=len(set(labels)), image_side=sides[len(sides) // 2], error=result.error)
