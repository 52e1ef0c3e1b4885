"""PCA directions of an optimizer's trajectory (Li et al. 2018, section 7).

Random directions capture almost none of a training path: it lies in a space of very
few dimensions, to which a random vector in 10^7 dimensions is nearly orthogonal.
The principal directions of the rows theta_i - theta_n (one per checkpoint, centred
as in PCA) capture most of it, and their explained variance says how much.

With m checkpoints of P parameters the m x P difference matrix B may not fit in memory
(P = 10^7, m = 100: 8 GB in float64). It is never built: the checkpoints are
memory-mapped and walked a slice of columns at a time (64 MiB of float64 values for
all m rows together), twice. The first pass adds up
the m x m Gram matrix G = B_c B_c^T of the centred rows; its eigenpairs (s_j^2, v_j)
are the squared singular values and left singular vectors of B_c. The second pass
forms each principal direction u_j = B_c^T v_j / s_j slice by slice, and adds up each
checkpoint's coordinates (theta_i - theta_n) . u_j from the same slices.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import UserError

log = logging.getLogger(__name__)

BLOCK_VALUES = 1 << 23  # float64 values per slice of all m rows (64 MiB), whatever m is
LR_DROP = 0.5  # a step down to at most this fraction of the previous epoch's rate


@dataclass
class Trajectory:
    """The checkpoints projected on their top principal directions."""

    directions: list[dict[str, np.ndarray]]  # unit vectors, keyed by parameter name
    explained_variance_ratio: np.ndarray  # (count,)
    coordinates: np.ndarray  # (m, count): checkpoint i at theta_n + sum_j c_ij u_j
    epochs: np.ndarray  # (m,) the epoch each checkpoint records, else its position
    lr: np.ndarray  # (m,) learning rate of the epoch that produced it (NaN: unknown)
    files: list[Path]

    @property
    def lr_drops(self) -> np.ndarray:
        """The red dots of Li et al. Fig. 9: checkpoints after which a step schedule cut
        the rate, to half or less, after holding it for an epoch (a cosine schedule, which
        never holds its rate, has none)."""
        following = np.append(self.lr[1:], np.nan)
        previous = np.insert(self.lr[:-1], 0, np.nan)
        held = np.isnan(previous) | np.isclose(previous, self.lr)
        with np.errstate(invalid="ignore"):
            return (following <= LR_DROP * self.lr) & held


def trajectory_files(patterns: list[str]) -> list[Path]:
    """Checkpoint paths in order; a glob pattern expands in natural order (epoch_2 before
    epoch_10). Fails naming a pattern that matches nothing."""
    files = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern), key=natural_key) if glob.has_magic(pattern) else [pattern]
        )
        if not matches or not Path(matches[0]).is_file():
            raise UserError(
                f"directions.checkpoints: {pattern} matches no file; train first (landscape "
                "train) or fix the path"
            )
        files += [Path(match) for match in matches]
    if len(files) < 2:
        raise UserError("directions.checkpoints: PCA needs at least 2 checkpoints")
    return files


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def trajectory_pca(
    center: dict[str, torch.Tensor], files: list[Path], names: list[str], count: int
) -> Trajectory:
    """The top ``count`` principal directions of [theta_i - center] over ``files``, in the
    parameters ``names`` (the others stay zero), and the checkpoints' coordinates."""
    loaded = [load_checkpoint(f, "directions.checkpoints", mmap=True) for f in files]
    for (state, _), path in zip(loaded, files):
        check_same_parameters(state, center, names, path)
    rows = [state for state, _ in loaded]
    blocks = list(column_blocks(center, names, max(1, BLOCK_VALUES // len(rows))))

    gram = np.zeros((len(rows), len(rows)))
    for block in blocks:
        centred = differences(rows, center, block)
        centred -= centred.mean(axis=0)
        gram += centred @ centred.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:count]
    variances, left = np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]
    if variances[-1] <= 0:
        raise UserError(
            f"directions.checkpoints: the {len(rows)} checkpoints span fewer than {count} "
            "dimensions; list more (or distinct) checkpoints"
        )
    singular = np.sqrt(variances)

    directions = [{name: np.zeros(center[name].shape) for name in center} for _ in range(count)]
    coordinates = np.zeros((len(rows), count))
    for block in blocks:
        block_rows = differences(rows, center, block)
        pieces = (block_rows - block_rows.mean(axis=0)).T @ left / singular  # (slice, count)
        coordinates += block_rows @ pieces
        name, start, stop = block
        for j in range(count):
            directions[j][name].reshape(-1)[start:stop] = pieces[:, j]
    return Trajectory(
        directions=directions,
        explained_variance_ratio=variances / np.trace(gram),
        coordinates=coordinates,
        epochs=np.array([meta.get("epoch", i) for i, (_, meta) in enumerate(loaded)]),
        lr=np.array([float(meta.get("lr", np.nan)) for _, meta in loaded]),
        files=files,
    )


def column_blocks(center: dict[str, torch.Tensor], names: list[str], width: int):
    """``(name, start, stop)`` slices of at most ``width`` columns of the flattened tensors."""
    for name in names:
        size = center[name].numel()
        for start in range(0, size, width):
            yield name, start, min(start + width, size)


def differences(rows: list[dict], center: dict, block: tuple[str, int, int]) -> np.ndarray:
    """(m, stop - start) float64 values of theta_i - center over one column slice."""
    name, start, stop = block
    origin = center[name].reshape(-1)[start:stop].double()
    return torch.stack(
        [row[name].reshape(-1)[start:stop].double() - origin for row in rows]
    ).numpy()


def check_same_parameters(state: dict, center: dict, names: list[str], path: Path) -> None:
    for name in names:
        if name not in state or state[name].shape != center[name].shape:
            found = "missing" if name not in state else f"shape {tuple(state[name].shape)}"
            raise UserError(
                f"directions.checkpoints: {path} does not fit the model at {name} ({found}, "
                f"model {tuple(center[name].shape)}); list checkpoints of the same network"
            )
