"""Reading checkpoint files: every format and wrapper, and every way a file can be bad."""
import argparse
import hashlib
import os
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from phpn.errors import CheckpointError
from phpn.models import read_checkpoint, read_state_dict


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.fixture
def weights():
    return tiny_net().state_dict()


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_plain_state_dict_and_its_sha256(tmp_path, weights, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(weights, path)
    sd, sha = read_state_dict(path)
    assert same(sd, weights)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors(tmp_path, weights):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    sd, sha = read_state_dict(path)
    assert same(sd, weights)
    assert read_checkpoint(path).format == "safetensors"
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_wrapped_dicts_with_training_extras(tmp_path, weights, key):
    path = tmp_path / "ckpt.pth"
    torch.save({key: weights, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                "best_acc": torch.tensor(0.9)}, path)
    sd, _ = read_state_dict(path)
    assert same(sd, weights)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_dataparallel_and_compile_prefixes_are_removed(tmp_path, weights, prefix):
    path = tmp_path / "p.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in weights.items()}}, path)
    sd, _ = read_state_dict(path)
    assert same(sd, weights)


def test_legacy_non_zip_serialisation(tmp_path, weights):
    path = tmp_path / "legacy.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    sd, _ = read_state_dict(path)
    assert same(sd, weights)
    assert read_checkpoint(path).format == "torch-legacy"


# A file saved from a GPU records "cuda:0" as each tensor's location; rewrite a CPU save the
# same way so the test needs no GPU.
_CPU, _CUDA = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"


def as_if_saved_on_cuda(src, dst):
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                zout.writestr(info.filename, data.replace(_CPU, _CUDA) if info.filename.endswith("data.pkl") else data)
    else:
        dst.write_bytes(src.read_bytes().replace(_CPU, _CUDA))


@pytest.mark.parametrize("legacy", [False, True])
def test_tensors_saved_on_cuda_load_on_cpu(tmp_path, weights, legacy):
    src, dst = tmp_path / "cpu.pt", tmp_path / "cuda.pt"
    torch.save(weights, src, _use_new_zipfile_serialization=not legacy)
    as_if_saved_on_cuda(src, dst)
    if not torch.cuda.is_available():  # the file really asks for CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(dst, weights_only=True)
    sd, _ = read_state_dict(dst)
    assert same(sd, weights)
    assert all(v.device.type == "cpu" for v in sd.values())


def test_pickled_module_needs_the_trust_flag(tmp_path):
    path = tmp_path / "whole.pt"
    net = tiny_net()
    torch.save(net, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    text = str(err.value)
    assert "whole pickled model" in text and "torch.nn.modules.container.Sequential" in text
    assert "If you trust where this file came from" in text and "--trust-pickle" in text
    assert "in the app" in text and "never do this for a file from an unknown source" in text

    ckpt = read_checkpoint(path, trust_pickle=True)
    assert isinstance(ckpt.module, nn.Sequential) and ckpt.format == "pickled-module"
    sd, _ = read_state_dict(path, trust_pickle=True)
    assert same(sd, net.state_dict())


def test_other_python_objects_are_named(tmp_path, weights):
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=0.1)}, path)
    found = r"pickled Python objects besides tensors \(first found: argparse.Namespace\)"
    with pytest.raises(CheckpointError, match=found):
        read_state_dict(path)
    sd, _ = read_state_dict(path, trust_pickle=True)  # trusted: the weights are found
    assert same(sd, weights)


def test_truncated_zip_checkpoint(tmp_path, weights):
    good, bad = tmp_path / "good.pt", tmp_path / "cut.pt"
    torch.save({"state_dict": weights}, good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    damaged = r"cut.pt is not a readable PyTorch checkpoint, or it is damaged.*re-download"
    with pytest.raises(CheckpointError, match=damaged):
        read_state_dict(bad)


def test_truncated_legacy_checkpoint(tmp_path, weights):
    good, bad = tmp_path / "good.pt", tmp_path / "cut.pt"
    torch.save(weights, good, _use_new_zipfile_serialization=False)
    bad.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="damaged"):
        read_state_dict(bad)


def test_truncated_safetensors(tmp_path, weights):
    good, bad = tmp_path / "good.safetensors", tmp_path / "cut.safetensors"
    save_file(weights, str(good))
    bad.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="cut.safetensors is not a readable safetensors file"):
        read_state_dict(bad)


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello, I am a text file\n", b"\x80\x02}q\x00."])
def test_random_bytes_and_other_files(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "junk.pth" in str(err.value)


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        read_state_dict(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        read_state_dict(tmp_path)


def test_a_dict_without_weights(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['epoch', 'config'\], but no weights"):
        read_state_dict(path)


def test_weights_saved_next_to_plain_values(tmp_path, weights):
    path = tmp_path / "flat.pt"
    torch.save({**weights, "epoch": 12, "arch": "tiny"}, path)
    sd, _ = read_state_dict(path)
    assert same(sd, weights)


def test_trusted_pickle_whose_class_is_gone(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "gone_net.py").write_text("from torch import nn\nclass GoneNet(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("gone_net")
    path = tmp_path / "gone.pt"
    torch.save(module.GoneNet(2, 2), path)
    (tmp_path / "gone_net.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_net")
    with pytest.raises(CheckpointError, match=r"pickled model whose class cannot be found here.*--model-def"):
        read_checkpoint(path, trust_pickle=True)
