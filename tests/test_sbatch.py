"""What `landscape submit` hands sbatch and what it reads back from squeue and sacct, with
stand-ins for them on PATH (as submitit's own tests stand in for sbatch): the options in
each script, the dependent reduce, each array task's shards, MPI mode, the submission
record, and job states. No cluster: each test takes milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import submitit
from conftest import BOTH_JOBS

from landscape.config import load_config
from landscape.errors import UserError
from landscape.plan import plan_surface
from landscape.slurm import (
    MpiRun,
    ShardTask,
    SlurmJobs,
    SlurmOptions,
    array_indices,
    read_submission,
    record_path,
    reduce_and_plot,
    submit,
)
from landscape.store import SurfaceFile
from landscape.workers import ArrayTask, run_job

OPTIONS = SlurmOptions(
    tasks=3,
    parallelism=2,
    partition="gpu",
    time_min=30,
    cpus_per_task=2,
    gpus_per_task=1,
    mem_gb=4,
    account="physics",
    qos="high",
    sbatch={"constraint": "a100"},
)
# What every job of OPTIONS asks for, the reduce included.
EVERY_JOB = {
    "partition": "gpu",
    "time": "30",
    "cpus-per-task": "2",
    "mem": "4GB",
    "account": "physics",
    "qos": "high",
    "constraint": "a100",
}


@pytest.fixture(autouse=True)
def no_throttling(monkeypatch):
    """submitit waits 0.2 s between two sbatch calls to spare a real controller."""
    monkeypatch.setattr(submitit.core.core.PicklingExecutor, "_throttle", lambda self: None)


@pytest.fixture
def surface(experiment) -> Path:
    return plan_surface(load_config(experiment(**BOTH_JOBS)))


def flags(script: str) -> dict[str, str]:
    """The ``#SBATCH --name=value`` lines of a script."""
    lines = (line.removeprefix("#SBATCH --") for line in script.splitlines())
    return dict(line.split("=", 1) for line in lines if not line.startswith("#") and "=" in line)


def srun_line(script: str) -> str:
    return next(line for line in script.splitlines() if line.startswith("srun "))


def pending(surface: Path) -> dict[str, list[int]]:
    with SurfaceFile.open(surface) as opened:
        return {job: opened.pending_shard_indices(job) for job in opened.jobs}


def submitted_call(surface: Path, job_id: str):
    """The function and arguments submitit pickled for a job (what its task will run)."""
    folder = surface.with_name(surface.name + ".slurm") / "%j"
    paths = submitit.core.utils.JobPaths(folder, job_id=job_id)
    return submitit.core.utils.DelayedSubmission.load(paths.submitted_pickle)


def test_array_jobs_ask_for_the_options_and_the_reduce_waits_for_every_array(surface, fake_slurm):
    fake_slurm.sbatch()
    record = submit(surface, OPTIONS)
    *arrays, reduce = fake_slurm.scripts()
    assert len(arrays) == len(record["jobs"]) == 2
    for script in arrays:
        assert EVERY_JOB.items() <= flags(script).items()
        assert flags(script)["array"] == "0-2%2"  # 3 tasks, 2 at once
        assert flags(script)["gpus-per-node"] == "1"  # one task per node: its own GPU
        assert flags(script)["job-name"] == f"landscape-{surface.stem}"
        assert "dependency" not in flags(script) and "--mpi" not in srun_line(script)
    array_ids = [entry["id"] for entry in record["jobs"].values()]
    assert array_ids == ["41", "42"] and record["reduce"]["id"] == "43"
    assert EVERY_JOB.items() <= flags(reduce).items()
    assert flags(reduce)["dependency"] == "afterok:41:42"
    assert flags(reduce)["kill-on-invalid-dep"] == "yes"
    assert flags(reduce)["gpus-per-node"] == "0" and flags(reduce)["ntasks-per-node"] == "1"
    assert flags(reduce)["job-name"] == f"landscape-{surface.stem}-reduce"
    assert "array" not in flags(reduce)
    call = submitted_call(surface, "43")
    assert call.function is reduce_and_plot and call.args == (str(surface),)


