"""Every visitor's files in a private workspace, within quotas, removed when left idle.

Layout under the workspace root (one per server user, mode 700)::

    <root>/.server-key            the secret that signs browser keys (mode 600)
    <root>/.shares/               read-only share links (phpn.app.serving.shares)
    <root>/<workspace id>/        one visitor (mode 700), named by a digest of their browser key
        uploads/<upload-xxxx>/    each upload in a fresh folder
        runs/<name>/              runs the visitor saved
        .last-active              touched on every page the visitor opens

A visitor's workspace is found from a *browser key*: a random value signed with the server's
secret, held by the visitor's browser and never put in a URL (see phpn.app.frame). The folder
name is a digest of the key, so the folder names do not give the key away.

Streamlit has no hook for a session's end, so :func:`sweep_idle` deletes workspaces whose
``.last-active`` is older than the idle limit; the app calls it at start-up and then every
few minutes.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError, DataError
from phpn.models.archive import human_size

ACTIVITY_FILE = ".last-active"
SERVER_KEY_FILE = ".server-key"
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_BROWSER_KEY = re.compile(r"^([A-Za-z0-9_-]{32,64})\.([0-9a-f]{32})$")


def _check_private_folder(path: Path, what: str) -> None:
    """A real folder (not a link), ours, closed to others; else a ConfigError for the operator."""
    info = os.lstat(path)
    hint = ("Remove it or point PHPN_UPLOAD_DIR at a new folder, then restart the app.")
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"The {what} is a symbolic link; phpn refuses to write through it.", hint)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"The {what} exists and is not a folder.", hint)
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(f"The {what} belongs to another user.", hint)
    if info.st_mode & 0o077:
        raise ConfigError(f"The {what} can be read or written by other users (mode {oct(info.st_mode & 0o777)}).",
                          hint)


def _make_private_folder(path: Path, what: str) -> Path:
    """Create ``path`` with mode 700, or accept it only if it already is a private folder of ours.

    ``os.mkdir`` fails when anything (a link included) is already at ``path``, so a link planted
    there in advance is never followed.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_private_folder(path, what)
    return path


def workspace_root(settings: Optional[ServerSettings] = None) -> Path:
    """The folder that holds every visitor's workspace, created safely (and only when the
    operator's data folders lie apart from it)."""
    settings = settings or load_settings()
    if settings.upload_dir is not None:
        root = Path(settings.upload_dir)
        if not root.parent.is_dir():
            raise ConfigError("The folder that PHPN_UPLOAD_DIR names is in a folder that does not exist.",
                              "Create its parent folder or choose another one, then restart the app.")
    else:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        root = Path(tempfile.gettempdir()) / f"phpn-{uid}"
    check_roots_apart(root, settings)
    return _make_private_folder(root, "workspace root")


def check_roots_apart(root: Path, settings: ServerSettings) -> None:
    """Refuse operator folders that overlap the workspaces: a data root (or the shared runs, or a
    writable root) that contains the workspace root would list every visitor's workspace and
    open their files; one inside it would be deleted with an idle workspace."""
    named = [("PHPN_DATA_ROOTS", r) for r in settings.data_roots]
    named += [("PHPN_WRITABLE_ROOTS", r) for r in settings.writable_roots]
    if settings.shared_runs is not None:
        named.append(("PHPN_SHARED_RUNS", settings.shared_runs))
    for variable, folder in named:
        if is_within(root, folder):
            raise ConfigError(f"The folder {folder} in {variable} contains the visitors' workspaces ({root}): "
                              "every visitor could open the others' files.",
                              "Name folders apart from PHPN_UPLOAD_DIR (or move PHPN_UPLOAD_DIR out of them), "
                              "then restart the app.")
        if is_within(folder, root):
            raise ConfigError(f"The folder {folder} in {variable} lies inside the visitors' workspaces ({root}).",
                              "Name folders apart from PHPN_UPLOAD_DIR, then restart the app.")


def _server_key(root: Path) -> bytes:
    """The secret that signs browser keys, made once per workspace root (mode 600)."""
    path = root / SERVER_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
        raise ConfigError(f"The server's key file {path} is not a private file.",
                          "Delete it (visitors then start new sessions) and restart the app.")
    return path.read_text(encoding="ascii").strip().encode()


