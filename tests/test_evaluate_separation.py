"""Peak purity and top-region overlap against random directions and the equal split."""

import pytest
import torch

from phpn.evaluate.separation import class_separation, peak_purity, separates, summarise


def _parts_features(n=6, d=4, h=4, w=4, seed=0):
    """Channel c fires alone at its own cells, at a random strength per image."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.zeros(n, d, h, w, dtype=torch.float64)
    for cell in range(h * w):
        feats[:, cell % d, cell // w, cell % w] = 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    return feats


def test_peak_purity_of_pure_parts_and_of_one_map():
    feats = _parts_features()
    parts = torch.eye(4, dtype=torch.float64)[:3]
    maps = torch.einsum("ndhw,kd->nkhw", feats, parts)
    # Each prototype peaks on its own channel on every image: same-prototype cosine 1, cross 0.
    assert peak_purity(feats, maps) == pytest.approx(1.0)
    one = torch.einsum("ndhw,kd->nkhw", feats, torch.ones(3, 4, dtype=torch.float64))
    assert peak_purity(feats, one) == pytest.approx(0.0, abs=1e-12)


def test_class_separation_has_both_baselines_and_equal_split_is_zero_and_one():
    feats = _parts_features()
    head = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    parts = torch.eye(4, dtype=torch.float64)[:3]
    out = class_separation(feats, parts, head, seeds=(0, 1, 2))
    assert out["phpn"]["peak_purity"] == pytest.approx(1.0) and out["phpn"]["overlap_iou"] < 0.5
    assert out["equal"]["peak_purity"] == pytest.approx(0.0, abs=1e-12)
    assert out["equal"]["overlap_iou"] == pytest.approx(1.0)
    assert len(out["random"]["peak_purity"]) == 3
    summary = summarise([out])
    assert summary["peak_purity"]["separates"] is (1.0 - summary["peak_purity"]["random_mean"]
                                                  > summary["peak_purity"]["random_std"])


def test_separates_needs_both_baselines_beaten_by_the_spread():
    assert separates(0.8, 0.4, 0.1, 0.0, True)
    assert not separates(0.45, 0.4, 0.1, 0.0, True)  # within the random draws' spread
    assert not separates(0.8, 0.4, 0.1, 0.75, True)  # the equal split is as good
    assert separates(0.1, 0.3, 0.05, 1.0, False)  # lower is better
