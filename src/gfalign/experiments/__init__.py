"""The paper's experiments as data: one TOML preset per experiment (DESIGN.md section 6).

A preset holds a description, the training protocol (epochs, batch size, learning rate,
optimizer, reduction, seeds), a ``[base]`` ``RunConfig`` table, a ``[grid]`` of lists whose
product gives the runs, and the ``[paper]``'s published values keyed by table cell
(``"2x800 tanh s1"``), so a report prints ours beside them.

Five more keys are read by the report (``gfalign.report``) and accepted here as they are:

- ``[figures]``: the experiment's figures, in order. Each key names a figure (its file is
  ``figures/<experiment>-<name>.png``); its value is a table with the figure's ``kind`` and
  options, e.g. ``figure4 = {kind = "seeds", network = "2x800 tanh", title = "Figure 4"}``.
  The kinds and their options are listed in ``gfalign.report.figures``.
- ``addresses`` (a sensitivity study): the published cells the study may explain, a list of
  ``"<experiment>:<cell>"`` with the cell written as in that experiment's ``[paper]`` table, or
  a glob pattern over those cells (``"exp4:2x800 tanh dfa B*"``). A run of the study stands
  for the addressed cell its own cell name reduces to once the feedback family's parameters
  and any ``:variant`` suffix of a name are dropped (``dfa`` with ``feedback = "B1:std=0.1"``
  stands for ``"2x800 tanh dfa B1"``; a rule table named ``"s3-aux:direct-only"`` for the
  ``s3-aux`` cell). The report calls a published cell "explained by <study>" when one of the
  study's configurations for it, averaged over its seeds, lands within 0.20 points of the
  published value, and links the study's page.
- ``[standing]``: groups of rules (``"general rule" = ["s1", "s2"]``) whose best the report
  ranks in sentences made from the table (``gfalign.report.standing``).
- ``[peers]``: other libraries' runs under the same protocol, shown in columns of their own
  (``gfalign.report.peers``).
- ``[ambiguous]``: published cells whose value the paper's text keeps without its label, each
  with the other cells of the grid it may belong to (``"2x800 tanh fa B1" = ["2x800 tanh fa
  B2"]``); the page shows ours for each beside the value, the verdict reading it as the key.
- ``question`` and ``cost`` (a sensitivity study or a reading): the question it answers, in
  one sentence, and the compute it needs; the study's page shows both.

A sensitivity study is a preset named ``study-*.toml`` (``STUDIES``; ``load`` reads them like the
others). Its grid may be a list of tables, ``[[grid]]``, whose products are run one after the
other: a study then varies what it varies for a few chosen cells only, e.g. the learning rate
for two cells at 2x800 beside a full grid at 2x200. What a study changes beyond the cell's name
(a learning rate, a batch size, a bias initialisation) goes into its grid, even with one value,
so that ``Experiment.variant`` names it (``"lr=0.003"``); the cell name itself stays the one of
the addressed experiment's table.

A reading is a preset named ``reading-*.toml`` (``READINGS``): one change of the protocol
applied to every cell of the paper's experiments it concerns, so that it is judged by one count
over all of them instead of a setting chosen per cell. It has no grid of its own:

- ``reads``: the cells it concerns, ``"<experiment>"`` (every cell of its grid) or
  ``"<experiment>:<glob pattern>"`` over that experiment's cell names
  (``"exp4:2x800 tanh dfa B[12357]"``, ``"exp1:* relu *"``);
- ``[change]``: the change, the same for every run: ``RunConfig`` or ``TrainConfig`` fields
  (``lr = 0.01``, ``bias_init = "zeros"``, ``optimizer_options = {momentum = 0.9}``), or a
  change to the rule's terms: ``side_feedback = "<family>"`` gives every above and below term
  that feedback family, ``direct_error = "<signal>"`` makes every direct term project that
  signal instead of its own;
- ``[protocol]``: only ``seeds``;
- ``needs`` (optional): what the engine lacks to train the reading (a signal it does not
  have); such a reading is defined and planned but ``load`` refuses to build its runs.

Each run of a reading is the run of its experiment's cell, with the same name and seed, plus
the change; the paper's values are those of the experiments read.

    >>> experiment = load("exp1")
    >>> len(experiment.expand(seeds=1))
    27
    >>> reading = load("reading-lr")
    >>> reading.variant(reading.points()[0])
    'lr=0.01'
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fnmatch import fnmatch
from functools import cached_property
from importlib import resources
from typing import Any

from gfalign.config import RunConfig
from gfalign.rules import ConfigError, render
from gfalign.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "EXPERIMENTS",
    "PAPER",
    "READINGS",
    "STUDIES",
    "Experiment",
    "cell",
    "field_of",
    "from_data",
    "load",
    "network",
    "reading_cells",
]

PAPER: tuple[str, ...] = ("exp1", "exp2", "exp3", "exp4", "baselines")
"""The paper's experiments (and the baselines that judge them): what ``all`` means."""
EXPERIMENTS: tuple[str, ...] = (
    *PAPER,
    "fashion",
    "field",
    "field-lenet",
    "conv-lr",
    "conv-budget",
    "conv",
    "conv-cifar",
    "transformer",
)
"""Every preset: the paper's, ``fashion`` (the 2x800 tanh grid on Fashion-MNIST), and ``field``
and ``field-lenet`` (the field's further rules, sign-concordant, Kolen-Pollack and DRTP, beside
bp and fa on the MLP and on LeNet-5), ``conv-lr`` and ``conv-budget`` (the rate and the epoch
budget of ``conv`` screened on its validation split), ``conv``, ``conv-cifar``, and
``transformer`` (bp, fa, dfa and s1 on the transformer over the generated character text)."""


