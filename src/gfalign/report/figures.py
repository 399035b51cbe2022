"""The report's figures, chosen by each experiment preset's ``[figures]`` table.

A preset names its figures in order; each entry's key is the figure's name (its file is
``figures/<experiment>-<name>.png``) and its value a table with a ``kind`` and that kind's
options. ``title`` (e.g. ``"Figure 4"``) is accepted by every kind and starts the caption.

The kinds (options after the colon):

- ``seeds``: test error per epoch of the cells of one network, every seed thin and their
  mean thick, the bp/fa/dfa baselines dashed (the paper's Figures 4 and 5); ``network``
  (``"2x800 tanh"``), ``baselines`` (rules, default bp, fa, dfa).
- ``families``: one panel per rule, one line per feedback family (mean and min-max band),
  the uniform-feedback baseline dashed; series that coincide seed by seed are drawn apart
  and named on the figure (Figure 8); ``network``, ``rules`` (default dfa, fa).
- ``activation``: test and training error per epoch of every cell with one activation, one
  column per network size, baselines dashed; ``activation``, ``baselines``.
- ``panels``: one panel per group of rules on one network; ``network``, ``panels`` (a table:
  panel title -> list of rules).
- ``reconstructions``: ten test digits and each rule's reconstruction (Figure 6), from the
  runs' checkpoints.
- ``filters``: the first rows of W1 as tiles, one panel per rule (Figure 7); ``count``.
- ``study``: a study's runs beside the experiment's runs of each cell it addresses: per cell a
  row of test error and training error per epoch, one line per configuration of the study
  (mean and min-max band over seeds), the experiment's own runs dashed.
- ``alignment``: each rule's angle with the backprop update per hidden layer over
  training; ``network`` (default the widest), ``angle`` (``update`` or ``delta``).

Runs without a per-epoch history (imported from a CSV export) are drawn as a cross at their
last epoch, and a baseline without any curve as a dashed level at its final mean; captions
say what was drawn. A figure that cannot be drawn gives a note instead, never an error.

    >>> [s.kind for s in figure_specs("exp1")]
    ['seeds', 'activation', 'activation', 'alignment']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import Experiment, cell, field_of
from gfalign.experiments import network as network_of
from gfalign.plots import Panel, Series
from gfalign.report.render import Block, Image
from gfalign.report.rows import (
    architecture,
    by_cell,
    cells_of,
    config_of,
    count,
    main_protocol,
    points_of,
    protocol_key,
    rule_of,
    series,
    varied,
)
from gfalign.rules import ConfigError

__all__ = ["COINCIDE", "KINDS", "FigureSpec", "draw", "figure_specs"]

COINCIDE = 0.05
"""Two series coincide when, seed by seed, they are never further apart than this (points of
the error in %: five test examples in 10,000)."""

_LABELS = {
    "test_error": "test error (%)",
    "train_error": "training error (%)",
    "validation_error": "validation error (%)",
}


@dataclass(frozen=True)
class FigureSpec:
    """One entry of a preset's ``[figures]`` table."""

    name: str
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return str(self.options.get("title", self.name))


@dataclass
class Context:
    """What a figure needs: the experiment, its rows, the baselines' rows on its dataset, where
    to write, where the run directories and the data are; for a study, ``references``: the
    rows of the experiments whose cells it addresses."""

    experiment: Experiment
    rows: list[dict[str, Any]]
    baselines: list[dict[str, Any]]
    figures: Path
    runs_dir: Path | None = None
    data_dir: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    references: list[dict[str, Any]] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.figures / f"{self.experiment.name}-{name}.png"


Made = tuple[list[Block], list[str]]


# ---------------------------------------------------------------------------- specs


def figure_specs(name: str, data: Mapping[str, Any] | None = None) -> list[FigureSpec]:
    """The figures the preset ``name`` names, checked (``ConfigError`` naming the entry).

    ``data``: the preset's parsed TOML (default: read it).
    """
    if data is None:
        from gfalign.report.studies import preset_data

        data = preset_data(name)
    table = data.get("figures", {})
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"experiment preset {name}: figures = {table!r}; allowed: a [figures] table of "
            '"name = {kind = ..., ...}" entries'
        )
    out = []
    for key, entry in table.items():
        where = f"experiment preset {name}: [figures] {key}"
        if not isinstance(entry, Mapping) or "kind" not in entry:
            raise ConfigError(f"{where}: not a table with a kind; allowed: {', '.join(KINDS)}")
        kind = entry["kind"]
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        options = {k: v for k, v in entry.items() if k != "kind"}
        allowed = KINDS[kind].options | {"title"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {unknown} for kind {kind!r}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )
        missing = sorted(KINDS[kind].required - set(options))
        if missing:
            raise ConfigError(f"{where}: kind {kind!r} needs {', '.join(missing)}")
        for option, value in options.items():
            _check_option(where, option, value)
        out.append(FigureSpec(str(key), str(kind), options))
    return out


