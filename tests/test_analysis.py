"""`landscape analyze` end to end (float32 and float64): the analysis file holds, at each
checkpoint, exactly what the curvature functions give when called directly there, its top
eigenvalues are those of the dense Hessian, its product counts are as documented; bad
analysis configs give one-line errors that name the field and leave every file on disk as
it was; `landscape submit --analysis` hands the checkpoints to SLURM array tasks (a stand-in
sbatch; the real local SLURM costs ~25 s a submission here and is left to test_submit)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dense_hessian, write_experiment
from test_bad_input import edit, fails_with
from test_sbatch import flags, submitted_call

from landscape.checkpoint import file_sha256, load_state_dict
from landscape.cli import main
from landscape.config import load_config
from landscape.curvature import lanczos
from landscape.curvature.clustering import logit_gradient_clustering
from landscape.curvature.operators import (
    DifferenceOperator,
    GaussNewtonOperator,
    HessianOperator,
    select_parameters,
)
from landscape.curvature.spectrum import (
    count_outliers,
    stochastic_lanczos_quadrature,
    top_eigenpairs,
)
from landscape.curvature.subspace import subspace_overlap, top_subspace_fractions
from landscape.curvature.trace import trace_and_frobenius
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.plan import plan_analysis, plan_surface
from landscape.reduce import reduce
from landscape.slurm import ShardTask, record_path
from landscape.store import SurfaceFile, texts
from landscape.train import train
from landscape.workers import run_job

# Small enough for a second each on one core: 75 parameters (5 -> 8 -> 3), 60 samples.
SETTINGS = {
    "probes": 2,
    "steps": 12,
    "density_points": 32,
    "trace_samples": 4,
    "clustering_samples": 12,
}
EPOCHS = 2  # checkpoints epoch_000 (the initialization) .. epoch_002


def training_run(
    folder: Path, dtype: str = "float64", name: str = "run", epochs: int = EPOCHS, **analysis
) -> Path:
    """A config whose analysis covers every checkpoint of ``epochs`` epochs of full-batch
    gradient descent (trained here), with SETTINGS and ``analysis``."""
    checkpoints = folder / f"{name}_checkpoints"
    config = write_experiment(
        folder,
        name,
        evaluation={"dtype": dtype, "batch_size": 60},  # one batch: 4x faster products
        train={
            "checkpoint_dir": str(checkpoints),
            "lr": 0.5,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "batch_size": 60,
            "epochs": epochs,
            "schedule": "constant",
        },
        analysis={
            "output": str(folder / f"{name}.an.h5"),
            "checkpoints": [str(checkpoints / "epoch_*.pt")],
            **SETTINGS,
            **analysis,
        },
    )
    train(load_config(config))
    return config


def analyzed(config: Path) -> tuple[dict, dict, dict]:
    """Run ``landscape analyze`` on ``config``; the file's maps, checkpoint rows and attrs."""
    assert main(["analyze", str(config), "--no-progress"]) == 0
    with SurfaceFile.open(load_config(config).analysis.output) as analysis:
        assert analysis.kind == "analysis" and analysis.done("analysis").all()
        rows, attrs = analysis.group("checkpoints")
        maps = analysis.maps()
        assert all(analysis.description(name) for name in maps)  # each says what it is
        return maps, rows, {**attrs, **analysis.attrs}


def at_checkpoint(config: Path, checkpoint: str) -> Experiment:
    """The experiment of ``config`` with the weights of ``checkpoint``."""
    experiment = Experiment.load(load_config(config), with_checkpoint=False)
    model = experiment.model
    model.load_state_dict(load_state_dict(checkpoint, model.state_dict(), None))
    return experiment


