"""Every rule checked numerically in float64 against autograd or a hand computation."""

import pytest
import torch

from gfalign import MLP, PRESETS, FeedbackRule
from gfalign.network import ACTIVATIONS

DT = torch.float64


def batch(sizes, n=7, seed=0, labels=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, sizes[0], generator=generator, dtype=DT)
    y = torch.randint(0, sizes[-1], (n,), generator=generator)
    return x, (y if labels else x)


def autograd_gradients(net, x, target, loss_fn):
    net.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), target)
    loss.backward()
    grads = [(layer.weight.grad.clone(), layer.bias.grad.clone()) for layer in net.layers]
    net.zero_grad(set_to_none=True)
    return loss.detach(), grads


def rule_gradients(rule, net, x, target, reduction="mean"):
    step = rule.backward(net, x, target, reduction=reduction)
    return step, [(layer.weight.grad.clone(), layer.bias.grad.clone()) for layer in net.layers]


def cross_entropy(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels)


def half_squared_error(logits, x):
    return 0.5 * (torch.sigmoid(logits) - x).square().sum(dim=1).mean()


def assert_close(actual, expected, tol=1e-10):
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual - expected).abs().max()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("sizes", [[6, 5, 4, 3], [6, 5, 4, 5, 3], [6, 4, 3]])
def test_bp_equals_autograd_cross_entropy(activation, sizes):
    net = MLP(sizes, activation, seed=1, dtype=DT)
    rule = FeedbackRule("bp", sizes, dtype=DT)
    x, y = batch(sizes)
    loss, expected = autograd_gradients(net, x, y, cross_entropy)
    step, got = rule_gradients(rule, net, x, y)
    assert_close(step.loss, loss)
    for (gw, gb), (ew, eb) in zip(got, expected, strict=True):
        assert_close(gw, ew)
        assert_close(gb, eb)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_bp_equals_autograd_autoencoder(activation):
    sizes = [6, 4, 3, 6]
    net = MLP(sizes, activation, objective="autoencoder", seed=2, dtype=DT)
    rule = FeedbackRule("bp", sizes, dtype=DT)
    x, _ = batch(sizes)
    loss, expected = autograd_gradients(net, x, x, half_squared_error)
    step, got = rule_gradients(rule, net, x, torch.empty(0))
    assert_close(step.loss, loss)
    for (gw, gb), (ew, eb) in zip(got, expected, strict=True):
        assert_close(gw, ew)
        assert_close(gb, eb)


def test_autoencoder_error_is_the_papers_expression():
    """e = (x_hat - x) * x_hat * (1 - x_hat), the gradient of 0.5 ||x_hat - x||^2 per example."""
    sizes = [5, 3, 5]
    net = MLP(sizes, "sigmoid", objective="autoencoder", seed=3, dtype=DT)
    x, _ = batch(sizes)
    step = FeedbackRule("dfa", sizes, dtype=DT).deltas(net, x, torch.empty(0))
    x_hat = torch.sigmoid(net(x))
    assert_close(step.deltas[2], (x_hat - x) * x_hat * (1 - x_hat))
    logits = net(x).detach().requires_grad_(True)
    (0.5 * (torch.sigmoid(logits) - x).square().sum()).backward()
    assert_close(step.deltas[2], logits.grad)


def test_sum_reduction_is_n_times_mean():
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, seed=1, dtype=DT)
    rule = FeedbackRule("s1", sizes, dtype=DT)
    x, y = batch(sizes, n=9)
    _, mean = rule_gradients(rule, net, x, y, "mean")
    _, total = rule_gradients(rule, net, x, y, "sum")
    for (mw, mb), (tw, tb) in zip(mean, total, strict=True):
        assert_close(tw, 9 * mw)
        assert_close(tb, 9 * mb)