_OPTION_TYPES: dict[str, tuple[type, str]] = {
    "title": (str, 'a string, e.g. "Figure 4"'),
    "network": (str, 'a network as cells name it, e.g. "2x800 tanh"'),
    "activation": (str, 'an activation of the grid, e.g. "relu"'),
    "baselines": (list, 'a list of baseline rules, e.g. ["bp", "fa", "dfa"]'),
    "rules": (list, 'a list of rules, e.g. ["dfa", "fa"]'),
    "panels": (Mapping, 'a table of panel title = [rules], e.g. {"bp, fa" = ["bp", "fa"]}'),
    "count": (int, "a positive number of filters, e.g. 36"),
    "angle": (str, '"update" or "delta"'),
    "norm": (str, '"weight", "update" or "delta"'),
    "dataset": (str, 'a dataset of the grid, e.g. "fashion-mnist"'),
    "field": (str, 'a field the grid varies, e.g. "lr"'),
}


def _check_option(where: str, option: str, value: Any) -> None:
    kind, allowed = _OPTION_TYPES[option]
    good = isinstance(value, kind) and not isinstance(value, bool)
    if option in ("baselines", "rules"):
        good = good and all(isinstance(v, str) for v in value)
    elif option == "panels":
        good = good and all(
            isinstance(v, list) and all(isinstance(r, str) for r in v) for v in value.values()
        )
    elif option == "count":
        good = good and value > 0
    elif option == "angle":
        good = value in ("update", "delta")
    elif option == "norm":
        good = value in _NORMS
    if not good:
        raise ConfigError(f"{where}: {option} = {value!r}; allowed: {allowed}")


def draw(context: Context, specs: Sequence[FigureSpec]) -> Made:
    """Every figure of ``specs``: the images drawn and the notes on what could not be."""
    blocks: list[Block] = []
    notes: list[str] = []
    for spec in specs:
        more, remarks = KINDS[spec.kind].make(context, spec)
        blocks += more
        notes += remarks
    return blocks, notes


# ---------------------------------------------------------------------------- choosing runs


def _cell_rows(rows: Sequence[Mapping[str, Any]], wanted: Callable[[str], bool]) -> list:
    return [r for r in rows if r["status"] == "finished" and wanted(cell(config_of(r)))]


def _on_dataset(rows: Sequence[Mapping[str, Any]], spec: FigureSpec) -> list:
    """The rows on the figure's ``dataset`` (all of them when the figure names none)."""
    if "dataset" not in spec.options:
        return list(rows)
    return [r for r in rows if config_of(r).dataset == spec.options["dataset"]]


def _on(spec: FigureSpec) -> str:
    """`` on <dataset>`` for a figure that names its dataset, else ``""``."""
    return f" on {spec.options['dataset']}" if "dataset" in spec.options else ""


def _choose(
    rows: Sequence[Mapping[str, Any]], short: str, ignore: frozenset[str] = frozenset()
) -> tuple[tuple | None, list, list]:
    """The main protocol of ``rows`` (finished runs), its rows, and notes on the rest;
    ``ignore``: the protocol fields the experiment's grid varies (its lines show them)."""
    protocol = main_protocol(rows, ignore)
    chosen = [r for r in rows if protocol_key(r, ignore) == protocol]
    others = {protocol_key(r, ignore) for r in rows} - {protocol}
    notes = []
    if others:
        notes.append(f"{short}: runs of {len(others)} other protocol(s) left out of the figure.")
    return protocol, chosen, notes


def _named_apart(
    experiment: Experiment, rows: Sequence[Mapping[str, Any]], spec: FigureSpec
) -> dict[str, list[tuple[str, list]]]:
    """Per plain cell name, its lines: (label, rows) for each name the experiment gives its
    points (``Experiment.cell``: a screening's ``lr=0.01`` apart from its ``lr=0.1``), the
    label being the rule with those ``key=value`` parts, less the figure's own dataset."""
    named: dict[str, list] = {}
    for row in rows:
        named.setdefault(experiment.cell(config_of(row)), []).append(row)
    out: dict[str, list[tuple[str, list]]] = {}
    own = f"dataset={spec.options['dataset']}" if "dataset" in spec.options else None
    for name, members in named.items():
        plain = cell(config_of(members[0]))
        extra = [w for w in name[len(plain) :].split() if w != own]
        out.setdefault(plain, []).append((" ".join([rule_of(plain), *extra]), members))
    return out


def _by_seed(rows: Sequence[Mapping[str, Any]], metric: str) -> tuple[dict, dict]:
    """Per seed: (epochs, values) of the runs with a history; (epoch, final) of the others."""
    curves, finals = {}, {}
    for row in sorted(rows, key=lambda r: r["config"].get("seed", 0)):
        seed = int(row["config"].get("seed", 0))
        epochs, values = series(row.get("history") or (), metric)
        if values:
            curves[seed] = (epochs, values)
        elif isinstance(row["final"].get(metric), (int, float)):
            epoch = float(row["final"].get("epoch", row["config"].get("train", {}).get("epochs")))
            finals[seed] = (epoch, float(row["final"][metric]))
    return curves, finals


@dataclass
class _Line:
    """A series being built: its seeds' curves and final-only values, keyed by seed."""

    label: str
    curves: dict[int, tuple[list[float], list[float]]]
    finals: dict[int, tuple[float, float]]
    dashed: bool = False
    layer: str = "normal"

    def series(self, seeds: bool = False) -> Series:
        return Series(
            self.label,
            tuple(self.curves.values()),
            tuple(self.finals.values()),
            dashed=self.dashed,
            seeds=seeds,
            layer=self.layer,
        )

    @property
    def n(self) -> int:
        return len(self.curves) + len(self.finals)


