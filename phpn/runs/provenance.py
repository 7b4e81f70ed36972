"""Where a model the app loaded came from, told so that it means something to the person who
reads the run or a report: the uploaded file's own name, its sha256 and how it was loaded,
never the path of the visitor's workspace on the server.

- :func:`model_origin`: the record (``run.json``'s ``model.origin``) for a demo, an uploaded
  checkpoint, an uploaded zip of a Hugging Face model folder, or a path on the server (one of
  the operator's folders, so that path is meaningful to the server's users).
- :func:`describe_origin`: that record in words (``model.source`` of a run made in the app,
  the Model page, the reports).
- :func:`portable_path` / :func:`resolve_portable`: files in a visitor's workspace written as
  ``my files/<relative path>`` in the run, so that the app can reopen them for that visitor and
  a saved or exported run holds no server path.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Optional

from phpn.errors import ConfigError

# how -> how it reads in a sentence
LOADED_AS = {
    "demo": "built-in demo",
    "upload": "uploaded checkpoint",
    "hf-zip": "uploaded zip of a Hugging Face model folder",
    "server-path": "checkpoint on the server",
}
WORKSPACE_MARK = "my files/"  # as the app shows a visitor their own files


def model_origin(how: str, *, name: Optional[str] = None, path=None, folder: str = "",
                 sha256: Optional[str] = None) -> dict:
    """The origin record: ``how`` (a key of :data:`LOADED_AS`), the file's or demo's ``name``, the
    ``folder`` inside a zip that holds config.json, the server ``path`` (server paths only) and
    the checkpoint's ``sha256`` (phpn's checkpoint identity, as ``model.sha256``)."""
    if how not in LOADED_AS:
        raise ConfigError(f"Unknown way of loading a model: '{how}'.", f"Use one of: {', '.join(LOADED_AS)}.")
    record = {"how": how, "loaded_as": LOADED_AS[how]}
    if name:
        record["name"] = str(name)
    if folder:
        record["folder"] = str(folder)
    if how == "server-path" and path is not None:
        record["path"] = str(path)
        record.setdefault("name", Path(str(path)).name)
    if sha256:
        record["sha256"] = str(sha256)
    return record


def describe_origin(origin: Optional[dict]) -> str:
    """The origin in words: 'resnet.pt (uploaded checkpoint), sha256 3f2a…'."""
    if not isinstance(origin, dict) or origin.get("how") not in LOADED_AS:
        return ""
    how = origin["how"]
    if how == "server-path":
        text = f"{origin.get('path') or origin.get('name', '?')} ({LOADED_AS[how]})"
    elif how == "demo":
        text = f"the built-in {origin.get('name', '?')} demo"
    else:
        inside = f", folder '{origin['folder']}'" if origin.get("folder") else ""
        text = f"{origin.get('name', '?')}{inside} ({LOADED_AS[how]})"
    if origin.get("sha256"):
        text += f", sha256 {str(origin['sha256'])[:12]}…"
    return text


def origin_words(model_meta: Optional[dict]) -> str:
    """A run's ``model.origin`` in words without the sha256 (shown beside it), or "" without one."""
    origin = (model_meta or {}).get("origin") if isinstance(model_meta, dict) else None
    if not isinstance(origin, dict):
        return ""
    return describe_origin({k: v for k, v in origin.items() if k != "sha256"})


def portable_path(path, workspace) -> str:
    """``path`` as ``my files/<relative>`` when it is inside ``workspace`` (a folder), else as given."""
    if path is None:
        return path
    path, top = Path(str(path)), Path(workspace).resolve()
    try:
        relative = path.resolve().relative_to(top)
    except (ValueError, OSError):
        return str(path)
    return WORKSPACE_MARK + relative.as_posix()


def resolve_portable(text, workspace) -> Optional[Path]:
    """The file a ``my files/…`` path names in ``workspace`` (None when it would leave it); any
    other path as it is."""
    text = str(text)
    if not text.startswith(WORKSPACE_MARK):
        return Path(text)
    relative = PurePosixPath(text[len(WORKSPACE_MARK):])
    if relative.is_absolute() or ".." in relative.parts or workspace is None:
        return None
    return Path(workspace).joinpath(*relative.parts)


_FILE_KEYS = ("checkpoint", "model_def")  # the files of the app's load arguments (model_def: "file.py:Factory")


def recorded_load(spec: dict, workspace) -> dict:
    """The app's load arguments as a run records them: files in ``workspace`` as ``my files/…``."""
    recorded = dict(spec)
    for key in _FILE_KEYS:
        if recorded.get(key):
            recorded[key] = portable_path(recorded[key], workspace)
    return recorded


def load_from_record(recorded: dict, workspace) -> Optional[dict]:
    """The load arguments back, ``my files/…`` found in this visitor's ``workspace``; None when a
    file is recorded in a way that would leave it."""
    spec = dict(recorded)
    for key in _FILE_KEYS:
        if spec.get(key):
            path = resolve_portable(spec[key], workspace)
            if path is None:
                return None
            spec[key] = str(path)
    return spec
