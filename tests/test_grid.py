"""Grid axes against closed forms: graded spacing (0 a point, exact ends, the documented
refinement), uniform axes unchanged, and a PCA plane whose centre is the final checkpoint."""

from __future__ import annotations

import logging
import math
import re

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import dense_hessian, trained_experiment

from landscape.cli import main
from landscape.config import AxisConfig, GridConfig, load_config
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.gallery import curvature_at, plane_ratio_share
from landscape.grid import (
    FRAME_MARGIN,
    GRADING,
    GRADING_RATIO,
    Grid,
    cell_at_origin,
    cells_from_origin,
    graded_coordinates,
)
from landscape.hessian import HessianEvaluator
from landscape.plan import log_path_resolution, plan_surface
from landscape.plot import (
    equal_aspect_fits,
    hessian_figures,
    plot_contour,
    plot_heatmap,
    plot_surface_file,
)
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.workers import run_job

GRADED_AXES = [(-1.0, 1.0, 21), (-1.3, 2.0, 21), (-0.05, 3.0, 51), (-2.0, 0.7, 6), (-1.0, 1.0, 3)]
ONE_SIDED_AXES = [(0.0, 1.0, 5), (-0.5, 0.0, 4)]


def sides(coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells below 0 (from 0 outwards) and above it."""
    zero = int(np.flatnonzero(coordinates == 0.0)[0])
    return np.diff(coordinates[: zero + 1])[::-1], np.diff(coordinates[zero:])


@pytest.mark.parametrize("low, high, num", GRADED_AXES + ONE_SIDED_AXES)
def test_graded_axis_has_zero_and_its_exact_ends_as_points_and_increases(low, high, num):
    x = graded_coordinates(low, high, num)
    assert x.dtype == np.float64 and x.size == num
    assert x[0] == low and x[-1] == high  # exactly, not to rounding
    assert (x == 0.0).sum() == 1
    assert (np.diff(x) > 0).all()


@pytest.mark.parametrize("low, high, num", GRADED_AXES + ONE_SIDED_AXES)
def test_graded_cells_follow_the_sinh_law_on_each_side(low, high, num):
    """Cell k of a side of length L with n cells is L (sinh(s (k+1)/n) - sinh(s k/n)) /
    sinh(s): the one at 0 is n sinh(s/n)/sinh(s) of the side's uniform cell L/n, the last
    cosh-like larger, and the cells grow outwards."""
    for length, cells in zip((-low, high), sides(graded_coordinates(low, high, num))):
        n = cells.size
        if n == 0:
            assert length == 0
            continue
        nodes = length * np.sinh(GRADING * np.arange(n + 1) / n) / math.sinh(GRADING)
        np.testing.assert_allclose(cells, np.diff(nodes), rtol=1e-12)
        refinement = math.sinh(GRADING) / (n * math.sinh(GRADING / n))
        assert cells[0] * refinement == pytest.approx(length / n, rel=1e-12)
        assert (np.diff(cells) > 0).all()


def test_the_cell_at_zero_tends_to_the_documented_refinement_and_ratio():
    """With many points the cell at 0 is s / sinh(s) of a uniform cell (1 / 3.3 for the
    ratio 10) and the largest cell is cosh(s) = GRADING_RATIO times it."""
    x = graded_coordinates(-1.0, 1.0, 2001)
    uniform = 2.0 / 2000
    below, above = sides(x)
    assert below[0] == pytest.approx(above[0], rel=1e-12)  # symmetric: one cell at 0
    assert uniform / above[0] == pytest.approx(math.sinh(GRADING) / GRADING, rel=1e-5)
    assert uniform / above[0] == pytest.approx(3.32, abs=0.01)
    assert above[-1] / above[0] == pytest.approx(GRADING_RATIO, rel=2e-3)
    assert cell_at_origin(x) == pytest.approx(above[0], rel=1e-12)


@pytest.mark.parametrize("low, high, num", GRADED_AXES)
def test_cells_per_side_are_proportional_to_its_length(low, high, num):
    """n_below / (num - 1) rounds L_below / (high - low), so L / n and the cell at 0
    match on both sides up to that rounding."""
    below, above = sides(graded_coordinates(low, high, num))
    cells = num - 1
    assert below.size + above.size == cells
    assert abs(below.size - cells * -low / (high - low)) <= 0.5 or below.size == 1
    if below.size > 2 and above.size > 2:
        per_cell = (-low / below.size, high / above.size)
        bound = max(per_cell) / min(per_cell)
        assert max(below[0], above[0]) / min(below[0], above[0]) <= bound * 1.1


@pytest.mark.parametrize(
    "axis",
    [
        AxisConfig(num=9, min=-1.0, max=1.0),
        AxisConfig(num=7, min=-0.2, max=0.8),
        AxisConfig(num=5, min=0.3, max=2.0),
        AxisConfig(num=6, min=-1.0, max=1.0, spacing="uniform"),
    ],
)
def test_axes_with_bounds_stay_uniform_and_bit_identical(axis):
    """The default for min/max is uniform: the very linspace of the versions before."""
    assert axis.spacing_kind == "uniform"
    grid = Grid.from_config(GridConfig(x=axis))
    assert np.array_equal(grid.x, np.linspace(axis.min, axis.max, axis.num))
    assert grid.spacing == ("uniform",)


def test_graded_axis_with_bounds_has_zero_among_its_points():
    grid = Grid.from_config(GridConfig(x=AxisConfig(num=11, min=-0.5, max=1.5, spacing="graded")))
    assert 0.0 in grid.x and grid.x[0] == -0.5 and grid.x[-1] == 1.5


def test_cells_from_origin_count_cells_on_either_spacing():
    uniform = np.linspace(-1.0, 1.0, 11)  # cell 0.2, 0 at index 5
    cells = cells_from_origin(uniform, np.array([0.1, -0.7, 1.0]))
    np.testing.assert_allclose(cells, [0.5, 3.5, 5])
    assert cell_at_origin(uniform) == pytest.approx(0.2)
    assert cell_at_origin(np.linspace(-1.0, 1.0, 10)) == pytest.approx(2 / 9)  # 0 inside a cell
    graded = graded_coordinates(-1.0, 2.0, 16)
    zero = int(np.flatnonzero(graded == 0.0)[0])
    np.testing.assert_allclose(
        cells_from_origin(graded, graded[[zero + 3, zero - 2, 0]]), [3, 2, zero], atol=1e-12
    )


def test_final_step_within_one_cell_is_warned(caplog):
    grid = Grid(graded_coordinates(-1.0, 1.0, 5), graded_coordinates(-1.0, 1.0, 5), ("graded",) * 2)
    cell = grid.x[3]  # the first cell above 0
    far, near = np.array([[0.9, 0.8], [0.3, -0.4]]), np.array([[0.9, 0.8], [cell / 2, -cell / 3]])
    with caplog.at_level(logging.INFO, logger="landscape.plan"):
        log_path_resolution(grid, np.vstack([far, [[0.0, 0.0]]]))
    assert not any(r.levelno == logging.WARNING for r in caplog.records)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("grid x: -1 to 1, 5 points, graded spacing, cell at the minimum")
    assert "the last 2 checkpoints lie" in lines[0] and lines[1].startswith("grid y:")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="landscape.plan"):
        log_path_resolution(grid, np.vstack([near, [[0.0, 0.0]]]))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(0.5 x 0.33 cells along x and y)" in warning
    # The plane suggested: graded, 1 + FRAME_MARGIN times the last two checkpoints' reach.
    assert (
        "grid.x: {min: -1, max: 1, num: 5, spacing: graded}, "
        "grid.y: {min: -0.92, max: 0.92, num: 5, spacing: graded}"
    ) in warning


def test_the_suggested_plane_resolves_a_geometrically_shrinking_path(caplog):
    """Steps shrinking 5x per checkpoint (a decaying learning rate) under a 21 x 21 frame
    of the whole path: the final step is inside one cell; on the suggested plane it
    spans more than one cell along each axis, and an axis without 0 is said so."""
    path = np.array([[2.5, 1.5], [0.5, 0.3], [0.1, 0.06], [0.02, 0.012], [0.0, 0.0]])
    frame = [graded_coordinates(-0.5, 3.0, 21), graded_coordinates(-0.3, 1.8, 21)]
    with caplog.at_level(logging.INFO, logger="landscape.plan"):
        log_path_resolution(Grid(*frame, ("graded",) * 2), path)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    bounds = [float(value) for value in re.findall(r"max: ([0-9.e-]+)", warning)]
    assert bounds == pytest.approx([1.15 * 0.1, 1.15 * 0.06], rel=0.05)  # printed to 2 digits
    zoomed = [graded_coordinates(-bound, bound, 21) for bound in bounds]
    assert (cells_from_origin(zoomed[0], path[-2:-1, 0]) > 1).all()
    assert (cells_from_origin(zoomed[1], path[-2:-1, 1]) > 1).all()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="landscape.plan"):
        log_path_resolution(Grid(frame[0], np.linspace(0.5, 2.0, 5), ("graded", "uniform")), path)
    lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[1]
        == "grid y: 0.5 to 2, 5 points, uniform spacing; the minimum (0) lies outside this axis"
    )


def test_a_zoomed_plane_keeps_its_frame_under_the_whole_path():
    """Contours of a plane with bounds inside the path show the path's part over the
    plane, not the plane shrunk to a corner of the whole path."""
    grid = Grid(graded_coordinates(-0.1, 0.1, 7), graded_coordinates(-0.05, 0.05, 5))
    xx, yy = np.meshgrid(grid.x, grid.y)
    path = {
        "coordinates": np.array([[5.0, 3.0], [0.5, 0.2], [0.04, -0.01], [0.0, 0.0]]),
        "epochs": np.arange(4),
        "lr_drop": np.zeros(4),
    }
    axis = plot_contour(grid, xx**2 + 3 * yy**2, "loss", ["x", "y"], trajectory=path).axes[0]
    assert axis.get_xlim() == (-0.1, 0.1) and axis.get_ylim() == (-0.05, 0.05)


@pytest.mark.parametrize(
    "axis, fragments",
    [
        ({"num": 9, "spacing": "log"}, ["grid.x.spacing: 'log' is not one of uniform, graded"]),
        (
            {"num": 9, "min": 0.5, "max": 1.0, "spacing": "graded"},
            ["grid.x.spacing: graded is finest at 0", "use uniform or a range that contains 0"],
        ),
        ({"num": 2}, ["grid.x.num: a graded axis needs >= 3 points", "spacing: uniform"]),
        ({"num": 2, "min": -1.0, "max": 1.0, "spacing": "graded"}, ["a graded axis needs >= 3"]),
    ],
)
def test_bad_spacing_is_a_one_line_config_error(experiment, capsys, axis, fragments):
    config = experiment(directions={"kind": "pca", "checkpoints": ["unused_*.pt"]})
    settings = yaml.safe_load(config.read_text())
    settings["grid"]["x"] = axis
    config.write_text(yaml.safe_dump(settings))
    assert main(["plan", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pca_plane_is_graded_with_the_final_checkpoint_at_a_grid_point(experiment, caplog, dtype):
    config = trained_experiment(
        experiment, "mlp", epochs=6, maps=["train_loss"], evaluation={"dtype": dtype}
    )
    settings = yaml.safe_load(config.read_text())
    folder = settings["train"]["checkpoint_dir"]
    settings["directions"] = {"kind": "pca", "checkpoints": [f"{folder}/epoch_*.pt"]}
    settings["grid"] = {"x": {"num": 9}, "y": {"num": 8}}
    config.write_text(yaml.safe_dump(settings))
    with caplog.at_level(logging.INFO, logger="landscape.plan"):
        path = plan_surface(load_config(config))
    run_job(path, "loss", show_progress=False)
    with SurfaceFile.open(path) as surface:
        grid, loss, cfg = surface.grid, surface.maps()["train_loss"], surface.config
        coordinates = surface.group("trajectory")[0]["coordinates"]
    with h5py.File(path) as handle:
        stored = [dict(handle[f"grid/{axis}"].attrs) for axis in "xy"]

    for axis, path_values, attrs in zip(grid.axes, coordinates.T, stored):
        low, high = min(path_values.min(), 0), max(path_values.max(), 0)
        margin = FRAME_MARGIN * (high - low)
        assert axis[0] == low - margin and axis[-1] == high + margin
        assert (axis == 0.0).sum() == 1 and (np.diff(axis) > 0).all()
        assert attrs["spacing"] == "graded" and "finest at 0" in attrs["description"]
        assert attrs["cell_at_minimum"] == cell_at_origin(axis)
        zero = int(np.flatnonzero(axis == 0.0)[0])
        assert np.argmin(np.diff(axis)) in (zero - 1, zero)  # the finest cell touches 0
    assert (coordinates[-1] == 0).all()  # the last checkpoint is the centre
    logged = [r.getMessage() for r in caplog.records if r.name == "landscape.plan"]
    assert any(line.startswith("grid x:") and "graded spacing" in line for line in logged)
    assert grid.spacing == ("graded", "graded")  # as read back from the file
    shown = surface_status(path)
    for axis, coordinates in zip("xy", grid.axes):
        cell = f"{axis}: graded spacing, cell at the minimum {cell_at_origin(coordinates):.4g} "
        assert cell in shown

    # Ground truth: the final checkpoint evaluated directly, with no direction applied.
    exp = Experiment.load(cfg, device="cpu")
    expected = evaluate(exp.model, exp.data.split("train"), 16, exp.objective)[0]
    row, column = int(np.flatnonzero(grid.y == 0)[0]), int(np.flatnonzero(grid.x == 0)[0])
    tolerance = 1e-12 if dtype == "float64" else 1e-6
    assert loss[row, column] == pytest.approx(expected, rel=tolerance)
    assert np.nanmin(loss) >= loss[row, column] - 0.05  # trained: near the plane's floor

    written = plot_surface_file(path, formats=("png",))
    assert any(p.name.endswith("train_loss_contour.png") for p in written)
    if equal_aspect_fits(grid):
        heatmap = plot_heatmap(grid, loss, "loss", ["x", "y"])
        assert heatmap.axes[0].get_aspect() == 1.0


def test_heatmap_cells_surround_their_graded_points():
    """Each cell's edges lie halfway to its neighbours: the heatmap of a graded grid puts
    value (j, i) around (x[i], y[j]), finest at 0."""
    grid = Grid(graded_coordinates(-1.0, 2.0, 9), graded_coordinates(-0.5, 0.5, 5))
    values = np.arange(45, dtype=np.float64).reshape(5, 9)
    mesh = plot_heatmap(grid, values, "v", ["x", "y"]).axes[0].collections[0]
    corners = mesh.get_coordinates()  # (ny + 1, nx + 1, 2)
    x_edges, y_edges = corners[0, :, 0], corners[:, 0, 1]
    np.testing.assert_allclose(x_edges[1:-1], (grid.x[1:] + grid.x[:-1]) / 2)
    np.testing.assert_allclose(y_edges[1:-1], (grid.y[1:] + grid.y[:-1]) / 2)
    assert (x_edges[:-1] < grid.x).all() and (grid.x < x_edges[1:]).all()
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(5, 9), values)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_uniform_sublattice_is_every_stride_th_point_from_the_first(stride):
    grid = Grid(np.linspace(-1, 1, 7), np.linspace(-1, 1, 5), ("uniform", "uniform"))
    numbers = np.arange(35).reshape(5, 7)
    assert grid.sublattice(stride).tolist() == numbers[::stride, ::stride].ravel().tolist()


def test_graded_sublattice_holds_the_minimum():
    grid = Grid(graded_coordinates(-1.0, 1.5, 8), graded_coordinates(-0.5, 1.0, 7))
    grid = Grid(grid.x, grid.y, ("graded", "graded"))
    column, row = (int(np.flatnonzero(axis == 0.0)[0]) for axis in grid.axes)
    points = grid.sublattice(3)
    rows, columns = np.unravel_index(points, grid.shape)
    assert row * 8 + column in points
    assert set(np.diff(np.unique(columns))) == {3} and set(np.diff(np.unique(rows))) == {3}
    assert np.unique(columns).size == len(range(column % 3, 8, 3))


def test_a_hessian_shard_is_one_row_of_the_anchored_sublattice():
    x = graded_coordinates(-1.0, 2.5, 8)  # 0 at index 2: the row holds 2, 5, not 3 points
    grid = Grid(x, np.linspace(-1, 1, 4), ("graded", "uniform"))
    columns = np.unique(np.unravel_index(grid.sublattice(3), grid.shape)[1])
    assert x[2] == 0.0 and columns.tolist() == [2, 5]
    assert grid.sublattice_row(3) == 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hessian_on_a_graded_grid_is_solved_and_drawn_at_the_minimum(experiment, dtype):
    config = experiment(
        grid={
            "x": {"min": -1.0, "max": 1.5, "num": 8, "spacing": "graded"},
            "y": {"min": -0.5, "max": 1.0, "num": 7, "spacing": "graded"},
        },
        maps=["train_loss", "lambda_min", "lambda_max"],
        hessian={"stride": 3},
        evaluation={"dtype": dtype},
    )
    path = plan_surface(load_config(config))
    run_job(path, "hessian", show_progress=False)
    with SurfaceFile.open(path) as surface:
        grid, maps, cfg = surface.grid, surface.maps(), surface.config
        directions = surface.directions()
        figures = hessian_figures(surface, maps, surface.axis_labels())
        points = surface.points("hessian")
    row, column = (int(np.flatnonzero(axis == 0.0)[0]) for axis in (grid.y, grid.x))
    assert row * grid.x.size + column in points

    # Ground truth: the dense Hessian at the checkpoint itself.
    exp = Experiment.load(cfg)
    checker = HessianEvaluator(exp, directions, cfg.hessian)
    checker.plane.move_to(0.0, 0.0)
    exact = np.linalg.eigvalsh(dense_hessian(checker.operator, torch.float64))
    for name, true in (("lambda_min", exact[0]), ("lambda_max", exact[-1])):
        scale = max(abs(exact[0]), abs(exact[-1]))
        bound = cfg.hessian.tolerance * max(abs(true), cfg.hessian.tolerance * scale)
        assert abs(maps[name][row, column] - true) <= bound, (name, maps[name][row, column], true)

    # The ratio map is drawn on the job's own points: its cells hold their values.
    rows, columns = (np.unique(i) for i in np.unravel_index(points, grid.shape))
    mesh = figures["lambda_ratio_heatmap"].axes[0].collections[0]
    drawn = np.asarray(mesh.get_array()).reshape(rows.size, columns.size)
    np.testing.assert_array_equal(drawn, maps["lambda_ratio"][np.ix_(rows, columns)])


def test_the_galleries_difference_formulas_refuse_a_graded_axis():
    """Second differences with one step h hold on a uniform axis only."""
    x = graded_coordinates(-1.0, 1.0, 7)
    xx, yy = np.meshgrid(x, x)
    with pytest.raises(ValueError, match="not evenly spaced"):
        curvature_at(x, x**2, 0.0)
    with pytest.raises(ValueError, match="not evenly spaced"):
        plane_ratio_share(x, x, xx**2 - yy**2)
