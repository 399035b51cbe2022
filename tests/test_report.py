"""The report: tables beside the paper's numbers, figures, the HTML page, autoencoder figures."""

from __future__ import annotations

import base64
import math
import re

import pytest
import torch
from click.testing import CliRunner

from gfalign import data, experiments, plots
from gfalign import report as reports
from gfalign.cli import main
from gfalign.report import broken_links, render_report, summarize, write_report
from gfalign.runs import build, execute, load_checkpoint
from gfalign.store import Store
from test_report_support import fill, history, line, presets


@pytest.fixture(autouse=True)
def _no_studies(monkeypatch, tmp_path):
    """The package's experiment presets and no study: the pages written are known."""
    presets(monkeypatch, tmp_path / "presets")


def _t975(df: int) -> float:
    """Student's t quantile 0.975 in closed form for 1 and 2 degrees of freedom."""
    return {1: math.tan(math.pi * 0.475), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025)}[df]


def _ci(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t975(n - 1) * std / math.sqrt(n)
    return f"{mean - half:.2f}–{mean + half:.2f}"


def test_table_cells_pending_baselines_and_counts(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.2, 2.4], "2x200 relu s3": [3.0]})
    fill(store, "exp1", {"2x800 tanh s2": [9.0]}, status="diverged")
    fill(store, "baselines", {"2x800 tanh bp": [1.8, 1.9], "2x200 relu dfa": [2.6]})
    exp1 = experiments.load("exp1")
    rows, baselines = store.list("exp1"), store.list("baselines")

    table = {(r["cell"], r["baseline"]): r for r in summarize(exp1, rows, baselines)}
    row = table["2x800 tanh s1", False]
    assert (row["n"], row["epochs"], row["paper"]) == (3, 100, 1.96)
    assert row["mean"] == pytest.approx(2.2) and row["std"] == pytest.approx(0.2)
    assert row["difference"] == pytest.approx(0.24)
    assert table["2x800 tanh s2", False]["n"] == 0
    assert table["2x800 tanh s2", False]["diverged"] == 1
    assert table["2x800 tanh bp", True]["mean"] == pytest.approx(1.85)
    assert table["2x800 tanh bp", True]["paper"] is None
    assert len([k for k in table if not k[1]]) == 27  # every cell, pending ones included

    text = render_report(exp1, rows, baselines)
    header = line(text, "| cell |")
    assert header == (
        "| cell | paper | ours (mean ± std) | seeds | epochs | difference | 95% CI | p (t-test) "
        "| best epoch (mean) | train error (mean) | verdict |"
    )
    t = 0.24 / (0.2 / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)  # two-sided, 2 degrees of freedom, in closed form
    assert line(text, "| 2x800 tanh s1 |") == (
        f"| 2x800 tanh s1 | 1.96 | 2.20 ± 0.20 | 3 | 100 | +0.24 | {_ci([2.0, 2.2, 2.4])} | "
        f"{p:.3f} | 2.20 (epoch 5) | — | unexplained |"
    )
    assert line(text, "| 2x200 relu s3 |") == (
        "| 2x200 relu s3 | 2.75 | 3.00 | 1 | 100 | +0.25 | — | — | 3.00 (epoch 5) | — "
        "| unexplained |"
    )
    assert line(text, "| 2x400 tanh s1 |") == (
        "| 2x400 tanh s1 | 2.02 | — | 0 | — | — | — | — | — | — | pending |"
    )
    assert line(text, "| 2x800 tanh s2 |") == (
        "| 2x800 tanh s2 | 1.95 | — | 0 (+1 diverged) | — | — | — | — | — | — | pending |"
    )
    assert line(text, "| 2x800 tanh bp (baseline) |") == (
        f"| 2x800 tanh bp (baseline) | — | 1.85 ± 0.07 | 2 | 100 | — | {_ci([1.8, 1.9])} | — "
        "| 1.85 (epoch 5) | — | — |"
    )
    assert "| 2x800 tanh fa (baseline)" not in text  # a baseline without runs is not listed
    order = [row.split(" | ")[0][2:] for row in text.splitlines() if row.startswith("| 2x")]
    assert order.index("2x800 tanh s3") + 1 == order.index("2x800 tanh bp (baseline)")
    assert order.index("2x800 tanh bp (baseline)") + 1 == order.index("2x800 relu s1")
    assert order.index("2x200 relu dfa (baseline)") + 1 == order.index("2x200 sigmoid s1")
    assert "Runs: 4 of 135 planned finished (27 cells × 5 seeds, 100 epochs); 1 diverged." in text
    assert (
        "Verdicts on the 27 published cells: 0 within 0.20, 0 explained by a reading of the "
        "protocol, 2 unexplained, 25 pending." in text
    )
    store.close()


