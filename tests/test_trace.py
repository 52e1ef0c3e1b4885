"""Curvature at the centre from loss values (Boettcher & Wheeler) and tr(H) by Hutchinson:
against closed forms and dense Hessians in float32 and float64, the labels that say what
each is, and a `landscape trace` killed at any write, or out of disk space, losing nothing."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import dense_hessian, trained_experiment
from killed_trace import trace_killed_after
from torch import nn
from torch.nn import functional as F

from landscape.config import TraceConfig, load_config
from landscape.curvature.trace import TraceEstimator, kinked_operations
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.hessian import training_hessian
from landscape.plan import plan_surface
from landscape.status import surface_status
from landscape.store import SurfaceFile, rewrite_group
from landscape.trace import HUTCHINSON_LABEL, estimate_trace, projection_label
from landscape.workers import run_job

DTYPES = ["float32", "float64"]


def trace_estimator(exp: Experiment, settings: TraceConfig) -> TraceEstimator:
    """What ``landscape trace`` estimates with, over all parameters."""
    operator = training_hessian(exp, "all", "forward_over_reverse")
    return TraceEstimator(operator, settings.step, settings.confidence, settings.seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_projection_interval_covers_the_quadratic_trace_for_most_seeds(experiment, dtype):
    """Linear model + mse: H = (2 / (N k)) [X 1]^T [X 1] (x) I_k, so tr(H) = (2 / N) ||[X 1]||^2.
    A 95% interval must cover it for at least 42 of 50 seeds (the binomial chance of
    fewer is below 0.1%)."""
    config = load_config(
        experiment(
            model={"name": "linear", "kwargs": {}},
            data={"name": "plugins:regression", "kwargs": {}},
            evaluation={"loss": "mse", "dtype": dtype},
            maps=["train_loss"],
        )
    )
    exp = Experiment.load(config)
    inputs = exp.data.train_x
    exact = 2 / len(inputs) * (float((inputs.double() ** 2).sum()) + len(inputs))
    covered = {"projection": 0, "hutchinson": 0}
    for seed in range(50):
        settings = dataclasses.replace(config.trace, samples=20, seed=seed)
        estimator = trace_estimator(exp, settings)
        covered["projection"] += estimator.from_loss_values(20).covers(exact)
        covered["hutchinson"] += estimator.hutchinson(20).covers(exact)
    assert covered["projection"] >= 42 and covered["hutchinson"] >= 42, covered


@pytest.mark.parametrize("dtype", DTYPES)
def test_smooth_net_trace_lies_in_both_intervals_and_is_stored_with_labels(
    experiment, dtype, caplog
):
    """A smooth (tanh) net, where both estimate tr(H). At step 1e-4 x ||theta||, n / e^2
    amplifies float32 loss rounding into a bias of about +11 on a trace of 7.2 (0.7
    half-width): float64 losses remove it. The truth is the dense float64 Hessian of the
    same parameters."""
    config = trained_experiment(
        experiment,
        "tanh_mlp",
        epochs=20,
        maps=["train_loss"],
        evaluation={"dtype": dtype},
        trace={"samples": 100, "step": 1e-4},
    )
    surface = plan_surface(load_config(config))
    with caplog.at_level(logging.WARNING):
        summary = estimate_trace(surface)
    assert "non-smooth" not in caplog.text and "non-smooth operations" not in summary

    exp = Experiment.load(load_config(config, ["evaluation.dtype=float64"]))
    estimator = trace_estimator(exp, load_config(config).trace)
    exact = float(np.trace(dense_hessian(estimator.operator)))
    with SurfaceFile.open(surface) as done:
        samples, attrs = done.group("trace")
    assert (
        attrs["dimension"] == estimator.dimension == sum(p.numel() for p in exp.model.parameters())
    )
    assert attrs["step"] == estimator.step and attrs["step_fraction"] == 1e-4
    assert attrs["projection_dtype"] == "float64" and attrs["hutchinson_dtype"] == dtype
    for name in ("projection", "hutchinson"):
        mean, half = attrs[f"{name}_mean"], attrs[f"{name}_half_width"]
        assert abs(mean - exact) <= half, (name, mean, half, exact)
        assert len(samples[name]) == 100 and mean == samples[name].mean()
        assert f"{mean:.6g}" in summary
    status = surface_status(surface)
    assert f"{projection_label(estimator.step)}: {attrs['projection_mean']:.6g} ±" in status
    assert f"{HUTCHINSON_LABEL}: {attrs['hutchinson_mean']:.6g} ±" in status
    # Running it again replaces the group with the same numbers (same seed).
    estimate_trace(surface)
    with SurfaceFile.open(surface) as again:
        np.testing.assert_array_equal(again.group("trace")[0]["projection"], samples["projection"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_net_estimates_are_labelled_with_the_step_and_kinks_are_warned(
    experiment, dtype, caplog
):
    config = load_config(
        experiment(maps=["train_loss"], evaluation={"dtype": dtype}, trace={"samples": 4})
    )
    surface = plan_surface(config)
    with caplog.at_level(logging.WARNING):
        summary = estimate_trace(surface)
    assert "non-smooth operations (relu ×1)" in caplog.text and "will differ" in caplog.text
    with SurfaceFile.open(surface) as done:
        attrs = done.group("trace")[1]
    step = attrs["step"]
    label = projection_label(step)
    assert label == (
        f"n × mean second difference of the loss at step ε = {step:.3g} (finite-difference "
        "curvature; includes kinks of non-smooth activations)"
    )
    assert attrs["projection_label"] == label and attrs["hutchinson_label"] == HUTCHINSON_LABEL
    assert attrs["non_smooth_operations"] == "relu ×1"
    assert label in summary and HUTCHINSON_LABEL in summary
    warning = "non-smooth operations (relu ×1): the two measure different things and will differ"
    assert "ε = 0.01 × ||θ||" in summary and warning in summary
    status = surface_status(surface)
    assert f"    {label}: " in status and warning in status
    assert "tr(H) at the centre" not in summary + status


class FunctionalKinks(nn.Module):
    """ReLU and max-pooling called as functions, not modules."""

    def forward(self, x):
        return F.max_pool1d(F.relu(x).unsqueeze(1), 2).flatten(1).clamp(min=0)


def test_kinked_operations_are_found_in_modules_and_in_functional_calls():
    inputs = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    kinked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LeakyReLU(), nn.ELU(alpha=2.0))
    assert kinked_operations(kinked, inputs) == {"elu": 1, "leaky_relu": 1, "relu": 1}
    assert kinked_operations(FunctionalKinks(), inputs) == {"clamp": 1, "max_pool1d": 1, "relu": 1}
    smooth = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.GELU(), nn.ELU(), nn.Softplus())
    assert kinked_operations(smooth, inputs) == {}


def test_a_file_traced_by_an_older_version_shows_its_step_and_is_traced_again(experiment):
    config = load_config(experiment(maps=["train_loss"], trace={"samples": 3}))
    surface = plan_surface(config)
    older = {"dimension": 83, "parameters": "all", "step": 0.0042, "confidence": 0.95}
    older.update(projection_mean=1.5, projection_half_width=0.5, seconds=(0.1, 0.1))
    older.update(hutchinson_mean=1.0, hutchinson_half_width=0.25)
    rewrite_group(surface, "trace", {"projection": np.ones(3), "hutchinson": np.ones(3)}, older)
    status = surface_status(surface)
    assert "    Hutchinson: 1 ± 0.25" in status
    assert "from loss values at step ε = 0.0042 (traced by an older version" in status
    estimate_trace(surface)
    assert "traced by an older version" not in surface_status(surface)


def contents(path) -> dict:
    """Every dataset's bytes and every attribute of an HDF5 file, by path (``/`` for the
    root's attributes), except the trace's timing."""
    found = {}
    with h5py.File(path, "r") as handle:
        found["/"] = dict(handle.attrs)

        def visit(name, item):
            attrs = {k: v for k, v in item.attrs.items() if k != "seconds"}
            if isinstance(item, h5py.Dataset):
                found[name] = (item.dtype.str, item.shape, item[()].tobytes(), attrs)
            else:
                found[name] = attrs

        handle.visititems(visit)
    return {name: repr(value) for name, value in found.items()}


def without_trace(found: dict) -> dict:
    return {name: value for name, value in found.items() if not name.startswith("trace")}


@pytest.mark.parametrize("traced_before", [False, True], ids=["first", "again"])
def test_trace_killed_at_any_write_loses_nothing_and_resumes(experiment, traced_before):
    """A real child process, killed by SIGKILL just after each of its writes in turn, from
    the first until one run completes: the file must open with every map, direction and
    attribute bit-identical, the trace group absent, the earlier one or the new one whole;
    and running trace again must succeed."""
    config = load_config(
        experiment(maps=["train_loss"], trace={"samples": 3}, hessian={"hvp": "double_backward"})
    )
    surface = plan_surface(config)
    run_job(surface, "loss", show_progress=False)
    pristine = surface.with_name("pristine.h5")
    shutil.copyfile(surface, pristine)
    estimate_trace(surface)
    traced = contents(surface)
    if traced_before:
        shutil.copyfile(surface, pristine)
    before = contents(pristine)
    children = multiprocessing.get_context("forkserver")
    children.set_forkserver_preload(
        ["landscape.trace", "landscape.cli"]
    )  # torch once, not per kill
    writes = 0
    while True:
        writes += 1
        shutil.copyfile(pristine, surface)
        child = children.Process(target=trace_killed_after, args=(writes, str(surface)))
        child.start()
        child.join(120)
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL, (writes, child.exitcode)
        with SurfaceFile.open(surface) as opened:
            assert opened.done("loss").all()
        found = contents(surface)
        assert without_trace(found) == without_trace(before), writes
        assert found in (before, traced), writes
        assert "train_loss: 20 values" in surface_status(surface)
        estimate_trace(surface)
        assert contents(surface) == traced
        assert not surface.with_name(surface.name + ".tmp").exists()
    assert contents(surface) == traced
    assert writes > 3, "the kills must reach the new image's sync, the rename and the folder's"


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs folder (root only), unmounted at the end."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_trace_on_a_full_disk_says_so_in_one_line_and_changes_nothing(experiment, full_disk):
    config = load_config(experiment(maps=["train_loss"], trace={"samples": 3}))
    planned = plan_surface(config)
    run_job(planned, "loss", show_progress=False)
    surface = full_disk / planned.name
    shutil.copyfile(planned, surface)
    filler = full_disk / "filler"
    with open(filler, "wb") as handle, pytest.raises(OSError, match="No space left"):
        handle.write(bytes(2 << 20))
    before = contents(surface)
    command = [sys.executable, "-m", "landscape.cli", "trace", str(surface)]
    refused = subprocess.run(command, capture_output=True, text=True)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert last == (
        f"error: trace: cannot write {surface} (No space left on device); free some space or "
        "choose another folder"
    )
    assert contents(surface) == before
    assert sorted(p.name for p in full_disk.iterdir()) == ["exp.h5", "filler"]
    filler.unlink()
    estimate_trace(surface)
    assert without_trace(contents(surface)) == without_trace(before)


# Holds the lock on argv[1] until the file argv[2] exists.
HOLD_LOCK = """
import pathlib, sys, time
from landscape.locking import surface_lock
with surface_lock(sys.argv[1], "landscape run"):
    print("held", flush=True)
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.01)
    pathlib.Path(sys.argv[2] + ".releasing").touch()  # the last thing before the release
