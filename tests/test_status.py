"""`landscape status`: points waiting in part files count (progress, rate, time left), each
submitted task's state from squeue and sacct (pending, requeued, failed), a damaged
submission record in one line, and a reader that goes away mid-output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import h5py
import pytest

from landscape import status as status_module
from landscape.atomic import write_file
from landscape.cli import main
from landscape.config import load_config
from landscape.errors import UserError
from landscape.parts import parts_folder
from landscape.plan import plan_surface
from landscape.slurm import record_path
from landscape.status import format_duration, surface_status
from landscape.workers import ArrayTask, run_job

GRID_6X6 = {
    "x": {"min": -1.0, "max": 1.0, "num": 6},
    "y": {"min": -1.0, "max": 1.0, "num": 6},
    "shard_size": 4,  # 9 shards; array task 0 of 3 owns shards 0, 3, 6: 12 points
}


@pytest.fixture
def surface(experiment):
    return plan_surface(load_config(experiment(grid=GRID_6X6)))


def job_line(status: str) -> str:
    return next(line for line in status.splitlines() if line.startswith("  loss:"))


def test_points_in_unmerged_part_files_count_towards_progress_rate_and_time_left(surface):
    run_job(surface, "loss", task=ArrayTask(0, 3), show_progress=False)
    parts = sorted(parts_folder(surface).glob("*.h5"))
    finished = []
    for part in parts:
        with h5py.File(part, "r") as handle:
            finished += list(handle["finished"][()])
    assert len(finished) == 12
    rate = 11 / (max(finished) - min(finished))  # 12 finish times: 11 intervals
    assert job_line(surface_status(surface)) == (
        "  loss: 0/36 points done (+12 in part files, not yet merged: 33.3% in all), "
        f"{rate:.2f} points/s, about {format_duration(24 / rate)} left"
    )

    kept = parts[0].read_bytes()
    subprocess.run([sys.executable, "-m", "landscape.cli", "reduce", str(surface)], check=True)
    merged = job_line(surface_status(surface))
    assert merged.startswith("  loss: 12/36 points done (33.3%), ")
    # A reducer killed after its flush leaves parts already merged: not counted twice.
    parts_folder(surface).mkdir()
    parts[0].write_bytes(kept)
    assert job_line(surface_status(surface)) == merged


RECORD = {
    "surface": "exp.h5",
    "submitted": "2024-05-01T10:00:00+00:00",
    "options": {},
    "jobs": {
        "surface": {
            "id": "7",
            "tasks": [
                {"id": f"7_{index}", "shards": [index, index + 5], "log": f"/logs/7_{index}.err"}
                for index in range(5)
            ],
        },
        "hessian": {"id": "9", "shards": [0, 1], "log": "/logs/9.err"},
    },
    "reduce": {"id": "10", "log": "/logs/10.err"},
}
# squeue -r: every task still queued; sacct -D: each run of each job, oldest first, with
# tasks that never started folded into one line per array.
SQUEUE = "7_1|RUNNING\n7_2|PENDING\n10|PENDING\n"
SACCT = (
    "7_0|COMPLETED\n7_1|REQUEUED\n7_[2]|PENDING\n7_1|RUNNING\n7_3|FAILED\n"
    "7_[4-6%2]|CANCELLED by 0\n"
)


def task_lines(status: str) -> list[str]:
    lines = status.splitlines()
    return lines[next(i for i, line in enumerate(lines) if "submitted" in line) :]


def test_task_states_from_squeue_and_sacct(surface, fake_slurm):
    write_file(record_path(surface), json.dumps(RECORD).encode(), "record")
    fake_slurm(squeue=SQUEUE, sacct=SACCT)
    assert task_lines(surface_status(surface)) == [
        f"  submitted 2024-05-01T10:00:00+00:00 ({record_path(surface).name}):",
        "    surface task 7_0: COMPLETED",
        "    surface task 7_1: RUNNING, requeued 1 time (REQUEUED)",
        "    surface task 7_2: PENDING",
        "    surface task 7_3: FAILED, shards 3, 8; log /logs/7_3.err",
        "    surface task 7_4: CANCELLED by 0, shards 4, 9; log /logs/7_4.err",
        "    hessian MPI job 9: PENDING (not yet in accounting)",
        "    reduce: PENDING",
    ]

    fake_slurm(squeue=None, sacct=None)  # no controller, no accounting: say so
    assert "    hessian MPI job 9: unknown (neither squeue nor sacct answered)" in (
        surface_status(surface)
    )


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_submission_record_is_one_line(surface, fake_slurm, damage):
    text = json.dumps(RECORD, indent=2)
    damaged = text[: len(text) // 2] if damage == "truncated" else '{"jobs": []}'
    record_path(surface).write_text(damaged)
    fake_slurm(squeue=SQUEUE, sacct=SACCT)
    status = surface_status(surface)
    assert "loss: 0/36 points done (0.0%)" in status  # the rest is still shown
    last = status.splitlines()[-1]
    assert last.startswith(f"  {record_path(surface)}: unreadable submission record (truncated")
    assert last.endswith("); task states unknown: submit again or delete it")


def test_record_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    record = tmp_path / "exp.h5.submission.json"
    write_file(record, b"old\n", "record")
    write_file(record, b"new\n", "record")
    assert record.read_text() == "new\n"

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("landscape.atomic.os.fsync", disk_full)
    with pytest.raises(UserError, match="No space left"):
        write_file(record, b"newer, but the disk is full\n", "record")
    assert record.read_text() == "new\n"
    assert [path.name for path in tmp_path.iterdir()] == [record.name]  # no temp file left


def test_status_piped_into_head_ends_quietly(surface, fake_slurm, tmp_path):
    """Long output (a big array) into `head -c1`: the reader leaves while status writes."""
    tasks = [{"id": f"7_{i}", "shards": [i], "log": "-"} for i in range(20000)]
    write_file(
        record_path(surface),
        json.dumps({**RECORD, "jobs": {"surface": {"id": "7", "tasks": tasks}}}).encode(),
        "record",
    )
    fake_slurm(squeue=None, sacct=None)
    errors = tmp_path / "stderr"
    piped = subprocess.run(
        f"'{sys.executable}' -m landscape.cli status '{surface}' 2>'{errors}' | head -c1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.stdout == str(surface)[0]
    assert errors.read_text() == ""


def test_a_reader_that_leaves_costs_no_descriptor(surface, monkeypatch, tmp_path):
    """Before: the /dev/null that replaces stdout for the final flush stayed open."""

    def reader_gone(path):
        raise BrokenPipeError

    monkeypatch.setattr(status_module, "surface_status", reader_gone)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        before = sorted(os.listdir("/proc/self/fd"))
        assert main(["status", str(surface)]) == 128 + signal.SIGPIPE
        assert sorted(os.listdir("/proc/self/fd")) == before
