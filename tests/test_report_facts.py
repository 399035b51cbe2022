"""Facts: the numbers a discussion may cite, computed from the store, and the check of a text."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfalign import experiments
from gfalign.report import collect_facts, render_report, unmatched
from gfalign.report.facts import Fact, group_facts, quoted_numbers, run_facts
from gfalign.report.provenance import counts
from gfalign.report.rows import experiment_rows
from gfalign.store import Store
from test_report_support import MACHINE, fill, line, presets


def _run(store: Store, records: list[dict], **overrides) -> None:
    """One exp1 2x200 relu s3 run (seed 0) with the given per-epoch history."""
    exp1 = experiments.load("exp1")
    config = next(c for c in exp1.expand(seeds=1, **overrides) if exp1.cell(c) == "2x200 relu s3")
    store.upsert(
        config.key(),
        experiment="exp1",
        label=config.label(),
        config=config.to_data(),
        status="finished",
        epochs_done=len(records),
        final=records[-1],
        history=records,
        seconds=60.0,
        versions=MACHINE,
    )


def _records() -> list[dict]:
    tests = [9.0, 4.0, 3.5, 3.1, 3.2, 3.3, 3.0, 3.4]
    trains = [8.0, 3.0, 1.0, 0.5, 0.005, 0.2, 0.0, 0.0017]
    losses = [3150.0, 40.0, 2.0, 1.0, 1.2e5, 0.3, 0.2, 0.1]
    return [
        {
            "epoch": n + 1,
            "test_error": test,
            "train_error": train,
            "batch_loss": loss,
            "update_angle_1": 50.0 + 5 * ((-1) ** n) * n,
            "update_angle_2": 80.0 - n,
        }
        for n, (test, train, loss) in enumerate(zip(tests, trains, losses, strict=True))
    ]


def test_a_runs_facts_are_read_off_its_history(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    _run(store, _records(), epochs=8)
    facts = {f.quantity: f for f in run_facts("exp1", store.list("exp1"), planned=(8, None))}
    assert {q: f.subject for q, f in facts.items()}["last epoch"] == "2x200 relu s3 seed 0"
    assert facts["last epoch"].value == 3.4
    assert (facts["best"].value, facts["best epoch"].value) == (3.0, 7.0)
    assert facts["train, last"].text == "0.0017"  # a small training error keeps 4 decimals
    assert facts["train, epoch 6"].value == 0.2  # three quarters of 8 epochs
    assert facts["train < 0.01% from epoch"].value == 5.0  # 0.005 at epoch 5
    assert (facts["batch loss, first"].text, facts["batch loss, max"].text) == ("3.15e3", "1.2e5")
    angles = [50.0 + 5 * ((-1) ** n) * n for n in range(8)]
    assert (facts["angle 1, min"].value, facts["angle 1, max"].value) == (min(angles), max(angles))
    assert (facts["angle 2, min"].value, facts["angle 2, last"].value) == (73.0, 73.0)
    other = run_facts("exp1", store.list("exp1"))  # 8 epochs is not the planned protocol
    assert other[0].subject == "2x200 relu s3 seed 0 (8 epochs)"


def test_a_run_with_a_validation_split_gives_its_selected_epoch_and_validation_curve(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    records = _records()
    validation = [9.5, 4.2, 3.3, 3.6, 3.4, 3.45, 3.5, 3.42]
    for record, value in zip(records, validation, strict=True):
        record["validation_error"], record["best_epoch"] = value, 3
    _run(store, records, epochs=8)
    facts = {f.quantity: f for f in run_facts("exp1", store.list("exp1"), planned=(8, None))}
    # selected by the validation split at epoch 3: the test error there, not the test's best
    assert (facts["selected"].value, facts["selected epoch"].value) == (3.5, 3.0)
    assert facts["validation, epoch 6"].value == 3.45 and facts["validation, last"].value == 3.42
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    header = line(text, "| run |")
    assert "| best (epoch) | validation-selected (epoch) | validation, ¾ / last |" in header
    assert "| 3.00 (7) | 3.50 (3) | 3.45 (ep 6) / 3.42 |" in line(text, "| 2x200 relu s3 seed 0")
    _run(store, _records(), epochs=8)  # no validation split: no such facts, no such columns
    assert not any("validation" in f.quantity for f in run_facts("exp1", store.list("exp1")))
    assert "validation" not in line(
        render_report(experiments.load("exp1"), store.list("exp1")), "| run |"
    )


def test_activation_facts_span_the_final_errors_of_its_runs(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x200 sigmoid s1": [2.9, 3.1], "2x800 sigmoid s2": [2.4]})
    kept = ("experiment", "label", "config", "status", "epochs_done", "history")
    for n, row in enumerate(store.list("exp1")):
        final = dict(row["final"], train_error=[0.17, 2.69, 0.8][n])
        store.upsert(row["key"], final=final, **{k: row[k] for k in kept})
    facts = {f.quantity: f.value for f in group_facts("exp1", store.list("exp1"))}
    assert facts == {
        "runs": 3,
        "last epoch, min": 2.4,
        "last epoch, max": 3.1,
        "train, last, min": 0.17,
        "train, last, max": 2.69,
        "runs at 0 train error": 0,
    }


def test_the_facts_section_lists_every_run(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets")
    store = Store(tmp_path / "runs.sqlite")
    _run(store, _records())
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert "\n### Facts\n" in text
    assert line(text, "| relu |") == "| relu | 1 | 3.40 | 0.0017 | 0 |"
    assert line(text, "| 2x200 relu s3 seed 0 |") == (
        "| 2x200 relu s3 seed 0 | 3.40 | 3.00 (7) | 0.20 (ep 6) | 0.0017 | 5 "
        "| 3.15e3 / 1.2e5 | 15.0–80.0 (15.0) | 73.0–80.0 (73.0) |"
    )


def test_quoted_numbers_skip_code_link_targets_and_integers():
    text = (
        "s1 reaches 1.79 ± 0.07 (`1.23` in code), [see 4.56](page-7.89.md), 100 epochs, "
        "a loss of 3.15e3 and −0.17 points.\n\n```\n9.99\n```\n"
    )
    assert [q.text for q in quoted_numbers(text)] == ["1.79", "0.07", "4.56", "3.15e3", "−0.17"]


def test_unmatched_names_the_numbers_no_fact_prints():
    facts = [
        Fact("exp1", "2x800 tanh s1", "mean", 1.7925),
        Fact("exp1", "2x800 tanh s1", "std", 0.0698),
        Fact("exp1", "2x800 tanh s1", "difference", -0.1675),
        Fact("exp1", "2x200 relu s3 seed 0", "batch loss, first", 3150.0, -3),
    ]
    good = "s1: 1.79 ± 0.07, −0.17 points from the paper (a first loss of 3.15e3); 1.8 rounded."
    assert unmatched(good, facts) == []
    bad = unmatched("s1: 1.79 ± 0.08, loss 3.2e4", facts)
    assert [(q.text, q.value) for q in bad] == [("0.08", 0.08), ("3.2e4", 32000.0)]
    assert "± 0.08" in bad[0].context


def test_a_discussion_written_from_the_report_checks_out(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets")
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [1.77, 1.72, 1.88]})
    fill(store, "baselines", {"2x800 tanh bp": [1.90, 1.91, 1.71]})
    facts = collect_facts(["exp1", "baselines"], store)
    text = render_report(experiments.load("exp1"), store.list("exp1"), store.list("baselines"))
    mean = line(text, "| 2x800 tanh s1 |").split(" | ")[2]
    discussion = f"s1 gives {mean} against the paper's 1.96; bp spans 1.71–1.91."
    assert unmatched(discussion, facts) == []
    assert [q.text for q in unmatched(discussion.replace("1.71", "1.70"), facts)] == ["1.70"]
    assert any(f.quantity == "p" and f.subject == "2x800 tanh s1" for f in facts)
    assert pytest.approx(1.79) == next(
        f.value for f in facts if (f.subject, f.quantity) == ("2x800 tanh s1", "mean")
    )


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


@pytest.fixture(scope="module")
def published_facts(tmp_path_factory):
    """Every fact the report computes from the store exported beside the pages."""
    from gfalign.experiments import EXPERIMENTS, READINGS, STUDIES

    export = RESULTS / "runs.jsonl.gz"
    if not export.is_file():
        pytest.skip("no results/ export beside the tests")
    with Store(tmp_path_factory.mktemp("store") / "runs.sqlite") as store:
        store.import_file(export)
        return collect_facts([*EXPERIMENTS, *STUDIES, *READINGS], store, tune_dir=RESULTS / "tune")


def _without_section(markdown: str, heading: str) -> str:
    """``markdown`` less its ``## heading`` section (up to the next ``## `` heading)."""
    kept, skipping = [], False
    for text in markdown.splitlines():
        if text.startswith("## "):
            skipping = text[3:].strip() == heading
        if not skipping:
            kept.append(text)
    return "\n".join(kept)


