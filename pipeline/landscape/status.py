"""What a surface file holds right now: points done per job (merged, and waiting in part
files), rate, time left, map ranges, and the state of each job submitted to SLURM (the
record and the states come from :mod:`landscape.slurm`; this module only formats them).

Reads without locking, so it works while a job is writing the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from landscape.errors import UserError
from landscape.jobs import JOBS
from landscape.parts import finished_in_parts
from landscape.store import SurfaceFile

RATE_WINDOW = 20


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
    shards and log file (from the record, squeue and sacct). landscape.slurm is imported
    here, not at the top: it loads submitit, which a GPU node or a notebook that never
    submits need not have (``import landscape.api`` must work without it)."""
    from landscape.slurm import FAILED_STATES, SlurmJobs, read_submission, record_path

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
