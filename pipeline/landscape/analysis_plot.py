"""Figures of an analysis file: the Hessian's spectrum and what lives in it, at each
checkpoint and over training (Sagun et al. 2017; Fort & Ganguli 2019).

Only what the file holds is drawn: a quantity the plan did not select has no maps and
no figure, and a checkpoint whose done flag is unset (not computed yet, or its process
killed before the flag) is left out, so a running or interrupted analysis draws the
checkpoints it has. Checkpoints go along x by the epoch training recorded, or by their
number in the file where any has none (epoch -1). Axis labels are short; each figure
ends in a note giving what every map it draws holds (the maps' description attributes:
estimator, tolerance, known bias), so a figure read on its own says what it shows.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from landscape.store import SurfaceFile

# The log density is floored at this fraction of its peak: a Gaussian's tails fall to
# 1e-78 on the grid, and a log axis down there would spend its decades on rounding.
DENSITY_FLOOR = 1e-6
DENSITY_PANELS = 6  # checkpoints in the density figure, chosen evenly among the done ones
SPLIT_ROWS = 3  # checkpoints in the H, G, H - G figure
CLUSTERING_GROUPS = 8  # checkpoints in the clustering bars
OPERATORS = (("", "H"), ("gn_", "G (Gauss-Newton)"), ("residual_", "H - G"))
# Fort & Ganguli Fig. 1's colours: green same logit and class, red same logit, blue
# different logits; orange for the pairs of two classes their figure leaves out.
CLUSTERING_BARS = (
    ("same_logit_same_class", "same logit, same class", "tab:green"),
    ("same_logit", "same logit", "tab:red"),
    ("same_logit_different_class", "same logit, different classes", "tab:orange"),
    ("different_logits", "different logits", "tab:blue"),
)
CLUSTERING_TRENDS = (
    ("logit_variance", "logit variance"),
    ("logit_gradient_norm", "logit gradient norm"),
    ("weight_norm", "weight norm ||θ||"),
)


@dataclass(frozen=True)
class Checkpoints:
    """The done checkpoints of an analysis file: ``items`` (their rows in the maps,
    ascending), ``x`` (where each goes along x), the x axis's ``label``, the classes
    ``classes`` (C) and what the values were computed with (``settings``, the done
    flags' attributes: gap, confidence, trace_samples, ...)."""

    items: np.ndarray
    x: np.ndarray
    label: str
    classes: int
    settings: dict

    @classmethod
    def of(cls, surface: SurfaceFile) -> Checkpoints:
        items = np.flatnonzero(surface.done("analysis"))
        rows, attrs = surface.group("checkpoints")
        epochs = np.asarray(rows["epoch"])
        recorded = bool((epochs >= 0).all())
        x = epochs if recorded else np.arange(epochs.size)
        label = "epoch" if recorded else "checkpoint (no epoch recorded)"
        settings = surface.work("analysis").attrs
        return cls(items, x[items], label, int(attrs["classes"]), settings)

    def label_axis(self, axis: Axes) -> None:
        """Label ``axis``'s x as the checkpoints' axis, with whole-number ticks."""
        axis.set_xlabel(self.label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))

    def name(self, position: int) -> str:
        word = "epoch" if self.label == "epoch" else "checkpoint"
        return f"{word} {self.x[position]}"

    def chosen(self, count: int) -> np.ndarray:
        """Positions (into ``items``) of at most ``count`` checkpoints spread evenly from
        the first done to the last."""
        total = self.items.size
        return np.unique(np.round(np.linspace(0, total - 1, min(count, total))).astype(int))

    def top_j(self, k: int) -> int:
        """j = C where H's top-k reach it, else k (a plan given top_k < C)."""
        return min(self.classes, k)


def analysis_figures(surface: SurfaceFile, maps: dict, labels: list[str]) -> dict[str, Figure]:
    """The analysis job's figures, from its done checkpoints (none before the first):
    spectral densities, top eigenvalues, the gradient's share in the top subspace,
    tr(H)/||H||_F, the H / G / H - G split and the logit-gradient clustering, each where
    the plan selected its quantity. ``labels`` (["checkpoint"]) is not needed: the x
    axis is the checkpoints' epochs."""
    checkpoints = Checkpoints.of(surface)
    if checkpoints.items.size == 0:
        return {}
    done = {name: values[checkpoints.items] for name, values in maps.items()}
    drawn = {
        "density": ("density", plot_densities),
        "top_eigenvalues": ("top_eigenvalues", plot_top_eigenvalues),
        "gradient_overlap": ("gradient_fractions", plot_gradient_overlap),
        "trace": ("trace", plot_trace),
        "gauss_newton_spectra": ("gn_density", plot_gauss_newton_spectra),
        "hg_overlap": ("hg_overlap", plot_hg_overlap),
        "clustering": ("same_logit", plot_clustering),
    }
    figures = {}
    for stem, (needed, draw) in drawn.items():
        if needed in done:
            figure, shown = draw(checkpoints, done)
            add_descriptions(figure, surface, shown)
            figures[stem] = figure
    return figures


