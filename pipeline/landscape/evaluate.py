"""Mean loss and accuracy of a model over a whole data set.

The loss is the objective's (:mod:`landscape.objectives`): its per-unit losses are
summed in float64 over the whole set and divided by the set's count of units, so the
value does not depend on the batch size (in eval mode every sample's output is
independent of its batch). Under a reduced ``autocast`` dtype (evaluation.dtype bfloat16
or float16) only the forward pass runs in it: its outputs are cast to float32 before
the loss, so each unit's loss is a float32 one and the sum float64 as always.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from landscape.objectives import Objective
from landscape.samples import Samples


def outputs_of(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """``forward(inputs)``; with ``autocast``, run under ``torch.autocast`` in that dtype
    and returned in float32, the dtype every loss of a reduced-precision map is taken in."""
    if autocast is None:
        return forward(inputs)
    with torch.autocast(inputs.device.type, dtype=autocast):
        outputs = forward(inputs)
    return outputs.float()


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    samples: Samples,
    batch_size: int,
    objective: Objective,
    autocast: torch.dtype | None = None,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` (in its current mode; any forward callable)
    over all ``samples``, its forward passes under ``autocast`` (:func:`outputs_of`).

    Accuracy is NaN for an objective without one (``mse``) and wherever the loss is not
    finite. Sums stay on the device until the end: one synchronization per data set,
    not per batch (both sums come back in one transfer; a count below 2^53 is exact in
    float64).
    """
    total_loss = torch.zeros((), dtype=torch.float64, device=samples.device)
    correct = torch.zeros((), dtype=torch.int64, device=samples.device)
    for inputs, targets in samples.batches(batch_size):
        outputs = outputs_of(model, inputs, autocast)
        total_loss += objective.losses(outputs, targets).double().sum()
        if objective.accuracy:
            correct += objective.correct(outputs, targets)
    count = samples.units(objective)
    loss_sum, correct_sum = torch.stack([total_loss, correct.double()]).tolist()
    mean_loss = loss_sum / count
    # Outputs that are not finite (e.g. a BatchNorm variance extrapolated below zero)
    # have no meaningful argmax either: such a point has neither loss nor accuracy.
    defined = objective.accuracy and math.isfinite(mean_loss)
    return mean_loss, correct_sum / count if defined else float("nan")
