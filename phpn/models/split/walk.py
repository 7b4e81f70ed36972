"""Walking the traced graph back from the logits: the head (Linear, F.linear, 1x1 conv, BatchNorm,
scalar scaling) <- shape-only ops and dropout <- optionally one LayerNorm <- a global average
pooling. Anything else after the feature map is a refusal with the reason found."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from phpn.models.split.plan import (
    _MAX_WALK,
    _Affine,
    _batchnorm_params,
    _conv1x1_params,
    _cut_graph,
    _cut_tail,
    _LayerNorm,
    _layernorm_params,
    _linear_params,
    _Plan,
    _shape,
)


@dataclass
class _WalkResult:
    plan: Optional[_Plan] = None
    expand: str = ""  # a module to trace into before deciding
    reason: str = ""
    certain: bool = True  # False when the refusal rests on something we could not read
    notes: list = field(default_factory=list)


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


_SHAPE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten) + _DROPOUTS


_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous", "permute", "transpose",
                  "clone", "view_as", "reshape_as", "float", "to", "type_as", "detach"}


_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                    torch.clone, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                    F.feature_alpha_dropout, torch.detach}


_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.Softmax)


_NONNEG_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_, F.relu_, torch.sigmoid, F.sigmoid, F.softplus,
                     F.hardsigmoid}


_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_"}


_ALMOST_NONNEG_MODULES = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish)


_ALMOST_NONNEG_FUNCTIONS = {F.silu, F.hardswish, F.gelu, F.mish}


_LOWER_BOUND = {"SiLU": -0.2785, "silu": -0.2785, "Swish": -0.2785, "Hardswish": -0.375, "hardswish": -0.375,
                "GELU": -0.17, "gelu": -0.17, "Mish": -0.309, "mish": -0.309}


_MAX_POOLS = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.MaxPool2d)


_MAX_FUNCTIONS = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.max_pool1d, F.max_pool2d, torch.amax, torch.max}


_SCALAR_OPS = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add,
               torch.sub, operator.imul, operator.itruediv, operator.iadd, operator.isub}


def _is_torch_module(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn")


def _activation_inside(m: nn.Module) -> Optional[nn.Module]:
    """The activation a normalisation layer applies after itself (timm's BatchNormAct2d), else None."""
    if _is_torch_module(m) or type(m).forward in (nn.BatchNorm1d.forward, nn.BatchNorm2d.forward):
        return None
    return next((c for c in m.children() if not isinstance(c, _SHAPE_MODULES)), None)


def _two_summands(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd)
            and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2]))


def _head_name(layers: list) -> str:
    """The module the layers of one head share ('head' for 'head.bn', 'head.linear')."""
    parts = [name.split(".") for name in layers]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) or layers[-1]


