"""User plug-ins of tests/test_lm.py, imported by name (``lm_plugins:tiny_vit``) as a
user's would be: a vision transformer written with torch's own attention, small image
data for it, and token data broken the ways a user's can be."""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Token data: a vocabulary of 5 ids, sequences of 4 tokens.
VOCAB, TOKENS = 5, 4


class SelfAttention(nn.Module):
    """Multi-head self-attention by ``F.scaled_dot_product_attention`` (whose fused
    kernels have no double backward: Hessian products run its math kernel)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


class TinyViT(nn.Module):
    """Patches of ``patch`` x ``patch`` pixels, embedded, plus learned positions, through
    ``layers`` pre-norm transformer blocks; the mean token's LayerNorm to class logits."""

    def __init__(self, input_shape, num_classes, patch=4, width=8, heads=2, layers=1):
        super().__init__()
        channels, height, width_pixels = input_shape
        self.patches = nn.Conv2d(channels, width, patch, stride=patch)
        count = (height // patch) * (width_pixels // patch)
        self.positions = nn.Parameter(0.02 * torch.randn(1, count, width))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "attention": SelfAttention(width, heads),
                    "norm2": nn.LayerNorm(width),
                    "mlp": nn.Sequential(
                        nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
                    ),
                }
            )
            self.blocks.append(block)
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2) + self.positions
        for block in self.blocks:
            x = x + block["attention"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x.mean(1)))


def tiny_vit(input_shape: tuple, num_classes: int, **kwargs) -> nn.Module:
    """``model.name: lm_plugins:tiny_vit`` (kwargs: patch, width, heads, layers)."""
    return TinyViT(input_shape, num_classes, **kwargs)


def small_images(samples: int = 24, classes: int = 3, seed: int = 0) -> dict:
    """1x8x8 images whose class shifts the mean of one quadrant: a few samples, so that
    the dense Hessian of a small ViT is cheap."""
    rng = np.random.default_rng(seed)
    labels = np.arange(samples + 9) % classes
    images = rng.normal(size=(len(labels), 1, 8, 8))
    for c in range(classes):
        images[labels == c, :, 4 * (c % 2) : 4 * (c % 2) + 4, 4 * (c // 2) : 4 * (c // 2) + 4] += 1
    return {
        "train_x": images[:samples],
        "train_y": labels[:samples],
        "test_x": images[samples:],
        "test_y": labels[samples:],
        "num_classes": classes,
    }


def tokens(samples: int = 6, **changes) -> dict:
    """Good next-token data (ids below VOCAB, the last token of each sample padded) with
    ``changes``: the base of the bad data below."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(samples + 3, TOKENS + 1))
    labels = ids[:, 1:].copy()
    labels[:, -1] = -100
    data = {
        "train_x": ids[:samples, :-1],
        "train_y": labels[:samples],
        "test_x": ids[samples:, :-1],
        "test_y": labels[samples:],
        "num_classes": VOCAB,
    }
    return {**data, **changes}


def token_id_too_large():
    data = tokens()
    data["train_x"][2, 1] = VOCAB
    return data


def negative_token_id():
    data = tokens()
    data["test_x"][1, 3] = -1
    return data


def token_ids_beside_float_inputs():
    data = tokens()
    return {**data, "test_x": data["test_x"].astype(np.float32)}


def token_label_too_large():
    data = tokens()
    data["train_y"][4, 0] = VOCAB
    return data


def larger_input_vocabulary():
    """A token classifier's data: ids up to 9 read, 2 classes predicted (``vocab`` 10)."""
    data = tokens(train_x=np.full((6, TOKENS), 9), num_classes=2)
    return {**data, "train_y": data["train_y"] % 2, "test_y": data["test_y"] % 2, "vocab": 10}


def token_id_beyond_given_vocabulary():
    return {**larger_input_vocabulary(), "vocab": 9}
