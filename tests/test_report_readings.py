"""Readings of the protocol: one change on every cell read, judged by one count."""

from __future__ import annotations

import sys

import pytest

from gfalign import experiments
from gfalign.report import write_report
from gfalign.report.readings import readings
from gfalign.report.studies import addressed_cell, changes_from_grid, preset_data
from gfalign.rules import ConfigError
from gfalign.store import Store
from test_report_support import fill, line, presets

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STEP = """description = "A larger step on every 2x200 sigmoid cell"
question = "Does three times the step bring more 2x200 sigmoid cells within 0.20?"
cost = "6 runs x 100 epochs 2x200 = ~12 core-min"
reads = ["exp1:2x200 sigmoid *"]

[protocol]
seeds = [0, 1]

[change]
lr = 0.003
"""

WRITTEN = """description = "A signal the engine lacks"
question = "Does the written signal help?"
cost = "54 runs"
reads = ["exp2:2x200 *"]
needs = "a direct-term signal written-out"

[protocol]
seeds = [0, 1, 2]

[change]
direct_error = "written-out"
"""


@pytest.mark.parametrize("name", experiments.READINGS)
def test_every_run_of_a_reading_is_its_cells_run_with_the_one_change(name):
    """Each reading's run of a cell differs from the cell's run in its experiment by the
    reading's change only, and it reads every cell its reads name, with 3 seeds."""
    data = preset_data(name)
    cells = experiments.reading_cells(name, data)
    if data.get("needs"):
        with pytest.raises(ConfigError, match="needs"):
            experiments.load(name)
        return
    reading = experiments.load(name)
    assert reading.seeds == (0, 1, 2)
    points = reading.points()
    assert [(e, addressed_cell(p)) for (e, _c), p in zip(cells, points, strict=True)] == cells
    (key, value), *_ = data["change"].items()
    for (experiment_name, name_read), point in zip(cells, points, strict=True):
        changes = changes_from_grid(experiment_name, name_read, point)
        if key in ("side_feedback", "direct_error"):
            assert changes and all(c.startswith("rule") for c in changes), changes
            assert str(value) in " ".join(changes)
        else:
            assert len(changes) == 1 and key in changes[0].split(":")[0].split("."), changes


def test_the_side_feedback_change_reaches_every_neighbour_term_and_no_direct_one():
    reading = experiments.load("reading-relu-side-xavier")
    point = next(p for p in reading.points() if reading.cell(p).startswith("2x200 relu s3:"))
    terms = [t for layer in point.rule["template"].values() for t in layer["terms"]]
    sides = [t for t in terms if isinstance(t, dict)]
    assert sides and all(t["feedback"] == "xavier" for t in sides)
    assert {t["kind"] for t in sides} == {"above", "below"}
    assert all(t == "direct" for t in terms if not isinstance(t, dict))


