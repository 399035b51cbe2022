"""Hyperparameter search on the validation split, on Optuna (``gfalign tune``).

A study is a TOML file: a base run (the format ``gfalign train --config`` reads, inline as
``[base]`` or a file named by ``base = "run.toml"``), a search space over any of its fields,
how many trials to finish and how many epochs each trains::

    name = "dfa-2x800"          # the study's name in its storage (default: the file's stem)
    trials = 40                 # trials to finish: completed, pruned or diverged
    epochs = 20                 # epochs of every trial (replaces [base.train] epochs)
    seed = 0                    # seeds the sampler: trial k draws from (seed, k)
    sampler = "tpe"             # or "random"

    [base]
    dataset = "mnist"
    validation = 10000          # required: the objective is the validation error
    hidden = [800, 800]
    rule = "dfa"

    [space]
    "train.lr" = {low = 1e-4, high = 1e-1, log = true}
    "train.batch_size" = {low = 16, high = 128, step = 16}
    "train.optimizer" = ["sgd", "adam"]
    "rule.layers.1.combine" = [[0.5, 0.5], [0.8, 0.2]]

    [pruner]
    kind = "median"             # or "none"
    startup_trials = 5          # completed trials before any is pruned
    warmup_epochs = 0           # epochs of every trial before it may be pruned

    [final]
    seeds = 5                   # the final runs of the best trial: seeds 0..4 (or a list)
    epochs = 60                 # and their length (default: the trials' epochs)

A study states what it is run to show beside its search, in an ``[expected]`` table written
before it runs (the report prints it beside the runs, ``gfalign.report.beyond``)::

    [expected]
    goal = {error = 1.60, on = "MNIST"}   # the mean test error its family's best is to reach
    [[expected.published]]                # a published number it is set beside
    value = 1.45
    source = "Nøkland 2016"
    what = "DFA with dropout on this network"

A study file that holds ``search = "other.toml"`` (and only a name, a description, an
[expected] and a [final] table besides) searches nothing: its final runs train the best trial
of that study's search again with its own [final] epochs or seeds, recorded under its own name;
that study's directory is found beside its own (``results/tune/s1-60`` ->
``results/tune/s1``), or by ``--storage``. Screening short and training the chosen
configuration longer is then one more file, not a second search.

A space key is a dotted path into the run's configuration as ``RunConfig.to_data`` writes it
(``"train.lr"``, ``"activation"``, ``"feedback.density"``, ``"rule.layers.1.combine"``), so a
field added to ``RunConfig`` later can be searched without a change here. Its value is a list of
choices, or a range ``{low, high}`` with ``log = true`` or a ``step`` (integers when ``low`` and
``high`` are). Every trial trains ``epochs`` epochs of the base with the trial's values, and
reports the validation error of every epoch to Optuna (``trial.report``), so a pruner can stop
a trial that is worse than the median at the same epoch. Its objective is the validation error
of its last epoch, or of its best epoch when the base keeps the best (``keep_best`` or
``early_stopping``). The test split is never evaluated during a study (``evaluate_test =
false``): ``final`` trains the best trial's configuration on several seeds and measures the
test set once per run, recording the runs in a results store like every other run.

Trials live in an Optuna storage: by default an SQLite file ``study.db`` in the study's
directory (``<study>.tune/`` beside the TOML file), so a killed study continues where it
stopped; a database URL (``postgresql://...``) shares one study between machines. A trial
whose process died is found by its owner's lock (an operating-system file lock in the study's
directory, released the moment its process exits, however it exits) or, from another machine,
by Optuna's heartbeat; it is marked failed and not counted, and its values are tried again,
once, as a new trial (as are those of a trial stopped by Ctrl-C), so a killed search ends with
the trials and the best of one never killed. A trial is seeded by the trials drawn before it,
retries left out, so the values drawn after a retry are those a search never killed draws.

Example:
    >>> study = from_data(
    ...     {"trials": 2, "epochs": 1, "base": {"dataset": "synthetic", "validation": 100},
    ...      "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}},
    ...     name="demo",
    ... )
    >>> study.config_for({"train.lr": 0.001}).train.lr
    0.001
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import os
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gfalign.config import RunConfig, load_toml, resolve_device
from gfalign.rules import ConfigError, Limit, check_fields, render
from gfalign.train import EPOCHS_MAX, DivergenceError, Trainer

if TYPE_CHECKING:
    import optuna

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Dimension",
    "Expected",
    "Goal",
    "Published",
    "Study",
    "counted",
    "expected",
    "final",
    "from_data",
    "load",
    "open_study",
    "plot",
    "require_search",
    "retries",
    "run",
    "storage_url",
    "summarize",
    "trial_seed",
    "write_json",
]

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
OWNERS = ".owners"
"""The folder of a study's directory where each searching process holds its lock."""
EXPERIMENT_PREFIX = "tune:"
"""Final runs are recorded in the results store under the experiment ``tune:<study name>``."""

# Keys a study's space may not search: the study sets them itself.
_RESERVED = {
    "train.epochs": "every trial trains the study's `epochs`",
    "train.evaluate_test": "a study never evaluates the test set",
    "device": "the device does not change the numbers; use --device",
}
_TOP = ("name", "description", "trials", "epochs", "seed", "sampler", "base", "space", "search")
# What a study taking another's search (``search = "other.toml"``) may set: its final runs and
# what they are expected to show.
_DERIVED = ("name", "description", "search", "final", "expected")
_TABLES = ("pruner", "final", "expected")
_SCALARS = (int, float, str, bool)


def _install_hint() -> ConfigError:
    return ConfigError("gfalign tune needs Optuna: pip install optuna")


