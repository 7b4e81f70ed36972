"""Benchmark: discovery + refinement against scikit-learn's NMF, in the same process; and, with
``--end-to-end``, a JPEG folder to a certified run, timed by stage.

    python -m phpn.evaluate.speed [--quick] [--json] [--device auto|cpu|cuda]
    python -m phpn.evaluate.speed --end-to-end [--quick] [--workers N] [--decode auto|cpu|gpu] [--json]

Data: CUB-shaped synthetic post-ReLU features — 200 classes × 30 images × 7×7 positions ×
2048 channels. Each class mixes a few sparse non-negative part directions (its own and
some shared with other classes), switched on at some positions of each image, plus
Gaussian noise, through a ReLU: the statistics of the last block of a ResNet-50 in
miniature. The baseline is ``sklearn.decomposition.NMF(init="nndsvda", solver="cd")``
fitted class by class on a sample of classes, its time scaled to all classes.

End to end: a synthetic folder of JPEGs (200 classes × 30 images at 256 px, CUB-sized;
``--quick``: 10 × 8) and a torchvision ResNet-50 with random weights (nothing downloaded).
It reports each stage's time and images/s, decoding alone, a pure forward pass over the
same images preloaded as tensors, and the two ratios the pipeline aims at: feature stage /
pure forward (≥ 0.9 when decoding keeps up) and certificate / feature stage (≤ 0.1), with
the decode mode used (``--decode gpu``: the workers read the JPEGs' bytes and the GPU decodes them).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from phpn.config import DECODE, DECODES
from phpn.device import resolve_device
from phpn.errors import PhpnError
from phpn.head import LoadedModel
from phpn.images.batches import batch_decode_device, default_workers, describe_decode, iter_batches
from phpn.images.folders import scan_image_folder
from phpn.images.preprocess import Preprocess
from phpn.method.nmf import NMFConfig, nmf, sklearn_nmf
from phpn.method.refine import RefineConfig, refine
from phpn.models import diagnose
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.pipeline.features import FeatureTap
from phpn.runs.store import save_run


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
    # As discovery does: each part's share from its mean NMF encoding.
    usage = found.encodings.sum(1) / on_device.shape[1]
    refined = refine(on_device, found.prototypes, heads, RefineConfig(seed=seed), usage=usage)
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
        "refine_iterations": {"min": int(refined.iterations.min()), "median": int(refined.iterations.median()),
                              "max": int(refined.iterations.max())},
        "refine_converged": int(refined.converged.sum()),
        "max_head_error": head_error,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return result


# ----------------------------------------------------------------------------- end to end

def synthetic_jpeg_folder(root, classes: int, images: int, size: int = 256, seed: int = 0):
    """``root/<class>/<image>.jpg``: per class a tint and a few blobs, plus noise (decoding cost is real)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(40, 215, 3)
        for i in range(images):
            noise = rng.normal(0, 40, (size, size, 3)) + tint
            image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 12, size // 4))]
                draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            image.save(folder / f"{i:03d}.jpg", quality=90)
    return root


