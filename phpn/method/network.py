"""The decomposed network: the original classifier, read through its part-prototypes.

For an image with feature map x (D, H, W), pooled z = mean(x) and scale s(z):

    map_ci      = s · x · p̃_ci         (H, W)  where prototype i of class c fires ("where")
    contrib_ci  = mean(map_ci) = s · z · p̃_ci
    logit_c     = Σ_i contrib_ci + b_c    — the original logit, since Σ_i p̃_ci = v_c

Classes that were not decomposed keep their plain head row, so ``logits`` always covers
every class of the model and predictions never change.

Two networks give these explanations. :class:`PrototypeNetwork` holds every class's
prototypes (the certificate and evaluation need them all). :class:`LazyPrototypeNetwork` reads a
class's prototypes from its run (one shard) the first time it explains that class: its logits
are the model's head, which the prototypes of each class sum to (the certificate proves it),
so explaining one class of a 10,000-class run reads one shard, not all of them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from phpn.errors import ConfigError
from phpn.head import HeadSplit


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


class _DecomposedHead(nn.Module):
    """What both networks share: the backbone, the model's head and the decomposed classes."""

    def __init__(self, split: HeadSplit, class_indices: Sequence[int]):
        super().__init__()
        class_indices = torch.as_tensor(class_indices, dtype=torch.long)
        self.split = split
        self.backbone = split.backbone
        self.register_buffer("class_indices", class_indices)
        self._row_of = {int(c): i for i, c in enumerate(class_indices.tolist())}

    def _check_features(self, d: int) -> None:
        if d != self.split.num_features:
            raise ConfigError(f"The prototypes have {d} channels but the model's features have "
                              f"{self.split.num_features}.", "Load the run with the checkpoint it was made from.")

    def rows(self, classes: Sequence[int]) -> list:
        missing = [int(c) for c in classes if int(c) not in self._row_of]
        if missing:
            raise ConfigError(f"Class {missing[0]} has no prototypes in this run.",
                              "Pick a class that was decomposed, or run discovery for it.")
        return [self._row_of[int(c)] for c in classes]

    def _pooled(self, features: torch.Tensor, device, dtype) -> tuple:
        """(features, pooled z (B, D), scale s(z) (B,), the head's logits (B, C))."""
        feats = features.to(device, dtype)
        pooled = feats.mean(dim=(2, 3))
        scale = self.split.image_scale(pooled)  # (B,)
        logits = scale[:, None] * (pooled @ self.head_weight.T) + self.head_bias
        return feats, pooled, scale, logits

    def forward(self, images: torch.Tensor, classes: Optional[Sequence[int]] = None, with_maps: bool = True) -> Explanation:
        return self.explain_features(self.backbone(images.to(self.backbone_device)), classes, with_maps)

    @property
    def backbone_device(self) -> torch.device:
        """Where the backbone's weights are (discovery may have moved it to the GPU)."""
        first = next(self.backbone.parameters(), None)
        return first.device if first is not None else self.head_bias.device


class PrototypeNetwork(_DecomposedHead):
    """The model read through its prototypes: ``net(images)`` gives an :class:`Explanation` whose
    logits are the model's and whose contributions (and maps) sum to them class by class.
    It holds every class's prototypes (see :class:`LazyPrototypeNetwork` for one that does not)."""

    def __init__(self, split: HeadSplit, prototypes: torch.Tensor, class_indices: Sequence[int],
                 dtype: torch.dtype = torch.float32):
        super().__init__(split, class_indices)
        if prototypes.ndim != 3 or prototypes.shape[0] != len(self.class_indices):
            raise ValueError(f"prototypes must be (classes, k, D) with one row per class index, got {tuple(prototypes.shape)}")
        self._check_features(prototypes.shape[2])
        self.register_buffer("prototypes", prototypes.detach().to(dtype).clone())
        self.register_buffer("head_weight", split.weight.detach().to(dtype).clone())
        self.register_buffer("head_bias", split.bias.detach().to(dtype).clone())

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[1])

    def class_k(self, class_index: int) -> int:
        """The class's own number of prototypes. With ``--k auto`` a class with fewer than the
        run's k has zero rows in its remaining slots; a refined prototype is never exactly zero."""
        used = (self.prototypes[self.rows([class_index])[0]] != 0).any(1).nonzero()
        return int(used.max()) + 1 if used.numel() else self.k

    def explain_features(self, features: torch.Tensor, classes: Optional[Sequence[int]] = None,
                         with_maps: bool = True) -> Explanation:
        """The explanation from precomputed backbone features (B, D, H, W)."""
        feats, pooled, scale, logits = self._pooled(features, self.prototypes.device, self.prototypes.dtype)
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


