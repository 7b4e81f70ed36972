"""timm classifiers: loaded from a bare state dict by name or by their keys, with timm's own preprocessing."""
import sys

import pytest
import torch
from safetensors.torch import save_file

from phpn.api import open_model
from phpn.errors import CheckpointError, ConfigError
from phpn.models import load_model, timm_models, zoo

timm = pytest.importorskip("timm")


def _save(tmp_path, name, suffix=".safetensors", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    path = tmp_path / f"{name}{suffix}"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    return model, path


def _same_logits(loaded, model, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(x), atol=1e-5, rtol=0)


def test_named_timm_model_loads_with_its_class_count_and_preprocessing(tmp_path):
    model, path = _save(tmp_path, "convnext_atto")
    loaded = load_model(path, arch="timm/convnext_atto")
    assert (loaded.arch, loaded.num_classes) == ("timm/convnext_atto", 10)
    _same_logits(loaded, model)
    pre = loaded.preprocess
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")  # 224 / 0.875
    assert pre.source == f"timm pretrained_cfg of convnext_atto.{model.pretrained_cfg['tag']}"
    assert any(n.startswith("preprocessing: resize shorter side to 256 (bicubic") for n in loaded.notes)


def test_timm_model_inferred_from_its_keys(tmp_path):
    model, path = _save(tmp_path, "convnext_atto", suffix=".pt")
    loaded = load_model(path)
    assert loaded.arch == "timm/convnext_atto"
    assert "architecture inferred from the weight names and shapes: timm's convnext_atto" in loaded.notes
    _same_logits(loaded, model)


def test_timm_resnet_keys_are_torchvision_resnet_unless_named(tmp_path):
    model, path = _save(tmp_path, "resnet18")
    assert load_model(path).arch == "resnet18"  # the same weights and function as torchvision's
    named = load_model(path, arch="timm/resnet18")
    assert named.arch == "timm/resnet18" and named.preprocess.interpolation == "bicubic"
    _same_logits(named, model)


def test_same_keys_different_models_are_asked_for(tmp_path):
    # efficientnet_b0 and tf_efficientnet_b0 have the same weights' names and shapes, but TF's
    # padding and preprocessing: phpn must not pick one silently.
    _, path = _save(tmp_path, "efficientnet_b0")
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "timm/efficientnet_b0" in err.value.problem and "timm/tf_efficientnet_b0" in err.value.problem
    assert err.value.fix.startswith("Say which one with --arch")
    assert load_model(path, arch="timm/efficientnet_b0").num_classes == 10


def test_vit_variant_told_by_its_keys_and_fc_norm_folded(tmp_path):
    model, path = _save(tmp_path, "vit_tiny_patch16_224", global_pool="avg")
    session = open_model(path, arch="timm/vit_tiny_patch16_224")
    assert "built with global_pool='avg'" in session.loaded.notes[0]
    assert session.preprocess.mean == (0.5, 0.5, 0.5)  # timm's ViT pretrained_cfg
    d = session.diagnosis
    assert d.verdict == "exact-after-folding" and "'fc_norm'" in d.reason
    assert d.split.signed_features and d.feature_shape == (192, 14, 14)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rebuilt = d.split.logits_from_features(d.split.backbone(x))
        assert torch.allclose(rebuilt, model(x), atol=1e-4, rtol=0)


def test_class_token_vit_refused_with_the_reason(tmp_path):
    _, path = _save(tmp_path, "vit_tiny_patch16_224")
    d = open_model(path, arch="timm/vit_tiny_patch16_224").diagnosis
    assert d.verdict == "impossible"
    assert d.reason.startswith("The head reads a single token ([:, 0], the class token of a Vision Transformer)")


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    _, path = _save(tmp_path, "convnext_atto")
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="timm/convnext_atto", num_classes=12)
    assert err.value.problem == ("You asked for 12 classes but the checkpoint's classifier (head.fc.weight) has 10 "
                                 "rows, i.e. 10 classes.")


