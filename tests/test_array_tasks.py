"""Independent array tasks (SLURM arrays): each owns every N-th shard, writes part files,
and a reduce merges them into the single-process maps, bit for bit."""

from __future__ import annotations

import numpy as np
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.parts import parts_folder
from pipeline.plan import plan_surface
from pipeline.store import SurfaceFile
from pipeline.workers import ArrayTask, run_job, run_surface

GRID_6X6 = {
    "x": {"min": -1.0, "max": 1.0, "num": 6},
    "y": {"min": -1.0, "max": 1.0, "num": 6},
    "shard_size": 4,  # 9 shards: tasks 0, 1, 2 own shards {0, 3, 6}, {1, 4, 7}, {2, 5, 8}
}


def test_array_tasks_reduce_to_the_single_process_maps(experiment, capsys):
    reference = plan_surface(load_config(experiment(name="reference", grid=GRID_6X6)))
    run_surface(reference, show_progress=False)
    surface = plan_surface(load_config(experiment(name="tasks", grid=GRID_6X6)))

    counts = [
        run_job(surface, "surface", task=ArrayTask(i, 3), show_progress=False) for i in range(3)
    ]
    assert counts == [12, 12, 12]
    assert len(list(parts_folder(surface).glob("surface-*.h5"))) == 9
    with SurfaceFile.open(surface) as untouched:  # tasks never write the shared file
        assert not untouched.done("surface").any()
    # A requeued task finds its parts and has nothing left to do.
    assert run_job(surface, "surface", task=ArrayTask(1, 3), show_progress=False) == 0

    assert main(["reduce", str(surface)]) == 0
    assert "36 points merged" in capsys.readouterr().out
    with SurfaceFile.open(surface) as merged, SurfaceFile.open(reference) as single:
        assert merged.done("surface").all()
        for name, values in single.maps().items():
            np.testing.assert_array_equal(merged.maps()[name], values, err_msg=name)


def test_task_index_out_of_range_is_refused(experiment, capsys):
    config = experiment()
    surface = yaml.safe_load(config.read_text())["output"]
    assert main(["plan", str(config)]) == 0
    assert main(["run", surface, "--task-index", "3", "--num-tasks", "3"]) == 2
    assert "--task-index: 3 is not in 0..2" in capsys.readouterr().err
