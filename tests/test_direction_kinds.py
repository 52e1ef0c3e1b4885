"""Directions that show structure, against ground truth: interpolation end points, PCA by
dense SVD, Hessian eigenvectors by the dense Hessian, and bad direction files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CROSS_ENTROPY, dense_hessian, hessian_operator, trained_experiment
from scipy.linalg import null_space

from landscape import trajectory
from landscape.config import load_config
from landscape.directions import checkpoint_names
from landscape.errors import UserError
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.parameters import DirectionPlane
from landscape.plan import plan_surface
from landscape.plot import plot_surface_file
from landscape.store import SurfaceFile
from landscape.train import checkpoint_path
from landscape.workers import run_job


def rewrite(path, **changes):
    """The config at ``path`` with top-level sections replaced, written beside it."""
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    target = path.with_name(f"{path.stem}_{'_'.join(changes)}.yaml")
    config["output"] = str(target.with_suffix(".h5"))
    target.write_text(yaml.safe_dump(config))
    return target


def losses_of(config_path, checkpoint: str) -> dict[str, float]:
    """Train and test loss/accuracy of one checkpoint, evaluated on its own."""
    config = load_config(config_path, [f"model.checkpoint={checkpoint}"])
    exp = Experiment.load(config)
    values = {}
    for split in ("train", "test"):
        loss, acc = evaluate(exp.model, exp.data.split(split), 16, exp.objective)
        values.update({f"{split}_loss": loss, f"{split}_acc": acc})
    return values


def test_interpolation_ends_are_the_checkpoints_and_bn_statistics_move_too(experiment):
    config = trained_experiment(
        experiment, "cnn_bn", epochs=2, evaluation={"dtype": "float32", "batch_size": 16}
    )
    settings = load_config(config).train
    start, end = str(checkpoint_path(settings, 0)), str(checkpoint_path(settings, 2))
    interpolation = rewrite(
        config,
        model={**yaml.safe_load(config.read_text())["model"], "checkpoint": start},
        directions={"kind": "interpolation", "targets": [end]},
        grid={"x": {"min": -0.5, "max": 1.5, "num": 5}},
    )
    surface = plan_surface(load_config(interpolation))
    run_job(surface, "loss", show_progress=False)
    with SurfaceFile.open(surface) as done:
        maps, grid, directions = done.maps(), done.grid, done.directions()
        histograms, attrs = done.group("endpoints")
        (label,) = done.axis_labels()
        low, high = attrs["defined_alpha"]
    assert low <= 0 and high >= 1  # BN variances stay >= 0 between the two checkpoints
    # Where a variance is extrapolated below zero there is neither loss nor accuracy.
    np.testing.assert_array_equal(np.isnan(maps["train_loss"]), np.isnan(maps["train_acc"]))
    assert grid.x.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    # Exactly the checkpoints' own values at a = 0 and a = 1, in float32.
    for index, checkpoint in ((1, start), (3, end)):
        own = losses_of(interpolation, checkpoint)
        assert {name: maps[name][index] for name in own} == own, checkpoint

    # At a = 0.5 the BatchNorm running statistics are the midpoints of the two ends.
    a_state = torch.load(start, weights_only=True)["state_dict"]
    b_state = torch.load(end, weights_only=True)["state_dict"]
    exp = Experiment.load(load_config(interpolation))
    DirectionPlane(exp.model, directions).move_to(0.5)
    buffers = dict(exp.model.named_buffers())
    running = [name for name in buffers if "running" in name]
    assert running and set(running) <= set(directions[0])
    for name in running:
        assert not torch.equal(a_state[name], b_state[name])
        midpoint = ((a_state[name].double() + b_state[name].double()) / 2).float()
        assert torch.equal(buffers[name], midpoint), name

    # Both ends' weights, as stored for Li et al.'s Fig. 2, and the figure.
    weights = [
        torch.cat([s[n].reshape(-1) for n, p in exp.model.named_parameters() if p.dim() > 1])
        for s in (a_state, b_state)
    ]
    np.testing.assert_allclose(attrs["weight_norms"], [w.double().norm() for w in weights])
    inside = [
        int(
            (
                (w >= histograms["histogram_edges"][0]) & (w <= histograms["histogram_edges"][-1])
            ).sum()
        )
        for w in weights
    ]
    assert [histograms["histogram_a"].sum(), histograms["histogram_b"].sum()] == inside
    assert "θA" in label and "epoch_002.pt" in label
    figures = {path.name for path in plot_surface_file(surface, formats=("png",))}
    assert figures == {f"{surface.stem}_interpolation.png"}


def test_checkpoint_names_are_the_shortest_suffixes_that_tell_them_apart():
    assert checkpoint_names(["runs/a/epoch_002.pt", "runs/a/epoch_006.pt"]) == [
        "epoch_002.pt",
        "epoch_006.pt",
    ]
    assert checkpoint_names(["/r/bs64/epoch_006.pt", "/r/bs256/epoch_006.pt"]) == [
        "bs64/epoch_006.pt",
        "bs256/epoch_006.pt",
    ]
    assert checkpoint_names(["/x/seed0/run/e.pt", "/x/seed1/run/e.pt", "/x/seed1/e.pt"]) == [
        "seed0/run/e.pt",
        "seed1/run/e.pt",
        "x/seed1/e.pt",
    ]
    assert checkpoint_names(["/a/e.pt", "/a/e.pt"]) == ["e.pt", "e.pt"]


def test_interpolation_between_same_named_checkpoints_names_their_folders(experiment, tmp_path):
    """Two runs' checkpoints of one epoch share a file name: the labels name the runs."""
    config = experiment()
    ends = []
    for seed, run in enumerate(("bs64", "bs256")):
        experiment(name=run, seed=seed)  # its checkpoint: <tmp_path>/<run>.pt
        (tmp_path / run).mkdir()
        ends.append((tmp_path / f"{run}.pt").rename(tmp_path / run / "epoch_006.pt"))
    interpolation = rewrite(
        config,
        model={**yaml.safe_load(config.read_text())["model"], "checkpoint": str(ends[0])},
        directions={"kind": "interpolation", "targets": [str(ends[1])]},
        grid={"x": {"min": 0.0, "max": 1.0, "num": 3}},
        maps=["train_loss"],
    )
    with SurfaceFile.open(plan_surface(load_config(interpolation))) as planned:
        (label,) = planned.axis_labels()
    assert label.endswith("A = bs64/epoch_006.pt, B = bs256/epoch_006.pt"), label


