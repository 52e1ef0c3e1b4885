"""`mpirun -n 2 landscape analyze`: killed after the first checkpoints are in, then resumed,
an analysis gives the maps of an uninterrupted one bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import LANDSCAPE, MPI_ENV, MPIEXEC, after_kill, gated, wait_at_gate
from test_analysis import training_run

from landscape.cli import main
from landscape.config import load_config
from landscape.plan import plan_analysis
from landscape.store import SurfaceFile
from landscape.workers import run_job

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: `make install` builds it")

CHECKPOINTS = 4  # epoch_000 .. epoch_003


def comparable(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The maps a rerun must reproduce bit for bit: all but the <quantity>_seconds, which
    are wall-clock times."""
    return {name: values for name, values in maps.items() if not name.endswith("_seconds")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A config analysing 4 checkpoints, and the maps of one uninterrupted process."""
    config = training_run(tmp_path_factory.mktemp("analysis"), epochs=CHECKPOINTS - 1)
    reference = plan_analysis(load_config(config))
    run_job(reference, "analysis", show_progress=False)
    with SurfaceFile.open(reference) as analysis:
        assert analysis.done("analysis").sum() == CHECKPOINTS
        return config, comparable(analysis.maps())


@pytest.mark.parametrize("writer, ranks", [("mpio", 2), ("parts", 1)])
def test_killed_analysis_resumes_to_identical_maps(tmp_path, run, writer, ranks):
    """Resumed by ``ranks`` processes: a resume need not have the ranks of the killed run
    (one process merges the part files first; each launch of 2 ranks costs ~10 s here)."""
    config, expected = run
    output = plan_analysis(load_config(config, [f"analysis.output={tmp_path / 'killed.h5'}"]))
    # Each rank stops before its second checkpoint: the first one of each is saved.
    gate = tmp_path / "gate"
    command = [MPIEXEC, "--oversubscribe", "-n", "2"]
    command += gated(gate, 1, "analyze", str(output), "--no-progress", "--writer", writer)
    job = subprocess.Popen(command, env=MPI_ENV, stderr=subprocess.DEVNULL)
    wait_at_gate(gate, job, processes=2)
    victim = int(next(tmp_path.glob("gate.reached.*")).suffix[1:])
    os.kill(victim, signal.SIGKILL)
    assert job.wait(timeout=60) != 0  # mpiexec ends the job when a rank dies
    done, maps = after_kill(output, "analysis", writer)
    maps = comparable(maps)
    assert done.sum() == 2, done  # one checkpoint per rank
    for name, values in maps.items():  # every checkpoint flagged done has its final values
        np.testing.assert_array_equal(values[done], expected[name][done], err_msg=name)
        assert np.isnan(values[~done]).all(), name

    if ranks == 1:
        assert main(["analyze", str(output), "--no-progress"]) == 0
    else:
        resume = [MPIEXEC, "--oversubscribe", "-n", str(ranks), *LANDSCAPE, "analyze"]
        resume += [str(output), "--no-progress", "--writer", writer]
        subprocess.run(resume, env=MPI_ENV, check=True, stderr=subprocess.DEVNULL, timeout=300)
    with SurfaceFile.open(output) as resumed:
        assert resumed.done("analysis").all()
        maps = resumed.maps()
    for name, values in expected.items():
        np.testing.assert_array_equal(maps[name], values, err_msg=name)
    seconds = [name for name in maps if name.endswith("_seconds")]
    assert seconds and all((maps[name] > 0).all() for name in seconds)
