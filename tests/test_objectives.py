"""Objectives: a user's objective flows through the surface, the Hessian and the trace,
token cross-entropy averages over the unmasked tokens of the whole set, and a bad
objective is refused in one line naming evaluation.loss or evaluation.loss_kwargs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import BASE, CLUSTERS, MODELS, merge, surface_with_curvature, write_experiment
from test_bad_input import fails_with
from torch import nn
from torch.func import functional_call, hessian
from torch.nn import functional as F

from landscape import api
from landscape.config import ConfigError, load_config, parse_config
from landscape.curvature.operators import GaugeProjection, HessianOperator
from landscape.evaluate import evaluate
from landscape.experiment import Experiment
from landscape.objectives import CrossEntropy, TokenCrossEntropy
from landscape.parameters import DirectionPlane
from landscape.samples import HeldSamples
from landscape.store import SurfaceFile

DTYPES = ["float32", "float64"]
SMOOTHING = 0.3


def smoothed_hessian(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """The dense float64 Hessian of torch's own label-smoothed mean cross-entropy over all
    of ``model``'s parameters: the ground truth, independent of the plug-in's code."""
    model = model.double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        outputs = functional_call(model, dict(zip(names, pieces)), (inputs.double(),))
        return F.cross_entropy(outputs, targets, label_smoothing=SMOOTHING)

    return hessian(mean_loss)(flat).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_label_smoothing_plugin_flows_through_surface_hessian_and_trace(experiment, dtype):
    """The smooth (tanh) net, so that both trace estimates are tr(H) of the same loss."""
    network, _ = MODELS["tanh_mlp"]
    path = experiment(
        model=network,
        data=CLUSTERS,
        maps=["train_loss", "train_acc", "lambda_min", "lambda_max"],
        grid={"x": {"min": -0.5, "max": 0.5, "num": 3}, "y": {"min": -0.5, "max": 0.5, "num": 2}},
        evaluation={
            "dtype": dtype,
            "loss": "plugins:label_smoothed",
            "loss_kwargs": {"smoothing": SMOOTHING},
        },
        hessian={"tolerance": 1e-4},
        trace={"samples": 64},
    )
    surface = surface_with_curvature(path)

    exp = Experiment.load(load_config(path, ["evaluation.dtype=float64"]))
    inputs, targets = exp.data.train_x, exp.data.train_y
    with SurfaceFile.open(surface) as done:
        maps, directions, grid = done.maps(), done.directions(), done.grid
        _, trace = done.group("trace")
    plane = DirectionPlane(exp.model, directions)
    scale = 1e-6 if dtype == "float32" else 1e-12
    for point in range(grid.size):
        a, b = grid.coordinates(point)
        plane.move_to(a, b)
        with torch.no_grad():
            outputs = exp.model(inputs)
            loss = F.cross_entropy(outputs, targets, label_smoothing=SMOOTHING).item()
            accuracy = (outputs.argmax(1) == targets).double().mean().item()
        j, i = np.unravel_index(point, maps["train_loss"].shape)
        assert maps["train_loss"][j, i] == pytest.approx(loss, rel=scale)
        assert maps["train_acc"][j, i] == accuracy
        spectrum = np.linalg.eigvalsh(smoothed_hessian(exp.model, inputs, targets))
        top = np.abs(spectrum).max()
        assert abs(maps["lambda_min"][j, i] - spectrum[0]) <= 1e-3 * top
        assert abs(maps["lambda_max"][j, i] - spectrum[-1]) <= 1e-3 * top
    plane.move_to(0.0, 0.0)
    exact = np.trace(smoothed_hessian(exp.model, inputs, targets))
    for name in ("projection", "hutchinson"):
        assert abs(trace[f"{name}_mean"] - exact) <= trace[f"{name}_half_width"], name


class TokenModel(nn.Module):
    """Embedding and a linear head: (B, T) token ids in, (B, T, V) logits out."""

    def __init__(self, vocabulary: int = 7, width: int = 4):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocabulary, width), nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def padded_tokens(samples: int = 10, length: int = 6, vocabulary: int = 7, pad: int = -100):
    """Token ids and next-token-like labels, each sample padded after its own length."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocabulary, (samples, length), generator=generator)
    labels = torch.randint(vocabulary, (samples, length), generator=generator)
    lengths = torch.randint(1, length + 1, (samples,), generator=generator)
    labels[torch.arange(length)[None, :] >= lengths[:, None]] = pad
    return tokens, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pad", [-100, 0])
