"""The Gauss-Newton split and the gradient's top subspace against dense ground truth:
torch.func.jacrev / hessian + numpy.linalg.eigh, on models of a few hundred parameters."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from landscape.curvature.operators import (
    DifferenceOperator,
    GaugeProjection,
    GaussNewtonOperator,
    HessianOperator,
    full_gradient,
    select_parameters,
)
from landscape.curvature.subspace import subspace_overlap, top_subspace_fractions
from landscape.data import load_dataset
from landscape.models import build_model
from landscape.objectives import CrossEntropy, MeanSquaredError, Objective
from landscape.samples import HeldSamples

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES = ("forward_over_reverse", "double_backward")
# Products of a float32 model against the float64 truth at the same parameters, entrywise
# relative to ||M|| ||v||: measured at most 7.5e-9 for G and 2.2e-8 for H - G (MLP and
# BN conv net, both modes; under one float32 eps, 1.2e-7, since this scale bounds every
# entry's terms); 1e-6 leaves 45x room and fails on any wrong term, which errs by O(1).
# Float64: 1e-12.
RELATIVE = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread per test: on a shared two-core machine torch's default oversubscribes
    and the 303 products of a dense operator matrix take 100 s instead of 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tiny_problem(kind: str, dtype: torch.dtype):
    """(model in eval mode, inputs, targets), seeded, shared by the tests (no test moves
    the model): an MLP of 303 parameters on 3 Gaussian clusters, or a conv net with
    BatchNorm (122 parameters) on 89 digits whose running statistics came from the data
    (not the identity of a fresh layer)."""
    torch.manual_seed(0)
    if kind == "mlp":
        data = load_dataset(
            "gaussian_clusters",
            {"num_classes": 3, "dim": 8, "train_per_class": 40, "test_per_class": 1},
        )
        model = build_model("mlp", data.input_shape, 3, {"hidden": [12, 12]})
    else:
        data = load_dataset("digits", {"test_fraction": 0.95})
        model = build_model("small_cnn", data.input_shape, 10, {"channels": [2, 3]})
        with torch.no_grad():
            model.train()(data.train_x)
    model = model.to(dtype).eval()
    return model, data.train_x.to(dtype), data.train_y


def operators(
    kind: str, dtype: torch.dtype, objective: Objective, batch_size: int, mode: str, targets=None
) -> tuple[HessianOperator, GaussNewtonOperator]:
    model, inputs, labels = tiny_problem(kind, dtype)
    targets = labels if targets is None else targets
    names = select_parameters(model, "all")
    samples = HeldSamples(inputs, targets)
    return (
        HessianOperator(model, names, samples, objective, batch_size, mode),
        GaussNewtonOperator(model, names, samples, objective, batch_size, mode),
    )


@functools.cache
def outputs_and_jacobian(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs z (N, C) and their Jacobian J (N, C, n) w.r.t. all parameters,
    by torch.func.jacrev in float64 at the (dtype) model's parameters."""
    model, inputs, _ = tiny_problem(kind, dtype)
    model = copy.deepcopy(model).double()
    names = select_parameters(model, "all")
    params = {name: p.detach() for name, p in model.named_parameters()}
    fixed = {**params, **dict(model.named_buffers())}
    shapes = [params[name].shape for name in names]
    flat = torch.cat([params[name].reshape(-1) for name in names])

    def outputs_of(vector):
        pieces = (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        return functional_call(model, {**fixed, **dict(zip(names, pieces))}, (inputs.double(),))

    return outputs_of(flat).detach(), jacrev(outputs_of)(flat)


def dense_gauss_newton(operator, kind: str, output_hessian=None) -> np.ndarray:
    """(1/N) sum_i J_i^T H_i J_i of ``operator``'s loss in float64: J by jacrev, H_i by
    torch.func.hessian of sample i's loss w.r.t. its outputs (vmapped over the samples),
    or ``output_hessian(outputs, targets)``, a closed form for all samples at once."""
    outputs, jacobian = outputs_and_jacobian(kind, operator.torch_dtype)

    def sample_loss(output, target):
        return operator.objective.losses(output[None], target[None]).sum()

    if output_hessian is None:
        curvature = vmap(hessian(sample_loss))(outputs, operator.samples.targets)  # (N, C, C)
    else:
        curvature = output_hessian(outputs, operator.samples.targets)
    dense = torch.einsum("iap,iab,ibq->pq", jacobian, curvature, jacobian) / operator.count
    return dense.numpy()


@functools.cache
def dense_cross_entropy_hessian(kind: str, dtype: torch.dtype) -> np.ndarray:
    hessian_operator, _ = operators(kind, dtype, CrossEntropy(), 200, "double_backward")
    return dense_hessian(hessian_operator, torch.float64)


def dense_full_gradient(operator) -> np.ndarray:
    model = copy.deepcopy(operator.model).double()
    params, fixed = operator.state()
    fixed = {name: t.double() if t.is_floating_point() else t for name, t in fixed.items()}
    flat = torch.cat([p.reshape(-1) for p in params.values()]).double()

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split(operator.sizes), operator.shapes))
        outputs = functional_call(
            model,
            {**fixed, **dict(zip(operator.names, pieces))},
            (operator.samples.inputs.double(),),
        )
        return operator.objective.losses(outputs, operator.samples.targets).sum() / operator.count

    return torch.func.grad(mean_loss)(flat).numpy()