def test_runs_of_another_protocol_are_their_own_rows_and_counted_apart(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp4", {"2x800 tanh dfa B4": [2.1, 2.3]})
    fill(store, "exp4", {"2x800 tanh dfa B4": [9.0], "2x800 tanh dfa B2": [8.0]}, epochs=1)
    fill(store, "exp4", {"2x800 tanh dfa B4": [7.0]}, epochs=1, train_subset=512)
    text = render_report(experiments.load("exp4"), store.list("exp4"))
    assert "| 2x800 tanh dfa B4 | 2.04 | 2.20 ± 0.14 | 2 | 100 | +0.16 |" in text
    assert "| 2x800 tanh dfa B4 | 2.04 | 9.00 | 1 | 1 | +6.96 |" in text
    assert "| 2x800 tanh dfa B4 | 2.04 | 7.00 | 1 | 1 (512 ex) | +4.96 |" in text
    assert line(text, "| 2x800 tanh dfa B4 | 2.04 | 2.20").endswith("| within 0.20 |")
    assert line(text, "| 2x800 tanh dfa B4 | 2.04 | 9.00").endswith("| — |")  # not the protocol
    # B2 has a run of another protocol only: under the experiment's it is still pending.
    assert line(text, "| 2x800 tanh dfa B2 | 2.32 | —").endswith("| pending |")
    assert "| 2x800 tanh fa B7 | — | — | 0 | — | — | — |" in text  # no paper value, no runs
    assert "Runs: 2 of 70 planned finished" in text
    assert "3 more finished outside the plan" in text


def test_a_block_models_table_takes_no_mlp_baselines(tmp_path):
    """The baselines are 2x800 MLPs: beside LeNet-5 on the same dataset they compare nothing."""
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "baselines", {"2x800 tanh bp": [1.8, 1.9]})
    fill(store, "field-lenet", {"lenet5 bp": [1.1]})
    lenet, baselines = experiments.load("field-lenet"), store.list("baselines")
    table = summarize(lenet, store.list("field-lenet"), baselines)
    assert not any(r["baseline"] for r in table)
    assert any(r["baseline"] for r in summarize(experiments.load("exp1"), [], baselines))
    assert "(baseline)" not in render_report(lenet, store.list("field-lenet"), baselines)


def _store_finished(store: Store, experiment: str, config, final: float, **options) -> None:
    """A finished 20-epoch run of ``config`` ending at ``final``, stored as ``experiment``'s."""
    records = history(final, epochs=20, **options)
    store.upsert(
        config.key(),
        experiment=experiment,
        label=config.label(),
        config=config.to_data(),
        status="finished",
        epochs_done=20,
        final=records[-1],
        history=records,
    )


def test_runs_of_a_superseded_reading_are_their_own_row_and_left_out_of_figures(
    tmp_path, monkeypatch
):
    """A run of the protocol whose configuration the grid no longer holds (frsf at lr 0.1
    where field-lenet now trains it at 0.01) is never averaged into the planned cell."""
    store = Store(tmp_path / "runs.sqlite")
    lenet = experiments.load("field-lenet")
    fill(store, "field-lenet", {"lenet5 frsf xavier": [1.2]}, angles=True)
    (planned,) = [c for c in lenet.configs if c.rule_name == "frsf"]
    _store_finished(store, "field-lenet", planned.override(lr=0.1), 89.7, angles=True)
    text = render_report(lenet, store.list("field-lenet"))
    assert "| lenet5 frsf xavier | 1.20 | 1 | 20 |" in text
    assert "| lenet5 frsf xavier lr=0.1 (outside the plan) | 89.70 | 1 | 20 |" in text
    assert "1 more finished outside the plan" in text
    seen = {}
    real = plots.plot_panels

    def record(panels, path, **options):
        seen[path.stem] = panels
        return real(panels, path, **options)

    monkeypatch.setattr(plots, "plot_panels", record)
    write_report(["field-lenet"], store, tmp_path / "out")
    # The figures draw the planned run only: its 5 epochs, not the superseded run's 20.
    curves = [c for p in seen["field-lenet-alignment"] for s in p.series for c in s.curves]
    assert curves and all(len(c[1]) == 5 for c in curves)


