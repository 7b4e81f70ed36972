import pytest
import torch

from phpn.errors import ConfigError
from phpn.method.nmf import NMFConfig, nmf
from phpn.method.refine import RefineConfig, _inverse_hessian_times, _Problem, part_shares, refine, scale


def _problem(b=2, n=300, d=24, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(b, n, d, generator=g, dtype=torch.float64))
    heads = torch.randn(b, d, generator=g, dtype=torch.float64)
    protos = nmf(features, NMFConfig(k=k)).prototypes
    return features, protos, heads


@pytest.mark.parametrize("solver", ["lbfgs", "nelder-mead", "none"])
@pytest.mark.parametrize("objective", ["prototype", "residual"])
def test_prototypes_sum_exactly_to_head_row(solver, objective):
    features, protos, heads = _problem()
    result = refine(features, protos, heads, RefineConfig(solver=solver, objective=objective, max_evaluations=300))
    assert result.prototypes.shape == (2, 3, 24)
    err = (result.prototypes.sum(1) - heads).norm(dim=1) / heads.norm(dim=1)
    assert float(err.max()) < 1e-12
    assert bool((result.objective_after <= result.objective_before + 1e-12).all())


def test_lbfgs_lowers_the_objective_and_keeps_maps_faithful():
    features, protos, heads = _problem()
    plain = refine(features, protos, heads, RefineConfig(solver="none"))
    fitted = refine(features, protos, heads, RefineConfig(solver="lbfgs"))
    assert bool((fitted.objective_after < 0.8 * plain.objective_after).all())
    assert float(fitted.fidelity.mean()) > float(plain.fidelity.mean())


def test_subspace_and_full_space_agree_on_exactness():
    features, protos, heads = _problem(d=40)
    sub = refine(features, protos, heads, RefineConfig(subspace_rank=8))
    full = refine(features, protos, heads, RefineConfig(subspace_rank=0))
    for r in (sub, full):
        assert float((r.prototypes.sum(1) - heads).abs().max()) < 1e-12
    assert bool((full.objective_after <= sub.objective_before).all())


def test_scaling_is_least_squares_and_nnls_is_non_negative():
    features, protos, heads = _problem()
    alpha = scale(protos, heads, "lstsq")
    residual = heads - (alpha[:, :, None] * protos).sum(1)
    # The least-squares residual is orthogonal to every prototype.
    assert float((protos @ residual[:, :, None]).abs().max()) < 1e-10
    assert bool((scale(protos, heads, "nnls") >= 0).all())


def test_fidelity_is_one_for_the_equal_split_when_the_head_is_in_the_span():
    features, protos, _ = _problem()
    heads = (torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]], dtype=torch.float64)[:, :, None] * protos).sum(1)
    result = refine(features, protos, heads, RefineConfig(solver="none", contributions="free"))
    assert float(result.residual_ratio.max()) < 1e-10
    torch.testing.assert_close(result.fidelity, torch.ones(2, 3, dtype=torch.float64))
    assert int(result.negative_alpha.sum()) == 0


def test_k_equal_one_is_the_head_row_itself():
    features, protos, heads = _problem(k=1)
    result = refine(features, protos, heads)
    torch.testing.assert_close(result.prototypes[:, 0], heads)


def test_unknown_solver_message():
    with pytest.raises(ConfigError, match="Unknown solver 'adam'. Choose one of: lbfgs, nelder-mead, none"):
        RefineConfig(solver="adam")


def test_scaling_copes_with_repeated_and_null_prototypes():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 1, 16, generator=g, dtype=torch.float64)
    protos = torch.cat([p, p, torch.zeros_like(p)], dim=1)  # two equal rows and a null one
    heads = torch.randn(2, 16, generator=g, dtype=torch.float64)
    alpha = scale(protos, heads)
    assert bool(torch.isfinite(alpha).all())
    best = (protos[:, 0] * heads).sum(1) / (protos[:, 0] * protos[:, 0]).sum(1)  # projection on the one direction
    torch.testing.assert_close(alpha[:, 0] + alpha[:, 1], best)


