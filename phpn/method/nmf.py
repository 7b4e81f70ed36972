"""Discovery: non-negative matrix factorisation of every class's features at once.

Each class c gives a matrix F_c (n·HW × D) of non-negative features; we look for
F_c ≈ E_c P_c with E_c ≥ 0 (n·HW × k) and P_c ≥ 0 (k × D). Classes are stacked into one
batch (B, N, D), shorter classes padded with zero rows whose E rows are held at zero, so the
padding changes nothing. The solver is HALS (hierarchical alternating least squares),
initialised like scikit-learn's ``nndsvda``.

Speed comes from a randomised sketch: with k ≪ D, the HALS updates only need F through
F Pᵀ and Eᵀ F, and an orthonormal basis Q of F's dominant row space (N × r, r ≈ 4k)
makes both cheap (F ≈ Q Qᵀ F). The sketched iterations find the parts; a few exact
iterations on the full F then polish them, and the error reported is always the exact one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.decomposition import NMF

from phpn import config
from phpn.errors import ConfigError
from phpn.method.linalg import orthonormalize

EPS = 1e-12


SOLVERS = config.NMF_SOLVERS
DATA = config.NMF_DATA_CHOICES  # what is factorised when features can be negative (see phpn.config)
K_MIN, K_MAX = config.K_MIN, config.K_MAX


@dataclass(frozen=True)
class NMFConfig:
    k: int = 3
    solver: str = "hals"  # "sklearn": scikit-learn's coordinate descent, class by class (reference)
    max_iter: int = 400  # sketched HALS iterations (cheap)
    polish_iter: int = 5  # exact HALS iterations on the full features (each reads F twice)
    tol: float = 1e-5  # stop when the relative error improves less than this per iteration
    sketch_rank: Optional[int] = None  # None: max(4k, k + 16); 0 disables the sketch
    power_iter: int = 3
    seed: int = 0
    data: str = "clamped"  # clamped | signed (semi-NMF; see DATA)
    semi_iter: int = 100  # semi-NMF iterations after the start from NMF on max(F, 0)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ConfigError(f"Unknown NMF solver '{self.solver}'.", f"Choose one of: {', '.join(SOLVERS)}.")
        if self.data not in DATA:
            raise ConfigError(f"Unknown NMF data '{self.data}'.", f"Choose one of: {', '.join(DATA)}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NMFResult:
    prototypes: torch.Tensor  # (B, k, D), rows of unit L2 norm
    encodings: torch.Tensor  # (B, N, k); zero on padded rows
    error: torch.Tensor  # (B,) ‖F − E P‖_F, exact
    relative_error: torch.Tensor  # (B,) error / ‖F‖_F
    iterations: int


def _check(features: torch.Tensor, counts: Optional[torch.Tensor], k: int, signed: bool = False) -> torch.Tensor:
    if features.ndim != 3:
        raise ValueError(f"features must be (classes, positions, channels), got shape {tuple(features.shape)}")
    b, n, d = features.shape
    if counts is None:
        counts = torch.full((b,), n, dtype=torch.long)
    if not K_MIN <= k <= K_MAX:
        raise ConfigError(f"k = {k} is out of range.", f"Choose between {K_MIN} and {K_MAX} prototypes per class.")
    smallest = int(counts.min())
    if k > d:
        raise ConfigError(f"k = {k} prototypes need at least {k} feature channels, but the features have only {d}.",
                          f"Choose k of at most {d}.")
    if k > smallest:
        raise ConfigError(
            f"k = {k} prototypes need at least {k} feature vectors per class, but a class has only {smallest}.",
            "Lower k or add images to the smallest class.",
        )
    if not signed and float(features.min()) < 0:
        raise ConfigError(
            "NMF needs non-negative features, but the backbone produced negative values.",
            "Use a model whose features end in a ReLU, or let phpn clamp signed features (done automatically "
            "when the checkpoint doctor reports signed features).",
        )
    return counts


def _row_mask(counts: torch.Tensor, n: int, device, dtype) -> torch.Tensor:
    return (torch.arange(n, device=device)[None, :] < counts.to(device)[:, None]).to(dtype)  # (B, N)


def _range_basis(features: torch.Tensor, rank: int, power_iter: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal Q (B, N, r) spanning F's dominant column space (randomised range finder)."""
    b, n, d = features.shape
    omega = torch.randn(b, d, rank, generator=generator, dtype=torch.float32).to(features)
    q = orthonormalize(features @ omega)
    for _ in range(power_iter):
        z = orthonormalize(features.transpose(1, 2) @ q)
        q = orthonormalize(features @ z)
    return q


