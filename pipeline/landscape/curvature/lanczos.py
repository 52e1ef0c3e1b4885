"""Contains Lanczos with full reorthogonalization and the extreme-eigenvalue solvers of
a symmetric operator (ARPACK's ``eigsh``, Li et al.'s shift), with their stopping rule.

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
the true residual is 2 eps ||H||). So every chosen end is verified by its true residual
up to the products' rounding, and the residuals reported are those.

Most ends need no product for that. Lanczos keeps the products as computed, W = [H v_1
.. H v_k] before any orthogonalization, beside its basis V; a Ritz vector is y = V s, and
H is linear, so H y = W s + sum_j s_j e_j, e_j the rounding of the j-th product. The
residual ||W s - theta y|| is thus the true one to within rho = ||sum_j s_j e_j||, and no
better: the basis was built from the same rounded products, so Lanczos cannot see their
rounding, and ||W s - theta y|| reads about what |beta_k s_ki| reads (at the centre of
the reference's BatchNorm CNN in float32: 1.9e-6 where the true residual, float64, was
3.7e-5, rho = 10 eps S; one explicit float32 product read 5.1e-5). rho is of the order of
one product's rounding, which the floor's premise puts below floor * S, so an end whose
residual from W lies further than floor * S from its bound is decided by it
(:meth:`Criterion.decided`). Where the bound is well above the rounding, as for tol 1e-3
in float32, that is every end but a rare one, and the two products of the checks are
saved. The others (the bound at the floor, as for lambda_min = 0 at a semidefinite point,
or a residual within floor * S of its bound) are verified by one explicit product each,
as before. Keeping W costs a second float64 block as large as the basis
(:func:`basis_bytes`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from landscape.curvature import METHODS
from landscape.curvature.operators import CurvatureOperator
from landscape.errors import UserError
from landscape.memory import free_memory, in_units

log = logging.getLogger(__name__)

SHIFT_TOLERANCE = 1e-2  # what Li et al.'s code passes to ARPACK
SHIFT_FACTOR = 0.51
# Products in float32 err by up to ~2 eps ||H|| (measured on MLPs and a BN conv net on
# digits); 16 eps leaves room for larger sums without hiding a real residual.
ROUNDING_FLOOR = 16
# A Lanczos step whose new direction is this small (relative to the spectral scale, or
# below the products' rounding floor) found an invariant subspace.
INVARIANT = 1e-12
# The seeded random share of a warm start vector (warm_start_vector), against the two
# Ritz vectors of norm 1 each. 0.1 and 0.01 took the same HVPs on ResNet-20 (the Ritz
# vectors' own error dominates), and the larger keeps crossings in reach.
WARM_SEEDED = 0.1
# Consecutive Ritz vectors of one end whose |cosine| is below this are taken for two
# different eigenvectors (a crossing between the points): no path to extrapolate along.
SAME_EIGENVECTOR = 0.5


def start_vector(size: int, seed: int) -> torch.Tensor:
    """The seeded float64 Gaussian vector every solve of one run starts from (on the CPU:
    the same numbers on every device), so a result does not depend on where or in which
    order it is computed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, generator=generator, dtype=torch.float64)


