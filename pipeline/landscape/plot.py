"""Figures of a surface file: 1D curves, 2D contours (Li et al. style), heatmaps, 3D surfaces.

Orientation is fixed once: ``Z[j, i]`` is the value at ``(x[i], y[j])``, which is what
``contour(x, y, Z)`` and ``pcolormesh(x, y, Z)`` draw, so non-square grids are never
transposed; every figure takes the grid's own coordinates, which may be graded (finest
at the minimum), never an assumed spacing. Every axis says which direction it is (the
label the planner stored: random and its scaling, PCA-1 with its explained variance,
Hessian lambda_max, ...).
A PCA plan's trajectory is drawn on its contours (Li et al. Fig. 9), an interpolation
gets its end points' weight histograms beside the curves (Li et al. Fig. 2).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from landscape.atomic import check_writable, write_file
from landscape.errors import UserError, reporting_interrupt
from landscape.grid import Grid
from landscape.jobs import JOBS, resolve
from landscape.store import SurfaceFile

FORMATS = ("png", "pdf")
STYLE = {"font.size": 11, "axes.labelsize": 12, "axes.titlesize": 12, "savefig.dpi": 200}
TITLES = {
    "train_loss": "training loss",
    "test_loss": "test loss",
    "train_acc": "training accuracy",
    "test_acc": "test accuracy",
}
# Planes whose axes' ranges differ by at most this factor are drawn with equal aspect.
MAX_ASPECT = 4.0
# The 3D views look down at this elevation (matplotlib's default: 30, its azimuth -60).
VIEW_ELEVATION = 40.0
DEFAULT_AZIMUTH = -60.0
# Li et al. Fig. 7 colours |lambda_min / lambda_max| from 0 (convex: blue) to this value
# (yellow: as much negative curvature as positive, or more, saturated).
RATIO_COLOUR_MAX = 1.0
# Maps drawn on one colour scale (training and test values of one quantity).
SHARED_SCALES = (("train_loss", "test_loss"), ("train_acc", "test_acc"))
HESSIAN_TITLES = {
    "lambda_ratio": r"$|\lambda_{min} / \lambda_{max}|$",
    "lambda_min": r"$\lambda_{min}$ of the Hessian",
    "lambda_max": r"$\lambda_{max}$ of the Hessian",
}


def contour_levels(values: np.ndarray, count: int = 20) -> np.ndarray:
    """Level values: log-spaced when a positive map spans decades (loss bowls), else linear;
    a constant map (100 % accuracy all over a plane zoomed into the basin) gets one band
    around its value, as filled contours need two levels."""
    finite = values[np.isfinite(values)]
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        half_band = abs(low) / 1000 or 1e-3
        return np.array([low - half_band, low + half_band])
    if low > 0 and high / low > 100:
        return np.geomspace(low, high, count)
    return np.linspace(low, high, count)


def plot_curves(grid: Grid, maps: dict[str, np.ndarray], labels: list[str], axis=None) -> Figure:
    """1D: loss on the left axis, accuracy on the right; train solid, test dashed."""
    if axis is None:
        _, axis = plt.subplots(figsize=(6, 4.2))
    loss_axis, accuracy_axis = axis, None
    for name in [n for n in TITLES if n in maps]:  # train before test, loss before accuracy
        values = maps[name]
        style = "-" if name.startswith("train") else "--"
        if name.endswith("loss"):
            loss_axis.plot(grid.x, values, style, color="tab:blue", lw=2, label=TITLES[name])
        else:
            accuracy_axis = accuracy_axis or loss_axis.twinx()
            accuracy_axis.plot(
                grid.x, 100 * values, style, color="tab:red", lw=2, label=TITLES[name]
            )
    loss_axis.set_xlabel(labels[0])
    loss_axis.set_ylabel("loss", color="tab:blue")
    handles, names = loss_axis.get_legend_handles_labels()
    if accuracy_axis is not None:
        accuracy_axis.set_ylabel("accuracy (%)", color="tab:red")
        accuracy_axis.set_ylim(0, 100)
        more_handles, more_names = accuracy_axis.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    loss_axis.legend(handles, names, loc="center", fontsize=9, frameon=False)
    loss_axis.figure.tight_layout()
    return loss_axis.figure


def plot_interpolation(
    grid: Grid, maps: dict[str, np.ndarray], labels: list[str], endpoints: tuple[dict, dict]
) -> Figure:
    """Li et al. Fig. 2: the interpolation curves, and beside them the weights of both
    ends, whose scale (not sharpness) often explains a sharp-looking end. Where a
    BatchNorm variance would be extrapolated below zero the curve is shaded grey."""
    histograms, attrs = endpoints
    figure, (curves, weights) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(3, 2))
    plot_curves(grid, maps, labels, curves)
    low, high = attrs["defined_alpha"]
    for start, stop in ((grid.x[0], low), (high, grid.x[-1])):
        if start < stop:  # BatchNorm variances extrapolated below zero: no loss there
            curves.axvspan(start, stop, color="0.9", zorder=0)
    for end, norm, colour in zip("ab", attrs["weight_norms"], ("tab:green", "tab:purple")):
        weights.stairs(
            histograms[f"histogram_{end}"],
            histograms["histogram_edges"],
            color=colour,
            lw=1.5,
            label=f"{end.upper()} (‖w‖ = {norm:.3g})",
        )
    weights.set_xlabel("weight value")
    weights.set_ylabel("count")
    weights.set_title("weights of both ends")
    weights.legend(fontsize=9, frameon=False)
    figure.tight_layout()
    return figure


def plot_contour(
    grid: Grid,
    values: np.ndarray,
    title: str,
    labels: list[str],
    filled: bool = False,
    trajectory: dict | None = None,
    scale: np.ndarray | None = None,
) -> Figure:
    """2D contour lines with labelled levels (or filled contours with a colour bar), and
    the projected ``trajectory`` on top when there is one. The levels span ``scale``
    (default: ``values``), so that maps given one scale share their colours."""
    figure, axis = plt.subplots(figsize=(5.6, 5))
    levels = contour_levels(values if scale is None else scale)
    logarithmic = (
        levels.size > 2
        and levels[0] > 0
        and np.allclose(levels[2] / levels[1], levels[1] / levels[0])
    )
    style = {"levels": levels, "cmap": "viridis", "norm": LogNorm() if logarithmic else None}
    if filled:
        drawn = axis.contourf(grid.x, grid.y, values, **style)
        figure.colorbar(drawn, ax=axis, label=title)
    else:
        drawn = axis.contour(grid.x, grid.y, values, linewidths=1.2, **style)
        axis.clabel(drawn, drawn.levels[::2], inline=True, fontsize=8, fmt="%.3g")
    axis.plot([0], [0], marker="*", color="black", markersize=10, linestyle="none")
    if trajectory is not None:  # on the grid's frame: a zoomed plane shows its part of the path
        draw_trajectory(axis, trajectory)
        axis.set_xlim(grid.x[0], grid.x[-1])
        axis.set_ylim(grid.y[0], grid.y[-1])
    _label_plane(axis, title, labels, grid)
    figure.tight_layout()
    return figure


def draw_trajectory(axis, trajectory: dict) -> None:
    """Li et al. Fig. 9: the checkpoints in the PCA plane (blue dots joined in order),
    the epochs after which the learning rate dropped (red), first and last labelled."""
    points, epochs = trajectory["coordinates"], trajectory["epochs"]
    axis.plot(points[:, 0], points[:, 1], "-o", color="tab:blue", markersize=3, lw=1)
    drops = trajectory["lr_drop"].astype(bool)
    if drops.any():
        axis.plot(*points[drops].T, "o", color="red", markersize=5, label="learning rate dropped")
        axis.legend(loc="upper right", fontsize=8)
    for index in (0, len(points) - 1):
        axis.annotate(
            f"epoch {epochs[index]}",
            points[index],
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )


def plot_heatmap(
    grid: Grid,
    values: np.ndarray,
    title: str,
    labels: list[str],
    unconverged: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> Figure:
    """Cell (i, j) around (x[i], y[j]), its edges halfway to the neighbouring points (on
    a graded grid the cells are as fine as the points: smallest at the minimum); NaN
    (not yet computed) cells stay blank, and cells flagged in ``unconverged`` are crossed
    out. The colours span ``scale``'s finite range (default: ``values``'s), so that maps
    given one scale share their colours."""
    figure, axis = plt.subplots(figsize=(5.8, 5))
    image = axis.pcolormesh(
        grid.x,
        grid.y,
        values,
        shading="nearest",
        cmap="viridis",
        rasterized=True,  # one image in a PDF, not a path per cell
        **colour_limits(values if scale is None else scale),
    )
    figure.colorbar(image, ax=axis, label=title)
    if unconverged is not None and unconverged.any():
        j, i = np.nonzero(unconverged)
        axis.plot(grid.x[i], grid.y[j], "x", color="red", markersize=8, label="not converged")
        axis.legend(loc="upper right", fontsize=8)
    _label_plane(axis, title, labels, grid)
    figure.tight_layout()
    return figure


def colour_limits(scale: np.ndarray) -> dict:
    """``vmin``/``vmax`` of ``scale``'s finite values (none if it has none)."""
    finite = scale[np.isfinite(scale)]
    return {"vmin": finite.min(), "vmax": finite.max()} if finite.size else {}


