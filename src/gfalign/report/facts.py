"""Facts: every number a hand-written discussion may cite, computed from the store.

``run_facts`` gives, per finished run, its final and best-epoch test metric, its training
error at three quarters of training and at the end, the first epoch its training error falls
below 0.01% (the paper's criterion), its largest mean batch loss and the range of each layer's
update angle with the backprop gradient over training. ``group_facts`` gives, per activation,
the range of the final test and training errors over a set of runs; ``cell_facts`` the
numbers of a summary table (mean, std, interval, difference, p, best epoch). ``facts_blocks``
renders them as the "Facts" section of a page.

``unmatched`` checks a Markdown text against facts: every decimal number the text quotes
(outside code) must be the printed form of some fact at the precision quoted.

    >>> facts = [Fact("exp1", "2x800 tanh s1", "mean", 1.7925)]
    >>> [q.text for q in unmatched("s1 reaches 1.79, not 1.75 (`1.75` in code is skipped)",
    ...                             facts)]
    ['1.75']
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import cell
from gfalign.report.render import Block, Paragraph, Table
from gfalign.report.rows import config_of, count, protocol, series
from gfalign.report.tables import PENDING, TRAIN_METRIC, best_epoch, selected_epoch

__all__ = [
    "Fact",
    "Quote",
    "cell_facts",
    "facts_blocks",
    "group_facts",
    "quoted_numbers",
    "run_facts",
    "unmatched",
]

TRAINED = 0.01  # the paper's "training error below 0.01%"


@dataclass(frozen=True)
class Fact:
    """One number: what it is about, what it measures, its value and printed decimals."""

    experiment: str
    subject: str
    quantity: str
    value: float
    digits: int = 2

    @property
    def text(self) -> str:
        return _format(self.value, self.digits)


def _train_digits(value: float) -> int:
    """Training errors are multiples of 1/60,000 (0.0017%): small ones need four decimals."""
    return 4 if 0 < value < 0.1 else 2


def _format(value: float, digits: int) -> str:
    if digits < 0:  # significant digits, for quantities spanning decades (losses): 3.15e3
        mantissa, _e, exponent = f"{value:.{-digits}g}".partition("e")
        return mantissa + (f"e{int(exponent)}" if exponent else "")
    return f"{value:.{digits}f}"


def run_facts(
    experiment: str,
    rows: Iterable[Mapping[str, Any]],
    metric: str = "test_error",
    digits: int = 2,
    planned: tuple[int, int | None] = (100, None),
    order: Sequence[str] = (),
    name: Callable[[RunConfig], str] = cell,
) -> list[Fact]:
    """Per finished run: final, best-epoch and training-error facts and angle ranges.

    Args:
        experiment: the experiment's name (the facts' first field).
        rows: store rows; runs without a history give their final values only.
        metric: the compared metric (``test_error``).
        digits: its printed decimals (2; 5 for reconstruction errors).
        planned: the experiment's (epochs, training subset); a run of another protocol
            names its own in its subject.
        order: the experiment's cells in table order (runs are listed in that order, then
            by seed).
        name: a run's cell name (``Experiment.cell``, which names the fields a grid varies
            besides the cell, such as the dataset: two runs never share a subject).
    """
    out = []
    train_key = TRAIN_METRIC.get(metric, "")
    rows = sorted(rows, key=lambda r: (_cell_place(r, order, name), r["config"].get("seed", 0)))
    for row in rows:
        if row["status"] != "finished" or row["final"].get(metric) is None:
            continue
        config = config_of(row)
        subject = f"{name(config)} seed {config.seed}"
        epochs, _subset, _test = protocol(row["config"])
        if (epochs, _subset) != tuple(planned):
            subject += f" ({count(epochs, 'epoch')}" + (f", {_subset} ex)" if _subset else ")")
        final = row["final"]
        out.append(Fact(experiment, subject, "last epoch", float(final[metric]), digits))
        if isinstance(final.get(train_key), (int, float)):
            value = float(final[train_key])
            out.append(Fact(experiment, subject, "train, last", value, _train_digits(value)))
        history = row.get("history") or ()
        best = best_epoch(history, metric)
        if best is not None:
            out.append(Fact(experiment, subject, "best", best[1], digits))
            out.append(Fact(experiment, subject, "best epoch", best[0], 0))
        out += _validation_facts(experiment, subject, history, metric, digits)
        at, values = series(history, train_key)
        if values:
            three_quarters = round(0.75 * max(at))
            if three_quarters in at:
                value = values[at.index(three_quarters)]
                quantity = f"train, epoch {three_quarters}"
                out.append(Fact(experiment, subject, quantity, value, _train_digits(value)))
            first = next((e for e, v in zip(at, values, strict=True) if v < TRAINED), None)
            if first is not None:
                out.append(Fact(experiment, subject, "train < 0.01% from epoch", first, 0))
        _at, losses = series(history, "batch_loss")
        if losses:
            out.append(Fact(experiment, subject, "batch loss, first", losses[0], -3))
            out.append(Fact(experiment, subject, "batch loss, max", max(losses), -3))
        for key in sorted({k for r in history for k in r if k.startswith("update_angle_")}):
            _at, angles = series(history, key)
            if angles:
                layer = key.removeprefix("update_angle_")
                out.append(Fact(experiment, subject, f"angle {layer}, min", min(angles), 1))
                out.append(Fact(experiment, subject, f"angle {layer}, max", max(angles), 1))
                out.append(Fact(experiment, subject, f"angle {layer}, last", angles[-1], 1))
    return out


def _validation_facts(
    experiment: str, subject: str, history: Sequence[Mapping[str, Any]], metric: str, digits: int
) -> list[Fact]:
    """A run with a validation split: its validation error three quarters through training and
    at the end (how much the last quarter still moved it, the evidence for an epoch budget),
    and ``metric`` at the epoch the split selected."""
    at, values = series(history, "validation_error")
    if not values:
        return []
    out = []
    three_quarters = round(0.75 * max(at))
    if three_quarters in at:
        value = values[at.index(three_quarters)]
        out.append(Fact(experiment, subject, f"validation, epoch {three_quarters}", value, 2))
    out.append(Fact(experiment, subject, "validation, last", values[-1], 2))
    chosen = selected_epoch(history, metric)
    if chosen is not None:
        out.append(Fact(experiment, subject, "selected", chosen[1], digits))
        out.append(Fact(experiment, subject, "selected epoch", chosen[0], 0))
    return out


def _cell_place(
    row: Mapping[str, Any], order: Sequence[str], name: Callable[[RunConfig], str] = cell
) -> tuple[int, str]:
    named = name(config_of(row))
    return (order.index(named) if named in order else len(order), named)


def group_facts(
    experiment: str,
    rows: Iterable[Mapping[str, Any]],
    metric: str = "test_error",
    digits: int = 2,
    prefix: str = "",
) -> list[Fact]:
    """Per activation over the finished runs: how many, and the range of their final test and
    training errors (subject ``prefix + activation``)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "finished" and row["final"].get(metric) is not None:
            activation = prefix + str(row["config"].get("activation", "tanh"))
            groups.setdefault(activation, []).append(row)
    out = []
    train_key = TRAIN_METRIC.get(metric, "")
    for activation, members in groups.items():
        tests = [float(r["final"][metric]) for r in members]
        trains = [
            float(r["final"][train_key])
            for r in members
            if isinstance(r["final"].get(train_key), (int, float))
        ]
        out.append(Fact(experiment, activation, "runs", len(members), 0))
        out += [
            Fact(experiment, activation, "last epoch, min", min(tests), digits),
            Fact(experiment, activation, "last epoch, max", max(tests), digits),
        ]
        if trains:
            out += [
                Fact(experiment, activation, "train, last, min", min(trains), 4),
                Fact(experiment, activation, "train, last, max", max(trains), 4),
                Fact(experiment, activation, "runs at 0 train error", trains.count(0.0), 0),
            ]
    return out


