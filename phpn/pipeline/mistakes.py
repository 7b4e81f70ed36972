"""Mistakes first: the model's predictions over a labelled folder, and "why A and not B".

- :func:`predict_folder`: every image of a labelled folder (class folders matched to the
  model's classes) through the original model; :class:`FolderPredictions` orders them
  mistakes first, counts the confusions and the accuracy per class.
- :func:`contrast_image`: the two classes' prototype contributions on the same image. Since
  each class's logit is its bias plus its prototypes' contributions, the logit gap is

      logit_A − logit_B = (b_A − b_B) + Σ_i c_A,i − Σ_j c_B,j

  exactly; :meth:`Contrast.steps` lists these terms in order, for a waterfall.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from phpn.config import class_name, class_names_or_indices
from phpn.errors import DataError, PhpnError
from phpn.images.batches import load_batch
from phpn.images.folders import ImageFolderData, scan_image_folder
from phpn.images.preprocess import load_image
from phpn.method.certify import CancelCheck, check_cancel
from phpn.progress import ProgressFn, report
from phpn.runs.annotations import prototype_labels
from phpn.show.pictures import in_model_colours


@dataclass
class Prediction:
    """One labelled image and what the model made of it."""

    path: str  # relative to the folder's root
    true_class: int
    predicted: int
    confidence: float  # the model's probability for its prediction
    true_probability: float  # ... and for the true class
    runner_up: int  # the second class (the best other class when the prediction is right)

    @property
    def correct(self) -> bool:
        return self.predicted == self.true_class

    @property
    def rival(self) -> int:
        """The class to contrast with: the prediction when wrong, else the runner-up."""
        return self.runner_up if self.correct else self.predicted

    @property
    def contrast(self) -> tuple:
        """(A, B) of "why A and not B": the prediction against the label; when right, against the runner-up."""
        return self.predicted, self.rival if self.correct else self.true_class

    def to_dict(self) -> dict:
        return {"path": self.path, "true_class": self.true_class, "predicted": self.predicted,
                "correct": self.correct, "confidence": self.confidence, "true_probability": self.true_probability,
                "runner_up": self.runner_up}


@dataclass
class FolderPredictions:
    root: Path
    predictions: list  # list[Prediction], in folder order
    class_names: list
    skipped: list = field(default_factory=list)  # (relative path, why)
    folders: dict = field(default_factory=dict)  # class index -> folder name

    @property
    def images(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.images if self.images else None

    def name(self, index: int) -> str:
        return class_name(self.class_names, index)

    def mistakes_first(self) -> list:
        """Mistakes, the most confident first; then the right ones, the least sure first."""
        wrong = sorted((p for p in self.predictions if not p.correct), key=lambda p: -p.confidence)
        right = sorted((p for p in self.predictions if p.correct), key=lambda p: p.confidence)
        return wrong + right

    def confusions(self, top: int = 10) -> list:
        """The most frequent mistakes: {true, predicted, count, share of the true class's images}."""
        totals, pairs = {}, {}
        for p in self.predictions:
            totals[p.true_class] = totals.get(p.true_class, 0) + 1
            if not p.correct:
                pairs[(p.true_class, p.predicted)] = pairs.get((p.true_class, p.predicted), 0) + 1
        ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        return [{"true": t, "predicted": q, "true_name": self.name(t), "predicted_name": self.name(q), "count": n,
                 "share": n / totals[t]} for (t, q), n in ranked]

    def confusion_matrix(self, max_classes: int = 20) -> tuple:
        """(classes, counts): ``counts[i, j]`` images of true class ``classes[i]`` predicted as
        ``classes[j]``, over every class that occurs; beyond ``max_classes`` classes, over those in
        the most mistakes (as the truth or the prediction), so that the matrix stays readable."""
        involved = {}
        for p in self.predictions:
            for c in (p.true_class, p.predicted):
                involved[c] = involved.get(c, 0) + (0 if p.correct else 1)
        ranked = sorted(involved, key=lambda c: (-involved[c], c))[:max(1, int(max_classes))]
        classes = sorted(ranked)
        row = {c: i for i, c in enumerate(classes)}
        counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for p in self.predictions:
            if p.true_class in row and p.predicted in row:
                counts[row[p.true_class], row[p.predicted]] += 1
        return classes, counts

    def open_cell(self, true_class: int, predicted: int) -> Optional[tuple]:
        """The story of one cell of the confusion matrix: (its image, class A, class B) for "why A
        and not B": its most confident mistake, A the prediction and B the truth; on the diagonal,
        the least sure right image, B its runner-up. None for an empty cell."""
        example = next((p for p in self.mistakes_first() if p.true_class == int(true_class)
                        and p.predicted == int(predicted)), None)
        return None if example is None else (example, *example.contrast)

    def per_class(self) -> list:
        """{class, name, images, correct, accuracy} per true class, the worst first."""
        rows = {}
        for p in self.predictions:
            r = rows.setdefault(p.true_class, {"class": p.true_class, "name": self.name(p.true_class), "images": 0,
                                                "correct": 0})
            r["images"] += 1
            r["correct"] += int(p.correct)
        out = list(rows.values())
        for r in out:
            r["accuracy"] = r["correct"] / r["images"]
        return sorted(out, key=lambda r: (r["accuracy"], r["class"]))

    def class_order_hint(self) -> Optional[str]:
        return class_order_hint([p.true_class for p in self.predictions], [p.predicted for p in self.predictions],
                                self.folders)

    def summary(self) -> str:
        if not self.images:
            return "No labelled image could be read."
        wrong = self.images - self.correct
        text = (f"The model is right on {self.correct} of {self.images} labelled images "
                f"({100 * self.accuracy:.1f}%); {wrong} mistake{'s' if wrong != 1 else ''}.")
        confusions = self.confusions(top=1)
        if confusions:
            c = confusions[0]
            text += (f" Most frequent: {c['true_name']} taken for {c['predicted_name']} ({c['count']} of the "
                     f"{c['true_name']} images).")
        return text


# The labelled image sets a visitor can measure on (Mistakes, Audit, switching prototypes off).
HELD_OUT_IMAGES = "The demo's held-out images"
LOADED_IMAGES = "The images loaded on Model & data"
UPLOADED_FOLDER = "Upload a zip of a labelled folder"
SERVER_FOLDER = "Labelled folder on this server"


@dataclass(frozen=True)
class LabelledSet:
    """One labelled image set on offer: what the visitor picks, where it is, how results name it."""

    choice: str  # the option's words
    root: Optional[Path]  # None: the visitor gives the folder (a zip, a path)
    words: str  # how a result names it: "measured on <words>"
    discovery: bool = False  # the images the run's prototypes were found on: an optimistic accuracy


def labelled_sets(held_out=None, loaded=None, *, loaded_label: str = "", run_root: Optional[str] = None,
                  upload: bool = True, server: bool = True) -> list:
    """The labelled sets on offer, held-out images first (the default: a number measured on images
    discovery did not see is the fair one). ``held_out``: the demo's held-out folder; ``loaded``:
    the folder loaded on Model & data, recorded in runs as ``loaded_label``: with ``run_root``
    (the image folder the run records) it is known to be the run's discovery images when they match."""
    sets = []
    if held_out is not None:
        sets.append(LabelledSet(HELD_OUT_IMAGES, Path(held_out), "the demo's held-out images"))
    if loaded is not None:
        discovery = bool(loaded_label) and run_root == loaded_label
        sets.append(LabelledSet(LOADED_IMAGES, Path(loaded), "the discovery images (loaded on Model & data)"
                                if discovery else "the images loaded on Model & data", discovery))
    if upload:
        sets.append(LabelledSet(UPLOADED_FOLDER, None, "an uploaded labelled folder"))
    if server:
        sets.append(LabelledSet(SERVER_FOLDER, None, "a labelled folder on this server"))
    return sets


def confusion_pick(points: Sequence[dict], classes: Sequence[int]) -> Optional[tuple]:
    """The cell (true class, predicted class) that a click on the confusion matrix picked, from the
    chart's selected points (Streamlit's plotly selection: each point's ``customdata`` is
    [true, predicted], else its x (predicted) and y (true) are positions in ``classes``); the
    last point when several are selected; None when nothing (or nothing of the matrix) is."""
    for point in reversed(list(points or [])):
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return int(data[0]), int(data[1])
        x, y = point.get("x"), point.get("y")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and float(x).is_integer() \
                and float(y).is_integer() and 0 <= x < len(classes) and 0 <= y < len(classes):
            return int(classes[int(y)]), int(classes[int(x)])
    return None


def majorities(labels: Sequence[int], predicted: Sequence[int]) -> dict:
    """true class -> (the class the model reads it as most, how often, of how many images)."""
    by_class = {}
    for truth, guess in zip(labels, predicted):
        by_class.setdefault(int(truth), []).append(int(guess))
    out = {}
    for truth, guesses in by_class.items():
        top = max(sorted(set(guesses)), key=guesses.count)
        out[truth] = (top, guesses.count(top), len(guesses))
    return out


def class_order_hint(labels: Sequence[int], predicted: Sequence[int], folders: dict,
                     setting: str = "") -> Optional[str]:
    """When most folders' images are read consistently (at least 2 in 3) as one *other* class,
    the folders are matched to the wrong classes: say which, with the counts; else None."""
    found = majorities(labels, predicted)
    swapped = [(t, g, n, m) for t, (g, n, m) in sorted(found.items()) if g != t and n * 3 >= m * 2]
    if not found or len(swapped) * 2 < len(found):
        return None
    examples = "; ".join(f"folder '{folders.get(t, t)}' (matched to class {t}) is read as class {g} on {n} of {m} "
                         "images" for t, g, n, m in swapped[:4])
    where = f" ({setting})" if setting else ""
    return (f"The class order looks wrong{where}: {examples}. Check the class-names file, or name each folder by "
            "its class index or class name.")


def folder_labels(root, session) -> dict:
    """{class folder name: model class index} for a labelled folder, matched as for discovery;
    {} when the folders do not match the model's classes (the images then have no labels)."""
    try:
        found = scan_image_folder(root, class_names=session.loaded.class_names, num_classes=session.loaded.num_classes,
                                  images_per_class=1, verify=False)
    except PhpnError:
        return {}
    return {c.folder: c.class_index for c in found.classes}


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return getattr(out, "logits", out).float()


@torch.inference_mode()
def predict_folder(session, data: ImageFolderData, *, batch_size: int = 32, device="cpu",
                   progress: Optional[ProgressFn] = None, cancel: CancelCheck = None) -> FolderPredictions:
    """The original model's prediction for every image of ``data`` (its class folder is its label)."""
    device = torch.device(device)
    model = session.loaded.model.eval()
    if device.type != "cpu":
        model = copy.deepcopy(model).to(device)  # never move a shared model off the CPU
    items = [(c.class_index, p) for c in data.classes for p in c.paths]
    if not items:
        raise DataError("The folder has no labelled images.", "Give a folder with one sub-folder of images per class.")
    predictions, skipped = [], list(data.skipped)
    report(progress, "predict", 0, len(items))
    for start in range(0, len(items), batch_size):
        check_cancel(cancel)
        chunk = dict((p, c) for c, p in items[start:start + batch_size])
        batch, kept, bad = load_batch(data.root, list(chunk), session.preprocess)
        skipped += bad
        if kept:
            probs = torch.softmax(_logits(model, batch.to(device)).double(), 1).cpu()
            top2 = torch.topk(probs, k=min(2, probs.shape[1]), dim=1).indices
            for row, rel in enumerate(kept):
                truth = chunk[rel]
                first = int(top2[row, 0])
                second = int(top2[row, 1]) if top2.shape[1] > 1 else first
                predictions.append(Prediction(path=rel, true_class=truth, predicted=first,
                                              confidence=float(probs[row, first]),
                                              true_probability=float(probs[row, truth]) if truth < probs.shape[1] else 0.0,
                                              runner_up=second))
        report(progress, "predict", min(start + batch_size, len(items)), len(items))
    # The folders name the classes of a model without names (the same rule as a run's records).
    names = class_names_or_indices(session.loaded.class_names or data.class_names, session.loaded.num_classes)
    return FolderPredictions(root=Path(data.root), predictions=predictions, class_names=names,
                             skipped=skipped, folders={c.class_index: c.folder for c in data.classes})


@dataclass
class Contrast:
    """Why class A and not class B on one image: both classes' prototypes side by side."""

    image: Image.Image  # what the model sees
    class_a: int
    class_b: int
    name_a: str
    name_b: str
    logit_a: float
    logit_b: float
    bias_a: float
    bias_b: float
    contributions_a: np.ndarray  # (k,)
    contributions_b: np.ndarray  # (k,)
    maps_a: np.ndarray  # (k, H, W) on the feature grid
    maps_b: np.ndarray
    labels_a: list  # each prototype as named (the expert's notes, else "prototype N")
    labels_b: list

    @property
    def gap(self) -> float:
        """logit_A − logit_B: positive when the model prefers A."""
        return self.logit_a - self.logit_b

    def steps(self) -> list:
        """(label, value) from the bias difference to the gap: A's prototypes add, B's subtract."""
        out = [(f"bias {self.name_a} − bias {self.name_b}", self.bias_a - self.bias_b)]
        out += [(f"{self.name_a}: {lab}", float(c)) for lab, c in zip(self.labels_a, self.contributions_a)]
        out += [(f"{self.name_b}: {lab}", -float(c)) for lab, c in zip(self.labels_b, self.contributions_b)]
        return out

    def story(self, shown: int = 2) -> str:
        """The contrast in plain words: which parts tipped the balance, by the expert's names."""
        a, b = f"“{self.name_a}”", f"“{self.name_b}”"
        winner, loser = (a, b) if self.gap >= 0 else (b, a)
        text = (f"The model gives each class a score: a fixed starting value (its bias) plus what each of its "
                f"prototypes finds in this image. Here {winner} scores {abs(self.gap):.2f} more than {loser}")
        bias = self.bias_a - self.bias_b
        if abs(bias) >= 0.5 * abs(self.gap) and abs(bias) > 1e-9:
            favoured = a if bias > 0 else b
            text += f"; {abs(bias):.2f} of that difference in starting values favours {favoured} before any part is seen"
        terms = [(f"{a}'s {lab}", float(c)) for lab, c in zip(self.labels_a, self.contributions_a)]
        terms += [(f"{b}'s {lab}", -float(c)) for lab, c in zip(self.labels_b, self.contributions_b)]
        sign = 1.0 if self.gap >= 0 else -1.0
        pro = sorted((t for t in terms if sign * t[1] > 0), key=lambda t: -abs(t[1]))[:shown]
        con = sorted((t for t in terms if sign * t[1] < 0), key=lambda t: -abs(t[1]))[:shown]
        if pro:
            text += (". The parts that make the difference: "
                     + ", ".join(f"{lab} ({abs(v):.2f} for {winner})" for lab, v in pro))
        if con:
            text += "; against it: " + ", ".join(f"{lab} ({abs(v):.2f} for {loser})" for lab, v in con)
        return text + "."

    def to_dict(self) -> dict:
        return {"class_a": self.class_a, "class_b": self.class_b, "name_a": self.name_a, "name_b": self.name_b,
                "logit_a": self.logit_a, "logit_b": self.logit_b, "gap": self.gap,
                "contributions_a": [float(c) for c in self.contributions_a],
                "contributions_b": [float(c) for c in self.contributions_b],
                "labels_a": list(self.labels_a), "labels_b": list(self.labels_b),
                "steps": [{"label": lab, "value": v} for lab, v in self.steps()], "story": self.story()}


@torch.inference_mode()
def contrast_image(session, network, image, class_a: int, class_b: int,
                   class_names: Optional[Sequence[str]] = None, notes=None) -> Contrast:
    """Both classes' prototype contributions and maps on ``image`` (path, file or PIL image).

    Both classes must have prototypes in the run (a clear error names the one that has not).
    With ``notes`` (the run's :class:`phpn.runs.annotations.Annotations`) prototypes are called by
    the expert's names where they have one.
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    names = list(class_names or session.class_names)
    if int(class_a) == int(class_b):
        raise DataError("Pick two different classes to compare.", "")
    seen = session.preprocess.geometry(image)
    x = session.preprocess.normalise(seen)[None]
    feats = network.backbone(x.to(network.backbone_device)).float()
    out = network.explain_features(feats, classes=[int(class_a), int(class_b)])
    contrib = out.contributions[0].double().cpu().numpy()
    maps = out.maps[0].cpu().numpy()
    ka, kb = network.class_k(int(class_a)), network.class_k(int(class_b))  # each class's own k (--k auto)
    logits, bias = out.logits[0], out.bias
    return Contrast(image=in_model_colours(seen, session.preprocess), class_a=int(class_a), class_b=int(class_b), name_a=names[int(class_a)],
                    name_b=names[int(class_b)], logit_a=float(logits[class_a]), logit_b=float(logits[class_b]),
                    bias_a=float(bias[class_a]), bias_b=float(bias[class_b]), contributions_a=contrib[0, :ka],
                    contributions_b=contrib[1, :kb], maps_a=maps[0, :ka], maps_b=maps[1, :kb],
                    labels_a=prototype_labels(notes, int(class_a), ka),
                    labels_b=prototype_labels(notes, int(class_b), kb))
