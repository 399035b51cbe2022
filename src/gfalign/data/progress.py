"""Progress bars for downloads and decompression, on stderr and only for a person watching."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def progress_bar(quiet: bool = False) -> Progress:
    """A byte-counting progress display, disabled when ``quiet`` or stderr is not a terminal.

    Use it as a context manager; tasks added to a disabled display cost nothing and print nothing,
    so logs and pipes stay clean.
    """
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
