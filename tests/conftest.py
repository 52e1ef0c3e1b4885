"""Shared fixtures: small experiments (config file + checkpoint) written into a temp folder."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import yaml
from torch.func import functional_call, hessian

from landscape.checkpoint import save_checkpoint
from landscape.config import load_config
from landscape.curvature.operators import HessianOperator, select_parameters
from landscape.data import load_dataset
from landscape.errors import UserError
from landscape.locking import surface_lock
from landscape.models import build_model
from landscape.objectives import CrossEntropy, Objective
from landscape.plan import plan_surface
from landscape.samples import HeldSamples
from landscape.trace import estimate_trace
from landscape.train import train
from landscape.workers import run_job

# Figures go to files, as the CLI draws them (landscape.plot leaves the backend alone).
matplotlib.use("Agg")

TESTS = Path(__file__).resolve().parent
LOCAL_CLUSTER = TESTS.parent / "slurm" / "local-cluster.sh"

# Open MPI refuses root and more ranks than cores unless told; the library never sets these.
MPIEXEC = shutil.which("mpiexec")
MPI_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
LANDSCAPE = [sys.executable, "-m", "landscape.cli"]

# 63 points in 16 shards, fast; 9 x 7 so that a swapped axis cannot pass.
GRID = {
    "grid": {
        "x": {"min": -1.0, "max": 1.0, "num": 9},
        "y": {"min": -1.0, "max": 1.0, "num": 7},
        "shard_size": 4,
    }
}
# 80 points of about 20 ms each, so a kill can land part-way.
SLOW = {
    "grid": {
        "x": {"min": -1.0, "max": 1.0, "num": 10},
        "y": {"min": -1.0, "max": 1.0, "num": 8},
        "shard_size": 4,
    },
    "data": {
        "name": "gaussian_clusters",
        "kwargs": {"num_classes": 4, "dim": 32, "train_per_class": 1500, "test_per_class": 200},
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [128, 128]}},
}


def gated(gate: Path, points: int, *args: str) -> list[str]:
    """The command ``landscape *args`` whose every process stops before evaluating its
    point ``points`` (from 0) until the file ``gate`` exists (tests/gated_run.py)."""
    return [sys.executable, str(TESTS / "gated_run.py"), str(gate), str(points), *args]


def wait_at_gate(gate: Path, job: subprocess.Popen, processes: int = 1) -> None:
    """Until ``processes`` processes of ``job`` wait at ``gate``."""
    deadline = time.monotonic() + 120
    while len(list(gate.parent.glob(f"{gate.name}.reached.*"))) < processes:
        assert job.poll() is None, f"the job ended (status {job.returncode}) before its gate"
        assert time.monotonic() < deadline, f"no {processes} processes at the gate in 120 s"
        time.sleep(0.01)


def write_point(writer, job: str, point: int, values: dict) -> None:
    """Hand one point's values (each of its output's trailing shape), finished now, to a
    point writer: a surface file open for writing, or a :class:`landscape.parts.PartWriter`."""
    single = {name: np.asarray(value)[None] for name, value in values.items()}
    writer.write_points(job, np.array([point]), single, time.time())


BASE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
    "data": {
        "name": "gaussian_clusters",
        "kwargs": {"num_classes": 3, "dim": 5, "train_per_class": 20, "test_per_class": 10},
    },
    "directions": {"seed": 0},
    "grid": {"x": {"min": -1.0, "max": 1.0, "num": 5}, "y": {"min": -1.0, "max": 1.0, "num": 4}},
    "maps": ["train_loss", "train_acc", "test_loss", "test_acc"],
    "evaluation": {"batch_size": 16, "dtype": "float64", "device": "cpu", "threads": 1},
}


MERGED_SECTIONS = ("evaluation", "directions")


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes``: evaluation/directions fields merge, other sections replace."""
    result = copy.deepcopy(base)
    for key, value in changes.items():
        result[key] = {**result[key], **value} if key in MERGED_SECTIONS else value
    return result