def test_pca_directions_match_a_dense_svd_and_frame_the_trajectory(experiment, monkeypatch):
    monkeypatch.setattr(trajectory, "BLOCK_VALUES", 49)  # 7 columns of 7 rows per slice
    config = trained_experiment(
        experiment,
        "mlp",
        epochs=6,
        schedule={"schedule": "step", "step_epochs": [3], "lr": 0.2},
        maps=["train_loss"],
    )
    folder = load_config(config).train.checkpoint_dir
    pca = rewrite(
        config,
        directions={"kind": "pca", "checkpoints": [f"{folder}/epoch_*.pt"]},
        grid={"x": {"num": 6}, "y": {"num": 5}},
    )
    surface = plan_surface(load_config(pca))
    with SurfaceFile.open(surface) as planned:
        directions, grid = planned.directions(), planned.grid
        path, attrs = planned.group("trajectory")
        labels = planned.axis_labels()

    # Ground truth: numpy's SVD of the dense, centred difference matrix (weights only:
    # biases are ignored by default, so their columns are zero).
    exp = Experiment.load(load_config(pca))
    names = [n for n, p in exp.model.named_parameters() if p.dim() > 1]
    files = [checkpoint_path(load_config(config).train, e) for e in range(7)]
    assert attrs["checkpoints"].tolist() == [str(f) for f in files]
    center = torch.load(files[-1], weights_only=True)["state_dict"]

    def flat(state):
        return torch.cat([state[n].double().reshape(-1) for n in names]).numpy()

    rows = np.stack(
        [flat(torch.load(f, weights_only=True)["state_dict"]) - flat(center) for f in files]
    )
    _, singular, right = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    ratios = singular**2 / (singular**2).sum()
    np.testing.assert_allclose(attrs["explained_variance_ratio"], ratios[:2], rtol=1e-10)
    for j, direction in enumerate(directions):
        found = np.concatenate([direction[n].reshape(-1) for n in names])
        sign = np.sign(found @ right[j])
        np.testing.assert_allclose(found, sign * right[j], atol=1e-10)
        np.testing.assert_allclose(path["coordinates"][:, j], sign * rows @ right[j], atol=1e-10)
        assert all(not direction[n].any() for n in direction if n not in names)
        assert f"PCA-{j + 1} ({ratios[j]:.1%}" in labels[j]
    # The rate fell from 0.2 to 0.02 after epoch 3: one red dot, at checkpoint 3.
    assert path["lr_drop"].tolist() == [0, 0, 0, 1, 0, 0, 0]
    # The automatic grid frames every checkpoint and the centre.
    for axis, values in zip((grid.x, grid.y), path["coordinates"].T):
        assert axis[0] < min(values.min(), 0) and max(values.max(), 0) < axis[-1]

    run_job(surface, "loss", show_progress=False)
    plot_surface_file(surface, formats=("png",))
    contour = plot_contour_axis(surface)
    drawn = [line for line in contour.lines if len(line.get_xdata()) == len(files)]
    assert drawn, "trajectory not drawn on the contour plot"


