"""Workers: evaluate the not-yet-done points of a surface file and write them back.

The same code runs as one process or as N MPI ranks (``mpirun -n N landscape run``).
Four pieces meet here: the ranks (:mod:`landscape.ranks`), which hand out shards;
the job kind's evaluator (:mod:`landscape.jobs`, :mod:`landscape.evaluators`), which
turns a batch of points into map values (pure compute); a writer, which stores points
(``write_points``) and makes them durable (``commit``): the surface file itself,
opened serially or with ``mpio`` by every rank, or a :class:`~landscape.parts.PartWriter`;
and :func:`evaluate_shards`, the loop. Rank 0 reduces (:func:`landscape.reduce.reduce`)
before and after.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch
from tqdm import tqdm

from landscape.checkpoint import verify_fingerprint
from landscape.errors import UserError, reporting_interrupt
from landscape.experiment import Experiment
from landscape.jobs import JOB_KINDS, JOBS, Evaluator, resolve
from landscape.locking import surface_lock
from landscape.parts import PartWriter, points_in_parts
from landscape.ranks import CLAIMED, DONE, Solo, connect_ranks, cpu_threads_per_rank
from landscape.reduce import reduce
from landscape.store import SurfaceFile, existing_surface, job_name

log = logging.getLogger(__name__)


class PointWriter(Protocol):
    # True where commit only flushes what is written (the surface file), so that the loop
    # may commit whenever it writes; False where each commit adds a file (a part file).
    commits_in_place: bool

    def write_points(
        self, job: str, points: np.ndarray, values: dict[str, np.ndarray], finished: np.ndarray
    ) -> None: ...

    def commit(self) -> None: ...


# Points evaluated are handed to the writer at the end of their claim, or as soon as this
# much time has passed since the last write: a small model's points (an MLP over the
# digits: about a millisecond each) then cost one write per grid row, not four per point
# (60 us each); a slow model's point (a Hessian's) is written as soon as it is done. A
# writer that commits in place (the surface file, serial or mpio) commits with each such
# write, so a process killed without warning loses at most this much work beyond its
# running call (a flush a second: benchmarks/commit_bench.py); a part file is committed
# once per claim, so a killed part-file rank loses at most its current claim.
WRITE_INTERVAL_SECONDS = 1.0


class UnwrittenPoints:
    """The points evaluated but not yet handed to the writer, with their values and
    finish times."""

    def __init__(self, job: str, writer: PointWriter):
        self.job, self.writer = job, writer
        self.calls: list[tuple[np.ndarray, dict[str, np.ndarray], float]] = []
        self.last_write = time.time()

    def add(self, points: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.calls.append((points, values, time.time()))

    def overdue(self) -> bool:
        return time.time() - self.last_write >= WRITE_INTERVAL_SECONDS

    def write(self) -> None:
        """Hand every unwritten point to the writer in one call.

        They leave ``calls`` before the writer has them: an interrupt during the hand-off
        then loses them (a resumed run evaluates them again), never hands them over twice
        (a part file holding a point twice)."""
        calls, self.calls = self.calls, []
        if not calls:
            return
        points, values, finished = zip(*calls)
        self.writer.write_points(
            self.job,
            np.concatenate(points),
            {name: np.concatenate([v[name] for v in values]) for name in values[0]},
            np.concatenate([np.full(len(p), t) for p, t in zip(points, finished)]),
        )
        self.last_write = time.time()


def evaluate_shards(
    job: str,
    evaluator: Evaluator,
    claims: Iterable[np.ndarray],
    writer: PointWriter,
    on_points: Callable[[int], None] | None = None,
    items_per_call: int | None = None,
) -> int:
    """Evaluate and write every point of each claim (the points of one shard or of a few
    consecutive ones, :class:`ShardClaims`), ``items_per_call`` (K; by default the
    evaluator's ``items_per_call``, 1 for an evaluator without it) points per call:
    consecutive slices of the claim's points, so the points that share a call depend on
    the claims and K alone. Points reach the writer at the end of their claim or after
    :data:`WRITE_INTERVAL_SECONDS`, several calls' at once; the writer commits after each
    claim, with each write where it commits in place, and when any exception (Ctrl-C, a
    streamed dataset's error, CUDA out of memory) stops a claim halfway: the points held
    are those of finished calls, so writing them is safe (a part file then holds part of
    a claim: it lists its points). The exception then goes on.

    Returns the number of points evaluated.
    """
    count = 0
    if items_per_call is None:
        items_per_call = getattr(evaluator, "items_per_call", 1)
    for points in claims:
        unwritten = UnwrittenPoints(job, writer)
        try:
            for start in range(0, len(points), items_per_call):
                batch = points[start : start + items_per_call]
                unwritten.add(batch, evaluator(batch))
                count += len(batch)
                if on_points is not None:
                    on_points(len(batch))
                if unwritten.overdue():
                    unwritten.write()
                    if writer.commits_in_place:
                        writer.commit()
        except BaseException:
            unwritten.write()
            writer.commit()
            raise
        unwritten.write()
        writer.commit()
    return count


class ShardClaims:
    """The shards this rank claims, a few consecutive ones at a time, and rank 0's count of
    the whole run.

    Iterating claims the next unclaimed group of ``shards_per_claim`` consecutive pending
    shards from the shared counter and yields their points; once the loop has committed
    them, they are added to the shared done count, which rank 0 reads after each of its
    own evaluator calls to drive the progress bar (points, rate, ETA). Which shards form
    a group depends only on the pending list and ``shards_per_claim`` (the same on every
    rank), never on which rank claims first. The pending list is what an earlier run
    left, so a resumed run groups the rest afresh; ``shards_per_claim`` follows K and,
    where it caps a claim, the number of ranks (:func:`shards_per_claim`).
    """

    def __init__(
        self,
        job: str,
        ranks: Solo,
        pending: list[np.ndarray],
        show_progress: bool,
        noun: str,
        shards_per_claim: int = 1,
    ):
        self.ranks = ranks
        self.groups = [
            pending[start : start + shards_per_claim]
            for start in range(0, len(pending), shards_per_claim)
        ]
        self.total = sum(len(points) for points in pending)
        self.uncounted = 0  # points of the current claim, not yet in the shared count
        interactive = sys.stderr.isatty()  # in a log file, one line every 30 s is enough
        self.bar = tqdm(
            total=self.total,
            unit=f" {noun}s",
            unit_scale=False,
            desc=job,
            mininterval=1 if interactive else 30,
            disable=not show_progress or ranks.rank != 0,
        )
        self.claim_log_level = logging.INFO if ranks.size > 1 else logging.DEBUG

    def __iter__(self) -> Iterator[np.ndarray]:
        while (index := self.ranks.fetch_add(CLAIMED, 1)) < len(self.groups):
            points = np.concatenate(self.groups[index])
            log.log(
                self.claim_log_level,
                "claimed shard group %d of %d: %d points from point %d",
                index + 1,
                len(self.groups),
                len(points),
                points[0],
            )
            yield points
            self.ranks.fetch_add(DONE, len(points))
            self.uncounted = 0

    def points_done(self, count: int) -> None:
        self.uncounted += count
        self.show_progress()

    def show_progress(self) -> None:
        """Rank 0 reads the shared count (an MPI call, which also lets other ranks' atomics
        on its counters progress); the other ranks have nothing to show."""
        if self.ranks.rank == 0:
            self.bar.update(self.ranks.read(DONE) + self.uncounted - self.bar.n)

    def close(self) -> None:
        """Final count, once every rank has added its last shard (after ``wait_for_all``)."""
        self.show_progress()
        self.bar.close()


WRITERS = {
    "serial": "one process writes the file",
    "mpio": "every rank writes its own points into the file (parallel HDF5, mpio)",
    "parts": "each rank writes part files, merged into the file at the end",
}


def choose_writer(requested: str, ranks: Solo) -> str:
    """``auto``: serial for one rank, ``mpio`` for several when h5py has MPI, else parts."""
    parallel_h5py = h5py.get_config().mpi
    if requested == "auto":
        if ranks.size == 1:
            return "serial"
        return "mpio" if parallel_h5py else "parts"
    if requested == "mpio" and not (parallel_h5py and ranks.comm is not None):
        raise UserError(
            "--writer mpio: needs h5py built with MPI (h5py.get_config().mpi is "
            f"{parallel_h5py}) and ranks started by mpirun or srun; run `make install`, or "
            "use --writer parts"
        )
    if requested == "serial" and ranks.size > 1:
        raise UserError(
            f"--writer serial: {ranks.size} ranks cannot share one serially opened file; "
            "use auto, mpio or parts"
        )
    return requested


@dataclass(frozen=True)
class ArrayTask:
    """Task ``index`` of ``count`` independent tasks (a SLURM array). It owns the given
    ``shards`` (indices), or by default every count-th shard from ``index``."""

    index: int
    count: int
    shards: tuple[int, ...] | None = None

    def owned(self, total: int) -> np.ndarray:
        if self.shards is not None:
            return np.asarray(self.shards, dtype=np.int64)
        return np.arange(self.index, total, self.count)


def choose_task_writer(requested: str, task: ArrayTask, ranks: Solo) -> str:
    """Array tasks share the file with others they cannot talk to: part files only."""
    index, count = task.index, task.count
    if not 0 <= index < count:
        raise UserError(f"--task-index: {index} is not in 0..{count - 1} (--num-tasks {count})")
    if ranks.size > 1:
        raise UserError("--task-index: an array task is one process; drop it to run under MPI")
    if requested not in ("auto", "parts"):
        raise UserError(f"--writer {requested}: array tasks write part files; drop --writer")
    return "parts"


def open_surface(path: Path, writer: str, ranks: Solo) -> SurfaceFile:
    """The surface file as this rank's writer needs it: read-only for part files."""
    if writer == "mpio":
        return SurfaceFile.open(path, "r+", comm=ranks.comm)
    return SurfaceFile.open(path, "r" if writer == "parts" else "r+")


def load_evaluator(job: str, surface: SurfaceFile, device: str | None, ranks: Solo) -> Evaluator:
    """The job kind's evaluator, on this rank's device, with the file's directions.

    A surface's checkpoint was checked against the plan's hash by :func:`run_job`, on
    this rank: its hash is the plan's, not computed again. An analysis file has none:
    its evaluator loads (and checks) each checkpoint in turn."""
    config = surface.config
    planned_sha = surface.attrs.get("checkpoint_sha256")
    experiment = Experiment.load(
        config,
        with_checkpoint=planned_sha is not None,
        device=device,
        local_rank=ranks.local_rank,
        checkpoint_sha256=planned_sha,
    )
    if ranks.size > 1 and not config.evaluation.threads:
        torch.set_num_threads(cpu_threads_per_rank(ranks.local_size))
    elif experiment.device.type == "cpu" and not config.evaluation.threads:
        warn_if_one_thread_faster(experiment)
    log.info(
        "%s: %s, %s, %d CPU threads",
        ranks.describe(),
        experiment.device,
        config.evaluation.dtype,
        torch.get_num_threads(),
    )
    return resolve(JOBS[job].evaluator)(experiment, surface, surface.job_maps(job))


def fastest_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The least wall time of ``repeats`` calls (the least is the one others disturbed least)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


BUSY_RATIO = 0.5
BUSY_MINIMUM_SECONDS = 2e-3


def warn_if_one_thread_faster(experiment: Experiment) -> None:
    """Say so where one batch's forward pass is faster on one torch thread than on all.

    OpenMP threads meet at a barrier after every operation: when other processes keep
    the cores busy, each operation waits for the thread the kernel descheduled. Measured
    on 2 cores under a load average of 7, the small CNN's forward over the digits took
    67-115 ms on 2 threads and 20-29 ms on 1. The run keeps its threads: the thread
    count splits reductions, so switching on a timing would make the last bits of the
    maps depend on the load; ``evaluation.threads: 1`` is the user's to set. Timed
    once, at start-up. Only a collapse is reported: one thread at most BUSY_RATIO of all
    threads' time, on a pass of at least BUSY_MINIMUM_SECONDS (a tiny model is faster on
    one thread on idle cores too: splitting it costs more than it saves)."""
    batch, _ = experiment.data.split("train").head(experiment.config.evaluation.batch_size)
    threads = torch.get_num_threads()
    if threads == 1:
        return
    with torch.no_grad():
        shared = fastest_seconds(lambda: experiment.model(batch))
        torch.set_num_threads(1)
        alone = fastest_seconds(lambda: experiment.model(batch))
        torch.set_num_threads(threads)
    if alone <= BUSY_RATIO * shared and shared >= BUSY_MINIMUM_SECONDS:
        log.warning(
            "a forward pass took %.1f ms on 1 CPU thread, %.1f ms on %d: the cores are busy "
            "(other processes?); evaluation.threads: 1 may run faster",
            1000 * alone,
            1000 * shared,
            threads,
        )


def shards_per_claim(items_per_call: int, pending: list[np.ndarray], ranks: int) -> int:
    """Enough consecutive shards per claim that one claim holds the ``items_per_call`` (K)
    points an evaluator call can take: with the default of about 64 shards, an 11 x 11
    grid's shards hold 2 points, and K = 32 would otherwise never be reached. Capped so
    that there are at least as many claims as ``ranks`` where there are as many pending
    shards: K = 32 on 64 two-point shards would make 4 claims, 4 of 8 ranks idle; capped,
    8 claims of 16 points keep all 8 busy, at 16 points per call. Every rank computes it
    from the same pending list, K and rank count: all group alike."""
    largest = max((len(points) for points in pending), default=1)
    enough = -(-items_per_call // largest)
    return max(1, min(enough, len(pending) // ranks))


def run_items_per_call(evaluator: Evaluator, ranks: Solo) -> int:
    """K, the points per evaluator call on every rank: the least any rank's evaluator
    takes (each chose its own from its device's free memory), so that which points share
    a call, and so how they round, does not depend on which rank claims them."""
    own = getattr(evaluator, "items_per_call", 1)
    agreed = ranks.minimum(own)
    if agreed < own:
        log.info(
            "%d points per call on every rank (the least any rank takes; this one: %d)", agreed, own
        )
    return agreed


def evaluate_pending(
    job: str,
    surface: SurfaceFile,
    pending: list[np.ndarray],
    ranks: Solo,
    writer: str,
    device: str | None,
    show_progress: bool,
) -> int:
    """This rank's share of the pending shards, claimed a few consecutive ones at a time
    (:func:`shards_per_claim`), K points per call (:func:`run_items_per_call`); returns
    its count."""
    evaluator = ranks.agree(lambda: load_evaluator(job, surface, device, ranks))
    point_writer = (
        ranks.agree(lambda: PartWriter(surface.path, surface.plan_id))
        if writer == "parts"
        else surface
    )
    noun = surface.item_noun
    items_per_call = run_items_per_call(evaluator, ranks)
    per_claim = shards_per_claim(items_per_call, pending, ranks.size)
    claims = ShardClaims(job, ranks, pending, show_progress, noun, per_claim)
    started = time.perf_counter()
    with ranks.failing_together():
        count = evaluate_shards(
            job, evaluator, claims, point_writer, claims.points_done, items_per_call
        )
        ranks.wait_for_all(claims.show_progress)
    claims.close()
    if ranks.rank == 0:
        elapsed = time.perf_counter() - started
        log.info(
            f"%s: %d %s {noun}s in %.1f s (%.2f {noun}s/s)",
            surface.path,
            claims.total,
            job,
            elapsed,
            claims.total / elapsed,
        )
    return count


def job_lock(path: Path, job: str, task: ArrayTask | None, ranks: Solo):
    """The surface's lock, which rank 0 holds for all ranks of the job: shared for an array
    task (the others write part files of their own beside it), exclusive otherwise."""
    existing_surface(path)
    if task is not None:
        what = f"{job} job, array task {task.index} of {task.count}"
        return surface_lock(path, what, shared=True)
    return surface_lock(
        path, f"{job} job" + (f" on {ranks.size} MPI ranks" if ranks.size > 1 else "")
    )


def run_job(
    path: str | Path,
    job: str,
    device: str | None = None,
    show_progress: bool = True,
    writer: str = "auto",
    task: ArrayTask | None = None,
) -> int:
    """Evaluate every pending point of ``job`` in a surface file with all ranks of this run.

    ``task``: one of several independent array tasks (SLURM arrays), which evaluates
    only its own shards, writes part files and leaves the merge to a reduce job.
    Otherwise rank 0 reduces (:func:`landscape.reduce.reduce`) before the run, so that
    points a killed run left in part files count as done, and after it.
    Returns the number of points this rank evaluated.
    """
    job = job_name(job)  # an array task submitted before a rename, requeued since
    if job not in JOBS:
        raise UserError(f"job {job!r}: no such job kind; choose from {', '.join(JOBS)}")
    path = Path(path)
    with (
        reporting_interrupt(lambda: saved_points(path, job)),
        connect_ranks() as ranks,
        ExitStack() as held,
    ):
        writer = choose_task_writer(writer, task, ranks) if task else choose_writer(writer, ranks)
        ranks.on_rank0(lambda: held.enter_context(job_lock(path, job, task, ranks)))
        if ranks.rank == 0:
            log.info("%s: %d rank(s); %s", path, ranks.size, WRITERS[writer])
        if task is None:  # merge what a killed part-file run left before reading done flags
            ranks.on_rank0(lambda: reduce(path))
        with ranks.agree(lambda: open_surface(path, writer, ranks)) as surface:
            # Every rank reads the checkpoint it will load: one node may see other bytes.
            if "checkpoint_sha256" in surface.attrs:
                ranks.agree(
                    lambda: verify_fingerprint(
                        surface.config.model.checkpoint, surface.attrs["checkpoint_sha256"], path
                    )
                )
            kind = JOBS[job]
            if surface.kind != kind.file:  # `run` on an analysis file, `analyze` on a surface
                verbs = " or ".join(
                    f"`landscape {k.verb}`" for k in JOB_KINDS if k.file == surface.kind
                )
                raise UserError(
                    f"{path}: a result file of kind {surface.kind}; `landscape {kind.verb}` "
                    f"computes {kind.file} files; use {verbs} {path}"
                )
            if job not in surface.jobs:
                needed = ", ".join(JOBS[job].maps)
                raise UserError(
                    f"{path}: has no {job} job (its maps: {', '.join(surface.map_names)}); "
                    f"add {needed} to maps and plan a new file"
                )
            if task is None:
                pending = ranks.on_rank0(lambda: surface.pending_shards(job))
            else:
                log.info("%s: array task %d of %d", path, task.index, task.count)
                owned = task.owned(len(surface.shards(job)))
                pending = surface.pending_shards(job, owned, points_in_parts(surface, job))
            count = 0
            if pending:
                count = evaluate_pending(
                    job, surface, pending, ranks, writer, device=device, show_progress=show_progress
                )
            elif ranks.rank == 0:
                log.info(
                    f"%s: all %d %s {surface.item_noun}s already done",
                    path,
                    surface.points(job).size,
                    job,
                )
        if ranks.rank == 0 and task is None:  # one serial writer, once all ranks closed the file
            reduce(path)
        return count


def saved_points(path: Path, job: str) -> str:
    """How many of the job's points the file and its unmerged part files hold, for the
    line an interrupted run ends with. Never raises: an error here (a damaged file, a
    part of another plan) would replace the interrupt and its exit status."""
    try:
        with SurfaceFile.open(path) as surface:
            done, points = surface.done(job).reshape(-1), surface.points(job)
            done[points_in_parts(surface, job)] = True
            noun = surface.item_noun
    except Exception:
        return "finished shards are saved"
    return f"{done[points].sum()} of {points.size} {job} {noun}s saved in {path}"
