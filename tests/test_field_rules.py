"""The field's further rules as configurations (DESIGN.md section 10), in float64.

Sign-concordant feedback (uSF, frSF, brSF) against sign(W) by hand, on an MLP and a conv net;
Kolen-Pollack's learned feedback against the forward update, and its convergence; DRTP's
target-driven term. The preset batteries elsewhere (transcriptions, ensembles, fingerprints,
bench) pick these presets up by iterating ``PRESETS``.
"""

from __future__ import annotations

import math

import pytest
import torch

from gfalign import MLP, FeedbackRule
from gfalign.alignment import angle, weight_alignment
from gfalign.models import build
from gfalign.rules import ConfigError, resolve

DT = torch.float64
SIZES = [7, 6, 5, 3]
CONV = {
    "input": [1, 8, 8],
    "activation": "tanh",
    "blocks": [
        {"conv": 3, "kernel": 3, "pool": "max:2"},  # a1 (3, 6, 6) -> h1 (3, 3, 3)
        {"conv": 2, "kernel": 2},  # a2 (2, 2, 2), flattened into the Linear block
        {"linear": 3},
    ],
}


def batch(n=9, features=7, classes=3, seed=0, shape=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *(shape or (features,)), generator=generator, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def xavier(shape):
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return math.sqrt(2.0 / ((shape[0] + shape[1]) * receptive))


def above_weights(rule, net):
    """Each hidden layer's above-term weight and the forward weight it stands in for."""
    blocks = net.blocks
    return {
        i: (rule.feedback(i, 0, net)["weight"], blocks[i].linear.weight)
        for i in range(1, len(blocks))
    }


# ------------------------------------------------------------------------ sign-concordant


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_usf_feedback_is_scale_times_the_sign_of_the_live_weights(model):
    net = MLP(SIZES, seed=0, dtype=DT) if model == "mlp" else build(CONV, seed=0, dtype=DT)
    rule = FeedbackRule("usf", net, dtype=DT)
    x, y = batch(shape=(1, 8, 8) if model == "conv" else None)
    for _ in range(2):
        for feedback, weight in above_weights(rule, net).values():
            expected = xavier(tuple(weight.shape)) * torch.sign(weight)
            assert torch.equal(feedback, expected)
        rule.sgd_step(net, x, y, lr=0.5)  # the weights move; the feedback follows them


def test_usf_deltas_by_hand_on_an_mlp():
    net = MLP(SIZES, seed=0, dtype=DT)
    x, y = batch()
    got = FeedbackRule("usf", net, dtype=DT).deltas(net, x, y).deltas
    cache = net.forward_cache(x)
    e = torch.softmax(cache.pre[-1], 1) - torch.nn.functional.one_hot(y, 3).to(DT)
    W = {i: layer.weight for i, layer in enumerate(net.layers, start=1)}
    d2 = (e @ (xavier(W[3].shape) * torch.sign(W[3]))) * (1 - cache.post[2] ** 2)
    d1 = (d2 @ (xavier(W[2].shape) * torch.sign(W[2]))) * (1 - cache.post[1] ** 2)
    for i, expected in ((1, d1), (2, d2)):
        assert torch.allclose(got[i], expected, atol=1e-13, rtol=0), i


def test_usf_on_a_positive_network_is_fa_with_scaled_ones():
    net = MLP(SIZES, seed=0, dtype=DT)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.abs_().add_(1e-3)
    fa = FeedbackRule("fa", net, dtype=DT)
    for i in range(1, 3):
        weight = net.layers[i].weight
        fa.set_matrix(i, 0, xavier(tuple(weight.shape)) * torch.ones_like(weight))
    x, y = batch()
    usf = FeedbackRule("usf", net, dtype=DT).deltas(net, x, y).deltas
    for i, expected in fa.deltas(net, x, y).deltas.items():
        assert torch.allclose(usf[i], expected, atol=1e-14, rtol=0), i


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_frsf_magnitudes_are_drawn_once_and_are_fas_draws(model):
    make = (
        (lambda: MLP(SIZES, seed=0, dtype=DT))
        if model == "mlp"
        else (lambda: build(CONV, seed=0, dtype=DT))
    )
    net = make()
    frsf, fa = (
        FeedbackRule("frsf", net, seed=4, dtype=DT),
        FeedbackRule("fa", net, seed=4, dtype=DT),
    )
    x, y = batch(shape=(1, 8, 8) if model == "conv" else None)
    for _ in range(3):
        for i, (feedback, weight) in above_weights(frsf, net).items():
            magnitude = fa.feedback(i, 0)["weight"].abs()  # |R|: the same draw as fa's B
            assert torch.equal(feedback, magnitude * torch.sign(weight))
        frsf.sgd_step(net, x, y, lr=0.5)


def test_brsf_redraws_every_step_reproducibly_and_resumes_exactly():
    def run(steps, rule=None, net=None):
        net = net or MLP(SIZES, seed=0, dtype=DT)
        rule = rule or FeedbackRule("brsf", net, seed=1, dtype=DT)
        x, y = batch()
        seen = []
        for _ in range(steps):
            feedback, weight = above_weights(rule, net)[1]
            assert torch.equal(torch.sign(feedback), torch.sign(weight))
            seen.append(feedback.abs().clone())
            rule.sgd_step(net, x, y, lr=0.1)
        return net, rule, seen

    net, rule, seen = run(3)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    again = run(3)
    assert all(torch.equal(a, b) for a, b in zip(seen, again[2], strict=True))
    # Two steps, then a fresh rule and network loaded from their state: the third step agrees.
    first_net, first_rule, _ = run(2)
    resumed_net = MLP(SIZES, seed=5, dtype=DT)
    resumed_net.load_state_dict(first_net.state_dict())
    resumed_rule = FeedbackRule("brsf", resumed_net, seed=1, dtype=DT)
    resumed_rule.load_state_dict(first_rule.state_dict())
    _, _, third = run(1, resumed_rule, resumed_net)
    assert torch.equal(third[0], seen[2])


def test_s1_with_sign_concordant_above_terms_is_data():
    config = {
        "name": "s1-usf",
        "template": {
            "top": {"terms": ["direct"]},
            "all": {"terms": ["direct", {"kind": "above", "mode": "usf"}]},
        },
    }
    net = MLP(SIZES, seed=0, dtype=DT)
    rule = FeedbackRule(config, net, dtype=DT)
    x, y = batch()
    got = rule.deltas(net, x, y).deltas
    plain = FeedbackRule("s1", net, dtype=DT)
    W2 = net.layers[1].weight
    plain.set_matrix(1, 1, xavier(tuple(W2.shape)) * torch.sign(W2))
    for i, expected in plain.deltas(net, x, y).deltas.items():
        assert torch.allclose(got[i], expected, atol=1e-14, rtol=0), i


# ------------------------------------------------------------------------ Kolen-Pollack


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [("SGD", {}), ("SGD", {"momentum": 0.9}), ("Adam", {}), ("RMSprop", {})],
)
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_kp_feedback_takes_the_forward_update(optimizer, options, decay):
    net = MLP(SIZES, seed=0, dtype=DT)
    rule = FeedbackRule(
        {
            "name": "kp",
            "template": {"all": {"terms": [{"kind": "above", "mode": f"kp:decay={decay}"}]}},
        },
        net,
        dtype=DT,
    )
    step = getattr(torch.optim, optimizer)(
        [*net.parameters(), *rule.parameters()], lr=0.05, **options
    )
    x, y = batch()
    for _ in range(4):
        before = {i: (b.clone(), w.clone()) for i, (b, w) in above_weights(rule, net).items()}
        rule.backward(net, x, y)
        step.step()
        for i, (feedback, weight) in above_weights(rule, net).items():
            b0, w0 = before[i]
            # Delta theta~ + decay theta~ = Delta theta + decay theta: the same step
            assert torch.allclose(
                feedback - (1 - decay) * b0, weight - (1 - decay) * w0, atol=1e-12, rtol=0
            ), i
            assert not torch.equal(feedback, b0)


