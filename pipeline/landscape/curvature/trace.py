"""Contains estimators of the Hessian's trace, from loss values (Boettcher & Wheeler) and
by Hutchinson or Hutch++, and of its squared Frobenius norm and Trace(H)/||H||_F.

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

The same products give the squared Frobenius norm: for Rademacher z, E[z z^T] = I, so
E[||H z||^2] = tr(H^T H) = ||H||_F^2 (:func:`trace_and_frobenius`). Hutch++ (Meyer,
Musco, Musco & Woodruff 2021) first spends 2s products on a sketch: Q, an orthonormal
basis of H S for s Rademacher columns S, and H Q. With P = I - Q Q^T,

    tr(H)     = tr(Q^T H Q) + E[(P g)^T H (P g)],
    ||H||_F^2 = ||H Q||_F^2 + E[||H P g||^2]       (P idempotent, H symmetric),

so each of K further probes g gives one sample of each: the exact part on the top
subspace plus a Hutchinson sample of the deflated rest, whose variance is small once Q
holds the outliers. Given Q the K samples are independent with the true mean, so the
Student-t interval holds as for Hutchinson (s = 0). Trace(H)/||H||_F is estimated as
mean(x) / sqrt(mean(y)) from the paired samples (x, y) and given a delta-method
interval (:class:`RatioEstimate`): asymptotic in K, with a bias of order 1/K.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.overrides import TorchFunctionMode

from landscape.curvature.operators import HessianOperator
from landscape.evaluate import evaluate
from landscape.parameters import FlatParameters

# Probes handed to HessianOperator.hvp_many at once: forward over reverse shares one pass
# over the data among them (demo ResNet-20, weights, batch 2048, one thread: 8 cost 0.78x
# the CPU time of 8 products); double backward makes one product each from its kept
# gradient graphs.
PROBES_PER_PASS = 8
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
    def standard_error(self) -> float:
        """The standard error of the mean, std(samples, ddof=1) / sqrt(K)."""
        return float(self.samples.std(ddof=1) / np.sqrt(len(self.samples)))

    @property
    def half_width(self) -> float:
        count = len(self.samples)
        quantile = stats.t.ppf(0.5 + self.confidence / 2, count - 1)
        return float(quantile * self.samples.std(ddof=1) / np.sqrt(count))

    def covers(self, value: float) -> bool:
        return abs(value - self.mean) <= self.half_width


class TraceEstimator:
    """Curvature of ``operator``'s full-data mean loss at the model's parameters, over the
    parameters it differentiates: Hutchinson by its products, and the second differences
    of the same objective's loss by a float64 copy of the model.

    ``step``: the second difference's step as a fraction of the selected parameters'
    norm; ``confidence``: of the intervals; ``seed``: of the random vectors, drawn one
    after the other from one generator (the loss-value directions first)."""

    def __init__(self, operator: HessianOperator, step: float, confidence: float, seed: int):
        self.operator, self.confidence = operator, confidence
        self.float64_model = InFloat64(operator.model)
        self.flat = FlatParameters(self.float64_model.model)
        selected = set(operator.names)
        self.mask = torch.cat(
            [
                torch.full((size,), name in selected, dtype=torch.bool)
                for name, size in zip(self.flat.names, self.flat.sizes)
            ]
        ).to(self.flat.vector.device)
        self.dimension = operator.shape[0]
        length = float(self.flat.origin[self.mask].norm())
        self.step = step * (length if length > 0 else 1.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.kinks = kinked_operations(operator.model, operator.samples.head(2)[0])

    def loss(self) -> float:
        """The full-data mean loss of the float64 copy at its current parameters."""
        operator = self.operator
        return evaluate(
            self.float64_model,
            operator.samples,
            operator.batch_size,
            operator.objective,
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
        directions, with step ``step * ||theta||``, all in float64."""
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
        return TraceEstimate(np.array(values), self.confidence)

    def hutchinson(self, samples: int) -> TraceEstimate:
        """z^T H z for ``samples`` Rademacher probes z (one HVP each), PROBES_PER_PASS of
        them sharing a pass over the data."""
        probes = torch.stack(
            [self.random_vector(rademacher=True)[self.mask] for _ in range(samples)]
        )
        values, _ = probe_samples(self.operator, probes, per_pass=PROBES_PER_PASS)
        return TraceEstimate(values, self.confidence)


