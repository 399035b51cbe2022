"""``gfalign reproduce``, ``gfalign runs`` and ``gfalign report``: the paper's experiments.

``reproduce`` runs an experiment's grid into a SQLite results store (skipping finished runs,
resuming unfinished ones from their run directories; two at once on one store share the work,
``gfalign.sweep``); ``runs`` lists, shows, exports and imports the store; ``report`` puts our
mean ± std beside the paper's numbers, as Markdown on stdout or as pages, figures and a
self-contained HTML file (``gfalign.report``). The commands that only read (``runs list``,
``show``, ``export``, ``report``) open the store read-only, so it may lie on read-only media.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from gfalign.cli.train import USER_ERRORS, error_text
from gfalign.report import render_report, summarize
from gfalign.train import EPOCHS_MAX

__all__ = ["render_report", "report", "reproduce", "runs", "summarize"]

DEFAULT_STORE = Path("results/runs.sqlite")
DEFAULT_RUNS = Path("results/runs")


def _names(which: str, every: bool = False) -> list[str]:
    """The experiments ``which`` names: ``all`` is the paper's (with ``every``, every preset)."""
    from gfalign.experiments import EXPERIMENTS, PAPER

    if which == "all":
        return list(EXPERIMENTS if every else PAPER)
    return [which]


def _experiment_choice() -> click.Choice:
    from gfalign.experiments import EXPERIMENTS, READINGS, STUDIES

    return click.Choice([*EXPERIMENTS, *STUDIES, *READINGS, "all"])


def stack_option(what: str):
    """``--stack K``: up to K of ``what`` trained as one stacked computation."""
    return click.option(
        "--stack",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        metavar="K",
        help=f"Train up to K {what} as one stacked computation: faster for small networks "
        "and on a GPU, equal up to rounding.",
    )


_store_option = click.option(
    "--store",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    help="The SQLite results store.",
)


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the dataset's IDX files.",
)


@click.command("reproduce")
@click.argument("experiment", type=_experiment_choice())
@click.option("--seeds", type=click.IntRange(min=1), help="Seeds per cell  [default: 5]")
@click.option(
    "--epochs",
    type=click.IntRange(1, EPOCHS_MAX),
    help=f"Replace the protocol's 100 epochs (at most {EPOCHS_MAX}).",
)
@click.option("--quick", is_flag=True, help="512 train / 256 test examples, 1 epoch (smoke run).")
@click.option(
    "--only",
    multiple=True,
    metavar="TEXT",
    help="Only the cells whose name contains TEXT, e.g. '2x800 tanh' (repeatable: any of them).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes of the local backend.",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this machine; ray: one Ray task per run (pip install 'gfalign[ray]').",
)
@click.option(
    "--address",
    metavar="ADDR",
    help="Ray cluster to run on (auto, ray://host:10001); default: start a local Ray.",
)
@click.option(
    "--cpus-per-run",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPUs each Ray task asks for (a CUDA run also asks for one GPU).",
)
@click.option(
    "--device",
    metavar="DEVICE",
    help="cpu, cuda, cuda:1 or auto, instead of the experiment's cpu (not part of a run's key).",
)
@stack_option("runs of a cell (its seeds; exp4's feedback families)")
@_store_option
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUNS,
    show_default=True,
    help="Run directories go to RUNS_DIR/<key>.",
)
@_data_dir_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def reproduce(
    experiment: str,
    seeds: int | None,
    epochs: int | None,
    quick: bool,
    only: tuple[str, ...],
    jobs: int,
    backend: str,
    address: str | None,
    cpus_per_run: int,
    device: str | None,
    stack: int,
    store_path: Path,
    runs_dir: Path,
    data_dir: Path | None,
    quiet: bool,
) -> None:
    """Run EXPERIMENT's grid (exp1 exp2 exp3 exp4 baselines, all of these, or fashion: the
    2x800 tanh network with every rule on Fashion-MNIST; or a sensitivity study, study-*: a
    question about a published cell, each run one change to the paper's protocol; or a
    reading, reading-*: one change of the protocol on every cell of the experiments it reads)
    into the results store.

    Finished runs are skipped; an interrupted sweep continues where it stopped, resuming an
    unfinished run from its checkpoint. Two sweeps on the same store and runs directory share
    the work: a run another process is training is left to it (shown as busy) and taken up
    again at the end, stored by the other sweep or resumed if that one died. Progress goes to
    stderr. With --backend ray only this process writes the store; on a cluster, RUNS_DIR must
    be on a shared filesystem for unfinished runs to resume.
    """
    from importlib.util import find_spec

    from gfalign.claims import RunBusyError
    from gfalign.store import Store, StoreError
    from gfalign.sweep import NEEDS_RAY, Progress, run_sweep

    if address is not None and backend != "ray":
        raise click.BadParameter("needs --backend ray", param_hint="--address")
    if backend == "ray" and find_spec("ray") is None:
        raise click.ClickException(NEEDS_RAY)

    def progress(event: Progress) -> None:
        if quiet:
            return
        if event.status == "busy":
            click.echo(
                f"[{event.done}/{event.total}] busy     {event.config.label()}  {event.detail}; "
                f"coming back to it  {event.config.key()}",
                err=True,
            )
            return
        error = error_text(event.config.objective, event.final.get("test_error"))
        detail = f"  ({event.detail})" if event.detail else ""
        click.echo(
            f"[{event.done}/{event.total}] {event.status:<8} {event.config.label()}  "
            f"{error}  {event.config.key()}{detail}",
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
                    backend=backend,
                    address=address,
                    cpus_per_run=cpus_per_run,
                    stack=stack,
                    device=device,
                    data_dir=data_dir,
                    progress=progress,
                )
                if not quiet:
                    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                    click.echo(f"{name}: {text or 'nothing to do'}", err=True)
    except (*USER_ERRORS, StoreError, RunBusyError) as error:
        raise click.ClickException(str(error)) from error
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
    """One line per run: key, experiment, status, epochs, final error, label."""
    with _open(store_path) as store:
        rows = store.list(experiment)
    for row in rows:
        objective = row["config"].get("objective", "classification")
        error = error_text(objective, row["final"].get("test_error"), 5)
        click.echo(
            f"{row['key']}  {row['experiment'] or '-':<9} {row['status']:<9} "
            f"{row['epochs_done']:>4}  {error:<29}  {row['label']}"
        )
    if not rows:
        click.echo(f"no runs in {store_path}", err=True)


