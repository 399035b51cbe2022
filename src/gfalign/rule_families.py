"""Each rule preset's family: the line of work it belongs to, as data beside the presets.

A report that speaks of "the general rule" (the paper's strategies and their auxiliary-error
variants) or of "the sign-concordant rules" reads the family here, never a list of rule names.
A new preset names its family in ``RULE_FAMILIES``; ``tests/test_rule_families.py`` fails for a
preset without one.

Example:
    >>> rule_family("s1-aux")
    'general'
    >>> rule_family("kp")
    'kolen-pollack'
"""

from __future__ import annotations

__all__ = ["RULE_FAMILIES", "rule_family"]

RULE_FAMILIES: dict[str, str] = {
    "bp": "backprop",
    "fa": "feedback-alignment",
    "usf": "sign-concordant",
    "frsf": "sign-concordant",
    "brsf": "sign-concordant",
    "kp": "kolen-pollack",
    "dfa": "direct",
    "dfa-aux": "direct",  # LAFS: DFA with each layer's auxiliary error
    "dfa-conv": "direct",  # biotorch's DFA: a conv layer's kernel on the tiled error
    "drtp": "target",
    "s1": "general",
    "s2": "general",
    "s3": "general",
    "s1-aux": "general",
    "s2-aux": "general",
    "s3-aux": "general",
}
"""Preset name -> family: ``backprop``, ``feedback-alignment`` (a fixed random matrix in place
of the layer above's weights), ``sign-concordant`` (feedback read from the weights' signs),
``kolen-pollack`` (feedback that learns the weights), ``direct`` (the output error sent to each
layer), ``target`` (the target sent instead) and ``general`` (the general feedback alignment
rule's mixtures of direct, above and below terms)."""


def rule_family(rule: str) -> str | None:
    """The family of the preset ``rule``, or None for a rule that is not a preset (a
    configuration written by hand names no family)."""
    return RULE_FAMILIES.get(rule)
