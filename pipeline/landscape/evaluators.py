"""The evaluators of the job kinds: a batch of grid points in, arrays of map values out.

Each factory named in :data:`landscape.jobs.JOB_KINDS` builds its evaluator once per
rank, ``factory(experiment, surface, outputs)``; the evaluator is then called with K
point numbers (int64) and returns ``{output: array of shape (K,) + output shape}``.
Today's evaluators move the model to one point at a time (:class:`PointByPoint`); one
that evaluates several points per forward pass plugs in unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.grid import Grid
from landscape.hessian import HessianEvaluator, WarmShards, warm_starts
from landscape.parameters import DirectionPlane
from landscape.store import SurfaceFile


class PointByPoint:
    """A batch evaluator from a one-point one, ``at(a, b) -> {output: value}``: the
    points of a batch are evaluated one after the other, in order."""

    def __init__(self, grid: Grid, outputs: list[str], at: Callable[[float, float], dict]):
        self.grid = grid
        self.outputs = outputs
        self.at = at

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.at(*self.grid.coordinates(int(item))) for item in items]
        return {name: np.asarray([row[name] for row in rows], np.float64) for name in self.outputs}


class LossAtPoint:
    """Loss and accuracy maps at theta0 + a*d1 + b*d2 for one experiment on one device."""

    def __init__(
        self, experiment: Experiment, directions: list[dict[str, np.ndarray]], maps: list[str]
    ):
        self.experiment = experiment
        self.maps = maps
        self.plane = DirectionPlane(experiment.model, directions)

    def __call__(self, a: float, b: float) -> dict[str, float]:
        self.plane.move_to(a, b)
        values = {}
        batch_size = self.experiment.config.evaluation.batch_size
        for split in ("train", "test"):
            if any(m.startswith(split) for m in self.maps):
                inputs, targets = self.experiment.data.split(split)
                loss, accuracy = evaluate(
                    self.experiment.model, inputs, targets, batch_size, self.experiment.objective
                )
                values.update({f"{split}_loss": loss, f"{split}_acc": accuracy})
        return {m: values[m] for m in self.maps}


def loss_evaluator(
    experiment: Experiment, surface: SurfaceFile, outputs: list[str]
) -> PointByPoint:
    """The loss job's evaluator: the loss and accuracy maps ``outputs`` asks for."""
    return PointByPoint(
        surface.grid, outputs, LossAtPoint(experiment, surface.directions(), outputs)
    )


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
