"""Feature extraction: images -> the unpooled feature map the head reads.

Batched under ``torch.inference_mode``; on CUDA with channels_last memory and autocast.
Features come back as float32 (B, D, H, W) on the requested device; callers stream class
by class so only one class's features need to be held at a time.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data import Preprocess, load_batch
from .models.head import HeadSplit
from .progress import ProgressFn


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_backbone(split: HeadSplit, device: torch.device) -> torch.nn.Module:
    backbone = split.backbone.to(device).eval()
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


@torch.inference_mode()
def backbone_features(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device,
                      autocast: bool = False) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, autocast):
        feats = backbone(images)
    return feats.float().contiguous()


def extract_features(split: HeadSplit, root: Path, paths: Sequence[str], preprocess: Preprocess,
                     device: torch.device, batch_size: int = 64, autocast: bool = False,
                     progress: Optional[ProgressFn] = None, stage: str = "features", done_offset: int = 0,
                     total: Optional[int] = None):
    """Features of the images at ``root/paths``: returns (features (n, D, H, W), kept paths, skipped)."""
    backbone = prepare_backbone(split, device)
    chunks, kept, skipped = [], [], []
    total = total if total is not None else len(paths)
    for start in range(0, len(paths), batch_size):
        batch, ok, bad = load_batch(root, paths[start:start + batch_size], preprocess)
        skipped += bad
        if ok:
            chunks.append(backbone_features(backbone, batch, device, autocast))
            kept += ok
        if progress is not None:
            progress(stage, done_offset + min(start + batch_size, len(paths)), total)
    feats = torch.cat(chunks) if chunks else torch.empty(0, device=device)
    return feats, kept, skipped
