"""How work is cut and handed out: shard ranges, sublattices, the work table's pending
shards, array tasks' shares and the writer each run gets (no model, no MPI)."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from landscape import workers
from landscape.errors import UserError
from landscape.grid import Grid, shard_ranges
from landscape.work_table import WorkTable
from landscape.workers import ArrayTask, choose_task_writer, choose_writer


def test_shard_ranges_cover_every_point_once_in_order():
    np.testing.assert_array_equal(shard_ranges(10, 4), [[0, 4], [4, 8], [8, 10]])
    np.testing.assert_array_equal(shard_ranges(3, 10), [[0, 3]])  # one shard at most
    automatic = shard_ranges(1000)  # 0: about 64 shards
    assert len(automatic) == 63 and automatic[0].tolist() == [0, 16]
    np.testing.assert_array_equal(automatic[1:, 0], automatic[:-1, 1])
    assert automatic[-1, 1] == 1000


def test_sublattice_takes_every_stride_th_point_from_the_first_along_each_axis():
    grid = Grid(np.arange(5.0), np.arange(4.0))  # map shape (4, 5), row-major numbers
    assert grid.sublattice(1).tolist() == list(range(20))
    assert grid.sublattice(2).tolist() == [0, 2, 4, 10, 12, 14]
    assert grid.sublattice(3).tolist() == [0, 3, 15, 18]
    assert Grid(np.arange(7.0)).sublattice(3).tolist() == [0, 3, 6]
    assert grid.coordinates(7) == (2.0, 1.0)


def test_work_table_hands_out_pending_items_of_each_shard(tmp_path):
    points = Grid(np.arange(5.0), np.arange(4.0)).sublattice(2)  # 0 2 4 10 12 14
    with h5py.File(tmp_path / "work.h5", "w") as handle:
        WorkTable.create(handle, "job", (4, 5), points, shard_ranges(points.size, 4), {})
        table = WorkTable(handle, "job")
        assert [(i, chunk.tolist()) for i, chunk in table.pending()] == [
            (0, [0, 2, 4, 10]),
            (1, [12, 14]),
        ]
        table.mark_done(np.array([2]), 5.0)
        table.mark_done(np.array([14, 12]), np.array([2.0, 1.0]))  # in any order
        assert np.flatnonzero(table.done()).tolist() == [2, 12, 14]
        assert table.finished()[[12, 14]].tolist() == [1.0, 2.0]
        assert handle["done/job"][0, 2] == 1  # item 2 is map index (0, 2)
        assert [(i, c.tolist()) for i, c in table.pending()] == [(0, [0, 4, 10])]
        elsewhere = np.array([0, 4])  # in part files, not yet merged
        assert [c.tolist() for _, c in table.pending(None, elsewhere)] == [[10]]
        assert list(table.pending(owned=np.array([1]))) == []


def test_array_tasks_own_every_count_th_shard_or_the_shards_they_are_given():
    assert ArrayTask(0, 3).owned(8).tolist() == [0, 3, 6]
    assert ArrayTask(2, 3).owned(8).tolist() == [2, 5]
    assert ArrayTask(4, 5).owned(3).tolist() == []
    assert ArrayTask(0, 2, shards=(7, 1)).owned(8).tolist() == [7, 1]


def ranks(size: int, comm=None):
    return SimpleNamespace(size=size, comm=comm)


@pytest.fixture(params=[False, True], ids=["h5py", "parallel-h5py"])
def parallel_h5py(request, monkeypatch):
    monkeypatch.setattr(workers.h5py, "get_config", lambda: SimpleNamespace(mpi=request.param))
    return request.param


def test_auto_writer_is_serial_alone_else_mpio_where_h5py_has_mpi(parallel_h5py):
    assert choose_writer("auto", ranks(1)) == "serial"
    assert choose_writer("auto", ranks(4, comm=object())) == ("mpio" if parallel_h5py else "parts")
    assert choose_writer("parts", ranks(1)) == "parts"


def test_a_writer_the_run_cannot_use_is_refused(parallel_h5py):
    with pytest.raises(UserError, match="--writer serial: 2 ranks"):
        choose_writer("serial", ranks(2, comm=object()))
    with pytest.raises(UserError, match="--writer mpio: needs h5py built with MPI"):
        choose_writer("mpio", ranks(2, comm=None if parallel_h5py else object()))


def test_array_tasks_write_part_files_and_are_one_process():
    assert choose_task_writer("auto", ArrayTask(1, 3), ranks(1)) == "parts"
    assert choose_task_writer("parts", ArrayTask(0, 1), ranks(1)) == "parts"
    with pytest.raises(UserError, match="--task-index: 3 is not in 0..2"):
        choose_task_writer("auto", ArrayTask(3, 3), ranks(1))
    with pytest.raises(UserError, match="an array task is one process"):
        choose_task_writer("auto", ArrayTask(0, 3), ranks(2))
    with pytest.raises(UserError, match="--writer mpio: array tasks write part files"):
        choose_task_writer("mpio", ArrayTask(0, 3), ranks(1))
