"""The embedded demo: train ResNet-20 on digits, then its landscapes, with figures: a 2D
random plane with the Hessian's extreme eigenvalues on a coarse grid, a 1D curve, the
training trajectory on its PCA plane, the plane of the Hessian's extreme eigenvectors,
the interpolation from initialization to solution, and tr(H) estimated two ways; and one
curvature analysis (Sagun et al.: C outliers above a bulk) of a small MLP trained on
Gaussian clusters, at a few checkpoints of its training.

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
from landscape.plan import plan_analysis, plan_surface
from landscape.plot import plot_surface_file
from landscape.report import write_report
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
# The analysis: analysis_clusters.yaml shrunk to C = 3 classes and 100 full-batch steps
# (loss 2.5e-4: near zero, 3 outliers). Not the ResNet-20 above: one of its Hessian-vector
# products costs 12-15 of its forward passes (one thread, batch 128-2048: make bench), and the
# analysis below spends some 370 per checkpoint; this MLP's take a few milliseconds.
ANALYSIS = {"epochs": (0, 5, 20, 100), "settings": ["probes=3", "steps=20", "trace_samples=16"]}
QUICK_ANALYSIS = {"epochs": (0, 20), "settings": ["probes=2", "steps=12", "trace_samples=4"]}


def demo_config(name: str, overrides: list[str]) -> ExperimentConfig:
    """One of the package's example configs (read from the package, so an installed
    ``landscape`` finds it wherever it runs), after ``key.path=value`` overrides."""
    return parse_config(
        (CONFIGS / name).read_text(encoding="utf-8"), f"landscape/configs/{name}", overrides
    )


def analysis_config(out: Path, quick: bool) -> ExperimentConfig:
    """The demo's analysis: its training run under ``out``/analysis, a few of its epochs."""
    shrink = QUICK_ANALYSIS if quick else ANALYSIS
    folder = out / "analysis"
    checkpoints = [str(folder / "checkpoints" / f"epoch_{e:03d}.pt") for e in shrink["epochs"]]
    return demo_config(
        "analysis_clusters.yaml",
        [
            "data.kwargs.num_classes=3",
            f"train.epochs={shrink['epochs'][-1]}",
            f"train.checkpoint_dir={folder / 'checkpoints'}",
            f"analysis.output={out / 'analysis.h5'}",
            f"analysis.checkpoints={checkpoints}",
            "analysis.clustering_samples=60",
            *(f"analysis.{setting}" for setting in shrink["settings"]),
        ],
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
    analysis = analysis_config(out, quick)
    if not Path(analysis.analysis.checkpoints[-1]).is_file():
        train(analysis)
    path = plan_analysis(analysis)
    run_job(path, "analysis")
    figures += plot_surface_file(path, out / "figures")
    trace = estimate_trace(out / "surface_hessian.h5")
    report = write_report(sorted(out.glob("*.h5")), out / "report")
    elapsed = time.perf_counter() - started
    print(f"\n{trace}")
    print(f"\nDemo finished in {elapsed:.0f} s. Figures in {out / 'figures'}:")
    for figure in figures:
        if figure.suffix == ".png":
            print(f"  {figure}")
    print(f"\nOpen this first, every figure and number of the demo on one page:\n  {report}")
    return figures
