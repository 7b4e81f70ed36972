"""The operator's switch for visitors' code, and a separate process that tries the code first.

Two things a visitor can ask for run code on the server: an uploaded Python model file (it is
imported) and a checkpoint they "trust" (it is unpickled in full). Neither happens unless the
operator set ``PHPN_ALLOW_CODE=1`` (or ``allow_code = true`` in the settings file): see
:func:`require_code_allowed`. The CLI is not affected: there the user's own ``--model-def`` /
``--trust-pickle`` flags are the opt-in, for code on their own machine.

When the operator allows it, :func:`try_in_child_process` first loads the model in a separate
Python process (``python -m phpn.app.serving.child``) with a time limit: the import, the factory,
the state-dict load, the unpickling and the doctor's trial forward. Code that calls
``os._exit``, crashes the interpreter, loops forever or raises there is stopped and reported,
and the server never runs it.

What is NOT isolated: once the trial passes, the server loads the same code again in its own
process (phpn needs the model's Python objects in-process to cut it into backbone and head),
and later forwards on real images run there too. Code written to behave differently the
second time, or on real images, is not contained; this protects the server from accidents,
not from an attacker, which is why the switch is off by default.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import phpn
from phpn.app.serving.settings import ServerSettings, load_settings
from phpn.errors import ConfigError

ENABLE_HINT = ("The operator of this server can allow it by setting PHPN_ALLOW_CODE=1 before "
               "`streamlit run app.py` (only on a server whose visitors are trusted).")
CODE_OFF_MESSAGE = "Running visitors' code is turned off on this server."
_STARTUP_LIMIT_S = 180.0  # Python + torch start-up in the child, before the visitor's code runs
_PACKAGE_PARENT = str(Path(phpn.__file__).resolve().parents[1])  # the folder that holds phpn/


def code_allowed(settings: Optional[ServerSettings] = None) -> bool:
    return (settings or load_settings()).allow_code


def require_code_allowed(what: str, settings: Optional[ServerSettings] = None) -> None:
    """Refuse ``what`` (e.g. 'a model file') unless the operator allows visitors' code."""
    if not code_allowed(settings):
        raise ConfigError(f"{CODE_OFF_MESSAGE} {what[0].upper() + what[1:]} cannot be used.", ENABLE_HINT)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group: its children too
    except (OSError, AttributeError):
        proc.kill()
    proc.wait()


def try_in_child_process(checkpoint, *, model_def: Optional[str] = None, trust_pickle: bool = False,
                         arch: Optional[str] = None, num_classes: Optional[int] = None,
                         input_size: Optional[tuple] = None, overrides: Optional[dict] = None,
                         timeout_s: Optional[float] = None, settings: Optional[ServerSettings] = None) -> dict:
    """Load the model in a separate process with a time limit; return what the child found.

    ``input_size`` (C, H, W) or the preprocessing ``overrides`` set the trial forward's input.
    Raises ConfigError when the switch is off, the code ends the process, runs out of time or
    fails (with the child's message).
    """
    settings = settings or load_settings()
    require_code_allowed("a model file" if model_def else "a trusted (pickled) checkpoint", settings)
    limit = float(timeout_s if timeout_s is not None else settings.code_timeout_s)
    request = {"checkpoint": str(checkpoint) if checkpoint is not None else None, "model_def": model_def,
               "trust_pickle": bool(trust_pickle), "arch": arch, "num_classes": num_classes,
               "input_size": list(input_size) if input_size else None, "overrides": overrides or None}
    with tempfile.TemporaryDirectory(prefix="phpn-child-") as tmp:
        tmp = Path(tmp)
        req, res, ready, log = tmp / "request.json", tmp / "result.json", tmp / "ready", tmp / "stderr.txt"
        req.write_text(json.dumps(request), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [_PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "phpn.app.serving.child", str(req), str(res), str(ready)],
                                    cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            started = time.monotonic()
            code_started = None
            while proc.poll() is None:
                now = time.monotonic()
                if code_started is None and ready.exists():
                    code_started = now
                if code_started is not None and now - code_started > limit:
                    _kill(proc)
                    raise ConfigError(f"The model code did not finish loading within {limit:.0f} s and was stopped "
                                      "(it ran in a separate process, so the server was not held up).",
                                      "Check the model file for a loop or slow work at import or in forward; the "
                                      "operator can allow more time with PHPN_CODE_TIMEOUT.")
                if code_started is None and now - started > _STARTUP_LIMIT_S:
                    _kill(proc)
                    raise ConfigError("The separate process for trying the model code did not start in time.",
                                      "The server is busy: try again in a minute.")
                time.sleep(0.05)
        if not res.exists():
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.exists() else []
            detail = f" Last message: {tail[0][:300]}" if tail else ""
            raise ConfigError(f"The model code ended its process (exit code {proc.returncode}) before the model "
                              f"was loaded.{detail}",
                              "It ran in a separate process, so the server is unaffected; fix the file "
                              "(for example remove calls to exit) and try again.")
        result = json.loads(res.read_text(encoding="utf-8"))
    if not result.get("ok"):
        if result.get("user_error"):
            raise ConfigError(result["message"], "")
        raise ConfigError(f"Loading the model failed in its trial process ({result['message']}).",
                          "Fix the model file or checkpoint and try again.")
    return result
