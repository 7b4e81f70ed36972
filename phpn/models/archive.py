"""What a checkpoint or an archive holds, by its content: one reading for the CLI, the API and
the app's uploads (the extension is never trusted).

- :func:`sniff_upload`: 'torch-zip', 'safetensors', 'pickle' or 'model-folder-zip' from a
  file's first bytes; anything else is a DataError saying what the file looks like instead.
- :func:`sniff_zip`: what a zip archive holds.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Optional

from phpn.errors import DataError

MODEL_CONFIG = "config.json"


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
