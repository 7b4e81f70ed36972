"""What the metrics evaluate: anything that gives, for a batch of images of one class,
the maps of that class's prototypes, their contributions and the class logit.

    explainer(images (B, ch, H, W), class_index) -> (maps (B, k, h, w), contributions (B, k), logit (B,))

- :class:`NetworkExplainer` wraps a :class:`phpn.method.network.PrototypeNetwork` (refined
  prototypes, exact decomposition).
- :class:`PrototypeExplainer` computes the maps of *any* set of directions on the
  backbone's features (NMF prototypes before refinement, baselines): they need not sum to
  the head row, so contributions are each map's mean and the logit is the model's own.
"""
from __future__ import annotations

from typing import Sequence

import torch

from phpn.errors import ConfigError
from phpn.method.network import prototype_maps


class NetworkExplainer:
    def __init__(self, net):
        self.net = net

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, class_index: int):
        out = self.net(images, classes=[int(class_index)])
        return out.maps[:, 0], out.contributions[:, 0], out.logits[:, int(class_index)]


class PrototypeExplainer:
    """Maps ``x . p`` of the directions ``prototypes[row of c]`` on the backbone features
    (scaled by the model's per-image factor when a normalisation follows the pooling)."""

    def __init__(self, split, prototypes: torch.Tensor, class_indices: Sequence[int]):
        prototypes = torch.as_tensor(prototypes)
        if prototypes.ndim != 3 or prototypes.shape[2] != split.num_features:
            raise ConfigError(
                f"prototypes must be (classes, k, {split.num_features}), got {tuple(prototypes.shape)}.", "")
        self.split = split
        self.prototypes = prototypes.detach().float()
        self.rows = {int(c): i for i, c in enumerate(torch.as_tensor(class_indices).tolist())}
        if len(self.rows) != prototypes.shape[0]:
            raise ConfigError("class_indices must name one distinct class per row of prototypes.", "")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, class_index: int):
        feats = self.split.backbone(images)
        p = self.prototypes[self.rows[int(class_index)]].to(feats.device, feats.dtype)  # (k, D)
        pooled = feats.mean(dim=(2, 3))
        scale = self.split.image_scale(pooled)
        maps = prototype_maps(feats, p, scale)
        logit = self.split.logits_from_features(feats)[:, int(class_index)]
        return maps, maps.mean(dim=(2, 3)), logit