@pytest.mark.parametrize("model", ["mlp", "conv", "mlp-below"])
@pytest.mark.parametrize("decay", [0.0, 1e-4, 0.05])
def test_kp_in_place_sgd_equals_backward_and_the_optimizer(model, decay):
    """sgd_step's update (the forward step fused, the mirror made from the stepped parameter
    and the shrunk difference) against backward, the separate decay and torch's SGD, on Linear
    and Conv2d blocks, with and without decay."""
    config = {
        "name": "kp",
        "template": {"all": {"terms": [{"kind": "above", "mode": f"kp:decay={decay}"}]}},
    }
    if model == "mlp-below":  # a below term's mirror is kept transposed, B_down = W~^T
        mode = f"kp:decay={decay}"
        config = {
            "name": "kp-below",
            "layers": {
                1: {"terms": ["direct"]},
                2: {"terms": ["direct", {"kind": "below", "mode": mode}]},
            },
        }
    if model.startswith("mlp"):
        nets = [MLP(SIZES, seed=0, dtype=DT) for _ in range(2)]
        x, y = batch()
    else:
        nets = [build(CONV, seed=0, dtype=DT) for _ in range(2)]
        x, y = batch(shape=(1, 8, 8))
    rules = [FeedbackRule(config, net, seed=3, dtype=DT) for net in nets]
    optimizer = torch.optim.SGD([*nets[1].parameters(), *rules[1].parameters()], lr=0.1)
    for _ in range(3):
        rules[0].sgd_step(nets[0], x, y, lr=0.1)
        rules[1].backward(nets[1], x, y)
        optimizer.step()
    for a, b in zip(
        [*nets[0].parameters(), *rules[0].parameters()],
        [*nets[1].parameters(), *rules[1].parameters()],
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)