def _gap(a: _Line, b: _Line) -> float | None:
    """The largest distance between two lines over their common seeds and epochs, if they
    have the same seeds, all with curves; else None."""
    if not a.curves or set(a.curves) != set(b.curves) or a.finals or b.finals:
        return None
    gap = 0.0
    for seed, (epochs, values) in a.curves.items():
        theirs = dict(zip(*b.curves[seed], strict=True))
        common = [(v, theirs[e]) for e, v in zip(epochs, values, strict=True) if e in theirs]
        if not common:
            return None
        gap = max(gap, max(abs(x - y) for x, y in common))
    return gap


def _separate(lines: list[_Line]) -> list[str]:
    """Mark lines that coincide seed by seed (the later drawn dotted over the earlier, wide
    and pale); returns one sentence per coinciding pair."""
    notes = []
    for n, a in enumerate(lines):
        for b in lines[n + 1 :]:
            gap = _gap(a, b)
            if gap is None or gap > COINCIDE or b.layer != "normal":
                continue
            a.layer = "under" if a.layer == "normal" else a.layer
            b.layer = "over"
            seeds = count(len(a.curves), "seed")
            notes.append(
                f"{a.label} and {b.label} coincide seed by seed ({seeds}, ≤ {gap:.2f} apart)"
            )
    return notes


def _label(line: _Line) -> str:
    text = f"{line.label}, {count(line.n, 'seed')}"
    if line.finals:
        text += " (final only)" if not line.curves else f" ({len(line.finals)} final only)"
    return text


def _protocol_text(protocol: tuple) -> str:
    """The epochs and training subset the figure's runs share; where the grid varies the
    epochs (``protocol[1]`` left out), each line's label names them instead."""
    epochs = "epochs as each line's label names them" if protocol[1] is None else None
    subset = "" if protocol[6] == math.inf else f", {protocol[6]} training examples"
    return f"{epochs or count(protocol[1], 'epoch')}{subset}"


def _final_sentence(lines: Sequence[_Line]) -> str:
    solid = [line for line in lines if not line.dashed]
    dashed = [line for line in lines if line.dashed]
    parts = []
    if any(line.finals for line in solid):
        parts.append(
            "seeds stored without a per-epoch history (final values only, as a CSV export "
            "holds them) are crosses at their last epoch"
        )
    if any(line.dashed and not line.curves for line in dashed):
        parts.append(
            "a baseline with no per-epoch history is a dashed level at the mean of its "
            "final values, its seeds crosses at their last epoch"
        )
    return ("; ".join(parts).capitalize() + ".") if parts else ""


def _rename(lines: Sequence[_Line]) -> None:
    for line in lines:
        line.label = _label(line)


# ---------------------------------------------------------------------------- kinds


def _baseline_lines(
    context: Context, network: str, rules: Sequence[str], protocol: tuple | None, metric: str
) -> tuple[list[_Line], list[str]]:
    wanted = {f"{network} {r}" for r in rules}
    rows = _cell_rows(context.baselines, lambda c: c in wanted)
    same = [r for r in rows if protocol_key(r, varied(context.experiment)) == protocol]
    notes = []
    if rows and not same:
        notes.append("the baseline runs use another protocol; not drawn")
    groups = by_cell(same)
    lines = []
    for name in [f"{network} {r}" for r in rules]:
        if name in groups:
            curves, finals = _by_seed(groups[name], metric)
            lines.append(_Line(f"{rule_of(name)} baseline", curves, finals, dashed=True))
    return lines, notes


def _seeds(context: Context, spec: FigureSpec) -> Made:
    experiment = context.experiment
    network = str(spec.options["network"])
    baselines = [str(r) for r in spec.options.get("baselines", ("bp", "fa", "dfa"))]
    metric = experiment.metric
    short = f"{spec.title} ({experiment.name})"
    rows = _cell_rows(context.rows, lambda c: c.startswith(network + " "))
    protocol, chosen, notes = _choose(rows, short, varied(context.experiment))
    if protocol is None:
        return [], [*notes, f"{short}: no finished {network} runs yet."]
    groups = by_cell(chosen)
    lines = [
        _Line(rule_of(name), *_by_seed(groups[name], metric))
        for name in cells_of(experiment)
        if name in groups
    ]
    more, remarks = _baseline_lines(context, network, baselines, protocol, metric)
    notes += [f"{short}: {r}." for r in remarks]
    drawn = [line.label.removesuffix(" baseline") for line in more]
    lines += more
    coincide = _separate(lines)
    _rename(lines)
    panel = Panel(
        "",
        tuple(line.series(seeds=not line.dashed) for line in lines),
        f"{_LABELS.get(metric, metric)}, log scale",
        note="; ".join(coincide),
    )
    from gfalign import plots

    path = plots.plot_panels(
        [panel],
        context.path(spec.name),
        title=f"{short}: {_LABELS.get(metric, metric)} of the {network} network",
    )
    strategies = ", ".join(rule_of(n) for n in cells_of(experiment) if n in groups)
    caption = (
        f"{short}: {_LABELS.get(metric, metric)} per epoch of the {network} network, log "
        f"scale. {strategies} solid: each seed with a per-epoch history a thin line, their mean "
        "a thick one (a single seed is its own mean)"
    )
    if drawn:
        caption += f"; the {'/'.join(drawn)} baseline{'s' if len(drawn) > 1 else ''} dashed, "
        caption += "the mean over its seeds" if len(drawn) == 1 else "the mean over their seeds"
    caption += f". {_final_sentence(lines)} " if _final_sentence(lines) else ". "
    if coincide:
        caption += "; ".join(coincide).capitalize() + ", drawn dotted over wide. "
    caption += f"Legend: seeds per line; {_protocol_text(protocol)}."
    return [Image(path, caption)], notes


