"""``make bench``, the tiny language model: the loss job's grid points per second and the
cost of a Hessian-vector product against a forward pass, on configs/demo_lm.yaml.

The model is the demo's 1-block GPT-2 (``transformers``, width 16, 2 heads, a
vocabulary of 32 byte ids) at a seeded random initialization (speed does not depend on
the weights), on its 128 training sequences of 32 tokens, float32, one CPU thread (as
the config says). Points per second are those of the real worker loop over the demo's
13 x 13 grid (moving the parameters, evaluating train and test loss and accuracy,
writing the file); the ratio is one full-data HVP in each mode over one full-data
forward pass, interleaved medians (:func:`benchmarks.warm_bench.interleaved_seconds`),
so a change of load hits both. Process start-up, dominated by importing
``transformers`` (5-12 s on 2 shared cores), is left out of both.
Measured (2 shared cores, load 12): 40.6 points/s; an HVP 3.9x a forward pass by
double backward (the CPU default), 8.4x by forward over reverse.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.warm_bench import interleaved_seconds
from landscape.checkpoint import save_checkpoint
from landscape.demo import demo_config
from landscape.evaluators import loss_evaluator
from landscape.experiment import Experiment
from landscape.hessian import training_hessian
from landscape.plan import plan_surface
from landscape.store import SurfaceFile
from landscape.workers import evaluate_shards

HVP_MODES = ("double_backward", "forward_over_reverse")


def lm_experiment(folder: Path) -> tuple[Path, Experiment]:
    """The demo LM's surface file planned in ``folder`` around a seeded random-init
    checkpoint, and its experiment."""
    checkpoint = folder / "lm.pt"
    overrides = [f"model.checkpoint={checkpoint}", f"output={folder / 'lm.h5'}"]
    config = demo_config("demo_lm.yaml", overrides)
    torch.manual_seed(0)
    save_checkpoint(checkpoint, Experiment.load(config, with_checkpoint=False).model)
    return plan_surface(config), Experiment.load(config)


def bench_lm(folder: Path) -> dict:
    """Points per second of the loss job on the demo LM, and HVP / forward ratios (on the
    config's one thread, which Experiment.load sets process-wide: restored after, so
    the benchmarks after this one run on the machine's threads)."""
    threads = torch.get_num_threads()
    try:
        return bench_lm_on_one_thread(Path(folder))
    finally:
        torch.set_num_threads(threads)


def bench_lm_on_one_thread(folder: Path) -> dict:
    path, experiment = lm_experiment(folder)
    with SurfaceFile.open(path, "r+") as surface:
        evaluator = loss_evaluator(experiment, surface, surface.job_maps("loss"))
        evaluator(surface.pending_shards("loss")[0][:1])  # warm-up, not written
        started = time.perf_counter()
        points = evaluate_shards("loss", evaluator, surface.pending_shards("loss"), surface)
        elapsed = time.perf_counter() - started
    operators = {mode: training_hessian(experiment, "all", mode) for mode in HVP_MODES}
    vector = torch.randn(
        operators[HVP_MODES[0]].shape[0], generator=torch.Generator().manual_seed(0)
    )
    inputs = experiment.data.train_x
    batch_size = experiment.config.evaluation.batch_size

    @torch.no_grad()
    def forward():
        for start in range(0, len(inputs), batch_size):
            experiment.model(inputs[start : start + batch_size])

    products = {
        mode: (lambda operator=operator: operator.hvp(vector))
        for mode, operator in operators.items()
    }
    seconds = interleaved_seconds({"forward": forward, **products})
    return {
        "case": "configs/demo_lm.yaml: 1-block GPT-2 (transformers, width 16, 2 heads, vocab "
        "32), random init, 128 train + 128 test sequences of 32 tokens, float32, cpu, 1 thread",
        "parameters": operators[HVP_MODES[0]].shape[0],
        "points": points,
        "points_per_s": points / elapsed,
        "seconds": seconds,
        "hvp_over_forward": {mode: seconds[mode] / seconds["forward"] for mode in HVP_MODES},
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(bench_lm(Path(folder)), indent=2))


if __name__ == "__main__":
    main()