def test_kp_feedback_converges_to_the_forward_weights():
    net = MLP([7, 16, 16, 3], seed=0, dtype=DT)
    config = {
        "name": "kp",
        "template": {"all": {"terms": [{"kind": "above", "mode": "kp:decay=0.01"}]}},
    }
    rule = FeedbackRule(config, net, dtype=DT)
    start = weight_alignment(net, rule)
    generator = torch.Generator().manual_seed(0)
    x, y = batch(n=256)
    for _ in range(600):  # minibatches of a random-label task, so the updates keep coming
        index = torch.randint(0, 256, (32,), generator=generator)
        rule.sgd_step(net, x[index], y[index], lr=0.2)
    end = weight_alignment(net, rule)
    assert start["weight_angle_1_above"] > 60 and start["weight_angle_2_above"] > 60
    for i in (1, 2):
        assert end[f"weight_angle_{i}_above"] < 10, end
        feedback, weight = above_weights(rule, net)[i]
        assert angle(feedback, weight) == pytest.approx(end[f"weight_angle_{i}_above"])


def test_kp_feedback_is_state_and_is_saved():
    net = MLP(SIZES, seed=0, dtype=DT)
    rule = FeedbackRule("kp", net, dtype=DT)
    names = [name for name, _ in rule.named_parameters()]
    assert names and all(name in rule.state_dict() for name in names)
    x, y = batch()
    rule.sgd_step(net, x, y, lr=0.1)
    fresh = FeedbackRule("kp", net, seed=9, dtype=DT)
    fresh.load_state_dict(rule.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(rule.parameters(), fresh.parameters(), strict=True)
    )


def test_two_decays_for_one_block_are_refused():
    config = {
        "name": "two",
        "layers": {
            1: {
                "terms": [
                    "direct",
                    {"kind": "above", "source": "direct-only", "mode": "kp:decay=0.2"},
                ]
            },
            2: {
                "terms": [
                    {"kind": "below", "source": "direct-only", "mode": "kp:decay=0.1"},
                    "direct",
                ]
            },
        },
    }
    with pytest.raises(ConfigError, match="block 2"):
        FeedbackRule(config, SIZES)


# ---------------------------------------------------------------------------------- DRTP


def test_drtp_deltas_are_the_targets_projection_and_ignore_the_output():
    net = MLP(SIZES, seed=0, dtype=DT)
    rule = FeedbackRule("drtp", net, dtype=DT)
    x, y = batch()
    got = rule.deltas(net, x, y).deltas
    cache = net.forward_cache(x)
    target = torch.nn.functional.one_hot(y, 3).to(DT)
    for i in (1, 2):
        expected = (target @ rule.matrix(i, 0)) * (1 - cache.post[i] ** 2)
        assert torch.allclose(got[i], expected, atol=1e-14, rtol=0), i
    with torch.no_grad():
        net.layers[-1].weight.mul_(-3.0)  # another output error, the same hidden deltas
    moved = rule.deltas(net, x, y).deltas
    assert all(torch.equal(moved[i], got[i]) for i in (1, 2))
    assert not torch.equal(moved[3], got[3])


def test_drtp_combines_with_the_error_terms():
    config = {"name": "mix", "template": {"all": {"terms": ["direct", "direct:target"]}}}
    net = MLP(SIZES, seed=0, dtype=DT)
    rule = FeedbackRule(config, net, dtype=DT)
    x, y = batch()
    cache = net.forward_cache(x)
    e = torch.softmax(cache.pre[-1], 1) - torch.nn.functional.one_hot(y, 3).to(DT)
    target = torch.nn.functional.one_hot(y, 3).to(DT)
    got = rule.deltas(net, x, y).deltas
    for i in (1, 2):
        mixed = (e @ rule.matrix(i, 0) + target @ rule.matrix(i, 1)) / 2
        assert torch.allclose(got[i], mixed * (1 - cache.post[i] ** 2), atol=1e-14), i


def test_drtp_on_an_autoencoder_is_refused():
    net = MLP([6, 4, 6], "sigmoid", "autoencoder", dtype=DT)
    with pytest.raises(ConfigError, match="labels"):
        FeedbackRule("drtp", net, dtype=DT)


# ----------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("term", "problem"),
    [
        ({"kind": "direct", "mode": "usf"}, "takes no feedback mode"),
        ({"kind": "backprop", "mode": "kp"}, "takes no feedback mode"),
        ({"kind": "above", "mode": "sign"}, "unknown feedback mode 'sign'"),
        ({"kind": "above", "mode": "kp:decay=-1"}, "decay = -1 is out of range"),
        ({"kind": "above", "mode": "usf:decay=1"}, "unknown parameter 'decay'"),
        ({"kind": "above", "mode": "kp:decay"}, "not key=value"),
        ("direct:targets", "unknown error 'targets'"),
    ],
)
def test_bad_modes_and_signals_are_refused_in_one_line(term, problem):
    config = {"name": "bad", "template": {"all": {"terms": [term]}}}
    with pytest.raises(ConfigError, match=problem) as refused:
        resolve(config, 2)
    assert "\n" not in str(refused.value)


def test_members_with_other_modes_do_not_stack():
    with pytest.raises(ValueError, match="feedback modes"):
        FeedbackRule.stack([FeedbackRule("fa", SIZES), FeedbackRule("usf", SIZES)])


def test_a_mode_round_trips_through_data():
    rule = resolve("kp", 3)
    again = resolve(rule.to_data(), 3)
    assert again.layers == rule.layers
