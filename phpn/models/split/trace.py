"""Tracing with torch.fx: submodules stay opaque unless they are plain Sequential containers or
must be read (traced into on a later pass); when tracing fails, forward hooks take over."""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from phpn.errors import NotDecomposableError
from phpn.models.split.hooks import _plan_from_hooks
from phpn.models.split.plan import _MAX_EXPANSIONS, _Plan, _refusal
from phpn.models.split.walk import _Walk


class _Tracer(fx.Tracer):
    """Leaves: every module except plain Sequential containers and those named in ``expand``."""

    def __init__(self, expand: set):
        super().__init__()
        self.expand = expand

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.expand:
            return False
        return type(m).forward is not nn.Sequential.forward


def _trace(model: nn.Module, expand: set) -> fx.GraphModule:
    tracer = _Tracer(expand)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _plan_from_trace(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> _Plan:
    expand, opaque = set(), set()
    just_opened = None  # the module added to ``expand`` on the previous pass
    shaped = False  # shapes are read (one forward pass) only once the structure has settled
    for _ in range(2 * _MAX_EXPANSIONS):
        try:
            gm = _trace(model, expand)
        except Exception as exc:
            if just_opened is None:
                why = f"torch.fx could not trace the model ({type(exc).__name__}: {exc})"
                return _fallback_after_trace_failure(model, x, logits, why)
            opaque.add(just_opened)  # that module's own code is not traceable: keep it closed
            expand.discard(just_opened)
            just_opened = None
            continue
        just_opened = None
        if shaped:
            try:
                ShapeProp(gm).propagate(x)
            except Exception as exc:
                why = f"the traced graph did not run ({type(exc).__name__}: {exc})"
                return _fallback_after_trace_failure(model, x, logits, why)
        result = _Walk(gm, shapes=shaped, opaque=opaque).run()
        if result.expand:
            if len(expand) < _MAX_EXPANSIONS:
                expand.add(result.expand)
                just_opened = result.expand
            else:  # opened enough modules: read this one from the outside
                opaque.add(result.expand)
            continue
        if not shaped:
            shaped = True
            continue
        if result.plan is not None:
            result.plan.notes.insert(0, "found by tracing the model with torch.fx")
            return result.plan
        if result.certain:
            raise _refusal(result.reason, result.notes)
        # Tracing met something it cannot read; forward hooks may still find a plain head.
        try:
            plan = _plan_from_hooks(model, x, logits, None, None)
        except NotDecomposableError:
            raise _refusal(result.reason, result.notes) from None
        plan.notes.insert(0, f"tracing was inconclusive ({result.reason}); found with forward hooks instead")
        return plan
    raise _refusal("The model's structure could not be resolved after several tracing passes.", [])


def _fallback_after_trace_failure(model, x, logits, why: str) -> _Plan:
    try:
        plan = _plan_from_hooks(model, x, logits, None, None)
    except NotDecomposableError as err:
        raise NotDecomposableError(
            f"{why}; and looking at the layers' outputs did not find a plain pooling + linear head either "
            f"({err.problem})",
            "Name the layers with --feature-layer (the last layer before the pooling) and --head-layer "
            "(the final Linear).",
        ) from None
    plan.notes.insert(0, f"{why}; found with forward hooks instead")
    return plan
