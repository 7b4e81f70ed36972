"""One entry point from "a checkpoint file (and maybe an architecture)" to a ready classifier.

Which path is taken:

- no checkpoint: the built-in EfficientNet-Lite0 (ImageNet);
- the file holds a whole pickled module: only with ``trust_pickle=True``, used as it is;
- ``model_def="net.py:factory"``: the user's own architecture (runs that file; see user_code);
- the keys are EfficientNet-Lite0's: the Lite0 architecture, any number of classes;
- otherwise a torchvision architecture, named by ``arch`` or inferred from the weights.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from phpn.errors import CheckpointError, ConfigError
from phpn.head import LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models import hf, lite0, zoo
from phpn.models.checkpoint import read_checkpoint
from phpn.models.doctor import (
    TRIAL_TIME_LIMIT_S,
    TimeLimitExceeded,
    call_with_time_limit,
)
from phpn.models.user_code import build_user_model, load_into


def _is_lite0(arch: Optional[str]) -> bool:
    return arch is not None and re.sub(r"[-_\s]", "", arch.lower()) in ("efficientnetlite0", "lite0")


def load_model(checkpoint=None, *, arch: Optional[str] = None, model_def: Optional[str] = None,
               trust_pickle: bool = False, num_classes: Optional[int] = None) -> LoadedModel:
    """Load a classifier for phpn (eval mode, CPU). Every user error is a PhpnError."""
    if checkpoint is None:
        if model_def is not None or (arch is not None and not _is_lite0(arch)):
            raise ConfigError("An architecture without a checkpoint has no trained weights to decompose.",
                              "Give the checkpoint file too (phpn never downloads weights).")
        loaded = lite0.load_efficientnet_lite0()
        _check_classes(num_classes, loaded.num_classes, "the built-in EfficientNet-Lite0")
        return loaded

    if hf.is_model_folder(checkpoint):  # what Hugging Face's save_pretrained writes
        return hf.load_model_folder(checkpoint, num_classes=num_classes)
    ckpt = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    source = str(Path(checkpoint))
    if ckpt.module is not None:
        return _from_pickled_module(ckpt, source, arch, model_def, num_classes)

    sd = ckpt.state_dict
    if model_def is not None:
        model, label, notes = build_user_model(model_def, num_classes=num_classes, state_dict=sd)
        notes += load_into(model, sd, label)
        model = lite0.use_plain_swish(model).eval()
        rows = _count_classes(model, sd, Preprocess())
        _check_classes(num_classes, rows, label)
        return LoadedModel(model=model, arch=label, num_classes=rows, sha256=ckpt.sha256, preprocess=Preprocess(),
                           source=source, notes=notes + ["preprocessing: ImageNet defaults (resize 256, crop 224); "
                                                         "override them if the model was trained otherwise"])

    if _is_lite0(arch) or (arch is None and lite0.looks_like_lite0(sd)):
        model = lite0.load_lite0_weights(sd, num_classes)
        rows = int(sd["_fc.weight"].shape[0])
        return LoadedModel(model=model, arch=lite0.ARCH, num_classes=rows, sha256=ckpt.sha256,
                           preprocess=lite0.PREPROCESS, class_names=zoo.imagenet_categories() if rows == 1000 else None,
                           source=source, notes=["EfficientNet-Lite0 architecture"])

    return zoo.load_architecture(sd, arch, num_classes, sha256=ckpt.sha256, source=source, metadata=ckpt.metadata)


def _from_pickled_module(ckpt, source: str, arch, model_def, num_classes) -> LoadedModel:
    model = lite0.use_plain_swish(ckpt.module).float().eval()
    notes = ["whole pickled model, loaded because the file was trusted"]
    if arch or model_def:
        notes.append("--arch/--model-def ignored: the file holds the architecture itself")
    name, pre, names = f"pickled:{type(model).__name__}", Preprocess(), None
    if type(model).__module__.startswith("torchvision.models"):
        try:
            tv_arch, _ = zoo.infer_arch(model.state_dict())
            name, pre = tv_arch, zoo.default_preprocess(tv_arch)
            notes.append(f"recognised as torchvision {tv_arch}")
        except CheckpointError:
            pass
    rows = _count_classes(model, model.state_dict(), pre)
    _check_classes(num_classes, rows, name)
    if name in zoo.known_archs():
        names = zoo.class_names(name, rows)
    return LoadedModel(model=model, arch=name, num_classes=rows, sha256=ckpt.sha256, preprocess=pre,
                       class_names=names, source=source, notes=notes)


def _count_classes(model: nn.Module, state_dict, pre: Preprocess) -> int:
    """Classes = width of the model's output on one blank image; else the last 2-D weight's rows."""
    def forward():
        with torch.no_grad():
            return model(torch.zeros(1, pre.channels, pre.crop, pre.crop))

    try:
        out = call_with_time_limit(forward, TRIAL_TIME_LIMIT_S)
        if isinstance(out, torch.Tensor) and out.ndim == 2:
            return int(out.shape[1])
    except TimeLimitExceeded:
        raise CheckpointError(f"The model's forward pass did not finish within {TRIAL_TIME_LIMIT_S:g} s on one "
                              f"{pre.channels}x{pre.crop}x{pre.crop} image, so phpn cannot use it.",
                              "Check the model's forward (an endless loop or a wait never returns).") from None
    except Exception:  # the model may want another input size: read the weights instead
        pass
    rows = zoo.guess_num_classes(state_dict)
    if rows is None:
        raise CheckpointError("Could not tell how many classes the model has.", "Pass --num-classes.")
    return rows


def _check_classes(wanted: Optional[int], have: int, what: str) -> None:
    if wanted is not None and int(wanted) != int(have):
        raise CheckpointError(f"You asked for {wanted} classes but {what} has {have}.",
                              f"Drop --num-classes or set it to {have}.")