def _named(pattern: str) -> tuple[str, ...]:
    presets = resources.files(__name__).joinpath("presets")
    names = (entry.name for entry in presets.iterdir())
    return tuple(sorted(n[: -len(".toml")] for n in names if fnmatch(n, pattern)))


STUDIES: tuple[str, ...] = _named("study-*.toml")
"""Sensitivity studies, every ``presets/study-*.toml``: each asks why a published cell
disagrees with ours and runs the variants that could explain it (see the module docstring)."""
READINGS: tuple[str, ...] = _named("reading-*.toml")
"""Readings of the protocol, every ``presets/reading-*.toml``: one change applied to every cell
of the paper's experiments it concerns (see the module docstring)."""

_PROTOCOL_TRAIN = ("epochs", "batch_size", "lr", "optimizer", "reduction")
# Fields a cell's name already shows; the others a grid varies make up its variant.
_NAMED = ("model", "hidden", "activation", "rule", "feedback")
_TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig)) - {"seed"}


def network(config: RunConfig) -> str:
    """The network part of a cell's name: ``"2x800 tanh"``, or a block model's name."""
    if config.model is not None:
        return config.model_spec().name
    widths = config.hidden
    shape = f"{len(widths)}x{widths[0]}" if len(set(widths)) == 1 else "-".join(map(str, widths))
    return f"{shape} {config.activation}"


def cell(config: RunConfig) -> str:
    """The table cell a run belongs to: ``"2x800 tanh s1"``, ``"2x800 tanh dfa B3"``, or for a
    model of blocks ``"lenet5 s1"``."""
    text = f"{network(config)} {config.rule_name}"
    if config.feedback != "uniform":
        text += f" {config.feedback}"
    return text


