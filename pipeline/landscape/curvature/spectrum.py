"""Contains the Hessian's spectrum: its density by stochastic Lanczos quadrature, its
top-k eigenpairs, and the count of outliers above the bulk (Sagun et al. 2017, Fort &
Ganguli 2019).

**Stochastic Lanczos quadrature** (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019). The
spectral measure of a symmetric n x n H is mu = (1/n) sum_i delta(lambda_i), so
int f dmu = tr(f(H)) / n. For a Rademacher probe v (entries +-1, so ||v||^2 = n),
E[v^T f(H) v] = tr(f(H)), and m Lanczos steps from q = v / ||v|| turn the quadratic form
into Gauss quadrature: with T_m = S diag(theta) S^T the tridiagonal (in float64),

    q^T f(H) q  ~  sum_j w_j f(theta_j),   w_j = S_1j^2  (the nodes' weights, sum 1),

exact for every polynomial f of degree <= 2m - 1 (and for every f when the Krylov space
is exhausted, m >= the number of distinct eigenvalues v sees). Averaging over
``probes`` independent probes estimates int f dmu. Its error, for a polynomial f of
degree <= 2m - 1, is the Hutchinson error alone, with variance

    Var = (2 / n^2) (||f(H)||_F^2 - sum_i f(H)_ii^2) / probes

(Rademacher probes; Gaussian ones would have (2 / n^2) ||f(H)||_F^2, always larger, and
||v||^2 would vary, so the quadrature would be a ratio estimate: hence Rademacher). The
tests hold the moments tr(H^j) / n, j = 1..4, to 4 of these standard errors (computed
from the dense H) plus rounding: float64 products are exact to ~1e-13 ||H||^j, float32
products are H + E with ||E|| ~ eps ||H||, so about j eps ||H||^j. For
other f (the Gaussian broadening below) the quadrature adds an error that falls
with m as fast as f is smooth. Every product is reorthogonalized against the whole basis
(:func:`~landscape.curvature.lanczos.reorthogonalized_product`), so no ghost copies of
converged outliers take weight from the bulk.

**Top-k eigenpairs**: the k largest eigenvalues with unit eigenvectors from one Lanczos
run (:func:`~landscape.curvature.lanczos.lanczos`), each verified by its true residual.

**Outliers**: see :func:`count_outliers`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from landscape.curvature.lanczos import (
    ROUNDING_FLOOR,
    Criterion,
    RitzPairs,
    check_basis_memory,
    found_invariant,
    lanczos,
    reorthogonalized_product,
    start_vector,
)
from landscape.errors import UserError

# The grid of a density reaches this many broadenings past the outermost nodes (the
# Gaussian mass left outside is 2e-9) and spaces its points at most this fraction of
# one broadening apart (the trapezoid rule is then exact to far below that).
GRID_MARGIN = 6.0
GRID_SPACING = 0.25


def rademacher_probe(size: int, seed: int, index: int) -> torch.Tensor:
    """Probe ``index`` of a run seeded ``seed``: ``size`` independent +-1 entries (float64,
    on the CPU), from its own stream (numpy's SeedSequence of (seed, index)), so any
    probe can be drawn alone, in any order, on any rank."""
    signs = np.random.default_rng([seed, index]).integers(0, 2, size)
    return torch.as_tensor(2.0 * signs - 1.0)


def lanczos_tridiagonal(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    basis: torch.Tensor,
    floor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal alpha and off-diagonal beta of T_m from up to len(``basis``) Lanczos
    steps from ``start`` with full reorthogonalization (the rows of ``basis``, float64,
    are overwritten). It stops early where a step's new direction vanishes
    (:func:`~landscape.curvature.lanczos.found_invariant`, ``floor`` the products'
    rounding relative to the spectral scale): the Krylov space is then invariant and T
    has as many nodes as it has dimensions. No restart: the quadrature is of ``start``'s
    quadratic form, which that space holds whole."""
    vector = start.double().to(basis.device)
    vector = vector / vector.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(len(basis)):
        basis[step] = vector
        alpha, product, beta = reorthogonalized_product(hvp, basis[: step + 1], lambda v: v)
        alphas.append(alpha)
        scale = float(np.abs(eigh_tridiagonal(alphas, betas, eigvals_only=True)).max())
        if step + 1 == len(basis) or found_invariant(beta, scale, floor):
            break
        betas.append(beta)
        vector = product / beta
    return np.array(alphas), np.array(betas)


@dataclass(frozen=True)
class SpectralQuadrature:
    """The Gauss quadrature of the spectral measure from each probe (module docstring).

    ``nodes`` (probes, steps): the Ritz values theta_pj of probe p, ascending; NaN past
    the last node of a probe whose Krylov space was exhausted in fewer steps.
    ``weights`` (probes, steps): w_pj = (first component of T's eigenvector j)^2, each
    row summing to 1 (to rounding), 0 where there is no node. ``size``: n, the
    operator's dimension. ``hvps``: the products spent (one per Lanczos step)."""

    nodes: np.ndarray
    weights: np.ndarray
    size: int
    hvps: int

    @property
    def probes(self) -> int:
        return len(self.nodes)

    def moment_samples(self, power: int) -> np.ndarray:
        """Per probe: sum_j w_pj theta_pj^power = q_p^T H^power q_p = v_p^T H^power v_p / n,
        exact for power <= 2 m - 1 (m that probe's nodes); their mean over probes is the
        Hutchinson estimate of tr(H^power) / n."""
        present = np.isfinite(self.nodes)
        powers = np.where(present, np.where(present, self.nodes, 0.0) ** power, 0.0)
        return (self.weights * powers).sum(axis=1)

    def moments(self, power: int) -> float:
        """The estimate of tr(H^power) / n, the power-th moment of the spectral measure:
        the mean of :meth:`moment_samples` (standard error: see the module docstring)."""
        return float(self.moment_samples(power).mean())

    def span(self) -> tuple[float, float]:
        """The smallest and largest node over all probes: the spectral range the probes
        saw (Ritz values lie inside [lambda_min, lambda_max], and the outermost ones
        converge first)."""
        return float(np.nanmin(self.nodes)), float(np.nanmax(self.nodes))

    def broadening(self) -> float:
        """The default sigma of :meth:`density`: the spectral range over the number of
        Lanczos steps, the mean spacing of one probe's nodes. A narrower Gaussian shows
        each probe's nodes as separate spikes rather than a density; a wider one blurs
        the outliers into the bulk. Where all nodes coincide, 1e-3 of their magnitude
        (or 1e-3 if that is 0)."""
        low, high = self.span()
        steps = int(np.isfinite(self.nodes).sum(axis=1).max())
        if high > low:
            return (high - low) / steps
        return 1e-3 * (max(abs(low), abs(high)) or 1.0)

    def grid(self, sigma: float | None = None, points: int = 1024) -> np.ndarray:
        """An even grid for :meth:`density` with broadening ``sigma`` (default
        :meth:`broadening`): from GRID_MARGIN sigmas below the smallest node to as far
        above the largest, with at least ``points`` points spaced at most GRID_SPACING
        sigma apart, so that the trapezoid rule on it integrates the density to 1."""
        sigma = self.broadening() if sigma is None else sigma
        low, high = self.span()
        low, high = low - GRID_MARGIN * sigma, high + GRID_MARGIN * sigma
        count = max(points, math.ceil((high - low) / (GRID_SPACING * sigma)) + 1)
        return np.linspace(low, high, count)

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The Gaussian-broadened spectral density on ``grid``,

            phi(x) = (1 / probes) sum_p sum_j w_pj N(x; theta_pj, sigma^2),

        a probability density in x (it integrates to 1 over the real line, since each
        probe's weights sum to 1). ``sigma`` defaults to :meth:`broadening`."""
        if sigma is None:
            sigma = self.broadening()
        if not sigma > 0:
            raise UserError(f"sigma: the density's broadening is {sigma}; give a positive value")
        present = np.isfinite(self.nodes)
        nodes, weights = self.nodes[present], self.weights[present] / self.probes
        grid = np.asarray(grid, dtype=np.float64)
        distances = (grid[:, None] - nodes[None, :]) / sigma
        kernel = np.exp(-0.5 * distances**2) / (sigma * math.sqrt(2 * math.pi))
        return kernel @ weights


def stochastic_lanczos_quadrature(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    probes: int,
    steps: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> SpectralQuadrature:
    """The SLQ of the symmetric operator whose products are ``hvp`` (n = ``size``):
    ``probes`` Rademacher probes (:func:`rademacher_probe` with ``seed``), each run for
    ``steps`` Lanczos steps with full reorthogonalization (fewer where its Krylov space
    is exhausted; at most n), the tridiagonal solved in float64. ``dtype``: the
    products' dtype, whose rounding decides when a Krylov space counts as exhausted.
    The basis, min(steps, n) x n float64 values on ``device``, is allocated once and
    refused in one line where it cannot fit (naming ``steps``); it costs
    ``probes`` x ``steps`` products."""
    if probes < 1 or steps < 1:
        raise UserError(f"probes, steps: {probes} probes of {steps} steps; give at least 1 each")
    device = torch.device(device)
    check_basis_memory(size, steps, device, setting="steps", level=logging.DEBUG, products=False)
    columns = min(steps, size)
    basis = torch.empty(columns, size, dtype=torch.float64, device=device)
    nodes = np.full((probes, columns), np.nan)
    weights = np.zeros((probes, columns))
    floor = ROUNDING_FLOOR * torch.finfo(dtype).eps
    hvps = 0
    for probe in range(probes):
        start = rademacher_probe(size, seed, probe)
        alphas, betas = lanczos_tridiagonal(hvp, start, basis, floor)
        thetas, vectors = eigh_tridiagonal(alphas, betas)
        nodes[probe, : len(thetas)] = thetas
        weights[probe, : len(thetas)] = vectors[0] ** 2
        hvps += len(alphas)
    return SpectralQuadrature(nodes, weights, size, hvps)


def top_eigenpairs(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    k: int,
    tolerance: float,
    max_hvps: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> RitzPairs:
    """The ``k`` largest (algebraic) eigenvalues, descending, with unit eigenvectors (one
    float64 row each), from one Lanczos run with full reorthogonalization from the
    seeded start vector (:func:`~landscape.curvature.lanczos.start_vector`), within
    ``max_hvps`` products. Each pair's residual ||H y - theta y|| comes from the products
    Lanczos kept (one explicit product where rounding could decide) and is judged by
    :class:`~landscape.curvature.lanczos.Criterion` for ``tolerance`` in the products'
    ``dtype`` (``pair_converged``); then some eigenvalue lies within the residual of
    theta, and the eigenvector's angle to y is at most residual / gap (Davis-Kahan), gap
    the distance to the rest of the spectrum.
    ``project``: see :class:`~landscape.curvature.operators.GaugeProjection` (it only
    removes exact zeros, so the top-k of a Hessian with positive top-k is the same)."""
    if not 1 <= k <= size:
        raise UserError(f"top_k: {k} eigenpairs of a {size}-parameter Hessian; give 1 to {size}")
    if max_hvps < k:
        raise UserError(f"max_hvps: {max_hvps} products cannot find {k} eigenpairs; raise it")
    device = torch.device(device)
    check_basis_memory(size, max_hvps, device, setting="max_hvps", level=logging.DEBUG)
    criterion = Criterion.for_dtype(tolerance, dtype)
    which = tuple(range(-1, -k - 1, -1))
    return lanczos(hvp, start_vector(size, seed).to(device), criterion, max_hvps, which, project)


def ritz_bound(quadrature: SpectralQuadrature, rank: int) -> float:
    """A lower bound on the ``rank``-th largest eigenvalue (from 1) from the SLQ's nodes:
    the largest, over probes, of each probe's ``rank``-th largest node. By Cauchy
    interlacing the j-th largest Ritz value of any Krylov space is at most lambda_j, and
    Lanczos converges to the ends of the spectrum first, so a few dozen steps bring it
    close. (The quadrature mass would place the eigenvalue too, but each probe weighs
    one eigenvector by (v . u)^2 / n, chi-squared with one degree of freedom: with p
    probes the rank of a node is uncertain by about sqrt(2 rank / p), too coarse to step
    from lambda_k to lambda_{k+1}.) NaN where no probe has that many nodes."""
    ranked = -np.sort(-np.where(np.isfinite(quadrature.nodes), quadrature.nodes, -np.inf))
    if rank > ranked.shape[1]:
        return float("nan")
    column = ranked[:, rank - 1]
    return float(column.max()) if np.isfinite(column.max()) else float("nan")


@dataclass(frozen=True)
class Outliers:
    """The eigenvalues above the bulk (:func:`count_outliers`).

    ``count``: how many of the top eigenvalues are outliers. ``edge``: the top of the
    bulk, the eigenvalue just below the largest relative gap (the SLQ's bound on
    lambda_{k+1} where the gap is below all k computed ones). ``ratios``: lambda_i /
    lambda_{i+1} for i = 1..k, lambda_{k+1} the SLQ's lower bound on it (inf where only
    the upper one is positive, 0 where neither is). ``gap``: the relative gap asked
    for; every outlier exceeds edge * (1 + gap). ``saturated``: all k computed
    eigenvalues are outliers, so there may be more: compute more eigenpairs."""

    count: int
    edge: float
    ratios: np.ndarray
    gap: float
    saturated: bool

    @property
    def threshold(self) -> float:
        return self.edge * (1 + self.gap)


def count_outliers(
    top_values: np.ndarray, quadrature: SpectralQuadrature, gap: float = 0.5
) -> Outliers:
    """The outliers of a spectrum (Sagun et al.: the eigenvalues separated from the bulk
    near zero), by the largest relative gap below them.

    The k top eigenvalues lambda_1 >= ... >= lambda_k (exact, :func:`top_eigenpairs`) are
    followed by lambda_{k+1}, from the SLQ's nodes (:func:`ritz_bound`; lambda_k where
    the probes have too few nodes). The outliers are lambda_1..lambda_c with c the index of
    the largest ratio lambda_c / lambda_{c+1}, if that ratio is at least 1 + ``gap``, else
    none; lambda_{c+1} is the bulk edge. Ratios, not differences: the bulk sits near zero
    and outliers spread over decades, so the scale-free step from one eigenvalue to the
    next is what separates them (and the density is drawn on a log scale). The largest
    gap rather than the first above a threshold: the top of a small network's bulk is a
    sparse tail with ratios up to ~1.7 between neighbours (measured below), and
    hierarchical spectra (Papyan 2019: C outliers above C(C - 1) smaller ones) have
    several gaps, of which the largest marks the first level. k must exceed the count
    (``saturated`` says when it may not), and a k far above it lets a gap inside the
    bulk's tail compete: C + 2 for C classes.

    Measured on the dense Hessian (tests/test_spectrum.py: ReLU MLPs with one hidden
    layer of 16, trained by 300 steps of full-batch gradient descent at rate 0.5 to a
    cross-entropy of 1e-4 (C = 3) or 2e-4 (C = 6) on C Gaussian clusters in 20
    dimensions, means 12 from the origin, 50 points each): over four initialization
    seeds the largest gap is at C every time, lambda_C / lambda_{C+1} = 2.6 to 4.6 for
    C = 3 and 1.7 to 2.2 for C = 6, with at most 1.7 elsewhere among the top C + 2
    (2.7 once for C = 3, at C + 2). Farther apart clusters (means 20 from the origin)
    train to 1e-6 and lose it: a few samples' margins dominate and the largest gap falls
    anywhere. So ``gap`` = 0.5: a factor 1.5, which the edge of a smooth bulk (ratios
    near 1) does not reach, and which every measured class gap exceeds.

    C, not C - 1. Softmax cross-entropy has the Hessian of one sample in logit space
    diag(p) - p p^T, whose null vector (1, ..., 1) (the gauge) gives C - 1 outliers
    where the mean of it over a class is a full-rank C - 1 matrix, as at moderate loss
    (Fort & Ganguli's random model; we measure the largest gap at C - 1, a factor 2.0,
    for C = 3 with means 3 from the origin and loss 1e-2).
    Near zero loss a sample of class c with p_c = 1 - e has that matrix ~ e sum_k q_k
    (e_c - e_k)(e_c - e_k)^T, dominated by its nearest rival k: one direction per class,
    the gradient of its margin, so C outliers (Sagun et al.'s count), of unequal sizes
    (e is exponential in the margin).
    """
    if not gap > 0:
        raise UserError(f"gap: the outliers' relative gap is {gap}; give a positive value")
    values = np.sort(np.asarray(top_values, dtype=np.float64))[::-1]
    below = ritz_bound(quadrature, len(values) + 1)
    below = values[-1] if np.isnan(below) else min(below, values[-1])
    upper, lower = values, np.append(values[1:], below)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(lower > 0, upper / lower, np.where(upper > 0, np.inf, 0.0))
    largest = int(np.argmax(ratios))
    count = largest + 1 if ratios[largest] >= 1 + gap else 0
    edge = float(lower[largest]) if count else float(values[0])
    return Outliers(count, edge, ratios, gap, count == len(values))
