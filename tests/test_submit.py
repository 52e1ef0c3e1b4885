"""`landscape submit` on a real local SLURM: array jobs + reduce, failures, resubmission
of only the missing shards, and MPI mode; every result bit-identical to one process."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import BOTH_JOBS, final_state, write_experiment

from landscape import slurm
from landscape.atomic import write_file
from landscape.cli import main
from landscape.config import load_config
from landscape.errors import UserError
from landscape.locking import lock_path
from landscape.plan import plan_surface
from landscape.slurm import SlurmOptions, record_path, submit
from landscape.status import surface_status
from landscape.store import SurfaceFile
from landscape.workers import run_job


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):
    """submitit calls sbatch and sacct from this process: give it the cluster's environment."""
    for name in ("SLURM_CONF", "PATH", "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        monkeypatch.setenv(name, slurm_cluster[name])
    return slurm_cluster


def reference_maps(folder: Path) -> dict[str, np.ndarray]:
    path = plan_surface(load_config(write_experiment(folder, "reference", **BOTH_JOBS)))
    run_job(path, "loss", show_progress=False)
    run_job(path, "hessian", show_progress=False)
    with SurfaceFile.open(path) as surface:
        return surface.maps()


def submitted(surface: Path, *options: str) -> dict:
    assert main(["submit", str(surface), *options]) == 0
    return json.loads(record_path(surface).read_text())


def assert_maps(surface: Path, expected: dict[str, np.ndarray]) -> None:
    with SurfaceFile.open(surface) as result:
        for name, values in expected.items():
            np.testing.assert_array_equal(result.maps()[name], values, err_msg=name)


def lock_is_free(surface: Path) -> bool:
    """Whether another process could take the surface's lock now (flock locks are per
    open file, so a second open of it here stands for another process)."""
    try:
        descriptor = os.open(lock_path(surface), os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


def test_jobs_are_submitted_with_the_surface_lock_released(experiment, monkeypatch):
    """Before: submit held the lock through every sbatch, so an array task (shared lock,
    no wait) that started meanwhile exited 2, and the reduce was cancelled."""
    surface = plan_surface(load_config(experiment(grid=BOTH_JOBS["grid"])))
    free_at_sbatch = []

    class Executor:  # submitit.AutoExecutor without a cluster: records the lock at sbatch
        def __init__(self, folder, cluster):
            self.count = 0

        def update_parameters(self, **parameters):
            pass

        def batch(self):
            return nullcontext()

        def submit(self, function, *args):
            free_at_sbatch.append(lock_is_free(surface))
            self.count += 1
            return SimpleNamespace(
                job_id=str(self.count), paths=SimpleNamespace(stderr=f"{self.count}.err")
            )

    monkeypatch.setattr(slurm.submitit, "AutoExecutor", Executor)
    record = submit(surface, SlurmOptions(tasks=2))
    assert len(record["jobs"]["loss"]["tasks"]) == 2 and record["reduce"]["id"] == "3"
    assert free_at_sbatch == [True, True, True]


def test_arrays_and_reduce_equal_one_process(tmp_path, cluster):
    expected = reference_maps(tmp_path)
    config = write_experiment(tmp_path, "array", **BOTH_JOBS)
    assert main(["submit", str(config), "--tasks", "3"]) == 0  # plans it first
    surface = tmp_path / "array.h5"
    record = json.loads(record_path(surface).read_text())
    assert [len(record["jobs"][job]["tasks"]) for job in ("loss", "hessian")] == [3, 3]
    assert final_state(cluster, record["reduce"]["id"]) == "COMPLETED"
    assert_maps(surface, expected)
    assert (tmp_path / "array_plots" / "array_lambda_ratio_heatmap.png").is_file()
    status = surface_status(surface)
    assert status.count(": COMPLETED") == 7 and "FAILED" not in status


def test_failed_task_is_shown_with_its_shards_and_log_and_blocks_the_reduce(tmp_path, cluster):
    config = write_experiment(tmp_path, "broken", **BOTH_JOBS)
    surface = plan_surface(load_config(config))
    (tmp_path / "broken.pt").write_bytes(b"corrupt")
    record = submitted(surface, "--tasks", "2", "--jobs", "loss")
    assert final_state(cluster, record["reduce"]["id"]) == "CANCELLED"
    first = record["jobs"]["loss"]["tasks"][0]
    assert final_state(cluster, first["id"]) == "FAILED"  # the reduce may be cancelled first
    status = surface_status(surface)
    assert f"loss task {first['id']}: FAILED, shards 0, 2, 4, 6, 8; log {first['log']}" in status
    assert "changed since" in Path(first["log"]).read_text()
    with SurfaceFile.open(surface) as untouched:
        assert not untouched.done("loss").any()


def test_resubmitting_sends_only_the_missing_shards(tmp_path, cluster):
    expected = reference_maps(tmp_path)
    surface = plan_surface(load_config(write_experiment(tmp_path, "again", **BOTH_JOBS)))
    # One task at a time: cancel the last while it still waits, as if killed mid-array.
    first = submitted(surface, "--tasks", "3", "--parallelism", "1", "--jobs", "loss")
    cancelled = first["jobs"]["loss"]["tasks"][2]
    # Behind the other two, the last task waits: pending (not yet in sacct), and a second
    # submission now would compute its shards twice.
    assert f"    loss task {cancelled['id']}: PENDING" in surface_status(surface).splitlines()
    assert main(["submit", str(surface), "--jobs", "loss"]) == 2
    subprocess.run(["scancel", cancelled["id"]], env=cluster, check=True)
    assert final_state(cluster, first["reduce"]["id"]) == "CANCELLED"
    # The others finish and leave their parts (a task cancelled while pending has no
    # sacct record of its own: it stays in the array's).
    started = first["jobs"]["loss"]["tasks"][:2]
    assert [final_state(cluster, task["id"]) for task in started] == ["COMPLETED"] * 2

    second = submitted(surface, "--tasks", "3", "--jobs", "loss")
    tasks = second["jobs"]["loss"]["tasks"]
    assert sorted(s for task in tasks for s in task["shards"]) == cancelled["shards"]
    assert final_state(cluster, second["reduce"]["id"]) == "COMPLETED"
    with SurfaceFile.open(surface) as done:
        assert done.done("loss").all()
    assert_maps(surface, {name: expected[name] for name in ("train_loss", "train_acc")})


def test_mpi_mode_runs_one_srun_job_per_kind(tmp_path, cluster):
    expected = reference_maps(tmp_path)
    surface = plan_surface(load_config(write_experiment(tmp_path, "mpi", **BOTH_JOBS)))
    record = submitted(surface, "--mpi", "--tasks", "2")
    assert final_state(cluster, record["reduce"]["id"]) == "COMPLETED"
    assert_maps(surface, expected)
    log = Path(record["jobs"]["loss"]["log"]).read_text()
    assert "2 rank(s); every rank writes its own points" in log


def test_no_second_submission_while_the_last_is_queued(experiment, fake_slurm):
    """Without a cluster: squeue says a task of the last submission still runs."""
    surface = plan_surface(load_config(experiment(**BOTH_JOBS)))
    last = {
        "submitted": "2024-05-01T10:00:00+00:00",
        "jobs": {"loss": {"id": "7", "tasks": [{"id": f"7_{i}", "log": "-"} for i in range(2)]}},
        "reduce": {"id": "8", "log": "-"},
    }
    write_file(record_path(surface), json.dumps(last).encode(), "record")
    fake_slurm(squeue="7_1|RUNNING\n8|PENDING\n", sacct="")
    with pytest.raises(UserError) as refused:
        submit(surface, SlurmOptions())
    assert str(refused.value) == (
        f"{surface}: jobs of its last submission are still queued or running (7_1, 8); wait "
        f"for them (landscape status {surface}) or cancel them (scancel 7 8)"
    )
    assert json.loads(record_path(surface).read_text()) == last
