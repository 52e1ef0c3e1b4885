"""The report of result files: one self-contained HTML page per surface or analysis file
(``landscape report``), with an index page when there are several.

A page holds what a reader of a run looks for first: its config, the checkpoint it was
computed at (path and sha256), each job's progress, the numbers of :func:`summary` and
every figure ``landscape plot`` draws, grouped by kind. Figures are embedded as base64
PNG and the page loads no script, font or style from anywhere: it opens offline, sent
by mail or copied off a cluster. A partly finished file gives a page that says so;
its figures and numbers are those of its done points.

Every number in a page carries ``data-key`` (its path in the summary, dotted) and
``data-value`` (full precision), so a test or a script reads the page's numbers back.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from landscape.atomic import check_writable, write_file
from landscape.errors import UserError, reporting_interrupt
from landscape.jobs import JOBS
from landscape.plot import STYLE, figures_by_job
from landscape.store import SurfaceFile, existing_surface, texts

# Basin width along an axis: the run of grid points through the centre where the
# training loss stays below its centre value plus BASIN_RISE.
BASIN_RISE = 0.1
# The share of Hessian points whose |lambda_min / lambda_max| exceeds this (Li et al.:
# above it, negative curvature is no longer negligible).
RATIO_THRESHOLD = 0.1
FIGURE_DPI = 100
# Sections of a surface's loss figures, by the end of a figure's name, in page order.
LOSS_SECTIONS = (
    ("Curves", ("curves", "interpolation")),
    ("Contours", ("_contour", "_contourf")),
    ("Heat maps", ("_heatmap",)),
    ("3D surfaces", ("_surface3d",)),
    ("Sections along Hessian eigenvectors", ("_sections",)),
)
JOB_SECTIONS = {
    "hessian": "Hessian eigenvalues (Li et al. Fig. 7)",
    "analysis": "Curvature over training (Sagun et al.; Fort & Ganguli)",
}


def finite_range(values: np.ndarray) -> tuple[float | None, float | None]:
    """(min, max) of the finite values ((None, None) if there are none)."""
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (None, None)


def map_numbers(values: np.ndarray, centre: tuple[int, ...]) -> dict:
    """A map's value at the ``centre`` index and the min and max of its computed values."""
    low, high = finite_range(values)
    return {"centre": float(values[centre]), "min": low, "max": high}


def centre_index(coordinates: np.ndarray) -> int:
    """The grid index nearest 0 along one axis: the plan's centre (the checkpoint)."""
    return int(np.argmin(np.abs(coordinates)))


def basin_extent(coordinates: np.ndarray, loss: np.ndarray, centre: int) -> dict | None:
    """The run of grid points around ``centre`` where ``loss`` < loss[centre] + BASIN_RISE
    along one axis: its end coordinates, width (to grid resolution: the true basin is at
    least this wide and less than one grid cell wider per side, the cell beyond each
    end, which on a graded axis grows away from the centre) and whether it reaches
    the grid's edge (then the basin is wider than the grid shows). None where the
    centre's loss is not computed yet."""
    if not np.isfinite(loss[centre]):
        return None
    inside = loss < loss[centre] + BASIN_RISE  # NaN (not computed) counts as outside
    low = centre
    while low > 0 and inside[low - 1]:
        low -= 1
    high = centre
    while high < loss.size - 1 and inside[high + 1]:
        high += 1
    return {
        "low": float(coordinates[low]),
        "high": float(coordinates[high]),
        "width": float(coordinates[high] - coordinates[low]),
        "reaches_edge": bool(low == 0 or high == loss.size - 1),
    }


def progress(surface: SurfaceFile) -> dict[str, dict[str, int]]:
    """Items done and planned per job."""
    return {
        job: {"done": int(surface.done(job).sum()), "total": int(surface.points(job).size)}
        for job in surface.jobs
    }


