"""Choosing where the work runs: the GPU when there is one, else the CPU."""
from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("A CUDA device was asked for, but this machine has no usable GPU.",
                          "Use --device cpu (or auto).")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}'.", "Use auto, cpu or cuda.") from None
