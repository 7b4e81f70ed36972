"""Files that users hand to the app: saved safely, unpacked safely.

Where they go (a private workspace per visitor, within quotas) is :mod:`phpn.app.serving.workspace`.

- :func:`save_upload`: write an uploaded file (anything with ``.name`` and ``.read()``/
  ``.getbuffer()``, e.g. Streamlit's ``UploadedFile``) under a sanitised name.
- :func:`save_model_upload`: the same for a checkpoint, whatever its extension, after sniffing
  its content (torch zip, safetensors, pickle; :func:`sniff_upload`), or for a zipped Hugging
  Face model folder; anything else is refused and deleted.
- :func:`unpack_uploaded_zip`: save a zip, unpack it and delete the archive, whether the
  archive was accepted or not.
- :func:`extract_zip`: unpack a zip of an image folder with the checks of
  :func:`phpn.models.archive.unpack_zip` (no paths outside, no links, a bounded file count and
  unpacked size), and return the folder that holds the class sub-folders.
- :func:`unpack_model_folder`: save a zipped Hugging Face model folder (what
  ``save_pretrained`` writes), unpack it with the same checks (and no archives inside), and
  return the folder holding ``config.json``; pickled ``.bin`` weights need the operator's
  switch for visitors' code and the visitor's trust, and a config asking for its own code is
  refused.
- :func:`open_uploaded_image`: decode an uploaded image after checking its pixel count in
  the header, so a decompression bomb is refused before it is decoded.

Every problem is a :class:`phpn.errors.DataError` whose message says what to do.
"""
from __future__ import annotations

import errno
import io
import json
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from PIL import Image

from phpn.app.serving.isolation import ENABLE_HINT, code_allowed
from phpn.app.serving.settings import load_settings
from phpn.errors import DataError, PhpnError
from phpn.images.preprocess import load_image
from phpn.models.archive import (
    CHUNK,
    IGNORED_TOP,
    MODEL_CONFIG,
    check_free_space,
    config_folders,
    disk_full_error,
    human_size,
    sniff_upload,
    unpack_zip,
)
from phpn.models.checkpoint import check_safetensors_header
from phpn.models.hf import check_config_budget, pickled_weights, weight_files

MAX_ZIP_FILES = 200_000
MAX_ZIP_BYTES = 2 * 2 ** 30  # total uncompressed size; the visitor's quota may lower it
MAX_IMAGE_PIXELS = 100_000_000
MAX_MODEL_ZIP_FILES = 1_000  # config.json, the weights (or their shards), the processor's settings
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


_HELD_LOCK = threading.Lock()
_HELD = {"bytes": 0}  # bytes of uploads the server holds in memory now, all visitors together


@contextmanager
def held_upload(size: int, limit: Optional[int] = None):
    """Count an upload that the server holds in memory while it is handled; refuse it when all
    the uploads held at once would pass the operator's limit (PHPN_HELD_UPLOADS_MB)."""
    limit = load_settings().held_uploads_bytes if limit is None else int(limit)
    size = max(0, int(size or 0))
    with _HELD_LOCK:
        if _HELD["bytes"] + size > limit:
            raise DataError(f"The server is full: it already holds {human_size(_HELD['bytes'])} of uploads, and "
                            f"this one ({human_size(size)}) would pass the {human_size(limit)} it may hold at once.",
                            "Try again in a minute.")
        _HELD["bytes"] += size
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD["bytes"] -= size


