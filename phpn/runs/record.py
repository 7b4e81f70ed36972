"""run.json as typed records: read, checked and written through dataclasses.

:class:`RunRecord` is a run's ``run.json``: the model (:class:`ModelRecord`), preprocessing,
images (:class:`DataRecord`), settings, timings, the certificate (:class:`CertificateRecord`),
the run's shape and the index of its files (:class:`ShapeRecord`, :class:`FileRecord`,
:class:`ShardRecord`), and for format 1 the class records (:class:`ClassRecord`, kept in the
shards' JSON files in format 2). ``RunRecord.from_dict(d)`` checks every type and range and
refuses a bad file with one sentence naming the problem; ``to_dict()`` gives back exactly the
JSON it was read from (keys it does not know are kept as they are). docs/run.schema.json is
generated from these classes (:func:`json_schema`; ``python -m phpn.runs.record`` writes it).

The seal (:class:`SealRecord`, ``run.json``'s ``seal``) ties run.json's meaning to its files:
one sha256 per top-level section, and the run's identity over all of them. A change to the
model, class names, preprocessing, certificate or file index is refused with a sentence naming
the section. The run's ``id`` (a digest of its meaning, the index apart) is also written into
its head and shard files, so a shard taken from another run is refused even where run.json
was re-sealed. Runs written before the seal existed open unsealed: ``RunRecord.seal`` is None
and only their files' checksums are checked.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from phpn.errors import RunError
from phpn.images.inputs import TensorInput
from phpn.images.preprocess import Preprocess
from phpn.method.certify import Certificate

META = "run.json"
FORMAT_VERSION = 2  # what phpn writes
READABLE_VERSIONS = (1, 2)
SEAL_VERSION = 1
DATA_FILE = re.compile(r"(head|shard-\d{5})-[0-9a-f]{16}\.(safetensors|json)")  # names phpn gives a run's data files
SHA256 = r"^[0-9a-f]{64}$"
INDEX_KEYS = ("format_version", "shape", "head", "shards", "tensors_sha256")  # run.json's index of its files
# What each section of run.json holds, as a sentence names it when it no longer matches its seal.
SECTION_WORDS = {
    "model": "model (checkpoint sha256, architecture, class names)",
    "preprocess": "preprocessing",
    "certificate": "certificate",
    "certificate_held_out": "held-out certificate",
    "data": "image folder record",
    "config": "settings",
    "shape": "shape",
    "head": "head file record",
    "shards": "shard index (files, checksums and the classes each holds)",
    "tensors_sha256": "tensors checksum",
}


class _Absent:
    """A key the JSON does not hold (unlike null, which it holds as None)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


class _Problem(Exception):
    """One thing wrong with a record, said as the end of a sentence."""


def _meta(key: Optional[str] = None, *, required: bool = False, what: Optional[str] = None, minimum=None,
          maximum=None, pattern: Optional[str] = None, enum: Optional[tuple] = None, summary: Optional[str] = None,
          doc: str = ""):
    """A field of a record: its JSON ``key`` (default: the field's name), whether it must be
    there, ``what`` it must be in words, its range, and ``summary``: the one sentence for any
    problem inside it (a detail follows in brackets)."""
    return field(default=ABSENT, metadata={"key": key, "required": required, "what": what, "minimum": minimum,
                                           "maximum": maximum, "pattern": pattern, "enum": enum,
                                           "summary": summary, "doc": doc})


class _Record:
    """Reads and writes a dataclass as a JSON object; unknown keys are kept in ``extra``."""

    extra: dict

    @classmethod
    def _fields(cls) -> list:
        cached = cls.__dict__.get("_field_cache")
        if cached is None:
            hints = get_type_hints(cls)
            cached = [(f.name, f.metadata.get("key") or f.name, hints[f.name], f.metadata)
                      for f in fields(cls) if f.name != "extra"]
            cls._field_cache = cached
        return cached

    @classmethod
    def _parse(cls, d, where: str):
        if not isinstance(d, dict):
            raise _Problem(f"{_name(where)} is not an object")
        values, known = {}, set()
        for name, key, tp, meta in cls._fields():
            known.add(key)
            if key not in d:
                if meta["required"]:
                    raise _Problem(f"{_name(_join(where, key))} is missing")
                values[name] = ABSENT
                continue
            try:
                values[name] = _value(d[key], tp, _join(where, key), meta)
            except _Problem as problem:
                if meta["summary"]:
                    detail = str(problem).removeprefix(f"{META}'s ")
                    raise _Problem(f"{_quoted(where, key)} {meta['summary']} ({detail})") from None
                raise
        record = cls(**values, extra={key: value for key, value in d.items() if key not in known})
        record._check(where)
        return record

    def _check(self, where: str) -> None:
        """Checks across fields (a subclass's own)."""

    def to_dict(self) -> dict:
        out = {}
        for name, key, _tp, _meta in self._fields():
            value = getattr(self, name)
            if value is not ABSENT:
                out[key] = _plain(value)
        out.update(self.extra)
        return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _quoted(where: str, key: str) -> str:
    """run.json's top-level sections are quoted ('model'), nested keys dotted (model.arch)."""
    return f"{META}'s '{key}'" if not where else f"{META}'s {where}.{key}"


