"""Checking a plan numerically: the split's logits must equal the model's on the example input
(relative 1e-4 in the model's dtype), and the model's own layers after the cut are re-run in
float64 to check the folded head far below float32 rounding."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from phpn.errors import NotDecomposableError
from phpn.head import HeadSplit
from phpn.models.split.plan import (
    EXACTNESS_NEEDS,
    TOL_FLOAT32,
    TOL_FLOAT64,
    _dtype,
    _effective_head,
    _Plan,
)


def _realise(root: nn.Module, plan: _Plan, dtype: torch.dtype) -> HeadSplit:
    backbone = plan.make_backbone(root)
    W, b, norm = _effective_head(root, plan.ops)
    folded = [op.name for op in plan.ops if op.name != plan.head_layer]
    return HeadSplit(backbone=backbone, weight=W.to(dtype), bias=b.to(dtype), post_pool_norm=norm,
                     signed_features=bool(plan.signed), feature_layer=plan.feature_layer,
                     head_layer=plan.head_layer, notes=list(plan.notes), folded_layers=folded)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / max(scale, 1e-12)


def _check(model: nn.Module, plan: _Plan, x: torch.Tensor, logits: torch.Tensor, *, full: bool) -> HeadSplit:
    """The split, after checking that it reproduces the model's logits on ``x``."""
    split = _realise(model, plan, _dtype(model))
    with torch.no_grad():
        feats = split.backbone(x)
        if feats.ndim != 4:
            raise NotDecomposableError(f"The feature layer returns shape {tuple(feats.shape)}, not (B, D, H, W).", "")
        if feats.shape[1] != split.num_features:
            raise NotDecomposableError(f"The features have {feats.shape[1]} channels but the head expects "
                                       f"{split.num_features}.", "")
        err = _relative_error(split.logits_from_features(feats), logits)
    dtype_name = str(x.dtype).replace("torch.", "")
    if err > TOL_FLOAT32:
        raise NotDecomposableError(
            f"The split does not reproduce the model's logits (max relative difference {err:.2g} in {dtype_name}): "
            f"something between '{plan.feature_layer}' and the output is not a plain mean + affine head.",
            "Check that the model is deterministic in eval mode, or name the layers with --feature-layer/--head-layer.",
        )
    if not full:
        return split
    if plan.signed is None:
        plan.signed = bool(feats.min() < 0)
        plan.notes.append("no activation before the pooling was recognised; on the example input the features were "
                          + ("negative in places (signed)" if plan.signed else "non-negative"))
        split.signed_features, split.notes = plan.signed, list(plan.notes)
    size = "x".join(str(s) for s in x.shape[1:])
    note = f"verified on a random {size} input: max relative logit difference {err:.1e} ({dtype_name})"
    err64 = _tail_error_float64(model, plan, x, feats)
    if err64 is not None:
        if err64 > TOL_FLOAT64:
            raise NotDecomposableError(
                f"In float64 the folded head differs from the model's head by {err64:.2g} (relative): the layers "
                "after the pooling are not exactly affine.", EXACTNESS_NEEDS)
        note += f"; the head alone agrees to {err64:.1e} in float64"
    split.notes.append(note)
    return split


def _tail_error_float64(model: nn.Module, plan: _Plan, x: torch.Tensor, feats: torch.Tensor) -> Optional[float]:
    """Run the model's own layers after the feature map in float64 and compare with the folded head.

    The backbone is the model's own graph, so the float32 check covers it; this checks the
    algebra of the head (pooling, folding) far below float32 rounding, at almost no cost.
    """
    if plan.make_tail is None:
        return None
    try:
        tail = copy.deepcopy(plan.make_tail(model)).double().eval()
        W, b, norm = _effective_head(model, plan.ops)
        head64 = HeadSplit(backbone=nn.Identity(), weight=W, bias=b, post_pool_norm=norm)
        f64 = feats.double()
        with torch.no_grad():
            return _relative_error(head64.logits_from_features(f64), tail(f64, x.double()))
    except Exception:
        return None  # e.g. a layer with hard-coded float32 constants; the float32 check stands


def _finish(model: nn.Module, plan: _Plan, x: torch.Tensor, logits: torch.Tensor, verify: bool) -> HeadSplit:
    if not verify:
        split = _realise(model, plan, _dtype(model))
        split.signed_features = bool(plan.signed) if plan.signed is not None else True
        return split
    return _check(model, plan, x, logits, full=True)
