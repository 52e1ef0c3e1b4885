"""The demo pipeline end to end on a tiny grid: train, plan, run, plot, status; and every
shipped config is valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from conftest import TESTS

from landscape.demo import CONFIGS, demo_config, run_demo
from landscape.plot import plot_surface_file
from landscape.status import surface_status
from landscape.store import SurfaceFile


def trained_again(config):
    raise AssertionError(f"trained again: {config.train.checkpoint_dir}")


def redraw_1d_only(path, folder):
    return plot_surface_file(path, folder) if path.name == "surface_1d.h5" else []


def test_quick_demo_trains_maps_and_draws_every_figure(tmp_path, monkeypatch):
    figures = run_demo(tmp_path, quick=True)
    names = {f.name for f in figures}
    for stem in (
        "train_loss_contour",
        "train_loss_contourf",
        "train_loss_heatmap",
        "train_loss_surface3d",
        "train_acc_contour",
    ):
        assert f"surface_2d_{stem}.png" in names and f"surface_2d_{stem}.pdf" in names
    assert {"surface_1d_curves.png", "surface_1d_curves.pdf"} <= names
    assert {
        "surface_pca_train_loss_contour.png",
        "surface_hessian_train_loss_contour.png",
        "surface_hessian_train_loss_sections.png",
        "surface_interpolation_interpolation.png",
    } <= names
    with SurfaceFile.open(tmp_path / "surface_pca.h5") as pca:
        assert pca.group("trajectory")[0]["coordinates"].shape == (3, 2)  # epochs 0, 1, 2
        assert pca.axis_labels()[0].startswith("x: PCA-1 (")
    with SurfaceFile.open(tmp_path / "surface_hessian.h5") as hessian:
        assert "λmax" in hessian.axis_labels()[0] and "λmin" in hessian.axis_labels()[1]
        assert len(hessian.group("trace")[0]["hutchinson"]) == 4
    with SurfaceFile.open(tmp_path / "analysis.h5") as analysis:
        assert analysis.done("analysis").all() and analysis.maps()["outliers"].shape == (2,)
    assert {"analysis_density.png", "analysis_clustering.png"} <= names
    assert all(f.stat().st_size > 1000 for f in figures)
    assert (tmp_path / "checkpoints" / "epoch_000.pt").is_file()
    with SurfaceFile.open(tmp_path / "surface_2d.h5") as surface:
        loss = surface.maps()["train_loss"]
        assert surface.done("loss").all() and loss.shape == (4, 5)
    assert np.isfinite(loss).all()
    status = surface_status(tmp_path / "surface_2d.h5")
    assert "loss: 20/20 points done (100.0%)" in status
    # Running it again resumes: nothing to train or evaluate, the same numbers. Of the
    # figures and the trace, the run's cost and made as the first time, only the 1D curve
    # is drawn again, over its earlier files.
    monkeypatch.setattr("landscape.demo.train", trained_again)
    monkeypatch.setattr("landscape.demo.plot_surface_file", redraw_1d_only)
    monkeypatch.setattr("landscape.demo.estimate_trace", lambda path: "")
    again = run_demo(tmp_path, quick=True)
    assert sorted(f.name for f in again) == ["surface_1d_curves.pdf", "surface_1d_curves.png"]
    with SurfaceFile.open(tmp_path / "surface_2d.h5") as surface:
        np.testing.assert_array_equal(surface.maps()["train_loss"], loss)


SHIPPED = sorted(entry.name for entry in CONFIGS.iterdir() if entry.name.endswith(".yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_is_valid(name):
    config = demo_config(name, [])
    if name.startswith("analysis_"):
        assert config.analysis.output.endswith(".h5") and config.train is not None
    else:
        assert config.grid is not None and config.output.endswith(".h5")


def test_the_repositorys_configs_are_the_packages():
    assert sorted(path.name for path in (TESTS.parent / "configs").glob("*.yaml")) == SHIPPED
    assert (TESTS.parent / "configs").resolve() == (
        TESTS.parent / "pipeline" / "landscape" / "configs"
    )


# Runs run_demo from the unpacked wheel, in a folder with no configs/, with the work
# itself (training, planning, running, plotting) stubbed: only the configs are real.
DEMO_FROM_WHEEL = """
    import pathlib, sys
    import landscape, landscape.demo as demo
    assert landscape.__file__.startswith(sys.argv[1]), landscape.__file__
    planned = []
    demo.train = lambda config: None
    demo.plan_surface = lambda config: planned.append(config.output) or config.output
    demo.plan_analysis = lambda config: planned.append(config.analysis.output) or ""
    demo.run_job = lambda path, job: None
    demo.plot_surface_file = lambda path, folder: []
    demo.estimate_trace = lambda path: ""
    demo.run_demo(pathlib.Path.cwd() / "out", quick=True)
    print(len(planned), *(pathlib.Path(output).name for output in planned))
"""


def test_an_installed_package_runs_the_demo_from_its_own_configs(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(TESTS.parent / "pipeline", source / "pipeline")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(TESTS.parent / name, source)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    configs = installed / "landscape" / "configs"
    assert sorted(path.name for path in configs.glob("*.yaml")) == SHIPPED
    shipped_papers = sorted(path.name for path in (CONFIGS / "papers").glob("*.yaml"))
    assert sorted(path.name for path in (configs / "papers").iterdir()) == shipped_papers
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    demo = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DEMO_FROM_WHEEL), str(installed)],
        env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"},
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.splitlines()[-1].split() == [
        "6",
        "surface_2d.h5",
        "surface_1d.h5",
        "surface_pca.h5",
        "surface_hessian.h5",
        "surface_interpolation.h5",
        "analysis.h5",
    ]
