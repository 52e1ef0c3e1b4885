"""The sbatch templates in slurm/, submitted to a real local SLURM (slurmctld, slurmd and
accounting started by the session fixture): array tasks + reduce, one MPI job, and a
failing array that keeps the reduce from running."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import yaml
from conftest import final_state, write_experiment

from landscape.config import load_config
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import run_job

SLURM = Path(__file__).resolve().parent.parent / "slurm"
GRID_6X6 = {
    "grid": {
        "x": {"min": -1.0, "max": 1.0, "num": 6},
        "y": {"min": -1.0, "max": 1.0, "num": 6},
        "shard_size": 4,
    }
}


def planned(folder: Path, name: str) -> Path:
    return plan_surface(load_config(write_experiment(folder, name, **GRID_6X6)))


def sbatch(environment: dict, folder: Path, script: str, surface: Path, *options: str) -> str:
    """Submit a template from ``folder``; returns the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", *options, f"--export=ALL,SURFACE={surface}", SLURM / script],
        env=environment,
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return submitted.stdout.strip().split(";")[0]


def assert_same_maps(path: Path, reference: Path) -> None:
    with SurfaceFile.open(path) as result, SurfaceFile.open(reference) as single:
        assert result.done("loss").all()
        for name, values in single.maps().items():
            np.testing.assert_array_equal(result.maps()[name], values, err_msg=name)


def test_array_tasks_then_reduce_equal_one_process(tmp_path, slurm_cluster):
    reference, surface = planned(tmp_path, "reference"), planned(tmp_path, "array")
    run_job(reference, "loss", show_progress=False)
    array = sbatch(slurm_cluster, tmp_path, "array.sbatch", surface, "--array=0-2")
    reduce = sbatch(
        slurm_cluster, tmp_path, "reduce.sbatch", surface, f"--dependency=afterok:{array}"
    )
    assert final_state(slurm_cluster, reduce) == "COMPLETED"
    assert_same_maps(surface, reference)
    assert (tmp_path / "array_plots" / "array_train_loss_contour.png").is_file()
    assert "36/36 points done" in (tmp_path / f"landscape-reduce-{reduce}.out").read_text()


def test_mpi_job_with_srun_equals_one_process(tmp_path, slurm_cluster):
    reference, surface = planned(tmp_path, "reference"), planned(tmp_path, "mpi")
    run_job(reference, "loss", show_progress=False)
    job = sbatch(slurm_cluster, tmp_path, "mpi.sbatch", surface, "--ntasks=2")
    assert final_state(slurm_cluster, job) == "COMPLETED"
    assert_same_maps(surface, reference)
    log = (tmp_path / f"landscape-mpi-{job}.out").read_text()
    assert "2 rank(s); every rank writes its own points" in log


def test_failing_array_task_keeps_the_reduce_from_running(tmp_path, slurm_cluster):
    surface = planned(tmp_path, "broken")
    checkpoint = yaml.safe_load((tmp_path / "broken.yaml").read_text())["model"]["checkpoint"]
    Path(checkpoint).write_bytes(b"not a checkpoint any more")
    array = sbatch(slurm_cluster, tmp_path, "array.sbatch", surface, "--array=0-1")
    reduce = sbatch(
        slurm_cluster,
        tmp_path,
        "reduce.sbatch",
        surface,
        f"--dependency=afterok:{array}",
        "--kill-on-invalid-dep=yes",
    )
    assert final_state(slurm_cluster, array) == "FAILED"
    assert final_state(slurm_cluster, reduce) == "CANCELLED"
    task_log = (tmp_path / f"landscape-{array}_0.out").read_text()
    assert "error: model.checkpoint" in task_log and "changed since" in task_log
    with SurfaceFile.open(surface) as untouched:
        assert not untouched.done("loss").any()
