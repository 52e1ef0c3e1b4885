"""Batch norms folded into the convolutions before them (curvature.operators): the same
function, so every product is still the Hessian (and Gauss-Newton matrix) w.r.t. the
model's own parameters, checked against dense matrices built by torch.func on the
unfolded model, in float32 and float64, in both product modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CROSS_ENTROPY, dense_hessian, hessian_operator
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn import functional as F

from landscape.curvature.operators import GaussNewtonOperator, full_gradient, select_parameters
from landscape.samples import HeldSamples

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES = ("double_backward", "forward_over_reverse")
# Relative error of a product against the float64 dense matrix.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


class ResidualBatchNormNet(nn.Module):
    """conv(bias) -> bn -> relu, a residual block (conv -> bn -> relu -> conv -> bn, plus
    the block's input), and a conv whose output feeds its norm and a second branch, which
    must not be folded: 3 foldable norms of 4."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1, bias=True)
        self.stem_norm = nn.BatchNorm2d(3)
        self.inner = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.inner_norm = nn.BatchNorm2d(3)
        self.outer = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.outer_norm = nn.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 2, 3, stride=2, bias=False)
        self.shared_norm = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem(x)))
        block = self.outer_norm(self.outer(F.relu(self.inner_norm(self.inner(x)))))
        x = F.relu(x + block)
        shared = self.shared(x)
        x = F.relu(self.shared_norm(shared)) + 0.1 * shared  # the conv feeds two consumers
        return self.head(x.flatten(1))