def cell_facts(
    experiment: str, summary: Iterable[Mapping[str, Any]], digits: int = 2
) -> list[Fact]:
    """The numbers of a summary table (``gfalign.report.tables.summarize``) as facts, the
    paper's or another reference's value of each cell among them."""
    out = []
    for row in summary:
        subject = row["cell"] + (" (baseline)" if row["baseline"] else "")
        for quantity in ("paper", "reference"):  # the published numbers a text sets beside ours
            if row.get(quantity) is not None:
                out.append(Fact(experiment, subject, quantity, row[quantity], 2))
        if row["mean"] is None:
            continue
        out += [
            Fact(experiment, subject, "mean", row["mean"], digits),
            Fact(experiment, subject, "std", row["std"], digits),
        ]
        if row["ci"] is not None:
            out += [
                Fact(experiment, subject, "95% CI low", row["ci"][0], digits),
                Fact(experiment, subject, "95% CI high", row["ci"][1], digits),
            ]
        if row["difference"] is not None:
            out.append(Fact(experiment, subject, "difference", row["difference"], 2))
        if row.get("reference") is not None:
            gap = row["mean"] - row["reference"]
            out.append(Fact(experiment, subject, "− reference", gap, 2))
        if row["p"] is not None:
            out.append(Fact(experiment, subject, "p", row["p"], 3))
        if row["best"] is not None:
            out.append(Fact(experiment, subject, "best (mean)", row["best"], digits))
        if row.get("selected") is not None:
            out.append(Fact(experiment, subject, "selected (mean)", row["selected"], digits))
        if row["train"] is not None:
            out.append(Fact(experiment, subject, "train, last (mean)", row["train"], digits))
    return out


