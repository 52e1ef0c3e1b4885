"""Filter normalization (Li et al. section 4) and seeding of random directions."""

from __future__ import annotations

import pytest
import torch

from landscape.config import DirectionsConfig
from landscape.directions import ignored_parameters, random_directions
from landscape.models import build_model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("resnet20", (1, 8, 8), 10, {})


def test_every_filter_gets_the_norm_of_its_weights_and_1d_tensors_are_zero(resnet):
    (direction,) = random_directions(resnet, DirectionsConfig(normalization="filter"), 1)
    params = dict(resnet.named_parameters())
    ignored = set(ignored_parameters(resnet, "biasbn"))
    assert ignored == {n for n, p in params.items() if p.dim() == 1} and ignored
    for name, weights in params.items():
        d = direction[name]
        if name in ignored:
            assert torch.count_nonzero(d) == 0, name
            continue
        # One filter per output channel (conv) or output neuron row (linear).
        d_norms = d.flatten(1).norm(dim=1)
        w_norms = weights.detach().double().flatten(1).norm(dim=1)
        torch.testing.assert_close(d_norms, w_norms, rtol=1e-12, atol=0)
    assert "linear.weight" in direction and direction["linear.weight"].shape == (10, 64)


def test_layer_and_weight_normalizations(resnet):
    (layer,) = random_directions(resnet, DirectionsConfig(normalization="layer"), 1)
    (weight,) = random_directions(resnet, DirectionsConfig(normalization="weight"), 1)
    (raw,) = random_directions(resnet, DirectionsConfig(normalization="none"), 1)
    w = resnet.conv1.weight.detach().double()
    torch.testing.assert_close(layer["conv1.weight"].norm(), w.norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(weight["conv1.weight"], raw["conv1.weight"] * w.abs())


def test_kept_biases_are_scaled_to_their_own_norm(resnet):
    (direction,) = random_directions(resnet, DirectionsConfig(ignore="none"), 1)
    bias = resnet.linear.bias.detach().double()
    torch.testing.assert_close(direction["linear.bias"].norm(), bias.norm(), rtol=1e-12, atol=0)
    assert ignored_parameters(resnet, "none") == []


def test_same_seed_same_directions_other_seed_other_directions(resnet):
    first = random_directions(resnet, DirectionsConfig(seed=3), 2)
    again = random_directions(resnet, DirectionsConfig(seed=3), 2)
    other = random_directions(resnet, DirectionsConfig(seed=4), 2)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(first[0]["conv1.weight"], other[0]["conv1.weight"])
    assert not torch.equal(first[0]["conv1.weight"], first[1]["conv1.weight"])
    # A 1D plan shares its direction with the x axis of a 2D plan of the same seed.
    (single,) = random_directions(resnet, DirectionsConfig(seed=3), 1)
    assert all(torch.equal(single[k], first[0][k]) for k in single)


def test_batchnorm_running_statistics_are_never_perturbed(resnet):
    (direction,) = random_directions(resnet, DirectionsConfig(), 1)
    buffers = {name for name, _ in resnet.named_buffers()}
    assert buffers and not buffers & set(direction)