def _compose(root: nn.Module, ops: list, width: Optional[int]):
    """The affine ops of one head composed into (A, c), float64."""
    if width is None:
        first = next(op for op in ops if not op.scalar)
        width = int(first.read(root)[0].shape[1])
    A, c = torch.eye(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    for op in ops:
        M, m = op.read(root, A.shape[0])
        A, c = M @ A, M @ c + m
    return A, c


def _per_sample_dims(shape: tuple) -> list:
    return [s for s in shape[1:] if s != 1]


def _fn_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _main_input(node: fx.Node):
    """The tensor argument an op transforms (None when it combines several tensors)."""
    if node.op == "call_function" and node.target in _SCALAR_OPS:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        return tensors[0] if len(tensors) == 1 else None
    if node.op in ("call_module", "call_method", "call_function"):
        if node.args and isinstance(node.args[0], fx.Node):
            first = node.args[0]
        elif isinstance(node.kwargs.get("input"), fx.Node):
            first = node.kwargs["input"]
        else:
            return None
        if node.op == "call_function" and node.target in (torch.cat, torch.stack, torch.add, operator.add):
            return None
        return first
    return None


def _getitem_is_token(node: fx.Node) -> bool:
    """x[:, 0] on a (B, N, D) token tensor: the head reads one token."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) < 2:
        return False
    return idx[0] == slice(None) and isinstance(idx[1], int)


def _int_pair(v) -> tuple:
    if isinstance(v, int):
        return (v, v)
    try:
        return tuple(int(a) if a is not None else -1 for a in v)
    except (TypeError, ValueError):
        return (-1, -1)


class _Walk:
    """Walk back from the output and classify what lies between the feature map and the logits."""

    def __init__(self, gm: fx.GraphModule, *, shapes: bool, opaque: set):
        self.gm = gm
        self.shapes = shapes
        self.opaque = opaque
        self.modules = dict(gm.named_modules())

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            m = self.modules[node.target]
            act = _activation_inside(m)
            return f"{type(m).__name__} '{node.target}'" + (f" (with its {type(act).__name__})" if act else "")
        if node.op == "call_method":
            return f".{node.target}()"
        if node.op == "call_function":
            if node.target is operator.getitem:
                return f"[{_index_text(node.args[1])}]"
            return _fn_name(node.target)
        return node.op

    # -- the head side -------------------------------------------------------------------

    def run(self) -> _WalkResult:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        node = out.args[0]
        if not isinstance(node, fx.Node):
            return _WalkResult(reason="The model returns a tuple or dict rather than one logits tensor.", certain=True)
        chain = []  # (kind, node, payload), from the output backwards
        for _ in range(_MAX_WALK):
            kind, payload = self.classify(node)
            if kind == "expand":
                return _WalkResult(expand=payload)
            if kind == "stop" and _two_summands(node):  # two heads added up (LeViT, distilled DeiT)
                summed = self.summed_heads(node, chain)
                if summed is not None:
                    return summed
            chain.append((kind, node, payload))
            if kind == "pool":
                return self.finish(chain, node)
            if kind in ("stop", "token", "partial-pool", "max-pool"):
                break  # a pooling that is not a global mean, or something no head reads through
            nxt = _main_input(node)
            if nxt is None:
                break
            node = nxt
        return self.refuse(chain)

    def classify(self, node: fx.Node):
        """(kind, payload); kinds: shape, affine, layernorm, pool, partial-pool, max-pool,
        token, nonlinear, unknown, expand, stop."""
        if node.op in ("placeholder", "get_attr"):
            return "stop", None
        if node.op == "call_module":
            return self.classify_module(node, self.modules[node.target])
        if node.op == "call_method":
            return self.classify_method(node)
        if node.op == "call_function":
            return self.classify_function(node)
        return "unknown", None

    def classify_module(self, node, m):
        name = node.target
        if isinstance(m, _SHAPE_MODULES):
            return "shape", None
        if isinstance(m, nn.Linear):
            return "affine", _Affine(name, lambda root, width=None, n=name: _linear_params(root.get_submodule(n)))
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and self.spatial_is_one(node):
            return "affine", _Affine(name, lambda root, width=None, n=name: _conv1x1_params(root.get_submodule(n)))
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if _activation_inside(m):  # timm's BatchNormAct2d: the normalisation, then its activation
                return "nonlinear", None
            if m.running_mean is None:
                return "nonlinear", "BatchNorm without running statistics (normalises by the batch)"
            return "affine", _Affine(name, lambda root, width=None, n=name: _batchnorm_params(root.get_submodule(n)))
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) == 1:
                return "layernorm", _LayerNorm(name, lambda root, n=name: _layernorm_params(root.get_submodule(n)))
            return "nonlinear", None
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive_pool(node, m.output_size)
        if isinstance(m, nn.AdaptiveAvgPool1d):
            return ("pool", "NCL") if _int_pair(m.output_size)[0] == 1 else ("partial-pool", None)
        if isinstance(m, nn.AvgPool2d):
            ceil_whole = m.ceil_mode and m.divisor_override is None  # e.g. HF EfficientNet's pooler
            return self.avg_pool(node, m.kernel_size, m.padding, ceil_whole)
        if isinstance(m, _MAX_POOLS):
            return "max-pool", None
        if not _is_torch_module(m) and name not in self.opaque:
            return "expand", name
        if not _is_torch_module(m):
            return "unknown", None
        return "nonlinear", None

    def classify_method(self, node):
        t = node.target
        if t in _SHAPE_METHODS:
            return "shape", None
        if t == "mean":
            return self.mean_pool(node)
        if t in ("amax", "max"):
            return "max-pool", None
        if t in ("mul", "div", "add", "sub", "mul_", "div_", "add_", "sub_") and _scalar_arg(node) is not None:
            op = _scalar_affine(node, _scalar_arg(node))
            return ("affine", op) if op else ("nonlinear", None)
        return "nonlinear", None

    def classify_function(self, node):
        t = node.target
        if t in _SHAPE_FUNCTIONS:
            return "shape", None
        if t is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and not self.is_tensor(src):
                return "shape", None  # picking one output out of a tuple
            if self.keeps_elements(node):
                return "shape", None  # x[:, :, 0, 0] on a pooled (B, D, 1, 1) map
            if _getitem_is_token(node):
                return "token", None
            return "unknown", None
        if t is F.linear:
            return self.functional_linear(node)
        if t is torch.mean:
            return self.mean_pool(node)
        if t is F.adaptive_avg_pool2d:
            return self.adaptive_pool(node, _arg(node, 1, "output_size"))
        if t is F.adaptive_avg_pool1d:
            return ("pool", "NCL") if _int_pair(_arg(node, 1, "output_size"))[0] == 1 else ("partial-pool", None)
        if t is F.avg_pool2d:
            return self.avg_pool(node, _arg(node, 1, "kernel_size"), _arg(node, 3, "padding", 0))
        if t is F.layer_norm:
            return self.functional_layernorm(node)
        if t in _MAX_FUNCTIONS:
            return "max-pool", None
        if t in _SCALAR_OPS and _scalar_arg(node) is not None:
            op = _scalar_affine(node, _scalar_arg(node))
            return ("affine", op) if op else ("nonlinear", None)
        if t in (torch.cat, torch.stack, operator.add, torch.add, operator.mul, torch.mul, operator.matmul):
            return "stop", None
        return "nonlinear", None

    def keeps_elements(self, node) -> bool:
        a, b = _shape(node.args[0]), _shape(node)
        return self.shapes and a is not None and b is not None and math.prod(a[1:]) == math.prod(b[1:])

    def is_tensor(self, node) -> bool:
        return not self.shapes or _shape(node) is not None

    def spatial_is_one(self, node) -> bool:
        shape = _shape(node.args[0]) if self.shapes else None
        return shape is None or (len(shape) == 4 and shape[2] == 1 and shape[3] == 1)

    def adaptive_pool(self, node, output_size):
        size = _int_pair(output_size)
        if all(s == 1 for s in size):
            return "pool", "NCHW"
        return "partial-pool", size

    def avg_pool(self, node, kernel, padding, ceil_whole: bool = False):
        if not self.shapes:
            return "pool", "NCHW"  # decided once shapes are known
        shape, out = _shape(node.args[0]), _shape(node)
        kernel_parts = kernel if isinstance(kernel, (tuple, list)) else (kernel,)
        if any(isinstance(k, fx.Node) for k in kernel_parts):
            # The kernel is computed from the input's size (avg_pool2d(x, x.shape[2:])): whole map.
            whole = out is not None and len(out) == 4 and out[2] == out[3] == 1
        else:
            whole = shape is not None and len(shape) == 4 and _int_pair(kernel) == tuple(shape[2:])
            # With ceil_mode (and no padding) a kernel larger than the map averages the whole map:
            # the divisor counts only the positions inside it.
            whole = whole or (ceil_whole and shape is not None and len(shape) == 4
                              and all(k >= s for k, s in zip(_int_pair(kernel), shape[2:])))
        if whole and _int_pair(padding or 0) == (0, 0):
            return "pool", "NCHW"
        return "partial-pool", None

    def mean_pool(self, node):
        dims = _arg(node, 1, "dim")
        if dims is None:
            return "nonlinear", "a mean over the whole tensor"
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not self.shapes:
            return "pool", None
        shape = _shape(node.args[0])
        out = _shape(node)
        if shape is None or out is None or len(_per_sample_dims(out)) > 1:
            return "partial-pool", None
        dims = {d % len(shape) for d in dims}
        layout = {2: {frozenset({2, 3}): "NCHW", frozenset({1, 2}): "NHWC"},
                  1: {frozenset({1}): "NLD", frozenset({2}): "NCL"}}.get(len(shape) - 2, {}).get(frozenset(dims))
        return "pool", layout

    def functional_linear(self, node):
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if not _is_attr(w) or (b is not None and not _is_attr(b)):
            return "unknown", None
        wt, bt = w.target, (b.target if b is not None else None)

        def read(root, width=None):
            weight = _attr(root, wt).detach().double()
            bias = _attr(root, bt).detach().double() if bt else torch.zeros(weight.shape[0], dtype=torch.float64)
            return weight, bias

        return "affine", _Affine(f"F.linear({wt})", read)

    def functional_layernorm(self, node):
        shape = _arg(node, 1, "normalized_shape")
        w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
        eps = _arg(node, 4, "eps", 1e-5)
        if len(tuple(shape)) != 1 or any(v is not None and not _is_attr(v) for v in (w, b)):
            return "nonlinear", None
        wt, bt, d = (w.target if w is not None else None), (b.target if b is not None else None), int(tuple(shape)[0])

        def read(root):
            g = _attr(root, wt).detach().double() if wt else torch.ones(d, dtype=torch.float64)
            beta = _attr(root, bt).detach().double() if bt else torch.zeros(d, dtype=torch.float64)
            return g, beta, float(eps)

        return "layernorm", _LayerNorm("F.layer_norm", read)

    def branch(self, node):
        """Walk one summand back through shape-only and affine ops: (kind, node reached, affine ops in
        forward order); kind "expand" with the module name when one must be traced into first."""
        ops = []
        for _ in range(_MAX_WALK):
            kind, payload = self.classify(node)
            if kind == "expand":
                return "expand", payload, ops
            if kind not in ("shape", "affine"):
                return kind, node, ops
            if kind == "affine":
                ops.insert(0, payload)
            nxt = _main_input(node)
            if nxt is None:
                return "stop", node, ops
            node = nxt
        return "stop", node, ops

    def summed_heads(self, add_node, chain) -> Optional[_WalkResult]:
        """Two affine heads added up. On one pooled vector their sum is one affine map, folded like
        any other (LeViT averages 'head' and 'head_dist'); heads reading two different tokens
        (distilled DeiT: the class and the distillation token) are refused with that reason."""
        branches = [self.branch(a) for a in add_node.args[:2]]
        for kind, payload, _ in branches:
            if kind == "expand":
                return _WalkResult(expand=payload)
        heads = [[op.name for op in ops if not op.scalar] for _, _, ops in branches]
        if not all(heads):
            return None
        names = [_head_name(h) for h in heads]
        (k1, n1, ops1), (k2, n2, ops2) = branches
        notes = [f"walking back from the output: {self.chain_text(chain + [('stop', add_node, None)])}, "
                 f"then two heads: {' then '.join(heads[0])}; {' then '.join(heads[1])}"]
        if k1 == k2 == "pool" and n1 is n2:
            def read(root, width=None, first=ops1, second=ops2):
                maps = [_compose(root, ops, width) for ops in (first, second)]
                return maps[0][0] + maps[1][0], maps[0][1] + maps[1][1]

            summed = _Affine(f"{names[0]} + {names[1]}", read)
            result = self.finish(chain + [("affine", add_node, summed), ("pool", n1, self.classify(n1)[1])], n1)
            if result.plan is not None:
                result.plan.notes.append(f"the heads '{names[0]}' and '{names[1]}' read the same pooled features and "
                                         "their outputs are added: one affine map, folded into one head")
            return result
        tokens = [self.describe(n) for k, n, _ in branches if k == "token"]
        if len(tokens) == 2:
            text = (f"The model adds up two heads that read different tokens: '{names[0]}' reads {tokens[0]} (the "
                    f"class token) and '{names[1]}' reads {tokens[1]} (the distillation token of a distilled "
                    "DeiT). Neither averages over positions, so the logit is not a sum of per-position "
                    f"contributions, and '{names[0]}' alone is not the model (it drops half of each logit).")
            err_notes = notes + ["use a ViT or DeiT trained with global average pooling (timm's global_pool='avg') "
                                 "instead of class and distillation tokens"]
            return _WalkResult(reason=text, certain=True, notes=err_notes)
        reached = [self.describe(n) for _, n, _ in branches]
        return _WalkResult(reason=(f"The model adds up two heads, '{names[0]}' and '{names[1]}', that read different "
                                   f"inputs ({reached[0]} and {reached[1]}), not one pooled feature vector."),
                           certain=False, notes=notes)  # forward hooks may still find a plain head

    # -- the pooling and the feature map -------------------------------------------------

    def finish(self, chain, pool_node) -> _WalkResult:
        after_pool = list(reversed(chain[:-1]))  # forward order, between the pooling and the output
        bad = [(k, n, p) for k, n, p in after_pool if k not in ("shape", "affine", "layernorm")]
        pool_text = self.describe(pool_node)
        if bad:
            return self.refuse(chain, pool_text=pool_text)
        ops = [p for k, n, p in after_pool if k in ("affine", "layernorm")]
        if not any(isinstance(op, _Affine) and not op.scalar for op in ops):
            return _WalkResult(reason=f"There is no linear layer after the pooling ({pool_text}); "
                                      "the model outputs the pooled features themselves.", certain=True)
        lns = [i for i, op in enumerate(ops) if isinstance(op, _LayerNorm)]
        if len(lns) > 1 or (lns and lns[0] != 0):
            return _WalkResult(reason="A LayerNorm follows a linear layer after the pooling "
                                      f"({self.chain_text(after_pool)}); "
                                      "only a normalisation directly on the pooled features can be folded exactly.",
                               certain=True)

        source, layout, absorbed = self.feature_source(pool_node, chain[-1][2])
        if source is None:
            return _WalkResult(reason=f"The pooling {pool_text} does not average a feature map phpn can read "
                                      f"(input shape {_shape(pool_node.args[0])}).", certain=False)
        producer = self.producer(source)
        mutated = self.in_place_activation(source, pool_node)
        if producer is not None and producer.op == "call_module":
            m = self.modules[producer.target]
            if not _is_torch_module(m) and producer.target not in self.opaque:
                return _WalkResult(expand=producer.target)
        if not self.shapes:
            return _WalkResult()  # structure settled; wait for shapes

        signed, sign_note = self.signedness(mutated or producer)
        affine = [op.name for op in ops if isinstance(op, _Affine)]
        head_layer = [op.name for op in ops if isinstance(op, _Affine) and not op.scalar][-1]
        notes = [f"pooling: {pool_text}" + (f" (with {', '.join(absorbed)})" if absorbed else ""),
                 f"head: {' then '.join(affine)}"]
        dropouts = [self.describe(n) for k, n, p in after_pool if k == "shape" and self.is_dropout(n)]
        if dropouts:
            notes.append(f"{', '.join(dropouts)}: dropout is the identity at inference")
        if lns:
            notes.append(f"folded the normalisation {ops[0].name} after the pooling into the head "
                         "(each image's contributions are scaled by 1/sigma of its pooled features)")
        if layout != "NCHW":
            notes.append(f"the features are laid out {layout}; the backbone returns them as (B, D, H, W)")
        if sign_note:
            notes.append(sign_note)
        feature_name = self.node_name(source, producer)
        graph, feature_node = self.gm.graph, source
        plan = _Plan(
            make_backbone=lambda root: _cut_graph(root, graph, feature_node, layout, pool_node),
            ops=ops, feature_layer=feature_name, head_layer=head_layer, signed=signed, notes=notes,
            make_tail=lambda root: _cut_tail(root, graph, feature_node, layout),
        )
        return _WalkResult(plan=plan)

    def feature_source(self, pool_node, layout_hint):
        """The node holding the unpooled map, its layout, and the ops between it and the pooling."""
        node = pool_node.args[0] if isinstance(pool_node.args[0], fx.Node) else pool_node.kwargs.get("input")
        absorbed = []
        if not self.shapes:
            return node, layout_hint or "NCHW", absorbed
        hint = layout_hint
        for _ in range(8):
            shape = _shape(node)
            if shape is None:
                return None, None, absorbed
            if len(shape) == 4:
                break
            prev = _main_input(node)
            if _is_mean_op(node) and prev is not None:  # x.mean(3).mean(2), x.flatten(2).mean(2), ...
                absorbed.append(self.describe(node))
                node, hint = prev, None
                continue
            if prev is not None and _shape(prev) is not None and len(_shape(prev)) == 4 \
                    and node.op in ("call_method", "call_function") \
                    and node.target in ("view", "reshape", "flatten", torch.flatten, torch.reshape):
                absorbed.append(self.describe(node))
                node, hint = prev, None
                continue
            break
        shape = _shape(node)
        pooled = _shape(pool_node)
        width = int(math.prod(pooled[1:])) if pooled else None
        if len(shape) == 4:
            by_width = "NCHW" if shape[1] == width else "NHWC" if shape[3] == width else None
            layout = hint if hint in ("NCHW", "NHWC") else by_width
        elif len(shape) == 3:
            by_width = "NLD" if shape[2] == width else "NCL" if shape[1] == width else None
            layout = hint if hint in ("NLD", "NCL") else by_width
        else:
            layout = None
        return (node, layout, absorbed) if layout else (None, None, absorbed)

    def producer(self, node):
        """The op that computed the feature map, looking through reshapes and dropout."""
        for _ in range(16):
            if node is None or node.op in ("placeholder", "get_attr"):
                return node
            kind, _ = self.classify_shape_only(node)
            if kind != "shape":
                return node
            node = _main_input(node)
        return node

    def in_place_activation(self, source, pool_node):
        """An in-place op applied to the feature map before the pooling, whose result is unused."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        found = None
        for user in source.users:
            if not user.users and order[source] < order[user] < order[pool_node]:
                found = user
        return found

    def classify_shape_only(self, node):
        if node.op == "call_module":
            m = self.modules[node.target]
            return ("shape", None) if isinstance(m, _SHAPE_MODULES) else ("other", None)
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return "shape", None
        if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
            return "shape", None
        return "other", None

    def signedness(self, producer):
        """(signed, note); signed None means 'look at the numbers'."""
        if producer is None:
            return None, ""
        name = self.describe(producer)
        if producer.op == "call_module":
            m = self.modules[producer.target]
            if isinstance(m, _NONNEG_MODULES) or (isinstance(m, nn.Hardtanh) and m.min_val >= 0):
                return False, f"features end with {name}: non-negative, as NMF needs"
            key = type(m).__name__
            if isinstance(m, _ALMOST_NONNEG_MODULES) or "swish" in key.lower():
                fallback = _LOWER_BOUND["SiLU"] if "swish" in key.lower() else -0.3
                return True, _almost_note(name, _LOWER_BOUND.get(key, fallback))
            if not _is_torch_module(m):
                return None, ""
            return True, f"features end with {name}, so they can be negative"
        if producer.op == "call_function":
            if producer.target in _NONNEG_FUNCTIONS or (producer.target is torch.clamp and _clamp_min(producer) >= 0):
                return False, f"features end with {name}: non-negative, as NMF needs"
            if producer.target in _ALMOST_NONNEG_FUNCTIONS:
                return True, _almost_note(name, _LOWER_BOUND.get(_fn_name(producer.target), -0.3))
        if producer.op == "call_function" and producer.target in (operator.mul, torch.mul) and _is_swish(producer):
            return True, _almost_note(f"x * sigmoid(x) ({name})", _LOWER_BOUND["SiLU"])
        if producer.op == "call_method":
            clamps_at_zero = producer.target in ("clamp", "clamp_", "clamp_min") and _clamp_min(producer) >= 0
            if producer.target in _NONNEG_METHODS or clamps_at_zero:
                return False, f"features end with {name}: non-negative, as NMF needs"
        return True, f"features end with {name}, so they can be negative"

    def is_dropout(self, node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], _DROPOUTS)
        return node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS

    def node_name(self, source, producer) -> str:
        """A module whose output is the feature map (usable as --feature-layer), else a description."""
        stack = list((source.meta.get("nn_module_stack") or {}).keys())
        if source.op == "call_module" and (not stack or stack[-1] != source.target):
            stack.append(source.target)
        position = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        all_stacks = [set((n.meta.get("nn_module_stack") or {}).keys()) for n in self.gm.graph.nodes]
        calls = [n.target for n in self.gm.graph.nodes if n.op == "call_module"]
        for name in stack:  # outermost first
            # A module called twice (a shared activation) is no use as a hook target.
            if "@" in name or any(f"{name}@1" in st for st in all_stacks) or calls.count(name) > 1:
                continue
            inside = [n for n, st in zip(self.gm.graph.nodes, all_stacks, strict=True) if name in st
                      or (n.op == "call_module" and n.target == name)]
            if inside and max(inside, key=position.get) is source:
                return str(name)
        node = producer if producer is not None else source
        prev = node
        for _ in range(16):  # a function at the top level (F.relu after 'features'): name its neighbour
            prev = _main_input(prev) if prev is not None else None
            if prev is None:
                break
            if prev.op == "call_module":
                return f"{self.describe(node)} after '{prev.target}'"
        return self.describe(node)

    def chain_text(self, forward_chain) -> str:
        return " -> ".join(self.describe(n) for _, n, _ in forward_chain)

    # -- reasons --------------------------------------------------------------------------

    def refuse(self, chain, pool_text: str = "") -> _WalkResult:
        """Explain why the walk found no plain pooling + affine head."""
        forward = list(reversed(chain))
        if pool_text:  # a global pooling was found: what follows it is the problem
            forward = forward[1:]
        kinds = [k for k, _, _ in chain]
        nonlinear = [self.describe(n) for k, n, _ in forward if k in ("nonlinear", "max-pool")]
        unknown = [self.describe(n) for k, n, _ in forward if k == "unknown"]
        linears = sum(1 for k, n, p in forward if k == "affine" and isinstance(p, _Affine) and self.is_linear_layer(n))
        notes = [f"walking back from the output: {self.chain_text(chain)}"]
        if "token" in kinds:
            node = next(n for k, n, _ in chain if k == "token")
            text = (f"The head reads a single token ({self.describe(node)}, the class token of a Vision Transformer) "
                    "instead of averaging over positions, so the logit is not a sum of per-position contributions.")
            return _WalkResult(reason=text, certain=True, notes=notes)
        if "max-pool" in kinds and not pool_text:
            node = next(n for k, n, _ in chain if k == "max-pool")
            return _WalkResult(reason=f"The model pools with a maximum ({self.describe(node)}), not a mean, so the "
                                      "logit "
                                      "is not a sum of per-position contributions.", certain=True, notes=notes)
        tail = self.chain_text([c for c in forward if c[0] != "stop"][-10:])
        if pool_text and nonlinear:
            what = "an MLP head" if linears >= 2 else "non-linear layers"
            return _WalkResult(
                reason=(f"After the global pooling ({pool_text}) the model applies {what}: {tail}. "
                        f"{', '.join(nonlinear)} {'is' if len(nonlinear) == 1 else 'are'} non-linear, so the logit "
                        "is not a linear function of the pooled features and cannot be split into per-position "
                        "contributions."),
                certain=True, notes=notes)
        if pool_text:
            return _WalkResult(
                reason=(f"After the global pooling ({pool_text}) the model applies {tail}; phpn cannot tell whether "
                        f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} affine."),
                certain=False, notes=notes)
        partial = next((n for k, n, _ in chain if k == "partial-pool"), None)
        if partial is not None:
            tail = self.chain_text([c for c in forward if c[0] not in ("stop", "partial-pool")][-10:])
            grid = _shape(partial)
            grid_text = (f" keeps a {grid[-2]}x{grid[-1]} grid" if grid and len(grid) == 4
                         else " does not average over all positions")
            between = ", ".join(sorted({_type_only(d) for d in nonlinear}))
            mlp = (f" The classifier is an MLP ({linears} linear layers with {between} "
                   "between them), which is non-linear.") if linears >= 2 and nonlinear else ""
            return _WalkResult(
                reason=("There is no global average pooling before the classifier: "
                        f"{self.describe(partial)}{grid_text}, "
                        f"which is flattened and fed to the head ({tail}).{mlp}"),
                certain=True, notes=notes)
        if nonlinear:
            return _WalkResult(reason="No global average pooling was found before the head, and the last operations "
                                      f"are non-linear: {tail}.", certain=True, notes=notes)
        return _WalkResult(reason=f"No global average pooling followed by a linear head was found; the last operations "
                                  f"are: {tail}.", certain=False, notes=notes)

    def is_linear_layer(self, node) -> bool:
        if node.op == "call_module":
            m = self.modules[node.target]
            return isinstance(m, (nn.Linear, nn.Conv2d))
        return node.op == "call_function" and node.target is F.linear


