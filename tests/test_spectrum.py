"""The Hessian's spectrum against dense ground truth (numpy.linalg.eigh): SLQ moments
within the Hutchinson error, the density's mass, exhausted Krylov spaces, top-k
eigenpairs, and the outlier count of MLPs trained on Gaussian clusters."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from conftest import (
    CROSS_ENTROPY,
    dense_hessian,
    hessian_operator,
    trained_experiment,
    write_experiment,
)

from landscape.config import load_config
from landscape.curvature import lanczos as lanczos_module
from landscape.curvature.spectrum import (
    count_outliers,
    rademacher_probe,
    stochastic_lanczos_quadrature,
    top_eigenpairs,
)
from landscape.data import load_dataset
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.models import build_model

DTYPES = [torch.float32, torch.float64]


def symmetric(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    size = len(eigenvalues)
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    return (basis * eigenvalues) @ basis.T


def bulk_and_outliers(size: int = 150) -> np.ndarray:
    """A Marchenko-Pastur bulk (a Wishart matrix's spectrum, in [0, ~2.9]), some exact
    zeros, one negative eigenvalue and three outliers far above the bulk."""
    rng = np.random.default_rng(5)
    samples = rng.normal(size=(2 * size, size - 24)) / np.sqrt(2 * size)
    bulk = np.linalg.eigvalsh(samples.T @ samples)
    return symmetric(np.concatenate([bulk, np.zeros(20), [-0.5, 6.0, 9.0, 14.0]]), seed=1)


def products(matrix: np.ndarray, dtype: torch.dtype):
    """H @ v computed in ``dtype``, as a Hessian operator's products are."""
    dense = torch.as_tensor(matrix, dtype=dtype)
    return lambda vector: dense @ vector.to(dtype)


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """conftest's MLP (303 parameters, 3 Gaussian clusters) trained as test_hessian's is
    (150 epochs, float64; trained once per test run by conftest)."""
    folder = tmp_path_factory.mktemp("spectrum")
    config = trained_experiment(lambda **changes: write_experiment(folder, **changes), "mlp")
    exp = Experiment.load(load_config(config))
    return exp.model, exp.data.train_x, exp.data.train_y


def mlp_hessian(trained_mlp, dtype: torch.dtype):
    """The Hessian operator of the trained MLP in ``dtype``, and its dense float64 matrix
    at the same (``dtype``-rounded) parameters."""
    model, inputs, targets = trained_mlp
    model = copy.deepcopy(model).to(dtype)
    operator = hessian_operator(model, inputs.to(dtype), targets, CROSS_ENTROPY, len(inputs))
    return operator, dense_hessian(operator, torch.float64)


def hutchinson_standard_error(matrix: np.ndarray, power: int, probes: int) -> float:
    """The standard error of the mean of ``probes`` Rademacher estimates v^T A v / n of
    tr(A) / n, A = matrix^power: sqrt((2 / n^2) (||A||_F^2 - sum_i A_ii^2) / probes)."""
    size = len(matrix)
    power_matrix = np.linalg.matrix_power(matrix, power)
    off_diagonal = (power_matrix**2).sum() - (np.diag(power_matrix) ** 2).sum()
    return float(np.sqrt(2 * off_diagonal / size**2 / probes))


def assert_moments(matrix: np.ndarray, dtype: torch.dtype, probes: int, steps: int) -> None:
    """Each probe's quadrature gives its quadratic form v^T H^j v / n exactly (j <= 4 <=
    2 steps - 1), and the mean over probes is tr(H^j) / n within 4 standard errors of
    the Rademacher estimate, j = 1..4. Rounding: float64 products leave ~1e-13 of
    ||H||^j; float32 products are H + E with ||E|| ~ eps ||H||, so j eps ||H||^j, and
    1e-4 ||H||^j leaves room for the sums."""
    size = len(matrix)
    quadrature = stochastic_lanczos_quadrature(
        products(matrix, dtype), size, probes, steps, seed=3, dtype=dtype
    )
    assert quadrature.nodes.shape == quadrature.weights.shape == (probes, steps)
    assert quadrature.hvps == probes * steps
    np.testing.assert_allclose(quadrature.weights.sum(axis=1), 1, rtol=0, atol=1e-12)
    norm = np.abs(np.linalg.eigvalsh(matrix)).max()
    probe_vectors = np.stack([rademacher_probe(size, 3, p).numpy() for p in range(probes)])
    for power in range(1, 5):
        rounding = (1e-12 if dtype == torch.float64 else 1e-4) * norm**power
        power_matrix = np.linalg.matrix_power(matrix, power)
        forms = np.einsum("pi,ij,pj->p", probe_vectors, power_matrix, probe_vectors) / size
        np.testing.assert_allclose(quadrature.moment_samples(power), forms, rtol=0, atol=rounding)
        error = hutchinson_standard_error(matrix, power, probes)
        exact = np.trace(power_matrix) / size
        assert error < 0.5 * abs(exact)  # the test can tell a wrong moment
        assert abs(quadrature.moments(power) - exact) <= 4 * error + rounding, power


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_moments_of_a_known_spectrum_within_the_hutchinson_error(dtype):
    assert_moments(bulk_and_outliers(), dtype, probes=30, steps=12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_moments_of_a_trained_mlp_hessian_within_the_hutchinson_error(trained_mlp, dtype):
    operator, dense = mlp_hessian(trained_mlp, dtype)
    assert_moments(dense, dtype, probes=30, steps=12)
    quadrature = stochastic_lanczos_quadrature(
        operator.hvp, operator.shape[0], 4, 12, seed=3, dtype=dtype
    )
    probe = rademacher_probe(operator.shape[0], 3, 0).numpy()
    form = probe @ dense @ dense @ probe / operator.shape[0]
    assert abs(quadrature.moment_samples(2)[0] - form) <= 1e-4 * np.abs(dense).max() ** 2


def test_density_integrates_to_one_with_the_quadrature_mean_and_variance():
    """Broadening by N(0, sigma^2) keeps the mean and adds sigma^2 to the variance."""
    matrix = bulk_and_outliers()
    quadrature = stochastic_lanczos_quadrature(products(matrix, torch.float64), 150, 8, 40, 0)
    for sigma in (None, 0.05, 1.0):
        grid = quadrature.grid(sigma)
        density = quadrature.density(grid, sigma)
        width = quadrature.broadening() if sigma is None else sigma
        assert np.all(density >= 0)
        assert abs(np.trapezoid(density, grid) - 1) < 1e-7
        mean = np.trapezoid(grid * density, grid)
        assert abs(mean - quadrature.moments(1)) < 1e-7
        second = np.trapezoid(grid**2 * density, grid)
        assert abs(second - quadrature.moments(2) - width**2) < 1e-6
    low, high = quadrature.span()
    spectrum = np.linalg.eigvalsh(matrix)
    assert spectrum[0] - 1e-9 <= low < -0.49 and 13.99 < high <= spectrum[-1] + 1e-9
    assert quadrature.broadening() == pytest.approx((high - low) / 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_steps_past_the_dimension_give_every_moment_of_one_probe(dtype):
    """With steps >= n the Krylov space is the whole space (or an invariant part of it):
    the quadrature is exact for every power, not only up to 2 m - 1."""
    matrix = symmetric(np.linspace(-1.0, 2.0, 40), seed=2)
    quadrature = stochastic_lanczos_quadrature(products(matrix, dtype), 40, 1, 60, 7, dtype)
    assert quadrature.nodes.shape == (1, 40) and quadrature.hvps <= 40
    probe = rademacher_probe(40, 7, 0).numpy()
    tolerance = 1e-11 if dtype == torch.float64 else 1e-4
    for power in (1, 2, 3, 4, 9, 17, 30):
        form = probe @ np.linalg.matrix_power(matrix, power) @ probe / 40
        assert abs(quadrature.moment_samples(power)[0] - form) <= tolerance * 2.0**power


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_exhausted_krylov_space_has_fewer_nodes_whose_weights_sum_to_one(dtype):
    """Rank 3 in 12 dimensions: every probe's Krylov space is the 3 eigenvectors and its
    own null component, 4 dimensions, so 4 nodes at -2, 0, 1, 5 after 4 products."""
    matrix = symmetric(np.array([-2.0, 1.0, 5.0] + [0.0] * 9), seed=2)
    quadrature = stochastic_lanczos_quadrature(products(matrix, dtype), 12, 3, 10, 1, dtype)
    assert quadrature.nodes.shape == (3, 10) and quadrature.hvps == 3 * 4
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for nodes, weights in zip(quadrature.nodes, quadrature.weights):
        np.testing.assert_allclose(nodes[:4], [-2, 0, 1, 5], rtol=0, atol=tolerance)
        assert np.isnan(nodes[4:]).all() and (weights[4:] == 0).all()
        assert abs(weights.sum() - 1) < 1e-12
    exact = [np.trace(np.linalg.matrix_power(matrix, power)) / 12 for power in (1, 2, 3)]
    # with every eigenvector's weight from the probes, not the trace: within 4 errors
    for power, value in zip((1, 2, 3), exact):
        error = hutchinson_standard_error(matrix, power, 3)
        assert abs(quadrature.moments(power) - value) <= 4 * error + tolerance * 5**power


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_eigenpairs_of_a_trained_mlp_hessian_match_eigh(trained_mlp, dtype):
    """float64: eigenvalues to 1e-6 relative, eigenvectors |<y, v>| to 1 - 1e-6 where the
    gap allows (Davis-Kahan: sin angle <= residual / gap). float32: products err by
    ~2 eps ||H||, so the criterion's floor (16 eps ||H|| = 2e-6 ||H||) bounds the
    residual; eigenvalues then to 2e-6 ||H||, eigenvectors to (residual / gap)^2."""
    operator, dense = mlp_hessian(trained_mlp, dtype)
    values, vectors = np.linalg.eigh(dense)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = 5
    tolerance = 1e-9 if dtype == torch.float64 else 1e-6
    pairs = top_eigenpairs(operator.hvp, operator.shape[0], k, tolerance, 303, seed=0, dtype=dtype)
    assert pairs.converged and pairs.pair_converged.all() and len(pairs.values) == k
    assert list(pairs.values) == sorted(pairs.values, reverse=True)
    scale = values[0]
    for index, (value, residual, found) in enumerate(
        zip(pairs.values, pairs.residuals, pairs.vectors.numpy())
    ):
        exact = values[index]
        explicit = np.linalg.norm(dense @ found - value * found)
        assert abs(explicit - residual) <= 1e-5 * scale
        if dtype == torch.float64:
            assert abs(value - exact) <= 1e-6 * abs(exact), (index, value, exact)
        else:
            assert abs(value - exact) <= 2e-6 * scale, (index, value, exact)
        gap = min(abs(exact - values[j]) for j in range(len(values)) if j != index)
        overlap = abs(found @ vectors[:, index])
        assert 1 - overlap <= max(1e-6 if dtype == torch.float64 else 0, (2 * explicit / gap) ** 2)
    assert pairs.hvps <= 303 + k


def test_top_eigenpairs_refuses_more_pairs_than_dimensions_and_a_basis_that_cannot_fit(
    monkeypatch,
):
    hvp = products(np.eye(6), torch.float64)
    with pytest.raises(UserError, match="top_k: 7 eigenpairs of a 6-parameter"):
        top_eigenpairs(hvp, 6, 7, 1e-6, 10, seed=0)
    # top-k keeps the products beside the basis: 96 bytes a step, the quadrature 48
    monkeypatch.setattr(lanczos_module, "free_memory", lambda device: 400)
    with pytest.raises(
        UserError, match="^max_hvps: 6 Lanczos vectors .* lower max_hvps to 4 or fewer$"
    ):
        top_eigenpairs(hvp, 6, 2, 1e-6, 10, seed=0)
    monkeypatch.setattr(lanczos_module, "free_memory", lambda device: 200)
    with pytest.raises(UserError, match="^steps: 6 Lanczos vectors .* lower steps to 4 or fewer$"):
        stochastic_lanczos_quadrature(hvp, 6, 2, 10, seed=0)


def test_outliers_of_a_known_spectrum_the_bulk_edge_and_a_too_small_k():
    """Outliers 14, 9, 6 above a Marchenko-Pastur bulk ending at ~2.9: three, with the
    edge the bulk's top; with k = 3 the gap is below all three, seen through the SLQ
    estimate of lambda_4, and saturated says so; a bulk alone has none."""
    matrix = bulk_and_outliers()
    spectrum = np.linalg.eigvalsh(matrix)[::-1]
    quadrature = stochastic_lanczos_quadrature(products(matrix, torch.float64), 150, 10, 40, 0)
    found = count_outliers(spectrum[:5], quadrature)
    assert found.count == 3 and not found.saturated
    assert found.edge == spectrum[3] and found.threshold == 1.5 * spectrum[3]
    np.testing.assert_allclose(found.ratios[:4], spectrum[:4] / spectrum[1:5])
    smaller = count_outliers(spectrum[:3], quadrature)
    assert smaller.count == 3 and smaller.saturated
    assert 0.9 * spectrum[3] < smaller.edge <= spectrum[3] + 1e-12  # the SLQ bound on lambda_4
    bulk = np.linalg.eigvalsh(matrix)[:-4]
    alone = symmetric(bulk[bulk > 0.2], seed=3)
    alone_spectrum = np.linalg.eigvalsh(alone)[::-1]
    slq = stochastic_lanczos_quadrature(products(alone, torch.float64), len(alone), 10, 40, 0)
    assert count_outliers(alone_spectrum[:5], slq).count == 0
    with pytest.raises(UserError, match="^gap: "):
        count_outliers(spectrum[:5], quadrature, gap=0)


@functools.cache
def trained_on_clusters(classes: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A ReLU MLP (one hidden layer of 16) trained by 300 steps of full-batch gradient
    descent (rate 0.5, float64) on ``classes`` Gaussian clusters in 20 dimensions with
    means 12 from the origin, 50 points each, to a cross-entropy of 1e-4 to 2e-4."""
    kwargs = {"num_classes": classes, "dim": 20, "train_per_class": 50, "separation": 12.0}
    data = load_dataset("gaussian_clusters", kwargs)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, classes, {"hidden": [16]}).double()
    inputs, targets = data.train_x.double(), data.train_y
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        loss = CROSS_ENTROPY.mean(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 3e-4
    return model.eval(), inputs, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [3, 6])
def test_an_mlp_trained_to_near_zero_loss_on_clusters_has_one_outlier_per_class(classes, dtype):
    model, inputs, targets = trained_on_clusters(classes)
    operator, dense = mlp_hessian((model, inputs, targets), dtype)
    size, k = operator.shape[0], classes + 2
    tolerance = 1e-6 if dtype == torch.float64 else 1e-4
    pairs = top_eigenpairs(operator.hvp, size, k, tolerance, size, seed=0, dtype=dtype)
    quadrature = stochastic_lanczos_quadrature(operator.hvp, size, 4, 20, seed=0, dtype=dtype)
    found = count_outliers(pairs.values, quadrature)
    spectrum = np.linalg.eigvalsh(dense)[::-1]
    assert found.count == classes and not found.saturated
    assert found.edge == pytest.approx(spectrum[classes], rel=1e-3)
    gaps = spectrum[: k - 1] / spectrum[1:k]
    assert gaps[classes - 1] > 1.5 * max(np.delete(gaps, classes - 1).max(), 1.4)
