"""Double-backward Hessian-vector products that keep each batch's gradient graph across
products at one parameter state (:class:`landscape.curvature.operators.KeptGraphs`):
the same bits as products that build their graphs, the dense Hessian's values, the
graphs dropped when the model moves (through its flat parameter vector, as a grid move
does) or a module changes mode, and kept only within their memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CROSS_ENTROPY, dense_hessian, hessian_operator, small_model

from landscape import memory, ranks
from landscape.curvature import operators
from landscape.parameters import DirectionPlane

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Against the dense Hessian (torch.func.hessian in the same dtype): entrywise, relative
# to the largest entry of H v (float32: about 80 epsilons, the products' rounding).
DENSE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SAMPLES, BATCH = 88, 22  # of conftest's 89 training digits: 4 equal batches


def model_of(dtype: torch.dtype):
    model, inputs, targets = small_model("cnn_bn", dtype)
    return model, inputs[:SAMPLES], targets[:SAMPLES]


def operator_of(model, inputs, targets):
    return hessian_operator(model, inputs, targets, CROSS_ENTROPY, BATCH, hvp="double_backward")


def rebuilt(model, inputs, targets, vector: torch.Tensor) -> torch.Tensor:
    """H v by an operator that keeps no graph (a budget of 0 bytes)."""
    operator = operator_of(model, inputs, targets)
    share = operators.KEPT_GRAPHS_SHARE
    operators.KEPT_GRAPHS_SHARE = 0.0
    try:
        product = operator.hvp(vector)
    finally:
        operators.KEPT_GRAPHS_SHARE = share
    assert operator.kept.graphs == []
    return product


def assert_dense(dense: np.ndarray, vector: torch.Tensor, product: torch.Tensor, dtype):
    expected = dense @ vector.numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(product.numpy(), expected, rtol=0, atol=DENSE_RTOL[dtype] * scale)


def vectors(size: int, count: int, dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(size, generator=generator, dtype=dtype) for _ in range(count)]


def counting_losses(operator) -> list:
    """Counts the operator's batch losses (the forward passes its products make)."""
    calls = []
    own = operator.batch_loss

    def counted(*args):
        calls.append(1)
        return own(*args)

    operator.batch_loss = counted
    return calls


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_products_from_kept_graphs_are_the_rebuilt_ones_and_the_dense_hessians(dtype):
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    first, second = vectors(operator.shape[0], 2, dtype)
    forwards = counting_losses(operator)
    products = [operator.hvp(first)]
    assert len(forwards) == 4 and len(operator.kept.graphs) == 4, "every batch's graph fits"
    assert operator.kept.complete
    products.append(operator.hvp(second))
    assert len(forwards) == 4, "a product from kept graphs makes no forward pass"
    dense = dense_hessian(operator)
    for vector, product in zip((first, second), products):
        torch.testing.assert_close(product, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
        assert_dense(dense, vector, product, dtype)
    assert operator.hvps == 2


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_a_moved_model_or_a_module_in_training_mode_drops_the_kept_graphs(dtype):
    """A grid move writes the flat vector the parameters' data are views of, which leaves
    the parameters' own versions alone: the state is compared by value."""
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    (vector,) = vectors(operator.shape[0], 1, dtype)
    generator = torch.Generator().manual_seed(4)
    direction = {
        name: 0.2 * torch.randn(p.shape, generator=generator, dtype=torch.float64).numpy()
        for name, p in model.named_parameters()
    }
    plane = DirectionPlane(model, [direction])
    at_origin = operator.hvp(vector)
    plane.move_to(1.0)
    moved = operator.hvp(vector)
    assert not torch.equal(moved, at_origin)
    torch.testing.assert_close(moved, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    assert_dense(dense_hessian(operator), vector, moved, dtype)
    plane.move_to(0.0)
    torch.testing.assert_close(operator.hvp(vector), at_origin, rtol=0, atol=0)
    with torch.no_grad():
        model.net[1].running_var.mul_(2.0)  # a buffer alone, in place
    rescaled = operator.hvp(vector)
    assert not torch.equal(rescaled, at_origin)
    torch.testing.assert_close(rescaled, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    model.net[1].train()  # the first BatchNorm: batch statistics from here on
    training = operator.hvp(vector)
    torch.testing.assert_close(training, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    assert not torch.equal(training, rescaled)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_a_reloaded_checkpoint_with_the_same_values_reuses_the_graphs_safely(dtype):
    """Kept graphs saved the operator's copy of the state, not the model's tensors: a
    load_state_dict writing the same values in place neither drops nor breaks them."""
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    first, second = vectors(operator.shape[0], 2, dtype)
    operator.hvp(first)
    model.load_state_dict({name: t.clone() for name, t in model.state_dict().items()})
    forwards = counting_losses(operator)
    product = operator.hvp(second)
    assert forwards == []
    torch.testing.assert_close(product, rebuilt(model, inputs, targets, second), rtol=0, atol=0)
    operator.release()
    assert operator.kept is None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_graphs_are_kept_only_within_their_share_of_free_memory(dtype, monkeypatch):
    """A budget for the state's copy and two and a half graphs keeps the first two; the
    others are built in every product, which gives the same bits."""
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    first, second = vectors(operator.shape[0], 2, dtype)
    operator.hvp(first)
    kept = operator.kept
    assert kept.bytes == kept.state.bytes + sum(kept.sizes) and len(kept.sizes) == 4
    room = kept.state.bytes + kept.sizes[0] + kept.sizes[1] + kept.sizes[2] / 2
    free = room / operators.KEPT_GRAPHS_SHARE
    monkeypatch.setattr(operators, "free_memory", lambda device: int(free) + 1)
    bounded = operator_of(model, inputs, targets)
    products = [bounded.hvp(first), bounded.hvp(second)]
    assert len(bounded.kept.graphs) == len(bounded.kept.sizes) == 2
    assert not bounded.kept.complete
    for vector, product in zip((first, second), products):
        torch.testing.assert_close(product, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3")  # three ranks share this memory
    shared = operator_of(model, inputs, targets)
    shared.hvp(first)
    assert shared.kept.graphs == [] and shared.kept.budget == int(room) // 3


def test_processes_sharing_a_device_are_the_ranks_on_the_node(monkeypatch):
    for name in (*ranks.LOCAL_SIZE_VARIABLES, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.delenv("PMIX_RANK", raising=False)
    assert ranks.launched_local_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")  # no local size: all ranks, to be safe
    assert ranks.launched_local_size() == 8
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")  # ranks may share a GPU: no division by GPUs
    assert ranks.launched_local_size() == 4


def test_a_control_group_limit_bounds_free_host_memory(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{3 * 2**30}\n")
    usage.write_text(f"{2**30}\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(limit), str(usage)),))
    monkeypatch.setattr(memory, "host_available", lambda: 100 * 2**30)
    assert memory.free_memory(torch.device("cpu")) == 2 * 2**30
    limit.write_text("max\n")
    assert memory.free_memory(torch.device("cpu")) == 100 * 2**30
