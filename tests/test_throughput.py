"""The data path: parallel decoding in order, one forward pass for discovery and certificate."""

import pytest
import torch
from conftest import TinyNet, tiny_split
from torch import nn

import phpn.images.batches
import phpn.images.preprocess
from phpn.api import certify_run, open_model, run_discovery
from phpn.errors import ConfigError
from phpn.images.batches import iter_batches, load_batch
from phpn.images.folders import scan_image_folder
from phpn.models import diagnose
from phpn.pipeline.discover import DiscoveryConfig, discover
from phpn.pipeline.features import FeatureTap


def _paths(data):
    return [p for c in data.classes for p in c.paths]


def test_parallel_decoding_keeps_order_and_reports_bad_files(tiny_loaded, image_folder):
    (image_folder / "1" / "broken.png").write_bytes(b"not an image")
    data = scan_image_folder(image_folder, num_classes=4, verify=False)
    paths = _paths(data)
    assert "1/broken.png" in paths
    reference, kept_ref, bad_ref = load_batch(data.root, paths, tiny_loaded.preprocess)
    batches = list(iter_batches(data.root, paths, tiny_loaded.preprocess, batch_size=5, workers=2))
    assert len(batches) == -(-len(paths) // 5)
    assert [p for _, kept, _ in batches for p in kept] == kept_ref == [p for p in paths if p != "1/broken.png"]
    assert torch.equal(torch.cat([b for b, _, _ in batches]), reference)
    skipped = [s for _, _, bad in batches for s in bad]
    assert [s[0] for s in skipped] == [s[0] for s in bad_ref] == ["1/broken.png"]
    assert "not a readable image" in skipped[0][1]


def test_workers_and_batch_size_are_checked(tiny_loaded, image_folder):
    with pytest.raises(ConfigError, match="workers must be 0 or more, got -1"):
        list(iter_batches(image_folder, ["0/img00.png"], tiny_loaded.preprocess, workers=-1))
    with pytest.raises(ConfigError, match="batch size must be at least 1, got 0"):
        list(iter_batches(image_folder, ["0/img00.png"], tiny_loaded.preprocess, batch_size=0))


def test_tap_gives_backbone_features_and_model_logits_in_one_pass(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, num_classes=4)
    x, _, _ = load_batch(data.root, _paths(data)[:10], tiny_loaded.preprocess)
    split = tiny_split(tiny_loaded.model)
    calls = []
    handle = tiny_loaded.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        tap = FeatureTap(split, tiny_loaded.model, torch.device("cpu"))
        feats, logits = tap(x)  # first batch: checked against the backbone
        calls.clear()
        feats, logits = tap(x)
    finally:
        handle.remove()
    assert tap.mode == "one pass" and calls == [1]  # one forward of the model, nothing else
    assert torch.equal(feats, split.backbone(x))
    assert torch.equal(logits, tiny_loaded.model(x))
    assert tap.head_gap < 1e-6


class _FunctionalEnd(TinyNet):
    """The feature map is a function of a layer's output: the function is replayed on it."""

    def forward(self, x):
        return self.fc(torch.relu(self.features(x) - 0.1).mean((2, 3)))


class _InPlaceResidual(TinyNet):
    """The model adds to a layer's output in place after it was caught: copies are caught."""

    def __init__(self):
        super().__init__()
        self.last = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        f = self.features(x)
        out = self.last(f)
        out += f
        return self.fc(out.mean((2, 3)))


class _FromTheInput(TinyNet):
    """The feature map mixes in the input itself: no layer output gives it, so two passes."""

    def forward(self, x):
        return self.fc(torch.relu(self.features(x) + x.mean()).mean((2, 3)))


@pytest.mark.parametrize("cls, mode, copies", [(_FunctionalEnd, "one pass", False), (_InPlaceResidual, "one pass", True),
                                               (_FromTheInput, "two passes (the feature map is computed from the "
                                                               "input directly)", False)])
def test_tap_catches_what_the_backbone_computes_or_says_why_not(cls, mode, copies):
    torch.manual_seed(0)
    model = cls().eval()
    split = diagnose_split(model)
    tap = FeatureTap(split, model, torch.device("cpu"))
    x = torch.randn(3, 3, 16, 16)
    tap(x)
    feats, logits = tap(x)
    assert tap.mode == mode and tap.copy == copies
    assert torch.equal(logits, model(x))
    with torch.no_grad():
        assert float((feats - split.backbone(x)).abs().max()) <= 1e-6


def diagnose_split(model: nn.Module):
    from phpn.head import LoadedModel
    from phpn.images.preprocess import Preprocess

    loaded = LoadedModel(model=model, arch="tiny", num_classes=4, sha256="b" * 64,
                         preprocess=Preprocess(resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3))
    return diagnose(loaded, input_size=(3, 16, 16)).split


def test_certificate_from_the_discovery_pass_equals_a_separate_certificate(monkeypatch):
    session = open_model(demo="fashion-mnist")
    from phpn.demos import get_demo

    data = scan_image_folder(get_demo("fashion-mnist").discovery_dir(), class_names=session.loaded.class_names,
                             num_classes=10, images_per_class=6)
    decoded = []
    real = phpn.images.preprocess.load_image
    monkeypatch.setattr(phpn.images.batches, "load_image", lambda src: decoded.append(str(src)) or real(src))
    config = DiscoveryConfig(k=2, images_per_class=6, device="cpu", lbfgs_iter=5)
    run = run_discovery(session, data, config, workers=0)
    # Every image decoded once, plus the probe of the feature-map shape: no second pass.
    assert len(decoded) == 60 + 1
    cert = run.meta["certificate"]
    assert cert["pass"] == "one pass" and cert["images"] == 60 and cert["passed"]
    separate = certify_run(session, run, data, 64, "cpu").to_dict()
    for field in ("images", "agreed", "labelled_images", "correct", "max_abs_logit", "max_head_error"):
        assert cert[field] == separate[field], field
    assert cert["max_logit_diff"] == pytest.approx(separate["max_logit_diff"], abs=1e-6)


def test_held_out_images_get_their_own_certificate(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, num_classes=4, images_per_class=4)
    held = scan_image_folder(image_folder, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, DiscoveryConfig(k=2, device="cpu"),
                   certify=True, held_out=held, workers=0)
    assert run.meta["certificate"]["images"] == 16 and run.meta["certificate"]["passed"]
    assert run.meta["certificate_held_out"]["images"] == 48 and run.meta["certificate_held_out"]["passed"]
    assert run.meta["certificate_held_out"]["labelled_images"] == 48


def test_cli_classes_subset_and_memory_budget(tmp_path, capsys):
    import json

    from phpn.api import resolve_classes as _class_list
    from phpn.cli import main

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert _class_list("0,5-7,Bag,5", names) == (0, 5, 6, 7, 8)
    assert _class_list(None, names) is None
    assert main(["discover", "--demo", "fashion-mnist", "--images-per-class", "2", "--classes", "12",
                 "--out", str(tmp_path / "bad"), "--json", "--quiet"]) == 2
    assert "Unknown class '12'" in capsys.readouterr().err
    assert main(["discover", "--demo", "fashion-mnist", "--images-per-class", "2", "--classes", "1,Bag",
                 "--memory-budget", "0", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == 2 and report["certificate"]["images"] == 4 and report["certificate"]["passed"]
    from phpn.runs.store import load_run

    run = load_run(tmp_path / "run")
    assert run.class_indices.tolist() == [1, 8] and run.meta["groups"] == 2
    assert not (tmp_path / ".run.progress").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_pass_certificate_on_cuda_with_decoding_workers(tiny_loaded, image_folder):
    data = scan_image_folder(image_folder, num_classes=4)
    split = tiny_split(tiny_loaded.model)
    config = DiscoveryConfig(k=2, device="cuda", memory_budget_mb=0)
    run = discover(tiny_loaded, split, data, tiny_loaded.preprocess, config, certify=True, workers=2)
    cert = run.meta["certificate"]
    assert cert["pass"] == "one pass" and cert["images"] == 48 and cert["passed"]
    tiny_loaded.model.cpu()
    separate = discover(tiny_loaded, tiny_split(tiny_loaded.model), data, tiny_loaded.preprocess,
                        DiscoveryConfig(k=2, device="cpu", memory_budget_mb=0), certify=True, workers=0)
    assert separate.meta["certificate"]["agreed"] == cert["agreed"] == 48


def test_a_decoding_worker_that_dies_gets_a_clear_message(tiny_loaded, image_folder, monkeypatch):
    import os
    import signal

    from phpn.errors import DataError

    # A worker killed by the kernel, as a container's full /dev/shm does (SIGBUS).
    monkeypatch.setattr(phpn.images.batches, "load_image", lambda src: os.kill(os.getpid(), signal.SIGBUS))
    with pytest.raises(DataError, match="The image-decoding workers stopped .*--workers 0.*--shm-size"):
        list(iter_batches(image_folder, [f"0/img{i:02d}.png" for i in range(8)], tiny_loaded.preprocess,
                          batch_size=2, workers=1))


class _Untraceable(TinyNet):
    """Control flow on the input defeats torch.fx: the split is read from layer hooks instead."""

    def forward(self, x):
        if float(x.abs().sum()) > 0:
            x = x * 1.0
        return self.fc(self.features(x).mean((2, 3)))


def test_tap_on_a_backbone_read_from_layer_hooks():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    split = diagnose_split(model)
    assert type(split.backbone).__name__ == "HookedBackbone"
    tap = FeatureTap(split, model, torch.device("cpu"))
    x = torch.randn(3, 3, 16, 16)
    tap(x)
    feats, logits = tap(x)
    assert tap.mode == "one pass"
    assert torch.equal(logits, model(x)) and torch.equal(feats, split.backbone(x))


def test_default_workers_share_the_cores_among_local_ranks(monkeypatch):
    from phpn.images.batches import default_workers

    monkeypatch.setattr(phpn.images.batches.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 3
    monkeypatch.setattr(phpn.images.batches.os, "sched_getaffinity", lambda pid: {0})
    assert default_workers() == 0


class _SmallMemoryNet(TinyNet):
    """A TinyNet whose forward runs out of (GPU) memory on more than ``fits`` images at once."""

    fits = 3

    def forward(self, x):
        if len(x) > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {len(x)} images")
        return super().forward(x)


def test_tap_halves_a_batch_that_runs_out_of_memory_and_keeps_the_size_that_fitted():
    torch.manual_seed(0)
    model = _SmallMemoryNet().eval()
    tap = FeatureTap(tiny_split(model), model, torch.device("cpu"))
    images = torch.randn(10, 3, 16, 16)
    feats, logits = tap(images)
    assert tap.max_batch == 3  # 10 -> 5 -> 3 images per pass
    with torch.no_grad():
        assert torch.allclose(logits, TinyNet.forward(model, images), atol=1e-6)
        assert torch.allclose(feats, model.features(images), atol=1e-6)
    assert tap(images[:7])[1].shape == (7, 4)  # later batches are cut at once
    model.fits = 0  # a single image that does not fit is the user's problem to hear about
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tap(images[:1])
