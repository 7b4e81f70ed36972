"""The parts benchmark end to end on its small size, its statistics, the DFF peer row, and
evaluate_run on a saved run."""
import json
import math

import numpy as np
import pytest
import torch

from phpn.errors import ConfigError
from phpn.evaluate import benchmark as B
from phpn.evaluate import evaluate_run, run_parts_benchmark
from phpn.evaluate.parts_cnn import ASSET_DIR, METRICS_FILE, PREPROCESS, WEIGHTS_FILE, load_parts_benchmark

pytestmark = pytest.mark.slow  # every test here starts from a costly fixture (a jailed worker, trained models, runs)

weights = pytest.mark.skipif(not (ASSET_DIR / WEIGHTS_FILE).is_file(), reason="parts-benchmark weights not trained")
needs_dff = pytest.mark.skipif(not B.dff_available(), reason="pytorch-grad-cam (grad-cam) not installed")


# --- statistics ------------------------------------------------------------------------------

def test_spread_is_the_mean_and_sample_standard_deviation():
    s = B.spread([1.0, 2.0, 4.0, None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(7 / 3))  # sum of squares 42/9, over n - 1 = 2
    assert B.spread([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert B.spread([None]) == {"mean": None, "std": None, "n": 0}


def test_paired_difference_claims_only_what_the_t_interval_allows():
    t975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom
    d = B.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 4.0])  # differences 2, 3, 3
    assert d["differences"] == [2.0, 3.0, 3.0]
    assert d["mean"] == pytest.approx(8 / 3) and d["std"] == pytest.approx(math.sqrt(1 / 3))
    assert d["half_width"] == pytest.approx(t975_2 * math.sqrt(1 / 3) / math.sqrt(3))
    assert d["separates"] is True
    d = B.paired_difference([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])  # mean 0.67, half-width 3.79
    assert d["half_width"] == pytest.approx(t975_2 * math.sqrt(7 / 3) / math.sqrt(3))
    assert d["separates"] is False
    one = B.paired_difference([90.0], [80.0])
    assert one["mean"] == 10.0 and one["half_width"] is None and one["separates"] is None


# --- DFF, the peer row -----------------------------------------------------------------------

@needs_dff
def test_dff_prototypes_are_pytorch_grad_cams_concepts():
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import DeepFeatureFactorization

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(4, 3, 8, 8)
    concepts, _ = DeepFeatureFactorization(model=net, target_layer=net[1])(x, n_components=2)  # (D, k)
    with torch.no_grad():
        ours, unconverged = B.dff_prototypes([net(x)], 2)
    assert ours.shape == (1, 2, 6) and unconverged in (0, 1)
    assert torch.allclose(ours[0], torch.from_numpy(concepts.T).float(), atol=1e-6)


def test_stacked_maps_score_each_set_as_its_own_explainer():
    from phpn.evaluate.consistency import part_sets
    from phpn.evaluate.explainers import NetworkExplainer, PrototypeExplainer
    from phpn.method.network import PrototypeNetwork
    from phpn.models import HeadSplit

    torch.manual_seed(1)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=4, padding=1), torch.nn.ReLU()).eval()
    weight, bias = torch.randn(2, 5), torch.randn(2)
    split = HeadSplit(backbone=backbone, weight=weight, bias=bias, feature_layer="0", head_layer="fc")
    a = torch.randn(2, 3, 5)
    a = a - a.mean(1, keepdim=True) + weight[:, None, :] / 3  # sums to the head rows
    b = torch.rand(2, 3, 5)
    x = torch.randn(6, 3, 32, 32)
    stacked = B.StackedMaps(split, {"a": a, "b": b}, [0, 1])
    maps, _, logit = stacked(x, 1)
    assert maps.shape == (6, 2 * 2 * 3, 32, 32)
    # The refined row is mapped as the decomposed network maps its prototypes.
    net_maps, _, _ = NetworkExplainer(PrototypeNetwork(split, a, [0, 1]).eval())(x, 1)
    assert torch.allclose(maps[:, :3], B.upsample(net_maps, (32, 32), ("bicubic",)), atol=1e-5)
    for s, p in enumerate((a, b)):
        own, _, own_logit = PrototypeExplainer(split, p, [0, 1])(x, 1)
        bicubic = B.upsample(own, (32, 32), ("bicubic",))
        assert torch.allclose(maps[:, 3 * s:3 * s + 3], bicubic, atol=1e-6)
        assert torch.allclose(maps[:, 6 + 3 * s:6 + 3 * s + 3], B.upsample(own, (32, 32), ("bilinear",)), atol=1e-6)
        assert torch.allclose(logit, own_logit)
        # The metrics' own bicubic upsampling gives the same peaks as maps handed over upsampled.
        kp, vis = np.random.default_rng(0).uniform(0, 32, (6, 4, 2)), np.ones((6, 4), bool)
        assert (part_sets(own, kp, vis, 32, 4.0) == part_sets(bicubic, kp, vis, 32, 4.0)).all()
    with pytest.raises(ConfigError, match="Unknown upsampling 'nearest'"):
        B.StackedMaps(split, {"a": a}, [0, 1], modes=("nearest",))


