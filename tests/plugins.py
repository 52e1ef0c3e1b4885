"""User plug-ins for tests, imported by name (``plugins:regression``) as a user's would be.

Beside the good ones, a battery of broken data, model and objective factories, each
broken the way a user's can be; ``tests/test_plugins.py`` and ``tests/test_objectives.py``
plan each and expect one line naming it.
"""

import numpy as np
import torch
from torch import nn

from landscape.data import Dataset, load_dataset
from landscape.objectives import Objective

# The data every bad model below is planned on: 3 classes of 5 features.
FEATURES, CLASSES = 5, 3


def regression(
    samples: int = 40, inputs: int = 3, outputs: int = 2, seed: int = 0, dtype: str = "float64"
) -> dict:
    """Random linear-regression data: float targets, so the loss must be ``mse``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs)).astype(dtype)
    y = x @ rng.normal(size=(inputs, outputs)).astype(dtype)
    y += 0.3 * rng.normal(size=(samples, outputs)).astype(dtype)
    return {"train_x": x, "train_y": y, "test_x": x[:10], "test_y": y[:10], "num_classes": outputs}


def classes(samples: int = 30, **changes) -> dict:
    """Good classification data (``FEATURES`` features, ``CLASSES`` classes) with ``changes``
    to its fields: the base of the bad data below."""
    rng = np.random.default_rng(0)
    data = {
        "train_x": rng.normal(size=(samples, FEATURES)),
        "train_y": np.arange(samples) % CLASSES,
        "test_x": rng.normal(size=(9, FEATURES)),
        "test_y": np.arange(9) % CLASSES,
        "num_classes": CLASSES,
    }
    return {**data, **changes}


def labels_of(dtype: str) -> Dataset:
    """``classes`` as a Dataset, given as is (no conversion), with labels of ``dtype``."""
    data = classes()
    labels = getattr(torch, dtype)
    return Dataset(
        torch.as_tensor(data["train_x"], dtype=torch.float32),
        torch.as_tensor(data["train_y"]).to(labels),
        torch.as_tensor(data["test_x"], dtype=torch.float32),
        torch.as_tensor(data["test_y"]).to(labels),
        CLASSES,
    )


def without_test_set():
    return classes(test_x=np.zeros((0, FEATURES)), test_y=np.zeros(0, dtype=int))


def data_raises():
    raise FileNotFoundError("/data/features.npy: no such file\nsecond line of the message")


def data_returns_none():
    return None


def data_returns_a_tuple():
    data = classes()
    return data["train_x"], data["train_y"]


def data_without_test_y():
    data = classes()
    del data["test_y"]
    return data


def lengths_differ():
    return classes(train_y=np.arange(29) % CLASSES)


def label_too_large():
    labels = np.arange(30) % CLASSES
    labels[7] = CLASSES
    return classes(train_y=labels)


def negative_label():
    labels = np.arange(9) % CLASSES
    labels[2] = -1
    return classes(test_y=labels)


def text_inputs():
    return classes(train_x=np.array([["a"] * FEATURES] * 30))


def nan_inputs():
    data = classes()
    data["train_x"][4, 1] = np.nan
    return data


def inf_inputs():
    data = classes()
    data["test_x"][0, 0] = -np.inf
    return data


def nan_targets():
    data = regression()
    data["train_y"][3, 0] = np.nan
    return data


def empty_training_set():
    return classes(train_x=np.zeros((0, FEATURES)), train_y=np.zeros(0, dtype=int))


def no_classes():
    return classes(num_classes=0)


def mismatched_test_inputs():
    return classes(test_x=np.zeros((9, FEATURES + 1)))


def text_labels():
    return classes(train_y=np.array(["cat", "dog", "owl"] * 10))


def unit(input_shape: tuple, num_classes: int) -> nn.Module:
    """A good factory, whose checkpoints the bad models below share."""
    return nn.Linear(input_shape[0], num_classes)


def model_raises(input_shape: tuple, num_classes: int) -> nn.Module:
    raise RuntimeError("weights server unreachable\nsecond line of the message")


def model_returns_none(input_shape: tuple, num_classes: int):
    return None


def model_returns_a_function(input_shape: tuple, num_classes: int):
    return unit


def model_without_arguments() -> nn.Module:
    return nn.Linear(FEATURES, CLASSES)


def model_with_required_option(input_shape: tuple, num_classes: int, depth: int) -> nn.Module:
    return nn.Linear(input_shape[0], num_classes)


def model_without_parameters(input_shape: tuple, num_classes: int) -> nn.Module:
    return nn.Flatten()


def wrong_width(input_shape: tuple, num_classes: int) -> nn.Module:
    return nn.Linear(input_shape[0], num_classes + 1)


class Wrapped(nn.Module):
    """``unit`` (same parameter names) with a ``forward`` a test overrides."""

    def __init__(self, input_shape: tuple, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(input_shape[0], num_classes)


class TupleOutput(Wrapped):
    def forward(self, x):
        return self.linear(x), x


class DictOutput(Wrapped):
    """Hugging Face style: a mapping with a ``logits`` entry."""

    def forward(self, x):
        return {"logits": self.linear(x)}


class FlatOutput(Wrapped):
    def forward(self, x):
        return self.linear(x).sum(1)


class FailingForward(Wrapped):
    def forward(self, x):
        return self.linear(x[:, :2])  # (B, 2) x (5, 3): the shapes do not match


class NaNOutput(Wrapped):
    def forward(self, x):
        return self.linear(x) * torch.tensor(float("nan"))


class IntegerOutput(Wrapped):
    """Rounded logits as integers: the right shape, finite, but no loss takes them."""

    def forward(self, x):
        return self.linear(x).round().long()


class LabelSmoothed(Objective):
    """Cross-entropy against labels smoothed by ``smoothing``, written out as a user would:
    (1 - s) * (-log p_y) + s * mean over classes of (-log p_c)."""

    accuracy = True
    softmax_gauge = True  # a function of log_softmax: blind to a shift of all logits

    def __init__(self, smoothing: float):
        self.smoothing = smoothing

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = outputs.log_softmax(1)
        picked = log_p.gather(1, targets[:, None])[:, 0]
        return -(1 - self.smoothing) * picked - self.smoothing * log_p.mean(1)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).sum()

    def target_problem(self, targets: torch.Tensor) -> str | None:
        return "float targets; use mse" if targets.is_floating_point() else None


def label_smoothed(smoothing: float = 0.1) -> Objective:
    """``evaluation.loss: plugins:label_smoothed`` with ``loss_kwargs: {smoothing: ...}``."""
    return LabelSmoothed(smoothing)


class MeanOnly(LabelSmoothed):
    """Returns the batch mean instead of one loss per sample."""

    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().losses(outputs, targets).mean()


class LossRaises(LabelSmoothed):
    def losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise ValueError("labels must be one-hot")


def loss_returns_a_mean() -> Objective:
    return MeanOnly(0.1)


def loss_raises() -> Objective:
    return LossRaises(0.1)


def loss_returns_a_function():
    return torch.nn.functional.cross_entropy


def absolute_error() -> Objective:
    """A regression objective of the user's, without an accuracy: |output - target|."""

    class AbsoluteError(Objective):
        def losses(self, outputs, targets):
            return (outputs - targets.view_as(outputs)).abs().flatten(1).mean(1)

    return AbsoluteError()


class ItemByItem(torch.utils.data.Dataset):
    """Tensors served one (input, target) item at a time, as a user's map-style Dataset
    serves files. ``fail_on_read``: the read of the last sample (one per full pass over
    the set) that raises, counted in the process that reads it (0: never)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, fail_on_read: int = 0):
        self.inputs, self.targets, self.fail_on_read = inputs, targets, fail_on_read
        self.reads = 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        if index == len(self) - 1:
            self.reads += 1
            if self.reads == self.fail_on_read:
                raise OSError(f"input/output error reading sample {index}")
        return self.inputs[index], self.targets[index]


def streamed(name: str = "gaussian_clusters", fail_on_read: int = 0, **kwargs) -> dict:
    """The built-in data set ``name`` as train and test Datasets read item by item."""
    data = load_dataset(name, kwargs)
    return {
        "train": ItemByItem(data.train_x, data.train_y, fail_on_read),
        "test": ItemByItem(data.test_x, data.test_y),
        "num_classes": data.num_classes,
    }


def streamed_pair_of_three() -> dict:
    """Items that are triples, not (input, target) pairs."""
    triples = [(torch.zeros(FEATURES), 0, "extra")] * 4
    return {"train": triples, "test": triples, "num_classes": CLASSES}
