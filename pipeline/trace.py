"""The trace of the Hessian at theta0, two ways (Boettcher & Wheeler; Hutchinson).

From loss values only: for d uniform on the unit sphere of the n selected parameters,
E[d^T H d] = tr(H) / n, the mean curvature, which is also why a random 2D slice shows
a saddle as a bowl, a dome or a plain according to the sign of tr(H). Each direction's
curvature is read from a central second difference,
(L(theta + e d) - 2 L(theta) + L(theta - e d)) / e^2, so K directions cost 2K + 1
loss evaluations and no Hessian-vector product.

Hutchinson's estimator, E[z^T H z] = tr(H) for Rademacher z, needs one HVP per probe
and usually has a smaller variance; both are reported with a Student-t confidence
interval over their K samples, so they can be compared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from pipeline.checkpoint import verify_fingerprint
from pipeline.config import TraceConfig
from pipeline.evaluate import evaluate
from pipeline.experiment import Experiment
from pipeline.hessian import HessianOperator
from pipeline.parameters import FlatParameters
from pipeline.store import SurfaceFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceEstimate:
    """A sample mean with its confidence interval (mean +- half_width)."""

    samples: np.ndarray
    confidence: float

    @property
    def mean(self) -> float:
        return float(self.samples.mean())

    @property
    def half_width(self) -> float:
        count = len(self.samples)
        quantile = stats.t.ppf(0.5 + self.confidence / 2, count - 1)
        return float(quantile * self.samples.std(ddof=1) / np.sqrt(count))

    def covers(self, value: float) -> bool:
        return abs(value - self.mean) <= self.half_width


class TraceEstimator:
    """tr(H) of the full-training-set mean loss at the model's parameters, over the
    parameters ``hessian.parameters`` selects (all, or the weights only)."""

    def __init__(self, experiment: Experiment, parameters: str, hvp: str, settings: TraceConfig):
        model = experiment.model
        self.settings = settings
        self.flat = FlatParameters(model)
        self.inputs, self.targets = experiment.data.split("train")
        evaluation = experiment.config.evaluation
        self.batch_size, self.loss_name = evaluation.batch_size, evaluation.loss
        self.operator = HessianOperator(
            model, self.inputs, self.targets, self.loss_name, self.batch_size, parameters, hvp
        )
        selected = set(self.operator.names)
        self.mask = torch.cat(
            [
                torch.full((size,), name in selected, dtype=torch.bool)
                for name, size in zip(self.flat.names, self.flat.sizes)
            ]
        ).to(self.flat.vector.device)
        self.dimension = self.operator.shape[0]
        length = float(self.flat.origin[self.mask].norm())
        self.step = settings.step * (length if length > 0 else 1.0)
        self.generator = torch.Generator().manual_seed(settings.seed)

    def loss(self) -> float:
        return evaluate(
            self.operator.model, self.inputs, self.targets, self.batch_size, self.loss_name
        )[0]

    def random_vector(self, rademacher: bool) -> torch.Tensor:
        """A full-length float64 vector, zero outside the selected parameters: Rademacher
        signs, or a uniform direction on the unit sphere of the selection."""
        values = torch.randn(self.dimension, generator=self.generator, dtype=torch.float64)
        values = values.sign() if rademacher else values / values.norm()
        vector = torch.zeros_like(self.flat.origin)
        vector[self.mask] = values.to(vector.device)
        return vector

    def from_loss_values(self, samples: int) -> TraceEstimate:
        """n times the second difference of the loss along each of ``samples`` random unit
        directions, with step ``trace.step * ||theta||``."""
        step = self.step
        self.flat.reset()
        center = self.loss()
        values = []
        for _ in range(samples):
            direction = self.random_vector(rademacher=False)
            self.flat.move_to(step, direction)
            ahead = self.loss()
            self.flat.move_to(-step, direction)
            behind = self.loss()
            values.append(self.dimension * (ahead - 2 * center + behind) / step**2)
        self.flat.reset()
        return TraceEstimate(np.array(values), self.settings.confidence)

    def hutchinson(self, samples: int) -> TraceEstimate:
        """z^T H z for ``samples`` Rademacher probes z (one HVP each)."""
        values = []
        for _ in range(samples):
            probe = self.random_vector(rademacher=True)[self.mask]
            product = self.operator.hvp(probe.to(self.operator.torch_dtype)).double()
            values.append(float(probe @ product))
        return TraceEstimate(np.array(values), self.settings.confidence)


def estimate_trace(path: str | Path, device: str | None = None) -> str:
    """``landscape trace``: both estimates at the centre of a surface file's plan, stored
    in its ``trace`` group (replacing an earlier one); returns a summary to print."""
    path = Path(path)
    with SurfaceFile.open(path) as surface:
        config, planned_sha = surface.config, surface.attrs["checkpoint_sha256"]
    verify_fingerprint(config.model.checkpoint, planned_sha, path)
    experiment = Experiment.load(config, device=device)
    settings, hessian = config.trace, config.hessian
    estimator = TraceEstimator(experiment, hessian.parameters, hessian.hvp, settings)
    log.info(
        "%s: tr(H) over %d parameters (%s) on %s, %d samples each way",
        path,
        estimator.dimension,
        hessian.parameters,
        experiment.device,
        settings.samples,
    )
    started = time.perf_counter()
    projection = estimator.from_loss_values(settings.samples)
    middle = time.perf_counter()
    hutchinson = estimator.hutchinson(settings.samples)
    seconds = (middle - started, time.perf_counter() - middle)
    estimates = {"projection": projection, "hutchinson": hutchinson}
    with SurfaceFile.open(path, "r+") as surface:
        surface.replace_group(
            "trace",
            {name: estimate.samples for name, estimate in estimates.items()},
            {
                "dimension": estimator.dimension,
                "parameters": hessian.parameters,
                "step": estimator.step,
                "confidence": settings.confidence,
                "seconds": seconds,
                **{f"{name}_mean": e.mean for name, e in estimates.items()},
                **{f"{name}_half_width": e.half_width for name, e in estimates.items()},
            },
        )
    return trace_summary(estimator.dimension, settings, projection, hutchinson, seconds)


def trace_summary(
    dimension: int,
    settings: TraceConfig,
    projection: TraceEstimate,
    hutchinson: TraceEstimate,
    seconds: tuple[float, float],
) -> str:
    level = f"{settings.confidence:.0%}"
    count = settings.samples
    rows = [
        (
            f"loss values, {count} random directions ({2 * count + 1} losses)",
            projection,
            seconds[0],
        ),
        (f"Hutchinson, {count} Rademacher probes ({count} HVPs)", hutchinson, seconds[1]),
    ]
    lines = [f"tr(H) at the centre, {dimension} parameters ({level} confidence intervals):"]
    for what, estimate, spent in rows:
        lines.append(
            f"  {what:<58} {estimate.mean:>12.6g} ± {estimate.half_width:<10.3g}"
            f" tr(H)/n = {estimate.mean / dimension:.4g}  ({spent:.1f} s)"
        )
    return "\n".join(lines)
