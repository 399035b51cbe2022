"""Sensitivity studies: presets that ask why a published cell disagrees with ours.

Every study must load, run the number of configurations its ``cost`` states, address only
published cells, and differ from the experiment it addresses in what it says it varies and in
nothing else, so that its runs compare with that experiment's runs seed by seed.
"""

from __future__ import annotations

import re
import sys
from importlib import resources

import pytest
import torch

from gfalign import experiments
from gfalign.config import RunConfig
from gfalign.experiments import PAPER, STUDIES, from_data, load
from gfalign.feedback import FeedbackSpec
from gfalign.rules import ConfigError, resolve
from gfalign.runs import build
from gfalign.sweep import configs_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Grid points and seeds of every study: a change to a study's size must be made here too.
SIZES = {
    "study-batch1": (1, 1),
    "study-bias": (3, 3),
    "study-feedback": (11, 1),
    "study-lr": (20, 1),
    "study-relu": (5, 1),
    "study-s3-aux": (12, 1),
}
# Protocol fields a study changes on purpose without naming them in its grid.
PROTOCOL_CHANGES = {"study-batch1": {"epochs": 100}, "study-relu": {"record_norms": False}}


def _data(name: str) -> dict:
    path = resources.files("gfalign.experiments").joinpath("presets", f"{name}.toml")
    return tomllib.loads(path.read_text())


def _reduced(cell: str) -> str:
    """The published cell a study's cell stands for: a feedback family's parameters and a rule
    name's ``:reading`` dropped (``"2x800 tanh dfa B1:std=0.1"`` -> ``"2x800 tanh dfa B1"``)."""
    return " ".join(token.partition(":")[0] for token in cell.split(" "))


def _published() -> dict[str, set[str]]:
    return {name: set(load(name).paper) for name in PAPER}


def test_every_study_preset_is_found():
    assert tuple(sorted(SIZES)) == STUDIES
    assert not set(STUDIES) & set(experiments.EXPERIMENTS)


@pytest.mark.parametrize("name", STUDIES)
def test_a_study_expands_to_its_runs(name):
    study = load(name)
    points, seeds = SIZES[name]
    assert len(study.points()) == points
    assert len(study.configs) == points * seeds == len(configs_for(study))
    assert len({c.key() for c in study.configs}) == len(study.configs)
    assert len(study.expand(seeds=2)) == points * 2
    assert len(configs_for(study, quick=True)) == points * seeds


@pytest.mark.parametrize("name", STUDIES)
def test_a_study_states_its_question_cost_and_cells(name):
    data, study = _data(name), load(name)
    question, cost = data["question"], data["cost"]
    assert question.endswith("?") and question.count("?") == 1, "one question, one sentence"
    assert re.match(rf"{len(study.configs)} runs? x \d+ epochs", cost), cost
    assert "core-" in cost
    published = _published()
    addresses = data["addresses"]
    assert len(set(addresses)) == len(addresses)
    for address in addresses:
        experiment, _, cell = address.partition(":")
        assert experiment in PAPER and cell in published[experiment], address
    covered = {_reduced(experiments.cell(c)) for c in study.points()}
    for address in addresses:
        assert address.partition(":")[2] in covered, f"{address}: no run of {name} stands for it"
    every = {f"{e}:{c}" for e, cells in published.items() for c in cells}
    for reduced in covered:
        hits = {a for a in every if a.endswith(f":{reduced}")}
        assert hits <= set(addresses), f"{name} runs {reduced} but does not address it"


def _undone(study, config: RunConfig) -> RunConfig:
    """``config`` with the study's changes undone: its variant's fields back to the base's, the
    feedback family without parameters, a rule reading back to the rule it reads."""
    changes = {}
    for part in filter(None, study.variant(config).split(" ")):
        key = part.partition("=")[0]
        changes[key] = experiments.field_of(study.base, key)
    changes.update(PROTOCOL_CHANGES.get(study.name, {}))
    changes["feedback"] = FeedbackSpec.parse(config.feedback).family
    if not isinstance(config.rule, str):
        changes["rule"] = config.rule_name.partition(":")[0]
    return config.override(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
    )


