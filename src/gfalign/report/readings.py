"""Readings of the protocol: one change applied to every cell it concerns, judged by one count.

A reading is a preset named ``reading-*.toml`` (``gfalign.experiments`` describes its keys):
the cells of the paper's experiments it reads and one change of protocol that every run of them
takes. It is judged as a whole: the number of its published cells within 0.20 of the paper
under the reading against the number under the paper's protocol, over the same cells. It is
*judged* once every published cell it reads has its planned seeds (3); before that it is a
screening, whose counts cover only the cells run so far, or pending, with its planned runs.

A judged reading whose count beats the protocol's explains the cells it brings within 0.20
(the report marks them ``explained by <reading>``); the cells it takes out of 0.20 are named
beside them. No other configuration explains a cell: a study's setting chosen for one cell
appears on the study's page only.

    >>> reading = Reading("reading-x", "", "", "", "lr = 0.01", None, (("exp1", "c"),), (0,), None)
    >>> Judgement(reading, ()).status, reading.planned
    ('pending', 1)
"""

from __future__ import annotations

import json
import statistics as stdlib_statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gfalign.experiments import Experiment, from_data, reading_cells
from gfalign.report.render import Table
from gfalign.report.rows import config_of, count, series
from gfalign.report.studies import addressed_cell, preset_data, preset_names
from gfalign.report.tables import PENDING, TOLERANCE, UNEXPLAINED, WITHIN, Statistics, describe
from gfalign.rules import ConfigError, render

__all__ = [
    "CellReading",
    "Judgement",
    "Reading",
    "explain",
    "judge",
    "readings",
    "readings_table",
    "reading_table",
]

TRAINED = 0.01
"""The paper's training error at the end of training: below 0.01%."""


@dataclass(frozen=True)
class Reading:
    """A reading preset.

    Attributes:
        name: the preset's name (``reading-...``).
        description, question, cost: as the preset states them.
        change: the change, as ``key = value`` text.
        needs: what the engine lacks to train it (``None``: nothing).
        cells: the (experiment, cell) pairs it reads, in grid order.
        seeds: its planned seeds.
        experiment: the preset as an ``Experiment``, or None when it cannot be built
            (``problem`` says why: ``needs``, or a refused preset).
    """

    name: str
    description: str
    question: str
    cost: str
    change: str
    needs: str | None
    cells: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    experiment: Experiment | None
    problem: str | None = None

    @property
    def planned(self) -> int:
        """Runs planned: every cell read, times its seeds."""
        return len(self.cells) * len(self.seeds)


def _reading(name: str, data: Mapping[str, Any]) -> Reading:
    cells = tuple(reading_cells(name, data))
    change = data.get("change") or {}
    text = ", ".join(f"{k} = {render(v)}" for k, v in change.items())
    seeds = tuple(int(s) for s in (data.get("protocol") or {}).get("seeds", [0]))
    experiment, problem = None, None
    try:
        experiment = from_data(name, data)
    except ConfigError as error:
        problem = str(error)
    needs = data.get("needs")
    return Reading(
        name,
        str(data.get("description", "")),
        str(data.get("question", "")),
        str(data.get("cost", "")),
        text,
        str(needs) if needs else None,
        cells,
        seeds,
        experiment,
        problem,
    )


def readings(names: Iterable[str] | None = None) -> list[Reading]:
    """The presets among ``names`` (default: every preset file) that read cells (``reads``)."""
    out = []
    for name in preset_names() if names is None else names:
        data = preset_data(name)
        if "reads" in data:
            out.append(_reading(name, data))
    return out


@dataclass(frozen=True)
class CellReading:
    """One cell a reading reads: the paper, the protocol's runs and the reading's.

    Attributes:
        experiment, cell: the cell, as its experiment names it.
        paper: the published value (None for a cell the paper has none for).
        protocol: our value under the experiment's own protocol (None: no run).
        reading: our value under the reading (None: no run yet).
        train: the reading's mean final training error (None without runs or records).
        trained: per seed of the reading, the first epoch whose training error is below 0.01%
            (None: never, or no history).
    """

    experiment: str
    cell: str
    paper: float | None
    protocol: Statistics | None
    reading: Statistics | None
    train: float | None = None
    trained: tuple[float | None, ...] = ()

    @staticmethod
    def _within(stats: Statistics | None, paper: float | None) -> bool | None:
        if stats is None or paper is None:
            return None
        return abs(stats.mean - paper) <= TOLERANCE + 1e-9

    @property
    def protocol_within(self) -> bool | None:
        return self._within(self.protocol, self.paper)

    @property
    def reading_within(self) -> bool | None:
        return self._within(self.reading, self.paper)


