"""The demo pipeline end to end on a tiny grid: train, plan, run, plot, status."""

from __future__ import annotations

import numpy as np

from pipeline.demo import run_demo
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
