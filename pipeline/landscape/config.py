"""Schema of an experiment: every field typed and validated at load, errors name the field.

A config is plain YAML mapped onto frozen dataclasses. The parser walks the type hints,
so adding a field is one line here; unknown keys, wrong types and out-of-range values
are rejected with the dotted path of the offending field (``grid.x.num``) and the fix.
Relative paths are resolved against the working directory at load time and stored
absolute, so workers started elsewhere (SLURM, another node) find the same files.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from landscape.curvature import HVP_CHOICES, METHODS, PARAMETER_SELECTIONS
from landscape.errors import UserError
from landscape.grid import SPACINGS, spaced_coordinates
from landscape.jobs import MAP_NAMES, jobs_for

# The largest grid a plan accepts. Every point is a full-data evaluation, and the planner
# holds about seven arrays of the grid's size (maps, flags, times, point numbers) in
# memory: 10^7 points are ~0.5 GB there and 28 GPU-hours at 10 ms a point.
MAX_GRID_POINTS = 10_000_000
# The largest |coordinate| a grid axis accepts. Directions are scaled to the weights (filter,
# layer, weight normalization: coordinate 1 moves each filter or layer by its own norm) or
# have unit length over all parameters (unit, pca, hessian: whose weights' norm is
# sqrt(parameters) x their scale, below 1e4 even for 10^8 parameters of scale 1). Beyond
# 1e6 the weights are a million times their size: the logits overflow float32 and the maps
# are NaN or inf while the points count as done, so such a bound is a typo (1e300), not a
# landscape.
MAX_COORDINATE = 1e6
INT64_RANGE = (-(2**63), 2**63 - 1)


class ConfigError(UserError):
    """A config field is missing, unknown, of the wrong type or out of range."""


def choice(default: str, options: tuple[str, ...]) -> Any:
    """A string field restricted to ``options``."""
    return field(default=default, metadata={"choices": options})


def check_device_name(name: str, where: str) -> None:
    """Refuse at load a device torch cannot parse ('gpu', 'cuda0'): only its availability
    waits for the worker, which may run on another machine than the planner."""
    import torch  # the config module is read before any heavy import

    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{where}: {name!r} is not a device; use auto, cpu or cuda") from None


def path_field(default: str | list | None = None, written_file: bool = False) -> Any:
    """A filesystem path (or a list of them), resolved to absolute paths at load time.
    ``written_file``: a file this tool creates, so a name ending in ``/`` (a folder) is
    refused rather than silently written as a file of the folder's name."""
    metadata = {"path": True, "written_file": written_file}
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class AxisConfig:
    """One grid axis: ``num`` coordinates from ``min`` to ``max`` inclusive, spaced as
    ``spacing`` says (:mod:`landscape.grid`): ``uniform`` (evenly) or ``graded`` (finest
    at 0, which is then a grid point; needs min <= 0 <= max).

    Without ``min`` and ``max`` (PCA directions only) the planner frames the trajectory;
    such an axis is graded unless told otherwise, so that the end of the training path,
    near the minimum at 0, is resolved; an axis with bounds is uniform unless told.
    """

    num: int
    min: float | None = None
    max: float | None = None
    spacing: str | None = field(default=None, metadata={"choices": SPACINGS})

    @property
    def automatic(self) -> bool:
        return self.min is None

    @property
    def spacing_kind(self) -> str:
        """``spacing``, or its default: graded for a framed axis, uniform between bounds."""
        return self.spacing or ("graded" if self.automatic else "uniform")

    def check(self, where: str) -> None:
        if self.num < 2:
            raise ConfigError(f"{where}.num: must be >= 2 (got {self.num}); use at least 2 points")
        if self.num > MAX_GRID_POINTS:
            raise ConfigError(
                f"{where}.num: {self.num} points is more than the {MAX_GRID_POINTS:,} a grid "
                "may have; use a coarser grid"
            )
        if (self.min is None) != (self.max is None):
            raise ConfigError(f"{where}: give both min and max, or neither (PCA framing)")
        if self.automatic:  # the frame has the minimum strictly inside
            self.check_graded_points(where, both_sides=True)
            return
        if self.min >= self.max:
            raise ConfigError(
                f"{where}: min ({self.min}) must be < max ({self.max}); swap or widen the range"
            )
        for bound in ("min", "max"):
            value = getattr(self, bound)
            if abs(value) > MAX_COORDINATE:
                raise ConfigError(
                    f"{where}.{bound}: {value} is beyond +-{MAX_COORDINATE:g}, where the weights "
                    f"are {MAX_COORDINATE:g} times their size and every loss overflows; "
                    "directions are scaled to the weights, so choose bounds like -1 to 1"
                )
        if self.spacing_kind == "graded" and not self.min <= 0 <= self.max:
            raise ConfigError(
                f"{where}.spacing: graded is finest at 0, which lies outside [{self.min}, "
                f"{self.max}]; use uniform or a range that contains 0"
            )
        self.check_graded_points(where, both_sides=self.min < 0 < self.max)
        coordinates = spaced_coordinates(self.min, self.max, self.num, self.spacing_kind)
        if not (np.diff(coordinates) > 0).all():
            raise ConfigError(
                f"{where}: {self.num} points from {self.min} to {self.max} are not distinct in "
                "float64; widen the range or use fewer points"
            )

    def check_graded_points(self, where: str, both_sides: bool) -> None:
        """A graded axis with the minimum strictly inside needs 0 as a third point."""
        if self.spacing_kind == "graded" and both_sides and self.num < 3:
            raise ConfigError(
                f"{where}.num: a graded axis needs >= 3 points (both ends and 0; got "
                f"{self.num}); add points or set {where}.spacing: uniform"
            )


