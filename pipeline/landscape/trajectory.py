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

from landscape.checkpoint import load_checkpoint
from landscape.config import ModelConfig
from landscape.errors import UserError

log = logging.getLogger(__name__)

BLOCK_VALUES = 1 << 23  # float64 values per slice of all m rows (64 MiB), whatever m is
LR_DROP = 0.5  # a step down to at most this fraction of the previous epoch's rate
# A principal component must stand this far above the rounding floor: by Wedin's theorem
# rounding then turns its direction by at most about 1/NOISE_MARGIN radian.
NOISE_MARGIN = 10


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


def trajectory_files(
    patterns: list[str], field: str = "directions.checkpoints", minimum: int = 2
) -> list[Path]:
    """Checkpoint paths in order; a glob pattern expands in natural order (epoch_2 before
    epoch_10). Fails naming ``field`` and a pattern that matches nothing, or when fewer
    than ``minimum`` files are found (PCA needs two)."""
    files = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern), key=natural_key) if glob.has_magic(pattern) else [pattern]
        )
        if not matches or not Path(matches[0]).is_file():
            raise UserError(
                f"{field}: {pattern} matches no file; train first (landscape train) or fix the path"
            )
        files += [Path(match) for match in matches]
    if len(files) < minimum:
        raise UserError(f"{field}: {len(files)} checkpoints; give at least {minimum}")
    return files


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def trajectory_pca(
    center: dict[str, torch.Tensor],
    files: list[Path],
    names: list[str],
    count: int,
    settings: ModelConfig | None,
) -> Trajectory:
    """The top ``count`` principal directions of [theta_i - center] over ``files``, in the
    parameters ``names`` (the others stay zero), and the checkpoints' coordinates;
    ``settings``: the config's model section, which says how its checkpoints are read
    (None: found automatically).

    Each direction is rescaled to unit length in float64 (u_j = B_c^T v_j / s_j is of
    unit length only as far as s_j^2 is exact), and a component within rounding of zero
    (see :func:`rounding_floor`) is refused: its "direction" would be noise.
    """
    loaded = [
        load_checkpoint(f, names, settings, "directions.checkpoints", mmap=True) for f in files
    ]
    for (state, _), path in zip(loaded, files):
        check_same_parameters(state, center, names, path)
    rows = [state for state, _ in loaded]
    blocks = list(column_blocks(center, names, max(1, BLOCK_VALUES // len(rows))))

    gram = np.zeros((len(rows), len(rows)))
    distances = np.zeros(len(rows))  # ||theta_i - center||^2
    for block in blocks:
        block_rows = differences(rows, center, block)
        if not np.isfinite(block_rows.sum()):
            check_finite_rows(block_rows, files, block[0])
        distances += (block_rows**2).sum(axis=1)
        centred = block_rows - block_rows.mean(axis=0)
        gram += centred @ centred.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:count]
    variances, left = np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]
    center_norm = np.sqrt(sum(float((center[n].double() ** 2).sum()) for n in names))
    floor = rounding_floor(
        variances[0],
        np.sqrt(distances) + center_norm,
        max(torch.finfo(row[name].dtype).eps for row in rows for name in names),
    )
    check_above_rounding(variances, np.trace(gram), floor)
    singular = np.sqrt(variances)

    directions = [{name: np.zeros(center[name].shape) for name in center} for _ in range(count)]
    coordinates = np.zeros((len(rows), count))
    squared_norms = np.zeros(count)
    for block in blocks:
        block_rows = differences(rows, center, block)
        pieces = (block_rows - block_rows.mean(axis=0)).T @ left / singular  # (slice, count)
        coordinates += block_rows @ pieces
        squared_norms += (pieces**2).sum(axis=0)
        name, start, stop = block
        for j in range(count):
            directions[j][name].reshape(-1)[start:stop] = pieces[:, j]
    norms = np.sqrt(squared_norms)
    for j, direction in enumerate(directions):
        for values in direction.values():
            values /= norms[j]
    return Trajectory(
        directions=directions,
        explained_variance_ratio=variances / np.trace(gram),
        coordinates=coordinates / norms,
        epochs=np.array([meta.get("epoch", i) for i, (_, meta) in enumerate(loaded)]),
        lr=np.array([float(meta.get("lr", np.nan)) for _, meta in loaded]),
        files=files,
    )


def rounding_floor(top_variance: float, weight_norms: np.ndarray, storage_eps: float) -> float:
    """The singular value of the centred differences B_c below which a component can be
    rounding alone, from either of two sources:

    - the stored weights: each value of theta_i is rounded to its dtype (u = eps/2), so
      B_c is the exact matrix plus a perturbation N with ||N||_2 <= ||N||_F <= u * sqrt(
      sum_i ||theta_i||^2); by Weyl's inequality a singular value below that is
      consistent with zero (float32 checkpoints of a straight path show such a PCA-2);
    - the Gram route: G = B_c B_c^T is formed and diagonalized in float64 with errors of
      a few eps * lambda_1 per entry, so ||error|| <~ m eps lambda_1 and eigenvalues
      below it (singular values below sqrt(m eps lambda_1)) are indistinguishable from
      zero (measured: 1e-16 to 3e-16 lambda_1 on a straight path of float64 weights).

    ``weight_norms`` are upper bounds on ||theta_i||.
    """
    stored = storage_eps / 2 * float(np.sqrt((weight_norms**2).sum()))
    formed = float(np.sqrt(len(weight_norms) * np.finfo(np.float64).eps * top_variance))
    return max(stored, formed)


def check_above_rounding(variances: np.ndarray, total: float, floor: float) -> None:
    """Refuse the first component whose singular value is within ``NOISE_MARGIN`` times
    the rounding ``floor``: the trajectory is (nearly) of lower dimension than asked."""
    for j, variance in enumerate(variances):
        if np.sqrt(variance) > NOISE_MARGIN * floor:
            continue
        if j == 0:
            raise UserError(
                "directions.checkpoints: the checkpoints are identical up to rounding; "
                "list the checkpoints of a training run"
            )
        raise UserError(
            f"directions.checkpoints: the trajectory is (nearly) {j}-dimensional: PCA-{j + 1} "
            f"({variance / total:.1e} of the variance, singular value {np.sqrt(variance):.1e})"
            f" is within {NOISE_MARGIN}x of rounding ({floor:.1e}); plot a 1D grid (no "
            "grid.y) or use another directions.kind"
        )


def check_finite_rows(block_rows: np.ndarray, files: list[Path], name: str) -> None:
    """Fail naming the first checkpoint whose slice of ``name`` holds NaN or inf."""
    for row, path in zip(block_rows, files):
        if not np.isfinite(row).all():
            raise UserError(
                f"directions.checkpoints: {path}: {name} holds NaN or inf; the run that wrote "
                "it diverged, leave it (and later checkpoints) out of the trajectory"
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