def _optuna():
    try:
        import optuna
    except ImportError:  # pragma: no cover - a dependency of gfalign
        raise _install_hint() from None
    return optuna


# ------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class Dimension:
    """One searched field: a path into the run's configuration and the values it may take.

    Attributes:
        path: dotted path into ``RunConfig.to_data()`` (``"train.lr"``).
        kind: ``float``, ``int`` (a range) or ``choice``.
        low, high: the range's bounds (inclusive).
        log: sample the range on a log scale.
        step: the range's step (``None``: continuous floats, or 1 for integers).
        choices: a choice's values, any TOML values (lists and tables too).

    Example:
        >>> Dimension.parse("train.optimizer", ["sgd", "adam"]).choices
        ('sgd', 'adam')
    """

    path: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, path: str, value: Any) -> Dimension:
        """Read one ``[space]`` entry: a list of choices, or ``{low, high, log, step}``.

        Raises:
            ConfigError: naming the key, what is wrong and what is allowed.
        """
        where = f"[space] {json.dumps(path)} = {render(value)}"
        if not path or any(not part for part in path.split(".")):
            raise ConfigError(f'{where}: not a dotted path; allowed: a path like "train.lr"')
        if path in _RESERVED:
            raise ConfigError(f"{where}: not searchable ({_RESERVED[path]})")
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}: no choices; allowed: a list of at least one value")
            return cls(path, "choice", choices=tuple(value))
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: neither choices nor a range; allowed: a list of choices, or a "
                "range {low = 1e-4, high = 0.1, log = true} (or with step = N)"
            )
        unknown = sorted(set(value) - {"low", "high", "log", "step"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: low, high, log, step")
        low, high = value.get("low"), value.get("high")
        log, step = value.get("log", False), value.get("step")

        def number(entry: Any) -> bool:
            return isinstance(entry, (int, float)) and not isinstance(entry, bool)

        if not number(low) or not number(high) or not math.isfinite(low + high):
            raise ConfigError(f"{where}: low and high must be finite numbers; allowed: both given")
        if not low < high:
            raise ConfigError(f"{where}: low must be below high")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log = {render(log)}; allowed: true or false")
        if step is not None and (not number(step) or not step > 0):
            raise ConfigError(f"{where}: step = {render(step)}; allowed: a number > 0")
        if log and step is not None:
            raise ConfigError(f"{where}: log and step exclude each other; allowed: one of them")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
        integer = all(isinstance(v, int) for v in (low, high)) and (
            step is None or isinstance(step, int)
        )
        return cls(path, "int" if integer else "float", low, high, log, step)

    @property
    def labels(self) -> list[Any]:
        """What Optuna stores for each choice: the value itself when every choice is a
        number, string or boolean, else each choice's JSON text."""
        if all(isinstance(choice, _SCALARS) for choice in self.choices):
            return list(self.choices)
        return [json.dumps(choice, sort_keys=True) for choice in self.choices]

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value of this field (drawn by the study's sampler)."""
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.path, self.labels))
        if self.kind == "int":
            return trial.suggest_int(
                self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def decode(self, stored: Any) -> Any:
        """The value of a stored Optuna parameter (a choice's label back to the choice)."""
        if self.kind != "choice":
            return stored
        return self.choices[self.labels.index(stored)]

    def extremes(self) -> list[Any]:
        """Values that every configuration of the space must accept: the bounds, or every
        choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def to_data(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"path": self.path, "choices": list(self.choices)}
        return {
            "path": self.path,
            "kind": self.kind,
            "low": self.low,
            "high": self.high,
            "log": self.log,
            "step": self.step,
        }


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for the path ``a.b.c``, creating missing tables."""
    parts = path.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            above = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"[space] {json.dumps(path)}: {above} is {render(child)}, not a table; "
                f"allowed: write {above} as a table in the base run"
            )
        node = child
    node[parts[-1]] = value


# ------------------------------------------------------------------------------ the study


@dataclass(frozen=True)
class _Settings:
    """A study's scalar settings, checked by type and range like every configuration."""

    trials: int = 20
    epochs: int = 10
    seed: int = 0
    sampler: str = "tpe"
    pruner: str = "median"
    startup_trials: int = 5
    warmup_epochs: int = 0
    final_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    final_epochs: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, _SETTING_LIMITS)


_SETTING_LIMITS = {
    "trials": Limit(minimum=1),
    "epochs": Limit(minimum=1, maximum=EPOCHS_MAX),
    "seed": Limit(minimum=0),
    "sampler": Limit(choices=SAMPLERS),
    "pruner": Limit(choices=PRUNERS),
    "startup_trials": Limit(minimum=0),
    "warmup_epochs": Limit(minimum=0),
    "final_seeds": Limit(minimum=0, example="5 or [0, 1, 2, 3, 4]"),
    "final_epochs": Limit(minimum=1, maximum=EPOCHS_MAX, absent="the study's epochs"),
}


@dataclass(frozen=True)
class Goal:
    """The mean test error (%) a study's final runs are to reach, at or below.

    Attributes:
        error: the level, in percent.
        on: the dataset as the report names it (``"MNIST"``).
    """

    error: float
    on: str = ""

    def __post_init__(self) -> None:
        check_fields(self, {"error": Limit(above=0, maximum=100)}, "[expected.goal] ")


@dataclass(frozen=True)
class Published:
    """A published number a study's final runs are set beside.

    Attributes:
        value: the published test error (%).
        source: who published it (``"Nøkland 2016"``).
        what: what it measures (``"DFA with dropout on this network"``).
    """

    value: float
    source: str
    what: str = ""

    def __post_init__(self) -> None:
        check_fields(self, {"value": Limit(minimum=0, maximum=100)}, "[[expected.published]] ")


