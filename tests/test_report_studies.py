"""Sensitivity studies: the presets that address published cells, and the verdicts they give."""

from __future__ import annotations

import sys

import pytest

from gfalign import experiments
from gfalign.config import RunConfig
from gfalign.report import broken_links, write_report
from gfalign.report.figures import figure_specs
from gfalign.report.studies import addressed_cell, preset_names, studies
from gfalign.rules import ConfigError
from gfalign.store import Store
from test_report_support import fill, line, presets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROTOCOL = """
[protocol]
epochs = 100
batch_size = 32
lr = 0.001
optimizer = "sgd"
reduction = "sum"
seeds = [0, 1]

[base]
alignment = true
dataset = "mnist"
objective = "classification"
"""

STEP = (
    """description = "A larger step for two 2x200 sigmoid cells"
question = "Does three times the step bring the 2x200 sigmoid cells to the paper?"
cost = "4 runs x 100 epochs 2x200 = ~8 core-min"
addresses = ["exp1:2x200 sigmoid s*"]
"""
    + PROTOCOL
    + """feedback = "uniform"

[grid]
hidden = [[200, 200]]
activation = ["sigmoid"]
rule = ["s1", "s2"]
lr = [0.003]
"""
)

NOISE = (
    """description = "Feedback noise of standard deviation 0.1"
question = "Does std 0.1 bring dfa B1 to the paper?"
cost = "2 runs x 100 epochs 2x800 = ~16 core-min"
addresses = ["exp4:2x800 tanh dfa B1", "exp4:2x800 tanh dfa B3"]
"""
    + PROTOCOL
    + """hidden = [800, 800]
activation = "tanh"

[grid]
rule = ["dfa"]
feedback = ["B1:std=0.1"]
"""
)


def _study(name: str, text: str) -> experiments.Experiment:
    data = tomllib.loads(text)
    for key in ("addresses", "question", "cost"):
        data.pop(key)
    return experiments.from_data(name, data)


def test_a_study_run_within_the_tolerance_shows_on_its_page_and_explains_nothing(
    tmp_path, monkeypatch
):
    """A setting chosen for a few cells is not an explanation: the study's page says where it
    lands within 0.20, the verdicts stay the paper's protocol's."""
    presets(monkeypatch, tmp_path / "presets", {"study-step": STEP, "study-noise": NOISE})
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x200 sigmoid s1": [2.92, 2.90], "2x200 sigmoid s2": [2.90]})
    fill(store, "exp4", {"2x800 tanh dfa B1": [2.91, 2.95], "2x800 tanh dfa B3": [3.10]})
    step = _study("study-step", STEP)
    # s1 lands within 0.20 of the paper's 2.45 with the larger step; s2 (paper 2.51) does not.
    fill(
        store,
        "study-step",
        {"2x200 sigmoid s1": [2.50, 2.40], "2x200 sigmoid s2": [3.00]},
        experiment=step,
    )
    noise = _study("study-noise", NOISE)
    fill(store, "study-noise", {"2x800 tanh dfa B1:std=0.1": [2.05, 2.10]}, experiment=noise)
    out = tmp_path / "out"
    written = write_report(["exp1", "exp4"], store, out)
    assert {out / "study-step.md", out / "study-noise.md"} <= set(written)

    exp1 = (out / "exp1.md").read_text()
    assert line(exp1, "| 2x200 sigmoid s1 |").endswith("| unexplained |")
    assert line(exp1, "| 2x200 sigmoid s2 |").endswith("| unexplained |")
    assert "0 explained by a reading of the protocol" in exp1
    exp4 = (out / "exp4.md").read_text()
    assert line(exp4, "| 2x800 tanh dfa B1 |").endswith("| unexplained |")

    index = (out / "README.md").read_text()
    assert "| [exp1](exp1.md) | 27 | 0 | 0 | 2 | 25 |" in index
    assert "| [exp4](exp4.md) | 8 | 0 | 0 | 2 | 6 |" in index
    assert line(index, "| [study-step](study-step.md) |") == (
        "| [study-step](study-step.md) | Does three times the step bring the 2x200 sigmoid "
        "cells to the paper? | 3 published cells | 3 | 4 runs x 100 epochs 2x200 = ~8 core-min |"
    )

    page = (out / "study-step.md").read_text()
    assert "- Question: Does three times the step" in page
    assert "- Cost: 4 runs x 100 epochs 2x200" in page
    assert line(page, "| [exp1](exp1.md): 2x200 sigmoid s1 |") == (
        "| [exp1](exp1.md): 2x200 sigmoid s1 | 2.45 | 2.91 | train.lr: 0.001 → 0.003 "
        "| 2.45 ± 0.07 | 2 | +0.00 | 1.81–3.09 | yes | — , — |".replace(" , ", ", ")
    )
    assert line(page, "| [exp1](exp1.md): 2x200 sigmoid s2 |").split(" | ")[8] == "no"
    assert "| [exp1](exp1.md): 2x200 sigmoid s3 | 2.63 | — | no run yet |" in page
    noise_page = (out / "study-noise.md").read_text()
    assert "feedback: B1 → B1:std=0.1" in noise_page
    assert "| [exp4](exp4.md): 2x800 tanh dfa B3 | 2.40 | 3.10 | no run yet |" in noise_page

    assert broken_links(out) == []
    html = (out / "report.html").read_text()
    assert '<a href="#study-step">study-step</a>' in html and 'id="study-step"' in html
    store.close()


