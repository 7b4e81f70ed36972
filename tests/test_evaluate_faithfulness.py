"""Faithfulness checks, explainers and the consistency glue on a hand-built tiny model."""
import numpy as np
import pytest
import torch
from torch import nn

from phpn.evaluate import faithfulness as FA
from phpn.evaluate.explainers import PrototypeExplainer
from phpn.evaluate.interpretability import class_part_sets
from phpn.method.baselines import equal_split_prototypes, random_prototypes
from phpn.models import HeadSplit


def tiny_split():
    """Backbone: 8x8 average pooling then ReLU, so the feature at a cell is the cell's mean
    colour (3 channels, 8x8 grid for a 64 px image). Head: 2 classes."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.AvgPool2d(8), nn.ReLU())
    weight = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 1.5]])
    bias = torch.tensor([0.1, -0.2])
    return HeadSplit(backbone=backbone, weight=weight, bias=bias)


def blob_images(n=4, seed=0):
    """Red 16x16 square at a random place, green elsewhere in a 16x16 square, dark background."""
    g = np.random.default_rng(seed)
    x = torch.full((n, 3, 64, 64), 0.05)
    red, green = [], []
    for i in range(n):
        rx, ry = g.integers(0, 2, size=2) * 16
        gx, gy = 32 + g.integers(0, 2, size=2) * 16
        x[i, 0, ry:ry + 16, rx:rx + 16] = 1.0
        x[i, 1, gy:gy + 16, gx:gx + 16] = 1.0
        red.append((rx + 8, ry + 8))
        green.append((gx + 8, gy + 8))
    return x, np.array(red, float), np.array(green, float)


def test_prototype_explainer_completeness_with_prototypes_summing_to_the_row():
    split = tiny_split()
    protos = random_prototypes(split.weight, [0, 1], k=3, seed=1)
    assert torch.allclose(protos.sum(1), split.weight, atol=1e-5)
    ex = PrototypeExplainer(split, protos, [0, 1])
    x, _, _ = blob_images()
    for c in (0, 1):
        maps, contrib, logit = ex(x, c)
        assert maps.shape == (4, 3, 8, 8)
        assert FA.map_means(maps, contrib) < 1e-6
        logits = torch.zeros(4, 2)
        logits[:, c] = logit
        assert FA.completeness(contrib[:, None, :], logits, split.bias, [c]) < 1e-5
    eq = equal_split_prototypes(split.weight, [0, 1], 3)
    assert torch.allclose(eq.sum(1), split.weight)


def test_linearity_of_maps_in_the_prototypes():
    split = tiny_split()
    a, b = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([-0.3, 2.0, 0.0])
    ex = PrototypeExplainer(split, torch.stack([a, b, a + b])[None], [0])
    maps, _, _ = ex(blob_images()[0], 0)
    assert FA.linearity(maps[:, 0], maps[:, 1], maps[:, 2]) < 1e-6


def test_top_and_random_regions_cover_the_fraction():
    up = torch.arange(100.0).reshape(1, 10, 10)
    m = FA.top_region(up, 0.1)
    assert m.sum() == 10 and m[0, 9].all()  # the last row holds the 10 largest values
    r = FA.random_region(3, 10, 0.2, torch.Generator().manual_seed(0))
    assert r.shape == (3, 10, 10) and (r.sum(dim=(1, 2)) == 20).all()
    assert FA.top_region(up, 0.0).sum() == 0


def test_deletion_own_region_drops_more_than_random():
    split = tiny_split()
    # Prototype 0 reads red, prototype 1 green: each fires on its own square only.
    protos = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ex = PrototypeExplainer(split, protos, [0])
    x, _, _ = blob_images(6)
    res = FA.deletion_curves_of(ex, x, 0, fractions=(0.0, 0.0625, 0.25), generator=torch.Generator().manual_seed(0))
    p0, p1 = res["prototypes"]
    # The contribution is the mean red value. Masking the top quarter of the upsampled map
    # removes the whole 16x16 square and leaves 3/4 of the 0.05 background; the top 1/16
    # is about the square (bicubic upsampling blurs its edges a little).
    assert p0["own_drop_top"][2] == pytest.approx(p0["contribution"] - 0.75 * 0.05, abs=1e-5)
    assert p0["own_drop_top"][1] > 0.9 * (p0["contribution"] - 0.05)
    assert p0["own_drop_top"][1] > p0["own_drop_random"][1]
    assert p1["own_drop_top"][1] > p1["own_drop_random"][1]
    assert p0["own_gap"] > 0.3 and p1["own_gap"] > 0.3
    summary = FA.deletion_summary([dict(p, class_index=0) for p in res["prototypes"]])
    assert summary["prototypes_with_positive_gap"] == 100.0


def test_class_part_sets_find_the_parts_and_noise_free_is_stable():
    split = tiny_split()
    protos = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    ex = PrototypeExplainer(split, protos, [0])
    x, red, green = blob_images(8, seed=2)
    kp = np.stack([red, green], axis=1)
    vis = np.ones((8, 2), bool)
    sets = class_part_sets(ex, x, kp, vis, 0, half_size=10.0, sigma=0.0, noise={"none": None})
    assert sets["clean"][:, 0].tolist() == [[True, False]] * 8
    assert sets["clean"][:, 1].tolist() == [[False, True]] * 8
    assert (sets["none"] == sets["clean"]).all()
    # With noise, the strong blobs still win: stable; and the draw is seeded.
    a = class_part_sets(ex, x, kp, vis, 0, half_size=10.0, sigma=0.2, seed=3)
    b = class_part_sets(ex, x, kp, vis, 0, half_size=10.0, sigma=0.2, seed=3)
    assert all((a[n] == b[n]).all() for n in a)
    assert (a["clipped"] == a["clean"]).all()
