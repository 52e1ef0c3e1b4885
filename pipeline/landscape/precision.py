"""Contains reduced-precision evaluation: the autocast dtypes, TF32, and the measured
difference of a reduced-precision loss map to float32.

``evaluation.dtype: bfloat16`` (or ``float16``) keeps the parameters and the data in
float32 and runs each loss-map forward pass under ``torch.autocast``: matrix products
and convolutions take their operands rounded to the reduced dtype (unit roundoff
u = 2^-8 for bfloat16's 8 significant bits, 2^-11 for float16's 11) and accumulate in
float32. The outputs are cast to float32 before the loss (:func:`landscape.evaluate.
outputs_of`), so each sample's loss is a float32 one and the set's sum float64.

Curvature (the hessian job, ``landscape trace``, analyses, Hessian directions) never
autocasts: its products run in the parameters' float32, because Lanczos certifies an
eigenvalue to the products' rounding (16 epsilons, :class:`landscape.curvature.
lanczos.Criterion`), which at bfloat16's epsilon (2^-7) would be 12% of the spectral
scale. The surface file says so (``curvature_dtype``).

What the reduced dtype costs is measured once per file, at plan, on the plan's device:
the loss (and accuracy) at the centre (0, 0) and at the grid's far corner, each in the
reduced dtype and in float32, with |L_reduced - L_float32| and its ratio to |L_float32|
(:func:`precision_check`), stored as attributes of the file's ``precision`` group and
shown by
``landscape status``; every rank and every resume reads the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from landscape.errors import UserError, describe

REDUCED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

ESTIMATOR = (
    "full-data mean loss and accuracy at the centre (0, 0) and at the far corner of the "
    "grid, each computed once with the forward pass autocast to {dtype} and once in "
    "float32 (same device, same batches); abs_difference = |reduced - float32|, "
    "rel_difference = |reduced - float32| / |float32| (losses only); one sample of the "
    "rounding error, not a bound"
)


def set_tf32(enabled: bool) -> None:
    """CUDA float32 matrix products and convolutions in TF32 (10 mantissa bits) or in
    IEEE float32, process-wide, as ``evaluation.tf32`` says, both ways: PyTorch's own
    default runs cuDNN convolutions in TF32, which moves float32 maps by ~1e-3 relative
    and puts Hessian products far above the 16-epsilon rounding floor the Lanczos
    criterion assumes. Every rank loads its experiment from the file's config, so all
    ranks compute alike."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


@contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 products inside, whatever :func:`set_tf32` chose outside: for checks
    that compare two ways of computing one function, which TF32's ~1e-3 relative
    rounding would drown."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_autocast(device: torch.device, name: str) -> None:
    """Refuse in one line, naming evaluation.dtype, a reduced dtype this torch cannot
    autocast on ``device``: one small linear layer is run under autocast and must give
    outputs in that dtype."""
    dtype = REDUCED_DTYPES[name]
    layer = torch.nn.Linear(2, 2).to(device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            outputs = layer(torch.ones(1, 2, device=device))
    except Exception as exc:  # torch raises, or warns and disables, by version
        problem = describe(exc)
    else:
        problem = None if outputs.dtype == dtype else f"outputs stay {outputs.dtype}"
    if problem is not None:
        raise UserError(
            f"evaluation.dtype: torch {torch.__version__} cannot autocast to {name} on "
            f"{device.type} ({problem}); use float32, or bfloat16 / run on a GPU"
        )


def check_points(grid) -> np.ndarray:
    """The two points measured: the centre (0, 0) and the grid's far corner (its last x
    and, in 2D, its last y)."""
    corner = [grid.x[-1]] + ([] if grid.y is None else [grid.y[-1]])
    return np.array([[0.0] * len(corner), corner], np.float64)


def precision_check(experiment, plane, grid, maps: list[str]) -> dict:
    """The attributes of the ``precision`` group of a surface file whose evaluation.dtype
    is reduced: ``points`` (centre, corner), per loss or accuracy map ``<map>_reduced``,
    ``<map>_float32``, ``<map>_abs_difference`` (and ``<map>_rel_difference`` for a
    loss), each of shape (2,): centre, corner (:data:`ESTIMATOR`), and what they are.
    The float32 passes run in IEEE float32 even where evaluation.tf32 is on (TF32 is
    itself a reduced precision). The model is moved along ``plane`` (a
    :class:`landscape.parameters.DirectionPlane`) and back, whatever happens."""
    from landscape.evaluate import evaluate  # evaluate imports nothing of this module's

    points = check_points(grid)
    batch_size = experiment.config.evaluation.batch_size
    splits = [split for split in ("train", "test") if any(m.startswith(split) for m in maps)]
    found = {}
    tf32 = experiment.device.type == "cuda" and experiment.config.evaluation.tf32
    try:
        for dtype, autocast in (("reduced", experiment.autocast), ("float32", None)):
            set_tf32(tf32 and autocast is not None)
            for point in points:
                plane.move_to(*point)
                for split in splits:
                    loss, accuracy = evaluate(
                        experiment.forward,
                        experiment.data.split(split),
                        batch_size,
                        experiment.objective,
                        autocast,
                    )
                    found.setdefault(f"{split}_loss_{dtype}", []).append(loss)
                    found.setdefault(f"{split}_acc_{dtype}", []).append(accuracy)
    finally:
        plane.parameters.reset()
        if experiment.device.type == "cuda":
            set_tf32(tf32)
    attrs = {"points": points}
    for name in maps:
        if not name.endswith(("_loss", "_acc")):
            continue
        reduced = np.array(found[f"{name}_reduced"])
        exact = np.array(found[f"{name}_float32"])
        attrs.update(
            {
                f"{name}_reduced": reduced,
                f"{name}_float32": exact,
                f"{name}_abs_difference": np.abs(reduced - exact),
            }
        )
        if name.endswith("_loss"):
            attrs[f"{name}_rel_difference"] = np.abs(reduced - exact) / np.abs(exact)
    name = experiment.config.evaluation.dtype
    return {
        **attrs,
        "dtype": name,
        "estimator": ESTIMATOR.format(dtype=name),
        "device": str(experiment.device),
        "curvature_dtype": "float32",
    }
