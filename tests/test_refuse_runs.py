"""What a run directory refuses and what it keeps: damaged checkpoints, runs already there,
busy directories, failed writes, diverging evaluations and damaged data (issue 18)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gfalign import runs
from gfalign.claims import RunBusyError, claim
from gfalign.cli import main
from gfalign.config import RunConfig
from gfalign.data import DataError
from gfalign.train import evaluate

TINY = ["--dataset", "synthetic", "--hidden", "16,16", "--epochs", "3", "--batch-size", "32"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def failed(result, *phrases: str) -> None:
    """A user error: exit status 1, every phrase in the message, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def epochs(directory: Path) -> list[int]:
    """The epochs both metric files record, in file order (the two must agree)."""
    in_json = [int(r["epoch"]) for r in runs.read_metrics(directory)]
    lines = (directory / "metrics.csv").read_text().splitlines()
    in_csv = [int(float(line.split(",")[0])) for line in lines[1:]]
    assert in_csv == in_json
    return in_json


def summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    """Same records and same final weights, bit for bit."""
    assert runs.read_metrics(a)[-1] | {"seconds": 0} == runs.read_metrics(b)[-1] | {"seconds": 0}
    net_a = runs.load_checkpoint(a / "checkpoint.pt")["net"]
    net_b = runs.load_checkpoint(b / "checkpoint.pt")["net"]
    assert all(torch.equal(net_a[name], net_b[name]) for name in net_a)


@pytest.fixture
def whole(tmp_path) -> Path:
    """An uninterrupted three-epoch run, the reference for resumed ones."""
    out = tmp_path / "whole"
    assert invoke("train", *TINY, "--out", out, "-q").exit_code == 0
    return out


def cut_run(whole: Path, directory: Path, after: int = 2) -> Path:
    """The run of ``whole`` stopped (as if killed) after ``after`` epochs."""
    runs.execute(RunConfig.from_toml(whole / "config.toml"), directory, stop_after=after)
    return directory


