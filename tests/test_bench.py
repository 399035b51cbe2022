"""The benchmark's FLOP counts (recorded on real steps), its CLI in a tiny mode, and the fused
SGD path it times. No timed assertions: speed is measured by benchmarks, not by tests."""

import json
import time

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from gfalign import MLP, PRESETS, FeedbackRule
from gfalign.bench import (
    BASELINE,
    COLUMNS,
    BenchConfig,
    PeakMemory,
    epoch_batches,
    product_share,
    record_products,
    replay_products,
    run,
)
from gfalign.cli import main
from gfalign.data import Dataset, Split
from gfalign.models import build
from gfalign.train import TrainConfig, Trainer

DT = torch.float64
SIZES = (784, 16, 10)


def batch(n=8, shape=(784,), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=generator), torch.randint(
        0, 10, (n,), generator=generator
    )


def rule_flops(name, model, x, y):
    rule = FeedbackRule(name, model, seed=0)
    return sum(p.flops for p in record_products(lambda: rule.sgd_step(model, x, y, lr=1e-4)))


def autograd_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.step()

    return step


def test_mlp_step_flops_match_a_hand_count():
    n = 8
    x, y = batch(n)
    forward = 2 * n * (784 * 16 + 16 * 10)  # a^1 = h^0 W1^T, a^2 = h^1 W2^T
    updates = 2 * n * (16 * 784 + 10 * 16)  # W^i += d^i^T h^{i-1}
    back = 2 * n * 10 * 16  # bp: d^2 W^2; fa: d^2 B; dfa: e D (one stacked product)
    expected = {"bp": forward + back + updates, "fa": forward + back + updates}
    expected["dfa"] = forward + back + updates
    expected["dfa-aux"] = forward + updates + 2 * (2 * n * 16 * 10)  # h^1 D^T and e^1 D
    for name, count in expected.items():
        assert rule_flops(name, MLP(SIZES, seed=0), x, y) == count, name


