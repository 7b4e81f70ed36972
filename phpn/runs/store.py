"""Runs on disk: what discovery produced, saved atomically, loaded without pickle.

A run is a folder (format 2, written by this version):
  run.json                 model identity (checkpoint sha256), class names, preprocessing, every
                           setting and seed, timings, certificate, the run's shape (classes, k, D),
                           and the index of its shards: each shard's files, their sha256 and the
                           classes it holds, in run order
  head-<sha>.safetensors   head_rows (Cd, D) of the decomposed classes in the model's precision,
                           head_bias (C,), class_indices (Cd,)
  shard-NNNNN-<sha>.safetensors  prototypes (n, k, D) float64, nmf_prototypes, alpha of up to
                           about 32 MB of classes
  shard-NNNNN-<sha>.json   those classes' records: statistics, fidelity, top patches, warnings

run.json is read and written through typed records (:mod:`phpn.runs.record`, published as
docs/run.schema.json) and sealed: one sha256 per section (model and class names, preprocessing,
certificate, settings, file index...), so a change to any of them is refused, naming it. Each
data file names the run it belongs to (its safetensors metadata), a shard's tensors also its
records file's sha256; data files are read only as regular files of the run folder, never
through a link. Runs saved before the seal open unsealed (``Run.record.integrity`` says so).

Opening a run (:func:`load_run`) reads run.json and the head file only, so a run of 10,000
classes opens at once; a shard is read, its checksums and contents checked (finite, Σ p̃ = head
rows, image paths relative and inside the image folder) the first time one of its classes is
needed. :func:`verify_run` checks every shard.
Format 1 (one ``tensors.safetensors`` and every class record in run.json, as the demos
shipped before) is still read, and checked whole when opened.

It is written to a temporary sibling folder and renamed into place, so a crash or a cancel
never leaves a half-written run. phpn never writes over anything it did not write: an
existing file or foreign folder is refused, an existing run is replaced only on request. A
replacement writes its data files under new names (each carries its checksum), then run.json,
then removes the old run's files: an interrupted replacement leaves the old run or the new one.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load, save

from phpn.atomic import check_may_write
from phpn.config import class_names_or_indices
from phpn.errors import RunError
from phpn.method.certify import MAX_HEAD_ERROR
from phpn.method.network import LazyPrototypeNetwork, PrototypeNetwork
from phpn.models.checkpoint import file_sha256  # noqa: F401 - a run's checksums are file_sha256's (tests use it here)
from phpn.runs.record import (
    ABSENT,
    DATA_FILE,
    FORMAT_VERSION,
    META,
    READABLE_VERSIONS,
    RunRecord,
    class_record_problem,
    meaning_id,
)

TENSORS = "tensors.safetensors"  # format 1: every tensor in one file
ANNOTATIONS = "annotations.json"  # the expert's notes on the prototypes, kept beside the run
RUN_FILES = (TENSORS, META, ANNOTATIONS)  # the fixed names phpn writes in a run folder (and DATA_FILE's)
# The run's last audit (phpn.runs.audit_record): phpn writes it beside the run but it is not one of
# the run's files (outside the seal, not carried by an import); a replaced run drops it.
AUDIT = "audit.json"
# A data file's safetensors metadata: one key (the file's bytes stay the same from save to save; several
# keys would be written in any order) holding the id of the run it belongs to and, in a shard's tensors
# file, the sha256 of its records file.
FILE_META_KEY = "phpn"
RUN_ID_KEY = "run"
RECORDS_KEY = "records_sha256"

TENSOR_NAMES = ("prototypes", "nmf_prototypes", "alpha", "class_indices", "head_rows", "head_bias")
HEAD_TENSORS = ("head_rows", "head_bias", "class_indices")  # read when a run opens
SHARD_TENSORS = ("prototypes", "nmf_prototypes", "alpha")  # read when one of the shard's classes is needed
SHARD_BYTES = 32 * 2 ** 20  # a shard's tensors stay about this size: reading one class costs one shard
KEPT_SHARDS = 8  # a run opened lazily keeps the tensors of this many shards read last (about 256 MB)


def file_metadata(**named) -> dict:
    """The safetensors metadata of a data file of the run ``run`` (and, for a shard, its records' sha256)."""
    return {FILE_META_KEY: json.dumps(named, sort_keys=True)}


def is_run_file(name: str) -> bool:
    """Whether a file name in a run folder is one phpn writes."""
    return name in RUN_FILES or DATA_FILE.fullmatch(name) is not None


def is_written_beside(name: str) -> bool:
    """Whether a file name in a run folder is one phpn writes there: the run's own, or its audit."""
    return is_run_file(name) or name == AUDIT


@dataclass
class Run:
    """Prototypes and records of a run. One opened from a format-2 folder reads its shards on
    demand: ``class_meta(c)`` and ``class_prototypes(c)`` read the class's shard only; the
    whole tensors (``run.prototypes`` …) and ``meta["classes"]`` iterated to the end read all."""

    prototypes: torch.Tensor  # (Cd, k, D) float64, Σ_k = head_rows
    nmf_prototypes: torch.Tensor  # (Cd, k, D) unit rows
    alpha: torch.Tensor  # (Cd, k)
    class_indices: torch.Tensor  # (Cd,) long
    head_rows: torch.Tensor  # (Cd, D) the decomposed classes' head rows, in the model's precision
    head_bias: torch.Tensor  # (C,)
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None

    def __getattr__(self, name: str):
        # Only reached for attributes not set: the shard tensors of a run opened lazily.
        shards = self.__dict__.get("_shards")
        if shards is not None and name in SHARD_TENSORS:
            for key, value in shards.everything().items():
                self.__dict__.setdefault(key, value)  # a tensor the caller replaced stays replaced
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def k(self) -> int:
        shards = self.__dict__.get("_shards")
        if "prototypes" not in self.__dict__ and shards is not None:
            return shards.k
        return int(self.prototypes.shape[1])

    @property
    def record(self) -> RunRecord:
        """run.json as a typed record (read from ``meta``, checked; the class records apart)."""
        return RunRecord.from_dict({key: value for key, value in self.meta.items() if key != "classes"},
                                   where=str(self.path) if self.path is not None else None)

    # run.json's sections by name, as plain values (the objects ``meta`` holds, unchecked and
    # cheap: pages read them on every rerun; a section absent or null reads as {} or None), so
    # that only phpn.runs knows run.json's keys.

    @property
    def created(self) -> Optional[str]:
        """When discovery finished (ISO 8601, UTC), or None."""
        return self.meta.get("created")

    @property
    def model_info(self) -> dict:
        """The model the run decomposed (arch, sha256, source, class names, cut, diagnosis…), or {}."""
        return self.meta.get("model") or {}

    @property
    def preprocess_info(self) -> dict:
        """The recorded preprocessing (``Preprocess.to_dict()``, or ``{given, …}`` for tensors), or {}."""
        return self.meta.get("preprocess") or {}

    @property
    def data_info(self) -> dict:
        """The images discovery read (root, skipped, class_mapping…), or {}."""
        return self.meta.get("data") or {}

    @property
    def settings(self) -> dict:
        """The discovery settings (``DiscoveryConfig.to_dict()``), or {}."""
        return self.meta.get("config") or {}

    @property
    def timings(self) -> dict:
        """Seconds per stage of discovery, or {}."""
        return self.meta.get("timings") or {}

    @property
    def device(self) -> Optional[str]:
        """The device discovery ran on, or None."""
        return self.meta.get("device")

    @property
    def demo(self) -> Optional[str]:
        """The demo the run was made from, or None."""
        return self.meta.get("demo")

    @property
    def recorded_certificate(self) -> Optional[dict]:
        """The certificate recorded at discovery (on the discovery images) as a dict, or None."""
        return self.meta.get("certificate")

    @property
    def held_out_certificate(self) -> Optional[dict]:
        """The certificate on the held-out images as a dict, or None."""
        return self.meta.get("certificate_held_out")

    @property
    def class_records(self) -> Sequence:
        """Every decomposed class's record, in the run's order (a run opened lazily reads them
        shard by shard as they are iterated); :meth:`class_meta` reads one class's only."""
        return self.meta.get("classes", [])

    @property
    def format_version(self) -> Optional[int]:
        """The run.json format the run was saved in (None before it is saved)."""
        return self.meta.get("format_version")

    @property
    def shard_index(self) -> Optional[list]:
        """Format 2: the run's shards (files, checksums, the classes each holds); None otherwise."""
        return self.meta.get("shards")

    def note_model(self, *, demo: Optional[str], diagnosis: dict) -> None:
        """Record the demo the model came from and how it was read as features + linear head."""
        self.meta["demo"] = demo
        self.meta.setdefault("model", {})["diagnosis"] = diagnosis

    def note_loading(self, *, app_load: Optional[dict] = None, origin: Optional[dict] = None,
                     app_folder: Optional[dict] = None) -> None:
        """Record how the app loaded the model and its images (kept when already there), so
        that a saved run can reopen them: ``app_load`` and ``origin`` in the model section,
        ``app_folder`` in the data section."""
        model = self.meta.setdefault("model", {})
        for key, value in (("app_load", app_load), ("origin", origin)):
            if value is not None:
                model.setdefault(key, value)
        if app_folder is not None:
            self.meta.setdefault("data", {}).setdefault("app_folder", app_folder)

    @property
    def class_names(self) -> list:
        return class_names_or_indices(self.record.class_names, self.head_bias.shape[0])

    @property
    def checkpoint_sha256(self) -> str:
        model = self.record.model
        return (model.sha256 or "") if model else ""

    def _row(self, class_index: int) -> int:
        indices, rows = self.__dict__.get("_rows", (None, None))
        if indices is not self.class_indices:  # built once per class_indices tensor
            indices = self.class_indices
            rows = {int(c): i for i, c in enumerate(indices.tolist())}
            self.__dict__["_rows"] = (indices, rows)
        try:
            return rows[int(class_index)]
        except KeyError:
            raise RunError(f"Class {class_index} is not in this run.", "Pick one of the run's classes.") from None

    def class_meta(self, class_index: int) -> dict:
        """The class's record (statistics, fidelity, top patches); reads its shard only."""
        shards = self.__dict__.get("_shards")
        if shards is not None and self.meta.get("classes") is shards.records:
            return shards.record(self._row(class_index))
        for entry in self.meta.get("classes", []):
            if entry["index"] == int(class_index):
                return entry
        raise RunError(f"Class {class_index} is not in this run.", "Pick one of the run's classes.")

    @property
    def k_label(self) -> str:
        """How many prototypes a class has, for captions: "3", or "up to 5, chosen per class"."""
        auto = self.record.auto_k
        return f"up to {self.k}, chosen per class" if auto else str(self.k)

    def class_k(self, class_index: int) -> int:
        """The class's own number of prototypes: the run's k, or fewer where discovery chose
        each class's k (``--k auto``); the class's remaining slots hold zero prototypes."""
        return int(self.class_meta(class_index).get("k", self.k))

    def class_prototypes(self, class_index: int) -> torch.Tensor:
        """(k, D) the class's prototypes (its own k); reads its shard only."""
        row = self._row(class_index)
        shards = self.__dict__.get("_shards")
        if "prototypes" not in self.__dict__ and shards is not None:
            return shards.tensor("prototypes", row)[:self.class_k(class_index)]
        return self.prototypes[row, :self.class_k(class_index)]

    def head_error(self) -> torch.Tensor:
        """(Cd,) ‖Σ p̃ − v‖ / ‖v‖ per decomposed class."""
        return head_error(self.prototypes, self.head_rows)

    def network(self, split) -> PrototypeNetwork:
        """The decomposed network over every class, on the model's head this run decomposed."""
        check_split(self, split)
        return PrototypeNetwork(split, self.prototypes, self.class_indices)

    def lazy_network(self, split, **options) -> LazyPrototypeNetwork:
        """The network that reads a class's shard only when it is first asked for (large runs)."""
        check_split(self, split)
        return LazyPrototypeNetwork(split, self.class_indices, self.class_prototypes, self.k, **options)


def head_error(prototypes: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    v = head_rows.double()
    return (prototypes.double().sum(1) - v).norm(dim=1) / v.norm(dim=1).clamp(min=1e-30)


def check_split(run: Run, split) -> None:
    """Refuse a model whose head is not the one the run decomposed."""
    w = split.weight.detach()
    expected = (run.head_bias.shape[0], run.head_rows.shape[1])
    if tuple(w.shape) != expected:
        raise RunError(
            f"This run was made for a head of shape {expected}, but the loaded model's head is {tuple(w.shape)}.",
            "Load the run with the checkpoint it was made from, or run discovery again.",
        )
    rows, idx = run.head_rows, run.class_indices
    dtype = torch.promote_types(w.dtype, rows.dtype)
    diff = float((split.bias.detach().cpu().to(dtype) - run.head_bias.to(dtype)).abs().max())
    top = 0.0
    for start in range(0, len(idx), 1024):  # a block of rows at a time, in the head's precision: fast on 10,000 classes
        ours = rows[start:start + 1024].to(dtype)
        theirs = w[idx[start:start + 1024].to(w.device)].cpu().to(dtype)
        diff, top = max(diff, float((theirs - ours).abs().max())), max(top, float(ours.abs().max()))
    if diff > 1e-5 * max(1.0, top):
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
    path = check_may_write(path, what="phpn run", plural="runs", ours=is_run_folder, owned=is_written_beside,
                           fix="Choose a new or empty folder for the run.", error=RunError)
    if path.exists():
        if any(path.iterdir()):
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_file(stem: str, data: bytes, suffix: str) -> tuple:
    """(name, sha256) of a data file: its name carries its checksum, so a replacement never
    writes over a file the current run.json names."""
    digest = _sha256(data)
    return f"{stem}-{digest[:16]}.{suffix}", digest


def _classes_per_shard(k: int, d: int) -> int:
    per_class = k * d * (8 + 4) + k * 8  # float64 prototypes, float32 NMF prototypes, float64 α
    return max(1, SHARD_BYTES // max(1, per_class))


def save_run(run: Run, path, overwrite: bool = False) -> Path:
    """Write ``run`` to the folder ``path`` atomically (format 2): a complete run appears or nothing does.

    A new run is written to a temporary sibling folder and renamed into place. Replacing an
    existing run (``overwrite=True``) moves the new data files in beside the old ones (their
    names differ: each carries its checksum), replaces run.json, then removes the old files, so
    an interrupted replacement leaves a run that opens as the old one or the new one. Anything
    phpn did not write is refused (:func:`check_run_target`), never renamed or deleted.
    """
    path = Path(path)
    check_run_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The tensors first: a run opened lazily reads each shard once for them and keeps its records,
    # so listing the records after reads nothing again and holds no second copy of the tensors.
    prototypes = run.prototypes.double().contiguous().cpu()
    nmf_prototypes = run.nmf_prototypes.float().contiguous().cpu()
    alpha = run.alpha.double().contiguous().cpu()
    records = list(run.meta.get("classes", []))
    meta = {key: value for key, value in run.meta.items() if key not in ("classes", "tensors_sha256", "seal")}
    class_indices = run.class_indices.long().contiguous().cpu()
    cd, k, d = prototypes.shape
    if len(records) != cd:
        raise RunError(f"The run has {cd} decomposed classes but {len(records)} class records; it cannot be saved.",
                       "Run discovery again.")
    meta["format_version"] = FORMAT_VERSION
    meta["shape"] = {"classes": int(run.head_bias.shape[0]), "decomposed": cd, "k": k, "features": d}
    meta = json.loads(json.dumps(meta, default=_plain))  # as run.json will hold it: the seal is over that
    # Each data file names the run it belongs to: the id over run.json's meaning, known before the files.
    run_id = meaning_id(meta)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    written = []  # data files in the temporary folder, run.json apart

    def put(stem: str, data: bytes, suffix: str) -> tuple:
        name, digest = _data_file(stem, data, suffix)
        _write_fsync(tmp / name, lambda fh: fh.write(data))
        written.append(name)
        return name, digest

    try:  # file by file, so that one shard's bytes at a time are in memory beside the run
        head_name, head_sha = put("head", save({"head_rows": run.head_rows.contiguous().cpu(),
                                                "head_bias": run.head_bias.contiguous().cpu(),
                                                "class_indices": class_indices}, metadata=file_metadata(run=run_id)),
                                  "safetensors")
        shards = []
        per = _classes_per_shard(k, d)
        for number, start in enumerate(range(0, cd, per)):
            part = slice(start, start + per)
            problem = _records_problem(records[part], class_indices[part].tolist(), k, "the run")
            if problem:
                raise RunError(f"The run cannot be saved: {problem}.", "Run discovery again.")
            r_name, r_sha = put(f"shard-{number:05d}",
                                json.dumps(records[part], indent=1, default=_plain).encode("utf-8"), "json")
            t_name, t_sha = put(f"shard-{number:05d}", save({"prototypes": prototypes[part].contiguous(),
                                                             "nmf_prototypes": nmf_prototypes[part].contiguous(),
                                                             "alpha": alpha[part].contiguous()},
                                                            metadata=file_metadata(run=run_id, records_sha256=r_sha)),
                                "safetensors")
            shards.append({"file": t_name, "sha256": t_sha, "records": r_name, "records_sha256": r_sha,
                           "classes": class_indices[part].tolist()})
        meta["head"] = {"file": head_name, "sha256": head_sha}
        meta["shards"] = shards
        # One fingerprint of all the tensors.
        meta["tensors_sha256"] = _sha256("\n".join([head_sha] + [s["sha256"] for s in shards]).encode())
        # Checked as it will be read, then sealed: run.json's meaning under one sha256 per section.
        meta = RunRecord.from_dict(meta, where=str(path)).sealed().to_dict()
        text = json.dumps(meta, indent=1).encode("utf-8")
        _write_fsync(tmp / META, lambda fh: fh.write(text))
        if is_run_folder(path):
            check_run_target(path, overwrite)  # still only phpn's files, just before the swap
            old = [p for p in path.iterdir() if p.name not in written and p.name not in (META, ANNOTATIONS)]
            for name in written:
                os.replace(tmp / name, path / name)
            os.replace(tmp / META, path / META)  # the switch from the old run to the new one
            os.rmdir(tmp)
            for stale in old:  # the old run's data files (phpn's own: check_run_target said so)
                stale.unlink(missing_ok=True)
        else:
            try:
                os.replace(tmp, path)  # onto nothing or an empty folder only
            except OSError as exc:
                raise RunError(f"{path} was created by something else while the run was being written "
                               f"({exc.strerror}); phpn left it as it was.", "Save the run to a new folder.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run.meta = {**meta, "classes": records}
    run.path = path
    return path


def _damaged(path: Path, what: str) -> RunError:
    return RunError(f"The run at {path} is damaged: {what}.", "Run discovery again.")


def _invalid(path: Path, problem: str) -> RunError:
    return RunError(f"The run at {path} is not valid: {problem}.", "Run discovery again.")


def _read_regular(path: Path, name: str) -> bytes:
    """A file's bytes, refused unless it is a regular file of the run folder itself (a link is
    never followed: it could lead anywhere on the server)."""
    try:
        # never a link; O_NONBLOCK: a FIFO put in a shard's place is refused below, not waited on
        fd = os.open(path / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _damaged(path, f"{name} is missing") from None
    except OSError as exc:
        if (path / name).is_symlink():
            raise _damaged(path, f"{name} is a link, not a file of the run (phpn never writes links)") from None
        raise _damaged(path, f"{name} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _damaged(path, f"{name} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise _damaged(path, f"{name} cannot be read ({exc.strerror or type(exc).__name__})") from None


def _read_checked(path: Path, name: str, sha256: str) -> bytes:
    """A data file's bytes, refused unless they match the checksum run.json records."""
    data = _read_regular(path, name)
    if _sha256(data) != sha256:
        raise _damaged(path, f"{name} does not match the checksum recorded in {META} (it was changed or corrupted "
                             "after saving)")
    return data


def _read_tensors(path: Path, name: str, sha256: str, names: tuple, run_id: Optional[str] = None,
                  records_sha256: Optional[str] = None) -> dict:
    """A data file's tensors, checked against its checksum and, in a sealed run (``run_id``),
    against the run it names: a file of another run is refused even with a matching checksum."""
    data = _read_checked(path, name, sha256)
    try:
        tensors = load(data)
    except Exception as exc:
        raise _damaged(path, f"{name} is not a tensor file ({type(exc).__name__}: {exc})") from None
    missing = set(names) - set(tensors)
    if missing:
        raise RunError(f"The run at {path} lacks {', '.join(sorted(missing))} in {name}.", "Run discovery again.")
    named = _file_metadata(data)
    if run_id is None:
        if named.get(RUN_ID_KEY):  # only a sealed run's files name their run: its seal was taken away
            raise _invalid(path, f"{META} has no seal, but {name} belongs to a sealed run (the seal was removed "
                                 "after saving)")
    elif named.get(RUN_ID_KEY) != run_id:
        raise _invalid(path, f"{name} belongs to another run (it names run {str(named.get(RUN_ID_KEY))[:12]}…, "
                             f"this run is {run_id[:12]}…)")
    elif records_sha256 is not None and named.get(RECORDS_KEY) != records_sha256:
        raise _invalid(path, f"{name} was saved with other class records than those {META} lists for it")
    return tensors


def _file_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header ({} without one)."""
    try:
        size = int.from_bytes(data[:8], "little")
        named = json.loads(json.loads(data[8:8 + size])["__metadata__"][FILE_META_KEY])
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}
    return named if isinstance(named, dict) else {}


def _json_records(data: bytes):
    """JSON of many small records, parsed with the cyclic garbage collector paused: its passes
    over the objects being made would otherwise cost up to ten times the parse itself."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(data.decode("utf-8"))
    finally:
        if was_enabled:
            gc.enable()


class _Shards:
    """The shards of a format-2 run: each is read, checked and kept the first time one of its
    classes is needed (under a lock: the app may read one run from several threads)."""

    def __init__(self, path: Path, entries: list, head_rows: torch.Tensor, k: int, d: int,
                 run_id: Optional[str] = None):
        self.path, self.entries, self.head_rows, self.k, self.d = path, entries, head_rows, k, d
        self.run_id = run_id  # a sealed run's id: each of its files names it
        self.where = [(number, j) for number, entry in enumerate(entries) for j in range(len(entry["classes"]))]
        self.starts = [0]
        for entry in entries:
            self.starts.append(self.starts[-1] + len(entry["classes"]))
        self._tensors, self._records = {}, {}
        self._lock = threading.Lock()
        self.records = ClassRecords(self)

    def _read(self, number: int) -> tuple:
        entry = self.entries[number]
        name = entry["file"]
        tensors = _read_tensors(self.path, name, entry["sha256"], SHARD_TENSORS, self.run_id,
                                entry["records_sha256"] if self.run_id else None)
        try:
            records = _json_records(_read_checked(self.path, entry["records"], entry["records_sha256"]))
        except ValueError as exc:
            raise _damaged(self.path, f"{entry['records']} is not readable JSON ({exc})") from None
        rows = self.head_rows[self.starts[number]:self.starts[number + 1]]
        n = len(rows)
        shapes = {"prototypes": (n, self.k, self.d), "nmf_prototypes": (n, self.k, self.d), "alpha": (n, self.k)}
        problem = next((f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}"
                        for key, shape in shapes.items() if tuple(tensors[key].shape) != shape), "")
        problem = (problem or _floats_problem({key: tensors[key] for key in SHARD_TENSORS})
                   or _sum_problem(tensors["prototypes"], rows)
                   or _records_problem(records, entry["classes"], self.k, entry["records"]))
        if problem:
            raise _invalid(self.path, f"{problem} ({name})")
        return {key: tensors[key] for key in SHARD_TENSORS}, records

    def _checked(self, number: int, keep: bool = True) -> tuple:
        """(tensors or None, records) of a shard, read and checked the first time it is asked for."""
        with self._lock:
            if number not in self._records:
                tensors, self._records[number] = self._read(number)
                if keep:
                    self._keep(number, tensors)
                return tensors, self._records[number]
            tensors = self._tensors.get(number)
            if tensors is not None:
                self._keep(number, tensors)  # now the most recently used
            return tensors, self._records[number]

    def _keep(self, number: int, tensors: dict) -> None:
        """Keep a shard's tensors, letting go of the least recently used past KEPT_SHARDS (they
        are read again, against their checksum, when needed). Called under the lock."""
        self._tensors.pop(number, None)
        self._tensors[number] = tensors
        while len(self._tensors) > max(1, KEPT_SHARDS):
            del self._tensors[next(iter(self._tensors))]

    def shard_tensors(self, number: int, keep: bool = True) -> dict:
        tensors = self._checked(number, keep)[0]
        if tensors is None:  # checked before without keeping them: the checksum ties these bytes to that check
            entry = self.entries[number]
            tensors = _read_tensors(self.path, entry["file"], entry["sha256"], SHARD_TENSORS, self.run_id,
                                    entry["records_sha256"] if self.run_id else None)
            if keep:
                with self._lock:
                    self._keep(number, tensors)
        return tensors

    def records_of(self, number: int) -> list:
        return self._checked(number)[1]

    def record(self, row: int) -> dict:
        number, j = self.where[row]
        return self.records_of(number)[j]

    def tensor(self, name: str, row: int) -> torch.Tensor:
        number, j = self.where[row]
        return self.shard_tensors(number)[name][j]

    def everything(self) -> dict:
        """The whole tensors of the run, every shard checked; the per-shard copies are let go."""
        cd = self.starts[-1]
        shapes = {"prototypes": (cd, self.k, self.d), "nmf_prototypes": (cd, self.k, self.d), "alpha": (cd, self.k)}
        out = {}
        for number in range(len(self.entries)):  # one shard in memory at a time beside the whole tensors
            tensors = self.shard_tensors(number, keep=False)
            rows = slice(self.starts[number], self.starts[number + 1])
            for name in SHARD_TENSORS:
                if name not in out:
                    out[name] = torch.empty(shapes[name], dtype=tensors[name].dtype)
                out[name][rows] = tensors[name]
            del tensors
        with self._lock:
            self._tensors.clear()
        return {name: out[name] if name in out else torch.zeros(shapes[name], dtype=torch.float64)
                for name in SHARD_TENSORS}

    def verify(self) -> None:
        """Check every shard again (checksums, contents), keeping only the records."""
        for number in range(len(self.entries)):
            with self._lock:
                self._records.pop(number, None)
                self._tensors.pop(number, None)
            self._checked(number, keep=False)


class ClassRecords(Sequence):
    """``meta["classes"]`` of a run opened lazily: a record is read with its shard; iterating
    reads shard after shard."""

    def __init__(self, shards: _Shards):
        self._shards = shards

    def __len__(self) -> int:
        return len(self._shards.where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("class record index out of range")
        return self._shards.record(i % n)

    def __iter__(self):
        for number in range(len(self._shards.entries)):  # the records only: the shard's tensors are let go
            yield from self._shards._checked(number, keep=False)[1]

    def __eq__(self, other) -> bool:  # equal to a list of the same records, as meta["classes"] of a format-1 run
        return isinstance(other, (list, tuple, ClassRecords)) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"<{len(self)} class records, read shard by shard>"


def load_run(path, expected_sha256: Optional[str] = None) -> Run:
    """Open a saved run: its files, schema and head are checked now; a format-2 run's shards are
    read and checked (checksums, finiteness, Σ p̃ = v) when one of their classes is first needed
    (:func:`verify_run` checks them all at once). A format-1 run is checked whole.

    Every failure is a :class:`RunError` that names the problem.
    """
    path = Path(path)
    if not (path / META).is_file() and not (path / META).is_symlink():
        raise RunError(f"{path} is not a phpn run (it has no {META}).",
                       "Pick a folder written by 'python -m phpn discover' or the app's Save button.")
    text = _read_regular(path, META)
    try:
        meta = json.loads(text.decode("utf-8"))
    except ValueError as exc:
        raise RunError(f"The run at {path} is damaged: {META} is not readable JSON ({type(exc).__name__}: {exc}).",
                       "Run discovery again.") from None
    if not isinstance(meta, dict):
        raise RunError(f"The run at {path} is damaged: {META} holds a {type(meta).__name__}, not an object.",
                       "Run discovery again.")
    version = meta.get("format_version")
    if version is None:
        raise RunError(f"The run at {path} is damaged: its {META} has no format_version.", "Run discovery again.")
    if version not in READABLE_VERSIONS:
        raise RunError(f"The run at {path} has format {version}, this phpn reads formats "
                       f"{', '.join(map(str, READABLE_VERSIONS))}.", "Run discovery again with this version.")
    record = RunRecord.from_dict({key: value for key, value in meta.items() if key != "classes"}, where=str(path))
    run = _open_version_1(path, meta) if version == 1 else _open_version_2(path, meta, record)
    check_checkpoint(run, expected_sha256)
    return run


def check_checkpoint(run: Run, sha256: Optional[str]) -> None:
    """Refuse a run made from another checkpoint than the one with ``sha256`` (None: not known)."""
    if sha256 and run.checkpoint_sha256 and sha256 != run.checkpoint_sha256:
        raise RunError(
            f"This run was made from a different checkpoint (sha256 {run.checkpoint_sha256[:12]}…, "
            f"the loaded one is {sha256[:12]}…).",
            "Load the checkpoint the run was made from, or run discovery again for this one.",
        )


def verify_run(path, expected_sha256: Optional[str] = None) -> Run:
    """Open a run and check all of it now, every shard included; returns the opened run."""
    run = load_run(path, expected_sha256)
    shards = run.__dict__.get("_shards")
    if shards is not None:
        shards.verify()
    return run


def _open_version_1(path: Path, meta: dict) -> Run:
    if not (path / TENSORS).is_file():
        raise RunError(f"{path} is not a phpn run (it needs {TENSORS} and {META}).",
                       "Pick a folder written by 'python -m phpn discover' or the app's Save button.")
    recorded = meta.get("tensors_sha256")
    data = _read_regular(path, TENSORS)
    if recorded is not None and recorded != _sha256(data):
        raise RunError(f"The run at {path} is damaged: {TENSORS} does not match the checksum recorded in {META} "
                       "(it was changed or corrupted after saving).", "Run discovery again.")
    try:
        tensors = load(data)
    except Exception as exc:
        raise RunError(f"The run at {path} is damaged ({type(exc).__name__}: {exc}).", "Run discovery again.") from None
    missing = set(TENSOR_NAMES) - set(tensors)
    if missing:
        raise RunError(f"The run at {path} lacks {', '.join(sorted(missing))}.", "Run discovery again.")
    run = Run(meta=meta, path=path, **{name: tensors[name] for name in TENSOR_NAMES})
    problem = run_problem(run)
    if problem:
        raise _invalid(path, problem)
    return run


def _open_version_2(path: Path, meta: dict, record: RunRecord) -> Run:
    """A format-2 run: run.json (already checked as ``record``) and its head now; the seal last,
    so that a damaged file is named as such before a changed run.json."""
    shape, head = record.shape, record.head
    cd, k, d, c = shape.decomposed, shape.k, shape.features, shape.classes
    run_id = record.seal.id if record.seal else None
    tensors = _read_tensors(path, head.file, head.sha256, HEAD_TENSORS, run_id)
    rows, bias, idx = tensors["head_rows"], tensors["head_bias"], tensors["class_indices"]
    listed = [i for s in meta["shards"] for i in s["classes"]]
    problem = ""
    if tuple(rows.shape) != (cd, d) or tuple(bias.shape) != (c,) or tuple(idx.shape) != (cd,):
        problem = (f"its head has shapes {tuple(rows.shape)}, {tuple(bias.shape)}, {tuple(idx.shape)}; "
                   f"{META} says ({cd}, {d}), ({c},), ({cd},)")
    elif _indices_problem(idx, c):
        problem = _indices_problem(idx, c)
    elif idx.tolist() != listed:
        problem = f"{META}'s shards do not list the run's decomposed classes in order"
    problem = problem or _floats_problem({"head_rows": rows, "head_bias": bias}) or record.seal_problem()
    if problem:
        raise _invalid(path, problem)
    run = Run.__new__(Run)  # the shard tensors are read on first use (Run.__getattr__)
    shards = _Shards(path, meta["shards"], rows, k, d, run_id)
    meta["classes"] = shards.records
    run.__dict__.update(meta=meta, path=path, class_indices=idx.long(), head_rows=rows, head_bias=bias,
                        _shards=shards)
    return run


def run_problem(run: Run) -> str:
    """What is wrong with a run's tensors and metadata, or "" when it is consistent (reads every shard)."""
    c = run.head_bias.shape[0]
    return (_tensor_problem(run) or run.record.classes_problem(c)
            or _records_problem(run.meta.get("classes"), run.class_indices.tolist(), run.prototypes.shape[1], META))


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
    if _indices_problem(idx, bias.shape[0]):
        return _indices_problem(idx, bias.shape[0])
    return (_floats_problem({name: getattr(run, name)
                             for name in ("prototypes", "nmf_prototypes", "alpha", "head_rows", "head_bias")})
            or _sum_problem(p, rows))


def _indices_problem(idx: torch.Tensor, c: int) -> str:
    """What is wrong with the decomposed classes' indices among ``c`` classes, or ""."""
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        return "class_indices are not integers"
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= c or len(set(idx.tolist())) != idx.numel()):
        return f"class_indices must be distinct classes between 0 and {c - 1}"
    return ""


def _floats_problem(tensors: dict) -> str:
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            return f"{name} is not a floating-point tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} contains NaN or infinite values"
    return ""


def _sum_problem(prototypes: torch.Tensor, head_rows: torch.Tensor) -> str:
    error = float(head_error(prototypes, head_rows).max()) if len(prototypes) else 0.0
    if error > MAX_HEAD_ERROR:
        return (f"its prototypes do not sum to the head rows they decompose (relative error {error:.2g}, "
                f"allowed {MAX_HEAD_ERROR:g})")
    return ""


def _records_problem(classes, expected: list, k: int, where: str) -> str:
    """What is wrong with the class records kept in ``where`` (run.json or a shard's file), or ""."""
    if not isinstance(classes, (list, ClassRecords)) or not all(isinstance(e, dict) for e in classes):
        return f"{where}'s 'classes' is not a list of class records"
    indices = [e.get("index") for e in classes]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return f"{where}'s class records lack an integer 'index'"
    if indices != list(expected):
        return f"{where}'s class records ({len(indices)}) do not match the run's decomposed classes"
    for entry in classes:  # types, ranges, k numbers per list, image paths confined to the image folder
        problem = class_record_problem(entry, k)
        if problem:
            return problem
    return ""


def check_model(run: Run, loaded, split) -> None:
    """Refuse a model other than the one the run decomposed: another architecture or cut over
    the same weights would explain with another feature map."""
    model = run.record.model
    now = {"arch": loaded.arch, "feature_layer": split.feature_layer, "head_layer": split.head_layer}
    for key, label in (("arch", "architecture"), ("feature_layer", "feature layer"), ("head_layer", "head layer")):
        recorded = getattr(model, key) if model else None
        if recorded not in (None, ABSENT) and now[key] is not None and recorded != now[key]:
            raise RunError(f"This run was made with the {label} '{recorded}', but the model opened now has "
                           f"'{now[key]}'.", "Open the run with the same architecture and layers it was made with "
                                            "(--arch / --model-def / --feature-layer), or run discovery again.")
    check_split(run, split)
