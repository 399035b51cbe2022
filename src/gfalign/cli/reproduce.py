"""``gfalign reproduce``, ``gfalign runs`` and ``gfalign report``: the paper's experiments.

``reproduce`` runs an experiment's grid into a SQLite results store (skipping finished runs,
resuming unfinished ones from their run directories); ``runs`` lists, shows and exports the
store; ``report`` prints our mean ± std beside the paper's numbers as Markdown.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from gfalign.cli.train import USER_ERRORS

__all__ = ["render_report", "report", "reproduce", "runs"]

DEFAULT_STORE = Path("results/runs.sqlite")
DEFAULT_RUNS = Path("results/runs")


def _names(which: str) -> list[str]:
    from gfalign.experiments import EXPERIMENTS

    return list(EXPERIMENTS) if which == "all" else [which]


def _experiment_choice() -> click.Choice:
    from gfalign.experiments import EXPERIMENTS

    return click.Choice([*EXPERIMENTS, "all"])


_store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    help="The SQLite results store.",
)


@click.command("reproduce")
@click.argument("experiment", type=_experiment_choice())
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds per cell  [default: 5]")
@click.option("--epochs", type=click.IntRange(min=1), help="Replace the protocol's 100 epochs.")
@click.option("--quick", is_flag=True, help="512 train / 256 test examples, 1 epoch (smoke run).")
@click.option(
    "--only",
    multiple=True,
    metavar="TEXT",
    help="Only the cells whose name contains TEXT, e.g. '2x800 tanh' (repeatable: any of them).",
)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@_store_option
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUNS,
    show_default=True,
    help="Run directories go to RUNS_DIR/<key>.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the dataset's IDX files.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def reproduce(
    experiment: str,
    seeds: int | None,
    epochs: int | None,
    quick: bool,
    only: tuple[str, ...],
    jobs: int,
    backend: str,
    store_path: Path,
    runs_dir: Path,
    data_dir: Path | None,
    quiet: bool,
) -> None:
    """Run EXPERIMENT's grid (exp1 exp2 exp3 exp4 baselines, or all) into the results store.

    Finished runs are skipped; an interrupted sweep continues where it stopped, resuming an
    unfinished run from its checkpoint. Progress goes to stderr.
    """
    if backend == "ray":
        raise click.ClickException("--backend ray is not yet available; use --backend local")
    from gfalign.store import Store
    from gfalign.sweep import Progress, run_sweep

    def progress(event: Progress) -> None:
        if quiet:
            return
        error = event.final.get("test_error", math.nan)
        click.echo(
            f"[{event.done}/{event.total}] {event.status:<8} {event.config.label()}  "
            f"test error {error:.2f}  {event.config.key()}",
            err=True,
        )

    names = _names(experiment)
    if only:
        from gfalign.experiments import load

        cells = [c for n in names for c in load(n).cells()]
        if not any(text in c for c in cells for text in only):
            raise click.BadParameter(
                f"no cell matches {' or '.join(map(repr, only))}; cells look like "
                f"{', '.join(cells[:4])}",
                param_hint="--only",
            )
    try:
        with Store(store_path) as store:
            for name in names:
                if not quiet:
                    click.echo(f"== {name} -> {store_path}", err=True)
                counts = run_sweep(
                    name,
                    store,
                    runs_dir,
                    seeds=seeds,
                    epochs=epochs,
                    quick=quick,
                    only=only,
                    jobs=jobs,
                    data_dir=data_dir,
                    progress=progress,
                )
                if not quiet:
                    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                    click.echo(f"{name}: {text or 'nothing to do'}", err=True)
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to continue.", err=True)
        raise SystemExit(130) from None


@click.group("runs")
def runs() -> None:
    """List, show and export the runs in the results store."""


@runs.command("list")
@_store_option
@click.option("--experiment", "-e", help="Only this experiment's runs.")
def runs_list(store_path: Path, experiment: str | None) -> None:
    """One line per run: key, experiment, status, epochs, test error, label."""
    store = _open(store_path)
    rows = store.list(experiment)
    for row in rows:
        error = row["final"].get("test_error", math.nan)
        click.echo(
            f"{row['key']}  {row['experiment'] or '-':<9} {row['status']:<9} "
            f"{row['epochs_done']:>4}  {error:7.2f}  {row['label']}"
        )
    if not rows:
        click.echo(f"no runs in {store_path}", err=True)


@runs.command("show")
@click.argument("key")
@_store_option
@click.option("--history", is_flag=True, help="Include the per-epoch history.")
def runs_show(key: str, store_path: Path, history: bool) -> None:
    """Print the stored row of run KEY (a unique key prefix is enough) as JSON."""
    store = _open(store_path)
    rows = store.find(key)
    if not rows:
        raise click.ClickException(f"no run with key {key!r} in {store_path}")
    if len(rows) > 1:
        raise click.ClickException(
            f"key prefix {key!r} is ambiguous: {', '.join(r['key'] for r in rows[:10])}"
        )
    row = rows[0]
    if not history:
        row = {k: v for k, v in row.items() if k != "history"}
    click.echo(json.dumps(row, indent=2, default=str))


@runs.command("export")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_store_option
@click.option("--experiment", "-e", help="Only this experiment's runs.")
def runs_export(out: Path, store_path: Path, experiment: str | None) -> None:
    """Write one CSV line per run (final metrics as columns) to OUT."""
    count = _open(store_path).export_csv(out, experiment)
    click.echo(f"wrote {count} runs to {out}", err=True)


def _open(store_path: Path):
    from gfalign.store import Store

    if not store_path.exists():
        raise click.ClickException(
            f"results store {store_path} does not exist; run `gfalign reproduce` first"
        )
    return Store(store_path)


# ---------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _protocol(config: Mapping[str, Any]) -> tuple[int, int | None, int | None]:
    train = config.get("train", {})
    return int(train.get("epochs", 100)), config.get("train_subset"), config.get("test_subset")


def summarize(experiment, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: one per (cell, protocol) with runs, then paper cells without runs."""
    from gfalign.config import RunConfig

    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row["status"] != "finished":
            continue
        value = row["final"].get(experiment.metric)
        if value is None:
            continue
        config = RunConfig.from_data(row["config"])
        key = (experiment.cell(config), _protocol(row["config"]))
        groups.setdefault(key, []).append(float(value))
    order = {name: i for i, name in enumerate(experiment.cells())}
    out = []
    for (cell, (epochs, train_subset, _test_subset)), values in sorted(
        groups.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0])
    ):
        mean, std = _mean_std(values)
        paper = experiment.paper.get(cell)
        out.append(
            {
                "cell": cell,
                "paper": paper,
                "mean": mean,
                "std": std,
                "n": len(values),
                "epochs": epochs,
                "subset": train_subset,
                "difference": None if paper is None else mean - paper,
            }
        )
    seen = {r["cell"] for r in out}
    for cell in experiment.cells():
        if cell not in seen and cell in experiment.paper:
            out.append(
                {
                    "cell": cell,
                    "paper": experiment.paper[cell],
                    "mean": None,
                    "std": None,
                    "n": 0,
                    "epochs": None,
                    "subset": None,
                    "difference": None,
                }
            )
    return out


