"""tr(H) from loss values along random directions (Boettcher & Wheeler) and by Hutchinson,
against closed forms and dense Hessians."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import dense_hessian, trained_experiment

from pipeline.config import load_config
from pipeline.experiment import Experiment
from pipeline.plan import plan_surface
from pipeline.status import surface_status
from pipeline.store import SurfaceFile
from pipeline.trace import TraceEstimator, estimate_trace


def test_projection_interval_covers_the_quadratic_trace_for_most_seeds(experiment):
    """Linear model + mse: H = (2 / (N k)) [X 1]^T [X 1] (x) I_k, so tr(H) = (2 / N) ||[X 1]||^2.
    A 95% interval must cover it for at least 90 of 100 seeds (the binomial chance of
    fewer is below 0.1%)."""
    config = load_config(
        experiment(
            model={"name": "linear", "kwargs": {}},
            data={"name": "plugins:regression", "kwargs": {}},
            evaluation={"loss": "mse"},
            maps=["train_loss"],
        )
    )
    exp = Experiment.load(config)
    inputs, _ = exp.data.split("train")
    exact = 2 / len(inputs) * (float((inputs**2).sum()) + len(inputs))
    covered = {"projection": 0, "hutchinson": 0}
    for seed in range(100):
        settings = dataclasses.replace(config.trace, samples=20, seed=seed)
        estimator = TraceEstimator(exp, "all", "forward_over_reverse", settings)
        covered["projection"] += estimator.from_loss_values(20).covers(exact)
        covered["hutchinson"] += estimator.hutchinson(20).covers(exact)
    assert covered["projection"] >= 90 and covered["hutchinson"] >= 90, covered


def test_small_net_trace_lies_in_both_intervals_and_is_stored(experiment):
    """A smooth (tanh) net: with ReLU the loss has kinks, whose delta mass second
    differences see at every step size and autograd's Hessian does not."""
    config = trained_experiment(
        experiment, "tanh_mlp", epochs=20, maps=["train_loss"], trace={"samples": 200}
    )
    surface = plan_surface(load_config(config))
    summary = estimate_trace(surface)

    exp = Experiment.load(load_config(config))
    estimator = TraceEstimator(exp, "all", "forward_over_reverse", load_config(config).trace)
    exact = float(np.trace(dense_hessian(estimator.operator)))
    with SurfaceFile.open(surface) as done:
        samples, attrs = done.group("trace")
    assert (
        attrs["dimension"] == estimator.dimension == sum(p.numel() for p in exp.model.parameters())
    )
    for name in ("projection", "hutchinson"):
        mean, half = attrs[f"{name}_mean"], attrs[f"{name}_half_width"]
        assert abs(mean - exact) <= half, (name, mean, half, exact)
        assert len(samples[name]) == 200 and mean == samples[name].mean()
        assert f"{mean:.6g}" in summary
    assert "tr(H) at the centre: projection" in surface_status(surface)
    # Running it again replaces the group with the same numbers (same seed).
    estimate_trace(surface)
    with SurfaceFile.open(surface) as again:
        np.testing.assert_array_equal(again.group("trace")[0]["projection"], samples["projection"])