def plot_hessian_curves(grid: Grid, maps: dict[str, np.ndarray], labels: list[str]):
    """1D: lambda_min and lambda_max along x, unconverged points crossed out."""
    figure, axis = plt.subplots(figsize=(6, 4.2))
    unconverged = maps["hessian_converged"] == 0
    for name, colour in (("lambda_max", "tab:red"), ("lambda_min", "tab:blue")):
        axis.plot(grid.x, maps[name], "-o", color=colour, markersize=3, label=HESSIAN_TITLES[name])
        axis.plot(grid.x[unconverged], maps[name][unconverged], "x", color="black", markersize=8)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_yscale("symlog", linthresh=1e-3 * np.nanmax(np.abs(maps["lambda_max"])))
    axis.set_xlabel(labels[0])
    axis.set_ylabel("Hessian eigenvalue")
    axis.legend(fontsize=9, frameon=False)
    figure.tight_layout()
    return figure


def hessian_figures(surface: SurfaceFile, maps: dict, labels: list[str]) -> dict[str, Figure]:
    """Li et al. Fig. 7: heatmaps of |lambda_min/lambda_max|, lambda_min and lambda_max on
    the Hessian job's own (possibly coarser) grid; 1D runs get curves. None before the
    first point is done."""
    if not np.isfinite(maps["lambda_max"]).any():
        return {}
    grid = surface.grid
    # The rows and columns of the job's stored points (a sublattice: every stride-th
    # point along each axis, placed as the planner chose).
    rows_columns = [np.unique(i) for i in np.unravel_index(surface.points("hessian"), grid.shape)]
    if grid.y is None:
        (columns,) = rows_columns
        coarse = Grid(grid.x[columns])
        return {
            "hessian_curves": plot_hessian_curves(
                coarse, {k: v[columns] for k, v in maps.items()}, labels
            )
        }
    rows, columns = rows_columns
    coarse = Grid(grid.x[columns], grid.y[rows])
    sub = {name: values[np.ix_(rows, columns)] for name, values in maps.items()}
    unconverged = sub["hessian_converged"] == 0
    figures = {
        f"{name}_heatmap": plot_heatmap(coarse, sub[name], title, labels, unconverged)
        for name, title in HESSIAN_TITLES.items()
        if name != "lambda_ratio"
    }
    figures["lambda_ratio_heatmap"] = plot_ratio_map(
        coarse, sub["lambda_ratio"], labels, unconverged, grid, maps.get("train_loss")
    )
    return figures


