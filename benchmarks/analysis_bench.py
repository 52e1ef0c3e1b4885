"""``make bench``, analysis part: what each curvature analysis of ``landscape analyze``
costs at one checkpoint of the demo model, and what the Lanczos basis takes in memory.

Costs come from a real ``analyze`` run (plan, run_job) of the demo's ResNet-20 on the
digits training set (1437 images, float32) at seeded random weights (the cost of a
product does not depend on the weights; the number of products of the top-k solver
does, a little): the file's ``<quantity>_hvps`` (curvature-vector products; an H - G
product is two) and ``<quantity>_seconds``. Settings are small, so that the bench takes
about a minute on two cores; products scale with them (density: probes x steps;
gauss_newton: two top-k solves and two densities; trace: trace_samples; clustering:
none, it takes per-sample logit gradients).

The Lanczos basis is steps x P float64 values, allocated at once and touched row by row
(:func:`landscape.curvature.lanczos.check_basis_memory` predicts it). Measured as the
growth of the peak memory during one SLQ probe of ``LONG`` steps minus that of one of
``SHORT`` steps (the difference cancels the products' own working memory): on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the peak resident set (VmHWM of
/proc/self/status, reset through /proc/self/clear_refs before each run).

    python -m benchmarks.analysis_bench --out results/analysis_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from landscape.analysis import Operators
from landscape.atomic import write_file
from landscape.checkpoint import save_checkpoint
from landscape.config import ANALYSIS_QUANTITIES, parse_config
from landscape.curvature.lanczos import basis_bytes
from landscape.curvature.spectrum import stochastic_lanczos_quadrature
from landscape.demo import demo_config
from landscape.experiment import Experiment
from landscape.plan import plan_analysis
from landscape.store import SurfaceFile
from landscape.workers import run_job

SETTINGS = {
    "hvp": "double_backward",
    "probes": 1,
    "steps": 6,
    "density_points": 64,
    "top_k": 2,
    "tolerance": 1e-1,
    "max_hvps": 12,
    "trace_samples": 4,
    "clustering_samples": 20,
}
SHORT, LONG = 2, 12


def demo_analysis_config(folder: Path) -> dict:
    """The demo's model and data (demo.yaml) at seeded random weights, with an analysis
    section of SETTINGS over that one checkpoint."""
    spec = demo_config("demo.yaml", []).to_dict()
    config = parse_config(json.dumps({"model": spec["model"], "data": spec["data"]}))
    torch.manual_seed(0)
    checkpoint = folder / "random.pt"
    save_checkpoint(checkpoint, Experiment.load(config, with_checkpoint=False).model, epoch=0)
    return {
        "model": {**spec["model"], "checkpoint": str(checkpoint)},
        "data": spec["data"],
        "evaluation": spec["evaluation"],
        "analysis": {**SETTINGS, "output": str(folder / "analysis.h5")},
    }


def analysis_costs(spec: dict) -> dict:
    """Products and seconds of each quantity from one ``analyze`` run of ``spec``."""
    path = plan_analysis(parse_config(json.dumps(spec)))
    started = time.perf_counter()
    run_job(path, "analysis", show_progress=False)
    elapsed = time.perf_counter() - started
    with SurfaceFile.open(path) as analysis:
        maps = analysis.maps()
        parameters = int(analysis.attrs["parameters"])
    costs = {
        quantity: {
            "hvps": int(maps[f"{quantity}_hvps"][0]),
            "seconds": float(maps[f"{quantity}_seconds"][0]),
        }
        for quantity in ANALYSIS_QUANTITIES
    }
    for cost in costs.values():
        cost["seconds_per_hvp"] = cost["seconds"] / cost["hvps"] if cost["hvps"] else None
    return {"parameters": parameters, "run_seconds": elapsed, "quantities": costs}


def vm_bytes(field: str) -> int:
    """One ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(action, device: torch.device) -> int:
    """Bytes by which ``action`` raises the peak memory above what is in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        action()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set := the current
    before = vm_bytes("VmRSS")
    action()
    return vm_bytes("VmHWM") - before


def basis_memory(spec: dict) -> dict:
    """:func:`basis_child` in a child process whose allocator maps every block over 64
    KiB afresh (glibc's MALLOC_MMAP_THRESHOLD_): otherwise a basis may land in heap pages
    that earlier products left resident, and the resident set would not show it."""
    child = f"from benchmarks.analysis_bench import basis_child; basis_child({json.dumps(spec)!r})"
    output = subprocess.run(
        [sys.executable, "-c", child],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)},
    ).stdout
    return json.loads(output.splitlines()[-1])


def basis_child(spec_json: str) -> None:
    """Prints, as JSON, predicted against measured memory of LONG - SHORT rows of the
    Lanczos basis: one SLQ probe of H at the checkpoint of the spec, on its device."""
    config = parse_config(spec_json)
    experiment = Experiment.load(config)
    operator = Operators(experiment, config.analysis).hessian
    size = operator.shape[0]

    def probe(steps: int) -> None:
        stochastic_lanczos_quadrature(
            operator.hvp, size, 1, steps, 0, operator.torch_dtype, experiment.device
        )

    probe(SHORT)  # warm-up: the products' working memory is reached once before measuring
    short, long = (peak_growth(lambda s=s: probe(s), experiment.device) for s in (SHORT, LONG))
    predicted = basis_bytes(LONG, size) - basis_bytes(SHORT, size)
    result = {
        "device": str(experiment.device),
        "parameters": size,
        "steps": [SHORT, LONG],
        "predicted_bytes": predicted,
        "measured_bytes": long - short,
        "measured_over_predicted": (long - short) / predicted,
        "peak_growth_bytes": {str(SHORT): short, str(LONG): long},
    }
    print(json.dumps(result))


def bench_analysis(folder: Path) -> dict:
    """Costs per quantity and the basis memory on the demo model, files under ``folder``."""
    spec = demo_analysis_config(Path(folder))
    return {
        "case": "demo ResNet-20 on digits (1437 images) at random weights, one checkpoint, "
        + ", ".join(f"{name} {value}" for name, value in SETTINGS.items()),
        "threads": torch.get_num_threads(),
        "costs": analysis_costs(spec),
        "basis_memory": basis_memory(spec),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/analysis_bench.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        results = bench_analysis(Path(folder))
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out, (json.dumps(results, indent=2) + "\n").encode(), "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
