"""The bit-for-bit reference of the numbers this code computes, and how to remake it.

What it does: copies the inputs of this folder (``float32.yaml``, ``float64.yaml`` and
the checkpoint ``model.pt`` they name by relative path) into a scratch folder and runs,
there, through the command line (``python -m CLI_MODULE``, one process per command, one
rank, ``--no-progress``)::

    plan <config>.yaml;  run out/<config>.h5;  hessian out/<config>.h5

for each config. Every dataset of ``/maps`` (the asked maps, lambda_ratio, the Hessian
residuals, HVP counts and converged flags), ``/grid/x``, ``/grid/y`` and every
``/directions/x|y/<parameter>`` of the surface file is then saved, under its HDF5 path,
in ``<config>.npz``; ``reference.json`` records the checkpoint's sha256 and the torch
version and CPU capability (the kernels torch chose) the numbers were made with.

``tests/test_reference.py`` runs the same commands with the code under test (through
:func:`compute`) and requires every array to be equal bit for bit on the same torch
and CPU capability, or to a relative tolerance elsewhere.

When to run it: ONLY to regenerate the reference after a deliberate change of the
numbers (a new default, a fixed bug in a map), never to make a failing test pass after
a refactoring, which must change no number. The commit that regenerates it says which
change moved which numbers, and why that is right. From the repository root::

    python tests/data/reference/make_reference.py            # the .npz files and reference.json
    python tests/data/reference/make_reference.py --train    # model.pt too, first (2 epochs
                                                             # of train.yaml; rarely wanted)

The configs pin ``evaluation.device: cpu`` and ``evaluation.threads: 1``: a GPU, or a
thread count that splits the reductions differently, would give other roundings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

# The command line under test, run as ``python -m CLI_MODULE``: the one name to change
# when the package is renamed.
CLI_MODULE = "landscape.cli"

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[2]
CHECKPOINT = "model.pt"
# Each reference run: its name (of config, surface file and .npz) and its arrays' dtype
# of computation, which sets the relative tolerance off the reference machine.
CONFIGS = ("float32", "float64")
INPUTS = (*(f"{name}.yaml" for name in CONFIGS), CHECKPOINT)
REFERENCE_JSON = HERE / "reference.json"
# The groups of a surface file whose every dataset is stored and compared: what the
# planner (grid, directions) and the workers (maps) compute.
STORED_GROUPS = ("maps", "grid", "directions")
# The commands that fill the surface file after plan: the loss job, then the hessian job.
VERBS = ("run", "hessian")


def landscape(commands: list[list[str]], cwd: Path) -> None:
    """Run the ``landscape`` commands one after the other in one process started in ``cwd``
    (``CLI_MODULE``'s ``main``, as the command runs it: the package this interpreter
    imports, the checkout's in editable mode); fail with its output at the first failure.
    One process instead of one per command saves a start-up of torch each."""
    script = (
        f"import sys\nfrom {CLI_MODULE} import main\nfor args in {commands!r}:\n"
        "    status = main(args)\n    if status:\n        sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise RuntimeError(
            f"{commands} failed (status {done.returncode}) in {cwd}:\n{done.stdout}{done.stderr}"
        )


def compute(name: str, folder: Path) -> dict[str, np.ndarray]:
    """Copy the inputs into ``folder``, plan, run and hessian config ``name`` there, and
    return the arrays of its surface file by HDF5 path (``maps/train_loss``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in INPUTS:
        shutil.copyfile(HERE / item, folder / item)
    surface = f"out/{name}.h5"
    commands = [["plan", f"{name}.yaml"], *([verb, surface, "--no-progress"] for verb in VERBS)]
    landscape(commands, cwd=folder)
    return read_arrays(folder / surface)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every dataset under :data:`STORED_GROUPS` of the surface file at ``path``."""
    arrays = {}
    with h5py.File(path, "r") as handle:
        for group in STORED_GROUPS:

            def keep(name: str, item, group: str = group) -> None:
                if isinstance(item, h5py.Dataset):
                    arrays[f"{group}/{name}"] = item[()]

            handle[group].visititems(keep)
    return arrays


def load_reference(name: str) -> dict[str, np.ndarray]:
    """The stored arrays of reference run ``name``."""
    with np.load(HERE / f"{name}.npz") as stored:
        return {key: stored[key] for key in stored.files}


def environment() -> dict:
    """What decides the roundings: the checkpoint's bytes, torch and the CPU kernels."""
    import torch

    return {
        "checkpoint": CHECKPOINT,
        "checkpoint_sha256": checkpoint_sha256(),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def checkpoint_sha256() -> str:
    return hashlib.sha256((HERE / CHECKPOINT).read_bytes()).hexdigest()


def train_checkpoint(folder: Path) -> None:
    """Train ``train.yaml`` for its 2 epochs in ``folder`` and keep the last epoch as
    ``model.pt`` here."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "train.yaml", folder / "train.yaml")
    landscape([["train", "train.yaml"]], cwd=folder)
    last = sorted((folder / "checkpoints").glob("epoch_*.pt"))[-1]
    shutil.copyfile(last, HERE / CHECKPOINT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="remake model.pt first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.train:
            train_checkpoint(Path(scratch) / "train")
        for name in CONFIGS:
            arrays = compute(name, Path(scratch) / name)
            np.savez_compressed(HERE / f"{name}.npz", **arrays)
            print(f"{name}.npz: {len(arrays)} arrays")
    record = {
        **environment(),
        "generated_with": {
            "commit": git_commit(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
        },
    }
    REFERENCE_JSON.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


def git_commit() -> str:
    """The commit of this checkout (with ``+changes`` if its files differ from it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


if __name__ == "__main__":
    main()