def _nndsvda(q: torch.Tensor, sketch: torch.Tensor, k: int, mask: torch.Tensor, mean_value: torch.Tensor):
    """scikit-learn's nndsvda initialisation, from the SVD of the sketch Qᵀ F."""
    u_s, s, vh = torch.linalg.svd(sketch, full_matrices=False)  # sketch (B, r, D)
    u = q @ u_s[:, :, :k]  # (B, N, k)
    v = vh[:, :k, :]  # (B, k, D)
    s = s[:, :k]
    b, n, _ = u.shape
    e = torch.zeros(b, n, k, dtype=q.dtype, device=q.device)
    p = torch.zeros(b, k, v.shape[2], dtype=q.dtype, device=q.device)
    e[:, :, 0] = torch.sqrt(s[:, 0])[:, None] * u[:, :, 0].abs()
    p[:, 0, :] = torch.sqrt(s[:, 0])[:, None] * v[:, 0, :].abs()
    for j in range(1, k):
        x, y = u[:, :, j], v[:, j, :]
        xp, yp, xn, yn = x.clamp(min=0), y.clamp(min=0), (-x).clamp(min=0), (-y).clamp(min=0)
        xpn, ypn, xnn, ynn = (t.norm(dim=1) for t in (xp, yp, xn, yn))
        mp, mn = xpn * ypn, xnn * ynn
        use_pos = (mp > mn)[:, None]
        uu = torch.where(use_pos, xp / (xpn[:, None] + EPS), xn / (xnn[:, None] + EPS))
        vv = torch.where(use_pos, yp / (ypn[:, None] + EPS), yn / (ynn[:, None] + EPS))
        lbd = torch.sqrt(s[:, j] * torch.where(use_pos[:, 0], mp, mn))
        e[:, :, j] = lbd[:, None] * uu
        p[:, j, :] = lbd[:, None] * vv
    fill = mean_value[:, None, None]
    e = torch.where(e < 1e-6, fill.expand_as(e), e) * mask[:, :, None]
    p = torch.where(p < 1e-6, fill.expand_as(p), p)
    return e, p


def _hals_step(e, p, f_pt, pp_t, et_f_fn, mask):
    """One HALS sweep: every column of E, then every row of P. Returns Eᵀ F and EᵀE."""
    k = p.shape[1]
    for j in range(k):
        num = f_pt[:, :, j] - (e @ pp_t[:, :, j:j + 1])[:, :, 0]
        e[:, :, j] = (e[:, :, j] + num / (pp_t[:, j, j][:, None] + EPS)).clamp(min=0)
    e *= mask[:, :, None]
    et_f = et_f_fn(e)  # (B, k, D)
    et_e = e.transpose(1, 2) @ e  # (B, k, k)
    for j in range(k):
        num = et_f[:, j, :] - (et_e[:, j:j + 1, :] @ p)[:, 0, :]
        p[:, j, :] = (p[:, j, :] + num / (et_e[:, j, j][:, None] + EPS)).clamp(min=0)
    return et_f, et_e