@pytest.mark.parametrize("name", STUDIES)
def test_a_study_changes_only_what_it_names(name):
    """Undo what a study varies and each of its runs is a run of the paper's experiments (or of
    the baselines, for a reference rule): same protocol, same seed, same key."""
    study = load(name)
    known = {c.key() for e in PAPER for c in load(e).expand(seeds=max(study.seeds) + 1)}
    for config in study.configs:
        undone = _undone(study, config)
        assert undone.key() != config.key(), f"{config.label()} changes nothing"
        assert undone.key() in known, f"{config.label()} differs from its experiment's run"


def test_variants_name_what_a_study_changes():
    lr, bias = load("study-lr"), load("study-bias")
    assert {lr.variant(c) for c in lr.configs} == {"lr=0.003", "lr=0.01"}
    assert {lr.variant(c) for c in lr.configs if c.hidden == (800, 800)} == {"lr=0.003", "lr=0.01"}
    assert {bias.variant(c) for c in bias.configs} == {"bias_init=zeros"}
    assert [load("study-batch1").variant(c) for c in load("study-batch1").configs] == [
        "batch_size=1"
    ]
    feedback = load("study-feedback")
    assert {feedback.variant(c) for c in feedback.configs} == {""}  # the name shows it
    assert "2x800 tanh dfa B2:tiled=true" in feedback.cells()
    for name in experiments.EXPERIMENTS:
        experiment = load(name)
        expected = {
            "conv-lr": {  # the rate, and the dataset where not the base's
                f"{d}{r}".strip()
                for d in ("", "dataset=fashion-mnist ")
                for r in ("lr=0.1", "lr=0.01", "", "lr=0.0001")
            },
            "field-lenet": {"lr=0.01", "", "lr=0.0001"},  # a rate per rule
            "conv-cifar": {"lr=0.1", "lr=0.01", "", "lr=0.0001"},
            "transformer": {"", "lr=0.0003"},
            "conv-budget": {  # the budget, and the dataset and rate where not the common ones
                f"{d}{r}epochs={e} schedule=multistep:milestones={m},gamma=0.1"
                for d in ("", "dataset=fashion-mnist ")
                for r in ("lr=0.01 ", "")
                for e, m in ((20, "[8, 12, 16]"), (40, "[16, 24, 32]"))
            },
            "conv": {
                f"{d}{r}".strip()
                for d in ("", "dataset=fashion-mnist ")
                for r in ("lr=0.01", "", "lr=0.0001")
            }
            | {"dataset=fashion-mnist lr=0.1"},  # s1-aux, as Fashion-MNIST's screening chose
        }.get(name, {""})
        assert {experiment.variant(c) for c in experiment.points()} == expected, name


def test_study_cells_are_the_addressed_cells_with_their_reading():
    assert load("study-s3-aux").cells()[:2] == [
        "2x200 tanh s3-aux:above-final",
        "2x200 tanh s3-aux:below-final",
    ]
    lr = load("study-lr")
    assert list(dict.fromkeys(experiments.cell(c) for c in lr.points()))[:4] == [
        "2x200 sigmoid bp",
        "2x200 sigmoid s1",
        "2x200 sigmoid s2",
        "2x200 sigmoid s3",
    ]
    assert {(c.hidden, c.rule) for c in lr.configs if c.hidden == (800, 800)} == {
        ((800, 800), "s2")
    }


def test_the_s3_aux_readings_are_what_they_say():
    study = load("study-s3-aux")
    readings = {c.rule_name: c.rule_config() for c in study.points()}
    above, below = readings["s3-aux:above-final"], readings["s3-aux:below-final"]
    assert above.describe() == (
        "layer 2: d = mean(direct(e^i), below(t^(i-1))) * f'(a)\n"
        "layer 1: d = mean(direct(e^i), above(d^(i+1))) * f'(a)"
    )
    assert below.describe() == (
        "layer 2: d = mean(direct(e^i), below(d^(i-1))) * f'(a)\n"
        "layer 1: d = mean(direct(e^i), above(t^(i+1))) * f'(a)"
    )
    assert above.order() == (2, 1) and below.order() == (1, 2)
    # Deeper networks keep the reading: final deltas flow one way, so no cycle.
    assert resolve(study.points()[0].rule, 4).order() == (4, 3, 2, 1)
    # The reading the study leaves out: both sources final is a cycle, refused.
    both = {
        "name": "s3-aux:both-final",
        "template": {
            "top": {"terms": ["direct:auxiliary", "below"]},
            "bottom": {"terms": ["direct:auxiliary", "above"]},
        },
    }
    with pytest.raises(ConfigError, match="cycle"):
        resolve(both, 2)


