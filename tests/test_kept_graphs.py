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

from landscape import memory
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


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_products_from_kept_graphs_are_the_rebuilt_ones_and_the_dense_hessians(dtype):
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    first, second = vectors(operator.shape[0], 2, dtype)
    products = [operator.hvp(first), operator.hvp(second)]
    assert len(operator.kept.graphs) == 4, "every batch's graph fits"
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
    model.net[1].train()  # the first BatchNorm: batch statistics from here on
    training = operator.hvp(vector)
    torch.testing.assert_close(training, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    assert not torch.equal(training, at_origin)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_graphs_are_kept_only_within_their_share_of_free_memory(dtype, monkeypatch):
    """A budget for two and a half graphs keeps the first two; the others are built in
    every product, which gives the same bits."""
    model, inputs, targets = model_of(dtype)
    operator = operator_of(model, inputs, targets)
    first, second = vectors(operator.shape[0], 2, dtype)
    operator.hvp(first)
    one_graph = operator.kept.bytes / 4  # equal batches: equal graphs
    free = 2.5 * one_graph / operators.KEPT_GRAPHS_SHARE
    monkeypatch.setattr(operators, "free_memory", lambda device: int(free))
    bounded = operator_of(model, inputs, targets)
    products = [bounded.hvp(first), bounded.hvp(second)]
    assert len(bounded.kept.graphs) == 2 and bounded.kept.bytes == 2 * one_graph
    for vector, product in zip((first, second), products):
        torch.testing.assert_close(product, rebuilt(model, inputs, targets, vector), rtol=0, atol=0)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3")  # three ranks share this memory
    shared = operator_of(model, inputs, targets)
    shared.hvp(first)
    assert shared.kept.graphs == [] and shared.kept.budget == int(free / 4) // 3


def test_processes_sharing_a_device_are_the_nodes_ranks_over_its_gpus(monkeypatch):
    for name in (*memory.LOCAL_SIZE_VARIABLES, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.delenv("PMIX_RANK", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory.sharing_processes(cpu) == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")  # no local size: all ranks, to be safe
    assert memory.sharing_processes(cpu) == 8
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert memory.sharing_processes(cpu) == 4 and memory.sharing_processes(cuda) == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert memory.sharing_processes(cuda) == 1