def predicted_ritz_vectors(latest: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Each end's unit eigenvector at the next point of a shard's row, extrapolated from
    its Ritz vectors at the last two points (rows y_min, y_max of ``latest`` and
    ``previous``): 2 y_k - y_{k-1} after aligning y_{k-1}'s sign to y_k, normalized.

    Along a row an end's eigenvector u(t) is smooth where its eigenvalue is simple, so
    u(t + h) = 2 u(t) - u(t - h) + O(h^2), where u(t) alone is off by O(h): the start
    of the next solve is closer by a factor of the order of the step's angle (on the
    warm bench, 1 to 2 HVPs a point). The Ritz vectors' own error (residual / gap) is
    doubled, which is why a quadratic extrapolation from three points took more HVPs
    there, not fewer. An end whose two vectors are further apart than SAME_EIGENVECTOR
    (another eigenvector became the end in between) is carried as y_k alone."""
    latest, previous = latest.double(), previous.double().to(latest.device)
    cosines = (latest * previous).sum(dim=1, keepdim=True)
    extrapolated = 2 * latest - torch.sign(cosines) * previous
    extrapolated /= extrapolated.norm(dim=1, keepdim=True)
    return torch.where(cosines.abs() >= SAME_EIGENVECTOR, extrapolated, latest)


def warm_start_vector(recent: Sequence[torch.Tensor], seeded: torch.Tensor) -> torch.Tensor:
    """The start of a solve next to the last one or two of its shard, whose unit Ritz
    vectors (rows y_min, y_max) are ``recent``, oldest first: v0 = p_min + p_max +
    WARM_SEEDED * s / ||s||, s the seeded start, p each end's prediction: the Ritz
    vector of the last point, or with two points their extrapolation
    (:func:`predicted_ritz_vectors`).

    At a neighbouring point H changes little, so each end's eigenvector u is within a
    small angle d of its prediction p, and v0 has components of size ~d, not ~1/sqrt(n)
    as a random vector has, along every other eigenvector. Lanczos shrinks such
    components by a factor per step set by the spectral gaps, so it reaches an end's
    residual bound in about log(d / tol) steps instead of log(sqrt(n) / tol). Both ends
    share one vector because one Krylov space reads both ends: a block start
    [p_min, p_max], or one with a second Ritz vector per end, halves the degree of the
    Krylov polynomial each end gets for the same products, and took 13 to 15 HVPs a
    point on the warm bench where this vector took 8 to 10. The seeded share keeps every
    eigenvector in the Krylov space (an end that is another eigenvector than at the last
    point, after two eigenvalues cross, starts at ~WARM_SEEDED / sqrt(n), as from a cold
    start scaled down), and keeps v0 off an invariant subspace spanned by the two
    predictions."""
    latest = recent[-1].double()
    predicted = latest if len(recent) == 1 else predicted_ritz_vectors(latest, recent[-2])
    seeded = seeded.to(latest.device, torch.float64)
    vector = predicted.sum(dim=0) + WARM_SEEDED * seeded / seeded.norm()
    return vector / vector.norm()


@dataclass(frozen=True)
class Extremes:
    """Both ends of a spectrum as one solve found them, with their true residuals and
    (Lanczos only) their unit Ritz vectors, rows y_min, y_max (float64), from which the
    next point's solve may start (:func:`warm_start_vector`)."""

    lambda_min: float
    lambda_max: float
    residual_min: float
    residual_max: float
    hvps: int
    converged: bool
    vectors: torch.Tensor | None = field(default=None, compare=False, repr=False)


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
        "S = max(|lambda_min|, |lambda_max|); the residual ||W s - theta y|| from the products "
        "Lanczos kept (y = V s; true to within the products' rounding, < rounding_floor * S), "
        "or one explicit HVP of y where that lies within rounding_floor * S of the bound, and "
        "for eigsh and shift"
    )

    @classmethod
    def for_dtype(cls, tolerance: float, dtype: torch.dtype) -> Criterion:
        """``tolerance`` for products computed in ``dtype``: floored at ROUNDING_FLOOR of
        its machine epsilons."""
        return cls(tolerance, ROUNDING_FLOOR * torch.finfo(dtype).eps)

    def bound(self, theta: float, scale: float) -> float:
        return max(self.tolerance * max(abs(theta), self.tolerance * scale), self.floor * scale)

    def decided(self, theta: float, residual: float, scale: float) -> bool:
        """Whether a residual known only to within the products' rounding (floor * scale,
        as the one from kept products: see the module docstring) is on one side of the
        bound whatever that rounding was."""
        return abs(residual - self.bound(theta, scale)) > self.floor * scale

    def each(self, values: Sequence[float], residuals: Sequence[float], scale: float) -> np.ndarray:
        """Whether each pair (value, residual) meets the bound, as a boolean array."""
        return np.array([r <= self.bound(t, scale) for t, r in zip(values, residuals)], bool)

    def met(self, values: Sequence[float], residuals: Sequence[float], scale: float) -> bool:
        return bool(self.each(values, residuals, scale).all())