@dataclass(frozen=True)
class GridConfig:
    """The (alpha, beta) grid; a 1D run has no ``y`` axis."""

    x: AxisConfig
    y: AxisConfig | None = None
    shard_size: int = 0

    def check(self, where: str) -> None:
        if self.shard_size < 0:
            raise ConfigError(
                f"{where}.shard_size: must be >= 0 (got {self.shard_size}); 0 picks a size"
            )
        if self.y is not None and self.x.num * self.y.num > MAX_GRID_POINTS:
            raise ConfigError(
                f"{where}.x.num x {where}.y.num: {self.x.num} x {self.y.num} = "
                f"{self.x.num * self.y.num:,} points is more than the {MAX_GRID_POINTS:,} a grid "
                "may have; use a coarser grid"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A zoo name or ``package.module:factory``, its keyword arguments and its checkpoint.

    ``checkpoint_key``: the entry of a checkpoint dict that holds the weights, and
    ``strip_prefix``: the prefix to strip from their keys; both found automatically when
    left out (:mod:`landscape.checkpoint`), and both apply to every checkpoint the run
    reads (model.checkpoint, directions.targets and .checkpoints, analysis.checkpoints).
    """

    name: str
    checkpoint: str | None = path_field()
    kwargs: dict = field(default_factory=dict)
    checkpoint_key: str | None = None
    strip_prefix: str | None = None

    def check(self, where: str) -> None:
        for name in ("checkpoint_key", "strip_prefix"):
            if getattr(self, name) == "":
                raise ConfigError(f"{where}.{name}: empty; leave it out to find it automatically")


@dataclass(frozen=True)
class DataConfig:
    """A built-in data set name or ``package.module:function``, with its keyword arguments.
    For a plug-in that returns ``torch.utils.data.Dataset`` objects (:mod:`landscape.samples`):
    ``stream`` (``auto``: held on the device when the set takes at most a quarter of its
    free memory, streamed otherwise; ``always``; ``never``), the loader's ``workers``
    (``auto``: background processes only where the compute leaves cores to spare, see
    :func:`landscape.samples.auto_workers`; 0 reads in this process) and the messages
    (one or more batches) each reads ahead (``prefetch``)."""

    name: str = "digits"
    kwargs: dict = field(default_factory=dict)
    stream: str = choice("auto", ("auto", "always", "never"))
    workers: int | str = "auto"
    prefetch: int = 2

    def check(self, where: str) -> None:
        if self.workers != "auto" and (isinstance(self.workers, str) or self.workers < 0):
            raise ConfigError(
                f"{where}.workers: must be auto or an integer >= 0 (got {self.workers!r}); "
                "0 reads in this process"
            )
        if self.prefetch < 1:
            raise ConfigError(f"{where}.prefetch: must be >= 1 (got {self.prefetch})")


DIRECTION_KINDS = ("random", "pca", "hessian", "target", "interpolation", "file")
# What each kind's vectors are scaled to when ``normalization`` is not given: random
# directions to the filters of theta (Li et al.), PCA and Hessian eigenvectors to unit
# length (so plot coordinates are distances and curvatures are eigenvalues), and
# checkpoint differences and user files as they are (a = 1 reaches the target).
DEFAULT_NORMALIZATION = {
    "random": "filter",
    "pca": "unit",
    "hessian": "unit",
    "target": "none",
    "interpolation": "none",
    "file": "none",
}
NORMALIZATIONS = ("filter", "layer", "weight", "unit", "none")


@dataclass(frozen=True)
class DirectionsConfig:
    """Which plotting directions and how they are scaled.

    ``random``: seeded Gaussian (Li et al. section 4). ``pca``: the top principal
    directions of the trajectory ``checkpoints`` around model.checkpoint (section 7).
    ``hessian``: eigenvectors of the Hessian at model.checkpoint, lambda_max and
    lambda_min (``eigenvectors: extremes``) or the top two (``top``) (Boettcher &
    Wheeler). ``target``: theta_B - theta_0 for each checkpoint in ``targets``.
    ``interpolation``: (1 - a) theta_0 + a theta_B along one target, BatchNorm running
    statistics included (section 5). ``file``: tensors saved by the user in ``file``.
    """

    kind: str = choice("random", DIRECTION_KINDS)
    normalization: str = field(default="", metadata={"choices": NORMALIZATIONS})
    ignore: str = field(default="", metadata={"choices": ("biasbn", "none")})
    seed: int = 0
    checkpoints: list[str] = path_field([])
    targets: list[str] = path_field([])
    file: str | None = path_field()
    eigenvectors: str = choice("extremes", ("extremes", "top"))

    def __post_init__(self) -> None:
        # Fields left out take the kind's own default (object.__setattr__: frozen class).
        if not self.normalization:
            object.__setattr__(self, "normalization", DEFAULT_NORMALIZATION[self.kind])
        if not self.ignore:  # drawn directions leave 1D tensors out (Li et al.); read ones not
            drawn = self.kind in ("random", "pca", "hessian")
            object.__setattr__(self, "ignore", "biasbn" if drawn else "none")

    def check(self, where: str) -> None:
        needs = {"pca": "checkpoints", "target": "targets", "interpolation": "targets"}
        if self.kind in needs and not getattr(self, needs[self.kind]):
            raise ConfigError(
                f"{where}.{needs[self.kind]}: required for kind {self.kind!r}; "
                "list checkpoint files"
            )
        if self.kind == "file" and self.file is None:
            raise ConfigError(f"{where}.file: required for kind 'file'; name a .pt or .h5 file")
        unit_only = {
            "pca": "orthonormal axes are what makes the projected trajectory exact",
            "hessian": "a rescaled eigenvector is no eigenvector: the plane's curvatures would "
            "not be its eigenvalues; for Li et al.'s filter scaling use kind: random",
        }
        if self.kind in unit_only and self.normalization != "unit":
            raise ConfigError(
                f"{where}.normalization: {self.kind} directions must stay 'unit' "
                f"({unit_only[self.kind]})"
            )
        if self.kind == "interpolation" and (self.normalization != "none" or self.ignore != "none"):
            raise ConfigError(
                f"{where}: interpolation moves every parameter and BatchNorm statistic from "
                "theta_0 to the target; set normalization: none and ignore: none"
            )


@dataclass(frozen=True)
class EvaluationConfig:
    """How each grid point is evaluated: batch size only changes speed, never the value.
    ``points_per_pass``: loss-map points per forward pass (0: from free memory on a GPU
    where vmap groups no convolution, else one; 1: one at a time; more than 1 may change
    the last bits of the loss, :mod:`landscape.evaluators`).
    ``loss``: a built-in objective or ``package.module:name``, built with ``loss_kwargs``
    (:mod:`landscape.objectives`).

    ``dtype`` ``bfloat16`` or ``float16``: the loss maps' forward passes run under
    ``torch.autocast`` in that dtype, parameters and data stay float32 and each unit's
    loss is taken in float32; curvature (Hessian, trace, analysis) stays in float32
    (:mod:`landscape.precision`). ``tf32``: CUDA matmuls and convolutions in TF32 (10
    mantissa bits; off by default, so float32 is IEEE float32). ``channels_last``: image
    batches (B, C, H, W) in channels-last memory. ``compile``: ``torch.compile`` the loss
    maps' forward pass, eager (one log line) where compiling fails."""

    batch_size: int = 1024
    device: str = "auto"
    dtype: str = choice("float32", ("float32", "float64", "bfloat16", "float16"))
    loss: str = "cross_entropy"
    loss_kwargs: dict = field(default_factory=dict)
    threads: int = 0
    points_per_pass: int = 0
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False

    def check(self, where: str) -> None:
        from landscape.objectives import check_spec  # torch, only once a config is read

        try:
            check_spec(self.loss, self.loss_kwargs, where)
        except UserError as exc:  # a config error like any other (a stored config's too)
            raise ConfigError(str(exc)) from None
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1 (got {self.batch_size})")
        if self.threads < 0:
            raise ConfigError(f"{where}.threads: must be >= 0 (got {self.threads}); 0 = default")
        if self.points_per_pass < 0:
            raise ConfigError(
                f"{where}.points_per_pass: must be >= 0 (got {self.points_per_pass}); "
                "0 = from memory, 1 = one point at a time"
            )
        check_device_name(self.device, f"{where}.device")


@dataclass(frozen=True)
class HessianConfig:
    """The extreme Hessian eigenvalues at grid points (Li et al. 2018, section 6).

    Each end is converged when its Ritz residual ||H y - theta y|| (from the products
    Lanczos kept, or one explicit HVP near the bound) is at most ``tolerance`` times
    max(|lambda_min|, |lambda_max|) (an eigenvalue lies within the residual of its Ritz
    value; the scale never vanishes, unlike |lambda_min| at a semidefinite point).
    ``tolerance`` is floored at 16 machine epsilons of evaluation.dtype (float32 for
    bfloat16 and float16, which only the loss maps use), the precision of a product.
    ``max_hvps`` bounds the Lanczos steps per point, and so its basis and the products
    kept (2 x max_hvps x parameters x 8 bytes).

    ``hvp``: how a product is differentiated; ``auto`` takes the mode measured faster on
    the device's type (double backward on CPUs, forward over reverse on CUDA:
    ``landscape.curvature.AUTOMATIC_HVP_MODE`` gives the figures). A rule, not a timing
    at run time, so every rank and resume differentiates alike. The other mode is taken
    only where the model cannot run this one.

    ``warm_start`` (Lanczos): each point of a shard after its first starts from the
    previous point's Ritz vectors of both ends, which neighbouring points nearly share
    (the same convergence test, fewer HVPs: ResNet-20 on digits at the demo grid's
    spacing, a median 12 per point against 18, benchmarks/warm_bench.py; the gain shrinks
    as points lie further apart); the first point of every shard, and every
    point with ``warm_start: false``, from the vector ``seed`` draws. ``shard_size``: the
    Hessian points per shard, fixed at plan time; 0 takes one row of the Hessian grid,
    the run of neighbours warm starts chain along.
    """

    parameters: str = choice("all", PARAMETER_SELECTIONS)
    method: str = choice("lanczos", METHODS)
    hvp: str = choice("auto", HVP_CHOICES)
    tolerance: float = 1e-3
    max_hvps: int = 400
    stride: int = 1
    shard_size: int = 0
    seed: int = 0
    warm_start: bool = True

    def check(self, where: str) -> None:
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"{where}.tolerance: must be in (0, 1) (got {self.tolerance})")
        if self.max_hvps < 4:
            raise ConfigError(f"{where}.max_hvps: must be >= 4 (got {self.max_hvps})")
        if self.stride < 1:
            raise ConfigError(f"{where}.stride: must be >= 1 (got {self.stride})")
        if self.shard_size < 0:
            raise ConfigError(
                f"{where}.shard_size: must be >= 0 (got {self.shard_size}); 0 takes a row of "
                "the Hessian grid"
            )

    def points_per_shard(self, row: int) -> int:
        """``shard_size``, or for 0 one row of the Hessian grid (``row`` points,
        :meth:`landscape.grid.Grid.sublattice_row`). A row is the longest run of
        consecutive Hessian points that are all neighbours (the next row starts at the far
        side), so warm starts chain along all of it; rows remain as many shards as the
        grid has rows, for ranks to share."""
        return self.shard_size or row