@dataclass(frozen=True)
class Experiment:
    """One experiment: its base run, its grid, its seeds and the paper's numbers.

    Attributes:
        name: ``exp1`` ... ``baselines``.
        description: one line.
        base: the ``RunConfig`` every grid point starts from (protocol applied).
        grid: field name -> values; the runs are the product, in this order. A study's
            ``[[grid]]`` is a tuple of such tables, whose products follow one another.
        seeds: the protocol's seeds.
        configs: every run, grid x seeds (seed innermost).
        paper: published values by cell name.
        metric: the summary metric compared with the paper (``test_error``).
        reference: published numbers of another source under another protocol, shown beside
            ours with their difference but never judged (no verdict): ``source`` (who, and
            how they were obtained) and ``values`` by cell name, from the preset's
            ``[reference]`` table.
    """

    name: str
    description: str
    base: RunConfig
    grid: Mapping[str, tuple[Any, ...]] | tuple[Mapping[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...]
    configs: tuple[RunConfig, ...]
    paper: Mapping[str, float] = field(default_factory=dict)
    metric: str = "test_error"
    reference: Mapping[str, Any] = field(default_factory=dict)

    def cell(self, config: RunConfig) -> str:
        """``cell(config)``, followed by ``key=value`` for each field in which the grid's points
        of that name differ (none in the paper's grids), so that every point has a name of its
        own: ``"lenet5 bp dataset=fashion-mnist"`` where a grid crosses datasets, ``"lenet5 fa
        lr=0.01"`` where it screens rates, the fields in the order the grid's tables name them.

        >>> screening = load("conv-lr")
        >>> screening.cell(screening.points()[1])
        'lenet5 bp dataset=mnist lr=0.01'
        """
        name = cell(config)
        parts = []
        for key in self._ambiguous.get(name, ()):
            value = field_of(config, key)
            parts.append(f"{key}={value if isinstance(value, str) else render(value)}")
        return " ".join([name, *parts])

    @cached_property
    def _ambiguous(self) -> dict[str, tuple[str, ...]]:
        """Per plain cell name, the grid's fields whose values differ among its points."""
        keys = list(dict.fromkeys(k for table in self.tables for k in table if k not in _NAMED))
        seen: dict[str, list[RunConfig]] = {}
        for point in self.points():
            seen.setdefault(cell(point), []).append(point)
        out = {}
        for name, points in seen.items():
            differ = tuple(k for k in keys if len({render(field_of(p, k)) for p in points}) > 1)
            if differ:
                out[name] = differ
        return out

    @cached_property
    def settings(self) -> tuple[str, ...]:
        """The fields the grid crosses its rules with: those in which the points of every
        ambiguous cell name differ (``("dataset",)`` for ``conv``). A field only some names
        vary in, such as the rate one rule takes on one dataset, is that rule's protocol.

        >>> load("conv").settings, load("exp1").settings
        (('dataset',), ())
        """
        differing = list(self._ambiguous.values())
        if not differing:
            return ()
        return tuple(key for key in differing[0] if all(key in keys for keys in differing))

    def points(self, base: RunConfig | None = None) -> list[RunConfig]:
        """The grid's runs (seed of ``base``), in grid order."""
        base = self.base if base is None else base
        out = []
        for table in self.tables:
            names = list(table)
            for values in itertools.product(*(table[n] for n in names)):
                changes = {
                    n: (list(v) if isinstance(v, tuple) else v)
                    for n, v in zip(names, values, strict=True)
                }
                out.append(base.override(**changes))
        return out

    @property
    def tables(self) -> tuple[Mapping[str, tuple[Any, ...]], ...]:
        """The grid as a tuple of tables (one for a plain ``[grid]``)."""
        return (self.grid,) if isinstance(self.grid, Mapping) else tuple(self.grid)

    def variant(self, config: RunConfig) -> str:
        """What ``config`` changes beyond its cell's name: every field the grid varies that the
        name does not show, where it differs from the base, as ``"key=value"``; ``""`` if none.

        >>> study = load("study-lr")
        >>> [study.variant(c) for c in study.points()[:2]]
        ['lr=0.003', 'lr=0.01']
        """
        keys = dict.fromkeys(k for table in self.tables for k in table if k not in _NAMED)
        parts = []
        for key in keys:
            value, base = field_of(config, key), field_of(self.base, key)
            if value != base:
                shown = value if isinstance(value, str) else render(value)
                parts.append(f"{key}={shown}")
        return " ".join(parts)

    def expand(self, seeds: int | Sequence[int] | None = None, **overrides: Any) -> list[RunConfig]:
        """Every run: grid x seeds, with ``overrides`` (``RunConfig``/``TrainConfig`` fields).

        ``seeds``: ``None`` the protocol's seeds, an int N the first N (0..N-1 past the list),
        or an explicit list.
        """
        chosen = _seeds(self.seeds, seeds)
        base = self.base.override(**overrides) if overrides else self.base
        return [with_seed(point, s) for point in self.points(base) for s in chosen]

    def cells(self) -> list[str]:
        """The cell names in grid order."""
        return list(dict.fromkeys(self.cell(c) for c in self.points()))


def _reference(name: str, data: Any) -> dict[str, Any]:
    """A preset's ``[reference]`` table checked: ``source`` text and ``values`` by cell."""
    if not data:
        return {}
    form = '[reference] with source = "..." and values = {"<cell>" = number, ...}'
    if not isinstance(data, Mapping) or set(data) - {"source", "values"}:
        raise ConfigError(f"experiment {name}: reference = {render(data)}; allowed: {form}")
    values = data.get("values", {})
    good = isinstance(values, Mapping) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
    )
    if not isinstance(data.get("source"), str) or not good:
        raise ConfigError(f"experiment {name}: reference = {render(data)}; allowed: {form}")
    return {"source": data["source"], "values": {str(k): float(v) for k, v in values.items()}}


