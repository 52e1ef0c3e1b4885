"""Batched against one-at-a-time Hessian-vector products: 8 probe vectors in one pass
over the data (:meth:`HessianOperator.hvp_many`) against 8 calls of ``hvp``, on the CPU.

Cases: a small CNN with BatchNorm (channels 16, 32) and an MLP (64, 64) on the digits
training set (1437 images), float32, both product modes, the operator's batch size 2048
(one batch) and 256; ``hvp_many`` takes its default samples per pass (256 for the CNN,
whose largest activation is 32 x 8 x 8 floats, the whole batch for the MLP). The
issue's target is ratio = batched / separate <= 0.6. Timings are medians of interleaved
repeats after a warm-up (the first forward-mode product compiles decompositions), on
one thread, since the machine's cores may be shared.

    python -m benchmarks.probe_bench --out results/probe_bench.json

``make bench`` runs it too (``probes`` in results/bench.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from landscape.atomic import write_file
from landscape.curvature.operators import HessianOperator, select_parameters
from landscape.data import load_dataset
from landscape.models import build_model
from landscape.objectives import CrossEntropy

PROBES = 8
REPEATS = 5
MODELS = {
    "small_cnn_bn": ("small_cnn", {"channels": [16, 32]}),
    "mlp": ("mlp", {"hidden": [64, 64]}),
}
BATCH_SIZES = (2048, 256)
MODES = ("forward_over_reverse", "double_backward")


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def compare(operator: HessianOperator, vectors: torch.Tensor) -> dict:
    """Median seconds of one ``hvp_many`` of the rows and of one ``hvp`` per row, repeats
    interleaved so that a busy neighbour slows both alike; and their largest difference."""
    batched = operator.hvp_many(vectors)  # warm-up, and the batching decision
    separate = torch.stack([operator.hvp(vector) for vector in vectors])
    times = {"batched": [], "separate": []}
    for _ in range(REPEATS):
        times["batched"].append(timed(lambda: operator.hvp_many(vectors)))
        times["separate"].append(timed(lambda: [operator.hvp(vector) for vector in vectors]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batched_seconds": medians["batched"],
        "separate_seconds": medians["separate"],
        "ratio": medians["batched"] / medians["separate"],
        "batched": operator.batched,
        "samples_per_pass": operator.samples_per_pass(len(vectors)),
        "relative_difference": float((batched - separate).abs().max() / separate.abs().max()),
    }


def bench_probes() -> dict:
    """Every case, on one thread (the caller's thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return probe_cases()
    finally:
        torch.set_num_threads(threads)


def probe_cases() -> dict:
    data = load_dataset("digits", {})
    samples = data.split("train")
    results = {}
    for case, (name, kwargs) in MODELS.items():
        torch.manual_seed(0)
        model = build_model(name, data.input_shape, data.num_classes, kwargs).eval()
        names = select_parameters(model, "all")
        vectors = torch.randn(
            PROBES,
            sum(model.get_parameter(n).numel() for n in names),
            generator=torch.Generator().manual_seed(0),
        )
        for mode in MODES:
            for batch_size in BATCH_SIZES:
                operator = HessianOperator(model, names, samples, CrossEntropy(), batch_size, mode)
                key = f"{case}/{mode}/batch_size_{batch_size}"
                results[key] = {"parameters": operator.shape[0], **compare(operator, vectors)}
                print(key, json.dumps(results[key]), flush=True)
    fastest = {}
    for case in MODELS:
        for mode in MODES:
            runs = [results[f"{case}/{mode}/batch_size_{size}"] for size in BATCH_SIZES]
            fastest[f"{case}/{mode}"] = min(r["batched_seconds"] for r in runs) / min(
                r["separate_seconds"] for r in runs
            )
    return {
        "case": f"{PROBES} probes, digits ({len(samples)} training images), float32, CPU, "
        f"1 thread, median of {REPEATS}",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "target_ratio": 0.6,
        "results": results,
        "fastest_batched_over_fastest_separate": fastest,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/probe_bench.json"))
    args = parser.parse_args(argv)
    results = bench_probes()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_file(args.out, (json.dumps(results, indent=2) + "\n").encode(), "--out")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
