"""Curvature at theta0 two ways: from loss values (Boettcher & Wheeler) and tr(H) by Hutchinson.

From loss values only: for d uniform on the unit sphere of the n selected parameters,
E[d^T H d] = tr(H) / n, the mean curvature. Each direction's curvature is read from a
central second difference at step e,

    D(d, e) = (L(theta + e d) - 2 L(theta) + L(theta - e d)) / e^2,

so K directions cost 2K + 1 loss evaluations and no Hessian-vector product, and the
estimate is n * mean D. That is tr(H) only where the loss is smooth at the scale of
the step: a ReLU network's loss has kinks (jumps of the gradient), each of which adds a
delta mass to the second difference that does not shrink with e, and which autograd's
Hessian does not see. The estimate is therefore labelled for what it is (n x mean
second difference at step e), its step is stored and printed beside it, and a model
with non-smooth operations gets a warning that the two estimates will differ.

Rounding: n / e^2 multiplies the error of every loss value (about 2e8 on the demo
ResNet-20), and the error of L(theta), shared by all K samples, becomes a bias that no
confidence interval includes. The losses are therefore evaluated by a float64 copy of
the model at positions theta +- e d formed in float64, whatever ``evaluation.dtype``
(the data stay in their dtype; each batch is cast on its way in). On GPUs with slow
float64 arithmetic these 2K + 1 evaluations are the expensive part.

Hutchinson's estimator, E[z^T H z] = tr(H) for Rademacher z, needs one HVP per probe
(in the config's dtype). Both are reported with a Student-t confidence interval over
their K samples.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.overrides import TorchFunctionMode

from landscape.checkpoint import verify_fingerprint
from landscape.config import TraceConfig
from landscape.errors import UserError
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.hessian import HessianOperator
from landscape.locking import surface_lock
from landscape.parameters import FlatParameters
from landscape.store import SurfaceFile, existing_surface, rewrite_group

log = logging.getLogger(__name__)

HUTCHINSON_LABEL = "tr(H) by Hutchinson (mean of z^T H z over Rademacher z; autograd HVPs)"
# Torch functions whose gradient jumps somewhere (a kink): ReLU and its relatives, hard
# clipping and shrinking, max pooling. ELU is smooth enough (C1) only with alpha = 1.
KINKED_FUNCTIONS = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "leaky_relu_",
        "prelu",
        "rrelu",
        "rrelu_",
        "selu",
        "selu_",
        "hardtanh",
        "hardtanh_",
        "hardswish",
        "hardsigmoid",
        "hardshrink",
        "softshrink",
        "threshold",
        "threshold_",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
        "abs",
        "clamp",
        "clamp_",
        "clip",
        "maximum",
        "minimum",
        "amax",
        "amin",
    }
)


def projection_label(step: float) -> str:
    """What the loss-value estimate is, with its absolute step e."""
    return (
        f"n × mean second difference of the loss at step ε = {step:.3g} (finite-difference "
        "curvature; includes kinks of non-smooth activations)"
    )


class KinkedCalls(TorchFunctionMode):
    """Counts the calls of kinked torch functions while active, whether a model calls
    them through modules (``nn.ReLU``, ``nn.MaxPool2d``) or directly (``F.relu``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in KINKED_FUNCTIONS or (name in ("elu", "elu_") and elu_alpha(args, kwargs) != 1):
            self.counts[name] += 1
        return func(*args, **kwargs)


def elu_alpha(args: tuple, kwargs: dict) -> float:
    """The alpha of a call ``elu(input, alpha=1.0, inplace=False)``."""
    return kwargs.get("alpha", args[1] if len(args) > 1 else 1.0)


@torch.no_grad()
def kinked_operations(model: nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    """Kinked functions one forward pass of ``model`` on ``inputs`` calls, with how often."""
    with KinkedCalls() as calls:
        model(inputs)
    return dict(sorted(calls.counts.items()))


class InFloat64(nn.Module):
    """A float64 copy of ``model`` that casts floating inputs to float64 as they come in,
    so the data set stays on the device in its own dtype (no float64 copy of it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.float64)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs.to(torch.float64) if inputs.is_floating_point() else inputs)


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
    """Curvature of the full-training-set mean loss at the model's parameters, over the
    parameters ``hessian.parameters`` selects (all, or the weights only)."""

    def __init__(self, experiment: Experiment, parameters: str, hvp: str, settings: TraceConfig):
        self.settings = settings
        self.inputs, self.targets = experiment.data.split("train")
        evaluation = experiment.config.evaluation
        self.batch_size, self.loss_name = evaluation.batch_size, evaluation.loss
        self.operator = HessianOperator(
            experiment.model,
            self.inputs,
            self.targets,
            self.loss_name,
            self.batch_size,
            parameters,
            hvp,
        )
        self.float64_model = InFloat64(experiment.model)
        self.flat = FlatParameters(self.float64_model.model)
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
        self.kinks = kinked_operations(experiment.model, self.inputs[:2])

    def loss(self) -> float:
        """The full-data mean loss of the float64 copy at its current parameters."""
        return evaluate(
            self.float64_model, self.inputs, self.targets, self.batch_size, self.loss_name
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
        directions, with step ``trace.step * ||theta||``, all in float64."""
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


def kinks_text(kinks: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in kinks.items())


def estimate_trace(path: str | Path, device: str | None = None) -> str:
    """``landscape trace``: both estimates at the centre of a surface file's plan, stored
    in its ``trace`` group (replacing an earlier one); returns a summary to print.

    The estimates need only the checkpoint, so jobs may write the file while they are
    computed; the result is stored under the surface's lock, waiting for a job that
    holds it, into the plan it was computed for.
    """
    path = existing_surface(path)
    with SurfaceFile.open(path) as surface:
        config, plan_id = surface.config, surface.plan_id
        planned_sha = surface.attrs["checkpoint_sha256"]
    verify_fingerprint(config.model.checkpoint, planned_sha, path)
    experiment = Experiment.load(config, device=device, checkpoint_sha256=planned_sha)
    settings, hessian = config.trace, config.hessian
    estimator = TraceEstimator(experiment, hessian.parameters, hessian.hvp, settings)
    log.info(
        "%s: curvature over %d parameters (%s) on %s, %d samples each way",
        path,
        estimator.dimension,
        hessian.parameters,
        experiment.device,
        settings.samples,
    )
    if estimator.kinks:
        log.warning(
            "the model has non-smooth operations (%s): the loss-value estimate includes their "
            "kinks at the scale of the step, Hutchinson's tr(H) does not; the two will differ",
            kinks_text(estimator.kinks),
        )
    started = time.perf_counter()
    projection = estimator.from_loss_values(settings.samples)
    middle = time.perf_counter()
    hutchinson = estimator.hutchinson(settings.samples)
    seconds = (middle - started, time.perf_counter() - middle)
    estimates = {"projection": projection, "hutchinson": hutchinson}
    with surface_lock(path, "landscape trace", wait=True):
        with SurfaceFile.open(path) as surface:
            if surface.plan_id != plan_id:
                raise UserError(
                    f"{path}: planned again while trace ran; run `landscape trace {path}` again"
                )
        rewrite_group(
            path,
            "trace",
            {name: estimate.samples for name, estimate in estimates.items()},
            {
                "dimension": estimator.dimension,
                "parameters": hessian.parameters,
                "samples": settings.samples,
                "step": estimator.step,
                "step_fraction": settings.step,
                "confidence": settings.confidence,
                "seconds": seconds,
                "projection_label": projection_label(estimator.step),
                "projection_dtype": "float64",
                "hutchinson_label": HUTCHINSON_LABEL,
                "hutchinson_dtype": experiment.config.evaluation.dtype,
                "non_smooth_operations": kinks_text(estimator.kinks),
                **{f"{name}_mean": e.mean for name, e in estimates.items()},
                **{f"{name}_half_width": e.half_width for name, e in estimates.items()},
            },
        )
    return trace_summary(estimator, experiment.config.evaluation.dtype, estimates, seconds)


def trace_summary(
    estimator: TraceEstimator,
    hvp_dtype: str,
    estimates: dict[str, TraceEstimate],
    seconds: tuple[float, float],
) -> str:
    settings, dimension, count = estimator.settings, estimator.dimension, estimator.settings.samples
    projection, hutchinson = estimates["projection"], estimates["hutchinson"]
    lines = [
        f"Curvature at the centre, n = {dimension} parameters "
        f"({settings.confidence:.0%} confidence intervals):",
        f"  {HUTCHINSON_LABEL}",
        f"      {hutchinson.mean:.6g} ± {hutchinson.half_width:.3g}   tr(H)/n = "
        f"{hutchinson.mean / dimension:.4g}; {count} probes ({count} HVPs in {hvp_dtype}, "
        f"{seconds[1]:.1f} s)",
        f"  {projection_label(estimator.step)}",
        f"      {projection.mean:.6g} ± {projection.half_width:.3g}   per parameter "
        f"{projection.mean / dimension:.4g}; ε = {settings.step:g} × ||θ||, {count} random "
        f"unit directions ({2 * count + 1} losses in float64, {seconds[0]:.1f} s)",
    ]
    if estimator.kinks:
        lines.append(
            f"  non-smooth operations ({kinks_text(estimator.kinks)}): the two measure "
            "different things and will differ"
        )
    return "\n".join(lines)
