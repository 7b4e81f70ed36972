"""Consistency and stability on hand-made maps and keypoints with known answers."""
import numpy as np
import pytest
import torch

from phpn.evaluate import consistency as m


def peaked_maps(peaks_xy, h=8, w=8):
    """(N, P, h, w) maps with a single sharp peak at grid cell (x, y) per image and prototype."""
    peaks_xy = np.asarray(peaks_xy)
    N, P = peaks_xy.shape[:2]
    maps = np.zeros((N, P, h, w), dtype=np.float32)
    for n in range(N):
        for p in range(P):
            x, y = peaks_xy[n, p]
            maps[n, p, y, x] = 1.0
    return maps


def test_scaled_half_size():
    assert m.scaled_half_size(224) == 36.0
    assert m.scaled_half_size(64) == pytest.approx(36 * 64 / 224)
    assert m.scaled_half_size(448, half_size=10) == 20.0


def test_peak_locations_are_centre_of_upsampled_cell():
    # An 8x8 map upsampled to 64x64: the peak of cell (x=5, y=2) lands in its 8x8 block.
    maps = peaked_maps([[[5, 2]]])
    (x, y), = m.peak_locations(maps, 64)[0]
    assert 40 <= x < 48 and 16 <= y < 24
    # No upsampling when the map already has the input size: the exact argmax.
    big = np.zeros((1, 1, 16, 16), dtype=np.float32)
    big[0, 0, 3, 11] = 2.0
    assert m.peak_locations(big, 16)[0, 0].tolist() == [11, 3]


def test_peak_ties_take_first_in_row_major_order():
    flat = np.ones((1, 1, 10, 10), dtype=np.float32)
    assert m.peak_locations(flat, 10)[0, 0].tolist() == [0, 0]


def test_parts_in_boxes_bounds_inclusive_and_clipped():
    peaks = np.array([[[10, 10]]])
    kp = np.array([[[20, 10], [21, 10], [10, 0], [0, 0], [-1, 10]]], dtype=float)
    vis = np.array([[True, True, True, True, True]])
    inside = m.parts_in_boxes(peaks, kp, vis, half_size=10, size=64)[0, 0]
    # x = 20 is on the box edge (included), 21 is out; (10, 0) and (0, 0) in; x = -1 is
    # outside the clipped box [max(0, 0), 20].
    assert inside.tolist() == [True, False, True, True, False]
    vis[0, 0] = False
    assert not m.parts_in_boxes(peaks, kp, vis, 10, 64)[0, 0, 0]


def make_parts(N, rng):
    """Two parts per image at random far-apart places on a 64 px image, 8x8 feature grid."""
    cells = np.stack([rng.integers(0, 3, size=N), rng.integers(0, 8, size=N)], axis=1)  # part 0, left
    cells1 = np.stack([rng.integers(5, 8, size=N), rng.integers(0, 8, size=N)], axis=1)  # part 1, right
    kp = np.stack([cells * 8 + 4, cells1 * 8 + 4], axis=1).astype(float)  # (N, 2, 2) (x, y)
    return cells, cells1, kp


def test_map_peaking_on_a_part_is_consistent_and_random_peak_is_not():
    rng = np.random.default_rng(0)
    N = 40
    c0, c1, kp = make_parts(N, rng)
    vis = np.ones((N, 2), dtype=bool)
    random_cells = rng.integers(0, 8, size=(N, 2))
    maps = peaked_maps(np.stack([c0, c1, random_cells], axis=1))  # prototype 0 -> part 0, 1 -> part 1
    sets = m.part_sets(maps, kp, vis, size=64)
    frac = m.part_fractions(sets, vis)
    assert frac[0, 0] == 1.0 and frac[1, 1] == 1.0
    assert frac[0, 1] == 0.0 and frac[1, 0] == 0.0
    assert frac[2].max() < 0.8
    flags = m.consistent(sets, vis)
    assert flags.tolist() == [True, True, False]
    assert m.consistency_score(flags[:2]) == 100.0
    assert m.consistency_score(flags) == pytest.approx(200 / 3)


def test_consistency_threshold_counts_only_visible_images():
    # 10 images; part 0 visible in 5, the prototype covers it in 4 of those -> 0.8.
    N = 10
    vis = np.zeros((N, 1), dtype=bool)
    vis[:5, 0] = True
    inside = np.zeros((N, 1, 1), dtype=bool)
    inside[:4, 0, 0] = True
    assert m.part_fractions(inside, vis)[0, 0] == pytest.approx(0.8)
    assert m.consistent(inside, vis, threshold=0.8).tolist() == [True]
    assert m.consistent(inside, vis, threshold=0.81).tolist() == [False]
    # Never visible: fraction 0, not a division by zero.
    assert m.part_fractions(inside, np.zeros((N, 1), bool))[0, 0] == 0.0


def test_stability_exact_fractions():
    N, P, M = 4, 2, 3
    clean = np.zeros((N, P, M), dtype=bool)
    clean[:, 0, 0] = True
    clean[:, 1, 1] = True
    noisy = clean.copy()
    assert m.stable_fraction(clean, noisy).tolist() == [1.0, 1.0]
    noisy[0, 0, 2] = True  # prototype 0 picks up a part on image 0
    noisy[1, 1, 1] = False  # prototype 1 loses its part on image 1
    noisy[2, 1, 0] = True  # ... and gains another on image 2
    frac = m.stable_fraction(clean, noisy)
    assert frac.tolist() == [0.75, 0.5]
    assert m.stability_score(frac) == pytest.approx(62.5)


def test_stability_of_noise_free_maps_is_one():
    rng = np.random.default_rng(1)
    N = 12
    c0, c1, kp = make_parts(N, rng)
    vis = np.ones((N, 2), dtype=bool)
    maps = peaked_maps(np.stack([c0, c1], axis=1)) + 0.01 * rng.random((N, 2, 8, 8)).astype(np.float32)
    a = m.part_sets(maps, kp, vis, 64)
    b = m.part_sets(maps.copy(), kp, vis, 64)
    assert m.stability_score(m.stable_fraction(a, b)) == 100.0


def test_perturb_sigma_and_clip():
    x = torch.zeros(2000, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    noisy = m.perturb(x, sigma=0.2, generator=g)
    assert abs(noisy.std().item() - 0.2) < 0.01
    g = torch.Generator().manual_seed(0)
    clipped = m.perturb(x, sigma=0.2, clip=0.25, generator=g)
    assert clipped.abs().max().item() == pytest.approx(0.25)
    # Same draw, only clipped.
    inside = noisy.abs() < 0.25
    assert torch.equal(clipped[inside], noisy[inside])
