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
With z-scores the objective depends on the features only through the maps' second moments, so
it is evaluated from one m × m Gram matrix per class, taken once, not from the maps (see
:class:`_Moments`). Solvers: ``lbfgs`` (each class solved to convergence on its own, batched
over classes, in float64: see :func:`_lbfgs`), ``nelder-mead`` (scipy, per class, capped evaluations; the
paper's choice) and ``none`` (the equal split R/k, plus the contribution constraint when
there is one, for ablation).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from scipy.optimize import minimize, nnls

from phpn import config
from phpn.errors import ConfigError
from phpn.method.linalg import orthonormalize

SOLVERS, OBJECTIVES, SCALINGS = config.SOLVERS, config.OBJECTIVES, config.SCALINGS
CONTRIBUTIONS, NORMS = config.CONTRIBUTIONS, config.NORMS
EPS = 1e-12
SOLVER_CPU_THREADS = 1  # intra-op threads for L-BFGS on the CPU (see _cpu_threads)


@dataclass(frozen=True)
class RefineConfig:
    solver: str = "lbfgs"
    objective: str = "prototype"
    scaling: str = "lstsq"
    max_iter: int = config.LBFGS_ITER  # L-BFGS iterations per class at most (a class stops when solved: see tolerance)
    tolerance: float = 1e-13  # a class is solved when one iteration lowers its objective by less than this share
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
    iterations: torch.Tensor = None  # (B,) L-BFGS iterations each class took (0 for other solvers)
    converged: torch.Tensor = None  # (B,) bool: False where L-BFGS ran out of iterations before its stopping test


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

    # What the objective reads, per class: gathered for a subset of classes, kept in float64.
    LOSS_DATA = ("mask", "count", "alpha", "nmf_maps", "targets", "equal_maps", "feature_basis", "ridge_weight",
                 "direction", "offset")
    # With z-scores the objective reads only the maps' second moments (see _Moments).
    MOMENT_DATA = ("count", "moments", "ridge_weight", "direction", "offset")

    def __init__(self, features, mask, prototypes, alpha, residual, objective, basis=None, targets=None,
                 ridge=0.0, head_norm=None, norm="minmax", mean_feature=None):
        self.objective = objective
        self.normalise = NORMALISE[norm]
        dtype = features.dtype
        self.k = prototypes.shape[1]
        self.residual = residual.double()  # (B, D)
        nmf_maps = features @ prototypes.to(dtype).transpose(1, 2)  # (B, N, k)
        # A part the head counts against (negative share) should show as the part, negated.
        self.signs = torch.ones_like(alpha).double() if targets is None else part_signs(targets).double()
        # The maps are products with the (float32) features; everything after runs in float64,
        # so the solver's end point is limited by the problem, not by the objective's rounding.
        self.mask = mask.double()
        self.count = self.mask.sum(1)  # (B,)
        self.alpha = alpha.double()
        self.nmf_maps = nmf_maps.double()
        self.targets = self.normalise(self.signs[:, None, :] * self.nmf_maps, self.mask)
        self.equal_maps = (features @ (residual / self.k).to(dtype)[:, :, None]).double()  # (B, N, 1)
        feature_basis = (features if basis is None else features @ basis).double()  # (B, N, m)
        # Turn the basis to the principal axes of the (centred) maps it makes: there the
        # objective's curvature is nearly diagonal, with a known size (see step_scale).
        centred = (feature_basis - (self.mask[:, None, :] @ feature_basis) / self.count[:, None, None]) \
            * self.mask[:, :, None]
        # On the CPU, as for α: LAPACK copes with the repeated (zero) eigenvalues of a rank-deficient
        # Gram matrix, where a GPU eigensolver can fail to converge; the matrices are only m × m.
        # One thread, as for the solver: the matrices are small, and threads made it 4–6× slower (2 cores).
        with _cpu_threads(torch.device("cpu"), SOLVER_CPU_THREADS):
            spread, axes = torch.linalg.eigh((centred.transpose(1, 2) @ centred).cpu())  # ascending
        self.spread, axes = spread.clamp(min=0).to(feature_basis.device), axes.to(feature_basis.device)
        self.basis = axes if basis is None else basis.double() @ axes  # (B, D, m), orthonormal
        self.feature_basis = self.moments = None
        if norm == "zscore":  # the objective needs only the maps' moments: no (B, N, m) maps are kept
            base = self.equal_maps if objective == "residual" else self.alpha[:, None, :] * self.nmf_maps + \
                self.equal_maps
            self.moments = _Moments(self.count, self.targets, self._centred(base.expand(-1, -1, self.k)),
                                    centred @ axes)
            self.targets = self.equal_maps = None
        else:
            self.feature_basis = feature_basis @ axes  # (B, N, m)
        self.ridge_weight = None
        if ridge > 0 and head_norm is not None:
            self.ridge_weight = (ridge * self.count / head_norm.double().square().clamp(min=EPS))  # (B,)
        self.direction = self.offset = None
        if targets is not None and self.k > 1:
            if mean_feature is None:
                mean_feature = (self.mask[:, None, :].to(dtype) @ features)[:, 0, :].double() / self.count[:, None]
            mean_feature = mean_feature.double()  # (B, D) f̄
            u = (mean_feature[:, None, :] @ self.basis)[:, 0, :]  # (B, m)
            start = (self.alpha[:, :, None] * prototypes.double() + (self.residual / self.k)[:, None, :]) @ \
                mean_feature[:, :, None]  # (B, k, 1) mean contributions at the equal split
            gap = targets.double()[:, :self.k - 1] - start[:, :self.k - 1, 0]  # (B, k−1)
            norm2 = (u * u).sum(1, keepdim=True)  # (B, 1)
            usable = norm2[:, 0] > EPS
            self.direction = torch.where(usable[:, None], u / norm2.clamp(min=EPS).sqrt(), torch.zeros_like(u))
            # Classes whose mean feature vanishes keep the equal split's contributions.
            self.offset = torch.where(usable[:, None, None],
                                      gap[:, :, None] * (u / norm2.clamp(min=EPS))[:, None, :],
                                      torch.zeros(gap.shape + u.shape[1:], dtype=u.dtype, device=u.device))

    def _centred(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, N, c) maps less their mean over the valid rows, zero on the padded ones."""
        w = self.mask[:, :, None]
        return (maps - (maps * w).sum(1, keepdim=True) / self.count[:, None, None]) * w

    @property
    def free_dim(self) -> int:
        return int(self.basis.shape[2])

    def step_scale(self) -> torch.Tensor:
        """(B, k−1, m) the objective's curvature along each free coordinate, to the power −½, at the start.

        Moving share i by a unit along axis j changes map i and the last map by √spread_j; a
        z-scored map of spread σ² responds with curvature about 2/σ². The ridge adds its own.
        Solving in coordinates scaled by this makes the problem about equally curved in every
        direction, so L-BFGS needs tens of iterations instead of hundreds to thousands.
        """
        if self.moments is not None:
            spread = self.moments.spread(self.share_moves(self.moves(self.start())))
        else:
            centred = self._centred(self.maps_of(self.start()))  # (B, N, k)
            spread = (centred * centred).sum(1)
        variance = (spread / self.count[:, None]).clamp(min=EPS)  # (B, k)
        inverse = 1.0 / variance
        per_share = (inverse[:, :self.k - 1] + inverse[:, self.k - 1:])[:, :, None]  # (B, k−1, 1)
        curvature = 2.0 * per_share * self.spread[:, None, :]
        if self.ridge_weight is not None:
            curvature = curvature + 4.0 * self.ridge_weight[:, None, None]
        top = curvature.amax((1, 2), keepdim=True)
        return curvature.clamp(min=1e-12 * top).clamp(min=EPS).rsqrt()

    def select(self, classes: torch.Tensor) -> "_Problem":
        """The objective of some classes only (for solvers that drop the classes they have solved)."""
        sub = _Problem.__new__(_Problem)
        sub.objective, sub.normalise, sub.k, sub.basis, sub.residual, sub.moments = \
            self.objective, self.normalise, self.k, None, None, None
        for name in self.LOSS_DATA if self.moments is None else self.MOMENT_DATA:
            value = getattr(self, name)
            setattr(sub, name, None if value is None else value[classes])
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
        moves = a @ self.basis.transpose(1, 2)
        moves = torch.cat([moves, -moves.sum(1, keepdim=True)], dim=1)
        return (self.residual / self.k)[:, None, :] + moves

    def share_moves(self, moves: torch.Tensor) -> torch.Tensor:
        """(B, k−1, m) moves a_i -> (B, k, m) every share's move, the last one −Σ a_i."""
        return torch.cat([moves, -moves.sum(1, keepdim=True)], dim=1)

    def maps_of(self, free: torch.Tensor) -> torch.Tensor:
        moves = self.feature_basis @ self.moves(free).transpose(1, 2)  # (B, N, k−1)
        share_maps = self.equal_maps + torch.cat([moves, -moves.sum(2, keepdim=True)], dim=2)
        if self.objective == "residual":
            return share_maps
        return self.alpha[:, None, :] * self.nmf_maps + share_maps

    def loss(self, free: torch.Tensor) -> torch.Tensor:
        """(B,) objective per class."""
        a = self.moves(free)
        if self.moments is not None:
            total = self.moments.loss(self.share_moves(a))
        else:
            diff = self.targets - self.normalise(self.maps_of(free), self.mask)
            total = (diff * diff).sum((1, 2))
        if self.ridge_weight is not None:
            # ‖r_i − R/k‖ = ‖a_i‖ for an orthonormal basis; the last share moves by −Σ a_i.
            total = total + self.ridge_weight * ((a * a).sum((1, 2)) + a.sum(1).square().sum(1))
        return total

    def loss_and_grad(self, free: torch.Tensor) -> tuple:
        """(B,) objective per class and its gradient (B, k−1, m) in the free coordinates."""
        if self.moments is None:
            free = free.detach().requires_grad_(True)
            with torch.enable_grad():
                total = self.loss(free)
                (grad,) = torch.autograd.grad(total.sum(), free)
            return total.detach(), grad
        a = self.moves(free)
        total, grad_shares = self.moments.loss_and_grad(self.share_moves(a))
        grad = grad_shares[:, :-1] - grad_shares[:, -1:]  # the last share moves by −Σ a_i
        if self.ridge_weight is not None:
            total_move = a.sum(1, keepdim=True)
            total = total + self.ridge_weight * ((a * a).sum((1, 2)) + total_move.square().sum((1, 2)))
            grad = grad + 2.0 * self.ridge_weight[:, None, None] * (a + total_move)
        if self.direction is not None:  # moves() drops the free part along the constraint's direction
            grad = grad - (grad @ self.direction[:, :, None]) * self.direction[:, None, :]
        return total, grad

    def start(self) -> torch.Tensor:
        """The equal split R/k (moved onto the contribution constraint when there is one)."""
        z = self.basis
        return torch.zeros(z.shape[0], self.k - 1, self.free_dim, dtype=z.dtype, device=z.device)


