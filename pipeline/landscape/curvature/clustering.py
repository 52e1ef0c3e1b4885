"""Contains the clustering of logit gradients (Fort & Ganguli 2019, Fig. 1).

For a classifier with logits z_k(x; theta), k = 1..C, write g_k^mu = dz_k(x_mu)/dtheta
for the gradient of logit k at sample mu w.r.t. the selected parameters, and
u_k^mu = g_k^mu / ||g_k^mu||. Fort & Ganguli find that g_k^mu points nearly the same way
for every sample mu (it clusters by logit k, whatever the input), a little more so for
samples of class k, while gradients of different logits are nearly orthogonal. On a
seeded subsample of n samples the mean cosines are averages over ordered pairs:

    same_logit_same_class       mean u_k^mu . u_k^nu   over k, mu != nu, y_mu = y_nu = k
    same_logit                  mean u_k^mu . u_k^nu   over k, mu != nu
    same_logit_different_class  mean u_k^mu . u_k^nu   over k, y_mu != y_nu
    different_logits            mean u_k^mu . u_l^nu   over k != l, all mu, nu (mu = nu too)

(their q_SLSC, q_SL and q_DL, and q_SL restricted to pairs of different classes). They
need no n x n Gram matrix: with S_kc = sum of u_k^mu over the samples of class c and
T_k = sum_c S_kc, the sums over pairs are ||S_kk||^2 - n_k, ||T_k||^2 - n,
||T_k||^2 - sum_c ||S_kc||^2 and ||sum_k T_k||^2 - sum_k ||T_k||^2. So the per-sample
Jacobians (torch.func ``vmap`` of ``jacrev``) are computed a chunk of samples at a time
and only the C x C sums S (C^2 P float64 numbers) are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from landscape.errors import UserError
from landscape.samples import Samples


@dataclass(frozen=True)
class LogitGradientClustering:
    """Fort & Ganguli's logit-gradient statistics on a subsample (module docstring).

    ``same_logit_same_class``, ``same_logit``, ``same_logit_different_class``,
    ``different_logits``: mean cosines between per-sample logit gradients, NaN where a
    subsample has no such pair. ``logit_variance``: the variance of a sample's C logits
    (over k, ddof 0), averaged over the samples (their sigma_z^2, which grows over
    training). ``logit_gradient_norm``: mean ||g_k^mu|| over k and mu. ``weight_norm``:
    ||theta|| of the selected parameters. ``samples``: n; ``classes``: C."""

    same_logit_same_class: float
    same_logit: float
    same_logit_different_class: float
    different_logits: float
    logit_variance: float
    logit_gradient_norm: float
    weight_norm: float
    samples: int
    classes: int


def subsample(count: int, samples: int, seed: int) -> torch.Tensor:
    """The indices of ``samples`` of ``count`` samples (all where fewer), in a seeded
    random order drawn on the CPU: the same subsample on every device and at every
    checkpoint of a run."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[: min(samples, count)]


def logit_gradient_clustering(
    model: nn.Module,
    names: Sequence[str],
    data: Samples,
    samples: int,
    seed: int,
    per_pass: int = 16,
) -> LogitGradientClustering:
    """The statistics of :class:`LogitGradientClustering` for the gradients w.r.t. the
    parameters ``names`` of ``model`` (in eval mode: each sample's logits depend on it
    alone), on :func:`subsample` (``samples``, ``seed``) of ``data``, whose targets are
    class labels; ``per_pass`` samples' Jacobians (per_pass x C x P numbers in the model's
    dtype) at a time. Sums are accumulated in float64."""
    if model.training:
        raise ValueError("logit_gradient_clustering needs the model in eval mode (model.eval())")
    inputs, targets = data.gather(subsample(len(data), samples, seed))
    tensors = {name: t.detach() for name, t in model.named_parameters()}
    tensors.update(model.named_buffers())
    params = {name: tensors.pop(name) for name in names}

    def logits(p: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = functional_call(model, {**tensors, **p}, (x.unsqueeze(0),)).squeeze(0)
        return z, z

    with torch.no_grad():
        outputs = model(inputs[:1])
    if outputs.dim() != 2:
        raise UserError(
            f"clustering: logit gradients need (samples, classes) logits, not "
            f"{tuple(outputs.shape)}; analyse a classifier"
        )
    classes = outputs.shape[1]
    size = sum(p.numel() for p in params.values())
    device = inputs.device
    class_sums = torch.zeros(classes, classes, size, dtype=torch.float64, device=device)
    norms, variances = [], []
    jacobian = vmap(jacrev(logits, has_aux=True), in_dims=(None, 0))
    for start in range(0, len(inputs), per_pass):
        chunk = inputs[start : start + per_pass]
        labels = targets[start : start + per_pass]
        pieces, z = jacobian(params, chunk)
        gradients = torch.cat(
            [pieces[name].reshape(len(chunk), classes, -1) for name in names], dim=2
        ).double()
        length = gradients.norm(dim=2)
        if (length == 0).any():
            raise UserError(
                "clustering: a logit gradient is zero (its cosine is undefined); select "
                "parameters every logit depends on (e.g. parameters: all)"
            )
        units = gradients / length.unsqueeze(2)
        membership = nn.functional.one_hot(labels, classes).to(units)
        class_sums += torch.einsum("bc,bkp->kcp", membership, units)
        norms.append(length)
        variances.append(z.double().var(dim=1, unbiased=False))
    counts = torch.bincount(targets, minlength=classes).double()
    n = float(len(inputs))
    squared = (class_sums**2).sum(dim=2)  # ||S_kc||^2
    totals = class_sums.sum(dim=1)  # T_k
    total_squared = (totals**2).sum(dim=1)  # ||T_k||^2
    diagonal = squared.diagonal()
    same_class_pairs = float((counts * (counts - 1)).sum())
    different_class_pairs = classes * (n**2 - float((counts**2).sum()))
    all_pairs = classes * n * (n - 1)
    different_logit_pairs = classes * (classes - 1) * n**2
    weight_norm = torch.sqrt(sum((p.double() ** 2).sum() for p in params.values()))
    return LogitGradientClustering(
        same_logit_same_class=pair_mean(float((diagonal - counts).sum()), same_class_pairs),
        same_logit=pair_mean(float((total_squared - n).sum()), all_pairs),
        same_logit_different_class=pair_mean(
            float((total_squared - squared.sum(dim=1)).sum()), different_class_pairs
        ),
        different_logits=pair_mean(
            float((totals.sum(dim=0) ** 2).sum() - total_squared.sum()), different_logit_pairs
        ),
        logit_variance=float(torch.cat(variances).mean()),
        logit_gradient_norm=float(torch.cat(norms).mean()),
        weight_norm=float(weight_norm),
        samples=len(inputs),
        classes=classes,
    )


def pair_mean(total: float, pairs: float) -> float:
    """A sum over pairs divided by their count; NaN where there are none."""
    return total / pairs if pairs else float("nan")
