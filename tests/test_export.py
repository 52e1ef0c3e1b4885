"""`landscape export`: the CSV reads back to the file's maps bit for bit (NaN where not
computed), the VTK file read back by meshio holds the grid and every map as a point
array, and the HTML is standalone (plotly.js inline, nothing fetched) and draws its
surface, contours and Hessian points in a real headless Chromium. Surfaces from
test_report's fixture (loss on 9 x 7, Hessian at stride 2, float64 and float32), the
partial one included; a 1D surface; an analysis file's CSV."""

from __future__ import annotations

import base64
import csv
import json
import re
import subprocess

import h5py
import meshio
import numpy as np
import pytest
import yaml
from conftest import LANDSCAPE, trained_experiment, write_experiment
from test_report import computed_surface, console_errors, headless_dom, needs_chromium

from landscape.config import load_config
from landscape.export import HTML_DIV, export
from landscape.plan import plan_surface
from landscape.report import summary
from landscape.workers import run_job


@pytest.fixture(scope="module", params=["float64", "float32"])
def surfaces(request, tmp_path_factory):
    return computed_surface(tmp_path_factory.mktemp(f"export_{request.param}"), request.param)


def file_contents(path) -> tuple[list[np.ndarray], dict[str, np.ndarray], dict]:
    """(grid axes, maps, done flags) of a result file, read by h5py."""
    with h5py.File(path, "r") as handle:
        axes = [handle[f"grid/{axis}"][()] for axis in "xy" if f"grid/{axis}" in handle]
        maps = {name: handle[f"maps/{name}"][()] for name in handle["maps"]}
        done = {job: handle[f"done/{job}"][()] for job in handle["done"]}
    return axes, maps, done


