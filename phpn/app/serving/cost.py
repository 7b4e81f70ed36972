"""What one forward pass of a model costs, and the operator's limits on a model input.

Two limits, both checked before a model runs on an input of a size a visitor chose: the fixed
cap on pixels (``PHPN_MAX_INPUT_PIXELS``, for any model) and a budget of GFLOPs for one image's
forward pass (``PHPN_MAX_FORWARD_GFLOPS``), so that a costly model gets smaller inputs than a
cheap one. A model's cost is counted once, by ``torch.utils.flop_counter`` during one forward
pass of one image at the model's own input size (:func:`measure_cost`; a multiply-add counts as
two FLOPs, so a ResNet-18 at 224x224 costs 3.63 GFLOPs), and scaled by the pixels asked for: a
convolutional network's cost grows as its pixels (its head aside); attention grows faster, so
for a transformer at a larger size the estimate is a lower bound, which is why the model's cost
is counted again at the size it is then opened at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError


@dataclass(frozen=True)
class ForwardCost:
    """``gflops`` for one image of ``height`` x ``width`` pixels, as counted."""

    gflops: float
    height: int
    width: int

    @property
    def gflops_per_megapixel(self) -> float:
        return self.gflops / (self.height * self.width / 1e6)

    def at(self, height: int, width: int) -> float:
        """The estimated GFLOPs of one image of ``height`` x ``width`` pixels (scaled by its pixels)."""
        return self.gflops * (int(height) * int(width)) / (self.height * self.width)


def forward_gflops(model: torch.nn.Module, input_size) -> float:
    """GFLOPs of one forward pass of ``model`` on one image of ``input_size`` (channels, height,
    width), counted while it runs (a multiply-add counts as two)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    x = torch.zeros((1,) + tuple(int(v) for v in input_size), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def measure_cost(model: torch.nn.Module, input_size) -> Optional[ForwardCost]:
    """The model's :class:`ForwardCost` at ``input_size`` (C, H, W); None when it cannot be
    counted (the model fails on that input: the doctor says why elsewhere), and then only the
    pixel cap applies."""
    size = tuple(int(v) for v in input_size)
    try:
        gflops = forward_gflops(model, size)
    except Exception:  # noqa: BLE001 - a model that cannot run here is judged by the doctor, not by its cost
        return None
    return ForwardCost(gflops, size[1], size[2]) if gflops > 0 else None


def check_input_pixels(height: int, width: int, settings: Optional[ServerSettings] = None) -> None:
    """Refuse an input image larger than the operator allows (the model's cost grows with its pixels)."""
    settings = settings or load_settings()
    limit = int(settings.max_input_pixels)
    if int(height) * int(width) > limit:
        raise ConfigError(f"An input of {height}x{width} pixels is more than the {limit:,} pixels a model input may "
                          "have on this server (PHPN_MAX_INPUT_PIXELS).",
                          "Use a smaller crop and resize (the model's own input size is usually 224 to 518).")


def largest_side(cost: ForwardCost, settings: Optional[ServerSettings] = None) -> int:
    """The largest square input (its side in pixels) this model may have here: within the GFLOPs
    budget and the pixel cap."""
    settings = settings or load_settings()
    side = math.isqrt(int(settings.max_input_pixels))
    budget = float(settings.max_forward_gflops)
    if budget > 0:
        side = min(side, math.isqrt(int(budget * 1e6 / cost.gflops_per_megapixel)))
        while side > 0 and cost.at(side, side) > budget:  # the square root's rounding
            side -= 1
    return side


def check_forward_cost(height: int, width: int, cost: Optional[ForwardCost],
                       settings: Optional[ServerSettings] = None) -> None:
    """Refuse an input of ``height`` x ``width`` pixels over the pixel cap or, for a model whose
    cost is known, whose one-image forward pass would cost more than the operator's budget."""
    settings = settings or load_settings()
    check_input_pixels(height, width, settings)
    budget = float(settings.max_forward_gflops)
    if cost is None or budget <= 0:
        return
    asked = cost.at(height, width)
    if asked <= budget:
        return
    side = largest_side(cost, settings)
    fix = (f"Use a crop of at most {side}x{side} pixels with this model." if side > 0 else
           "Use a smaller model.")
    raise ConfigError(f"An input of {height}x{width} pixels would cost this model about {asked:,.1f} GFLOPs per image "
                      f"({cost.gflops:,.2f} GFLOPs at {cost.height}x{cost.width}), more than the {budget:g} GFLOPs "
                      "one forward pass may cost on this server (PHPN_MAX_FORWARD_GFLOPS).", fix)
