"""``make bench``: grid points per second against the bare forward pass, written to JSON.

For each case a surface file is planned in a temporary folder and its points are
evaluated by the real worker loop (moving the parameters, evaluating, writing the
file). The limit is one bare forward pass over the same data at the same batch size:
``overhead = seconds per point / forward seconds``, ideally close to 1.

Scaling over ranks: the demo's grid is run by real ``landscape run`` processes, one
rank with one thread, one rank with every core, and one single-threaded rank per
core under ``mpiexec``. Rates come from the points' finish times in the file, leaving
out each rank's first point (start-up); ``efficiency = rate(N ranks) / (N * rate(1
rank, 1 thread))``.

Hessian: see :mod:`benchmarks.hessian_bench`. Several probe vectors in one pass over the
data against one product each: see :mod:`benchmarks.probe_bench`. Products, seconds and
basis memory of each curvature analysis: see :mod:`benchmarks.analysis_bench`.
Warm-started against cold Lanczos on a Hessian grid: see :mod:`benchmarks.warm_bench`. Several
grid points per forward pass against one, and the bare forward in a process that loaded
the tool against a plain one: see :mod:`benchmarks.batch_bench`. A surface file's commit
(a flush) against the write interval: see :mod:`benchmarks.commit_bench`.

PCA directions at scale: 12 checkpoints of a 10^7-parameter model, the principal plane
by the Gram matrix (as planned) and by numpy's SVD of the dense matrix, each in a child
process that reports its time and peak resident memory (mapped checkpoint pages count
in that peak, and are reported apart: the kernel can evict them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.analysis_bench import bench_analysis
from benchmarks.batch_bench import bench_batched
from benchmarks.commit_bench import bench_commit
from benchmarks.hessian_bench import bench_hessian
from benchmarks.lm_bench import bench_lm
from benchmarks.probe_bench import PROBES, bench_probes
from benchmarks.stream_bench import bench_stream
from benchmarks.warm_bench import bench_warm
from landscape.atomic import write_file
from landscape.checkpoint import save_checkpoint
from landscape.config import parse_config
from landscape.data import load_dataset
from landscape.demo import demo_config
from landscape.evaluators import PointByPoint, loss_evaluator
from landscape.experiment import Experiment
from landscape.models import build_model
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import evaluate_shards

CASES = {
    "demo_resnet20_digits": {
        "model": {"name": "resnet20"},
        "data": {"name": "digits"},
        "evaluation": {"batch_size": 2048},
        "grid": {"x": {"min": -1, "max": 1, "num": 6}, "y": {"min": -1, "max": 1, "num": 5}},
    },
    "resnet20_32x32": {
        "model": {"name": "resnet20"},
        "data": {"name": "benchmarks.bench:synthetic_images", "kwargs": {"samples": 512}},
        "evaluation": {"batch_size": 256},
        "grid": {"x": {"min": -1, "max": 1, "num": 4}, "y": {"min": -1, "max": 1, "num": 3}},
    },
}


def synthetic_images(samples: int = 512, size: int = 32, seed: int = 0) -> dict:
    """Random CIFAR-shaped images and labels: speed does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, samples)
    return {"train_x": x, "train_y": y, "test_x": x[:8], "test_y": y[:8], "num_classes": 10}


@torch.no_grad()
def forward_seconds(experiment: Experiment) -> float:
    """Time of one bare forward pass over the training set, batch by batch."""
    inputs = experiment.data.train_x
    batch_size = experiment.config.evaluation.batch_size
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        experiment.model(inputs[start : start + batch_size])
    if experiment.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


class InterleavedTimer:
    """Wraps the loss evaluator: times each batch of points (one point: the workers' batch
    size), then one bare forward pass right after.

    Interleaving makes both medians see the same machine state (frequency, other load),
    which matters on a shared 2-core machine where run-to-run noise is 10-15 %.
    """

    def __init__(self, evaluator: PointByPoint, experiment: Experiment):
        self.evaluator, self.experiment = evaluator, experiment
        self.point_times: list[float] = []
        self.forward_times: list[float] = []

    def __call__(self, items: np.ndarray) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        values = self.evaluator(items)
        self.point_times.append(time.perf_counter() - started)
        self.forward_times.append(forward_seconds(self.experiment))
        return values


def random_checkpoint(path: Path, model: str, data: str, data_kwargs: dict) -> Path:
    """A seeded random-init checkpoint: speed does not depend on the weights."""
    dataset = load_dataset(data, data_kwargs)
    torch.manual_seed(0)
    save_checkpoint(path, build_model(model, dataset.input_shape, dataset.num_classes, {}))
    return path


