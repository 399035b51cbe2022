"""Configurations are checked by type and range before anything runs (issue 18).

Every bad value is a ``ConfigError`` of one line naming the key, the value and what is allowed:
from a TOML file and from flags through the real ``gfalign train``, and from the Python API.
Nothing is trained and no run directory is left behind.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from gfalign import FAMILIES, MLP, ConfigError, FeedbackRule, FeedbackSpec, TrainConfig
from gfalign.cli import main
from gfalign.config import RunConfig
from gfalign.experiments import EXPERIMENTS
from gfalign.experiments import load as load_experiment

TINY = 'dataset = "synthetic"\nhidden = [8]\nrule = "dfa"\n'
TINY_TRAIN = "[train]\nepochs = 1\nbatch_size = 64\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train(tmp_path, monkeypatch):
    """``train(*args, toml=...)``: run ``gfalign train`` in an empty directory, data loading
    forbidden; returns the result and the directory that must stay empty of runs."""
    import gfalign.runs

    loaded = []
    monkeypatch.setattr(gfalign.runs, "load_data", lambda *a, **k: loaded.append(a))
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str, toml: str | None = None):
        extra: list[str] = []
        if toml is not None:
            path = tmp_path / "config.toml"
            path.write_text(toml)
            extra = ["--config", str(path)]
        result = CliRunner().invoke(main, ["train", *extra, *args, "--out", "run", "-q"])
        assert not loaded, "the data was loaded for a configuration that should be refused"
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
        return result

    return invoke


def refused(result, *fragments: str) -> str:
    """Non-zero exit, one line ``Error: ...`` holding every fragment and what is allowed."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


FILE_CASES = [
    # (TOML, fragments the one-line message must hold)
    ('hidden = "32"', ['hidden = "32"', "a string, not a list", "allowed: a list of integers"]),
    ('alignment = "no"', ['alignment = "no"', "allowed: true or false"]),
    ("seed = 1.5", ["seed = 1.5", "not an integer", "allowed: an integer >= 0"]),
    ('activation = "softsign"', ['activation = "softsign"', "allowed: one of tanh"]),
    ("train_subset = 0", ["train_subset = 0", "out of range", "allowed: an integer >= 1"]),
    ("test_subset = 2.5", ["test_subset = 2.5", "allowed: an integer >= 1"]),
    ("validation = -1", ["validation = -1", "allowed: an integer >= 0"]),
    ("alignment_probe = 0", ["alignment_probe = 0", "allowed: an integer >= 1"]),
    ('dataset = "mnst"', ['dataset = "mnst"', 'did you mean "mnist"', "synthetic"]),
    ('dtype = "float16"', ['dtype = "float16"', "allowed: one of float32, float64"]),
    ('device = "gpu"', ["got 'gpu'", "allowed: cpu, auto, cuda or cuda:N"]),
    ('weight_init = "he"', ['weight_init = "he"', "xavier_uniform"]),
    ('bias_init = "ones"', ['bias_init = "ones"', "zeros"]),
    ('objective = "regression"', ['objective = "regression"', "autoencoder"]),
    ('feedback = "sparse:density=1.5"', ["density = 1.5", "allowed: a number in (0, 1]"]),
    ("hidden = [8, 0]", ["hidden = [8, 0]", "entry 0", "integers >= 1"]),
    ("hidden = []", ["hidden = []", "empty"]),
    ("hiden = [10]", ["unknown configuration key 'hiden' (did you mean 'hidden'?); known: "]),
]
TRAIN_CASES = [
    (
        'epochs = "1"',
        ['[train] epochs = "1"', "a string, not an integer", "an integer in [1, 100000]"],
    ),
    ("epochs = 0", ["[train] epochs = 0", "out of range", "an integer in [1, 100000]"]),
    ("lr = inf", ["[train] lr = inf", "not finite", "a finite number > 0"]),
    ("lr = -0.1", ["[train] lr = -0.1", "a finite number > 0"]),
    ("batch_size = true", ["[train] batch_size = true", "an integer >= 1"]),
    ('optimizer = "sdg"', ['[train] optimizer = "sdg"', 'did you mean "sgd"', "adam"]),
    ('reduction = "avg"', ['[train] reduction = "avg"', "one of sum, mean"]),
    ("evaluate_train = 1", ["[train] evaluate_train = 1", "true or false"]),
    ("eval_batch_size = 0", ["[train] eval_batch_size = 0", "an integer >= 1"]),
    ("bach_size = 3", ["unknown [train] key 'bach_size' (did you mean 'batch_size'?); known: "]),
    ("optimizer_options = { momentun = 0.9 }", ["unknown option 'momentun'", "'momentum'"]),
    ("optimizer_options = { momentum = -1.0 }", ["optimizer_options = {momentum = -1.0}"]),
]


