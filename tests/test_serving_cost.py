"""The limits on a model input by the model's cost (phpn.app.serving.cost): one image's forward
pass counted in FLOPs at the model's own size, scaled by pixels, against the operator's budget
(PHPN_MAX_FORWARD_GFLOPS), under the fixed pixel cap (PHPN_MAX_INPUT_PIXELS)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from phpn.app.serving import (
    ForwardCost,
    ServerSettings,
    check_forward_cost,
    largest_side,
    load_settings,
    measure_cost,
)
from phpn.errors import ConfigError


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).eval()


def test_a_tiny_models_flops_are_counted_exactly_and_scale_with_pixels():
    cost = measure_cost(_tiny(), (3, 8, 8))
    # conv: 2 x (4 x 8 x 8 outputs) x (3 x 3 x 3 inputs each) = 13,824; linear: 2 x 4 x 2 = 16
    assert cost == ForwardCost(13_840e-9, 8, 8)
    assert cost.at(16, 16) == pytest.approx(55_360e-9, rel=1e-12)
    assert cost.gflops_per_megapixel == pytest.approx(13_840e-9 / 64e-6, rel=1e-12)
    budget = ServerSettings(max_forward_gflops=40_000e-9)
    check_forward_cost(8, 8, cost, budget)
    assert largest_side(cost, budget) == 13  # 13 x 13 x 216.25 = 36,546 FLOPs; 14 x 14: 42,385
    with pytest.raises(ConfigError, match=r"^An input of 16x16 pixels would cost this model about 0\.0 GFLOPs .* "
                                          r"Use a crop of at most 13x13 pixels with this model\.$"):
        check_forward_cost(16, 16, cost, budget)
    with pytest.raises(ConfigError, match=r"Use a smaller model\.$"):  # too costly at any size
        check_forward_cost(8, 8, cost, ServerSettings(max_forward_gflops=1e-10))

def test_a_model_that_cannot_run_has_no_cost_and_only_the_pixel_cap_applies():
    assert measure_cost(nn.Linear(5, 2), (3, 8, 8)) is None
    check_forward_cost(1024, 1024, None, ServerSettings())
    with pytest.raises(ConfigError, match="is more than the 1,048,576 pixels"):
        check_forward_cost(1025, 1024, None, ServerSettings())


@pytest.fixture(scope="module")
def resnet18_cost():
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    return measure_cost(model, (3, 224, 224))


def test_resnet18_passes_at_1024_pixels_and_is_refused_at_4096(resnet18_cost):
    cost = resnet18_cost
    assert cost.gflops == pytest.approx(3.62712576, rel=1e-9) and (cost.height, cost.width) == (224, 224)
    assert cost.at(1024, 1024) == pytest.approx(75.7995, rel=1e-5)
    assert cost.at(4096, 4096) == pytest.approx(1212.7924, rel=1e-6)
    assert ServerSettings().max_forward_gflops == 500.0
    roomy = ServerSettings(max_input_pixels=4096 * 4096)  # the budget alone decides
    check_forward_cost(1024, 1024, cost, roomy)
    with pytest.raises(ConfigError) as err:
        check_forward_cost(4096, 4096, cost, roomy)
    assert str(err.value) == ("An input of 4096x4096 pixels would cost this model about 1,212.8 GFLOPs per image "
                              "(3.63 GFLOPs at 224x224), more than the 500 GFLOPs one forward pass may cost on this "
                              "server (PHPN_MAX_FORWARD_GFLOPS). Use a crop of at most 2629x2629 pixels with this "
                              "model.")
    assert largest_side(cost, roomy) == 2629
    assert cost.at(2629, 2629) <= 500 < cost.at(2630, 2630)
    assert largest_side(cost, ServerSettings()) == 1024  # the pixel cap stays an upper bound
    with pytest.raises(ConfigError, match="^An input of 4096x4096 pixels is more than the 1,048,576 pixels"):
        check_forward_cost(4096, 4096, cost, ServerSettings())
    check_forward_cost(4096, 4096, cost, ServerSettings(max_input_pixels=4096 * 4096, max_forward_gflops=0))
    # A costlier model gets smaller inputs: ten times the cost, about a third of the side.
    costly = ForwardCost(cost.gflops * 10, 224, 224)
    assert largest_side(costly, roomy) == 831
    with pytest.raises(ConfigError, match="Use a crop of at most 831x831 pixels"):
        check_forward_cost(1024, 1024, costly, roomy)


def test_the_budget_is_an_operator_setting(tmp_path):
    s = load_settings(environ={"PHPN_MAX_FORWARD_GFLOPS": "50"}, settings_file=tmp_path / "none.toml")
    assert s.max_forward_gflops == 50.0


def test_the_app_refuses_a_crop_over_the_models_budget_before_running_it_there(tmp_path, monkeypatch):
    """A visitor's weights-only ResNet-18 opens at its own 224 px; asking for 448 px with a budget of
    10 GFLOPs (14.5 GFLOPs asked) is refused from the cost counted at 224, before any model is
    opened at 448; 320 px (7.4 GFLOPs) is opened and its cost counted there."""
    pytest.importorskip("streamlit")
    from phpn.app import (
        cache,  # noqa: PLC0415 - the app's modules import Streamlit
        frame,  # noqa: PLC0415 - the app's frame imports Streamlit
    )

    monkeypatch.setenv("PHPN_SETTINGS_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PHPN_MAX_FORWARD_GFLOPS", "10")
    monkeypatch.delenv("PHPN_ISOLATE_ALL_MODELS", raising=False)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "r18.pt")
    opened = []
    real_open = cache.open_model

    def counting_open(checkpoint=None, **kwargs):
        opened.append((kwargs.get("overrides") or {}).get("crop"))
        return real_open(checkpoint, **kwargs)

    monkeypatch.setattr(cache, "open_model", counting_open)
    cache._load_model_entry.clear()
    try:
        spec = {"checkpoint": str(tmp_path / "r18.pt"), "arch": "resnet18"}
        with pytest.raises(ConfigError) as err:
            frame.load_model_entry(**spec, overrides={"resize": 448, "crop": 448})
        assert str(err.value) == ("An input of 448x448 pixels would cost this model about 14.5 GFLOPs per image "
                                  "(3.63 GFLOPs at 224x224), more than the 10 GFLOPs one forward pass may cost on "
                                  "this server (PHPN_MAX_FORWARD_GFLOPS). Use a crop of at most 371x371 pixels with "
                                  "this model.")
        assert opened == [None]  # only the model at its own size
        entry = frame.load_model_entry(**spec, overrides={"resize": 320, "crop": 320})
        assert opened == [None, 320]  # its own size came from the cache
        assert (entry.cost.height, entry.cost.gflops) == (320, pytest.approx(3.62712576 * (320 / 224) ** 2, rel=1e-3))
        own = frame.load_model_entry(**spec)
        assert own.cost == ForwardCost(pytest.approx(3.62712576, rel=1e-9), 224, 224)
        assert entry.session.loaded.model is own.session.loaded.model and entry.lock is own.lock  # one copy of the weights
        assert entry.session.diagnosis.input_size == (3, 320, 320) and entry.session.preprocess.crop == 320
    finally:
        cache._load_model_entry.clear()
