"""Contains Hugging Face causal language models as landscape models: logits out, attention
that can be differentiated twice, and the ``gpt2`` zoo entry built from a config.

The tool calls ``model(inputs)`` and takes one tensor back; a ``transformers`` model
takes ``input_ids`` and returns a ``ModelOutput``. :func:`logits_only` turns the model
itself (not a wrapper around it, so parameter and state_dict names stay those of the
Hugging Face checkpoint) into one whose forward returns the (B, T, V) logits, the way
``torch.nn.utils.parametrize`` does: by giving the instance a subclass of its class.

Nothing is downloaded: models are built from a config (``GPT2Config``), never
``from_pretrained``. ``transformers`` is imported only when such a model is built.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from landscape.errors import UserError

log = logging.getLogger(__name__)

# Attention implementations with a double backward: eager is plain tensor algebra, and
# sdpa runs on the math kernel of scaled_dot_product_attention inside every Hessian
# product (landscape.curvature.operators.product_context). Fused kernels (flash
# attention, flex attention, ...) have none.
TWICE_DIFFERENTIABLE_ATTENTION = ("eager", "sdpa")


def logits_only(model: nn.Module) -> nn.Module:
    """``model`` (a ``transformers`` causal LM) with a forward ``(input_ids (B, T)) ->
    logits (B, T, V)``, without the key/value cache, and with an attention that Hessian
    products can differentiate twice (:func:`select_attention`). Returns the same object."""
    select_attention(model)
    model.__class__ = _logits_class(type(model))
    return model


@functools.cache
def _logits_class(cls: type) -> type:
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cls.forward(self, input_ids=input_ids, use_cache=False).logits

    return type(cls.__name__, (cls,), {"forward": forward, "__doc__": logits_only.__doc__})


def select_attention(model: nn.Module) -> None:
    """Keep the model's attention implementation when Hessian products can differentiate
    it twice (:data:`TWICE_DIFFERENTIABLE_ATTENTION`), else switch to ``eager``; the log
    says which, once."""
    chosen = model.config._attn_implementation
    if chosen in TWICE_DIFFERENTIABLE_ATTENTION:
        kernel = " (Hessian products run its math kernel)" if chosen == "sdpa" else ""
        log.info("%s attention: %s%s", type(model).__name__, chosen, kernel)
        return
    model.set_attn_implementation("eager")
    log.info(
        "%s attention: %s has no double backward, which Hessian products need; eager "
        "attention selected instead",
        type(model).__name__,
        chosen,
    )


def gpt2(
    input_shape: tuple,
    num_classes: int,
    layers: int = 2,
    width: int = 64,
    heads: int = 4,
    positions: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """A GPT-2 (``transformers.GPT2LMHeadModel``) of ``layers`` blocks of ``width``
    channels and ``heads`` attention heads over a vocabulary of ``num_classes`` token ids,
    for (samples, tokens) inputs: ``positions`` (default: the data's sequence length)
    learned positions. Its input embedding and output layer are one tied parameter,
    ``transformer.wte.weight``. ``dropout`` (residual, embedding, attention) acts in
    training only; every map is taken in eval mode."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError(
            "model.name: gpt2 needs the transformers package; pip install 'landscape[lm]'"
        ) from None
    if len(input_shape) != 1:
        raise UserError(
            f"model.name: gpt2 reads token ids of shape (samples, tokens), not samples of "
            f"shape {tuple(input_shape)}; use a text data set (data.name: text)"
        )
    if width % heads:
        raise UserError(f"model.kwargs: width {width} is not a multiple of heads {heads}")
    config = GPT2Config(
        vocab_size=num_classes,
        n_positions=positions or input_shape[0],
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,  # GPT-2's 50256 is outside a small vocabulary; nothing generates
        eos_token_id=None,
    )
    return logits_only(GPT2LMHeadModel(config))
