"""The report's figures: what each preset names, drawn as its caption says."""

from __future__ import annotations

import math
import sys
from importlib import resources

import pytest

from gfalign import experiments, plots
from gfalign.plots import WIDTH, Panel, Series, panels_figure
from gfalign.report import write_report
from gfalign.report.figures import figure_specs
from gfalign.rules import ConfigError
from gfalign.store import Store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from test_report_support import fill, presets


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Every ``plot_panels`` call of the report: figure name -> (panels, title)."""
    presets(monkeypatch, tmp_path / "presets")
    seen: dict[str, tuple] = {}
    real = plots.plot_panels

    def record(panels, path, **options):
        seen[path.stem] = (list(panels), options.get("title"))
        return real(panels, path, **options)

    monkeypatch.setattr(plots, "plot_panels", record)
    return seen


def _series(panel: Panel) -> dict[str, Series]:
    return {s.label.split(",")[0]: s for s in panel.series}


def _set_history(store: Store, name: str, change) -> None:
    kept = ("experiment", "label", "config", "status", "epochs_done", "final")
    for row in store.list(name):
        store.upsert(row["key"], history=change(row), **{k: row[k] for k in kept})


def test_figure_8_draws_coinciding_families_apart_and_says_so(tmp_path, drawn):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp4", {f"2x800 tanh dfa B{n}": [2.9, 3.0] for n in (1, 4, 7)})

    def shift(row):  # B4 runs 0.3 points above B1 and B7 at every epoch
        bump = 0.3 if row["config"]["feedback"] == "B4" else 0.0
        return [dict(r, test_error=r["test_error"] + bump) for r in row["history"]]

    _set_history(store, "exp4", shift)
    out = tmp_path / "out"
    write_report(["exp4"], store, out)
    (panel,), _title = drawn["exp4-figure8"]
    series = _series(panel)
    assert (series["B1"].layer, series["B7"].layer, series["B4"].layer) == (
        "under",
        "over",
        "normal",
    )
    assert panel.note == "B1 and B7 coincide seed by seed (2 seeds, ≤ 0.00 apart)"
    page = (out / "exp4.md").read_text()
    assert "drawn dotted over a wide pale line and named on the figure: dfa: B1 and B7" in page
    assert "B4 and" not in panel.note


def test_figure_4_draws_every_seed_and_the_baselines_dashed(tmp_path, drawn):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.1, 2.2], "2x800 tanh s2": [2.3]})
    fill(store, "exp1", {"2x800 tanh s2": [2.3, 2.4]}, curves=False)  # seed 1: final only
    fill(store, "exp1", {"2x800 tanh s2": [2.3]})  # seed 0 keeps its curve
    fill(store, "baselines", {"2x800 tanh bp": [1.9, 1.8]})
    fill(store, "baselines", {"2x800 tanh fa": [1.7, 1.75]}, curves=False)
    out = tmp_path / "out"
    write_report(["exp1", "baselines"], store, out)
    (panel,), title = drawn["exp1-figure4"]
    assert title == "Figure 4 (exp1): test error (%) of the 2x800 tanh network"
    series = _series(panel)
    assert list(series) == ["s1", "s2", "bp baseline", "fa baseline"]
    s1, s2, bp, fa = series.values()
    assert s1.seeds and len(s1.curves) == 3 and not s1.finals and not s1.dashed
    assert len(s2.curves) == 1 and s2.finals == ((5.0, 2.4),)
    assert s2.label == "s2, 2 seeds (1 final only)"
    assert bp.dashed and len(bp.curves) == 2 and not bp.seeds
    assert fa.dashed and not fa.curves and sorted(v for _e, v in fa.finals) == [1.7, 1.75]
    assert fa.label == "fa baseline, 2 seeds (final only)"
    caption = (out / "exp1.md").read_text()
    assert "the bp/fa baselines dashed" in caption
    assert "each seed with a per-epoch history a thin line, their mean a thick one" in caption
    assert "baseline with no per-epoch history is a dashed level at the mean of its" in caption
    assert "crosses at their last epoch" in caption


def test_the_activation_curves_show_test_and_training_error_per_size(tmp_path, drawn):
    store = Store(tmp_path / "runs.sqlite")
    cells = {f"{size} sigmoid {r}": [2.5, 2.6] for size in ("2x200", "2x800") for r in ("s1",)}
    fill(store, "exp1", cells)
    fill(store, "baselines", {"2x200 sigmoid bp": [2.1]})

    def train(row):
        return [dict(r, train_error=5.0 / r["epoch"]) for r in row["history"]]

    _set_history(store, "exp1", train)
    write_report(["exp1"], store, tmp_path / "out")
    panels, _title = drawn["exp1-curves-sigmoid"]
    assert [p.title for p in panels] == [
        "2x200 sigmoid",
        "2x800 sigmoid",
        "2x200 sigmoid, training",
        "2x800 sigmoid, training",
    ]
    assert [p.scale for p in panels] == ["log", "log", "symlog", "symlog"]
    assert panels[2].reference == (0.01, "0.01%")
    assert [s.label for s in panels[0].series] == ["s1", "bp baseline"]  # no per-panel counts
    assert [s.label for s in panels[1].series] == ["s1"]
    assert "exp1-curves-relu" not in drawn  # no relu run: a note, not an empty figure
    page = (tmp_path / "out" / "exp1.md").read_text()
    assert "Curves, relu (exp1): no finished relu runs yet." in page


def test_alignment_panels_keep_the_legend_outside_the_data(tmp_path, drawn):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.1], "2x800 tanh s3": [2.2]}, angles=True)
    write_report(["exp1"], store, tmp_path / "out")
    panels, _title = drawn["exp1-alignment"]
    assert [p.title for p in panels] == ["hidden layer 1", "hidden layer 2"]
    assert all(p.scale == "linear" and p.reference[0] == 90.0 for p in panels)
    figure = panels_figure(panels)
    assert figure.get_figwidth() <= WIDTH
    assert all(ax.get_legend() is None for ax in figure.axes)
    assert len(figure.legends) == 1
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["s1", "s3"]


def test_a_figure_keeps_empty_panels_in_their_place_and_its_width():
    line = Series("s1", curves=(([1, 2], [3.0, 2.0]),))
    figure = panels_figure(
        [Panel("a", (line,), "e"), Panel("b", (), "e"), Panel("c", (line,), "e")], columns=3
    )
    assert figure.get_figwidth() == WIDTH and len(figure.axes) == 3
    assert figure.axes[1].texts[0].get_text() == "no runs"
    with pytest.raises(ValueError, match="no panel has a curve"):
        panels_figure([Panel("a", (), "e")])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("x = 3", "[figures] x: not a table with a kind; allowed: seeds, families"),
        ('x = { kind = "pie" }', "[figures] x: unknown kind 'pie'; allowed: seeds"),
        ('x = { kind = "seeds" }', "[figures] x: kind 'seeds' needs network"),
        (
            'x = { kind = "seeds", network = "2x800 tanh", colour = "red" }',
            "unknown option(s) ['colour'] for kind 'seeds'; allowed: baselines, network, title",
        ),
        ('x = { kind = "filters", count = 0 }', "count = 0; allowed: a positive number"),
        ('x = { kind = "alignment", angle = "weight" }', "angle = 'weight'; allowed: \"update\""),
        ('x = { kind = "norms", norm = "bias" }', "norm = 'bias'; allowed: \"weight\""),
        ('x = { kind = "families", network = "2x800 tanh", rules = "dfa" }', "rules = 'dfa'"),
    ],
)
def test_a_figure_entry_is_checked(entry, message):
    with pytest.raises(ConfigError) as error:
        figure_specs("exp9", tomllib.loads(f"[figures]\n{entry}\n"))
    assert str(error.value).startswith("experiment preset exp9: ") and message in str(error.value)


def test_a_preset_without_figures_draws_none():
    assert figure_specs("exp9", {"description": "none"}) == []
    assert [s.name for s in figure_specs("exp4")] == ["figure8", "alignment"]
    assert experiments.load("exp4")  # the loader accepts the [figures] table


def test_conv_figures_keep_each_dataset_apart_and_name_rules_without_the_model(tmp_path, drawn):
    store = Store(tmp_path / "runs.sqlite")
    fill(
        store,
        "conv",
        {
            "lenet5 bp dataset=mnist": [1.0, 1.1],
            "lenet5 fa xavier dataset=mnist": [1.5],
            "lenet5 bp dataset=fashion-mnist": [9.0],
        },
        angles=True,
    )
    write_report(["conv"], store, tmp_path / "out")
    mnist, title = drawn["conv-mnist"]
    assert title.endswith("on mnist")
    lines = {s.label.split(",")[0] for p in mnist for s in p.series}
    assert lines == {"bp", "fa xavier"}
    final = {s.label.split(",")[0]: [c[1][-1] for c in s.curves] for p in mnist for s in p.series}
    assert final["bp"] == [1.0, 1.1]  # MNIST's two seeds, not Fashion's
    fashion, _ = drawn["conv-fashion"]
    assert [c[1][-1] for p in fashion for s in p.series for c in s.curves] == [9.0]
    aligned, title = drawn["conv-alignment-mnist"]
    assert [p.title for p in aligned] == ["block 1", "block 2"] and title.endswith("on mnist")
    assert {s.label.split(",")[0] for p in aligned for s in p.series} == {"bp", "fa xavier"}


def test_a_screening_draws_the_final_value_against_the_rate(tmp_path, drawn):
    """conv-lr: one line per rule over the rates, one point per rate; diverged runs named."""
    store = Store(tmp_path / "runs.sqlite")
    screening = experiments.load("conv-lr")
    fill(
        store,
        "conv-lr",
        {
            "lenet5 bp dataset=mnist lr=0.1": [9.0],
            "lenet5 bp dataset=mnist lr=0.01": [3.0],
            "lenet5 bp dataset=mnist lr=0.001": [5.0],
            "lenet5 bp dataset=fashion-mnist lr=0.01": [20.0],  # the other figure's
        },
    )
    fill(store, "conv-lr", {"lenet5 fa lr=0.1": [1.0]}, status="diverged")

    def validated(row):  # the screening scores the validation split
        return [dict(r, validation_error=r["test_error"]) for r in row["history"]]

    _set_history(store, "conv-lr", validated)
    kept = ("experiment", "label", "config", "status", "epochs_done", "history")
    for row in store.list("conv-lr"):
        final = dict(row["final"], validation_error=row["final"]["test_error"])
        store.upsert(row["key"], final=final, **{k: row[k] for k in kept})
    write_report(["conv-lr"], store, tmp_path / "out")
    panels, title = drawn["conv-lr-rates"]
    assert "after the last epoch" in title
    (bp,) = [s for s in panels[0].series if s.label == "bp"]
    (curve,) = bp.curves  # seed 0, over the rates in increasing order
    assert list(curve[0]) == [0.001, 0.01, 0.1] and list(curve[1]) == [5.0, 3.0, 9.0]
    assert panels[0].xscale == "log" and panels[0].xlabel == "lr"
    fashion, _ = drawn["conv-lr-rates-fashion"]
    (bp,) = [s for s in fashion[0].series if s.label == "bp"]
    assert [list(c[1]) for c in bp.curves] == [[20.0]]
    page = (tmp_path / "out" / "conv-lr.md").read_text()
    assert "Diverged, so not drawn: fa at lr 0.1" in page
    assert screening.metric == "validation_error"


def test_a_budget_screening_draws_both_budgets_and_names_none_in_its_caption(tmp_path, drawn):
    """conv-budget varies the epochs: a line per budget, the caption not claiming one."""
    store = Store(tmp_path / "runs.sqlite")
    budget = experiments.load("conv-budget")
    names = [budget.cell(c) for c in budget.points() if "bp" in c.rule and c.dataset == "mnist"]
    fill(store, "conv-budget", {n: [1.0] for n in names}, metric="validation_error")
    write_report(["conv-budget"], store, tmp_path / "out")
    panels, _ = drawn["conv-budget-mnist"]
    labels = {s.label.split(",")[0] for p in panels for s in p.series}
    assert len(labels) == 2 and all("epochs=" in label for label in labels)
    page = (tmp_path / "out" / "conv-budget.md").read_text()
    (caption,) = [ln for ln in page.splitlines() if ln.startswith("*LeNet-5 epoch budget, MNIST")]
    assert "None" not in caption and "epochs as each line's label names them" in caption


def test_the_norm_figures_draw_each_layers_norm_per_epoch_one_line_per_rule(
    tmp_path, drawn, monkeypatch
):
    """study-relu records norms (record_norms): a panel per layer, the output's named so,
    each rule's line its recorded values; runs without norms are named, not drawn."""
    study = resources.files("gfalign.experiments").joinpath("presets", "study-relu.toml")
    presets(monkeypatch, tmp_path / "presets", {"study-relu": study.read_text()})
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "study-relu", {"2x200 relu bp": [2.0], "2x200 relu s3-aux": [70.0]})

    def normed(row):  # s3-aux's weights grow tenfold an epoch; bp's stay at 1
        grow = 10.0 if row["config"]["rule"] == "s3-aux" else 1.0
        return [
            dict(r, **{f"weight_norm_{i}": grow ** r["epoch"] * i for i in (1, 2, 3)})
            for r in row["history"]
        ]

    _set_history(store, "study-relu", normed)
    write_report(["study-relu"], store, tmp_path / "out")
    panels, title = drawn["study-relu-weights"]
    assert title == "Norms (study-relu): weight norm, 2x200 relu"
    assert [p.title for p in panels] == ["hidden layer 1", "hidden layer 2", "layer 3 (output)"]
    lines = {s.label.split(",")[0]: s for s in panels[1].series}
    assert set(lines) == {"bp", "s3-aux"}
    (curve,) = lines["s3-aux"].curves
    assert list(curve[1]) == [10.0**e * 2 for e in range(1, 6)]
    page = (tmp_path / "out" / "study-relu.md").read_text()
    assert "Norms (study-relu): these runs recorded no norms" in page  # deltas, updates


