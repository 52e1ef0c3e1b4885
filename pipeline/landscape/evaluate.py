"""Mean loss and accuracy of a model over a whole data set held on the device.

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

# Outputs of consecutive batches are kept up to this size and their losses and correct
# predictions computed in one go: a handful of operations per chunk instead of eight per
# batch, which for a small model (an MLP over the digits, batch 128) cost as much as its
# forward pass.
CHUNK_BYTES = 2**24


def chunk_totals(
    outputs: torch.Tensor, targets: torch.Tensor, batch_size: int, objective: Objective
) -> tuple[list[float], int]:
    """The float64 sum of unit losses of each batch of a chunk of outputs (batches of
    ``batch_size`` from its start), and the chunk's count of units predicted right (0
    for an objective without accuracy)."""
    losses = objective.losses(outputs, targets).double()
    sums = torch.stack([batch.sum() for batch in losses.split(batch_size)]).tolist()
    return sums, int(objective.correct(outputs, targets)) if objective.accuracy else 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    objective: Objective,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` (in its current mode) over all samples.

    Accuracy is NaN for an objective without one (``mse``) and wherever the loss is not
    finite. Each batch's unit losses are summed in float64 and the batch sums added in
    order, as a loop over batches would; only the loss operations are grouped over a
    chunk of consecutive batches' outputs (:data:`CHUNK_BYTES`, :func:`chunk_totals`),
    which changes no value: a unit's loss and prediction depend on its own outputs
    alone. One synchronization per chunk, not per batch.
    """
    batch_sums: list[float] = []
    correct = 0
    chunk: list[torch.Tensor] = []
    chunk_start = chunk_bytes = 0
    for start in range(0, len(inputs), batch_size):
        outputs = model(inputs[start : start + batch_size])
        chunk.append(outputs)
        chunk_bytes += outputs.numel() * outputs.element_size()
        stop = min(start + batch_size, len(inputs))
        if chunk_bytes >= CHUNK_BYTES or stop == len(inputs):
            chunk_targets = targets[chunk_start:stop]
            sums, right = chunk_totals(torch.cat(chunk), chunk_targets, batch_size, objective)
            batch_sums += sums
            correct += right
            chunk, chunk_start, chunk_bytes = [], stop, 0
    total_loss = 0.0
    for batch_sum in batch_sums:  # one after the other (Python's sum() may compensate)
        total_loss += batch_sum
    count = objective.count(targets)
    mean_loss = total_loss / count
    # Outputs that are not finite (e.g. a BatchNorm variance extrapolated below zero)
    # have no meaningful argmax either: such a point has neither loss nor accuracy.
    defined = objective.accuracy and math.isfinite(mean_loss)
    return mean_loss, correct / count if defined else float("nan")