def write_experiment(folder: Path, name: str = "exp", seed: int = 0, **changes) -> Path:
    """A config file ``<folder>/<name>.yaml`` and its seeded random-init checkpoint."""
    config = merge(BASE, changes)
    checkpoint = folder / f"{name}.pt"
    config["model"]["checkpoint"] = str(checkpoint)
    config.setdefault("output", str(folder / f"{name}.h5"))
    data = load_dataset(config["data"]["name"], config["data"].get("kwargs", {}))
    torch.manual_seed(seed)
    model = build_model(
        config["model"]["name"],
        data.input_shape,
        data.num_classes,
        config["model"].get("kwargs", {}),
    )
    save_checkpoint(checkpoint, model)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def experiment(tmp_path):
    """``experiment(name, seed, **changes) -> config path`` in the test's temp folder."""

    def write(name: str = "exp", seed: int = 0, **changes) -> Path:
        return write_experiment(tmp_path, name, seed, **changes)

    return write


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM for the whole test run (slurm/local-cluster.sh), stopped at the
    end; yields the environment its clients need (SLURM_CONF, this venv on PATH)."""
    if shutil.which("slurmctld") is None or os.getuid() != 0:
        pytest.skip("needs root and slurmctld (.ci/run installs SLURM)")
    folder = tmp_path_factory.mktemp("slurm")
    environment = {
        **os.environ,
        "SLURM_CONF": str(folder / "slurm.conf"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # Open MPI refuses root unless told; the library never sets these.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    try:
        subprocess.run([LOCAL_CLUSTER, "start", folder], check=True, timeout=180)
        yield environment
    finally:
        subprocess.run([LOCAL_CLUSTER, "stop", folder], check=True, timeout=180)


UNFINISHED = ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED", "RESIZING")


def final_state(environment: dict, job: str, timeout: float = 240) -> str:
    """A SLURM job's final state, once it has left the queue and accounting has caught up
    (sacct can lag squeue by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job], env=environment, capture_output=True, text=True
        ).stdout.strip()
        accounting = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"],
            env=environment,
            capture_output=True,
            text=True,
        ).stdout.split()
        state = accounting[0] if accounting else ""
        if not queued and state not in UNFINISHED:
            return state
        assert time.monotonic() < deadline, f"job {job} not finished ({state or 'no record'})"
        time.sleep(0.5)


CLUSTERS = {
    "name": "gaussian_clusters",
    "kwargs": {"num_classes": 3, "dim": 8, "train_per_class": 40, "test_per_class": 10},
}
DIGITS = {"name": "digits", "kwargs": {"test_fraction": 0.95}}  # 89 training images
# (model, data): an MLP with biases, and a CNN with BatchNorm (eval mode: running stats).
MODELS = {
    "mlp": ({"name": "mlp", "kwargs": {"hidden": [12, 12]}}, CLUSTERS),
    "cnn_bn": ({"name": "small_cnn", "kwargs": {"channels": [3, 4]}}, DIGITS),
    "tanh_mlp": ({"name": "mlp", "kwargs": {"hidden": [12, 12], "activation": "tanh"}}, CLUSTERS),
}


def small_model(name: str, dtype: torch.dtype, seed: int = 0):
    """A :data:`MODELS` entry at its seeded initialization, in eval mode and ``dtype``,
    with its training inputs (cast) and targets."""
    network, data = MODELS[name]
    dataset = load_dataset(data["name"], data["kwargs"])
    inputs, targets = dataset.train_x, dataset.train_y
    torch.manual_seed(seed)
    model = build_model(
        network["name"], dataset.input_shape, dataset.num_classes, network["kwargs"]
    )
    return model.to(dtype).eval(), inputs.to(dtype), targets