def surface_summary(surface: SurfaceFile) -> dict:
    """The numbers of a surface file's page (see :func:`summary`)."""
    grid, maps, attrs = surface.grid, surface.maps(), surface.attrs
    column = centre_index(grid.x)
    row = None if grid.y is None else centre_index(grid.y)
    at_centre = (column,) if row is None else (row, column)
    result = {
        "checkpoint": {"path": str(attrs["checkpoint_path"]), "sha256": attrs["checkpoint_sha256"]},
        "centre": [float(grid.x[column])] + ([] if row is None else [float(grid.y[row])]),
        "maps": {
            name: map_numbers(maps[name], at_centre)
            for name in ("train_loss", "train_acc", "test_loss", "test_acc")
            if name in maps
        },
    }
    if "train_loss" in maps:
        loss = maps["train_loss"]
        lines = {"x": (grid.x, loss if row is None else loss[row, :])}
        if row is not None:
            lines["y"] = (grid.y, loss[:, column])
        result["basin"] = {
            "threshold": f"train_loss < centre + {BASIN_RISE:g}",
            **{
                axis: basin_extent(coordinates, line, at_centre[-1] if axis == "x" else row)
                for axis, (coordinates, line) in lines.items()
            },
        }
    if "lambda_ratio" in maps and "hessian" in surface.jobs:
        done = surface.done("hessian").astype(bool)
        ratio = maps["lambda_ratio"][done]
        known = ratio[np.isfinite(ratio)]
        ratio_min, ratio_max = finite_range(ratio)
        result["hessian"] = {
            "points": int(done.sum()),
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "threshold": RATIO_THRESHOLD,
            "share_above": float((known > RATIO_THRESHOLD).mean()) if known.size else None,
        }
    trace = surface.group("trace")
    if trace is not None:
        trace_attrs = trace[1]
        result["trace"] = {
            name: {
                "label": str(trace_attrs[f"{name}_label"]),
                "mean": float(trace_attrs[f"{name}_mean"]),
                "half_width": float(trace_attrs[f"{name}_half_width"]),
                "confidence": float(trace_attrs["confidence"]),
            }
            for name in ("hutchinson", "projection")
        }
    variances = [
        float(axis["explained_variance_ratio"])
        for axis in surface.axis_attrs()
        if "explained_variance_ratio" in axis
    ]
    if variances:
        result["pca_explained_variance"] = variances
    return result


def analysis_summary(surface: SurfaceFile) -> dict:
    """The numbers of an analysis file's page, one row per done checkpoint."""
    maps = surface.maps()
    rows, attrs = surface.group("checkpoints")
    settings = surface.work("analysis").attrs
    done = np.flatnonzero(surface.done("analysis"))
    paths, hashes = texts(rows["path"]), texts(rows["sha256"])
    checkpoints = []
    for item in done:
        entry = {
            "epoch": int(rows["epoch"][item]),
            "train_loss": float(maps["train_loss"][item]),
            "train_acc": float(maps["train_acc"][item]),
        }
        if "outliers" in maps:
            entry["outliers"] = int(maps["outliers"][item])
        if "trace" in maps:
            entry["trace"] = float(maps["trace"][item])
            entry["trace_half_width"] = trace_half_width(float(maps["trace_se"][item]), settings)
        checkpoints.append(entry)
    return {
        "checkpoint": [{"path": p, "sha256": h} for p, h in zip(paths, hashes)],
        "classes": int(attrs["classes"]),
        "checkpoints": checkpoints,
    }


def trace_half_width(standard_error: float, settings: dict) -> float:
    """The half width of tr(H)'s interval: Student-t with trace_samples - 1 degrees of
    freedom at the plan's confidence, times the stored standard error."""
    confidence, samples = float(settings["confidence"]), int(settings["trace_samples"])
    return float(stats.t.ppf(0.5 + confidence / 2, samples - 1) * standard_error)


def summary(path: str | Path) -> dict:
    """The numbers a report page shows for a result file, as plain data.

    Both kinds: ``kind``, ``progress`` (done and total items per job), ``finished``,
    ``checkpoint`` (path and sha256; a list for an analysis file). A surface adds
    ``maps`` (each loss/accuracy map's value at the centre, the grid point nearest
    (0, 0), and the min and max of its computed values), ``basin`` (per axis, where
    the training loss stays below its centre value + BASIN_RISE along the axis
    through the centre), ``hessian``
    (the range of |lambda_min / lambda_max| over the done Hessian points and the share
    of them above RATIO_THRESHOLD), ``trace`` (``landscape trace``'s estimates with their
    interval half widths) and ``pca_explained_variance`` (of each PCA axis), each where
    the file has it. An analysis adds ``classes`` and a row per done checkpoint: epoch,
    training loss and accuracy, outlier count and tr(H) with its interval half width.
    """
    with SurfaceFile.open(existing_surface(path)) as surface:
        jobs = progress(surface)
        numbers = (
            analysis_summary(surface) if surface.kind == "analysis" else (surface_summary(surface))
        )
        return {
            "file": str(path),
            "kind": surface.kind,
            "progress": jobs,
            "finished": all(job["done"] == job["total"] for job in jobs.values()),
            **numbers,
        }


