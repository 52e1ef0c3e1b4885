"""Train a model to a real minimizer, leaving one checkpoint per epoch (the trajectory).

``epoch_000.pt`` is the initialization and ``epoch_NNN.pt`` the weights after epoch
NNN, each with its BatchNorm buffers and metadata (epoch, losses, accuracy, lr), so
PCA-trajectory directions and interpolation plots have every step they need.
Minibatches are drawn from a seeded generator on the data's own device.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from landscape.atomic import check_writable
from landscape.checkpoint import save_checkpoint
from landscape.config import ExperimentConfig, TrainConfig
from landscape.errors import UserError, reporting_interrupt
from landscape.evaluate import evaluate
from landscape.experiment import Experiment

log = logging.getLogger(__name__)


def checkpoint_path(config: TrainConfig, epoch: int) -> Path:
    return Path(config.checkpoint_dir) / f"epoch_{epoch:03d}.pt"


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate during ``epoch`` (0-based) under the configured schedule."""
    if config.schedule == "cosine":
        return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(epoch >= e for e in config.step_epochs)
    return config.lr


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        parameters,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def train(config: ExperimentConfig) -> Path:
    """Train per ``config.train``; returns the last checkpoint written.

    Stops with an error, before saving it, at the first epoch whose training loss is not
    finite (a learning rate too large): such a checkpoint only yields maps of NaN.
    """
    if config.train is None:
        raise UserError("train: section missing; add train.checkpoint_dir, epochs, lr, ...")
    settings = config.train
    check_writable(settings.checkpoint_dir, "train.checkpoint_dir", folder=True)
    torch.manual_seed(settings.seed)
    experiment = Experiment.load(config, with_checkpoint=False, device=settings.device)
    model, objective = experiment.model, experiment.objective
    train_samples, test_samples = experiment.data.split("train"), experiment.data.split("test")
    optimizer = make_optimizer(settings, model.parameters())
    generator = torch.Generator(device=experiment.device).manual_seed(settings.seed)
    saved = []  # epochs whose checkpoint is written
    with reporting_interrupt(
        lambda: (
            f"checkpoints up to epoch {saved[-1]} saved in {settings.checkpoint_dir} "
            "(training starts over from epoch 0)"
            if saved
            else "no checkpoint saved"
        )
    ):
        save_checkpoint(checkpoint_path(settings, 0), model, epoch=0)
        saved.append(0)
        for epoch in range(settings.epochs):
            lr = learning_rate(settings, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            order = torch.randperm(
                len(train_samples), generator=generator, device=experiment.device
            )
            for start in range(0, len(order), settings.batch_size):
                inputs, targets = train_samples.gather(order[start : start + settings.batch_size])
                loss = objective.mean(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            batch_size = config.evaluation.batch_size
            train_loss, train_acc = evaluate(model, train_samples, batch_size, objective)
            if not math.isfinite(train_loss):
                raise UserError(
                    f"train.lr: the training loss is {train_loss} after epoch {epoch + 1} at "
                    f"learning rate {lr:g} (diverged); lower train.lr"
                )
            test_loss, test_acc = evaluate(model, test_samples, batch_size, objective)
            path = checkpoint_path(settings, epoch + 1)
            save_checkpoint(
                path,
                model,
                epoch=epoch + 1,
                train_loss=train_loss,
                train_acc=train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
                lr=lr,
            )
            saved.append(epoch + 1)
            log.info(
                "epoch %d/%d  lr %.4g  train loss %.4f acc %.4f  test loss %.4f acc %.4f",
                epoch + 1,
                settings.epochs,
                lr,
                train_loss,
                train_acc,
                test_loss,
                test_acc,
            )
    return path