def _families(context: Context, spec: FigureSpec) -> Made:
    experiment = context.experiment
    network = str(spec.options["network"])
    rules = [str(r) for r in spec.options.get("rules", ("dfa", "fa"))]
    metric = experiment.metric
    short = f"{spec.title} ({experiment.name})"
    rows = _cell_rows(context.rows, lambda c: c.startswith(network + " "))
    protocol, chosen, notes = _choose(rows, short, varied(context.experiment))
    if protocol is None:
        return [], [*notes, f"{short}: no finished {network} runs yet."]
    groups = by_cell(chosen)
    panels, coincidences, every = [], [], []
    for rule in rules:
        names = [
            n for n in cells_of(experiment) if n in groups and rule_of(n).split(" ")[0] == rule
        ]
        lines = [_Line(rule_of(n).split(" ", 1)[-1], *_by_seed(groups[n], metric)) for n in names]
        more, remarks = _baseline_lines(context, network, [rule], protocol, metric)
        notes += [f"{short}: {r}." for r in remarks]
        for line in more:
            line.label = f"{rule} uniform baseline"
        if not lines and not more:
            continue
        coincide = _separate(lines)
        coincidences += [f"{rule}: {c}" for c in coincide]
        lines += more
        every += lines
        _rename(lines)
        panels.append(
            Panel(
                f"{rule}, feedback families",
                tuple(line.series() for line in lines),
                f"{_LABELS.get(metric, metric)}, log scale",
                note="; ".join(coincide),
            )
        )
    title = f"{short}: {_LABELS.get(metric, metric)} of the {network} network per feedback family"
    caption = (
        f"{short}: {_LABELS.get(metric, metric)} per epoch of the {network} network for each "
        f"feedback family, one panel per rule ({', '.join(rules)}), log scale; mean over the "
        "seeds the legend counts, band from min to max; the uniform-feedback baseline dashed. "
    )
    if coincidences:
        caption += (
            "Series that coincide seed by seed (never more than "
            f"{COINCIDE:.2f} points apart) are drawn dotted over a wide pale line and named "
            f"on the figure: {'; '.join(coincidences)}. "
        )
    return _panel_image(context, spec, panels, notes, title, caption, every, protocol)


def _activation(context: Context, spec: FigureSpec) -> Made:
    experiment = context.experiment
    activation = str(spec.options["activation"])
    baselines = [str(r) for r in spec.options.get("baselines", ("bp", "fa", "dfa"))]
    metric = experiment.metric
    short = f"{spec.title} ({experiment.name})"
    networks = list(
        dict.fromkeys(network_of(p) for p in points_of(experiment) if p.activation == activation)
    )
    if not networks:
        return [], [f"{short}: the grid has no {activation} network."]
    rows = _cell_rows(context.rows, lambda c: any(c.startswith(n + " ") for n in networks))
    protocol, chosen, notes = _choose(rows, short, varied(context.experiment))
    if protocol is None:
        return [], [*notes, f"{short}: no finished {activation} runs yet."]
    groups = by_cell(chosen)
    networks = [n for n in networks if any(c.startswith(n + " ") for c in groups)]
    train = {"test_error": "train_error"}.get(metric)
    rows_of_panels: dict[str, list[Panel]] = {metric: [], **({train: []} if train else {})}
    every: list[_Line] = []
    coincidences = []
    for network in networks:
        names = [n for n in cells_of(experiment) if n in groups and n.startswith(network + " ")]
        for key in rows_of_panels:
            lines = [_Line(rule_of(n), *_by_seed(groups[n], key)) for n in names]
            more, remarks = _baseline_lines(context, network, baselines, protocol, key)
            if key == metric:
                notes += [f"{short}, {network}: {r}." for r in remarks]
            lines += more
            coincide = _separate(lines)
            coincidences += [f"{network} ({_LABELS.get(key, key)}): {c}" for c in coincide]
            every += lines  # one legend for every panel: no per-panel seed counts
            rows_of_panels[key].append(
                Panel(
                    f"{network}" if key == metric else f"{network}, training",
                    tuple(line.series() for line in lines),
                    f"{_LABELS.get(key, key)}" + (", log" if key == metric else ""),
                    scale="log" if key == metric else "symlog",
                    reference=None if key == metric else (0.01, "0.01%"),
                    note="; ".join(coincide),
                )
            )
    drawn = {
        key: row
        for key, row in rows_of_panels.items()
        if any(s.curves or s.finals for p in row for s in p.series)
    }
    if metric not in drawn:
        return [], [*notes, f"{short}: no finished {activation} runs yet."]
    panels = [p for row in drawn.values() for p in row]
    from gfalign import plots

    path = plots.plot_panels(
        panels,
        context.path(spec.name),
        title=f"{short}: {activation} networks, test and training error per epoch",
        columns=len(networks),
    )
    seeds = sorted({line.n for line in every if not line.dashed})
    rows_text = (
        "test error (top row, log scale) and training error (bottom row, linear below 0.01%, "
        "the paper's training criterion, dotted)"
        if len(drawn) > 1
        else "test error (log scale; the runs recorded no training error)"
    )
    caption = (
        f"{short}: {rows_text} per epoch of every {activation} cell, one column per network; "
        f"mean over seeds ({_span(seeds)} per line), band from min to max; baselines dashed. "
    )
    if coincidences:
        caption += "Coinciding series, drawn dotted over wide: " + "; ".join(coincidences) + ". "
    sentence = _final_sentence(every)
    caption += (sentence + " " if sentence else "") + f"{_protocol_text(protocol)}."
    return [Image(path, caption)], notes