@pytest.mark.parametrize(("line", "fragments"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_value_in_a_config_file(train, line, fragments):
    key = line.split("=")[0].strip()
    base = "\n".join(row for row in TINY.splitlines() if not row.startswith(key + " "))
    refused(train(toml=f"{base}\n{line}\n{TINY_TRAIN}"), *fragments)


@pytest.mark.parametrize(("line", "fragments"), TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_bad_value_in_the_train_table(train, line, fragments):
    base = "" if line.startswith("batch_size") else "batch_size = 64\n"
    refused(train(toml=f"{TINY}[train]\n{base}{line}\n"), *fragments)


FLAG_CASES = [
    (["--activation", "softsign"], ['activation = "softsign"', "allowed: one of tanh"]),
    (["--feedback", "sparse:density=1.5"], ["density = 1.5", "allowed: a number in (0, 1]"]),
    (["--feedback", "gaussian:std=-1"], ["std = -1", "allowed: a number > 0"]),
    (["--feedback", "B6:dnsity=0.2"], ["unknown parameter 'dnsity' (did you mean 'density'?)"]),
    (["--feedback", "uniform-scaled:std=1"], ["family 'uniform-scaled'", "it takes none"]),
    (["--feedback", "B2:tiled=1"], ["tiled = 1 is not a boolean", "allowed: true or false"]),
    (["--epochs", "0"], ["epochs = 0", "allowed: an integer in [1, 100000]"]),
    (["--lr", "inf"], ["lr = inf", "allowed: a finite number > 0"]),
    (["--lr", "nan"], ["lr = nan", "allowed: a finite number > 0"]),
    (["--train-subset", "0"], ["train_subset = 0", "allowed: an integer >= 1"]),
    (["--test-subset", "-5"], ["test_subset = -5", "allowed: an integer >= 1"]),
    (["--batch-size", "0"], ["batch_size = 0", "allowed: an integer >= 1"]),
    (["--seed", "-1"], ["seed = -1", "allowed: an integer >= 0"]),
    (["--dataset", "cifar"], ['dataset = "cifar"', "mnist, fashion-mnist"]),
    (["--optimizer", "lbfgs"], ['optimizer = "lbfgs"', "sgd, adam"]),
]


@pytest.mark.parametrize(
    ("flags", "fragments"), FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES]
)
def test_bad_flag(train, flags, fragments):
    refused(train("--dataset", "synthetic", "--hidden", "8", "--epochs", "1", *flags), *fragments)


def test_flags_and_files_are_checked_alike(train):
    line = refused(train(toml=TINY + TINY_TRAIN.replace("epochs = 1", "epochs = 0")))
    assert line == refused(train("--dataset", "synthetic", "--hidden", "8", "--epochs", "0"))


# ----------------------------------------------------------------------------- Python API


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"hidden": "32"}, 'hidden = "32": a string, not a list'),
        ({"hidden": (8, 2.5)}, "hidden = [8, 2.5]: entry 2.5"),
        ({"alignment": 1}, "alignment = 1: an integer, not true or false"),
        ({"seed": 1.5}, "seed = 1.5: a float, not an integer"),
        ({"train_subset": 0}, "train_subset = 0: out of range"),
        ({"rule": 3}, "rule = 3: an integer, wrong type"),
        ({"feedback": ["B1"]}, 'feedback = ["B1"]: a list, wrong type'),
        ({"train": {"epochs": 1}}, "train = {epochs = 1}: a table, wrong type"),
        ({"activation": None}, "activation = none: a NoneType, not a string"),
    ],
)
def test_run_config_constructor_checks_types(changes, fragment):
    with pytest.raises(ConfigError) as caught:
        RunConfig(**changes)
    assert fragment in str(caught.value)
    assert "allowed: " in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"epochs": 0}, "[train] epochs = 0: out of range; allowed: an integer in [1, 100000]"),
        ({"epochs": 2.0}, "[train] epochs = 2.0: a float, not an integer"),
        ({"lr": math.inf}, "[train] lr = inf: not finite; allowed: a finite number > 0"),
        ({"lr": 0}, "[train] lr = 0: out of range"),
        ({"lr": "0.1"}, '[train] lr = "0.1": a string, not a number'),
        ({"batch_size": False}, "[train] batch_size = false: a boolean, not an integer"),
        ({"evaluate_train": "yes"}, '[train] evaluate_train = "yes": a string'),
        ({"optimizer_options": {"betas": "x"}, "optimizer": "adam"}, "adam refuses them"),
    ],
)
def test_train_config_checks_types_and_ranges(changes, fragment):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**changes)
    assert fragment in str(caught.value)


