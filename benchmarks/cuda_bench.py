"""``make bench``, GPU part (run where CUDA is available): ResNet-56 on CIFAR-sized
synthetic data held on the GPU, the figures a user plans a GPU run by.

- Loss job: 50,000 images of 3x32x32 (10 classes), batch 1024, float32, a 3 x 2 grid
  through the real worker loop (:func:`benchmarks.bench.bench_case`): points per
  second, seconds per point over one bare forward pass, and the achieved FLOP/s, the
  forward FLOPs of one point (``torch.utils.flop_counter.FlopCounterMode`` on one batch,
  times the batches) over its seconds, against the card's dense float32 peak: the tool
  computes float32 in IEEE float32 on the GPU (TF32 off, see
  :func:`landscape.experiment.ieee_float32`), so the CUDA-core peak is the one it can
  reach. The TF32 and bfloat16 tensor-core peaks are recorded beside it.
- Hessian job: Lanczos with ``max_hvps`` 12 at 2 points on 10,000 of the images (every
  HVP is a full pass over the training set, about six forward passes), so seconds per
  point scale with the data set and max_hvps: seconds per HVP is recorded too, with
  one full-data forward pass, gradient and HVP in each mode.

Times are taken after a warm-up call and with the device synchronized.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench import bench_case, random_checkpoint
from landscape.config import parse_config
from landscape.experiment import Experiment
from landscape.hessian import HessianEvaluator, training_hessian
from landscape.plan import plan_surface
from landscape.store import SurfaceFile

LOSS_CASE = {
    "model": {"name": "resnet56"},
    "data": {"name": "benchmarks.bench:synthetic_images", "kwargs": {"samples": 50_000}},
    "evaluation": {"batch_size": 1024, "device": "cuda", "dtype": "float32"},
    "grid": {"x": {"min": -1, "max": 1, "num": 3}, "y": {"min": -1, "max": 1, "num": 2}},
}
HESSIAN_SAMPLES = 10_000
HESSIAN_CASE = {
    **LOSS_CASE,
    "data": {**LOSS_CASE["data"], "kwargs": {"samples": HESSIAN_SAMPLES}},
    "grid": {"x": {"min": -1, "max": 1, "num": 2}},
    "maps": ["lambda_min", "lambda_max"],
    "hessian": {"max_hvps": 12},
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


def synchronized_seconds(action, repeats: int = 3) -> float:
    """Median wall time of ``action`` on the GPU, after one warm-up call."""
    action()
    times = []
    for _ in range(repeats):
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
    inputs, _ = experiment.data.split("train")
    batch = inputs[: experiment.config.evaluation.batch_size]
    with FlopCounterMode(display=False) as counter:
        experiment.model(batch)
    return counter.get_total_flops() * len(inputs) / len(batch)


def bench_loss(folder: Path) -> dict:
    result = bench_case("resnet56_cifar_gpu", LOSS_CASE, folder)
    config = parse_config(
        json.dumps({**LOSS_CASE, "model": {**LOSS_CASE["model"], "checkpoint": None}})
    )
    experiment = Experiment.load(config, with_checkpoint=False)
    flops = forward_flops(experiment)
    name = torch.cuda.get_device_name(experiment.device)
    peaks = peak_tflops(name)
    achieved = flops / result["seconds_per_point"] / 1e12
    return {
        **result,
        "forward_tflop_per_point": flops / 1e12,
        "achieved_tflops": achieved,
        "forward_only_tflops": flops / result["forward_seconds"] / 1e12,
        "peak_tflops": peaks,
        "compared_with": "float32 dense peak (CUDA cores): float32 runs with TF32 off",
        "fraction_of_peak": achieved / peaks["float32"] if peaks else None,
    }


def bench_hessian_gpu(folder: Path) -> dict:
    checkpoint = random_checkpoint(
        folder / "resnet56_hessian.pt",
        "resnet56",
        HESSIAN_CASE["data"]["name"],
        HESSIAN_CASE["data"]["kwargs"],
    )
    spec = {
        **HESSIAN_CASE,
        "model": {**HESSIAN_CASE["model"], "checkpoint": str(checkpoint)},
        "output": str(folder / "resnet56_hessian.h5"),
    }
    config = parse_config(json.dumps(spec))
    with SurfaceFile.open(plan_surface(config)) as surface:
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
        "case": f"ResNet-56, {len(experiment.data.train_x)} synthetic 3x32x32 images, batch "
        f"{config.evaluation.batch_size}, float32, {evaluator.operator.shape[0]} parameters, "
        f"lanczos max_hvps {config.hessian.max_hvps}, mode {evaluator.operator.mode}",
        "seconds_per_point": per_point,
        "seconds_per_hvp": per_hvp,
        "points": points,
        "costs": hvp_costs(experiment),
    }


def hvp_costs(experiment: Experiment) -> dict:
    """One full-data forward pass, gradient and HVP in each mode; their ratios."""
    inputs, _ = experiment.data.split("train")
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
    results["loss"] = bench_loss(folder)
    record()
    results["hessian"] = bench_hessian_gpu(folder)
    record()
