"""Run an experiment's grid into a results store, resumably.

Every run has its directory ``root_dir/<key>``; ``execute(..., resume=True)`` continues an
unfinished one from its checkpoint, and a run the store already holds as finished (or
diverged: deterministic, it would diverge again) is skipped. Only this coordinating process
writes the store: workers return their summaries, histories and versions to it. The ``local``
backend runs in this process (``jobs=1``) or a spawn process pool; the ``ray`` backend makes
each job one Ray task, on a Ray started here or on an existing cluster. A job is one run, or
with ``stack`` several seeds of a cell trained as one stacked computation (``gfalign.ensemble``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import Experiment, load
from gfalign.store import Store

__all__ = ["BACKENDS", "DONE", "QUICK", "Progress", "configs_for", "run_sweep"]

DONE = ("finished", "diverged")
QUICK = {"train_subset": 512, "test_subset": 256, "epochs": 1}
BACKENDS = ("local", "ray")
NEEDS_RAY = "the ray backend needs Ray: pip install 'gfalign[ray]'"


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told after each run: ``status`` is ``skipped``,
    ``finished`` or ``diverged``."""

    done: int
    total: int
    config: RunConfig
    status: str
    final: dict[str, Any]


def configs_for(
    experiment: Experiment,
    *,
    seeds: int | Sequence[int] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    only: Sequence[str] = (),
    device: str | None = None,
) -> list[RunConfig]:
    """The runs a sweep does: grid x seeds, ``quick`` cutting data and epochs (CI speed).

    ``quick`` never enlarges a subset the experiment's base already sets. ``only`` keeps the
    runs whose cell name (``"2x800 tanh s1"``) contains any of its strings. ``device``
    (``cpu``, ``cuda``, ``auto``) replaces the experiment's; it is not part of a run's key, so
    a run started on one device can finish on another.
    """
    overrides: dict[str, Any] = {}
    if quick:
        base = experiment.base
        overrides = dict(QUICK)
        for name in ("train_subset", "test_subset"):
            given = getattr(base, name)
            if given is not None:
                overrides[name] = min(given, QUICK[name])
    if epochs is not None:
        overrides["epochs"] = epochs
    if device is not None:
        overrides["device"] = device
    configs = experiment.expand(seeds, **overrides)
    if only:
        configs = [c for c in configs if any(text in experiment.cell(c) for text in only)]
    return configs


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    """In a pool worker: end this process when the coordinator ``parent`` is gone.

    A coordinator killed outright (SIGKILL, SIGTERM, a closed terminal) cannot stop its pool,
    and an orphaned worker would go on training a run nobody stores, beside the worker of a
    resumed sweep writing the same run directory.
    """
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="gfalign-parent-watch", daemon=True).start()


def _work(group: list[dict], directories: list[str], data_dir: str | None, threads: int) -> list:
    """One job in a worker process (a run, or runs to stack); plain data for the coordinator."""
    import torch

    torch.set_num_threads(threads)
    configs = [RunConfig.from_data(data) for data in group]
    return _execute_group(configs, [Path(d) for d in directories], data_dir, None)


def _execute_group(configs: list[RunConfig], directories: list[Path], data_dir, dataset) -> list:
    """A job: one run as ``execute`` does it, or several stacked (``execute_stacked``)."""
    from gfalign.runs import execute_stacked
    from gfalign.train import DivergenceError

    if len(configs) == 1:
        return [_execute(configs[0], directories[0], data_dir, dataset)]
    results = execute_stacked(configs, directories, resume=True, data_dir=data_dir, dataset=dataset)
    return [
        _out(directory, None if isinstance(result, DivergenceError) else result)
        for result, directory in zip(results, directories, strict=True)
    ]


def _execute(config: RunConfig, directory: Path, data_dir, dataset) -> dict:
    from gfalign.runs import execute
    from gfalign.train import DivergenceError

    try:
        result = execute(config, directory, resume=True, data_dir=data_dir, dataset=dataset)
    except DivergenceError:
        result = None
    return _out(directory, result)


