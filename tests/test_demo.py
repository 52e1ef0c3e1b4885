"""The demo pipeline end to end on a tiny grid: train, plan, run, plot, status; and every
shipped config is valid."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.demo import CONFIGS, run_demo
from pipeline.status import surface_status
from pipeline.store import SurfaceFile


def test_quick_demo_trains_maps_and_draws_every_figure(tmp_path):
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
    assert all(f.stat().st_size > 1000 for f in figures)
    assert (tmp_path / "checkpoints" / "epoch_000.pt").is_file()
    with SurfaceFile.open(tmp_path / "surface_2d.h5") as surface:
        loss = surface.maps()["train_loss"]
        assert surface.done("surface").all() and loss.shape == (4, 5)
    assert np.isfinite(loss).all()
    status = surface_status(tmp_path / "surface_2d.h5")
    assert "surface: 20/20 points done (100.0%)" in status
    # Running it again resumes: nothing to train or evaluate, the same numbers.
    run_demo(tmp_path, quick=True)
    with SurfaceFile.open(tmp_path / "surface_2d.h5") as surface:
        np.testing.assert_array_equal(surface.maps()["train_loss"], loss)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.grid is not None and config.output.endswith(".h5")
