"""Checkpoint files: the formats people save (a training script's dict, DataParallel,
torch.compile, Lightning, .safetensors) give the bare state_dict's surface bit for bit;
files that cannot be used (a folder, an empty or truncated file, pickled code, NaN
weights, no or two entries of weights) are refused in one line naming the field, the
file and the keys or tensor; nothing is planned, no payload runs, and torch's advice to
load with ``weights_only=False`` is never passed on."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from conftest import MODELS
from safetensors.torch import save_file
from test_bad_input import edit, fails_with

import landscape.checkpoint
import landscape.experiment
from landscape import api
from landscape.checkpoint import file_sha256, load_checkpoint
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


# The checkpoint formats people save, each built from a bare state_dict ``state`` (and an
# optimizer's state) the way its training code writes it.
def optimizer_state(state: dict) -> dict:
    """A real SGD state with momentum buffers: tensors under integer keys, not weights."""
    weights = [torch.nn.Parameter(v.clone()) for v in state.values() if v.is_floating_point()]
    optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    sum(w.sum() for w in weights).backward()
    optimizer.step()
    return optimizer.state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


FORMATS = {
    "training_script": lambda s: {"epoch": 3, "model": s, "optimizer": optimizer_state(s)},
    "net": lambda s: {"net": s},
    "model_state_dict": lambda s: {"model_state_dict": s, "optimizer_state_dict": {}},
    "data_parallel": lambda s: prefixed(s, "module."),
    "torch_compile": lambda s: {"model": prefixed(s, "_orig_mod.")},
    "ddp_of_compiled": lambda s: prefixed(s, "module._orig_mod."),
    "lightning": lambda s: {
        "epoch": 2,
        "global_step": 40,
        "state_dict": {**prefixed(s, "model."), "criterion.weight": torch.ones(3)},
        "optimizer_states": [optimizer_state(s)],
    },
}


def surface_maps(config, name: str, overrides=()) -> dict:
    """The maps of a 3 x 2 grid of ``config`` with ``overrides``, planned and run in this
    process into ``<name>.h5`` beside the config; the planned checkpoint hash is checked
    to be the file's own."""
    output = config.parent / f"{name}.h5"
    path = api.plan(config, ["grid.x.num=3", "grid.y.num=2", f"output={output}", *overrides])
    assert api.run(path, progress=False) == 6
    result = api.read(path)
    assert result.attrs["checkpoint_sha256"] == file_sha256(result.config.model.checkpoint)
    return result.maps


@pytest.fixture
def bare_experiment(experiment):
    """A BatchNorm CNN (weights and buffers) with a bare state_dict checkpoint: the config,
    the state_dict, and the maps it gives."""
    network, data = MODELS["cnn_bn"]
    config = experiment(model=network, data=data, maps=["train_loss", "test_acc"])
    path = checkpoint_of(config)
    state = torch.load(path, weights_only=True)["state_dict"]
    state = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()
    }
    torch.save(state, path)
    return config, state, surface_maps(config, "bare")


@pytest.mark.parametrize("format_name", FORMATS)
def test_each_checkpoint_format_gives_the_bare_state_dicts_surface(
    bare_experiment, format_name, caplog
):
    config, state, expected = bare_experiment
    path = config.parent / f"{format_name}.pt"
    torch.save(FORMATS[format_name](state), path)
    with caplog.at_level(logging.INFO, logger="landscape.checkpoint"):
        maps = surface_maps(config, format_name, [f"model.checkpoint={path}"])
    for name, values in expected.items():
        np.testing.assert_array_equal(maps[name], values, err_msg=name)
    stripped = [r.getMessage() for r in caplog.records if "stripped the prefix" in r.getMessage()]
    prefix = {"data_parallel": "module.", "torch_compile": "_orig_mod.", "lightning": "model."}
    prefix["ddp_of_compiled"] = "module._orig_mod."
    if format_name in prefix:
        assert stripped and f"{prefix[format_name]!r}" in stripped[0], stripped
    else:
        assert not stripped


