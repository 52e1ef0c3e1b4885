"""A model's trainable parameters as views into one flat vector.

Moving to a grid point, theta = theta0 + a*d1 + b*d2, then costs two fused vector
operations over contiguous memory instead of a Python loop over tensors. BatchNorm
running statistics are buffers, not parameters, so they are never moved.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatParameters:
    """Rebinds every parameter of ``model`` to a slice of one contiguous vector."""

    def __init__(self, model: nn.Module):
        self.names = [name for name, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.vector = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for param, size, shape in zip(params, self.sizes, self.shapes):
            param.data = self.vector[offset : offset + size].view(shape)
            offset += size
        self.origin = self.vector.clone()

    def flatten(self, tensors: dict) -> torch.Tensor:
        """Concatenate per-parameter tensors or arrays (keyed by name) in this vector's order,
        on this vector's device and in its dtype."""
        pieces = [torch.as_tensor(tensors[name]).reshape(-1) for name in self.names]
        return torch.cat(pieces).to(self.vector)

    def move_to(self, a: float, d1: torch.Tensor, b: float = 0.0, d2: torch.Tensor | None = None):
        """Set the parameters to ``origin + a*d1 (+ b*d2)`` in place."""
        torch.add(self.origin, d1, alpha=a, out=self.vector)
        if d2 is not None:
            self.vector.add_(d2, alpha=b)


class DirectionPlane:
    """Moves a model to theta0 + a*d1 (+ b*d2) along a surface file's directions."""

    def __init__(self, model: nn.Module, directions: list[dict]):
        self.parameters = FlatParameters(model)
        self.directions = [self.parameters.flatten(d) for d in directions]

    def move_to(self, a: float, b: float = 0.0) -> None:
        d2 = self.directions[1] if len(self.directions) > 1 else None
        self.parameters.move_to(a, self.directions[0], b, d2)
