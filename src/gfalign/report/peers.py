"""Peer libraries' runs beside ours, cell by cell, under the same protocol.

An experiment preset names its peers in a ``[peers]`` table, one entry per peer:

    [peers.biotorch]
    file = "biotorch-lenet.jsonl"     # under the report's peers directory (results/peers)
    column = "biotorch, same budget"  # the table's column
    rules = ["bp", "fa", "dfa"]       # the rules the peer has; other cells show "n/a"
    about = "..."                     # what a run is: the sentence under the table
    command = "python -m ..."         # how its runs are made

The file holds one JSON line per run (``benchmarks/peers/biotorch_lenet.py`` writes them): the
key of the run of ours it stands beside (``RunConfig.key()``), its status and its ``final``
metrics. A run counts for a cell only when its key is one of the experiment's planned runs, so a
peer's number is always the same data, protocol, epochs and seeds as ours; anything else in the
file (a shorter try) is left out. A cell the peer has but whose runs are missing shows "—".
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gfalign.experiments import Experiment
from gfalign.rules import ConfigError, render

__all__ = ["Peer", "attach", "declared", "read_runs"]

ABSENT = "n/a"
_KEYS = {"file", "column", "rules", "about", "command"}


class Peer:
    """One ``[peers.<name>]`` entry of a preset."""

    def __init__(self, name: str, data: Mapping[str, Any], where: str) -> None:
        form = (
            f'{where}: [peers.{name}] needs file = "...jsonl", column = "...", rules = [...] '
            'and about = "..." (command optional)'
        )
        if (
            not isinstance(data, Mapping)
            or set(data) - _KEYS
            or not {"file", "column"} <= set(data)
        ):
            raise ConfigError(f"{form}; got {render(data)}")
        rules = data.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise ConfigError(f"{form}; rules = {render(rules)}")
        self.name = name
        self.file = str(data["file"])
        self.column = str(data["column"])
        self.rules = tuple(rules)
        self.about = str(data.get("about", ""))
        self.command = str(data.get("command", ""))


def declared(experiment: Experiment, data: Mapping[str, Any]) -> tuple[Peer, ...]:
    """The peers a preset's plain data (``preset_data``) names, checked."""
    table = data.get("peers") or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"experiment {experiment.name}: peers = {render(table)} is not a table")
    return tuple(Peer(str(n), d, f"experiment {experiment.name}") for n, d in table.items())


def read_runs(path: Path) -> list[dict[str, Any]]:
    """A peer file's runs; none where the file does not exist (runs pending)."""
    if not path.is_file():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(run, dict) or not isinstance(run.get("key"), str):
            raise ConfigError(f"{path}:{number}: a peer run needs its key")
        runs.append(run)
    return runs


def attach(
    experiment: Experiment,
    summary: Sequence[Mapping[str, Any]],
    peers: Sequence[Peer],
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """``summary`` with each row's ``peers``: one entry per peer, its ``name``, ``column``
    and ``stats``: ``None`` where the peer lacks the rule, else the mean, sample std, count,
    values and seeds of its finished runs whose keys the cell plans (count 0: pending).
    Baseline rows get none."""
    cell_of = {c.key(): experiment.cell(c) for c in experiment.configs}
    rule_of = {experiment.cell(c): c.rule_name for c in experiment.configs}
    values: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for peer in peers:
        for run in runs.get(peer.name, ()):
            cell = cell_of.get(run["key"])
            value = (run.get("final") or {}).get(experiment.metric)
            if cell is None or run.get("status") != "finished" or value is None:
                continue
            seed = int((run.get("config") or {}).get("seed", 0))
            values.setdefault((peer.name, cell), []).append((seed, float(value)))
    out = []
    for row in summary:
        row = dict(row)
        if not row["baseline"]:
            row["peers"] = []
            for peer in peers:
                stats = None
                if rule_of.get(row["cell"]) in peer.rules:
                    found = dict(sorted(values.get((peer.name, row["cell"]), [])))  # per seed
                    numbers = list(found.values())
                    stats = {
                        "mean": statistics.fmean(numbers) if numbers else None,
                        "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
                        "n": len(numbers),
                        "values": numbers,
                        "seeds": list(found),
                    }
                row["peers"].append({"name": peer.name, "column": peer.column, "stats": stats})
        out.append(row)
    return out


def sentence(experiment: Experiment, peers: Sequence[Peer]) -> str:
    """What the peer columns hold, for the paragraph above the table."""
    parts = []
    for peer in peers:
        parts.append(
            f"{peer.column}: {peer.about} Mean ± sample std over its seeds (the seed count in "
            f"brackets where it has fewer than ours), then ours − {peer.name} (a gap beyond "
            f"the seeds' spread is a difference to find); — where its runs are pending, "
            f"{ABSENT} where {peer.name} has no such rule."
            + (f" Made with `{peer.command}`." if peer.command else "")
        )
    return " ".join(parts)
