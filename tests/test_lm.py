"""Transformers end to end: a tiny ``transformers`` GPT-2 built from a config (no download)
on byte-level text from Python's own help topics, through the surface, the Hessian map,
the trace and the analysis, against torch's own token-averaged cross-entropy and its
dense Hessian; tied embeddings and LayerNorms under the plotting directions; integer
token inputs checked in one line; a user's vision transformer by import path."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from conftest import surface_with_curvature, write_experiment
from test_bad_input import fails_with
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.config import load_config
from landscape.curvature.operators import GaugeProjection, HessianOperator
from landscape.data import IGNORE_INDEX, load_dataset
from landscape.errors import UserError
from landscape.experiment import Experiment
from landscape.objectives import TokenCrossEntropy
from landscape.parameters import DirectionPlane
from landscape.plan import plan_analysis, plan_surface
from landscape.samples import HeldSamples
from landscape.store import SurfaceFile
from landscape.train import train
from landscape.workers import run_job

pytest.importorskip("transformers")

DTYPES = ["float32", "float64"]
# ~300 parameters: a dense Hessian in a few seconds. 40 sequences of 4 tokens from the
# first 10 bytes of each help topic (sequences of 4, 4 and 1 token), so batches of 8
# hold different numbers of real tokens.
TINY_GPT2 = {"name": "gpt2", "kwargs": {"layers": 1, "width": 4, "heads": 2}}
TINY_TEXT = {
    "name": "text",
    "kwargs": {"seq_len": 4, "vocab": 6, "limit": 40, "document_bytes": 10},
}
LM = {
    "model": TINY_GPT2,
    "data": TINY_TEXT,
    "evaluation": {"loss": "token_cross_entropy", "batch_size": 8},
}
GRID = {"x": {"min": -0.5, "max": 0.5, "num": 3}, "y": {"min": -0.5, "max": 0.5, "num": 2}}
TIED = ("transformer.wte.weight", "lm_head.weight")


def token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, params=None) -> torch.Tensor:
    """torch's mean cross-entropy over every unpadded token of the set (ground truth,
    independent of the tool's objective), with ``params`` (all of them) if given."""
    logits = model(inputs) if params is None else functional_call(model, params, (inputs,))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def dense_spectrum(model, inputs, targets, loss_of=None) -> np.ndarray:
    """Eigenvalues (numpy.linalg.eigh) of the dense float64 Hessian of :func:`token_loss`,
    or of ``loss_of(logits)``, over all of ``model``'s parameters (a tied one once), at
    its current values, on the attention's math kernel.

    By ``torch.autograd.functional.hessian`` (one double backward per row), not
    ``torch.func.hessian``: in torch 2.13 the latter's vmapped rows of GPT-2's LayerNorm
    scales are wrong (the matrix is asymmetric by 1.2 in Frobenius norm, 0.7 in the rows
    of ln_f's weight), while this one is symmetric to 3e-14 and agrees with the tool's
    products, by double backward and forward over reverse alike, to 6e-14."""
    model = model.double()
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        params = dict(zip(named, pieces))
        if loss_of is None:
            return token_loss(model, inputs, targets, params)
        return loss_of(functional_call(model, params, (inputs,)))

    with sdpa_kernel(SDPBackend.MATH):
        dense = torch.autograd.functional.hessian(loss, flat).numpy()
    assert np.abs(dense - dense.T).max() <= 1e-12 * np.abs(dense).max()
    return np.linalg.eigh(dense)[0]


def lm_experiment(tmp_path, **changes):
    return write_experiment(tmp_path, "lm", **{**LM, **changes})


