"""``make bench``, warm starts and HVP modes: what warm-started Lanczos saves per Hessian
point, and what one HVP costs in each mode next to a gradient and a forward pass.

Warm starts are measured on a 5 x 5 Hessian grid around ResNet-20 (the demo model)
trained briefly (SGD, 3 epochs) on 89 of the digits (the demo's data with test_fraction
0.95, so that 3 x 25 solves fit in minutes on 2 cores), float32, tolerance 1e-3, the
Hessian over the weights (the demo's setting). The grid's spacing is the demo grid's
(2/24 = 0.083 in filter-normalized units: alpha, beta in [-1/6, 1/6]), i.e. a 5 x 5
patch of a Hessian map at every demo grid point, as a long run computes. Each row of
the grid is one shard (the default). Both ends of every solve are compared with a cold
solve at tolerance 1e-6 (floored at 16 float32 epsilons, 1.9e-6 of the spectral scale).
Measured (2 cores shared, load 6-9; HVP counts do not depend on it): median 10 HVPs
warm, 16 cold (0.625; means 10.6 and 17.0), both ends within 1.6e-6 of the tight solve,
25/25 converged; 19 minutes at that load. Before, 12 and 18 (0.67): each solve spent 2
HVPs on explicit checks, which the kept products now make (lanczos.py), and the warm
points after the second of a row started from the last Ritz vectors, not their
extrapolation (144 HVPs on those 15 points, was 158). The warm points alone: median 9.
The floor is the grid step: at this spacing the ends' eigenvectors turn by sin 0.15 to
0.23 from one point to the next, and extrapolating even the tight eigenvectors leaves
0.16 to 0.20 (the path is not smooth at this scale), so a start is that far off along
the eigenvectors next to each end, which Lanczos damps slowest; from such starts a
solve took 8 to 10 HVPs. Block starts [p_min, p_max] (13) or with a second Ritz vector
per end (14-15), and a quadratic extrapolation (10-12 where linear took 8-10), took more.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from landscape.config import parse_config
from landscape.evaluators import hessian_evaluator
from landscape.experiment import Experiment
from landscape.hessian import training_hessian
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.train import train

TIGHT = 1e-6
WARM_CASE = {
    "model": {"name": "resnet20"},
    "data": {"name": "digits", "kwargs": {"test_fraction": 0.95}},
    "directions": {"kind": "random", "normalization": "filter", "seed": 0},
    "grid": {
        "x": {"min": -1 / 6, "max": 1 / 6, "num": 5},
        "y": {"min": -1 / 6, "max": 1 / 6, "num": 5},
    },
    "maps": ["lambda_min", "lambda_max"],
    "evaluation": {"batch_size": 256, "dtype": "float32", "device": "cpu"},
    "hessian": {"parameters": "weights", "tolerance": 1e-3, "max_hvps": 300},
    "train": {"lr": 0.05, "epochs": 3, "batch_size": 32, "schedule": "cosine", "seed": 0},
}
# Model families whose HVP modes are timed: a digits MLP, the 5k-parameter BatchNorm CNN
# (channels 16, 32) and the demo ResNet-20, batch 128, float32, random init.
FAMILIES = {
    "mlp": {"name": "mlp"},
    "small_cnn": {"name": "small_cnn"},
    "resnet20": {"name": "resnet20"},
}


def grid_values(checkpoint: Path, name: str, hessian: dict) -> dict[str, np.ndarray]:
    """Plan the warm case at ``checkpoint`` with ``hessian`` settings beside it and solve
    every Hessian point shard by shard, as the hessian job does: its maps, flat arrays."""
    spec = {key: value for key, value in WARM_CASE.items() if key != "train"}
    spec["output"] = str(checkpoint.parent / f"{name}.h5")
    spec["hessian"] = {**WARM_CASE["hessian"], **hessian}
    spec["model"] = {**spec["model"], "checkpoint": str(checkpoint)}
    config = parse_config(json.dumps(spec))
    with SurfaceFile.open(plan_surface(config)) as surface:
        outputs = ["lambda_min", "lambda_max", "hessian_hvps", "hessian_converged"]
        evaluator = hessian_evaluator(Experiment.load(config), surface, outputs)
        points = surface.points("hessian")
        started = time.perf_counter()
        values = evaluator(points)
        values["seconds"] = np.full(len(points), (time.perf_counter() - started) / len(points))
    return values


def trained_checkpoint(folder: Path) -> Path:
    """The warm case's model after its training: its last checkpoint."""
    spec = {**WARM_CASE, "output": str(folder / "unused.h5")}
    spec["train"] = {**WARM_CASE["train"], "checkpoint_dir": str(folder / "warm_checkpoints")}
    return train(parse_config(json.dumps(spec)))


