"""Reports: our numbers beside the paper's, as Markdown, one self-contained HTML page and figures.

Everything comes from the results store (configurations, final metrics, per-epoch histories,
seconds, versions) except the autoencoder figures, which load the trained networks from the run
directories' checkpoints. ``write_report`` writes

    DIR/README.md        the index: runs done of planned, protocol, machine, compute time
    DIR/<experiment>.md  one page per experiment: its table, figures and notes
    DIR/report.html      all of it on one page, figures embedded (no other file needed)
    DIR/figures/*.png    the paper's Figures 4-8 and alignment angles, where runs exist

A cell without runs yet is listed as pending ("—"), so a partial store gives a partial but
honest report.

Example:
    >>> from gfalign.store import Store
    >>> with Store("results/runs.sqlite") as store:  # doctest: +SKIP
    ...     write_report(["exp1", "baselines"], store, "results")
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfalign.config import RunConfig
from gfalign.experiments import Experiment, cell, load

__all__ = [
    "Bullets",
    "Heading",
    "Image",
    "Paragraph",
    "Table",
    "render_html",
    "render_markdown",
    "render_report",
    "section",
    "summarize",
    "table",
    "write_report",
]

PENDING = "—"
BASELINES = "baselines"
DISCUSSION = "discussion.md"  # a hand-written page beside the report, linked from the index

# ---------------------------------------------------------------------------- document blocks


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str | None = None


@dataclass(frozen=True)
class Paragraph:
    """Text with `code` spans and [links](target.md), rendered for Markdown and HTML alike."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]


@dataclass(frozen=True)
class Image:
    """A PNG under the output directory, with its caption."""

    path: Path
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image


def render_markdown(blocks: Iterable[Block], root: Path | None = None) -> str:
    """GitHub Markdown; image paths relative to ``root`` (the page's directory)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [
                "| " + " | ".join(block.header) + " |",
                "| " + " | ".join("---:" if n else "---" for n in block.numeric) + " |",
            ]
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        else:
            where = block.path if root is None else block.path.relative_to(root)
            alt = block.caption.split(":")[0]
            parts.append(f"![{alt}]({where.as_posix()})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    """Escape, then `code` to <code> and [text](page.md) to a link to that page's anchor."""

    def link(match: re.Match) -> str:
        target = match[2]
        anchor = target[1:] if target.startswith("#") else Path(target).stem
        return f'<a href="#{anchor}">{match[1]}</a>'

    out = html.escape(text, quote=False)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _LINK.sub(link, out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem;
       margin: 2rem auto; padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; }
