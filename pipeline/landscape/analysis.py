"""The analysis job: the Hessian's spectrum and what lives in it, at each checkpoint of a
list (Sagun et al. 2017; Fort & Ganguli 2019), into one analysis file.

Layout of an analysis file (a result file of kind ``analysis``, :mod:`landscape.store`)::

    /checkpoints/path|sha256|epoch   one row per checkpoint, in order (epoch -1 where
                                     the checkpoint records none); attrs classes (C),
                                     parameters (P, the analysed ones)
    /grid/x                          0 .. n-1: the item number of each checkpoint
    /maps/<output>                   (n,) + the output's trailing shape, NaN until
                                     computed; attrs description
    /done|finished|points|shards/analysis   the work table over checkpoints; done's
                                     attrs: every estimator setting (analysis_attrs)

The outputs of each quantity are :func:`landscape.jobs.analysis_outputs`. The math is in
:mod:`landscape.curvature`, which knows no file: this module loads a checkpoint, builds
the operators of its training loss (the Hessian H, the Gauss-Newton G and H - G, over
``analysis.parameters``) and hands them over. Intermediates several quantities share
(H's top-k eigenpairs for the outliers, the gradient overlap and the H/G overlap; the
density for the outliers' bulk edge) are computed once per checkpoint, when first
needed, and their products counted against that quantity.

Every probe and start vector is seeded (``analysis.seed``): a checkpoint's values do not
depend on the rank that computes it, the order, or a resume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch

from landscape.checkpoint import check_compatible, load_state_dict, verify_fingerprint
from landscape.config import AnalysisConfig
from landscape.curvature.clustering import logit_gradient_clustering
from landscape.curvature.lanczos import Criterion, RitzPairs, check_basis_memory
from landscape.curvature.operators import (
    DifferenceOperator,
    GaussNewtonOperator,
    HessianOperator,
    select_parameters,
)
from landscape.curvature.spectrum import (
    GRID_MARGIN,
    SpectralQuadrature,
    count_outliers,
    stochastic_lanczos_quadrature,
    top_eigenpairs,
)
from landscape.curvature.subspace import subspace_overlap, top_subspace_fractions
from landscape.curvature.trace import trace_and_frobenius
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.store import SurfaceFile, texts

CHECKPOINT_FIELD = "analysis.checkpoints"


def analysis_attrs(settings: AnalysisConfig, dtype: torch.dtype) -> dict:
    """What an analysis file's values were computed with, for its done flags' attributes."""
    criterion = Criterion.for_dtype(settings.tolerance, dtype)
    return {
        "quantities": list(settings.quantities),
        "parameters": settings.parameters,
        "hvp_dtype": str(dtype).removeprefix("torch."),
        "criterion": Criterion.TEXT,
        "tolerance": criterion.tolerance,
        "rounding_floor": criterion.floor,
        "probes": settings.probes,
        "steps": settings.steps,
        "top_k": settings.top_k,
        "gap": settings.gap,
        "max_hvps": settings.max_hvps,
        "trace_samples": settings.trace_samples,
        "trace_sketch": settings.trace_sketch,
        "confidence": settings.confidence,
        "clustering_samples": settings.clustering_samples,
        "seed": settings.seed,
        "slq_error": "moments tr(H^j)/n, j <= 2 steps - 1, are exact per probe; their mean "
        "has the Hutchinson variance (2/n^2)(||H^j||_F^2 - sum_i (H^j)_ii^2) / probes",
    }


class Operators:
    """The curvature operators of one experiment's training loss over the analysed
    parameters, at the model's current weights (loading a checkpoint moves them all)."""

    def __init__(self, experiment: Experiment, settings: AnalysisConfig):
        self.names = select_parameters(experiment.model, settings.parameters)
        common = (
            experiment.model,
            self.names,
            experiment.data.split("train"),
            experiment.objective,
            experiment.config.evaluation.batch_size,
            settings.hvp,
        )
        self.hessian = HessianOperator(*common)
        self.gauss_newton = self.residual = None
        if "gauss_newton" in settings.quantities:
            self.gauss_newton = GaussNewtonOperator(*common)
            self.residual = DifferenceOperator(self.hessian, self.gauss_newton)

    @property
    def size(self) -> int:
        return self.hessian.shape[0]

    def products(self) -> int:
        """Curvature-vector products so far (an H - G product is one of each)."""
        return self.hessian.hvps + (self.gauss_newton.hvps if self.gauss_newton else 0)