CACHED_CLASSES = 512  # a lazy network keeps this many classes' prototypes at most (float32: 20 MB at k=5, D=2048)


class LazyPrototypeNetwork(_DecomposedHead):
    """The decomposed network that reads a class's prototypes only when it explains that class.

    ``fetch(c)`` gives class c's own prototypes (k_c, D) (a run's ``class_prototypes``: its
    shard only); they are kept for the next explanation, the last :data:`CACHED_CLASSES` at
    most. The logits are the model's head, for every class; the contributions of a class sum
    to its logit minus bias up to float rounding, as the certificate states. Outputs have the
    shapes :class:`PrototypeNetwork` gives (a class with fewer than ``k`` prototypes has zero
    rows in its remaining slots). ``classes=None`` explains every decomposed class, which reads
    every shard: pass the classes you show.
    """

    def __init__(self, split: HeadSplit, class_indices: Sequence[int], fetch: Callable[[int], torch.Tensor], k: int,
                 dtype: torch.dtype = torch.float32, cached_classes: int = CACHED_CLASSES):
        super().__init__(split, class_indices)
        self._fetch, self._k, self._dtype, self._capacity = fetch, int(k), dtype, max(1, int(cached_classes))
        self._cache: OrderedDict = OrderedDict()  # class index -> (k, D) in dtype, most recent last
        self._lock = threading.Lock()  # the app may explain from several threads
        # The model's own head, not a copy (a float32 head is used as it is).
        self.register_buffer("head_weight", split.weight.detach().to(dtype))
        self.register_buffer("head_bias", split.bias.detach().to(dtype))

    @property
    def k(self) -> int:
        return self._k

    def class_k(self, class_index: int) -> int:
        """The class's own number of prototypes (fewer than ``k`` where discovery chose it per class)."""
        self.rows([class_index])  # refuses a class without prototypes
        return int(self._own(int(class_index)).shape[0])

    def _own(self, class_index: int) -> torch.Tensor:
        """(k_c, D) the class's own prototypes, fetched once (LRU)."""
        with self._lock:
            cached = self._cache.get(class_index)
            if cached is not None:
                self._cache.move_to_end(class_index)
                return cached
        own = self._fetch(class_index).detach().to(self.head_bias.device, self._dtype)
        if own.ndim != 2 or not 1 <= own.shape[0] <= self._k:
            raise ValueError(f"class {class_index}'s prototypes must be (k, D) with k from 1 to {self._k}, "
                             f"got {tuple(own.shape)}")
        self._check_features(own.shape[1])
        with self._lock:
            self._cache[class_index] = own
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return own

    def class_prototypes(self, classes: Sequence[int]) -> torch.Tensor:
        """(len(classes), k, D) the classes' prototypes, zero rows past a class's own k."""
        self.rows(classes)  # refuses a class without prototypes
        out = torch.zeros(len(classes), self._k, self.split.num_features, dtype=self._dtype,
                          device=self.head_bias.device)
        for i, c in enumerate(classes):
            own = self._own(int(c))
            out[i, :own.shape[0]] = own
        return out

    @property
    def cached_classes(self) -> list:
        """The classes whose prototypes are held now, least recently used first."""
        with self._lock:
            return list(self._cache)

    def explain_features(self, features: torch.Tensor, classes: Optional[Sequence[int]] = None,
                         with_maps: bool = True) -> Explanation:
        """The explanation from precomputed backbone features (B, D, H, W), for ``classes`` only."""
        feats, pooled, scale, logits = self._pooled(features, self.head_bias.device, self._dtype)
        classes = self.class_indices.tolist() if classes is None else [int(c) for c in classes]
        prototypes = self.class_prototypes(classes)
        contributions = scale[:, None, None] * torch.einsum("bd,ckd->bck", pooled, prototypes)
        maps = prototype_maps(feats, prototypes, scale) if with_maps else None
        return Explanation(logits=logits, bias=self.head_bias, classes=classes, contributions=contributions, maps=maps,
                           features=feats)
