"""Rule configurations: which error terms reach every hidden layer, and how they mix.

The general feedback rule (paper eq. 4, DESIGN.md section 3) gives hidden layer ``i`` the delta

    d^i = F_i(terms) * f'(a^i)

where each term is one of

    direct     eps^i D^i           eps^i = e (output error) or e^i (layer i's auxiliary error)
    above      s^{i+1} B_up^i      s = d^{i+1} (final) or t^{i+1} (direct-only); e when i = L-1
    below      s^{i-1} B_down^i    s = d^{i-1} (final) or t^{i-1} (direct-only); not for layer 1
    backprop   d^{i+1} W^{i+1}     weight transport, for BP and hybrids

with ``t^j = (eps^j D^j) * f'(a^j)`` the direct-only delta, and ``F_i`` the element-wise mean,
the sum, or fixed weights. BP, FA, DFA, LAFS and the paper's strategies are all configurations
of this one rule: plain data, in ``PRESETS``.

A configuration is written as a dictionary (or a TOML table), either per layer::

    {"name": "mine", "layers": {1: {"terms": ["direct", "above"], "combine": "mean"},
                                2: {"terms": ["direct"]}}}

or as a depth-independent template, whose keys ``only`` (a single hidden layer), ``top``,
``bottom``, ``middle`` and ``all`` are tried in that order for each layer::

    {"name": "s1", "template": {"top": {"terms": ["direct"]},
                                "all": {"terms": ["direct", "above"]}}}

A term is a string ``kind[:option]`` (``"above:direct-only"``, ``"direct:auxiliary"``) or a
table ``{kind = "above", source = "direct-only", feedback = "B1"}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gfalign.feedback import FeedbackSpec
from gfalign.terms import KINDS, SIGNALS, SOURCES, ModeSpec

__all__ = [
    "KINDS",
    "PRESETS",
    "ConfigError",
    "LayerRule",
    "Limit",
    "RuleConfig",
    "Term",
    "check_fields",
    "feedback_spec",
    "preset",
    "resolve",
]

COMBINERS = ("mean", "sum")


class ConfigError(ValueError):
    """A configuration that cannot be trained; one line naming the key or layer and the problem."""


# ------------------------------------------------------------------------------ field checks


@dataclass(frozen=True)
class Limit:
    """What a configuration field allows beyond the type its annotation gives.

    Attributes:
        minimum, maximum: inclusive bounds of a number (of every entry of a ``tuple[int, ...]``).
        above: exclusive lower bound (``lr`` > 0, a standard deviation > 0).
        choices: the allowed strings, or a function returning them (registries grow).
        absent: what ``None`` means, for an optional field (``"all examples"``).
        example: shown after the allowed values (``[800, 800]``).
    """

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None
    absent: str = ""
    example: str = ""


def check_fields(config: Any, limits: Mapping[str, Limit], where: str = "") -> None:
    """Check every field of a frozen dataclass against its annotation and its ``Limit``.

    The annotation decides the type: ``int`` is an integer and never a bool, a float or a
    string; ``float`` is a finite real number (an int is accepted and kept as given, so the
    configuration's key does not change); ``bool`` is ``True`` or ``False`` only; ``str`` is a
    string from ``choices`` where given; ``tuple[int, ...]`` is a non-empty list or tuple of
    integers (stored as a tuple); ``X | None`` also allows ``None``; other annotations are
    checked by ``isinstance``. Integers are stored as plain ``int``.

    Raises:
        ConfigError: ``{where}{key} = {value}: {problem}; allowed: {what is allowed}``.

    Example:
        >>> @dataclass(frozen=True)
        ... class Small:
        ...     epochs: int = 1
        >>> check_fields(Small(0), {"epochs": Limit(minimum=1)}, "[train] ")
        Traceback (most recent call last):
        gfalign.rules.ConfigError: [train] epochs = 0: out of range; allowed: an integer >= 1
    """
    hints = _hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        checked = _check(where, item.name, value, hints[item.name], limits.get(item.name, Limit()))
        if checked is not value:
            object.__setattr__(config, item.name, checked)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def render(value: Any) -> str:
    """A value as a TOML file would spell it: ``"32"``, ``true``, ``inf``, ``[800, 800]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def _key(key: Any) -> str:
    """A table key, bare where TOML allows it."""
    text = str(key)
    bare = text and all(c.isascii() and (c.isalnum() or c in "_-") for c in text)
    return text if bare else json.dumps(text, ensure_ascii=False)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _bounds(limit: Limit) -> list[str]:
    if limit.minimum is not None and limit.maximum is not None:
        return [f"in [{limit.minimum:g}, {limit.maximum:g}]"]
    if limit.above is not None and limit.maximum is not None:
        return [f"in ({limit.above:g}, {limit.maximum:g}]"]
    parts = []
    if limit.minimum is not None:
        parts.append(f">= {limit.minimum:g}")
    if limit.above is not None:
        parts.append(f"> {limit.above:g}")
    if limit.maximum is not None:
        parts.append(f"<= {limit.maximum:g}")
    return parts


def _choices(limit: Limit) -> list[str]:
    choices = limit.choices() if callable(limit.choices) else limit.choices
    return list(choices or ())


def _allowed(hint: Any, limit: Limit) -> str:
    """What a field allows, in words: ``an integer >= 1``, ``one of tanh, sigmoid, relu``."""
    return _type_words(hint, limit) + (f", e.g. {limit.example}" if limit.example else "")


def _type_words(hint: Any, limit: Limit) -> str:
    args = typing.get_args(hint)
    if _is_union(hint):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_type_words(a, limit) for a in rest)
        if type(None) in args:
            text += ", or leave it out" + (f" for {limit.absent}" if limit.absent else "")
        return text
    if typing.get_origin(hint) is tuple:
        text = "a list of " + " ".join(["integers", *_bounds(limit)]) + ", at least one"
    elif hint is int:
        text = " ".join(["an integer", *_bounds(limit)])
    elif hint is float:
        text = " ".join(["a finite number", *_bounds(limit)])
    elif hint is bool:
        text = "true or false"
    elif hint is str:
        choices = _choices(limit)
        text = "one of " + ", ".join(choices) if choices else "a string"
    else:
        origin = typing.get_origin(hint) or hint
        text = "a table" if origin is Mapping else f"a {getattr(origin, '__name__', origin)}"
    return text


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check(where: str, name: str, value: Any, hint: Any, limit: Limit) -> Any:
    def refuse(problem: str) -> ConfigError:
        return ConfigError(
            f"{where}{name} = {render(value)}: {problem}; allowed: {_allowed(hint, limit)}"
        )

    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return value
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            try:
                return _check(where, name, value, rest[0], limit)
            except ConfigError:
                raise refuse(_problem(value, rest[0], limit)) from None
        if not any(isinstance(value, typing.get_origin(a) or a) for a in rest):
            raise refuse(f"{_kind(value)}, wrong type")
        return value
    problem = _problem(value, hint, limit)
    if problem:
        raise refuse(problem)
    if hint is int:
        return int(value)
    if typing.get_origin(hint) is tuple:
        return tuple(int(entry) for entry in value)
    return value


