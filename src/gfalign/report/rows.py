"""The store's rows as the report groups them: by cell, by protocol, finished or not.

A row is a dict from ``gfalign.store.Store.list``: ``key``, ``experiment``, ``config`` (plain
``RunConfig`` data), ``status``, ``final`` (the last epoch's record), ``history`` (every
epoch's record, empty for runs imported from a CSV export), ``seconds``, ``versions``.

    >>> protocol_key({"config": {"dataset": "mnist", "train": {"epochs": 100}}})[:2]
    ('mnist', 100)
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import Experiment, cell, load, network

__all__ = [
    "architecture",
    "by_cell",
    "cells_of",
    "config_of",
    "count",
    "done",
    "finished",
    "main_protocol",
    "points_of",
    "preset",
    "protocol",
    "protocol_key",
    "rule_of",
    "series",
]

Row = Mapping[str, Any]


def count(n: int, word: str) -> str:
    """``count(1, "seed")`` is ``"1 seed"``, ``count(3, "seed")`` is ``"3 seeds"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def architecture(config: RunConfig) -> tuple:
    """What makes two runs' networks and tasks alike: dataset, objective and network (an MLP's
    widths and activation, or a block model's name)."""
    return (config.dataset, config.objective, network(config))


def protocol(config: Mapping[str, Any]) -> tuple[int, int | None, int | None]:
    """(epochs, training subset, test subset) of a row's stored configuration."""
    train = config.get("train", {})
    return int(train.get("epochs", 100)), config.get("train_subset"), config.get("test_subset")


_PROTOCOL_FIELDS = ("dataset", "epochs", "batch_size", "lr", "optimizer", "reduction")


def protocol_key(row: Row, ignore: Iterable[str] = ()) -> tuple:
    """Everything of a row's protocol that makes two runs' curves comparable: dataset,
    epochs, batch size, learning rate, optimizer, reduction and subsets. The fields named in
    ``ignore`` (those an experiment's grid varies, which its cell names show) are left out."""
    config = row["config"]
    train = config.get("train", {})
    key = (
        config.get("dataset"),
        int(train.get("epochs", 100)),
        train.get("batch_size"),
        train.get("lr"),
        train.get("optimizer"),
        train.get("reduction"),
        config.get("train_subset") or math.inf,
        config.get("test_subset") or math.inf,
    )
    ignore = set(ignore)
    return tuple(
        None if n < len(_PROTOCOL_FIELDS) and _PROTOCOL_FIELDS[n] in ignore else value
        for n, value in enumerate(key)
    )


def main_protocol(rows: Sequence[Row], ignore: Iterable[str] = ()) -> tuple | None:
    """The protocol with the most epochs, then the most data, then the most runs."""
    ignore = tuple(ignore)
    counts: dict[tuple, int] = {}
    for row in rows:
        key = protocol_key(row, ignore)
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda k: (k[1], k[6], k[7], counts[k]))


def varied(experiment: Experiment) -> frozenset[str]:
    """The protocol fields the experiment's grid varies (``lr`` in a screening)."""
    return frozenset(k for table in experiment.tables for k in table) & set(_PROTOCOL_FIELDS)


def done(rows: Iterable[Row]) -> list[Row]:
    """The rows that ended: finished or diverged."""
    return [r for r in rows if r["status"] in ("finished", "diverged")]


def finished(rows: Iterable[Row]) -> list[Row]:
    """The finished rows that have a per-epoch history."""
    return [r for r in rows if r["status"] == "finished" and r.get("history")]


def by_cell(rows: Iterable[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(cell(config_of(row)), []).append(row)
    return out


def rule_of(name: str) -> str:
    """The cell without its architecture: ``"2x800 tanh dfa B3"`` -> ``"dfa B3"`` (an MLP's
    widths and activation), ``"lenet5 fa xavier"`` -> ``"fa xavier"`` (a model's name).

    >>> rule_of("784-500-10 relu s1"), rule_of("lenet5 fa xavier")
    ('s1', 'fa xavier')
    """
    words = 2 if re.fullmatch(r"\d+(x\d+|(-\d+)+)", name.split(" ", 1)[0]) else 1
    parts = name.split(" ", words)
    return parts[words] if len(parts) == words + 1 else name


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over a history, non-finite and missing values left out."""
    epochs, values = [], []
    for position, record in enumerate(history, start=1):
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if not math.isfinite(float(value)):
            continue
        epochs.append(float(record.get("epoch", position)))
        values.append(float(value))
    return epochs, values


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> RunConfig:
    return RunConfig.from_data(json.loads(text))


def config_of(row: Row) -> RunConfig:
    """A row's stored configuration as a ``RunConfig`` (parsed once per distinct one)."""
    return _parsed(json.dumps(row["config"], sort_keys=True))


@functools.lru_cache(maxsize=64)
def preset(name: str) -> Experiment:
    """The experiment preset ``name``, loaded once (``gfalign.experiments.load``)."""
    return load(name)


def points_of(experiment: Experiment) -> list[RunConfig]:
    """The grid's runs at the first seed, in grid order (``Experiment.points`` without
    building them again)."""
    first = experiment.seeds[0] if experiment.seeds else 0
    return [c for c in experiment.configs if c.seed == first]


def experiment_rows(store, experiment: Experiment) -> list[dict[str, Any]]:
    """The store's rows of ``experiment``: those it ran, and those of its planned
    configurations that another experiment ran first (a screening shares the runs of the
    experiment it screens: the store keeps one row per configuration)."""
    own = store.list(experiment.name)
    ran = {r["key"] for r in own}
    planned = dict.fromkeys(c.key() for c in experiment.configs)
    return own + [row for key in planned if key not in ran and (row := store.get(key))]


def planned_protocol(experiment: Experiment) -> Callable[[str], tuple]:
    """A cell's planned (epochs, training subset), by its name: the grid's where it varies them
    (a budget screening), else the base's."""
    base = (experiment.base.train.epochs, experiment.base.train_subset)
    cells = {experiment.cell(c): (c.train.epochs, c.train_subset) for c in points_of(experiment)}
    return lambda name: cells.get(name, base)


def cells_of(experiment: Experiment) -> list[str]:
    """The cell names in grid order (``Experiment.cells``, from the configurations built)."""
    return list(dict.fromkeys(experiment.cell(c) for c in experiment.configs))
