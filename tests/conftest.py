"""Shared fixtures: tiny seeded models and a tiny image folder, built in the test.

Every test runs with outbound network connections refused (loopback stays open for the
app's own server), so nothing can download weights or data behind our back.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from phpn.head import HeadSplit, LoadedModel
from phpn.images.preprocess import Preprocess


class TinyNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> global mean -> linear: decomposes exactly."""

    def __init__(self, num_classes: int = 4, channels: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def tiny_split(model: TinyNet) -> HeadSplit:
    return HeadSplit(backbone=model.features, weight=model.fc.weight.detach(), bias=model.fc.bias.detach(),
                     feature_layer="features", head_layer="fc")


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_loaded(tiny_model):
    pre = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return LoadedModel(model=tiny_model, arch="tiny", num_classes=4, sha256="a" * 64, preprocess=pre,
                       class_names=["red", "green", "blue", "grey"], source="test")


@pytest.fixture
def image_folder(tmp_path):
    """4 class folders of 12 small random images each, coloured by class."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    tints = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]
    for c, tint in enumerate(tints):
        folder = root / f"{c}"
        folder.mkdir(parents=True)
        for i in range(12):
            arr = np.clip(rng.normal(0, 60, (20, 20, 3)) + np.array(tint), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    return root


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family == socket.AF_UNIX or host in _LOOPBACK:
            return real_connect(sock, address)
        raise AssertionError(f"a test tried to reach {address}: phpn must work offline")

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_small_models(request):
    """Tiny models on a shared 2-core machine: OpenMP threads spinning cost more than they save."""
    if not request.module.__name__.startswith("test_models_"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Browser tests start a Streamlit server and Chromium: all of them belong to the slow tier
    (``pytest -m "not slow"`` leaves them out)."""
    for item in items:
        if _E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)