def _problem(value: Any, hint: Any, limit: Limit) -> str:
    """Why ``value`` does not fit; an empty string when it does."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            return f"{_kind(value)}, not a list"
        if not value:
            return "empty"
        for entry in value:
            problem = _problem(entry, int, limit)
            if problem:
                return f"entry {render(entry)}: {problem}"
        return ""
    if hint is bool:
        return "" if isinstance(value, bool) else f"{_kind(value)}, not true or false"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"{_kind(value)}, not an integer"
        return _range(value, limit)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{_kind(value)}, not a number"
        if not math.isfinite(value):
            return "not finite"
        return _range(value, limit)
    if hint is str:
        if not isinstance(value, str):
            return f"{_kind(value)}, not a string"
        choices = _choices(limit)
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=2)
            hint = " or ".join(render(c) for c in close)
            return "unknown" + (f" (did you mean {hint}?)" if close else "")
        return ""
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and not isinstance(value, origin):
        return f"{_kind(value)}, wrong type"
    return ""


def _range(value: float, limit: Limit) -> str:
    low_ok = limit.minimum is None or value >= limit.minimum
    above_ok = limit.above is None or value > limit.above
    high_ok = limit.maximum is None or value <= limit.maximum
    return "" if low_ok and above_ok and high_ok else "out of range"


@dataclass(frozen=True)
class Term:
    """One error term reaching a hidden layer; what each kind is lives in ``gfalign.terms``.

    Attributes:
        kind: a name in ``gfalign.terms.KINDS``: ``direct``, ``above``, ``below``, ``backprop``.
        source: for a term reading a neighbour's delta (``above``/``below``): its ``final``
            delta d^j or its ``direct-only`` delta t^j.
        error: for ``direct``: the signal it projects, a name in ``gfalign.terms.SIGNALS``: the
            ``output`` error e, the layer's ``auxiliary`` error e^i (its classifier on h^i;
            ``auxiliary-pre``: on a^i), or the one-hot ``target`` (DRTP).
        feedback: the family of this term's fixed parameters; ``None`` uses the rule's default.
        mode: how its feedback parameters are had each step (``gfalign.terms.MODES``):
            ``None`` is ``fixed``; ``usf``, ``frsf``, ``brsf`` (sign-concordant), ``kp``
            (learned, Kolen-Pollack).
    """

    kind: str
    source: str = "final"
    error: str = "output"
    feedback: FeedbackSpec | None = None
    mode: ModeSpec | None = None

    @classmethod
    def parse(cls, value: str | Mapping | Term, where: str = "") -> Term:
        if isinstance(value, Term):
            return value
        if isinstance(value, str):
            name, _, option = value.partition(":")
            fields: dict[str, Any] = {"kind": name.strip()}
            option = option.strip()
            declared = KINDS.get(fields["kind"])
            if option and declared is not None:
                if declared.option is None:
                    raise ConfigError(
                        f"{where}a {declared.name} term takes no option, got {option!r}"
                    )
                fields[declared.option] = option
        elif isinstance(value, Mapping):
            fields = dict(value)
            unknown = set(fields) - {"kind", "source", "error", "feedback", "mode"}
            if unknown:
                raise ConfigError(
                    f"{where}unknown term key(s) {sorted(unknown)}; "
                    "known: kind, source, error, feedback, mode"
                )
        else:
            raise ConfigError(f"{where}a term must be a string or a table, got {value!r}")
        name = fields.get("kind")
        if name not in KINDS:
            raise ConfigError(f"{where}unknown term {name!r}{_suggest(name, KINDS)}")
        kind = KINDS[name]
        source, error = fields.get("source", "final"), fields.get("error", "output")
        if source not in SOURCES:
            raise ConfigError(
                f"{where}unknown source {source!r} for a {name} term{_suggest(source, SOURCES)}"
            )
        if error not in SIGNALS:
            raise ConfigError(
                f"{where}unknown error {error!r} for a {name} term{_suggest(error, SIGNALS)}"
            )
        if kind.option != "error" and error != "output":
            raise ConfigError(f"{where}only a direct term takes an error option, not {name}")
        if kind.option != "source" and source != "final":
            raise ConfigError(f"{where}only above/below terms take a source option, not {name}")
        feedback = fields.get("feedback")
        if feedback is not None:
            feedback = feedback_spec(feedback, where)
        if not kind.has_parameters and feedback is not None:
            raise ConfigError(
                f"{where}a {name} term uses the forward parameters and takes no feedback"
            )
        mode = fields.get("mode")
        if mode is not None:
            try:
                mode = ModeSpec.parse(mode)
            except ValueError as problem:
                raise ConfigError(f"{where}{problem}") from None
            if kind.part is None or not kind.has_parameters or kind.tiled:
                raise ConfigError(
                    f"{where}a {name} term takes no feedback mode ({mode.name}); modes are for "
                    "terms whose parameters stand in for a block's: "
                    + ", ".join(
                        k.name
                        for k in KINDS.values()
                        if k.part is not None and k.fixed and not k.tiled
                    )
                )
            if mode.name == "fixed" and not mode.params:
                mode = None
        return cls(name, source, error, feedback, mode)

    @property
    def has_matrix(self) -> bool:
        return KINDS[self.kind].has_parameters

    def to_data(self) -> str | dict:
        option_name = KINDS[self.kind].option
        option = getattr(self, option_name) if option_name else None
        default = {"error": "output", "source": "final"}.get(option_name or "")
        text = self.kind if option == default else f"{self.kind}:{option}"
        if self.feedback is None and self.mode is None:
            return text
        data: dict[str, Any] = {"kind": self.kind}
        if self.error != "output":
            data["error"] = self.error
        if self.source != "final":
            data["source"] = self.source
        if self.feedback is not None:
            data["feedback"] = str(self.feedback)
        if self.mode is not None:
            data["mode"] = str(self.mode)
        return data

    def __str__(self) -> str:
        kind = KINDS[self.kind]
        if kind.reads is None:
            return f"{self.kind}({SIGNALS[self.error].symbol})"
        if kind.always_final:
            return f"{self.kind}(d^({kind.symbol}) W^({kind.symbol}))"
        symbol = "d" if self.source == "final" else "t"
        mode = "" if self.mode is None else f" [{self.mode}]"
        return f"{self.kind}({symbol}^({kind.symbol})){mode}"


@dataclass(frozen=True)
class LayerRule:
    """The terms reaching one hidden layer and how they combine (``mean``, ``sum`` or weights)."""

    terms: tuple[Term, ...]
    combine: str | tuple[float, ...] = "mean"

    def coefficients(self) -> tuple[float, ...]:
        """The weight of every term in ``F_i``."""
        if self.combine == "mean":
            return (1.0 / len(self.terms),) * len(self.terms)
        if self.combine == "sum":
            return (1.0,) * len(self.terms)
        return tuple(self.combine)

    def to_data(self) -> dict:
        data: dict[str, Any] = {"terms": [term.to_data() for term in self.terms]}
        data["combine"] = self.combine if isinstance(self.combine, str) else list(self.combine)
        return data


@dataclass(frozen=True)
class RuleConfig:
    """A resolved configuration: ``layers[i - 1]`` is the rule of hidden layer ``i``.

    ``feedback`` is the default family of every fixed matrix that does not name its own.
    """

    name: str
    layers: tuple[LayerRule, ...]
    feedback: FeedbackSpec = field(default_factory=FeedbackSpec)
    description: str = ""

    @property
    def hidden_layers(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerRule:
        """The rule of the 1-based hidden layer ``index``."""
        return self.layers[index - 1]

    @property
    def uses_auxiliary(self) -> bool:
        """Some term's signal needs class labels (an auxiliary error, the DRTP target)."""
        return any(
            KINDS[t.kind].is_direct and SIGNALS[t.error].labels
            for layer in self.layers
            for t in layer.terms
        )

    def source_of(self, layer: int, term: Term) -> int | None:
        """The layer whose delta ``term`` of hidden layer ``layer`` reads (``L`` for the
        output error), or ``None`` for a term reading an error signal."""
        reads = KINDS[term.kind].reads
        return None if reads is None else layer + reads

    def with_feedback(self, feedback: FeedbackSpec | str) -> RuleConfig:
        return replace(self, feedback=feedback_spec(feedback, f"rule {self.name!r}: "))

    def dependencies(self) -> dict[int, set[int]]:
        """For every hidden layer, the hidden layers whose *final* delta it needs."""
        needs: dict[int, set[int]] = {}
        for i, layer in enumerate(self.layers, start=1):
            needs[i] = set()
            for term in layer.terms:
                j = self.source_of(i, term)
                if j is not None and term.source == "final" and 1 <= j <= self.hidden_layers:
                    needs[i].add(j)
        return needs

    def order(self) -> tuple[int, ...]:
        """Hidden layers in an order that computes every final delta before it is needed."""
        needs = self.dependencies()
        done: list[int] = []
        state: dict[int, str] = {}

        def visit(layer: int, path: list[int]) -> None:
            if state.get(layer) == "done":
                return
            if state.get(layer) == "visiting":
                cycle = path[path.index(layer) :] + [layer]
                raise ConfigError(
                    "the final deltas depend on each other in a cycle: "
                    + " -> ".join(f"layer {j}" for j in cycle)
                    + " (use a direct-only source, e.g. 'above:direct-only', to break it)"
                )
            state[layer] = "visiting"
            for other in sorted(needs[layer]):
                visit(other, path + [layer])
            state[layer] = "done"
            done.append(layer)

        # Visit from the top so that, without dependencies, layers run top-down like backprop.
        for layer in range(self.hidden_layers, 0, -1):
            visit(layer, [])
        return tuple(done)

    def validate(self) -> RuleConfig:
        """Check the structure; raise ``ConfigError`` naming the layer and the problem."""
        if not self.layers:
            raise ConfigError(f"rule {self.name!r}: a network needs at least one hidden layer")
        for i, layer in enumerate(self.layers, start=1):
            where = f"rule {self.name!r}, layer {i}: "
            if not layer.terms:
                raise ConfigError(where + "no terms; every hidden layer needs at least one")
            if isinstance(layer.combine, str):
                if layer.combine not in COMBINERS:
                    raise ConfigError(
                        where + f"unknown combine {layer.combine!r}; use mean, sum or a list of "
                        "weights, one per term"
                    )
            elif len(layer.combine) != len(layer.terms):
                raise ConfigError(
                    where + f"{len(layer.combine)} combine weights for {len(layer.terms)} terms"
                )
            for term in layer.terms:
                j = self.source_of(i, term)
                if j is None:
                    continue
                if j < 1:
                    raise ConfigError(
                        where + f"a '{term.kind}' term needs a hidden layer below; layer 1 sits "
                        "on the input"
                    )
                if j > self.hidden_layers + 1:
                    raise ConfigError(
                        where + f"a '{term.kind}' term reads layer {j}, above the output layer"
                    )
                if term.source == "direct-only":
                    if j == self.hidden_layers + 1:
                        raise ConfigError(
                            where + f"'{term.kind}:direct-only' has no hidden layer above; the "
                            f"top layer's '{term.kind}' term carries the output error e"
                        )
                    if sum(KINDS[t.kind].is_direct for t in self.layers[j - 1].terms) != 1:
                        raise ConfigError(
                            where + f"uses the direct-only delta t^{j}, but layer {j} needs "
                            "exactly one direct term to define it"
                        )
            directs = [t for t in layer.terms if KINDS[t.kind].is_direct]
            if len({t.error for t in directs}) < len(directs):
                raise ConfigError(where + "two direct terms with the same error")
        self.order()
        return self

    def to_data(self) -> dict:
        """The per-layer form, ready for TOML; ``resolve`` reads it back."""
        return {
            "name": self.name,
            "feedback": str(self.feedback),
            "layers": {str(i): layer.to_data() for i, layer in enumerate(self.layers, 1)},
        }

    def describe(self) -> str:
        """One line per layer, top first, in the notation of DESIGN.md."""
        lines = []
        for i in range(self.hidden_layers, 0, -1):
            layer = self.layer(i)
            terms = ", ".join(str(t) for t in layer.terms)
            combine = layer.combine if isinstance(layer.combine, str) else list(layer.combine)
            body = terms if len(layer.terms) == 1 else f"{combine}({terms})"
            lines.append(f"layer {i}: d = {body} * f'(a)")
        return "\n".join(lines)


