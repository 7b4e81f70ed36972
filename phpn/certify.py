"""The certificate: evidence that the decomposed network is the original classifier.

Over a set of images it reports max |logit_phpn − logit_model| (against max |logit|), the
top-1 agreement, and per class the relative head error ‖Σ p̃ − v‖ / ‖v‖.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch

# Targets from the engine's specification.
MAX_RELATIVE_LOGIT_DIFF = 1e-4
MAX_HEAD_ERROR = 1e-6


@dataclass
class Certificate:
    images: int
    top1_agreement: float  # fraction in [0, 1]
    max_logit_diff: float
    max_abs_logit: float
    max_head_error: float
    mean_head_error: float

    @property
    def relative_logit_diff(self) -> float:
        return self.max_logit_diff / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return (self.images > 0 and self.top1_agreement == 1.0 and self.relative_logit_diff <= MAX_RELATIVE_LOGIT_DIFF
                and self.max_head_error <= MAX_HEAD_ERROR)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["relative_logit_diff"] = self.relative_logit_diff
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        return (f"{'PASSED' if self.passed else 'FAILED'}: top-1 agreement {100 * self.top1_agreement:.2f}% on "
                f"{self.images} images, max |Δlogit| {self.max_logit_diff:.3g} "
                f"({self.relative_logit_diff:.2g} of max |logit|), head error ≤ {self.max_head_error:.2g}")


@torch.inference_mode()
def certify(network, model: torch.nn.Module, batches: Iterable[torch.Tensor], head_error: torch.Tensor,
            device: Optional[torch.device] = None) -> Certificate:
    """Compare ``network`` (a PrototypeNetwork) with ``model`` on every batch of images."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    network.eval().to(device)
    n = agree = 0
    max_diff = max_logit = 0.0
    try:
        for images in batches:
            images = images.to(device)
            reference = model(images).float()
            ours = network(images, with_maps=False).logits.float()
            n += images.shape[0]
            agree += int((reference.argmax(1) == ours.argmax(1)).sum())
            max_diff = max(max_diff, float((reference - ours).abs().max()))
            max_logit = max(max_logit, float(reference.abs().max()))
    finally:
        model.train(was_training)
    head_error = head_error.double()
    return Certificate(images=n, top1_agreement=agree / n if n else 0.0, max_logit_diff=max_diff,
                       max_abs_logit=max_logit, max_head_error=float(head_error.max()) if head_error.numel() else 0.0,
                       mean_head_error=float(head_error.mean()) if head_error.numel() else 0.0)
