"""The results store and sweeps under misuse: shared, damaged, read-only, unwritable, bad imports.

Each test meets the problem where a user would, through the command line, and checks both the
one-line refusal and that nothing already computed is lost.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gfalign import experiments, store, sweep
from gfalign.cli import main
from gfalign.store import Store

REBUILD = "gfalign runs import results/runs.jsonl.gz --store NEW.sqlite"
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "runs.jsonl.gz"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, *phrases: str) -> str:
    """The one-line error of a refused command, checked for ``phrases``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny() -> experiments.Experiment:
    """exp1 cut to 2x8 tanh with s1, s2 and s3 on the synthetic set: milliseconds a run."""
    experiment = experiments.load("exp1")
    base = experiment.base.override(dataset="synthetic", test_subset=100)
    grid = {"hidden": ((8, 8),), "activation": ("tanh",), "rule": ("s1", "s2", "s3")}
    return dataclasses.replace(experiment, base=base, grid=grid)


def _fill(path: Path, count: int = 12, epochs: int = 60) -> list[str]:
    """A store with ``count`` finished exp1 runs, each with a history (several pages)."""
    experiment = experiments.load("exp1")
    keys = []
    with Store(path) as s:
        for config in experiment.expand(seeds=1)[:count]:
            history = [
                {"epoch": e, "test_error": 10.0 / e, "train_loss": 1.0 / e, "seconds": 0.5}
                for e in range(1, epochs + 1)
            ]
            s.upsert(
                config.key(),
                experiment="exp1",
                label=config.label(),
                config=config.to_data(),
                status="finished",
                epochs_done=epochs,
                final=history[-1],
                history=history,
                seconds=30.0,
                versions={"torch": "2"},
            )
            keys.append(config.key())
    return keys


# ---------------------------------------------------------------------------- 1. shared sweeps


def _metric_epochs(directory: Path) -> tuple[list[int], list[int]]:
    with (directory / "metrics.csv").open() as handle:
        in_csv = [int(row["epoch"]) for row in csv.DictReader(handle)]
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return in_csv, [json.loads(line)["epoch"] for line in lines]


