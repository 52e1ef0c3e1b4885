"""Grid points per second with the data streamed through loader workers against held
on the device, on the same samples (:mod:`landscape.samples`), and what bounds the ratio.

The 1,437 training digits, batch 128, float32, CPU, to a digits MLP, the small BatchNorm
CNN and ResNet-20. A point is one full pass (``evaluate``) over the training set. Kinds:

- ``held``: the tensors, sliced (the reference);
- ``streamed``: a ``torch.utils.data.Dataset`` read item by item (one (image, label)
  pair per ``__getitem__``, as a user's set of files is, at no decode cost: the loader's
  own overhead is what is measured) through ``WORKERS`` loader workers: the issue's
  target, ``ratio = streamed points/s / held points/s >= 0.8``;
- ``streamed_batched_reads``: the same through a Dataset whose ``__getitems__`` reads a
  whole message of samples in one call (docs/CONFIG.md);
- ``streamed_in_process``: item by item with ``data.workers: 0``;
- ``auto``: what a user gets by default, ``data.workers: auto``
  (:func:`landscape.samples.auto_workers`: loader workers on the cores the torch
  threads leave, at most 2: none where 2 threads run on 2 cores; the
  count is the result's ``auto_workers``). It is one of the kinds above
  (``streamed_in_process`` for 0, ``streamed`` for ``WORKERS``), measured once as that
  kind, or ``streamed_auto`` of its own for another count; ``ratio_auto`` and
  ``ratio_auto_of_best`` are its ratios.

Each kind runs ``PASSES`` consecutive passes per block, as a grid run does (the workers
read ahead across passes: at most one pass, so a block's head start is at most
1/PASSES); the kinds' blocks alternate, ``REPEATS`` times. ``ratio`` compares the median
blocks, ``ratio_of_best`` the fastest ones (the least disturbed on a shared machine); the
load average before and after is recorded beside them.

What bounds the ratio, per pass, measured without any model:

- ``read_in_process_s``: reading the items of a pass and stacking them in this process;
  ``serial_ceiling = held / (held + read_in_process)`` is what a pass reaches when its
  reads never overlap its compute (``workers: 0``, or workers on cores the compute
  fills). A model whose compute per sample is far above the read's (ResNet-20) loses
  little; one whose compute is below it (the MLP: under 1 us of compute per sample
  against 2-3 us of Python per item) cannot reach 0.8 with any loader that calls
  ``__getitem__`` per item;
- ``read_through_workers_s``: the stream of passes alone (the consumer only takes the
  batches): ``overlap_ceiling = held / read_through_workers`` bounds a pass even when the
  reads overlap the compute perfectly (capped at 1).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from landscape.data import load_dataset
from landscape.evaluate import evaluate
from landscape.models import build_model
from landscape.objectives import CrossEntropy
from landscape.samples import HeldSamples, Samples, StreamedSamples, loader_workers

MODELS = ("mlp", "small_cnn", "resnet20")
BATCH_SIZE = 128
WORKERS = 2
REPEATS = 5
PASSES = 20


class Items(torch.utils.data.Dataset):
    """Tensors served one (input, target) pair per call."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index], self.targets[index]


class BatchedItems(Items):
    """Items that a loader reads a message of at a time: (inputs, targets) of ``indices``."""

    def __getitems__(self, indices: list[int]):
        return self.inputs[indices], self.targets[indices]


def block_seconds(run_pass, *args) -> float:
    """Seconds per pass of :data:`PASSES` consecutive calls ``run_pass(*args)``."""
    started = time.perf_counter()
    for _ in range(PASSES):
        run_pass(*args)
    return (time.perf_counter() - started) / PASSES


def read_only(samples: Samples) -> None:
    """One pass that takes every batch and computes nothing."""
    for _ in samples.batches(BATCH_SIZE):
        pass


def bench_stream() -> dict:
    data = load_dataset("digits", {})
    device = torch.device("cpu")
    items, batched = Items(data.train_x, data.train_y), BatchedItems(data.train_x, data.train_y)

    def streamed(dataset, workers: int) -> StreamedSamples:
        return StreamedSamples(dataset, device, torch.float32, "digits", BATCH_SIZE, workers)

    kinds = {
        "held": HeldSamples(data.train_x, data.train_y),
        "streamed": streamed(items, WORKERS),
        "streamed_batched_reads": streamed(batched, WORKERS),
        "streamed_in_process": streamed(items, 0),
    }
    auto = loader_workers("auto", device)
    auto_kind = {0: "streamed_in_process", WORKERS: "streamed"}.get(auto, "streamed_auto")
    if auto_kind not in kinds:
        kinds[auto_kind] = streamed(items, auto)
    results = {
        "workers": WORKERS,
        "auto_workers": auto,
        "case": f"digits ({len(items)} images), batch {BATCH_SIZE}, float32, CPU, "
        f"{torch.get_num_threads()} threads on {len(os.sched_getaffinity(0))} cores, "
        f"{WORKERS} loader workers at the lowest CPU priority (data.workers auto: {auto}), "
        f"{kinds['streamed'].message_batches(BATCH_SIZE)} batches per worker message, "
        f"blocks of {PASSES} passes, {REPEATS} alternating blocks per kind",
        "load_before": os.getloadavg(),
    }
    reads = {
        "read_in_process_s": kinds["streamed_in_process"],
        "read_through_workers_s": kinds["streamed"],
    }
    read_seconds = {name: [] for name in reads}
    for samples in reads.values():
        read_only(samples)  # warm-up: starts the workers
    for _ in range(REPEATS):
        for name, samples in reads.items():
            read_seconds[name].append(block_seconds(read_only, samples))
    results.update({name: min(seconds) for name, seconds in read_seconds.items()})
    print({name: f"{1e3 * results[name]:.2f} ms" for name in reads}, flush=True)
    objective = CrossEntropy()
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, data.input_shape, data.num_classes, {}).eval()
        values = {
            kind: evaluate(model, samples, BATCH_SIZE, objective) for kind, samples in kinds.items()
        }
        seconds = {kind: [] for kind in kinds}
        for _ in range(REPEATS):
            for kind, samples in kinds.items():
                seconds[kind].append(block_seconds(evaluate, model, samples, BATCH_SIZE, objective))
        median = {kind: statistics.median(seconds[kind]) for kind in kinds}
        best = {kind: min(seconds[kind]) for kind in kinds}
        held, read = best["held"], results["read_in_process_s"]
        result = {
            "held_points_per_s": 1 / median["held"],
            "streamed_points_per_s": 1 / median["streamed"],
            "ratio": median["held"] / median["streamed"],
            "ratio_of_best": held / best["streamed"],
            "ratio_batched_reads": median["held"] / median["streamed_batched_reads"],
            "ratio_in_process": median["held"] / median["streamed_in_process"],
            "ratio_auto": median["held"] / median[auto_kind],
            "ratio_auto_of_best": held / best[auto_kind],
            "serial_ceiling": held / (held + read),
            "overlap_ceiling": min(1.0, held / results["read_through_workers_s"]),
            "same_values": all(value == values["held"] for value in values.values()),
        }
        results[name] = result
        print(name, {key: round(value, 3) for key, value in result.items()}, flush=True)
    results["load_after"] = os.getloadavg()
    return results


if __name__ == "__main__":
    bench_stream()
