"""The certificate: evidence that the decomposed network is the original classifier, and how
good that classifier is on the images at hand.

Over a set of images it reports max |logit_phpn − logit_model| (against max |logit|), how
many images the two networks agree on (same top class), and per class the relative head
error ‖Σ p̃ − v‖ / ‖v‖. When the images carry labels (class folders matched to the model's
classes) it also records the *original model's* accuracy on them: agreement says the
decomposition is exact, accuracy says whether the model itself works on these inputs. An
exact decomposition of a model fed the wrong input size is still "certified", so a model
near chance gets a warning (:func:`chance_warning`) that the CLI and the app show before any
explanation.

:func:`format_certificate` is the one text form of a certificate, used by the CLI, the app
and the reports.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from phpn.errors import Cancelled
from phpn.progress import ProgressFn, report

# Targets from the engine's specification.
MAX_RELATIVE_LOGIT_DIFF = 1e-4
MAX_HEAD_ERROR = 1e-6
# A model is "near chance" when its accuracy is at most this many times the chance level
# (or at most halfway from chance to perfect, for 2 or 3 classes) ...
CHANCE_FACTOR = 2.0
# ... or when a one-sided binomial test cannot tell it from guessing at this level.
CHANCE_P_VALUE = 0.01
LIKELY_CAUSES = ("the input size (resize / crop)", "the mean / std normalisation",
                 "the channels (grey-scale or RGB)", "the class order (which folder is which class)")

class InputWarning(UserWarning):
    """The model may not read the images as given. ``kind``: "chance" (accuracy near guessing,
    :func:`chance_warning`'s text, the one every door shows), "class order" (labels read
    consistently as other classes) or "normalisation" (tensors that the model reads better
    normalised); ``str(warning)`` is the message, with what to do."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message

    def __repr__(self) -> str:
        return f"InputWarning({self.kind!r}, {self.message!r})"


CancelCheck = Optional[Union[Callable[[], bool], "object"]]  # a callable or anything with is_set()


