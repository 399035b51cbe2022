"""Inputs too large for any run: widths, feedback shapes, seeds, epochs and depths are refused
in one line before anything is allocated, saying what the machine has or what the range is."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gfalign.cli import main
from gfalign.config import SEED_MAX, RunConfig, machine_memory
from gfalign.rules import ConfigError

QUICK = ["--dataset", "synthetic", "--epochs", "1", "-q"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *phrases: str, status: int = 1) -> str:
    """The one ``Error:`` line of a refused command, checked for ``phrases``."""
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_network_too_large_for_the_machine_is_refused_before_it_is_built(tmp_path):
    total, where = machine_memory()
    out = tmp_path / "run"
    line = refused(
        invoke("train", *QUICK, "--hidden", "1000000000", "--out", out),
        "the MLP 784-1000000000-10 has 795,000,000,010 parameters",
        "needing at least 6.36 TB of memory",
        f"more than {where} has",
    )
    assert "allowed: a network of at most about" in line
    assert not out.exists()
    config = tmp_path / "run.toml"
    config.write_text('dataset = "synthetic"\nhidden = [1000000000]\n[train]\nepochs = 1\n')
    refused(invoke("train", "--config", config, "--out", out, "-q"), "795,000,000,010 parameters")
    model = tmp_path / "wide.toml"
    model.write_text(
        'name = "wide"\ninput = [784]\nblocks = [{linear = 1000000000}, {linear = 10}]\n'
    )
    refused(
        invoke("train", *QUICK, "--model", model, "--out", out),
        "model 'wide' has 795,000,000,010 parameters",
    )
    assert not out.exists()


def test_a_feedback_matrix_too_large_for_the_machine_is_refused():
    refused(
        invoke("feedback", "show", "uniform", "--shape", "100000000x100000000"),
        "a 100000000x100000000 feedback matrix has 10,000,000,000,000,000 parameters",
        "more than this machine has",
    )
    assert invoke("feedback", "show", "uniform", "--shape", "10x20").exit_code == 0


@pytest.mark.parametrize("seed", [2**63, 18446744073709551617])
def test_a_seed_beyond_the_range_is_refused(tmp_path, seed):
    refused(
        invoke("train", *QUICK, "--seed", seed, "--out", tmp_path / "run"),
        f"seed = {seed}: out of range",
        f"from 0 to 2^63 - 1 = {SEED_MAX}",
    )
    refused(invoke("feedback", "show", "uniform", "--seed", seed), "--seed", status=2)
    with pytest.raises(ConfigError, match="out of range"):
        RunConfig(seed=seed)
    assert RunConfig(seed=SEED_MAX, dataset="synthetic").seed == SEED_MAX


def test_epochs_a_run_could_not_finish_are_refused_and_never_written(tmp_path):
    out = tmp_path / "run"
    refused(
        invoke("train", *QUICK[:2], "--epochs", 10**12, "--out", out),
        "[train] epochs = 1000000000000: out of range",
        "allowed: an integer in [1, 100000]",
    )
    assert not out.exists()
    refused(
        invoke("reproduce", "exp1", "--epochs", 10**12, "--store", tmp_path / "s.sqlite"),
        "--epochs",
        "1<=x<=100000",
        status=2,
    )
    assert not (tmp_path / "s.sqlite").exists()


def test_rules_show_bounds_the_depth():
    line = refused(invoke("rules", "show", "s1", "--depth", 10**9), "--depth", status=2)
    assert "1<=x<=1000" in line
    assert invoke("rules", "show", "s1", "--depth", 3).exit_code == 0


def test_the_parameter_count_is_the_built_networks():
    from gfalign import runs

    for config in [
        RunConfig(dataset="synthetic", hidden=(12, 7)),
        RunConfig(dataset="mnist", model="lenet5"),
        RunConfig(dataset="cifar10", model="lenet5-cifar"),
    ]:
        net, _ = runs.build(config)
        assert config.parameters() == sum(p.numel() for p in net.parameters())


def test_memory_is_read_from_the_machine():
    total, where = machine_memory()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemTotal:"))
        assert total == int(line.split()[1]) * 1024
    assert where == "this machine"


def test_a_label_out_of_range_in_the_python_api_is_named_with_the_range():
    import torch

    from gfalign import FeedbackRule, mlp

    net = mlp([4, 3, 10], seed=0)
    rule = FeedbackRule("fa", net)
    with pytest.raises(
        ConfigError, match=r"label 99 is out of range; allowed: class indices in \[0, 10\)"
    ):
        rule.backward(net, torch.rand(2, 4), torch.tensor([1, 99]))
    with pytest.raises(ConfigError, match=r"label -1 is out of range"):
        rule.sgd_step(net, torch.rand(2, 4), torch.tensor([-1, 2]), lr=0.1)


def test_inputs_that_are_not_finite_are_named_not_returned_as_a_nan_loss():
    import torch

    from gfalign import FeedbackRule, mlp
    from gfalign.data.errors import DataError

    net = mlp([4, 3, 2], seed=0)
    rule = FeedbackRule("dfa", net)
    x = torch.rand(3, 4)
    x[1, 2] = float("nan")
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(DataError, match=r"the inputs hold 1 NaN or infinite values of 12"):
        rule.sgd_step(net, x, torch.tensor([0, 1, 0]), lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
