"""Cached across sessions: models (one per load spec, their forward cost counted), scanned
image folders, and the pictures and patch grids the pages draw."""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import streamlit as st

from phpn.api import open_model
from phpn.app import serving
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess, load_image
from phpn.runs.provenance import (
    describe_origin,
)
from phpn.show import viz
from phpn.show.pictures import seen_picture

# --- cached resources ------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """A model shared by every session that loads the same thing: read-only by convention."""

    session: object  # phpn.api.ModelSession
    key: str
    label: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    spec: dict = field(default_factory=dict)  # the arguments load_model_entry was given (how to load it again)
    cost: Optional["serving.ForwardCost"] = None  # one image's forward pass at the input size it was opened at

    @property
    def decomposable(self) -> bool:
        return self.session.diagnosis.split is not None

    def session_for(self, device: str):
        """The shared session for CPU work (inference only, nothing is moved or changed); a
        private copy for a GPU, so the cached model is never moved off the CPU under the
        feet of other sessions."""
        if str(device).startswith("cuda"):
            with self.lock:
                return copy.deepcopy(self.session)
        return self.session


def _freeze(spec: dict) -> tuple:
    def f(v):
        if isinstance(v, (list, tuple)):
            return tuple(f(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, f(x)) for k, x in v.items()))
        return v

    return tuple(sorted((k, f(v)) for k, v in spec.items() if v is not None))


@st.cache_resource(max_entries=6, show_spinner=False)
def _load_model_entry(spec: tuple, _given: dict, _base: Optional[ModelEntry] = None) -> ModelEntry:
    """``_base``: the same model opened at its own preprocessing, whose loaded weights this entry shares."""
    s = dict(spec)
    if s.get("model_def") or s.get("trust_pickle"):
        serving.require_code_allowed("a model file" if s.get("model_def") else "a trusted (pickled) checkpoint")
    pre = Preprocess.from_dict(dict(s["preprocess"])) if "preprocess" in s else None
    # A visitor's code: only ever in a jailed worker; their weights too when the operator says so.
    if serving.isolated(s):
        session = serving.open_jailed_session(
            {**s, "preprocess": dict(s["preprocess"]) if "preprocess" in s else None,
             "overrides": dict(s["overrides"]) if "overrides" in s else None},
            class_names=list(s["class_names"]) if "class_names" in s else None)
    elif _base is not None:  # the loaded model is shared with the entry it came from
        with _base.lock:
            session = open_model(_base.session, preprocess=pre, overrides=dict(s["overrides"]) if "overrides" in s else None,
                                 feature_layer=s.get("feature_layer"), head_layer=s.get("head_layer"))
    else:
        session = open_model(s.get("checkpoint"), demo=s.get("demo"), arch=s.get("arch"), model_def=s.get("model_def"),
                             trust_pickle=bool(s.get("trust_pickle", False)), num_classes=s.get("num_classes"),
                             class_names=list(s["class_names"]) if "class_names" in s else None, preprocess=pre,
                             overrides=dict(s["overrides"]) if "overrides" in s else None,
                             feature_layer=s.get("feature_layer"), head_layer=s.get("head_layer"))
    cost = _checked_cost(session)
    if s.get("demo"):
        label = f"demo: {s['demo']}"
    elif s.get("origin"):  # an upload by its own name and how it came, not where the server keeps it

        origin = dict(s["origin"])
        label = origin.get("name") or Path(str(s.get("checkpoint"))).name
        session.loaded = replace(session.loaded, source=describe_origin(origin))
    else:
        label = Path(str(s.get("checkpoint"))).name
    return ModelEntry(session=session, key=repr(spec), label=label, lock=_base.lock if _base else threading.RLock(),
                      spec=copy.deepcopy({k: v for k, v in _given.items() if v is not None}), cost=cost)