def direct(experiment: Experiment) -> dict:
    """Every analysis of the experiment's training loss, by calling the curvature
    functions directly with the config's settings: the ground truth of the file."""
    settings = experiment.config.analysis
    model, objective = experiment.model, experiment.objective
    samples = experiment.data.split("train")
    names = select_parameters(model, settings.parameters)
    common = (model, names, samples, objective, experiment.config.evaluation.batch_size)
    hessian = HessianOperator(*common)
    gauss_newton = GaussNewtonOperator(*common)
    residual = DifferenceOperator(hessian, gauss_newton)
    batch_size = experiment.config.evaluation.batch_size
    size, dtype = hessian.shape[0], experiment.dtype
    k = settings.top_k or experiment.data.num_classes + 2  # the plan's default
    found = {"size": size, "k": k, "hessian": hessian}
    for name, operator in (("", hessian), ("gn_", gauss_newton), ("residual_", residual)):
        found[f"{name}slq"] = stochastic_lanczos_quadrature(
            operator.hvp, size, settings.probes, settings.steps, settings.seed, dtype
        )
        found[f"{name}top"] = top_eigenpairs(
            operator.hvp, size, k, settings.tolerance, settings.max_hvps, settings.seed, dtype
        )
    found["outliers"] = count_outliers(found["top"].values, found["slq"], settings.gap)
    found["gradient"] = hessian.gradient()
    found["loss"] = evaluate(model, samples, batch_size, objective)
    found["trace"] = trace_and_frobenius(
        hessian, settings.trace_samples, settings.seed, settings.confidence
    )
    found["clustering"] = logit_gradient_clustering(
        model, names, samples, settings.clustering_samples, settings.seed
    )
    return found


def assert_density(maps: dict, row: int, prefix: str, quadrature, points: int) -> None:
    """The file's SLQ of one operator at checkpoint ``row`` is ``quadrature``: its nodes
    and weights, and the density on points evenly from 6 broadenings below the smallest
    node to 6 above the largest (the outputs' descriptions)."""
    columns = quadrature.nodes.shape[1]
    np.testing.assert_array_equal(
        maps[f"{prefix}density_nodes"][row, :, :columns], quadrature.nodes
    )
    np.testing.assert_array_equal(
        maps[f"{prefix}density_weights"][row, :, :columns], quadrature.weights
    )
    sigma = quadrature.broadening()
    assert maps[f"{prefix}density_sigma"][row] == sigma
    low, high = quadrature.span()
    grid = maps[f"{prefix}density_grid"][row]
    np.testing.assert_allclose(
        grid, np.linspace(low - 6 * sigma, high + 6 * sigma, points), rtol=0, atol=1e-12 * sigma
    )
    np.testing.assert_array_equal(maps[f"{prefix}density"][row], quadrature.density(grid, sigma))


def assert_top(maps: dict, row: int, prefix: str, pairs) -> None:
    np.testing.assert_array_equal(maps[f"{prefix}top_eigenvalues"][row], pairs.values)
    np.testing.assert_array_equal(maps[f"{prefix}top_residuals"][row], pairs.residuals)
    np.testing.assert_array_equal(maps[f"{prefix}top_converged"][row], pairs.pair_converged)


