"""Li et al.'s experiments: the CIFAR-10 configs validate and say the paper's settings;
the digits-scale gallery runs (quick) and its claims are the numbers its files hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.api import read
from landscape.config import load_config
from landscape.demo import CONFIGS
from landscape.gallery import (
    LARGE_BATCH,
    RATIO_THRESHOLD,
    SMALL_BATCH,
    curvature_at,
    local_minima,
    loss_rise,
    main,
    measure_claims,
    plane_ratio_share,
    run_gallery,
    vgg_name,
    write_claims,
)

PAPERS = Path(str(CONFIGS)) / "papers"
PAPER_CONFIGS = sorted(PAPERS.glob("*.yaml"))


def test_every_paper_config_validates_with_a_placeholder_root():
    assert len(PAPER_CONFIGS) >= 12
    for path in PAPER_CONFIGS:
        config = load_config(path)
        assert config.data.name == "cifar10", path.name
        assert config.data.kwargs == {"root": "/path/to/cifar-10-batches-py"}, path.name


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_has_the_papers_grid_training_and_runnable_commands(path):
    config = load_config(path)
    x, y = config.grid.x, config.grid.y
    if config.directions.kind == "random":  # Figs. 3-6: filter-normalized, [-1, 1]^2 51 x 51
        assert (config.directions.normalization, config.directions.ignore) == ("filter", "biasbn")
        assert (x.min, x.max, x.num, y.min, y.max, y.num) == (-1, 1, 51, -1, 1, 51)
    elif config.directions.kind == "interpolation":  # Fig. 2
        assert (x.min, x.max, x.num, y) == (-0.5, 1.5, 401, None)
        assert "bs128" in config.model.checkpoint and "bs8192" in config.directions.targets[0]
    else:
        assert config.directions.kind == "pca" and (x.num, y.num) == (51, 51)
    if config.train is not None:
        train = config.train
        assert (train.optimizer, train.momentum, train.epochs) == ("sgd", 0.9, 300)
        assert (train.schedule, train.step_epochs, train.gamma) == ("step", [150, 225, 275], 0.1)
        assert train.batch_size in (128, 8192)
        assert train.lr == (0.01 if config.model.name == "resnet56_noshort" else 0.1)
        assert train.weight_decay == (0.0 if "wd0" in path.stem else 5e-4)
    header = path.read_text(encoding="utf-8")
    named = set(re.findall(r"configs/papers/([\w.-]+\.yaml)", header))
    assert path.name in named
    assert all((PAPERS / name).is_file() for name in named), named
    assert "landscape submit" in header and "landscape plot" in header
    assert Path(config.output).relative_to(Path.cwd()).as_posix() in header


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_curvature_and_rise_are_exact_on_a_parabola(dtype):
    x = np.linspace(-0.5, 1.5, 9).astype(dtype)
    values = 3.0 * (x - 1.0) ** 2 + 0.25
    assert curvature_at(x, values, 1.0) == pytest.approx(6.0, rel=1e-5)
    assert curvature_at(x, values, 0.0) == pytest.approx(6.0, rel=1e-5)
    with pytest.raises(ValueError):
        curvature_at(x, values, 1.5)  # an end: no neighbour beyond
    assert loss_rise(x, values, 1.0, 0.75) == pytest.approx(3 * 0.25**2, rel=1e-5)
    with pytest.raises(ValueError):
        loss_rise(x, values, 1.0, 0.8)  # not a grid point


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_local_minima_counts_bowls(dtype):
    x = np.linspace(-1, 1, 21, dtype=dtype)
    xx, yy = np.meshgrid(x, x)
    assert local_minima(xx**2 + yy**2) == 1
    two_bowls = np.minimum((xx - 0.5) ** 2, (xx + 0.5) ** 2) + yy**2
    assert local_minima(two_bowls) == 2
    assert local_minima(-(xx**2) - yy**2) == 4  # the corners


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plane_ratio_share_against_closed_form_curvatures(dtype):
    x = np.linspace(-1, 1, 7, dtype=dtype)
    y = np.linspace(-1, 1, 5, dtype=dtype)
    xx, yy = np.meshgrid(x, y)
    saddle = xx**2 - 0.5 * yy**2 + 0.3 * xx  # lambda = 2, -1: ratio 0.5 everywhere
    assert plane_ratio_share(x, y, saddle) == 1.0
    shallow = xx**2 - 0.05 * yy**2  # ratio 0.05, below the threshold
    assert RATIO_THRESHOLD > 0.05 and plane_ratio_share(x, y, shallow) == 0.0
    rotated = (xx + yy) ** 2 - 0.5 * (xx - yy) ** 2  # eigenvalues 4, -2 after rotation
    assert plane_ratio_share(x, y, rotated) == 1.0
    assert plane_ratio_share(x, y, xx**2 + 3 * yy**2) == 0.0  # a bowl


def test_gallery_into_a_file_says_so_in_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(["--quick", "--out", str(taken)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --out:") and "\n" not in error
    assert taken.read_text() == "not a folder"


@pytest.fixture(scope="module")
def quick_gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    return out, run_gallery(out, quick=True, figures=False)


def weights(checkpoint: Path) -> np.ndarray:
    """The weights (tensors with more than one dimension) of a checkpoint, flat."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    tensors = [v.double().reshape(-1) for k, v in state.items() if v.dim() > 1]
    return torch.cat(tensors).numpy()


