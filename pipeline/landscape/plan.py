"""The coordinator: turn a config into a surface or analysis file, or confirm an existing
one matches.

Planning a surface loads the checkpoint once, draws the directions and writes them into
the file, so every worker, wherever it runs, applies the same vectors. Planning an
analysis lists its checkpoints with their hashes and epochs. Planning a file that exists
is a resume: a no-op when the config and checkpoints are unchanged, an error naming the
differing fields otherwise. An existing file is never overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import h5py
import numpy as np
import torch

from landscape.atomic import folder_for
from landscape.checkpoint import check_compatible, file_sha256, load_checkpoint, verify_fingerprint
from landscape.config import ExperimentConfig, config_differences
from landscape.curvature.operators import select_parameters
from landscape.directions import ignored_parameters, plan_directions
from landscape.errors import UserError
from landscape.experiment import FORWARD_SAMPLES, Experiment
from landscape.grid import (
    FRAME_MARGIN,
    Grid,
    cell_at_origin,
    cells_from_origin,
    shard_ranges,
    uniform_cell,
)
from landscape.jobs import JOB_KINDS, jobs_for
from landscape.locking import surface_lock
from landscape.parameters import DirectionPlane
from landscape.parts import part_files, parts_folder
from landscape.precision import REDUCED_DTYPES, precision_check
from landscape.store import SurfaceFile, create_surface_file, texts
from landscape.trajectory import trajectory_files

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
    # Only Hessian directions and a reduced dtype's check compute anything heavy: they
    # run where the workers would.
    heavy = config.directions.kind == "hessian" or config.evaluation.dtype in REDUCED_DTYPES
    experiment = Experiment.load(config, device=None if heavy else "cpu")
    count = 1 if config.grid.y is None else 2
    directions = plan_directions(experiment, config, count)
    grid = Grid.from_config(config.grid, directions.frame)
    if directions.frame is not None:
        log_path_resolution(grid, directions.frame)
    if experiment.autocast is not None:
        plane = DirectionPlane(experiment.model, directions.vectors)
        check = precision_check(experiment, plane, grid, config.maps)
        directions.groups["precision"] = ({}, check)
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
        work[kind.name] = (points, shard_ranges(points.size, kind.shard_size(config, grid)))
        job_attrs[kind.name] = kind.done_attrs(config, experiment.dtype)
    metadata = {
        "checkpoint_path": config.model.checkpoint,
        "checkpoint_sha256": experiment.checkpoint_sha256,
        "model": config.model.name,
        "dataset": config.data.name,
        "float32_products": "tf32" if config.evaluation.tf32 else "ieee",
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


# The checkpoints before the minimum whose distance from it the plan logs.
LAST_CHECKPOINTS = 3


def log_path_resolution(grid: Grid, path: np.ndarray) -> None:
    """Say what the grid resolves of a training path (its checkpoints' coordinates, the
    last one the minimum at 0): per axis its range, points, spacing and cell at the
    minimum, and how many cells from the minimum the last checkpoints before it lie.
    Warn when the final step, from the last of them to the minimum, stays inside one
    grid cell (the plot cannot show where training settled), with the bounds of a
    graded plane that would: one reaching the last two checkpoints (a decaying learning
    rate shrinks the last steps geometrically, far below any cell of a frame around the
    whole path; the step before the last is a few times the last, so on such a plane
    the last step spans many of its cells)."""
    last = path[np.any(path != 0, axis=1)][-LAST_CHECKPOINTS:]  # the minimum's row is 0
    steps = []
    for name, coordinates, spacing, column in zip("xy", grid.axes, grid.spacing, last.T):
        head = (
            f"grid {name}: {coordinates[0]:.4g} to {coordinates[-1]:.4g}, {coordinates.size} "
            f"points, {spacing} spacing"
        )
        if not coordinates[0] <= 0 <= coordinates[-1]:
            log.info("%s; the minimum (0) lies outside this axis", head)
            continue
        cells = cells_from_origin(coordinates, column)
        steps.append(cells[-1])
        cell = cell_at_origin(coordinates)
        log.info(
            "%s, cell at the minimum %.3g (%.2g of a uniform cell); the last %d checkpoints "
            "lie %s cells from the minimum along %s",
            head,
            cell,
            cell / uniform_cell(coordinates),
            cells.size,
            ", ".join(f"{value:.2g}" for value in cells),
            name,
        )
    if steps and max(steps) < 1:
        reach = (1 + FRAME_MARGIN) * np.abs(last[-2:]).max(axis=0)
        log.warning(
            "the final step of the training path (the last checkpoint to the minimum) lies "
            "within one grid cell (%s cells along %s): the plot will not resolve where "
            "training settled; plan the plane again around the last checkpoints, e.g. %s",
            " x ".join(f"{step:.2g}" for step in steps),
            " and ".join("xy"[: len(steps)]),
            ", ".join(
                f"grid.{name}: {{min: {-bound:.2g}, max: {bound:.2g}, num: {coordinates.size}, "
                "spacing: graded}"
                for name, bound, coordinates in zip("xy", reach, grid.axes)
            ),
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


ANALYSIS_FIELD = "analysis.checkpoints"


def plan_analysis(config: ExperimentConfig) -> Path:
    """Create the analysis file of ``config.analysis`` (or check the existing one)."""
    path = Path(config.require_analysis().output)
    if not path.is_file():
        with folder_for(path, "analysis.output"), surface_lock(path, "landscape plan", wait=True):
            if not path.exists():
                create_analysis_plan(path, config)
                return path
    check_same_analysis(path, config)
    log.info("%s already planned with this config: nothing to do (resume with analyze)", path)
    return path


def analysis_checkpoints(config: ExperimentConfig) -> list[Path]:
    """The checkpoints an analysis covers, in order: analysis.checkpoints (globs in
    natural order), or model.checkpoint alone."""
    patterns = config.analysis.checkpoints or [config.model.checkpoint]
    return trajectory_files(patterns, ANALYSIS_FIELD, minimum=1)


def resolved_analysis(config: ExperimentConfig, classes: int, parameters: int) -> ExperimentConfig:
    """``config`` with analysis.top_k made concrete: 0 becomes C + 2 (Sagun et al.'s C
    outliers and two eigenvalues of the bulk to find the gap below them), at most the
    number of analysed parameters."""
    settings = config.analysis
    top_k = settings.top_k or min(classes + 2, parameters)
    if top_k > parameters:
        raise UserError(
            f"analysis.top_k: {top_k} eigenpairs of {parameters} analysed parameters; give at "
            f"most {parameters}"
        )
    return dataclasses.replace(config, analysis=dataclasses.replace(settings, top_k=top_k))


@torch.no_grad()
def check_clustering_fits(experiment: Experiment, model_name: str) -> None:
    """Refuse the clustering quantity, at plan rather than after the other quantities of
    the first checkpoint were computed, where Fort & Ganguli's statistics are undefined:
    they need class labels y_mu and one logit z_k(x_mu) per class and sample, outputs of
    shape (samples, classes). Real-valued targets have no classes; a token model's
    (samples, tokens, vocabulary) outputs have a logit per token, not per sample. The
    model runs on the first training samples to see its outputs' shape."""
    inputs, targets = experiment.data.split("train").head(FORWARD_SAMPLES)
    if targets.is_floating_point():
        raise UserError(
            "analysis.quantities: clustering groups logit gradients by class and needs class "
            "labels; this data set's targets are real numbers: drop clustering"
        )
    shape = tuple(experiment.model(inputs).shape)
    if len(shape) != 2:
        raise UserError(
            f"analysis.quantities: clustering needs (samples, classes) logits, but model "
            f"{model_name} outputs shape {shape} for {len(inputs)} samples (a token model's "
            "(samples, tokens, vocabulary)?): drop clustering"
        )


