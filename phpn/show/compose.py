"""One explanation, composed once: what the Explain page, the HTML report and the PNG all show.

:func:`compose_explanation` turns an :class:`phpn.show.explanation.Explanation` and its run into
an :class:`ExplanationView`: every picture with its caption, every label (the expert's names from
the notes), the waterfall from the bias to the logit, the provenance and the warnings. The three
renderers only lay the view out (Streamlit, HTML, PNG), so what the expert sees on the page is what
gets exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image

from phpn.config import MAP_OPACITY
from phpn.glossary import fidelity_warning
from phpn.images.preprocess import Preprocess
from phpn.method.certify import chance_warning, format_certificate
from phpn.runs.annotations import PrototypeNote, prototype_labels
from phpn.runs.provenance import origin_words
from phpn.show import viz
from phpn.show.pictures import seen_image

PATCH_SIZE = 96  # each top patch, boxed in its image and zoomed beside it
PATCH_COLUMNS = 2
NO_TRAINING_IMAGES = "The training images of this run are not available here."
WATERFALL_TITLE = "From the bias to the logit, prototype by prototype"


@dataclass(frozen=True)
class Panel:
    """A picture and its caption, shown ``width`` pixels wide where the layout allows."""

    picture: Image.Image
    caption: str
    width: int


@dataclass(frozen=True)
class Step:
    """One bar of the waterfall: from ``start`` to ``start + value``."""

    label: str
    value: float
    start: float
    color: str

    @property
    def end(self) -> float:
        return self.start + self.value


@dataclass(frozen=True)
class Waterfall:
    """From the bias, through each prototype's contribution, to the logit."""

    title: str
    steps: tuple  # of Step: the bias, then each prototype
    logit: float
    total_label: str = "logit"
    total_color: str = viz.TOTAL_COLOR

    @property
    def labels(self) -> list:
        return [s.label for s in self.steps]

    @property
    def values(self) -> list:
        return [s.value for s in self.steps]

    @property
    def colors(self) -> list:
        return [s.color for s in self.steps]


@dataclass(frozen=True)
class PrototypeView:
    """One prototype on this image: its name, its numbers, where it fires, what it looks for."""

    index: int
    label: str  # "prototype 2" or "prototype 2 “beak”"
    title: str  # the label as a heading (first letter capitalised)
    color: str
    flags: tuple
    description: str
    contribution: float
    mean_contribution: Optional[float]  # over the class's discovery images (None without a run)
    fidelity: Optional[float]
    summary: str  # "contributes +0.123 here (class mean +0.100; map fidelity 0.93)"
    warning: Optional[str]  # the low-fidelity warning
    where: Panel  # its map over the image, on its own scale
    grid: Panel  # the same map on the raw feature grid
    looks_like: Optional[Panel]  # its top training patches; None when none could be read


@dataclass(frozen=True)
class ExplanationView:
    """Everything shown for one image and one class, ready to lay out."""

    class_index: int
    class_name: str
    title: str  # Why “X”?
    image_name: str
    equation: str  # logit = bias + Σ prototype contributions
    chance_warning: Optional[str]
    provenance: tuple  # (what, value) rows
    overview: tuple  # of Panel: the image, all prototypes, the class map, the class map's grid
    legend: tuple  # (label, colour) per prototype
    top: tuple  # (class index, name, logit, probability), best first
    waterfall: Waterfall
    prototypes: tuple  # of PrototypeView
    patches_note: Optional[str]  # why no training patches are shown, if so
    size: int  # the overview pictures' width

    @property
    def heading(self) -> str:
        return f"{self.title} {self.equation}"


def provenance(explanation, run, *, image_name: Optional[str] = None, model_label: Optional[str] = None,
               run_label: Optional[str] = None, true_class: Optional[int] = None) -> list:
    """(what, value) rows saying where an explanation comes from: the image, the model, the run,
    the predicted and the explained class (and the labelled one when known), the certificate.
    Without a run (``None``), only the image and the classes."""
    e = explanation
    names = dict(enumerate(run.class_names)) if run is not None else {c: n for c, n, *_ in e.top}
    names.setdefault(e.class_index, e.class_name)

    def named(i):
        return f"{names.get(i, i)} ({i})"

    rows = [("Image", image_name or getattr(e, "source", "") or "an image without a name")]
    if run is not None:
        model = run.model_info
        if model_label is None:  # a run made in the app: the upload's own name and how it was loaded
            model_label = origin_words(model) or None
        if run_label is None:
            where = getattr(run, "path", None)
            run_label = f"{where}" if where else "not saved"
        rows += [("Model", f"{model_label + ' · ' if model_label else ''}{model.get('arch', '?')}, sha256 "
                           f"{str(model.get('sha256', ''))[:12]}…"),
                 ("Run", f"{run_label} · made {run.created or '?'} · k = {run.k_label}")]
    top_class, _, _, top_p = e.top[0]
    rows.append(("Predicted class", f"{named(top_class)}, probability {100 * top_p:.1f}%"))
    explained = named(e.class_index)
    if e.class_index != top_class:
        explained += " (not the predicted class: this report explains another class's score)"
    rows.append(("Explained class", explained))
    if true_class is not None:
        verdict = "the model is right" if int(true_class) == top_class else "the model is WRONG on this image"
        rows.append(("Labelled class", f"{named(int(true_class))}: {verdict}"))
    if run is not None:
        rows.append(("Certificate", format_certificate(run.recorded_certificate)))
    return rows


