"""Part metrics per class: fidelity, specificity, cancellation, overlap against random directions."""

import pytest
import torch
from conftest import tiny_split

from phpn.images.folders import scan_image_folder
from phpn.method import part_metrics as PM
from phpn.pipeline.discover import DiscoveryConfig, discover


def _one_hot_features(n=4, d=3, h=4, w=4):
    """Each channel fires alone at its own cells: the map of e_i is channel i's indicator."""
    feats = torch.zeros(n, d, h, w, dtype=torch.float64)
    for cell in range(h * w):
        feats[:, cell % d, cell // w, cell % w] = 1.0 + cell
    return feats


def test_specificity_is_own_fidelity_minus_best_other():
    corr = torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.8, 0.85], [0.3, 0.3, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(PM.specificity(corr), torch.tensor([0.4, -0.05, 0.4], dtype=torch.float64))
    assert PM.specificity(torch.ones(1, 1)) is None


def test_fidelity_and_specificity_of_the_parts_themselves():
    feats = _one_hot_features()
    parts = torch.eye(3, dtype=torch.float64)
    fid, spec = PM.fidelity_and_specificity(feats, parts, parts)
    torch.testing.assert_close(torch.tensor(fid, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    corr = PM.correlation_matrix(PM.maps_of(feats, parts), PM.maps_of(feats, parts))
    expected = 1 - corr.masked_fill(torch.eye(3, dtype=torch.bool), -2).max(1).values
    torch.testing.assert_close(torch.tensor(spec, dtype=torch.float64), expected)
    assert all(s > 1 for s in spec)  # disjoint indicators correlate negatively with each other
    # A negative share compares the prototype with its part negated.
    fid, _ = PM.fidelity_and_specificity(feats, -parts, parts, signs=[-1, -1, -1])
    assert min(fid) > 1 - 1e-12


def test_cancellation():
    assert PM.cancellation(torch.tensor([3.0, -2.0, 1.0])) == pytest.approx(2 / 6)
    assert PM.cancellation(torch.tensor([1.0, 2.0, 0.5])) == pytest.approx(1.0)


def test_overlap_iou_identical_and_disjoint_maps():
    same = torch.rand(3, 1, 5, 5).repeat(1, 2, 1, 1)
    assert PM._pair_mean(PM.overlap_iou(same))[0] == pytest.approx(1.0)
    left = torch.zeros(2, 1, 5, 5)
    left[:, :, :, :2] = 1 + torch.arange(10.0).reshape(1, 1, 5, 2)
    disjoint = torch.cat([left, left.flip(-1)], dim=1)  # top 5 cells: left columns vs right columns
    assert PM._pair_mean(PM.overlap_iou(disjoint))[0] == pytest.approx(0.0)


def test_random_overlap_spread_over_draws():
    feats = torch.rand(6, 8, 5, 5)
    head = torch.randn(8)
    out = PM.random_overlap(feats, head, 3, torch.ones(6), seeds=(0, 1, 2))
    assert out["draws"] == 3 and 0 <= out["mean"] <= 1 and out["std"] >= 0
    again = PM.random_overlap(feats, head, 3, torch.ones(6), seeds=(0, 1, 2))
    assert out == again


def test_warnings_name_the_problem():
    metrics = {"specificity": [0.3, -0.1, 0.0], "cancellation": 0.4, "overlap_iou": 0.5,
               "overlap_iou_random": {"mean": 0.4, "std": 0.02, "draws": 5}, "alpha_flags": ["zero", None, "negative"]}
    warnings = PM.warnings_for(metrics)
    assert warnings == [
        "Prototypes 2, 3 are not specific on the discovery images: their maps look as much like another part of "
        "the class as like its own.",
        "Contributions cancel: they sum to 40% of their total size, so large positive and negative prototypes "
        "offset each other.",
        "Parts collapse: the prototypes' top regions overlap (IoU 0.50) as much as those of random directions "
        "summing to the head row (IoU 0.40).",
        "Prototype 1 holds no NMF part (α = 0): it is only a share of the residual.",
        "Prototype 3 holds its NMF part with a negative weight (α < 0).",
    ]
    assert PM.alpha_flags([0.0, 1.0, -0.5]) == ["zero", None, "negative"]


def test_every_field_has_a_meaning():
    assert set(PM.FIELDS) >= {"fidelity", "fidelity_heldout", "specificity", "cancellation", "overlap_iou",
                              "overlap_iou_random", "alpha_flags", "warnings", "part_share"}
    assert PM.FIELDS["cancellation"].startswith("|sum of mean contributions|")


@pytest.mark.slow
def test_discovery_records_part_metrics_and_held_out_fidelity(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=3, device="cpu", holdout=0.25))
    assert run.meta["config"]["holdout"] == 0.25 and run.meta["refine"]["contributions"] == "part"
    for entry, full in zip(run.meta["classes"], data.classes):
        held = round(0.25 * len(full.paths))
        assert entry["images"] == len(full.paths) - held and entry["heldout_images"] == held
        assert entry["heldout_paths"] == full.paths[-held:]
        assert not set(entry["heldout_paths"]) & set(entry["paths"])
        assert len(entry["fidelity_heldout"]) == 3 and len(entry["specificity_heldout"]) == 3
        # Contributions are held at the parts' shares, so a class cannot cancel more than its shares do.
        torch.testing.assert_close(torch.tensor(entry["mean_contribution"]), torch.tensor(entry["part_share"]),
                                   rtol=1e-4, atol=1e-5)
        shares = torch.tensor(entry["part_share"])
        assert entry["cancellation"] == pytest.approx(float(shares.sum().abs() / shares.abs().sum()), abs=1e-4)
        assert entry["overlap_iou_random"]["draws"] == len(PM.RANDOM_SEEDS)
        assert isinstance(entry["warnings"], list)


def test_holdout_out_of_range_message():
    from phpn.errors import ConfigError

    with pytest.raises(ConfigError, match="The held-out fraction must be at least 0 and below 1, got 1.0"):
        DiscoveryConfig(holdout=1.0)


def test_top_patches_skip_weak_peaks_and_near_identical_crops():
    from phpn.pipeline.discover import top_patches

    maps = torch.zeros(5, 1, 2, 2)
    maps[:, 0, 0, 0] = torch.tensor([10.0, 9.0, 8.0, 0.5, -1.0])  # images 3, 4 barely fire or subtract
    feats = torch.zeros(5, 3, 2, 2)
    feats[:, :, 0, 0] = torch.tensor([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    patches = top_patches(maps, [f"im{j}.png" for j in range(5)], 4, 32, features=feats)[0]
    # Image 1 repeats image 0's patch (cosine 0.99995); images 3 and 4 peak below 10% of the best.
    assert [p["path"] for p in patches] == ["im0.png", "im2.png"]
    plain = top_patches(maps, [f"im{j}.png" for j in range(5)], 4, 32, min_strength=0.0)[0]
    assert [p["path"] for p in plain] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    # A prototype whose part counts against the class is shown where it subtracts most.
    negative = top_patches(maps, [f"im{j}.png" for j in range(5)], 4, 32, signs=[-1.0])[0]
    assert [(p["path"], p["score"]) for p in negative] == [("im4.png", -1.0)]


@pytest.mark.slow
def test_discovery_records_a_suggested_k_with_its_reason(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=3, device="cpu", suggest_k=5))
    for entry in run.meta["classes"]:
        assert 2 <= entry["k_suggested"] <= 5 and set(entry["k_relative_errors"]) == {"2", "3", "4", "5"}
        assert entry["k_reason"].startswith("relative error ")
        assert f"k = {entry['k_suggested']}" in entry["k_reason"]


@pytest.mark.parametrize("nmf_data", ["clamped", "signed"])
def test_signed_features_by_nmf_on_the_clamped_or_semi_nmf_on_the_signed(tiny_loaded, image_folder, nmf_data):
    from phpn.head import HeadSplit

    model = tiny_loaded.model
    split = HeadSplit(backbone=model.features[:-1], weight=model.fc.weight.detach(), bias=model.fc.bias.detach(),
                      feature_layer="features.2", head_layer="fc", signed_features=True)
    data = scan_image_folder(image_folder, class_names=tiny_loaded.class_names, num_classes=4)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess,
                   DiscoveryConfig(k=3, device="cpu", nmf_data=nmf_data))
    assert float(run.head_error().max()) < 1e-12
    assert run.meta["nmf"]["data"] == nmf_data
    assert run.meta["model"]["nmf_input"].startswith(
        "the features can be negative, and semi-NMF" if nmf_data == "signed" else "the features can be negative, so")
    assert (float(run.nmf_prototypes.min()) < 0) == (nmf_data == "signed")
