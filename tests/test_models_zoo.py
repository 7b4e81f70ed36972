"""torchvision architectures: inference from weights, strict loading, preprocessing metadata."""

import pytest
import torch
from torch import nn

from phpn.errors import CheckpointError
from phpn.models import infer_arch
from phpn.models.zoo import build_model, canonical_arch, class_names, default_preprocess, known_archs, load_torchvision


def shapes_only(arch, num_classes):
    """A state dict with the right names and shapes but no memory (meta tensors)."""
    return build_model(arch, num_classes, empty=True).state_dict()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
                                  "mobilenet_v2", "efficientnet_b0", "efficientnet_v2_s", "convnext_tiny",
                                  "regnet_y_400mf", "regnet_x_400mf", "swin_t", "vgg11", "vit_b_16",
                                  "mobilenet_v3_small"])
@pytest.mark.slow
def test_infer_arch_from_names_and_shapes(arch):
    assert infer_arch(shapes_only(arch, 7)) == (arch, 7)


def test_infer_arch_sees_through_wrappers():
    sd = {"module." + k: v for k, v in shapes_only("resnet34", 10).items()}
    assert infer_arch(sd) == ("resnet34", 10)
    sd = {"model." + k: v for k, v in shapes_only("densenet121", 3).items()}  # Lightning-style attribute
    assert infer_arch(sd) == ("densenet121", 3)


def test_unknown_architecture_asks_for_arch_or_model_def():
    sd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)).state_dict()
    with pytest.raises(CheckpointError) as err:
        infer_arch(sd)
    assert "Could not tell the architecture" in str(err.value)
    assert "--arch" in str(err.value) and "--model-def FILE.py:FACTORY" in str(err.value)


def test_near_miss_names_the_nearest_architecture():
    sd = shapes_only("resnet18", 5)
    del sd["layer4.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"The nearest is resnet18, but 1 missing \(e.g. layer4.1.conv2.weight\)"):
        infer_arch(sd)


@pytest.fixture(scope="module")
def resnet18_weights():
    torch.manual_seed(0)
    return build_model("resnet18", 4).state_dict()


def test_load_with_inferred_arch(resnet18_weights):
    model, arch, rows, notes = load_torchvision(resnet18_weights)
    assert (arch, rows) == ("resnet18", 4) and not model.training
    assert torch.equal(model.fc.weight, resnet18_weights["fc.weight"])
    assert "inferred" in notes[0]


def test_wrong_arch_names_keys_and_suggests_the_right_one(resnet18_weights):
    with pytest.raises(CheckpointError) as err:
        load_torchvision(resnet18_weights, arch="resnet34")
    text = str(err.value)
    assert text.startswith("The checkpoint does not fit resnet34: ")
    assert "missing (e.g. layer1.2.conv1.weight" in text
    assert "The weights look like resnet18: try --arch resnet18." in text


def test_class_count_mismatch(resnet18_weights):
    asked = r"You asked for 10 classes but the checkpoint's head \(fc.weight\) has 4 rows"
    with pytest.raises(CheckpointError, match=asked):
        load_torchvision(resnet18_weights, arch="resnet18", num_classes=10)
    _, _, rows, _ = load_torchvision(resnet18_weights, arch="ResNet-18", num_classes=4)
    assert rows == 4


def test_unknown_arch_name():
    with pytest.raises(CheckpointError, match="'resnet19' is not a torchvision architecture") as err:
        canonical_arch("resnet19")
    assert "resnet18" in str(err.value)
    assert canonical_arch("EfficientNet-B0") == "efficientnet_b0"


def test_half_precision_and_old_densenet_names_load():
    torch.manual_seed(0)
    sd = build_model("densenet121", 2).state_dict()
    # torchvision's DenseNet once wrote "norm.1" for "norm1"; half precision is also common.
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v.half() if v.is_floating_point() else v
           for k, v in sd.items()}
    model, arch, rows, _ = load_torchvision(old)
    assert (arch, rows) == ("densenet121", 2)
    assert model.classifier.weight.dtype == torch.float32


def test_no_meta_tensors_left_after_loading(resnet18_weights):
    model, *_ = load_torchvision(resnet18_weights)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_preprocess_and_class_names_from_offline_metadata():
    pre = default_preprocess("resnet18")
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (default_preprocess("swin_t").resize, default_preprocess("convnext_tiny").resize) == (232, 236)
    assert default_preprocess("efficientnet_b3").crop == 300
    names = class_names("resnet50", 1000)
    assert len(names) == 1000 and names[281] == "tabby" and names[967] == "espresso"
    assert class_names("resnet50", 10) is None


def test_known_archs_cover_the_families():
    archs = set(known_archs())
    for a in ("resnet152", "resnext101_64x4d", "wide_resnet101_2", "densenet201", "efficientnet_b7",
              "efficientnet_v2_l", "mobilenet_v2", "regnet_y_128gf", "convnext_large", "swin_v2_b",
              "vgg19_bn", "vit_h_14", "mobilenet_v3_large"):
        assert a in archs


@pytest.mark.slow
def test_family_markers_hold_for_every_member():
    # infer_arch only compares against families whose marker keys the checkpoint has; that
    # is exact only if every member of a family really has them.
    from phpn.models.zoo import FAMILIES, _signature, family_of

    for arch in known_archs():
        assert FAMILIES[family_of(arch)][1] <= set(_signature(arch).shapes), arch


def test_ambiguous_weights_ask_for_arch(monkeypatch):
    from phpn.models import zoo

    real = zoo._compare
    # Pretend resnet34 had resnet18's shapes: both fit, so phpn must ask.
    monkeypatch.setattr(zoo, "_compare", lambda sd, arch: real(sd, "resnet18" if arch == "resnet34" else arch))
    with pytest.raises(CheckpointError, match=r"fits several architectures equally well: resnet18, resnet34.*--arch"):
        infer_arch(shapes_only("resnet18", 3))
