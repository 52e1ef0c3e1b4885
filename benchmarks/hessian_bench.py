"""``make bench``, Hessian part: what each eigen-solver spends per grid point, and what
one Hessian-vector product costs next to a forward pass and a gradient.

Solvers are compared on a small CNN with BatchNorm trained on digits (float64), at
points along a filter-normalized line through the trained minimum, against the exact
extremes of its dense Hessian (built column by column from HVPs, which the tests check
against ``torch.func.hessian``). Costs are timed on the demo model (ResNet-20), and on
each model family of warm_bench at batch 128.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.warm_bench import FAMILIES, interleaved_seconds
from landscape.config import parse_config
from landscape.curvature import METHODS
from landscape.curvature.lanczos import extreme_eigenvalues
from landscape.curvature.operators import HessianOperator, full_gradient, select_parameters
from landscape.demo import demo_config
from landscape.experiment import Experiment
from landscape.hessian import HessianEvaluator
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.train import train

TOLERANCE = 1e-3
# Costs are CPU time of this process on one torch thread: on the shared 2-core machine
# wall-clock ratios swing with other processes' load, CPU time counts this process's
# work only (see benchmarks/batch_bench.py); the load average is recorded beside them.
clock = time.process_time
SOLVER_CASE = {
    "model": {"name": "small_cnn", "kwargs": {"channels": [3, 4]}},
    "data": {"name": "digits"},
    "grid": {"x": {"min": -0.4, "max": 0.4, "num": 3}},
    "maps": ["lambda_min", "lambda_max"],
    "evaluation": {"batch_size": 2048, "dtype": "float64", "device": "cpu"},
    "hessian": {"tolerance": TOLERANCE, "max_hvps": 2000},
}
SOLVER_TRAINING = {"lr": 0.05, "epochs": 20, "batch_size": 64, "schedule": "cosine"}


def dense_extremes(operator: HessianOperator) -> tuple[float, float]:
    """Exact (lambda_min, lambda_max) from the dense Hessian, one HVP per column."""
    columns = operator @ np.eye(operator.shape[0])
    spectrum = np.linalg.eigvalsh((columns + columns.T) / 2)
    return float(spectrum[0]), float(spectrum[-1])


def relative_error(found: float, exact: float) -> float:
    return abs(found - exact) / abs(exact)


def compare_solvers(folder: Path) -> dict:
    """HVPs, seconds and errors per point for each method; medians and worst cases."""
    spec = {**SOLVER_CASE, "output": str(folder / "solvers.h5")}
    spec["train"] = {**SOLVER_TRAINING, "checkpoint_dir": str(folder / "solver_checkpoints")}
    config = parse_config(json.dumps(spec))
    spec["model"] = {**spec["model"], "checkpoint": str(train(config))}
    config = parse_config(json.dumps(spec))
    with SurfaceFile.open(plan_surface(config)) as surface:
        directions, grid = surface.directions(), surface.grid
    evaluator = HessianEvaluator(Experiment.load(config), directions, config.hessian)
    runs = {method: [] for method in METHODS}
    for point in range(grid.size):
        evaluator.plane.move_to(*grid.coordinates(point))
        exact_min, exact_max = dense_extremes(evaluator.operator)
        for method in METHODS:
            started = time.perf_counter()
            found = extreme_eigenvalues(
                evaluator.operator, method, evaluator.start, TOLERANCE, config.hessian.max_hvps
            )
            runs[method].append(
                {
                    "alpha": grid.coordinates(point)[0],
                    "hvps": found.hvps,
                    "seconds": time.perf_counter() - started,
                    "lambda_min_error": relative_error(found.lambda_min, exact_min),
                    "lambda_max_error": relative_error(found.lambda_max, exact_max),
                    "converged": found.converged,
                    "exact_ratio": abs(exact_min / exact_max),
                }
            )
    summary = {
        method: {
            "median_hvps": statistics.median(run["hvps"] for run in points),
            "median_seconds": statistics.median(run["seconds"] for run in points),
            "worst_lambda_min_error": max(run["lambda_min_error"] for run in points),
            "worst_lambda_max_error": max(run["lambda_max_error"] for run in points),
            "converged": f"{sum(run['converged'] for run in points)}/{len(points)}",
            "points": points,
        }
        for method, points in runs.items()
    }
    return {
        "case": "small_cnn [3, 4] with BatchNorm on digits (1437 images), "
        f"{evaluator.operator.shape[0]} parameters, float64, tolerance {TOLERANCE}",
        "methods": summary,
        "lanczos_hvps_over_eigsh": summary["lanczos"]["median_hvps"]
        / summary["eigsh"]["median_hvps"],
    }


def operation_costs(experiment: Experiment, batch_size: int) -> dict:
    """CPU seconds (this process, one torch thread: see :data:`clock`) of a full-data
    forward pass, the tool's gradient (:func:`full_gradient`) and an HVP in each mode of
    ``experiment``'s model at its initialization, in batches of ``batch_size``, interleaved
    (:func:`~benchmarks.warm_bench.interleaved_seconds`), and the HVP's ratios to both.
    Repeated at one state, a double-backward HVP runs from its kept gradient graphs
    (:class:`~landscape.curvature.operators.KeptGraphs`), as all but a point's first
    product in Lanczos do; ``kept_graphs`` adds a point's first product (every graph
    built) against the gradient, and the kept product against it.

    ``unfolded``: the gradient and the double-backward HVP with the batch norms left
    where they are (each frozen norm an affine map), as before
    :func:`~landscape.curvature.operators.fold_frozen_batch_norms`, for comparison in
    the same run; the ratios are like for like (folded over folded, both HVPs from kept
    graphs)."""
    samples = experiment.data.split("train")
    names = select_parameters(experiment.model, "all")
    model, objective = experiment.model, experiment.objective
    operators = {
        mode: HessianOperator(model, names, samples, objective, batch_size, mode)
        for mode in ("forward_over_reverse", "double_backward")
    }
    unfolded = HessianOperator(model, names, samples, objective, batch_size, "double_backward")
    unfolded.folding = None
    vector = torch.randn(unfolded.shape[0], generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward():
        for batch, _ in unfolded.batches():
            model(batch)

    products = {
        f"hvp_{mode}": (lambda operator=operator: operator.hvp(vector))
        for mode, operator in operators.items()
    }
    kept = operators["double_backward"]

    def rebuilt():
        kept.release()  # as a point's first product: every graph built again
        kept.hvp(vector)

    products["hvp_double_backward_first"] = rebuilt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    try:
        timings = interleaved_seconds(
            {
                "forward": forward,
                "gradient": lambda: full_gradient(model, names, samples, objective, batch_size),
                **products,
                "gradient_unfolded": unfolded.gradient,
                "hvp_double_backward_unfolded": lambda: unfolded.hvp(vector),
            },
            clock=clock,
        )
    finally:
        torch.set_num_threads(threads)
    return {
        "batch_size": batch_size,
        "folded_batch_norms": len(operators["double_backward"].folding[1])
        if operators["double_backward"].folding
        else 0,
        "cpu_seconds": timings,
        "hvp_over_forward": {
            mode: timings[f"hvp_{mode}"] / timings["forward"] for mode in operators
        },
        "hvp_over_gradient": {
            mode: timings[f"hvp_{mode}"] / timings["gradient"] for mode in operators
        },
        "kept_graphs": {
            "batches_kept": len(kept.kept.graphs) if kept.kept else 0,
            "kept_mib": (kept.kept.bytes if kept.kept else 0) / 2**20,
            "first_hvp_over_gradient": timings["hvp_double_backward_first"] / timings["gradient"],
            "kept_over_first": timings["hvp_double_backward"]
            / timings["hvp_double_backward_first"],
        },
        "unfolded": {
            "hvp_over_forward": timings["hvp_double_backward_unfolded"] / timings["forward"],
            "hvp_over_gradient": timings["hvp_double_backward_unfolded"]
            / timings["gradient_unfolded"],
            "folded_over_unfolded": {
                "gradient": timings["gradient"] / timings["gradient_unfolded"],
                "hvp_double_backward": timings["hvp_double_backward"]
                / timings["hvp_double_backward_unfolded"],
            },
        },
        "load_average": [load_before, os.getloadavg()[0]],
    }


def hvp_cost(folder: Path) -> dict:
    """One full-data forward pass, gradient and HVP (both modes) of the demo model at the
    demo's batch size (the whole set in one batch), and under ``families`` of each
    model family of :data:`FAMILIES` (the demo ResNet-20 among them) at batch 128."""
    config = demo_config("demo.yaml", [])
    experiment = Experiment.load(config, with_checkpoint=False)
    inputs = experiment.data.train_x
    size = sum(p.numel() for p in experiment.model.parameters() if p.requires_grad)
    families = {}
    for name, model in FAMILIES.items():
        spec = {
            "model": model,
            "data": {"name": "digits"},
            "maps": ["lambda_min"],
            "evaluation": {"batch_size": 128, "dtype": "float32", "device": "cpu"},
            "output": str(folder / f"{name}_cost.h5"),
        }
        family = Experiment.load(parse_config(json.dumps(spec)), with_checkpoint=False)
        families[name] = operation_costs(family, 128)
    return {
        "case": f"demo ResNet-20 on digits, {len(inputs)} images, {size} parameters, "
        f"{config.evaluation.dtype}, batch {config.evaluation.batch_size}; families at 128",
        "clock": "CPU seconds of this process on one torch thread (time.process_time)",
        **operation_costs(experiment, config.evaluation.batch_size),
        "families": families,
    }


def bench_hessian(folder: Path) -> dict:
    return {"solvers": compare_solvers(folder), "hvp_cost": hvp_cost(folder)}
