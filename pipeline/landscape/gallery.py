"""Li et al. (2018) at digits scale: their experiments shrunk to run on a laptop's CPU, and
their claims measured beside what the paper states (``claims.json``, ``claims.html``).

The CIFAR-10 originals are ``landscape/configs/papers/*.yaml``. Here every net is
trained on scikit-learn's 8x8 digits for a few epochs (seed 0 everywhere: training,
minibatch order, random directions), then:

- section 5: VGG-9 at a small (64) and a large (512 of 1437 samples) batch, each with
  weight decay 0 and 5e-4; one filter-normalized random 1D curve around each minimum
  (Fig. 3), and the un-normalized line from the small- to the large-batch minimum
  (Fig. 2);
- section 6: ResNet-20 with and without shortcuts, a filter-normalized random plane
  around each minimum (Fig. 5);
- section 7: the small-batch VGG-9 trajectory (weight decay 5e-4) on its PCA plane
  (Fig. 9).

``python -m landscape.gallery --out results/gallery`` (``make gallery``) writes every
surface file, a report of their figures and numbers (``report/index.html``,
:mod:`landscape.report`) and the claims (``claims.html``, linking the report) into
``--out``; ``--quick`` shrinks it to a
fifth of the data, one or two epochs and 3 to 9 points an axis (the test suite's
run). Trained checkpoints are reused and
planned files resumed, so a second run only redraws.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

from landscape.api import read
from landscape.atomic import check_writable, write_file
from landscape.checkpoint import read_torch_file
from landscape.config import ExperimentConfig, TrainConfig, parse_config
from landscape.errors import UserError
from landscape.plan import plan_surface
from landscape.train import checkpoint_path, train
from landscape.workers import run_job

log = logging.getLogger(__name__)

SEED = 0
# Of 1437 training samples: the large batch is 17.8 % of the set (the paper's 8192: 16.4 %
# of CIFAR-10's), the small one a quarter of it (the paper's: 1/64).
SMALL_BATCH, LARGE_BATCH = 64, 256
WEIGHT_DECAYS = {"wd0": 0.0, "wd5e-4": 5e-4}
# Section 5's un-normalized sharpness: the loss rise this far from each end of the line
# between the small- and the large-batch minimum, in units of their distance.
INWARD = 0.25
# |lambda_min / lambda_max| above this counts as significant negative curvature (Li et
# al. Fig. 7's colour scale; issue 16).
RATIO_THRESHOLD = 0.1


@dataclass(frozen=True)
class Scale:
    """How far the gallery is shrunk: epochs of the training runs (VGG-9's at least 2:
    PCA needs a path that is not a straight line; its large batch takes 6 steps an
    epoch), the data and
    points per axis (odd, so that 0, and for the interpolation 1, lie on the grid)."""

    resnet_epochs: int
    vgg_epochs: int
    plane: int  # ResNet-20 planes, [-1, 1]^2
    line: int  # VGG-9 filter-normalized curves, [-1, 1]
    interpolation: int  # small -> large batch, [-0.5, 1.5]: 9 puts 0.25 and 0.75 on it
    pca: int  # the PCA plane, framed on the trajectory
    data: tuple[str, ...] = ()  # data settings (key.path=value) of every run


FULL = Scale(resnet_epochs=4, vgg_epochs=6, plane=7, line=9, interpolation=9, pca=5)
# Quick: a fifth of the digits to train and map (359 samples; 449 would leave a last
# minibatch of one sample, which BatchNorm refuses), for the test suite.
QUICK = Scale(
    resnet_epochs=1,
    vgg_epochs=2,
    plane=3,
    line=3,
    interpolation=9,
    pca=3,
    data=("data.kwargs.test_fraction=0.8",),
)

BASE = f"""
data: {{name: digits}}
evaluation: {{batch_size: 2048, device: cpu, dtype: float32}}
maps: [train_loss, train_acc]
train:
  optimizer: sgd
  lr: 0.1
  momentum: 0.9
  schedule: cosine
  seed: {SEED}
  device: cpu
