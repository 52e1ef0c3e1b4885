"""User plug-ins that are broken as a user's can be: each plan fails with exit code 2 and
one line naming the config field and the plug-in, and creates no file."""

from __future__ import annotations

import numpy as np
import plugins
import pytest
import torch
import yaml
from test_bad_input import edit, fails_with

from landscape.checkpoint import save_checkpoint
from landscape.cli import main
from landscape.store import SurfaceFile

GOOD_DATA = "plugins:classes"
GOOD_MODEL = "plugins:unit"


def plan_config(folder, model: str, data: str, kwargs: dict | None = None, **changes):
    """A config planning ``model`` on ``data``, with a checkpoint of the model when its
    factory builds one (so that the model's outputs, not its keys, are what fails)."""
    try:
        network = getattr(plugins, model.partition(":")[2])((plugins.FEATURES,), plugins.CLASSES)
    except Exception:
        network = None
    if not isinstance(network, torch.nn.Module) or not list(network.parameters()):
        network = plugins.unit((plugins.FEATURES,), plugins.CLASSES)
    save_checkpoint(folder / "model.pt", network)
    config = {
        "model": {"name": model, "checkpoint": str(folder / "model.pt"), "kwargs": kwargs or {}},
        "data": {"name": data},
        "grid": {"x": {"min": -1.0, "max": 1.0, "num": 3}},
        "maps": ["train_loss", "test_loss"],
        "evaluation": {"device": "cpu", "dtype": "float64"},
        "output": str(folder / "surface.h5"),
        **changes,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_good_plugins_plan(tmp_path):
    """The base of every broken plug-in below plans: each failure is the breakage's own."""
    assert main(["plan", str(plan_config(tmp_path, GOOD_MODEL, GOOD_DATA))]) == 0
    assert (tmp_path / "surface.h5").is_file()


@pytest.mark.parametrize(
    "data, fragments",
    [
        ("data_raises", ["raised FileNotFoundError: /data/features.npy: no such file"]),
        ("data_returns_none", ["returned None", "return a landscape.data.Dataset or a dict"]),
        ("data_returns_a_tuple", ["returned tuple"]),
        ("data_without_test_y", ["returned a dict without test_y"]),
        ("lengths_differ", ["30 train_x samples but 29 train_y targets"]),
        ("label_too_large", ["train_y label 3 (sample 7, 1 in all) outside 0..2"]),
        ("negative_label", ["test_y label -1 (sample 2, 1 in all) outside 0..2"]),
        ("text_inputs", ["train_x that is not numbers", "could not convert string to float"]),
        ("text_labels", ["train_y that is not numbers"]),
        ("nan_inputs", ["train_x with NaN or inf in 1 value (the first in sample 4)"]),
        ("inf_inputs", ["test_x with NaN or inf in 1 value (the first in sample 0)"]),
        ("empty_training_set", ["an empty training set (train_x has 0 samples)"]),
        ("without_test_set", ["an empty test set (test_x has 0 samples)"]),
        ("no_classes", ["num_classes 0", "an integer >= 1"]),
        ("mismatched_test_inputs", ["test_x of shape (9, 6)", "same shape in both splits"]),
    ],
)
def test_broken_data_plugin_is_named_in_one_line(tmp_path, capsys, data, fragments):
    config = plan_config(tmp_path, GOOD_MODEL, f"plugins:{data}")
    fails_with(capsys, ["plan", str(config)], f"data.name: plugins:{data} ", *fragments)
    assert set(tmp_path.iterdir()) == {tmp_path / "model.pt", config}


def test_regression_targets_must_be_finite(tmp_path, capsys):
    config = plan_config(
        tmp_path, GOOD_MODEL, "plugins:nan_targets", maps=["train_loss"], evaluation={"loss": "mse"}
    )
    fails_with(
        capsys,
        ["plan", str(config)],
        "data.name: plugins:nan_targets returned train_y with NaN or inf in 1 value",
    )


def test_data_kwargs_the_factory_does_not_take_are_named(tmp_path, capsys):
    config = yaml.safe_load(plan_config(tmp_path, GOOD_MODEL, "plugins:regression").read_text())
    config["data"]["kwargs"] = {"colour": "red"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fails_with(
        capsys,
        ["plan", str(tmp_path / "config.yaml")],
        "data.kwargs: plugins:regression(samples=40, inputs=3, outputs=2, seed=0, "
        "dtype='float64') cannot be called with data.kwargs {'colour': 'red'} (got an "
        "unexpected keyword argument",
    )


@pytest.mark.parametrize(
    "model, fragments",
    [
        (
            "model_raises",
            [
                "model.name: plugins:model_raises raised RuntimeError: weights server unreachable",
                "(called with input_shape (5,), num_classes 3, model.kwargs {})",
            ],
        ),
        ("model_returns_none", ["returned None, not a torch.nn.Module"]),
        ("model_returns_a_function", ["returned function, not a torch.nn.Module"]),
        (
            "model_without_arguments",
            ["model.name: ", "must take (input_shape, num_classes, **kwargs), it takes ()"],
        ),
        (
            "model_with_required_option",
            [
                "model.kwargs: plugins:model_with_required_option(input_shape, num_classes, "
                "depth) cannot be called with model.kwargs {}",
                "missing a required argument: 'depth'",
            ],
        ),
        ("model_without_parameters", ["returned a Flatten without parameters"]),
        ("wrong_width", ["outputs shape (2, 4) for 2 samples", "3 classes, so it must be (2, 3)"]),
        ("FlatOutput", ["outputs shape (2,) for 2 samples", "must be (2, 3)"]),
        (
            "TupleOutput",
            ["returns a tuple of 2 from forward", "one tensor of outputs, shape (2, 3)"],
        ),
        ("DictOutput", ["returns a dict (keys logits) from forward", "one tensor of outputs"]),
        (
            "FailingForward",
            [
                "fails on 2 training samples of shape (5,): RuntimeError: mat1 and mat2 shapes "
                "cannot be multiplied"
            ],
        ),
        ("NaNOutput", ["outputs NaN or inf on 2 training samples", "model.checkpoint"]),
        (
            "IntegerOutput",
            [
                "outputs (torch.int64, shape (2, 3)) on 2 training samples fail "
                "evaluation.loss cross_entropy: NotImplementedError:"
            ],
        ),
    ],
)
def test_broken_model_plugin_is_named_in_one_line(tmp_path, capsys, model, fragments):
    config = plan_config(tmp_path, f"plugins:{model}", GOOD_DATA)
    fails_with(capsys, ["plan", str(config)], f"plugins:{model}", *fragments)
    assert not (tmp_path / "surface.h5").exists()


def test_zoo_model_kwargs_it_does_not_take_are_named(tmp_path, capsys):
    config = plan_config(tmp_path, "mlp", GOOD_DATA, kwargs={"depth": 3})
    fails_with(
        capsys,
        ["plan", str(config)],
        "model.kwargs: mlp(input_shape, num_classes, hidden=(64, 64), activation='relu') "
        "cannot be called with model.kwargs {'depth': 3}",
    )


def test_plugin_module_that_fails_to_import_is_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise ValueError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = plan_config(tmp_path, "broken_plugin:model", GOOD_DATA)
    fails_with(
        capsys,
        ["plan", str(config)],
        "model.name: importing broken_plugin raised ValueError: no GPU here",
    )


def test_train_refuses_a_broken_model_before_training(tmp_path, capsys):
    config = yaml.safe_load(plan_config(tmp_path, "plugins:TupleOutput", GOOD_DATA).read_text())
    config["train"] = {"checkpoint_dir": str(tmp_path / "checkpoints"), "epochs": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    fails_with(capsys, ["train", str(tmp_path / "config.yaml")], "returns a tuple of 2")
    assert not (tmp_path / "checkpoints").exists()


def maps_with_labels(folder, dtype: str, evaluation: str) -> dict[str, np.ndarray]:
    torch.manual_seed(0)  # the same checkpoint for every label type
    config = plan_config(
        folder, GOOD_MODEL, "plugins:labels_of", evaluation={"device": "cpu", "dtype": evaluation}
    )
    edit(config, lambda c: c["data"].update(kwargs={"dtype": dtype}))
    assert main(["plan", str(config)]) == 0
    assert main(["run", str(folder / "surface.h5"), "--no-progress"]) == 0
    with SurfaceFile.open(folder / "surface.h5") as surface:
        assert surface.done("loss").all()
        return surface.maps()


@pytest.mark.parametrize("evaluation", ["float32", "float64"])
@pytest.mark.parametrize("dtype", ["int32", "int16", "uint8"])
def test_integer_labels_of_any_type_give_the_maps_of_int64_labels(tmp_path, dtype, evaluation):
    """Before: plan passed, then run failed at the first point: `RuntimeError: expected
    target dtype to be Long or Byte, but got Int` (cross-entropy takes int64 only)."""
    (tmp_path / "int64").mkdir()
    (tmp_path / dtype).mkdir()
    expected = maps_with_labels(tmp_path / "int64", "int64", evaluation)
    maps = maps_with_labels(tmp_path / dtype, dtype, evaluation)
    assert set(maps) == {"train_loss", "test_loss"}
    for name, values in expected.items():
        assert np.isfinite(values).all()
        np.testing.assert_array_equal(maps[name], values, err_msg=name)
