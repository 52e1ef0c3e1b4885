"""Several grid points per forward pass (vmap over parameter sets) against ground truth:
each point's loss and accuracy computed on its own from theta0 + a d1 + b d2, for an MLP,
a BatchNorm CNN (with directions that move its running statistics, as interpolation
does) and ResNet-20, in float32 and float64; and the one-point path for what vmap
cannot batch."""

from __future__ import annotations

import logging
import subprocess
import sys
from copy import deepcopy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BASE, GRID, MPI_ENV, MPIEXEC, write_experiment
from torch import nn
from torch.nn import functional as F

from landscape import workers
from landscape.config import ConfigError, EvaluationConfig, load_config
from landscape.data import Dataset, load_dataset
from landscape.evaluators import PointByPoint, SeveralPoints, loss_evaluator, try_batching
from landscape.models import build_model
from landscape.objectives import build_objective
from landscape.parameters import DirectionPlane
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import run_job

SAMPLES = 150
COORDINATES = [(0.0, 0.0), (0.5, -0.25), (-1.0, 1.0), (1.0, 1.0), (0.25, 0.75)]
# Batched kernels may block their sums otherwise than one-point kernels (SeveralPoints).
BATCHED_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}
# Ground truth evaluates the whole set in one batch: other kernel blocking again.
TRUTH_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def setting(name: str, dtype: torch.dtype, points_per_pass: int, moved_buffers: bool = False):
    """An experiment-like namespace (digits, a seeded model) and a surface-like one (its
    directions, seeded; BN running statistics among them when ``moved_buffers``)."""
    data = load_dataset("digits", {})
    torch.manual_seed(0)
    model = build_model(name, data.input_shape, data.num_classes, {}).to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    directions = []
    for _ in range(2):
        direction = {
            n: 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
            for n, p in model.named_parameters()
        }
        if moved_buffers:
            for n, b in model.named_buffers():
                if n.endswith(("running_mean", "running_var")):  # variances stay positive
                    direction[n] = 0.05 * torch.rand(
                        b.shape, generator=generator, dtype=torch.float64
                    )
        directions.append({n: d.numpy() for n, d in direction.items()})
    inputs = torch.as_tensor(data.train_x[:SAMPLES]).to(dtype)
    targets = torch.as_tensor(data.train_y[:SAMPLES])
    experiment = SimpleNamespace(
        model=model,
        forward=model,
        autocast=None,
        objective=build_objective("cross_entropy", {}),
        device=torch.device("cpu"),
        data=Dataset(inputs, targets, inputs, targets, data.num_classes),
        config=SimpleNamespace(
            evaluation=EvaluationConfig(batch_size=64, points_per_pass=points_per_pass)
        ),
    )
    grid = SimpleNamespace(coordinates=lambda item: COORDINATES[item])
    surface = SimpleNamespace(grid=grid, directions=lambda: directions)
    return experiment, surface


