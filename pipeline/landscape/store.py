"""The surface file: one HDF5 file per experiment holding everything workers need and produce.

Layout (schema version 2)::

    /                    attrs: schema_version, plan_id (random, unique per plan),
                         config (YAML), created, package_version, checkpoint_path,
                         checkpoint_sha256, model, dataset
    /directions/x|y/<p>  float64, one dataset per parameter name (and BatchNorm buffer,
                         for interpolation); group attrs: kind, normalization, ignore,
                         seed, ignored (parameter names), label (the plot's axis title)
                         and what the kind measured (explained_variance_ratio,
                         eigenvalue, residual, target)
    /trajectory          PCA plans: coordinates (m, 2) of each checkpoint, epochs, lr,
                         lr_drop; attrs checkpoints, explained_variance_ratio
    /endpoints           interpolation plans: weight histograms of both ends
                         (histogram_edges, histogram_a, histogram_b); attrs weight_norms,
                         checkpoints, defined_alpha (where BN variances stay >= 0)
    /trace               landscape trace: per-sample estimates (projection: n x second
                         difference at step e; hutchinson: z^T H z); attrs per estimate
                         label, mean, half width, dtype; dimension, step (e), step_fraction,
                         non_smooth_operations. Written by ``rewrite_group`` (new image, rename)
    /grid/x, /grid/y     coordinates (no y for a 1D surface)
    /maps/<name>         float64 (ny, nx) or (nx,), NaN until computed; the hessian job
                         also writes residuals, HVP counts, a converged flag, and
                         lambda_ratio = |lambda_min / lambda_max| once it ends
    /done/<job>          uint8, 1 once every output of that job has its value at the
                         point; attrs: outputs (the maps the job writes); hessian: the
                         convergence criterion, tolerance, residual_tolerance (floored
                         for hvp_dtype), rounding_floor, method
    /finished/<job>      float64 unix time each point was finished (progress and rate)
    /points/<job>        int64 row-major point numbers of the job (every point, or every
                         stride-th along each axis for a coarser Hessian grid)
    /shards/<job>        int64 (n, 2) [start, stop) ranges into points/<job>

Every dataset is created, with its storage allocated, when the file is planned; workers
only overwrite raw values, never metadata, so a worker killed at any moment leaves a
file that opens cleanly. A command that adds a group to a finished file writes a new
image of it and renames it over (``rewrite_group``). A point's values are written before
its done flag. With the ``mpio`` driver every rank opens the file and writes its own
points independently.
"""

from __future__ import annotations

import datetime
import errno
import io
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import yaml

from landscape import __version__
from landscape.atomic import write_file
from landscape.config import ConfigError, ExperimentConfig, job_outputs, parse_config
from landscape.errors import UserError
from landscape.grid import Grid
from landscape.locking import LOCKING_UNSUPPORTED, READ_ONLY, surface_lock, this_command

SCHEMA_VERSION = 2
DERIVED_MAPS = {"hessian": ["lambda_ratio"]}


