"""The high-level steps the CLI and the app share.

open a model (checkpoint or demo) -> diagnose it -> open an image folder -> discover ->
certify -> explain images. Each step raises :class:`phpn.errors.PhpnError` subclasses with
messages meant for the user.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .certify import Certificate, certify
from .data import ImageFolderData, Preprocess, load_batch, load_image, scan_image_folder
from .device import resolve_device
from .discover import DiscoveryConfig, discover
from .errors import NotDecomposableError
from .models.head import HeadSplit, LoadedModel
from .network import PrototypeNetwork
from .progress import ProgressFn, report
from .runs import Run, load_run


@dataclass
class ModelSession:
    """A model ready for decomposition: what was loaded, the doctor's verdict, the split."""

    loaded: LoadedModel
    diagnosis: object  # phpn.models.Diagnosis
    preprocess: Preprocess
    demo: Optional[str] = None

    @property
    def split(self) -> HeadSplit:
        if self.diagnosis.split is None:
            raise NotDecomposableError(f"This model cannot be decomposed exactly: {self.diagnosis.reason}",
                                       "Use a model whose head is global average pooling followed by a linear layer.")
        return self.diagnosis.split

    @property
    def class_names(self) -> list:
        names = self.loaded.class_names
        return list(names) if names else [str(i) for i in range(self.loaded.num_classes)]


def open_model(checkpoint=None, *, demo: Optional[str] = None, arch: Optional[str] = None,
               model_def: Optional[str] = None, trust_pickle: bool = False, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None, preprocess: Optional[Preprocess] = None,
               feature_layer: Optional[str] = None, head_layer: Optional[str] = None) -> ModelSession:
    """Load a checkpoint (or a built-in demo's model) and run the checkpoint doctor on it."""
    from .models import diagnose, load_model

    if demo is not None:
        from .demos import get_demo

        loaded = get_demo(demo).load_model()
    else:
        loaded = load_model(checkpoint, arch=arch, model_def=model_def, trust_pickle=trust_pickle,
                            num_classes=num_classes)
    if class_names is not None:
        loaded = replace(loaded, class_names=list(class_names))
    pre = preprocess or loaded.preprocess
    diagnosis = diagnose(loaded, input_size=(pre.channels, pre.crop, pre.crop), feature_layer=feature_layer,
                         head_layer=head_layer)
    return ModelSession(loaded=loaded, diagnosis=diagnosis, preprocess=pre, demo=demo)


def read_class_names(path) -> list:
    """One class name per line (blank lines ignored), or a JSON list."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        import json

        return [str(x) for x in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def open_data(session: ModelSession, root, images_per_class: Optional[int] = None, seed: int = 0) -> ImageFolderData:
    return scan_image_folder(root, class_names=session.loaded.class_names, num_classes=session.loaded.num_classes,
                             images_per_class=images_per_class, seed=seed)


def run_discovery(session: ModelSession, data: ImageFolderData, config: DiscoveryConfig,
                  progress: Optional[ProgressFn] = None, certify_images: bool = True,
                  data_label: Optional[str] = None) -> Run:
    """Discover, then certify on the discovery images and record the certificate in the run."""
    run = discover(session.loaded, session.split, data, session.preprocess, config, progress, data_label=data_label)
    if certify_images:
        cert = certify_run(session, run, data, config.batch_size, config.device, progress)
        run.meta["certificate"] = cert.to_dict()
    run.meta["demo"] = session.demo
    run.meta["model"]["diagnosis"] = session.diagnosis.to_dict()
    return run


def open_run(session: ModelSession, path) -> tuple:
    """Load a saved run for this model: returns (run, network). Refuses another checkpoint's run."""
    run = load_run(path, expected_sha256=session.loaded.sha256)
    return run, run.network(session.split)


def certify_run(session: ModelSession, run: Run, data: ImageFolderData, batch_size: int = 64, device: str = "auto",
                progress: Optional[ProgressFn] = None, cancel=None) -> Certificate:
    """Certify ``run`` on ``data``'s images; each image's class folder is its label, so the
    certificate records the model's accuracy beside the agreement."""
    device = resolve_device(device)
    network = run.network(session.split)
    paths = [(c.class_index, p) for c in data.classes for p in c.paths]
    # Small batches on the CPU: a cancel is seen between forward passes, within about a second.
    step = batch_size if device.type == "cuda" else min(batch_size, 16)
    report(progress, "certify", 0, len(paths))

    def batches():
        for start in range(0, len(paths), step):
            chunk = dict((p, c) for c, p in paths[start:start + step])
            batch, kept, _ = load_batch(data.root, list(chunk), session.preprocess)
            if kept:
                yield batch, torch.tensor([chunk[p] for p in kept])

    return certify(network, session.loaded.model, batches(), run.head_error(), device, progress=progress,
                   total=len(paths), cancel=cancel)


@dataclass
class ImageExplanation:
    """Everything shown for one image and one class."""

    image: Image.Image  # the resized, cropped picture the model saw
    class_index: int
    class_name: str
    logit: float
    bias: float
    contributions: np.ndarray  # (k,)
    maps: np.ndarray  # (k, H, W) on the feature grid
    top: list  # [(class index, name, logit, probability)], best first
    decomposed: bool = True

    @property
    def class_map(self) -> np.ndarray:
        """The class activation map: the sum of the prototype maps."""
        return self.maps.sum(0)

    def to_dict(self) -> dict:
        return {
            "class": self.class_index, "class_name": self.class_name, "logit": self.logit, "bias": self.bias,
            "contributions": [float(c) for c in self.contributions],
            "contributions_plus_bias": float(self.contributions.sum() + self.bias),
            "top": [{"class": c, "name": n, "logit": lg, "probability": p} for c, n, lg, p in self.top],
        }


def explain_image(session: ModelSession, network: PrototypeNetwork, image, class_index: Optional[int] = None,
                  top: int = 5, class_names: Optional[Sequence[str]] = None) -> ImageExplanation:
    """Explain one image (path, file object or PIL image) for ``class_index`` (default: the
    best-scoring class that has prototypes)."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    names = list(class_names or session.class_names)
    seen = session.preprocess.geometry(image)
    x = session.preprocess.normalise(seen)[None]
    with torch.inference_mode():
        feats = network.backbone(x.to(network.backbone_device)).float()
        base = network.explain_features(feats, classes=[], with_maps=False)
        logits = base.logits[0]
        if class_index is None:
            ranked = torch.argsort(logits, descending=True).tolist()
            decomposed = set(network.class_indices.tolist())
            class_index = next(c for c in ranked if c in decomposed)
        out = network.explain_features(feats, classes=[class_index])
    probs = torch.softmax(logits.double(), 0)
    best = torch.argsort(logits, descending=True)[:top].tolist()
    return ImageExplanation(
        image=seen, class_index=int(class_index), class_name=names[class_index], logit=float(logits[class_index]),
        bias=float(out.bias[class_index]), contributions=out.contributions[0, 0].cpu().numpy().astype(np.float64),
        maps=out.maps[0, 0].cpu().numpy(), top=[(c, names[c], float(logits[c]), float(probs[c])) for c in best],
    )
