"""Run records: one directory per run, written as the run goes, resumable.

A run directory holds

    config.toml        the resolved configuration (``RunConfig``), enough to rerun it
    metrics.csv        one row per finished epoch, appended as the run goes
    metrics.jsonl      the same rows as JSON lines
    checkpoint.pt      network, feedback matrices, optimizer, data-order generator, history;
                       written atomically every ``checkpoint_every`` epochs and at the end,
                       readable with ``torch.load(weights_only=True)`` (no pickled objects)
    environment.json   versions, device, threads, machine
    summary.json       status (running, finished, diverged) and the final metrics

A killed run keeps every finished epoch; ``execute(config, directory, resume=True)`` (the CLI's
``gfalign train --resume DIR``) continues from the last checkpoint and reaches the same numbers
as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gfalign.config import RunConfig, resolve_device
from gfalign.engine import FeedbackRule
from gfalign.network import MLP
from gfalign.rules import ConfigError
from gfalign.train import DivergenceError, Trainer

__all__ = [
    "RunError",
    "RunResult",
    "build",
    "environment",
    "execute",
    "load_checkpoint",
    "read_metrics",
]

CONFIG, CHECKPOINT, SUMMARY = "config.toml", "checkpoint.pt", "summary.json"
METRICS_CSV, METRICS_JSONL, ENVIRONMENT = "metrics.csv", "metrics.jsonl", "environment.json"


class RunError(RuntimeError):
    """A run directory that cannot be used: not writable, missing files, corrupt checkpoint."""


@dataclass(frozen=True)
class RunResult:
    """What ``execute`` returns: the directory, the history and the final summary."""

    directory: Path
    config: RunConfig
    history: list[dict[str, float]]
    summary: dict[str, Any]


def load_data(config: RunConfig, device: torch.device, *, data_dir=None, quiet: bool = False):
    """The dataset a configuration names, on ``device``, cut to its subsets."""
    from gfalign import data as datasets

    if config.dataset == "synthetic":
        dataset = datasets.synthetic(seed=0)
    else:
        dataset = datasets.load(
            config.dataset, root=data_dir, validation=config.validation, quiet=quiet
        )
    if config.train_subset is not None or config.test_subset is not None:
        dataset = type(dataset)(
            dataset.name,
            dataset.train.subset(config.train_subset or len(dataset.train)),
            dataset.test.subset(config.test_subset or len(dataset.test)),
            dataset.validation,
        )
    return dataset.to(device=device, dtype=config.torch_dtype)


def build(config: RunConfig, device: torch.device | str = "cpu") -> tuple[MLP, FeedbackRule]:
    """The network and the rule a configuration describes, freshly initialised."""
    net = MLP(
        config.sizes,
        config.activation,
        config.objective,
        weight_init=config.weight_init,
        bias_init=config.bias_init,
        seed=config.seed,
        dtype=config.torch_dtype,
        device=device,
    )
    rule = FeedbackRule(
        config.rule_config(),
        config.sizes,
        seed=config.seed,
        dtype=config.torch_dtype,
        device=device,
    )
    return net, rule


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded with every run."""
    import numpy

    from gfalign import __version__

    info: dict[str, Any] = {
        "gfalign": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _write_atomic(path: Path, writer: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    writer(temporary)
    os.replace(temporary, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def _columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for record in history:
        columns.extend(k for k in record if k not in columns)
    return columns


def _rewrite_metrics(directory: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Make the metric files hold exactly ``history`` (after a resume drops later epochs)."""

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=_columns(history) or ["epoch"])
            writer.writeheader()
            writer.writerows(history)

    _write_atomic(directory / METRICS_CSV, write_csv)
    _write_atomic(
        directory / METRICS_JSONL,
        lambda p: p.write_text("".join(json.dumps(dict(r)) + "\n" for r in history)),
    )


def _append_metrics(directory: Path, history: Sequence[Mapping[str, Any]]) -> None:
    record = history[-1]
    csv_path = directory / METRICS_CSV
    with csv_path.open("r", newline="") as handle:
        header = next(csv.reader(handle), [])
    if list(record) != header or len(history) == 1:
        _rewrite_metrics(directory, history)  # a new column (or the first row): rewrite whole
        return
    with csv_path.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=header).writerow(record)
        handle.flush()
        os.fsync(handle.fileno())
    with (directory / METRICS_JSONL).open("a") as handle:
        handle.write(json.dumps(dict(record)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory."""
    path = Path(directory) / METRICS_JSONL
    if not path.exists():
        raise RunError(f"{directory} is not a run directory: it has no {METRICS_JSONL}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"no checkpoint at {path}") from None
    except Exception as problem:  # noqa: BLE001 - any unpickling refusal or corruption
        raise RunError(
            f"refusing to load {path}: it is not a plain gfalign checkpoint "
            f"(tensors and plain data only). {type(problem).__name__}: {str(problem)[:300]}"
        ) from None


def _save_checkpoint(directory: Path, trainer: Trainer, config: RunConfig) -> None:
    state = trainer.state_dict()
    state["config"] = config.to_data()
    _write_atomic(directory / CHECKPOINT, lambda p: torch.save(state, p))


def _prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as problem:
        raise RunError(f"output directory {directory} is not writable: {problem}") from None


def default_directory(config: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-<rule>-<key>``: unique and sortable."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config.rule_name}-{config.key()[:8]}"


def execute(
    config: RunConfig | None,
    directory: str | Path,
    *,
    resume: bool = False,
    data_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    metrics: Sequence[Callable[[Trainer], Mapping[str, float]]] = (),
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    stop_after: int | None = None,
    quiet: bool = True,
    dataset=None,
) -> RunResult:
    """Run (or resume) one configuration, writing its record into ``directory``.

    Args:
        config: the run; ``None`` with ``resume=True`` reads ``directory/config.toml``.
        directory: the run directory (created).
        resume: continue from ``directory/checkpoint.pt``; a directory without a checkpoint
            starts from scratch, so a sweep can call this on every unfinished run.
        data_dir: where the dataset files are (else GFALIGN_DATA, the cache, the mirrors).
        checkpoint_every: epochs between checkpoints (one is always written at the end).
        metrics: extra per-epoch measurements (see ``Trainer``); alignment is added by itself
            when ``config.alignment`` is set.
        on_epoch, on_batch: progress callbacks.
        stop_after: stop (as if killed) once this many epochs in total are done; for tests.
        dataset: an already loaded ``Dataset`` to use instead of loading ``config.dataset``.

    Raises:
        ConfigError: the configuration (or CUDA asked for without a GPU).
        RunError: an unusable directory or checkpoint.
        DivergenceError: a non-finite loss; the finished epochs stay recorded.
    """
    directory = Path(directory)
    checkpoint = None
    if resume:
        if config is None:
            config = RunConfig.from_toml(directory / CONFIG)
        if (directory / CHECKPOINT).exists():
            checkpoint = load_checkpoint(directory / CHECKPOINT)
    if config is None:
        raise ConfigError("execute needs a configuration unless it resumes a run directory")
    device = resolve_device(config.device)
    _prepare_directory(directory)

    if dataset is None:
        dataset = load_data(config, device, data_dir=data_dir, quiet=quiet)
    else:
        dataset = dataset.to(device=device, dtype=config.torch_dtype)
    net, rule = build(config, device)
    probes = list(metrics)
    if config.alignment:
        from gfalign.alignment import alignment_metric

        probes.append(alignment_metric(dataset, size=config.alignment_probe))
    trainer = Trainer(net, rule, dataset, config.train, metrics=probes)
    if checkpoint is not None:
        if RunConfig.from_data(checkpoint["config"]).key() != config.key():
            raise RunError(f"{directory / CHECKPOINT} belongs to another configuration")
        trainer.load_state_dict(checkpoint)

    (directory / CONFIG).write_text(config.to_toml())
    _write_json(directory / ENVIRONMENT, environment(device))
    _rewrite_metrics(directory, trainer.history)
    summary: dict[str, Any] = {"status": "running", "key": config.key(), "label": config.label()}
    _write_json(directory / SUMMARY, summary)

    target = config.train.epochs if stop_after is None else min(stop_after, config.train.epochs)
    started = time.perf_counter()
    try:
        while trainer.epoch < target:
            record = trainer.train_epoch(on_batch)
            _append_metrics(directory, trainer.history)
            if trainer.epoch % checkpoint_every == 0 or trainer.epoch == target:
                _save_checkpoint(directory, trainer, config)
            if on_epoch is not None:
                on_epoch(record)
    except DivergenceError as problem:
        summary.update(status="diverged", error=str(problem), epochs=trainer.epoch)
        _write_json(directory / SUMMARY, summary)
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", epochs=trainer.epoch)
        _write_json(directory / SUMMARY, summary)
        raise
    finished = trainer.epoch >= config.train.epochs
    summary.update(
        status="finished" if finished else "stopped",
        epochs=trainer.epoch,
        seconds=time.perf_counter() - started,
        train_seconds=sum(r["seconds"] for r in trainer.history),
        final=dict(trainer.history[-1]) if trainer.history else {},
    )
    _write_json(directory / SUMMARY, summary)
    return RunResult(directory, config, list(trainer.history), summary)
