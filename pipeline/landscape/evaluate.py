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


# Outputs of consecutive batches are kept up to this size and their losses and correct
# predictions computed in one go: a handful of operations per chunk instead of eight per
# batch, which for a small model (an MLP over the digits, batch 128) cost as much as its
# forward pass.
CHUNK_BYTES = 2**24


def chunk_totals(
    outputs: list[torch.Tensor], targets: list[torch.Tensor], objective: Objective
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of unit losses of each of a chunk of consecutive batches (their
    ``outputs`` and ``targets``), and the chunk's count of units predicted right (0 for
    an objective without accuracy), both on the device."""
    all_outputs, all_targets = torch.cat(outputs), torch.cat(targets)
    losses = objective.losses(all_outputs, all_targets).double()
    sums = torch.stack([batch.sum() for batch in losses.split([len(o) for o in outputs])])
    if objective.accuracy:
        return sums, objective.correct(all_outputs, all_targets)
    return sums, torch.zeros((), dtype=torch.int64, device=sums.device)


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
    finite. Each batch's unit losses are summed in float64 and the batch sums added in
    order, as a loop over batches would; only the loss operations are grouped over a
    chunk of consecutive batches' outputs (:data:`CHUNK_BYTES`, :func:`chunk_totals`),
    which changes no value: a unit's loss and prediction depend on its own outputs
    alone. Sums stay on the device until the end: one synchronization per data set, not
    per batch (all come back in one transfer; a count below 2^53 is exact in float64).
    """
    totals: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs, targets, chunk_bytes = [], [], 0
    for batch_inputs, batch_targets in samples.batches(batch_size):
        outputs.append(outputs_of(model, batch_inputs, autocast))
        targets.append(batch_targets)
        chunk_bytes += outputs[-1].numel() * outputs[-1].element_size()
        if chunk_bytes >= CHUNK_BYTES:
            totals.append(chunk_totals(outputs, targets, objective))
            outputs, targets, chunk_bytes = [], [], 0
    if outputs:
        totals.append(chunk_totals(outputs, targets, objective))
    correct = torch.stack([right for _, right in totals]).sum().double().reshape(1)
    *batch_sums, correct_sum = torch.cat([*(sums for sums, _ in totals), correct]).tolist()
    total_loss = 0.0
    for batch_sum in batch_sums:  # one after the other (Python's sum() may compensate)
        total_loss += batch_sum
    count = samples.units(objective)
    mean_loss = total_loss / count
    # Outputs that are not finite (e.g. a BatchNorm variance extrapolated below zero)
    # have no meaningful argmax either: such a point has neither loss nor accuracy.
    defined = objective.accuracy and math.isfinite(mean_loss)
    return mean_loss, correct_sum / count if defined else float("nan")
