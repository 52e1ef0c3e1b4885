"""Fort & Ganguli's logit-gradient clustering against explicit per-sample gradients (a
Python loop of torch.autograd.grad), and their claim on a trained classifier."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_model

from landscape.curvature.clustering import logit_gradient_clustering, subsample
from landscape.curvature.operators import select_parameters
from landscape.errors import UserError
from landscape.samples import HeldSamples

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def explicit_cosines(model, names, inputs, targets) -> dict[str, float]:
    """The four mean cosines by brute force: every per-sample logit gradient by its own
    torch.autograd.grad, the full (n C) x (n C) cosine matrix, and masks of the pairs."""
    parameters = dict(model.named_parameters())
    selected = [parameters[name] for name in names]
    rows = []
    for x in inputs:
        z = model(x.unsqueeze(0))[0]
        for k in range(len(z)):
            pieces = torch.autograd.grad(z[k], selected, retain_graph=True)
            rows.append(torch.cat([p.reshape(-1) for p in pieces]).double())
    classes = len(rows) // len(inputs)
    units = torch.stack(rows)
    units = units / units.norm(dim=1, keepdim=True)
    cosine = units @ units.T  # row mu * C + k
    sample = torch.arange(len(rows)) // classes
    logit = torch.arange(len(rows)) % classes
    label = targets[sample]
    same_logit = logit[:, None] == logit[None, :]
    other_sample = sample[:, None] != sample[None, :]
    same_class = (label[:, None] == label[None, :]) & (label[:, None] == logit[:, None])
    masks = {
        "same_logit_same_class": same_logit & other_sample & same_class,
        "same_logit": same_logit & other_sample,
        "same_logit_different_class": same_logit & (label[:, None] != label[None, :]),
        "different_logits": ~same_logit,
    }
    return {name: float(cosine[mask].mean()) for name, mask in masks.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parameters", ["all", "weights"])
def test_cosines_equal_explicit_per_sample_gradients(dtype, parameters):
    """40 of 120 samples, in passes of 16 (the last one short). float64 to 1e-12;
    float32 to 1e-5 (the gradients are the same float32 numbers up to summation order,
    ~1e-7 relative, and a cosine of unit vectors carries that error)."""
    model, inputs, targets = small_model("mlp", DTYPES[dtype])
    names = select_parameters(model, parameters)
    found = logit_gradient_clustering(
        model, names, HeldSamples(inputs, targets), samples=40, seed=5
    )
    chosen = subsample(len(inputs), 40, seed=5)
    expected = explicit_cosines(model, names, inputs[chosen], targets[chosen])
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    for name, value in expected.items():
        assert getattr(found, name) == pytest.approx(value, abs=tolerance), name
    with torch.no_grad():
        logits = model(inputs[chosen]).double()
    assert found.logit_variance == pytest.approx(float(logits.var(dim=1, unbiased=False).mean()))
    parameters_ = dict(model.named_parameters())
    norm = math.sqrt(sum(float((parameters_[n].detach().double() ** 2).sum()) for n in names))
    assert found.weight_norm == pytest.approx(norm, rel=1e-12)
    assert (found.samples, found.classes) == (40, 3)


def test_subsample_is_seeded_and_fixed():
    first = subsample(120, 40, seed=5)
    assert torch.equal(first, subsample(120, 40, seed=5))
    assert not torch.equal(first, subsample(120, 40, seed=6))
    assert len(set(first.tolist())) == 40 and len(subsample(10, 40, seed=5)) == 10


def test_refuses_a_model_in_training_mode_and_token_logits():
    model, inputs, targets = small_model("mlp", torch.float64)
    names = select_parameters(model, "all")
    with pytest.raises(ValueError, match="eval mode"):
        logit_gradient_clustering(model.train(), names, HeldSamples(inputs, targets), 8, 0)
    tokens = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Unflatten(1, (2, 3)))
    tokens = tokens.double().eval()
    with pytest.raises(UserError, match=r"need \(samples, classes\) logits, not \(1, 2, 3\)"):
        logit_gradient_clustering(tokens, ["0.weight"], HeldSamples(inputs, targets), 8, 0)


def test_a_trained_classifier_clusters_gradients_by_logit():
    """Fort & Ganguli's claim after training (60 full-batch Adam steps, loss < 0.05):
    gradients of the same logit are far more aligned than those of different logits,
    those of samples of the logit's class most. Measured on this MLP (60 samples):
    same logit & class 0.78, same logit 0.48, same logit & different classes 0.32,
    different logits -0.06, logit variance 95 (at initialization: 0.77, 0.71, 0.67,
    -0.02, 0.025: the same-logit clustering is there from the start, and training
    separates the logit's own class)."""
    model, inputs, targets = small_model("mlp", torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.05
    names = select_parameters(model, "all")
    found = logit_gradient_clustering(
        model, names, HeldSamples(inputs, targets), samples=60, seed=0
    )
    print(found)
    assert found.same_logit_same_class > found.same_logit > found.different_logits
    assert found.same_logit_same_class > found.same_logit_different_class
    assert found.same_logit - found.different_logits > 0.3