def feedback_spec(value: Any, where: str = "") -> FeedbackSpec:
    """``FeedbackSpec.parse(value)``, its refusal a ``ConfigError`` prefixed by ``where``."""
    if not isinstance(value, (str, Mapping, FeedbackSpec)):
        raise ConfigError(
            f"{where}feedback = {render(value)}: {_kind(value)}, wrong type; allowed: a family "
            'name with optional parameters, e.g. "uniform" or "B6:density=0.2"'
        )
    try:
        return FeedbackSpec.parse(value)
    except ValueError as problem:
        raise ConfigError(f"{where}{problem}") from None


def _suggest(word: object, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(word), known, n=3, cutoff=0.4)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{hint}; known: {', '.join(known)}"


def _layer_rule(data: Mapping, where: str) -> LayerRule:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}a layer must be a table with 'terms', got {data!r}")
    unknown = set(data) - {"terms", "combine"}
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {sorted(unknown)}; known: terms, combine")
    terms = data.get("terms")
    if isinstance(terms, (str, Mapping)):
        terms = [terms]
    if terms is not None and not isinstance(terms, (list, tuple)):
        raise ConfigError(
            f"{where}terms = {render(terms)}: {_kind(terms)}, wrong type; allowed: a list of "
            'terms, e.g. ["direct", "above"]'
        )
    if not terms:
        raise ConfigError(f"{where}no terms; every hidden layer needs at least one")
    combine = data.get("combine", "mean")
    if not isinstance(combine, str):
        if not isinstance(combine, (list, tuple)) or not all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
            for w in combine
        ):
            raise ConfigError(
                f"{where}combine = {render(combine)}: wrong type; allowed: mean, sum or a list "
                "of finite numbers, one per term"
            )
        combine = tuple(float(w) for w in combine)
    return LayerRule(tuple(Term.parse(t, where) for t in terms), combine)


