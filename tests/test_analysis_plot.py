"""Figures and status of an analysis file: every curve, marker, band and bar drawn holds
the file's numbers (read back from the Figure's artists, compared with the maps read by
h5py) and each figure notes what its maps hold; a file with some checkpoints done draws
and lists only those; a file without a quantity has neither its figure nor its column;
the status table's numbers are the file's. One small real analysis per dtype: an MLP
trained 3 epochs on 3 Gaussian clusters, its 4 checkpoints analysed by `analyze`."""

from __future__ import annotations

import re
import shutil

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from conftest import write_experiment
from scipy import stats

from landscape.analysis_plot import analysis_figures
from landscape.config import load_config
from landscape.plan import plan_analysis
from landscape.plot import plot_surface_file
from landscape.reduce import reduce
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.train import train
from landscape.workers import ArrayTask, run_job

CLASSES = 3
EPOCHS = 3  # checkpoints epoch_000 (initialization) .. epoch_003
ANALYSIS = {
    "probes": 2,
    "steps": 12,
    "density_points": 64,
    "trace_samples": 6,
    "clustering_samples": 12,
}


def analysed(folder, dtype: str, **analysis) -> tuple:
    """The config file (and its contents) of an experiment in ``folder`` that trains
    EPOCHS epochs into ``folder/checkpoints`` and analyses each of them into
    ``folder/an.h5`` with ANALYSIS's settings, updated by ``analysis``."""
    path = write_experiment(folder, "exp", evaluation={"dtype": dtype})
    config = yaml.safe_load(path.read_text())
    config["train"] = {
        "checkpoint_dir": str(folder / "checkpoints"),
        "lr": 0.1,
        "epochs": EPOCHS,
        "batch_size": 20,
        "weight_decay": 0.0,
    }
    config["analysis"] = {
        "output": str(folder / "an.h5"),
        "checkpoints": [str(folder / "checkpoints" / "epoch_*.pt")],
        **ANALYSIS,
        **analysis,
    }
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.fixture(scope="module", params=["float64", "float32"])
def analysis(request, tmp_path_factory):
    """(complete analysis file, the same analysis with checkpoints 0 and 2 done): the
    partial one is real, task 0 of a 2-task array run merged by reduce, copied before
    the rest ran."""
    folder = tmp_path_factory.mktemp(f"analysis_{request.param}")
    path, _ = analysed(folder, request.param)
    train(load_config(path))
    output = plan_analysis(load_config(path))
    run_job(output, "analysis", show_progress=False, task=ArrayTask(0, 2))
    reduce(output)
    partial = folder / "partial.h5"
    shutil.copy(output, partial)
    run_job(output, "analysis", show_progress=False)
    return output, partial


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def file_maps(path) -> tuple[dict, np.ndarray, dict]:
    """The maps, done flags and done attributes of an analysis file, read by h5py."""
    with h5py.File(path, "r") as handle:
        maps = {name: handle[f"maps/{name}"][()] for name in handle["maps"]}
        return maps, handle["done/analysis"][()].astype(bool), dict(handle["done/analysis"].attrs)


def figures_of(path) -> dict:
    with SurfaceFile.open(path) as surface:
        return analysis_figures(surface, surface.maps(), surface.axis_labels())


def floored(density: np.ndarray) -> np.ndarray:
    return np.maximum(density, 1e-6 * density.max())


