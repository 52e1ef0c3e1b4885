"""Several Hessian-vector products in one pass over the data (HessianOperator.hvp_many)
against separate products, and tr(H), ||H||_F^2 and Trace(H)/||H||_F by Hutchinson and
Hutch++ against dense ground truth, in float32 and float64."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import CROSS_ENTROPY, dense_hessian, hessian_operator, small_model

from landscape.curvature.operators import PASS_BYTES
from landscape.curvature.trace import trace_and_frobenius

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["forward_over_reverse", "double_backward"])
@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_hvp_many_equals_separate_products(name, mode, dtype, caplog):
    """Eight vectors give the eight products of :meth:`hvp`, on an MLP and a CNN with
    BatchNorm (batch size 50 of 120 / 89 samples: several batches, passes of the default
    50 samples or of 7, so the weighting is exercised). Forward over reverse in one pass,
    where only the summation order differs: float64 to 1e-12 relative, float32 to 2e-5
    relative to the largest entry (measured up to about 1e-6: batch sums in another
    grouping, each rounded at eps = 1.2e-7). Double backward one product per vector from
    the kept gradient graphs: the same operations, whose matrix products may still round
    otherwise for a row at another alignment in memory (float64: 3e-17 seen)."""
    model, inputs, targets = small_model(name, DTYPES[dtype])
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 50, hvp=mode)
    vectors = torch.randn(8, operator.shape[0], generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="landscape.curvature.operators"):
        batched = operator.hvp_many(vectors)
    assert ("share one pass" in caplog.text) is (mode == "forward_over_reverse")
    assert operator.hvps == 8 and batched.dtype == DTYPES[dtype] and batched.shape == vectors.shape
    separate = torch.stack([operator.hvp(vector) for vector in vectors]).double()
    tolerance = 1e-12 if dtype == "float64" else 2e-5
    assert (batched.double() - separate).abs().max() <= tolerance * separate.abs().max()
    in_sevens = operator.hvp_many(vectors, samples_per_pass=7).double()
    assert (in_sevens - separate).abs().max() <= tolerance * separate.abs().max()
    assert operator.hvps == 24


def test_a_pass_holds_as_many_samples_as_fit_pass_bytes():
    """The CNN's largest activation is a conv output of 4 x 8 x 8 floats: 8 tangents of it
    fit PASS_BYTES (float64) for 1024 samples, capped at the batch size; the MLP's is
    one of its hidden layers (12 units)."""
    model, inputs, targets = small_model("cnn_bn", torch.float64)
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 5000)
    assert operator.samples_per_pass(8) == PASS_BYTES // (8 * 4 * 8 * 8 * 8) == 1024
    assert operator.samples_per_pass(10**5) == 1
    model, inputs, targets = small_model("mlp", torch.float32)
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 10**6)
    assert operator.samples_per_pass(8) == PASS_BYTES // (8 * 12 * 4)


class Cube(torch.autograd.Function):
    """x^3 with backward and jvp rules but no vmap rule: forward-mode products work, but
    ``vmap`` over their tangents cannot batch it. Double backward never calls it under
    ``vmap`` (its backward is plain torch operations), so there it batches."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (ctx.x,) = inputs
        ctx.save_for_backward(ctx.x)

    @staticmethod
    def backward(ctx, gradient):
        (x,) = ctx.saved_tensors
        return 3 * x * x * gradient

    @staticmethod
    def jvp(ctx, tangent):
        return 3 * ctx.x * ctx.x * tangent


class CubeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(Cube.apply(self.hidden(x)))


@pytest.mark.parametrize("mode", ["forward_over_reverse", "double_backward"])
def test_hvp_many_falls_back_to_one_product_per_vector_where_vmap_cannot_batch(mode, caplog):
    torch.manual_seed(0)
    model = CubeNet().double().eval()
    inputs = torch.randn(30, 8, dtype=torch.float64)
    targets = torch.arange(30) % 3
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 7, hvp=mode)
    vectors = torch.randn(4, operator.shape[0], dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="landscape.curvature.operators"):
        batched = operator.hvp_many(vectors)
    assert operator.batched is (False if mode == "forward_over_reverse" else None)
    falls_back = "Batched Hessian-vector products fail (RuntimeError: You tried to vmap over Cube"
    assert (falls_back in caplog.text) is (mode == "forward_over_reverse")
    assert ("one product per vector instead" in caplog.text) is (mode == "forward_over_reverse")
    assert operator.hvps == 4
    separate = torch.stack([operator.hvp(vector) for vector in vectors])
    assert (batched - separate).abs().max() <= 1e-12 * separate.abs().max()


