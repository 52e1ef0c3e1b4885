"""Directions read from files: other checkpoints (target, interpolation) and user tensors.

``target``: d = theta_B - theta_0 (Li et al. section 7, Goodfellow et al.), parameters
only, so a = 1 puts the weights of B on theta_0's BatchNorm statistics.
``interpolation``: the same difference over the parameters *and* the floating-point
buffers (BatchNorm running mean and variance, as Li et al. section 5 include them), so
a = 0 is checkpoint A and a = 1 is checkpoint B, whole.
``file``: tensors the user saved, a dict per axis keyed by parameter name, checked
against the model before anything is planned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from landscape.checkpoint import check_compatible, check_finite, load_state_dict, read_torch_file
from landscape.config import ModelConfig
from landscape.errors import UserError, describe

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 80


def load_target(model: nn.Module, path: str, settings: ModelConfig) -> dict:
    """A target checkpoint's state_dict, read as ``settings`` (the config's model section)
    says and checked against ``model``."""
    state = load_state_dict(path, model.state_dict(), settings, "directions.targets")
    check_compatible(model, state, path, "directions.targets")
    return state


def checkpoint_differences(
    model: nn.Module, targets: list[dict], with_buffers: bool
) -> list[dict[str, torch.Tensor]]:
    """theta_B - theta_0 in float64 for each target state_dict B."""
    origin = moved_tensors(model.state_dict(), model, with_buffers)
    differences = []
    for state in targets:
        target = moved_tensors(state, model, with_buffers)
        differences.append({name: target[name] - origin[name] for name in origin})
    return differences


def moved_tensors(state: dict, model: nn.Module, with_buffers: bool) -> dict[str, torch.Tensor]:
    """The entries of ``state`` a direction moves, in float64 on the CPU: the parameters,
    and with ``with_buffers`` the floating-point buffers (not BatchNorm's batch counter)."""
    names = [name for name, _ in model.named_parameters()]
    if with_buffers:
        names += [name for name, b in model.named_buffers() if b.is_floating_point()]
    return {name: state[name].detach().to("cpu", torch.float64) for name in names}


def variance_range(differences: dict[str, torch.Tensor], model: nn.Module) -> tuple[float, float]:
    """The interval of a over which every BatchNorm running variance v_A + a (v_B - v_A)
    stays >= 0; outside it the loss is undefined (the model's outputs are NaN)."""
    low, high = -np.inf, np.inf
    for name, values in model.state_dict().items():
        if name.endswith("running_var"):
            start, change = values.detach().double().cpu(), differences[name]
            growing, shrinking = change > 0, change < 0
            if growing.any():
                low = max(low, float((-start[growing] / change[growing]).max()))
            if shrinking.any():
                high = min(high, float((start[shrinking] / -change[shrinking]).min()))
    return low, high


def weight_histograms(model: nn.Module, state: dict) -> tuple[dict, dict]:
    """Li et al. Fig. 2: the weights (tensors with more than one dimension) of ``model``
    and of the target ``state``, as histograms over shared bins, with their L2 norms.
    Returns the datasets and attributes of the surface file's ``endpoints`` group."""
    ends = [
        torch.cat([w.detach().double().reshape(-1).cpu() for w in weights]).numpy()
        for weights in (
            [p for p in model.parameters() if p.dim() > 1],
            [state[n] for n, p in model.named_parameters() if p.dim() > 1],
        )
    ]
    low, high = np.percentile(np.concatenate(ends), [0.1, 99.9])
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    datasets = {
        "histogram_edges": edges,
        "histogram_a": np.histogram(ends[0], edges)[0],
        "histogram_b": np.histogram(ends[1], edges)[0],
    }
    return datasets, {"weight_norms": [float(np.linalg.norm(end)) for end in ends]}


def file_directions(model: nn.Module, path: str, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` directions from ``path``: a torch file holding a list of dicts (or a dict
    with ``x`` and ``y`` dicts, or one dict for 1D), or a surface file (its directions)."""
    path = Path(path)
    hdf5 = path.is_file() and h5py.is_hdf5(path)
    raw = surface_directions(path) if hdf5 else torch_directions(path)
    if len(raw) < count:
        raise UserError(
            f"directions.file: {path} holds {len(raw)} direction(s), the grid needs {count}"
        )
    return [checked_direction(model, d, path, axis) for d, axis in zip(raw[:count], "xy")]


def torch_directions(path: Path) -> list[dict]:
    payload = read_torch_file(path, "directions.file")
    if isinstance(payload, dict) and "x" in payload:
        return [payload[axis] for axis in "xy" if axis in payload]
    if isinstance(payload, dict):
        return [payload]
    if isinstance(payload, (list, tuple)):
        return list(payload)
    raise UserError(
        f"directions.file: {path} holds a {type(payload).__name__}; save a list of dicts "
        "{parameter name: tensor}, one per axis"
    )


def surface_directions(path: Path) -> list[dict]:
    with h5py.File(path, "r", locking=False) as handle:
        if "directions" not in handle:
            raise UserError(f"directions.file: {path} is HDF5 but holds no /directions group")
        groups = [handle[f"directions/{axis}"] for axis in "xy" if f"directions/{axis}" in handle]
        return [{name: torch.from_numpy(group[name][()]) for name in group} for group in groups]


def checked_direction(model: nn.Module, direction, path: Path, axis: str) -> dict:
    """The direction as float64 tensors for every parameter; fails naming the first key
    that is missing, unknown or of the wrong shape. Buffer entries (a saved state_dict)
    are dropped: directions move parameters."""
    where = f"directions.file: {path}, direction {axis}"
    if not isinstance(direction, dict):
        raise UserError(f"{where}: expected a dict of tensors, got {type(direction).__name__}")
    parameters = dict(model.named_parameters())
    buffers = {name for name, _ in model.named_buffers()}
    for key, value in direction.items():
        if key not in parameters and key not in buffers:
            raise UserError(f"{where}: key {key!r} is not a parameter of the model; check the keys")
        if key in parameters and tuple(np.shape(value)) != tuple(parameters[key].shape):
            raise UserError(
                f"{where}: key {key!r} has shape {tuple(np.shape(value))}, the model's is "
                f"{tuple(parameters[key].shape)}"
            )
    missing = [name for name in parameters if name not in direction]
    if missing:
        raise UserError(
            f"{where}: no tensor for parameter {missing[0]!r} ({len(missing)} missing); "
            "give every parameter (zeros to keep it fixed)"
        )
    checked = {}
    for name in parameters:
        try:
            checked[name] = torch.as_tensor(direction[name], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{where}: key {name!r} is not numbers ({describe(exc)})") from None
        check_finite(checked[name], where, f"key {name!r}", "a direction must be finite")
    dropped = sorted(set(direction) & buffers)
    if dropped:
        log.warning("%s: ignoring %d buffer entries (%s, ...)", where, len(dropped), dropped[0])
    return checked
