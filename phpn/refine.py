"""Refinement: scale the NMF parts and split the residual so that they sum to the head row.

For each class (METHOD.md §3), with NMF prototypes p_i (unit rows) and head row v:

1. scaling  α = argmin ‖v − Σ α_i p_i‖  (``lstsq``; ``nnls`` keeps α ≥ 0),
2. residual R = v − Σ α_i p_i,
3. split    R = r_1 + … + r_k, chosen so each prototype's map keeps the shape of its NMF map,
4. final    p̃_i = α_i p_i + r_i, and Σ p̃_i = v exactly whatever the solver did.

Objectives (maps are F xᵀ over all discovery positions, Norm standardises them to mean 0 and
unit spread, ``norm="zscore"``, or scales them to [0, 1], ``norm="minmax"``; with z-scores the
objective is 2N Σ_i (1 − corr(F p_i, F p̃_i)), smooth, so L-BFGS converges):
  ``prototype`` (default)  Σ_i ‖Norm(F p_i) − Norm(F p̃_i)‖²
  ``residual`` (the paper) Σ_i ‖Norm(F p_i) − Norm(F r_i)‖²
Contributions (``contributions``):
  ``part`` (default)  each prototype's mean contribution over the discovery images is held
                      at its part's share of the class's total (an exact linear constraint),
                      so no prototype cancels another: see :func:`part_shares`
  ``free``            left to the map objective, which is blind to a map's offset and scale
A small ridge on the moves away from the equal split (``ridge``) makes the solution unique,
so the result does not depend on rounding (thread count, device).
Solvers: ``lbfgs`` (all classes batched, autograd), ``nelder-mead`` (scipy, per class,
capped evaluations; the paper's choice) and ``none`` (the equal split R/k, plus the
contribution constraint when there is one, for ablation).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import ConfigError
from .linalg import orthonormalize

SOLVERS = ("lbfgs", "nelder-mead", "none")
OBJECTIVES = ("prototype", "residual")
SCALINGS = ("lstsq", "nnls")
CONTRIBUTIONS = ("part", "free")
NORMS = ("minmax", "zscore")
EPS = 1e-12


@dataclass(frozen=True)
class RefineConfig:
    solver: str = "lbfgs"
    objective: str = "prototype"
    scaling: str = "lstsq"
    max_iter: int = 300  # L-BFGS iterations (the split converges: the result does not depend on rounding)
    max_evaluations: int = 2000  # Nelder–Mead objective evaluations per class
    subspace_rank: int = 128  # search the split in F's top row space; 0 searches all of R^D
    seed: int = 0
    contributions: str = "part"  # part: mean contributions held at the parts' shares; free: unconstrained
    ridge: float = 1e-2  # weight of Σ‖r_i − R/k‖² / ‖v‖² per discovery position
    norm: str = "zscore"  # maps compared after scaling to mean 0, std 1 (smooth); minmax: to [0, 1] (the paper's)

    def __post_init__(self):
        for value, allowed, name in ((self.solver, SOLVERS, "solver"), (self.objective, OBJECTIVES, "objective"),
                                     (self.scaling, SCALINGS, "scaling"),
                                     (self.contributions, CONTRIBUTIONS, "contributions"), (self.norm, NORMS, "norm")):
            if value not in allowed:
                raise ConfigError(f"Unknown {name} '{value}'.", f"Choose one of: {', '.join(allowed)}.")
        if not self.ridge >= 0:
            raise ConfigError(f"ridge must be zero or positive, got {self.ridge}.", "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RefineResult:
    prototypes: torch.Tensor  # (B, k, D) float64, Σ_i = head row
    alpha: torch.Tensor  # (B, k) float64
    residual_ratio: torch.Tensor  # (B,) ‖R‖ / ‖v‖
    objective_before: torch.Tensor  # (B,) at the equal split
    objective_after: torch.Tensor  # (B,)
    fidelity: torch.Tensor  # (B, k) correlation of F p̃_i with ±F p_i (the part's sign) over the discovery positions
    negative_alpha: torch.Tensor  # (B,) how many α_i < 0
    part_share: torch.Tensor = None  # (B, k) each NMF part's share of the class's mean logit (see part_shares)
    mean_contribution: torch.Tensor = None  # (B, k) mean of F p̃_iᵀ over the discovery positions
    timings: dict = None  # seconds per step: scaling, basis, solve, finish


def scale(prototypes: torch.Tensor, heads: torch.Tensor, method: str = "lstsq") -> torch.Tensor:
    """α (B, k) minimising ‖v − Pᵀα‖ per class, in float64."""
    p = prototypes.double()
    v = heads.double()
    if method == "lstsq":
        # Normal equations on the k×k Gram matrix: in float64 with k ≤ 20 unit rows they are
        # accurate, and far cheaper than a QR of the D×k system on every backend.
        # The k×k solve runs on the CPU: LAPACK's eigensolver copes with repeated or null
        # prototypes, where cuSOLVER's can fail to converge.
        gram = (p @ p.transpose(1, 2)).cpu()
        rhs = (p @ v[:, :, None]).cpu()
        return (torch.linalg.pinv(gram, hermitian=True) @ rhs)[:, :, 0].to(prototypes.device)
    from scipy.optimize import nnls

    out = [nnls(pc.T.cpu().numpy(), vc.cpu().numpy())[0] for pc, vc in zip(p, v)]
    return torch.tensor(np.stack(out), dtype=torch.float64, device=prototypes.device)


def _min_max(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min–max scale (B, N, k) maps to [0, 1] over the valid rows of each class."""
    valid = mask[:, :, None] > 0
    lo = torch.where(valid, maps, torch.full_like(maps, float("inf"))).amin(1, keepdim=True)
    hi = torch.where(valid, maps, torch.full_like(maps, float("-inf"))).amax(1, keepdim=True)
    return (maps - lo) / (hi - lo).clamp(min=EPS) * mask[:, :, None]