def test_a_superseded_run_whose_name_shows_its_rate_is_named_once(tmp_path):
    """conv's s1-aux on Fashion-MNIST is now at 0.1, so its name shows the rate: a run at the
    old 0.01 gets that rate in its name once, not the dataset and rate twice."""
    store = Store(tmp_path / "runs.sqlite")
    conv = experiments.load("conv")
    planned = next(c for c in conv.configs if c.rule_name == "s1-aux" and c.train.lr == 0.1)
    _store_finished(store, "conv", planned.override(lr=0.01), 17.1)
    text = render_report(conv, store.list("conv"))
    name = "lenet5 s1-aux xavier dataset=fashion-mnist lr=0.01 (outside the plan)"
    assert f"| {name} |" in text


def test_autoencoder_table_has_ours_only_in_reconstruction_error(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp3", {"2x128 sigmoid dfa": [0.0210, 0.0230]})
    text = render_report(experiments.load("exp3"), store.list("exp3"))
    assert line(text, "| cell |") == (
        "| cell | ours (mean ± std) | seeds | epochs | 95% CI | best epoch (mean) "
        "| train error (mean) |"
    )
    assert "| 2x128 sigmoid dfa | 0.02200 ± 0.00141 | 2 | 100 |" in text
    assert "| 2x800 sigmoid s2 | — | 0 | — |" in text
    assert "reconstruction error" in text and "Verdicts" not in text


def test_protocol_machine_and_compute_come_from_the_rows(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.2, 2.4]}, seconds=1200.0)
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    protocol = line(text, "- Protocol:")
    assert "100 epochs, batch size 32, sgd with lr 0.001, reduction sum" in protocol
    assert "all of mnist" in protocol and "seeds 0–2 (3 runs)" in protocol
    machine = line(text, "- Machine:")
    assert "x86_64, 2 CPUs, 2 torch threads, device cpu; torch 2.13.0" in machine
    assert line(text, "- Compute:") == "- Compute: 1.0 h of training in 3 runs"
    assert "weight decay" not in protocol and "validation" not in protocol


def test_protocol_names_every_training_feature_a_run_sets(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "field-lenet", {"lenet5 bp": [1.1]})
    text = render_report(experiments.load("field-lenet"), store.list("field-lenet"))
    assert "sgd with lr 0.01 (momentum 0.9), reduction mean, weight decay 0.0001, all of " in (
        line(text, "- Protocol:")
    )
    store = Store(tmp_path / "conv.sqlite")
    fill(store, "conv", {"lenet5 bp dataset=mnist": [1.1]})
    protocol = line(render_report(experiments.load("conv"), store.list("conv")), "- Protocol:")
    assert "weight decay 0.0001, schedule multistep:milestones=[8, 12, 16],gamma=0.1, " in protocol
    assert "all of mnist (10,000 training examples held out for validation)" in protocol


def _store_for_figures(path):
    store = Store(path)
    strategies = {f"2x800 tanh {r}": [2.0, 2.1] for r in ("s1", "s2", "s3")}
    fill(store, "exp1", strategies, angles=True)
    fill(store, "exp2", {f"2x800 tanh {r}-aux": [1.9, 2.0] for r in ("s1", "s2", "s3")})
    fill(store, "exp4", {f"2x800 tanh dfa B{n}": [2.2 + n / 10, 2.3] for n in range(1, 8)})
    fill(store, "exp4", {"2x800 tanh fa B1": [4.6]})
    fill(store, "baselines", {f"2x800 tanh {r}": [2.5, 2.4] for r in ("bp", "fa", "dfa")})
    return store