_TEMPLATE_KEYS = ("only", "top", "bottom", "middle", "all")


def _template_for(template: Mapping, layer: int, depth: int) -> Mapping | None:
    places = {
        "only": depth == 1,
        "top": layer == depth,
        "bottom": layer == 1,
        "middle": 1 < layer < depth,
        "all": True,
    }
    for key in _TEMPLATE_KEYS:
        if key in template and places[key]:
            return template[key]
    return None


def resolve(
    config: str | Mapping | RuleConfig,
    hidden_layers: int,
    feedback: FeedbackSpec | str | None = None,
) -> RuleConfig:
    """Turn a preset name, a dictionary or a ``RuleConfig`` into a validated ``RuleConfig``.

    Args:
        config: a preset name (``"s1"``), a configuration dictionary (module docstring) or a
            ``RuleConfig``.
        hidden_layers: ``L - 1``, the number of hidden layers of the network it will train.
        feedback: overrides the configuration's default feedback family.

    Raises:
        ConfigError: unknown preset or key, a missing or extra layer, an unknown term, a cycle.

    Example:
        >>> print(resolve("s1", 2).describe())
        layer 2: d = direct(e) * f'(a)
        layer 1: d = mean(direct(e), above(d^(i+1))) * f'(a)
    """
    if isinstance(config, RuleConfig):
        rule = config
        if rule.hidden_layers != hidden_layers:
            raise ConfigError(
                f"rule {rule.name!r} has {rule.hidden_layers} hidden layers, the network "
                f"{hidden_layers}"
            )
    else:
        if isinstance(config, str):
            if config not in PRESETS:
                raise ConfigError(f"unknown rule preset {config!r}{_suggest(config, PRESETS)}")
            config = PRESETS[config]
        rule = _from_data(config, hidden_layers)
    if feedback is not None:
        rule = rule.with_feedback(feedback)
    return rule.validate()


