"""Runs on disk: what discovery produced, saved atomically, loaded without pickle.

A run is a folder:
  tensors.safetensors   prototypes (Cd, k, D) float64, nmf_prototypes, alpha, class_indices,
                        head_rows (Cd, D) of the decomposed classes and head_bias (C,)
  run.json              model identity (checkpoint sha256), class names, preprocessing, every
                        setting and seed, timings, per-class statistics, top patches, certificate

It is written to a temporary sibling folder and renamed into place, so a crash or a cancel
never leaves a half-written run. phpn never writes over anything it did not write: an
existing file or foreign folder is refused, an existing run is replaced only on request.
run.json records the sha256 of the tensors file; opening a run checks it, the schema,
finiteness and that the prototypes still sum to the head rows.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save

from .certify import MAX_HEAD_ERROR
from .errors import RunError
from .models.checkpoint import file_sha256

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
META = "run.json"
ANNOTATIONS = "annotations.json"  # the expert's notes on the prototypes, kept beside the run
RUN_FILES = (TENSORS, META, ANNOTATIONS)  # everything phpn writes in a run folder
TENSOR_NAMES = ("prototypes", "nmf_prototypes", "alpha", "class_indices", "head_rows", "head_bias")


@dataclass
class Run:
    prototypes: torch.Tensor  # (Cd, k, D) float64, Σ_k = head_rows
    nmf_prototypes: torch.Tensor  # (Cd, k, D) unit rows
    alpha: torch.Tensor  # (Cd, k)
    class_indices: torch.Tensor  # (Cd,) long
    head_rows: torch.Tensor  # (Cd, D) the decomposed classes' head rows, in the model's precision
    head_bias: torch.Tensor  # (C,)
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def class_names(self) -> list:
        from .defaults import class_names_or_indices

        return class_names_or_indices(self.meta.get("model", {}).get("class_names"), self.head_bias.shape[0])

    @property
    def checkpoint_sha256(self) -> str:
        return self.meta.get("model", {}).get("sha256", "")

    def class_meta(self, class_index: int) -> dict:
        for entry in self.meta.get("classes", []):
            if entry["index"] == int(class_index):
                return entry
        raise RunError(f"Class {class_index} is not in this run.", "Pick one of the run's classes.")

    def head_error(self) -> torch.Tensor:
        """(Cd,) ‖Σ p̃ − v‖ / ‖v‖ per decomposed class."""
        v = self.head_rows.double()
        return (self.prototypes.double().sum(1) - v).norm(dim=1) / v.norm(dim=1).clamp(min=1e-30)

    def network(self, split):
        from .network import PrototypeNetwork

        check_split(self, split)
        return PrototypeNetwork(split, self.prototypes, self.class_indices)


def check_split(run: Run, split) -> None:
    """Refuse a model whose head is not the one the run decomposed."""
    w = split.weight.detach().double().cpu()
    expected = (run.head_bias.shape[0], run.head_rows.shape[1])
    if tuple(w.shape) != expected:
        raise RunError(
            f"This run was made for a head of shape {expected}, but the loaded model's head is {tuple(w.shape)}.",
            "Load the run with the checkpoint it was made from, or run discovery again.",
        )
    rows = run.head_rows.double()
    diff = max((w[run.class_indices] - rows).abs().max().item(),
               (split.bias.detach().double().cpu() - run.head_bias.double()).abs().max().item())
    if diff > 1e-5 * max(1.0, rows.abs().max().item()):
        raise RunError("The loaded model's head weights differ from those this run decomposed.",
                       "Load the run with the checkpoint it was made from, or run discovery again.")


def is_run_folder(path) -> bool:
    """True when ``path`` is a folder phpn wrote as a run (its run.json is phpn's)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not (path / META).is_file():
        return False
    try:
        with open(path / META, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta


def check_run_target(path, overwrite: bool = False) -> Path:
    """Refuse a target phpn may not write to; call it before long work so a bad ``--out``
    fails at once. Accepted: a new path, an empty folder, or (with ``overwrite``) a run phpn
    wrote that holds nothing else. Never accepted: a file, a link, a folder with other files."""
    path = Path(path)
    if path.is_symlink():
        raise RunError(f"{path} is a symbolic link; phpn does not write runs through links.",
                       "Choose a new folder for the run.")
    if path.exists():
        if not path.is_dir():
            raise RunError(f"{path} exists and is a file, not a phpn run; phpn will not replace it.",
                           "Choose a new folder for the run.")
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            if not is_run_folder(path):
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise RunError(f"{path} is a folder that is not a phpn run (it holds {shown}); phpn will not "
                               "write into it.", "Choose a new or empty folder for the run.")
            foreign = [name for name in entries if name not in RUN_FILES]
            if foreign:
                raise RunError(f"The run folder {path} also holds files phpn did not write "
                               f"({', '.join(foreign[:5])}); phpn will not replace it.",
                               "Move those files away or choose a new folder.")
            if not overwrite:
                raise RunError(f"{path} already holds a phpn run.",
                               "Choose a new folder, or replace it on purpose (--overwrite on the command line, "
                               "overwrite=True in Python).")
            if (path / ANNOTATIONS).exists():
                raise RunError(f"The run at {path} carries prototype notes ({ANNOTATIONS}) that would no longer "
                               "match a new run.", "Save the new run to another folder, or move the notes away first.")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise RunError(f"Cannot create {path}: {parent} is a file, not a folder.", "Choose another place for the run.")
    try:  # os.access is not enough (root, read-only mounts, ACLs): really try
        probe = tempfile.mkdtemp(prefix=".phpn-write-check.", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise RunError(f"Cannot write a run under {parent} ({exc.strerror or type(exc).__name__}).",
                       "Choose a folder you can write to.") from None
    return path


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _plain(value):
    """JSON for numpy numbers and arrays (a caller's settings may hold them)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot be written to {META}")


def _write_fsync(path: Path, write) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_run(run: Run, path, overwrite: bool = False) -> Path:
    """Write ``run`` to the folder ``path`` atomically: a complete run appears or nothing does.

    A new run is written to a temporary sibling folder and renamed into place. Replacing an
    existing run (``overwrite=True``) swaps its two files, run.json last; the checksum of the
    tensors in run.json makes an interrupted swap a refused run, never a wrong one. Anything
    phpn did not write is refused (:func:`check_run_target`), never renamed or deleted.
    """
    path = Path(path)
    check_run_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(run.meta)
    meta["format_version"] = FORMAT_VERSION
    tensors = {
        "prototypes": run.prototypes.double().contiguous().cpu(),
        "nmf_prototypes": run.nmf_prototypes.float().contiguous().cpu(),
        "alpha": run.alpha.double().contiguous().cpu(),
        "class_indices": run.class_indices.long().contiguous().cpu(),
        "head_rows": run.head_rows.contiguous().cpu(),
        "head_bias": run.head_bias.contiguous().cpu(),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_fsync(tmp / TENSORS, lambda fh: fh.write(save(tensors)))
        meta["tensors_sha256"] = file_sha256(tmp / TENSORS)
        _write_fsync(tmp / META, lambda fh: fh.write(json.dumps(meta, indent=1, default=_plain).encode("utf-8")))
        if is_run_folder(path):
            check_run_target(path, overwrite)  # still only phpn's files, just before the swap
            os.replace(tmp / TENSORS, path / TENSORS)
            os.replace(tmp / META, path / META)
            os.rmdir(tmp)
        else:
            try:
                os.replace(tmp, path)  # onto nothing or an empty folder only
            except OSError as exc:
                raise RunError(f"{path} was created by something else while the run was being written "
                               f"({exc.strerror}); phpn left it as it was.", "Save the run to a new folder.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run.meta = meta
    run.path = path
    return path


def load_run(path, expected_sha256: Optional[str] = None) -> Run:
    """Open a saved run, verifying it: files, schema, checksum, shapes, finiteness, Σ p̃ = v.

    Every failure is a :class:`RunError` that names the problem.
    """
    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / META).is_file():
        raise RunError(f"{path} is not a phpn run (it needs {TENSORS} and {META}).",
                       "Pick a folder written by 'python -m phpn discover' or the app's Save button.")
    try:
        with open(path / META, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RunError(f"The run at {path} is damaged: {META} is not readable JSON ({type(exc).__name__}: {exc}).",
                       "Run discovery again.") from None
    if not isinstance(meta, dict):
        raise RunError(f"The run at {path} is damaged: {META} holds a {type(meta).__name__}, not an object.",
                       "Run discovery again.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(f"The run at {path} has format {meta.get('format_version')}, this phpn reads {FORMAT_VERSION}.",
                       "Run discovery again with this version.")
    recorded = meta.get("tensors_sha256")
    if recorded is not None and recorded != file_sha256(path / TENSORS):
        raise RunError(f"The run at {path} is damaged: {TENSORS} does not match the checksum recorded in {META} "
                       "(it was changed or corrupted after saving).", "Run discovery again.")
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:
        raise RunError(f"The run at {path} is damaged ({type(exc).__name__}: {exc}).", "Run discovery again.") from None
    missing = set(TENSOR_NAMES) - set(tensors)
    if missing:
        raise RunError(f"The run at {path} lacks {', '.join(sorted(missing))}.", "Run discovery again.")
    run = Run(meta=meta, path=path, **{name: tensors[name] for name in TENSOR_NAMES})
    problem = run_problem(run)
    if problem:
        raise RunError(f"The run at {path} is not valid: {problem}.", "Run discovery again.")
    if expected_sha256 and run.checkpoint_sha256 and expected_sha256 != run.checkpoint_sha256:
        raise RunError(
            f"This run was made from a different checkpoint (sha256 {run.checkpoint_sha256[:12]}…, "
            f"the loaded one is {expected_sha256[:12]}…).",
            "Load the checkpoint the run was made from, or run discovery again for this one.",
        )
    return run


def run_problem(run: Run) -> str:
    """What is wrong with a run's tensors and metadata, or "" when it is consistent."""
    return _tensor_problem(run) or _meta_problem(run.meta, run)


def _tensor_problem(run: Run) -> str:
    p, nmf_p, alpha = run.prototypes, run.nmf_prototypes, run.alpha
    idx, rows, bias = run.class_indices, run.head_rows, run.head_bias
    if p.ndim != 3 or bias.ndim != 1 or idx.ndim != 1 or rows.ndim != 2:
        return "its tensors have the wrong number of dimensions"
    cd, k, d = p.shape
    shapes = {"nmf_prototypes": (nmf_p, (cd, k, d)), "alpha": (alpha, (cd, k)), "class_indices": (idx, (cd,)),
              "head_rows": (rows, (cd, d))}
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            return f"{name} has shape {tuple(t.shape)}, expected {shape}"
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        return "class_indices are not integers"
    c = bias.shape[0]
    if cd and (int(idx.min()) < 0 or int(idx.max()) >= c or len(set(idx.tolist())) != cd):
        return f"class_indices must be distinct classes between 0 and {c - 1}"
    for name in ("prototypes", "nmf_prototypes", "alpha", "head_rows", "head_bias"):
        t = getattr(run, name)
        if not t.dtype.is_floating_point:
            return f"{name} is not a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} contains NaN or infinite values"
    error = float(run.head_error().max()) if cd else 0.0
    if error > MAX_HEAD_ERROR:
        return (f"its prototypes do not sum to the head rows they decompose (relative error {error:.2g}, "
                f"allowed {MAX_HEAD_ERROR:g})")
    return ""


def _meta_problem(meta: dict, run: Run) -> str:
    c = run.head_bias.shape[0]
    model = meta.get("model", {})
    if not isinstance(model, dict):
        return f"{META}'s 'model' is not an object"
    names = model.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        return f"{META}'s model.class_names is not a list of names"
    if names is not None and len(names) != c:
        return f"{META} names {len(names)} classes but the head has {c}"
    for key in ("arch", "sha256", "feature_layer", "head_layer"):
        if key in model and not isinstance(model[key], str):
            return f"{META}'s model.{key} is not text"
    try:
        from .data import Preprocess
        from .inputs import TensorInput

        if "given" in meta["preprocess"]:  # images preprocessed by the caller (phpn.decompose on tensors)
            TensorInput.from_dict(meta["preprocess"])
        else:
            Preprocess.from_dict(meta["preprocess"])
    except Exception as exc:  # missing, wrong type or out of range: all the same to the user
        return f"{META}'s 'preprocess' is missing or invalid ({type(exc).__name__}: {exc})"
    classes = meta.get("classes")
    if not isinstance(classes, list) or not all(isinstance(e, dict) for e in classes):
        return f"{META}'s 'classes' is not a list of class records"
    indices = [e.get("index") for e in classes]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return f"{META}'s class records lack an integer 'index'"
    if indices != run.class_indices.tolist():
        return f"{META}'s class records ({len(indices)}) do not match the run's decomposed classes"
    k = run.prototypes.shape[1]
    for entry in classes:
        for key in ("fidelity", "alpha", "mean_contribution"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != k
                                      or not all(isinstance(v, (int, float)) for v in value)):
                return f"class {entry['index']}'s '{key}' is not a list of {k} numbers"
        for key in ("paths", "top_patches"):
            if key in entry and not isinstance(entry[key], list):
                return f"class {entry['index']}'s '{key}' is not a list"
        if "folder" in entry and not isinstance(entry["folder"], str):
            return f"class {entry['index']}'s 'folder' is not text"
    for key in ("data", "config", "timings", "certificate"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            return f"{META}'s '{key}' is not an object"
    return ""


def check_model(run: Run, loaded, split) -> None:
    """Refuse a model other than the one the run decomposed: another architecture or cut over
    the same weights would explain with another feature map."""
    model = run.meta.get("model", {})
    now = {"arch": loaded.arch, "feature_layer": split.feature_layer, "head_layer": split.head_layer}
    for key, label in (("arch", "architecture"), ("feature_layer", "feature layer"), ("head_layer", "head layer")):
        recorded = model.get(key)
        if recorded is not None and now[key] is not None and recorded != now[key]:
            raise RunError(f"This run was made with the {label} '{recorded}', but the model opened now has "
                           f"'{now[key]}'.", "Open the run with the same architecture and layers it was made with "
                                            "(--arch / --model-def / --feature-layer), or run discovery again.")
    check_split(run, split)