def test_safetensors_checkpoint_gives_the_bare_state_dicts_surface(bare_experiment):
    config, state, expected = bare_experiment
    plain, wrapped = config.parent / "plain.safetensors", config.parent / "wrapped.safetensors"
    save_file(state, plain, metadata={"epoch": "7", "note": "seven"})
    save_file(prefixed(state, "module."), wrapped)
    for path in (plain, wrapped):
        maps = surface_maps(config, path.stem, [f"model.checkpoint={path}"])
        for name, values in expected.items():
            np.testing.assert_array_equal(maps[name], values, err_msg=f"{path.name} {name}")
    loaded, metadata = load_checkpoint(plain, state, None)
    assert metadata == {"epoch": 7} and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_checkpoint_key_and_strip_prefix_choose_what_automatic_would_not(bare_experiment):
    """An EMA copy beside the trained weights, and a prefix no wrapper writes."""
    config, state, expected = bare_experiment
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = config.parent / "ema.pt"
    torch.save({"model": other, "ema": prefixed(state, "backbone."), "step": 9}, path)
    chosen = ["model.checkpoint_key=ema", "model.strip_prefix=backbone."]
    maps = surface_maps(config, "ema", [f"model.checkpoint={path}", *chosen])
    for name, values in expected.items():
        np.testing.assert_array_equal(maps[name], values, err_msg=name)
    assert not np.array_equal(
        surface_maps(config, "model", [f"model.checkpoint={path}"])["train_loss"],
        expected["train_loss"],
    )


