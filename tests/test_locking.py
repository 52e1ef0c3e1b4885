"""The lock beside a surface file, between real processes: two planners end with one file,
a second writer (serial or mpio) is refused in one line while another writes, array tasks
share the lock but keep writers out; and what HDF5 cannot open is said for what it is."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import GRID, LANDSCAPE, MPI_ENV, MPIEXEC, TESTS, gated, wait_at_gate

from landscape import locking
from landscape.cli import main
from landscape.config import load_config
from landscape.locking import lock_path
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import run_job


def planned(experiment, name: str) -> Path:
    return plan_surface(load_config(experiment(name=name, **GRID)))


def reference_maps(experiment) -> dict[str, np.ndarray]:
    path = planned(experiment, "reference")
    run_job(path, "loss", show_progress=False)
    with SurfaceFile.open(path) as surface:
        return surface.maps()


def assert_complete_with(surface: Path, expected: dict[str, np.ndarray]) -> None:
    with SurfaceFile.open(surface) as result:
        assert result.done("loss").all()
        for name, values in expected.items():
            np.testing.assert_array_equal(result.maps()[name], values, err_msg=name)


def holder(surface: Path) -> dict:
    """Who holds the lock, as recorded in the lock file ({} before anyone wrote it)."""
    try:
        return json.loads(lock_path(surface).read_text())
    except (OSError, ValueError):
        return {}


def held(surface: Path, job: subprocess.Popen, gate: Path, processes: int = 1) -> dict:
    """The lock record of ``job``, started ``gated(gate, 0, ...)``, once its ``processes``
    wait at the gate: it holds its lock and writes nothing until the test opens the gate."""
    wait_at_gate(gate, job, processes)
    return holder(surface)


def refusal(surface: Path, what: str, pid: int, prefix: str = "") -> str:
    """The one line a refused writer prints, as a pattern (any start time)."""
    return (
        f"error: {re.escape(prefix)}{re.escape(str(surface))}: another landscape job "
        f"\\({re.escape(what)}, pid {pid} on host {re.escape(socket.gethostname())}, "
        r"started \S+\) is writing it; wait for it or stop it"
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def landscape(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LANDSCAPE, *args], env=env, capture_output=True, text=True, timeout=300)


def test_two_planners_at_once_make_one_file_which_the_second_verifies(experiment):
    config = experiment(**GRID)
    surface = Path(yaml.safe_load(config.read_text())["output"])
    command = [sys.executable, str(TESTS / "slow_plan.py"), "plan", str(config)]
    planners = [
        subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [planner.communicate(timeout=300) for planner in planners]
    assert [planner.returncode for planner in planners] == [0, 0], outputs
    assert [out for out, _ in outputs] == [f"{surface}\n"] * 2
    created = [line for _, err in outputs for line in err.splitlines() if "created plan" in line]
    assert len(created) == 1, created  # exactly one planner wrote the file ...
    with SurfaceFile.open(surface) as result:  # ... and it is still the one it wrote
        assert created[0].endswith(f"created plan {result.plan_id}")
    second = next(err for _, err in outputs if "created plan" not in err)
    assert f"{surface}: waiting for another landscape job (" in second  # they overlapped
    assert "already planned with this config" in second


def test_serial_run_is_refused_while_an_mpio_run_writes(experiment):
    if MPIEXEC is None:
        pytest.skip("no mpiexec: `make install` builds it")
    expected = reference_maps(experiment)
    surface = planned(experiment, "shared")
    gate = surface.with_suffix(".gate")
    command = [MPIEXEC, "--oversubscribe", "-n", "2"]
    command += gated(gate, 0, "run", str(surface), "--writer", "mpio", "--no-progress")
    mpio = subprocess.Popen(command, env=MPI_ENV, stderr=subprocess.PIPE)
    try:
        lock = held(surface, mpio, gate, processes=2)
        assert lock["what"] == "loss job on 2 MPI ranks"
        rank0 = lock["pid"]
        serial = landscape("run", str(surface))
        gate.touch()
        assert mpio.wait(timeout=300) == 0
    finally:
        mpio.kill()
    assert serial.returncode == 2
    [line] = error_lines(serial.stderr)
    assert re.fullmatch(refusal(surface, "loss job on 2 MPI ranks", rank0), line), line
    assert "one process: cpu" not in serial.stderr  # it never loaded the model
    assert_complete_with(surface, expected)


def test_mpio_run_is_refused_while_a_serial_run_writes(experiment):
    if MPIEXEC is None:
        pytest.skip("no mpiexec: `make install` builds it")
    expected = reference_maps(experiment)
    surface = planned(experiment, "shared")
    gate = surface.with_suffix(".gate")
    serial = subprocess.Popen(gated(gate, 0, "run", str(surface)), stderr=subprocess.PIPE)
    try:
        lock = held(surface, serial, gate)
        assert lock["what"] == "loss job"
        pid = lock["pid"]
        assert pid == serial.pid
        mpio = subprocess.run(
            [MPIEXEC, "--oversubscribe", "-n", "2", *LANDSCAPE, "run", str(surface)],
            env=MPI_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        gate.touch()
        assert serial.wait(timeout=300) == 0
    finally:
        serial.kill()
    assert mpio.returncode == 2
    [line] = error_lines(mpio.stderr)
    pattern = refusal(surface, "loss job", pid, prefix="rank 0 of 2: ")
    assert re.fullmatch(pattern, line), line
    assert_complete_with(surface, expected)


def test_array_tasks_share_the_lock_and_keep_writers_out(experiment):
    expected = reference_maps(experiment)
    surface = planned(experiment, "tasks")
    gate = surface.with_suffix(".gate")
    task = ["run", str(surface), "--num-tasks", "2", "--task-index"]
    first = subprocess.Popen(gated(gate, 0, *task, "0"), stderr=subprocess.PIPE)
    try:
        lock = held(surface, first, gate)
        assert lock["what"] == "loss job, array task 0 of 2"
        pid = lock["pid"]
        second = landscape(*task, "1")  # runs beside the first
        latest = holder(surface)
        writer = landscape("run", str(surface))
        reducer = landscape("reduce", str(surface))
        gate.touch()
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    assert second.returncode == 0, second.stderr
    assert latest["what"] == "loss job, array task 1 of 2" and latest["pid"] != pid
    shared = f"held shared; the latest to take it: {latest['what']}"
    for refused in (writer, reducer):
        assert refused.returncode == 2
        [line] = error_lines(refused.stderr)
        assert re.fullmatch(refusal(surface, shared, latest["pid"]), line), line
    assert main(["reduce", str(surface)]) == 0
    assert_complete_with(surface, expected)


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` (file or folder) read-only inside the block, for root too (immutable)."""
    if os.getuid() == 0:
        made = subprocess.run(["chattr", "+i", path], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"needs chattr +i: {made.stderr.decode().strip()}")
        undo = ["chattr", "-i", path]
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        undo = ["chmod", oct(mode & 0o7777)[2:], path]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_file_and_folder_are_called_read_only(experiment, capsys):
    surface = planned(experiment, "exp")
    with read_only(surface):
        assert main(["run", str(surface)]) == 2
    assert capsys.readouterr().err == (
        f"error: {surface}: read-only (permission denied); fix its permissions or copy it "
        "to a writable folder\n"
    )
    # A read-only folder: no plan (there is no room for the file) ...
    config = experiment(name="elsewhere", **GRID)
    folder = surface.parent / "results"
    folder.mkdir()
    text = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**text, "output": str(folder / "elsewhere.h5")}))
    with read_only(folder):
        assert main(["plan", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: output: cannot write {folder / 'elsewhere.h5'}: {folder} is read-only; choose "
        "a writable folder\n"
    )
    # ... but a planned file whose folder became read-only runs (unlocked, said in the log).
    with read_only(surface.parent):
        assert main(["run", str(surface), "--no-progress"]) == 0
    with SurfaceFile.open(surface) as result:
        assert result.done("loss").all()


def test_empty_file_is_not_an_hdf5_file_and_stays_empty(tmp_path, capsys):
    empty = tmp_path / "empty.h5"
    empty.touch()
    assert main(["run", str(empty)]) == 2
    assert capsys.readouterr().err == (
        f"error: {empty}: not an HDF5 file (0 bytes, no HDF5 signature); name a surface file, "
        "or plan it again\n"
    )
    assert empty.stat().st_size == 0  # HDF5 opened for writing would have made it a file


def test_file_system_without_locks_is_said_once_and_the_run_goes_on(
    experiment, monkeypatch, caplog
):
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(locking.fcntl, "flock", unsupported)
    monkeypatch.setattr(locking, "warned_unlocked", False)
    with caplog.at_level(logging.WARNING):
        surface = planned(experiment, "lustre")  # plan, then run: two jobs, one warning
        run_job(surface, "loss", show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "cannot lock" in r.getMessage()]
    assert warnings == [
        f"{lock_path(surface)}: this file system cannot lock files (Function not implemented); "
        "going on without the lock, so make sure no other landscape job writes this file (on "
        "Lustre, mount with -o flock)"
    ]
    with SurfaceFile.open(surface) as result:
        assert result.done("loss").all()
