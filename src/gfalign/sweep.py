"""Run an experiment's grid into a results store, resumably, beside other sweeps.

Every run has its directory ``root_dir/<key>``; ``execute(..., resume=True)`` continues an
unfinished one from its checkpoint, and a run the store already holds as finished (or
diverged: deterministic, it would diverge again) is skipped. Only this coordinating process
writes the store: workers return their summaries, histories and versions to it. The ``local``
backend runs in this process (``jobs=1``) or a spawn process pool; the ``ray`` backend makes
each job one Ray task, on a Ray started here or on an existing cluster. A job is one run, or
with ``stack`` several seeds of a cell trained as one stacked computation (``gfalign.ensemble``).

Two sweeps may share a store and a runs directory: a run is trained by one process at a time.
Whoever trains a run holds its claim (``gfalign.claims``: an operating-system lock on the run
directory, released when its holder exits, however it exits, so a dead sweep's claims expire by
themselves). Right before a job starts, the store is read again (another sweep may have
finished the run meanwhile: it is skipped) and, where the job runs, each run directory is
tried: a run whose directory is already finished is recorded from it without training, a run
another process holds is left for later (reported ``busy``) and the others are trained. For a
stacked job, the free members train together and the busy ones wait. Once nothing else is
left, the busy runs are tried again every ``POLL`` seconds: finished by the other process,
they are skipped; released unfinished (their holder died), they resume from their checkpoint.
A store that cannot be written loses nothing: the run directories keep the results, and the
same sweep run again records them without training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfalign.claims import RunBusyError, claim
from gfalign.config import RunConfig
from gfalign.experiments import Experiment, load
from gfalign.store import Store, StoreError

__all__ = ["BACKENDS", "DONE", "POLL", "QUICK", "Progress", "configs_for", "run_sweep"]

DONE = ("finished", "diverged")
# Seconds between tries of the runs another process holds, once nothing else is left.
POLL = 2.0
QUICK = {"train_subset": 512, "test_subset": 256, "epochs": 1}
BACKENDS = ("local", "ray")
NEEDS_RAY = "the ray backend needs Ray: pip install 'gfalign[ray]'"


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told after each run: ``status`` is ``skipped``,
    ``finished`` or ``diverged`` (``detail`` says so when the run was recorded from its
    finished directory, not trained); and once for each run found ``busy`` (held by another
    process: ``detail`` says which; ``done`` is not advanced, the run is tried again later)."""

    done: int
    total: int
    config: RunConfig
    status: str
    final: dict[str, Any]
    detail: str = ""


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
    return _execute_group(configs, [Path(d) for d in directories], data_dir, lambda: None)


def _execute_group(
    configs: list[RunConfig], directories: list[Path], data_dir, dataset: Callable[[], Any]
) -> list[dict]:
    """A job where it runs: each run recorded from its finished directory, left ``busy`` when
    another process holds it, else trained (one as ``execute`` does it, several stacked with
    ``execute_stacked``). ``dataset`` gives the loaded dataset, or None to let them load it.

    Returns one entry per run: what ``_out`` gives (``trained`` says whether this job trained
    it), or ``{"busy": why}``.
    """
    from gfalign.runs import execute_stacked
    from gfalign.train import DivergenceError

    outs: list[dict | None] = [None] * len(configs)
    free = []
    for k, (config, directory) in enumerate(zip(configs, directories, strict=True)):
        holder = _holder(directory)
        if holder is not None:
            outs[k] = {"busy": _held_by(holder)}
        elif (done := _done_out(config, directory)) is not None:
            outs[k] = done
        else:
            free.append(k)
    try:
        if len(free) == 1:
            k = free[0]
            outs[k] = _execute(configs[k], directories[k], data_dir, dataset())
        elif free:
            before = [len(_history(directories[k])) for k in free]
            results = execute_stacked(
                [configs[k] for k in free],
                [directories[k] for k in free],
                resume=True,
                data_dir=data_dir,
                dataset=dataset(),
            )
            for k, epochs, result in zip(free, before, results, strict=True):
                if isinstance(result, DivergenceError):
                    outs[k] = _out(directories[k], None)
                else:
                    outs[k] = {
                        **_out(directories[k], result),
                        "trained": len(result.history) > epochs,
                    }
    except RunBusyError as busy:
        # Claimed between the try above and the start: the whole job waits.
        for k in free:
            outs[k] = {"busy": _held_by(busy)}
    return outs