def _panels(context: Context, spec: FigureSpec) -> Made:
    experiment = context.experiment
    network = str(spec.options["network"])
    groups_spec = spec.options["panels"]
    metric = experiment.metric
    short = f"{spec.title} ({experiment.name})"
    rows = _cell_rows(_on_dataset(context.rows, spec), lambda c: c.startswith(network + " "))
    protocol, chosen, notes = _choose(rows, short, varied(context.experiment))
    if protocol is None:
        return [], [*notes, f"{short}: no finished {network} runs{_on(spec)} yet."]
    groups = _named_apart(experiment, chosen, spec)
    panels, every, coincidences = [], [], []
    for title, rules in groups_spec.items():
        lines = [
            _Line(label, *_by_seed(members, metric))
            for r in rules
            for label, members in groups.get(f"{network} {r}", [])
        ]
        if not lines:
            continue
        coincide = _separate(lines)
        coincidences += coincide
        every += lines
        _rename(lines)
        panels.append(
            Panel(
                str(title),
                tuple(line.series() for line in lines),
                f"{_LABELS.get(metric, metric)}, log scale",
                note="; ".join(coincide),
            )
        )
    title = f"{short}: {_LABELS.get(metric, metric)} of the {network} network{_on(spec)}"
    caption = (
        f"{short}: {_LABELS.get(metric, metric)} per epoch of the {network} network"
        f"{_on(spec)} per rule, "
        "log scale; mean over the seeds the legend counts, band from min to max. "
    )
    if coincidences:
        caption += "Coinciding series, drawn dotted over wide: " + "; ".join(coincidences) + ". "
    return _panel_image(context, spec, panels, notes, title, caption, every, protocol)


def _screening(context: Context, spec: FigureSpec) -> Made:
    """The final value of the metric against a field the grid varies (``lr``), one line per
    rule and feedback family, one point per seed; a run that diverged is named, not drawn."""
    experiment = context.experiment
    network = str(spec.options["network"])
    field = str(spec.options.get("field", "lr"))
    metric = experiment.metric
    short = f"{spec.title} ({experiment.name})"
    rows = [
        r
        for r in _on_dataset(context.rows, spec)
        if r["status"] in ("finished", "diverged") and cell(config_of(r)).startswith(network + " ")
    ]
    if not rows:
        return [], [f"{short}: no {network} runs yet."]
    ignore = varied(experiment) | {field}
    protocol = main_protocol(rows, ignore)
    rows = [r for r in rows if protocol_key(r, ignore) == protocol]
    by_rule: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_rule.setdefault(rule_of(cell(config_of(row))), []).append(row)
    panels, diverged = [], []
    for title, rules in spec.options["panels"].items():
        lines = []
        for rule in rules:
            points: dict[int, list[tuple[float, float]]] = {}
            for row in by_rule.get(str(rule), []):
                config = config_of(row)
                x = float(field_of(config, field))
                value = row["final"].get(metric) if row["status"] == "finished" else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    points.setdefault(config.seed, []).append((x, float(value)))
                else:
                    diverged.append(f"{rule} at {field} {x:g}")
            curves = tuple(
                (tuple(x for x, _v in sorted(p)), tuple(v for _x, v in sorted(p)))
                for _seed, p in sorted(points.items())
            )
            if curves:
                lines.append(Series(str(rule), curves=curves))
        panels.append(
            Panel(
                str(title),
                tuple(lines),
                f"{_LABELS.get(metric, metric)}, log scale",
                xlabel=field.replace("_", " "),
                xscale="log",
            )
        )
    if not any(p.series for p in panels):
        return [], [f"{short}: no finished {network} runs yet."]
    from gfalign import plots

    label = _LABELS.get(metric, metric)
    path = plots.plot_panels(
        panels, context.path(spec.name), title=f"{short}: {label} after the last epoch"
    )
    caption = (
        f"{short}: {label} after the last epoch against the {field.replace('_', ' ')}, per "
        f"rule, {network}{_on(spec)}; mean over seeds, band from min to max. "
    )
    if diverged:
        caption += "Diverged, so not drawn: " + ", ".join(diverged) + ". "
    caption += f"{_protocol_text(protocol)}."
    return [Image(path, caption)], []


