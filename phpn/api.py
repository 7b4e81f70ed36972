"""The high-level steps the CLI, the app and Python callers share: phpn's front door.

open a model (checkpoint, demo or a live ``nn.Module``) -> diagnose it -> open images (a
folder, a Dataset or a DataLoader) -> discover -> certify -> explain images. Each step raises
:class:`phpn.errors.PhpnError` subclasses with messages meant for the user.

For Python callers the short form is :func:`decompose` (model + data -> :class:`Run`), then
``run.certify(data)``, ``run.explain(image)``, ``run.save(path)`` and :func:`load_run`.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import time
import warnings
from dataclasses import dataclass, replace
from difflib import get_close_matches
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from phpn.atomic import TEMP_SUFFIX, check_may_write, write_atomic
from phpn.config import (
    BATCH_SIZE,
    COLOURS,
    CONTRIBUTIONS,
    DECODE,
    DEVICE,
    DISCOVERY,
    EXPLAIN_FORMATS,
    INTERPOLATIONS,
    NMF_DATA_CHOICES,
    NMF_SOLVERS,
    OBJECTIVES,
    SCALINGS,
    SEED,
    SOLVERS,
    TOP_CLASSES,
    class_name,
    class_names_or_indices,
)
from phpn.demos import DEMOS as DEMOS
from phpn.demos import get_demo
from phpn.device import resolve_device
from phpn.errors import ConfigError, DataError, NotDecomposableError, PhpnError
from phpn.head import HeadSplit, LoadedModel
from phpn.images.batches import load_batch
from phpn.images.folders import IMAGE_SUFFIXES, ImageFolderData, scan_image_folder
from phpn.images.folders import describe_class_mapping as describe_class_mapping
from phpn.images.inputs import (
    InMemoryImages,
    TensorInput,
    TransformInput,
    as_preprocess,
    explain_input,
    explain_inputs,
    first_image,
    from_dataset,
    from_loader,
    holds_pictures,
    is_deterministic,
    loader_batch,
    merge_preprocess,
    module_sha256,
    peek_input_size,
)
from phpn.images.preprocess import Preprocess, load_image
from phpn.method.certify import Certificate, InputWarning, certify, chance_warning, format_certificate
from phpn.method.network import PrototypeNetwork
from phpn.models import diagnose, load_model
from phpn.models.hf import LogitsOnly, class_names, logits_only
from phpn.models.zoo import known_archs as known_archs
from phpn.pipeline.audit import IMAGES_PER_CLASS as AUDIT_IMAGES_PER_CLASS
from phpn.pipeline.audit import NO_SINGLE_REASON as NO_SINGLE_REASON
from phpn.pipeline.audit import REASON_EXCESS as REASON_EXCESS
from phpn.pipeline.audit import SIGNALS as SIGNALS
from phpn.pipeline.audit import Audit, audit_run
from phpn.pipeline.compare import BASELINE as BASELINE
from phpn.pipeline.compare import IMAGES_PER_CLASS as COMPARE_IMAGES_PER_CLASS
from phpn.pipeline.compare import MATCH_THRESHOLD, Comparison, check_comparable, compare_runs
from phpn.pipeline.compare import PATCH_OVERLAP as PATCH_OVERLAP
from phpn.pipeline.compare import SIMILARITY as SIMILARITY
from phpn.pipeline.discover import DiscoveryConfig, discover, resolve_k
from phpn.pipeline.features import FeatureTap
from phpn.pipeline.mistakes import LOADED_IMAGES as LOADED_IMAGES
from phpn.pipeline.mistakes import SERVER_FOLDER as SERVER_FOLDER
from phpn.pipeline.mistakes import UPLOADED_FOLDER as UPLOADED_FOLDER
from phpn.pipeline.mistakes import confusion_pick as confusion_pick
from phpn.pipeline.mistakes import contrast_image as contrast_image
from phpn.pipeline.mistakes import folder_labels as folder_labels
from phpn.pipeline.mistakes import labelled_sets as labelled_sets
from phpn.pipeline.mistakes import majorities
from phpn.pipeline.mistakes import predict_folder as predict_folder
from phpn.pipeline.preprocess_check import MIN_GAIN, NORMALISATIONS
from phpn.progress import ProgressFn, TqdmProgress, report
from phpn.runs.annotations import DISMISSED as DISMISSED
from phpn.runs.annotations import EDITED_MODEL as EDITED_MODEL
from phpn.runs.annotations import NOT_JUDGED as NOT_JUDGED
from phpn.runs.annotations import SUGGESTED_FLAGS as SUGGESTED_FLAGS
from phpn.runs.annotations import VERDICTS as VERDICTS
from phpn.runs.annotations import conflict_text as conflict_text
from phpn.runs.annotations import label_heading as label_heading
from phpn.runs.annotations import prototype_label as prototype_label
from phpn.runs.annotations import prototype_labels as prototype_labels
from phpn.runs.annotations import run_seal_sha256 as run_seal_sha256
from phpn.runs.annotations import run_tensors_sha256 as run_tensors_sha256
from phpn.runs.annotations import switch_off as switch_off
from phpn.runs.annotations import verdict_words as verdict_words
from phpn.runs.audit_record import SavedAudit, read_audit, save_audit, why_not_saved
from phpn.runs.provenance import describe_origin as describe_origin
from phpn.runs.provenance import load_from_record
from phpn.runs.provenance import model_origin as model_origin
from phpn.runs.provenance import origin_words as origin_words
from phpn.runs.store import (  # this module's load_run is the public wrapper
    Run,
    check_checkpoint,
    check_model,
    check_split,
    save_run,
)
from phpn.runs.store import load_run as read_run
from phpn.runs.transfer import MAX_RUN_ZIP_BYTES, import_run_zip
from phpn.show.explanation import Explanation
from phpn.show.pictures import picture_of_tensor, seen_picture
from phpn.validation import check_at_least, check_class_names


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
        return class_names_or_indices(self.loaded.class_names, self.loaded.num_classes)


def open_model(checkpoint=None, *, demo: Optional[str] = None, arch: Optional[str] = None,
               model_def: Optional[str] = None, trust_pickle: bool = False, num_classes: Optional[int] = None,
               class_names: Optional[Sequence[str]] = None, preprocess=None, overrides: Optional[dict] = None,
               feature_layer: Optional[str] = None, head_layer: Optional[str] = None,
               input_size: Optional[Sequence[int]] = None) -> ModelSession:
    """Open a model and run the checkpoint doctor on it (one load, one trace).

    ``checkpoint`` is a checkpoint file (or a Hugging Face folder), a live ``torch.nn.Module``,
    or None with ``demo=`` a built-in demo. ``preprocess`` (a :class:`phpn.Preprocess` or a dict
    of its fields) replaces the model's default preprocessing; ``overrides`` changes some of its
    fields (see :func:`merge_preprocess`). Both apply *before* the doctor runs, so the diagnosis is
    made at the input size that will be used. For a live module without a preprocessing spec,
    ``input_size`` (channels, height, width) says what the doctor tries (default 3x224x224;
    :func:`decompose` re-checks at the data's own size).
    """
    if demo is not None and (checkpoint is not None or arch or model_def):
        raise ConfigError("A demo brings its own model, so it cannot be combined with a checkpoint, --arch or "
                          "--model-def.", "Pass either --demo NAME or --checkpoint PATH, not both.")
    if isinstance(checkpoint, ModelSession):  # the same model at another preprocessing
        if preprocess is None and not overrides and class_names is None:
            return checkpoint
        loaded, demo = checkpoint.loaded, checkpoint.demo
        preprocess = preprocess if preprocess is not None else checkpoint.preprocess
    elif isinstance(checkpoint, torch.nn.Module):
        loaded = _loaded_from_module(checkpoint, preprocess=as_preprocess(preprocess), input_size=input_size)
        preprocess = None
    elif demo is not None:
        loaded = get_demo(demo).load_model()
        if num_classes is not None and int(num_classes) != loaded.num_classes:
            raise ConfigError(f"You asked for {num_classes} classes but the demo {demo} has {loaded.num_classes}.",
                              f"Drop --num-classes or set it to {loaded.num_classes}.")
    else:
        loaded = load_model(checkpoint, arch=arch, model_def=model_def, trust_pickle=trust_pickle,
                            num_classes=num_classes)
    if class_names is not None:
        loaded = replace(loaded, class_names=check_class_names(list(class_names), loaded.num_classes))
    pre = as_preprocess(preprocess) or loaded.preprocess
    if overrides:
        pre = merge_preprocess(pre, overrides)
    diagnosis = diagnose(loaded, input_size=_input_size(pre), feature_layer=feature_layer, head_layer=head_layer)
    return ModelSession(loaded=loaded, diagnosis=diagnosis, preprocess=pre, demo=demo)


def _input_size(pre) -> tuple:
    if isinstance(pre, TensorInput):
        return pre.input_size
    return (pre.channels, pre.crop, pre.crop)


def _loaded_from_module(model: torch.nn.Module, *, preprocess=None, input_size=None) -> LoadedModel:
    """A live model as phpn's LoadedModel: eval mode, on the CPU (phpn moves it where the work runs)."""
    model = logits_only(model).cpu().eval()  # a transformers model answers with an output object
    if preprocess is None:
        c, h, w = (int(v) for v in (input_size or (3, 224, 224)))
        preprocess = TensorInput(c, h, w)
    try:
        with torch.no_grad():
            out = model(torch.zeros((1,) + _input_size(preprocess)))
    except Exception as exc:  # the model's own error, for an input size it does not take
        raise ConfigError(f"The model cannot run on one image of size {_input_size(preprocess)} "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).",
                          "Pass input_size=(channels, height, width) or preprocess= for the images it takes.") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(f"The model returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))} for one "
                          f"image of size {_input_size(preprocess)}, not a (1, classes) tensor of logits.",
                          "Pass a classifier whose forward returns logits, and the input size it expects.")
    inner = model.model if isinstance(model, LogitsOnly) else model
    config = getattr(inner, "config", None)
    names = class_names(config, int(out.shape[1])) if config is not None else None
    return LoadedModel(model=model, arch=f"module:{type(inner).__name__}", num_classes=int(out.shape[1]),
                       sha256=module_sha256(model), preprocess=preprocess, source="a live torch.nn.Module",
                       class_names=names, notes=["given as a live nn.Module"])


