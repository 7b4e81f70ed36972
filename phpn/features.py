"""Feature extraction: images -> the unpooled feature map the head reads (and the model's logits).

Images are decoded by worker processes (:func:`phpn.data.iter_batches`) while the model runs;
batches run under ``torch.inference_mode``, on CUDA from pinned memory, channels_last, and with
bf16 autocast when asked. Features come back as float32 (B, D, H, W).

:class:`FeatureTap` runs the *whole* model once per batch and catches the feature map at the
cut on its way through, so one pass gives both the features discovery needs and the model's
own logits the certificate compares against. The catch is checked on the first batch against
the backbone (same features) and the head (same logits); when it cannot be set up or does not
check out, the tap falls back to two passes (backbone, then model) and says why.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import fx

from .models.head import HeadSplit

# The first batch's caught features must match the backbone's own output this closely
# (relative to their largest magnitude): identical ops give identical numbers.
TAP_TOLERANCE = 1e-5


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_backbone(split: HeadSplit, device: torch.device) -> torch.nn.Module:
    backbone = split.backbone.to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.inference_mode()
def backbone_features(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device,
                      autocast: bool = False) -> torch.Tensor:
    images = _to_device(images, device)
    with _autocast(device, autocast):
        feats = backbone(images)
    return feats.float().contiguous()


def _tap_point(split: HeadSplit, model: torch.nn.Module):
    """(module name, which call of it, to-channels-first function) where the cut's features are
    produced inside the model's own forward, or (None, None, why not)."""
    backbone = split.backbone
    for name, module in model.named_modules():
        if module is backbone and name:  # the backbone is one of the model's own layers
            return name, 0, None
    if isinstance(backbone, fx.GraphModule):
        out = next(n for n in backbone.graph.nodes if n.op == "output").args[0]
        convert = None
        if isinstance(out, fx.Node) and out.op == "call_function" and len(out.args) == 2 \
                and isinstance(out.args[0], fx.Node) and isinstance(out.args[1], str):
            fn, layout = out.target, out.args[1]
            convert, out = (lambda t, fn=fn, layout=layout: fn(t, layout)), out.args[0]
        if not isinstance(out, fx.Node) or out.op != "call_module":
            return None, None, "the feature map is not a layer's output"
        calls = [n for n in backbone.graph.nodes if n.op == "call_module" and n.target == out.target]
        return out.target, calls.index(out), convert
    layer, layout = getattr(backbone, "layer", None), getattr(backbone, "layout", "NCHW")
    if isinstance(layer, str) and isinstance(getattr(backbone, "model", None), torch.nn.Module):
        convert = None
        if layout != "NCHW":
            from .models import split as split_module

            to_cf = getattr(split_module, "_to_channels_first", None)
            if to_cf is None:
                return None, None, f"no conversion from the {layout} layout"
            convert = lambda t, layout=layout: to_cf(t, layout)  # noqa: E731
        return layer, 0, convert
    return None, None, f"the backbone is a {type(backbone).__name__}"


class FeatureTap:
    """Features at the cut and the model's own logits from one forward pass of the model.

    ``tap(images)`` -> (features (B, D, H, W) float32, logits (B, C) float32). The pass runs in
    float32 (the certificate compares float32 logits). ``mode`` says how the pair was obtained.
    """

    def __init__(self, split: HeadSplit, model: torch.nn.Module, device: torch.device):
        self.split, self.device = split, device
        self.backbone = prepare_backbone(split, device)
        self.model = model.to(device).eval()
        self.layer, self.call, self.convert = _tap_point(split, model)
        self.checked = False
        self.head_gap: Optional[float] = None  # relative max |head(features) - model logits| on the first batch
        self.mode = "one pass" if self.layer is not None else f"two passes ({self.convert})"

    def _fallback(self, why: str) -> None:
        self.layer = None
        self.mode = f"two passes ({why})"

    def _one_pass(self, x: torch.Tensor):
        box, seen = {}, [0]
        owner = threading.get_ident()

        def grab(module, inputs, output):
            # The model may be shared: another thread's forward (another visitor's discovery or
            # explanation in the app) passes through the same hook and must not be caught.
            if threading.get_ident() != owner:
                return
            if seen[0] == self.call:
                box["out"] = output
            seen[0] += 1

        handle = self.model.get_submodule(self.layer).register_forward_hook(grab)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        feats = box.get("out")
        if not isinstance(feats, torch.Tensor) or not isinstance(logits, torch.Tensor):
            return None, logits
        return (self.convert(feats) if self.convert else feats), logits

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor):
        x = _to_device(images, self.device)
        if self.layer is not None:
            feats, logits = self._one_pass(x)
            if not self.checked:
                self._check(x, feats, logits)
            if self.layer is not None:
                return feats.float().contiguous(), logits.float()
        feats = self.backbone(x).float().contiguous()
        logits = self.model(x)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the model returned a {type(logits).__name__}, not a tensor of logits")
        return feats, logits.float()

    def _check(self, x, feats, logits) -> None:
        """First batch: the caught map is the backbone's, and the head turns it into the logits."""
        self.checked = True
        if feats is None:
            return self._fallback("the layer's output was not caught")
        reference = self.backbone(x).float()
        if feats.shape != reference.shape:
            return self._fallback(f"caught {tuple(feats.shape)}, the backbone gives {tuple(reference.shape)}")
        scale = float(reference.abs().max()) or 1.0
        if float((feats.float() - reference).abs().max()) > TAP_TOLERANCE * scale:
            return self._fallback("the caught map differs from the backbone's")
        recomputed = self.split.logits_from_features(reference)
        if logits.shape != recomputed.shape:
            return self._fallback(f"the model's output {tuple(logits.shape)} is not (images, classes)")
        # Recorded, not acted on: the certificate measures the same gap through the prototypes.
        self.head_gap = float((recomputed - logits.float()).abs().max()) / max(float(logits.abs().max()), 1e-30)
