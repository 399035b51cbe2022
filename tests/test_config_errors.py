"""Invalid configurations are refused before training, naming the layer and the problem."""

import pytest
import torch

from gfalign import MLP, ConfigError, FeedbackRule, resolve


def refuse(config, *fragments, depth=2):
    with pytest.raises(ConfigError) as caught:
        resolve(config, depth)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_cycle_is_named():
    refuse(
        {
            "name": "loop",
            "layers": {1: {"terms": ["direct", "above"]}, 2: {"terms": ["direct", "below"]}},
        },
        "cycle",
        "layer 1",
        "layer 2",
    )


def test_cycle_across_three_layers():
    refuse(
        {
            "name": "loop3",
            "layers": [{"terms": ["above"]}, {"terms": ["above"]}, {"terms": ["direct", "below"]}],
        },
        "cycle",
        "layer 3 -> layer 2",
        depth=3,
    )


def test_direct_only_sources_break_the_cycle():
    resolve(
        {
            "name": "ok",
            "layers": {
                1: {"terms": ["direct", "above:direct-only"]},
                2: {"terms": ["direct", "below:direct-only"]},
            },
        },
        2,
    )


def test_missing_layer():
    refuse({"name": "short", "layers": {1: {"terms": ["direct"]}}}, "layer 2", "missing")


def test_layer_out_of_range():
    refuse(
        {
            "name": "long",
            "layers": {
                1: {"terms": ["direct"]},
                2: {"terms": ["direct"]},
                3: {"terms": ["direct"]},
            },
        },
        "layer 3",
        "out of range",
    )


def test_unknown_term_with_suggestion():
    refuse(
        {"name": "typo", "layers": [{"terms": ["direct"]}, {"terms": ["drect"]}]},
        "layer 2",
        "unknown term 'drect'",
        "did you mean direct",
    )


def test_below_on_layer_one():
    refuse(
        {"name": "b", "layers": [{"terms": ["below"]}, {"terms": ["direct"]}]}, "layer 1", "below"
    )


def test_direct_only_source_without_a_direct_term():
    refuse(
        {
            "name": "t",
            "layers": [{"terms": ["direct", "above:direct-only"]}, {"terms": ["backprop"]}],
        },
        "layer 1",
        "t^2",
        "direct term",
    )


def test_weights_must_match_terms():
    refuse(
        {"name": "w", "template": {"all": {"terms": ["direct"], "combine": [0.5, 0.5]}}},
        "layer 1",
        "2 combine weights for 1 terms",
    )


def test_unknown_keys_and_presets():
    refuse(
        {"name": "k", "template": {"all": {"terms": ["direct"], "mix": "mean"}}},
        "layer 1",
        "unknown key",
        "mix",
    )
    refuse({"name": "k", "layers": [], "template": {}}, "exactly one")
    refuse("s4", "unknown rule preset 's4'", "s1")
    refuse(
        {"name": "c", "template": {"all": {"terms": ["direct"], "combine": "max"}}},
        "layer 1",
        "unknown combine 'max'",
    )
    refuse(
        {"name": "f", "feedback": "unifrom", "template": {"all": {"terms": ["direct"]}}},
        "unknown feedback family 'unifrom'",
        "uniform",
    )


def test_wrong_matrix_shape_is_refused():
    rule = FeedbackRule("fa", [6, 5, 4, 3])
    with pytest.raises(ConfigError, match=r"layer 1, term 0 .*shape \(3, 3\), expected \(4, 5\)"):
        rule.set_matrix(1, 0, torch.zeros(3, 3))


def test_rule_and_network_sizes_must_agree():
    rule = FeedbackRule("dfa", [6, 5, 4, 3])
    net = MLP([6, 5, 5, 3])
    with pytest.raises(ConfigError, match="built for sizes"):
        rule.backward(net, torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))


def test_auxiliary_errors_need_labels():
    net = MLP([6, 4, 6], objective="autoencoder")
    rule = FeedbackRule("dfa-aux", net.sizes)
    with pytest.raises(ConfigError, match="auxiliary errors"):
        rule.deltas(net, torch.zeros(2, 6), torch.zeros(0))


def test_round_trip_through_data():
    for name in ("s1", "s3-aux"):
        rule = resolve(name, 3)
        again = resolve(rule.to_data(), 3)
        assert again.layers == rule.layers