def residual_net(dtype: torch.dtype):
    """The net in eval mode with statistics and scales far from their initial 0 and 1,
    24 random 8 x 8 images and their 3-class targets."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResidualBatchNormNet().to(dtype).eval()
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_mean.copy_(torch.rand(norm.num_features, generator=generator) - 0.5)
            norm.running_var.copy_(0.2 + torch.rand(norm.num_features, generator=generator))
            norm.weight.copy_(torch.randn(norm.num_features, generator=generator))
            norm.bias.copy_(torch.randn(norm.num_features, generator=generator))
    inputs = torch.randn(24, 1, 8, 8, generator=generator).to(dtype)
    targets = torch.randint(0, 3, (24,), generator=generator)
    return model, inputs, targets


def relative_error(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(found - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_folded_products_are_the_dense_hessian_of_the_unfolded_model(dtype, mode):
    model, inputs, targets = residual_net(DTYPES[dtype])
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 10, hvp=mode)
    folded_module, norms = operator.folding
    assert operator.mode == mode and operator.evaluated_module() is folded_module
    assert norms == [model.stem_norm, model.inner_norm, model.outer_norm]
    exact = dense_hessian(operator, torch.float64)  # of the model itself, in float64
    vectors = np.random.default_rng(0).normal(size=(2, operator.shape[0]))
    for vector in vectors:
        error = relative_error(operator @ vector, exact @ vector)
        assert error <= TOLERANCE[dtype], error
    together = operator.hvp_many(torch.as_tensor(vectors)).double().numpy()
    assert relative_error(together, vectors @ exact) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_folded_gradient_and_gauss_newton_match_the_unfolded_model(dtype):
    model, inputs, targets = residual_net(DTYPES[dtype])
    names = select_parameters(model, "all")
    samples = HeldSamples(inputs, targets)
    wide = {name: t.double() for name, t in model.state_dict().items()}
    wide_inputs = inputs.double()

    def logits(params):
        return functional_call(model, {**wide, **params}, (wide_inputs,))

    params = {name: wide[name] for name in names}
    gradient = torch.func.grad(lambda p: F.cross_entropy(logits(p), targets))(params)
    exact_gradient = torch.cat([gradient[name].reshape(-1) for name in names]).numpy()
    found = full_gradient(model, names, samples, CROSS_ENTROPY, 10).numpy()
    assert relative_error(found, exact_gradient) <= TOLERANCE[dtype]

    # The float64 Gauss-Newton matrix J^T H_out J / N of the unfolded model.
    jacobian = jacrev(logits)(params)
    jacobian = torch.cat(
        [jacobian[name].reshape(*jacobian[name].shape[:2], -1) for name in names], 2
    )
    probabilities = F.softmax(logits(params), dim=1)
    curvature = torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None]
    exact = torch.einsum("nkp,nkl,nlq->pq", jacobian, curvature, jacobian).numpy() / len(inputs)
    vector = np.random.default_rng(1).normal(size=len(exact))
    for mode in MODES:
        operator = GaussNewtonOperator(model, names, samples, CROSS_ENTROPY, 10, mode)
        assert operator.folding is not None
        assert relative_error(operator @ vector, exact @ vector) <= TOLERANCE[dtype]


def test_norms_in_training_mode_are_evaluated_by_the_model_itself():
    model, inputs, targets = residual_net(torch.float64)
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 24, hvp="double_backward")
    folded_module, _ = operator.folding
    model.stem_norm.train()  # batch statistics: not the affine map folded
    assert operator.evaluated_module() is model
    params, fixed = operator.state()
    loss = operator.batch_loss(params, fixed, inputs, targets)  # by the batch's statistics
    assert torch.isclose(loss, F.cross_entropy(model(inputs), targets), rtol=1e-14, atol=0)
    model.eval()
    assert operator.evaluated_module() is folded_module
    assert not torch.equal(operator.batch_loss(params, fixed, inputs, targets), loss)


class BranchingNet(ResidualBatchNormNet):
    """The residual net behind a branch on its input's shape, which torch.fx cannot trace
    (the branch is always taken: the same function)."""

    def forward(self, x):
        return super().forward(x) if x.shape[0] > 0 else x


def test_a_model_the_tracer_cannot_follow_is_differentiated_unfolded(caplog):
    model, inputs, targets = residual_net(torch.float64)
    branching = BranchingNet().double().eval()
    branching.load_state_dict(model.state_dict())
    with caplog.at_level("INFO", logger="landscape.curvature.operators"):
        operator = hessian_operator(branching, inputs, targets, CROSS_ENTROPY, 10)
    assert operator.folding is None and operator.evaluated_module() is branching
    assert "not folded into convolutions: torch.fx cannot trace the model" in caplog.text
    vector = np.random.default_rng(0).normal(size=operator.shape[0])
    exact = dense_hessian(operator) @ vector
    assert relative_error(operator @ vector, exact) <= TOLERANCE["float64"]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_weight_computed_by_a_hook_keeps_its_convolution_unfolded(dtype):
    """weight_norm's conv.weight is made from weight_g, weight_v by a forward pre-hook,
    which a folded graph would skip (their gradient would read 0): that pair stays as it
    is, the others fold; the gradient w.r.t. weight_g, weight_v is the model's (dense
    float64) and the products are the unfolded model's."""
    model, inputs, targets = residual_net(DTYPES[dtype])
    torch.nn.utils.weight_norm(model.inner)  # the deprecated API: a hook, not parametrize
    names = select_parameters(model, "all")
    assert "inner.weight_g" in names and "inner.weight" not in names
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 10)
    assert operator.folding[1] == [model.stem_norm, model.outer_norm]
    wide = {name: t.double() for name, t in model.state_dict().items()}
    wide_model = ResidualBatchNormNet().double().eval()
    torch.nn.utils.weight_norm(wide_model.inner)
    wide_model.load_state_dict(wide)

    def loss(params):
        outputs = functional_call(wide_model, {**wide, **params}, (inputs.double(),))
        return F.cross_entropy(outputs, targets)

    def flat_loss(flat):  # reverse over reverse: weight_norm has no forward derivative
        pieces = torch.split(flat, [wide[name].numel() for name in names])
        return loss({n: p.view(wide[n].shape) for n, p in zip(names, pieces)})

    point = torch.cat([wide[name].reshape(-1) for name in names])
    gradient = torch.func.grad(flat_loss)(point)
    found = full_gradient(model, names, HeldSamples(inputs, targets), CROSS_ENTROPY, 10)
    by_name = dict(zip(names, torch.split(gradient, operator.sizes)))
    assert by_name["inner.weight_v"].abs().max() > 1e-3  # not a zero to match
    assert relative_error(found.numpy(), gradient.numpy()) <= TOLERANCE[dtype]
    # Products as the unfolded model gives them (torch's own second derivative of
    # _weight_norm is not symmetric, so a dense reference would test torch, not folding).
    vector = np.random.default_rng(0).normal(size=operator.shape[0])
    folded = operator @ vector
    operator.folding = None
    assert relative_error(folded, operator @ vector) <= TOLERANCE[dtype]


def test_a_norm_traced_in_training_mode_folds_once_the_model_is_in_eval_mode():
    model, inputs, targets = residual_net(torch.float64)
    model.stem_norm.train()
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 24)
    assert model.stem_norm not in operator.folding[1]  # by its batch: not an affine map
    assert operator.evaluated_module() is model
    model.eval()
    operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, 24)
    assert operator.folding[1] == [model.stem_norm, model.inner_norm, model.outer_norm]