def bench_case(name: str, spec: dict, folder: Path) -> dict:
    checkpoint = random_checkpoint(
        folder / f"{name}.pt",
        spec["model"]["name"],
        spec["data"]["name"],
        spec["data"].get("kwargs", {}),
    )
    config = parse_config(
        json.dumps(
            {
                **spec,
                "model": {**spec["model"], "checkpoint": str(checkpoint)},
                "maps": ["train_loss", "train_acc"],
                "output": str(folder / f"{name}.h5"),
            }
        )
    )
    path = plan_surface(config)
    experiment = Experiment.load(config)
    with SurfaceFile.open(path, "r+") as surface:
        evaluator = loss_evaluator(experiment, surface, surface.job_maps("loss"))
        evaluator.at(0.0, 0.0)  # warm-up, not written
        timer = InterleavedTimer(evaluator, experiment)
        started = time.perf_counter()
        shards = surface.pending_shards("loss")
        points = evaluate_shards("loss", timer, shards, surface)
        elapsed = time.perf_counter() - started
    # What the loop spends outside evaluation: moving nothing, writing and flushing the file.
    writing = (elapsed - sum(timer.point_times) - sum(timer.forward_times)) / points
    per_point = statistics.median(timer.point_times) + writing
    forward = statistics.median(timer.forward_times)
    return {
        "points": points,
        "train_samples": len(experiment.data.train_x),
        "batch_size": config.evaluation.batch_size,
        "device": str(experiment.device),
        "points_per_s": 1 / per_point,
        "seconds_per_point": per_point,
        "writing_seconds_per_point": writing,
        "forward_seconds": forward,
        "overhead": per_point / forward,
    }


def steady_rate(finished: np.ndarray, ranks: int) -> float:
    """Points per second once every rank has finished its first point."""
    times = np.sort(finished.reshape(-1))
    return (times.size - ranks) / (times[-1] - times[ranks - 1])


def bench_ranks_run(folder: Path, checkpoint: Path, ranks: int, threads: int) -> dict:
    """Plan the demo grid and run it with ``ranks`` processes of ``threads`` threads each
    (0: the default, every core for one process, an even share for several)."""
    name = f"ranks{ranks}_threads{threads}"
    overrides = [
        f"model.checkpoint={checkpoint}",
        f"output={folder / name}.h5",
        f"evaluation.threads={threads}",
    ]
    threads_here = torch.get_num_threads()
    try:  # planning loads the experiment, which applies evaluation.threads process-wide
        path = plan_surface(demo_config("demo.yaml", overrides))
    finally:
        torch.set_num_threads(threads_here)  # the benchmarks after this one: every core
    command = [sys.executable, "-m", "landscape.cli", "run", str(path), "--no-progress"]
    if ranks > 1:
        command = ["mpiexec", "-n", str(ranks), *command]
    # Open MPI refuses root without these; the benchmark, like the tests, sets them.
    environment = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    with SurfaceFile.open(path) as surface:
        finished = surface.finished("loss")
    return {
        "ranks": ranks,
        "threads_per_rank": threads or "auto",
        "points": int(finished.size),
        "points_per_s": steady_rate(finished, ranks),
        "wall_seconds": wall,
    }


def bench_ranks(folder: Path) -> dict:
    checkpoint = random_checkpoint(folder / "demo.pt", "resnet20", "digits", {})
    cores = len(os.sched_getaffinity(0))
    runs = {
        "1_rank_1_thread": bench_ranks_run(folder, checkpoint, 1, 1),
        "1_rank_all_cores": bench_ranks_run(folder, checkpoint, 1, 0),
        f"{cores}_ranks": bench_ranks_run(folder, checkpoint, cores, 0),
    }
    parallel = runs[f"{cores}_ranks"]["points_per_s"]
    return {
        "grid": "configs/demo.yaml (25 x 25, ResNet-20 on digits, 4 maps)",
        "runs": runs,
        "efficiency": parallel / (cores * runs["1_rank_1_thread"]["points_per_s"]),
        "speedup_over_1_rank_all_cores": parallel / runs["1_rank_all_cores"]["points_per_s"],
    }


PCA_CHECKPOINTS, PCA_SHAPE = 12, (10_000, 1_000)  # one 10^7-parameter weight matrix


