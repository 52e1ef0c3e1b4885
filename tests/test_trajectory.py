"""PCA of trajectories near the edge of rank: a straight path has no second direction
(refused), a weak but real one is found, of unit length, as a dense SVD finds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_bad_input import fails_with

from landscape.errors import UserError
from landscape.trajectory import trajectory_pca

PARAMETERS, CHECKPOINTS = 3000, 8


def write_path(folder, dtype: torch.dtype, second: float, scale: float = 0.1) -> list:
    """Checkpoints theta_i = theta_0 + t_i e1 + second * b_i e2 (e1, e2 orthonormal) of one
    tensor ``w`` stored in ``dtype``; ``second`` = 0 is a straight line."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=PARAMETERS) * scale
    e1, e2 = np.linalg.qr(rng.normal(size=(PARAMETERS, 2)))[0].T
    steps = np.linspace(0.0, 1.0, CHECKPOINTS) ** 2
    sideways = second * np.sin(np.linspace(0.0, 3.0, CHECKPOINTS))
    files = []
    for i, (t, b) in enumerate(zip(steps, sideways)):
        files.append(folder / f"epoch_{i}.pt")
        torch.save(
            {"state_dict": {"w": torch.tensor(start + t * e1 + b * e2, dtype=dtype)}}, files[-1]
        )
    return files


def stored(files) -> np.ndarray:
    return np.stack(
        [torch.load(f, weights_only=True)["state_dict"]["w"].double().numpy() for f in files]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_straight_trajectory_has_no_second_direction(tmp_path, dtype):
    """The Gram matrix still has a second eigenvalue (float32 rounding of the weights, or
    float64 rounding of the Gram matrix), which is no direction of the path."""
    files = write_path(tmp_path, dtype, second=0.0)
    center = {"w": torch.load(files[-1], weights_only=True)["state_dict"]["w"].double()}
    first = trajectory_pca(center, files, ["w"], 1, None)  # one direction: fine
    np.testing.assert_allclose(np.linalg.norm(first.directions[0]["w"]), 1.0, rtol=0, atol=1e-12)
    with pytest.raises(
        UserError,
        match=r"directions.checkpoints: the trajectory is \(nearly\) "
        r"1-dimensional: PCA-2 \(.* of the variance.*plot a 1D grid",
    ):
        trajectory_pca(center, files, ["w"], 2, None)


@pytest.mark.parametrize(
    "dtype, second",
    [(torch.float64, 1e-6), (torch.float32, 1e-2)],  # well above each dtype's rounding
)
def test_weak_second_direction_is_found_with_unit_length(tmp_path, dtype, second):
    files = write_path(tmp_path, dtype, second)
    rows = stored(files)
    center = {"w": torch.from_numpy(rows[-1])}
    path = trajectory_pca(center, files, ["w"], 2, None)
    # Ground truth: the dense SVD of the centred differences of the stored values.
    _, singular, right = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    for j, direction in enumerate(path.directions):
        found = direction["w"]
        assert abs(np.linalg.norm(found) - 1.0) < 1e-12
        sign = np.sign(found @ right[j])
        np.testing.assert_allclose(found, sign * right[j], rtol=0, atol=1e-8)
        np.testing.assert_allclose(
            path.coordinates[:, j], sign * (rows - rows[-1]) @ right[j], rtol=0, atol=1e-9
        )
    # The Gram route gives eigenvalues to a few eps * lambda_1 (here ratio 1e-12 +- 5e-17).
    ratios = singular[:2] ** 2 / (singular**2).sum()
    np.testing.assert_allclose(path.explained_variance_ratio, ratios, rtol=1e-9, atol=1e-15)


def test_plan_of_a_straight_trajectory_is_refused_in_one_line(experiment, tmp_path, capsys):
    """Checkpoints of the test MLP along one line: plan names the field and what to do."""
    config = experiment()
    state = torch.load(tmp_path / "exp.pt", weights_only=True)["state_dict"]
    step = {k: torch.randn_like(v) for k, v in state.items()}
    for i in range(5):
        moved = {k: v + 0.1 * i * step[k] for k, v in state.items()}
        torch.save({"state_dict": moved}, tmp_path / f"line_{i}.pt")
    config = experiment(directions={"kind": "pca", "checkpoints": [str(tmp_path / "line_*.pt")]})
    fails_with(
        capsys,
        ["plan", str(config)],
        "directions.checkpoints: the trajectory is (nearly) 1-dimensional: PCA-2",
        "plot a 1D grid (no grid.y) or use another directions.kind",
    )
    assert not (tmp_path / "exp.h5").exists()
