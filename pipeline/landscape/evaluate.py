"""Mean loss and accuracy of a model over a whole data set held on the device.

The loss is summed per sample in float64 and divided by the number of samples, so
the value does not depend on the batch size (in eval mode every sample's output is
independent of its batch). ``mse`` is the mean over all output elements, as
``torch.nn.MSELoss`` defines it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each sample (cross-entropy, or squared error averaged over outputs)."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    return F.mse_loss(outputs, targets.view_as(outputs), reduction="none").flatten(1).mean(1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    loss: str = "cross_entropy",
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` (in its current mode) over all samples.

    Accuracy is NaN for regression (``mse``) and wherever the loss is not finite. Sums
    stay on the device until the end: one synchronization per data set, not per batch.
    """
    total_loss = torch.zeros((), dtype=torch.float64, device=inputs.device)
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for start in range(0, len(inputs), batch_size):
        outputs = model(inputs[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        total_loss += per_sample_loss(outputs, batch_targets, loss).double().sum()
        if loss == "cross_entropy":
            correct += (outputs.argmax(1) == batch_targets).sum()
    count = len(inputs)
    mean_loss = total_loss.item() / count
    # Outputs that are not finite (e.g. a BatchNorm variance extrapolated below zero)
    # have no meaningful argmax either: such a point has neither loss nor accuracy.
    defined = loss == "cross_entropy" and math.isfinite(mean_loss)
    return mean_loss, correct.item() / count if defined else float("nan")