def _sign(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


def new_browser_key(settings: Optional[ServerSettings] = None) -> str:
    """A fresh browser key: 192 random bits and the server's signature of them."""
    value = secrets.token_urlsafe(24) + secrets.token_urlsafe(12)
    return f"{value}.{_sign(_server_key(workspace_root(settings)), value)}"


def workspace_id(browser_key, settings: Optional[ServerSettings] = None) -> Optional[str]:
    """The workspace folder name for a browser key this server made, else None (a key that was
    typed, guessed or made by another server is never accepted)."""
    match = _BROWSER_KEY.match(str(browser_key or ""))
    if match is None:
        return None
    key = _server_key(workspace_root(settings))
    if not hmac.compare_digest(_sign(key, match.group(1)), match.group(2)):
        return None
    return hashlib.sha256(f"workspace:{browser_key}".encode()).hexdigest()[:32]


class Workspace:
    """One visitor's private folder: uploads, saved runs, usage against the quotas."""

    def __init__(self, session_id: str, settings: Optional[ServerSettings] = None):
        if not _SESSION_ID.match(str(session_id)):
            raise ConfigError("The session id is not valid.", "Reload the page to start a new session.")
        self.settings = settings or load_settings()
        self.root = workspace_root(self.settings)
        self.path = _make_private_folder(self.root / str(session_id), "visitor's workspace")
        self.made_here: set = set()  # upload folders this browser session made (the only ones it removes)
        self.touch()

    @property
    def uploads(self) -> Path:
        path = self.path / "uploads"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    @property
    def runs(self) -> Path:
        path = self.path / "runs"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def touch(self) -> None:
        (self.path / ACTIVITY_FILE).touch()

    def new_upload_dir(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.uploads))
        self.made_here.add(folder.name)
        return folder

    def usage(self) -> int:
        return folder_size(self.path)

    def room(self) -> int:
        """Bytes this visitor may still add: the smaller of what is left of both quotas."""
        mine = self.settings.session_quota_bytes - self.usage()
        everyone = self.settings.total_quota_bytes - folder_size(self.root)
        return max(0, min(mine, everyone))

    def check_room(self, nbytes: int, what: str = "This upload") -> None:
        """Refuse ``nbytes`` more when a quota would be exceeded (the message says which)."""
        mine = self.usage()
        if mine + nbytes > self.settings.session_quota_bytes:
            raise DataError(f"{what} ({human_size(nbytes)}) would take your files past this server's "
                            f"{human_size(self.settings.session_quota_bytes)} per visitor "
                            f"(you use {human_size(mine)}).",
                            "Upload fewer or smaller images, or start a new session (files of idle sessions "
                            "are removed).")
        total = folder_size(self.root)
        if total + nbytes > self.settings.total_quota_bytes:
            raise DataError(f"{what} ({human_size(nbytes)}) does not fit: the server's space for uploads "
                            "is full.", "Try again later or upload fewer images.")

    def keep_within_quota(self, new_folder, what: str = "This run") -> None:
        """After writing ``new_folder`` here: over a quota, delete it again and say so."""
        size = folder_size(new_folder)
        try:
            self.check_room(0, what)
        except DataError:
            shutil.rmtree(new_folder, ignore_errors=True)
            self.check_room(size, what)  # the message, with the folder's size
            raise

    def owns(self, path) -> bool:
        return is_within(path, self.path)

    def forget_uploads(self, keep=()) -> int:
        """Delete the upload folders this browser session made that hold none of ``keep`` (the
        files still in use); return how many. Another tab's uploads and saved runs are not touched."""
        removed = 0
        for folder in self.uploads.iterdir():
            if folder.is_symlink() or not folder.is_dir() or folder.name not in self.made_here:
                continue
            if not any(is_within(path, folder) for path in keep if path):
                shutil.rmtree(folder, ignore_errors=True)
                self.made_here.discard(folder.name)
                removed += 1
        return removed

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def removed_on_error(folders: list):
    """Delete the folders appended to ``folders`` inside the block if the block fails: a refused
    upload leaves nothing behind. Streamlit's rerun/stop signals (not Exceptions) pass through."""
    try:
        yield folders
    except Exception:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def folder_size(path) -> int:
    """Bytes of the files below ``path`` (links not followed)."""
    total = 0
    for base, dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                continue
    return total


def is_within(path, folder) -> bool:
    """Whether ``path`` (links resolved) is ``folder`` or below it."""
    try:
        real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    except (OSError, ValueError):
        return False
    return real == top or top in real.parents


def last_active(workspace: Path) -> float:
    marker = workspace / ACTIVITY_FILE
    try:
        return marker.stat().st_mtime
    except OSError:
        return workspace.lstat().st_mtime


def sweep_idle(settings: Optional[ServerSettings] = None, *, now: Optional[float] = None,
               keep: tuple = ()) -> int:
    """Delete workspaces idle for longer than ``idle_hours``; return how many were removed.

    Only folders phpn created (a direct sub-folder of the workspace root, not a link) are
    removed; the sessions in ``keep`` are left alone.
    """
    settings = settings or load_settings()
    root = workspace_root(settings)
    now = time.time() if now is None else now
    limit = settings.idle_hours * 3600
    removed = 0
    kept = {str(k) for k in keep}
    for child in root.iterdir():
        try:
            if (child.name in kept or child.name.startswith(".") or child.is_symlink() or not child.is_dir()
                    or not _SESSION_ID.match(child.name)):
                continue
            if now - last_active(child) > limit:
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed
