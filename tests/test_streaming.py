"""Data a plug-in hands over as ``torch.utils.data.Dataset`` objects: held on the device
when they fit, streamed through loader workers when they do not, with the same numbers
either way, and a clear line when a sample fails to load."""

from __future__ import annotations

import itertools
import logging
import os

import numpy as np
import pytest
import torch
import yaml
from test_bad_input import edit, fails_with

from landscape.cli import main
from landscape.config import load_config
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.objectives import TokenCrossEntropy
from landscape.ranks import SIZE_VARIABLES
from landscape.samples import HeldSamples, StreamedSamples, auto_workers, loader_workers
from landscape.store import SurfaceFile

CLUSTERS = {"num_classes": 3, "dim": 5, "train_per_class": 20, "test_per_class": 10}
# Both jobs on a 5 x 4 grid, the Hessian at every other point; shards of 4 points.
JOBS = {
    "grid": {
        "x": {"min": -1.0, "max": 1.0, "num": 5},
        "y": {"min": -1.0, "max": 1.0, "num": 4},
        "shard_size": 4,
    },
    "maps": ["train_loss", "train_acc", "test_loss", "test_acc", "lambda_min", "lambda_max"],
    "hessian": {"stride": 2},
}


def streamed_config(experiment, name: str, stream: str, workers: int = 2, **kwargs):
    data = {
        "name": "plugins:streamed",
        "kwargs": {**CLUSTERS, **kwargs},
        "stream": stream,
        "workers": workers,
    }
    return experiment(name=name, data=data, **JOBS)


