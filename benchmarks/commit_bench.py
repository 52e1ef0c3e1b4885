"""Seconds per commit of a serial surface file (a flush), against the write before it.

The worker loop (:func:`landscape.workers.evaluate_shards`) commits a surface file with
each write that comes :data:`landscape.workers.WRITE_INTERVAL_SECONDS` or more after the
last one, so that a process killed without warning loses at most that much work. That
costs one flush per interval at most: ``overhead_bound = commit seconds / interval``, the
share of a run's time spent keeping that promise.

A 51 x 51 surface of the digits MLP with the four loss maps is planned in a temporary
folder; each grid row's 51 points are handed to the file (``write_points``: the maps,
finish times and done flags) and then committed, row after row, and each step is timed
on its own. Medians over the rows, wall-clock and CPU time of this process (a shared
machine's other processes inflate the wall clock); the load average before and after is
recorded beside them. ``python -m benchmarks.commit_bench``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from landscape.checkpoint import save_checkpoint
from landscape.config import parse_config
from landscape.data import load_dataset
from landscape.models import build_model
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import WRITE_INTERVAL_SECONDS

SIDE = 51
MAPS = ["train_loss", "train_acc", "test_loss", "test_acc"]


def planned_surface(folder: Path) -> Path:
    """The 51 x 51 digits-MLP surface, planned (no point done)."""
    data = load_dataset("digits", {})
    torch.manual_seed(0)
    checkpoint = folder / "mlp.pt"
    save_checkpoint(checkpoint, build_model("mlp", data.input_shape, data.num_classes, {}))
    axis = {"min": -1, "max": 1, "num": SIDE}
    config = {
        "model": {"name": "mlp", "checkpoint": str(checkpoint)},
        "data": {"name": "digits"},
        "grid": {"x": axis, "y": axis},
        "maps": MAPS,
        "output": str(folder / "commit.h5"),
    }
    return plan_surface(parse_config(json.dumps(config)))


def timed(action, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    action(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_commit(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = planned_surface(folder)
    load_before = os.getloadavg()[0]
    writes, commits = [], []
    with SurfaceFile.open(path, "r+") as surface:
        for row in range(SIDE):
            points = np.arange(row * SIDE, (row + 1) * SIDE)
            values = {name: np.full(SIDE, 0.5) for name in MAPS}
            writes.append(timed(surface.write_points, "loss", points, values, time.time()))
            commits.append(timed(surface.commit))
        assert surface.done("loss").all()
    wall, cpu = (statistics.median(column) for column in zip(*commits))
    write_wall, write_cpu = (statistics.median(column) for column in zip(*writes))
    return {
        "what": "median seconds of one commit (flush) of a serial 51 x 51 surface file after "
        "one grid row's write_points, and of that write; overhead_bound = commit wall "
        "seconds / WRITE_INTERVAL_SECONDS (at most one such commit per interval)",
        "commit_seconds": wall,
        "commit_cpu_seconds": cpu,
        "write_seconds": write_wall,
        "write_cpu_seconds": write_cpu,
        "write_interval_seconds": WRITE_INTERVAL_SECONDS,
        "overhead_bound": wall / WRITE_INTERVAL_SECONDS,
        "load_average": [load_before, os.getloadavg()[0]],
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        result = bench_commit(Path(folder))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
