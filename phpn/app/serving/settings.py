"""The operator's settings for an app that other people can reach.

Each setting is written once here: its key in the ``[phpn]`` table of the settings file, its
environment variable, its default and what it means. An environment variable wins over the
file. The settings file is ``$PHPN_SETTINGS_FILE`` if set, else ``.streamlit/phpn.toml`` in the
folder ``streamlit run`` starts from (Streamlit's own ``config.toml`` warns about unknown
sections, so phpn keeps its table in a file of its own). Visitors cannot change any of them.

The defaults are safe for an app that strangers can reach: no visitor code runs, no typed
server path is opened, every visitor works in a private workspace.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Optional

import torch

from phpn.errors import ConfigError

SETTINGS_FILE_ENV = "PHPN_SETTINGS_FILE"
DEFAULT_SETTINGS_FILE = Path(".streamlit") / "phpn.toml"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ServerSettings:
    """What the operator allows. Field metadata: the environment variable and the meaning."""

    allow_code: bool = False
    isolate_all_models: bool = False
    code_timeout_s: float = 120.0
    data_roots: tuple = ()
    writable_roots: tuple = ()
    shared_runs: Optional[Path] = None
    upload_dir: Optional[Path] = None
    session_quota_mb: float = 2048.0
    total_quota_mb: float = 20480.0
    idle_hours: float = 6.0
    max_discoveries: int = 0
    discoveries_per_visitor: int = 2
    job_timeout_s: float = 600.0
    worker_idle_s: float = 900.0
    worker_memory_mb: float = 8192.0
    worker_cpu_s: float = 7200.0
    worker_processes: int = 16
    worker_file_mb: float = 1024.0
    max_input_pixels: int = 1024 * 1024
    max_forward_gflops: float = 500.0
    held_uploads_mb: float = 1024.0

    @property
    def session_quota_bytes(self) -> int:
        return int(self.session_quota_mb * 2 ** 20)

    @property
    def held_uploads_bytes(self) -> int:
        return int(self.held_uploads_mb * 2 ** 20)

    @property
    def total_quota_bytes(self) -> int:
        return int(self.total_quota_mb * 2 ** 20)

    def discovery_slots(self) -> int:
        """How many discoveries run at once: the setting, or 1 per GPU (1 on a CPU)."""
        if self.max_discoveries > 0:
            return self.max_discoveries
        return max(1, torch.cuda.device_count())


# key -> (environment variable, meaning). The manual's table of settings (docs/MANUAL.md) is this table.
SETTINGS = {
    "allow_code": ("PHPN_ALLOW_CODE",
                   "visitors may run an uploaded Python model file or unpickle a checkpoint they trust "
                   "(it runs only in a jailed worker: bubblewrap, no network, its own files only, limits); off by default"),
    "isolate_all_models": ("PHPN_ISOLATE_ALL_MODELS",
                           "every visitor's model, weights-only checkpoints and Hugging Face folders too, is loaded "
                           "and run in a jailed worker on the CPU, as visitors' code is; off by default: such models "
                           "run in the server (a worker's start takes seconds and its memory)"),
    "code_timeout_s": ("PHPN_CODE_TIMEOUT",
                       "seconds the jailed worker may take to import, build and try the visitor's model"),
    "data_roots": ("PHPN_DATA_ROOTS",
                   "server folders (separated by ':') under which visitors may type paths to checkpoints, "
                   "image folders, class-name files and runs (read-only); none by default"),
    "writable_roots": ("PHPN_WRITABLE_ROOTS",
                       "folders (separated by ':') where visitors may type paths as under the data roots and also "
                       "save runs; none by default: visitors write only in their own workspace"),
    "shared_runs": ("PHPN_SHARED_RUNS", "a folder of runs that every visitor may list and open, read-only"),
    "upload_dir": ("PHPN_UPLOAD_DIR",
                   "where the visitors' private workspaces live (default: phpn-<user id> in the temporary folder)"),
    "session_quota_mb": ("PHPN_SESSION_QUOTA_MB", "MB of uploads and saved runs one visitor's workspace may hold"),
    "total_quota_mb": ("PHPN_TOTAL_QUOTA_MB", "MB all workspaces together may hold"),
    "idle_hours": ("PHPN_IDLE_HOURS", "a workspace unused for this many hours is deleted"),
    "max_discoveries": ("PHPN_MAX_DISCOVERIES",
                        "discoveries that run at once, the others wait in a queue (0: one per GPU, 1 on a CPU)"),
    "discoveries_per_visitor": ("PHPN_DISCOVERIES_PER_VISITOR",
                                "discoveries one visitor (one browser, all its tabs) may have queued or running at "
                                "once; one more is refused (0: no limit)"),
    "job_timeout_s": ("PHPN_JOB_TIMEOUT",
                      "seconds one forward pass of a visitor's model (a batch of a discovery, an explanation) may "
                      "take in its jailed worker; then the worker is killed"),
    "worker_idle_s": ("PHPN_WORKER_IDLE_S",
                      "seconds a jailed worker may sit unused (its visitor left) before it is killed; it starts "
                      "again when used"),
    "worker_memory_mb": ("PHPN_WORKER_MEMORY_MB", "MB of address space a jailed worker may use (Python and torch alone take 2 to 4 GB of it)"),
    "worker_cpu_s": ("PHPN_WORKER_CPU_S", "CPU seconds a jailed worker may use in all"),
    "worker_processes": ("PHPN_WORKER_PROCESSES", "processes and threads a jailed worker may run at once"),
    "worker_file_mb": ("PHPN_WORKER_FILE_MB", "MB a jailed worker may write to one file (in its private /tmp)"),
    "max_input_pixels": ("PHPN_MAX_INPUT_PIXELS",
                         "pixels (height x width) of one input image the model is given after preprocessing"),
    "max_forward_gflops": ("PHPN_MAX_FORWARD_GFLOPS",
                           "GFLOPs one image's forward pass may cost (counted at the model's own input size and "
                           "scaled by pixels), so a costly model gets smaller inputs; 0: only the pixel cap"),
    "held_uploads_mb": ("PHPN_HELD_UPLOADS_MB", "MB of uploads the server holds in memory at once, all visitors"),
}


def _parse(key: str, value, where: str):
    kind = {f.name: f.type for f in fields(ServerSettings)}[key]
    text = str(value).strip() if not isinstance(value, (list, tuple, bool, int, float)) else value

    def bad(expected: str):
        return ConfigError(f"The setting {where} is '{value}', not {expected}.",
                           f"Fix it and restart the app ({key}: {SETTINGS[key][1]}).")

    if kind == "bool":
        if isinstance(text, bool):
            return text
        if str(text).lower() in _TRUE:
            return True
        if str(text).lower() in _FALSE:
            return False
        raise bad("1 or 0")
    if kind in ("float", "int"):
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not number >= 0 or number == float("inf"):
            raise bad("a finite number ≥ 0")
        return int(number) if kind == "int" else number
    if kind == "tuple":
        items = text if isinstance(text, (list, tuple)) else [p for p in str(text).split(os.pathsep) if p.strip()]
        roots = []
        for item in items:
            path = Path(str(item).strip()).expanduser()
            if not path.is_absolute():
                raise bad("a list of absolute folders")
            roots.append(path)
        return tuple(roots)
    # an optional folder
    if not text:
        return None
    path = Path(str(text)).expanduser()
    if not path.is_absolute():
        raise bad("an absolute folder")
    return path


def _read_file(path: Path) -> dict:
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("phpn", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"The settings file {path.name} cannot be read ({exc}).",
                          "Fix it (a [phpn] table of key = value lines) and restart the app.") from None
    unknown = sorted(set(table) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"The settings file {path.name} has unknown keys: {', '.join(unknown)}.",
                          f"Known keys: {', '.join(SETTINGS)}.")
    return table


def load_settings(environ: Optional[Mapping] = None, settings_file: Optional[Path] = None) -> ServerSettings:
    """The settings now in force: environment variables over the settings file over the defaults."""
    env = os.environ if environ is None else environ
    file = settings_file or Path(env.get(SETTINGS_FILE_ENV) or DEFAULT_SETTINGS_FILE)
    values = {}
    if Path(file).is_file():
        for key, value in _read_file(Path(file)).items():
            values[key] = _parse(key, value, f"{key} in {Path(file).name}")
    for key, (variable, _) in SETTINGS.items():
        if variable in env:
            values[key] = _parse(key, env[variable], variable)
    return ServerSettings(**values)


def settings_table() -> list:
    """(key, environment variable, default, meaning) for every setting: the manual's table (docs/MANUAL.md)."""
    defaults = ServerSettings()
    return [(key, var, getattr(defaults, key), meaning) for key, (var, meaning) in SETTINGS.items()]