def bench_pca(folder: Path) -> dict:
    """Time and memory of :func:`trajectory_pca` on a random-walk trajectory, beside
    numpy's SVD of the dense matrix, each in a child process that reports its peak
    resident memory and, of that, the pages mapped from the checkpoint files."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.zeros(PCA_SHAPE)
    for index in range(PCA_CHECKPOINTS):
        weights += torch.randn(PCA_SHAPE, generator=generator) * (1 + index)
        torch.save({"state_dict": {"weight": weights}}, folder / f"pca_{index:02d}.pt")
    parameters = PCA_SHAPE[0] * PCA_SHAPE[1]
    runs = {}
    for method in ("gram", "dense_svd"):
        child = f"from benchmarks.bench import pca_child; pca_child({str(folder)!r}, {method!r})"
        output = subprocess.run(
            [sys.executable, "-c", child], check=True, capture_output=True, text=True
        ).stdout
        runs[method] = json.loads(output.splitlines()[-1])
    return {
        "checkpoints": PCA_CHECKPOINTS,
        "parameters": parameters,
        "dense_matrix_mb": PCA_CHECKPOINTS * parameters * 8 / 2**20,
        **runs,
    }


def pca_child(folder: str, method: str) -> None:
    """One PCA by ``method``; prints seconds and memory (MB) as JSON."""
    from landscape.trajectory import trajectory_pca

    files = sorted(Path(folder).glob("pca_*.pt"))
    started = time.perf_counter()
    if method == "gram":
        last = torch.load(files[-1], weights_only=True)["state_dict"]["weight"]
        trajectory_pca({"weight": last.double()}, files, ["weight"], 2, None)
    else:
        rows = np.stack(
            [
                torch.load(f, weights_only=True)["state_dict"]["weight"].double().numpy().ravel()
                for f in files
            ]
        )
        rows -= rows[-1]
        np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    megabytes = {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssFile")}
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "peak_rss_mb": megabytes["VmHWM"],
                "mapped_file_mb": megabytes["RssFile"],
            }
        )
    )


def bench_cpu(folder: Path, results: dict) -> None:
    """The CPU cases (loss, Hessian, PCA, ranks, several points per pass, analyses, probes,
    the tiny language model, streamed data), printed and added to ``results``."""
    results["loss"] = {}
    for name, spec in CASES.items():
        result = bench_case(name, spec, folder)
        results["loss"][name] = result
        print(
            f"{name:24s} {result['points_per_s']:7.2f} points/s  "
            f"{1000 * result['seconds_per_point']:7.1f} ms/point  forward "
            f"{1000 * result['forward_seconds']:7.1f} ms  overhead {result['overhead']:.3f}x"
        )
    hessian = results["hessian"] = bench_hessian(folder)
    for method, summary in hessian["solvers"]["methods"].items():
        print(
            f"hessian {method:8s} median {summary['median_hvps']:5.0f} HVPs "
            f"{summary['median_seconds']:6.2f} s/point, worst relative error lambda_min "
            f"{summary['worst_lambda_min_error']:.1e} lambda_max "
            f"{summary['worst_lambda_max_error']:.1e}, converged {summary['converged']}"
        )
    cost = hessian["hvp_cost"]
    for mode, ratio in cost["hvp_over_forward"].items():
        print(
            f"demo-model HVP ({mode}): {ratio:.1f}x a forward pass, "
            f"{cost['hvp_over_gradient'][mode]:.1f}x a gradient"
        )
    kept = cost["kept_graphs"]
    print(
        f"demo-model HVP (double_backward) from kept graphs ({kept['batches_kept']} batches, "
        f"{kept['kept_mib']:.0f} MiB): {kept['kept_over_first']:.2f}x a point's first product, "
        f"which is {kept['first_hvp_over_gradient']:.1f}x a gradient (target <= 2.5)"
    )
    warm = results["warm"] = bench_warm(folder)
    print(
        f"warm-started Lanczos: {warm['warm_start']['warm_over_cold_hvps']:.2f}x the HVPs of a "
        "cold start (target <= 0.5)"
    )
    pca = results["pca"] = bench_pca(folder)
    for method in ("gram", "dense_svd"):
        run = pca[method]
        print(
            f"PCA of {pca['checkpoints']} checkpoints x {pca['parameters']:.0e} parameters, "
            f"{method:9s}: {run['seconds']:5.1f} s, peak {run['peak_rss_mb']:5.0f} MB "
            f"({run['mapped_file_mb']:.0f} MB of it mapped checkpoint pages)"
        )
    if shutil.which("mpiexec"):
        scaling = results["ranks"] = bench_ranks(folder)
        for name, run in scaling["runs"].items():
            print(f"demo grid, {name:18s} {run['points_per_s']:7.2f} points/s")
        print(
            f"efficiency {scaling['efficiency']:.3f}, speed-up over one process on all "
            f"cores {scaling['speedup_over_1_rank_all_cores']:.2f}x"
        )
    batched = results["batched"] = bench_batched(folder / "batched")
    for model in ("mlp", "small_cnn", "resnet20"):
        for key, run in batched[model].items():
            if isinstance(run, dict) and "ratio" in run:
                print(
                    f"{model:10s} {key:18s} K={run['points_per_pass']:2d} "
                    f"{run['ratio']:.2f}x a bare forward"
                )
    print(
        f"bare forward, tool process / plain process: {batched['process']['tool_over_plain']:.2f}"
    )
    analysis = results["analysis"] = bench_analysis(folder)
    for quantity, cost in analysis["costs"]["quantities"].items():
        print(
            f"demo-model analysis, {quantity:16s} {cost['hvps']:4d} products "
            f"{cost['seconds']:7.1f} s"
        )
    print(f"Lanczos basis memory, predicted vs measured: {analysis['basis_memory']}")
    probes = results["probes"] = bench_probes()
    for case, ratio in probes["fastest_batched_over_fastest_separate"].items():
        print(
            f"{PROBES} probe HVPs in one pass / {PROBES} separate, {case:32s} {ratio:.2f}x "
            f"(target <= {probes['target_ratio']})"
        )
    lm = results["lm"] = bench_lm(folder)
    print(
        f"tiny LM (demo_lm): {lm['points_per_s']:.1f} points/s, HVP "
        f"{lm['hvp_over_forward']['double_backward']:.1f}x a forward pass"
    )
    commit = results["commit"] = bench_commit(folder / "commit")
    print(
        f"serial surface commit (flush) {1e6 * commit['commit_seconds']:.0f} us after a "
        f"{1e6 * commit['write_seconds']:.0f} us row write: at most "
        f"{100 * commit['overhead_bound']:.4f} % of a run (one per write interval)"
    )
    stream = results["stream"] = bench_stream()
    for model in ("mlp", "small_cnn", "resnet20"):
        print(
            f"{model:10s} streamed through {stream['workers']} workers / held: "
            f"{stream[model]['ratio']:.2f}x the points/s (target >= 0.8); data.workers auto "
            f"({stream['auto_workers']}): {stream[model]['ratio_auto']:.2f}x"
        )


def bench_gpu(folder: Path, results: dict, record) -> None:
    """The GPU cases (:mod:`benchmarks.cuda_bench`) under ``results["cuda"]``, printed;
    ``record()`` after each case, so a run cut short keeps what it measured."""
    if not torch.cuda.is_available():
        results["cuda"] = {"skipped": "no CUDA device visible"}
        print("no CUDA device visible: no GPU cases")
        return
    from benchmarks.cuda_bench import bench_cuda  # imports this module

    cuda = results["cuda"] = {}
    bench_cuda(folder, cuda, record)
    hessian = cuda["hessian"]
    for setting, loss in cuda["loss"].items():
        peak = (
            f"{100 * loss['fraction_of_peak']:.1f} % of the {loss['compared_with']}"
            if loss["fraction_of_peak"] is not None
            else "no peak known for this card"
        )
        [(baseline, speedup)] = loss["speedup"].items()
        print(
            f"{cuda['device']}: {loss['model']} {setting}, {loss['train_samples']} images, "
            f"{loss['points_per_s']:.2f} points/s (K {loss['points_per_pass']}, "
            f"{speedup:.2f}x {baseline}), overhead {loss['overhead']:.3f}x, "
            f"{loss['achieved_tflops']:.1f} TFLOP/s ({peak})"
        )
        if "difference_to_float32" in loss:
            difference = loss["difference_to_float32"]
            print(
                f"    |{setting} - float32| train loss at the centre, corner: "
                + ", ".join(f"{v:.2g}" for v in difference["train_loss_abs_difference"])
                + " (rel "
                + ", ".join(f"{v:.2g}" for v in difference["train_loss_rel_difference"])
                + ")"
            )
    print(
        f"{cuda['device']}: Hessian {hessian['seconds_per_point']:.2f} s/point "
        f"({hessian['seconds_per_hvp']:.3f} s/HVP; {hessian['case']})"
    )
    for mode, ratio in hessian["costs"]["hvp_over_forward"].items():
        print(
            f"{cuda['device']}: HVP ({mode}) {ratio:.1f}x a forward pass, "
            f"{hessian['costs']['hvp_over_gradient'][mode]:.1f}x a gradient"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench.json")
    parser.add_argument(
        "--only",
        choices=["cpu", "cuda"],
        help="only the CPU cases, or only the GPU cases (default: both, GPU where CUDA is)",
    )
    args = parser.parse_args(argv)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record() -> None:
        write_file(out, (json.dumps(results, indent=2) + "\n").encode(), "--out")

    with tempfile.TemporaryDirectory() as folder:
        if args.only != "cuda":
            bench_cpu(Path(folder), results)
            record()
        if args.only != "cpu":
            bench_gpu(Path(folder), results, record)
    record()
    print(f"written to {out}")


if __name__ == "__main__":
    main()