@dataclass(frozen=True)
class Expected:
    """What a study is run to show, written in its file before it runs (``[expected]``).

    Attributes:
        goal: the level its final runs are to reach, or None.
        published: the published numbers its final runs are set beside.

    Example:
        >>> expected({"goal": {"error": 1.6, "on": "MNIST"}}).goal
        Goal(error=1.6, on='MNIST')
    """

    goal: Goal | None = None
    published: tuple[Published, ...] = ()

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.goal is not None:
            out["goal"] = {"error": self.goal.error, "on": self.goal.on}
        if self.published:
            out["published"] = [
                {"value": p.value, "source": p.source, "what": p.what} for p in self.published
            ]
        return out


def expected(data: Any) -> Expected:
    """The ``[expected]`` table of a study file.

    Raises:
        ConfigError: an unknown key or a bad value, named.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected = {render(data)}: allowed: a table [expected]")
    _known(data, ("goal", "published"), "[expected]")
    goal = data.get("goal")
    if goal is not None:
        if not isinstance(goal, Mapping):
            goal = {"error": goal}
        _known(goal, ("error", "on"), "[expected.goal]")
        if "error" not in goal:
            raise ConfigError("[expected.goal]: no error; allowed: goal = {error = 1.60}")
        goal = Goal(**goal)
    published = data.get("published", [])
    if isinstance(published, Mapping):
        published = [published]
    if not isinstance(published, list):
        raise ConfigError(f"[expected] published = {render(published)}: allowed: a list of tables")
    entries = []
    for entry in published:
        if not isinstance(entry, Mapping) or not {"value", "source"} <= set(entry):
            raise ConfigError(
                f"[[expected.published]] {render(entry)}: allowed: a table with value and source"
            )
        _known(entry, ("value", "source", "what"), "[[expected.published]]")
        entries.append(Published(**entry))
    return Expected(goal, tuple(entries))


def _known(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


@dataclass(frozen=True)
class Study:
    """A hyperparameter search: the base run, the space, and how the search goes.

    Attributes:
        name: the study's name in its storage.
        base: the base ``RunConfig``; it must hold a validation split out.
        space: the searched fields.
        settings: trials, epochs per trial, sampler, pruner and final seeds.
        directory: where the default storage, the summary, the plot and the final runs go.
        description: one line, for the summary.
        searched: the study whose trials choose this one's best configuration, when this one
            only trains that configuration again (``search = "other.toml"``: other final
            epochs or seeds); None when it searches itself.
        expected: what its final runs are to show (its own, never the searched study's).
    """

    name: str
    base: RunConfig
    space: tuple[Dimension, ...]
    settings: _Settings = field(default_factory=_Settings)
    directory: Path = Path("study.tune")
    description: str = ""
    searched: Study | None = None
    expected: Expected = field(default_factory=Expected)

    @property
    def trials_from(self) -> Study:
        """The study whose trials this one's final runs take their configuration from."""
        return self.searched if self.searched is not None else self

    @property
    def trials(self) -> int:
        return self.settings.trials

    @property
    def epochs(self) -> int:
        return self.settings.epochs

    def config_for(
        self, params: Mapping[str, Any], *, seed: int | None = None, epochs: int | None = None
    ) -> RunConfig:
        """The base with the fields of ``params`` (space path -> value) set, training
        ``epochs`` (default: the study's) without evaluating the test set.

        Raises:
            ConfigError: the values do not make a valid run.
        """
        data = copy.deepcopy(self.base.to_data())
        for path, value in params.items():
            _set(data, path, value)
        data.setdefault("train", {})
        data["train"]["epochs"] = self.epochs if epochs is None else epochs
        data["train"]["evaluate_test"] = False
        if seed is not None:
            data["seed"] = seed
        return RunConfig.from_data(data)

    def fingerprint(self) -> dict[str, Any]:
        """What a storage's study must have been made from to be continued by this one."""
        return {
            "base": self.base.key(),
            "space": [dimension.to_data() for dimension in self.space],
            "epochs": self.epochs,
        }


def from_data(
    data: Mapping[str, Any],
    *,
    name: str,
    root: str | Path = ".",
    directory: str | Path | None = None,
) -> Study:
    """A study from a study TOML's plain data; ``root`` is where a ``base`` file name is
    looked up, ``directory`` where the study writes (default ``root/<name>.tune``).

    Raises:
        ConfigError: an unknown key, a bad value, a base without a validation split, or a
            space value that makes no valid run (naming the key).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"a study must be a table, got {render(data)}")
    known = [*_TOP, *_TABLES]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown study key {key!r}{hint}; known: {', '.join(sorted(known))}")
    root = Path(root)
    name = str(data.get("name", name))
    directory = Path(directory) if directory is not None else root / f"{name}.tune"
    if "search" in data:
        return _derived(data, name=name, root=root, directory=directory)
    base = _base(data.get("base"), root)
    if base.validation == 0:
        raise ConfigError(
            "the study's objective is the validation error, but its base run holds no "
            "validation split (validation = 0); allowed: validation = N in the base run"
        )
    space_data = data.get("space", {})
    if not isinstance(space_data, Mapping) or not space_data:
        raise ConfigError(
            f"space = {render(space_data)}: nothing to search; allowed: a [space] table like "
            '"train.lr" = {low = 1e-4, high = 0.1, log = true}'
        )
    space = tuple(Dimension.parse(str(path), value) for path, value in space_data.items())
    settings = _settings(data)
    study = Study(
        name,
        base,
        space,
        settings,
        directory,
        str(data.get("description", "")),
        expected=expected(data.get("expected", {})),
    )
    for dimension in space:  # every bound and every choice must make a run
        for value in dimension.extremes():
            try:
                study.config_for({dimension.path: value})
            except ConfigError as problem:
                raise ConfigError(
                    f"[space] {json.dumps(dimension.path)} = {render(value)}: {problem}"
                ) from None
    return study


def _derived(data: Mapping[str, Any], *, name: str, root: Path, directory: Path) -> Study:
    """A study that trains another study's best configuration again, with its own [final]:
    the searched study's file is ``search`` (relative to ``root``), its directory the sibling
    of this one's named as its own would be (``results/tune/s1-60`` -> ``results/tune/s1``,
    ``s1-60.tune`` -> ``s1.tune``)."""
    extra = sorted(set(data) - set(_DERIVED))
    if extra:
        raise ConfigError(
            f"study key(s) {extra} beside search = {render(data['search'])}: the searched "
            f"study gives the base, space and trials; allowed: {', '.join(_DERIVED)}"
        )
    value = data["search"]
    if not isinstance(value, str) or not value.endswith(".toml"):
        raise ConfigError(
            f"search = {render(value)}: allowed: the name of the searched study's TOML file"
        )
    path = _relative(value, root)
    if not path.is_file():
        raise ConfigError(f"search = {render(value)}: no such study file {path}")
    source = load_toml(path)
    if "search" in source:
        raise ConfigError(
            f"search = {render(value)}: that study takes its search from another; allowed: "
            "a study that searches itself"
        )
    source_name = str(source.get("name", path.stem))
    suffix = ".tune" if directory.name.endswith(".tune") else ""
    sibling = directory.parent / (source_name + suffix)
    searched = from_data(source, name=source_name, root=path.parent, directory=sibling)
    final = data.get("final", {})
    own = _settings({"final": final})  # checks the table as every study's
    settings = replace(
        searched.settings,
        final_seeds=own.final_seeds if "seeds" in final else searched.settings.final_seeds,
        final_epochs=own.final_epochs if "epochs" in final else searched.settings.final_epochs,
    )
    return Study(
        name,
        searched.base,
        searched.space,
        settings,
        directory,
        str(data.get("description", "")),
        searched,
        expected(data.get("expected", {})),
    )


def _relative(value: str, root: Path) -> Path:
    """A file named in a study: absolute, or relative to the study file's folder."""
    return Path(value) if Path(value).is_absolute() else root / value


