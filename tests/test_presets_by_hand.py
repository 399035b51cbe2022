"""Each preset's deltas against a direct transcription of DESIGN.md section 3, by hand."""

import pytest
import torch

from gfalign import MLP, PRESETS, FeedbackRule

DT = torch.float64


def fixed(shape, k):
    """Fixed, easily reproduced numbers (no random generator involved)."""
    n = shape[0] * shape[1]
    return (torch.arange(n, dtype=DT).reshape(shape) * 0.37 + k).sin() * 0.5


def setup(name, sizes):
    net = MLP(sizes, "tanh", seed=0, dtype=DT)
    with torch.no_grad():
        for i, layer in enumerate(net.layers, start=1):
            layer.weight.copy_(fixed(layer.weight.shape, 10 * i))
            layer.bias.copy_(fixed((1, layer.bias.shape[0]), 10 * i + 5)[0])
    rule = FeedbackRule(name, sizes, dtype=DT)
    for (i, k), matrix in rule.matrices().items():
        rule.set_matrix(i, k, fixed(matrix.shape, 100 + 10 * i + k))
    x = fixed((4, sizes[0]), 1).abs()
    y = torch.tensor([0, 2, 1, 2])
    return net, rule, x, y


def forward(net, x):
    h, a = [x], []
    for i, layer in enumerate(net.layers):
        a.append(h[-1] @ layer.weight.T + layer.bias)
        if i < len(net.layers) - 1:
            h.append(torch.tanh(a[-1]))
    return a, h


def softmax_error(logits, y):
    return torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, logits.shape[1])


def by_hand(name, net, rule, x, y):
    """Transcription for two hidden layers (layer numbers as in the paper)."""
    a, h = forward(net, x)
    e = softmax_error(a[2], y)
    f1, f2 = 1 - h[1] ** 2, 1 - h[2] ** 2
    W2, W3 = net.weight(2), net.weight(3)
    M = rule.matrix
    aux = name.endswith("-aux")
    base = name.removesuffix("-aux")

    def eps(i):
        # The auxiliary error of layer i reads its own activity through its direct matrix D^i.
        return softmax_error(h[i] @ M(i, 0).T, y) if aux else e

    if base == "bp":
        d2 = (e @ W3) * f2
        d1 = (d2 @ W2) * f1
    elif base == "fa":
        d2 = (e @ M(2, 0)) * f2
        d1 = (d2 @ M(1, 0)) * f1
    elif base == "dfa":
        d2 = (eps(2) @ M(2, 0)) * f2
        d1 = (eps(1) @ M(1, 0)) * f1
    elif base == "s1":
        d2 = (eps(2) @ M(2, 0)) * f2
        d1 = ((eps(1) @ M(1, 0) + d2 @ M(1, 1)) / 2) * f1
    elif base == "s2":
        d1 = (eps(1) @ M(1, 0)) * f1
        d2 = ((eps(2) @ M(2, 0) + d1 @ M(2, 1)) / 2) * f2
    elif base == "s3":
        t1 = (eps(1) @ M(1, 0)) * f1
        t2 = (eps(2) @ M(2, 0)) * f2
        d2 = ((eps(2) @ M(2, 0) + t1 @ M(2, 1)) / 2) * f2
        d1 = ((eps(1) @ M(1, 0) + t2 @ M(1, 1)) / 2) * f1
    elif base == "usf":  # B = sqrt(2 / (fan_in + fan_out)) * sign(W), from the live weights
        d2 = (e @ (torch.sign(W3) * (2 / sum(W3.shape)) ** 0.5)) * f2
        d1 = (d2 @ (torch.sign(W2) * (2 / sum(W2.shape)) ** 0.5)) * f1
    elif base in ("frsf", "brsf"):  # B = |R| * sign(W), |R| the magnitudes the rule holds
        d2 = (e @ (M(2, 0).abs() * torch.sign(W3))) * f2
        d1 = (d2 @ (M(1, 0).abs() * torch.sign(W2))) * f1
    elif base == "kp":  # before any step, the learned B is its initial draw: FA
        d2 = (e @ M(2, 0)) * f2
        d1 = (d2 @ M(1, 0)) * f1
    elif base == "dfa-conv":  # on Linear blocks nothing to tile: e K^(i+1), K (n_out, n_i)
        d2 = (e @ M(2, 0)) * f2
        d1 = (e @ M(1, 0)) * f1
    elif base == "drtp":  # the one-hot target y* in place of the error
        target = torch.nn.functional.one_hot(y, e.shape[1]).to(DT)
        d2 = (target @ M(2, 0)) * f2
        d1 = (target @ M(1, 0)) * f1
    else:
        raise AssertionError(f"no transcription for preset {name}: add one")
    return {1: d1, 2: d2, 3: e}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_hand_transcription(name):
    net, rule, x, y = setup(name, [5, 4, 3, 3])
    got = rule.deltas(net, x, y).deltas
    expected = by_hand(name, net, rule, x, y)
    for i in (1, 2, 3):
        assert torch.allclose(got[i], expected[i], atol=1e-12, rtol=0), (name, i)


def test_s3_middle_layer_mixes_both_neighbours_direct_only_deltas():
    net, rule, x, y = setup("s3", [5, 4, 4, 3, 3])
    a, h = forward(net, x)
    e = softmax_error(a[3], y)
    f = {i: 1 - h[i] ** 2 for i in (1, 2, 3)}
    M = rule.matrix
    t = {i: (e @ M(i, 0)) * f[i] for i in (1, 2, 3)}
    d2 = ((e @ M(2, 0) + t[3] @ M(2, 1) + t[1] @ M(2, 2)) / 3) * f[2]
    d3 = ((e @ M(3, 0) + t[2] @ M(3, 1)) / 2) * f[3]
    got = rule.deltas(net, x, y).deltas
    assert torch.allclose(got[2], d2, atol=1e-12, rtol=0)
    assert torch.allclose(got[3], d3, atol=1e-12, rtol=0)


def test_s1_deep_chains_final_deltas_downwards():
    net, rule, x, y = setup("s1", [5, 4, 4, 3, 3])
    a, h = forward(net, x)
    e = softmax_error(a[3], y)
    f = {i: 1 - h[i] ** 2 for i in (1, 2, 3)}
    M = rule.matrix
    d3 = (e @ M(3, 0)) * f[3]
    d2 = ((e @ M(2, 0) + d3 @ M(2, 1)) / 2) * f[2]
    d1 = ((e @ M(1, 0) + d2 @ M(1, 1)) / 2) * f[1]
    got = rule.deltas(net, x, y).deltas
    for i, expected in ((1, d1), (2, d2), (3, d3)):
        assert torch.allclose(got[i], expected, atol=1e-12, rtol=0)
