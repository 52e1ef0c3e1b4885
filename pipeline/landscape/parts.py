"""Part files: how ranks share one surface file when h5py has no MPI support.

Each rank writes every shard it finishes to a small HDF5 file of its own beside the
surface file, ``<surface>.parts/<job>-<first point>-<last point>.h5`` (to a temporary
name, then renamed, so a part is either complete or absent): its points, their finish
times and each output as ``(n,) + the output's trailing shape``. The reducer
(:func:`landscape.reduce.reduce`), one serial process, merges them into the surface file
and deletes them. A part carries its surface file's plan id and is never merged into
another plan.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import h5py
import numpy as np

from landscape.atomic import check_writable, write_file
from landscape.errors import UserError
from landscape.store import SurfaceFile, job_name

log = logging.getLogger(__name__)


def parts_folder(surface_path: str | Path) -> Path:
    path = Path(surface_path)
    return path.with_name(path.name + ".parts")


class PartWriter:
    """A point writer that keeps a claim's points in memory and commits them as one part."""

    commits_in_place = False  # each commit is a new part file: once per claim

    def __init__(self, surface_path: str | Path, plan_id: str):
        self.surface = str(surface_path)
        self.folder = parts_folder(surface_path)
        check_writable(self.folder, self.surface, folder=True)  # before any point is computed
        self.plan_id = plan_id
        self.job: str | None = None
        # One (points, values, finish times) row per write, appended in one step, so that
        # an interrupt between two bytecodes never leaves the columns of unequal length.
        self.rows: list[tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]] = []

    def write_points(
        self,
        job: str,
        points: np.ndarray,
        values: dict[str, np.ndarray],
        finished: np.ndarray | float,
    ) -> None:
        """Keep many points' values (``(n,) + trailing shape``) and finish times (unix
        times, one per point or one for all) until :meth:`commit`."""
        self.job = job
        times = np.broadcast_to(finished, (len(points),))
        self.rows.append((np.asarray(points, np.int64), values, times))

    def commit(self) -> None:
        """Write the points since the last commit to a new part file, atomically."""
        if not self.rows:
            return
        points = np.concatenate([row[0] for row in self.rows])
        path = self.folder / f"{self.job}-{points[0]:09d}-{points[-1]:09d}.h5"
        image = io.BytesIO()
        with h5py.File(image, "w") as handle:
            handle.attrs.update(plan_id=self.plan_id, job=self.job)
            handle["points"] = points
            handle["finished"] = np.concatenate([row[2] for row in self.rows]).astype(np.float64)
            for name in self.rows[0][1]:
                column = [np.asarray(row[1][name], np.float64) for row in self.rows]
                handle[f"maps/{name}"] = np.concatenate(column)
        write_file(path, image.getbuffer(), self.surface)
        self.rows = []


def read_part(path: Path, surface: SurfaceFile) -> tuple[str, np.ndarray, dict, np.ndarray]:
    """A part's job, points, map values and finish times, checked against ``surface``."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            plan_id, job = handle.attrs["plan_id"], job_name(handle.attrs["job"])
            points = handle["points"][()]
            values = {name: handle[f"maps/{name}"][()] for name in handle["maps"]}
            finished = handle["finished"][()]
    except FileNotFoundError:  # a reducer deleted it meanwhile: the caller decides
        raise
    except (OSError, KeyError) as exc:
        raise UserError(
            f"{path}: unreadable part file ({exc}); delete it to recompute its points"
        ) from None
    if plan_id != surface.plan_id:
        raise UserError(
            f"{path}: belongs to another plan of {surface.path.name} (plan id {plan_id}, the "
            f"file has {surface.plan_id}); delete {path.parent} if its results are not wanted"
        )
    if job not in surface.jobs or set(values) != set(surface.job_maps(job)):
        raise UserError(
            f"{path}: job {job!r} with maps {sorted(values)} does not fit {surface.path}"
        )
    shapes = {name: (len(points), *surface.output_shape(name)) for name in values}
    wrong = sorted(name for name, shape in shapes.items() if values[name].shape != shape)
    if wrong or finished.shape != points.shape:
        raise UserError(
            f"{path}: damaged part file ({', '.join(wrong) or 'finished'} not of its "
            f"{len(points)} points' shape); delete it to recompute its points"
        )
    return job, points, values, finished


def finished_in_parts(surface: SurfaceFile, job: str) -> tuple[np.ndarray, np.ndarray]:
    """Points of ``job`` already written to part files but not yet merged into ``surface``,
    and the unix time each finished. Each part is checked as the reducer checks it
    (:func:`read_part`): a part of another plan, which a re-planned surface at the same
    path would index out of range, is refused in one line. A part a reducer deletes
    meanwhile is skipped: its points are in the surface file by then."""
    points, finished = [np.zeros(0, np.int64)], [np.zeros(0)]
    for path in part_files(surface.path, job):
        try:
            _, part_points, _, part_finished = read_part(path, surface)
        except FileNotFoundError:
            continue
        points.append(part_points)
        finished.append(part_finished)
    return np.concatenate(points), np.concatenate(finished)


def points_in_parts(surface: SurfaceFile, job: str) -> np.ndarray:
    """Points of ``job`` already written to part files but not yet merged."""
    return finished_in_parts(surface, job)[0]


def part_files(surface_path: str | Path, job: str = "") -> list[Path]:
    """The part files waiting beside a surface file (of ``job`` only, if given, whichever
    name the schema that wrote them gave the job)."""
    folder = parts_folder(surface_path)
    found = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    return [path for path in found if not job or job_name(path.name.rsplit("-", 2)[0]) == job]


def merge_parts(surface: SurfaceFile, parts: list[Path]) -> int:
    """Write the points of ``parts`` into ``surface`` (open for writing), job by job;
    returns the number of points merged. The parts stay: see :func:`delete_parts`."""
    by_job: dict[str, list] = {}
    for path in parts:
        job, *contents = read_part(path, surface)
        by_job.setdefault(job, []).append(contents)
    merged = 0
    for job, contents in by_job.items():
        points = np.concatenate([points for points, _, _ in contents])
        values = {
            name: np.concatenate([part_values[name] for _, part_values, _ in contents])
            for name in surface.job_maps(job)
        }
        finished = np.concatenate([times for _, _, times in contents])
        surface.write_points(job, points, values, finished)
        merged += len(points)
    surface.commit()
    return merged


def delete_parts(surface_path: str | Path, parts: list[Path]) -> None:
    """Delete merged parts, and their folder once empty."""
    for path in parts:
        path.unlink()
    folder = parts_folder(surface_path)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
