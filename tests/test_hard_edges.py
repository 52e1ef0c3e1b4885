"""Hard edges: absurd numbers, file-system trouble and empty results, each refused with one
line that names the field or file, exit status 2, no traceback, and not one byte on disk
changed (every file and folder under the test's folder is hashed before and after)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import h5py
import pytest
import yaml

from landscape.cli import main
from landscape.config import load_config
from landscape.plan import plan_surface


def tree(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder`` with the sha256 of its bytes (None for a folder)."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        )
        for path in sorted(folder.rglob("*"))
    }


def fails_cleanly(capsys, folder: Path, argv: list[str], *fragments: str) -> str:
    """``landscape argv`` exits 2 with one ``error:`` line holding every fragment, and
    leaves ``folder`` exactly as it was; returns the line."""
    capsys.readouterr()
    before = tree(folder)
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    message = captured.err.strip()
    assert message.startswith("error: ") and "\n" not in message, captured.err
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in message, message
    assert tree(folder) == before, "a failed command changed the disk"
    return message


@contextmanager
def read_only(folder: Path):
    """``folder`` made read-only: a read-only bind mount as root (root ignores modes),
    mode 555 otherwise."""
    if os.getuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", folder, folder]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 200 kB file system (tmpfs) that fills up, as root; skipped otherwise."""
    folder = tmp_path / "tiny_disk"
    folder.mkdir()
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", folder]
    if subprocess.run(mounted).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", folder], check=True)


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 512):
                pass
        except OSError:
            pass


TRAIN = ["--set", "train.checkpoint_dir=checkpoints", "--set", "train.epochs=2"]

# --set overrides of the test experiment that `plan` must refuse, and what the line says.
BAD_SETTINGS = {
    "nan bound": (["grid.x.min=.nan"], ["grid.x.min: must be a finite number (got nan)"]),
    "inf bound (YAML 1.1 string)": (["grid.y.max=inf"], ["grid.y.max: must be a finite", "'inf'"]),
    "bound beyond float": (["grid.x.max=1e400"], ["grid.x.max: must be a finite"]),
    # Before: planned and run, most points NaN yet marked done.
    "huge bounds": (
        ["grid.x.min=-1e300", "grid.x.max=1e300"],
        ["grid.x.min: -1e+300 is beyond +-1e+06", "choose bounds like -1 to 1"],
    ),
    "max beyond the weights' scale": (["grid.y.max=2e6"], ["grid.y.max: 2000000.0 is beyond"]),
    "points collapse": (
        ["grid.x.min=1", "grid.x.max=1.000000000000001", "grid.x.num=100"],
        ["grid.x: 100 points from 1.0 to 1.000000000000001 are not distinct in float64"],
    ),
    "axis too long": (["grid.x.num=1000000000000"], ["grid.x.num: 1000000000000 points"]),
    "grid too large": (
        ["grid.x.num=5000", "grid.y.num=5000"],
        ["grid.x.num x grid.y.num: 5000 x 5000 = 25,000,000 points"],
    ),
    "shard size beyond int64": (
        ["grid.shard_size=100000000000000000000"],
        ["grid.shard_size: 100000000000000000000 does not fit in a 64-bit integer"],
    ),
    "seed beyond int64": (["directions.seed=-9223372036854775809"], ["directions.seed"]),
    "nan tolerance": (["hessian.tolerance=.nan"], ["hessian.tolerance: must be a finite"]),
    "inf trace step": (["trace.step=.inf"], ["trace.step: must be a finite"]),
    "nan learning rate": (TRAIN[1::2] + ["train.lr=nan"], ["train.lr: must be a finite"]),
    "inf weight decay": (TRAIN[1::2] + ["train.weight_decay=.inf"], ["train.weight_decay"]),
    "nan momentum": (TRAIN[1::2] + ["train.momentum=.nan"], ["train.momentum: must be a finite"]),
    "momentum out of range": (TRAIN[1::2] + ["train.momentum=1.5"], ["train.momentum: must be in"]),
    "negative weight decay": (TRAIN[1::2] + ["train.weight_decay=-1"], ["train.weight_decay"]),
    "nesterov without momentum": (
        TRAIN[1::2] + ["train.momentum=0", "train.nesterov=true"],
        ["train.nesterov: needs optimizer sgd with momentum > 0"],
    ),
    "value not YAML": (["grid.x.num=[1"], ["--set 'grid.x.num=[1': the value is not YAML"]),
    "into a list": (["maps.first=1"], ["--set 'maps.first=1': maps is not a section"]),
    "into a number": (["grid.x.num.deep=1"], ["num is not a section"]),
    "empty key part": (["grid..num=1"], ["--set 'grid..num=1': expected key.path=value"]),
    "no key": (["=1"], ["expected key.path=value"]),
}