@pytest.mark.parametrize("tasks", [4, 20])
def test_each_array_task_runs_every_nth_pending_shard(surface, fake_slurm, tasks):
    """9 shards in 4 tasks: 0 4 8 | 1 5 | 2 6 | 3 7. In 20 tasks: one shard each, 9 tasks."""
    fake_slurm.sbatch()
    record = submit(surface, SlurmOptions(tasks=tasks))
    for job, shards in pending(surface).items():
        groups = [shards[i::tasks] for i in range(min(tasks, len(shards)))]
        entry = record["jobs"][job]
        assert [task["shards"] for task in entry["tasks"]] == groups
        assert [task["id"] for task in entry["tasks"]] == [
            f"{entry['id']}_{index}" for index in range(len(groups))
        ]
        for index, task in enumerate(entry["tasks"]):
            call = submitted_call(surface, task["id"])
            assert isinstance(call.function, ShardTask)
            assert call.args == (str(surface), job, index, len(groups), groups[index])
    # --parallelism 0: no limit of its own (submitit's %N lets every task run at once).
    counts = [len(entry["tasks"]) for entry in record["jobs"].values()]
    arrays = [flags(script)["array"] for script in fake_slurm.scripts()[:-1]]
    assert arrays == [f"0-{count - 1}%{count}" for count in counts]


def test_only_the_shards_still_missing_are_submitted(surface, fake_slurm):
    """Shards finished in part files (an array task that ran) are not sent again."""
    with SurfaceFile.open(surface) as opened:
        job = opened.jobs[-1]
        all_shards = opened.pending_shard_indices(job)
    run_job(surface, job, task=ArrayTask(0, 3), show_progress=False)  # shards 0, 3, 6
    fake_slurm.sbatch()
    record = submit(surface, SlurmOptions(tasks=2), jobs=[job])
    sent = [shard for task in record["jobs"][job]["tasks"] for shard in task["shards"]]
    assert sorted(sent) == [shard for shard in all_shards if shard % 3]
    assert list(record["jobs"]) == [job]


def test_mpi_jobs_run_one_after_the_other_under_srun_with_pmix(surface, fake_slurm):
    fake_slurm.sbatch()
    record = submit(surface, SlurmOptions(tasks=3, gpus_per_task=1, mpi=True))
    first, second, reduce = fake_slurm.scripts()
    for script in (first, second):
        assert "--mpi=pmix" in srun_line(script) and "array" not in flags(script)
        assert flags(script)["ntasks-per-node"] == "3"  # one rank per task
        assert flags(script)["gpus-per-node"] == "3"  # a GPU per rank
    # Two parallel writers never share the file: the second job waits for the first.
    assert "dependency" not in flags(first)
    assert flags(second)["dependency"] == "afterok:41"
    assert flags(second)["kill-on-invalid-dep"] == "yes"
    assert flags(reduce)["dependency"] == "afterok:41:42"
    assert flags(reduce)["ntasks-per-node"] == "1" and flags(reduce)["gpus-per-node"] == "0"
    for (job, entry), job_id in zip(record["jobs"].items(), ("41", "42")):
        assert entry["id"] == job_id and entry["shards"] == pending(surface)[job]
        call = submitted_call(surface, job_id)
        assert isinstance(call.function, MpiRun) and call.args == (str(surface), job)


