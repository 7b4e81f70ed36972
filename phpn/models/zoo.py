"""torchvision architectures: recognise them from a state dict, build them, load weights.

Recognition compares the checkpoint's key names and tensor shapes with each candidate
architecture's own state dict, built on the ``meta`` device (no memory, no weights, no
downloads). Two models of one family differ in their layer counts (resnet18 vs resnet34)
or widths (resnet50 vs resnext50_32x4d), so an exact key-and-shape match names the
architecture; only the head's row count (the number of classes) is left free.

Models are always built with ``weights=None``: phpn never downloads anything. The default
preprocessing and the ImageNet class names come from torchvision's offline metadata.
"""
from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from phpn.config import INTERPOLATIONS
from phpn.errors import CheckpointError
from phpn.head import LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models import timm_models
from phpn.models.checkpoint import strip_common_prefix, strip_wrapper_prefixes
from phpn.models.signatures import (
    SENTINEL_CLASSES,
    ShapeDiff,
    diff_shapes,
    sentinel_shapes,
)

# family -> (architecture names, keys every member's state dict has). The markers only
# narrow the search; the exact comparison decides.
FAMILIES = {
    "resnet": (r"resnet\d+|resnext\d+_\w+|wide_resnet\d+_2", {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"}),
    "densenet": (r"densenet\d+", {"features.conv0.weight", "classifier.weight"}),
    "efficientnet": (r"efficientnet_(b[0-7]|v2_[sml])", {"features.0.0.weight", "classifier.1.weight"}),
    "mobilenet_v2": (r"mobilenet_v2", {"features.0.0.weight", "classifier.1.weight"}),
    "regnet": (r"regnet_[xy]_\w+", {"stem.0.weight", "fc.weight"}),
    "convnext": (r"convnext_\w+", {"features.0.0.weight", "classifier.0.weight", "classifier.2.weight"}),
    "swin": (r"swin_(v2_)?[tsb]", {"features.0.0.weight", "norm.weight", "head.weight"}),
    # Recognised so that the doctor can refuse them with a reason (METHOD.md section 4).
    "vgg": (r"vgg\d+(_bn)?", {"features.0.weight", "classifier.6.weight"}),
    "vit": (r"vit_\w+", {"class_token", "heads.head.weight"}),
    "mobilenet_v3": (r"mobilenet_v3_(small|large)", {"features.0.0.weight", "classifier.3.weight"}),
}
REFUSED_FAMILIES = {"vgg", "vit", "mobilenet_v3"}


def torchvision_classifiers() -> list:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def family_of(arch: str) -> Optional[str]:
    for family, (pattern, _) in FAMILIES.items():
        if re.fullmatch(pattern, arch):
            return family
    return None


@functools.lru_cache(maxsize=1)
def known_archs() -> tuple:
    """The torchvision classifiers phpn recognises, decomposable or not."""
    return tuple(a for a in torchvision_classifiers() if family_of(a) is not None)


def canonical_arch(name: str) -> str:
    """'ResNet-50' -> 'resnet50'; any torchvision classifier name is accepted."""
    wanted = re.sub(r"[-_\s]", "", name.strip().lower())
    for arch in torchvision_classifiers():
        if arch.replace("_", "") == wanted:
            return arch
    raise CheckpointError(
        f"'{name}' is not a torchvision architecture phpn can build.",
        f"Use one of: {', '.join(known_archs())}; or give your own model file with --model-def FILE.py:FACTORY.",
    )


class _EmptyOnMeta(TorchFunctionMode):
    """Allocate ``torch.empty`` on the meta device: layers get shapes but no memory.

    Narrower than ``with torch.device("meta")``: other tensors stay real, so builders that
    compute layer widths with tensors (RegNet) still work.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _builder_kwargs(arch: str) -> dict:
    # Builders whose defaults only make sense with pretrained weights.
    if arch in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": False}
    return {}


def build_model(arch: str, num_classes: int, *, empty: bool = False) -> nn.Module:
    """A torchvision model with random (or, with ``empty``, unallocated) weights. Never downloads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(weights=None, num_classes=num_classes, **_builder_kwargs(arch))
        if empty:
            with _EmptyOnMeta():
                return torchvision.models.get_model(arch, **kwargs)
        return torchvision.models.get_model(arch, **kwargs)


@dataclass(frozen=True)
class _Signature:
    shapes: dict  # key -> shape; head tensors have -1 as their first dimension
    head_weight: str


@functools.lru_cache(maxsize=None)
def _signature(arch: str) -> _Signature:
    shapes = sentinel_shapes(build_model(arch, SENTINEL_CLASSES, empty=True))
    head_weight = next((k for k, s in shapes.items() if s[:1] == (-1,) and len(s) >= 2), "")
    return _Signature(shapes, head_weight)


def _compare(state_dict: Mapping, arch: str) -> ShapeDiff:
    return diff_shapes(state_dict, _signature(arch).shapes)


def _candidates(keys: set) -> list:
    # Every member of a family has its marker keys, so other families cannot match exactly.
    fams = [f for f, (_, markers) in FAMILIES.items() if markers <= keys]
    return [a for a in known_archs() if family_of(a) in fams]


def normalise_state_dict(state_dict: Mapping) -> dict:
    """Wrapper prefixes off, old DenseNet key names ("norm.1") renamed, floats as float32.

    Half-precision (or float64) checkpoints are cast so that the model runs in float32 on the CPU.
    """
    sd = strip_wrapper_prefixes(state_dict)
    sd = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in sd.items()}
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


# torchvision's DenseNet once named its layers "norm.1" instead of "norm1".
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _views(state_dict: Mapping):
    """The state dict as it is, then with a shared first name component removed."""
    yield state_dict, ""
    stripped, prefix = strip_common_prefix(state_dict)
    if prefix:
        yield stripped, prefix


# Classifier weight names in torchvision, timm and Hugging Face models, most common first.
HEAD_KEYS = ("fc.weight", "head.fc.weight", "head.weight", "classifier.weight", "classifier.1.weight",
             "heads.head.weight", "classifier.fc.weight", "classifier.2.weight", "classifier.3.weight",
             "classifier.6.weight", "_fc.weight", "last_linear.weight", "head.l.weight", "linear.weight")


def find_head_weight(state_dict: Mapping) -> Optional[str]:
    """The classifier's weight by its name (the outermost one when several match), else None.

    Key order cannot tell: safetensors files store their keys sorted by name.
    """
    found = []
    for key, tensor in state_dict.items():
        for rank, name in enumerate(HEAD_KEYS):
            if key == name or key.endswith("." + name):
                linear = tensor.ndim == 2 or (tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1))
                if linear:
                    found.append((key.count("."), rank, key))
                break
    return min(found)[2] if found else None


