"""The report page (`landscape report`): every number it shows equals the same number
recomputed from the file by h5py and numpy here (values at the centre, ranges, basin
widths, the lambda ratio's share, trace intervals, analysis rows); every figure it
references is a PNG in the page, one per figure `landscape plot` draws; a partly
finished file gives a page that says so; several files get an index; the page loads in
a real headless Chromium with no console error. One small real surface per dtype: an
MLP on Gaussian clusters, its loss on a 9 x 7 grid and its Hessian on every other point,
and tr(H) at the centre; the partial file is task 0 of a 2-task array run, reduced."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import GRID, LANDSCAPE, write_experiment
from scipy import stats

from landscape.config import load_config
from landscape.plan import plan_analysis, plan_surface
from landscape.plot import plot_surface_file
from landscape.reduce import reduce
from landscape.report import BASIN_RISE, RATIO_THRESHOLD, summary, write_report
from landscape.trace import estimate_trace
from landscape.train import train
from landscape.workers import ArrayTask, run_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium; make test does it)"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def computed_surface(folder, dtype: str):
    """(finished surface, partial copy): loss on GRID, Hessian at stride 2, trace."""
    config = write_experiment(
        folder,
        "exp",
        evaluation={"dtype": dtype},
        maps=["train_loss", "train_acc", "test_loss", "test_acc", "lambda_min", "lambda_max"],
        hessian={"stride": 2},
        trace={"samples": 4},
        **GRID,
    )
    path = plan_surface(load_config(config))
    for job in ("loss", "hessian"):
        run_job(path, job, show_progress=False, task=ArrayTask(0, 2))
    reduce(path)
    partial = folder / "partial.h5"
    shutil.copy(path, partial)
    for job in ("loss", "hessian"):
        run_job(path, job, show_progress=False)
    estimate_trace(path)
    return path, partial


@pytest.fixture(scope="module", params=["float64", "float32"])
def surfaces(request, tmp_path_factory):
    return computed_surface(tmp_path_factory.mktemp(f"report_{request.param}"), request.param)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def page_numbers(page: str) -> dict[str, float]:
    """Every number of a page by its data-key, at full precision."""
    found = re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', page)
    return {key: float(value) for key, value in found}


def page_images(page: str) -> dict[str, bytes]:
    """Every figure of a page: its name (alt) and its decoded PNG."""
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    return {name: base64.b64decode(data) for name, data in found}


def basin_by_labels(coordinates, line, centre):
    """Independent basin: the connected run of (loss < centre + rise) holding the centre."""
    from scipy import ndimage

    runs, _ = ndimage.label(line < line[centre] + BASIN_RISE)
    inside = np.flatnonzero(runs == runs[centre])
    return coordinates[inside[0]], coordinates[inside[-1]]


def test_page_numbers_equal_a_recomputation_from_the_file(surfaces, tmp_path):
    path, _ = surfaces
    page = write_report([path], tmp_path / "report").read_text()
    shown = page_numbers(page)
    with h5py.File(path, "r") as handle:
        x, y = handle["grid/x"][()], handle["grid/y"][()]
        maps = {name: handle[f"maps/{name}"][()] for name in handle["maps"]}
        hessian_done = handle["done/hessian"][()].astype(bool)
        trace = dict(handle["trace"].attrs)
        sha = handle.attrs["checkpoint_sha256"]
    row, column = np.argmin(np.abs(y)), np.argmin(np.abs(x))
    assert (x[column], y[row]) == (0.0, 0.0)
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert shown[f"maps.{name}.centre"] == maps[name][row, column]
        assert shown[f"maps.{name}.min"] == maps[name].min()
        assert shown[f"maps.{name}.max"] == maps[name].max()
    loss = maps["train_loss"]
    for axis, coordinates, line, centre in (
        ("x", x, loss[row, :], column),
        ("y", y, loss[:, column], row),
    ):
        low, high = basin_by_labels(coordinates, line, centre)
        assert (shown[f"basin.{axis}.low"], shown[f"basin.{axis}.high"]) == (low, high)
        assert shown[f"basin.{axis}.width"] == pytest.approx(high - low, abs=1e-15)
    ratio = np.abs(maps["lambda_min"] / maps["lambda_max"])[::2, ::2]
    assert hessian_done.sum() == ratio.size == shown["hessian.points"]
    assert shown["hessian.ratio_min"] == ratio.min()
    assert shown["hessian.ratio_max"] == ratio.max()
    assert shown["hessian.share_above"] == np.mean(ratio > RATIO_THRESHOLD)
    for estimator in ("hutchinson", "projection"):
        assert shown[f"trace.{estimator}.mean"] == trace[f"{estimator}_mean"]
        assert shown[f"trace.{estimator}.half_width"] == trace[f"{estimator}_half_width"]
    assert shown["progress.loss.done"] == shown["progress.loss.total"] == 63
    assert shown["progress.hessian.done"] == shown["progress.hessian.total"] == 20
    assert sha in page and 'id="partial"' not in page
    assert f"train_loss &lt; centre + {BASIN_RISE:g}" in page  # the threshold is named


def test_every_figure_is_in_the_page_once_per_figure_plot_draws(surfaces, tmp_path):
    path, _ = surfaces
    page = write_report([path], tmp_path / "report").read_text()
    images = page_images(page)
    drawn = plot_surface_file(path, tmp_path / "plots", ("png",))
    assert set(images) == {figure.stem.removeprefix(f"{path.stem}_") for figure in drawn}
    for name, image in images.items():
        assert image.startswith(PNG_SIGNATURE), name
        pixels = plt.imread(__import__("io").BytesIO(image))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
    assert "<script" not in page and "http" not in page.split("<pre>")[0]  # nothing fetched
    sections = re.findall(r"<h3>([^<]+)</h3>", page)
    assert {"Contours", "Heat maps", "3D surfaces"} <= set(sections)


def test_a_partly_finished_file_says_so_and_shows_its_done_points(surfaces, tmp_path):
    _, partial = surfaces
    page = write_report([partial], tmp_path / "report").read_text()
    shown = page_numbers(page)
    with h5py.File(partial, "r") as handle:
        done = {job: handle[f"done/{job}"][()] for job in ("loss", "hessian")}
        planned = {job: handle[f"points/{job}"].size for job in ("loss", "hessian")}
        loss = handle["maps/train_loss"][()]
    for job, flags in done.items():
        assert 0 < flags.sum() < planned[job]
        assert shown[f"progress.{job}.done"] == flags.sum()
        assert shown[f"progress.{job}.total"] == planned[job]
    banner = re.search(r'<p class="partial" id="partial">(.*?)</p>', page).group(1)
    assert f"loss {done['loss'].sum()} of 63" in banner and "landscape run" in banner
    assert shown["maps.train_loss.max"] == np.nanmax(loss)  # the done points' range
    assert page_images(page)  # figures of the done points
    assert summary(partial)["finished"] is False


def test_a_file_with_no_point_done_gives_a_page_without_figures(tmp_path):
    config = write_experiment(tmp_path, "empty", **GRID)
    path = plan_surface(load_config(config))
    page = write_report([path], tmp_path / "report").read_text()
    assert "No figure yet" in page and not page_images(page)
    assert "loss 0 of 63" in page


def test_several_files_get_an_index_linking_each_page(surfaces, tmp_path):
    path, partial = surfaces
    index = write_report([path, partial], tmp_path / "report")
    assert index.name == "index.html"
    links = re.findall(r'<a href="([^"]+)">', index.read_text())
    assert links == ["exp.html", "partial.html"]
    assert all((index.parent / link).is_file() for link in links)
    assert "partly finished" in index.read_text()


def test_bad_input_is_one_line(tmp_path, surfaces):
    path, _ = surfaces
    missing = subprocess.run(
        [*LANDSCAPE, "report", str(tmp_path / "none.h5"), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no such surface file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(path, twin / path.name)
    clash = subprocess.run(
        [*LANDSCAPE, "report", str(path), str(twin / path.name), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert clash.returncode == 2 and "exp.html" in clash.stderr
    assert not (tmp_path / "r").exists()


def test_analysis_page_rows_equal_the_file(tmp_path):
    from test_analysis_plot import analysed

    config, _ = analysed(tmp_path, "float64")
    train(load_config(config))
    path = plan_analysis(load_config(config))
    run_job(path, "analysis", show_progress=False)
    page = write_report([path], tmp_path / "report").read_text()
    shown = page_numbers(page)
    with h5py.File(path, "r") as handle:
        maps = {name: handle[f"maps/{name}"][()] for name in handle["maps"]}
        settings = dict(handle["done/analysis"].attrs)
        epochs = handle["checkpoints/epoch"][()]
    t = stats.t.ppf(0.5 + settings["confidence"] / 2, settings["trace_samples"] - 1)
    for row, epoch in enumerate(epochs):
        assert shown[f"checkpoints.{row}.epoch"] == epoch
        assert shown[f"checkpoints.{row}.train_loss"] == maps["train_loss"][row]
        assert shown[f"checkpoints.{row}.outliers"] == maps["outliers"][row]
        assert shown[f"checkpoints.{row}.trace"] == maps["trace"][row]
        assert shown[f"checkpoints.{row}.trace_half_width"] == pytest.approx(
            t * maps["trace_se"][row], rel=1e-12
        )
    assert set(page_images(page)) >= {"density", "top_eigenvalues", "trace"}


def headless_dom(target) -> tuple[str, str]:
    """(DOM after load, stderr with console messages) of ``target`` in headless Chromium."""
    loaded = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            target.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    return loaded.stdout, loaded.stderr


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_the_page_loads_in_a_browser_with_every_figure(surfaces, tmp_path):
    path, _ = surfaces
    page = write_report([path], tmp_path / "report")
    dom, stderr = headless_dom(page)
    assert console_errors(stderr) == []
    assert len(re.findall(r"<img ", dom)) == len(page_images(page.read_text())) > 10
    assert "landscape run" not in dom  # finished: no banner
