"""One battery over every registered feedback family and every preset."""

import pytest
import torch

from gfalign import FAMILIES, MLP, PRESETS, FeedbackRule, FeedbackSpec
from gfalign.feedback import draw, generator_for


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_shape_and_determinism(name):
    a = draw(name, (10, 30), generator_for(0, "x"))
    b = draw(name, (10, 30), generator_for(0, "x"))
    assert a.shape == (10, 30) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_reaches_a_rule_and_stays_fixed(name):
    net = MLP([8, 6, 5, 4], seed=0)
    rule = FeedbackRule("dfa", net.sizes, feedback=name)
    before = {k: m.clone() for k, m in rule.matrices().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        rule.backward(net, torch.rand(5, 8), torch.randint(0, 4, (5,)))
        optimizer.step()
    for key, matrix in rule.matrices().items():
        assert torch.equal(matrix, before[key])
    assert all(not p.requires_grad for p in rule.buffers())


def test_paper_families_values():
    g = generator_for(0)
    assert torch.equal(draw("B2", (3, 5), g), torch.eye(3, 5, dtype=torch.float64))
    b4 = draw("B4", (200, 200), g)
    assert set(b4.unique().tolist()) <= {0.0, 1.0}
    assert abs(b4.mean().item() - 0.1) < 0.01
    assert abs(draw("B7", (300, 300), g).std().item() - 0.01) < 0.001
    b5 = draw("B5", (50, 50), g)
    assert (b5 - 1).abs().max() <= 0.01
    u = draw("uniform", (100, 100), g)
    assert u.min() >= -0.5 and u.max() <= 0.5 and u.std() > 0.25
    assert abs(draw("sparse:density=0.3", (200, 200), g).ne(0).double().mean() - 0.3) < 0.02


def test_spec_parsing():
    spec = FeedbackSpec.parse("B6:density=0.2,std=0.05")
    assert spec.family == "B6" and spec.params == {"density": 0.2, "std": 0.05}
    assert FeedbackSpec.parse(str(spec)) == spec
    with pytest.raises(ValueError, match="not key=value"):
        FeedbackSpec.parse("B6:density")
    with pytest.raises(ValueError, match="bad parameters"):
        draw("B2:std=1", (2, 2), generator_for(0))


def test_ones_matrix_carries_no_softmax_error():
    """Entries of a softmax error sum to zero, so a matrix of ones maps it to exactly zero."""
    e = torch.softmax(torch.randn(16, 10, dtype=torch.float64), 1)
    e[torch.arange(16), torch.randint(0, 10, (16,))] -= 1
    assert (e @ torch.ones(10, 800, dtype=torch.float64)).abs().max() < 1e-12


def test_matrices_are_independent_draws_and_depend_only_on_their_place():
    rule = FeedbackRule("s3", [8, 6, 6, 4], seed=1)
    dfa = FeedbackRule("dfa", [8, 6, 6, 4], seed=1)
    assert torch.equal(rule.matrix(1, 0), dfa.matrix(1, 0))
    assert not torch.equal(rule.matrix(1, 0), rule.matrix(2, 0))
    other_seed = FeedbackRule("s3", [8, 6, 6, 4], seed=2)
    assert not torch.equal(rule.matrix(1, 1), other_seed.matrix(1, 1))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_feedback_is_saved_and_moved_with_the_rule(name):
    rule = FeedbackRule(name, [8, 6, 5, 4], seed=3)
    state = rule.state_dict()
    fresh = FeedbackRule(name, [8, 6, 5, 4], seed=99)
    fresh.load_state_dict(state)
    for key, matrix in rule.matrices().items():
        assert torch.equal(fresh.matrix(*key), matrix)
    assert all(m.dtype == torch.float64 for m in rule.to(torch.float64).matrices().values())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_same_seed_same_gradients_bit_for_bit(name):
    def run():
        net = MLP([8, 6, 5, 4], seed=4)
        rule = FeedbackRule(name, net.sizes, seed=4)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            rule.backward(
                net, torch.rand(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            )
            optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)