def _base(value: Any, root: Path) -> RunConfig:
    if isinstance(value, str):
        return RunConfig.from_data(load_toml(_relative(value, root)))
    if isinstance(value, Mapping):
        return RunConfig.from_data(value)
    raise ConfigError(
        f"base = {render(value)}: allowed: a [base] table (a run configuration) or the name of "
        "a run TOML file"
    )


def _settings(data: Mapping[str, Any]) -> _Settings:
    values: dict[str, Any] = {
        key: data[key] for key in ("trials", "epochs", "seed", "sampler") if key in data
    }
    pruner = data.get("pruner", {})
    if isinstance(pruner, str):
        pruner = {"kind": pruner}
    if not isinstance(pruner, Mapping):
        raise ConfigError(f"pruner = {render(pruner)}: allowed: a [pruner] table or a name")
    unknown = sorted(set(pruner) - {"kind", "startup_trials", "warmup_epochs"})
    if unknown:
        raise ConfigError(
            f"[pruner] unknown key(s) {unknown}; known: kind, startup_trials, warmup_epochs"
        )
    if "kind" in pruner:
        values["pruner"] = pruner["kind"]
    for key in ("startup_trials", "warmup_epochs"):
        if key in pruner:
            values[key] = pruner[key]
    final_data = data.get("final", {})
    if not isinstance(final_data, Mapping):
        raise ConfigError(f"final = {render(final_data)}: allowed: a [final] table")
    unknown = sorted(set(final_data) - {"seeds", "epochs"})
    if unknown:
        raise ConfigError(f"[final] unknown key(s) {unknown}; known: seeds, epochs")
    seeds = final_data.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"[final] seeds = {seeds}: allowed: at least 1 seed")
        seeds = list(range(seeds))
    if seeds is not None:
        values["final_seeds"] = seeds
    if "epochs" in final_data:
        values["final_epochs"] = final_data["epochs"]
    return _Settings(**values)


def load(
    path: str | Path, *, directory: str | Path | None = None, device: str | None = None
) -> Study:
    """The study in a TOML file; it writes to ``directory`` (default ``<stem>.tune`` beside
    the file). ``device`` replaces the base run's (it is not part of a run's key).

    Raises:
        ConfigError: see ``from_data``.
    """
    path = Path(path)
    study = from_data(load_toml(path), name=path.stem, root=path.parent, directory=directory)
    if device is not None:
        study = replace(study, base=study.base.override(device=device))
    return study


# ------------------------------------------------------------------------------ storage


def storage_url(study: Study, storage: str | None = None) -> str:
    """``storage``, or the SQLite file ``study.db`` in the study's directory."""
    return storage or f"sqlite:///{(study.directory / 'study.db').resolve()}"


def _retry():
    """Optuna's callback that enqueues a failed trial's values again, once."""
    optuna = _optuna()
    kind = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return (kind or optuna.storages.RetryFailedTrialCallback)(max_retry=1)


