"""``make bench``, GPU part (run where CUDA is available): ResNet-56 on CIFAR-sized
synthetic data held on the GPU, the figures a user plans a GPU run by.

- Loss maps: 50,000 images of 3x32x32 (10 classes), batch 1024, a 3 x 2 grid, K points
  per pass by ``points_per_pass`` 0 (one where vmap would group convolutions) in
  settings (:data:`LOSS_SETTINGS`): float32 (IEEE, TF32 off:
  :func:`landscape.precision.set_tf32`), float32 at up to 8 points a pass (vmap's grouped
  convolutions, which the default avoids; the grid's 6 points in one pass), TF32,
  bfloat16 autocast, channels_last, and both; an MLP at K from free memory against one
  point at a time; last, ``torch.compile`` at one point per pass. Each: points per
  second (sweeps of the evaluator's calls over the six points after a warm-up sweep, at
  least one and at least 1 s of them, synchronized), seconds per point over one bare
  forward pass in the same setting, and the achieved FLOP/s (the forward FLOPs of one
  point, ``torch.utils.flop_counter.FlopCounterMode`` on one batch times the batches,
  over its seconds) against the card's dense peak for the setting's arithmetic (float32
  on the CUDA cores; TF32 and bfloat16 on the tensor cores). The reduced-precision cases
  add the difference to float32 their plan measured at the centre and a corner
  (:mod:`landscape.precision`), and every case its speed-up over its baseline case.
- Hessian job: Lanczos with ``max_hvps`` 8 at 2 points on 2,000 of the images (every
  HVP is a full pass over the training set, about six forward passes; an H200 took
  1.37 s a product on 10,000 images, so a point of 10 products is a few seconds here
  and seconds per point scale with the images and max_hvps): seconds per point and per
  HVP, with one full-data forward pass, gradient and HVP in each mode.

Times are taken after a warm-up call and with the device synchronized.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench import random_checkpoint
from landscape.config import parse_config
from landscape.evaluate import outputs_of
from landscape.evaluators import loss_evaluator
from landscape.experiment import Experiment
from landscape.hessian import HessianEvaluator, training_hessian
from landscape.plan import plan_surface
from landscape.store import SurfaceFile

LOSS_CASE = {
    "model": {"name": "resnet56"},
    "data": {"name": "benchmarks.bench:synthetic_images", "kwargs": {"samples": 50_000}},
    "evaluation": {"batch_size": 1024, "device": "cuda", "dtype": "float32"},
    "grid": {"x": {"min": -1, "max": 1, "num": 3}, "y": {"min": -1, "max": 1, "num": 2}},
    "maps": ["train_loss", "train_acc"],
}


@dataclass(frozen=True)
class LossSetting:
    """One loss-map case: :data:`LOSS_CASE` with ``model`` and ``evaluation`` changed,
    its FLOP/s against the card's ``peak`` and its time against the case ``baseline``."""

    name: str
    evaluation: dict
    peak: str
    model: str = "resnet56"
    baseline: str = "float32"


LOSS_SETTINGS = (
    LossSetting("float32", {}, "float32"),
    # What points_per_pass 0 refuses for a convolution net: K points as grouped convolutions.
    LossSetting("float32_vmapped", {"points_per_pass": 8}, "float32"),
    LossSetting("tf32", {"tf32": True}, "tf32"),
    LossSetting("bfloat16", {"dtype": "bfloat16"}, "bfloat16"),
    LossSetting("channels_last", {"channels_last": True}, "float32"),
    LossSetting("bfloat16_channels_last", {"dtype": "bfloat16", "channels_last": True}, "bfloat16"),
    # A model without convolutions: K from free memory against one point at a time.
    LossSetting("mlp_one_point", {"points_per_pass": 1}, "float32", "mlp", "mlp_one_point"),
    LossSetting("mlp", {}, "float32", "mlp", "mlp_one_point"),
)
# torch.compile runs the one-point forward only (K points per pass stay eager). Measured
# last: compiling ResNet-56 (and again for the last, shorter batch) can take minutes,
# and a run cut short then still has every other case.
COMPILE_SETTING = LossSetting("compile", {"compile": True, "points_per_pass": 1}, "float32")
HESSIAN_SAMPLES = 2_000
HESSIAN_CASE = {
    **LOSS_CASE,
    "data": {**LOSS_CASE["data"], "kwargs": {"samples": HESSIAN_SAMPLES}},
    "grid": {"x": {"min": -1, "max": 1, "num": 2}},
    "maps": ["lambda_min", "lambda_max"],
    "hessian": {"max_hvps": 8},
}
# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by device name, most
# specific name first: float32 on the CUDA cores, TF32 and bfloat16 on the tensor cores.
PEAK_TFLOPS = (
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.0}),
    ("H100", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),  # SXM (80GB HBM3)
    ("H200", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
)


