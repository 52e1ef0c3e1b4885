"""Plotting directions: what each kind computes, and how its vectors are scaled.

A direction d has one entry per parameter. Kinds (``directions.kind``):

- ``random``: seeded Gaussian vectors (Li et al. section 4). Raw Gaussian directions
  are meaningless across networks because the loss is invariant to the scale of a ReLU
  layer's weights, so each *filter* of d is rescaled to the norm of the matching filter
  of theta: d_ij <- d_ij / ||d_ij|| * ||theta_ij|| (a filter is one slice along the
  output dimension: a conv output channel, or one output neuron's row).
- ``pca``: the principal directions of a training trajectory (:mod:`landscape.trajectory`).
- ``hessian``: unit eigenvectors of the Hessian at theta (Boettcher & Wheeler): the
  only directions along which a 2D slice shows the true principal curvatures, saddles
  included (rescaled, they would be eigenvectors no more: their normalization stays
  ``unit``). A random slice's curvature at the centre is d^T H d. Only for d uniform on
  the unit sphere is its mean tr(H)/n (what ``landscape trace`` samples); a
  filter-normalized d (u_f uniform on the unit sphere of filter f, times ||theta_f||)
  has E[d^T H d] = sum_f ||theta_f||^2 / m_f * tr(H_ff), with m_f the filter's size and
  H_ff its diagonal block: a trace weighted by each filter's mean squared weight (and 0
  for ignored tensors), not tr(H)/n.
- ``target``, ``interpolation``, ``file``: read from files (:mod:`landscape.direction_files`).

Scaling (``normalization``): ``filter``, ``layer`` (whole tensor), ``weight``
(elementwise, d * |theta|), ``unit`` (the whole vector to length 1) or ``none``.
1-D tensors (biases, BatchNorm and LayerNorm weight and bias) are set to zero with
``ignore: biasbn``; when kept they are normalized as a single filter. An embedding
(tokens, width) has one filter per token row. The filters of ``transformers``' Conv1D
(GPT-2's linear layers, whose weight is stored (inputs, outputs)) are its columns
(:func:`filter_axes`). A parameter shared by two modules (tied input and output
embeddings) is one entry, under the name ``named_parameters`` gives it: one direction,
added once.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from landscape.config import DirectionsConfig, ExperimentConfig
from landscape.curvature.lanczos import Criterion, lanczos
from landscape.curvature.operators import GaugeProjection
from landscape.direction_files import (
    checkpoint_differences,
    file_directions,
    load_target,
    variance_range,
    weight_histograms,
)
from landscape.experiment import Experiment
from landscape.hessian import seeded_hessian
from landscape.trajectory import trajectory_files, trajectory_pca

log = logging.getLogger(__name__)

SCALINGS = {
    "filter": "filter-normalized",
    "layer": "layer-normalized",
    "weight": "weight-normalized",
    "unit": "unit length",
    "none": "unnormalized",
}


@dataclass
class Directions:
    """The vectors of a plan and what the surface file records beside them."""

    vectors: list[dict[str, torch.Tensor]]  # float64, one per axis
    axes: list[dict]  # per axis: a "label" for plots and what the kind measured
    groups: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # name: (data, attrs)
    frame: np.ndarray | None = None  # points an automatic grid must enclose


def plan_directions(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    """The ``count`` directions ``config.directions`` asks for, scaled as it says."""
    settings = config.directions
    planned = BUILDERS[settings.kind](experiment, config, count)
    theta = parameter_values(experiment.model)
    axes = filter_axes(experiment.model)
    planned.vectors = [
        scale_direction(d, theta, settings.normalization, settings.ignore, axes)
        for d in planned.vectors
    ]
    return planned


def random_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    vectors = gaussian_directions(experiment.model, config.directions.seed, count)
    scaling = scaling_note(config.directions)
    return Directions(
        vectors, [{"label": f"{axis}: random direction ({scaling})"} for axis in "xy"]
    )


def gaussian_directions(model: nn.Module, seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` raw Gaussian directions, float64, keyed by parameter name.

    One generator seeded with ``seed`` draws the directions one after the other, so a
    1D and a 2D plan with the same seed share their first direction.
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return [
        {
            name: torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in shapes.items()
        }
        for _ in range(count)
    ]


def random_directions(
    model: nn.Module, config: DirectionsConfig, count: int
) -> list[dict[str, torch.Tensor]]:
    """``count`` Gaussian directions scaled as ``config`` says (what a random plan holds)."""
    theta = parameter_values(model)
    axes = filter_axes(model)
    return [
        scale_direction(raw, theta, config.normalization, config.ignore, axes)
        for raw in gaussian_directions(model, config.seed, count)
    ]


def pca_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    """Li et al. section 7: the top principal directions of [theta_i - theta_n], the
    trajectory's coordinates in them, and the explained variance of each axis."""
    model, settings = experiment.model, config.directions
    ignored = set(ignored_parameters(model, settings.ignore))
    kept = [name for name, _ in model.named_parameters() if name not in ignored]
    files = trajectory_files(settings.checkpoints)
    path = trajectory_pca(parameter_values(model), files, kept, count, config.model)
    ratios = path.explained_variance_ratio
    log.info(
        "PCA of %d checkpoints: explained variance %s",
        len(files),
        ", ".join(f"{r:.1%}" for r in ratios),
    )
    axes = [
        {
            "label": f"{axis}: PCA-{j + 1} ({ratio:.1%} of the path's variance)",
            "explained_variance_ratio": ratio,
        }
        for j, (axis, ratio) in enumerate(zip("xy", ratios))
    ]
    trajectory = {
        "coordinates": path.coordinates,
        "epochs": path.epochs,
        "lr": path.lr,
        "lr_drop": path.lr_drops.astype(np.uint8),
    }
    attrs = {"checkpoints": [str(f) for f in files], "explained_variance_ratio": ratios}
    vectors = [{k: torch.from_numpy(v) for k, v in d.items()} for d in path.directions]
    return Directions(vectors, axes, {"trajectory": (trajectory, attrs)}, path.coordinates)


