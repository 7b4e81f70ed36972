"""Checks of user-given numbers, shared by the CLI, the app and the API.

Each check returns the value when it is acceptable and otherwise raises a ConfigError that
names the option, the value and the accepted range, so every entry point refuses the same
inputs with the same words.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

from phpn.errors import ConfigError

# numpy's and scikit-learn's generators take seeds below 2**32; torch's would take more.
MAX_SEED = 2 ** 32 - 1
# No classifier reads larger inputs; a typo (--crop 100000) must not allocate for them.
MAX_INPUT_SIDE = 4096


def check_input_side(name: str, value) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_INPUT_SIDE:
        raise ConfigError(f"{name} must be a whole number of pixels from 1 to {MAX_INPUT_SIDE}, got {value!r}.",
                          "Use the size the model was trained at (e.g. 224).")
    return value


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too


def check_seed(seed) -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"The seed {seed!r} is out of range.", f"Use a whole number from 0 to {MAX_SEED}.")
    return seed


def check_at_least(name: str, value, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (batch sizes, images per class, workers...)."""
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be a whole number of at least {minimum}, got {value!r}.",
                          f"Set {name} to {minimum} or more.")
    return value


def check_finite(name: str, values: Iterable) -> tuple:
    """Every value a finite number (means, stds, thresholds)."""
    values = tuple(values)
    bad = [v for v in values if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)]
    if bad:
        raise ConfigError(f"{name} must be finite numbers, got {', '.join(map(repr, bad))}.",
                          f"Give {name} as ordinary numbers (no nan or inf).")
    return values


def check_class_names(names, num_classes=None) -> list:
    """A list of non-empty, printable names, one per class of the model."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError("Class names must be a list of texts.", "Give one name per class, in class order.")
    names = [n.strip() for n in names]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ConfigError(f"Class name number {empty[0]} is empty.", "Give every class a name.")
    odd = [n for n in names if any(not ch.isprintable() for ch in n)]
    if odd:
        raise ConfigError(f"The class name {odd[0]!r} contains control characters.",
                          "Use plain text names, one per line.")
    if num_classes is not None and len(names) != int(num_classes):
        raise ConfigError(f"There are {len(names)} class names but the model has {num_classes} classes.",
                          f"Give exactly {num_classes} names, one per class in the model's class order.")
    return names
