"""Contains the Hessian of the full-data mean loss as a linear operator.

The loss is the mean over all N training samples, L(theta) = (1/N) sum_i l_i(theta),
with the model in eval mode (BatchNorm uses its running statistics, so every l_i
depends on its own sample only); for a token-averaged objective N counts the unmasked
tokens of the whole set and l_i is one token's loss. Its Hessian-vector product is
accumulated over batches as sum_b H_b v with H_b the Hessian of (1/N) sum_{i in b} l_i:
each batch is weighted by its share of the samples, so H v does not depend on the batch
size (Li et al.'s code sums batch means instead, which scales H with the number of
batches).

Products (HVPs) are ``jvp`` of ``grad`` (forward over reverse) or double backward. The
mode is decided once, when the operator is built, by one product on a two-sample batch,
never inside a run: an interrupt or any other error during a product stops the job.
Several vectors can share one pass over the data (:meth:`HessianOperator.hvp_many`):
each batch's forward and backward pass is computed once and the tangents are batched
(``vmap`` over the tangents of jvp of grad, or double backward with
``is_grads_batched``); whether the model can be batched is likewise tried once, on two
samples, at the first such call.
Attention runs on the math kernel of ``scaled_dot_product_attention`` during products,
since the fused kernels have no double backward.

A generalized Gauss-Newton operator would sit beside :class:`HessianOperator`, with the
same constructor and ``hvp``: the solvers in :mod:`landscape.curvature.lanczos` only
need ``hvp``, ``hvps``, ``torch_dtype`` and the ``LinearOperator`` interface.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.curvature import HVP_MODES, PARAMETER_SELECTIONS
from landscape.errors import Interrupted, UserError, describe
from landscape.objectives import Objective

log = logging.getLogger(__name__)

# The bytes of the m tangents of a model's largest activation in one batched pass
# (HessianOperator.samples_per_pass).
PASS_BYTES = 16 * 2**20


def select_parameters(model: nn.Module, selection: str) -> list[str]:
    """The trainable parameters a Hessian is taken over: ``all``, or ``weights``, those
    with more than one dimension (Li et al.'s choice: no biases, no BatchNorm scales)."""
    if selection not in PARAMETER_SELECTIONS:
        raise ValueError(f"Parameter selection {selection!r}; choose from {PARAMETER_SELECTIONS}")
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (selection == "all" or p.dim() > 1)
    ]


@contextmanager
def product_context() -> Iterator[None]:
    """Around every HVP: the math kernel of scaled_dot_product_attention (the fused CPU
    and GPU kernels have no double backward), and an interrupt raised again as itself
    where TorchScript (torch's forward-mode decompositions) wrapped it in a RuntimeError
    (:func:`wrapped_interrupt`), so an interrupt always stops the job, with its status."""
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except RuntimeError as exc:
        interrupt = wrapped_interrupt(exc)
        if interrupt is not None:
            raise interrupt from None
        raise


WRAPPED_INTERRUPT = re.compile(r"\bKeyboardInterrupt\b|\bInterrupted: signal (\d+)")


def wrapped_interrupt(exc: RuntimeError) -> KeyboardInterrupt | None:
    """The interrupt inside ``exc``: the original where the exception chain keeps it, else
    one rebuilt from the message, which is all TorchScript keeps (``Interrupted: signal
    15``, see :class:`landscape.errors.Interrupted`): a SIGTERM stays a SIGTERM (exit 143)."""
    seen, inner = set(), exc.__cause__ or exc.__context__
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, KeyboardInterrupt):
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    found = WRAPPED_INTERRUPT.search(str(exc))
    if found is None:
        return None
    return Interrupted(int(found[1])) if found[1] else KeyboardInterrupt()