def field_of(config: RunConfig, key: str) -> Any:
    """A ``RunConfig`` field, or a ``TrainConfig`` field by name (as ``override`` routes it)."""
    return getattr(config.train if key in _TRAIN_FIELDS else config, key)


def with_seed(config: RunConfig, seed: int) -> RunConfig:
    """``config`` with another seed (``RunConfig.override`` routes ``seed`` to ``train``)."""
    data = config.to_data()
    data["seed"] = int(seed)
    return RunConfig.from_data(data)


def _seeds(default: Sequence[int], seeds: int | Sequence[int] | None) -> tuple[int, ...]:
    if seeds is None:
        return tuple(default)
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds: give at least 1, got {seeds}")
        listed = list(default)[:seeds]
        start = max(listed, default=-1) + 1
        return tuple(listed + list(range(start, start + seeds - len(listed))))
    return tuple(int(s) for s in seeds)


def from_data(name: str, data: Mapping[str, Any]) -> Experiment:
    """An experiment from a preset's plain data (validates every run)."""
    known = {"description", "metric", "protocol", "base", "grid", "paper"}
    known |= {"figures", "addresses", "question", "cost"}  # read by gfalign.report
    known |= {"reference", "standing", "peers", "ambiguous", "reads", "change", "needs"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"experiment {name}: unknown key(s) {sorted(unknown)}")
    if "reads" in data:
        data = _reading_data(name, data)
    protocol = dict(data.get("protocol", {}))
    seeds = tuple(int(s) for s in protocol.pop("seeds", [0]))
    base_data = dict(data.get("base", {}))
    train = dict(base_data.pop("train", {}) or {})
    for key in sorted(_TRAIN_FIELDS & set(protocol)):  # any [train] field: lr, schedule...
        train[key] = protocol.pop(key)
    if protocol:
        raise ConfigError(f"experiment {name}: unknown [protocol] key(s) {sorted(protocol)}")
    base_data["train"] = train
    base = RunConfig.from_data(base_data)
    given = data.get("grid", {})
    listed = isinstance(given, list) and bool(given) and all(isinstance(t, Mapping) for t in given)
    if not (isinstance(given, Mapping) or listed):
        raise ConfigError(
            f"experiment {name}: grid = {render(given)}; allowed: a [grid] table, or [[grid]] "
            "tables whose products follow one another"
        )
    tables = []
    for table in [given] if isinstance(given, Mapping) else given:
        for key, values in table.items():
            if not isinstance(values, list):
                raise ConfigError(
                    f"experiment {name}: [grid] {key} = {render(values)} is not a list; "
                    f"allowed: a list of values, e.g. {key} = [{render(values)}]"
                )
            if not values:
                raise ConfigError(f"experiment {name}: [grid] {key} is empty")
        tables.append({str(k): tuple(_tuple(v) for v in values) for k, values in table.items()})
    grid = tables[0] if isinstance(given, Mapping) else tuple(tables)
    paper = {str(k): float(v) for k, v in data.get("paper", {}).items()}
    partial = Experiment(
        name,
        str(data.get("description", "")),
        base,
        grid,
        seeds,
        (),
        paper,
        str(data.get("metric", "test_error")),
    )
    configs = tuple(partial.expand())
    reference = _reference(name, data.get("reference", {}))
    experiment = Experiment(
        partial.name,
        partial.description,
        base,
        grid,
        seeds,
        configs,
        paper,
        partial.metric,
        reference,
    )
    stray = set(paper) - set(experiment.cells())
    if stray:
        raise ConfigError(f"experiment {name}: [paper] cells not in the grid: {sorted(stray)}")
    ambiguous = data.get("ambiguous", {})
    stray = set(ambiguous) - set(paper)
    stray |= {c for others in ambiguous.values() for c in others} - set(experiment.cells())
    if stray:
        raise ConfigError(
            f"experiment {name}: [ambiguous] names {sorted(stray)}; allowed: published cells, "
            "each with a list of other cells of the grid"
        )
    stray = set(reference.get("values", {})) - set(experiment.cells())
    if stray:
        raise ConfigError(
            f"experiment {name}: [reference] values for cells not in the grid: {sorted(stray)}; "
            f"allowed: {', '.join(experiment.cells())}"
        )
    if not isinstance(grid, Mapping):
        seen: dict[str, RunConfig] = {}
        for point in experiment.points():
            if seen.setdefault(point.key(), point) is not point:
                raise ConfigError(
                    f"experiment {name}: [[grid]] tables both give {point.label()}; allowed: "
                    "tables whose runs differ"
                )
    return experiment


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


