"""What a result file holds right now: points done per job (merged, and waiting in part
files), rate, time left, and the state of each job submitted to SLURM (the record and the
states come from :mod:`landscape.slurm`; this module only formats them). A surface file
lists each map's range; an analysis file, one line of headline numbers per done
checkpoint (:data:`ANALYSIS_COLUMNS`).

Reads without locking, so it works while a job is writing the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from landscape.errors import UserError
from landscape.grid import cell_at_origin, uniform_cell
from landscape.jobs import JOBS
from landscape.parts import finished_in_parts
from landscape.store import SurfaceFile

RATE_WINDOW = 20


def finish_rate(finished: np.ndarray) -> float | None:
    """Points per second over the last ``RATE_WINDOW`` finished points (None if < 2)."""
    times = np.sort(finished[np.isfinite(finished)])[-RATE_WINDOW:]
    if times.size < 2 or times[-1] <= times[0]:
        return None
    return (times.size - 1) / (times[-1] - times[0])


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def map_line(name: str, values: np.ndarray) -> str:
    known = np.isfinite(values)
    line = f"    {name}: {int(known.sum())} values"
    if known.any():
        line += f", min {np.nanmin(values):.6g}, max {np.nanmax(values):.6g}"
    return line


def surface_status(path: str | Path) -> str:
    """A few human-readable lines describing the state of a surface or analysis file."""
    with SurfaceFile.open(path) as surface:
        lines = analysis_lines(surface) if surface.kind == "analysis" else surface_lines(surface)
    lines += submission_status(Path(path))
    return "\n".join(lines)


def surface_lines(surface: SurfaceFile) -> list[str]:
    """The grid, its axes, each job's progress and the range of each of its maps."""
    grid, attrs = surface.grid, surface.attrs
    shape = " x ".join(str(n) for n in grid.shape[::-1])
    lines = [
        f"{surface.path}: {len(grid.shape)}D grid {shape}, model {attrs['model']} on "
        f"{attrs['dataset']}, planned {attrs['created']}"
    ]
    lines += [f"  {label}" for label in surface.axis_labels()]
    lines += [
        f"  {axis}: graded spacing, cell at the minimum {cell_at_origin(coordinates):.4g} "
        f"(uniform: {uniform_cell(coordinates):.4g})"
        for axis, coordinates, spacing in zip("xy", grid.axes, grid.spacing)
        if spacing == "graded"
    ]
    maps = surface.maps()
    for job in surface.jobs:
        lines.append(job_progress(surface, job))
        derived = [derived.name for derived in JOBS[job].derived_maps(surface.config)]
        for name in surface.job_maps(job) + derived:
            lines.append(map_line(name, maps[name]))
    trace = surface.group("trace")
    if trace is not None:
        lines += trace_lines(trace[1])
    precision = precision_line(surface)
    if precision is not None:
        lines.append(precision)
    return lines


def precision_line(surface: SurfaceFile) -> str | None:
    """One line on a reduced-precision or TF32 surface (None for IEEE float32/float64):
    the dtype, and per loss and accuracy map its measured |reduced - float32| at the
    centre and the corner, the loss's also relative (:mod:`landscape.precision`)."""
    check = surface.group("precision")
    tf32 = surface.attrs.get("float32_products") == "tf32"
    if check is None and not tf32:
        return None
    parts = []
    if check is not None:
        attrs = check[1]
        dtype = attrs["dtype"]
        differences = []
        for name in surface.config.maps:
            if f"{name}_abs_difference" not in attrs:
                continue
            centre, corner = attrs[f"{name}_abs_difference"]
            text = f"{name} {centre:.2g}, {corner:.2g}"
            if f"{name}_rel_difference" in attrs:
                text += " (rel {:.2g}, {:.2g})".format(*attrs[f"{name}_rel_difference"])
            differences.append(text)
        corner = "(" + ", ".join(f"{c:g}" for c in attrs["points"][1]) + ")"
        parts.append(
            f"{dtype} autocast loss maps (float32 losses; curvature in "
            f"{attrs['curvature_dtype']}); |{dtype} - float32| at the centre, corner {corner} "
            f"(on {attrs['device']}, at plan): " + "; ".join(differences)
        )
    if tf32:
        parts.append("float32 products in TF32 on CUDA (evaluation.tf32)")
    return "  precision: " + "; ".join(parts)


# The columns of an analysis file's status: (header, map, which entry of a checkpoint's
# value: None for a number, 0 for the first of k, "C" for the one at j = C of a top-j
# series (j = k where k < C), "of C" for a count of C); a column whose map the file lacks
# (its quantity not selected) is left out.
ANALYSIS_COLUMNS = (
    ("train loss", "train_loss", None),
    ("lambda_1", "top_eigenvalues", 0),
    ("outliers", "outliers", "of C"),
    ("grad in top-{j}", "gradient_fractions", "C"),
    ("tr(H)/||H||_F", "trace_over_frobenius", None),
    ("H/G top-{j}", "hg_overlap", "C"),
)


def analysis_cell(maps: dict, name: str, entry, item: int, classes: int) -> str:
    """Checkpoint ``item``'s value of map ``name`` as an :data:`ANALYSIS_COLUMNS` cell;
    an outlier count reads ``2 of 3``, or ``5+ of 3`` where all top-k are outliers
    (there may be more)."""
    value = maps[name][item]
    if entry == "of C":
        more = "+" if maps["outliers_saturated"][item] else ""
        return f"{int(value)}{more} of {classes}"
    if entry == "C":
        value = value[min(classes, value.size) - 1]
    elif entry is not None:
        value = value[entry]
    return f"{value:.4g}"