def hessian_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    """Boettcher & Wheeler: unit eigenvectors of the training-loss Hessian at theta, of
    lambda_max and lambda_min (``extremes``) or of the two largest (``top``), by Lanczos
    from a seeded start to ``hessian.tolerance`` within ``hessian.max_hvps`` products.
    Without biases and BN scales (``ignore: biasbn``) it is the Hessian of the weights.
    A softmax classifier's gauge directions, along which the loss never changes, are
    projected out (:class:`~landscape.curvature.operators.GaugeProjection`): lambda_min's
    eigenvector is then a direction the model's function feels, also where H is
    semidefinite."""
    settings, solver = config.directions, config.hessian
    parameters = "weights" if settings.ignore == "biasbn" else "all"
    operator, start = seeded_hessian(
        experiment, parameters, solver.hvp, settings.seed, solver.max_hvps
    )
    gauge = GaugeProjection.find(operator)
    if gauge is not None:
        log.info(
            "Hessian directions: %d softmax gauge directions of layer %r projected out",
            gauge.count,
            gauge.layer,
        )
    which = ((-1, 0) if settings.eigenvectors == "extremes" else (-1, -2))[:count]
    names = ("λmax", "λmin") if settings.eigenvectors == "extremes" else ("λ1", "λ2")
    criterion = Criterion.for_dtype(solver.tolerance, operator.torch_dtype)
    pairs = lanczos(operator.hvp, start, criterion, solver.max_hvps, which, gauge)
    if not pairs.converged:
        log.warning(
            "Hessian directions not converged to hessian.tolerance %.1e in %d HVPs "
            "(residuals %s); raise hessian.max_hvps for exact eigenvectors",
            solver.tolerance,
            pairs.hvps,
            ", ".join(f"{r:.2e}" for r in pairs.residuals),
        )
    log.info(
        "Hessian directions: %s in %d HVPs",
        ", ".join(f"{n} = {v:.6g}" for n, v in zip(names, pairs.values)),
        pairs.hvps,
    )
    shapes = {name: p.shape for name, p in experiment.model.named_parameters()}
    vectors = []
    for vector in pairs.vectors.cpu():
        direction = {
            name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()
        }
        pieces = vector.split(operator.sizes)
        direction.update((n, p.view(s)) for n, p, s in zip(operator.names, pieces, operator.shapes))
        vectors.append(direction)
    projected = gauge is not None and "λmin" in names
    axes = [
        {
            "label": f"{axis}: Hessian eigenvector, {name} = {value:.4g}"
            + (" (softmax gauge projected out)" if projected and name == "λmin" else "")
            + ("" if pairs.converged else " (not converged)"),
            "eigenvalue": value,
            "residual": residual,
            "criterion": Criterion.TEXT,
            "tolerance": solver.tolerance,
            "rounding_floor": criterion.floor,
            "gauge_directions_projected": 0 if gauge is None else gauge.count,
            "converged": pairs.converged,
            "hvps": pairs.hvps,
        }
        for axis, name, value, residual in zip("xy", names, pairs.values, pairs.residuals)
    ]
    return Directions(vectors, axes)


def checkpoint_names(paths: list[str]) -> list[str]:
    """Names for checkpoint ``paths`` in axis labels: their shortest trailing parts, of one
    length, that tell them apart.

    File names alone where those differ (``epoch_002.pt``, ``epoch_006.pt``); folders are
    added from the right as needed, so runs that share file names stay apart
    (``bs64/epoch_006.pt``, ``bs256/epoch_006.pt``). Paths that no suffix separates (one
    file named twice) keep their file names.
    """
    parts = [Path(path).parts for path in paths]
    for length in range(1, max(map(len, parts)) + 1):
        names = [Path(*path[-length:]).as_posix() for path in parts]
        if len(set(names)) == len(names):
            return names
    return [Path(path).name for path in paths]