@pytest.mark.parametrize(
    "dtype, parameters, size",
    [
        ("float32", "all", 5 * 8 + 8 + 8 * 3 + 3),
        ("float64", "all", 5 * 8 + 8 + 8 * 3 + 3),
        ("float64", "weights", 5 * 8 + 8 * 3),
    ],
)
def test_analysis_file_holds_what_the_curvature_functions_give(tmp_path, dtype, parameters, size):
    config = training_run(tmp_path, dtype, parameters=parameters)
    maps, rows, attrs = analyzed(config)
    settings = load_config(config).analysis
    checkpoints = texts(rows["path"])
    assert [Path(path).name for path in checkpoints] == [
        f"epoch_{epoch:03d}.pt" for epoch in range(EPOCHS + 1)
    ]
    assert rows["epoch"].tolist() == list(range(EPOCHS + 1))
    assert texts(rows["sha256"]) == [file_sha256(path) for path in checkpoints]
    assert attrs["classes"] == 3 and attrs["parameters"] == size

    for row, checkpoint in enumerate(checkpoints):
        experiment = at_checkpoint(config, checkpoint)
        found = direct(experiment)
        k = found["k"]
        assert (maps["train_loss"][row], maps["train_acc"][row]) == found["loss"]
        for prefix in ("", "gn_", "residual_"):
            assert_density(maps, row, prefix, found[f"{prefix}slq"], settings.density_points)
            assert_top(maps, row, prefix, found[f"{prefix}top"])
        outliers = found["outliers"]
        assert maps["outliers"][row] == outliers.count
        assert maps["bulk_edge"][row] == outliers.edge
        np.testing.assert_array_equal(maps["outlier_ratios"][row], outliers.ratios)
        assert maps["outliers_saturated"][row] == outliers.saturated
        h, g = found["top"].vectors, found["gn_top"].vectors
        overlaps = [subspace_overlap(h[:j].T, g[:j].T) for j in range(1, k + 1)]
        np.testing.assert_array_equal(maps["hg_overlap"][row], overlaps)
        gradient = found["gradient"]
        fractions = top_subspace_fractions(gradient, h.T)
        np.testing.assert_array_equal(maps["gradient_fractions"][row], fractions)
        assert maps["gradient_norm"][row] == float(gradient.norm())
        trace = found["trace"]
        for name, estimate in (
            ("trace", trace.trace),
            ("frobenius_squared", trace.frobenius_squared),
        ):
            assert maps[name][row] == estimate.mean
            assert maps[f"{name}_se"][row] == estimate.standard_error
        assert maps["trace_over_frobenius"][row] == trace.ratio.value
        assert maps["trace_over_frobenius_se"][row] == trace.ratio.standard_error
        for name, value in dataclasses.asdict(found["clustering"]).items():
            if name not in ("samples", "classes"):
                assert maps[name][row] == value, name

        # Products, as their descriptions count them: each quantity pays for what it is
        # the first to compute (here: density the SLQ of H, top_eigenpairs H's top-k).
        assert maps["density_hvps"][row] == found["slq"].hvps == settings.probes * settings.steps
        assert maps["top_eigenpairs_hvps"][row] == found["top"].hvps
        assert maps["gauss_newton_hvps"][row] == (
            found["gn_top"].hvps
            + 2 * found["residual_top"].hvps  # one H and one G product each
            + found["gn_slq"].hvps
            + 2 * found["residual_slq"].hvps
        )
        assert maps["gradient_overlap_hvps"][row] == 0  # H's top-k is top_eigenpairs'
        assert maps["trace_hvps"][row] == settings.trace_samples
        assert maps["clustering_hvps"][row] == 0
        for quantity in settings.quantities:
            assert 0 < maps[f"{quantity}_seconds"][row] < 60

        # The dense Hessian's top eigenvalues (in float64 for a float32 model too): each
        # Ritz value within its residual r of them, plus the float32 products' rounding;
        # in float64 within r^2 / delta (Kato-Temple; delta: its distance to the other
        # eigenvalues), far closer than r.
        spectrum = np.linalg.eigvalsh(dense_hessian(found["hessian"], torch.float64))[::-1]
        exact = spectrum[:k]
        rounding = 16 * torch.finfo(experiment.dtype).eps * exact[0]
        values, residuals = maps["top_eigenvalues"][row], maps["top_residuals"][row]
        assert maps["top_converged"][row].all()
        assert (np.abs(values - exact) <= residuals + rounding).all(), (values, exact)
        if dtype == "float64":
            distances = np.abs(values[:, None] - spectrum[None, :])
            distances[range(k), range(k)] = np.inf  # not to its own eigenvalue
            bound = residuals**2 / distances.min(axis=1) + rounding
            assert (np.abs(values - exact) <= bound).all(), (values - exact, bound)


