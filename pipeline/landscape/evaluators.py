"""The evaluators of the job kinds: a batch of grid points in, arrays of map values out.

Each factory named in :data:`landscape.jobs.JOB_KINDS` builds its evaluator once per
rank, ``factory(experiment, surface, outputs)``; the evaluator is then called with up to
``items_per_call`` point numbers (int64) and returns ``{output: array of shape (K,) +
output shape}``. The Hessian moves the model to one point at a time
(:class:`PointByPoint`); the loss evaluates K points per forward pass
(:class:`SeveralPoints`) where the model allows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from landscape.evaluate import evaluate, outputs_of
from landscape.experiment import Experiment
from landscape.grid import Grid
from landscape.hessian import HessianEvaluator, WarmShards, warm_starts
from landscape.parameters import DirectionPlane
from landscape.store import SurfaceFile

log = logging.getLogger(__name__)


class PointByPoint:
    """A batch evaluator from a one-point one, ``at(a, b) -> {output: value}``: the
    points of a batch are evaluated one after the other, in order."""

    items_per_call = 1

    def __init__(self, grid: Grid, outputs: list[str], at: Callable[[float, float], dict]):
        self.grid = grid
        self.outputs = outputs
        self.at = at

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.at(*self.grid.coordinates(int(item))) for item in items]
        return {name: np.asarray([row[name] for row in rows], np.float64) for name in self.outputs}


class LossAtPoint:
    """Loss and accuracy maps at theta0 + a*d1 + b*d2 for one experiment on one device."""

    def __init__(self, experiment: Experiment, plane: DirectionPlane, maps: list[str]):
        self.experiment = experiment
        self.maps = maps
        self.plane = plane

    def __call__(self, a: float, b: float) -> dict[str, float]:
        self.plane.move_to(a, b)
        values = {}
        batch_size = self.experiment.config.evaluation.batch_size
        for split in ("train", "test"):
            if any(m.startswith(split) for m in self.maps):
                samples = self.experiment.data.split(split)
                loss, accuracy = evaluate(
                    self.experiment.forward,
                    samples,
                    batch_size,
                    self.experiment.objective,
                    self.experiment.autocast,
                )
                values.update({f"{split}_loss": loss, f"{split}_acc": accuracy})
        return {m: values[m] for m in self.maps}


# Points per pass chosen by memory are capped here: past a few dozen, the per-call cost
# that batching amortizes is already small beside the arithmetic.
MAX_POINTS_PER_PASS = 32


class SeveralPoints:
    """Loss and accuracy maps at K grid points per forward pass.

    The K parameter vectors theta_k = theta0 + a_k d1 + b_k d2 are formed on the device
    in float64 by one matrix product, ``[a_k b_k] @ [d1; d2]`` added to theta0, and
    rounded once to the model's dtype, as :meth:`landscape.parameters.FlatParameters.move_to`
    forms one (in another order of the same float64 operations: theta_k may differ from
    the one-point vector in the last bit of the dtype, where the float64 sum lies on a
    rounding boundary; theta0 + 1 * (theta_B - theta0) is theta_B exactly all the same).
    ``torch.func.vmap`` over one point's work on a batch, ``functional_call(model,
    theta_k)``, its unit losses summed in float64 and its correct predictions, runs the K
    points on one shared data batch (``in_dims`` None for the data and for buffers no
    direction moves): one pass and a handful of operations per batch for all K points,
    not K. The batch sums are added up as :func:`landscape.evaluate.evaluate` does.

    The batched kernels (a convolution over K weight sets becomes one grouped
    convolution, a linear layer one batched matrix product, the sum over a batch one row
    of a (K, batch) sum) may block their sums differently from the one-point kernels: a
    point's outputs can differ from K = 1 in the last bits of the dtype. That is the
    tolerance: the loss to a few units of the dtype's epsilon relative (tests hold
    float32 to 1e-6 and float64 to 1e-13).

    Which points share a pass: consecutive slices of K points of a claim
    (:func:`landscape.workers.evaluate_shards`), a claim being a few consecutive pending
    shards (:class:`landscape.workers.ShardClaims`). The groups therefore depend on the
    pending list (a resumed run regroups what the killed one left), on the run's K (the
    least ``items_per_call`` of all ranks: ``evaluation.points_per_pass``, or each rank's
    own from its free GPU memory, :func:`landscape.workers.run_items_per_call`) and,
    where it caps the shards per claim, on the number of ranks
    (:func:`landscape.workers.shards_per_claim`); never on which rank claims a group.
    Every grouping is within the tolerance above of K = 1, so two runs that group
    otherwise differ only within it. A call with one point (a one-point shard, the rest
    of a resumed one) takes the one-point path, which the batched one would only slow
    down; this evaluator then takes up to K points per call (``items_per_call``).
    """

    def __init__(self, experiment: Experiment, grid: Grid, plane: DirectionPlane, maps, k: int):
        self.experiment, self.grid, self.plane, self.maps = experiment, grid, plane, maps
        self.items_per_call = k
        self.one_point = PointByPoint(grid, maps, LossAtPoint(experiment, plane, maps))
        flat = plane.parameters
        model = experiment.model
        moved = set(flat.names)
        self.fixed = {
            name: t.detach()
            for name, t in (*model.named_parameters(), *model.named_buffers())
            if name not in moved
        }
        self.directions = torch.stack(plane.directions)  # (1 or 2, parameters), float64
        self.totals = vmap(self.point_totals, in_dims=(0, None, None))

    def point_totals(
        self, tensors: dict, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One point's float64 sum of unit losses over one batch, and its count of units
        predicted right (0 for an objective without accuracy); its forward pass under the
        experiment's autocast, as :func:`landscape.evaluate.outputs_of` runs one."""
        outputs = outputs_of(
            lambda batch: functional_call(self.experiment.model, (tensors, self.fixed), (batch,)),
            inputs,
            self.experiment.autocast,
        )
        objective = self.experiment.objective
        loss = objective.losses(outputs, targets).double().sum()
        if objective.accuracy:
            return loss, objective.correct(outputs, targets)
        return loss, torch.zeros_like(loss, dtype=torch.int64)

    def stacked(self, coordinates: list[tuple[float, float]]) -> dict[str, torch.Tensor]:
        """The K points' moved tensors, each of shape (K,) + its shape."""
        flat = self.plane.parameters
        steps = torch.tensor(coordinates, dtype=torch.float64, device=self.directions.device)
        rows = torch.addmm(flat.origin, steps[:, : len(self.directions)], self.directions)
        return flat.unflatten(rows.to(flat.vector.dtype))

    @torch.no_grad()
    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        if len(items) == 1:
            return self.one_point(items)
        tensors = self.stacked([self.grid.coordinates(int(item)) for item in items])
        objective = self.experiment.objective
        batch_size = self.experiment.config.evaluation.batch_size
        values = {}
        for split in ("train", "test"):
            if not any(m.startswith(split) for m in self.maps):
                continue
            samples = self.experiment.data.split(split)
            device = self.experiment.device
            total_loss = torch.zeros(len(items), dtype=torch.float64, device=device)
            correct = torch.zeros(len(items), dtype=torch.int64, device=device)
            for inputs, targets in samples.batches(batch_size):
                loss, right = self.totals(tensors, inputs, targets)
                total_loss += loss
                correct += right
            count = samples.units(objective)
            loss = total_loss.cpu().numpy() / count
            # As evaluate: a point whose loss is not finite has no accuracy either.
            defined = objective.accuracy & np.isfinite(loss)
            accuracy = np.where(defined, correct.cpu().numpy() / count, np.nan)
            values.update({f"{split}_loss": loss, f"{split}_acc": accuracy})
        return {m: values[m] for m in self.maps}


