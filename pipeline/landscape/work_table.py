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

import time
from collections.abc import Iterator

import h5py
import numpy as np

TABLE_GROUPS = ("done", "finished", "points", "shards")


def update_items(dataset: h5py.Dataset, items: np.ndarray, values: np.ndarray, ndim: int) -> None:
    """Set ``dataset`` at many items at once (read, update, write whole): its first
    ``ndim`` axes are the item shape, the rest each value's trailing shape."""
    array = dataset[()]
    array.reshape((-1,) + array.shape[ndim:])[items] = values
    dataset[...] = array


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

    def mark_done(self, item: int) -> None:
        """Record ``item`` finished now (its values are written already)."""
        index = np.unravel_index(item, self.shape)
        self.finish_times[index] = time.time()
        self.done_flags[index] = 1

    def mark_all_done(self, items: np.ndarray, finished: np.ndarray) -> None:
        """Record many items finished at the given times (the reducer)."""
        ndim = len(self.shape)
        update_items(self.finish_times, items, finished, ndim)
        update_items(self.done_flags, items, np.ones(len(items), np.uint8), ndim)
