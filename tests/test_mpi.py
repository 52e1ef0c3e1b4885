"""Real ``mpirun`` runs: any number of ranks writes the single-process maps bit for bit,
a killed rank resumes to the same maps, and a failing rank ends the job with its message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    GRID,
    LANDSCAPE,
    MPI_ENV,
    MPIEXEC,
    SLOW,
    TESTS,
    after_kill,
    write_experiment,
)

from landscape.config import load_config
from landscape.parts import parts_folder
from landscape.plan import plan_surface
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.workers import run_job

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: `make install` builds it")


def planned(folder: Path, name: str, changes: dict) -> Path:
    return plan_surface(load_config(write_experiment(folder, name, **changes)))


def mpiexec(ranks: int, *args: str) -> list[str]:
    return [MPIEXEC, "--oversubscribe", "-n", str(ranks), *LANDSCAPE, *args]


def maps_of(path: Path) -> dict[str, np.ndarray]:
    with SurfaceFile.open(path) as surface:
        assert surface.done("loss").all()
        return surface.maps()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Maps of the GRID and SLOW experiments from one process, for comparison."""
    folder = tmp_path_factory.mktemp("reference")
    result = {}
    for name, changes in (("grid", GRID), ("slow", SLOW)):
        path = planned(folder, name, changes)
        run_job(path, "loss", show_progress=False)
        result[name] = maps_of(path)
    return result


def assert_same_maps(path: Path, expected: dict[str, np.ndarray]) -> None:
    for name, values in maps_of(path).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


@pytest.mark.parametrize("ranks, writer", [(1, "mpio"), (2, "mpio"), (4, "mpio"), (2, "parts")])
def test_ranks_write_the_single_process_maps_bit_for_bit(tmp_path, reference, ranks, writer):
    surface = planned(tmp_path, "grid", GRID)
    done = subprocess.run(
        mpiexec(ranks, "run", str(surface), "--writer", writer),
        env=MPI_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert_same_maps(surface, reference["grid"])
    assert not parts_folder(surface).exists()
    for rank in range(ranks):  # each rank says where it runs
        assert f"rank {rank} of {ranks} (node rank {rank} of {ranks}): cpu" in done.stderr
    # One progress bar for the whole run, from rank 0 only.
    assert done.stderr.count("63/63") == 1, done.stderr


def done_count(surface: Path, writer: str) -> int:
    """Points finished so far, read beside the running job."""
    if writer == "parts":
        folder = parts_folder(surface)
        return 4 * len(list(folder.glob("*.h5"))) if folder.is_dir() else 0
    try:
        with h5py.File(surface, "r", locking=False) as handle:
            return int(handle["done/loss"][()].sum())
    except (OSError, KeyError):
        return 0  # caught mid-write: try again


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of one rank: a child of mpiexec whose environment names that rank."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environment:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {children}")


@pytest.mark.parametrize(
    "writer, victim, kill_after",
    [("mpio", 1, 2), ("mpio", 0, 40), ("mpio", 1, 64), ("parts", 1, 32)],
)
def test_killed_rank_resumes_to_identical_maps(tmp_path, reference, writer, victim, kill_after):
    surface = planned(tmp_path, "slow", SLOW)
    run = mpiexec(2, "run", str(surface), "--no-progress", "--writer", writer)
    job = subprocess.Popen(run, env=MPI_ENV, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_count(surface, writer) < kill_after:
        assert job.poll() is None, "the job ended before the kill"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.005)
    assert "points done" in surface_status(surface)  # status reads beside the running job
    os.kill(rank_pid(job, victim), signal.SIGKILL)
    assert job.wait(timeout=60) != 0  # mpiexec ends the job when a rank dies
    done, maps = after_kill(surface, "loss", writer)
    assert kill_after <= done.sum() < done.size, "the kill did not land part-way"
    for name, values in maps.items():  # every point flagged done has its final value
        np.testing.assert_array_equal(values[done], reference["slow"][name][done])

    subprocess.run(run, env=MPI_ENV, check=True, stderr=subprocess.DEVNULL, timeout=120)
    assert_same_maps(surface, reference["slow"])


def test_rank_failing_at_setup_stops_all_with_its_message(tmp_path):
    surface = str(planned(tmp_path, "grid", GRID))
    # MPMD launch: rank 1 alone is given a device that does not exist.
    command = [MPIEXEC, "--oversubscribe", "-n", "1", *LANDSCAPE, "run", surface]
    command += [":", "-n", "1", *LANDSCAPE, "run", surface, "--device", "nodevice"]
    failed = subprocess.run(command, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: rank 1 of 2: evaluation.device: 'nodevice' is not a device; use auto, cpu or cuda"
    ]
    with SurfaceFile.open(surface) as untouched:
        assert not untouched.done("loss").any()


def test_rank_failing_mid_run_aborts_the_job_with_its_message(tmp_path):
    surface = str(planned(tmp_path, "grid", GRID))
    command = [MPIEXEC, "--oversubscribe", "-n", "1", *LANDSCAPE, "run", surface]
    command += [":", "-n", "1", sys.executable, str(TESTS / "faulty_rank.py"), "run", surface]
    failed = subprocess.run(command, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert "error: rank 1 of 2: Traceback" in failed.stderr
    assert "RuntimeError: injected fault: device lost" in failed.stderr
    with SurfaceFile.open(surface) as partial:  # what was written before the abort is intact
        done = partial.done("loss")
        assert np.isfinite(partial.maps()["train_loss"][done]).all()


def test_launcher_and_mpi_disagreeing_on_size_is_an_error(tmp_path):
    """srun with the wrong PMI plug-in starts N copies that each think they are alone."""
    surface = str(planned(tmp_path, "grid", GRID))
    environment = {**MPI_ENV, "SLURM_STEP_NUM_TASKS": "2"}
    failed = subprocess.run(
        [*LANDSCAPE, "run", surface], env=environment, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 2
    assert "the launcher started 2 tasks but MPI sees 1 rank(s)" in failed.stderr
    assert "--mpi=pmix" in failed.stderr


def test_hessian_job_on_two_ranks_equals_one_process(tmp_path):
    hessian_maps = {
        **GRID,
        "maps": ["train_loss", "lambda_min", "lambda_max"],
        "hessian": {"stride": 2},  # 20 of the 63 points
    }
    reference = planned(tmp_path, "single", hessian_maps)
    run_job(reference, "hessian", show_progress=False)
    surface = planned(tmp_path, "ranks", hessian_maps)
    done = subprocess.run(
        mpiexec(2, "hessian", str(surface)),
        env=MPI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with SurfaceFile.open(surface) as parallel, SurfaceFile.open(reference) as single:
        assert parallel.done("hessian").sum() == parallel.points("hessian").size == 20
        assert not parallel.done("loss").any()
        for name, values in single.maps().items():
            np.testing.assert_array_equal(parallel.maps()[name], values, err_msg=name)
