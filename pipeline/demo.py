"""The embedded demo: train ResNet-20 on digits, then a 2D and a 1D landscape, with figures,
and the Hessian's extreme eigenvalues on a coarse grid of the 2D plane.

Uses ``configs/demo.yaml`` and ``configs/demo_1d.yaml`` with every output redirected
under ``--out``; training is skipped when its last checkpoint exists and planning is
a resume, so running the demo twice only redraws the figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.plan import plan_surface
from pipeline.plot import plot_surface_file
from pipeline.train import checkpoint_path, train
from pipeline.workers import run_job

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICK_2D = ["grid.x.num=5", "grid.y.num=4", "train.epochs=1", "maps=[train_loss,train_acc]"]
QUICK_1D = ["grid.x.num=5"]


def run_demo(out: str | Path = "results/demo", quick: bool = False) -> list[Path]:
    """Run the whole demo with every output under ``out``; returns the figure files.

    ``quick`` shrinks it to a 5x4 grid after one epoch (a smoke test).
    """
    started = time.perf_counter()
    out = Path(out).resolve()
    training = [f"train.checkpoint_dir={out / 'checkpoints'}", *(QUICK_2D if quick else [])]
    settings = load_config(CONFIGS / "demo.yaml", training).train
    trained = checkpoint_path(settings, settings.epochs)
    surface_config = load_config(
        CONFIGS / "demo.yaml",
        [*training, f"model.checkpoint={trained}", f"output={out / 'surface_2d.h5'}"],
    )
    curve_config = load_config(
        CONFIGS / "demo_1d.yaml",
        [
            f"model.checkpoint={trained}",
            f"output={out / 'surface_1d.h5'}",
            *(QUICK_1D if quick else []),
        ],
    )
    if Path(surface_config.model.checkpoint).is_file():
        log.info("using the trained checkpoint %s", surface_config.model.checkpoint)
    else:
        train(surface_config)
    figures = []
    for config in (surface_config, curve_config):
        path = plan_surface(config)
        for job in config.jobs:
            run_job(path, job)
        figures += plot_surface_file(path, out / "figures")
    elapsed = time.perf_counter() - started
    print(f"\nDemo finished in {elapsed:.0f} s. Figures in {out / 'figures'}:")
    for figure in figures:
        if figure.suffix == ".png":
            print(f"  {figure}")
    return figures
