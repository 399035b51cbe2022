"""Experiment presets, the results store, resumable sweeps and the report."""

from __future__ import annotations

import dataclasses
import sqlite3
from concurrent.futures import ALL_COMPLETED, wait
from pathlib import Path

import pytest
from click.testing import CliRunner

from gfalign import experiments, sweep
from gfalign.cli import main
from gfalign.cli.reproduce import render_report, summarize
from gfalign.store import Store

PER_SEED = {
    "exp1": 27,
    "exp2": 27,
    "exp3": 10,
    "exp4": 14,
    "baselines": 27,
    "fashion": 9,
    "field": 9,
    "field-lenet": 9,
    "conv-lr": 156,
    "conv-budget": 16,
    "conv": 28,  # 26 cells, and drtp on lenet5-tanh on both datasets
    "conv-cifar": 13,
    "transformer": 8,
}
PAPER_PROTOCOL = (*experiments.PAPER, "fashion", "field")  # epochs aside for field


@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_every_preset_expands_and_validates(name):
    experiment = experiments.load(name)
    assert experiment.description
    assert len(experiment.expand(seeds=1)) == PER_SEED[name]
    assert len(experiment.configs) == PER_SEED[name] * len(experiment.seeds)
    assert len({c.key() for c in experiment.configs}) == len(experiment.configs)
    train = experiment.base.train
    if name in PAPER_PROTOCOL:
        epochs = 20 if name == "field" else 100
        assert (train.epochs, train.batch_size, train.lr) == (epochs, 32, 0.001)
        assert (train.optimizer, train.reduction) == ("sgd", "sum")
    assert set(experiment.paper) <= set(experiment.cells())


def test_preset_contents():
    exp1 = experiments.load("exp1")
    assert exp1.paper["2x800 tanh s1"] == 1.96
    assert exp1.paper["2x800 sigmoid s3"] == 1.95
    assert len(exp1.paper) == 27
    assert experiments.load("exp2").paper["2x800 tanh s1-aux"] == 1.66
    exp3 = experiments.load("exp3")
    assert {c.objective for c in exp3.configs} == {"autoencoder"}
    assert {c.hidden for c in exp3.configs} == {(128, 128), (800, 800)}
    exp4 = experiments.load("exp4")
    assert {c.hidden for c in exp4.configs} == {(800, 800)}
    assert exp4.paper["2x800 tanh dfa B4"] == 2.04
    assert exp4.paper["2x800 tanh fa B1"] == 4.64
    assert [c.seed for c in exp1.expand(seeds=7)[:7]] == list(range(7))
    fashion = experiments.load("fashion")
    assert {(c.dataset, c.hidden, c.activation) for c in fashion.configs} == {
        ("fashion-mnist", (800, 800), "tanh")
    }
    assert fashion.paper == {} and "fashion" not in experiments.PAPER


def _tiny(name: str = "exp1") -> experiments.Experiment:
    """The experiment on the synthetic set with tiny networks (seconds, not hours)."""
    experiment = experiments.load(name)
    base = experiment.base.override(dataset="synthetic", test_subset=100)
    grid = {**experiment.grid, "hidden": ((8, 8), (16, 16)), "activation": ("tanh", "relu")}
    return dataclasses.replace(experiment, base=base, grid=grid)


def _table(store: Store, experiment) -> dict[str, tuple]:
    return {
        r["key"]: (r["status"], r["epochs_done"], r["final"]["test_error"], r["final"]["test_loss"])
        for r in store.list(experiment.name)
    }


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = sweep._execute

    def spy(config, directory, data_dir, dataset):
        calls.append(config.key())
        return real(config, directory, data_dir, dataset)

    monkeypatch.setattr(sweep, "_execute", spy)
    return calls


