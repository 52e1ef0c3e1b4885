"""How the plane figures are drawn: equal data aspect where the axes' ranges allow it,
3D views from the side of the minimum, one colour scale for the training and test maps
of a file, and |lambda_min / lambda_max| on Li et al.'s fixed scale with the loss's
contours from the fine grid. Closed-form maps on small grids, read back from the
Figures' artists."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from landscape.grid import Grid
from landscape.plot import (
    DEFAULT_AZIMUTH,
    MAX_ASPECT,
    RATIO_COLOUR_MAX,
    loss_figures,
    plot_contour,
    plot_ratio_map,
    view_of_minimum,
)

LABELS = ["x: a", "y: b"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def bowl(grid: Grid, centre=(0.0, 0.0), depth: float = 0.0) -> np.ndarray:
    """(Z[j, i]) = depth + (x_i - cx)^2 + 2 (y_j - cy)^2: one minimum, at ``centre``."""
    xx, yy = np.meshgrid(grid.x, grid.y)
    return depth + (xx - centre[0]) ** 2 + 2 * (yy - centre[1]) ** 2


@pytest.mark.parametrize("height, equal", [(3.0, True), (MAX_ASPECT, True), (5.0, False)])
def test_the_plane_has_equal_aspect_while_the_ranges_differ_by_at_most_max_aspect(height, equal):
    grid = Grid(np.linspace(-1, 1, 9), np.linspace(-height, height, 7))
    axis = plot_contour(grid, bowl(grid, depth=0.1), "loss", LABELS).axes[0]
    assert (axis.get_aspect() == 1.0) is equal
    if not equal:
        assert axis.get_aspect() == "auto"


@pytest.mark.parametrize("minimum", [(0.6, -0.5), (-0.8, 0.0), (0.0, 1.0)])  # grid points
def test_the_3d_view_looks_from_the_minimums_side(minimum):
    grid = Grid(np.linspace(-1, 1, 11), np.linspace(-2, 2, 9))
    values = bowl(grid, minimum, depth=0.1)
    figures = loss_figures(grid, {"train_loss": values}, LABELS)
    axis = figures["train_loss_surface3d"].axes[0]
    assert (axis.elev, axis.azim) == view_of_minimum(grid, values)
    # the camera's horizontal direction points to the minimum's offset from the middle,
    # in units of each axis's range (as the 3D box is drawn)
    offset = np.array([minimum[0] / 2, minimum[1] / 4])
    camera = np.array([np.cos(np.radians(axis.azim)), np.sin(np.radians(axis.azim))])
    np.testing.assert_allclose(camera, offset / np.linalg.norm(offset), atol=1e-12)


def test_a_minimum_in_the_middle_keeps_the_default_azimuth():
    grid = Grid(np.linspace(-1, 1, 11), np.linspace(-1, 1, 11))
    assert view_of_minimum(grid, bowl(grid))[1] == DEFAULT_AZIMUTH


def test_training_and_test_maps_share_one_colour_scale():
    grid = Grid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 7))
    train, test = bowl(grid, depth=0.01), 3 * bowl(grid, (0.2, 0), depth=0.5)
    accuracy = 1 - train / train.max()
    maps = {"train_loss": train, "test_loss": test, "train_acc": accuracy, "test_acc": accuracy / 2}
    figures = loss_figures(grid, maps, LABELS)
    low, high = min(train.min(), test.min()), max(train.max(), test.max())
    for kind in ("contour", "contourf"):
        levels = [figures[f"{name}_{kind}"].axes[0].collections[0].levels for name in maps]
        np.testing.assert_array_equal(levels[0], levels[1])  # train and test loss
        np.testing.assert_array_equal(levels[2], levels[3])  # train and test accuracy
        assert (levels[0][0], levels[0][-1]) == pytest.approx((low, high))
    for name in ("train_loss", "test_loss"):
        assert figures[f"{name}_heatmap"].axes[0].collections[0].get_clim() == (low, high)
        surface = figures[f"{name}_surface3d"].axes[0].collections[0]
        assert (surface.norm.vmin, surface.norm.vmax) == (low, high)
    clims = [figures[f"{name}_heatmap"].axes[0].collections[0].get_clim() for name in maps]
    assert clims[2] == clims[3] == (accuracy.min() / 2, accuracy.max())


def test_the_lambda_ratio_map_has_a_fixed_scale_and_the_fine_grids_loss_contours():
    fine = Grid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 9))
    coarse = Grid(fine.x[::2], fine.y[::2])
    ratio = np.linspace(0, 0.3, coarse.x.size * coarse.y.size).reshape(coarse.shape)
    loss = bowl(fine, depth=0.1)
    figure = plot_ratio_map(coarse, ratio, LABELS, np.zeros(coarse.shape, bool), fine, loss)
    axis = figure.axes[0]
    image = axis.collections[0]  # the heatmap's cells (a QuadMesh)
    assert image.get_clim() == (0.0, RATIO_COLOUR_MAX)  # not the data's 0..0.3
    np.testing.assert_array_equal(np.asarray(image.get_array()).reshape(ratio.shape), ratio)
    (contours,) = [c for c in axis.collections if hasattr(c, "levels")]
    assert contours.levels[0] == pytest.approx(loss.min()) and contours.levels.size == 10
    assert axis.get_xlim() == pytest.approx((-1.25, 1.25))  # the heatmap's cells, kept


def test_a_constant_map_is_drawn_as_one_band_around_its_value():
    """All 100 % accurate (a plane zoomed into the basin): filled contours need two levels."""
    grid = Grid(np.linspace(-0.01, 0.01, 5), np.linspace(-0.01, 0.01, 4))
    maps = {"train_loss": bowl(grid, depth=0.1), "train_acc": np.ones(grid.shape)}
    figures = loss_figures(grid, maps, LABELS)
    (levels,) = {
        tuple(figures[f"train_acc_{k}"].axes[0].collections[0].levels)
        for k in ("contour", "contourf")
    }
    assert levels[0] < 1.0 < levels[1] and levels == pytest.approx((1.0, 1.0), abs=2e-3)
