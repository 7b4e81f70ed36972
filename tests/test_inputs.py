"""One rule for partial preprocessing: the CLI's flags, the app's settings and the API's dicts."""
import pytest

import phpn
from phpn.errors import ConfigError
from phpn.images.inputs import as_preprocess, merge_preprocess
from phpn.images.preprocess import Preprocess


def test_a_crop_alone_keeps_the_resize_to_crop_ratio_everywhere():
    # The usual 256/224 (torchvision's and timm's ImageNet recipe): resize = round(crop x 256 / 224).
    assert as_preprocess({"crop": 200}).resize == 229
    assert merge_preprocess(Preprocess(resize=256, crop=224), {"crop": 200}).resize == 229
    assert as_preprocess({"crop": 288}).resize == 329
    assert as_preprocess({"crop": 112}).resize == 128
    # The model's own ratio, not ImageNet's: a timm-style crop_pct of 0.95, and a crop-only model.
    assert merge_preprocess(Preprocess(resize=236, crop=224), {"crop": 288}).resize == 303  # int(288 / 0.95 + .5)
    assert merge_preprocess(Preprocess(resize=28, crop=28), {"crop": 56}).resize == 56
    # Both front doors are the one function.
    assert phpn.merge_preprocess is merge_preprocess


def test_channels_mean_and_std_follow_each_other():
    grey = as_preprocess({"mean": [0.3], "std": [0.2]})
    assert (grey.channels, grey.mean, grey.std) == (1, (0.3,), (0.2,))
    neutral = merge_preprocess(Preprocess(), {"channels": 1})
    assert (neutral.mean, neutral.std) == ((0.5,), (0.25,))
    same = merge_preprocess(Preprocess(), {"resize": 300})
    assert (same.resize, same.crop, same.mean) == (300, 224, Preprocess().mean)
    assert same.source == "defaults; changed by hand: resize"
    assert as_preprocess({"crop": 200}).source == "phpn's defaults; given by the caller: crop"


def test_nothing_to_change_and_unknown_fields():
    base = Preprocess(resize=64, crop=56)
    assert merge_preprocess(base, {"resize": None, "crop": None}) is base
    with pytest.raises(ConfigError) as err:
        as_preprocess({"crop": 224, "size": 3})
    assert err.value.problem == "Unknown preprocessing setting(s): size."
    with pytest.raises(ConfigError) as err:
        as_preprocess({"resize": 100, "crop": 224})
    assert err.value.problem == "resize (100) must be at least crop (224) and both positive."


def test_a_mean_alone_of_the_wrong_length_is_refused_not_taken_as_grey():
    with pytest.raises(ConfigError) as err:
        merge_preprocess(Preprocess(), {"mean": [0.5]})
    assert err.value.problem == "mean and std need 3 values each (one per input channel), got 1 and 3."
    with pytest.raises(ConfigError) as err:
        merge_preprocess(Preprocess(), {"crop": 0})
    assert err.value.problem.startswith("crop must be")
