"""Mean loss and accuracy of a model over a whole data set.

The loss is the objective's (:mod:`landscape.objectives`): its per-unit losses are
summed in float64 over the whole set and divided by the set's count of units, so the
value does not depend on the batch size (in eval mode every sample's output is
independent of its batch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from landscape.objectives import Objective
from landscape.samples import Samples


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: Samples,
    batch_size: int,
    objective: Objective,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` (in its current mode) over all ``samples``.

    Accuracy is NaN for an objective without one (``mse``) and wherever the loss is not
    finite. Sums stay on the device until the end: one synchronization per data set,
    not per batch.
    """
    device = next(model.parameters()).device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for inputs, targets in samples.batches(batch_size):
        outputs = model(inputs)
        total_loss += objective.losses(outputs, targets).double().sum()
        if objective.accuracy:
            correct += objective.correct(outputs, targets)
    count = samples.units(objective)
    mean_loss = total_loss.item() / count
    # Outputs that are not finite (e.g. a BatchNorm variance extrapolated below zero)
    # have no meaningful argmax either: such a point has neither loss nor accuracy.
    defined = objective.accuracy and math.isfinite(mean_loss)
    return mean_loss, correct.item() / count if defined else float("nan")