def target_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    """d = theta_B - theta_0 per axis (Li et al. Fig. 8b, Goodfellow et al.)."""
    targets = config.directions.targets
    scaling = scaling_note(config.directions)
    axes = [
        {"label": f"{axis}: toward {name} (θB − θ0, {scaling})", "target": target}
        for axis, target, name in zip("xy", targets, checkpoint_names(targets))
    ]
    states = [load_target(experiment.model, path, config.model) for path in targets]
    return Directions(checkpoint_differences(experiment.model, states, False), axes)


def interpolation_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    """(1 - a) theta_A + a theta_B with BN statistics (Li et al. section 5), and both
    ends' weight histograms and norms, which often explain such plots better."""
    (target,) = config.directions.targets
    source = config.model.checkpoint
    source_name, target_name = checkpoint_names([source, target])
    label = f"α: (1 − α)·θA + α·θB, A = {source_name}, B = {target_name}"
    state = load_target(experiment.model, target, config.model)
    histograms, norms = weight_histograms(experiment.model, state)
    (difference,) = checkpoint_differences(experiment.model, [state], True)
    low, high = variance_range(difference, experiment.model)
    if config.grid.x.min < low or config.grid.x.max > high:
        log.warning(
            "interpolation: BatchNorm running variances are negative for α < %.3g or α > %.3g;"
            " the loss and accuracy are undefined (NaN) there",
            low,
            high,
        )
    ends = {**norms, "checkpoints": [source, target], "defined_alpha": [low, high]}
    return Directions(
        [difference], [{"label": label, "target": target}], {"endpoints": (histograms, ends)}
    )


def file_plane(experiment: Experiment, config: ExperimentConfig, count: int) -> Directions:
    path = config.directions.file
    scaling = scaling_note(config.directions)
    axes = [
        {"label": f"{axis}: direction {axis} of {Path(path).name} ({scaling})"} for axis in "xy"
    ]
    return Directions(file_directions(experiment.model, path, count), axes)


BUILDERS = {
    "random": random_plane,
    "pca": pca_plane,
    "hessian": hessian_plane,
    "target": target_plane,
    "interpolation": interpolation_plane,
    "file": file_plane,
}


def scaling_note(settings: DirectionsConfig) -> str:
    """E.g. ``filter-normalized, biases/BN zero``."""
    note = SCALINGS[settings.normalization]
    return note + (", biases/BN zero" if settings.ignore == "biasbn" else "")


def parameter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` as float64 on the CPU."""
    return {name: p.detach().to("cpu", torch.float64) for name, p in model.named_parameters()}


def ignored_parameters(model: nn.Module, ignore: str) -> list[str]:
    """Names of the parameters a direction leaves at zero."""
    if ignore == "none":
        return []
    return [name for name, p in model.named_parameters() if p.dim() <= 1]


def filter_axes(model: nn.Module) -> dict[str, int]:
    """The parameters whose filters (one per output) lie along another axis than 0, with
    that axis: 1 for the weight of ``transformers``' Conv1D, stored (inputs, outputs).
    Looked up without importing ``transformers``: a model can hold a Conv1D only once
    the module defining it is loaded."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is None:
        return {}
    return {
        f"{name}.weight" if name else "weight": 1
        for name, module in model.named_modules()
        if isinstance(module, conv1d)
    }


def scale_direction(
    direction: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    how: str,
    ignore: str,
    axes: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero the ignored tensors and scale the rest (see the module docstring); ``axes``:
    the filter axis of the parameters where it is not 0 (:func:`filter_axes`). Entries
    that are not parameters (an interpolation's BN statistics) are left as they are."""
    per_tensor = "none" if how == "unit" else how
    axes = axes or {}
    scaled = {
        name: normalize(d, theta[name], per_tensor, ignore, axes.get(name, 0))
        if name in theta
        else d
        for name, d in direction.items()
    }
    if how == "unit":
        length = torch.sqrt(sum((d**2).sum() for d in scaled.values()))
        scaled = {name: d / length for name, d in scaled.items()}
    return scaled


def normalize(
    direction: torch.Tensor, weights: torch.Tensor, how: str, ignore: str, axis: int = 0
) -> torch.Tensor:
    """Rescale one parameter's direction to the scale of its weights; ``axis``: the one
    along which its filters lie."""
    if weights.dim() <= 1:
        if ignore == "biasbn":
            return torch.zeros_like(direction)
        return _scale_to(direction, weights) if how != "none" else direction
    if how == "filter":
        filters = zip(direction.unbind(axis), weights.unbind(axis))
        return torch.stack([_scale_to(d, w) for d, w in filters], dim=axis)
    if how == "layer":
        return _scale_to(direction, weights)
    if how == "weight":
        return direction * weights.abs()
    return direction


def _scale_to(direction: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    length = direction.norm()
    return direction * (weights.norm() / length) if length > 0 else direction
