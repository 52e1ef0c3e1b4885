"""The numbers themselves: plan, run and hessian through the command line reproduce the
stored reference (tests/data/reference, made by its make_reference.py) bit for bit.

On the torch version and CPU capability the reference was made with, every array (every
map, including lambda_ratio, the residuals, HVP counts and converged flags; the grid;
the directions) must be identical to the bit, NaN where NaN. Elsewhere torch may pick
other kernels that round differently, so the arrays are compared to a relative tolerance
of the run's dtype instead; every failure message says which of the two modes was used.
A refactoring changes no number: if this fails, the change is a numeric one. Regenerate
the reference only for a deliberate one (see make_reference.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
# Off the reference's torch and CPU capability: the relative tolerance of each run's dtype.
RTOL = {"float32": 1e-5, "float64": 1e-12}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_reference", REFERENCE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_reference = load_generator()
RECORD = json.loads((REFERENCE / "reference.json").read_text(encoding="utf-8"))


def comparison_mode() -> tuple[bool, str]:
    """(bit for bit?, the words that say so in every failure message)."""
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    there = (RECORD["torch_version"], RECORD["cpu_capability"])
    if here == there:
        return True, f"bit-for-bit mode (torch {here[0]}, CPU capability {here[1]} as reference)"
    return False, (
        f"tolerance mode (torch {here[0]}, CPU capability {here[1]} here; reference made "
        f"with torch {there[0]}, {there[1]}: other kernels may round differently)"
    )


def test_reference_checkpoint_is_the_one_recorded():
    assert make_reference.checkpoint_sha256() == RECORD["checkpoint_sha256"], (
        f"{REFERENCE / RECORD['checkpoint']} is not the checkpoint the reference was made from"
    )


@pytest.mark.parametrize("name", make_reference.CONFIGS)
def test_surface_matches_reference(name, tmp_path):
    expected = make_reference.load_reference(name)
    actual = make_reference.compute(name, tmp_path)
    bitwise, mode = comparison_mode()
    assert sorted(actual) == sorted(expected), f"{name}: other datasets than the reference's"
    scale = eigenvalue_scale(expected)
    for key, reference in expected.items():
        value = actual[key]
        where = f"{name}.npz {key}, {mode}"
        assert (value.dtype, value.shape) == (reference.dtype, reference.shape), where
        if bitwise:
            np.testing.assert_array_equal(value, reference, err_msg=where)
            # == holds 0.0 and -0.0 equal: the bits of every non-NaN value must match too.
            known = ~np.isnan(reference) if reference.dtype.kind == "f" else ...
            assert value[known].tobytes() == reference[known].tobytes(), f"{where}: bits differ"
        else:
            # Values near zero cannot be held to their own relative tolerance: each array
            # to its largest magnitude, residuals to the eigenvalues they are measured by.
            magnitude = scale if key.endswith("_residual") else np.nanmax(np.abs(reference))
            np.testing.assert_allclose(
                value, reference, rtol=RTOL[name], atol=RTOL[name] * magnitude, err_msg=where
            )


def eigenvalue_scale(arrays: dict[str, np.ndarray]) -> float:
    """max(|lambda_min|, |lambda_max|) over the grid, what the residuals are measured by."""
    ends = [np.abs(arrays[f"maps/lambda_{end}"]) for end in ("min", "max")]
    return float(np.nanmax(ends))
