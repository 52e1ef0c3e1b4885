"""The coordinator: turn a config into a surface file, or confirm an existing one matches.

Planning loads the checkpoint once, draws the directions and writes them into the
file, so every worker, wherever it runs, applies the same vectors. Planning a file
that exists is a resume: a no-op when the config and checkpoint are unchanged, an
error naming the differing fields otherwise. An existing file is never overwritten.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py

from landscape.atomic import folder_for
from landscape.checkpoint import verify_fingerprint
from landscape.config import ExperimentConfig, config_differences
from landscape.directions import ignored_parameters, plan_directions
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.grid import Grid, shard_ranges
from landscape.jobs import jobs_for
from landscape.locking import surface_lock
from landscape.parts import part_files, parts_folder
from landscape.store import SurfaceFile, create_surface_file

log = logging.getLogger(__name__)


def plan_surface(config: ExperimentConfig) -> Path:
    """Create the surface file for ``config`` (or check the existing one); returns its path."""
    config.require_surface()
    path = Path(config.output)
    if not path.is_file():
        # Checked before the work of loading and drawing directions; the lock file needs
        # the folder, which a failed plan removes again.
        with folder_for(path, "output"), surface_lock(path, "landscape plan", wait=True):
            if not path.exists():  # still missing now that no other planner runs
                create_plan(path, config)
                return path
    check_same_plan(path, config)
    log.info("%s already planned with this config: nothing to do (resume with run)", path)
    return path


def create_plan(path: Path, config: ExperimentConfig) -> None:
    """Load the checkpoint, build the directions and write the surface file at ``path``.

    Refused while part files of an earlier plan at the same path wait beside it: they
    belong to no file any more, and would be refused by every reader of the new one."""
    stale = part_files(path)
    if stale:
        raise UserError(
            f"output: {parts_folder(path)} holds {len(stale)} part files of an earlier plan "
            f"of {path.name}; delete that folder (or first put the old file back and merge "
            f"them with `landscape reduce {path}`) before planning {path}"
        )
    # Only Hessian directions compute anything heavy: they run where the workers would.
    device = None if config.directions.kind == "hessian" else "cpu"
    experiment = Experiment.load(config, device=device)
    count = 1 if config.grid.y is None else 2
    directions = plan_directions(experiment, config, count)
    grid = Grid.from_config(config.grid, directions.frame)
    common = {
        "kind": config.directions.kind,
        "normalization": config.directions.normalization,
        "ignore": config.directions.ignore,
        "seed": config.directions.seed,
        "ignored": ignored_parameters(experiment.model, config.directions.ignore),
    }
    work, job_attrs = {}, {}
    for kind in jobs_for(config.maps):
        points = kind.points(config, grid)
        work[kind.name] = (points, shard_ranges(points.size, kind.shard_size(config)))
        job_attrs[kind.name] = kind.done_attrs(config, experiment.dtype)
    metadata = {
        "checkpoint_path": config.model.checkpoint,
        "checkpoint_sha256": experiment.checkpoint_sha256,
        "model": config.model.name,
        "dataset": config.data.name,
    }
    create_surface_file(
        path,
        config,
        grid,
        [{name: t.numpy() for name, t in d.items()} for d in directions.vectors],
        [{**common, **axis} for axis in directions.axes[:count]],
        directions.groups,
        work,
        metadata,
        job_attrs,
    )
    log.info(
        "planned %s: %s grid, maps %s; %s",
        path,
        "x".join(map(str, grid.shape[::-1])),
        ", ".join(config.maps),
        ", ".join(f"{job}: {p.size} points in {len(s)} shards" for job, (p, s) in work.items()),
    )


def check_same_plan(path: Path, config: ExperimentConfig) -> None:
    """Fail unless ``path`` was planned from ``config`` and the same checkpoint bytes."""
    if not h5py.is_hdf5(path):  # the config, a checkpoint, notes: never to be overwritten
        raise UserError(
            f"output: {path} exists and is not a surface file; choose another output path"
        )
    with SurfaceFile.open(path) as surface:
        differences = config_differences(surface.config.to_dict(), config.to_dict())
        planned_sha = surface.attrs.get("checkpoint_sha256")
    if differences:
        raise UserError(
            f"output: {path} was planned with a different config (differs in "
            f"{', '.join(differences)}); choose another output path or delete the file"
        )
    verify_fingerprint(config.model.checkpoint, planned_sha, path)