def test_peak_distance_measures_each_set_against_its_own_best_part():
    from phpn.models import HeadSplit

    class OneClass:  # the two methods a part-annotated dataset offers peak_distances
        def by_class(self):
            return {0: [0, 1]}

        def load_batch(self, indices, preprocess):
            x = torch.zeros(2, 1, 64, 64)
            x[:, :, 16:24, 40:48] = 1.0  # one bright 8 px cell: feature row 2, column 5
            kp = np.array([[[3.0, 19.0], [43.0, 39.0]]] * 2)
            return x, kp, np.ones((2, 2), bool), [0, 1], []

    split = HeadSplit(backbone=torch.nn.AvgPool2d(8), weight=torch.ones(1, 1), bias=torch.zeros(1))
    stacked = B.StackedMaps(split, {"a": torch.ones(1, 1, 1), "b": torch.ones(1, 1, 1)}, [0])
    by_set = {(mode, name): {"prototypes": [{"class_index": 0, "prototype": 0, "best_part": part}]}
              for mode in B.UPSAMPLING for name, part in (("a", 0), ("b", 1))}
    d = B.peak_distances(stacked, OneClass(), None, by_set)
    # The peak is at the cell's centre, pixel 43 or 44 across and 19 or 20 down (a tie).
    for mode in B.UPSAMPLING:
        assert 40.0 <= d[(mode, "a")] <= math.hypot(41, 1)
        assert 19.0 <= d[(mode, "b")] <= math.hypot(1, 20)


# --- the benchmark ---------------------------------------------------------------------------

def test_benchmark_refuses_bad_options_before_any_work():
    with pytest.raises(ConfigError, match="draws must be at least 1, got 0"):
        run_parts_benchmark("small", draws=0)
    with pytest.raises(ConfigError, match="Unknown solver"):
        run_parts_benchmark("small", solvers=("adam",))
    with pytest.raises(ConfigError, match="Unknown benchmark size 'huge'"):
        run_parts_benchmark("huge")
    assert B.main(["--draws", "0"]) == 2


@weights
def test_shipped_weights_are_small_and_accurate():
    assert (ASSET_DIR / WEIGHTS_FILE).stat().st_size <= 5 * 2 ** 20
    metrics = json.loads((ASSET_DIR / METRICS_FILE).read_text())
    assert metrics["test_accuracy"] >= 0.95


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if not (ASSET_DIR / WEIGHTS_FILE).is_file():
        pytest.skip("parts-benchmark weights not trained")
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("bench")
    return run_parts_benchmark("small", out_dir=out, draws=2), out


@pytest.mark.slow
def test_benchmark_small_end_to_end(small):
    result, out = small
    assert (out / "benchmark.json").is_file() and (out / "benchmark.md").is_file()
    assert json.loads((out / "benchmark.json").read_text())["table"] == result["table"]
    keys = [r["key"] for r in result["table"]]
    assert keys == ["refined-lbfgs", "nmf"] + (["dff"] if B.dff_available() else []) + ["random", "equal"]
    assert result["accuracy"] >= 90.0 and result["draws"] == 2
    for row in result["table"]:
        for key in ("consistency", "consistency_bilinear", "stability_unclipped", "stability_clipped"):
            assert all(0.0 <= v <= 100.0 for v in row[key]["draws"])
    by = {r["key"]: r for r in result["table"]}
    refined, random = by["refined-lbfgs"], by["random"]
    # Each class's prototypes find its true parts, and lock onto them far more often than
    # random directions that also sum to the head row.
    assert refined["parts_found"]["mean"] >= 90.0
    assert refined["consistency"]["mean"] >= 60.0
    assert refined["consistency"]["mean"] >= random["consistency"]["mean"] + 20.0
    assert result["nmf_same_across_solvers"]
    assert " ± " in result["markdown"] and "| separates |" in result["markdown"]