def test_token_cross_entropy_is_the_mean_over_unmasked_tokens_of_the_whole_set(dtype, pad):
    """Batches of 3 samples hold different numbers of unmasked tokens: the mean is not a
    mean of batch means. Loss, token accuracy and the Hessian agree with torch's
    flattened cross-entropy over the whole set."""
    torch.manual_seed(0)
    model = TokenModel().to(dtype)
    tokens, labels = padded_tokens(pad=pad)
    objective = TokenCrossEntropy(ignore_index=pad)
    with torch.no_grad():
        logits = model(tokens)
    flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
    expected = F.cross_entropy(flat_logits.double(), flat_labels, ignore_index=pad).item()
    kept = flat_labels != pad
    accuracy = (flat_logits.argmax(1)[kept] == flat_labels[kept]).double().mean().item()

    loss, found_accuracy = evaluate(model, HeldSamples(tokens, labels), 3, objective)
    assert objective.count(labels) == int(kept.sum()) < labels.numel()
    assert loss == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-13)
    assert found_accuracy == accuracy
    assert objective.mean(logits, labels).item() == pytest.approx(expected, rel=1e-6)

    names = [name for name, _ in model.named_parameters()]
    operator = HessianOperator(model.double(), names, HeldSamples(tokens, labels), objective, 3)
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        outputs = functional_call(model, dict(zip(names, pieces)), (tokens,))
        return F.cross_entropy(outputs.flatten(0, 1), flat_labels, ignore_index=pad)

    dense = hessian(mean_loss)(flat).numpy()
    vector = np.random.default_rng(0).normal(size=len(flat))
    np.testing.assert_allclose(operator @ vector, dense @ vector, rtol=0, atol=1e-12)
    gauge = GaugeProjection.find(operator)  # one shift of all V logits of a token
    assert gauge.layer == "head" and gauge.count == 4 + 1
    shift = torch.as_tensor(vector) - gauge(torch.as_tensor(vector))
    assert np.abs(dense @ shift.numpy()).max() <= 1e-12 * np.abs(dense).max()


def planned(tmp_path, **changes) -> str:
    """A small classification config with ``changes``, written to a file."""
    return str(write_experiment(tmp_path, **changes))


@pytest.mark.parametrize(
    "evaluation, fragments",
    [
        (
            {"loss": "hinge"},
            ["evaluation.loss: 'hinge' is not an objective", "cross_entropy, mse"],
        ),
        (
            {"loss_kwargs": {"smoothing": 0.1}},
            ["evaluation.loss_kwargs: {'smoothing': 0.1} do not fit evaluation.loss cross_entropy"],
        ),
        (
            {"loss_kwargs": {"label_smoothing": 1.5}},
            ["evaluation.loss_kwargs:", "label_smoothing must be in [0, 1) (got 1.5)"],
        ),
        ({"loss_kwargs": [0.1]}, ["evaluation.loss_kwargs: expected a mapping"]),
        (
            {"loss": "plugins:label_smoothed", "loss_kwargs": {"alpha": 1}},
            ["evaluation.loss_kwargs: plugins:label_smoothed(smoothing=0.1) cannot be called"],
        ),
        ({"loss": "plugins:no_such_objective"}, ["evaluation.loss: plugins has no attribute"]),
        (
            {"loss": "plugins:loss_returns_a_function"},
            ["evaluation.loss: plugins:loss_returns_a_function returned a function"],
        ),
        (
            {"loss": "plugins:loss_returns_a_mean"},
            ["evaluation.loss: plugins:loss_returns_a_mean returns torch.float64 of shape ()"],
        ),
        (
            {"loss": "plugins:loss_raises"},
            ["evaluation.loss plugins:loss_raises: ValueError: labels must be one-hot"],
        ),
        (
            {"loss": "mse"},
            ["evaluation.loss: 'mse' does not fit data", "integer class labels; use cross_entropy"],
        ),
    ],
)
def test_a_bad_objective_is_refused_in_one_line(tmp_path, capsys, evaluation, fragments):
    config = planned(tmp_path, evaluation=evaluation, maps=["train_loss", "test_loss"])
    fails_with(capsys, ["plan", config], *fragments)
    assert not (tmp_path / "exp.h5").exists()