def _objective(sq_norm, e, p, et_f, et_e):
    """‖F − EP‖² from Gram quantities: ‖F‖² − 2⟨EᵀF, P⟩ + ⟨EᵀE, PPᵀ⟩ (before the P update's effect)."""
    pp_t = p @ p.transpose(1, 2)
    return (sq_norm - 2 * (et_f * p).sum((1, 2)) + (et_e * pp_t).sum((1, 2))).clamp(min=0)


def _sketched_hals(q, sketch, e, p, mask, max_iter: int, tol: float, tick=None) -> int:
    """HALS on the sketch F ≈ Q S (F Pᵀ ≈ Q (S Pᵀ), Eᵀ F ≈ (Eᵀ Q) S), updating ``e`` and ``p`` in place.

    Classes leave the batch as soon as their own error stops improving by ``tol``, so a few
    slow classes do not keep every class iterating. Returns the most iterations any class ran.
    """
    active = torch.arange(e.shape[0], device=e.device)
    qa, sa, ea, pa, ma = q, sketch, e.clone(), p.clone(), mask
    sq = (sa * sa).sum((1, 2)).clamp(min=EPS)
    prev = torch.full_like(sq, float("inf"))
    it = 0
    for it in range(1, max_iter + 1):
        if tick is not None:
            tick()
        et_f, et_e = _hals_step(ea, pa, qa @ (sa @ pa.transpose(1, 2)), pa @ pa.transpose(1, 2),
                                lambda ee: (ee.transpose(1, 2) @ qa) @ sa, ma)
        rel = torch.sqrt(_objective(sq, ea, pa, et_f, et_e) / sq)
        going = (prev - rel) > tol
        prev = rel
        if not bool(going.all()):
            stopped = active[~going]
            e[stopped], p[stopped] = ea[~going], pa[~going]
            active, qa, sa, ea, pa, ma, sq, prev = (t[going] for t in (active, qa, sa, ea, pa, ma, sq, prev))
            if active.numel() == 0:
                break
    e[active], p[active] = ea, pa
    return it


def nmf(features: torch.Tensor, config: NMFConfig = NMFConfig(), counts: Optional[torch.Tensor] = None,
        tick: Optional[Callable[[], None]] = None) -> NMFResult:
    """Factorise every class at once. ``features`` (B, N, D) ≥ 0, ``counts`` (B,) valid rows.

    ``tick`` is called once per iteration; it may raise (e.g. :class:`phpn.errors.Cancelled`)
    to stop the work promptly.
    """
    k = config.k
    counts = _check(features, counts, k, signed=config.data == "signed")
    if config.data == "signed":
        return semi_nmf(features, config, counts, tick)
    if config.solver == "sklearn":
        return _nmf_sklearn(features, config, counts, tick)
    b, n, d = features.shape
    work = features if features.dtype in (torch.float32, torch.float64) else features.float()
    mask = _row_mask(counts, n, work.device, work.dtype)
    generator = torch.Generator().manual_seed(config.seed)

    sq_norm = torch.linalg.vector_norm(work, dim=(1, 2)).square()  # no copy of F
    mean_value = work.sum((1, 2)) / (counts.to(work) * d)
    rank = config.sketch_rank if config.sketch_rank is not None else max(4 * k, k + 16)
    rank = min(rank, n, d)
    q = _range_basis(work, max(rank, k), config.power_iter, generator)
    sketch = q.transpose(1, 2) @ work  # (B, r, D)
    e, p = _nndsvda(q, sketch, k, mask, mean_value)

    iterations = 0
    if config.sketch_rank != 0 and rank < min(n, d):
        iterations += _sketched_hals(q, sketch, e, p, mask, config.max_iter, config.tol, tick)
        polish = config.polish_iter
    else:
        polish = config.max_iter + config.polish_iter
    # Exact iterations on the full features; every class runs until all have converged.
    prev = None
    for it in range(polish):
        if tick is not None:
            tick()
        pp_t = p @ p.transpose(1, 2)
        et_f, et_e = _hals_step(e, p, work @ p.transpose(1, 2), pp_t, lambda ee: ee.transpose(1, 2) @ work, mask)
        rel = torch.sqrt(_objective(sq_norm, e, p, et_f, et_e) / sq_norm.clamp(min=EPS))
        iterations += 1
        if prev is not None and bool(torch.all((prev - rel) <= config.tol)):
            break
        prev = rel

    return _finish(work, e, p, sq_norm, iterations)


