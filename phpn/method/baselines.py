"""The baselines every quality score is shown beside: prototypes that also sum exactly to the
head row but carry no discovered part (random directions; the class map split evenly)."""
from __future__ import annotations

from typing import Sequence

import torch


def random_prototypes(weight: torch.Tensor, class_indices: Sequence[int], k: int, seed: int = 0) -> torch.Tensor:
    """A baseline: k random directions per class that sum exactly to its head row.

    p_i = v/k + (g_i - mean_j g_j), g_i Gaussian scaled to |v|: each direction is as long
    as the row itself and random; their sum is v.
    """
    g = torch.Generator().manual_seed(int(seed))
    rows = weight.detach().double()[torch.as_tensor(list(class_indices), dtype=torch.long)]  # (Cd, D)
    noise = torch.randn(rows.shape[0], k, rows.shape[1], generator=g, dtype=torch.float64)
    noise = noise / noise.norm(dim=-1, keepdim=True) * rows.norm(dim=-1)[:, None, None]
    protos = rows[:, None, :] / k + noise - noise.mean(dim=1, keepdim=True)
    return protos.float()



def equal_split_prototypes(weight: torch.Tensor, class_indices: Sequence[int], k: int) -> torch.Tensor:
    """A baseline: every prototype is v/k, so every map is the class activation map / k."""
    rows = weight.detach().float()[torch.as_tensor(list(class_indices), dtype=torch.long)]
    return (rows[:, None, :] / k).repeat(1, k, 1)