def read_csv(path) -> dict[str, np.ndarray]:
    """Each column of an exported CSV, its ``#`` lines skipped."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(line for line in handle if not line.startswith("#")))
    header, values = rows[0], np.array(rows[1:], dtype=float)
    return {name: values[:, number] for number, name in enumerate(header)}


@pytest.mark.parametrize("which", ["finished", "partial"])
def test_csv_round_trips_to_every_map_and_its_coordinates(surfaces, which, tmp_path):
    path = surfaces[which == "partial"]
    target = export(path, "csv", tmp_path / "out.csv")
    columns = read_csv(target)
    (x, y), maps, _ = file_contents(path)
    xx, yy = np.meshgrid(x, y)
    np.testing.assert_array_equal(columns["x"], xx.ravel())
    np.testing.assert_array_equal(columns["y"], yy.ravel())
    assert set(columns) == {"x", "y", *maps}
    for name, values in maps.items():
        np.testing.assert_array_equal(columns[name].reshape(values.shape), values)
    if which == "partial":
        assert np.isnan(columns["train_loss"]).any()
    header = [line for line in target.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# train_loss: mean loss") for line in header)


def test_vtk_read_back_holds_the_grid_and_every_map(surfaces, tmp_path):
    path, partial = surfaces
    for source in (path, partial):
        target = export(source, "vtk", tmp_path / f"{source.stem}.vtu")
        assert target.read_bytes().startswith(b"<?xml") and b'format="binary"' in (
            target.read_bytes()
        )
        mesh = meshio.read(target)
        (x, y), maps, done = file_contents(source)
        xx, yy = np.meshgrid(x, y)
        np.testing.assert_array_equal(mesh.points[:, 0], xx.ravel())
        np.testing.assert_array_equal(mesh.points[:, 1], yy.ravel())
        np.testing.assert_array_equal(mesh.points[:, 2], 0)
        assert [block.type for block in mesh.cells] == ["quad"]
        assert mesh.cells[0].data.shape == ((x.size - 1) * (y.size - 1), 4)
        for name, values in maps.items():
            np.testing.assert_array_equal(mesh.point_data[name], values.ravel())
        for job, flags in done.items():
            np.testing.assert_array_equal(mesh.point_data[f"done_{job}"], flags.ravel())


def test_one_dimensional_surface_exports_lines_and_rows(experiment, tmp_path):
    config = experiment(grid={"x": {"min": -1.0, "max": 1.0, "num": 7}})
    path = plan_surface(load_config(config))
    run_job(path, "loss", show_progress=False)
    (x,), maps, _ = file_contents(path)
    mesh = meshio.read(export(path, "vtk", tmp_path / "line.vtu"))
    assert [block.type for block in mesh.cells] == ["line"]
    assert mesh.cells[0].data.tolist() == [[i, i + 1] for i in range(6)]
    np.testing.assert_array_equal(mesh.point_data["test_loss"], maps["test_loss"])
    columns = read_csv(export(path, "csv", tmp_path / "line.csv"))
    np.testing.assert_array_equal(columns["x"], x)
    np.testing.assert_array_equal(columns["train_acc"], maps["train_acc"])
    page = export(path, "html", tmp_path / "line.html").read_text()
    for title in ("training loss", "training accuracy", "test loss", "test accuracy"):
        assert page.count(f'"name":"{title}"') == 1  # a curve per map


def test_analysis_csv_has_a_column_per_value_and_vtk_is_refused(tmp_path):
    from test_analysis_plot import analysed

    from landscape.plan import plan_analysis
    from landscape.train import train

    config, _ = analysed(tmp_path, "float64", quantities=["top_eigenpairs"], top_k=3)
    train(load_config(config))
    path = plan_analysis(load_config(config))
    run_job(path, "analysis", show_progress=False)
    columns = read_csv(export(path, "csv", tmp_path / "an.csv"))
    _, maps, _ = file_contents(path)
    top = maps["top_eigenvalues"]
    for i in range(top.shape[1]):
        np.testing.assert_array_equal(columns[f"top_eigenvalues[{i}]"], top[:, i])
    refused = subprocess.run(
        [*LANDSCAPE, "export", str(path), "--format", "vtk"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "for surface files" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not path.with_suffix(".vtu").exists()


def plotted_figure(page: str) -> tuple[list[dict], dict]:
    """The traces and the layout an exported page hands to Plotly.newPlot, arrays
    decoded (plotly writes numpy arrays as base64 typed arrays)."""
    decoder = json.JSONDecoder()
    start = re.search(rf'Plotly\.newPlot\(\s*"{HTML_DIV}",\s*', page).end()
    traces, end = decoder.raw_decode(page, start)
    layout, _ = decoder.raw_decode(page, end + re.match(r",\s*", page[end:]).end())

    def decoded(value):
        if isinstance(value, dict) and "bdata" in value:
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return np.asarray(value) if isinstance(value, list) else value

    return [{key: decoded(value) for key, value in trace.items()} for trace in traces], layout


def test_html_is_standalone_with_the_hessian_points(surfaces, tmp_path):
    path, _ = surfaces
    page = export(path, "html", tmp_path / "view.html").read_text()
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js inline, nothing fetched
    assert len(page) > 1_000_000
    (x, y), maps, done = file_contents(path)
    rows, columns = np.nonzero(done["hessian"])
    traces, layout = plotted_figure(page)
    surfaces_drawn = [t for t in traces if t["type"] == "surface"]
    assert [t["name"] for t in surfaces_drawn][:2] == ["training loss", "test loss"]
    np.testing.assert_array_equal(
        surfaces_drawn[0]["z"].reshape(maps["train_loss"].shape), maps["train_loss"]
    )
    marked = [t for t in traces if t["name"] == "Hessian points"]
    # on each of the 5 maps' 3D surfaces (4 loss/accuracy, lambda ratio), and the contours
    assert len(marked) == 6
    for trace in marked:
        np.testing.assert_array_equal(trace["x"], x[columns])
        np.testing.assert_array_equal(trace["y"], y[rows])
    assert sum(bool(t.get("visible", True) is True) for t in traces if t["type"] == "surface") == 1
    for button in layout["updatemenus"][0]["buttons"]:  # each shows its map only
        visible = button["args"][0]["visible"]
        shown = {(t["type"], t["name"]) for t, seen in zip(traces, visible) if seen}
        title = button["label"]
        assert {name for kind, name in shown if kind in ("surface", "contour")} == {title}
        assert ("scatter3d", "Hessian points") in shown and ("scatter", "Hessian points") in shown
        assert sum(visible) == 4  # its surface, contours, 3D points; the points on the contours


def test_a_pca_plane_exports_its_trajectory_and_reports_its_variance(experiment, tmp_path):
    config = trained_experiment(experiment, "mlp", epochs=4, maps=["train_loss"])
    settings = yaml.safe_load(config.read_text())
    folder = settings["train"]["checkpoint_dir"]
    settings["directions"] = {"kind": "pca", "checkpoints": [f"{folder}/epoch_*.pt"]}
    settings["grid"] = {"x": {"num": 6}, "y": {"num": 5}}
    config.write_text(yaml.safe_dump(settings))
    path = plan_surface(load_config(config))
    run_job(path, "loss", show_progress=False)
    with h5py.File(path, "r") as handle:
        coordinates = handle["trajectory/coordinates"][()]
        variance = handle["trajectory"].attrs["explained_variance_ratio"]
    (trajectory,) = [
        t for t in plotted_figure(export(path, "html").read_text())[0] if t["name"] == "trajectory"
    ]
    np.testing.assert_array_equal(trajectory["x"], coordinates[:, 0])
    np.testing.assert_array_equal(trajectory["y"], coordinates[:, 1])
    assert summary(path)["pca_explained_variance"] == variance.tolist()


def test_a_surface_with_nothing_computed_is_refused_in_one_line(tmp_path):
    config = write_experiment(tmp_path, "empty")
    path = plan_surface(load_config(config))
    refused = subprocess.run(
        [*LANDSCAPE, "export", str(path), "--format", "html"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "nothing to export yet" in refused.stderr
    assert not path.with_suffix(".html").exists()


# What headless Chromium says about its own software WebGL, not about the page.
BROWSER_NOTICES = ("GL Driver Message", "willReadFrequently", "software WebGL")


@needs_chromium
def test_html_draws_its_surface_offline_in_a_browser(surfaces, tmp_path):
    path, _ = surfaces
    dom, stderr = headless_dom(export(path, "html", tmp_path / "view.html"))
    errors = [
        line for line in console_errors(stderr) if not any(n in line for n in BROWSER_NOTICES)
    ]
    assert errors == []
    assert "js-plotly-plot" in dom  # plotly drew into its div
    assert 'class="contourlayer' in dom and "<canvas" in dom  # contours, and the 3D scene