@dataclass(frozen=True)
class TraceConfig:
    """Curvature at model.checkpoint over the parameters ``hessian.parameters`` selects:
    tr(H) by Hutchinson (``samples`` HVPs) beside n x the mean second difference of the
    loss along ``samples`` random unit directions (Boettcher & Wheeler, 2 * samples + 1
    losses, evaluated by a float64 copy of the model). ``step``: the second difference's
    step e along each unit direction, as a fraction of the selected parameters' norm.

    The default 1e-2 was measured (64-400 samples, float32 configs, float64 losses):
    on a smooth tanh MLP (n = 303) the estimate is 7.1200, 7.1200, 7.1201, 7.1203,
    7.1223 at steps 1e-4, 1e-3, 3e-3, 1e-2, 3e-2 against a dense tr(H) of 7.186
    (interval +-0.35), so truncation costs < 0.03% up to 3e-2. On kinked networks the
    step sets what is measured, and small steps make the kinks rare large samples of
    either sign: the demo ResNet-20 (ReLU, Hutchinson 1.58 +- 0.15) gives -15.1 +- 8.6,
    -6.1 +- 1.9, 2.24 +- 0.39, 3.31 +- 0.21 at 1e-5, 1e-4, 1e-3, 1e-2. 1e-2 is the
    largest step measured free of truncation on the smooth net and the one with the
    tightest interval on the kinked one. (With float32 losses, the old route, 1e-3 was
    biased by +0.45 on the demo and smaller steps were unusable.)
    """

    samples: int = 64
    step: float = 1e-2
    confidence: float = 0.95
    seed: int = 0

    def check(self, where: str) -> None:
        if self.samples < 2:
            raise ConfigError(f"{where}.samples: must be >= 2 (got {self.samples})")
        if not 0 < self.step < 1:
            raise ConfigError(f"{where}.step: must be in (0, 1) (got {self.step})")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"{where}.confidence: must be in (0, 1) (got {self.confidence})")