def _range(facts: Mapping[str, Fact], low: str, high: str) -> str:
    if low not in facts:
        return PENDING
    a, b = facts[low].text, facts[high].text
    return a if a == b else f"{a}–{b}"


def facts_blocks(facts: Sequence[Fact]) -> list[Block]:
    """The "Facts" section's body: a table per activation, then a table per run."""
    by_subject: dict[str, dict[str, Fact]] = {}
    for fact in facts:
        by_subject.setdefault(fact.subject, {})[fact.quantity] = fact
    groups = {s: f for s, f in by_subject.items() if "runs" in f}
    runs = {s: f for s, f in by_subject.items() if "last epoch" in f}
    if not groups and not runs:
        return [Paragraph("No finished run yet.")]
    blocks: list[Block] = [
        Paragraph(
            "Numbers a discussion may cite, each read from the store: per activation, the "
            "range over its finished runs; per run, its last and best epoch (test set), its "
            "validation-selected epoch and validation error three quarters through training "
            "and at the end (where a validation split was held out), its "
            "training error three quarters through training and at the end, the first epoch "
            "its training error falls below 0.01%, its first epoch's and its largest mean batch "
            "loss and the range "
            "(min–max, then last) of each hidden layer's update angle with the backprop "
            "gradient, in degrees."
        )
    ]
    if groups:
        rows = []
        for subject, f in groups.items():
            rows.append(
                (
                    subject,
                    f["runs"].text,
                    _range(f, "last epoch, min", "last epoch, max"),
                    _range(f, "train, last, min", "train, last, max"),
                    f["runs at 0 train error"].text if "runs at 0 train error" in f else PENDING,
                )
            )
        blocks.append(
            Table(
                ("activation", "runs", "last epoch", "train error, last", "runs at 0 train error"),
                tuple(rows),
                (False, True, True, True, True),
            )
        )
    if runs:
        layers = sorted(
            {
                q.split(",")[0].removeprefix("angle ")
                for f in runs.values()
                for q in f
                if "angle" in q
            }
        )
        validated = any("validation, last" in f for f in runs.values())
        header = ["run", "last epoch", "best (epoch)"]
        header += ["validation-selected (epoch)", "validation, ¾ / last"] if validated else []
        header += ["train, ¾", "train, last", "train < 0.01% from", "batch loss, first / max"]
        header += [f"update angle {layer}" for layer in layers]
        rows = []
        for subject, f in runs.items():
            best = PENDING
            if "best" in f:
                best = f"{f['best'].text} ({f['best epoch'].text})"
            quarter = next((q for q in f if q.startswith("train, epoch")), None)
            row = [subject, f["last epoch"].text, best]
            if validated:
                row += _validation_cells(f)
            row += [
                PENDING if quarter is None else f"{f[quarter].text} (ep {quarter.split()[-1]})",
                f["train, last"].text if "train, last" in f else PENDING,
                f["train < 0.01% from epoch"].text if "train < 0.01% from epoch" in f else PENDING,
                (
                    f"{f['batch loss, first'].text} / {f['batch loss, max'].text}"
                    if "batch loss, max" in f
                    else PENDING
                ),
            ]
            for layer in layers:
                if f"angle {layer}, min" in f:
                    span = _range(f, f"angle {layer}, min", f"angle {layer}, max")
                    row.append(f"{span} ({f[f'angle {layer}, last'].text})")
                else:
                    row.append(PENDING)
            rows.append(tuple(row))
        blocks.append(Table(tuple(header), tuple(rows), (False,) + (True,) * (len(header) - 1)))
    return blocks