@dataclass(frozen=True)
class BatchTrial:
    """What vmap did with the model's forward over two parameter sets (:func:`try_batching`).

    ``problem``: why vmap cannot batch it (None: it can). ``grouped_convolutions``: some
    convolution ran grouped over the points, with more groups than in one point's
    forward. A convolution of the unbatched data (a stem, a patch embedding) runs as one
    plain convolution over K times the output channels; every later one sees batched
    inputs and becomes a grouped one, slower per point than K plain ones
    (:func:`points_per_pass`)."""

    problem: str | None
    grouped_convolutions: bool = False


class ConvolutionGroups(TorchDispatchMode):
    """The ``groups`` of every ``aten.convolution`` run under it, in order."""

    def __init__(self):
        super().__init__()
        self.groups: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.groups.append(args[8])
        return func(*args, **(kwargs or {}))


def try_batching(experiment: Experiment, plane: DirectionPlane) -> BatchTrial:
    """vmap tried once on two samples at two points (the model's forward and the
    objective's losses), its convolutions' groups against one plain forward's."""
    inputs, targets = experiment.data.split("train").head(2)
    trial = SeveralPoints(experiment, None, plane, [], 2)
    try:
        with torch.no_grad(), ConvolutionGroups() as batched:
            trial.totals(trial.stacked([(0.0, 0.0), (0.0, 0.0)]), inputs, targets)
    except Exception as exc:  # any operation without a batching rule, in user code too
        return BatchTrial(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    with torch.no_grad(), ConvolutionGroups() as plain:
        experiment.model(inputs)
    return BatchTrial(None, batched.groups != plain.groups)


def activation_bytes(experiment: Experiment) -> int:
    """Bytes of every leaf module's output of one forward pass over one batch: what one
    more point per pass adds (an upper bound: no_grad frees most of them early)."""
    inputs, _ = experiment.data.split("train").head(experiment.config.evaluation.batch_size)
    total = 0

    def count(module, args, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    model = experiment.model
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def points_per_pass(experiment: Experiment, plane: DirectionPlane, trial: BatchTrial) -> int:
    """K from memory on a GPU where vmap runs no grouped convolution (``trial``): one
    batch's activations plus one parameter copy per point, against half the device's
    free memory, capped at :data:`MAX_POINTS_PER_PASS`. Each rank finds its own; the run
    takes the least (:func:`landscape.workers.run_items_per_call`).

    1 where vmap turns a convolution into a grouped one over the points, on every
    device: slower per point than one point at a time. ResNet-56 on 50,000 images,
    batch 1024, float32, on an H200: 1.63x a bare forward pass per point with its 6
    grid points in one pass (benchmarks/cuda_bench.py); an MLP there ran 1.68x the
    points/s of one point at a time in the same way.

    1 on a CPU, for every model family: measured again once the per-point writes and
    the per-point loss operations were gone (benchmarks/batch_bench.py, CPU time on one
    thread, batch 128, forwards per point at K = 1 / 8 / 32, two runs): the digits MLP
    2.36 / 2.97 / 3.54 and 1.96 / 2.05 / 1.67 (no gain to rely on), the small BN CNN
    1.24 / 2.67 / 5.15 and 1.08 / 3.95 / 7.10, ResNet-20 1.00 / 1.12 / 1.09 and
    1.03 / 1.17 / 1.20, and no better at the best batch. vmap costs about 0.4 ms of
    Python per call whatever K (as much as 8 of the MLP's forward passes over a batch),
    its batched matrix products run at about half the speed of the plain ones, and a
    batched convolution is a grouped one, whose activations leave the cache.

    A fixed rule, not a timing: K must not depend on the load, or a resumed run would
    round otherwise."""
    device = experiment.device
    if device.type != "cuda":
        return 1
    if trial.grouped_convolutions:
        log.info("loss: one point per forward pass (vmap would group the convolutions: slower)")
        return 1
    flat = plane.parameters.vector
    per_point = activation_bytes(experiment) + flat.numel() * flat.element_size()
    budget = torch.cuda.mem_get_info(device)[0] // 2
    return max(1, min(MAX_POINTS_PER_PASS, budget // per_point))


def loss_evaluator(
    experiment: Experiment, surface: SurfaceFile, outputs: list[str]
) -> PointByPoint | SeveralPoints:
    """The loss job's evaluator: the loss and accuracy maps ``outputs`` asks for, K points
    per pass (``evaluation.points_per_pass``; 0: :func:`points_per_pass`; 1: one point at a
    time, moving the model itself). A model vmap cannot batch gets K = 1, and the log says
    why."""
    plane = DirectionPlane(experiment.model, surface.directions())
    k = experiment.config.evaluation.points_per_pass
    if k != 1:
        trial = try_batching(experiment, plane)
        if trial.problem is not None:
            log.info(
                "loss: one point per forward pass; vmap cannot batch the model (%s)", trial.problem
            )
            k = 1
        elif k == 0:
            k = points_per_pass(experiment, plane, trial)
    if k == 1:
        return PointByPoint(surface.grid, outputs, LossAtPoint(experiment, plane, outputs))
    log.info("loss: %d points per forward pass", k)
    return SeveralPoints(experiment, surface.grid, plane, outputs, k)


def hessian_evaluator(
    experiment: Experiment, surface: SurfaceFile, outputs: list[str]
) -> PointByPoint | WarmShards:
    """The hessian job's evaluator: :class:`landscape.hessian.HessianEvaluator` at each point,
    warm-started along the file's shards (:class:`landscape.hessian.WarmShards`) where
    ``hessian.warm_start`` says so."""
    settings = surface.config.hessian
    at = HessianEvaluator(experiment, surface.directions(), settings)
    if warm_starts(settings):
        return WarmShards(
            surface.grid, outputs, at, surface.points("hessian"), surface.shards("hessian")
        )
    return PointByPoint(surface.grid, outputs, at)
