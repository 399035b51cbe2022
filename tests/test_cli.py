"""The ``gfalign train|rules|plot`` commands, through click's test runner (tiny synthetic runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gfalign import runs
from gfalign.cli import main
from gfalign.config import RunConfig
from gfalign.data import DataError

TINY = ["--dataset", "synthetic", "--hidden", "16,16", "--epochs", "3", "--batch-size", "32"]
RUN_FILES = (
    "config.toml",
    "metrics.csv",
    "metrics.jsonl",
    "checkpoint.pt",
    "environment.json",
    "summary.json",
)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def failed(result, *phrases: str) -> None:
    """A user error: non-zero exit, a message naming ``phrases``, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


def final_state(directory: Path) -> tuple[dict, dict]:
    record = runs.read_metrics(directory)[-1]
    checkpoint = runs.load_checkpoint(directory / "checkpoint.pt")
    return record, checkpoint["net"]


def assert_same_run(a: Path, b: Path) -> None:
    record_a, net_a = final_state(a)
    record_b, net_b = final_state(b)
    for key in ("epoch", "test_error", "test_loss", "train_error", "train_loss", "batch_loss"):
        assert record_a[key] == record_b[key], key
    assert net_a.keys() == net_b.keys()
    for name in net_a:
        assert torch.equal(net_a[name], net_b[name]), name


def test_train_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert len(runs.read_metrics(out)) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert "epoch    3/3" in result.stderr
    assert "finished s1 2x16 tanh seed0: test error" in result.stderr
    assert "after 3 epochs" in result.stderr
    config = RunConfig.from_toml(out / "config.toml")
    assert config.hidden == (16, 16) and config.train.epochs == 3 and config.dataset == "synthetic"