def test_two_sweeps_at_once_train_every_run_once(tmp_path, real_mnist_dir):
    store_path, runs_dir, epochs = tmp_path / "runs.sqlite", tmp_path / "runs", 4
    command = [sys.executable, "-m", "gfalign", "reproduce", "exp1", "--quick", "--seeds", "2"]
    command += ["--only", "2x200 tanh", "--epochs", str(epochs), "--store", str(store_path)]
    command += ["--runs-dir", str(runs_dir), "--data-dir", real_mnist_dir]
    env = {**os.environ, "GFALIGN_DATA": real_mnist_dir, "OMP_NUM_THREADS": "1"}
    sweeps = [
        subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [s.communicate(timeout=600)[1] for s in sweeps]
    assert [s.returncode for s in sweeps] == [0, 0], outputs
    assert all("Traceback" not in output for output in outputs)

    with Store(store_path, readonly=True) as s:
        rows = s.list("exp1")
    assert len(rows) == 6 and {r["status"] for r in rows} == {"finished"}
    for row in rows:
        assert _metric_epochs(runs_dir / row["key"]) == (list(range(1, 5)), list(range(1, 5)))
        assert [r["epoch"] for r in row["history"]] == list(range(1, 5))
    lines = [line for output in outputs for line in output.splitlines() if line.startswith("[")]
    trained = [
        line for line in lines if " finished " in line and "from its run directory" not in line
    ]
    assert len(trained) == 6, outputs  # each run trained by one of the two sweeps
    reported = [line for line in lines if " busy " not in line]
    assert len(reported) == 12  # each sweep accounts for every run: trained, recorded, skipped


_HOLDER = """
import sqlite3, sys, time
from gfalign.claims import claim

directory, marker, store, others = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with claim(directory):
    open(marker, "w").close()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # hold the run until the sweep has done all others
        try:
            db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
            done = db.execute("SELECT count(*) FROM runs WHERE status = 'finished'").fetchone()
            db.close()
        except sqlite3.Error:
            done = (0,)
        if done[0] >= others:
            break
        time.sleep(0.1)
    time.sleep(0.5)
"""


@pytest.mark.parametrize(
    "options",
    # Ray with one job slot runs the jobs in the order they were sent: the held run first.
    [[], ["--jobs", "2"], ["--stack", "2"], ["--backend", "ray", "--cpus-per-run", "2"]],
    ids=["in-process", "pool", "stacked", "ray"],
)
def test_a_run_another_process_holds_is_left_to_it_then_resumed(tmp_path, monkeypatch, options):
    if "ray" in options:
        pytest.importorskip("ray")
    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    monkeypatch.setattr(sweep, "POLL", 0.2)
    configs = sweep.configs_for(_tiny(), seeds=2, quick=True)
    held = configs[0]
    store_path, runs_dir = tmp_path / "runs.sqlite", tmp_path / "runs"
    script, marker = tmp_path / "holder.py", tmp_path / "held"
    script.write_text(_HOLDER)
    arguments = [runs_dir / held.key(), marker, store_path, len(configs) - 1]
    holder = subprocess.Popen([sys.executable, str(script), *map(str, arguments)])
    try:
        while not marker.exists():
            assert holder.poll() is None
            time.sleep(0.05)
        result = invoke(
            "reproduce", "exp1", "--quick", "--seeds", "2", *options,
            "--store", store_path, "--runs-dir", runs_dir,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("[")]
    busy = [line for line in lines if " busy " in line]
    assert len(busy) == 1 and held.key() in busy[0]
    assert f"trained by process {holder.pid}" in busy[0]
    assert lines[-1].startswith(f"[{len(configs)}/{len(configs)}] finished")
    assert held.key() in lines[-1]  # the held run came last, trained once released
    assert f"exp1: {len(configs)} finished" in result.output
    with Store(store_path, readonly=True) as s:
        rows = {r["key"]: r for r in s.list("exp1")}
    assert set(rows) == {c.key() for c in configs}
    assert all(r["status"] == "finished" and len(r["history"]) == 1 for r in rows.values())
    assert _metric_epochs(runs_dir / held.key()) == ([1], [1])


def test_a_run_finished_elsewhere_is_recorded_not_trained(tmp_path, monkeypatch):
    from gfalign.runs import execute

    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    configs = sweep.configs_for(_tiny(), seeds=1, quick=True)
    execute(configs[1], tmp_path / "runs" / configs[1].key())  # e.g. by a `train --resume`
    trained = []
    real = sweep._execute
    monkeypatch.setattr(
        sweep, "_execute", lambda c, *rest: trained.append(c.key()) or real(c, *rest)
    )
    result = invoke(
        "reproduce", "exp1", "--quick", "--seeds", "1",
        "--store", tmp_path / "runs.sqlite", "--runs-dir", tmp_path / "runs",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert configs[1].key() not in trained and len(trained) == 2
    line = next(x for x in result.output.splitlines() if configs[1].key() in x)
    assert "finished" in line and "recorded from its run directory" in line


# ---------------------------------------------------------------------------- 2. damaged store


def _damage(path: Path) -> None:
    """Overwrite one whole page in the middle of a SQLite file."""
    pages = path.stat().st_size // 4096
    with path.open("r+b") as handle:
        handle.seek(pages // 2 * 4096)
        handle.write(b"\xff" * 4096)


def test_a_damaged_store_is_named_with_the_way_back_and_left_alone(tmp_path):
    path = tmp_path / "runs.sqlite"
    keys = _fill(path)
    _damage(path)
    before = digest(path)
    source = tmp_path / "export.jsonl"
    source.write_text("")
    for command in [
        ["runs", "list"],
        ["runs", "show", keys[0][:8]],
        ["runs", "export", tmp_path / "out.jsonl"],
        ["report", "exp1"],
        ["reproduce", "exp1", "--quick", "--seeds", "1", "--runs-dir", tmp_path / "runs"],
        ["runs", "import", source],
    ]:
        line = refused(invoke(*command, "--store", path), f"results store {path} is damaged")
        assert REBUILD in line and f"then move NEW.sqlite to {path}" in line
        assert digest(path) == before  # never repaired, never written
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "runs").exists()


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"key,status\n" * 200)
    for command in [["runs", "list"], ["reproduce", "exp1", "--runs-dir", tmp_path / "r"]]:
        line = refused(invoke(*command, "--store", path), f"{path} is not a results store")
        assert "file is not a database" in line and REBUILD in line
    assert path.read_bytes() == b"key,status\n" * 200


# ---------------------------------------------------------------------------- 3. read-only


def test_reading_commands_open_the_store_read_only(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    keys = _fill(path, count=3)
    before, mtime = digest(path), path.stat().st_mtime_ns
    opened = []
    real = sqlite3.connect

    def connect(database, *args, **options):
        opened.append(str(database))
        return real(database, *args, **options)

    monkeypatch.setattr(sqlite3, "connect", connect)
    for command in [
        ["runs", "list"],
        ["runs", "show", keys[0][:8], "--history"],
        ["runs", "export", tmp_path / "out.jsonl.gz"],
        ["runs", "export", tmp_path / "out.csv"],
        ["report", "exp1"],
        ["report", "exp1", "-o", tmp_path / "report"],
    ]:
        opened.clear()
        result = invoke(*command, "--store", path)
        assert result.exit_code == 0, result.output
        assert opened and all(o.startswith("file:") and "mode=ro" in o for o in opened), opened
    assert digest(path) == before and path.stat().st_mtime_ns == mtime
    assert (tmp_path / "report" / "exp1.md").exists()


@pytest.fixture
def read_only(tmp_path):
    """seal(directory) -> the directory, now on read-only storage (a read-only bind mount as
    root, whom file modes do not stop; file modes otherwise)."""
    mounts: list[Path] = []

    def seal(directory: Path) -> Path:
        if os.geteuid() != 0:
            for item in directory.iterdir():
                item.chmod(0o444)
            directory.chmod(0o555)
            return directory
        target = directory.with_name(directory.name + "-ro")
        target.mkdir()
        bound = subprocess.run(["mount", "--bind", str(directory), str(target)], check=False)
        if bound.returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        mounts.append(target)
        sealed = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=False)
        if sealed.returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        return target

    yield seal
    for target in mounts:
        if subprocess.run(["umount", str(target)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(target)], check=False)  # a file still open
    for item in tmp_path.rglob("*"):
        if not item.is_symlink():
            item.chmod(0o755)


def test_a_store_on_read_only_media_is_read_and_refuses_writes(tmp_path, read_only):
    media = tmp_path / "media"
    media.mkdir()
    keys = _fill(media / "runs.sqlite", count=3)
    path = read_only(media) / "runs.sqlite"
    listed = invoke("runs", "list", "--store", path)
    assert listed.exit_code == 0, listed.output
    assert all(key in listed.output for key in keys)
    shown = invoke("runs", "show", keys[1], "--store", path)
    assert shown.exit_code == 0 and '"status": "finished"' in shown.output
    exported = invoke("runs", "export", tmp_path / "copy.jsonl", "--store", path)
    assert exported.exit_code == 0, exported.output
    assert len((tmp_path / "copy.jsonl").read_text().splitlines()) == 3
    reported = invoke("report", "exp1", "--store", path)
    assert reported.exit_code == 0 and "ours beside the paper" in reported.output

    refused(
        invoke("runs", "import", tmp_path / "copy.jsonl", "--store", path, "--replace"),
        f"results store {path}",
        "read-only",
    )
    refused(
        invoke("reproduce", "exp1", "--quick", "--store", path, "--runs-dir", tmp_path / "r"),
        f"results store {path}",
        "read-only",
    )


# ---------------------------------------------------------------------------- 4. unwritable paths


def test_unwritable_paths_are_named_and_nothing_is_lost(tmp_path):
    path = tmp_path / "runs.sqlite"
    _fill(path, count=3)
    before = digest(path)
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file\n")
    under = blocker / "sub"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_error": 5.0}\n')
    quick = ["reproduce", "exp1", "--quick", "--seeds", "1", "--only", "2x200 tanh s1"]

    refused(
        invoke(*quick, "--store", under / "runs.sqlite", "--runs-dir", tmp_path / "r"),
        f"cannot create the results store {under / 'runs.sqlite'}",
    )
    refused(
        invoke("runs", "import", tmp_path / "none.jsonl", "--store", under / "runs.sqlite"),
        str(under / "runs.sqlite"),
    )
    refused(
        invoke(*quick, "--store", tmp_path / "new.sqlite", "--runs-dir", under),
        f"cannot put run directories in {under}",
    )
    refused(invoke("report", "exp1", "--store", path, "-o", under), f"report to {under}")
    for name in ("x.jsonl", "x.jsonl.gz", "x.csv"):
        line = refused(invoke("runs", "export", under / name, "--store", path), str(under / name))
        assert "the store is unchanged" in line
    refused(invoke("plot", run, "--output", under / "p.png"), f"plot to {under / 'p.png'}")
    assert digest(path) == before and blocker.read_text() == "a regular file\n"


def test_a_failed_export_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    _fill(path, count=4)
    out = tmp_path / "runs.jsonl"
    assert invoke("runs", "export", out, "--store", path).exit_code == 0
    previous = out.read_bytes()
    real = store._open_text

    class Full:
        """A file that fills the disk after its first row."""

        def __init__(self, handle):
            self.handle, self.rows = handle, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.rows += 1
            if self.rows > 1:
                raise OSError(28, "No space left on device")
            self.handle.write(text)

    monkeypatch.setattr(store, "_open_text", lambda *a: Full(real(*a)))
    refused(invoke("runs", "export", out, "--store", path), str(out), "No space left")
    assert out.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- 5. import


def _export_lines(tmp_path: Path, count: int = 8) -> list[dict]:
    _fill(tmp_path / "a.sqlite", count=count, epochs=3)
    with Store(tmp_path / "a.sqlite") as s:
        s.export(tmp_path / "all.jsonl")
    return [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]


def test_import_is_all_rows_or_none_with_every_bad_row_named(tmp_path):
    rows = _export_lines(tmp_path)
    target = tmp_path / "b.sqlite"
    kept = _fill(target, count=1)  # what the store held before stays as it was
    with Store(target) as s:
        before = s.list()
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({**rows[2], "epochs_done": 10**30})
    lines[3] = '["not", "a", "run"]'
    lines[4] = json.dumps({**rows[4], "status": "bogus"})
    lines[5] = json.dumps({**rows[5], "final": {**rows[5]["final"], "test_error": math_nan()}})
    lines[6] = json.dumps({**rows[6], "seconds": -1.0})
    history = [dict(rows[7]["history"][0], test_error=float("inf"))]
    lines[7] = json.dumps({**rows[7], "history": history})
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    line = refused(
        invoke("runs", "import", source, "--store", target), "6 bad rows, nothing imported"
    )
    for number, phrase in [
        (3, "epochs_done 1000000000000000000000000000000 is not a whole number"),
        (4, "not a stored run (not an object)"),
        (5, "status 'bogus'"),
        (6, "final test_error is nan"),
        (7, "seconds is -1.0"),
        (8, "history[0] test_error is inf"),
    ]:
        assert f"line {number}: {phrase}" in line, line
    assert "line 1" not in line and "line 2" not in line
    with Store(target) as s:
        assert [r["key"] for r in s.list()] == kept and s.list() == before


def math_nan() -> float:
    return float("nan")


def test_a_store_that_fills_during_an_import_takes_nothing(tmp_path, monkeypatch):
    _export_lines(tmp_path, count=8)
    target = tmp_path / "b.sqlite"
    Store(target).close()
    real = sqlite3.connect

    def small(database, *args, **options):
        db = real(database, *args, **options)
        db.execute("PRAGMA max_page_count = 1")  # as large as the file now is: a full disk
        return db

    monkeypatch.setattr(sqlite3, "connect", small)
    line = refused(
        invoke("runs", "import", tmp_path / "all.jsonl", "--store", target),
        f"cannot write the results store {target}",
        "database or disk is full",
        f"nothing from {tmp_path / 'all.jsonl'} was imported",
    )
    assert "Traceback" not in line
    monkeypatch.setattr(sqlite3, "connect", real)
    with Store(target) as s:
        assert s.list() == []


@pytest.mark.skipif(not COMMITTED.exists(), reason="needs the committed export")
def test_the_committed_export_imports_whole(tmp_path):
    result = invoke("runs", "import", COMMITTED, "--store", tmp_path / "x.sqlite")
    assert result.exit_code == 0, result.output
    with gzip.open(COMMITTED, "rt") as handle:
        count = sum(1 for line in handle if line.strip())
    assert f"imported {count} runs" in result.output and count >= 263


# ---------------------------------------------------------------------------- 6. store write fails


def test_a_full_store_during_a_sweep_loses_no_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "load", lambda name: _tiny())
    configs = sweep.configs_for(_tiny(), seeds=2, quick=True)
    store_path, runs_dir = tmp_path / "runs.sqlite", tmp_path / "runs"
    Store(store_path).close()
    real = sqlite3.connect

    def small(database, *args, **options):
        db = real(database, *args, **options)
        db.execute("PRAGMA max_page_count = 1")
        return db

    monkeypatch.setattr(sqlite3, "connect", small)
    command = ["reproduce", "exp1", "--quick", "--seeds", "2"]
    command += ["--store", store_path, "--runs-dir", runs_dir]
    line = refused(invoke(*command), "database or disk is full", "rerun the same command")
    assert str(runs_dir) in line
    monkeypatch.setattr(sqlite3, "connect", real)
    with Store(store_path, readonly=True) as s:
        stored = {r["key"] for r in s.list()}
    finished = {
        c.key()
        for c in configs
        if (runs_dir / c.key() / "summary.json").exists()
        and json.loads((runs_dir / c.key() / "summary.json").read_text())["status"] == "finished"
    }
    lost = finished - stored
    assert lost  # trained, in its directory, not in the store

    trained = []
    real_execute = sweep._execute
    monkeypatch.setattr(
        sweep, "_execute", lambda c, *rest: trained.append(c.key()) or real_execute(c, *rest)
    )
    again = invoke(*command)
    assert again.exit_code == 0, again.output
    assert not lost & set(trained)  # picked up from the directories, not trained again
    for key in lost:
        line = next(x for x in again.output.splitlines() if key in x)
        assert "recorded from its run directory" in line
    with Store(store_path, readonly=True) as s:
        rows = s.list()
    assert {r["key"] for r in rows} == {c.key() for c in configs}
    assert all(r["status"] == "finished" and len(r["history"]) == 1 for r in rows)


