"""The model zoo: Li et al.'s CIFAR networks, small nets, a GPT-2 (``transformers``, built
from a config), and user factories by import path.

Every entry is a factory ``(input_shape, num_classes, **kwargs) -> nn.Module``, so one
class serves 8x8 digits and 32x32 CIFAR-10 alike. A name containing ``:`` is imported
as ``package.module:factory`` with the same signature.
"""

from __future__ import annotations

import functools

from torch import nn

from landscape.errors import UserError
from landscape.models.causal_lm import gpt2
from landscape.models.resnet import resnet_factory
from landscape.models.small import MLP, Linear, SmallCNN
from landscape.models.vgg import VGG
from landscape.plugins import call_factory, import_object

ZOO = {
    "linear": Linear,
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "vgg9": VGG,
    **{f"resnet{d}": resnet_factory(d) for d in (20, 56, 110)},
    **{f"resnet{d}_noshort": resnet_factory(d, shortcut=False) for d in (20, 56, 110)},
    **{f"wrn56_{k}": resnet_factory(56, width=k) for k in (2, 4, 8)},
    "gpt2": gpt2,
}


def build_model(name: str, input_shape: tuple, num_classes: int, kwargs: dict) -> nn.Module:
    """Instantiate a zoo model or a user factory for the given input shape and classes.

    Fails in one line if the factory cannot be called so, raises, or returns something
    other than a module with parameters (what its outputs look like is checked on data,
    by :func:`landscape.experiment.check_forward`)."""
    arguments = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    model = call_factory(resolve_factory(name), name, "model.name", arguments, kwargs)
    if not isinstance(model, nn.Module):
        returned = "None" if model is None else type(model).__name__
        raise UserError(
            f"model.name: {name} returned {returned}, not a torch.nn.Module; return the network"
        )
    if not any(True for _ in model.parameters()):
        raise UserError(
            f"model.name: {name} returned a {type(model).__name__} without parameters; "
            "there is no landscape to draw"
        )
    return model


@functools.cache
def resolve_factory(name: str):
    if ":" in name:
        return import_object(name, "model.name")
    if name not in ZOO:
        raise UserError(
            f"model.name: unknown model {name!r}; choose from {', '.join(ZOO)} "
            "or give package.module:factory"
        )
    return ZOO[name]
