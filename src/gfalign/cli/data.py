"""``gfalign data fetch|verify|info``: get, check and describe the datasets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np

from gfalign.data import SPECS, DataError, FileReport, get_spec
from gfalign.data import fetch as fetch_files
from gfalign.data import verify as verify_files
from gfalign.data.dataset import read_labels
from gfalign.data.files import lookup_directory
from gfalign.data.tensors import tensor_path

DEFAULT = ("mnist",)

names_argument = click.argument(
    "names", nargs=-1, type=click.Choice(tuple(SPECS)), metavar="[NAME]..."
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory holding the dataset's files: MNIST's four IDX files, gzipped or not, or "
    "CIFAR-10's six .bin batch files (default: $GFALIGN_DATA, else the cache).",
)


@click.group("data")
def data() -> None:
    """Fetch, verify and describe datasets (mnist, fashion-mnist, cifar10).

    CIFAR-10 is its binary release (cifar-10-binary.tar.gz), never the pickled one."""


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
        click.echo(f"  {_class_counts(spec, reports, data_dir)}")


def _reports(name: str, data_dir: Path | None) -> list[FileReport]:
    try:
        return verify_files(name, root=data_dir)
    except DataError as error:
        raise click.ClickException(str(error)) from None


def _class_counts(spec, reports: Sequence[FileReport], data_dir: Path | None) -> str:
    """``'train: 60,000 examples; per class 5923 6742 ...'`` and the same for test, from
    verified files only (a bad file is never read)."""
    bad = [report for report in reports if not report.good]
    if bad:
        return f"no class counts ({bad[0].name} is {bad[0].status})"
    try:
        labels = read_labels(spec, lookup_directory(spec, data_dir))
    except DataError as error:
        raise click.ClickException(str(error)) from None
    lines = []
    for split, values in zip(("train", "test"), labels, strict=True):
        counts = np.bincount(values, minlength=len(spec.classes)).tolist()
        lines.append(f"{split}: {sum(counts):,} examples; per class " + " ".join(map(str, counts)))
    return "\n  ".join(lines)
