"""Where the numbers come from: runs done of planned, protocols, machines and compute time.

Everything is read from the rows' stored configurations, environments (``environment.json``
of the run directory when the store lacks it) and recorded seconds.

    >>> compute([{"seconds": 1800.0}, {"seconds": 1800.0}, {}])
    '1.0 h of training in 2 runs (1 without a recorded time)'
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gfalign.experiments import Experiment
from gfalign.report.render import Table
from gfalign.report.rows import cells_of, config_of, count, rule_of

__all__ = [
    "compute",
    "cost_medians",
    "cost_table",
    "counts",
    "duration",
    "machines",
    "protocols",
    "total_seconds",
    "with_environment",
]


def counts(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    """``"Runs: 4 of 135 planned finished (27 cells × 5 seeds, 100 epochs); 1 diverged."``"""
    planned = {c.key() for c in experiment.configs}
    finished = [r for r in rows if r["status"] == "finished"]
    done = sum(r["key"] in planned for r in finished)
    cells = len(cells_of(experiment))
    *fewer, most = sorted({c.train.epochs for c in experiment.configs})  # a screening varies them
    epochs = " or ".join([*map(str, fewer), count(most, "epoch")])
    text = (
        f"Runs: {done} of {len(planned)} planned finished ({count(cells, 'cell')} × "
        f"{count(len(experiment.seeds), 'seed')}, {epochs})"
    )
    other = len(finished) - done
    if other:
        text += (
            f"; {other} more finished outside the plan (another protocol, subset or seed, or "
            "a reading its grid no longer holds)"
        )
    diverged = sum(r["status"] == "diverged" for r in rows)
    if diverged:
        text += f"; {diverged} diverged"
    return text + "."


def _seeds_text(seeds: Iterable[int]) -> str:
    seeds = sorted(set(seeds))
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def protocols(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per distinct training protocol among the rows' stored configurations."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        config = row["config"]
        train = config.get("train", {})
        data = config.get("dataset", "mnist")
        subset = config.get("train_subset"), config.get("test_subset")
        examples = (
            f"all of {data}"
            if subset == (None, None)
            else f"{subset[0] or 'all'} training / {subset[1] or 'all'} test examples of {data}"
        )
        epochs = train.get("epochs", 100)
        if config.get("validation"):
            examples += f" ({config['validation']:,} training examples held out for validation)"
        text = (
            f"{count(epochs, 'epoch')}, batch size {train.get('batch_size')}, "
            f"{train.get('optimizer')} with lr {train.get('lr')}"
            f"{_options(train.get('optimizer_options'))}, reduction {train.get('reduction')}, "
            + "".join(f"{extra}, " for extra in _features(config, train))
            + f"{examples}, {config.get('dtype', 'float32')}"
        )
        groups.setdefault(text, []).append(int(config.get("seed", 0)))
    return [
        f"{text}; {_seeds_text(seeds)} ({count(len(seeds), 'run')})"
        for text, seeds in groups.items()
    ]


def _features(config: Mapping[str, Any], train: Mapping[str, Any]) -> list[str]:
    """The training features a run's configuration sets, in words; none for the paper's plain
    protocol (defaults are not stored)."""
    out = []
    if train.get("weight_decay"):
        out.append(f"weight decay {train['weight_decay']}")
    if train.get("schedule"):
        out.append(f"schedule {train['schedule']}")
    if train.get("warmup"):
        out.append(f"{count(train['warmup'], 'epoch')} of warm-up")
    if train.get("clip_grad_norm"):
        out.append(f"gradient norm clipped at {train['clip_grad_norm']}")
    dropout = [
        f"{where} {config[key]}"
        for where, key in (("input", "dropout_input"), ("hidden", "dropout_hidden"))
        if config.get(key)
    ]
    if dropout:
        out.append("dropout " + ", ".join(dropout))
    if train.get("early_stopping"):
        out.append(f"early stopping after {count(train['early_stopping'], 'epoch')} without gain")
    return out


def _options(options: Mapping[str, Any] | None) -> str:
    if not options:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(options.items())) + ")"


def _machine(row: Mapping[str, Any]) -> str:
    """The row's machine in words, or ``"not recorded"``."""
    env = row.get("versions") or {}
    if not env:
        return "not recorded"
    device = env.get("device", "?")
    if env.get("gpu"):
        device += f" ({env['gpu']}, CUDA {env.get('cuda')})"
    return (
        f"{env.get('processor') or '?'}, {env.get('cpu_count', '?')} CPUs, "
        f"{env.get('torch_threads', '?')} torch threads, device {device}; "
        f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, "
        f"gfalign {env.get('gfalign', '?')}; {env.get('platform', '?')}"
    )


