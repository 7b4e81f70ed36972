"""Can this model be decomposed exactly? The doctor says yes, yes-after-folding, or no and why.

It runs the same head finder as the pipeline (``split_head``) on a random input and turns
the result into a verdict a user can act on (METHOD.md section 4):

- ``exact``: features -> global average pooling -> one affine layer.
- ``exact-after-folding``: a normalisation (ConvNeXt's LayerNorm2d) or other affine layers
  sit between the pooling and the head; they fold into an equivalent single head.
- ``impossible``: the head reads one token (CLS-token ViTs), is an MLP (VGG), has
  non-linear layers after the pooling (MobileNetV3), or is something else phpn cannot read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from phpn import config as D
from phpn.errors import ConfigError, NotDecomposableError, PhpnError
from phpn.head import SIGNED_FEATURES_NMF, HeadSplit, LoadedModel
from phpn.models.split import split_head
from phpn.validation import MAX_INPUT_SIDE

VERDICTS = ("exact", "exact-after-folding", "impossible")
# The doctor's trial forward (tracing, verification) must finish within this many seconds: a
# model whose forward never returns gets a verdict instead of hanging the caller.
TRIAL_TIME_LIMIT_S = 120.0
# Larger inputs are refused before any memory is allocated for them (a typo such as --crop 100000).
MAX_TRIAL_PIXELS = MAX_INPUT_SIDE ** 2


class TimeLimitExceeded(Exception):
    """The call did not return in time (it may still be running in its thread)."""


def call_with_time_limit(fn: Callable, seconds: float):
    """Run ``fn()`` in a daemon thread and return its result, or raise TimeLimitExceeded.

    Python cannot stop a thread: a call that never returns keeps its thread (and a CPU core)
    busy until the process exits, but the caller gets control back.
    """
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            result["error"] = exc

    thread = threading.Thread(target=target, name="phpn-trial-forward", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeLimitExceeded(f"did not return within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def non_finite_weights(model: nn.Module, limit: int = 3) -> list:
    """Names of the first parameters or buffers holding NaN or infinite values."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


@dataclass
class Diagnosis:
    verdict: str  # one of VERDICTS
    reason: str  # one or two sentences for the user
    split: Optional[HeadSplit] = None
    feature_shape: Optional[tuple] = None  # (D, H, W) for the input size checked
    notes: list = field(default_factory=list)
    arch: str = ""
    input_size: tuple = ()

    @property
    def decomposable(self) -> bool:
        return self.verdict != "impossible"

    def to_dict(self) -> dict:
        split = None
        if self.split is not None:
            s = self.split
            split = {
                "feature_layer": s.feature_layer, "head_layer": s.head_layer,
                "num_classes": s.num_classes, "num_features": s.num_features,
                "post_pool_norm": s.folded, "folded_layers": list(s.folded_layers),
                "signed_features": bool(s.signed_features),
            }
        return {
            "verdict": self.verdict, "reason": self.reason, "arch": self.arch,
            "input_size": list(self.input_size),
            "feature_shape": list(self.feature_shape) if self.feature_shape else None,
            "split": split, "notes": list(self.notes),
        }


def one_position_caution(feature_shape: tuple, feature_layer: str = "") -> Optional[str]:
    """What a feature map with fewer than ``MIN_POSITIONS_PER_IMAGE`` positions per image (1x1)
    means for the explanations, or None. Not a refusal: the decomposition stays exact and the
    prototypes still say what the model looks for, but their where-maps have one cell."""
    _, h, w = (int(v) for v in feature_shape)
    if h * w >= D.MIN_POSITIONS_PER_IMAGE:
        return None
    where = f" ('{feature_layer}')" if feature_layer else ""
    return (f"The feature map{where} is {h}x{w} at this input size: every image is one position, so the prototypes "
            "say what the model looks for but their where-maps cannot point anywhere in the image (a CIFAR ResNet "
            "at 32 px, or timm's VGG, whose last convolution covers the whole 7x7 map). For where-maps, use a "
            "larger input if the model works at one (its feature map grows with the crop), or a model whose last "
            "feature map keeps a grid of positions.")


def feature_positions_problem(feature_shape: tuple, *, k: int, class_images: dict) -> Optional[PhpnError]:
    """Why NMF cannot find ``k`` parts, or None: a class (name -> image count in ``class_images``)
    with fewer feature vectors (images x positions) than the ``k`` parts asked."""
    _, h, w = (int(v) for v in feature_shape)
    short = {name: n for name, n in class_images.items() if n * h * w < k}
    if not short:
        return None
    name, n = next(iter(short.items()))
    more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
    return ConfigError(
        f"Class '{name}'{more} has {n} image{'s' if n != 1 else ''} x {h * w} positions = {n * h * w} "
        f"feature vectors, fewer than the {k} parts asked: NMF cannot find {k} parts in them.",
        "Lower k or add images to that class.")


