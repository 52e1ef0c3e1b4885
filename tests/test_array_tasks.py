"""Independent array tasks (SLURM arrays): each owns every N-th shard, writes part files,
and a reduce merges them into the single-process maps, bit for bit; part files of an
earlier plan at the same path are refused by every reader, and by a new plan."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from conftest import write_point

from landscape.cli import main
from landscape.config import load_config
from landscape.parts import PartWriter, part_files, parts_folder
from landscape.plan import plan_surface
from landscape.reduce import reduce
from landscape.store import SurfaceFile
from landscape.workers import ArrayTask, run_job, saved_points

GRID_6X6 = {
    "x": {"min": -1.0, "max": 1.0, "num": 6},
    "y": {"min": -1.0, "max": 1.0, "num": 6},
    "shard_size": 4,  # 9 shards: tasks 0, 1, 2 own shards {0, 3, 6}, {1, 4, 7}, {2, 5, 8}
}
GRID_5X4 = {"x": {"min": -1.0, "max": 1.0, "num": 5}, "y": {"min": -1.0, "max": 1.0, "num": 4}}


def test_array_tasks_reduce_to_the_single_process_maps(experiment, capsys):
    reference = plan_surface(load_config(experiment(name="reference", grid=GRID_6X6)))
    run_job(reference, "loss", show_progress=False)
    surface = plan_surface(load_config(experiment(name="tasks", grid=GRID_6X6)))

    counts = [run_job(surface, "loss", task=ArrayTask(i, 3), show_progress=False) for i in range(3)]
    assert counts == [12, 12, 12]
    assert len(list(parts_folder(surface).glob("loss-*.h5"))) == 9
    with SurfaceFile.open(surface) as untouched:  # tasks never write the shared file
        assert not untouched.done("loss").any()
    # A requeued task finds its parts and has nothing left to do.
    assert run_job(surface, "loss", task=ArrayTask(1, 3), show_progress=False) == 0

    assert main(["reduce", str(surface)]) == 0
    assert "36 points merged" in capsys.readouterr().out
    with SurfaceFile.open(surface) as merged, SurfaceFile.open(reference) as single:
        assert merged.done("loss").all()
        for name, values in single.maps().items():
            np.testing.assert_array_equal(merged.maps()[name], values, err_msg=name)


def test_task_index_out_of_range_is_refused(experiment, capsys):
    config = experiment()
    surface = yaml.safe_load(config.read_text())["output"]
    assert main(["plan", str(config)]) == 0
    assert main(["run", surface, "--task-index", "3", "--num-tasks", "3"]) == 2
    assert "--task-index: 3 is not in 0..2" in capsys.readouterr().err


def write_part(
    surface: Path, plan_id: str, points: range, maps=("train_loss",), value: float = 0.5
) -> None:
    """One part file of ``points`` beside ``surface``, for the plan ``plan_id``."""
    writer = PartWriter(surface, plan_id)
    for point in points:
        write_point(writer, "loss", point, dict.fromkeys(maps, value))
    writer.commit()


def test_parts_of_an_earlier_plan_are_refused_by_every_reader(experiment, capsys):
    """Before: points 70-80 of a 9x9 plan beside the re-planned 5x4 file made ``status``
    end in ``IndexError: index 70 is out of bounds`` and were fed to array tasks."""
    surface = plan_surface(load_config(experiment(grid=GRID_5X4)))
    write_part(surface, "0" * 32, range(70, 81))
    task = ["--task-index", "0", "--num-tasks", "1"]
    for command in (["status"], ["run", *task], ["reduce"]):
        assert main([command[0], str(surface), *command[1:]]) == 2, command
        err = capsys.readouterr().err
        assert f"error: {parts_folder(surface)}/loss-" in err and "Traceback" not in err
        assert f"belongs to another plan of exp.h5 (plan id {'0' * 32}" in err
    with SurfaceFile.open(surface) as untouched:
        assert not untouched.done("loss").any()


def test_the_interrupt_line_survives_unreadable_parts(experiment):
    """Before: the IndexError (now: UserError) of such a part replaced the interrupt, so a
    SIGTERM ended in a traceback or exit 2 instead of its own status."""
    surface = plan_surface(load_config(experiment(grid=GRID_5X4)))
    assert saved_points(surface, "loss") == "0 of 20 loss points saved in " + str(surface)
    write_part(surface, "0" * 32, range(70, 81))
    assert saved_points(surface, "loss") == "finished shards are saved"


def test_plan_is_refused_while_parts_of_an_earlier_plan_wait(experiment, capsys):
    config = experiment(grid=GRID_5X4)
    surface = Path(load_config(config).output)
    write_part(surface, "0" * 32, range(70, 81))  # the earlier plan's file is gone
    assert main(["plan", str(config)]) == 2
    assert f"error: output: {parts_folder(surface)} holds 1 part files of an earlier plan" in (
        capsys.readouterr().err
    )
    assert not surface.exists() and len(part_files(surface)) == 1


def test_reduce_syncs_the_surface_file_before_deleting_the_parts(experiment, monkeypatch):
    """Before: the parts were deleted while the merged values could still be only in the
    page cache: a power cut then lost both."""
    surface = plan_surface(load_config(experiment(grid=GRID_5X4)))
    with SurfaceFile.open(surface) as planned:
        write_part(surface, planned.plan_id, range(4), planned.job_maps("loss"), 0.25)
    events = []
    fsync, unlink = os.fsync, Path.unlink

    def recording_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording_unlink(path, *args, **kwargs):
        events.append(("unlink", str(path)))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "unlink", recording_unlink)
    assert reduce(surface) == 4
    first_unlink = next(i for i, (what, _) in enumerate(events) if what == "unlink")
    assert ("fsync", str(surface.resolve())) in events[:first_unlink]
    with SurfaceFile.open(surface) as merged:
        np.testing.assert_array_equal(merged.maps()["train_loss"].reshape(-1)[:4], 0.25)