def _usage(features, k=3):
    found = nmf(features, NMFConfig(k=k))
    return found.prototypes, found.encodings.mean(1)


@pytest.mark.parametrize("solver", ["lbfgs", "none"])
def test_part_contributions_are_held_at_the_parts_shares(solver):
    features, _, heads = _problem()
    protos, usage = _usage(features)
    result = refine(features, protos, heads, RefineConfig(solver=solver), usage=usage)
    total = (features.mean(1) * heads).sum(1, keepdim=True)
    # The shares sum to the class's mean logit minus bias, and the contributions equal them.
    torch.testing.assert_close(result.part_share.sum(1), total[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.mean_contribution, result.part_share, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(result.mean_contribution, (result.prototypes @ features.mean(1)[:, :, None])[:, :, 0])
    raw = usage * (protos @ heads[:, :, None])[:, :, 0]
    assert bool((torch.sign(result.part_share) == torch.sign(raw)).all())
    assert float((result.prototypes.sum(1) - heads).abs().max()) < 1e-12


@pytest.mark.slow
def test_free_contributions_are_not_held():
    features, _, heads = _problem()
    protos, usage = _usage(features)
    result = refine(features, protos, heads, RefineConfig(contributions="free"), usage=usage)
    assert float((result.mean_contribution - result.part_share).abs().max()) > 1e-3


def test_part_shares_keep_signs_or_shift_equally():
    usage = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    protos = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    heads = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    total = torch.tensor([4.0, 3.0], dtype=torch.float64)
    shares = part_shares(usage, protos, heads, total)
    # Class 0: raw shares 1, 2, -1 sum to 2, same sign as the total: scaled by 2.
    torch.testing.assert_close(shares[0], torch.tensor([2.0, 4.0, -2.0], dtype=torch.float64))
    # Class 1: raw shares 1, -1, 0 sum to 0: each is shifted by (3 - 0) / 3.
    torch.testing.assert_close(shares[1], torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))


def test_usage_defaults_to_the_non_negative_fit_of_the_mean_feature():
    features, _, heads = _problem()
    protos, _ = _usage(features)
    result = refine(features, protos, heads, RefineConfig())
    torch.testing.assert_close(result.part_share.sum(1), (features.mean(1) * heads).sum(1))
    torch.testing.assert_close(result.mean_contribution, result.part_share, rtol=1e-7, atol=1e-9)


def test_bad_contributions_and_ridge_messages():
    with pytest.raises(ConfigError, match="Unknown contributions 'none'"):
        RefineConfig(contributions="none")
    with pytest.raises(ConfigError, match="ridge must be zero or positive, got -1"):
        RefineConfig(ridge=-1)


def _float32_problem(b=4, n=400, d=48, k=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    # Correlated channels, as real features have, so the problem is not trivially conditioned.
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]
    features = torch.relu(torch.randn(b, n, d, generator=g) @ mixing.T)
    heads = torch.randn(b, d, generator=g)
    found = nmf(features, NMFConfig(k=k))
    return features, found.prototypes, heads, found.encodings.mean(1)


def test_each_class_is_solved_on_its_own_to_convergence():
    features, protos, heads, usage = _float32_problem()
    batch = refine(features, protos, heads, RefineConfig(subspace_rank=16), usage=usage)
    assert bool(batch.converged.all()) and int(batch.iterations.min()) > 0
    assert int(batch.iterations.max()) < RefineConfig().max_iter
    # A class refined alone ends where it ends in the batch: no shared line search or history.
    alone = refine(features[1:2], protos[1:2], heads[1:2], RefineConfig(subspace_rank=16), usage=usage[1:2])
    moved = float((alone.prototypes[0] - batch.prototypes[1]).norm() / heads[1].double().norm())
    assert moved < 1e-6
    assert int(alone.iterations[0]) == int(batch.iterations[1])


def test_a_rounding_sized_perturbation_moves_the_prototypes_by_about_as_much():
    # The thread count changes the features' last bits; a converged refinement must not
    # amplify that into visibly different prototypes.
    features, protos, heads, usage = _float32_problem()
    g = torch.Generator().manual_seed(9)
    nudged = features * (1 + 1e-6 * torch.randn(features.shape, generator=g))
    config = RefineConfig(subspace_rank=16)
    a = refine(features, protos, heads, config, usage=usage)
    b = refine(nudged, protos, heads, config, usage=usage)
    moved = (a.prototypes - b.prototypes).norm(dim=-1).amax(1) / heads.double().norm(dim=1)
    assert float(moved.max()) < 1e-4
    torch.testing.assert_close(a.mean_contribution, b.mean_contribution, rtol=1e-4, atol=1e-6)


def test_an_iteration_cap_that_stops_the_solver_is_reported():
    features, protos, heads, usage = _float32_problem()
    capped = refine(features, protos, heads, RefineConfig(subspace_rank=16, max_iter=2), usage=usage)
    assert not bool(capped.converged.any()) and capped.iterations.tolist() == [2, 2, 2, 2]
    from phpn.method.part_metrics import warnings_for

    text = warnings_for({"refine_converged": False, "refine_iterations": 2})
    assert text == ["Refinement stopped at its iteration cap (2) before converging, so these prototypes can move "
                    "with rounding (thread count, device): raise --lbfgs-iter."]


@pytest.mark.slow
def test_few_positions_search_the_whole_row_space_of_the_features():
    # 60 positions, 300 channels, rank 128: F's row space (dimension 60) is searched exactly, and
    # the split is as good as one searched in all 300 dimensions.
    g = torch.Generator().manual_seed(4)
    features = torch.relu(torch.randn(3, 60, 300, generator=g))
    heads = torch.randn(3, 300, generator=g)
    found = nmf(features, NMFConfig(k=3))
    usage = found.encodings.mean(1)
    rowspace = refine(features, found.prototypes, heads, RefineConfig(), usage=usage)
    everything = refine(features, found.prototypes, heads, RefineConfig(subspace_rank=0), usage=usage)
    assert bool(rowspace.converged.all())
    assert float((rowspace.prototypes.sum(1) - heads.double()).abs().max()) < 1e-12
    assert float(rowspace.objective_after.sum()) <= 1.01 * float(everything.objective_after.sum())


def _direct_objective(problem, features, mask, protos, alpha, heads, residual, free, objective, ridge):
    """The z-score objective from the maps themselves: Σ_i ‖z(±F p_i) − z(F p̃_i)‖² + ridge."""
    w = mask[:, :, None]
    count = mask.sum(1)[:, None, None]

    def zscore(maps):
        centred = (maps - (maps * w).sum(1, keepdim=True) / count) * w
        return centred / ((centred * centred).sum(1, keepdim=True) / count).sqrt()

    shares = problem.shares(free)  # (B, k, D), summing to the residual
    compared = shares if objective == "residual" else alpha[:, :, None] * protos + shares
    target = zscore(problem.signs[:, None, :] * (features @ protos.transpose(1, 2)))
    diff = target - zscore(features @ compared.transpose(1, 2))
    moves = shares - (residual / protos.shape[1])[:, None, :]
    weight = ridge * mask.sum(1) / heads.square().sum(1)
    return (diff * diff).sum((1, 2)) + weight * (moves * moves).sum((1, 2))


@pytest.mark.parametrize("objective", ["prototype", "residual"])
def test_the_moment_objective_equals_the_objective_of_the_maps(objective):
    # Values and gradients at random splits, with padded rows (garbage features) in one class.
    g = torch.Generator().manual_seed(5)
    features = torch.relu(torch.randn(3, 200, 40, generator=g, dtype=torch.float64))
    heads = torch.randn(3, 40, generator=g, dtype=torch.float64)
    found = nmf(features, NMFConfig(k=4))
    protos = found.prototypes.double()
    counts = torch.tensor([200, 150, 200])
    mask = (torch.arange(200)[None, :] < counts[:, None]).double()
    alpha = scale(protos, heads)
    residual = heads - (alpha[:, :, None] * protos).sum(1)
    mean_feature = (mask[:, None, :] @ features)[:, 0, :] / counts[:, None]
    shares = part_shares(found.encodings.mean(1), protos, heads, (mean_feature * heads).sum(1))
    # An orthonormal basis to float64 rounding, so the ridge on ‖r_i − R/k‖ is exactly the one on the moves.
    basis = torch.linalg.qr(torch.randn(3, 40, 16, generator=g, dtype=torch.float64))[0]
    problem = _Problem(features, mask, protos, alpha, residual, objective, basis, targets=shares, ridge=0.1,
                       head_norm=heads.norm(dim=1), norm="zscore", mean_feature=mean_feature)
    assert problem.moments is not None
    for seed in range(3):
        free = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        free = free * heads.norm(dim=1)[:, None, None] / 4
        value, grad = problem.loss_and_grad(free)
        point = free.clone().requires_grad_(True)
        direct = _direct_objective(problem, features, mask, protos, alpha, heads, residual, point, objective, 0.1)
        (direct_grad,) = torch.autograd.grad(direct.sum(), point)
        torch.testing.assert_close(value, direct.detach(), rtol=1e-9, atol=0)
        torch.testing.assert_close(problem.loss(free), direct.detach(), rtol=1e-9, atol=0)
        torch.testing.assert_close(grad, direct_grad, rtol=1e-9, atol=1e-9 * float(direct_grad.abs().max()))


def _two_loop(grad, steps, changes, rho, gamma, it):
    """The textbook two-loop recursion over the ring buffer, newest pair first."""
    history = steps.shape[1]
    order = [(it - 1 - j) % history for j in range(min(it, history))]
    q, coefficients = grad.clone(), []
    for j in order:
        a = rho[:, j] * (steps[:, j] * q).sum(1)
        q -= a[:, None] * changes[:, j]
        coefficients.append(a)
    r = gamma[:, None] * q
    for j, a in zip(reversed(order), reversed(coefficients)):
        r += steps[:, j] * (a - rho[:, j] * (changes[:, j] * r).sum(1))[:, None]
    return r


@pytest.mark.parametrize("it", [0, 1, 3, 5, 7, 13])
def test_the_compact_inverse_hessian_equals_the_two_loop_recursion(it):
    # Pairs from a convex quadratic, in ring-buffer slots, with a skipped pair and unwritten slots.
    g = torch.Generator().manual_seed(it)
    b, history, n = 3, 5, 12
    hessian = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    hessian = hessian @ hessian.transpose(1, 2) + torch.eye(n, dtype=torch.float64)
    steps = torch.randn(b, history, n, generator=g, dtype=torch.float64)
    changes = steps @ hessian
    rho = 1 / (steps * changes).sum(2)
    written = torch.arange(history) < min(it, history)
    skipped = torch.zeros(b, history, dtype=torch.bool)
    skipped[1, 2] = it > 2
    blank = ~written[None, :] | skipped
    steps, changes = steps.masked_fill(blank[:, :, None], 0), changes.masked_fill(blank[:, :, None], 0)
    rho = rho.masked_fill(blank, 0)
    grad = torch.randn(b, n, generator=g, dtype=torch.float64)
    gamma = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    compact = _inverse_hessian_times(grad, steps, changes, rho, steps @ changes.transpose(1, 2),
                                     changes @ changes.transpose(1, 2), gamma, it)
    torch.testing.assert_close(compact, _two_loop(grad, steps, changes, rho, gamma, it), rtol=1e-12, atol=1e-12)
