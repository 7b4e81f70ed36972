"""Reading checkpoint files safely.

A checkpoint is read with ``torch.load(..., weights_only=True)`` (tensors and plain
containers only, no code runs) or with safetensors. Only when the caller passes
``trust_pickle=True`` is the file unpickled in full, which can run arbitrary code: that is
how a whole pickled ``nn.Module`` is read, and it must stay an explicit user choice
(``--trust-pickle`` on the CLI, a checkbox in the app).

Whatever wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's
``module.`` prefix, ``torch.compile``'s ``_orig_mod.`` prefix) is peeled off here, so the
rest of phpn sees a plain ``{name: tensor}`` dict.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from phpn.errors import CheckpointError
from phpn.models.archive import (
    sniff_zip,  # what an uploaded or given zip holds: one home
)

# Keys under which training scripts commonly nest the weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
# Prefixes added by wrappers that do not change the architecture.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

TRUST_HINT = (
    "If you trust where this file came from, load it with --trust-pickle on the command line "
    "(or tick 'trust this checkpoint' in the app); unpickling can run arbitrary code, so never "
    "do this for a file from an unknown source. Better: re-save it as a state dict with "
    "torch.save(model.state_dict(), path)."
)
RESAVE_HINT = ("Check that the file is complete (re-download or re-copy it) and that it was written with "
               "torch.save or safetensors.")

_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
# Costs refused before anything is parsed or built. A real model's safetensors header takes about
# 100 bytes per tensor: the largest public models stay under 2 MB and 20,000 tensors.
MAX_SAFETENSORS_HEADER_BYTES = 16 * 2 ** 20
MAX_SAFETENSORS_TENSORS = 100_000


@dataclass
class Checkpoint:
    """What a checkpoint file held: a state dict, or (trusted pickle only) a whole module."""

    state_dict: Optional[dict]
    module: Optional[nn.Module]
    sha256: str
    path: Path
    format: str  # "torch-zip", "torch-legacy", "safetensors", "pickled-module"
    # Plain values saved beside the weights ({"arch": ..., "pretrained_cfg": {...}}) or a
    # safetensors header's metadata: evidence of which library's model the weights are.
    metadata: dict = field(default_factory=dict)


def file_sha256(path) -> str:
    """SHA-256 of the file's bytes, read in chunks so large checkpoints stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path, *, trust_pickle: bool = False) -> tuple[dict, str]:
    """Read ``path`` and return ``(state_dict, sha256)``; the state dict maps names to CPU tensors.

    A whole pickled module is accepted only with ``trust_pickle=True``; its state dict is returned.
    """
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle)
    if ckpt.module is not None:
        return strip_wrapper_prefixes(dict(ckpt.module.state_dict())), ckpt.sha256
    return ckpt.state_dict, ckpt.sha256


def read_checkpoint(path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read ``path`` into a :class:`Checkpoint`; every failure is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The checkpoint {path} does not exist.", "Check the path.")
    if not path.is_file():
        raise CheckpointError(f"The checkpoint {path} is not a file.",
                              "Give the path of a .pt, .pth, .bin or .safetensors file.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"The checkpoint {path} is empty (0 bytes).", RESAVE_HINT)

    sha256 = file_sha256(path)
    with open(path, "rb") as f:
        head = f.read(16)

    if _looks_like_safetensors(head, size) or path.suffix.lower() == ".safetensors":
        return Checkpoint(_read_safetensors(path), None, sha256, path, "safetensors",
                          _safetensors_metadata(path))

    fmt = "torch-zip" if head.startswith(_ZIP_MAGIC) else "torch-legacy"
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return Checkpoint(None, obj.cpu(), sha256, path, "pickled-module")
    found = find_state_dict(obj)
    if isinstance(found, nn.Module):  # e.g. {"model": <pickled module>, "epoch": 3}
        return Checkpoint(None, found.cpu(), sha256, path, "pickled-module")
    if found is None:
        raise CheckpointError(f"{path.name} holds {_describe(obj)}, but no weights (a dict of tensors) were found "
                              "in it.",
                              "Save the weights with torch.save(model.state_dict(), path).")
    state_dict = {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(found).items()}
    return Checkpoint(state_dict, None, sha256, path, fmt, plain_values(obj) if obj is not found else {})


def _is_plain(value, depth: int = 0) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)) and depth < 3:
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping) and depth < 3:
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def plain_values(obj) -> dict:
    """The plain (JSON-like) entries of a checkpoint dict beside its weights."""
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and _is_plain(v)}


