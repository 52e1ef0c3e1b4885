"""An experiment made concrete: the model with its checkpoint and the data, on one device.

Plan, run and train all start here, so a model or data error is caught the same way
everywhere, at the boundary, with the config field named.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from landscape.checkpoint import check_compatible, file_sha256, load_state_dict
from landscape.config import ExperimentConfig
from landscape.data import DATASET_FIELDS, Dataset, load_dataset
from landscape.errors import UserError, describe
from landscape.models import build_model
from landscape.objectives import Objective, build_objective, check_metric_maps
from landscape.precision import REDUCED_DTYPES, check_autocast, set_tf32
from landscape.samples import SplitSamples, TorchData

log = logging.getLogger(__name__)

# The dtype of the parameters and data for each evaluation.dtype: a reduced one keeps
# them in float32 and runs the loss maps' forward passes under autocast.
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    **{name: torch.float32 for name in REDUCED_DTYPES},
}


@dataclass
class Experiment:
    """A model (checkpoint loaded, eval mode) and its data set, both on ``device``, and the
    objective whose loss every map and every curvature of the experiment is taken of.

    ``dtype`` is the parameters' and data's (what curvature computes in); ``autocast``
    the reduced dtype the loss maps' forward passes run in (None: ``dtype`` itself);
    ``compiled`` the model's ``torch.compile`` with ``evaluation.compile``
    (:class:`CompiledForward`)."""

    config: ExperimentConfig
    model: nn.Module
    data: Dataset | SplitSamples  # held tensors, or torch Datasets held or streamed
    objective: Objective
    device: torch.device
    dtype: torch.dtype
    checkpoint_sha256: str | None
    autocast: torch.dtype | None = None
    compiled: CompiledForward | None = None

    @property
    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss maps' forward pass: the compiled model, or the model itself."""
        return self.compiled or self.model

    @classmethod
    def load(
        cls,
        config: ExperimentConfig,
        with_checkpoint: bool = True,
        device: str | None = None,
        local_rank: int = 0,
        checkpoint_sha256: str | None = None,
    ) -> Experiment:
        """``device`` overrides the config's; ``local_rank`` picks this rank's GPU;
        ``checkpoint_sha256``: the checkpoint's hash when the caller has just checked it
        against a plan (hashing a large checkpoint again costs as much as reading it)."""
        evaluation = config.evaluation
        if evaluation.threads:
            torch.set_num_threads(evaluation.threads)
        device = resolve_device(device or evaluation.device, local_rank)
        if device.type == "cuda":
            set_tf32(evaluation.tf32)
            if evaluation.tf32:
                warn_tf32_curvature()
        dtype = DTYPES[evaluation.dtype]
        autocast = REDUCED_DTYPES.get(evaluation.dtype)
        if autocast is not None:
            check_autocast(device, evaluation.dtype)
            log.info(
                "evaluation.dtype %s: the loss maps' forward passes autocast to it; "
                "parameters, data, losses and every curvature product stay float32",
                evaluation.dtype,
            )
        data = load_dataset(config.data.name, config.data.kwargs)
        model = build_model(
            config.model.name, data.input_shape, data.num_classes, config.model.kwargs
        )
        objective = build_objective(evaluation.loss, evaluation.loss_kwargs)
        if isinstance(data, TorchData):
            data = data.on(device, dtype, config.data, evaluation.batch_size)
        else:
            data = replace(
                data,
                **{
                    field: t.to(device, dtype if t.is_floating_point() else t.dtype)
                    for field in DATASET_FIELDS[:4]
                    for t in [getattr(data, field)]
                },
            )
        check_objective_fits(objective, config, data)
        # Cast first, then load: a float64 checkpoint in a float64 run keeps every digit.
        model.to(device=device, dtype=dtype).eval()
        sha256 = None  # an untrained model has no file to hash
        if with_checkpoint:
            if config.model.checkpoint is None:
                raise UserError("model.checkpoint: required; name the trained checkpoint file")
            state = load_state_dict(config.model.checkpoint, model.state_dict(), config.model)
            check_compatible(model, state, config.model.checkpoint)
            model.load_state_dict(state)
            sha256 = checkpoint_sha256 or file_sha256(config.model.checkpoint)
        if evaluation.channels_last:
            data = channels_last(data, config.data.name)
            model.to(memory_format=torch.channels_last)
        weights = (
            f"the weights of model.checkpoint {config.model.checkpoint}"
            if with_checkpoint
            else "its initial weights"
        )
        check_forward(model, data, config.model.name, weights, objective, evaluation.loss)
        compiled = None
        if evaluation.compile:
            keep_layout = compiler_keeps_layout(device, dtype, autocast, evaluation.tf32)
            compiled = CompiledForward(model, keep_layout)
        return cls(config, model, data, objective, device, dtype, sha256, autocast, compiled)