def _study(context: Context, spec: FigureSpec) -> Made:
    """Per addressed cell, its study configurations' curves and the experiment's run dashed."""
    from gfalign.report.studies import changes_from_grid, configurations, studies

    experiment = context.experiment
    short = f"{spec.title} ({experiment.name})"
    found = studies([experiment.name])
    if not found:
        return [], [f"{short}: the preset addresses no published cell."]
    groups = configurations(found[0], context.rows)
    if not groups:
        return [], [f"{short}: no finished runs yet."]
    cells = [c for c in found[0].cells if any((e, n) == c for e, n, _m in groups)]
    rows_of_panels: list[tuple[Panel, Panel]] = []
    every: list[_Line] = []
    coincidences: list[str] = []
    for experiment_name, name in cells:
        mine = [m for e, n, m in groups if (e, n) == (experiment_name, name)]
        drawn = {c.seed for members in mine for c, _row in members}
        theirs = {  # the experiment's planned runs of the cell with the study's seeds
            r["key"]: r  # (whichever experiment ran them: one row per key)
            for r in context.references
            if r["status"] == "finished"
            and cell(config_of(r)) == name
            and config_of(r).seed in drawn
            and not changes_from_grid(experiment_name, name, config_of(r))
        }
        pair = []
        for metric in ("test_error", "train_error"):
            lines = [
                _Line(
                    _study_label(m[0][0], name, experiment_name),
                    *_by_seed([r for _c, r in m], metric),
                )
                for m in mine
            ]
            lines.append(
                _Line(
                    f"{experiment_name} (its preset)",
                    *_by_seed(list(theirs.values()), metric),
                    dashed=True,
                )
            )
            lines = [line for line in lines if line.n]
            coincide = _separate(lines)
            coincidences += [f"{name} ({_LABELS[metric]}): {c}" for c in coincide]
            every += lines
            test = metric == "test_error"
            pair.append(
                Panel(
                    f"{experiment_name}: {name}" + ("" if test else ", training"),
                    tuple(line.series() for line in lines),
                    _LABELS[metric] + (", log" if test else ""),
                    scale="log" if test else "symlog",
                    reference=None if test else (0.01, "0.01%"),
                    note="; ".join(coincide),
                )
            )
        rows_of_panels.append(tuple(pair))
    trained = any(train.series for _test, train in rows_of_panels)
    panels = [p for pair in rows_of_panels for p in (pair if trained else pair[:1])]
    seeds = sorted({line.n for line in every if not line.dashed})
    what = (
        "test error (left, log scale) and training error (right, linear below 0.01%, the "
        "paper's training criterion, dotted)"
        if trained
        else "test error (log scale; the runs recorded no training error)"
    )
    caption = (
        f"{short}: {what} per epoch of each published cell the "
        "study addresses, one line per configuration of the study (named for how it differs "
        f"from the experiment's run), mean over its seeds ({_span(seeds)} per line), band "
        "from min to max; the experiment's own runs of the cell with the same seeds dashed. "
    )
    if coincidences:
        caption += "Coinciding series, drawn dotted over wide: " + "; ".join(coincidences) + ". "
    sentence = _final_sentence(every)
    caption += sentence + " " if sentence else ""
    from gfalign import plots

    path = plots.plot_panels(
        panels,
        context.path(spec.name),
        title=f"{short}: each addressed cell, study against experiment",
        columns=2 if trained else None,
    )
    return [Image(path, caption.strip())], []


def _study_label(config: RunConfig, name: str, experiment_name: str) -> str:
    """What tells a study's configuration apart: the words of its cell name that the
    addressed cell's lacks (``lr=0.003``, ``s3-aux:below-final``), else its changes."""
    from gfalign.report.studies import changes_from_grid

    extra = [w for w in cell(config).split() if w not in name.split()]
    if extra:
        return " ".join(extra)
    short = []
    for change in changes_from_grid(experiment_name, name, config):  # "train.lr: 0.001 → 0.003"
        key, _colon, values = change.partition(": ")
        short.append(f"{key.rsplit('.', 1)[-1]}={values.rpartition(' → ')[2]}")
    return ", ".join(short) or "the study"


def _span(numbers: Sequence[int]) -> str:
    """``"3"`` or ``"1–3"``: the range of seed counts the lines have."""
    if not numbers:
        return "0"
    return str(numbers[0]) if numbers[0] == numbers[-1] else f"{numbers[0]}–{numbers[-1]}"


def _panel_image(context, spec, panels, notes, title, caption, every, protocol) -> Made:
    """The figure of ``panels`` with its caption closed by the final values and the protocol;
    a note instead when no cell has finished runs."""
    if not panels:
        short = title.split(":")[0]
        return [], [*notes, f"{short}: no finished runs of its cells yet."]
    from gfalign import plots

    path = plots.plot_panels(panels, context.path(spec.name), title=title)
    sentence = _final_sentence(every)
    caption += (sentence + " " if sentence else "") + f"{_protocol_text(protocol)}."
    return [Image(path, caption)], notes


def _alignment(context: Context, spec: FigureSpec) -> Made:
    angle = str(spec.options.get("angle", "update"))
    what = {"update": "weight update", "delta": "delta"}[angle]
    return _per_layer(
        context,
        spec,
        f"{angle}_angle_",
        f"Alignment ({context.experiment.name})",
        recorded="alignment angles",
        why="they were trained without `alignment = true` in their configuration, so there is "
        "no alignment figure",
        title=f"angle to the backprop {what}",
        caption=f"angle in degrees between each rule's {what} and the backprop gradient on a "
        "fixed probe batch, per layer",
        panel={
            "ylabel": "angle to backprop (degrees)",
            "scale": "linear",
            "reference": (90.0, "90°: no alignment"),
            "bottom": -4.0,  # bp's line at 0 stays above the axis, not hidden on it
        },
        closing="90° is no alignment. ",
    )


