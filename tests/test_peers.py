"""The biotorch peer harness (benchmarks/peers/biotorch_lenet.py): its fa step equals ours from
the same weights and kernels in float64, it trains end to end on a tiny budget and skips what
its file holds, and the conv page puts its runs beside ours only under the planned protocol."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("biotorch", reason="biotorch is not installed (pip install --no-deps biotorch)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks/

from benchmarks.peers import biotorch_lenet as peer  # noqa: E402

from gfalign.engine import FeedbackRule  # noqa: E402
from gfalign.models import build  # noqa: E402
from gfalign.train import make_optimizer  # noqa: E402

NAMES = ("conv1", "conv2", "conv3", "fc1", "fc2")


def _same_weights(theirs, ours) -> None:
    with torch.no_grad():
        for name, block in zip(NAMES, ours.blocks, strict=True):
            block.linear.weight.copy_(getattr(theirs.module, name).weight)
            block.linear.bias.copy_(getattr(theirs.module, name).bias)


def _one_step(mode: str, preset: str):
    """One float64 step of biotorch's ``mode`` and of our ``preset`` on LeNet-5, from
    biotorch's forward weights with its feedback kernels copied into ours (hidden block i's
    term holds the kernel of biotorch's layer i + 1); both models' gradients match to 1e-14."""
    theirs = peer.lenet(mode, seed=5, dtype=torch.float64)
    ours = build("lenet5", seed=0, dtype=torch.float64)
    _same_weights(theirs, ours)
    rule = FeedbackRule(preset, ours, feedback="xavier", seed=1, dtype=torch.float64)
    for layer in range(1, len(NAMES)):
        kernel = getattr(theirs.module, NAMES[layer]).weight_backward
        assert not torch.equal(rule.feedback(layer, 0)["weight"], kernel)
        rule.set_feedback(layer, 0, {"weight": kernel})
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=generator)
    peer.step(theirs, mode, x, y)
    rule.backward(ours, x, y, reduction="mean")
    for name, block in zip(NAMES, ours.blocks, strict=True):
        layer = getattr(theirs.module, name)
        torch.testing.assert_close(block.linear.weight.grad, layer.weight.grad, rtol=0, atol=1e-14)
        torch.testing.assert_close(block.linear.bias.grad, layer.bias.grad, rtol=0, atol=1e-14)
    return theirs, ours, x, y


def test_the_harness_fa_step_equals_ours_from_the_same_weights_and_kernels():
    """biotorch's fa (the harness's step and optimizer) and our ``fa``: the same gradients and
    the same weights after an SGD step of the conv protocol (momentum, weight decay)."""
    theirs, ours, x, y = _one_step("fa", "fa")
    settings = peer.protocol("fa", "mnist", 0).train
    theirs_step = make_optimizer(settings, [p for p in theirs.parameters() if p.requires_grad])
    ours_step = make_optimizer(settings, list(ours.parameters()))
    theirs_step.step()
    ours_step.step()
    for name, block in zip(NAMES, ours.blocks, strict=True):
        layer = getattr(theirs.module, name)
        torch.testing.assert_close(block.linear.weight, layer.weight, rtol=0, atol=1e-14)

    # The comparison can fail: biotorch's backprop is not its fa from the same weights.
    other = peer.lenet("backpropagation", seed=5, dtype=torch.float64)
    peer.step(other, "backpropagation", x, y)
    assert not torch.allclose(other.module.conv1.weight.grad, theirs.module.conv1.weight.grad)


def test_our_dfa_conv_step_equals_biotorchs_dfa_from_the_same_weights_and_kernels():
    """biotorch's dfa sends e to each layer's input through that layer's kernel of n_out
    output channels, tiled over its output map: our ``dfa-conv`` (a ``tiled`` term per hidden
    block, the kernel of the block above) computes the same gradients, and our dense ``dfa``
    does not."""
    theirs, ours, x, y = _one_step("dfa", "dfa-conv")
    dense = FeedbackRule("dfa", ours, feedback="xavier", seed=1, dtype=torch.float64)
    dense.backward(ours, x, y, reduction="mean")
    assert not torch.allclose(ours.blocks[0].linear.weight.grad, theirs.module.conv1.weight.grad)


@pytest.mark.parametrize("rule", list(peer.MODES))
def test_every_biotorch_mode_steps(rule):
    """Each mode biotorch's LeNet is converted to computes finite gradients for every trained
    parameter (dfa's hooks included), and its fixed feedback never receives one."""
    model = peer.lenet(peer.MODES[rule], seed=0)
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    loss = peer.step(model, peer.MODES[rule], x, y)
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name


def test_the_protocol_is_the_conv_runs():
    """A peer run's configuration is our conv run's: its key is one the experiment plans."""
    from gfalign.experiments import load

    planned = {c.key() for c in load("conv").configs}
    for rule in peer.MODES:
        assert peer.protocol(rule, "fashion-mnist", 2).key() in planned
    assert peer.protocol("dfa", "mnist", 0).train.lr == 0.001
    assert peer.protocol("fa", "mnist", 0, epochs=2).key() not in planned
    with pytest.raises(peer.PeerError, match="biotorch has no rule 'kp'"):
        peer.protocol("kp", "mnist", 0)


def test_a_tiny_run_end_to_end_and_its_skip(real_mnist_dir, tmp_path, capsys):
    """One epoch on 512 examples through the command line: one JSON line with the protocol,
    a per-epoch history and finite errors; a second call skips it."""
    out = tmp_path / "peers" / "biotorch-lenet.jsonl"
    command = ["--rule", "fa", "--seed", "0", "--epochs", "1", "--train-subset", "512"]
    command += ["--test-subset", "500", "--out", str(out), "--data-dir", real_mnist_dir]
    assert peer.main(command) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["peer"] == "biotorch" and record["mode"] == "fa"
    assert record["cell"] == "lenet5 fa xavier dataset=mnist"
    assert record["config"]["train"]["epochs"] == 1 and record["config"]["train_subset"] == 512
    assert (
        record["key"]
        == peer.protocol("fa", "mnist", 0, epochs=1, train_subset=512, test_subset=500).key()
    )
    (epoch,) = record["history"]
    assert epoch["lr"] == 0.01 and 0 <= epoch["test_error"] <= 100
    assert record["final"]["test_error"] == epoch["test_error"]
    assert record["final"]["best_epoch"] == 1
    assert "epoch   1" in capsys.readouterr().err
    assert peer.main(command) == 0
    assert len(out.read_text().splitlines()) == 1
    assert "skipped" in capsys.readouterr().err


def test_a_damaged_peer_file_is_refused(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"peer": "biotorch"}\nnot json\n')
    with pytest.raises(peer.PeerError, match="runs.jsonl:2: not a JSON line"):
        peer.read_runs(path)