def test_written_report_has_every_figure_and_a_self_contained_page(tmp_path):
    store = _store_for_figures(tmp_path / "runs.sqlite")
    out = tmp_path / "report"
    names = ["exp1", "exp2", "exp4", "baselines"]
    written = write_report(names, store, out, runs_dir=tmp_path / "runs")
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {
        "exp1-figure4.png",
        "exp1-alignment.png",
        "exp2-figure5.png",
        "exp4-figure8.png",
    }
    assert set(written) == {
        out / "README.md",
        out / "report.html",
        *(out / f"{n}.md" for n in names),
        *(out / "figures" / f for f in figures),
    }
    for name in figures:
        raw = (out / "figures" / name).read_bytes()
        assert raw.startswith(b"\x89PNG") and len(raw) > 10_000

    index = (out / "README.md").read_text()
    for name in names:
        assert f"[{name}]({name}.md)" in index
    assert "| [exp1](exp1.md) |" in index and "| 6 / 135 |" in index
    assert "| [exp4](exp4.md) | 8 |" in line(index, "| [exp4](exp4.md) | 8 |")
    exp1 = (out / "exp1.md").read_text()
    assert "![Figure 4 (exp1)](figures/exp1-figure4.png)" in exp1
    assert "![Alignment (exp1), 2x800 tanh](figures/exp1-alignment.png)" in exp1
    assert "Curves, relu (exp1): no finished relu runs yet." in exp1
    assert "recorded no alignment angles" in (out / "exp2.md").read_text()
    assert broken_links(out) == []

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(sources) == len(figures) and all(
        s.startswith("data:image/png;base64,") for s in sources
    )
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {(out / "figures" / f).read_bytes() for f in figures}
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', page))
    assert "<link" not in page and "<script" not in page and "figures/" not in page
    assert "<td>2x800 tanh s1</td>" in page and "2.05 ± 0.07" in page
    store.close()


def test_an_empty_store_gives_an_honest_pending_report(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    write_report(["exp1", "exp3"], store, tmp_path / "out", runs_dir=tmp_path / "runs")
    assert list((tmp_path / "out" / "figures").glob("*.png")) == []
    index = (tmp_path / "out" / "README.md").read_text()
    assert "| 0 / 135 |" in index and "| 0 / 50 |" in index
    assert "| [exp1](exp1.md) | 27 | 0 | 0 | 0 | 27 |" in index  # every published cell pending
    exp1 = (tmp_path / "out" / "exp1.md").read_text()
    assert "| 2x800 tanh s1 | 1.96 | — | 0 | — | — |" in exp1
    assert "Figure 4 (exp1): no finished 2x800 tanh runs yet." in exp1
    assert "No finished run yet." in exp1  # the facts section
    exp3 = (tmp_path / "out" / "exp3.md").read_text()
    assert "Figure 6: no finished autoencoder run with a checkpoint yet." in exp3
    assert "data:image" not in (tmp_path / "out" / "report.html").read_text()
    assert "discussion.md" not in index
    (tmp_path / "out" / "discussion.md").write_text("# Discussion\n")
    write_report(["exp1"], store, tmp_path / "out")
    assert "[discussion.md](discussion.md)" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "discussion.md").read_text() == "# Discussion\n"
    assert '<h2 id="discussion">Discussion</h2>' in (tmp_path / "out" / "report.html").read_text()


def _autoencoder_runs(tmp_path):
    """One-epoch exp3 runs on the synthetic set: bp, dfa, s1 trained; s2 has no directory."""
    exp3 = experiments.load("exp3")
    configs = [
        c
        for c in exp3.expand(
            seeds=1, dataset="synthetic", train_subset=64, test_subset=50, epochs=1
        )
        if c.hidden == (128, 128) and c.rule_name in ("bp", "dfa", "s1", "s2")
    ]
    store = Store(tmp_path / "runs.sqlite")
    for config in configs:
        if config.rule_name == "s2":
            records = history(0.05, epochs=1)
        else:
            records = execute(config, tmp_path / "runs" / config.key()).history
        store.upsert(
            config.key(),
            experiment="exp3",
            label=config.label(),
            config=config.to_data(),
            status="finished",
            epochs_done=1,
            final=records[-1],
            history=records,
            seconds=1.0,
        )
    return store, {c.rule_name: c for c in configs}


