"""timm classifiers: built by name (never downloading), loaded from the user's state dict.

``--arch timm/NAME`` (or ``arch="timm/NAME"`` in the API) builds
``timm.create_model(NAME, pretrained=False, num_classes=N)`` where N is the row count of the
classifier in the state dict (the classifier is the one ``get_classifier()`` names, not a
guess from the key order). ``NAME`` may carry a pretrained tag (``resnet50.a1_in1k``): the tag
only chooses which ``pretrained_cfg`` the preprocessing is read from.

Some timm options change the weights' names but not the model's name, e.g. a ViT built with
``global_pool='avg'`` has ``fc_norm`` instead of ``norm``. The variants in ``VARIANTS`` are
tried and the one whose keys and shapes fit exactly is used (and recorded in the notes).

Without ``--arch``, a state dict that is not torchvision's is looked up by its key-and-shape
fingerprint in ``timm_index.json`` (every model of the families in ``FAMILIES``, written by
``scripts/model_coverage.py --write-index``); the fingerprint only proposes candidates, an
exact comparison with each candidate built on the meta device decides.

timm is optional (``pip install 'phpn[timm]'``): nothing here imports it until a timm model is
asked for.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from phpn.config import INTERPOLATIONS
from phpn.errors import CheckpointError, ConfigError
from phpn.images.preprocess import Preprocess
from phpn.models.signatures import (
    SENTINEL_CLASSES,
    diff_shapes,
    ignored_key,
    sentinel_shapes,
)

PREFIX = "timm/"
INSTALL_HINT = "Install timm (pip install 'phpn[timm]', or pip install timm) and try again."
# timm's model modules, by the family names the coverage table uses.
FAMILIES = {
    "ResNet / ResNet-D": "resnet",
    "ResNetV2": "resnetv2",
    "ConvNeXt": "convnext",
    "EfficientNet / EfficientNetV2 / MobileNetV2": "efficientnet",
    "MobileNetV3": "mobilenetv3",
    "RegNet": "regnet",
    "DenseNet": "densenet",
    "ViT": "vision_transformer",
    "DeiT": "deit",
    "EVA": "eva",
    "Swin": "swin_transformer",
}
# Options that rename or drop weights without changing the model's name, tried in this order
# for token models (the first is timm's own default).
VARIANTS = {
    "vision_transformer": ({}, {"global_pool": "avg"}, {"global_pool": "avg", "class_token": False}),
    "deit": ({}, {"global_pool": "avg"}),
    "eva": ({}, {"global_pool": "avg"}),
}
INDEX_PATH = Path(__file__).with_name("timm_index.json")


def is_timm_arch(arch: Optional[str]) -> bool:
    return arch is not None and arch.strip().lower().startswith(PREFIX)


def available() -> bool:
    try:
        import timm  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        return False
    return True


def require_timm():
    try:
        import timm  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ConfigError("This is a timm model, but timm is not installed.", INSTALL_HINT) from None
    return timm


def model_name(arch: str) -> str:
    """'timm/convnext_tiny' -> 'convnext_tiny', checked against timm's registry."""
    timm = require_timm()
    name = arch.strip()[len(PREFIX):] if is_timm_arch(arch) else arch.strip()
    if not timm.is_model(name.split(".", 1)[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"Did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
            "See timm.list_models() for the names."
        raise CheckpointError(f"'{name}' is not a timm model name (timm {timm.__version__}).", hint)
    return name


def _registry_module(base: str) -> str:
    """The timm module that defines model ``base`` ("vision_transformer", ...)."""
    timm = require_timm()
    for module in VARIANTS:
        if base in timm.list_models(module=module):
            return module
    return ""


def variants(name: str) -> tuple:
    """The option sets to try for this model: timm's defaults first."""
    return VARIANTS.get(_registry_module(name.split(".", 1)[0]), ({},))


def build(name: str, num_classes: int, kwargs: Optional[dict] = None, *, empty: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)``; with ``empty`` on the meta device."""
    timm = require_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if empty:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))


@dataclass(frozen=True)
class Signature:
    shapes: dict  # key -> shape; the classifier's tensors have -1 as their first dimension
    head_weight: str  # the classifier's weight, as get_classifier() names it


def _classifier_name(model: nn.Module) -> str:
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is head and name:
            return name
    return ""


def signature_of(model: nn.Module) -> Signature:
    """Keys and shapes of a model built with ``SENTINEL_CLASSES`` classes."""
    shapes = sentinel_shapes(model)
    classifier = _classifier_name(model)
    preferred = f"{classifier}.weight" if classifier else ""
    if preferred in shapes and shapes[preferred][:1] == (-1,):
        head_weight = preferred
    else:  # a classifier get_classifier() does not name: the first tensor with the class rows
        head_weight = next((k for k, s in shapes.items() if s[:1] == (-1,) and len(s) >= 2), "")
    return Signature(shapes, head_weight)


@functools.lru_cache(maxsize=64)
def _signature(name: str, kwargs_json: str) -> Signature:
    return signature_of(build(name, SENTINEL_CLASSES, json.loads(kwargs_json), empty=True))


def signature(name: str, kwargs: Optional[dict] = None) -> Signature:
    return _signature(name, json.dumps(kwargs or {}, sort_keys=True))


def fingerprint(shapes: Mapping) -> str:
    """A short hash of the key names and shapes, the classifier's row count left out."""
    text = "\n".join(f"{k}:{','.join(map(str, s))}" for k, s in sorted(shapes.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def state_dict_fingerprint(state_dict: Mapping, head_weight: str, other_class_keys=()) -> str:
    """The fingerprint of a checkpoint whose classifier weight is ``head_weight``: the tensors of
    that layer, and those in ``other_class_keys`` (a distilled model's second head), have the
    class count as their first dimension."""
    rows = int(state_dict[head_weight].shape[0])
    layer = head_weight.rsplit(".", 1)[0] + "."
    shapes = {}
    for key, tensor in state_dict.items():
        if ignored_key(key):
            continue
        shape = tuple(tensor.shape)
        is_class_rows = key.startswith(layer) or key in other_class_keys
        shapes[key] = (-1,) + shape[1:] if shape and shape[0] == rows and is_class_rows else shape
    return fingerprint(shapes)


def class_keys_outside_head(sig: Signature) -> list:
    """Keys with the class count as first dimension outside the classifier layer (e.g. head_dist)."""
    layer = sig.head_weight.rsplit(".", 1)[0] + "."
    return [k for k, s in sig.shapes.items() if s[:1] == (-1,) and not k.startswith(layer)]


def compare(state_dict: Mapping, sig: Signature):
    """A ``signatures.ShapeDiff`` between the checkpoint and a signature (the class count is free)."""

    return diff_shapes(state_dict, sig.shapes)


# ----------------------------------------------------------------------------- loading


@dataclass
class TimmFit:
    """How a state dict fits a timm model: the options it was built with, its class count."""

    name: str
    kwargs: dict
    num_classes: int
    head_weight: str


def fit(state_dict: Mapping, name: str) -> TimmFit:
    """The variant of timm model ``name`` that the state dict fits exactly, else CheckpointError."""
    nearest = None
    for kwargs in variants(name):
        try:
            sig = signature(name, kwargs)
        except Exception:  # this option does not apply to this model
            continue
        if not sig.head_weight:  # no classifier to read the class count from
            continue
        diff = compare(state_dict, sig)
        if diff.size == 0:
            return TimmFit(name, dict(kwargs), int(state_dict[sig.head_weight].shape[0]), sig.head_weight)
        if nearest is None or diff.size < nearest[0].size:
            nearest = (diff, kwargs)
    shown = f" (built with {_kwargs_text(nearest[1])})" if nearest and nearest[1] else ""
    raise CheckpointError(
        f"The checkpoint does not fit timm's {name}{shown}: {nearest[0].describe() if nearest else 'no variant built'}.",
        "Check the timm model name given with --arch timm/NAME (the checkpoint must be that model's state_dict()).",
    )


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def load(state_dict: Mapping, arch: str, num_classes: Optional[int] = None):
    """Build the timm model ``arch`` names and load ``state_dict`` strictly.

    Returns ``(model, label, num_classes, preprocess, notes)``; the model is in eval mode on the CPU.
    """
    name = model_name(arch)
    found = fit(state_dict, name)
    if num_classes is not None and int(num_classes) != found.num_classes:
        raise CheckpointError(
            f"You asked for {num_classes} classes but the checkpoint's classifier ({found.head_weight}) has "
            f"{found.num_classes} rows, i.e. {found.num_classes} classes.",
            f"Drop --num-classes or set it to {found.num_classes}.",
        )
    model = instantiate(found, state_dict)
    notes = [f"timm model {name}" + (f" built with {_kwargs_text(found.kwargs)} (as the weights' names show)"
                                     if found.kwargs else "")]
    pre, pre_notes = preprocess_of(model, name)
    return model, PREFIX + name, found.num_classes, pre, notes + pre_notes


def instantiate(found: TimmFit, state_dict: Mapping) -> nn.Module:
    # Built without allocating, the checkpoint's tensors become the parameters (assign=True).
    model = build(found.name, found.num_classes, found.kwargs, empty=True)
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"Loading the weights into timm's {found.name} failed: {str(exc).splitlines()[0][:300]}",
                              "Check --arch.") from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # Buffers computed at construction (position indices, ...) are not in the state dict.
        model = build(found.name, found.num_classes, found.kwargs)
        model.load_state_dict(dict(state_dict), strict=True)
    return model.float().eval()


# ----------------------------------------------------------------------------- preprocessing


def preprocess_from_config(cfg: Mapping, source: str) -> tuple:
    """timm's data config (``resolve_data_config``'s keys) as a Preprocess, plus notes on what
    could not be followed exactly."""
    notes = []
    channels, height, width = (int(v) for v in cfg["input_size"])
    if height != width:
        notes.append(f"timm's input size is {height}x{width}; phpn crops squares, so it uses {min(height, width)}")
    crop = min(height, width)
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        notes.append(f"timm's crop mode '{mode}' is not supported; phpn resizes the shorter side and centre-crops")
    interpolation = str(cfg.get("interpolation") or "bilinear")
    if interpolation not in INTERPOLATIONS:
        notes.append(f"timm's interpolation '{interpolation}' is not supported; phpn uses bicubic")
        interpolation = "bicubic"
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if channels != len(mean):  # grey-scale models keep timm's 3-value defaults
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    pre = Preprocess(resize=int(math.floor(crop / crop_pct)), crop=crop, mean=mean, std=std, channels=channels,
                     interpolation=interpolation, resize_mode="square" if mode == "squash" else "shorter",
                     backend="pil", crop_offset="round", source=source)
    return pre, notes


def preprocess_of(model: nn.Module, name: str) -> tuple:
    """``(Preprocess, notes)`` from the model's ``pretrained_cfg``, as timm's
    ``resolve_data_config({}, model=model)`` + ``create_transform`` would preprocess."""
    from timm.data import resolve_data_config  # noqa: PLC0415 - optional dependency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = resolve_data_config({}, model=model)
    tag = getattr(model, "pretrained_cfg", {}).get("tag") or ""
    source = f"timm pretrained_cfg of {name.split('.', 1)[0]}{'.' + tag if tag else ''}"
    pre, notes = preprocess_from_config(cfg, source)
    return pre, [f"preprocessing: {pre.describe()}"] + notes


# ----------------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=1)
def _index() -> dict:
    try:
        return json.loads(INDEX_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"models": {}}


def index_candidates(state_dict: Mapping) -> list:
    """timm model names whose recorded fingerprint equals this state dict's."""
    index = _index()
    others = set(index.get("other_class_keys", []))
    found = []
    for head_weight in index.get("head_weights", []):
        if head_weight in state_dict and state_dict[head_weight].ndim >= 2:
            found += index["models"].get(state_dict_fingerprint(state_dict, head_weight, others), [])
    seen, out = set(), []
    for name, _kwargs in found:
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def infer(state_dict: Mapping) -> Optional[str]:
    """The one timm model this state dict is, None when none fits; CheckpointError when several
    fit (the user must say which: they may differ in padding, pooling or preprocessing)."""
    exact = exact_fits(state_dict)
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        shown = ", ".join(PREFIX + n for n in exact[:8]) + (f" and {len(exact) - 8} more" if len(exact) > 8 else "")
        raise CheckpointError(
            f"The checkpoint fits several timm models equally well: {shown}. Their weights have the same names "
            "and shapes, but they may compute differently (padding, pooling) or expect other preprocessing.",
            f"Say which one with --arch (e.g. --arch {PREFIX}{exact[0]}).",
        )
    return None


def exact_fits(state_dict: Mapping) -> list:
    """Every indexed timm model whose keys and shapes the state dict fits exactly ([] without timm)."""
    if not available():
        return []
    exact = []
    for name in index_candidates(state_dict):
        try:
            fit(state_dict, name)
        except CheckpointError:
            continue
        exact.append(name)
    return exact


def preprocess_for_name(name: str) -> Preprocess:
    """The preprocessing timm's ``pretrained_cfg`` gives model ``name`` (a tag chooses the cfg),
    read from the model built on the meta device: no weights, no download."""
    return preprocess_of(build(name, SENTINEL_CLASSES, empty=True), name)[0]


def named_in_file_name(path, names: list) -> str:
    """The timm name (with its pretrained tag) that a file name like ``resnet50.a1_in1k.pth``
    spells, for a model in ``names``; "" when it spells none."""
    stem = Path(str(path)).name
    for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    base, _, tag = stem.partition(".")
    if base not in names or not tag:
        return ""
    timm = require_timm()
    return stem if stem in timm.list_pretrained(stem) else ""


def index_entries(module: str, head_weights: set, other_class_keys: set, progress=None) -> dict:
    """fingerprint -> [[name, kwargs], ...] for every model of one timm module (slow: builds each);
    the classifiers' weight names are added to ``head_weights``, second heads' keys to
    ``other_class_keys``."""
    timm = require_timm()
    entries: dict = {}
    for name in timm.list_models(module=module):
        for kwargs in VARIANTS.get(module, ({},)):
            try:
                sig = signature_of(build(name, SENTINEL_CLASSES, kwargs, empty=True))
            except Exception:
                continue
            if not sig.head_weight:
                continue
            head_weights.add(sig.head_weight)
            other_class_keys.update(class_keys_outside_head(sig))
            entries.setdefault(fingerprint(sig.shapes), []).append([name, kwargs])
        if progress:
            progress(name)
    return entries