@dataclass(frozen=True)
class Judgement:
    """A reading's cells and its count against the protocol's."""

    reading: Reading
    cells: tuple[CellReading, ...]

    @property
    def published(self) -> tuple[CellReading, ...]:
        return tuple(c for c in self.cells if c.paper is not None)

    @property
    def run(self) -> tuple[CellReading, ...]:
        """The published cells with runs under both the reading and the protocol."""
        return tuple(c for c in self.published if c.reading is not None and c.protocol)

    @property
    def finished(self) -> int:
        return sum(c.reading.n for c in self.cells if c.reading is not None)

    @property
    def status(self) -> str:
        """``judged`` (every published cell with its planned seeds, under both), ``screening``
        (some runs), ``pending`` (none) or ``needs`` (the engine cannot train it)."""
        if self.reading.experiment is None:
            return "needs" if self.reading.needs else "pending"
        seeds = len(self.reading.seeds)
        if self.published and all(
            c.reading is not None and c.reading.n >= seeds and c.protocol is not None
            for c in self.published
        ):
            return "judged"
        return "screening" if self.finished else "pending"

    @property
    def protocol_count(self) -> int:
        """Cells within 0.20 under the paper's protocol, of ``run``."""
        return sum(bool(c.protocol_within) for c in self.run)

    @property
    def reading_count(self) -> int:
        """Cells within 0.20 under the reading, of ``run``."""
        return sum(bool(c.reading_within) for c in self.run)

    @property
    def helped(self) -> tuple[CellReading, ...]:
        """Cells the reading brings within 0.20 that the protocol leaves outside."""
        return tuple(c for c in self.run if c.reading_within and not c.protocol_within)

    @property
    def hurt(self) -> tuple[CellReading, ...]:
        """Cells the protocol has within 0.20 that the reading takes outside."""
        return tuple(c for c in self.run if c.protocol_within and not c.reading_within)

    @property
    def better(self) -> bool:
        """Judged, with more cells within 0.20 than the protocol's over the same cells."""
        return self.status == "judged" and self.reading_count > self.protocol_count

    def sentence(self) -> str:
        """The judgement in one sentence, from its counts."""
        reading = self.reading
        if self.status == "needs":
            return (
                f"Not trained: it needs {reading.needs}. Planned: "
                f"{count(reading.planned, 'run')} ({count(len(reading.cells), 'cell')} × "
                f"{count(len(reading.seeds), 'seed')})."
            )
        if self.status == "pending":
            return f"Pending: 0 of {count(reading.planned, 'planned run')} finished."
        helped, hurt = len(self.helped), len(self.hurt)
        counts = (
            f"{self.reading_count} of the {count(len(self.run), 'published cell')} run land "
            f"within {TOLERANCE:.2f} under the reading, against {self.protocol_count} under the "
            f"paper's protocol; it brings {helped} within and takes {hurt} out"
        )
        if self.status == "screening":
            seeds = sorted({c.reading.n for c in self.run if c.reading is not None})
            shown = count(seeds[-1], "seed") if seeds else "no seed"
            if len(seeds) > 1:
                shown = f"{seeds[0]}–{seeds[-1]} seeds"
            return (
                f"Screening ({self.finished} of {reading.planned} planned runs finished; "
                f"{len(self.run)} of {len(self.published)} published cells run, {shown} "
                f"each), not judged: {counts}."
            )
        verdict = (
            "it explains the cells it brings within"
            if self.better
            else "no more than the protocol's: it explains none"
        )
        mixed = " It helps some cells and hurts others." if helped and hurt else ""
        return f"Judged on every cell read: {counts}; {verdict}.{mixed}"


def _protocol_stats(row: Mapping[str, Any]) -> Statistics | None:
    if row.get("mean") is None:
        return None
    return Statistics(row["n"], row["mean"], row["std"], row["ci"], row["p"])


def judge(
    reading: Reading,
    rows: Iterable[Mapping[str, Any]],
    summaries: Mapping[str, Sequence[Mapping[str, Any]]],
) -> Judgement:
    """The reading's cells, from its finished runs (``rows``: the store's rows of its planned
    configurations, any seed) and the experiments' summaries
    (``gfalign.report.tables.summarize``, by experiment name)."""
    experiment = reading.experiment
    by_cell: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    if experiment is not None:
        planned = {}
        for point in experiment.points():
            planned[_apart_from_seed(point)] = addressed_cell(point)
        experiments_of = {c: e for e, c in reading.cells}
        for row in rows:
            if row["status"] != "finished" or row["final"].get("test_error") is None:
                continue
            name = planned.get(_apart_from_seed(config_of(row)))
            if name is not None and name in experiments_of:
                by_cell.setdefault((experiments_of[name], name), []).append(row)
    out = []
    for experiment_name, name in reading.cells:
        mine = sorted(by_cell.get((experiment_name, name), []), key=lambda r: config_of(r).seed)
        protocol_row = next(
            (
                r
                for r in summaries.get(experiment_name, ())
                if r["cell"] == name and not r["baseline"] and r["verdict"] is not None
            ),
            None,
        )
        paper = None if protocol_row is None else protocol_row["paper"]
        protocol = None if protocol_row is None else _protocol_stats(protocol_row)
        stats, train, trained = None, None, ()
        if mine:
            stats = describe([float(r["final"]["test_error"]) for r in mine], paper)
            trains = [r["final"].get("train_error") for r in mine]
            if all(isinstance(t, (int, float)) for t in trains):
                train = stdlib_statistics.fmean(trains)
            trained = tuple(_trained_epoch(r.get("history") or ()) for r in mine)
        out.append(CellReading(experiment_name, name, paper, protocol, stats, train, trained))
    return Judgement(reading, tuple(out))