def warn_tf32_curvature() -> None:
    """With TF32 a float32 product carries ~2^-11 relative rounding (10 mantissa bits),
    not 2^-24: a Lanczos residual below about 16 TF32 epsilons (16 x 2^-10 = 1.6e-2) of
    the spectral scale then measures that rounding, not convergence. The criterion is
    left as configured (warned, not floored): TF32 is a CUDA-only, process-wide switch
    the curvature code cannot see, and a floor that depended on it would give a CPU rank
    and a GPU rank of one run different criteria."""
    log.warning(
        "evaluation.tf32: float32 products run in TF32 (10 mantissa bits, ~5e-4 relative "
        "rounding); Hessian and analysis residuals below ~1.6e-2 x the spectral scale are "
        "then rounding, not convergence: set evaluation.tf32 false for curvature runs"
    )


def channels_last(data: Dataset | SplitSamples, name: str) -> Dataset:
    """``data`` with its image inputs (B, C, H, W) in channels-last memory (evaluation.
    channels_last); a batch sliced from them stays so. The model's 4-D weights are put
    in channels-last memory beside them, which the flat parameter vector keeps
    (:class:`landscape.parameters.FlatParameters`): with one input channel an image
    batch is contiguous and channels-last at once, and only the weight tells the
    convolution which kernels to run."""
    if isinstance(data, SplitSamples):
        raise UserError(
            f"evaluation.channels_last: data {name!r} is read through torch Datasets; return "
            "channels-last images from its __getitem__ instead, and set this false"
        )
    if data.train_x.dim() != 4:
        raise UserError(
            f"evaluation.channels_last: data {name!r} has inputs of shape "
            f"{tuple(data.train_x.shape[1:])}, not images (C, H, W); set it false"
        )
    layout = torch.channels_last
    return replace(
        data,
        train_x=data.train_x.contiguous(memory_format=layout),
        test_x=data.test_x.contiguous(memory_format=layout),
    )


def compiler_keeps_layout(
    device: torch.device, dtype: torch.dtype, autocast: torch.dtype | None, tf32: bool
) -> bool:
    """Whether ``evaluation.compile`` keeps the configured memory layout (see
    :class:`CompiledForward`): on a GPU where convolutions do not run on the tensor cores,
    that is in IEEE float32 (no autocast, TF32 off) or in float64 (which TF32 never
    touches). Elsewhere Inductor chooses."""
    on_tensor_cores = autocast is not None or (tf32 and dtype == torch.float32)
    return device.type == "cuda" and not on_tensor_cores


class CompiledForward:
    """``torch.compile(model)`` with the model itself to fall back on (evaluation.compile).

    Compiling happens at the first call (and again for a new batch shape), so that is
    where a failure shows (no C compiler, an operation the compiler cannot trace): a
    compiler's error (``TorchDynamoException``, which wraps the backend's) is logged once,
    in one line, and this and every later call run the model eagerly. Any other error is
    the model's own (out of memory, a user's forward) and is raised as it is. Parameters
    are read at each call, so moving the model in place (a new grid point) needs no
    recompilation. Only the one-point path calls it: K points per pass
    (:class:`landscape.evaluators.SeveralPoints`) run their vmapped forward eagerly.

    ``keep_layout``: convolutions stay in the memory format the model and data have
    (``evaluation.channels_last``) instead of the one Inductor's layout optimization
    picks. Its heuristic (fixed multipliers from torchbench's convolutions, the same for
    every card) turns a net of small convolutions (ResNets: at most 64 channels) to
    channels-last. On an H200 in IEEE float32 (ResNet-56, cuDNN 9.19,
    benchmarks/cuda_bench.py) eager channels-last ran at 0.37x the default layout, and
    the compiled forward, which took the heuristic's layout, at 0.40x eager: most likely
    the same cause, not yet measured with the layout kept. On the tensor cores
    channels-last paid (bfloat16: 2.11x float32 against 1.60x), and on a CPU the
    compiler's oneDNN layout is its own; there Inductor chooses
    (:func:`compiler_keeps_layout`).
    """

    def __init__(self, model: nn.Module, keep_layout: bool):
        self.model = model
        options = {"layout_optimization": False} if keep_layout else None
        self.compiled: Callable | None = torch.compile(model, options=options)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(inputs)
            except torch._dynamo.exc.TorchDynamoException as exc:
                log.warning(
                    "evaluation.compile: torch.compile failed, the forward pass runs eagerly (%s)",
                    describe(exc),
                )
                self.compiled = None
        return self.model(inputs)


