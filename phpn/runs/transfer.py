"""A run handed over as a zip, taken in again: what the app's Export page gives (a folder with
run.json, the head, the shards and the expert's notes; ``phpn.show.report.run_zip_bytes``).

:func:`import_run_zip` unpacks the zip with the archive checks of
:func:`phpn.models.archive.unpack_zip` (no paths outside, no links, no archives inside, a
bounded file count and unpacked size), keeps the run's own files, verifies all of it as any
opened run is verified (the seal of run.json, every file's checksum, every shard's contents),
and only then moves it into place under a fresh name: never over an existing run or anything
else. Whatever is refused leaves nothing behind.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Optional

from phpn.errors import RunError
from phpn.models.archive import unpack_zip
from phpn.runs.audit_record import read_audit
from phpn.runs.record import META
from phpn.runs.store import AUDIT, is_run_file, verify_run

MAX_RUN_ZIP_FILES = 100_000  # run.json, the head, two files per shard of about 32 MB, the notes
MAX_RUN_ZIP_BYTES = 2 * 2 ** 30  # what the zip may unpack to; a visitor's quota may lower it
AUDIT_FILE = AUDIT  # the run's last audit: kept when it names this run (phpn.runs.audit_record)
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_EXPORT = "the zip the Export page gives (“Download the run (.zip)”)"
_RUN_ZIP = {
    "again": f"Upload {_EXPORT}.",
    "layout": f"phpn refuses such archives; upload {_EXPORT}.",
    "links": f"Links are refused; upload {_EXPORT}.",
    "count": f"A run's zip holds run.json, its head and its shards: upload {_EXPORT}.",
    "size": "Upload a smaller run, or ask the operator of this server for more room.",
    "empty": f"Upload {_EXPORT}.",
    "itself": f"Upload {_EXPORT}.",
}


def _zip_name(source) -> str:
    name = getattr(source, "name", None) or str(source)
    base = PurePosixPath(str(name).replace("\\", "/")).name
    return "".join(ch for ch in base if ch.isprintable())[:200] or "the zip"


def _run_folder(unpacked: Path, label: str) -> Path:
    """The folder of the unpacked zip holding run.json: its top, or the one folder just below."""
    found = sorted({p.parent for p in (*unpacked.glob(META), *unpacked.glob(f"*/{META}"))})
    if not found:
        raise RunError(f"'{label}' is not a phpn run: it has no {META} at its top or in a folder just below it.",
                       f"Upload {_EXPORT}.")
    if len(found) > 1:
        raise RunError(f"'{label}' holds {len(found)} runs.", "Upload one run's zip at a time.")
    return found[0]


def _keep_run_files(folder: Path, label: str) -> None:
    """Leave only the files of a run in ``folder``: its data, run.json, the notes and its audit
    (checked later). Hidden files (.DS_Store …) are let go; anything else is refused."""
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.is_symlink() and is_run_file(entry.name):
            continue
        if entry.is_file() and not entry.is_symlink() and entry.name == AUDIT_FILE:
            continue  # kept only if it is this run's own (checked once the run verifies)
        if entry.is_file() and entry.name.startswith("."):
            entry.unlink()
            continue
        raise RunError(f"'{label}' holds '{entry.name}' beside its run, which a run phpn exports does not have.",
                       f"Upload {_EXPORT} as it was downloaded.")


def _keep_own_audit(run, folder: Path) -> None:
    """The zip's audit stays when it names this very run and is as written (the export's own);
    any other is let go, as a file a run does not need."""
    if (folder / AUDIT_FILE).is_file():
        saved = read_audit(run)
        if saved is None or not saved.trusted:
            (folder / AUDIT_FILE).unlink()


def _fresh_name(text: str) -> str:
    name = _NAME_CHARS.sub("-", str(text)).strip("-._")[:100]
    return name or "run"


def _claim(into: Path, name: str) -> Path:
    """A new empty folder ``into/name`` (or ``name-2``, ``name-3`` …), made here and now, so that
    nothing there is ever written over."""
    for n in range(1, 10_000):
        target = into / (name if n == 1 else f"{name}-{n}")
        try:
            os.mkdir(target, 0o700)
            return target
        except FileExistsError:
            continue
    raise RunError(f"There are too many runs called {name} here.", "Give the run another name.")


def _said_for(exc: RunError, folder: Path, label: str) -> RunError:
    """A refusal of the unpacked run said for the zip (no path of the temporary folder)."""
    problem = exc.problem.replace(f"The run at {folder}", f"The run in '{label}'").replace(str(folder), f"'{label}'")
    return RunError(problem, f"Upload {_EXPORT} again as it was downloaded: a run changed after it was saved "
                             "is refused.")


def import_run_zip(source, into, *, name: Optional[str] = None, max_bytes: int = MAX_RUN_ZIP_BYTES,
                   max_files: int = MAX_RUN_ZIP_FILES) -> Path:
    """Take in a run's zip (a path or a file object, such as an upload) as a new run folder in
    ``into``; return that folder, verified whole. Its name is ``name``, else the zip's own folder
    (or the zip's name), with ``-2``, ``-3`` … added when a folder of that name is there already.

    Refused with a message, leaving nothing behind: an archive that is unsafe or too large
    (:func:`phpn.models.archive.unpack_zip`), one that holds no run or more than one, files a
    run does not have, and a run that does not verify (damaged, or changed after it was
    saved: the seal of run.json, the checksums of its files). Open the folder with
    ``phpn.open_run``, which finds the run's model.
    """
    into = Path(into)
    label = _zip_name(source)
    into.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".phpn-import.", dir=into))  # beside the target: moved, not copied
    target = None
    try:
        unpacked = work / "zip"
        unpack_zip(source, unpacked, max_files=max_files, max_bytes=max_bytes, fixes=_RUN_ZIP, archives_inside=False)
        folder = _run_folder(unpacked, label)
        _keep_run_files(folder, label)
        try:
            run = verify_run(folder)
        except RunError as exc:
            raise _said_for(exc, folder, label) from None
        _keep_own_audit(run, folder)
        stem = label[:-4] if label.lower().endswith(".zip") else label
        target = _claim(into, _fresh_name(name or (folder.name if folder != unpacked else stem)))
        os.replace(folder, target)  # onto the empty folder just claimed: the run appears whole
        return target
    except BaseException:
        if target is not None and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

