"""Training leaves one reproducible checkpoint per epoch and reaches a real minimizer."""

from __future__ import annotations

import torch

from landscape.config import parse_config
from landscape.train import learning_rate, train

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
