"""One table of defaults and option lists, read by the CLI, the app and the Python API.

Change a default here and every front door changes with it; the method's modules (nmf,
refine) take their option lists from here. It sits on the ground floor and imports nothing
heavy, so the command line can build its options without loading torch.
"""
from __future__ import annotations

from typing import Optional, Sequence

# --- discovery -----------------------------------------------------------------------------
K = 3  # part-prototypes per class
K_MIN, K_MAX = 1, 20  # the range of k
AUTO_K_MAX = 8  # with --k auto, each class's k is chosen in 2..this (the elbow of NMF's error)
IMAGES_PER_CLASS: Optional[int] = None  # None: every image of each class (a cap samples deterministically)
SOLVER = "lbfgs"  # refinement of the residual split
LBFGS_ITER = 2000  # L-BFGS iterations per class at most (a class stops when solved)
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
DECODE = "auto"  # JPEGs decoded in batches on the GPU when the model runs there, else by Pillow (DECODES)

SOLVERS = ("lbfgs", "nelder-mead", "none")  # refinement
OBJECTIVES = ("prototype", "residual")
SCALINGS = ("lstsq", "nnls")
CONTRIBUTIONS = ("part", "free")
NORMS = ("minmax", "zscore")  # how refinement compares maps
NMF_SOLVERS = ("hals", "sklearn")
# What is factorised when features can be negative: "clamped" runs NMF on max(F, 0);
# "signed" runs semi-NMF on F itself (E ≥ 0, P signed; Ding, Li & Jordan, 2010).
NMF_DATA_CHOICES = ("clamped", "signed")
DEVICES = ("auto", "cpu", "cuda")
DECODES = ("auto", "cpu", "gpu")  # where JPEGs are decoded

# --- preprocessing -------------------------------------------------------------------------
# Resize interpolations (PIL names them the same way).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# How a 3-channel model gets the image's colours: "rgb" as decoded; "bgr" in reverse order (models
# trained on images read by OpenCV or Caffe); "grey" the grey image (Pillow's luma, as 1-channel models
# get it) repeated in the three channels (models trained on grey pictures stored as RGB). A
# 1-channel model always gets the grey image ("rgb" is the only value it takes).
COLOURS = ("rgb", "bgr", "grey")

# --- checking the setup (before discovery) ----------------------------------------------------
CHECK_IMAGES_PER_CLASS = 20  # labelled images per class (or all of a smaller class) to judge a setting
CHECK_MAX_IMAGES = 1000  # the quick setup check's sample at most (fewer per class for many classes)
UPSAMPLING_WARN = 3.0  # images scaled up more than this (model input side / image side) get a warning

# --- explaining ----------------------------------------------------------------------------
# "Shared parts": another class's prototype is listed only when it points clearly the same way;
# a cosine near 0 (shown as 0.00) means the two have nothing in common.
SHARED_PART_MIN_COSINE = 0.1
TOP_CLASSES = 5  # classes listed beside an explanation
# What an explanations folder holds per image: a picture, a self-contained page (each embeds the
# top patches; one format alone halves the folder).
EXPLAIN_FORMATS = ("png", "html")
MAP_OPACITY = 0.6

# A where-map needs a grid: a feature map with fewer positions per image (1x1) puts all of an
# image's evidence in one cell; the doctor says so (phpn.models.doctor.one_position_caution).
MIN_POSITIONS_PER_IMAGE = 2

DISCOVERY = {
    "k": K, "images_per_class": IMAGES_PER_CLASS, "solver": SOLVER, "objective": OBJECTIVE, "scaling": SCALING,
    "nmf_solver": NMF_SOLVER, "seed": SEED, "top_patches": TOP_PATCHES, "batch_size": BATCH_SIZE, "device": DEVICE,
}


# --- auditing and comparing runs ------------------------------------------------------------
AUDIT_IMAGES_PER_CLASS = 12  # labelled images per class the audit reads (its own class's; others' for pasting)
COMPARE_IMAGES_PER_CLASS = 16  # images per class both runs' maps are computed on
MATCH_THRESHOLD = 0.5  # map correlation below which two prototypes are not the same part

# --- class names ---------------------------------------------------------------------------

def class_names_or_indices(names: Optional[Sequence[str]], count: int) -> list:
    """The model's class names, or "0", "1", ... when it has none (the one fallback)."""
    names = list(names) if names else []
    return [str(n) for n in names[:count]] + [str(i) for i in range(len(names), count)]


def class_name(names: Optional[Sequence[str]], index: int) -> str:
    """Class ``index``'s name, or its index as text when it has none."""
    index = int(index)
    return str(names[index]) if names is not None and 0 <= index < len(names) else str(index)


def shared_parts(similar: Sequence[dict], min_cosine: float = SHARED_PART_MIN_COSINE) -> list:
    """The similar prototypes ({class_index, prototype, cosine}) that count as shared parts."""
    return [s for s in similar if float(s["cosine"]) >= min_cosine]


def no_shared_parts(min_cosine: float = SHARED_PART_MIN_COSINE) -> str:
    """What the Class browser and the reports say of a prototype with no shared part."""
    return f"no prototype of another class points the same way (cosine {min_cosine:g} or more)"