def create_analysis_plan(path: Path, config: ExperimentConfig) -> None:
    """Check every checkpoint against the model (shapes, finite values) and write the
    analysis file at ``path``: its checkpoints' paths, hashes and epochs, and an empty
    work table over them."""
    files = analysis_checkpoints(config)
    experiment = Experiment.load(config, with_checkpoint=False, device="cpu")
    if "clustering" in config.analysis.quantities:
        check_clustering_fits(experiment, config.model.name)
    names = select_parameters(experiment.model, config.analysis.parameters)
    parameters = dict(experiment.model.named_parameters())
    size = sum(parameters[name].numel() for name in names)
    classes = experiment.data.num_classes
    config = resolved_analysis(config, classes, size)
    epochs = []
    for file in files:
        state, metadata = load_checkpoint(
            file, experiment.model.state_dict(), config.model, ANALYSIS_FIELD
        )
        check_compatible(experiment.model, state, file, ANALYSIS_FIELD)
        epochs.append(int(metadata.get("epoch", -1)))
    strings = h5py.string_dtype()
    rows = {
        "path": np.array([str(file) for file in files], dtype=strings),
        "sha256": np.array([file_sha256(file) for file in files], dtype=strings),
        "epoch": np.asarray(epochs, np.int64),
    }
    grid = Grid(np.arange(len(files), dtype=np.float64))
    work, job_attrs = {}, {}
    for kind in JOB_KINDS:
        if kind.file == "analysis":
            points = kind.points(config, grid)
            work[kind.name] = (points, shard_ranges(points.size, kind.shard_size(config, grid)))
            job_attrs[kind.name] = kind.done_attrs(config, experiment.dtype)
    metadata = {
        "model": config.model.name,
        "dataset": config.data.name,
        "classes": classes,
        "parameters": size,
    }
    groups = {"checkpoints": (rows, {"classes": classes, "parameters": size})}
    create_surface_file(path, config, grid, [], [], groups, work, metadata, job_attrs, "analysis")
    log.info(
        "planned %s: %d checkpoints, %s; top_k %d (%d classes), %d parameters",
        path,
        len(files),
        ", ".join(config.analysis.quantities),
        config.analysis.top_k,
        classes,
        size,
    )


def check_same_analysis(path: Path, config: ExperimentConfig) -> None:
    """Fail unless ``path`` was planned from ``config`` (top_k resolved as then) over the
    checkpoints it names now."""
    if not h5py.is_hdf5(path):
        raise UserError(
            f"analysis.output: {path} exists and is not an analysis file; choose another path"
        )
    with SurfaceFile.open(path) as analysis:
        if analysis.kind != "analysis":
            raise UserError(
                f"analysis.output: {path} is a {analysis.kind} file; choose another path"
            )
        attrs = analysis.attrs
        planned = analysis.config.to_dict()
        rows, _ = analysis.group("checkpoints")
    config = resolved_analysis(config, int(attrs["classes"]), int(attrs["parameters"]))
    differences = config_differences(planned, config.to_dict())
    if differences:
        raise UserError(
            f"analysis.output: {path} was planned with a different config (differs in "
            f"{', '.join(differences)}); choose another output path or delete the file"
        )
    planned_files = texts(rows["path"])
    files = [str(file) for file in analysis_checkpoints(config)]
    if files != planned_files:
        raise UserError(
            f"{ANALYSIS_FIELD}: now {len(files)} checkpoints, {path} was planned over "
            f"{len(planned_files)} (training went on?); choose another analysis.output for them"
        )


# The planner of each kind of result file (:attr:`landscape.jobs.JobKind.file`).
PLANNERS = {"surface": plan_surface, "analysis": plan_analysis}
