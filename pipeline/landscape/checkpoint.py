"""Checkpoint files: safe loading, fingerprints, model compatibility, atomic saving.

A checkpoint is either a bare ``state_dict`` or a dict with a ``state_dict`` entry plus
metadata (epoch, losses). Loading uses ``weights_only=True``: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from landscape.atomic import write_file
from landscape.errors import UserError, describe


def load_state_dict(path: str | Path, field: str = "model.checkpoint", mmap: bool = False) -> dict:
    """The model ``state_dict`` stored in ``path``, loaded on the CPU."""
    return load_checkpoint(path, field, mmap)[0]


def load_checkpoint(
    path: str | Path, field: str = "model.checkpoint", mmap: bool = False
) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of ``path``; metadata holds the scalars saved beside the
    weights (epoch, lr, losses), empty for a bare state_dict. ``mmap`` maps the tensors
    instead of reading them, for walking many large checkpoints a slice at a time; the
    caller then checks their values as it walks (reading them here would read them twice).
    Otherwise every floating-point tensor must be finite: a NaN weight makes every map NaN."""
    path = Path(path)
    payload = read_torch_file(path, field, mmap)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{field}: {path} holds no state_dict of tensors; save model.state_dict()")
    if not mmap:
        for name, tensor in state.items():
            check_finite(tensor, f"{field}: {path}", name)
    metadata = {
        key: value
        for key, value in payload.items()
        if state is not payload and key != "state_dict" and isinstance(value, (int, float))
    }
    return state, metadata


# The first bytes of what torch.save writes: a zip archive, or a pickle (protocol >= 2)
# in the legacy format.
TORCH_SIGNATURES = (b"PK\x03\x04", b"\x80")


def read_torch_file(path: Path, field: str, mmap: bool = False):
    """What ``torch.save`` wrote to ``path``, unpickled with ``weights_only=True``: tensors,
    containers and numbers, never code. Every way the file can be unreadable (a folder,
    0 bytes, truncated, foreign objects) is one line naming ``field``; torch's own advice
    for foreign objects (to load them with ``weights_only=False``, running whatever code
    they hold) is never passed on."""
    if path.is_dir():
        raise UserError(f"{field}: {path} is a folder, not a file; name the checkpoint inside it")
    if not path.is_file():
        raise UserError(f"{field}: file {path} does not exist; train first or fix the path")
    if path.stat().st_size == 0:
        raise UserError(f"{field}: {path} is empty (0 bytes); the save was cut short, re-save it")
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start.startswith(TORCH_SIGNATURES):
        raise UserError(
            f"{field}: {path} is not a torch checkpoint (it starts {start!r}, not a zip archive "
            "or pickle); name a file written by torch.save"
        )
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol before refusing it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        asked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UserError(
            f"{field}: {path} holds objects other than tensors"
            + (f" (it asks for {asked.group(1)})" if asked else "")
            + ", and this tool never unpickles code from a file; re-save only the tensors "
            "(a model's with torch.save(model.state_dict(), path))"
        ) from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        reason = describe(exc).split(". ")[0]  # torch's first sentence; the rest is advice
        raise UserError(
            f"{field}: {path} is not a readable torch checkpoint ({reason}); "
            "the file is corrupt or truncated, re-save it"
        ) from None


DIVERGED = "the run that wrote it diverged, take an earlier checkpoint"


def check_finite(tensor: torch.Tensor, where: str, name: str, advice: str = DIVERGED) -> None:
    """Fail naming the tensor unless every value of a floating-point ``tensor`` is finite
    (its float64 sum is finite exactly then: one reduction for a clean tensor)."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum(dtype=torch.float64)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise UserError(
            f"{where}: {name} holds NaN or inf ({bad} of {tensor.numel()} values); {advice}"
        )


def check_compatible(
    model: nn.Module, state: dict, path: str | Path, field: str = "model.checkpoint"
) -> None:
    """Fail with the list of missing, unexpected and mis-shaped keys if they don't match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise UserError(
            f"{field}: {path} does not fit model ({'; '.join(problems)}); "
            "check model.name and model.kwargs against the checkpoint"
        )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, **metadata) -> None:
    """Write ``{"state_dict": ..., **metadata}`` atomically (temp file, then rename).

    Serialized in memory first: torch.save writing to a full disk fails with an internal
    "unexpected pos" error and leaves its file behind; :func:`write_file` says "No space
    left on device" and leaves nothing.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    image = io.BytesIO()
    torch.save({"state_dict": state, **metadata}, image)
    write_file(path, image.getbuffer(), "train.checkpoint_dir")


def verify_fingerprint(
    path: str | Path, expected_sha256: str, surface: str | Path, field: str = "model.checkpoint"
) -> None:
    """Fail unless the checkpoint still has the bytes ``surface`` was planned with;
    ``field``: the config field that names it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{field}: {path} (planned in {surface}) is missing; restore it")
    if file_sha256(path) != expected_sha256:
        raise UserError(
            f"{field}: {path} changed since {surface} was planned (sha256 differs); "
            "restore it or plan a new file"
        )
