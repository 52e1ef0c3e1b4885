"""Training leaves one reproducible checkpoint per epoch and reaches a real minimizer."""

from __future__ import annotations

import logging

import pytest
import torch

from landscape.cli import main
from landscape.config import parse_config
from landscape.experiment import Experiment
from landscape.train import learning_rate, minibatches, train

CONFIG = """
model: {name: mlp, kwargs: {hidden: [32]}}
data: {name: gaussian_clusters, kwargs: {num_classes: 3, dim: 8, separation: 4.0}}
evaluation: {dtype: float32, device: cpu}
train: {checkpoint_dir: %s, epochs: 4, lr: 0.05, batch_size: 32, seed: 1, schedule: step,
        step_epochs: [2], gamma: 0.5}
"""


def test_training_saves_every_epoch_and_is_reproducible(tmp_path):
    runs = []
    for name in ("a", "b"):
        config = parse_config(CONFIG % (tmp_path / name))
        last = train(config)
        assert last.name == "epoch_004.pt"
        runs.append(
            [torch.load(tmp_path / name / f"epoch_{e:03d}.pt", weights_only=True) for e in range(5)]
        )
    first, second = runs
    for a, b in zip(first, second):
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert first[4]["epoch"] == 4 and first[4]["train_acc"] > 0.95
    assert first[4]["train_loss"] < first[1]["train_loss"]
    assert not torch.equal(
        first[0]["state_dict"]["net.1.weight"], first[4]["state_dict"]["net.1.weight"]
    )


def test_learning_rate_schedules():
    config = parse_config(CONFIG % "/tmp/x").train
    assert [learning_rate(config, e) for e in range(4)] == [0.05, 0.05, 0.025, 0.025]
    cosine = parse_config((CONFIG % "/tmp/x").replace("schedule: step", "schedule: cosine")).train
    assert learning_rate(cosine, 0) == 0.05 and abs(learning_rate(cosine, 2) - 0.025) < 1e-15


# A VGG whose last stages run at 1x1 resolution on 8x8 digits: its BatchNorm layers raise
# on a minibatch of one sample. 89 training images in minibatches of 44 leave 1 over.
ONE_LEFT_OVER = """
model: {name: vgg9, kwargs: {stages: [[4], [4], [4], [4]], hidden: 8}}
data: {name: digits, kwargs: {test_fraction: 0.95}}
evaluation: {dtype: %s, device: cpu}
train: {checkpoint_dir: %s, epochs: 1, lr: 0.05, momentum: 0.0, weight_decay: 0.0,
        batch_size: %d, seed: 3, schedule: constant}
"""


def test_minibatches_drop_only_a_last_batch_of_one_sample():
    order = torch.randperm(90)
    sizes = {
        (89, 44): [44, 44],
        (90, 44): [44, 44, 2],
        (88, 44): [44, 44],
        (89, 1): [1] * 89,
        (1, 44): [1],
        (89, 128): [89],
    }
    for (count, batch_size), expected in sizes.items():
        batches = minibatches(order[:count], batch_size)
        assert [len(batch) for batch in batches] == expected
        assert torch.equal(torch.cat(batches), order[: sum(expected)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_last_minibatch_of_one_sample_is_dropped(tmp_path, caplog, dtype):
    """Training a BatchNorm model whose last minibatch would hold one sample equals plain
    SGD steps on the full minibatches of the same seeded order, written by hand."""
    config = parse_config(ONE_LEFT_OVER % (dtype, tmp_path / "run", 44))
    with caplog.at_level(logging.INFO, logger="landscape.train"):
        trained = torch.load(train(config), weights_only=True)["state_dict"]
    assert "drops that last minibatch of 1 sample" in caplog.text

    torch.manual_seed(3)
    experiment = Experiment.load(config, with_checkpoint=False, device="cpu")
    model, samples = experiment.model.train(), experiment.data.split("train")
    order = torch.randperm(89, generator=torch.Generator().manual_seed(3))
    for start in (0, 44):
        inputs, targets = samples.gather(order[start : start + 44])
        model.zero_grad()
        experiment.objective.mean(model(inputs), targets).backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.05 * parameter.grad
    expected = model.state_dict()
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(trained[name], tensor, msg=name)


def test_minibatches_of_one_sample_through_batch_norm_are_refused(tmp_path, capsys):
    config = tmp_path / "one.yaml"
    config.write_text(ONE_LEFT_OVER % ("float32", tmp_path / "run", 1))
    assert main(["train", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("error: train.batch_size:"), message
    assert not (tmp_path / "run" / "epoch_000.pt").exists()
