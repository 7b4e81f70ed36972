"""Where refinement spends its time: L-BFGS iterations vs objective, and the top kernels.

    PYTHONPATH=. python scripts/profile_refine.py [--device cuda] [--classes 200]
"""
import argparse
import time

import torch

from phpn.device import resolve_device
from phpn.evaluate.speed import synthetic_features
from phpn.method.nmf import NMFConfig, nmf
from phpn.method.refine import RefineConfig, refine


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=200)
    args = parser.parse_args()
    dev = resolve_device(args.device)
    features = synthetic_features(classes=args.classes).to(dev)
    heads = (torch.randn(args.classes, features.shape[2], generator=torch.Generator().manual_seed(1)) * 0.05).to(dev)
    protos = nmf(features, NMFConfig(k=3)).prototypes
    refine(features[:2], protos[:2], heads[:2], RefineConfig(max_iter=3))  # warm-up
    for iterations in (25, 50, 100):
        for rank in (64, 128):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = refine(features, protos, heads, RefineConfig(max_iter=iterations, subspace_rank=rank))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            drop = float((1 - r.objective_after / r.objective_before).mean())
            print(f"iterations {iterations:3d} rank {rank:3d}: {time.perf_counter() - t0:.2f}s "
                  f"{ {k: round(v, 3) for k, v in r.timings.items()} } objective -{100 * drop:.1f}% "
                  f"median fidelity {float(r.fidelity.median()):.3f}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        refine(features, protos, heads, RefineConfig(max_iter=20))
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
