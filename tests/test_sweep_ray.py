"""Sweeps on Ray: the rows the local backend gives, and a clear error without Ray."""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
from click.testing import CliRunner

from gfalign import experiments, sweep
from gfalign.cli import main
from gfalign.store import Store

NEEDS_RAY = "the ray backend needs Ray: pip install 'gfalign[ray]'"


def _tiny() -> experiments.Experiment:
    """exp1 cut to two runs on the synthetic set: 2x8 tanh with s1 and s2."""
    experiment = experiments.load("exp1")
    base = experiment.base.override(dataset="synthetic", test_subset=100)
    grid = {"hidden": ((8, 8),), "activation": ("tanh",), "rule": ("s1", "s2")}
    return dataclasses.replace(experiment, base=base, grid=grid)


def _table(store: Store) -> dict[str, tuple]:
    return {
        r["key"]: (
            r["status"],
            r["epochs_done"],
            len(r["history"]),
            r["final"]["test_error"],
            r["final"]["test_loss"],
            r["final"]["train_error"],
            bool(r["versions"]),
        )
        for r in store.list()
    }


@pytest.fixture
def ray():
    return pytest.importorskip("ray")


class Stop(Exception):
    pass


def test_ray_sweep_stores_what_the_local_backend_does(tmp_path, ray, monkeypatch):
    experiment = _tiny()
    configs = sweep.configs_for(experiment, seeds=1, quick=True)
    assert len(configs) == 2
    local, on_ray = Store(tmp_path / "local.sqlite"), Store(tmp_path / "ray.sqlite")
    sweep.run_sweep(experiment, local, tmp_path / "local", configs=configs)

    cancelled = []
    real_cancel = ray.cancel

    def cancel(ref, **options):
        cancelled.append(ref)
        real_cancel(ref, **options)

    def stop(event: sweep.Progress) -> None:
        raise Stop

    monkeypatch.setattr(ray, "cancel", cancel)
    options = {"configs": configs, "backend": "ray"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        with pytest.raises(Stop):
            sweep.run_sweep(experiment, on_ray, tmp_path / "ray", progress=stop, **options)
        assert len(on_ray.list()) == 1 and len(cancelled) == 1
        ray.wait(cancelled, timeout=60)  # the cancelled run has stopped before it is resumed

        events: list[sweep.Progress] = []
        counts = sweep.run_sweep(
            experiment, on_ray, tmp_path / "ray", progress=events.append, **options
        )
        assert ray.is_initialized()  # a Ray started before the sweep is left running
    finally:
        ray.shutdown()
    assert counts == {"skipped": 1, "finished": 1}
    assert [(e.done, e.status) for e in events] == [(1, "skipped"), (2, "finished")]
    assert _table(on_ray) == _table(local)
    assert set(_table(on_ray)) == {c.key() for c in configs}
    assert all((tmp_path / "ray" / c.key() / "checkpoint.pt").exists() for c in configs)

    again = sweep.run_sweep(experiment, on_ray, tmp_path / "ray", **options)
    assert again == {"skipped": 2} and not ray.is_initialized()


def test_cli_reproduce_on_a_local_ray(tmp_path, ray, monkeypatch):
    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    store_path = tmp_path / "runs.sqlite"
    command = ["reproduce", "exp1", "--quick", "--seeds", "1", "--backend", "ray"]
    command += ["--cpus-per-run", "1", "--store", str(store_path)]
    result = CliRunner().invoke(main, [*command, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "exp1: 2 finished" in result.output
    assert not ray.is_initialized()  # the Ray the command started is shut down
    with Store(store_path) as store:
        rows = store.list("exp1")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert all(len(r["history"]) == 1 for r in rows)


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    store = Store(tmp_path / "runs.sqlite")
    with pytest.raises(ImportError) as error:
        sweep.run_sweep(_tiny(), store, tmp_path / "runs", seeds=1, quick=True, backend="ray")
    assert str(error.value) == NEEDS_RAY
    assert store.list() == []

    result = CliRunner().invoke(
        main, ["reproduce", "exp1", "--backend", "ray", "--store", str(tmp_path / "cli.sqlite")]
    )
    assert result.exit_code == 1 and NEEDS_RAY in result.output


def test_address_needs_the_ray_backend(tmp_path):
    result = CliRunner().invoke(
        main, ["reproduce", "exp1", "--address", "auto", "--store", str(tmp_path / "s.sqlite")]
    )
    assert result.exit_code == 2 and "needs --backend ray" in result.output


def test_stacked_jobs_on_ray(tmp_path, ray):
    experiment = _tiny()
    configs = sweep.configs_for(experiment, seeds=2, quick=True, only=("s2",))
    local, on_ray = Store(tmp_path / "local.sqlite"), Store(tmp_path / "ray.sqlite")
    sweep.run_sweep(experiment, local, tmp_path / "local", configs=configs, stack=2)
    counts = sweep.run_sweep(
        experiment, on_ray, tmp_path / "ray", configs=configs, stack=2, backend="ray"
    )
    assert counts == {"finished": 2}
    ours, theirs = _table(on_ray), _table(local)  # equal up to rounding (threads differ)
    assert set(ours) == set(theirs)
    for key, row in ours.items():
        assert row[:3] == theirs[key][:3] and row[6] == theirs[key][6]
        assert row[3:6] == pytest.approx(theirs[key][3:6], rel=1e-5)
    assert {r["history"][-1]["stacked"] for r in on_ray.list()} == {2}