def ritz_residual(hvp: Callable[[torch.Tensor], torch.Tensor], theta: float, vector) -> float:
    """||H y - theta y|| for the unit vector y along ``vector``, by one explicit product:
    ARPACK's own estimates assume exact products, and it keeps none of them."""
    vector = torch.as_tensor(vector, dtype=torch.float64)
    vector = vector / vector.norm()
    return float((hvp(vector).double().to(vector.device) - theta * vector).norm())


@dataclass
class RitzPairs:
    """Chosen Ritz pairs of one Lanczos run: values, true residuals, unit vectors
    (float64, one row each), the spectral scale they converge against, and the products
    spent (one per Krylov step, one per explicit check). ``pair_converged``: each pair's true
    residual against the criterion; ``converged``: all of them, and the run stopped on
    its own test rather than on ``max_hvps``."""

    values: np.ndarray
    residuals: np.ndarray
    vectors: torch.Tensor
    scale: float
    hvps: int
    converged: bool
    pair_converged: np.ndarray
    checked: np.ndarray  # which residuals needed an explicit product (Criterion.decided)


def basis_bytes(max_hvps: int, size: int, products: bool = True) -> int:
    """The float64 Lanczos basis for ``size`` parameters, one row per step, and with
    ``products`` the products as computed beside it (:func:`lanczos` keeps both; the
    quadrature of :mod:`~landscape.curvature.spectrum` only the basis)."""
    return (2 if products else 1) * min(max_hvps, size) * size * 8