def save_upload(uploaded, directory, *, suffixes: Optional[tuple] = None, max_bytes: Optional[int] = None,
                what: str = "file") -> Path:
    """Write ``uploaded`` into ``directory`` under a sanitised name; return the path.

    ``suffixes`` (lower case, with dot) restricts the accepted file types; ``max_bytes``
    refuses larger files. The upload counts as held in memory while it is written
    (:func:`held_upload`); a full disk is said as such and leaves no partial file.
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
    with held_upload(size or 0):
        check_free_space(directory, size or 0)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        if hasattr(uploaded, "seek"):
            uploaded.seek(0)
        try:
            with open(path, "wb") as fh:
                if hasattr(uploaded, "getbuffer"):
                    fh.write(uploaded.getbuffer())
                else:
                    shutil.copyfileobj(uploaded, fh, CHUNK)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(size or CHUNK, directory) from None
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


# What to do when an archive is refused, said for what the zip should hold.
_IMAGE_ZIP = {
    "again": "Zip the image folder again (one sub-folder per class) and upload the .zip file.",
    "layout": "phpn refuses such archives; zip the image folder itself (one sub-folder per class) and upload that.",
    "links": "Links are refused; zip real image files only.",
    "count": "Upload fewer images (for example fewer per class) or give a folder on the server.",
    "size": "Upload fewer or smaller images, or give a folder on the server.",
    "empty": "Zip a folder with one sub-folder of images per class.",
    "itself": "Zip the image folder itself and upload that.",
}
_MODEL_ZIP = {
    "again": "Zip the folder that model.save_pretrained(folder) wrote and upload the .zip file.",
    "layout": "phpn refuses such archives; zip the folder that model.save_pretrained(folder) wrote and upload that.",
    "links": "Links are refused; zip the model folder's real files only.",
    "count": "A model folder holds a few files (config.json, the weights, preprocessor_config.json): zip only "
             "that folder.",
    "size": "Upload a smaller model, or ask the operator of this server to put the folder on the server.",
    "empty": "Zip the folder that model.save_pretrained(folder) wrote.",
    "itself": "Zip the model folder itself and upload that.",
}


def extract_zip(source, dest, *, max_files: int = MAX_ZIP_FILES, max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Unpack a zip of an image folder into ``dest`` (which must not exist or be empty).

    Returns the folder holding the class sub-folders (a single wrapping folder, as made by
    zipping the folder itself, is stepped into). The whole archive is refused, and
    nothing is left in ``dest``, when an entry is absolute or contains ``..``, is a link,
    when there are more than ``max_files`` files, or when they unpack to more than
    ``max_bytes`` bytes (counted as written, whatever the headers claim).
    """
    unpack_zip(source, dest, max_files=max_files, max_bytes=max_bytes, fixes=_IMAGE_ZIP)
    return find_image_root(dest)


@dataclass(frozen=True)
class ModelUpload:
    """An uploaded model, saved in the visitor's folder: a checkpoint file, or the folder of a
    zipped Hugging Face model (the one holding config.json)."""

    path: Path
    kind: str  # "checkpoint" or "model-folder-zip"
    name: str  # the uploaded file's name as the visitor's browser gave it (its last part)
    folder: str = ""  # in a zip: the folder that holds config.json ("" at the zip's top)


def original_name(uploaded) -> str:
    """The uploaded file's own name (its last part, at most 200 characters): what the visitor knows it by."""
    name = PurePosixPath(str(getattr(uploaded, "name", "upload")).replace("\\", "/")).name
    return "".join(ch for ch in name if ch.isprintable())[:200] or "upload"


def save_model_upload(uploaded, directory, *, max_bytes: int = MAX_ZIP_BYTES, trusted: bool = False,
                      settings=None) -> ModelUpload:
    """Save an uploaded checkpoint (any name, checked by content) or a zipped Hugging Face model
    folder (unpacked by :func:`unpack_model_folder`); anything else is refused and deleted.

    ``max_bytes`` bounds the upload and, for a zip, what it unpacks to; ``trusted`` is the
    visitor's choice to open pickled weights, which also needs the operator's switch.
    """
    directory = Path(directory)
    path = save_upload(uploaded, directory, max_bytes=max_bytes, what="checkpoint")
    container = None
    try:
        kind = sniff_upload(path)
        if kind == "safetensors":
            _check_budget(check_safetensors_header, path)
        if kind != "model-folder-zip":
            return ModelUpload(path=path, kind="checkpoint", name=original_name(uploaded))
        # Unpacked under the zip's own name, so that a config.json at the zip's top is in a folder
        # named as the visitor knows it (transformers' messages and the notes name the folder).
        stem = safe_filename(path.name[:-4] if path.name.lower().endswith(".zip") else path.name, "model")
        container = Path(tempfile.mkdtemp(prefix="model-", dir=directory))
        model = unpack_model_folder(path, container / stem, max_bytes=max(0, max_bytes - path.stat().st_size),
                                    trusted=trusted, settings=settings)
        path.unlink()  # the archive: only what it unpacked to is kept
        return ModelUpload(path=model, kind=kind, name=original_name(uploaded),
                           folder=model.relative_to(container / stem).as_posix() if model != container / stem
                           else "")
    except BaseException:
        path.unlink(missing_ok=True)
        if container is not None:
            shutil.rmtree(container, ignore_errors=True)
        raise


def _check_budget(check, *args) -> None:
    """A model's cost check (phpn.models), said as an upload's problem."""
    try:
        check(*args)
    except PhpnError as exc:
        raise DataError(exc.problem, exc.fix) from None


