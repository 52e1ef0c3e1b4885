"""Contains the Hessian of the full-data mean loss as a linear operator, and solvers for
its extreme eigenvalues.

The loss is the mean over all N training samples, L(theta) = (1/N) sum_i l_i(theta),
with the model in eval mode (BatchNorm uses its running statistics, so every l_i
depends on its own sample only). Its Hessian-vector product is accumulated over
batches as sum_b H_b v with H_b the Hessian of (1/N) sum_{i in b} l_i: each batch is
weighted by its share of the samples, so H v does not depend on the batch size (Li et
al.'s code sums batch means instead, which scales H with the number of batches).

Lanczos with full reorthogonalization reads both ends of the spectrum from one Krylov
space. An end is converged when its Ritz residual ||H y - theta y|| is at most
``tolerance * |theta|``: some eigenvalue lies within the residual of theta (the same
criterion ARPACK applies), and Ritz values approach the extremes from inside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, jvp

from pipeline.config import HessianConfig
from pipeline.evaluate import per_sample_loss
from pipeline.experiment import Experiment
from pipeline.parameters import DirectionPlane

log = logging.getLogger(__name__)

SHIFT_TOLERANCE = 1e-2  # what Li et al.'s code passes to ARPACK
SHIFT_FACTOR = 0.51


class HessianOperator(LinearOperator):
    """H of the mean loss over ``inputs`` w.r.t. the selected parameters, at the model's
    current parameter values (so moving the model moves the operator).

    ``parameters``: ``all`` trainable tensors, or ``weights``, those with more than one
    dimension (Li et al.'s choice: no biases, no BatchNorm scales). ``hvp``:
    ``forward_over_reverse`` (``jvp`` of ``grad``; a model with an operation that has no
    forward-mode rule falls back to double backward) or ``double_backward`` (faster for
    conv nets on CPU, see ``make bench``). ``hvps`` counts products.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss: str,
        batch_size: int,
        parameters: str = "all",
        hvp: str = "forward_over_reverse",
    ):
        self.model = model
        self.inputs, self.targets = inputs, targets
        self.loss, self.batch_size = loss, batch_size
        self.names = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad and (parameters == "all" or p.dim() > 1)
        ]
        selected = dict(model.named_parameters())
        self.shapes = [selected[name].shape for name in self.names]
        self.sizes = [selected[name].numel() for name in self.names]
        reference = selected[self.names[0]]
        self.device, self.torch_dtype = reference.device, reference.dtype
        self.hvps = 0
        self.forward_mode = hvp == "forward_over_reverse"
        size = sum(self.sizes)
        super().__init__(dtype=np.float64, shape=(size, size))

    def state(self) -> tuple[dict, dict]:
        """(selected parameters, everything else: other parameters and buffers), detached."""
        tensors = {name: t.detach() for name, t in self.model.named_parameters()}
        tensors.update(self.model.named_buffers())
        selected = {name: tensors.pop(name) for name in self.names}
        return selected, tensors

    def batch_loss(self, params: dict, fixed: dict, inputs, targets) -> torch.Tensor:
        outputs = functional_call(self.model, {**fixed, **params}, (inputs,))
        return per_sample_loss(outputs, targets, self.loss).sum() / len(self.inputs)

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H @ vector, as a flat tensor on the model's device (model's dtype)."""
        params, fixed = self.state()
        tangents = dict(
            zip(self.names, (t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)))
        )
        total = torch.zeros(vector.numel(), dtype=self.torch_dtype, device=self.device)
        for start in range(0, len(self.inputs), self.batch_size):
            batch = (
                self.inputs[start : start + self.batch_size],
                self.targets[start : start + self.batch_size],
            )
            total += torch.cat(
                [t.reshape(-1) for t in self.batch_hvp(params, fixed, tangents, batch)]
            )
        self.hvps += 1
        return total

    def batch_hvp(self, params: dict, fixed: dict, tangents: dict, batch) -> list[torch.Tensor]:
        if self.forward_mode:
            try:
                gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
                _, product = jvp(gradient, (params,), (tangents,))
                return [product[name] for name in self.names]
            except (RuntimeError, NotImplementedError) as exc:
                log.warning("forward-mode HVP unsupported (%s); using double backward", exc)
                self.forward_mode = False
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(leaves, fixed, *batch)
            gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            dot = sum((g * tangents[name]).sum() for g, name in zip(gradients, self.names))
            return list(torch.autograd.grad(dot, list(leaves.values())))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), device=self.device)
        return self.hvp(vector.to(self.torch_dtype)).double().cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric


@dataclass(frozen=True)
class Extremes:
    """Both ends of a spectrum as one solve found them."""

    lambda_min: float
    lambda_max: float
    residual_min: float
    residual_max: float
    hvps: int
    converged: bool


def converged(theta: float, residual: float, tolerance: float) -> bool:
    return residual <= tolerance * abs(theta)


@dataclass
class RitzPairs:
    """Chosen Ritz pairs of one Lanczos run: values, residuals, and the Krylov basis and
    coefficients to form the vectors (only if asked: n values per vector)."""

    values: np.ndarray
    residuals: np.ndarray
    steps: int
    converged: bool
    basis: torch.Tensor
    coefficients: np.ndarray  # (steps, len(values))

    def vectors(self) -> torch.Tensor:
        """(len(values), n) unit Ritz vectors, float64 on the basis's device."""
        coefficients = torch.as_tensor(self.coefficients, device=self.basis.device)
        vectors = (self.basis[: self.steps].T @ coefficients).T
        return vectors / vectors.norm(dim=1, keepdim=True)


