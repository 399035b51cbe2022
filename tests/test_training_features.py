"""Training features every rule can use: weight decay, schedules, clipping, early stopping,
the best checkpoint, per-layer norms, and a test split left alone.

Each feature is checked against what it says it does (a hand-computed step, torch's own
schedulers, the norms recomputed), refused when misconfigured with one line, and shown to leave
every configuration that does not use it, its numbers and its key unchanged. Float64
throughout, where the checks are exact or to rounding.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from gfalign import runs
from gfalign.config import RunConfig
from gfalign.data import synthetic
from gfalign.engine import FeedbackRule
from gfalign.network import MLP
from gfalign.rules import ConfigError
from gfalign.runs import BEST_CHECKPOINT, CheckpointError, execute, load_checkpoint
from gfalign.train import (
    Schedule,
    TrainConfig,
    Trainer,
    _plain_sgd_group,
    stacking_problem,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "results" / "runs.jsonl.gz"
SIZES = [784, 16, 12, 10]


@pytest.fixture(scope="module")
def data():
    return synthetic(160, 40, validation=40, dtype=torch.float64)


def _parts(rule: str = "dfa", seed: int = 0) -> tuple[MLP, FeedbackRule]:
    net = MLP(SIZES, seed=seed, dtype=torch.float64)
    return net, FeedbackRule(rule, net, seed=seed, dtype=torch.float64)


def _run_config(**train) -> RunConfig:
    protocol = {"epochs": 3, "batch_size": 40, "lr": 0.01, **train}
    return RunConfig(
        dataset="synthetic",
        train_subset=160,
        test_subset=60,
        validation=60,
        hidden=(16,),
        rule="dfa",
        dtype="float64",
        train=TrainConfig(**protocol),
    )


# --------------------------------------------------------------------------- keys stay


def test_every_stored_run_keeps_its_key():
    with gzip.open(EXPORT, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    assert rows
    for row in rows:
        assert RunConfig.from_data(row["config"]).key() == row["key"], row["label"]


@pytest.mark.parametrize(
    "defaults",
    [
        {"weight_decay": 0.0},
        {"weight_decay": 0},
        {"schedule": None},
        {"warmup": 0},
        {"clip_grad_norm": None},
        {"early_stopping": None},
        {"keep_best": False},
        {"record_norms": False},
        {"evaluate_test": True},
    ],
)
def test_a_default_valued_new_field_leaves_key_and_file_unchanged(defaults):
    plain = RunConfig(dataset="synthetic", hidden=(8,))
    spelled = RunConfig.from_data({"dataset": "synthetic", "hidden": [8], "train": defaults})
    assert spelled.key() == plain.key()
    assert spelled.to_toml() == plain.to_toml()


@pytest.mark.parametrize(
    "changes",
    [
        {"weight_decay": 1e-4},
        {"schedule": "cosine"},
        {"warmup": 1},
        {"clip_grad_norm": 1.0},
        {"early_stopping": 2},
        {"keep_best": True},
        {"record_norms": True},
        {"evaluate_test": False},
    ],
)
def test_a_feature_in_use_changes_the_key_and_survives_toml(changes, tmp_path):
    plain = RunConfig(dataset="synthetic", hidden=(8,), validation=10)
    used = RunConfig.from_data({**plain.to_data(), "train": changes})
    assert used.key() != plain.key()
    path = tmp_path / "run.toml"
    path.write_text(used.to_toml())
    assert RunConfig.from_toml(path) == used


# --------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sgd_weight_decay_adds_decay_times_weight_to_the_rules_gradient(data, reduction):
    net, rule = _parts()
    reference, reference_rule = copy.deepcopy(net), copy.deepcopy(rule)
    config = TrainConfig(epochs=1, lr=0.05, weight_decay=0.3, reduction=reduction)
    trainer = Trainer(net, rule, data, config)
    assert _plain_sgd_group(trainer.optimizer) is None  # not the fused path: the optimizer's
    x, y = data.train.x[:32], data.train.y[:32]
    trainer.step(x, y)
    reference_rule.backward(reference, x, y, reduction=reduction)
    for ours, theirs in zip(net.parameters(), reference.parameters(), strict=True):
        expected = theirs - 0.05 * (theirs.grad + 0.3 * theirs)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-15)


def test_adamw_decay_is_decoupled_and_weight_decay_is_given_once():
    net, rule = _parts()
    trainer = Trainer(
        net, rule, synthetic(40, 10), TrainConfig(optimizer="adamw", weight_decay=0.2)
    )
    assert type(trainer.optimizer) is torch.optim.AdamW
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.2
    with pytest.raises(ConfigError, match=r"both give weight decay; allowed: one of them"):
        TrainConfig(weight_decay=0.1, optimizer_options={"weight_decay": 0.1})
    with pytest.raises(ConfigError, match=r"\[train\] weight_decay = -0.1: out of range"):
        TrainConfig(weight_decay=-0.1)


# --------------------------------------------------------------------------- schedules


def _torch_rates(kind: str, epochs: int, warmup: int, lr: float, **options) -> list[float]:
    """The rates torch.optim.lr_scheduler gives each epoch (stepped once per epoch)."""
    from torch.optim import lr_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    after = {
        "step": lambda: lr_scheduler.StepLR(optimizer, options["every"], options["gamma"]),
        "multistep": lambda: lr_scheduler.MultiStepLR(
            optimizer, list(options["milestones"]), options["gamma"]
        ),
        "cosine": lambda: lr_scheduler.CosineAnnealingLR(
            optimizer, epochs - warmup, options.get("min_lr", 0.0)
        ),
    }
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's own deprecated step(epoch) call
        schedule = after[kind]()
        if warmup:
            ramp = lr_scheduler.LinearLR(optimizer, 1 / (warmup + 1), 1.0, total_iters=warmup)
            schedule = lr_scheduler.SequentialLR(optimizer, [ramp, schedule], [warmup])
        for _ in range(epochs):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
    return rates


@pytest.mark.parametrize(
    ("text", "kind", "options"),
    [
        ("step:every=3,gamma=0.5", "step", {"every": 3, "gamma": 0.5}),
        (
            "multistep:milestones=[2, 5, 7],gamma=0.3",
            "multistep",
            {"milestones": [2, 5, 7], "gamma": 0.3},
        ),
        ("cosine", "cosine", {}),
        ("cosine:min_lr=0.001", "cosine", {"min_lr": 0.001}),
    ],
)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_give_torch_schedulers_rates(text, kind, options, warmup):
    epochs, lr = 12, 0.1
    ours = Schedule.parse(text, lr=lr, epochs=epochs, warmup=warmup)
    expected = _torch_rates(kind, epochs, warmup, lr, **options)
    assert [ours.rate(k) for k in range(epochs)] == pytest.approx(expected, rel=1e-12)


def test_trainer_trains_each_epoch_at_its_rate_on_the_fused_path(data):
    net, rule = _parts()
    config = TrainConfig(epochs=4, lr=0.02, schedule="step:every=1,gamma=0.5", warmup=1)
    trainer = Trainer(net, rule, data, config)
    assert _plain_sgd_group(trainer.optimizer) is not None  # a schedule keeps the fused step
    history = trainer.fit()
    rates = [config.learning_rates().rate(k) for k in range(4)]
    assert [record["lr"] for record in history] == rates
    assert rates[0] < rates[1] and rates[1] > rates[2]
    assert trainer.lr == config.learning_rates().rate(4)


def test_no_schedule_keeps_the_records_as_they_were(data):
    net, rule = _parts()
    record = Trainer(net, rule, data, TrainConfig(epochs=1)).fit()[-1]
    assert "lr" not in record and "best_epoch" not in record
    assert not any(name.startswith(("weight_norm", "delta_norm")) for name in record)


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [
        ("linear", "unknown schedule 'linear'"),
        ("stpe:every=2", "(did you mean 'step'?)"),
        ("step", "step needs every"),
        ("step:every=0", "every = 0: not an integer >= 1"),
        ("step:every=2.5", "every = 2.5: not an integer >= 1"),
        ("step:every=2,gama=0.1", "step has no option 'gama'"),
        ("step:every=2,gamma=-1", "gamma = -1: not a number > 0"),
        ("multistep:milestones=[5, 3]", "not a list of increasing integers"),
        ("multistep:milestones=5", "not a list of increasing integers"),
        ("cosine:min_lr=x", "min_lr = 'x' is not a number"),
        ("cosine:min_lr", "'min_lr' is not key=value"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_it(schedule, fragment):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(schedule=schedule)
    text = str(caught.value)
    assert fragment in text and "\n" not in text
    assert text.startswith(f'[train] schedule = "{schedule}"') and "allowed: " in text


def test_a_warmup_as_long_as_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"warmup = 5: not shorter than epochs = 5"):
        TrainConfig(epochs=5, warmup=5)
    with pytest.raises(ConfigError, match=r"warmup = -1: out of range"):
        TrainConfig(warmup=-1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_resumed_scheduled_run_equals_an_uninterrupted_one(tmp_path, optimizer):
    config = _run_config(
        epochs=4,
        optimizer=optimizer,
        lr=0.01 if optimizer == "sgd" else 1e-3,
        schedule="multistep:milestones=[1, 2],gamma=0.5",
        warmup=1,
        weight_decay=1e-3,
    )
    whole = execute(config, tmp_path / "whole")
    execute(config, tmp_path / "cut", stop_after=2)
    resumed = execute(None, tmp_path / "cut", resume=True)
    assert len({record["lr"] for record in whole.history}) == 3
    for ours, theirs in zip(resumed.history, whole.history, strict=True):
        assert {k: v for k, v in ours.items() if k != "seconds"} == {
            k: v for k, v in theirs.items() if k != "seconds"
        }
    ours = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    theirs = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    for name, tensor in theirs["net"].items():
        assert torch.equal(ours["net"][name], tensor), name
    assert ours["schedule"] == theirs["schedule"]
    assert (
        ours["optimizer"]["param_groups"][0]["lr"] == theirs["optimizer"]["param_groups"][0]["lr"]
    )


def test_stacked_members_with_decay_and_a_schedule_equal_their_runs(tmp_path):
    configs = [
        RunConfig.from_data(
            {**_run_config(weight_decay=1e-3, schedule="cosine", warmup=1).to_data(), "seed": s}
        )
        for s in (0, 1)
    ]
    stacked = runs.execute_stacked(configs, [tmp_path / f"stacked{s}" for s in (0, 1)])
    for config, result in zip(configs, stacked, strict=True):
        alone = execute(config, tmp_path / f"alone{config.seed}")
        for ours, theirs in zip(result.history, alone.history, strict=True):
            assert ours["lr"] == theirs["lr"]
            assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-9)
            assert ours["validation_error"] == theirs["validation_error"]


# --------------------------------------------------------------------------- clipping


def test_clipping_scales_the_rules_gradient_to_the_norm(data):
    net, rule = _parts()
    before = [p.detach().clone() for p in net.parameters()]
    config = TrainConfig(epochs=1, lr=0.5, clip_grad_norm=1e-3)
    trainer = Trainer(net, rule, data, config)
    x, y = data.train.x[:32], data.train.y[:32]
    reference, reference_rule = copy.deepcopy(net), copy.deepcopy(rule)
    reference_rule.backward(reference, x, y, reduction="sum")
    gradient = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    assert torch.linalg.vector_norm(gradient) > 1e-3  # so the clip acts
    trainer.step(x, y)
    after = [p.detach() for p in net.parameters()]
    change = torch.cat([(b - a).reshape(-1) for b, a in zip(before, after, strict=True)])
    assert float(torch.linalg.vector_norm(change)) == pytest.approx(0.5 * 1e-3, rel=1e-6)
    direction = change / torch.linalg.vector_norm(change)
    torch.testing.assert_close(direction, gradient / torch.linalg.vector_norm(gradient))


def test_a_large_clip_changes_nothing_but_the_path(data):
    clipped, clipped_rule = _parts()
    plain, plain_rule = _parts()
    Trainer(clipped, clipped_rule, data, TrainConfig(epochs=1, clip_grad_norm=1e9)).fit()
    Trainer(plain, plain_rule, data, TrainConfig(epochs=1), fused_sgd=False).fit()
    for ours, theirs in zip(clipped.parameters(), plain.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"clip_grad_norm": 0.0}, "[train] clip_grad_norm = 0.0: out of range"),
        ({"clip_grad_norm": "1"}, '[train] clip_grad_norm = "1": a string'),
        ({"early_stopping": 0}, "[train] early_stopping = 0: out of range"),
        ({"keep_best": 1}, "[train] keep_best = 1: an integer, not true or false"),
        ({"record_norms": "yes"}, '[train] record_norms = "yes": a string'),
        ({"evaluate_test": None}, "[train] evaluate_test = none"),
    ],
)
def test_bad_feature_values_are_one_line(changes, fragment):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**changes)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "changes", [{"clip_grad_norm": 1.0}, {"early_stopping": 2}, {"record_norms": True}]
)
def test_features_that_cannot_stack_are_refused_before_training(tmp_path, changes):
    configs = [RunConfig.from_data({**_run_config(**changes).to_data(), "seed": s}) for s in (0, 1)]
    name = next(iter(changes))
    assert name in stacking_problem(configs[0].train)
    with pytest.raises(ConfigError, match=rf"\[train\] {name} = .* cannot train stacked"):
        runs.execute_stacked(configs, [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_patience_epochs_after_the_best(tmp_path):
    # A rate this small leaves the validation error where it starts: epoch 1 stays the best.
    config = _run_config(epochs=10, lr=1e-12, early_stopping=2)
    result = execute(config, tmp_path / "run")
    history = result.history
    best = 1 + min(range(len(history)), key=lambda k: history[k]["validation_error"])
    assert len(history) == best + 2 < 10
    assert [r["best_epoch"] for r in history] == [best] * len(history)
    assert result.summary["status"] == "finished" and result.summary["stopped_early"]
    assert result.summary["best_epoch"] == best
    again = execute(None, tmp_path / "run", resume=True)  # nothing left to train
    assert len(again.history) == len(history) and again.summary["status"] == "finished"


def test_early_stopping_on_a_learning_run_follows_its_validation_errors(data):
    net, rule = _parts()
    config = TrainConfig(epochs=12, lr=0.02, batch_size=16, early_stopping=1)
    trainer = Trainer(net, rule, data, config)
    history = trainer.fit()
    errors = [r["validation_error"] for r in history]
    # patience 1: the first epoch that does not improve on every epoch before it is the last
    stop = next((k + 1 for k in range(1, len(errors)) if errors[k] >= min(errors[:k])), None)
    assert stop is not None and trainer.stopped_early
    assert len(history) == stop < 12


@pytest.mark.parametrize("changes", [{"early_stopping": 3}, {"keep_best": True}])
def test_watching_the_validation_error_needs_a_validation_split(tmp_path, changes):
    name = next(iter(changes))
    net, rule = _parts()
    with pytest.raises(ConfigError, match=rf"\[train\] {name} = .* no validation split"):
        Trainer(net, rule, synthetic(40, 10), TrainConfig(**changes))
    config = RunConfig.from_data({**_run_config(**changes).to_data(), "validation": 0})
    with pytest.raises(ConfigError, match=rf"{name} = .* validation = 0 holds no examples out"):
        execute(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- best checkpoint


def test_keep_best_writes_the_best_state_with_its_hash(tmp_path):
    result = execute(_run_config(epochs=5, lr=0.05, keep_best=True), tmp_path / "run")
    history = result.history
    errors = [r["validation_error"] for r in history]
    best = 1 + errors.index(min(errors))
    assert history[-1]["best_epoch"] == best == result.summary["best_epoch"]
    path = tmp_path / "run" / BEST_CHECKPOINT
    digest, name = (tmp_path / "run" / f"{BEST_CHECKPOINT}.sha256").read_text().split()
    assert name == BEST_CHECKPOINT and digest == hashlib.sha256(path.read_bytes()).hexdigest()
    state = load_checkpoint(path)
    assert len(state["history"]) == best
    assert state["history"][-1]["validation_error"] == min(errors)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_overwrite_removes_the_best_checkpoint(tmp_path):
    execute(_run_config(epochs=1, keep_best=True), tmp_path / "run")
    execute(_run_config(epochs=1), tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / BEST_CHECKPOINT).exists()
    assert not (tmp_path / "run" / f"{BEST_CHECKPOINT}.sha256").exists()


# --------------------------------------------------------------------------- norms


def test_recorded_norms_are_the_weights_updates_and_deltas(data):
    net, rule = _parts()
    start = copy.deepcopy(net)
    n = len(data.train)
    # One step per epoch, so the epoch's deltas are those of the whole training set.
    config = TrainConfig(epochs=1, batch_size=n, lr=0.01, record_norms=True)
    record = Trainer(net, rule, data, config).fit()[-1]
    deltas = rule.deltas(start, data.train.x, data.train.y).deltas
    for i in range(1, net.depth + 1):
        weight = net.weight(i).detach()
        assert record[f"weight_norm_{i}"] == pytest.approx(float(weight.norm()), rel=1e-12)
        update = float((weight - start.weight(i).detach()).norm())
        assert record[f"update_norm_{i}"] == pytest.approx(update, rel=1e-9)
        expected = float(deltas[i].norm()) / math.sqrt(n)
        assert record[f"delta_norm_{i}"] == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- modes and splits


def test_steps_train_and_evaluations_evaluate(data, monkeypatch):
    net, rule = _parts()
    modes: dict[str, list[bool]] = {"step": [], "metric": []}
    real = FeedbackRule.sgd_step

    def spy(self, net, *args, **kwargs):
        modes["step"].append(net.training)
        return real(self, net, *args, **kwargs)

    monkeypatch.setattr(FeedbackRule, "sgd_step", spy)

    def metric(trainer):
        modes["metric"].append(trainer.net.training)
        return {}

    Trainer(net, rule, data, TrainConfig(epochs=2), metrics=[metric]).fit()
    assert modes["step"] and all(modes["step"])
    assert modes["metric"] == [False, False]


def test_the_optimizer_holds_the_rules_parameters_too(data):
    net, rule = _parts()
    rule.register_parameter("learned", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
    trainer = Trainer(net, rule, data, TrainConfig(epochs=1))
    held = trainer.optimizer.param_groups[0]["params"]
    assert held[-1] is rule.learned and len(held) == len(list(net.parameters())) + 1


def test_without_test_evaluation_a_run_measures_the_test_set_once(tmp_path, monkeypatch):
    import gfalign.train

    seen = []
    real = gfalign.train.evaluate

    def counting(net, split, *args, **kwargs):
        seen.append(len(split))
        return real(net, split, *args, **kwargs)

    monkeypatch.setattr(gfalign.train, "evaluate", counting)
    monkeypatch.setattr(runs, "evaluate", counting)
    config = _run_config(epochs=3, evaluate_test=False, evaluate_train=False)
    result = execute(config, tmp_path / "run")
    assert all("test_error" not in record for record in result.history)
    assert seen == [60, 60, 60, 60]  # validation each epoch (60), then the test set (60) once
    test = result.summary["test"]
    assert test["epoch"] == 3 and result.summary["final"]["test_error"] == test["test_error"]


def test_a_synthetic_run_holds_its_validation_examples_out(tmp_path):
    result = execute(_run_config(epochs=1), tmp_path / "run")
    record = result.history[-1]
    assert {"validation_loss", "validation_error", "test_error"} <= set(record)


def test_a_block_model_uses_every_feature_and_resumes_exactly(tmp_path):
    config = RunConfig(
        dataset="synthetic",
        model="lenet5",
        rule="dfa",
        train_subset=64,
        test_subset=32,
        validation=32,
        train=TrainConfig(
            epochs=2,
            batch_size=32,
            optimizer="adam",
            weight_decay=1e-4,
            schedule="cosine",
            clip_grad_norm=0.5,
            keep_best=True,
            early_stopping=5,
            record_norms=True,
        ),
    )
    whole = execute(config, tmp_path / "whole")
    execute(config, tmp_path / "cut", stop_after=1)
    resumed = execute(None, tmp_path / "cut", resume=True)
    state = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    record = whole.history[-1]
    weights = [name for name in state["net"] if name.endswith(".weight")]
    assert len(weights) == sum(name.startswith("weight_norm_") for name in record) >= 3
    for i, name in enumerate(weights, 1):
        assert record[f"weight_norm_{i}"] == pytest.approx(float(state["net"][name].norm()))
        assert record[f"delta_norm_{i}"] > 0
    for ours, theirs in zip(resumed.history, whole.history, strict=True):
        assert {k: v for k, v in ours.items() if k != "seconds"} == {
            k: v for k, v in theirs.items() if k != "seconds"
        }
    assert (tmp_path / "whole" / BEST_CHECKPOINT).exists()
