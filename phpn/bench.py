"""Benchmark: discovery + refinement against scikit-learn's NMF, in the same process.

    python -m phpn.bench [--quick] [--json] [--device auto|cpu|cuda]

Data: CUB-shaped synthetic post-ReLU features — 200 classes × 30 images × 7×7 positions ×
2048 channels. Each class mixes a few sparse non-negative part directions (its own and
some shared with other classes), switched on at some positions of each image, plus
Gaussian noise, through a ReLU: the statistics of the last block of a ResNet-50 in
miniature. The baseline is ``sklearn.decomposition.NMF(init="nndsvda", solver="cd")``
fitted class by class on a sample of classes, its time scaled to all classes.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from .device import resolve_device
from .nmf import NMFConfig, nmf, sklearn_nmf
from .refine import RefineConfig, refine


def synthetic_features(classes: int = 200, images: int = 30, positions: int = 49, channels: int = 2048,
                       parts: int = 6, shared: int = 16, seed: int = 0) -> torch.Tensor:
    """(classes, images·positions, channels) float32 post-ReLU features."""
    g = torch.Generator().manual_seed(seed)
    n = images * positions
    shared_parts = (torch.rand(shared, channels, generator=g) < 0.05) * torch.rand(shared, channels, generator=g) * 2
    out = torch.empty(classes, n, channels)
    for c in range(classes):
        own = (torch.rand(parts, channels, generator=g) < 0.05) * torch.rand(parts, channels, generator=g) * 3
        pick = torch.randperm(shared, generator=g)[:3]
        directions = torch.cat([own, shared_parts[pick]])
        on = torch.rand(n, directions.shape[0], generator=g) < 0.25
        codes = on * torch.rand(n, directions.shape[0], generator=g)
        out[c] = torch.relu(codes @ directions + 0.5 * torch.randn(n, channels, generator=g) - 0.25)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(quick: bool = False, device: str = "auto", k: int = 3, baseline_classes: int = 0,
                  seed: int = 0, classes: int = 0) -> dict:
    dev = resolve_device(device)
    classes = classes or (40 if quick else 200)
    baseline_classes = baseline_classes or (2 if quick else 6)
    features = synthetic_features(classes=classes, seed=seed)
    heads = torch.randn(classes, features.shape[2], generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    threads = torch.get_num_threads()

    # Baseline: scikit-learn, one class at a time, on the same float32 data.
    sk_errors, sk_time = [], 0.0
    for c in range(baseline_classes):
        x = features[c].numpy()
        t0 = time.perf_counter()
        _, _, err, _ = sklearn_nmf(x, k, seed=seed)
        sk_time += time.perf_counter() - t0
        sk_errors.append(err / float(np.linalg.norm(x)))
    sk_per_class = sk_time / baseline_classes

    # phpn: every class in one batch on the device.
    on_device = features.to(dev)
    heads = heads.to(dev)
    warmup_s = 0.0
    if dev.type == "cuda":
        # One-time costs (CUDA context, cuBLAS/cuSOLVER handles, runtime-compiled kernels) are
        # paid by a small problem first and reported apart from the steady-state timing.
        t0 = time.perf_counter()
        small = nmf(on_device[:2], NMFConfig(k=k, max_iter=5, polish_iter=2))
        refine(on_device[:2], small.prototypes, heads[:2], RefineConfig(max_iter=3))
        _sync(dev)
        warmup_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    found = nmf(on_device, NMFConfig(k=k, seed=seed))
    _sync(dev)
    t_nmf = time.perf_counter() - t0
    t0 = time.perf_counter()
    refined = refine(on_device, found.prototypes, heads, RefineConfig(seed=seed))
    _sync(dev)
    t_refine = time.perf_counter() - t0

    ours_sample = found.relative_error[:baseline_classes].double().cpu().numpy()
    head_error = float(((refined.prototypes.sum(1) - heads.double()).norm(dim=1) / heads.double().norm(dim=1)).max())
    result = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": threads,
        "classes": classes,
        "shape_per_class": list(features.shape[1:]),
        "k": k,
        "phpn_nmf_s": t_nmf,
        "phpn_refine_s": t_refine,
        "phpn_total_s": t_nmf + t_refine,
        "nmf_iterations": found.iterations,
        "sklearn_classes_timed": baseline_classes,
        "sklearn_per_class_s": sk_per_class,
        "sklearn_all_classes_s": sk_per_class * classes,
        "speedup_vs_sklearn_nmf": sk_per_class * classes / (t_nmf + t_refine),
        "phpn_relative_error_sample": float(ours_sample.mean()),
        "sklearn_relative_error_sample": float(np.mean(sk_errors)),
        "error_ratio_phpn_over_sklearn": float(ours_sample.mean() / np.mean(sk_errors)),
        "phpn_relative_error_all": float(found.relative_error.mean()),
        "phpn_refine_steps_s": refined.timings,
        "warmup_s": warmup_s,
        "refine_objective_drop": float((1 - refined.objective_after / refined.objective_before).mean()),
        "median_map_fidelity": float(refined.fidelity.median()),
        "max_head_error": head_error,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phpn.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 classes instead of 200")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-classes", type=int, default=0, help="classes scikit-learn is timed on")
    parser.add_argument("--classes", type=int, default=0, help="override the number of classes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = run_benchmark(quick=args.quick, device=args.device, baseline_classes=args.baseline_classes,
                      classes=args.classes)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"device {r['device']}, {r['classes']} classes of {r['shape_per_class']} features, k = {r['k']}")
    print(f"phpn     NMF {r['phpn_nmf_s']:.2f}s + refinement {r['phpn_refine_s']:.2f}s = {r['phpn_total_s']:.2f}s")
    print("         refinement steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["phpn_refine_steps_s"].items()))
    if r["warmup_s"]:
        print(f"         (one-time GPU warm-up on 2 classes, not counted: {r['warmup_s']:.2f}s)")
    print(f"sklearn  NMF {r['sklearn_per_class_s']:.2f}s/class -> {r['sklearn_all_classes_s']:.1f}s for all "
          f"(timed on {r['sklearn_classes_timed']} classes)")
    print(f"speed-up {r['speedup_vs_sklearn_nmf']:.1f}x   relative error phpn {r['phpn_relative_error_sample']:.4f} vs "
          f"sklearn {r['sklearn_relative_error_sample']:.4f} (ratio {r['error_ratio_phpn_over_sklearn']:.4f})")
    print(f"refinement: objective -{100 * r['refine_objective_drop']:.0f}%, median map fidelity "
          f"{r['median_map_fidelity']:.3f}, max head error {r['max_head_error']:.1e}")
    print(f"peak memory {r['peak_rss_mb']:.0f} MB RSS" + (f", {r['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
