"""Alignment with backprop and feedback-matrix diagnostics, numerically in float64."""

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from block_models import CLASSES, user_net
from gfalign import MLP, FeedbackRule
from gfalign.alignment import (
    AlignmentProbe,
    alignment_metric,
    angle,
    backprop_reference,
    diagnose,
    measure,
    plot_alignment,
    row_angles,
    rule_diagnostics,
    weight_alignment,
)
from gfalign.cli import main
from gfalign.feedback import FAMILIES, draw
from gfalign.models import build
from gfalign.train import TrainConfig, Trainer

DT = torch.float64
SIZES = [12, 9, 8, 5]
NEGATED = {
    "name": "neg",
    "template": {"top": {"terms": ["backprop"], "combine": [-1.0]}, "all": {"terms": ["backprop"]}},
}


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split


def random_data(n_train=96, n_test=40, sizes=SIZES, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(n, sizes[0], generator=generator, dtype=DT)
        return Split(x, torch.randint(0, sizes[-1], (n,), generator=generator))

    return Dataset(split(n_train), split(n_test))


def network(rule_config, sizes=SIZES, activation="tanh"):
    net = MLP(sizes, activation, seed=3, dtype=DT)
    return net, FeedbackRule(rule_config, sizes, seed=4, dtype=DT)


def probe_batch(sizes=SIZES, n=50):
    return random_data(n, 1, sizes, seed=7).train


# ----------------------------------------------------------------------------------- angles


def test_angle_basics():
    a = torch.tensor([1.0, 0.0], dtype=DT)
    assert angle(a, torch.tensor([1.0, 1.0], dtype=DT)) == pytest.approx(45.0, abs=1e-12)
    assert angle(a, torch.tensor([0.0, 3.0], dtype=DT)) == pytest.approx(90.0, abs=1e-12)
    assert angle(a, -2 * a) == pytest.approx(180.0, abs=1e-12)
    assert math.isnan(angle(a, torch.zeros(2, dtype=DT)))
    rows = row_angles(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0]] * 2))
    assert rows[0].item() == pytest.approx(45.0) and math.isnan(rows[1].item())


def test_angle_is_exact_near_zero():
    # acos(cosine) would read a 1e-9 rad angle as 0 or as 1e-8 rad.
    a = torch.tensor([1.0, 0.0], dtype=DT)
    b = torch.tensor([1.0, 1e-9], dtype=DT)
    assert angle(a, b) == pytest.approx(math.degrees(1e-9), rel=1e-6)


# ------------------------------------------------------------------------ gradient alignment


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_backprop_against_itself_is_zero(activation):
    net, rule = network("bp", activation=activation)
    batch = probe_batch()
    record = measure(net, rule, batch.x, batch.y)
    for i in (1, 2):
        assert abs(record[f"update_angle_{i}"]) < 1e-6
        assert abs(record[f"delta_angle_{i}"]) < 1e-6
    assert not any(key.startswith("weight_angle") for key in record)


def test_feedback_alignment_with_transported_weights_is_zero():
    net, rule = network("fa")
    for i in (1, 2):
        rule.set_matrix(i, 0, net.weight(i + 1))
    batch = probe_batch()
    record = measure(net, rule, batch.x, batch.y)
    for i in (1, 2):
        assert abs(record[f"update_angle_{i}"]) < 1e-6
        assert abs(record[f"delta_angle_{i}"]) < 1e-6
        assert abs(record[f"weight_angle_{i}_above"]) < 1e-6


def test_negated_gradient_is_180_degrees():
    net, rule = network(NEGATED)
    batch = probe_batch()
    record = measure(net, rule, batch.x, batch.y)
    for i in (1, 2):
        assert abs(record[f"update_angle_{i}"] - 180.0) < 1e-6
        assert abs(record[f"delta_angle_{i}"] - 180.0) < 1e-6


