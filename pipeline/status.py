"""What a surface file holds right now: points done per job, rate, time left, map ranges.

Reads without locking, so it works while a job is writing the file.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from pipeline.store import SurfaceFile

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
            total = surface.points(job).size
            done = int(surface.done(job).sum())
            line = f"  {job}: {done}/{total} points done ({done / total:.1%})"
            rate = finish_rate(surface.finished(job))
            if rate is not None:
                line += f", {rate:.2f} points/s"
                if done < total:
                    line += f", about {format_duration((total - done) / rate)} left"
            lines.append(line)
            for name in surface.job_maps(job):
                lines.append(map_line(name, maps[name]))
        if "lambda_ratio" in maps:
            lines.append(map_line("lambda_ratio", maps["lambda_ratio"]))
        trace = surface.group("trace")
        if trace is not None:
            lines += trace_lines(trace[1])
    lines += submission_status(Path(path))
    return "\n".join(lines)


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
    shards and log file (from the record and sacct)."""
    record_file = record_path(path)
    if not record_file.is_file():
        return []
    record = json.loads(record_file.read_text())
    entries = []
    for job, submitted in record["jobs"].items():
        if "tasks" in submitted:
            entries += [(f"{job} task {task['id']}", task) for task in submitted["tasks"]]
        else:
            entries.append((f"{job} MPI job {submitted['id']}", submitted))
    if record["reduce"]:
        entries.append(("reduce", record["reduce"]))
    states = slurm_states([entry["id"] for _, entry in entries])
    lines = [f"  submitted {record['submitted']} ({record_file.name}):"]
    for label, entry in entries:
        state = states.get(entry["id"], "unknown")
        line = f"    {label}: {state}"
        if state.split()[0] in FAILED_STATES:
            if "shards" in entry:
                line += f", shards {', '.join(map(str, entry['shards']))}"
            line += f"; log {entry['log']}"
        lines.append(line)
    return lines


def slurm_states(ids: list[str]) -> dict[str, str]:
    """Job id -> state from sacct (empty when sacct is missing or fails)."""
    try:
        found = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    pairs = (line.split("|", 1) for line in found.stdout.splitlines() if "|" in line)
    return dict(pairs)