def _apart_from_seed(config) -> str:
    data = config.to_data()
    data.pop("seed", None)
    return json.dumps(data, sort_keys=True, default=str)


def _trained_epoch(history: Sequence[Mapping[str, Any]]) -> float | None:
    epochs, values = series(history, "train_error")
    return next((e for e, v in zip(epochs, values, strict=True) if v < TRAINED), None)


def explain(
    experiment: Experiment, summary: list[dict[str, Any]], judgements: Iterable[Judgement]
) -> list[dict[str, Any]]:
    """Mark the summary's unexplained cells that a judged reading, better than the protocol
    on its whole count, brings within 0.20: sets ``explained_by`` (sorted reading names) on
    those rows, in place; returns ``summary``."""
    explaining: dict[str, set[str]] = {}
    for judgement in judgements:
        if not judgement.better:
            continue
        for c in judgement.helped:
            if c.experiment == experiment.name:
                explaining.setdefault(c.cell, set()).add(judgement.reading.name)
    for row in summary:
        if row.get("verdict") == UNEXPLAINED and not row["baseline"] and row["cell"] in explaining:
            row["explained_by"] = sorted(explaining[row["cell"]])
    return summary


def _number(value: float) -> str:
    return f"{value:.2f}"


def _spread(stats: Statistics | None) -> str:
    if stats is None:
        return PENDING
    if stats.n == 1:
        return _number(stats.mean)
    return f"{_number(stats.mean)} ± {_number(stats.std)}"


def _yes(value: bool | None) -> str:
    return PENDING if value is None else ("yes" if value else "no")


def readings_table(judgements: Sequence[Judgement]) -> Table:
    """The index's table: one row per reading, its counts against the protocol's."""
    rows = []
    for j in judgements:
        r = j.reading
        shown = j.status in ("judged", "screening")
        rows.append(
            (
                f"[{r.name}]({r.name}.md)",
                r.change,
                str(len(j.published)),
                f"{j.finished} / {r.planned}",
                str(len(j.run)) if shown else "0",
                str(j.protocol_count) if shown else PENDING,
                str(j.reading_count) if shown else PENDING,
                str(len(j.helped)) if shown else PENDING,
                str(len(j.hurt)) if shown else PENDING,
                {"needs": "needs an engine option"}.get(j.status, j.status),
            )
        )
    header = (
        "reading",
        "change",
        "published cells read",
        "runs finished / planned",
        "cells run",
        f"{WITHIN}: paper's protocol",
        f"{WITHIN}: reading",
        "brought within",
        "taken out",
        "status",
    )
    numeric = (False, False, True, True, True, True, True, True, True, False)
    return Table(header, tuple(rows), numeric)


def reading_table(judgement: Judgement) -> Table:
    """A reading's page table: every cell read, the protocol's value beside the reading's."""
    rows = []
    for c in judgement.cells:
        stats = c.reading
        trained = ", ".join(PENDING if e is None else str(int(e)) for e in c.trained)
        rows.append(
            (
                f"[{c.experiment}]({c.experiment}.md): {c.cell}",
                PENDING if c.paper is None else f"{c.paper:.2f}",
                _spread(c.protocol),
                str(0 if c.protocol is None else c.protocol.n),
                _yes(c.protocol_within),
                _spread(stats),
                str(0 if stats is None else stats.n),
                PENDING if stats is None or c.paper is None else f"{stats.mean - c.paper:+.2f}",
                PENDING if stats is None or stats.ci is None else "–".join(map(_number, stats.ci)),
                _yes(c.reading_within),
                PENDING if c.train is None else _number(c.train),
                trained or PENDING,
            )
        )
    header = (
        "cell",
        "paper",
        "protocol (mean ± std)",
        "seeds",
        f"{WITHIN}",
        "reading (mean ± std)",
        "seeds",
        "difference",
        "95% CI",
        f"{WITHIN}",
        "train error (mean)",
        "train < 0.01% from epoch",
    )
    numeric = tuple(n not in (0,) for n in range(len(header)))
    return Table(header, tuple(rows), numeric)


def best(judgements: Sequence[Judgement]) -> Judgement | None:
    """The judged reading with the most cells within 0.20 over the protocol's (ties: the
    first), or None when none is judged."""
    judged = [j for j in judgements if j.status == "judged"]
    if not judged:
        return None
    return max(judged, key=lambda j: j.reading_count - j.protocol_count)
