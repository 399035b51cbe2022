"""The benchmark's FLOP counts, its CLI in a tiny mode, and the fused SGD path it times."""

import json

import pytest
import torch
from click.testing import CliRunner

from gfalign import MLP, PRESETS, FeedbackRule
from gfalign.bench import (
    BASELINE,
    COLUMNS,
    BenchConfig,
    PeakMemory,
    epoch_batches,
    epoch_flops,
    gemm_only_seconds,
    run,
    step_gemms,
)
from gfalign.cli import main
from gfalign.data import Dataset, Split
from gfalign.train import TrainConfig, Trainer

DT = torch.float64
SIZES = (784, 800, 800, 10)


def flops(rule_name, batch=32, sizes=SIZES):
    return sum(g.flops for g in step_gemms(FeedbackRule(rule_name, sizes), batch))


def test_dfa_flops_match_a_hand_count():
    n = 32
    rule = FeedbackRule("dfa", SIZES)
    gemms = step_gemms(rule, n)
    forward = 2 * n * (784 * 800 + 800 * 800 + 800 * 10)  # 3 products
    direct = 2 * n * 10 * (800 + 800)  # e @ [D^1 D^2], one product
    updates = 2 * n * (800 * 784 + 800 * 800 + 10 * 800)  # 3 weight-update products
    assert len(gemms) == 7
    assert sum(g.flops for g in gemms) == forward + direct + updates
    assert [(g.m, g.k, g.n) for g in gemms if "direct" in g.what] == [(n, 10, 1600)]


def test_other_presets_match_hand_counts():
    n = 32
    forward = updates = 2 * n * (784 * 800 + 800 * 800 + 800 * 10)
    base = forward + updates
    backward_top = 2 * n * 10 * 800  # d^3 = e through an (10, 800) matrix
    square = 2 * n * 800 * 800  # one hidden-to-hidden product
    direct_both = 2 * n * 10 * 1600
    direct_one = 2 * n * 10 * 800
    auxiliary = 2 * (2 * n * 800 * 10)  # logits h D^T and e^i D of one layer
    expected = {
        "bp": base + backward_top + square,
        "fa": base + backward_top + square,
        "s1": base + direct_both + square,
        "s2": base + direct_both + square,
        "s3": base + direct_both + 2 * square,
        "dfa-aux": base + 2 * auxiliary,
        "s1-aux": base + 2 * auxiliary + square,
        "s2-aux": base + 2 * auxiliary + square,
        "s3-aux": base + 2 * auxiliary + 2 * square,
    }
    for name, count in expected.items():
        assert flops(name) == count, name
    assert direct_one * 2 == direct_both


def test_epoch_counts_the_smaller_last_batch():
    assert epoch_batches(60_000, 128) == [128] * 468 + [96]
    rule = FeedbackRule("s2", SIZES)
    assert epoch_flops(rule, 300, 128) == 2 * flops("s2", 128) + flops("s2", 44)


@pytest.mark.parametrize("stack", [0, 3])
def test_gemm_only_runs_the_products(stack):
    rule = FeedbackRule("s3-aux", (20, 9, 8, 5))
    seconds = gemm_only_seconds(
        lambda n: step_gemms(rule, n), [8, 8, 3], torch.device("cpu"), torch.float32, stack=stack
    )
    assert seconds > 0


def tiny_arguments(*extra):
    return ["bench", "--tiny", "--quiet", "--peak-size", "64", *extra]


def test_cli_tiny_mode_produces_every_column():
    result = CliRunner().invoke(main, tiny_arguments("--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = [row["name"] for row in report["rows"]]
    assert names == [BASELINE, *PRESETS]
    assert report["peak_gflops"] > 0
    for row in report["rows"]:
        for _, key, _ in COLUMNS:
            assert row[key] is not None, (row["name"], key)
        assert row["seconds"] > 0 and row["gemm_seconds"] > 0 and row["peak_memory_mib"] > 0
        assert len(row["samples"]) == 2
    machine = report["machine"]
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__


def test_cli_table_and_ensemble_section():
    result = CliRunner().invoke(
        main, tiny_arguments("--rules", "dfa,s3", "--ensemble", "2", "--optimizer-path")
    )
    assert result.exit_code == 0, result.output
    for header, _, _ in COLUMNS:
        assert header in result.output
    for name in ("dfa (optimizer)", "s3 x2 sequential", "s3 x2 ensemble", "threads", "torch"):
        assert name in result.output


def test_cli_refuses_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, tiny_arguments("--device", "cuda"))
    assert result.exit_code != 0
    assert "CUDA is not available" in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_unknown_rules():
    result = CliRunner().invoke(main, tiny_arguments("--rules", "dfa,nope"))
    assert result.exit_code != 0 and "nope" in result.output


def test_run_falls_back_to_random_tensors_without_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("GFALIGN_DATA", raising=False)
    config = BenchConfig(
        sizes=(784, 8, 8, 10),
        rules=("dfa",),
        baseline=False,
        data_root=str(tmp_path),
        examples=64,
        repeats=1,
        warmup=1,
        peak_size=32,
    )
    result = run(config)
    assert "random" in result["data"] and result["examples"] == 64


def test_peak_memory_is_measured():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    assert memory.peak_bytes() > 0


# ---------------------------------------------------------------- the fused SGD path it times


def random_data(n=40, features=9, classes=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, features, generator=generator, dtype=DT)
    y = torch.randint(0, classes, (n,), generator=generator)
    return Dataset("random", Split(x, y), Split(x[:10], y[:10]))


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sgd_step_equals_backward_and_optimizer(name, reduction):
    sizes = [9, 6, 5, 3]
    data = random_data()
    x, y = data.train.x[:13], data.train.y[:13]
    fused = MLP(sizes, seed=1, dtype=DT)
    reference = MLP(sizes, seed=1, dtype=DT)
    rule = FeedbackRule(name, sizes, seed=2, dtype=DT)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        step = rule.sgd_step(fused, x, y, lr=0.1, reduction=reduction)
        expected = rule.backward(reference, x, y, reduction=reduction)
        optimizer.step()
        assert torch.allclose(step.loss, expected.loss, atol=1e-13, rtol=0)
    for a, b in zip(fused.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)
        assert a.grad is None


@pytest.mark.parametrize("name", ["bp", "s3", "dfa-aux"])
def test_trainer_fused_path_equals_optimizer_path(name):
    sizes = [9, 6, 5, 3]
    data = random_data()
    config = TrainConfig(epochs=2, batch_size=7, lr=0.05, seed=3)
    runs = []
    for fused in (True, False):
        net = MLP(sizes, seed=1, dtype=DT)
        trainer = Trainer(net, FeedbackRule(name, sizes, dtype=DT), data, config, fused_sgd=fused)
        trainer.fit()
        runs.append(trainer)
    for a, b in zip(runs[0].net.parameters(), runs[1].net.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    for got, expected in zip(runs[0].history, runs[1].history, strict=True):
        for key in expected:
            if key != "seconds":
                assert got[key] == pytest.approx(expected[key], abs=1e-12, rel=0)


def test_fused_path_only_for_plain_sgd():
    sizes = [9, 6, 5, 3]
    data = random_data()
    for options, fused in (({}, True), ({"momentum": 0.9}, False), ({"weight_decay": 0.1}, False)):
        net = MLP(sizes, seed=1, dtype=DT)
        config = TrainConfig(epochs=1, batch_size=8, optimizer_options=options)
        Trainer(net, FeedbackRule("dfa", sizes, dtype=DT), data, config).fit()
        assert (net.weight(1).grad is None) == fused, options