def _holder(directory: Path) -> RunBusyError | None:
    """Who holds ``directory`` now (another live process), or None when it is free."""
    from gfalign.claims import LOCK

    if not (directory / LOCK).exists():
        return None
    try:
        with claim(directory):
            return None
    except RunBusyError as busy:
        return busy


def _held_by(busy: RunBusyError) -> str:
    owner = busy.owner or {}
    if not owner.get("pid"):
        return "trained by another process"
    since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"trained by process {owner['pid']} on {owner.get('host')} since {since}"


def _done_out(config: RunConfig, directory: Path) -> dict | None:
    """What ``_out`` gives of a run whose directory is already finished (or diverged), else
    None: a sweep that could not store it, or another sweep, trained it there."""
    from gfalign.runs import SUMMARY

    try:
        summary = json.loads((directory / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("key") != config.key():
        return None
    status = summary.get("status")
    complete = summary.get("epochs") == config.train.epochs or summary.get("stopped_early")
    if status == "finished" and complete:
        return {**_out(directory, None), "trained": False}
    if status == "diverged":
        return {**_out(directory, None), "trained": False}
    return None


def _execute(config: RunConfig, directory: Path, data_dir, dataset) -> dict:
    from gfalign.runs import execute
    from gfalign.train import DivergenceError

    epochs: list[dict] = []
    try:
        result = execute(
            config,
            directory,
            resume=True,
            data_dir=data_dir,
            dataset=dataset,
            on_epoch=epochs.append,
        )
    except DivergenceError:
        return _out(directory, None)
    # No epoch trained: another process finished the run between this job's look at its
    # directory and the claim execute took.
    return {**_out(directory, result), "trained": bool(epochs)}


def _out(directory: Path, result) -> dict:
    """What the coordinator stores of a run: summary, history and versions, read back from
    its directory when it diverged (``result`` None)."""
    from gfalign.runs import SUMMARY

    if result is None:
        summary, history = json.loads((directory / SUMMARY).read_text()), _history(directory)
    else:
        summary, history = result.summary, result.history
    return {
        "summary": summary,
        "history": history,
        "versions": _versions(directory),
        "trained": True,
    }


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


class _Queue:
    """The jobs of a sweep, in order, with the busy runs kept for later.

    ``take`` gives the next job, its runs read again from the store right before it starts
    (stored ones are reported skipped); ``finish`` stores a run's result, or keeps a busy run;
    the busy runs come back, regrouped, once nothing else waits and ``POLL`` seconds passed.
    """

    def __init__(
        self,
        groups: Iterable[list[RunConfig]],
        stack: int,
        store: Store,
        experiment: str,
        root: Path,
        report: Callable[..., None],
    ) -> None:
        self.waiting = deque(groups)
        self.busy: list[RunConfig] = []
        self.told: set[str] = set()
        self.stack, self.store, self.experiment, self.root = stack, store, experiment, root
        self.report = report
        self.since = time.monotonic()

    def stored(self, config: RunConfig) -> bool:
        """Report ``config`` skipped when the store already holds it done."""
        row = self.store.get(config.key())
        if row is not None and row["status"] in DONE:
            self.report(config, "skipped", row["final"])
            return True
        return False

    def take(self) -> list[RunConfig] | None:
        """The next job to start, or None when none waits (busy ones may come back later)."""
        while True:
            if not self.waiting and self.busy and self.wait_left() == 0:
                self.waiting.extend(_groups(self.busy, self.stack))
                self.busy = []
            if not self.waiting:
                return None
            group = [c for c in self.waiting.popleft() if not self.stored(c)]
            if group:
                return group

    def wait_left(self) -> float | None:
        """Seconds until the busy runs are tried again (None: there are none)."""
        if not self.busy:
            return None
        return max(0.0, POLL - (time.monotonic() - self.since))

    @property
    def open(self) -> bool:
        return bool(self.waiting or self.busy)

    def finish(self, config: RunConfig, out: dict) -> None:
        """Store one run's result (every backend comes through here), then report it."""
        if "busy" in out:
            self.busy.append(config)
            self.since = time.monotonic()
            if config.key() not in self.told:
                self.told.add(config.key())
                self.report(config, "busy", {}, out["busy"])
            return
        if not out["trained"] and self.stored(config):
            return  # finished by another sweep, which has stored it meanwhile
        try:
            status = _record(self.store, self.experiment, config, out)
        except StoreError as error:
            raise StoreError(
                f"{error}; the results stay in their run directories under {self.root}: "
                "rerun the same command once the store can be written, and it records "
                "them without training again"
            ) from error
        detail = "" if out["trained"] else "recorded from its run directory, not trained again"
        self.report(config, status, self.store.get(config.key())["final"], detail)


def _drive(queue: _Queue, slots: float, start: Callable, collect: Callable, pending: dict) -> None:
    """Run the queue's jobs, at most ``slots`` at a time.

    ``start(group)`` starts a job and returns its handle; ``collect(handles, timeout)``
    returns ``(handle, outs)`` for the jobs that ended within ``timeout`` seconds (None:
    at least one). ``pending`` (handle: job) holds the jobs started and not yet collected,
    so a caller can stop them when this raises.
    """
    while queue.open or pending:
        while len(pending) < slots and (group := queue.take()) is not None:
            pending[start(group)] = group
        if pending:
            for handle, outs in collect(list(pending), queue.wait_left()):
                for config, out in zip(pending.pop(handle), outs, strict=True):
                    queue.finish(config, out)
        elif queue.busy:
            time.sleep(queue.wait_left() or 0.0)


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

    Runs another process holds (another sweep on the same runs directory, a ``gfalign train
    --resume``) are left to it and tried again once the rest is done, so this returns when
    every run is done, by this process or another.

    Args:
        experiment: an ``Experiment`` or a preset name; with ``configs``, any name the
            store records the runs under (``tune:mnist-2x800-s1``).
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
        progress: called after each run (and each skip) with a ``Progress``, and once for
            each run found busy.
        configs: the runs to do, instead of those ``seeds``/``epochs``/``quick`` give.
        stack: train up to this many runs of a cell (its seeds; exp4's feedback families too)
            as one stacked computation (``gfalign.runs.execute_stacked``), one job for a
            worker. Faster for small networks and on a GPU; each run's numbers equal its
            unstacked run's up to floating-point rounding.
        device: where the runs train (``cpu``, ``cuda``, ``auto``), instead of the
            experiment's; not part of a run's key.

    Raises:
        ImportError: ``backend="ray"`` without Ray installed.
        RunError: ``root_dir`` cannot be created or written.
        StoreError: the store cannot be read or written; the run directories keep every
            result, and the same sweep run again records them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if stack < 1:
        raise ValueError(f"stack must be at least 1, got {stack}")
    if backend == "ray":
        _import_ray()
    name = experiment if isinstance(experiment, str) else experiment.name
    if configs is None:
        if isinstance(experiment, str):
            experiment = load(experiment)
        configs = configs_for(
            experiment, seeds=seeds, epochs=epochs, quick=quick, only=only, device=device
        )
    root = Path(root_dir)
    _writable(root)
    data = None if data_dir is None else str(data_dir)
    counts: dict[str, int] = {}
    total = len(configs)
    state = {"done": 0}

    def report(config: RunConfig, status: str, final: dict, detail: str = "") -> None:
        if status != "busy":
            counts[status] = counts.get(status, 0) + 1
            state["done"] += 1
        if progress is not None:
            progress(Progress(state["done"], total, config, status, final, detail))

    queue = _Queue((), stack, store, name, root, report)
    todo = [config for config in configs if not queue.stored(config)]
    if not todo:
        return counts
    queue.waiting.extend(_groups(todo, stack))
    if backend == "ray":
        _on_ray(queue, root, data, address, cpus_per_run)
    elif jobs > 1:
        _in_pool(queue, root, data, jobs)
    else:
        _here(queue, root, data)
    return counts


def _writable(root: Path) -> None:
    """Create ``root`` and check it can hold run directories."""
    from gfalign.runs import RunError

    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunError(
            f"cannot put run directories in {root} ({error.strerror or error}); "
            "choose a writable runs directory"
        ) from None


def _groups(todo: Sequence[RunConfig], stack: int) -> list[list[RunConfig]]:
    """The jobs: runs that can stack (``stack_marker``) in groups of at most ``stack``; a run
    whose training cannot stack at all (``stacking_problem``: clipping, early stopping) alone."""
    from gfalign.runs import stack_marker
    from gfalign.train import stacking_problem

    if stack == 1:
        return [[config] for config in todo]
    by_marker: dict[str, list[RunConfig]] = {}
    for config in todo:
        alone = stacking_problem(config.train) is not None
        by_marker.setdefault(config.key() if alone else stack_marker(config), []).append(config)
    return [
        members[start : start + stack]
        for members in by_marker.values()
        for start in range(0, len(members), stack)
    ]


def _here(queue: _Queue, root: Path, data) -> None:
    """The jobs one after another in this process, each dataset loaded once."""
    cache: dict[tuple, Any] = {}
    ended: dict[int, list[dict]] = {}

    def start(group: list[RunConfig]) -> int:
        directories = [root / c.key() for c in group]
        ended[id(group)] = _execute_group(
            group, directories, data, lambda: _dataset(group[0], data, cache)
        )
        return id(group)

    def collect(handles: list[int], timeout) -> list:
        return [(handle, ended.pop(handle)) for handle in handles]

    _drive(queue, 1, start, collect, {})


def _in_pool(queue: _Queue, root: Path, data, jobs: int) -> None:
    """The jobs in a spawn process pool of ``jobs`` workers, stored in completion order; a
    job is handed to a worker only when one is free, so the store is read right before."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_watch_parent, initargs=(os.getpid(),)
    ) as pool:

        def start(group: list[RunConfig]):
            return pool.submit(_work, *_job(group, root), data, threads)

        def collect(futures: list, timeout: float | None) -> list:
            if timeout is None:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            else:
                finished, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
            return [(future, future.result()) for future in finished]

        pending: dict = {}
        try:
            _drive(queue, jobs, start, collect, pending)
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


def _on_ray(queue: _Queue, root: Path, data, address: str | None, cpus_per_run: int) -> None:
    """Each job as one Ray task asking for ``cpus_per_run`` CPUs (and a GPU for CUDA runs);
    every job is handed to Ray at once, and Ray queues what the cluster cannot yet run."""
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

        def start(group: list[RunConfig]):
            device = group[0].device
            cuda = device.startswith("cuda") or (device == "auto" and gpus)
            options = task.options(num_cpus=cpus_per_run, num_gpus=int(cuda))
            return options.remote(*_job(group, root), data, cpus_per_run)

        def collect(refs: list, timeout: float | None) -> list:
            finished, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            return [(ref, ray.get(ref)) for ref in finished]

        pending: dict = {}
        try:
            _drive(queue, math.inf, start, collect, pending)
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