def lanczos(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tolerance: float,
    max_hvps: int,
    which: tuple[int, ...] = (0, -1),
) -> RitzPairs:
    """Ritz pairs ``which`` (indices into the ascending Ritz values: 0 the smallest, -1
    the largest, -2 the second largest) from one Lanczos run with full reorthogonalization.

    The basis is kept in float64 on ``start``'s device (``max_hvps`` x n values at most);
    every product is orthogonalized twice against it (Kahan-Parlett: twice is enough), so
    no ghost eigenvalues appear. After each product the tridiagonal T_k is solved; the
    residual of Ritz pair (theta_i, y_i) is |beta_k * s_ki|, the last component of T_k's
    eigenvector times the next off-diagonal. It stops when every chosen pair has a
    residual of at most ``tolerance * |theta|``, or the Krylov space is exhausted.
    """
    size = start.numel()
    steps = min(max_hvps, size)
    basis = torch.empty(min(32, steps), size, dtype=torch.float64, device=start.device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = start.double() / start.double().norm()
    for step in range(steps):
        if step == len(basis):  # grow the basis by doubling, up to ``steps`` rows
            grown = torch.empty(min(2 * step, steps), size, dtype=basis.dtype, device=basis.device)
            grown[:step] = basis
            basis = grown
        basis[step] = vector
        product = hvp(vector).double()
        alphas.append(float(vector @ product))
        known = basis[: step + 1]
        for _ in range(2):
            product -= known.T @ (known @ product)
        beta = float(product.norm())
        thetas, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas))
        chosen = [index for index in which if -len(thetas) <= index < len(thetas)]
        residuals = np.abs(beta * vectors[-1, chosen])
        exhausted = beta <= 1e-12 * max(abs(thetas[0]), abs(thetas[-1]), 1e-300)
        done = len(chosen) == len(which) and (
            exhausted or all(converged(t, r, tolerance) for t, r in zip(thetas[chosen], residuals))
        )
        if done:
            break
        betas.append(beta)
        vector = product / beta
    return RitzPairs(thetas[chosen], residuals, step + 1, done, basis, vectors[:, chosen])


def lanczos_extremes(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tolerance: float,
    max_hvps: int,
) -> Extremes:
    """lambda_min and lambda_max from one Lanczos run (see :func:`lanczos`)."""
    pairs = lanczos(hvp, start, tolerance, max_hvps)
    (low, high), (residual_low, residual_high) = pairs.values, pairs.residuals
    return Extremes(
        float(low),
        float(high),
        float(residual_low),
        float(residual_high),
        pairs.steps,
        pairs.converged,
    )


def residual_norm(operator: HessianOperator, theta: float, vector: np.ndarray) -> float:
    vector = vector / np.linalg.norm(vector)
    return float(np.linalg.norm(operator @ vector - theta * vector))