MAX_CLASS_NAMES_BYTES = 16 * 2 ** 20


def read_class_names(path, num_classes: Optional[int] = None) -> list:
    """One class name per line (blank lines ignored), or a JSON list of texts; UTF-8 text only.

    With ``num_classes`` the count must match. Every problem is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The class-names file {path} does not exist or is not a file.", "Check the path.")
    if path.stat().st_size > MAX_CLASS_NAMES_BYTES:
        raise ConfigError(f"The class-names file {path.name} is larger than {MAX_CLASS_NAMES_BYTES >> 20} MB.",
                          "Give a text file with one class name per line.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"The class-names file {path.name} is not UTF-8 text (byte {exc.start} cannot be "
                          "decoded); it may be a binary file.", "Give a UTF-8 text file with one class name per line.") \
            from None
    if "\x00" in text:
        raise ConfigError(f"The class-names file {path.name} contains NUL bytes: it is a binary file, not text.",
                          "Give a UTF-8 text file with one class name per line.")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"The class-names file {path.name} starts like a JSON list but is not valid JSON "
                              f"({exc}).", "Fix the JSON, or write one class name per line.") from None
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise ConfigError(f"The JSON in {path.name} is not a list of names.", "Write a list of texts.")
        names = [str(n) for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"The class-names file {path.name} holds no names.", "Write one class name per line.")
    return check_class_names(names, num_classes)


def open_data(session: ModelSession, root, images_per_class: Optional[int] = None, seed: int = 0) -> ImageFolderData:
    """Scan a class-folder dataset for this model. When the model has no class names and the
    folders name its classes (data.class_mapping says so), the session takes those names."""
    data = scan_image_folder(root, class_names=session.loaded.class_names, num_classes=session.loaded.num_classes,
                             images_per_class=images_per_class, seed=seed)
    if data.class_names is not None:
        session.loaded = replace(session.loaded, class_names=list(data.class_names))
    return data


def run_discovery(session: ModelSession, data: ImageFolderData, config: DiscoveryConfig,
                  progress: Optional[ProgressFn] = None, certify_images: bool = True,
                  data_label: Optional[str] = None, **options) -> Run:
    """Discover and certify on the discovery images from the same forward passes; the certificate
    is recorded in the run. ``options`` go to :func:`phpn.pipeline.discover.discover` (held_out,
    progress_dir, resume, workers, decode, shard); under a shard, ranks other than 0 return None."""
    run = discover(session.loaded, session.split, data, session.preprocess, config, progress, data_label=data_label,
                   certify=certify_images, **options)
    if run is None:
        return None
    run.note_model(demo=session.demo, diagnosis=session.diagnosis.to_dict())
    return run


def _check_run_for(session: ModelSession, run: Run) -> Run:
    """The run checked against this model (checkpoint, architecture, cut, head rows). Its
    per-class shards are read and checked when first needed, so a large run opens at once."""
    check_checkpoint(run, session.loaded.sha256)
    check_model(run, session.loaded, session.split)
    return run


def certify_run(session: ModelSession, run: Run, data, batch_size: int = BATCH_SIZE,
                device: str = DEVICE,
                progress: Optional[ProgressFn] = None, cancel=None) -> Certificate:
    """Certify ``run`` on ``data``'s images: an ImageFolderData (each image's class folder is its
    label, so the certificate records the model's accuracy beside the agreement) or a DataLoader
    of ``(images, labels)``, read batch by batch in its own order and batch size.

    Each batch costs one forward pass of the model: the features at the cut are caught on their
    way through it (as discovery does) and the decomposed network reads them."""
    device = resolve_device(device)
    check_at_least("batch size", batch_size)
    network = run.network(session.split)
    # The tap checks its catch on its first batch (one more backbone pass): kept for the next certify.
    taps = run.__dict__.setdefault("_taps", {})
    key = (id(session.loaded.model), id(session.split), str(device))
    tap = taps.get(key)
    if tap is None:
        tap = taps[key] = FeatureTap(session.split, session.loaded.model, device)
    if isinstance(data, torch.utils.data.DataLoader):
        total = len(data.dataset) if hasattr(data.dataset, "__len__") else None
        batches = _loader_batches(data, session.loaded.num_classes)
    else:
        paths = [(c.class_index, p) for c in data.classes for p in c.paths]
        total = len(paths)

        # Small batches on the CPU: a cancel is seen between forward passes, within about a second
        # (a DataLoader's batches are the user's own).
        step = batch_size if device.type == "cuda" else min(batch_size, 16)

        def batches():
            for start in range(0, len(paths), step):
                chunk = dict((p, c) for c, p in paths[start:start + step])
                batch, kept, _ = load_batch(data.root, list(chunk), session.preprocess)
                if kept:
                    yield batch, torch.tensor([chunk[p] for p in kept])

        batches = batches()
    report(progress, "certify", 0, total or 0)
    return certify(network, session.loaded.model, batches, run.head_error(), device, progress=progress,
                   total=total, cancel=cancel, forward=tap)


def _loader_batches(loader, num_classes: int):
    """A DataLoader's ``(images, labels)`` batches, checked as :func:`phpn.images.inputs.from_loader` checks them."""
    for b, batch in enumerate(loader):
        images, labels = loader_batch(batch, b, num_classes)
        yield images, labels


