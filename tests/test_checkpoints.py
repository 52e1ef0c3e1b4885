"""Checkpoint and direction files that cannot be used: a folder, an empty or truncated file,
pickled code, NaN weights. Each is refused in one line naming the field, the file and,
for values, the tensor; nothing is planned, no payload runs, and torch's advice to load
with ``weights_only=False`` is never passed on."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import yaml
from test_bad_input import edit, fails_with

import landscape.checkpoint
import landscape.experiment
from landscape.checkpoint import file_sha256
from landscape.cli import main


class Payload:
    """Unpickling it runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def checkpoint_of(config) -> str:
    return yaml.safe_load(config.read_text())["model"]["checkpoint"]


def with_payload(path, marker) -> None:
    """Rewrite the checkpoint at ``path`` with a payload beside its weights."""
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "note": Payload(f"touch {marker}")}, path)


def legacy_pickle_with_payload(path, marker) -> None:
    """A plain pickle (protocol 4, not torch's zip format) holding the payload."""
    path.write_bytes(pickle.dumps({"weight": Payload(f"touch {marker}")}, protocol=4))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda path, marker: (path.unlink(), path.mkdir()), ["is a folder, not a file"]),
        (lambda path, marker: path.write_bytes(b""), ["is empty (0 bytes)", "re-save it"]),
        (
            lambda path, marker: path.write_bytes(path.read_bytes()[:300]),
            [
                "not a readable torch checkpoint",
                "failed reading zip archive",
                "corrupt or truncated",
            ],
        ),
        (
            with_payload,
            [
                "holds objects other than tensors (it asks for posix.system)",
                "never unpickles code",
                "torch.save(model.state_dict(), path)",
            ],
        ),
        (legacy_pickle_with_payload, ["holds objects other than tensors, and this tool never"]),
    ],
    ids=["folder", "empty", "truncated", "payload", "legacy_payload"],
)
def test_unusable_checkpoint_is_named_in_one_line(experiment, tmp_path, capsys, damage, fragments):
    config = experiment()
    path = tmp_path / "exp.pt"
    assert checkpoint_of(config) == str(path)
    marker = tmp_path / "payload_ran"
    damage(path, marker)
    fails_with(capsys, ["plan", str(config)], f"model.checkpoint: {path}", *fragments)
    main(["plan", str(config)])
    message = capsys.readouterr().err
    assert "weights_only" not in message and "does not exist" not in message
    assert not marker.exists() and not (tmp_path / "exp.h5").exists()


def with_nan(path, name: str, value: float = float("nan")) -> None:
    payload = torch.load(path, weights_only=True)
    payload["state_dict"][name].view(-1)[1] = value
    torch.save(payload, path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nan_weights_names_the_tensor(experiment, tmp_path, capsys, value):
    config = experiment()
    with_nan(checkpoint_of(config), "net.1.weight", value)
    fails_with(
        capsys,
        ["plan", str(config)],
        f"model.checkpoint: {tmp_path / 'exp.pt'}: net.1.weight holds NaN or inf (1 of 40 values)",
        "take an earlier checkpoint",
    )
    assert not (tmp_path / "exp.h5").exists()


@pytest.mark.parametrize(
    "kind, grid",
    [
        ("target", {"x": {"min": -1.0, "max": 1.0, "num": 3}}),
        ("interpolation", {"x": {"min": 0.0, "max": 1.0, "num": 3}}),
    ],
)
def test_target_checkpoint_with_nan_weights_names_the_tensor(
    experiment, tmp_path, capsys, kind, grid
):
    experiment(name="target", seed=1)
    with_nan(tmp_path / "target.pt", "net.3.bias")
    config = experiment(directions={"kind": kind, "targets": [str(tmp_path / "target.pt")]})
    edit(config, lambda c: c.update(grid=grid))
    fails_with(
        capsys,
        ["plan", str(config)],
        f"directions.targets: {tmp_path / 'target.pt'}: net.3.bias holds NaN or inf (1 of 3",
    )
    assert not (tmp_path / "exp.h5").exists()


def test_trajectory_checkpoint_with_nan_weights_names_file_and_tensor(experiment, tmp_path, capsys):
    for epoch in range(3):
        experiment(name=f"epoch_{epoch}", seed=epoch)
    with_nan(tmp_path / "epoch_1.pt", "net.3.weight", float("inf"))
    config = experiment(
        directions={"kind": "pca", "checkpoints": [str(tmp_path / "epoch_*.pt")]},
    )
    fails_with(
        capsys,
        ["plan", str(config)],
        f"directions.checkpoints: {tmp_path / 'epoch_1.pt'}: net.3.weight holds NaN or inf",
    )
    assert not (tmp_path / "exp.h5").exists()


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_directions_file_with_nan_names_file_and_tensor(experiment, tmp_path, capsys, value):
    config = experiment()
    state = torch.load(checkpoint_of(config), weights_only=True)["state_dict"]
    directions = [{k: torch.randn_like(v) for k, v in state.items()} for _ in "xy"]
    directions[1]["net.1.weight"][2, 4] = value
    torch.save(directions, tmp_path / "directions.pt")
    edit(
        config, lambda c: c["directions"].update(kind="file", file=str(tmp_path / "directions.pt"))
    )
    fails_with(
        capsys,
        ["plan", str(config)],
        f"directions.file: {tmp_path / 'directions.pt'}, direction y: key 'net.1.weight' holds "
        "NaN or inf (1 of 40 values)",
    )
    assert not (tmp_path / "exp.h5").exists()


def test_directions_file_with_a_payload_is_refused_unrun(experiment, tmp_path, capsys):
    config = experiment()
    marker = tmp_path / "payload_ran"
    torch.save([{"net.1.weight": Payload(f"touch {marker}")}], tmp_path / "directions.pt")
    edit(
        config, lambda c: c["directions"].update(kind="file", file=str(tmp_path / "directions.pt"))
    )
    fails_with(
        capsys,
        ["plan", str(config)],
        "directions.file: ",
        "holds objects other than tensors (it asks for posix.system)",
    )
    assert not marker.exists()


@pytest.mark.parametrize("command", ["run", "hessian", "trace"])
def test_each_command_hashes_the_checkpoint_once(experiment, monkeypatch, command):
    """Checked against the plan's hash, then loaded: the check's hash is the experiment's
    (a large checkpoint hashed twice is read twice, on every rank)."""
    config = experiment(
        grid={"x": {"min": -1.0, "max": 1.0, "num": 3}, "y": {"min": -1.0, "max": 1.0, "num": 2}},
        maps=["train_loss", "lambda_min", "lambda_max"],
        trace={"samples": 2},
    )
    assert main(["plan", str(config)]) == 0
    surface = str(config.with_suffix(".h5"))
    hashed = []

    def counted(path):
        hashed.append(str(path))
        return file_sha256(path)

    monkeypatch.setattr(landscape.checkpoint, "file_sha256", counted)
    monkeypatch.setattr(landscape.experiment, "file_sha256", counted)
    assert main([command, surface]) == 0
    assert hashed == [checkpoint_of(config)]