@dataclass
class Certificate:
    images: int
    top1_agreement: float  # fraction in [0, 1] of images where both networks pick the same class
    max_logit_diff: float
    max_abs_logit: float
    max_head_error: float
    mean_head_error: float
    agreed: Optional[int] = None  # images where both networks pick the same class
    labelled_images: int = 0  # images whose true class is known (matched class folders)
    correct: int = 0  # of those, how many the original model gets right
    labelled_classes: int = 0  # distinct true classes among the labelled images
    seconds: Optional[float] = None  # wall-clock time of the certificate
    # {(label, predicted class): images}, for reading the class order; kept in memory, not recorded
    confusion: Optional[dict] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.agreed is None:
            self.agreed = round(self.top1_agreement * self.images)

    @property
    def relative_logit_diff(self) -> float:
        return self.max_logit_diff / max(self.max_abs_logit, 1e-30)

    @property
    def accuracy(self) -> Optional[float]:
        """The original model's top-1 accuracy on the labelled images (None without labels)."""
        return self.correct / self.labelled_images if self.labelled_images else None

    @property
    def passed(self) -> bool:
        return (self.images > 0 and self.top1_agreement == 1.0 and self.relative_logit_diff <= MAX_RELATIVE_LOGIT_DIFF
                and self.max_head_error <= MAX_HEAD_ERROR)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("confusion")
        d["relative_logit_diff"] = self.relative_logit_diff
        d["passed"] = self.passed
        d["accuracy"] = self.accuracy
        d["near_chance"] = near_chance(self.correct, self.labelled_images, self.labelled_classes)
        return d

    def summary(self) -> str:
        return format_certificate(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Certificate":
        """A certificate recorded in a run (older runs lack the accuracy fields: no labels)."""
        fields = ("images", "top1_agreement", "max_logit_diff", "max_abs_logit", "max_head_error", "mean_head_error",
                  "agreed", "labelled_images", "correct", "labelled_classes", "seconds")
        return cls(**{k: d[k] for k in fields if k in d})


class CertificateAccumulator:
    """Builds a certificate batch by batch from the two networks' logits (and labels).

    Used by :func:`certify`; a caller that already has both logits (for instance from the
    discovery's own forward pass) can feed them here directly.
    """

    def __init__(self):
        self.images = self.agreed = self.labelled = self.correct = 0
        self.max_diff = self.max_logit = 0.0
        self.classes: set = set()
        self.confusion: dict = {}
        self.started = time.perf_counter()

    def add(self, reference: torch.Tensor, ours: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        reference, ours = reference.float(), ours.float()
        predicted = reference.argmax(1)
        self.images += reference.shape[0]
        self.agreed += int((predicted == ours.argmax(1)).sum())
        if reference.numel():
            self.max_diff = max(self.max_diff, float((reference - ours).abs().max()))
            self.max_logit = max(self.max_logit, float(reference.abs().max()))
        if labels is not None:
            labels = torch.as_tensor(labels, device=predicted.device).long()
            known = labels >= 0  # -1: an image without a known class
            self.labelled += int(known.sum())
            self.correct += int((predicted[known] == labels[known]).sum())
            self.classes.update(labels[known].tolist())
            pairs, counts = torch.unique(torch.stack([labels[known], predicted[known]], 1), dim=0,
                                         return_counts=True)
            for (t, p), n in zip(pairs.tolist(), counts.tolist()):
                self.confusion[(t, p)] = self.confusion.get((t, p), 0) + n

    def certificate(self, head_error: torch.Tensor) -> Certificate:
        head_error = head_error.double()
        n = self.images
        return Certificate(images=n, top1_agreement=self.agreed / n if n else 0.0, max_logit_diff=self.max_diff,
                           max_abs_logit=self.max_logit,
                           max_head_error=float(head_error.max()) if head_error.numel() else 0.0,
                           mean_head_error=float(head_error.mean()) if head_error.numel() else 0.0,
                           agreed=self.agreed, labelled_images=self.labelled, correct=self.correct,
                           labelled_classes=len(self.classes),
                           seconds=round(time.perf_counter() - self.started, 3), confusion=dict(self.confusion))


def check_cancel(cancel: CancelCheck) -> None:
    """Raise :class:`Cancelled` when ``cancel`` (a callable or an Event) says so."""
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise Cancelled()


@contextmanager
def checks_inside(modules: Iterable[torch.nn.Module], tick: Callable[[], None], every_s: float = 0.05):
    """Call ``tick`` (which may raise :class:`Cancelled`) between the layers of a forward pass,
    at most every ``every_s`` seconds, so a cancel does not wait for a whole batch.

    Only forwards run by the calling thread tick: a model shared with other threads (the app
    serves many visitors from one copy) is not stopped by this caller's cancel.
    """
    owner, last = threading.get_ident(), [time.perf_counter()]

    def hook(_module, _inputs):
        if threading.get_ident() != owner:
            return
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            tick()

    seen, handles = set(), []
    for module in modules:
        for m in module.modules():
            if id(m) not in seen:
                seen.add(id(m))
                handles.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def certify(network, model: torch.nn.Module, batches: Iterable, head_error: torch.Tensor,
            device: Optional[torch.device] = None, *, progress: Optional[ProgressFn] = None,
            total: Optional[int] = None, cancel: CancelCheck = None,
            forward: Optional[Callable[[torch.Tensor], tuple]] = None) -> Certificate:
    """Compare ``network`` (a PrototypeNetwork) with ``model`` on every batch of images.

    A batch is an image tensor, or ``(images, labels)`` with each image's true class index
    (-1 when unknown); with labels the certificate records the model's accuracy too.
    ``forward(images) -> (features, model's logits)``, when given, is one pass of the model that
    also catches the features at the cut (phpn.pipeline.features.FeatureTap): the decomposed
    network then reads those features, so each batch costs one forward instead of two.
    ``progress("certify", images done, total)`` is called after every batch (``total``
    defaults to the images seen so far) and, like ``cancel``, between the layers of each
    forward pass (at most every 50 ms): a cancel stops the certificate within one layer.
    """
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    network.eval().to(device)
    acc = CertificateAccumulator()

    def tick():  # a progress callback may raise Cancelled too (the app's job does)
        check_cancel(cancel)
        report(progress, "certify", acc.images, max(total or 0, acc.images))

    try:
        with checks_inside((model, network), tick):
            for batch in batches:
                images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
                tick()
                images = images.to(device)
                if forward is not None:
                    features, reference = forward(images)
                    # The logits depend on the pooled features only: pooled here, in the features'
                    # precision, the float64 head reads (B, D) and not the whole map (as discovery does).
                    pooled = features.mean(dim=(2, 3))[:, :, None, None]
                    ours = network.explain_features(pooled, classes=[], with_maps=False).logits
                else:
                    reference = model(images)
                    tick()
                    ours = network(images, with_maps=False).logits
                acc.add(reference, ours, labels)
        end = max(total or 0, acc.images)  # skipped files count as done
        report(progress, "certify", end, end)
    finally:
        model.train(was_training)
    return acc.certificate(head_error)


# --- reading a certificate ----------------------------------------------------------------------

def binomial_p_value(correct: int, n: int, p0: float) -> float:
    """P(X ≥ correct) for X ~ Binomial(n, p0): how likely guessing does at least this well."""
    if correct <= 0:
        return 1.0
    if p0 <= 0:
        return 0.0
    if p0 >= 1:
        return 1.0
    log_p, log_q = math.log(p0), math.log1p(-p0)
    terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
             for k in range(correct, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def chance_threshold(classes: int) -> float:
    """Accuracy at or below which a model over ``classes`` classes counts as near chance."""
    chance = 1.0 / classes
    return min(CHANCE_FACTOR * chance, (1.0 + chance) / 2)


def near_chance(correct: int, labelled: int, classes: int, p_value: float = CHANCE_P_VALUE) -> bool:
    """True when the accuracy on the labelled images is not clearly better than guessing."""
    if not labelled or classes < 2:
        return False
    return (correct / labelled <= chance_threshold(classes)
            or binomial_p_value(correct, labelled, 1.0 / classes) > p_value)


def chance_warning(cert: Optional[Union[dict, Certificate]]) -> Optional[str]:
    """A warning when the original model is near chance on the labelled images, else None.

    An exact decomposition of a model that cannot read its inputs explains nothing: the
    warning names the usual causes and the check that finds the right setting.
    """
    if cert is None:
        return None
    d = cert.to_dict() if isinstance(cert, Certificate) else cert
    n, correct, classes = int(d.get("labelled_images") or 0), int(d.get("correct") or 0), int(d.get("labelled_classes") or 0)
    if not near_chance(correct, n, classes):
        return None
    return (f"The model is right on only {correct} of {n} labelled images ({100 * correct / n:.1f}%), which is "
            f"not clearly better than guessing among {classes} classes ({100 / classes:.1f}%). Its explanations "
            f"describe a model that cannot read these inputs. Likely causes: {', '.join(LIKELY_CAUSES)}. "
            "Run “Check preprocessing” (CLI: phpn check-preprocessing) to try the usual settings.")


def format_certificate(cert: Optional[Union[dict, Certificate]], short: bool = False) -> str:
    """The one text form of a certificate (CLI, app, reports); ``short`` for a status line.

    It says "agrees with the model", never a bare "top-1": agreement is exactness, not
    accuracy. The model's accuracy is given beside it when the images had labels.
    """
    if not cert:
        return "no certificate" if short else "not computed"
    d = cert.to_dict() if isinstance(cert, Certificate) else cert
    images = int(d.get("images", 0))
    agreed = d.get("agreed")
    agreed = int(agreed) if agreed is not None else round(float(d.get("top1_agreement", 0.0)) * images)
    verdict = "PASSED" if d.get("passed") else "FAILED"
    labelled = int(d.get("labelled_images") or 0)
    correct = int(d.get("correct") or 0)
    if short:
        text = f"{verdict} · agrees with the model on {agreed}/{images} images"
        if labelled:
            text += f" · model accuracy {100 * correct / labelled:.1f}%"
        return text
    text = (f"{verdict}: agrees with the model on {agreed} of {images} images, max |Δlogit| "
            f"{float(d.get('max_logit_diff', 0.0)):.3g} ({float(d.get('relative_logit_diff', 0.0)):.2g} of max |logit|), "
            f"head error ≤ {float(d.get('max_head_error', 0.0)):.2g}")
    if labelled:
        text += (f"; the model's accuracy on the {labelled} labelled images: {100 * correct / labelled:.1f}% "
                 f"({correct} right)")
    else:
        text += "; model accuracy unknown (no labelled images)"
    if d.get("seconds") is not None:
        seconds = float(d["seconds"])  # real time, never rounded to "0.0 s"
        text += f"; checked in {seconds:.2g} s" if seconds < 10 else f"; checked in {seconds:.0f} s"
    return text
