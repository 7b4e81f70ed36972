"""The small CNN of the parts benchmark, shaped so that phpn decomposes it exactly.

Backbone (conv/BN/ReLU blocks ending in ReLU, so features are non-negative) -> global
average pooling -> flatten -> one linear layer. Input 3x64x64, final map 128 x 8 x 8:

    64x64: conv3x3 3->32,            maxpool
    32x32: conv3x3 32->64,           maxpool
    16x16: conv3x3 64->128,          maxpool
     8x8:  conv1x1 128->128 (ReLU)
    pool:  AdaptiveAvgPool2d(1) -> flatten -> Linear(128, num_classes)

The receptive field of a final cell is 22 px (its 8 px cell and 7 px around), about one
part: like a bag-of-local-features model, every cell's evidence is local, so the
ground-truth parts are where the model's evidence is. (With one more 3x3 conv at 8x8 the
receptive field grows to 38 px, most of the image, and the feature maps spread over it.)

Trained by ``scripts/train_parts_cnn.py`` on :mod:`phpn.evaluate.synthetic_parts`; the
weights ship in ``assets/parts-benchmark/``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from phpn.errors import CheckpointError
from phpn.images.preprocess import Preprocess
from phpn.models import HeadSplit, LoadedModel
from phpn.resources import assets_dir

ASSET_DIR = assets_dir() / "parts-benchmark"
WEIGHTS_FILE = "parts_cnn.safetensors"
METRICS_FILE = "metrics.json"

# The benchmark images are drawn at 64 px and fed as they are (no resize, no crop).
PREPROCESS = Preprocess(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _block(cin: int, cout: int, kernel: int = 3) -> list:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class PartsCNN(nn.Module):
    """``features`` (B,3,64,64) -> (B,128,8,8) >= 0; ``pool``; ``fc``."""

    num_features = 128

    def __init__(self, num_classes: int = 8, width: tuple = (32, 64, 128, 128)):
        super().__init__()
        w1, w2, w3, w4 = width
        self.features = nn.Sequential(
            *_block(3, w1), nn.MaxPool2d(2),
            *_block(w1, w2), nn.MaxPool2d(2),
            *_block(w2, w3), nn.MaxPool2d(2),
            *_block(w3, w4, kernel=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w4, num_classes)
        self.num_features = w4
        self.width = tuple(width)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


def load_parts_cnn(asset_dir=None) -> PartsCNN:
    """The trained benchmark CNN in eval mode on CPU."""
    asset_dir = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    path = asset_dir / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"The parts-benchmark weights {path} are missing.",
                              "Run `python scripts/train_parts_cnn.py` to train them (about 5 minutes on CPU).")
    meta = {}
    if (asset_dir / METRICS_FILE).is_file():
        meta = json.loads((asset_dir / METRICS_FILE).read_text())
    model = PartsCNN(num_classes=int(meta.get("num_classes", 8)), width=tuple(meta.get("width", (32, 64, 128, 128))))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def parts_cnn_split(model: PartsCNN):
    """The backbone/head contract for :class:`PartsCNN` (exact: ReLU -> mean -> linear)."""
    return HeadSplit(
        backbone=model.features,
        weight=model.fc.weight.detach().clone(),
        bias=model.fc.bias.detach().clone(),
        feature_layer="features",
        head_layer="fc",
        notes=["parts-benchmark CNN: features -> AdaptiveAvgPool2d(1) -> flatten -> fc"],
    )


def load_parts_benchmark(asset_dir=None):
    """(LoadedModel, HeadSplit) of the trained benchmark CNN, ready for discovery."""
    asset_dir = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    model = load_parts_cnn(asset_dir)
    meta = json.loads((asset_dir / METRICS_FILE).read_text()) if (asset_dir / METRICS_FILE).is_file() else {}
    digest = hashlib.sha256((asset_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    loaded = LoadedModel(model=model, arch="parts-benchmark-cnn", num_classes=model.fc.out_features,
                         sha256=digest, preprocess=PREPROCESS, class_names=meta.get("class_names"),
                         source=str(asset_dir / WEIGHTS_FILE))
    return loaded, parts_cnn_split(model)