def test_a_run_stands_for_its_cell_without_feedback_parameters():
    plain = RunConfig(hidden=(800, 800), rule="dfa", feedback="B1")
    assert addressed_cell(plain) == "2x800 tanh dfa B1"
    noisy = RunConfig(hidden=(800, 800), rule="dfa", feedback="B1:std=0.1")
    assert addressed_cell(noisy) == "2x800 tanh dfa B1"
    table = RunConfig(hidden=(200, 200), rule="s1", feedback={"family": "B4", "density": 0.2})
    assert addressed_cell(table) == "2x200 tanh s1 B4"
    assert addressed_cell(RunConfig(hidden=(200, 200), activation="relu")) == "2x200 relu s1"


@pytest.mark.parametrize(
    ("addresses", "message"),
    [
        ('"exp1:2x200 tanh s1"', "addresses = 'exp1:2x200 tanh s1'; allowed: a list of"),
        ('["2x200 tanh s1"]', "address '2x200 tanh s1' has no cell; allowed"),
        ('["exp9:2x200 tanh s1"]', "names experiment 'exp9'; allowed: exp1"),
        ('["exp1:2x200 tanh bp"]', "matches no published cell of exp1; allowed: one of"),
        ('["baselines:2x200 tanh bp"]', "it has no [paper] table"),
    ],
)
def test_addresses_are_checked(tmp_path, monkeypatch, addresses, message):
    text = STEP.replace('addresses = ["exp1:2x200 sigmoid s*"]', f"addresses = {addresses}")
    presets(monkeypatch, tmp_path / "presets", {"study-bad": text})
    with pytest.raises(ConfigError, match="experiment preset study-bad: ") as error:
        studies()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_pattern_addresses_every_published_cell_it_matches(tmp_path, monkeypatch):
    text = STEP.replace('["exp1:2x200 sigmoid s*"]', '["exp4:2x800 tanh dfa B*", "exp1:*relu s3"]')
    presets(monkeypatch, tmp_path / "presets", {"study-glob": text})
    (study,) = studies()
    assert study.cells == (
        *(("exp4", f"2x800 tanh dfa B{n}") for n in range(1, 8)),
        ("exp1", "2x200 relu s3"),
        ("exp1", "2x400 relu s3"),
        ("exp1", "2x800 relu s3"),
    )


def test_every_study_preset_addresses_published_cells_and_loads():
    for study in studies():
        assert study.cells, study.name
        assert study.question and study.cost, study.name
        assert study.experiment is not None, study.problem
        for name, cell in study.cells:
            assert cell in experiments.load(name).paper


def test_every_preset_names_figures_the_report_can_draw():
    for name in preset_names():
        for spec in figure_specs(name):
            assert spec.name and spec.kind
    for name in (*experiments.PAPER, "fashion"):
        assert figure_specs(name), name  # each says which figures are its own