class _Moments:
    """The z-score objective from the maps' second moments, without the maps.

    Map i is c_i + B d_i over the N positions (c_i: its fixed part, B = F Z: the basis's maps,
    d_i: share i's move), and its target t_i is centred with t_i · t_i = ‖t_i‖². Centring is
    linear, so with C the centring over the valid positions,
      t_i · C(c_i + B d_i) = t_i · Cc_i + ((CB)ᵀ t_i) · d_i,
      ‖C(c_i + B d_i)‖²    = ‖Cc_i‖² + 2 ((CB)ᵀ Cc_i) · d_i + d_iᵀ G d_i,   G = (CB)ᵀ CB,
    and ‖t_i − z_i‖² = ‖t_i‖² − 2 t_i · z_i + ‖z_i‖² with z_i the map over its spread. Every
    evaluation then costs k·m² (G is m × m) instead of N·m·k, and it is the same objective:
    the moments are products of the same float64 maps, taken once.
    """

    FIELDS = ("count", "target_norm2", "target_base", "target_basis", "base_norm2", "base_basis", "gram")

    def __init__(self, count: torch.Tensor, targets: torch.Tensor, centred_base: torch.Tensor,
                 centred_basis: torch.Tensor):
        # count (B,) valid positions; targets (B, N, k) z-scored; centred_base (B, N, k) Cc_i;
        # centred_basis (B, N, m) CB.
        self.count = count[:, None]  # (B, 1)
        self.target_norm2 = (targets * targets).sum(1)  # (B, k)
        self.target_base = (targets * centred_base).sum(1)  # (B, k)
        self.target_basis = targets.transpose(1, 2) @ centred_basis  # (B, k, m)
        self.base_norm2 = (centred_base * centred_base).sum(1)  # (B, k)
        self.base_basis = centred_base.transpose(1, 2) @ centred_basis  # (B, k, m)
        self.gram = centred_basis.transpose(1, 2) @ centred_basis  # (B, m, m)
        self.gram = (self.gram + self.gram.transpose(1, 2)) / 2  # symmetric to the last bit

    def __getitem__(self, classes: torch.Tensor) -> "_Moments":
        sub = _Moments.__new__(_Moments)
        for name in self.FIELDS:
            setattr(sub, name, getattr(self, name)[classes])
        return sub

    def spread(self, moves: torch.Tensor) -> torch.Tensor:
        """(B, k) Σ over positions of each centred map's square, for share moves (B, k, m)."""
        return self._spread(moves, moves @ self.gram)

    def _spread(self, moves: torch.Tensor, gram_moves: torch.Tensor) -> torch.Tensor:
        # Rounding can take a (near) constant map's square sum a hair below zero.
        return (self.base_norm2 + (moves * (2.0 * self.base_basis + gram_moves)).sum(2)).clamp(min=0)

    def loss(self, moves: torch.Tensor) -> torch.Tensor:
        return self.loss_and_grad(moves, grad=False)[0]

    def loss_and_grad(self, moves: torch.Tensor, grad: bool = True) -> tuple:
        """(B,) Σ_i ‖t_i − z_i‖² and its gradient (B, k, m) in the share moves d_i."""
        gram_moves = moves @ self.gram
        spread = self._spread(moves, gram_moves)  # (B, k) ‖C m_i‖²
        count = self.count
        cross = self.target_base + (self.target_basis * moves).sum(2)  # t_i · C m_i
        std = (spread / count).sqrt()
        clamped = std < EPS
        std = std.clamp(min=EPS)
        total = (self.target_norm2 - 2.0 * cross / std + spread / std.square()).sum(1)
        if not grad:
            return total, None
        spread_grad = 2.0 * (self.base_basis + gram_moves)  # ∂‖C m_i‖² / ∂d_i
        # Unclamped, ‖z_i‖² = count is constant and std = √(spread / count); clamped, std is EPS.
        cross_weight = torch.where(clamped, torch.zeros_like(std), cross / (count * std.pow(3)))
        spread_weight = torch.where(clamped, 1.0 / (EPS * EPS), cross_weight)
        grad_moves = -2.0 * self.target_basis / std[:, :, None] + spread_weight[:, :, None] * spread_grad
        return total, grad_moves