def _pages() -> list[Path]:
    return sorted(RESULTS.glob("*.md"))


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_every_published_page_quotes_only_numbers_the_store_gives(page, published_facts):
    """Each page of results/ (the generated ones and the hand-written discussion) against the
    store exported beside it: every decimal number it quotes is one of the facts the report
    computes from those runs (or a number its preset states: a protocol, a planned cost)."""
    assert [q.context for q in unmatched(page.read_text(), published_facts)] == []


def test_the_readme_quotes_only_numbers_the_store_gives(published_facts):
    """The README likewise, but for its Performance section: speed measured by `gfalign
    bench` and the benchmark scripts, not by stored runs."""
    text = _without_section((ROOT / "README.md").read_text(), "Performance")
    assert [q.context for q in unmatched(text, published_facts)] == []


def test_a_number_no_run_gives_fails_the_check(published_facts):
    exp1 = next(f for f in published_facts if (f.experiment, f.quantity) == ("exp1", "mean"))
    wrong = f"{exp1.value + 1000.1234:.4f}"
    assert [q.text for q in unmatched(f"ours is {wrong}", published_facts)] == [wrong]


def test_runs_a_grid_tells_apart_by_its_dataset_have_facts_of_their_own(tmp_path):
    """conv's bp on MNIST and on Fashion-MNIST: the same cell and seed, two subjects."""
    store = Store(tmp_path / "runs.sqlite")
    values = {"lenet5 bp dataset=mnist": [1.05], "lenet5 bp dataset=fashion-mnist": [11.87]}
    fill(store, "conv", values)
    conv = experiments.load("conv")
    facts = run_facts("conv", store.list("conv"), planned=(20, None), name=conv.cell)
    last = {f.subject: f.value for f in facts if f.quantity == "last epoch"}
    assert last == {
        "lenet5 bp dataset=mnist seed 0": 1.05,
        "lenet5 bp dataset=fashion-mnist seed 0": 11.87,
    }
    text = render_report(conv, store.list("conv"))
    assert line(text, "| lenet5 bp dataset=mnist seed 0 |").split("|")[2].strip() == "1.05"
    assert line(text, "| lenet5 bp dataset=fashion-mnist seed 0 |").split("|")[2].strip() == "11.87"