def test_every_figure_draws_the_files_numbers(analysis):
    path, _ = analysis
    maps, done, settings = file_maps(path)
    assert done.all()
    epochs = np.arange(EPOCHS + 1)
    k = maps["top_eigenvalues"].shape[1]
    assert k == CLASSES + 2
    figures = figures_of(path)
    assert set(figures) == {
        "density",
        "top_eigenvalues",
        "gradient_overlap",
        "trace",
        "gauss_newton_spectra",
        "hg_overlap",
        "clustering",
    }

    panels = [axis for axis in figures["density"].axes if axis.get_visible()]
    assert len(panels) == EPOCHS + 1  # 4 done checkpoints, up to 6 panels
    gap = settings["gap"]
    for item, axis in enumerate(panels):
        density, *markers = axis.get_lines()
        np.testing.assert_array_equal(density.get_xdata(), maps["density_grid"][item])
        np.testing.assert_array_equal(density.get_ydata(), floored(maps["density"][item]))
        assert axis.get_yscale() == "log"
        top, outliers = maps["top_eigenvalues"][item], int(maps["outliers"][item])
        by_label = {line.get_label(): line for line in markers}
        drawn_outliers = by_label["outliers"].get_xdata() if outliers else []
        np.testing.assert_array_equal(drawn_outliers, top[:outliers])
        drawn_bulk = by_label[f"top-{k}, bulk"].get_xdata() if outliers < k else []
        np.testing.assert_array_equal(drawn_bulk, top[outliers:])
        edge = maps["bulk_edge"][item]
        np.testing.assert_array_equal(by_label["bulk edge"].get_xdata(), [edge, edge])
        threshold = by_label[f"edge × (1 + {gap:g})"].get_xdata()
        np.testing.assert_array_equal(threshold, [edge * (1 + gap)] * 2)
        assert axis.get_title() == f"epoch {item}: outliers = {outliers}, C = {CLASSES}"

    eigenvalues, loss_axis = figures["top_eigenvalues"].axes
    for i, line in enumerate(eigenvalues.get_lines()[:k]):
        assert line.get_label() == f"λ{i + 1}"
        np.testing.assert_array_equal(line.get_xdata(), epochs)
        np.testing.assert_array_equal(line.get_ydata(), maps["top_eigenvalues"][:, i])
    circled = eigenvalues.get_lines()[k]
    outlier = np.arange(k) < maps["outliers"][:, None]
    np.testing.assert_array_equal(circled.get_ydata(), maps["top_eigenvalues"][outlier])
    (loss,) = loss_axis.get_lines()
    np.testing.assert_array_equal(loss.get_ydata(), maps["train_loss"])

    curves, trend, _ = figures["gradient_overlap"].axes  # and the colour bar
    for item, line in enumerate(curves.get_lines()[: EPOCHS + 1]):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, k + 1))
        np.testing.assert_array_equal(line.get_ydata(), maps["gradient_fractions"][item])
    (line,) = trend.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), maps["gradient_fractions"][:, CLASSES - 1])

    t = stats.t.ppf(0.5 + settings["confidence"] / 2, settings["trace_samples"] - 1)
    for axis, name in zip(figures["trace"].axes, ("trace_over_frobenius", "trace")):
        (line,) = axis.get_lines()
        np.testing.assert_array_equal(line.get_ydata(), maps[name])
        band = axis.collections[0].get_paths()[0].vertices
        for x, value, error in zip(epochs, maps[name], maps[f"{name}_se"]):
            edges = band[band[:, 0] == x, 1]
            np.testing.assert_allclose(
                [edges.min(), edges.max()], [value - t * error, value + t * error], rtol=1e-12
            )

    spectra = np.array(figures["gauss_newton_spectra"].axes).reshape(3, 3)
    for row, item in zip(spectra, (0, 2, 3)):  # 3 of 4 checkpoints, evenly: 0, 1.5, 3
        for axis, prefix in zip(row, ("", "gn_", "residual_")):
            density, *markers = axis.get_lines()
            np.testing.assert_array_equal(
                density.get_ydata(), floored(maps[f"{prefix}density"][item])
            )
            drawn = np.concatenate([marker.get_xdata() for marker in markers])
            np.testing.assert_array_equal(drawn, maps[f"{prefix}top_eigenvalues"][item])

    (overlap,) = figures["hg_overlap"].axes
    top_c, top_k = overlap.get_lines()
    assert (top_c.get_label(), top_k.get_label()) == (f"top-{CLASSES}", f"top-{k}")
    np.testing.assert_array_equal(top_c.get_ydata(), maps["hg_overlap"][:, CLASSES - 1])
    np.testing.assert_array_equal(top_k.get_ydata(), maps["hg_overlap"][:, k - 1])

    bars, *trends = figures["clustering"].axes
    names = ["same_logit_same_class", "same_logit", "same_logit_different_class"]
    for container, name in zip(bars.containers, names + ["different_logits"]):
        heights = [patch.get_height() for patch in container.patches]
        np.testing.assert_array_equal(heights, maps[name])
    for axis, name in zip(trends, ("logit_variance", "logit_gradient_norm", "weight_norm")):
        np.testing.assert_array_equal(axis.get_lines()[0].get_ydata(), maps[name])

    with SurfaceFile.open(path) as surface:  # each figure's note: what its maps hold
        for stem, name in (("trace", "trace_over_frobenius"), ("clustering", "different_logits")):
            note = " ".join(figures[stem].texts[0].get_text().split())
            assert f"{name}: {surface.description(name)}" in note


