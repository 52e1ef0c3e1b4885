"""Everything SLURM: ``landscape submit`` (plan if needed, then run a surface file's jobs
via submitit), the submission record, and what squeue and sacct say about those jobs.

Array mode (default): for each job with pending shards, one array job whose tasks each
own a group of those shards and write part files (:class:`ShardTask`), then one reduce
job, ``afterok`` on every array, which merges the parts and draws the figures once all
points are done. MPI mode: one job of N tasks per job kind, whose ranks write the
parallel HDF5 file directly. Submitting a partly finished surface sends only the shards
still missing; a preempted or timed-out task is requeued by submitit and continues from
its part files. What was submitted is recorded beside the surface file
(``<surface>.submission.json``, written atomically; :func:`read_submission`);
:class:`SlurmJobs` gives each recorded job's state for ``landscape status``, and a
surface whose last submission is still queued is not submitted again.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import submitit

from landscape.atomic import write_file
from landscape.errors import UserError
from landscape.locking import surface_lock
from landscape.parts import points_in_parts
from landscape.ranks import configure_logging
from landscape.reduce import reduce
from landscape.store import SurfaceFile, existing_surface

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlurmOptions:
    """What each task asks SLURM for; ``tasks`` is array tasks per job, or MPI ranks."""

    tasks: int = 4
    parallelism: int = 0
    partition: str | None = None
    time_min: int = 240
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    mpi: bool = False
    sbatch: dict = field(default_factory=dict)

    def sbatch_flags(self) -> dict:
        """Flags submitit has no parameter for: account, QoS and the user's extras."""
        flags = {**self.sbatch}
        for name in ("account", "qos"):
            if getattr(self, name):
                flags[name] = getattr(self, name)
        return flags

    def executor_parameters(self) -> dict:
        """submitit's ``update_parameters`` for these options."""
        parameters = {
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "gpus_per_node": self.gpus_per_task * (self.tasks if self.mpi else 1),
            "slurm_additional_parameters": self.sbatch_flags(),
        }
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.mem_gb:
            parameters["mem_gb"] = self.mem_gb
        if self.parallelism:
            parameters["slurm_array_parallelism"] = self.parallelism
        if self.mpi:
            parameters["tasks_per_node"] = self.tasks
            parameters["slurm_srun_args"] = ["--mpi=pmix"]
        return parameters


class ShardTask(submitit.helpers.Checkpointable):
    """One array task. On preemption or timeout submitit calls ``checkpoint``, which
    resubmits the same call: the shards already in part files are skipped."""

    def __call__(self, path: str, job: str, index: int, count: int, shards: list[int]) -> int:
        # The workers (torch, the model code) are imported where the task runs, on its
        # node: `landscape status` and `submit` read this module and need none of them.
        from landscape.workers import ArrayTask, run_job

        configure_logging()
        return run_job(path, job, show_progress=False, task=ArrayTask(index, count, tuple(shards)))


class MpiRun(submitit.helpers.Checkpointable):
    """Every rank of an MPI job: the ranks find each other through srun's PMIx."""

    def __call__(self, path: str, job: str) -> int:
        from landscape.workers import run_job  # on the node, as in ShardTask

        configure_logging()
        return run_job(path, job, show_progress=False)


def reduce_and_plot(path: str) -> list[Path]:
    """The reduce job: reduce (merge part files, derive maps); once every job is complete,
    draw the figures (returned; none before), to files on a node without a display: Agg."""
    import matplotlib

    from landscape.plot import plot_surface_file

    matplotlib.use("Agg")
    configure_logging()
    reduce(path)
    with SurfaceFile.open(path) as surface:
        complete = all(not surface.pending_shard_indices(job) for job in surface.jobs)
    return plot_surface_file(path) if complete else []


