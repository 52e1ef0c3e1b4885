"""Checkpoint files: safe loading, fingerprints, model compatibility, atomic saving.

A checkpoint is a bare ``state_dict``, or a dict holding one beside metadata (epoch,
losses, an optimizer's state) under the entry the training script chose: ``state_dict``
(this tool, PyTorch Lightning), ``model``, ``net``, ``model_state_dict`` or ``module``,
found automatically, or named by ``model.checkpoint_key``. Wrappers put a prefix before
every key (``module.`` for DataParallel/DDP, ``_orig_mod.`` for torch.compile, ``model.``
for a LightningModule holding the network as ``self.model``): it is stripped when the
keys do not fit the model otherwise, or as ``model.strip_prefix`` says. A ``.safetensors``
file is read with the safetensors package; a torch file with ``weights_only=True``: a
checkpoint never runs code. Its fingerprint is always the file's own bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from landscape.atomic import write_file
from landscape.errors import UserError, describe

if TYPE_CHECKING:
    from landscape.config import ModelConfig

log = logging.getLogger(__name__)

# The entries that hold the weights in the checkpoints people save, tried when
# model.checkpoint_key is not given; exactly one of them may hold a state_dict.
WEIGHT_ENTRIES = ("state_dict", "model", "net", "model_state_dict", "module")
# What wrappers put before every key: DataParallel and DDP, torch.compile, Lightning.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
SAFETENSORS_SUFFIX = ".safetensors"


def load_state_dict(
    path: str | Path,
    expected: Collection[str],
    settings: ModelConfig | None,
    field: str = "model.checkpoint",
    mmap: bool = False,
) -> dict:
    """The model ``state_dict`` stored in ``path``, loaded on the CPU (see
    :func:`load_checkpoint`)."""
    return load_checkpoint(path, expected, settings, field, mmap)[0]


def load_checkpoint(
    path: str | Path,
    expected: Collection[str],
    settings: ModelConfig | None,
    field: str = "model.checkpoint",
    mmap: bool = False,
) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of ``path``, the one way every checkpoint is read.

    ``expected``: the keys the caller needs (the model's state_dict keys, or the names
    of the parameters it walks); a wrapper's prefix is stripped only when the keys as
    saved lack some of them. ``settings``: the config's model section, whose
    ``checkpoint_key`` and ``strip_prefix`` override the automatic choices (None: both
    automatic). ``field``: the config field naming ``path``, for errors.

    Metadata holds the numbers saved beside the weights (epoch, lr, losses; the header
    metadata of a .safetensors file), empty for a bare state_dict. ``mmap`` maps a torch
    file's tensors instead of reading them, for walking many large checkpoints a slice at
    a time; the caller then checks their values as it walks (reading them here would read
    them twice). Otherwise every floating-point tensor must be finite: a NaN weight makes
    every map NaN.
    """
    path = Path(path)
    key = settings.checkpoint_key if settings is not None else None
    prefix = settings.strip_prefix if settings is not None else None
    if path.suffix == SAFETENSORS_SUFFIX:
        payload, metadata = read_safetensors_file(path, field)
    else:
        payload = read_torch_file(path, field, mmap)
        metadata = {}
    entry, state = weights_entry(payload, key, path, field)
    if entry is not None:
        metadata = {
            name: value
            for name, value in payload.items()
            if name != entry and isinstance(value, (int, float))
        }
    state = fitted_keys(state, expected, prefix, path, field)
    if not mmap:
        for name, tensor in state.items():
            check_finite(tensor, f"{field}: {path}", name)
    return state, metadata


