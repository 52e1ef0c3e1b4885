"""SIGINT and SIGTERM stop a command with one line (what was saved, how to go on), exit status
128 + signal, no traceback and nothing half-written; a resumed run then gives the maps of an
uninterrupted one bit for bit."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE, GRID, MPI_ENV, MPIEXEC, gated, wait_at_gate, wait_for_lock

from landscape import atomic, workers
from landscape.cli import main
from landscape.config import load_config
from landscape.errors import Interrupted, UserError
from landscape.parts import PartWriter, parts_folder, points_in_parts
from landscape.plan import plan_surface
from landscape.reduce import reduce
from landscape.store import SurfaceFile
from landscape.workers import evaluate_shards, run_job

# The interrupted runs wait for their signal half-way through their second shard: both
# writers save each point evaluated (the interrupt commits the claim's finished calls).
SHARD = GRID["grid"]["shard_size"]
EVALUATED = SHARD + 2
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # configure_logging's lines


def saved_so_far(surface: Path) -> int:
    """Points done in the file or waiting in part files, read beside the running job."""
    try:
        with SurfaceFile.open(surface) as reader:
            done = reader.done("loss").reshape(-1)
            done[points_in_parts(reader, "loss")] = True
    except Exception:  # caught mid-write or mid-rename: look again
        return 0
    return int(done.sum())


def interrupt_at_gate(
    command: list[str], gate: Path, number: int, processes: int = 1, **popen
) -> tuple[int, list[str]]:
    """Start ``command`` (made by ``gated``), send it signal ``number`` once its
    ``processes`` wait at ``gate``, and return its exit status and standard error lines."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, **popen)
    try:
        wait_at_gate(gate, process, processes)
    except AssertionError:
        process.kill()
        raise AssertionError(process.communicate()[1]) from None
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.splitlines()


def uninterrupted(experiment, dtype: dict) -> dict[str, np.ndarray]:
    reference = plan_surface(load_config(experiment(name="reference", evaluation=dtype, **GRID)))
    run_job(reference, "loss", show_progress=False)
    with SurfaceFile.open(reference) as surface:
        return surface.maps()


@pytest.mark.parametrize(
    "number, writer, dtype",
    [
        (signal.SIGINT, "serial", "float32"),
        (signal.SIGINT, "serial", "float64"),
        (signal.SIGTERM, "serial", "float64"),
        (signal.SIGTERM, "parts", "float32"),
    ],
)
def test_interrupted_run_says_what_it_saved_and_resumes_bit_for_bit(
    experiment, number, writer, dtype
):
    """Before: SIGINT printed a 30-line KeyboardInterrupt traceback; SIGTERM ended the
    process silently, losing the points of its unflushed shard."""
    dtype = {"dtype": dtype}
    expected = uninterrupted(experiment, dtype)
    surface = plan_surface(load_config(experiment(name="interrupted", evaluation=dtype, **GRID)))
    task = ["--task-index", "0", "--num-tasks", "1"] if writer == "parts" else []
    gate = surface.with_suffix(".gate")  # never opened: the signal ends the wait
    command = gated(gate, EVALUATED, "run", str(surface), "--no-progress", *task)
    status, lines = interrupt_at_gate(command, gate, number)

    assert status == 128 + number
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    said = [line for line in lines if not LOG_LINE.match(line)]
    assert len(said) == 1, said
    found = re.fullmatch(
        rf"interrupted; (\d+) of 63 loss points saved in {surface}; resume with "
        rf"`landscape run {surface} --no-progress{' --task-index 0 --num-tasks 1' * bool(task)}`",
        said[0],
    )
    assert found, said[0]
    saved = int(found[1])
    assert saved == EVALUATED == saved_so_far(surface)  # part files keep a half shard too
    leftovers = list(surface.parent.glob("*.tmp")) + list(parts_folder(surface).glob("*.tmp"))
    assert leftovers == []

    run_job(surface, "loss", show_progress=False)  # resume (merges the parts first)
    with SurfaceFile.open(surface) as resumed:
        assert resumed.done("loss").all()
        for name, values in expected.items():
            np.testing.assert_array_equal(resumed.maps()[name], values, err_msg=name)


def test_interrupted_plan_leaves_no_file_and_no_temporary(experiment, monkeypatch, capsys):
    """SIGTERM while the surface file is being written (simulated at its fsync)."""
    config = experiment()
    output = config.parent / "exp.h5"

    def interrupted(descriptor):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["plan", str(config)]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler  # main leaves the handlers it found
    assert capsys.readouterr().err.strip() == (
        f"interrupted; nothing half-written; run `landscape plan {config}` again"
    )
    assert not output.exists() and list(config.parent.glob("*.tmp")) == []


