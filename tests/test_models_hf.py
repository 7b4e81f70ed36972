"""Hugging Face transformers classifiers from a save_pretrained folder: logits, class names, preprocessing."""
import json

import pytest
import torch

from phpn.api import open_model
from phpn.errors import CheckpointError
from phpn.models import load_model, zoo
from phpn.models.hf import LogitsOnly

transformers = pytest.importorskip("transformers")

LABELS = {i: f"kind {i}" for i in range(10)}
SMALL = dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])


def _convnext(tmp_path, processor=True, **extra):
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_labels=10, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                                      **SMALL, **extra)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    folder = tmp_path / "convnext"
    model.save_pretrained(folder)
    if processor:
        transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(folder)
    return model, folder


def test_convnext_folder_loads_unwrapped_with_names_and_processor(tmp_path):
    model, folder = _convnext(tmp_path)
    loaded = load_model(folder)
    assert isinstance(loaded.model, LogitsOnly)
    assert (loaded.arch, loaded.num_classes) == ("hf/ConvNextForImageClassification", 10)
    assert loaded.class_names == [f"kind {i}" for i in range(10)]
    pre = loaded.preprocess
    assert (pre.resize, pre.crop, pre.interpolation, pre.resize_mode, pre.backend, pre.crop_offset) == \
        (73, 64, "bicubic", "shorter", "tensor", "floor")  # int(64 / 0.875) = 73
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre.mean == tuple(saved["image_mean"]) and pre.std == tuple(saved["image_std"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(pixel_values=x).logits)


def test_convnext_folder_decomposes_after_folding_its_layernorm(tmp_path):
    _, folder = _convnext(tmp_path)
    d = open_model(folder).diagnosis
    assert d.verdict == "exact-after-folding"
    assert "'model.convnext.layernorm'" in d.reason and d.split.num_classes == 10


def test_vit_reading_the_class_token_is_refused_with_the_reason(tmp_path):
    cfg = transformers.ViTConfig(num_labels=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, image_size=64, patch_size=16)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    d = open_model(tmp_path / "vit", overrides={"resize": 64, "crop": 64}).diagnosis
    assert d.verdict == "impossible"
    assert d.reason.startswith("The head reads a single token ([:, 0, :], the class token")


def test_placeholder_labels_are_not_class_names_and_no_processor_means_defaults(tmp_path):
    torch.manual_seed(0)
    transformers.ConvNextForImageClassification(
        transformers.ConvNextConfig(num_labels=10, **SMALL)).save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.class_names is None
    assert loaded.preprocess.source == "ImageNet defaults (the folder has no preprocessor_config.json)"


def test_class_count_mismatch_and_bad_folders(tmp_path):
    _, folder = _convnext(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, num_classes=5)
    assert err.value.problem.startswith("You asked for 5 classes but the model folder's classifier has 10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        load_model(empty)
    assert "is a folder without config.json" in err.value.problem
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "has config.json but no weights" in err.value.problem


def test_remote_code_folders_are_refused(tmp_path):
    _, folder = _convnext(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyNet"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "asks for the model's own code (auto_map)" in err.value.problem


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    _, folder = _convnext(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_sizes"] = [16, 32, 64, 256]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "The weights do not fit the ConvNextForImageClassification that config.json describes" in err.value.problem


def test_head_found_by_name_in_sorted_safetensors(tmp_path):
    _, folder = _convnext(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    assert zoo.find_head_weight(sd) == "classifier.weight" and zoo.guess_num_classes(sd) == 10


def test_avgpool_with_ceil_mode_over_the_whole_map_is_global_pooling():
    # Hugging Face's EfficientNet pools with AvgPool2d(hidden_dim, ceil_mode=True): a kernel larger
    # than the map, whose divisor counts only the positions inside it, so it is the map's mean.
    from torch import nn

    from phpn.models import diagnose

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AvgPool2d(2560, ceil_mode=True), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    x = torch.randn(1, 3, 33, 33)
    assert torch.allclose(model[1](model[0](x)).flatten(1), model[0](x).mean((2, 3)), atol=1e-6)
    d = diagnose(model, (3, 33, 33))
    assert d.verdict == "exact" and "AvgPool2d '1'" in d.reason
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10)).eval()
    assert diagnose(plain, (3, 33, 33)).verdict == "impossible"


def test_a_live_transformers_model_is_read_through_its_logits():
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(num_labels=10, **SMALL)).eval()
    session = open_model(model, input_size=(3, 64, 64))
    assert isinstance(session.loaded.model, LogitsOnly) and session.loaded.num_classes == 10
    assert session.diagnosis.verdict == "exact-after-folding"


def test_safetensors_weights_are_hashed_not_read_twice(tmp_path, monkeypatch):
    """transformers reads a .safetensors file itself; phpn only hashes it (one shard or several)."""
    import hashlib

    from phpn.models import hf
    from phpn.models.checkpoint import file_sha256

    _, folder = _convnext(tmp_path)

    def refuse(path, **_):
        raise AssertionError(f"{path} was read a second time")

    monkeypatch.setattr(hf, "read_checkpoint", refuse)
    assert load_model(folder).sha256 == file_sha256(folder / "model.safetensors")
    # Shards: the sha256 is that of the shards' hashes in the index's sorted order, as before.
    sharded = tmp_path / "sharded"
    transformers.ConvNextForImageClassification.from_pretrained(folder).save_pretrained(sharded, max_shard_size="200KB")
    shards = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    expected = hashlib.sha256("".join(file_sha256(sharded / s) for s in shards).encode()).hexdigest()
    assert load_model(sharded).sha256 == expected
