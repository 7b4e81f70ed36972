"""Discovery progress on disk, one group of classes at a time, so an interrupted discovery resumes.

A progress folder holds ``progress.json`` (a fingerprint of everything that decides the
result: model, cut, preprocessing, settings, images, groups) and, per finished group,
``group-00007.safetensors`` + ``group-00007.json`` (the json is written last and marks the
group complete). Resuming with a different fingerprint is refused; a folder without
``progress.json`` is never touched, since phpn did not write it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save

from phpn.atomic import TEMP_SUFFIX, check_may_write, write_atomic
from phpn.errors import ConfigError, RunError

MANIFEST = "progress.json"
_TENSORS = ("prototypes", "nmf_prototypes", "alpha", "pooled", "logits", "labels")


@dataclass
class GroupResult:
    """What discovery keeps of one group of classes (and, for the certificate, of its images)."""

    index: int
    records: list  # the run's per-class entries
    prototypes: torch.Tensor  # (G, k, D) float64
    nmf_prototypes: torch.Tensor  # (G, k, D)
    alpha: torch.Tensor  # (G, k)
    pooled: torch.Tensor  # (n, D) float32 pooled features of the group's images (empty without certificate)
    logits: torch.Tensor  # (n, C) the model's own logits for them
    labels: torch.Tensor  # (n,) each image's class index
    skipped: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def progress_dir_for(out) -> Path:
    """Where discovery for the run folder ``out`` keeps its progress: a hidden sibling."""
    out = Path(out)
    return out.parent / f".{out.name}.progress"


class ProgressStore:
    def __init__(self, path, key: str, resume: bool):
        self.path, self.key = Path(path), key
        check_may_write(self.path, what="phpn discovery progress folder", ours=lambda p: (p / MANIFEST).is_file(),
                        error=RunError, fix="Move it away or choose another --out.")
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError):
                saved = {}
            if resume and saved.get("fingerprint") != key:
                raise ConfigError(
                    f"The progress saved in {self.path} was made with another model, images or settings.",
                    "Resume with exactly the same command, or run without --resume to start over.")
            if not resume:
                self.clear()
        if not manifest.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / MANIFEST, json.dumps({"fingerprint": key}).encode())

    def _name(self, index: int) -> str:
        return f"group-{index:05d}"

    def finished(self) -> dict:
        """{group index: GroupResult} for every group saved completely."""
        out = {}
        for meta_file in sorted(self.path.glob("group-*.json")):
            tensors_file = meta_file.with_suffix(".safetensors")
            try:
                meta = json.loads(meta_file.read_text())
                tensors = load_file(str(tensors_file))
            except Exception:  # a damaged group is simply done again
                continue
            out[int(meta["index"])] = GroupResult(index=int(meta["index"]), records=meta["records"],
                                                  skipped=[tuple(s) for s in meta["skipped"]],
                                                  timings=meta["timings"], **{k: tensors[k] for k in _TENSORS})
        return out

    def save(self, result: GroupResult) -> None:
        name = self._name(result.index)
        tensors = {k: getattr(result, k).contiguous().cpu() for k in _TENSORS}
        write_atomic(self.path / f"{name}.safetensors", save(tensors))
        meta = {"index": result.index, "records": result.records, "skipped": [list(s) for s in result.skipped],
                "timings": result.timings}
        write_atomic(self.path / f"{name}.json", json.dumps(meta).encode())

    def clear(self) -> None:
        _clear(self.path)


def _clear(path: Path) -> None:
    """Remove a progress folder: only the files phpn writes there, then the folder if empty."""
    for p in list(path.glob("group-*.json")) + list(path.glob("group-*.safetensors")) \
            + list(path.glob(f".*{TEMP_SUFFIX}")) + [path / MANIFEST]:
        p.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # something else is in there: leave it


def open_store(path: Optional[Path], key: str, resume: bool) -> Optional[ProgressStore]:
    return ProgressStore(path, key, resume) if path is not None else None


def discard_progress(path) -> None:
    """Remove a finished discovery's progress folder (only if phpn wrote it)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        _clear(path)
