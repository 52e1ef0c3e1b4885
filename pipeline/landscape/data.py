"""Data sets: built-in ones (no download ever) and user plug-ins.

A loader returns a :class:`Dataset` of whole tensors, because a landscape evaluates the
*full* training set at every grid point: the data is moved to the device once and
sliced into batches there, with no DataLoader in the loop. A plug-in whose set is too
large for that returns ``torch.utils.data.Dataset`` objects instead (a dict with
``train``, ``test`` and ``num_classes``), which :mod:`landscape.samples` holds on the
device when they fit or streams through a DataLoader when they do not.

Built-in: ``digits`` (scikit-learn's 8x8 handwritten digits, the default),
``gaussian_clusters`` (C Gaussian classes, Sagun et al.), ``mnist1d`` (generated
locally by the ``mnist1d`` package), ``cifar10`` (a local ``cifar-10-batches-py``
folder) and ``text`` (byte-level next-token prediction on the English help text that
ships with Python). ``package.module:function`` plugs in user data; it returns a
Dataset or a dict with the same fields.

Inputs are floats (features, pixels) or integers: integer inputs are token ids, kept
int64 (an embedding takes them; the experiment never casts them to ``evaluation.dtype``)
and checked to lie in ``0 .. vocab - 1``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from landscape.errors import UserError, describe
from landscape.plugins import call_factory, import_object
from landscape.samples import HeldSamples, TorchData

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct


DATASET_FIELDS = ("train_x", "train_y", "test_x", "test_y", "num_classes")
IGNORE_INDEX = -100  # a target cross-entropy skips: padding (torch's ignore_index default)


@dataclass
class Dataset:
    """Train and test inputs and targets; integer targets mean classification (one label
    per sample, or one per token for (samples, tokens) targets). Integer inputs are token
    ids below ``vocab``, which defaults to ``num_classes`` (a language model predicts the
    tokens it reads)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    vocab: int | None = None

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> HeldSamples:
        """The samples of ``"train"`` or ``"test"``."""
        if name == "train":
            return HeldSamples(self.train_x, self.train_y)
        return HeldSamples(self.test_x, self.test_y)


def load_dataset(name: str, kwargs: dict) -> Dataset | TorchData:
    """Load a built-in data set by name or a user one by ``package.module:function``,
    checked by :func:`check_dataset` (:func:`check_torch_data`) before anything uses it."""
    loader = import_object(name, "data.name") if ":" in name else BUILT_IN.get(name)
    if loader is None:
        raise UserError(
            f"data.name: unknown data set {name!r}; choose from {', '.join(BUILT_IN)} "
            "or give package.module:function"
        )
    result = call_factory(loader, name, "data.name", {}, kwargs)
    if isinstance(result, dict) and set(TORCH_DATA_FIELDS) <= set(result):
        data = TorchData(*(result[field] for field in TORCH_DATA_FIELDS), name, result.get("vocab"))
        check_torch_data(data)
        return data
    data = result if isinstance(result, Dataset) else _from_mapping(result, name)
    check_dataset(data, name)
    data.num_classes = int(data.num_classes)
    data.vocab = None if data.vocab is None else int(data.vocab)
    # Cross-entropy takes int64 labels only: an int32 or uint8 Dataset would fail at the
    # first grid point, so labels (and token ids) of any integer type become int64 here.
    for field in DATASET_FIELDS[:4]:
        values = getattr(data, field)
        if not values.is_floating_point():
            setattr(data, field, values.long())
    return data