def _model_input_size(session) -> Optional[tuple]:
    """(C, H, W) the model is diagnosed at, or None when unknown."""
    size = getattr(getattr(session, "diagnosis", None), "input_size", None)
    return tuple(int(v) for v in size) if size is not None and len(size) == 3 else None


def explain_image(session: ModelSession, network: PrototypeNetwork, image, class_index: Optional[int] = None,
                  top: int = TOP_CLASSES, class_names: Optional[Sequence[str]] = None) -> Explanation:
    """Explain one image for ``class_index`` (default: the best-scoring class that has prototypes).

    ``image`` is a path, a file object, a PIL image, an 8-bit numpy picture, or a tensor (C, H, W)
    or (H, W, C) already preprocessed for the model (its picture is then the tensor rescaled to
    its own range, or un-normalised with the session's mean/std when phpn knows them).
    ``class_index`` is an index or a class name.
    """
    source = ""
    image = explain_input(image, _model_input_size(session))
    if isinstance(image, torch.Tensor):
        x = image[None]
        seen = picture_of_tensor(x[0], session.preprocess)
    else:
        if not isinstance(image, Image.Image):
            source = Path(getattr(image, "name", str(image))).name
            image = load_image(image)
        if isinstance(session.preprocess, TransformInput):  # applied as given
            x = session.preprocess(image.convert("RGB"))[None]
            seen = picture_of_tensor(x[0], session.preprocess)
        else:
            x = session.preprocess(image)[None]
            seen = seen_picture(image, session.preprocess)  # what the model sees: grey for a grey model
    names = list(class_names or session.class_names)
    if class_index is not None:
        class_index = class_index_of(class_index, names)
    with torch.inference_mode():
        feats = network.backbone(x.to(network.backbone_device)).float()
        base = network.explain_features(feats, classes=[], with_maps=False)
        logits = base.logits[0]
        if not bool(torch.isfinite(logits).all()):
            raise DataError(f"The model gives NaN or infinite logits on {source or 'this image'}, so there is "
                            "nothing to explain.", "Check the image and the preprocessing (a blank image can "
                            "divide by zero inside some models).")
        if class_index is None:
            ranked = torch.argsort(logits, descending=True).tolist()
            decomposed = set(network.class_indices.tolist())
            class_index = next(c for c in ranked if c in decomposed)
        out = network.explain_features(feats, classes=[int(class_index)])
    own_k = network.class_k(int(class_index))  # a class's unused slots (--k auto) are not shown
    probs = torch.softmax(logits.double(), 0)
    best = torch.argsort(logits, descending=True)[:top].tolist()
    return Explanation(
        image=seen, class_index=int(class_index), class_name=class_name(names, class_index),
        logit=float(logits[class_index]), bias=float(out.bias[class_index]),
        contributions=out.contributions[0, 0, :own_k].cpu().numpy().astype(np.float64),
        maps=out.maps[0, 0, :own_k].cpu().numpy(),
        top=[(c, class_name(names, c), float(logits[c]), float(probs[c])) for c in best], source=source,
        preprocess=session.preprocess,
    )


# --- the Python API: decompose a model you hold, on images you hold ----------------------------

_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (\d+(?:\.\d+)?\b|[a-z][\w:-]*))?")
# Flags whose keyword in Python is not the flag's own name with underscores.
_KEYWORD_OF_FLAG = {"memory-budget": "memory_budget_mb", "holdout-fraction": "holdout", "class": "class_index"}
# The words after a flag that are its value (the option lists of phpn.config), not the sentence going on.
_FLAG_VALUES = {"auto", "cpu", "cuda", "gpu", *SOLVERS, *OBJECTIVES, *SCALINGS, *CONTRIBUTIONS, *NMF_SOLVERS,
                *NMF_DATA_CHOICES, *INTERPOLATIONS, *COLOURS}


def in_python_terms(text: str) -> str:
    """A message written for the command line, with its flags as the Python keyword arguments
    they are: "--device cpu" -> "device='cpu'", "--batch-size" -> "batch_size=" (one rule, for
    the errors the library shares with the CLI when they reach a Python caller)."""
    def keyword(m: re.Match) -> str:
        name = _KEYWORD_OF_FLAG.get(m.group(1), m.group(1).replace("-", "_"))
        value = m.group(2)
        if value is not None and value[0].isdigit():
            return f"{name}={value}"
        if value is not None and (value in _FLAG_VALUES or value.startswith("cuda:")):
            return f"{name}={value!r}"
        return f"{name}=" + (f" {value}" if value is not None else "")

    return _FLAG.sub(keyword, text)


