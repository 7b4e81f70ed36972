"""The expert's own notes on prototypes, and what switching prototypes off would do.

Notes: each prototype of a run can get a name ("beak"), a description and flags
("background", "spurious", or the expert's own words). They are kept in
``annotations.json`` beside the run's ``run.json``, written atomically and never inside
``run.json`` or the tensors, so annotating never changes the run or its checksum. The file
names the run it describes (the sha256 of its sealed run.json, and of its tensors) and is
refused for another run; a file that names no run is refused too.
Saving merges per prototype: only the prototypes edited since the notes were read are
written over what is on disk, so two people annotating one run keep each other's notes; each
note records who edited it last and when, and a prototype that both changed is reported
(:attr:`Annotations.conflicts`), never overwritten silently.

Switching off: :func:`switch_off` predicts labelled images with some prototypes removed
from their class's score (the head row loses those prototypes) and reports the changed
predictions and the accuracy before and after. That edited model is *not* the original one;
everything it returns says so.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from phpn.atomic import write_atomic
from phpn.config import class_name
from phpn.errors import ConfigError, RunError
from phpn.glossary import fidelity_warning
from phpn.images.batches import load_batch
from phpn.progress import report
from phpn.runs.record import RunRecord
from phpn.runs.store import ANNOTATIONS, META

FORMAT_VERSION = 1
SUGGESTED_FLAGS = ("background", "spurious", "texture", "colour", "looks right")
MAX_NAME = 80
MAX_DESCRIPTION = 2000
MAX_FLAG = 40
MAX_FLAGS = 12
# The expert's verdict on an audit finding, kept as flags in the same notes (no other storage):
# confirmed as one of VERDICTS, or dismissed (looked at: the model is right for the right reasons).
VERDICTS = ("spurious", "background")
DISMISSED = "dismissed"
NOT_JUDGED = "not judged"
EDITED_MODEL = ("Edited model: prototypes switched off. It no longer equals the original model; these numbers only "
                "show what those prototypes do.")

# Said beside a switch-off measured on the images discovery found the prototypes on.
ON_DISCOVERY_IMAGES = ("Measured on the discovery images: the prototypes were found on these very images, so this "
                       "accuracy is optimistic. Held-out images (ones discovery did not see) give a fair number.")


@dataclass
class PrototypeNote:
    name: str = ""
    description: str = ""
    flags: tuple = ()
    edited_by: str = ""  # who changed it last ("" when not said)
    edited_at: str = ""  # when, ISO 8601 in UTC

    @property
    def empty(self) -> bool:
        return not (self.name or self.description or self.flags)

    @property
    def content(self) -> tuple:
        """What the note says (not who wrote it): two notes saying the same are the same edit."""
        return self.name, self.description, tuple(self.flags)

    def last_edit(self) -> str:
        """"edited by Ana, 2026-12-07 11:50 UTC", or "" when the note does not say."""
        if not (self.edited_by or self.edited_at):
            return ""
        when = self.edited_at.replace("T", " ")[:16] + " UTC" if self.edited_at else ""
        return "edited" + (f" by {self.edited_by}" if self.edited_by else "") + (f", {when}" if when else "")

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "flags": list(self.flags)}
        if self.edited_by or self.edited_at:
            out.update(edited_by=self.edited_by, edited_at=self.edited_at)
        return out


def _clean_text(value, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"The prototype's {what} must be text, not {type(value).__name__}.", f"Give the {what} as text.")
    text = " ".join(value.split()) if what != "description" else value.strip()
    if len(text) > limit:
        raise ConfigError(f"The prototype's {what} is {len(text)} characters long; at most {limit} are kept.",
                          f"Shorten the {what}.")
    return text


def _clean_flags(flags) -> tuple:
    if flags is None:
        return ()
    if isinstance(flags, str) or not isinstance(flags, (list, tuple)):
        raise ConfigError("Flags must be a list of words.", "Give the flags as a list, e.g. ['background'].")
    out = []
    for flag in flags:
        text = _clean_text(flag, "flag", MAX_FLAG).lower()
        if text and text not in out:
            out.append(text)
    if len(out) > MAX_FLAGS:
        raise ConfigError(f"A prototype can carry at most {MAX_FLAGS} flags, not {len(out)}.", "Remove some flags.")
    return tuple(out)


def run_tensors_sha256(run) -> Optional[str]:
    """The checksum of the run's tensors as recorded in its run.json (format 1: of its tensors file;
    format 2: one over the checksums of its head and shard files), or None: not saved yet."""
    return run.record.tensors_sha256 or None


def run_seal_sha256(run) -> Optional[str]:
    """The sha256 of the run's sealed run.json (its whole meaning), or None: not saved yet, or
    saved before runs were sealed."""
    seal = run.record.seal
    return seal.sha256 if seal else None


def plain_label(prototype: int) -> str:
    """A prototype without a name: "prototype 2" (counted from 1)."""
    return f"prototype {int(prototype) + 1}"


def verdict_words(verdict: Optional[str]) -> str:
    """A verdict as shown in the reports and on the Audit page: "confirmed: spurious",
    "dismissed" or "not judged"."""
    return NOT_JUDGED if verdict is None else DISMISSED if verdict == DISMISSED else f"confirmed: {verdict}"


def prototype_label(notes: Optional["Annotations"], class_index: int, prototype: int) -> str:
    """One prototype as named everywhere: with the expert's name where there are notes
    (:meth:`Annotations.label`), else "prototype N"."""
    return notes.label(class_index, prototype) if notes is not None else plain_label(prototype)


def label_heading(label: str) -> str:
    """A prototype's label as a heading in a page's markdown: first letter capitalised (the
    expert's own name kept as written) and escaped, so a name is shown as text, never as HTML."""
    return html.escape(label[:1].upper() + label[1:])


def prototype_labels(notes: Optional["Annotations"], class_index: int, k: int) -> list:
    """The ``k`` prototypes of a class, each named as :func:`prototype_label` does."""
    return [prototype_label(notes, class_index, i) for i in range(k)]


@dataclass
class Annotations:
    """Notes keyed by (class index, prototype index) for one run with ``k`` prototypes per class."""

    class_indices: tuple
    k: int
    notes: dict = field(default_factory=dict)
    run_sha256: Optional[str] = None  # the tensors checksum of the run they describe
    run_seal: Optional[str] = None  # the sha256 of that run's sealed run.json (runs saved before seals: None)
    editor: Optional[str] = None  # who is editing (recorded on each note they change)
    # The notes as last read from or written to disk, and the prototypes changed since: a save
    # writes only those over the file's current notes (see save_annotations).
    base: dict = field(default_factory=dict, repr=False)
    edited: set = field(default_factory=set, repr=False)
    conflicts: list = field(default_factory=list, repr=False)  # set by the last save: see merge_notes

    @classmethod
    def for_run(cls, run) -> "Annotations":
        return cls(class_indices=tuple(int(c) for c in run.class_indices.tolist()), k=run.k,
                   run_sha256=run_tensors_sha256(run), run_seal=run_seal_sha256(run))

    def follow_copy(self, before: tuple, run) -> None:
        """The run these notes describe was saved again (a copy, the same prototypes): notes that
        named it by ``before`` (its tensors' and seal's sha256 then) now name the copy."""
        if (self.run_sha256, self.run_seal) == tuple(before) or (self.run_sha256 is None and self.run_seal is None):
            self.run_sha256, self.run_seal = run_tensors_sha256(run), run_seal_sha256(run)

    def _check(self, class_index: int, prototype: int) -> tuple:
        class_index, prototype = int(class_index), int(prototype)
        if class_index not in self.class_indices:
            raise ConfigError(f"Class {class_index} has no prototypes in this run.", "Pick one of the run's classes.")
        if not 0 <= prototype < self.k:
            raise ConfigError(f"Prototype {prototype + 1} does not exist: classes in this run have {self.k}.",
                              f"Pick a prototype between 1 and {self.k}.")
        return class_index, prototype

    def get(self, class_index: int, prototype: int) -> PrototypeNote:
        return self.notes.get(self._check(class_index, prototype), PrototypeNote())

    def set(self, class_index: int, prototype: int, *, name: Optional[str] = None,
            description: Optional[str] = None, flags: Optional[Sequence[str]] = None) -> PrototypeNote:
        """Change a prototype's note (fields left None are kept); returns the new note."""
        key = self._check(class_index, prototype)
        old = self.notes.get(key, PrototypeNote())
        note = PrototypeNote(
            name=old.name if name is None else _clean_text(name, "name", MAX_NAME),
            description=old.description if description is None else _clean_text(description, "description",
                                                                                 MAX_DESCRIPTION),
            flags=old.flags if flags is None else _clean_flags(flags), edited_by=old.edited_by,
            edited_at=old.edited_at)
        if note.content == old.content:
            return old
        if self.editor is not None:
            note = replace(note, edited_by=_clean_text(self.editor, "name", MAX_NAME),
                           edited_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.edited.add(key)
        if note.empty:
            self.notes.pop(key, None)
        else:
            self.notes[key] = note
        return note

    def label(self, class_index: int, prototype: int) -> str:
        """"prototype 2" or "prototype 2 “beak”": how the prototype is named everywhere."""
        note = self.get(class_index, prototype)
        return plain_label(prototype) + (f" “{note.name}”" if note.name else "")

    def flagged(self, flag: Optional[str] = None) -> list:
        """(class index, prototype) of the prototypes carrying ``flag`` (any flag when None)."""
        return sorted(key for key, note in self.notes.items() if note.flags and (flag is None or flag in note.flags))

    def verdict(self, class_index: int, prototype: int) -> Optional[str]:
        """The expert's verdict on a prototype: "spurious" or "background" (confirmed), "dismissed",
        or None (not judged yet)."""
        flags = self.get(class_index, prototype).flags
        return next((f for f in (*VERDICTS, DISMISSED) if f in flags), None)

    def set_verdict(self, class_index: int, prototype: int, verdict: Optional[str]) -> PrototypeNote:
        """Confirm a finding ("spurious", "background"), dismiss it ("dismissed") or clear the
        verdict (None); the prototype's other flags, name and description are kept."""
        if verdict is not None and verdict not in (*VERDICTS, DISMISSED):
            raise ConfigError(f"“{verdict}” is not a verdict.",
                              f"Pick one of {', '.join(VERDICTS)} or {DISMISSED} (or none to clear it).")
        kept = [f for f in self.get(class_index, prototype).flags if f not in (*VERDICTS, DISMISSED)]
        return self.set(class_index, prototype, flags=kept + ([verdict] if verdict else []))

    def spurious_off(self) -> dict:
        """{class index: [prototypes]} flagged spurious: what :func:`switch_off` removes to show the
        accuracy without them."""
        off: dict = {}
        for c, i in self.flagged("spurious"):
            off.setdefault(c, []).append(i)
        return off

    def to_dict(self) -> dict:
        named = {"run_sha256": self.run_seal} if self.run_seal else {}
        return {"format_version": FORMAT_VERSION, **named, "run_tensors_sha256": self.run_sha256, "k": self.k,
                "prototypes": [{"class_index": c, "prototype": i, **note.to_dict()}
                               for (c, i), note in sorted(self.notes.items())]}

    @classmethod
    def from_dict(cls, data, run) -> "Annotations":
        """Notes read from ``annotations.json`` for ``run``; refuses another run's or a damaged file."""
        where = f"{ANNOTATIONS} of the run"
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise RunError(f"The {where} is not a phpn notes file of format {FORMAT_VERSION}.",
                           f"Remove or rename {ANNOTATIONS} to open the run without its notes.")
        out = cls.for_run(run)
        _check_run(data.get("run_sha256"), data.get("run_tensors_sha256"), out, where)
        entries = data.get("prototypes")
        if not isinstance(entries, list):
            raise RunError(f"The {where} has no list of prototypes.", f"Remove or rename {ANNOTATIONS}.")
        for entry in entries:
            try:
                c, i = int(entry["class_index"]), int(entry["prototype"])
                out.set(c, i, name=entry.get("name"), description=entry.get("description"), flags=entry.get("flags"))
                if (c, i) in out.notes:
                    out.notes[(c, i)] = replace(out.notes[(c, i)], edited_by=str(entry.get("edited_by") or ""),
                                                edited_at=str(entry.get("edited_at") or ""))
            except (ConfigError, KeyError, TypeError, ValueError) as exc:
                raise RunError(f"The {where} has an entry this run cannot take ({exc}).",
                               f"Fix or remove {ANNOTATIONS}.") from None
        out.base, out.edited = dict(out.notes), set()
        return out

    def merge_into(self, on_disk: "Annotations") -> dict:
        """The notes to write: ``on_disk``'s, with the prototypes edited here put over them.
        Sets :attr:`conflicts` to the prototypes that were also changed on disk since these notes
        were read (their (class index, prototype), the other version): this edit wins, and says so."""
        merged = dict(on_disk.notes)
        self.conflicts = []
        for key in sorted(self.edited):
            theirs, base = on_disk.notes.get(key), self.base.get(key)
            if (theirs.content if theirs else None) != (base.content if base else None) and theirs is not None:
                self.conflicts.append((key, theirs))
            mine = self.notes.get(key)
            if mine is None:
                merged.pop(key, None)
            else:
                merged[key] = mine
        return merged


def _check_run(seal, tensors, notes: Annotations, where: str) -> None:
    """Refuse notes that name no run, or another run than ``notes``' (by every checksum both name)."""
    fix = f"Remove or rename {ANNOTATIONS} to open the run without them."
    if not seal and not tensors:
        raise RunError(f"The {where} does not name the run it belongs to, so it could be another run's.", fix)
    if not notes.run_seal and not notes.run_sha256:
        raise RunError(f"The {where} cannot be matched to this run: the run is not saved.",
                       "Open the saved run to read its notes.")
    if seal and notes.run_seal and seal != notes.run_seal:
        raise RunError(f"The {where} describes another run (run sha256 {str(seal)[:12]}…, this run's is "
                       f"{notes.run_seal[:12]}…).", fix)
    if tensors and notes.run_sha256 and tensors != notes.run_sha256:
        raise RunError(f"The {where} describes another run (tensors sha256 {str(tensors)[:12]}…, this run's is "
                       f"{notes.run_sha256[:12]}…).", fix)
    if not (seal and notes.run_seal) and not (tensors and notes.run_sha256):
        raise RunError(f"The {where} names its run in a way this run cannot be checked against.", fix)


def annotations_path(run_dir) -> Path:
    return Path(run_dir) / ANNOTATIONS


def load_annotations(run, run_dir=None) -> Annotations:
    """The notes saved beside the run (``run_dir``, by default where the run was loaded from);
    empty notes when there are none."""
    folder = run_dir if run_dir is not None else run.path
    if folder is None or not annotations_path(folder).is_file():
        return Annotations.for_run(run)
    try:
        data = json.loads(annotations_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"The run's {ANNOTATIONS} cannot be read ({type(exc).__name__}).",
                       f"Remove or rename {ANNOTATIONS} to open the run without its notes.") from None
    return Annotations.from_dict(data, run)


def save_annotations(annotations: Annotations, run_dir) -> Path:
    """Write the notes beside a saved run, atomically (a complete file or the old one)."""
    folder = Path(run_dir)
    if not (folder / META).is_file():
        raise RunError(f"{folder} is not a saved phpn run, so the notes have nowhere to go.",
                       "Save the run first (Discover page, or --out on the command line).")
    try:
        record = RunRecord.from_dict(json.loads((folder / META).read_text(encoding="utf-8")), where=str(folder))
    except (OSError, ValueError):
        record = None
    tensors = (record.tensors_sha256 or None) if record is not None else None
    seal = record.seal.sha256 if record is not None and record.seal else None
    if not tensors and not seal:
        raise RunError(f"The run in {folder.name} names no checksum, so notes could not be matched to it.",
                       "Save the run again (Discover page, or --out on the command line).")
    if annotations.run_sha256 is None and annotations.run_seal is None:
        annotations.run_sha256, annotations.run_seal = tensors, seal  # notes made before the run was saved
    elif (seal and annotations.run_seal and seal != annotations.run_seal) or \
            (tensors and annotations.run_sha256 and tensors != annotations.run_sha256):
        raise RunError(f"These notes describe another run than the one saved in {folder.name}.",
                       "Open that run and write its notes there.")
    else:
        annotations.run_sha256, annotations.run_seal = tensors, seal
    on_disk = _read_notes_beside(annotations, folder)
    if on_disk is not None:  # someone may have saved notes since these were read: merge per prototype
        annotations.notes = annotations.merge_into(on_disk)
    else:
        annotations.conflicts = []
    path = write_atomic(folder / ANNOTATIONS, json.dumps(annotations.to_dict(), indent=1, ensure_ascii=False))
    annotations.base, annotations.edited = dict(annotations.notes), set()
    return path


def _read_notes_beside(annotations: Annotations, folder: Path) -> Optional[Annotations]:
    """The notes saved in ``folder`` now (None when there are none or they cannot be read: then
    these notes replace them, as before)."""
    path = annotations_path(folder)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

    class _Shape:  # what Annotations.from_dict reads of a run: the one these notes were checked against
        class_indices = torch.tensor(list(annotations.class_indices))
        k = annotations.k
        record = SimpleNamespace(tensors_sha256=annotations.run_sha256,
                                 seal=SimpleNamespace(sha256=annotations.run_seal) if annotations.run_seal else None)

    try:
        return Annotations.from_dict(data, _Shape)
    except RunError:
        return None


def conflict_text(annotations: Annotations, class_names: Optional[Sequence[str]] = None) -> str:
    """The last save's conflicts in one sentence ("" when none): whose version was replaced."""
    if not annotations.conflicts:
        return ""
    items = "; ".join(f"{class_name(class_names, c)} {plain_label(i)} (theirs: "
                      f"“{theirs.name or theirs.description[:40] or ', '.join(theirs.flags)}”"
                      + (f", {theirs.last_edit()}" if theirs.last_edit() else "") + ")"
                      for (c, i), theirs in annotations.conflicts)
    return (f"Someone else changed the same prototype since you opened these notes: {items}. Your version is saved; "
            "theirs is quoted here so that nothing is lost.")


# --- switching prototypes off -----------------------------------------------------------------

def _normalise_off(off, network) -> dict:
    out = {}
    for c, protos in dict(off or {}).items():
        network.rows([int(c)])  # refuses a class without prototypes
        picked = sorted({int(i) for i in protos})
        if any(not 0 <= i < network.k for i in picked):
            raise ConfigError(f"Class {c} has prototypes 1 to {network.k}; {[i + 1 for i in picked]} were asked for.",
                              "Pick existing prototypes.")
        if picked:
            out[int(c)] = picked
    return out


def edited_logits(explanation, off: dict, network) -> torch.Tensor:
    """The logits (B, C) with the prototypes in ``off`` ({class: [prototype, ...]}) removed
    from their class's score. ``explanation`` must describe every class in ``off``."""
    logits = explanation.logits.clone()
    for c, protos in off.items():
        col = explanation.classes.index(int(c))
        logits[:, int(c)] -= explanation.contributions[:, col, protos].sum(-1)
    return logits


@dataclass
class SwitchOffResult:
    """Predictions of the original model and of the edited one on labelled images."""

    switched_off: dict  # {class index: [prototype indices]}
    images: int
    original_accuracy: float
    edited_accuracy: float
    changed: list  # [{"path", "true", "original", "edited"}] images whose prediction changed
    skipped: list = field(default_factory=list)
    edited: bool = True  # always: the numbers are those of a model that is not the original
    measured_on: str = ""  # the labelled set, in words ("the demo's held-out images")
    on_discovery_images: bool = False  # the images the prototypes were found on: an optimistic accuracy

    @property
    def accuracy_change(self) -> float:
        return self.edited_accuracy - self.original_accuracy

    def summary(self, class_names: Optional[Sequence[str]] = None, with_warning: bool = True) -> str:
        """The result in words: the set it was measured on, the accuracy before and after and, on
        the discovery images, that it is optimistic (unless ``with_warning`` is False: shown apart)."""
        off = "; ".join(f"{class_name(class_names, c)}: " + ", ".join(f"prototype {i + 1}" for i in p)
                        for c, p in self.switched_off.items()) or "nothing"
        where = (f"Measured on {self.measured_on} ({self.images} labelled images): accuracy" if self.measured_on
                 else f"On {self.images} labelled images, accuracy")
        return (f"{EDITED_MODEL} Switched off: {off}. {where} "
                f"{100 * self.original_accuracy:.1f}% → {100 * self.edited_accuracy:.1f}% "
                f"({100 * self.accuracy_change:+.1f} points); {len(self.changed)} predictions changed."
                + (f" {self.warning}" if with_warning and self.warning else ""))

    @property
    def warning(self) -> Optional[str]:
        """The caution to show beside the numbers, or None (held-out images)."""
        return ON_DISCOVERY_IMAGES if self.on_discovery_images else None

    def to_dict(self) -> dict:
        return {"edited_model": True, "note": EDITED_MODEL,
                "switched_off": {str(c): list(p) for c, p in self.switched_off.items()}, "images": self.images,
                "original_accuracy": self.original_accuracy, "edited_accuracy": self.edited_accuracy,
                "changed": self.changed, "skipped": self.skipped, "measured_on": self.measured_on,
                "on_discovery_images": self.on_discovery_images}


def switch_off(network, data, preprocess, off: dict, *, images_per_class: Optional[int] = None,
               batch_size: int = 32, progress=None, measured_on: str = "",
               on_discovery_images: bool = False) -> SwitchOffResult:
    """What the model would predict on ``data`` (labelled: an ImageFolderData) without the
    prototypes in ``off`` ({class index: [prototype indices]}); the original predictions are
    the decomposed network's, which equal the model's. ``measured_on`` names the labelled set
    in the result's words; ``on_discovery_images`` marks the images the prototypes were found
    on (the result then warns that its accuracy is optimistic)."""
    off = _normalise_off(off, network)
    items = [(c.class_index, p) for c in data.classes for p in (c.paths[:images_per_class] if images_per_class
                                                                else c.paths)]
    if not items:
        raise ConfigError("There are no labelled images to compare on.", "Give an image folder with class folders.")
    classes = sorted(off)  # the others keep the model's logits: their prototypes are not needed
    truth, before, after, kept_paths, skipped = [], [], [], [], []
    device = network.backbone_device
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch, kept, bad = load_batch(data.root, [p for _, p in chunk], preprocess)
        skipped += list(bad)
        if kept:
            label = dict((p, c) for c, p in chunk)
            with torch.inference_mode():
                e = network.explain_features(network.backbone(batch.to(device)).float(), classes=classes,
                                             with_maps=False)
            before.append(e.logits.argmax(1).cpu())
            after.append(edited_logits(e, off, network).argmax(1).cpu())
            truth += [label[p] for p in kept]
            kept_paths += list(kept)
        report(progress, "switch-off", min(start + batch_size, len(items)), len(items))
    if not kept_paths:
        raise ConfigError("None of the labelled images could be read.", "Check the image folder.")
    truth_t = torch.tensor(truth)
    before_t, after_t = torch.cat(before), torch.cat(after)
    changed = [{"path": p, "true": int(t), "original": int(b), "edited": int(a)}
               for p, t, b, a in zip(kept_paths, truth, before_t.tolist(), after_t.tolist()) if a != b]
    return SwitchOffResult(switched_off=off, images=len(kept_paths),
                           original_accuracy=float((before_t == truth_t).double().mean()),
                           edited_accuracy=float((after_t == truth_t).double().mean()), changed=changed,
                           skipped=[list(s) if isinstance(s, tuple) else s for s in skipped],
                           measured_on=measured_on, on_discovery_images=bool(on_discovery_images))


# --- in reports ---------------------------------------------------------------------------------

def prototype_note_html(notes: Optional[Annotations], class_index: int, prototype: int,
                        fidelity: Optional[float] = None) -> str:
    """The expert's flags and description of a prototype, and the low-fidelity warning, as
    escaped HTML for the reports ('' when there is nothing to say)."""
    parts = []
    warning = fidelity_warning(fidelity)
    if warning:
        parts.append(f'<p class="bad">{html.escape(warning)}</p>')
    note = notes.get(class_index, prototype) if notes is not None else PrototypeNote()
    if note.flags:
        parts.append("<p>Flagged: " + ", ".join(f"<b>{html.escape(f)}</b>" for f in note.flags) + "</p>")
    if note.description:
        parts.append(f'<p class="note">{html.escape(note.description)}</p>')
    return "".join(parts)