def _safetensors_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # the weights were read; metadata is only evidence
        return {}


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with "{".
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def check_safetensors_header(path) -> None:
    """Refuse a safetensors file whose header is larger, or lists more tensors, than any real
    model's, before the safetensors library parses it (a huge header costs minutes)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is too short to be a safetensors file.", RESAVE_HINT)
        size = int.from_bytes(head, "little")
        if size > MAX_SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(f"{path.name} has a safetensors header of {size / 2 ** 20:.1f} MB, more than the "
                                  f"{MAX_SAFETENSORS_HEADER_BYTES // 2 ** 20} MB limit (real models need under 2 MB).",
                                  RESAVE_HINT)
        header = f.read(size)
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (its header is not JSON: {exc}).",
                              RESAVE_HINT) from None
    count = len(entries) - ("__metadata__" in entries) if isinstance(entries, dict) else 0
    if count > MAX_SAFETENSORS_TENSORS:
        raise CheckpointError(f"{path.name} lists {count:,} tensors, more than the {MAX_SAFETENSORS_TENSORS:,} "
                              "limit for one model file.", RESAVE_HINT)


def _read_safetensors(path: Path) -> dict:
    check_safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError and friends: the file is damaged or not safetensors
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({type(exc).__name__}: {exc}).",
                              RESAVE_HINT) from None
    if not tensors:
        raise CheckpointError(f"{path.name} is a safetensors file with no tensors in it.", RESAVE_HINT)
    return strip_wrapper_prefixes(tensors)


def _torch_load(path: Path, trust_pickle: bool):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol and deprecation chatter, not the user's problem
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        text = str(exc)
        if not trust_pickle and "Weights only load failed" in text:
            raise CheckpointError(_unsafe_content_problem(path, text), TRUST_HINT) from None
        if trust_pickle and isinstance(exc, (AttributeError, ModuleNotFoundError)):
            raise CheckpointError(
                f"{path.name} holds a pickled model whose class cannot be found here ({exc}).",
                "Run phpn where that code is importable, or re-save the weights with "
                "torch.save(model.state_dict(), path) and give the architecture with --arch or --model-def.",
            ) from None
        if zipfile.is_zipfile(path) and sniff_zip(path) == "model-folder-zip":
            raise CheckpointError(f"{path.name} is not a checkpoint: it is a zipped Hugging Face model folder.",
                                  "Unzip it and give the folder (--checkpoint FOLDER), or upload the zip on the "
                                  "app's Model page.") from None
        detail = _first_line(text) or type(exc).__name__
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint, or it is damaged ({type(exc).__name__}: {detail}).",
            RESAVE_HINT,
        ) from None


def _unsafe_content_problem(path: Path, text: str) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match is None:
        return (f"{path.name} contains pickled data that the safe loader (weights_only=True) does not accept; "
                "it may not be a PyTorch checkpoint at all.")
    name = match.group(1)
    looks_like_model = (name.startswith("torch.nn.modules.") or ".models." in f".{name}"
                        or bool(re.search(r"\.\w*(Net|Model|Module|Former|Transformer|Classifier)\w*$", name)))
    what = "a whole pickled model" if looks_like_model else "pickled Python objects besides tensors"
    return (f"{path.name} contains {what} (first found: {name}), not just weights, "
            "and reading it would mean running code from the file.")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in list(obj)[:8]]
        return f"a dict with keys {keys}" if keys else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _is_tensor_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()))


def find_state_dict(obj, _depth: int = 0):
    """The dict of tensors inside a checkpoint object (or a module found there), else None."""
    if isinstance(obj, nn.Module) or _is_tensor_dict(obj):
        return obj
    if not isinstance(obj, Mapping) or _depth > 3:
        return None
    for key in WRAPPER_KEYS:
        if key in obj:
            found = find_state_dict(obj[key], _depth + 1)
            if found is not None:
                return found
    # Weights saved side by side with a few plain values ({"conv.weight": ..., "epoch": 3}).
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) >= 2 and 2 * len(tensors) >= len(obj):
        return tensors
    return None


def strip_wrapper_prefixes(state_dict: Mapping) -> dict:
    """Drop ``module.`` / ``_orig_mod.`` prefixes (in any nesting) when every key carries them."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def strip_common_prefix(state_dict: Mapping) -> tuple[dict, str]:
    """Drop a first name component shared by every key ("model.", "backbone.", ...).

    Used only as a second try when a state dict does not fit as it is: Lightning and many
    training scripts keep the network under one attribute.
    """
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) != 1 or any("." not in k for k in state_dict):
        return dict(state_dict), ""
    prefix = firsts.pop() + "."
    return {k[len(prefix):]: v for k, v in state_dict.items()}, prefix
