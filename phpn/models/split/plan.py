"""The plan of a cut: where the feature map is, which affine layers (and LayerNorm) follow the
pooling, and how to build the backbone; the readers of those layers' parameters and the
layout conversions (channels-last, tokens) to (B, D, H, W)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import fx, nn

from phpn.errors import ConfigError, NotDecomposableError
from phpn.head import PostPoolNorm

TOL_FLOAT64 = 1e-8


TOL_FLOAT32 = 1e-4


_MAX_EXPANSIONS = 12


_MAX_WALK = 48


EXACTNESS_NEEDS = ("Exact decomposition needs features -> global average pooling -> one affine layer "
                   "(see METHOD.md section 4).")


@dataclass
class _Affine:
    """An affine map y = A z + c of the pooled vector (A, c read from the model when needed)."""

    name: str
    read: Callable  # (root module, input width) -> (A (out, in), c (out,)) float64
    scalar: bool = False  # a scalar op: its input width is whatever comes in


@dataclass
class _LayerNorm:
    name: str
    read: Callable  # root module -> (gamma (D,), beta (D,), eps)


@dataclass
class _Plan:
    make_backbone: Callable  # root module -> nn.Module returning (B, D, H, W)
    ops: list  # _Affine / _LayerNorm, in forward order after the pooling
    feature_layer: str
    head_layer: str
    signed: Optional[bool]  # None: decide from the example's features
    notes: list = field(default_factory=list)
    make_tail: Optional[Callable] = None  # root -> module (features, input) -> logits: the model's own head


def _example(model: nn.Module, example_input) -> tuple:
    """(input, the model's logits on it), after checking the model accepts it."""
    if example_input is None:
        gen = torch.Generator().manual_seed(0)
        example_input = torch.randn(2, 3, 224, 224, generator=gen)
    x = example_input.to(_dtype(model))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(f"The model fails on an input of shape {tuple(x.shape)} ({type(exc).__name__}: {exc}).",
                          "Give an input size the model accepts (e.g. its training crop).") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise NotDecomposableError(
            f"The model returns {what}, not a (batch, classes) tensor of logits.",
            "Wrap it so that forward() returns only the logits.",
        )
    return x, out


def _refusal(reason: str, notes: list) -> NotDecomposableError:
    err = NotDecomposableError(reason, EXACTNESS_NEEDS)
    err.notes = notes
    return err


def _shape(node) -> Optional[tuple]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _linear_params(m: nn.Linear):
    w = m.weight.detach().double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def _conv1x1_params(m: nn.Conv2d):
    w = m.weight.detach().double().reshape(m.out_channels, m.in_channels)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def _batchnorm_params(m):
    scale = m.weight.detach().double() if m.weight is not None else torch.ones_like(m.running_var, dtype=torch.float64)
    shift = m.bias.detach().double() if m.bias is not None else torch.zeros_like(m.running_mean, dtype=torch.float64)
    a = scale / torch.sqrt(m.running_var.double() + m.eps)
    return torch.diag(a), shift - a * m.running_mean.double()


def _layernorm_params(m: nn.LayerNorm):
    d = m.normalized_shape[0]
    g = m.weight.detach().double() if m.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = m.bias.detach().double() if getattr(m, "bias", None) is not None else torch.zeros(d, dtype=torch.float64)
    return g, beta, float(m.eps)


def _pooled_width(root: nn.Module, ops: list) -> int:
    """Width of the pooled vector: the input width of the first op that has a fixed one."""
    for op in ops:
        if isinstance(op, _LayerNorm):
            return int(op.read(root)[0].shape[0])
        if not op.scalar:
            return int(op.read(root)[0].shape[1])
    raise NotDecomposableError("The head has no linear layer.", EXACTNESS_NEEDS)


def _effective_head(root: nn.Module, ops: list):
    """Compose the post-pool ops into (W, b, PostPoolNorm or None), all float64."""
    width = _pooled_width(root, ops)
    A = torch.eye(width, dtype=torch.float64)
    c = torch.zeros(width, dtype=torch.float64)
    ln = None
    for op in ops:
        if isinstance(op, _LayerNorm):
            ln = op.read(root)
            continue
        M, m = op.read(root, A.shape[0])
        A, c = M @ A, M @ c + m
    if ln is None:
        return A, c, None
    g, beta, eps = ln
    # LN(z) . v = (1/sigma(z)) z . (g*v - mean(g*v)) + beta . v  (METHOD.md section 4)
    gv = A * g[None, :]
    return gv - gv.mean(dim=1, keepdim=True), c + A @ beta, PostPoolNorm(eps=eps)


def _to_channels_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NCL":
        return t.unsqueeze(-1)
    if layout == "NLD":
        n = t.shape[1]
        side = math.isqrt(n)
        t = t.transpose(1, 2)
        return t.reshape(t.shape[0], t.shape[1], side, side) if side * side == n else t.unsqueeze(-1)
    return t


def _cut_graph(root: nn.Module, graph: fx.Graph, feature: fx.Node, layout: str, pool: fx.Node) -> fx.GraphModule:
    """A GraphModule computing the traced graph up to ``feature`` (sharing root's parameters).

    Ops between the feature map and the pooling whose result nobody uses (``x.relu_()``) are
    kept: they act by mutating the map.
    """
    new = fx.Graph()
    env = {}
    past_feature = False
    for node in graph.nodes:
        if node.op == "output" or node is pool:
            break
        if past_feature and (node.users or not all(a in env for a in node.all_input_nodes)):
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
        past_feature = past_feature or node is feature
    out = env[feature]
    if layout != "NCHW":
        out = new.call_function(_to_channels_first, (out, layout))
    new.output(out)
    # No dead-code elimination: it would drop in-place ops whose result is unused (x.relu_()).
    return fx.GraphModule(root, new, class_name="Backbone")


def _from_channels_first(t: torch.Tensor, layout: str, like_shape: tuple) -> torch.Tensor:
    if layout == "NHWC":
        return t.permute(0, 2, 3, 1)
    if layout == "NCL":
        return t.squeeze(-1)
    if layout == "NLD":
        return t.flatten(2).transpose(1, 2)
    return t


def _cut_tail(root: nn.Module, graph: fx.Graph, feature: fx.Node, layout: str) -> fx.GraphModule:
    """A GraphModule (features (B, D, H, W), *model inputs) -> logits: the model after ``feature``.

    Nodes after the cut may only depend on the feature map, the inputs (e.g. ``x.size(0)``)
    and attributes; anything else raises, and the float64 head check is skipped.
    """
    new = fx.Graph()
    fin = new.placeholder("phpn_features")
    like = _shape(feature)
    env = {feature: new.call_function(_from_channels_first, (fin, layout, like))}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = new.node_copy(node, lambda n: env[n])
    order = {n: i for i, n in enumerate(graph.nodes)}

    def bring(node):
        if node in env:
            return env[node]
        if node.op == "get_attr" or (order[node] > order[feature]):
            env[node] = new.node_copy(node, bring)
            return env[node]
        if bring_ok(node):
            env[node] = new.node_copy(node, bring)
            return env[node]
        raise ValueError(f"the head also reads {node.name}, computed before the feature map")

    def bring_ok(node):  # sizes and other non-tensor values read off the inputs
        return (node in env or node.op in ("placeholder", "get_attr")
                or (_shape(node) is None and all(bring_ok(a) for a in node.all_input_nodes)))

    out = next(n for n in graph.nodes if n.op == "output")
    new.output(fx.map_arg(out.args[0], bring))
    return fx.GraphModule(root, new, class_name="Head")


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
