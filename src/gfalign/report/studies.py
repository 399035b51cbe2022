"""Sensitivity studies: presets that say which published cells they may explain.

A study is an experiment preset with a top-level ``addresses`` list (the key is described in
``gfalign.experiments``): ``"<experiment>:<cell or glob pattern>"`` over the cells of that
experiment's ``[paper]`` table, with ``question`` and ``cost`` beside it. Every preset file
that has the key is a study; none is named in code. A study's run stands for the addressed
cell its cell name reduces to (``addressed_cell``), on the addressed experiment's dataset. Its
runs are grouped by configuration (everything but the seed): each group is a ``Variant``, and
a variant whose mean over seeds lands within 0.20 points of the published value explains the
cell, which the report then marks ``explained by <study>`` instead of ``unexplained``.

    >>> from gfalign.config import RunConfig
    >>> addressed_cell(RunConfig(hidden=(800, 800), rule="dfa", feedback="B1:std=0.1"))
    '2x800 tanh dfa B1'
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import EXPERIMENTS, Experiment, cell, from_data
from gfalign.feedback import FeedbackSpec
from gfalign.report.render import Table
from gfalign.report.rows import config_of, count, points_of, preset, series
from gfalign.report.tables import PENDING, TOLERANCE, UNEXPLAINED, Statistics, describe
from gfalign.rules import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Study",
    "Variant",
    "addressed_cell",
    "changes_from_grid",
    "configurations",
    "evaluate",
    "explain",
    "preset_data",
    "preset_names",
    "studies",
    "variants_table",
]

TRAINED = 0.01
"""The paper's training error at the end of training: below 0.01%."""


def _presets():
    return resources.files("gfalign.experiments").joinpath("presets")


def preset_names() -> list[str]:
    """Every preset file's name (``exp1`` ... and any study), sorted."""
    return sorted(p.name[: -len(".toml")] for p in _presets().iterdir() if p.name.endswith(".toml"))