def check_dataset(data: Dataset, name: str) -> None:
    """Fail in one line naming the field unless ``data`` can be evaluated: tensors of
    float inputs or integer token ids with one row per sample (the same trailing shape
    and kind in both splits), as many targets as inputs, samples in both splits
    (training evaluates the test set), every float input and float target finite, token
    ids in ``0 .. vocab - 1``, class labels in ``0 .. num_classes - 1``: one per sample,
    or one per token ((samples, tokens) labels), where padding is -100 (IGNORE_INDEX).

    Checked once at load, because each defect otherwise surfaces far away: a NaN input
    makes every map NaN while the points count as done, a label or token id out of
    range fails inside cross-entropy or an embedding at the first point (on a GPU as a
    device-side assert), except a label -100 of one label per sample, which
    cross-entropy would silently skip (its ``ignore_index``).
    """
    given = f"data.name: {name} returned"
    for field in DATASET_FIELDS[:4]:
        value = getattr(data, field)
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"{given} a Dataset with {field} as {type(value).__name__}; a Dataset holds "
                "tensors (return a dict to have arrays converted)"
            )
    classes = data.num_classes
    if not _is_count(classes):
        raise UserError(
            f"{given} num_classes {classes!r}; give the number of classes (of outputs, for "
            "regression), an integer >= 1"
        )
    vocab = classes if data.vocab is None else data.vocab
    if not _is_count(vocab):
        raise UserError(f"{given} vocab {vocab!r}; give the number of token ids, an integer >= 1")
    for split in ("train", "test"):
        inputs, targets = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if len(inputs) == 0:
            kind = "training" if split == "train" else "test"
            raise UserError(f"{given} an empty {kind} set ({split}_x has 0 samples)")
        if len(inputs) != len(targets):
            raise UserError(
                f"{given} {len(inputs)} {split}_x samples but {len(targets)} {split}_y "
                "targets; give one target per input"
            )
        if inputs.dim() < 2 or inputs.shape[1:] != data.train_x.shape[1:]:
            raise UserError(
                f"{given} {split}_x of shape {tuple(inputs.shape)}; give one row per sample, "
                f"(samples, features...), of the same shape in both splits"
            )
        if inputs.is_floating_point() != data.train_x.is_floating_point():
            raise UserError(
                f"{given} {split}_x of {inputs.dtype} beside train_x of {data.train_x.dtype}; "
                "give float inputs or integer token ids in both splits"
            )
        if inputs.is_complex() or inputs.dtype == torch.bool:
            raise UserError(
                f"{given} {split}_x of {inputs.dtype}; give floating-point inputs or integer "
                "token ids"
            )
        if targets.is_floating_point() != data.train_y.is_floating_point():
            raise UserError(
                f"{given} {split}_y of {targets.dtype} beside train_y of {data.train_y.dtype}; "
                "give integer class labels or float targets in both splits"
            )
        if inputs.is_floating_point():
            _check_finite(inputs, f"{given} {split}_x")
        else:
            _check_range(inputs, vocab, f"{given} {split}_x token id", f"vocab {vocab}")
        if targets.is_floating_point():
            _check_finite(targets, f"{given} {split}_y")
        elif targets.dim() not in (1, 2):
            raise UserError(
                f"{given} {split}_y of shape {tuple(targets.shape)}; class labels are one "
                "integer per sample, shape (samples,), or one per token, (samples, tokens)"
            )
        else:
            padding = IGNORE_INDEX if targets.dim() == 2 else None
            _check_range(
                targets, classes, f"{given} {split}_y label", f"num_classes {classes}", padding
            )