def peak_tflops(name: str) -> dict[str, float] | None:
    """The card's dense peaks by its name (``torch.cuda.get_device_name``), None if unknown."""
    return next((peaks for known, peaks in PEAK_TFLOPS if known in name), None)


def synchronized_seconds(action, repeats: int = 3, at_least: float = 1.0) -> float:
    """Median wall time of ``action`` on the GPU, after one warm-up call: ``repeats``
    calls, and more until ``at_least`` seconds are timed (a sweep of milliseconds is
    noise alone)."""
    action()
    times = []
    while len(times) < repeats or sum(times) < at_least:
        torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def forward_flops(experiment: Experiment) -> float:
    """FLOPs of one forward pass over the training set: one batch counted, times the
    batches (every batch but the last is full; the count is linear in the samples)."""
    inputs = experiment.data.train_x
    batch = inputs[: experiment.config.evaluation.batch_size]
    with FlopCounterMode(display=False) as counter:
        experiment.model(batch)
    return counter.get_total_flops() * len(inputs) / len(batch)


def planned_case(folder: Path, name: str, spec: dict) -> tuple[Path, dict]:
    """``spec`` planned at ``<folder>/<name>.h5`` with a seeded random checkpoint (one per
    model and data: the settings of one model share it); the path and the full spec."""
    data = spec["data"]
    checkpoint = folder / f"{spec['model']['name']}_{data['kwargs']['samples']}.pt"
    if not checkpoint.is_file():
        random_checkpoint(checkpoint, spec["model"]["name"], data["name"], data["kwargs"])
    spec = {
        **spec,
        "model": {**spec["model"], "checkpoint": str(checkpoint)},
        "output": str(folder / f"{name}.h5"),
    }
    return plan_surface(parse_config(json.dumps(spec))), spec


def bench_loss_setting(folder: Path, setting: LossSetting) -> dict:
    """One loss setting: points/s over the whole grid (one timed sweep after a warm-up
    one), bare forward, FLOP/s, and for a reduced dtype the difference its plan measured."""
    spec = {
        **LOSS_CASE,
        "model": {"name": setting.model},
        "evaluation": {**LOSS_CASE["evaluation"], **setting.evaluation},
    }
    path, spec = planned_case(folder, f"{setting.model}_{setting.name}", spec)
    config = parse_config(json.dumps(spec))
    experiment = Experiment.load(config)
    with SurfaceFile.open(path) as surface:
        evaluator = loss_evaluator(experiment, surface, surface.job_maps("loss"))
        points = surface.points("loss")
        precision = surface.group("precision")
    per_call = evaluator.items_per_call
    calls = [points[start : start + per_call] for start in range(0, len(points), per_call)]

    def all_points():
        for items in calls:
            evaluator(items)

    seconds = synchronized_seconds(all_points, repeats=1) / len(points)
    inputs = experiment.data.train_x
    batch_size = config.evaluation.batch_size

    @torch.no_grad()
    def bare_forward():
        for start in range(0, len(inputs), batch_size):
            outputs_of(experiment.model, inputs[start : start + batch_size], experiment.autocast)

    forward = synchronized_seconds(bare_forward)
    flops = forward_flops(experiment)
    peaks = peak_tflops(torch.cuda.get_device_name(experiment.device))
    achieved = flops / seconds / 1e12
    result = {
        "model": setting.model,
        "evaluation": {
            key: getattr(config.evaluation, key) for key in ("dtype", "channels_last", "tf32")
        },
        "points": len(points),
        "points_per_pass": min(per_call, len(points)),  # the grid's points in each pass
        "train_samples": len(inputs),
        "batch_size": batch_size,
        "points_per_s": 1 / seconds,
        "seconds_per_point": seconds,
        "forward_seconds": forward,
        "overhead": seconds / forward,
        "forward_tflop_per_point": flops / 1e12,
        "achieved_tflops": achieved,
        "compared_with": f"{setting.peak} dense peak",
        "fraction_of_peak": achieved / peaks[setting.peak] if peaks else None,
    }
    if precision is not None:
        attrs = precision[1]
        result["difference_to_float32"] = {
            "estimator": attrs["estimator"],
            "points": attrs["points"].tolist(),
            **{
                key: np.asarray(attrs[key]).tolist()
                for key in attrs
                if key.startswith("train_") and key.endswith("_difference")
            },
        }
    return result