def preset_data(name: str) -> dict[str, Any]:
    """A preset's TOML as plain data (the report's keys included)."""
    path = _presets().joinpath(f"{name}.toml")
    if not path.is_file():
        raise ConfigError(f"no experiment preset {name!r}; known: {', '.join(preset_names())}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as problem:
        raise ConfigError(f"experiment preset {name}: not valid TOML: {problem}") from None


@dataclass(frozen=True)
class Study:
    """A study preset.

    Attributes:
        name: the preset's name (``study-...``).
        question: the question it answers.
        cost: its compute, as the preset states it.
        addresses: (experiment, cell pattern) pairs.
        cells: the published cells addressed, as (experiment, cell) pairs, in order.
        experiment: the preset as an ``Experiment`` (its grid and protocol), or None when the
            loader refuses it (``problem`` says why).
    """

    name: str
    question: str
    cost: str
    addresses: tuple[tuple[str, str], ...]
    cells: tuple[tuple[str, str], ...]
    experiment: Experiment | None
    problem: str | None = None


def _study(name: str, data: Mapping[str, Any]) -> Study:
    raw = data.get("addresses")
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise ConfigError(
            f"experiment preset {name}: addresses = {raw!r}; allowed: a list of "
            '"<experiment>:<cell>" strings, e.g. ["exp1:2x800 sigmoid s1"]'
        )
    addresses, cells = [], []
    for entry in raw:
        experiment_name, colon, pattern = entry.partition(":")
        if not colon or not pattern.strip():
            raise ConfigError(
                f"experiment preset {name}: address {entry!r} has no cell; allowed: "
                '"<experiment>:<cell>", e.g. "exp1:2x800 sigmoid s1"'
            )
        if experiment_name not in EXPERIMENTS:
            raise ConfigError(
                f"experiment preset {name}: address {entry!r} names experiment "
                f"{experiment_name!r}; allowed: {', '.join(EXPERIMENTS)}"
            )
        published = preset(experiment_name).paper
        matched = [c for c in published if fnmatch.fnmatchcase(c, pattern.strip())]
        if not matched:
            raise ConfigError(
                f"experiment preset {name}: address {entry!r} matches no published cell of "
                f"{experiment_name}; allowed: one of its [paper] cells, e.g. "
                f"{next(iter(published), 'none: it has no [paper] table')!r}"
            )
        addresses.append((experiment_name, pattern.strip()))
        cells += [(experiment_name, c) for c in matched if (experiment_name, c) not in cells]
    experiment, problem = None, None
    try:
        experiment = preset(name) if name in EXPERIMENTS else from_data(name, data)
    except ConfigError as error:
        problem = str(error)
    return Study(
        name,
        str(data.get("question", "")),
        str(data.get("cost", "")),
        tuple(addresses),
        tuple(cells),
        experiment,
        problem,
    )


def studies(names: Iterable[str] | None = None) -> list[Study]:
    """The presets among ``names`` (default: every preset file) that have ``addresses``."""
    out = []
    for name in preset_names() if names is None else names:
        data = preset_data(name)
        if "addresses" in data:
            out.append(_study(name, data))
    return out


def addressed_cell(config: RunConfig) -> str:
    """The published cell a study's run stands for: its cell name with the feedback family's
    parameters and any ``:variant`` suffix of a name dropped."""
    try:
        family = FeedbackSpec.parse(config.feedback).family
        config = config.override(feedback=family)
    except (ConfigError, ValueError):
        pass
    return " ".join(token.split(":")[0] for token in cell(config).split(" "))


@dataclass(frozen=True)
class Variant:
    """One configuration of a study for one addressed cell, over its seeds.

    Attributes:
        study: the study's name.
        experiment, cell: the published cell it stands for.
        paper: the published value.
        changes: how its configuration differs from the experiment's run of that cell, e.g.
            ``("train.lr: 0.001 → 0.003",)``.
        stats: its final metric over seeds.
        seeds: the seeds, in order.
        trained: per seed, the first epoch whose training error is below 0.01% (None if
            never, or without a history).
    """

    study: str
    experiment: str
    cell: str
    paper: float
    changes: tuple[str, ...]
    stats: Statistics
    seeds: tuple[int, ...]
    trained: tuple[float | None, ...] = field(default=())

    @property
    def within(self) -> bool:
        return abs(self.stats.mean - self.paper) <= TOLERANCE + 1e-9


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "rule" and key != "feedback":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _text(value: Any) -> str:
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    return str(value)


_NOT_A_CHANGE = {"seed", "device"}


def _changes(config: RunConfig, reference: RunConfig | None) -> tuple[str, ...]:
    if reference is None:
        return ("(the addressed cell is not in its experiment's grid)",)
    mine, theirs = _flat(config.to_data()), _flat(reference.to_data())
    out = []
    for key in sorted(set(mine) | set(theirs)):
        if key in _NOT_A_CHANGE or mine.get(key) == theirs.get(key):
            continue
        out.append(f"{key}: {_text(theirs.get(key, '—'))} → {_text(mine.get(key, '—'))}")
    return tuple(out)


def _trained_epoch(history: Sequence[Mapping[str, Any]]) -> float | None:
    epochs, values = series(history, "train_error")
    return next((e for e, v in zip(epochs, values, strict=True) if v < TRAINED), None)


def configurations(
    study: Study, rows: Iterable[Mapping[str, Any]]
) -> list[tuple[str, str, list[tuple[RunConfig, Mapping[str, Any]]]]]:
    """The study's finished runs grouped by the published cell they stand for and their
    configuration less the seed: (experiment, cell, [(config, row), ...] by seed), in the
    order the runs come."""
    wanted = {}
    for experiment_name, name in study.cells:
        experiment = preset(experiment_name)
        wanted[(experiment.base.dataset, name)] = (experiment, name)
    groups: dict[tuple, list[tuple[RunConfig, Mapping[str, Any]]]] = {}
    for row in rows:
        if row["status"] != "finished":
            continue
        config = config_of(row)
        target = wanted.get((config.dataset, addressed_cell(config)))
        if target is None:
            continue
        experiment, name = target
        if row["final"].get(experiment.metric) is None:
            continue
        data = config.to_data()
        data.pop("seed")
        key = (experiment.name, name, json.dumps(data, sort_keys=True, default=str))
        groups.setdefault(key, []).append((config, row))
    for members in groups.values():
        members.sort(key=lambda m: m[0].seed)
    return [(e, name, members) for (e, name, _config), members in groups.items()]


def changes_from_grid(experiment_name: str, name: str, config: RunConfig) -> tuple[str, ...]:
    """How ``config`` differs from experiment ``experiment_name``'s run of cell ``name``
    (seed and device aside), e.g. ``("train.lr: 0.001 → 0.003",)``."""
    grid = {cell(p): p for p in points_of(preset(experiment_name))}
    return _changes(config, grid.get(name))


def evaluate(study: Study, rows: Iterable[Mapping[str, Any]]) -> list[Variant]:
    """The study's variants for each addressed cell, from its finished runs."""
    out = []
    for experiment_name, name, members in configurations(study, rows):
        experiment = preset(experiment_name)
        paper = experiment.paper[name]
        values = [float(row["final"][experiment.metric]) for _c, row in members]
        out.append(
            Variant(
                study.name,
                experiment_name,
                name,
                paper,
                changes_from_grid(experiment_name, name, members[0][0]),
                describe(values, paper),
                tuple(c.seed for c, _row in members),
                tuple(_trained_epoch(row.get("history") or ()) for _c, row in members),
            )
        )
    order = {c: n for n, c in enumerate(study.cells)}
    return sorted(out, key=lambda v: (order[v.experiment, v.cell], v.changes))


def explain(experiment: Experiment, summary: list[dict[str, Any]], variants: Iterable[Variant]):
    """Mark the summary's unexplained cells that a study's variant lands within 0.20 of.

    Sets ``explained_by`` (sorted study names) on those rows, in place; returns ``summary``.
    """
    explaining: dict[str, set[str]] = {}
    for variant in variants:
        if variant.experiment == experiment.name and variant.within:
            explaining.setdefault(variant.cell, set()).add(variant.study)
    for row in summary:
        if row.get("verdict") == UNEXPLAINED and row["cell"] in explaining:
            row["explained_by"] = sorted(explaining[row["cell"]])
    return summary


def _number(value: float) -> str:
    return f"{value:.2f}"


def variants_table(
    study: Study, variants: Sequence[Variant], ours: Mapping[tuple[str, str], float | None]
) -> Table:
    """One row per addressed cell and variant: the paper, the experiment's own mean, the
    variant's mean over seeds and whether it lands within 0.20; cells without a variant run
    yet are pending.

    ``ours``: (experiment, cell) -> the experiment's own mean for that cell (None if pending).
    """
    header = (
        "addressed cell",
        "paper",
        "ours (experiment)",
        "configuration",
        "study (mean ± std)",
        "seeds",
        "difference",
        "95% CI",
        f"within {TOLERANCE:.2f}",
        "train error < 0.01% from epoch",
    )
    rows = []
    by_cell: dict[tuple[str, str], list[Variant]] = {}
    for variant in variants:
        by_cell.setdefault((variant.experiment, variant.cell), []).append(variant)
    for experiment_name, name in study.cells:
        paper = preset(experiment_name).paper[name]
        mine = ours.get((experiment_name, name))
        own = PENDING if mine is None else _number(mine)
        where = f"[{experiment_name}]({experiment_name}.md): {name}"
        for variant in by_cell.get((experiment_name, name), ()):
            s = variant.stats
            spread = _number(s.mean) if s.n == 1 else f"{_number(s.mean)} ± {_number(s.std)}"
            trained = ", ".join(PENDING if e is None else str(int(e)) for e in variant.trained)
            rows.append(
                (
                    where,
                    f"{paper:.2f}",
                    own,
                    "; ".join(variant.changes) or "as in the experiment",
                    spread,
                    str(s.n),
                    f"{s.mean - paper:+.2f}",
                    PENDING if s.ci is None else f"{_number(s.ci[0])}–{_number(s.ci[1])}",
                    "yes" if variant.within else "no",
                    trained,
                )
            )
        if (experiment_name, name) not in by_cell:
            rows.append((where, f"{paper:.2f}", own, "no run yet", PENDING, "0", *(PENDING,) * 4))
    numeric = tuple(h not in ("addressed cell", "configuration") for h in header)
    return Table(header, tuple(rows), numeric)


def describe_study(study: Study) -> str:
    """A one-line summary for the index: how many cells the study addresses."""
    experiments = sorted({e for e, _c in study.cells})
    return f"{count(len(study.cells), 'published cell')} of {', '.join(experiments)}"