def test_text_is_pythons_help_byte_for_byte_split_by_document_and_padded():
    """Every help topic comes back from exactly one split (the unpadded inputs hold each
    document but its last byte, which only a target holds), each target is the next
    input, -100 pads exactly the tail of a document's last sequence, and a second load
    gives the same tensors."""
    data = load_dataset("text", {"seq_len": 16})
    again = load_dataset("text", {"seq_len": 16})
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(data, name), getattr(again, name)), name
    texts = []
    for split in ("train", "test"):
        inputs, targets = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        kept = targets != IGNORE_INDEX
        assert torch.equal(kept, kept.cummin(dim=1).values)  # padding only at the end
        assert not inputs[~kept].any()  # padded inputs are id 0
        assert torch.equal(inputs[:, 1:][kept[:, 1:]], targets[:, :-1][kept[:, 1:]])
        texts.append(bytes(inputs[kept].tolist()))  # each document but its last byte
    assert len(data.train_x) > 3 * len(data.test_x) > 0
    corpus = [topics[key].encode() for key in sorted(topics)]
    assert sum(map(len, texts)) == sum(len(text) - 1 for text in corpus)
    for text in corpus:
        assert (text[:-1] in texts[0]) != (text[:-1] in texts[1])


def test_a_small_vocabulary_keeps_the_most_frequent_bytes():
    """With vocab 6: the 5 most frequent bytes of the corpus get ids 0..4 by frequency,
    every other byte id 5."""
    corpus = "".join(topics[key] for key in sorted(topics)).encode()
    counts = np.bincount(np.frombuffer(corpus, np.uint8), minlength=256)
    ranked = sorted(range(256), key=lambda b: (-counts[b], b))
    data = load_dataset("text", {"seq_len": 16, "vocab": 6})
    full = load_dataset("text", {"seq_len": 16})
    kept = full.train_y != IGNORE_INDEX
    expected = torch.full((256,), 5)
    expected[ranked[:5]] = torch.arange(5)
    assert torch.equal(data.train_y[kept], expected[full.train_y[kept]])
    assert data.num_classes == 6 and int(data.train_x.max()) == 5


@pytest.mark.parametrize(
    "plugin, fragments",
    [
        ("token_id_too_large", ["train_x token id 5 (sample 2, 1 in all)", "0..4 for vocab 5"]),
        ("negative_token_id", ["test_x token id -1 (sample 1,", "outside 0..4"]),
        (
            "token_ids_beside_float_inputs",
            ["test_x of torch.float32 beside train_x of torch.int64"],
        ),
        ("token_label_too_large", ["train_y label 5 (sample 4", "0..4 or padding -100"]),
        ("token_id_beyond_given_vocabulary", ["train_x token id 9", "for vocab 9"]),
    ],
)
def test_bad_token_data_fails_in_one_line(plugin, fragments):
    with pytest.raises(UserError) as error:
        load_dataset(f"lm_plugins:{plugin}", {})
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"data.name: lm_plugins:{plugin} returned")
    for fragment in fragments:
        assert fragment in message, message


