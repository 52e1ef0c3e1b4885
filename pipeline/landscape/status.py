"""What a surface file holds right now: points done per job (merged, and waiting in part
files), rate, time left, map ranges, and the state of each job submitted to SLURM.

Reads without locking, so it works while a job is writing the file.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landscape.errors import UserError
from landscape.jobs import JOBS
from landscape.parts import finished_in_parts
from landscape.store import SurfaceFile

RATE_WINDOW = 20
FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def record_path(path: Path) -> Path:
    """Where `landscape submit` records what it submitted for a surface file."""
    return path.with_name(path.name + ".submission.json")


def finish_rate(finished: np.ndarray) -> float | None:
    """Points per second over the last ``RATE_WINDOW`` finished points (None if < 2)."""
    times = np.sort(finished[np.isfinite(finished)])[-RATE_WINDOW:]
    if times.size < 2 or times[-1] <= times[0]:
        return None
    return (times.size - 1) / (times[-1] - times[0])


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def map_line(name: str, values: np.ndarray) -> str:
    known = np.isfinite(values)
    line = f"    {name}: {int(known.sum())} values"
    if known.any():
        line += f", min {np.nanmin(values):.6g}, max {np.nanmax(values):.6g}"
    return line


def surface_status(path: str | Path) -> str:
    """A few human-readable lines describing the state of a surface file."""
    with SurfaceFile.open(path) as surface:
        grid, attrs = surface.grid, surface.attrs
        shape = " x ".join(str(n) for n in grid.shape[::-1])
        lines = [
            f"{path}: {len(grid.shape)}D grid {shape}, model {attrs['model']} on "
            f"{attrs['dataset']}, planned {attrs['created']}"
        ]
        lines += [f"  {label}" for label in surface.axis_labels()]
        maps = surface.maps()
        for job in surface.jobs:
            lines.append(job_progress(surface, job))
            derived = [derived.name for derived in JOBS[job].derived]
            for name in surface.job_maps(job) + derived:
                lines.append(map_line(name, maps[name]))
        trace = surface.group("trace")
        if trace is not None:
            lines += trace_lines(trace[1])
    lines += submission_status(Path(path))
    return "\n".join(lines)


def job_progress(surface: SurfaceFile, job: str) -> str:
    """``surface: 12/36 points done (+8 in part files, not yet merged: 55.6% in all),
    2.10 points/s, about 0m08s left``: finished points in unmerged part files (array
    tasks, a killed part-file run) count towards the progress, the rate and the time left.
    """
    work = surface.work(job)
    total = work.points().size
    done = work.done()
    part_points, part_finished = finished_in_parts(surface, job)
    unmerged = ~done[part_points]  # a reducer killed before deleting its parts leaves both
    waiting, first = np.unique(part_points[unmerged], return_index=True)
    finished = np.concatenate([work.finished()[done], part_finished[unmerged][first]])
    merged = int(done.sum())
    count = merged + waiting.size
    line = f"  {job}: {merged}/{total} points done"
    if waiting.size:
        line += f" (+{waiting.size} in part files, not yet merged: {count / total:.1%} in all)"
    else:
        line += f" ({count / total:.1%})"
    rate = finish_rate(finished)
    if rate is not None:
        line += f", {rate:.2f} points/s"
        if count < total:
            line += f", about {format_duration((total - count) / rate)} left"
    return line


def trace_lines(found: dict) -> list[str]:
    """The two estimates of `landscape trace`, each under the label it was stored with
    (a file traced before labels were stored gets its step instead)."""
    older = {
        "hutchinson": "Hutchinson",
        "projection": f"from loss values at step ε = {found['step']:.3g} (traced by an older "
        "version, labelled tr(H); run `landscape trace` again for labelled estimates)",
    }
    lines = [f"  curvature at the centre ({found['confidence']:.0%} intervals):"]
    for name in ("hutchinson", "projection"):
        label = found.get(f"{name}_label", older[name])
        mean, half_width = found[f"{name}_mean"], found[f"{name}_half_width"]
        lines.append(f"    {label}: {mean:.6g} ± {half_width:.3g}")
    if found.get("non_smooth_operations"):
        lines.append(
            f"    non-smooth operations ({found['non_smooth_operations']}): the two measure "
            "different things and will differ"
        )
    return lines


def submission_status(path: Path) -> list[str]:
    """Lines for `landscape status`: each submitted task's state, failed ones with their
    shards and log file (from the record, squeue and sacct)."""
    record_file = record_path(path)
    if not record_file.is_file():
        return []
    try:
        submitted, entries = read_submission(record_file)
    except UserError as exc:
        return [f"  {exc}"]
    jobs = SlurmJobs.query([entry["id"] for _, entry in entries])
    lines = [f"  submitted {submitted} ({record_file.name}):"]
    for label, entry in entries:
        state = jobs.state(entry["id"])
        line = f"    {label}: {jobs.describe(entry['id'])}"
        if state.split()[0] in FAILED_STATES:
            if "shards" in entry:
                line += f", shards {', '.join(map(str, entry['shards']))}"
            line += f"; log {entry['log']}"
        lines.append(line)
    return lines


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