def test_autoencoder_figures_use_the_trained_networks(tmp_path, monkeypatch):
    store, configs = _autoencoder_runs(tmp_path)
    seen: dict[str, tuple] = {}

    def spy(name):
        real = getattr(plots, name)

        def record(*args, **kwargs):
            seen[name] = args
            return real(*args, **kwargs)

        monkeypatch.setattr(plots, name, record)

    spy("plot_reconstructions")
    spy("plot_filters")
    out = tmp_path / "out"
    write_report(["exp3"], store, out, runs_dir=tmp_path / "runs")
    assert (out / "figures" / "exp3-figure6-784-128-128-784.png").exists()
    assert (out / "figures" / "exp3-figure7-784-128-128-784.png").exists()
    page = (out / "exp3.md").read_text()
    assert "2x128 sigmoid s2: no checkpoint found" in page

    test = data.synthetic(seed=0).test
    firsts = [int(torch.nonzero(test.y == c)[0, 0]) for c in range(10)]
    originals, reconstructions, _path = seen["plot_reconstructions"]
    assert originals.shape == (10, 784)
    assert torch.equal(torch.from_numpy(originals), test.x[firsts])
    assert list(reconstructions) == ["bp", "dfa", "s1"]
    for rule, images in reconstructions.items():
        config = configs[rule]
        checkpoint = load_checkpoint(tmp_path / "runs" / config.key() / "checkpoint.pt")
        trained, _ = build(config)
        trained.load_state_dict(checkpoint["net"])
        fresh, _ = build(config)
        assert torch.allclose(torch.from_numpy(images), trained.predict(test.x[firsts]))
        assert not torch.allclose(torch.from_numpy(images), fresh.predict(test.x[firsts]))

    panels, _path = seen["plot_filters"]
    assert list(panels) == ["bp", "dfa", "s1"]
    checkpoint = load_checkpoint(tmp_path / "runs" / configs["dfa"].key() / "checkpoint.pt")
    assert panels["dfa"].shape == (36, 784)
    assert torch.equal(torch.from_numpy(panels["dfa"]), checkpoint["net"]["layers.0.weight"][:36])
    store.close()


def test_cli_report_writes_a_directory_or_prints_markdown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults (results/tune, ...) name nothing of the checkout's
    store = _store_for_figures(tmp_path / "runs.sqlite")
    store.close()
    runner = CliRunner()
    args = ["report", "exp1", "--store", str(tmp_path / "runs.sqlite")]
    printed = runner.invoke(main, args)
    assert printed.exit_code == 0, printed.output
    assert "| 2x800 tanh s1 | 1.96 | 2.05 ± 0.07 | 2 | 100 | +0.09 |" in printed.output
    assert "| 2x800 tanh bp (baseline) | — | 2.45 ± 0.07 | 2 | 100 | — |" in printed.output
    assert not (tmp_path / "out").exists()

    result = runner.invoke(main, [*args, "--runs-dir", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 experiment pages and 2 figures" in result.output
    assert (tmp_path / "out" / "exp1.md").exists() and (tmp_path / "out" / "report.html").exists()
    assert not (tmp_path / "out" / "exp2.md").exists()


def test_plain_text_survives_html_escaping():
    page = reports.render_html([reports.Paragraph("a <b> & `code` [exp1](exp1.md)")], "t<i>tle")
    assert 'a &lt;b&gt; &amp; <code>code</code> <a href="exp1.md">exp1</a>' in page
    assert "<title>t&lt;i&gt;tle</title>" in page


def test_train_error_column_is_the_mean_final_training_error(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.2]})
    for row in store.list("exp1"):
        final = dict(row["final"], train_error=0.01 + 0.02 * row["config"]["seed"])
        kept = ("experiment", "label", "config", "status", "epochs_done", "history")
        store.upsert(row["key"], final=final, **{name: row[name] for name in kept})
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert "| train error (mean) |" in line(text, "| cell |")
    assert line(text, "| 2x800 tanh s1 |").endswith("| 0.02 | within 0.20 |")  # (0.01+0.03)/2