def test_accuracy_maps_are_refused_for_a_built_in_at_load_and_for_a_plug_in_at_plan(
    tmp_path, capsys
):
    raw = merge(BASE, {"evaluation": {"loss": "mse"}})
    with pytest.raises(ConfigError, match="maps: accuracy is undefined for evaluation.loss 'mse'"):
        parse_config(yaml.safe_dump(raw))
    path = planned(
        tmp_path,
        data={"name": "plugins:regression", "kwargs": {}},
        model={"name": "mlp", "kwargs": {"hidden": [4]}},
        evaluation={"loss": "plugins:absolute_error"},
    )
    fails_with(
        capsys,
        ["plan", path],
        "maps: accuracy is undefined for evaluation.loss 'plugins:absolute_error'",
    )


def test_a_bad_objective_name_is_a_config_error_at_load():
    raw = merge(BASE, {"evaluation": {"loss": "hinge"}})
    with pytest.raises(ConfigError, match="evaluation.loss: 'hinge' is not an objective"):
        parse_config(yaml.safe_dump(raw))
    assert parse_config(yaml.safe_dump(BASE)).evaluation.loss_kwargs == {}  # older configs


def test_class_cross_entropy_refuses_token_labels_and_names_the_objective_that_takes_them():
    """(B, T) labels beside (B, T, C) logits would make F.cross_entropy read T as the class
    axis: silently wrong where T == C."""
    assert CrossEntropy().target_problem(torch.zeros(4, dtype=torch.int64)) is None
    problem = CrossEntropy().target_problem(torch.zeros(4, 6, dtype=torch.int64))
    assert "(4, 6)" in problem and "token_cross_entropy" in problem
    assert TokenCrossEntropy().target_problem(torch.zeros(4, 6, dtype=torch.int64)) is None