def _storage(url: str, *, retry: bool = False):
    optuna = _optuna()
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine["connect_args"] = {"timeout": 60}  # parallel trials wait for the file's lock
    options: dict[str, Any] = {}
    if retry:  # a search: a trial found stale while it runs is tried again
        key = (
            "heartbeat_stale_trial_callback"
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
            else "failed_trial_callback"
        )
        options[key] = _retry()
    try:
        with warnings.catch_warnings():
            # The heartbeat marks trials whose process died as failed, so they are tried again;
            # Optuna calls the argument experimental.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180, **options
            )
    except Exception as problem:  # noqa: BLE001 - any driver or URL error, named in one line
        text = " ".join(str(problem).split())[:200]
        raise ConfigError(f"storage {url}: cannot be opened ({text})") from None


def trial_seed(seed: int, number: int) -> int:
    """The seed trial ``number`` of a study seeded ``seed`` samples with: a function of the two
    alone, so a study's trials are the same whichever process, thread or machine draws them.

    Example:
        >>> trial_seed(0, 3) == trial_seed(0, 3) != trial_seed(0, 4)
        True
    """
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _sampler(study: Study):
    """The study's sampler, reseeded for every trial from its number (``trial_seed``).

    A sampler seeded once per process draws the same values in two processes that open a
    shared study at once, and Optuna reseeds it at random under ``n_jobs > 1``; a trial's
    number is unique in its storage, so seeding from it keeps parallel trials apart and the
    study reproducible: trial k of a given history draws the same values however it is run.
    The retries of lost trials (``_retry_lost``) draw nothing and are left out of the count,
    so the trials after a retry draw what they would have drawn without the loss.
    """
    optuna = _optuna()
    settings = study.settings

    def make(number: int):
        seed = trial_seed(settings.seed, number)
        if settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    class TrialSeeded(optuna.samplers.BaseSampler):
        def __init__(self):
            self._samplers: dict[int, Any] = {}
            self._lock = threading.Lock()

        def _of(self, opened, trial):
            with self._lock:
                if trial.number not in self._samplers:
                    retries = sum(
                        1
                        for other in opened.get_trials(deepcopy=False)
                        if other.number < trial.number and "failed_trial" in other.system_attrs
                    )
                    self._samplers[trial.number] = make(trial.number - retries)
                return self._samplers[trial.number]

        def infer_relative_search_space(self, opened, trial):
            return self._of(opened, trial).infer_relative_search_space(opened, trial)

        def sample_relative(self, opened, trial, search_space):
            return self._of(opened, trial).sample_relative(opened, trial, search_space)

        def sample_independent(self, opened, trial, name, distribution):
            return self._of(opened, trial).sample_independent(opened, trial, name, distribution)

        def before_trial(self, opened, trial):
            self._of(opened, trial).before_trial(opened, trial)

        def after_trial(self, opened, trial, state, values):
            self._of(opened, trial).after_trial(opened, trial, state, values)
            with self._lock:
                self._samplers.pop(trial.number, None)

        def reseed_rng(self):
            """Nothing to reseed: every trial's seed comes from its number."""

    return TrialSeeded()


def _pruner(study: Study):
    optuna = _optuna()
    if study.settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=study.settings.startup_trials,
        n_warmup_steps=study.settings.warmup_epochs,
    )


def require_search(study: Study) -> None:
    """Refuse a study that takes its trials from another's search (``searched``): it has no
    storage of its own to search in or summarise.

    Raises:
        ConfigError: naming the searched study.
    """
    if study.searched is not None:
        raise ConfigError(
            f"study {study.name!r} takes its trials from the search of {study.searched.name!r} "
            "and only trains that search's best again; allowed: --final (search or summarise "
            f"the study {study.searched.name!r} itself)"
        )


def open_study(
    study: Study,
    storage: str | None = None,
    *,
    pruner=None,
    create: bool = True,
    retry: bool = False,
) -> optuna.Study:
    """The study's Optuna study in its storage, created the first time (unless ``create`` is
    false: then a study the storage does not hold is an error, and nothing is written).

    ``pruner`` replaces the study's own (an ``optuna.pruners.BasePruner``); with ``retry``, a
    trial Optuna's heartbeat finds stale is tried again once (a search opens it so).

    Raises:
        ConfigError: the storage cannot be opened, or its study was made from another base
            run, space or number of epochs (it cannot be continued by this one), or it holds
            no such study and ``create`` is false, or ``study`` takes its trials from
            another's search (``searched``): open that one.
    """
    optuna = _optuna()
    require_search(study)
    url = storage_url(study, storage)
    if not create:
        missing = f"no study {study.name!r} in {url}: run `gfalign tune` first"
        if storage is None and not (study.directory / "study.db").is_file():
            raise ConfigError(missing)
        names = optuna.study.get_all_study_names(storage=_storage(url))
        if study.name not in names:
            raise ConfigError(missing)
    if storage is None:
        study.directory.mkdir(parents=True, exist_ok=True)
    opened = optuna.create_study(
        storage=_storage(url, retry=retry),
        study_name=study.name,
        direction="minimize",
        load_if_exists=True,
        pruner=pruner if pruner is not None else _pruner(study),
    )
    opened.sampler = _sampler(study)
    mine = study.fingerprint()
    recorded = opened.user_attrs.get("gfalign")
    if recorded is None:
        opened.set_user_attr("gfalign", mine)
    elif recorded != mine:
        changed = [key for key in mine if recorded.get(key) != mine[key]]
        raise ConfigError(
            f"study {study.name!r} in {url} was made from another {' and '.join(changed)}; "
            "allowed: the same base, space and epochs, or another name (or storage) for the "
            "changed study"
        )
    return opened