class MatrixOperator:
    """A dense symmetric matrix with the operator interface the estimators use."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.shape, self.torch_dtype = matrix, tuple(matrix.shape), matrix.dtype

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix @ vector.to(self.torch_dtype)

    def hvp_many(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.to(self.torch_dtype) @ self.matrix


def with_spectrum(spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(spectrum) Q^T for a seeded random rotation Q (float64)."""
    size = len(spectrum)
    gaussian = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    rotation = torch.linalg.qr(gaussian.double()).Q
    return (rotation * spectrum) @ rotation.T


# Three outliers on a bulk near zero, as Sagun et al. and Fort & Ganguli find.
OUTLIERS_AND_BULK = torch.cat(
    [torch.tensor([20.0, 15.0, 10.0]), torch.linspace(-0.5, 1.5, 57)]
).double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sketch", [0, 6], ids=["hutchinson", "hutch++"])
def test_intervals_cover_the_dense_trace_norm_and_ratio_for_most_seeds(dtype, sketch):
    """95% intervals from 50 probes, over seeds 0..99, must cover tr(H), ||H||_F^2 and
    tr(H)/||H||_F at least 90 times each. Over 1000 seeds they covered 95/95/95% and
    (Hutch++, whose deflated samples are more skewed) 94/93/94%, so 90 of 100 leaves
    room; an estimator off by one standard error would cover about 83%."""
    matrix = with_spectrum(OUTLIERS_AND_BULK)
    trace, square = float(OUTLIERS_AND_BULK.sum()), float((OUTLIERS_AND_BULK**2).sum())
    operator = MatrixOperator(matrix.to(DTYPES[dtype]))
    covered = np.zeros(3, dtype=int)
    for seed in range(100):
        found = trace_and_frobenius(operator, 50, seed, sketch=sketch)
        covered += [
            found.trace.covers(trace),
            found.frobenius_squared.covers(square),
            found.ratio.covers(trace / np.sqrt(square)),
        ]
        assert found.hvps == 50 + 2 * sketch
    assert (covered >= 90).all(), covered


def test_hutch_plus_plus_deflates_the_outliers():
    """A sketch that catches the three outliers leaves only the bulk to sample: the
    intervals shrink (measured 5x for the trace, 20x for the norm) with the same 50
    probes, at 12 more products."""
    operator = MatrixOperator(with_spectrum(OUTLIERS_AND_BULK))
    plain = trace_and_frobenius(operator, 50, seed=0)
    deflated = trace_and_frobenius(operator, 50, seed=0, sketch=6)
    assert deflated.trace.half_width < plain.trace.half_width / 3
    assert deflated.frobenius_squared.half_width < plain.frobenius_squared.half_width / 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_range(dtype):
    """Rank 4 and a sketch of 5: Q spans H's range, P H P = 0, every sample equals the
    exact part, so tr(H) and ||H||_F^2 come out exact (to rounding) with zero spread."""
    spectrum = torch.zeros(30, dtype=torch.float64)
    spectrum[:4] = torch.tensor([3.0, -2.0, 1.0, 0.5])
    operator = MatrixOperator(with_spectrum(spectrum).to(DTYPES[dtype]))
    found = trace_and_frobenius(operator, 5, seed=3, sketch=5)
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    assert found.trace.mean == pytest.approx(2.5, abs=tolerance * 14)
    assert found.frobenius_squared.mean == pytest.approx(14.25, rel=tolerance)
    assert found.trace.half_width <= tolerance * 14


@pytest.mark.parametrize("dtype", DTYPES)
def test_intervals_cover_a_tiny_models_dense_hessian(dtype):
    """The MLP's Hessian (195 parameters) from torch.func.hessian in float64: Hutchinson
    and Hutch++ intervals (seed 0, 40 probes, products in ``dtype``) cover tr(H),
    ||H||_F^2 and their ratio; the seed is fixed, so this either always or never passes."""
    model, inputs, targets = small_model("mlp", DTYPES[dtype])
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, len(inputs))
    spectrum = np.linalg.eigvalsh(dense_hessian(operator, torch.float64))
    trace, square = spectrum.sum(), (spectrum**2).sum()
    for sketch in (0, 10):
        before = operator.hvps
        found = trace_and_frobenius(operator, 40, seed=0, sketch=sketch)
        assert operator.hvps - before == found.hvps == 40 + 2 * sketch
        assert found.trace.covers(trace), (sketch, found.trace.mean, trace)
        assert found.frobenius_squared.covers(square), (sketch, found.frobenius_squared.mean)
        assert found.ratio.covers(trace / np.sqrt(square)), (sketch, found.ratio.value)
