"""``--set key.path=value`` overrides (parse_config) and config_differences, which `plan`
uses to name the fields a config changed since its surface file was planned."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import BASE

from landscape.config import ConfigError, config_differences, parse_config

TEXT = yaml.safe_dump(
    {**copy.deepcopy(BASE), "model": {**BASE["model"], "checkpoint": "m.pt"}, "output": "o.h5"}
)


def test_overrides_set_nested_fields_lists_and_typed_values():
    config = parse_config(
        TEXT,
        overrides=[
            "grid.x.num=11",  # int
            "grid.y.min=-0.5",  # float
            "maps=[train_loss, test_acc]",  # a list
            "evaluation.dtype=float32",  # text
            "model.kwargs.hidden=[16, 16]",  # inside a free-form mapping
            'output="my run.h5"',  # quoted text, with a space
            "directions.seed=3",
            "directions.seed=4",  # the last of two wins
        ],
    )
    assert (config.grid.x.num, config.grid.y.min, config.grid.y.num) == (11, -0.5, 4)
    assert config.maps == ["train_loss", "test_acc"]
    assert config.evaluation.dtype == "float32" and config.evaluation.batch_size == 16
    assert config.model.kwargs == {"hidden": [16, 16]}
    assert Path(config.output).name == "my run.h5"  # made absolute, as every path
    assert config.directions.seed == 4


def test_an_override_may_add_a_section_the_file_lacks():
    config = parse_config(TEXT, overrides=["train.checkpoint_dir=runs", "train.epochs=2"])
    assert (Path(config.train.checkpoint_dir).name, config.train.epochs) == ("runs", 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("grid.z.num=3", "grid.z: unknown field; valid fields here are x, y, shard_size"),
        ("colour=red", "colour: unknown field; valid fields here are model, output,"),
        ("grid.x.num=eleven", "grid.x.num: expected int, got 'eleven' (str)"),
        ("grid.x.num=1.5", "grid.x.num: expected int, got 1.5 (float)"),
        ('evaluation.batch_size="16"', "evaluation.batch_size: expected int, got '16' (str)"),
        ("maps.first=1", "--set 'maps.first=1': maps is not a section"),
        ("grid.x.num", "--set 'grid.x.num': expected key.path=value, e.g. grid.x.num=11"),
        ("grid.x.num=[1", "--set 'grid.x.num=[1': the value is not YAML ("),
    ],
)
def test_a_bad_override_is_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as refused:
        parse_config(TEXT, overrides=[override])
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_config_differences_names_each_changed_field_by_its_dotted_path():
    old = parse_config(TEXT).to_dict()
    new = parse_config(TEXT, overrides=["grid.x.num=11", "maps=[train_loss]"]).to_dict()
    assert config_differences(old, new) == ["grid.x.num", "maps"]
    assert config_differences(old, copy.deepcopy(old)) == []
    # How a streamed set is read changes nothing computed: a file planned with
    # `workers: 2` (the default before auto) plans again from a config that omits it.
    read = parse_config(TEXT, overrides=["data.workers=2", "data.prefetch=4"]).to_dict()
    assert config_differences(read, old) == []


def test_config_differences_counts_fields_only_one_side_has():
    old = {"grid": {"x": {"num": 5}}, "hessian": None, "trace": {"samples": 10}}
    new = {"grid": {"x": {"num": 5, "min": 0.0}}, "hessian": {"stride": 2}, "train": {}}
    assert config_differences(old, new) == ["grid.x.min", "hessian", "trace", "train"]