def test_two_hidden_layers_dfa_counts_fewer_than_bp():
    sizes, n = (784, 32, 32, 10), 8
    x, y = batch(n)
    bp = rule_flops("bp", MLP(sizes, seed=0), x, y)
    dfa = rule_flops("dfa", MLP(sizes, seed=0), x, y)
    s3 = rule_flops("s3", MLP(sizes, seed=0), x, y)
    assert bp - dfa == 2 * n * 32 * 32 - 2 * n * 10 * 32  # d^2 W^2 (32x32) against e @ D^1
    assert s3 == bp - 2 * n * 10 * 32 + 2 * n * 10 * 64 + 2 * n * 32 * 32  # e@[D1 D2], laterals


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_engine_bp_counts_what_autograd_counts(model):
    if model == "mlp":
        net, x, y = MLP(SIZES, seed=0), *batch(8)
        plain = torch.nn.Sequential(
            torch.nn.Linear(784, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
        )
    else:
        net, x, y = build("lenet5", seed=0), *batch(4, (1, 32, 32))
        plain = build("lenet5", seed=0)
    step = autograd_step(plain, x, y)
    with FlopCounterMode(display=False) as counter:  # torch's own counter, independently
        step()
    recorded = sum(p.flops for p in record_products(step))
    assert recorded == counter.get_total_flops() > 0
    assert rule_flops("bp", net, x, y) == recorded
    # One hidden layer: dfa's e D costs bp's d^2 W^2; LeNet: no backward convolutions.
    dfa = rule_flops("dfa", net, x, y)
    assert dfa == recorded if model == "mlp" else dfa < recorded


def test_replay_calls_the_recorded_products():
    net = build("lenet5", seed=0)
    x, y = batch(4, (1, 32, 32))
    rule = FeedbackRule("fa", net, seed=0)
    products = record_products(lambda: rule.sgd_step(net, x, y, lr=1e-4))
    names = {p.name for p in products}
    assert {"aten.convolution.default", "aten.convolution_backward.default"} <= names
    assert "aten.addmm_.default" in names  # the fused in-place updates of the Linear blocks
    replay = replay_products(products, torch.device("cpu"))
    again = record_products(replay)
    assert [(p.name, p.flops) for p in again] == [(p.name, p.flops) for p in products]


def test_product_share_tells_products_from_other_work():
    """Steps of nothing but products spend most of their time in them; steps that mostly
    sleep, almost none; and each product is counted once per call."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(256, 256, generator=generator)

    def products(count):
        for _ in range(count):
            for _ in range(4):
                torch.mm(a, a)

    def sleeping(count):
        for _ in range(count):
            time.sleep(0.02)
            torch.mm(a[:8, :8], a[:8, :8])

    busy, ops = product_share(products, 5, torch.device("cpu"))
    idle, _ops = product_share(sleeping, 5, torch.device("cpu"))
    assert 0.5 < busy <= 1 and idle < 0.1
    (mm,) = (op for op in ops if op["op"] == "aten::mm")
    assert mm["calls_per_step"] == 4 and mm["ms_per_step"] > 0


def test_epoch_counts_the_smaller_last_batch():
    assert epoch_batches(60_000, 128) == [128] * 468 + [96]


def tiny_arguments(*extra):
    return ["bench", "--tiny", "--quiet", "--peak-size", "64", *extra]


def test_cli_tiny_mode_produces_every_column():
    result = CliRunner().invoke(main, tiny_arguments("--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = [row["name"] for row in report["rows"]]
    assert names == [BASELINE, *PRESETS]
    assert report["peak_gflops"] > 0
    rows = {row["name"]: row for row in report["rows"]}
    for row in report["rows"]:
        for _, key, _ in COLUMNS:
            assert row[key] is not None, (row["name"], key)
        assert row["seconds"] > 0 and row["gemm_seconds"] > 0 and row["peak_memory_mib"] > 0
        assert len(row["samples"]) == 2
    assert rows["dfa"]["gflop"] < rows["bp"]["gflop"]
    assert rows["bp"]["gflop"] == pytest.approx(rows[BASELINE]["gflop"], rel=0.03)
    machine = report["machine"]
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__


def test_cli_lenet_prints_every_requested_rule():
    rules = "bp,fa,dfa,s1,s3,dfa-aux"
    result = CliRunner().invoke(
        main,
        tiny_arguments("--model", "lenet5", "--rules", rules, "--examples", "40", "--top-ops", "3"),
    )
    assert result.exit_code == 0, result.output
    assert "lenet5" in result.output and "in products" in result.output
    lines = result.output.splitlines()
    for name in [BASELINE, *rules.split(",")]:
        assert any(line.split()[:1] == [name] for line in lines), name
        assert f"{name}: ops by self time" in result.output


def test_cli_table_and_ensemble_section():
    result = CliRunner().invoke(
        main, tiny_arguments("--rules", "dfa,s3", "--ensemble", "2", "--optimizer-path")
    )
    assert result.exit_code == 0, result.output
    for header, _, _ in COLUMNS:
        assert header in result.output
    for name in ("dfa (optimizer)", "s3 x2 sequential", "s3 x2 ensemble", "threads", "torch"):
        assert name in result.output


def test_cli_times_an_ensemble_of_lenets_member_after_member():
    result = CliRunner().invoke(
        main, tiny_arguments("--model", "lenet5", "--rules", "fa", "--ensemble", "2")
    )
    assert result.exit_code == 0, result.output
    assert "fa x2 sequential" in result.output and "fa x2 ensemble" in result.output


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
        gemm_only=False,
        data_root=str(tmp_path),
        examples=64,
        repeats=1,
        warmup=1,
        profile_steps=0,
        peak_size=32,
    )
    result = run(config)
    assert "random" in result["data"] and result["examples"] == 64
    assert result["epoch_examples"] == 60_000  # seconds per epoch extrapolated to all of them
    row = result["rows"][0]
    assert row["seconds"] == pytest.approx(row["samples"][0] * 60_000 / 64)
    assert row["gemm_seconds"] is None and row["products_share"] is None


def test_peak_memory_sees_an_allocation_and_its_reset():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.peak_bytes()
    size = 64 * 2**20
    block = torch.ones(size // 4)  # 64 MiB, every page written
    assert memory.peak_bytes() >= before + 0.9 * size
    peak = memory.peak_bytes()
    del block
    if not memory.resettable:
        pytest.skip(f"the peak cannot be reset here ({memory.how})")
    assert memory.current_bytes() < peak - 0.5 * size  # freed
    memory.reset()
    assert memory.peak_bytes() < peak - 0.5 * size  # the peak starts again from now


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
    # One rule per network: a rule's state (learned feedback, a step counter) is its run's.
    rule = FeedbackRule(name, sizes, seed=2, dtype=DT)
    reference_rule = FeedbackRule(name, sizes, seed=2, dtype=DT)
    optimizer = torch.optim.SGD([*reference.parameters(), *reference_rule.parameters()], lr=0.1)
    for _ in range(3):
        step = rule.sgd_step(fused, x, y, lr=0.1, reduction=reduction)
        expected = reference_rule.backward(reference, x, y, reduction=reduction)
        optimizer.step()
        assert torch.allclose(step.loss, expected.loss, atol=1e-13, rtol=0)
    for a, b in zip(fused.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)
        assert a.grad is None
    for a, b in zip(rule.parameters(), reference_rule.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)


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


def test_a_model_graph_is_benchmarked_with_its_input_shape_and_classes():
    from gfalign.bench import BenchConfig, _classes, _input_shape

    config = BenchConfig(model="resnet20")
    assert (_input_shape(config), _classes(config)) == ((3, 32, 32), 10)