"""


class GateOpenedByWaiting(logging.Handler):
    """Creates ``gate`` when landscape says it waits for the lock: the holder ends then,
    not after a sleep long enough for trace to compute on a loaded machine."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another landscape job" in record.getMessage():
            self.gate.touch()


def test_trace_computes_beside_a_job_and_waits_for_its_lock_to_store(
    experiment, caplog, monkeypatch
):
    """A job holding the lock neither stops trace nor loses its file to trace's rename:
    trace computes, waits for the lock, then stores; a file planned again meanwhile is
    refused instead of receiving another plan's estimates."""
    config = load_config(experiment(maps=["train_loss"], trace={"samples": 3}))
    surface = plan_surface(config)
    gate = surface.with_suffix(".gate")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(surface), str(gate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    opener = GateOpenedByWaiting(gate)
    try:
        assert holder.stdout.readline() == "held\n"
        logging.getLogger("landscape.locking").addHandler(opener)
        with caplog.at_level(logging.INFO, logger="landscape.locking"):
            estimate_trace(surface)
        # Trace stored only once the holder let go (the process may still be exiting).
        assert Path(f"{gate}.releasing").exists()
        assert any("waiting for another landscape job" in r.getMessage() for r in caplog.records)
    finally:
        logging.getLogger("landscape.locking").removeHandler(opener)
        holder.kill()
        holder.wait()
    with SurfaceFile.open(surface) as traced:
        assert traced.group("trace")[1]["samples"] == 3

    def plan_again(*args, **kwargs):
        surface.unlink()
        plan_surface(config)  # a new plan id at the same path
        return original(*args, **kwargs)

    original = TraceEstimator.hutchinson
    monkeypatch.setattr(TraceEstimator, "hutchinson", plan_again)
    with pytest.raises(UserError, match="planned again while trace ran"):
        estimate_trace(surface)
    with SurfaceFile.open(surface) as replanned:
        assert replanned.group("trace") is None
