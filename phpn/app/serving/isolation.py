"""The operator's switch for visitors' code, and the trial of that code in the jail.

Two things a visitor can ask for run code on the server: an uploaded Python model file (it is
imported) and a checkpoint they "trust" (it is unpickled in full). Neither happens unless the
operator set ``PHPN_ALLOW_CODE=1`` (or ``allow_code = true`` in the settings file) *and*
bubblewrap can build the jail on this server: see :func:`require_code_allowed`. The CLI is not
affected: there the user's own ``--model-def`` / ``--trust-pickle`` flags are the opt-in, for
code on their own machine.

Such code runs only in a jailed worker (:mod:`phpn.app.serving.jail`): no network, its own
files only, a scrubbed environment, limits on memory, CPU time, processes and file size, and a
time limit after which it is killed. :func:`try_in_child_process` loads the model there once
(the import, the factory, the state-dict load, the unpickling and the doctor's trial forward)
and reports what it found; :func:`open_jailed` keeps the worker to serve forward passes.
"""
from __future__ import annotations

from typing import Optional

from phpn.app.serving.jail import JailedModel, check_input_pixels, require_jail
from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError

ENABLE_HINT = ("The operator of this server can allow it by setting PHPN_ALLOW_CODE=1 before "
               "`streamlit run app.py` (only on a server whose visitors are trusted).")
CODE_OFF_MESSAGE = "Running visitors' code is turned off on this server."


def code_allowed(settings: Optional[ServerSettings] = None) -> bool:
    return (settings or load_settings()).allow_code


def require_code_allowed(what: str, settings: Optional[ServerSettings] = None) -> None:
    """Refuse ``what`` (e.g. 'a model file') unless the operator allows visitors' code and the
    jail can be built here (bubblewrap installed, namespaces allowed)."""
    if not code_allowed(settings):
        raise ConfigError(f"{CODE_OFF_MESSAGE} {what[0].upper() + what[1:]} cannot be used.", ENABLE_HINT)
    require_jail()


def try_in_child_process(checkpoint, *, model_def: Optional[str] = None, trust_pickle: bool = False,
                         arch: Optional[str] = None, num_classes: Optional[int] = None,
                         input_size: Optional[tuple] = None, overrides: Optional[dict] = None,
                         timeout_s: Optional[float] = None, settings: Optional[ServerSettings] = None) -> dict:
    """Load the model once in a jailed worker with a time limit; return what it found.

    ``input_size`` (C, H, W) or the preprocessing ``overrides`` set the trial forward's input.
    Raises ConfigError when the switch is off, the jail cannot be built, the input is larger
    than allowed, or the code ends the worker, runs out of time, memory or CPU, or fails (with
    the worker's message). The worker is killed before this returns.
    """
    settings = settings or load_settings()
    require_code_allowed("a model file" if model_def else "a trusted (pickled) checkpoint", settings)
    size = tuple(input_size) if input_size else None
    crop = (overrides or {}).get("crop")
    if size:
        check_input_pixels(int(size[1]), int(size[2]), settings)
    if crop:
        check_input_pixels(int(crop), int(crop), settings)
    request = {"checkpoint": str(checkpoint) if checkpoint is not None else None, "model_def": model_def,
               "trust_pickle": bool(trust_pickle), "arch": arch, "num_classes": num_classes,
               "input_size": list(size) if size else None, "overrides": overrides or None}
    with JailedModel(request, settings=settings, load_timeout_s=timeout_s) as jailed:
        info = jailed.info
    return {"ok": True, "num_classes": info["num_classes"], "arch": info["arch"], "verdict": info["verdict"]}


def open_jailed(request: dict, *, settings: Optional[ServerSettings] = None) -> JailedModel:
    """A jailed worker holding the visitor's model (see :class:`JailedModel`); the caller closes it."""
    settings = settings or load_settings()
    require_code_allowed("a model file" if request.get("model_def") else "a trusted (pickled) checkpoint", settings)
    return JailedModel(request, settings=settings)
