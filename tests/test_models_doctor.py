"""The checkpoint doctor's three verdicts, with reasons a user can act on."""
import json

import pytest
import torchvision

from phpn.images.preprocess import Preprocess
from phpn.models import Diagnosis, LoadedModel, diagnose
from phpn.models.zoo import build_model


def test_resnet18_is_exact():
    d = diagnose(build_model("resnet18", 3), (3, 64, 64))
    assert d.verdict == "exact" and d.decomposable
    assert d.reason.startswith("The model ends in global average pooling (AdaptiveAvgPool2d 'avgpool') "
                               "followed by one linear layer ('fc')")
    assert d.feature_shape == (512, 2, 2) and d.split.num_classes == 3
    json.dumps(d.to_dict())


def test_convnext_is_exact_after_folding():
    d = diagnose(build_model("convnext_tiny", 3), (3, 64, 64))
    assert d.verdict == "exact-after-folding"
    assert "The LayerNorm 'classifier.0' after the pooling folds into the head" in d.reason
    assert "scaled by 1/sigma" in d.reason and "can be negative" in d.reason
    as_dict = d.to_dict()
    assert as_dict["split"]["post_pool_norm"] is True and as_dict["feature_shape"] == [768, 2, 2]
    json.dumps(as_dict)


@pytest.mark.slow
def test_vit_b_16_is_impossible_because_of_the_class_token():
    # vit_b_16's architecture (patch 16, 12 layers, width 768) at a small image size, for speed.
    model = torchvision.models.vit_b_16(weights=None, num_classes=3, image_size=32)
    d = diagnose(model, (3, 32, 32))
    assert d.verdict == "impossible" and d.split is None and not d.decomposable
    assert d.reason.startswith("The head reads a single token ([:, 0], the class token of a Vision Transformer)")
    json.dumps(d.to_dict())


@pytest.mark.slow
def test_vgg11_is_impossible_because_of_its_mlp_head():
    d = diagnose(build_model("vgg11", 3), (3, 64, 64))
    assert d.verdict == "impossible"
    assert "no global average pooling before the classifier: AdaptiveAvgPool2d 'avgpool' keeps a 7x7 grid" in d.reason
    assert "The classifier is an MLP (3 linear layers with ReLU between them), which is non-linear." in d.reason


def test_mobilenet_v3_is_impossible_because_of_nonlinear_layers_after_pooling():
    d = diagnose(build_model("mobilenet_v3_small", 3), (3, 64, 64))
    assert d.verdict == "impossible"
    assert "After the global pooling (AdaptiveAvgPool2d 'avgpool') the model applies an MLP head" in d.reason
    assert "Hardswish 'classifier.1' is non-linear" in d.reason
    assert d.notes and d.notes[0].startswith("walking back from the output")


def test_loaded_model_uses_its_own_crop_and_named_layers():
    model = build_model("resnet18", 2)
    loaded = LoadedModel(model=model, arch="resnet18", num_classes=2, sha256="0" * 64,
                         preprocess=Preprocess(resize=64, crop=64))
    d = diagnose(loaded, feature_layer="layer4", head_layer="fc")
    assert isinstance(d, Diagnosis) and d.verdict == "exact" and d.input_size == (3, 64, 64)
    assert d.arch == "resnet18" and d.split.feature_layer == "layer4"