def test_auxiliary_errors_need_a_classifier_before_the_run():
    with pytest.raises(ConfigError, match="'dfa-aux' uses auxiliary errors.*autoencoder"):
        RunConfig(objective="autoencoder", rule="dfa-aux")


def test_an_int_is_a_float_and_is_kept_as_given():
    """``lr = 1`` in TOML is an int; it is accepted and kept, so the key does not change."""
    config = RunConfig.from_data({"dataset": "synthetic", "train": {"lr": 1}})
    assert config.train.lr == 1 and type(config.train.to_data()["lr"]) is int
    assert RunConfig.from_data(config.to_data()).key() == config.key()


def test_feedback_rule_refuses_bad_widths_and_seeds():
    with pytest.raises(ConfigError, match=r"widths >= 1, got \[784, 0, 10\]"):
        FeedbackRule("s1", [784, 0, 10])
    with pytest.raises(ConfigError, match="widths >= 1"):
        FeedbackRule("s1", [784, "32", 10])
    with pytest.raises(ConfigError, match="seed must be an integer"):
        FeedbackRule("s1", [784, 8, 10], seed=0.5)
    with pytest.raises(ValueError, match="widths >= 1"):
        MLP([784, "32", 10])
    with pytest.raises(ValueError, match="widths >= 1"):
        MLP([784, 8.0, 10])


@pytest.mark.parametrize("call", ["backward", "deltas", "sgd_step"])
def test_empty_batch_is_refused(call):
    net = MLP([6, 4, 3], seed=0)
    rule = FeedbackRule("s1", net.sizes)
    options = {"lr": 0.1} if call == "sgd_step" else {}
    with pytest.raises(ConfigError, match=r"empty batch of shape \(0, 6\)"):
        getattr(rule, call)(net, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), **options)
    with pytest.raises(ConfigError, match=r"shape \(2, 5\).*\(N, 6\)"):
        getattr(rule, call)(net, torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), **options)


def _keyword_parameters(name):
    import inspect

    signature = inspect.signature(FAMILIES[name])
    return [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]


