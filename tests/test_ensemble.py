"""The stacked ensemble gives what K separate Trainer runs give, in float64, for every preset."""

import pytest
import torch

from gfalign import MLP, PRESETS, FeedbackRule
from gfalign.data import Dataset, Split
from gfalign.ensemble import EnsembleTrainer
from gfalign.network import OBJECTIVES
from gfalign.train import TrainConfig, Trainer

DT = torch.float64
SIZES = [12, 7, 6, 4]
UNTIMED = "seconds"


def random_data(n_train=50, n_test=20, features=12, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(n, features, generator=generator, dtype=DT)
        return Split(x, torch.randint(0, classes, (n,), generator=generator))

    return Dataset("random", split(n_train), split(n_test))


def members(name, sizes=SIZES, k=3, objective="classification", activation="tanh", **options):
    nets = [MLP(sizes, activation, objective, seed=10 + i, dtype=DT) for i in range(k)]
    rules = [FeedbackRule(name, sizes, seed=20 + i, dtype=DT, **options) for i in range(k)]
    return nets, rules


def configs(k=3, **options):
    options = {"epochs": 2, "batch_size": 16, "lr": 0.05, **options}
    return [TrainConfig(seed=30 + i, **options) for i in range(k)]


def sequential(name, data, member_configs, **network_options):
    nets, rules = members(name, k=len(member_configs), **network_options)
    trainers = [
        Trainer(net, rule, data, config)
        for net, rule, config in zip(nets, rules, member_configs, strict=True)
    ]
    for trainer in trainers:
        trainer.fit()
    return trainers


def assert_same_runs(ensemble_members, trainers, tol=1e-10):
    for mine, theirs in zip(ensemble_members, trainers, strict=True):
        for a, b in zip(mine.net.parameters(), theirs.net.parameters(), strict=True):
            assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()
        assert len(mine.history) == len(theirs.history)
        for got, expected in zip(mine.history, theirs.history, strict=True):
            assert got.keys() == expected.keys()
            for key in expected:
                if key != UNTIMED:
                    assert got[key] == pytest.approx(expected[key], abs=tol, rel=0), key
        assert torch.equal(mine.generator.get_state(), theirs.generator.get_state())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_equals_separate_runs(name):
    data = random_data()
    member_configs = configs()
    expected = sequential(name, data, member_configs)
    nets, rules = members(name)
    ensemble = EnsembleTrainer(nets, rules, data, member_configs)
    histories = ensemble.fit()
    assert histories == ensemble.histories and len(histories) == 3
    assert_same_runs(ensemble.members, expected)
    assert set(histories[0][0]) == {
        "epoch",
        "steps",
        "seconds",
        "batch_loss",
        "train_loss",
        "train_error",
        "test_loss",
        "test_error",
    }


@pytest.mark.parametrize("name", ["s3", "s1-aux", "bp", "s2"])
def test_deep_network_mean_reduction_and_own_learning_rates(name):
    sizes = [12, 7, 6, 5, 4]
    data = random_data(n_train=45)  # the last batch is smaller
    member_configs = [
        TrainConfig(epochs=2, batch_size=10, lr=lr, reduction="mean", seed=s)
        for s, lr in ((1, 0.3), (2, 0.1), (3, 0.5))
    ]
    expected = sequential(name, data, member_configs, sizes=sizes)
    nets, rules = members(name, sizes=sizes)
    ensemble = EnsembleTrainer(nets, rules, data, member_configs)
    ensemble.fit()
    assert_same_runs(ensemble.members, expected)


@pytest.mark.parametrize("name", ["dfa", "s3", "bp"])
def test_autoencoder_equals_separate_runs(name):
    sizes = [12, 6, 5, 12]
    data = random_data()
    member_configs = configs(lr=0.02)
    options = {"sizes": sizes, "objective": "autoencoder", "activation": "sigmoid"}
    expected = sequential(name, data, member_configs, **options)
    nets, rules = members(name, **options)
    EnsembleTrainer(nets, rules, data, member_configs).fit()
    for net, trainer in zip(nets, expected, strict=True):
        for a, b in zip(net.parameters(), trainer.net.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_members_may_differ_in_feedback_families():
    data = random_data()
    nets = [MLP(SIZES, seed=i, dtype=DT) for i in range(2)]
    rules = [
        FeedbackRule("dfa", SIZES, feedback=family, seed=i, dtype=DT)
        for i, family in enumerate(["uniform", "B7"])
    ]
    copies = [
        Trainer(
            MLP(SIZES, seed=i, dtype=DT),
            FeedbackRule("dfa", SIZES, feedback=family, seed=i, dtype=DT),
            data,
            config,
        )
        for i, (family, config) in enumerate(zip(["uniform", "B7"], configs(2), strict=True))
    ]
    for trainer in copies:
        trainer.fit()
    ensemble = EnsembleTrainer(nets, rules, data, configs(2))
    ensemble.fit()
    assert_same_runs(ensemble.members, copies)


def test_one_config_for_all_members():
    data = random_data()
    nets, rules = members("s1")
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=4)
    ensemble = EnsembleTrainer(nets, rules, data, config)
    ensemble.fit()
    expected = sequential("s1", data, [config] * 3)
    assert_same_runs(ensemble.members, expected)


def test_state_round_trip_and_split_continue_like_one_run():
    data = random_data()
    member_configs = configs(epochs=3)
    expected = sequential("s3-aux", data, member_configs)

    nets, rules = members("s3-aux")
    first = EnsembleTrainer(nets, rules, data, member_configs)
    first.fit(epochs=1)
    state = first.state_dict()

    nets, rules = members("s3-aux")
    resumed = EnsembleTrainer(nets, rules, data, member_configs)
    resumed.load_state_dict(state)
    resumed.fit(epochs=2)
    # Split: every member continues alone as an ordinary Trainer.
    alone = resumed.split()
    for trainer in alone:
        trainer.fit()
    assert_same_runs(alone, expected)

    # A member's state is a Trainer's state.
    nets, rules = members("s3-aux")
    trainer = Trainer(nets[1], rules[1], data, member_configs[1])
    trainer.load_state_dict(first.state_dict()["members"][1])
    trainer.fit()
    assert_same_runs([trainer], [expected[1]])


def test_from_trainers_stacks_resumed_runs():
    data = random_data()
    member_configs = configs(epochs=2)
    expected = sequential("fa", data, member_configs)
    nets, rules = members("fa")
    trainers = [
        Trainer(net, rule, data, config)
        for net, rule, config in zip(nets, rules, member_configs, strict=True)
    ]
    for trainer in trainers:
        trainer.fit(epochs=1)
    EnsembleTrainer.from_trainers(trainers).fit()
    assert_same_runs(trainers, expected)


def test_a_diverging_member_leaves_the_others_untouched():
    data = random_data()
    member_configs = configs(epochs=2)
    nets, rules = members("dfa")
    with torch.no_grad():
        nets[1].weight(2)[0, 0] = float("nan")
    ensemble = EnsembleTrainer(nets, rules, data, member_configs)
    histories = ensemble.fit()
    assert list(ensemble.errors) == [1] and ensemble.active == [0, 2]
    assert histories[1] == [] and ensemble.errors[1].epoch == 1
    kept = [c for i, c in enumerate(member_configs) if i != 1]
    nets_alone = [MLP(SIZES, seed=10 + i, dtype=DT) for i in (0, 2)]
    rules_alone = [FeedbackRule("dfa", SIZES, seed=20 + i, dtype=DT) for i in (0, 2)]
    alone = [
        Trainer(net, rule, data, config)
        for net, rule, config in zip(nets_alone, rules_alone, kept, strict=True)
    ]
    for trainer in alone:
        trainer.fit()
    assert_same_runs([ensemble.members[0], ensemble.members[2]], alone)
    assert "errors" in ensemble.state_dict() and 1 in ensemble.state_dict()["errors"]


@pytest.mark.parametrize(
    "optimizer, options",
    [
        ("sgd", {"momentum": 0.9}),
        ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
        ("adam", {}),
        ("adamw", {"weight_decay": 0.01}),
        ("rmsprop", {"momentum": 0.5}),
        ("adagrad", {}),
    ],
)
def test_any_optimizer_equals_separate_runs(optimizer, options):
    """Element-wise optimizers step each stacked member as its own optimizer would."""
    data = random_data()
    member_configs = configs(lr=0.01, optimizer=optimizer, optimizer_options=options)
    nets, rules = members("s1")
    ensemble = EnsembleTrainer(nets, rules, data, member_configs)
    ensemble.fit()
    assert_same_runs(ensemble.members, sequential("s1", data, member_configs))


def test_optimizer_state_goes_back_to_the_members():
    """A member split off after a stacked epoch continues with its own Adam moments, as one
    uninterrupted run does."""
    data = random_data()
    member_configs = configs(lr=0.01, optimizer="adam")
    nets, rules = members("dfa")
    ensemble = EnsembleTrainer(nets, rules, data, member_configs)
    ensemble.fit(1)
    alone = ensemble.split()[1]
    alone.fit(2)
    nets, rules = members("dfa")
    one = Trainer(nets[1], rules[1], data, member_configs[1])
    one.fit(2)
    assert_same_runs([alone], [one])


def test_other_optimizers_need_one_learning_rate():
    data = random_data()
    nets, rules = members("dfa", k=2)
    rates = [TrainConfig(optimizer="adam", lr=0.1), TrainConfig(optimizer="adam", lr=0.2)]
    with pytest.raises(ValueError, match="need one learning rate; only plain SGD"):
        EnsembleTrainer(nets, rules, data, rates)


def test_refuses_members_that_cannot_stack():
    data = random_data()
    nets, rules = members("dfa", k=2)
    other = FeedbackRule("s1", SIZES, dtype=DT)
    with pytest.raises(ValueError, match="same configuration structure"):
        EnsembleTrainer(nets, [rules[0], other], data, configs(2))
    with pytest.raises(ValueError, match="batch_size"):
        EnsembleTrainer(nets, rules, data, [TrainConfig(batch_size=8), TrainConfig(batch_size=16)])
    relu = MLP(SIZES, "relu", seed=1, dtype=DT)
    with pytest.raises(ValueError, match="activation"):
        EnsembleTrainer([nets[0], relu], rules, data, configs(2))
    with pytest.raises(ValueError, match="2 networks but 1 rules"):
        EnsembleTrainer(nets, rules[:1], data, configs(2))


def test_every_objective_takes_stacked_members():
    generator = torch.Generator().manual_seed(0)
    for name, objective in OBJECTIVES.items():
        logits = torch.randn(3, 5, 4, generator=generator, dtype=DT)
        if objective.uses_labels:
            target = torch.randint(0, 4, (3, 5), generator=generator)
        else:
            target = torch.rand(3, 5, 4, generator=generator, dtype=DT)
        loss, error = objective.error(logits, target)
        assert loss.shape == (3,)
        for k in range(3):
            one_loss, one_error = objective.error(logits[k], target[k])
            assert torch.allclose(loss[k], one_loss, atol=1e-12, rtol=0), name
            assert torch.allclose(error[k], one_error, atol=1e-12, rtol=0), name
