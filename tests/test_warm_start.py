"""Warm-started Lanczos along the shards of the hessian job: the same ends as cold solves
(dense eigh as ground truth, float32 and float64), fewer products, and numbers that do not
depend on which rank takes a shard or where a run was resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import MODELS, dense_hessian, trained_experiment

from landscape.config import load_config
from landscape.curvature import AUTOMATIC_HVP_MODE
from landscape.curvature.lanczos import (
    Criterion,
    lanczos,
    predicted_ritz_vectors,
    start_vector,
    warm_start_vector,
)
from landscape.evaluators import hessian_evaluator
from landscape.experiment import Experiment
from landscape.hessian import HessianEvaluator, training_hessian
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import run_job

TOLERANCE = 1e-3
TORCH_DTYPES = [torch.float32, torch.float64]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
OUTPUTS = ["lambda_min", "lambda_max", "hessian_hvps", "hessian_converged"]
# 4 x 2 Hessian points around the trained minimum: two rows, so two shards of 4.
GRID = {"x": {"min": -0.3, "max": 0.3, "num": 4}, "y": {"min": -0.3, "max": 0.3, "num": 2}}


def variant(config: Path, name: str, **hessian) -> Path:
    """A copy of ``config`` named ``name`` (its own surface file), ``hessian`` changed."""
    settings = yaml.safe_load(config.read_text())
    settings["hessian"] = {**settings.get("hessian", {}), **hessian}
    settings["output"] = str(config.parent / f"{name}.h5")
    path = config.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def hessian_maps(config: Path, warm_start: bool) -> tuple:
    """The hessian job's maps of ``config`` with warm starts or without, and its inputs."""
    config = variant(config, f"warm_{warm_start}", warm_start=warm_start)
    surface = plan_surface(load_config(config))
    run_job(surface, "hessian", show_progress=False)
    with SurfaceFile.open(surface) as done:
        assert done.shards("hessian").tolist() == [[0, 4], [4, 8]]  # a row each
        assert done.handle["done/hessian"].attrs["warm_start"] == int(warm_start)
        return done.maps(), done.directions(), done.grid, config


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_warm_and_cold_starts_find_the_dense_extremes_and_warm_needs_fewer_products(
    experiment, dtype
):
    trained = trained_experiment(
        experiment,
        "mlp",
        grid=GRID,
        maps=["lambda_min", "lambda_max"],
        evaluation={"dtype": dtype},
        hessian={"tolerance": TOLERANCE},
    )
    warm, directions, grid, config = hessian_maps(trained, warm_start=True)
    cold, *_ = hessian_maps(trained, warm_start=False)
    settings = load_config(config).hessian
    checker = HessianEvaluator(Experiment.load(load_config(config)), directions, settings)
    criterion = Criterion.for_dtype(TOLERANCE, DTYPES[dtype])
    for point in range(grid.size):
        checker.plane.move_to(*grid.coordinates(point))
        exact = np.linalg.eigvalsh(dense_hessian(checker.operator, torch.float64))
        scale = max(abs(exact[0]), abs(exact[-1]))
        index = grid.index(point)
        for maps in (warm, cold):
            assert maps["hessian_converged"][index] == 1
            for end, true in (("lambda_min", exact[0]), ("lambda_max", exact[-1])):
                assert abs(maps[end][index] - true) <= criterion.bound(true, scale), (point, end)
    # Only the first point of each row starts cold; the rest start from their neighbour
    # (this 303-parameter MLP needs about 20 HVPs cold: measured 120 warm, 135 cold).
    firsts = (slice(None), 0)
    np.testing.assert_array_equal(warm["hessian_hvps"][firsts], cold["hessian_hvps"][firsts])
    assert warm["hessian_hvps"][:, 1:].sum() < cold["hessian_hvps"][:, 1:].sum()


def test_shards_give_the_same_numbers_in_any_order_and_resumed_halfway(experiment):
    """Two ranks each taking one shard, in either order, and a run resumed at the third
    point of each shard (the first two written before an interrupt): every number equals
    the uninterrupted run's, bit for bit."""
    config = trained_experiment(experiment, "mlp", grid=GRID, maps=["lambda_min", "lambda_max"])
    with SurfaceFile.open(plan_surface(load_config(config))) as surface:
        shards = [
            surface.points("hessian")[start:stop] for start, stop in surface.shards("hessian")
        ]

        def fresh():  # a new rank, or a resumed process: nothing solved yet
            return hessian_evaluator(Experiment.load(load_config(config)), surface, OUTPUTS)

        uninterrupted = fresh()
        expected = {int(p): uninterrupted(np.array([p])) for shard in shards for p in shard}
        later_first = fresh()
        rank = {int(p): later_first(np.array([p])) for shard in shards[::-1] for p in shard}
        resumed = fresh()
        halves = {int(p): resumed(np.array([p])) for shard in shards for p in shard[2:]}
    for point, values in expected.items():
        for found in (rank, halves):
            if point in found:
                for name in OUTPUTS:
                    assert found[point][name].tobytes() == values[name].tobytes(), (point, name)
    assert len(halves) == 4


