"""What ``run.certify(loader)`` costs beside the user's own forward loop over the same loader.

    python scripts/certify_cost.py [--images 1024] [--batch-size 128] [--arch resnet18] [--repeats 3]

A CIFAR-sized torchvision model (32x32 inputs, 10 classes; random weights: the cost does not
depend on them) is decomposed on a few images per class; then, on the same DataLoader of
preprocessed tensors, the user's loop (``model(x)`` for every batch, under inference_mode) and
``run.certify(loader)`` are timed alternately, the median of ``--repeats`` each. The target is a
ratio of at most 1.5: certify makes one forward pass of the model per batch and reads the
features it catches on the way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phpn  # noqa: E402
from phpn.method.certify import InputWarning  # noqa: E402

warnings.simplefilter("ignore", InputWarning)  # random weights are near chance, on purpose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=10).eval()
    x = torch.randn(args.images, 3, 32, 32)
    y = torch.arange(args.images) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    run = phpn.decompose(model, loader, k=3, images_per_class=8, progress=False, device=args.device)
    device = next(run.session.loaded.model.parameters()).device  # where phpn left the model

    def own_loop():
        with torch.inference_mode():
            for images, _ in loader:
                run.session.loaded.model(images.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    def certify():
        return run.certify(loader, progress=False, device=args.device)

    own_loop()  # warm-up: allocations
    start = time.perf_counter()
    certify()  # the first call also checks, on its first batch, that the features caught are the backbone's
    first_s = time.perf_counter() - start
    own, ours = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        own_loop()
        own.append(time.perf_counter() - start)
        start = time.perf_counter()
        cert = certify()
        ours.append(time.perf_counter() - start)
    own_s, ours_s = statistics.median(own), statistics.median(ours)
    print(f"{args.arch}, {args.images} images of 3x32x32 in batches of {args.batch_size} on {device} "
          f"(median of {args.repeats}; torch threads {torch.get_num_threads()})")
    print(f"  the user's own forward loop  {own_s:7.3f} s")
    print(f"  run.certify(loader)          {ours_s:7.3f} s   {ours_s / own_s:.2f} x   ({cert.summary()[:60]}...)")
    print(f"  its first call               {first_s:7.3f} s   {first_s / own_s:.2f} x   (with the one-batch check)")


if __name__ == "__main__":
    main()
