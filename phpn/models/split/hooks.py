"""Finding the cut without tracing: forward hooks record every layer's output; the head is the
Linear whose output is the logits, the feature layer the last 4-D (or token) output with the
head's width, or the layers the user names."""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import nn

from phpn.errors import ConfigError, NotDecomposableError
from phpn.models.split.plan import _Affine, _linear_params, _Plan, _to_channels_first
from phpn.models.split.verify import _check


class _Stop(Exception):
    pass


class HookedBackbone(nn.Module):
    """Runs the model until ``layer`` has produced its output, and returns that output."""

    def __init__(self, model: nn.Module, layer: str, layout: str = "NCHW"):
        super().__init__()
        self.model = model
        self.layer = layer
        self.layout = layout

    def forward(self, x):
        box, owner = {}, threading.get_ident()

        def grab(module, inputs, output):
            # The model may be shared (the app serves every visitor from one copy): another
            # thread's forward through this layer must neither be caught nor stopped.
            if threading.get_ident() != owner:
                return
            box["out"] = output
            raise _Stop  # the rest of the network is not needed

        handle = self.model.get_submodule(self.layer).register_forward_hook(grab)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "out" not in box:
            raise NotDecomposableError(f"The layer '{self.layer}' did not run during the forward pass.",
                                       "Pick a layer that the model uses (see model.named_modules()).")
        return _to_channels_first(box["out"], self.layout)


def _record_outputs(model: nn.Module, x: torch.Tensor):
    records, handles = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: records.append((name, m, o if isinstance(o, torch.Tensor) else None))))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return records, logits


def _layout_for(shape: tuple, width: int) -> Optional[str]:
    if len(shape) == 4:
        return "NCHW" if shape[1] == width else "NHWC" if shape[3] == width else None
    if len(shape) == 3:
        return "NLD" if shape[2] == width else "NCL" if shape[1] == width else None
    return None


def _plan_from_hooks(model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                     feature_layer: Optional[str], head_layer: Optional[str]) -> _Plan:
    names = dict(model.named_modules())
    for label, given in (("--feature-layer", feature_layer), ("--head-layer", head_layer)):
        if given and given not in names:
            close = [n for n in names if n and (given in n or n.endswith(given))][:6]
            raise ConfigError(f"The model has no layer named '{given}' ({label}).",
                              f"Similar names: {', '.join(close)}." if close
                              else "List them with model.named_modules().")
    records, _ = _record_outputs(model, x)
    order = {name: i for i, (name, _, _) in enumerate(records)}

    if head_layer:
        head_mod = names[head_layer]
        if not isinstance(head_mod, nn.Linear):
            raise NotDecomposableError(f"The head layer '{head_layer}' is a {type(head_mod).__name__}, "
                                       "not a Linear layer.",
                                       "Name the final nn.Linear with --head-layer.")
        head_name = head_layer
    else:
        found = [name for name, m, out in records if isinstance(m, nn.Linear) and out is not None
                 and out.shape == logits.shape and torch.equal(out, logits)]
        if not found:
            raise NotDecomposableError("No Linear layer's output is the model's output (the logits).",
                                       "Name the head with --head-layer and the feature layer with --feature-layer.")
        head_name = found[-1]
        head_mod = names[head_name]
    width = head_mod.in_features
    head_at = order.get(head_name, len(records))

    if feature_layer:
        candidates = [feature_layer]
    else:
        scored = []
        for i, (name, _, out) in enumerate(records[:head_at]):
            if out is None or _layout_for(tuple(out.shape), width) is None:
                continue
            positions = math.prod(out.shape[1:]) // width
            scored.append((positions > 1, i, name))
        candidates = [name for _, _, name in sorted(scored, reverse=True)][:8]
        if not candidates:
            raise NotDecomposableError(
                f"No layer before the head '{head_name}' outputs a feature map with {width} channels.",
                "Name the feature layer with --feature-layer.")

    ops = [_Affine(head_name, lambda root, width=None, n=head_name: _linear_params(root.get_submodule(n)))]
    tried = []
    for name in candidates:
        out = next((o for n, _, o in records if n == name and o is not None), None)
        if out is None:
            tried.append(f"{name} (no tensor output)")
            continue
        layout = _layout_for(tuple(out.shape), width)
        if layout is None:
            tried.append(f"{name} (output {tuple(out.shape)} does not have {width} channels)")
            continue
        plan = _Plan(make_backbone=lambda root, n=name, lay=layout: HookedBackbone(root, n, lay),
                     ops=ops, feature_layer=name, head_layer=head_name, signed=None,
                     notes=[f"feature layer '{name}' (output {tuple(out.shape)}, {layout}) and head '{head_name}' "
                            f"({'given' if feature_layer or head_layer else 'found from the layer outputs'})"])
        try:
            _check(model, plan, x, logits, full=False)
            return plan
        except NotDecomposableError as err:
            tried.append(f"{name} ({err.problem})")
    raise NotDecomposableError(
        f"Averaging the output of {'the layer' if feature_layer else 'each candidate layer'} and applying "
        f"'{head_name}' does not reproduce the logits: {'; '.join(tried[:4])}.",
        "Name the layer right before the global average pooling with --feature-layer.",
    )
