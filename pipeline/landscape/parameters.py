"""A model's trainable parameters (and any buffers a direction moves) as one flat vector.

Moving to a grid point, theta = theta0 + a*d1 + b*d2, then costs a few fused vector
operations over contiguous memory instead of a Python loop over tensors. The sum is
formed in float64 and rounded once to the model's dtype: theta0 + 1 * (theta_B -
theta0) is then exactly theta_B, so an interpolation's end point is the checkpoint
itself, bit for bit. BatchNorm running statistics are buffers: they move only when a
direction names them (interpolation between two checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class FlatParameters:
    """Rebinds every parameter of ``model``, and the named ``buffers``, to a slice of one
    contiguous vector."""

    def __init__(self, model: nn.Module, buffers: Iterable[str] = ()):
        tensors = dict(model.named_parameters())
        wanted = set(buffers)
        tensors.update((name, b) for name, b in model.named_buffers() if name in wanted)
        self.names = list(tensors)
        self.shapes = [t.shape for t in tensors.values()]
        self.sizes = [t.numel() for t in tensors.values()]
        self.vector = torch.cat([t.detach().reshape(-1) for t in tensors.values()])
        offset = 0
        for tensor, size, shape in zip(tensors.values(), self.sizes, self.shapes):
            tensor.data = self.vector[offset : offset + size].view(shape)
            offset += size
        self.origin = self.vector.to(torch.float64, copy=True)

    def flatten(self, tensors: dict) -> torch.Tensor:
        """Concatenate per-tensor values (keyed by name) in this vector's order, in float64
        on this vector's device."""
        pieces = [torch.as_tensor(tensors[name]).reshape(-1) for name in self.names]
        return torch.cat(pieces).to(self.vector.device, torch.float64)

    def reset(self) -> None:
        """Back to the origin, exactly."""
        self.vector.copy_(self.origin)

    def move_to(self, a: float, d1: torch.Tensor, b: float = 0.0, d2: torch.Tensor | None = None):
        """Set the tensors to ``origin + a*d1 (+ b*d2)`` in place (d1, d2 from ``flatten``)."""
        position = torch.add(self.origin, d1, alpha=a)
        if d2 is not None:
            position.add_(d2, alpha=b)
        self.vector.copy_(position)


class DirectionPlane:
    """Moves a model to theta0 + a*d1 (+ b*d2) along a surface file's directions."""

    def __init__(self, model: nn.Module, directions: list[dict]):
        parameters = {name for name, _ in model.named_parameters()}
        self.parameters = FlatParameters(model, buffers=set(directions[0]) - parameters)
        self.directions = [self.parameters.flatten(d) for d in directions]

    def move_to(self, a: float, b: float = 0.0) -> None:
        d2 = self.directions[1] if len(self.directions) > 1 else None
        self.parameters.move_to(a, self.directions[0], b, d2)
