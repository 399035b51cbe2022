"""``gfalign tune``: a hyperparameter search on the validation split, then final runs.

The search and its storage are ``gfalign.tune``'s; this module reads the flags, reports each
trial on stderr, and writes the summary (``summary.json``), the plot (``study.png``) and the
final runs' results (``final.json``) into the study's directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from gfalign.cli.reproduce import DEFAULT_STORE, stack_option
from gfalign.cli.train import USER_ERRORS, error_text

EXAMPLE = """\b
Example study (dfa.toml):
    trials = 30
    epochs = 20
    [base]
    dataset = "mnist"
    validation = 10000
    hidden = [800, 800]
    rule = "dfa"
    [space]
    "train.lr" = {low = 1e-5, high = 1e-2, log = true}
    "train.optimizer" = ["sgd", "adam", "rmsprop"]
    "train.batch_size" = {low = 32, high = 128, step = 32}
    [pruner]
    kind = "median"
    startup_trials = 5

\b
    gfalign tune dfa.toml --jobs 2           # search (continues a stopped study)
    gfalign tune dfa.toml --summary          # where a running study stands, training nothing
    gfalign tune dfa.toml --final --seeds 5 --jobs 2  # best trial on 5 seeds, test set once
    gfalign tune dfa.toml --storage postgresql://host/db   # one study, many machines

\b
A study that trains another's best again, longer (dfa-60.toml):
    search = "dfa.toml"
    [final]
    epochs = 60
\b
    gfalign tune dfa-60.toml --final --jobs 2   # dfa.toml's best trial, 60 epochs