def find_model_folder(root) -> Path:
    """The folder under ``root`` (an unpacked zip) holding config.json: ``root`` or one folder down."""
    root = Path(root)
    names = [p.relative_to(root).as_posix() for p in root.glob(MODEL_CONFIG)] + \
        [p.relative_to(root).as_posix() for p in root.glob(f"*/{MODEL_CONFIG}")]
    folders = config_folders(names)
    if not folders:
        raise DataError(f"The zip file has no {MODEL_CONFIG} at its top or in a folder just below it, so it is not "
                        "a Hugging Face model folder.",
                        "Zip the folder that model.save_pretrained(folder) wrote (config.json beside "
                        "model.safetensors) and upload that.")
    if len(folders) > 1:
        shown = ", ".join(f"'{f or '(top)'}'" for f in folders[:5])
        raise DataError(f"The zip file holds {len(folders)} model folders with a {MODEL_CONFIG} ({shown}).",
                        "Zip one model folder at a time.")
    return root / folders[0] if folders[0] else root


def pickle_refusal(files: list, trusted: bool, settings=None) -> Optional[DataError]:
    """Why pickled weights files (``.bin``) in a visitor's model folder may not be opened, or None.

    They are opened only when the operator allows visitors' code and the visitor trusts them
    (``trusted``), as for any pickle a visitor uploads; safetensors need neither."""
    names = ", ".join(files[:3]) + (" …" if len(files) > 3 else "")
    safer = ("or save the weights as safetensors (model.save_pretrained(folder), the default) and upload the "
             "folder again.")
    if not code_allowed(settings):
        return DataError(f"The model folder's weights are {names}, a pickle, and opening visitors' pickles is "
                         "turned off on this server.",
                         "Save the weights as safetensors (model.save_pretrained(folder), the default) and upload "
                         f"the folder again. {ENABLE_HINT}")
    if not trusted:
        return DataError(f"The model folder's weights are {names}, a pickle, which is opened only for a file "
                         "you trust.", "Tick 'Trust this checkpoint' if you made it or trust its source, " + safer)
    return None


def unpack_model_folder(source, dest, *, max_bytes: int = MAX_ZIP_BYTES, max_files: int = MAX_MODEL_ZIP_FILES,
                        trusted: bool = False, settings=None) -> Path:
    """Unpack a zipped Hugging Face model folder into ``dest`` and return the folder holding config.json.

    The archive gets :func:`extract_zip`'s checks (paths, links, file count, unpacked size) and
    may hold no other archive. Refused, leaving nothing in ``dest``: no config.json at the top or
    one folder down; a config.json asking for the model's own code (``auto_map``: phpn never
    runs code from a model folder); pickled ``.bin`` weights without :func:`pickle_refusal`'s
    opt-ins. Nothing is downloaded: the folder is later opened with ``local_files_only=True``.
    """
    dest = Path(dest)
    unpack_zip(source, dest, max_files=max_files, max_bytes=max_bytes, fixes=_MODEL_ZIP, archives_inside=False)
    try:
        folder = find_model_folder(dest)
        try:
            config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"The model folder's {MODEL_CONFIG} is not readable JSON ({type(exc).__name__}).",
                            "Save the model again with save_pretrained and zip its folder.") from None
        if not isinstance(config, dict):
            raise DataError(f"The model folder's {MODEL_CONFIG} does not hold a JSON object.",
                            "Save the model again with save_pretrained and zip its folder.")
        _check_budget(check_config_budget, config, MODEL_CONFIG)
        if config.get("auto_map"):
            raise DataError(f"The model folder's {MODEL_CONFIG} asks for the model's own code (auto_map), which "
                            "phpn never runs from a model folder.",
                            "Use a model class that transformers ships, or upload its weights with your own "
                            "architecture file (.py) where this server allows visitors' code.")
        try:
            files = weight_files(folder)
        except PhpnError as exc:  # no weights: said without the server's folder
            raise DataError(f"The model folder has {MODEL_CONFIG} but no weights (model.safetensors or "
                            "pytorch_model.bin, or their shards).",
                            "Zip the whole folder that model.save_pretrained(folder) wrote.") from exc
        for name in files:
            if str(name).lower().endswith(".safetensors") and (folder / name).is_file():
                _check_budget(check_safetensors_header, folder / name)
        pickled = pickled_weights(files)
        refusal = pickle_refusal(pickled, trusted, settings) if pickled else None
        if refusal is not None:
            raise refusal
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return folder


def find_image_root(path) -> Path:
    """Step into single wrapping folders until the folder that holds the class folders."""
    path = Path(path)
    for _ in range(8):
        entries = [p for p in path.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_TOP]
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