# The analyses `landscape analyze` can compute at each checkpoint (analysis.quantities),
# in the order they are computed; see landscape.analysis for what each one stores.
ANALYSIS_QUANTITIES = (
    "density",
    "top_eigenpairs",
    "gauss_newton",
    "gradient_overlap",
    "trace",
    "clustering",
)


@dataclass(frozen=True)
class AnalysisConfig:
    """Curvature analyses at each checkpoint of ``checkpoints`` (default: model.checkpoint;
    globs expand in natural order, so ``epoch_*.pt`` is a training run), over the full
    training set, into the analysis file ``output`` (``landscape analyze``). Sagun et al.
    2017 and Fort & Ganguli 2019; :mod:`landscape.analysis` says what each quantity stores.

    ``density``: stochastic Lanczos quadrature, ``probes`` Rademacher probes x ``steps``
    Lanczos steps (the basis, steps x parameters float64, must fit the device), drawn on
    ``density_points`` points. ``top_eigenpairs``: the ``top_k`` largest eigenvalues (0:
    classes + 2) to ``tolerance`` within ``max_hvps`` products, and the outliers above
    the bulk by the largest relative gap of at least ``gap`` (its edge from the density's
    nodes, so the density is computed for it too). ``gauss_newton``: the same for G and
    H - G, and the overlap of H's and G's top-k eigenspaces. ``gradient_overlap``: the
    full gradient's share in H's top-j eigenspaces, j = 1..top_k. ``trace``: tr(H) and
    ||H||_F^2 from ``trace_samples`` Rademacher probes (Hutch++ with a ``trace_sketch``
    column sketch when > 0) with ``confidence`` intervals. ``clustering``: logit-gradient
    cosines on ``clustering_samples`` seeded training samples. ``seed`` seeds every probe
    and start vector: equal seeds give equal numbers wherever they run.
    """

    output: str | None = path_field(written_file=True)
    checkpoints: list[str] = path_field([])
    quantities: list[str] = field(default_factory=lambda: list(ANALYSIS_QUANTITIES))
    parameters: str = choice("all", PARAMETER_SELECTIONS)
    hvp: str = choice("auto", HVP_CHOICES)
    probes: int = 8
    steps: int = 64
    density_points: int = 512
    top_k: int = 0
    gap: float = 0.5
    tolerance: float = 1e-3
    max_hvps: int = 300
    trace_samples: int = 64
    trace_sketch: int = 0
    confidence: float = 0.95
    clustering_samples: int = 256
    shard_size: int = 1
    seed: int = 0

    def check(self, where: str) -> None:
        if self.output is None:
            raise ConfigError(f"{where}.output: required; name the analysis file (e.g. an.h5)")
        unknown = [name for name in self.quantities if name not in ANALYSIS_QUANTITIES]
        if unknown or not self.quantities:
            raise ConfigError(
                f"{where}.quantities: {', '.join(unknown) or 'empty'}; choose from "
                + ", ".join(ANALYSIS_QUANTITIES)
            )
        repeated = sorted({q for q in self.quantities if self.quantities.count(q) > 1})
        if repeated:
            raise ConfigError(f"{where}.quantities: {', '.join(repeated)} listed twice")
        minimum = {
            "probes": 1,
            "steps": 2,
            "density_points": 16,
            "top_k": 0,
            "max_hvps": 4,
            "trace_samples": 2,
            "trace_sketch": 0,
            "clustering_samples": 2,
            "shard_size": 1,
        }
        for name, least in minimum.items():
            if getattr(self, name) < least:
                raise ConfigError(f"{where}.{name}: must be >= {least} (got {getattr(self, name)})")
        if self.top_k and self.max_hvps < self.top_k:
            raise ConfigError(
                f"{where}.max_hvps: {self.max_hvps} products cannot find top_k = {self.top_k} "
                "eigenpairs; raise max_hvps"
            )
        if not self.gap > 0:
            raise ConfigError(f"{where}.gap: must be > 0 (got {self.gap}); 0.5 is measured")
        for name in ("tolerance", "confidence"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be in (0, 1) (got {getattr(self, name)})")


@dataclass(frozen=True)
class TrainConfig:
    """Plain supervised training that leaves one checkpoint per epoch (a trajectory)."""

    checkpoint_dir: str = path_field()
    optimizer: str = choice("sgd", ("sgd", "adam"))
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 10
    schedule: str = choice("cosine", ("constant", "step", "cosine"))
    step_epochs: list[int] = field(default_factory=list)
    gamma: float = 0.1
    seed: int = 0
    device: str = "auto"

    def check(self, where: str) -> None:
        if self.checkpoint_dir is None:
            raise ConfigError(f"{where}.checkpoint_dir: required; name a folder for checkpoints")
        for name in ("lr", "epochs", "batch_size", "gamma"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0 (got {getattr(self, name)})")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{where}.momentum: must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: must be >= 0 (got {self.weight_decay})")
        check_device_name(self.device, f"{where}.device")
        outside = [e for e in self.step_epochs if not 0 < e < self.epochs]
        if outside:  # a step at epoch <= 0 decays from the start, one >= epochs never comes
            raise ConfigError(
                f"{where}.step_epochs: {outside} outside 1..{self.epochs - 1} (the 0-based "
                "epochs at which the learning rate drops); give epochs within the run"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError(
                f"{where}.nesterov: needs optimizer sgd with momentum > 0; set nesterov: false"
            )


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: what to load, which directions, which grid, which maps, where to write."""

    model: ModelConfig
    output: str | None = path_field(written_file=True)
    data: DataConfig = field(default_factory=DataConfig)
    directions: DirectionsConfig = field(default_factory=DirectionsConfig)
    grid: GridConfig | None = None
    maps: list[str] = field(default_factory=lambda: ["train_loss", "train_acc"])
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    train: TrainConfig | None = None
    analysis: AnalysisConfig | None = None

    @property
    def jobs(self) -> list[str]:
        """The job kinds this config's maps need, in the table's order (the order they run)."""
        return [kind.name for kind in jobs_for(self.maps)]

    @property
    def surface_maps(self) -> list[str]:
        """The maps a surface of this config computes: ``maps``, or none without a grid
        (an analysis-only config, whose default ``maps`` nothing computes: an objective
        without accuracy, mse, must not be refused for the default ``train_acc``)."""
        return self.maps if self.grid is not None else []

    def check(self, where: str) -> None:
        self.check_directions_fit_grid()
        for name in self.maps:
            if name not in MAP_NAMES:
                raise ConfigError(f"maps: unknown map {name!r}; choose from {', '.join(MAP_NAMES)}")
        if not self.maps:
            raise ConfigError("maps: empty; list at least one of " + ", ".join(MAP_NAMES))
        repeated = sorted({name for name in self.maps if self.maps.count(name) > 1})
        if repeated:
            raise ConfigError(f"maps: {', '.join(repeated)} listed twice; list each map once")
        from landscape.objectives import BUILT_IN, build_objective, check_metric_maps  # torch

        loss = self.evaluation.loss
        if loss in BUILT_IN:  # a plug-in's metrics are known once it is built
            try:
                objective = build_objective(loss, self.evaluation.loss_kwargs)
                check_metric_maps(objective, loss, self.surface_maps)
            except UserError as exc:
                raise ConfigError(str(exc)) from None

    def check_directions_fit_grid(self) -> None:
        if self.grid is None:
            return
        kind, axes = self.directions.kind, [self.grid.x] + ([self.grid.y] if self.grid.y else [])
        if kind != "pca" and any(axis.automatic for axis in axes):
            raise ConfigError(
                "grid: min and max are required (only pca directions frame their trajectory)"
            )
        if kind == "interpolation" and len(axes) != 1:
            raise ConfigError("grid.y: interpolation is 1D; drop grid.y (or use kind: target)")
        if kind == "target" and len(self.directions.targets) != len(axes):
            raise ConfigError(
                f"directions.targets: {len(self.directions.targets)} given for a "
                f"{len(axes)}D grid; give one target checkpoint per axis"
            )

    def require_surface(self) -> None:
        """Fail unless the fields a surface run needs are present."""
        if self.grid is None:
            raise ConfigError(
                "grid: required to plan a surface; add grid.x (and grid.y for 2D); for the "
                "analysis: section run `landscape analyze CONFIG`"
            )
        if self.output is None:
            raise ConfigError("output: required; name the surface file to write (e.g. out.h5)")
        if self.model.checkpoint is None:
            raise ConfigError("model.checkpoint: required; name the trained checkpoint file")

    def require_analysis(self) -> AnalysisConfig:
        """The analysis section, once the fields an analysis needs are known present."""
        if self.analysis is None:
            raise ConfigError(
                "analysis: section missing; add analysis.output (and checkpoints, quantities)"
            )
        if not self.analysis.checkpoints and self.model.checkpoint is None:
            raise ConfigError(
                "analysis.checkpoints: none given and no model.checkpoint; list the checkpoints"
            )
        return self.analysis

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment config file, after ``key.path=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror}); check the path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); give a YAML config"
        ) from None
    return parse_config(text, source=str(path), overrides=overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the
    last silently, so a second ``grid:`` pasted below the first would replace it unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """YAML text as Python values (safe tags only, every key once)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_config(
    text: str, source: str = "<config>", overrides: list[str] = ()
) -> ExperimentConfig:
    """Validate YAML text into an :class:`ExperimentConfig`."""
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{source}: not valid YAML ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level")
    for override in overrides:
        apply_override(data, override)
    return _build(ExperimentConfig, data, "")


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a raw config dict; the value is read as YAML (``5``, ``[1, 2]``)."""
    key, sep, text = override.partition("=")
    *parents, leaf = key.split(".")
    if not sep or not all(parents + [leaf]):
        raise ConfigError(f"--set {override!r}: expected key.path=value, e.g. grid.x.num=11")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    try:
        node[leaf] = read_yaml(text)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"--set {override!r}: the value is not YAML ({reason}); write e.g. 5, [1, 2] "
            'or "quoted text"'
        ) from None


# How a streamed set is read: nothing computed depends on it (streamed maps equal held
# ones bit for bit), so a plan of an existing file does not compare it (the file's own
# setting is the one its jobs run with).
HOW_DATA_ARE_READ = ("data.workers", "data.prefetch")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the fields whose values differ between two config dicts, but for
    :data:`HOW_DATA_ARE_READ`."""
    keys = sorted(set(old) | set(new))
    diffs = []
    for key in keys:
        where = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, where + ".")
        elif a != b and where not in HOW_DATA_ARE_READ:
            diffs.append(where)
    return diffs


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{where}{key}: unknown field; valid fields here are {', '.join(fields)}"
            )
    values = {}
    for name, spec in fields.items():
        path = f"{where}{name}"
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required field is missing; add it to the config")
            continue
        values[name] = _convert(hints[name], data[name], path, spec.metadata)
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(where.rstrip("."))
    return obj