def _from_data(data: Mapping, depth: int) -> RuleConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a rule configuration must be a table, got {type(data).__name__}")
    name = str(data.get("name", "custom"))
    unknown = set(data) - {"name", "description", "feedback", "layers", "template"}
    if unknown:
        raise ConfigError(
            f"rule {name!r}: unknown key(s) {sorted(unknown)}; "
            "known: name, description, feedback, layers, template"
        )
    if ("layers" in data) == ("template" in data):
        raise ConfigError(f"rule {name!r}: give exactly one of 'layers' or 'template'")
    if depth < 1:
        raise ConfigError(f"rule {name!r}: a network needs at least one hidden layer")
    layers: list[LayerRule] = []
    if "template" in data:
        template = data["template"]
        if not isinstance(template, Mapping):
            raise ConfigError(f"rule {name!r}: 'template' must be a table, got {render(template)}")
        extra = set(template) - set(_TEMPLATE_KEYS)
        if extra:
            raise ConfigError(
                f"rule {name!r}: unknown template key(s) {sorted(extra)}; "
                f"known: {', '.join(_TEMPLATE_KEYS)}"
            )
        for i in range(1, depth + 1):
            chosen = _template_for(template, i, depth)
            if chosen is None:
                raise ConfigError(f"rule {name!r}, layer {i}: no template entry covers it")
            layers.append(_layer_rule(chosen, f"rule {name!r}, layer {i}: "))
    else:
        given = data["layers"]
        if isinstance(given, Sequence) and not isinstance(given, str):
            given = {i: layer for i, layer in enumerate(given, start=1)}
        if not isinstance(given, Mapping):
            raise ConfigError(f"rule {name!r}: 'layers' must be a list or a table")
        numbered: dict[int, Any] = {}
        for key, value in given.items():
            try:
                numbered[int(key)] = value
            except ValueError:
                raise ConfigError(f"rule {name!r}: layer key {key!r} is not a number") from None
        for i in sorted(numbered):
            if not 1 <= i <= depth:
                raise ConfigError(
                    f"rule {name!r}, layer {i}: out of range, the network has hidden layers "
                    f"1..{depth}"
                )
        for i in range(1, depth + 1):
            if i not in numbered:
                raise ConfigError(f"rule {name!r}, layer {i}: missing; give every hidden layer")
            layers.append(_layer_rule(numbered[i], f"rule {name!r}, layer {i}: "))
    feedback = feedback_spec(data.get("feedback", "uniform"), f"rule {name!r}: ")
    return RuleConfig(name, tuple(layers), feedback, str(data.get("description", "")))