def check_basis_memory(
    size: int,
    max_hvps: int,
    device: torch.device,
    setting: str = "hessian.max_hvps",
    level: int = logging.INFO,
    products: bool = True,
) -> None:
    """Log (at ``level``) what the Lanczos basis for ``size`` parameters (with
    ``products``, and its products: :func:`basis_bytes`) may take, and refuse in one line,
    before anything is allocated, if that is more than ``device`` has free, naming the
    ``setting`` that sets the basis length (``max_hvps``)."""
    limit, need = min(max_hvps, size), basis_bytes(max_hvps, size, products)
    free = free_memory(device)
    log.log(
        level,
        "Lanczos basis: %d float64 vectors of %d parameters%s, %s (%s free on %s)",
        limit,
        size,
        " and their products" if products else "",
        in_units(need),
        "unknown" if free is None else in_units(free),
        device,
    )
    if free is None or need <= free:
        return
    fitting = free // basis_bytes(1, size, products)
    section = setting.rpartition(".")[0]  # whose parameters: selects them (hessian, analysis)
    remedy = (
        f"lower {setting} to {fitting} or fewer"
        if fitting >= 4
        else f"select fewer parameters ({section or 'hessian'}.parameters: weights) or use a "
        "larger device"
    )
    raise UserError(
        f"{setting}: {limit} Lanczos vectors of {size:,} parameters"
        f"{' and their products' if products else ''} need "
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


def reorthogonalized_product(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    known: torch.Tensor,
    keep: Callable[[torch.Tensor], torch.Tensor],
    computed: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, float]:
    """One Lanczos step with full reorthogonalization from the basis rows ``known``, the
    last of which is the current unit vector q: alpha = q^T H q (the next diagonal of T),
    the product H q (kept by ``keep``, in float64) orthogonalized twice against every row
    (Kahan-Parlett: twice is enough), and its norm beta (the next off-diagonal, before
    normalizing it into the next vector). ``computed``: a float64 row that receives H q
    as computed, before ``keep`` and the orthogonalization."""
    vector = known[-1]
    product = hvp(vector).double()
    if computed is not None:
        computed.copy_(product)
    product = keep(product)
    alpha = float(vector @ product)
    for _ in range(2):
        product -= known.T @ (known @ product)
    return alpha, product, float(product.norm())


def found_invariant(beta: float, scale: float, floor: float) -> bool:
    """Whether a step's new direction of length ``beta`` vanishes: relative to the spectral
    scale, below INVARIANT or below the products' rounding ``floor``; the Krylov space
    then is an invariant subspace of H."""
    return beta <= max(INVARIANT, floor) * max(scale, 1e-300)


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

    The basis V and the products W as computed are kept in float64 on ``start``'s
    device, min(``max_hvps``, n) x n values each allocated at once (see
    :func:`check_basis_memory`; on the CPU a page is only touched when a step fills it);
    every product is orthogonalized twice against the basis (Kahan-Parlett: twice is
    enough), so no ghost eigenvalues appear. After each product the tridiagonal T_k is
    solved; the estimated residual of Ritz pair (theta_i, y_i) is |beta_k * s_ki|, the
    last component of T_k's eigenvector times the next off-diagonal. It stops when every
    chosen pair's estimate meets ``criterion``; each chosen pair's residual
    ||W s - theta V s||, or where that is within the products' rounding of its bound one
    explicit product's (see the module docstring), then decides ``converged``.

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
    products = torch.empty_like(basis)  # H v_j as computed: W
    restarts = torch.Generator().manual_seed(0)
    exact: list[tuple[float, int, np.ndarray]] = []  # (theta, block's first row, coefficients)
    first, alphas, betas = 0, [], []  # the current block: its first row and T's diagonals
    vector = keep(start.double())
    vector = vector / vector.norm()
    steps, settled = 0, False
    while steps < limit:
        basis[steps] = vector
        steps += 1
        known = basis[:steps]
        alpha, product, beta = reorthogonalized_product(hvp, known, keep, products[steps - 1])
        alphas.append(alpha)
        thetas, ritz = eigh_tridiagonal(np.array(alphas), np.array(betas))
        scale = max([abs(thetas[0]), abs(thetas[-1])] + [abs(t) for t, _, _ in exact])
        if found_invariant(beta, scale, criterion.floor):
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
    values = np.array([theta for theta, _, _ in chosen])
    vectors, images = [], []  # y = V s and H y = W s, scaled to unit y
    for _, row, s in chosen:
        coefficients = torch.as_tensor(s, device=basis.device)
        vector = basis[row : row + len(s)].T @ coefficients
        length = vector.norm()
        vectors.append(vector / length)
        images.append(products[row : row + len(s)].T @ coefficients / length)
    vectors = torch.stack(vectors)
    residuals = np.array(
        [float((image - t * y).norm()) for t, y, image in zip(values, vectors, images)]
    )
    scale = max(abs(pairs[0][0]), abs(pairs[-1][0]))
    checked = np.array(
        [not criterion.decided(t, r, scale) for t, r in zip(values, residuals)], bool
    )
    for i in np.flatnonzero(checked):
        residuals[i] = ritz_residual(hvp, values[i], vectors[i])
    each = criterion.each(values, residuals, scale)
    return RitzPairs(
        values,
        residuals,
        vectors,
        scale,
        steps + int(checked.sum()),
        settled and len(chosen) == len(which) and bool(each.all()),
        each,
        checked,
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
        pairs.vectors,
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
    operator: CurvatureOperator, start: np.ndarray, criterion: Criterion, max_hvps: int
) -> Extremes:
    """Two ARPACK solves, ``LA`` then ``SA``; residuals checked with one more HVP each."""
    before = operator.hvps
    top = arpack_end(operator, "LA", criterion.tolerance, start, max_hvps)
    bottom = arpack_end(operator, "SA", criterion.tolerance, start, max_hvps)
    return checked_extremes(operator, bottom, top, before, criterion)


def shifted_extremes(
    operator: CurvatureOperator, start: np.ndarray, criterion: Criterion, max_hvps: int
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
    operator: CurvatureOperator,
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


def extreme_eigenvalues(
    operator: CurvatureOperator, method: str, start: torch.Tensor, tolerance: float, max_hvps: int
) -> Extremes:
    """lambda_min and lambda_max of ``operator`` by ``method`` (see METHODS), converged to
    ``tolerance`` as :class:`Criterion` says for the operator's dtype."""
    criterion = Criterion.for_dtype(tolerance, operator.torch_dtype)
    if method not in METHODS:
        raise ValueError(f"Solver {method!r}; choose from {METHODS}")
    if method == "lanczos":
        return lanczos_extremes(operator.hvp, start, criterion, max_hvps)
    solve = eigsh_extremes if method == "eigsh" else shifted_extremes
    return solve(operator, start.double().cpu().numpy(), criterion, max_hvps)
