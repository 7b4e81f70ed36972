"""Consistency and stability of part-prototypes (Huang et al., ICCV 2023), on plain arrays.

The protocol, as the paper and its reference code define it:

1. For an image of class c and a prototype of c, upsample the prototype's map to the input
   size (bicubic) and take its argmax (the first one in row-major order on ties).
2. Around the argmax put a box of half-size ``half_size`` pixels (36 at a 224 px input;
   :func:`scaled_half_size` scales it to other input sizes), clipped to the image:
   rows ``max(0, y - h) .. min(S, y + h)``, columns likewise, bounds included.
3. The prototype's *part set* on that image: the visible part keypoints inside the box.
4. Consistency: a prototype is consistent if some part is in its part set on at least
   ``threshold`` (0.8) of the images of its class where that part is visible. Score: the
   percentage of consistent prototypes.
5. Stability: add Gaussian noise (std 0.2, in the normalised input space; optionally
   clipped to +/-0.25, as the reference code later did) and recompute the part sets. A
   prototype is stable on an image if its part set is unchanged. Score: the mean over
   prototypes of the fraction of stable images, as a percentage.

Conventions: coordinates are pixels, keypoints ``(x, y)`` = (column, row) like CUB;
peaks are returned as ``(x, y)`` too. Per-prototype values are fractions in [0, 1];
scores are percentages, as the paper reports them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HALF_SIZE = 36.0  # pixels at the reference input size
REFERENCE_SIZE = 224
THRESHOLD = 0.8
SIGMA = 0.2
CLIP = 0.25


def scaled_half_size(input_size: int, half_size: float = HALF_SIZE, reference_size: int = REFERENCE_SIZE) -> float:
    """The box half-size for ``input_size``: ``half_size`` pixels at ``reference_size``."""
    return float(half_size) * float(input_size) / float(reference_size)


def upsample_maps(maps, size) -> torch.Tensor:
    """(..., h, w) maps -> (..., H, W) float32, bicubic (``align_corners=False``, as OpenCV's INTER_CUBIC)."""
    t = torch.as_tensor(np.asarray(maps) if not torch.is_tensor(maps) else maps).float()
    size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, t.shape[-2], t.shape[-1])
    if tuple(flat.shape[-2:]) == size:
        up = flat
    else:
        up = F.interpolate(flat, size=size, mode="bicubic", align_corners=False)
    return up.reshape(*lead, *size)


def peak_locations(maps, size) -> np.ndarray:
    """(..., h, w) maps -> (..., 2) int ``(x, y)`` of the argmax of each upsampled map."""
    up = upsample_maps(maps, size)
    H, W = up.shape[-2:]
    idx = up.reshape(*up.shape[:-2], H * W).argmax(dim=-1).numpy()  # first maximum on ties
    return np.stack([idx % W, idx // W], axis=-1).astype(np.int64)


def parts_in_boxes(peaks, keypoints, visible, half_size: float, size) -> np.ndarray:
    """Which visible keypoints fall in the box around each peak.

    peaks: (N, P, 2) ``(x, y)`` per image and prototype; keypoints: (N, M, 2) ``(x, y)``;
    visible: (N, M) bool; size: input size ``S`` or ``(H, W)``. Returns (N, P, M) bool.
    """
    peaks = np.asarray(peaks, dtype=np.float64)
    kp = np.asarray(keypoints, dtype=np.float64)
    vis = np.asarray(visible, dtype=bool)
    if peaks.ndim != 3 or peaks.shape[-1] != 2:
        raise ValueError(f"peaks must be (N, P, 2), got {peaks.shape}")
    if kp.shape[:2] != vis.shape or kp.shape[0] != peaks.shape[0]:
        raise ValueError(f"keypoints {kp.shape} and visible {vis.shape} do not fit peaks {peaks.shape}")
    H, W = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    h = float(half_size)
    px, py = peaks[..., 0][:, :, None], peaks[..., 1][:, :, None]  # (N, P, 1)
    kx, ky = kp[..., 0][:, None, :], kp[..., 1][:, None, :]  # (N, 1, M)
    inside_x = (np.maximum(0.0, px - h) <= kx) & (kx <= np.minimum(W, px + h))
    inside_y = (np.maximum(0.0, py - h) <= ky) & (ky <= np.minimum(H, py + h))
    return inside_x & inside_y & vis[:, None, :]


def part_sets(maps, keypoints, visible, size, half_size: Optional[float] = None) -> np.ndarray:
    """(N, P, h, w) maps of P prototypes on N images -> (N, P, M) part sets.

    ``half_size`` defaults to 36 px scaled from 224 px to the input size.
    """
    H = int(size) if np.isscalar(size) else int(size[0])
    if half_size is None:
        half_size = scaled_half_size(H)
    return parts_in_boxes(peak_locations(maps, size), keypoints, visible, half_size, size)


def part_fractions(inside, visible) -> np.ndarray:
    """For each prototype and part: in how many of the images where the part is visible it
    is in the prototype's part set. inside (N, P, M), visible (N, M) -> (P, M) in [0, 1].

    A part never visible gets 0 (the reference code divides by 1 instead of 0).
    """
    inside = np.asarray(inside, dtype=bool)
    vis = np.asarray(visible, dtype=bool)
    hits = (inside & vis[:, None, :]).sum(axis=0).astype(np.float64)  # (P, M)
    counts = vis.sum(axis=0).astype(np.float64)  # (M,)
    return hits / np.maximum(counts, 1.0)[None, :]


def consistent(inside, visible, threshold: float = THRESHOLD) -> np.ndarray:
    """(P,) bool: some part is in the prototype's set on >= threshold of its visible images."""
    return (part_fractions(inside, visible) >= threshold).any(axis=1)


def consistency_score(flags: Sequence[bool]) -> float:
    """Percentage of consistent prototypes (``nan`` when there are none)."""
    flags = np.asarray(flags, dtype=bool)
    return float(flags.mean() * 100.0) if flags.size else float("nan")


def stable_fraction(inside_clean, inside_noisy) -> np.ndarray:
    """(N, P, M) part sets without and with noise -> (P,) fraction of images whose set is unchanged."""
    a = np.asarray(inside_clean, dtype=bool)
    b = np.asarray(inside_noisy, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"part sets differ in shape: {a.shape} vs {b.shape}")
    same = (a == b).all(axis=-1)  # (N, P)
    if same.shape[0] == 0:
        return np.full(same.shape[1], np.nan)
    return same.mean(axis=0)


def stability_score(fractions: Sequence[float]) -> float:
    """Mean over prototypes of the stable fraction, as a percentage."""
    f = np.asarray(fractions, dtype=np.float64)
    f = f[~np.isnan(f)]
    return float(f.mean() * 100.0) if f.size else float("nan")


def perturb(images: torch.Tensor, sigma: float = SIGMA, clip: Optional[float] = None,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Add N(0, sigma^2) noise in the normalised input space; ``clip`` bounds it to +/-clip."""
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    noise = noise * float(sigma)
    if clip is not None:
        noise = noise.clamp(-float(clip), float(clip))
    return images + noise
