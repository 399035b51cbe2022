"""biotorch's LeNet trained with biotorch's own rules under the ``conv`` experiment's protocol.

Each run trains biotorch's ``LeNetMNIST`` converted by its ``BioModule`` to one of its modes
(``backpropagation``, ``fa``, ``dfa``, ``usf``, ``brsf``, ``frsf``: the rules biotorch's
layers implement), with its own layers, initialisation (Glorot's uniform weights and feedback,
zero biases) and backward passes, and everything else taken from the configuration of the
``conv`` run it stands beside: the same examples (gfalign's loading, 28x28 resized to 32x32 in
[0, 1], the last 10,000 training examples held out for validation), the same shuffling (the
run's seed drives ``torch.randperm`` each epoch, as gfalign's ``Trainer`` does), the same
optimizer, rate, momentum, weight decay, batch size and multistep schedule (gfalign's
``make_optimizer`` and ``Schedule``), and the same seed for the network's draws. A training
step is biotorch's own (``biotorch.training.functions.train``): the forward pass (with the
targets and loss for ``dfa``, whose layers read the loss gradient from the forward), the mean
cross-entropy, ``loss.backward()``. Every epoch evaluates the training, validation and test
splits.

Storage: one JSON line per finished (or diverged) run in ``results/peers/biotorch-lenet.jsonl``,
not rows of the results store. A store row is a gfalign run: its key hashes a ``RunConfig``,
which cannot describe another library's model and rule, and every store reader (the sweep's
resumption, the tables, the exports) would have to learn to tell the two apart. A line holds:

    peer, peer_version        "biotorch", "0.0.16"
    model, mode               "LeNetMNIST", biotorch's mode ("backpropagation" for our bp)
    rule, experiment, cell    our rule's name, "conv", and the cell of our run beside it
    key, config               that run's ``RunConfig.key()`` and configuration: the exact
                              protocol (data, splits, optimizer, schedule, epochs, seed)
    status                    "finished" or "diverged"
    history                   per epoch: lr, batch_loss, train/validation/test loss and error
                              (%), seconds (the training steps), best_epoch (on validation)
    final                     the last epoch's errors, and test_error_selected: the test error
                              at the epoch of the lowest validation error
    seconds, environment      training time; torch, Python, machine, threads, device

The report (``gfalign report``, ``--peers-dir``) puts a peer run beside our cell when its
``key`` is one of the experiment's planned runs, so only runs of the same protocol, epochs and
seeds are compared; a run under another budget (``--epochs 2``) stays in the file and out of
the tables. A run already in the file (same peer, version and key) is skipped, so an
interrupted grid continues where it stopped (the run in progress starts over).

    python -m benchmarks.peers.biotorch_lenet --rule fa --seed 0 --epochs 20
    python -m benchmarks.peers.biotorch_lenet --rule all --dataset mnist --dataset fashion-mnist

biotorch is installed without its dependencies (``pip install --no-deps biotorch==0.0.16``);
its ``biotorch.models`` package imports torchvision, so the LeNet file is loaded from its path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfalign.config import RunConfig, resolve_device
from gfalign.data import DataError
from gfalign.experiments import load
from gfalign.rules import ConfigError
from gfalign.runs import load_data
from gfalign.train import make_optimizer

__all__ = [
    "EXPERIMENT",
    "MODES",
    "PEER",
    "PeerError",
    "biotorch_file",
    "evaluate",
    "lenet",
    "main",
    "protocol",
    "read_runs",
    "step",
    "train_run",
]

PEER = "biotorch"
EXPERIMENT = "conv"
MODES = {
    "bp": "backpropagation",
    "fa": "fa",
    "dfa": "dfa",
    "usf": "usf",
    "brsf": "brsf",
    "frsf": "frsf",
}
"""Our rule's name -> biotorch's mode: the rules biotorch's layers implement."""
DEFAULT_FILE = Path("results/peers/biotorch-lenet.jsonl")


class PeerError(RuntimeError):
    """biotorch is missing, or a run cannot be set up; one line."""


def version() -> str:
    """The installed biotorch's version."""
    try:
        return importlib.metadata.version(PEER)
    except importlib.metadata.PackageNotFoundError:
        raise PeerError(
            "biotorch is not installed: pip install --no-deps biotorch==0.0.16"
        ) from None


