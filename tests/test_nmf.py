import numpy as np
import pytest
import torch

from phpn.errors import ConfigError
from phpn.method.nmf import NMFConfig, nmf, sklearn_nmf


def _parts_data(b=3, n=400, d=64, parts=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = (torch.rand(b, parts, d, generator=g) < 0.2).float() * torch.rand(b, parts, d, generator=g)
    codes = (torch.rand(b, n, parts, generator=g) < 0.3).float() * torch.rand(b, n, parts, generator=g)
    return torch.relu(codes @ directions + 0.1 * torch.randn(b, n, d, generator=g))


@pytest.mark.parametrize("sketch", [None, 0])
def test_error_no_worse_than_scikit_learn(sketch):
    features = _parts_data()
    result = nmf(features, NMFConfig(k=3, sketch_rank=sketch))
    for c in range(features.shape[0]):
        x = features[c].double().numpy()
        _, _, reference, _ = sklearn_nmf(x, 3)
        ours = float(result.error[c])
        assert ours <= reference * 1.02, (ours, reference)
        # The reported error is the exact reconstruction error.
        recon = (result.encodings[c] @ result.prototypes[c]).double().numpy()
        assert ours == pytest.approx(np.linalg.norm(x - recon), rel=1e-4)


def test_shapes_nonnegativity_and_unit_prototypes():
    features = _parts_data(b=2, n=100, d=32)
    result = nmf(features, NMFConfig(k=4))
    assert result.prototypes.shape == (2, 4, 32)
    assert result.encodings.shape == (2, 100, 4)
    assert bool((result.prototypes >= 0).all()) and bool((result.encodings >= 0).all())
    torch.testing.assert_close(result.prototypes.norm(dim=2), torch.ones(2, 4))


def test_padding_changes_nothing():
    features = _parts_data(b=2, n=150, d=32)
    alone = nmf(features[:1, :100], NMFConfig(k=3))
    padded = features.clone()
    padded[0, 100:] = 0
    together = nmf(padded, NMFConfig(k=3), counts=torch.tensor([100, 150]))
    assert bool((together.encodings[0, 100:] == 0).all())
    assert float(together.error[0]) == pytest.approx(float(alone.error[0]), rel=2e-2)


def test_deterministic_under_seed():
    features = _parts_data(b=2, n=100, d=32)
    a = nmf(features, NMFConfig(k=3, seed=5))
    b = nmf(features, NMFConfig(k=3, seed=5))
    torch.testing.assert_close(a.prototypes, b.prototypes, rtol=0, atol=0)


def test_bad_input_messages():
    features = _parts_data(b=1, n=5, d=16)
    with pytest.raises(ConfigError, match="need at least 8 feature vectors per class"):
        nmf(features, NMFConfig(k=8))
    with pytest.raises(ConfigError, match="between 1 and 20"):
        nmf(features, NMFConfig(k=0))
    with pytest.raises(ConfigError, match="non-negative"):
        nmf(features - 1, NMFConfig(k=2))


def test_scikit_learn_reference_solver_through_the_same_interface():
    features = _parts_data(b=2, n=120, d=32)
    counts = torch.tensor([120, 80])
    features[1, 80:] = 0
    ours = nmf(features, NMFConfig(k=3), counts)
    reference = nmf(features, NMFConfig(k=3, solver="sklearn"), counts)
    assert reference.prototypes.shape == (2, 3, 32) and reference.prototypes.dtype == features.dtype
    torch.testing.assert_close(reference.prototypes.norm(dim=2), torch.ones(2, 3))
    assert bool((reference.encodings[1, 80:] == 0).all())
    assert bool((ours.error <= reference.error * 1.02).all())
    with pytest.raises(ConfigError, match="Unknown NMF solver 'mu'"):
        NMFConfig(solver="mu")


def test_semi_nmf_fits_signed_features_that_clamped_nmf_cannot():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(2, 400, 3, generator=g, dtype=torch.float64)
    p = torch.randn(2, 3, 30, generator=g, dtype=torch.float64)
    features = e @ p + 0.01 * torch.randn(2, 400, 30, generator=g, dtype=torch.float64)
    semi = nmf(features, NMFConfig(k=3, data="signed"))
    clamped = nmf(features.clamp(min=0), NMFConfig(k=3))
    clamped_error = torch.linalg.vector_norm(features - clamped.encodings @ clamped.prototypes, dim=(1, 2))
    exact = torch.linalg.vector_norm(features - semi.encodings @ semi.prototypes, dim=(1, 2))
    torch.testing.assert_close(semi.error, exact)
    assert bool((semi.encodings >= 0).all()) and float(semi.prototypes.min()) < 0
    assert float(semi.relative_error.max()) < 0.05
    assert bool((exact < 0.1 * clamped_error).all())
    with pytest.raises(ConfigError, match="Unknown NMF data 'raw'"):
        NMFConfig(data="raw")


def test_clamped_nmf_still_refuses_negative_features():
    with pytest.raises(ConfigError, match="NMF needs non-negative features"):
        nmf(-torch.ones(1, 10, 4), NMFConfig(k=2))


def test_elbow_k_finds_the_bend_and_says_why():
    from phpn.method.nmf import elbow_k

    k, reason = elbow_k([2, 3, 4, 5, 6], [0.8, 0.4, 0.35, 0.32, 0.3])
    assert k == 3 and reason.startswith("relative error 0.800 at k = 2, 0.400 at k = 3")
    assert "bends most at k = 3" in reason
    assert elbow_k([2, 3, 4], [0.5, 0.5, 0.5])[0] == 2
    assert elbow_k([2, 3], [0.5, 0.4])[0] == 2


def test_suggest_k_recovers_the_number_of_parts():
    from phpn.method.nmf import suggest_k

    g = torch.Generator().manual_seed(0)
    parts = torch.rand(4, 30, generator=g, dtype=torch.float64) ** 4
    e = torch.rand(1, 300, 4, generator=g, dtype=torch.float64)
    features = e @ parts[None] + 0.001 * torch.rand(1, 300, 30, generator=g, dtype=torch.float64)
    (k, reason, errors), = suggest_k(features, NMFConfig(), k_max=7)
    assert k == 4 and set(errors) == {"2", "3", "4", "5", "6", "7"}
    assert errors["4"] < 0.05 < errors["3"]


def test_k_above_the_channel_count_names_the_channels():
    features = torch.rand(1, 64, 4)
    with pytest.raises(ConfigError, match=r"k = 5 prototypes need at least 5 feature channels, but the features have only 4"):
        nmf(features, NMFConfig(k=5))
