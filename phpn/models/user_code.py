"""Your own architecture, from your own Python file.

``--model-def path/to/net.py:make_model`` imports ``net.py`` and calls ``make_model`` (a
function or an ``nn.Module`` class) to build the network, then loads the checkpoint's state
dict into it. Importing a file runs its code: phpn does this *only* for a file the user
names explicitly with ``--model-def`` (or the model-file field in the app). That explicit
argument is the opt-in; phpn never imports code found next to a checkpoint by itself. In
the app, a visitor's file is accepted only where the operator allows visitors' code, and it
runs only in a jailed worker process (:mod:`phpn.app.serving.jail`).

If the factory takes a ``num_classes`` argument it receives ``--num-classes`` when given,
otherwise the row count of the checkpoint's classifier (found by its usual names).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Mapping, Optional

from torch import nn

from phpn.errors import CheckpointError, ConfigError
from phpn.models.checkpoint import strip_common_prefix
from phpn.models.zoo import guess_num_classes


def parse_model_def(spec: str) -> tuple[Path, str]:
    """'dir/net.py:make_model' -> (Path('dir/net.py'), 'make_model')."""
    path_text, sep, factory = str(spec).rpartition(":")  # rpartition: Windows paths contain ':' too
    if not sep or not path_text.endswith(".py") or not factory.isidentifier():
        raise ConfigError(f"'{spec}' is not of the form FILE.py:FACTORY.",
                          "Give the Python file and the function or class that builds the model, "
                          "e.g. --model-def net.py:Net.")
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"The model file {path} does not exist.", "Check the path given to --model-def.")
    return path, factory


def import_model_file(path: Path):
    """Import ``path`` as a module (this runs the file), with its folder importable meanwhile."""
    path = path.resolve()
    name = "phpn_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigError(f"Running the model file {path.name} failed ({type(exc).__name__}: {exc}).",
                          "Fix the file so that it imports cleanly.") from exc
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def _module_builders(module) -> list:
    own = [n for n, obj in vars(module).items()
           if getattr(obj, "__module__", None) == module.__name__ and (inspect.isfunction(obj) or inspect.isclass(obj))]
    return sorted(own)


def build_user_model(spec: str, *, num_classes: Optional[int] = None, state_dict: Optional[Mapping] = None):
    """Import the file and call its factory. Returns ``(model, label, notes)``."""
    path, factory_name = parse_model_def(spec)
    module = import_model_file(path)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        found = ", ".join(_module_builders(module)) or "none"
        raise ConfigError(f"{path.name} has no function or class named '{factory_name}'.",
                          f"Functions and classes defined there: {found}.")
    notes = [f"architecture from {path.name}:{factory_name} (user code, run because --model-def named it)"]
    kwargs = {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params:
        wanted = num_classes if num_classes is not None else (guess_num_classes(state_dict) if state_dict else None)
        if wanted is not None:
            kwargs["num_classes"] = int(wanted)
            notes.append(f"called {factory_name}(num_classes={wanted})")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        call = f"{factory_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        raise ConfigError(f"Calling {call} from {path.name} "
                          f"failed ({type(exc).__name__}: {exc}).",
                          "The factory must build the model with no arguments (or num_classes only).") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{factory_name} in {path.name} returned a {type(model).__name__}, not a torch.nn.Module.",
                          "Point --model-def at a function or class that builds the network.")
    return model, f"user:{path.name}:{factory_name}", notes


def load_into(model: nn.Module, state_dict: Mapping, what: str) -> list:
    """Load strictly; on a mismatch name the first missing/unexpected/mis-shaped keys."""
    expected = model.state_dict()
    tries = [(dict(state_dict), "")]
    stripped, prefix = strip_common_prefix(state_dict)
    if prefix:
        tries.append((stripped, prefix))
    first_problem = None
    for sd, prefix in tries:
        problem = describe_mismatch(expected, sd)
        if not problem:
            model.load_state_dict(sd, strict=True)
            return [f"removed the prefix '{prefix}' from every weight name"] if prefix else []
        first_problem = first_problem or problem
    raise CheckpointError(f"The checkpoint does not fit {what}: {first_problem}.",
                          "Check that --model-def builds the same architecture (and class count) the checkpoint "
                          "was trained with.")


def describe_mismatch(expected: Mapping, given: Mapping, limit: int = 4) -> str:
    def ignored(k):  # old checkpoints lack BatchNorm's counter; torch fills it in
        return k.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in given and not ignored(k)]
    unexpected = [k for k in given if k not in expected and not ignored(k)]
    wrong = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return format_mismatch(missing, unexpected, wrong, limit)


def format_mismatch(missing, unexpected, wrong, limit: int = 4) -> str:
    """One phrase for weights that do not fit a model: names missing, unexpected, and
    ``(name, given shape, model's shape)`` of the wrong shape; "" when everything fits."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:limit])})")
    if wrong:
        parts.append(f"{len(wrong)} with the wrong shape ("
                     + "; ".join(f"{k} is {a} but the model has {b}" for k, a, b in wrong[:limit]) + ")")
    return ", ".join(parts)