def floored(density: np.ndarray) -> np.ndarray:
    """``density`` raised to DENSITY_FLOOR of its peak, so a log axis shows it."""
    return np.maximum(density, DENSITY_FLOOR * density.max())


def draw_density(
    axis: Axes,
    grid: np.ndarray,
    density: np.ndarray,
    top: np.ndarray | None,
    outliers: int = 0,
) -> None:
    """A spectral density on a log axis, with the top-k eigenvalues as markers along its
    peak: the first ``outliers`` red, the rest grey."""
    shown = floored(density)
    axis.plot(grid, shown, color="tab:blue", lw=1.2, label="density")
    axis.set_yscale("log")
    if top is not None:
        peak = np.full(top.size, shown.max())
        if outliers:
            axis.plot(top[:outliers], peak[:outliers], "v", color="tab:red", label="outliers")
        if outliers < top.size:
            axis.plot(
                top[outliers:], peak[outliers:], "v", color="0.5", label=f"top-{top.size}, bulk"
            )


def plot_densities(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Sagun et al. Fig. 1 at up to DENSITY_PANELS checkpoints: the SLQ density of H (log
    scale: the outliers' mass is ~1/P of the bulk's), the top-k eigenvalues, the outliers
    in red, the bulk edge lambda_{c+1} and the threshold edge x (1 + gap) an eigenvalue
    must clear to be an outlier (:func:`landscape.curvature.spectrum.count_outliers`)."""
    chosen = checkpoints.chosen(DENSITY_PANELS)
    columns = min(3, chosen.size)
    rows = -(-chosen.size // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    has_top = "top_eigenvalues" in maps
    gap = float(checkpoints.settings["gap"])
    for axis, position in zip(panels.flat, chosen):
        title = checkpoints.name(position)
        if has_top:
            outliers = int(maps["outliers"][position])
            edge = maps["bulk_edge"][position]
            draw_density(
                axis,
                maps["density_grid"][position],
                maps["density"][position],
                maps["top_eigenvalues"][position],
                outliers,
            )
            axis.axvline(edge, color="black", ls="--", lw=0.8, label="bulk edge")
            axis.axvline(
                edge * (1 + gap), color="black", ls=":", lw=0.8, label=f"edge × (1 + {gap:g})"
            )
            title += f": outliers = {outliers}, C = {checkpoints.classes}"
        else:
            draw_density(axis, maps["density_grid"][position], maps["density"][position], None)
            title += f", C = {checkpoints.classes}"
        axis.set_title(title)
        axis.set_xlabel("eigenvalue of H")
        axis.set_ylabel("spectral density")
    for axis in panels.flat[chosen.size :]:
        axis.set_visible(False)
    legend_of_all(panels.flat[0], panels.flat)
    figure.tight_layout()
    shown = ["density", "density_sigma"]
    return figure, shown + (["top_eigenvalues", "outliers", "bulk_edge"] if has_top else [])


def legend_of_all(axis: Axes, panels) -> None:
    """One legend in ``axis`` with every label drawn in any of ``panels`` (a checkpoint
    without outliers draws no red marker, yet another one does)."""
    entries = {}
    for panel in panels:
        handles, labels = panel.get_legend_handles_labels()
        entries.update({label: handle for handle, label in zip(handles, labels)})
    axis.legend(list(entries.values()), list(entries), loc="best", fontsize=8, framealpha=0.8)


def log_or_symlog(axis: Axes, values: np.ndarray) -> None:
    """A log y axis, or where some values are <= 0 a symmetric log one (linear within
    1e-3 of the largest magnitude), so no value is dropped."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        axis.set_yscale("log")
    elif finite.size:
        axis.set_yscale("symlog", linthresh=1e-3 * np.abs(finite).max())


def plot_top_eigenvalues(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Sagun et al. / Fort & Ganguli: H's top-k eigenvalues over training (the outliers
    circled in red), with the training loss on a second axis; the top curvature rises
    early in training and then falls as the loss does."""
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    top = maps["top_eigenvalues"]
    k = top.shape[1]
    colours = colormaps["viridis"](np.linspace(0, 0.9, k))
    for i in range(k):
        axis.plot(checkpoints.x, top[:, i], "-o", ms=3, color=colours[i], label=f"λ{i + 1}")
    outlier = np.arange(k)[None, :] < maps["outliers"][:, None]
    x = np.broadcast_to(checkpoints.x[:, None], top.shape)
    axis.plot(x[outlier], top[outlier], "o", mfc="none", mec="tab:red", ms=8, label="outlier")
    log_or_symlog(axis, top)
    checkpoints.label_axis(axis)
    axis.set_ylabel("top eigenvalues of H")
    loss_axis = axis.twinx()
    loss_axis.plot(checkpoints.x, maps["train_loss"], "--", color="black", label="training loss")
    log_or_symlog(loss_axis, maps["train_loss"])
    loss_axis.set_ylabel("training loss")
    handles, names = axis.get_legend_handles_labels()
    more_handles, more_names = loss_axis.get_legend_handles_labels()
    axis.legend(handles + more_handles, names + more_names, fontsize=8, ncol=2, frameon=False)
    axis.set_title(f"C = {checkpoints.classes}")
    figure.tight_layout()
    return figure, ["top_eigenvalues", "outliers", "train_loss"]


def plot_gradient_overlap(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Gur-Ari et al. / Fort & Ganguli: the full gradient's share of squared norm in the
    span of H's top-j eigenvectors, against j at each checkpoint (coloured by x), and at
    j = C over training."""
    fractions = maps["gradient_fractions"]
    k = fractions.shape[1]
    j = checkpoints.top_j(k)
    figure, (curves, trend) = plt.subplots(1, 2, figsize=(11, 4.2))
    colour = ScalarMappable(Normalize(checkpoints.x.min(), checkpoints.x.max()), "viridis")
    for x, row in zip(checkpoints.x, fractions):
        curves.plot(np.arange(1, k + 1), row, "-o", ms=3, color=colour.to_rgba(x))
    curves.axvline(j, color="black", ls=":", lw=0.8)
    figure.colorbar(colour, ax=curves, label=checkpoints.label)
    curves.set_xlabel("j (top-j eigenvectors of H)")
    curves.set_ylabel("||P_j g||² / ||g||²")
    curves.set_ylim(0, 1.02)
    trend.plot(checkpoints.x, fractions[:, j - 1], "-o", ms=3, color="tab:blue")
    trend.set_ylim(0, 1.02)
    checkpoints.label_axis(trend)
    trend.set_ylabel(f"gradient's share in the top-{j} subspace")
    trend.set_title(f"j = {j} (C = {checkpoints.classes})")
    figure.tight_layout()
    return figure, ["gradient_fractions"]


def half_widths(errors: np.ndarray, settings: dict) -> np.ndarray:
    """Half-widths of the intervals the trace estimator reports: Student-t with
    trace_samples - 1 degrees of freedom at the plan's confidence times the stored
    standard errors (:mod:`landscape.curvature.trace`)."""
    confidence, samples = float(settings["confidence"]), int(settings["trace_samples"])
    return stats.t.ppf(0.5 + confidence / 2, samples - 1) * errors


def draw_estimate(
    axis: Axes, checkpoints: Checkpoints, maps: dict, name: str, label: str
) -> np.ndarray:
    """Map ``name`` over the checkpoints inside its confidence band (from ``<name>_se``);
    returns the band's edges, (2, n)."""
    values = maps[name]
    width = half_widths(maps[f"{name}_se"], checkpoints.settings)
    confidence = float(checkpoints.settings["confidence"])
    band = np.stack([values - width, values + width])
    axis.fill_between(
        checkpoints.x, *band, color="tab:blue", alpha=0.25, label=f"{confidence:.0%} interval"
    )
    axis.plot(checkpoints.x, values, "-o", ms=3, color="tab:blue", label=label)
    checkpoints.label_axis(axis)
    axis.set_ylabel(label)
    axis.legend(fontsize=8, frameon=False)
    return band


def plot_trace(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Fort & Ganguli: tr(H)/||H||_F over training (sqrt of an effective rank: P equal
    eigenvalues give sqrt(P), one dominant eigenvalue 1) beside tr(H), each with its
    confidence band; tr(H) on a log axis (symmetric where the band reaches 0 or below):
    it falls by decades as the loss does."""
    figure, (ratio, trace) = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_estimate(ratio, checkpoints, maps, "trace_over_frobenius", "tr(H) / ||H||_F")
    log_or_symlog(trace, draw_estimate(trace, checkpoints, maps, "trace", "tr(H)"))
    figure.tight_layout()
    return figure, ["trace_over_frobenius", "trace_over_frobenius_se", "trace", "trace_se"]


def plot_gauss_newton_spectra(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Sagun et al. / Papyan: the densities of H, of its Gauss-Newton part G = J^T H_out
    J and of the rest H - G side by side (shared x per row), at up to SPLIT_ROWS
    checkpoints, each with its top-k eigenvalues: G carries H's outliers, H - G only
    spreads the bulk (both signs). H's column needs the density quantity."""
    operators = [(p, name) for p, name in OPERATORS if f"{p}density" in maps]
    chosen = checkpoints.chosen(SPLIT_ROWS)
    figure, panels = plt.subplots(
        chosen.size,
        len(operators),
        figsize=(4.4 * len(operators), 3.4 * chosen.size),
        sharex="row",
        squeeze=False,
    )
    for row, position in zip(panels, chosen):
        for axis, (prefix, name) in zip(row, operators):
            top = maps.get(f"{prefix}top_eigenvalues")
            outliers = int(maps["outliers"][position]) if prefix == "" and top is not None else 0
            draw_density(
                axis,
                maps[f"{prefix}density_grid"][position],
                maps[f"{prefix}density"][position],
                None if top is None else top[position],
                outliers,
            )
            axis.set_title(f"{name}, {checkpoints.name(position)}")
            axis.set_xlabel(f"eigenvalue of {name.split(' (')[0]}")
        row[0].set_ylabel("spectral density")
    legend_of_all(panels[0, 0], panels.flat)
    figure.tight_layout()
    shown = [f"{p}{name}" for p, _ in operators for name in ("density", "top_eigenvalues")]
    return figure, [name for name in shown if name in maps]


def plot_hg_overlap(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """How much of H's top-j eigenspace is G's, over training, at j = C and j = k."""
    overlap = maps["hg_overlap"]
    k = overlap.shape[1]
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for j in sorted({checkpoints.top_j(k), k}):
        axis.plot(checkpoints.x, overlap[:, j - 1], "-o", ms=3, label=f"top-{j}")
    axis.set_ylim(0, 1.02)
    checkpoints.label_axis(axis)
    axis.set_ylabel("overlap of H's and G's top-j eigenspaces")
    axis.set_title(f"C = {checkpoints.classes}")
    axis.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    return figure, ["hg_overlap"]


def plot_clustering(checkpoints: Checkpoints, maps: dict) -> tuple[Figure, list[str]]:
    """Fort & Ganguli Fig. 1: mean cosines of logit gradients, grouped per checkpoint
    (up to CLUSTERING_GROUPS): gradients of the same logit align whatever the sample,
    more so within a class, and those of different logits are near orthogonal; and
    their Fig. 4: logit variance, logit-gradient norm and weight norm over training."""
    chosen = checkpoints.chosen(CLUSTERING_GROUPS)
    figure, panels = plt.subplots(
        1, 4, figsize=(17, 4.2), width_ratios=(max(2, chosen.size), 1.6, 1.6, 1.6)
    )
    bars = panels[0]
    width = 0.8 / len(CLUSTERING_BARS)
    for number, (name, label, colour) in enumerate(CLUSTERING_BARS):
        offset = (number - (len(CLUSTERING_BARS) - 1) / 2) * width
        bars.bar(
            np.arange(chosen.size) + offset, maps[name][chosen], width, color=colour, label=label
        )
    bars.axhline(0, color="black", lw=0.8)
    bars.set_xticks(np.arange(chosen.size), [checkpoints.name(p) for p in chosen])
    bars.set_ylabel("mean cosine of logit gradients")
    bars.legend(fontsize=8, frameon=False)
    for axis, (name, label) in zip(panels[1:], CLUSTERING_TRENDS):
        axis.plot(checkpoints.x, maps[name], "-o", ms=3, color="tab:purple")
        checkpoints.label_axis(axis)
        axis.set_ylabel(label)
    panels[1].set_yscale("log")
    figure.tight_layout()
    return figure, [name for name, _, _ in CLUSTERING_BARS] + [n for n, _ in CLUSTERING_TRENDS]


def add_descriptions(figure: Figure, surface: SurfaceFile, names: list[str]) -> None:
    """A note under the figure: ``name: description`` of each map it draws, wrapped to
    the figure's width (``savefig(bbox_inches="tight")`` keeps it)."""
    width = int(figure.get_figwidth() * 15)
    lines = [
        textwrap.fill(f"{name}: {surface.description(name)}", width, subsequent_indent="    ")
        for name in names
    ]
    figure.text(0.01, 0, "\n".join(lines), va="top", ha="left", fontsize=7, color="0.3")
