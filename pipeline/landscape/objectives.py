"""Contains the objectives a landscape is the loss of: cross-entropy, squared error,
token cross-entropy, and user objectives named ``package.module:name``.

An objective gives one loss l_i per unit (a sample, or a token of a sequence) and the
number N of units a set holds, and every mean over a set is

    L = (1/N) sum_i l_i,

summed over the whole set before the division: a token-averaged loss over batches of
different padding is the sum of its token losses over the unmasked tokens of the whole
set, never a mean of batch means. The surface, the Hessian and the trace all take the
loss from the one objective an experiment builds (``Experiment.objective``), so the
curvature is always that of the mapped loss.

A user objective is a subclass of :class:`Objective` (or any callable taking
``evaluation.loss_kwargs`` that returns one): ``losses`` is the only method it must
write; ``count`` is the number of samples unless it masks, ``correct`` gives an
accuracy map, ``perplexity`` says that exp of the mean loss is a perplexity (the
``*_perplexity`` maps), ``softmax_gauge`` says that the loss sees the logits only
through their softmax (see :class:`landscape.curvature.operators.GaugeProjection`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from landscape.errors import UserError, describe
from landscape.plugins import call_factory, import_object


class Objective:
    """One loss per unit, their count, and optionally the units predicted right."""

    accuracy: bool = False  # whether :meth:`correct` gives the accuracy maps
    # Whether the loss is a negative log-likelihood, so that exp(mean loss) is the
    # perplexity (cross-entropy without label smoothing, whose uniform term is no likelihood).
    perplexity: bool = False
    softmax_gauge: bool = False  # whether the loss depends on the logits via softmax only

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of each unit, shape (B,) or (B, T), in the outputs' dtype; masked
        units are 0."""
        raise NotImplementedError

    def count(self, targets: torch.Tensor) -> int:
        """N, the number of units ``targets`` holds: the mean's denominator."""
        return len(targets)

    def mean(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of one batch (what training steps on)."""
        return self.losses(outputs, targets).mean()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """How many units the outputs predict right (only where ``accuracy``)."""
        raise NotImplementedError

    def target_problem(self, targets: torch.Tensor) -> str | None:
        """Why ``targets`` do not fit this objective (``integer class labels; use mse``),
        or None when they do."""
        return None


class CrossEntropy(Objective):
    """Softmax cross-entropy of (B, C) logits against (B,) class labels, with optional
    label smoothing (``torch.nn.functional.cross_entropy``'s)."""

    accuracy = True
    softmax_gauge = True

    def __init__(self, label_smoothing: float = 0.0):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
        self.label_smoothing = label_smoothing
        self.perplexity = label_smoothing == 0

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            outputs, targets, reduction="none", label_smoothing=self.label_smoothing
        )

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).sum()

    def target_problem(self, targets: torch.Tensor) -> str | None:
        if targets.is_floating_point():
            return "float targets; use mse"
        if targets.dim() != 1:
            return (
                f"labels of shape {tuple(targets.shape)}, one class per sample is (samples,); "
                "for token labels use token_cross_entropy"
            )
        return None


class MeanSquaredError(Objective):
    """Squared error averaged over each sample's outputs, so the mean over samples is the
    mean over all output elements, as ``torch.nn.MSELoss`` defines it. No accuracy."""

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets.view_as(outputs), reduction="none").flatten(1).mean(1)

    def target_problem(self, targets: torch.Tensor) -> str | None:
        return None if targets.is_floating_point() else "integer class labels; use cross_entropy"


class TokenCrossEntropy(Objective):
    """Cross-entropy of a sequence model's (B, T, V) logits against (B, T) token labels,
    averaged over the tokens whose label is not ``ignore_index`` (padding): N is the
    number of unmasked tokens of the whole set. Accuracy is per unmasked token."""

    accuracy = True
    softmax_gauge = True

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0):
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer (got {ignore_index!r})")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.perplexity = label_smoothing == 0

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            outputs.flatten(0, 1),
            targets.flatten(),
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        ).view(targets.shape)

    def count(self, targets: torch.Tensor) -> int:
        return int((targets != self.ignore_index).sum())

    def mean(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.losses(outputs, targets).sum() / self.count(targets)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        kept = targets != self.ignore_index
        return ((outputs.argmax(-1) == targets) & kept).sum()

    def target_problem(self, targets: torch.Tensor) -> str | None:
        if targets.is_floating_point() or targets.dim() != 2:
            return f"targets of shape {tuple(targets.shape)}; token labels are (samples, tokens)"
        return None


BUILT_IN = {
    "cross_entropy": CrossEntropy,
    "mse": MeanSquaredError,
    "token_cross_entropy": TokenCrossEntropy,
}


def check_metric_maps(objective: Objective, spec: str, maps: list[str]) -> None:
    """Refuse the maps ``objective`` does not define: accuracy for one without an accuracy
    (regression), perplexity for a loss that is no negative log-likelihood (squared
    error, label smoothing). At config load for a built-in, once built for a plug-in."""
    if not objective.accuracy and any(name.endswith("_acc") for name in maps):
        raise UserError(f"maps: accuracy is undefined for evaluation.loss {spec!r}; drop *_acc")
    if not objective.perplexity and any(name.endswith("_perplexity") for name in maps):
        raise UserError(
            f"maps: perplexity is exp of a mean negative log-likelihood, which evaluation.loss "
            f"{spec!r} is not here (squared error, label smoothing, or a plug-in without "
            "perplexity = True); drop *_perplexity"
        )


def check_spec(spec: str, kwargs: dict, where: str) -> None:
    """At config load: ``spec`` is a built-in name (whose ``kwargs`` are then tried) or a
    ``package.module:name`` plug-in (imported only when an experiment is built)."""
    if ":" in spec:
        return
    if spec not in BUILT_IN:
        raise UserError(
            f"{where}.loss: {spec!r} is not an objective; use one of {', '.join(BUILT_IN)} "
            "or package.module:name"
        )
    build_objective(spec, kwargs, where)


def build_objective(spec: str, kwargs: dict, where: str = "evaluation") -> Objective:
    """The objective ``spec`` names, built with ``kwargs``; every failure is one line
    naming ``<where>.loss`` or ``<where>.loss_kwargs``."""
    field, kwargs_field = f"{where}.loss", f"{where}.loss_kwargs"
    if ":" not in spec:
        try:
            return BUILT_IN[spec](**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{kwargs_field}: {kwargs} do not fit {field} {spec} ({describe(exc)}); "
                f"fix {kwargs_field}"
            ) from None
    factory = import_object(spec, field)
    objective = call_factory(factory, spec, field, {}, kwargs, kwargs_field)
    if not isinstance(objective, Objective):
        raise UserError(
            f"{field}: {spec} returned a {type(objective).__name__}; return a "
            "landscape.objectives.Objective (subclass it and write its losses)"
        )
    return objective