def alone_on_cores(monkeypatch, cores: int, node: int) -> None:
    """This process started by no MPI launcher (a test under srun included), its affinity
    mask ``cores`` of the ``node``'s cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "cpu_count", lambda: node)
    for name in (*SIZE_VARIABLES, "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)


def run_all(config) -> dict[str, np.ndarray]:
    for verb in ("plan", "run", "hessian"):
        assert (
            main([verb, str(config), "--no-progress"] if verb != "plan" else [verb, str(config)])
            == 0
        )
    with SurfaceFile.open(load_config(config).output) as surface:
        return surface.maps()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "workers, cores, said",
    [
        (2, None, "streams 60 samples through 2 loader workers"),
        (
            "auto",
            1,
            "data.workers auto = 0 (read in process): cores 1, torch threads 1, spare none",
        ),
        ("auto", 3, "data.workers auto = 2 (loader processes): cores 3, torch threads 1, spare 2"),
    ],
    ids=["2 workers", "auto, no spare core", "auto, 2 spare cores"],
)
def test_streamed_and_held_data_give_the_same_maps(
    experiment, dtype, workers, cores, said, caplog, monkeypatch
):
    """The loss, accuracy and Hessian maps of a Dataset streamed through 2 loader workers,
    or as ``data.workers: auto`` chooses (in process on a CPU whose cores the torch
    threads take, workers where cores are spare: the run's evaluation.threads is 1), equal
    those of the same samples held as tensors (the built-in data set), bit for bit: the
    same batches in the same order, cast alike (the issue asks float64 to 1e-12)."""
    held = experiment(
        name="held",
        data={"name": "gaussian_clusters", "kwargs": CLUSTERS},
        evaluation={"dtype": dtype},
        **JOBS,
    )
    expected = run_all(held)
    streamed = streamed_config(experiment, "streamed", "always", workers)
    config = yaml.safe_load(streamed.read_text())
    config["evaluation"]["dtype"] = dtype
    streamed.write_text(yaml.safe_dump(config))
    if cores is not None:
        alone_on_cores(monkeypatch, cores, node=4)
    with caplog.at_level(logging.INFO, logger="landscape.samples"):
        found = run_all(streamed)
    assert said in caplog.text
    assert set(found) == set(expected)
    for name, values in expected.items():
        assert np.isfinite(values).sum() > 0, name
        np.testing.assert_array_equal(found[name], values, err_msg=name)


def test_auto_holds_a_set_that_fits_and_says_so(experiment, caplog):
    with caplog.at_level(logging.INFO, logger="landscape.samples"):
        loaded = Experiment.load(load_config(streamed_config(experiment, "auto", "auto")))
    assert isinstance(loaded.data.split("train"), HeldSamples)
    assert "holds 60 samples on cpu (data.stream auto:" in caplog.text
    forced = Experiment.load(load_config(streamed_config(experiment, "never", "never")))
    assert torch.equal(forced.data.split("train").inputs, loaded.data.split("train").inputs)


def test_a_sample_that_fails_mid_run_stops_with_one_line_and_keeps_finished_points(
    experiment, capsys
):
    """The Dataset raises on its 6th full pass (each grid point reads the training set
    once; cross-entropy's count of units needs no pass): the points evaluated before
    stay, those of the shard under way included, the run says which samples failed, and
    runs again from there, each resumed value equal to an uninterrupted run's."""
    uninterrupted = run_all(streamed_config(experiment, "whole", "always", workers=0))
    failing = streamed_config(experiment, "failing", "always", workers=0, fail_on_read=6)
    config = yaml.safe_load(failing.read_text())
    config["maps"] = ["train_loss", "train_acc"]
    failing.write_text(yaml.safe_dump(config))
    assert main(["plan", str(failing)]) == 0
    capsys.readouterr()
    assert main(["run", str(failing), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: data.name: plugins:streamed (train) failed to load ")
    assert "input/output error reading sample 59" in error[-1]
    assert "fix the Dataset's __getitem__" in error[-1]
    with SurfaceFile.open(config["output"]) as surface:
        done, maps = surface.done("loss").reshape(-1), surface.maps()
    # Reads of sample 59: points 0-4, then point 5 fails (the 2nd of the shard 4..7).
    assert done.sum() == 5 and done[:5].all()
    for name in ("train_loss", "train_acc"):
        stored, expected = maps[name].reshape(-1), uninterrupted[name].reshape(-1)
        np.testing.assert_array_equal(stored[:5], expected[:5])
        assert np.isnan(stored[5:]).all()
    for _ in range(5):  # each run gets 5 points further before it fails
        if main(["run", str(failing), "--no-progress"]) == 0:
            break
    with SurfaceFile.open(config["output"]) as surface:
        for name in ("train_loss", "train_acc"):
            np.testing.assert_array_equal(surface.maps()[name], uninterrupted[name])


@pytest.mark.parametrize(
    "data, fragments",
    [
        (
            {"name": "plugins:streamed_pair_of_three"},
            ["streamed_pair_of_three returned a train dataset whose item 0 is not an (input, "],
        ),
        (
            {"name": "plugins:streamed", "workers": -1},
            ["data.workers: must be auto or an integer >= 0 (got -1); 0 reads in this process"],
        ),
        (
            {"name": "plugins:streamed", "workers": "two"},
            ["data.workers: must be auto or an integer >= 0 (got 'two')"],
        ),
        ({"name": "plugins:streamed", "workers": 2.5}, ["data.workers: expected int, got 2.5"]),
        ({"name": "plugins:streamed", "workers": True}, ["data.workers: expected int, got True"]),
        ({"name": "plugins:streamed", "workers": None}, ["data.workers: expected int, got None"]),
        ({"name": "plugins:streamed", "prefetch": 0}, ["data.prefetch: must be >= 1 (got 0)"]),
        ({"name": "plugins:streamed", "stream": "yes"}, ["data.stream", "auto, always, never"]),
    ],
)
def test_bad_streamed_data_is_one_line(experiment, data, fragments, capsys):
    path = experiment(name="bad")
    edit(path, lambda config: config.update(data=data))
    fails_with(capsys, ["plan", str(path)], *fragments)


def test_data_workers_default_to_auto_and_take_integers(experiment):
    path = streamed_config(experiment, "workers", "always")
    assert load_config(path, ["data.workers=0"]).data.workers == 0
    edit(path, lambda config: config["data"].pop("workers"))
    assert load_config(path).data.workers == "auto"


@pytest.mark.parametrize(
    "device, cores, threads, workers",
    [
        ("cpu", 2, 2, 0),  # the threads take every core: read in process
        ("cpu", 2, 4, 0),  # more threads than cores
        ("cpu", 3, 2, 1),
        ("cpu", 4, 2, 2),
        ("cpu", 16, 1, 2),  # at most AUTO_WORKERS
        ("cpu", 4, 8, 0),  # an unpinned rank of 2 on 8 cores, torch's default threads
        ("cpu", 4, 4, 0),  # the same with its share of threads, or a rank pinned to 4
        ("cuda", 3, 2, 2),  # the GPU computes: the host's cores but one read
        ("cuda", 2, 8, 1),
        ("cuda", 1, 8, 0),  # the one core drives the GPU
    ],
)
def test_auto_workers_read_in_process_unless_cores_are_spare(device, cores, threads, workers):
    assert auto_workers(torch.device(device), cores, threads) == workers


@pytest.mark.parametrize(
    "ranks, threads, workers, cores",
    [(None, 4, 0, 4), (None, 3, 1, 4), (None, 1, 2, 4), ("2", 2, 0, 2), ("2", 1, 1, 2)],
)
def test_auto_workers_see_evaluation_threads_and_the_share_of_a_rank(
    experiment, ranks, threads, workers, cores, monkeypatch, caplog
):
    """Experiment.load applies evaluation.threads before it places the data: on a node
    of 4 cores, the loader gets the cores those threads leave (at most 2); each of 2
    unpinned MPI ranks counts its share of 2 cores (2 ranks x 2 threads: none spare)."""
    alone_on_cores(monkeypatch, 4, node=4)
    if ranks:
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", ranks)
    path = streamed_config(experiment, "threads", "always", "auto")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="landscape.samples"):
            loaded = Experiment.load(load_config(path, [f"evaluation.threads={threads}"]))
    finally:
        torch.set_num_threads(before)
    assert loaded.data.split("train").workers == loaded.data.split("test").workers == workers
    assert caplog.text.count(f"data.workers auto = {workers} (") == 1
    spare = cores - threads or "none"
    assert f"cores {cores}, torch threads {threads}, spare {spare}" in caplog.text
    assert loader_workers(3, torch.device("cpu")) == 3  # an integer as it is


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_counts_and_batches_agree_between_kinds(dtype):
    """Sequences with padding: both kinds count the same unmasked tokens, serve the same
    batches, and a gathered minibatch is the same samples in the asked order."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(23, 6, 4, generator=generator)
    labels = torch.randint(0, 7, (23, 6), generator=generator)
    labels[torch.rand(23, 6, generator=generator) < 0.3] = -100
    dataset = torch.utils.data.TensorDataset(inputs, labels)
    held = HeldSamples(inputs.to(dtype), labels)
    streamed = StreamedSamples(dataset, torch.device("cpu"), dtype, "tokens", 5, workers=2)
    objective = TokenCrossEntropy()
    assert streamed.units(objective) == held.units(objective) == int((labels != -100).sum())
    for (a, b), (c, d) in zip(streamed.batches(5), held.batches(5), strict=True):
        assert a.dtype == dtype and torch.equal(a, c) and torch.equal(b, d)
    order = torch.tensor([7, 0, 22, 3])
    for found, expected in zip(streamed.gather(order), held.gather(order)):
        assert torch.equal(found, expected)


def test_streamed_token_sequences_match_held_ones(experiment):
    """The text data set's token ids and padded labels, served item by item through 2
    workers: the same GPT-2 loss map as the held tensors."""
    pytest.importorskip("transformers")
    text = {"seq_len": 16, "vocab": 24, "limit": 40, "document_bytes": 200}
    common = {
        "model": {"name": "gpt2", "kwargs": {"layers": 1, "width": 8, "heads": 2, "positions": 16}},
        "maps": ["train_loss", "train_acc"],
        "evaluation": {"loss": "token_cross_entropy"},
        "grid": {"x": {"min": -1.0, "max": 1.0, "num": 3}},
    }
    maps = []
    for name, data in (
        ("held", {"name": "text", "kwargs": text}),
        (
            "streamed",
            {"name": "plugins:streamed", "kwargs": {"name": "text", **text}, "stream": "always"},
        ),
    ):
        path = experiment(name=name, data=data, **common)
        assert main(["run", str(path), "--no-progress"]) == 0
        with SurfaceFile.open(load_config(path).output) as surface:
            maps.append(surface.maps())
    for name in common["maps"]:
        np.testing.assert_array_equal(maps[1][name], maps[0][name], err_msg=name)


class BatchedReads(torch.utils.data.TensorDataset):
    """Tensors whose loader reads a message of samples in one ``__getitems__`` call;
    ``short``: that many rows fewer than asked (a broken Dataset)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, short: int = 0):
        super().__init__(inputs, targets)
        self.short = short

    def __getitems__(self, indices: list[int]):
        chosen = indices[: len(indices) - self.short]
        return self.tensors[0][chosen], self.tensors[1][chosen]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [torch.utils.data.TensorDataset, BatchedReads])
def test_consecutive_and_abandoned_passes_serve_the_held_batches(kind, dtype):
    """23 samples in batches of 5 through 2 workers, each 1 message ahead: messages of 2
    batches (the 5 batches of a pass, read at most one pass ahead), the last one short.
    Every pass of the endless stream, read item by item or a message per call, serves
    the held batches; a pass left after one batch ends the stream, and the next pass
    starts again at sample 0; one left after its last message keeps it."""
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(23, 3, generator=generator), torch.arange(23) % 4
    held = HeldSamples(inputs.to(dtype), labels)
    streamed = StreamedSamples(
        kind(inputs, labels), torch.device("cpu"), dtype, "items", 5, workers=2, prefetch=1
    )
    assert streamed.message_batches(5) == 2

    def same_as_held(batches) -> None:
        for (a, b), (c, d) in zip(batches, held.batches(5), strict=True):
            assert a.dtype == dtype and torch.equal(a, c) and torch.equal(b, d)

    for _ in range(3):
        same_as_held(streamed.batches(5))
    stream = streamed.stream
    for _ in streamed.batches(5):
        break
    assert stream is not None and streamed.stream is None
    same_as_held(streamed.batches(5))
    stream = streamed.stream
    same_as_held(itertools.islice(streamed.batches(5), 5))  # closed before its end
    assert streamed.stream is stream
    same_as_held(streamed.batches(5))
    order = torch.tensor([7, 0, 22, 3])
    for found, expected in zip(streamed.gather(order), held.gather(order)):
        assert torch.equal(found, expected)


def test_message_batches_are_bounded_by_bytes_and_one_pass_ahead(monkeypatch):
    """1000 samples of 16 float32 values (64 bytes) in batches of 10: 100 batches a pass.
    Two workers, 2 messages ahead each: at most 25 batches a message (one pass in
    flight), fewer when MESSAGE_BYTES hold fewer, never less than one."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(1000, 16), torch.zeros(1000))
    streamed = StreamedSamples(dataset, torch.device("cpu"), torch.float32, "zeros", 10)
    assert streamed.sample_bytes == 16 * 4 + 4
    assert streamed.message_batches(10) == 25
    monkeypatch.setattr("landscape.samples.MESSAGE_BYTES", 68 * 10 * 7)
    assert streamed.message_batches(10) == 7
    monkeypatch.setattr("landscape.samples.MESSAGE_BYTES", 100)
    assert streamed.message_batches(10) == 1
    assert streamed.message_batches(1000) == 1


def test_a_batched_read_of_the_wrong_length_is_one_line():
    dataset = BatchedReads(torch.zeros(12, 2), torch.zeros(12, dtype=torch.long), short=1)
    streamed = StreamedSamples(dataset, torch.device("cpu"), torch.float32, "short", 4, 2, 1)
    with pytest.raises(UserError) as error:
        list(streamed.batches(4))
    assert str(error.value) == (
        "data.name: short served 3 inputs and 3 targets for samples 0..3; make "
        "__getitems__ return one item per index"
    )
    assert streamed.stream is None


class SchedulingPolicy(torch.utils.data.Dataset):
    """Items that say the scheduling policy of the process that reads them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.tensor([float(os.sched_getscheduler(0))]), 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_workers_read_only_on_idle_cores():
    """Loader workers run under SCHED_IDLE (they never take a core from the compute's
    threads); this process keeps its own policy."""
    streamed = StreamedSamples(SchedulingPolicy(), torch.device("cpu"), torch.float32, "p", 2)
    policies = torch.cat([inputs for inputs, _ in streamed.batches(2)]).unique().tolist()
    assert policies == [float(os.SCHED_IDLE)]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE
