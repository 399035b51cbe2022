"""Where groups of rules stand against each other, in sentences made from the table's rows.

A preset names its groups in a ``[standing]`` table, each a list of rules as its cells name
them (the cell without the network)::

    [standing]
    "general rule" = ["s1 xavier", "s2 xavier", "s3 xavier", "dfa-aux xavier", "s1-aux xavier"]
    "feedback alignment" = ["fa xavier", "dfa xavier"]

For every setting the grid crosses (``dataset=fashion-mnist``; one setting for a plain grid),
``standing`` gives each group's best rule with its mean, spread and 95% interval over seeds,
then the groups from best to worst, saying where two groups' intervals overlap (a difference
the seeds do not settle), and a table of which rule beats which (Welch's interval of the
difference of two rules' means excludes 0). The value is the test error at the
validation-selected epoch where the runs kept one (``keep_best``), else after the last epoch.
Nothing in the text is written by hand, so it stays true as runs are added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gfalign.experiments import Experiment
from gfalign.report.render import Block, Bullets, Paragraph, Table
from gfalign.report.rows import count, rule_of
from gfalign.report.tables import OUTSIDE, describe, welch
from gfalign.rules import ConfigError

__all__ = ["groups_of", "standing"]


def groups_of(name: str, data: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The preset's ``[standing]`` groups, checked (``ConfigError`` naming the entry)."""
    table = data.get("standing", {})
    form = '[standing] with "group" = ["rule", ...] entries'
    if not isinstance(table, Mapping):
        raise ConfigError(f"experiment preset {name}: standing = {table!r}; allowed: {form}")
    out = {}
    for group, rules in table.items():
        if not isinstance(rules, list) or not rules or not all(isinstance(r, str) for r in rules):
            raise ConfigError(
                f"experiment preset {name}: [standing] {group} = {rules!r}; allowed: {form}"
            )
        out[str(group)] = tuple(rules)
    return out


def _split(cell: str, settings: Sequence[str]) -> tuple[str, str]:
    """``"lenet5 s1-aux xavier dataset=mnist lr=0.1"`` -> (``"s1-aux xavier"``,
    ``"dataset=mnist"``): the rule, and the parts that name one of the grid's ``settings``
    (``Experiment.settings``); a rule's own field (its rate) is in neither."""
    words = rule_of(cell).split(" ")
    setting = [w for w in words if "=" in w and w.split("=", 1)[0] in settings]
    return " ".join(w for w in words if "=" not in w), " ".join(setting)


def _values(row: Mapping[str, Any]) -> list[float]:
    return list(row["selected_values"]) if row.get("selected_values") else list(row["values"])


def _text(number: float) -> str:
    return f"{number:.2f}"


def standing(
    experiment: Experiment,
    summary: Sequence[Mapping[str, Any]],
    groups: Mapping[str, Sequence[str]],
) -> list[Block]:
    """One paragraph and a list per setting: each group's best rule, the groups in order.

    ``summary``: the experiment's table rows (``gfalign.report.tables.summarize``); rows of
    another protocol, baselines and runs outside the plan are left out.
    """
    if not groups:
        return []
    own = (experiment.base.train.epochs, experiment.base.train_subset)
    settings: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in summary:
        if row["baseline"] or not row["values"] or (row["epochs"], row["subset"]) != own:
            continue
        if row["cell"].endswith(OUTSIDE):  # a superseded reading, not the grid's
            continue
        rule, setting = _split(row["cell"], experiment.settings)
        settings.setdefault(setting, {})[rule] = row
    if not settings:
        return [Paragraph("Standing of the rules: no finished runs of the protocol yet.")]
    selected = any(r.get("selected_values") for rows in settings.values() for r in rows.values())
    what = (
        "test error (%) at the epoch of the lowest validation error"
        if selected
        else f"{experiment.metric.replace('_', ' ')} after the last epoch"
    )
    blocks: list[Block] = [
        Paragraph(
            "Standing of the rules, made from the table above: per group, the rule with the "
            f"lowest {what}, as a mean over seeds with its 95% interval; then the groups' best "
            "from lowest to highest, with < where the intervals are apart and ≈ where they "
            "overlap (or a rule has one seed): the seeds do not separate those. Then every "
            "rule from lowest to highest mean, with the rules it is below by more than the "
            "seeds explain: Welch's 95% interval of the difference excludes 0."
        )
    ]
    for setting, rows in settings.items():
        bests = []
        lines = []
        for group, rules in groups.items():
            present = [(rule, _values(rows[rule])) for rule in rules if rule in rows]
            if not present:
                lines.append(f"{group}: no finished runs yet")
                continue
            rule, values = min(present, key=lambda item: describe(item[1]).mean)
            stats = describe(values)
            spread = f" ± {_text(stats.std)}" if stats.n > 1 else ""
            interval = f", 95% CI {_text(stats.ci[0])}–{_text(stats.ci[1])}" if stats.ci else ""
            text = f"{group}: " + ("" if len(rules) == 1 else "best ")
            text += f"{rule}, {_text(stats.mean)}{spread} ({count(stats.n, 'seed')}{interval})"
            if 1 < len(rules) != len(present):
                text += f"; {len(present)} of the group's {len(rules)} rules with runs so far"
            lines.append(text)
            bests.append((stats.mean, group, stats.ci))
        bests.sort()
        order = []
        for n, (mean, group, ci) in enumerate(bests):
            piece = f"{group} ({_text(mean)})"
            if n:
                before = bests[n - 1][2]
                overlap = ci is None or before is None or ci[0] <= before[1]
                piece = ("≈ " if overlap else "< ") + piece
            order.append(piece)
        if order:
            lines.append("from best to worst: " + " ".join(order))
        title = f"On {setting.removeprefix('dataset=')}" if setting else "On this grid"
        blocks += [Paragraph(f"{title}:"), Bullets(tuple(lines))]
        blocks += _pairs(rows, groups)
    return blocks


def _pairs(rows: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]]) -> list:
    """Which rule beats which: every rule of the groups from lowest to highest mean, with the
    rules it is below by more than the seeds explain (the Welch 95% interval of the difference
    excludes 0); rules with one seed are compared with none."""
    ranked = sorted(
        ((describe(_values(rows[r])), r) for rules in groups.values() for r in rules if r in rows),
        key=lambda item: (item[0].mean, item[1]),
    )
    if len(ranked) < 2:
        return []
    table = []
    for stats, rule in ranked:
        below = [
            other
            for _, other in ranked
            if other != rule
            and (ci := welch(_values(rows[other]), _values(rows[rule]))[1]) is not None
            and ci[0] > 0
        ]
        spread = f" ± {_text(stats.std)}" if stats.n > 1 else ""
        table.append((rule, f"{_text(stats.mean)}{spread}", str(stats.n), ", ".join(below) or "—"))
    return [
        Table(
            ("rule", "mean ± std", "seeds", "below (Welch 95% interval of the difference > 0)"),
            tuple(table),
            (False, True, True, False),
        )
    ]