def second_derivative(x: np.ndarray, values: np.ndarray, at: float) -> float:
    """2 a of the parabola a t^2 + b t + c through the grid point at ``at`` and its
    neighbours (a fit, not the gallery's difference formula)."""
    i = int(np.argmin(np.abs(x - at)))
    return 2 * np.polyfit(x[i - 1 : i + 2], values[i - 1 : i + 2], 2)[0]


def test_quick_gallery_claims_are_the_numbers_in_its_files(quick_gallery):
    out, claims = quick_gallery
    assert json.loads((out / "claims.json").read_text()) == claims
    html = (out / "claims.html").read_text()
    assert html.count("<tr>") == 4 and "Li et al." in html
    sharpness, chaos, pca = claims["claims"]

    for wd_name, entry in sharpness["values"].items():
        for size, batch in (("small", SMALL_BATCH), ("large", LARGE_BATCH)):
            line = read(out / f"line_{vgg_name(batch, wd_name)}.h5")
            expected = second_derivative(line.grid.x, line.maps["train_loss"], 0.0)
            assert entry[f"filter_curvature_{size}"] == pytest.approx(expected, rel=1e-6)
            final = sorted((out / "checkpoints" / vgg_name(batch, wd_name)).glob("epoch_*.pt"))
            norm = np.linalg.norm(weights(final[-1]))
            assert entry[f"weight_norm_{size}"] == pytest.approx(norm, rel=1e-6)
        path = read(out / f"interpolation_{wd_name}.h5")
        loss = dict(zip(path.grid.x.tolist(), path.maps["train_loss"]))
        assert entry["interpolation_rise_small"] == pytest.approx(loss[0.25] - loss[0.0])
        assert entry["interpolation_rise_large"] == pytest.approx(loss[0.75] - loss[1.0])
        assert entry["filter_large_sharper"] == (
            entry["filter_curvature_large"] > entry["filter_curvature_small"]
        )

    for name, entry in chaos["values"].items():
        loss = read(out / f"plane_{name}.h5").maps["train_loss"]
        assert entry["grid"] == [3, 3] and np.isfinite(loss).all()
        minima = sum(
            all(
                loss[j, i] < loss[b, a]
                for b in range(3)
                for a in range(3)
                if max(abs(b - j), abs(a - i)) == 1
            )
            for j in range(3)
            for i in range(3)
        )
        assert entry["local_minima"] == minima
        hessian = np.array(
            [
                [
                    loss[1, 2] - 2 * loss[1, 1] + loss[1, 0],
                    (loss[2, 2] - loss[2, 0] - loss[0, 2] + loss[0, 0]) / 4,
                ],
                [
                    (loss[2, 2] - loss[2, 0] - loss[0, 2] + loss[0, 0]) / 4,
                    loss[2, 1] - 2 * loss[1, 1] + loss[0, 1],
                ],
            ]
        )  # grid step 1 on [-1, 1] with 3 points
        low, high = np.linalg.eigvalsh(hessian)
        assert entry["plane_ratio_share"] == float(low < 0 and abs(low / high) > RATIO_THRESHOLD)

    with_, without = chaos["values"]["resnet20"], chaos["values"]["resnet20_noshort"]
    assert chaos["holds"]["noshort_more_local_minima"] == (
        without["local_minima"] > with_["local_minima"]
    )

    run = out / "checkpoints" / vgg_name(SMALL_BATCH, "wd5e-4")
    path = np.stack([weights(f) for f in sorted(run.glob("epoch_*.pt"))])
    rows = path - path[-1]  # theta_i - theta_n over every checkpoint, centred as in PCA
    singular = np.linalg.svd(rows - rows.mean(axis=0), compute_uv=False)
    explained = singular**2 / np.sum(singular**2)
    assert pca["values"]["checkpoints"] == len(path) == 3  # quick: 2 epochs
    assert pca["values"]["explained_variance_ratio"][0] == pytest.approx(explained[0], rel=1e-6)
    assert pca["values"]["first_two"] == pytest.approx(explained[:2].sum(), rel=1e-6)


def test_measure_claims_reads_the_same_claims_again_and_rewrites_them(quick_gallery, tmp_path):
    out, claims = quick_gallery
    again = measure_claims(out)
    assert again["claims"] == claims["claims"]
    written = write_claims(again, tmp_path / "copy")
    assert json.loads(written[0].read_text()) == again
