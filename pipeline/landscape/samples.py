"""The samples of one split, served to every full-data pass in batches on the device.

Every full-data quantity (mean loss and accuracy at a grid point, the gradient, each
curvature-vector product) is a sum over consecutive batches in sample order, so all a
pass needs from the data is :meth:`Samples.batches`. Two kinds serve them:

- :class:`HeldSamples`: whole tensors moved to the device once and sliced there (the
  default: no loader, no copy per pass);
- :class:`StreamedSamples`: a ``torch.utils.data.Dataset`` read through a ``DataLoader``
  with background workers, pinned host memory and prefetching, copied to the device
  batch by batch, for a set larger than device (or host) memory. Every pass reads the
  whole set again: one pass per grid point, per gradient and per Hessian-vector product.

Both serve the same batches in the same order, cast to the same dtype, so every number
computed from them is the same, bit for bit: the floating-point operations are the same
on the same values. :func:`choose_samples` picks the kind by size and says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from landscape.errors import UserError, describe
from landscape.memory import free_memory, in_units
from landscape.objectives import Objective

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
    by a ``DataLoader`` (``workers`` background processes, each ``prefetch`` batches
    ahead) and copied to ``device``, floating values cast to ``dtype`` exactly as held
    tensors are. The workers of passes in ``batch_size`` batches (the evaluation's: every
    grid point and every product) persist, so such a pass costs no process start; a pass
    in other batches (several HVPs at once, the count of units) starts and stops its own.
    One pass of a size at a time: a second one would share the first's loader.

    A sample that fails to load stops the pass with one line naming ``data.name`` and the
    samples of the failing batch; what earlier points wrote stays as it was.
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
        self.persistent: DataLoader | None = None  # the loader of batch_size, built once
        self.passing: set[int] = set()  # batch sizes of the passes under way
        self.unit_counts: dict[Objective, int] = {}  # one pass per objective that masks

    def __len__(self) -> int:
        return len(self.dataset)

    def loader(self, size: int) -> DataLoader:
        persistent = size == self.batch_size
        if persistent and self.persistent is not None:
            return self.persistent
        background = {"persistent_workers": persistent, "prefetch_factor": self.prefetch}
        loader = DataLoader(
            self.dataset,
            batch_size=size,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            **(background if self.workers else {}),
        )
        if persistent:
            self.persistent = loader
        return loader

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if size in self.passing:
            raise RuntimeError(f"a second pass in batches of {size} while one is under way")
        self.passing.add(size)
        try:
            yield from self.read(iter(self.loader(size)), size)
        finally:
            self.passing.discard(size)

    def read(self, batch, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one pass from the loader iterator ``batch``, on the device; a
        user's failure is one line naming the samples."""
        for start in range(0, len(self), size):
            try:
                inputs, targets = next(batch)
            except StopIteration:
                raise UserError(
                    f"data.name: {self.name} served {start} samples but its len() says "
                    f"{len(self)}; make __len__ and __getitem__ agree"
                ) from None
            except Exception as exc:  # a user's __getitem__, in a worker or here
                end = min(start + size, len(self)) - 1
                raise UserError(
                    f"data.name: {self.name} failed to load samples {start}..{end} "
                    f"({describe(exc)}); fix the Dataset's __getitem__"
                ) from None
            yield self.to_device(inputs), self.to_device(targets)

    def head(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(torch.arange(min(count, len(self))))

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read in this process: a probe or a minibatch is too small to wait for workers."""
        chosen = torch.utils.data.Subset(self.dataset, indices.tolist())
        try:
            inputs, targets = next(iter(DataLoader(chosen, batch_size=len(chosen))))
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
            "data: %s streams %d samples through %d loader workers, one pass per grid point "
            "and per Hessian-vector product (%s)",
            name,
            len(dataset),
            workers,
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
        train, test = (
            choose_samples(
                dataset,
                device,
                dtype,
                f"{self.name} ({split})",
                batch_size,
                settings.stream,
                settings.workers,
                settings.prefetch,
            )
            for split, dataset in (("train", self.train), ("test", self.test))
        )
        return SplitSamples(train, test, self.num_classes, self.input_shape)