def test_interrupted_training_keeps_whole_checkpoints_only(experiment, monkeypatch, capsys):
    """Ctrl-C while epoch 2's checkpoint is written: epochs 0 and 1 stay, no .tmp."""
    config = experiment()
    folder = config.parent / "checkpoints"
    writes = []

    def fsync_until_epoch_2(descriptor):  # each checkpoint: its file, then its folder
        writes.append(descriptor)
        if len(writes) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", fsync_until_epoch_2)
    argv = ["train", str(config), "--set", f"train.checkpoint_dir={folder}"]
    assert main([*argv, "--set", "train.epochs=5"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; checkpoints up to epoch 1 saved in {folder} (training starts over from "
        f"epoch 0); run `landscape {' '.join(argv)} --set train.epochs=5` again"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000.pt", "epoch_001.pt"]


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec: `make install` builds it")
def test_interrupted_mpi_run_stops_every_rank_and_resumes_bit_for_bit(experiment):
    """mpiexec passes the signal on to every rank: each says one line and the job stops
    at once (a rank cannot close a parallel file alone), without a traceback."""
    expected = uninterrupted(experiment, {"dtype": "float64"})
    surface = plan_surface(load_config(experiment(name="interrupted", **GRID)))
    gate = surface.with_suffix(".gate")
    command = [MPIEXEC, "--oversubscribe", "-n", "2"]
    command += gated(gate, EVALUATED, "run", str(surface), "--no-progress")
    status, lines = interrupt_at_gate(command, gate, signal.SIGTERM, processes=2, env=MPI_ENV)

    assert status != 0
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    said = [line for line in lines if re.match(r"rank \d+ of \d+: ", line)]
    assert 1 <= len(said) <= 2, lines
    for line in said:
        assert re.fullmatch(
            rf"rank [01] of 2: interrupted; finished shards are saved; resume with "
            rf"`landscape run {surface} --no-progress`",
            line,
        ), line
    assert len({line.split(":")[0] for line in said}) == len(said)  # one line per rank

    wait_for_lock(surface)  # an aborted rank may outlive mpiexec by a moment
    run_job(surface, "loss", show_progress=False)
    with SurfaceFile.open(surface) as resumed:
        for name, values in expected.items():
            np.testing.assert_array_equal(resumed.maps()[name], values, err_msg=name)


class Shifted:
    """A loss evaluator of 3 points per call whose every map is the point number + 0.25;
    ``error`` stops its third call (after 6 points), if given."""

    items_per_call = 3

    def __init__(self, maps: list[str], error: type[BaseException] | None = None):
        self.maps, self.error, self.calls = maps, error, 0

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        if self.error is not None and self.calls == 2:
            raise self.error("stopped")
        self.calls += 1
        return {name: items + 0.25 for name in self.maps}


def one_shard_surface(experiment) -> Path:
    """A planned surface of 20 points in one shard: one claim."""
    return plan_surface(load_config(experiment(grid={**BASE["grid"], "shard_size": 20})))


def assert_saved(path: Path, count: int) -> None:
    """Points 0 to count - 1 are done with their values, and no other point."""
    with SurfaceFile.open(path) as surface:
        assert np.flatnonzero(surface.done("loss")).tolist() == list(range(count))
        maps = surface.maps()
        for name in surface.job_maps("loss"):
            saved = maps[name].reshape(-1)[:count]
            np.testing.assert_array_equal(saved, np.arange(count) + 0.25, err_msg=name)


@pytest.mark.parametrize("writer", ["serial", "parts"])
@pytest.mark.parametrize("error", [RuntimeError, UserError])
def test_a_claim_stopped_by_an_error_keeps_the_points_evaluated_before_it(
    experiment, writer, error
):
    """A streamed dataset's UserError or CUDA's out-of-memory RuntimeError at the third
    call of a claim: the two calls before it are in the file, and the error goes on."""
    path = one_shard_surface(experiment)
    with SurfaceFile.open(path, "r+" if writer == "serial" else "r") as surface:
        point_writer = surface if writer == "serial" else PartWriter(path, surface.plan_id)
        evaluator = Shifted(surface.job_maps("loss"), error)
        with pytest.raises(error, match="stopped"):
            evaluate_shards("loss", evaluator, [np.arange(20)], point_writer)
    assert reduce(path) == (6 if writer == "parts" else 0)
    assert_saved(path, 6)


def test_an_interrupt_just_after_the_hand_off_leaves_a_part_that_merges(experiment, monkeypatch):
    """Ctrl-C right after the part writer took the first call's points: the interrupt's
    own write must not hand them over again (a part with a point twice never merged)."""
    path = one_shard_surface(experiment)
    monkeypatch.setattr(workers, "WRITE_INTERVAL_SECONDS", 0.0)  # written after each call
    keep = PartWriter.write_points

    def interrupted_once(writer, *args):
        keep(writer, *args)
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    interrupted = []
    monkeypatch.setattr(PartWriter, "write_points", interrupted_once)
    with SurfaceFile.open(path) as surface:
        evaluator = Shifted(surface.job_maps("loss"))
        with pytest.raises(KeyboardInterrupt):
            evaluate_shards("loss", evaluator, [np.arange(20)], PartWriter(path, surface.plan_id))
    assert reduce(path) == 3
    assert_saved(path, 3)