def overwrite_inside_a_weight(path: Path) -> None:
    """Change bytes in the middle of the first tensor's storage; the archive stays valid."""
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)
    data = bytearray(path.read_bytes())
    data[start + entry.file_size // 2 : start + entry.file_size // 2 + 4] = b"\x7f\x7f\x7f\x7f"
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_hashed_and_the_previous_one_kept(tmp_path, whole):
    import hashlib

    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        digest, named = (whole / f"{name}.sha256").read_text().split()
        assert named == name  # `sha256sum -c checkpoint.pt.sha256` checks it
        assert digest == hashlib.sha256((whole / name).read_bytes()).hexdigest()
    assert len(runs.load_checkpoint(whole / "checkpoint.prev.pt")["history"]) == 2
    assert not list(whole.glob(".*.tmp"))


def test_a_corrupted_checkpoint_is_refused_and_the_previous_one_continues(tmp_path, whole):
    cut = cut_run(whole, tmp_path / "cut")
    overwrite_inside_a_weight(cut / "checkpoint.pt")
    result = invoke("train", "--resume", cut)
    failed(result, "corrupted", f"{cut / 'checkpoint.prev.pt'} (epoch 1) is intact")
    assert f"gfalign train --resume {cut} --from-previous" in result.output
    assert f"gfalign train --resume {cut} --restart" in result.output
    assert summary(cut)["status"] == "stopped" and epochs(cut) == [1, 2]  # untouched

    result = invoke("train", "--resume", cut, "--from-previous")
    assert result.exit_code == 0, result.output
    assert "continuing from the previous checkpoint (epoch 1)" in result.output
    assert (cut / "checkpoint.discarded.pt").is_file()
    assert epochs(cut) == [1, 2, 3]
    assert_same_run(whole, cut)


def test_a_truncated_checkpoint_is_refused(tmp_path, whole):
    cut = cut_run(whole, tmp_path / "cut")
    data = (cut / "checkpoint.pt").read_bytes()
    (cut / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    failed(invoke("train", "--resume", cut), "is truncated", "--from-previous", "--restart")


def test_a_missing_checkpoint_is_refused_and_restart_starts_over(tmp_path, whole):
    cut = cut_run(whole, tmp_path / "cut")
    (cut / "checkpoint.pt").unlink()
    failed(invoke("train", "--resume", cut), "is missing although the run recorded 2 epoch(s)")
    (cut / "checkpoint.prev.pt").unlink()
    failed(invoke("train", "--resume", cut), "No intact previous checkpoint", "--restart")
    assert epochs(cut) == [1, 2]

    result = invoke("train", "--resume", cut, "--restart", "-q")
    assert result.exit_code == 0, result.output
    assert epochs(cut) == [1, 2, 3]
    assert_same_run(whole, cut)


def test_resume_of_a_run_that_never_finished_an_epoch_starts_from_scratch(tmp_path, whole):
    config = RunConfig.from_toml(whole / "config.toml")
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    (unstarted / "config.toml").write_text(config.to_toml())  # killed during epoch 1
    runs.execute(config, unstarted, resume=True)
    runs.execute(config, tmp_path / "absent", resume=True)  # what a sweep does
    for directory in (unstarted, tmp_path / "absent"):
        assert epochs(directory) == [1, 2, 3]
        assert_same_run(whole, directory)


def test_a_hostile_checkpoint_is_refused_as_a_security_risk(tmp_path, whole):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    torch.save({"net": Payload()}, whole / "checkpoint.pt")
    failed(
        invoke("train", "--resume", whole),
        f"refusing to load {whole / 'checkpoint.pt'}: it holds pickled objects that could run code",
    )
    assert not marker.exists()


def test_a_checkpoint_written_before_hashes_still_resumes(tmp_path, whole):
    cut = cut_run(whole, tmp_path / "cut", after=1)
    (cut / "checkpoint.pt.sha256").unlink()  # as the older code left it
    result = invoke("train", "--resume", cut)
    assert result.exit_code == 0, result.output
    assert "was written before checkpoints carried a SHA-256: loaded unverified" in result.output
    assert_same_run(whole, cut)


def test_a_checkpoint_with_the_earlier_block_names_still_resumes(tmp_path, whole):
    # Before chains and graphs were one model class, a chain's blocks were stored as parts.N.
    cut = cut_run(whole, tmp_path / "cut", after=1)
    state = runs.load_checkpoint(cut / "checkpoint.pt")
    state["net"] = {name.replace("layers.", "parts.", 1): t for name, t in state["net"].items()}
    assert all(name.startswith("parts.") for name in state["net"])
    runs._save_checkpoint(cut, state)
    result = invoke("train", "--resume", cut, "-q")
    assert result.exit_code == 0, result.output
    assert_same_run(whole, cut)


# --------------------------------------------------------------------------- directories


def test_out_refuses_a_directory_that_holds_a_run(tmp_path, whole):
    before = (whole / "metrics.jsonl").read_text()
    failed(
        invoke("train", *TINY, "--out", whole),
        f"{whole} already holds a run (finished, 3 epoch(s) recorded)",
        f"gfalign train --resume {whole}",
        "--overwrite",
    )
    assert (whole / "metrics.jsonl").read_text() == before
    cut = cut_run(whole, tmp_path / "cut", after=1)
    failed(invoke("train", *TINY, "--out", cut), "(unfinished, 1 epoch(s) recorded)")
    assert epochs(cut) == [1]

    result = invoke("train", *TINY, "--epochs", "2", "--out", whole, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert epochs(whole) == [1, 2] and summary(whole)["status"] == "finished"
    assert not (whole / "checkpoint.prev.pt").exists() or (
        len(runs.load_checkpoint(whole / "checkpoint.prev.pt")["history"]) == 1
    )


def test_a_failed_start_leaves_no_directory_behind(tmp_path, monkeypatch):
    import gfalign.data

    def load(name, **_):
        raise DataError(f"{name}: train-images-idx3-ubyte is missing; run gfalign data fetch")

    monkeypatch.setattr(gfalign.data, "load", load)
    args = ["train", "--dataset", "mnist", "--hidden", "8", "--epochs", "1", "-q"]
    failed(invoke(*args, "--out", tmp_path / "new" / "run"), "is missing")
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    failed(invoke(*args, "--out", mine), "is missing")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (mine / "config.toml").exists() and not (mine / "summary.json").exists()


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_unwritable_out_is_one_line_naming_it(tmp_path, where):
    if where == "proc":
        out = Path("/proc/gfalign-test/run")
    else:
        (tmp_path / "file.txt").write_text("not a directory")
        out = tmp_path / "file.txt" / "run"
    result = invoke("train", *TINY, "--out", out, "-q")
    failed(result, f"output directory {out} is not writable")
    assert result.output.count("\n") == 1, result.output
    assert not out.exists()


# --------------------------------------------------------------------------- claims


def test_a_second_process_on_a_busy_run_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--hidden", "128,128", "--epochs", "8", "-q"]
    first = subprocess.Popen(
        [sys.executable, "-m", "gfalign", "train", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.exists() and path.read_text().strip():
                break
            time.sleep(0.02)
        if first.poll() is not None:
            pytest.skip("the first run ended before a second one could try")
        second = invoke("train", "--resume", out)
    finally:
        _, stderr = first.communicate(timeout=300)
    failed(second, f"run directory {out} is being trained by process {first.pid}")
    assert first.returncode == 0, stderr.decode()
    assert epochs(out) == list(range(1, 9))
    assert summary(out)["status"] == "finished"


def _stack_configs() -> list[RunConfig]:
    base = RunConfig(dataset="synthetic", hidden=(12, 12), rule="dfa").override(epochs=1)
    return [base.override(seed=seed) for seed in (0, 1)]


def test_a_busy_member_stops_a_stack_before_it_touches_anything(tmp_path):
    free, busy = tmp_path / "free", tmp_path / "busy"
    with claim(busy), pytest.raises(RunBusyError, match=f"run directory {busy} is being"):
        runs.execute_stacked(_stack_configs(), [free, busy])
    assert not free.exists()
    assert sorted(p.name for p in busy.iterdir()) == [".claim.json", ".claim.lock"]
    results = runs.execute_stacked(_stack_configs(), [free, busy])  # once free, it trains
    assert [r.summary["status"] for r in results] == ["finished", "finished"]


def test_execute_holds_the_claim_while_it_trains(tmp_path):
    out, seen = tmp_path / "run", []

    def try_to_claim(record):
        with pytest.raises(RunBusyError), claim(out):
            pass
        seen.append(record["epoch"])

    config = RunConfig(dataset="synthetic", hidden=(8,)).override(epochs=2)
    runs.execute(config, out, on_epoch=try_to_claim)
    assert seen == [1, 2]


# --------------------------------------------------------------------------- records


def test_metric_files_only_grow_by_the_next_epoch(tmp_path):
    out = tmp_path / "run"

    def stale_writer(record):
        if record["epoch"] == 1:  # another writer leaves a stray later epoch behind
            row = dict(record, epoch=3)
            with (out / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            with (out / "metrics.csv").open("a") as handle:
                handle.write(",".join(str(v) for v in row.values()) + "\n")

    config = RunConfig(dataset="synthetic", hidden=(8,)).override(epochs=4)
    runs.execute(config, out, on_epoch=stale_writer)
    assert epochs(out) == [1, 2, 3, 4]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out, real = tmp_path / "run", runs._write_durably

    def disk_full(path, data):
        if path.name == ".checkpoint.pt.tmp" and (out / "checkpoint.pt").exists():
            path.write_bytes(data[: len(data) // 3])  # the disk fills part way through
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(runs, "_write_durably", disk_full)
    result = invoke("train", *TINY, "--out", out, "-q")
    failed(
        result,
        f"disk full writing checkpoint {out / 'checkpoint.pt'} (epoch 2)",
        "the previous checkpoint (epoch 1) is intact",
        f"free space, then `gfalign train --resume {out}`",
    )
    assert not list(out.glob(".*.tmp"))
    assert len(runs.load_checkpoint(out / "checkpoint.pt")["history"]) == 1
    state = summary(out)
    assert state["status"] == "interrupted" and "disk full" in state["error"]
    assert state["epochs"] == 1 and epochs(out) == [1]

    monkeypatch.setattr(runs, "_write_durably", real)
    assert invoke("train", "--resume", out, "-q").exit_code == 0
    assert epochs(out) == [1, 2, 3] and summary(out)["status"] == "finished"


# --------------------------------------------------------------------------- training


def test_a_non_finite_evaluation_loss_is_a_divergence(tmp_path):
    # One step per epoch: the batch loss is measured before the step that blows the
    # weights up, so only the evaluation after it sees the damage.
    out = tmp_path / "run"
    args = ["--activation", "relu", "--lr", "1e12", "--batch-size", "1000", "--epochs", "1"]
    result = invoke("train", "--dataset", "synthetic", "--hidden", "16,16", *args, "--out", out)
    failed(result, "diverged at epoch 1", "at the end-of-epoch evaluation", "smaller learning")
    state = summary(out)
    assert state["status"] == "diverged" and "evaluation" in state["error"]
    assert "final" not in state and epochs(out) == []


def test_non_finite_inputs_are_damaged_data_not_a_divergence(tmp_path, monkeypatch):
    import gfalign.data

    real = gfalign.data.synthetic

    def damaged(**options):
        dataset = real(**options)
        dataset.train.x[:3, 0] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return dataset

    monkeypatch.setattr(gfalign.data, "synthetic", damaged)
    out = tmp_path / "run"
    failed(
        invoke("train", *TINY, "--out", out),
        "training inputs hold 3 non-finite values (NaN/inf): the data are damaged, "
        "not the learning rate",
    )
    assert not out.exists()


def test_empty_splits_are_refused_clearly():
    from gfalign.data.dataset import Dataset
    from gfalign.train import Trainer

    dataset = runs.load_data(RunConfig(dataset="synthetic"), torch.device("cpu"))
    empty = dataset.test.subset(0)
    config = RunConfig(dataset="synthetic", hidden=(8,))
    net, rule = runs.build(config)
    with pytest.raises(DataError, match="empty split"):
        evaluate(net, empty)
    with pytest.raises(DataError, match="the test split is empty"):
        Trainer(net, rule, Dataset("synthetic", dataset.train, empty), config.train)
    with pytest.raises(DataError, match="the training split is empty"):
        Trainer(net, rule, Dataset("synthetic", empty, dataset.test), config.train)


# --------------------------------------------------------------------------- signals, resumes


def test_sigterm_during_train_marks_the_run_interrupted(tmp_path):
    import signal

    out = tmp_path / "run"
    args = ["--dataset", "synthetic", "--hidden", "128,128", "--epochs", "200", "-q"]
    process = subprocess.Popen(
        [sys.executable, "-m", "gfalign", "train", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.exists() and path.read_text().strip():
                break
            time.sleep(0.02)
        if process.poll() is not None:
            pytest.skip("the run ended before it could be stopped")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert summary(out)["status"] == "interrupted"
    assert epochs(out) == list(range(1, len(epochs(out)) + 1))


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path):
    # A torch whose import is interrupted, as a Ctrl-C in the first second would be.
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    source = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run(
        [sys.executable, "-m", "gfalign", "train", "--dataset", "synthetic", "--epochs", "1"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{fake.parent}:{source}"},
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["Error: interrupted"], result.stderr


def test_a_checkpoint_of_another_network_is_refused_naming_the_tensor(tmp_path, whole):
    import hashlib

    cut = cut_run(whole, tmp_path / "cut")
    other = RunConfig.from_toml(whole / "config.toml").override(hidden=[24, 16])
    state = runs.load_checkpoint(cut / "checkpoint.pt")
    net, rule = runs.build(other)
    state["net"], state["rule"] = net.state_dict(), rule.state_dict()
    torch.save(state, cut / "checkpoint.pt")  # config and SHA-256 made to match
    digest = hashlib.sha256((cut / "checkpoint.pt").read_bytes()).hexdigest()
    (cut / "checkpoint.pt.sha256").write_text(f"{digest}  checkpoint.pt\n")
    result = invoke("train", "--resume", cut)
    failed(result, "does not fit the network of", "has shape [24, ", "the network's has [16, ")
    assert f"gfalign train --resume {cut} --restart" in result.output
    assert epochs(cut) == [1, 2]


def test_a_checkpoint_of_another_configuration_names_the_keys(tmp_path, whole):
    cut = cut_run(whole, tmp_path / "cut")
    text = (cut / "config.toml").read_text()
    (cut / "config.toml").write_text(text.replace("lr = 0.001", "lr = 0.002"))
    result = invoke("train", "--resume", cut)
    failed(result, "belongs to another configuration", "differ in train.lr", "--restart")
    assert invoke("train", "--resume", cut, "--restart", "-q").exit_code == 0
    assert epochs(cut) == [1, 2, 3]
