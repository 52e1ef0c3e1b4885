"""The work table of one job in a result file: its items, its shards, which are done.

Work is counted in integer *items* whose meaning the file gives them: in a surface file
an item is a grid point's row-major number; in an analysis over checkpoints it would
be a checkpoint's index. The table is four datasets, named after the job:

    points/<job>    int64 items the job covers (every point, or a sublattice)
    shards/<job>    int64 (n, 2) [start, stop) ranges into points/<job>: the unit of
                    work a rank claims and commits
    done/<job>      uint8 in the file's item shape (a surface's grid shape), 1 once every
                    output of the job has its value at the item; attrs: outputs and
                    what the values mean
    finished/<job>  float64 unix time each item was finished (progress and rate)

Item ``i``'s flag and time are at flat (row-major) index ``i`` of ``done`` and
``finished``. Values are written before the finish time, and that before the done flag,
so an item is never marked done without its values.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np

TABLE_GROUPS = ("done", "finished", "points", "shards")


def update_items(dataset: h5py.Dataset, items: np.ndarray, values: np.ndarray, ndim: int) -> None:
    """Set ``dataset`` at many items: its first ``ndim`` axes are the item shape, the rest
    each value's trailing shape.

    One write per row of the item shape that holds an item (a slice where the row's items
    are consecutive, as a shard's are; else their list), never per item: an h5py write
    costs about 60 us whatever its size, which beside a small model's forward pass (an
    MLP over the digits: 0.45 ms) is most of a point's cost. Only the items' own elements
    are written, never the rest of a row, so ranks writing disjoint items of one file
    (``mpio``) never overwrite each other's.

    An item given more than once keeps its last value (a part file may hold a point
    twice); h5py refuses a list of columns that repeats one.
    """
    items = np.asarray(items, np.int64)
    order = np.argsort(items, kind="stable")
    items, values = items[order], np.asarray(values)[order]
    last = np.ones(len(items), bool)  # the last of each run of equal items
    last[:-1] = items[1:] != items[:-1]
    items, values = items[last], values[last]
    shape = dataset.shape[:ndim]
    rows, columns = np.divmod(items, shape[-1])
    breaks = np.flatnonzero(np.diff(rows)) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(items)]):
        row = np.unravel_index(rows[start], shape[:-1]) if ndim > 1 else ()
        first, last = columns[start], columns[stop - 1]
        if last - first == stop - start - 1:  # consecutive
            where = slice(first, last + 1)
        else:
            where = columns[start:stop].tolist()
        dataset[(*row, where)] = values[start:stop]


class WorkTable:
    """The work table of the job stored as ``name`` in ``handle`` (see the module)."""

    @staticmethod
    def create(
        handle: h5py.Group,
        name: str,
        shape: tuple[int, ...],
        points: np.ndarray,
        shards: np.ndarray,
        attrs: dict,
    ) -> None:
        """Write a new, empty table: no item done, every finish time NaN."""
        done = handle.create_dataset(f"done/{name}", data=np.zeros(shape, np.uint8))
        done.attrs.update(attrs)
        handle.create_dataset(f"finished/{name}", data=np.full(shape, np.nan))
        handle.create_dataset(f"points/{name}", data=points)
        handle.create_dataset(f"shards/{name}", data=shards)

    def __init__(self, handle: h5py.Group, name: str):
        self.done_flags = handle[f"done/{name}"]
        self.finish_times = handle[f"finished/{name}"]
        self.handle = handle
        self.name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.done_flags.shape

    @property
    def attrs(self) -> dict:
        return dict(self.done_flags.attrs)

    def points(self) -> np.ndarray:
        return self.handle[f"points/{self.name}"][()]

    def shards(self) -> np.ndarray:
        return self.handle[f"shards/{self.name}"][()]

    def done(self) -> np.ndarray:
        """One bool per item of the file (flat): done or not."""
        return self.done_flags[()].astype(bool).reshape(-1)

    def finished(self) -> np.ndarray:
        """The finish time of each item of the file (flat), NaN where not done."""
        return self.finish_times[()].reshape(-1)

    def pending(
        self, owned: np.ndarray | None = None, finished_elsewhere: np.ndarray | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(shard index, its pending items)`` for each shard with an item neither done
        nor in ``finished_elsewhere`` (items in part files not yet merged); ``owned``
        keeps only those shards (by index: an array task's share)."""
        keep = None if owned is None else set(np.asarray(owned).tolist())
        points, done = self.points(), self.done()
        if finished_elsewhere is not None:
            done[finished_elsewhere] = True
        for index, (start, stop) in enumerate(self.shards()):
            chunk = points[start:stop]
            if not done[chunk].all() and (keep is None or index in keep):
                yield index, chunk[~done[chunk]]

    def mark_done(self, items: np.ndarray, finished: np.ndarray | float) -> None:
        """Record ``items`` finished at ``finished`` (unix times, one per item or one for
        all; their values are written already): finish times first, then done flags."""
        items = np.asarray(items, np.int64)
        ndim = len(self.shape)
        update_items(self.finish_times, items, np.broadcast_to(finished, items.shape), ndim)
        update_items(self.done_flags, items, np.ones(len(items), np.uint8), ndim)
