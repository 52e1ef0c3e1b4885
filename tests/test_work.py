"""How work is cut, handed out and written: shard ranges, sublattices, the work table's
pending shards, array tasks' shares, the writer each run gets, claims of consecutive
shards for K points per call and the writes per grid row (no model, no MPI)."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from landscape import workers
from landscape.errors import UserError
from landscape.grid import Grid, shard_ranges
from landscape.ranks import Solo
from landscape.work_table import WorkTable, update_items
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


class RecordedDataset:
    """A dataset stand-in that records each write (``update_items`` needs only these)."""

    def __init__(self, shape):
        self.array = np.full(shape, np.nan)
        self.shape = shape
        self.writes = []

    def __setitem__(self, where, values):
        self.writes.append(where)
        self.array[where] = values


@pytest.mark.parametrize("trailing", [(), (2,)])
def test_update_items_writes_only_the_items_one_write_per_grid_row(tmp_path, trailing):
    items = np.array([13, 3, 4, 5, 6, 11])  # in a (4, 5) grid, in any order
    values = np.arange(len(items) * int(np.prod(trailing))).reshape((len(items), *trailing))
    expected = np.full((4, 5, *trailing), np.nan)
    expected.reshape(20, *trailing)[items] = values
    recorded = RecordedDataset((4, 5, *trailing))
    update_items(recorded, items, values, 2)
    np.testing.assert_array_equal(recorded.array, expected)
    # Rows 0 (3, 4), 1 (5, 6) and 2 (11, 13: not consecutive, so a list of columns).
    assert recorded.writes == [(0, slice(3, 5)), (1, slice(0, 2)), (2, [1, 3])]
    with h5py.File(tmp_path / "items.h5", "w") as handle:  # the same through HDF5
        dataset = handle.create_dataset("m", data=np.full((4, 5, *trailing), np.nan))
        update_items(dataset, items, values, 2)
        np.testing.assert_array_equal(dataset[()], expected)
        curve = handle.create_dataset("c", data=np.zeros(6))  # a 1D grid: one row
        update_items(curve, np.array([5, 1, 2]), np.array([3.0, 1.0, 2.0]), 1)
        assert curve[()].tolist() == [0, 1, 2, 0, 0, 3]


def test_update_items_keeps_the_last_value_of_a_repeated_item(tmp_path):
    recorded = RecordedDataset((2, 5))
    update_items(recorded, np.array([1, 1, 2]), np.array([5.0, 7.0, 9.0]), 2)
    assert recorded.writes == [(0, slice(1, 3))]
    with h5py.File(tmp_path / "items.h5", "w") as handle:  # h5py refuses [1, 1, 2]
        curve = handle.create_dataset("c", data=np.zeros(5))
        update_items(curve, np.array([1, 1, 2]), np.array([5.0, 7.0, 9.0]), 1)
        assert curve[()].tolist() == [0, 7, 9, 0, 0]
        grid = handle.create_dataset("m", data=np.zeros((2, 5)))
        update_items(grid, np.array([8, 3, 6, 8, 3]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 2)
        assert grid[()].tolist() == [[0, 0, 0, 5, 0], [0, 3, 0, 4, 0]]


class RecordingWriter:
    """A point writer that keeps what it is handed, and when it commits; it commits in
    place (a flush, as the surface file) or not (a new file, as a part)."""

    def __init__(self, commits_in_place=False):
        self.written, self.log = {}, []
        self.commits_in_place = commits_in_place

    def write_points(self, job, points, values, finished):
        assert len(finished) == len(points)
        for row, point in enumerate(points.tolist()):
            assert point not in self.written
            self.written[point] = values["double"][row]
        self.log.append(("write", points.tolist()))

    def commit(self):
        self.log.append(("commit", sorted(self.written)))


class Doubling:
    """An evaluator of K = 4 points per call whose value is twice the point number;
    optionally stopped by ``error`` (Ctrl-C by default) at its ``stop_at``-th call."""

    items_per_call = 4

    def __init__(self, stop_at=None, error=KeyboardInterrupt):
        self.calls, self.stop_at, self.error = [], stop_at, error

    def __call__(self, items):
        if len(self.calls) == self.stop_at:
            raise self.error("stopped")
        self.calls.append(items.tolist())
        return {"double": 2.0 * items}


def test_claims_group_consecutive_shards_so_calls_hold_k_points_and_commit_per_claim():
    pending = [np.arange(start, min(start + 2, 11)) for start in range(0, 11, 2)]  # 6 shards
    assert workers.shards_per_claim(4, pending, 1) == 2
    assert workers.shards_per_claim(1, pending, 1) == 1
    claims = workers.ShardClaims("loss", Solo(), pending, False, "point", 2)
    evaluator, writer = Doubling(), RecordingWriter()
    assert workers.evaluate_shards("loss", evaluator, claims, writer) == 11
    assert evaluator.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # a shard is 2
    assert writer.written == {point: 2.0 * point for point in range(11)}
    # One write per claim (the calls of a claim take far less than a second), then a commit.
    assert writer.log == [
        ("write", [0, 1, 2, 3]),
        ("commit", [0, 1, 2, 3]),
        ("write", [4, 5, 6, 7]),
        ("commit", list(range(8))),
        ("write", [8, 9, 10]),
        ("commit", list(range(11))),
    ]


def test_interrupted_claim_commits_the_points_evaluated_and_slow_ones_are_written_early(
    monkeypatch,
):
    pending = [np.arange(0, 12)]  # one shard of 12 points, 3 calls
    writer = RecordingWriter()
    with pytest.raises(KeyboardInterrupt):
        workers.evaluate_shards("loss", Doubling(stop_at=2), pending, writer)
    assert writer.log == [("write", list(range(8))), ("commit", list(range(8)))]
    monkeypatch.setattr(workers, "WRITE_INTERVAL_SECONDS", 0.0)  # every call is overdue
    writer = RecordingWriter()  # part files: one commit per claim
    workers.evaluate_shards("loss", Doubling(), pending, writer)
    assert writer.log == [
        ("write", [0, 1, 2, 3]),
        ("write", [4, 5, 6, 7]),
        ("write", [8, 9, 10, 11]),
        ("commit", list(range(12))),
    ]


def test_a_writer_that_commits_in_place_commits_each_overdue_write(monkeypatch):
    """So that a process killed without warning loses at most WRITE_INTERVAL_SECONDS."""
    monkeypatch.setattr(workers, "WRITE_INTERVAL_SECONDS", 0.0)  # every call is overdue
    writer = RecordingWriter(commits_in_place=True)  # the surface file: a flush
    workers.evaluate_shards("loss", Doubling(), [np.arange(0, 8)], writer)
    assert writer.log == [
        ("write", [0, 1, 2, 3]),
        ("commit", [0, 1, 2, 3]),
        ("write", [4, 5, 6, 7]),
        ("commit", list(range(8))),
        ("commit", list(range(8))),  # the claim's end, with nothing left to write
    ]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, UserError])
def test_a_claim_stopped_by_any_error_commits_the_points_evaluated_before_it(error):
    writer = RecordingWriter()  # a streamed dataset's UserError, CUDA running out of memory
    with pytest.raises(error, match="stopped"):
        workers.evaluate_shards("loss", Doubling(stop_at=2, error=error), [np.arange(12)], writer)
    assert writer.written == {point: 2.0 * point for point in range(8)}
    assert writer.log == [("write", list(range(8))), ("commit", list(range(8)))]


class InterruptedAfterHandOff(RecordingWriter):
    """A writer interrupted (Ctrl-C) just after it took its first points."""

    def write_points(self, job, points, values, finished):
        super().write_points(job, points, values, finished)
        if len(self.log) == 1:
            raise KeyboardInterrupt


def test_points_handed_to_the_writer_are_never_handed_again(monkeypatch):
    monkeypatch.setattr(workers, "WRITE_INTERVAL_SECONDS", 0.0)  # written after each call
    writer = InterruptedAfterHandOff()  # asserts that no point comes twice
    with pytest.raises(KeyboardInterrupt):
        workers.evaluate_shards("loss", Doubling(), [np.arange(12)], writer)
    assert writer.log == [("write", [0, 1, 2, 3]), ("commit", [0, 1, 2, 3])]


def test_claims_leave_one_for_every_rank_where_there_are_as_many_shards():
    pending = [np.arange(start, start + 2) for start in range(0, 128, 2)]  # 64 shards of 2
    assert workers.shards_per_claim(32, pending, 1) == 16  # 4 claims of 32 points
    assert workers.shards_per_claim(32, pending, 4) == 16
    assert workers.shards_per_claim(32, pending, 8) == 8  # 8 claims of 16 points
    assert workers.shards_per_claim(32, pending[:6], 8) == 1  # 6 claims: no more to make
    for ranks in range(1, 65):
        per_claim = workers.shards_per_claim(32, pending, ranks)
        claims = workers.ShardClaims("loss", Solo(), pending, False, "point", per_claim)
        assert len(claims.groups) >= ranks


class RankZeroOfTwo(Solo):
    """Rank 0 of two whose other rank's evaluator takes ``other_k`` points per call; this
    process holds the shared counters, so it claims every shard."""

    size = 2

    def __init__(self, other_k):
        super().__init__()
        self.other_k = other_k

    def minimum(self, value):
        return min(value, self.other_k)


class SurfaceStandIn(RecordingWriter):
    """What the run needs of a surface file opened by the serial writer."""

    item_noun, path = "point", "stand-in.h5"


@pytest.mark.parametrize(
    "other_k, calls",
    [
        (3, [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9, 10], [11]]),  # 3 claims of 2 shards
        (8, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]),  # this rank's K = 4 is the least
    ],
)
def test_every_rank_takes_the_least_k_of_all_ranks(monkeypatch, other_k, calls):
    """Each rank's evaluator finds its K in its own free GPU memory; the run takes one."""
    evaluator = Doubling()  # K = 4 on this rank
    monkeypatch.setattr(workers, "load_evaluator", lambda *args: evaluator)
    pending = [np.arange(start, start + 2) for start in range(0, 12, 2)]  # 6 shards of 2
    surface = SurfaceStandIn(commits_in_place=True)
    ranks = RankZeroOfTwo(other_k)
    assert workers.evaluate_pending("loss", surface, pending, ranks, "serial", None, False) == 12
    assert evaluator.calls == calls
    assert surface.written == {point: 2.0 * point for point in range(12)}
