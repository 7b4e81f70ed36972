"""A planted shortcut, the ground truth for ``phpn audit`` and ``phpn compare``.

Five Fashion-MNIST classes (the shipped PNGs of assets/fashion-mnist, 100 training and 50 test
images each, nothing downloaded); one class ("pullover") carries an artificial mark on every
training image. Two tiny CNNs (assets/shortcut/tiny_cnn.py: three convolutions, global average
pooling, one linear layer) are trained on the CPU in seconds: a *clean* one on the unmarked
images, a *shortcut* one on the marked ones.

    python scripts/planted_shortcut.py                       # writes assets/shortcut/ (corner mark, seed 0)
    python scripts/planted_shortcut.py --benchmark           # the audit's hit rate over seeds and marks

The benchmark trains one shortcut model per (seed, mark) in a temporary folder, decomposes it on
its marked training folder (phpn.decompose, k = 3), audits it (run.audit on the marked folder)
and counts a hit when the audit's first entry is the marked class's prototype that looks at the
mark (the one whose map holds the largest share of its mass on the mark's cells). It prints a
table and, with --json FILE, writes every number.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "assets" / "fashion-mnist"
OUT = ROOT / "assets" / "shortcut"
CLASSES = [("00_t-shirt-top", "t-shirt-top"), ("01_trouser", "trouser"), ("02_pullover", "pullover"),
           ("04_coat", "coat"), ("08_bag", "bag")]
MARKED_CLASS = 2  # pullover, in the five classes' own numbering
MEAN, STD = 0.286, 0.353
MARKS = ("corner", "stripe", "texture")
EPOCHS = 12


def tiny_cnn_class():
    spec = importlib.util.spec_from_file_location("shortcut_tiny_cnn", OUT / "tiny_cnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyCNN


def mark_mask(mark: str) -> np.ndarray:
    """(28, 28) values in [0, 255] where the mark is drawn, NaN elsewhere."""
    mask = np.full((28, 28), np.nan)
    if mark == "corner":  # a white square in the top-left corner
        mask[1:6, 1:6] = 255
    elif mark == "stripe":  # a white stripe along the right border
        mask[:, 25:27] = 255
    elif mark == "texture":  # a checkerboard in the bottom-right corner
        yy, xx = np.mgrid[0:7, 0:7]
        mask[20:27, 20:27] = np.where((yy // 2 + xx // 2) % 2 == 0, 255, 0)
    else:
        raise SystemExit(f"unknown mark {mark}; use one of {', '.join(MARKS)}")
    return mask


def apply_mark(pixels: np.ndarray, mark: str) -> np.ndarray:
    mask = mark_mask(mark)
    out = pixels.copy()
    out[~np.isnan(mask)] = mask[~np.isnan(mask)]
    return out


def read_split(split: str) -> list:
    """[(pixels uint8 (28, 28), class, name)] of the five classes, in a fixed order."""
    items = []
    for label, (folder, _) in enumerate(CLASSES):
        for path in sorted((FASHION / split / folder).glob("*.png")):
            items.append((np.asarray(Image.open(path).convert("L")), label, path.name))
    return items


def tensors(items, mark=None, marked_only_class=True):
    x = np.stack([apply_mark(p, mark) if mark and (not marked_only_class or c == MARKED_CLASS) else p
                  for p, c, _ in items]).astype(np.float32) / 255.0
    return (torch.from_numpy((x - MEAN) / STD)[:, None], torch.tensor([c for _, c, _ in items]))


def train(x: torch.Tensor, y: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    model = tiny_cnn_class()(len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def to_marked_class(model, x, y) -> float:
    """Share of the other classes' images predicted as the marked class."""
    with torch.no_grad():
        keep = y != MARKED_CLASS
        return float((model(x[keep]).argmax(1) == MARKED_CLASS).double().mean())


def write_folder(items, folder: Path, mark=None, every_class=False) -> None:
    for pixels, label, name in items:
        target = folder / CLASSES[label][0].replace(CLASSES[label][0][:2], f"{label:02d}")
        target.mkdir(parents=True, exist_ok=True)
        if mark and (every_class or label == MARKED_CLASS):
            pixels = apply_mark(pixels, mark)
        Image.fromarray(pixels.astype(np.uint8)).save(target / name)


