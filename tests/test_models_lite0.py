"""The built-in EfficientNet-Lite0: offline, safe loading, correct predictions, exact split."""
import socket

import pytest
import torch
from PIL import Image
from skimage import data

from phpn.models import diagnose, load_efficientnet_lite0, load_model, split_head
from phpn.models.lite0 import PREPROCESS, looks_like_lite0


@pytest.fixture(scope="module")
def lite0():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network used")))
        mp.setattr(torch, "load", _only_weights(torch.load))
        return load_efficientnet_lite0()


def _only_weights(load):
    def checked(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "the weights must be read with weights_only=True"
        return load(*args, **kwargs)

    return checked


def top(loaded, image, k=3):
    x = PREPROCESS(Image.fromarray(image))[None]
    with torch.inference_mode():  # also checks the model runs under inference mode
        probs = loaded.model(x).softmax(1)[0]
    return [loaded.class_names[i] for i in probs.topk(k).indices]


def test_loads_offline_with_metadata(lite0):
    assert lite0.arch == "efficientnet-lite0" and lite0.num_classes == 1000 and len(lite0.class_names) == 1000
    assert lite0.preprocess.mean == (0.5, 0.5, 0.5) and lite0.preprocess.crop == 224
    assert len(lite0.sha256) == 64 and not lite0.model.training


def test_predicts_a_cat_for_chelsea_and_espresso_for_coffee(lite0):
    assert top(lite0, data.chelsea())[0] in {"tabby", "tiger cat", "Egyptian cat"}
    coffee = top(lite0, data.coffee())
    assert coffee[0] == "espresso" and "cup" in coffee


def test_split_is_exact_with_non_negative_features(lite0):
    split = split_head(lite0.model, example_input=torch.randn(1, 3, 224, 224))
    assert split.head_layer == "_fc" and split.signed_features is False
    assert any("ReLU6" in n for n in split.notes)
    d = diagnose(lite0, (3, 96, 96))
    assert d.verdict == "exact" and d.feature_shape == (1280, 3, 3)


def test_load_model_without_checkpoint_is_lite0(lite0):
    assert load_model().sha256 == lite0.sha256


def test_fine_tuned_lite0_checkpoint_is_recognised(tmp_path, lite0):
    from phpn.models.lite0 import build

    torch.manual_seed(0)
    model = build(num_classes=7)
    path = tmp_path / "lite0_finetuned.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    assert looks_like_lite0(model.state_dict())
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes, loaded.class_names) == ("efficientnet-lite0", 7, None)
    assert loaded.preprocess == PREPROCESS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-6)
