"""How fast a large run opens and is shown: a synthetic run of 10,000 classes, saved, then
timed: open it, read one class, open it for its model as the app does; a first Class-browser
visit (the class's record, prototypes and shared parts, its maps on a few images) and one
image explained, through the network that reads only the classes it explains; against
checking all of it and building the network over every class, in the same process.

    python scripts/large_run.py                      # 10,000 classes, k=5, D=2048 (~1.3 GB on disk)
    python scripts/large_run.py --classes 1000 --json out.json

The prototypes are random directions that sum exactly to random head rows; each class has a
record like discovery's (statistics, fidelity, top patches, shared parts, image paths), so
run.json and the shards have the sizes a real ImageNet-scale run would have. The model is a 1x1
convolution to D channels, global pooling and a linear head holding those rows (no weights to
download); its images are a few random 32-pixel pictures seen at 7x7 (a ResNet's feature grid).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phpn.api import explain_image, open_model, open_run  # noqa: E402
from phpn.images.preprocess import Preprocess
from phpn.runs.store import Run, load_run, save_run, verify_run  # noqa: E402
from phpn.show import viz  # noqa: E402

PREPROCESS = Preprocess(resize=7, crop=7)  # a 7x7 feature grid, as a ResNet-50's at 224 px
MAP_IMAGES = 4  # the Class browser's default number of class images with maps


class PooledLinear(nn.Module):
    """features (a 1x1 convolution to D channels, ReLU) -> global mean -> the run's head."""

    def __init__(self, head_rows: torch.Tensor, head_bias: torch.Tensor):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, head_rows.shape[1], 1), nn.ReLU())
        self.fc = nn.Linear(head_rows.shape[1], head_rows.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(head_rows)
            self.fc.bias.copy_(head_bias)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def synthetic_run(classes: int = 10_000, k: int = 5, features: int = 2048, seed: int = 0, top: int = 6,
                  images: int = 30) -> Run:
    """A run with ``classes`` decomposed classes whose prototypes sum to random head rows."""
    g = torch.Generator().manual_seed(seed)
    head_rows = torch.randn(classes, features, generator=g)  # float32, as a model's head
    head_bias = torch.randn(classes, generator=g)
    prototypes = torch.randn(classes, k, features, dtype=torch.float64, generator=g) / k
    prototypes[:, -1] = head_rows.double() - prototypes[:, :-1].sum(1)  # the last part closes the sum exactly
    nmf = prototypes.abs().float()
    nmf /= nmf.norm(dim=2, keepdim=True)
    alpha = torch.rand(classes, k, dtype=torch.float64, generator=g)
    numbers = torch.rand(classes, 8, k, dtype=torch.float64, generator=g).tolist()
    records = []
    for c in range(classes):
        folder = f"{c:05d}_class"
        paths = [f"{folder}/image_{i:04d}.jpg" for i in range(images)]
        share, fid, spec, iou = numbers[c][:4]
        records.append({
            "index": c, "folder": folder, "images": images, "alpha": alpha[c].tolist(), "negative_alpha": 0,
            "residual_ratio": numbers[c][4][0], "objective_before": 200 * numbers[c][5][0] + 1,
            "objective_after": 100 * numbers[c][5][1], "nmf_relative_error": numbers[c][6][0],
            "fidelity": fid, "specificity": spec, "part_share": share, "mean_contribution": share,
            "cancellation": 1.0, "overlap_iou": iou[0], "overlap_iou_per_prototype": iou,
            "overlap_iou_random": {"mean": 0.3, "std": 0.02, "draws": 5}, "alpha_flags": [None] * k,
            "fidelity_heldout": None, "specificity_heldout": None, "warnings": [],
            "top_patches": [[{"path": paths[(p * top + j) % images], "score": 10.0 - j, "position": [j % 7, p % 7],
                              "box": [16 * j, 16 * p, 16 * j + 64, 16 * p + 64]} for j in range(top)]
                            for p in range(k)],
            "paths": paths,
            "similar_prototypes": [[{"class_index": (c + 1 + (7 * p + j) % max(1, classes - 1)) % classes, "prototype": (p + j) % k,
                                     "cosine": 0.5 - 0.1 * j} for j in range(viz.SIMILAR_TOP)] for p in range(k)],
        })
    meta = {
        "model": {"arch": "synthetic", "sha256": "0" * 64, "class_names": [f"class {c}" for c in range(classes)],
                  "feature_layer": "features", "head_layer": "fc"},
        "preprocess": PREPROCESS.to_dict(),
        "data": {"root": "synthetic"}, "config": {"k": k, "seed": seed}, "timings": {}, "classes": records,
        "certificate": None,
    }
    return Run(prototypes=prototypes, nmf_prototypes=nmf, alpha=alpha, class_indices=torch.arange(classes),
               head_rows=head_rows, head_bias=head_bias, meta=meta)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _images(folder: Path, count: int) -> list:
    """``count`` random 32-pixel pictures in ``folder``; their names relative to it."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = [f"image_{i:04d}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    return names


def measure(classes: int, k: int, features: int, folder: Path) -> dict:
    run, build_s = _timed(synthetic_run, classes, k, features)
    session = open_model(PooledLinear(run.head_rows, run.head_bias).eval(), preprocess=PREPROCESS)
    run.meta["model"].update(arch=session.loaded.arch, sha256=session.loaded.sha256,
                             feature_layer=session.split.feature_layer, head_layer=session.split.head_layer)
    path, save_s = _timed(save_run, run, folder / "run")
    del run  # what follows reads only the saved folder
    files = sorted(path.iterdir())
    one = classes * 9 // 10  # a class far from the first shard

    def open_and_read_one():
        opened = load_run(path)
        return opened, opened.class_meta(one), opened.class_prototypes(one)

    (opened, record, protos), first_s = _timed(open_and_read_one)
    _, open_s = _timed(lambda: load_run(path))
    for_model, for_model_s = _timed(lambda: open_run(path, session))
    _, for_model_first_s = _timed(lambda: for_model.class_meta(one))
    listing, list_s = _timed(lambda: [f"{n} ({i})" for n, i in zip(opened.class_names, opened.class_indices.tolist())])
    _, another_s = _timed(lambda: opened.class_meta(3))
    images = folder / "images"
    pictures = _images(images, MAP_IMAGES)

    def class_browser():  # what the Class browser reads for its first class: the page's own calls
        run = open_run(path, session)
        network = run.lazy_network(session.split)
        meta, shared = run.class_meta(one), viz.shared_parts(run, one)
        maps = viz.class_maps(network, session.preprocess, images, pictures, one)[1]
        return network, meta, shared, maps

    (browser_net, _, shared, maps), browser_s = _timed(class_browser)

    def explain_one():  # the Explain page: the best-scoring class of one image, and its record
        run = open_run(path, session)
        network = run.lazy_network(session.split)
        explained = explain_image(session, network, images / pictures[0])
        return network, explained, run.class_meta(explained.class_index)

    (explain_net, explained, _), explain_s = _timed(explain_one)
    _, full_network_s = _timed(lambda: open_run(path, session).network(session.split))
    _, verify_s = _timed(lambda: verify_run(path))
    _, everything_s = _timed(lambda: load_run(path).prototypes)
    assert len(listing) == classes and record["index"] == one and tuple(protos.shape) == (k, features)
    assert browser_net.cached_classes == [one] and explain_net.cached_classes == [explained.class_index]
    assert maps.shape == (MAP_IMAGES, k, 7, 7) and len(shared) == k
    # Exact: the model's logit is the bias plus the prototypes' contributions (float32 rounding).
    gap = abs(explained.bias + float(explained.contributions.sum()) - explained.logit)
    return {
        "classes": classes, "k": k, "features": features,
        "run_json_mb": (path / "run.json").stat().st_size / 2 ** 20,
        "on_disk_mb": sum(f.stat().st_size for f in files) / 2 ** 20, "shards": len(opened.meta["shards"]),
        "build_s": build_s, "save_s": save_s,
        "open_s": open_s, "open_and_first_class_s": first_s, "class_list_s": list_s, "another_class_s": another_s,
        "open_for_model_s": for_model_s, "open_for_model_and_first_class_s": for_model_s + for_model_first_s,
        "verify_all_s": verify_s, "read_all_prototypes_s": everything_s,
        "class_browser_first_class_s": browser_s, "explain_one_image_s": explain_s,
        "full_network_s": full_network_s, "explain_logit": explained.logit, "explain_logit_gap": gap,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--dir", help="where to write the run (default: a temporary folder, removed after)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="phpn-large-run-", dir=args.dir))
    try:
        r = measure(args.classes, args.k, args.features, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{r['classes']} classes, k={r['k']}, D={r['features']}: {r['on_disk_mb']:.0f} MB in {r['shards']} shards, "
          f"run.json {r['run_json_mb']:.1f} MB (built in {r['build_s']:.1f} s, saved in {r['save_s']:.1f} s)")
    print(f"  open (run.json + head)          {r['open_s']:.3f} s")
    print(f"  open + first class (its shard)  {r['open_and_first_class_s']:.3f} s")
    print(f"  class list from the index       {r['class_list_s']:.3f} s")
    print(f"  another class (another shard)   {r['another_class_s']:.3f} s")
    print(f"  open for its model, as the app  {r['open_for_model_s']:.3f} s (+ first class: "
          f"{r['open_for_model_and_first_class_s']:.3f} s)")
    print(f"  verify every shard              {r['verify_all_s']:.3f} s")
    print(f"  open + read all prototypes      {r['read_all_prototypes_s']:.3f} s")
    print(f"  Class browser, first class      {r['class_browser_first_class_s']:.3f} s (open for the model, its record, "
          f"prototypes and shared parts, maps on {MAP_IMAGES} images: one shard)")
    print(f"  Explain one image               {r['explain_one_image_s']:.3f} s (open for the model, explain its "
          f"best class: one shard; logit {r['explain_logit']:.2f}, |bias + Σ contributions - logit| = "
          f"{r['explain_logit_gap']:.1e})")
    print(f"  network over every class        {r['full_network_s']:.3f} s (open for the model, read every shard)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
