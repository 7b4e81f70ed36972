"""What a checkpoint or an archive holds, by its content: one reading for the CLI, the API and
the app's uploads (the extension is never trusted).

- :func:`sniff_upload`: 'torch-zip', 'safetensors', 'pickle' or 'model-folder-zip' from a
  file's first bytes; anything else is a DataError saying what the file looks like instead.
- :func:`sniff_zip`: what a zip archive holds.
- :func:`unpack_zip`: unpack an archive a user handed over, refusing one that could escape its
  folder (absolute paths, ``..``), holds links, or is too large once unpacked (file count and
  total size, counted while writing so a lying header does not help): the one set of checks
  for image folders, model folders and runs.
"""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Optional

from phpn.errors import DataError

MODEL_CONFIG = "config.json"
# Archives inside an archive, refused where asked (by name: torch's own .bin files are zips too).
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar")
CHUNK = 1 << 20
# What :func:`unpack_zip` says to do when it refuses an archive, per kind of archive: again (not a
# zip), layout (a path outside), links, count, size, empty, itself (zip the folder itself).
ZIP_FIX_KEYS = ("again", "layout", "links", "count", "size", "empty", "itself")


IGNORED_TOP = {"__MACOSX"}



def config_folders(names) -> list:
    """The folders of a zip's member names that hold config.json: '' (the top) or one folder down."""
    found = []
    for name in names:
        parts = member_parts(name) or ()
        if parts and parts[-1] == MODEL_CONFIG and len(parts) <= 2 and parts[0] not in IGNORED_TOP:
            found.append("/".join(parts[:-1]))
    return sorted(set(found))



def sniff_zip(path: Path) -> str:
    """'torch-zip', 'model-folder-zip', or what else the zip is (a DataError's words)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged zip archive"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-zip"  # torch.save's zip format
    if config_folders(names):
        return "model-folder-zip"
    return ("a zip archive of other files (an image folder goes in the Images section; a Hugging Face model "
            "folder needs its config.json)")



def _sniff_other(head: bytes) -> str:
    kinds = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
             (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"BZh", "a bzip2 archive"),
             (b"\x93NUMPY", "a NumPy array file"), (b"\x89HDF", "an HDF5 (Keras) file")]
    for magic, kind in kinds:
        if head.startswith(magic):
            return kind
    try:
        text = head.decode("utf-8").lstrip().lower()
    except UnicodeDecodeError:
        return "a file of unknown type"
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in text):
        return "a file of unknown type"
    if text.startswith(("<!doctype html", "<html")):
        return "a web page (HTML)"
    return "a text file"



def sniff_upload(path) -> str:
    """What an uploaded model file holds by its first bytes: 'torch-zip', 'safetensors', 'pickle',
    or 'model-folder-zip' for a zip with config.json at its top or one folder down (a zipped
    Hugging Face model folder). The extension is not looked at (``.th``, ``.tar``, ``.ckpt`` or
    none are all fine); anything else is a DataError that says what the file looks like instead."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    name = path.name
    fix = ("Upload the weights saved with torch.save(model.state_dict(), path) or safetensors; any file name "
           "or extension will do.")
    if size == 0:
        raise DataError(f"The checkpoint '{name}' is empty (0 bytes).", fix)
    if head.startswith(b"PK\x03\x04"):
        kind = sniff_zip(path)
        if kind not in ("torch-zip", "model-folder-zip"):
            raise DataError(f"'{name}' is not a checkpoint: it is {kind}.", fix)
        return kind
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # torch.save's legacy format, or a plain pickle
    raise DataError(f"'{name}' is not a checkpoint: it looks like {_sniff_other(head)}.", fix)



