"""Bad input: a one-line error naming the field or file, exit code 2, results on disk untouched."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from conftest import BASE, merge, write_point

from landscape.cli import main
from landscape.config import ConfigError, load_config, parse_config
from landscape.errors import UserError
from landscape.parts import PartWriter
from landscape.plan import plan_surface
from landscape.store import SurfaceFile


def fails_with(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0, message
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message


def edit(path, change) -> None:
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda c: c.update(colour="red"), ["colour: unknown field"]),
        (lambda c: c["grid"]["x"].update(num="ten"), ["grid.x.num: expected int", "'ten'"]),
        (lambda c: c["grid"]["y"].update(num=1), ["grid.y.num: must be >= 2"]),
        (lambda c: c["grid"]["x"].update(min=1.0, max=-1.0), ["grid.x: min (1.0) must be < max"]),
        (
            lambda c: c["evaluation"].update(dtype="half"),
            ["evaluation.dtype", "float32, float64, bfloat16, float16"],
        ),
        (lambda c: c["directions"].update(normalization="filters"), ["directions.normalization"]),
        (lambda c: c.update(maps=["train_los"]), ["maps: unknown map 'train_los'"]),
        (
            lambda c: c.update(hessian={"tolerance": "1e-0"}),
            ["hessian.tolerance: must be in (0, 1)"],
        ),
        (lambda c: c.update(hessian={"method": "arpack"}), ["hessian.method", "lanczos, eigsh"]),
        (lambda c: c.update(hessian={"stride": 0}), ["hessian.stride: must be >= 1"]),
        (
            lambda c: c["model"].update(checkpoint="/nowhere/model.pt"),
            ["model.checkpoint", "/nowhere/model.pt does not exist"],
        ),
        (
            lambda c: c["model"].update(kwargs={"hidden": [9]}),
            [
                "model.checkpoint",
                "does not fit model",
                "shape: net.1.weight (8, 5) vs model (9, 5)",
            ],
        ),
        (
            lambda c: c["model"].update(name="small_cnn", kwargs={}),
            ["missing: net.0.weight", "unexpected: net.3.bias"],
        ),
        (lambda c: c["model"].update(name="resnet7"), ["model.name: unknown model 'resnet7'"]),
        (lambda c: c["data"].update(name="imagenet"), ["data.name: unknown data set 'imagenet'"]),
        (
            lambda c: c.update(maps=["train_loss"], evaluation={"loss": "mse"}),
            ["evaluation.loss: 'mse' does not fit data", "integer class labels; use cross_entropy"],
        ),
    ],
)
def test_config_errors_name_the_field(experiment, capsys, change, fragments):
    config = experiment()
    edit(config, change)
    fails_with(capsys, ["plan", str(config)], *fragments)


def test_truncated_checkpoint_is_reported_as_corrupt(experiment, capsys):
    config = experiment()
    checkpoint = yaml.safe_load(config.read_text())["model"]["checkpoint"]
    data = open(checkpoint, "rb").read()
    open(checkpoint, "wb").write(data[: len(data) // 2])
    fails_with(capsys, ["plan", str(config)], "model.checkpoint", "corrupt or truncated")


def map_bytes(path) -> dict[str, bytes]:
    with SurfaceFile.open(path) as surface:
        return {k: v.tobytes() for k, v in surface.maps().items()} | {
            "done": surface.done("loss").tobytes()
        }


def test_existing_surface_is_never_overwritten_or_corrupted(experiment, capsys):
    config = experiment()
    surface = yaml.safe_load(config.read_text())["output"]
    assert main(["plan", str(config)]) == 0 and main(["run", surface, "--no-progress"]) == 0
    before = map_bytes(surface)
    assert np.isfinite(np.frombuffer(before["train_loss"])).all()

    # Same config again: a no-op.
    assert main(["plan", str(config)]) == 0
    # Another config aimed at the same file: refused, with the differing fields named.
    edit(config, lambda c: (c["grid"]["x"].update(num=9), c["directions"].update(seed=5)))
    fails_with(capsys, ["plan", str(config)], "different config", "directions.seed", "grid.x.num")
    # The checkpoint changed under the file: plan and run refuse.
    edit(config, lambda c: (c["grid"]["x"].update(num=5), c["directions"].update(seed=0)))
    checkpoint = yaml.safe_load(config.read_text())["model"]["checkpoint"]
    with open(checkpoint, "ab") as handle:
        handle.write(b"\0")
    fails_with(capsys, ["plan", str(config)], "model.checkpoint", "changed since")
    fails_with(capsys, ["run", surface], "model.checkpoint", "changed since")
    # Not a surface file at all.
    fails_with(capsys, ["run", checkpoint], "not an HDF5 file")
    fails_with(capsys, ["status", "/nowhere.h5"], "no such surface file")
    assert map_bytes(surface) == before


def test_override_syntax_is_checked(experiment, capsys):
    fails_with(
        capsys, ["plan", str(experiment()), "--set", "grid.x.num"], "expected key.path=value"
    )


def test_part_file_of_another_plan_is_refused(experiment, capsys):
    """A part left beside a re-planned surface must not be merged into the new plan."""
    config = experiment()
    surface = yaml.safe_load(config.read_text())["output"]
    assert main(["plan", str(config)]) == 0 and main(["run", surface, "--no-progress"]) == 0
    before = map_bytes(surface)
    stale = PartWriter(surface, plan_id="0123456789abcdef")
    write_point(stale, "loss", 0, {name: 0.0 for name in BASE["maps"]})
    stale.commit()

    fails_with(capsys, ["reduce", surface], "belongs to another plan", "plan id 0123456789abcdef")
    fails_with(capsys, ["run", surface], "belongs to another plan")
    assert map_bytes(surface) == before


def test_writer_that_cannot_work_here_is_refused(experiment, capsys):
    config = experiment()
    surface = yaml.safe_load(config.read_text())["output"]
    assert main(["plan", str(config)]) == 0
    fails_with(capsys, ["run", surface, "--writer", "mpio"], "--writer mpio", "mpirun or srun")
    fails_with(capsys, ["hessian", surface], "has no hessian job", "lambda_min")


@pytest.mark.parametrize(
    "directions, grid, message",
    [
        ({"kind": "pca"}, None, "directions.checkpoints: required for kind 'pca'"),
        (
            {"kind": "pca", "checkpoints": ["a.pt"], "normalization": "filter"},
            None,
            "directions.normalization: pca directions must stay 'unit'",
        ),
        ({"kind": "interpolation", "targets": ["b.pt"]}, None, "grid.y: interpolation is 1D"),
        ({"kind": "target", "targets": ["b.pt"]}, None, "directions.targets: 1 given for a 2D"),
        ({"kind": "file"}, None, "directions.file: required"),
        ({"kind": "random"}, {"x": {"num": 5}}, "grid: min and max are required"),
    ],
)
def test_direction_settings_that_cannot_work_are_refused_at_load(directions, grid, message):
    raw = merge(BASE, {"directions": directions, **({"grid": grid} if grid else {})})
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(yaml.safe_dump(raw))


def test_pca_checkpoint_pattern_matching_nothing_is_named(experiment, tmp_path):
    config = experiment(directions={"kind": "pca", "checkpoints": [str(tmp_path / "none_*.pt")]})
    with pytest.raises(UserError, match=r"directions.checkpoints: .*none_\*.pt matches no file"):
        plan_surface(load_config(config))
    assert not (tmp_path / "exp.h5").exists()
