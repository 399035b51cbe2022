"""Stacked runs: several seeds of a cell trained as one computation, each in its own directory.

Every check runs in float64, where a stacked member and its separate run agree to rounding.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from gfalign import experiments, runs, sweep
from gfalign.cli import main
from gfalign.config import RunConfig
from gfalign.rules import ConfigError
from gfalign.store import Store
from gfalign.train import DivergenceError, TrainConfig

TRAIN = TrainConfig(epochs=3, batch_size=16, lr=0.002, reduction="sum")


def _config(seed: int, **changes) -> RunConfig:
    fields = {
        "dataset": "synthetic",
        "train_subset": 200,
        "test_subset": 100,
        "hidden": (12, 10),
        "rule": "s3",
        "seed": seed,
        "train": TRAIN,
        "dtype": "float64",
        "alignment": True,
        "alignment_probe": 50,
    }
    return RunConfig(**{**fields, **changes})


CONFIGS = [_config(0), _config(1), _config(2, feedback="B6")]


def _separate(tmp_path) -> list[list[dict]]:
    return [runs.execute(c, tmp_path / f"alone{c.seed}").history for c in CONFIGS]


def _same(stacked: list[dict], alone: list[dict]) -> None:
    assert len(stacked) == len(alone)
    for ours, theirs in zip(stacked, alone, strict=True):
        assert ours["test_error"] == theirs["test_error"]
        assert ours["train_error"] == theirs["train_error"]
        for name in ("test_loss", "batch_loss", "update_angle_1", "delta_angle_2"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-9, abs=1e-12), name


def test_stacked_runs_equal_their_separate_runs(tmp_path):
    directories = [tmp_path / f"stacked{c.seed}" for c in CONFIGS]
    epochs = []
    results = runs.execute_stacked(CONFIGS, directories, on_epoch=epochs.append)
    assert [sorted(records) for records in epochs] == [[0, 1, 2]] * 3
    for result, alone, directory in zip(results, _separate(tmp_path), directories, strict=True):
        assert isinstance(result, runs.RunResult)
        _same(result.history, alone)
        assert {r["stacked"] for r in result.history} == {3}
        assert result.summary["status"] == "finished" and result.summary["epochs"] == 3
        assert result.summary["train_seconds"] == pytest.approx(
            sum(r["seconds"] for r in result.history)
        )
        # the directory is an ordinary run directory: files, metrics and a checkpoint
        assert runs.read_metrics(directory) == result.history
        assert json.loads((directory / "summary.json").read_text())["status"] == "finished"
        assert RunConfig.from_toml(directory / "config.toml") == result.config
        assert len(runs.load_checkpoint(directory / "checkpoint.pt")["history"]) == 3


def test_members_resumed_at_different_epochs_catch_up_then_stack(tmp_path):
    directories = [tmp_path / f"stacked{c.seed}" for c in CONFIGS]
    runs.execute_stacked(CONFIGS, directories, stop_after=1)
    runs.execute(CONFIGS[2], directories[2], resume=True, stop_after=2)  # one member ahead
    assert [len(runs.read_metrics(d)) for d in directories] == [1, 1, 2]
    results = runs.execute_stacked(CONFIGS, directories, resume=True)
    for result, alone in zip(results, _separate(tmp_path), strict=True):
        _same(result.history, alone)
    stacked = [[r.get("stacked", 1) for r in result.history] for result in results]
    assert stacked == [[3, 1, 3], [3, 1, 3], [3, 1, 3]]  # epoch 2 of 0 and 1 ran alone


def _poison_seed_1(monkeypatch, layer: int):
    """Make ``runs.build`` give seed 1 a NaN weight in ``layer``: its loss is not finite."""
    real_build = runs.build

    def build(config, device="cpu"):
        net, rule = real_build(config, device)
        if config.seed == 1:
            with torch.no_grad():
                net.weight(layer)[0, 0] = float("nan")
        return net, rule

    monkeypatch.setattr(runs, "build", build)
    return real_build


def test_a_diverging_member_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    real_build = _poison_seed_1(monkeypatch, layer=2)
    directories = [tmp_path / f"stacked{c.seed}" for c in CONFIGS]
    results = runs.execute_stacked(CONFIGS, directories)
    assert isinstance(results[1], DivergenceError)
    summary = json.loads((directories[1] / "summary.json").read_text())
    assert summary["status"] == "diverged" and "epoch 1" in summary["error"]
    monkeypatch.setattr(runs, "build", real_build)
    alone = _separate(tmp_path)
    for k in (0, 2):
        _same(results[k].history, alone[k])
        assert {r["stacked"] for r in results[k].history} == {3, 2}


def test_runs_that_cannot_stack_are_refused(tmp_path):
    refusal = "s3 12-10 tanh seed0 cannot stack with s3 2x12 tanh seed0.*differ only in seed"
    with pytest.raises(ConfigError, match=refusal):
        runs.execute_stacked([_config(0, hidden=(12, 12)), CONFIGS[0]], [tmp_path / "a"] * 2)
    with pytest.raises(ConfigError, match="one directory per configuration"):
        runs.execute_stacked(CONFIGS, [tmp_path / "a"])


def _tiny() -> experiments.Experiment:
    """exp4 on the synthetic set, tiny and in float64: fa and dfa with B1, B4 and B6."""
    experiment = experiments.load("exp4")
    base = experiment.base.override(
        dataset="synthetic", test_subset=100, hidden=(8, 8), dtype="float64"
    )
    grid = {**experiment.grid, "feedback": ("B1", "B4", "B6")}
    return dataclasses.replace(experiment, base=base, grid=grid)


def _table(store: Store) -> dict[str, tuple]:
    return {
        r["key"]: (r["status"], r["epochs_done"], r["final"]["test_error"], len(r["history"]))
        for r in store.list()
    }


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stacked_sweep_stores_what_the_unstacked_one_does(tmp_path, jobs, monkeypatch):
    experiment = _tiny()
    options = {"seeds": 2, "quick": True, "epochs": 2}
    plain, stacked = Store(tmp_path / "plain.sqlite"), Store(tmp_path / "stacked.sqlite")
    sweep.run_sweep(experiment, plain, tmp_path / "plain", **options)

    groups = []
    real = sweep._groups
    monkeypatch.setattr(sweep, "_groups", lambda todo, k: groups.extend(real(todo, k)) or groups)
    events: list[sweep.Progress] = []
    counts = sweep.run_sweep(
        experiment, stacked, tmp_path / "stacked", stack=4, jobs=jobs,
        progress=events.append, **options,
    )  # fmt: skip
    # 12 runs: fa and dfa, each with 3 families x 2 seeds -> groups of 4 and 2
    assert sorted(len(g) for g in groups) == [2, 2, 4, 4]
    assert counts == {"finished": 12} and [e.done for e in events] == list(range(1, 13))
    assert _table(stacked) == _table(plain)
    for row in stacked.list():
        assert {r["stacked"] for r in row["history"]} in ({2}, {4})
        assert row["seconds"] == pytest.approx(sum(r["seconds"] for r in row["history"]))


def test_a_sweep_trains_a_run_that_cannot_stack_alone(tmp_path):
    """Clipping cannot stack: with ``stack`` such runs are jobs of their own, and finish."""
    experiment = _tiny()
    clipped = experiment.expand(seeds=2, epochs=1, clip_grad_norm=1.0)[:2]
    assert [len(g) for g in sweep._groups(clipped, 4)] == [1, 1]
    plain = experiment.expand(seeds=2, epochs=1)[:2]
    assert [len(g) for g in sweep._groups(plain, 4)] == [2]  # seeds of one cell
    store = Store(tmp_path / "runs.sqlite")
    counts = sweep.run_sweep(experiment, store, tmp_path / "runs", configs=clipped, stack=4)
    assert counts == {"finished": 2}


def test_reproduce_stack_option(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    store_path = tmp_path / "runs.sqlite"
    command = ["reproduce", "exp4", "--quick", "--seeds", "2", "--stack", "6", "--jobs", "2"]
    command += ["--store", str(store_path), "--runs-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert "exp4: 12 finished" in result.output
    with Store(store_path) as store:
        assert {r["history"][-1]["stacked"] for r in store.list()} == {6}
    refused = CliRunner().invoke(main, [*command[:6], "--stack", "0"])
    assert refused.exit_code == 2 and "--stack" in refused.output


def test_reproduce_device_option(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    command = ["reproduce", "exp4", "--quick", "--seeds", "1", "--only", "dfa B1"]
    command += ["--store", str(tmp_path / "runs.sqlite"), "--runs-dir", str(tmp_path / "runs")]
    bad = CliRunner().invoke(main, [*command, "--device", "gpu"])
    assert bad.exit_code == 1 and "device must be cpu, cuda or auto, got 'gpu'" in bad.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = CliRunner().invoke(main, [*command, "--device", device])
    assert result.exit_code == 0, result.output
    with Store(tmp_path / "runs.sqlite") as store:
        (row,) = store.list()
    assert row["versions"]["device"].startswith(device)
    assert row["key"] == sweep.configs_for(_tiny(), seeds=1, quick=True, only=("dfa B1",))[0].key()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_stacked_sweep_on_cuda_matches_the_cpu(tmp_path):
    experiment = _tiny()
    options = {"seeds": 2, "quick": True, "epochs": 2, "only": ("dfa",)}
    cpu, cuda = Store(tmp_path / "cpu.sqlite"), Store(tmp_path / "cuda.sqlite")
    sweep.run_sweep(experiment, cpu, tmp_path / "cpu", **options)
    sweep.run_sweep(experiment, cuda, tmp_path / "cuda", stack=6, device="cuda", **options)
    ours, theirs = _table(cuda), _table(cpu)
    assert set(ours) == set(theirs) and len(ours) == 6
    for key, row in ours.items():
        assert row[:2] == theirs[key][:2]
        assert row[2] == pytest.approx(theirs[key][2], abs=1.0)  # float64: same to rounding


@pytest.mark.parametrize("stack", [1, 2])
def test_a_sweep_stores_a_diverged_run_from_its_directory(tmp_path, stack, monkeypatch):
    _poison_seed_1(monkeypatch, layer=1)
    store = Store(tmp_path / "runs.sqlite")
    configs = sweep.configs_for(_tiny(), seeds=2, quick=True, epochs=2, only=("dfa B1",))
    counts = sweep.run_sweep(_tiny(), store, tmp_path / "runs", configs=configs, stack=stack)
    assert counts == {"finished": 1, "diverged": 1}
    rows = {r["config"]["seed"]: r for r in store.list()}
    assert rows[1]["status"] == "diverged" and rows[1]["epochs_done"] == 0
    assert rows[1]["history"] == [] and rows[1]["versions"]["torch"]
    assert rows[0]["status"] == "finished" and len(rows[0]["history"]) == 2