def test_token_ids_stay_integers_and_vocab_may_exceed_the_classes(tmp_path):
    """A float64 run keeps int64 token ids (an embedding takes no floats) and float64
    weights; a data set's own vocab bounds its ids, not num_classes."""
    data = load_dataset("lm_plugins:larger_input_vocabulary", {})
    assert data.vocab == 10 and data.train_x.dtype == torch.int64 and int(data.train_x.max()) == 9
    exp = Experiment.load(load_config(lm_experiment(tmp_path)))
    assert exp.data.train_x.dtype == exp.data.test_x.dtype == torch.int64
    assert exp.model.transformer.wte.weight.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_gpt2_surface_hessian_and_trace_match_torch_and_the_dense_hessian(tmp_path, dtype):
    """Loss and token accuracy at each point equal torch's cross-entropy over the unpadded
    tokens of the whole set (batches of 8 sequences hold different numbers of them);
    lambda_min and lambda_max equal the extreme eigenvalues of the dense Hessian of that
    loss; the trace estimates bracket its trace."""
    path = lm_experiment(
        tmp_path,
        grid=GRID,
        maps=["train_loss", "train_acc", "test_loss", "lambda_min", "lambda_max"],
        evaluation={**LM["evaluation"], "dtype": dtype},
        hessian={"stride": 2, "tolerance": 1e-6 if dtype == "float64" else 1e-4},
        trace={"samples": 64},
    )
    surface = surface_with_curvature(path)

    exp = Experiment.load(load_config(path, ["evaluation.dtype=float64"]))
    inputs, targets = exp.data.train_x, exp.data.train_y
    kept = targets != IGNORE_INDEX
    counts = kept[: len(kept) // 8 * 8].view(-1, 8, kept.shape[1]).sum(dim=(1, 2))
    assert len(set(counts.tolist())) > 1, "batches must hold different numbers of tokens"
    with SurfaceFile.open(surface) as done:
        maps, directions, grid = done.maps(), done.directions(), done.grid
        _, trace = done.group("trace")
    plane = DirectionPlane(exp.model, directions)
    rel = 1e-6 if dtype == "float32" else 1e-12
    for point in range(grid.size):
        a, b = grid.coordinates(point)
        plane.move_to(a, b)
        with torch.no_grad():
            loss = token_loss(exp.model, inputs, targets).item()
            test_loss = token_loss(exp.model, exp.data.test_x, exp.data.test_y).item()
            hits = (exp.model(inputs).argmax(-1) == targets)[kept].double().mean().item()
        j, i = np.unravel_index(point, maps["train_loss"].shape)
        assert maps["train_loss"][j, i] == pytest.approx(loss, rel=rel)
        assert maps["test_loss"][j, i] == pytest.approx(test_loss, rel=rel)
        assert maps["train_acc"][j, i] == pytest.approx(hits, abs=1e-12)
        if np.isnan(maps["lambda_max"][j, i]):  # not a point of the Hessian grid
            continue
        spectrum = dense_spectrum(exp.model, inputs, targets)
        top = np.abs(spectrum).max()
        within = 1e-3 if dtype == "float32" else 1e-6
        assert abs(maps["lambda_min"][j, i] - spectrum[0]) <= within * top
        assert abs(maps["lambda_max"][j, i] - spectrum[-1]) <= within * top
    plane.move_to(0.0, 0.0)
    exact = dense_spectrum(exp.model, inputs, targets).sum()
    assert abs(trace["hutchinson_mean"] - exact) <= trace["hutchinson_half_width"]


def test_the_tied_embedding_is_one_parameter_perturbed_once(tmp_path):
    """GPT-2's input embedding and output layer are one tensor: the surface file holds one
    direction for it (under the name named_parameters gives), filter-normalized one token
    row at a time, and at (a, b) both modules see theta0 + a d1 + b d2, not twice that."""
    path = lm_experiment(tmp_path, grid=GRID)
    exp = Experiment.load(load_config(path))
    theta = exp.model.transformer.wte.weight.detach().clone()
    assert exp.model.lm_head.weight is exp.model.transformer.wte.weight
    assert set(TIED) <= set(exp.model.state_dict())
    surface = plan_surface(load_config(path))
    with SurfaceFile.open(surface) as planned:
        directions = [{k: torch.as_tensor(v) for k, v in d.items()} for d in planned.directions()]
    assert all(TIED[0] in d and TIED[1] not in d for d in directions)
    for d in directions:
        assert torch.allclose(d[TIED[0]].norm(dim=1), theta.norm(dim=1), rtol=1e-12)
    plane = DirectionPlane(exp.model, directions)
    plane.move_to(0.5, -0.25)
    moved = theta + 0.5 * directions[0][TIED[0]] - 0.25 * directions[1][TIED[0]]
    for module in (exp.model.transformer.wte, exp.model.lm_head):
        assert torch.allclose(module.weight, moved, rtol=0, atol=1e-14)
    with torch.no_grad():  # the logits are the moved embedding's, in and out
        hidden = exp.model.transformer(exp.data.train_x[:2]).last_hidden_state
        assert torch.allclose(exp.model(exp.data.train_x[:2]), hidden @ moved.T, atol=1e-12)


def test_gpt2s_conv1d_filters_are_its_columns(tmp_path):
    """transformers' Conv1D stores its weight (inputs, outputs): a filter-normalized
    direction matches the norm of each output's column, and an nn.Linear-style row
    normalization would not."""
    path = lm_experiment(tmp_path, grid=GRID)
    exp = Experiment.load(load_config(path))
    with SurfaceFile.open(plan_surface(load_config(path))) as planned:
        (direction, _) = planned.directions()
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = f"transformer.h.0.{name}.weight"
        theta = dict(exp.model.named_parameters())[key].detach()
        d = torch.as_tensor(direction[key])
        assert torch.allclose(d.norm(dim=0), theta.norm(dim=0), rtol=1e-12), name
        assert not torch.allclose(d.norm(dim=1), theta.norm(dim=1), rtol=1e-3), name


@pytest.mark.parametrize("ignore, moves", [("biasbn", False), ("none", True)])
def test_layernorm_weights_stay_put_by_default(tmp_path, ignore, moves):
    """ignore: biasbn (the default) zeroes the direction of every 1-D tensor, LayerNorm
    scales and shifts included; ignore: none moves the scales (the shifts are still 0, and
    so is a filter-normalized direction of them)."""
    path = lm_experiment(tmp_path, grid=GRID, directions={"seed": 0, "ignore": ignore})
    exp = Experiment.load(load_config(path))
    norms = {n: p.detach().clone() for n, p in exp.model.named_parameters() if ".ln_" in n}
    attention = exp.model.transformer.h[0].attn.c_attn.weight.detach().clone()
    assert len(norms) == 6  # ln_1, ln_2, ln_f: weight and bias
    with SurfaceFile.open(plan_surface(load_config(path))) as planned:
        directions = planned.directions()
    plane = DirectionPlane(exp.model, directions)
    plane.move_to(1.0, 1.0)
    parameters = dict(exp.model.named_parameters())
    for name, before in norms.items():
        # A filter-normalized direction of a zero tensor (a fresh LayerNorm's shift) is 0.
        moved = moves and bool(before.any())
        assert torch.equal(parameters[name], before) != moved, name
    assert not torch.equal(parameters["transformer.h.0.attn.c_attn.weight"], attention)


def test_tiny_gpt2_trains_and_its_analysis_runs(tmp_path):
    """The trainer lowers the token cross-entropy of the tiny GPT-2; the analysis of its
    last checkpoint finds the dense Hessian's top eigenvalue and gives finite quantities."""
    path = lm_experiment(
        tmp_path,
        train={
            "checkpoint_dir": str(tmp_path / "checkpoints"),
            "optimizer": "adam",
            "lr": 0.05,
            "epochs": 3,
            "batch_size": 8,
            "seed": 0,
        },
        analysis={
            "output": str(tmp_path / "analysis.h5"),
            "quantities": ["top_eigenpairs", "trace", "gradient_overlap"],
            "top_k": 2,
            "tolerance": 1e-6,
            "trace_samples": 16,
        },
    )
    last = train(load_config(path))
    first = torch.load(tmp_path / "checkpoints" / "epoch_000.pt", weights_only=True)
    config = load_config(path, [f"model.checkpoint={last}"])
    exp = Experiment.load(config)
    inputs, targets = exp.data.train_x, exp.data.train_y
    with torch.no_grad():
        trained = token_loss(exp.model, inputs, targets).item()
        exp.model.load_state_dict(first["state_dict"])
        initial = token_loss(exp.model, inputs, targets).item()
    assert trained < initial - 0.1
    analysis = plan_analysis(config)
    run_job(analysis, "analysis", show_progress=False)
    with SurfaceFile.open(analysis) as done:
        maps = done.maps()
    exp = Experiment.load(config)
    spectrum = dense_spectrum(exp.model, inputs, targets)
    assert maps["top_eigenvalues"][0, 0] == pytest.approx(spectrum[-1], rel=1e-6)
    assert maps["train_loss"][0] == pytest.approx(trained, rel=1e-12)
    assert np.isfinite(maps["trace"][0]) and np.isfinite(maps["gradient_norm"][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_clustering_of_a_token_model_is_refused_at_plan(tmp_path, capsys, dtype):
    """GPT-2's logits are (samples, tokens, vocabulary), one per token: Fort & Ganguli's
    per-sample logit gradients are undefined, and plan says so before any quantity runs."""
    path = lm_experiment(
        tmp_path,
        evaluation={**LM["evaluation"], "dtype": dtype},
        analysis={
            "output": str(tmp_path / "analysis.h5"),
            "quantities": ["top_eigenpairs", "clustering"],
            "top_k": 2,
        },
    )
    fails_with(
        capsys,
        ["analyze", str(path)],
        "analysis.quantities: clustering needs (samples, classes) logits",
        "model gpt2 outputs shape (2, 4, 6) for 2 samples",
        "drop clustering",
    )
    assert not (tmp_path / "analysis.h5").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_vision_transformer_from_a_user_module(tmp_path, dtype):
    """``lm_plugins:tiny_vit`` (its own scaled_dot_product_attention) plans, maps and gives
    the dense Hessian's extreme eigenvalues at a corner of the grid (-0.5, -0.5)."""
    path = write_experiment(
        tmp_path,
        "vit",
        model={"name": "lm_plugins:tiny_vit", "kwargs": {"width": 4, "heads": 2}},
        data={"name": "lm_plugins:small_images", "kwargs": {}},
        grid={"x": {"min": -0.5, "max": 0.5, "num": 3}, "y": {"min": -0.5, "max": 0.5, "num": 3}},
        maps=["train_loss", "lambda_min", "lambda_max"],
        evaluation={"dtype": dtype, "batch_size": 10},
        hessian={"stride": 2, "tolerance": 1e-6 if dtype == "float64" else 1e-4},
    )
    surface = plan_surface(load_config(path))
    run_job(surface, "loss", show_progress=False)
    run_job(surface, "hessian", show_progress=False)
    with SurfaceFile.open(surface) as done:
        maps, directions, grid = done.maps(), done.directions(), done.grid
    exp = Experiment.load(load_config(path, ["evaluation.dtype=float64"]))
    inputs, targets = exp.data.train_x, exp.data.train_y
    DirectionPlane(exp.model, directions).move_to(*grid.coordinates(0))
    with torch.no_grad():
        loss = F.cross_entropy(exp.model(inputs), targets).item()
    spectrum = dense_spectrum(exp.model, inputs, targets, lambda z: F.cross_entropy(z, targets))
    top = np.abs(spectrum).max()
    within = 1e-3 if dtype == "float32" else 1e-6
    assert maps["train_loss"][0, 0] == pytest.approx(loss, rel=1e-6)
    assert abs(maps["lambda_min"][0, 0] - spectrum[0]) <= within * top
    assert abs(maps["lambda_max"][0, 0] - spectrum[-1]) <= within * top


class HeadTiedFirst(torch.nn.Module):
    """An output layer registered before the input embedding it shares its weight with,
    so that named_parameters names the tied weight ``head.weight``."""

    def __init__(self, vocabulary: int = 7, width: int = 4):
        super().__init__()
        self.head = torch.nn.Linear(width, vocabulary, bias=False)
        self.embed = torch.nn.Embedding(vocabulary, width)
        self.embed.weight = self.head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_a_tied_output_layer_has_no_softmax_gauge():
    """W + 1 c^T leaves the softmax of an untied last layer unchanged, not when W is also
    the input embedding: the loss moves, so no gauge may be projected out."""
    torch.manual_seed(0)
    model = HeadTiedFirst().double()
    tokens = torch.randint(7, (5, 3))
    labels = torch.randint(7, (5, 3))
    objective = TokenCrossEntropy()
    operator = HessianOperator(model, ["head.weight"], HeldSamples(tokens, labels), objective, 5)
    assert [name for name, _ in model.named_parameters()] == ["head.weight"]
    assert GaugeProjection.find(operator) is None
    with torch.no_grad():
        before = objective.mean(model(tokens), labels)
        model.head.weight += torch.randn(1, 4, dtype=torch.float64)  # every row + c
        assert abs(objective.mean(model(tokens), labels) - before) > 1e-3