def png_data(figure) -> str:
    """The figure as a base64 PNG ``data:`` URI (closed after)."""
    image = io.BytesIO()
    with plt.rc_context(STYLE):
        figure.savefig(image, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()


def figure_sections(surface: SurfaceFile) -> list[tuple[str, dict[str, str]]]:
    """``[(section title, {figure name: PNG data URI})]``: the loss job's figures by kind
    (LOSS_SECTIONS), then each other job's."""
    sections = []
    for job, figures in figures_by_job(surface).items():
        if job == "loss":
            for title, endings in LOSS_SECTIONS:
                chosen = [name for name in figures if name.endswith(endings)]
                sections.append((title, {name: png_data(figures.pop(name)) for name in chosen}))
            sections.append(("Other figures", {n: png_data(f) for n, f in figures.items()}))
        else:
            sections.append((JOB_SECTIONS[job], {n: png_data(f) for n, f in figures.items()}))
    return [(title, images) for title, images in sections if images]


def number(value, key: str) -> str:
    """A number for the page: 6 significant digits shown, all of them in data-value."""
    if value is None:
        return "—"
    shown = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'<span class="number" data-key="{key}" data-value="{value!r}">{shown}</span>'


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def surface_numbers(numbers: dict) -> str:
    """The numbers of a surface page as HTML tables."""
    parts = [
        "<h2>Numbers</h2>",
        f"<p>Centre (the checkpoint): grid point "
        f"({', '.join(f'{c:g}' for c in numbers['centre'])}).</p>",
    ]
    rows = [
        [html.escape(name), *(number(entry[k], f"maps.{name}.{k}") for k in entry)]
        for name, entry in numbers["maps"].items()
    ]
    parts.append(table(["map", "at the centre", "min", "max"], rows))
    if "basin" in numbers:
        basin = numbers["basin"]
        rows = [
            [
                axis,
                *(
                    number(None if extent is None else extent[k], f"basin.{axis}.{k}")
                    for k in ("low", "high", "width")
                ),
                ""
                if extent is None
                else ("yes: wider than the grid" if extent["reaches_edge"] else "no"),
            ]
            for axis, extent in basin.items()
            if axis != "threshold"
        ]
        parts.append(f"<h3>Basin width where {html.escape(basin['threshold'])}</h3>")
        parts.append(
            "<p>Along each axis through the centre; to grid resolution (the basin is "
            "less than one grid cell wider per side, the cell beyond each end).</p>"
        )
        parts.append(table(["axis", "from", "to", "width", "reaches the edge"], rows))
    if "hessian" in numbers:
        hessian = numbers["hessian"]
        parts.append("<h3>|λ<sub>min</sub>/λ<sub>max</sub>| over the done Hessian points</h3>")
        parts.append(
            table(
                ["points", "min", "max", f"share above {hessian['threshold']:g}"],
                [
                    [
                        number(hessian["points"], "hessian.points"),
                        number(hessian["ratio_min"], "hessian.ratio_min"),
                        number(hessian["ratio_max"], "hessian.ratio_max"),
                        number(hessian["share_above"], "hessian.share_above"),
                    ]
                ],
            )
        )
    if "trace" in numbers:
        rows = [
            [
                html.escape(entry["label"]),
                number(entry["mean"], f"trace.{name}.mean"),
                "± " + number(entry["half_width"], f"trace.{name}.half_width"),
                f"{entry['confidence']:.0%}",
            ]
            for name, entry in numbers["trace"].items()
        ]
        parts.append("<h3>tr(H) at the centre (<code>landscape trace</code>)</h3>")
        parts.append(table(["estimator", "estimate", "interval", "confidence"], rows))
    if "pca_explained_variance" in numbers:
        rows = [
            [f"PCA-{axis + 1}", number(value, f"pca_explained_variance.{axis}")]
            for axis, value in enumerate(numbers["pca_explained_variance"])
        ]
        parts.append("<h3>Explained variance of the training path (PCA axes)</h3>")
        parts.append(table(["axis", "share of variance"], rows))
    return "\n".join(parts)


def analysis_numbers(numbers: dict) -> str:
    """The numbers of an analysis page: one row per done checkpoint."""
    columns = [
        ("epoch", "epoch"),
        ("train_loss", "training loss"),
        ("train_acc", "training accuracy"),
        ("outliers", f"outliers (C = {numbers['classes']})"),
        ("trace", "tr(H)"),
        ("trace_half_width", "± (interval)"),
    ]
    present = [
        (key, title) for key, title in columns if any(key in r for r in numbers["checkpoints"])
    ]
    rows = [
        [number(row.get(key), f"checkpoints.{index}.{key}") for key, _ in present]
        for index, row in enumerate(numbers["checkpoints"])
    ]
    return "<h2>Numbers per done checkpoint</h2>\n" + table([t for _, t in present], rows)


PAGE_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
.partial { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 560px; }
"""


def page(numbers: dict, config: str, sections: list[tuple[str, dict[str, str]]]) -> str:
    """The HTML of one file's page."""
    path = numbers["file"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(Path(path).name)}</title><style>{PAGE_STYLE}</style></head><body>",
        f"<h1>{html.escape(Path(path).name)}</h1>",
        f"<p>{html.escape(numbers['kind'])} file <code>{html.escape(path)}</code></p>",
    ]
    jobs = numbers["progress"]
    if not numbers["finished"]:
        left = ", ".join(
            f"{job} {entry['done']} of {entry['total']}" for job, entry in jobs.items()
        )
        commands = " ".join(
            f"<code>landscape {JOBS[job].verb} {html.escape(path)}</code>"
            for job, entry in jobs.items()
            if entry["done"] < entry["total"]
        )
        parts.append(
            f'<p class="partial" id="partial">Partly finished: {left} done. The figures and '
            f"numbers show the done points only. Go on with {commands}.</p>"
        )
    rows = [
        [
            html.escape(job),
            number(e["done"], f"progress.{job}.done"),
            number(e["total"], f"progress.{job}.total"),
        ]
        for job, e in jobs.items()
    ]
    parts += ["<h2>Progress</h2>", table(["job", "done", "planned"], rows)]
    checkpoints = numbers["checkpoint"]
    checkpoints = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    parts.append("<h2>Checkpoint fingerprint</h2>")
    parts.append(
        table(
            ["path", "sha256"],
            [
                [f"<code>{html.escape(c['path'])}</code>", f"<code>{c['sha256']}</code>"]
                for c in checkpoints
            ],
        )
    )
    parts.append(
        analysis_numbers(numbers) if numbers["kind"] == "analysis" else surface_numbers(numbers)
    )
    parts.append("<h2>Figures</h2>")
    if not sections:
        parts.append("<p>No figure yet: no point is done.</p>")
    for title, images in sections:
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts += [
            f'<figure><img alt="{name}" src="{data}"><figcaption>{name}</figcaption></figure>'
            for name, data in images.items()
        ]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config)}</pre>", "</body></html>"]
    return "\n".join(parts)


