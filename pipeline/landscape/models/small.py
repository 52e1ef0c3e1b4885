"""Small networks for the built-in data sets and for tests with dense Hessians."""

from __future__ import annotations

import math

from torch import nn


class Linear(nn.Module):
    """A single affine map: with MSE loss its landscape is an exact quadratic."""

    def __init__(self, input_shape: tuple, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Fully connected network; ``hidden`` lists the layer widths. ``activation``: relu,
    or a smooth one (tanh, gelu), whose loss is twice differentiable everywhere."""

    def __init__(self, input_shape: tuple, num_classes: int, hidden=(64, 64), activation="relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise TypeError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        widths = [math.prod(input_shape), *hidden]
        layers = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU layers, global pooling and a linear layer (1D or 2D inputs)."""

    def __init__(self, input_shape: tuple, num_classes: int, channels=(16, 32)):
        super().__init__()
        conv, norm = (
            (nn.Conv1d, nn.BatchNorm1d)
            if len(input_shape) == 2
            else (
                nn.Conv2d,
                nn.BatchNorm2d,
            )
        )
        pool = nn.AdaptiveAvgPool1d if len(input_shape) == 2 else nn.AdaptiveAvgPool2d
        layers, in_channels = [], input_shape[0]
        for out_channels in channels:
            layers += [
                conv(in_channels, out_channels, 3, padding=1, bias=False),
                norm(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        layers += [pool(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
