"""The embedded demo: train ResNet-20 on digits, then its landscapes, with figures: a 2D
random plane with the Hessian's extreme eigenvalues on a coarse grid, a 1D curve, the
training trajectory on its PCA plane, the plane of the Hessian's extreme eigenvectors,
the interpolation from initialization to solution, and tr(H) estimated two ways.

Uses the example configs shipped in the package (``landscape/configs/demo*.yaml``, which
``configs/`` in the repository links to), with every output redirected under ``--out``;
training is skipped when its last checkpoint exists and planning is a resume, so
running the demo twice only redraws the figures.
"""

from __future__ import annotations

import logging
import time
from importlib.resources import files
from pathlib import Path

from landscape.config import ExperimentConfig, parse_config
from landscape.plan import plan_surface
from landscape.plot import plot_surface_file
from landscape.trace import estimate_trace
from landscape.train import checkpoint_path, train
from landscape.workers import run_job

log = logging.getLogger(__name__)
CONFIGS = files("landscape") / "configs"
QUICK_2D = ["grid.x.num=5", "grid.y.num=4", "train.epochs=2", "maps=[train_loss,train_acc]"]
QUICK = {
    "demo_1d.yaml": ["grid.x.num=5"],
    "demo_pca.yaml": ["grid.x.num=4", "grid.y.num=3"],
    "demo_hessian.yaml": ["grid.x.num=3", "grid.y.num=3", "hessian.max_hvps=8", "trace.samples=4"],
    "demo_interpolation.yaml": ["grid.x.num=5"],
}


def demo_config(name: str, overrides: list[str]) -> ExperimentConfig:
    """One of the package's example configs (read from the package, so an installed
    ``landscape`` finds it wherever it runs), after ``key.path=value`` overrides."""
    return parse_config(
        (CONFIGS / name).read_text(encoding="utf-8"), f"landscape/configs/{name}", overrides
    )


def run_demo(out: str | Path = "results/demo", quick: bool = False) -> list[Path]:
    """Run the whole demo with every output under ``out``; returns the figure files.

    ``quick`` shrinks it to tiny grids after two epochs (a smoke test).
    """
    started = time.perf_counter()
    out = Path(out).resolve()
    training = [f"train.checkpoint_dir={out / 'checkpoints'}", *(QUICK_2D if quick else [])]
    settings = demo_config("demo.yaml", training).train
    trained = checkpoint_path(settings, settings.epochs)
    surface_config = demo_config(
        "demo.yaml",
        [*training, f"model.checkpoint={trained}", f"output={out / 'surface_2d.h5'}"],
    )
    if trained.is_file():
        log.info("using the trained checkpoint %s", trained)
    else:
        train(surface_config)
    plans = {
        "demo_1d.yaml": ["output=" + str(out / "surface_1d.h5")],
        "demo_pca.yaml": [
            "output=" + str(out / "surface_pca.h5"),
            f'directions.checkpoints=["{out / "checkpoints"}/epoch_*.pt"]',
        ],
        "demo_hessian.yaml": ["output=" + str(out / "surface_hessian.h5")],
        "demo_interpolation.yaml": [
            "output=" + str(out / "surface_interpolation.h5"),
            f"model.checkpoint={checkpoint_path(settings, 0)}",
            f'directions.targets=["{trained}"]',
        ],
    }
    configs = [surface_config] + [
        demo_config(
            name,
            [f"model.checkpoint={trained}", *overrides, *(QUICK[name] if quick else [])],
        )
        for name, overrides in plans.items()
    ]
    figures = []
    for config in configs:
        path = plan_surface(config)
        for job in config.jobs:
            run_job(path, job)
        figures += plot_surface_file(path, out / "figures")
    trace = estimate_trace(out / "surface_hessian.h5")
    elapsed = time.perf_counter() - started
    print(f"\n{trace}")
    print(f"\nDemo finished in {elapsed:.0f} s. Figures in {out / 'figures'}:")
    for figure in figures:
        if figure.suffix == ".png":
            print(f"  {figure}")
    return figures