def guess_num_classes(state_dict: Mapping) -> Optional[int]:
    """Rows of the classifier found by name; else of the last 2-D weight in the file's order."""
    key = find_head_weight(state_dict)
    if key is not None:
        return int(state_dict[key].shape[0])
    for key in reversed(list(state_dict)):
        if key.endswith("weight") and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    return None


def head_rows(state_dict: Mapping, arch: str) -> int:
    return int(state_dict[_signature(arch).head_weight].shape[0])


def infer_arch(state_dict: Mapping) -> tuple[str, int]:
    """``(arch, num_classes)`` of the torchvision architecture this state dict belongs to."""
    arch, num_classes, _ = _infer(normalise_state_dict(state_dict))
    return arch, num_classes


def _infer(sd: dict) -> tuple[str, int, dict]:
    best = None  # (diff size, arch, diff) of the nearest miss, for the error message
    for view, _prefix in _views(sd):
        keys = set(view)
        matches = []
        for arch in _candidates(keys):
            diff = _compare(view, arch)
            if diff.size == 0:
                matches.append(arch)
            elif best is None or diff.size < best[0]:
                best = (diff.size, arch, diff)
        if len(matches) == 1:
            return matches[0], head_rows(view, matches[0]), view
        if len(matches) > 1:
            raise CheckpointError(
                f"The checkpoint fits several architectures equally well: {', '.join(matches)}.",
                f"Say which one with --arch (e.g. --arch {matches[0]}).",
            )
    hint = ""
    if best is not None and best[0] <= max(8, len(sd) // 10):
        hint = f" The nearest is {best[1]}, but {best[2].describe(3)}."
    raise _NoMatch(
        f"Could not tell the architecture from the checkpoint's {len(sd)} weight names and shapes: "
        f"it matches none of torchvision's {', '.join(sorted(FAMILIES))} models exactly.{hint}",
        "Name it with --arch (a torchvision name, or timm/NAME for a timm model), or give your model's code "
        "with --model-def FILE.py:FACTORY.",
    )


class _NoMatch(CheckpointError):
    """No torchvision architecture fits the state dict (several fitting is another error)."""


def load_architecture(state_dict: Mapping, arch: Optional[str] = None, num_classes: Optional[int] = None, *,
                      sha256: str = "", source: str = "", metadata: Optional[Mapping] = None) -> LoadedModel:
    """A torchvision or timm classifier, named by ``arch`` or inferred, with ``state_dict`` loaded.

    Inference tries torchvision's architectures first, then timm's (when timm is installed).
    Weights that fit a torchvision and a timm model alike (timm's ResNets and DenseNets keep
    torchvision's names) are given the library the evidence points to (``twin_choice``), and
    the notes say so, with both preprocessings.
    """

    if timm_models.is_timm_arch(arch):
        return _load_timm(normalise_state_dict(state_dict), arch, num_classes, sha256, source, [])
    try:
        model, name, rows, notes = load_torchvision(state_dict, arch, num_classes)
    except _NoMatch as err:
        sd = normalise_state_dict(state_dict)
        for view, _prefix in _views(sd):
            found = timm_models.infer(view)
            if found is not None:
                note = f"architecture inferred from the weight names and shapes: timm's {found}"
                return _load_timm(view, timm_models.PREFIX + found, num_classes, sha256, source, [note])
        if not timm_models.available():
            raise CheckpointError(err.problem + " timm is not installed, so timm's models were not tried.",
                                  err.fix + " For a timm model: " + timm_models.INSTALL_HINT) from None
        raise CheckpointError(err.problem[:-1] + ", nor any timm model of the families phpn indexes.",
                              err.fix) from None
    pre, pre_notes = default_preprocess_with_notes(name, sha256)
    twins = timm_models.exact_fits(model.state_dict()) if arch is None else []
    if twins:
        choice = twin_choice(name, twins, sha256=sha256, source=source, metadata=metadata or {})
        note = twin_note(name, pre, choice)
        if choice.timm_name:
            loaded = _load_timm(normalise_state_dict(model.state_dict()), timm_models.PREFIX + choice.timm_name,
                                num_classes, sha256, source, [])
            loaded.notes.insert(0, note)
            return loaded
        notes.append(note)
    return LoadedModel(model=model, arch=name, num_classes=rows, sha256=sha256, preprocess=pre,
                       class_names=class_names(name, rows), source=source, notes=notes + pre_notes)


@dataclass(frozen=True)
class TwinChoice:
    """Which library's model weights that fit both are taken for, and why."""

    timm_name: str  # "" when torchvision's is taken
    twin: str  # the timm model (with a pretrained tag when known) the note offers
    others: tuple  # further timm models the weights fit
    reason: str


def _torchvision_weights_of(arch: str, sha256: str) -> str:
    try:
        weights = list(torchvision.models.get_model_weights(arch))
    except (ValueError, KeyError, AttributeError, TypeError):
        return ""
    return next((str(w) for w in weights if _weights_hash(w) and sha256.lower().startswith(_weights_hash(w))), "")


def _timm_config_beside(source: str) -> dict:
    """timm's config.json next to the weights (as timm's Hugging Face repositories hold them)."""
    if not source:
        return {}
    path = Path(source).with_name("config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) and "architecture" in cfg and "pretrained_cfg" in cfg else {}


def _tagged(architecture, cfg, names: list) -> str:
    """'resnet50' + pretrained_cfg {'tag': 'a1_in1k'} -> 'resnet50.a1_in1k', when the base is in ``names``."""
    if not isinstance(architecture, str) or architecture.split(".", 1)[0] not in names:
        return ""
    tag = cfg.get("tag") if isinstance(cfg, Mapping) else None
    return f"{architecture}.{tag}" if tag and "." not in architecture else architecture


def twin_choice(arch: str, timm_names: list, *, sha256: str = "", source: str = "",
                metadata: Optional[Mapping] = None) -> TwinChoice:
    """torchvision's ``arch`` or one of ``timm_names``, for weights that fit both, by the evidence:
    the file's SHA-256 (torchvision's own files), a ``pretrained_cfg`` saved with the weights or in
    a timm config.json beside them, the file name; torchvision's when nothing tells."""
    metadata = metadata or {}
    same = arch if arch in timm_names else timm_names[0]
    others = tuple(n for n in timm_names if n != same)

    def timm(name, reason):
        return TwinChoice(name, name, tuple(n for n in timm_names if n != name.split(".", 1)[0]), reason)

    tv_weights = _torchvision_weights_of(arch, sha256) if sha256 else ""
    if tv_weights:
        return TwinChoice("", same, others, f"the file's SHA-256 is that of torchvision's {tv_weights}")
    if "pretrained_cfg" in metadata:
        named = _tagged(metadata.get("architecture") or metadata.get("arch"), metadata["pretrained_cfg"], timm_names)
        return timm(named or same, "the file holds a timm pretrained_cfg")
    cfg = _timm_config_beside(source)
    if cfg:
        named = _tagged(cfg["architecture"], cfg["pretrained_cfg"], timm_names)
        if named:
            return timm(named, "the config.json beside it is timm's (architecture and pretrained_cfg)")
    file_name = Path(source).name if source else ""
    spelled = timm_models.named_in_file_name(file_name, timm_names) if file_name else ""
    if spelled:
        return timm(spelled, f"the file name '{file_name}' is timm's name for it with a pretrained tag")
    if re.search(r"(^|[^a-z])timm([^a-z]|$)", file_name.lower()):
        return timm(same, f"the file name '{file_name}' says timm")
    return TwinChoice("", same, others, "nothing in the file (its SHA-256, a pretrained_cfg, a timm config.json "
                                        "beside it, its name) says which, and torchvision's is the default")


def _pre_text(pre: Preprocess) -> str:
    fmt = lambda v: ", ".join(f"{x:.4g}" for x in v)  # noqa: E731
    crop_pct = f", crop_pct {pre.crop / pre.resize:.3g}" if pre.resize else ""
    return (f"resize {pre.resize} {pre.interpolation}, crop {pre.crop}{crop_pct}, "
            f"mean ({fmt(pre.mean)}), std ({fmt(pre.std)})")


def twin_note(arch: str, tv_pre: Preprocess, choice: TwinChoice) -> str:
    """The one message for weights that fit a torchvision and a timm model alike."""
    timm_pre = timm_models.preprocess_for_name(choice.twin)
    also = f" (and timm's {', '.join(choice.others)})" if choice.others else ""
    chosen, other = ("timm's", f"torchvision's, choose the architecture {arch}") if choice.timm_name else         ("torchvision's", f"timm's, choose the architecture {timm_models.PREFIX}{choice.twin}")
    return (f"the weights fit both torchvision's {arch} and timm's {choice.twin}{also}: the same layer names and "
            f"shapes, but other preprocessing. torchvision's: {_pre_text(tv_pre)}; timm's: {_pre_text(timm_pre)}. "
            f"phpn took {chosen} because {choice.reason}. For {other} (the Architecture fields on the app's Model "
            "page, --arch on the command line, arch= in Python)")


def _load_timm(sd: dict, arch: str, num_classes, sha256: str, source: str, notes: list) -> LoadedModel:

    last = None
    for view, _prefix in _views(sd):
        try:
            model, name, rows, pre, more = timm_models.load(view, arch, num_classes)
        except CheckpointError as err:
            last = last or err
            continue
        return LoadedModel(model=model, arch=name, num_classes=rows, sha256=sha256, preprocess=pre,
                           class_names=imagenet_categories() if rows == 1000 else None, source=source,
                           notes=notes + more)
    raise last


def load_torchvision(state_dict: Mapping, arch: Optional[str] = None, num_classes: Optional[int] = None):
    """Build ``arch`` (inferred when None) and load ``state_dict`` strictly.

    Returns ``(model, arch, num_classes, notes)``; the model is in eval mode on the CPU.
    """
    sd = normalise_state_dict(state_dict)
    notes = []
    if arch is None:
        arch, rows, sd = _infer(sd)
        notes.append(f"architecture inferred from the weight names and shapes: {arch}")
    else:
        arch = canonical_arch(arch)
        sd, rows = _fit_named_arch(sd, arch)
    if num_classes is not None and int(num_classes) != rows:
        raise CheckpointError(
            f"You asked for {num_classes} classes but the checkpoint's head ({_signature(arch).head_weight}) "
            f"has {rows} rows, i.e. {rows} classes.",
            f"Drop --num-classes or set it to {rows}.",
        )
    return _instantiate(arch, rows, sd), arch, rows, notes


def _fit_named_arch(sd: dict, arch: str) -> tuple[dict, int]:
    first_diff = None
    for view, _prefix in _views(sd):
        diff = _compare(view, arch)
        if diff.size == 0:
            return view, head_rows(view, arch)
        first_diff = first_diff or diff
    suggestion = ""
    try:
        guessed, _ = infer_arch(sd)
        suggestion = f" The weights look like {guessed}: try --arch {guessed}."
    except CheckpointError:
        suggestion = " If it is your own architecture, give its code with --model-def FILE.py:FACTORY."
    raise CheckpointError(
        f"The checkpoint does not fit {arch}: {first_diff.describe()}.{suggestion}",
        "Check --arch.",
    )


def _instantiate(arch: str, num_classes: int, sd: dict) -> nn.Module:
    # Build without allocating, then take the checkpoint's tensors as the parameters
    # (assign=True): no random initialisation of millions of weights that are overwritten.
    model = build_model(arch, num_classes, empty=True)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:  # _compare passed, so this is unexpected; say what torch said
        raise CheckpointError(f"Loading the weights into {arch} failed: {_first_line(str(exc))}",
                              "Check --arch.") from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = build_model(arch, num_classes)  # something not in the state dict was left unallocated
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text)[:300]


def default_preprocess(arch: str, sha256: str = "") -> Preprocess:
    """Resize/crop/mean/std of torchvision's reference weights for ``arch`` (metadata only)."""
    return default_preprocess_with_notes(arch, sha256)[0]


def _weights_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    interpolation = getattr(t.interpolation, "value", "bilinear")
    # torchvision's ImageClassification resizes a PIL image with Pillow, as phpn's "pil" backend does.
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]),
                      mean=tuple(float(m) for m in t.mean), std=tuple(float(s) for s in t.std),
                      interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
                      backend="pil", crop_offset="round", source=f"torchvision {weights}.transforms()")