def index_page(pages: list[tuple[Path, dict]]) -> str:
    """The index of several pages: a row per file with its progress."""
    rows = [
        [
            f'<a href="{html.escape(target.name)}">{html.escape(Path(n["file"]).name)}</a>',
            html.escape(n["kind"]),
            ", ".join(f"{job} {e['done']}/{e['total']}" for job, e in n["progress"].items()),
            "finished" if n["finished"] else "partly finished",
        ]
        for target, n in pages
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>landscape report</title>',
            f"<style>{PAGE_STYLE}</style></head><body><h1>landscape report</h1>",
            table(["file", "kind", "done / planned", "state"], rows),
            "</body></html>",
        ]
    )


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    """Write a page per result file into folder ``out`` (``<file stem>.html``) and, for
    several files, ``index.html`` linking them; returns the page to open first."""
    out = Path(out)
    check_writable(out, "--out", folder=True)
    paths = [existing_surface(path) for path in paths]
    stems = [path.stem for path in paths]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1 or stem == "index"})
    if clashes:
        raise UserError(
            f"report: several files, or a file named index, would write {clashes[0]}.html; "
            "rename one of them or report them into separate folders"
        )
    pages = []
    with reporting_interrupt(lambda: f"{len(pages)} pages written"):
        for path in paths:
            numbers = summary(path)
            with SurfaceFile.open(path) as surface:
                config = str(surface.handle.attrs["config"])
                sections = figure_sections(surface)
            target = out / f"{path.stem}.html"
            write_file(target, page(numbers, config, sections).encode(), "--out")
            pages.append((target, numbers))
    if len(pages) == 1:
        return pages[0][0]
    index = out / "index.html"
    write_file(index, index_page(pages).encode(), "--out")
    return index