class HessianOperator(LinearOperator):
    """H of the mean loss over ``inputs`` w.r.t. the parameters ``names``, at the model's
    current parameter values (so moving the model moves the operator).

    The loss is ``objective``'s (see :mod:`landscape.objectives`): the sum of its
    per-sample (or per-token) losses over the whole set, divided by its count of them,
    so every batch carries its own share. ``names``: see :func:`select_parameters`.
    ``hvp``: ``forward_over_reverse`` (``jvp`` of ``grad``) or ``double_backward``
    (faster for conv nets on CPU, see ``make bench``); a model with an operation that
    has no forward-mode rule gets double backward (see :meth:`choose_mode`). ``hvps``
    counts products (:meth:`hvp_many` counts one per vector).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        objective: Objective,
        batch_size: int,
        hvp: str = "forward_over_reverse",
    ):
        selected = dict(model.named_parameters())
        unknown = [name for name in names if name not in selected]
        if unknown or not names:
            raise ValueError(f"Parameters to differentiate: {list(names)}; unknown: {unknown}")
        self.model, self.names = model, list(names)
        self.inputs, self.targets = inputs, targets
        self.objective, self.batch_size = objective, batch_size
        self.count = objective.count(targets)
        self.shapes = [selected[name].shape for name in self.names]
        self.sizes = [selected[name].numel() for name in self.names]
        reference = selected[self.names[0]]
        self.device, self.torch_dtype = reference.device, reference.dtype
        self.hvps = 0
        self.batched: bool | None = None  # whether hvp_many can vmap; tried at its first call
        self.activation_size: int | None = None  # bytes of the largest, per sample
        size = sum(self.sizes)
        super().__init__(dtype=np.float64, shape=(size, size))
        self.mode = self.choose_mode(hvp)

    def state(self) -> tuple[dict, dict]:
        """(selected parameters, everything else: other parameters and buffers), detached."""
        tensors = {name: t.detach() for name, t in self.model.named_parameters()}
        tensors.update(self.model.named_buffers())
        selected = {name: tensors.pop(name) for name in self.names}
        return selected, tensors

    def batch_loss(self, params: dict, fixed: dict, inputs, targets) -> torch.Tensor:
        """The batch's share of the mean loss: its summed losses over the whole set's count."""
        outputs = functional_call(self.model, {**fixed, **params}, (inputs,))
        return self.objective.losses(outputs, targets).sum() / self.count

    def choose_mode(self, requested: str) -> str:
        """The product mode of every HVP of this operator, tried once on two samples:
        ``requested``, else double backward (an operation without a forward-mode rule).
        A model that cannot be differentiated twice at all is refused in one line."""
        params, fixed = self.state()
        probe = (self.inputs[:2], self.targets[:2])
        with torch.no_grad():  # a model that fails to run at all fails here, as itself
            self.batch_loss(params, fixed, *probe)
        tangents = {name: torch.ones_like(p) for name, p in params.items()}
        candidates = dict.fromkeys([requested, "double_backward"])
        for mode in candidates:
            try:
                with product_context():
                    self.batch_hvp(mode, params, fixed, tangents, probe)
            except (RuntimeError, NotImplementedError) as exc:
                reason = describe(exc)
                log.warning("Hessian-vector products by %s fail: %s", HVP_MODES[mode], reason)
                continue
            log.info("Hessian-vector products: %s", HVP_MODES[mode])
            return mode
        raise UserError(
            f"hessian.hvp: the model cannot be differentiated twice, which Hessian-vector "
            f"products need ({reason}); replace that operation by one with a double "
            "backward (attention: F.scaled_dot_product_attention or nn.MultiheadAttention, "
            "whose math kernel products use), or leave the model out of Hessian maps"
        )

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H @ vector (any dtype and device), as a flat tensor on the model's device, in the
        model's dtype."""
        vector = vector.to(self.device, self.torch_dtype)
        params, fixed = self.state()
        tangents = dict(
            zip(self.names, (t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)))
        )
        total = torch.zeros(vector.numel(), dtype=self.torch_dtype, device=self.device)
        with product_context():
            for batch in self.batches(self.batch_size):
                product = self.batch_hvp(self.mode, params, fixed, tangents, batch)
                total += torch.cat([t.reshape(-1) for t in product])
        self.hvps += 1
        return total

    def hvp_many(self, vectors: torch.Tensor, samples_per_pass: int | None = None) -> torch.Tensor:
        """H @ each row of ``vectors`` ((m, P), any dtype and device), as an (m, P) tensor on
        the model's device in the model's dtype, in one pass over the data.

        Each batch's forward and backward pass is computed once and the m tangents are
        batched: ``vmap`` over the tangents of jvp of grad (forward over reverse), or a
        double backward with ``is_grads_batched``. A pass takes ``samples_per_pass``
        samples, by default :meth:`samples_per_pass` (so that the m tangents of its
        largest activation fill about PASS_BYTES). Same weighting as :meth:`hvp`, so the
        rows equal m separate products up to rounding (the summation order differs:
        float64 agrees to about 1e-15 relative, float32 to about 1e-6). Where ``vmap``
        cannot batch the model (an operation without a batching rule, found once on two
        samples and logged), it makes one :meth:`hvp` per row."""
        vectors = vectors.to(self.device, self.torch_dtype)
        count = len(vectors)
        if vectors.dim() != 2 or vectors.shape[1] != self.shape[0]:
            raise ValueError(
                f"hvp_many takes (m, {self.shape[0]}) vectors, not {tuple(vectors.shape)}"
            )
        if self.batched is None:
            self.batched = self.can_batch()
        if not self.batched or count == 1:
            return torch.stack([self.hvp(vector) for vector in vectors])
        params, fixed = self.state()
        tangents = self.tangents(vectors)
        total = torch.zeros_like(vectors)
        with product_context():
            for batch in self.batches(samples_per_pass or self.samples_per_pass(count)):
                product = self.batch_hvp_many(self.mode, params, fixed, tangents, batch)
                total += torch.cat([t.reshape(count, -1) for t in product], dim=1)
        self.hvps += count
        return total

    def samples_per_pass(self, count: int) -> int:
        """The samples a pass of :meth:`hvp_many` with ``count`` vectors takes by default:
        as many as keep ``count`` tangents of the model's largest activation (a leaf
        module's output, measured on one sample) within PASS_BYTES, at most the batch
        size. Batched products cost elementwise work in proportion to m, and on a CPU it
        runs from cache only while a pass's tangents fit: a BatchNorm CNN on digits
        takes 2.2x the time of 8 products in passes of 2048 samples and 0.7x in passes
        of 256 (16 MiB), where an MLP with 64 units needs passes of 2048 to gain (make
        bench). On any device it bounds a pass's memory."""
        if self.activation_size is None:
            sizes = [self.inputs[0].numel()]
            hooks = [
                module.register_forward_hook(lambda m, a, output: sizes.append(output.numel()))
                for module in self.model.modules()
                if not list(module.children())
            ]
            try:
                with torch.no_grad():
                    self.model(self.inputs[:1])
            finally:
                for hook in hooks:
                    hook.remove()
            self.activation_size = max(sizes) * self.inputs.element_size()
        return max(1, min(self.batch_size, PASS_BYTES // (count * self.activation_size)))

    def tangents(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of (m, P) ``vectors`` as parameter-shaped tangents, (m, *shape) each."""
        pieces = vectors.split(self.sizes, dim=1)
        return {
            name: piece.reshape(len(vectors), *shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes)
        }

    def can_batch(self) -> bool:
        """Whether :meth:`batch_hvp_many` runs on this model (tried on two samples, two
        tangents); logged either way."""
        params, fixed = self.state()
        probe = (self.inputs[:2], self.targets[:2])
        tangents = self.tangents(torch.ones(2, self.shape[0], dtype=self.torch_dtype))
        tangents = {name: t.to(self.device) for name, t in tangents.items()}
        try:
            with product_context():
                self.batch_hvp_many(self.mode, params, fixed, tangents, probe)
        except (RuntimeError, NotImplementedError) as exc:
            log.warning(
                "Batched Hessian-vector products fail (%s): one product per vector instead",
                describe(exc),
            )
            return False
        log.info(
            "Hessian-vector products of several vectors share one pass (%s)", HVP_MODES[self.mode]
        )
        return True

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of the whole set in consecutive batches of ``size`` samples."""
        for start in range(0, len(self.inputs), size):
            yield self.inputs[start : start + size], self.targets[start : start + size]

    def batch_hvp(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        if mode == "forward_over_reverse":
            gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
            _, product = jvp(gradient, (params,), (tangents,))
            return [product[name] for name in self.names]
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(leaves, fixed, *batch)
            gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            dot = sum((g * tangents[name]).sum() for g, name in zip(gradients, self.names))
            return list(torch.autograd.grad(dot, list(leaves.values())))

    def batch_hvp_many(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        """The batch's share of H t for m stacked tangents t ((m, *shape) each): the batch's
        forward and backward once, the tangents batched."""
        if mode == "forward_over_reverse":
            gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
            product = vmap(lambda t: jvp(gradient, (params,), (t,))[1])(tangents)
            return [product[name] for name in self.names]
        leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            loss = self.batch_loss(leaves, fixed, *batch)
            gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            return list(
                torch.autograd.grad(
                    gradients,
                    list(leaves.values()),
                    grad_outputs=[tangents[name] for name in self.names],
                    is_grads_batched=True,
                )
            )

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.as_tensor(np.ascontiguousarray(x).reshape(-1))
        return self.hvp(vector).double().cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric


class GaugeProjection:
    """The orthogonal projection off the softmax gauge directions of a classifier.

    Softmax ignores one number added to all logits of a sample, so when the model's
    output is the output z = W h + b of its last Linear layer, the cross-entropy does
    not change along W + 1 c^T (one direction per input of the layer) nor along b + c 1:
    L(theta + t g) = L(theta) for every theta, hence H g = 0 everywhere. Projecting
    them out (subtracting the mean over the rows of W's block, and the mean of b's)
    leaves the Hessian on the moves the model's function can feel; Lanczos on it finds
    the same nonzero eigenpairs, and at a positive-semidefinite point a lambda_min
    eigenvector that is not a flat symmetry of the parametrization.
    """

    def __init__(self, layer: str, blocks: list[tuple[int, int, int]]):
        self.layer = layer
        self.blocks = blocks  # (offset, rows, columns) in the flat vector; a bias has 1 column
        self.count = sum(columns for _, _, columns in blocks)

    @classmethod
    def find(cls, operator: HessianOperator) -> GaugeProjection | None:
        """The projection for ``operator``'s selected parameters, or None where the loss
        does not see the logits through their softmax only (``objective.softmax_gauge``)
        or the model's output is not its last Linear layer's output (checked on one
        sample: the very tensor the layer returned)."""
        model = operator.model
        linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not operator.objective.softmax_gauge or not linear:
            return None
        name, layer = linear[-1]
        seen = []
        hook = layer.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            with torch.no_grad():
                output = model(operator.inputs[:1])
        finally:
            hook.remove()
        if not seen or seen[-1] is not output:
            return None
        offsets = dict(zip(operator.names, np.cumsum([0, *operator.sizes[:-1]])))
        prefix = f"{name}." if name else ""
        blocks = [
            (int(offsets[prefix + key]), rows, columns)
            for key, rows, columns in (
                ("weight", layer.out_features, layer.in_features),
                ("bias", layer.out_features, 1),
            )
            if prefix + key in offsets
        ]
        return cls(name, blocks) if blocks else None

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        projected = vector.clone()
        for offset, rows, columns in self.blocks:
            block = projected[offset : offset + rows * columns].view(rows, columns)
            block -= block.mean(dim=0, keepdim=True)
        return projected