def test_products_are_counted_by_the_first_quantity_that_needs_them(tmp_path):
    """gradient_overlap before top_eigenpairs: it computes H's top-k and pays for it;
    top_eigenpairs then pays only for the density, which the outliers' bulk edge needs."""
    config = training_run(tmp_path, quantities=["gradient_overlap", "top_eigenpairs"])
    maps, rows, _ = analyzed(config)
    assert "density" not in maps and "gauss_newton_hvps" not in maps
    for row, checkpoint in enumerate(texts(rows["path"])):
        found = direct(at_checkpoint(config, checkpoint))
        assert maps["gradient_overlap_hvps"][row] == found["top"].hvps
        assert maps["top_eigenpairs_hvps"][row] == SETTINGS["probes"] * SETTINGS["steps"]
        np.testing.assert_array_equal(maps["top_eigenvalues"][row], found["top"].values)


def analysis_of_one_checkpoint(folder: Path, **analysis) -> Path:
    """A config analysing its model.checkpoint (a random initialization) with SETTINGS."""
    return write_experiment(
        folder,
        "one",
        evaluation={"batch_size": 60},
        analysis={"output": str(folder / "one.an.h5"), **SETTINGS, **analysis},
    )


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (configs, checkpoints, analysis files) by its hash."""
    return {str(path): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            lambda c: c["analysis"].update(quantities=["densty"]),
            ["analysis.quantities: densty; choose from density, top_eigenpairs"],
        ),
        (lambda c: c["analysis"].update(quantities=[]), ["analysis.quantities: empty"]),
        (
            lambda c: c["analysis"].update(quantities=["trace", "density", "trace"]),
            ["analysis.quantities: trace listed twice"],
        ),
        (lambda c: c["analysis"].update(probes=0), ["analysis.probes: must be >= 1 (got 0)"]),
        (lambda c: c["analysis"].update(steps=1), ["analysis.steps: must be >= 2 (got 1)"]),
        (
            lambda c: c["analysis"].update(top_k=76, max_hvps=300),
            ["analysis.top_k: 76 eigenpairs of 75 analysed parameters; give at most 75"],
        ),
        (
            lambda c: c["analysis"].update(top_k=5, max_hvps=4),
            ["analysis.max_hvps: 4 products cannot find top_k = 5 eigenpairs"],
        ),
        (lambda c: c["analysis"].update(tolerance=0), ["analysis.tolerance: must be in (0, 1)"]),
        (lambda c: c["analysis"].update(gap=0), ["analysis.gap: must be > 0"]),
        (lambda c: c.pop("analysis"), ["analysis: section missing"]),
        (lambda c: c["analysis"].pop("output"), ["analysis.output: required"]),
        (
            lambda c: c["model"].pop("checkpoint"),
            ["analysis.checkpoints: none given and no model.checkpoint"],
        ),
        (
            lambda c: c["analysis"].update(checkpoints=["/nowhere/epoch_*.pt"]),
            ["analysis.checkpoints: /nowhere/epoch_*.pt matches no file"],
        ),
        (
            lambda c: c["model"].update(kwargs={"hidden": [9]}),
            ["analysis.checkpoints", "does not fit model", "net.1.weight (8, 5) vs model (9, 5)"],
        ),
        (
            lambda c: c.update(
                data={"name": "plugins:regression", "kwargs": {"inputs": 5}},
                maps=["train_loss"],
                evaluation={**c["evaluation"], "loss": "mse"},
            ),
            ["analysis.quantities: clustering", "class labels", "drop clustering"],
        ),
    ],
)
def test_bad_analysis_configs_are_one_line_errors_naming_the_field(
    tmp_path, capsys, change, fragments
):
    config = analysis_of_one_checkpoint(tmp_path)
    edit(config, change)
    before = files_of(tmp_path)
    fails_with(capsys, ["analyze", str(config)], *fragments)
    assert files_of(tmp_path) == before  # no analysis file, no temporary, nothing changed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_analysis_only_config_with_mse_is_not_refused_for_the_default_maps(tmp_path, dtype):
    # No grid, no maps: the default maps (train_loss, train_acc) belong to a surface that
    # this config never plans, so mse's lack of an accuracy is no reason to refuse it.
    config = analysis_of_one_checkpoint(tmp_path, quantities=["top_eigenpairs"], top_k=2)
    regression = {"name": "plugins:regression", "kwargs": {"inputs": 5, "outputs": 3}}
    edit(
        config,
        lambda c: (
            c.pop("grid"),
            c.pop("maps"),
            c.update(
                data=regression, evaluation={**c["evaluation"], "loss": "mse", "dtype": dtype}
            ),
        ),
    )
    maps, rows, _ = analyzed(config)
    experiment = at_checkpoint(config, texts(rows["path"])[0])
    samples = experiment.data.split("train")
    inputs, targets = samples.head(len(samples))
    with torch.no_grad():
        errors = (experiment.model(inputs).double() - targets.double()) ** 2
    np.testing.assert_allclose(maps["train_loss"][0], errors.mean().item(), rtol=1e-6)
    assert np.isnan(maps["train_acc"][0])  # mse has no accuracy
    model, settings = experiment.model, experiment.config.analysis
    names = select_parameters(model, settings.parameters)
    batch_size = experiment.config.evaluation.batch_size
    hessian = HessianOperator(model, names, samples, experiment.objective, batch_size)
    exact = np.linalg.eigvalsh(dense_hessian(hessian, torch.float64))[::-1][:2]
    rounding = 16 * torch.finfo(experiment.dtype).eps * exact[0]
    values, residuals = maps["top_eigenvalues"][0], maps["top_residuals"][0]
    assert (np.abs(values - exact) <= residuals + rounding).all(), (values, exact)


def test_existing_analysis_is_never_overwritten_or_corrupted(tmp_path, capsys):
    config = training_run(tmp_path, quantities=["trace"])
    output = str(load_config(config).analysis.output)
    assert main(["analyze", str(config), "--no-progress"]) == 0
    surface = str(plan_surface(load_config(write_experiment(tmp_path, "surface"))))
    before = files_of(tmp_path)

    # The same config again, and with top_k set to what the plan resolved 0 to: no-ops.
    assert main(["analyze", str(config), "--no-progress"]) == 0
    assert main(["analyze", str(config), "--set", "analysis.top_k=5"]) == 0
    # A changed setting, aimed at the same file: refused, naming it.
    argv = ["analyze", str(config), "--set", "analysis.trace_samples=8"]
    fails_with(capsys, argv, "analysis.output", "different config", "analysis.trace_samples")
    # Training went on: the glob now finds one more checkpoint than the plan listed.
    folder = tmp_path / "run_checkpoints"
    later = folder / f"epoch_{EPOCHS + 1:03d}.pt"
    later.write_bytes((folder / f"epoch_{EPOCHS:03d}.pt").read_bytes())
    fails_with(
        capsys,
        ["analyze", str(config)],
        f"analysis.checkpoints: now {EPOCHS + 2} checkpoints, {output} was planned over "
        f"{EPOCHS + 1} (training went on?)",
    )
    later.unlink()
    # Files of the other kind, and no result file at all.
    argv = ["run", output]
    fails_with(capsys, argv, f"{output}: a result file of kind analysis", "`landscape analyze`")
    fails_with(
        capsys, ["analyze", surface], "kind surface", "`landscape run` or `landscape hessian`"
    )
    fails_with(capsys, ["analyze", str(later.with_name("epoch_000.pt"))], "not an HDF5 file")
    fails_with(capsys, ["analyze", str(later.with_suffix(".h5"))], "`landscape analyze CONFIG`")
    assert files_of(tmp_path) == before


def test_checkpoint_changed_after_the_plan_stops_the_analysis_there(tmp_path, capsys):
    """Each checkpoint's hash is checked as it is loaded: those before it keep their values."""
    config = training_run(tmp_path, quantities=["trace"])
    output = plan_analysis(load_config(config))
    changed = tmp_path / "run_checkpoints" / "epoch_001.pt"
    with open(changed, "ab") as handle:
        handle.write(b"\0")
    argv = ["analyze", str(output), "--no-progress"]
    fails_with(capsys, argv, f"analysis.checkpoints: {changed} changed since")
    with SurfaceFile.open(output) as analysis:
        assert analysis.done("analysis").tolist() == [True] + [False] * EPOCHS
        traces = analysis.maps()["trace"]
    assert np.isfinite(traces[0]) and np.isnan(traces[1:]).all()