@pytest.mark.parametrize("settings, fragments", BAD_SETTINGS.values(), ids=BAD_SETTINGS)
def test_absurd_settings_are_refused_by_name(experiment, tmp_path, capsys, settings, fragments):
    overrides = [word for setting in settings for word in ("--set", setting)]
    fails_cleanly(capsys, tmp_path, ["plan", experiment(), *overrides], *fragments)


CONFIG_FILES = {
    "binary": (bytes(range(256)) * 4, "not a text file (byte 128 is not UTF-8)"),
    "latin-1": ("grid: {x: {num: 5}}  # \xe9t\xe9\n".encode("latin-1"), "not a text file"),
    "nul bytes": (b"model:\0\0\n", "not valid YAML"),
    "empty": (b"", "expected a mapping of fields at the top level"),
    "a list": (b"- 1\n- 2\n", "expected a mapping of fields at the top level"),
    "python tag": (b"model: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
}


@pytest.mark.parametrize("contents, fragment", CONFIG_FILES.values(), ids=CONFIG_FILES)
@pytest.mark.parametrize("command", ["plan", "train"])
def test_config_file_that_is_not_a_yaml_mapping_is_refused(
    tmp_path, capsys, command, contents, fragment
):
    config = tmp_path / "bad.yaml"
    config.write_bytes(contents)
    fails_cleanly(capsys, tmp_path, [command, config], f"{config}: {fragment}")


def test_config_that_is_a_folder_is_refused(tmp_path, capsys):
    fails_cleanly(capsys, tmp_path, ["plan", tmp_path], f"{tmp_path}: cannot read config")


def output(path: Path | str) -> list[str]:
    return ["--set", f"output={path}"]


def test_output_whose_parent_is_a_file_or_that_is_a_folder(experiment, tmp_path, capsys):
    config = experiment()
    (tmp_path / "notes.txt").write_text("a file\n")
    (tmp_path / "results").mkdir()
    for target in (tmp_path / "notes.txt/x.h5", tmp_path / "notes.txt/a/b/x.h5"):
        fails_cleanly(
            capsys,
            tmp_path,
            ["plan", config, *output(target)],
            f"output: cannot create {target}: {tmp_path / 'notes.txt'} is a file, not a folder",
        )
    fails_cleanly(
        capsys,
        tmp_path,
        ["plan", config, *output(tmp_path / "results")],
        f"output: {tmp_path / 'results'} is a folder; name a file",
    )


def test_read_only_output_folders_are_refused_before_any_work(experiment, tmp_path, capsys):
    config = experiment()
    surface = plan_surface(load_config(config))
    assert main(["run", str(surface), "--no-progress"]) == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        fails_cleanly(capsys, tmp_path, ["plan", config, *output(locked / "sub/x.h5")], "read-only")
        fails_cleanly(capsys, tmp_path, ["plot", surface, "--out", locked / "figures"], "--out")
        fails_cleanly(
            capsys,
            tmp_path,
            ["train", config, *TRAIN[:1], f"train.checkpoint_dir={locked / 'ckpt'}"],
            f"train.checkpoint_dir: cannot write {locked / 'ckpt'}: {locked} is read-only",
        )


def test_part_files_into_a_read_only_folder_are_refused_before_any_point(
    experiment, tmp_path, capsys
):
    """An array task reads the surface file and writes part files beside it."""
    folder = tmp_path / "shared"
    folder.mkdir()
    surface = plan_surface(load_config(experiment(output=str(folder / "exp.h5"))))
    with read_only(folder):
        fails_cleanly(
            capsys,
            tmp_path,
            ["run", surface, "--task-index", "0", "--num-tasks", "2", "--no-progress"],
            f"{folder} is read-only",
        )


def test_plot_out_that_names_a_file_is_refused(experiment, tmp_path, capsys):
    surface = plan_surface(load_config(experiment()))
    assert main(["run", str(surface), "--no-progress"]) == 0
    (tmp_path / "figure.png").write_bytes(b"not a folder")
    fails_cleanly(
        capsys,
        tmp_path,
        ["plot", surface, "--out", tmp_path / "figure.png"],
        f"--out: {tmp_path / 'figure.png'} is a file, not a folder",
    )


def test_plot_of_a_surface_with_no_finished_point_makes_nothing(experiment, tmp_path, capsys):
    surface = plan_surface(load_config(experiment()))
    fails_cleanly(
        capsys,
        tmp_path,
        ["plot", surface],
        "nothing to draw, no point has a value yet (points done: loss 0 of 20)",
        f"`landscape run {surface}`",
    )


def broken_files(folder: Path, surface: Path) -> dict[str, Path]:
    """An empty file, a surface file cut in half, and an HDF5 file with a surface file's
    attributes but none of its groups."""
    empty = folder / "empty.h5"
    empty.write_bytes(b"")
    truncated = folder / "truncated.h5"
    truncated.write_bytes(surface.read_bytes()[: surface.stat().st_size // 2])
    hollow = folder / "hollow.h5"
    with h5py.File(surface, "r") as source, h5py.File(hollow, "w") as target:
        target.attrs.update(source.attrs)
    return {"empty": empty, "truncated": truncated, "hollow": hollow}


BROKEN = {
    "empty": "not an HDF5 file (0 bytes, no HDF5 signature)",
    "truncated": "cannot open as HDF5",
    "hollow": "not a complete surface file (no grid/x, directions/x, done)",
}


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("command", ["run", "hessian", "plot", "status", "reduce", "trace"])
def test_broken_surface_files_are_named_and_left_as_they_are(
    experiment, tmp_path, capsys, kind, command
):
    """Before: `run` on an empty file made it an HDF5 file (HDF5 formats an empty file it
    opens for writing), and plot left an empty figures folder."""
    surface = plan_surface(load_config(experiment()))
    broken = broken_files(tmp_path, surface)[kind]
    fails_cleanly(capsys, tmp_path, [command, broken], str(broken), BROKEN[kind])


def test_plan_on_a_full_disk_leaves_nothing(experiment, tmp_path, tiny_disk, capsys):
    """Before: a 387-line HDF5 traceback, a .tmp left behind, and a segfault at exit."""
    config = experiment(model={"name": "mlp", "kwargs": {"hidden": [2000]}})  # ~290 kB file
    target = tiny_disk / "sub" / "exp.h5"
    fails_cleanly(
        capsys,
        tmp_path,
        ["plan", config, *output(target)],
        f"output: cannot write {target} (No space left on device)",
    )
    assert list(tiny_disk.iterdir()) == []


def test_train_on_a_full_disk_leaves_no_partial_checkpoint(experiment, tmp_path, tiny_disk, capsys):
    config = experiment(model={"name": "mlp", "kwargs": {"hidden": [3000]}})  # ~220 kB each
    fails_cleanly(
        capsys,
        tmp_path,
        ["train", config, *TRAIN[:1], f"train.checkpoint_dir={tiny_disk / 'ckpt'}"],
        f"train.checkpoint_dir: cannot write {tiny_disk / 'ckpt' / 'epoch_000.pt'} "
        "(No space left on device)",
    )
    assert list(tiny_disk.iterdir()) == []


def test_part_file_on_a_full_disk_leaves_no_temporary_file(experiment, tmp_path, tiny_disk, capsys):
    surface = plan_surface(load_config(experiment(output=str(tiny_disk / "exp.h5"))))
    fill(tiny_disk)
    fails_cleanly(
        capsys,
        tmp_path,
        ["run", surface, "--task-index", "0", "--num-tasks", "1", "--no-progress"],
        f"{surface}: cannot write {surface}.parts/loss-",
        "(No space left on device)",
    )
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["exp.h5", "filler"]


def test_plot_on_a_full_disk_leaves_no_figures_folder(experiment, tmp_path, tiny_disk, capsys):
    surface = plan_surface(load_config(experiment()))
    assert main(["run", str(surface), "--no-progress"]) == 0
    fill(tiny_disk)
    fails_cleanly(
        capsys,
        tmp_path,
        ["plot", surface, "--out", tiny_disk / "figures"],
        f"--out: cannot write {tiny_disk / 'figures'}/exp_train_loss_contour.png",
        "(No space left on device)",
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_that_diverges_stops_before_saving_a_nan_checkpoint(experiment, capsys, dtype):
    config = experiment(evaluation={"dtype": dtype})
    settings = yaml.safe_load(config.read_text())
    settings["train"] = {
        "checkpoint_dir": str(config.parent / "checkpoints"),
        "lr": 1e30,
        "epochs": 5,
        "batch_size": 16,
    }
    config.write_text(yaml.safe_dump(settings))
    assert main(["train", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    found = re.fullmatch(
        r"error: train\.lr: the training loss is (nan|inf) after epoch (\d+) at learning rate "
        r"\S+ \(diverged\); lower train\.lr",
        message,
    )
    assert found, message
    last = int(found[2])
    saved = sorted(p.name for p in (config.parent / "checkpoints").iterdir())
    assert saved == [f"epoch_{epoch:03d}.pt" for epoch in range(last)]


def test_surface_planned_with_a_config_now_refused_is_named(experiment, tmp_path, capsys):
    """A file planned before NaN bounds were refused opens with one line naming it."""
    surface = plan_surface(load_config(experiment()))
    with h5py.File(surface, "r+") as handle:
        stored = yaml.safe_load(handle.attrs["config"])
        stored["grid"]["x"]["min"] = float("nan")
        handle.attrs["config"] = yaml.safe_dump(stored)
    for command in ("status", "plot", "run"):
        fails_cleanly(
            capsys,
            tmp_path,
            [command, surface],
            f"{surface}: its stored config is no longer valid (grid.x.min: must be a finite",
        )
