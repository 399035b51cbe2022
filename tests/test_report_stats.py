"""Statistics over seeds and verdicts, against closed forms computed by hand."""

from __future__ import annotations

import math

import pytest

from gfalign import experiments
from gfalign.report import describe, render_report, summarize
from gfalign.report.render import Table
from gfalign.report.tables import TOLERANCE, best_epoch, welch
from gfalign.store import Store
from test_report_support import fill, line, presets


@pytest.fixture(autouse=True)
def _no_studies(monkeypatch, tmp_path):
    presets(monkeypatch, tmp_path / "presets")


def _t2(p: float) -> float:
    """Student's t quantile at p for 2 degrees of freedom: (2p - 1) / sqrt(2 p (1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.mark.parametrize(
    ("values", "reference"),
    [([2.0, 2.2, 2.4], 1.96), ([1.72, 1.77, 1.88], 1.96), ([3.1, 2.2, 2.9], 2.75)],
)
def test_three_seeds_against_the_closed_form_of_two_degrees_of_freedom(values, reference):
    s = describe(values, reference)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = _t2(0.975) * std / math.sqrt(3)
    t = (mean - reference) / (std / math.sqrt(3))
    assert (s.n, s.mean, s.std) == (3, pytest.approx(mean), pytest.approx(std))
    assert s.ci == (pytest.approx(mean - half), pytest.approx(mean + half))
    # Two degrees of freedom: CDF(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - |t| / sqrt(2 + t^2).
    assert s.p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))


def test_one_seed_has_no_interval_and_two_no_test():
    one = describe([2.5], reference=2.0)
    assert (one.n, one.mean, one.std, one.ci, one.p) == (1, 2.5, 0.0, None, None)
    two = describe([1.8, 1.9], reference=1.0)
    low, high = two.ci
    half = math.tan(math.pi * 0.475) * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1 df)
    assert (low, high) == (pytest.approx(1.85 - half), pytest.approx(1.85 + half))
    assert two.p is None
    assert describe([2.0, 2.2, 2.4]).p is None  # no reference, no test
    with pytest.raises(ValueError, match="at least one"):
        describe([])


def test_equal_seeds_give_a_point_interval_and_a_decided_test():
    flat = describe([1.81, 1.81, 1.81], reference=2.03)
    assert flat.ci == (pytest.approx(1.81), pytest.approx(1.81)) and flat.p == 0.0
    assert describe([2.03, 2.03, 2.03], reference=2.03).p == 1.0


def test_the_best_epoch_is_the_first_lowest_finite_value():
    records = [
        {"epoch": 1, "test_error": 3.0},
        {"epoch": 2, "test_error": float("nan")},
        {"epoch": 3, "test_error": 2.5},
        {"epoch": 4},
        {"epoch": 5, "test_error": 2.5},
        {"epoch": 6, "test_error": 2.7},
    ]
    assert best_epoch(records, "test_error") == (3.0, 2.5)
    assert best_epoch([{"epoch": 1}], "test_error") is None
    assert best_epoch([], "test_error") is None


def test_the_best_epoch_column_averages_the_seeds_with_a_history(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.4, 1.9]})
    kept = ("experiment", "label", "config", "status", "epochs_done", "final")
    for row in store.list("exp1"):
        records = [dict(r) for r in row["history"]]
        if row["config"]["seed"] == 0:  # its lowest epoch is epoch 2, at 1.5
            records[1]["test_error"] = 1.5
        if row["config"]["seed"] == 2:  # final values only, as a CSV import
            records = []
        store.upsert(row["key"], history=records, **{k: row[k] for k in kept})
    (row,) = [r for r in summarize(experiments.load("exp1"), store.list("exp1")) if r["n"]]
    assert (row["best"], row["best_epochs"], row["best_n"]) == (
        pytest.approx((1.5 + 2.4) / 2),
        [2.0, 5.0],
        2,
    )
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert "| 1.95 (epochs 2–5; 2 of 3 seeds) |" in line(text, "| 2x800 tanh s1 |")


@pytest.mark.parametrize(
    ("offset", "verdict"),
    [(TOLERANCE, "within 0.20"), (-TOLERANCE, "within 0.20"), (0.21, "unexplained")],
)
def test_the_verdict_is_within_when_the_mean_is_at_most_the_tolerance_away(
    tmp_path, offset, verdict
):
    store = Store(tmp_path / "runs.sqlite")
    paper = experiments.load("exp1").paper["2x400 relu s2"]
    fill(store, "exp1", {"2x400 relu s2": [paper + offset - 0.05, paper + offset + 0.05]})
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert line(text, "| 2x400 relu s2 |").endswith(f"| {verdict} |")


def test_a_tiny_p_value_is_shown_as_a_bound(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x200 tanh s1": [3.00, 3.01, 3.02, 3.00, 3.01]})
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert "| <0.001 |" in line(text, "| 2x200 tanh s1 |")


def test_a_reference_column_and_the_validation_selected_epoch(tmp_path):
    """conv: biotorch's values beside ours (no verdict), and each seed's test error at the epoch
    of its lowest validation error, averaged; the test set never chooses."""
    store = Store(tmp_path / "runs.sqlite")
    conv = experiments.load("conv")
    fill(store, "conv", {"lenet5 bp dataset=mnist": [1.0, 1.2, 1.1]})
    kept = ("experiment", "label", "config", "status", "epochs_done", "final")
    for row in store.list("conv"):
        records = [dict(r) for r in row["history"]]
        for n, record in enumerate(records, start=1):
            record["validation_error"] = 5.0 - 0.5 * n  # the last epoch validates best...
        if row["config"]["seed"] == 0:  # ...but seed 0's validation is lowest at epoch 2
            records[1]["validation_error"] = 0.5
            records[1]["test_error"] = 3.0
        best = 1 + min(range(len(records)), key=lambda n: records[n]["validation_error"])
        for record in records:
            record["best_epoch"] = best
        store.upsert(row["key"], history=records, **{k: row[k] for k in kept})
    (row,) = [r for r in summarize(conv, store.list("conv")) if r["n"]]
    last = len(store.list("conv")[0]["history"])
    assert row["reference"] == 0.91 and row["verdict"] is None
    assert row["selected"] == pytest.approx((3.0 + 1.2 + 1.1) / 3)
    assert row["selected_epochs"] == [2, last, last]
    text = render_report(conv, store.list("conv"))
    cells = [c.strip() for c in line(text, "| lenet5 bp dataset=mnist |").split("|")[1:-1]]
    assert cells[1] == "0.91" and cells[2] == "1.10 ± 0.10" and cells[5] == "+0.19"
    assert f"1.77 (epochs 2–{last})" in cells
    assert "Reference: biotorch's Benchmarks.md" in text and "verdict" not in line(text, "| cell")


def test_the_standing_ranks_each_groups_best_and_marks_overlapping_intervals():
    from gfalign.report.standing import groups_of, standing
    from gfalign.rules import ConfigError

    conv = experiments.load("conv")

    def row(cell, values):
        return {
            "cell": cell,
            "baseline": False,
            "values": values,
            "selected_values": [v - 0.5 for v in values],  # what the validation chose
            "epochs": 20,
            "subset": None,
        }

    summary = [
        row("lenet5 bp dataset=mnist", [1.0, 1.1, 1.2]),
        row("lenet5 fa xavier dataset=mnist", [3.0, 3.1, 3.2]),
        row("lenet5 dfa xavier dataset=mnist", [2.0, 2.1, 2.2]),
        row("lenet5 s1 xavier dataset=mnist", [1.1, 1.3, 1.2]),
        row("lenet5 bp dataset=fashion-mnist", [9.0]),
        row("lenet5 s1 xavier dataset=fashion-mnist lr=0.1", [9.5]),  # its own rate there
        row("lenet5 fa xavier lr=0.1 dataset=mnist (outside the plan)", [0.1]),
    ]
    groups = {"backprop": ["bp"], "fa, dfa": ["fa xavier", "dfa xavier"], "s": ["s1 xavier"]}
    text = "\n".join(
        getattr(b, "text", "") + "\n".join(getattr(b, "items", ()))
        for b in standing(conv, summary, groups)
    )
    assert "at the epoch of the lowest validation error" in text
    assert "fa, dfa: best dfa xavier, 1.60 ± 0.10 (3 seeds, 95% CI 1.35–1.85)" in text
    # bp and s1 overlap; dfa's interval lies above both.
    assert "from best to worst: backprop (0.60) ≈ s (0.70) < fa, dfa (1.60)" in text
    assert "On fashion-mnist:" in text and "backprop: bp, 8.50 (1 seed)" in text
    assert "s: s1 xavier, 9.00 (1 seed)" in text  # ranked with its dataset, not apart
    assert "backprop (8.50) ≈ s (9.00)" in text
    assert "lr=0.1" not in text  # a run outside the plan is not ranked
    assert groups_of("conv", {"standing": groups}) == {k: tuple(v) for k, v in groups.items()}
    with pytest.raises(ConfigError, match=r"\[standing\] s = 's1'; allowed"):
        groups_of("conv", {"standing": {"s": "s1"}})
    # Which rule beats which: Welch intervals on the selected values, lowest mean first.
    mnist, fashion = [b for b in standing(conv, summary, groups) if isinstance(b, Table)]
    assert [r[0] for r in fashion.rows] == ["bp", "s1 xavier"]
    assert [r[0] for r in mnist.rows] == ["bp", "s1 xavier", "dfa xavier", "fa xavier"]
    assert mnist.rows[0][3] == "dfa xavier, fa xavier"  # bp vs s1: the interval holds 0
    assert mnist.rows[1][3] == "dfa xavier, fa xavier" and mnist.rows[2][3] == "fa xavier"
    assert mnist.rows[3][1:] == ("2.60 ± 0.10", "3", "—")
    difference, (low, high) = welch([1.6, 1.7, 1.8], [0.6, 0.7, 0.8])  # dfa against bp
    half = 2.7764451051977987 * math.sqrt(2 * 0.01 / 3)  # t(0.975, 4 df): equal spreads
    assert (difference, low, high) == pytest.approx((1.0, 1.0 - half, 1.0 + half))
