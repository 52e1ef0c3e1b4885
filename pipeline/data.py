"""Data sets as in-memory tensors: built-in ones (no download ever) and user plug-ins.

Every loader returns a :class:`Dataset` of whole tensors, because a landscape
evaluates the *full* training set at every grid point: the data is moved to the
device once and sliced into batches there, with no DataLoader in the loop.

Built-in: ``digits`` (scikit-learn's 8x8 handwritten digits, the default),
``gaussian_clusters`` (C Gaussian classes, Sagun et al.), ``mnist1d`` (generated
locally by the ``mnist1d`` package) and ``cifar10`` (a local ``cifar-10-batches-py``
folder). ``package.module:function`` plugs in user data; it returns a Dataset or a
dict with the same fields.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError, describe
from pipeline.plugins import import_object

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct


@dataclass
class Dataset:
    """Train and test inputs and targets; integer targets mean classification."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(inputs, targets)`` of ``"train"`` or ``"test"``."""
        return (self.train_x, self.train_y) if name == "train" else (self.test_x, self.test_y)


def load_dataset(name: str, kwargs: dict) -> Dataset:
    """Load a built-in data set by name or a user one by ``package.module:function``."""
    loader = import_object(name, "data.name") if ":" in name else BUILT_IN.get(name)
    if loader is None:
        raise UserError(
            f"data.name: unknown data set {name!r}; choose from {', '.join(BUILT_IN)} "
            "or give package.module:function"
        )
    try:
        result = loader(**kwargs)
    except TypeError as exc:
        raise UserError(f"data.kwargs: {name} rejects {kwargs} ({exc}); fix data.kwargs") from None
    return result if isinstance(result, Dataset) else _from_mapping(result, name)


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 handwritten digits as 1x8x8 images, stratified fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    train_x, test_x, train_y, test_y = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    mean, std = train_x.mean(), train_x.std()
    return _tensors((train_x - mean) / std, train_y, (test_x - mean) / std, test_y, 10)


def gaussian_clusters(
    num_classes: int = 10,
    dim: int = 32,
    train_per_class: int = 100,
    test_per_class: int = 50,
    separation: float = 3.0,
    seed: int = 0,
) -> Dataset:
    """C isotropic unit Gaussians whose means lie at distance ``separation`` from the origin.

    Random mean directions in ``dim`` dimensions are nearly orthogonal, so two class
    means are about ``separation * sqrt(2)`` apart: larger is easier to separate.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)

    def sample(per_class: int):
        labels = np.repeat(np.arange(num_classes), per_class)
        points = means[labels] + rng.normal(size=(labels.size, dim))
        order = rng.permutation(labels.size)
        return points[order].astype(np.float32), labels[order]

    train_x, train_y = sample(train_per_class)
    test_x, test_y = sample(test_per_class)
    return _tensors(train_x, train_y, test_x, test_y, num_classes)


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D generated locally by ``mnist1d.data.make_dataset`` (never downloaded)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise UserError(
            "data.name: mnist1d needs the mnist1d package; pip install mnist1d"
        ) from None
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    saved = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(saved)
    signals = [data[k].astype(np.float32)[:, None, :] for k in ("x", "x_test")]  # (N, 1, 40)
    return _tensors(signals[0], data["y"], signals[1], data["y_test"], 10)


CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def cifar10(root: str, limit: int = 0) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (the standard pickles).

    ``limit`` > 0 keeps only the first ``limit`` training and test images.
    """
    folder = Path(root).expanduser()
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test_files = [folder / "test_batch"]
    for path in train_files + test_files:
        if not path.is_file():
            raise UserError(
                f"data.kwargs.root: {path} is missing; point root at a cifar-10-batches-py folder"
            )
    train_x, train_y = _read_cifar_batches(train_files, limit)
    test_x, test_y = _read_cifar_batches(test_files, limit)
    return _tensors(train_x, train_y, test_x, test_y, 10)


def _read_cifar_batches(paths: list[Path], limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*(_read_cifar_batch(path) for path in paths))
    x = np.concatenate(images).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    y = np.concatenate(labels)
    if limit:
        x, y = x[:limit], y[:limit]
    x = (x - CIFAR10_MEAN[:, None, None]) / CIFAR10_STD[:, None, None]
    return x, y


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 3072) uint8, labels (n,))`` of one batch file, unpickled by
    :class:`CifarUnpickler`: a file that asks for anything else is refused unrun."""
    try:
        with open(path, "rb") as handle:
            batch = CifarUnpickler(handle, encoding="bytes").load()
    except ForeignGlobal as exc:
        raise UserError(
            f"data.kwargs.root: {path} is not a CIFAR-10 batch: it refers to {exc}, which no "
            "batch holds, and this tool unpickles nothing else (no code from a file runs); "
            "replace it with the original download"
        ) from None
    except Exception as exc:  # a pickle can fail in many ways: EOFError, ValueError, ...
        raise UserError(
            f"data.kwargs.root: cannot read {path} as a CIFAR-10 batch ({describe(exc)}); "
            "the file is corrupt or truncated, replace it with the original download"
        ) from None
    images = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (
        not isinstance(images, np.ndarray)
        or images.ndim != 2
        or images.shape[1] != 3 * 32 * 32
        or not isinstance(labels, list)
        or len(labels) != len(images)
    ):
        raise UserError(
            f"data.kwargs.root: {path} is not a CIFAR-10 batch (a dict of b'data', uint8 "
            "images (n, 3072), and b'labels', n integers); replace it with the original download"
        )
    return images.astype(np.uint8), np.asarray(labels)


class ForeignGlobal(pickle.UnpicklingError):
    """A pickle asked for a function or class that no CIFAR-10 batch holds."""


class CifarUnpickler(pickle.Unpickler):
    """Unpickles the contents of a genuine CIFAR-10 batch and refuses everything else.

    A batch is a dict of bytes keys holding lists of ints and bytes, and one numpy array.
    Those are built by the pickle machine itself except the array, which needs exactly
    three globals: ``_reconstruct`` (under numpy 1's or numpy 2's module name),
    ``ndarray`` and ``dtype``. Any other global (``os.system``, ``builtins.eval``) is
    what a crafted file uses to run code: it is refused before it is even looked up.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise ForeignGlobal(f"{module}.{name}") from None


def _tensors(train_x, train_y, test_x, test_y, num_classes: int) -> Dataset:
    def target(y):
        y = np.asarray(y)
        return torch.as_tensor(y, dtype=torch.long if y.dtype.kind in "iu" else torch.float32)

    return Dataset(
        torch.as_tensor(np.asarray(train_x, dtype=np.float32)),
        target(train_y),
        torch.as_tensor(np.asarray(test_x, dtype=np.float32)),
        target(test_y),
        int(num_classes),
    )


def _from_mapping(result, name: str) -> Dataset:
    fields = ("train_x", "train_y", "test_x", "test_y", "num_classes")
    if not isinstance(result, dict) or any(k not in result for k in fields):
        raise UserError(
            f"data.name: {name} must return a Dataset or a dict with {', '.join(fields)}"
        )
    return _tensors(*(result[k] for k in fields))


BUILT_IN = {
    "digits": digits,
    "gaussian_clusters": gaussian_clusters,
    "mnist1d": mnist1d,
    "cifar10": cifar10,
}