_TERM_CHANGES = ("side_feedback", "direct_error")
"""Changes of a reading that rewrite the rule's terms rather than set a field."""


def reading_cells(name: str, data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (experiment, cell) pairs a reading's ``reads`` names, in the experiments' grid order.

    >>> from gfalign.report.studies import preset_data
    >>> reading_cells("reading-relu-bias", preset_data("reading-relu-bias"))[0]
    ('exp1', '2x200 relu s1')
    """
    raw = data.get("reads")
    if not isinstance(raw, list) or not raw or not all(isinstance(r, str) for r in raw):
        raise ConfigError(
            f'reading {name}: reads = {render(raw)}; allowed: a list of "<experiment>" or '
            '"<experiment>:<cell pattern>" strings, e.g. ["exp1", "exp4:2x800 tanh dfa B*"]'
        )
    out: list[tuple[str, str]] = []
    for entry in raw:
        experiment_name, _colon, pattern = entry.partition(":")
        if experiment_name not in PAPER:
            raise ConfigError(
                f"reading {name}: {entry!r} names experiment {experiment_name!r}; allowed: "
                f"{', '.join(PAPER)}"
            )
        cells = load(experiment_name).cells()
        matched = [c for c in cells if fnmatch(c, pattern.strip() or "*")]
        if not matched:
            raise ConfigError(
                f"reading {name}: {entry!r} matches no cell of {experiment_name}; its cells look "
                f"like {', '.join(cells[:3])}"
            )
        out += [(experiment_name, c) for c in matched if (experiment_name, c) not in out]
    return out


def _reading_data(name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A reading's preset as the plain data of an experiment: one ``[[grid]]`` table per cell
    read, holding that cell's run (as its experiment builds it) and the change."""
    mine = {"grid", "base", "paper"} & set(data)
    if mine:
        raise ConfigError(
            f"reading {name}: {', '.join(sorted(mine))} given; a reading takes its cells, base "
            "and published values from the experiments it reads (reads) and changes them "
            "(change)"
        )
    protocol = data.get("protocol", {})
    if not isinstance(protocol, Mapping) or set(protocol) - {"seeds"}:
        raise ConfigError(
            f"reading {name}: [protocol] = {render(protocol)}; allowed: seeds only (the "
            "protocol is the experiments', and its change is in [change])"
        )
    change = data.get("change")
    if not isinstance(change, Mapping) or not change:
        raise ConfigError(
            f"reading {name}: change = {render(change)}; allowed: a [change] table of fields "
            'or term changes, e.g. lr = 0.01 or side_feedback = "xavier"'
        )
    cells = reading_cells(name, data)
    if data.get("needs"):
        raise ConfigError(
            f"reading {name} needs {data['needs']}; it is planned ({len(cells)} cells) but "
            "cannot be trained yet"
        )
    base: RunConfig | None = None
    tables, paper = [], {}
    for experiment_name, cell_name in cells:
        experiment = load(experiment_name)
        point = next(p for p in experiment.points() if experiment.cell(p) == cell_name)
        if base is None:
            base = experiment.base
        table = {key: [value] for key, value in _fields_apart(point, base).items()}
        for key, value in change.items():
            if key in _TERM_CHANGES:
                table["rule"] = [_rewritten(point, key, value)]
            else:
                table[key] = [value]
        tables.append(table)
        if cell_name in experiment.paper:  # under the name the changed rule gives the cell
            named = point.override(rule=table["rule"][0]) if "rule" in table else point
            paper[cell(named)] = experiment.paper[cell_name]
    assert base is not None  # reading_cells gives at least one cell
    out = {k: v for k, v in data.items() if k not in ("reads", "change", "needs")}
    out["protocol"] = {**base.train.to_data(), "seeds": protocol.get("seeds", [0])}
    out["protocol"].pop("seed", None)
    out["base"] = {k: v for k, v in base.to_data().items() if k not in ("train", "seed")}
    out["grid"] = tables
    out["paper"] = paper
    return out


def _fields_apart(point: RunConfig, base: RunConfig) -> dict[str, Any]:
    """The fields (``RunConfig``'s, then ``TrainConfig``'s by name) in which ``point`` differs
    from ``base``, seed aside: what a grid table must set to give ``point`` from ``base``."""
    mine, theirs = point.to_data(), base.to_data()
    out: dict[str, Any] = {}
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        if key in ("seed", "train") or mine.get(key) == theirs.get(key):
            continue
        value = field_of(point, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    for key in [*mine["train"], *(k for k in theirs["train"] if k not in mine["train"])]:
        if mine["train"].get(key) != theirs["train"].get(key):
            out[key] = getattr(point.train, key)
    return out


def _rewritten(point: RunConfig, change: str, value: Any) -> dict[str, Any]:
    """The rule of ``point`` as a table whose terms carry the change: ``side_feedback`` gives
    every above and below term the feedback family ``value``, ``direct_error`` makes every
    direct term project the signal ``value``. Its name is the preset's with the change after
    a colon (``"s3:side_feedback=xavier"``), so that it stands for the same cell."""
    from gfalign.rules import PRESETS

    rule = point.rule
    data = dict(PRESETS[rule]) if isinstance(rule, str) and rule in PRESETS else dict(rule)
    if not isinstance(value, str):
        raise ConfigError(f"{change} = {render(value)}: not a name; allowed: a family or signal")

    def term(entry: Any) -> Any:
        kind = entry.get("kind") if isinstance(entry, Mapping) else str(entry).partition(":")[0]
        if change == "side_feedback" and kind in ("above", "below"):
            table = dict(entry) if isinstance(entry, Mapping) else {"kind": kind}
            option = "" if isinstance(entry, Mapping) else str(entry).partition(":")[2]
            if option:
                table["source"] = option
            table["feedback"] = value
            return table
        if change == "direct_error" and kind == "direct":
            if isinstance(entry, Mapping):
                return {**entry, "error": value}
            return f"direct:{value}"
        return entry

    def layer(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {**entry, "terms": [term(t) for t in entry.get("terms", [])]}

    shape = "template" if "template" in data else "layers"
    parts = data[shape]
    changed = (
        {k: layer(v) for k, v in parts.items()}
        if isinstance(parts, Mapping)
        else [layer(v) for v in parts]
    )
    base_name = str(data.get("name", "custom"))
    return {
        "name": f"{base_name}:{change}={value}",
        "description": f"{data.get('description', base_name)}; reading: {change} = {value}",
        shape: changed,
    }


def load(name: str) -> Experiment:
    """The preset ``name`` (one of ``EXPERIMENTS``, ``STUDIES`` or ``READINGS``)."""
    if name not in EXPERIMENTS + STUDIES + READINGS:
        known = ", ".join(EXPERIMENTS + STUDIES + READINGS)
        raise ConfigError(f"unknown experiment {name!r}; known: {known}")
    text = resources.files(__name__).joinpath("presets", f"{name}.toml").read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as problem:
        raise ConfigError(f"experiment preset {name}: not valid TOML: {problem}") from None
    return from_data(name, data)


def load_all(names: Iterable[str] = PAPER) -> list[Experiment]:
    return [load(n) for n in names]