def _checked_cost(session) -> Optional["serving.ForwardCost"]:
    """One image's forward cost at the size the model was opened at (counted in its jailed worker,
    or here), refused when over the operator's budget."""
    worker = serving.jailed_worker(session)
    if worker is not None:
        return worker.cost  # counted and checked in the worker's trial
    size = tuple(session.diagnosis.input_size or ())
    if len(size) != 3:
        return None
    cost = serving.measure_cost(session.loaded.model, size)
    serving.check_forward_cost(size[1], size[2], cost)
    return cost


def _asked_side(spec: dict) -> Optional[int]:
    """The input side (the crop) that ``spec``'s preprocessing asks for, if it asks for one."""
    crops = [(spec.get(key) or {}).get("crop") for key in ("overrides", "preprocess")]
    return next((int(c) for c in crops if c), None)


def load_model_entry(**spec) -> ModelEntry:
    """The cached model for ``spec``; a visitor's code (model file, trusted pickle) runs only if
    the operator allows it, and only in a jailed worker (phpn.app.serving.jail) that loads and
    tries it, then serves every forward pass (a worker that was killed starts again when used).
    A visitor's weights-only model goes to such a worker too when the operator sets
    PHPN_ISOLATE_ALL_MODELS.

    An input size asked for (the preprocessing's crop) is checked against the pixel cap before any
    model is built, and against the model's forward cost (counted at its own input size, from
    the model as opened without that preprocessing: usually cached already) before the model
    runs at that size."""
    serving.check_request_pixels(spec)  # the input's size, before any model is built
    side, base = _asked_side(spec), None
    if side is not None and not serving.isolated(spec):  # a jailed model's trial counts its cost in the jail
        own = {k: v for k, v in spec.items() if k not in ("overrides", "preprocess")}
        try:
            base = _load_model_entry(_freeze(own), own)
        except Exception:  # noqa: BLE001 - it does not open at its own size: its cost is counted at the size asked
            base = None
        if base is not None:
            serving.check_forward_cost(side, side, base.cost)
    return _load_model_entry(_freeze(spec), spec, base)


@st.cache_data(max_entries=32, show_spinner=False)
def _scan(root: str, class_names: Optional[tuple], num_classes: Optional[int], cap: Optional[int], seed: int,
          mtime: float):
    return scan_image_folder(root, class_names=list(class_names) if class_names else None, num_classes=num_classes,
                             images_per_class=cap, seed=seed)


def scan_data(entry: ModelEntry, root, cap: Optional[int], seed: int = 0):
    loaded = entry.session.loaded
    root = Path(root)
    mtime = root.stat().st_mtime if root.exists() else 0.0
    names = tuple(loaded.class_names) if loaded.class_names else None
    # Under an operator's data root every entry is resolved on its own: a link out of it is refused.
    serving.check_confined(root)
    return _scan(str(root), names, int(loaded.num_classes), cap, int(seed), mtime)


@st.cache_data(max_entries=4096, show_spinner=False)
def seen_image(path: str, preprocess_key: tuple) -> Optional[np.ndarray]:
    """The picture the model sees (resized, cropped; grey in RGB for a grey model) of an image file, or None."""
    try:
        return np.asarray(seen_picture(load_image(path), Preprocess.from_dict(dict(preprocess_key))))
    except Exception:
        return None


@st.cache_data(max_entries=512, show_spinner=False)
def patch_grid(root: str, entries: tuple, color: str, pre_key: tuple, size: int, columns: int):
    """Top patches as one picture: each (path, box) drawn as a tile with its box."""
    images, boxes = [], []
    for path, box in entries:
        seen = seen_image(str(Path(root) / path), pre_key)
        if seen is not None:  # an image that no longer decodes is left out, not fatal
            images.append(seen)
            boxes.append(box)
    return np.asarray(viz.patch_grid(images, boxes, color, size, columns)) if images else None


def preprocess_key(pre) -> tuple:
    return _freeze(pre.to_dict())