def semi_nmf(features: torch.Tensor, config: NMFConfig, counts: torch.Tensor,
             tick: Optional[Callable[[], None]] = None) -> NMFResult:
    """Semi-NMF F ≈ E P with E ≥ 0 and P signed, for features that can be negative.

    Starts from NMF on max(F, 0) (same settings), then alternates the exact least-squares P
    for the current E and a HALS sweep over E's columns (which needs only E ≥ 0). The error
    never increases: each step is an exact minimisation over its block.
    """
    b, n, d = features.shape
    work = features if features.dtype in (torch.float32, torch.float64) else features.float()
    start = nmf(work.clamp(min=0), replace(config, data="clamped"), counts, tick)
    mask = _row_mask(counts, n, work.device, work.dtype)
    e = start.encodings.to(work.dtype).clone()
    p = start.prototypes.to(work.dtype).clone()
    sq_norm = torch.linalg.vector_norm(work, dim=(1, 2)).square()
    eye = torch.eye(config.k, dtype=torch.float64, device=work.device)
    iterations = start.iterations
    prev = None
    et_f, et_e = e.transpose(1, 2) @ work, e.transpose(1, 2) @ e
    for _ in range(config.semi_iter):
        if tick is not None:
            tick()
        et_e, et_f = et_e.double(), et_f.double()
        # Least-squares P; a tiny ridge keeps the k×k solve defined when a part is unused.
        ridge = 1e-10 * et_e.diagonal(dim1=1, dim2=2).mean(1).clamp(min=EPS)[:, None, None]
        p = torch.linalg.solve((et_e + ridge * eye).cpu(), et_f.cpu()).to(work.device, work.dtype)
        f_pt = work @ p.transpose(1, 2)
        pp_t = p @ p.transpose(1, 2)
        for j in range(config.k):
            num = f_pt[:, :, j] - (e @ pp_t[:, :, j:j + 1])[:, :, 0]
            e[:, :, j] = (e[:, :, j] + num / (pp_t[:, j, j][:, None] + EPS)).clamp(min=0)
        e *= mask[:, :, None]
        iterations += 1
        # Eᵀ F and Eᵀ E of the new E serve both the error and the next P.
        et_f, et_e = e.transpose(1, 2) @ work, e.transpose(1, 2) @ e
        rel = torch.sqrt(_objective(sq_norm, e, p, et_f, et_e) / sq_norm.clamp(min=EPS))
        if prev is not None and bool(torch.all((prev - rel) <= config.tol)):
            break
        prev = rel
    return _finish(work, e, p, sq_norm, iterations)


def _finish(work, e, p, sq_norm, iterations) -> NMFResult:
    # Unit-norm prototypes (the scale moves into E), ordered by how much of F each explains.
    norms = p.norm(dim=2)  # (B, k)
    p = p / norms.clamp(min=EPS)[:, :, None]
    e = e * norms[:, None, :]
    order = torch.argsort(e.sum(1), dim=1, descending=True)
    p = torch.gather(p, 1, order[:, :, None].expand_as(p))
    e = torch.gather(e, 2, order[:, None, :].expand_as(e))
    # The exact error from Gram quantities: one pass over F, no (B, N, D) temporary.
    error = _objective(sq_norm, e, p, e.transpose(1, 2) @ work, e.transpose(1, 2) @ e).sqrt()
    return NMFResult(prototypes=p, encodings=e, error=error, relative_error=error / sq_norm.sqrt().clamp(min=EPS),
                     iterations=iterations)


