"""Files written whole or not at all.

Every file phpn writes outside a run folder (notes, explanations, summaries, discovery
progress) goes through here: the content is written to a temporary sibling
(``.<name>.<random>.tmp``, hidden, in the same folder so the rename stays on one file
system), flushed to disk, then renamed over the target. A reader sees the old file or the
new one, never half of one; on any failure (an exception in the middle of writing, a full
disk, Ctrl-C) the temporary file is removed and the old file is left as it was.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from phpn.errors import PhpnError

TEMP_SUFFIX = ".tmp"


def temp_prefix(path) -> str:
    """How the temporary sibling of ``path`` starts (it ends with :data:`TEMP_SUFFIX`)."""
    return f".{Path(path).name}."


@contextmanager
def atomic_file(path, mode: str = "wb", encoding: Optional[str] = None) -> Iterator:
    """An open file whose content replaces ``path`` when the block ends without an error.

    ``mode`` is "wb" or "w" (text, ``encoding`` UTF-8 unless given). The parent folder must exist.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        kwargs = {"encoding": encoding or "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            # mkstemp makes the file private (0600); give it the mode a plain open() would have
            # (or the replaced file's own), so an atomic write is not also a change of permissions.
            os.fchmod(fh.fileno(), _mode_for(path))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permissions the written file gets: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread
    for a moment); 022 where the system does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_atomic(path, data: Union[bytes, str], encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "wb") as fh:
        fh.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)


def check_may_write(path, *, what: str, ours: Callable[[Path], bool], plural: Optional[str] = None,
                    owned: Optional[Callable[[str], bool]] = None, fix: str = "Choose another place, or move it away.",
                    error: type = PhpnError) -> Path:
    """The one rule for every place phpn writes: never through a link, never over anything phpn
    did not write. ``path`` may be new, or an existing ``what`` that ``ours(path)`` recognises
    (for a folder, ``owned(name)`` says which of its files phpn writes; any other file refuses
    it). An empty folder is new. Raises ``error`` with one wording everywhere; returns the path."""
    path = Path(path)
    if path.is_symlink():
        raise error(f"{path} is a symbolic link; phpn does not write {plural or what + 's'} through links.", fix)
    if not path.exists():
        return path
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            return path
        if not ours(path):
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise error(f"{path} is a folder that is not a {what} (it holds {shown}); phpn will not write into it.",
                        fix)
        foreign = [name for name in entries if owned is not None and not owned(name)]
        if foreign:
            raise error(f"The {what} folder {path} also holds files phpn did not write ({', '.join(foreign[:5])}); "
                        "phpn will not replace it.", "Move those files away or choose a new folder.")
        return path
    if not ours(path):
        kind = "is a file, not a" if owned is not None else "is not a"
        raise error(f"{path} exists and {kind} {what}; phpn will not replace it.", fix)
    return path
