"""Where the numbers come from: runs done of planned, protocols, machines and compute time.

Everything is read from the rows' stored configurations, environments (``environment.json``
of the run directory when the store lacks it) and recorded seconds.

    >>> compute([{"seconds": 1800.0}, {"seconds": 1800.0}, {}])
    '1.0 h of training in 2 runs (1 without a recorded time)'
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gfalign.experiments import Experiment
from gfalign.report.rows import cells_of, count

__all__ = ["compute", "counts", "duration", "machines", "protocols", "with_environment"]


def counts(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    """``"Runs: 4 of 135 planned finished (27 cells × 5 seeds, 100 epochs); 1 diverged."``"""
    planned = {c.key() for c in experiment.configs}
    finished = [r for r in rows if r["status"] == "finished"]
    done = sum(r["key"] in planned for r in finished)
    cells = len(cells_of(experiment))
    text = (
        f"Runs: {done} of {len(planned)} planned finished ({count(cells, 'cell')} × "
        f"{count(len(experiment.seeds), 'seed')}, {count(experiment.base.train.epochs, 'epoch')})"
    )
    other = len(finished) - done
    if other:
        text += f"; {other} more finished outside the plan (another protocol, subset or seed)"
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
        text = (
            f"{count(epochs, 'epoch')}, batch size {train.get('batch_size')}, "
            f"{train.get('optimizer')} with lr {train.get('lr')}"
            f"{_options(train.get('optimizer_options'))}, reduction {train.get('reduction')}, "
            f"{examples}, {config.get('dtype', 'float32')}"
        )
        groups.setdefault(text, []).append(int(config.get("seed", 0)))
    return [
        f"{text}; {_seeds_text(seeds)} ({count(len(seeds), 'run')})"
        for text, seeds in groups.items()
    ]


def _options(options: Mapping[str, Any] | None) -> str:
    if not options:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(options.items())) + ")"


def machines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per distinct machine in the rows' recorded environments (environment.json)."""
    groups: dict[str, int] = {}
    for row in rows:
        env = row.get("versions") or {}
        if not env:
            text = "not recorded"
        else:
            device = env.get("device", "?")
            if env.get("gpu"):
                device += f" ({env['gpu']}, CUDA {env.get('cuda')})"
            text = (
                f"{env.get('processor') or '?'}, {env.get('cpu_count', '?')} CPUs, "
                f"{env.get('torch_threads', '?')} torch threads, device {device}; "
                f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, "
                f"gfalign {env.get('gfalign', '?')}; {env.get('platform', '?')}"
            )
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