def _is_mean_op(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target in (torch.mean, F.adaptive_avg_pool2d,
                                                               F.adaptive_avg_pool1d)))


def _type_only(desc: str) -> str:
    return desc.split(" ")[0]


def _index_text(idx) -> str:
    if not isinstance(idx, tuple):
        idx = (idx,)
    parts = []
    for i in idx:
        if i == slice(None):
            parts.append(":")
        elif i is Ellipsis:
            parts.append("...")
        else:
            parts.append(str(i))
    return ", ".join(parts)


def _is_swish(node: fx.Node) -> bool:
    """x * sigmoid(x), the hand-written SiLU."""
    a, b = (node.args + (None, None))[:2]
    for x, s in ((a, b), (b, a)):
        if isinstance(s, fx.Node) and s.target in (torch.sigmoid, F.sigmoid, "sigmoid") and s.args and s.args[0] is x:
            return True
    return False


def _is_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _almost_note(name: str, bound: float) -> str:
    return (f"features end with {name}, which dips slightly below zero (minimum {bound}); "
            "NMF needs non-negative features, so the small negative part must be handled (e.g. clamped)")


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _scalar_arg(node: fx.Node):
    others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) == 1 and len(others) == 1 and isinstance(others[0], (int, float)):
        return float(others[0])
    return None


def _scalar_affine(node: fx.Node, value: float) -> Optional[_Affine]:
    """x*s, x/s, x+s, x-s, s*x, s+x, s-x as an affine map; None for s/x (not affine)."""
    name = _fn_name(node.target).strip("_").lstrip("i") if node.op == "call_function" else node.target.rstrip("_")
    name = {"truediv": "div", "mul": "mul", "add": "add", "sub": "sub", "div": "div"}.get(name, name)
    tensor_first = isinstance(node.args[0], fx.Node)
    if name == "div" and not tensor_first:
        return None

    def read(root, width):
        eye = torch.eye(width, dtype=torch.float64)
        zero = torch.zeros(width, dtype=torch.float64)
        if name == "mul":
            return eye * value, zero
        if name == "div":
            return eye / value, zero
        if name == "add":
            return eye, zero + value
        return (eye, zero - value) if tensor_first else (-eye, zero + value)

    return _Affine(f"{name} by {value:g}", read, scalar=True)


def _clamp_min(node: fx.Node) -> float:
    low = _arg(node, 1, "min")
    return float(low) if isinstance(low, (int, float)) else -math.inf