def check_objective_fits(
    objective: Objective, config: ExperimentConfig, data: Dataset | SplitSamples
) -> None:
    """The objective takes the data's targets (cross-entropy needs integer class labels,
    mse float targets) and has an accuracy where the maps ask for one."""
    loss = config.evaluation.loss
    problem = objective.target_problem(data.split("train").head(FORWARD_SAMPLES)[1])
    if problem is not None:
        raise UserError(
            f"evaluation.loss: {loss!r} does not fit data {config.data.name!r}, which has {problem}"
        )
    check_metric_maps(objective, loss, config.surface_maps)


FORWARD_SAMPLES = 2


@torch.no_grad()
def check_forward(
    model: nn.Module,
    data: Dataset | SplitSamples,
    name: str,
    weights: str,
    objective: Objective,
    loss: str,
) -> None:
    """One forward pass and its ``loss`` on the first training samples, with the weights
    every point starts from (``weights`` says which): fails in one line naming
    ``model.name`` unless the model returns one finite tensor of per-sample outputs that
    the loss can take, logits of the labels' shape plus num_classes for class labels
    ((B, C) for (B,) labels, (B, T, C) for (B, T) token labels), as many values per
    sample as the targets hold for regression. Tuples and dicts (Hugging Face style
    outputs) are refused rather than guessed at: which entry is the logits is the user's
    to say. The objective's loss (``loss`` names it) is computed too, as every grid
    point will compute it, so what it refuses (e.g. integer outputs) fails at plan, not
    at the first point of run, and so does a loss that is not floating and of shape
    (B,) or (B, ...): one value per sample or per token, naming evaluation.loss.
    """
    inputs, targets = data.split("train").head(FORWARD_SAMPLES)
    count = len(inputs)
    try:
        outputs = model(inputs)
    except Exception as exc:
        raise UserError(
            f"model.name: {name} fails on {count} training samples of shape "
            f"{tuple(inputs.shape[1:])}: {describe(exc)}"
        ) from None
    classification = not targets.is_floating_point()
    wanted = (*targets.shape, data.num_classes) if classification else tuple(targets.shape)
    one_tensor = f"return one tensor of outputs, shape {wanted} here"
    if isinstance(outputs, dict):
        raise UserError(
            f"model.name: {name} returns a {type(outputs).__name__} (keys "
            f"{', '.join(map(str, outputs))}) from forward; {one_tensor} (e.g. its logits)"
        )
    if isinstance(outputs, (tuple, list)):
        raise UserError(
            f"model.name: {name} returns a {type(outputs).__name__} of {len(outputs)} from "
            f"forward; {one_tensor} (e.g. only the logits)"
        )
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            f"model.name: {name} returns a {type(outputs).__name__} from forward; {one_tensor}"
        )
    fits = (
        tuple(outputs.shape) == wanted
        if classification
        else outputs.dim() >= 1 and len(outputs) == count and outputs.numel() == targets.numel()
    )
    if not fits:
        what = f"{data.num_classes} classes" if classification else "targets of that shape"
        raise UserError(
            f"model.name: {name} outputs shape {tuple(outputs.shape)} for {count} samples; "
            f"the data has {what}, so it must be {wanted}"
        )
    if not torch.isfinite(outputs).all():
        raise UserError(
            f"model.name: {name} outputs NaN or inf on {count} training samples with "
            f"{weights}; check its forward"
        )
    try:
        losses = objective.losses(outputs, targets)
    except Exception as exc:
        raise UserError(
            f"model.name: {name} outputs ({outputs.dtype}, shape {tuple(outputs.shape)}) on "
            f"{count} training samples fail evaluation.loss {loss}: {describe(exc)}"
        ) from None
    if not (
        isinstance(losses, torch.Tensor)
        and losses.is_floating_point()
        and losses.dim() >= 1
        and len(losses) == count
    ):
        got = (
            f"{losses.dtype} of shape {tuple(losses.shape)}"
            if isinstance(losses, torch.Tensor)
            else f"a {type(losses).__name__}"
        )
        raise UserError(
            f"evaluation.loss: {loss} returns {got} for {count} training samples; return "
            f"one floating loss per sample, shape ({count},) (or ({count}, tokens))"
        )


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks a GPU when there is one, anything else is passed to torch. A GPU
    without an index is the one of this rank: its rank on the node modulo visible GPUs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"evaluation.device: {name!r} is not a device; use auto, cpu or cuda"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("evaluation.device: cuda requested but no GPU is visible; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        try:  # a device torch names but this build or machine may lack (mps, xpu)
            torch.empty(0, device=device)
        except RuntimeError as exc:
            raise UserError(
                f"evaluation.device: {name!r} is not available here ({describe(exc)}); use "
                "auto, cpu or cuda"
            ) from None
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device
