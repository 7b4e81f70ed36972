"""Small batched linear-algebra helpers shared by NMF and refinement."""
from __future__ import annotations

import torch


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of (B, n, m) ``y`` by Cholesky QR, done twice.

    Batched QR runs one factorisation per matrix on some backends; Cholesky QR needs only
    batched matrix products and an m×m Cholesky, which is what makes the randomised range
    finders fast on a GPU. The Gram matrix is factorised in float64 with a small jitter so
    rank-deficient inputs still give a usable (if not exactly orthonormal) basis.
    """
    m = y.shape[-1]
    eye = torch.eye(m, dtype=torch.float64, device=y.device)
    for _ in range(2):
        gram = (y.transpose(-2, -1) @ y).double()
        jitter = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)[..., None, None]
        chol, _ = torch.linalg.cholesky_ex(gram + jitter * eye)
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # L⁻¹
        y = y @ inv.transpose(-2, -1).to(y.dtype)  # Y L⁻ᵀ
    return y
