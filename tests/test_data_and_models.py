"""Built-in data sets (no download), user plug-ins, and the model zoo on 8x8 and 32x32 inputs."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct

import numpy as np
import plugins
import pytest
import torch

from landscape.data import load_dataset
from landscape.errors import UserError
from landscape.models import ZOO, build_model


def test_digits_has_a_fixed_stratified_split():
    first, again = load_dataset("digits", {}), load_dataset("digits", {})
    assert first.input_shape == (1, 8, 8) and first.num_classes == 10
    assert len(first.train_x) + len(first.test_x) == 1797
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert torch.bincount(first.test_y).min() >= 35  # every digit in the test set
    assert abs(first.train_x.mean().item()) < 1e-5 and abs(first.train_x.std().item() - 1) < 1e-3


def test_gaussian_clusters_are_seeded_and_separated_as_asked():
    data = load_dataset("gaussian_clusters", {"num_classes": 4, "dim": 16, "separation": 5.0})
    assert data.input_shape == (16,) and data.num_classes == 4
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(4)])
    torch.testing.assert_close(means.norm(dim=1), torch.full((4,), 5.0), atol=0.4, rtol=0)


def test_mnist1d_is_generated_locally_and_leaves_numpy_seeding_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data = load_dataset("mnist1d", {"num_samples": 200})
    assert np.random.rand() == expected
    assert data.input_shape == (1, 40) and len(data.train_x) == 160 and len(data.test_x) == 40


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Python2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str`` (BINSTRING), as the original
    CIFAR-10 download was written: Python 3 would pickle them via ``_codecs.encode``."""

    def save_bytes(self, data: bytes) -> None:
        size = len(data)
        self.write(
            pickle.SHORT_BINSTRING + bytes([size])
            if size < 256
            else pickle.BINSTRING + struct.pack("<i", size)
        )
        self.write(data)
        self.memoize(data)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def download_format(batch: dict) -> bytes:
    """``batch`` pickled as the download's files are: Python 2 strings, protocol 2, and
    the array rebuilt by numpy 1's ``numpy.core.multiarray._reconstruct``."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_folder(folder, download: bool = True):
    """A tiny folder of the download's format (or, with ``download`` false, re-pickled by
    this Python and numpy): per file a dict of bytes keys holding a uint8 array (4, 3072)
    and lists of ints and bytes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, 4).tolist(),
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"filenames": [f"image_{i}.png".encode() for i in range(4)],
        }
        (folder / name).write_bytes(download_format(batch) if download else pickle.dumps(batch))
    return folder


@pytest.mark.parametrize("download", [True, False])
def test_cifar10_reads_the_standard_pickled_folder(tmp_path, download):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", download)
    assert (b"numpy.core.multiarray" in (folder / "test_batch").read_bytes()) == download
    data = load_dataset("cifar10", {"root": str(folder)})
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")
    red = first[b"data"][0, :1024].reshape(32, 32) / 255.0
    torch.testing.assert_close(
        data.train_x[0, 0].double(), torch.from_numpy((red - 0.4914) / 0.2470), atol=1e-5, rtol=0
    )
    assert data.train_y[:4].tolist() == first[b"labels"]
    with pytest.raises(UserError, match="data.kwargs.root"):
        load_dataset("cifar10", {"root": str(tmp_path)})


class Payload:
    """What a crafted batch hides: unpickling it calls ``function(argument)``."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", [os.system, eval])
def test_cifar10_batch_that_would_run_code_is_refused_unrun(tmp_path, function):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "payload_ran"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    batch = pickle.loads((folder / "data_batch_3").read_bytes(), encoding="bytes")
    batch[b"labels"] = Payload(function, command)
    (folder / "data_batch_3").write_bytes(download_format(batch))
    with pytest.raises(UserError) as refused:
        load_dataset("cifar10", {"root": str(folder)})
    message = str(refused.value)
    assert "\n" not in message and message.startswith("data.kwargs.root: ")
    assert f"{folder / 'data_batch_3'} is not a CIFAR-10 batch" in message
    assert re.search(rf"refers to \w+\.{function.__name__},", message), message
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda data: data[: len(data) // 2], "corrupt or truncated"),
        (lambda data: pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}), "uint8 images"),
    ],
)
def test_cifar10_batch_damaged_is_named(tmp_path, damage, fragment):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    path = folder / "test_batch"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=f"data.kwargs.root: .*{re.escape(str(path))}.*{fragment}"):
        load_dataset("cifar10", {"root": str(folder)})


def test_user_data_plugs_in_by_import_path():
    data = load_dataset("plugins:regression", {"samples": 12})
    assert data.train_x.shape == (12, 3) and data.train_y.dtype == torch.float64
    # float64 data keeps every digit for a float64 run (float32 rounding was 1e-8 off)
    given = plugins.regression(samples=12)
    np.testing.assert_array_equal(data.train_x.numpy(), given["train_x"])
    np.testing.assert_array_equal(data.train_y.numpy(), given["train_y"])
    single = load_dataset("plugins:regression", {"samples": 12, "dtype": "float32"})
    assert single.train_x.dtype == single.train_y.dtype == torch.float32
    with pytest.raises(UserError, match="data.name: cannot import"):
        load_dataset("no_such_module:data", {})


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet20_noshort", "vgg9", "wrn56_2", "small_cnn", "mlp"]
)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_zoo_models_run_on_digits_and_cifar_shapes(name, shape):
    model = build_model(name, shape, 10, {}).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model) -> int:
    return sum(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3) for x in model.modules())


def test_resnet_depths_and_shortcuts_match_the_papers():
    for depth in (20, 56, 110):
        plain, short = (
            ZOO[f"resnet{depth}_noshort"]((3, 32, 32), 10),
            ZOO[f"resnet{depth}"]((3, 32, 32), 10),
        )
        assert convs(plain) == depth - 1  # 3x3 convs + 1 linear = depth layers
        assert count(short) - count(plain) == 16 * 32 + 32 * 64 + 2 * (32 + 64)  # 2 projections
    # He et al.'s ResNet-20 has 0.27M parameters.
    assert 0.26e6 < count(ZOO["resnet20"]((3, 32, 32), 10)) < 0.28e6