def row_space_basis(features: torch.Tensor, rank: int, seed: int = 0, power_iter: int = 0,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Orthonormal (B, D, m) basis of the dominant row space of F (randomised range finder).

    The test matrix Ω (D, m) lives in feature space and is the same for every class, so a
    class gets the same basis, and the same refinement, whichever classes share its batch and
    however many padded rows the batch has (``mask`` (B, N) marks the valid ones).
    """
    b, n, d = features.shape
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(d, rank, generator=generator, dtype=torch.float32).to(features)
    y = features @ omega  # (B, N, m): F Ω
    if mask is not None:
        y = y * mask[:, :, None].to(y)
    z = orthonormalize(features.transpose(1, 2) @ y)  # range of Fᵀ F Ω
    for _ in range(power_iter):
        y = orthonormalize(features @ z)
        z = orthonormalize(features.transpose(1, 2) @ y)
    return z


def _lbfgs(problem: _Problem, start: torch.Tensor, max_iter: int, tick=None, history: int = 20,
           tolerance: float = 1e-13, solved=None) -> tuple:
    """Minimise each class's objective on its own: L-BFGS batched over classes, with per-class
    step lengths, histories and stopping, in float64.

    One shared solver over the sum of the classes would share one line search and one curvature
    history, so a badly scaled class slows every other and none is solved when the iterations
    run out; its end point then depends on rounding (thread count, device). Here each class
    stops when its objective no longer falls by more than ``tolerance`` of its value (or its
    gradient vanishes), which makes the result a property of the problem, not of the path.
    Returns the solution (B, k−1, m), each class's iteration count (B,) and whether it met its
    stopping test (B,) rather than running out of iterations. ``solved`` is told how many classes
    have stopped each time that number grows (per-class progress).
    """
    b = start.shape[0]
    shape = start.shape[1:]
    origin = start.reshape(b, -1).double()
    scale = problem.step_scale().reshape(b, -1)  # the solver works in y, with free = origin + scale · y
    n = origin.shape[1]
    device = origin.device
    solution = torch.zeros_like(origin)
    iterations = torch.zeros(b, dtype=torch.long, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    # The state of the classes still running, compacted whenever some stop, so an iteration
    # touches no other class's data (on a CPU, the gathers would cost more than the arithmetic).
    live = torch.arange(b, device=device)
    live_origin, live_scale, live_problem = origin, scale, problem
    x = torch.zeros_like(origin)
    steps = torch.zeros(b, history, n, dtype=x.dtype, device=device)  # s_j = x_{j+1} − x_j
    changes = torch.zeros_like(steps)  # y_j = g_{j+1} − g_j
    rho = torch.zeros(b, history, dtype=x.dtype, device=device)  # 1 / (s_j · y_j); 0 for a skipped pair
    # The pairs' products s_i · y_j and y_i · y_j, kept up to date as pairs are written (slot order).
    step_change = torch.zeros(b, history, history, dtype=x.dtype, device=device)
    change_change = torch.zeros_like(step_change)
    gamma = torch.ones(b, dtype=x.dtype, device=device)  # initial inverse-Hessian scale
    taken = torch.zeros(b, dtype=torch.long, device=device)  # accepted steps of the live classes

    def value_and_grad(point: torch.Tensor, rows: Optional[torch.Tensor] = None) -> tuple:
        """Objective and gradient in y of the live classes, or of some of them (``rows``)."""
        if tick is not None:
            tick()
        sub, at_origin, at_scale = live_problem, live_origin, live_scale
        if rows is not None:
            sub, at_origin, at_scale = live_problem.select(rows), live_origin[rows], live_scale[rows]
        f, g = sub.loss_and_grad((at_origin + at_scale * point).reshape(-1, *shape))
        return f, at_scale * g.reshape(point.shape)

    f, g = value_and_grad(x)
    for it in range(max_iter):
        if live.numel() == 0:
            break
        direction = -_inverse_hessian_times(g, steps, changes, rho, step_change, change_change, gamma, it)
        slope = (g * direction).sum(1)
        uphill = ~(slope < 0)
        direction = torch.where(uphill[:, None], -g, direction)  # a stale history: steepest descent
        slope = torch.where(uphill, -(g * g).sum(1), slope)
        # First step: no curvature known yet, so a step of unit length.
        t = (1.0 / g.norm(dim=1).clamp(min=EPS)).clamp(max=1.0) if it == 0 else torch.ones_like(slope)
        # Backtracking (Armijo) line search, per class.
        accepted = torch.zeros_like(slope, dtype=torch.bool)
        f_new, g_new = f.clone(), g.clone()
        for _ in range(40):
            todo = ~accepted
            if not bool(todo.any()):
                break
            if bool(todo.all()):
                ft, gt = value_and_grad(x + t[:, None] * direction)
                ok = ft <= f + 1e-4 * t * slope
                f_new, g_new = torch.where(ok, ft, f_new), torch.where(ok[:, None], gt, g_new)
                accepted, t = ok, torch.where(ok, t, 0.5 * t)
                continue
            where = todo.nonzero()[:, 0]
            ft, gt = value_and_grad(x[where] + t[where, None] * direction[where], where)
            ok = ft <= f[where] + 1e-4 * t[where] * slope[where]
            f_new[where[ok]], g_new[where[ok]] = ft[ok], gt[ok]
            accepted[where[ok]] = True
            t[where[~ok]] *= 0.5
        step = t[:, None] * direction * accepted[:, None]
        change = g_new - g
        sy = (step * change).sum(1)
        good = accepted & (sy > 1e-10 * step.norm(dim=1) * change.norm(dim=1))
        slot = it % history
        new_step = torch.where(good[:, None], step, torch.zeros_like(step))
        new_change = torch.where(good[:, None], change, torch.zeros_like(change))
        steps[:, slot], changes[:, slot] = new_step, new_change
        # The new pair's products with the others, and its own.
        row = (changes @ new_step[:, :, None])[:, :, 0]  # s_new · y_j
        column = (steps @ new_change[:, :, None])[:, :, 0]  # s_j · y_new
        with_changes = (changes @ new_change[:, :, None])[:, :, 0]  # y_j · y_new
        step_change[:, slot], change_change[:, slot] = row, with_changes
        step_change[:, :, slot], change_change[:, :, slot] = column, with_changes
        rho[:, slot] = torch.where(good, 1.0 / sy.clamp(min=EPS), torch.zeros_like(sy))
        gamma = torch.where(good, sy / (change * change).sum(1).clamp(min=EPS), gamma)
        x = x + step
        decrease = f - f_new
        f, g = f_new, g_new
        taken += accepted.long()
        # A class is done when its objective stops falling or no step lowers it any more.
        done = ~accepted | (decrease <= tolerance * f_new.abs().clamp(min=1.0)) | (g_new.abs().amax(1) <= EPS)
        if not bool(done.any()):
            continue
        finished = live[done]
        solution[finished], iterations[finished], stopped[finished] = x[done], taken[done], True
        keep = (~done).nonzero()[:, 0]
        live, x, f, g, taken, gamma = live[keep], x[keep], f[keep], g[keep], taken[keep], gamma[keep]
        steps, changes, rho = steps[keep], changes[keep], rho[keep]
        step_change, change_change = step_change[keep], change_change[keep]
        live_origin, live_scale, live_problem = origin[live], scale[live], problem.select(live)
        if solved is not None:
            solved(b - live.numel())
    solution[live], iterations[live] = x, taken  # those that ran out of iterations
    return (origin + scale * solution).reshape(b, *shape).to(start.dtype), iterations, stopped


def _inverse_hessian_times(grad: torch.Tensor, steps: torch.Tensor, changes: torch.Tensor, rho: torch.Tensor,
                           step_change: torch.Tensor, change_change: torch.Tensor, gamma: torch.Tensor,
                           it: int) -> torch.Tensor:
    """L-BFGS's inverse-Hessian estimate times ``grad`` (B, n), from the pairs (B, h, n) in the
    ring buffer (slot ``j % h`` written at iteration j) and their products s_i · y_j and
    y_i · y_j (B, h, h), in the compact form of Byrd, Nocedal and Schnabel (1994):
    H = γI + [S γY] M [S γY]ᵀ with M from those products. It equals the two-loop recursion, in a
    few batched products instead of a loop of 4h small ones, which on a CPU cost more in
    dispatch than in arithmetic. Skipped or unwritten pairs (rho = 0, zero vectors) drop out:
    their rows and columns of SᵀY are zero but for a unit diagonal.
    """
    if it == 0:
        return gamma[:, None] * grad
    # M needs the pairs in the order they came: only the h-sized pieces are put in that order
    # (by index, which is cheaper than torch.roll on small tensors).
    history = steps.shape[1]
    slots = torch.arange(history, device=grad.device)
    order, back = (slots + it) % history, (slots - it) % history  # chronological -> slot, and back

    def chronological(x, dims=(1,)):
        for dim in dims:
            x = x.index_select(dim, order)
        return x

    s_y = chronological(step_change, (1, 2))  # s_i · y_j
    diagonal = s_y.diagonal(dim1=1, dim2=2)  # D: s_i · y_i (0 for a skipped pair)
    skipped = chronological(rho) == 0
    upper = s_y.triu(1) + torch.diag_embed(torch.where(skipped, torch.ones_like(diagonal), diagonal))  # R
    g = gamma[:, None, None]
    s_grad = chronological(steps @ grad[:, :, None])  # (B, h, 1) Sᵀg
    y_grad = chronological(changes @ grad[:, :, None])  # Yᵀg
    first = torch.linalg.solve_triangular(upper, s_grad, upper=True)  # R⁻¹ Sᵀg
    inner = diagonal[:, :, None] * first + g * (chronological(change_change, (1, 2)) @ first - y_grad)
    second = torch.linalg.solve_triangular(upper.transpose(1, 2), inner, upper=False)  # R⁻ᵀ(…)
    # Back to slot order to combine the pairs.
    first, second = first.index_select(1, back), second.index_select(1, back)
    return g[:, :, 0] * grad + (steps.transpose(1, 2) @ second - g * (changes.transpose(1, 2) @ first))[:, :, 0]


def _nelder_mead(problem: _Problem, start: torch.Tensor, max_evaluations: int, tick=None,
                 solved=None) -> torch.Tensor:
    out = start.clone()
    shape = start.shape[1:]
    for c in range(start.shape[0]):
        sub = problem.select(torch.tensor([c], device=start.device))

        def fun(x, sub=sub):
            if tick is not None:
                tick()
            free = torch.from_numpy(x).to(start).reshape(1, *shape)
            with torch.no_grad():
                return float(sub.loss(free)[0])

        result = minimize(fun, start[c].reshape(-1).cpu().double().numpy(), method="Nelder-Mead",
                          options={"maxfev": max_evaluations, "xatol": 1e-10, "fatol": 1e-12})
        out[c] = torch.from_numpy(result.x).to(out).reshape(shape)
        if solved is not None:
            solved(c + 1)
    return out


def refine(features: torch.Tensor, prototypes: torch.Tensor, heads: torch.Tensor,
           config: RefineConfig = RefineConfig(), counts: Optional[torch.Tensor] = None,
           tick: Optional[Callable[[], None]] = None, usage: Optional[torch.Tensor] = None,
           solved: Optional[Callable[[int], None]] = None) -> RefineResult:
    """Refine a batch of classes. ``features`` (B, N, D) as the head sees them (signed allowed),
    ``prototypes`` (B, k, D) from NMF, ``heads`` (B, D) the classes' head rows. ``usage`` (B, k):
    each part's mean NMF encoding over the discovery positions (None: the non-negative
    least-squares fit of the mean feature vector by the parts). ``tick`` is called at every
    objective evaluation and may raise to stop the work; ``solved`` with the number of classes
    solved so far, each time it grows."""
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

    # One batched product with the mask: no masked copy of the features (the largest tensor here).
    mean_feature = (mask[:, None, :] @ features)[:, 0, :].double() / counts.to(features.device)[:, None]
    total = (mean_feature * v64.to(features.device)).sum(1)  # (B,) f̄ · v, the mean logit minus bias
    if usage is None:
        usage = _usage_from_mean(mean_feature, p64.to(features.device))
    shares = part_shares(usage.to(features.device), p64.to(features.device), v64.to(features.device), total)
    clock.lap("shares")

    basis = None
    if config.subspace_rank and k > 1 and config.solver != "none" and min(config.subspace_rank, n) < d:
        if config.subspace_rank < n:
            basis = row_space_basis(features, config.subspace_rank, seed=config.seed, mask=mask)
        else:
            # Fewer positions than the rank: F's whole row space (dimension ≤ N), exactly. A move
            # outside it changes no map and only costs ridge, so the solution lies inside it.
            basis = torch.linalg.qr((features * mask[:, :, None]).transpose(1, 2))[0]
    clock.lap("basis")
    targets = shares if config.contributions == "part" else None
    problem = _Problem(features, mask, prototypes, alpha, residual, config.objective, basis, targets=targets,
                       ridge=config.ridge if config.solver != "none" else 0.0, head_norm=v64.norm(dim=1),
                       norm=config.norm, mean_feature=mean_feature)
    clock.lap("setup")

    with torch.no_grad():
        free = problem.start()
        before = problem.loss(free)
        iterations = torch.zeros(b, dtype=torch.long)
        converged = torch.ones(b, dtype=torch.bool)
        if k > 1 and config.solver == "lbfgs":
            with _cpu_threads(features.device, SOLVER_CPU_THREADS):
                free, iterations, converged = _lbfgs(problem, free, config.max_iter, tick,
                                                     tolerance=config.tolerance, solved=solved)
        elif k > 1 and config.solver == "nelder-mead":
            free = _nelder_mead(problem, free, config.max_evaluations, tick, solved=solved)
        after = problem.loss(free)
        # Never return a split worse than the one we started from.
        worse = after > before
        free = torch.where(worse[:, None, None], problem.start(), free)
        after = torch.where(worse, before, after)
        split_shares = problem.shares(free)
        if solved is not None:
            solved(b)
        clock.lap("solve")

        # Final prototypes in float64; the last one closes the sum so Σ p̃ = v to rounding.
        first = alpha[:, :k - 1, None] * p64[:, :k - 1] + split_shares[:, :k - 1]
        last = v64 - first.sum(1)
        final = torch.cat([first, last[:, None, :]], dim=1)
        final_maps = features @ final.to(features.dtype).transpose(1, 2)
        fidelity = map_correlation(final_maps, problem.signs[:, None, :] * problem.nmf_maps, problem.mask)
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
        iterations=iterations.cpu(),
        converged=converged.cpu(),
        part_share=shares.cpu(),
        mean_contribution=contribution.cpu(),
        timings=clock.laps,
    )


def _usage_from_mean(mean_feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, k) ū ≥ 0 with ū P ≈ f̄ (non-negative least squares), when NMF's encodings are not given."""
    out = [nnls(p.T.cpu().numpy(), f.clamp(min=0).cpu().numpy())[0] for p, f in zip(prototypes, mean_feature)]
    return torch.tensor(np.stack(out), dtype=torch.float64, device=prototypes.device)


@contextmanager
def _cpu_threads(device: torch.device, threads: int):
    """At most ``threads`` intra-op threads while the solver runs on the CPU: its tensors are small
    (classes × positions × k), so more threads only add hand-offs, and on a busy machine their
    waits cost more than the work (measured: 54 s with 2 threads against 3.9 s with 1, for one
    batch of 4 classes at k = 8, on 2 shared cores). The setting is the process's; it is put back
    at once."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