def arpack_end(operator: LinearOperator, which: str, tolerance: float, start, max_hvps: int):
    """One end by ARPACK's implicitly restarted Lanczos: (theta, ritz vector) or NaNs."""
    try:
        values, vectors = eigsh(
            operator, k=1, which=which, tol=tolerance, v0=start, maxiter=max_hvps
        )
        return float(values[0]), vectors[:, 0]
    except ArpackNoConvergence:
        return float("nan"), np.full(operator.shape[0], np.nan)


def eigsh_extremes(
    operator: HessianOperator, start: np.ndarray, tolerance: float, max_hvps: int
) -> Extremes:
    """Two ARPACK solves, ``LA`` then ``SA``; residuals checked with one more HVP each."""
    before = operator.hvps
    top, top_vector = arpack_end(operator, "LA", tolerance, start, max_hvps)
    bottom, bottom_vector = arpack_end(operator, "SA", tolerance, start, max_hvps)
    hvps = operator.hvps - before
    return checked_extremes(operator, bottom, bottom_vector, top, top_vector, hvps, tolerance)


def shifted_extremes(
    operator: HessianOperator, start: np.ndarray, tolerance: float, max_hvps: int
) -> Extremes:
    """Li et al.'s recipe, for comparison only: lambda_max by ARPACK at tol 1e-2, then the
    largest-magnitude eigenvalue of H - 0.51 lambda_max I, shifted back. Near a minimum,
    where |lambda_min| << lambda_max, it stops early and lambda_min can be far off;
    the residual check below reports it unconverged at ``tolerance``."""
    before = operator.hvps
    top, top_vector = arpack_end(operator, "LM", SHIFT_TOLERANCE, start, max_hvps)
    shift = SHIFT_FACTOR * top
    shifted = LinearOperator(
        operator.shape, matvec=lambda v: operator @ v - shift * v, dtype=np.float64
    )
    bottom, bottom_vector = arpack_end(shifted, "LM", SHIFT_TOLERANCE, start, max_hvps)
    hvps = operator.hvps - before
    bottom += shift
    return checked_extremes(operator, bottom, bottom_vector, top, top_vector, hvps, tolerance)


def checked_extremes(operator, bottom, bottom_vector, top, top_vector, hvps, tolerance):
    """Extremes whose converged flag comes from their true residuals, not the solver's word."""
    if not (np.isfinite(bottom) and np.isfinite(top)):
        return Extremes(bottom, top, float("nan"), float("nan"), hvps, False)
    residual_min = residual_norm(operator, bottom, bottom_vector)
    residual_max = residual_norm(operator, top, top_vector)
    ok = converged(bottom, residual_min, tolerance) and converged(top, residual_max, tolerance)
    return Extremes(bottom, top, residual_min, residual_max, hvps, ok)


METHODS = ("lanczos", "eigsh", "shift")


def extreme_eigenvalues(
    operator: HessianOperator, method: str, start: torch.Tensor, tolerance: float, max_hvps: int
) -> Extremes:
    """lambda_min and lambda_max of ``operator`` by ``method`` (see METHODS)."""
    if method == "lanczos":
        return lanczos_extremes(
            lambda v: operator.hvp(v.to(operator.torch_dtype)), start, tolerance, max_hvps
        )
    solve = eigsh_extremes if method == "eigsh" else shifted_extremes
    return solve(operator, start.double().cpu().numpy(), tolerance, max_hvps)


class HessianEvaluator:
    """The hessian job's values at theta0 + a*d1 + b*d2: both extreme eigenvalues of the
    training-loss Hessian, their residuals, the HVPs spent and whether both converged.

    Every point starts Lanczos from the same seeded vector, so a point's values do not
    depend on which rank computes it or in which order.
    """

    def __init__(self, experiment: Experiment, directions: list[dict], settings: HessianConfig):
        self.plane = DirectionPlane(experiment.model, directions)
        inputs, targets = experiment.data.split("train")
        evaluation = experiment.config.evaluation
        self.operator = HessianOperator(
            experiment.model,
            inputs,
            targets,
            evaluation.loss,
            evaluation.batch_size,
            settings.parameters,
            settings.hvp,
        )
        generator = torch.Generator().manual_seed(settings.seed)
        start = torch.randn(self.operator.shape[0], generator=generator, dtype=torch.float64)
        self.start = start.to(experiment.device)
        self.settings = settings
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
