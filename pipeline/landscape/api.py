"""The tool from Python: plan, run and read a surface file from a notebook or a script.

    from landscape import api

    config = api.load_config("configs/demo.yaml", ["grid.x.num=11", "grid.y.num=11"])
    path = api.plan(config)                   # the surface file (an existing one is checked)
    api.run(path)                             # the loss and accuracy maps
    api.run(path, job="hessian")              # lambda_min, lambda_max (if the maps ask)
    result = api.read(path)
    result.maps["train_loss"]                 # (ny, nx) float64, NaN where not yet computed
    api.plot(path, "figures/")

    analysis = api.analyze("configs/analysis_digits.yaml")   # an analysis: section
    api.read(analysis).maps["top_eigenvalues"]   # (checkpoints, top_k)

Each function does what the ``landscape`` command of the same name does, in this process
(one rank: for several, ``mpirun -n N landscape run``), with the same files, locks and
resume; where the command prints a one-line error, these raise
:class:`landscape.errors.UserError` with that line. Nothing here computes: the modules
named in each docstring do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from landscape.config import ExperimentConfig, load_config
from landscape.grid import Grid
from landscape.jobs import JOB_KINDS
from landscape.plan import plan_analysis, plan_surface
from landscape.reduce import reduce
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.trace import estimate_trace
from landscape.train import train
from landscape.workers import run_job

__all__ = [
    "Result",
    "analyze",
    "load_config",
    "plan",
    "plot",
    "read",
    "reduce",
    "run",
    "status",
    "trace",
    "train",
]

# The job `landscape run` computes (loss and accuracy), api.run's default.
LOSS_JOB = next(kind.name for kind in JOB_KINDS if kind.verb == "run")
ANALYSIS_JOB = next(kind.name for kind in JOB_KINDS if kind.file == "analysis")


def plan(config: ExperimentConfig | str | Path, overrides: list[str] = ()) -> Path:
    """``landscape plan``: the surface file of ``config`` (a loaded config, or the path of
    a YAML file with ``key.path=value`` overrides), created or, if it exists, checked
    against the config and checkpoint (:mod:`landscape.plan`). Returns its path."""
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config file; pass its path, or change the config")
    return plan_surface(config)


def analyze(
    config: ExperimentConfig | str | Path,
    overrides: list[str] = (),
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """``landscape analyze CONFIG``: plan (or check) the analysis file of ``config``'s
    ``analysis:`` section, then compute every pending checkpoint (:mod:`landscape.analysis`).
    ``config`` and ``overrides`` as for :func:`plan`. Returns the analysis file's path."""
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config file; pass its path, or change the config")
    path = plan_analysis(config)
    run_job(path, ANALYSIS_JOB, device=device, show_progress=progress)
    return path


def run(
    path: str | Path, job: str = LOSS_JOB, device: str | None = None, progress: bool = True
) -> int:
    """``landscape run`` (``job="loss"``) or ``landscape hessian`` (``job="hessian"``): every
    pending point of the job, then reduce (:mod:`landscape.workers`). Returns the number
    of points computed (0 when all were done: a second call resumes, it never repeats)."""
    return run_job(path, job, device=device, show_progress=progress)


def trace(path: str | Path, device: str | None = None) -> str:
    """``landscape trace``: tr(H) by Hutchinson and n x the mean second difference of the
    loss at the plan's centre, stored in the file (:mod:`landscape.trace`); returns the
    summary the command prints."""
    return estimate_trace(path, device)


def status(path: str | Path) -> str:
    """``landscape status``: what the file holds now, as the command prints it."""
    return surface_status(path)


def plot(path: str | Path, folder: str | Path | None = None) -> list[Path]:
    """``landscape plot``: every figure the file supports, PNG and PDF, into ``folder``
    (default ``<stem>_plots`` beside the file); returns the files written. Leaves
    matplotlib's backend as it is, so a notebook keeps its inline one."""
    from landscape.plot import plot_surface_file  # matplotlib only for those who draw

    return plot_surface_file(path, folder)


@dataclass(frozen=True)
class Result:
    """Everything a surface file holds for analysis, read into memory (the file is closed
    again, so a job may go on writing it).

    ``maps[name][j, i]`` is the value at ``(grid.x[i], grid.y[j])`` (``maps[name][i]`` on a
    1D grid), NaN where the job has not reached the point; ``done[job]`` has the same
    shape and says which points a job finished. ``labels`` are the axis titles the figures
    use; ``attrs`` the file's own attributes (checkpoint hash, model, data set, plan id);
    ``groups`` the extra groups a plan or command added (``trajectory``, ``endpoints``,
    ``trace``; an analysis file's ``checkpoints``: path, sha256, epoch), each as
    (datasets, attributes). An analysis file's grid numbers its checkpoints.
    """

    path: Path
    config: ExperimentConfig
    grid: Grid
    maps: dict[str, np.ndarray]
    done: dict[str, np.ndarray]
    labels: list[str]
    attrs: dict
    groups: dict[str, tuple[dict, dict]]


EXTRA_GROUPS = ("trajectory", "endpoints", "trace", "checkpoints")


def read(path: str | Path) -> Result:
    """The surface file at ``path``, read without a lock (as ``landscape status`` reads it),
    so it works while a job is running."""
    with SurfaceFile.open(path) as surface:
        groups = {name: surface.group(name) for name in EXTRA_GROUPS}
        return Result(
            path=Path(path),
            config=surface.config,
            grid=surface.grid,
            maps=surface.maps(),
            done={job: surface.done(job) for job in surface.jobs},
            labels=surface.axis_labels(),
            attrs=surface.attrs,
            groups={name: group for name, group in groups.items() if group is not None},
        )
