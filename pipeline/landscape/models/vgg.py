"""VGG-9 as in Li et al. (2018): seven 3x3 conv-BN-ReLU layers and two linear layers.

Max-pooling halves the image after each stage only while it is larger than 1x1, so the
same network runs on 8x8 digits and 32x32 CIFAR-10.
"""

from __future__ import annotations

from torch import nn

VGG9_STAGES = ((64,), (128,), (256, 256), (512, 512), (512,))


class VGG(nn.Module):
    """Conv stages with BatchNorm, then a two-layer classifier."""

    def __init__(self, input_shape: tuple, num_classes: int, stages=VGG9_STAGES, hidden=512):
        super().__init__()
        in_channels, size = input_shape[0], input_shape[-1]
        layers = []
        for stage in stages:
            for channels in stage:
                layers += [
                    nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = channels
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