def plot_ratio_map(
    grid: Grid,
    ratio: np.ndarray,
    labels: list[str],
    unconverged: np.ndarray,
    fine_grid: Grid,
    loss: np.ndarray | None,
) -> Figure:
    """Li et al. Fig. 7: |lambda_min / lambda_max| on a fixed scale from 0 (blue: locally
    convex) to RATIO_COLOUR_MAX (yellow: negative curvature as strong as the positive,
    or stronger, saturated), so maps of two files compare by colour; under it, the
    training loss's contours on the loss job's own (finer) grid in white, which shows
    where the convex region sits in the basin."""
    title = HESSIAN_TITLES["lambda_ratio"]
    scale = np.array([0.0, RATIO_COLOUR_MAX])
    figure = plot_heatmap(grid, ratio, title, labels, unconverged, scale)
    if loss is not None and np.isfinite(loss).sum() >= 4:
        axis = figure.axes[0]
        limits = axis.get_xlim(), axis.get_ylim()
        axis.contour(
            fine_grid.x,
            fine_grid.y,
            loss,
            levels=contour_levels(loss, 10),
            colors="white",
            linewidths=0.7,
        )
        axis.set_xlim(*limits[0])
        axis.set_ylim(*limits[1])
    return figure


def view_of_minimum(grid: Grid, values: np.ndarray) -> tuple[float, float]:
    """``(elevation, azimuth)`` in degrees of a camera from which the map's minimum is in
    sight: on the minimum's side of the plane's middle (azimuth towards it, in units
    of each axis's range, as the 3D box draws them), looking down at VIEW_ELEVATION,
    so the walls between the middle and the far side cannot hide it. A minimum in the
    middle keeps matplotlib's default azimuth."""
    finite = np.where(np.isfinite(values), values, np.inf)
    row, column = np.unravel_index(np.argmin(finite), values.shape)
    offset_x, offset_y = (
        (axis[index] - (axis[0] + axis[-1]) / 2) / np.ptp(axis)
        for axis, index in ((grid.x, column), (grid.y, row))
    )
    if np.hypot(offset_x, offset_y) < 1e-9:
        return VIEW_ELEVATION, DEFAULT_AZIMUTH
    return VIEW_ELEVATION, float(np.degrees(np.arctan2(offset_y, offset_x)))


