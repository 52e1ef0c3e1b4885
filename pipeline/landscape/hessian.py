"""Contains the Hessian of the full-data mean loss as a linear operator, and solvers for
its extreme eigenvalues.

The loss is the mean over all N training samples, L(theta) = (1/N) sum_i l_i(theta),
with the model in eval mode (BatchNorm uses its running statistics, so every l_i
depends on its own sample only). Its Hessian-vector product is accumulated over
batches as sum_b H_b v with H_b the Hessian of (1/N) sum_{i in b} l_i: each batch is
weighted by its share of the samples, so H v does not depend on the batch size (Li et
al.'s code sums batch means instead, which scales H with the number of batches).

Products (HVPs) are ``jvp`` of ``grad`` (forward over reverse) or double backward. The
mode is decided once, when the operator is built, by one product on a two-sample batch,
never inside a run: an interrupt or any other error during a product stops the job.
Attention runs on the math kernel of ``scaled_dot_product_attention`` during products,
since the fused kernels have no double backward.

Lanczos with full reorthogonalization reads both ends of the spectrum from one Krylov
space. An end theta with unit Ritz vector y is converged (:class:`Criterion`) when

    ||H y - theta y|| <= max(tol * max(|theta|, tol * S), floor * S),
    S = max(|theta_min|, |theta_max|),  floor = ROUNDING_FLOOR * eps,

tol being ``hessian.tolerance`` and eps the machine epsilon of the products' dtype.
Some eigenvalue lies within the residual of theta (the bound ARPACK uses) and Ritz
values approach the extremes from inside, so an end is exact to tol relative to
itself, or to tol^2 S where it is smaller than tol S, and |lambda_min / lambda_max| to
tol (2 |ratio| + tol). The bound cannot vanish: relative to |theta| alone it never
passes where lambda_min = 0 exactly, as at every positive-semidefinite point of a
softmax classifier (see :class:`GaugeProjection`). It is not relaxed to tol S for
lambda_min: a residual says that some eigenvalue is near theta, not that it is the
smallest, and at a trained MLP's minimum Lanczos then stops on the bulk near zero and
reports lambda_min = +4e-4 for -0.017 (tests/test_hessian.py). The floor is where
products stop being exact: in float32 a product is good to about 2 eps ||H||, and
Lanczos' own residual estimate |beta_k s_ki| assumes exact products (it reads 0 where
the true residual is 2 eps ||H||). So every chosen end is verified by one explicit
product of its Ritz vector, and the residuals reported are those true ones.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.config import HessianConfig
from landscape.errors import Interrupted, UserError, describe
from landscape.evaluate import per_sample_loss
from landscape.experiment import Experiment
from landscape.parameters import DirectionPlane

log = logging.getLogger(__name__)

SHIFT_TOLERANCE = 1e-2  # what Li et al.'s code passes to ARPACK
SHIFT_FACTOR = 0.51
# Products in float32 err by up to ~2 eps ||H|| (measured on MLPs and a BN conv net on
# digits); 16 eps leaves room for larger sums without hiding a real residual.
ROUNDING_FLOOR = 16
# A Lanczos step whose new direction is this small (relative to the spectral scale, or
# below the products' rounding floor) found an invariant subspace.
INVARIANT = 1e-12
HVP_MODES = {"forward_over_reverse": "jvp of grad", "double_backward": "double backward"}


@contextmanager
def product_context() -> Iterator[None]:
    """Around every HVP: the math kernel of scaled_dot_product_attention (the fused CPU
    and GPU kernels have no double backward), and an interrupt raised again as itself
    where TorchScript (torch's forward-mode decompositions) wrapped it in a RuntimeError
    (:func:`wrapped_interrupt`), so an interrupt always stops the job, with its status."""
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except RuntimeError as exc:
        interrupt = wrapped_interrupt(exc)
        if interrupt is not None:
            raise interrupt from None
        raise


WRAPPED_INTERRUPT = re.compile(r"\bKeyboardInterrupt\b|\bInterrupted: signal (\d+)")


def wrapped_interrupt(exc: RuntimeError) -> KeyboardInterrupt | None:
    """The interrupt inside ``exc``: the original where the exception chain keeps it, else
    one rebuilt from the message, which is all TorchScript keeps (``Interrupted: signal
    15``, see :class:`landscape.errors.Interrupted`): a SIGTERM stays a SIGTERM (exit 143)."""
    seen, inner = set(), exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, KeyboardInterrupt):
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    found = WRAPPED_INTERRUPT.search(str(exc))
    if found is None:
        return None
    return Interrupted(int(found[1])) if found[1] else KeyboardInterrupt()


class HessianOperator(LinearOperator):
    """H of the mean loss over ``inputs`` w.r.t. the selected parameters, at the model's
    current parameter values (so moving the model moves the operator).

    ``parameters``: ``all`` trainable tensors, or ``weights``, those with more than one
    dimension (Li et al.'s choice: no biases, no BatchNorm scales). ``hvp``:
    ``forward_over_reverse`` (``jvp`` of ``grad``) or ``double_backward`` (faster for
    conv nets on CPU, see ``make bench``); a model with an operation that has no
    forward-mode rule gets double backward (see :meth:`choose_mode`). ``hvps`` counts
    products.
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
        size = sum(self.sizes)
        super().__init__(dtype=np.float64, shape=(size, size))
        self.mode = self.choose_mode(hvp)

    def state(self) -> tuple[dict, dict]:
        """(selected parameters, everything else: other parameters and buffers), detached."""
        tensors = {name: t.detach() for name, t in self.model.named_parameters()}
        tensors.update(self.model.named_buffers())
        selected = {name: tensors.pop(name) for name in self.names}
        return selected, tensors

    def batch_loss(self, params: dict, fixed: dict, inputs, targets) -> torch.Tensor:
        outputs = functional_call(self.model, {**fixed, **params}, (inputs,))
        return per_sample_loss(outputs, targets, self.loss).sum() / len(self.inputs)

    def choose_mode(self, requested: str) -> str:
        """The product mode of every HVP of this operator, tried once on two samples:
        ``requested``, else double backward (an operation without a forward-mode rule).
        A model that cannot be differentiated twice at all is refused in one line."""
        params, fixed = self.state()
        probe = (self.inputs[:2], self.targets[:2])
        with torch.no_grad():  # a model that fails to run at all fails here, as itself
            self.batch_loss(params, fixed, *probe)
        tangents = {name: torch.ones_like(p) for name, p in params.items()}
        candidates = dict.fromkeys([requested, "double_backward"])
        for mode in candidates:
            try:
                with product_context():
                    self.batch_hvp(mode, params, fixed, tangents, probe)
            except (RuntimeError, NotImplementedError) as exc:
                reason = describe(exc)
                log.warning("Hessian-vector products by %s fail: %s", HVP_MODES[mode], reason)
                continue
            log.info("Hessian-vector products: %s", HVP_MODES[mode])
            return mode
        raise UserError(
            f"hessian.hvp: the model cannot be differentiated twice, which Hessian-vector "
            f"products need ({reason}); replace that operation by one with a double "
            "backward (attention: F.scaled_dot_product_attention or nn.MultiheadAttention, "
            "whose math kernel products use), or leave the model out of Hessian maps"
        )

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H @ vector (any dtype and device), as a flat tensor on the model's device, in the
        model's dtype."""
        vector = vector.to(self.device, self.torch_dtype)
        params, fixed = self.state()
        tangents = dict(
            zip(self.names, (t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)))
        )
        total = torch.zeros(vector.numel(), dtype=self.torch_dtype, device=self.device)
        with product_context():
            for start in range(0, len(self.inputs), self.batch_size):
                batch = (
                    self.inputs[start : start + self.batch_size],
                    self.targets[start : start + self.batch_size],
                )
                product = self.batch_hvp(self.mode, params, fixed, tangents, batch)
                total += torch.cat([t.reshape(-1) for t in product])
        self.hvps += 1
        return total

    def batch_hvp(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        if mode == "forward_over_reverse":
            gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
            _, product = jvp(gradient, (params,), (tangents,))
            return [product[name] for name in self.names]
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(leaves, fixed, *batch)
            gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            dot = sum((g * tangents[name]).sum() for g, name in zip(gradients, self.names))
            return list(torch.autograd.grad(dot, list(leaves.values())))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.as_tensor(np.ascontiguousarray(x).reshape(-1))
        return self.hvp(vector).double().cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric


class GaugeProjection:
    """The orthogonal projection off the softmax gauge directions of a classifier.

    Softmax ignores one number added to all logits of a sample, so when the model's
    output is the output z = W h + b of its last Linear layer, the cross-entropy does
    not change along W + 1 c^T (one direction per input of the layer) nor along b + c 1:
    L(theta + t g) = L(theta) for every theta, hence H g = 0 everywhere. Projecting
    them out (subtracting the mean over the rows of W's block, and the mean of b's)
    leaves the Hessian on the moves the model's function can feel; Lanczos on it finds
    the same nonzero eigenpairs, and at a positive-semidefinite point a lambda_min
    eigenvector that is not a flat symmetry of the parametrization.
    """

    def __init__(self, layer: str, blocks: list[tuple[int, int, int]]):
        self.layer = layer
        self.blocks = blocks  # (offset, rows, columns) in the flat vector; a bias has 1 column
        self.count = sum(columns for _, _, columns in blocks)

    @classmethod
    def find(cls, operator: HessianOperator) -> GaugeProjection | None:
        """The projection for ``operator``'s selected parameters, or None where the loss is
        not cross-entropy or the model's output is not its last Linear layer's output
        (checked on one sample: the very tensor the layer returned)."""
        model = operator.model
        linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if operator.loss != "cross_entropy" or not linear:
            return None
        name, layer = linear[-1]
        seen = []
        hook = layer.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            with torch.no_grad():
                output = model(operator.inputs[:1])
        finally:
            hook.remove()
        if not seen or seen[-1] is not output:
            return None
        offsets = dict(zip(operator.names, np.cumsum([0, *operator.sizes[:-1]])))
        prefix = f"{name}." if name else ""
        blocks = [
            (int(offsets[prefix + key]), rows, columns)
            for key, rows, columns in (
                ("weight", layer.out_features, layer.in_features),
                ("bias", layer.out_features, 1),
            )
            if prefix + key in offsets
        ]
        return cls(name, blocks) if blocks else None

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        projected = vector.clone()
        for offset, rows, columns in self.blocks:
            block = projected[offset : offset + rows * columns].view(rows, columns)
            block -= block.mean(dim=0, keepdim=True)
        return projected


@dataclass(frozen=True)
class Extremes:
    """Both ends of a spectrum as one solve found them, with their true residuals."""

    lambda_min: float
    lambda_max: float
    residual_min: float
    residual_max: float
    hvps: int
    converged: bool


@dataclass(frozen=True)
class Criterion:
    """When a Ritz pair (theta, y) counts as converged: its residual ||H y - theta y|| at
    most ``bound(theta, scale)`` = max(tolerance * max(|theta|, tolerance * scale),
    floor * scale), with ``scale`` the larger magnitude of the two ends (see the module
    docstring for why)."""

    tolerance: float
    floor: float  # relative to the scale: the products' rounding

    TEXT = (
        "||H y - theta y|| <= max(tolerance * max(|theta|, tolerance * S), rounding_floor * S), "
        "S = max(|lambda_min|, |lambda_max|); the residual from one explicit HVP of the Ritz "
        "vector y"
    )

    @classmethod
    def for_dtype(cls, tolerance: float, dtype: torch.dtype) -> Criterion:
        """``tolerance`` for products computed in ``dtype``: floored at ROUNDING_FLOOR of
        its machine epsilons."""
        return cls(tolerance, ROUNDING_FLOOR * torch.finfo(dtype).eps)

    def bound(self, theta: float, scale: float) -> float:
        return max(self.tolerance * max(abs(theta), self.tolerance * scale), self.floor * scale)

    def met(self, values: Sequence[float], residuals: Sequence[float], scale: float) -> bool:
        return all(r <= self.bound(t, scale) for t, r in zip(values, residuals))


def ritz_residual(hvp: Callable[[torch.Tensor], torch.Tensor], theta: float, vector) -> float:
    """||H y - theta y|| for the unit vector y along ``vector``, by one explicit product:
    the solvers' own estimates assume exact products."""
    vector = torch.as_tensor(vector, dtype=torch.float64)
    vector = vector / vector.norm()
    return float((hvp(vector).double().to(vector.device) - theta * vector).norm())


@dataclass
class RitzPairs:
    """Chosen Ritz pairs of one Lanczos run: values, true residuals, unit vectors
    (float64, one row each), the spectral scale they converge against, and the products
    spent (Krylov steps plus one check per pair)."""

    values: np.ndarray
    residuals: np.ndarray
    vectors: torch.Tensor
    scale: float
    hvps: int
    converged: bool


def basis_bytes(max_hvps: int, size: int) -> int:
    """The float64 Lanczos basis for ``size`` parameters: one row per step."""
    return min(max_hvps, size) * size * 8


def free_memory(device: torch.device) -> int | None:
    """Bytes a new tensor can take on ``device``: free GPU memory plus what PyTorch's
    cache holds unused; on the CPU, the kernel's MemAvailable; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def in_units(count: float) -> str:
    """A byte count for people: ``162 GiB``, ``81.4 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.3g} {unit}"
        count /= 1024


def check_basis_memory(size: int, max_hvps: int, device: torch.device) -> None:
    """Log what the Lanczos basis for ``size`` parameters may take, and refuse in one line,
    before anything is allocated, if that is more than ``device`` has free."""
    limit, need, free = min(max_hvps, size), basis_bytes(max_hvps, size), free_memory(device)
    log.info(
        "Lanczos basis: %d float64 vectors of %d parameters, %s (%s free on %s)",
        limit,
        size,
        in_units(need),
        "unknown" if free is None else in_units(free),
        device,
    )
    if free is None or need <= free:
        return
    fitting = free // (size * 8)
    remedy = (
        f"lower hessian.max_hvps to {fitting} or fewer"
        if fitting >= 4
        else "select fewer parameters (hessian.parameters: weights) or use a larger device"
    )
    raise UserError(
        f"hessian.max_hvps: {limit} Lanczos vectors of {size:,} parameters need "
        f"{in_units(need)} (float64) but {device} has {in_units(free)} free; {remedy}"
    )


def fresh_vector(
    basis: torch.Tensor, keep: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator
) -> torch.Tensor | None:
    """A seeded random unit vector orthogonal to ``basis`` (and kept by ``keep``), or None
    when the basis already spans the whole space."""
    draw = torch.randn(basis.shape[1], generator=generator, dtype=torch.float64)
    vector = keep(draw.to(basis.device))
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    length = float(vector.norm())
    return vector / length if length > 1e-8 * float(draw.norm()) else None


def lanczos(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    criterion: Criterion,
    max_hvps: int,
    which: tuple[int, ...] = (0, -1),
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RitzPairs:
    """Ritz pairs ``which`` (indices into the ascending Ritz values: 0 the smallest, -1
    the largest, -2 the second largest) from one Lanczos run with full reorthogonalization.

    The basis is kept in float64 on ``start``'s device, min(``max_hvps``, n) x n values
    allocated at once (see :func:`check_basis_memory`; on the CPU a page is only touched
    when a step fills it); every product is orthogonalized twice against it
    (Kahan-Parlett: twice is enough), so no ghost eigenvalues appear. After each product
    the tridiagonal T_k is solved; the estimated residual of Ritz pair (theta_i, y_i) is
    |beta_k * s_ki|, the last component of T_k's eigenvector times the next off-diagonal.
    It stops when every chosen pair's estimate meets ``criterion``; each chosen pair is
    then checked by one explicit product, whose residual decides ``converged``.

    A vanishing beta_k means the Krylov space is an invariant subspace (the start vector
    lay in one, e.g. H v0 = 0): its Ritz pairs are exact eigenpairs, but say nothing of
    the eigenvalues outside it. They are kept, and Lanczos starts a new block from a
    seeded random vector orthogonal to the basis, which explores the rest; the ends are
    chosen among all blocks' pairs once the current block's own ends have converged (or
    no vector is left outside the basis). ``project``: an orthogonal projection applied
    to the start vector and every product (:class:`GaugeProjection`), which restricts
    the Hessian to its range.
    """
    keep = project or (lambda vector: vector)
    size = start.numel()
    limit = min(max_hvps, size)
    basis = torch.empty(limit, size, dtype=torch.float64, device=start.device)
    restarts = torch.Generator().manual_seed(0)
    exact: list[tuple[float, int, np.ndarray]] = []  # (theta, block's first row, coefficients)
    first, alphas, betas = 0, [], []  # the current block: its first row and T's diagonals
    vector = keep(start.double())
    vector = vector / vector.norm()
    steps, settled = 0, False
    while steps < limit:
        basis[steps] = vector
        product = keep(hvp(vector).double())
        steps += 1
        alphas.append(float(vector @ product))
        known = basis[:steps]
        for _ in range(2):
            product -= known.T @ (known @ product)
        beta = float(product.norm())
        thetas, ritz = eigh_tridiagonal(np.array(alphas), np.array(betas))
        scale = max([abs(thetas[0]), abs(thetas[-1])] + [abs(t) for t, _, _ in exact])
        if beta <= max(INVARIANT, criterion.floor) * max(scale, 1e-300):
            exact += [(theta, first, ritz[:, i]) for i, theta in enumerate(thetas)]
            first, alphas, betas = steps, [], []
            vector = fresh_vector(known, keep, restarts)
            if vector is None:
                settled = True
                break
            continue
        ends = list(which)
        if len(thetas) >= len(ends):
            settled = criterion.met(thetas[ends], np.abs(beta * ritz[-1, ends]), scale)
            if settled:
                break
        betas.append(beta)
        vector = product / beta
    current = []
    if alphas:
        current = [(theta, first, ritz[:, i]) for i, theta in enumerate(thetas)]
    pairs = sorted(exact + current, key=lambda pair: pair[0])
    chosen = [pairs[index] for index in which if -len(pairs) <= index < len(pairs)]
    vectors = torch.stack(
        [
            basis[row : row + len(s)].T @ torch.as_tensor(s, device=basis.device)
            for _, row, s in chosen
        ]
    )
    vectors /= vectors.norm(dim=1, keepdim=True)
    values = np.array([theta for theta, _, _ in chosen])
    residuals = np.array([ritz_residual(hvp, t, y) for t, y in zip(values, vectors)])
    scale = max(abs(pairs[0][0]), abs(pairs[-1][0]))
    return RitzPairs(
        values,
        residuals,
        vectors,
        scale,
        steps + len(chosen),
        settled and len(chosen) == len(which) and criterion.met(values, residuals, scale),
    )


def lanczos_extremes(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    criterion: Criterion,
    max_hvps: int,
) -> Extremes:
    """lambda_min and lambda_max from one Lanczos run (see :func:`lanczos`)."""
    pairs = lanczos(hvp, start, criterion, max_hvps)
    (low, high), (residual_low, residual_high) = pairs.values, pairs.residuals
    return Extremes(
        float(low),
        float(high),
        float(residual_low),
        float(residual_high),
        pairs.hvps,
        pairs.converged,
    )


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
    operator: HessianOperator, start: np.ndarray, criterion: Criterion, max_hvps: int
) -> Extremes:
    """Two ARPACK solves, ``LA`` then ``SA``; residuals checked with one more HVP each."""
    before = operator.hvps
    top = arpack_end(operator, "LA", criterion.tolerance, start, max_hvps)
    bottom = arpack_end(operator, "SA", criterion.tolerance, start, max_hvps)
    return checked_extremes(operator, bottom, top, before, criterion)


def shifted_extremes(
    operator: HessianOperator, start: np.ndarray, criterion: Criterion, max_hvps: int
) -> Extremes:
    """Li et al.'s recipe, for comparison only: lambda_max by ARPACK at tol 1e-2, then the
    largest-magnitude eigenvalue of H - 0.51 lambda_max I, shifted back. Near a minimum,
    where |lambda_min| << lambda_max, it stops early and lambda_min can be far off;
    the residual check below reports it unconverged by ``criterion``."""
    before = operator.hvps
    top, top_vector = arpack_end(operator, "LM", SHIFT_TOLERANCE, start, max_hvps)
    shift = SHIFT_FACTOR * top
    shifted = LinearOperator(
        operator.shape, matvec=lambda v: operator @ v - shift * v, dtype=np.float64
    )
    bottom, bottom_vector = arpack_end(shifted, "LM", SHIFT_TOLERANCE, start, max_hvps)
    return checked_extremes(
        operator, (bottom + shift, bottom_vector), (top, top_vector), before, criterion
    )


def checked_extremes(
    operator: HessianOperator,
    bottom: tuple[float, np.ndarray],
    top: tuple[float, np.ndarray],
    hvps_before: int,
    criterion: Criterion,
) -> Extremes:
    """Extremes whose residuals are checked by one explicit product each (counted in
    ``hvps``) and whose converged flag comes from them, not from the solver's word."""
    (low, low_vector), (high, high_vector) = bottom, top
    if not (np.isfinite(low) and np.isfinite(high)):
        nan = float("nan")
        return Extremes(low, high, nan, nan, operator.hvps - hvps_before, False)
    residuals = [
        ritz_residual(operator.hvp, t, y) for t, y in ((low, low_vector), (high, high_vector))
    ]
    ok = criterion.met((low, high), residuals, max(abs(low), abs(high)))
    return Extremes(low, high, *residuals, operator.hvps - hvps_before, ok)


METHODS = ("lanczos", "eigsh", "shift")


def extreme_eigenvalues(
    operator: HessianOperator, method: str, start: torch.Tensor, tolerance: float, max_hvps: int
) -> Extremes:
    """lambda_min and lambda_max of ``operator`` by ``method`` (see METHODS), converged to
    ``tolerance`` as :class:`Criterion` says for the operator's dtype."""
    criterion = Criterion.for_dtype(tolerance, operator.torch_dtype)
    if method == "lanczos":
        return lanczos_extremes(operator.hvp, start, criterion, max_hvps)
    solve = eigsh_extremes if method == "eigsh" else shifted_extremes
    return solve(operator, start.double().cpu().numpy(), criterion, max_hvps)


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
        floor = Criterion.for_dtype(settings.tolerance, self.operator.torch_dtype).floor
        if settings.tolerance < floor:
            log.warning(
                "hessian.tolerance %.1e is below what %s products resolve: residuals are "
                "only checked down to %.1e x max(|lambda_min|, |lambda_max|)",
                settings.tolerance,
                evaluation.dtype,
                floor,
            )
        if settings.method == "lanczos":
            check_basis_memory(self.operator.shape[0], settings.max_hvps, experiment.device)
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