def _epoch_costs(
    rows: Sequence[Mapping[str, Any]], name_of: Callable[[Any], str]
) -> tuple[str, str, int, int, dict[str, dict[bool, list[float]]]] | None:
    """The runs ``cost_table`` times: (machine, network, runs chosen, runs left out, per cell
    the seconds per epoch of its runs trained alone (False) and stacked (True)); None when no
    run recorded a time."""
    timed = [
        r
        for r in rows
        if r["status"] == "finished"
        and r.get("history")
        and all(isinstance(rec.get("seconds"), (int, float)) for rec in r["history"])
        and r.get("versions")
    ]
    if not timed:
        return None
    by_machine: dict[str, list[Mapping[str, Any]]] = {}
    for row in timed:
        by_machine.setdefault(_machine(row), []).append(row)
    machine, on_machine = max(by_machine.items(), key=lambda item: len(item[1]))
    named = [(name_of(config_of(row)), row) for row in on_machine]
    by_network: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, row in named:
        network = name[: len(name) - len(rule_of(name))].strip()
        by_network.setdefault(network, []).append((name, row))
    network, chosen = max(by_network.items(), key=lambda item: len(item[1]))
    cells: dict[str, dict[bool, list[float]]] = {}
    for name, row in chosen:
        history = row["history"]
        per_epoch = sum(float(rec["seconds"]) for rec in history) / len(history)
        stacked = any(int(rec.get("stacked", 1)) > 1 for rec in history)
        cells.setdefault(name, {False: [], True: []})[stacked].append(per_epoch)
    return machine, network, len(chosen), len(timed) - len(chosen), cells


def cost_medians(
    rows: Sequence[Mapping[str, Any]], name_of: Callable[[Any], str]
) -> dict[tuple[str, bool], float]:
    """(cell, stacked) -> the median seconds per epoch ``cost_table`` prints for it."""
    found = _epoch_costs(rows, name_of)
    if found is None:
        return {}
    return {
        (name, stacked): statistics.median(values)
        for name, both in found[4].items()
        for stacked, values in both.items()
        if values
    }


def cost_table(
    rows: Sequence[Mapping[str, Any]], name_of: Callable[[Any], str], order: Sequence[str] = ()
) -> tuple[Table, str] | None:
    """Wall-clock cost per rule from one machine and one network only: the machine (as
    ``machines`` words it) with the most finished runs that recorded per-epoch times, on it
    the network with the most such runs, and per rule the median over runs of seconds per
    epoch, for runs trained alone and for stacked ones (whose epoch time is their share of the
    stack's). With the sentence that says which machine and network; ``None`` when no run
    recorded a time.

    ``name_of``: a run's configuration -> its cell name; ``order``: the cells' order.
    """
    found = _epoch_costs(rows, name_of)
    if found is None:
        return None
    machine, network, chosen, others, cells = found
    rank = {name: n for n, name in enumerate(order)}
    body = []
    for name in sorted(cells, key=lambda c: (rank.get(c, 1 << 20), c)):
        alone, stacked = cells[name][False], cells[name][True]
        body.append(
            (
                rule_of(name),
                f"{statistics.median(alone):.1f} ({len(alone)})" if alone else "—",
                f"{statistics.median(stacked):.1f} ({len(stacked)})" if stacked else "—",
            )
        )
    table = Table(
        ("rule", "s per epoch, alone (runs)", "s per epoch, stacked (runs)"),
        tuple(body),
        (False, True, True),
    )
    sentence = (
        f"Wall-clock cost per rule of the {network} network, from one machine only ({machine}: "
        f"{count(chosen, 'run')}"
        + (f"; {count(others, 'run')} of other networks or machines left out" if others else "")
        + "): the median over runs of the seconds per epoch of the training steps (the "
        "end-of-epoch evaluation not counted). "
        "A stacked run's epoch is its share of the stack's time."
    )
    return table, sentence


def machines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per distinct machine in the rows' recorded environments (environment.json)."""
    groups: dict[str, int] = {}
    for row in rows:
        text = _machine(row)
        groups[text] = groups.get(text, 0) + 1
    return [f"{text} ({count(n, 'run')})" for text, n in groups.items()]


def duration(seconds: float) -> str:
    """``duration(90)`` is ``"1.5 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def total_seconds(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """The rows' recorded training seconds, summed; None when none has a time."""
    times = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
    return sum(times) if times else None


def compute(rows: Sequence[Mapping[str, Any]]) -> str:
    """Total training time of the rows (each run's recorded seconds)."""
    times = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
    text = f"{duration(sum(times))} of training in {count(len(times), 'run')}"
    missing = len(rows) - len(times)
    if missing:
        text += f" ({missing} without a recorded time)"
    return text


def with_environment(rows: list[dict[str, Any]], runs_dir: Path | None) -> list[dict[str, Any]]:
    """Rows whose stored environment is empty get it from their run directory, when there."""
    from gfalign.runs import ENVIRONMENT

    if runs_dir is None:
        return rows
    out = []
    for row in rows:
        path = runs_dir / row["key"] / ENVIRONMENT
        if not row.get("versions") and path.exists():
            row = {**row, "versions": json.loads(path.read_text())}
        out.append(row)
    return out
