"""``gfalign rules [show NAME]``: the rule presets and their per-layer configuration."""

from __future__ import annotations

import click

from gfalign.rules import PRESETS, ConfigError, resolve

# The deepest network `rules show` resolves a rule for: a rule's table grows with the depth.
MAX_DEPTH = 1000


@click.group("rules", invoke_without_command=True)
@click.pass_context
def rules(ctx: click.Context) -> None:
    """List the rule presets, one a line; `gfalign rules show NAME` shows one in full."""
    if ctx.invoked_subcommand is not None:
        return
    width = max(len(name) for name in PRESETS)
    for name, data in PRESETS.items():
        click.echo(f"{name:<{width}}  {data.get('description', '')}")


@rules.command("show")
@click.argument("name")
@click.option(
    "--depth",
    type=click.IntRange(1, MAX_DEPTH),
    default=2,
    show_default=True,
    help=f"Hidden layers of the network to resolve the rule for, at most {MAX_DEPTH}.",
)
@click.option("--feedback", default=None, help="Feedback family, e.g. B6:density=0.2")
def show(name: str, depth: int, feedback: str | None) -> None:
    """Show preset NAME resolved per layer, and its TOML form to copy into a file and edit."""
    import tomli_w

    try:
        rule = resolve(name, depth, feedback)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    description = PRESETS[name].get("description", "")
    click.echo(f"{rule.name} ({depth} hidden layers, feedback {rule.feedback}): {description}")
    click.echo(rule.describe())
    click.echo("")
    click.echo("# TOML: save as a file, edit, and pass it to `gfalign train --rule FILE`")
    click.echo(tomli_w.dumps({"rule": rule.to_data()}), nl=False)
