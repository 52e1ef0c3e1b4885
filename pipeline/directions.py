"""Plotting directions: seeded Gaussian vectors scaled filter-wise (Li et al. 2018, section 4).

A random direction d has one entry per parameter. Raw Gaussian directions are
meaningless across networks because the loss is invariant to the scale of a ReLU
layer's weights; Li et al. therefore rescale each *filter* of d to the norm of the
matching filter of theta:  d_ij <- d_ij / ||d_ij|| * ||theta_ij||.  A filter is one
slice along the first (output) dimension: a conv output channel, or one output
neuron's row of a linear layer. Other normalizations: ``layer`` (whole tensor),
``weight`` (elementwise, d * |theta|) and ``none``.

1-D tensors (biases, BatchNorm weight and bias) are set to zero by default
(``ignore: biasbn``); when kept they are normalized as a single filter.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import DirectionsConfig


def random_directions(
    model: nn.Module, config: DirectionsConfig, count: int
) -> list[dict[str, torch.Tensor]]:
    """``count`` normalized directions, float64, keyed by parameter name.

    One generator seeded with ``config.seed`` draws the directions one after the
    other, so a 1D and a 2D plan with the same seed share their first direction.
    """
    generator = torch.Generator().manual_seed(config.seed)
    theta = {name: p.detach().to("cpu", torch.float64) for name, p in model.named_parameters()}
    directions = []
    for _ in range(count):
        raw = {
            name: torch.randn(w.shape, generator=generator, dtype=torch.float64)
            for name, w in theta.items()
        }
        directions.append(
            {
                name: normalize(raw[name], w, config.normalization, config.ignore)
                for name, w in theta.items()
            }
        )
    return directions


def ignored_parameters(model: nn.Module, ignore: str) -> list[str]:
    """Names of the parameters a direction leaves at zero."""
    if ignore == "none":
        return []
    return [name for name, p in model.named_parameters() if p.dim() <= 1]


def normalize(
    direction: torch.Tensor, weights: torch.Tensor, how: str, ignore: str
) -> torch.Tensor:
    """Rescale one parameter's direction to the scale of its weights."""
    if weights.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(direction)
        return _scale_to(direction, weights) if how != "none" else direction
    if how == "filter":
        return torch.stack([_scale_to(d, w) for d, w in zip(direction, weights)])
    if how == "layer":
        return _scale_to(direction, weights)
    if how == "weight":
        return direction * weights.abs()
    return direction


def _scale_to(direction: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return direction * (weights.norm() / direction.norm())
