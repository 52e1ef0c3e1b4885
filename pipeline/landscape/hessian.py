"""The hessian job: both extreme eigenvalues of the training-loss Hessian at each grid
point, and the one place an experiment becomes a Hessian operator.

The math is in :mod:`landscape.curvature`; this module joins it to an experiment: its
model, training set, batch size and objective (the one its loss maps use).
"""

from __future__ import annotations

import logging

import torch

from landscape.config import HessianConfig
from landscape.curvature.lanczos import (
    Criterion,
    check_basis_memory,
    extreme_eigenvalues,
    start_vector,
)
from landscape.curvature.operators import HessianOperator, select_parameters
from landscape.experiment import Experiment
from landscape.parameters import DirectionPlane

log = logging.getLogger(__name__)


def training_hessian(experiment: Experiment, parameters: str, hvp: str) -> HessianOperator:
    """The Hessian of ``experiment``'s full-training-set mean loss (its objective, in
    ``evaluation.batch_size`` batches) over the parameters ``parameters`` selects (``all``
    or ``weights``), products by ``hvp``: what the hessian job, Hessian directions and
    ``landscape trace`` all differentiate."""
    inputs, targets = experiment.data.split("train")
    return HessianOperator(
        experiment.model,
        select_parameters(experiment.model, parameters),
        inputs,
        targets,
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
    }


class HessianEvaluator:
    """The hessian job's values at theta0 + a*d1 + b*d2: both extreme eigenvalues of the
    training-loss Hessian, their residuals, the HVPs spent and whether both converged.

    Every point starts Lanczos from the same seeded vector, so a point's values do not
    depend on which rank computes it or in which order.
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
                experiment.config.evaluation.dtype,
                floor,
            )
        if settings.method == "shift":
            log.warning(
                "hessian.method 'shift' reproduces Li et al.'s code (ARPACK at tol 1e-2 on "
                "H - 0.51 lambda_max I); near a minimum lambda_min can be off by 80%% or more. "
                "Use lanczos for results."
            )

    def __call__(self, a: float, b: float) -> dict[str, float]:
        self.plane.move_to(a, b)
        settings = self.settings
        found = extreme_eigenvalues(
            self.operator, settings.method, self.start, settings.tolerance, settings.max_hvps
        )
        return {
            "lambda_min": found.lambda_min,
            "lambda_max": found.lambda_max,
            "lambda_min_residual": found.residual_min,
            "lambda_max_residual": found.residual_max,
            "hessian_hvps": float(found.hvps),
            "hessian_converged": float(found.converged),
        }
