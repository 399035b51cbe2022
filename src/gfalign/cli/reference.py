"""The documentation's reference pages, generated from the code so that they cannot drift.

``cli_reference`` renders every ``gfalign`` command, its subcommands, arguments and options as
click itself prints them under ``--help``; ``configuration_reference`` renders every field of a
run, of its training protocol and of a tuning study's settings: its TOML type, its default, what
the field checker allows (the same words a refused value's one-line message gives) and its
docstring's description. The documentation site builds them on every build (``mkdocs.yml``'s
hook, ``scripts/docs_hooks.py``).

Example:
    >>> page = configuration_reference()
    >>> "| `lr` | `0.001` | a finite number > 0 |" in page
    True
    >>> "## gfalign train" in cli_reference()
    True
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import click

__all__ = ["cli_reference", "configuration_reference", "field_descriptions"]


def _commands() -> Iterator[tuple[str, click.Command]]:
    """``(full name, command)`` of every command and subcommand, in ``gfalign --help`` order."""
    from gfalign.cli import COMMANDS

    def walk(name: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
        yield name, command
        if isinstance(command, click.Group):
            for sub in command.list_commands(click.Context(command)):
                yield from walk(f"{name} {sub}", command.get_command(click.Context(command), sub))

    for name, (module, attribute, _summary) in COMMANDS.items():
        yield from walk(f"gfalign {name}", getattr(importlib.import_module(module), attribute))


def cli_reference() -> str:
    """Markdown of every command's ``--help``: one section per command and subcommand."""
    from gfalign.cli import main

    out = [
        "# Command line reference",
        "",
        "Generated from the commands themselves on every build of this site: each section is "
        "what `--help` prints. `gfalign --debug COMMAND` shows the traceback of an error "
        "instead of its one line.",
        "",
        "```text",
        _help(main, "gfalign"),
        "```",
    ]
    for name, command in _commands():
        out += ["", f"## {name}", "", "```text", _help(command, name), "```"]
    return "\n".join(out) + "\n"


def _help(command: click.Command, name: str) -> str:
    with click.Context(command, info_name=name, terminal_width=100, max_content_width=100) as ctx:
        return command.get_help(ctx).rstrip()


# ------------------------------------------------------------------------------ configuration


def field_descriptions(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's docstring, field by field (a line naming
    several fields, ``weight_init, bias_init: ...``, gives each the same words).

    Example:
        >>> from gfalign.train import TrainConfig
        >>> field_descriptions(TrainConfig)["epochs"]
        'passes over the training set, at most 100000 (a run that could finish).'
    """
    doc = inspect.getdoc(cls) or ""
    section = doc.partition("Attributes:\n")[2]
    out: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        if line and not line.startswith(" "):
            break  # the next section, or prose after the list
        entry = re.match(r"^    ([\w, ]+):(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                out[name] = entry.group(2).strip()
        elif line.strip() and names:
            for name in names:
                out[name] = f"{out[name]} {line.strip()}"
    return out


def _configurations() -> list[tuple[str, str, type, Mapping[str, Any], str]]:
    """(title, TOML table, dataclass, its limits, the prose above its table)."""
    from gfalign import config, train, tune

    return [
        (
            "A run",
            "the file's top level (`gfalign train --config FILE`)",
            config.RunConfig,
            config._LIMITS,
            "Every field has the default of the paper's 2x800 tanh `s1` network.",
        ),
        (
            "Its training protocol",
            "the `[train]` table",
            train.TrainConfig,
            train._TRAIN_LIMITS,
            "How to train; every run's defaults are the paper's protocol.",
        ),
        (
            "A tuning study's settings",
            "the top level and `[final]` of a study file (`gfalign tune STUDY.toml`)",
            tune._Settings,
            tune._SETTING_LIMITS,
            "`final_seeds` and `final_epochs` are written `seeds` and `epochs` in `[final]`; "
            "`gfalign tune --help` shows a whole study file.",
        ),
    ]


def configuration_reference() -> str:
    """Markdown of every configuration field: key, default, what is allowed, description."""
    from gfalign.rules import _allowed, render

    out = [
        "# Configuration reference",
        "",
        "Generated from the configuration classes and the limits their checker enforces, on "
        "every build of this site. A value outside *allowed* is refused before anything runs, "
        "with one line naming the key, the value and these same words; an unknown key comes "
        "with its closest known name. See [what gfalign refuses](../guide/refusals.md).",
    ]
    for title, where, cls, limits, prose in _configurations():
        hints = typing.get_type_hints(cls)
        words = field_descriptions(cls)
        rows = []
        for item in dataclasses.fields(cls):
            if item.default is not dataclasses.MISSING:
                value = item.default
            elif item.default_factory is not dataclasses.MISSING:
                value = item.default_factory()
            else:
                value = dataclasses.MISSING
            if value is dataclasses.MISSING:
                default = "required"
            elif dataclasses.is_dataclass(value):  # a nested table: its own section below
                default = "its table, below"
            else:
                default = f"`{render(value)}`"
            allowed = _allowed(hints[item.name], limits.get(item.name, _no_limit()))
            description = words.get(item.name, "")
            rows.append(f"| `{item.name}` | {default} | {_cell(allowed)} | {_cell(description)} |")
        out += [
            "",
            f"## {title}",
            "",
            f"In {where}. {prose}",
            "",
            "| key | default | allowed | description |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    return "\n".join(out) + "\n"


def _no_limit():
    from gfalign.rules import Limit

    return Limit()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
