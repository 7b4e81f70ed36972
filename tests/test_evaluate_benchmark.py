"""The parts benchmark end to end on its small size, and evaluate_run on a saved run."""
import json
import math

import pytest
import torch

from phpn.evaluate import evaluate_run, run_parts_benchmark
from phpn.evaluate.parts_cnn import ASSET_DIR, METRICS_FILE, PREPROCESS, WEIGHTS_FILE, load_parts_benchmark

pytestmark = pytest.mark.skipif(not (ASSET_DIR / WEIGHTS_FILE).is_file(),
                                reason="parts-benchmark weights not trained")


def test_shipped_weights_are_small_and_accurate():
    assert (ASSET_DIR / WEIGHTS_FILE).stat().st_size <= 5 * 2 ** 20
    metrics = json.loads((ASSET_DIR / METRICS_FILE).read_text())
    assert metrics["test_accuracy"] >= 0.95


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("bench")
    return run_parts_benchmark("small", out_dir=out), out


def test_benchmark_small_end_to_end(small):
    result, out = small
    assert (out / "benchmark.json").is_file() and (out / "table.md").is_file()
    json.dumps(result)  # serialisable
    names = [r["name"] for r in result["table"]]
    assert names[0].startswith("NMF") and any("lbfgs" in n for n in names) and any("random" in n for n in names)
    assert result["accuracy"] >= 90.0
    for row in result["table"]:
        for key in ("consistency", "stability_unclipped", "stability_clipped"):
            assert 0.0 <= row[key] <= 100.0
    by = {r["name"]: r for r in result["table"]}
    refined = by["refined, solver=lbfgs"]
    random = next(r for n, r in by.items() if "random" in n)
    # Each class's prototypes find its true parts, and lock onto them far more often than
    # random directions that also sum to the head row (measured: 87.5 vs 45.8).
    assert refined["parts_found"] >= 90.0
    assert refined["consistency"] >= 70.0
    assert refined["consistency"] >= random["consistency"] + 20.0
    assert result["nmf_same_across_solvers"]


def test_evaluate_run_on_the_benchmark_data(small, tmp_path):
    from phpn.discover import DiscoveryConfig, discover
    from phpn.evaluate.parts import load_cub_parts

    _, out = small
    loaded, split = load_parts_benchmark()
    train = load_cub_parts(out / "data").select("train", classes=[0, 5])
    run = discover(loaded, split, train.to_image_folder(), PREPROCESS,
                   DiscoveryConfig(k=3, images_per_class=12, device="cpu"))
    res = evaluate_run(run, split, PREPROCESS, out / "data", baselines=("nmf",), device="cpu",
                       deletion_images_per_class=2, fractions=(0.0, 0.1, 0.3))
    json.dumps(res)
    assert res["exactness"]["passed"], res["exactness"]
    assert res["exactness"]["top1_agreement"] == 100.0
    assert res["exactness"]["linearity_max_error"] < 1e-3
    assert set(res["interpretability"]) == {"refined", "nmf"}
    protos = res["interpretability"]["refined"]["prototypes"]
    assert len(protos) == 6 and {p["class_index"] for p in protos} == {0, 5}
    assert not math.isnan(res["summary"]["consistency"])
    assert len(res["deletion"]["prototypes"]) == 6
    assert res["deletion"]["prototypes"][0]["fractions"] == [0.0, 0.1, 0.3]
    # Annotation-free separation, with both baselines computed in the same run.
    sep = res["separation"]
    assert {c["class_index"] for c in sep["classes"]} == {0, 5}
    for name in ("peak_purity", "overlap_iou"):
        row = sep["summary"][name]
        assert row["equal"] == pytest.approx(0.0 if name == "peak_purity" else 1.0, abs=1e-9)
        assert row["random_std"] >= 0 and res["summary"][f"{name}_separates"] == row["separates"]


def test_evaluate_run_on_an_image_folder_with_separate_parts(small):
    from phpn.discover import DiscoveryConfig, discover
    from phpn.evaluate import summary_text
    from phpn.evaluate.parts import load_cub_parts
    from phpn.errors import ConfigError

    _, out = small
    loaded, split = load_parts_benchmark()
    train = load_cub_parts(out / "data").select("train", classes=[3])
    run = discover(loaded, split, train.to_image_folder(), PREPROCESS,
                   DiscoveryConfig(k=2, images_per_class=8, device="cpu", solver="none"))
    # An image folder only: exactness, axioms and deletion, no part scores.
    res = evaluate_run(run, split, PREPROCESS, out / "data" / "images", device="cpu", images_per_class=4,
                       deletion_images_per_class=2, fractions=(0.0, 0.2))
    assert res["exactness"]["passed"] and res["interpretability"] == {}
    assert "consistency" not in res["summary"]
    # The same folder plus a separate part-annotated root.
    res = evaluate_run(run, split, PREPROCESS, out / "data" / "images", parts_root=out / "data", device="cpu",
                       images_per_class=4, deletion=False, clip=None)
    assert set(res["interpretability"]["refined"]["stability"]) == {"unclipped"}
    assert res["deletion"] is None
    assert "consistency" in summary_text(res)
    assert "peak purity: phpn" in summary_text(res)
    with pytest.raises(ConfigError):
        evaluate_run(run, split, PREPROCESS, out / "data", no_such_option=1)


def test_benchmark_scores_disjoint_test_draws_with_their_spread():
    result = run_parts_benchmark("small", solvers=("none",), deletion=False, draws=2)
    assert result["test_draws"] == 2
    for row in result["table"]:
        assert len(row["consistency_draws"]) == 2
        assert row["consistency"] == pytest.approx(sum(row["consistency_draws"]) / 2)
        assert row["consistency_std"] is not None
    assert " ± " in result["markdown"]
