"""The grid of (alpha, beta) coordinates and its split into shards of points.

Points are numbered in row-major order of the map shape: (nx,) for 1D and (ny, nx)
for 2D, so ``map[j, i]`` is the value at ``(x[i], y[j])``, the orientation
matplotlib's ``contour(x, y, Z)`` expects. A shard is a contiguous range of point
numbers: the unit of work a worker claims and flushes. A job covers every point, or a
coarser sublattice of them; its shards are ranges into its own list of points.

An axis is ``uniform`` (evenly spaced) or ``graded``: finest at 0, the centre
checkpoint, and coarser towards the ends (:func:`graded_coordinates`). Coordinates are
computed once, by the planner, and stored; every reader takes them from the file, so
nothing downstream may assume one spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TARGET_SHARDS = 64
FRAME_MARGIN = 0.15  # of the trajectory's extent, added on each side
SPACINGS = ("uniform", "graded")
# A graded axis's largest cell over its smallest (at 0) on each side: cosh(GRADING).
# Ten makes the cell at the minimum sinh(s)/s = 3.3 times finer than a uniform axis's
# of as many points, while the outermost cell stays s*coth(s) = 3.0 times coarser,
# there where a PCA frame holds only the first checkpoints (random init, the largest
# steps) and its margin. A larger ratio buys little at the centre (the factor grows
# like ln(2 ratio)) for a much coarser edge; a smaller one leaves the last steps of
# training inside a cell or two, as a uniform axis does.
GRADING_RATIO = 10.0
GRADING = math.acosh(GRADING_RATIO)


@dataclass(frozen=True)
class Grid:
    """Coordinates along x and, for a 2D surface, y."""

    x: np.ndarray
    y: np.ndarray | None = None
    spacing: tuple[str, ...] = ()  # per axis, one of SPACINGS; () where not known

    @classmethod
    def from_config(cls, config, frame: np.ndarray | None = None) -> Grid:
        """The grid of a :class:`landscape.config.GridConfig` ``config`` (not imported:
        config imports this module); an axis without bounds spans ``frame[:, axis]`` (points to
        enclose, e.g. a projected trajectory) and the origin, plus a margin."""
        axes = [config.x] + ([config.y] if config.y else [])
        x, *y = [axis_coordinates(axis, frame, i) for i, axis in enumerate(axes)]
        return cls(x, y[0] if y else None, tuple(axis.spacing_kind for axis in axes))

    @property
    def axes(self) -> list[np.ndarray]:
        """The coordinates of each axis: [x] or [x, y]."""
        return [self.x] if self.y is None else [self.x, self.y]

    def axis_attrs(self) -> list[dict]:
        """What each axis's stored coordinates are (attrs of ``grid/x``, ``grid/y``): the
        spacing and the cell at the minimum (:func:`cell_at_origin`); none where the
        spacing is not known (an analysis file's checkpoint numbers)."""
        return [
            {
                "spacing": spacing,
                "cell_at_minimum": cell_at_origin(coordinates),
                "description": SPACING_DESCRIPTIONS[spacing],
            }
            for spacing, coordinates in zip(self.spacing, self.axes)
        ]

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
        """Point numbers of every ``stride``-th point along each axis (a coarser grid
        inside this one, e.g. for Hessian maps), from :meth:`sublattice_starts`. Readers
        take the points from the file (:meth:`landscape.store.SurfaceFile.points`),
        never from here."""
        numbers = np.arange(self.size, dtype=np.int64).reshape(self.shape)
        starts = self.sublattice_starts(stride)
        # The map's axes are (y, x): the starts go in reverse.
        return numbers[tuple(slice(start, None, stride) for start in starts[::-1])].reshape(-1)

    def sublattice_starts(self, stride: int) -> list[int]:
        """The first index of the stride-``stride`` sublattice along each axis: 0 on a
        uniform axis, and on a graded one the index of 0 modulo ``stride``, so that the
        minimum, where the graded grid is finest, is among its points."""
        return [
            int(np.flatnonzero(coordinates == 0.0)[0]) % stride if spacing == "graded" else 0
            for coordinates, spacing in zip(self.axes, self.spacing or ("uniform",) * 2)
        ]

    def sublattice_row(self, stride: int) -> int:
        """The number of points in one row (along x) of the stride-``stride`` sublattice."""
        return len(range(self.sublattice_starts(stride)[0], self.x.size, stride))

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


SPACING_DESCRIPTIONS = {
    "uniform": "evenly spaced from the first coordinate to the last",
    "graded": f"finest at 0 (a grid point), cells growing as sinh outwards on each side to "
    f"{GRADING_RATIO:g} times the cell at 0; cells per side in proportion to its length",
}


def axis_coordinates(axis, frame: np.ndarray | None, column: int) -> np.ndarray:
    """The coordinates of one :class:`landscape.config.AxisConfig` ``axis``: from
    ``min`` to ``max``, or, for an axis without bounds, spanning ``frame[:, column]`` and
    0 plus FRAME_MARGIN of that extent on each side; spaced as ``axis.spacing_kind``
    says."""
    if axis.automatic:
        values = np.append(frame[:, column], 0.0)
        low, high = values.min(), values.max()
        margin = FRAME_MARGIN * (high - low) if high > low else 1.0
        low, high = low - margin, high + margin
    else:
        low, high = axis.min, axis.max
    return spaced_coordinates(float(low), float(high), axis.num, axis.spacing_kind)


def spaced_coordinates(low: float, high: float, num: int, spacing: str) -> np.ndarray:
    """``num`` float64 coordinates from ``low`` to ``high`` (both exact), ``spacing`` one
    of SPACINGS (graded: ``low <= 0 <= high``)."""
    if spacing == "graded":
        return graded_coordinates(low, high, num)
    return np.linspace(low, high, num)


def graded_coordinates(low: float, high: float, num: int) -> np.ndarray:
    """``num`` coordinates from ``low`` to ``high`` finest at 0, which is one of them.

    On a side of length L with n cells the k-th coordinate is
    ``x_k = L sinh(s k / n) / sinh(s)``, s = GRADING: cells grow smoothly (the
    neighbour ratio is at most about exp(s / n)) from ``L sinh(s / n) / sinh(s)`` at 0,
    ``n sinh(s / n) / sinh(s)`` of the side's uniform cell L / n (-> s / sinh(s) =
    1 / 3.3 for many points), to ``cosh(s) = GRADING_RATIO`` times that at the end.
    The num - 1 cells are shared between the sides in proportion to their lengths
    (at least one per side of nonzero length), so L / n, and with it the cell at 0,
    is the same on both sides up to the rounding of n.
    Needs ``low <= 0 <= high`` and a point for 0 besides the ends when both are
    nonzero (the config checks both).
    """
    cells = num - 1
    below = round(cells * -low / (high - low))
    below = min(max(below, int(low < 0)), cells - int(high > 0))
    return np.concatenate(
        [-graded_side(-low, below)[::-1], [0.0], graded_side(high, cells - below)]
    )


def graded_side(length: float, cells: int) -> np.ndarray:
    """``L sinh(s k / n) / sinh(s)`` for k = 1..n (:func:`graded_coordinates`), the last
    exactly ``length`` (numpy's sinh of an array may differ from its scalar's by a unit
    in the last place, so both come from one array)."""
    if cells == 0:
        return np.empty(0)
    stretched = np.sinh(GRADING * np.arange(1, cells + 1) / cells)
    return length * (stretched / stretched[-1])


def cell_at_origin(coordinates: np.ndarray) -> float:
    """The grid's spacing at 0 along one axis: the mean of the two cells beside 0 where 0
    is an interior grid point, the one cell beside it at an end, else the cell that
    holds 0 (nearest the axis's end cell where 0 lies outside)."""
    above = int(np.searchsorted(coordinates, 0.0))  # first coordinate >= 0
    if above < coordinates.size and coordinates[above] == 0.0:
        neighbours = coordinates[max(above - 1, 0) : above + 2]
        return float(np.ptp(neighbours) / (neighbours.size - 1))
    cell = min(max(above, 1), coordinates.size - 1)
    return float(coordinates[cell] - coordinates[cell - 1])


def uniform_cell(coordinates: np.ndarray) -> float:
    """The cell of a uniform axis with the same ends and number of points."""
    return float(np.ptp(coordinates) / (coordinates.size - 1))


def cells_from_origin(coordinates: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many grid cells lie between 0 and each of ``values`` along one axis (the
    difference of their fractional grid indices, linear within a cell): the
    resolution a plot has between a checkpoint and the minimum, on any spacing."""
    index = np.arange(coordinates.size, dtype=np.float64)
    return np.abs(np.interp(values, coordinates, index) - np.interp(0.0, coordinates, index))
