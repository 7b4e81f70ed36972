"""Choosing where the work runs: the GPU when there is one, else the CPU."""
from __future__ import annotations

import re

import torch

from phpn.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


def check_device_name(name) -> str:
    """Refuse anything but auto, cpu, cuda and cuda:N (e.g. 'meta' has no data to compute on)."""
    name = "auto" if name in (None, "") else name
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"Unknown device '{name}'.", f"Use {DEVICE_CHOICES}.")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("A CUDA device was asked for, but this machine has no usable GPU.",
                          "Use --device cpu (or auto).")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"There is no GPU {device.index}: this machine has {torch.cuda.device_count()}.",
                          "Use --device cuda (the first GPU) or auto.")
    return device