class CheckpointAnalysis:
    """The analyses at the checkpoint the model holds now: each intermediate is computed
    once, when a quantity first asks for it."""

    def __init__(self, experiment: Experiment, operators: Operators, settings: AnalysisConfig):
        self.experiment = experiment
        self.operators = operators
        self.settings = settings

    def spectrum(self, operator) -> SpectralQuadrature:
        settings = self.settings
        return stochastic_lanczos_quadrature(
            operator.hvp,
            self.operators.size,
            settings.probes,
            settings.steps,
            settings.seed,
            operator.torch_dtype,
            self.experiment.device,
        )

    def top(self, operator) -> RitzPairs:
        settings = self.settings
        return top_eigenpairs(
            operator.hvp,
            self.operators.size,
            settings.top_k,
            settings.tolerance,
            settings.max_hvps,
            settings.seed,
            operator.torch_dtype,
            self.experiment.device,
        )

    @cached_property
    def hessian_spectrum(self) -> SpectralQuadrature:
        return self.spectrum(self.operators.hessian)

    @cached_property
    def hessian_top(self) -> RitzPairs:
        return self.top(self.operators.hessian)

    @cached_property
    def gauss_newton_top(self) -> RitzPairs:
        return self.top(self.operators.gauss_newton)

    def density(self) -> dict:
        return density_values("", self.hessian_spectrum, self.settings)

    def top_eigenpairs(self) -> dict:
        found = count_outliers(self.hessian_top.values, self.hessian_spectrum, self.settings.gap)
        return {
            **top_values("", self.hessian_top),
            "outliers": found.count,
            "bulk_edge": found.edge,
            "outlier_ratios": found.ratios,
            "outliers_saturated": float(found.saturated),
        }

    def gauss_newton(self) -> dict:
        operators, settings = self.operators, self.settings
        h, g = self.hessian_top.vectors, self.gauss_newton_top.vectors
        overlaps = [subspace_overlap(h[:j].T, g[:j].T) for j in range(1, settings.top_k + 1)]
        return {
            **top_values("gn_", self.gauss_newton_top),
            **top_values("residual_", self.top(operators.residual)),
            "hg_overlap": np.asarray(overlaps),
            **density_values("gn_", self.spectrum(operators.gauss_newton), settings),
            **density_values("residual_", self.spectrum(operators.residual), settings),
        }

    def gradient_overlap(self) -> dict:
        gradient = self.operators.hessian.gradient()
        return {
            "gradient_fractions": top_subspace_fractions(gradient, self.hessian_top.vectors.T),
            "gradient_norm": float(gradient.norm()),
        }

    def trace(self) -> dict:
        settings = self.settings
        found = trace_and_frobenius(
            self.operators.hessian,
            settings.trace_samples,
            settings.seed,
            settings.confidence,
            settings.trace_sketch,
        )
        return {
            "trace": found.trace.mean,
            "trace_se": found.trace.standard_error,
            "frobenius_squared": found.frobenius_squared.mean,
            "frobenius_squared_se": found.frobenius_squared.standard_error,
            "trace_over_frobenius": found.ratio.value,
            "trace_over_frobenius_se": found.ratio.standard_error,
        }

    def clustering(self) -> dict:
        found = logit_gradient_clustering(
            self.experiment.model,
            self.operators.names,
            self.experiment.data.split("train"),
            self.settings.clustering_samples,
            self.settings.seed,
        )
        return {
            name: getattr(found, name)
            for name in (
                "same_logit_same_class",
                "same_logit",
                "same_logit_different_class",
                "different_logits",
                "logit_variance",
                "logit_gradient_norm",
                "weight_norm",
            )
        }


def density_values(prefix: str, quadrature: SpectralQuadrature, settings: AnalysisConfig) -> dict:
    """A quadrature as the outputs of :func:`landscape.jobs.density_outputs`: nodes and
    weights padded to ``steps`` (NaN nodes, zero weights: an operator with fewer
    parameters than steps, or an exhausted Krylov space) and the density on
    ``density_points`` points from GRID_MARGIN broadenings below the smallest node to as
    far above the largest."""
    shape = (settings.probes, settings.steps)
    nodes, weights = np.full(shape, np.nan), np.zeros(shape)
    columns = quadrature.nodes.shape[1]
    nodes[:, :columns], weights[:, :columns] = quadrature.nodes, quadrature.weights
    sigma = quadrature.broadening()
    low, high = quadrature.span()
    grid = np.linspace(
        low - GRID_MARGIN * sigma, high + GRID_MARGIN * sigma, settings.density_points
    )
    return {
        f"{prefix}density_nodes": nodes,
        f"{prefix}density_weights": weights,
        f"{prefix}density_grid": grid,
        f"{prefix}density": quadrature.density(grid, sigma),
        f"{prefix}density_sigma": sigma,
    }