def test_runs_without_history_are_noted_only_on_their_own_dataset(tmp_path):
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "fashion", {"2x800 tanh bp": [10.4, 10.3]})
    fill(store, "baselines", {"2x800 tanh bp": [1.8, 1.9]}, curves=False)  # a CSV import
    fill(store, "exp1", {"2x800 tanh s1": [1.9]})
    write_report(["exp1", "fashion"], store, tmp_path / "out")
    exp1 = (tmp_path / "out" / "exp1.md").read_text()
    assert "baseline with no per-epoch history is a dashed level" in exp1
    assert "no per-epoch history" not in (tmp_path / "out" / "fashion.md").read_text()
    store.close()


def test_the_cost_per_cell_comes_from_the_machine_with_most_runs(tmp_path):
    """Seconds per epoch per cell from one machine only, trained alone and stacked apart."""
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {"2x800 tanh s1": [2.0, 2.2, 2.4], "2x800 tanh s2": [2.1]})
    kept = ("experiment", "label", "config", "status", "epochs_done", "final")
    for row in store.list("exp1"):
        seed, s2 = row["config"]["seed"], row["config"]["rule"] == "s2"
        history = [dict(rec, seconds=4.0 + seed) for rec in row["history"]]
        if seed == 2:  # a stacked member: its share of the stack's time
            history = [dict(rec, seconds=1.5, stacked=3) for rec in row["history"]]
        versions = {"platform": "other" if s2 else "main", "cpu_count": 2, "device": "cpu"}
        store.upsert(row["key"], versions=versions, history=history, **{k: row[k] for k in kept})
    text = render_report(experiments.load("exp1"), store.list("exp1"))
    assert "per rule of the 2x800 tanh network, from one machine only (" in text
    assert "main: 3 runs; 1 run of other networks or machines left out" in text
    cells = [c.strip() for c in line(text, "| s1 |").split("|")[1:-1]]
    assert cells == ["s1", "4.5 (2)", "1.5 (1)"]  # the median of 4 and 5 s; the stack's share
    assert "| s2 |" not in text  # another machine's run is left out


def _peer_line(config, test_error: float, status: str = "finished") -> str:
    import json

    return json.dumps(
        {
            "peer": "biotorch",
            "key": config.key(),
            "config": config.to_data(),
            "status": status,
            "final": {"test_error": test_error},
        }
    )


def test_the_conv_page_shows_biotorchs_same_budget_runs_beside_ours(tmp_path):
    """The peer column averages the peer's runs of the planned protocol only: a shorter run
    and a diverged one stay out, a rule biotorch lacks shows n/a, a missing run is pending."""
    conv = experiments.load("conv")
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "conv", {"lenet5 fa xavier dataset=mnist": [3.0, 3.4, 3.2]})
    fa = [c for c in conv.configs if c.rule_name == "fa" and c.dataset == "mnist"]
    lines = [_peer_line(c, 2.0 + c.seed * 0.2) for c in fa[:2]]
    lines.append(_peer_line(fa[2], 50.0, status="diverged"))
    lines.append(_peer_line(fa[0].override(epochs=2), 40.0))  # another budget
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "biotorch-lenet.jsonl").write_text("\n".join(lines) + "\n")

    text = render_report(conv, store.list("conv"), peers_dir=peers)
    header = line(text, "| cell |")
    assert "| biotorch, same budget | ours − biotorch |" in header
    fa_row = line(text, "| lenet5 fa xavier dataset=mnist |")
    assert "| 3.20 ± 0.20 | 3 | 20 | +1.50 | 2.10 ± 0.14 (2 of 3 seeds) | +1.10 |" in fa_row
    assert "| lenet5 kp xavier dataset=mnist | — | — | 0 | — | — | n/a | n/a |" in text
    assert "| lenet5 bp dataset=mnist | 0.91 | — | 0 | — | — | — | — |" in text
    assert "biotorch 0.0.16's LeNetMNIST" in text
    # Without the peers' files every peer run is pending, never invented.
    bare = render_report(conv, store.list("conv"))
    assert "| 3.20 ± 0.20 | 3 | 20 | +1.50 | — | — |" in line(
        bare, "| lenet5 fa xavier dataset=mnist |"
    )
