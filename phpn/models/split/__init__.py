"""Cut a classifier into backbone (unpooled feature map) and an affine head.

How the cut is found, generically:

1. Trace the model with torch.fx. Submodules stay opaque ("leaves") unless they are plain
   ``nn.Sequential`` containers, so odd code inside blocks cannot break the trace; a custom
   module that sits on the path we need to read (the head, or the layer producing the
   features) is traced into on a second pass.
2. Walk back from the output: the head (Linear, F.linear, 1x1 conv on the pooled map,
   BatchNorm in eval, scalar scaling) <- shape-only ops and dropout <- optionally one
   LayerNorm over the pooled channels (folded: see ``PostPoolNorm``) <- a global average
   pooling (AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(x, 1), x.mean((2, 3)),
   x.view(B, C, -1).mean(-1), avg_pool2d over the whole map, mean over tokens). The pooling's
   input is the feature map; the backbone is the traced graph cut there, returning
   (B, D, H, W) channels-first whatever the model's own layout.
3. Anything else after the feature map (a ReLU between two Linears, a class token picked
   with x[:, 0], max pooling, ...) makes the model not decomposable, and the reason says what
   was found.
4. When tracing fails, forward hooks find the head (the Linear whose output is the logits)
   and the feature layer (the last 4-D output with the head's width), or the user names them.

Whatever found the cut, it is verified numerically: the split's logits must equal the
model's on a random input (relative 1e-4 in the model's dtype; call it on a float64 model
for a float64 check), and the model's own layers after the cut are re-run in float64 to
check the folded head far below float32 rounding.

The package follows those steps: ``trace`` (torch.fx), ``walk`` (reading the graph back
from the logits), ``hooks`` (the fallback and named layers), ``plan`` (what to cut and
fold) and ``verify`` (the numerical checks).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from phpn.head import HeadSplit
from phpn.models.split.hooks import HookedBackbone, _plan_from_hooks
from phpn.models.split.plan import EXACTNESS_NEEDS, TOL_FLOAT32, TOL_FLOAT64, _example
from phpn.models.split.trace import _plan_from_trace
from phpn.models.split.verify import _finish

# Public names.
__all__ = ["EXACTNESS_NEEDS", "HookedBackbone", "TOL_FLOAT32", "TOL_FLOAT64", "split_head"]


def split_head(model: nn.Module, *, feature_layer: Optional[str] = None, head_layer: Optional[str] = None,
               example_input: Optional[torch.Tensor] = None, verify: bool = True) -> HeadSplit:
    """Find backbone + affine head of ``model`` and check that they reproduce its logits.

    ``example_input`` (default: two random 3x224x224 images) fixes the map size used to
    check poolings such as ``avg_pool2d(x, 7)``. Naming ``feature_layer`` and/or
    ``head_layer`` (module names as in ``model.named_modules()``) skips tracing.
    The model is put in eval mode. Raises NotDecomposableError with the reason.
    """
    model.eval()
    x, logits = _example(model, example_input)
    if feature_layer or head_layer:
        plan = _plan_from_hooks(model, x, logits, feature_layer, head_layer)
    else:
        plan = _plan_from_trace(model, x, logits)
    return _finish(model, plan, x, logits, verify)