"""


@click.command("tune", epilog=EXAMPLE)
@click.argument("study_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    help="Trials to finish in total, instead of the study's `trials`.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Trials trained at once by this process; with --final, worker processes training "
    "the seeds at once.",
)
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna database URL shared by several machines  [default: sqlite:///OUT/study.db]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="The study's directory  [default: <study>.tune beside the study file]",
)
@click.option(
    "--final",
    is_flag=True,
    help="Instead of searching: train the best trial on several seeds and measure the test "
    "set once per run, recording the runs in the results store.",
)
@click.option(
    "--summary",
    "summary_only",
    is_flag=True,
    help="Instead of searching: write the summary and plot of the trials the storage holds "
    "now (a study another process is running, or a stopped one), training nothing.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    help="With --final: seeds 0..N-1  [default: the study's [final] seeds, else 5]",
)
@stack_option("of the final runs' seeds (with --final)")
@click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    help="With --final: the SQLite results store the runs are recorded in.",
)
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --final: run directories go to RUNS_DIR/<key>  [default: OUT/final]",
)
@click.option("--device", help="cpu, cuda or auto, instead of the base run's (not in its key).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the dataset's files.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def tune(
    study_file: Path,
    trials: int | None,
    jobs: int,
    storage: str | None,
    out: Path | None,
    final: bool,
    summary_only: bool,
    seeds: int | None,
    stack: int,
    store_path: Path,
    runs_dir: Path | None,
    device: str | None,
    data_dir: Path | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Search hyperparameters of STUDY_FILE on its validation split, with Optuna.

    A study file holds a base run (a [base] table in the format of `gfalign train --config`,
    or base = "run.toml"), a [space] of dotted configuration paths ("train.lr", "rule...",
    any run field) with a list of choices or a range {low, high, log, step}, the `trials` to
    finish and the `epochs` of each. Every trial reports its validation error per epoch, so
    the median pruner stops poor trials early; the test set is never evaluated. Trials are
    kept in an SQLite file in the study's directory, so a stopped study continues where it
    was; --storage shares one study between machines. The summary (best trial, parameter
    importances) goes to OUT/summary.json and OUT/study.png; --summary writes it from the
    trials stored so far, while a search runs or after it stopped. A trial whose process was
    killed or stopped is found, marked failed and its values tried again once, so a killed
    search continued finds the best a search never killed finds; the summary names each one.

    --final trains the best trial's configuration on several seeds, measures the test set
    once per run and records the runs in the results store (experiment "tune:NAME"). A study
    file with search = "other.toml" searches nothing: its --final trains that study's best
    trial with its own [final] epochs and seeds.
    """
    from gfalign import tune as tuning

    if not final and (seeds is not None or runs_dir is not None or stack != 1):
        raise click.UsageError("--seeds, --stack and --runs-dir choose the final runs: add --final")
    if final and summary_only:
        raise click.UsageError("--final trains and --summary only reads the study: use one of them")
    try:
        import optuna
    except ImportError:  # pragma: no cover - a dependency of gfalign
        raise click.ClickException("gfalign tune needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = tuning.load(study_file, directory=out, device=device)
        if not final:
            tuning.require_search(study)
        if final:
            result = _final(
                study, storage, seeds, store_path, runs_dir, data_dir, quiet, jobs, stack
            )
            path = tuning.write_json(study.directory / "final.json", result)
            _echo_final(result, study, path, quiet, as_json)
            return
        if summary_only:
            opened = tuning.open_study(study, storage, create=False)
            summary = tuning.summarize(study, opened, trials)
        else:
            summary = _search(study, storage, trials, jobs, data_dir, quiet)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from None
    path = tuning.write_json(study.directory / "summary.json", summary)
    figure = tuning.plot(summary, study.directory / "study.png")
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    if not quiet:
        _echo_summary(summary, study, path, figure)


def _search(study, storage, trials, jobs, data_dir, quiet) -> dict[str, Any]:
    from gfalign import tune as tuning

    objective = study.base.objective

    def on_trial(trial) -> None:
        if quiet:
            return
        state = "diverged" if "diverged" in trial.user_attrs else trial.state.name.lower()
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        shown = error_text(objective, value, split="validation") if value is not None else ""
        epochs = trial.user_attrs.get("epochs", "?")
        click.echo(
            f"trial {trial.number:>3} {state:<9} {shown} after {epochs} epoch(s)  "
            f"{_values(trial.params)}",
            err=True,
        )

    if not quiet:
        click.echo(
            f"tuning {study.name}: {trials or study.trials} trials of {study.epochs} epochs -> "
            f"{tuning.storage_url(study, storage)}",
            err=True,
        )

    def on_note(note: str) -> None:
        if not quiet:
            click.echo(f"note: {note}", err=True)

    opened = tuning.run(
        study,
        storage=storage,
        trials=trials,
        jobs=jobs,
        data_dir=data_dir,
        on_trial=on_trial,
        on_note=on_note,
    )
    return tuning.summarize(study, opened, trials)


def _final(
    study, storage, seeds, store_path, runs_dir, data_dir, quiet, jobs, stack
) -> dict[str, Any]:
    from gfalign import tune as tuning

    def on_run(config, status, final) -> None:
        if not quiet:
            test = final.get("test_error") if status in ("finished", "skipped") else None
            shown = status if test is None else error_text(config.objective, test)
            done = " (already stored)" if status == "skipped" else ""
            click.echo(f"final seed {config.seed}: {shown}{done}  {config.key()}", err=True)

    return tuning.final(
        study,
        storage=storage,
        seeds=None if seeds is None else list(range(seeds)),
        store_path=store_path,
        runs_dir=runs_dir,
        data_dir=data_dir,
        jobs=jobs,
        stack=stack,
        on_run=on_run,
    )


def _values(params: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{name}={shown(value)}" for name, value in params.items())


def _echo_summary(summary: dict[str, Any], study, path: Path, figure: Path) -> None:
    states = ", ".join(f"{count} {state}" for state, count in sorted(summary["states"].items()))
    counted = f"{summary['counted']}/{summary['target_trials']}"
    click.echo(f"{summary['study']}: {counted} trials ({states})", err=True)
    for retried in summary["retried"]:
        click.echo(
            f"trial {retried['trial']} was lost (its process died or was stopped) and tried "
            f"again as trial {retried['as']}",
            err=True,
        )
    best = summary["best"]
    if best is None:
        click.echo("no completed trial yet", err=True)
    else:
        error = error_text(study.base.objective, best["validation_error"], split="validation")
        click.echo(f"best trial {best['number']}: {error}  {_values(best['params'])}", err=True)
    for name, value in summary["importances"].items():
        click.echo(f"  importance {name}: {value:.3f}", err=True)
    if not summary["importances"]:
        click.echo(f"  {summary['importances_note']}", err=True)
    click.echo(f"summary {path}, plot {figure}", err=True)


def _echo_final(result: dict[str, Any], study, path: Path, quiet: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    if quiet:
        return
    test = result["test_error"]
    mean = math.nan if test["mean"] is None else test["mean"]
    objective = study.base.objective
    click.echo(
        f"best trial {result['trial']} on {test['n']} seeds: {error_text(objective, mean)} "
        f"(std {test['std']:.3g}); {path}",
        err=True,
    )
