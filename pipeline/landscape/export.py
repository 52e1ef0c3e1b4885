"""Exports of a result file for other tools (``landscape export``): an interactive 3D
view (plotly, standalone HTML that works offline), a ParaView file (XML VTK) and CSV.

- ``html``: a surface's loss and accuracy maps (and |lambda_min / lambda_max| where
  the Hessian job has points) as a 3D surface beside its contours, one map at a time
  (a menu switches), the PCA trajectory and the done Hessian points on top. The
  plotly.js library is written into the file: no network is needed to open it.
- ``vtk``: an XML VTK unstructured grid (``.vtu``, binary, zlib) written by meshio:
  the grid's points in the plane z = 0, quadrilateral cells (line cells for a 1D
  surface) and every map as a point array (a map with k values per point as a k-component
  array), plus each job's done flags. ParaView's "Warp By Scalar" lifts it by any map.
  meshio writes no structured grid (``.vts``); an unstructured one holds the same.
- ``csv``: one row per grid point (or checkpoint) in point order: the coordinates,
  then every map, a map with several values per point as one column per value
  (``name[i]`` or ``name[i,j]``); ``#`` lines first say what each map is (its
  description attribute). Values are written with 17 significant digits, so they read
  back bit for bit; ``nan`` where a value is not computed yet.

plotly and meshio are the ``export`` extra; without them these formats say how to
install it.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np

from landscape.atomic import check_writable, write_file
from landscape.errors import UserError
from landscape.plot import HESSIAN_TITLES, TITLES, view_of_minimum
from landscape.store import SurfaceFile, existing_surface

SUFFIXES = {"html": ".html", "vtk": ".vtu", "csv": ".csv"}
HTML_DIV = "landscape-export"
CAMERA_DISTANCE = 2.2  # plotly's eye, in units of the scene box


def optional(module: str):
    """Import an ``export`` extra, or say how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(
            f"export needs {module}: pip install 'loss-landscape-pipeline[export]'"
        ) from None


def column_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """CSV columns of a map with trailing ``shape`` per point: ``name``, or
    ``name[i]``, ``name[i,j]``, ... in C order."""
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def point_columns(surface: SurfaceFile) -> tuple[list[str], np.ndarray]:
    """The coordinates and every map of the file, one row per point in point order:
    (column names, (points, columns) float64)."""
    grid = surface.grid
    if grid.y is None:
        names, columns = ["x"], [grid.x]
    else:
        xx, yy = np.meshgrid(grid.x, grid.y)
        names, columns = ["x", "y"], [xx.ravel(), yy.ravel()]
    points = int(np.prod(grid.shape))
    for name, values in surface.maps().items():
        names += column_names(name, surface.output_shape(name))
        columns += list(values.reshape(points, -1).T)
    return names, np.column_stack(columns)


def csv_text(surface: SurfaceFile) -> str:
    """The CSV export (see the module docstring)."""
    text = io.StringIO()
    text.write(f"# {surface.path.name}: {surface.kind} file, one row per {surface.item_noun}\n")
    for name in surface.map_names:
        text.write(f"# {name}: {surface.description(name) or 'no description stored'}\n")
    writer = csv.writer(text, lineterminator="\n")
    names, rows = point_columns(surface)
    writer.writerow(names)
    writer.writerows([[f"{value:.17g}" for value in row] for row in rows])
    return text.getvalue()


def vtk_bytes(surface: SurfaceFile) -> bytes:
    """The ParaView export (see the module docstring), as the file's bytes."""
    meshio = optional("meshio")
    grid = surface.grid
    ny, nx = (1, grid.x.size) if grid.y is None else grid.shape
    y = np.zeros(1) if grid.y is None else grid.y
    xx, yy = np.meshgrid(grid.x, y)
    points = np.column_stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)])
    number = np.arange(nx * ny).reshape(ny, nx)
    if grid.y is None:
        cells = [("line", np.column_stack([number[0, :-1], number[0, 1:]]))]
    else:
        corners = (number[:-1, :-1], number[:-1, 1:], number[1:, 1:], number[1:, :-1])
        cells = [("quad", np.column_stack([c.ravel() for c in corners]))]
    point_data = {}
    for name, values in surface.maps().items():
        flat = values.reshape(nx * ny, -1)
        point_data[name] = flat[:, 0] if surface.output_shape(name) == () else flat
    point_data.update(
        {f"done_{job}": surface.done(job).reshape(-1).astype(np.uint8) for job in surface.jobs}
    )
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "export.vtu"
        meshio.write(
            target,
            meshio.Mesh(points, cells, point_data=point_data),
            file_format="vtu",
            binary=True,
            compression="zlib",
        )
        return target.read_bytes()


def html_maps(surface: SurfaceFile) -> dict[str, tuple[str, np.ndarray]]:
    """The maps the interactive view offers: ``{name: (title, values)}``, those with a
    computed value."""
    maps = surface.maps()
    titles = {**TITLES, "lambda_ratio": HESSIAN_TITLES["lambda_ratio"].replace("$", "")}
    return {
        name: (title, maps[name])
        for name, title in titles.items()
        if name in maps and np.isfinite(maps[name]).any()
    }


def hessian_points(surface: SurfaceFile) -> np.ndarray | None:
    """The done Hessian points' (row, column) grid indices, (2, n); None without any."""
    if "hessian" not in surface.jobs:
        return None
    points = surface.points("hessian")
    done = surface.done("hessian").reshape(-1)[points].astype(bool)
    if not done.any():
        return None
    return np.array(np.unravel_index(points[done], surface.grid.shape))