def products(operator, vectors: torch.Tensor, per_pass: int) -> torch.Tensor:
    """H @ each row of (m, P) ``vectors``, float64 on the operator's device: ``per_pass``
    rows go to the operator's ``hvp_many`` where it has one
    (:meth:`~landscape.curvature.operators.HessianOperator.hvp_many`), else one ``hvp``
    each (in the operator's dtype)."""
    dtype = operator.torch_dtype
    if per_pass == 1 or not hasattr(operator, "hvp_many"):
        return torch.stack([operator.hvp(vector.to(dtype)).double() for vector in vectors])
    return torch.cat(
        [
            operator.hvp_many(vectors[start : start + per_pass].to(dtype)).double()
            for start in range(0, len(vectors), per_pass)
        ]
    )


def probe_samples(operator, probes: torch.Tensor, per_pass: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row z of ``probes`` (float64), z^T H z and ||H z||^2 from its one product."""
    values, squares = [], []
    for start in range(0, len(probes), per_pass):
        chunk = probes[start : start + per_pass]
        for probe, product in zip(chunk, products(operator, chunk, per_pass)):
            values.append(float(probe.to(product.device) @ product))
            squares.append(float(product @ product))
    return np.array(values), np.array(squares)


def rademacher_probes(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, size) float64 Rademacher signs (the signs of Gaussians, on the CPU)."""
    return torch.randn(count, size, generator=generator, dtype=torch.float64).sign()


@dataclass(frozen=True)
class RatioEstimate:
    """Trace(H)/||H||_F as mean(x) / sqrt(mean(y)) from K paired samples x (of tr(H)) and
    y (of ||H||_F^2), with its delta-method standard error: for f(a, b) = a / sqrt(b),
    grad f = (b^(-1/2), -a b^(-3/2) / 2) and se^2 = grad f^T C grad f / K, C the samples'
    2 x 2 covariance (ddof 1). The interval value +- t_(K-1) se is asymptotic in K."""

    value: float
    standard_error: float
    count: int
    confidence: float

    @classmethod
    def from_samples(
        cls, traces: np.ndarray, squares: np.ndarray, confidence: float
    ) -> RatioEstimate:
        a, b = traces.mean(), squares.mean()
        slope = np.array([b**-0.5, -0.5 * a * b**-1.5])
        covariance = np.cov(np.stack([traces, squares]), ddof=1)
        variance = float(slope @ covariance @ slope) / len(traces)
        return cls(
            float(a / np.sqrt(b)), float(np.sqrt(max(variance, 0.0))), len(traces), confidence
        )

    @property
    def half_width(self) -> float:
        return float(stats.t.ppf(0.5 + self.confidence / 2, self.count - 1) * self.standard_error)

    def covers(self, value: float) -> bool:
        return abs(value - self.value) <= self.half_width


@dataclass(frozen=True)
class TraceAndNorm:
    """tr(H), ||H||_F^2 and Trace(H)/||H||_F from the same K probes, and the products they
    cost (K for Hutchinson, 2 sketch + K for Hutch++)."""

    trace: TraceEstimate
    frobenius_squared: TraceEstimate
    ratio: RatioEstimate
    sketch: int
    hvps: int


def trace_and_frobenius(
    operator,
    samples: int,
    seed: int,
    confidence: float = 0.95,
    sketch: int = 0,
    per_pass: int = PROBES_PER_PASS,
) -> TraceAndNorm:
    """tr(H) and ||H||_F^2 of ``operator`` (anything with ``hvp``, ``torch_dtype`` and a
    ``shape``), each the mean of ``samples`` samples with its Student-t interval, and
    their ratio (see the module docstring): Hutchinson where ``sketch`` is 0, Hutch++
    with an s = ``sketch`` column sketch otherwise (s < P). Probes are float64 Rademacher
    vectors from a CPU generator seeded ``seed`` (the sketch's first), ``per_pass`` of
    them per pass over the data."""
    size = operator.shape[0]
    if samples < 2 or not 0 <= sketch < size:
        raise ValueError(f"samples {samples} (at least 2), sketch {sketch} (0 to {size - 1})")
    generator = torch.Generator().manual_seed(seed)
    exact_trace = exact_square = 0.0
    if sketch:
        sketched = products(operator, rademacher_probes(sketch, size, generator), per_pass)
        basis = torch.linalg.qr(sketched.cpu().T).Q.T  # (s, P), orthonormal rows
        on_basis = products(operator, basis, per_pass).cpu()
        exact_trace = float((basis * on_basis).sum())
        exact_square = float((on_basis**2).sum())
    probes = rademacher_probes(samples, size, generator)
    if sketch:
        probes = probes - (probes @ basis.T) @ basis
    traces, squares = probe_samples(operator, probes, per_pass)
    traces, squares = traces + exact_trace, squares + exact_square
    return TraceAndNorm(
        TraceEstimate(traces, confidence),
        TraceEstimate(squares, confidence),
        RatioEstimate.from_samples(traces, squares, confidence),
        sketch,
        samples + 2 * sketch,
    )
