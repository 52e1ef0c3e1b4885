"""Contains the Hessian of the full-data mean loss, and its generalized Gauss-Newton
part, as linear operators, and the loss's full-data gradient.

The loss is the mean over all N training samples, L(theta) = (1/N) sum_i l_i(theta),
with the model in eval mode (BatchNorm uses its running statistics, so every l_i
depends on its own sample only); for a token-averaged objective N counts the unmasked
tokens of the whole set and l_i is one token's loss (:class:`MeanLoss`). A curvature
product is accumulated over batches as sum_b M_b v with M_b the curvature of
(1/N) sum_{i in b} l_i: each batch is weighted by its share of the samples, so M v does
not depend on the batch size (Li et al.'s code sums batch means instead, which scales H
with the number of batches). The gradient (:func:`full_gradient`) is summed the same way.

Hessian products (HVPs) are ``jvp`` of ``grad`` (forward over reverse) or double
backward; Gauss-Newton products J^T H_out J v are ``jvp``, ``jvp`` of the outputs'
gradient and ``vjp``, or all reverse mode (:class:`GaussNewtonOperator`). The mode is
decided once, when the operator is built, by one product on a two-sample batch, never
inside a run: an interrupt or any other error during a product stops the job.
Several vectors can share one pass over the data (:meth:`HessianOperator.hvp_many`):
each batch's forward and backward pass is computed once and the tangents are batched
(``vmap`` over the tangents of jvp of grad, or double backward with
``is_grads_batched``); whether the model can be batched is likewise tried once, on two
samples, at the first such call. Attention runs on the math kernel of
``scaled_dot_product_attention`` during products, since the fused kernels have no
double backward, and a BatchNorm in eval mode as the affine map it is
(:class:`FrozenBatchNormAsAffine`), whose second derivatives are cheap. Where such a
norm follows a convolution it is folded into that convolution's filters
(:func:`fold_frozen_batch_norms`), in products and gradients alike: the same function
of the same parameters, without the norm's activation-sized work.

The solvers in :mod:`landscape.curvature.lanczos` only need ``hvp``, ``hvps``,
``torch_dtype`` and the ``LinearOperator`` interface, which every operator here has.
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import fx, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from landscape.curvature import AUTOMATIC_HVP_MODE, HVP_MODES, PARAMETER_SELECTIONS
from landscape.errors import Interrupted, UserError, describe
from landscape.memory import free_memory
from landscape.objectives import Objective
from landscape.precision import ieee_float32
from landscape.ranks import launched_local_size
from landscape.samples import Samples

log = logging.getLogger(__name__)

# The bytes of the m tangents of a model's largest activation in one batched pass
# (HessianOperator.samples_per_pass).
PASS_BYTES = 16 * 2**20
# Kept gradient graphs take at most this share of the memory free on their device for
# each process that shares it (as data held on a device does, landscape.samples).
KEPT_GRAPHS_SHARE = 1 / 4
CONVOLUTION_MODULES = {nn.Conv1d, nn.Conv2d, nn.Conv3d}
# Each model's checked folding (MeanLoss.checked_folding), with the module tree it was
# traced from: full_gradient builds a MeanLoss per call, and tracing the demo ResNet-20
# takes 13 ms of its 0.27 s gradient.
FOLDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def frozen_batch_norm_affine(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of a batch norm with frozen statistics, the affine map
    y = x * scale + shift it is: scale = w / sqrt(var + eps), shift = b - mean * scale
    (PyTorch's CPU kernel's formula, so values agree to rounding). Differentiable in
    w and b, which is how a Hessian w.r.t. them comes out exact."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


class FrozenBatchNormAsAffine(TorchFunctionMode):
    """Evaluates every batch norm that uses its running statistics (``F.batch_norm`` with
    ``training=False``, a BatchNorm module in eval mode) as the per-channel affine map it
    is (:func:`frozen_batch_norm_affine`).

    The kernel's backward is written for batch statistics too, and its double backward
    (``NativeBatchNormBackwardBackward``) works through that general formula.
    Differentiating the affine map instead costs a product and a sum per derivative: a
    double-backward HVP of the demo ResNet-20 takes 0.95x the CPU time (one thread, batch
    128 and 2048; benchmarks/hessian_bench.py gives the ratios). A batch norm right after
    a convolution is cheaper still folded into it (:func:`fold_frozen_batch_norms`)."""

    SIGNATURE = inspect.signature(F.batch_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        bound = self.SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        norm = bound.arguments
        if norm["training"] or norm["running_mean"] is None or norm["running_var"] is None:
            return func(*args, **kwargs)
        inputs = norm["input"]
        scale, shift = frozen_batch_norm_affine(
            norm["weight"], norm["bias"], norm["running_mean"], norm["running_var"], norm["eps"]
        )
        channels = (1, -1) + (1,) * (inputs.dim() - 2)
        return inputs * scale.view(channels) + shift.view(channels)


CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by the number of spatial dimensions


def convolution_with_frozen_batch_norm(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    dimensions: int,
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """bn(conv(x, W, c)) for a batch norm with frozen statistics, as one convolution:
    with (scale, shift) its affine map (:func:`frozen_batch_norm_affine`),

        bn(conv(x, W, c)) = conv(x, W * scale) + (c * scale + shift),

    scale multiplying each output channel's filter. The same function of x, W, c and
    the norm's w, b, computed on parameter-sized tensors inside the autograd graph, so
    its derivatives of any order w.r.t. the original parameters are exact, while the
    activation-sized products of the norm drop out of the forward pass, the backward
    pass and the backward of the backward. The shift is added after the convolution,
    not as its bias: oneDNN sums a bias's gradient in an order that loses 10x the
    float32 accuracy of ATen's sum (the cnn_bn Gauss-Newton matrix of tests/test_ggn.py
    was 8e-7 of its norm off the float64 one, against 5e-8 unfolded and added after)."""
    scale, shift = frozen_batch_norm_affine(norm_weight, norm_bias, running_mean, running_var, eps)
    if bias is not None:
        shift = shift + bias * scale
    filters = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    outputs = CONVOLUTIONS[dimensions](inputs, filters, None, stride, padding, dilation, groups)
    return outputs + shift.view((1, -1) + (1,) * dimensions)


def fold_frozen_batch_norms(model: nn.Module) -> tuple[fx.GraphModule, list[nn.Module]] | None:
    """The model with every eval-mode batch norm that follows a convolution, and is that
    convolution's only consumer, folded into it (:func:`convolution_with_frozen_batch_norm`),
    and the folded norms; None where there is nothing to fold or ``torch.fx`` cannot
    trace the model (logged). The traced module holds the model's own tensors under
    their own names, so ``functional_call`` takes the model's state unchanged; it
    computes the eval-mode function only (the caller checks the norms' mode), since
    a norm in training mode normalizes by its batch."""
    kinds = {type(m) for m in model.modules()}
    if not any(issubclass(k, _BatchNorm) for k in kinds) or not kinds & CONVOLUTION_MODULES:
        return None
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # any Python a model runs can stop the tracer
        log.info(
            "Batch norms not folded into convolutions: torch.fx cannot trace the model (%s)",
            describe(exc),
        )
        return None
    modules = dict(traced.named_modules())
    graph, folded = traced.graph, []
    for node in list(graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        source = node.args[0] if node.args else None
        conv = (
            modules.get(source.target)
            if isinstance(source, fx.Node) and source.op == "call_module"
            else None
        )
        foldable = (
            isinstance(norm, _BatchNorm)
            and norm.track_running_stats
            and not norm.training
            and type(conv) in CONVOLUTION_MODULES
            and conv.padding_mode == "zeros"
            and "weight" in conv._parameters  # not computed by a hook or parametrization
            and not any(hooked(module) for module in (conv, norm))
            and len(node.args) == 1
            and not node.kwargs
            and len(source.users) == 1
            and len(source.args) == 1
            and not source.kwargs
        )
        if not foldable:
            continue
        with graph.inserting_before(node):
            tensors = [
                graph.get_attr(f"{owner}.{field}") if getattr(module, field) is not None else None
                for owner, module, field in (
                    (source.target, conv, "weight"),
                    (source.target, conv, "bias"),
                    (node.target, norm, "weight"),
                    (node.target, norm, "bias"),
                    (node.target, norm, "running_mean"),
                    (node.target, norm, "running_var"),
                )
            ]
            fused = graph.call_function(
                convolution_with_frozen_batch_norm,
                (
                    source.args[0],
                    *tensors,
                    norm.eps,
                    conv.weight.dim() - 2,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    conv.groups,
                ),
            )
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        graph.erase_node(source)
        folded.append(norm)
    if not folded:
        return None
    graph.lint()
    return fx.GraphModule(model, graph), folded


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` runs hooks around its forward (weight_norm, spectral_norm,
    a user's): the folded graph would skip them."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


@contextmanager
def product_context() -> Iterator[None]:
    """Around every HVP: frozen batch norms as affine maps (:class:`FrozenBatchNormAsAffine`,
    whose derivatives are cheaper), the math kernel of scaled_dot_product_attention (the
    fused CPU and GPU kernels have no double backward), and an interrupt raised again as
    itself where TorchScript (torch's forward-mode decompositions) wrapped it in a
    RuntimeError (:func:`wrapped_interrupt`), so an interrupt always stops the job, with
    its status."""
    try:
        with sdpa_kernel(SDPBackend.MATH), FrozenBatchNormAsAffine():
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


class MeanLoss:
    """The full-data mean loss L(theta) = (1/N) sum_i l_i(theta) of ``objective`` over
    ``samples``, as a function of the parameters ``names`` (the rest of the model, its
    other parameters and buffers, held fixed) at the model's current values.

    The sum runs batch by batch: each batch contributes (1/N) sum_{i in b} l_i, its
    share, with N the objective's count of units over the whole set, so nothing computed
    from it depends on ``batch_size``. ``names``: see :func:`select_parameters`.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        samples: Samples,
        objective: Objective,
        batch_size: int,
    ):
        selected = dict(model.named_parameters())
        unknown = [name for name in names if name not in selected]
        if unknown or not names:
            raise ValueError(f"Parameters to differentiate: {list(names)}; unknown: {unknown}")
        self.model, self.names = model, list(names)
        self.samples = samples
        self.objective, self.batch_size = objective, batch_size
        self.count = samples.units(objective)
        self.shapes = [selected[name].shape for name in self.names]
        self.sizes = [selected[name].numel() for name in self.names]
        reference = selected[self.names[0]]
        self.device, self.torch_dtype = reference.device, reference.dtype
        self.folding = self.checked_folding()

    def checked_folding(self) -> tuple[fx.GraphModule, list[nn.Module]] | None:
        """:func:`fold_frozen_batch_norms` of the model, kept where the folded module
        holds every parameter differentiated (none is computed from others outside the
        graph) and gives the model's outputs on two samples, to rounding (relative 1e-4
        of the largest in IEEE float32, whose rounding is ~1e-6): a guard against a
        trace that froze a branch of the model's Python differently from how it runs.
        Traced once per model, module tree and train/eval modes (:data:`FOLDINGS`)."""
        if self.model.training:
            return None
        tree = tuple(
            (name, id(module), module.training) for name, module in self.model.named_modules()
        )
        known = FOLDINGS.get(self.model)
        if known is not None and known[0] == tree:
            return known[1]
        folding = fold_frozen_batch_norms(self.model)
        if (
            folding is not None
            and not set(self.names) <= dict(folding[0].named_parameters()).keys()
        ):
            log.info("Batch norms not folded: a hook computes a weight outside the trace")
            folding = None
        if folding is not None:
            inputs, _ = self.samples.head(2)
            with torch.no_grad(), ieee_float32():
                own, folded = self.model(inputs), folding[0](inputs)
            if (folded - own).abs().max() > 1e-4 * own.abs().max():
                log.warning(
                    "Batch norms not folded into convolutions: the traced model's outputs differ"
                )
                folding = None
        FOLDINGS[self.model] = (tree, folding)
        return folding

    def state(self) -> tuple[dict, dict]:
        """(selected parameters, everything else: other parameters and buffers), detached."""
        tensors = {name: t.detach() for name, t in self.model.named_parameters()}
        tensors.update(self.model.named_buffers())
        selected = {name: tensors.pop(name) for name in self.names}
        return selected, tensors

    def batches(self, size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of the whole set in consecutive batches of ``size`` samples
        (default ``batch_size``), in order."""
        return self.samples.batches(size or self.batch_size)

    def outputs(self, params: dict, fixed: dict, inputs: torch.Tensor) -> torch.Tensor:
        """The model's outputs on ``inputs`` with the selected parameters ``params``."""
        return functional_call(self.evaluated_module(), {**fixed, **params}, (inputs,))

    def evaluated_module(self) -> nn.Module:
        """The module :meth:`outputs` evaluates: the model with its batch norms folded
        into the convolutions before them (:func:`fold_frozen_batch_norms`; the same
        function, whose forward and backward passes skip the norms' activation-sized
        work: on the demo ResNet-20, one thread, a double-backward HVP takes 0.88-0.92x
        the CPU time at batch 128 and 2048, a gradient 0.92x at 128 and 0.55-0.74x at
        2048; benchmarks/hessian_bench.py) while those norms are frozen (eval mode),
        else the model itself. A module put in training mode since the trace (a norm, or
        any module whose Python the trace froze in eval mode) means the model itself."""
        if self.folding is None or any(module.training for module in self.model.modules()):
            return self.model
        return self.folding[0]

    def share(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A batch's share of the mean loss from its outputs: its summed losses over N."""
        return self.objective.losses(outputs, targets).sum() / self.count

    def batch_loss(self, params: dict, fixed: dict, inputs, targets) -> torch.Tensor:
        """The batch's share of the mean loss: its summed losses over the whole set's count."""
        return self.share(self.outputs(params, fixed, inputs), targets)

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector over the selected parameters as one tensor per parameter (views)."""
        pieces = (t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes))
        return dict(zip(self.names, pieces))

    def gradient(self) -> torch.Tensor:
        """g = dL/dtheta, flat, float64, on the model's device: each batch's share
        differentiated in the model's dtype (``torch.func.grad``), the shares summed in
        float64, so g is exact to the rounding of one batch's gradient."""
        params, fixed = self.state()
        total = torch.zeros(sum(self.sizes), dtype=torch.float64, device=self.device)
        for inputs, targets in self.batches():
            share = grad(self.batch_loss)(params, fixed, inputs, targets)
            total += torch.cat([share[name].reshape(-1) for name in self.names]).double()
        return total


def full_gradient(
    model: nn.Module,
    names: Sequence[str],
    samples: Samples,
    objective: Objective,
    batch_size: int,
) -> torch.Tensor:
    """The gradient of the full-data mean loss w.r.t. the parameters ``names``, as a flat
    float64 vector in their order: one pass over the data, batches weighted as in the
    curvature operators (see :meth:`MeanLoss.gradient`)."""
    return MeanLoss(model, names, samples, objective, batch_size).gradient()


class SymmetricOperator(LinearOperator):
    """A symmetric float64 ``LinearOperator`` over the torch product ``hvp`` of a
    subclass, so that scipy's solvers (``eigsh``) run on it unchanged."""

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = torch.as_tensor(np.ascontiguousarray(x).reshape(-1))
        return self.hvp(vector).double().cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric


class CurvatureOperator(MeanLoss, SymmetricOperator):
    """A symmetric n x n curvature matrix M of the mean loss (see :class:`MeanLoss`) over
    the n selected parameters, at the model's current parameter values (so moving the
    model moves the operator), applied batch by batch: M v = sum_b M_b v, M_b the
    batch's share. A subclass writes :meth:`batch_product`, in each of the two modes
    (``forward_over_reverse``, ``double_backward``); the mode is chosen once, when the
    operator is built (:meth:`choose_mode`; ``auto``: the one measured faster on the
    model's device type, ``AUTOMATIC_HVP_MODE``). ``hvp(v)`` is M @ v; ``hvps`` counts them.
    """

    PRODUCTS = "curvature-vector products"  # in logs and errors

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        samples: Samples,
        objective: Objective,
        batch_size: int,
        hvp: str = "auto",
    ):
        MeanLoss.__init__(self, model, names, samples, objective, batch_size)
        self.hvps = 0
        size = sum(self.sizes)
        SymmetricOperator.__init__(self, dtype=np.float64, shape=(size, size))
        if hvp == "auto":
            hvp = AUTOMATIC_HVP_MODE.get(self.device.type, "double_backward")
        self.mode = self.choose_mode(hvp)

    def choose_mode(self, requested: str) -> str:
        """The product mode of every product of this operator, tried once on two samples:
        ``requested``, else the other mode (forward over reverse where an operation has no
        double backward, double backward where one has no forward-mode rule). A model
        that cannot be differentiated twice at all is refused in one line, with what
        double backward lacks."""
        params, fixed = self.state()
        probe = self.samples.head(2)
        with torch.no_grad():  # a model that fails to run at all fails here, as itself
            self.batch_loss(params, fixed, *probe)
        tangents = {name: torch.ones_like(p) for name, p in params.items()}
        reasons = {}
        for mode in dict.fromkeys([requested, *HVP_MODES]):
            try:
                with product_context():
                    self.batch_product(mode, params, fixed, tangents, probe)
            except (RuntimeError, NotImplementedError) as exc:
                reasons[mode] = describe(exc)
                log.warning("%s by %s fail: %s", self.PRODUCTS, HVP_MODES[mode], reasons[mode])
                continue
            log.info("%s: %s", self.PRODUCTS, HVP_MODES[mode])
            return mode
        lacking = reasons["double_backward"]
        raise UserError(
            f"hessian.hvp: the model cannot be differentiated twice, which "
            f"{self.PRODUCTS} need ({lacking}); replace that operation by one with a double "
            "backward (attention: F.scaled_dot_product_attention or nn.MultiheadAttention, "
            "whose math kernel products use), or leave the model out of Hessian maps"
        )

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """M @ vector (any dtype and device), as a flat tensor on the model's device, in the
        model's dtype."""
        vector = vector.to(self.device, self.torch_dtype)
        total = torch.zeros(vector.numel(), dtype=self.torch_dtype, device=self.device)
        with product_context():
            for product in self.batch_products(self.split(vector)):
                total += torch.cat([t.reshape(-1) for t in product])
        self.hvps += 1
        return total

    def batch_products(self, tangents: dict) -> Iterator[list[torch.Tensor]]:
        """M_b @ tangents for each batch b in order (:meth:`batch_product`)."""
        params, fixed = self.state()
        for batch in self.batches():
            yield self.batch_product(self.mode, params, fixed, tangents, batch)

    def batch_product(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        """M_b @ tangents for one batch, one tensor per selected parameter."""
        raise NotImplementedError


class ModelState:
    """What a model computes with, copied: its parameters and buffers by name, and its
    modules' training flags. Kept gradient graphs are built from this copy, never from
    the model's own tensors, so that nothing the model does later (a move, a reload)
    touches a tensor a kept graph saved. Compared by value, not by tensor versions: the
    model may be moved by writes into a flat vector its parameters' data are views of
    (:meth:`landscape.parameters.FlatParameters.move_to`), which bump that vector's
    version, not theirs. A copy costs one parameter vector (counted in the graphs'
    budget); a comparison reads it once, with one host synchronization."""

    def __init__(self, model: nn.Module):
        self.tensors = {
            name: t.detach().clone()
            for name, t in (*model.named_parameters(), *model.named_buffers())
        }
        self.training = [module.training for module in model.modules()]
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())

    def holds(self, model: nn.Module) -> bool:
        """Whether ``model`` computes with exactly this state now (a NaN never does)."""
        now = dict((*model.named_parameters(), *model.named_buffers()))
        if (
            self.training != [m.training for m in model.modules()]
            or now.keys() != self.tensors.keys()
        ):
            return False
        if any(t.shape != now[name].shape for name, t in self.tensors.items()):
            return False
        differ = [torch.ne(t, now[name]).any() for name, t in self.tensors.items()]
        return not torch.stack(differ).any().item()


class KeptGraphs:
    """The gradient graphs of the batches of a double-backward HVP at one parameter state,
    kept for the next products there.

    A double-backward product H_b v is the backward pass of g_b . v through the graph of
    g_b = grad L_b, which the forward and the first backward pass build: 1 forward and 2
    backward passes' worth of work that do not depend on v. Kept, every product after a
    point's first runs only the second backward, the same operations on the same
    tensors, so the same bits: on the demo ResNet-20 (1,437 digits in one batch of 2048,
    one thread) 0.69x the CPU time of a product that builds its graph, whose graph holds
    350 MiB (make bench, benchmarks/hessian_bench.py). Lanczos makes 10-17 products at a
    point, all at one state. Graphs are kept for batches 0, 1, ... while the state's copy
    and the graphs' saved tensors (each storage counted once a graph, the copy's not
    again, by ``saved_tensors_hooks`` while the graph is built; plus the gradient) fit a
    budget of :data:`KEPT_GRAPHS_SHARE` of the device's free memory (measured first)
    over the node's ranks, which may share the device
    (:func:`landscape.ranks.launched_local_size`); later batches build theirs in every
    product, as without keeping. Once every batch's graph is kept (``complete``), a
    product reads no data at all. A new state (the model moved, a buffer changed, a
    module's mode switched) drops them all first, and
    :meth:`HessianOperator.release` drops them when a solve is done."""

    def __init__(self, model: nn.Module, device: torch.device):
        free = free_memory(device) or 0
        self.budget = int(free * KEPT_GRAPHS_SHARE) // launched_local_size()
        self.state = ModelState(model)
        self.bytes = self.state.bytes
        self.graphs: list[tuple[list, tuple]] = []
        self.sizes: list[int] = []  # bytes counted for each kept graph
        self.complete = False
        self.copied = {t.untyped_storage().data_ptr() for t in self.state.tensors.values()}

    @contextmanager
    def measured(self) -> Iterator[Callable[[], int]]:
        """Counts the bytes of the storages autograd saves inside, each once and the state
        copy's not at all (a graph's memory; an upper bound where a saved view, a batch
        of held data say, is smaller than its storage); yields a reader of the count."""
        count, counted = 0, set(self.copied)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal count
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in counted:
                counted.add(storage.data_ptr())
                count += storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield lambda: count

    def fits(self, graph_bytes: int) -> bool:
        """Whether one more graph of ``graph_bytes`` stays within the budget; counted if so."""
        if self.bytes + graph_bytes > self.budget:
            return False
        self.bytes += graph_bytes
        self.sizes.append(graph_bytes)
        return True


class HessianOperator(CurvatureOperator):
    """H of the mean loss over ``samples`` w.r.t. the parameters ``names``, at the model's
    current parameter values (so moving the model moves the operator).

    The loss is ``objective``'s (see :mod:`landscape.objectives`): the sum of its
    per-sample (or per-token) losses over the whole set, divided by its count of them,
    so every batch carries its own share. ``names``: see :func:`select_parameters`.
    ``hvp``: ``double_backward`` (the default: faster on every model family measured,
    see :class:`landscape.config.HessianConfig`) or ``forward_over_reverse`` (``jvp`` of
    ``grad``); a model with an operation that lacks one gets the other (see
    :meth:`choose_mode`). ``hvps``
    counts products (:meth:`hvp_many` counts one per vector).
    """

    PRODUCTS = "Hessian-vector products"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched: bool | None = None  # whether hvp_many can vmap; tried at its first call
        self.activation_size: int | None = None  # bytes of the largest, per sample
        self.kept: KeptGraphs | None = None  # double backward's graphs at the current state

    def batch_products(self, tangents: dict) -> Iterator[list[torch.Tensor]]:
        """H_b @ tangents for each batch b, as :meth:`CurvatureOperator.batch_products`; in
        double-backward mode each batch's gradient graph is kept across products at the
        same parameter values while it fits (:class:`KeptGraphs`), so that a product at a
        point after the first is one backward pass of the kept graphs: the same
        operations on the same tensors, so the same bits. :meth:`release` frees them."""
        if self.mode != "double_backward":
            yield from super().batch_products(tangents)
            return
        if self.kept is None or not self.kept.state.holds(self.model):
            self.kept = None  # freed before the budget is measured
            self.kept = KeptGraphs(self.model, self.device)
        kept, outputs = self.kept, [tangents[name] for name in self.names]
        batches = [None] * len(kept.graphs) if kept.complete else self.batches()
        count = 0
        for count, batch in enumerate(batches, 1):
            if count <= len(kept.graphs):
                (leaves, gradients), keep = kept.graphs[count - 1], True
            else:
                leaves, gradients, keep = self.kept_gradient_graph(kept, count - 1, batch)
            yield list(torch.autograd.grad(gradients, leaves, outputs, retain_graph=keep))
        kept.complete = len(kept.graphs) == count  # only after a whole pass

    def kept_gradient_graph(self, kept: KeptGraphs, index: int, batch) -> tuple[list, tuple, bool]:
        """Batch ``index``'s leaves and gradient with its graph, built from ``kept``'s copy
        of the model's state, and whether it is kept (the next batch to keep, and within
        the budget)."""
        tensors = kept.state.tensors
        params = {name: tensors[name] for name in self.names}
        fixed = {name: t for name, t in tensors.items() if name not in params}
        with kept.measured() as graph_bytes:
            leaves, gradients = self.gradient_with_graph(params, fixed, batch)
        size = graph_bytes() + sum(g.numel() * g.element_size() for g in gradients)
        keep = index == len(kept.graphs) and kept.fits(size)
        if keep:
            kept.graphs.append((leaves, gradients))
        return leaves, gradients, keep

    def gradient_with_graph(self, params: dict, fixed: dict, batch) -> tuple[list, tuple]:
        """The selected parameters as fresh leaves, and the batch's share of the gradient
        with its graph (``create_graph``), which a double backward differentiates."""
        leaves = [p.detach().requires_grad_(True) for p in params.values()]
        with torch.enable_grad():
            loss = self.batch_loss(dict(zip(params, leaves)), fixed, *batch)
            return leaves, torch.autograd.grad(loss, leaves, create_graph=True)

    def release(self) -> None:
        """Frees the kept gradient graphs (at the end of a solve: the next point's state
        differs anyway, and other work needs the memory)."""
        self.kept = None

    def hvp_many(self, vectors: torch.Tensor, samples_per_pass: int | None = None) -> torch.Tensor:
        """H @ each row of ``vectors`` ((m, P), any dtype and device), as an (m, P) tensor on
        the model's device in the model's dtype.

        Double backward: one :meth:`hvp` per row, all but the first from the kept
        gradient graphs (:class:`KeptGraphs`), which costs less than batching the rows
        through graphs built in the pass (one pass of 8 double-backward products took
        1.08x the time of 8 products that each built their graphs, make bench; from kept
        graphs a product takes 0.5-0.7x).

        Forward over reverse: in one pass over the data, each batch's forward and backward
        pass computed once and ``vmap`` over the m tangents of jvp of grad. A pass takes
        ``samples_per_pass`` samples, by default :meth:`samples_per_pass` (so that the m
        tangents of its largest activation fill about PASS_BYTES). Same weighting as
        :meth:`hvp`, so the rows equal m separate products up to rounding (the order differs:
        float64 agrees to about 1e-15 relative, float32 to about 1e-6). Where ``vmap``
        cannot batch the model (an operation without a batching rule, found once on two
        samples and logged), it makes one :meth:`hvp` per row."""
        vectors = vectors.to(self.device, self.torch_dtype)
        count = len(vectors)
        if vectors.dim() != 2 or vectors.shape[1] != self.shape[0]:
            raise ValueError(
                f"hvp_many takes (m, {self.shape[0]}) vectors, not {tuple(vectors.shape)}"
            )
        if self.mode == "double_backward" or count == 1:
            return torch.stack([self.hvp(vector) for vector in vectors])
        if self.batched is None:
            self.batched = self.can_batch()
        if not self.batched:
            return torch.stack([self.hvp(vector) for vector in vectors])
        params, fixed = self.state()
        tangents = self.tangents(vectors)
        total = torch.zeros_like(vectors)
        with product_context():
            for batch in self.batches(samples_per_pass or self.samples_per_pass(count)):
                product = self.batch_hvp_many(params, fixed, tangents, batch)
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
            (one,), _ = self.samples.head(1)
            sizes = [one.numel()]
            hooks = [
                module.register_forward_hook(lambda m, a, output: sizes.append(output.numel()))
                for module in self.model.modules()
                if not list(module.children())
            ]
            try:
                with torch.no_grad():
                    self.model(one[None])
            finally:
                for hook in hooks:
                    hook.remove()
            # Tangents are in the parameters' dtype, whatever the inputs are (int64 token ids).
            self.activation_size = max(sizes) * torch.finfo(self.torch_dtype).bits // 8
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
        probe = self.samples.head(2)
        tangents = self.tangents(torch.ones(2, self.shape[0], dtype=self.torch_dtype))
        tangents = {name: t.to(self.device) for name, t in tangents.items()}
        try:
            with product_context():
                self.batch_hvp_many(params, fixed, tangents, probe)
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

    def batch_product(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        if mode == "forward_over_reverse":
            gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
            _, product = jvp(gradient, (params,), (tangents,))
            return [product[name] for name in self.names]
        leaves, gradients = self.gradient_with_graph(params, fixed, batch)
        return list(torch.autograd.grad(gradients, leaves, [tangents[n] for n in self.names]))

    def batch_hvp_many(
        self, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        """The batch's share of H t for m stacked tangents t ((m, *shape) each), forward
        over reverse: the batch's forward and backward once, ``vmap`` over the tangents."""
        gradient = grad(lambda p: self.batch_loss(p, fixed, *batch))
        product = vmap(lambda t: jvp(gradient, (params,), (t,))[1])(tangents)
        return [product[name] for name in self.names]


class GaussNewtonOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix G of the mean loss over ``samples`` w.r.t. the
    parameters ``names``, at the model's current parameter values:

        G = (1/N) sum_i J_i^T H_i J_i,

    J_i the Jacobian of unit i's model outputs z_i w.r.t. the selected parameters, H_i =
    d^2 l_i / dz_i^2 the Hessian of its loss w.r.t. those outputs (N, l_i: see
    :class:`MeanLoss`). It is the Hessian H without the outputs' own curvature:

        H = G + (1/N) sum_i sum_k (dl_i/dz_ik) d^2 z_ik / dtheta^2,

    the second term being :class:`DifferenceOperator` (H - G). For a loss convex in the
    outputs (cross-entropy, squared error) every H_i is positive semidefinite and so is
    G; for a model linear in its parameters the second term vanishes and G = H. For
    softmax cross-entropy H_i = diag(p_i) - p_i p_i^T with p_i the softmax, with label
    smoothing too (the smoothed targets sum to 1), which has the constant vector in its
    kernel: G has the softmax gauge directions in its kernel, as H does
    (:class:`GaugeProjection`).

    Each product is J^T (H_out (J v)) for a batch, where H_out is block diagonal (one
    block H_i / N per unit): nothing of size outputs x parameters is formed, and H_out
    comes from the objective by autograd (any :class:`~landscape.objectives.Objective`).
    ``hvp``: ``forward_over_reverse`` takes J v by ``jvp`` of the model, H_out (J v) by
    ``jvp`` of the outputs' gradient and J^T by ``vjp`` (two forward passes);
    ``double_backward`` takes J v by the double-vjp trick (the vjp of the model's vjp,
    which is linear in its cotangent), H_out by double backward of the loss, and J^T by
    the same graph (one forward pass; the model must have a double backward).
    """

    PRODUCTS = "Gauss-Newton-vector products"

    def batch_product(
        self, mode: str, params: dict, fixed: dict, tangents: dict, batch
    ) -> list[torch.Tensor]:
        inputs, targets = batch
        if mode == "forward_over_reverse":

            def outputs_of(selected: dict) -> torch.Tensor:
                return self.outputs(selected, fixed, inputs)

            outputs, output_tangent = jvp(outputs_of, (params,), (tangents,))
            output_gradient = grad(lambda z: self.share(z, targets))
            _, curved = jvp(output_gradient, (outputs,), (output_tangent,))
            _, pullback = vjp(outputs_of, params)
            (product,) = pullback(curved)
            return [product[name] for name in self.names]
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        with torch.enable_grad():
            outputs = self.outputs(leaves, fixed, inputs)
            cotangent = torch.zeros_like(outputs, requires_grad=True)
            pulled = torch.autograd.grad(
                outputs, list(leaves.values()), cotangent, create_graph=True
            )
            (output_tangent,) = torch.autograd.grad(
                pulled, cotangent, [tangents[name] for name in self.names], retain_graph=True
            )
            detached = outputs.detach().requires_grad_(True)
            (output_gradient,) = torch.autograd.grad(
                self.share(detached, targets), detached, create_graph=True
            )
            (curved,) = torch.autograd.grad(output_gradient, detached, output_tangent)
            return list(torch.autograd.grad(outputs, list(leaves.values()), curved))


class DifferenceOperator(SymmetricOperator):
    """first - second of two curvature operators of the same loss (model, parameters,
    data and objective), e.g. the residual H - G of the Gauss-Newton split (Sagun et al.):
    (1/N) sum_i sum_k (dl_i/dz_ik) d^2 z_ik / dtheta^2, the curvature the model's outputs
    add through the loss's gradient. Each product costs one of each operator (both
    count it in their ``hvps``); ``hvps`` counts this operator's. For the gauge
    projection use ``GaugeProjection.find(difference.first)``."""

    def __init__(self, first: CurvatureOperator, second: CurvatureOperator):
        same = (
            first.model is second.model
            and first.names == second.names
            and first.samples is second.samples
            and type(first.objective) is type(second.objective)
            and vars(first.objective) == vars(second.objective)
        )
        if not same:
            raise ValueError(
                f"{type(first).__name__} - {type(second).__name__}: not of one loss; build "
                "both from the same model, parameter names, data and objective"
            )
        self.first, self.second = first, second
        self.torch_dtype, self.device = first.torch_dtype, first.device
        self.hvps = 0
        super().__init__(dtype=np.float64, shape=first.shape)

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """(first - second) @ vector, on the model's device, in the model's dtype."""
        product = self.first.hvp(vector) - self.second.hvp(vector)
        self.hvps += 1
        return product


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
    def find(cls, operator: CurvatureOperator) -> GaugeProjection | None:
        """The projection for ``operator``'s selected parameters, or None where the loss
        does not see the logits through their softmax only (``objective.softmax_gauge``)
        or the model's output is not its last Linear layer's output (checked on one
        sample: the very tensor the layer returned), or that layer's weight is another
        module's too (a tied input embedding, which the shift would move as well)."""
        model = operator.model
        linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not operator.objective.softmax_gauge or not linear:
            return None
        name, layer = linear[-1]
        others = (p for m in model.modules() if m is not layer for p in m.parameters(False))
        if any(p is layer.weight for p in others):  # tied: the shift would move more than W
            return None
        seen = []
        hook = layer.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            with torch.no_grad():
                output = model(operator.samples.head(1)[0])
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