def plot_contour_axis(surface):
    from landscape.plot import plot_contour

    with SurfaceFile.open(surface) as done:
        figure = plot_contour(
            done.grid,
            done.maps()["train_loss"],
            "loss",
            done.axis_labels(),
            trajectory=done.group("trajectory")[0],
        )
    return figure.axes[0]


def test_hessian_directions_are_the_dense_eigenvectors_and_the_surface_curves_by_them(
    experiment,
):
    config = trained_experiment(
        experiment,
        "mlp",
        epochs=20,
        directions={"kind": "hessian"},
        hessian={"tolerance": 1e-10, "max_hvps": 400},
        maps=["train_loss"],
        grid={
            "x": {"min": -1e-3, "max": 1e-3, "num": 3},
            "y": {"min": -1e-3, "max": 1e-3, "num": 3},
        },
    )
    surface = plan_surface(load_config(config))
    run_job(surface, "loss", show_progress=False)
    with SurfaceFile.open(surface) as done:
        directions, loss = done.directions(), done.maps()["train_loss"]
        axes = [dict(done.handle[f"directions/{a}"].attrs) for a in "xy"]

    exp = Experiment.load(load_config(config))
    operator = hessian_operator(
        exp.model, exp.data.train_x, exp.data.train_y, CROSS_ENTROPY, 1000, "weights"
    )
    values, vectors = np.linalg.eigh(dense_hessian(operator))
    assert values[0] < 0 < values[-1]  # a saddle-like point after 20 epochs
    for direction, exact, axis in zip(directions, (vectors[:, -1], vectors[:, 0]), axes):
        found = np.concatenate([direction[n].reshape(-1) for n in operator.names])
        sign = np.sign(found @ exact)
        np.testing.assert_allclose(found, sign * exact, atol=1e-6)
        assert np.linalg.norm(found) == pytest.approx(1.0, abs=1e-12)
        biases = [n for n in direction if n not in operator.names]
        assert biases and all(not direction[n].any() for n in biases)
        assert axis["converged"]
    np.testing.assert_allclose(
        [axes[0]["eigenvalue"], axes[1]["eigenvalue"]], values[[-1, 0]], rtol=1e-8
    )
    # Second differences of the computed surface at its centre are the principal curvatures.
    h = 1e-3
    curvature_x = (loss[1, 2] - 2 * loss[1, 1] + loss[1, 0]) / h**2
    curvature_y = (loss[2, 1] - 2 * loss[1, 1] + loss[0, 1]) / h**2
    np.testing.assert_allclose([curvature_x, curvature_y], values[[-1, 0]], rtol=1e-3, atol=1e-6)
    figures = {path.name for path in plot_surface_file(surface, formats=("png",))}
    assert f"{surface.stem}_train_loss_sections.png" in figures


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hessian_directions_at_a_semidefinite_point_leave_out_the_softmax_gauge(experiment, dtype):
    """A softmax-linear model is convex: its Hessian is zero on the gauge (one vector added
    to every row of W), where the loss never changes. lambda_min's direction is the
    smallest curvature the model's function feels: the dense Hessian's on the gauge's
    orthogonal complement (before: a flat gauge direction, eigenvalue 0). Both vectors
    are within residual / gap of the dense eigenvectors (Davis-Kahan)."""
    config = experiment(
        model={"name": "linear", "kwargs": {}},
        directions={"kind": "hessian"},
        hessian={"tolerance": 1e-10},
        evaluation={"dtype": dtype},
        maps=["train_loss"],
    )
    surface = plan_surface(load_config(config))
    with SurfaceFile.open(surface) as planned:
        directions, axes = planned.directions(), planned.axis_attrs()

    exp = Experiment.load(load_config(config))
    operator = hessian_operator(
        exp.model, exp.data.train_x, exp.data.train_y, CROSS_ENTROPY, 1000, "weights"
    )
    assert operator.names == ["linear.weight"]  # 3 classes x 5 inputs, biases ignored
    exact = dense_hessian(operator, torch.float64)
    gauge = np.kron(np.ones((3, 1)), np.eye(5)) / np.sqrt(3)  # column j raised in every row
    scale = np.abs(np.linalg.eigvalsh(exact)).max()
    assert np.abs(exact @ gauge).max() <= 1e-12 * scale  # flat: lambda_min = 0 exactly
    complement = null_space(gauge.T)
    inside, rotated = np.linalg.eigh(complement.T @ exact @ complement)
    everywhere, vectors = np.linalg.eigh(exact)
    expected = [(everywhere, vectors[:, -1], -1), (inside, complement @ rotated[:, 0], 0)]
    for direction, axis, (values, vector, end) in zip(directions, axes, expected):
        found = direction["linear.weight"].reshape(-1)
        gap = abs(values[end] - values[end - 1 if end else 1])
        sine = np.sqrt(max(0.0, 1 - (found @ vector) ** 2))
        assert sine <= 2 * axis["residual"] / gap, (axis["label"], sine)
        assert abs(axis["eigenvalue"] - values[end]) <= 2 * axis["residual"]
        assert np.abs(found @ gauge).max() <= 1e-12 and axis["converged"]
        assert axis["gauge_directions_projected"] == 5
    assert inside[0] > 1e-3 * scale  # the complement is positive definite
    assert "softmax gauge projected out" in axes[1]["label"]