def _plain(value):
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_WORDS = {str: "text", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin is list:
        inner = _describe(args[0])
        return "a list of " + {"text": "texts", "a whole number": "whole numbers", "a number": "numbers"}.get(
            inner, inner)
    if origin is dict:
        return "an object of " + _describe(args[1]).removeprefix("a ").removeprefix("an ") + " values"
    if isinstance(tp, type) and issubclass(tp, _Record):
        return "an object"
    return _WORDS.get(tp, "a JSON value")


_SHAPES: dict = {}


def _shape(tp) -> tuple:
    shape = _SHAPES.get(tp)
    if shape is None:
        shape = _SHAPES[tp] = (get_origin(tp), get_args(tp))
    return shape


_PLAIN = (str, int, float, bool, dict, list)
_NO_META: dict = {}


def _value(value, tp, where: str, meta=None):
    """``value`` checked against the type ``tp`` (records become their dataclass)."""
    meta = meta or _NO_META
    if tp in _PLAIN and _is(value, tp):  # the common case first: a run holds thousands of records
        if meta.get("minimum") is not None or meta.get("maximum") is not None or meta.get("pattern") \
                or meta.get("enum"):
            _check_range(value, where, meta)
        return value
    what = meta.get("what")
    origin, args = _shape(tp)
    try:
        if origin is Union:
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return _value(value, inner[0], where, {**meta, "what": what or _describe(tp)})
        if tp is Any:
            return value
        if isinstance(tp, type) and issubclass(tp, _Record):
            return tp._parse(value, where)
        if origin is list:
            if not isinstance(value, list):
                raise _Problem("")
            if not _needs_walk(args[0]):  # a list of plain values: one type test each, no copy
                bad = next((i for i, v in enumerate(value) if not _is(v, args[0])), None)
                if bad is not None:
                    raise _Problem("")
                return value
            return [_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise _Problem("")
            for k, v in value.items():
                _value(v, args[1], f"{where}.{k}")
            return value
        if not _is(value, tp):
            raise _Problem("")
    except _Problem as problem:
        if str(problem):
            raise
        raise _Problem(f"{_name(where)} is not {what or _describe(tp)}") from None
    _check_range(value, where, meta)
    return value


def _needs_walk(tp) -> bool:
    """Whether a list's items need more than one type test each (records, nested lists)."""
    return not (tp in (str, int, float, bool, dict, list) or tp is Any)


def _name(where: str) -> str:
    return f"{META}'s '{where}'" if "." not in where and "[" not in where else f"{META}'s {where}"


def _is(value, tp) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_range(value, where: str, meta: dict) -> None:
    low, high, pattern, enum = meta.get("minimum"), meta.get("maximum"), meta.get("pattern"), meta.get("enum")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value) and (low is not None or high is not None):
            raise _Problem(f"{_name(where)} is {value}, not a finite number")
        if low is not None and value < low or high is not None and value > high:
            span = f"from {low} to {high}" if low is not None and high is not None else \
                (f"at least {low}" if low is not None else f"at most {high}")
            raise _Problem(f"{_name(where)} is {value}, it must be {span}")
    if pattern is not None and isinstance(value, str) and not re.fullmatch(pattern.strip("^$"), value):
        raise _Problem(f"{_name(where)} '{value[:80]}' is not {meta.get('what') or 'of the right form'}")
    if enum is not None and value not in enum:
        raise _Problem(f"{_name(where)} is {value!r}, not one of {', '.join(map(repr, enum))}")


def confined_path(text: str) -> bool:
    """Whether ``text`` is a relative path that stays inside the folder it is read from: not
    absolute, no drive ("C:"), no backslash, no ".." part (string tests: a run holds many)."""
    if not isinstance(text, str) or not text or "\x00" in text or "\\" in text or text[0] == "/":
        return False
    if len(text) > 1 and text[1] == ":" and text[0].isalpha():
        return False
    return ".." not in text or ".." not in text.split("/")


# --- the records ------------------------------------------------------------------------------

@dataclass
class ModelRecord(_Record):
    """The model a run decomposed: its checkpoint's identity, its classes and where it was cut."""

    arch: str = _meta(doc="architecture name")
    sha256: str = _meta(doc="sha256 of the checkpoint (phpn's checkpoint identity)")
    source: Optional[str] = _meta(doc="where the model came from, in words")
    num_classes: int = _meta(minimum=1)
    class_names: Optional[list[str]] = _meta(what="a list of names", doc="one name per class of the head")
    feature_shape: list[int] = _meta()
    folded_norm: bool = _meta()
    signed_features: bool = _meta()
    nmf_input: str = _meta()
    feature_layer: str = _meta()
    head_layer: str = _meta()
    diagnosis: dict = _meta(doc="how the model was read as features + linear head")
    origin: dict = _meta(doc="how the app loaded the model (an upload's own name, a demo)")
    app_load: dict = _meta(doc="the app's load arguments, a visitor's files as 'my files/...'")
    extra: dict = field(default_factory=dict)


@dataclass
class DataRecord(_Record):
    """The images discovery read."""

    root: str = _meta(doc="the image folder (or demo:<name>)")
    skipped: list = _meta(doc="images that could not be read: [path, reason]")
    class_mapping: dict = _meta(doc="how class folders were matched to the model's classes")
    decode: str = _meta()
    heldout_from: Optional[str] = _meta()
    extra: dict = field(default_factory=dict)


@dataclass
class CertificateRecord(_Record):
    """Evidence that the decomposed network is the original one (phpn.method.certify); the
    derived fields (passed, relative_logit_diff, accuracy, near_chance) must follow from the counts."""

    images: int = _meta(required=True, minimum=0)
    top1_agreement: float = _meta(required=True, minimum=0, maximum=1)
    max_logit_diff: float = _meta(required=True, minimum=0)
    max_abs_logit: float = _meta(required=True, minimum=0)
    max_head_error: float = _meta(required=True, minimum=0)
    mean_head_error: float = _meta(required=True, minimum=0)
    agreed: int = _meta(minimum=0)
    labelled_images: int = _meta(minimum=0)
    correct: int = _meta(minimum=0)
    labelled_classes: int = _meta(minimum=0)
    seconds: Optional[float] = _meta(minimum=0)
    relative_logit_diff: float = _meta(minimum=0)
    passed: bool = _meta()
    accuracy: Optional[float] = _meta(minimum=0, maximum=1)
    near_chance: bool = _meta()
    pass_: str = _meta("pass", doc="how the features and logits were read: one pass or two")
    extra: dict = field(default_factory=dict)

    def certificate(self) -> Certificate:
        return Certificate.from_dict(self.to_dict())

    def _check(self, where: str) -> None:
        if self.agreed is not ABSENT and self.agreed > self.images:
            raise _Problem(f"{META}'s {where} says {self.agreed} of {self.images} images agreed")
        if self.correct is not ABSENT and self.labelled_images is not ABSENT and self.correct > self.labelled_images:
            raise _Problem(f"{META}'s {where} says {self.correct} of {self.labelled_images} images were right")
        derived = self.certificate().to_dict()
        if self.agreed is not ABSENT and self.images and derived["agreed"] != round(self.top1_agreement * self.images):
            raise _Problem(f"{META}'s {where}.top1_agreement ({self.top1_agreement}) does not follow from "
                           f"{self.agreed} of {self.images} images agreeing")
        for key in ("relative_logit_diff", "accuracy", "near_chance", "passed"):  # the numbers, then the verdict
            recorded = getattr(self, key)
            if recorded is ABSENT:
                continue
            now = derived[key]
            same = recorded == now if not isinstance(now, float) or not isinstance(recorded, float) else \
                math.isclose(recorded, now, rel_tol=1e-9, abs_tol=0.0)
            if not same:
                raise _Problem(f"{META}'s {where}.{key} says {recorded}, but its own numbers give {now}")


@dataclass
class ShapeRecord(_Record):
    classes: int = _meta(required=True, minimum=0, doc="classes of the model's head")
    decomposed: int = _meta(required=True, minimum=0, doc="classes with prototypes")
    k: int = _meta(required=True, minimum=0, doc="prototype slots per class")
    features: int = _meta(required=True, minimum=0, doc="feature dimension D")
    extra: dict = field(default_factory=dict)


@dataclass
class FileRecord(_Record):
    file: str = _meta(required=True, pattern=DATA_FILE.pattern, what="a data file name of this run")
    sha256: str = _meta(required=True, pattern=SHA256, what="a sha256")
    extra: dict = field(default_factory=dict)


@dataclass
class ShardRecord(_Record):
    file: str = _meta(required=True, pattern=DATA_FILE.pattern, what="a data file name of this run")
    sha256: str = _meta(required=True, pattern=SHA256, what="a sha256")
    records: str = _meta(required=True, pattern=DATA_FILE.pattern, what="a data file name of this run")
    records_sha256: str = _meta(required=True, pattern=SHA256, what="a sha256")
    classes: list[int] = _meta(required=True, doc="the classes the shard holds, in run order")
    extra: dict = field(default_factory=dict)

    def _check(self, where: str) -> None:
        if not self.classes:
            raise _Problem(f"{where} holds no class")


@dataclass
class SealRecord(_Record):
    """run.json's meaning under checksums: one sha256 per top-level section, the run's ``id``
    (over the sections that are not its file index, written into its data files too) and its
    identity ``sha256`` (over every section: what notes name)."""

    version: int = _meta(required=True, enum=(SEAL_VERSION,))
    id: str = _meta(required=True, pattern=SHA256, what="a sha256")
    sha256: str = _meta(required=True, pattern=SHA256, what="a sha256")
    sections: dict[str, str] = _meta(required=True)
    extra: dict = field(default_factory=dict)


@dataclass
class ClassRecord(_Record):
    """One decomposed class's record (a shard's JSON in format 2, run.json's 'classes' in format 1).
    Image paths are relative to the image folder and never leave it."""

    index: int = _meta(required=True, minimum=0)
    folder: str = _meta()
    images: int = _meta(minimum=0)
    k: int = _meta(minimum=1, doc="the class's own number of prototypes (automatic k)")
    alpha: list[float] = _meta()
    fidelity: list[float] = _meta()
    mean_contribution: list[float] = _meta()
    paths: list[str] = _meta(doc="the images discovery read, relative to the image folder")
    heldout_paths: list[str] = _meta(doc="images held back from discovery, relative to the image folder")
    top_patches: list[list[dict]] = _meta(doc="per prototype: [{path, score, position, box}]")
    extra: dict = field(default_factory=dict)

    def image_paths(self):
        """(where, path) of every image path the record holds."""
        for key in ("paths", "heldout_paths"):
            for i, path in enumerate(getattr(self, key) or ()):
                yield f"{key}[{i}]", path
        for p, patches in enumerate(self.top_patches or ()):
            for i, patch in enumerate(patches):
                yield f"top_patches[{p}][{i}].path", patch.get("path")


def class_record_problem(entry, k: int) -> str:
    """What is wrong with one class record in a run with ``k`` prototype slots, or ""."""
    index = entry.get("index")
    try:
        record = ClassRecord._parse(entry, "")
    except _Problem as problem:  # said of the class, not of run.json
        return f"class {index}'s " + str(problem).removeprefix(f"{META}'s ")
    own_k = record.k if record.k is not ABSENT else k
    if not 1 <= own_k <= k:
        return f"class {index}'s 'k' is not a whole number from 1 to {k}"
    for key in ("fidelity", "alpha", "mean_contribution"):
        value = getattr(record, key)
        if value is not ABSENT and len(value) != own_k:
            return f"class {index}'s '{key}' is not a list of {own_k} numbers"
    if record.folder is not ABSENT and not confined_path(record.folder):
        return f"class {index}'s folder '{record.folder[:80]}' is not a relative path inside the image folder"
    for where, path in record.image_paths():
        if not confined_path(path):
            return (f"class {index}'s {where} {str(path)[:80]!r} is not a relative path inside the image folder "
                    "(absolute, or leaving it)")
    return ""


@dataclass
class RunRecord(_Record):
    """run.json. Format 2 (written now) holds the index of the run's files; format 1 holds the
    class records instead. A run made in memory and not yet saved has no index."""

    phpn_version: str = _meta()
    created: str = _meta(doc="when discovery finished (ISO 8601, UTC)")
    model: ModelRecord = _meta(what="an object")
    preprocess: dict = _meta(summary="is missing or invalid", doc="phpn.images.preprocess.Preprocess.to_dict(), or {given, channels, size} for tensors")
    data: Optional[DataRecord] = _meta(what="an object")
    config: Optional[dict] = _meta(what="an object", doc="phpn.pipeline.discover.DiscoveryConfig.to_dict()")
    nmf: dict = _meta()
    refine: dict = _meta()
    device: str = _meta()
    features_dtype: str = _meta()
    groups: int = _meta(minimum=0)
    ranks: int = _meta(minimum=1)
    timings: Optional[dict[str, float]] = _meta(what="an object")
    certificate: Optional[CertificateRecord] = _meta(what="an object")
    certificate_held_out: Optional[CertificateRecord] = _meta(what="an object")
    demo: Optional[str] = _meta()
    format_version: int = _meta(enum=READABLE_VERSIONS)
    shape: ShapeRecord = _meta(summary="is missing or invalid")
    head: FileRecord = _meta(summary="is missing or invalid")
    shards: list[ShardRecord] = _meta(summary="is not a list of shard records")
    tensors_sha256: str = _meta(pattern=SHA256, what="a sha256")
    seal: SealRecord = _meta(summary="is damaged")
    classes: list = _meta(doc="format 1 only: the class records (ClassRecord)")
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: Optional[str] = None) -> "RunRecord":
        """run.json's content as a record; a RunError names the first problem (``where``: the
        run's folder, for the message)."""
        try:
            return cls._parse(d, "")
        except _Problem as problem:
            raise RunError(f"The run{f' at {where}' if where else ''} is not valid: {problem}.",
                           "Run discovery again.") from None

    def _check(self, where: str) -> None:
        if self.format_version is ABSENT:
            return  # a run in memory, not saved yet
        if self.preprocess is ABSENT:
            raise _Problem(f"{META}'s 'preprocess' is missing or invalid (KeyError: 'preprocess')")
        try:
            if "given" in self.preprocess:  # images preprocessed by the caller (phpn.decompose on tensors)
                TensorInput.from_dict(self.preprocess)
            else:
                Preprocess.from_dict(self.preprocess)
        except Exception as exc:  # missing, wrong type or out of range: all the same to the user
            raise _Problem(f"{META}'s 'preprocess' is missing or invalid ({type(exc).__name__}: {exc})") from None
        if self.format_version == 1:
            return
        for key in ("shape", "head", "shards"):
            if getattr(self, key) is ABSENT:
                raise _Problem(f"{META}'s '{key}' is missing or invalid")
        listed = sum(len(s.classes) for s in self.shards)
        if listed != self.shape.decomposed:
            raise _Problem(f"{META}'s shards hold {listed} classes, its shape says {self.shape.decomposed}")
        problem = self.classes_problem(self.shape.classes)
        if problem:
            raise _Problem(problem)

    def classes_problem(self, c: int) -> str:
        """What is wrong with the class names for a head of ``c`` classes, or ""."""
        names = self.model.class_names if self.model else ABSENT
        if names and len(names) != c:
            return f"{META} names {len(names)} classes but the head has {c}"
        return ""

    @property
    def class_names(self) -> Optional[list]:
        return (self.model.class_names or None) if self.model else None

    @property
    def auto_k(self):
        return (self.config or {}).get("auto_k")

    def preprocessing(self):
        """The recorded preprocessing as phpn's object (a TensorInput for preprocessed tensors)."""
        return TensorInput.from_dict(self.preprocess) if "given" in self.preprocess else \
            Preprocess.from_dict(self.preprocess)

    # --- the seal -----------------------------------------------------------------------------

    @property
    def integrity(self) -> str:
        """What the run's checksums cover, in words."""
        if self.seal:
            return ("sealed: run.json's meaning (model, class names, preprocessing, certificate, settings, file "
                    "index) and every data file are under checksums, and each data file names this run")
        return ("unsealed (saved before phpn sealed run.json): its data files are under checksums, run.json's "
                "meaning is not; saving the run again seals it")


    def sealed(self) -> "RunRecord":
        """The record with its seal computed over what it holds now."""
        d = {key: value for key, value in self.to_dict().items() if key != "seal"}
        sections = section_digests(d)
        run_id = meaning_id(d)
        seal = SealRecord(version=SEAL_VERSION, id=run_id, sha256=_root(run_id, sections), sections=sections)
        return RunRecord._parse({**d, "seal": seal.to_dict()}, "")

    def seal_problem(self) -> str:
        """What in run.json no longer matches its seal, in words, or "" (also "" when unsealed)."""
        if not self.seal:
            return ""
        d = {key: value for key, value in self.to_dict().items() if key != "seal"}
        now, recorded = section_digests(d), self.seal.sections
        for key in sorted(set(now) | set(recorded)):
            words = SECTION_WORDS.get(key, f"'{key}'")
            if key not in recorded:
                return f"{META}'s {words} was added after the run was saved (the seal does not cover it)"
            if key not in now:
                return f"{META}'s {words} was removed after the run was saved"
            if now[key] != recorded[key]:
                return f"{META}'s {words} was changed after the run was saved (it no longer matches its seal)"
        if meaning_id(d) != self.seal.id:
            return f"{META}'s seal names another run (its id does not follow from this run.json)"
        if _root(self.seal.id, recorded) != self.seal.sha256:
            return f"{META}'s seal is damaged (its sha256 does not follow from its sections)"
        return ""


