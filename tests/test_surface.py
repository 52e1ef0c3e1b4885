"""Surface values against ground truth: a closed-form quadratic, direct evaluation, batch size."""

from __future__ import annotations

import numpy as np
import torch

from landscape.config import load_config
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.plan import plan_surface
from landscape.plot import plot_contour, plot_heatmap
from landscape.store import SurfaceFile
from landscape.workers import run_job


def plan_and_run(config_path):
    path = plan_surface(load_config(config_path))
    run_job(path, "loss", show_progress=False)
    return SurfaceFile.open(path)


def test_linear_model_with_mse_has_the_exact_quadratic_landscape(experiment):
    """f(a, b) = mean((r0 + a u + b v)^2) for a linear model, with u, v the outputs of d1, d2."""
    config = experiment(
        model={"name": "linear", "kwargs": {}},
        data={"name": "plugins:regression", "kwargs": {}},
        maps=["train_loss"],
        evaluation={"loss": "mse"},
        directions={"ignore": "none", "normalization": "filter"},
        grid={"x": {"min": -2.0, "max": 1.5, "num": 6}, "y": {"min": -0.5, "max": 2.0, "num": 5}},
    )
    with plan_and_run(config) as surface:
        stored = surface.maps()["train_loss"]
        d1, d2 = surface.directions()
        grid, cfg = surface.grid, surface.config
    exp = Experiment.load(cfg, device="cpu")
    x, t = exp.data.train_x.numpy(), exp.data.train_y.numpy()
    weight = exp.model.linear.weight.detach().numpy()
    bias = exp.model.linear.bias.detach().numpy()
    residual = x @ weight.T + bias - t
    u = x @ d1["linear.weight"].T + d1["linear.bias"]
    v = x @ d2["linear.weight"].T + d2["linear.bias"]
    # Expand the square: every coefficient of the quadratic in (a, b) is an exact mean.
    c = [
        np.mean(q) for q in (residual**2, 2 * residual * u, 2 * residual * v, u**2, 2 * u * v, v**2)
    ]
    a, b = np.meshgrid(grid.x, grid.y)
    expected = c[0] + c[1] * a + c[2] * b + c[3] * a**2 + c[4] * a * b + c[5] * b**2
    assert np.abs(u).max() > 0.1 and np.abs(v).max() > 0.1  # the directions really move it
    np.testing.assert_allclose(stored, expected, rtol=1e-10, atol=1e-12)


def direct_loss(exp: Experiment, d1, d2, a: float, b: float, split: str = "train") -> float:
    """L(theta0 + a d1 + b d2), loading the perturbed checkpoint weights into the model."""
    state = torch.load(exp.config.model.checkpoint, weights_only=True)["state_dict"]
    for name, direction in d1.items():
        state[name] = state[name] + a * torch.from_numpy(direction) + b * torch.from_numpy(d2[name])
    exp.model.load_state_dict(state)
    return evaluate(exp.model, exp.data.split(split), 1000, exp.objective)[0]


def test_non_square_grid_stores_and_draws_each_value_at_its_own_coordinates(experiment):
    config = experiment(
        grid={"x": {"min": -1.0, "max": 0.5, "num": 7}, "y": {"min": -0.2, "max": 0.8, "num": 5}},
        maps=["train_loss"],
    )
    with plan_and_run(config) as surface:
        loss = surface.maps()["train_loss"]
        d1, d2 = surface.directions()
        grid, cfg, labels = surface.grid, surface.config, surface.axis_labels()
    assert loss.shape == (5, 7)
    exp = Experiment.load(cfg, device="cpu")
    for i, j in [(0, 0), (6, 0), (0, 4), (6, 4), (3, 1), (2, 3)]:
        expected = direct_loss(exp, d1, d2, grid.x[i], grid.y[j])
        assert abs(loss[j, i] - expected) < 1e-12, (i, j)
    # The heatmap puts row j at height y[j] and column i at x[i].
    mesh = plot_heatmap(grid, loss, "loss", labels).axes[0].collections[0]
    corners = mesh.get_coordinates()  # (ny + 1, nx + 1, 2): cell corners, row j from y[0] up
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(loss.shape), loss)
    x_edges, y_edges = corners[0, :, 0], corners[:, 0, 1]
    assert (x_edges[:-1] < grid.x).all() and (grid.x < x_edges[1:]).all()
    assert (y_edges[:-1] < grid.y).all() and (grid.y < y_edges[1:]).all()
    # The contour plot spans x horizontally and y vertically (not transposed).
    axis = plot_contour(grid, loss, "loss", labels).axes[0]
    assert axis.get_xlim() == (grid.x[0], grid.x[-1])
    assert axis.get_ylim() == (grid.y[0], grid.y[-1])


def test_values_do_not_depend_on_the_evaluation_batch_size(experiment, tmp_path):
    maps = []
    for batch_size in (1, 7, 1000):
        config = experiment(
            name=f"batch{batch_size}",
            model={"name": "small_cnn", "kwargs": {"channels": [4]}},
            data={"name": "digits", "kwargs": {}},
            evaluation={"batch_size": batch_size},
            grid={
                "x": {"min": -1.0, "max": 1.0, "num": 3},
                "y": {"min": -1.0, "max": 1.0, "num": 2},
            },
        )
        with plan_and_run(config) as surface:
            maps.append(surface.maps())
    for other in maps[1:]:
        for name, values in maps[0].items():
            np.testing.assert_allclose(other[name], values, rtol=1e-12, atol=0)
