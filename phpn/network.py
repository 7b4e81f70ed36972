"""The decomposed network: the original classifier, read through its part-prototypes.

For an image with feature map x (D, H, W), pooled z = mean(x) and scale s(z):

    map_ci      = s · x · p̃_ci         (H, W)  where prototype i of class c fires ("where")
    contrib_ci  = mean(map_ci) = s · z · p̃_ci
    logit_c     = Σ_i contrib_ci + b_c    — the original logit, since Σ_i p̃_ci = v_c

Classes that were not decomposed keep their plain head row, so ``logits`` always covers
every class of the model and predictions never change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .models.head import HeadSplit


def prototype_maps(features: torch.Tensor, prototypes: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """Where each prototype fires: ``map = s(z) · x · p̃`` at every position (the one formula).

    ``features`` (B, D, H, W); ``prototypes`` (k, D) -> maps (B, k, H, W), or (C, k, D) ->
    (B, C, k, H, W); ``scale`` (B,) the per-image factor s(z) (None: 1). The mean of a map over
    positions is that prototype's contribution to the logit.
    """
    p = prototypes.to(features)
    maps = torch.einsum("bdhw,kd->bkhw" if p.ndim == 2 else "bdhw,ckd->bckhw", features, p)
    if scale is not None:
        maps = scale.to(maps).reshape((-1,) + (1,) * (maps.ndim - 1)) * maps
    return maps


@dataclass
class Explanation:
    logits: torch.Tensor  # (B, C) for every class of the model
    bias: torch.Tensor  # (C,)
    classes: list  # model class indices the next two fields describe
    contributions: torch.Tensor  # (B, len(classes), k); Σ_k + bias = logits[:, classes]
    maps: Optional[torch.Tensor]  # (B, len(classes), k, H, W) on the feature grid; mean over H, W = contributions
    features: Optional[torch.Tensor] = None  # (B, D, H, W) when asked for


class PrototypeNetwork(nn.Module):
    """The model read through its prototypes: ``net(images)`` gives an :class:`Explanation` whose
    logits are the model's and whose contributions (and maps) sum to them class by class."""

    def __init__(self, split: HeadSplit, prototypes: torch.Tensor, class_indices: Sequence[int],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        class_indices = torch.as_tensor(class_indices, dtype=torch.long)
        if prototypes.ndim != 3 or prototypes.shape[0] != len(class_indices):
            raise ValueError(f"prototypes must be (classes, k, D) with one row per class index, got {tuple(prototypes.shape)}")
        if prototypes.shape[2] != split.num_features:
            raise ConfigError(f"The prototypes have {prototypes.shape[2]} channels but the model's features have "
                              f"{split.num_features}.", "Load the run with the checkpoint it was made from.")
        self.split = split
        self.backbone = split.backbone
        self.register_buffer("prototypes", prototypes.detach().to(dtype).clone())
        self.register_buffer("class_indices", class_indices)
        self.register_buffer("head_weight", split.weight.detach().to(dtype).clone())
        self.register_buffer("head_bias", split.bias.detach().to(dtype).clone())
        self._row_of = {int(c): i for i, c in enumerate(class_indices.tolist())}

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[1])

    def class_k(self, class_index: int) -> int:
        """The class's own number of prototypes. With ``--k auto`` a class with fewer than the
        run's k has zero rows in its remaining slots; a refined prototype is never exactly zero."""
        used = (self.prototypes[self.rows([class_index])[0]] != 0).any(1).nonzero()
        return int(used.max()) + 1 if used.numel() else self.k

    def rows(self, classes: Sequence[int]) -> list:
        missing = [int(c) for c in classes if int(c) not in self._row_of]
        if missing:
            raise ConfigError(f"Class {missing[0]} has no prototypes in this run.",
                              "Pick a class that was decomposed, or run discovery for it.")
        return [self._row_of[int(c)] for c in classes]

    def explain_features(self, features: torch.Tensor, classes: Optional[Sequence[int]] = None,
                         with_maps: bool = True) -> Explanation:
        """The explanation from precomputed backbone features (B, D, H, W)."""
        feats = features.to(self.prototypes.device, self.prototypes.dtype)
        pooled = feats.mean(dim=(2, 3))
        scale = self.split.image_scale(pooled)  # (B,)
        logits = scale[:, None] * (pooled @ self.head_weight.T) + self.head_bias
        all_contrib = scale[:, None, None] * torch.einsum("bd,ckd->bck", pooled, self.prototypes)
        # Decomposed classes get their logit from the prototypes: the sum the user is shown.
        logits[:, self.class_indices] = all_contrib.sum(-1) + self.head_bias[self.class_indices]
        if classes is None:
            classes = self.class_indices.tolist()
        classes = [int(c) for c in classes]
        rows = self.rows(classes)
        contributions = all_contrib[:, rows]
        maps = None
        if with_maps:
            maps = prototype_maps(feats, self.prototypes[rows], scale)
        return Explanation(logits=logits, bias=self.head_bias, classes=classes, contributions=contributions, maps=maps,
                           features=feats)

    def forward(self, images: torch.Tensor, classes: Optional[Sequence[int]] = None, with_maps: bool = True) -> Explanation:
        return self.explain_features(self.backbone(images.to(self.backbone_device)), classes, with_maps)

    @property
    def backbone_device(self) -> torch.device:
        """Where the backbone's weights are (discovery may have moved it to the GPU)."""
        first = next(self.backbone.parameters(), None)
        return first.device if first is not None else self.prototypes.device