def plot_surface3d(
    grid: Grid, values: np.ndarray, title: str, labels: list[str], scale: np.ndarray | None = None
) -> Figure:
    """A shaded 3D surface over the (alpha, beta) plane, seen from where its minimum is
    visible (:func:`view_of_minimum`), coloured over ``scale``'s range (default:
    ``values``'s)."""
    figure = plt.figure(figsize=(6.4, 5.2))
    axis = figure.add_subplot(projection="3d")
    xx, yy = np.meshgrid(grid.x, grid.y)
    axis.plot_surface(
        xx,
        yy,
        values,
        cmap="viridis",
        linewidth=0,
        antialiased=True,
        rstride=1,
        cstride=1,
        **colour_limits(values if scale is None else scale),
    )
    axis.view_init(*view_of_minimum(grid, values))
    axis.set_xlabel(labels[0], fontsize=8)
    axis.set_ylabel(labels[1], fontsize=8)
    axis.set_zlabel(title)
    axis.set_title(title)
    figure.tight_layout()
    return figure


def _label_plane(axis, title: str, labels: list[str], grid: Grid) -> None:
    """Axis titles, and equal data aspect where the plane's ranges allow it."""
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_title(title)
    if equal_aspect_fits(grid):
        axis.set_aspect("equal", adjustable="box")


def equal_aspect_fits(grid: Grid) -> bool:
    """Whether the plane is drawn with one data unit as long on both axes: distances and
    angles in it are then true (a PCA plane's path, a round basin looks round), which
    is worth it while the ranges differ by at most MAX_ASPECT; past that, one axis
    would shrink to a sliver, and each axis gets its own scale."""
    width, height = np.ptp(grid.x), np.ptp(grid.y)
    return max(width, height) <= MAX_ASPECT * min(width, height)


def plot_principal_sections(
    grid: Grid, loss: np.ndarray, eigenvalues: list[float], labels: list[str]
) -> Figure:
    """Boettcher & Wheeler: the training loss along each unit Hessian eigenvector through
    the centre, beside the parabola L(0) + lambda a^2 / 2 its eigenvalue predicts; where
    they part is where the quadratic picture of the minimum stops being true."""
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2))
    row, column = int(np.argmin(np.abs(grid.y))), int(np.argmin(np.abs(grid.x)))
    centre = loss[row, column]
    cuts = ((grid.x, loss[row, :]), (grid.y, loss[:, column]))
    for panel, (coordinates, values), eigenvalue, label in zip(panels, cuts, eigenvalues, labels):
        fine = np.linspace(coordinates[0], coordinates[-1], 200)
        panel.plot(coordinates, values, "-o", color="tab:blue", markersize=3, label="training loss")
        panel.plot(
            fine,
            centre + eigenvalue * fine**2 / 2,
            "--",
            color="tab:red",
            label=f"L(0) + λa²/2, λ = {eigenvalue:.4g}",
        )
        finite = values[np.isfinite(values)]
        if finite.size:  # else matplotlib's own limits (a section not computed yet)
            spread = finite.max() - finite.min()
            panel.set_ylim(finite.min() - 0.05 * spread, finite.max() + 0.05 * spread)
        panel.set_xlabel(label)
        panel.set_ylabel("training loss")
        panel.legend(fontsize=9, frameon=False)
    figure.tight_layout()
    return figure