def _auxiliary(data: Mapping, name: str, description: str) -> dict:
    """The same configuration with every direct term using the layer's auxiliary error."""

    def convert(term: str) -> str:
        return "direct:auxiliary" if term == "direct" else term

    template = {
        key: {**entry, "terms": [convert(t) for t in entry["terms"]]}
        for key, entry in data["template"].items()
    }
    return {"name": name, "description": description, "template": template}


_BASE: dict[str, dict] = {
    "bp": {
        "description": "backpropagation: d^i = (d^(i+1) W^(i+1)) * f'(a^i)",
        "template": {"all": {"terms": ["backprop"]}},
    },
    "fa": {
        "description": "feedback alignment: d^i = (d^(i+1) B^i) * f'(a^i)",
        "template": {"all": {"terms": ["above"]}},
    },
    "dfa": {
        "description": "direct feedback alignment: d^i = (e D^i) * f'(a^i)",
        "template": {"all": {"terms": ["direct"]}},
    },
    "dfa-conv": {
        "description": "direct feedback alignment as biotorch's conv layers do it: d^i = "
        "J_tau_i^T (K^(i+1) applied transposed to e tiled over a^(i+1)'s positions) * f'(a^i), "
        "K^(i+1) a fixed kernel of n_out output channels (e K for a Linear block above)",
        "template": {"all": {"terms": ["tiled"]}},
    },
    "s1": {
        "description": "strategy 1: top layer direct; every lower layer mean(direct, above(d))",
        "template": {"top": {"terms": ["direct"]}, "all": {"terms": ["direct", "above"]}},
    },
    "s2": {
        "description": "strategy 2 (inferred mirror of s1): bottom layer direct; every upper "
        "layer mean(direct, below(d))",
        "template": {"bottom": {"terms": ["direct"]}, "all": {"terms": ["direct", "below"]}},
    },
    "s3": {
        "description": "strategy 3: every layer mean(direct, above(t), below(t)) where the "
        "neighbour exists, t the direct-only delta",
        "template": {
            "only": {"terms": ["direct"]},
            "top": {"terms": ["direct", "below:direct-only"]},
            "bottom": {"terms": ["direct", "above:direct-only"]},
            "all": {"terms": ["direct", "above:direct-only", "below:direct-only"]},
        },
    },
    "usf": {
        "description": "uniform sign-concordant feedback (Liao et al. 2016; biotorch's uSF): FA "
        "with B = scale * sign(W^(i+1)) of the live weights, scale Xavier's std",
        "template": {"all": {"terms": [{"kind": "above", "mode": "usf"}]}},
    },
    "frsf": {
        "description": "fixed random-magnitude sign-concordant feedback (frSF): FA with "
        "B = |R| * sign(W^(i+1)), R drawn once",
        "template": {"all": {"terms": [{"kind": "above", "mode": "frsf"}]}},
    },
    "brsf": {
        "description": "batchwise random-magnitude sign-concordant feedback (brSF): FA with "
        "B = |R| * sign(W^(i+1)), R redrawn every step",
        "template": {"all": {"terms": [{"kind": "above", "mode": "brsf"}]}},
    },
    "kp": {
        "description": "Kolen-Pollack (Akrout et al. 2019): FA whose B learns with W^(i+1)'s "
        "update, both shrinking by (1 - 1e-4) a step, so B tends to W^(i+1)",
        "template": {"all": {"terms": [{"kind": "above", "mode": "kp:decay=1e-4"}]}},
    },
    "drtp": {
        "description": "direct random target projection (Frenkel et al. 2021): d^i = "
        "(y* D^i) * f'(a^i), the one-hot target instead of the error",
        "template": {"all": {"terms": ["direct:target"]}},
    },
}

PRESETS: dict[str, dict] = {name: {"name": name, **data} for name, data in _BASE.items()}
PRESETS.update(
    {
        f"{name}-aux": _auxiliary(
            PRESETS[name],
            f"{name}-aux",
            ("LAFS: " if name == "dfa" else "")
            + f"{name} with every direct term using the layer's auxiliary error e^i",
        )
        for name in ("dfa", "s1", "s2", "s3")
    }
)


def preset(name: str, hidden_layers: int = 2) -> RuleConfig:
    """The preset ``name`` resolved for a network with ``hidden_layers`` hidden layers."""
    return resolve(name, hidden_layers)