def test_a_partly_done_file_draws_and_lists_only_its_done_checkpoints(analysis):
    _, partial = analysis
    maps, done, _ = file_maps(partial)
    np.testing.assert_array_equal(done, [True, False, True, False])
    assert np.isnan(maps["trace"][~done]).all()
    figures = figures_of(partial)
    panels = [axis for axis in figures["density"].axes if axis.get_visible()]
    assert [axis.get_title().split(":")[0] for axis in panels] == ["epoch 0", "epoch 2"]
    line = figures["top_eigenvalues"].axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [0, 2])
    np.testing.assert_array_equal(line.get_ydata(), maps["top_eigenvalues"][done, 0])
    heights = [patch.get_height() for patch in figures["clustering"].axes[0].containers[0]]
    np.testing.assert_array_equal(heights, maps["same_logit_same_class"][done])

    status = surface_status(partial).splitlines()
    assert status[2].startswith("  analysis: 2/4 checkpoints done (50.0%)")
    rows = table("\n".join(status))
    assert [(row["checkpoint"], row["epoch"]) for row in rows] == [("0", "0"), ("2", "2")]


def table(status: str) -> list[dict[str, str]]:
    """The status's checkpoint table as one {header: cell} per row: cells are right
    aligned under their headers, two spaces apart."""
    lines = status.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("checkpoint"))
    header = lines[start]
    ends = [match.end() for match in re.finditer(r"\S+( \S+)*", header)]
    starts = [2] + [end + 2 for end in ends[:-1]]
    names = [header[a:b].strip() for a, b in zip(starts, ends)]
    return [
        {name: line[a:b].strip() for name, a, b in zip(names, starts, ends)}
        for line in lines[start + 1 :]
    ]


def test_status_shows_the_files_numbers_per_done_checkpoint(analysis):
    path, _ = analysis
    maps, _, settings = file_maps(path)
    status = surface_status(path)
    lines = status.splitlines()
    assert lines[0].startswith(f"{path}: analysis of 4 checkpoints, model mlp on ")
    assert "(C = 3 classes, 75 parameters analysed)" in lines[0]
    quantities = ", ".join(str(q) for q in settings["quantities"])
    assert lines[1] == f"  quantities: {quantities} (top_k 5)"
    assert lines[2].startswith("  analysis: 4/4 checkpoints done (100.0%), ")
    rows = table(status)
    assert len(rows) == EPOCHS + 1
    for item, row in enumerate(rows):
        seconds = sum(maps[f"{q}_seconds"][item] for q in settings["quantities"])
        saturated = "+" if maps["outliers_saturated"][item] else ""
        assert row == {
            "checkpoint": str(item),
            "epoch": str(item),
            "train loss": f"{maps['train_loss'][item]:.4g}",
            "lambda_1": f"{maps['top_eigenvalues'][item, 0]:.4g}",
            "outliers": f"{int(maps['outliers'][item])}{saturated} of {CLASSES}",
            "grad in top-3": f"{maps['gradient_fractions'][item, 2]:.4g}",
            "tr(H)/||H||_F": f"{maps['trace_over_frobenius'][item]:.4g}",
            "H/G top-3": f"{maps['hg_overlap'][item, 2]:.4g}",
            "seconds": f"{seconds:.3g}",
        }


def test_a_file_without_a_quantity_has_neither_its_figure_nor_its_column(tmp_path):
    """Only trace and clustering, over a checkpoint without an epoch (the experiment's
    initialization) and one of training: checkpoints go along x by number."""
    path, config = analysed(tmp_path, "float64", quantities=["trace", "clustering"])
    train(load_config(path))
    config["analysis"]["checkpoints"] = [
        config["model"]["checkpoint"],
        str(tmp_path / "checkpoints" / "epoch_003.pt"),
    ]
    path.write_text(yaml.safe_dump(config))
    output = plan_analysis(load_config(path))
    run_job(output, "analysis", show_progress=False)
    maps, _, _ = file_maps(output)
    figures = figures_of(output)
    assert set(figures) == {"trace", "clustering"}
    line = figures["trace"].axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [0, 1])
    assert figures["trace"].axes[0].get_xlabel() == "checkpoint (no epoch recorded)"
    status = surface_status(output)
    assert status.splitlines()[1] == "  quantities: trace, clustering (top_k 5)"
    rows = table(status)
    assert [row["epoch"] for row in rows] == ["-", "3"]
    assert list(rows[0]) == ["checkpoint", "epoch", "train loss", "tr(H)/||H||_F", "seconds"]
    assert rows[1]["tr(H)/||H||_F"] == f"{maps['trace_over_frobenius'][1]:.4g}"


@pytest.mark.parametrize("analysis", ["float64"], indirect=True)
def test_plot_writes_each_figure_of_an_analysis_file(analysis, tmp_path):
    path, _ = analysis
    written = plot_surface_file(path, tmp_path / "figures", formats=("png",))
    stems = sorted(target.stem.removeprefix("an_") for target in written)
    assert stems == sorted(
        [
            "clustering",
            "density",
            "gauss_newton_spectra",
            "gradient_overlap",
            "hg_overlap",
            "top_eigenvalues",
            "trace",
        ]
    )
    assert all(target.stat().st_size > 10_000 for target in written)