def create_surface_file(
    path: Path,
    config: ExperimentConfig,
    grid: Grid,
    directions: list[dict[str, np.ndarray]],
    axis_attrs: list[dict],
    groups: dict[str, tuple[dict, dict]],
    work: dict[str, tuple[np.ndarray, np.ndarray]],
    metadata: dict,
    job_attrs: dict[str, dict] | None = None,
) -> None:
    """Write a complete, empty surface file atomically (temp file, then rename).

    ``axis_attrs`` go on each direction's group; ``groups`` are extra groups of datasets
    and attributes (a PCA trajectory, interpolation end points); ``work`` maps each job
    to its point numbers and its shards (ranges into them); ``job_attrs`` go on a job's
    done flags (what its values mean: the hessian job's convergence criterion). The file
    is built in memory (as large as the directions plus the maps) and written by
    :func:`write_file`, so a full disk or an interrupt leaves no file and no ``.tmp``.
    """
    image = io.BytesIO()
    with h5py.File(image, "w") as handle:
        handle.attrs.update(
            schema_version=SCHEMA_VERSION,
            config=config.to_yaml(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            package_version=__version__,
            plan_id=uuid.uuid4().hex,
            **metadata,
        )
        for axis, direction, attrs in zip("xy", directions, axis_attrs):
            group = handle.create_group(f"directions/{axis}")
            group.attrs.update(attrs)
            for name, values in direction.items():
                group.create_dataset(name, data=values)
        for name, (datasets, attrs) in groups.items():
            group = handle.create_group(name)
            group.attrs.update(attrs)
            for key, values in datasets.items():
                group.create_dataset(key, data=values)
        handle["grid/x"] = grid.x
        if grid.y is not None:
            handle["grid/y"] = grid.y
        # Storage is written out now (no lazy allocation), so workers never allocate.
        for job, (points, shards) in work.items():
            outputs = job_outputs(job, config.maps)
            for name in outputs + DERIVED_MAPS.get(job, []):
                handle.create_dataset(f"maps/{name}", data=np.full(grid.shape, np.nan))
            done = handle.create_dataset(f"done/{job}", data=np.zeros(grid.shape, np.uint8))
            done.attrs["outputs"] = outputs
            done.attrs.update((job_attrs or {}).get(job, {}))
            handle.create_dataset(f"finished/{job}", data=np.full(grid.shape, np.nan))
            handle.create_dataset(f"points/{job}", data=points)
            handle.create_dataset(f"shards/{job}", data=shards)
    write_file(path, image.getbuffer(), "output")


def missing_datasets(handle: h5py.File) -> list[str]:
    """The datasets of the schema that ``handle`` lacks (the maps and work table of every
    job it lists), so that a file that has a surface file's attributes but not its
    contents is refused by name instead of failing later at the first missing key."""
    jobs = list(handle["done"]) if isinstance(handle.get("done"), h5py.Group) else []
    needed = ["grid/x", "directions/x", "done"]
    for job in jobs:
        needed += [f"{kind}/{job}" for kind in ("finished", "points", "shards")]
        needed += [f"maps/{name}" for name in handle[f"done/{job}"].attrs.get("outputs", [])]
    return [name for name in needed if name not in handle]


def existing_surface(path: str | Path) -> Path:
    """``path`` as a Path, once it is known to be a file (else how to create one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such surface file; create it with `landscape plan CONFIG`")
    return path


def open_failure(path: Path, mode: str, exc: OSError) -> UserError:
    """Why HDF5 could not open ``path``, said so that the user can act on it."""
    if exc.errno in READ_ONLY:
        if mode == "r":
            return UserError(f"{path}: cannot be read (permission denied); fix its permissions")
        return UserError(
            f"{path}: read-only (permission denied); fix its permissions or copy it to a "
            "writable folder"
        )
    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return UserError(
            f"{path}: open for writing in another program (HDF5 file lock); close it there"
        )
    if exc.errno in LOCKING_UNSUPPORTED:
        return UserError(
            f"{path}: this file system cannot lock files for HDF5; set "
            "HDF5_USE_FILE_LOCKING=FALSE (landscape's own lock still keeps its jobs apart)"
        )
    return UserError(
        f"{path}: cannot open as HDF5 ({exc}); it may be damaged: delete it and plan again"
    )


def rewrite_group(path: Path, name: str, datasets: dict, attrs: dict) -> None:
    """Put the group ``name`` (datasets and attributes) into the finished surface file
    ``path``, replacing an earlier one, without ever writing to ``path`` itself.

    Adding, deleting or moving a group changes HDF5 metadata (object headers, free-space
    lists) in place, and a kill or a full disk halfway through leaves a file that no
    longer opens, maps and all. So the file is read into memory, the group changed
    there, and the new image written whole by :func:`landscape.atomic.write_file` (temp
    file, fsync, rename): readers see the old file or the new one, never a mix, and a
    full disk leaves the old file. The caller holds the surface's lock
    (:func:`landscape.locking.surface_lock`), so no job writes ``path`` meanwhile.
    """
    image = io.BytesIO(path.read_bytes())
    with h5py.File(image, "r+") as handle:
        if name in handle:
            del handle[name]
        group = handle.create_group(name)
        group.attrs.update(attrs)
        for key, values in datasets.items():
            group.create_dataset(key, data=values)
    write_file(path, image.getbuffer(), name)


class SurfaceFile:
    """An open surface file: typed reads of its parts and point-wise writes of results."""

    def __init__(self, handle: h5py.File, path: Path, parallel: bool = False):
        self.handle = handle
        self.path = path
        self.parallel = parallel  # opened with mpio by all ranks of a communicator
        try:
            missing = missing_datasets(handle)
            if missing:
                raise UserError(
                    f"{path}: not a complete surface file (no {', '.join(missing)}); plan it "
                    "again with `landscape plan CONFIG`"
                )
            self.config: ExperimentConfig = parse_config(handle.attrs["config"], source=str(path))
        except ConfigError as exc:  # planned by a version that allowed what this one refuses
            handle.close()
            raise UserError(
                f"{path}: its stored config is no longer valid ({exc}); plan it again"
            ) from None
        except BaseException:
            handle.close()
            raise
        y = handle["grid/y"][()] if "grid/y" in handle else None
        self.grid = Grid(handle["grid/x"][()], y)
        self.datasets: dict[str, h5py.Dataset] = {}
        self.lock = ExitStack()  # the surface's lock, held while open for writing

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", comm=None) -> SurfaceFile:
        """Open for reading (``"r"``: no lock, so it works beside a running job), for
        writing results from one process (``"r+"``: holds the surface's exclusive lock,
        :func:`landscape.locking.surface_lock`, while open), or, given an MPI ``comm``,
        from all its ranks at once with the ``mpio`` driver (a collective call; rank 0
        holds the job's lock).

        HDF5's own file locking is kept for a serial writer (it also keeps out other
        programs) and switched off under ``mpio``: ranks coordinate through MPI, and on
        NFS and Lustre HDF5's lock call itself fails with errno 11 or 38. Only the planner
        and the reducer write metadata, and never while workers run.
        """
        path = existing_surface(path)
        writer = mode != "r" and comm is None
        with ExitStack() as lock:
            try:
                if not h5py.is_hdf5(path):  # h5py would turn an empty file into an HDF5 file
                    raise UserError(
                        f"{path}: not an HDF5 file ({path.stat().st_size} bytes, no HDF5 "
                        "signature); name a surface file, or plan it again"
                    )
                if writer:
                    lock.enter_context(surface_lock(path, this_command()))
                if comm is None:
                    handle = h5py.File(path, mode, locking=writer)
                else:
                    handle = h5py.File(path, mode, driver="mpio", comm=comm, locking=False)
            except OSError as exc:
                raise open_failure(path, mode, exc) from None
            version = handle.attrs.get("schema_version")
            if version != SCHEMA_VERSION or "config" not in handle.attrs:
                handle.close()
                raise UserError(
                    f"{path}: not a surface file of schema {SCHEMA_VERSION} (found {version}); "
                    "plan it again with this version"
                )
            surface = cls(handle, path, parallel=comm is not None)
            surface.lock = lock.pop_all()
        return surface

    def __enter__(self) -> SurfaceFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.handle.close()
        self.lock.close()

    @property
    def stored_config(self) -> dict:
        return yaml.safe_load(self.handle.attrs["config"])

    @property
    def plan_id(self) -> str:
        return self.handle.attrs["plan_id"]

    @property
    def attrs(self) -> dict:
        return dict(self.handle.attrs)

    @property
    def jobs(self) -> list[str]:
        return list(self.handle["done"])

    @property
    def map_names(self) -> list[str]:
        return list(self.handle["maps"])

    def maps(self) -> dict[str, np.ndarray]:
        return {name: self.handle[f"maps/{name}"][()] for name in self.map_names}

    def done(self, job: str) -> np.ndarray:
        return self.handle[f"done/{job}"][()].astype(bool)

    def finished(self, job: str) -> np.ndarray:
        return self.handle[f"finished/{job}"][()]

    def shards(self, job: str) -> np.ndarray:
        return self.handle[f"shards/{job}"][()]

    def points(self, job: str) -> np.ndarray:
        return self.handle[f"points/{job}"][()]

    def pending_shard_indices(
        self, job: str, finished_elsewhere: np.ndarray | None = None
    ) -> list[int]:
        """Indices of the shards of ``job`` with a point neither done nor in
        ``finished_elsewhere`` (points written to part files but not yet merged)."""
        return [index for index, _ in self._pending(job, finished_elsewhere)]

    def pending_shards(
        self,
        job: str,
        owned: np.ndarray | None = None,
        finished_elsewhere: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """The pending point numbers of each pending shard of ``job``; ``owned`` keeps only
        those shards (by index: an array task's share)."""
        keep = None if owned is None else set(np.asarray(owned).tolist())
        return [
            chunk
            for index, chunk in self._pending(job, finished_elsewhere)
            if keep is None or index in keep
        ]

    def _pending(self, job: str, finished_elsewhere: np.ndarray | None):
        points, done = self.points(job), self.done(job).reshape(-1).copy()
        if finished_elsewhere is not None:
            done[finished_elsewhere] = True
        for index, (start, stop) in enumerate(self.shards(job)):
            chunk = points[start:stop]
            if not done[chunk].all():
                yield index, chunk[~done[chunk]]

    def derive_maps(self) -> None:
        """Fill the derived maps from their sources (serial writers only):
        lambda_ratio = |lambda_min / lambda_max| wherever both are known."""
        if "lambda_ratio" in self.handle["maps"]:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.abs(
                    self.handle["maps/lambda_min"][()] / self.handle["maps/lambda_max"][()]
                )
            self.handle["maps/lambda_ratio"][...] = ratio
            self.handle.flush()

    def job_maps(self, job: str) -> list[str]:
        """The maps ``job`` writes at each of its points."""
        return [str(name) for name in self.handle[f"done/{job}"].attrs["outputs"]]

    def directions(self) -> list[dict[str, np.ndarray]]:
        groups = [
            self.handle[f"directions/{axis}"] for axis in "xy" if axis in self.handle["directions"]
        ]
        return [{name: group[name][()] for name in group} for group in groups]

    def axis_attrs(self) -> list[dict]:
        """What the planner recorded about each direction (kind, eigenvalue, ...)."""
        groups = [self.handle[f"directions/{a}"] for a in "xy" if a in self.handle["directions"]]
        return [dict(group.attrs) for group in groups]

    def axis_labels(self) -> list[str]:
        """What each axis is, for plots: e.g. ``x: PCA-1 (62.3% of the path's variance)``."""
        return [
            str(attrs.get("label", f"{axis}: {attrs['kind']} direction"))
            for axis, attrs in zip("xy", self.axis_attrs())
        ]

    def group(self, name: str) -> tuple[dict, dict] | None:
        """An extra group's (datasets, attributes), or None if the plan has none."""
        if name not in self.handle:
            return None
        group = self.handle[name]
        return {key: group[key][()] for key in group}, dict(group.attrs)

    def write_point(self, job: str, point: int, values: dict[str, float]) -> None:
        """Store one point's values, then its finish time and done flag (in that order)."""
        index = self.grid.index(point)
        for name, value in values.items():
            self.dataset(f"maps/{name}")[index] = value
        self.dataset(f"finished/{job}")[index] = time.time()
        self.dataset(f"done/{job}")[index] = 1

    def dataset(self, name: str) -> h5py.Dataset:
        """The dataset object, looked up once: a path lookup per point costs more than the write."""
        if name not in self.datasets:
            self.datasets[name] = self.handle[name]
        return self.datasets[name]

    def write_points(
        self, job: str, points: np.ndarray, values: dict[str, np.ndarray], finished: np.ndarray
    ) -> None:
        """Store many points at once (the reducer): maps, then finish times, then done
        flags, each read, updated and written whole, then flushed."""
        for name, column in values.items():
            self.update_flat(f"maps/{name}", points, column)
        self.update_flat(f"finished/{job}", points, finished)
        self.update_flat(f"done/{job}", points, np.ones(len(points), np.uint8))
        self.handle.flush()

    def update_flat(self, name: str, points: np.ndarray, values: np.ndarray) -> None:
        dataset = self.handle[name]
        array = dataset[()]
        array.reshape(-1)[points] = values
        dataset[...] = array

    def commit(self) -> None:
        """Make the points written so far survive a crash of this process.

        A serial file is flushed. Under ``mpio`` flushing is a collective call, which ranks
        working at their own pace cannot make; it is not needed either: the maps are
        contiguous datasets, for which the MPI-IO driver keeps no cache, so each write is
        in the operating system's hands when ``write_point`` returns. (Even asking h5py
        for the driver is collective under mpio: it duplicates the communicator.)
        """
        if not self.parallel:
            self.handle.flush()