def test_negation_alternates_when_every_layer_negates():
    # d^2 = -delta^2, then d^1 = (d^2 W^2) * f' * (-1) = +delta^1: the signs alternate.
    config = {"name": "neg", "template": {"all": {"terms": ["backprop"], "combine": [-1.0]}}}
    net, rule = network(config)
    batch = probe_batch()
    record = measure(net, rule, batch.x, batch.y)
    assert abs(record["update_angle_2"] - 180.0) < 1e-6
    assert abs(record["update_angle_1"]) < 1e-6


def test_angles_match_a_direct_transcription():
    net, rule = network("s1")
    batch = probe_batch()
    record = measure(net, rule, batch.x, batch.y)
    # Reference: autograd's gradient of the summed loss, and its deltas via a^i.grad.
    pre = []
    h = batch.x
    for index, layer in enumerate(net.layers):
        a = layer(h)
        a.retain_grad()
        pre.append(a)
        h = torch.tanh(a) if index < net.depth - 1 else a
    net.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(h, batch.y, reduction="sum").backward()
    ours = rule.deltas(net, batch.x, batch.y).deltas
    cache = net.forward_cache(batch.x)
    for i in (1, 2):
        bp_delta = pre[i - 1].grad
        expected_update = angle(ours[i].t() @ cache.h(i - 1), net.weight(i).grad)
        cosines = torch.nn.functional.cosine_similarity(ours[i], bp_delta, dim=1)
        expected_delta = torch.rad2deg(torch.acos(cosines)).mean().item()
        assert record[f"update_angle_{i}"] == pytest.approx(expected_update, abs=1e-9)
        assert record[f"delta_angle_{i}"] == pytest.approx(expected_delta, abs=1e-6)
        assert 0.0 < record[f"update_angle_{i}"] < 180.0
    net.zero_grad(set_to_none=True)


def test_weight_angles_of_direct_and_above_terms():
    net, rule = network("s1")
    record = weight_alignment(net, rule)
    # s1: layer 2 direct; layer 1 mean(direct, above)
    assert set(record) == {"weight_angle_2_direct", "weight_angle_1_direct", "weight_angle_1_above"}
    product = net.weight(3) @ net.weight(2)  # (n_L, n_1), like D^1
    assert record["weight_angle_1_direct"] == pytest.approx(angle(product, rule.matrix(1, 0)))
    assert record["weight_angle_2_direct"] == pytest.approx(angle(net.weight(3), rule.matrix(2, 0)))
    assert record["weight_angle_1_above"] == pytest.approx(angle(net.weight(2), rule.matrix(1, 1)))
    rule.set_matrix(1, 0, product)
    assert abs(weight_alignment(net, rule)["weight_angle_1_direct"]) < 1e-6
    # Below terms and auxiliary direct terms have no backprop counterpart.
    assert set(weight_alignment(*network("s2"))) == {
        "weight_angle_1_direct",
        "weight_angle_2_direct",
    }
    assert weight_alignment(*network("dfa-aux")) == {}


def test_autoencoder_probe_needs_no_labels():
    sizes = [6, 4, 3, 6]
    net = MLP(sizes, "sigmoid", "autoencoder", seed=0, dtype=DT)
    rule = FeedbackRule("bp", sizes, dtype=DT)
    x = torch.rand(20, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    record = AlignmentProbe(x).measure(net, rule)
    assert abs(record["update_angle_1"]) < 1e-6 and abs(record["update_angle_2"]) < 1e-6


# ---------------------------------------------------------------- the probe changes nothing


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def run(data, rule_config, probe, epochs=3):
    net, rule = network(rule_config)
    config = TrainConfig(
        epochs=epochs, batch_size=16, lr=0.05, optimizer_options={"momentum": 0.9}, seed=5
    )
    trainer = Trainer(net, rule, data, config, metrics=[probe] if probe else [])
    trainer.fit()
    return trainer


@pytest.mark.parametrize("rule_config", ["s3", "fa", "dfa-aux"])
def test_probe_leaves_the_trajectory_untouched(rule_config):
    data = random_data()
    before = rng_states()
    probe = alignment_metric(data, size=30, seed=2)
    assert all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)
        for a, b in zip(before[:2], rng_states()[:2], strict=True)
    )
    torch.manual_seed(99)
    plain = run(data, rule_config, None)
    state_after_plain = rng_states()
    torch.manual_seed(99)
    tracked = run(data, rule_config, probe)
    state_after_tracked = rng_states()

    assert torch.equal(state_after_plain[0], state_after_tracked[0])
    assert np.array_equal(state_after_plain[1], state_after_tracked[1])
    assert state_after_plain[2] == state_after_tracked[2]
    a, b = plain.state_dict(), tracked.state_dict()
    for key in ("net", "rule"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert torch.equal(a["generator"], b["generator"])
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momentum_a) == 2 * len(SIZES) - 2
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert all(
        p.grad is not None and torch.equal(p.grad, q.grad)
        for p, q in zip(plain.net.parameters(), tracked.net.parameters(), strict=True)
    )

    untimed = {"seconds"}
    for record_a, record_b in zip(plain.history, tracked.history, strict=True):
        extra = set(record_b) - set(record_a)
        assert extra and all("_angle_" in key for key in extra)
        assert {k: v for k, v in record_a.items() if k not in untimed} == {
            k: v for k, v in record_b.items() if k not in untimed and k not in extra
        }
        assert all(math.isfinite(record_b[key]) for key in extra)


