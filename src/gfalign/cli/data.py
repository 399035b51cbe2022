"""``gfalign data fetch|verify|info``: get, check and describe the datasets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from gfalign.data import DATASETS, DataError, FileReport, get_spec
from gfalign.data import fetch as fetch_files
from gfalign.data import verify as verify_files
from gfalign.data.files import lookup_directory
from gfalign.data.idx import read as read_idx
from gfalign.data.tensors import tensor_path

DEFAULT = ("mnist",)

names_argument = click.argument("names", nargs=-1, type=click.Choice(DATASETS), metavar="[NAME]...")
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory holding the four IDX files, gzipped or not (default: $GFALIGN_DATA, "
    "else the cache).",
)


@click.group("data")
def data() -> None:
    """Fetch, verify and describe datasets (mnist, fashion-mnist)."""


@data.command("fetch", short_help="Download and verify datasets into the cache.")
@names_argument
@data_dir_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def fetch_command(names: Sequence[str], data_dir: Path | None, quiet: bool) -> None:
    """Download and verify NAME (default mnist) unless its files are already at hand."""
    for name in names or DEFAULT:
        try:
            directory = fetch_files(name, root=data_dir, quiet=quiet)
        except DataError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{name}: verified files in {directory}")


@data.command("verify", short_help="Check each file against its pinned SHA-256.")
@names_argument
@data_dir_option
def verify_command(names: Sequence[str], data_dir: Path | None) -> None:
    """Check each file of NAME (default mnist) against its pinned SHA-256 and IDX header."""
    failures = 0
    total = 0
    for name in names or DEFAULT:
        for report in _reports(name, data_dir):
            total += 1
            failures += not report.good
            where = report.path or ""
            detail = f"  ({report.detail})" if report.detail and report.path else ""
            click.echo(f"{name}  {report.status:<7}  {report.name}  {where}{detail}")
    if failures:
        raise click.ClickException(
            f"{failures} of {total} files are bad or missing; `gfalign data fetch` gets them"
        )


@data.command("info", short_help="Show where the files are, their sizes, class counts.")
@names_argument
@data_dir_option
def info_command(names: Sequence[str], data_dir: Path | None) -> None:
    """Where the files of NAME (default mnist) are, their sizes and the class counts."""
    for name in names or DEFAULT:
        spec = get_spec(name)
        reports = _reports(name, data_dir)
        click.echo(f"{name}: {len(spec.classes)} classes ({', '.join(spec.classes)})")
        click.echo(f"  directory: {lookup_directory(spec, data_dir)}")
        for report in reports:
            size = f"{report.size:,} bytes" if report.size is not None else ""
            click.echo(f"  {report.name:<24} {report.status:<7} {size:>18}  {report.path or ''}")
        cached = tensor_path(spec)
        if cached.is_file():
            click.echo(f"  fast cache: {cached} ({cached.stat().st_size:,} bytes)")
        else:
            click.echo("  fast cache: not built yet (the first load builds it)")
        for split, report in (("train", reports[1]), ("test", reports[3])):
            click.echo(f"  {split}: {_class_counts(report, len(spec.classes))}")


def _reports(name: str, data_dir: Path | None) -> list[FileReport]:
    try:
        return verify_files(name, root=data_dir)
    except DataError as error:
        raise click.ClickException(str(error)) from None


def _class_counts(labels: FileReport, classes: int) -> str:
    """``'60,000 examples; per class 5923 6742 ...'`` from a verified label file."""
    if not labels.good or labels.path is None:
        return f"no class counts ({labels.name} is {labels.status})"
    try:
        counts = np.bincount(read_idx(labels.path), minlength=classes).tolist()
    except DataError as error:
        raise click.ClickException(str(error)) from None
    return f"{sum(counts):,} examples; per class " + " ".join(str(count) for count in counts)
