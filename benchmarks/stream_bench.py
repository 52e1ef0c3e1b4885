"""Grid points per second with the data streamed through loader workers against held
on the device, on the same samples (:mod:`landscape.samples`).

The 1,437 training digits are served item by item (a ``torch.utils.data.Dataset`` that returns
one (image, label) pair per ``__getitem__``, as a user's set of files does, at no decode
cost: the loader's own overhead is what is measured), to a digits MLP, the small
BatchNorm CNN and ResNet-20 at batch 128, float32, on the CPU. A point is one full pass
(``evaluate``) over the training set; each kind is timed alternately, REPEATS times, and
the median kept. ``ratio = streamed points/s / held points/s`` (target >= 0.8 with 2
workers). Workers compete with the forward pass for the same cores, so on 2 cores the
ratio falls with the model's cost per sample.
"""

from __future__ import annotations

import statistics
import time

import torch

from landscape.data import load_dataset
from landscape.evaluate import evaluate
from landscape.models import build_model
from landscape.objectives import CrossEntropy
from landscape.samples import HeldSamples, StreamedSamples

MODELS = ("mlp", "small_cnn", "resnet20")
BATCH_SIZE = 128
WORKERS = 2
REPEATS = 5


class Items(torch.utils.data.Dataset):
    """Tensors served one (input, target) pair per call."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index], self.targets[index]


def bench_stream() -> dict:
    data = load_dataset("digits", {})
    held = HeldSamples(data.train_x, data.train_y)
    device = torch.device("cpu")
    streamed = StreamedSamples(
        Items(data.train_x, data.train_y), device, torch.float32, "digits", BATCH_SIZE, WORKERS
    )
    objective = CrossEntropy()
    results = {
        "workers": WORKERS,
        "case": f"digits ({len(held)} images) item by item, batch {BATCH_SIZE}, float32, CPU, "
        f"{torch.get_num_threads()} threads, {WORKERS} loader workers, median of {REPEATS}",
    }
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, data.input_shape, data.num_classes, {}).eval()
        seconds = {"held": [], "streamed": []}
        values = {}
        for kind, samples in (("held", held), ("streamed", streamed)):
            values[kind] = evaluate(model, samples, BATCH_SIZE, objective)  # warm-up
        for _ in range(REPEATS):
            for kind, samples in (("held", held), ("streamed", streamed)):
                started = time.perf_counter()
                evaluate(model, samples, BATCH_SIZE, objective)
                seconds[kind].append(time.perf_counter() - started)
        held_rate, streamed_rate = (1 / statistics.median(seconds[k]) for k in seconds)
        results[name] = {
            "held_points_per_s": held_rate,
            "streamed_points_per_s": streamed_rate,
            "ratio": streamed_rate / held_rate,
            "same_values": values["held"] == values["streamed"],
        }
        print(name, results[name], flush=True)
    return results


if __name__ == "__main__":
    bench_stream()