def _default(name, parameter):
    import inspect

    return inspect.signature(FAMILIES[name]).parameters[parameter].default


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_parameter_is_checked(name):
    """Densities in (0, 1], stds and widths > 0, every value a finite number, no stray names."""
    with pytest.raises(ValueError, match="unknown parameter|it takes none"):
        FeedbackSpec(name, {"bogus": 1.0})
    for parameter in _keyword_parameters(name):
        bad = [math.nan, math.inf, "0.1", True]
        if isinstance(_default(name, parameter), bool):  # a switch: true or false
            bad = [math.nan, 1, 0, "true"]
        if parameter == "density":
            bad += [0, 0.0, -0.1, 1.5]
        if parameter in ("std", "width"):
            bad += [0, 0.0, -1]
        for value in bad:
            with pytest.raises(ValueError, match=f"{parameter} = "):
                FeedbackSpec(name, {parameter: value})
            with pytest.raises(ConfigError, match=f"{parameter} = "):
                RunConfig(feedback={"family": name, parameter: value})


def test_uniform_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="low = 1 and high = 0.5"):
        FeedbackSpec("uniform", {"low": 1})
    FeedbackSpec("uniform", {"low": -2, "high": 2})


def test_valid_configurations_keep_their_keys():
    """Every run stored in results/ still loads, with the key it was stored under."""
    path = ROOT / "results" / "runs.jsonl.gz"
    if not path.exists():
        pytest.skip("no results/runs.jsonl.gz in this checkout")
    with gzip.open(path, "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    assert rows
    for row in rows:
        config = RunConfig.from_data(row["config"])
        assert config.key() == row["key"], row["label"]
        assert config.to_data() == row["config"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_still_load(name):
    assert load_experiment(name).configs


# ----------------------------------------------------------------------------- property


TOML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
RUN_KEYS = [f.name for f in fields(RunConfig) if f.name != "train"] + ["train", "unknown_key"]
TRAIN_KEYS = [f.name for f in fields(TrainConfig) if f.name != "seed"] + ["seed", "epoch"]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(RUN_KEYS), TOML_VALUES, max_size=3),
    st.dictionaries(st.sampled_from(TRAIN_KEYS), TOML_VALUES, max_size=3),
)
def test_random_values_are_a_config_error_or_a_config(top, train_table):
    data = {"dataset": "synthetic", "hidden": [4], **top}
    if "train" not in top:
        data["train"] = train_table
    try:
        config = RunConfig.from_data(data)
    except ConfigError as error:
        text = str(error)
        assert "\n" not in text and text
        return
    assert RunConfig.from_data(config.to_data()).key() == config.key()


TERMS = st.sampled_from(["direct", "above", "below", "backprop", "above:direct-only", "dirct"])
LAYER = st.fixed_dictionaries(
    {},
    optional={
        "terms": TOML_VALUES | st.lists(TERMS | TOML_VALUES, max_size=3),
        "combine": TOML_VALUES | st.sampled_from(["mean", "sum"]),
    },
)
RULE = st.fixed_dictionaries(
    {"name": TOML_VALUES},
    optional={
        "layers": TOML_VALUES
        | st.lists(LAYER, max_size=3)
        | st.dictionaries(st.sampled_from(["1", "2", "x"]), LAYER | TOML_VALUES),
        "template": TOML_VALUES
        | st.dictionaries(st.sampled_from(["only", "top", "all", "x"]), LAYER | TOML_VALUES),
        "feedback": TOML_VALUES | st.sampled_from(["B1:std=0", "B6:density=x", "uniform:low=3"]),
    },
)


@settings(max_examples=300, deadline=None)
@given(RULE, st.integers(min_value=1, max_value=3), st.text(max_size=16))
def test_random_rule_tables_and_feedback_strings_are_a_config_error_or_a_config(
    rule, depth, feedback
):
    for data in ({"hidden": [4] * depth, "rule": rule}, {"hidden": [4], "feedback": feedback}):
        try:
            config = RunConfig.from_data({"dataset": "synthetic", **data})
        except ConfigError as error:
            assert "\n" not in str(error) and str(error)
            continue
        assert RunConfig.from_data(config.to_data()).key() == config.key()
