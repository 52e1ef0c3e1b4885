"""The table of job kinds: what each kind of job computes, at which points, and how.

A job kind is everything the pipeline needs to know about one kind of work over a
surface file: the maps a config may ask for that it computes, the values it stores per
point (each with a trailing shape: ``()`` for one number, ``(k,)`` for top-k
eigenvalues, ``(bins,)`` for a spectral density), the maps derived from those once its
points are in, which points it covers and in which shards, what its done flags record,
its evaluator, its figures and its command. Plan, store, workers, reduce, status, plot
and the command line look a kind up in :data:`JOB_KINDS` and never test its name:
adding a kind is one entry here plus one evaluator. Jobs run in table order.

Evaluators and figures are named as ``"module:attribute"`` strings, resolved on first
use (:func:`resolve`): :mod:`landscape.config` imports this module to check ``maps:``,
while evaluators import the experiment and the config itself: importing them here would
make a cycle (config -> jobs -> evaluators -> config). ``tests/test_jobs.py`` resolves
every name of the table, so a typo fails there, not in a run.

An evaluator is built once per rank, ``factory(experiment, surface, outputs)``, and
called with a batch of K work items (int64 point numbers): it returns
``{output name: array of shape (K,) + output shape}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Evaluator(Protocol):
    """Built once per rank; called with K work items, returns ``{output: (K,) + shape}``."""

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Output:
    """One value a job stores per point: a number (``shape == ()``) or an array."""

    name: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class DerivedMap:
    """A map computed from other maps, point by point, by reduce once a run ends; ``shape``
    is its trailing shape per point, as for an :class:`Output`."""

    name: str
    sources: tuple[str, ...]
    derive: Callable[..., np.ndarray]
    shape: tuple[int, ...] = ()


def eigenvalue_ratio(lambda_min: np.ndarray, lambda_max: np.ndarray) -> np.ndarray:
    """``|lambda_min / lambda_max|`` (Li et al., Fig. 7): near 0 where the loss is locally
    convex, large where negative curvature dominates; NaN where either is unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(lambda_min / lambda_max)


@dataclass(frozen=True)
class JobKind:
    """One kind of job. ``config`` arguments are :class:`landscape.config.ExperimentConfig`
    (not imported: see the module docstring); ``grid`` is a :class:`landscape.grid.Grid`.

    - ``maps``: the maps a config may ask for (``maps:``) that this kind computes;
    - ``outputs(config)``: what it stores at each point, in this order;
    - ``derived``: maps reduce derives from the outputs;
    - ``points(config, grid)``: the point numbers it covers; ``shard_size(config)`` how
      many of them make a shard (0: about 64 shards);
    - ``done_attrs(config, dtype)``: attributes of its done flags (what its values mean);
    - ``evaluator`` and ``figures``: ``"module:attribute"`` of the evaluator factory and of
      ``figures(surface, maps, labels) -> {name: Figure}``.
    """

    name: str
    verb: str
    description: str
    maps: tuple[str, ...]
    outputs: Callable[[Any], tuple[Output, ...]]
    points: Callable[[Any, Any], np.ndarray]
    shard_size: Callable[[Any], int]
    evaluator: str
    figures: str
    derived: tuple[DerivedMap, ...] = ()
    done_attrs: Callable[[Any, Any], dict] = lambda config, dtype: {}


def resolve(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names, imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def hessian_done_attrs(config, dtype) -> dict:
    """The convergence criterion, tolerances and method behind the Hessian job's values."""
    return resolve("landscape.hessian:convergence_attrs")(config.hessian, dtype)


LOSS_MAPS = ("train_loss", "train_acc", "test_loss", "test_acc")
HESSIAN_OUTPUTS = tuple(
    Output(name)
    for name in (
        "lambda_min",
        "lambda_max",
        "lambda_min_residual",
        "lambda_max_residual",
        "hessian_hvps",
        "hessian_converged",
    )
)

JOB_KINDS: tuple[JobKind, ...] = (
    JobKind(
        name="loss",
        verb="run",
        description="evaluate the pending loss/accuracy points of a surface file",
        maps=LOSS_MAPS,
        outputs=lambda config: tuple(Output(name) for name in config.maps if name in LOSS_MAPS),
        points=lambda config, grid: grid.sublattice(1),
        shard_size=lambda config: config.grid.shard_size,
        evaluator="landscape.evaluators:loss_evaluator",
        figures="landscape.plot:loss_job_figures",
    ),
    JobKind(
        name="hessian",
        verb="hessian",
        description="lambda_min and lambda_max at the pending Hessian points",
        maps=("lambda_min", "lambda_max"),
        # Both ends are always solved for, with how well each converged.
        outputs=lambda config: HESSIAN_OUTPUTS,
        points=lambda config, grid: grid.sublattice(config.hessian.stride),
        shard_size=lambda config: config.hessian.shard_size,
        evaluator="landscape.evaluators:hessian_evaluator",
        figures="landscape.plot:hessian_figures",
        derived=(DerivedMap("lambda_ratio", ("lambda_min", "lambda_max"), eigenvalue_ratio),),
        done_attrs=hessian_done_attrs,
    ),
)
JOBS: dict[str, JobKind] = {kind.name: kind for kind in JOB_KINDS}
# Every map a config may ask for, and the kind that computes it.
MAP_KINDS: dict[str, JobKind] = {name: kind for kind in JOB_KINDS for name in kind.maps}
MAP_NAMES = tuple(MAP_KINDS)


def jobs_for(maps: list[str]) -> list[JobKind]:
    """The kinds that compute ``maps``, in table order."""
    return [kind for kind in JOB_KINDS if any(name in kind.maps for name in maps)]