def test_quick_sweep_stores_runs_and_rerun_skips_them(tmp_path, counted):
    experiment = _tiny()
    store = Store(tmp_path / "runs.sqlite")
    counts = sweep.run_sweep(experiment, store, tmp_path / "runs", seeds=1, quick=True)
    assert counts == {"finished": 12}
    assert len(counted) == 12
    rows = store.list("exp1")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"finished"}
    row = rows[0]
    assert row["epochs_done"] == 1 and len(row["history"]) == 1
    assert row["config"]["train_subset"] == 512 and row["config"]["test_subset"] == 100
    assert row["versions"]["torch"] and row["seconds"] >= 0
    assert (tmp_path / "runs" / row["key"] / "checkpoint.pt").exists()

    counted.clear()
    counts = sweep.run_sweep(experiment, store, tmp_path / "runs", seeds=1, quick=True)
    assert counts == {"skipped": 12} and counted == []

    mode = sqlite3.connect(tmp_path / "runs.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"


class Stop(Exception):
    pass


def test_interrupted_sweep_continues_to_the_uninterrupted_table(tmp_path, counted):
    experiment = _tiny()
    options = {"seeds": 1, "quick": True, "epochs": 2}
    whole = Store(tmp_path / "whole.sqlite")
    sweep.run_sweep(experiment, whole, tmp_path / "whole", **options)

    parted = Store(tmp_path / "parted.sqlite")

    def stop_after_five(event: sweep.Progress) -> None:
        if event.done == 5:
            raise Stop

    with pytest.raises(Stop):
        sweep.run_sweep(
            experiment, parted, tmp_path / "parted", progress=stop_after_five, **options
        )
    assert len(parted.list("exp1")) == 5

    # the sixth run was killed after one of its two epochs: its directory holds a checkpoint
    from gfalign.runs import execute

    sixth = sweep.configs_for(experiment, **options)[5]
    execute(sixth, tmp_path / "parted" / sixth.key(), stop_after=1)

    counted.clear()
    counts = sweep.run_sweep(experiment, parted, tmp_path / "parted", **options)
    assert counts == {"skipped": 5, "finished": 7} and len(counted) == 7
    assert _table(parted, experiment) == _table(whole, experiment)
    assert parted.get(sixth.key())["epochs_done"] == 2


_ORPHAN = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from gfalign.sweep import _watch_parent

def pid_then_sleep(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, context, _watch_parent, (os.getpid(),))
    pool.submit(pid_then_sleep, sys.argv[1])
    time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_pool_workers_end_with_a_killed_coordinator(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, marker = tmp_path / "coordinator.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN)
    coordinator = subprocess.Popen([sys.executable, str(script), str(marker)])
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(marker.read_text())
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    deadline = time.monotonic() + 10
    status = Path(f"/proc/{worker}/status")
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in status.read_text():  # ended, not yet reaped
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the pool worker outlived its killed coordinator")


def test_parallel_sweep_matches_sequential(tmp_path):
    experiment = _tiny()
    experiment = dataclasses.replace(
        experiment, grid={**experiment.grid, "hidden": ((8, 8),), "activation": ("tanh",)}
    )
    one, two = Store(tmp_path / "one.sqlite"), Store(tmp_path / "two.sqlite")
    sweep.run_sweep(experiment, one, tmp_path / "one", seeds=1, quick=True)
    sweep.run_sweep(experiment, two, tmp_path / "two", seeds=1, quick=True, jobs=2)
    assert _table(one, experiment) == _table(two, experiment)
    assert len(_table(two, experiment)) == 3


def test_two_workers_finishing_at_once_lose_nothing(tmp_path, monkeypatch):
    experiment = _tiny()
    configs = sweep.configs_for(experiment, seeds=2, quick=True, only=("2x8 tanh s1",))
    assert len(configs) == 2
    together = []

    def wait_for_both(futures, return_when):
        finished, pending = wait(futures, return_when=ALL_COMPLETED)
        together.append(len(finished))
        return finished, pending

    monkeypatch.setattr(sweep, "wait", wait_for_both)
    store = Store(tmp_path / "runs.sqlite")
    events = []
    counts = sweep.run_sweep(
        experiment, store, tmp_path / "runs", configs=configs, jobs=2, progress=events.append
    )
    assert together == [2] and counts == {"finished": 2}
    assert [e.done for e in events] == [1, 2]
    rows = {r["key"]: r for r in store.list("exp1")}
    assert set(rows) == {c.key() for c in configs}
    for row in rows.values():
        assert row["status"] == "finished" and row["epochs_done"] == 1
        assert len(row["history"]) == 1 and row["versions"]["torch"]
        assert row["final"]["test_error"] == row["history"][-1]["test_error"]


def _fake_rows(store: Store, experiment, values: dict[str, list[float]]) -> None:
    for config in experiment.expand(seeds=5):
        cell = experiment.cell(config)
        if cell in values and config.seed < len(values[cell]):
            store.upsert(
                config.key(),
                experiment=experiment.name,
                label=config.label(),
                config=config.to_data(),
                status="finished",
                epochs_done=100,
                final={"test_error": values[cell][config.seed]},
            )


def test_report_cells(tmp_path):
    experiment = experiments.load("exp1")
    store = Store(tmp_path / "runs.sqlite")
    _fake_rows(store, experiment, {"2x800 tanh s1": [2.0, 2.2, 2.4], "2x200 relu s3": [3.0]})
    table = {r["cell"]: r for r in summarize(experiment, store.list("exp1"))}
    row = table["2x800 tanh s1"]
    assert row["n"] == 3 and row["epochs"] == 100
    assert row["mean"] == pytest.approx(2.2) and row["std"] == pytest.approx(0.2)
    assert row["difference"] == pytest.approx(2.2 - 1.96)
    assert table["2x200 relu s3"]["std"] == 0.0
    assert table["2x400 tanh s1"]["n"] == 0  # a paper cell without runs is still listed

    text = render_report(experiment, store.list("exp1"))
    assert "| 2x800 tanh s1 | 1.96 | 2.20 ± 0.20 | 3 | 100 | +0.24 |" in text
    assert "| 2x200 relu s3 | 2.75 | 3.00 | 1 | 100 | +0.25 |" in text
    assert "| 2x400 tanh s1 | 2.02 | — | 0 | — | — |" in text
    store.close()

    out = tmp_path / "report"
    result = CliRunner().invoke(
        main, ["report", "exp1", "--store", str(tmp_path / "runs.sqlite"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "2.20 ± 0.20" in (out / "exp1.md").read_text()


def test_cli_runs_and_errors(tmp_path):
    store_path = tmp_path / "runs.sqlite"
    experiment = experiments.load("exp4")
    with Store(store_path) as store:
        _fake_rows(store, experiment, {"2x800 tanh dfa B4": [2.5, 2.7]})
        key = store.list()[0]["key"]
    runner = CliRunner()
    listed = runner.invoke(main, ["runs", "list", "--store", str(store_path)])
    assert listed.exit_code == 0 and key in listed.output
    shown = runner.invoke(main, ["runs", "show", key[:8], "--store", str(store_path)])
    assert shown.exit_code == 0 and '"status": "finished"' in shown.output
    exported = runner.invoke(
        main, ["runs", "export", str(tmp_path / "o.csv"), "--store", str(store_path)]
    )
    assert exported.exit_code == 0
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 3
    missing = runner.invoke(main, ["runs", "list", "--store", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def _stored_rows(store: Store) -> dict[str, dict]:
    return {r["key"]: {k: v for k, v in r.items() if k != "updated"} for r in store.list()}


@pytest.mark.parametrize("name", ["runs.jsonl", "runs.jsonl.gz"])
def test_export_and_import_rebuild_the_store(tmp_path, name):
    experiment = experiments.load("exp4")
    with Store(tmp_path / "a.sqlite") as store:
        _fake_rows(store, experiment, {"2x800 tanh dfa B4": [2.5, 2.7], "2x800 tanh fa B1": [4.1]})
        row = store.list()[0]
        history = [{"epoch": 1, "test_error": 9.5}, {"epoch": 2, "test_error": 7.25}]
        store.upsert(
            row["key"],
            **{k: row[k] for k in ("config", "experiment", "label", "status", "epochs_done")},
            final={"test_error": 7.25, "train_error": 0.0},
            history=history,
            seconds=12.5,
            versions={"torch": "x"},
        )
        assert store.export(tmp_path / name) == 3
        original = _stored_rows(store)
    runner = CliRunner()
    rebuilt = tmp_path / "b.sqlite"
    result = runner.invoke(main, ["runs", "import", str(tmp_path / name), "--store", str(rebuilt)])
    assert result.exit_code == 0, result.output
    assert "imported 3 runs" in result.output
    with Store(rebuilt) as store:
        assert _stored_rows(store) == original
        assert store.get(row["key"])["history"] == history
    again = runner.invoke(main, ["runs", "import", str(tmp_path / name), "--store", str(rebuilt)])
    assert "imported 0 runs" in again.output and "3 already there" in again.output


def test_import_of_the_csv_keeps_the_final_metrics(tmp_path):
    experiment = experiments.load("exp4")
    with Store(tmp_path / "a.sqlite") as store:
        _fake_rows(store, experiment, {"2x800 tanh dfa B4": [2.5, 2.75]})
        store.export(tmp_path / "runs.csv")
        original = {r["key"]: r["final"] for r in store.list()}
    with Store(tmp_path / "b.sqlite") as store:
        assert store.import_file(tmp_path / "runs.csv") == (2, 0)
        assert {r["key"]: r["final"] for r in store.list()} == original
        table = {r["cell"]: r for r in summarize(experiment, store.list("exp4"))}
        assert table["2x800 tanh dfa B4"]["mean"] == pytest.approx(2.625)


def test_import_refuses_a_row_whose_key_is_not_its_configuration(tmp_path):
    experiment = experiments.load("exp4")
    with Store(tmp_path / "a.sqlite") as store:
        _fake_rows(store, experiment, {"2x800 tanh dfa B4": [2.5]})
        store.export(tmp_path / "runs.jsonl")
    text = (tmp_path / "runs.jsonl").read_text().replace('"seed": 0', '"seed": 7')
    (tmp_path / "edited.jsonl").write_text(text)
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    runner = CliRunner()
    for name, message in [
        ("edited.jsonl", "line 1: key"),
        ("junk.jsonl", "line 1: not a stored run"),
        ("absent.jsonl", "no such file"),
    ]:
        result = runner.invoke(
            main, ["runs", "import", str(tmp_path / name), "--store", str(tmp_path / "b.sqlite")]
        )
        assert result.exit_code == 1 and message in result.output, result.output
    with Store(tmp_path / "b.sqlite") as store:
        assert store.list() == []


def test_only_keeps_the_matching_cells():
    exp1 = experiments.load("exp1")
    configs = sweep.configs_for(exp1, seeds=2, only=("2x800 tanh",))
    assert sorted({exp1.cell(c) for c in configs}) == [
        "2x800 tanh s1",
        "2x800 tanh s2",
        "2x800 tanh s3",
    ]
    assert len(configs) == 6
    assert sweep.configs_for(exp1, seeds=1, only=("nothing like it",)) == []
    result = CliRunner().invoke(main, ["reproduce", "exp1", "--only", "5x5 tanh"])
    assert result.exit_code == 2
    assert "no cell matches '5x5 tanh'" in result.output