def test_metadata_comes_from_the_wrapping_dict(tmp_path):
    state = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    for format_name, epoch in (("training_script", 3), ("lightning", 2)):
        torch.save(FORMATS[format_name](state), tmp_path / "c.pt")
        loaded, metadata = load_checkpoint(tmp_path / "c.pt", state, None)
        assert metadata["epoch"] == epoch and loaded.keys() == state.keys()
    torch.save(state, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", state, None)[1] == {}


@pytest.mark.parametrize(
    "payload, layout, fragments",
    [
        (
            lambda s: {"state_dict": s, "model": s, "epoch": 1},
            {},
            [
                "holds weights under state_dict and model",
                "(its entries: state_dict, model, epoch)",
                "set model.checkpoint_key",
            ],
        ),
        (
            lambda s: {"weights": s, "optimizer": optimizer_state(s)},
            {},
            [
                "holds no state_dict under state_dict, model, net, model_state_dict, module",
                "(its entries: weights, optimizer)",
                "set model.checkpoint_key",
            ],
        ),
        (
            lambda s: {"optimizer": optimizer_state(s), "epoch": 4},
            {},
            ["(its entries: optimizer, epoch)", "set model.checkpoint_key"],
        ),
        (
            lambda s: {"model": s, "optimizer": optimizer_state(s)},
            {"checkpoint_key": "ema"},
            ["model.checkpoint_key: ", "has no entry 'ema' (its entries: model, optimizer)"],
        ),
        (
            lambda s: {"model": s, "optimizer": optimizer_state(s)},
            {"checkpoint_key": "optimizer"},
            ["model.checkpoint_key: ", "has no dict of tensors 'optimizer'"],
        ),
        (
            lambda s: s,
            {"strip_prefix": "module."},
            ["model.strip_prefix: no key of", "starts with 'module.' (its keys: net.1.weight"],
        ),
        (
            lambda s: prefixed(s, "backbone."),
            {},
            [
                "does not fit model (missing: net.1.weight",
                "unexpected: backbone.net.1.weight",
                "(keys under a prefix: set model.strip_prefix)",
            ],
        ),
    ],
    ids=[
        "ambiguous",
        "no_known_entry",
        "optimizer_only",
        "absent_key",
        "key_of_no_weights",
        "absent_prefix",
        "unknown_prefix",
    ],
)
def test_unusable_checkpoint_layout_is_one_line_naming_the_keys_seen(
    experiment, tmp_path, capsys, payload, layout, fragments
):
    config = experiment()
    path = checkpoint_of(config)
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save(payload(state), path)
    edit(config, lambda c: c["model"].update(layout))
    fails_with(capsys, ["plan", str(config)], f"{path}", *fragments)
    assert not (tmp_path / "exp.h5").exists()


def test_truncated_safetensors_file_is_one_line(experiment, tmp_path, capsys):
    config = experiment()
    state = torch.load(checkpoint_of(config), weights_only=True)["state_dict"]
    path = tmp_path / "exp.safetensors"
    save_file(state, path)
    path.write_bytes(path.read_bytes()[:100])
    edit(config, lambda c: c["model"].update(checkpoint=str(path)))
    fails_with(
        capsys,
        ["plan", str(config)],
        f"model.checkpoint: {path} is not a readable .safetensors file",
        "corrupt or truncated, re-save it",
    )


@pytest.mark.parametrize("name", ["checkpoint_key", "strip_prefix"])
def test_empty_layout_field_is_a_config_error(experiment, capsys, name):
    config = experiment()
    edit(config, lambda c: c["model"].update({name: ""}))
    fails_with(capsys, ["plan", str(config)], f"model.{name}: empty; leave it out")


def test_targets_trajectories_and_analyses_read_wrapped_checkpoints_as_bare_ones(
    experiment, tmp_path
):
    """directions.targets, directions.checkpoints and analysis.checkpoints go through the
    one loader: the same weights saved by a DataParallel training script (prefixed keys
    under ``model``, an optimizer, the epoch) give the surfaces and the analysis (its
    epochs included) of this tool's own files."""
    for epoch in range(3):
        experiment(name=f"tool_{epoch}", seed=epoch + 1)
        state = torch.load(tmp_path / f"tool_{epoch}.pt", weights_only=True)["state_dict"]
        torch.save({"state_dict": state, "epoch": epoch}, tmp_path / f"tool_{epoch}.pt")
        wrapped = {"epoch": epoch, "model": prefixed(state, "module.")}
        torch.save({**wrapped, "optimizer": optimizer_state(state)}, tmp_path / f"dp_{epoch}.pt")
    results = {}
    for saver in ("tool", "dp"):
        files = [str(tmp_path / f"{saver}_{epoch}.pt") for epoch in (1, 2)]
        target = experiment(name=f"target_{saver}", directions={"kind": "target", "targets": files})
        pca = experiment(
            name=f"pca_{saver}",
            directions={"kind": "pca", "checkpoints": [str(tmp_path / f"{saver}_*.pt")]},
        )
        analysis = experiment(
            name=f"analysis_{saver}",
            analysis={
                "output": str(tmp_path / f"{saver}.an.h5"),
                "checkpoints": [str(tmp_path / f"{saver}_*.pt")],
                "quantities": ["trace"],
                "trace_samples": 4,
            },
        )
        assert main(["analyze", str(analysis), "--no-progress"]) == 0
        result = api.read(tmp_path / f"{saver}.an.h5")
        results[saver] = {
            "target": surface_maps(target, f"target_{saver}"),
            "pca": surface_maps(pca, f"pca_{saver}"),
            "analysis": result.maps,
            "epochs": {"epochs": result.groups["checkpoints"][0]["epoch"]},
        }
    for reader, maps in results["tool"].items():
        assert maps.keys() == results["dp"][reader].keys()
        for name, values in maps.items():
            if not name.endswith("_seconds"):  # the time each took
                found = results["dp"][reader][name]
                np.testing.assert_array_equal(found, values, f"{reader} {name}")
    np.testing.assert_array_equal(results["dp"]["epochs"]["epochs"], [0, 1, 2])
