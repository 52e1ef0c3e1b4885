"""``landscape trace``: the two curvature estimates of :mod:`landscape.curvature.trace`
at the centre of a surface file's plan, stored in its ``trace`` group under the labels
that say what each is, and summarized for the terminal."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from landscape.checkpoint import verify_fingerprint
from landscape.config import TraceConfig
from landscape.curvature.trace import TraceEstimate, TraceEstimator
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.hessian import training_hessian
from landscape.locking import surface_lock
from landscape.store import SurfaceFile, existing_surface, rewrite_group

log = logging.getLogger(__name__)

HUTCHINSON_LABEL = "tr(H) by Hutchinson (mean of z^T H z over Rademacher z; autograd HVPs)"


def projection_label(step: float) -> str:
    """What the loss-value estimate is, with its absolute step e."""
    return (
        f"n × mean second difference of the loss at step ε = {step:.3g} (finite-difference "
        "curvature; includes kinks of non-smooth activations)"
    )


def kinks_text(kinks: dict[str, int]) -> str:
    return ", ".join(f"{name} ×{count}" for name, count in kinks.items())


def estimate_trace(path: str | Path, device: str | None = None) -> str:
    """``landscape trace``: both estimates at the centre of a surface file's plan, stored
    in its ``trace`` group (replacing an earlier one); returns a summary to print.

    The estimates need only the checkpoint, so jobs may write the file while they are
    computed; the result is stored under the surface's lock, waiting for a job that
    holds it, into the plan it was computed for.
    """
    path = existing_surface(path)
    with SurfaceFile.open(path) as surface:
        if surface.kind != "surface":
            raise UserError(
                f"{path}: a file of kind {surface.kind}; trace works on surface files (an "
                "analysis stores tr(H) per checkpoint with analysis.quantities: trace)"
            )
        config, plan_id = surface.config, surface.plan_id
        planned_sha = surface.attrs["checkpoint_sha256"]
    verify_fingerprint(config.model.checkpoint, planned_sha, path)
    experiment = Experiment.load(config, device=device, checkpoint_sha256=planned_sha)
    settings, hessian = config.trace, config.hessian
    estimator = TraceEstimator(
        training_hessian(experiment, hessian.parameters, hessian.hvp),
        settings.step,
        settings.confidence,
        settings.seed,
    )
    log.info(
        "%s: curvature over %d parameters (%s) on %s, %d samples each way",
        path,
        estimator.dimension,
        hessian.parameters,
        experiment.device,
        settings.samples,
    )
    if estimator.kinks:
        log.warning(
            "the model has non-smooth operations (%s): the loss-value estimate includes their "
            "kinks at the scale of the step, Hutchinson's tr(H) does not; the two will differ",
            kinks_text(estimator.kinks),
        )
    started = time.perf_counter()
    projection = estimator.from_loss_values(settings.samples)
    middle = time.perf_counter()
    hutchinson = estimator.hutchinson(settings.samples)
    seconds = (middle - started, time.perf_counter() - middle)
    estimates = {"projection": projection, "hutchinson": hutchinson}
    with surface_lock(path, "landscape trace", wait=True):
        with SurfaceFile.open(path) as surface:
            if surface.plan_id != plan_id:
                raise UserError(
                    f"{path}: planned again while trace ran; run `landscape trace {path}` again"
                )
        rewrite_group(
            path,
            "trace",
            {name: estimate.samples for name, estimate in estimates.items()},
            {
                "dimension": estimator.dimension,
                "parameters": hessian.parameters,
                "samples": settings.samples,
                "step": estimator.step,
                "step_fraction": settings.step,
                "confidence": settings.confidence,
                "seconds": seconds,
                "projection_label": projection_label(estimator.step),
                "projection_dtype": "float64",
                "hutchinson_label": HUTCHINSON_LABEL,
                "hutchinson_dtype": str(experiment.dtype).removeprefix("torch."),
                "non_smooth_operations": kinks_text(estimator.kinks),
                **{f"{name}_mean": e.mean for name, e in estimates.items()},
                **{f"{name}_half_width": e.half_width for name, e in estimates.items()},
            },
        )
    hvp_dtype = str(experiment.dtype).removeprefix("torch.")
    return trace_summary(estimator, settings, hvp_dtype, estimates, seconds)


def trace_summary(
    estimator: TraceEstimator,
    settings: TraceConfig,
    hvp_dtype: str,
    estimates: dict[str, TraceEstimate],
    seconds: tuple[float, float],
) -> str:
    dimension, count = estimator.dimension, settings.samples
    projection, hutchinson = estimates["projection"], estimates["hutchinson"]
    lines = [
        f"Curvature at the centre, n = {dimension} parameters "
        f"({settings.confidence:.0%} confidence intervals):",
        f"  {HUTCHINSON_LABEL}",
        f"      {hutchinson.mean:.6g} ± {hutchinson.half_width:.3g}   tr(H)/n = "
        f"{hutchinson.mean / dimension:.4g}; {count} probes ({count} HVPs in {hvp_dtype}, "
        f"{seconds[1]:.1f} s)",
        f"  {projection_label(estimator.step)}",
        f"      {projection.mean:.6g} ± {projection.half_width:.3g}   per parameter "
        f"{projection.mean / dimension:.4g}; ε = {settings.step:g} × ||θ||, {count} random "
        f"unit directions ({2 * count + 1} losses in float64, {seconds[0]:.1f} s)",
    ]
    if estimator.kinks:
        lines.append(
            f"  non-smooth operations ({kinks_text(estimator.kinks)}): the two measure "
            "different things and will differ"
        )
    return "\n".join(lines)
