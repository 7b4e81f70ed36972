"""Runs on disk: what discovery produced, saved atomically, loaded without pickle.

A run is a folder:
  tensors.safetensors   prototypes (Cd, k, D) float64, nmf_prototypes, alpha, class_indices,
                        head_rows (Cd, D) of the decomposed classes and head_bias (C,)
  run.json              model identity (checkpoint sha256), class names, preprocessing, every
                        setting and seed, timings, per-class statistics, top patches, certificate

It is written to a temporary sibling folder and renamed into place, so a crash or a cancel
never leaves a half-written run, and an existing run is only replaced once the new one is
complete.
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
from safetensors.torch import load_file, save_file

from .errors import RunError

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
META = "run.json"


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
        return self.meta.get("model", {}).get("class_names") or [str(i) for i in range(self.head_bias.shape[0])]

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


def save_run(run: Run, path) -> Path:
    path = Path(path)
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
        save_file(tensors, str(tmp / TENSORS))
        with open(tmp / META, "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run.path = path
    return path


def load_run(path, expected_sha256: Optional[str] = None) -> Run:
    path = Path(path)
    if not (path / TENSORS).is_file() or not (path / META).is_file():
        raise RunError(f"{path} is not a phpn run (it needs {TENSORS} and {META}).",
                       "Pick a folder written by 'python -m phpn discover' or the app's Save button.")
    try:
        with open(path / META) as fh:
            meta = json.load(fh)
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:
        raise RunError(f"The run at {path} is damaged ({type(exc).__name__}: {exc}).", "Run discovery again.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(f"The run at {path} has format {meta.get('format_version')}, this phpn reads {FORMAT_VERSION}.",
                       "Run discovery again with this version.")
    missing = {"prototypes", "nmf_prototypes", "alpha", "class_indices", "head_rows", "head_bias"} - set(tensors)
    if missing:
        raise RunError(f"The run at {path} lacks {', '.join(sorted(missing))}.", "Run discovery again.")
    run = Run(meta=meta, path=path, **{name: tensors[name] for name in
                                       ("prototypes", "nmf_prototypes", "alpha", "class_indices", "head_rows", "head_bias")})
    if expected_sha256 and run.checkpoint_sha256 and expected_sha256 != run.checkpoint_sha256:
        raise RunError(
            f"This run was made from a different checkpoint (sha256 {run.checkpoint_sha256[:12]}…, "
            f"the loaded one is {expected_sha256[:12]}…).",
            "Load the checkpoint the run was made from, or run discovery again for this one.",
        )
    return run
