"""Files that users hand to the app: saved safely, unpacked safely.

Where they go (a private workspace per visitor, within quotas) is :mod:`phpn.serving.workspace`.

- :func:`save_upload`: write an uploaded file (anything with ``.name`` and ``.read()``/
  ``.getbuffer()``, e.g. Streamlit's ``UploadedFile``) under a sanitised name.
- :func:`save_checkpoint_upload`: the same for a checkpoint, whatever its extension, after
  sniffing its content (torch zip, safetensors, pickle); anything else is refused and deleted.
- :func:`unpack_uploaded_zip`: save a zip, unpack it and delete the archive, whether the
  archive was accepted or not.
- :func:`extract_zip`: unpack a zip of an image folder, refusing archives that could
  escape their folder (absolute paths, ``..``), contain links, or are too large once
  unpacked (file count and total size, counted while writing so a lying header does not
  help), and return the folder that holds the class sub-folders.
- :func:`open_uploaded_image`: decode an uploaded image after checking its pixel count in
  the header, so a decompression bomb is refused before it is decoded.

Every problem is a :class:`phpn.errors.DataError` whose message says what to do.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from .errors import DataError
from .serving.workspace import human_size

MAX_ZIP_FILES = 200_000
MAX_ZIP_BYTES = 2 * 2 ** 30  # total uncompressed size; the visitor's quota may lower it
MAX_IMAGE_PIXELS = 100_000_000
_CHUNK = 1 << 20
_IGNORED_TOP = {"__MACOSX"}
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload") -> str:
    """The last path component of ``name`` with anything unusual replaced by ``_``."""
    base = PurePosixPath(str(name).replace("\\", "/")).name
    base = _SAFE_CHARS.sub("_", base).strip("._") or default
    stem, dot, suffix = base.rpartition(".")
    if dot and len(base) > 120:
        base = stem[: 120 - len(suffix) - 1] + "." + suffix
    return base[:120]


def _size_of(uploaded) -> Optional[int]:
    size = getattr(uploaded, "size", None)
    if size is not None:
        return int(size)
    buf = getattr(uploaded, "getbuffer", None)
    if buf is not None:
        return len(buf())
    return None


def save_upload(uploaded, directory, *, suffixes: Optional[tuple] = None, max_bytes: Optional[int] = None,
                what: str = "file") -> Path:
    """Write ``uploaded`` into ``directory`` under a sanitised name; return the path.

    ``suffixes`` (lower case, with dot) restricts the accepted file types; ``max_bytes``
    refuses larger files.
    """
    name = safe_filename(getattr(uploaded, "name", "upload"))
    if suffixes is not None and not name.lower().endswith(tuple(suffixes)):
        raise DataError(f"The {what} '{name}' has an unexpected file type.",
                        f"Upload a file ending in {', '.join(suffixes)}.")
    size = _size_of(uploaded)
    if max_bytes is not None and size is not None and size > max_bytes:
        raise DataError(f"The {what} '{name}' is {human_size(size)}, more than the {human_size(max_bytes)} allowed.",
                        "Upload a smaller file, or ask the operator of this server for more room.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if hasattr(uploaded, "seek"):
        uploaded.seek(0)
    if hasattr(uploaded, "getbuffer"):
        data = uploaded.getbuffer()
        with open(path, "wb") as fh:
            fh.write(data)
    else:
        with open(path, "wb") as fh:
            shutil.copyfileobj(uploaded, fh, _CHUNK)
    return path


def _sniff_zip(path: Path) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged zip archive"
    if any(n.endswith("data.pkl") for n in names):
        return None  # torch.save's zip format
    return "a zip archive of other files (an image folder goes in the Images section)"


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


def sniff_checkpoint(path) -> str:
    """What a file holds by its first bytes: 'torch-zip', 'safetensors' or 'pickle'.

    The extension is not looked at (``.th``, ``.tar``, ``.ckpt`` or none are all fine). Anything
    else is a DataError that says what the file looks like instead.
    """
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
        other = _sniff_zip(path)
        if other:
            raise DataError(f"'{name}' is not a checkpoint: it is {other}.", fix)
        return "torch-zip"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # torch.save's legacy format, or a plain pickle
    raise DataError(f"'{name}' is not a checkpoint: it looks like {_sniff_other(head)}.", fix)


def save_checkpoint_upload(uploaded, directory, *, max_bytes: Optional[int] = None) -> Path:
    """Save an uploaded checkpoint under any name; refuse (and delete) what is not one."""
    path = save_upload(uploaded, directory, max_bytes=max_bytes, what="checkpoint")
    try:
        sniff_checkpoint(path)
    except DataError:
        path.unlink(missing_ok=True)
        raise
    return path


def unpack_uploaded_zip(uploaded, folder, *, max_bytes: int = MAX_ZIP_BYTES, max_files: int = MAX_ZIP_FILES) -> Path:
    """Save an uploaded zip in ``folder``, unpack it to ``folder/images`` and delete the archive.

    The archive is deleted at once whether it was accepted or refused, and a refused one
    leaves nothing behind. ``max_bytes`` bounds both the archive and what it unpacks to.
    """
    folder = Path(folder)
    archive = None
    try:
        archive = save_upload(uploaded, folder / "archive", suffixes=(".zip",), max_bytes=max_bytes,
                              what="zip file")
        return extract_zip(archive, folder / "images", max_files=max_files,
                           max_bytes=max(0, max_bytes - archive.stat().st_size))
    except BaseException:
        shutil.rmtree(folder / "images", ignore_errors=True)
        raise
    finally:
        shutil.rmtree(folder / "archive", ignore_errors=True)
        try:
            folder.rmdir()  # only when nothing is left in it: a refused upload leaves no trace
        except OSError:
            pass


def _member_parts(name: str) -> Optional[tuple]:
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


def _is_link(info: zipfile.ZipInfo) -> bool:
    mode = (info.external_attr >> 16) & 0xFFFF
    return stat.S_ISLNK(mode) if mode else False


def _open_zip(source) -> zipfile.ZipFile:
    try:
        if isinstance(source, (str, os.PathLike)):
            return zipfile.ZipFile(source)
        if hasattr(source, "getbuffer"):
            return zipfile.ZipFile(io.BytesIO(source.getbuffer()))
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        name = getattr(source, "name", str(source))
        raise DataError(f"{name} is not a readable zip archive ({exc}).",
                        "Zip the image folder again (one sub-folder per class) and upload the .zip file.") from None


def extract_zip(source, dest, *, max_files: int = MAX_ZIP_FILES, max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Unpack a zip of an image folder into ``dest`` (which must not exist or be empty).

    Returns the folder holding the class sub-folders (a single wrapping folder, as made by
    zipping the folder itself, is stepped into). The whole archive is refused, and
    nothing is left in ``dest``, when an entry is absolute or contains ``..``, is a link,
    when there are more than ``max_files`` files, or when they unpack to more than
    ``max_bytes`` bytes (counted as written, whatever the headers claim).
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty.", "Unpack into a new folder.")
    with _open_zip(source) as zf:
        infos = zf.infolist()
        plan = []
        declared = 0
        for info in infos:
            parts = _member_parts(info.filename)
            if parts is None:
                raise DataError(
                    f"The zip file contains an entry that would be written outside its folder ('{info.filename}').",
                    "phpn refuses such archives; zip the image folder itself (one sub-folder per class) and upload that.")
            if _is_link(info):
                raise DataError(f"The zip file contains a symbolic link ('{info.filename}').",
                                "Links are refused; zip real image files only.")
            if not parts or parts[0] in _IGNORED_TOP or info.is_dir():
                continue
            if info.flag_bits & 0x1:
                raise DataError(f"The zip file is encrypted ('{info.filename}').", "Upload an unencrypted zip.")
            plan.append((info, parts))
            declared += info.file_size
            if len(plan) > max_files:
                raise DataError(f"The zip file holds more than {max_files:,} files.",
                                "Upload fewer images (for example fewer per class) or give a folder on the server.")
        if declared > max_bytes:
            raise DataError(f"The zip file would unpack to {human_size(declared)}, more than the {human_size(max_bytes)} "
                            "allowed.", "Upload fewer or smaller images, or give a folder on the server.")
        if not plan:
            raise DataError("The zip file is empty.", "Zip a folder with one sub-folder of images per class.")

        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written = 0
        try:
            for info, parts in plan:
                target = root.joinpath(*parts)
                if root not in target.resolve().parents:  # belt and braces after the name check
                    raise DataError(f"The zip entry '{info.filename}' points outside its folder.",
                                    "Zip the image folder itself and upload that.")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > max_bytes:
                            raise DataError(f"The zip file unpacks to more than the {human_size(max_bytes)} allowed "
                                            "(its headers understate its size).",
                                            "Upload fewer or smaller images, or give a folder on the server.")
                        out.write(chunk)
        except DataError:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # CRC errors, truncated data
            shutil.rmtree(dest, ignore_errors=True)
            raise DataError(f"The zip file is damaged ({type(exc).__name__}: {exc}).",
                            "Create the zip again and upload it.") from None
    return find_image_root(dest)


def find_image_root(path) -> Path:
    """Step into single wrapping folders until the folder that holds the class folders."""
    path = Path(path)
    for _ in range(8):
        entries = [p for p in path.iterdir() if not p.name.startswith(".") and p.name not in _IGNORED_TOP]
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if len(dirs) == 1 and not files and any(q.is_dir() for q in dirs[0].iterdir()):
            path = dirs[0]
            continue
        break
    return path


def open_uploaded_image(source, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode an uploaded image (file object, bytes or path) as RGB after checking its size.

    The pixel count is read from the header first, so a decompression bomb is refused
    before it is decoded.
    """
    from PIL import Image

    from .data import load_image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    name = getattr(source, "name", "the image")
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        with Image.open(source) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        w = h = None
    except Exception as exc:
        raise DataError(f"{name} is not a readable image ({type(exc).__name__}: {exc}).",
                        "Use a PNG, JPEG, BMP, GIF, TIFF or WebP file.") from None
    if w is None or w * h > max_pixels:
        size = f" ({w} x {h} pixels)" if w else ""
        raise DataError(f"{name} is too large to decode safely{size}.",
                        f"Resize it below {max_pixels // 1_000_000} megapixels and try again.")
    if hasattr(source, "seek"):
        source.seek(0)
    return load_image(source)
