"""A built-in model's default protocol: applied to what a command line or a configuration file
leaves unset, never part of a model's data or a run's key, and every preset learns with it."""

import json

import pytest
from click.testing import CliRunner

from gfalign.cli import main
from gfalign.config import RunConfig, with_model_protocol
from gfalign.models import MODELS, model_spec
from gfalign.rules import PRESETS, ConfigError
from gfalign.train import TrainConfig

SMALL = ["--dataset", "synthetic", "--train-subset", "64", "--test-subset", "32", "-q"]


def _trained(tmp_path, *flags: str) -> RunConfig:
    out = tmp_path / "run"
    args = ["train", *flags, "--epochs", "1", "--out", str(out), "--overwrite", *SMALL]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return RunConfig.from_toml(out / "config.toml")


def test_the_protocol_is_no_part_of_the_model_or_the_key():
    """The protocol stays out of ``to_data`` (and so of every key), and an explicit
    configuration trains with what it names, as it did before models had protocols."""
    spec = model_spec("lenet5")
    assert spec.protocol["lr"] > 0 and "protocol" not in spec.to_data()
    without = {k: v for k, v in MODELS["lenet5"].items() if k != "protocol"}
    assert RunConfig(model=without, rule="fa").key() == RunConfig(model="lenet5", rule="fa").key()
    assert RunConfig(model="lenet5", rule="fa").train == TrainConfig()
    assert with_model_protocol(RunConfig(model="lenet5"), {"model"}).key() != (
        RunConfig(model="lenet5").key()
    )
    mlp = RunConfig(rule="dfa")
    assert with_model_protocol(mlp, set()) is mlp  # an MLP has no model protocol


def test_the_command_line_fills_what_it_leaves_unset(tmp_path):
    protocol = MODELS["lenet5"]["protocol"]
    config = _trained(tmp_path, "--model", "lenet5", "--rule", "dfa")
    train = config.train
    assert train.lr == protocol.get("rates", {}).get("dfa", protocol["lr"])
    assert train.optimizer == protocol["optimizer"]
    assert train.optimizer_options == protocol.get("optimizer_options", {})
    assert (train.batch_size, train.reduction) == (protocol["batch_size"], protocol["reduction"])
    assert train.weight_decay == protocol.get("weight_decay", 0.0)
    assert config.feedback == protocol["feedback"]
    # A flag wins over the protocol, field by field.
    config = _trained(
        tmp_path, "--model", "lenet5", "--rule", "fa", "--lr", "0.05", "--feedback", "uniform"
    )
    assert (config.train.lr, config.feedback) == (0.05, "uniform")
    assert config.train.batch_size == protocol["batch_size"]
    # Another optimizer keeps its own options, not the protocol's; a rule's rate wins over lr.
    table = {"input": [1, 28, 28], "blocks": [{"conv": 2, "kernel": 5}, {"linear": 10}]}
    table["protocol"] = {"optimizer_options": {"momentum": 0.9}, "lr": 0.1, "rates": {"fa": 0.3}}
    made = with_model_protocol(RunConfig(model=table, rule="fa"), {"model", "rule"})
    assert (made.train.optimizer_options, made.train.lr) == ({"momentum": 0.9}, 0.3)
    made = with_model_protocol(RunConfig(model=table, rule="bp"), {"model", "optimizer"})
    assert (made.train.optimizer_options, made.train.lr) == ({"momentum": 0.9}, 0.1)  # sgd
    given = {"model", "optimizer"}
    made = with_model_protocol(RunConfig(model=table, train=TrainConfig(optimizer="adam")), given)
    assert made.train.optimizer == "adam" and made.train.optimizer_options == {}
    # A configuration file's keys are set too.
    file = tmp_path / "run.toml"
    file.write_text('model = "lenet5"\nrule = "bp"\n[train]\nlr = 0.2\nbatch_size = 16\n')
    config = _trained(tmp_path, "--config", str(file))
    assert (config.train.lr, config.train.batch_size) == (0.2, 16)
    assert config.train.reduction == protocol["reduction"]
    # The MLP keeps the paper's defaults.
    config = _trained(tmp_path, "--rule", "dfa", "--hidden", "16")
    assert config.train == TrainConfig(epochs=1)


def test_a_model_protocol_is_checked():
    table = {"input": [4], "blocks": [{"linear": 2}]}
    with pytest.raises(ConfigError, match="unknown key 'rate' .*did you mean 'rates'"):
        model_spec({**table, "protocol": {"rate": 0.1}})
    with pytest.raises(ConfigError, match="rates = .*allowed: a table of rule = rate > 0"):
        model_spec({**table, "protocol": {"rates": {"fa": -1}}})
    assert model_spec({**table, "protocol": {"lr": 0.1}}).to_data() == model_spec(table).to_data()


def _learns(rule: str, model: str, data_dir: str, tmp_path, limit: float, *flags: str) -> float:
    out = tmp_path / f"{model}-{rule}"
    args = ["train", "--model", model, "--rule", rule, "--epochs", "1", "--train-subset", "3000"]
    args += ["--data-dir", data_dir, "--out", str(out), "-q", *flags]  # later flags win
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    error = json.loads((out / "summary.json").read_text())["final"]["test_error"]
    assert error < limit, f"{rule} on {model}: {error:.1f}% test error after one epoch"
    return error


# DRTP drives every relu unit of lenet5 without bound (no error term stops it): it learns on
# lenet5-tanh, its authors' setting (test_drtp_learns_lenet5_tanh).
RELU_RULES = [rule for rule in PRESETS if rule != "drtp"]


@pytest.mark.slow
@pytest.mark.parametrize("rule", RELU_RULES)
def test_every_preset_learns_lenet5_in_one_epoch_of_3000_examples(rule, real_mnist_dir, tmp_path):
    _learns(rule, "lenet5", real_mnist_dir, tmp_path, 60.0)


@pytest.mark.parametrize("rule", ["bp", "dfa", "s2"])
def test_bp_dfa_and_s2_learn_lenet5_in_one_epoch(rule, real_mnist_dir, tmp_path):
    """The slow test's smaller variant: three rules (dfa and s2 the slowest to start), the test
    set cut to 2,000 examples."""
    _learns(rule, "lenet5", real_mnist_dir, tmp_path, 60.0, "--test-subset", "2000")


def test_drtp_learns_lenet5_tanh(real_mnist_dir, tmp_path):
    """DRTP in its authors' setting, tanh units (``lenet5-tanh``), under the model's default
    protocol: one epoch of 10,000 examples leaves chance far behind."""
    flags = ("--train-subset", "10000", "--test-subset", "2000")
    _learns("drtp", "lenet5-tanh", real_mnist_dir, tmp_path, 60.0, *flags)


@pytest.mark.slow
def test_drtp_stays_near_chance_on_relu_lenet5(real_mnist_dir, tmp_path):
    """The same run on relu units: the target projection drives them without bound."""
    flags = ("--train-subset", "10000", "--test-subset", "2000")
    error = _learns("drtp", "lenet5", real_mnist_dir, tmp_path, 100.0, *flags)
    assert error > 80.0