def test_a_references_published_value_is_a_fact_a_text_may_set_beside_ours(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "conv", {"lenet5 bp dataset=mnist": [1.05, 1.15]})
    facts = collect_facts(["conv"], store)
    found = {(f.subject, f.quantity): f.text for f in facts}
    assert found["lenet5 bp dataset=mnist", "reference"] == "0.91"  # biotorch's, with runs
    assert found["lenet5 bp dataset=fashion-mnist", "reference"] == "9.20"  # and without
    assert unmatched("bp: 1.10 against biotorch's 0.91 and 9.20", facts) == []


def test_a_screening_shares_the_runs_of_the_experiment_it_screens(tmp_path):
    """conv-budget's 20-epoch cells are conv's runs (one row per configuration in the store):
    the screening's page counts them, each cell under its own budget."""
    store = Store(tmp_path / "runs.sqlite")
    budget = experiments.load("conv-budget")
    name = next(budget.cell(c) for c in budget.points() if c.train.epochs == 20)
    # stored as conv's: the experiment it screens ran it first
    fill(store, "conv", {name: [1.07]}, experiment=budget, metric="validation_error")
    facts = collect_facts(["conv-budget"], store)
    assert {(f.subject, f.quantity) for f in facts if f.value == 1.07} >= {(name, "mean")}
    assert counts(budget, experiment_rows(store, budget)) == (
        "Runs: 1 of 16 planned finished (16 cells × 1 seed, 20 or 40 epochs)."
    )