def test_every_study_run_builds_and_learns_on_a_small_network():
    """Each configuration of every study (at width 8) gives finite gradients in every layer;
    zero biases start at zero."""
    x = torch.rand(6, 784, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    for name in STUDIES:
        for config in load(name).points():
            small = config.override(hidden=[8] * len(config.hidden), alignment=False)
            net, rule = build(small)
            if small.bias_init == "zeros":
                assert all(layer.bias.abs().max() == 0 for layer in net.layers)
            rule.backward(net, x, y)
            for parameter in net.parameters():
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
            assert any(p.grad.abs().sum() > 0 for p in list(net.parameters())[:-2])


# ---------------------------------------------------------------------------- the loader


def _preset(grid) -> dict:
    return {
        "description": "a test",
        "protocol": {"epochs": 1, "seeds": [0, 1]},
        "base": {"dataset": "synthetic", "hidden": [8, 8]},
        "grid": grid,
    }


def test_grid_tables_follow_one_another():
    experiment = from_data(
        "two-tables",
        _preset(
            [
                {"activation": ["tanh", "relu"], "rule": ["dfa"]},
                {"activation": ["sigmoid"], "rule": ["s1"], "lr": [0.01]},
            ]
        ),
    )
    assert experiment.cells() == ["2x8 tanh dfa", "2x8 relu dfa", "2x8 sigmoid s1"]
    assert len(experiment.tables) == 2 and len(experiment.configs) == 6
    assert [experiment.variant(c) for c in experiment.points()] == ["", "", "lr=0.01"]
    plain = from_data("one-table", _preset({"rule": ["dfa", "fa"]}))
    assert plain.grid == {"rule": ("dfa", "fa")} and plain.tables == (plain.grid,)


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([{"rule": ["dfa"]}, {"rule": ["fa", "dfa"]}], r"\[\[grid\]\] tables both give dfa"),
        ({"rule": "dfa"}, r'\[grid\] rule = "dfa" is not a list; allowed: a list of values'),
        ([{"rule": []}], r"\[grid\] rule is empty"),
        (3, r"grid = 3; allowed: a \[grid\] table, or \[\[grid\]\] tables"),
        ([], r"grid = \[\]; allowed"),
    ],
)
def test_bad_grids_are_refused_in_one_line(grid, message):
    with pytest.raises(ConfigError, match=message) as refusal:
        from_data("bad", _preset(grid))
    assert "\n" not in str(refusal.value)


def test_an_unknown_preset_lists_the_studies():
    with pytest.raises(ConfigError, match="known: exp1, .*, study-batch1, .*study-s3-aux"):
        load("study-nothing")


def test_a_cell_name_shows_what_tells_its_points_apart():
    """Points that share a plain cell name get the fields they differ in; others keep it."""
    screening = load("conv-lr")
    names = screening.cells()
    assert len(names) == len(screening.points())  # every point named apart
    assert "lenet5 fa xavier dataset=mnist lr=0.01" in names  # screened on both datasets
    assert "lenet5 fa lr=0.0001" in names  # uniform feedback: on MNIST only
    conv = load("conv")
    assert len(conv.cells()) == len(conv.points())
    assert "lenet5 bp dataset=fashion-mnist" in conv.cells()
    assert load("exp1").cells()[0] == "2x200 tanh s1"  # the paper's grids: plain names
    assert load("study-lr").cells()[0] == "2x200 sigmoid bp lr=0.003"


def test_a_reference_table_names_cells_of_the_grid():
    data = {
        "base": {"hidden": [20], "dataset": "synthetic"},
        "grid": {"rule": ["bp", "fa"]},
        "reference": {"source": "elsewhere", "values": {"1x20 tanh bp": 2.0}},
    }
    assert from_data("x", data).reference["values"] == {"1x20 tanh bp": 2.0}
    data["reference"]["values"] = {"1x20 tanh dfa": 2.0}
    with pytest.raises(ConfigError, match=r"\[reference\] values for cells not in the grid"):
        from_data("x", data)
    data["reference"] = {"values": {"1x20 tanh bp": "2"}}
    with pytest.raises(ConfigError, match="allowed: \\[reference\\] with source"):
        from_data("x", data)
