"""The planted-shortcut case's classifier: three conv layers, global average pooling, one linear layer.

Built by ``scripts/planted_shortcut.py``; open a checkpoint with
``--model-def assets/shortcut/tiny_cnn.py:TinyCNN``.
"""
from torch import nn


class TinyCNN(nn.Module):
    """(B, 1, 28, 28) -> features (B, 32, 7, 7) >= 0 -> mean over positions -> Linear(32, classes)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))