@contextlib.contextmanager
def _ownership(study: Study) -> Iterator[dict[str, Any]]:
    """Hold this process's lock in the study's directory while the block runs; yields the
    owner record its trials carry (``owner``), by which another process sees it alive."""
    from filelock import FileLock

    owners = study.directory / OWNERS
    owners.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    path = owners / f"{host}-{pid}-{time.time_ns()}.lock"
    lock = FileLock(path, timeout=0)
    lock.acquire()
    try:
        yield {"host": host, "pid": pid, "lock": str(path)}
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            path.unlink()


def _dead(owner: Any) -> bool:
    """Whether the process an ``owner`` record names is gone: on this host, its lock is free.
    (On other hosts only the heartbeat can tell.)"""
    from filelock import FileLock, Timeout

    if not isinstance(owner, Mapping) or owner.get("host") != socket.gethostname():
        return False
    path = Path(str(owner.get("lock", "")))
    if not path.name:
        return False
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    except OSError:
        return True  # its directory is gone, and the process with it
    lock.release()
    with contextlib.suppress(OSError):
        path.unlink()
    return True


def _fail_dead(opened: optuna.Study) -> list[int]:
    """Mark failed the running trials whose owner died (``_dead``); returns their numbers."""
    optuna = _optuna()
    storage, found = opened._storage, []
    for trial in opened.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if not _dead(owner):
            continue
        try:
            storage.set_trial_user_attr(
                trial._trial_id, "lost", f"process {owner['pid']} on {owner['host']} died"
            )
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process found it first
        found.append(trial.number)
    return found


def retries(opened: optuna.Study) -> dict[int, int]:
    """Lost trial -> the trial that tries its values again: a trial whose process died or was
    stopped is tried again once by the next search (``run``), not replaced by new values."""
    again: dict[int, int] = {}
    for trial in opened.get_trials(deepcopy=False):
        history = trial.system_attrs.get("retry_history") or []
        if history:
            again[int(history[-1])] = trial.number
    return again


def _fail_lost(opened: optuna.Study) -> None:
    """Mark failed the running trials whose process died: its lock is free (``_fail_dead``)
    or its heartbeat stopped longer ago than the grace period."""
    optuna = _optuna()
    _fail_dead(opened)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(opened)


def _retry_lost(opened: optuna.Study, most: int) -> list[tuple[int, int]]:
    """Enqueue the values of up to ``most`` lost trials again, once each, oldest first.

    Lost: failed without diverging, because its process died (``_fail_lost``) or was stopped
    (Ctrl-C), or its trial raised. A retry that is lost in turn is not tried again.

    Returns:
        (lost trial, the new trial that tries its values again) for each one enqueued now.
    """
    optuna = _optuna()
    done = retries(opened)
    enqueued: list[tuple[int, int]] = []
    for trial in opened.get_trials(deepcopy=True, states=(optuna.trial.TrialState.FAIL,)):
        if len(enqueued) >= most:
            break
        history = list(trial.system_attrs.get("retry_history") or [])
        if "diverged" in trial.user_attrs or trial.number in done or history:
            continue
        # As Optuna's retry callback enqueues a trial (its system attributes included), but
        # without the lost trial's own attributes: the retry records its own.
        opened.add_trial(
            optuna.create_trial(
                state=optuna.trial.TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                system_attrs={"failed_trial": trial.number, "retry_history": [trial.number]},
            )
        )
        enqueued.append((trial.number, retries(opened)[trial.number]))
    return enqueued


def counted(opened: optuna.Study) -> int:
    """Trials that count towards a study's ``trials``: completed, pruned, or diverged (a
    failed trial whose training diverged). Killed or broken trials are not counted: their
    values are tried again once (``retries``)."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    return sum(
        1
        for trial in opened.get_trials(deepcopy=False)
        if trial.state in (states.COMPLETE, states.PRUNED)
        or (trial.state == states.FAIL and "diverged" in trial.user_attrs)
    )


# ------------------------------------------------------------------------------ trials


class _Objective:
    """Trains one trial's configuration and returns its validation error."""

    def __init__(
        self, study: Study, data_dir: str | Path | None, owner: Mapping[str, Any] | None = None
    ) -> None:
        self.study, self.data_dir, self.owner = study, data_dir, owner
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()

    def dataset(self, config: RunConfig):
        """Each distinct dataset once, shared by the trials of this process."""
        from gfalign.runs import load_data

        spec = config.model_spec()
        marker = json.dumps(
            [
                config.dataset,
                config.train_subset,
                config.test_subset,
                config.validation,
                config.dtype,
                config.device,
                None if spec is None else spec.to_data(),
            ],
            sort_keys=True,
            default=str,
        )
        with self._lock:
            if marker not in self._data:
                device = resolve_device(config.device)
                self._data[marker] = load_data(config, device, data_dir=self.data_dir, quiet=True)
            return self._data[marker]

    def __call__(self, trial: optuna.Trial) -> float:
        optuna = _optuna()
        from gfalign.runs import build

        if self.owner is not None:
            trial.set_user_attr("owner", dict(self.owner))
        params = {dimension.path: dimension.suggest(trial) for dimension in self.study.space}
        config = self.study.config_for(params)
        trial.set_user_attr("key", config.key())
        trial.set_user_attr("config", config.to_data())
        data = self.dataset(config)
        net, rule = build(config, resolve_device(config.device))
        metrics = []
        if config.alignment:
            from gfalign.alignment import alignment_metric

            metrics.append(alignment_metric(data, size=config.alignment_probe))
        trainer = Trainer(net, rule, data, config.train, metrics=metrics)
        try:
            while trainer.epoch < config.train.epochs and not trainer.stopped_early:
                error = trainer.train_epoch()["validation_error"]
                trial.report(error, trainer.epoch)
                if trial.should_prune():
                    trial.set_user_attr("epochs", trainer.epoch)
                    raise optuna.TrialPruned(
                        f"pruned after epoch {trainer.epoch}: validation error {error:.4g}"
                    )
        except DivergenceError as problem:
            trial.set_user_attr("diverged", str(problem))
            raise
        best = trainer.best_epoch if config.train.tracks_best else trainer.epoch
        trial.set_user_attr("epochs", trainer.epoch)
        trial.set_user_attr("best_epoch", best)
        return trainer.history[best - 1]["validation_error"]