def map_traces(grid, title: str, values: np.ndarray, marked: np.ndarray | None, visible: bool):
    """One map's traces with the subplot column of each: its 3D surface (1), its filled
    contours (2) and the done Hessian points on its surface (1)."""
    import plotly.graph_objects as go

    common = {"x": grid.x, "y": grid.y, "z": values, "colorscale": "Viridis", "name": title}
    traces = [
        (go.Surface(**common, visible=visible, showscale=False), 1),
        (go.Contour(**common, visible=visible, colorbar={"title": {"text": title}}), 2),
    ]
    if marked is not None:
        rows, columns = marked
        points = go.Scatter3d(
            x=grid.x[columns],
            y=grid.y[rows],
            z=values[rows, columns],
            mode="markers",
            marker={"size": 3, "color": "red"},
            name="Hessian points",
            visible=visible,
        )
        traces.append((points, 1))
    return traces


def overlay_traces(surface: SurfaceFile, marked: np.ndarray | None) -> list:
    """What the contours of every map show on top: the done Hessian points and the PCA
    trajectory (its checkpoints in order, each named by its epoch)."""
    import plotly.graph_objects as go

    grid, traces = surface.grid, []
    if marked is not None:
        rows, columns = marked
        traces.append(
            go.Scatter(
                x=grid.x[columns],
                y=grid.y[rows],
                mode="markers",
                name="Hessian points",
                marker={"color": "red", "symbol": "x", "size": 7},
            )
        )
    trajectory = surface.group("trajectory")
    if trajectory is not None:
        path, epochs = trajectory[0]["coordinates"], trajectory[0]["epochs"]
        traces.append(
            go.Scatter(
                x=path[:, 0],
                y=path[:, 1],
                mode="lines+markers",
                name="trajectory",
                text=[f"epoch {e}" for e in epochs],
                marker={"color": "royalblue"},
            )
        )
    return traces


def camera_eye(grid, values: np.ndarray) -> dict:
    """plotly's camera position for :func:`landscape.plot.view_of_minimum`'s view."""
    elevation, azimuth = np.radians(view_of_minimum(grid, values))
    direction = (
        np.cos(elevation) * np.cos(azimuth),
        np.cos(elevation) * np.sin(azimuth),
        np.sin(elevation),
    )
    return {axis: CAMERA_DISTANCE * float(d) for axis, d in zip("xyz", direction)}


def html_text(surface: SurfaceFile) -> str:
    """The interactive export (see the module docstring): a standalone HTML page."""
    optional("plotly")
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    shown = html_maps(surface)
    if not shown:
        raise UserError(f"{surface.path}: nothing to export yet, no point has a value")
    grid, labels = surface.grid, surface.axis_labels()
    if grid.y is None:
        figure = go.Figure(
            [go.Scatter(x=grid.x, y=values, name=title) for title, values in shown.values()]
        )
        figure.update_layout(xaxis_title=labels[0], title=surface.path.name)
        return figure.to_html(include_plotlyjs=True, full_html=True, div_id=HTML_DIV)
    figure = make_subplots(
        1, 2, specs=[[{"type": "scene"}, {"type": "xy"}]], column_widths=[0.55, 0.45]
    )
    marked = hessian_points(surface)
    owners = []  # the map each trace belongs to, by its number in shown
    for number, (title, values) in enumerate(shown.values()):
        for trace, column in map_traces(grid, title, values, marked, visible=number == 0):
            figure.add_trace(trace, 1, column)
            owners.append(number)
    for trace in overlay_traces(surface, marked):
        figure.add_trace(trace, 1, 2)
    overlays = len(figure.data) - len(owners)
    buttons = [
        {
            "label": title,
            "method": "update",
            "args": [{"visible": [owner == number for owner in owners] + [True] * overlays}],
        }
        for number, (title, _) in enumerate(shown.values())
    ]
    figure.update_layout(
        title=surface.path.name,
        updatemenus=[{"buttons": buttons, "x": 0, "y": 1.12, "xanchor": "left"}],
        scene={
            "xaxis_title": labels[0],
            "yaxis_title": labels[1],
            "camera": {"eye": camera_eye(grid, next(iter(shown.values()))[1])},
        },
        xaxis_title=labels[0],
        yaxis_title=labels[1],
        height=650,
    )
    return figure.to_html(include_plotlyjs=True, full_html=True, div_id=HTML_DIV)


def export(path: str | Path, format: str, out: str | Path | None = None) -> Path:
    """Write ``path``'s export in ``format`` (html, vtk or csv) to ``out`` (default:
    beside it, with the format's suffix); returns the file written."""
    path = existing_surface(path)
    out = Path(out) if out else path.with_suffix(SUFFIXES[format])
    check_writable(out, "--out")
    with SurfaceFile.open(path) as surface:
        if format != "csv" and surface.kind != "surface":
            raise UserError(
                f"{path}: an {surface.kind} file; --format {format} is for surface files "
                "(an analysis file exports as --format csv)"
            )
        if format == "csv":
            contents = csv_text(surface).encode()
        elif format == "vtk":
            contents = vtk_bytes(surface)
        else:
            contents = html_text(surface).encode()
    write_file(out, contents, "--out")
    return out