@pytest.mark.parametrize(
    "free, fragments",
    [
        # 12 steps x 75 parameters x 8 bytes = 7200 bytes for the density's basis.
        (
            7199,
            ["analysis.steps: 12 Lanczos vectors of 75 parameters", "lower analysis.steps to 11"],
        ),
        # top-k: up to min(max_hvps, 75) vectors and their products, 90000 bytes.
        (89999, ["analysis.max_hvps: 75 Lanczos vectors", "lower analysis.max_hvps to 74"]),
        (1000, ["analysis.steps", "select fewer parameters (analysis.parameters: weights)"]),
    ],
)
def test_basis_that_cannot_fit_names_the_setting_to_lower(
    tmp_path, capsys, monkeypatch, free, fragments
):
    config = analysis_of_one_checkpoint(tmp_path)
    monkeypatch.setattr(lanczos, "free_memory", lambda device: free)
    fails_with(capsys, ["analyze", str(config)], *fragments)
    with SurfaceFile.open(tmp_path / "one.an.h5") as analysis:  # planned, nothing computed
        assert not analysis.done("analysis").any()


def test_submit_analysis_sends_its_checkpoints_to_slurm_array_tasks(tmp_path, fake_slurm, capsys):
    """`landscape submit --analysis CONFIG` plans the analysis and submits one array task
    per group of its shards (one checkpoint each), and a reduce after them; the tasks,
    run here as their nodes would, fill the file as one process does."""
    config = training_run(tmp_path, quantities=["trace"])
    output = Path(load_config(config).analysis.output)
    fake_slurm.sbatch()
    assert main(["submit", str(config), "--analysis", "--tasks", "2"]) == 0
    *arrays, reduce_script = fake_slurm.scripts()
    assert len(arrays) == 1 and flags(arrays[0])["array"] == "0-1%2"
    assert flags(reduce_script)["dependency"] == "afterok:41"
    record = json.loads(record_path(output).read_text())
    assert list(record["jobs"]) == ["analysis"] and record["surface"] == str(output)
    groups = [[0, 2], [1]]  # 3 checkpoints, every 2nd shard per task
    tasks = record["jobs"]["analysis"]["tasks"]
    assert [task["shards"] for task in tasks] == groups
    for index, task in enumerate(tasks):
        call = submitted_call(output, task["id"])
        assert isinstance(call.function, ShardTask)
        assert call.args == (str(output), "analysis", index, len(groups), groups[index])
        call.function(*call.args)
    assert reduce(output) == EPOCHS + 1  # the reduce job merges the tasks' part files

    reference = plan_analysis(load_config(config, [f"analysis.output={tmp_path / 'one.h5'}"]))
    run_job(reference, "analysis", show_progress=False)
    with SurfaceFile.open(output) as submitted, SurfaceFile.open(reference) as single:
        assert submitted.done("analysis").all()
        for name, values in single.maps().items():
            if not name.endswith("_seconds"):  # wall-clock
                np.testing.assert_array_equal(submitted.maps()[name], values, err_msg=name)
    capsys.readouterr()
    fails_with(capsys, ["submit", str(output), "--analysis"], "--analysis: only with a config")