@pytest.mark.parametrize("sizes", [[6, 5, 4, 3], [6, 5, 4, 5, 3]])
def test_fa_with_b_equal_w_is_bp(sizes):
    net = MLP(sizes, "tanh", seed=4, dtype=DT)
    fa = FeedbackRule("fa", sizes, dtype=DT)
    for i in range(1, len(sizes) - 1):
        fa.set_matrix(i, 0, net.weight(i + 1).detach())
    x, y = batch(sizes)
    _, expected = rule_gradients(FeedbackRule("bp", sizes, dtype=DT), net, x, y)
    _, got = rule_gradients(fa, net, x, y)
    for (gw, gb), (ew, eb) in zip(got, expected, strict=True):
        assert_close(gw, ew)
        assert_close(gb, eb)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dfa_one_hidden_layer_with_d_equal_w_is_bp(activation):
    sizes = [6, 5, 3]
    net = MLP(sizes, activation, seed=5, dtype=DT)
    dfa = FeedbackRule("dfa", sizes, dtype=DT)
    dfa.set_matrix(1, 0, net.weight(2).detach())
    x, y = batch(sizes)
    _, expected = autograd_gradients(net, x, y, cross_entropy)
    _, got = rule_gradients(dfa, net, x, y)
    for (gw, gb), (ew, eb) in zip(got, expected, strict=True):
        assert_close(gw, ew)
        assert_close(gb, eb)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_dfa_aux_is_the_gradient_of_each_layer_local_loss(activation):
    """d^i = d/da^i CE(softmax(h^i (D^i)^T), Y) with D^i frozen: each layer learns on its own."""
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, activation, seed=6, dtype=DT)
    rule = FeedbackRule("dfa-aux", sizes, dtype=DT)
    x, y = batch(sizes)
    step = rule.deltas(net, x, y)
    h = x
    for i in (1, 2):
        a = (h @ net.weight(i).T + net.bias(i)).detach().requires_grad_(True)
        local = cross_entropy(net.activation.function(a) @ rule.matrix(i, 0).T, y)
        # Summed over the batch: deltas are per-example gradients.
        (local * len(x)).backward()
        assert_close(step.deltas[i], a.grad)
        assert_close(step.auxiliary_losses[i], local.detach())
        h = net.activation.function(a.detach())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_an_auxiliary_classifier_on_a_reads_the_pre_activation(activation):
    """``direct:auxiliary-pre``: e^i = softmax(a^i (D^i)^T) - y, d^i = (e^i D^i) * f'(a^i)."""
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, activation, seed=6, dtype=DT)
    config = {"name": "dfa-aux-pre", "template": {"all": {"terms": ["direct:auxiliary-pre"]}}}
    rule = FeedbackRule(config, sizes, dtype=DT)
    x, y = batch(sizes)
    step = rule.deltas(net, x, y)
    h = x
    for i in (1, 2):
        a = (h @ net.weight(i).T + net.bias(i)).detach().requires_grad_(True)
        local = cross_entropy(a @ rule.matrix(i, 0).T, y)
        (error,) = torch.autograd.grad(local * len(x), a)  # e^i D^i, per example
        (slope,) = torch.autograd.grad(net.activation.function(a).sum(), a)
        assert_close(step.deltas[i], error * slope)
        assert_close(step.auxiliary_losses[i], local.detach())
        h = net.activation.function(a.detach())
    post = FeedbackRule("dfa-aux", sizes, dtype=DT).deltas(net, x, y)
    assert not torch.allclose(step.deltas[1], post.deltas[1])  # h^i's reading differs


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_an_auxiliary_classifier_against_the_prediction_reads_the_networks_output(activation):
    """``direct:auxiliary-prediction`` (section 2.1.1's L^i(y^i, y_hat) as written): e^i =
    softmax(h^i (D^i)^T) - softmax(z), z the network's logits held fixed; d^i is the gradient
    of the cross-entropy against softmax(z) at a^i."""
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, activation, seed=6, dtype=DT)
    config = {
        "name": "dfa-aux-pred",
        "template": {"all": {"terms": ["direct:auxiliary-prediction"]}},
    }
    rule = FeedbackRule(config, sizes, dtype=DT)
    x, y = batch(sizes)
    step = rule.deltas(net, x, y)
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)  # the network's own prediction, no gradient
    h = x
    for i in (1, 2):
        a = (h @ net.weight(i).T + net.bias(i)).detach().requires_grad_(True)
        logits = net.activation.function(a) @ rule.matrix(i, 0).T
        local = -(p * torch.log_softmax(logits, dim=1)).sum(1).mean()
        (expected,) = torch.autograd.grad(local * len(x), a)
        assert_close(step.deltas[i], expected)
        assert_close(step.auxiliary_losses[i], local.detach())
        h = net.activation.function(a.detach())
    against_target = FeedbackRule("dfa-aux", sizes, dtype=DT).deltas(net, x, y)
    assert not torch.allclose(step.deltas[1], against_target.deltas[1])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_an_auxiliary_classifier_on_the_input_sends_its_error_through_the_direct_matrix(
    activation,
):
    """``direct:auxiliary-input`` (section 2.1.1's a_x^i = (B^i)^T h^{i-1} as written): a fixed
    classifier C^i on the layer's input, e^i = softmax(h^{i-1} (C^i)^T) - y, and d^i =
    (e^i D^i) * f'(a^i)."""
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, activation, seed=6, dtype=DT)
    config = {"name": "dfa-aux-in", "template": {"all": {"terms": ["direct:auxiliary-input"]}}}
    rule = FeedbackRule(config, sizes, dtype=DT)
    x, y = batch(sizes)
    step = rule.deltas(net, x, y)
    h = x
    for i in (1, 2):
        feedback = rule.feedback(i, 0)
        C, D = feedback["classifier"], feedback["matrix"]
        assert C.shape == (3, sizes[i - 1]) and D.shape == (3, sizes[i])
        logits = h @ C.T
        e_i = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, 3).to(DT)
        a = h @ net.weight(i).T + net.bias(i)
        (slope,) = torch.autograd.grad(net.activation.function(a.requires_grad_(True)).sum(), a)
        assert_close(step.deltas[i], (e_i @ D) * slope)
        assert_close(step.auxiliary_losses[i], cross_entropy(logits, y))
        h = net.activation.function(a.detach())


