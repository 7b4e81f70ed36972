"""The parts benchmark: prototypes of a CNN trained on images whose classes are made of
known parts, scored for consistency and stability against the ground-truth keypoints.

Compared: the NMF parts before refinement, the refined prototypes with each solver, and two
baselines that also sum exactly to the head row (k random directions; k copies of v/k).

Columns: consistency and stability (Huang et al., as percentages); "class parts found":
the share of each class's true parts that is the best part of one of its prototypes;
"mean best-part hit": the mean over prototypes of how often their best part is in their
box (consistency without the 80% threshold); the median map fidelity of discovery (the
correlation of final and NMF maps); the deletion gap (see :mod:`.faithfulness`).

    from phpn.evaluate import run_parts_benchmark
    result = run_parts_benchmark("small")          # a minute on a laptop CPU
    print(result["markdown"])
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import ProgressFn, report
from .evaluation import _jsonable, deletion_of, _Images
from .explainers import NetworkExplainer, PrototypeExplainer, equal_split_prototypes, random_prototypes
from .interpretability import interpretability_of
from .parts import load_cub_parts
from .parts_cnn import ASSET_DIR, METRICS_FILE, PREPROCESS, load_parts_benchmark
from .synthetic_parts import SyntheticPartsConfig, generate, write_cub_layout

SIZES = {
    # discovery images per class (from the CNN's training images), test images per class,
    # images per class for the deletion curves, and solver budgets ("small" runs in CI;
    # "full" uses the discovery defaults)
    "small": {"discovery_per_class": 24, "test_per_class": 16, "deletion_per_class": 4,
              "fractions": (0.0, 0.1, 0.3), "discovery": {"lbfgs_iter": 30, "nelder_mead_evaluations": 300}},
    "full": {"discovery_per_class": 100, "test_per_class": 50, "deletion_per_class": 10,
             "fractions": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5), "discovery": {}},
}
SOLVERS = ("lbfgs", "nelder-mead", "none")


@torch.no_grad()
def _accuracy(split, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = split.logits_from_features(split.backbone(x))
    return float((logits.argmax(1) == y).float().mean() * 100.0)


def _fidelity(run) -> Optional[float]:
    vals = [f for c in run.meta.get("classes", []) for f in c.get("fidelity", [])]
    return float(np.median(vals)) if vals else None


def _parts_found(res: dict, class_parts) -> tuple:
    """Against the ground truth: (mean over classes of the share of the class's parts that
    are some prototype's best part, mean best-part fraction over prototypes)."""
    best: dict = {}
    for p in res["prototypes"]:
        best.setdefault(p["class_index"], set()).add(p["best_part"])
    found = [len(best[c] & set(class_parts[c])) / len(class_parts[c]) for c in best]
    return (float(np.mean(found) * 100.0) if found else None,
            float(np.mean([p["best_part_fraction"] for p in res["prototypes"]]) * 100.0) if res["prototypes"] else None)


SCORES = ("consistency", "stability_unclipped", "stability_clipped", "parts_found", "best_part_hit")


def _markdown(rows: list) -> str:
    head = ("| prototypes | consistency % | stability % (σ=0.2) | stability % (clipped ±0.25) "
            "| class parts found % | mean best-part hit % | median map fidelity | deletion gap |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")

    def fmt(v, p=1):
        return "–" if v is None else f"{v:.{p}f}"

    def score(r, key):
        # With several test draws: mean ± standard deviation over the draws.
        spread = r.get(f"{key}_std")
        return fmt(r[key]) + ("" if spread is None else f" ± {spread:.1f}")

    return head + "".join(
        f"| {r['name']} | {score(r, 'consistency')} | {score(r, 'stability_unclipped')} | "
        f"{score(r, 'stability_clipped')} | {score(r, 'parts_found')} | {score(r, 'best_part_hit')} | "
        f"{fmt(r.get('map_fidelity'), 2)} | {fmt(r.get('deletion_gap'), 2)} |\n"
        for r in rows)


def disjoint_draws(test, draws: int, per_class: int) -> list:
    """``draws`` disjoint test sets: the d-th takes each class's test images d·n .. (d+1)·n − 1."""
    out = []
    for d in range(draws):
        chosen = []
        for c, idx in sorted(test.by_class().items()):
            chosen += [test.images[i] for i in idx[d * per_class:(d + 1) * per_class]]
        out.append(replace(test, images=chosen))
    return out


def run_parts_benchmark(size: str = "small", out_dir=None, *, k: int = 3, seed: int = 0, draws: int = 1,
                        solvers: Sequence[str] = SOLVERS, deletion: bool = True, asset_dir=None,
                        progress: Optional[ProgressFn] = None, **eval_params) -> dict:
    """Discover prototypes on the benchmark CNN with every solver and score them.

    Returns a JSON-serialisable dict: ``table`` (one row per prototype set), ``markdown``,
    ``accuracy``, per-set ``details`` and the settings. With ``out_dir`` it also writes
    ``benchmark.json`` and ``table.md`` there (and keeps the generated images under
    ``out_dir/data``).
    """
    from ..discover import DiscoveryConfig, discover

    if size not in SIZES:
        raise ConfigError(f"Unknown benchmark size '{size}'.", f"Choose one of: {', '.join(SIZES)}.")
    t_start = time.time()
    sz = SIZES[size]
    asset_dir = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    trained = json.loads((asset_dir / METRICS_FILE).read_text()) if (asset_dir / METRICS_FILE).is_file() else {}
    loaded, split = load_parts_benchmark(asset_dir)
    # The dataset the CNN was trained on (same seed and drawing settings), fewer images.
    if draws < 1:
        raise ConfigError(f"draws must be at least 1, got {draws}.", "")
    data_cfg = SyntheticPartsConfig.from_dict(trained.get("dataset", {}), train_per_class=sz["discovery_per_class"],
                                              test_per_class=sz["test_per_class"] * draws)
    report(progress, "benchmark data", 0, 1)
    data = generate(data_cfg)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="phpn-parts-")
        root = Path(tmp.name)
    else:
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        write_cub_layout(data, root / "data")
        report(progress, "benchmark data", 1, 1)
        dataset = load_cub_parts(root / "data")
        train, test = dataset.select("train"), dataset.select("test")
        classes = test.class_indices

        x_test, _, _, kept, _ = test.load_batch(range(len(test)), PREPROCESS)
        y_test = torch.tensor([test.images[i].class_index for i in kept])
        accuracy = _accuracy(split, x_test, y_test)

        common = dict(half_size=eval_params.get("half_size", 36.0),
                      reference_size=eval_params.get("reference_size", 224),
                      threshold=eval_params.get("threshold", 0.8), sigma=eval_params.get("sigma", 0.2),
                      clip=eval_params.get("clip", 0.25), seed=seed, device="cpu", progress=progress)
        unknown = set(eval_params) - {"half_size", "reference_size", "threshold", "sigma", "clip"}
        if unknown:
            raise ConfigError(f"Unknown benchmark option(s): {', '.join(sorted(unknown))}.", "")
        images = _Images(test, root / "data", None, PREPROCESS)

        runs = {}
        for solver in solvers:
            cfg = DiscoveryConfig(k=k, images_per_class=sz["discovery_per_class"], solver=solver, seed=seed,
                                  device="cpu", **sz["discovery"])
            t0 = time.time()
            runs[solver] = (discover(loaded, split, train.to_image_folder(), PREPROCESS, cfg), time.time() - t0)

        first = runs[solvers[0]][0]
        sets = [("NMF parts (before refinement)", PrototypeExplainer(split, first.nmf_prototypes, classes), None)]
        for solver in solvers:
            run, _ = runs[solver]
            sets.append((f"refined, solver={solver}", NetworkExplainer(run.network(split).eval()), run))
        sets.append((f"baseline: {k} random directions summing to v",
                     PrototypeExplainer(split, random_prototypes(split.weight, classes, k, seed), classes), None))
        sets.append((f"baseline: {k} x v/{k} (class activation map)",
                     PrototypeExplainer(split, equal_split_prototypes(split.weight, classes, k), classes), None))

        rows, details = [], {}
        subsets = disjoint_draws(test, draws, sz["test_per_class"]) if draws > 1 else [test]
        for name, explainer, run in sets:
            per_draw = []
            for subset in subsets:
                res = interpretability_of(explainer, subset, PREPROCESS, classes, **common,
                                          class_names=dataset.class_names)
                one = {"consistency": res["consistency"], "stability_unclipped": res["stability"].get("unclipped"),
                       "stability_clipped": res["stability"].get("clipped")}
                one["parts_found"], one["best_part_hit"] = _parts_found(res, data.class_parts)
                per_draw.append(one)
            row = {"name": name}
            for key in SCORES:
                values = [d[key] for d in per_draw if d[key] is not None]
                row[key] = float(np.mean(values)) if values else None
                if draws > 1:
                    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
                    row[f"{key}_draws"] = [d[key] for d in per_draw]
            entry = {"interpretability": res}
            if run is not None:
                row["map_fidelity"] = _fidelity(run)
                row["discovery_seconds"] = round(runs[run.meta["config"]["solver"]][1], 2)
                row["negative_alpha"] = int(sum(c["negative_alpha"] for c in run.meta["classes"]))
            if deletion:
                dl = deletion_of(explainer, images, classes, per_class=sz["deletion_per_class"],
                                 fractions=sz["fractions"], fill=0.0, seed=seed, device="cpu")
                row["deletion_gap"] = dl["summary"]["mean_own_gap"]
                entry["deletion"] = dl
            rows.append(row)
            details[name] = entry

        # Does NMF depend on the solver? (It should not: same seed, same features.)
        same_nmf = all(torch.allclose(runs[s][0].nmf_prototypes, first.nmf_prototypes, atol=1e-5) for s in solvers)
        result = {
            "kind": "phpn-parts-benchmark",
            "size": size,
            "k": k,
            "seed": seed,
            "accuracy": accuracy,
            "trained_test_accuracy": trained.get("test_accuracy"),
            "test_images": int(len(kept)),
            "test_draws": draws,
            "discovery_images_per_class": sz["discovery_per_class"],
            "discovery_budget": sz["discovery"],
            "dataset": data_cfg.to_dict(),
            "part_names": dataset.part_names,
            "class_names": list(dataset.class_names.values()),
            "nmf_same_across_solvers": bool(same_nmf),
            "params": {k_: v for k_, v in common.items() if k_ != "progress"},
            "table": rows,
            "markdown": _markdown(rows),
            "details": details,
            "seconds": round(time.time() - t_start, 1),
        }
        result = _jsonable(result)
        if out_dir is not None:
            (root / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
            (root / "table.md").write_text(result["markdown"])
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()
