"""Models as data: built-ins, specs, user modules, and every refusal naming the block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gfalign.models import MODELS, build, from_modules, model_spec
from gfalign.rules import ConfigError
from peer_files import biotorch_file


def test_lenet5_is_biotorchs_lenet_mnist():
    """Three 5x5 convolutions (6, 16, 120 channels) with relu, 2x2 max-pooling after the
    first two, Linear 120-84 relu, Linear 84-10, on 32x32 inputs."""
    net = build("lenet5", seed=0)
    assert net.input_shape == (1, 32, 32)
    assert net.pre_shapes == ((6, 28, 28), (16, 10, 10), (120, 1, 1), (84,), (10,))
    assert net.post_shapes == ((1, 32, 32), (6, 14, 14), (16, 5, 5), (120,), (84,))
    kinds = [type(block.linear).__name__ for block in net.blocks]
    assert kinds == ["Conv2d", "Conv2d", "Conv2d", "Linear", "Linear"]
    activations = [block.activation.name for block in net.blocks[:-1]]
    assert activations == ["relu", "relu", "relu", "relu"]
    tails = [[type(m).__name__ for m in block.tail.modules] for block in net.blocks]
    assert tails == [["MaxPool2d"], ["MaxPool2d"], ["Flatten"], [], []]
    assert sum(p.numel() for p in net.parameters()) == 61_706  # LeNet-5's parameter count
    assert model_spec("lenet5").resize == 32


def test_the_forward_pass_is_plain_pytorch():
    """BlockNet.forward equals the same modules in an nn.Sequential."""
    net = build("lenet5", seed=1, dtype=torch.float64)
    reference = nn.Sequential(
        net.blocks[0].linear, nn.ReLU(), nn.MaxPool2d(2),
        net.blocks[1].linear, nn.ReLU(), nn.MaxPool2d(2),
        net.blocks[2].linear, nn.ReLU(), nn.Flatten(),
        net.blocks[3].linear, nn.ReLU(), net.blocks[4].linear,
    )  # fmt: skip
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    cache = net.forward_cache(x)
    torch.testing.assert_close(cache.pre[-1], reference(x), rtol=0, atol=0)


def test_a_seed_gives_the_same_model_and_float32_shares_float64s_values():
    a, b = build("lenet5", seed=3), build("lenet5", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build("lenet5", seed=4)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    wide = build("lenet5", seed=3, dtype=torch.float64)
    assert torch.equal(next(wide.parameters()).float(), next(a.parameters()))


def test_every_built_in_builds():
    for name in MODELS:
        net = build(name)
        assert net(torch.zeros(2, *net.input_shape)).shape[0] == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lenet", r"unknown model 'lenet' \(did you mean 'lenet5'\?\)"),
        ({"input": [4], "blocks": [{"linear": 2}], "depth": 3}, "model: unknown key 'depth'"),
        ({"input": [4], "blocks": []}, "'blocks' must be a non-empty list"),
        ({"input": "784", "blocks": [{"linear": 2}]}, "'input' must be"),
        ({"input": [4], "blocks": [{"linaer": 2}]}, r"block 1: unknown key 'linaer' \(did you"),
        ({"input": [4], "blocks": [{"linear": 2, "conv": 3}]}, "block 1: give exactly one"),
        ({"input": [4], "blocks": [{"linear": "2"}]}, "block 1: linear must be a positive"),
        ({"input": [1, 8, 8], "blocks": [{"conv": 2}, {"linear": 3}]}, "block 1: a conv block"),
        ({"input": [4], "blocks": [{"linear": 3, "kernel": 3}, {"linear": 2}]}, "has no kernel"),
        (
            {"input": [4], "blocks": [{"linear": 3, "activation": "swish"}, {"linear": 2}]},
            r"block 1: unknown activation 'swish'",
        ),
        ({"input": [4], "blocks": [{"linear": 2, "activation": "tanh"}]}, "is the output block"),
        (
            {
                "input": [1, 8, 8],
                "blocks": [{"conv": 2, "kernel": 3, "pool": "max"}, {"linear": 2}],
            },
            "pool must be max:K",
        ),
        ({"input": [1, 8, 8], "blocks": [{"linear": 3}, {"linear": 2}]}, "needs flat inputs"),
        (
            {"input": [1, 4, 4], "blocks": [{"conv": 2, "kernel": 7}, {"linear": 2}]},
            "block 1 does not fit its input of shape",
        ),
        ({"input": [4], "blocks": [{"linear": 2}], "normalize": [0.5, 0]}, "normalize"),
    ],
)
def test_bad_specs_are_refused_naming_the_block(spec, message):
    with pytest.raises(ConfigError, match=message):
        build(spec)


def test_from_modules_shares_the_users_parameters():
    conv, linear = nn.Conv2d(1, 2, 3), nn.Linear(2 * 3 * 3, 4)
    net = from_modules(
        nn.Sequential(conv, nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), linear),
        input_shape=(1, 8, 8),
    )
    assert net.blocks[0].linear is conv and net.blocks[1].linear is linear
    assert net.blocks[0].activation.name == "tanh"
    assert [type(m) for m in net.blocks[0].tail.modules] == [nn.MaxPool2d, nn.Flatten]
    with pytest.raises(ConfigError, match="ReLU comes before any module with parameters"):
        from_modules([nn.ReLU(), linear], input_shape=(18,))
    with pytest.raises(ConfigError, match="block 2 is the output block, but Tanh follows"):
        from_modules([nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh()], input_shape=(3,))
    with pytest.raises(ConfigError, match="do not fit an input of shape"):
        from_modules([nn.Linear(3, 4), nn.Linear(5, 2)], input_shape=(3,))


# ----------------------------------------------------------------------- as a run's model


def test_a_model_in_a_run_configuration():
    from gfalign.config import RunConfig

    config = RunConfig(model="lenet5", rule="dfa")
    assert config.label() == "dfa lenet5 seed0"
    assert config.rule_config().hidden_layers == 4  # five blocks, the last the output
    assert RunConfig().key() != config.key()
    assert "model" not in RunConfig().to_data()  # an MLP's key is what it always was
    table = RunConfig(model=MODELS["lenet5"], rule="dfa")
    assert table.key() == config.key()  # a built-in and its table are the same model
    with pytest.raises(ConfigError, match=r"hidden = \[10\] is the MLP's, but model"):
        RunConfig(model="lenet5", hidden=(10,))
    with pytest.raises(ConfigError, match="its output block has 10 units, the autoencoder"):
        RunConfig(model="lenet5", objective="autoencoder")
    small = {"input": [1, 20, 20], "blocks": [{"conv": 2, "kernel": 3}, {"linear": 10}]}
    with pytest.raises(ConfigError, match=r"takes inputs of shape \[1, 20, 20\]"):
        RunConfig(model=small)


def test_train_a_model_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from gfalign.cli import main
    from gfalign.runs import read_metrics

    spec = tmp_path / "small.toml"
    spec.write_text(
        'input = [1, 28, 28]\nactivation = "tanh"\n'
        '[[blocks]]\nconv = 4\nkernel = 5\npool = "max:2"\n'
        "[[blocks]]\nlinear = 10\n"
    )
    common = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "-q"]
    for model, name in ((str(spec), "small"), ("lenet5", "lenet5")):
        out = tmp_path / name
        args = ["train", "--model", model, "--rule", "s1", "--epochs", "2", "--out", str(out)]
        result = CliRunner().invoke(main, [*args, *common])
        assert result.exit_code == 0, result.output
        assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
        assert (
            "[model]" in (out / "config.toml").read_text()
            or "model =" in (out / "config.toml").read_text()
        )
    # A finished LeNet run resumes (its checkpoint holds the conv kernels) to the same numbers.
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "lenet5"), "-q"])
    assert result.exit_code == 0, result.output


def test_an_experiment_cell_names_its_model():
    from gfalign.config import RunConfig
    from gfalign.experiments import cell, from_data

    assert cell(RunConfig(model="lenet5", rule="dfa")) == "lenet5 dfa"
    assert cell(RunConfig(rule="dfa", feedback="B3")) == "2x800 tanh dfa B3"
    experiment = from_data(
        "conv-check",
        {
            "description": "LeNet-5 with three rules",
            "protocol": {"epochs": 1, "seeds": [0, 1]},
            "base": {"model": "lenet5", "dataset": "synthetic"},
            "grid": {"rule": ["bp", "fa", "dfa"]},
        },
    )
    assert experiment.cells() == ["lenet5 bp", "lenet5 fa", "lenet5 dfa"]
    assert len(experiment.configs) == 6


def test_lenet5_forward_equals_biotorchs_lenet_mnist_from_the_same_weights():
    """biotorch's own LeNetMNIST (its package's le_net.py), our weights copied in: the same
    logits in float64, so the two networks are one function (relu after fc1 included)."""
    theirs = biotorch_file("models/le_net.py").LeNetMNIST().double()
    ours = build("lenet5", seed=3, dtype=torch.float64)
    names = ["conv1", "conv2", "conv3", "fc1", "fc2"]
    with torch.no_grad():
        for name, block in zip(names, ours.blocks, strict=True):
            getattr(theirs, name).weight.copy_(block.linear.weight)
            getattr(theirs, name).bias.copy_(block.linear.bias)
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-14)
    # Without the relu after fc1 the two would differ: the test can tell.
    theirs.relu4 = nn.Identity()
    assert not torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_an_mlp_is_the_chain_of_its_linear_blocks_bit_for_bit():
    """mlp() and the same Linear layers read as blocks by from_modules are one model: every
    rule gives them the same deltas and the same updates, to the bit."""
    from gfalign.engine import FeedbackRule
    from gfalign.network import mlp

    for preset in ("bp", "fa", "s2", "dfa-aux", "kp"):
        net = mlp([6, 5, 4, 3], activation="tanh", seed=2, dtype=torch.float64)
        layers = [nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)]
        chain = from_modules(nn.Sequential(*layers).double(), input_shape=(6,))
        chain.load_state_dict(net.state_dict())
        x, y = torch.rand(7, 6, dtype=torch.float64), torch.arange(7) % 3
        steps = []
        for model in (net, chain):
            rule = FeedbackRule(preset, model, seed=1, dtype=torch.float64)
            step = rule.sgd_step(model, x, y, lr=0.1)
            steps.append([*step.deltas.values(), *model.parameters()])
        for ours, theirs in zip(*steps, strict=True):
            assert torch.equal(ours, theirs), preset


def test_lenet5_tanh_is_lenet5_with_tanh_units():
    relu, tanh = model_spec("lenet5"), model_spec("lenet5-tanh")
    assert tanh.blocks == relu.blocks and tanh.input == relu.input
    assert (relu.activation, tanh.activation) == ("relu", "tanh")
    assert [a.name for a in build("lenet5-tanh").activations[:-1]] == ["tanh"] * 4
