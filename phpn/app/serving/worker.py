"""The jailed worker that holds a visitor's model (see :mod:`phpn.app.serving.jail`).

Started by :class:`phpn.app.serving.jail.JailedModel` inside bubblewrap, never directly. It
says ``ready`` once phpn and torch are imported (so the time limit covers the visitor's code,
not Python's start-up), then answers messages on its stdin/stdout pipes:

- ``load``: load the model exactly as the server would (importing the model file,
  unpickling the trusted checkpoint) through :func:`phpn.api.open_model`, which runs the
  doctor's trial forward; answers what it found: the model's description, the doctor's
  verdict, the GFLOPs of one image's forward pass and, when the head splits exactly, the
  head's weight and bias (plain tensors);
- ``forward`` / ``features``: a batch in, logits or the backbone's features out;
- ``close``: exit.

The visitor's code may print: its stdout goes to stderr, so that only this module writes on
the pipe the server reads.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import replace

import torch

from phpn.api import open_model
from phpn.app.serving.cost import measure_cost
from phpn.app.serving.jail import tensor_of, write_message
from phpn.errors import PhpnError
from phpn.images.preprocess import Preprocess
from phpn.models import diagnose

_MEMORY_WORDS = ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate")


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def _read_message(stream) -> tuple:
    (size,) = struct.unpack("<I", _read_exactly(stream, 4))
    header = json.loads(_read_exactly(stream, size))
    nbytes = int(header.get("nbytes", 0))
    payload = _read_exactly(stream, nbytes) if nbytes else b""
    return header, tensor_of(header, payload)


def _load(request: dict) -> tuple:
    pre = Preprocess.from_dict(dict(request["preprocess"])) if request.get("preprocess") else None
    session = open_model(request.get("checkpoint"), arch=request.get("arch"), model_def=request.get("model_def"),
                         trust_pickle=bool(request.get("trust_pickle")), num_classes=request.get("num_classes"),
                         preprocess=pre, overrides=request.get("overrides") or None,
                         feature_layer=request.get("feature_layer"), head_layer=request.get("head_layer"))
    if request.get("input_size") and not pre and not request.get("overrides"):  # the trial's size, as asked
        session = replace(session, diagnosis=diagnose(session.loaded, input_size=tuple(request["input_size"]),
                                                      feature_layer=request.get("feature_layer"),
                                                      head_layer=request.get("head_layer")))
    loaded, diagnosis = session.loaded, session.diagnosis
    split = diagnosis.split
    info = {"ok": True, "num_classes": int(loaded.num_classes), "arch": str(loaded.arch),
            "verdict": str(diagnosis.verdict), "reason": str(diagnosis.reason), "sha256": str(loaded.sha256),
            "class_names": list(loaded.class_names) if loaded.class_names else None,
            "notes": [str(n) for n in loaded.notes], "diagnosis_notes": [str(n) for n in diagnosis.notes],
            "preprocess": session.preprocess.to_dict(),
            "feature_shape": list(diagnosis.feature_shape) if diagnosis.feature_shape else None,
            "input_size": list(diagnosis.input_size)}
    cost = measure_cost(loaded.model, diagnosis.input_size) if diagnosis.input_size else None
    if cost is not None:  # one image's forward pass at the trial's size: the server's budget is checked against it
        info["gflops"] = cost.gflops
    head = None
    if split is not None:
        info["split"] = {"feature_layer": split.feature_layer, "head_layer": split.head_layer,
                         "signed_features": bool(split.signed_features), "notes": [str(n) for n in split.notes],
                         "folded_layers": [str(n) for n in split.folded_layers],
                         "post_pool_norm": split.post_pool_norm is not None}
        # weight (C, D) and bias (C,) travel as one (C, D + 1) tensor
        head = torch.cat([split.weight.detach().float(), split.bias.detach().float()[:, None]], dim=1)
    return session, info, head


def _is_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _MEMORY_WORDS)


def serve(inbox, outbox) -> int:
    torch.set_num_threads(1)  # a worker on a server others are using
    write_message(outbox, {"op": "ready"})
    session = None
    while True:
        try:
            header, tensor = _read_message(inbox)
        except EOFError:
            return 0
        op = header.get("op")
        if op == "close":
            return 0
        reply, out = {"ok": True}, None
        try:
            if op == "load":
                session, reply, out = _load(header)
            elif op in ("forward", "features") and session is not None and tensor is not None:
                with torch.no_grad():
                    if op == "forward":
                        out = session.loaded.model(tensor)
                    else:
                        out = session.split.backbone(tensor)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"the model returned a {type(out).__name__}, not a tensor")
            else:
                reply = {"ok": False, "message": f"the worker cannot answer '{op}' now", "user_error": False}
        except PhpnError as exc:
            reply, out = {"ok": False, "message": exc.problem, "fix": exc.fix, "user_error": True}, None
        except BaseException as exc:  # noqa: BLE001 - whatever the visitor's code raises, report it
            kind = "memory" if _is_memory(exc) else "error"
            reply, out = {"ok": False, "message": f"{type(exc).__name__}: {exc}"[:2000], "kind": kind,
                          "user_error": False}, None
        write_message(outbox, reply, out)


def main() -> int:
    # The protocol owns the original stdout; everything printed goes to stderr.
    outbox = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(sys.stdin.buffer, outbox)


if __name__ == "__main__":
    sys.exit(main())