@pytest.mark.parametrize("mpi", [False, True])
def test_the_submission_record_is_written_and_read_back(surface, fake_slurm, mpi):
    fake_slurm.sbatch()
    options = SlurmOptions(**{**OPTIONS.__dict__, "mpi": mpi})
    record = submit(surface, options)
    assert json.loads(record_path(surface).read_text()) == record
    assert SlurmOptions(**record["options"]) == options
    submitted, entries = read_submission(record_path(surface))
    assert submitted == record["submitted"]
    expected = []
    for job, entry in record["jobs"].items():
        if mpi:
            expected.append((f"{job} MPI job {entry['id']}", entry))
        else:
            expected += [(f"{job} task {task['id']}", task) for task in entry["tasks"]]
    assert entries == [*expected, ("reduce", record["reduce"])]


def test_a_refused_sbatch_names_the_jobs_already_queued(surface, fake_slurm):
    """The second array is refused: the first is queued already, and the user must know."""
    fake_slurm.sbatch(refuse_from=42)
    with pytest.raises(UserError) as refused:
        submit(surface, OPTIONS)
    assert str(refused.value) == (
        "submit: sbatch refused the job (sbatch: error: Batch job submission failed: Invalid "
        "account or account/partition combination specified); already queued: 41 (scancel "
        "them); check --partition, --account, --time and the other sbatch options"
    )
    assert not record_path(surface).exists()


def test_states_are_asked_of_squeue_and_sacct_once_per_array(fake_slurm):
    fake_slurm(squeue="41_3|RUNNING\n", sacct="41_0|COMPLETED\n41_3|PREEMPTED\n42|PENDING\n")
    jobs = SlurmJobs.query(["41_0", "41_3", "42"])
    assert fake_slurm.arguments("squeue") == [["-h", "-r", "-o", "%i|%T", "-j", "41,42"]]
    assert fake_slurm.arguments("sacct") == [
        ["-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", "41,42"]
    ]
    assert jobs.state("41_3") == "RUNNING"  # the queue is live; accounting lags
    assert jobs.describe("41_3") == "RUNNING"  # one earlier run in sacct is no requeue here
    assert jobs.state("41_0") == "COMPLETED" and jobs.active() == ["41_3"]


def test_a_task_requeued_twice_says_why(fake_slurm):
    fake_slurm(squeue="", sacct="41_1|PREEMPTED\n41_1|TIMEOUT\n41_1|COMPLETED\n")
    jobs = SlurmJobs.query(["41_1"])
    assert jobs.describe("41_1") == "COMPLETED, requeued 2 times (PREEMPTED, TIMEOUT)"


def test_array_tasks_not_yet_started_are_read_from_folded_lines(fake_slurm):
    """sacct folds the tasks of an array that have not started: ``41_[2-7%2]``."""
    fake_slurm(
        squeue="", sacct="41_0|COMPLETED\n41_1|RUNNING\n41_[2-7%2]|PENDING\n41_[9]|PENDING\n"
    )
    jobs = SlurmJobs.query([f"41_{index}" for index in range(10)])
    states = [jobs.state(f"41_{index}") for index in range(10)]
    assert states == [
        "COMPLETED",
        "RUNNING",
        *["PENDING"] * 6,
        "PENDING (not yet in accounting)",  # in neither: submitted moments ago
        "PENDING",
    ]
    assert array_indices("0-3,7%2") == [0, 1, 2, 3, 7]


def test_squeue_that_finds_none_of_the_jobs_means_none_is_queued(fake_slurm):
    """squeue exits 1 when no job asked for is queued any more: not a failure to answer."""
    fake_slurm.answer("squeue", stderr="slurm_load_jobs error: Invalid job id specified", status=1)
    fake_slurm(sacct="41|COMPLETED\n")
    jobs = SlurmJobs.query(["41"])
    assert jobs.queued == {} and jobs.active() == [] and jobs.state("41") == "COMPLETED"

    fake_slurm(squeue=None)  # no controller: the queue is unknown, sacct still answers
    jobs = SlurmJobs.query(["41"])
    assert jobs.queued is None and jobs.state("41") == "COMPLETED"
    fake_slurm(sacct=None)
    assert SlurmJobs.query(["41"]).state("41") == "unknown (neither squeue nor sacct answered)"
