"""Feature extraction: images -> the unpooled feature map the head reads (and the model's logits).

Images are decoded by worker processes (:func:`phpn.images.batches.iter_batches`) while the model runs;
batches run under ``torch.inference_mode``, on CUDA from pinned memory, channels_last, and with
bf16 autocast when asked. Features come back as float32 (B, D, H, W).

:class:`FeatureTap` runs the *whole* model once per batch and catches the feature map at the
cut on its way through, so one pass gives both the features discovery needs and the model's
own logits the certificate compares against. The catch is checked on the first batch against
the backbone (same features) and the head (same logits); when it cannot be set up or does not
check out, the tap falls back to two passes (backbone, then model) and says why.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
from torch import fx

from phpn.head import HeadSplit
from phpn.models.split.plan import _to_channels_first

# The first batch's caught features must match the backbone's own output this closely
# (relative to their largest magnitude): identical ops give identical numbers.
TAP_TOLERANCE = 1e-5


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_backbone(split: HeadSplit, device: torch.device) -> torch.nn.Module:
    backbone = split.backbone.to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.inference_mode()
def backbone_features(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device,
                      autocast: bool = False) -> torch.Tensor:
    images = _to_device(images, device)
    with _autocast(device, autocast):
        feats = backbone(images)
    return feats.float().contiguous()


# At most this many operations after the last layers caught are replayed to rebuild the map.
MAX_REPLAYED_OPS = 8


def _suffix(graph: fx.Graph, root: torch.nn.Module):
    """The feature map as a few operations on layers' outputs, read off the backbone's graph.

    Walking back from the graph's output, every layer (call_module) reached is an anchor whose
    output will be caught; functions and methods in between (a ReLU, a residual add, a permute,
    the layout change to channels-first) are replayed on the caught outputs. Returns
    (anchors [(layer name, which call of it)], replay GraphModule) or (None, why not).
    """
    nodes = list(graph.nodes)
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        return None, "the backbone's output is not a single tensor"
    anchors, replayed, stack = [], set(), [out]
    while stack:
        node = stack.pop()
        if node in anchors or node in replayed or node.op == "get_attr":
            continue
        if node.op == "call_module":
            anchors.append(node)
        elif node.op in ("call_function", "call_method"):
            replayed.add(node)
            stack.extend(node.all_input_nodes)
        else:  # the images themselves
            return None, "the feature map is computed from the input directly"
    if len(replayed) > MAX_REPLAYED_OPS:
        return None, f"the feature map is {len(replayed)} operations past the last layer"
    order = {n: i for i, n in enumerate(nodes)}
    anchors.sort(key=order.get)
    calls = [[n for n in nodes if n.op == "call_module" and n.target == a.target].index(a) for a in anchors]
    replay, env = fx.Graph(), {}
    for a in anchors:
        env[a] = replay.placeholder(f"caught_{len(env)}")
    for node in sorted(replayed | {n for r in replayed for n in r.all_input_nodes if n.op == "get_attr"},
                       key=order.get):
        env[node] = replay.node_copy(node, lambda n: env[n])
    replay.output(env[out])
    return [(a.target, c) for a, c in zip(anchors, calls)], fx.GraphModule(root, replay, class_name="Replay")


def _tap_point(split: HeadSplit, model: torch.nn.Module):
    """Where the cut's features appear inside the model's own forward: (anchors, replay) with
    anchors [(layer name, which call of it)] and replay(*caught outputs) -> features (B, D, H, W),
    or (None, why not)."""
    backbone = split.backbone
    for name, module in model.named_modules():
        if module is backbone and name:  # the backbone is one of the model's own layers
            return [(name, 0)], None
    if isinstance(backbone, fx.GraphModule):
        return _suffix(backbone.graph, backbone)
    layer, layout = getattr(backbone, "layer", None), getattr(backbone, "layout", "NCHW")
    if isinstance(layer, str) and isinstance(getattr(backbone, "model", None), torch.nn.Module):
        if layout == "NCHW":
            return [(layer, 0)], None

        return [(layer, 0)], (lambda t, layout=layout: _to_channels_first(t, layout))
    return None, f"the backbone is a {type(backbone).__name__}"


class FeatureTap:
    """Features at the cut and the model's own logits from one forward pass of the model.

    ``tap(images)`` -> (features (B, D, H, W) float32, logits (B, C) float32). The pass runs in
    float32 (the certificate compares float32 logits). ``mode`` says how the pair was obtained.
    """

    def __init__(self, split: HeadSplit, model: torch.nn.Module, device: torch.device):
        self.split, self.device = split, device
        self.backbone = prepare_backbone(split, device)
        self.model = model.to(device).eval()
        self.anchors, self.replay = _tap_point(split, model)
        self.checked = False
        self.copy = False  # catch copies of the layers' outputs (set when the model changes them in place)
        self.head_gap: Optional[float] = None  # relative max |head(features) - model logits| on the first batch
        self.mode = "one pass" if self.anchors is not None else f"two passes ({self.replay})"
        self.max_batch: Optional[int] = None  # images per forward pass that fit in memory, once a pass did not


    def _fallback(self, why: str) -> None:
        self.anchors = None
        self.mode = f"two passes ({why})"

    def _one_pass(self, x: torch.Tensor):
        caught = [None] * len(self.anchors)
        owner = threading.get_ident()
        handles = []
        for layer in dict.fromkeys(name for name, _ in self.anchors):
            wanted = {call: i for i, (name, call) in enumerate(self.anchors) if name == layer}
            seen = [0]

            def grab(module, inputs, output, wanted=wanted, seen=seen):
                # The model may be shared: another thread's forward (another visitor's discovery or
                # explanation in the app) passes through the same hook and must not be caught.
                if threading.get_ident() != owner:
                    return
                if seen[0] in wanted:
                    caught[wanted[seen[0]]] = output.clone() if self.copy and torch.is_tensor(output) else output
                seen[0] += 1

            handles.append(self.model.get_submodule(layer).register_forward_hook(grab))
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if any(c is None for c in caught) or not isinstance(logits, torch.Tensor):
            return None, logits
        feats = self.replay(*caught) if self.replay is not None else caught[0]
        return (feats if isinstance(feats, torch.Tensor) else None), logits

    def __call__(self, images: torch.Tensor):
        """Batches are sized to memory: a pass that runs out of GPU memory is split in halves until
        the halves fit, and later batches are cut to the size that fitted (so a large batch size,
        or a user's DataLoader of large images, never ends a certificate or a discovery)."""
        if self.max_batch is not None and len(images) > self.max_batch:
            parts = [self(chunk) for chunk in images.split(self.max_batch)]
            return torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts])
        try:
            return self._pass(images)
        except torch.cuda.OutOfMemoryError:
            if len(images) <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the failed pass's blocks, before the halves run
            self.max_batch = (len(images) + 1) // 2
            return self(images)

    @torch.inference_mode()
    def _pass(self, images: torch.Tensor):
        x = _to_device(images, self.device)
        if self.anchors is not None:
            feats, logits = self._one_pass(x)
            if not self.checked:
                self.checked = True
                why = self._mismatch(x, feats, logits)
                if why and not self.copy:
                    # The model may change a caught output in place later on (``out += x``):
                    # catch copies instead.
                    self.copy = True
                    feats, logits = self._one_pass(x)
                    why = self._mismatch(x, feats, logits)
                if why:
                    self._fallback(why)
            if self.anchors is not None:
                return feats.float().contiguous(), logits.float()
        feats = self.backbone(x).float().contiguous()
        logits = self.model(x)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"the model returned a {type(logits).__name__}, not a tensor of logits")
        return feats, logits.float()

    def _mismatch(self, x, feats, logits) -> Optional[str]:
        """First batch: is the caught map the backbone's, and the output (images, classes)?
        Returns why not, or None."""
        if feats is None:
            return "the layer's output was not caught"
        reference = self.backbone(x).float()
        if feats.shape != reference.shape:
            return f"caught {tuple(feats.shape)}, the backbone gives {tuple(reference.shape)}"
        scale = float(reference.abs().max()) or 1.0
        if float((feats.float() - reference).abs().max()) > TAP_TOLERANCE * scale:
            return "the caught map differs from the backbone's"
        recomputed = self.split.logits_from_features(reference)
        if logits.shape != recomputed.shape:
            return f"the model's output {tuple(logits.shape)} is not (images, classes)"
        # Recorded, not acted on: the certificate measures the same gap through the prototypes.
        self.head_gap = float((recomputed - logits.float()).abs().max()) / max(float(logits.abs().max()), 1e-30)
        return None