def waterfall(bias: float, contributions, logit: float, labels, colors, title: str = WATERFALL_TITLE) -> Waterfall:
    """The bias and each contribution as floating bars, each starting where the previous ended."""
    values = [float(bias)] + [float(c) for c in contributions]
    starts = np.concatenate([[0.0], np.cumsum(values)[:-1]])
    steps = tuple(Step(label, value, float(start), color)
                  for label, value, start, color in zip(["bias"] + list(labels), values, starts,
                                                         [viz.BIAS_COLOR] + list(colors)))
    return Waterfall(title, steps, float(logit))


def _patches(entries, color: str, seen: Callable) -> Optional[Image.Image]:
    tiles = []
    for entry in entries:
        picture = seen(entry["path"])
        if picture is not None:
            tiles.append(viz.patch_pair(picture, entry["box"], color, PATCH_SIZE))
    return viz.image_grid(tiles, columns=PATCH_COLUMNS) if tiles else None


def _prototype(e, i: int, label: str, color: str, note, meta: dict, picture, small: int, opacity: float, mode: str,
               looks: Optional[Image.Image]) -> PrototypeView:
    contribution = float(e.contributions[i])
    mean = float(meta["mean_contribution"][i]) if meta else None
    fidelity = float(meta["fidelity"][i]) if meta else None
    summary = f"contributes {contribution:+.3f} here" + (
        f" (class mean {mean:+.3f}; map fidelity {fidelity:.2f})" if meta else "")
    return PrototypeView(
        index=i, label=label, title=label[:1].upper() + label[1:], color=color, flags=tuple(note.flags),
        description=note.description, contribution=contribution, mean_contribution=mean, fidelity=fidelity,
        summary=summary, warning=fidelity_warning(fidelity),
        where=Panel(viz.prototype_overlay(picture, e.maps[i], opacity, colors=[color], mode=mode),
                    "where, on this image: " + viz.scale_caption(viz.own_scale(e.maps[i])), small),
        grid=Panel(viz.grid_image(e.maps[i], small, color=color), "raw feature grid, the same scale", small),
        looks_like=Panel(looks, "looks like: its top training patches", looks.width) if looks else None)


def compose_explanation(explanation, run=None, *, notes=None, image_root=None, preprocess=None,
                        opacity: float = MAP_OPACITY, mode: str = "bicubic", size: int = 224, patches: int = 4,
                        image_name: Optional[str] = None, model_label: Optional[str] = None,
                        run_label: Optional[str] = None, true_class: Optional[int] = None,
                        seen: Optional[Callable[[str], Optional[Image.Image]]] = None) -> ExplanationView:
    """Everything shown for ``explanation`` (one image, one class) of ``run`` (without a run, the
    pictures and numbers of the image alone: no class statistics, certificate or training patches).

    ``notes`` (phpn.runs.annotations.Annotations) name and flag the prototypes; ``image_root``
    (a folder or the Python API's in-memory images) holds the discovery images the top patches
    come from, and ``seen(path)`` reads one as the model saw it (by default from ``image_root``
    with ``preprocess``, itself by default the run's). ``opacity`` and ``mode`` (the upsampling)
    draw the maps; ``size`` is the width of the overview pictures, the prototypes' pictures are
    a little smaller; ``patches`` top patches per prototype. The image, model, run and labelled
    class name the provenance (:func:`provenance`).
    """
    e = explanation
    if preprocess is None and run is not None:
        preprocess = Preprocess.from_dict(run.preprocess_info)
    if seen is None and image_root is not None and preprocess is not None:
        def seen(path):
            return seen_image(image_root, path, preprocess)
    k = len(e.contributions)
    colors = [viz.prototype_color(i) for i in range(k)]
    labels = prototype_labels(notes, e.class_index, k)
    meta = run.class_meta(e.class_index) if run is not None else {}  # without a run: no class statistics
    picture = viz.enlarge(e.image, size)
    h, w = e.maps.shape[1:]
    class_map = e.maps.sum(0)
    overview = (
        Panel(picture, "the image as the model sees it", size),
        Panel(viz.prototype_overlay(picture, e.maps, opacity, colors=colors, mode=mode),
              "all prototypes, each on its own scale (stripes: two overlap; hatching: the class map subtracts)", size),
        Panel(viz.heat_overlay(picture, class_map, opacity, mode=mode),
              "class map = Σ prototype maps (yellow-red adds, grey hatching subtracts)", size),
        Panel(viz.grid_image(class_map, size), f"class map on the raw {h}×{w} feature grid", size),
    )
    recorded = meta.get("top_patches", [])
    prototypes = tuple(
        _prototype(e, i, labels[i], colors[i], notes.get(e.class_index, i) if notes is not None else PrototypeNote(),
                   meta, picture, int(size // 1.3), opacity, mode,
                   _patches(recorded[i][:patches] if i < len(recorded) else [], colors[i], seen) if seen else None)
        for i in range(k))
    rows = provenance(e, run, image_name=image_name, model_label=model_label, run_label=run_label,
                      true_class=true_class)
    return ExplanationView(
        class_index=int(e.class_index), class_name=e.class_name, title=f"Why “{e.class_name}”?",
        image_name=rows[0][1],
        equation=(f"logit {e.logit:.3f} = bias {e.bias:.3f} + Σ prototype contributions "
                  f"{float(np.sum(e.contributions)):.3f}"),
        chance_warning=chance_warning(run.recorded_certificate) if run is not None else None,
        provenance=tuple(rows), overview=overview, legend=tuple(zip(labels, colors)),
        top=tuple(tuple(t) for t in e.top), waterfall=waterfall(e.bias, e.contributions, e.logit, labels, colors),
        prototypes=prototypes, patches_note=NO_TRAINING_IMAGES if seen is None and run is not None else None,
        size=size)
