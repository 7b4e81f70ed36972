"""The contract between a classifier and the decomposition.

Every model phpn can decompose is seen as

    logits = s(z) * (z @ W.T) + b,    z = mean over positions of backbone(images)

where ``backbone`` returns the unpooled feature map (B, D, H, W), ``W`` (C, D) and ``b``
(C,) are the *effective* head (after folding any normalisation that follows the pooling),
and ``s(z)`` is a per-image scale: 1 for a plain pooling + linear head, ``1/sigma(z)`` when a
LayerNorm follows the pooling (ConvNeXt). See METHOD.md section 4.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

# How discovery treats features that can be negative (token models, no final ReLU): recorded in
# each run and shown to the user.
SIGNED_FEATURES_NMF = ("the features can be negative, so NMF factorises them clamped at zero (it finds parts where "
                       "features are positive); the prototypes still sum exactly to each head row, and every "
                       "contribution and map is computed from the signed features")
NONNEGATIVE_FEATURES_NMF = "the features are non-negative (they end in a ReLU), so NMF factorises them as they are"


@dataclass
class PostPoolNorm:
    """A LayerNorm over channels applied to the pooled vector, folded into the head.

    LN(z) . v = (1/sigma(z)) * z . (g*v - mean(g*v)) + beta . v, so the folded head row is
    ``g*v - mean(g*v)``, the folded bias ``b + W beta``, and each image is scaled by 1/sigma(z).
    """

    eps: float

    def scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B,) per-image scale 1/sigma."""
        var = pooled.var(dim=1, unbiased=False)
        return torch.rsqrt(var + self.eps)


@dataclass
class HeadSplit:
    """A model cut into backbone (unpooled features) and an affine head."""

    backbone: nn.Module
    weight: torch.Tensor  # (C, D) effective head rows
    bias: torch.Tensor  # (C,) effective bias
    post_pool_norm: Optional[PostPoolNorm] = None
    signed_features: bool = False  # True when features can be negative (no final ReLU)
    feature_layer: str = ""  # where the backbone ends, in the model's own names
    head_layer: str = ""  # the linear layer read as the head
    notes: list = field(default_factory=list)  # how the split was found, for the doctor
    folded_layers: list = field(default_factory=list)  # layers after the pooling folded into weight/bias

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def folded(self) -> bool:
        return self.post_pool_norm is not None

    def image_scale(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) the per-image factor s(z); ones when nothing is folded."""
        if self.post_pool_norm is None:
            return torch.ones(pooled.shape[0], dtype=pooled.dtype, device=pooled.device)
        return self.post_pool_norm.scale(pooled)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, C): the original model's logits, recomputed from the split."""
        pooled = features.mean(dim=(2, 3))
        w = self.weight.to(device=features.device, dtype=features.dtype)
        b = self.bias.to(device=features.device, dtype=features.dtype)
        return self.image_scale(pooled)[:, None] * (pooled @ w.T) + b


@dataclass
class LoadedModel:
    """A classifier ready for phpn: the module plus what we know about it."""

    model: nn.Module  # in eval mode, on CPU
    arch: str  # "resnet50", "efficientnet-lite0", "user:file.py:factory", "pickled-module", ...
    num_classes: int
    sha256: str  # of the checkpoint file (or of the shipped weights for built-in models)
    preprocess: "object"  # phpn.images.preprocess.Preprocess: the default for this model
    class_names: Optional[list] = None
    source: str = ""  # where the weights came from, for the run's metadata
    notes: list = field(default_factory=list)  # how it was loaded (architecture inferred, prefixes removed, ...)
