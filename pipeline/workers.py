"""Workers: evaluate the not-yet-done points of a surface file's shards and write them back.

The loop is split in three so that MPI and part-file writers can reuse it: a
:class:`SurfaceEvaluator` turns coordinates into map values (pure compute), a writer
stores a point (``write_point``) and makes a shard durable (``flush``), and
:func:`evaluate_shards` walks the shards between the two, with progress.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoint import verify_fingerprint
from pipeline.evaluate import evaluate
from pipeline.experiment import Experiment
from pipeline.grid import Grid
from pipeline.parameters import FlatParameters
from pipeline.store import SurfaceFile

log = logging.getLogger(__name__)
JOB = "surface"


class PointWriter(Protocol):
    def write_point(self, job: str, point: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...


class SurfaceEvaluator:
    """Loss and accuracy maps at theta0 + a*d1 + b*d2 for one experiment on one device."""

    def __init__(
        self, experiment: Experiment, directions: list[dict[str, np.ndarray]], maps: list[str]
    ):
        self.experiment = experiment
        self.maps = maps
        self.parameters = FlatParameters(experiment.model)
        self.directions = [self.parameters.flatten(d) for d in directions]

    def __call__(self, a: float, b: float) -> dict[str, float]:
        d2 = self.directions[1] if len(self.directions) > 1 else None
        self.parameters.move_to(a, self.directions[0], b, d2)
        values = {}
        evaluation = self.experiment.config.evaluation
        for split in ("train", "test"):
            if any(m.startswith(split) for m in self.maps):
                inputs, targets = self.experiment.data.split(split)
                loss, accuracy = evaluate(
                    self.experiment.model, inputs, targets, evaluation.batch_size, evaluation.loss
                )
                values.update({f"{split}_loss": loss, f"{split}_acc": accuracy})
        return {m: values[m] for m in self.maps}


def evaluate_shards(
    evaluate_point,
    grid: Grid,
    shards: Iterable[tuple[int, int]],
    done: np.ndarray,
    writer: PointWriter,
    progress: tqdm | None = None,
) -> int:
    """Evaluate every point of ``shards`` not yet ``done``; flush after each shard.

    Returns the number of points evaluated.
    """
    flat_done = done.reshape(-1)
    count = 0
    for start, stop in shards:
        pending = [p for p in range(start, stop) if not flat_done[p]]
        for point in pending:
            writer.write_point(JOB, point, evaluate_point(*grid.coordinates(point)))
            count += 1
            if progress is not None:
                progress.update(1)
        if pending:
            writer.flush()
    return count


def run_surface(path: str | Path, device: str | None = None, show_progress: bool = True) -> int:
    """Evaluate all pending points of a surface file in this process; returns how many."""
    with SurfaceFile.open(path, "r+") as surface:
        config = surface.config
        verify_fingerprint(config.model.checkpoint, surface.attrs["checkpoint_sha256"], path)
        done = surface.done(JOB)
        pending = int((~done).sum())
        if pending == 0:
            log.info("%s: all %d points already done", path, done.size)
            return 0
        experiment = Experiment.load(config, device=device)
        log.info(
            "%s: %d of %d points to evaluate on %s (%s, %d threads)",
            path,
            pending,
            done.size,
            experiment.device,
            config.evaluation.dtype,
            torch.get_num_threads(),
        )
        evaluator = SurfaceEvaluator(experiment, surface.directions(), surface.job_maps(JOB))
        started = time.perf_counter()
        interactive = sys.stderr.isatty()  # in a log file, one line every 30 s is enough
        with tqdm(
            total=pending,
            unit="pt",
            desc="surface",
            mininterval=1 if interactive else 30,
            disable=not show_progress,
        ) as progress:
            count = evaluate_shards(
                evaluator, surface.grid, surface.shards(JOB), done, surface, progress
            )
        elapsed = time.perf_counter() - started
        log.info("%s: %d points in %.1f s (%.2f points/s)", path, count, elapsed, count / elapsed)
        return count