def test_a_probe_call_changes_no_state():
    data = random_data()
    trainer = run(data, "s1", None, epochs=1)
    probe = alignment_metric(data, size=25)
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    grads = [p.grad.clone() for p in trainer.net.parameters()]
    before = rng_states()
    first = probe(trainer)
    assert probe(trainer) == first
    after = rng_states()
    assert torch.equal(before[0], after[0]) and before[2] == after[2]
    assert all(torch.equal(weights[k], v) for k, v in trainer.net.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, trainer.net.parameters(), strict=True))


def test_alignment_metric_chooses_a_fixed_subset():
    data = random_data()
    a, b = alignment_metric(data, size=20, seed=1), alignment_metric(data, size=20, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and len(a.x) == 20
    first = alignment_metric(data, size=10, seed=None)
    assert torch.equal(first.x, data.train.x[:10])
    assert len(alignment_metric(data, size=10_000).x) == len(data.train)
    with pytest.raises(ValueError):
        alignment_metric(data, size=0)


# ------------------------------------------------------------------ any model of blocks

CONV_NET = {
    "input": [1, 10, 10],
    "activation": "tanh",
    "blocks": [
        {"conv": 3, "kernel": 3, "pool": "max:2"},  # a1 (3, 8, 8), h1 (3, 4, 4)
        {"conv": 4, "kernel": 2},  # a2 (4, 3, 3), h2 = flatten(f(a2)) (36,)
        {"linear": 6},
        {"linear": CLASSES},
    ],
}


def conv_net():
    return build(CONV_NET, seed=3, dtype=DT)


BLOCK_MODELS = {"conv net": conv_net, "user module": user_net}
# The hidden blocks whose path to the output is Linear blocks with identity or flatten tails.
LINEAR_PATHS = {"conv net": {2, 3}, "user module": {2, 3}}


def image_data(n_train=48, n_test=16, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(n, 1, 10, 10, generator=generator, dtype=DT)
        return Split(x, torch.randint(0, CLASSES, (n,), generator=generator))

    return Dataset(split(n_train), split(n_test))


def image_batch():
    return image_data(n_train=20, n_test=1, seed=7).train


def hidden_blocks(net):
    return range(1, net.depth)


def by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    cosine = torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return math.degrees(math.acos(float(cosine)))


def transported_fa(net):
    """FA with every above term's fixed parameters set to the forward ones it stands for."""
    rule = FeedbackRule("fa", net, seed=4, dtype=DT)
    for i in hidden_blocks(net):
        forward = dict(net.blocks[i].linear.named_parameters())
        rule.set_feedback(i, 0, {name: forward[name] for name in rule.feedback(i, 0)})
    return rule


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_backprop_reference_is_autograd_of_the_summed_loss(model):
    net = BLOCK_MODELS[model]()
    batch = image_batch()
    reference = backprop_reference(net, batch.x, batch.y)
    assert all(p.grad is None for p in net.parameters())  # the reference writes no .grad
    # The model's own forward, each a^i kept by a hook, and the loss itself differentiated.
    kept = []

    def keep(module, inputs, output):
        output.retain_grad()
        kept.append(output)

    handles = [block.linear.register_forward_hook(keep) for block in net.blocks]
    try:
        loss = torch.nn.functional.cross_entropy(net(batch.x), batch.y, reduction="sum")
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    for i, block in enumerate(net.blocks, start=1):
        assert reference.deltas[i].shape == kept[i - 1].shape
        torch.testing.assert_close(reference.deltas[i], kept[i - 1].grad, rtol=0, atol=1e-12)
        assert list(reference.gradients[i]) == [name for name, _ in block.linear.named_parameters()]
        for name, parameter in block.linear.named_parameters():
            torch.testing.assert_close(
                reference.gradients[i][name], parameter.grad, rtol=0, atol=1e-12
            )
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_bp_and_transported_fa_align_on_blocks(model):
    net = BLOCK_MODELS[model]()
    batch = image_batch()
    for rule in (FeedbackRule("bp", net, dtype=DT), transported_fa(net)):
        record = measure(net, rule, batch.x, batch.y)
        for i in hidden_blocks(net):
            assert abs(record[f"update_angle_{i}"]) < 1e-6, (rule.config.name, i, record)
            assert abs(record[f"delta_angle_{i}"]) < 1e-6, (rule.config.name, i, record)
            if rule.config.name == "fa":
                assert abs(record[f"weight_angle_{i}_above"]) < 1e-6


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
@pytest.mark.parametrize("config", ["fa", "dfa"])
def test_random_feedback_does_not_align_on_blocks(model, config):
    net = BLOCK_MODELS[model]()
    rule = FeedbackRule(config, net, seed=4, dtype=DT)
    batch = image_batch()
    record = measure(net, rule, batch.x, batch.y)
    for i in hidden_blocks(net):
        assert 5.0 < record[f"update_angle_{i}"] < 175.0, (i, record)
        assert 5.0 < record[f"delta_angle_{i}"] < 175.0, (i, record)


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_update_angle_compares_the_weight_or_every_parameter(model):
    net = BLOCK_MODELS[model]()
    rule = FeedbackRule("dfa", net, seed=4, dtype=DT)
    batch = image_batch()
    record = measure(net, rule, batch.x, batch.y)
    reference = backprop_reference(net, batch.x, batch.y)
    ours = rule.deltas(net, batch.x, batch.y).deltas
    cache = net.forward_cache(batch.x)
    for i in hidden_blocks(net):
        part = net.blocks[i - 1].linear
        params = dict(part.named_parameters())
        # The rule's update by autograd: the block's output against d^i, its input detached.
        point = cache.post[i - 1].detach()
        with torch.enable_grad():
            grads = torch.autograd.grad(part(point), list(params.values()), ours[i])
        update = dict(zip(params, grads, strict=True))
        names = ["weight"] if "weight" in params else list(params)  # Gated: a, c and b
        expected = by_hand(
            torch.cat([update[name].flatten() for name in names]),
            torch.cat([reference.gradients[i][name].flatten() for name in names]),
        )
        assert record[f"update_angle_{i}"] == pytest.approx(expected, abs=1e-6)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_above_weight_angles_on_blocks(model):
    net = BLOCK_MODELS[model]()
    rule = FeedbackRule("fa", net, seed=4, dtype=DT)
    record = weight_alignment(net, rule)
    assert set(record) == {f"weight_angle_{i}_above" for i in hidden_blocks(net)}
    for i in hidden_blocks(net):
        fixed = rule.feedback(i, 0)
        forward = dict(net.blocks[i].linear.named_parameters())
        assert list(fixed) == (["weight"] if "weight" in forward else list(forward))
        expected = by_hand(
            torch.cat([fixed[name].flatten() for name in fixed]),
            torch.cat([forward[name].flatten() for name in fixed]),
        )
        assert record[f"weight_angle_{i}_above"] == pytest.approx(expected, abs=1e-9)
        assert 0.0 < expected < 180.0


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_direct_weight_angles_only_where_the_path_is_linear(model):
    net = BLOCK_MODELS[model]()
    rule = FeedbackRule("dfa", net, seed=4, dtype=DT)
    record = weight_alignment(net, rule)
    assert set(record) == {f"weight_angle_{i}_direct" for i in LINEAR_PATHS[model]}
    W3, W4 = net.blocks[2].linear.weight, net.blocks[3].linear.weight
    D2, D3 = rule.feedback(2, 0)["matrix"], rule.feedback(3, 0)["matrix"]
    assert record["weight_angle_3_direct"] == pytest.approx(angle(W4, D3), abs=1e-12)
    assert record["weight_angle_2_direct"] == pytest.approx(angle(W4 @ W3, D2), abs=1e-12)
    rule.set_feedback(2, 0, {"matrix": (W4 @ W3).detach()})
    assert abs(weight_alignment(net, rule)["weight_angle_2_direct"]) < 1e-6


def test_a_pooling_tail_has_no_direct_weight_angle():
    spec = {
        "input": [1, 10, 10],
        "blocks": [{"conv": 3, "kernel": 3, "pool": "max:2"}, {"linear": 6}, {"linear": 5}],
    }
    net = build(spec, seed=0, dtype=DT)
    assert set(weight_alignment(net, FeedbackRule("dfa", net, dtype=DT))) == {
        "weight_angle_2_direct"
    }


def run_blocks(data, make, config, probe):
    torch.manual_seed(99)
    net = make()
    trainer = Trainer(
        net,
        FeedbackRule(config, net, seed=4, dtype=DT),
        data,
        TrainConfig(epochs=1, batch_size=8, seed=5),
        metrics=[probe] if probe else [],
    )
    trainer.fit()
    return trainer


@pytest.mark.parametrize("model", sorted(BLOCK_MODELS))
def test_alignment_metric_in_a_trainer_on_a_block_net(model):
    data = image_data()
    probe = alignment_metric(data, size=16, seed=2)
    plain = run_blocks(data, BLOCK_MODELS[model], "s1", None)
    state_after_plain = rng_states()
    tracked = run_blocks(data, BLOCK_MODELS[model], "s1", probe)
    state_after_tracked = rng_states()
    record = tracked.history[-1]
    depth = tracked.net.depth
    expected = {f"{kind}_angle_{i}" for kind in ("update", "delta") for i in range(1, depth)}
    expected |= {f"weight_angle_{i}_above" for i in range(1, depth - 1)}  # s1: top is direct
    expected |= {f"weight_angle_{i}_direct" for i in LINEAR_PATHS[model]}
    assert {key for key in record if "_angle_" in key} == expected
    assert all(math.isfinite(record[key]) for key in expected)
    assert all(0.0 < record[key] < 180.0 for key in expected)
    # The probe changed nothing: the same trajectory, random state and (absent) gradients.
    assert torch.equal(state_after_plain[0], state_after_tracked[0])
    a, b = plain.state_dict(), tracked.state_dict()
    assert all(torch.equal(a["net"][name], b["net"][name]) for name in a["net"])
    assert all(p.grad is None for p in tracked.net.parameters())
    untimed = {"seconds", *expected}
    assert {k: v for k, v in plain.history[-1].items() if k not in untimed} == {
        k: v for k, v in record.items() if k not in untimed
    }


def test_rule_diagnostics_on_blocks_cover_the_matrices():
    net = conv_net()
    rule = FeedbackRule("s1", net, seed=0, dtype=DT)
    # s1: layers 1 and 2 mean(direct, above), layer 3 direct; layer 1's above term stands for
    # the conv block 2 (a kernel, not a matrix), layer 2's for the Linear block 3.
    reports = rule_diagnostics(rule)
    assert set(reports) == {(1, 0), (2, 0), (2, 1), (3, 0)}
    assert reports[1, 0].shape == (CLASSES, 3 * 8 * 8)
    assert reports[2, 1].shape == (6, 36) and reports[2, 1].error_space == "any"
    assert reports[3, 0].error_space == "softmax"


# ------------------------------------------------------------------- feedback diagnostics


def softmax_errors(n=64, classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=DT)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return torch.softmax(logits, dim=1) - torch.nn.functional.one_hot(labels, classes).to(DT)


def pinv_identities(B):
    pinv = torch.linalg.pinv(B)
    rows, cols = B.shape
    error = torch.allclose(B @ pinv, torch.eye(rows, dtype=DT), atol=1e-8)
    layer = torch.allclose(pinv @ B, torch.eye(cols, dtype=DT), atol=1e-8)
    return error, layer


@pytest.mark.parametrize(
    "name, matrix, rank, identities",
    [
        ("square identity", torch.eye(10, dtype=DT), 10, (True, True)),
        ("non-square identity", torch.eye(10, 80, dtype=DT), 10, (True, False)),
        ("tall identity", torch.eye(80, 10, dtype=DT), 10, (False, True)),
        ("ones", torch.ones(10, 80, dtype=DT), 1, (False, False)),
        (
            "rank 3",
            torch.randn(10, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
            @ torch.randn(3, 80, dtype=DT, generator=torch.Generator().manual_seed(1)),
            3,
            (False, False),
        ),
        ("random wide", torch.rand(10, 80, dtype=DT) - 0.5, 10, (True, False)),
        ("random square", torch.rand(30, 30, dtype=DT) - 0.5, 30, (True, True)),
    ],
)
def test_pseudo_inverse_diagnostics(name, matrix, rank, identities):
    report = diagnose(matrix)
    assert report.rank == rank == int(torch.linalg.matrix_rank(matrix))
    assert (report.error_identity, report.layer_identity) == identities == pinv_identities(matrix)
    singular = torch.linalg.svdvals(matrix)
    assert report.singular_max == pytest.approx(float(singular[0]))
    if rank == min(matrix.shape):
        assert report.condition_number == pytest.approx(float(singular[0] / singular[-1]))
    else:
        assert report.condition_number == math.inf
        assert report.to_data()["condition_number"] is None


def test_identity_is_perfectly_conditioned_and_carries_everything():
    report = diagnose(torch.eye(10, 800, dtype=DT))
    assert report.condition_number == pytest.approx(1.0)
    assert report.error_dimensions == 9 and report.error_rank == 9
    assert report.error_dimensions_carried == 1.0
    assert report.error_gain_min == pytest.approx(1.0)
    assert report.error_gain_relative == pytest.approx(1.0)
    assert report.error_energy_fraction == pytest.approx(0.9)
    assert diagnose(torch.eye(10, 800, dtype=DT), "any").error_energy_fraction == 1.0


def test_ones_carry_no_softmax_error():
    ones = draw("B4:density=1", (10, 800), torch.Generator().manual_seed(0))
    assert torch.equal(ones, torch.ones(10, 800, dtype=DT))
    e = softmax_errors()
    assert (e @ ones).abs().max() < 1e-12
    report = diagnose(ones)
    assert report.error_rank == 0 and report.error_dimensions_carried == 0.0
    assert report.error_gain_min == 0.0 and report.error_energy_fraction == 0.0
    assert report.rank == 1 and not report.error_identity
    # On unconstrained signals the same matrix keeps one direction: the mean.
    assert diagnose(ones, "any").error_rank == 1


def test_b1_carries_only_through_its_noise():
    generator = torch.Generator().manual_seed(0)
    B1 = draw("B1", (10, 800), generator)
    noise = B1 - 1.0
    e = softmax_errors()
    assert torch.allclose(e @ B1, e @ noise, atol=1e-12)
    report = diagnose(B1)
    assert report.error_rank == 9
    assert report.error_gain_min == pytest.approx(float(diagnose(noise).error_gain_min), rel=1e-9)
    centred = noise - noise.mean(dim=0, keepdim=True)
    expected = float(centred.square().sum() / B1.square().sum())
    assert report.error_energy_fraction == pytest.approx(expected, rel=1e-12)
    assert report.error_energy_fraction < 1e-3
    # With less noise it carries less.
    quieter = diagnose(draw("B1:std=0.001", (10, 800), torch.Generator().manual_seed(0)))
    assert quieter.error_energy_fraction < report.error_energy_fraction / 50


def test_error_gain_is_the_smallest_gain_over_softmax_errors():
    B = torch.rand(10, 40, dtype=DT, generator=torch.Generator().manual_seed(3)) - 0.5
    report = diagnose(B)
    e = softmax_errors(2000, seed=1)
    gains = torch.linalg.vector_norm(e @ B, dim=1) / torch.linalg.vector_norm(e, dim=1)
    assert report.error_gain_min <= float(gains.min()) + 1e-12
    assert report.error_gain_min > 0


def test_narrow_layer_loses_error_dimensions():
    report = diagnose(torch.rand(10, 4, dtype=DT) - 0.5)
    assert report.error_rank == 4 and report.error_dimensions_carried == pytest.approx(4 / 9)
    assert report.error_gain_min == 0.0 and not report.error_identity


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_diagnoses(family):
    matrix = draw(family, (10, 50), torch.Generator().manual_seed(0))
    report = diagnose(matrix)
    assert 0 <= report.error_rank <= report.error_dimensions == 9
    assert 0.0 <= report.error_energy_fraction <= 1.0 + 1e-12
    json.dumps(report.to_data())


def test_rule_diagnostics_cover_every_matrix():
    rule = FeedbackRule("s1", [12, 9, 8, 5], seed=0, dtype=DT)
    reports = rule_diagnostics(rule)
    assert set(reports) == set(rule.matrices())
    assert reports[2, 0].error_space == "softmax" and reports[2, 0].shape == (5, 8)
    assert reports[1, 1].error_space == "any" and reports[1, 1].shape == (8, 9)
    fa = rule_diagnostics(FeedbackRule("fa", [12, 9, 8, 5], dtype=DT), "autoencoder")
    assert {report.error_space for report in fa.values()} == {"any"}


# ----------------------------------------------------------------------------------- plots


def test_plot_alignment_writes_a_png(tmp_path):
    data = random_data()
    histories = {
        name: run(data, name, alignment_metric(data, size=20), epochs=2).history
        for name in ("bp", "fa", "s1")
    }
    for kind in ("update", "delta", "weight"):
        path = plot_alignment(histories, tmp_path / f"{kind}.png", kind=kind)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="unknown alignment kind"):
        plot_alignment(histories, tmp_path / "x.png", kind="angles")
    with pytest.raises(ValueError, match="no weight_angle_"):
        plot_alignment({"bp": histories["bp"]}, tmp_path / "x.png", kind="weight")


# ------------------------------------------------------------------------------------- CLI


def test_cli_lists_families():
    result = CliRunner().invoke(main, ["feedback", "list"])
    assert result.exit_code == 0
    assert all(name in result.output for name in FAMILIES)
    listed = json.loads(CliRunner().invoke(main, ["feedback", "list", "--json"]).output)
    assert set(listed) == set(FAMILIES)


def test_cli_shows_a_family():
    result = CliRunner().invoke(main, ["feedback", "show", "B2", "--shape", "10x800"])
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "10 of 10" in result.output
    result = CliRunner().invoke(
        main, ["feedback", "show", "B6:density=0.2", "--shape", "20x30", "--seed", "3", "--json"]
    )
    data = json.loads(result.output)
    assert data["family"] == "B6:density=0.2" and data["shape"] == [20, 30]
    expected = diagnose(draw("B6:density=0.2", (20, 30), torch.Generator().manual_seed(3)))
    assert data["rank"] == expected.rank
    ones = json.loads(
        CliRunner().invoke(main, ["feedback", "show", "B4:density=1", "--json"]).output
    )
    assert ones["error_rank"] == 0 and ones["condition_number"] is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["B1", "--shape", "10by800"], "not ROWSxCOLS"),
        (["B1", "--shape", "0x5"], "positive"),
        (["B9"], "unknown feedback family"),
        (["B1:foo=1"], "bad parameters"),
        (["B1:density"], "not key=value"),
    ],
)
def test_cli_errors_are_messages(arguments, message):
    result = CliRunner().invoke(main, ["feedback", "show", *arguments])
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