def submit(path: Path, options: SlurmOptions, jobs: list[str] | None = None) -> dict:
    """Submit the pending work of ``path``; returns (and writes) the submission record.

    The surface's lock is held only while the pending shards are computed: it fails at
    once while a local job or an array task writes the file, which would compute the same
    shards. It is released before the first ``sbatch``: an array task, which takes it
    shared without waiting, or an MPI job that started while it was still held would exit
    at once, and kill-on-invalid-dep would cancel the reduce. Submitting the same surface
    twice is refused instead by the record of its last submission, while any of those
    jobs is still queued or running (:func:`refuse_while_queued`)."""
    require_sbatch()
    with surface_lock(existing_surface(path), "landscape submit"):
        refuse_while_queued(path)
        with SurfaceFile.open(path) as surface:
            jobs = jobs or surface.jobs
            missing = [job for job in jobs if job not in surface.jobs]
            if missing:
                raise UserError(f"--jobs: {path} has no {', '.join(missing)} job")
            pending = {
                job: surface.pending_shard_indices(job, points_in_parts(surface, job))
                for job in jobs
            }
    pending = {job: shards for job, shards in pending.items() if shards}
    folder = path.with_name(path.name + ".slurm")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(name=f"landscape-{path.stem}", **options.executor_parameters())
    record = {
        "surface": str(path),
        "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": asdict(options),
        "jobs": {},
        "reduce": None,
    }
    waits: list[str] = []
    try:
        for job, shards in pending.items():
            # MPI jobs run one after the other: two parallel writers never share the file.
            after = waits if options.mpi else []
            record["jobs"][job] = submit_job(executor, path, job, shards, options, after)
            waits.append(record["jobs"][job]["id"])
        executor.update_parameters(
            name=f"landscape-{path.stem}-reduce",
            tasks_per_node=1,
            gpus_per_node=0,
            slurm_additional_parameters=with_dependency(options, waits),
        )
        reduce = executor.submit(reduce_and_plot, str(path))
    except submitit.core.utils.FailedJobError as exc:
        reason = next((line for line in str(exc).splitlines() if "sbatch:" in line), str(exc))
        queued = f"; already queued: {', '.join(waits)} (scancel them)" if waits else ""
        raise UserError(
            f"submit: sbatch refused the job ({reason.strip()}){queued}; check --partition, "
            "--account, --time and the other sbatch options"
        ) from None
    record["reduce"] = {"id": reduce.job_id, "log": str(reduce.paths.stderr)}
    write_file(
        record_path(path), (json.dumps(record, indent=2) + "\n").encode(), "submission record"
    )
    return record


def refuse_while_queued(path: Path) -> None:
    """Fail while a job of the last submission of ``path`` is still pending or running."""
    record_file = record_path(path)
    if not record_file.is_file():
        return
    try:
        _, entries = read_submission(record_file)
    except UserError as exc:
        log.warning("%s", exc)
        return
    queued = SlurmJobs.query([entry["id"] for _, entry in entries]).active()
    if queued:
        shown = ", ".join(queued[:6]) + (", ..." if len(queued) > 6 else "")
        arrays = " ".join(sorted({job_id.split("_")[0] for job_id in queued}))
        raise UserError(
            f"{path}: jobs of its last submission are still queued or running ({shown}); "
            f"wait for them (landscape status {path}) or cancel them (scancel {arrays})"
        )


def require_sbatch() -> None:
    """Fail before any work unless this machine can submit to SLURM."""
    if shutil.which("sbatch") is None:
        raise UserError(
            "submit: no sbatch on this machine; run it on a SLURM login node, or compute "
            "here with `landscape run` (or `mpirun -n N landscape run`)"
        )


def with_dependency(options: SlurmOptions, after: list[str]) -> dict:
    """The extra sbatch flags, plus ``afterok`` on ``after``; a job whose dependency can
    no longer be satisfied (a task failed) is cancelled instead of pending forever."""
    extra = options.sbatch_flags()
    if after:
        extra.update(dependency="afterok:" + ":".join(after), kill_on_invalid_dep="yes")
    return extra


def submit_job(
    executor, path: Path, job: str, shards: list[int], options: SlurmOptions, after: list[str]
) -> dict:
    """One array job (a task per group of shards), or one MPI job; returns its record."""
    executor.update_parameters(slurm_additional_parameters=with_dependency(options, after))
    if options.mpi:
        submitted = executor.submit(MpiRun(), str(path), job)
        return {"id": submitted.job_id, "shards": shards, "log": str(submitted.paths.stderr)}
    groups = [
        group for group in (shards[i :: options.tasks] for i in range(options.tasks)) if group
    ]
    with executor.batch():
        tasks = [
            executor.submit(ShardTask(), str(path), job, index, len(groups), group)
            for index, group in enumerate(groups)
        ]
    return {
        "id": tasks[0].job_id.split("_")[0],
        "tasks": [
            {"id": task.job_id, "shards": group, "log": str(task.paths.stderr)}
            for task, group in zip(tasks, groups)
        ],
    }


# The states in which a job ended without its work done: status shows its shards and log.
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def record_path(path: Path) -> Path:
    """Where `landscape submit` records what it submitted for a surface file."""
    return path.with_name(path.name + ".submission.json")