def test_a_figure_gives_every_line_its_own_colour_and_wraps_a_long_title(tmp_path, monkeypatch):
    """One legend serves every panel, so no two of its 15 lines share a colour; a title
    longer than the figure is wide is wrapped, not cut at the edges."""
    series = [Series(f"rule {n}", curves=(([1, 2], [3.0, 2.0]),)) for n in range(15)]
    panels = [Panel("a", tuple(series[:8]), "error"), Panel("b", tuple(series[8:]), "error")]
    figure = panels_figure(panels)
    colours = [line.get_color() for ax in figure.axes for line in ax.get_lines()]
    assert len(set(colours)) == 15
    written = {}
    monkeypatch.setattr(plots, "_write", lambda figure, path: written.setdefault("f", figure))
    title = "LeNet-5 learning-rate screening, Fashion-MNIST (conv-lr): validation error (%) "
    plots.plot_panels(panels, tmp_path / "f.png", title=title + "after the last epoch")
    text = written["f"].get_suptitle()
    assert "\n" in text and text.replace("\n", " ") == title + "after the last epoch"


def test_a_log_axis_over_many_decades_ticks_each_decade():
    """Norms that grow a millionfold get a tick a decade, not the error ticks' 1-100 only."""
    grows = Series("s3-aux", curves=(([1, 2, 3], [10.0, 1e4, 1e7]),))
    (ax,) = panels_figure([Panel("layer 3", (grows,), "weight norm")]).axes
    ticks = [t for t in ax.get_yticks() if 10.0 <= t <= 1e7]
    assert len(ticks) >= 4 and all(math.log10(t).is_integer() for t in ticks)


