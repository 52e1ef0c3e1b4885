"""Seconds per grid point over one bare forward pass, K points per pass against one.

For a digits MLP, the small BatchNorm CNN and ResNet-20 on digits, a surface is planned
(one shard, so every evaluator call gets its K points) and evaluated by the real worker
loop and writer; ``ratio = seconds per point / seconds of one bare forward pass`` over
the same 1,797 samples at the same batch size, the forward timed right before and after
each run (a shared machine drifts). Batch 128, and the batch whose bare forward is
fastest. K = 1, the K the evaluator chooses (``points_per_pass: 0``), K = 8 and K = 32
(:data:`landscape.evaluators.MAX_POINTS_PER_PASS`). Ratios below 1 are the point of
several points per pass: one pass's per-call cost (Python, kernel launches, reading the
data) is shared by K points.

Time is CPU time of this process on one torch thread (``evaluation.threads: 1``,
``time.process_time``): on the shared 2-core machine these figures come from, other
processes (load averages of 8-10) made wall-clock ratios swing by 100x between runs (a
descheduled process waits a whole time slice), while CPU time counts only this process's
work. The load average before and after is recorded beside the figures.

``arithmetic_floor`` is the bare forward at the best batch over the bare forward at
this batch: K points cost K forwards' arithmetic, and the best batch is as fast as this
machine does that arithmetic without batching, so a ratio far below it is not to be
expected (a compute-bound model on a CPU sits near it at K = 1 already).

The slow process: the same bare forward (small CNN, batch 128) timed in a child that
imported only torch and in a child that first loads what a ``landscape run`` process
loads (the command line, h5py, scipy, the digits through scikit-learn), alternately,
both on the same seeded inputs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from landscape.checkpoint import save_checkpoint
from landscape.config import parse_config
from landscape.data import load_dataset
from landscape.evaluators import MAX_POINTS_PER_PASS, loss_evaluator
from landscape.experiment import Experiment
from landscape.models import build_model
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import evaluate_shards

MODELS = {"mlp": 32, "small_cnn": 32, "resnet20": 12}  # model: grid points per run
# Beside K = 1 and the chosen K: what batching does where it is not chosen.
FORCED_KS = (8, MAX_POINTS_PER_PASS)
BATCHES = (128, 512, 1797)
REPEATS = 5  # bare forward passes per timing; the median is kept
clock = time.process_time  # CPU seconds of this process (see the module)


@torch.no_grad()
def forward_seconds(experiment: Experiment, batch_size: int) -> float:
    """Median time of one bare forward pass over the training set."""
    inputs = experiment.data.train_x
    times = []
    for _ in range(REPEATS):
        started = clock()
        for start in range(0, len(inputs), batch_size):
            experiment.model(inputs[start : start + batch_size])
        if experiment.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - started)
    return statistics.median(times)


def run_seconds(folder: Path, model: str, points: int, batch_size: int, k: int) -> tuple:
    """(seconds per point through the worker loop, forward seconds, K used)."""
    name = f"{model}_b{batch_size}_k{k}"
    config = parse_config(
        json.dumps(
            {
                "model": {"name": model, "checkpoint": str(folder / f"{model}.pt")},
                "data": {"name": "digits"},
                "evaluation": {"batch_size": batch_size, "points_per_pass": k, "threads": 1},
                "grid": {
                    "x": {"min": -1, "max": 1, "num": points // 4},
                    "y": {"min": -1, "max": 1, "num": 4},
                    "shard_size": points,
                },
                "maps": ["train_loss", "train_acc"],
                "output": str(folder / f"{name}.h5"),
            }
        )
    )
    path = plan_surface(config)
    experiment = Experiment.load(config)
    with SurfaceFile.open(path, "r+") as surface:
        evaluator = loss_evaluator(experiment, surface, surface.job_maps("loss"))
        evaluator(surface.pending_shards("loss")[0][: evaluator.items_per_call])  # warm-up
        before = forward_seconds(experiment, batch_size)
        started = clock()
        count = evaluate_shards("loss", evaluator, surface.pending_shards("loss"), surface)
        elapsed = clock() - started
        after = forward_seconds(experiment, batch_size)
    return elapsed / count, (before + after) / 2, evaluator.items_per_call


def bench_model(folder: Path, model: str, points: int) -> dict:
    data = load_dataset("digits", {})
    torch.manual_seed(0)
    save_checkpoint(
        folder / f"{model}.pt", build_model(model, data.input_shape, data.num_classes, {})
    )
    probe = Experiment.load(
        parse_config(
            json.dumps(
                {
                    "model": {"name": model, "checkpoint": str(folder / f"{model}.pt")},
                    "data": {"name": "digits"},
                    "maps": ["train_loss"],
                    "output": str(folder / "probe.h5"),
                }
            )
        )
    )
    forwards = {batch: forward_seconds(probe, batch) for batch in BATCHES}
    best = min(BATCHES, key=forwards.get)
    result = {}
    for batch_size in sorted({128, best}):
        for k in (1, 0, *FORCED_KS):
            per_point, forward, used = run_seconds(folder, model, points, batch_size, k)
            key = f"batch{batch_size}_k{k or 'auto'}"
            result[key] = {
                "points_per_pass": used,
                "seconds_per_point": per_point,
                "forward_seconds": forward,
                "ratio": per_point / forward,
            }
        result[f"batch{batch_size}_arithmetic_floor"] = forwards[best] / forwards[batch_size]
    result["best_batch"] = best
    result["best_ratio"] = min(
        (case["ratio"], name) for name, case in result.items() if isinstance(case, dict)
    )
    return result


CHILD = """
import json, statistics, sys, time
import torch
if sys.argv[1] == "tool":
    import h5py, scipy.linalg  # noqa: F401
    import landscape.cli, landscape.workers, landscape.evaluators  # noqa: F401
    from landscape.data import load_dataset
    load_dataset("digits", {})  # through scikit-learn, as a run does
from landscape.models.small import SmallCNN
torch.manual_seed(0)
x = torch.randn(1797, 1, 8, 8)
model = SmallCNN((1, 8, 8), 10).eval()
times = []
with torch.no_grad():
    for _ in range(12):
        started = time.perf_counter()
        for s in range(0, 1797, 128):
            model(x[s : s + 128])
        times.append(time.perf_counter() - started)
print(json.dumps(statistics.median(times[2:])))
"""


def bench_process(rounds: int = 3) -> dict:
    """Median bare forward (small CNN, batch 128) in a plain child and a child that loaded
    what the tool loads, alternately ``rounds`` times."""
    seconds = {"plain": [], "tool": []}
    for _ in range(rounds):
        for kind in seconds:
            output = subprocess.run(
                [sys.executable, "-c", CHILD, kind], check=True, capture_output=True, text=True
            ).stdout
            seconds[kind].append(json.loads(output.splitlines()[-1]))
    plain, tool = statistics.median(seconds["plain"]), statistics.median(seconds["tool"])
    return {"plain_seconds": plain, "tool_seconds": tool, "tool_over_plain": tool / plain}


def bench_batched(folder: Path) -> dict:
    """Ratios per model and batch at K = 1 and the chosen K, and the process comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {model: bench_model(folder, model, points) for model, points in MODELS.items()}
    finally:
        torch.set_num_threads(threads)
    results["load_average"] = [load_before, os.getloadavg()[0]]
    results["process"] = bench_process()
    return results


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(bench_batched(Path(folder)), indent=2))