"""


@dataclass(frozen=True)
class Training:
    """One training run: ``name`` is its checkpoint folder under ``out``/checkpoints."""

    name: str
    model: str
    batch_size: int
    weight_decay: float
    epochs: int
    data: tuple[str, ...]  # data settings, as Scale.data

    def folder(self, out: Path) -> Path:
        """Its checkpoints' folder in the gallery's output ``out``."""
        return out / "checkpoints" / self.name

    def minimum(self, out: Path) -> Path:
        """Its last checkpoint: the minimum the gallery maps."""
        return checkpoint_path(TrainConfig(checkpoint_dir=str(self.folder(out))), self.epochs)


def trainings(scale: Scale) -> list[Training]:
    runs = [
        Training(model, model, SMALL_BATCH, 5e-4, scale.resnet_epochs, scale.data)
        for model in ("resnet20", "resnet20_noshort")
    ]
    for wd_name, wd in WEIGHT_DECAYS.items():
        for batch in (SMALL_BATCH, LARGE_BATCH):
            name = vgg_name(batch, wd_name)
            runs.append(Training(name, "vgg9", batch, wd, scale.vgg_epochs, scale.data))
    return runs


def vgg_name(batch_size: int, wd_name: str) -> str:
    return f"vgg9_bs{batch_size}_{wd_name}"


def gallery_config(out: Path, run: Training, settings: list[str]) -> ExperimentConfig:
    """The digits config of ``run`` (its model, checkpoints and training), after
    ``settings`` (``key.path=value``, as ``--set``)."""
    return parse_config(
        BASE,
        f"gallery:{run.name}",
        [
            f"model.name={run.model}",
            f"model.checkpoint={run.minimum(out)}",
            f"train.checkpoint_dir={run.folder(out)}",
            f"train.batch_size={run.batch_size}",
            f"train.weight_decay={run.weight_decay}",
            f"train.epochs={run.epochs}",
            *run.data,
            *settings,
        ],
    )


def surface_configs(out: Path, scale: Scale) -> dict[str, ExperimentConfig]:
    """Every surface of the gallery by file stem (the file is ``out``/stem.h5)."""
    runs = {run.name: run for run in trainings(scale)}
    filter_random = [
        "directions.normalization=filter",
        "directions.ignore=biasbn",
        f"directions.seed={SEED}",
    ]
    configs = {}
    for name in ("resnet20", "resnet20_noshort"):
        configs[f"plane_{name}"] = [
            runs[name],
            [
                *filter_random,
                f"grid.x={{min: -1.0, max: 1.0, num: {scale.plane}}}",
                f"grid.y={{min: -1.0, max: 1.0, num: {scale.plane}}}",
            ],
        ]
    for wd_name in WEIGHT_DECAYS:
        for batch in (SMALL_BATCH, LARGE_BATCH):
            configs[f"line_{vgg_name(batch, wd_name)}"] = [
                runs[vgg_name(batch, wd_name)],
                [
                    *filter_random,
                    f"grid.x={{min: -1.0, max: 1.0, num: {scale.line}}}",
                ],
            ]
        configs[f"interpolation_{wd_name}"] = [
            runs[vgg_name(SMALL_BATCH, wd_name)],
            [
                "directions.kind=interpolation",
                f'directions.targets=["{runs[vgg_name(LARGE_BATCH, wd_name)].minimum(out)}"]',
                f"grid.x={{min: -0.5, max: 1.5, num: {scale.interpolation}}}",
            ],
        ]
    pca_run = runs[vgg_name(SMALL_BATCH, "wd5e-4")]
    trajectory = pca_run.folder(out) / "epoch_*.pt"
    configs["pca_" + pca_run.name] = [
        pca_run,
        [
            "directions.kind=pca",
            "directions.ignore=biasbn",
            f'directions.checkpoints=["{trajectory}"]',
            f"grid.x={{num: {scale.pca}}}",
            f"grid.y={{num: {scale.pca}}}",
        ],
    ]
    return {
        stem: gallery_config(out, run, [*settings, f"output={out / stem}.h5"])
        for stem, (run, settings) in configs.items()
    }


def run_gallery(
    out: str | Path = "results/gallery", quick: bool = False, figures: bool = True
) -> dict:
    """Train, map, (draw) and measure the whole gallery into ``out``; returns the claims."""
    started = time.perf_counter()
    out = Path(out).resolve()
    check_writable(out, "--out", folder=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out: cannot create {out} ({exc.strerror}); name a writable folder"
        ) from None
    scale = QUICK if quick else FULL
    for run in trainings(scale):
        if run.minimum(out).is_file():
            log.info("using the trained checkpoints of %s", run.name)
        else:
            train(gallery_config(out, run, []))
    paths = []
    for config in surface_configs(out, scale).values():
        paths.append(plan_surface(config))
        for job in config.jobs:
            run_job(paths[-1], job, show_progress=False)
    if figures:
        from landscape.report import write_report  # matplotlib only for figures

        log.info("report of every surface: %s", write_report(paths, out / "report"))
    claims = measure_claims(out)
    claims["scale"] = {
        "resnet_epochs": scale.resnet_epochs,
        "vgg_epochs": scale.vgg_epochs,
        "seed": SEED,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_claims(claims, out)
    return claims


# --- measuring ------------------------------------------------------------------------


def loss_rise(coordinates: np.ndarray, values: np.ndarray, at: float, to: float) -> float:
    """f(to) - f(at) between two grid points of a curve: how much the loss climbs when
    one leaves the point ``at`` by ``to - at`` (the width a 1D plot shows)."""
    indices = [int(np.argmin(np.abs(coordinates - point))) for point in (at, to)]
    if not all(np.isclose(coordinates[i], point) for i, point in zip(indices, (at, to))):
        raise ValueError(f"{at} and {to} must both be grid points of {coordinates}")
    return float(values[indices[1]] - values[indices[0]])


def require_uniform(coordinates: np.ndarray) -> None:
    """Refuse ``coordinates`` that are not evenly spaced: the gallery's difference
    formulas hold only there (its lines and planes have bounds, so uniform axes; a
    graded one would be a changed config, refused rather than measured wrong)."""
    steps = np.diff(coordinates)  # a float32 linspace's differ in the 7th digit, graded by 10x
    if not np.allclose(steps, steps[0], rtol=1e-4, atol=0.0):
        raise ValueError(f"coordinates {coordinates} are not evenly spaced (spacing: uniform)")


def curvature_at(coordinates: np.ndarray, values: np.ndarray, at: float) -> float:
    """The second difference (f(a - h) - 2 f(a) + f(a + h)) / h^2 of a curve sampled on a
    uniform grid, at its grid point ``a`` (h: the grid step): the curvature of the loss
    along the axis, biased by the quartic term h^2 f''''(a) / 12 on a coarse grid."""
    index = int(np.argmin(np.abs(coordinates - at)))
    if not 0 < index < len(coordinates) - 1 or not np.isclose(coordinates[index], at):
        raise ValueError(f"{at} is not an interior grid point of {coordinates}")
    require_uniform(coordinates)
    step = coordinates[index + 1] - coordinates[index]
    return float((values[index - 1] - 2 * values[index] + values[index + 1]) / step**2)


def local_minima(values: np.ndarray) -> int:
    """Grid points whose loss is below that of each of their (up to 8) neighbours: 1 on a
    convex bowl, more where the surface is chaotic (Li et al. section 6)."""
    padded = np.pad(values, 1, constant_values=np.inf)
    rows, cols = values.shape
    lower = np.ones(values.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                lower &= values < padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
    return int(lower.sum())


def plane_ratio_share(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> float:
    """Share of the interior grid points where the 2x2 Hessian of the plotted surface (by
    central differences) has |lambda_min / lambda_max| > 0.1 with lambda_min < 0: Li et
    al.'s Fig. 7 statistic for the 2D slice (the curvature one sees in the plot), not for
    the full Hessian, whose ratio needs ``landscape hessian``. Needs a uniform grid."""
    require_uniform(x)
    require_uniform(y)
    hx, hy = x[1] - x[0], y[1] - y[0]
    centre = values[1:-1, 1:-1]
    fxx = (values[1:-1, 2:] - 2 * centre + values[1:-1, :-2]) / hx**2
    fyy = (values[2:, 1:-1] - 2 * centre + values[:-2, 1:-1]) / hy**2
    fxy = (values[2:, 2:] - values[2:, :-2] - values[:-2, 2:] + values[:-2, :-2]) / (4 * hx * hy)
    eigenvalues = np.linalg.eigvalsh(np.stack([[fxx, fxy], [fxy, fyy]]).transpose(2, 3, 0, 1))
    low, high = eigenvalues[..., 0], eigenvalues[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        chaotic = (low < 0) & (np.abs(low / np.abs(high)) > RATIO_THRESHOLD)
    return float(chaotic.mean())


def measure_claims(folder: str | Path) -> dict:
    """The three claims of Li et al. measured on the gallery's files in ``folder``.

    Returns ``{"claims": [{"section", "paper", "measure", "values", "holds"}, ...]}``;
    ``holds`` is whether the measured numbers agree with the paper's statement at this
    scale (no tuning: the settings are those in this module).
    """
    folder = Path(folder)
    return {"claims": [sharpness_claim(folder), chaos_claim(folder), pca_claim(folder)]}


def trained(checkpoint: str | Path) -> dict:
    """What training reached at ``checkpoint`` (its metadata): a minimum to compare, or a
    net still far from one."""
    metadata = read_torch_file(Path(checkpoint), "gallery checkpoint")
    return {key: float(metadata[key]) for key in ("train_loss", "train_acc", "test_acc")}


def sharpness_claim(folder: Path) -> dict:
    values = {}
    for wd_name in WEIGHT_DECAYS:
        entry = {}
        for size, batch in (("small", SMALL_BATCH), ("large", LARGE_BATCH)):
            line = read(folder / f"line_{vgg_name(batch, wd_name)}.h5")
            entry[f"filter_curvature_{size}"] = curvature_at(
                line.grid.x, line.maps["train_loss"], 0.0
            )
            entry[f"trained_{size}"] = trained(line.config.model.checkpoint)
        path = read(folder / f"interpolation_{wd_name}.h5")
        coordinates, loss = path.grid.x, path.maps["train_loss"]
        entry["interpolation_rise_small"] = loss_rise(coordinates, loss, 0.0, INWARD)
        entry["interpolation_rise_large"] = loss_rise(coordinates, loss, 1.0, 1.0 - INWARD)
        norms = path.groups["endpoints"][1]["weight_norms"]
        entry["weight_norm_small"], entry["weight_norm_large"] = (float(n) for n in norms)
        entry["filter_large_sharper"] = (
            entry["filter_curvature_large"] > entry["filter_curvature_small"]
        )
        entry["interpolation_large_sharper"] = (
            entry["interpolation_rise_large"] > entry["interpolation_rise_small"]
        )
        values[wd_name] = entry
    filter_holds = all(entry["filter_large_sharper"] for entry in values.values())
    flips = len({entry["interpolation_large_sharper"] for entry in values.values()}) == 2
    return {
        "section": "5 (Figs. 2, 3)",
        "paper": "With filter normalization the large-batch minimum is (slightly) sharper "
        "than the small-batch one, with and without weight decay; without normalization "
        "(the interpolation between them) weight decay flips the order, because it "
        "changes the weights' scale.",
        "measure": f"VGG-9, batch {SMALL_BATCH} vs {LARGE_BATCH}, {len(WEIGHT_DECAYS)} weight "
        "decays: second difference of the training loss at each minimum along one "
        "filter-normalized random direction (seed 0, step = grid spacing); on the "
        "un-normalized line theta_s + alpha (theta_l - theta_s), the training loss's rise "
        f"from each end {INWARD} inwards (L(0.25) - L(0), L(0.75) - L(1): outside [0, 1] "
        "interpolated BatchNorm variances turn negative and the loss is undefined); L2 "
        "norms of the weights; training loss and accuracy reached.",
        "values": values,
        "holds": {
            "filter_normalized_large_sharper": filter_holds,
            "interpolation_order_flips_with_weight_decay": flips,
        },
    }


def chaos_claim(folder: Path) -> dict:
    values = {}
    for name in ("resnet20", "resnet20_noshort"):
        plane = read(folder / f"plane_{name}.h5")
        loss = plane.maps["train_loss"]
        values[name] = {
            "local_minima": local_minima(loss),
            "plane_ratio_share": plane_ratio_share(plane.grid.x, plane.grid.y, loss),
            "grid": list(loss.shape),
            "trained": trained(plane.config.model.checkpoint),
        }
    with_, without = values["resnet20"], values["resnet20_noshort"]
    return {
        "section": "6 (Figs. 5, 7)",
        "paper": "Removing shortcuts makes a deep net's surface chaotic (for ResNet-56 and "
        "-110; ResNet-20 with and without shortcuts look alike).",
        "measure": "ResNet-20 vs ResNet-20-noshort, filter-normalized random plane on "
        "[-1, 1]^2: strict local minima of the training loss on the grid (8 neighbours), "
        f"and the share of interior points whose 2D finite-difference Hessian has "
        f"|lambda_min / lambda_max| > {RATIO_THRESHOLD} with lambda_min < 0.",
        "values": values,
        "holds": {
            "noshort_more_local_minima": without["local_minima"] > with_["local_minima"],
            "noshort_larger_ratio_share": without["plane_ratio_share"] > with_["plane_ratio_share"],
        },
    }


def pca_claim(folder: Path) -> dict:
    name = vgg_name(SMALL_BATCH, "wd5e-4")
    surface = read(folder / f"pca_{name}.h5")
    ratios = [float(r) for r in surface.groups["trajectory"][1]["explained_variance_ratio"]]
    checkpoints = len(surface.groups["trajectory"][1]["checkpoints"])
    two = sum(ratios[:2])
    return {
        "section": "7 (Figs. 9, 10)",
        "paper": "The descent path is very low dimensional: 40 % to 90 % of its variation "
        "lies in two dimensions.",
        "measure": f"VGG-9 batch {SMALL_BATCH}, weight decay 5e-4: explained variance ratio "
        "of the top two PCA directions of theta_i - theta_n (weights only). With n "
        "checkpoints the differences span at most n - 1 dimensions, so two components "
        "explain at least 2 / (n - 1) for any path.",
        "values": {
            "explained_variance_ratio": ratios,
            "first_two": two,
            "checkpoints": checkpoints,
            "floor_for_any_path": min(1.0, 2 / max(checkpoints - 1, 1)),
        },
        "holds": {"first_two_at_least_40_percent": two >= 0.4},
    }


# --- writing --------------------------------------------------------------------------


def write_claims(claims: dict, out: str | Path) -> list[Path]:
    """``claims.json`` and ``claims.html`` (a table: the paper's statement, what was
    measured, the numbers, holds or not) into the folder ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "claims.json", out / "claims.html"]
    write_file(paths[0], json.dumps(claims, indent=2).encode(), "--out")
    write_file(paths[1], claims_html(claims).encode(), "--out")
    return paths


def claims_html(claims: dict) -> str:
    rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>".format(
            html.escape(claim["section"]),
            html.escape(claim["paper"]),
            html.escape(claim["measure"]),
            html.escape(json.dumps(claim["values"], indent=1)),
            "<br>".join(
                f"{html.escape(k)}: <b>{'yes' if v else 'no'}</b>"
                for k, v in claim["holds"].items()
            ),
        )
        for claim in claims["claims"]
    )
    scale = html.escape(json.dumps(claims.get("scale", {})))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Li et al. 2018 at digits "
        "scale: claims</title><style>td{vertical-align:top;border:1px solid #ccc;"
        "padding:4px}table{border-collapse:collapse}</style></head><body>"
        "<h1>Li et al. 2018 at digits scale: the paper's claims, measured</h1>"
        f"<p>Scale: {scale}</p><table><tr><th>Section</th><th>The paper</th>"
        f"<th>Measured here</th><th>Numbers</th><th>Holds here?</th></tr>{rows}</table>"
        "<p>Every surface's figures and numbers: <a href='report/index.html'>the report</a> "
        "(written unless the gallery ran with --no-figures).</p></body></html>\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landscape.gallery", description=__doc__)
    parser.add_argument("--out", default="results/gallery")
    parser.add_argument(
        "--quick", action="store_true", help="a fifth of the data, 1-2 epochs, tiny grids"
    )
    parser.add_argument("--no-figures", dest="figures", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    matplotlib.use("Agg")  # figures go to files, on machines without a display
    try:
        claims = run_gallery(args.out, args.quick, args.figures)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for claim in claims["claims"]:
        print(f"section {claim['section']}: {claim['holds']}")
    print(
        f"claims: {Path(args.out).resolve() / 'claims.html'} ({claims['scale']['seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
