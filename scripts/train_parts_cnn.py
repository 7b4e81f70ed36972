"""Train the parts-benchmark CNN on the synthetic part images (seeded, CPU, a few minutes).

    python scripts/train_parts_cnn.py [--epochs 6] [--seed 0] [--out assets/parts-benchmark]

Writes ``parts_cnn.safetensors`` (the state dict), ``metrics.json`` (test accuracy,
settings, timing) and ``sample.png`` (a few test images per class) to ``--out``.
The images are regenerated from the dataset seed, never stored. The benchmark itself is
``python scripts/parts_benchmark.py`` (its design and results: ``docs/benchmarks/``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn.evaluate.parts_cnn import METRICS_FILE, PREPROCESS, WEIGHTS_FILE, PartsCNN  # noqa: E402
from phpn.evaluate.synthetic_parts import SyntheticPartsConfig, generate  # noqa: E402


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PREPROCESS.mean)[None, :, None, None]
    std = torch.tensor(PREPROCESS.std)[None, :, None, None]
    return (x - mean) / std


@torch.no_grad()
def accuracy(model, x, y, batch=256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / max(len(x), 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="training seed (init, order, flips)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "parts-benchmark"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train(args)


def train(args) -> dict:

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    start = time.time()

    cfg = SyntheticPartsConfig(train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                               seed=args.data_seed)
    data = generate(cfg)
    x_all, y_all = to_tensor(data.images), torch.from_numpy(data.labels)
    train, test = torch.from_numpy(data.is_train), torch.from_numpy(~data.is_train)
    x_train, y_train, x_test, y_test = x_all[train], y_all[train], x_all[test], y_all[test]
    gen_s = time.time() - start
    print(f"generated {len(x_train)} train / {len(x_test)} test images in {gen_s:.1f}s", flush=True)

    model = PartsCNN(num_classes=data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        total, n = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            # Every part looks the same mirrored left-right, so flips keep the labels true.
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / n:.4f}  test acc {accuracy(model, x_test, y_test):.4f}"
              f"  ({time.time() - start:.0f}s)", flush=True)

    model.eval()
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    seconds = time.time() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    digest = hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest()
    metrics = {
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "test_images": int(len(x_test)),
        "train_images": int(len(x_train)),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "part_names": data.part_names,
        "width": list(model.width),
        "receptive_field_px": 22,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "dataset": cfg.to_dict(),
        "preprocess": PREPROCESS.to_dict(),
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "weights_sha256": digest,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

    from PIL import Image

    rows = []
    for c in range(data.num_classes):
        idx = np.nonzero((data.labels == c) & ~data.is_train)[0][:4]
        rows.append(np.concatenate(list(data.images[idx]), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "sample.png", optimize=True)
    print(json.dumps({k: metrics[k] for k in ("test_accuracy", "train_accuracy", "train_seconds")}))
    return metrics


if __name__ == "__main__":
    main()
