"""The embedded demo: train ResNet-20 on digits, then a 2D and a 1D landscape, with figures.

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
from pipeline.train import train
from pipeline.workers import run_surface

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICK = ["grid.x.num=5", "grid.y.num=4", "train.epochs=1", "maps=[train_loss,train_acc]"]


def demo_overrides(out: Path, name: str, quick: bool) -> list[str]:
    """Redirect the demo config's outputs under ``out`` (and shrink it when ``quick``)."""
    epochs = 1 if quick else 15
    overrides = [
        f"model.checkpoint={out / 'checkpoints' / f'epoch_{epochs:03d}.pt'}",
        f"output={out / f'{name}.h5'}",
    ]
    if name == "surface_2d":
        overrides.append(f"train.checkpoint_dir={out / 'checkpoints'}")
        overrides += QUICK if quick else []
    elif quick:
        overrides.append("grid.x.num=5")
    return overrides


def run_demo(out: str | Path = "results/demo", quick: bool = False) -> list[Path]:
    """Run the whole demo; returns the figure files."""
    started = time.perf_counter()
    out = Path(out).resolve()
    surface_config = load_config(CONFIGS / "demo.yaml", demo_overrides(out, "surface_2d", quick))
    curve_config = load_config(CONFIGS / "demo_1d.yaml", demo_overrides(out, "surface_1d", quick))
    if Path(surface_config.model.checkpoint).is_file():
        log.info("using the trained checkpoint %s", surface_config.model.checkpoint)
    else:
        train(surface_config)
    figures = []
    for config in (surface_config, curve_config):
        path = plan_surface(config)
        run_surface(path)
        figures += plot_surface_file(path, out / "figures")
    elapsed = time.perf_counter() - started
    print(f"\nDemo finished in {elapsed:.0f} s. Figures in {out / 'figures'}:")
    for figure in figures:
        if figure.suffix == ".png":
            print(f"  {figure}")
    return figures
