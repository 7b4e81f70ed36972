"""The separate process in which a visitor's code is tried first (see :mod:`phpn.app.serving.isolation`).

    python -m phpn.app.serving.child REQUEST.json RESULT.json READY

Reads the request, writes READY once phpn and torch are imported (so the parent's time limit
covers the visitor's code, not Python's start-up), then loads the model exactly as the server
would (importing the model file, unpickling the trusted checkpoint), runs the doctor's trial
forward, and writes what it found to RESULT.json. Any exit without a result, or a result not
written in time, tells the parent the code is not safe to run in the server.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from phpn.api import merge_preprocess
from phpn.errors import PhpnError
from phpn.models import diagnose, load_model


def main(argv: list) -> int:
    request_file, result_file, ready_file = (Path(a) for a in argv[:3])
    request = json.loads(request_file.read_text(encoding="utf-8"))
    torch.set_num_threads(1)  # a trial, on a server others are using
    ready_file.write_text("ready", encoding="utf-8")
    try:
        loaded = load_model(request.get("checkpoint"), arch=request.get("arch"), model_def=request.get("model_def"),
                            trust_pickle=bool(request.get("trust_pickle")), num_classes=request.get("num_classes"))
        size = request.get("input_size")
        pre = loaded.preprocess
        if request.get("overrides"):  # the visitor's preprocessing, merged as the server will merge it
            pre = merge_preprocess(pre, request["overrides"])
        diagnosis = diagnose(loaded, input_size=tuple(size) if size else (pre.channels, pre.crop, pre.crop))
        result = {"ok": True, "num_classes": int(loaded.num_classes), "arch": str(loaded.arch),
                  "verdict": str(diagnosis.verdict)}
    except PhpnError as exc:
        result = {"ok": False, "message": str(exc), "user_error": True}
    except BaseException as exc:  # noqa: BLE001 - whatever the visitor's code raises, report it
        result = {"ok": False, "message": f"{type(exc).__name__}: {exc}", "user_error": False}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