def test_filter_normalized_hessian_directions_are_refused(experiment):
    """A rescaled eigenvector is no eigenvector: the plane's curvatures would not be the
    eigenvalues its axes are labelled with (before: planned, labelled eigenvectors)."""
    config = experiment(directions={"kind": "hessian", "normalization": "filter"})
    with pytest.raises(UserError, match="directions.normalization: hessian directions must stay"):
        load_config(config)


def test_direction_file_must_fit_the_model_and_names_the_first_bad_key(experiment, tmp_path):
    config = experiment()
    exp = Experiment.load(load_config(config))
    good = {n: torch.randn(p.shape, dtype=torch.float64) for n, p in exp.model.named_parameters()}
    first = next(iter(good))
    cases = {
        "shape": ({**good, first: torch.zeros(3, 3)}, f"key {first!r} has shape (3, 3)"),
        "unknown": (
            {**good, "head.weight": torch.zeros(2)},
            "key 'head.weight' is not a parameter",
        ),
        "missing": (
            {k: v for k, v in good.items() if k != first},
            f"no tensor for parameter {first!r}",
        ),
    }
    for name, (direction, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save([good, direction], path)
        bad = rewrite(config, directions={"kind": "file", "file": str(path)})
        with pytest.raises(
            UserError, match=message.replace("(", r"\(").replace(")", r"\)")
        ) as caught:
            plan_surface(load_config(bad))
        assert "directions.file" in str(caught.value) and ", direction y" in str(caught.value)
        assert not Path(load_config(bad).output).exists()

    # A good file is used as given (normalization none): a = 1 adds exactly the tensors.
    path = tmp_path / "good.pt"
    torch.save({"x": good, "y": good}, path)
    surface = plan_surface(
        load_config(rewrite(config, directions={"kind": "file", "file": str(path)}))
    )
    with SurfaceFile.open(surface) as planned:
        x, y = planned.directions()
    assert all(np.array_equal(x[n], good[n].numpy()) for n in good)


def test_target_directions_reach_the_targets(experiment):
    config = trained_experiment(experiment, "mlp", epochs=2, maps=["train_loss"])
    settings = load_config(config).train
    targets = [str(checkpoint_path(settings, e)) for e in (0, 1)]
    planned = rewrite(
        config,
        directions={"kind": "target", "targets": targets},
        grid={"x": {"min": 0.0, "max": 1.0, "num": 2}, "y": {"min": 0.0, "max": 1.0, "num": 2}},
    )
    surface = plan_surface(load_config(planned))
    run_job(surface, "loss", show_progress=False)
    with SurfaceFile.open(surface) as done:
        loss = done.maps()["train_loss"]
    assert loss[0, 1] == losses_of(planned, targets[0])["train_loss"]
    assert loss[1, 0] == losses_of(planned, targets[1])["train_loss"]
