"""A small CNN for Fashion-MNIST (1x28x28), shaped so that phpn can decompose it exactly.

Backbone (conv/BN/ReLU, ending in ReLU, so features are non-negative) -> global average
pooling -> flatten -> one linear layer. The last feature map is 128 channels on a 7x7 grid:

    28x28:  conv 1->32
    14x14:  maxpool, conv 32->64, conv 64->64
     7x7:   maxpool, conv 64->128, conv 128->128 (ReLU)
    pool:   AdaptiveAvgPool2d(1) -> flatten -> Linear(128, num_classes)
"""
from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionCNN(nn.Module):
    """``features`` (B,1,28,28) -> (B,128,7,7) >= 0; ``pool``; ``fc``."""

    num_features = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 32),
            nn.MaxPool2d(2),
            *_block(32, 64), *_block(64, 64),
            nn.MaxPool2d(2),
            *_block(64, 128), *_block(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(128, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))
