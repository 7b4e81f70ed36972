"""Read-only share links: one saved run of a visitor (and its notes) for whoever holds the link.

A share is a random token (192 bits) that the visitor who made it hands on; the server keeps
only its digest, in ``<workspace root>/.shares/<digest>.json`` with the owner's workspace id
and the run's folder name. Opening a link gives that run folder and nothing else of the
owner's workspace: no uploads list, no other runs, no writing. The owner lists and revokes
their links; a link dies with the run or with the owner's workspace (idle sweep).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.app.serving.workspace import Workspace, _make_private_folder, is_within, workspace_root
from phpn.atomic import write_atomic
from phpn.errors import RunError

SHARES_FOLDER = ".shares"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
REVOKED_PROBLEM = "This shared link has been revoked, or the run it showed is no longer on the server."


def _revoked() -> RunError:
    return RunError(REVOKED_PROBLEM, "Ask the person who shared it for a new link.")


@dataclass(frozen=True)
class Share:
    digest: str  # what the server keeps of the token
    owner: str  # the workspace id of the visitor who made it
    run_name: str  # the run's folder name in the owner's workspace (runs/<name>)
    created: float
    run_dir: Path  # where the run is now


def token_digest(token: str) -> str:
    """What the server keeps of a link token (the token itself is shown once, to its maker)."""
    return hashlib.sha256(f"share:{token}".encode()).hexdigest()[:40]


def _folder(settings: Optional[ServerSettings]) -> Path:
    return _make_private_folder(workspace_root(settings) / SHARES_FOLDER, "share links folder")


def _run_dir(root: Path, owner: str, name: str) -> Optional[Path]:
    """The owner's saved run, only when it is a real run folder inside their runs folder."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{8,64}", owner) or "/" in name or name in ("", ".", ".."):
        return None
    runs = root / owner / "runs"
    folder = runs / name
    if folder.is_symlink() or not folder.is_dir() or not is_within(folder, runs):
        return None
    return folder if (folder / "run.json").is_file() else None


def create_share(workspace: Workspace, run_dir, settings: Optional[ServerSettings] = None) -> str:
    """A new link token for ``run_dir``, a run saved in ``workspace`` (the only runs a visitor
    may share); returns the token (shown once: the server keeps only its digest)."""
    settings = settings or load_settings()
    run_dir = Path(run_dir)
    if not is_within(run_dir, workspace.runs) or Path(os.path.realpath(run_dir)).parent != Path(
            os.path.realpath(workspace.runs)) or not (run_dir / "run.json").is_file():
        raise RunError("Only a run saved in your workspace can be shared.",
                       "Save the run on the Discover page first, then copy a link to it.")
    token = secrets.token_urlsafe(24)
    record = {"owner": workspace.path.name, "run": run_dir.name, "created": time.time()}
    write_atomic(_folder(settings) / f"{token_digest(token)}.json", json.dumps(record).encode())
    return token


def _read(path: Path, root: Path) -> Optional[Share]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        owner, name, created = str(record["owner"]), str(record["run"]), float(record["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = _run_dir(root, owner, name)
    if folder is None:
        return None
    return Share(digest=path.stem, owner=owner, run_name=name, created=created, run_dir=folder)


def open_share(token, settings: Optional[ServerSettings] = None) -> Share:
    """The run a link token opens; a revoked, unknown or malformed token is refused with a sentence."""
    token = str(token or "").strip()
    if not _TOKEN.match(token):
        raise _revoked()
    root = workspace_root(settings)
    path = _folder(settings) / f"{token_digest(token)}.json"
    share = _read(path, root) if path.is_file() and not path.is_symlink() else None
    if share is None:
        raise _revoked()
    return share


def list_shares(workspace: Workspace, settings: Optional[ServerSettings] = None) -> list:
    """The links ``workspace``'s visitor made that still open a run, oldest first."""
    root = workspace_root(settings)
    found = []
    for path in sorted(_folder(settings).glob("*.json")):
        share = _read(path, root)
        if share is not None and share.owner == workspace.path.name:
            found.append(share)
    return sorted(found, key=lambda s: s.created)


def revoke_share(workspace: Workspace, digest: str, settings: Optional[ServerSettings] = None) -> bool:
    """Revoke one of the visitor's own links (by its digest); returns whether one was revoked."""
    if not re.fullmatch(r"[0-9a-f]{40}", str(digest)):
        return False
    path = _folder(settings) / f"{digest}.json"
    share = _read(path, workspace_root(settings)) if path.is_file() else None
    if share is None or share.owner != workspace.path.name:
        return False
    path.unlink(missing_ok=True)
    return True


def sweep_shares(settings: Optional[ServerSettings] = None) -> int:
    """Delete the records of links whose run or workspace is gone; returns how many."""
    root = workspace_root(settings)
    removed = 0
    for path in _folder(settings).glob("*.json"):
        if _read(path, root) is None:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


__all__ = ["REVOKED_PROBLEM", "Share", "create_share", "list_shares", "open_share", "revoke_share", "sweep_shares",
           "token_digest"]
