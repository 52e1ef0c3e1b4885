"""The CIFAR ResNets of Li et al. (2018): ResNet-20/56/110, their no-shortcut twins, WRN-56-k.

He et al.'s CIFAR design: a 3x3 stem, three stages of ``n`` basic blocks at widths
16k, 32k, 64k (k = 1 except for wide nets), stride 2 between stages, global average
pooling, one linear layer. Depth = 6n + 2. ``shortcut=False`` removes the identity
paths, which Li et al. use to show how shortcuts keep the landscape convex. Any input
size works (8x8 digits to 32x32 CIFAR): the pooling is global.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, optionally with a (projected) identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.use_shortcut = shortcut
        self.shortcut = nn.Sequential()
        if shortcut and (stride != 1 or in_planes != planes):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.use_shortcut:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images, width multiplier ``k``."""

    def __init__(
        self,
        depth: int,
        input_shape: tuple,
        num_classes: int,
        shortcut: bool = True,
        width: int = 1,
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        in_channels = input_shape[0]
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for stage, planes in enumerate(widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet_factory(depth: int, shortcut: bool = True, width: int = 1):
    """A zoo entry ``(input_shape, num_classes, **kwargs) -> CifarResNet``."""

    def build(input_shape: tuple, num_classes: int, **kwargs) -> CifarResNet:
        return CifarResNet(depth, input_shape, num_classes, shortcut, width, **kwargs)

    return build