def run_end_to_end(quick: bool = False, device: str = "auto", classes: int = 0, images: int = 0,
                   workers=None, batch_size: int = 64, k: int = 3, seed: int = 0, folder=None,
                   decode: str = DECODE) -> dict:
    """Folder of JPEGs -> certified run with a random-weight torchvision ResNet-50, timed by stage."""
    dev = resolve_device(device)
    classes = classes or (10 if quick else 200)
    images = images or (8 if quick else 30)
    workers = default_workers() if workers is None else workers
    decode_mode = describe_decode(batch_decode_device(decode, dev))  # a bad mode fails before the folder is made
    with tempfile.TemporaryDirectory(prefix="phpn-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = Path(folder) if folder else synthetic_jpeg_folder(tmp / "images", classes, images, seed=seed)
        make_folder_s = time.perf_counter() - t0
        if folder:
            classes = sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

        torch.manual_seed(seed)
        model = torchvision.models.resnet50(weights=None, num_classes=classes).eval()
        pre = Preprocess(resize=256, crop=224)
        loaded = LoadedModel(model=model, arch="resnet50", num_classes=classes, sha256="0" * 64, preprocess=pre,
                             source="random weights (benchmark)")
        split = diagnose(loaded, input_size=(3, 224, 224)).split
        data = scan_image_folder(root, num_classes=classes)
        n = sum(len(c.paths) for c in data.classes)
        paths = [p for c in data.classes for p in c.paths]

        # Decoding alone, with the same workers: what the folder can deliver.
        t0 = time.perf_counter()
        preloaded = [x for x, _, _ in iter_batches(root, paths, pre, batch_size, workers, decode=decode, device=dev)]
        _sync(dev)
        decode_alone_s = time.perf_counter() - t0

        # A pure forward over preloaded tensors, in the same precision as discovery's pass.
        tap = FeatureTap(split, model, dev)
        tap(preloaded[0][:2])  # warm-up (and the tap's one-time check)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in preloaded:
                model(x.to(dev, non_blocking=True).contiguous(
                    memory_format=torch.channels_last if dev.type == "cuda" else torch.contiguous_format))
        _sync(dev)
        forward_s = time.perf_counter() - t0
        del preloaded

        config = DiscoveryConfig(k=k, device=str(dev), batch_size=batch_size, seed=seed)
        t0 = time.perf_counter()
        run = discover(loaded, split, data, pre, config, certify=True, workers=workers, decode=decode)
        discover_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_run(run, tmp / "run")
        save_s = time.perf_counter() - t0

    t = run.timings
    feature_stage_s = t["decode_wait_s"] + t["features_s"]
    stages = {"decode (waiting on the workers)": t["decode_wait_s"], "features + logits (model)": t["features_s"],
              "NMF": t["nmf_s"], "refinement": t["refine_s"], "certificate": t["certify_s"], "save": save_s}
    cert = run.recorded_certificate
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "decode": decode,
        "decode_mode": decode_mode,
        "classes": classes,
        "images": n,
        "image_size": 256,
        "batch_size": batch_size,
        "k": k,
        "make_folder_s": make_folder_s,
        "stages_s": stages,
        "folder_to_certified_run_s": discover_s + save_s,
        "decode_alone_s": decode_alone_s,
        "decode_alone_images_per_s": n / decode_alone_s,
        "pure_forward_s": forward_s,
        "pure_forward_images_per_s": n / forward_s,
        "feature_stage_s": feature_stage_s,
        "feature_stage_images_per_s": n / feature_stage_s,
        "feature_stage_over_pure_forward": (n / feature_stage_s) / (n / forward_s),
        "certificate_over_feature_stage": t["certify_s"] / feature_stage_s,
        "certificate_pass": cert["pass"],
        "certificate_passed": cert["passed"],
        "certificate_images": cert["images"],
        "max_relative_logit_diff": cert["relative_logit_diff"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def print_end_to_end(r: dict) -> None:
    n = r["images"]
    print(f"device {r['device']} ({r['torch_threads']} threads, {r['workers']} decoding workers), ResNet-50 (random "
          f"weights), {r['classes']} classes x {n // r['classes']} JPEGs at {r['image_size']} px, k = {r['k']}")
    print(f"decode {r['decode']}: {r['decode_mode']}")
    print(f"{'stage':34s} {'seconds':>8s} {'images/s':>9s}")
    for name, s in r["stages_s"].items():
        print(f"{name:34s} {s:8.2f} {n / s if s > 0 else float('inf'):9.1f}")
    print(f"{'folder -> certified run':34s} {r['folder_to_certified_run_s']:8.2f} "
          f"{n / r['folder_to_certified_run_s']:9.1f}")
    print(f"{'decoding alone (same workers)':34s} {r['decode_alone_s']:8.2f} {r['decode_alone_images_per_s']:9.1f}")
    print(f"{'pure forward (preloaded tensors)':34s} {r['pure_forward_s']:8.2f} {r['pure_forward_images_per_s']:9.1f}")
    print(f"feature stage / pure forward: {r['feature_stage_over_pure_forward']:.2f} (target >= 0.90)")
    print(f"certificate / feature stage: {r['certificate_over_feature_stage']:.3f} (target <= 0.10); "
          f"{'PASSED' if r['certificate_passed'] else 'FAILED'} on {r['certificate_images']} images, "
          f"{r['certificate_pass']}, max |Δlogit| {r['max_relative_logit_diff']:.1g} of max |logit|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phpn.evaluate.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 classes instead of 200")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-classes", type=int, default=0, help="classes scikit-learn is timed on")
    parser.add_argument("--classes", type=int, default=0, help="override the number of classes")
    parser.add_argument("--json", action="store_true")
    g = parser.add_argument_group("end to end: a JPEG folder -> certified run with a random-weight ResNet-50")
    g.add_argument("--end-to-end", action="store_true",
                   help="time decode, features, NMF, refinement, certificate, save (CUB-sized: 200 x 30 at 256 px)")
    g.add_argument("--images", type=int, default=0, help="images per class (default 30, --quick 8)")
    g.add_argument("--workers", type=int, help="decoding processes (default: the cores less one)")
    g.add_argument("--decode", choices=list(DECODES), default=DECODE,
                   help="where the JPEGs are decoded (auto: on the GPU when the model runs there)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--folder", help="an existing class-folder tree to use instead of the synthetic one")
    args = parser.parse_args(argv)
    if args.end_to_end:
        try:
            r = run_end_to_end(quick=args.quick, device=args.device, classes=args.classes, images=args.images,
                               workers=args.workers, batch_size=args.batch_size, folder=args.folder,
                               decode=args.decode)
        except PhpnError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(r)) if args.json else print_end_to_end(r)
        return 0
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
          f"{r['median_map_fidelity']:.3f}, max head error {r['max_head_error']:.1e}; L-BFGS iterations per class "
          f"{r['refine_iterations']['min']}-{r['refine_iterations']['max']} (median {r['refine_iterations']['median']}), "
          f"{r['refine_converged']} of {r['classes']} classes converged")
    print(f"peak memory {r['peak_rss_mb']:.0f} MB RSS" + (f", {r['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
