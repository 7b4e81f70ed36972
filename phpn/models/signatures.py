"""Shape fingerprints of architectures, shared by the torchvision zoo and timm: which keys a
checkpoint must hold and with which shapes, the head's rows (the class count) left free."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

SENTINEL_CLASSES = 9973  # a row count no real head has, to tell head tensors apart



def ignored_key(key: str) -> bool:
    # Old checkpoints lack BatchNorm's counter; torch fills it in when loading.
    return key.endswith("num_batches_tracked")



def sentinel_shapes(model: nn.Module) -> dict:
    """Key -> shape of a model built with ``SENTINEL_CLASSES`` classes, the head's tensors with
    -1 as their first dimension (the same for torchvision's and timm's models)."""
    shapes = {}
    for key, tensor in model.state_dict().items():
        if not ignored_key(key):
            shape = tuple(tensor.shape)
            shapes[key] = (-1,) + shape[1:] if shape and shape[0] == SENTINEL_CLASSES else shape
    return shapes


@dataclass
class ShapeDiff:
    missing: list
    unexpected: list
    wrong_shape: list  # (key, checkpoint shape, expected shape)

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    def describe(self, limit: int = 4) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {', '.join(self.missing[:limit])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {', '.join(self.unexpected[:limit])})")
        if self.wrong_shape:
            shown = "; ".join(f"{k} is {tuple(a)} but should be {tuple(b)}" for k, a, b in self.wrong_shape[:limit])
            parts.append(f"{len(self.wrong_shape)} with the wrong shape ({shown})")
        return ", ".join(parts)



def diff_shapes(state_dict: Mapping, shapes: Mapping) -> ShapeDiff:
    """Keys missing, unexpected or of the wrong shape; a -1 first dimension (the class count) is free."""
    have = {k: tuple(v.shape) for k, v in state_dict.items() if not ignored_key(k)}
    missing = [k for k in shapes if k not in have]
    unexpected = [k for k in have if k not in shapes]
    wrong = []
    for key, expected in shapes.items():
        got = have.get(key)
        if got is None:
            continue
        free = expected[:1] == (-1,)
        differs = any(e != g for e, g in zip(expected, got) if not (free and e == -1))
        if len(got) != len(expected) or differs:
            wrong.append((key, got, expected))
    return ShapeDiff(missing, unexpected, wrong)