@runs.command("show")
@click.argument("key")
@_store_option
@click.option("--history", is_flag=True, help="Include the per-epoch history.")
def runs_show(key: str, store_path: Path, history: bool) -> None:
    """Print the stored row of run KEY (a unique key prefix is enough) as JSON."""
    with _open(store_path) as store:
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
    """Write the runs to OUT: a CSV table of final metrics for OUT.csv, else every column with
    the per-epoch history as JSON lines (gzipped for OUT.jsonl.gz), which `runs import` reads
    back. The file is written whole or not at all."""
    with _open(store_path) as store:
        count = store.export(out, experiment)
    click.echo(f"wrote {count} runs to {out}", err=True)


@runs.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@_store_option
@click.option("--replace", is_flag=True, help="Overwrite runs the store already has.")
def runs_import(source: Path, store_path: Path, replace: bool) -> None:
    """Add the runs of an export (CSV or JSON lines) to the store (created if missing), e.g. to
    rebuild it from the committed results/runs.jsonl.gz. Runs the store already has are kept
    unless the file has more epochs of them (or --replace); `reproduce` then skips the
    finished ones. Every row is checked first and all go in, in one transaction, or none; a
    refused import leaves no store it created. A file holding no run (only blank lines) and a
    line longer than 16 MiB are refused."""
    from gfalign.store import Store, StoreError

    try:
        store = Store(store_path)
        try:
            imported, skipped = store.import_file(source, replace=replace)
        except BaseException:
            store.discard()  # a store this import created goes again with it
            raise
        finally:
            store.close()
    except StoreError as error:
        raise click.ClickException(str(error)) from error
    click.echo(
        f"imported {imported} runs from {source} into {store_path}"
        + (f" ({skipped} already there, kept)" if skipped else ""),
        err=True,
    )


def _open(store_path: Path):
    """The store, read-only (it may lie on read-only media)."""
    from gfalign.store import Store, StoreError

    try:
        return Store(store_path, readonly=True)
    except StoreError as error:
        raise click.ClickException(str(error)) from error


# ---------------------------------------------------------------------------- report


@click.command("report")
@click.argument("experiment", type=_experiment_choice())
@_store_option
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUNS,
    show_default=True,
    help="Where the run directories are (the autoencoder figures load their checkpoints).",
)
@_data_dir_option
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/README.md, DIR/<experiment>.md, DIR/report.html and DIR/figures/*.png.",
)
@click.option(
    "--tune-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results/tune"),
    show_default=True,
    help="Where the `gfalign tune` studies' folders are (each with summary.json and "
    "final.json); with --output their searches and final runs make DIR/beyond.md.",
)
@click.option(
    "--studies",
    "study_files",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("tune"),
    show_default=True,
    help="Where the study TOML files are: their [expected] tables give DIR/beyond.md's goals "
    "and published numbers.",
)
@click.option(
    "--peers-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results/peers"),
    show_default=True,
    help="Where the peer libraries' runs are (benchmarks/peers writes them), for the columns "
    "of an experiment whose preset names [peers].",
)
def report(
    experiment: str,
    store_path: Path,
    runs_dir: Path,
    data_dir: Path | None,
    output: Path | None,
    tune_dir: Path,
    study_files: Path,
    peers_dir: Path,
) -> None:
    """EXPERIMENT's tables (ours mean ± std beside the paper's values), figures and HTML page.

    Without --output, print the tables as Markdown. With it, write an index (README.md, which
    GitHub shows for the directory), one Markdown page per experiment, a self-contained
    report.html and the figures.
    """
    from gfalign.experiments import load
    from gfalign.report import write_report
    from gfalign.store import StoreError

    names = _names(experiment, every=True)
    if output is not None:
        _writable_directory(output, "--output")
    try:
        with _open(store_path) as store:
            if output is None:
                sections = [
                    render_report(
                        load(n),
                        store.list(n),
                        None if n == "baselines" else store.list("baselines"),
                        peers_dir=peers_dir,
                    )
                    for n in names
                ]
                click.echo("# gfalign: ours beside the paper\n\n" + "\n".join(sections), nl=False)
                return
            written = write_report(
                names,
                store,
                output,
                runs_dir=runs_dir,
                data_dir=data_dir,
                tune_dir=tune_dir,
                study_files=study_files,
                peers_dir=peers_dir,
            )
    except (*USER_ERRORS, StoreError) as error:
        raise click.ClickException(str(error)) from error
    figures = sum(p.suffix == ".png" for p in written)
    click.echo(
        f"wrote {output / 'README.md'}, {output / 'report.html'}, "
        f"{len(written) - 2 - figures} experiment pages and {figures} figures",
        err=True,
    )


def _writable_directory(directory: Path, option: str) -> None:
    """Create ``directory`` (and its figures/) or say, in one line, why it cannot be."""
    try:
        (directory / "figures").mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise click.ClickException(
            f"cannot write the report to {directory} ({error.strerror or error}); "
            f"choose a writable {option} directory"
        ) from error
