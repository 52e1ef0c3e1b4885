"""A new user's battery of odd inputs through the real command: each refused with one line
naming the field or file, exit status 2, no traceback, and the disk left as it was."""

from __future__ import annotations

import os

import h5py
import pytest
import torch
from test_hard_edges import fails_cleanly

from landscape.cli import main
from landscape.config import load_config
from landscape.plan import plan_surface
from landscape.slurm import record_path


def settings(*pairs: str) -> list[str]:
    return [word for pair in pairs for word in ("--set", pair)]


def test_a_key_given_twice_in_the_config_is_refused(experiment, tmp_path, capsys):
    """Before: planned silently with the second ``grid:`` replacing the first."""
    config = experiment()
    config.write_text(config.read_text() + "grid: {x: {min: -1, max: 1, num: 3}}\n")
    fails_cleanly(
        capsys, tmp_path, ["plan", config], f"{config}: not valid YAML (key 'grid' given twice"
    )


# --set overrides the planner must refuse (each before: a traceback, or planned silently).
ODD_SETTINGS = {
    # Before: ValueError: Unable to create dataset (name already exists).
    "map listed twice": (
        ["maps=[train_loss, test_acc, train_loss]"],
        "maps: train_loss listed twice",
    ),
    # Before: planned a file named like the folder.
    "output ends in a slash": (["output={folder}/new/"], "output: {folder}/new/ names a folder"),
    # Before: RuntimeError: Symlink loop from ...
    "checkpoint a symlink loop": (
        ["model.checkpoint={folder}/loop_a"],
        "{folder}/loop_a is a symlink loop",
    ),
    # Before: planned; every run then failed.
    "device nonsense": (["evaluation.device=gpu0"], "evaluation.device: 'gpu0' is not a device"),
    "train device nonsense": (
        ["train.checkpoint_dir=ckpt", "train.device=nonsense"],
        "train.device: 'nonsense' is not a device",
    ),
    # Before: trained with the learning rate decayed from the first epoch.
    "step epochs outside the run": (
        ["train.checkpoint_dir=ckpt", "train.epochs=2", "train.step_epochs=[-3, 99]"],
        "train.step_epochs: [-3, 99] outside 1..1",
    ),
    # Before: "holds objects other than tensors ... never unpickles code", of an HDF5 file.
    "checkpoint an HDF5 file": (
        ["model.checkpoint={folder}/other.h5"],
        "model.checkpoint: {folder}/other.h5 is not a torch checkpoint (it starts b'\\x89HDF'",
    ),
    "checkpoint a YAML file": (
        ["model.checkpoint={folder}/exp.yaml"],
        "exp.yaml is not a torch checkpoint",
    ),
    # Before: "not an HDF5 file ...; name a surface file, or plan it again" while planning.
    "output the config itself": (
        ["output={folder}/exp.yaml"],
        "output: {folder}/exp.yaml exists and is not a surface file",
    ),
}


@pytest.mark.parametrize("pairs, fragment", ODD_SETTINGS.values(), ids=ODD_SETTINGS)
def test_odd_settings_are_refused_in_one_line(experiment, tmp_path, capsys, pairs, fragment):
    config = experiment()
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = [1.0]
    pairs = [pair.format(folder=tmp_path) for pair in pairs]
    command = "train" if any(p.startswith("train.") for p in pairs) else "plan"
    fails_cleanly(
        capsys, tmp_path, [command, config, *settings(*pairs)], fragment.format(folder=tmp_path)
    )


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an mps device")
def test_a_device_torch_names_but_lacks_is_refused(experiment, tmp_path, capsys):
    """Before: RuntimeError: PyTorch is not linked with support for mps devices."""
    from landscape.config import load_config
    from landscape.plan import plan_surface

    surface = plan_surface(load_config(experiment()))
    fails_cleanly(
        capsys,
        tmp_path,
        ["run", surface, "--device", "mps", "--no-progress"],
        "evaluation.device: 'mps' is not available here",
    )


# Command-line arguments (before: argparse's multi-line usage block, an IndexError
# traceback from `submit --tasks 0`, or "0 is not in 0..-1"; a lone --num-tasks ignored).
BAD_ARGUMENTS = {
    "format not offered": (["plot", "x.h5", "--format", "jpg"], "argument --format: invalid"),
    "no command": ([], "landscape: the following arguments are required: command"),
    "no array tasks": (["run", "x.h5", "--task-index", "0", "--num-tasks", "0"], "0 is below 1"),
    "lone num-tasks": (["run", "x.h5", "--num-tasks", "2"], "--num-tasks: given without"),
    "negative task index": (["hessian", "x.h5", "--task-index", "-1"], "-1 is below 0"),
    "no tasks to submit": (["submit", "x.yaml", "--tasks", "0"], "--tasks: 0 is below 1"),
    "minutes not a number": (["submit", "x.yaml", "--time", "2h"], "'2h' is not an integer"),
}


@pytest.mark.parametrize("argv, fragment", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS)
def test_bad_command_line_arguments_are_one_line(tmp_path, capsys, argv, fragment):
    fails_cleanly(capsys, tmp_path, argv, fragment)


def test_submit_without_slurm_plans_nothing(experiment, tmp_path, capsys, monkeypatch):
    """Before: the surface was planned, then submitit's FailedJobError traceback."""
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    fails_cleanly(capsys, tmp_path, ["submit", experiment()], "submit: no sbatch on this machine")


def test_sbatch_refusing_the_job_is_one_line(experiment, tmp_path, capsys, monkeypatch):
    """A cluster that rejects the request (a wrong partition, say): sbatch's own line (which
    submitit passes through), then one line of ours with its reason; no traceback."""
    tools = tmp_path / "tools"
    tools.mkdir()
    sbatch = tools / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition: gpux' >&2\nexit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    surface = plan_surface(load_config(experiment()))
    assert main(["submit", str(surface), "--partition", "gpux"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(
        "error: submit: sbatch refused the job (sbatch: error: invalid partition: gpux)"
    )
    assert not any("Traceback" in line for line in lines), lines
    assert not record_path(surface).exists()
