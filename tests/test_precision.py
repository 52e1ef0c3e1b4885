"""Reduced precision and the other GPU-path settings, on the CPU: evaluation.dtype
bfloat16 (autocast; its measured difference to float32 recorded at plan and shown by
status), curvature staying float32, evaluation.tf32 stored, channels_last giving the
same maps, and compile falling back to eager.

The bfloat16 tolerance. bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8.
Under autocast every matrix product and convolution takes its two operands rounded to
bfloat16 and accumulates in float32: each of the D such layers adds at most 2u relative
to the sum of the absolute values of its terms (the standard first-order forward error
of a dot product). Taking S_ij = sum_k |W_jk h_ik| + |b_j|, the last layer's absolute
terms in float32, as the scale of every layer's (these nets have D = 3 and no layer
that amplifies), each logit moves by |dz_ij| <= 2 D u max_j S_ij; the tests check that
bound directly at every point. The rest is exact: the cross-entropy's gradient in the
logits, softmax - onehot, has l1 norm <= 2, so the mean loss moves by at most
2 mean_i (2 D u max_j S_ij); a prediction can flip only where the float32 top-two gap
is below twice the logit bound, so the accuracy moves by at most the fraction of such
samples. (Measured: |dz| reached 2.9 u max S on these nets with their weights tripled,
against the bound's 6.)

compile: ``torch.compile`` of the small CNN took 43 s on this project's 2 loaded
cores (a C++ build per graph), too slow for the suite; only the fallback path is
tested, by a compiler that fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODELS, write_experiment
from torch.nn import functional as F

from landscape.config import load_config
from landscape.errors import UserError
from landscape.evaluate import outputs_of
from landscape.experiment import CompiledForward, Experiment, compiler_keeps_layout
from landscape.parameters import DirectionPlane
from landscape.plan import plan_surface
from landscape.precision import set_tf32
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.workers import run_job

UNIT_ROUNDOFF = 2.0**-8  # bfloat16's u
LOSS_MAPS = ("train_loss", "train_acc", "test_loss", "test_acc")


def surface(folder: Path, name: str, model: str, run: bool = True, **evaluation) -> Path:
    """Conftest's ``model`` (seed 0: the same checkpoint and directions for every name),
    planned with ``evaluation`` changes, its loss job run unless ``run`` is false."""
    network, data = MODELS[model]
    config = write_experiment(
        folder, name, model=network, data=data, evaluation={"dtype": "float32", **evaluation}
    )
    path = plan_surface(load_config(config))
    if run:
        run_job(path, "loss", show_progress=False)
    return path


def maps_of(path: Path) -> dict[str, np.ndarray]:
    with SurfaceFile.open(path) as opened:
        return opened.maps()


@torch.no_grad()
def mean_loss_and_accuracy(model, inputs, targets, autocast: bool) -> tuple[float, float]:
    """The mean cross-entropy and accuracy written out: batches of 16 (the config's), the
    forward pass under bfloat16 autocast or not, each sample's loss from float32 logits,
    the sum in float64 batch after batch."""
    total, correct = 0.0, 0
    for start in range(0, len(inputs), 16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs[start : start + 16])
        logits, labels = logits.float(), targets[start : start + 16]
        total += F.cross_entropy(logits, labels, reduction="none").double().sum().item()
        correct += int((logits.argmax(1) == labels).sum())
    return total / len(inputs), correct / len(inputs)


def test_recorded_differences_equal_a_direct_recomputation(tmp_path):
    """The precision group's values at the centre and the far corner are the full-data
    loss and accuracy evaluated there with and without autocast, bit for bit; the run's
    bfloat16 map holds the same value at the corner."""
    path = surface(tmp_path, "bf16", "cnn_bn", dtype="bfloat16")
    with SurfaceFile.open(path) as opened:
        _, attrs = opened.group("precision")
        directions, grid = opened.directions(), opened.grid
        maps = opened.maps()
    np.testing.assert_array_equal(attrs["points"], [[0, 0], [grid.x[-1], grid.y[-1]]])
    assert attrs["dtype"] == "bfloat16" and attrs["curvature_dtype"] == "float32"
    assert "|reduced - float32|" in attrs["estimator"] and attrs["device"] == "cpu"
    experiment = Experiment.load(load_config(tmp_path / "bf16.yaml"))
    assert experiment.autocast == torch.bfloat16 and experiment.dtype == torch.float32
    plane = DirectionPlane(experiment.model, directions)
    for split in ("train", "test"):
        inputs, targets = (
            getattr(experiment.data, f"{split}_x"),
            getattr(experiment.data, f"{split}_y"),
        )
        found = {"reduced": [], "float32": []}
        for dtype, autocast in (("reduced", True), ("float32", False)):
            for point in attrs["points"]:
                plane.move_to(*point)
                found[dtype].append(
                    mean_loss_and_accuracy(experiment.model, inputs, targets, autocast)
                )
        for index, kind in enumerate(("loss", "acc")):
            name = f"{split}_{kind}"
            reduced = np.array([values[index] for values in found["reduced"]])
            exact = np.array([values[index] for values in found["float32"]])
            np.testing.assert_array_equal(attrs[f"{name}_reduced"], reduced, err_msg=name)
            np.testing.assert_array_equal(attrs[f"{name}_float32"], exact, err_msg=name)
            np.testing.assert_array_equal(attrs[f"{name}_abs_difference"], np.abs(reduced - exact))
            if kind == "loss":
                relative = np.abs(reduced - exact) / np.abs(exact)
                np.testing.assert_array_equal(attrs[f"{name}_rel_difference"], relative)
                assert (reduced != exact).all(), f"{name}: bfloat16 changed nothing"
            assert maps[name][-1, -1] == reduced[1], f"{name}: map and check differ at the corner"


def logits_at_points(
    experiment: Experiment, plane: DirectionPlane, grid, split: str, autocast=torch.bfloat16
):
    """At every grid point: the float32 logits of ``split``, their counterparts under
    ``autocast``, and the last layer's absolute terms S (module docstring)."""
    inputs = getattr(experiment.data, f"{split}_x")
    last = [m for m in experiment.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    terms = {}

    def absolute_terms(layer, args, output):
        terms["S"] = args[0].abs() @ layer.weight.abs().T + layer.bias.abs()

    for point in range(grid.size):
        plane.move_to(*grid.coordinates(point))
        with torch.no_grad():
            hook = last.register_forward_hook(absolute_terms)
            logits = experiment.model(inputs)
            hook.remove()
            yield point, logits, outputs_of(experiment.model, inputs, autocast), terms["S"]


@pytest.mark.parametrize("model, points_per_pass", [("mlp", 1), ("cnn_bn", 1), ("mlp", 4)])
def test_bfloat16_map_is_the_float32_map_to_its_tolerance(tmp_path, model, points_per_pass):
    """Every point of the bfloat16 loss and accuracy maps (one point per pass, and four
    through vmap) within the module docstring's bounds of the float32 maps, the logit
    bound itself checked at each point."""
    reduced = maps_of(
        surface(tmp_path, "bf16", model, dtype="bfloat16", points_per_pass=points_per_pass)
    )
    exact_path = surface(tmp_path, "fp32", model)
    exact = maps_of(exact_path)
    experiment = Experiment.load(load_config(tmp_path / "fp32.yaml"))
    with SurfaceFile.open(exact_path) as opened:
        plane, grid = DirectionPlane(experiment.model, opened.directions()), opened.grid
    layers = sum(
        isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in experiment.model.modules()
    )
    for split in ("train", "test"):
        for point, z, z_reduced, terms in logits_at_points(experiment, plane, grid, split):
            index = grid.index(point)
            logit_bound = 2 * layers * UNIT_ROUNDOFF * terms.max(1).values
            logit_error = (z_reduced - z).abs().max(1).values
            assert (logit_error <= logit_bound).all(), f"{split} logits at point {point}"
            loss_bound = 2 * logit_bound.mean().item()
            difference = abs(reduced[f"{split}_loss"][index] - exact[f"{split}_loss"][index])
            assert difference <= loss_bound, f"{split}_loss at point {point}"
            top_two = z.topk(2, dim=1).values
            near_ties = (top_two[:, 0] - top_two[:, 1] < 2 * logit_bound).double().mean().item()
            flipped = abs(reduced[f"{split}_acc"][index] - exact[f"{split}_acc"][index])
            assert flipped <= near_ties + 1e-12, f"{split}_acc at point {point}"
        assert not np.array_equal(reduced[f"{split}_loss"], exact[f"{split}_loss"])


def test_status_shows_the_measured_differences(tmp_path):
    path = surface(tmp_path, "bf16", "mlp", run=False, dtype="bfloat16")
    with SurfaceFile.open(path) as opened:
        _, attrs = opened.group("precision")
    (line,) = [line for line in surface_status(path).splitlines() if "precision:" in line]
    centre, corner = attrs["train_loss_abs_difference"]
    assert line.startswith("  precision: bfloat16 autocast loss maps")
    assert f"train_loss {centre:.2g}, {corner:.2g} (rel " in line
    assert "at the centre, corner (1, 1) (on cpu, at plan)" in line
    assert "precision:" not in surface_status(surface(tmp_path, "fp32", "mlp", run=False))


def test_curvature_stays_float32(tmp_path):
    """The hessian job of a bfloat16 experiment is the float32 one's, bit for bit: only
    the loss maps' forward passes autocast."""
    changes = {
        "maps": ["lambda_min", "lambda_max"],
        "grid": {"x": {"min": -1, "max": 1, "num": 3}, "y": {"min": -1, "max": 1, "num": 2}},
    }
    network, data = MODELS["mlp"]
    found = []
    for dtype in ("bfloat16", "float32"):
        config = write_experiment(
            tmp_path, dtype, model=network, data=data, evaluation={"dtype": dtype}, **changes
        )
        path = plan_surface(load_config(config))
        run_job(path, "hessian", show_progress=False)
        with SurfaceFile.open(path) as opened:
            found.append((opened.maps(), opened.work("hessian").attrs["hvp_dtype"]))
    (reduced, reduced_dtype), (exact, exact_dtype) = found
    assert reduced_dtype == exact_dtype == "float32"
    for name, values in exact.items():
        np.testing.assert_array_equal(reduced[name], values, err_msg=name)


def test_a_dtype_torch_cannot_autocast_is_refused_in_one_line(tmp_path, monkeypatch):
    network, data = MODELS["mlp"]
    config = load_config(
        write_experiment(tmp_path, model=network, data=data, evaluation={"dtype": "float16"})
    )

    def no_autocast(device_type, dtype):
        raise RuntimeError(f"Currently, AutocastCPU only support {dtype} of bfloat16\nmore")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    with pytest.raises(UserError) as caught:
        Experiment.load(config)
    message = str(caught.value)
    assert message.startswith("evaluation.dtype: torch ") and "\n" not in message
    assert "cannot autocast to float16 on cpu (RuntimeError: Currently" in message


def test_tf32_setting_is_stored_and_shown(tmp_path):
    """evaluation.tf32 is in the file (its config and float32_products) for every rank,
    status says so; set_tf32 turns both CUDA switches on and off."""
    path = surface(tmp_path, "tf32", "mlp", run=False, tf32=True)
    with SurfaceFile.open(path) as opened:
        assert opened.attrs["float32_products"] == "tf32"
        assert opened.config.evaluation.tf32 is True
    assert "  precision: float32 products in TF32 on CUDA (evaluation.tf32)" in surface_status(path)
    with SurfaceFile.open(surface(tmp_path, "ieee", "mlp", run=False)) as opened:
        assert opened.attrs["float32_products"] == "ieee"
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for enabled in (True, False):
            set_tf32(enabled)
            assert torch.backends.cudnn.allow_tf32 is enabled
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_channels_last_gives_the_same_maps(tmp_path, dtype):
    """The BN CNN's maps with images and conv weights in channels-last memory, against
    the default layout: other kernels, other summation order, so equal to rounding
    (float32 1e-5, float64 1e-12 relative; accuracy to one sample in float32, where a
    logit near-tie may flip), not to the bit."""
    default = maps_of(surface(tmp_path, "default", "cnn_bn", dtype=dtype))
    layout = maps_of(surface(tmp_path, "nhwc", "cnn_bn", dtype=dtype, channels_last=True))
    experiment = Experiment.load(load_config(tmp_path / "nhwc.yaml"))
    assert experiment.data.train_x.is_contiguous(memory_format=torch.channels_last)
    convolutions = [m for m in experiment.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions[-1].weight.is_contiguous(memory_format=torch.channels_last)
    assert not convolutions[-1].weight.is_contiguous()
    rtol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    samples = {split: len(experiment.data.split(split)) for split in ("train", "test")}
    for name in LOSS_MAPS:
        split, kind = name.split("_")
        if kind == "loss":
            np.testing.assert_allclose(layout[name], default[name], rtol=rtol, err_msg=name)
        else:
            flip = 1 / samples[split] if dtype == "float32" else 0
            np.testing.assert_allclose(layout[name], default[name], rtol=0, atol=flip)


def test_channels_last_refused_for_inputs_that_are_not_images(tmp_path):
    network, data = MODELS["mlp"]
    config = write_experiment(
        tmp_path, model=network, data=data, evaluation={"channels_last": True}
    )
    with pytest.raises(
        UserError,
        match=r"^evaluation.channels_last: data 'gaussian_clusters' has "
        r"inputs of shape \(8,\), not images \(C, H, W\); set it false$",
    ):
        Experiment.load(load_config(config))


def test_compile_failure_falls_back_to_eager_in_one_line(tmp_path, monkeypatch, caplog):
    """A compiler that fails at its first call (as a missing C compiler does): one log
    line, and the maps of the eager model, bit for bit."""
    calls, options_given = [], []

    def failing_compile(model, options=None):
        options_given.append(options)

        def compiled(inputs):
            calls.append(len(inputs))
            raise torch._dynamo.exc.TorchDynamoException(
                "InductorError: CppCompileError: C++ compile error\ndetails"
            )

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    eager = maps_of(surface(tmp_path, "eager", "mlp"))
    with caplog.at_level(logging.WARNING, logger="landscape.experiment"):
        compiled = maps_of(surface(tmp_path, "compiled", "mlp", compile=True))
    for name in LOSS_MAPS:
        np.testing.assert_array_equal(compiled[name], eager[name], err_msg=name)
    warnings = [r.getMessage() for r in caplog.records if "evaluation.compile" in r.getMessage()]
    assert warnings == [
        "evaluation.compile: torch.compile failed, the forward pass runs eagerly "
        "(TorchDynamoException: InductorError: CppCompileError: C++ compile error)"
    ]
    assert len(calls) == 1, "a failed compile is tried again"
    assert options_given and set(options_given) == {None}, "on a CPU the compiler picks the layout"


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(
    "device, dtype, autocast, tf32, keeps",
    [
        (CUDA, torch.float32, None, False, True),  # IEEE float32: the CUDA cores
        (CUDA, torch.float64, None, False, True),
        (CUDA, torch.float64, None, True, True),  # TF32 never touches float64
        (CUDA, torch.float32, None, True, False),  # TF32: the tensor cores
        (CUDA, torch.float32, torch.bfloat16, False, False),
        (CUDA, torch.float32, torch.float16, False, False),
        (CPU, torch.float32, None, False, False),  # oneDNN's layout is the compiler's own
        (CPU, torch.float64, None, False, False),
    ],
)
def test_compiler_keeps_the_layout_where_convolutions_miss_the_tensor_cores(
    device, dtype, autocast, tf32, keeps
):
    assert compiler_keeps_layout(device, dtype, autocast, tf32) is keeps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_forward_with_the_layout_kept_is_the_model(dtype):
    """The option is one this torch's Inductor accepts (an unknown one raises when
    torch.compile is called, outside the fallback), and the compiled forward gives the
    eager model's outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten()).to(dtype)
    inputs = torch.randn(2, 1, 5, 5, dtype=dtype)
    compiled = CompiledForward(model, keep_layout=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs))
    assert compiled.compiled is not None, "compiling failed: the eager fallback ran"