# ---------------------------------------------------------------------------- 7. foreign files


def _foreign(path: Path) -> str:
    """An SQLite file of another application; returns its digest."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.execute("INSERT INTO notes (text) VALUES ('mine')")
    db.commit()
    db.close()
    return digest(path)


def test_an_sqlite_file_of_another_application_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "other.sqlite"
    before = _foreign(path)
    export = tmp_path / "all.jsonl"
    _export_lines(tmp_path, count=2)
    for command in [
        ["runs", "import", export],
        ["reproduce", "exp1", "--quick", "--seeds", "1", "--runs-dir", tmp_path / "r"],
        ["runs", "list"],
        ["runs", "export", tmp_path / "out.jsonl"],
    ]:
        refused(
            invoke(*command, "--store", path),
            f"{path} is an SQLite file but not a results store (tables notes)",
            "nothing was written",
        )
        assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("other")) == [
        "other.sqlite"
    ]
    assert not (tmp_path / "r").exists() and not (tmp_path / "out.jsonl").exists()


def test_a_new_store_carries_the_marker_and_an_old_one_is_stamped(tmp_path):
    new = tmp_path / "new.sqlite"
    Store(new).close()
    db = sqlite3.connect(new)
    marker = [
        db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("application_id", "user_version")
    ]
    db.close()
    assert marker == [store.APPLICATION_ID, store.SCHEMA_VERSION]
    # A store made before the marker: the same table, no application id.
    old = tmp_path / "old.sqlite"
    keys = _fill(old, count=2)
    db = sqlite3.connect(old)
    db.execute("PRAGMA application_id = 0")
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()
    result = invoke("runs", "list", "--store", old)
    assert result.exit_code == 0 and all(k in result.output for k in keys), result.output
    Store(old).close()
    db = sqlite3.connect(old)
    assert db.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    db.close()
    assert [r["key"] for r in Store(old, readonly=True).list()] == keys


def test_a_refused_import_leaves_no_store_behind(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"key": "x"}\n')
    target = tmp_path / "new" / "deeper" / "runs.sqlite"
    refused(invoke("runs", "import", source, "--store", target), "1 bad row, nothing imported")
    assert not (tmp_path / "new").exists()
    # and a store that fills while the import creates it
    rows = _export_lines(tmp_path, count=3)
    assert rows
    real = sqlite3.connect

    def small(database, *args, **options):
        db = real(database, *args, **options)
        db.execute("PRAGMA max_page_count = 2")
        return db

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", small)
        refused(
            invoke("runs", "import", tmp_path / "all.jsonl", "--store", target),
            f"cannot write the results store {target}",
            "free some space",
        )
    assert not (tmp_path / "new").exists()


def test_a_long_line_or_an_import_of_nothing_is_refused(tmp_path):
    long = tmp_path / "long.jsonl.gz"
    with gzip.open(long, "wt") as handle:
        for _ in range(17):
            handle.write(" " * 2**20)
        handle.write("\n")
    assert long.stat().st_size < 2**20
    target = tmp_path / "runs.sqlite"
    refused(
        invoke("runs", "import", long, "--store", target),
        f"{long}: line 1 is longer than 16 MiB",
        "nothing imported",
    )
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n\n")
    refused(invoke("runs", "import", blank, "--store", target), f"{blank}: holds no stored run")
    assert not target.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert invoke("runs", "import", empty, "--store", target).exit_code == 0


# ---------------------------------------------------------------------------- 8. read checks


def _flip(path: Path, key: str) -> None:
    """Change one character inside the stored configuration of run ``key``."""
    db = sqlite3.connect(path)
    (text,) = db.execute("SELECT config_json FROM runs WHERE key = ?", (key,)).fetchone()
    flipped = text.replace('"lr": 0.001', '"lr": 0.003', 1)
    assert flipped != text
    db.execute("UPDATE runs SET config_json = ? WHERE key = ?", (flipped, key))
    db.commit()
    db.close()


def test_every_read_checks_a_rows_key_against_its_configuration(tmp_path):
    path = tmp_path / "runs.sqlite"
    keys = _fill(path, count=3)
    _flip(path, keys[1])
    for command in [
        ["runs", "list"],
        ["runs", "show", keys[1][:8]],
        ["runs", "export", tmp_path / "out.jsonl"],
        ["report", "exp1"],
    ]:
        refused(
            invoke(*command, "--store", path),
            f"results store {path}: row {keys[1]}",
            "was changed after it was stored",
            "not to its key",
        )
    assert not (tmp_path / "out.jsonl").exists()
    assert invoke("runs", "show", keys[0][:8], "--store", path).exit_code == 0


@pytest.mark.skipif(not COMMITTED.exists(), reason="needs the committed export")
def test_the_committed_export_reads_back_with_its_retired_models(tmp_path):
    target = tmp_path / "x.sqlite"
    assert invoke("runs", "import", COMMITTED, "--store", target).exit_code == 0
    listed = invoke("runs", "list", "--store", target)
    assert listed.exit_code == 0, listed.output
    out = tmp_path / "again.jsonl.gz"
    assert invoke("runs", "export", out, "--store", target).exit_code == 0
    with gzip.open(COMMITTED, "rt") as a, gzip.open(out, "rt") as b:
        assert sum(1 for line in a if line.strip()) == sum(1 for line in b if line.strip())


# ---------------------------------------------------------------------------- 9. full disks


def test_a_full_disk_names_the_path_and_leaves_nothing_half_made(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "runs.sqlite"
    _fill(path, count=3)
    out = tmp_path / "report"
    real = Path.write_text

    def full(self, text, *args, **options):
        if self.name.startswith(".exp1.md") and self.name.endswith(".tmp"):
            real(self, text[:10])  # part of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **options)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full)
        refused(
            invoke("report", "exp1", "--store", path, "-o", out),
            f"disk full writing {out / 'exp1.md'}",
            "free some space and run this again",
        )
    assert not (out / "exp1.md").exists()
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []

    # a store that a sweep or an import would create on a full disk is not left behind
    real_connect = sqlite3.connect

    def small(database, *args, **options):
        db = real_connect(database, *args, **options)
        db.execute("PRAGMA max_page_count = 1")
        return db

    monkeypatch.setattr(sqlite3, "connect", small)
    new = tmp_path / "new.sqlite"
    quick = ["reproduce", "exp1", "--quick", "--seeds", "1", "--runs-dir", tmp_path / "r"]
    refused(invoke(*quick, "--store", new), f"cannot write the results store {new}", "free some")
    assert not new.exists() and not list(tmp_path.glob("new.sqlite*"))