def truth(experiment, surface) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at each point of a model no evaluator has moved, its tensors set
    one by one from the sum formed in float64 and rounded once, the whole set in one
    batch."""
    model = experiment.model
    origin = {n: t.detach().double().clone() for n, t in model.state_dict().items()}
    d1, d2 = surface.directions()
    inputs, targets = experiment.data.train_x, experiment.data.train_y
    losses, accuracies = [], []
    for a, b in COORDINATES:
        state = dict(origin)
        for name in d1:
            state[name] = (
                origin[name] + a * torch.as_tensor(d1[name]) + b * torch.as_tensor(d2[name])
            )
        copy = deepcopy(model)  # the model at the point
        copy.load_state_dict({n: v.to(model.state_dict()[n].dtype) for n, v in state.items()})
        with torch.no_grad():
            outputs = copy(inputs)
        losses.append(F.cross_entropy(outputs, targets, reduction="none").double().mean().item())
        accuracies.append((outputs.argmax(1) == targets).double().mean().item())
    return np.array(losses), np.array(accuracies)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name, moved_buffers",
    [("mlp", False), ("small_cnn", False), ("small_cnn", True), ("resnet20", False)],
)
def test_several_points_per_pass_match_ground_truth_and_one_point(name, moved_buffers, dtype):
    maps = ["train_loss", "train_acc"]
    items = np.arange(len(COORDINATES))
    loss, accuracy = truth(*setting(name, dtype, 1, moved_buffers))
    experiment, surface = setting(name, dtype, 3, moved_buffers)
    batched = loss_evaluator(experiment, surface, maps)
    assert isinstance(batched, SeveralPoints) and batched.items_per_call == 3
    several = {m: np.concatenate([batched(items[:3])[m], batched(items[3:])[m]]) for m in maps}
    experiment, surface = setting(name, dtype, 1, moved_buffers)
    single = loss_evaluator(experiment, surface, maps)
    assert isinstance(single, PointByPoint)
    one = single(items)
    np.testing.assert_allclose(several["train_loss"], one["train_loss"], rtol=BATCHED_RTOL[dtype])
    np.testing.assert_array_equal(several["train_acc"], one["train_acc"])
    np.testing.assert_allclose(several["train_loss"], loss, rtol=TRUTH_RTOL[dtype])
    np.testing.assert_array_equal(several["train_acc"], accuracy)
    assert len(set(loss)) == len(loss)  # the points differ: the parameters did move


class ItemInForward(nn.Module):
    """Data-dependent Python control flow: vmap cannot batch ``.item()``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        scale = 2.0 if self.linear.weight.sum().item() > 0 else 1.0
        return self.linear(x.flatten(1)) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_vmap_cannot_batch_falls_back_to_one_point_and_says_so(dtype, caplog):
    experiment, surface = setting("mlp", dtype, 0)
    with_model(experiment, surface, ItemInForward(), dtype)
    loss, _ = truth(experiment, surface)
    plane = DirectionPlane(experiment.model, surface.directions())
    assert "item" in try_batching(experiment, plane).problem
    with caplog.at_level(logging.INFO, logger="landscape.evaluators"):
        evaluator = loss_evaluator(experiment, surface, ["train_loss"])
    assert isinstance(evaluator, PointByPoint) and evaluator.items_per_call == 1
    assert "one point per forward pass; vmap cannot batch the model" in caplog.text
    values = evaluator(np.arange(2))["train_loss"]
    np.testing.assert_allclose(values, loss[:2], rtol=TRUTH_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_per_pass_from_memory_on_a_gpu_and_one_on_a_cpu(dtype, monkeypatch):
    experiment, surface = setting("mlp", dtype, 0)
    assert loss_evaluator(experiment, surface, ["train_loss"]).items_per_call == 1
    parameters = sum(p.numel() for p in experiment.model.parameters())
    # Flatten (64), two hidden layers (64, 64) and the logits (10), with the ReLUs.
    activations = 64 * (64 + 4 * 64 + 10) * torch.finfo(dtype).bits // 8
    per_point = activations + parameters * torch.finfo(dtype).bits // 8
    experiment.device = torch.device("cuda")  # only its free memory is asked for
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * (5 * per_point + 1), 0))
    assert loss_evaluator(experiment, surface, ["train_loss"]).items_per_call == 5
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**40, 0))
    assert loss_evaluator(experiment, surface, ["train_loss"]).items_per_call == 32


def with_model(experiment, surface, model: nn.Module, dtype: torch.dtype) -> None:
    """``model`` (seeded) in ``experiment``, with seeded directions of its parameters."""
    torch.manual_seed(0)
    experiment.model = experiment.forward = model.to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    directions = [
        {
            n: torch.randn(p.shape, generator=generator, dtype=torch.float64).numpy()
            for n, p in experiment.model.named_parameters()
        }
        for _ in range(2)
    ]
    surface.directions = lambda: directions