def bench_loss(folder: Path, record: Callable[[], None], results: dict, settings) -> None:
    """Each of ``settings`` into ``results``, with its speed-up over its baseline case of
    this run; ``record()`` after each."""
    for setting in settings:
        result = results[setting.name] = bench_loss_setting(folder, setting)
        baseline = results[setting.baseline]["seconds_per_point"]
        result["speedup"] = {setting.baseline: baseline / result["seconds_per_point"]}
        record()


def bench_hessian_gpu(folder: Path) -> dict:
    path, spec = planned_case(folder, "resnet56_hessian", HESSIAN_CASE)
    config = parse_config(json.dumps(spec))
    with SurfaceFile.open(path) as surface:
        directions, grid = surface.directions(), surface.grid
    experiment = Experiment.load(config)
    evaluator = HessianEvaluator(experiment, directions, config.hessian)
    evaluator.operator.hvp(evaluator.start)  # warm-up
    points = []
    for point in range(grid.size):
        torch.cuda.synchronize()
        started = time.perf_counter()
        values = evaluator(*grid.coordinates(point))
        points.append({"seconds": time.perf_counter() - started, "hvps": values["hessian_hvps"]})
    per_point = statistics.median(p["seconds"] for p in points)
    per_hvp = statistics.median(p["seconds"] / p["hvps"] for p in points)
    return {
        "case": f"{config.model.name}, {len(experiment.data.train_x)} synthetic 3x32x32 images, "
        f"batch {config.evaluation.batch_size}, float32, {evaluator.operator.shape[0]} parameters, "
        f"lanczos max_hvps {config.hessian.max_hvps}, mode {evaluator.operator.mode}",
        "seconds_per_point": per_point,
        "seconds_per_hvp": per_hvp,
        "points": points,
        "costs": hvp_costs(experiment),
    }


def hvp_costs(experiment: Experiment) -> dict:
    """One full-data forward pass, gradient and HVP in each mode; their ratios."""
    inputs = experiment.data.train_x
    operators = {
        mode: training_hessian(experiment, "all", mode)
        for mode in ("forward_over_reverse", "double_backward")
    }
    anyone = operators["double_backward"]
    vector = torch.randn(anyone.shape[0], generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward():
        for batch, _ in anyone.batches():
            experiment.model(batch)

    timings = {
        "forward": synchronized_seconds(forward),
        "gradient": synchronized_seconds(anyone.gradient),
    }
    for mode, operator in operators.items():
        timings[f"hvp_{mode}"] = synchronized_seconds(lambda op=operator: op.hvp(vector))
    return {
        "samples": len(inputs),
        "seconds": timings,
        "hvp_over_forward": {
            mode: timings[f"hvp_{mode}"] / timings["forward"] for mode in operators
        },
        "hvp_over_gradient": {
            mode: timings[f"hvp_{mode}"] / timings["gradient"] for mode in operators
        },
    }


def bench_cuda(folder: Path, results: dict, record: Callable[[], None]) -> None:
    """Every GPU case into ``results``; ``record()`` after each, so a run cut short still
    leaves what it measured."""
    properties = torch.cuda.get_device_properties(0)
    results.update(
        device=torch.cuda.get_device_name(0),
        memory_gib=properties.total_memory / 2**30,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
    )
    record()
    results["loss"] = {}
    bench_loss(folder, record, results["loss"], LOSS_SETTINGS)
    results["hessian"] = bench_hessian_gpu(folder)
    record()
    bench_loss(folder, record, results["loss"], [COMPILE_SETTING])
