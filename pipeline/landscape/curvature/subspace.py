"""Contains the gradient's share of the top eigenspace of a curvature matrix and the
overlap of two eigenspaces (Gur-Ari et al. 2018, Fort & Ganguli 2019).

Both take orthonormal bases as the columns of an n x k matrix (torch or numpy, e.g. the
Ritz vectors of :func:`landscape.curvature.lanczos.lanczos` stacked as columns) and
compute in float64 on the bases' device.
"""

from __future__ import annotations

import numpy as np
import torch

# |U^T U - I| allowed entrywise: Ritz vectors from Lanczos with full reorthogonalization
# are orthonormal to ~1e-12 in float64; this refuses rows passed as columns, or a basis
# that is not one, whose fractions could exceed 1.
ORTHONORMAL = 1e-6


def as_float64(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``values`` as a float64 tensor (a numpy array copied where its strides are negative,
    as for ``vectors[:, ::-1]``)."""
    if isinstance(values, np.ndarray):
        values = np.ascontiguousarray(values)
    return torch.as_tensor(values).double()


def as_basis(vectors: torch.Tensor | np.ndarray, size: int, what: str) -> torch.Tensor:
    """``vectors`` as a float64 n x k tensor with orthonormal columns, checked."""
    basis = as_float64(vectors)
    if basis.dim() != 2 or basis.shape[0] != size or basis.shape[1] == 0:
        raise ValueError(
            f"{what}: shape {tuple(basis.shape)}; expected ({size}, k), one column per vector"
        )
    error = float(
        (basis.T @ basis - torch.eye(basis.shape[1], dtype=torch.float64, device=basis.device))
        .abs()
        .max()
    )
    if error > ORTHONORMAL:
        raise ValueError(f"{what}: columns not orthonormal (|U^T U - I| up to {error:.3g})")
    return basis


def top_subspace_fractions(
    gradient: torch.Tensor | np.ndarray, eigenvectors: torch.Tensor | np.ndarray
) -> np.ndarray:
    """f_j = ||P_j g||^2 / ||g||^2 for j = 1..k: the fraction of the gradient's squared
    norm in the span P_j of the first j columns of ``eigenvectors`` (n x k, orthonormal,
    ordered by eigenvalue descending, so f_j is its share in the top-j eigenspace).

    With c = U^T g, f_j = (c_1^2 + ... + c_j^2) / ||g||^2: nondecreasing in j, in [0, 1],
    1 at j = n. Exact to the rounding of float64 where the columns are exact
    eigenvectors; Ritz vectors with residual r move each c_l by at most about
    ||g|| r / gap_l (Davis-Kahan), gap_l the distance to the rest of the spectrum. NaN
    where g = 0 (no direction to share).
    """
    basis = as_float64(eigenvectors)
    basis = as_basis(basis, basis.shape[0] if basis.dim() else 0, "eigenvectors")
    g = as_float64(gradient).to(basis.device).reshape(-1)
    if g.numel() != basis.shape[0]:
        raise ValueError(
            f"Incompatible shapes: gradient ({g.numel()},), eigenvectors {tuple(basis.shape)}"
        )
    squared = float(g @ g)
    if squared == 0:
        return np.full(basis.shape[1], np.nan)
    return (torch.cumsum((basis.T @ g) ** 2, 0) / squared).cpu().numpy()


def subspace_overlap(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray) -> float:
    """(1/k) ||U^T V||_F^2 = tr(P_U P_V) / k for two k-dimensional subspaces given by
    orthonormal columns U, V (n x k each): the mean squared cosine of their principal
    angles, 1 for one subspace, 0 for orthogonal ones, k/n in expectation for random
    ones (Gur-Ari et al.'s overlap). It depends on the subspaces only, not on the bases."""
    u = as_float64(first)
    u = as_basis(u, u.shape[0] if u.dim() else 0, "first subspace")
    v = as_basis(as_float64(second).to(u.device), u.shape[0], "second subspace")
    if u.shape != v.shape:
        raise ValueError(
            f"Incompatible shapes: first subspace {tuple(u.shape)}, second {tuple(v.shape)}"
        )
    return float(((u.T @ v) ** 2).sum()) / u.shape[1]
