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
from typing import Iterator, Optional, Union

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
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path, data: Union[bytes, str], encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` atomically; returns ``path``."""
    with atomic_file(path, "wb") as fh:
        fh.write(data.encode(encoding) if isinstance(data, str) else data)
    return Path(path)
