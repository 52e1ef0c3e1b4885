"""Hessian maps against dense ground truth: torch.func.hessian + numpy.linalg.eigvalsh."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CROSS_ENTROPY,
    DIGITS,
    MODELS,
    dense_hessian,
    hessian_operator,
    small_model,
    trained_experiment,
)
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.config import load_config
from landscape.curvature import lanczos as lanczos_module
from landscape.curvature.lanczos import (
    Criterion,
    basis_bytes,
    extreme_eigenvalues,
    free_memory,
    lanczos,
)
from landscape.curvature.operators import (
    FrozenBatchNormAsAffine,
    GaugeProjection,
    HessianOperator,
    product_context,
)
from landscape.errors import Interrupted, UserError
from landscape.experiment import Experiment
from landscape.hessian import HessianEvaluator
from landscape.plan import plan_surface
from landscape.plot import plot_surface_file
from landscape.store import SurfaceFile
from landscape.workers import run_job

TOLERANCE = 1e-3
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LINEAR = {"name": "linear", "kwargs": {}}
HESSIAN_GRID = {
    "x": {"min": -0.5, "max": 0.5, "num": 3},
    "y": {"min": -0.5, "max": 0.5, "num": 3},
}


def dense_spectrum(operator: HessianOperator) -> np.ndarray:
    """Eigenvalues of the dense Hessian of the full-data mean loss at the model's parameters."""
    return np.linalg.eigvalsh(dense_hessian(operator))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_hvp_equals_dense_hessian_in_both_modes_and_ignores_batch_size(experiment, model):
    network, data = MODELS[model]
    exp = Experiment.load(load_config(experiment(model=network, data=data)))
    inputs, targets = exp.data.train_x, exp.data.train_y
    whole = hessian_operator(exp.model, inputs, targets, CROSS_ENTROPY, len(inputs))
    batched = hessian_operator(exp.model, inputs, targets, CROSS_ENTROPY, 7)
    reverse = hessian_operator(exp.model, inputs, targets, CROSS_ENTROPY, 7, hvp="double_backward")
    params, fixed = whole.state()
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split(whole.sizes), whole.shapes))
        outputs = functional_call(exp.model, {**fixed, **dict(zip(whole.names, pieces))}, (inputs,))
        return F.cross_entropy(outputs, targets)

    dense = hessian(mean_loss)(flat).numpy()
    vector = np.random.default_rng(0).normal(size=len(flat))
    np.testing.assert_allclose(whole @ vector, dense @ vector, rtol=0, atol=1e-10)
    np.testing.assert_allclose(batched @ vector, whole @ vector, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reverse @ vector, dense @ vector, rtol=0, atol=1e-10)
    assert whole.hvps == 2 and batched.hvps == 1 and reverse.hvps == 1


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_frozen_batch_norm_as_affine_map_gives_the_kernels_values_and_hessian(dtype):
    model, inputs, targets = small_model("cnn_bn", DTYPES[dtype])
    inputs, targets = inputs[:64], targets[:64]
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # statistics and scales far from their initial 0, 1
        for norm in norms:
            for tensor, low in ((norm.running_mean, -1), (norm.running_var, 0.2)):
                tensor.copy_(low + 2 * torch.rand(tensor.shape, generator=generator))
            for tensor in (norm.weight, norm.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        kernel = model(inputs)
        with FrozenBatchNormAsAffine():
            affine = model(inputs)
            batch_statistics = [
                F.batch_norm(inputs, None, None, training=True),
                F.batch_norm(inputs, inputs.new_zeros(1), inputs.new_ones(1), training=True),
            ]
        own = [
            F.batch_norm(inputs, None, None, training=True),
            F.batch_norm(inputs, inputs.new_zeros(1), inputs.new_ones(1), training=True),
        ]
    rounding = 1e-5 if dtype == "float32" else 1e-13
    assert norms and (affine - kernel).abs().max() <= rounding * kernel.abs().max()
    assert all(torch.equal(a, b) for a, b in zip(batch_statistics, own))  # the kernel's
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 16, hvp="double_backward")
    vector = np.random.default_rng(0).normal(size=operator.shape[0])
    exact = dense_hessian(operator, torch.float64) @ vector  # the kernel's, in float64
    error = np.linalg.norm(operator @ vector - exact) / np.linalg.norm(exact)
    assert error <= (1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_hessian_job_matches_dense_eigenvalues_at_every_point(experiment, model):
    config = trained_experiment(
        experiment, model, grid=HESSIAN_GRID, maps=["train_loss", "lambda_min", "lambda_max"]
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)

    exp = Experiment.load(load_config(config))
    with SurfaceFile.open(surface) as planned:
        directions, grid, maps = planned.directions(), planned.grid, planned.maps()
        assert planned.done("hessian").all()
    checker = HessianEvaluator(exp, directions, load_config(config).hessian)
    smallest_ratio = 1.0
    for point in range(grid.size):
        checker.plane.move_to(*grid.coordinates(point))
        exact = dense_spectrum(checker.operator)
        index = grid.index(point)
        assert maps["hessian_converged"][index] == 1
        scale, ratio = max(abs(exact[0]), abs(exact[-1])), abs(exact[0] / exact[-1])
        for found, true in (
            (maps["lambda_min"][index], exact[0]),
            (maps["lambda_max"][index], exact[-1]),
        ):
            bound = TOLERANCE * max(abs(true), TOLERANCE * scale)  # hessian.Criterion
            assert abs(found - true) <= bound, (point, found, true)
        assert abs(maps["lambda_ratio"][index] - ratio) <= TOLERANCE * (2 * ratio + TOLERANCE)
        smallest_ratio = min(smallest_ratio, ratio)
    assert smallest_ratio < 0.02  # the trained minimum: |lambda_min| tiny next to lambda_max


def test_quadratic_model_has_its_closed_form_spectrum_everywhere(experiment):
    """Linear model + mse: L = mean over samples and outputs of (W x + b - y)^2, whose
    Hessian is (2 / (N k)) [X 1]^T [X 1] (x) I_k at every point of the plane."""
    config = experiment(
        model={"name": "linear", "kwargs": {}},
        data={"name": "plugins:regression", "kwargs": {}},
        evaluation={"loss": "mse"},
        maps=["lambda_min", "lambda_max"],
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)

    exp = Experiment.load(load_config(config))
    inputs, targets = exp.data.train_x, exp.data.train_y
    design = np.hstack([inputs.numpy(), np.ones((len(inputs), 1))])
    outputs = targets.shape[1]
    exact = np.linalg.eigvalsh(2 / (len(inputs) * outputs) * design.T @ design)
    with SurfaceFile.open(surface) as done:
        maps = done.maps()
    np.testing.assert_allclose(maps["lambda_min"], exact[0], rtol=TOLERANCE)
    np.testing.assert_allclose(maps["lambda_max"], exact[-1], rtol=TOLERANCE)
    assert (maps["hessian_converged"] == 1).all()


def test_no_method_reports_an_inaccurate_end_as_converged(experiment):
    """At a trained minimum, Li et al.'s shift recipe (tol 1e-2) may stop far from
    lambda_min: whatever it returns, 'converged' must mean 'within tolerance'."""
    exp = Experiment.load(load_config(trained_experiment(experiment, "mlp")))
    inputs, targets = exp.data.train_x, exp.data.train_y
    operator = hessian_operator(exp.model, inputs, targets, CROSS_ENTROPY, 120)
    exact = dense_spectrum(operator)
    start = torch.randn(operator.shape[0], dtype=torch.float64, generator=torch.Generator())
    counts = {}
    for method in ("lanczos", "eigsh", "shift"):
        found = extreme_eigenvalues(operator, method, start, TOLERANCE, 400)
        accurate = all(
            abs(value - true) <= TOLERANCE * abs(true)
            for value, true in ((found.lambda_min, exact[0]), (found.lambda_max, exact[-1]))
        )
        assert accurate or not found.converged, (method, found, exact[[0, -1]])
        counts[method] = found.hvps
    assert counts["lanczos"] < counts["eigsh"]


def test_coarser_hessian_grid_covers_every_stride_th_point(experiment):
    config = experiment(
        grid={"x": {"min": -1.0, "max": 1.0, "num": 5}, "y": {"min": -1.0, "max": 1.0, "num": 4}},
        maps=["train_loss", "lambda_min", "lambda_max"],
        hessian={"stride": 2},
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)
    with SurfaceFile.open(surface) as done:
        computed = np.isfinite(done.maps()["lambda_max"])
        assert done.points("hessian").tolist() == [0, 2, 4, 10, 12, 14]
        assert not done.done("loss").any()  # the loss job is separate
    expected = np.zeros((4, 5), bool)
    expected[::2, ::2] = True
    np.testing.assert_array_equal(computed, expected)
    figures = {path.name for path in plot_surface_file(surface, formats=("png",))}
    assert figures == {
        f"exp_{name}_heatmap.png" for name in ("lambda_ratio", "lambda_min", "lambda_max")
    }


def test_one_dimensional_hessian_curve_is_drawn(experiment):
    config = experiment(
        grid={"x": {"min": -1.0, "max": 1.0, "num": 5}},
        maps=["train_loss", "lambda_max", "lambda_min"],
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)
    with SurfaceFile.open(surface) as done:
        assert (done.maps()["lambda_max"] >= done.maps()["lambda_min"]).all()
    figures = {path.name for path in plot_surface_file(surface, formats=("png",))}
    assert figures == {"exp_hessian_curves.png"}  # no loss curve: the loss job has not run


def start_vector(size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_lambda_min_converges_where_the_hessian_is_semidefinite(experiment, dtype):
    """A softmax-linear model's Hessian is semidefinite everywhere, with lambda_min = 0
    exactly (the softmax gauge, and the pixels digits never lights). A residual bound
    relative to |lambda_min| cannot be met there (before: 400 HVPs, converged 0); now both
    ends converge, lambda_min within tolerance^2 lambda_max of 0, and the file says by
    which criterion and rounding floor."""
    config = experiment(
        model=LINEAR,
        data=DIGITS,
        evaluation={"dtype": dtype},
        grid={"x": {"min": -0.5, "max": 0.5, "num": 2}},
        maps=["lambda_min", "lambda_max"],
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)
    with SurfaceFile.open(surface) as done:
        directions, grid, maps = done.directions(), done.grid, done.maps()
        attrs = dict(done.handle["done/hessian"].attrs)
    criterion = Criterion.for_dtype(TOLERANCE, DTYPES[dtype])
    assert attrs["criterion"] == Criterion.TEXT and attrs["hvp_dtype"] == dtype
    assert attrs["tolerance"] == TOLERANCE and attrs["rounding_floor"] == criterion.floor

    settings = load_config(config).hessian
    checker = HessianEvaluator(Experiment.load(load_config(config)), directions, settings)
    for point in range(grid.size):
        checker.plane.move_to(*grid.coordinates(point))
        exact = np.linalg.eigvalsh(dense_hessian(checker.operator, torch.float64))
        scale = exact[-1]
        assert abs(exact[0]) <= 1e-12 * scale  # semidefinite, lambda_min = 0
        index = grid.index(point)
        assert maps["hessian_converged"][index] == 1 and maps["hessian_hvps"][index] < 300
        assert abs(maps["lambda_max"][index] - scale) <= criterion.bound(scale, scale)
        assert abs(maps["lambda_min"][index]) <= criterion.bound(0.0, scale)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_converged_ends_have_true_residuals_within_the_criterion(experiment, dtype):
    """Lanczos' residual estimate |beta_k s_ki| assumes exact products: in float32 it read
    1e-10 lambda_max where the true residual is 1e-7 lambda_max, and passed tolerance
    1e-7. Reported residuals now come from the products as computed (H y = W s), the
    criterion is floored at 16 eps, and converged means every true residual (dense
    float64 Hessian) is within it. A float32 product errs by about 1 eps ||H|| (measured):
    4 eps of slack."""
    network, data = MODELS["mlp"]
    exp = Experiment.load(
        load_config(experiment(model=network, data=data, evaluation={"dtype": dtype}))
    )
    operator = hessian_operator(exp.model, exp.data.train_x, exp.data.train_y, CROSS_ENTROPY, 1000)
    exact = dense_hessian(operator, torch.float64)
    criterion = Criterion.for_dtype(1e-7, DTYPES[dtype])
    pairs = lanczos(operator.hvp, start_vector(operator.shape[0]), criterion, 400)
    eps = torch.finfo(DTYPES[dtype]).eps
    assert pairs.converged
    for value, residual, vector in zip(pairs.values, pairs.residuals, pairs.vectors.numpy()):
        true = np.linalg.norm(exact @ vector - value * vector)
        assert abs(residual - true) <= 4 * eps * pairs.scale
        assert true <= criterion.bound(value, pairs.scale)


@pytest.mark.parametrize("mode", ["forward_over_reverse", "double_backward"])
def test_kept_products_give_the_true_residual_to_within_the_rounding_floor(experiment, mode):
    """The premise of residuals from the kept products: in float32 on a BatchNorm CNN,
    where a product of the top eigenvector errs by about 10 eps S (measured on the
    reference's model), ||W s - theta y|| is within floor * S of the true residual of the
    dense float64 Hessian. At tolerance 1e-2 both ends' bounds lie far above the floor,
    so neither needs an explicit product."""
    network, data = MODELS["cnn_bn"]
    exp = Experiment.load(
        load_config(experiment(model=network, data=data, evaluation={"dtype": "float32"}))
    )
    x, y = exp.data.train_x, exp.data.train_y
    operator = hessian_operator(exp.model, x, y, CROSS_ENTROPY, 128, "all", mode)
    exact = dense_hessian(operator, torch.float64)
    criterion = Criterion.for_dtype(1e-2, torch.float32)
    pairs = lanczos(operator.hvp, start_vector(operator.shape[0]), criterion, 200)
    assert pairs.converged and not pairs.checked.any()
    for value, residual, vector in zip(pairs.values, pairs.residuals, pairs.vectors.numpy()):
        true = np.linalg.norm(exact @ vector - value * vector)
        assert abs(residual - true) <= criterion.floor * pairs.scale, (residual, true)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_softmax_gauge_is_flat_and_projected_only_where_softmax_ignores_it(experiment, dtype):
    """Adding one vector to every row of the last weight (or one number to every output
    bias) changes no softmax output, so H vanishes there at every point; the projection
    removes exactly those directions, and only from cross-entropy on a last Linear."""
    network, data = MODELS["mlp"]
    exp = Experiment.load(
        load_config(experiment(model=network, data=data, evaluation={"dtype": dtype}))
    )
    inputs, targets = exp.data.train_x, exp.data.train_y
    operator = hessian_operator(exp.model, inputs, targets, CROSS_ENTROPY, 1000)
    gauge = GaugeProjection.find(operator)
    assert gauge.layer == "net.5" and gauge.count == 12 + 1  # Linear(12, 3) and its bias
    identity = torch.eye(operator.shape[0], dtype=torch.float64)
    removed = (identity - torch.stack([gauge(row) for row in identity])).numpy()
    np.testing.assert_allclose(removed, removed.T, atol=1e-15)  # an orthogonal projection
    np.testing.assert_allclose(removed @ removed, removed, atol=1e-15)
    assert round(np.trace(removed)) == gauge.count
    exact = dense_hessian(operator, torch.float64)
    scale = np.abs(np.linalg.eigvalsh(exact)).max()
    assert np.abs(exact @ removed).max() <= 1e-12 * scale  # H g = 0 on the gauge
    assert np.abs(exact @ (identity.numpy() - removed)).max() > 0.1 * scale

    squashed = nn.Sequential(exp.model, nn.Tanh())  # the last Linear is not the output
    assert (
        GaugeProjection.find(hessian_operator(squashed, inputs, targets, CROSS_ENTROPY, 99)) is None
    )
    regression = Experiment.load(
        load_config(
            experiment(
                name="regression",
                model=LINEAR,
                data={"name": "plugins:regression", "kwargs": {}},
                evaluation={"loss": "mse", "dtype": dtype},
                maps=["train_loss"],
            )
        )
    )
    mse = hessian_operator(
        regression.model, regression.data.train_x, regression.data.train_y, regression.objective, 99
    )
    assert GaugeProjection.find(mse) is None


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("which", [(0, -1), (-1, -2)])
def test_lanczos_goes_on_past_an_exhausted_krylov_space(dtype, which):
    """A start vector with H v0 = 0, or in a two-dimensional invariant subspace, exhausts
    the Krylov space in one or two steps. Before: a division by beta = 0 ("array must not
    contain infs or NaNs"), or that subspace's eigenvalues reported as converged ends."""
    eigenvalues = torch.tensor([0.0, 0.0, -1.0, 2.0, 3.0, 5.0, 7.0, 10.0], dtype=torch.float64)
    exact = np.sort(eigenvalues.numpy())[list(which)]
    generator = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    criterion = Criterion.for_dtype(1e-8, DTYPES[dtype])
    for basis in (torch.eye(8, dtype=torch.float64), rotation):  # exact zeros, then rounded
        matrix = ((basis * eigenvalues) @ basis.T).to(DTYPES[dtype])

        def hvp(vector, matrix=matrix):
            return matrix @ vector.to(matrix.dtype)

        for start in (basis[:, 0], basis[:, 2] + basis[:, 3]):
            pairs = lanczos(hvp, start, criterion, 100, which)
            assert pairs.converged
            np.testing.assert_allclose(pairs.values, exact, atol=criterion.bound(10, 10))


def test_a_basis_larger_than_free_memory_is_refused_in_one_line(experiment, monkeypatch, caplog):
    """The basis and its products hold up to 2 max_hvps float64 vectors (324 GiB for
    wrn56_8 at 400): they are sized and logged at start-up and refused, naming the field
    and a value that fits, before a point is computed (the free-memory probe is mocked: a
    fault)."""
    config = experiment(grid={"x": {"min": 0.0, "max": 1.0, "num": 2}}, maps=["lambda_max"])
    surface = plan_surface(load_config(config))
    size = 5 * 8 + 8 + 8 * 3 + 3  # the test MLP: Linear(5, 8), Linear(8, 3)
    assert free_memory(torch.device("cpu")) > basis_bytes(400, size)  # the real probe
    monkeypatch.setattr(lanczos_module, "free_memory", lambda device: basis_bytes(50, size) + 7)
    caplog.set_level("INFO", logger="landscape.curvature.lanczos")
    with pytest.raises(UserError) as caught:
        run_job(surface, "hessian", show_progress=False)
    message = str(caught.value)
    assert message.startswith(
        "hessian.max_hvps: 75 Lanczos vectors of 75 parameters and their products need"
    )
    assert "lower hessian.max_hvps to 50 or fewer" in message and "\n" not in message
    assert (
        "Lanczos basis: 75 float64 vectors of 75 parameters and their products, 87.9 KiB"
        in caplog.text
    )
    with SurfaceFile.open(surface) as untouched:
        assert not untouched.done("hessian").any()
    # Hessian directions (of the weights: 64 parameters) where not even 4 vectors fit.
    monkeypatch.setattr(lanczos_module, "free_memory", lambda device: 1000)
    hessian_plane = experiment(name="directions", directions={"kind": "hessian"})
    with pytest.raises(UserError, match="64 Lanczos vectors of 64 parameters") as caught:
        plan_surface(load_config(hessian_plane))
    assert "select fewer parameters" in str(caught.value)
    assert not Path(load_config(hessian_plane).output).exists()


FORWARDS = {"left": -1, "count": 0}  # forward passes before a KeyboardInterrupt; -1: never


@torch.jit.ignore
def count_forward(inputs):  # unannotated: TorchScript reads no postponed annotations
    FORWARDS["count"] += 1
    FORWARDS["left"] -= 1
    if FORWARDS["left"] == 0:
        raise KeyboardInterrupt
    return inputs


def scripted_forward_count(inputs):
    return count_forward(inputs)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_an_interrupt_inside_a_product_stops_the_job_and_marks_nothing_wrong(
    experiment, monkeypatch, dtype
):
    """Ctrl-C while TorchScript runs (torch's forward-mode decompositions do) arrives as a
    RuntimeError wrapping KeyboardInterrupt; the old per-product fallback took it for
    "forward mode unsupported", switched to double backward and finished, wrong values
    marked done. Here the interrupt comes from a scripted forward pre-hook, half way
    through the job: it stops the job, and the points done before it, and after a
    resume all points, equal an uninterrupted run's bit for bit."""
    scripted = torch.jit.script(scripted_forward_count)
    loaded = Experiment.load

    def load_counting(*args, **kwargs):
        experiment = loaded(*args, **kwargs)
        experiment.model.register_forward_pre_hook(lambda module, args: (scripted(args[0]),))
        return experiment

    monkeypatch.setattr(Experiment, "load", load_counting)
    changes = {
        "grid": {"x": {"min": -0.5, "max": 0.5, "num": 3}},
        "maps": ["lambda_min", "lambda_max"],
        "evaluation": {"dtype": dtype},
    }
    reference = plan_surface(load_config(experiment(name="reference", **changes)))
    monkeypatch.setitem(FORWARDS, "count", 0)
    run_job(reference, "hessian", show_progress=False)
    interrupted = plan_surface(load_config(experiment(name="interrupted", **changes)))
    monkeypatch.setitem(FORWARDS, "left", FORWARDS["count"] // 2)
    with pytest.raises(KeyboardInterrupt):
        run_job(interrupted, "hessian", show_progress=False)
    with SurfaceFile.open(reference) as clean, SurfaceFile.open(interrupted) as stopped:
        expected, done, written = clean.maps(), stopped.done("hessian"), stopped.maps()
        assert done.any() and not done.all()
        for name in stopped.job_maps("hessian"):  # lambda_ratio is derived once the job ends
            np.testing.assert_array_equal(written[name][done], expected[name][done], name)
    run_job(interrupted, "hessian", show_progress=False)  # resume
    with SurfaceFile.open(interrupted) as resumed:
        for name, values in resumed.maps().items():
            np.testing.assert_array_equal(values, expected[name], err_msg=name)


class AttentionClassifier(nn.Module):
    """Three tokens of two features, one multi-head self-attention layer, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs):
        tokens = self.embed(inputs.view(len(inputs), 3, 2))
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(mixed.mean(1))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("mode", ["forward_over_reverse", "double_backward"])
def test_attention_products_match_the_dense_hessian(dtype, mode):
    """The fused attention kernels have no double backward (before: a RuntimeError
    traceback on CPU); products run on the math kernel. A product errs by a few eps
    ||H|| ||v|| (16 eps of slack); lambda_max comes out converged."""
    torch.manual_seed(0)
    model = AttentionClassifier().to(DTYPES[dtype]).eval()
    inputs = torch.randn(12, 6, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    targets = torch.arange(12) % 3
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 5, hvp=mode)
    assert operator.mode == mode
    with sdpa_kernel(SDPBackend.MATH):  # torch.func.hessian needs it as much
        exact = dense_hessian(operator, torch.float64)
    spectrum = np.linalg.eigvalsh(exact)
    scale = np.abs(spectrum).max()
    vector = start_vector(operator.shape[0])
    eps = torch.finfo(DTYPES[dtype]).eps
    np.testing.assert_allclose(
        operator.hvp(vector).double().numpy(),
        exact @ vector.numpy(),
        rtol=0,
        atol=16 * eps * scale * float(vector.norm()),
    )
    found = extreme_eigenvalues(operator, "lanczos", vector, TOLERANCE, 200)
    criterion = Criterion.for_dtype(TOLERANCE, DTYPES[dtype])
    assert found.converged
    assert abs(found.lambda_max - spectrum[-1]) <= criterion.bound(spectrum[-1], scale)


@torch.jit.ignore
def terminated(inputs):
    raise Interrupted(signal.SIGTERM)
    return inputs


def scripted_terminated(inputs):
    return terminated(inputs)


def test_a_sigterm_inside_a_product_stays_a_sigterm():
    """TorchScript keeps only the text of what it wraps. Before: the RuntimeError
    (``Interrupted: (<Signals.SIGTERM: 15>, '')``) escaped as a bug; a wrapped plain
    KeyboardInterrupt came back as one, so a SIGTERM would exit 130, not 143."""
    scripted = torch.jit.script(scripted_terminated)
    with pytest.raises(Interrupted) as caught, product_context():
        scripted(torch.ones(1))
    assert caught.value.signal_number == signal.SIGTERM


class FusedAttentionNet(nn.Module):
    """Calls the fused CPU attention kernel itself, as custom layers may: no backend can be
    chosen for it, and it has neither a forward-mode rule nor a double backward."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, inputs):
        tokens = self.embed(inputs.view(len(inputs), 1, 3, 2))  # one head, three tokens
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return self.head(kernel(tokens, tokens, tokens)[0].mean(2).squeeze(1))


def test_a_model_without_second_derivatives_is_refused_in_one_line():
    """Before: the operator was built, and the first product raised a RuntimeError."""
    inputs, targets = torch.randn(6, 6), torch.arange(6) % 3
    with pytest.raises(UserError) as caught:
        hessian_operator(FusedAttentionNet(), inputs, targets, CROSS_ENTROPY, 6)
    message = str(caught.value)
    assert message.startswith("hessian.hvp: the model cannot be differentiated twice")
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in message
    assert "\n" not in message
