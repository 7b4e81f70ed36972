"""Discovery across processes and machines, on torch.distributed.

    torchrun --nproc_per_node 2 -m phpn discover --checkpoint model.pt --data DIR --out run

Every rank scans the same folder and plans the same groups of classes (the unit that is
factorised and refined as one batch). Rank r reads, extracts, factorises and refines groups
r, r + N, r + 2N, ...; rank 0 gathers the groups and writes one run. Since each group sees
exactly the inputs it would see in a single process, the run equals the single-process run
with the same settings (memory budget included). Backend: NCCL on GPUs (one per local
rank), gloo on the CPU; multi-node runs use torchrun's usual flags (--nnodes, --rdzv-*).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from phpn.errors import ConfigError


@dataclass
class Shard:
    rank: int
    world: int

    def agree(self, key: str) -> None:
        """Refuse to go on unless every rank planned the same discovery (same model, images, groups)."""
        keys = [None] * self.world
        dist.all_gather_object(keys, key)
        if len(set(keys)) != 1:
            bad = [r for r, k in enumerate(keys) if k != keys[0]]
            raise ConfigError(f"Ranks {', '.join(map(str, bad))} planned a different discovery than rank 0 "
                              "(another model file, image folder or setting).",
                              "Give every rank the same command and the same files.")

    def barrier(self) -> None:
        dist.barrier()

    def gather(self, results: dict) -> Optional[dict]:
        """Every rank's {group index: GroupResult}, merged on rank 0 (None elsewhere)."""
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(results, parts, dst=0)
        if self.rank != 0:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return merged


def launched() -> bool:
    """True in a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_environment(device: str = "auto") -> Optional[Shard]:
    """Join the process group torchrun describes (None when not launched with several ranks)."""
    if not launched():
        return None
    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu:
        # One GPU per local rank; "cuda" then means this rank's GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return Shard(rank=dist.get_rank(), world=dist.get_world_size())


def close(shard: Optional[Shard]) -> None:
    if shard is not None and dist.is_initialized():
        dist.destroy_process_group()
