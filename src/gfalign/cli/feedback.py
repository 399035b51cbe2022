"""``gfalign feedback``: list the feedback-matrix families and diagnose one draw.

gfalign feedback list
gfalign feedback show B1 --shape 10x800
gfalign feedback show B6:density=0.2 --shape 800x800 --error any --json
"""

from __future__ import annotations

import json
import math

import click
import torch

from gfalign import feedback as families
from gfalign.alignment import ERROR_SPACES, FeedbackDiagnostics, diagnose
from gfalign.config import SEED_MAX, check_memory


def parse_shape(text: str) -> tuple[int, int]:
    """``"10x800"`` -> ``(10, 800)``; a ``click.BadParameter`` naming the problem otherwise."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        rows, cols = (int(part) for part in parts)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not ROWSxCOLS, e.g. 10x800 (a direct matrix of a 800-unit layer and "
            "10 classes)",
            param_hint="--shape",
        ) from None
    if rows < 1 or cols < 1:
        raise click.BadParameter(f"{text!r}: both sizes must be positive", param_hint="--shape")
    return rows, cols


@click.group()
def feedback() -> None:
    """Inspect feedback-matrix families (the fixed matrices B, D of FA and DFA)."""


@feedback.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def list_families(as_json: bool) -> None:
    """List every registered family with its description."""
    if as_json:
        click.echo(json.dumps(dict(families.DESCRIPTIONS), indent=2))
        return
    width = max(len(name) for name in families.DESCRIPTIONS)
    for name, description in families.DESCRIPTIONS.items():
        click.echo(f"{name:<{width}}  {description}")


@feedback.command("show")
@click.argument("family")
@click.option(
    "--shape",
    default="10x800",
    show_default=True,
    help="ROWSxCOLS in the row convention (s @ B): rows receive the signal, cols are the "
    "layer's units; a direct matrix is n_out x n_hidden.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=click.IntRange(0, SEED_MAX),
    help="Seed of the draw, from 0 to 2^63 - 1.",
)
@click.option(
    "--error",
    "error_space",
    type=click.Choice(ERROR_SPACES),
    default="softmax",
    show_default=True,
    help="Signals the matrix receives: softmax output errors (entries sum to zero) or any.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def show(family: str, shape: str, seed: int, error_space: str, as_json: bool) -> None:
    """Draw one matrix of FAMILY (e.g. B1, or B6:density=0.2) and print its diagnostics.

    Rank, condition number, whether B B+ = I (no signal is lost: the condition Nokland writes
    as B+ B = I in his column convention) and B+ B = I, and how much of the possible output
    errors the matrix carries. A shape whose matrices cannot fit in this machine's memory is
    refused before anything is drawn.
    """
    rows, cols = parse_shape(shape)
    # The draw, its SVD and pseudo-inverse hold several matrices of rows x cols float64s.
    check_memory(f"a {rows}x{cols} feedback matrix", rows * cols, torch.float64, copies=4)
    try:
        spec = families.FeedbackSpec.parse(family)
        matrix = families.draw(spec, (rows, cols), torch.Generator().manual_seed(seed))
    except ValueError as problem:
        raise click.ClickException(str(problem)) from None
    report = diagnose(matrix, error_space)
    if as_json:
        data = {"family": str(spec), "seed": seed, **report.to_data()}
        data["description"] = families.DESCRIPTIONS[spec.family]
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{spec}: {families.DESCRIPTIONS[spec.family]}")
    click.echo(f"shape {rows}x{cols}, seed {seed}")
    for name, value in _lines(report):
        click.echo(f"  {name:<34} {value}")


def _number(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _lines(report: FeedbackDiagnostics) -> list[tuple[str, str]]:
    rows, cols = report.shape
    space = "softmax errors (sum zero)" if report.error_space == "softmax" else "any signal"
    return [
        ("rank", f"{report.rank} of {min(rows, cols)}"),
        ("singular values", f"{_number(report.singular_min)} .. {_number(report.singular_max)}"),
        ("condition number", _number(report.condition_number)),
        (f"B B+ = I_{rows} (nothing lost)", _yes(report.error_identity)),
        (f"B+ B = I_{cols}", _yes(report.layer_identity)),
        ("error space", f"{space}, {report.error_dimensions} dimensions"),
        (
            "error dimensions carried",
            f"{report.error_rank} of {report.error_dimensions} "
            f"({report.error_dimensions_carried:.0%})",
        ),
        (
            "weakest gain on an error",
            f"{_number(report.error_gain_min)} "
            f"({_number(report.error_gain_relative)} of the largest)",
        ),
        ("energy on possible errors", _number(report.error_energy_fraction)),
    ]
