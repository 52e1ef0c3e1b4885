"""``make bench``: grid points per second against the bare forward pass, written to JSON.

For each case a surface file is planned in a temporary folder and its points are
evaluated by the real worker loop (moving the parameters, evaluating, writing the
file). The limit is one bare forward pass over the same data at the same batch size:
``overhead = seconds per point / forward seconds``, ideally close to 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.config import parse_config
from pipeline.data import load_dataset
from pipeline.experiment import Experiment
from pipeline.models import build_model
from pipeline.plan import plan_surface
from pipeline.store import SurfaceFile
from pipeline.workers import JOB, SurfaceEvaluator, evaluate_shards, pending_shards

CASES = {
    "demo_resnet20_digits": {
        "model": {"name": "resnet20"},
        "data": {"name": "digits"},
        "evaluation": {"batch_size": 2048},
        "grid": {"x": {"min": -1, "max": 1, "num": 6}, "y": {"min": -1, "max": 1, "num": 5}},
    },
    "resnet20_32x32": {
        "model": {"name": "resnet20"},
        "data": {"name": "pipeline.bench:synthetic_images", "kwargs": {"samples": 512}},
        "evaluation": {"batch_size": 256},
        "grid": {"x": {"min": -1, "max": 1, "num": 4}, "y": {"min": -1, "max": 1, "num": 3}},
    },
}


def synthetic_images(samples: int = 512, size: int = 32, seed: int = 0) -> dict:
    """Random CIFAR-shaped images and labels: speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, samples)
    return {"train_x": x, "train_y": y, "test_x": x[:8], "test_y": y[:8], "num_classes": 10}


@torch.no_grad()
def forward_seconds(experiment: Experiment) -> float:
    """Time of one bare forward pass over the training set, batch by batch."""
    inputs, _ = experiment.data.split("train")
    batch_size = experiment.config.evaluation.batch_size
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        experiment.model(inputs[start : start + batch_size])
    if experiment.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


class InterleavedTimer:
    """Wraps the point evaluator: times each point, then one bare forward pass right after.

    Interleaving makes both medians see the same machine state (frequency, other load),
    which matters on a shared 2-core machine where run-to-run noise is 10-15 %.
    """

    def __init__(self, evaluator: SurfaceEvaluator, experiment: Experiment):
        self.evaluator, self.experiment = evaluator, experiment
        self.point_times: list[float] = []
        self.forward_times: list[float] = []

    def __call__(self, a: float, b: float) -> dict[str, float]:
        started = time.perf_counter()
        values = self.evaluator(a, b)
        self.point_times.append(time.perf_counter() - started)
        self.forward_times.append(forward_seconds(self.experiment))
        return values


def bench_case(name: str, spec: dict, folder: Path) -> dict:
    checkpoint = folder / f"{name}.pt"
    data = load_dataset(spec["data"]["name"], spec["data"].get("kwargs", {}))
    torch.manual_seed(0)
    save_checkpoint(checkpoint, build_model(spec["model"]["name"], data.input_shape, 10, {}))
    config = parse_config(
        json.dumps(
            {
                **spec,
                "model": {**spec["model"], "checkpoint": str(checkpoint)},
                "maps": ["train_loss", "train_acc"],
                "output": str(folder / f"{name}.h5"),
            }
        )
    )
    path = plan_surface(config)
    experiment = Experiment.load(config)
    with SurfaceFile.open(path, "r+") as surface:
        evaluator = SurfaceEvaluator(experiment, surface.directions(), surface.job_maps(JOB))
        evaluator(0.0, 0.0)  # warm-up, not written
        timer = InterleavedTimer(evaluator, experiment)
        started = time.perf_counter()
        shards = pending_shards(surface.shards(JOB), surface.done(JOB))
        points = evaluate_shards(timer, surface.grid, shards, surface)
        elapsed = time.perf_counter() - started
    # What the loop spends outside evaluation: moving nothing, writing and flushing the file.
    writing = (elapsed - sum(timer.point_times) - sum(timer.forward_times)) / points
    per_point = statistics.median(timer.point_times) + writing
    forward = statistics.median(timer.forward_times)
    return {
        "points": points,
        "train_samples": len(experiment.data.train_x),
        "batch_size": config.evaluation.batch_size,
        "device": str(experiment.device),
        "points_per_s": 1 / per_point,
        "seconds_per_point": per_point,
        "writing_seconds_per_point": writing,
        "forward_seconds": forward,
        "overhead": per_point / forward,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench.json")
    args = parser.parse_args(argv)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor(),
        },
        "surface": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, spec in CASES.items():
            result = bench_case(name, spec, Path(folder))
            results["surface"][name] = result
            print(
                f"{name:24s} {result['points_per_s']:7.2f} points/s  "
                f"{1000 * result['seconds_per_point']:7.1f} ms/point  forward "
                f"{1000 * result['forward_seconds']:7.1f} ms  overhead {result['overhead']:.3f}x"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