def test_products_follow_the_device_rule_unless_the_config_says_otherwise(experiment):
    """hvp: auto (the default) takes AUTOMATIC_HVP_MODE of the device's type (double
    backward on a CPU); a named mode is taken as given. Fixed by the config and the
    device, so every rank and resume differentiates alike."""
    network, data = MODELS["cnn_bn"]
    default = load_config(experiment(name="default", model=network, data=data))
    chosen = load_config(
        experiment(name="chosen", model=network, data=data, hessian={"hvp": "forward_over_reverse"})
    )
    assert default.hessian.hvp == "auto" and AUTOMATIC_HVP_MODE["cpu"] == "double_backward"
    for config, mode in ((default, "double_backward"), (chosen, "forward_over_reverse")):
        settings = config.hessian
        operator = training_hessian(Experiment.load(config), settings.parameters, settings.hvp)
        assert operator.mode == mode


SIZE = 300


def path_matrix(t: float) -> np.ndarray:
    """H(t) = A + t B on a 300-dimensional space: A with simple ends (-1.5, 2.5 beside a
    bulk in [-1, 2]), B a symmetric perturbation of norm about 1; a smooth path of
    eigenvectors."""
    rng = np.random.default_rng(7)
    basis, _ = np.linalg.qr(rng.normal(size=(SIZE, SIZE)))
    eigenvalues = np.concatenate([[-1.5], np.linspace(-1, 2, SIZE - 2), [2.5]])
    noise = rng.normal(size=(SIZE, SIZE)) / np.sqrt(SIZE)
    return (basis * eigenvalues) @ basis.T + t * (noise + noise.T) / 2


def ends(matrix: np.ndarray, dtype: torch.dtype):
    """Lanczos (tolerance 1e-6, products in ``dtype``) on ``matrix``: its Ritz pairs."""
    dense = torch.as_tensor(matrix, dtype=dtype)
    criterion = Criterion.for_dtype(1e-6, dtype)
    return lanczos(lambda v: dense @ v.to(dtype), start_vector(SIZE, 0), criterion, SIZE)


def sines(vectors: torch.Tensor, exact: np.ndarray) -> np.ndarray:
    """sin of the angle between each row of ``vectors`` and each column of ``exact``."""
    cosines = np.abs(np.sum(vectors.numpy() * exact.T, axis=1))
    return np.sqrt(np.clip(1 - cosines**2, 0, None))


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_extrapolated_ritz_vectors_are_second_order_along_a_smooth_path(dtype):
    """Ritz vectors at t - h and t predict both ends' eigenvectors at t + h (dense eigh) to
    O(h^2) where the last one alone is O(h) off: halving h halves the last one's error and
    quarters the prediction's. The older vector's sign does not matter."""
    errors = {}
    for step in (0.04, 0.02):
        previous, latest = (ends(path_matrix(t), dtype).vectors for t in (0.0, step))
        exact = np.linalg.eigh(path_matrix(2 * step))[1][:, [0, -1]]
        predicted = predicted_ritz_vectors(latest, previous)
        flipped = predicted_ritz_vectors(latest, -previous)
        torch.testing.assert_close(flipped, predicted, rtol=0, atol=1e-12)
        errors[step] = sines(latest, exact), sines(predicted, exact)
    (last_wide, predicted_wide), (last_narrow, predicted_narrow) = errors[0.04], errors[0.02]
    np.testing.assert_allclose(last_wide / last_narrow, 2, rtol=0.1)
    np.testing.assert_allclose(predicted_wide / predicted_narrow, 4, rtol=0.25)
    assert (predicted_narrow < last_narrow / 10).all()


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_a_warm_solve_from_the_prediction_finds_the_dense_ends_in_fewer_products(dtype):
    """On the path's third point, Lanczos from the extrapolated start meets the criterion
    with both dense ends, in fewer products than from the last point's vectors, which
    take fewer than the seeded start; an end that crossed (consecutive vectors nearly
    orthogonal) is carried without extrapolating."""
    step = 0.3  # the ends' eigenvectors turn by 0.15 to 0.19 rad a step
    previous, latest = (ends(path_matrix(t), dtype).vectors for t in (0.0, step))
    target = torch.as_tensor(path_matrix(2 * step), dtype=dtype)
    exact = np.linalg.eigvalsh(path_matrix(2 * step))
    criterion = Criterion.for_dtype(1e-6, dtype)
    seeded = start_vector(SIZE, 0)
    starts = [warm_start_vector([previous, latest], seeded), warm_start_vector([latest], seeded)]
    counts = []
    for start in [*starts, seeded]:
        pairs = lanczos(lambda v: target @ v.to(dtype), start, criterion, SIZE)
        assert pairs.converged
        for value, truth in zip(pairs.values, exact[[0, -1]]):
            assert abs(value - truth) <= criterion.bound(truth, abs(exact).max())
        counts.append(pairs.hvps)
    assert counts[0] < counts[1] < counts[2], counts  # measured 18, 20, 27 in float32
    crossed = torch.stack([previous[0], latest[0]])  # the lambda_max end's old vector was another
    predicted = predicted_ritz_vectors(latest, crossed)
    torch.testing.assert_close(predicted[1], latest[1].double(), rtol=0, atol=0)