def _convert(hint: Any, value: Any, path: str, metadata: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        # A value of one of the types is read as that type (int | str: 2 or auto); any
        # other as the first, whose error says what was expected.
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        fitting = [a for a in options if _is_a(value, a)]
        return _convert((fitting or options)[0], value, path, metadata)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of fields, got {value!r}")
        return _build(hint, value, path + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{path}[{i}]", metadata) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return _finite_float(value, path)
    if not _is_a(value, hint):
        raise ConfigError(
            f"{path}: expected {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    if hint is int and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ConfigError(f"{path}: {value} does not fit in a 64-bit integer; give a smaller value")
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(metadata['choices'])}")
    if metadata.get("path"):
        return _absolute_path(value, path, metadata["written_file"])
    return value


def _is_a(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the field type ``hint`` (YAML's true is no integer)."""
    kind = typing.get_origin(hint) or hint
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _absolute_path(value: str, path: str, written_file: bool) -> str:
    """``value`` made absolute, symlinks resolved, so workers elsewhere find the same file."""
    if written_file and value.endswith(("/", "/.")):
        raise ConfigError(f"{path}: {value} names a folder; name the file to write (e.g. out.h5)")
    try:
        return str(Path(value).expanduser().resolve())
    except RuntimeError:  # Python < 3.13 reports a symlink loop so
        raise ConfigError(f"{path}: {value} is a symlink loop; point it at a real file") from None


def _finite_float(value: int | float | str, path: str) -> float:
    """``value`` as a finite float: NaN and infinity make no sense in any field (a bound,
    a rate, a tolerance), and would pass every range check (NaN compares false)."""
    try:
        number = float(value)  # YAML 1.1 reads 1e-3 as a string
    except ValueError:
        raise ConfigError(f"{path}: expected float, got {value!r} (str)") from None
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{path}: must be a finite number (got {value!r})")
    return number
