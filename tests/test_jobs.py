"""The table of job kinds: every map has one kind, kinds run in table order, outputs of any
trailing shape go through the file, part files and reduce, and reduce always derives."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_point

from landscape import store
from landscape.cli import build_parser, main
from landscape.config import load_config, parse_config
from landscape.errors import UserError
from landscape.grid import Grid, shard_ranges
from landscape.jobs import JOB_KINDS, JOBS, MAP_NAMES, DerivedMap, JobKind, Output, resolve
from landscape.parts import PartWriter, part_files, parts_folder
from landscape.plan import plan_surface
from landscape.plot import plot_surface_file
from landscape.reduce import reduce
from landscape.status import surface_status
from landscape.store import SurfaceFile, create_surface_file
from landscape.workers import ArrayTask, run_job

GRID_6X6 = {
    "x": {"min": -1.0, "max": 1.0, "num": 6},
    "y": {"min": -1.0, "max": 1.0, "num": 6},
    "shard_size": 4,
}


def test_every_map_a_config_may_list_belongs_to_exactly_one_kind():
    owners = [kind.name for kind in JOB_KINDS for _ in kind.maps]
    assert len(owners) == len(MAP_NAMES) == len(set(MAP_NAMES))
    for kind in JOB_KINDS:
        others = {name for other in JOB_KINDS if other is not kind for name in other.maps}
        assert not others & set(kind.maps), kind.name


def config_text(folder, **changes) -> str:
    """A config that parses without a checkpoint on disk (none is loaded here)."""
    config = {
        "model": {"name": "mlp", "checkpoint": str(folder / "x.pt")},
        "output": str(folder / "x.h5"),
        "grid": {"x": {"min": 0, "max": 1, "num": 3}, "y": {"min": 0, "max": 1, "num": 2}},
    }
    return json.dumps({**config, **changes})


def test_jobs_run_in_table_order_whatever_the_order_of_the_maps(tmp_path):
    assert [kind.name for kind in JOB_KINDS] == ["loss", "hessian", "analysis"]
    for maps in (["lambda_max", "train_loss"], ["train_loss", "lambda_max"]):
        assert parse_config(config_text(tmp_path, maps=maps)).jobs == ["loss", "hessian"]


def test_each_kind_is_a_command_and_its_evaluator_and_figures_resolve():
    parser = build_parser()
    for kind in JOB_KINDS:
        assert parser.parse_args([kind.verb, "f.h5"]).job == kind.name
        assert callable(resolve(kind.evaluator)) and callable(resolve(kind.figures))
    assert parser.parse_args(["submit", "f.h5", "--jobs", *JOBS]).jobs == list(JOBS)


def test_an_unknown_job_is_one_line_naming_the_kinds(tmp_path):
    with pytest.raises(UserError, match="job 'curvature': no such job kind; choose from loss,"):
        run_job(tmp_path / "x.h5", "curvature")


def spectrum_kind() -> JobKind:
    """A kind whose points hold three numbers each, with a derived sum."""
    return JobKind(
        name="spectrum",
        verb="spectrum",
        description="three numbers per point",
        maps=(),
        outputs=lambda config: (Output("top3", (3,)),),
        points=lambda config, grid: grid.sublattice(1),
        shard_size=lambda config, grid: 2,
        evaluator="unused:unused",
        figures="unused:unused",
        derived=(DerivedMap("top3_sum", ("top3",), lambda top3: top3.sum(axis=-1)),),
    )


def spectrum_file(tmp_path, monkeypatch) -> Path:
    """A 3 x 2 surface file of :func:`spectrum_kind` only, its kind in the table."""
    kind = spectrum_kind()
    monkeypatch.setattr(store, "JOB_KINDS", (*JOB_KINDS, kind))
    monkeypatch.setattr(store, "JOBS", {**JOBS, kind.name: kind})
    config = parse_config(config_text(tmp_path))
    grid = Grid(np.linspace(0, 1, 3), np.linspace(0, 1, 2))
    points = kind.points(config, grid)
    path = tmp_path / "x.h5"
    metadata = dict(checkpoint_path="x.pt", checkpoint_sha256="0", model="mlp", dataset="d")
    work = {kind.name: (points, shard_ranges(points.size, kind.shard_size(config, grid)))}
    create_surface_file(path, config, grid, [{"w": np.zeros(2)}], [{}], {}, work, metadata, {})
    return path


def test_outputs_with_a_trailing_shape_go_through_file_parts_and_reduce(tmp_path, monkeypatch):
    path = spectrum_file(tmp_path, monkeypatch)
    values = {point: np.array([point, 10.0 * point, -1.0]) for point in range(6)}

    with SurfaceFile.open(path, "r+") as surface:  # the serial writer: point 0
        assert surface.jobs == ["spectrum"] and surface.job_maps("spectrum") == ["top3"]
        write_point(surface, "spectrum", 0, {"top3": values[0]})
        plan_id = surface.plan_id
    parts = PartWriter(path, plan_id)  # an array task: points 1 to 5, in two parts
    for point in range(1, 6):
        write_point(parts, "spectrum", point, {"top3": values[point]})
        if point in (2, 5):
            parts.commit()
    with h5py.File(part_files(path)[0]) as part:
        assert part["maps/top3"].shape == (2, 3)
    with SurfaceFile.open(path) as surface:
        assert surface.pending_shard_indices("spectrum") == [0, 1, 2]

    assert reduce(path) == 5
    with SurfaceFile.open(path) as surface:
        maps = surface.maps()
        assert surface.done("spectrum").all() and not part_files(path)
    expected = np.stack([values[point] for point in range(6)]).reshape(2, 3, 3)
    np.testing.assert_array_equal(maps["top3"], expected)
    np.testing.assert_array_equal(maps["top3_sum"], expected.sum(axis=-1))


def test_a_part_of_the_wrong_trailing_shape_is_refused_in_one_line(tmp_path, monkeypatch):
    path = spectrum_file(tmp_path, monkeypatch)
    with SurfaceFile.open(path) as surface:
        parts = PartWriter(path, surface.plan_id)
    write_point(parts, "spectrum", 1, {"top3": np.array([1.0, 2.0])})  # two numbers, not 3
    parts.commit()
    with pytest.raises(UserError, match=r"damaged part file \(top3 not of its 1 points' shape"):
        reduce(path)
    with SurfaceFile.open(path) as surface:
        assert not surface.done("spectrum").any()  # nothing merged, the part still there
    assert len(part_files(path)) == 1


def test_a_hessian_run_without_parts_has_lambda_ratio_and_reduce_restores_it(experiment):
    grid = {"x": {"min": -1.0, "max": 1.0, "num": 2}, "y": {"min": -1.0, "max": 1.0, "num": 2}}
    surface = plan_surface(load_config(experiment(maps=["lambda_min", "lambda_max"], grid=grid)))
    run_job(surface, "hessian", show_progress=False, writer="serial")
    with SurfaceFile.open(surface) as result:
        maps = result.maps()
    expected = np.abs(maps["lambda_min"] / maps["lambda_max"])
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(maps["lambda_ratio"], expected)

    with h5py.File(surface, "r+") as handle:
        handle["maps/lambda_ratio"][...] = np.nan
    assert main(["reduce", str(surface)]) == 0
    with SurfaceFile.open(surface) as reduced:
        np.testing.assert_array_equal(reduced.maps()["lambda_ratio"], expected)


def as_schema_2(surface) -> None:
    """Rename what schema 3 calls the loss job back to schema 2's "surface": the file's
    groups and schema version, and every part file waiting beside it."""
    with h5py.File(surface, "r+") as handle:
        for group in ("done", "finished", "points", "shards"):
            handle.move(f"{group}/loss", f"{group}/surface")
        handle.attrs["schema_version"] = 2
    for part in part_files(surface):
        with h5py.File(part, "r+") as handle:
            handle.attrs["job"] = "surface"
        part.rename(part.with_name(part.name.replace("loss-", "surface-")))


def test_a_schema_2_file_opens_shows_status_plots_and_resumes(experiment, tmp_path):
    reference = plan_surface(load_config(experiment(name="reference", grid=GRID_6X6)))
    run_job(reference, "loss", show_progress=False)
    surface = plan_surface(load_config(experiment(name="old", grid=GRID_6X6)))
    run_job(surface, "loss", task=ArrayTask(0, 3), show_progress=False)
    reduce(surface)  # 12 points in the file
    run_job(surface, "loss", task=ArrayTask(1, 3), show_progress=False)  # 12 in part files
    as_schema_2(surface)
    assert [part.name.split("-")[0] for part in part_files(surface)] == ["surface"] * 3

    status = surface_status(surface)
    assert "  loss: 12/36 points done (+12 in part files, not yet merged: 66.7% in all)" in status
    assert plot_surface_file(surface, tmp_path / "figures", ("png",))
    # A task submitted before the rename, requeued: finds its parts, nothing left to do.
    assert run_job(surface, "surface", task=ArrayTask(1, 3), show_progress=False) == 0

    assert (
        run_job(surface, "loss", show_progress=False) == 12
    )  # merges the parts, computes the rest
    assert not parts_folder(surface).exists()
    with SurfaceFile.open(surface) as resumed, SurfaceFile.open(reference) as single:
        assert resumed.attrs["schema_version"] == 2 and "surface" in resumed.handle["done"]
        assert resumed.done("loss").all()
        for name, values in single.maps().items():
            np.testing.assert_array_equal(resumed.maps()[name], values, err_msg=name)


@pytest.mark.parametrize("version", [1, 4])
def test_other_schemas_are_refused_in_one_line(experiment, capsys, version):
    surface = plan_surface(load_config(experiment()))
    with h5py.File(surface, "r+") as handle:
        handle.attrs["schema_version"] = version
    assert main(["status", str(surface)]) == 2
    assert f"not a surface file of schema 3 (found {version})" in capsys.readouterr().err
