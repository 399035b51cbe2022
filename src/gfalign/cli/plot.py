"""``gfalign plot RUN_DIR...``: test error (or alignment) curves of runs in one PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from gfalign.runs import CONFIG, SUMMARY, RunError, read_metrics


def run_label(directory: Path) -> str:
    """The run's label from summary.json, else config.toml, else the directory name."""
    try:
        return str(json.loads((directory / SUMMARY).read_text())["label"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        from gfalign.config import RunConfig

        return RunConfig.from_toml(directory / CONFIG).label()
    except Exception:  # noqa: BLE001 - any unreadable configuration falls back to the name
        return directory.name


@click.command("plot")
@click.argument(
    "run_dirs",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="RUN_DIR...",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("plot.png"),
    show_default=True,
    help="The PNG to write.",
)
@click.option("--alignment", is_flag=True, help="Plot angles to backprop per hidden layer.")
@click.option(
    "--kind",
    type=click.Choice(["update", "delta", "weight"]),
    default="update",
    show_default=True,
    help="With --alignment: which angle.",
)
@click.option("--metric", default="test_error", show_default=True, help="The record to plot.")
@click.option("--title", default=None, help="Figure title.")
def plot(
    run_dirs: Sequence[Path],
    output: Path,
    alignment: bool,
    kind: str,
    metric: str,
    title: str | None,
) -> None:
    """Plot the curves of one or more runs, one line per run, into one PNG."""
    histories: dict[str, list[dict]] = {}
    try:
        for directory in run_dirs:
            label = run_label(directory)
            if label in histories:
                label = f"{label} ({directory.name})"
            histories[label] = read_metrics(directory)
    except RunError as error:
        raise click.ClickException(str(error)) from None
    try:
        if alignment:
            from gfalign.alignment import plot_alignment

            path = plot_alignment(histories, output, kind, title=title)
        else:
            from gfalign.plots import plot_curves

            path = plot_curves(histories, output, metric, title=title)
    except OSError as error:
        raise click.ClickException(
            f"cannot write the plot to {output} ({error.strerror or error}); "
            "choose a writable --output path"
        ) from error
    except ValueError as error:
        hint = " (train with --alignment to record angles)" if alignment else ""
        raise click.ClickException(f"{error}{hint}") from None
    click.echo(f"wrote {path}")
