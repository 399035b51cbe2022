"""The ``gfalign`` command line.

Subcommands live in their own modules and are imported only when used, so ``gfalign --help``
starts fast and a subcommand's dependencies stay its own.
"""

from __future__ import annotations

import importlib

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
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

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
def main() -> None:
    """gfalign: backprop, feedback alignment, DFA and the general feedback alignment rule."""