def _python_door(function):
    """For the doors only Python callers use: a PhpnError's message in Python's terms."""
    @functools.wraps(function)
    def door(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PhpnError as err:
            if "--" not in str(err):
                raise
            problem, fix = in_python_terms(err.problem), in_python_terms(err.fix)
            raise type(err)(problem, fix) from None
    return door


def as_data(session: ModelSession, data, images_per_class: Optional[int] = None, seed: int = SEED) -> ImageFolderData:
    """An image folder (path), a Dataset of (image, label) or a DataLoader of (images, labels) batches
    as phpn's ImageFolderData. Labels are the model's class indices."""
    if isinstance(data, ImageFolderData):
        return data
    if isinstance(data, (str, Path)):
        return open_data(session, data, images_per_class, seed)
    _names_from_dataset(session, data)
    kw = dict(num_classes=session.loaded.num_classes, images_per_class=images_per_class,
              class_names=session.loaded.class_names)
    if isinstance(data, torch.utils.data.DataLoader):
        return from_loader(data, **kw)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return from_dataset(data, **kw)
    raise ConfigError(f"phpn cannot read images from a {type(data).__name__}.",
                      "Pass an image folder (one sub-folder per class), a torch Dataset yielding (image, label) "
                      "or a DataLoader yielding (images, labels).")


def _wrapped(data, found):
    """The first value ``found(layer)`` gives (not None) along a DataLoader and its ``Subset`` /
    ``random_split`` wrappers (each one's ``.dataset``) down to the dataset, or None."""
    for _ in range(8):  # a Subset of a Subset of ... a dataset
        value = found(data)
        if value is not None or not hasattr(data, "dataset"):
            return value
        data = data.dataset
    return None


def dataset_classes(data) -> Optional[list]:
    """A dataset's class names (torchvision's ``classes``), looked for through a DataLoader and
    through ``Subset``/``random_split`` wrappers, or None."""
    def names(layer):
        value = getattr(layer, "classes", None)
        ok = isinstance(value, (list, tuple)) and value and all(isinstance(n, str) for n in value)
        return list(value) if ok else None

    return _wrapped(data, names)


def dataset_transform(data):
    """A dataset's own ``transform`` (torchvision's), looked for as :func:`dataset_classes` looks
    for its names, when it is deterministic (no random step: an augmenting transform would show
    a different picture on every call); else None."""
    transform = _wrapped(data, lambda layer: t if callable(t := getattr(layer, "transform", None)) else None)
    return transform if transform is not None and is_deterministic(transform) else None


def _names_from_dataset(session: ModelSession, dataset) -> None:
    """A model without class names takes a dataset's (torchvision's ``classes``) when they are
    exactly one per class, as an image folder's names are taken (the same rule as open_data)."""
    names = dataset_classes(dataset)
    if (session.loaded.class_names is None and isinstance(names, (list, tuple))
            and len(names) == session.loaded.num_classes and all(isinstance(n, str) for n in names)):
        session.loaded = replace(session.loaded, class_names=list(names))


def _fit_session_to(session: ModelSession, data: ImageFolderData) -> ModelSession:
    """Check that phpn can feed ``data`` to the model, and that the model is diagnosed at the
    size of in-memory tensors."""
    if not isinstance(data.root, InMemoryImages) or holds_pictures(data):
        if isinstance(session.preprocess, TensorInput):
            raise ConfigError("These images are pictures (files or PIL images), but phpn does not know how to "
                              "preprocess them for this model.",
                              "Pass preprocess= your torchvision transform (e.g. transforms.Compose([...])) or "
                              "phpn.Preprocess(resize=..., crop=..., mean=..., std=...), or give preprocessed "
                              "tensors (a Dataset or DataLoader).")
        if isinstance(session.preprocess, TransformInput):
            batch, kept, _ = load_batch(data.root, data.classes[0].paths[:1], session.preprocess)
            shape = tuple(batch.shape[1:]) if kept else session.preprocess.input_size
            if shape != session.preprocess.input_size:  # a transform without a resize: the pictures' size
                pre = session.preprocess.resized(shape)
                session = ModelSession(loaded=replace(session.loaded, preprocess=pre),
                                       diagnosis=diagnose(session.loaded, input_size=shape), preprocess=pre,
                                       demo=session.demo)
        return session
    shape = tuple(first_image(data, session.preprocess).shape)
    if tuple(session.diagnosis.input_size) != shape:
        if isinstance(session.preprocess, Preprocess):
            raise ConfigError(f"The images are tensors of shape {shape}, but the preprocessing gives "
                              f"{_input_size(session.preprocess)}.", "Pass tensors preprocessed as the model expects, "
                              "or drop preprocess= to take the tensors as they are.")

        session = ModelSession(loaded=session.loaded, diagnosis=diagnose(session.loaded, input_size=shape),
                               preprocess=TensorInput(*shape), demo=session.demo)
    return session


def _progress_fn(progress) -> Optional[ProgressFn]:
    if progress is True:
        return TqdmProgress()
    return progress or None


def discovery_defaults(demo: Optional[str] = None) -> dict:
    """The discovery settings to start from: the table of defaults (:data:`phpn.config.DISCOVERY`),
    then a built-in demo's own choices."""
    values = dict(DISCOVERY)
    if demo:
        values.update(get_demo(demo).defaults)
    return values


def class_index_of(value, names: Sequence[str]) -> int:
    """:func:`class_index` for a class given in Python: an int (or numpy/tensor integer) or a name."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return class_index(value, names)


def class_index(value, names: Sequence[str]) -> int:
    """A class given by index (int or digits) or by name (any case) -> its index; the one rule for every door."""
    text = str(value).strip()
    if text.isdigit() and int(text) < len(names):
        return int(text)
    for i, n in enumerate(names):
        if str(n).lower() == text.lower():
            return i
    shown = ", ".join(map(str, list(names)[:5])) + (", ..." if len(names) > 5 else "")
    raise ConfigError(f"Unknown class '{value}'.",
                      f"Give a class index from 0 to {len(names) - 1} or one of the model's class names ({shown}).")


def resolve_classes(value, names: Sequence[str]) -> Optional[tuple]:
    """Classes to decompose: None (all), a sequence of indices or names, or text such as "0,5-9,Bag"
    (inclusive ranges) -> a tuple of distinct indices, in the order given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    out = []
    for part in (value.split(",") if isinstance(value, str) else value):
        lo, dash, hi = str(part).strip().partition("-")
        if dash and lo.strip().isdigit() and hi.strip().isdigit():
            out += range(int(lo), int(hi) + 1)
        elif str(part).strip():
            out.append(class_index(part, names))
    bad = [c for c in out if c >= len(names)]
    if bad:
        raise ConfigError(f"The classes to decompose name class {bad[0]}, but the model has {len(names)} classes.",
                          f"Use indices from 0 to {len(names) - 1}.")
    return tuple(dict.fromkeys(out))


def resolve_discovery(demo: Optional[str] = None, *, class_names: Optional[Sequence[str]] = None,
                      **given) -> DiscoveryConfig:
    """The discovery settings, resolved once for the CLI, the app and the API: the table of
    defaults, then a built-in ``demo``'s own choices, then what the user ``given`` (a None
    value is "not given"). ``k="auto"`` gives each class its own k at NMF's elbow, from 2 to
    ``k_max`` (or ``auto_k``); ``classes`` may hold indices or, with ``class_names``, names."""
    allowed = set(DiscoveryConfig.__dataclass_fields__) | {"k_max"}
    unknown = sorted(set(given) - allowed)
    if unknown:
        hints = [f"'{u}' (did you mean '{close[0]}'?)" if (close := get_close_matches(u, allowed, 1)) else f"'{u}'"
                 for u in unknown]
        raise ConfigError(f"Unknown discovery option(s): {', '.join(hints)}.",
                          f"Use: {', '.join(sorted(allowed))}.")
    given = {key: value for key, value in given.items() if value is not None}
    values = {**discovery_defaults(demo), **given}
    k_max = values.pop("k_max", None) or values.pop("auto_k", None)
    values["k"], values["auto_k"] = resolve_k(values.get("k"), k_max, discovery_defaults(demo)["k"])
    if values.get("classes") is not None:
        values["classes"] = (resolve_classes(values["classes"], class_names) if class_names is not None
                             else tuple(int(c) for c in values["classes"]))
    return DiscoveryConfig(**values)


@_python_door
def decompose(model, data, *, k=None, images_per_class: Optional[int] = None, preprocess=None,
              class_names: Optional[Sequence[str]] = None, device: str = DEVICE, progress=True,
              decode: str = DECODE, **options) -> "DecomposedRun":
    """Turn a trained classifier into a part-prototype network: k prototypes per class that sum
    exactly to the class's head row, discovered on ``data``. ``k="auto"`` gives each class its
    own k, from 2 to ``auto_k`` (default 8), where NMF's error curve bends most. Settings left
    out (None) take the defaults of :func:`resolve_discovery` (a built-in demo's own, else
    :mod:`phpn.config`'s: k = 3, every image of each class).

    ``model``: a ``torch.nn.Module`` (in your own code, with your weights), a checkpoint path,
    or what :func:`open_model` returned. ``data``: an image folder (one sub-folder per class),
    a ``Dataset`` yielding ``(image, label)`` (a PIL image, or a tensor already preprocessed) or a
    ``DataLoader`` yielding ``(images, labels)``; labels are the model's class indices. A Dataset is
    read by index when needed; a DataLoader's images are held in memory (``images_per_class``
    caps them: the first N of each class in the loader's order).
    ``preprocess``: for pictures, a torchvision transform (``transforms.Compose([...])``, applied
    as given and recorded), a :class:`phpn.Preprocess` or a dict of its fields; not needed for
    tensors. When left out, a dataset's own deterministic ``transform`` (found through ``Subset``
    and DataLoaders too) is taken, so that pictures can be explained as the dataset reads them.
    ``class_names``: the model's class names in its output order (default: the model's own, else
    the dataset's ``classes``, found through ``Subset`` and ``random_split`` too).
    ``progress``: True for progress bars, False for none, or a callback ``(stage, done, total)``.
    ``decode``: where an image folder's JPEGs are decoded: "auto" (on the GPU when the model runs
    there), "gpu" or "cpu" (Pillow).
    ``options``: the other discovery settings (solver, objective, scaling, nmf_solver, seed,
    batch_size, top_patches, classes, ...; defaults in :mod:`phpn.config`).

    The returned run is certified on the discovery images (``run.certificate``). When the model
    does not read the images as given (near chance, labels in another class order, tensors that
    look unnormalised) each finding is an :class:`phpn.method.certify.InputWarning`, issued with
    ``warnings.warn`` and kept in ``run.warnings`` (shown by ``print(run)``).
    """
    _check_keywords(options, decompose)
    # One load, one trace: a live module is diagnosed at the data's own input size.
    peek = peek_input_size(data) if isinstance(model, torch.nn.Module) and preprocess is None else None
    session = open_model(model, preprocess=preprocess, input_size=peek, class_names=class_names)
    config = resolve_discovery(session.demo, class_names=session.class_names, k=k,
                               images_per_class=images_per_class, device=device, **options)
    images = as_data(session, data, images_per_class, config.seed)
    session = _fit_session_to(session, images)
    own = dataset_transform(data) if preprocess is None else None
    if own is not None and isinstance(session.preprocess, TensorInput):
        # The tensors came through the dataset's own transform: it is how a picture is read for
        # this model (explain a file, a PIL image or a numpy picture), and it is recorded.
        pre = TransformInput(own, session.preprocess.input_size)
        session = replace(session, loaded=replace(session.loaded, preprocess=pre), preprocess=pre)
    bar = _progress_fn(progress)
    try:
        run = run_discovery(session, images, config, progress=bar, data_label=str(images.root), decode=decode)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    out = DecomposedRun.attach(run, session)
    if isinstance(images.root, InMemoryImages):
        out.__dict__["_images"] = images.root  # in memory only (never saved): pictures of the top patches
    out.__dict__["_warnings"] = _issue(input_warnings(session, images, run.recorded_certificate))
    return out


def _check_keywords(given: dict, function) -> None:
    """A keyword close to one of the function's own (``preprocss=``): name it. Other unknown
    keywords are left to :func:`resolve_discovery`, which names the closest discovery setting."""
    own = [n for n, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY]
    allowed = set(DiscoveryConfig.__dataclass_fields__) | {"k_max"}
    for name in sorted(set(given) - allowed):
        close = get_close_matches(name, own, 1)
        if close and not get_close_matches(name, allowed, 1):
            raise ConfigError(f"phpn.{function.__name__} has no keyword argument '{name}' (did you mean "
                              f"'{close[0]}'?).", f"Use {close[0]}=.")


# --- does the model read the images as given? --------------------------------------------------

INPUT_CHECK_IMAGES = 512  # labelled images the class-order and normalisation checks look at, at most
INPUT_CHECK_PER_CLASS = 5


def _input_sample(session: ModelSession, data: ImageFolderData) -> tuple:
    """A few labelled images of each class as the model gets them: (images, labels), or (None, None)."""
    per_class = max(1, min(INPUT_CHECK_PER_CLASS, INPUT_CHECK_IMAGES // max(1, len(data.classes))))
    tensors, labels = [], []
    for entry in data.classes:
        if len(labels) >= INPUT_CHECK_IMAGES:
            break
        batch, kept, _ = load_batch(data.root, entry.paths[:per_class], session.preprocess)
        if kept:
            tensors.append(batch)
            labels += [entry.class_index] * len(kept)
    if not tensors:
        return None, None
    return torch.cat(tensors), torch.tensor(labels)


def _predict(model, images: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters(), torch.empty(0)).device
    with torch.inference_mode():
        return torch.cat([model(images[i:i + 64].to(device)).argmax(1).cpu() for i in range(0, len(images), 64)])


def class_order_warning(pairs: dict, names: Sequence[str]) -> Optional[str]:
    """``pairs`` {(label, predicted class): images}. When most labels' images are read consistently
    (at least 2 in 3, the rule of :func:`phpn.pipeline.mistakes.class_order_hint`) as one other
    class, the labels follow another class order: say which, and what to do in Python."""
    labels = [t for (t, _), n in pairs.items() for _ in range(n)]
    predicted = [p for (_, p), n in pairs.items() for _ in range(n)]
    found = majorities(labels, predicted)
    swapped = [(t, g, n, m) for t, (g, n, m) in sorted(found.items()) if g != t and n * 3 >= m * 2]
    if not found or len(swapped) * 2 < len(found):
        return None
    if len({g for _, g, _, _ in swapped}) * 4 < len(swapped) * 3:
        return None  # many labels read as the same few classes: a model that reads nothing, not a reordering
    examples = "; ".join(f"label {t} ({class_name(names, t)}) is read as class {g} ({class_name(names, g)}) on {n} "
                         f"of {m} images" for t, g, n, m in swapped[:3])
    return (f"The labels look like another class order than the model's: {examples}. Give each image the index "
            "of its class in the model's output (remap the dataset's labels, e.g. a target_transform), and "
            "class_names= in the model's order.")


def input_warnings(session: ModelSession, data, certificate) -> list:
    """Whether the model reads ``data`` as given, from the certificate (near chance: the warning
    every door shows, :func:`phpn.method.certify.chance_warning`) and a few labelled images per
    class: labels in another class order, tensors in [0, 1] that the model reads better
    normalised. A list of :class:`InputWarning` (empty when nothing is wrong)."""
    found = []
    text = chance_warning(certificate)
    if text:
        found.append(InputWarning("chance", text))
    # Tensors the user made (as given, or through a transform without a Normalize step) may be unnormalised.
    unknown_scale = isinstance(session.preprocess, TensorInput) or (
        isinstance(session.preprocess, TransformInput) and session.preprocess.mean is None)
    if not isinstance(data, ImageFolderData) or not (text or unknown_scale):
        return found
    images, labels = _input_sample(session, data)
    if images is None:
        return found
    model = session.loaded.model
    predicted = _predict(model, images)
    if text:
        pairs: dict = {}
        for t, p in zip(labels.tolist(), predicted.tolist()):
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
        order = class_order_warning(pairs, session.class_names)
        if order:
            found.append(InputWarning("class order", order))
    if unknown_scale and images.shape[1] in (1, 3) \
            and float(images.min()) >= 0 and float(images.max()) <= 1:
        mean, std = NORMALISATIONS["ImageNet"]
        mean, std = (mean, std) if images.shape[1] == 3 else ((0.5,), (0.5,))
        normalised = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        right = int((predicted == labels).sum())
        better = int((_predict(model, normalised) == labels).sum())
        n = len(labels)
        if better - right >= max(2, MIN_GAIN * n):
            found.append(InputWarning("normalisation", (
                f"The tensors look unnormalised (every value in [0, 1]): the model is right on {right} of {n} "
                f"sampled images as given and on {better} with the mean {list(mean)} and std {list(std)}. Add "
                f"transforms.Normalize(mean, std) (the model's own) to the dataset's transform.")))
    return found


def _issue(found: list) -> list:
    for warning in found:
        warnings.warn(warning, stacklevel=4)  # the caller's line: past decompose (or certify) and _python_door
    return found


@dataclass(frozen=True)
class ClassView:
    """One decomposed class of a run: the numbers most often read, and the whole record."""

    index: int
    name: str
    images: int  # discovery images
    mean_contribution: tuple  # per prototype, over the discovery images (sums to mean logit - bias)
    fidelity: tuple  # per prototype: how well its final map keeps its NMF part's map
    alpha: tuple  # per prototype: the NMF part's scale
    warnings: tuple  # plain-language warnings discovery attached to the class
    record: dict  # everything run.json holds for the class

    @classmethod
    def of(cls, entry: dict, name: str) -> "ClassView":
        return cls(index=int(entry["index"]), name=name, images=int(entry.get("images", 0)),
                   mean_contribution=tuple(entry.get("mean_contribution", ())),
                   fidelity=tuple(entry.get("fidelity", ())),
                   alpha=tuple(entry.get("alpha", ())), warnings=tuple(entry.get("warnings", ())), record=entry)


@dataclass
class DecomposedRun(Run):
    """A run (prototypes, records, certificate) attached to the model it decomposes.

    ``certify(data)``, ``explain(image)`` and ``save(path)``; ``network()`` is the decomposed
    network itself (an ``nn.Module`` whose logits equal the model's).
    """

    session: Optional[ModelSession] = None

    @classmethod
    def attach(cls, run: Run, session: Optional[ModelSession], checked: bool = False) -> "DecomposedRun":
        """``checked``: the run was opened for this session (:func:`open_run`), head included."""
        out = cls.__new__(cls)
        out.__dict__.update(run.__dict__)  # a run opened lazily stays lazy: its shards are read when needed
        for built in ("_network", "_explainer"):  # built for the session given here, when first asked for
            out.__dict__.pop(built, None)
        out.session = session
        if session is not None and not checked:
            check_split(out, session.split)  # the run fits the model's head
        return out

    def _session(self) -> ModelSession:
        if self.session is None:
            raise ConfigError("This run is not attached to a model.",
                              "Open it with phpn.load_run(path, model=your_model).")
        return self.session

    def network(self, split: Optional[HeadSplit] = None) -> PrototypeNetwork:
        """The decomposed network (an ``nn.Module``: logits, contributions and maps for any batch);
        by default on the attached model's head, built once."""
        if split is not None:
            return super().network(split)
        net = self.__dict__.get("_network")
        if net is None:
            net = self.__dict__["_network"] = super().network(self._session().split)
        return net

    @property
    def certificate(self) -> Optional[Certificate]:
        """The certificate recorded at discovery (on the discovery images), or None."""
        recorded = self.recorded_certificate
        return Certificate.from_dict(recorded) if recorded else None

    @property
    def classes(self) -> list:
        """The decomposed classes as the run records them (:class:`ClassView`, in the run's order)."""
        names = self.class_names
        return [ClassView.of(entry, class_name(names, entry["index"])) for entry in self.class_records]

    @_python_door
    def certify(self, data, *, images_per_class: Optional[int] = None, batch_size: int = BATCH_SIZE,
                device: str = DEVICE, progress=True) -> Certificate:
        """Check on ``data`` (folder, Dataset or DataLoader, as for :func:`decompose`) that the
        decomposed network gives the model's logits: agreement, max |Δlogit|, head error.

        A DataLoader is read as it is (its batches, in its order) with one forward pass of the
        model per batch; a folder or Dataset in batches of ``batch_size``. ``progress``: a bar
        (True), none (False) or a callback ``(stage, done, total)``. A model near chance on the
        labelled images, or labels in another class order, issue an :class:`InputWarning`."""
        session = self._session()
        direct = isinstance(data, torch.utils.data.DataLoader) and images_per_class is None
        images = data if direct else as_data(session, data, images_per_class)
        bar = _progress_fn(progress)
        try:
            cert = certify_run(session, self, images, batch_size, device, bar)
        finally:
            if hasattr(bar, "close"):
                bar.close()
        found = input_warnings(session, None, cert)
        order = class_order_warning(cert.confusion or {}, session.class_names) if found else None
        if order:
            found.append(InputWarning("class order", order))
        _issue(found)
        return cert

    @_python_door
    def explain(self, image, class_index=None, *, top: int = TOP_CLASSES):
        """Explain ``image`` for ``class_index`` (an index or a class name; default: the
        best-scoring decomposed class). ``image``: a path, a PIL image, a numpy picture (H, W, 3),
        a preprocessed tensor (C, H, W) or (H, W, C). A batch (N, C, H, W) or a list of images
        gives a list of explanations."""
        session = self._session()
        explainer = self.__dict__.get("_explainer")
        if explainer is None:  # reads a class's prototypes (its shard) when it first explains it
            explainer = self.__dict__["_explainer"] = self.lazy_network(session.split)
        items, batched = explain_inputs(image, _model_input_size(session))
        out = []
        for item in items:
            ex = explain_image(session, explainer, item, class_index, top=top)
            ex.run = self
            ex.image_root = self.__dict__.get("_images") or run_image_root(self, class_index=ex.class_index)
            out.append(ex)
        return out if batched else out[0]

    @property
    def warnings(self) -> list:
        """What decompose found about the inputs (:class:`InputWarning`: near chance, class order,
        normalisation); empty when the model reads them."""
        return list(self.__dict__.get("_warnings", []))

    def summary(self) -> str:
        """The run in a few lines: model, classes and k, certificate, warnings."""
        shape = f"k = {self.k}" if not self.settings.get("auto_k") else f"k up to {self.k}"
        arch = self.model_info.get("arch") or (self.session.loaded.arch if self.session else "?")
        lines = [f"phpn run: {len(self.class_indices)} classes × {shape} prototypes of {arch}"
                 + (f", saved at {self.path}" if self.path else ""),
                 f"certificate: {format_certificate(self.recorded_certificate)}"]
        lines += [f"WARNING ({w.kind}): {w}" for w in self.warnings]
        return "\n".join(lines)

    def __repr__(self) -> str:
        found = f", {len(self.warnings)} warning(s): {', '.join(w.kind for w in self.warnings)}" if self.warnings \
            else ""
        cert = format_certificate(self.recorded_certificate, short=True)
        return f"<phpn.Run {len(self.class_indices)} classes × k = {self.k} · {cert}{found}>"

    __str__ = summary

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython and Jupyter show the summary
        printer.text(self.summary())

    def save(self, path, **options) -> Path:
        """Write the run (atomically) to the folder ``path``; reopen it with :func:`load_run`."""
        return save_run(self, path, **options)

    def audit(self, data=None, *, images_per_class: int = AUDIT_IMAGES_PER_CLASS, progress=False,
              save: bool = True) -> Audit:
        """Every prototype ranked by how much a person should look at it first, with its reasons
        and the numbers behind them, beside baselines of this run (:mod:`phpn.pipeline.audit`).
        ``data``: labelled images (a folder, a Dataset or a DataLoader); default: the run's own
        discovery folder, when it is here. A saved run keeps the result beside it (``audit.json``,
        read back by :attr:`last_audit`) unless ``save`` is False; ``Audit.saved_to`` says where,
        ``Audit.save_note`` why it was not kept."""
        session = self._session()
        images = as_data(session, _labelled_images(self, data))
        bar = _progress_fn(progress)
        try:
            result = audit_run(self, session.split, session.preprocess, images, images_per_class=images_per_class,
                               progress=bar)
        finally:
            if hasattr(bar, "close"):
                bar.close()
        if save:
            keep_audit(self, result)
        return result

    @property
    def last_audit(self) -> Optional[Audit]:
        """The audit kept beside this saved run, or None (none kept, or one that is not this
        run's: :func:`saved_audit` says why)."""
        saved = saved_audit(self)
        return saved.audit if saved is not None else None


def keep_audit(run: Run, audit: Audit) -> Audit:
    """Keep ``audit`` beside the saved ``run`` (``audit.json``); where it cannot be (an unsaved
    or shipped run, a folder that cannot be written), ``audit.save_note`` says why and the audit
    is returned all the same: the findings are never lost to a failed write."""
    audit.saved_to, audit.save_note = None, why_not_saved(run)
    if not audit.save_note:
        try:
            audit.saved_to = str(save_audit(run, audit.to_dict()))
        except PhpnError as exc:
            audit.save_note = f"The audit is not kept: {exc.problem}"
        except OSError as exc:
            audit.save_note = f"The audit is not kept: {run.path} cannot be written ({exc.strerror or exc})."
    return audit


@dataclass
class LastAudit:
    """The audit kept beside a run: ``audit`` when it is this run's, else None and ``note`` says
    why it is not shown; ``saved_at`` (ISO 8601, UTC) when it was written."""

    path: Path
    audit: Optional[Audit]
    note: str = ""
    saved_at: str = ""


def saved_audit(run: Run) -> Optional[LastAudit]:
    """The last audit kept beside ``run`` (:mod:`phpn.runs.audit_record`), or None when there is
    none. One that names another run, or was changed after it was written, is not trusted: its
    ``audit`` is None and ``note`` says why."""
    saved: Optional[SavedAudit] = read_audit(run)
    if saved is None:
        return None
    audit = None
    if saved.trusted:
        try:
            audit = Audit.from_dict(saved.audit)
        except (KeyError, TypeError, ValueError) as exc:
            return LastAudit(saved.path, None, f"The {saved.path.name} beside this run has findings this phpn cannot "
                                               f"read ({type(exc).__name__}: {exc}). Audit the run again to replace it.",
                             saved.saved_at)
        audit.saved_to = str(saved.path)
    return LastAudit(saved.path, audit, saved.note, saved.saved_at)


def _labelled_images(run: Run, data):
    """``data``, else the run's own discovery folder; a ConfigError when neither is here."""
    if data is not None:
        return data
    root = run_image_root(run)
    if root is None:
        raise ConfigError("The labelled images this needs are not given, and the run's discovery folder is not here.",
                          "Pass the images (the command line's --data DIR: one sub-folder of images per class).")
    return root


def compare(a, b, data=None, *, images_per_class: int = COMPARE_IMAGES_PER_CLASS,
            threshold: float = MATCH_THRESHOLD, progress=False) -> Comparison:
    """Two runs compared (:mod:`phpn.pipeline.compare`): each class's prototypes matched
    one-to-one on the same images, the similarity of each pair, the unmatched prototypes of
    each side and what changed in the contributions. ``a`` and ``b`` are runs attached to their
    models (:func:`open_run`, :func:`decompose`) or paths of saved runs whose models are here.
    ``data``: labelled images (default: ``a``'s discovery folder, else ``b``'s). Runs of models
    with different classes are refused."""
    runs = [r if isinstance(r, DecomposedRun) else open_run(r, require_model=True) for r in (a, b)]
    for r in runs:
        r._session()
    check_comparable(*runs)  # before any image is read
    if data is None:
        roots = [run_image_root(r) for r in runs]
        data = next((root for root in roots if root is not None), None)
    images = as_data(runs[0].session, _labelled_images(runs[0], data))
    labels = tuple(str(r.path.name) if r.path is not None else side for r, side in zip(runs, "AB"))
    if labels[0] == labels[1]:
        labels = ("A", "B")
    bar = _progress_fn(progress)
    try:
        return compare_runs(runs[0], runs[0].session.split, runs[0].session.preprocess, runs[1],
                            runs[1].session.split, runs[1].session.preprocess, images,
                            images_per_class=images_per_class, threshold=threshold, labels=labels, progress=bar)
    finally:
        if hasattr(bar, "close"):
            bar.close()


def model_source(run: Run, *, allowed: Optional[Callable[[Path], bool]] = None, workspace=None,
                 code: bool = False) -> Optional[dict]:
    """How to open the model ``run`` was made from (:func:`open_model`'s arguments), or None when
    it is not here: a demo's name, else the checkpoint the run records, when that file exists and
    ``allowed(path)`` (default: any file). ``workspace``: where a visitor's ``my files/…`` paths
    lie. A model that needs its own code (a model file) is offered only with ``code``."""
    if run.demo:
        return {"demo": run.demo}
    model = run.model_info
    allowed = allowed or (lambda path: True)
    recorded = model.get("app_load")
    if isinstance(recorded, dict) and recorded.get("checkpoint"):
        recorded = load_from_record(recorded, workspace)
        if recorded is None or ((recorded.get("model_def") or recorded.get("trust_pickle")) and not code):
            return None
        model_def = recorded.get("model_def")  # "file.py" or "file.py:Factory"
        if model_def and not Path(str(model_def)).is_file():
            model_def = str(model_def).rsplit(":", 1)[0]
        files = [recorded.get("checkpoint"), model_def]  # a checkpoint may be a model folder
        if all(f is None or (Path(str(f)).exists() and allowed(Path(str(f)))) for f in files):
            spec = dict(recorded)
            if isinstance(model.get("origin"), dict):  # the same model (and label) as when it was made
                spec["origin"] = {k: v for k, v in model["origin"].items() if k != "sha256"}
            return spec
        return None
    source = model.get("source")
    if not source or str(model.get("arch", "")).startswith("pickled:"):
        return None
    path = Path(str(source))
    if not path.is_file() or not allowed(path):
        return None
    spec = {"checkpoint": str(path), "preprocess": run.preprocess_info or None,
            "class_names": model.get("class_names"), "feature_layer": model.get("feature_layer") or None,
            "head_layer": model.get("head_layer") or None}
    return {k: v for k, v in spec.items() if v is not None}


def missing_model(run: Run, where: str = "here") -> ConfigError:
    """The one message for a run whose model is not ``where``: which file it was, and what to do."""
    recorded = run.model_info
    name = ((recorded.get("origin") or {}).get("name")  # an upload's own name
            or Path(str(recorded.get("source") or "the model file")).name)
    return ConfigError(f"This run was made from {name} (sha256 {run.checkpoint_sha256[:12]}…), which is not {where}.",
                       "Give the model it was made from: its checkpoint file (the command line's --checkpoint, "
                       "the app's Model & data page) or the model itself in Python (phpn.open_run(path, model)).")


def open_run(path, model=None, *, require_model: bool = False, **open_options) -> DecomposedRun:
    """Open a saved run: the one way in, for the CLI, the app and Python. The run is read and
    verified; its model is ``model`` (an nn.Module, a checkpoint path or an opened model), else
    the demo or the checkpoint file it was made from (:func:`model_source`), opened with the
    run's own preprocessing unless ``preprocess=``/``overrides=`` say otherwise, and checked to
    be the model the run decomposed (checkpoint, architecture, cut, head rows). The model takes
    the run's class names when it has none. With no model found, the run opens for reading and
    saving only, or, with ``require_model``, the reason is raised (:func:`missing_model`)."""
    run = read_run(path)
    recorded = run.preprocess_info
    if isinstance(model, ModelSession):
        session = model
    else:
        if model is None and not open_options.get("demo"):
            source = model_source(run)
            if source is None:
                if require_model:
                    raise missing_model(run)
                return DecomposedRun.attach(run, None)
            open_options = {**source, **{k: v for k, v in open_options.items() if v is not None}}
            model = open_options.pop("checkpoint", None)
            open_options.pop("origin", None)
        if "given" in recorded:  # made from tensors: the model is diagnosed at their size
            open_options.setdefault("input_size", TensorInput.from_dict(recorded).input_size)
        elif open_options.get("preprocess") is None:
            open_options["preprocess"] = Preprocess.from_dict(recorded)
        session = open_model(model, **open_options)
    run = _check_run_for(session, run)
    names = run.model_info.get("class_names")
    if names and not session.loaded.class_names:  # the run named the classes (after its folders)
        session.loaded = replace(session.loaded, class_names=list(names))
    return DecomposedRun.attach(run, session, checked=True)


load_run = open_run  # the name earlier releases used


def import_run(zip_file, into, *, name: Optional[str] = None, max_bytes: int = MAX_RUN_ZIP_BYTES) -> Path:
    """Take in a run's zip (the app's Export page, ``phpn.show.report.run_zip_bytes``) as a new
    folder in ``into``, verified whole and never written over anything; returns the folder, to
    open with :func:`open_run` (which finds the run's model, or says which file to give)."""
    return import_run_zip(zip_file, into, name=name, max_bytes=max_bytes)


# --- explanations in bulk (the CLI's ``phpn explain RUN IMAGES... --out DIR``) -----------------

EXPLANATIONS_SUMMARY = "explanations.json"


def run_image_root(run: Run, also: Sequence = (), allowed=None, class_index: Optional[int] = None) -> Optional[Path]:
    """Where the run's discovery images (its top patches) can be read now, or None.

    Tried in order: the folder the run records (a demo's own), then the folders in ``also``;
    a folder counts when ``allowed(folder)`` (default: any) and it holds a top patch's image
    (of ``class_index``, the class being shown, so that no other class's shard is read; default:
    the first class that has one).
    """
    label = str(run.data_info.get("root") or "")
    candidates = []
    if label.startswith("demo:"):
        try:
            candidates.append(get_demo(label[5:]).discovery_dir())
        except PhpnError:
            pass
    elif label:
        candidates.append(Path(label))
    candidates += [Path(p) for p in also]
    records = [run.class_meta(class_index)] if class_index is not None else run.class_records
    probe = next((patches[0]["path"] for entry in records for patches in entry.get("top_patches", []) if patches),
                 None)
    for root in candidates:
        if (allowed is None or allowed(root)) and root.is_dir() and (probe is None or (root / probe).is_file()):
            return root
    return None


def list_images(sources: Sequence) -> list:
    """Image files named directly or found (recursively, sorted) in folders: [(path, name)], where
    ``name`` is unique and readable (the folder's name, then the path inside it)."""
    found = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"The folder {src} holds no image files.", "Name image files or folders of images.")
            found += [(p, f"{src.name}/{p.relative_to(src).as_posix()}") for p in files]
        elif src.is_file():
            found.append((src, src.name))
        else:
            raise DataError(f"{src} does not exist.", "Name image files or folders of images.")
    return found


def _output_stem(name: str, taken: set) -> str:
    stem = "__".join(Path(name).with_suffix("").parts) or "image"
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem)
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique


SUMMARY_EVERY_S = 5.0  # an unfinished summary is rewritten this often, so an interruption loses little


def _explanation_file(name: str) -> bool:
    """A file ``phpn explain --out`` writes: the summary, a page or picture, or a write in progress."""
    return name == EXPLANATIONS_SUMMARY or name.endswith((".png", ".html")) or \
        (name.startswith(".") and name.endswith(TEMP_SUFFIX))


def explain_to_folder(session: ModelSession, run: Run, sources: Sequence, out, *,
                      class_index: Optional[int] = None, progress: Optional[ProgressFn] = None,
                      network: Optional[PrototypeNetwork] = None, resume: bool = False,
                      overwrite: bool = False, formats: Sequence[str] = EXPLAIN_FORMATS) -> dict:
    """Explain every image of ``sources`` (files or folders): per image in ``out`` a PNG and a
    self-contained HTML page (``formats``: either or both), and a JSON summary
    (``explanations.json``) of them all.

    The summary is written from the start and kept up to date, so a folder phpn began is known as
    its own, finished or not: it is written again image by image; ``resume`` skips the images
    already explained there (same sources, same class); ``overwrite`` first removes every file
    phpn wrote there. A folder holding anything else is never written into. Unreadable images are skipped and listed in the summary, never fatal."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("Resuming and overwriting an explanations folder exclude each other.",
                          "Pass one of --resume and --overwrite (resume= or overwrite= in Python).")
    check_may_write(out, what="'phpn explain' output folder", plural="explanations",
                    ours=lambda p: p.is_dir() and (p / EXPLANATIONS_SUMMARY).is_file(), owned=_explanation_file,
                    error=ConfigError, fix="Pass --out a new or empty folder.")
    unknown = sorted(set(formats) - set(EXPLAIN_FORMATS))
    if unknown or not formats:
        raise ConfigError(f"Unknown explanation format(s): {', '.join(unknown) or 'none given'}.",
                          f"Choose from: {', '.join(EXPLAIN_FORMATS)}.")
    formats = tuple(f for f in EXPLAIN_FORMATS if f in set(formats))
    images = list_images(sources)
    previous = _previous_explanations(out, resume, overwrite, class_index)
    out.mkdir(parents=True, exist_ok=True)
    network = network or run.network(session.split)
    root = run_image_root(run)
    taken, explained, skipped = set(), [], []
    summary = {"run": str(run.path) if run.path else None, "images": len(images), "class": class_index,
               "formats": list(formats), "complete": False, "explained": explained, "skipped": skipped,
               "certificate": run.recorded_certificate}
    write_atomic(out / EXPLANATIONS_SUMMARY, json.dumps(summary, indent=1))
    written = time.monotonic()
    report(progress, "explain", 0, len(images))
    for i, (path, name) in enumerate(images):
        stem = _output_stem(name, taken)
        done = previous.get(name)
        if done is not None and all(done.get(f) == f"{stem}.{f}" and (out / done[f]).is_file() for f in formats):
            explained.append({key: value for key, value in done.items() if key not in EXPLAIN_FORMATS or key in formats})
        else:
            try:
                ex = explain_image(session, network, path, class_index)
            except DataError as err:
                skipped.append({"image": name, "why": str(err)})
            else:
                ex.source, ex.run, ex.image_root = name, run, root
                for f in formats:
                    ex.save(out / f"{stem}.{f}")
                explained.append({**ex.to_dict(), **{f: f"{stem}.{f}" for f in formats}})
        if time.monotonic() - written >= SUMMARY_EVERY_S:
            write_atomic(out / EXPLANATIONS_SUMMARY, json.dumps(summary, indent=1))
            written = time.monotonic()
        report(progress, "explain", i + 1, len(images))
    summary["complete"] = True
    write_atomic(out / EXPLANATIONS_SUMMARY, json.dumps(summary, indent=1))
    return summary


def _previous_explanations(out: Path, resume: bool, overwrite: bool, class_index: Optional[int]) -> dict:
    """{image name: its entry} already explained in ``out`` (resume); with ``overwrite`` phpn's
    files there are removed first."""
    if not (out / EXPLANATIONS_SUMMARY).is_file():
        return {}
    if overwrite:
        for entry in out.iterdir():
            if entry.is_file() and _explanation_file(entry.name):
                entry.unlink()
        return {}
    if not resume:  # written again image by image, over phpn's own files of the same names
        return {}
    try:
        recorded = json.loads((out / EXPLANATIONS_SUMMARY).read_text(encoding="utf-8"))
    except ValueError:  # a summary cut short: nothing is known to be done, every image is explained again
        return {}
    if recorded.get("class", class_index) != class_index:
        raise ConfigError(f"The explanations in {out} are for class {recorded.get('class')}, not {class_index}.",
                          "Resume with the same class, or pass --overwrite to replace them.")
    return {e["image"]: e for e in recorded.get("explained", []) if isinstance(e, dict) and "image" in e}
