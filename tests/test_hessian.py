"""Hessian maps against dense ground truth: torch.func.hessian + numpy.linalg.eigvalsh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, dense_hessian, trained_experiment
from torch.func import functional_call, hessian

from pipeline.config import load_config
from pipeline.evaluate import per_sample_loss
from pipeline.experiment import Experiment
from pipeline.hessian import HessianEvaluator, HessianOperator, extreme_eigenvalues
from pipeline.plan import plan_surface
from pipeline.plot import plot_surface_file
from pipeline.store import SurfaceFile
from pipeline.workers import run_hessian

TOLERANCE = 1e-3
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
    inputs, targets = exp.data.split("train")
    whole = HessianOperator(exp.model, inputs, targets, "cross_entropy", len(inputs))
    batched = HessianOperator(exp.model, inputs, targets, "cross_entropy", 7)
    reverse = HessianOperator(exp.model, inputs, targets, "cross_entropy", 7, hvp="double_backward")
    params, fixed = whole.state()
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split(whole.sizes), whole.shapes))
        outputs = functional_call(exp.model, {**fixed, **dict(zip(whole.names, pieces))}, (inputs,))
        return per_sample_loss(outputs, targets, "cross_entropy").mean()

    dense = hessian(mean_loss)(flat).numpy()
    vector = np.random.default_rng(0).normal(size=len(flat))
    np.testing.assert_allclose(whole @ vector, dense @ vector, rtol=0, atol=1e-10)
    np.testing.assert_allclose(batched @ vector, whole @ vector, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reverse @ vector, dense @ vector, rtol=0, atol=1e-10)
    assert whole.hvps == 2 and batched.hvps == 1 and reverse.hvps == 1


@pytest.mark.parametrize("model", sorted(MODELS))
def test_hessian_job_matches_dense_eigenvalues_at_every_point(experiment, model):
    config = trained_experiment(
        experiment, model, grid=HESSIAN_GRID, maps=["train_loss", "lambda_min", "lambda_max"]
    )
    surface = plan_surface(load_config(config))
    run_hessian(surface, show_progress=False)

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
        for found, true in (
            (maps["lambda_min"][index], exact[0]),
            (maps["lambda_max"][index], exact[-1]),
        ):
            assert abs(found - true) <= TOLERANCE * abs(true), (point, found, true)
        np.testing.assert_allclose(
            maps["lambda_ratio"][index], abs(exact[0] / exact[-1]), rtol=2 * TOLERANCE
        )
        smallest_ratio = min(smallest_ratio, abs(exact[0] / exact[-1]))
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
    run_hessian(surface, show_progress=False)

    exp = Experiment.load(load_config(config))
    inputs, targets = exp.data.split("train")
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
    inputs, targets = exp.data.split("train")
    operator = HessianOperator(exp.model, inputs, targets, "cross_entropy", 120)
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
    run_hessian(surface, show_progress=False)
    with SurfaceFile.open(surface) as done:
        computed = np.isfinite(done.maps()["lambda_max"])
        assert done.points("hessian").tolist() == [0, 2, 4, 10, 12, 14]
        assert not done.done("surface").any()  # the loss job is separate
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
    run_hessian(surface, show_progress=False)
    with SurfaceFile.open(surface) as done:
        assert (done.maps()["lambda_max"] >= done.maps()["lambda_min"]).all()
    figures = {path.name for path in plot_surface_file(surface, formats=("png",))}
    assert figures == {"exp_hessian_curves.png"}  # no loss curve: the surface job has not run
