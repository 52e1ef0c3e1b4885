"""The GPU path against the CPU: the same surface, extreme eigenvalues, Hutchinson trace,
spectra and curvature products on both devices, each to its dtype's tolerance; a surface
whose data and model live on the GPU with no host synchronization per batch; two MPI
ranks sharing one GPU. Every test is marked ``cuda`` (``pytest -m cuda`` runs them
alone) and skipped where no GPU is visible.

Tolerances. The two devices run other kernels (cuDNN's convolutions, cuBLAS's GEMMs),
which sum in another order, so values agree to rounding, not to the bit:

- maps: relative RTOL of the dtype, the tolerance tests/test_reference.py holds the
  stored reference to off its own machine (float32 1e-5, about 80 epsilons; float64
  1e-12). Accuracy may differ by one sample in float32, where a logit near-tie can flip
  under rounding of 1e-7; in float64 it must be equal.
- curvature products M v: entrywise within RTOL sqrt(n) ||M v||. For a Rademacher v,
  ||M v|| estimates ||M||_F >= ||M||_2 and ||v|| = sqrt(n), so this is at least RTOL
  ||M|| ||v||, the scale a product's rounding is bounded by; a wrong term errs by O(1).
- eigenvalues: each device's Ritz value lies within its residual of an eigenvalue, the
  residual being true to within the products' rounding, ROUNDING_FLOOR eps S
  (:mod:`landscape.curvature.lanczos`; S the larger magnitude of the two ends), so the
  two differ by at most the sum of the two residuals plus twice that. Without it, float32
  failed on an H200: 5.8e-8 apart at lambda_max = 8.9 with residuals read from Lanczos'
  kept products of 2.6e-8 in all, below float32's eps S = 1.1e-6.
- SLQ moments tr(H^j)/n: per probe v^T H^j v / n, a quadratic form, so within RTOL
  j S^j (S the spectral scale: each product adds one rounding of ||H||).
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CROSS_ENTROPY,
    LANDSCAPE,
    MODELS,
    MPI_ENV,
    MPIEXEC,
    hessian_operator,
    small_model,
    write_experiment,
)
from test_precision import logits_at_points

from landscape.config import load_config
from landscape.curvature.lanczos import ROUNDING_FLOOR
from landscape.curvature.operators import GaussNewtonOperator, select_parameters
from landscape.curvature.spectrum import (
    rademacher_probe,
    stochastic_lanczos_quadrature,
    top_eigenpairs,
)
from landscape.curvature.trace import trace_and_frobenius
from landscape.evaluate import evaluate
from landscape.evaluators import LossAtPoint, SeveralPoints
from landscape.experiment import Experiment
from landscape.parameters import DirectionPlane
from landscape.plan import plan_surface
from landscape.precision import set_tf32
from landscape.samples import HeldSamples
from landscape.store import SurfaceFile
from landscape.workers import run_job

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU visible)"),
]

DEVICE = "cuda"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
UNIT_ROUNDOFFS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
MODES = ("forward_over_reverse", "double_backward")


def planned(folder: Path, name: str, model: str, device: str, dtype: str, **changes) -> Path:
    """A planned surface of conftest's ``model`` (seed 0, so every name gets the same
    checkpoint and directions) on ``device`` in ``dtype``."""
    network, data = MODELS[model]
    evaluation = {"device": device, "dtype": dtype, **changes.pop("evaluation", {})}
    config = write_experiment(
        folder, name, model=network, data=data, evaluation=evaluation, **changes
    )
    return plan_surface(load_config(config))


def maps_of(path: Path, job: str) -> dict[str, np.ndarray]:
    with SurfaceFile.open(path) as surface:
        assert surface.done(job).all(), f"{path.name}: {job} job unfinished"
        return surface.maps()


def on_device(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """A copy of ``model`` and the data, on the GPU."""
    return copy.deepcopy(model).to(DEVICE), inputs.to(DEVICE), targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_surface_agrees_with_the_cpu(tmp_path, dtype):
    """The loss job on the BatchNorm CNN (digits, 20 points, 4 maps, batch 16) with
    evaluation.device cuda in the config: data and model on the GPU."""
    cpu = planned(tmp_path, "cpu", "cnn_bn", "cpu", dtype)
    gpu = planned(tmp_path, "gpu", "cnn_bn", DEVICE, dtype)
    experiment = Experiment.load(load_config(tmp_path / "gpu.yaml"))
    assert experiment.data.train_x.device.type == "cuda"
    assert next(experiment.model.parameters()).device.type == "cuda"
    for path in (cpu, gpu):
        run_job(path, "loss", show_progress=False)
    expected, actual = maps_of(cpu, "loss"), maps_of(gpu, "loss")
    rtol = RTOL[DTYPES[dtype]]
    samples = {split: len(experiment.data.split(split)) for split in ("train", "test")}
    for name, values in expected.items():
        split, kind = name.split("_")
        where = f"{name} ({dtype}), CUDA against CPU"
        if kind == "loss":
            np.testing.assert_allclose(actual[name], values, rtol=rtol, err_msg=where)
        else:
            flipped = 1 / samples[split] if dtype == "float32" else 0
            np.testing.assert_allclose(actual[name], values, rtol=0, atol=flipped, err_msg=where)


def synchronizations(function) -> int:
    """How many times ``function()`` makes the host wait for the GPU (CUDA's sync debug
    mode warns once for each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing CUDA operation" in str(warning.message) for warning in caught)


def never_waits(function, what: str) -> None:
    """``function()`` under CUDA's sync debug mode "error": the first operation that
    makes the host wait raises, and the failure names it with its traceback."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        function()
    except RuntimeError as exc:
        if "synchronizing" not in str(exc):
            raise
        pytest.fail(f"{what} waits for the GPU: {exc}\n{traceback.format_exc()}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_no_host_synchronization_per_batch(tmp_path):
    """Moving to a grid point never waits for the GPU (sync debug mode "error" around
    DirectionPlane.move_to); a grid point's evaluation waits exactly once per data set
    however many batches (one transfer of both sums), K points per pass as often in 12
    batches as in one, and a Hessian product as often in 12 batches as in one."""
    path = planned(tmp_path, "gpu", "cnn_bn", DEVICE, "float32")
    config = load_config(tmp_path / "gpu.yaml")
    experiment = Experiment.load(config)
    samples = experiment.data.split("test")  # 1708 digits
    inputs, targets = samples.inputs, samples.targets
    with SurfaceFile.open(path) as surface:
        directions, grid = surface.directions(), surface.grid
    plane = DirectionPlane(experiment.model, directions)
    point = LossAtPoint(experiment, plane, ["test_loss"])
    point(0.5, 0.5)  # warm-up: cuDNN's first calls may wait
    never_waits(lambda: plane.move_to(0.25, -0.5), "DirectionPlane.move_to")
    never_waits(lambda: plane.move_to(np.float64(-1.0), np.float64(0.75)), "move_to(numpy)")
    model = experiment.model

    def evaluation(batches: int):
        size = -(-len(inputs) // batches)
        return lambda: evaluate(model, samples, size, experiment.objective)

    for batches in (1, 12):
        waits = synchronizations(evaluation(batches))
        assert waits == 1, f"evaluate: {waits} waits in {batches} batches, 1 (its result) wanted"
    several = SeveralPoints(experiment, grid, plane, ["test_loss", "test_acc"], 4)
    counts = []
    for batches in (1, 12):
        experiment.config = replace(
            config, evaluation=replace(config.evaluation, batch_size=-(-len(inputs) // batches))
        )
        several(np.arange(4))  # warm-up
        counts.append(synchronizations(lambda: several(np.arange(4))))
    experiment.config = config
    assert counts[1] == counts[0], (
        f"4 points per pass: {counts[1]} waits in 12 batches, {counts[0]}"
    )
    for mode in MODES:
        counts = []
        for batches in (1, 12):
            size = -(-len(inputs) // batches)
            operator = hessian_operator(model, inputs, targets, CROSS_ENTROPY, size, hvp=mode)
            vector = torch.ones(operator.shape[0], device=DEVICE)
            operator.hvp(vector)  # warm-up
            counts.append(synchronizations(lambda op=operator, v=vector: op.hvp(v)))
        assert counts[1] == counts[0], f"{mode} HVP: {counts[1]} waits in 12 batches, {counts[0]}"


def test_tf32_follows_the_setting(tmp_path):
    """evaluation.tf32 sets both CUDA switches at load, either way (PyTorch's own default
    has cuDNN in TF32)."""
    network, data = MODELS["mlp"]
    try:
        for index, enabled in enumerate((True, False, True)):
            evaluation = {"device": DEVICE, "dtype": "float32", "tf32": enabled}
            config = write_experiment(
                tmp_path, f"tf32_{index}", model=network, data=data, evaluation=evaluation
            )
            Experiment.load(load_config(config))
            assert torch.backends.cudnn.allow_tf32 is enabled
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
    finally:
        set_tf32(False)


@pytest.mark.parametrize("dtype", sorted(UNIT_ROUNDOFFS))
def test_reduced_dtype_on_the_gpu(tmp_path, dtype):
    """The BN CNN's loss maps under autocast on the GPU against its float32 maps there,
    at every point within the loss bound of tests/test_precision.py (2 x 2 D u x the
    last layer's absolute terms, D = 3), the logit bound checked too; the check recorded
    at plan on the GPU."""
    reduced = planned(tmp_path, "reduced", "cnn_bn", DEVICE, dtype)
    exact = planned(tmp_path, "exact", "cnn_bn", DEVICE, "float32")
    for path in (reduced, exact):
        run_job(path, "loss", show_progress=False)
    with SurfaceFile.open(reduced) as surface:
        _, check = surface.group("precision")
        directions, grid = surface.directions(), surface.grid
    assert check["device"].startswith("cuda") and check["dtype"] == dtype
    values, reference = maps_of(reduced, "loss"), maps_of(exact, "loss")
    experiment = Experiment.load(load_config(tmp_path / "exact.yaml"))
    plane = DirectionPlane(experiment.model, directions)
    u, autocast = UNIT_ROUNDOFFS[dtype], getattr(torch, dtype)
    for point, z, z_reduced, terms in logits_at_points(experiment, plane, grid, "train", autocast):
        index = grid.index(point)
        logit_bound = 2 * 3 * u * terms.max(1).values
        assert ((z_reduced - z).abs().max(1).values <= logit_bound).all(), f"point {point}"
        difference = abs(values["train_loss"][index] - reference["train_loss"][index])
        assert difference <= 2 * logit_bound.mean().item(), f"train_loss at point {point}"
    assert not np.array_equal(values["train_loss"], reference["train_loss"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_agrees_on_the_gpu(tmp_path, dtype):
    """cuDNN's channels-last kernels against its default ones, to the dtype's RTOL."""
    default = planned(tmp_path, "default", "cnn_bn", DEVICE, dtype)
    layout = planned(tmp_path, "nhwc", "cnn_bn", DEVICE, dtype, evaluation={"channels_last": True})
    for path in (default, layout):
        run_job(path, "loss", show_progress=False)
    expected, actual = maps_of(default, "loss"), maps_of(layout, "loss")
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=RTOL[DTYPES[dtype]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_eigenvalues_agree_with_the_cpu(tmp_path, dtype):
    """The hessian job (Lanczos, tolerance 1e-4) at 9 points of the MLP on both devices:
    converged everywhere, and the ends within the sum of the two residuals."""
    changes = {"maps": ["lambda_min", "lambda_max"], "hessian": {"tolerance": 1e-4}}
    changes["grid"] = {"x": {"min": -1, "max": 1, "num": 3}, "y": {"min": -1, "max": 1, "num": 3}}
    cpu = planned(tmp_path, "cpu", "mlp", "cpu", dtype, **changes)
    gpu = planned(tmp_path, "gpu", "mlp", DEVICE, dtype, **changes)
    for path in (cpu, gpu):
        run_job(path, "hessian", show_progress=False)
    expected, actual = maps_of(cpu, "hessian"), maps_of(gpu, "hessian")
    for maps, device in ((expected, "CPU"), (actual, "CUDA")):
        assert (maps["hessian_converged"] == 1).all(), f"{device} ({dtype}) did not converge"
    scale = np.maximum(np.abs(expected["lambda_min"]), np.abs(expected["lambda_max"]))
    rounding = 2 * rounding_floor(DTYPES[dtype]) * scale
    for end in ("min", "max"):
        bound = expected[f"lambda_{end}_residual"] + actual[f"lambda_{end}_residual"] + rounding
        difference = np.abs(actual[f"lambda_{end}"] - expected[f"lambda_{end}"])
        worst = np.unravel_index(np.argmax(difference - bound), bound.shape)
        assert (difference <= bound).all(), (
            f"lambda_{end} ({dtype}): CUDA differs from CPU by {difference[worst]:.3g} at grid "
            f"index {worst}, more than the residuals plus rounding allow there "
            f"({bound[worst]:.3g})"
        )


def rounding_floor(dtype: torch.dtype) -> float:
    """How far a residual may read below the true one, relative to the spectral scale:
    the products' rounding the Lanczos criterion floors its bound at."""
    return ROUNDING_FLOOR * torch.finfo(dtype).eps


def product_tolerance(products: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RTOL sqrt(n) ||M v|| for each row M v of ``products`` (module docstring)."""
    return RTOL[dtype] * products.shape[-1] ** 0.5 * products.norm(dim=-1, keepdim=True)


def assert_products_agree(expected: torch.Tensor, actual: torch.Tensor, dtype, what: str):
    expected, actual = expected.double().cpu(), actual.double().cpu()
    error = (actual - expected).abs() / product_tolerance(expected, dtype)
    assert error.max() <= 1, f"{what} ({dtype}): CUDA off by {error.max():.3g} x the tolerance"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_curvature_products_agree_with_the_cpu(dtype, mode):
    """Hessian (one vector and four in one pass) and Gauss-Newton products of the
    BatchNorm CNN on 89 digits, batch 16, for Rademacher vectors."""
    model, inputs, targets = small_model("cnn_bn", dtype)
    names = select_parameters(model, "all")
    size = sum(model.get_parameter(name).numel() for name in names)
    vectors = torch.stack([rademacher_probe(size, 0, index) for index in range(4)])
    results = []
    for problem in ((model, inputs, targets), on_device(model, inputs, targets)):
        hessian = hessian_operator(*problem, CROSS_ENTROPY, 16, hvp=mode)
        model_copy, batch_inputs, batch_targets = problem
        gauss_newton = GaussNewtonOperator(
            model_copy, names, HeldSamples(batch_inputs, batch_targets), CROSS_ENTROPY, 16, mode
        )
        results.append(
            {
                "H v": hessian.hvp(vectors[0]),
                "H V in one pass": hessian.hvp_many(vectors),
                "G v": gauss_newton.hvp(vectors[0]),
            }
        )
    for what, expected in results[0].items():
        assert_products_agree(expected, results[1][what], dtype, f"{what}, {mode}")


@pytest.mark.parametrize("per_pass", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_hutchinson_trace_agrees_with_the_cpu(dtype, per_pass):
    """tr(H) and ||H||_F^2 by 8 Rademacher probes, seed 0: the same probes on both devices
    (drawn on the CPU), so each sample agrees, not only the mean."""
    model, inputs, targets = small_model("cnn_bn", dtype)
    found = [
        trace_and_frobenius(
            hessian_operator(*problem, CROSS_ENTROPY, 16), samples=8, seed=0, per_pass=per_pass
        )
        for problem in ((model, inputs, targets), on_device(model, inputs, targets))
    ]
    cpu, gpu = found
    size = sum(p.numel() for p in model.parameters())
    # |z^T (H z)' - z^T H z| <= ||z|| ||(H z)' - H z||: the product tolerance times sqrt(n).
    tolerance = RTOL[dtype] * size * np.sqrt(cpu.frobenius_squared.samples)
    np.testing.assert_array_less(
        np.abs(gpu.trace.samples - cpu.trace.samples), tolerance, err_msg=f"tr(H) ({dtype})"
    )
    np.testing.assert_allclose(
        gpu.frobenius_squared.samples,
        cpu.frobenius_squared.samples,
        rtol=4 * RTOL[dtype] * np.sqrt(size),
        err_msg=f"||H||_F^2 ({dtype})",
    )
    assert gpu.hvps == cpu.hvps == 8


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_spectrum_agrees_with_the_cpu(dtype):
    """SLQ (2 probes of 24 steps) and the top 3 eigenpairs of the BatchNorm CNN's Hessian,
    with the basis on each device."""
    model, inputs, targets = small_model("cnn_bn", dtype)
    results = []
    for problem in ((model, inputs, targets), on_device(model, inputs, targets)):
        operator = hessian_operator(*problem, CROSS_ENTROPY, 16)
        size, device = operator.shape[0], problem[1].device
        quadrature = stochastic_lanczos_quadrature(
            operator.hvp, size, probes=2, steps=24, seed=0, dtype=dtype, device=device
        )
        top = top_eigenpairs(operator.hvp, size, 3, 1e-4, size, seed=0, dtype=dtype, device=device)
        results.append((quadrature, top))
    (slq_cpu, top_cpu), (slq_gpu, top_gpu) = results
    scale = max(abs(value) for value in slq_cpu.span())
    for power in range(1, 5):
        np.testing.assert_allclose(
            slq_gpu.moment_samples(power),
            slq_cpu.moment_samples(power),
            rtol=0,
            atol=RTOL[dtype] * power * scale**power,
            err_msg=f"SLQ moment {power} ({dtype})",
        )
    assert top_cpu.pair_converged.all() and top_gpu.pair_converged.all()
    rounding = 2 * rounding_floor(dtype) * np.abs(top_cpu.values).max()
    bound = top_cpu.residuals + top_gpu.residuals + rounding
    difference = np.abs(top_gpu.values - top_cpu.values)
    assert (difference <= bound).all(), f"top 3 ({dtype}): {difference} beyond {bound}"
    assert top_gpu.vectors.device.type == "cuda"


@pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs mpiexec and mpi4py for two ranks",
)
def test_two_ranks_share_one_gpu(tmp_path):
    """``mpiexec -n 2 landscape run`` with evaluation.device cuda: both ranks on the one
    GPU (node rank modulo visible GPUs), part files merged, the maps of one CUDA process."""
    single = planned(tmp_path, "single", "cnn_bn", DEVICE, "float64")
    shared = planned(tmp_path, "shared", "cnn_bn", DEVICE, "float64")
    run_job(single, "loss", show_progress=False)
    command = [MPIEXEC, "--oversubscribe", "-n", "2", *LANDSCAPE, "run", str(shared)]
    done = subprocess.run(
        [*command, "--writer", "parts", "--no-progress"],
        env={**MPI_ENV, "CUDA_VISIBLE_DEVICES": "0"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected, actual = maps_of(single, "loss"), maps_of(shared, "loss")
    for name, values in expected.items():
        np.testing.assert_allclose(actual[name], values, rtol=RTOL[torch.float64], err_msg=name)
