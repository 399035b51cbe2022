"""Every rule preset belongs to a family, and the families say what the presets' terms say."""

from __future__ import annotations

import pytest

from gfalign.rule_families import RULE_FAMILIES, rule_family
from gfalign.rules import PRESETS, resolve


def test_every_preset_has_a_family_and_every_family_entry_is_a_preset():
    assert set(RULE_FAMILIES) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_family_agrees_with_the_presets_terms(name):
    """The general rule's presets, and only they, mix a direct term with a neighbour's; the
    direct family's layers hear nothing but the output error (or their auxiliary error)."""
    layers = resolve(name, 3).layers
    kinds = [{term.kind for term in layer.terms} for layer in layers]
    mixes = any("direct" in k and ({"above", "below"} & k) for k in kinds)
    assert (rule_family(name) == "general") == mixes, (name, kinds)
    if rule_family(name) == "direct":
        assert all(k in ({"direct"}, {"tiled"}) for k in kinds), kinds


def test_a_rule_written_by_hand_has_no_family():
    assert rule_family("mine") is None