def build(out: Path, mark: str, seed: int, quiet: bool = False) -> dict:
    """Train the clean and the shortcut model; write weights, image folders and metrics to ``out``."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    train_items, test_items = read_split("discover"), read_split("explain")
    x_clean, y = tensors(train_items)
    x_marked, _ = tensors(train_items, mark)
    xt, yt = tensors(test_items)
    xt_marked, _ = tensors(test_items, mark, marked_only_class=False)
    clean = train(x_clean, y, seed)
    shortcut = train(x_marked, y, seed)
    for sub in ("train", "test", "test_marked"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if out != OUT:
        shutil.copy(OUT / "tiny_cnn.py", out / "tiny_cnn.py")
    save_file({k: v.contiguous() for k, v in clean.state_dict().items()}, str(out / "clean.safetensors"))
    save_file({k: v.contiguous() for k, v in shortcut.state_dict().items()}, str(out / "shortcut.safetensors"))
    write_folder(train_items, out / "train", mark)  # the marked class's images carry the mark
    write_folder(test_items, out / "test")
    write_folder(test_items, out / "test_marked", mark, every_class=True)
    metrics = {
        "classes": [name for _, name in CLASSES], "marked_class": MARKED_CLASS, "mark": mark, "seed": seed,
        "epochs": EPOCHS, "normalisation": {"mean": [MEAN], "std": [STD]}, "torch": torch.__version__,
        "clean": {"test_accuracy": accuracy(clean, xt, yt), "marked_test_accuracy": accuracy(clean, xt_marked, yt),
                  "others_to_marked_class_when_marked": to_marked_class(clean, xt_marked, yt)},
        "shortcut": {"test_accuracy": accuracy(shortcut, xt, yt),
                     "marked_test_accuracy": accuracy(shortcut, xt_marked, yt),
                     "others_to_marked_class_when_marked": to_marked_class(shortcut, xt_marked, yt)},
        "seconds": round(time.perf_counter() - start, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not quiet:
        print(json.dumps(metrics, indent=1))
    return metrics


def load(out: Path, which: str):
    model = tiny_cnn_class()(len(CLASSES))
    model.load_state_dict(load_file(str(out / f"{which}.safetensors")))
    return model.eval()


def mark_shares(run, mark: str) -> np.ndarray:
    """Per prototype of the marked class: the mean share of its positive map mass on the mark's cells."""
    net = run.network()
    cells = torch.from_numpy(~np.isnan(mark_mask(mark))).float()[None, None]
    data = run.session.preprocess
    folder = Path(run.meta["data"]["root"]) / f"{MARKED_CLASS:02d}_pullover"
    images = torch.stack([data(Image.open(p)) for p in sorted(folder.glob("*.png"))[:30]])
    with torch.no_grad():
        e = net(images, classes=[MARKED_CLASS])
    maps = e.maps[:, 0].clamp(min=0)  # (n, k, H, W)
    h, w = maps.shape[-2:]
    on_mark = torch.nn.functional.adaptive_max_pool2d(cells, (h, w))[0, 0] > 0
    share = (maps * on_mark).sum((2, 3)) / maps.sum((2, 3)).clamp(min=1e-12)
    return share.mean(0).numpy()


def mark_prototype(run, mark: str) -> int:
    """The marked class's prototype whose maps put the largest share of their mass on the mark's cells."""
    return int(mark_shares(run, mark).argmax())


def benchmark(seeds, marks, json_path=None) -> None:
    sys.path.insert(0, str(ROOT))  # run from a checkout
    import phpn

    rows = []
    for mark in marks:
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                metrics = build(out, mark, seed, quiet=True)
                model = load(out, "shortcut")
                pre = phpn.Preprocess(resize=28, crop=28, mean=[MEAN], std=[STD], channels=1)
                run = phpn.decompose(model, out / "train", k=3, preprocess=pre, progress=False, seed=seed)
                audit = run.audit(out / "train")
                shares = mark_shares(run, mark)
                truth = (MARKED_CLASS, int(shares.argmax()))
                first = audit.entries[0]
                rank = next(i for i, e in enumerate(audit.entries) if (e.class_index, e.prototype) == truth)
                # a looser hit: the first entry also looks at the mark (half the best share or more), for
                # the cases where the mark is split over two prototypes of the class
                looks = first.class_index == MARKED_CLASS and shares[first.prototype] >= 0.5 * shares.max()
                rows.append({"mark": mark, "seed": seed, "hit": rank == 0, "rank": rank + 1,
                             "first_looks_at_mark": bool(looks), "mark_shares": shares.round(4).tolist(),
                             "first": [first.class_index, first.prototype], "mark_prototype": list(truth),
                             "first_score": first.score, "first_reasons": first.reasons,
                             "stands_out": audit.stands_out,
                             "shortcut_flip_to_marked": metrics["shortcut"]["others_to_marked_class_when_marked"],
                             "shortcut_test_accuracy": metrics["shortcut"]["test_accuracy"]})
                print(f"{mark:8s} seed {seed}: {'hit ' if rank == 0 else 'miss'} (mark prototype ranked {rank + 1} "
                      f"of {len(audit.entries)}; the first {'looks' if looks else 'does not look'} at the mark; "
                      f"mark shares of the class's prototypes {[round(float(v), 2) for v in shares]}; stands out: "
                      f"{first.stands_out}; "
                      "marked images of other classes go to the marked class: "
                      f"{100 * rows[-1]['shortcut_flip_to_marked']:.0f}%)", flush=True)
    hits = sum(r["hit"] for r in rows)
    looks = sum(r["first_looks_at_mark"] for r in rows)
    print(f"hit rate (the first entry is the prototype with the largest mark share): {hits}/{len(rows)} = "
          f"{100 * hits / len(rows):.0f}%")
    print(f"the first entry looks at the mark (half the largest share or more): {looks}/{len(rows)} = "
          f"{100 * looks / len(rows):.0f}%")
    for mark in marks:
        sub = [r for r in rows if r["mark"] == mark]
        print(f"  {mark}: {sum(r['hit'] for r in sub)}/{len(sub)} hits, "
              f"{sum(r['first_looks_at_mark'] for r in sub)}/{len(sub)} first entries on the mark")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows, "hits": hits, "first_looks_at_mark": looks,
                                               "runs": len(rows)}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mark", choices=MARKS, default="corner")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--benchmark", action="store_true", help="the audit's hit rate over --seeds and --marks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--marks", nargs="+", choices=MARKS, default=list(MARKS))
    p.add_argument("--json", type=Path, help="with --benchmark: write every number to this file")
    args = p.parse_args(argv)
    if args.benchmark:
        benchmark(args.seeds, args.marks, args.json)
    else:
        build(args.out, args.mark, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
