"""A model's trainable parameters (and any buffers a direction moves) as one flat vector.

Moving to a grid point, theta = theta0 + a*d1 + b*d2, then costs a few fused vector
operations over contiguous memory instead of a Python loop over tensors. The sum is
formed in float64 and rounded once to the model's dtype: theta0 + 1 * (theta_B -
theta0) is then exactly theta_B, so an interpolation's end point is the checkpoint
itself, bit for bit. BatchNorm running statistics are buffers: they move only when a
direction names them (interpolation between two checkpoints).

Each tensor keeps the memory layout it had: a convolution weight in channels-last
memory (evaluation.channels_last) occupies its slice in (out, height, width, in) order,
and per-tensor values (directions) are flattened in that same order, so the slice's view
is channels-last again and the conv kernels need no conversion.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# A 4-D tensor in channels-last memory is stored as its permute(CHANNELS_LAST) is laid
# out contiguously; INVERSE brings such a stored block back to (N, C, H, W).
CHANNELS_LAST, INVERSE = (0, 2, 3, 1), (0, 3, 1, 2)


def channels_last(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is laid out channels-last (and not also contiguous, as a tensor
    with one channel or a 1 x 1 image is)."""
    return (
        tensor.dim() == 4
        and tensor.is_contiguous(memory_format=torch.channels_last)
        and not tensor.is_contiguous()
    )


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
        self.layouts = {name: channels_last(t) for name, t in tensors.items()}
        self.vector = self.concatenate(tensors)
        for tensor, view in zip(tensors.values(), self.unflatten(self.vector).values()):
            tensor.data = view
        self.origin = self.vector.to(torch.float64, copy=True)
        self.position = torch.empty_like(self.origin)  # theta in float64, reused per point

    def concatenate(self, tensors: dict) -> torch.Tensor:
        """Per-tensor values (keyed by name) as one vector, each in its slice's memory order."""
        pieces = []
        for name in self.names:
            value = torch.as_tensor(tensors[name]).detach()
            if self.layouts[name]:
                value = value.permute(CHANNELS_LAST)
            pieces.append(value.reshape(-1))
        return torch.cat(pieces)

    def unflatten(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``vectors`` (shape (..., n), laid out as this vector) as the named
        tensors, each of shape (...) + its shape, in its layout."""
        lead = vectors.shape[:-1]
        kept = tuple(range(len(lead)))
        views, offset = {}, 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes):
            piece = vectors[..., offset : offset + size]
            if self.layouts[name]:
                stored = [shape[axis] for axis in CHANNELS_LAST]
                order = kept + tuple(len(lead) + axis for axis in INVERSE)
                views[name] = piece.reshape(*lead, *stored).permute(order)
            else:
                views[name] = piece.reshape(*lead, *shape)
            offset += size
        return views

    def flatten(self, tensors: dict) -> torch.Tensor:
        """Concatenate per-tensor values (keyed by name) in this vector's order, in float64
        on this vector's device."""
        return self.concatenate(tensors).to(self.vector.device, torch.float64)

    def reset(self) -> None:
        """Back to the origin, exactly."""
        self.vector.copy_(self.origin)

    def move_to(self, a: float, d1: torch.Tensor, b: float = 0.0, d2: torch.Tensor | None = None):
        """Set the tensors to ``origin + a*d1 (+ b*d2)`` in place (d1, d2 from ``flatten``).

        Three kernels on the vectors' device and nothing the host waits for: ``a`` and
        ``b`` travel as kernel arguments (Python floats; a tensor coordinate would have
        to be read back first), the float64 sum goes into a buffer kept from the last
        point, and the rounding copy into the model's dtype stays on the device."""
        torch.add(self.origin, d1, alpha=float(a), out=self.position)
        if d2 is not None:
            self.position.add_(d2, alpha=float(b))
        self.vector.copy_(self.position)


class DirectionPlane:
    """Moves a model to theta0 + a*d1 (+ b*d2) along a surface file's directions."""

    def __init__(self, model: nn.Module, directions: list[dict]):
        parameters = {name for name, _ in model.named_parameters()}
        self.parameters = FlatParameters(model, buffers=set(directions[0]) - parameters)
        self.directions = [self.parameters.flatten(d) for d in directions]

    def move_to(self, a: float, b: float = 0.0) -> None:
        """The model at theta0 + a*d1 (+ b*d2), without a host synchronization
        (:meth:`FlatParameters.move_to`; tests/test_cuda.py checks it on a GPU)."""
        d2 = self.directions[1] if len(self.directions) > 1 else None
        self.parameters.move_to(a, self.directions[0], b, d2)