def _validation_cells(f: Mapping[str, Fact]) -> list[str]:
    selected = PENDING
    if "selected" in f:
        selected = f"{f['selected'].text} ({f['selected epoch'].text})"
    if "validation, last" not in f:
        return [selected, PENDING]
    quarter = next((q for q in f if q.startswith("validation, epoch")), None)
    last = f["validation, last"].text
    if quarter is None:
        return [selected, last]
    return [selected, f"{f[quarter].text} (ep {quarter.split()[-1]}) / {last}"]


# ---------------------------------------------------------------------------- checking text


@dataclass(frozen=True)
class Quote:
    """A number quoted in a text, with a few words around it."""

    text: str
    value: float
    context: str


_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])|(?<![\w.])\d+e[-+]?\d+")


def quoted_numbers(markdown: str) -> list[Quote]:
    """Every decimal number (``1.79``, ``-0.17``, ``3.15e3``) in the text of a Markdown page,
    outside code spans, code blocks and link targets. Integers are left out (epochs, seeds,
    sizes)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark", {"html": False}).enable("table").parse(markdown)
    out = []

    def visit(items) -> None:
        for token in items:
            if token.children:
                visit(token.children)
            elif token.type == "text":
                for match in _NUMBER.finditer(token.content):
                    text = match.group(0).replace("−", "-")
                    start, end = max(0, match.start() - 30), match.end() + 30
                    context = token.content[start:end].replace("\n", " ")
                    out.append(Quote(match.group(0), float(text), context))

    visit(tokens)
    return out


def _matches(quote: Quote, values: Mapping[int, set[str]], significant: list[float]) -> bool:
    text = quote.text.replace("−", "-").lstrip("+-")
    if "e" in text:
        digits = len(text.split("e")[0].replace(".", "").lstrip("0"))
        return any(
            math.isclose(abs(quote.value), v, rel_tol=0.5 * 10 ** (1 - digits)) for v in significant
        )
    decimals = len(text.split(".")[1])
    return text in values.get(decimals, set())


def unmatched(markdown: str, facts: Iterable[Fact]) -> list[Quote]:
    """The decimal numbers of ``markdown`` that no fact prints as (at the decimals quoted,
    sign aside). An empty list: every number quoted comes from the facts."""
    facts = list(facts)
    values: dict[int, set[str]] = {}
    for fact in facts:
        for decimals in range(0, 9):
            values.setdefault(decimals, set()).add(f"{abs(fact.value):.{decimals}f}")
    significant = [abs(f.value) for f in facts]
    return [q for q in quoted_numbers(markdown) if not _matches(q, values, significant)]