def member_parts(name: str) -> Optional[tuple]:
    """The path components of a zip member, or None when the name is unsafe."""
    if "\x00" in name:
        return None
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return None
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def human_size(n: float) -> str:
    """A number of bytes in words: '512 bytes', '1.5 MB'."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_error(needed: int, where) -> DataError:
    """The sentence for a full disk: how much is needed, and where."""
    return DataError(f"The disk is full (needs {max(1, -(-int(needed) // 2 ** 20))} MB at {where}).",
                     "Ask the operator of this server to free some room, then try again.")


def check_free_space(directory, needed: int) -> None:
    """Refuse before writing when the disk holding ``directory`` has less room than ``needed``."""
    directory = Path(directory)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    try:
        free = shutil.disk_usage(existing).free
    except (OSError, TypeError):
        return
    if free < needed:
        raise disk_full_error(needed - free, directory)


def _is_link(info: zipfile.ZipInfo) -> bool:
    mode = (info.external_attr >> 16) & 0xFFFF
    return stat.S_ISLNK(mode) if mode else False


def _open_zip(source, fixes: dict) -> zipfile.ZipFile:
    try:
        if isinstance(source, (str, os.PathLike)):
            return zipfile.ZipFile(source)
        if hasattr(source, "getbuffer"):
            return zipfile.ZipFile(io.BytesIO(source.getbuffer()))
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        name = getattr(source, "name", str(source))
        raise DataError(f"{name} is not a readable zip archive ({exc}).", fixes["again"]) from None


def unpack_zip(source, dest, *, max_files: int, max_bytes: int, fixes: dict, archives_inside: bool = True) -> None:
    """Unpack the zip ``source`` (a path or a file object) into ``dest`` (new or empty).

    The whole archive is refused, and nothing is left in ``dest``, when an entry is absolute or
    contains ``..``, is a link or encrypted, when there are more than ``max_files`` files, or
    when they unpack to more than ``max_bytes`` bytes (counted as written, whatever the headers
    claim); ``archives_inside=False`` also refuses archives within it. ``fixes`` (keys
    ``ZIP_FIX_KEYS``) say what to do, for the kind of folder the zip should hold."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty.", "Unpack into a new folder.")
    with _open_zip(source, fixes) as zf:
        infos = zf.infolist()
        plan = []
        declared = 0
        for info in infos:
            parts = member_parts(info.filename)
            if parts is None:
                raise DataError(
                    f"The zip file contains an entry that would be written outside its folder ('{info.filename}').",
                    fixes["layout"])
            if _is_link(info):
                raise DataError(f"The zip file contains a symbolic link ('{info.filename}').", fixes["links"])
            if not parts or parts[0] in IGNORED_TOP or info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise DataError(f"The zip file is encrypted ('{info.filename}').", "Upload an unencrypted zip.")
            if not archives_inside and parts[-1].lower().endswith(ARCHIVE_SUFFIXES):
                raise DataError(f"The zip file contains another archive ('{info.filename}').",
                                "Unpack that archive first, then " + fixes["itself"][0].lower() + fixes["itself"][1:])
            plan.append((info, parts))
            declared += info.file_size
            if len(plan) > max_files:
                raise DataError(f"The zip file holds more than {max_files:,} files.", fixes["count"])
        if declared > max_bytes:
            raise DataError(f"The zip file would unpack to {human_size(declared)}, more than the {human_size(max_bytes)} "
                            "allowed.", fixes["size"])
        if not plan:
            raise DataError("The zip file is empty.", fixes["empty"])

        check_free_space(dest, declared)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        try:
            for info, parts in plan:
                target = root.joinpath(*parts)
                if root not in target.resolve().parents:  # belt and braces after the name check
                    raise DataError(f"The zip entry '{info.filename}' points outside its folder.", fixes["itself"])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while True:
                        chunk = src.read(CHUNK)
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > max_bytes:
                            raise DataError(f"The zip file unpacks to more than the {human_size(max_bytes)} allowed "
                                            "(its headers understate its size).", fixes["size"])
                        out.write(chunk)
        except DataError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # CRC errors, truncated data
            shutil.rmtree(dest, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(max(declared - written, CHUNK), dest.parent) from None
            raise DataError(f"The zip file is damaged ({type(exc).__name__}: {exc}).",
                            "Create the zip again and upload it.") from None