def test_wrong_and_unknown_timm_names(tmp_path):
    _, path = _save(tmp_path, "convnext_atto")
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="timm/convnext_tiny")
    assert err.value.problem.startswith("The checkpoint does not fit timm's convnext_tiny:")
    with pytest.raises(CheckpointError) as err:
        load_model(path, arch="timm/convnext_atoo")
    assert err.value.problem == f"'convnext_atoo' is not a timm model name (timm {timm.__version__})."
    assert "timm/convnext_atto" in err.value.fix


def test_head_found_by_name_not_by_sorted_key_order(tmp_path):
    # safetensors sorts keys: the last 2-D weight of a timm ConvNeXt is a block's MLP (768 rows).
    _, path = _save(tmp_path, "convnext_atto")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert list(sd) == sorted(sd)
    assert zoo.find_head_weight(sd) == "head.fc.weight"
    assert zoo.guess_num_classes(sd) == 10


def test_index_proposes_the_right_model(tmp_path):
    _, path = _save(tmp_path, "regnetx_002")
    from safetensors.torch import load_file

    assert "regnetx_002" in timm_models.index_candidates(load_file(str(path)))


def test_without_timm_the_message_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails
    _, path = _save(tmp_path, "convnext_atto")
    with pytest.raises(ConfigError) as err:
        load_model(path, arch="timm/convnext_atto")
    assert err.value.problem == "This is a timm model, but timm is not installed."
    assert "pip install 'phpn[timm]'" in err.value.fix


def test_pretrained_tag_chooses_the_preprocessing(tmp_path):
    _, path = _save(tmp_path, "resnet18", suffix=".pt")
    a1 = load_model(path, arch="timm/resnet18.a1_in1k").preprocess
    tv = load_model(path, arch="timm/resnet18.tv_in1k").preprocess
    cfg_a1 = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    cfg_tv = timm.models.get_pretrained_cfg("resnet18.tv_in1k")
    assert (a1.interpolation, a1.resize) == (cfg_a1.interpolation, int(224 / cfg_a1.crop_pct))
    assert (tv.interpolation, tv.resize) == (cfg_tv.interpolation, int(224 / cfg_tv.crop_pct))
    assert a1 != tv and tv.source == "timm pretrained_cfg of resnet18.tv_in1k"


@pytest.mark.slow
def test_cli_doctor_with_a_timm_name(tmp_path):
    import json
    import subprocess

    _, path = _save(tmp_path, "convnext_atto")
    proc = subprocess.run([sys.executable, "-m", "phpn", "doctor", "--checkpoint", str(path), "--arch",
                           "timm/convnext_atto", "--crop", "64", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["arch"], out["num_classes"], out["verdict"]) == ("timm/convnext_atto", 10, "exact-after-folding")
    assert out["preprocess"]["crop"] == 64 and out["preprocess"]["interpolation"] == "bicubic"
    assert out["preprocess"]["source"].startswith("timm pretrained_cfg of convnext_atto")
    assert out["preprocess"]["source"].endswith("; changed by hand: crop")
    bad = subprocess.run([sys.executable, "-m", "phpn", "doctor", "--checkpoint", str(path), "--arch",
                          "timm/convnext_atto", "--num-classes", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "You asked for 3 classes but the checkpoint's classifier (head.fc.weight) has 10 rows" in bad.stderr


def test_unknown_weights_without_timm_say_that_timm_was_not_tried(monkeypatch, tmp_path):
    _, path = _save(tmp_path, "convnext_atto")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert err.value.problem.endswith("timm is not installed, so timm's models were not tried.")
    assert "pip install 'phpn[timm]'" in err.value.fix


def test_unknown_weights_with_timm_name_both_libraries(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10))
    path = tmp_path / "mine.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert err.value.problem.endswith("models exactly, nor any timm model of the families phpn indexes.")
    assert "timm/NAME" in err.value.fix and "--model-def" in err.value.fix