class ConvolutionStem(nn.Module):
    """One convolution of the data (as a patch embedding), then a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 4, stride=4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stem(x).flatten(1))


class FunctionalConvolutions(nn.Module):
    """Two convolutions through ``F.conv2d`` with its own parameters (no nn.Conv2d)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(0.3 * torch.randn(4, 1, 3, 3))
        self.second = nn.Parameter(0.3 * torch.randn(10, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(F.relu(F.conv2d(x, self.first)), self.second).mean((2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "model, grouped",
    [("small_cnn", True), (FunctionalConvolutions, True), (ConvolutionStem, False)],
    ids=["small_cnn", "functional_convolutions", "convolution_stem"],
)
def test_k_from_memory_on_a_gpu_only_where_vmap_groups_no_convolution(
    dtype, model, grouped, monkeypatch, caplog
):
    """vmap runs a convolution of batched activations as a grouped one, slower per point
    than one point at a time; a convolution of the data itself stays a plain one."""
    experiment, surface = setting("small_cnn" if isinstance(model, str) else "mlp", dtype, 0)
    if not isinstance(model, str):
        with_model(experiment, surface, model(), dtype)
    plane = DirectionPlane(experiment.model, surface.directions())
    assert try_batching(experiment, plane).grouped_convolutions == grouped
    experiment.device = torch.device("cuda")  # only its free memory could be asked for
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**40, 0))
    with caplog.at_level(logging.INFO, logger="landscape.evaluators"):
        evaluator = loss_evaluator(experiment, surface, ["train_loss"])
    assert evaluator.items_per_call == (1 if grouped else 32)
    assert ("would group the convolutions" in caplog.text) == grouped


def test_negative_points_per_pass_is_one_line():
    with pytest.raises(ConfigError) as error:
        EvaluationConfig(points_per_pass=-2).check("evaluation")
    assert str(error.value) == (
        "evaluation.points_per_pass: must be >= 0 (got -2); "
        "0 = from memory, 1 = one point at a time"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "one, both, warned",
    [
        (0.010, 0.020, True),  # one thread in half the time: a collapse
        (0.030, 0.020, False),  # two threads faster: idle cores
        (0.012, 0.020, False),  # one a little faster: a small model's split overhead
        (0.0005, 0.001, False),  # a tiny pass: too short to tell
    ],
)
def test_cpu_run_says_so_where_one_thread_is_faster_and_keeps_its_threads(
    dtype, one, both, warned, monkeypatch, caplog
):
    experiment, _ = setting("mlp", dtype, 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    measured = iter([both, one])  # all threads first, then one
    monkeypatch.setattr(workers, "fastest_seconds", lambda run: (run(), next(measured))[1])
    with caplog.at_level(logging.INFO, logger="landscape.workers"):
        workers.warn_if_one_thread_faster(experiment)
    assert chosen == [1, 2]  # back to its threads
    logged = (
        f"a forward pass took {1000 * one:.1f} ms on 1 CPU thread, {1000 * both:.1f} ms on 2: "
        "the cores are busy (other processes?); evaluation.threads: 1 may run faster"
    )
    assert (logged in caplog.text) == warned


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("writer", ["serial", "parts"])
def test_k_points_per_call_span_one_point_shards_and_match_one_at_a_time(
    tmp_path, dtype, writer, monkeypatch
):
    # 20 points in 20 one-point shards: K = 4 is reached only by claiming 4 shards at once.
    calls, evaluate = [], SeveralPoints.__call__

    def counted(self, items):
        calls.append(len(items))
        return evaluate(self, items)

    monkeypatch.setattr(SeveralPoints, "__call__", counted)
    maps = {}
    for k in (1, 4):
        config = write_experiment(
            tmp_path,
            f"k{k}",
            evaluation={"dtype": dtype, "points_per_pass": k},
            grid={**BASE["grid"], "shard_size": 1},
        )
        path = plan_surface(load_config(config))
        run_job(path, "loss", show_progress=False, writer=writer)
        with SurfaceFile.open(path) as surface:
            assert surface.done("loss").all() and len(surface.shards("loss")) == 20
            maps[k] = surface.maps()
    assert calls == [4] * 5  # K = 1 takes the one-point evaluator
    for name in BASE["maps"]:
        if name.endswith("_acc"):
            np.testing.assert_array_equal(maps[4][name], maps[1][name])
        else:
            rtol = BATCHED_RTOL[getattr(torch, dtype)]
            np.testing.assert_allclose(maps[4][name], maps[1][name], rtol=rtol)
    assert len(set(maps[1]["train_loss"].reshape(-1))) == 20  # the points differ


# Each rank's K from "its free GPU memory": 2 on rank 0, 4 on rank 1.
K_BY_RANK = """
import os, sys
from landscape import cli, evaluators
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
evaluators.points_per_pass = lambda experiment, plane, trial: 2 + 2 * rank
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: `make install` builds it")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ranks_whose_memory_allows_different_k_all_take_the_least(tmp_path, dtype):
    """The maps of two ranks that would take K = 2 and 4 are those of one process at
    K = 2 bit for bit: the same points share each pass (16 shards: no cap binds)."""
    maps, logs = {}, {}
    for ranks, k in ((2, 0), (1, 2)):  # 0: K from memory
        changes = {"evaluation": {"points_per_pass": k, "dtype": dtype}, **GRID}
        path = plan_surface(load_config(write_experiment(tmp_path, f"ranks{ranks}", **changes)))
        command = [MPIEXEC, "--oversubscribe", "-n", str(ranks), sys.executable, "-c", K_BY_RANK]
        done = subprocess.run(
            [*command, "run", str(path), "--no-progress"],
            env=MPI_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        logs[ranks] = done.stderr
        with SurfaceFile.open(path) as surface:
            assert surface.done("loss").all()
            maps[ranks] = surface.maps()
    said = "2 points per call on every rank (the least any rank takes; this one: 4)"
    assert said in logs[2]
    for name, values in maps[1].items():
        np.testing.assert_array_equal(maps[2][name], values, err_msg=name)
