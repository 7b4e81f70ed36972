import torch

from phpn.method.linalg import orthonormalize


def test_orthonormal_basis_of_a_full_rank_matrix():
    y = torch.randn(3, 200, 10, generator=torch.Generator().manual_seed(0))
    q = orthonormalize(y)
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(10).expand(3, 10, 10), atol=1e-4, rtol=0)
    # Same column space: projecting y onto q changes nothing.
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ y), y, atol=1e-3, rtol=1e-3)


def test_rank_deficient_input_stays_finite():
    g = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(4, 768, 8, generator=g))
    features[:, :, 3:6] = 0  # dead channels: rank 5 of 8
    q = orthonormalize(features @ torch.randn(4, 8, 8, generator=g))
    assert bool(torch.isfinite(q).all())
    # The live directions are still spanned.
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ features), features, atol=1e-2, rtol=1e-2)
