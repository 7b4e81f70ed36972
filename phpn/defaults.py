"""One table of defaults and option lists, read by the CLI, the app and the Python API.

Change a default here and every front door changes with it. The option lists are owned by
the modules that implement them (refine, nmf) and only gathered here.
"""
from __future__ import annotations

from typing import Optional, Sequence

from . import data, nmf, refine

# --- discovery -----------------------------------------------------------------------------
K = 3  # part-prototypes per class
K_MIN, K_MAX = nmf.K_MIN, nmf.K_MAX
AUTO_K_MAX = 8  # with --k auto, each class's k is chosen in 2..this (the elbow of NMF's error)
IMAGES_PER_CLASS: Optional[int] = None  # None: every image of each class (a cap samples deterministically)
SOLVER = "lbfgs"  # refinement of the residual split
LBFGS_ITER = refine.RefineConfig.max_iter  # L-BFGS iterations per class at most (a class stops when solved)
OBJECTIVE = "prototype"  # keep each final prototype's map like its NMF part
SCALING = "lstsq"  # α by least squares (may be negative); nnls keeps α >= 0
CONTRIBUTION = "part"  # each prototype's mean contribution held at its NMF part's share (no cancelling)
NMF_DATA = "clamped"  # signed features: NMF on max(F, 0); "signed": semi-NMF on F (E >= 0, P signed)
HOLDOUT = 0.0  # fraction of each class's images kept out of discovery to measure held-out fidelity
NMF_SOLVER = "hals"  # batched, on the GPU when there is one
SEED = 0
TOP_PATCHES = 6  # training patches kept per prototype
BATCH_SIZE = 64
DEVICE = "auto"  # the GPU when there is one, else the CPU
DECODE = "auto"  # JPEGs decoded in batches on the GPU when the model runs there, else by Pillow (data.DECODES)

SOLVERS = refine.SOLVERS
OBJECTIVES = refine.OBJECTIVES
SCALINGS = refine.SCALINGS
CONTRIBUTIONS = refine.CONTRIBUTIONS
NMF_DATA_CHOICES = nmf.DATA
NMF_SOLVERS = nmf.SOLVERS
DEVICES = ("auto", "cpu", "cuda")
DECODES = data.DECODES

# --- explaining ----------------------------------------------------------------------------
TOP_CLASSES = 5  # classes listed beside an explanation
MAP_OPACITY = 0.6

DISCOVERY = {
    "k": K, "images_per_class": IMAGES_PER_CLASS, "solver": SOLVER, "objective": OBJECTIVE, "scaling": SCALING,
    "nmf_solver": NMF_SOLVER, "seed": SEED, "top_patches": TOP_PATCHES, "batch_size": BATCH_SIZE, "device": DEVICE,
}


def discovery_defaults(demo: Optional[str] = None) -> dict:
    """The discovery settings to start from: the table above, then a built-in demo's own choices."""
    values = dict(DISCOVERY)
    if demo:
        from .demos import get_demo

        values.update(get_demo(demo).defaults)
    return values


# --- class names ---------------------------------------------------------------------------

def class_names_or_indices(names: Optional[Sequence[str]], count: int) -> list:
    """The model's class names, or "0", "1", ... when it has none (the one fallback)."""
    names = list(names) if names else []
    return [str(n) for n in names[:count]] + [str(i) for i in range(len(names), count)]


def class_name(names: Optional[Sequence[str]], index: int) -> str:
    """Class ``index``'s name, or its index as text when it has none."""
    index = int(index)
    return str(names[index]) if names is not None and 0 <= index < len(names) else str(index)