def biotorch_file(relative: str):
    """A module of the installed biotorch loaded from its file alone (``models/le_net.py``):
    the ``biotorch.models`` package imports torchvision, which gfalign does not need."""
    found = importlib.util.find_spec(PEER)
    if found is None or not found.submodule_search_locations:
        raise PeerError("biotorch is not installed: pip install --no-deps biotorch==0.0.16")
    path = Path(found.submodule_search_locations[0]) / relative
    spec = importlib.util.spec_from_file_location(f"_biotorch_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lenet(
    mode: str,
    seed: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """biotorch's ``LeNetMNIST`` converted to ``mode``, drawn as biotorch's benchmark draws it
    (``torch.manual_seed(seed)``, the model built, then converted with fresh layers).

    Example:
        >>> model = lenet("fa", seed=0)  # doctest: +SKIP
        >>> model(torch.zeros(2, 1, 32, 32)).shape  # doctest: +SKIP
        torch.Size([2, 10])
    """
    if mode not in MODES.values():
        raise PeerError(f"biotorch mode {mode!r} unknown here; known: {', '.join(MODES.values())}")
    le_net = biotorch_file("models/le_net.py")
    from biotorch.module.biomodule import BioModule

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints what it converted
        model = BioModule(
            le_net.LeNetMNIST(),
            mode=mode,
            copy_weights=False,
            layer_config={"type": mode},
            output_dim=10,
        )
    return model.to(device=device, dtype=dtype)


def step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One biotorch training step's gradients, as ``biotorch.training.functions.train``
    computes them: the forward (``dfa`` also takes the targets and the loss), the batch-mean
    cross-entropy, ``loss.backward()`` into ``.grad``; returns the loss (0-d, detached)."""
    model.train()
    loss_function = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # biotorch's dfa layers use Module.register_backward_hook, which PyTorch deprecates;
        # each layer's forward ends in one autograd Function, so its hook sees that
        # Function's inputs, the layer's input first, as biotorch expects.
        warnings.filterwarnings("ignore", "Using a non-full backward hook", FutureWarning)
        outputs = model(x, y, loss_function) if mode == "dfa" else model(x)
        loss = loss_function(outputs, y)
        model.zero_grad()
        loss.backward()
    return loss.detach()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 10_000):
    """``(mean cross-entropy, error in %)`` of ``model`` on examples ``x`` (N, 1, 32, 32)."""
    model.eval()
    total_loss, wrong = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch):
            logits = model(x[start : start + batch])
            labels = y[start : start + batch]
            total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            wrong += int((logits.argmax(dim=1) != labels).sum())
    model.train()
    return total_loss / len(x), 100.0 * wrong / len(x)


def protocol(
    rule: str,
    dataset: str,
    seed: int,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> RunConfig:
    """The configuration of the ``conv`` run of ``rule`` on ``dataset`` with ``seed``, with
    the budget changed where given (a shorter run keeps the schedule's milestones)."""
    if rule not in MODES:
        raise PeerError(f"biotorch has no rule {rule!r}; it has {', '.join(MODES)}")
    experiment = load(EXPERIMENT)
    points = [p for p in experiment.points() if p.rule_name == rule and p.dataset == dataset]
    if not points:
        datasets = sorted({p.dataset for p in experiment.points()})
        raise PeerError(
            f"the {EXPERIMENT} experiment has no {rule} run on {dataset!r}; its datasets: "
            f"{', '.join(datasets)}"
        )
    changes = {"epochs": epochs, "lr": lr, "train_subset": train_subset, "test_subset": test_subset}
    config = points[0].override(seed=seed, **changes)
    return config


def train_run(
    config: RunConfig,
    *,
    device: torch.device | str = "cpu",
    data_dir: Path | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train biotorch's LeNet with the mode of ``config``'s rule under ``config``'s protocol;
    returns the run's record (one line of the peer file, see the module docstring)."""
    mode = MODES[config.rule_name]
    device = torch.device(device)
    dataset = load_data(config, device, data_dir=data_dir, quiet=True)
    train, validation, test = dataset.train, dataset.validation, dataset.test
    model = lenet(mode, config.seed, dtype=config.torch_dtype, device=device)
    settings = config.train
    optimizer = make_optimizer(settings, [p for p in model.parameters() if p.requires_grad])
    schedule = settings.learning_rates()
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    status, spent = "finished", 0.0
    for finished in range(settings.epochs):
        rate = schedule.rate(finished)
        for group in optimizer.param_groups:
            group["lr"] = rate
        order = torch.randperm(len(train), generator=generator).to(device)
        losses = []
        started = time.perf_counter()
        for start in range(0, len(train), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            losses.append(step(model, mode, train.x[batch], train.y[batch]))
            optimizer.step()
        batch_loss = torch.stack(losses).mean().item()
        seconds = time.perf_counter() - started
        spent += seconds
        record = {"epoch": finished + 1, "lr": rate, "batch_loss": batch_loss, "seconds": seconds}
        if not math.isfinite(batch_loss):
            status = "diverged"
            history.append(record)
            break
        for name, split in (("train", train), ("validation", validation), ("test", test)):
            if split is not None:
                loss, error = evaluate(model, split.x, split.y)
                record[f"{name}_loss"], record[f"{name}_error"] = loss, error
        if validation is not None:
            errors = [r["validation_error"] for r in [*history, record]]
            record["best_epoch"] = 1 + min(range(len(errors)), key=errors.__getitem__)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    last = history[-1]
    final = {k: last[k] for k in ("train_error", "validation_error", "test_error") if k in last}
    if "best_epoch" in last and status == "finished":
        final["best_epoch"] = last["best_epoch"]
        final["test_error_selected"] = history[last["best_epoch"] - 1]["test_error"]
    experiment = load(EXPERIMENT)
    return {
        "peer": PEER,
        "peer_version": version(),
        "model": "LeNetMNIST",
        "mode": mode,
        "rule": config.rule_name,
        "experiment": EXPERIMENT,
        "cell": experiment.cell(config),
        "key": config.key(),
        "config": _plain(config.to_data()),
        "status": status,
        "epochs": len(history),
        "history": history,
        "final": final,
        "seconds": spent,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "device": device.type,
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of a peer file (none if it does not exist); a damaged line is an error."""
    if not path.is_file():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except ValueError:
            raise PeerError(f"{path}:{number}: not a JSON line") from None
    return runs


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:  # one whole line per run, written at its end
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def _done(runs: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(r.get("peer"), r.get("peer_version"), r.get("key")) for r in runs}


def run_all(
    configs: Sequence[RunConfig],
    path: Path,
    *,
    device: torch.device | str = "cpu",
    data_dir: Path | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> list[dict[str, Any]]:
    """Train every configuration not in ``path`` yet, appending each run as it ends; returns
    the new records."""
    done = _done(read_runs(path))
    peer_version = version()
    new = []
    for number, config in enumerate(configs, start=1):
        label = f"[{number}/{len(configs)}] biotorch {MODES[config.rule_name]}: {config.label()}"
        if (PEER, peer_version, config.key()) in done:
            say(f"{label}: in {path} already, skipped")
            continue
        say(f"{label} on {config.dataset}, {config.train.epochs} epochs")

        def progress(record: dict[str, float]) -> None:
            say(
                f"  epoch {record['epoch']:>3}  loss {record['batch_loss']:.4f}  "
                f"train {record['train_error']:6.2f}%  validation "
                f"{record.get('validation_error', math.nan):6.2f}%  test "
                f"{record['test_error']:6.2f}%  {record['seconds']:.1f}s"
            )

        record = train_run(config, device=device, data_dir=data_dir, on_epoch=progress)
        _append(path, record)
        say(f"{label}: {record['status']}, test error {record['final'].get('test_error')}")
        new.append(record)
    return new


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.biotorch_lenet",
        description="Train biotorch's LeNet with its own rules under the conv experiment's "
        "protocol; each finished run is appended to --out, runs already there are skipped.",
    )
    parser.add_argument(
        "--rule",
        action="append",
        choices=[*MODES, "all"],
        help="Our rule's name (repeatable; all: every rule biotorch has)  [default: all]",
    )
    parser.add_argument("--dataset", action="append", help="mnist, fashion-mnist  [default: mnist]")
    parser.add_argument(
        "--seed", action="append", type=int, help="Repeatable  [default: the experiment's seeds]"
    )
    parser.add_argument("--epochs", type=int, help="Shorten the run (the milestones stay)")
    parser.add_argument("--lr", type=float, help="Another rate than the experiment's")
    parser.add_argument("--train-subset", type=int, help="Train on the first N examples only")
    parser.add_argument("--test-subset", type=int, help="Evaluate on the first N test examples")
    parser.add_argument("--out", type=Path, default=DEFAULT_FILE, help=f"[default: {DEFAULT_FILE}]")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto  [default: cpu]")
    parser.add_argument("--data-dir", type=Path, help="Directory holding the dataset's files")
    args = parser.parse_args(argv)
    rules = args.rule or ["all"]
    rules = list(MODES) if "all" in rules else list(dict.fromkeys(rules))
    seeds = args.seed if args.seed else list(load(EXPERIMENT).seeds)
    try:
        configs = [
            protocol(
                rule,
                dataset,
                seed,
                epochs=args.epochs,
                lr=args.lr,
                train_subset=args.train_subset,
                test_subset=args.test_subset,
            )
            for dataset in args.dataset or ["mnist"]
            for rule in rules
            for seed in seeds
        ]
        run_all(configs, args.out, device=resolve_device(args.device), data_dir=args.data_dir)
    except (PeerError, ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