def is_state_dict(value) -> bool:
    """Whether ``value`` is a non-empty dict of tensors keyed by name."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def listed(names: list, limit: int = 8) -> str:
    """``a, b, c, ... (12 in all)``: names for a one-line message."""
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def weights_entry(payload, key: str | None, path: Path, field: str) -> tuple[str | None, dict]:
    """``(entry, state_dict)``: the entry of ``payload`` that holds the weights (None for
    a bare state_dict) and the weights. ``key`` (model.checkpoint_key) names the entry;
    without it the payload itself or the one entry of :data:`WEIGHT_ENTRIES` that is a
    state_dict. Entries of other kinds (an optimizer's state, numbers) are left alone."""
    if not isinstance(payload, dict):
        raise UserError(
            f"{field}: {path} holds a {type(payload).__name__}, not a dict of tensors; "
            "save model.state_dict()"
        )
    entries = listed(list(payload))
    if key is not None:
        if not is_state_dict(payload.get(key)):
            held = "no entry" if key not in payload else "no dict of tensors"
            raise UserError(
                f"model.checkpoint_key: {path} ({field}) has {held} {key!r} (its entries: "
                f"{entries}); name the entry that holds the model's weights"
            )
        return key, payload[key]
    if is_state_dict(payload):
        return None, payload
    found = [name for name in WEIGHT_ENTRIES if is_state_dict(payload.get(name))]
    if len(found) == 1:
        return found[0], payload[found[0]]
    problem = (
        f"holds weights under {' and '.join(found)}"
        if found
        else f"holds no state_dict under {', '.join(WEIGHT_ENTRIES)}"
    )
    raise UserError(
        f"{field}: {path} {problem} (its entries: {entries}); set model.checkpoint_key to "
        "the entry that holds the model's weights"
    )


def fitted_keys(
    state: dict, expected: Collection[str], prefix: str | None, path: Path, field: str
) -> dict:
    """``state`` with its keys as the model names them.

    ``prefix`` (model.strip_prefix) given: the entries whose keys start with it, without
    it. Otherwise ``state`` itself when it has every ``expected`` key, else the entries
    under the shortest chain of :data:`WRAPPER_PREFIXES` (``module._orig_mod.`` for a
    compiled model in DDP) that has them all, said in the log; the entries outside the
    prefix (a LightningModule's loss weights, say) are left out. When no chain fits,
    ``state`` as it is: :func:`check_compatible` then names what is missing.
    """
    if prefix is not None:
        stripped = under_prefix(state, prefix)
        if not stripped:
            raise UserError(
                f"model.strip_prefix: no key of {path} ({field}) starts with {prefix!r} (its "
                f"keys: {listed(list(state))}); fix model.strip_prefix or leave it out"
            )
        return stripped
    if all(name in state for name in expected):
        return state
    chains = sorted({chain for key in state for chain in wrapper_chains(key)}, key=len)
    for chain in chains:
        stripped = under_prefix(state, chain)
        if all(name in stripped for name in expected):
            left_out = len(state) - len(stripped)
            log.info(
                "%s: stripped the prefix %r from the keys of %s to fit the model%s; "
                "model.strip_prefix sets it",
                field,
                chain,
                path,
                f" ({left_out} entries outside it left out)" if left_out else "",
            )
            return stripped
    return state


def wrapper_chains(key: str) -> list[str]:
    """The prefixes of ``key`` made of wrapper prefixes, shortest first:
    ``module._orig_mod.fc.weight`` -> ``module.``, ``module._orig_mod.``."""
    chains, rest = [], key
    while prefix := next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None):
        rest = rest[len(prefix) :]
        chains.append(key[: len(key) - len(rest)])
    return chains


def under_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` whose keys start with ``prefix``, keyed without it."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def read_safetensors_file(path: Path, field: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a .safetensors file: its tensors on the CPU, and the
    numbers of its header's string metadata (``{"epoch": "12"}`` -> ``{"epoch": 12}``).
    The format holds tensors only: there is nothing to unpickle."""
    check_file(path, field)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{field}: {path} is not a readable .safetensors file ({describe(exc)}); "
            "the file is corrupt or truncated, re-save it"
        ) from None
    numbers = {name: parsed(text) for name, text in header.items()}
    return tensors, {name: number for name, number in numbers.items() if number is not None}


def parsed(text: str) -> int | float | None:
    """The number ``text`` spells, else None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


# The first bytes of what torch.save writes: a zip archive, or a pickle (protocol >= 2)
# in the legacy format.
TORCH_SIGNATURES = (b"PK\x03\x04", b"\x80")


def check_file(path: Path, field: str) -> None:
    """Fail in one line naming ``field`` unless ``path`` is a file with bytes in it."""
    if path.is_dir():
        raise UserError(f"{field}: {path} is a folder, not a file; name the checkpoint inside it")
    if not path.is_file():
        raise UserError(f"{field}: file {path} does not exist; train first or fix the path")
    if path.stat().st_size == 0:
        raise UserError(f"{field}: {path} is empty (0 bytes); the save was cut short, re-save it")


def read_torch_file(path: Path, field: str, mmap: bool = False):
    """What ``torch.save`` wrote to ``path``, unpickled with ``weights_only=True``: tensors,
    containers and numbers, never code. Every way the file can be unreadable (a folder,
    0 bytes, truncated, foreign objects) is one line naming ``field``; torch's own advice
    for foreign objects (to load them with ``weights_only=False``, running whatever code
    they hold) is never passed on."""
    check_file(path, field)
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
            problems.append(f"{label}: {listed(keys, 5)}")
    if problems:
        renamed = " (keys under a prefix: set model.strip_prefix)" if missing and unexpected else ""
        raise UserError(
            f"{field}: {path} does not fit model ({'; '.join(problems)}); "
            f"check model.name and model.kwargs against the checkpoint{renamed}"
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
