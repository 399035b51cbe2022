"""Run records: one directory per run, written as the run goes, resumable.

A run directory holds

    config.toml             the resolved configuration (``RunConfig``), enough to rerun it
    metrics.csv             one row per finished epoch, appended as the run goes
    metrics.jsonl           the same rows as JSON lines
    checkpoint.pt           network, feedback matrices, optimizer, data-order generator,
                            history; written after the first epoch, every ``checkpoint_every``
                            epochs and at the end, readable with ``torch.load(weights_only=True)``
                            (no pickled objects)
    checkpoint.pt.sha256    the SHA-256 of checkpoint.pt's bytes (``sha256sum -c`` reads it)
    checkpoint.prev.pt      the checkpoint before it, and its ``.sha256``: what a resume can fall
                            back to (``--from-previous``) when checkpoint.pt is damaged
    checkpoint.discarded.pt a checkpoint set aside by ``--from-previous`` (kept, never read)
    best.pt, best.pt.sha256 with ``keep_best``: the state (as a checkpoint holds it) of the
                            epoch with the lowest validation error, rewritten whenever an epoch
                            improves on it; ``load_checkpoint`` reads it
    environment.json        versions, device, threads, machine
    summary.json            status (running, finished, diverged, interrupted), the final
                            metrics, and the error that stopped the run; with ``keep_best`` or
                            ``early_stopping`` the best epoch and its record; with
                            ``evaluate_test = false`` the test set measured once at the end
    .claim.lock, .claim.json  the claim of the process training the run (``gfalign.claims``)

Every file is replaced atomically (temporary file, fsync, rename, fsync of the directory), so a
kill or a full disk leaves the previous version whole. A killed run keeps every finished epoch;
``execute(config, directory, resume=True)`` (the CLI's ``gfalign train --resume DIR``) continues
from the last checkpoint and reaches the same numbers as an uninterrupted run.

What is refused: a checkpoint whose bytes differ from its recorded hash (corrupted), one that is
cut short (truncated), one that a run's metrics say exists but is gone (missing), and one that
holds pickled objects (they could run code). A directory that already holds a run is not
started again without ``overwrite``; one another process trains raises ``RunBusyError``.
Checkpoints written before hashes existed have no ``.sha256`` and still load, unverified.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import hashlib
import io
import json
import math
import os
import pickle
import platform
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfalign.claims import RunBusyError, claim
from gfalign.config import RunConfig, _dataset_facts, resolve_device
from gfalign.engine import FeedbackRule
from gfalign.network import mlp
from gfalign.rules import ConfigError, render
from gfalign.train import DivergenceError, Trainer, evaluate, stacking_problem

__all__ = [
    "CheckpointError",
    "RunBusyError",
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
BEST_CHECKPOINT = "best.pt"
PREVIOUS_CHECKPOINT, DISCARDED_CHECKPOINT = "checkpoint.prev.pt", "checkpoint.discarded.pt"
METRICS_CSV, METRICS_JSONL, ENVIRONMENT = "metrics.csv", "metrics.jsonl", "environment.json"
HASH_SUFFIX = ".sha256"
# Any of these in a directory means it holds a run, which only resume or overwrite may touch.
RUN_MARKERS = (CONFIG, SUMMARY, CHECKPOINT, PREVIOUS_CHECKPOINT, METRICS_JSONL, METRICS_CSV)


class RunError(RuntimeError):
    """A run directory that cannot be used: not writable, missing files, corrupt checkpoint."""


class CheckpointError(RunError):
    """A checkpoint refused before use.

    Attributes:
        path: the checkpoint file.
        problem: ``"missing"``, ``"truncated"``, ``"corrupted"`` or ``"unsafe"`` (it holds
            pickled objects, which could run code when loaded).
    """

    def __init__(self, path: Path, problem: str, message: str) -> None:
        super().__init__(message)
        self.path, self.problem = path, problem


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

    spec = config.model_spec()
    if config.dataset == "synthetic":
        # MNIST's shape, or the model's own where its images have other channels (CIFAR's)
        features = 784 if spec is None or spec.input[0] == 1 else math.prod(spec.input)
        dataset = datasets.synthetic(seed=0, validation=config.validation, features=features)
    elif config.dataset == "chars":
        dataset = datasets.chars(validation=config.validation)
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
    dataset = dataset.to(device=device, dtype=config.torch_dtype)
    image = _dataset_facts(config.dataset)[0]  # (C, H, W) of one example
    if config.dataset == "synthetic" and features != 784:
        image = spec.input
    if spec is not None:
        if tuple(dataset.train.x.shape[1:]) != tuple(spec.input):
            # Images for a model that wants them, resized once here if it asks.
            dataset = dataset.shaped(image, resize=spec.resize, normalize=spec.normalize)
    elif dataset.train.x.dim() > 2:  # images (CIFAR-10) flattened for the MLP
        dataset = dataset.shaped((math.prod(image),))
    return dataset


def build(config: RunConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, FeedbackRule]:
    """The network (an ``MLP``, or the configuration's model of blocks) and the rule it
    describes, freshly initialised."""
    config.check_fits()
    if config.model is not None:
        from gfalign.models import build as build_model

        net = build_model(
            config.model_spec(),
            config.objective,
            seed=config.seed,
            dtype=config.torch_dtype,
            device=device,
            dropout_input=config.dropout_input,
            dropout_hidden=config.dropout_hidden,
        )
    else:
        net = mlp(
            config.sizes,
            config.activation,
            config.objective,
            weight_init=config.weight_init,
            bias_init=config.bias_init,
            seed=config.seed,
            dtype=config.torch_dtype,
            device=device,
            dropout_input=config.dropout_input,
            dropout_hidden=config.dropout_hidden,
        )
    rule = FeedbackRule(
        config.rule_config(), net, seed=config.seed, dtype=config.torch_dtype, device=device
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


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where the filesystem cannot)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as problem:
        if problem.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomic(path: Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` at once: a temporary file, fsync, rename, fsync of the
    directory. A failure (a full disk) leaves ``path`` as it was and no temporary file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        _write_durably(temporary, data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, indent=2) + "\n")


def _columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for record in history:
        columns.extend(k for k in record if k not in columns)
    return columns


def _rewrite_metrics(directory: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Make the metric files hold exactly ``history`` (after a resume drops later epochs)."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=_columns(history) or ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    _write_atomic(directory / METRICS_CSV, table.getvalue())
    _write_atomic(directory / METRICS_JSONL, "".join(json.dumps(dict(r)) + "\n" for r in history))


def _last_rows(directory: Path) -> tuple[list[str], int, int]:
    """The CSV header and the last epoch each metric file records (0: none)."""
    with (directory / METRICS_CSV).open("r", newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0] if rows else []
    csv_epoch = int(float(rows[-1][header.index("epoch")])) if len(rows) > 1 else 0
    lines = (directory / METRICS_JSONL).read_text().splitlines()
    json_epoch = int(json.loads(lines[-1])["epoch"]) if lines else 0
    return header, csv_epoch, json_epoch


def _append_metrics(directory: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Add the last record of ``history`` to the metric files.

    The files only ever grow by the next epoch: unless both end at the epoch before this one
    (and the CSV has the record's columns), they are rewritten from ``history``.
    """
    record = history[-1]
    previous = int(record["epoch"]) - 1
    try:
        header, csv_epoch, json_epoch = _last_rows(directory)
    except (OSError, ValueError, KeyError, IndexError):
        header, csv_epoch, json_epoch = [], -1, -1
    if list(record) != header or csv_epoch != previous or json_epoch != previous:
        _rewrite_metrics(directory, history)
        return
    with (directory / METRICS_CSV).open("a", newline="") as handle:
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


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


def _recorded_digest(path: Path) -> str | None:
    """The SHA-256 recorded beside ``path`` (``sha256sum`` format), None when there is none."""
    try:
        text = _hash_path(path).read_text()
    except FileNotFoundError:
        return None
    return text.split()[0] if text.split() else ""


def _refusal(path: Path, data: bytes, problem: Exception | None) -> CheckpointError:
    """Why ``data`` (the bytes of ``path``) is no checkpoint to load: ``problem`` is what
    ``torch.load`` raised on it, None when it was refused for its hash before loading."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return CheckpointError(
            path,
            "truncated",
            f"refusing to load {path}: it is truncated ({len(data)} bytes, not a complete "
            "checkpoint archive; the write that made it was cut short)",
        )
    if problem is None:
        try:
            # Only to name the problem: weights_only never runs what the file holds.
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as refused:  # noqa: BLE001 - any unpickling refusal or corruption
            problem = refused
    if isinstance(problem, pickle.UnpicklingError) and "global" in str(problem).lower():
        found = next((line for line in str(problem).splitlines() if "GLOBAL" in line), "")
        return CheckpointError(
            path,
            "unsafe",
            f"refusing to load {path}: it holds pickled objects that could run code, which a "
            f"gfalign checkpoint never does (tensors and plain data only). {found.strip()}",
        )
    recorded = _recorded_digest(path)
    if recorded is not None:
        detail = f"its SHA-256 differs from the one recorded in {_hash_path(path).name}"
    else:
        detail = f"{type(problem).__name__}: {' '.join(str(problem).split())[:200]}"
    return CheckpointError(
        path, "corrupted", f"refusing to load {path}: it is corrupted ({detail})"
    )


def _read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, bool]:
    """``(state, verified)``: the checkpoint at ``path``, its bytes checked against the
    recorded SHA-256 before ``torch.load(weights_only=True)`` reads them; ``verified`` is
    False for a checkpoint written before hashes were recorded (no ``.sha256`` beside it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(path, "missing", f"no checkpoint at {path}") from None
    recorded = _recorded_digest(path)
    if recorded is not None:
        accepted = {recorded}
        if path.name == CHECKPOINT:
            # A save cut between writing the new hash and renaming the new file leaves
            # checkpoint.pt holding the bytes that checkpoint.prev.pt.sha256 records.
            accepted.add(_recorded_digest(path.with_name(PREVIOUS_CHECKPOINT)))
        if hashlib.sha256(data).hexdigest() not in accepted:
            raise _refusal(path, data, None)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as problem:  # noqa: BLE001 - any unpickling refusal or corruption
        raise _refusal(path, data, problem) from None
    return state, recorded is not None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely: its bytes must match the SHA-256 recorded beside it
    (``checkpoint.pt.sha256``; older checkpoints without one load unverified), and it may hold
    tensors and plain containers only, never arbitrary objects.

    Raises:
        CheckpointError: missing, truncated, corrupted, or holding pickled objects.
    """
    return _read_checkpoint(Path(path), map_location)[0]


def _record_digest(path: Path, digest: str | None) -> None:
    """Write ``path``'s ``.sha256`` (``sha256sum`` format); None removes it."""
    if digest is None:
        _hash_path(path).unlink(missing_ok=True)
    else:
        _write_atomic(_hash_path(path), f"{digest}  {path.name}\n")


def _link_over(source: Path, target: Path) -> None:
    """Make ``target`` hold what ``source`` holds, atomically (a hard link where the
    filesystem has them, else a copy)."""
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        try:
            os.link(source, temporary)
        except OSError as problem:
            if problem.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            _write_durably(temporary, source.read_bytes())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _save_checkpoint(directory: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` as ``checkpoint.pt`` and its hash; the one it replaces becomes
    ``checkpoint.prev.pt``.

    At every moment ``checkpoint.pt`` is a whole checkpoint that loading accepts: the new
    bytes are written and synced to a temporary file first, so a failure (a full disk) leaves
    the previous checkpoint as it was and removes the temporary file.
    """
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    current, previous = directory / CHECKPOINT, directory / PREVIOUS_CHECKPOINT
    fresh = directory / f".{CHECKPOINT}.tmp"
    try:
        _write_durably(fresh, data)
        if current.exists():
            _link_over(current, previous)
            _record_digest(previous, _recorded_digest(current))
        # Hash before rename: a save cut between them leaves checkpoint.pt holding the bytes
        # that checkpoint.prev.pt.sha256 records, which ``_read_checkpoint`` accepts.
        _record_digest(current, hashlib.sha256(data).hexdigest())
        os.replace(fresh, current)
    finally:
        fresh.unlink(missing_ok=True)
    _fsync_directory(directory)


def _save_best(directory: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` as ``best.pt`` and its hash. The bytes are written and synced to a
    temporary file first and renamed over ``best.pt`` after the hash, as for checkpoints; a
    write cut between the two leaves a ``best.pt`` that loading refuses, never a wrong one."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    path, fresh = directory / BEST_CHECKPOINT, directory / f".{BEST_CHECKPOINT}.tmp"
    try:
        _write_durably(fresh, data)
        _record_digest(path, hashlib.sha256(data).hexdigest())
        os.replace(fresh, path)
    finally:
        fresh.unlink(missing_ok=True)
    _fsync_directory(directory)


def _checkpoint_epoch(path: Path) -> int | None:
    """The epochs a checkpoint holds, None when it is not an intact checkpoint."""
    try:
        return len(_read_checkpoint(path)[0]["history"])
    except (RunError, KeyError, TypeError):
        return None


def _recorded_epochs(directory: Path) -> int:
    try:
        return len(read_metrics(directory))
    except (RunError, OSError, ValueError):
        return 0


def _remedy(directory: Path) -> str:
    """What to do about a refused checkpoint: the previous one, when intact, or start over."""
    previous = directory / PREVIOUS_CHECKPOINT
    restart = f"start over with `gfalign train --resume {directory} --restart`"
    epoch = _checkpoint_epoch(previous)
    if epoch is None:
        return f"No intact previous checkpoint is kept: {restart}"
    return (
        f"The previous checkpoint {previous} (epoch {epoch}) is intact: continue from it with "
        f"`gfalign train --resume {directory} --from-previous`, or {restart}"
    )


def _resume_checkpoint(directory: Path, from_previous: bool) -> tuple[dict | None, bool]:
    """``(state, verified)`` of the checkpoint to resume ``directory`` from; ``(None, True)``
    when its run never finished an epoch, so it starts from scratch.

    Raises:
        CheckpointError: ``checkpoint.pt`` is refused, or missing although the run recorded
            epochs; the message says whether the previous checkpoint can be used instead.
    """
    current, previous = directory / CHECKPOINT, directory / PREVIOUS_CHECKPOINT
    if from_previous:
        try:
            return _read_checkpoint(previous)
        except CheckpointError as refusal:
            raise CheckpointError(
                previous,
                refusal.problem,
                f"cannot continue from the previous checkpoint: {refusal}; start over with "
                f"`gfalign train --resume {directory} --restart`",
            ) from None
    if not current.exists():
        epochs = _recorded_epochs(directory)
        if epochs == 0 and not previous.exists():
            return None, True
        raise CheckpointError(
            current,
            "missing",
            f"refusing to resume {directory}: its checkpoint {current} is missing although "
            f"the run recorded {epochs} epoch(s). {_remedy(directory)}",
        )
    try:
        return _read_checkpoint(current)
    except CheckpointError as refusal:
        raise CheckpointError(
            current, refusal.problem, f"{refusal}. {_remedy(directory)}"
        ) from None


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """The dotted keys at which two plain configurations differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        found: list[str] = []
        for name in sorted(set(a) | set(b), key=str):
            found += _differences(a.get(name), b.get(name), f"{where}{name}.")
        return found
    return [] if a == b else [where.rstrip(".")]


#: Parameter names an earlier gfalign wrote, with the names they have now: a chain's blocks
#: were ``parts`` before chains and graphs became one model class (``layers``).
_RENAMED = (("parts.", "layers."),)


def _current_names(state: Mapping[str, Any], names: set[str]) -> Mapping[str, Any]:
    """``state`` with the network's tensors under today's names, where a checkpoint of an
    earlier gfalign stored them under a name the network no longer has."""
    net = state.get("net")
    if not isinstance(net, Mapping) or all(name in names for name in net):
        return state
    renamed = {}
    for name, tensor in net.items():
        for old, new in _RENAMED:
            if name not in names and name.startswith(old) and new + name[len(old) :] in names:
                name = new + name[len(old) :]
        renamed[name] = tensor
    return {**state, "net": renamed}


def _load_into(
    trainer: Trainer, state: Mapping[str, Any], config: RunConfig, directory: Path, previous: bool
) -> None:
    """Load a checkpoint's state into ``trainer``, once it is known to be the state of this
    run: its configuration the run's, every tensor the shape the run's network gives it.

    Raises:
        RunError: naming the keys that differ, or the tensor and both shapes; the way forward
            is ``--restart``.
    """
    path = directory / (PREVIOUS_CHECKPOINT if previous else CHECKPOINT)
    restart = f"start the run over with `gfalign train --resume {directory} --restart`"
    try:
        recorded = RunConfig.from_data(state["config"])
    except (ConfigError, KeyError, TypeError) as problem:
        raise RunError(
            f"{path} holds no configuration this gfalign reads ({problem}); {restart}"
        ) from None
    if recorded.key() != config.key():
        keys = _differences(recorded.to_data(), config.to_data()) or ["the resolved rule"]
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise RunError(
            f"{path} belongs to another configuration than {directory / CONFIG}: they differ in "
            f"{shown}; {restart}, or resume the directory that checkpoint was made in"
        )
    state = _current_names(state, set(trainer.net.state_dict()))
    for part, module in (("net", trainer.net), ("rule", trainer.rule)):
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        stored = state.get(part)
        if not isinstance(stored, Mapping):
            raise RunError(f"{path} holds no {part} state; {restart}")
        for name, tensor in stored.items():
            shape = tuple(getattr(tensor, "shape", ()))
            if name not in expected:
                raise RunError(
                    f"{path} holds {part} tensor {name!r} of shape {list(shape)}, which the "
                    f"network of {directory / CONFIG} has not; {restart}"
                )
            if shape != expected[name]:
                raise RunError(
                    f"{path} does not fit the network of {directory / CONFIG}: its {part} "
                    f"tensor {name!r} has shape {list(shape)}, the network's has "
                    f"{list(expected[name])}; {restart}"
                )
        missing = sorted(set(expected) - set(stored))
        if missing:
            raise RunError(f"{path} lacks the {part} tensor {missing[0]!r}; {restart}")
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as problem:
        text = " ".join(str(problem).split())[:200]
        raise RunError(f"{path} does not fit the run of {directory}: {text}; {restart}") from None


def _describe_run(directory: Path) -> str:
    """``finished, 3 epochs`` or the like, for a directory that holds a run."""
    try:
        status = json.loads((directory / SUMMARY).read_text()).get("status", "unknown")
    except (OSError, ValueError, AttributeError):
        status = "unknown"
    if status in ("running", "stopped"):
        status = "unfinished"
    return f"{status}, {_recorded_epochs(directory)} epoch(s) recorded"


def _first_missing(directory: Path) -> Path | None:
    """The outermost of ``directory`` and its parents that does not exist (None: it exists)."""
    missing = None
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing = path
    return missing


def _remove_created(directory: Path, created: Path) -> None:
    """Undo a failed start in a directory this process created: ``directory`` (which holds
    nothing but what the start wrote) and those of its parents up to ``created`` that are
    still empty (another run may have been started beside it)."""
    shutil.rmtree(directory, ignore_errors=True)
    if created == directory:
        return
    for parent in directory.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        if parent == created:
            return


def _claim(directory: Path, claims: contextlib.ExitStack) -> Path | None:
    """Claim ``directory`` (created if missing) until ``claims`` closes; returns the outermost
    directory this created, for ``_remove_created`` should the start fail.

    Raises:
        RunBusyError: another live process trains the run.
        RunError: the directory cannot be created or written.
    """
    created = _first_missing(directory)
    try:
        claims.enter_context(claim(directory))
    except OSError as problem:
        if created is not None:
            _remove_created(directory, created)
        raise RunError(
            f"output directory {directory} is not writable: {problem.strerror or problem}"
        ) from None
    return created


def _write_failure(problem: OSError, what: str) -> str:
    if problem.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {what}"
    return f"could not write {what} ({problem.strerror or problem})"


def default_directory(config: RunConfig, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-<rule>-<key>``: unique and sortable."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config.rule_name}-{config.key()[:8]}"


class _OpenRun:
    """One claimed run directory while its run goes: opened (resuming), advanced, closed.

    Opening reads the directory's state (refusing a run that is there unless resuming or
    overwriting, and a checkpoint that is not intact), builds the network, rule and
    ``Trainer``, and only then writes: ``config.toml``, ``environment.json``, the metric files
    and a ``running`` summary. Each finished epoch writes its checkpoint (when due) and then
    its metrics row, so recorded epochs always have a checkpoint; closing writes the final
    summary.
    """

    def __init__(
        self,
        config: RunConfig | None,
        directory: Path,
        *,
        resume: bool,
        overwrite: bool,
        from_previous: bool,
        dataset,
        data_dir,
        metrics: Sequence[Callable[[Trainer], Mapping[str, float]]],
        quiet: bool,
        on_note: Callable[[str], None] | None,
    ) -> None:
        checkpoint, verified = None, True
        if resume:
            if config is None:
                config = RunConfig.from_toml(directory / CONFIG)
            checkpoint, verified = _resume_checkpoint(directory, from_previous)
        elif not overwrite and any((directory / name).exists() for name in RUN_MARKERS):
            raise RunError(
                f"{directory} already holds a run ({_describe_run(directory)}): continue it "
                f"with `gfalign train --resume {directory}`, or replace it with --overwrite"
            )
        if config is None:
            raise ConfigError("execute needs a configuration unless it resumes a run directory")
        watching = config.train.needs_validation
        if watching and config.validation == 0:
            raise ConfigError(
                f"[train] {watching[0]} = {render(getattr(config.train, watching[0]))} watches the "
                "validation error, but validation = 0 holds no examples out; allowed: "
                "validation = N (training examples held out as a validation split)"
            )
        config.check_fits()  # before the data or the network take any memory
        device = resolve_device(config.device)
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
            _load_into(trainer, checkpoint, config, directory, from_previous)
        self.config, self.directory, self.trainer, self.device = config, directory, trainer, device
        self.checkpointed = self.recorded = trainer.epoch
        self.summary: dict[str, Any] = {
            "status": "running",
            "key": config.key(),
            "label": config.label(),
        }
        try:
            self._start(overwrite=overwrite, from_previous=from_previous)
        except OSError as problem:
            raise RunError(
                _write_failure(problem, f"the run directory {directory}") + "; nothing was trained"
            ) from None
        if on_note is not None and not verified:
            on_note(
                f"the checkpoint of {directory} was written before checkpoints carried a "
                "SHA-256: loaded unverified (tensors and plain data only)"
            )
        if on_note is not None and from_previous:
            on_note(
                f"continuing from the previous checkpoint (epoch {trainer.epoch}); the one "
                f"it replaces is kept as {directory / DISCARDED_CHECKPOINT}"
            )
        self.started = time.perf_counter()

    def _start(self, *, overwrite: bool, from_previous: bool) -> None:
        """The writes of opening: drop an overwritten run's checkpoints, or set the refused
        checkpoint aside and make the previous one current; then the run's own files."""
        directory = self.directory
        if overwrite:
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, DISCARDED_CHECKPOINT, BEST_CHECKPOINT):
                (directory / name).unlink(missing_ok=True)
                _hash_path(directory / name).unlink(missing_ok=True)
        if from_previous:
            current, discarded = directory / CHECKPOINT, directory / DISCARDED_CHECKPOINT
            if current.exists():
                os.replace(current, discarded)
            _record_digest(discarded, _recorded_digest(current))
            _record_digest(current, None)
            _save_checkpoint(directory, self._state())
        _write_atomic(directory / CONFIG, self.config.to_toml())
        _write_json(directory / ENVIRONMENT, environment(self.device))
        _rewrite_metrics(directory, self.trainer.history)
        _write_json(directory / SUMMARY, self.summary)

    def _state(self) -> dict[str, Any]:
        state = self.trainer.state_dict()
        state["config"] = self.config.to_data()
        return state

    def _checkpoint(self) -> None:
        epoch, path = self.trainer.epoch, self.directory / CHECKPOINT
        try:
            _save_checkpoint(self.directory, self._state())
        except OSError as problem:
            kept = (
                f"the previous checkpoint (epoch {self.checkpointed}) is intact"
                if self.checkpointed
                else "no earlier checkpoint was written"
            )
            action = "free space" if problem.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
            raise RunError(
                f"{_write_failure(problem, f'checkpoint {path} (epoch {epoch})')}: {kept}; "
                f"{action}, then `gfalign train --resume {self.directory}`"
            ) from None
        self.checkpointed = epoch

    def _save_best(self) -> None:
        path = self.directory / BEST_CHECKPOINT
        try:
            _save_best(self.directory, self._state())
        except OSError as problem:
            action = "free space" if problem.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
            raise RunError(
                f"{_write_failure(problem, f'the best checkpoint {path}')}; {action}, then "
                f"`gfalign train --resume {self.directory}`"
            ) from None

    def epoch_done(self, checkpoint_every: int, target: int) -> None:
        """Record the epoch the trainer has just finished: its checkpoint when due (after
        the first epoch, every ``checkpoint_every``, at ``target`` and when early stopping
        ends the run), ``best.pt`` when the epoch is the best so far and ``keep_best`` is
        set, then its metrics row.

        Raises:
            RunError: a file could not be written (a full disk); what was recorded stays.
        """
        trainer = self.trainer
        epoch = trainer.epoch
        # Checkpointing the first epoch makes recorded epochs without a checkpoint mean a lost one.
        if epoch % checkpoint_every == 0 or epoch in (1, target) or trainer.stopped_early:
            self._checkpoint()
        if self.config.train.keep_best and trainer.history[-1].get("best_epoch") == epoch:
            self._save_best()
        try:
            _append_metrics(self.directory, self.trainer.history)
        except OSError as problem:
            raise RunError(
                f"{_write_failure(problem, f'the metrics of epoch {epoch} in {self.directory}')}"
                f"; free space, then `gfalign train --resume {self.directory}`"
            ) from None
        self.recorded = epoch

    def stop(self, status: str, **details: Any) -> None:
        """Mark the run ``diverged`` or ``interrupted``; its recorded epochs stay.

        Best effort: on a full disk even the summary may not be written, and the error that
        stopped the run is then all the user learns.
        """
        self.summary.update(status=status, epochs=self.recorded, **details)
        with contextlib.suppress(OSError):
            _write_json(self.directory / SUMMARY, self.summary)

    def close(self) -> RunResult:
        trainer, summary, train = self.trainer, self.summary, self.config.train
        finished = trainer.epoch >= train.epochs or trainer.stopped_early
        summary.update(
            status="finished" if finished else "stopped",
            epochs=trainer.epoch,
            seconds=time.perf_counter() - self.started,
            train_seconds=sum(r["seconds"] for r in trainer.history),
            final=dict(trainer.history[-1]) if trainer.history else {},
        )
        best = trainer.best_epoch if train.tracks_best else None
        if best is not None:
            summary.update(best_epoch=best, best=dict(trainer.history[best - 1]))
        if trainer.stopped_early:
            summary["stopped_early"] = True
        if finished and not train.evaluate_test and trainer.history:
            summary["test"] = self._test_once()
            summary["final"].update(
                test_loss=summary["test"]["test_loss"], test_error=summary["test"]["test_error"]
            )
        _write_json(self.directory / SUMMARY, summary)
        return RunResult(self.directory, self.config, list(trainer.history), summary)

    def _test_once(self) -> dict[str, float]:
        """The test split measured once, for a run that never evaluated it during training:
        on the weights of ``best.pt`` with ``keep_best``, else on the final weights."""
        trainer, net, epoch = self.trainer, self.trainer.net, self.trainer.epoch
        best = self.directory / BEST_CHECKPOINT
        if self.config.train.keep_best and best.exists():
            state = load_checkpoint(best, map_location=self.device)
            net = copy.deepcopy(trainer.net)
            net.load_state_dict(state["net"])
            epoch = len(state["history"])
        loss, error = evaluate(net, trainer.data.test, self.config.train.eval_batch_size)
        return {"epoch": epoch, "test_loss": loss, "test_error": error}


def _open_runs(
    configs: Sequence[RunConfig | None],
    directories: Sequence[Path],
    claims: contextlib.ExitStack,
    **options: Any,
) -> list[_OpenRun]:
    """Claim every directory (until ``claims`` closes), then open a run in each.

    A start that fails, a busy directory included, claims and writes nothing: the directories
    it created are removed again, and pre-existing ones keep their contents.
    """
    created: list[tuple[Path, Path]] = []
    try:
        for directory in directories:
            top = _claim(directory, claims)
            if top is not None:
                created.append((directory, top))
        return [
            _OpenRun(config, directory, **options)
            for config, directory in zip(configs, directories, strict=True)
        ]
    except BaseException:
        for directory, top in created:
            _remove_created(directory, top)
        raise


def execute(
    config: RunConfig | None,
    directory: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    from_previous: bool = False,
    data_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    metrics: Sequence[Callable[[Trainer], Mapping[str, float]]] = (),
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    quiet: bool = True,
    dataset=None,
) -> RunResult:
    """Run (or resume) one configuration, writing its record into ``directory``.

    The directory is claimed (``gfalign.claims``) for the whole run, before any file in it is
    read or written. A start that fails leaves no directory it created behind.

    Args:
        config: the run; ``None`` with ``resume=True`` reads ``directory/config.toml``.
        directory: the run directory (created).
        resume: continue from ``directory/checkpoint.pt``; a directory whose run never
            finished an epoch (or that does not exist) starts from scratch, so a sweep can call
            this on every unfinished run. A checkpoint that is corrupted, truncated or missing
            although epochs were recorded is refused.
        overwrite: replace the run ``directory`` holds (its checkpoints are deleted); without
            it (and without ``resume``) a directory that holds a run is refused.
        from_previous: with ``resume``, continue from ``checkpoint.prev.pt`` instead; the
            current checkpoint is kept as ``checkpoint.discarded.pt``.
        data_dir: where the dataset files are (else GFALIGN_DATA, the cache, the mirrors).
        checkpoint_every: epochs between checkpoints (one is always written after the first
            epoch and at the end).
        metrics: extra per-epoch measurements (see ``Trainer``); alignment is added by itself
            when ``config.alignment`` is set.
        on_epoch, on_batch: progress callbacks.
        on_note: receives one-line notes a user should see (an unverified old checkpoint).
        stop_after: stop (as if killed) once this many epochs in total are done; for tests.
        dataset: an already loaded ``Dataset`` to use instead of loading ``config.dataset``.

    Raises:
        ConfigError: the configuration (or CUDA asked for without a GPU).
        DataError: the data (missing, empty, or holding NaN or inf).
        RunBusyError: another live process trains this directory; nothing was touched.
        RunError: an unusable directory or checkpoint (``CheckpointError``), a directory that
            already holds a run, or a write that failed during training (the summary then
            says ``interrupted``, with the error).
        DivergenceError: a non-finite loss; the finished epochs stay recorded.
    """
    if from_previous and not resume:
        raise ConfigError("from_previous continues a run: it needs resume=True")
    if overwrite and resume:
        raise ConfigError("overwrite starts the run over: it cannot be combined with resume")
    with contextlib.ExitStack() as claims:
        (run,) = _open_runs(
            [config],
            [Path(directory)],
            claims,
            resume=resume,
            overwrite=overwrite,
            from_previous=from_previous,
            dataset=dataset,
            data_dir=data_dir,
            metrics=metrics,
            quiet=quiet,
            on_note=on_note,
        )
        trainer, epochs = run.trainer, run.config.train.epochs
        target = epochs if stop_after is None else min(stop_after, epochs)
        try:
            while trainer.epoch < target and not trainer.stopped_early:
                record = trainer.train_epoch(on_batch)
                run.epoch_done(checkpoint_every, target)
                if on_epoch is not None:
                    on_epoch(record)
        except DivergenceError as problem:
            run.stop("diverged", error=str(problem))
            raise
        except RunError as problem:
            run.stop("interrupted", error=str(problem))
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

    Every member's directory is claimed before any is touched and stays claimed until the
    stack ends. If one is busy, none is trained: ``RunBusyError`` names the first busy
    directory, and the claims already taken are released (directories created for them are
    removed), so a caller can retry the whole stack later or run the free members alone.

    Returns:
        One entry per configuration: its ``RunResult``, or the ``DivergenceError`` of a member
        whose loss stopped being finite (its directory says ``diverged``; the others go on).

    Raises:
        ConfigError: configurations that cannot stack, or as for ``execute``.
        RunBusyError: a member's directory is trained by another live process.
        RunError: as for ``execute``; a failed write stops every member (``interrupted``).
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
    problem = stacking_problem(configs[0].train)
    if problem is not None:
        raise ConfigError(problem)
    if len({d.resolve() for d in directories}) != len(directories):
        raise ConfigError("execute_stacked needs a different directory for every configuration")
    if dataset is None:
        device = resolve_device(configs[0].device)
        dataset = load_data(configs[0], device, data_dir=data_dir, quiet=quiet)
    with contextlib.ExitStack() as claims:
        runs = _open_runs(
            configs,
            directories,
            claims,
            resume=resume,
            overwrite=False,
            from_previous=False,
            dataset=dataset,
            data_dir=data_dir,
            metrics=(),
            quiet=quiet,
            on_note=None,
        )
        return _train_stacked(runs, EnsembleTrainer, checkpoint_every, on_epoch, stop_after)


def _train_stacked(
    runs: list[_OpenRun], ensemble_type, checkpoint_every: int, on_epoch, stop_after
) -> list[RunResult | DivergenceError]:
    """``execute_stacked``'s training, once every member's run is open."""
    # Every member trains on one dataset object, which the ensemble requires.
    shared = runs[0].trainer.data
    for run in runs:
        run.trainer.data = shared
    epochs = runs[0].config.train.epochs
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
            ensemble = ensemble_type.from_trainers([runs[k].trainer for k in members])
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
    except (KeyboardInterrupt, RunError) as problem:
        details = {"error": str(problem)} if isinstance(problem, RunError) else {}
        for k, run in enumerate(runs):
            if k not in outcome:
                run.stop("interrupted", **details)
        raise
    return [outcome[k] if k in outcome else run.close() for k, run in enumerate(runs)]
