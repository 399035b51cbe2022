"""Every rule on block models (a conv net, a model holding a user module), in float64.

The reference is DESIGN.md section 9's table transcribed term by term, every Jacobian product
taken by autograd at the forward pass's point; it shares nothing with the engine's plan.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional

from block_models import CLASSES, DTYPE, user_net
from gfalign.engine import FeedbackRule
from gfalign.models import build, from_modules
from gfalign.rules import PRESETS, ConfigError

CONV_NET = {
    "input": [1, 10, 10],
    "activation": "tanh",
    "weight_init": "xavier_uniform",
    "blocks": [
        {"conv": 3, "kernel": 3, "pool": "max:2"},  # a1 (3, 8, 8), h1 (3, 4, 4)
        {"conv": 4, "kernel": 2, "padding": 1, "pool": "avg:2", "activation": "sigmoid"},
        {"linear": 6},  # after a flatten of (4, 2, 2)
        {"linear": CLASSES},
    ],
}


def conv_net():
    return build(CONV_NET, seed=3, dtype=DTYPE)


MODELS = {"conv net": conv_net, "user module": user_net}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(11)
    x = torch.rand(6, 1, 10, 10, generator=generator, dtype=DTYPE)
    y = torch.randint(0, CLASSES, (6,), generator=generator)
    return x, y


# ------------------------------------------------------------------------- the transcription


def transcribe(net, rule, x, y) -> dict[int, torch.Tensor]:
    """Every delta of ``rule`` by DESIGN.md section 9, with autograd for each product."""
    blocks, L = net.blocks, net.depth
    a, z, h = {}, {}, {0: x}
    for i, block in enumerate(blocks, start=1):
        a[i] = block.linear(h[i - 1]).detach()
        if i < L:
            z[i] = block.activation.function(a[i])
            h[i] = tail(net, i)(z[i]).detach()
    e = torch.softmax(a[L], 1) - functional.one_hot(y, CLASSES).to(DTYPE)

    def tail_vjp(i, g):
        point = z[i].clone().requires_grad_(True)
        return torch.autograd.grad(tail(net, i)(point), point, g)[0]

    def tail_jvp(i, v):
        return torch.autograd.functional.jvp(tail(net, i), z[i], v)[1]

    def part(j, params):
        return lambda inputs: functional_call(blocks[j - 1].linear, params, (inputs,))

    def part_vjp(j, params, g):
        point = h[j - 1].clone().requires_grad_(True)
        return torch.autograd.grad(part(j, params)(point), point, g)[0]

    def part_jvp(j, params, v):
        return torch.autograd.functional.jvp(part(j, params), h[j - 1], v)[1]

    def slope(i, g):  # g * f'(a^i)
        point = a[i].clone().requires_grad_(True)
        return torch.autograd.grad(blocks[i - 1].activation.function(point), point, g)[0]

    def own(j):
        return dict(blocks[j - 1].linear.named_parameters())

    def value(i, k, term):
        feedback = {} if term.kind == "backprop" else rule.feedback(i, k)
        if term.kind == "direct":
            D = feedback["matrix"]  # (classes, numel)
            if term.error == "output":
                return (e @ D).view(a[i].shape)
            if term.error == "target":
                return (functional.one_hot(y, CLASSES).to(DTYPE) @ D).view(a[i].shape)
            one_hot = functional.one_hot(y, CLASSES).to(DTYPE)
            if term.error == "auxiliary-pre":  # the classifier reads a^i
                e_i = torch.softmax(a[i].flatten(1) @ D.t(), 1) - one_hot
                return (e_i @ D).view(a[i].shape)
            if term.error != "auxiliary":
                raise AssertionError(f"no transcription of signal {term.error!r}: write one here")
            e_i = torch.softmax(h[i].flatten(1) @ D.t(), 1) - one_hot
            return tail_vjp(i, (e_i @ D).view(h[i].shape))
        if term.kind == "backprop":
            return tail_vjp(i, part_vjp(i + 1, own(i + 1), delta(i + 1)))
        if term.kind == "above":
            source = delta(i + 1) if term.source == "final" or i + 1 == L else only(i + 1)
            return tail_vjp(i, part_vjp(i + 1, feedback, source))
        if term.kind == "below":
            source = delta(i - 1) if term.source == "final" else only(i - 1)
            return part_jvp(i, feedback, tail_jvp(i - 1, source))
        if term.kind == "tiled":  # e on every position of a^(i+1), kernel of CLASSES outputs
            tiled = e.view(*e.shape, *(1,) * (a[i + 1].dim() - 2)).expand(
                len(e), CLASSES, *a[i + 1].shape[2:]
            )
            kernel = {"weight": feedback["weight"], "bias": torch.zeros(CLASSES, dtype=DTYPE)}
            return tail_vjp(i, part_vjp(i + 1, kernel, tiled))
        raise AssertionError(f"no transcription of a {term.kind!r} term: write one here")

    deltas = {L: e}

    def only(j):
        layer = rule.config.layer(j)
        (k,) = [k for k, term in enumerate(layer.terms) if term.kind == "direct"]
        return slope(j, value(j, k, layer.terms[k]))

    def delta(i):
        if i not in deltas:
            layer = rule.config.layer(i)
            terms = zip(layer.terms, layer.coefficients(), strict=True)
            total = sum(c * value(i, k, term) for k, (term, c) in enumerate(terms))
            deltas[i] = slope(i, total)
        return deltas[i]

    for i in range(1, L):
        delta(i)
    return dict(sorted(deltas.items()))


def tail(net, i):
    return nn.Sequential(*net.blocks[i - 1].tail.modules)


def grads_of(net):
    return [p.grad.clone() for p in net.parameters()]


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("model", list(MODELS))
def test_bp_equals_autograd(model, batch):
    net, (x, y) = MODELS[model](), batch
    rule = FeedbackRule("bp", net, seed=0, dtype=DTYPE)
    rule.backward(net, x, y, reduction="mean")
    expected = torch.autograd.grad(functional.cross_entropy(net(x), y), list(net.parameters()))
    for got, reference in zip(grads_of(net), expected, strict=True):
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_equals_its_transcription(model, preset, batch):
    net, (x, y) = MODELS[model](), batch
    if preset == "dfa-conv" and model == "user module":  # its kernels stand for Conv2d, Linear
        with pytest.raises(ConfigError, match="neither a Linear nor a Conv2d"):
            FeedbackRule(preset, net, seed=1, dtype=DTYPE)
        return
    rule = FeedbackRule(preset, net, seed=1, dtype=DTYPE)
    step = rule.deltas(net, x, y)
    expected = transcribe(net, rule, x, y)
    assert sorted(step.deltas) == sorted(expected)
    for i, reference in expected.items():
        assert step.deltas[i].shape == reference.shape, i
        torch.testing.assert_close(step.deltas[i], reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
def test_parameter_gradients_are_each_blocks_own_vjp(model, batch):
    """grad theta_i = J_theta^T d^i at the block's detached input, for every block."""
    net, (x, y) = MODELS[model](), batch
    rule = FeedbackRule("s1", net, seed=2, dtype=DTYPE)
    step = rule.backward(net, x, y, reduction="sum")
    cache = net.forward_cache(x)
    for i, block in enumerate(net.blocks, start=1):
        params = list(block.linear.parameters())
        expected = torch.autograd.grad(block.linear(cache.post[i - 1]), params, step.deltas[i])
        for parameter, reference in zip(params, expected, strict=True):
            torch.testing.assert_close(parameter.grad, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
def test_fa_with_the_forward_parameters_is_bp(model, batch):
    net, (x, y) = MODELS[model](), batch
    bp = FeedbackRule("bp", net, dtype=DTYPE).deltas(net, x, y).deltas
    fa = FeedbackRule("fa", net, dtype=DTYPE)
    for i in range(1, net.depth):
        forward = dict(net.blocks[i].linear.named_parameters())  # block i + 1's
        fa.set_feedback(i, 0, {name: forward[name].detach() for name in fa.feedback(i, 0)})
    got = fa.deltas(net, x, y).deltas
    for i in bp:
        torch.testing.assert_close(got[i], bp[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", list(MODELS))
def test_dfa_aux_is_each_blocks_local_loss_gradient(model, batch):
    net, (x, y) = MODELS[model](), batch
    rule = FeedbackRule("dfa-aux", net, seed=4, dtype=DTYPE)
    deltas = rule.deltas(net, x, y).deltas
    cache = net.forward_cache(x)
    for i in range(1, net.depth):
        D = rule.feedback(i, 0)["matrix"]
        a = cache.pre[i - 1].clone().requires_grad_(True)
        h = tail(net, i)(net.blocks[i - 1].activation.function(a))
        local = functional.cross_entropy(h.flatten(1) @ D.t(), y, reduction="sum")
        torch.testing.assert_close(deltas[i], torch.autograd.grad(local, a)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
def test_an_auxiliary_classifier_on_a_reads_each_blocks_pre_activation(model, batch):
    """``direct:auxiliary-pre`` on blocks: logits flatten(a^i) (D^i)^T, the value in a^i's
    shape, no tail to go back through; d^i = (e^i D^i) * f'(a^i)."""
    net, (x, y) = MODELS[model](), batch
    config = {"name": "dfa-aux-pre", "template": {"all": {"terms": ["direct:auxiliary-pre"]}}}
    rule = FeedbackRule(config, net, seed=4, dtype=DTYPE)
    deltas = rule.deltas(net, x, y).deltas
    cache = net.forward_cache(x)
    for i in range(1, net.depth):
        D = rule.feedback(i, 0)["matrix"]
        a = cache.pre[i - 1].clone().requires_grad_(True)
        assert D.shape[1] == a[0].numel()  # numel(a^i) columns, not numel(h^i)
        local = functional.cross_entropy(a.flatten(1) @ D.t(), y, reduction="sum")
        (error,) = torch.autograd.grad(local, a)
        (slope,) = torch.autograd.grad(net.blocks[i - 1].activation.function(a).sum(), a)
        torch.testing.assert_close(deltas[i], error * slope, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", ["fa", "dfa", "s1", "s3"])
def test_feedback_rules_differ_from_bp(model, preset, batch):
    net, (x, y) = MODELS[model](), batch
    bp = FeedbackRule("bp", net, dtype=DTYPE).deltas(net, x, y).deltas
    other = FeedbackRule(preset, net, dtype=DTYPE).deltas(net, x, y).deltas
    assert not torch.allclose(other[1], bp[1], atol=1e-6)


def test_invalid_combinations_are_refused(batch):
    net, (x, y) = conv_net(), batch
    autoencoder = build(
        {**CONV_NET, "blocks": [*CONV_NET["blocks"][:-1], {"linear": 100}]},
        "autoencoder",
        dtype=DTYPE,
    )
    with pytest.raises(ConfigError, match="auxiliary errors, which need class labels"):
        FeedbackRule("s1-aux", autoencoder, dtype=DTYPE)
    rule = FeedbackRule("s1", net, dtype=DTYPE)
    with pytest.raises(ConfigError, match=r"batch of shape \(6, 100\).*\(N, 1, 10, 10\)"):
        rule.deltas(net, x.flatten(1), y)
    with pytest.raises(ConfigError, match="was built for another model"):
        rule.deltas(user_net(), x, y)
    with pytest.raises(ConfigError, match="was built for another model"):  # an MLP's rule
        FeedbackRule("s1", [100, 6, 5], dtype=DTYPE).deltas(net, x.flatten(1), y)
    with pytest.raises(
        ConfigError,
        match=r"layer 1, term 0 \(above\(d\^\(i\+1\)\)\): feedback 'weight' of shape \(2, 2\)",
    ):
        FeedbackRule("fa", net, dtype=DTYPE).set_feedback(1, 0, {"weight": torch.zeros(2, 2)})


def test_block_members_of_an_ensemble_train_like_their_own_runs():
    """Block models do not stack: an ensemble trains them one after the other, each exactly
    its own run."""
    from gfalign.data import Dataset, Split
    from gfalign.ensemble import EnsembleTrainer
    from gfalign.train import TrainConfig, Trainer

    generator = torch.Generator().manual_seed(5)

    def split(n):
        x = torch.rand(n, 1, 10, 10, generator=generator, dtype=DTYPE)
        return Split(x, torch.randint(0, CLASSES, (n,), generator=generator))

    data = Dataset("random", split(24), split(8))
    configs = [
        TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="adam", seed=s) for s in (0, 1)
    ]

    def parts():
        nets = [build(CONV_NET, seed=s, dtype=DTYPE) for s in (0, 1)]
        return nets, [FeedbackRule("s1", net, seed=s, dtype=DTYPE) for s, net in enumerate(nets)]

    ensemble = EnsembleTrainer(*parts(), data, configs)
    ensemble.fit()
    for member, net, rule, config in zip(ensemble.members, *parts(), configs, strict=True):
        alone = Trainer(net, rule, data, config)
        alone.fit()
        for a, b in zip(member.net.parameters(), alone.net.parameters(), strict=True):
            assert torch.equal(a, b)
        assert member.history[-1]["test_loss"] == alone.history[-1]["test_loss"]


def test_a_term_a_user_module_cannot_take_is_refused_when_the_rule_is_made():
    class Opaque(nn.Module):  # leaves torch for numpy: no Jacobian products through it
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))

        def forward(self, x):
            return torch.from_numpy(x.detach().numpy() @ self.w.detach().numpy().T)

    modules = [nn.Linear(5, 4, dtype=DTYPE), nn.Tanh(), Opaque(), nn.Tanh()]
    net = from_modules([*modules, nn.Linear(3, 2, dtype=DTYPE)], input_shape=(5,))
    FeedbackRule("dfa", net, dtype=DTYPE)  # direct terms never run the module backwards
    with pytest.raises(ConfigError, match=r"layer 1, term 0 \(above\): block 2's Opaque cannot"):
        FeedbackRule("fa", net, dtype=DTYPE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("preset", ["bp", "fa", "dfa-aux", "s3"])
def test_every_term_on_cuda_equals_the_cpu(model, preset, batch):
    """The whole step on the GPU, data and parameters resident there, in float64."""
    net, (x, y) = MODELS[model](), batch
    rule = FeedbackRule(preset, net, seed=6, dtype=DTYPE)
    expected = rule.backward(net, x, y, reduction="sum").deltas
    grads = grads_of(net)
    net.cuda(), rule.cuda()
    got = rule.backward(net, x.cuda(), y.cuda(), reduction="sum").deltas
    for i, reference in expected.items():
        assert got[i].is_cuda
        torch.testing.assert_close(got[i].cpu(), reference, rtol=0, atol=1e-10)
    for parameter, reference in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(parameter.grad.cpu(), reference, rtol=0, atol=1e-10)