def render_report(experiment, rows: Iterable[Mapping[str, Any]]) -> str:
    """The Markdown section of one experiment."""
    table = summarize(experiment, rows)
    lines = [f"## {experiment.name}", "", experiment.description, ""]
    lines += [
        "| cell | paper | ours (mean ± std) | n | epochs | difference |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        paper = "—" if r["paper"] is None else f"{r['paper']:.2f}"
        ours = "—" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        epochs = "—" if r["epochs"] is None else str(r["epochs"])
        if r["subset"] is not None:
            epochs += f" ({r['subset']} ex)"
        diff = "—" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {r['cell']} | {paper} | {ours} | {r['n']} | {epochs} | {diff} |")
    if not table:
        lines.append("| (no finished runs) | | | | | |")
    return "\n".join(lines) + "\n"


@click.command("report")
@click.argument("experiment", type=_experiment_choice())
@_store_option
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file."
)
def report(experiment: str, store_path: Path, output: Path | None) -> None:
    """Print EXPERIMENT's table (ours mean ± std beside the paper's values) as Markdown."""
    from gfalign.experiments import load

    store = _open(store_path)
    try:
        sections = [render_report(load(n), store.list(n)) for n in _names(experiment)]
    except USER_ERRORS as error:
        raise click.ClickException(str(error)) from None
    text = "# gfalign: ours beside the paper (test error %)\n\n" + "\n".join(sections)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
