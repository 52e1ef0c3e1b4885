"""The result files: one HDF5 file per experiment holding everything workers need and produce.

A *surface* file's items are the points of a grid of directions (``landscape plan``);
an *analysis* file's are the checkpoints of a list (``landscape analyze``, whose layout
:mod:`landscape.analysis` describes: no directions, a 1D ``grid/x`` numbering the
checkpoints, ``/checkpoints`` with their paths, hashes and epochs). Both share the maps,
the work tables and everything below; the root attribute ``file_kind`` tells them apart
(absent: a surface file of an older version).

Layout (schema version 3; version 2 named the loss job "surface", and still opens)::

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
    /grid/x, /grid/y     coordinates (no y for a 1D surface); a surface's attrs:
                         spacing (uniform | graded), cell_at_minimum, description
    /maps/<name>         float64 (ny, nx) or (nx,), plus the output's trailing shape
                         ((k,) for k values per point), NaN until computed (attrs:
                         description, what the value is and how it is estimated): every output
                         of every job (the hessian job also writes residuals, HVP counts
                         and a converged flag) and the derived maps (lambda_ratio =
                         |lambda_min / lambda_max|; train_perplexity = exp(train_loss)
                         where maps lists it), filled by reduce
    /done/<job>          the work table of each job (:mod:`landscape.work_table`), whose
    /finished/<job>      items are the row-major point numbers of the grid: every point,
    /points/<job>        or every stride-th along each axis for a coarser Hessian grid;
    /shards/<job>        done's attrs: outputs (the maps the job writes) and what its kind
                         records (:attr:`landscape.jobs.JobKind.done_attrs`; hessian: the
                         convergence criterion, tolerance, rounding_floor, method)

Jobs are the kinds of :mod:`landscape.jobs` (``loss``, ``hessian``).

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
import uuid
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import yaml

from landscape.atomic import write_file
from landscape.config import ConfigError, ExperimentConfig, parse_config
from landscape.errors import UserError
from landscape.grid import Grid
from landscape.jobs import JOB_KINDS, JOBS
from landscape.locking import LOCKING_UNSUPPORTED, READ_ONLY, surface_lock, this_command
from landscape.version import __version__
from landscape.work_table import TABLE_GROUPS, WorkTable, update_items

SCHEMA_VERSION = 3
# Schema 2 differs only in a job's name: files planned then (a grid days into its run)
# still open, and resume, under today's names; so do their part files, and array tasks
# submitted then and requeued since (:func:`job_name`).
READABLE_SCHEMAS = (2, 3)
RENAMED_JOBS = {"surface": "loss"}


def job_name(stored: str) -> str:
    """The job that a group or part file named ``stored`` belongs to (today's name of
    a job an older schema named differently)."""
    return RENAMED_JOBS.get(stored, stored)


FILE_KINDS = ("surface", "analysis")
# What one work item of each kind of file is, in logs and messages.
ITEM_NOUNS = {"surface": "point", "analysis": "checkpoint"}


def create_surface_file(
    path: Path,
    config: ExperimentConfig,
    grid: Grid,
    directions: list[dict[str, np.ndarray]],
    axis_attrs: list[dict],
    groups: dict[str, tuple[dict, dict]],
    work: dict[str, tuple[np.ndarray, np.ndarray]],
    metadata: dict,
    job_attrs: dict[str, dict],
    file_kind: str = "surface",
) -> None:
    """Write a complete, empty result file atomically (temp file, then rename).

    ``file_kind``: one of FILE_KINDS (an analysis file has no directions).
    ``axis_attrs`` go on each direction's group; ``groups`` are extra groups of datasets
    and attributes (a PCA trajectory, interpolation end points); ``work`` maps each job
    to its point numbers and its shards (ranges into them); ``job_attrs`` go on a job's
    done flags (its kind's ``done_attrs``: what its values mean). The file
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
            file_kind=file_kind,
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
        for axis, coordinates in zip("xy", grid.axes):
            handle[f"grid/{axis}"] = coordinates
        for axis, attrs in zip("xy", grid.axis_attrs()):
            handle[f"grid/{axis}"].attrs.update(attrs)
        # Storage is written out now (no lazy allocation), so workers never allocate.
        for job, (points, shards) in work.items():
            kind = JOBS[job]
            outputs = kind.outputs(config)
            for output in outputs:
                values = np.full(grid.shape + output.shape, np.nan)
                handle.create_dataset(f"maps/{output.name}", data=values)
                handle[f"maps/{output.name}"].attrs["description"] = output.description
            for derived in kind.derived_maps(config):
                values = np.full(grid.shape + derived.shape, np.nan)
                handle.create_dataset(f"maps/{derived.name}", data=values)
                handle[f"maps/{derived.name}"].attrs["description"] = derived.description
            attrs = {"outputs": [output.name for output in outputs], **job_attrs.get(job, {})}
            WorkTable.create(handle, job, grid.shape, points, shards, attrs)
    write_file(path, image.getbuffer(), "output")


def texts(values: np.ndarray) -> list[str]:
    """A string dataset's values as ``str`` (h5py reads variable-length strings as bytes)."""
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def file_kind(handle: h5py.File) -> str:
    """``surface`` or ``analysis`` (files of versions before analyses are surfaces)."""
    return str(handle.attrs.get("file_kind", "surface"))


def missing_datasets(handle: h5py.File, config: ExperimentConfig) -> list[str]:
    """The datasets of the schema that ``handle`` lacks (the maps and work table of every
    job it lists, and the derived maps its ``config`` makes), so that a file that has a
    surface file's attributes but not its contents is refused by name instead of failing
    later at the first missing key."""
    jobs = list(handle["done"]) if isinstance(handle.get("done"), h5py.Group) else []
    items = "directions/x" if file_kind(handle) == "surface" else "checkpoints/path"
    needed = ["grid/x", items, "done"]
    for job in jobs:
        needed += [f"{group}/{job}" for group in TABLE_GROUPS]
        needed += [f"maps/{name}" for name in handle[f"done/{job}"].attrs.get("outputs", [])]
        kind = JOBS.get(job_name(job))
        needed += [f"maps/{d.name}" for d in (kind.derived_maps(config) if kind else ())]
    return [name for name in needed if name not in handle]


def existing_surface(path: str | Path) -> Path:
    """``path`` as a Path, once it is known to be a file (else how to create one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: no such surface file; create it with `landscape plan CONFIG` (an "
            "analysis file: `landscape analyze CONFIG`)"
        )
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
    """An open surface file: typed reads of its parts and writes of results."""

    commits_in_place = True  # a commit flushes the file (see commit): cheap at any time

    def __init__(self, handle: h5py.File, path: Path, parallel: bool = False):
        self.handle = handle
        self.path = path
        self.parallel = parallel  # opened with mpio by all ranks of a communicator
        try:
            self.config: ExperimentConfig = parse_config(handle.attrs["config"], source=str(path))
            missing = missing_datasets(handle, self.config)
            if missing:
                raise UserError(
                    f"{path}: not a complete surface file (no {', '.join(missing)}); plan it "
                    "again with `landscape plan CONFIG`"
                )
        except ConfigError as exc:  # planned by a version that allowed what this one refuses
            handle.close()
            raise UserError(
                f"{path}: its stored config is no longer valid ({exc}); plan it again"
            ) from None
        except BaseException:
            handle.close()
            raise
        axes = [handle[f"grid/{axis}"] for axis in "xy" if f"grid/{axis}" in handle]
        spacing = tuple(str(axis.attrs.get("spacing", "uniform")) for axis in axes)
        x, *y = [axis[()] for axis in axes]
        self.grid = Grid(x, y[0] if y else None, spacing)
        self.datasets: dict[str, h5py.Dataset] = {}
        stored = {job_name(name): name for name in handle["done"]}
        self.tables = {
            kind.name: WorkTable(handle, stored[kind.name])
            for kind in JOB_KINDS
            if kind.name in stored
        }
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
            if version not in READABLE_SCHEMAS or "config" not in handle.attrs:
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
    def kind(self) -> str:
        """``surface`` (items: grid points) or ``analysis`` (items: checkpoints)."""
        return file_kind(self.handle)

    @property
    def item_noun(self) -> str:
        """What one of its work items is: ``point`` or ``checkpoint``."""
        return ITEM_NOUNS[self.kind]

    def description(self, name: str) -> str:
        """What map ``name`` holds, as its job stored it ("" for files before descriptions)."""
        return str(self.handle[f"maps/{name}"].attrs.get("description", ""))

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
        """The file's jobs, in the order they run (the table's)."""
        return list(self.tables)

    @property
    def map_names(self) -> list[str]:
        return list(self.handle["maps"])

    def maps(self) -> dict[str, np.ndarray]:
        return {name: self.handle[f"maps/{name}"][()] for name in self.map_names}

    def work(self, job: str) -> WorkTable:
        """The work table of ``job`` (its points, shards, done flags, finish times)."""
        return self.tables[job]

    def done(self, job: str) -> np.ndarray:
        return self.work(job).done().reshape(self.grid.shape)

    def finished(self, job: str) -> np.ndarray:
        return self.work(job).finished().reshape(self.grid.shape)

    def shards(self, job: str) -> np.ndarray:
        return self.work(job).shards()

    def points(self, job: str) -> np.ndarray:
        return self.work(job).points()

    def pending_shard_indices(
        self, job: str, finished_elsewhere: np.ndarray | None = None
    ) -> list[int]:
        """Indices of the shards of ``job`` with a point neither done nor in
        ``finished_elsewhere`` (points written to part files but not yet merged)."""
        return [index for index, _ in self.work(job).pending(None, finished_elsewhere)]

    def pending_shards(
        self,
        job: str,
        owned: np.ndarray | None = None,
        finished_elsewhere: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """The pending point numbers of each pending shard of ``job``; ``owned`` keeps only
        those shards (by index: an array task's share)."""
        return [chunk for _, chunk in self.work(job).pending(owned, finished_elsewhere)]

    def derived_maps(self) -> dict[str, np.ndarray]:
        """Every derived map of the file's jobs, computed from its sources as they are now
        (NaN where a source is unknown)."""
        return {
            derived.name: derived.derive(
                *(self.handle[f"maps/{name}"][()] for name in derived.sources)
            )
            for job in self.jobs
            for derived in JOBS[job].derived_maps(self.config)
        }

    def stale_derived_maps(self) -> dict[str, np.ndarray]:
        """The derived maps whose stored values differ from :meth:`derived_maps`."""
        return {
            name: values
            for name, values in self.derived_maps().items()
            if not np.array_equal(self.handle[f"maps/{name}"][()], values, equal_nan=True)
        }

    def store_derived_maps(self, maps: dict[str, np.ndarray]) -> None:
        """Write derived maps (serial writers only: :func:`landscape.reduce.reduce`)."""
        for name, values in maps.items():
            self.handle[f"maps/{name}"][...] = values
        self.handle.flush()

    def output_shape(self, name: str) -> tuple[int, ...]:
        """The trailing shape of map ``name`` at one point (``()`` for one number)."""
        return self.handle[f"maps/{name}"].shape[len(self.grid.shape) :]

    def job_maps(self, job: str) -> list[str]:
        """The maps ``job`` writes at each of its points."""
        return [str(name) for name in self.work(job).attrs["outputs"]]

    def direction_groups(self) -> list[h5py.Group]:
        """The group of each direction, x first (none in an analysis file)."""
        stored = self.handle.get("directions", {})
        return [stored[axis] for axis in "xy" if axis in stored]

    def directions(self) -> list[dict[str, np.ndarray]]:
        return [{name: group[name][()] for name in group} for group in self.direction_groups()]

    def axis_attrs(self) -> list[dict]:
        """What the planner recorded about each direction (kind, eigenvalue, ...)."""
        return [dict(group.attrs) for group in self.direction_groups()]

    def axis_labels(self) -> list[str]:
        """What each axis is, for plots: e.g. ``x: PCA-1 (62.3% of the path's variance)``."""
        if self.kind == "analysis":
            return ["checkpoint"]
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

    def write_points(
        self,
        job: str,
        points: np.ndarray,
        values: dict[str, np.ndarray],
        finished: np.ndarray | float,
    ) -> None:
        """Store many points at once: each map's values (``(n,) + trailing shape``), then
        the finish times (unix times, one per point or one for all), then the done flags,
        one write per grid row each (:func:`landscape.work_table.update_items`). Nothing
        is flushed: :meth:`commit` makes them durable."""
        ndim = len(self.grid.shape)
        for name, column in values.items():
            update_items(self.dataset(f"maps/{name}"), points, column, ndim)
        self.work(job).mark_done(points, finished)

    def dataset(self, name: str) -> h5py.Dataset:
        """The dataset object, looked up once: a path lookup per write costs more than the write."""
        if name not in self.datasets:
            self.datasets[name] = self.handle[name]
        return self.datasets[name]

    def commit(self) -> None:
        """Make the points written so far survive a crash of this process.

        A serial file is flushed. Under ``mpio`` flushing is a collective call, which ranks
        working at their own pace cannot make; it is not needed either: the maps are
        contiguous datasets, for which the MPI-IO driver keeps no cache, so each write is
        in the operating system's hands when ``write_points`` returns. (Even asking h5py
        for the driver is collective under mpio: it duplicates the communicator.)
        """
        if not self.parallel:
            self.handle.flush()
