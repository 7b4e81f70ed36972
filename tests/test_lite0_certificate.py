"""Integration: the shipped EfficientNet-Lite0 ImageNet weights on real skimage photos."""
import numpy as np
import pytest
from PIL import Image

from phpn.api import certify_run, open_data, open_model, run_discovery
from phpn.pipeline.discover import DiscoveryConfig


@pytest.fixture(scope="module")
def lite0():
    return open_model(demo="imagenet-lite0")


@pytest.fixture
def photos(tmp_path):
    """Real photos from scikit-image in ImageNet class folders, with flips as second views."""
    from skimage import data

    root = tmp_path / "photos"
    for folder, image in (("281", data.chelsea()), ("967", data.coffee())):
        (root / folder).mkdir(parents=True)
        Image.fromarray(image).save(root / folder / "photo.png")
        Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(root / folder / "photo_mirrored.png")
    return root


def test_lite0_is_exact_by_the_doctor(lite0):
    assert lite0.diagnosis.verdict == "exact"
    assert tuple(lite0.diagnosis.feature_shape) == (1280, 7, 7)


@pytest.mark.slow
def test_lite0_certificate_on_real_photos(lite0, photos):
    data = open_data(lite0, photos)
    run = run_discovery(lite0, data, DiscoveryConfig(k=3, device="cpu"))
    cert = run.meta["certificate"]
    assert cert["images"] == 4 and cert["top1_agreement"] == 1.0
    assert cert["relative_logit_diff"] <= 1e-4 and cert["max_head_error"] <= 1e-6 and cert["passed"]
    again = certify_run(lite0, run, data, device="cpu")
    assert again.max_logit_diff == pytest.approx(cert["max_logit_diff"], rel=1e-6, abs=1e-9)
    tabby = run.class_meta(281)
    assert len(tabby["fidelity"]) == 3 and tabby["images"] == 2