_NORMS = {
    "weight": ("weight norm", "Frobenius norm of each block's weight at the end of the epoch"),
    "update": ("update norm", "Frobenius norm of the change of each block's weight over the epoch"),
    "delta": (
        "delta norm",
        "root-mean-square over a batch of each layer's per-example delta norm, averaged over "
        "the epoch's steps (the last layer's is the output error)",
    ),
}


def _norms(context: Context, spec: FigureSpec) -> Made:
    """Per layer, a norm each epoch recorded (``record_norms``): one line per rule."""
    norm = str(spec.options.get("norm", "weight"))
    label, meaning = _NORMS[norm]
    return _per_layer(
        context,
        spec,
        f"{norm}_norm_",
        f"Norms ({context.experiment.name})",
        recorded="norms",
        why="they were trained without `record_norms = true`, so there is no norm figure",
        title=label,
        caption=meaning,
        panel={"ylabel": f"{label}, log scale"},
    )


def _per_layer(
    context: Context,
    spec: FigureSpec,
    prefix: str,
    short: str,
    *,
    recorded: str,
    why: str,
    title: str,
    caption: str,
    panel: Mapping[str, Any],
    closing: str = "",
) -> Made:
    """One panel per layer of a per-epoch record ``<prefix><layer>`` (alignment angles,
    norms), one line per cell of one network: the figure's ``network``, else the widest."""
    experiment = context.experiment
    rows = [
        r
        for r in _on_dataset(context.rows, spec)
        if r["status"] == "finished"
        and r.get("history")
        and any(k.startswith(prefix) for k in r["history"][-1])
    ]
    if not rows:
        if not any(r["status"] == "finished" for r in _on_dataset(context.rows, spec)):
            return [], [f"{short}{_on(spec)}: no finished runs yet."]
        return [], [f"{short}{_on(spec)}: these runs recorded no {recorded} ({why})."]
    configs = [config_of(r) for r in rows]
    if "network" in spec.options:
        network = str(spec.options["network"])
    else:
        widest = configs[max(range(len(configs)), key=lambda n: (max(configs[n].hidden), -n))]
        network = network_of(widest)
    rows = [r for r, c in zip(rows, configs, strict=True) if network_of(c) == network]
    if not rows:
        return [], [f"{short}: no run of the {network} network recorded {recorded}."]
    place = architecture(config_of(rows[0]))
    rows = [r for r in rows if architecture(config_of(r)) == place]
    protocol, chosen, notes = _choose(rows, short, varied(context.experiment))
    groups = by_cell(chosen)
    cells = cells_of(experiment)
    names = sorted(groups, key=lambda c: cells.index(c) if c in cells else 1 << 20)
    layers = sorted(
        {
            int(k.removeprefix(prefix))
            for r in chosen
            for k in r["history"][-1]
            if k.startswith(prefix) and k.removeprefix(prefix).isdigit()
        }
    )
    panels = []
    blocks = config_of(chosen[0]).model is not None
    for layer in layers:
        lines = [_Line(rule_of(n), *_by_seed(groups[n], f"{prefix}{layer}")) for n in names]
        lines = [line for line in lines if line.curves]
        name = f"block {layer}" if blocks else f"hidden layer {layer}"
        if not blocks and layer == len(config_of(chosen[0]).hidden) + 1:
            name = f"layer {layer} (output)"
        panels.append(Panel(name, tuple(line.series() for line in lines), **panel))
    from gfalign import plots

    path = plots.plot_panels(
        panels, context.path(spec.name), title=f"{short}: {title}, {network}{_on(spec)}"
    )
    seeds = sorted({len(groups[n]) for n in names})
    text = (
        f"{short}, {network}{_on(spec)}: {caption}; mean over seeds ({_span(seeds)} per "
        f"rule), band from min to max; {closing}{_protocol_text(protocol)}."
    )
    return [Image(path, text)], notes


# ---------------------------------------------------------------------------- autoencoders


def _test_digits(config: RunConfig, data_dir: Path | None, cache: dict[str, Any]):
    """The first test example of each class 0..9: (count, 784)."""
    import torch

    from gfalign import data as datasets

    if config.dataset not in cache:
        if config.dataset == "synthetic":
            split = datasets.synthetic(seed=0).test  # as gfalign.runs.load_data draws it
        else:
            split = datasets.load(config.dataset, root=data_dir, quiet=True).test
        picks = [int(torch.nonzero(split.y == c)[0, 0]) for c in range(10) if (split.y == c).any()]
        cache[config.dataset] = split.x[picks]
    return cache[config.dataset]


