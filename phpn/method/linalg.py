"""Small batched linear-algebra helpers shared by NMF and refinement."""
from __future__ import annotations

import torch


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of (B, n, m) ``y`` by Cholesky QR, done twice.

    Batched QR runs one factorisation per matrix on some backends; Cholesky QR needs only
    batched matrix products and an m×m Cholesky, which is what makes the randomised range
    finders fast on a GPU. The Gram matrix is factorised in float64 with a small jitter so
    rank-deficient inputs still give a usable (if not exactly orthonormal) basis; where the
    factorisation still fails, batched QR takes over.
    """
    m = y.shape[-1]
    eye = torch.eye(m, dtype=torch.float64, device=y.device)
    for _ in range(2):
        gram = (y.transpose(-2, -1) @ y).double()
        # A float32 Gram matrix of a rank-deficient Y (dead ReLU channels, say) can have
        # eigenvalues slightly below zero: the jitter lifts them; QR is the fallback.
        jitter = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)[..., None, None]
        chol, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if bool((info != 0).any()) or not bool(torch.isfinite(chol).all()):
            return torch.linalg.qr(y)[0]
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # L⁻¹
        y = y @ inv.transpose(-2, -1).to(y.dtype)  # Y L⁻ᵀ
    return y