def test_an_autoencoder_reports_its_reconstruction_error(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--objective", "autoencoder", "--out", out)
    assert result.exit_code == 0, result.output
    final = runs.read_metrics(out)[-1]["test_error"]
    assert "test error" not in result.stderr
    assert f"reconstruction error {final:.3g} after 3 epochs" in result.stderr
    first = runs.read_metrics(out)[0]["train_error"]
    assert f"train reconstruction error {first:6.3g}" in result.stderr


def test_json_summary_is_clean_stdout(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["directory"] == str(out)
    assert data["status"] == "finished" and data["epochs"] == 3
    assert data["label"] == "s1 2x16 tanh seed0"
    assert data["key"] == RunConfig.from_toml(out / "config.toml").key()
    assert data["final"]["test_error"] == runs.read_metrics(out)[-1]["test_error"]


def test_config_file_with_flag_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'dataset = "synthetic"\nhidden = [8, 8]\nrule = "dfa"\nseed = 3\n'
        "[train]\nepochs = 2\nlr = 0.01\n"
    )
    out = tmp_path / "run"
    result = invoke("train", "--config", path, "--hidden", "12", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    config = RunConfig.from_toml(out / "config.toml")
    assert config.hidden == (12,) and config.rule == "dfa" and config.seed == 3
    assert config.train.epochs == 2 and config.train.lr == 0.01


def test_rule_from_a_toml_file_and_rules_show(tmp_path):
    shown = invoke("rules", "show", "s3", "--depth", "3")
    assert shown.exit_code == 0, shown.output
    assert "layer 3: d = " in shown.output and "layer 1: d = " in shown.output
    toml_text = shown.output.split("# TOML", 1)[1].split("\n", 1)[1]
    assert "[rule.layers.2]" in toml_text
    rule_file = tmp_path / "my-rule.toml"
    rule_file.write_text(toml_text)
    out = tmp_path / "run"
    result = invoke(
        "train", *TINY, "--hidden", "8,8,8", "--epochs", "1", "--rule", rule_file, "--out", out
    )
    assert result.exit_code == 0, result.output
    assert (
        RunConfig.from_toml(out / "config.toml").rule_config().to_data()
        == RunConfig(dataset="synthetic", hidden=(8, 8, 8), rule="s3").rule_config().to_data()
    )


def test_rules_lists_presets():
    result = invoke("rules")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {"bp", "fa", "dfa", "s1", "s2", "s3", "s1-aux"} <= set(names)
    assert "feedback alignment" in result.output


def test_unknown_preset_suggests_close_names(tmp_path):
    failed(invoke("rules", "show", "s4"), "unknown rule preset 's4'", "did you mean", "s3")
    failed(invoke("rules", "show", "dfa-au"), "did you mean dfa-aux")
    failed(invoke("train", *TINY, "--rule", "s4", "--out", tmp_path / "r"), "did you mean")
    assert not (tmp_path / "r").exists()


def test_bad_config_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('dataset = "synthetic"\ncolour = "red"\n[train]\nepocs = 3\n')
    failed(invoke("train", "--config", path, "--out", tmp_path / "r"), "colour", "known:")
    path.write_text('dataset = "synthetic"\n[train]\nepocs = 3\n')
    failed(invoke("train", "--config", path, "--out", tmp_path / "r"), "epocs")
    path.write_text("dataset = [")
    failed(invoke("train", "--config", path), "not valid TOML")
    failed(invoke("train", *TINY, "--hidden", "8,x"), "800,800")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_asked_for_but_absent(tmp_path):
    failed(invoke("train", *TINY, "--device", "cuda", "--out", tmp_path / "r"), "CUDA", "--device")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    failed(invoke("train", *TINY, "--out", blocker / "sub"), "not writable")


def test_missing_data_is_a_message(tmp_path, monkeypatch):
    import gfalign.data

    def load(name, **_):
        raise DataError(f"{name}: train-images-idx3-ubyte is missing; run gfalign data fetch")

    monkeypatch.setattr(gfalign.data, "load", load)
    result = invoke(
        "train", "--dataset", "mnist", "--hidden", "8", "--epochs", "1",
        "--data-dir", tmp_path / "empty", "--out", tmp_path / "r",
    )  # fmt: skip
    failed(result, "train-images-idx3-ubyte is missing", "gfalign data fetch")


def test_divergence_is_a_message_and_recorded(tmp_path):
    out = tmp_path / "r"
    result = invoke("train", *TINY, "--activation", "relu", "--lr", "1e9", "--out", out)
    failed(result, "diverged", "smaller learning rate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert (out / "metrics.csv").exists() and (out / "config.toml").exists()


def test_resume_reaches_the_uninterrupted_numbers(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert invoke("train", *TINY, "--out", whole, "-q").exit_code == 0
    config = RunConfig.from_toml(whole / "config.toml")
    runs.execute(config, cut, stop_after=1)
    assert len(runs.read_metrics(cut)) == 1
    result = invoke("train", "--resume", cut, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 3
    assert len(runs.read_metrics(cut)) == 3
    assert_same_run(whole, cut)


def test_resume_refuses_config_flags(tmp_path):
    out = tmp_path / "r"
    assert invoke("train", *TINY, "--epochs", "1", "--out", out, "-q").exit_code == 0
    failed(invoke("train", "--resume", out, "--lr", "0.1"), "--lr")


def test_resume_after_a_real_kill(tmp_path):
    args = ["--dataset", "synthetic", "--hidden", "512,512", "--epochs", "40", "-q"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    log = (tmp_path / "stderr.txt").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gfalign", "train", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            path = killed / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        if process.poll() is not None:
            pytest.skip("the run ended before it could be killed")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        log.close()
    done = len(runs.read_metrics(killed))
    assert 1 <= done < 40
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    result = invoke("train", "--resume", killed, "-q")
    assert result.exit_code == 0, result.output
    assert invoke("train", *args, "--out", whole).exit_code == 0
    assert_same_run(whole, killed)


class _Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    assert invoke("train", *TINY, "--epochs", "1", "--out", out, "-q").exit_code == 0
    marker = tmp_path / "pwned"
    torch.save({"net": _Payload(marker)}, out / "checkpoint.pt")
    failed(invoke("train", "--resume", out), "refusing to load", "checkpoint.pt")
    assert not marker.exists()
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    failed(invoke("train", "--resume", out), "refusing to load")


def test_tensorboard(tmp_path):
    out = tmp_path / "r"
    result = invoke("train", *TINY, "--epochs", "1", "--out", out, "--tensorboard", "-q")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        failed(result, "pip install gfalign[tensorboard]")
    else:
        assert result.exit_code == 0, result.output
        assert any((out / "tensorboard").glob("events.out.tfevents.*"))


def _drawn(monkeypatch) -> list:
    """The figures ``savefig`` writes from now on, recorded as they are saved."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig

    def record(figure, *args, **kwargs):
        saved.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def _data_lines(ax) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """(x, y) of every line an axes draws from data (reference lines left out)."""
    return [
        (tuple(map(float, line.get_xdata())), tuple(map(float, line.get_ydata())))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    ]


def _pixels_of(png: Path, colour) -> int:
    """How many pixels of the PNG are ``colour`` exactly (a line's core; antialiased edges
    differ)."""
    import numpy as np
    from matplotlib import colors
    from matplotlib import image as mpimg

    rgb = mpimg.imread(png)[..., :3]
    return int(np.all(np.abs(rgb - np.array(colors.to_rgb(colour))) < 1 / 255, axis=-1).sum())


def test_plot_curves_and_alignment(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("train", *TINY, "--out", a, "-q").exit_code == 0
    assert invoke("train", *TINY, "--rule", "dfa", "--alignment", "--out", b, "-q").exit_code == 0
    histories = [runs.read_metrics(run) for run in (a, b)]
    saved = _drawn(monkeypatch)
    png = tmp_path / "curves.png"
    result = invoke("plot", a, b, "-o", png)
    assert result.exit_code == 0, result.output
    (ax,) = saved[-1].axes
    expected = [
        (tuple(float(r["epoch"]) for r in h), tuple(float(r["test_error"]) for r in h))
        for h in histories
    ]
    assert _data_lines(ax) == expected  # one line per run, through its test errors
    for line in ax.get_lines():  # and the file holds them: each line's colour, well beyond
        assert _pixels_of(png, line.get_color()) > 150  # its legend sample's few pixels
    angles = tmp_path / "angles.png"
    result = invoke("plot", b, "--alignment", "--kind", "delta", "-o", angles)
    assert result.exit_code == 0, result.output
    panels = saved[-1].axes
    assert [ax.get_title() for ax in panels] == ["hidden layer 1", "hidden layer 2"]
    for layer, ax in enumerate(panels, start=1):
        ((epochs, values),) = _data_lines(ax)
        assert values == tuple(float(r[f"delta_angle_{layer}"]) for r in histories[1])
        assert _pixels_of(angles, ax.get_lines()[0].get_color()) > 150
    failed(invoke("plot", a, "--alignment", "-o", tmp_path / "x.png"), "--alignment")
    failed(invoke("plot", tmp_path), "not a run directory")


def test_plot_default_output_in_cwd(tmp_path, monkeypatch):
    out = tmp_path / "a"
    assert invoke("train", *TINY, "--epochs", "2", "--out", out, "-q").exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = invoke("plot", out, "--metric", "train_error")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plot.png").is_file()


def test_plot_curves_function(tmp_path):
    from gfalign.plots import plot_curves

    histories = {"s1": [{"epoch": 1, "test_error": 9.0}, {"epoch": 2, "test_error": 5.0}]}
    path = plot_curves(histories, tmp_path / "sub" / "c.png", title="t")
    assert path.is_file()
    with pytest.raises(ValueError, match="no 'test_loss'"):
        plot_curves(histories, tmp_path / "d.png", metric="test_loss")
