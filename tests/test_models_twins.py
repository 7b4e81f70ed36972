"""Weights that fit a torchvision and a timm model alike (timm's ResNets and DenseNets keep
torchvision's names): the note names both, both preprocessings and the choice, made by the evidence."""
import json

import pytest
import torch
import torchvision

from phpn.models import load_model, zoo

timm = pytest.importorskip("timm")

TV_PRE = ("resize 256 bilinear, crop 224, crop_pct 0.875, mean (0.485, 0.456, 0.406), "
          "std (0.229, 0.224, 0.225)")
TIMM_PRE = ("resize 235 bicubic, crop 224, crop_pct 0.953, mean (0.485, 0.456, 0.406), "
            "std (0.229, 0.224, 0.225)")
HOW = "(the Architecture fields on the app's Model page, --arch on the command line, arch= in Python)"


def _twin_note(loaded) -> str:
    found = [n for n in loaded.notes if n.startswith("the weights fit both torchvision's")]
    assert len(found) <= 1
    return found[0] if found else ""


def _timm_resnet18(path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    torch.save(model.state_dict(), path)
    return model


def test_timm_resnet_weights_say_both_fit_and_default_to_torchvision(tmp_path):
    model = _timm_resnet18(tmp_path / "weights.pth")
    loaded = load_model(tmp_path / "weights.pth")
    assert loaded.arch == "resnet18" and (loaded.preprocess.resize, loaded.preprocess.interpolation) == (256, "bilinear")
    assert _twin_note(loaded) == (
        "the weights fit both torchvision's resnet18 and timm's resnet18 (and timm's resnetblur18): the same layer "
        f"names and shapes, but other preprocessing. torchvision's: {TV_PRE}; timm's: {TIMM_PRE}. phpn took "
        "torchvision's because nothing in the file (its SHA-256, a pretrained_cfg, a timm config.json beside it, "
        f"its name) says which, and torchvision's is the default. For timm's, choose the architecture timm/resnet18 {HOW}")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-5)
    # The way out the note names gives timm's model and preprocessing, without the note.
    chosen = load_model(tmp_path / "weights.pth", arch="timm/resnet18")
    assert chosen.arch == "timm/resnet18" and (chosen.preprocess.resize, chosen.preprocess.interpolation) == (
        235, "bicubic")
    assert _twin_note(chosen) == ""


def test_a_pretrained_cfg_in_the_file_chooses_timm(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    torch.save({"state_dict": model.state_dict(), "architecture": "resnet18",
                "pretrained_cfg": {"tag": "a1_in1k", "crop_pct": 0.95}}, tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth")
    assert loaded.arch == "timm/resnet18.a1_in1k" and loaded.preprocess.resize == 235
    note = _twin_note(loaded)
    assert "phpn took timm's because the file holds a timm pretrained_cfg." in note
    assert note.endswith(f"For torchvision's, choose the architecture resnet18 {HOW}")
    assert f"torchvision's: {TV_PRE}; timm's: {TIMM_PRE}." in note


def test_timm_file_name_or_config_json_choose_timm(tmp_path):
    _timm_resnet18(tmp_path / "resnet18.a1_in1k.pth")
    loaded = load_model(tmp_path / "resnet18.a1_in1k.pth")
    assert loaded.arch == "timm/resnet18.a1_in1k"
    assert "because the file name 'resnet18.a1_in1k.pth' is timm's name for it with a pretrained tag." in \
        _twin_note(loaded)
    folder = tmp_path / "hub"
    folder.mkdir()
    _timm_resnet18(folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 5,
                                                    "pretrained_cfg": {"tag": "a1_in1k"}}))
    loaded = load_model(folder / "pytorch_model.bin")
    assert loaded.arch == "timm/resnet18.a1_in1k"
    assert "because the config.json beside it is timm's (architecture and pretrained_cfg)." in _twin_note(loaded)


@pytest.mark.slow
def test_timm_densenet_weights_name_both(tmp_path):
    model = timm.create_model("densenet121", pretrained=False, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "d.pth")
    loaded = load_model(tmp_path / "d.pth")
    assert loaded.arch == "densenet121"
    note = _twin_note(loaded)
    assert note.startswith("the weights fit both torchvision's densenet121 and timm's densenet121: ")
    assert "torchvision's: resize 256 bilinear, crop 224" in note and "timm's: resize 256 bicubic, crop 224" in note


def test_torchvision_only_weights_have_no_note(tmp_path):
    torch.save(torchvision.models.mobilenet_v2(num_classes=3).state_dict(), tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth")
    assert loaded.arch == "mobilenet_v2" and _twin_note(loaded) == ""


def test_torchvision_file_hash_is_evidence_for_torchvision():
    choice = zoo.twin_choice("resnet18", ["resnet18"], sha256="f37072fd" + "0" * 56)
    assert choice.timm_name == "" and choice.reason == (
        "the file's SHA-256 is that of torchvision's ResNet18_Weights.IMAGENET1K_V1")