th { background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #57606a; font-size: .9rem; }
code { background: #f6f8fa; padding: 0 .2rem; border-radius: 3px; }
"""


def render_html(blocks: Iterable[Block], title: str) -> str:
    """One self-contained page: inline CSS, figures embedded as base64 PNG, no other file."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_inline_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="n">{_inline_html(c)}</td>' if n else f"<td>{_inline_html(c)}</td>"
                    for c, n in zip(row, block.numeric, strict=True)
                )
                + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            caption = _inline_html(block.caption)
            body.append(
                f'<figure><img alt="{html.escape(block.caption.split(":")[0])}" '
                f'src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------- the tables


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _protocol(config: Mapping[str, Any]) -> tuple[int, int | None, int | None]:
    train = config.get("train", {})
    return int(train.get("epochs", 100)), config.get("train_subset"), config.get("test_subset")


def _architecture(config: RunConfig) -> tuple:
    return (config.dataset, config.objective, config.hidden, config.activation)


def _baseline_order() -> dict[str, int]:
    return {name: n for n, name in enumerate(load(BASELINES).cells())}


def summarize(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Table rows: one per (cell, protocol) with finished runs, and one per cell still pending.

    Each row holds ``cell``, ``paper`` (or None), ``mean``, ``std`` (sample standard deviation
    over seeds, 0 for one seed), ``n`` (seeds), ``epochs``, ``subset`` (training examples, None
    for all), ``difference`` (ours − paper), ``diverged`` (runs of the cell that diverged) and
    ``baseline``, and ``train`` (the mean final training error, the paper's "below 0.01%"; None
    where a run did not record it). ``baselines``: the rows of the baselines experiment; those
    with an architecture of this experiment's grid are listed after that architecture's cells.
    Pending cells (no finished run) have ``n`` 0 and None for the numbers.
    """
    architectures = list(dict.fromkeys(_architecture(c) for c in experiment.points()))
    cell_order = {name: n for n, name in enumerate(experiment.cells())}
    baseline_order = _baseline_order() if baselines is not None else {}
    groups: dict[tuple, list[tuple[float, float | None]]] = {}
    diverged: dict[str, int] = {}
    where = {cell(p): _architecture(p) for p in experiment.points()}

    def add(row: Mapping[str, Any], baseline: bool) -> None:
        config = RunConfig.from_data(row["config"])
        architecture = _architecture(config)
        if baseline and architecture not in architectures:
            return
        name = cell(config)
        where.setdefault(name, architecture)
        if row["status"] == "diverged":
            diverged[name] = diverged.get(name, 0) + 1
            return
        value = row["final"].get(experiment.metric)
        if row["status"] != "finished" or value is None:
            return
        train = row["final"].get(_TRAIN_METRIC.get(experiment.metric, ""))
        key = (name, baseline, _protocol(row["config"]))
        groups.setdefault(key, []).append((float(value), None if train is None else float(train)))

    for row in rows:
        add(row, False)
    for row in baselines or ():
        add(row, True)

    out = []
    for (name, baseline, (epochs, train_subset, _test)), pairs in groups.items():
        values = [test for test, _ in pairs]
        trains = [train for _, train in pairs]
        mean, std = _mean_std(values)
        paper = None if baseline else experiment.paper.get(name)
        out.append(
            {
                "cell": name,
                "paper": paper,
                "mean": mean,
                "std": std,
                "n": len(values),
                "epochs": epochs,
                "subset": train_subset,
                "difference": None if paper is None else mean - paper,
                "diverged": diverged.get(name, 0),
                "baseline": baseline,
                "train": None if None in trains else statistics.fmean(trains),
            }
        )
    seen = {r["cell"] for r in out if not r["baseline"]}
    for name in experiment.cells():
        if name not in seen:
            out.append(
                {
                    "cell": name,
                    "paper": experiment.paper.get(name),
                    "mean": None,
                    "std": None,
                    "n": 0,
                    "epochs": None,
                    "subset": None,
                    "difference": None,
                    "diverged": diverged.get(name, 0),
                    "baseline": False,
                    "train": None,
                }
            )

    def position(r: dict[str, Any]) -> tuple:
        architecture = where.get(r["cell"])
        first = architectures.index(architecture) if architecture in architectures else 1 << 20
        order = baseline_order if r["baseline"] else cell_order
        return (
            first,
            r["baseline"],
            order.get(r["cell"], 1 << 20),
            r["cell"],
            -(r["epochs"] or 0),
            r["subset"] or 0,
        )

    return sorted(out, key=position)


# The training-set counterpart of each reported metric.
_TRAIN_METRIC = {"test_error": "train_error"}


def _is_autoencoder(experiment: Experiment) -> bool:
    return experiment.base.objective == "autoencoder"


def _number(experiment: Experiment) -> Callable[[float], str]:
    return (lambda v: f"{v:.5f}") if _is_autoencoder(experiment) else (lambda v: f"{v:.2f}")


def table(experiment: Experiment, summary: Sequence[Mapping[str, Any]]) -> Table:
    """The summary as a table; the paper and difference columns only where the paper has numbers.

    Baseline cells carry ``(baseline)``; pending cells show "—" for the numbers and 0 seeds; a
    cell with one seed shows its value without a spread.
    """
    number = _number(experiment)
    paper_columns = bool(experiment.paper)
    header = ["cell"] + (["paper"] if paper_columns else [])
    header += ["ours (mean ± std)", "seeds", "epochs"] + (["difference"] if paper_columns else [])
    header += ["train error (mean)"]
    rows = []
    for r in summary:
        name = f"{r['cell']} (baseline)" if r["baseline"] else r["cell"]
        if r["mean"] is None:
            ours = PENDING
        elif r["n"] == 1:  # one seed has no spread to show
            ours = number(r["mean"])
        else:
            ours = f"{number(r['mean'])} ± {number(r['std'])}"
        seeds = str(r["n"]) + (f" (+{r['diverged']} diverged)" if r["diverged"] else "")
        epochs = PENDING if r["epochs"] is None else str(r["epochs"])
        if r["subset"] is not None:
            epochs += f" ({r['subset']} ex)"
        row = [name]
        if paper_columns:
            row.append(PENDING if r["paper"] is None else f"{r['paper']:.2f}")
        row += [ours, seeds, epochs]
        if paper_columns:
            row.append(PENDING if r["difference"] is None else f"{r['difference']:+.2f}")
        row.append(PENDING if r["train"] is None else number(r["train"]))
        rows.append(tuple(row))
    numeric = (False,) + (True,) * (len(header) - 1)
    return Table(tuple(header), tuple(rows), numeric)


def _metric_sentence(experiment: Experiment) -> str:
    if _is_autoencoder(experiment):
        return (
            "Numbers: test reconstruction error, the mean squared error per pixel between the "
            "sigmoid output and the input (pixels in [0, 1]), after the last epoch. The paper "
            "gives no numbers for this experiment, so the table shows ours only."
        )
    if experiment.paper:
        return (
            "Numbers: test error (%) after the last epoch; ours is the mean ± standard "
            "deviation over seeds, difference = ours − paper."
        )
    return "Numbers: test error (%) after the last epoch, mean ± standard deviation over seeds."


# ---------------------------------------------------------------------------- protocol, machine


def _counts(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    planned = {c.key() for c in experiment.configs}
    finished = [r for r in rows if r["status"] == "finished"]
    done = sum(r["key"] in planned for r in finished)
    cells = len(experiment.cells())
    text = (
        f"Runs: {done} of {len(planned)} planned finished ({cells} cells × "
        f"{len(experiment.seeds)} seeds, {experiment.base.train.epochs} epochs)"
    )
    other = len(finished) - done
    if other:
        text += f"; {other} more finished outside the plan (another protocol, subset or seed)"
    diverged = sum(r["status"] == "diverged" for r in rows)
    if diverged:
        text += f"; {diverged} diverged"
    return text + "."


def _seeds_text(seeds: Iterable[int]) -> str:
    seeds = sorted(set(seeds))
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def protocols(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per distinct training protocol among the rows' stored configurations."""
    groups: dict[str, list[int]] = {}
    for row in rows:
        config = row["config"]
        train = config.get("train", {})
        data = config.get("dataset", "mnist")
        subset = config.get("train_subset"), config.get("test_subset")
        examples = (
            f"all of {data}"
            if subset == (None, None)
            else f"{subset[0] or 'all'} training / {subset[1] or 'all'} test examples of {data}"
        )
        epochs = train.get("epochs", 100)
        text = (
            f"{_count(epochs, 'epoch')}, batch size {train.get('batch_size')}, "
            f"{train.get('optimizer')} with lr {train.get('lr')}"
            f"{_options(train.get('optimizer_options'))}, reduction {train.get('reduction')}, "
            f"{examples}, {config.get('dtype', 'float32')}"
        )
        groups.setdefault(text, []).append(int(config.get("seed", 0)))
    return [
        f"{text}; {_seeds_text(seeds)} ({_count(len(seeds), 'run')})"
        for text, seeds in groups.items()
    ]


def _options(options: Mapping[str, Any] | None) -> str:
    if not options:
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(options.items())) + ")"


def machines(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per distinct machine in the rows' recorded environments (environment.json)."""
    groups: dict[str, int] = {}
    for row in rows:
        env = row.get("versions") or {}
        if not env:
            text = "not recorded"
        else:
            device = env.get("device", "?")
            if env.get("gpu"):
                device += f" ({env['gpu']}, CUDA {env.get('cuda')})"
            text = (
                f"{env.get('processor') or '?'}, {env.get('cpu_count', '?')} CPUs, "
                f"{env.get('torch_threads', '?')} torch threads, device {device}; "
                f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}, "
                f"gfalign {env.get('gfalign', '?')}; {env.get('platform', '?')}"
            )
        groups[text] = groups.get(text, 0) + 1
    return [f"{text} ({_count(n, 'run')})" for text, n in groups.items()]


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def compute(rows: Sequence[Mapping[str, Any]]) -> str:
    """Total training time of the rows (each run's recorded seconds)."""
    times = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
    text = f"{_duration(sum(times))} of training in {_count(len(times), 'run')}"
    missing = len(rows) - len(times)
    if missing:
        text += f" ({missing} without a recorded time)"
    return text


def _with_environment(rows: list[dict[str, Any]], runs_dir: Path | None) -> list[dict[str, Any]]:
    """Rows whose stored environment is empty get it from their run directory, when there."""
    from gfalign.runs import ENVIRONMENT

    if runs_dir is None:
        return rows
    out = []
    for row in rows:
        path = runs_dir / row["key"] / ENVIRONMENT
        if not row.get("versions") and path.exists():
            row = {**row, "versions": json.loads(path.read_text())}
        out.append(row)
    return out


def _done(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["status"] in ("finished", "diverged")]


# ---------------------------------------------------------------------------- figures


@dataclass
class _Context:
    """What a figure needs: the experiment, its rows, the baselines' rows on its dataset, where
    to write."""

    experiment: Experiment
    rows: list[dict[str, Any]]
    baselines: list[dict[str, Any]]
    figures: Path
    runs_dir: Path | None
    data_dir: Path | None
    cache: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.figures / f"{self.experiment.name}-{name}.png"


def _protocol_key(row: Mapping[str, Any]) -> tuple:
    config = row["config"]
    train = config.get("train", {})
    return (
        config.get("dataset"),
        int(train.get("epochs", 100)),
        train.get("batch_size"),
        train.get("lr"),
        train.get("optimizer"),
        train.get("reduction"),
        config.get("train_subset") or math.inf,
        config.get("test_subset") or math.inf,
    )


def _main_protocol(rows: Sequence[Mapping[str, Any]]) -> tuple | None:
    """The protocol with the most epochs, then the most data, then the most runs."""
    counts: dict[tuple, int] = {}
    for row in rows:
        counts[_protocol_key(row)] = counts.get(_protocol_key(row), 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda k: (k[1], k[6], k[7], counts[k]))


def _finished(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["status"] == "finished" and r.get("history")]


def _by_cell(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(cell(RunConfig.from_data(row["config"])), []).append(row)
    return out


def _rule(name: str) -> str:
    """``"2x800 tanh dfa B3"`` -> ``"dfa B3"``: the cell without its architecture."""
    return name.split(" ", 2)[2]


def _curves(
    context: _Context,
    prefix: str,
    panels: Mapping[str, Callable[[str], bool]],
    baseline_panel: Mapping[str, Callable[[str], bool]],
    name: str,
    title: str,
    caption: str,
    label: Callable[[str], str] = lambda c: _rule(c),
) -> tuple[list[Block], list[str]]:
    """Mean test-error curves of the cells starting with ``prefix``, baselines dashed.

    ``panels``: panel title -> which cells of the experiment it shows; ``baseline_panel``:
    panel title -> which baseline cells it shows (dashed); ``label``: a cell's legend entry.
    """
    rows = [
        r
        for r in _finished(context.rows)
        if cell(RunConfig.from_data(r["config"])).startswith(prefix)
    ]
    short = title.split(":")[0]
    notes = []
    blind = [
        r
        for r in [*context.rows, *context.baselines]
        if r["status"] == "finished"
        and not r.get("history")
        and cell(RunConfig.from_data(r["config"])).startswith(prefix)
    ]
    if blind:
        notes.append(
            f"{short}: {_count(len(blind), 'finished run')} without a per-epoch history "
            "(imported from a CSV export) in the tables but not in the curves."
        )
    protocol = _main_protocol(rows)
    if protocol is None:
        return [], [*notes, f"{short}: no finished {prefix.strip()} runs with a history yet."]
    chosen = _by_cell(r for r in rows if _protocol_key(r) == protocol)
    others = {_protocol_key(r) for r in rows} - {protocol}
    if others:
        notes.append(f"{short}: runs of {len(others)} other protocol(s) left out of the figure.")
    baseline_rows = [
        r
        for r in _finished(context.baselines)
        if cell(RunConfig.from_data(r["config"])).startswith(prefix)
    ]
    baseline_cells = _by_cell(r for r in baseline_rows if _protocol_key(r) == protocol)
    if baseline_rows and not baseline_cells:
        notes.append(f"{short}: the baseline runs use another protocol; not drawn.")
    lines: dict[str, dict[str, list]] = {}
    dashed = []
    for panel, wanted in panels.items():
        lines[panel] = {
            label(c): [r["history"] for r in chosen[c]]
            for c in context.experiment.cells()
            if c in chosen and wanted(c)
        }
        for c in sorted(baseline_cells, key=_baseline_order().get):
            if baseline_panel.get(panel, lambda _: False)(c):
                text = f"{label(c)} (baseline)"
                lines[panel][text] = [r["history"] for r in baseline_cells[c]]
                dashed.append(text)
    lines = {p: v for p, v in lines.items() if v}
    if not lines:
        return [], notes + [f"{short}: no finished runs of its cells yet."]
    from gfalign.plots import plot_mean_curves

    path = plot_mean_curves(lines, context.path(name), title=title, dashed=dashed)
    epochs = protocol[1]
    subset = "" if protocol[6] == math.inf else f", {protocol[6]} training examples"
    text = (
        f"{caption} Mean over the seeds each legend entry names, band from min to max; "
        f"{_count(epochs, 'epoch')}{subset}."
    )
    return [Image(path, text)], notes


def _figure_strategies(context: _Context, number: int) -> tuple[list[Block], list[str]]:
    name = context.experiment.name
    return _curves(
        context,
        "2x800 tanh ",
        {f"2x800 tanh, {name}": lambda c: True},
        {f"2x800 tanh, {name}": lambda c: True},
        f"figure{number}",
        f"Figure {number} ({name}): test error of the 2x800 tanh network",
        f"Figure {number} ({name}): test error (%) per epoch of the 2x800 tanh network, "
        "strategies solid, bp/fa/dfa baselines dashed, log scale.",
    )


def _figure_fashion(context: _Context) -> tuple[list[Block], list[str]]:
    def feedback(c: str) -> bool:
        return _rule(c) in ("bp", "fa", "dfa")

    return _curves(
        context,
        "2x800 tanh ",
        {
            "bp, fa, dfa": feedback,
            "general feedback s1-s3": lambda c: not feedback(c) and "aux" not in c,
            "with auxiliary errors": lambda c: "aux" in c,
        },
        {},
        "figure-fashion",
        "Fashion-MNIST: test error of the 2x800 tanh network",
        "Fashion-MNIST: test error (%) per epoch of the 2x800 tanh network per rule, log scale.",
    )


def _figure_families(context: _Context) -> tuple[list[Block], list[str]]:
    rules = ("dfa", "fa")
    return _curves(
        context,
        "2x800 tanh ",
        {
            f"{rule}, feedback B1..B7": (lambda c, r=rule: _rule(c).split()[0] == r)
            for rule in rules
        },
        {
            f"{rule}, feedback B1..B7": (lambda c, r=rule: _rule(c) == r)  # uniform feedback
            for rule in rules
        },
        "figure8",
        "Figure 8 (exp4): test error of the 2x800 tanh network per feedback family",
        "Figure 8 (exp4): test error (%) per epoch of the 2x800 tanh network for each feedback "
        "family B1..B7, dfa and fa; the uniform-feedback baseline dashed, log scale.",
        label=lambda c: _rule(c).split()[-1] if " " in _rule(c) else f"{_rule(c)} uniform",
    )


def _test_digits(config: RunConfig, data_dir: Path | None, cache: dict[str, Any]):
    """The first test example of each class 0..9: (x (count, 784), labels)."""
    import torch

    from gfalign import data as datasets

    if config.dataset not in cache:
        if config.dataset == "synthetic":
            split = datasets.synthetic(seed=0).test  # as gfalign.runs.load_data draws it
        else:
            split = datasets.load(config.dataset, root=data_dir, quiet=True).test
        picks = [int(torch.nonzero(split.y == c)[0, 0]) for c in range(10) if (split.y == c).any()]
        cache[config.dataset] = split.x[picks]
    return cache[config.dataset]


def _networks(context: _Context) -> tuple[dict[tuple, dict[str, Any]], list[str]]:
    """Per autoencoder architecture, per rule: the trained network of one finished run.

    The run of the main protocol with the lowest seed whose directory has a checkpoint.
    """
    from gfalign.runs import CHECKPOINT, RunError, build, load_checkpoint

    key = "networks"
    if key in context.cache:
        return context.cache[key], []
    rows = _finished(context.rows)
    notes: list[str] = []
    out: dict[tuple, dict[str, Any]] = {}
    protocol = _main_protocol(rows)
    cells = context.experiment.cells()
    by_cell = _by_cell(r for r in rows if _protocol_key(r) == protocol)
    for name in sorted(by_cell, key=lambda c: (cells.index(c) if c in cells else 1 << 20, c)):
        candidates = sorted(by_cell[name], key=lambda r: r["config"].get("seed", 0))
        for row in candidates:
            directory = (context.runs_dir or Path(".")) / row["key"]
            if not (directory / CHECKPOINT).exists():
                continue
            try:
                checkpoint = load_checkpoint(directory / CHECKPOINT)
                config = RunConfig.from_data(checkpoint["config"])
                net, _rule_engine = build(config)
                net.load_state_dict(checkpoint["net"])
            except (RunError, KeyError, RuntimeError) as problem:
                notes.append(f"{name}: checkpoint in {directory} unusable ({problem}).")
                continue
            out.setdefault(config.sizes, {})[_rule(name)] = (net, config, row)
            break
        else:
            where = context.runs_dir / candidates[0]["key"] if context.runs_dir else "no runs dir"
            notes.append(f"{name}: no checkpoint found (looked in {where}); row left out.")
    context.cache[key] = out
    return out, notes


def _shape(sizes: Sequence[int]) -> str:
    return "-".join(map(str, sizes))


def _figure_reconstructions(context: _Context) -> tuple[list[Block], list[str]]:
    from gfalign.data import DataError
    from gfalign.plots import plot_reconstructions

    networks, notes = _networks(context)
    notes = [f"Figures 6 and 7, {n}" for n in notes]
    if not networks:
        return [], notes + ["Figure 6: no finished autoencoder run with a checkpoint yet."]
    blocks: list[Block] = []
    for sizes, rules in networks.items():
        some = next(iter(rules.values()))
        try:
            digits = _test_digits(some[1], context.data_dir, context.cache)
        except (DataError, OSError) as problem:
            notes.append(f"Figure 6: the {some[1].dataset} test images are unavailable: {problem}")
            return blocks, notes
        reconstructions = {
            rule: net.predict(digits.to(config.torch_dtype)).float().numpy()
            for rule, (net, config, _row) in rules.items()
        }
        path = plot_reconstructions(
            digits.float().numpy(),
            reconstructions,
            context.path(f"figure6-{_shape(sizes)}"),
            title=f"Figure 6: reconstructions by the {_shape(sizes)} autoencoder",
        )
        seeds = {r: config.seed for r, (_net, config, _row) in rules.items()}
        which = (
            f"seed {next(iter(seeds.values()))}"
            if len(set(seeds.values())) == 1
            else ", ".join(f"{r} seed {s}" for r, s in seeds.items())
        )
        blocks.append(
            Image(
                path,
                f"Figure 6 ({_shape(sizes)}): the first test example of each class (top) and "
                f"its reconstruction by each rule's autoencoder ({which}, "
                f"{_count(some[1].train.epochs, 'epoch')}).",
            )
        )
    return blocks, notes


def _figure_filters(context: _Context, count: int = 36) -> tuple[list[Block], list[str]]:
    from gfalign.plots import plot_filters

    networks, _notes = _networks(context)  # its notes went with Figure 6
    blocks: list[Block] = []
    for sizes, rules in networks.items():
        panels = {
            rule: net.weight(1).detach()[:count].float().numpy()
            for rule, (net, _config, _row) in rules.items()
        }
        path = plot_filters(
            panels,
            context.path(f"figure7-{_shape(sizes)}"),
            title=f"Figure 7: first-layer filters of the {_shape(sizes)} autoencoder",
        )
        blocks.append(
            Image(
                path,
                f"Figure 7 ({_shape(sizes)}): the first {min(count, sizes[1])} rows of W1 as "
                "28x28 tiles, each scaled to its own range, one panel per rule.",
            )
        )
    if not networks:
        return [], ["Figure 7: no finished autoencoder run with a checkpoint yet."]
    return blocks, []


def _mean_history(histories: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, float]]:
    """Per epoch, the mean of every numeric key over the histories that reach it."""
    out = []
    for epoch in range(max(len(h) for h in histories)):
        records = [h[epoch] for h in histories if len(h) > epoch]
        keys = dict.fromkeys(k for r in records for k in r)
        record = {}
        for key in keys:
            values = [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]
            values = [v for v in values if math.isfinite(v)]
            if values:
                record[key] = sum(values) / len(values)
        out.append(record)
    return out


def _figure_alignment(context: _Context) -> tuple[list[Block], list[str]]:
    from gfalign.alignment import plot_alignment

    rows = [
        r
        for r in _finished(context.rows)
        if any(k.startswith("update_angle_") for k in r["history"][-1])
    ]
    if not rows:
        return [], [
            "Alignment: these runs recorded no alignment angles (they were trained without "
            "`alignment = true` in their configuration), so there is no alignment figure."
        ]
    configs = [RunConfig.from_data(r["config"]) for r in rows]
    widest = configs[max(range(len(configs)), key=lambda n: (max(configs[n].hidden), -n))]
    rows = [
        r for r, c in zip(rows, configs, strict=True) if _architecture(c) == _architecture(widest)
    ]
    protocol = _main_protocol(rows)
    chosen = _by_cell(r for r in rows if _protocol_key(r) == protocol)
    cells = context.experiment.cells()
    histories = {
        _rule(c): _mean_history([r["history"] for r in chosen[c]])
        for c in sorted(chosen, key=lambda c: cells.index(c) if c in cells else 1 << 20)
    }
    shape = " ".join(cell(widest).split()[:2])
    path = plot_alignment(
        histories,
        context.path("alignment"),
        kind="update",
        title=f"Angle to the backprop update, {shape} ({context.experiment.name})",
    )
    return [
        Image(
            path,
            f"Alignment ({context.experiment.name}, {shape}): angle in degrees between each "
            "rule's weight update and the backprop gradient on a fixed probe batch, per hidden "
            "layer, mean over seeds (90° is no alignment).",
        )
    ], []


def _figures(context: _Context) -> tuple[list[Block], list[str]]:
    name = context.experiment.name
    makers: list[Callable[[_Context], tuple[list[Block], list[str]]]] = []
    if name == "exp1":
        makers.append(lambda c: _figure_strategies(c, 4))
    elif name == "exp2":
        makers.append(lambda c: _figure_strategies(c, 5))
    elif name == "exp3":
        makers += [_figure_reconstructions, _figure_filters]
    elif name == "exp4":
        makers.append(_figure_families)
    elif name == "fashion":
        makers.append(_figure_fashion)
    makers.append(_figure_alignment)
    blocks: list[Block] = []
    notes: list[str] = []
    for make in makers:
        more, remarks = make(context)
        blocks += more
        notes += remarks
    return blocks, notes


# ---------------------------------------------------------------------------- sections


def section(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
    *,
    level: int = 2,
    figures: Path | None = None,
    runs_dir: Path | None = None,
    data_dir: Path | None = None,
) -> list[Block]:
    """One experiment's blocks: description, runs done, protocol, machine, table, figures.

    ``figures``: the directory to draw the figures into; ``None`` draws none.
    """
    rows = _with_environment([dict(r) for r in rows], runs_dir)
    baseline_rows = None
    if baselines is not None:  # only those on this experiment's dataset, for tables and figures
        dataset = experiment.base.dataset
        baseline_rows = [
            dict(r) for r in baselines if RunConfig.from_data(r["config"]).dataset == dataset
        ]
    summary = summarize(experiment, rows, baseline_rows)
    done = _done(rows)
    blocks: list[Block] = [
        Heading(level, experiment.name, experiment.name),
        Paragraph(experiment.description),
        Paragraph(_counts(experiment, rows)),
    ]
    if done:
        blocks.append(
            Bullets(
                tuple(f"Protocol: {p}" for p in protocols(done))
                + tuple(f"Machine: {m}" for m in machines(done))
                + (f"Compute: {compute(done)}",)
            )
        )
    blocks += [Paragraph(_metric_sentence(experiment)), table(experiment, summary)]
    if any(r["baseline"] for r in summary):
        blocks.append(
            Paragraph(
                "Rows marked (baseline) come from the baselines experiment (bp, fa, dfa with "
                "uniform feedback on the same architecture); the paper has no numbers for them."
            )
        )
    if figures is not None:
        context = _Context(experiment, rows, baseline_rows or [], figures, runs_dir, data_dir)
        images, notes = _figures(context)
        if images or notes:
            blocks.append(Heading(level + 1, "Figures"))
        blocks += images
        if notes:
            blocks.append(Bullets(tuple(notes)))
    return blocks


def render_report(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """The Markdown section of one experiment (no figures)."""
    return render_markdown(section(experiment, rows, baselines))


TITLE = "gfalign: the paper's experiments, ours beside the published numbers"


def _index(
    experiments: Sequence[Experiment],
    rows: Mapping[str, list[dict[str, Any]]],
    *,
    html_page: bool,
    discussion: bool = False,
) -> list[Block]:
    everything = [r for name in rows for r in _done(rows[name])]
    lines = []
    for experiment in experiments:
        mine = rows[experiment.name]
        planned = {c.key() for c in experiment.configs}
        done = sum(r["key"] in planned and r["status"] == "finished" for r in mine)
        other = sum(r["key"] not in planned and r["status"] == "finished" for r in mine)
        lines.append(
            (
                f"[{experiment.name}]({experiment.name}.md)",
                experiment.description,
                f"{done} / {len(planned)}",
                str(other),
                compute(_done(mine)).split(" of ")[0] if _done(mine) else PENDING,
            )
        )
    blocks: list[Block] = [
        Heading(1, TITLE, "top"),
        Paragraph(
            "Every number below is read from the results store written by `gfalign reproduce`; "
            "cells without runs yet are shown as “—”. "
            + (
                "Each experiment's section follows."
                if html_page
                else "Each experiment has its own page; `report.html` holds all of it, figures "
                "included, in one file."
            )
        ),
        Table(
            ("experiment", "what", "protocol runs finished / planned", "other runs", "compute"),
            tuple(lines),
            (False, False, True, True, True),
        ),
    ]
    if everything:
        blocks += [
            Heading(2, "Protocol, machine, compute"),
            Bullets(
                tuple(f"Protocol: {p}" for p in protocols(everything))
                + tuple(f"Machine: {m}" for m in machines(everything))
                + (f"Compute: {compute(everything)} (sum of the runs' training times)",)
            ),
        ]
    if discussion:
        blocks += [
            Heading(2, "Discussion"),
            Paragraph(
                f"Which cells agree with the paper within seed noise, which do not and why: "
                f"[{DISCUSSION}]({DISCUSSION}), written from these tables (the report "
                "does not regenerate it)."
            ),
        ]
    return blocks


def write_report(
    names: Sequence[str],
    store,
    output: str | Path,
    *,
    runs_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> list[Path]:
    """Write the index, one page per experiment, the HTML page and the figures; returns them.

    Args:
        names: the experiments (``exp1`` ... ``baselines``).
        store: a ``gfalign.store.Store``.
        output: the directory (created); each page and figure is written beside its path and
            renamed into place, so a failed write leaves the previous file whole.
        runs_dir: where the run directories are (``<runs_dir>/<key>``), for the autoencoder
            figures and for environments the store lacks.
        data_dir: where the dataset's files are, for the test digits of Figure 6.
    """
    output = Path(output)
    figures = output / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = None if runs_dir is None else Path(runs_dir)
    data = None if data_dir is None else Path(data_dir)
    experiments = [load(n) for n in names]
    rows = {e.name: _with_environment(store.list(e.name), runs) for e in experiments}
    baselines = store.list(BASELINES)
    written: list[Path] = []
    discussion = (output / DISCUSSION).is_file()
    html_blocks = _index(experiments, rows, html_page=True, discussion=discussion)
    for experiment in experiments:
        others = None if experiment.name == BASELINES else baselines
        blocks = section(
            experiment,
            rows[experiment.name],
            others,
            level=1,
            figures=figures,
            runs_dir=runs,
            data_dir=data,
        )
        page = output / f"{experiment.name}.md"
        _write_text(
            page,
            render_markdown(
                [blocks[0], Paragraph("[All experiments](README.md)"), *blocks[1:]], output
            ),
        )
        written.append(page)
        html_blocks += [_demote(b) for b in blocks]
        written += [b.path for b in blocks if isinstance(b, Image)]
    index = output / "README.md"
    blocks = _index(experiments, rows, html_page=False, discussion=discussion)
    _write_text(index, render_markdown(blocks, output))
    page = output / "report.html"
    _write_text(page, render_html(html_blocks, TITLE))
    return [index, page, *written]


def _write_text(path: Path, text: str) -> None:
    """Write a page whole or not at all: beside ``path``, then renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _demote(block: Block) -> Block:
    """A page's headings one level down, for the single HTML page under its own title."""
    if isinstance(block, Heading):
        return Heading(block.level + 1, block.text, block.anchor)
    return block