def _weights_hash(weights) -> str:
    # torchvision names its files NAME-<first 8 hex digits of the file's SHA-256>.pth
    match = re.search(r"-([0-9a-f]{8,})\.pth$", getattr(weights, "url", "") or "")
    return match.group(1) if match else ""


def default_preprocess_with_notes(arch: str, sha256: str = "") -> tuple:
    """``(Preprocess, notes)``: the transforms of the torchvision weights this file is (told by its
    SHA-256, as torchvision's file names record it), else of the DEFAULT weights, saying which
    other weights would preprocess differently."""
    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = list(enum)
        default = enum.DEFAULT
    except (ValueError, KeyError, AttributeError, TypeError):
        return Preprocess(source="ImageNet defaults"), ["preprocessing: ImageNet defaults (resize 256, crop 224)"]
    if sha256:
        for w in weights:
            h = _weights_hash(w)
            if h and sha256.lower().startswith(h):
                pre = _weights_preprocess(w)
                return pre, [f"the checkpoint is torchvision's {w} (its SHA-256 starts with {h})",
                             f"preprocessing: {pre.describe()}"]
    pre = _weights_preprocess(default)
    notes = [f"preprocessing: {pre.describe()}"]
    others = {}
    for w in weights:
        other = _weights_preprocess(w)
        if other != pre:
            others[str(w).split(".")[-1]] = other
    if others:
        shown = "; ".join(f"{n}: resize {o.resize}, crop {o.crop}, {o.interpolation}" for n, o in others.items())
        notes.append(f"torchvision's {arch} weights differ in preprocessing ({shown}) and the checkpoint does not "
                     f"say which it was trained like; phpn uses {str(default).split('.')[-1]}'s. "
                     "If yours was trained otherwise, pass --resize/--crop/--interpolation")
    return pre, notes


def imagenet_categories() -> list:
    """The 1000 ImageNet class names, from torchvision's metadata (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(arch: str, num_classes: int) -> Optional[list]:
    if num_classes != 1000:
        return None
    try:
        return list(torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError):
        return imagenet_categories()