def assert_product(operator, dense: np.ndarray, dtype: torch.dtype, seed: int = 0) -> None:
    vector = np.random.default_rng(seed).normal(size=dense.shape[0])
    scale = np.linalg.norm(dense, 2) * np.linalg.norm(vector)
    np.testing.assert_allclose(
        operator @ vector, dense @ vector, rtol=0, atol=RELATIVE[dtype] * scale
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_gauss_newton_product_equals_dense_jacobian_form_and_ignores_batch_size(kind, dtype, mode):
    _, whole = operators(kind, dtype, CrossEntropy(), 200, mode)
    _, batched = operators(kind, dtype, CrossEntropy(), 7, mode)
    dense = dense_gauss_newton(whole, kind)
    assert whole.mode == mode and whole.torch_dtype == dtype
    assert_product(whole, dense, dtype)
    assert_product(batched, dense, dtype)
    assert whole.hvps == 1 and batched.hvps == 1
    assert np.abs(dense).max() > 1e-3  # a matrix worth comparing


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_residual_is_hessian_minus_gauss_newton_and_gauss_newton_alone_is_semidefinite(kind, dtype):
    """Cross-entropy is convex in the logits, so G is PSD while H, at this random point,
    has negative eigenvalues that only H - G can carry."""
    hessian_operator, gauss_newton = operators(kind, dtype, CrossEntropy(), 200, "double_backward")
    residual = DifferenceOperator(hessian_operator, gauss_newton)
    dense_g = dense_gauss_newton(gauss_newton, kind)
    dense_h = dense_cross_entropy_hessian(kind, dtype)
    assert_product(residual, dense_h - dense_g, dtype)
    assert residual.hvps == 1 and hessian_operator.hvps == gauss_newton.hvps == 1

    # The operator's own matrix, column by column: symmetric, PSD to its rounding.
    matrix = gauss_newton @ np.eye(gauss_newton.shape[0])
    scale = np.linalg.norm(dense_g, 2)
    np.testing.assert_allclose(matrix, matrix.T, rtol=0, atol=RELATIVE[dtype] * scale)
    lowest = np.linalg.eigvalsh((matrix + matrix.T) / 2)[0]
    assert lowest >= -10 * RELATIVE[dtype] * scale, (lowest, scale)
    assert np.linalg.eigvalsh(dense_g)[0] >= -1e-12 * scale
    assert np.linalg.eigvalsh(dense_h)[0] < -1e-3 * scale  # H is not PSD here


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gauss_newton_is_semidefinite_for_squared_error(dtype):
    targets = torch.randn(120, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    hessian_operator, gauss_newton = operators(
        "mlp", dtype, MeanSquaredError(), 50, "forward_over_reverse", targets
    )
    dense_g = dense_gauss_newton(gauss_newton, "mlp")
    scale = np.linalg.norm(dense_g, 2)
    assert_product(gauss_newton, dense_g, dtype)
    assert np.linalg.eigvalsh(dense_g)[0] >= -1e-12 * scale
    assert np.linalg.eigvalsh(dense_hessian(hessian_operator, torch.float64))[0] < -1e-3 * scale
    # Squared error averaged over 3 outputs: H_i = (2/3) I, so G = (2/(3N)) sum_i J_i^T J_i.
    exact = dense_gauss_newton(
        gauss_newton, "mlp", lambda z, t: 2 / 3 * torch.eye(3, dtype=z.dtype).expand(len(z), 3, 3)
    )
    np.testing.assert_allclose(dense_g, exact, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_autograd_output_hessian_is_the_softmax_closed_form(dtype, smoothing):
    """For softmax cross-entropy, label-smoothed or not, H_i = diag(p_i) - p_i p_i^T:
    the operator's autograd H_out against the closed form."""
    _, gauss_newton = operators(
        "cnn_bn", dtype, CrossEntropy(smoothing), 30, "forward_over_reverse"
    )

    def softmax_curvature(outputs, targets):
        p = torch.softmax(outputs, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    closed_form = dense_gauss_newton(gauss_newton, "cnn_bn", softmax_curvature)
    autograd = dense_gauss_newton(gauss_newton, "cnn_bn")
    np.testing.assert_allclose(
        autograd, closed_form, rtol=0, atol=1e-12 * np.abs(closed_form).max()
    )
    assert_product(gauss_newton, closed_form, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gauss_newton_is_the_hessian_for_squared_error_of_a_linear_model(dtype):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 4, generator=generator).to(dtype)
    targets = torch.randn(40, 3, generator=generator).to(dtype)
    model = nn.Linear(4, 3).to(dtype)
    names = select_parameters(model, "all")
    samples = HeldSamples(inputs, targets)
    hessian_operator = HessianOperator(model, names, samples, MeanSquaredError(), 16)
    gauss_newton = GaussNewtonOperator(model, names, samples, MeanSquaredError(), 16)
    dense_h = dense_hessian(hessian_operator, torch.float64)
    assert_product(gauss_newton, dense_h, dtype)
    residual = DifferenceOperator(hessian_operator, gauss_newton)
    vector = np.random.default_rng(1).normal(size=dense_h.shape[0])
    bound = RELATIVE[dtype] * np.linalg.norm(dense_h, 2) * np.linalg.norm(vector)
    assert np.linalg.norm(residual @ vector) <= bound


def test_difference_of_operators_of_different_losses_is_refused():
    first, _ = operators("mlp", torch.float64, CrossEntropy(), 50, "double_backward")
    _, second = operators("mlp", torch.float64, CrossEntropy(0.1), 50, "double_backward")
    with pytest.raises(ValueError, match="not of one loss"):
        DifferenceOperator(first, second)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_full_gradient_is_the_dense_gradient_whatever_the_batch_size(dtype):
    model, inputs, targets = tiny_problem("cnn_bn", dtype)
    names = select_parameters(model, "all")
    hessian_operator, _ = operators("cnn_bn", dtype, CrossEntropy(), 89, "double_backward")
    exact = dense_full_gradient(hessian_operator)
    for batch_size in (89, 10):
        found = full_gradient(
            model, names, HeldSamples(inputs, targets), CrossEntropy(), batch_size
        )
        assert found.dtype == torch.float64 and found.shape == exact.shape
        # float32: one batch's gradient is good to a few eps of its terms.
        np.testing.assert_allclose(
            found.numpy(), exact, rtol=0, atol=RELATIVE[dtype] * np.linalg.norm(exact)
        )


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gradient_fractions_in_the_top_subspace_equal_the_dense_projection(dtype):
    model, inputs, targets = tiny_problem("mlp", dtype)
    names = select_parameters(model, "all")
    vectors = np.linalg.eigh(dense_cross_entropy_hessian("mlp", dtype))[1]
    top = vectors[:, ::-1][:, :6]  # columns by eigenvalue descending
    gradient = full_gradient(model, names, HeldSamples(inputs, targets), CrossEntropy(), 120)
    g = gradient.numpy()
    expected = [g @ (top[:, :j] @ top[:, :j].T) @ g / (g @ g) for j in range(1, 7)]
    fractions = top_subspace_fractions(gradient, torch.as_tensor(top.copy()))
    np.testing.assert_allclose(fractions, expected, rtol=1e-12, atol=1e-14)
    assert np.all(np.diff(fractions) >= 0) and 0 < fractions[0] and fractions[-1] < 1
    whole = top_subspace_fractions(g, vectors)
    assert whole[-1] == pytest.approx(1, abs=1e-12)
    assert np.isnan(top_subspace_fractions(np.zeros_like(g), top)).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_overlap_of_top_eigenspaces_of_hessian_and_gauss_newton_equals_the_dense_one(dtype):
    _, gauss_newton = operators("mlp", dtype, CrossEntropy(), 120, "double_backward")
    k = 3
    top_h = np.linalg.eigh(dense_cross_entropy_hessian("mlp", dtype))[1][:, -k:]
    g_vectors = np.linalg.eigh(dense_gauss_newton(gauss_newton, "mlp"))[1]
    top_g, bottom_g = g_vectors[:, -k:], g_vectors[:, :k]
    expected = np.trace((top_h @ top_h.T) @ (top_g @ top_g.T)) / k
    overlap = subspace_overlap(top_h, top_g)
    assert overlap == pytest.approx(expected, rel=1e-12)
    assert 0 < overlap < 1
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(k, k)))[0]
    assert subspace_overlap(top_h, top_h @ rotation) == pytest.approx(1, abs=1e-12)
    assert subspace_overlap(top_g, bottom_g) == pytest.approx(0, abs=1e-12)


def test_bases_that_are_not_orthonormal_columns_are_refused():
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(20, 3)))[0]
    gradient = np.ones(20)
    with pytest.raises(ValueError, match=r"shape \(3, 20\); expected \(20, k\)"):
        subspace_overlap(basis, basis.T)
    with pytest.raises(ValueError, match="not orthonormal"):
        top_subspace_fractions(gradient, 2 * basis)
    with pytest.raises(ValueError, match="Incompatible shapes"):
        top_subspace_fractions(np.ones(21), basis)
    with pytest.raises(ValueError, match="Incompatible shapes"):
        subspace_overlap(basis, basis[:, :2])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_softmax_gauge_directions_are_in_the_gauss_newton_kernel(dtype):
    """H_i = diag(p) - p p^T kills the constant vector, so G, like H, is zero on the
    directions GaugeProjection removes (a shift of all logits of a sample)."""
    _, gauss_newton = operators("mlp", dtype, CrossEntropy(), 120, "double_backward")
    projection = GaugeProjection.find(gauss_newton)
    assert projection is not None and projection.count == 13  # 12 inputs + the bias
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(gauss_newton.shape[0], generator=generator, dtype=torch.float64)
    gauge = (vector - projection(vector)).numpy()
    scale = np.linalg.norm(dense_gauss_newton(gauss_newton, "mlp"), 2) * np.linalg.norm(gauge)
    assert np.linalg.norm(gauss_newton @ gauge) <= RELATIVE[dtype] * scale
    assert np.linalg.norm(gauss_newton @ vector.numpy()) > 1e-2 * scale