def _zscore(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Standardise (B, N, k) maps to mean 0 and unit root-mean-square over the valid rows of each class."""
    w = mask[:, :, None]
    count = mask.sum(1)[:, None, None]
    centred = (maps - (maps * w).sum(1, keepdim=True) / count) * w
    return centred / ((centred * centred).sum(1, keepdim=True) / count).sqrt().clamp(min=EPS)


NORMALISE = {"minmax": _min_max, "zscore": _zscore}


def map_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of (B, N, k) maps over valid rows -> (B, k)."""
    a, b, mask = a.double(), b.double(), mask.double()  # float32 squares overflow for large heads (×1e30)
    count = mask.sum(1)[:, None]
    w = mask[:, :, None]
    am = a - (a * w).sum(1)[:, None, :] / count[:, None, :]
    bm = b - (b * w).sum(1)[:, None, :] / count[:, None, :]
    cov = (am * bm * w).sum(1)
    return cov / ((am * am * w).sum(1).sqrt() * (bm * bm * w).sum(1).sqrt()).clamp(min=EPS)


def part_shares(usage: torch.Tensor, prototypes: torch.Tensor, heads: torch.Tensor,
                total: torch.Tensor) -> torch.Tensor:
    """Each NMF part's share of the class's mean logit (minus bias), (B, k) float64.

    Part i explains ū_i p_i of the mean feature vector (ū_i: its mean NMF encoding), which
    the head turns into ū_i (p_i · v). These shares sum to the class's total f̄ · v up to the
    NMF's error; they are rescaled to sum to it exactly (proportionally when their sum has
    the total's sign, so no share changes sign; by an equal shift otherwise).
    """
    raw = usage.double() * (prototypes.double() @ heads.double()[:, :, None])[:, :, 0]
    total = total.double()
    raw_sum = raw.sum(1)
    k = raw.shape[1]
    same_sign = (raw_sum * total > 0) & (raw_sum.abs() > EPS)
    ratio = total / torch.where(same_sign, raw_sum, torch.ones_like(raw_sum))
    return torch.where(same_sign[:, None], raw * ratio[:, None], raw + ((total - raw_sum) / k)[:, None])


def part_signs(shares: torch.Tensor) -> torch.Tensor:
    """+1 where a part's share is ≥ 0, −1 where the head counts the part against the class."""
    return torch.where(shares < 0, -torch.ones_like(shares), torch.ones_like(shares))


class _Problem:
    """The residual-split objective for a batch of classes.

    Shares are parametrised around the equal split: r_i = R/k + Z a_i for i < k and
    r_k = R/k − Z Σ a_i, which keeps Σ r_i = R for any free ``a`` (B, k−1, m). Z (B, D, m) is a
    basis of the dominant row space of F: only a share's component there moves the maps
    much, and F r_iᵀ = F R/k + (F Z) a_i costs N·m instead of N·D per evaluation. The
    objective itself is exact for every split it visits. Without a basis, Z is the identity.

    With ``targets`` (B, k) the mean contributions f̄ · p̃_i are held at them exactly: with
    u = Zᵀ f̄, a_i = c_i u/‖u‖² + (b_i − (u · b_i) u/‖u‖²), where c_i puts prototype i on its
    target and the free ``b`` moves only along directions that keep every mean contribution
    (the last one follows, because the targets sum to f̄ · v). ``ridge`` adds
    ridge · N · Σ_i ‖r_i − R/k‖² / ‖v‖², which removes the objective's flat directions.
    """

    def __init__(self, features, mask, prototypes, alpha, residual, objective, basis=None, targets=None,
                 ridge=0.0, head_norm=None, norm="minmax"):
        self.features, self.mask, self.objective = features, mask, objective
        self.normalise = NORMALISE[norm]
        dtype = features.dtype
        self.prototypes = prototypes.to(dtype)
        self.alpha = alpha.to(dtype)
        self.residual = residual.to(dtype)
        self.basis = basis  # (B, D, m) or None
        self.k = prototypes.shape[1]
        self.nmf_maps = features @ self.prototypes.transpose(1, 2)  # (B, N, k)
        # A part the head counts against (negative share) should show as the part, negated.
        self.signs = torch.ones_like(self.alpha) if targets is None else part_signs(targets).to(dtype)
        self.targets = self.normalise(self.signs[:, None, :] * self.nmf_maps, mask)
        self.equal_maps = features @ (self.residual / self.k)[:, :, None]  # (B, N, 1)
        self.feature_basis = features if basis is None else features @ basis  # (B, N, m)
        self.count = mask.sum(1)  # (B,)
        self.ridge_weight = None
        if ridge > 0 and head_norm is not None:
            self.ridge_weight = (ridge * self.count / head_norm.to(dtype).square().clamp(min=EPS))  # (B,)
        self.contribution_targets = targets
        self.direction = self.offset = None
        if targets is not None and self.k > 1:
            mean_feature = (features * mask[:, :, None]).sum(1) / self.count[:, None]  # (B, D) f̄
            u = mean_feature if basis is None else (mean_feature[:, None, :] @ basis)[:, 0, :]  # (B, m)
            start = (self.alpha[:, :, None] * self.prototypes + (self.residual / self.k)[:, None, :]) @ \
                mean_feature[:, :, None]  # (B, k, 1) mean contributions at the equal split
            gap = targets.to(dtype)[:, :self.k - 1] - start[:, :self.k - 1, 0]  # (B, k−1)
            norm2 = (u * u).sum(1, keepdim=True)  # (B, 1)
            usable = norm2[:, 0] > EPS
            self.direction = torch.where(usable[:, None], u / norm2.clamp(min=EPS).sqrt(), torch.zeros_like(u))
            # Classes whose mean feature vanishes keep the equal split's contributions.
            self.offset = torch.where(usable[:, None, None],
                                      gap[:, :, None] * (u / norm2.clamp(min=EPS))[:, None, :],
                                      torch.zeros(gap.shape + u.shape[1:], dtype=dtype, device=u.device))

    @property
    def free_dim(self) -> int:
        return int(self.feature_basis.shape[2])

    def subset(self, c: int) -> "_Problem":
        """The same problem for class ``c`` alone (for per-class solvers)."""
        sub = _Problem.__new__(_Problem)
        for name, value in vars(self).items():
            if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == self.features.shape[0]:
                value = value[c:c + 1]
            setattr(sub, name, value)
        return sub

    def moves(self, free: torch.Tensor) -> torch.Tensor:
        """(B, k−1, m) free coordinates -> the moves a_i in the basis, on the constraint."""
        if self.direction is None:
            return free
        along = (free @ self.direction[:, :, None]) * self.direction[:, None, :]
        return self.offset + free - along

    def shares(self, free: torch.Tensor) -> torch.Tensor:
        """(B, k−1, m) free coordinates -> (B, k, D) residual shares summing to R."""
        a = self.moves(free)
        moves = a if self.basis is None else a @ self.basis.transpose(1, 2)
        moves = torch.cat([moves, -moves.sum(1, keepdim=True)], dim=1)
        return (self.residual / self.k)[:, None, :] + moves

    def maps_of(self, free: torch.Tensor) -> torch.Tensor:
        moves = self.feature_basis @ self.moves(free).transpose(1, 2)  # (B, N, k−1)
        share_maps = self.equal_maps + torch.cat([moves, -moves.sum(2, keepdim=True)], dim=2)
        if self.objective == "residual":
            return share_maps
        return self.alpha[:, None, :] * self.nmf_maps + share_maps

    def loss(self, free: torch.Tensor) -> torch.Tensor:
        """(B,) objective per class."""
        diff = self.targets - self.normalise(self.maps_of(free), self.mask)
        total = (diff * diff).sum((1, 2))
        if self.ridge_weight is not None:
            # ‖r_i − R/k‖ = ‖a_i‖ for an orthonormal basis; the last share moves by −Σ a_i.
            a = self.moves(free)
            total = total + self.ridge_weight * ((a * a).sum((1, 2)) + a.sum(1).square().sum(1))
        return total

    def start(self) -> torch.Tensor:
        """The equal split R/k (moved onto the contribution constraint when there is one)."""
        b = self.features.shape[0]
        return torch.zeros(b, self.k - 1, self.free_dim, dtype=self.features.dtype, device=self.features.device)


def row_space_basis(features: torch.Tensor, rank: int, seed: int = 0, power_iter: int = 0) -> torch.Tensor:
    """Orthonormal (B, D, m) basis of the dominant row space of F (randomised range finder)."""
    b, n, d = features.shape
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(b, n, rank, generator=generator, dtype=torch.float32).to(features)
    z = orthonormalize(features.transpose(1, 2) @ omega)
    for _ in range(power_iter):
        y = orthonormalize(features @ z)
        z = orthonormalize(features.transpose(1, 2) @ y)
    return z


def _lbfgs(problem: _Problem, start: torch.Tensor, max_iter: int, tick=None) -> torch.Tensor:
    free = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([free], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        if tick is not None:
            tick()
        optimiser.zero_grad()
        # Classes are independent, so the sum's gradient is each class's own gradient.
        total = problem.loss(free).sum()
        total.backward()
        return total

    with torch.enable_grad():
        optimiser.step(closure)
    return free.detach()


def _nelder_mead(problem: _Problem, start: torch.Tensor, max_evaluations: int, tick=None) -> torch.Tensor:
    from scipy.optimize import minimize

    out = start.clone()
    shape = start.shape[1:]
    for c in range(start.shape[0]):
        sub = problem.subset(c)

        def fun(x, sub=sub):
            if tick is not None:
                tick()
            free = torch.from_numpy(x).to(sub.features).reshape(1, *shape)
            with torch.no_grad():
                return float(sub.loss(free)[0])

        result = minimize(fun, start[c].reshape(-1).cpu().double().numpy(), method="Nelder-Mead",
                          options={"maxfev": max_evaluations, "xatol": 1e-10, "fatol": 1e-12})
        out[c] = torch.from_numpy(result.x).to(out).reshape(shape)
    return out


def refine(features: torch.Tensor, prototypes: torch.Tensor, heads: torch.Tensor,
           config: RefineConfig = RefineConfig(), counts: Optional[torch.Tensor] = None,
           tick: Optional[Callable[[], None]] = None, usage: Optional[torch.Tensor] = None) -> RefineResult:
    """Refine a batch of classes. ``features`` (B, N, D) as the head sees them (signed allowed),
    ``prototypes`` (B, k, D) from NMF, ``heads`` (B, D) the classes' head rows. ``usage`` (B, k):
    each part's mean NMF encoding over the discovery positions (None: the non-negative
    least-squares fit of the mean feature vector by the parts). ``tick`` is called at every
    objective evaluation and may raise to stop the work."""
    b, n, d = features.shape
    k = prototypes.shape[1]
    if counts is None:
        counts = torch.full((b,), n, dtype=torch.long)
    mask = (torch.arange(n, device=features.device)[None, :] < counts.to(features.device)[:, None]).to(features.dtype)

    clock = _Clock(features.device)
    alpha = scale(prototypes, heads, config.scaling)  # (B, k) float64
    p64, v64 = prototypes.double(), heads.double().to(prototypes.device)
    residual = v64 - (alpha[:, :, None] * p64).sum(1)
    clock.lap("scaling")

    # Accumulated in float64 without a float64 copy of the features (twice their memory).
    mean_feature = (features * mask[:, :, None]).sum(1, dtype=torch.float64) / counts.to(features.device)[:, None]
    total = (mean_feature * v64.to(features.device)).sum(1)  # (B,) f̄ · v, the mean logit minus bias
    if usage is None:
        usage = _usage_from_mean(mean_feature, p64.to(features.device))
    shares = part_shares(usage.to(features.device), p64.to(features.device), v64.to(features.device), total)
    clock.lap("shares")

    rank = config.subspace_rank
    basis = None
    if rank and k > 1 and config.solver != "none" and rank < min(n, d):
        basis = row_space_basis(features, rank, seed=config.seed)
    clock.lap("basis")
    targets = shares if config.contributions == "part" else None
    problem = _Problem(features, mask, prototypes, alpha, residual, config.objective, basis, targets=targets,
                       ridge=config.ridge if config.solver != "none" else 0.0, head_norm=v64.norm(dim=1),
                       norm=config.norm)
    clock.lap("setup")

    with torch.no_grad():
        free = problem.start()
        before = problem.loss(free)
        if k > 1 and config.solver == "lbfgs":
            free = _lbfgs(problem, free, config.max_iter, tick)
        elif k > 1 and config.solver == "nelder-mead":
            free = _nelder_mead(problem, free, config.max_evaluations, tick)
        after = problem.loss(free)
        # Never return a split worse than the one we started from.
        worse = after > before
        free = torch.where(worse[:, None, None], problem.start(), free)
        after = torch.where(worse, before, after)
        split_shares = problem.shares(free).double()
        clock.lap("solve")

        # Final prototypes in float64; the last one closes the sum so Σ p̃ = v to rounding.
        first = alpha[:, :k - 1, None] * p64[:, :k - 1] + split_shares[:, :k - 1]
        last = v64 - first.sum(1)
        final = torch.cat([first, last[:, None, :]], dim=1)
        final_maps = features @ final.to(features.dtype).transpose(1, 2)
        fidelity = map_correlation(final_maps, problem.signs[:, None, :] * problem.nmf_maps, mask)
        contribution = (final.to(features.device) @ mean_feature[:, :, None])[:, :, 0]
        clock.lap("finish")

    return RefineResult(
        prototypes=final,
        alpha=alpha,
        residual_ratio=residual.norm(dim=1) / v64.norm(dim=1).clamp(min=EPS),
        objective_before=before.double(),
        objective_after=after.double(),
        fidelity=fidelity.double(),
        negative_alpha=(alpha < 0).sum(1),
        part_share=shares.cpu(),
        mean_contribution=contribution.cpu(),
        timings=clock.laps,
    )


def _usage_from_mean(mean_feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, k) ū ≥ 0 with ū P ≈ f̄ (non-negative least squares), when NMF's encodings are not given."""
    from scipy.optimize import nnls

    out = [nnls(p.T.cpu().numpy(), f.clamp(min=0).cpu().numpy())[0] for p, f in zip(prototypes, mean_feature)]
    return torch.tensor(np.stack(out), dtype=torch.float64, device=prototypes.device)


class _Clock:
    """Wall-clock laps that wait for the GPU, so each step is charged its own time."""

    def __init__(self, device: torch.device):
        self.device, self.laps, self.last = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
