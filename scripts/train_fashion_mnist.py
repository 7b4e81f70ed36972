"""Train the built-in Fashion-MNIST demo model (phpn.demos.fashion_cnn.FashionCNN) on CPU.

Reads Debian's ``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``):

    /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

and writes, under ``assets/fashion-mnist/``:

    model.safetensors              the state dict
    metrics.json                   test accuracy (all 10,000 test images), accuracy on the
                                   bundled explain sample, seed, epochs, time, versions
    discover/<NN_name>/*.png       100 training images per class (deterministic pick)
    explain/<NN_name>/*.png        50 test images per class (deterministic pick)

Seeded and deterministic on CPU (same torch version and thread count give the same
weights). 10 epochs took 15 minutes wall (517 s CPU) on 2 cores shared with other jobs:

    python scripts/train_fashion_mnist.py [--epochs 10] [--seed 0] [--threads 2]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

# Threads that wait for work sleep instead of spinning: on a shared machine spinning
# OpenMP threads halve throughput. Must be set before torch (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phpn.demos.fashion_cnn import FashionCNN  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = ROOT / "assets" / "fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DISCOVER_PER_CLASS = 100
EXPLAIN_PER_CLASS = 50


def folder_name(index: int) -> str:
    slug = CLASS_NAMES[index].lower().replace("/", "-").replace(" ", "-")
    return f"{index:02d}_{slug}"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str):
    images = DATA_DIR / f"{split}-images-idx3-ubyte.gz"
    labels = DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        sys.exit(f"{images} not found. Install it with: apt-get install -y dataset-fashion-mnist")
    return read_idx(images), read_idx(labels)


def pick_per_class(labels: np.ndarray, per_class: int, seed: int) -> dict:
    """{class: sorted indices}: a seeded, deterministic sample of each class."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    return {c: sorted(int(i) for i in order[labels[order] == c][:per_class]) for c in range(len(CLASS_NAMES))}


def export_pngs(images: np.ndarray, picks: dict, root: Path, prefix: str) -> None:
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for c, indices in picks.items():
        d = tmp / folder_name(c)
        d.mkdir(parents=True)
        for i in indices:
            Image.fromarray(images[i], "L").save(d / f"{prefix}_{i:05d}.png", optimize=True)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with zero padding (in normalised space: pad with the background value)
    and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    background = float(x.min())
    padded = F.pad(x[:, 0], (pad, pad, pad, pad), value=background)  # (n, h+2p, w+2p)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = dx[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads columns backwards
    rows = dy[:, None] + torch.arange(h)[None, :]
    out = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]
    return out


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].contiguous(memory_format=torch.channels_last)
        correct += int((model(xb).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--train-limit", type=int, default=None, help="use only the first N training images (smoke test)")
    args = ap.parse_args(argv)

    t0, c0 = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    train_x, train_y = load_split("train")
    test_x, test_y = load_split("t10k")
    print(f"train {train_x.shape}, test {test_x.shape}", flush=True)

    # Real images for the demo: written first, so they exist even if training is stopped.
    discover_picks = pick_per_class(train_y, DISCOVER_PER_CLASS, args.seed)
    explain_picks = pick_per_class(test_y, EXPLAIN_PER_CLASS, args.seed + 1)
    export_pngs(train_x, discover_picks, out / "discover", "train")
    export_pngs(test_x, explain_picks, out / "explain", "test")
    print("exported discover/ and explain/ PNGs", flush=True)

    # Normalisation statistics of the training set, rounded: the demo's Preprocess uses
    # exactly these numbers.
    mean = round(float(train_x.mean() / 255.0), 4)
    std = round(float((train_x / 255.0).std()), 4)

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.astype(np.float32)) / 255.0 - mean) / std)[:, None]

    xtr, ytr = to_tensor(train_x), torch.from_numpy(train_y.astype(np.int64))
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    xte, yte = to_tensor(test_x), torch.from_numpy(test_y.astype(np.int64))

    model = FashionCNN(len(CLASS_NAMES)).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        te = time.time()
        perm = torch.randperm(len(xtr), generator=gen)
        total_loss, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            xb = augment(xtr[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = ytr[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        row = {"epoch": epoch + 1, "train_loss": round(total_loss / len(xtr), 4),
               "train_acc_augmented": round(correct / len(xtr), 4), "seconds": round(time.time() - te, 1)}
        history.append(row)
        print(json.dumps(row), flush=True)

    test_acc = evaluate(model, xte, yte)
    print(f"test accuracy (10,000 images): {test_acc:.4f}", flush=True)

    model = model.to(memory_format=torch.contiguous_format).eval()
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"arch": "fashion-cnn"})

    # Accuracy on the bundled explain sample, read back from the PNGs exactly as phpn does.
    from phpn.images.batches import load_batch
    from phpn.images.folders import scan_image_folder
    from phpn.images.preprocess import Preprocess
    pre = Preprocess(resize=28, crop=28, mean=(mean,), std=(std,), channels=1)
    data = scan_image_folder(out / "explain", class_names=CLASS_NAMES, num_classes=10)
    correct = total = 0
    with torch.no_grad():
        for c in data.classes:
            xb, kept, _ = load_batch(out / "explain", c.paths, pre)
            correct += int((model(xb).argmax(1) == c.class_index).sum())
            total += len(kept)
    explain_acc = correct / total
    print(f"explain-sample accuracy ({total} PNGs): {explain_acc:.4f}", flush=True)

    elapsed, cpu = time.time() - t0, time.process_time() - c0
    metrics = {
        "arch": "fashion-cnn",
        "test_accuracy": round(test_acc, 4),
        "test_images": int(len(xte)),
        "explain_sample_accuracy": round(explain_acc, 4),
        "explain_sample_images": total,
        "normalisation": {"mean": [mean], "std": [std]},
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"SGD nesterov momentum 0.9, weight decay 5e-4, OneCycle max lr {args.lr}",
        "augmentation": "random crop 28 from 2-px padding, horizontal flip",
        "threads": args.threads,
        "train_seconds": round(elapsed, 1),
        "cpu_seconds": round(cpu, 1),
        "timing_note": "wall time on a 2-core machine shared with other jobs; cpu_seconds is the process's own CPU time",
        "history": history,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "data": "Debian package dataset-fashion-mnist (" + str(DATA_DIR) + ")",
        "discover_picks": f"{DISCOVER_PER_CLASS} training images per class, numpy default_rng({args.seed}) permutation",
        "explain_picks": f"{EXPLAIN_PER_CLASS} test images per class, numpy default_rng({args.seed + 1}) permutation",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"done in {elapsed:.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
