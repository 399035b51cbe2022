"""``gfalign train``: one run from flags or a TOML configuration, recorded in a run directory.

``--out DIR`` starts a run and refuses a directory that already holds one unless
``--overwrite``; ``--resume DIR`` continues one from its checkpoint, ``--resume DIR
--from-previous`` from the checkpoint before it (when the last one is refused as corrupted,
truncated or missing), and ``--resume DIR --restart`` starts its recorded configuration over.
Ctrl-C or SIGTERM marks the run ``interrupted`` in its ``summary.json``, the finished epochs
kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from gfalign.claims import RunBusyError
from gfalign.cli import exit_interrupted, terminate_as_interrupt
from gfalign.config import RunConfig, given_fields, load_toml, with_model_protocol
from gfalign.data import DataError
from gfalign.rules import ConfigError
from gfalign.runs import CONFIG, RunError, default_directory, execute
from gfalign.train import DivergenceError

USER_ERRORS = (ConfigError, DataError, RunError, DivergenceError, RunBusyError)

# flag -> RunConfig / TrainConfig field; these describe the run, so --resume refuses them
CONFIG_FLAGS = (
    "dataset",
    "model",
    "hidden",
    "activation",
    "objective",
    "rule",
    "feedback",
    "optimizer",
    "lr",
    "batch_size",
    "epochs",
    "reduction",
    "seed",
    "dtype",
    "train_subset",
    "test_subset",
    "validation",
    "dropout_input",
    "dropout_hidden",
    "weight_decay",
    "schedule",
    "alignment",
)


def error_text(objective: str, value: float | None, width: int = 0, split: str = "test") -> str:
    """A final or per-epoch error as a reader should see it: ``test error 1.79%`` for a
    classifier, ``reconstruction error 0.00482`` (mean squared error per pixel, on the test
    set unless ``split`` names another) for an autoencoder."""
    value = math.nan if value is None else value
    if objective == "autoencoder":
        name = "reconstruction error" if split == "test" else f"{split} reconstruction error"
        return f"{name} {value:{width}.3g}"
    return f"{split} error {value:{width}.2f}%"


def _hidden(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        widths = tuple(int(part) for part in value.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(
            f"give comma-separated widths like 800,800, got {value!r}"
        ) from None
    if not widths or any(width < 1 for width in widths):
        raise click.BadParameter(f"give positive widths like 800,800, got {value!r}")
    return widths


def table_value(value: str, section: str) -> str | dict[str, Any]:
    """A name as it is, or the table of a TOML file: its top level, or its ``[section]``."""
    path = Path(value)
    if value.endswith(".toml") or path.is_file():
        data = load_toml(path)
        table = data.get(section)
        return dict(table) if isinstance(table, Mapping) else data
    return value


def rule_value(value: str) -> str | dict[str, Any]:
    """A preset name, or the rule table of a TOML file (top level, or under ``[rule]``)."""
    return table_value(value, "rule")


@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A TOML run configuration; flags override it.",
)
@click.option("--dataset", help="mnist, fashion-mnist or synthetic  [default: mnist]")
@click.option(
    "--model",
    help="A built-in model (lenet5) or a TOML file of blocks, instead of the MLP of --hidden.",
)
@click.option("--hidden", callback=_hidden, help="Hidden layer widths  [default: 800,800]")
@click.option("--activation", help="tanh, relu or sigmoid  [default: tanh]")
@click.option("--objective", help="classification or autoencoder")
@click.option(
    "--rule", help="A preset name (see `gfalign rules`) or a TOML file with a rule table."
)
@click.option("--feedback", help="Feedback family, e.g. uniform or B6:density=0.2")
@click.option("--optimizer", help="sgd, adam, ...  [default: sgd]")
@click.option("--lr", type=float, help="Learning rate  [default: 0.001]")
@click.option("--batch-size", type=int, help="Examples per step  [default: 32]")
@click.option("--epochs", type=int, help="Passes over the training set  [default: 100]")
@click.option("--reduction", type=click.Choice(["sum", "mean"]), help="[default: sum]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--device", help="cpu, cuda or auto  [default: cpu]")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), help="[default: float32]")
@click.option("--train-subset", type=int, help="Train on the first N examples only.")
@click.option("--test-subset", type=int, help="Evaluate on the first N test examples only.")
@click.option(
    "--validation", type=int, help="Hold out the last N training examples as a validation split."
)
@click.option("--dropout-input", type=float, help="Dropout rate of the input  [default: 0]")
@click.option("--dropout-hidden", type=float, help="Dropout rate of hidden blocks  [default: 0]")
@click.option("--weight-decay", type=float, help="The optimizer's weight decay  [default: 0]")
@click.option("--schedule", help="Learning-rate schedule: step:every=30,gamma=0.1, cosine ...")
@click.option(
    "--alignment/--no-alignment", default=None, help="Measure alignment with backprop per epoch."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the dataset's IDX files.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Run directory  [default: runs/<stamp>-<rule>-<key>]",
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Continue the run in this directory from its last checkpoint.",
)
@click.option(
    "--from-previous",
    is_flag=True,
    help="With --resume: continue from the checkpoint before the last (checkpoint.prev.pt), "
    "when the last one is refused.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="With --resume: discard the run's epochs and start its configuration over.",
)
@click.option("--overwrite", is_flag=True, help="Replace the run that the --out directory holds.")
@click.option("--tensorboard", is_flag=True, help="Also log every metric to RUN_DIR/tensorboard.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def train(
    config_file: Path | None,
    data_dir: Path | None,
    out: Path | None,
    checkpoint_every: int,
    resume: Path | None,
    from_previous: bool,
    restart: bool,
    overwrite: bool,
    tensorboard: bool,
    quiet: bool,
    as_json: bool,
    device: str | None,
    **flags: Any,
) -> None:
    """Train one network and record it in a run directory.

    Defaults are the paper's: 2x800 tanh, rule s1, 100 epochs, batch 32, SGD, lr 0.001,
    summed updates. A built-in model (--model lenet5) brings its own protocol instead, used
    for whatever the flags and the --config file leave unset: for lenet5 Adam with lr 0.001,
    batch 32, mean updates, weight decay 1e-4, 20 epochs with the rate divided by 10 at
    epochs 8, 12 and 16, and Glorot-scaled feedback (gfalign.models). Progress goes to
    stderr, so --json output on stdout stays clean.
    A directory that already holds a run is refused unless --overwrite; a checkpoint that is
    corrupted, truncated or missing is refused, and the message names --from-previous or
    --restart.
    """
    _check_modes(out, resume, from_previous, restart, overwrite)
    start = {
        "resume": resume is not None and not restart,
        "overwrite": overwrite or restart,
        "from_previous": from_previous,
    }
    try:
        config, directory = _configure(config_file, out, resume, device, flags)
        writer = _tensorboard(directory) if tensorboard else None
        result = _run(config, directory, start, data_dir, checkpoint_every, writer, quiet)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from None

    final = result.summary.get("final", {})
    if as_json:
        click.echo(
            json.dumps(
                {
                    "directory": str(result.directory),
                    "key": result.summary["key"],
                    "label": result.summary["label"],
                    "status": result.summary["status"],
                    "epochs": result.summary["epochs"],
                    "final": final,
                },
                indent=2,
            )
        )
    if not quiet:
        error = error_text(config.objective, final.get("test_error"))
        click.echo(
            f"{result.summary['status']} {config.label()}: {error} after "
            f"{result.summary['epochs']} epochs ({result.directory})",
            err=True,
        )


def _check_modes(
    out: Path | None, resume: Path | None, from_previous: bool, restart: bool, overwrite: bool
) -> None:
    if resume is None and (from_previous or restart):
        flag = "--from-previous" if from_previous else "--restart"
        raise click.UsageError(f"{flag} applies to a run being resumed: add --resume DIR")
    if from_previous and restart:
        raise click.UsageError("--from-previous continues the run and --restart starts it over")
    if overwrite and resume is not None:
        raise click.UsageError(
            "--overwrite replaces the run of --out DIR; to start the run in a --resume "
            "directory over, use --resume DIR --restart"
        )


def _configure(
    config_file: Path | None,
    out: Path | None,
    resume: Path | None,
    device: str | None,
    flags: Mapping[str, Any],
) -> tuple[RunConfig, Path]:
    if resume is not None:
        given = [f"--{name.replace('_', '-')}" for name in CONFIG_FLAGS if flags[name] is not None]
        if config_file is not None or out is not None or given:
            raise click.UsageError(
                "--resume continues a run with its recorded configuration; drop "
                + ", ".join(
                    given + (["--config"] if config_file else []) + (["--out"] if out else [])
                )
            )
        config = RunConfig.from_toml(resume / CONFIG)
        if device is not None:
            config = config.override(device=device)
        return config, resume
    data = load_toml(config_file) if config_file is not None else {}
    config = RunConfig.from_data(data)
    changes = dict(flags)
    if changes["rule"] is not None:
        changes["rule"] = rule_value(changes["rule"])
    if changes["model"] is not None:
        changes["model"] = table_value(changes["model"], "model")
    if changes["hidden"] is not None:
        changes["hidden"] = list(changes["hidden"])
    config = config.override(device=device, **changes)
    # A built-in model's protocol fills what neither the file nor a flag set.
    given = given_fields(data) | {name for name, value in changes.items() if value is not None}
    config = with_model_protocol(config, given)
    return config, out if out is not None else default_directory(config)


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise click.ClickException(
            "--tensorboard needs the tensorboard package: pip install gfalign[tensorboard]"
        ) from None
    return SummaryWriter, directory / "tensorboard"


def _run(
    config: RunConfig,
    directory: Path,
    start: Mapping[str, bool],
    data_dir: Path | None,
    checkpoint_every: int,
    tensorboard,
    quiet: bool,
):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, quiet=quiet)
    writer = None
    epochs = config.train.epochs
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )
    state = {"task": None, "started": time.perf_counter(), "epoch": 0}

    def on_batch(step: int, steps: int) -> None:
        if quiet:
            return
        if state["task"] is None:
            state["started"] = time.perf_counter()
            state["task"] = progress.add_task(
                "train", total=steps, epoch=state["epoch"] + 1, epochs=epochs, rate="-"
            )
        if step % 20 == 0 or step == steps:
            elapsed = max(time.perf_counter() - state["started"], 1e-9)
            progress.update(state["task"], completed=step, rate=f"{step / elapsed:,.0f}")

    def on_epoch(record: dict[str, float]) -> None:
        nonlocal writer
        state["epoch"] = int(record["epoch"])
        if state["task"] is not None:
            progress.remove_task(state["task"])
            state["task"] = None
        errors = ""
        for split in ("train", "validation", "test"):  # those the epoch measured
            value = record.get(f"{split}_error")
            if value is not None:
                errors += "  " + error_text(config.objective, value, 6, split=split)
        console.print(
            f"epoch {int(record['epoch']):>4}/{epochs}  loss {record['batch_loss']:.4g}"
            f"{errors}  {record['seconds']:.1f}s",
            highlight=False,
        )
        if tensorboard is not None:
            if writer is None:
                summary_writer, log_dir = tensorboard
                writer = summary_writer(log_dir=str(log_dir))
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, int(record["epoch"]))
            writer.flush()

    def on_note(note: str) -> None:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)

    if not quiet:
        verb = "resuming" if start["resume"] else "training"
        console.print(
            f"{verb} {config.label()} on {config.dataset} -> {directory}", highlight=False
        )
    try:
        with terminate_as_interrupt(), progress:
            return execute(
                config,
                directory,
                **start,
                data_dir=data_dir,
                checkpoint_every=checkpoint_every,
                on_epoch=on_epoch,
                on_batch=on_batch,
                on_note=on_note,
                quiet=quiet,
            )
    except KeyboardInterrupt as stop:
        console.print(
            f"interrupted; the finished epochs are kept. Continue with: "
            f"gfalign train --resume {directory}",
            highlight=False,
        )
        raise exit_interrupted(stop) from None
    finally:
        if writer is not None:
            writer.close()
