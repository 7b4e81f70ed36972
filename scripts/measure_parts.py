"""Measure refinement and the part metrics on the trained models the project ships or installs.

    python scripts/measure_parts.py [--models fashion lite0 parts] [--ks 3 5] [--out FILE.jsonl]
    python scripts/measure_parts.py --signed   # semi-NMF vs NMF on max(F, 0), timm ConvNeXt/ViT

For each model and k: NMF once, then refinement as before ("before": min-max Norm, free
contributions, 100 L-BFGS iterations, no ridge) and with the defaults ("after"); cancellation
|sum c| / sum |c|, prototypes whose mean contribution has the opposite sign of their part's
share, map fidelity; stability under a relative 1e-4 perturbation of every feature (the
smallest correlation of a prototype's map between the two runs, beside the NMF parts'); and
peak purity / top-region overlap on held-out images beside random directions and the equal
split (phpn.evaluate.separation). Numbers in docs/METHOD.md and docs/MEASUREMENTS.md come from here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phpn.evaluate.separation import class_separation, summarise  # noqa: E402
from phpn.method.nmf import NMFConfig, nmf  # noqa: E402
from phpn.method.refine import RefineConfig, map_correlation, refine  # noqa: E402

BEFORE = RefineConfig(contributions="free", ridge=0.0, norm="minmax", max_iter=100)
AFTER = RefineConfig()


def _features(split, root, paths, preprocess):
    from phpn.images.batches import load_batch
    from phpn.pipeline.features import backbone_features, prepare_backbone

    device = torch.device("cpu")
    backbone = prepare_backbone(split, device)
    chunks = []
    for start in range(0, len(paths), 64):
        x, kept, _ = load_batch(root, paths[start:start + 64], preprocess)
        if kept:
            chunks.append(backbone_features(backbone, x, device, False).float())
    return torch.cat(chunks)


def load_model_features(name: str) -> tuple:
    """(discovery features per class, held-out features per class, head rows) of a model."""
    from phpn.api import open_model
    from phpn.demos import get_demo
    from phpn.images.folders import scan_image_folder

    if name in ("fashion", "lite0"):
        demo = {"fashion": "fashion-mnist", "lite0": "imagenet-lite0"}[name]
        session, d = open_model(demo=demo), get_demo(demo)
        data = scan_image_folder(d.discovery_dir(), class_names=session.class_names,
                                 num_classes=session.split.num_classes)
        split, pre = session.split, session.preprocess
        if name == "fashion":  # held out: the demo's own test images
            held = scan_image_folder(d.explain_dir(), class_names=session.class_names, num_classes=10)
            pairs = [(_features(split, data.root, e.paths, pre),
                      _features(split, held.root, held.by_index(e.class_index).paths, pre)) for e in data.classes]
        else:  # held out: the last 3 of each photo's 12 views
            pairs = [(_features(split, data.root, e.paths[:9], pre), _features(split, data.root, e.paths[9:], pre))
                     for e in data.classes]
        classes = [e.class_index for e in data.classes]
    else:
        import tempfile

        from phpn.evaluate.parts_cnn import ASSET_DIR, METRICS_FILE, PREPROCESS, load_parts_benchmark
        from phpn.evaluate.synthetic_parts import SyntheticPartsConfig, generate, write_cub_layout

        _, split = load_parts_benchmark()
        trained = json.loads((ASSET_DIR / METRICS_FILE).read_text())
        gen = generate(SyntheticPartsConfig.from_dict(trained.get("dataset", {}), train_per_class=60,
                                                      test_per_class=30))
        root = Path(tempfile.mkdtemp(prefix="phpn-measure-"))
        write_cub_layout(gen, root)
        by_class = {}
        for i in range(len(gen.labels)):
            by_class.setdefault(int(gen.labels[i]), ([], []))[0 if gen.is_train[i] else 1].append(gen.rel_path(i))
        classes = sorted(by_class)
        pairs = [(_features(split, root / "images", by_class[c][0], PREPROCESS),
                  _features(split, root / "images", by_class[c][1], PREPROCESS)) for c in classes]
    return [p[0] for p in pairs], [p[1] for p in pairs], split.weight.detach()[classes].float()


def _stack(feats: list) -> tuple:
    d, h, w = feats[0].shape[1:]
    counts = torch.tensor([f.shape[0] * h * w for f in feats])
    out = torch.zeros(len(feats), int(counts.max()), d)
    for i, f in enumerate(feats):
        out[i, :counts[i]] = f.permute(0, 2, 3, 1).reshape(-1, d)
    return out, counts


def _refine_stats(F, counts, heads, found, config) -> tuple:
    mask = (torch.arange(F.shape[1])[None] < counts[:, None]).float()
    usage = (found.encodings * mask[:, :, None]).sum(1) / counts[:, None]
    res = refine(F, found.prototypes, heads, config, counts, usage=usage)
    c = res.mean_contribution
    cancel = c.sum(1).abs() / c.abs().sum(1)
    wrong = int(((torch.sign(c) != torch.sign(res.part_share)) & (res.part_share.abs() > 1e-9)).sum())
    return res, {"cancellation_mean": float(cancel.mean()), "cancellation_min": float(cancel.min()),
                 "wrong_sign": wrong, "negative_contributions": int((c < 0).sum()),
                 "fidelity_median": float(res.fidelity.median()), "fidelity_min": float(res.fidelity.min())}


def measure(name: str, ks, out) -> None:
    disc, held, heads = load_model_features(name)
    F, counts = _stack(disc)
    mask = (torch.arange(F.shape[1])[None] < counts[:, None]).float()
    noise = torch.randn(F.shape, generator=torch.Generator().manual_seed(1))
    F2 = F * (1 + 1e-4 * noise)
    for k in ks:
        found = nmf(F.clamp(min=0), NMFConfig(k=k), counts)
        found2 = nmf(F2.clamp(min=0), NMFConfig(k=k), counts)
        nmf_stability = float(map_correlation(F @ found.prototypes.transpose(1, 2),
                                              F @ found2.prototypes.transpose(1, 2), mask).min())
        row = {"model": name, "k": k, "classes": len(disc), "nmf_map_stability": nmf_stability}
        for label, config in (("before", BEFORE), ("after", AFTER)):
            res, stats = _refine_stats(F, counts, heads, found, config)
            res2, _ = _refine_stats(F2, counts, heads, found2, config)
            stats["map_stability"] = float(map_correlation(F @ res.prototypes.float().transpose(1, 2),
                                                           F @ res2.prototypes.float().transpose(1, 2), mask).min())
            stats["prototype_change"] = float((res.prototypes - res2.prototypes).norm(dim=2).max()
                                              / heads.norm(dim=1).max())
            row[label] = stats
            if label == "after":
                per = [class_separation(h, res.prototypes[i].float(), heads[i]) for i, h in enumerate(held)]
                row["separation_heldout"] = summarise(per)
        print(json.dumps(row), flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


def signed(out) -> None:
    import numpy as np
    import timm
    from PIL import Image
    from skimage import data as sk

    images = [sk.chelsea(), sk.coffee(), sk.astronaut(), sk.rocket()]
    x = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(im).resize((224, 224))).copy()).permute(2, 0, 1)
                     .float() / 127.5 - 1 for im in images])
    torch.manual_seed(0)
    for name in ("convnext_atto", "vit_tiny_patch16_224"):
        model = timm.create_model(name, pretrained=False, num_classes=10).eval()
        with torch.no_grad():
            f = model.forward_features(x)
        F = (f.permute(0, 2, 3, 1).reshape(1, -1, f.shape[1]) if f.ndim == 4
             else f[:, model.num_prefix_tokens:].reshape(1, -1, f.shape[-1])).double()
        for k in (3, 5):
            clamped = nmf(F.clamp(min=0), NMFConfig(k=k))
            semi = nmf(F, NMFConfig(k=k, data="signed"))
            row = {"model": name, "k": k, "negative_fraction": float((F < 0).double().mean()),
                   "clamped_error": float(torch.linalg.vector_norm(F - clamped.encodings @ clamped.prototypes)
                                          / torch.linalg.vector_norm(F)),
                   "semi_error": float(semi.relative_error[0])}
            print(json.dumps(row), flush=True)
            if out:
                with open(out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fashion", "lite0", "parts"], choices=["fashion", "lite0", "parts"])
    p.add_argument("--ks", nargs="+", type=int, default=[3, 5])
    p.add_argument("--signed", action="store_true", help="only the semi-NMF comparison on timm ConvNeXt and ViT")
    p.add_argument("--out", help="append one JSON line per measurement to this file")
    args = p.parse_args(argv)
    if args.signed:
        signed(args.out)
        return 0
    for name in args.models:
        measure(name, args.ks, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
