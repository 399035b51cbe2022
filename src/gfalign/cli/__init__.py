"""The ``gfalign`` command line.

Subcommands live in their own modules and are imported only when used, so ``gfalign --help``
starts fast and a subcommand's dependencies stay its own.

An error the user can cause (a bad configuration, damaged data, a busy or damaged run directory,
a damaged store, a path that cannot be written, a full disk) ends the command with one line,
``Error: ...``, and exit status 1; ``gfalign --debug COMMAND`` (or ``GFALIGN_DEBUG=1``) shows its
traceback instead. Anything else is a bug and keeps its traceback. A Ctrl-C while a command
loads (PyTorch takes a second or two to import) ends it with one line and exit status 130, and
a command that records what it has done (``train``) treats SIGTERM as it treats Ctrl-C
(``terminate_as_interrupt``), ending with status 143.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import signal
import sqlite3
import threading
import traceback
from collections.abc import Iterator

import click

# name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("gfalign.cli.train", "train", "Train one network with a rule."),
    "rules": ("gfalign.cli.rules", "rules", "List and show rule configurations."),
    "plot": ("gfalign.cli.plot", "plot", "Plot test error or alignment curves of runs."),
    "data": ("gfalign.cli.data", "data", "Fetch, verify and describe datasets."),
    "feedback": ("gfalign.cli.feedback", "feedback", "Inspect feedback-matrix families."),
    "bench": ("gfalign.cli.bench", "bench", "Benchmark training speed of every rule."),
    "reproduce": ("gfalign.cli.reproduce", "reproduce", "Rerun the paper's experiments."),
    "runs": ("gfalign.cli.reproduce", "runs", "List, show and export stored runs."),
    "report": ("gfalign.cli.reproduce", "report", "Write the report beside the paper's numbers."),
    "tune": ("gfalign.cli.tune", "tune", "Search hyperparameters on the validation split."),
}


# (module, class): the exceptions a user can cause, whose message is the whole story
USER_ERRORS = (
    ("gfalign.rules", "ConfigError"),
    ("gfalign.data.errors", "DataError"),
    ("gfalign.runs", "RunError"),
    ("gfalign.claims", "RunBusyError"),
    ("gfalign.train", "DivergenceError"),
    ("gfalign.store", "StoreError"),
    ("gfalign.bench", "BenchError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The classes of ``USER_ERRORS`` (imported now: a command that failed has loaded them)."""
    return tuple(getattr(importlib.import_module(m), name) for m, name in USER_ERRORS)


def describe(error: BaseException) -> str | None:
    """One line for an error the user can cause, or None for a bug (which keeps its traceback)."""
    if isinstance(error, user_errors()):
        return str(error)
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"disk full writing{where}: {reason}; files are written whole or not at all, so "
                "what was there is kept: free some space and run this again"
            )
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write{where}: {reason}; choose a writable location"
        return f"{where.strip() or 'file system'}: {reason}"
    if isinstance(error, sqlite3.DatabaseError):
        return f"results store: {error}"
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that what is done for an
    interrupted command (a run marked ``interrupted``, its epochs kept) is done for it too."""

    status = 128 + signal.SIGTERM


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main
    thread; the previous handler comes back after it. Elsewhere than the main thread, nothing
    changes (only it can receive signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(number: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_interrupted(error: KeyboardInterrupt) -> SystemExit:
    """The exit of a command stopped by Ctrl-C (status 130) or SIGTERM (143)."""
    return SystemExit(error.status if isinstance(error, Terminated) else 130)


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and whose errors are one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as stop:
            # Ctrl-C while a command loads or before it handles interruptions itself.
            click.echo("Error: interrupted", err=True)
            raise exit_interrupted(stop) from None
        except click.ClickException as error:
            cause = error.__cause__ or error.__context__
            if ctx.params.get("debug") and cause is not None:
                traceback.print_exception(cause)
            raise
        except Exception as error:
            message = describe(error)
            if message is None or ctx.params.get("debug"):
                raise
            raise click.ClickException(message) from error

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, summary) for name, (_, _, summary) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gfalign")
@click.option(
    "--debug",
    is_flag=True,
    envvar="GFALIGN_DEBUG",
    help="Show the full traceback of an error instead of its one-line message.",
)
def main(debug: bool) -> None:
    """gfalign: backprop, feedback alignment, DFA and the general feedback alignment rule."""
