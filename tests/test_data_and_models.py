"""Built-in data sets (no download), user plug-ins, and the model zoo on 8x8 and 32x32 inputs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipeline.data import load_dataset
from pipeline.errors import UserError
from pipeline.models import ZOO, build_model


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


def test_cifar10_reads_the_standard_pickled_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 4)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_dataset("cifar10", {"root": str(folder)})
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    red = first[b"data"][0, :1024].reshape(32, 32) / 255.0
    torch.testing.assert_close(
        data.train_x[0, 0].double(), torch.from_numpy((red - 0.4914) / 0.2470), atol=1e-5, rtol=0
    )
    with pytest.raises(UserError, match="data.kwargs.root"):
        load_dataset("cifar10", {"root": str(tmp_path)})


def test_user_data_plugs_in_by_import_path():
    data = load_dataset("plugins:regression", {"samples": 12})
    assert data.train_x.shape == (12, 3) and data.train_y.dtype == torch.float32
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