def warm_over_cold(folder: Path) -> dict:
    """Median HVPs per point warm and cold, and the largest deviation of either end from
    the tight cold solve, relative to max(|lambda_min|, |lambda_max|) at that point; the
    counts per point in shard order (rows of 5, each starting cold) and their means too,
    since the median of 25 counts is that of the warm points alone."""
    load_before = os.getloadavg()[0]
    checkpoint = trained_checkpoint(folder)
    runs = {
        "warm": grid_values(checkpoint, "warm", {"warm_start": True}),
        "cold": grid_values(checkpoint, "cold", {"warm_start": False}),
        "tight": grid_values(
            checkpoint, "tight", {"warm_start": False, "tolerance": TIGHT, "max_hvps": 600}
        ),
    }
    tight = runs["tight"]
    scale = np.maximum(np.abs(tight["lambda_min"]), np.abs(tight["lambda_max"]))
    summary = {}
    for name, run in runs.items():
        deviation = {
            end: float(np.max(np.abs(run[end] - tight[end]) / scale))
            for end in ("lambda_min", "lambda_max")
        }
        summary[name] = {
            "median_hvps": float(np.median(run["hessian_hvps"])),
            "mean_hvps": float(np.mean(run["hessian_hvps"])),
            "hvps": run["hessian_hvps"].astype(int).tolist(),
            "seconds_per_point": float(run["seconds"][0]),
            "max_deviation_from_tight": deviation,
            "converged": f"{int(run['hessian_converged'].sum())}/{run['hessian_converged'].size}",
        }
    return {
        "case": "ResNet-20 after 3 epochs on 89 digits, float32, weights, 5 x 5 Hessian grid "
        "at the demo grid's spacing in rows of 5 (one shard each), tolerance 1e-3, "
        "max deviation relative to "
        "max(|lambda_min|, |lambda_max|) of the tight solve",
        "runs": summary,
        "warm_over_cold_hvps": summary["warm"]["median_hvps"] / summary["cold"]["median_hvps"],
        "warm_over_cold_mean_hvps": summary["warm"]["mean_hvps"] / summary["cold"]["mean_hvps"],
        "load_average": [load_before, os.getloadavg()[0]],
    }


def interleaved_seconds(
    actions: dict, repeats: int = 4, clock=time.perf_counter
) -> dict[str, float]:
    """Median time on ``clock`` (wall time by default) of each action after one warm-up
    call each, the actions taking turns in every repeat, so that a change of load on a
    shared machine hits all alike."""
    for action in actions.values():
        action()
    times = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            started = clock()
            action()
            times[name].append(clock() - started)
    return {name: statistics.median(spent) for name, spent in times.items()}


def hvp_costs(folder: Path) -> dict:
    """Per model family: seconds of a full-data forward pass, gradient and HVP in each
    mode (batch 128, float32, all 1437 training digits), and the HVP's ratios to both;
    double backward as a point's first product (its graphs built: the like-for-like
    comparison of the modes) and from kept graphs (``double_backward_kept``, every later
    product at the point)."""
    families = {}
    for name, model in FAMILIES.items():
        spec = {
            "model": model,
            "data": {"name": "digits"},
            "grid": {"x": {"min": -1.0, "max": 1.0, "num": 3}},
            "maps": ["lambda_min"],
            "evaluation": {"batch_size": 128, "dtype": "float32", "device": "cpu"},
            "output": str(folder / f"{name}.h5"),
        }
        experiment = Experiment.load(parse_config(json.dumps(spec)), with_checkpoint=False)
        operators = {
            mode: training_hessian(experiment, "all", mode)
            for mode in ("forward_over_reverse", "double_backward")
        }
        anyone = operators["double_backward"]
        vector = torch.randn(anyone.shape[0], generator=torch.Generator().manual_seed(0))
        inputs = experiment.data.train_x

        @torch.no_grad()
        def forward(model=experiment.model, inputs=inputs):
            for start in range(0, len(inputs), 128):
                model(inputs[start : start + 128])

        def first(operator=anyone, vector=vector):
            operator.release()  # a point's first product: every graph built
            operator.hvp(vector)

        reverse = operators["forward_over_reverse"]
        products = {
            "forward_over_reverse": lambda op=reverse, vector=vector: op.hvp(vector),
            "double_backward": first,
            "double_backward_kept": lambda op=anyone, vector=vector: op.hvp(vector),
        }
        timings = interleaved_seconds({"forward": forward, "gradient": anyone.gradient, **products})
        families[name] = {
            "parameters": anyone.shape[0],
            "seconds": timings,
            "hvp_over_gradient": {mode: timings[mode] / timings["gradient"] for mode in products},
            "hvp_over_forward": {mode: timings[mode] / timings["forward"] for mode in products},
        }
    return families


def bench_warm(folder: Path) -> dict:
    """Warm-started against cold Lanczos on the demo model, and HVP costs per mode."""
    folder = Path(folder)
    return {"warm_start": warm_over_cold(folder), "hvp_modes": hvp_costs(folder)}


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(bench_warm(Path(folder)), indent=2))


if __name__ == "__main__":
    main()
