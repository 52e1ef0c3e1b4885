"""The samples of one split, served to every full-data pass in batches on the device.

Every full-data quantity (mean loss and accuracy at a grid point, the gradient, each
curvature-vector product) is a sum over consecutive batches in sample order, so all a
pass needs from the data is :meth:`Samples.batches`. Two kinds serve them:

- :class:`HeldSamples`: whole tensors moved to the device once and sliced there (the
  default: no loader, no copy per pass);
- :class:`StreamedSamples`: a ``torch.utils.data.Dataset`` read through a ``DataLoader``
  with background workers, pinned host memory and prefetching, copied to the device
  batch by batch, for a set larger than device (or host) memory. Every pass reads the
  whole set again: one pass per grid point, per gradient and per Hessian-vector product
  (but for the batches whose gradient graphs a double-backward product keeps,
  :class:`landscape.curvature.operators.KeptGraphs`).

Both serve the same batches in the same order, cast to the same dtype, so every number
computed from them is the same, bit for bit: the floating-point operations are the same
on the same values. :func:`choose_samples` picks the kind by size and says so in the log;
:func:`loader_workers` decides whether the loader reads in background processes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, default_collate

from landscape.errors import UserError, describe
from landscape.memory import free_memory, in_units
from landscape.objectives import Objective
from landscape.ranks import cpu_threads_per_rank, launched_local_size

log = logging.getLogger(__name__)

# Data are held on the device when they take at most this share of its free memory (of
# the host's available memory on a CPU): the rest is for the model, K parameter copies
# and the activations of a batch.
HELD_SHARE = 0.25


class Samples:
    """``len(samples)`` samples of (input, target), served in consecutive batches."""

    device: torch.device  # where the batches are served

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of every sample, ``size`` at a time, in order, on the device."""
        raise NotImplementedError

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` samples as one batch (probes: shapes, modes, timings)."""
        return next(iter(self.batches(count)))

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at ``indices``, in that order, as one batch on the device."""
        raise NotImplementedError

    def units(self, objective: Objective) -> int:
        """N, the objective's count of units over the whole set (samples, or unmasked
        tokens): the denominator of every mean. A count is additive over batches, so a
        streamed set sums it batch by batch."""
        raise NotImplementedError


class HeldSamples(Samples):
    """Whole tensors on the device, sliced into batches without a copy."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets
        self.device = inputs.device

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.inputs), size):
            yield self.inputs[start : start + size], self.targets[start : start + size]

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[:count], self.targets[:count]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.inputs.device)
        return self.inputs[indices], self.targets[indices]

    def units(self, objective: Objective) -> int:
        return objective.count(self.targets)


class StreamedSamples(Samples):
    """A map-style ``torch.utils.data.Dataset`` of (input, target) pairs, read in order
    by a ``DataLoader`` (``workers`` background processes) and copied to ``device``,
    floating values cast to ``dtype`` exactly as held tensors are.

    Where the time goes, and what each choice saves (``benchmarks/stream_bench.py``):

    - a worker sends each read to this process as a message (a shared-memory segment per
      tensor, a pickle, a socket round trip), so a message carries several consecutive
      batches when they are small (:meth:`message_batches`), sliced apart here;
    - passes in ``batch_size`` batches (the evaluation's: every grid point and every
      product) are served by one endless stream of passes with the same workers, so a
      pass costs no process start and no resume handshake, and the workers read the next
      pass's first messages while this one is computed (``prefetch`` messages each, at
      most one pass in all); a pass in other batches (several HVPs at once, the count of
      units) starts and stops its own workers;
    - workers run at the lowest CPU priority (:func:`lowest_priority`).

    One pass of a size at a time: a second one would share the first's stream. A pass
    left before its last message (its consumer stopped or raised) ends the stream: the
    next one starts a new one rather than serve the rest of the old pass.

    A sample that fails to load stops the pass with one line naming ``data.name`` and the
    samples of the failing message; what earlier points wrote stays as it was.
    """

    def __init__(
        self,
        dataset,
        device: torch.device,
        dtype: torch.dtype,
        name: str,
        batch_size: int,
        workers: int = 2,
        prefetch: int = 2,
    ):
        self.dataset, self.device, self.dtype, self.name = dataset, device, dtype, name
        self.batch_size, self.workers, self.prefetch = batch_size, workers, prefetch
        self.sample_bytes = sample_bytes(dataset, dtype)
        self.stream: Iterator | None = None  # the endless stream of batch_size passes
        self.passing: set[int] = set()  # batch sizes of the passes under way
        self.unit_counts: dict[Objective, int] = {}  # one pass per objective that masks

    def __len__(self) -> int:
        return len(self.dataset)

    def message_batches(self, size: int) -> int:
        """Batches of ``size`` per worker message: as many as :data:`MESSAGE_BYTES` hold,
        and few enough that the messages read ahead (``prefetch`` per worker) hold at most
        one pass, at least one."""
        per_pass = math.ceil(len(self) / size)
        ahead = per_pass // (max(self.workers, 1) * self.prefetch)
        return max(1, min(MESSAGE_BYTES // (size * self.sample_bytes), ahead))

    def loader(self, size: int, endless: bool) -> DataLoader:
        background = {"prefetch_factor": self.prefetch, "worker_init_fn": lowest_priority}
        return DataLoader(
            self.dataset,
            batch_sampler=PassMessages(len(self), size, self.message_batches(size), endless),
            collate_fn=collate,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            **(background if self.workers else {}),
        )

    def messages(self, size: int) -> Iterator:
        """The messages of one pass in batches of ``size``: the stream's next pass for the
        evaluation's batch size, a loader of its own otherwise."""
        if size != self.batch_size:
            return iter(self.loader(size, endless=False))
        if self.stream is None:
            self.stream = iter(self.loader(size, endless=True))
        return self.stream

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if size in self.passing:
            raise RuntimeError(f"a second pass in batches of {size} while one is under way")
        self.passing.add(size)
        try:
            yield from self.read(self.messages(size), size)
        finally:
            self.passing.discard(size)

    def read(self, messages: Iterator, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one pass, on the device, from its ``messages`` (each a whole
        number of batches); a user's failure is one line naming the samples. A pass that
        stops before it took its last message ends the stream (its workers stop; the
        rest of that pass is never read)."""
        per_message = size * self.message_batches(size)
        last = (len(self) - 1) // per_message * per_message  # the last message's start
        taken = False
        try:
            for start in range(0, len(self), per_message):
                end = min(start + per_message, len(self))
                try:
                    inputs, targets = next(messages)
                except Exception as exc:  # a user's __getitem__, in a worker or here
                    raise UserError(
                        f"data.name: {self.name} failed to load samples {start}..{end - 1} "
                        f"({describe(exc)}); fix the Dataset's __getitem__"
                    ) from None
                taken = start == last
                if len(inputs) != end - start or len(targets) != end - start:
                    raise UserError(
                        f"data.name: {self.name} served {len(inputs)} inputs and "
                        f"{len(targets)} targets for samples {start}..{end - 1}; make "
                        "__getitems__ return one item per index"
                    )
                for first in range(0, len(inputs), size):
                    yield (
                        self.to_device(inputs[first : first + size]),
                        self.to_device(targets[first : first + size]),
                    )
        finally:
            if not taken and messages is self.stream:
                self.stream = None

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(torch.arange(min(count, len(self))))

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read in this process: a probe or a minibatch is too small to wait for workers."""
        chosen = torch.utils.data.Subset(self.dataset, indices.tolist())
        try:
            inputs, targets = next(iter(DataLoader(chosen, len(chosen), collate_fn=collate)))
        except Exception as exc:
            raise UserError(
                f"data.name: {self.name} failed to load {len(chosen)} samples "
                f"({describe(exc)}); fix the Dataset's __getitem__"
            ) from None
        return self.to_device(inputs), self.to_device(targets)

    def to_device(self, values: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if values.is_floating_point() else values.dtype
        return values.to(self.device, dtype, non_blocking=True)

    def units(self, objective: Objective) -> int:
        """The number of samples for an objective that counts them; for one that masks
        units (padded tokens), one pass over the set the first time it asks."""
        if type(objective).count is Objective.count:
            return len(self)
        if objective not in self.unit_counts:
            self.unit_counts[objective] = sum(
                objective.count(targets) for _, targets in self.batches(COUNT_BATCH)
            )
        return self.unit_counts[objective]


# Samples per batch of the passes that only read: counting units, filling a held set.
COUNT_BATCH = 1024

# Loader workers ``data.workers: auto`` starts where the compute leaves cores to spare:
# the count the streaming target is stated with (benchmarks/stream_bench.py). Each one
# more holds another copy of the Dataset object and its own messages read ahead.
AUTO_WORKERS = 2


def auto_workers(device: torch.device, cores: int, threads: int) -> int:
    """Loader workers for ``data.workers: auto`` on ``device``, for a process that may use
    ``cores`` cores and computes on ``threads`` torch threads: ``min(AUTO_WORKERS, spare)``
    with ``spare = cores - threads`` on a CPU (0: read in this process), and with
    ``spare = cores - 1`` on any other device (one core drives it).

    Why: a pass of B batches costs, per batch, the compute c and the read r of its
    samples. Read in this process, a pass takes B (c + r). A worker reads in another
    process and hands each message over (a pickle, shared-memory segments, a socket),
    which costs this process some h per batch. With spare cores the workers read while
    the compute runs: B max(c + h, r / workers), below B (c + r) whenever h < r. Without
    one they run (at SCHED_IDLE, :func:`lowest_priority`) only in the gaps of the
    compute's threads, so the reads are serial anyway: B (c + r + h), strictly more than
    reading in process. Measured on 2 cores with 2 threads (stream_bench, points/s of
    held data, median of 14 runs on a shared machine): ResNet-20 0.80 through 2
    workers, 0.88 read in process; small CNN 0.52, 0.66; MLP 0.08, 0.19. A GPU computes
    on its own: every host core but the one driving it is spare.

    ``cores`` of a rank of an MPI run is its share of the node (:func:`loader_workers`),
    so ranks x threads = cores leaves none spare: each rank reads in process.
    """
    busy = threads if device.type == "cpu" else 1
    return min(AUTO_WORKERS, max(0, cores - busy))


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``data.workers`` as a count of loader workers: an integer as it is; ``auto`` by
    :func:`auto_workers` from the cores this process may use and torch's threads now,
    said in the log. Called when the data are placed (:meth:`TorchData.on`, from
    ``Experiment.load`` after it applied ``evaluation.threads``), so the rule sees the
    run's thread count.

    The cores this process may use are its affinity mask, alone or as a pinned rank of
    an MPI run; an unpinned rank shares its mask with the node's other ranks evenly
    (:func:`cpu_threads_per_rank` over :func:`~landscape.ranks.launched_local_size`). A rank
    without ``evaluation.threads`` still has torch's default here (its whole mask;
    ``load_evaluator`` lowers it to the share later): none spare either way."""
    if setting != "auto":
        return setting
    cores = cpu_threads_per_rank(launched_local_size())
    threads = torch.get_num_threads()
    workers = auto_workers(device, cores, threads)
    if device.type != "cpu":
        why = f"{device} computes, one of {cores} host cores drives it"
    else:
        spare = max(0, cores - threads)
        why = f"cores {cores}, torch threads {threads}, spare {spare or 'none'}"
    log.info(
        "data.workers auto = %d (%s): %s; data.workers: %s",
        workers,
        "loader processes" if workers else "read in process",
        why,
        "0 reads in process" if workers else f"{AUTO_WORKERS} reads in background processes",
    )
    return workers


# Bytes of samples a loader worker sends in one message at most: a message has a fixed
# cost (a shared-memory segment per tensor, a pickle, a socket round trip) that small
# batches of cheap samples would pay once each.
MESSAGE_BYTES = 4 * 2**20


class PassMessages(torch.utils.data.Sampler):
    """A ``batch_sampler`` of passes over ``count`` samples in batches of ``size``: the
    sample indices of each worker message, ``group`` consecutive batches (fewer at the
    end of a pass: a message never spans two passes), for one pass or, ``endless``, for
    as many as are asked."""

    def __init__(self, count: int, size: int, group: int, endless: bool):
        self.count, self.step, self.endless = count, size * group, endless

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            for start in range(0, self.count, self.step):
                yield list(range(start, min(start + self.step, self.count)))
            if not self.endless:
                return


def collate(read) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch from what the loader read for it: a list of (input, target) items,
    stacked by ``default_collate``; or the (inputs, targets) tensors a Dataset's
    ``__getitems__(indices)`` read as one batch, as they are. A batched read costs one
    call per message where items cost one Python call (and one copy) per sample, more
    than the compute of a small model on it."""
    if isinstance(read, tuple) and all(isinstance(value, torch.Tensor) for value in read):
        return read
    return default_collate(read)


def lowest_priority(worker: int) -> None:
    """A loader worker's ``worker_init_fn``: the worker runs only on a core the compute
    leaves idle (Linux's SCHED_IDLE policy; elsewhere the lowest nice level). The forward
    pass's OpenMP threads wait for each other at the end of every parallel region, so a
    worker that takes a core from one of them stalls them all: at normal priority a
    worker costs the compute more than its own CPU time whenever the compute's threads
    fill the cores."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def sample_bytes(dataset, dtype: torch.dtype) -> int:
    """Bytes one sample takes on the device, from the first: its input's and target's
    elements, floating ones at ``dtype``'s size."""
    total = 0
    for value in dataset[0]:
        value = torch.as_tensor(value)
        size = torch.finfo(dtype).bits // 8 if value.is_floating_point() else value.element_size()
        total += value.numel() * size
    return total


def choose_samples(
    dataset,
    device: torch.device,
    dtype: torch.dtype,
    name: str,
    batch_size: int,
    stream: str = "auto",
    workers: int = 2,
    prefetch: int = 2,
) -> Samples:
    """The samples of a ``torch.utils.data.Dataset``: held on the device when ``stream``
    is ``never``, or ``auto`` and the whole set takes at most :data:`HELD_SHARE` of the
    device's free memory (read once through the loader, then sliced like built-in data);
    streamed otherwise. The choice and its reason go to the log."""
    streamed = StreamedSamples(dataset, device, dtype, name, batch_size, workers, prefetch)
    need = len(dataset) * sample_bytes(dataset, dtype)
    free = free_memory(device)
    if stream == "auto":
        stream = "always" if free is not None and need > HELD_SHARE * free else "never"
        known = f"{in_units(free)} free on {device}" if free is not None else "free memory unknown"
        why = f"data.stream auto: {in_units(need)} against {known}"
    else:
        why = f"data.stream: {stream}"
    if stream == "always":
        log.info(
            "data: %s streams %d samples %s, one pass per grid point and per Hessian-vector "
            "product (%s)",
            name,
            len(dataset),
            f"through {workers} loader workers" if workers else "read in process",
            why,
        )
        return streamed
    log.info("data: %s holds %d samples on %s (%s)", name, len(dataset), device, why)
    inputs, targets = zip(*streamed.batches(COUNT_BATCH))
    return HeldSamples(torch.cat(inputs), torch.cat(targets))


class SplitSamples:
    """The train and test samples of a data set read through ``torch.utils.data``, with
    what the model is built from: ``num_classes`` and the shape of one input."""

    def __init__(self, train: Samples, test: Samples, num_classes: int, input_shape: tuple):
        self.train, self.test = train, test
        self.num_classes, self.input_shape = num_classes, input_shape

    def split(self, name: str) -> Samples:
        """The samples of ``"train"`` or ``"test"``."""
        return self.train if name == "train" else self.test


class TorchData:
    """What a data plug-in returns for a set it does not hand over as tensors: map-style
    ``torch.utils.data.Dataset`` objects whose items are (input, target) pairs, one for
    training and one for testing, and the number of classes (of outputs, for regression).
    Nothing is read until :meth:`on` places it (or :func:`check_torch_data` looks at the
    first items)."""

    def __init__(self, train, test, num_classes: int, name: str, vocab: int | None = None):
        self.train, self.test, self.num_classes, self.name = train, test, num_classes, name
        self.vocab = vocab  # token ids are checked below it (default num_classes)

    @property
    def input_shape(self) -> tuple:
        return tuple(torch.as_tensor(self.train[0][0]).shape)

    def on(
        self, device: torch.device, dtype: torch.dtype, settings, batch_size: int
    ) -> SplitSamples:
        """Both splits, each held or streamed by :func:`choose_samples` under the config's
        ``data`` section (``settings``: stream, workers, prefetch), passes in batches of
        ``batch_size`` (evaluation.batch_size) keeping their loader workers."""
        workers = loader_workers(settings.workers, device)
        train, test = (
            choose_samples(
                dataset,
                device,
                dtype,
                f"{self.name} ({split})",
                batch_size,
                settings.stream,
                workers,
                settings.prefetch,
            )
            for split, dataset in (("train", self.train), ("test", self.test))
        )
        return SplitSamples(train, test, self.num_classes, self.input_shape)