@pytest.mark.slow
def test_every_draw_is_kept_and_the_rows_are_their_mean_and_spread(small):
    result, _ = small
    details = result["details"]
    assert [d["draw"] for d in details] == [0, 1] and [d["seed"] for d in details] == [0, 1]
    assert all(d["discovery_images"] == 8 * 24 and d["test_images"] == 8 * 16 for d in details)
    for row in result["table"]:
        for score in ("consistency", "best_part_hit", "consistency_bilinear"):
            per_draw = [d["rows"][row["key"]]["scores"][score] for d in details]
            assert row[score]["draws"] == per_draw
            assert row[score]["mean"] == pytest.approx(np.mean(per_draw))
            assert row[score]["std"] == pytest.approx(np.std(per_draw, ddof=1))
        for d in details:
            res = d["rows"][row["key"]]["interpretability"]
            assert len(res["prototypes"]) == 8 * 3 and {p["prototype"] for p in res["prototypes"]} == {0, 1, 2}
            flags = [p["consistent"] for p in res["prototypes"]]
            assert res["consistency"] == pytest.approx(100.0 * sum(flags) / len(flags))
        # Peaks are in pixels of the 64 px input; the box around them is ±10.3 px.
        assert 0.0 <= row["peak_distance"]["mean"] <= 64 * math.sqrt(2)
        assert row["peak_distance_bilinear"]["n"] == 2
    # The refined row differs between draws: the spread holds the prototypes' own variation.
    assert result["table"][0]["map_fidelity"]["n"] == 2
    c = next(c for c in result["comparisons"] if c["score"] == "consistency" and c["b"].startswith("baseline: 3 r"))
    assert c["differences"] == pytest.approx([a - b for a, b in zip(result["table"][0]["consistency"]["draws"],
                                                                     by_key(result, "random")["consistency"]["draws"])])


def by_key(result, key):
    return next(r for r in result["table"] if r["key"] == key)


@pytest.mark.slow
@needs_dff
def test_dff_row_is_scored_like_the_others(small):
    result, _ = small
    dff = by_key(result, "dff")
    assert dff["name"] == "DFF (pytorch-grad-cam, n_components=3)"
    assert len(dff["consistency"]["draws"]) == 2 and dff["parts_found"]["mean"] > 0
    assert any(c["b"].startswith("DFF") for c in result["comparisons"])


@pytest.mark.slow
@weights
def test_without_grad_cam_the_dff_row_is_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(B, "dff_available", lambda: False)
    result = run_parts_benchmark("small", solvers=("none",), draws=1)
    assert [r["key"] for r in result["table"]] == ["refined-none", "nmf", "random", "equal"]
    assert result["dff"] is False and result["notes"] == [B.DFF_MISSING]
    assert B.DFF_MISSING in result["markdown"] and "no difference is claimed" in result["markdown"]
    assert all(c["separates"] is None for c in result["comparisons"])


def test_the_result_is_written_atomically_and_never_over_a_foreign_file(small, tmp_path):
    result, _ = small
    path, table = B.write_result(result, tmp_path / "parts.json")
    assert json.loads(path.read_text())["kind"] == "phpn-parts-benchmark" and B.TABLE_MARK in table.read_text()
    B.write_result(result, path)  # a rerun replaces its own result
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match="notes.json exists and is not a parts-benchmark result"):
        B.write_result(result, foreign)
    assert foreign.read_text() == '{"mine": 1}' and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_evaluate_run_on_the_benchmark_data(small, tmp_path):
    from phpn.evaluate.parts import load_cub_parts
    from phpn.pipeline.discover import DiscoveryConfig, discover

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
    from phpn.evaluate import summary_text
    from phpn.evaluate.parts import load_cub_parts
    from phpn.pipeline.discover import DiscoveryConfig, discover

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
