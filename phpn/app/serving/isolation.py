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

from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from phpn.api import ModelSession
from phpn.app.serving.cost import check_input_pixels
from phpn.app.serving.jail import ISOLATE_SWITCH, JailedModel, require_jail, runs_code
from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError
from phpn.head import HeadSplit, LoadedModel
from phpn.images.preprocess import Preprocess
from phpn.models.doctor import Diagnosis

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
    request = {k: v for k, v in request.items() if v is not None}
    with JailedModel(request, settings=settings, load_timeout_s=timeout_s) as jailed:
        info = jailed.info
    return {"ok": True, "num_classes": info["num_classes"], "arch": info["arch"], "verdict": info["verdict"]}


def check_request_pixels(request: dict, settings: Optional[ServerSettings] = None) -> None:
    """Refuse preprocessing (``overrides`` / ``preprocess`` crop, ``input_size``) whose inputs are larger than
    the operator allows, before any model is built or run."""
    settings = settings or load_settings()
    crops = [(request.get("overrides") or {}).get("crop"), (request.get("preprocess") or {}).get("crop")]
    size = request.get("input_size")
    for crop in crops:
        if crop:
            check_input_pixels(int(crop), int(crop), settings)
    if size:
        check_input_pixels(int(size[1]), int(size[2]), settings)


def isolated(request: dict, settings: Optional[ServerSettings] = None) -> bool:
    """Whether the visitor's model ``request`` is to run in a jailed worker: their code always (where
    allowed); a visitor's weights-only checkpoint or folder when the operator says so
    (PHPN_ISOLATE_ALL_MODELS). A built-in demo runs in the server."""
    if runs_code(request):
        return True
    return bool(request.get("checkpoint") and not request.get("demo")
                and (settings or load_settings()).isolate_all_models)


_REQUEST_KEYS = ("checkpoint", "model_def", "trust_pickle", "arch", "num_classes", "input_size", "overrides",
                 "preprocess", "feature_layer", "head_layer")


def open_jailed(request: dict, *, settings: Optional[ServerSettings] = None) -> JailedModel:
    """A jailed worker holding the visitor's model (see :class:`JailedModel`); the caller closes it.
    A model file or a trusted pickle needs PHPN_ALLOW_CODE; weights alone need only the jail.
    ``request``: checkpoint, model_def, trust_pickle, arch, num_classes, input_size, overrides,
    preprocess (a dict of its fields), feature_layer, head_layer."""
    settings = settings or load_settings()
    if runs_code(request):
        require_code_allowed("a model file" if request.get("model_def") else "a trusted (pickled) checkpoint",
                             settings)
    else:  # weights only: loaded by the worker with torch.load(weights_only=True) or safetensors
        require_jail(ISOLATE_SWITCH)
    request = {k: v for k, v in request.items() if k in _REQUEST_KEYS and v is not None}
    if request.get("checkpoint") is not None:
        request["checkpoint"] = str(request["checkpoint"])
    check_request_pixels(request, settings)
    return JailedModel(request, settings=settings)


def open_jailed_session(request: dict, *, class_names: Optional[list] = None,
                        settings: Optional[ServerSettings] = None) -> ModelSession:
    """:func:`open_jailed` then :func:`jailed_session`: what the app opens for a visitor's model."""
    session = jailed_session(open_jailed(request, settings=settings))
    if class_names is not None:
        session.loaded = replace(session.loaded, class_names=list(class_names))
    return session


def jailed_worker(session) -> Optional[JailedModel]:
    """The jailed worker behind a session's model, or None for a model the server holds itself."""
    model = getattr(getattr(session, "loaded", None), "model", None)
    return model.jailed if isinstance(model, JailedForward) else None


def stop_jailed(session, why: str = "it was cancelled") -> None:
    """Kill the worker behind ``session`` (cancel, the visitor left); nothing for other models."""
    worker = jailed_worker(session)
    if worker is not None:
        worker.kill(why)


class JailedForward(nn.Module):
    """A stand-in for the visitor's model (``op="forward"``: logits) or its backbone
    (``op="features"``) inside the server: every call is a batch sent to the jailed worker.
    It has no weights of its own; copies share the one worker."""

    def __init__(self, jailed: JailedModel, op: str):
        super().__init__()
        self.jailed, self.op = jailed, op

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = images.device
        batch = images.detach().to("cpu", torch.float32)
        out = self.jailed.forward(batch) if self.op == "forward" else self.jailed.features(batch)
        return out.to(device)

    def __deepcopy__(self, memo):
        return self


def jailed_session(jailed: JailedModel) -> ModelSession:
    """The :class:`phpn.api.ModelSession` of a model held by a jailed worker: its description, the
    doctor's verdict made in the jail, and a split whose head (weight and bias, plain tensors) is
    in the server while the backbone's forward passes run in the worker."""
    info = jailed.info
    pre = Preprocess.from_dict(dict(info["preprocess"]))
    loaded = LoadedModel(model=JailedForward(jailed, "forward"), arch=info["arch"], num_classes=info["num_classes"],
                         sha256=info["sha256"], preprocess=pre, class_names=info.get("class_names"),
                         notes=list(info.get("notes") or []) + ["runs in a jailed worker"])
    split = None
    about = info.get("split")
    if about is not None and not about.get("post_pool_norm"):
        head = jailed.head
        split = HeadSplit(backbone=JailedForward(jailed, "features"), weight=head[:, :-1].contiguous(),
                          bias=head[:, -1].contiguous(), signed_features=bool(about["signed_features"]),
                          feature_layer=about["feature_layer"], head_layer=about["head_layer"],
                          notes=list(about["notes"]), folded_layers=list(about["folded_layers"]))
    verdict, reason = info["verdict"], info["reason"]
    if about is not None and split is None:
        verdict, reason = "impossible", ("Its head normalises the pooled features (a LayerNorm), which phpn does not "
                                         "yet read through a jailed worker.")
    diagnosis = Diagnosis(verdict, reason, split=split,
                          feature_shape=tuple(info["feature_shape"]) if info.get("feature_shape") else None,
                          notes=list(info.get("diagnosis_notes") or []), arch=info["arch"],
                          input_size=tuple(info.get("input_size") or ()))
    return ModelSession(loaded=loaded, diagnosis=diagnosis, preprocess=pre)
