"""Which server paths a visitor may name, and messages that never show server paths.

- :func:`visitor_path`: a path a visitor typed is opened only when it lies under one of the
  operator's ``PHPN_DATA_ROOTS`` (links resolved first); with none set, typed paths are off.
- :func:`check_confined`: files found inside such a folder (an image folder's files) are each
  resolved, and a link that leads out of the data root is refused.
- :func:`readable_runs`: the runs a visitor may open: their own workspace's, the operator's
  shared folder (``PHPN_SHARED_RUNS``, read-only) and the shipped demo runs (read-only).
- :func:`run_save_target`: where a visitor may save a run: their workspace, or under a root
  the operator made writable (``PHPN_WRITABLE_ROOTS``); the data roots are read-only, and a
  shipped demo run or the shared folder is never a target.
- :func:`redact_paths`: server paths in a message become their last component.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.app.serving.workspace import Workspace, is_within
from phpn.demos import DEMOS
from phpn.errors import ConfigError, DataError, RunError

PATHS_OFF_FIX = ("Upload the file instead. The operator can allow folders on this server with "
                 "PHPN_DATA_ROOTS=/data/models:/data/images before `streamlit run app.py`.")

# An absolute POSIX path (two or more components) or a Windows drive path, inside a message.
_POSIX_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s'\"`,;:()<>|*?/]+/)+([^\s'\"`,;:()<>|*?/]*)")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s'\"`,;:()<>|*?\\]+\\)+([^\s'\"`,;:()<>|*?\\]*)")
_HOME_PATH = re.compile(r"~/(?:[^\s'\"`,;:()<>|*?/]+/)*([^\s'\"`,;:()<>|*?/]*)")


def redact_paths(text: str) -> str:
    """``text`` with every server path shortened to ``…/<last component>``."""
    def short(match: re.Match) -> str:
        return f"…/{match.group(1)}" if match.group(1) else "…/"

    for pattern in (_WINDOWS_PATH, _POSIX_PATH, _HOME_PATH):
        text = pattern.sub(short, text)
    return text


def visitor_path(text: str, what: str, settings: Optional[ServerSettings] = None,
                 workspace: Optional[Workspace] = None) -> Path:
    """The server path a visitor typed, if they may read it; else a ConfigError.

    Allowed: paths under the operator's data roots, and (so that the app's own defaults work)
    the visitor's workspace, the shared runs and the shipped demos. The roots are checked
    before the path is looked at, so a refusal says nothing about what exists elsewhere.
    """
    settings = settings or load_settings()
    text = str(text).strip()
    typed = Path(text).expanduser()
    if typed.is_absolute() and may_read(typed, workspace, settings):
        return typed
    roots = tuple(settings.data_roots) + tuple(settings.writable_roots)
    if not roots:
        raise ConfigError(f"Paths on this server are turned off for visitors, so the {what} cannot be opened.",
                          PATHS_OFF_FIX)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = roots[0] / path
    if not any(is_within(path, root) for root in roots):
        names = ", ".join(str(r) for r in roots)
        raise ConfigError(f"The {what} is outside the folders this server allows.",
                          f"Give a path under {names} (PHPN_DATA_ROOTS), or upload the file.")
    return path


def data_root_of(path, settings: Optional[ServerSettings] = None) -> Optional[Path]:
    """The operator's data (or writable) root ``path`` lies under (links resolved), or None."""
    settings = settings or load_settings()
    return next((root for root in (*settings.data_roots, *settings.writable_roots) if is_within(path, root)), None)


def check_confined(folder, settings: Optional[ServerSettings] = None) -> None:
    """Refuse a folder under a data root when anything in it is a link that leads out of that
    data root: every entry is looked at on its own (links are not followed by the walk), so a
    linked class folder or image is caught too. Folders outside the data roots are not concerned."""
    settings = settings or load_settings()
    root = data_root_of(folder, settings)
    if root is None:
        return
    leaving = []
    for base, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(base) / name
            if path.is_symlink() and not is_within(path, root):
                leaving.append(path.relative_to(folder).as_posix())
    if leaving:
        raise DataError(f"{len(leaving)} link(s) in the folder lead outside the server's data folders "
                        f"(the first: {sorted(leaving)[0]}); phpn does not follow them.",
                        "Ask the operator to copy those images into the data folder instead of linking them.")


def demo_run_dirs() -> list:
    return [demo.run_dir for demo in DEMOS.values()]


def readable_runs(workspace: Optional[Workspace], settings: Optional[ServerSettings] = None) -> list:
    """``(label, path)`` of every run this visitor may open, their own newest first."""
    settings = settings or load_settings()
    found = []
    if workspace is not None:
        own = sorted((p.parent for p in workspace.runs.glob("*/run.json")), key=lambda p: p.stat().st_mtime,
                     reverse=True)
        found += [(f"my runs / {p.name}", p) for p in own]
    if settings.shared_runs is not None and Path(settings.shared_runs).is_dir():
        found += [(f"shared / {p.parent.name}", p.parent) for p in sorted(Path(settings.shared_runs).glob("*/run.json"))]
    for run_dir in demo_run_dirs():
        if (run_dir / "run.json").is_file():
            found.append((f"demo / {run_dir.parent.name}", run_dir))
    return found


def may_read(path, workspace: Optional[Workspace], settings: Optional[ServerSettings] = None) -> bool:
    """Whether a visitor may read files at ``path`` (own workspace, shared runs, demos, data roots)."""
    settings = settings or load_settings()
    allowed = list(settings.data_roots) + list(settings.writable_roots)
    if workspace is not None:
        allowed.append(workspace.path)
    if settings.shared_runs is not None:
        allowed.append(settings.shared_runs)

    allowed += [demo.assets_dir for demo in DEMOS.values()]
    return any(is_within(path, root) for root in allowed)


def read_only_reason(path, settings: Optional[ServerSettings] = None) -> Optional[str]:
    """Why a visitor may not write at ``path`` (a shipped demo, the shared runs, a data root the
    operator did not make writable), or None."""
    settings = settings or load_settings()

    for demo in DEMOS.values():
        if is_within(path, demo.assets_dir) or is_within(demo.assets_dir, path):
            return f"the {demo.name} demo's files are read-only"
    if settings.shared_runs is not None and (is_within(path, settings.shared_runs)
                                             or is_within(settings.shared_runs, path)):
        return "the shared runs are read-only"
    if data_root_of(path, settings) is not None and not any(is_within(path, w) for w in settings.writable_roots):
        return "the server's data folders are read-only"
    return None


def run_save_target(text: str, workspace: Workspace, settings: Optional[ServerSettings] = None) -> Path:
    """Where to save a run the visitor named: a name saves into their workspace; an absolute
    path only under a writable root. Shipped demo runs and the shared folder are never targets."""
    settings = settings or load_settings()
    text = str(text).strip()
    if not text:
        raise RunError("No name given for the run.", "Type a name for the saved run.")
    if "/" not in text and "\\" not in text and text not in (".", ".."):
        target = workspace.runs / text
    else:
        target = visitor_path(text, "folder to save the run in", settings)
        if not any(is_within(target, w) for w in settings.writable_roots) and read_only_reason(target, settings) is None:
            raise RunError("Runs are saved in your private workspace: this server lets visitors write nowhere else.",
                           "Type a name (no '/') to save the run in your workspace; the operator can name folders "
                           "where visitors may save with PHPN_WRITABLE_ROOTS.")
    reason = read_only_reason(target, settings)
    if reason:
        raise RunError(f"A run cannot be saved there: {reason}.", "Save it under a new name in your workspace.")
    return target