def _is_count(value) -> bool:
    """Whether ``value`` is an integer >= 1 (a bool is no count)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _check_range(
    values: torch.Tensor, limit: int, described: str, bound: str, padding: int | None = None
) -> None:
    """Fail naming the first sample holding an integer outside ``0 .. limit - 1`` (other
    than ``padding``), and how many there are in all."""
    outside = (values < 0) | (values >= limit)
    if padding is not None:
        outside &= values != padding
    outside = outside.reshape(len(values), -1).nonzero()
    if len(outside):
        sample, position = (int(i) for i in outside[0])
        allowed = f"0..{limit - 1}" + ("" if padding is None else f" or padding {padding}")
        raise UserError(
            f"{described} {int(values.reshape(len(values), -1)[sample, position])} (sample "
            f"{sample}, {len(outside)} in all) outside {allowed} for {bound}"
        )


def _check_finite(values: torch.Tensor, described: str) -> None:
    """Fail naming the first sample holding NaN or inf. The float64 sum is finite exactly
    when every value is (no overflow below 1e308), so clean data costs one reduction."""
    if torch.isfinite(values.sum(dtype=torch.float64)):
        return
    bad = ~torch.isfinite(values.reshape(len(values), -1))
    if bad.any():
        first = int(bad.any(dim=1).nonzero()[0, 0])
        count = int(bad.sum())
        raise UserError(
            f"{described} with NaN or inf in {count} value{'s' * (count > 1)} (the first in "
            f"sample {first}); clean the data"
        )


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


def text(
    seq_len: int = 64,
    vocab: int = 256,
    test_fraction: float = 0.2,
    limit: int = 0,
    document_bytes: int = 0,
    seed: int = 0,
) -> Dataset:
    """Next-byte prediction on the English help text that ships with Python (the 79 help
    topics of ``pydoc_data.topics``, 465k characters), so every machine has it.

    Each topic is a document of UTF-8 bytes; documents are split whole, ``test_fraction``
    of them (shuffled by ``seed``) held out as the test set. A document of L tokens gives
    ceil((L - 1) / seq_len) sequences: inputs x_t = token t, targets y_t = token t + 1;
    the last sequence of a document (and a document shorter than a sequence) is padded
    with token id 0 in the inputs and -100 (IGNORE_INDEX) in the targets, so a
    token-averaged loss (``token_cross_entropy``) counts the real tokens only, and
    batches hold different numbers of them. ``vocab`` < 256 keeps the ``vocab - 1`` most
    frequent bytes of the whole corpus (ids by frequency, ties by byte value) and maps
    every rarer byte to id ``vocab - 1``, so that a test model can be tiny. ``limit`` > 0
    keeps the first ``limit`` sequences of each split; ``document_bytes`` > 0 the first
    ``document_bytes`` bytes of each document (many short documents: padding in every
    few sequences). Inputs and targets are (N, seq_len) int64; ``num_classes`` =
    ``vocab``."""
    from pydoc_data.topics import topics

    if not 2 <= vocab <= 256:
        raise UserError(f"data.kwargs.vocab: {vocab!r}; give 2 .. 256 token ids (bytes)")
    if seq_len < 1 or document_bytes < 0 or document_bytes == 1 or not 0 < test_fraction < 1:
        raise UserError(
            f"data.kwargs: seq_len {seq_len!r} must be >= 1, document_bytes {document_bytes!r} "
            f"0 (whole documents) or >= 2, test_fraction {test_fraction!r} in (0, 1)"
        )
    documents = [np.frombuffer(topics[key].encode(), np.uint8) for key in sorted(topics)]
    ids = byte_ids(np.concatenate(documents), vocab)
    if document_bytes:
        documents = [tokens[:document_bytes] for tokens in documents]
    order = np.random.default_rng(seed).permutation(len(documents))
    held_out = max(1, round(test_fraction * len(documents)))
    splits = [order[held_out:], order[:held_out]]
    (train_x, train_y), (test_x, test_y) = (
        _sequences([ids[documents[i]] for i in sorted(split)], seq_len, limit) for split in splits
    )
    return _tensors(train_x, train_y, test_x, test_y, vocab)


def byte_ids(corpus: np.ndarray, vocab: int) -> np.ndarray:
    """The id of each of the 256 byte values: all of them for ``vocab`` 256, else the
    ``vocab - 1`` most frequent bytes of ``corpus`` ranked by frequency (ties by value),
    and ``vocab - 1`` for every other byte."""
    if vocab == 256:
        return np.arange(256, dtype=np.int64)
    counts = np.bincount(corpus, minlength=256)
    ranked = np.lexsort((np.arange(256), -counts))  # by count descending, then by value
    ids = np.full(256, vocab - 1, dtype=np.int64)
    ids[ranked[: vocab - 1]] = np.arange(vocab - 1)
    return ids


def _sequences(documents: list[np.ndarray], seq_len: int, limit: int):
    """(inputs, targets) of shape (N, seq_len): each document cut into next-token pairs,
    its last sequence padded (see :func:`text`)."""
    inputs, targets = [], []
    for tokens in documents:
        for start in range(0, len(tokens) - 1, seq_len):
            x = np.zeros(seq_len, np.int64)
            y = np.full(seq_len, IGNORE_INDEX, np.int64)
            piece = tokens[start : start + seq_len + 1]
            x[: len(piece) - 1], y[: len(piece) - 1] = piece[:-1], piece[1:]
            inputs.append(x)
            targets.append(y)
    if limit:
        inputs, targets = inputs[:limit], targets[:limit]
    return np.stack(inputs), np.stack(targets)


def _tensors(
    train_x, train_y, test_x, test_y, num_classes, name: str = "", vocab: int | None = None
) -> Dataset:
    """Integers as int64 (inputs: token ids, targets: class labels), anything else as
    floats; a value that is not numbers fails naming the field. Floats stay float64 when
    given so (a float64 run then sees every digit of the user's data), and are float32
    otherwise; the experiment casts them to ``evaluation.dtype``."""

    def convert(values, field: str) -> torch.Tensor:
        try:
            array = np.asarray(values)
            if array.dtype.kind not in "iu":
                kept = np.float64 if array.dtype == np.float64 else np.float32
                return torch.as_tensor(array.astype(kept))
            return torch.as_tensor(array.astype(np.int64))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UserError(
                f"data.name: {name} returned {field} that is not numbers ({describe(exc)})"
            ) from None

    values = dict(zip(DATASET_FIELDS, (train_x, train_y, test_x, test_y)))
    return Dataset(*(convert(v, field) for field, v in values.items()), num_classes, vocab)


TORCH_DATA_FIELDS = ("train", "test", "num_classes")


def check_torch_data(data: TorchData) -> None:
    """Fail in one line unless both splits are non-empty map-style datasets whose first
    item is an (input, target) pair: an input of one shape in both splits, floating or
    token ids below ``vocab`` (default ``num_classes``), and a float target or class
    labels below ``num_classes``, one per sample or one per token (token labels may be
    IGNORE_INDEX, padding). Only the first items are read here; a later item that fails
    stops its pass, naming its samples."""
    given = f"data.name: {data.name} returned"
    for field in ("num_classes", "vocab"):
        value = getattr(data, field)
        if value is None and field == "vocab":
            continue
        if not _is_count(value):
            raise UserError(f"{given} {field} {value!r}; give an integer >= 1")
        setattr(data, field, int(value))
    vocab = data.num_classes if data.vocab is None else data.vocab
    shapes = {}
    for split in ("train", "test"):
        dataset = getattr(data, split)
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise UserError(
                f"{given} {split} as {type(dataset).__name__}; give a map-style "
                "torch.utils.data.Dataset (with __len__ and __getitem__)"
            )
        if len(dataset) == 0:
            raise UserError(f"{given} an empty {split} dataset")
        try:
            item = dataset[0]
            inputs, target = (torch.as_tensor(value) for value in item)
        except Exception as exc:  # the user's __getitem__, or an item that is no pair
            raise UserError(
                f"{given} a {split} dataset whose item 0 is not an (input, target) pair of "
                f"tensors or numbers ({describe(exc)})"
            ) from None
        first = f"{given} {split} item 0:"
        if not inputs.is_floating_point():
            _check_range(inputs[None], vocab, f"{first} token id", f"vocab {vocab}")
        if not target.is_floating_point():
            padding = IGNORE_INDEX if target.dim() == 1 else None  # token labels only
            bound = f"num_classes {data.num_classes}"
            _check_range(target[None], data.num_classes, f"{first} label", bound, padding)
        shapes[split] = tuple(inputs.shape)
    if shapes["train"] != shapes["test"]:
        raise UserError(
            f"{given} inputs of shape {shapes['train']} (train) and {shapes['test']} (test); "
            "give inputs of one shape"
        )


def _from_mapping(result, name: str) -> Dataset:
    if not isinstance(result, dict) or any(k not in result for k in DATASET_FIELDS):
        missing = [k for k in DATASET_FIELDS if k not in result] if isinstance(result, dict) else []
        returned = f"a dict without {', '.join(missing)}" if missing else type(result).__name__
        returned = "None" if result is None else returned
        raise UserError(
            f"data.name: {name} returned {returned}; return a landscape.data.Dataset or a "
            f"dict with {', '.join(DATASET_FIELDS)} (and vocab, for token ids)"
        )
    return _tensors(*(result[k] for k in DATASET_FIELDS), name=name, vocab=result.get("vocab"))


BUILT_IN = {
    "digits": digits,
    "gaussian_clusters": gaussian_clusters,
    "mnist1d": mnist1d,
    "cifar10": cifar10,
    "text": text,
}
