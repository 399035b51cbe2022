"""The paper's experiments as data: one TOML preset per experiment (DESIGN.md section 6).

A preset holds a description, the training protocol (epochs, batch size, learning rate,
optimizer, reduction, seeds), a ``[base]`` ``RunConfig`` table, a ``[grid]`` of lists whose
product gives the runs, and the ``[paper]``'s published values keyed by table cell
(``"2x800 tanh s1"``), so a report prints ours beside them.

    >>> experiment = load("exp1")
    >>> len(experiment.expand(seeds=1))
    27
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from gfalign.config import RunConfig
from gfalign.rules import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["EXPERIMENTS", "PAPER", "Experiment", "cell", "load", "from_data"]

PAPER: tuple[str, ...] = ("exp1", "exp2", "exp3", "exp4", "baselines")
"""The paper's experiments (and the baselines that judge them): what ``all`` means."""
EXPERIMENTS: tuple[str, ...] = (*PAPER, "fashion")
"""Every preset: the paper's, and ``fashion`` (the 2x800 tanh grid on Fashion-MNIST)."""

_PROTOCOL_TRAIN = ("epochs", "batch_size", "lr", "optimizer", "reduction")


def cell(config: RunConfig) -> str:
    """The table cell a run belongs to: ``"2x800 tanh s1"``, ``"2x800 tanh dfa B3"``, or for a
    model of blocks ``"lenet5 s1"``."""
    widths = config.hidden
    shape = f"{len(widths)}x{widths[0]}" if len(set(widths)) == 1 else "-".join(map(str, widths))
    network = f"{shape} {config.activation}" if config.model is None else config.model_spec().name
    text = f"{network} {config.rule_name}"
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
        grid: field name -> values; the runs are the product, in this order.
        seeds: the protocol's seeds.
        configs: every run, grid x seeds (seed innermost).
        paper: published values by cell name.
        metric: the summary metric compared with the paper (``test_error``).
    """

    name: str
    description: str
    base: RunConfig
    grid: Mapping[str, tuple[Any, ...]]
    seeds: tuple[int, ...]
    configs: tuple[RunConfig, ...]
    paper: Mapping[str, float] = field(default_factory=dict)
    metric: str = "test_error"

    def cell(self, config: RunConfig) -> str:
        return cell(config)

    def points(self, base: RunConfig | None = None) -> list[RunConfig]:
        """The grid's runs (seed of ``base``), in grid order."""
        base = self.base if base is None else base
        names = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[n] for n in names)):
            changes = {
                n: (list(v) if isinstance(v, tuple) else v)
                for n, v in zip(names, values, strict=True)
            }
            out.append(base.override(**changes))
        return out

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
        return list(dict.fromkeys(cell(c) for c in self.points()))


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
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"experiment {name}: unknown key(s) {sorted(unknown)}")
    protocol = dict(data.get("protocol", {}))
    seeds = tuple(int(s) for s in protocol.pop("seeds", [0]))
    base_data = dict(data.get("base", {}))
    train = dict(base_data.pop("train", {}) or {})
    for key in _PROTOCOL_TRAIN:
        if key in protocol:
            train[key] = protocol.pop(key)
    if protocol:
        raise ConfigError(f"experiment {name}: unknown [protocol] key(s) {sorted(protocol)}")
    base_data["train"] = train
    base = RunConfig.from_data(base_data)
    grid = {str(k): tuple(_tuple(v) for v in values) for k, values in data.get("grid", {}).items()}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"experiment {name}: [grid] {key} is empty")
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
    experiment = Experiment(
        partial.name, partial.description, base, grid, seeds, configs, paper, partial.metric
    )
    stray = set(paper) - set(experiment.cells())
    if stray:
        raise ConfigError(f"experiment {name}: [paper] cells not in the grid: {sorted(stray)}")
    return experiment


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load(name: str) -> Experiment:
    """The preset ``name`` (one of ``EXPERIMENTS``)."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    text = resources.files(__name__).joinpath("presets", f"{name}.toml").read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as problem:
        raise ConfigError(f"experiment preset {name}: not valid TOML: {problem}") from None
    return from_data(name, data)


def load_all(names: Iterable[str] = PAPER) -> list[Experiment]:
    return [load(n) for n in names]