# 6 x 6 points in 9 shards for the loss/accuracy job; a Hessian job on every 3rd point:
# the experiment the SLURM tests submit.
BOTH_JOBS = {
    "grid": {
        "x": {"min": -1.0, "max": 1.0, "num": 6},
        "y": {"min": -1.0, "max": 1.0, "num": 6},
        "shard_size": 4,
    },
    "maps": ["train_loss", "train_acc", "lambda_min", "lambda_max"],
    "hessian": {"stride": 3, "shard_size": 1},  # a shard per point: tasks to spread
}


# Checkpoint folders trained so far in this test run, by what training reads of the config
# (training_settings): each with its last checkpoint and torch's global generator state
# after training. Tests get copies, so none can change another's.
TRAINED_FOLDERS = tempfile.TemporaryDirectory(prefix="landscape-tests-trained-")
TRAINED: dict[str, tuple[Path, torch.Tensor]] = {}


def training_settings(config: dict) -> str:
    """The sections training reads (model, data, evaluation, train), less the paths."""
    settings = {section: dict(config[section]) for section in ("model", "data", "evaluation")}
    settings["train"] = {**config["train"], "checkpoint_dir": None}
    settings["model"]["checkpoint"] = None
    return json.dumps(settings, sort_keys=True)


def trained_experiment(experiment, model: str, epochs: int = 150, schedule=None, **changes):
    """A config whose checkpoint is the model trained near a minimum (BN statistics too),
    one checkpoint per epoch in ``<model>_checkpoints``; ``schedule`` changes the train
    section (e.g. a step schedule). Trained once per test run for the same settings: later
    calls copy the checkpoints (training is deterministic) and set torch's global generator
    as training leaves it."""
    network, data = MODELS[model]
    path = experiment(name=model, model=network, data=data, **changes)
    config = yaml.safe_load(path.read_text())
    folder = path.parent / f"{model}_checkpoints"
    config["train"] = {
        "checkpoint_dir": str(folder),
        "lr": 0.05,
        "epochs": epochs,
        "batch_size": 120,
        "weight_decay": 0.0,
        "schedule": "constant",
        **(schedule or {}),
    }
    path.write_text(yaml.safe_dump(config))
    settings = training_settings(config)
    if settings in TRAINED:
        last, generator_state = TRAINED[settings]
        shutil.copytree(last.parent, folder)
        torch.set_rng_state(generator_state)
    else:
        last = train(load_config(path))
        kept = shutil.copytree(folder, Path(TRAINED_FOLDERS.name) / str(len(TRAINED)))
        TRAINED[settings] = (kept / last.name, torch.get_rng_state())
    config["model"]["checkpoint"] = str(folder / last.name)
    path.write_text(yaml.safe_dump(config))
    return path


CROSS_ENTROPY = CrossEntropy()


def hessian_operator(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    objective: Objective,
    batch_size: int,
    parameters: str = "all",
    hvp: str = "forward_over_reverse",
) -> HessianOperator:
    """The Hessian operator over the parameters ``parameters`` selects (all or weights)."""
    names = select_parameters(model, parameters)
    return HessianOperator(model, names, HeldSamples(inputs, targets), objective, batch_size, hvp)


