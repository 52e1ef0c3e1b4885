"""Lanczos on dense symmetric matrices whose spectrum numpy knows: both ends to the
criterion, the restart when the Krylov space is exhausted, a run that fills the space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape.curvature.lanczos import (
    ROUNDING_FLOOR,
    Criterion,
    lanczos,
    ritz_residual,
    start_vector,
)

DTYPES = [torch.float32, torch.float64]


def symmetric(eigenvalues: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q, and Q."""
    size = len(eigenvalues)
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    return (basis * eigenvalues) @ basis.T, basis


def products(matrix: np.ndarray, dtype: torch.dtype):
    """H @ v computed in ``dtype``, as a Hessian operator's products are."""
    dense = torch.as_tensor(matrix, dtype=dtype)
    return lambda vector: dense @ vector.to(dtype)


def assert_ends(pairs, exact: np.ndarray, criterion: Criterion) -> None:
    """Each end lies within its residual of an eigenvalue, the residual meets the
    criterion, and the eigenvalue is the true end (Ritz values approach from inside).
    The residual is that of the computed products, off from the exact one by their
    rounding: one eps of the products' dtype times the scale (float32: 7e-8 where the
    residual read 5.6e-8 and the exact one is at least 7.3e-8)."""
    assert pairs.converged
    scale = np.abs(exact).max()
    rounding = criterion.floor / ROUNDING_FLOOR * scale
    for value, residual, truth in zip(pairs.values, pairs.residuals, exact[[0, -1]]):
        assert residual <= criterion.bound(value, scale)
        assert abs(value - truth) <= residual + rounding, (value, truth, residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_ends_of_an_indefinite_spectrum_to_the_criterion(dtype):
    eigenvalues = np.concatenate([[-3.0], np.linspace(-1, 4, 118), [9.0]])
    matrix, _ = symmetric(eigenvalues)
    criterion = Criterion.for_dtype(1e-6, dtype)
    pairs = lanczos(products(matrix, dtype), start_vector(120, 0), criterion, max_hvps=120)
    assert_ends(pairs, np.linalg.eigvalsh(matrix), criterion)
    assert pairs.hvps < 120  # well separated ends converge before the space is exhausted
    exact_vectors = np.linalg.eigh(matrix)[1][:, [0, -1]]
    overlaps = np.abs(np.sum(pairs.vectors.numpy().T * exact_vectors, axis=0))
    np.testing.assert_allclose(overlaps, 1, atol=1e-3 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_start_inside_an_invariant_subspace_restarts_and_finds_the_true_ends(dtype):
    """The start is an eigenvector of a middle eigenvalue: its Krylov space is exhausted
    after one product (beta = 0), and only the restart orthogonal to it sees the ends."""
    eigenvalues = np.linspace(-2.0, 5.0, 30)
    matrix, vectors = symmetric(eigenvalues, seed=1)
    criterion = Criterion.for_dtype(1e-6, dtype)
    start = torch.as_tensor(vectors[:, 12])
    pairs = lanczos(products(matrix, dtype), start, criterion, max_hvps=30)
    assert_ends(pairs, eigenvalues, criterion)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_low_rank_matrix_exhausts_every_krylov_space_and_the_whole_space(dtype):
    """Rank 3 in 12 dimensions: the first Krylov space holds the 3 eigenvectors and one
    null direction, every restart is a null direction on its own, and the run ends when
    the basis spans all 12 dimensions, with the exact ends."""
    eigenvalues = np.array([-2.0, 1.0, 5.0] + [0.0] * 9)
    matrix, _ = symmetric(eigenvalues, seed=2)
    criterion = Criterion.for_dtype(1e-6, dtype)
    pairs = lanczos(products(matrix, dtype), start_vector(12, 3), criterion, max_hvps=400)
    assert_ends(pairs, np.sort(eigenvalues), criterion)
    # at most one product per dimension, and one per end checked explicitly (float32:
    # tolerance 1e-6 is below its floor, so the bound is the floor)
    assert pairs.hvps <= 12 + pairs.checked.sum()


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_largest_and_both_extremes_chosen_by_index(dtype):
    eigenvalues = np.array([-1.0, 0.5, 2.0, 3.0, 7.0, 8.0])
    matrix, _ = symmetric(eigenvalues, seed=4)
    criterion = Criterion.for_dtype(1e-6, dtype)
    pairs = lanczos(products(matrix, dtype), start_vector(6, 0), criterion, 6, which=(-1, -2, 0))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(pairs.values, [8.0, 7.0, -1.0], rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residuals_from_the_kept_products_and_explicit_checks_only_near_the_bound(dtype):
    """Where the bound lies well above the products' rounding (tolerance 1e-4), each end's
    residual comes from the kept products, within floor * S of the true one (dense
    float64) and of one explicit product's, and costs no product: one per Lanczos step.
    Where the bound is the floor (tolerance 1e-7 in float32) each end is checked by one
    explicit product, whose residual is the one reported."""
    eigenvalues = np.concatenate([[-4.0, -3.5], np.linspace(-1, 3, 296), [5.5, 6.0]])
    matrix, _ = symmetric(eigenvalues, seed=5)
    exact = np.linalg.eigvalsh(matrix)
    calls = []
    dense = torch.as_tensor(matrix, dtype=dtype)

    def counted(vector):
        calls.append(vector)
        return dense @ vector.to(dtype)

    for tolerance in (1e-4, 1e-7):
        criterion = Criterion.for_dtype(tolerance, dtype)
        calls.clear()
        pairs = lanczos(counted, start_vector(300, 1), criterion, max_hvps=300)
        assert_ends(pairs, exact, criterion)
        assert pairs.hvps == len(calls) < 300
        at_floor = criterion.bound(0.0, pairs.scale) >= criterion.bound(4.0, pairs.scale)
        assert pairs.checked.tolist() == [at_floor, at_floor], (tolerance, pairs.checked)
        rounding = criterion.floor * pairs.scale
        for value, residual, vector, checked in zip(
            pairs.values, pairs.residuals, pairs.vectors, pairs.checked
        ):
            true = np.linalg.norm(matrix @ vector.numpy() - value * vector.numpy())
            explicit = ritz_residual(lambda v: dense @ v.to(dtype), value, vector)
            assert abs(residual - true) <= rounding, (residual, true)
            if checked:
                assert residual == explicit
            else:
                assert abs(residual - explicit) <= rounding, (residual, explicit)
    assert Criterion.for_dtype(1e-7, torch.float32).floor > 1e-7  # float32: at the floor
