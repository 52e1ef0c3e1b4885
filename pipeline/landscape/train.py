"""Train a model to a real minimizer, leaving one checkpoint per epoch (the trajectory).

``epoch_000.pt`` is the initialization and ``epoch_NNN.pt`` the weights after epoch
NNN, each with its BatchNorm buffers and metadata (epoch, losses, accuracy, lr), so
PCA-trajectory directions and interpolation plots have every step they need.
Minibatches are drawn from a seeded generator on the data's own device; a last
minibatch of a single sample is dropped (see :func:`minibatches`).
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


def minibatches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch's sample ``order`` into minibatches of ``batch_size``, in order.

    The last one holds ``len(order) mod batch_size`` samples. When that is a single
    sample (and ``batch_size`` > 1) it is dropped (PyTorch's ``drop_last``, for that case
    only): BatchNorm in training mode cannot normalize one value per channel (one sample
    at 1x1 resolution, or after global pooling) and raises, and one sample's batch
    statistics are noise anyway. The order is reshuffled every epoch, so a different
    sample sits out each time.
    Every other split is unchanged, so training stays bit-identical for them.
    """
    batches = list(order.split(batch_size))
    if batch_size > 1 and len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def check_batch_size(settings: TrainConfig, model: torch.nn.Module, num_samples: int) -> None:
    """Refuse, before any checkpoint is written, the one split :func:`minibatches` cannot
    fix: minibatches of one sample through BatchNorm layers in training mode.

    Logs when each epoch drops a last minibatch of one sample.
    """
    has_batch_norm = any(
        isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules()
    )
    if has_batch_norm and (settings.batch_size == 1 or num_samples == 1):
        raise UserError(
            f"train.batch_size: minibatches of 1 sample ({num_samples} training samples, "
            f"batch_size {settings.batch_size}) cannot train the model's BatchNorm layers; "
            "use train.batch_size >= 2 and at least 2 training samples"
        )
    if num_samples > settings.batch_size and num_samples % settings.batch_size == 1:
        log.info(
            "train.batch_size %d leaves 1 of the %d training samples over: each epoch "
            "drops that last minibatch of 1 sample (a different sample each epoch)",
            settings.batch_size,
            num_samples,
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
    check_batch_size(settings, model, len(train_samples))
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
            for batch in minibatches(order, settings.batch_size):
                inputs, targets = train_samples.gather(batch)
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
