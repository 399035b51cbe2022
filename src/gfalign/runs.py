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
from dataclasses import dataclass, replace
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
    "execute_stacked",
    "load_checkpoint",
    "read_metrics",
    "stack_marker",
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


class _OpenRun:
    """One run directory while its run goes: opened (resuming), advanced, closed.

    Opening builds the network, rule and ``Trainer`` (loading the checkpoint when resuming)
    and writes ``config.toml``, ``environment.json``, the metric files and a ``running``
    summary; each finished epoch appends a metrics row and, every ``checkpoint_every`` epochs
    and at ``target``, a checkpoint; closing writes the final summary.
    """

    def __init__(
        self,
        config: RunConfig | None,
        directory: Path,
        *,
        resume: bool,
        dataset,
        data_dir,
        metrics: Sequence[Callable[[Trainer], Mapping[str, float]]],
        quiet: bool,
    ) -> None:
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
        self.summary: dict[str, Any] = {
            "status": "running",
            "key": config.key(),
            "label": config.label(),
        }
        _write_json(directory / SUMMARY, self.summary)
        self.config, self.directory, self.trainer = config, directory, trainer
        self.started = time.perf_counter()

    def epoch_done(self, checkpoint_every: int, target: int) -> None:
        """Record the epoch the trainer has just finished."""
        trainer = self.trainer
        _append_metrics(self.directory, trainer.history)
        if trainer.epoch % checkpoint_every == 0 or trainer.epoch == target:
            _save_checkpoint(self.directory, trainer, self.config)

    def stop(self, status: str, **details: Any) -> None:
        """Mark the run ``diverged`` or ``interrupted``; its finished epochs stay recorded."""
        self.summary.update(status=status, epochs=self.trainer.epoch, **details)
        _write_json(self.directory / SUMMARY, self.summary)

    def close(self) -> RunResult:
        trainer, summary = self.trainer, self.summary
        finished = trainer.epoch >= self.config.train.epochs
        summary.update(
            status="finished" if finished else "stopped",
            epochs=trainer.epoch,
            seconds=time.perf_counter() - self.started,
            train_seconds=sum(r["seconds"] for r in trainer.history),
            final=dict(trainer.history[-1]) if trainer.history else {},
        )
        _write_json(self.directory / SUMMARY, summary)
        return RunResult(self.directory, self.config, list(trainer.history), summary)


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
    run = _OpenRun(
        config,
        Path(directory),
        resume=resume,
        dataset=dataset,
        data_dir=data_dir,
        metrics=metrics,
        quiet=quiet,
    )
    trainer, epochs = run.trainer, run.config.train.epochs
    target = epochs if stop_after is None else min(stop_after, epochs)
    try:
        while trainer.epoch < target:
            record = trainer.train_epoch(on_batch)
            run.epoch_done(checkpoint_every, target)
            if on_epoch is not None:
                on_epoch(record)
    except DivergenceError as problem:
        run.stop("diverged", error=str(problem))
        raise
    except KeyboardInterrupt:
        run.stop("interrupted")
        raise
    return run.close()


def stack_marker(config: RunConfig) -> str:
    """Runs with the same marker can train stacked (``execute_stacked``): they differ only in
    the seed and the feedback family."""
    return replace(config, seed=0, feedback="uniform").key()


def execute_stacked(
    configs: Sequence[RunConfig],
    directories: Sequence[str | Path],
    *,
    resume: bool = False,
    data_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    on_epoch: Callable[[dict[int, dict[str, float]]], None] | None = None,
    stop_after: int | None = None,
    quiet: bool = True,
    dataset=None,
) -> list[RunResult | DivergenceError]:
    """Run (or resume) several configurations as one stacked computation (``EnsembleTrainer``).

    Each run keeps its own directory, written exactly as ``execute`` writes it, and can be
    resumed by either function. The configurations may differ only in ``seed`` and
    ``feedback`` (``stack_marker``). Members resumed at different epochs first catch up alone.
    A member's results equal its ``execute`` run up to floating-point rounding; its records
    carry ``stacked`` (the members of that epoch's stack) and ``seconds`` is its share of
    the stack's time, so summed seconds stay the compute spent.

    Returns:
        One entry per configuration: its ``RunResult``, or the ``DivergenceError`` of a member
        whose loss stopped being finite (its directory says ``diverged``; the others go on).

    Raises:
        ConfigError: configurations that cannot stack, or as for ``execute``.
        RunError: as for ``execute``.
    """
    from gfalign.ensemble import EnsembleTrainer

    configs, directories = list(configs), [Path(d) for d in directories]
    if not configs or len(configs) != len(directories):
        raise ConfigError(
            f"execute_stacked needs one directory per configuration, "
            f"got {len(configs)} configurations and {len(directories)} directories"
        )
    marker = stack_marker(configs[0])
    for config in configs[1:]:
        if stack_marker(config) != marker:
            raise ConfigError(
                f"{config.label()} cannot stack with {configs[0].label()}: stacked runs may "
                "differ only in seed and feedback family"
            )
    if dataset is None:
        device = resolve_device(configs[0].device)
        dataset = load_data(configs[0], device, data_dir=data_dir, quiet=quiet)
    runs = [
        _OpenRun(c, d, resume=resume, dataset=dataset, data_dir=data_dir, metrics=(), quiet=quiet)
        for c, d in zip(configs, directories, strict=True)
    ]
    # Every member trains on one dataset object, which the ensemble requires.
    shared = runs[0].trainer.data
    for run in runs:
        run.trainer.data = shared
    epochs = configs[0].train.epochs
    target = epochs if stop_after is None else min(stop_after, epochs)
    outcome: dict[int, RunResult | DivergenceError] = {}
    try:
        # Members resumed behind the others catch up alone.
        level = min(max(run.trainer.epoch for run in runs), target)
        for k, run in enumerate(runs):
            try:
                while run.trainer.epoch < level:
                    run.trainer.train_epoch()
                    run.epoch_done(checkpoint_every, target)
            except DivergenceError as problem:
                run.stop("diverged", error=str(problem))
                outcome[k] = problem
        members = [k for k in range(len(runs)) if k not in outcome]
        if members and level < target:
            ensemble = EnsembleTrainer.from_trainers([runs[k].trainer for k in members])
            while ensemble.active and ensemble.epoch < target:
                size = len(ensemble.active)
                records = ensemble.train_epoch()
                for position, record in records.items():
                    record["seconds"] /= size
                    record["stacked"] = size
                    runs[members[position]].epoch_done(checkpoint_every, target)
                for position, problem in ensemble.errors.items():
                    k = members[position]
                    if k not in outcome:
                        runs[k].stop("diverged", error=str(problem))
                        outcome[k] = problem
                if on_epoch is not None:
                    on_epoch({members[position]: r for position, r in records.items()})
    except KeyboardInterrupt:
        for k, run in enumerate(runs):
            if k not in outcome:
                run.stop("interrupted")
        raise
    return [outcome[k] if k in outcome else run.close() for k, run in enumerate(runs)]