def test_fa_and_dfa_differ_from_bp():
    """The rule path is not autograd: random feedback gives other deltas than backprop."""
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, "tanh", seed=7, dtype=DT)
    x, y = batch(sizes)
    bp = FeedbackRule("bp", sizes, dtype=DT).deltas(net, x, y)
    for name in sorted(set(PRESETS) - {"bp"}):
        other = FeedbackRule(name, sizes, dtype=DT).deltas(net, x, y)
        assert torch.equal(other.deltas[3], bp.deltas[3]), "the output error is shared"
        for i in (1, 2):
            assert (other.deltas[i] - bp.deltas[i]).abs().max() > 1e-3, (name, i)


def test_mixed_rule_with_weights_one_zero_is_dfa():
    sizes = [6, 5, 4, 5, 3]
    net = MLP(sizes, "relu", seed=8, dtype=DT)
    mixed = {
        "name": "mixed",
        "template": {
            "top": {"terms": ["direct", "below"], "combine": [1.0, 0.0]},
            "bottom": {"terms": ["direct", "above:direct-only"], "combine": [1.0, 0.0]},
            "all": {"terms": ["direct", "above:direct-only", "below"], "combine": [1, 0, 0]},
        },
    }
    x, y = batch(sizes)
    dfa = FeedbackRule("dfa", sizes, dtype=DT, seed=3).deltas(net, x, y)
    got = FeedbackRule(mixed, sizes, dtype=DT, seed=3).deltas(net, x, y)
    for i in dfa.deltas:
        assert_close(got.deltas[i], dfa.deltas[i], tol=0)


def test_sum_combiner_is_twice_the_mean():
    sizes = [6, 5, 4, 3]
    net = MLP(sizes, "tanh", seed=9, dtype=DT)
    x, y = batch(sizes)
    mean = {"name": "m", "template": {"all": {"terms": ["direct", "above"], "combine": "mean"}}}
    total = {"name": "m", "template": {"all": {"terms": ["direct", "above"], "combine": "sum"}}}
    a = FeedbackRule(mean, sizes, dtype=DT).deltas(net, x, y)
    b = FeedbackRule(total, sizes, dtype=DT).deltas(net, x, y)
    # Layer 2 sees e from above in both; layer 1 mixes layer 2's delta, itself doubled.
    assert_close(b.deltas[2], 2 * a.deltas[2])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_tanh_is_torch_tanh_up_to_rounding(dtype, tolerance):
    from gfalign.network import tanh

    a = torch.linspace(-20, 20, 10_001, dtype=dtype)
    assert (tanh(a) - torch.tanh(a)).abs().max() <= tolerance
    assert tanh(torch.zeros(1, dtype=dtype)).item() == 0.0
    leaf = a.clone().requires_grad_()
    tanh(leaf).sum().backward()  # autograd through the identity: the derivative 1 - tanh^2
    assert torch.allclose(leaf.grad, 1 - torch.tanh(a) ** 2, atol=10 * tolerance)


@pytest.mark.parametrize("signal", ["auxiliary-input", "auxiliary-prediction"])
def test_the_written_auxiliary_readings_stack_member_for_member(signal):
    """Stacked seeds (how the readings run) give each member's own deltas."""
    from gfalign.network import Network

    config = {"name": "reading", "template": {"all": {"terms": [f"direct:{signal}", "above"]}}}
    nets = [MLP([6, 5, 4, 3], "tanh", seed=s, dtype=DT) for s in range(2)]
    rules = [FeedbackRule(config, net, seed=s, dtype=DT) for s, net in enumerate(nets)]
    x, y = batch([6, 5, 4, 3])
    alone = [rule.deltas(net, x, y).deltas for rule, net in zip(rules, nets, strict=True)]
    stacked = FeedbackRule.stack(rules).deltas(
        Network.stack(nets), x.expand(2, *x.shape), y.expand(2, -1)
    )
    for member in (0, 1):
        for i in (1, 2, 3):
            assert_close(stacked.deltas[i][member], alone[member][i])