def _nmf_sklearn(features, config: NMFConfig, counts, tick) -> NMFResult:
    """The reference solver for a padded batch: scikit-learn on each class's valid rows."""
    b, n, d = features.shape
    e = torch.zeros(b, n, config.k, dtype=torch.float64)
    p = torch.zeros(b, config.k, d, dtype=torch.float64)
    iterations = 0
    for c in range(b):
        if tick is not None:
            tick()
        rows = int(counts[c])
        ec, pc, _, used = sklearn_nmf(features[c, :rows].double().cpu().numpy(), config.k, seed=config.seed)
        e[c, :rows], p[c] = torch.from_numpy(ec), torch.from_numpy(pc)
        iterations = max(iterations, used)
    work = features.double().cpu()
    sq_norm = torch.linalg.vector_norm(work, dim=(1, 2)).square()
    result = _finish(work, e, p, sq_norm, iterations)
    dtype, device = features.dtype, features.device
    result.prototypes = result.prototypes.to(device, dtype)
    result.encodings = result.encodings.to(device, dtype)
    return result


def sklearn_nmf(features: np.ndarray, k: int, seed: int = 0, max_iter: int = 200, tol: float = 1e-4):
    """Reference solver: scikit-learn's coordinate descent, one class. Returns (E, P, error, iterations)."""
    model = NMF(n_components=k, init="nndsvda", solver="cd", max_iter=max_iter, tol=tol, random_state=seed)
    e = model.fit_transform(features)
    p = model.components_
    return e, p, float(np.linalg.norm(features - e @ p)), int(model.n_iter_)


def elbow_k(ks, errors) -> tuple:
    """The k where the error curve bends most, and why.

    ``ks`` increasing, ``errors`` the relative reconstruction error at each. The bend is the
    point furthest below the straight line from the first to the last point (both axes
    scaled to [0, 1]); with two points or a flat curve, the smallest k.
    """
    ks, errors = list(ks), [float(e) for e in errors]
    listing = ", ".join(f"{e:.3f} at k = {k}" for k, e in zip(ks, errors))
    span = errors[0] - errors[-1]
    if len(ks) < 3 or span <= 1e-9:
        return ks[0], f"relative error {listing}: no bend to find, so the smallest k"
    x = [(k - ks[0]) / (ks[-1] - ks[0]) for k in ks]
    y = [(e - errors[-1]) / span for e in errors]
    below = [(1 - xi) - yi for xi, yi in zip(x, y)]  # the chord runs from (0, 1) to (1, 0)
    best = max(range(len(ks)), key=lambda i: below[i])
    if below[best] <= 0:
        return ks[0], f"relative error {listing}: it falls evenly, no bend, so the smallest k"
    return ks[best], (f"relative error {listing}: the curve bends most at k = {ks[best]} (further k lower the "
                      "error less)")


def suggest_k(features: torch.Tensor, config: NMFConfig, counts: Optional[torch.Tensor] = None, k_max: int = 8,
              tick: Optional[Callable[[], None]] = None, keep: bool = False):
    """Per class, (k, reason, {k: relative error}) from the elbow of NMF's error for k = 2..k_max.
    With ``keep``, also {k: NMFResult}: the factorisations the curve was made of."""
    if k_max < 2:
        raise ConfigError(f"The largest k to try must be at least 2, got {k_max}.", "Use --suggest-k 8, for example.")
    b = features.shape[0]
    smallest = int(counts.min()) if counts is not None else features.shape[1]
    ks = list(range(2, min(k_max, smallest, features.shape[2], 20) + 1))
    results = {k: nmf(features, replace(config, k=k), counts, tick) for k in ks}
    errors = [results[k].relative_error.tolist() for k in ks]
    out = []
    for c in range(b):
        curve = [errors[j][c] for j in range(len(ks))]
        k, reason = elbow_k(ks, curve)
        out.append((k, reason, {str(kk): e for kk, e in zip(ks, curve)}))
    return (out, results) if keep else out