def run(
    study: Study,
    *,
    storage: str | None = None,
    trials: int | None = None,
    jobs: int = 1,
    data_dir: str | Path | None = None,
    pruner=None,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Run the study until ``trials`` (default: the study's) count (``counted``), continuing
    the trials its storage already holds; returns the Optuna study.

    First, every trial lost by a search before (its process killed or stopped) is marked
    failed and its values are enqueued again, once: they are the next trials trained.

    Args:
        study: the study.
        storage: a database URL; default the SQLite file in the study's directory.
        trials: trials to reach in total.
        jobs: trials trained at once (threads of this process; other processes or machines
            may work on the same storage at the same time).
        data_dir: where the dataset's files are.
        pruner: replaces the study's pruner (an ``optuna.pruners.BasePruner``).
        on_trial: called with every trial this process finishes.
        on_note: receives one line for each lost trial tried again.

    Raises:
        ConfigError: as for ``open_study``, or a trial's values make no valid run.
        DataError: the data.
    """
    opened = open_study(study, storage, pruner=pruner, retry=True)
    target = study.trials if trials is None else trials
    with _ownership(study) as owner:
        _fail_lost(opened)
        left = target - counted(opened)
        if left <= 0:
            return opened
        for lost, again in _retry_lost(opened, left):
            if on_note is not None:
                on_note(
                    f"trial {lost} was lost (its process died or was stopped): its values are "
                    f"tried again as trial {again}"
                )

        def finished(current: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if on_trial is not None:
                on_trial(trial)
            if counted(current) >= target:
                current.stop()

        opened.optimize(
            _Objective(study, data_dir, owner),
            n_trials=left,
            n_jobs=jobs,
            catch=(DivergenceError,),
            callbacks=[finished],
        )
    return opened


# ------------------------------------------------------------------------------ results


def _importances(opened: optuna.Study) -> tuple[dict[str, float], str]:
    """Parameter importances (PED-ANOVA, Optuna's default evaluator) and a note saying why
    there are none, when the trials cannot give them yet."""
    optuna = _optuna()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = optuna.importance.get_param_importances(
                opened, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            )
        except (ValueError, RuntimeError) as problem:
            return {}, f"no importances: {problem}"
    notes = [
        str(warning.message)
        for warning in caught
        if not issubclass(warning.category, optuna.exceptions.ExperimentalWarning)
    ]
    if any("too small" in note for note in notes):
        return {}, "no importances yet: too few completed trials"
    return {name: float(value) for name, value in found.items()}, " ".join(notes)


def summarize(study: Study, opened: optuna.Study, trials: int | None = None) -> dict[str, Any]:
    """The study's results as plain data: trial counts, the best trial (number, validation
    error, values, run key and epochs), parameter importances and every trial.

    Importances (PED-ANOVA, ``optuna.importance``) need enough completed trials; before,
    they are ``{}`` and ``importances_note`` says why. ``trials`` is the target the search
    ran to (default: the study's). Trials whose process died (their owner's lock is free, or
    their heartbeat stopped longer ago than the grace period) are marked failed first, as the
    next search would; ``retried`` lists each lost trial with the trial that tried its values
    again.
    """
    optuna = _optuna()
    _fail_lost(opened)
    states = optuna.trial.TrialState
    every = opened.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for trial in every:
        state = "diverged" if "diverged" in trial.user_attrs else trial.state.name.lower()
        counts[state] = counts.get(state, 0) + 1
    complete = [t for t in every if t.state == states.COMPLETE]
    decode = {dimension.path: dimension.decode for dimension in study.space}

    def values(trial) -> dict[str, Any]:
        return {name: decode[name](v) if name in decode else v for name, v in trial.params.items()}

    best = None
    if complete:
        trial = opened.best_trial
        best = {
            "number": trial.number,
            "validation_error": trial.value,
            "params": values(trial),
            "key": trial.user_attrs.get("key"),
            "epochs": trial.user_attrs.get("epochs"),
            "best_epoch": trial.user_attrs.get("best_epoch"),
        }
    importances, note = ({}, "no importances yet: they need two completed trials")
    if len(complete) >= 2:
        importances, note = _importances(opened)
    return {
        "study": study.name,
        "description": study.description,
        "objective": "validation_error",
        "task": study.base.objective,
        "target_trials": study.trials if trials is None else trials,
        "counted": counted(opened),
        "states": counts,
        "best": best,
        "importances": importances,
        "importances_note": note,
        "retried": [
            {"trial": lost, "as": again} for lost, again in sorted(retries(opened).items())
        ],
        "trials": [
            {
                "number": t.number,
                "state": "diverged" if "diverged" in t.user_attrs else t.state.name.lower(),
                "validation_error": t.value,
                "params": values(t),
                "epochs": t.user_attrs.get("epochs"),
                "seconds": _seconds(t),
                "intermediate": {int(k): float(v) for k, v in t.intermediate_values.items()},
            }
            for t in every
        ],
    }


def _seconds(trial) -> float | None:
    """A trial's wall-clock time (start to end), or None while it runs, and for a killed trial:
    its end is when a later search found its heartbeat stopped, not when it stopped."""
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    if trial.state == _optuna().trial.TrialState.FAIL and "diverged" not in trial.user_attrs:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def plot(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Draw a summary's optimisation history (every trial's validation error per epoch,
    completed trials' results and the best so far) and its parameter importances to ``path``
    (PNG, PDF or SVG by its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    history, importance = figure.subplots(1, 2, width_ratios=[3, 2])
    trials = summary["trials"]
    done = [t for t in trials if t["state"] == "complete"]
    pruned = [t for t in trials if t["state"] == "pruned" and t["intermediate"]]
    if done:
        numbers = [t["number"] for t in done]
        values = [t["validation_error"] for t in done]
        best = [min(values[: k + 1]) for k in range(len(values))]
        history.plot(numbers, values, "o", color="C0", label="completed")
        history.step(numbers, best, where="post", color="C1", label="best so far")
    if pruned:
        last = [t["intermediate"][max(t["intermediate"])] for t in pruned]
        history.plot([t["number"] for t in pruned], last, "x", color="C3", label="pruned (last)")
    history.set_xlabel("trial")
    percent = summary.get("task", "classification") == "classification"
    history.set_ylabel("validation error (%)" if percent else "validation reconstruction error")
    history.set_title(f"{summary['study']}: optimisation history", fontsize="medium")
    if done or pruned:
        history.legend(fontsize="small")
    names = list(summary["importances"])
    if names:
        importance.barh(names[::-1], [summary["importances"][n] for n in names[::-1]])
        importance.set_xlabel("importance (PED-ANOVA)")
    else:
        note = summary.get("importances_note") or "no importances yet"
        importance.text(0.5, 0.5, note.replace(": ", ":\n"), ha="center", va="center", wrap=True)
        importance.set_axis_off()
    importance.set_title("parameter importances", fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def final(
    study: Study,
    *,
    storage: str | None = None,
    seeds: Sequence[int] | None = None,
    store_path: str | Path,
    runs_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    jobs: int = 1,
    stack: int = 1,
    on_run: Callable[[RunConfig, str, Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the best trial's configuration on ``seeds`` (default the study's final seeds),
    measure the test set once per run, and record the runs in the results store.

    The runs are a sweep (``gfalign.sweep.run_sweep``) of ordinary run directories
    (``runs_dir/<key>``, default the study's ``final/``): a finished run is skipped, an
    interrupted one resumed, ``jobs`` worker processes train at once and ``stack`` seeds may
    train as one stacked computation. Each trains the study's final epochs with
    ``evaluate_test = false``, so the test set is measured once, after the last epoch (on the
    best-validation weights when the base keeps the best). The store records each run under
    the experiment ``tune:<study name>``; ``on_run(config, status, final)`` is called as each
    one is done. A study that takes another's search (``searched``) trains that search's best
    trial, under its own name and with its own final epochs and seeds.

    Returns:
        The trial, its values, and every run's key, seed, status and test error, with their
        mean and standard deviation.

    Raises:
        ConfigError: the study has no completed trial yet, or as for ``open_study``.
    """
    from gfalign.runs import SUMMARY
    from gfalign.store import Store
    from gfalign.sweep import run_sweep

    source = study.trials_from
    opened = open_study(source, storage, create=study.searched is None)
    states = _optuna().trial.TrialState
    if not any(t.state == states.COMPLETE for t in opened.get_trials(deepcopy=False)):
        raise ConfigError(
            f"study {source.name!r} has no completed trial yet: run `gfalign tune` first"
        )
    best = opened.best_trial
    decode = {dimension.path: dimension.decode for dimension in study.space}
    params = {name: decode[name](value) for name, value in best.params.items() if name in decode}
    seeds = list(study.settings.final_seeds if seeds is None else seeds)
    epochs = study.settings.final_epochs or study.epochs
    runs_dir = Path(runs_dir) if runs_dir is not None else study.directory / "final"
    configs = [study.config_for(params, seed=seed, epochs=epochs) for seed in seeds]

    def progress(report) -> None:
        if on_run is not None and report.status != "busy":
            on_run(report.config, report.status, report.final)

    rows = []
    with Store(store_path) as store:
        run_sweep(
            EXPERIMENT_PREFIX + study.name,
            store,
            runs_dir,
            configs=configs,
            jobs=jobs,
            stack=stack,
            data_dir=data_dir,
            progress=progress,
        )
        for config in configs:
            row = store.get(config.key()) or {"status": "missing", "final": {}, "epochs_done": 0}
            summary = runs_dir / config.key() / SUMMARY
            test = json.loads(summary.read_text()).get("test", {}) if summary.exists() else {}
            rows.append(
                {
                    "seed": config.seed,
                    "key": config.key(),
                    "directory": str(runs_dir / config.key()),
                    "status": row["status"],
                    "epochs": row["epochs_done"],
                    "test_error": row["final"].get("test_error"),
                    "test_epoch": test.get("epoch"),
                    "seconds": row.get("seconds"),
                }
            )
    errors = [row["test_error"] for row in rows if row["test_error"] is not None]
    return {
        "study": study.name,
        **({"search": study.searched.name} if study.searched is not None else {}),
        "trial": best.number,
        "validation_error": best.value,
        "params": params,
        "epochs": epochs,
        "runs": rows,
        "test_error": {
            "mean": statistics.fmean(errors) if errors else None,
            "std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
            "n": len(errors),
        },
    }


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (the study's ``summary.json`` and ``final.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    temporary.replace(path)
    return path