def _out(directory: Path, result) -> dict:
    """What the coordinator stores of a run: summary, history and versions, read back from
    its directory when it diverged (``result`` None)."""
    from gfalign.runs import SUMMARY

    if result is None:
        summary, history = json.loads((directory / SUMMARY).read_text()), _history(directory)
    else:
        summary, history = result.summary, result.history
    return {"summary": summary, "history": history, "versions": _versions(directory)}


def _history(directory: Path) -> list[dict]:
    from gfalign.runs import METRICS_JSONL

    path = directory / METRICS_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _versions(directory: Path) -> dict:
    from gfalign.runs import ENVIRONMENT

    path = directory / ENVIRONMENT
    return json.loads(path.read_text()) if path.exists() else {}


def _record(store: Store, experiment: str, config: RunConfig, out: dict) -> str:
    summary, history = out["summary"], out["history"]
    status = str(summary.get("status", "unknown"))
    final = summary.get("final") or (dict(history[-1]) if history else {})
    seconds = summary.get("train_seconds")
    if seconds is None:
        seconds = sum(float(r.get("seconds", 0.0)) for r in history)
    store.upsert(
        config.key(),
        experiment=experiment,
        label=config.label(),
        config=config.to_data(),
        status=status,
        epochs_done=int(summary.get("epochs", len(history))),
        final=final,
        history=history,
        seconds=seconds,
        versions=out["versions"],
    )
    return status


def run_sweep(
    experiment: Experiment | str,
    store: Store,
    root_dir: str | Path,
    *,
    seeds: int | Sequence[int] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    only: Sequence[str] = (),
    jobs: int = 1,
    backend: str = "local",
    address: str | None = None,
    cpus_per_run: int = 1,
    data_dir: str | Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    configs: Sequence[RunConfig] | None = None,
    stack: int = 1,
    device: str | None = None,
) -> dict[str, int]:
    """Run every configuration not yet done; returns counts by status (``skipped`` ...).

    Args:
        experiment: an ``Experiment`` or a preset name.
        store: where rows are written (by this process only).
        root_dir: run directories go to ``root_dir/<key>``; on a Ray cluster the workers write
            there too, so resuming an unfinished run needs it on a shared filesystem.
        seeds: ``None`` the protocol's, an int N the first N, or a list.
        epochs: replaces the protocol's epoch count.
        quick: 512 training and 256 test examples, 1 epoch (hidden widths kept).
        only: keep the cells whose name contains any of these strings.
        jobs: ``local`` backend: worker processes; 1 runs in this process.
        backend: ``local`` or ``ray`` (one Ray task per job; needs ``gfalign[ray]``).
        address: ``ray`` backend: the cluster to join (``auto``, ``ray://host:10001``);
            ``None`` starts a local Ray. A Ray already initialised here is used as it is.
        cpus_per_run: ``ray`` backend: CPUs each job asks for (and its torch threads).
        data_dir: where the dataset files are.
        progress: called after each run (and each skip) with a ``Progress``.
        configs: the runs to do, instead of those ``seeds``/``epochs``/``quick`` give.
        stack: train up to this many runs of a cell (its seeds; exp4's feedback families too)
            as one stacked computation (``gfalign.runs.execute_stacked``), one job for a
            worker. Faster for small networks and on a GPU; each run's numbers equal its
            unstacked run's up to floating-point rounding.
        device: where the runs train (``cpu``, ``cuda``, ``auto``), instead of the
            experiment's; not part of a run's key.

    Raises:
        ImportError: ``backend="ray"`` without Ray installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if stack < 1:
        raise ValueError(f"stack must be at least 1, got {stack}")
    if backend == "ray":
        _import_ray()
    if isinstance(experiment, str):
        experiment = load(experiment)
    if configs is None:
        configs = configs_for(
            experiment, seeds=seeds, epochs=epochs, quick=quick, only=only, device=device
        )
    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = None if data_dir is None else str(data_dir)
    counts: dict[str, int] = {}
    total = len(configs)
    state = {"done": 0}

    def report(config: RunConfig, status: str, final: dict) -> None:
        counts[status] = counts.get(status, 0) + 1
        state["done"] += 1
        if progress is not None:
            progress(Progress(state["done"], total, config, status, final))

    def finish(config: RunConfig, out: dict) -> None:
        """Store one run's result (every backend comes through here), then report it."""
        status = _record(store, experiment.name, config, out)
        report(config, status, store.get(config.key())["final"])

    todo: list[RunConfig] = []
    for config in configs:
        row = store.get(config.key())
        if row is not None and row["status"] in DONE:
            report(config, "skipped", row["final"])
        else:
            todo.append(config)

    if not todo:
        return counts
    groups = _groups(todo, stack)
    if backend == "ray":
        _on_ray(groups, root, data, finish, address, cpus_per_run)
    elif jobs > 1:
        _in_pool(groups, root, data, finish, jobs)
    else:
        cache: dict[tuple, Any] = {}
        for group in groups:
            dataset = _dataset(group[0], data, cache)
            directories = [root / c.key() for c in group]
            for config, out in zip(
                group, _execute_group(group, directories, data, dataset), strict=True
            ):
                finish(config, out)
    return counts


