"""The Python API does what the commands do: a notebook's plan/run/read gives the numbers a
direct evaluation gives, resumes instead of repeating, and fails with the commands' lines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from landscape import api
from landscape.errors import UserError
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.parameters import DirectionPlane
from landscape.store import SurfaceFile


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plan_run_read_from_python_equals_direct_evaluation(experiment, dtype):
    config = experiment(
        maps=["train_loss", "test_acc", "lambda_min", "lambda_max"],
        evaluation={"dtype": dtype},
        hessian={"stride": 2},
    )
    path = api.plan(config, ["grid.x.num=3", "grid.y.num=2"])
    assert api.run(path, progress=False) == 6
    assert api.run(path, job="hessian", progress=False) == 2
    assert api.run(path, progress=False) == 0  # resumes: nothing left to compute

    result = api.read(path)
    assert result.maps["train_loss"].shape == (2, 3) and result.done["loss"].all()
    assert result.done["hessian"].sum() == 2 and result.labels[0].startswith("x:")
    assert result.attrs["checkpoint_path"] == result.config.model.checkpoint
    loaded = Experiment.load(result.config, device="cpu")
    with SurfaceFile.open(path) as surface:
        plane = DirectionPlane(loaded.model, surface.directions())
    batch_size = result.config.evaluation.batch_size
    for j, b in enumerate(result.grid.y):
        for i, a in enumerate(result.grid.x):
            plane.move_to(float(a), float(b))
            train = evaluate(loaded.model, loaded.data.split("train"), batch_size, loaded.objective)
            test = evaluate(loaded.model, loaded.data.split("test"), batch_size, loaded.objective)
            assert result.maps["train_loss"][j, i] == train[0]
            assert result.maps["test_acc"][j, i] == test[1]
    ratio = np.abs(result.maps["lambda_min"] / result.maps["lambda_max"])
    np.testing.assert_array_equal(result.maps["lambda_ratio"], ratio)
    assert np.isfinite(ratio).sum() == 2
    assert "loss: 6/6 points done" in api.status(path)


def test_api_fails_with_the_commands_one_line_errors(tmp_path, experiment):
    with pytest.raises(UserError, match="no such surface file"):
        api.read(tmp_path / "missing.h5")
    with pytest.raises(UserError, match="grid.x.num"):
        api.plan(experiment(), ["grid.x.num=1"])


def test_importing_the_package_loads_neither_torch_nor_the_api():
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, landscape; print('torch' in sys.modules, "
            "'landscape.api' in sys.modules, landscape.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert loaded[:2] == ["False", "False"]