def diagnose(loaded_or_model, input_size: Optional[tuple] = None, *, feature_layer: Optional[str] = None,
             head_layer: Optional[str] = None, time_limit_s: float = TRIAL_TIME_LIMIT_S) -> Diagnosis:
    """Check whether the model decomposes exactly; never raises NotDecomposableError.

    ``input_size`` is (channels, height, width); by default the loaded model's crop
    (channels x crop x crop) or 3x224x224 for a bare module. ``feature_layer`` /
    ``head_layer`` name the cut by hand when the automatic search cannot find it. The verdict
    needs finite weights and finite logits on the trial input, and the trial (tracing and
    forward passes) must finish within ``time_limit_s``.
    """
    if isinstance(loaded_or_model, LoadedModel):
        model, arch = loaded_or_model.model, loaded_or_model.arch
        pre = loaded_or_model.preprocess
        default = (getattr(pre, "channels", 3), getattr(pre, "crop", 224), getattr(pre, "crop", 224))
    elif isinstance(loaded_or_model, nn.Module):
        model, arch, default = loaded_or_model, type(loaded_or_model).__name__, (3, 224, 224)
    else:
        raise TypeError(f"diagnose needs a LoadedModel or an nn.Module, not {type(loaded_or_model).__name__}")
    size = tuple(int(v) for v in (input_size or default))
    if len(size) != 3 or min(size) < 1:
        raise PhpnError(f"The input size {size} is not (channels, height, width) with positive values.",
                        "Check --crop and the model's input channels.")
    if size[1] * size[2] > MAX_TRIAL_PIXELS:
        raise PhpnError(f"The input size {size[1]}x{size[2]} is far larger than any classifier's input "
                        f"(at most {MAX_TRIAL_PIXELS:,} pixels are tried).", "Check --crop and --resize.")
    x = torch.randn((2,) + size, generator=torch.Generator().manual_seed(0))
    bad = non_finite_weights(model)
    if bad:
        return Diagnosis("impossible", f"The model's weights contain NaN or infinite values (in {', '.join(bad)}), "
                         "so its logits are not numbers phpn can decompose.",
                         notes=["the checkpoint is damaged or the training diverged: use an earlier checkpoint"],
                         arch=arch, input_size=size)

    def trial():
        split = split_head(model, example_input=x, feature_layer=feature_layer, head_layer=head_layer)
        with torch.no_grad():
            feats = split.backbone(x[:1].to(split.weight.dtype))
            logits = model(x[:1])
        return split, feats, logits

    try:
        split, feats, logits = call_with_time_limit(trial, time_limit_s)
    except TimeLimitExceeded:
        return Diagnosis("impossible", f"The model's forward pass did not finish within {time_limit_s:g} s on a "
                         f"{'x'.join(map(str, (2,) + size))} input, so phpn could not check it.",
                         notes=["a forward that never returns (an endless loop, a wait) cannot be decomposed; "
                                "fix the model, or check the input size if it is just very slow"],
                         arch=arch, input_size=size)
    except NotDecomposableError as err:
        return Diagnosis("impossible", err.problem, notes=list(getattr(err, "notes", [])), arch=arch, input_size=size)
    except PhpnError:
        raise  # the user's input (a layer name, an input size) is wrong: they can fix it
    except Exception as exc:  # a model phpn cannot analyse should get a verdict, not a traceback
        return Diagnosis("impossible", f"phpn could not analyse this model's head ({type(exc).__name__}: {exc}).",
                         notes=["name the layers with --feature-layer and --head-layer to skip the automatic search"],
                         arch=arch, input_size=size)

    feature_shape = tuple(int(v) for v in feats.shape[1:])
    logits = logits[0] if isinstance(logits, (tuple, list)) else getattr(logits, "logits", logits)
    finite = all(bool(torch.isfinite(t).all()) for t in (split.weight, split.bias, feats)
                 if isinstance(t, torch.Tensor))
    if finite and isinstance(logits, torch.Tensor):
        finite = bool(torch.isfinite(logits).all())
    if not finite:
        return Diagnosis("impossible", "The model gives NaN or infinite values (features, head weights or logits) "
                         "on the trial input, so its logits are not numbers phpn can decompose.",
                         notes=["check the checkpoint (a diverged training?) and the preprocessing"],
                         arch=arch, input_size=size)
    caution = one_position_caution(feature_shape, split.feature_layer)
    folded = split.folded or bool(split.folded_layers)
    verdict = "exact-after-folding" if folded else "exact"
    return Diagnosis(verdict, _reason(split, verdict), split=split, feature_shape=feature_shape,
                     notes=([caution] if caution else []) + list(split.notes), arch=arch, input_size=size)


def _pool_text(split: HeadSplit) -> str:
    note = next((n for n in split.notes if n.startswith("pooling: ")), "")
    return note[len("pooling: "):] or "global average pooling"


def _reason(split: HeadSplit, verdict: str) -> str:
    if split.folded:
        norm = next((n for n in split.folded_layers if n != split.head_layer), "the normalisation")
        text = (f"The LayerNorm '{norm}' after the pooling folds into the head: each logit is "
                "(1/sigma) * z . v' + b' with v' = g*v - mean(g*v), exact up to float rounding, and each image's "
                "contributions are scaled by 1/sigma of its pooled features.")
    elif verdict == "exact-after-folding":
        text = (f"The layers after the pooling ({', '.join(split.folded_layers)}, then '{split.head_layer}') are "
                "all affine and fold into one linear head, so the decomposition reproduces the logits exactly.")
    else:
        text = (f"The model ends in global average pooling ({_pool_text(split)}) followed by one linear layer "
                f"('{split.head_layer}'), so each logit is exactly the mean over positions of per-position scores.")
    if split.signed_features:
        text += f" Its features can be negative (no ReLU before the pooling): {SIGNED_FEATURES_NMF}."
    return text
