"""A run killed with SIGKILL part-way, then run again, equals an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import write_experiment

from landscape.config import load_config
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import run_job

SLOW_GRID = {
    "x": {"min": -1.0, "max": 1.0, "num": 8},
    "y": {"min": -1.0, "max": 1.0, "num": 6},
    "shard_size": 5,
}
SLOW_DATA = {
    "name": "gaussian_clusters",
    "kwargs": {"num_classes": 4, "dim": 32, "train_per_class": 1500, "test_per_class": 200},
}


COMMANDS = {"loss": "run", "hessian": "hessian"}


def run_command(surface, job: str) -> list[str]:
    return [sys.executable, "-m", "landscape.cli", COMMANDS[job], str(surface), "--no-progress"]


def done_count(surface, job: str) -> int:
    try:
        with h5py.File(surface, "r", locking=False) as handle:
            return int(handle[f"done/{job}"][()].sum())
    except (OSError, KeyError):
        return 0  # caught mid-write: try again


SLOW_SURFACE = {
    "grid": SLOW_GRID,
    "data": SLOW_DATA,
    "model": {"name": "mlp", "kwargs": {"hidden": [128, 128]}},
}
SLOW_HESSIAN = {  # 12 points of about 0.3 s (20-40 HVPs each)
    "grid": {"x": {"min": -1.0, "max": 1.0, "num": 4}, "y": {"min": -1.0, "max": 1.0, "num": 3}},
    "data": {
        "name": "gaussian_clusters",
        "kwargs": {"num_classes": 4, "dim": 16, "train_per_class": 500, "test_per_class": 10},
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "maps": ["train_loss", "lambda_min", "lambda_max"],
    "evaluation": {"batch_size": 2000},
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(job, changes) -> maps`` of that experiment's file after one
    uninterrupted run, computed once per module (two kills of the loss job share them)."""
    found = {}

    def maps(job: str, changes: dict) -> dict[str, np.ndarray]:
        key = (job, json.dumps(changes, sort_keys=True))
        if key not in found:
            folder = tmp_path_factory.mktemp("uninterrupted")
            reference = plan_surface(load_config(write_experiment(folder, "reference", **changes)))
            run_job(reference, job, show_progress=False)
            with SurfaceFile.open(reference) as done:
                found[key] = done.maps()
        return found[key]

    return maps


@pytest.mark.parametrize(
    "job, changes, kill_after",
    [("loss", SLOW_SURFACE, 3), ("loss", SLOW_SURFACE, 30), ("hessian", SLOW_HESSIAN, 2)],
)
def test_killed_run_resumes_to_identical_maps(experiment, uninterrupted, job, changes, kill_after):
    expected = uninterrupted(job, changes)
    surface = plan_surface(load_config(experiment(name="killed", **changes)))

    worker = subprocess.Popen(run_command(surface, job), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_count(surface, job) < kill_after and worker.poll() is None:
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()

    with SurfaceFile.open(surface) as partial:  # opens cleanly after the kill
        done = partial.done(job)
        total = partial.points(job).size
        maps = {name: partial.maps()[name] for name in partial.job_maps(job)}
    assert kill_after <= done.sum() < total, "kill did not land part-way"
    for values in maps.values():  # every point flagged done has its value
        assert np.isfinite(values[done]).all()

    # The resume needs no process of its own: it evaluates only the points not done.
    assert run_job(surface, job, show_progress=False) == total - done.sum()
    with SurfaceFile.open(surface) as resumed:
        assert resumed.done(job).sum() == total
        for name, values in expected.items():
            np.testing.assert_array_equal(resumed.maps()[name], values)