def _networks(context: Context) -> tuple[dict[tuple, dict[str, Any]], list[str]]:
    """Per autoencoder architecture, per rule: the trained network of one finished run.

    The run of the main protocol with the lowest seed whose directory has a checkpoint.
    """
    from gfalign.runs import CHECKPOINT, RunError, build, load_checkpoint

    key = "networks"
    if key in context.cache:
        return context.cache[key], []
    rows = [r for r in context.rows if r["status"] == "finished"]
    notes: list[str] = []
    out: dict[tuple, dict[str, Any]] = {}
    protocol = main_protocol(rows)
    cells = cells_of(context.experiment)
    groups = by_cell(r for r in rows if protocol_key(r) == protocol)
    for name in sorted(groups, key=lambda c: (cells.index(c) if c in cells else 1 << 20, c)):
        candidates = sorted(groups[name], key=lambda r: r["config"].get("seed", 0))
        for row in candidates:
            directory = (context.runs_dir or Path(".")) / row["key"]
            if not (directory / CHECKPOINT).exists():
                continue
            try:
                checkpoint = load_checkpoint(directory / CHECKPOINT)
                config = RunConfig.from_data(checkpoint["config"])
                net, _rule_engine = build(config)
                net.load_state_dict(checkpoint["net"])
            except (RunError, KeyError, RuntimeError) as problem:
                notes.append(f"{name}: checkpoint in {directory} unusable ({problem}).")
                continue
            out.setdefault(config.sizes, {})[rule_of(name)] = (net, config, row)
            break
        else:
            where = context.runs_dir / candidates[0]["key"] if context.runs_dir else "no runs dir"
            notes.append(f"{name}: no checkpoint found (looked in {where}); row left out.")
    context.cache[key] = out
    return out, notes


def _sizes(sizes: Sequence[int]) -> str:
    return "-".join(map(str, sizes))


def _reconstructions(context: Context, spec: FigureSpec) -> Made:
    from gfalign import plots
    from gfalign.data import DataError

    networks, notes = _networks(context)
    notes = [f"{spec.title}: {n}" for n in notes]
    if not networks:
        return [], [*notes, f"{spec.title}: no finished autoencoder run with a checkpoint yet."]
    blocks: list[Block] = []
    for sizes, rules in networks.items():
        some = next(iter(rules.values()))
        try:
            digits = _test_digits(some[1], context.data_dir, context.cache)
        except (DataError, OSError) as problem:
            notes.append(
                f"{spec.title}: the {some[1].dataset} test images are unavailable: {problem}"
            )
            return blocks, notes
        reconstructions = {
            rule: net.predict(digits.to(config.torch_dtype)).float().numpy()
            for rule, (net, config, _row) in rules.items()
        }
        path = plots.plot_reconstructions(
            digits.float().numpy(),
            reconstructions,
            context.path(f"{spec.name}-{_sizes(sizes)}"),
            title=f"{spec.title}: reconstructions by the {_sizes(sizes)} autoencoder",
        )
        seeds = {r: config.seed for r, (_net, config, _row) in rules.items()}
        which = (
            f"seed {next(iter(seeds.values()))}"
            if len(set(seeds.values())) == 1
            else ", ".join(f"{r} seed {s}" for r, s in seeds.items())
        )
        blocks.append(
            Image(
                path,
                f"{spec.title} ({_sizes(sizes)}): the first test example of each class (top) "
                f"and its reconstruction by each rule's autoencoder ({which}, "
                f"{count(some[1].train.epochs, 'epoch')}).",
            )
        )
    return blocks, notes


def _filters(context: Context, spec: FigureSpec) -> Made:
    from gfalign import plots

    number = int(spec.options.get("count", 36))
    networks, _notes = _networks(context)  # its notes went with the reconstructions
    if not networks:
        return [], [f"{spec.title}: no finished autoencoder run with a checkpoint yet."]
    blocks: list[Block] = []
    for sizes, rules in networks.items():
        panels = {
            rule: net.weight(1).detach()[:number].float().numpy()
            for rule, (net, _config, _row) in rules.items()
        }
        path = plots.plot_filters(
            panels,
            context.path(f"{spec.name}-{_sizes(sizes)}"),
            title=f"{spec.title}: first-layer filters of the {_sizes(sizes)} autoencoder",
        )
        blocks.append(
            Image(
                path,
                f"{spec.title} ({_sizes(sizes)}): the first {min(number, sizes[1])} rows of W1 "
                "as 28x28 tiles, each scaled to its own range, one panel per rule.",
            )
        )
    return blocks, []


@dataclass(frozen=True)
class Kind:
    """A figure kind: the function that draws it and its options."""

    make: Callable[[Context, FigureSpec], Made]
    options: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()


KINDS: dict[str, Kind] = {
    "seeds": Kind(_seeds, frozenset({"network", "baselines"}), frozenset({"network"})),
    "families": Kind(_families, frozenset({"network", "rules"}), frozenset({"network"})),
    "activation": Kind(
        _activation, frozenset({"activation", "baselines"}), frozenset({"activation"})
    ),
    "panels": Kind(
        _panels, frozenset({"network", "panels", "dataset"}), frozenset({"network", "panels"})
    ),
    "reconstructions": Kind(_reconstructions),
    "filters": Kind(_filters, frozenset({"count"})),
    "alignment": Kind(_alignment, frozenset({"network", "angle", "dataset"})),
    "norms": Kind(_norms, frozenset({"network", "norm", "dataset"})),
    "study": Kind(_study),
    "screening": Kind(
        _screening,
        frozenset({"network", "panels", "field", "dataset"}),
        frozenset({"network", "panels"}),
    ),
}
"""Every figure kind a preset may name, by name."""
