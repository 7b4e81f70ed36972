"""A run's last audit, kept beside it in ``audit.json``.

The audit (:mod:`phpn.pipeline.audit`) takes minutes, so its result is kept with the run it
measured: the findings, the settings and the labelled images they were measured on, and the
run's identity (the sha256 of its sealed run.json and of its tensors). The file is outside the
seal: writing it never changes the run, and :func:`phpn.runs.store.verify_run` does not read it.
Instead it is checked when read: a file that names another run (another seal), names no run,
or whose content no longer matches the checksum it carries (hand-edited, damaged) is not
trusted; :func:`read_audit` says why, in words, and gives no findings. The checksum catches a
changed or damaged file, it is not a signature: anyone who can write the folder can write a
new audit. Writing is atomic and only over an audit phpn wrote; a shipped demo run is never
written to.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from phpn.atomic import check_may_write, write_atomic
from phpn.errors import RunError
from phpn.resources import ASSETS
from phpn.runs.record import canonical
from phpn.runs.store import AUDIT, META, is_run_folder

FORMAT_VERSION = 1
KIND = "phpn audit"
AUDIT_AGAIN = "Audit the run again to replace it."


@dataclass
class SavedAudit:
    """What ``audit.json`` beside a run holds: the audit as written (``audit``, a dict of
    ``Audit.to_dict()``) when it belongs to this run, else None and ``note`` says why."""

    path: Path
    audit: Optional[dict] = None
    note: str = ""
    saved_at: str = ""

    @property
    def trusted(self) -> bool:
        return self.audit is not None


def run_identity(run) -> Optional[dict]:
    """The saved run an audit belongs to: its seal (sha256 and id) and its tensors' sha256, or
    None when the run is not saved (nothing names it yet)."""
    record = run.record
    seal = record.seal
    tensors = record.tensors_sha256 or None
    if seal is None and tensors is None:
        return None
    return {"seal_sha256": seal.sha256 if seal else None, "seal_id": seal.id if seal else None,
            "tensors_sha256": tensors}


def _checksum(record: dict) -> str:
    return hashlib.sha256(canonical({key: value for key, value in record.items() if key != "sha256"})).hexdigest()


def _is_exported(data) -> bool:
    """An audit as a run's zip carries it (the audit's own dict with the expert's verdicts,
    :func:`phpn.show.report.audit_json`): phpn's, but naming no run."""
    return (isinstance(data, dict) and "kind" not in data and isinstance(data.get("prototypes"), list)
            and "summary" in data and "baseline_scores" in data)