def canonical(value) -> bytes:
    """The JSON text a section is hashed as: sorted keys, no spaces, floats as Python writes them."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def section_digests(d: dict) -> dict:
    return {key: _sha(canonical(value)) for key, value in d.items() if key not in ("seal", "classes")}


def meaning_id(d: dict) -> str:
    """The run's id: one sha256 over its meaning (every section but the index of its files),
    known before its files are written, so that each file can name the run it belongs to."""
    return _sha(canonical({key: value for key, value in d.items() if key not in INDEX_KEYS + ("seal", "classes")}))


def _root(run_id: str, sections: dict) -> str:
    return _sha(canonical({"id": run_id, "sections": sections}))


# --- the published schema --------------------------------------------------------------------

def _schema_of(tp, meta=None) -> dict:
    meta = meta or {}
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)][0]
        return {"anyOf": [_schema_of(inner, meta), {"type": "null"}]}
    if isinstance(tp, type) and issubclass(tp, _Record):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is list:
        out = {"type": "array", "items": _schema_of(args[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema_of(args[1])}
    elif tp is Any:
        out = {}
    else:
        out = {"type": {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object",
                        list: "array"}[tp]}
    for key, word in (("minimum", "minimum"), ("maximum", "maximum"), ("pattern", "pattern")):
        if meta.get(key) is not None:
            out[word] = meta[key] if key != "pattern" else "^" + meta[key].strip("^$") + "$"
    if meta.get("enum") is not None:
        out["enum"] = list(meta["enum"])
    if meta.get("doc"):
        out["description"] = meta["doc"]
    return out


def _record_schema(cls) -> dict:
    props, required = {}, []
    for _name, key, tp, meta in cls._fields():
        props[key] = _schema_of(tp, meta)
        if meta["required"]:
            required.append(key)
    out = {"type": "object", "description": " ".join((cls.__doc__ or cls.__name__).split()), "properties": props}
    if required:
        out["required"] = required
    return out


RECORDS = (RunRecord, ModelRecord, DataRecord, CertificateRecord, ShapeRecord, FileRecord, ShardRecord, SealRecord,
           ClassRecord)


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of run.json, generated from the records above."""
    root = _record_schema(RunRecord)
    root["properties"]["classes"] = {"type": "array", "items": {"$ref": "#/$defs/ClassRecord"},
                                     "description": "format 1 only: the class records"}
    root["allOf"] = [{"if": {"properties": {"format_version": {"const": 2}}, "required": ["format_version"]},
                      "then": {"required": ["shape", "head", "shards", "preprocess"]}}]
    root["required"] = ["format_version"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "phpn run.json", **root,
            "$defs": {cls.__name__: _record_schema(cls) for cls in RECORDS if cls is not RunRecord}}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=1) + "\n"


if __name__ == "__main__":  # python -m phpn.runs.record > docs/run.schema.json
    print(schema_text(), end="")
