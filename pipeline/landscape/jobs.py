"""The table of job kinds: what each kind of job computes, at which points, and how.

A job kind is everything the pipeline needs to know about one kind of work over a
surface file: the maps a config may ask for that it computes, the values it stores per
point (each with a trailing shape: ``()`` for one number, ``(k,)`` for top-k
eigenvalues, ``(bins,)`` for a spectral density), the maps derived from those once its
points are in, which points it covers and in which shards, what its done flags record,
its evaluator, its figures and its command. Plan, store, workers, reduce, status, plot
and the command line look a kind up in :data:`JOB_KINDS` and never test its name:
adding a kind is one entry here plus one evaluator. Jobs run in table order.

Evaluators and figures are named as ``"module:attribute"`` strings, resolved on first
use (:func:`resolve`): :mod:`landscape.config` imports this module to check ``maps:``,
while evaluators import the experiment and the config itself: importing them here would
make a cycle (config -> jobs -> evaluators -> config). ``tests/test_jobs.py`` resolves
every name of the table, so a typo fails there, not in a run.

An evaluator is built once per rank, ``factory(experiment, surface, outputs)``, and
called with a batch of K work items (int64 point numbers): it returns
``{output name: array of shape (K,) + output shape}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Evaluator(Protocol):
    """Built once per rank; called with up to ``items_per_call`` work items (K), returns
    ``{output: (K,) + shape}``."""

    items_per_call: int

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Output:
    """One value a job stores per point: a number (``shape == ()``) or an array.
    ``description`` says what it is (estimator, tolerance, known biases); it is stored
    as the map's ``description`` attribute."""

    name: str
    shape: tuple[int, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class DerivedMap:
    """A map computed from other maps, point by point, by reduce once a run ends; ``shape``
    is its trailing shape per point, as for an :class:`Output`, and ``description`` what
    it is. ``on_request``: made only when ``maps:`` lists it (its job then stores its
    ``sources``); otherwise whenever its job runs."""

    name: str
    sources: tuple[str, ...]
    derive: Callable[..., np.ndarray]
    shape: tuple[int, ...] = ()
    description: str = ""
    on_request: bool = False


def eigenvalue_ratio(lambda_min: np.ndarray, lambda_max: np.ndarray) -> np.ndarray:
    """``|lambda_min / lambda_max|`` (Li et al., Fig. 7): near 0 where the loss is locally
    convex, large where negative curvature dominates; NaN where either is unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(lambda_min / lambda_max)


def perplexity(mean_loss: np.ndarray) -> np.ndarray:
    """``exp(L)`` of a mean negative log-likelihood L per unit (token, or sample for class
    labels): the perplexity, the number of equally likely choices the model is as unsure
    as. inf where it overflows float64 (L > 709), NaN where L is unknown."""
    with np.errstate(over="ignore"):
        return np.exp(mean_loss)


@dataclass(frozen=True)
class JobKind:
    """One kind of job. ``config`` arguments are :class:`landscape.config.ExperimentConfig`
    (not imported: see the module docstring); ``grid`` is a :class:`landscape.grid.Grid`.

    - ``maps``: the maps a config may ask for (``maps:``) that this kind computes;
    - ``outputs(config)``: what it stores at each point, in this order;
    - ``derived``: maps reduce derives from the outputs;
    - ``points(config, grid)``: the point numbers it covers; ``shard_size(config, grid)`` how
      many of them make a shard (0: about 64 shards);
    - ``done_attrs(config, dtype)``: attributes of its done flags (what its values mean);
    - ``evaluator`` and ``figures``: ``"module:attribute"`` of the evaluator factory and of
      ``figures(surface, maps, labels) -> {name: Figure}``;
    - ``file``: the kind of result file it works in: ``surface`` (items are grid points)
      or ``analysis`` (items are checkpoints, :mod:`landscape.analysis`).
    """

    name: str
    verb: str
    description: str
    maps: tuple[str, ...]
    outputs: Callable[[Any], tuple[Output, ...]]
    points: Callable[[Any, Any], np.ndarray]
    shard_size: Callable[[Any, Any], int]
    evaluator: str
    figures: str
    derived: tuple[DerivedMap, ...] = ()
    done_attrs: Callable[[Any, Any], dict] = lambda config, dtype: {}
    file: str = "surface"

    def derived_maps(self, config) -> tuple[DerivedMap, ...]:
        """The derived maps this kind makes for ``config``: those it always makes, and
        those on request that ``config.maps`` lists."""
        return tuple(d for d in self.derived if not d.on_request or d.name in config.maps)


def resolve(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names, imported now."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def hessian_done_attrs(config, dtype) -> dict:
    """The convergence criterion, tolerances and method behind the Hessian job's values."""
    return resolve("landscape.hessian:convergence_attrs")(config.hessian, dtype)


LOSS_MAPS = ("train_loss", "train_acc", "test_loss", "test_acc")
HESSIAN_OUTPUTS = tuple(
    Output(name, (), description)
    for name, description in (
        ("lambda_min", "smallest eigenvalue of the training-loss Hessian (done/hessian: method)"),
        ("lambda_max", "largest eigenvalue of the training-loss Hessian (done/hessian: method)"),
        (
            "lambda_min_residual",
            "||H y - theta y|| of lambda_min's Ritz pair, true to within the products' "
            "rounding, rounding_floor x max(|lambda_min|, |lambda_max|) (done/hessian: "
            "rounding_floor, criterion)",
        ),
        (
            "lambda_max_residual",
            "||H y - theta y|| of lambda_max's Ritz pair, true to within the products' "
            "rounding, rounding_floor x max(|lambda_min|, |lambda_max|) (done/hessian: "
            "rounding_floor, criterion)",
        ),
        ("hessian_hvps", "Hessian-vector products spent at the point"),
        ("hessian_converged", "1 where both ends met done/hessian's criterion, else 0"),
    )
)
LOSS_DESCRIPTIONS = {
    "train_loss": "mean loss (evaluation.loss of the config) over the full training set",
    "train_acc": "accuracy over the full training set (per unmasked token for token labels)",
    "test_loss": "mean loss over the full test set",
    "test_acc": "accuracy over the full test set (per unmasked token for token labels)",
}
PERPLEXITY_MAPS = tuple(
    DerivedMap(
        f"{split}_perplexity",
        (f"{split}_loss",),
        perplexity,
        description=f"exp({split}_loss): perplexity per token (per sample for class labels) "
        "of the mean cross-entropy over the full set, token-weighted across batches",
        on_request=True,
    )
    for split in ("train", "test")
)


def loss_outputs(config) -> tuple[Output, ...]:
    """The loss and accuracy maps ``maps:`` lists, in its order, then the loss of each set
    whose perplexity it lists without its loss (the perplexity's source)."""
    names = [name for name in config.maps if name in LOSS_MAPS]
    for derived in PERPLEXITY_MAPS:
        if derived.name in config.maps:
            names += [source for source in derived.sources if source not in names]
    return tuple(Output(name, (), LOSS_DESCRIPTIONS[name]) for name in names)


def density_outputs(prefix: str, operator: str, settings) -> tuple[Output, ...]:
    """What the SLQ of ``operator`` stores per checkpoint (:mod:`landscape.curvature.spectrum`)."""
    probes, steps, points = settings.probes, settings.steps, settings.density_points
    return (
        Output(
            f"{prefix}density_nodes",
            (probes, steps),
            f"stochastic Lanczos quadrature of {operator}: each Rademacher probe's Ritz "
            "values (Lanczos with full reorthogonalization, float64 tridiagonal), ascending; "
            "NaN past the last node of an exhausted Krylov space",
        ),
        Output(
            f"{prefix}density_weights",
            (probes, steps),
            "Gauss quadrature weight of each node (squared first component of its "
            "tridiagonal eigenvector); each probe's sum to 1; moments sum w theta^j are "
            "exact for j <= 2 steps - 1, up to the Hutchinson error of the probe count",
        ),
        Output(
            f"{prefix}density_grid",
            (points,),
            "where the density is evaluated: evenly from 6 broadenings below the smallest "
            "node to 6 above the largest",
        ),
        Output(
            f"{prefix}density",
            (points,),
            f"spectral density of {operator}: every node a Gaussian of width "
            f"{prefix}density_sigma weighted by its weight / probes (integrates to 1); "
            "broadening blurs features narrower than sigma",
        ),
        Output(
            f"{prefix}density_sigma",
            (),
            "the density's Gaussian broadening: the nodes' range / steps",
        ),
    )


def top_outputs(prefix: str, operator: str, settings) -> tuple[Output, ...]:
    """What the top-k Lanczos run of ``operator`` stores per checkpoint."""
    k = settings.top_k
    return (
        Output(
            f"{prefix}top_eigenvalues",
            (k,),
            f"the {k} largest eigenvalues of {operator}, descending (Lanczos, full "
            "reorthogonalization, seeded start)",
        ),
        Output(
            f"{prefix}top_residuals",
            (k,),
            "||M y - theta y|| of each Ritz pair from the products computed: an eigenvalue "
            "lies within it of theta",
        ),
        Output(
            f"{prefix}top_converged",
            (k,),
            f"1 where the residual is <= tolerance {settings.tolerance:g} x the spectral "
            "scale (floored at 16 eps of the products' dtype), else 0",
        ),
    )


def cost_outputs(quantity: str) -> tuple[Output, ...]:
    return (
        Output(
            f"{quantity}_hvps",
            (),
            f"curvature-vector products {quantity} spent (an intermediate that several "
            "quantities use is counted by the first one computed)",
        ),
        Output(f"{quantity}_seconds", (), f"wall-clock seconds {quantity} took at this checkpoint"),
    )


def estimate_outputs(name: str, what: str) -> tuple[Output, ...]:
    return (
        Output(name, (), what),
        Output(f"{name}_se", (), f"standard error of {name} (sample std / sqrt(probes))"),
    )


def analysis_outputs(config) -> tuple[Output, ...]:
    """The values an analysis file stores per checkpoint for ``config.analysis`` (its
    ``top_k`` resolved by the plan): the training loss and accuracy, then each selected
    quantity's values and its cost."""
    settings = config.analysis
    if settings.top_k < 1:
        raise ValueError("analysis_outputs needs analysis.top_k resolved by the plan")
    k = settings.top_k
    chosen = {
        "density": density_outputs("", "H", settings),
        "top_eigenpairs": top_outputs("", "H", settings)
        + (
            Output(
                "outliers",
                (),
                f"eigenvalues above the bulk: c at the largest ratio lambda_c / lambda_c+1 "
                f"among the top {k}, if >= 1 + gap ({settings.gap:g}), else 0 "
                "(landscape.curvature.spectrum.count_outliers)",
            ),
            Output("bulk_edge", (), "lambda_c+1, the top of the bulk under the outliers"),
            Output(
                "outlier_ratios",
                (k,),
                "lambda_i / lambda_i+1, i = 1..k (lambda_k+1 bounded below by the density's nodes)",
            ),
            Output(
                "outliers_saturated",
                (),
                "1 where all top_k eigenvalues are outliers: there may be more; raise top_k",
            ),
        ),
        "gauss_newton": top_outputs("gn_", "G (Gauss-Newton, J^T H_out J)", settings)
        + top_outputs("residual_", "H - G", settings)
        + (
            Output(
                "hg_overlap",
                (k,),
                "overlap (1/j) ||U_j^T V_j||_F^2 of the top-j eigenspaces of H and G, j = 1..k",
            ),
        )
        + density_outputs("gn_", "G", settings)
        + density_outputs("residual_", "H - G", settings),
        "gradient_overlap": (
            Output(
                "gradient_fractions",
                (k,),
                "||P_j g||^2 / ||g||^2: the full-data gradient's share in the span of H's "
                "top-j eigenvectors, j = 1..k (Gur-Ari et al.; Ritz vectors, see top_residuals)",
            ),
            Output("gradient_norm", (), "||g|| of the full-data mean loss"),
        ),
        "trace": estimate_outputs("trace", "tr(H), Hutchinson (Hutch++ with a sketch)")
        + estimate_outputs("frobenius_squared", "||H||_F^2 = mean ||H v||^2 over the probes")
        + estimate_outputs(
            "trace_over_frobenius",
            "tr(H) / ||H||_F, ratio of the two means (delta method; biased by O(1/probes))",
        ),
        "clustering": tuple(
            Output(name, (), f"{what} (Fort & Ganguli Fig. 1, seeded subsample)")
            for name, what in (
                ("same_logit_same_class", "mean cosine of grad z_k for pairs of class k"),
                ("same_logit", "mean cosine of grad z_k over all pairs of samples"),
                ("same_logit_different_class", "mean cosine of grad z_k, pairs of two classes"),
                ("different_logits", "mean cosine of grad z_k and grad z_l, k != l"),
                ("logit_variance", "variance of a sample's logits, mean over samples"),
                ("logit_gradient_norm", "mean ||grad z_k|| over samples and logits"),
                ("weight_norm", "||theta|| of the analysed parameters"),
            )
        ),
    }
    outputs = (
        Output("train_loss", (), "full-training-set mean loss at the checkpoint"),
        Output("train_acc", (), "full-training-set accuracy (NaN for objectives without one)"),
    )
    for quantity in config.analysis.quantities:
        outputs += chosen[quantity] + cost_outputs(quantity)
    return outputs


def analysis_done_attrs(config, dtype) -> dict:
    """The settings behind an analysis file's values (what its estimators were given)."""
    return resolve("landscape.analysis:analysis_attrs")(config.analysis, dtype)


JOB_KINDS: tuple[JobKind, ...] = (
    JobKind(
        name="loss",
        verb="run",
        description="evaluate the pending loss/accuracy points of a surface file",
        maps=LOSS_MAPS + tuple(derived.name for derived in PERPLEXITY_MAPS),
        outputs=loss_outputs,
        points=lambda config, grid: grid.sublattice(1),
        shard_size=lambda config, grid: config.grid.shard_size,
        evaluator="landscape.evaluators:loss_evaluator",
        figures="landscape.plot:loss_job_figures",
        derived=PERPLEXITY_MAPS,
    ),
    JobKind(
        name="hessian",
        verb="hessian",
        description="lambda_min and lambda_max at the pending Hessian points",
        maps=("lambda_min", "lambda_max"),
        # Both ends are always solved for, with how well each converged.
        outputs=lambda config: HESSIAN_OUTPUTS,
        points=lambda config, grid: grid.sublattice(config.hessian.stride),
        shard_size=lambda config, grid: config.hessian.points_per_shard(
            grid.sublattice_row(config.hessian.stride)
        ),
        evaluator="landscape.evaluators:hessian_evaluator",
        figures="landscape.plot:hessian_figures",
        derived=(
            DerivedMap(
                "lambda_ratio",
                ("lambda_min", "lambda_max"),
                eigenvalue_ratio,
                description="|lambda_min / lambda_max| of the stored ends (Li et al. Fig. 7)",
            ),
        ),
        done_attrs=hessian_done_attrs,
    ),
    JobKind(
        name="analysis",
        verb="analyze",
        description="curvature analyses (spectra, outliers, Gauss-Newton split, gradient "
        "subspace, trace, clustering) at each checkpoint of an analysis file",
        maps=(),
        outputs=analysis_outputs,
        points=lambda config, grid: grid.sublattice(1),
        shard_size=lambda config, grid: config.analysis.shard_size,
        evaluator="landscape.analysis:analysis_evaluator",
        figures="landscape.analysis_plot:analysis_figures",
        done_attrs=analysis_done_attrs,
        file="analysis",
    ),
)
JOBS: dict[str, JobKind] = {kind.name: kind for kind in JOB_KINDS}
# Every map a config may ask for, and the kind that computes it.
MAP_KINDS: dict[str, JobKind] = {name: kind for kind in JOB_KINDS for name in kind.maps}
MAP_NAMES = tuple(MAP_KINDS)


def jobs_for(maps: list[str]) -> list[JobKind]:
    """The kinds that compute ``maps``, in table order."""
    return [kind for kind in JOB_KINDS if any(name in kind.maps for name in maps)]
