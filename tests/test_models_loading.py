"""load_model end to end: every loading path, the user's own model files, and bad input."""
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from phpn.errors import CheckpointError, ConfigError
from phpn.models import load_model, split_head
from phpn.models.zoo import build_model


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18", 3).eval()


def same_outputs(a, b, size=64):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pt", "pth", "bin", "safetensors", "wrapped", "prefixed", "legacy"])
def test_torchvision_checkpoint_in_every_form(tmp_path, resnet18, kind):
    sd = resnet18.state_dict()
    path = tmp_path / f"ckpt.{kind if kind in ('pt', 'pth', 'bin', 'safetensors') else 'pt'}"
    if kind == "safetensors":
        save_file(sd, str(path))
    elif kind == "wrapped":
        torch.save({"model_state_dict": sd, "epoch": 90, "optimizer_state_dict": {"state": {}}}, path)
    elif kind == "prefixed":
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.num_classes) == ("resnet18", 3)
    assert len(loaded.sha256) == 64 and loaded.source == str(path)
    assert loaded.preprocess.crop == 224 and loaded.class_names is None
    assert not loaded.model.training
    assert same_outputs(loaded.model, resnet18)


def test_pickled_module_only_with_trust(tmp_path, resnet18):
    path = tmp_path / "whole.pth"
    torch.save(resnet18, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.arch == "resnet18" and loaded.num_classes == 3  # recognised as torchvision's
    assert "trusted" in loaded.notes[0]
    assert same_outputs(loaded.model, resnet18)


def test_wrong_arch_and_class_count(tmp_path, resnet18):
    path = tmp_path / "r18.pt"
    torch.save(resnet18.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit resnet34: .*try --arch resnet18"):
        load_model(path, arch="resnet34")
    with pytest.raises(CheckpointError, match=r"You asked for 1000 classes but .* has 3 rows"):
        load_model(path, num_classes=1000)


def test_corrupt_checkpoint_through_load_model(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="broken.pth is not a readable PyTorch checkpoint, or it is damaged"):
        load_model(path)


def test_architecture_without_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="no trained weights"):
        load_model(arch="resnet50")


USER_MODELS = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x))


    class Net(nn.Module):
        """AdaptiveAvgPool2d module, flatten, dropout, linear."""

        def __init__(self, num_classes=5):
            super().__init__()
            self.body = Body()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.dropout(torch.flatten(self.pool(self.body(x)), 1)))


    class MeanNet(Net):
        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))


    class AvgPoolNet(Net):
        def forward(self, x):  # the whole 8x8 map of a 32x32 input
            return self.fc(F.avg_pool2d(self.body(x), 8).flatten(1))


    class AdaptiveViewNet(Net):
        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.body(x), 1)
            return self.fc(F.dropout(x.view(x.size(0), -1), 0.5, self.training))


    def make_model(num_classes):
        return Net(num_classes)
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODELS)
    return path


def user_module(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location("phpn_test_user_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.mark.parametrize("factory", ["Net", "MeanNet", "AvgPoolNet", "AdaptiveViewNet", "make_model"])
def test_user_model_file_with_each_pooling_style(tmp_path, user_file, factory):
    torch.manual_seed(0)
    reference = user_module(user_file, factory)(num_classes=4).eval()
    ckpt = tmp_path / "user.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 1}, ckpt)

    loaded = load_model(ckpt, model_def=f"{user_file}:{factory}")
    assert loaded.arch == f"user:my_models.py:{factory}" and loaded.num_classes == 4
    assert any("called " + factory + "(num_classes=4)" in n for n in loaded.notes)  # read off the checkpoint
    assert same_outputs(loaded.model, reference, size=32)

    split = split_head(loaded.model.double(), example_input=torch.randn(2, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = loaded.model(x)
        assert float((split.logits_from_features(split.backbone(x)) - logits).abs().max() / logits.abs().max()) < 1e-10


def test_user_model_mismatch_names_the_keys(tmp_path, user_file, resnet18):
    ckpt = tmp_path / "r18.pt"
    torch.save(resnet18.state_dict(), ckpt)
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt, model_def=f"{user_file}:MeanNet", num_classes=3)
    text = str(err.value)
    assert "does not fit user:my_models.py:MeanNet" in text
    assert "weights missing (e.g. body.conv.weight" in text and "unexpected weights (e.g. conv1.weight" in text


def test_user_model_def_errors(tmp_path, user_file, resnet18):
    ckpt = tmp_path / "r18.pt"
    torch.save(resnet18.state_dict(), ckpt)
    with pytest.raises(ConfigError, match="is not of the form FILE.py:FACTORY"):
        load_model(ckpt, model_def=str(user_file))
    with pytest.raises(ConfigError, match=r"has no function or class named 'Missing'.*Body, MeanNet"):
        load_model(ckpt, model_def=f"{user_file}:Missing")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(ckpt, model_def=f"{tmp_path / 'nope.py'}:Net")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"Running the model file bad.py failed \(RuntimeError: boom\)"):
        load_model(ckpt, model_def=f"{bad}:Net")


def test_lightning_style_prefix_is_removed_for_user_models(tmp_path, user_file):
    torch.manual_seed(0)
    reference = user_module(user_file, "Net")(num_classes=2).eval()
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in reference.state_dict().items()}, "epoch": 3}, ckpt)
    loaded = load_model(ckpt, model_def=f"{user_file}:Net")
    assert "removed the prefix 'model.'" in " ".join(loaded.notes)
    assert same_outputs(loaded.model, reference, size=32)