def analysis_lines(surface: SurfaceFile) -> list[str]:
    """The checkpoints, the planned quantities, the progress, and a table of the done
    checkpoints: epoch, training loss, lambda_1, outliers of C, the gradient's share in
    H's top-C subspace, tr(H)/||H||_F, the overlap of H's and G's top-C subspaces, and
    the seconds its quantities took (top-k where k < C)."""
    attrs, settings = surface.attrs, surface.work("analysis").attrs
    rows, _ = surface.group("checkpoints")
    classes, count = int(attrs["classes"]), len(rows["epoch"])
    quantities = [str(name) for name in settings["quantities"]]
    lines = [
        f"{surface.path}: analysis of {count} checkpoint{'s' if count > 1 else ''}, model "
        f"{attrs['model']} on {attrs['dataset']} (C = {classes} classes, "
        f"{attrs['parameters']} parameters analysed), planned {attrs['created']}",
        f"  quantities: {', '.join(quantities)} (top_k {settings['top_k']})",
        job_progress(surface, "analysis"),
    ]
    done = np.flatnonzero(surface.done("analysis"))
    if not done.size:
        return lines
    maps = surface.maps()
    columns = [column for column in ANALYSIS_COLUMNS if column[1] in maps]
    j = min(classes, int(settings["top_k"]))
    headers = ["checkpoint", "epoch"] + [header.format(j=j) for header, _, _ in columns]
    headers.append("seconds")
    table = [headers]
    for item in done:
        epoch = int(rows["epoch"][item])
        seconds = sum(maps[f"{quantity}_seconds"][item] for quantity in quantities)
        table.append(
            [str(item), str(epoch) if epoch >= 0 else "-"]
            + [analysis_cell(maps, name, entry, item, classes) for _, name, entry in columns]
            + [f"{seconds:.3g}"]
        )
    widths = [max(len(row[column]) for row in table) for column in range(len(headers))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    return lines


def job_progress(surface: SurfaceFile, job: str) -> str:
    """``surface: 12/36 points done (+8 in part files, not yet merged: 55.6% in all),
    2.10 points/s, about 0m08s left``: finished points in unmerged part files (array
    tasks, a killed part-file run) count towards the progress, the rate and the time left.
    """
    work = surface.work(job)
    total = work.points().size
    done = work.done()
    part_points, part_finished = finished_in_parts(surface, job)
    unmerged = ~done[part_points]  # a reducer killed before deleting its parts leaves both
    waiting, first = np.unique(part_points[unmerged], return_index=True)
    finished = np.concatenate([work.finished()[done], part_finished[unmerged][first]])
    merged = int(done.sum())
    count = merged + waiting.size
    items = "checkpoints" if surface.kind == "analysis" else "points"
    line = f"  {job}: {merged}/{total} {items} done"
    if waiting.size:
        line += f" (+{waiting.size} in part files, not yet merged: {count / total:.1%} in all)"
    else:
        line += f" ({count / total:.1%})"
    rate = finish_rate(finished)
    if rate is not None:
        line += f", {rate:.2f} {items}/s"
        if count < total:
            line += f", about {format_duration((total - count) / rate)} left"
    return line


def trace_lines(found: dict) -> list[str]:
    """The two estimates of `landscape trace`, each under the label it was stored with
    (a file traced before labels were stored gets its step instead)."""
    older = {
        "hutchinson": "Hutchinson",
        "projection": f"from loss values at step ε = {found['step']:.3g} (traced by an older "
        "version, labelled tr(H); run `landscape trace` again for labelled estimates)",
    }
    lines = [f"  curvature at the centre ({found['confidence']:.0%} intervals):"]
    for name in ("hutchinson", "projection"):
        label = found.get(f"{name}_label", older[name])
        mean, half_width = found[f"{name}_mean"], found[f"{name}_half_width"]
        lines.append(f"    {label}: {mean:.6g} ± {half_width:.3g}")
    if found.get("non_smooth_operations"):
        lines.append(
            f"    non-smooth operations ({found['non_smooth_operations']}): the two measure "
            "different things and will differ"
        )
    return lines


def submission_status(path: Path) -> list[str]:
    """Lines for `landscape status`: each submitted task's state, failed ones with their
    shards and log file (from the record, squeue and sacct). landscape.slurm is imported
    here, not at the top: it loads submitit, which a GPU node or a notebook that never
    submits need not have (``import landscape.api`` must work without it)."""
    from landscape.slurm import FAILED_STATES, SlurmJobs, read_submission, record_path

    record_file = record_path(path)
    if not record_file.is_file():
        return []
    try:
        submitted, entries = read_submission(record_file)
    except UserError as exc:
        return [f"  {exc}"]
    jobs = SlurmJobs.query([entry["id"] for _, entry in entries])
    lines = [f"  submitted {submitted} ({record_file.name}):"]
    for label, entry in entries:
        state = jobs.state(entry["id"])
        line = f"    {label}: {jobs.describe(entry['id'])}"
        if state.split()[0] in FAILED_STATES:
            if "shards" in entry:
                line += f", shards {', '.join(map(str, entry['shards']))}"
            line += f"; log {entry['log']}"
        lines.append(line)
    return lines