def top_values(prefix: str, pairs: RitzPairs) -> dict:
    """Ritz pairs as the outputs of :func:`landscape.jobs.top_outputs`."""
    return {
        f"{prefix}top_eigenvalues": pairs.values,
        f"{prefix}top_residuals": pairs.residuals,
        f"{prefix}top_converged": pairs.pair_converged.astype(np.float64),
    }


QUANTITIES: dict[str, Callable[[CheckpointAnalysis], dict]] = {
    "density": CheckpointAnalysis.density,
    "top_eigenpairs": CheckpointAnalysis.top_eigenpairs,
    "gauss_newton": CheckpointAnalysis.gauss_newton,
    "gradient_overlap": CheckpointAnalysis.gradient_overlap,
    "trace": CheckpointAnalysis.trace,
    "clustering": CheckpointAnalysis.clustering,
}


class AnalysisEvaluator:
    """The analysis job's evaluator: for each checkpoint number, load that checkpoint
    (checked against the plan's hash), then compute the training loss and accuracy and
    each selected quantity, with the products and seconds it took."""

    def __init__(
        self,
        experiment: Experiment,
        checkpoints: list[tuple[str, str]],
        settings: AnalysisConfig,
        outputs: list[str],
        file_path: str,
    ):
        self.experiment = experiment
        self.checkpoints = checkpoints
        self.settings = settings
        self.outputs = outputs
        self.file_path = file_path
        self.operators = Operators(experiment, settings)
        spectra = {"density", "top_eigenpairs", "gauss_newton"} & set(settings.quantities)
        if spectra:
            check_basis_memory(
                self.operators.size,
                settings.steps,
                experiment.device,
                "analysis.steps",
                products=False,
            )
        if {"top_eigenpairs", "gauss_newton", "gradient_overlap"} & set(settings.quantities):
            check_basis_memory(
                self.operators.size, settings.max_hvps, experiment.device, "analysis.max_hvps"
            )

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.at(int(item)) for item in items]
        return {
            name: np.stack([np.asarray(row[name], np.float64) for row in rows])
            for name in self.outputs
        }

    def load(self, item: int) -> None:
        """Put checkpoint ``item``'s weights (and buffers) into the model."""
        path, sha256 = self.checkpoints[item]
        verify_fingerprint(path, sha256, self.file_path, CHECKPOINT_FIELD)
        model = self.experiment.model
        state = load_state_dict(
            path, model.state_dict(), self.experiment.config.model, CHECKPOINT_FIELD
        )
        check_compatible(model, state, path, CHECKPOINT_FIELD)
        model.load_state_dict(state)

    def at(self, item: int) -> dict:
        self.load(item)
        experiment = self.experiment
        loss, accuracy = evaluate(
            experiment.model,
            experiment.data.split("train"),
            experiment.config.evaluation.batch_size,
            experiment.objective,
        )
        values = {"train_loss": loss, "train_acc": accuracy}
        analysis = CheckpointAnalysis(experiment, self.operators, self.settings)
        for quantity in self.settings.quantities:
            products, started = self.operators.products(), time.perf_counter()
            try:
                values.update(QUANTITIES[quantity](analysis))
            finally:
                self.operators.hessian.release()  # its kept graphs: memory for the next
            if experiment.device.type == "cuda":
                torch.cuda.synchronize(experiment.device)
            values[f"{quantity}_seconds"] = time.perf_counter() - started
            values[f"{quantity}_hvps"] = self.operators.products() - products
        return values


def checkpoint_rows(surface: SurfaceFile) -> list[tuple[str, str]]:
    """(path, sha256) of each checkpoint of an analysis file, in item order."""
    datasets, _ = surface.group("checkpoints")
    return list(zip(texts(datasets["path"]), texts(datasets["sha256"])))


def analysis_evaluator(
    experiment: Experiment, surface: SurfaceFile, outputs: list[str]
) -> AnalysisEvaluator:
    """The analysis job's evaluator over the checkpoints of ``surface`` (an analysis file)."""
    settings = surface.config.analysis
    return AnalysisEvaluator(
        experiment, checkpoint_rows(surface), settings, outputs, str(surface.path)
    )
