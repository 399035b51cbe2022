"""Dropout in the models (DESIGN.md section 11), in float64.

A training-mode forward pass draws masks from the model's seed and step counter, multiplies
the input by one and each hidden block's activation by another (inverted dropout, in ``a^i``'s
shape, before the block's tail), and advances the counter; evaluation mode draws none. The
tests check the model side of the contract a feedback rule relies on (``ForwardCache.masks``,
``post`` and ``activated`` holding the dropped values, ``forward`` drawing the masks
``forward_cache`` draws), and, once the engine reads the masks, the rule side: a dropped unit
gets no delta and no update, and ``bp`` equals autograd through the same masks.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gfalign.config import RunConfig
from gfalign.engine import FeedbackRule
from gfalign.models import build, from_modules
from gfalign.network import MLP, Network
from gfalign.rules import ConfigError

DT = torch.float64
SIZES = [6, 5, 4, 3]
RESULTS = Path(__file__).resolve().parents[1] / "results" / "runs.csv"


def batch(n: int = 8, features: int = SIZES[0], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, features, dtype=DT, generator=generator)
    return x, torch.randint(0, SIZES[-1], (n,), generator=generator)


def mlp(**options) -> MLP:
    options.setdefault("seed", 3)
    return MLP(SIZES, "tanh", dtype=DT, **options)


def conv_spec(block_dropout: float | None = 0.25) -> dict:
    """Two conv blocks with pooling, then Linear blocks (every kind of tail); the third block
    sets its own dropout rate unless ``block_dropout`` is None."""
    third = {"linear": 5} if block_dropout is None else {"linear": 5, "dropout": block_dropout}
    return {
        "input": [1, 8, 8],
        "activation": "tanh",
        "blocks": [
            {"conv": 3, "kernel": 3, "padding": 1, "pool": "max:2"},
            {"conv": 4, "kernel": 3, "pool": "avg:2"},
            third,
            {"linear": 3},
        ],
    }


def conv_net(spec: dict | None = None, **options):
    return build(spec or conv_spec(), seed=5, dtype=DT, **options)


def image_batch(n: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, dtype=DT, generator=generator), torch.randint(
        0, 3, (n,), generator=generator
    )


# ------------------------------------------------------------------ rate 0 is no dropout


@pytest.mark.parametrize("model", ["mlp", "conv net"])
def test_rate_zero_is_no_dropout_bit_for_bit(model):
    if model == "mlp":
        (x, y), plain, zero = batch(), mlp(), mlp(dropout_input=0.0, dropout_hidden=0.0)
    else:
        x, y = image_batch()
        plain = conv_net(conv_spec(None))
        zero = conv_net(conv_spec(0.0), dropout_input=0.0, dropout_hidden=0.0)
    assert not zero.dropout_active and zero.training
    assert list(zero.state_dict()) == list(plain.state_dict())  # no counter in checkpoints
    for _ in range(2):
        a, b = plain.forward_cache(x), zero.forward_cache(x)
        assert b.masks == ()
        for ours, theirs in zip([*a.pre, *a.post], [*b.pre, *b.post], strict=True):
            assert torch.equal(ours, theirs)
        assert torch.equal(plain(x), zero(x))
    assert int(zero.dropout_step) == 0
    grads = []
    for net in (plain, zero):
        FeedbackRule("bp", net).backward(net, x, y, reduction="sum")
        grads.append([p.grad.clone() for p in net.parameters()])
    assert all(torch.equal(g, h) for g, h in zip(*grads, strict=True))


def test_a_zero_rate_run_keeps_its_key(tmp_path):
    plain = RunConfig(hidden=(50,), rule="dfa")
    zero = RunConfig(hidden=(50,), rule="dfa", dropout_input=0, dropout_hidden=0.0)
    assert zero.key() == plain.key() and "dropout_hidden" not in zero.to_data()
    dropped = RunConfig(hidden=(50,), rule="dfa", dropout_hidden=0.5)
    assert dropped.key() != plain.key() and dropped.to_data()["dropout_hidden"] == 0.5
    (tmp_path / "run.toml").write_text(dropped.to_toml())
    assert RunConfig.from_toml(tmp_path / "run.toml").key() == dropped.key()
    assert dropped.label() == "dfa 1x50 tanh dropout 0/0.5 seed0"


def test_the_stored_runs_keep_their_keys():
    if not RESULTS.is_file():
        pytest.skip("no results/runs.csv beside the tests")
    with RESULTS.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    for row in rows:
        assert RunConfig.from_data(json.loads(row["config"])).key() == row["key"], row["label"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"dropout_hidden": 1.0},
            r"dropout_hidden = 1.0: out of range; allowed: a number in \[0, 1\)",
        ),
        (
            {"dropout_input": -0.1},
            r"dropout_input = -0.1: out of range; allowed: a finite number >= 0",
        ),
        ({"dropout_hidden": "0.5"}, r'dropout_hidden = "0.5": a string, not a number'),
        ({"dropout_input": True}, r"dropout_input = true: a boolean, not a number"),
    ],
)
def test_bad_rates_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        RunConfig(**changes)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------- masks and their counter


def test_masks_are_reproducible_for_a_seed_and_a_step():
    x, _ = batch(50)
    a, b, other = mlp(dropout_hidden=0.5), mlp(dropout_hidden=0.5), mlp(dropout_hidden=0.5, seed=4)
    steps = [a.forward_cache(x).masks for _ in range(3)]
    assert int(a.dropout_step) == 3
    for step, masks in enumerate(steps):
        with b.dropout_at(step):
            again = b.forward_cache(x).masks
        assert all(torch.equal(m, n) for m, n in zip(masks[:-1], again[:-1], strict=True))
    assert int(b.dropout_step) == 0  # pinned passes leave the counter alone
    assert not torch.equal(steps[0][0], steps[1][0])
    assert not torch.equal(steps[0][0], other.forward_cache(x).masks[0])
    wide = MLP(SIZES, "tanh", seed=3, dropout_hidden=0.5)  # float32 drops the same units
    assert torch.equal(wide.forward_cache(x.float()).masks[0].double(), steps[0][0])


def test_training_mode_drops_and_evaluation_mode_does_not():
    net = mlp(dropout_input=0.2, dropout_hidden=0.3)
    plain = mlp()
    x, _ = batch(4000)
    cache = net.forward_cache(x)
    assert len(cache.masks) == net.depth and cache.masks[-1] is None
    for i, mask in enumerate(cache.masks[:-1], start=1):
        assert mask.shape == cache.a(i).shape
        assert set(mask.unique().tolist()) == {0.0, 1.0 / 0.7}
        assert abs((mask == 0).double().mean().item() - 0.3) < 0.01
        # h^i = m^i * f(a^i): the dropped values, what weight gradients read
        assert torch.equal(cache.h(i), net.activation.function(cache.a(i)) * mask)
    dropped_inputs = cache.post[0] == 0
    assert abs(dropped_inputs.double().mean().item() - 0.2) < 0.01
    kept = ~dropped_inputs
    assert torch.equal(cache.post[0][kept], x[kept] * (1.0 / 0.8))
    net.eval()
    evaluated = net.forward_cache(x)
    assert evaluated.masks == () and int(net.dropout_step) == 1
    for ours, theirs in zip(evaluated.post, plain.forward_cache(x).post, strict=True):
        assert torch.equal(ours, theirs)
    net.train()
    assert torch.equal(net.predict(x), plain.predict(x)) and int(net.dropout_step) == 1


def test_input_dropout_alone_leaves_no_block_masks():
    net = mlp(dropout_input=0.5)
    cache = net.forward_cache(torch.ones(10, SIZES[0], dtype=DT))
    assert cache.masks == () and set(cache.post[0].unique().tolist()) <= {0.0, 2.0}


def _mlp_by_hand(net: MLP, x: torch.Tensor, input_mask, masks) -> torch.Tensor:
    h = x * input_mask
    for layer, mask in zip(net.layers[:-1], masks, strict=False):
        h = net.activation.function(layer(h)) * mask
    return net.layers[-1](h)


def test_forward_applies_the_masks_forward_cache_draws():
    net = mlp(dropout_input=0.25, dropout_hidden=0.5)
    ones = torch.ones(7, SIZES[0], dtype=DT)  # post[0] is then the input mask itself
    with net.dropout_at(11):
        cache = net.forward_cache(ones)
        logits = net(ones)
    assert torch.equal(logits, _mlp_by_hand(net, ones, cache.post[0], cache.masks[:-1]))
    torch.testing.assert_close(logits, cache.pre[-1], rtol=0, atol=1e-13)
    # unpinned, forward and forward_cache advance one counter: step t's masks, whichever ran
    net.forward_cache(ones)
    with net.dropout_at(1):
        expected = net(ones)
    assert torch.equal(net(ones), expected) and int(net.dropout_step) == 2


def test_the_contract_reproduces_autograd_through_forward():
    """Backprop written from the cache alone, d^i = (d^{i+1} W^{i+1}) * f'(a^i) * m^i and
    grad W^i = (d^i)^T h^{i-1}, equals autograd through ``forward`` at the same step: the
    cache holds everything a rule needs, and ``forward`` drops what it drops."""
    net = mlp(dropout_input=0.2, dropout_hidden=0.5)
    x, y = batch(16)
    with net.dropout_at(9):
        cache = net.forward_cache(x)
        logits = net(x)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    expected = torch.autograd.grad(loss, list(net.parameters()))
    _, d = net.objective.error(cache.pre[-1], y)
    grads = []
    for i in range(net.depth, 0, -1):
        grads[:0] = [d.T @ cache.h(i - 1), d.sum(0)]
        if i > 1:
            f = net.activation.function(cache.a(i - 1))
            d = (d @ net.weight(i)) * net.activation.derivative(cache.a(i - 1), f)
            d = d * cache.masks[i - 2]
    for ours, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


def test_blocks_drop_their_activation_before_the_tail():
    net = conv_net(dropout_input=0.1, dropout_hidden=0.5)
    assert net.dropout_rates == (0.5, 0.5, 0.25, 0.0)
    x, _ = image_batch()
    with net.dropout_at(2):
        cache = net.forward_cache(x)
        logits = net(x)
    assert [tuple(m.shape[1:]) for m in cache.masks[:-1]] == list(net.pre_shapes[:-1])
    h = cache.post[0]
    for i, (block, mask) in enumerate(zip(net.blocks[:-1], cache.masks, strict=False), start=1):
        z = block.activation.function(block.linear(h)) * mask
        assert torch.equal(cache.activated[i], z)
        for module in block.tail.modules:
            z = module(z)
        assert torch.equal(cache.post[i], z)
        h = z
    assert torch.equal(logits, net.blocks[-1].linear(h))
    kept = cache.post[0] != 0
    assert torch.equal(cache.post[0][kept], x[kept] * (1.0 / 0.9))


def test_the_counter_is_checkpointed_and_stays_on_the_cpu():
    net = conv_net(dropout_hidden=0.5)
    x, _ = image_batch()
    net.forward_cache(x)
    state = net.state_dict()
    assert int(state["dropout_step"]) == 1
    resumed = conv_net(dropout_hidden=0.5)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.forward_cache(x).masks[0], net.forward_cache(x).masks[0])
    moved = net.to(torch.float32)
    assert moved.dropout_step.dtype == torch.int64 and moved.dropout_step.device.type == "cpu"


def test_stacked_members_draw_their_own_masks():
    nets = [mlp(seed=s, dropout_input=0.2, dropout_hidden=0.5) for s in (0, 1, 2)]
    x = torch.rand(3, 9, SIZES[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    nets[1].forward_cache(x[1])  # member 1 is one step ahead
    stacked = Network.stack(nets)
    assert stacked.dropout_step.tolist() == [0, 1, 0]
    cache = stacked.forward_cache(x)
    assert stacked.dropout_step.tolist() == [1, 2, 1]
    for k, net in enumerate(nets):
        own = net.forward_cache(x[k])
        assert torch.equal(cache.post[0][k], own.post[0])
        for mask, own_mask in zip(cache.masks[:-1], own.masks[:-1], strict=True):
            assert mask.shape == (3, 9, own_mask.shape[-1])
            assert torch.equal(mask[k], own_mask)
        torch.testing.assert_close(cache.pre[-1][k], own.pre[-1], rtol=0, atol=1e-13)
    with stacked.dropout_at([0, 1, 0]):
        first = stacked.forward_cache(x).masks[0]
    with nets[2].dropout_at(0):
        assert torch.equal(first[2], nets[2].forward_cache(x[2]).masks[0])
    with pytest.raises(ValueError, match="stacked members share their rates"):
        Network.stack([nets[0], mlp(dropout_hidden=0.1)])
    with pytest.raises(ValueError, match="or 3 of them, one per member"):
        stacked.dropout_at([0, 1]).__enter__()


# ------------------------------------------------------------------ models as data, modules


def test_a_block_table_sets_its_own_rate():
    net = build(
        {
            "input": [4],
            "blocks": [
                {"linear": 3, "activation": "tanh", "dropout": 0.5},
                {"linear": 3, "activation": "tanh"},
                {"linear": 2},
            ],
        },
        dropout_hidden=0.2,
    )
    assert net.dropout_rates == (0.5, 0.2, 0.0)
    RunConfig(model={"input": [784], "blocks": [{"linear": 8, "dropout": 0.3}, {"linear": 10}]})
    with pytest.raises(ConfigError, match="block 2 is the output block: its logits are never"):
        build({"input": [4], "blocks": [{"linear": 3}, {"linear": 2, "dropout": 0.5}]})
    with pytest.raises(ConfigError, match=r"block 1: dropout = 1: not a dropout rate"):
        build({"input": [4], "blocks": [{"linear": 3, "dropout": 1}, {"linear": 2}]})


def test_user_modules_name_their_dropout():
    net = from_modules(
        [nn.Dropout(0.1), nn.Linear(4, 3), nn.Tanh(), nn.Dropout(0.4), nn.Linear(3, 2)],
        input_shape=(4,),
    )
    assert net.dropout_input == 0.1 and net.dropout_rates == (0.4, 0.0)
    with pytest.raises(ConfigError, match="block 1: Dropout in its tail; allowed: one nn.Dropout"):
        modules = [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5)]
        from_modules([*modules, nn.Flatten(), nn.Linear(2 * 3 * 3, 2)], input_shape=(1, 8, 8))


# --------------------------------------------------------------------- the engine side


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "s1"])
def test_a_dropped_unit_gets_no_delta_and_no_update(rule):
    net = mlp(dropout_hidden=0.5)
    x, y = batch(1)  # one example: a dropped unit's row and column of the update are zero
    engine = FeedbackRule(rule, net, seed=2, dtype=DT)
    with net.dropout_at(4):
        masks = net.forward_cache(x).masks
        step = engine.backward(net, x, y, reduction="sum")
    for i, mask in enumerate(masks[:-1], start=1):
        dropped = mask[0] == 0
        assert dropped.any() and not dropped.all()
        assert torch.all(step.deltas[i][0, dropped] == 0)
        assert torch.all(net.weight(i).grad[dropped] == 0)  # its own incoming weights
        assert torch.all(net.bias(i).grad[dropped] == 0)
        assert torch.all(net.weight(i + 1).grad[:, dropped] == 0)  # what reads it


@pytest.mark.parametrize("make, data", [(mlp, batch), (conv_net, image_batch)])
def test_bp_with_dropout_equals_autograd_through_the_same_masks(make, data):
    net = make(dropout_input=0.2, dropout_hidden=0.5)
    x, y = data()
    with net.dropout_at(6):
        logits = net(x)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    expected = torch.autograd.grad(loss, list(net.parameters()))
    with net.dropout_at(6):
        FeedbackRule("bp", net).backward(net, x, y, reduction="sum")
    for parameter, reference in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, reference, rtol=0, atol=1e-10)