def _groups(todo: Sequence[RunConfig], stack: int) -> list[list[RunConfig]]:
    """The jobs: runs that can stack (``stack_marker``) in groups of at most ``stack``."""
    from gfalign.runs import stack_marker

    if stack == 1:
        return [[config] for config in todo]
    by_marker: dict[str, list[RunConfig]] = {}
    for config in todo:
        by_marker.setdefault(stack_marker(config), []).append(config)
    return [
        members[start : start + stack]
        for members in by_marker.values()
        for start in range(0, len(members), stack)
    ]


def _in_pool(groups, root: Path, data, finish, jobs: int) -> None:
    """The jobs in a spawn process pool of ``jobs`` workers, stored in completion order."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_watch_parent, initargs=(os.getpid(),)
    ) as pool:
        pending = {pool.submit(_work, *_job(group, root), data, threads): group for group in groups}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    group = pending.pop(future)
                    for config, out in zip(group, future.result(), strict=True):
                        finish(config, out)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _job(group: list[RunConfig], root: Path) -> tuple[list[dict], list[str]]:
    return [c.to_data() for c in group], [str(root / c.key()) for c in group]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(NEEDS_RAY) from None
    return ray


def _on_ray(groups, root: Path, data, finish, address: str | None, cpus_per_run: int) -> None:
    """Each job as one Ray task asking for ``cpus_per_run`` CPUs (and a GPU for CUDA runs)."""
    ray = _import_ray()
    # workers need not share this process's working directory
    root = root.resolve()
    data = None if data is None else str(Path(data).resolve())
    started = not ray.is_initialized()
    if started:
        local = {"include_dashboard": False} if address is None else {}
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **local)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        task = ray.remote(_work)
        pending = {}
        for group in groups:
            device = group[0].device
            cuda = device.startswith("cuda") or (device == "auto" and gpus)
            options = task.options(num_cpus=cpus_per_run, num_gpus=int(cuda))
            pending[options.remote(*_job(group, root), data, cpus_per_run)] = group
        try:
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    group = pending.pop(ref)
                    for config, out in zip(group, ray.get(ref), strict=True):
                        finish(config, out)
        except BaseException:
            # force: end the worker process. A task interrupted inside an import (torch
            # imports lazily) would leave a half-initialized module to the next task there.
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _dataset(config: RunConfig, data_dir, cache: dict):
    """Load each distinct dataset once per sequential sweep."""
    from gfalign.config import resolve_device
    from gfalign.runs import load_data

    device = resolve_device(config.device)
    marker = (
        config.dataset,
        config.train_subset,
        config.test_subset,
        config.validation,
        config.dtype,
        str(device),
    )
    if marker not in cache:
        cache.clear()
        cache[marker] = load_data(config, device, data_dir=data_dir, quiet=True)
    return cache[marker]