def test_a_reading_explains_cells_only_judged_on_all_it_reads(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets", {"reading-step": STEP})
    store = Store(tmp_path / "runs.sqlite")
    # paper: s1 2.45, s2 2.51, s3 2.63; the protocol has s3 within 0.20 only
    fill(store, "exp1", {"2x200 sigmoid s1": [2.92, 2.90], "2x200 sigmoid s2": [2.90, 2.94]})
    fill(store, "exp1", {"2x200 sigmoid s3": [2.70, 2.72]})
    reading = experiments.from_data("reading-step", tomllib.loads(STEP))
    fill(store, "reading-step", {"2x200 sigmoid s1": [2.50]}, experiment=reading)
    out = tmp_path / "out"
    write_report(["exp1"], store, out)
    index = (out / "README.md").read_text()
    # one seed of one cell: a screening, which counts but explains nothing
    assert line(index, "| [reading-step](reading-step.md) |") == (
        "| [reading-step](reading-step.md) | lr = 0.003 | 3 | 1 / 6 | 1 | 0 | 1 | 1 | 0 "
        "| screening |"
    )
    assert "No reading is judged yet" in index
    assert line((out / "exp1.md").read_text(), "| 2x200 sigmoid s1 |").endswith("unexplained |")

    # every cell with both seeds: s1 and s2 brought within, s3 taken out: 2 against 1
    fill(
        store,
        "reading-step",
        {"2x200 sigmoid s1": [2.50, 2.40], "2x200 sigmoid s2": [2.60, 2.56]},
        experiment=reading,
    )
    fill(store, "reading-step", {"2x200 sigmoid s3": [3.00, 3.10]}, experiment=reading)
    write_report(["exp1"], store, out)
    index = (out / "README.md").read_text()
    assert line(index, "| [reading-step](reading-step.md) |") == (
        "| [reading-step](reading-step.md) | lr = 0.003 | 3 | 6 / 6 | 3 | 1 | 2 | 2 | 1 | judged |"
    )
    assert "Best judged reading: [reading-step](reading-step.md), 2 of 3 published cells" in index
    exp1 = (out / "exp1.md").read_text()
    assert line(exp1, "| 2x200 sigmoid s1 |").endswith(
        "| explained by [reading-step](reading-step.md) |"
    )
    assert line(exp1, "| 2x200 sigmoid s3 |").endswith("| within 0.20 |")
    page = (out / "reading-step.md").read_text()
    assert "It helps some cells and hurts others." in page
    assert "- Taken out: 2x200 sigmoid s3" in page
    assert line(page, "| [exp1](exp1.md): 2x200 sigmoid s2 |").startswith(
        "| [exp1](exp1.md): 2x200 sigmoid s2 | 2.51 | 2.92 ± 0.03 | 2 | no | 2.58 ± 0.03 | 2 "
        "| +0.07 |"
    )


def test_a_reading_no_better_than_the_protocol_explains_nothing(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets", {"reading-step": STEP})
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x200 sigmoid s1": [2.92, 2.90], "2x200 sigmoid s2": [2.50, 2.52]})
    fill(store, "exp1", {"2x200 sigmoid s3": [2.70, 2.72]})
    reading = experiments.from_data("reading-step", tomllib.loads(STEP))
    values = {"2x200 sigmoid s1": [2.45, 2.45], "2x200 sigmoid s2": [3.0, 3.0]}
    fill(store, "reading-step", values | {"2x200 sigmoid s3": [3.0, 3.0]}, experiment=reading)
    out = tmp_path / "out"
    write_report(["exp1"], store, out)
    assert line((out / "exp1.md").read_text(), "| 2x200 sigmoid s1 |").endswith("unexplained |")
    assert "no more than the protocol's: it explains none" in (out / "reading-step.md").read_text()


def test_a_reading_the_engine_cannot_train_is_planned_without_numbers(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets", {"reading-written": WRITTEN})
    (found,) = readings(["reading-written"])
    assert found.experiment is None and found.planned == 27
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp2", {"2x200 tanh s1-aux": [2.40, 2.41, 2.42]})
    out = tmp_path / "out"
    write_report(["exp2"], store, out)
    assert line((out / "README.md").read_text(), "| [reading-written](reading-written.md) |") == (
        '| [reading-written](reading-written.md) | direct_error = "written-out" | 9 | 0 / 27 | 0 '
        "| — | — | — | — | needs an engine option |"
    )
    page = (out / "reading-written.md").read_text()
    assert "Not trained: it needs a direct-term signal written-out. Planned: 27 runs" in page
    assert "| [exp2](exp2.md): 2x200 tanh s1-aux | 2.42 | 2.41 ± 0.01 | 3 | yes | — | 0 |" in page


def test_a_reading_refuses_a_grid_of_its_own_and_a_cell_it_cannot_find():
    data = tomllib.loads(STEP)
    with pytest.raises(ConfigError, match="grid given"):
        experiments.from_data("reading-x", data | {"grid": {"lr": [0.01]}})
    with pytest.raises(ConfigError, match="matches no cell of exp1"):
        experiments.from_data("reading-x", data | {"reads": ["exp1:9x9 *"]})
    with pytest.raises(ConfigError, match="seeds only"):
        experiments.from_data("reading-x", data | {"protocol": {"lr": 0.1}})