def test_a_study_figure_draws_each_configuration_beside_the_experiments_run_of_its_cell(
    tmp_path, drawn, monkeypatch
):
    """study-batch1's curves: its batch-1 run and experiment 1's runs of the cell it addresses
    (dashed, the seeds the study has), named for how they differ; other runs left out."""
    study = resources.files("gfalign.experiments").joinpath("presets", "study-batch1.toml")
    presets(monkeypatch, tmp_path / "presets", {"study-batch1": study.read_text()})
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "study-batch1", {"2x200 sigmoid s1": [4.9]})
    fill(store, "exp1", {"2x200 sigmoid s1": [3.0, 2.9], "2x200 sigmoid s2": [2.8]})
    fill(store, "exp1", {"2x200 sigmoid s1": [9.0]}, epochs=7)  # not the planned protocol
    write_report(["study-batch1"], store, tmp_path / "out")
    panels, title = drawn["study-batch1-curves"]
    assert title == "Curves (study-batch1): each addressed cell, study against experiment"
    (panel,) = panels  # no training errors recorded: the test-error panel alone
    assert panel.title == "exp1: 2x200 sigmoid s1"
    lines = {s.label: s for s in panel.series}
    assert set(lines) == {"batch_size=1, epochs=30", "exp1 (its preset)"}
    assert lines["exp1 (its preset)"].dashed and not lines["batch_size=1, epochs=30"].dashed
    assert [c[1][-1] for c in lines["exp1 (its preset)"].curves] == [3.0]  # seed 0's
    assert [c[1][-1] for c in lines["batch_size=1, epochs=30"].curves] == [4.9]
    page = (tmp_path / "out" / "study-batch1.md").read_text()
    assert "the experiment's own runs of the cell with the same seeds dashed" in page