def loss_figures(
    grid: Grid,
    maps: dict,
    labels: list[str],
    trajectory: dict | None = None,
    endpoints: tuple[dict, dict] | None = None,
) -> dict[str, Figure]:
    """1D curves (with the end points' weights for an interpolation), or per 2D
    loss/accuracy map: contours (with the trajectory of a PCA plan), filled contours,
    heatmap, 3D."""
    computed = [name for name in TITLES if name in maps and np.isfinite(maps[name]).any()]
    if not computed:
        return {}
    if grid.y is None:
        if endpoints is not None:
            return {"interpolation": plot_interpolation(grid, maps, labels, endpoints)}
        return {"curves": plot_curves(grid, maps, labels)}
    figures = {}
    for name in computed:
        values, title = maps[name], TITLES[name]
        scale = shared_scale(name, {n: maps[n] for n in computed})
        figures[f"{name}_contour"] = plot_contour(
            grid, values, title, labels, False, trajectory, scale
        )
        figures[f"{name}_contourf"] = plot_contour(
            grid, values, title, labels, True, trajectory, scale
        )
        figures[f"{name}_heatmap"] = plot_heatmap(grid, values, title, labels, scale=scale)
        figures[f"{name}_surface3d"] = plot_surface3d(grid, values, title, labels, scale)
    return figures


def shared_scale(name: str, maps: dict[str, np.ndarray]) -> np.ndarray:
    """The values whose range colours map ``name``: its own and its train/test partner's
    (SHARED_SCALES), so the same colour is the same loss (or accuracy) in both."""
    partners = next((pair for pair in SHARED_SCALES if name in pair), (name,))
    return np.concatenate([maps[n].ravel() for n in partners if n in maps])


def loss_job_figures(surface: SurfaceFile, maps: dict, labels: list[str]) -> dict[str, Figure]:
    """The loss job's figures (:func:`loss_figures`, with the file's trajectory or end
    points), and, in a plane of unit Hessian eigenvectors, the training loss's sections
    beside their quadratic models."""
    grid = surface.grid
    trajectory = surface.group("trajectory")
    path_points = trajectory[0] if trajectory else None
    figures = loss_figures(grid, maps, labels, path_points, surface.group("endpoints"))
    axes = surface.axis_attrs()
    unit_eigenvectors = axes[0]["kind"] == "hessian" and axes[0]["normalization"] == "unit"
    if figures and unit_eigenvectors and grid.y is not None and "train_loss" in maps:
        eigenvalues = [float(attrs["eigenvalue"]) for attrs in axes]
        figures["train_loss_sections"] = plot_principal_sections(
            grid, maps["train_loss"], eigenvalues, labels
        )
    return figures


def figures_by_job(surface: SurfaceFile) -> dict[str, dict[str, Figure]]:
    """Every figure the open result file supports now, per job (the job kind's figures
    function, :data:`landscape.jobs.JOBS`), drawn in STYLE; a job with no done point has
    none. The caller closes them."""
    with plt.rc_context(STYLE):
        maps, labels = surface.maps(), surface.axis_labels()
        return {job: resolve(JOBS[job].figures)(surface, maps, labels) for job in surface.jobs}


def plot_surface_file(
    path: str | Path, out_dir: str | Path | None = None, formats: tuple[str, ...] = FORMATS
) -> list[Path]:
    """Draw every figure the file supports into ``out_dir``; returns the files written.

    The folder is made only when there is something to draw: a file with no finished
    point is an error, and leaves nothing behind.
    """
    path = Path(path)
    out_dir = Path(out_dir) if out_dir else path.with_name(path.stem + "_plots")
    check_writable(out_dir, "--out", folder=True)
    figures = {}
    with SurfaceFile.open(path) as surface:
        for job_figures in figures_by_job(surface).values():
            figures.update(job_figures)
        if not figures:
            done = ", ".join(
                f"{job} {surface.done(job).sum()} of {surface.points(job).size}"
                for job in surface.jobs
            )
            commands = " or ".join(f"`landscape {JOBS[job].verb} {path}`" for job in surface.jobs)
            raise UserError(
                f"{path}: nothing to draw, no point has a value yet (points done: {done}); "
                f"compute them with {commands}"
            )
    written, made = [], not out_dir.exists()
    with plt.rc_context(STYLE), reporting_interrupt(lambda: f"{len(written)} figures written"):
        for stem, figure in figures.items():
            for extension in formats:
                target = out_dir / f"{path.stem}_{stem}.{extension}"
                image = io.BytesIO()
                figure.savefig(image, format=extension, bbox_inches="tight")
                try:
                    write_file(target, image.getbuffer(), "--out")
                except UserError:  # a full disk: a folder made for this plot goes again
                    if made:
                        shutil.rmtree(out_dir, ignore_errors=True)
                    raise
                written.append(target)
            plt.close(figure)
    return written
