"""The grid of (alpha, beta) coordinates and its split into shards of points.

Points are numbered in row-major order of the map shape: (nx,) for 1D and (ny, nx)
for 2D, so ``map[j, i]`` is the value at ``(x[i], y[j])``, the orientation
matplotlib's ``contour(x, y, Z)`` expects. A shard is a contiguous range of point
numbers: the unit of work a worker claims and flushes. A job covers every point, or a
coarser sublattice of them; its shards are ranges into its own list of points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from landscape.config import AxisConfig, GridConfig

TARGET_SHARDS = 64
FRAME_MARGIN = 0.15  # of the trajectory's extent, added on each side


@dataclass(frozen=True)
class Grid:
    """Coordinates along x and, for a 2D surface, y."""

    x: np.ndarray
    y: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: GridConfig, frame: np.ndarray | None = None) -> Grid:
        """The configured grid; an axis without bounds spans ``frame[:, axis]`` (points to
        enclose, e.g. a projected trajectory) and the origin, plus a margin."""
        axes = [config.x] + ([config.y] if config.y else [])
        x, *y = [axis_coordinates(axis, frame, i) for i, axis in enumerate(axes)]
        return cls(x, y[0] if y else None)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.x.size,) if self.y is None else (self.y.size, self.x.size)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def index(self, point: int) -> tuple[int, ...]:
        """The map index of point number ``point``."""
        return tuple(int(i) for i in np.unravel_index(point, self.shape))

    def sublattice(self, stride: int) -> np.ndarray:
        """Point numbers of every ``stride``-th point along each axis, starting at index 0
        (a coarser grid inside this one, e.g. for Hessian maps)."""
        numbers = np.arange(self.size, dtype=np.int64).reshape(self.shape)
        return numbers[(slice(None, None, stride),) * len(self.shape)].reshape(-1)

    def coordinates(self, point: int) -> tuple[float, float]:
        """``(alpha, beta)`` of point number ``point``; beta is 0 on a 1D grid."""
        if self.y is None:
            return float(self.x[point]), 0.0
        j, i = self.index(point)
        return float(self.x[i]), float(self.y[j])


def shard_ranges(size: int, shard_size: int = 0) -> np.ndarray:
    """``[start, stop)`` ranges over ``size`` points, ``shard_size`` each (0: about 64 shards)."""
    if shard_size <= 0:
        shard_size = max(1, math.ceil(size / TARGET_SHARDS))
    shard_size = min(shard_size, size)  # one shard at most; start + size never overflows
    starts = np.arange(0, size, shard_size, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + shard_size, size)], axis=1)


def axis_coordinates(axis: AxisConfig, frame: np.ndarray | None, column: int) -> np.ndarray:
    if not axis.automatic:
        return axis.coordinates()
    values = np.append(frame[:, column], 0.0)
    low, high = values.min(), values.max()
    margin = FRAME_MARGIN * (high - low) if high > low else 1.0
    return np.linspace(low - margin, high + margin, axis.num)