def read_submission(record_file: Path) -> tuple[str, list[tuple[str, dict]]]:
    """When the record was submitted, and a (label, entry) for each job it lists: every
    array task, MPI job and the reduce job, each entry with its ``id`` and ``log``."""
    try:
        record = json.loads(record_file.read_text())
        entries = []
        for job, submitted in record["jobs"].items():
            if "tasks" in submitted:
                entries += [(f"{job} task {task['id']}", task) for task in submitted["tasks"]]
            else:
                entries.append((f"{job} MPI job {submitted['id']}", submitted))
        if record["reduce"]:
            entries.append(("reduce", record["reduce"]))
        for _, entry in entries:
            entry["id"] = str(entry["id"])
        return str(record["submitted"]), entries
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{record_file}: unreadable submission record (truncated or garbled: "
            f"{type(exc).__name__}: {exc}); task states unknown: submit again or delete it"
        ) from None


@dataclass(frozen=True)
class SlurmJobs:
    """What SLURM says about some jobs (ids such as ``41`` or array tasks ``41_3``).

    ``queued``: the state of each job still in the queue (squeue, which knows every
    pending and running job at once). ``runs``: the state of each run of each job, oldest
    first (``sacct --duplicates``: a requeued job has one record per run). Either is None
    when its command could not answer (no SLURM here, no accounting). sacct lists array
    tasks that have not started as one line (``41_[2-7%2]``), read here for each task.
    """

    queued: dict[str, str] | None
    runs: dict[str, list[str]] | None

    @classmethod
    def query(cls, ids: list[str]) -> SlurmJobs:
        arrays = sorted({job_id.split("_")[0] for job_id in ids})
        squeue = slurm_table(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
        sacct = slurm_table(
            ["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", ",".join(arrays)]
        )
        queued = None if squeue is None else dict(squeue)
        if sacct is None:
            return cls(queued, None)
        runs: dict[str, list[str]] = {}
        not_started: dict[str, str] = {}
        for job_id, state in sacct:
            if match := ARRAY_RANGE.fullmatch(job_id):
                for index in array_indices(match["indices"]):
                    not_started[f"{match['array']}_{index}"] = state
            else:
                runs.setdefault(job_id, []).append(state)
        for job_id, state in not_started.items():
            runs.setdefault(job_id, [state])
        return cls(queued, runs)

    def state(self, job_id: str) -> str:
        """The current state: the queue's if queued, else the last run's; a job in neither
        was submitted moments ago (squeue answered, accounting not yet)."""
        runs = (self.runs or {}).get(job_id)
        state = (self.queued or {}).get(job_id) or (runs[-1] if runs else None)
        if state is not None:
            return state
        if self.queued is None and self.runs is None:
            return "unknown (neither squeue nor sacct answered)"
        return "PENDING (not yet in accounting)"

    def describe(self, job_id: str) -> str:
        """The state, and how often the job was requeued (preempted, timed out, node
        failure): ``RUNNING, requeued 2 times (PREEMPTED, PREEMPTED)``."""
        earlier = (self.runs or {}).get(job_id, [])[:-1]
        line = self.state(job_id)
        if earlier:
            times = "1 time" if len(earlier) == 1 else f"{len(earlier)} times"
            line += f", requeued {times} ({', '.join(earlier)})"
        return line

    def active(self) -> list[str]:
        """The jobs still queued or running."""
        return sorted(self.queued or {})


ARRAY_RANGE = re.compile(r"(?P<array>\d+)_\[(?P<indices>[^\]]+)\]")


def array_indices(indices: str) -> list[int]:
    """``0-3,7%2`` (sacct's array tasks, ``%`` the parallelism limit) -> 0, 1, 2, 3, 7."""
    found = []
    for piece in indices.split("%")[0].split(","):
        first, _, last = piece.partition("-")
        found += range(int(first), int(last or first) + 1)
    return found


def slurm_table(command: list[str]) -> list[tuple[str, str]] | None:
    """The ``|``-separated pairs a SLURM client prints, or None if it cannot answer.
    squeue exits 1 when none of the jobs asked for is queued any more: no error here."""
    try:
        found = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0 and "Invalid job id" not in found.stderr:
        return None
    rows = (line.split("|", 1) for line in found.stdout.splitlines() if "|" in line)
    return [(job_id.strip(), state.strip()) for job_id, state in rows]