class CausalTokenModel(nn.Module):
    """Embedding, the running mean of the positions so far, a mixing layer and a head:
    the logits at position t depend on tokens 0..t, as in a causal language model, so
    whatever stands after a sample's end changes none of its kept logits."""

    def __init__(self, vocabulary: int = 7, width: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix, self.head = nn.Linear(width, width), nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(tokens)
        positions = torch.arange(1, tokens.shape[1] + 1, dtype=embedded.dtype)
        return self.head(torch.tanh(self.mix(embedded.cumsum(1) / positions[:, None])))


PAD = -100


def padded_sequences(samples: int = 10, length: int = 6, vocabulary: int = 7):
    """Token ids padded (id 0, label PAD) after each sample's own length, the labels, and
    the lengths."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocabulary, (samples, length), generator=generator)
    labels = torch.randint(vocabulary, (samples, length), generator=generator)
    lengths = torch.randint(1, length + 1, (samples,), generator=generator)
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    tokens[padding], labels[padding] = 0, PAD
    return tokens, labels, lengths


def unpadded_mean_loss(model, tokens, labels, lengths) -> torch.Tensor:
    """The ground truth: each sample run alone on its unpadded tokens, -log softmax of its
    labels written out, summed over every token and divided by the number of tokens."""
    total = 0
    for row, row_labels, length in zip(tokens, labels, lengths):
        logits = model(row[None, :length])[0]
        log_probabilities = logits - logits.exp().sum(-1, keepdim=True).log()
        total = total - log_probabilities[torch.arange(length), row_labels[:length]].sum()
    return total / lengths.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_token_cross_entropy_is_the_hand_computed_loss_at_every_batch_size(dtype):
    torch.manual_seed(0)
    model = CausalTokenModel().to(dtype)
    tokens, labels, lengths = padded_sequences()
    with torch.no_grad():
        expected = unpadded_mean_loss(model.double(), tokens, labels, lengths).item()
        model.to(dtype)
    objective = TokenCrossEntropy(ignore_index=PAD)
    assert objective.count(labels) == int(lengths.sum()) < labels.numel()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    for batch_size in (1, 3, 4, 10):
        loss, _ = evaluate(model, HeldSamples(tokens, labels), batch_size, objective)
        assert loss == pytest.approx(expected, rel=tolerance), batch_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_token_cross_entropy_hessian_is_the_dense_hessian_of_the_unpadded_loss(dtype):
    """The tool's HVP operator at batch sizes 3 and 10 against torch.func.hessian of the
    hand-computed loss over the unpadded sequences, in float64."""
    torch.manual_seed(0)
    model = CausalTokenModel().double()
    tokens, labels, lengths = padded_sequences()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(vector):
        pieces = (t.view(s) for t, s in zip(vector.split([s.numel() for s in shapes]), shapes))
        weights = dict(zip(names, pieces))

        def with_weights(inputs):
            return functional_call(model, weights, (inputs,))

        return unpadded_mean_loss(with_weights, tokens, labels, lengths)

    dense = hessian(mean_loss)(flat).numpy()
    model.to(dtype)
    vectors = np.random.default_rng(0).normal(size=(3, len(flat)))
    tolerance = (1e-5 if dtype == torch.float32 else 1e-13) * np.abs(dense).max()
    for batch_size in (3, 10):
        samples = HeldSamples(tokens, labels)
        operator = HessianOperator(
            model, names, samples, TokenCrossEntropy(ignore_index=PAD), batch_size
        )
        for vector in vectors:
            np.testing.assert_allclose(operator @ vector, dense @ vector, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_perplexity_maps_are_exp_of_the_stored_mean_cross_entropy(experiment, dtype):
    """Asked without its loss: the loss job stores the loss it derives from (test_loss is
    neither asked nor stored), and each map says what it is."""
    path = api.plan(
        experiment(maps=["train_perplexity", "test_acc"], evaluation={"dtype": dtype}),
        ["grid.x.num=3", "grid.y.num=2"],
    )
    assert api.run(path, progress=False) == 6
    result = api.read(path)
    assert set(result.maps) == {"train_perplexity", "train_loss", "test_acc"}
    loaded = Experiment.load(result.config, device="cpu")
    inputs, targets = loaded.data.train_x, loaded.data.train_y
    with SurfaceFile.open(path) as surface:
        plane = DirectionPlane(loaded.model, surface.directions())
        assert surface.description("train_perplexity").startswith("exp(train_loss): perplexity")
    for j, b in enumerate(result.grid.y):
        for i, a in enumerate(result.grid.x):
            plane.move_to(float(a), float(b))
            with torch.no_grad():
                loss = F.cross_entropy(loaded.model(inputs).double(), targets).item()
            found = result.maps["train_perplexity"][j, i]
            assert found == np.exp(result.maps["train_loss"][j, i])
            assert found == pytest.approx(np.exp(loss), rel=1e-6 if dtype == "float32" else 1e-13)
    assert "train_perplexity: 6 values" in api.status(path)


@pytest.mark.parametrize(
    "evaluation",
    [{"loss": "cross_entropy", "loss_kwargs": {"label_smoothing": 0.1}}, {"loss": "mse"}],
    ids=["label_smoothing", "mse"],
)
def test_perplexity_is_refused_at_load_for_a_built_in_loss_that_is_no_likelihood(evaluation):
    raw = merge(BASE, {"evaluation": evaluation, "maps": ["train_loss", "test_perplexity"]})
    with pytest.raises(ConfigError, match="maps: perplexity is exp of a mean negative log-lik"):
        parse_config(yaml.safe_dump(raw))


def test_perplexity_is_refused_at_plan_for_a_plug_in_that_does_not_declare_it(tmp_path, capsys):
    config = planned(
        tmp_path,
        evaluation={"loss": "plugins:label_smoothed"},
        maps=["train_loss", "train_perplexity"],
    )
    fails_with(
        capsys,
        ["plan", config],
        "maps: perplexity is exp of a mean negative log-likelihood, which evaluation.loss "
        "'plugins:label_smoothed' is not here",
        "drop *_perplexity",
    )
    assert not (tmp_path / "exp.h5").exists()
