"""The hessian job: both extreme eigenvalues of the training-loss Hessian at each grid
point, and the one place an experiment becomes a Hessian operator.

The math is in :mod:`landscape.curvature`; this module joins it to an experiment: its
model, training set, batch size and objective (the one its loss maps use).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from landscape.config import HessianConfig
from landscape.curvature.lanczos import (
    Criterion,
    Extremes,
    check_basis_memory,
    extreme_eigenvalues,
    start_vector,
    warm_start_vector,
)
from landscape.curvature.operators import HessianOperator, select_parameters
from landscape.experiment import Experiment
from landscape.grid import Grid
from landscape.parameters import DirectionPlane

log = logging.getLogger(__name__)


def training_hessian(experiment: Experiment, parameters: str, hvp: str) -> HessianOperator:
    """The Hessian of ``experiment``'s full-training-set mean loss (its objective, in
    ``evaluation.batch_size`` batches) over the parameters ``parameters`` selects (``all``
    or ``weights``), products by ``hvp``: what the hessian job, Hessian directions and
    ``landscape trace`` all differentiate."""
    return HessianOperator(
        experiment.model,
        select_parameters(experiment.model, parameters),
        experiment.data.split("train"),
        experiment.objective,
        experiment.config.evaluation.batch_size,
        hvp,
    )


def seeded_hessian(
    experiment: Experiment, parameters: str, hvp: str, seed: int, max_hvps: int | None
) -> tuple[HessianOperator, torch.Tensor]:
    """:func:`training_hessian` and the seeded start vector (float64, on the experiment's
    device) that every Lanczos run of the tool begins from, so equal seeds give equal
    numbers wherever they run. With ``max_hvps``, a Lanczos basis of that many vectors
    is first checked to fit in memory (``hessian.max_hvps`` names the fix)."""
    operator = training_hessian(experiment, parameters, hvp)
    if max_hvps is not None:
        check_basis_memory(operator.shape[0], max_hvps, experiment.device)
    return operator, start_vector(operator.shape[0], seed).to(experiment.device)


def convergence_attrs(settings: HessianConfig, dtype: torch.dtype) -> dict:
    """What ``hessian_converged`` and the residual maps mean, for the surface file."""
    criterion = Criterion.for_dtype(settings.tolerance, dtype)
    return {
        "criterion": Criterion.TEXT,
        "tolerance": criterion.tolerance,
        "rounding_floor": criterion.floor,
        "hvp_dtype": str(dtype).removeprefix("torch."),
        "method": settings.method,
        "warm_start": int(warm_starts(settings)),
    }


def warm_starts(settings: HessianConfig) -> bool:
    """Whether points after the first of a shard start from their predecessor's Ritz
    vectors: ``hessian.warm_start`` with the Lanczos solver (the only one returning them)."""
    return settings.warm_start and settings.method == "lanczos"


class HessianEvaluator:
    """The hessian job's values at theta0 + a*d1 + b*d2: both extreme eigenvalues of the
    training-loss Hessian, their residuals, the HVPs spent and whether both converged.

    Called with (a, b), a point starts Lanczos from the seeded vector, so its values do
    not depend on which rank computes it or in which order; :class:`WarmShards` chains
    the points of a shard instead.
    """

    def __init__(self, experiment: Experiment, directions: list[dict], settings: HessianConfig):
        self.plane = DirectionPlane(experiment.model, directions)
        lanczos_basis = settings.max_hvps if settings.method == "lanczos" else None
        self.operator, self.start = seeded_hessian(
            experiment, settings.parameters, settings.hvp, settings.seed, lanczos_basis
        )
        self.settings = settings
        floor = Criterion.for_dtype(settings.tolerance, self.operator.torch_dtype).floor
        if settings.tolerance < floor:
            log.warning(
                "hessian.tolerance %.1e is below what %s products resolve: residuals are "
                "only checked down to %.1e x max(|lambda_min|, |lambda_max|)",
                settings.tolerance,
                str(experiment.dtype).removeprefix("torch."),
                floor,
            )
        if settings.method == "shift":
            log.warning(
                "hessian.method 'shift' reproduces Li et al.'s code (ARPACK at tol 1e-2 on "
                "H - 0.51 lambda_max I); near a minimum lambda_min can be off by 80%% or more. "
                "Use lanczos for results."
            )

    def __call__(self, a: float, b: float) -> dict[str, float]:
        """The values at (a, b), solved from the seeded start."""
        return point_values(self.solve(a, b, self.start))

    def solve(self, a: float, b: float, start: torch.Tensor) -> Extremes:
        """Both ends at theta0 + a*d1 + b*d2, Lanczos (or the configured method) from
        ``start``."""
        self.plane.move_to(a, b)
        settings = self.settings
        try:
            return extreme_eigenvalues(
                self.operator, settings.method, start, settings.tolerance, settings.max_hvps
            )
        finally:
            self.operator.release()


def point_values(found: Extremes) -> dict[str, float]:
    """One point's outputs of the hessian job."""
    return {
        "lambda_min": found.lambda_min,
        "lambda_max": found.lambda_max,
        "lambda_min_residual": found.residual_min,
        "lambda_max_residual": found.residual_max,
        "hessian_hvps": float(found.hvps),
        "hessian_converged": float(found.converged),
    }


class WarmShards:
    """The hessian job's batch evaluator with warm starts: within each shard (a run of
    neighbouring points fixed at plan time), a point's Lanczos starts from the Ritz
    vectors of the shard's previous one or two points, extrapolated along the row
    (:func:`~landscape.curvature.lanczos.warm_start_vector`); the first point of every
    shard from the seeded vector.

    A point's numbers therefore depend on its shard's earlier points only, which every
    rank and every resume evaluates alike: asked for a point whose predecessor is not the
    last point solved here (a resumed shard, or a rank's first point), it first replays
    the shard from its first point up to the predecessor, writing nothing, so a shard
    resumed halfway gives the numbers of an uninterrupted run, bit for bit (products and
    Lanczos are deterministic on one device; replayed products are counted nowhere).
    """

    def __init__(
        self,
        grid: Grid,
        outputs: list[str],
        evaluator: HessianEvaluator,
        points: np.ndarray,
        shards: np.ndarray,
    ):
        self.grid, self.outputs, self.evaluator = grid, outputs, evaluator
        self.points = points
        first = np.repeat(shards[:, 0], shards[:, 1] - shards[:, 0])
        self.index = {int(point): (i, int(first[i])) for i, point in enumerate(points)}
        self.solved: int | None = None  # the index of the last point solved here
        self.recent: list[torch.Tensor] = []  # the Ritz vectors of its shard's last two

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        rows = [point_values(self.solve(int(item))) for item in items]
        return {name: np.asarray([row[name] for row in rows], np.float64) for name in self.outputs}

    def solve(self, point: int) -> Extremes:
        index, first = self.index[point]
        begin = index if self.solved == index - 1 and index != first else first
        if begin < index:
            log.info(
                "Replaying %d Hessian point(s) of the shard from its first to warm-start point %d",
                index - begin,
                point,
            )
        found = None
        for current in range(begin, index + 1):
            if current == first:
                self.recent = []
            seeded = self.evaluator.start
            start = warm_start_vector(self.recent, seeded) if self.recent else seeded
            found = self.evaluator.solve(*self.grid.coordinates(int(self.points[current])), start)
            self.solved, self.recent = current, [*self.recent, found.vectors][-2:]
        return found