def dense_hessian(operator, dtype: torch.dtype | None = None) -> np.ndarray:
    """The dense Hessian of ``operator``'s full-data mean loss (torch.func.hessian) of its
    objective, over its selected parameters, at the model's current parameters, computed
    in ``dtype`` (default: the model's; float64 gives the ground truth of a float32 model)."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    params, fixed = operator.state()
    fixed = {name: cast(t) for name, t in fixed.items()}
    flat = cast(torch.cat([p.reshape(-1) for p in params.values()]))
    inputs = cast(operator.samples.inputs)

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split(operator.sizes), operator.shapes))
        outputs = functional_call(
            operator.model, {**fixed, **dict(zip(operator.names, pieces))}, (inputs,)
        )
        return operator.objective.losses(outputs, operator.samples.targets).sum() / operator.count

    return hessian(mean_loss)(flat).numpy()


class FakeSlurm:
    """Stand-ins for SLURM's clients, first on PATH (as submitit's own tests stand in for
    sbatch): ``fake_slurm(squeue=..., sacct=...)`` makes them print the given text (None:
    fail as without a controller), :meth:`answer` sets any exit status and stderr,
    :meth:`sbatch` installs an sbatch that keeps each script. Every call's arguments are
    kept (:meth:`arguments`)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, **outputs: str | None) -> None:
        for command, output in outputs.items():
            if output is None:
                self.answer(command, stderr="error: Unable to contact slurm controller", status=1)
            else:
                self.answer(command, stdout=output)

    def answer(self, command: str, stdout: str = "", stderr: str = "", status: int = 0) -> None:
        (self.folder / f"{command}.out").write_text(stdout)
        (self.folder / f"{command}.err").write_text(stderr)
        self.install(
            command,
            f"cat '{self.folder}/{command}.out'\ncat '{self.folder}/{command}.err' >&2\n"
            f"exit {status}",
        )

    def sbatch(self, refuse_from: int | None = None) -> None:
        """sbatch numbering jobs from 41 (``Submitted batch job 41``), keeping each script
        (:meth:`scripts`); from job ``refuse_from`` on it refuses, as for a bad account."""
        scripts = self.folder / "scripts"
        scripts.mkdir()
        refuse = (
            f"if [ $n -ge {refuse_from} ]; then echo 'sbatch: error: Batch job submission "
            "failed: Invalid account or account/partition combination specified' >&2; exit 1; fi\n"
            if refuse_from
            else ""
        )
        self.install(
            "sbatch",
            f"n=$((41 + $(ls '{scripts}' | wc -l)))\n{refuse}cp \"$1\" '{scripts}'/$n\n"
            'echo "Submitted batch job $n"',
        )

    def scripts(self) -> list[str]:
        """The scripts sbatch was given, in order."""
        found = sorted((self.folder / "scripts").iterdir(), key=lambda path: int(path.name))
        return [path.read_text() for path in found]

    def install(self, command: str, body: str) -> None:
        script = self.folder / command
        script.write_text(f"#!/bin/sh\necho \"$*\" >> '{self.folder}/{command}.calls'\n{body}\n")
        script.chmod(0o755)

    def arguments(self, command: str) -> list[list[str]]:
        """The arguments of each call of ``command`` (split at spaces)."""
        calls = self.folder / f"{command}.calls"
        return [line.split() for line in calls.read_text().splitlines()] if calls.exists() else []


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> FakeSlurm:
    """:class:`FakeSlurm` in the test's temp folder."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    return FakeSlurm(folder)


def wait_for_lock(surface: Path, timeout: float = 30) -> None:
    """Until no process holds the surface's lock: the ranks of a job that mpiexec ended
    (a rank killed, an interrupt) can outlive mpiexec by a moment, holding it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with surface_lock(surface, "test"):
                return
        except UserError:
            assert time.monotonic() < deadline, "the ended job's ranks still hold the lock"
            time.sleep(0.1)


def after_kill(path: Path, job: str, writer: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The done flags and maps of ``job`` once a killed MPI job's ranks have let go of
    ``path``, with what part files hold merged first (as the next run would); opening
    the file at all checks that the kill left it clean."""
    from landscape.cli import main
    from landscape.store import SurfaceFile

    wait_for_lock(path)
    if writer == "parts":  # finished shards wait in part files for the reducer
        assert main(["reduce", str(path)]) == 0
    with SurfaceFile.open(path) as partial:
        return partial.done(job), partial.maps()


def surface_with_curvature(config_path) -> Path:
    """Plan ``config_path``, run its loss and Hessian jobs and ``landscape trace``: the
    surface file every curvature number of the config is then read from."""
    surface = plan_surface(load_config(config_path))
    run_job(surface, "loss", show_progress=False)
    run_job(surface, "hessian", show_progress=False)
    estimate_trace(surface)
    return surface