def _is_audit_file(path: Path) -> bool:
    """Whether ``path`` is an audit phpn wrote (an existing file phpn may replace)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("kind") == KIND or _is_exported(data))


def is_shipped(folder) -> bool:
    """Whether ``folder`` lies among the assets phpn ships (a demo's run): never written to."""
    try:
        Path(folder).resolve().relative_to(ASSETS.resolve())
    except ValueError:
        return False
    return True


def why_not_saved(run) -> str:
    """Why an audit of ``run`` cannot be kept beside it, or "" when it can."""
    folder = run.path
    if folder is None or not (Path(folder) / META).is_file():
        return "The audit is not kept: the run is not saved yet (save it, then audit it, to keep the audit with it)."
    if is_shipped(folder):
        return ("The audit is not kept: this is a run shipped with phpn, which is never written to (save a copy "
                "of the run elsewhere to keep its audit with it).")
    if run_identity(run) is None:
        return "The audit is not kept: the run names no checksum (save the run again to seal it)."
    return ""


def save_audit(run, audit: dict) -> Path:
    """Write ``audit`` (``Audit.to_dict()``) beside the saved ``run`` as ``audit.json``,
    atomically, naming the run; replaces only an audit phpn wrote. A RunError when it cannot."""
    problem = why_not_saved(run)
    if problem:
        raise RunError(problem.replace("The audit is not kept: ", "The audit cannot be kept beside the run: "),
                       "Save the run to a folder of your own first.")
    folder = Path(run.path)
    if not is_run_folder(folder):
        raise RunError(f"{folder} is not a saved phpn run, so the audit has nowhere to go.",
                       "Save the run first (Discover page, or --out on the command line).")
    path = check_may_write(folder / AUDIT, what="phpn audit", ours=_is_audit_file, error=RunError,
                           fix=f"Move {AUDIT} away from the run folder, then audit again.")
    return write_atomic(path, json.dumps(audit_record(run, audit), indent=1, ensure_ascii=False))


def audit_record(run, audit: dict) -> dict:
    """What ``audit.json`` holds: ``audit`` (``Audit.to_dict()``) naming the saved ``run`` it was
    measured on, with the time and a checksum of it all (beside a run, or in a run's zip)."""
    record = {"kind": KIND, "format_version": FORMAT_VERSION, "run": run_identity(run),
              "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "audit": audit}
    record["sha256"] = _checksum(record)
    return record


def read_audit(run) -> Optional[SavedAudit]:
    """The audit kept beside ``run`` (None when there is none), trusted only when it names this
    run and its content is as written; otherwise ``SavedAudit.note`` says why it is not shown."""
    if run.path is None:
        return None
    path = Path(run.path) / AUDIT
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        return SavedAudit(path, note=f"The {AUDIT} beside this run is not a plain file, so it is not read. "
                                     f"{AUDIT_AGAIN}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return SavedAudit(path, note=f"The {AUDIT} beside this run cannot be read ({type(exc).__name__}). "
                                     f"{AUDIT_AGAIN}")
    if _is_exported(record):
        return SavedAudit(path, note=f"The {AUDIT} beside this run is an audit exported with a run's zip, which does "
                                     f"not name the run it was measured on, so its findings are not shown. "
                                     f"{AUDIT_AGAIN}")
    if not isinstance(record, dict) or record.get("kind") != KIND or record.get("format_version") != FORMAT_VERSION:
        return SavedAudit(path, note=f"The {AUDIT} beside this run is not a phpn audit of format {FORMAT_VERSION}. "
                                     f"{AUDIT_AGAIN}")
    saved_at = str(record.get("saved_at") or "")
    if record.get("sha256") != _checksum(record):
        return SavedAudit(path, saved_at=saved_at,
                          note=f"The {AUDIT} beside this run was changed after phpn wrote it (it no longer matches "
                               f"its checksum), so its findings are not shown. {AUDIT_AGAIN}")
    named, ours = record.get("run"), run_identity(run)
    problem = _identity_problem(named, ours)
    if problem:
        return SavedAudit(path, saved_at=saved_at, note=f"The {AUDIT} beside this run {problem}, so its findings "
                                                        f"are not shown. {AUDIT_AGAIN}")
    audit = record.get("audit")
    if not isinstance(audit, dict) or not isinstance(audit.get("prototypes"), list):
        return SavedAudit(path, saved_at=saved_at, note=f"The {AUDIT} beside this run holds no findings. {AUDIT_AGAIN}")
    return SavedAudit(path, audit=audit, saved_at=saved_at)


def _identity_problem(named, ours) -> str:
    """How the run an audit names differs from this run (by every checksum both name), or ""."""
    if not isinstance(named, dict) or not (named.get("seal_sha256") or named.get("tensors_sha256")):
        return "does not name the run it was measured on"
    if ours is None:
        return "cannot be matched to this run (the run is not saved)"
    compared = False
    for key, words in (("seal_sha256", "run sha256"), ("tensors_sha256", "tensors sha256")):
        if named.get(key) and ours.get(key):
            compared = True
            if named[key] != ours[key]:
                return (f"belongs to another run ({words} {str(named[key])[:12]}…, this run's is "
                        f"{ours[key][:12]}…)")
    return "" if compared else "names its run in a way this run cannot be checked against"
