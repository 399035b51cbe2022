"""The report's pages: one section per experiment, one page per study, the index, the files.

``write_report`` writes

    DIR/README.md        the index: runs done of planned, verdicts, studies, protocol, machine,
                         compute, facts across experiments, the discussion's link
    DIR/<experiment>.md  one page per experiment: its table, figures, notes and facts
    DIR/<study>.md       one page per sensitivity study addressing a cell of those experiments
    DIR/<reading>.md     one page per reading of the protocol reading cells of them
    DIR/report.html      all of it on one page, the discussion (DIR/discussion.md, written by
                         hand) included and figures embedded (no other file needed)
    DIR/figures/*.png    the figures each experiment preset names (its ``[figures]`` table)

A cell without runs yet is listed as pending ("—"), so a partial store gives a partial but
honest report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gfalign.experiments import EXPERIMENTS, READINGS, STUDIES, Experiment
from gfalign.report import facts as facts_module
from gfalign.report.beyond import (
    PAGE,
    PREFIX,
    beyond_blocks,
    beyond_facts,
    read_expected,
    read_studies,
)
from gfalign.report.figures import Context, draw, figure_specs
from gfalign.report.peers import attach, declared
from gfalign.report.peers import read_runs as read_peer_runs
from gfalign.report.peers import sentence as peer_sentence
from gfalign.report.provenance import (
    compute,
    cost_medians,
    cost_table,
    counts,
    machines,
    protocols,
    with_environment,
)
from gfalign.report.readings import (
    Judgement,
    Reading,
    best,
    explain,
    judge,
    reading_table,
    readings,
    readings_table,
)
from gfalign.report.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Page,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from gfalign.report.rows import cells_of, config_of, count, done, experiment_rows, preset
from gfalign.report.standing import groups_of, standing
from gfalign.report.studies import (
    Study,
    Variant,
    evaluate,
    preset_data,
    studies,
    variants_table,
)
from gfalign.report.tables import (
    PENDING,
    TOLERANCE,
    UNEXPLAINED,
    WAITING,
    WITHIN,
    is_autoencoder,
    metric_sentence,
    outside_plan,
    summarize,
    table,
)
from gfalign.rules import ConfigError

__all__ = ["TITLE", "collect_facts", "render_report", "section", "write_report"]

TITLE = "gfalign: the paper's experiments, ours beside the published numbers"
BASELINES = "baselines"
DISCUSSION = "discussion.md"  # a hand-written page beside the report, embedded in report.html


def _dataset_rows(rows: Iterable[Mapping[str, Any]], dataset: str) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if config_of(r).dataset == dataset]


def _tally(summary: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many published cells got each verdict."""
    out = {WITHIN: 0, "explained": 0, UNEXPLAINED: 0, WAITING: 0}
    for row in summary:
        if row.get("explained_by"):
            out["explained"] += 1
        elif row.get("verdict") in out:
            out[row["verdict"]] += 1
    return out


def _digits(experiment: Experiment) -> int:
    return 5 if is_autoencoder(experiment) else 2


def section(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
    *,
    level: int = 2,
    figures: Path | None = None,
    runs_dir: Path | None = None,
    data_dir: Path | None = None,
    judgements: Sequence[Judgement] = (),
    peers_dir: Path | None = None,
) -> list[Block]:
    """One experiment's blocks: description, runs done, protocol, machine, table, verdicts,
    figures and facts.

    ``figures``: the directory to draw the preset's figures into; ``None`` draws none.
    ``judgements``: the readings of the protocol judged (``gfalign.report.readings.judge``),
    so that a cell a reading explains says so.
    ``peers_dir``: where the files of the preset's ``[peers]`` are (``gfalign.report.peers``);
    ``None``: their columns show every run as pending.
    """
    rows = with_environment([dict(r) for r in rows], runs_dir)
    baseline_rows = None
    if baselines is not None:  # only those on this experiment's dataset, for tables and figures
        baseline_rows = _dataset_rows(baselines, experiment.base.dataset)
    summary = explain(experiment, summarize(experiment, rows, baseline_rows), judgements)
    peers = declared(experiment, preset_data(experiment.name))
    if peers:
        runs = {
            p.name: [] if peers_dir is None else read_peer_runs(Path(peers_dir) / p.file)
            for p in peers
        }
        summary = attach(experiment, summary, peers, runs)
    finished = done(rows)
    blocks: list[Block] = [
        Heading(level, experiment.name, experiment.name),
        Paragraph(experiment.description),
        Paragraph(counts(experiment, rows)),
    ]
    if finished:
        blocks.append(
            Bullets(
                tuple(f"Protocol: {p}" for p in protocols(finished))
                + tuple(f"Machine: {m}" for m in machines(finished))
                + (f"Compute: {compute(finished)}",)
            )
        )
    sentence = metric_sentence(experiment)
    if peers:
        sentence += " " + peer_sentence(experiment, peers)
    blocks += [Paragraph(sentence), table(experiment, summary)]
    blocks += _ambiguous(experiment, summary)
    cost = cost_table(finished, experiment.cell, cells_of(experiment))
    if cost is not None:
        blocks += [Paragraph(cost[1]), cost[0]]
    if any(r["baseline"] for r in summary):
        blocks.append(
            Paragraph(
                "Rows marked (baseline) come from the baselines experiment (bp, fa, dfa with "
                "uniform feedback on the same architecture); the paper has no numbers for them."
            )
        )
    if experiment.paper:
        tally = _tally(summary)
        blocks.append(
            Paragraph(
                f"Verdicts on the {count(len(experiment.paper), 'published cell')}: "
                f"{tally[WITHIN]} within {TOLERANCE:.2f}, {tally['explained']} explained by a "
                f"reading of the protocol, {tally[UNEXPLAINED]} unexplained, {tally[WAITING]} "
                "pending."
            )
        )
    groups = groups_of(experiment.name, preset_data(experiment.name))
    if groups:
        blocks += [Heading(level + 1, "Standing"), *standing(experiment, summary, groups)]
    if figures is not None:
        outside = outside_plan(experiment, rows)
        drawn = [r for r in rows if r["key"] not in outside]
        context = Context(experiment, drawn, baseline_rows or [], figures, runs_dir, data_dir)
        images, notes = draw(context, figure_specs(experiment.name, preset_data(experiment.name)))
        if images or notes:
            blocks.append(Heading(level + 1, "Figures"))
        blocks += images
        if notes:
            blocks.append(Bullets(tuple(notes)))
    own = (experiment.base.train.epochs, experiment.base.train_subset)
    found = facts_module.group_facts(
        experiment.name, rows, experiment.metric, _digits(experiment)
    ) + facts_module.run_facts(
        experiment.name,
        rows,
        experiment.metric,
        _digits(experiment),
        own,
        cells_of(experiment),
        experiment.cell,
    )
    blocks += [Heading(level + 1, "Facts"), *facts_module.facts_blocks(found)]
    return blocks


def render_report(
    experiment: Experiment,
    rows: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]] | None = None,
    peers_dir: Path | None = None,
) -> str:
    """The Markdown section of one experiment (no figures)."""
    return render_markdown(section(experiment, rows, baselines, peers_dir=peers_dir))


def _study_section(
    study: Study,
    rows: Sequence[Mapping[str, Any]],
    variants: Sequence[Variant],
    ours: Mapping[tuple[str, str], float | None],
    *,
    figures: Path | None,
    runs_dir: Path | None,
    data_dir: Path | None,
    references: Sequence[Mapping[str, Any]] = (),
) -> list[Block]:
    rows = with_environment([dict(r) for r in rows], runs_dir)
    experiment = study.experiment
    blocks: list[Block] = [Heading(1, study.name, study.name)]
    if experiment is not None and experiment.description:
        blocks.append(Paragraph(experiment.description))
    blocks.append(
        Bullets(
            (
                f"Question: {study.question or PENDING}",
                f"Cost: {study.cost or PENDING}",
                "Addresses: " + "; ".join(f"[{e}]({e}.md) {c}" for e, c in study.cells),
            )
        )
    )
    if experiment is None:
        blocks.append(Paragraph(f"The preset could not be read as an experiment: {study.problem}"))
    else:
        blocks.append(Paragraph(counts(experiment, rows)))
    blocks += _runs_made(rows)
    blocks += [
        Paragraph(
            "One row per addressed cell and configuration of the study: the configuration "
            "says how it differs from the experiment's run of that cell; study: the mean ± "
            "standard deviation of the final test error (%) over its seeds; difference = study "
            f"− paper; within {TOLERANCE:.2f}: whether this configuration lands within "
            f"{TOLERANCE:.2f} of the paper (a setting for these cells only: it explains none, "
            "only a reading of the protocol judged on every cell does); "
            "the last column gives, per seed, the first epoch whose training error is below "
            "0.01% (the paper's criterion; — never, or no per-epoch history)."
        ),
        variants_table(study, variants, ours),
    ]
    if figures is not None and experiment is not None:
        context = Context(
            experiment, rows, [], figures, runs_dir, data_dir, references=list(references)
        )
        specs = figure_specs(study.name, preset_data(study.name))
        images, notes = draw(context, specs)
        if images or notes:
            blocks.append(Heading(2, "Figures"))
        blocks += images
        if notes:
            blocks.append(Bullets(tuple(notes)))
    if experiment is None:
        found = facts_module.run_facts(study.name, rows)
    else:
        found = facts_module.run_facts(
            study.name, rows, order=cells_of(experiment), name=experiment.cell
        )
    blocks += [Heading(2, "Facts"), *facts_module.facts_blocks(found)]
    return blocks


def _index(
    experiments: Sequence[Experiment],
    rows: Mapping[str, list[dict[str, Any]]],
    summaries: Mapping[str, list[dict[str, Any]]],
    found: Sequence[Study],
    *,
    html_page: bool,
    discussion: bool = False,
    judgements: Sequence[Judgement] = (),
) -> list[Block]:
    everything = _distinct(r for name in rows for r in done(rows[name]))
    lines = []
    for experiment in experiments:
        mine = rows[experiment.name]
        planned = {c.key() for c in experiment.configs}
        finished = sum(r["key"] in planned and r["status"] == "finished" for r in mine)
        other = sum(r["key"] not in planned and r["status"] == "finished" for r in mine)
        lines.append(
            (
                f"[{experiment.name}]({experiment.name}.md)",
                experiment.description,
                f"{finished} / {len(planned)}",
                str(other),
                compute(done(mine)).split(" of ")[0] if done(mine) else PENDING,
            )
        )
    blocks: list[Block] = [
        Heading(1, TITLE, "top"),
        Paragraph(
            "Every number below is read from the results store written by `gfalign reproduce`; "
            "cells without runs yet are shown as “—”. "
            + (
                "The discussion and each experiment's section follow."
                if html_page
                else "Each experiment has its own page, its facts (the numbers a discussion may "
                "cite) at the end; `report.html` holds all of it, the discussion and figures "
                "included, in one file."
            )
        ),
        Table(
            ("experiment", "what", "protocol runs finished / planned", "other runs", "compute"),
            tuple(lines),
            (False, False, True, True, True),
        ),
    ]
    published = [e for e in experiments if e.paper]
    if published:
        tallies = {e.name: _tally(summaries[e.name]) for e in published}
        keys = (WITHIN, "explained", UNEXPLAINED, WAITING)
        verdict_rows = [
            (
                f"[{e.name}]({e.name}.md)",
                str(len(e.paper)),
                *(str(tallies[e.name][k]) for k in keys),
            )
            for e in published
        ]
        verdict_rows.append(
            (
                "all",
                str(sum(len(e.paper) for e in published)),
                *(str(sum(t[k] for t in tallies.values())) for k in keys),
            )
        )
        blocks += [
            Heading(2, "Verdicts on the published cells"),
            Paragraph(
                f"Each published cell, under the experiment's own protocol: *within "
                f"{TOLERANCE:.2f}* when our mean over seeds is at most {TOLERANCE:.2f} points "
                "from the paper; *explained* when a reading of the protocol (below), judged on "
                "every cell it reads with its planned seeds, brings more of them within "
                f"{TOLERANCE:.2f} than the paper's protocol does and this cell among them (the "
                "reading is named in the cell's row); *unexplained* otherwise; *pending* "
                "without a run. A sensitivity study's setting for a few cells explains none."
            ),
            Table(
                (
                    "experiment",
                    "published cells",
                    f"within {TOLERANCE:.2f}",
                    "explained by a reading",
                    "unexplained",
                    "pending",
                ),
                tuple(verdict_rows),
                (False, True, True, True, True, True),
            ),
        ]
    if judgements:
        blocks += [Heading(2, "Readings of the protocol"), *_readings_blocks(judgements)]
    if found:
        blocks += [
            Heading(2, "Sensitivity studies"),
            Paragraph(
                "Each study tries settings for a few chosen cells: its page says where one "
                f"lands within {TOLERANCE:.2f}, but a setting chosen for a cell is not an "
                "explanation and leaves the verdicts as they are."
            ),
            Table(
                ("study", "question", "addresses", "runs finished", "cost"),
                tuple(
                    (
                        f"[{s.name}]({s.name}.md)",
                        s.question or PENDING,
                        count(len(s.cells), "published cell"),
                        str(sum(r["status"] == "finished" for r in rows.get(s.name, []))),
                        s.cost or PENDING,
                    )
                    for s in found
                ),
                (False, False, True, True, False),
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
        across = _across(experiments, rows)
        if across:
            blocks += [
                Heading(2, "Facts across experiments"),
                Paragraph(
                    "Per dataset and activation, over the finished classification runs of every "
                    "experiment above (each page's facts give them run by run)."
                ),
                *facts_module.facts_blocks(across)[1:],
            ]
    if discussion:
        blocks += [
            Heading(2, "Discussion"),
            Paragraph(
                "Which cells agree with the paper within seed noise, which do not and why: "
                + f"[{DISCUSSION}]({DISCUSSION})"
                + ", written by hand from these tables and facts (the report does not "
                "regenerate it)."
            ),
        ]
    return blocks


def _across(
    experiments: Sequence[Experiment], rows: Mapping[str, list[dict[str, Any]]]
) -> list[facts_module.Fact]:
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for experiment in experiments:
        if is_autoencoder(experiment):
            continue
        for row in rows[experiment.name]:
            by_dataset.setdefault(str(row["config"].get("dataset", "mnist")), []).append(row)
    out = []
    for dataset, members in by_dataset.items():
        out += facts_module.group_facts("all", members, prefix=f"{dataset} ")
    return out


def _readings_blocks(judgements: Sequence[Judgement]) -> list[Block]:
    """The index's readings: the rule, one row per reading, the best judged one's count."""
    blocks: list[Block] = [
        Paragraph(
            "A reading is one change of the protocol applied to every cell of experiments 1, 2 "
            "and 4 it concerns, with the same seeds for every cell. It is judged by one count: "
            f"its published cells within {TOLERANCE:.2f} of the paper under the reading "
            "against under the paper's protocol, once every one of them has its planned seeds; "
            "before that it is a screening, counted over the cells run so far, and never "
            "explains a cell. Brought within / taken out: the cells it moves into or out of "
            f"{TOLERANCE:.2f}, named on its page."
        ),
        readings_table(judgements),
    ]
    top = best(judgements)
    if top is None:
        blocks.append(
            Paragraph("No reading is judged yet: every verdict above is the paper's protocol's.")
        )
    else:
        blocks.append(
            Paragraph(
                f"Best judged reading: [{top.reading.name}]({top.reading.name}.md), "
                f"{top.reading_count} of {count(len(top.run), 'published cell')} within "
                f"{TOLERANCE:.2f} against the paper's protocol's {top.protocol_count}."
            )
        )
    return blocks


def _ambiguous(experiment: Experiment, summary: Sequence[Mapping[str, Any]]) -> list[Block]:
    """The preset's ``[ambiguous]`` cells: a published value whose label the text lost, shown
    with ours for each cell it may belong to."""
    given = preset_data(experiment.name).get("ambiguous") or {}
    if not given:
        return []
    ours = {r["cell"]: r for r in summary if not r["baseline"] and r["mean"] is not None}
    lines = []
    for name, others in given.items():
        paper = experiment.paper.get(name)
        if paper is None:
            continue
        parts = []
        for other in [name, *others]:
            row = ours.get(other)
            if row is None:
                parts.append(f"{other}: {PENDING}")
                continue
            gap = row["mean"] - paper
            spread = f"{row['mean']:.2f}" + (f" ± {row['std']:.2f}" if row["n"] > 1 else "")
            within = "within" if abs(gap) <= TOLERANCE + 1e-9 else "outside"
            parts.append(f"as {other}, ours {spread} ({gap:+.2f}, {within} {TOLERANCE:.2f})")
        lines.append(
            f"{name} ({paper:.2f}) is ambiguous: the text keeps the number but not its cell; "
            + "; ".join(parts)
            + f". The verdict reads it as {name}."
        )
    return [Bullets(tuple(lines))] if lines else []


def _readings_for(names: Sequence[str]) -> list[Reading]:
    """The readings reading a cell of ``names``, or named among them."""
    return [r for r in readings() if r.name in names or any(e in names for e, _c in r.cells)]


def _reading_rows(store, reading: Reading, runs: Path | None) -> list[dict[str, Any]]:
    if reading.experiment is None:
        return with_environment(store.list(reading.name), runs)
    return with_environment(experiment_rows(store, reading.experiment), runs)


def _reading_section(judgement: Judgement, rows: Sequence[Mapping[str, Any]]) -> list[Block]:
    reading = judgement.reading
    experiment = reading.experiment
    cells: dict[str, int] = {}
    for e, _c in reading.cells:
        cells[e] = cells.get(e, 0) + 1
    blocks: list[Block] = [Heading(1, reading.name, reading.name)]
    if reading.description:
        blocks.append(Paragraph(reading.description))
    lines = [
        f"Question: {reading.question or PENDING}",
        f"Cost: {reading.cost or PENDING}",
        f"Change, on every run: {reading.change}",
        "Reads: " + "; ".join(f"[{e}]({e}.md) {count(n, 'cell')}" for e, n in cells.items()),
    ]
    if reading.needs:
        lines.append(f"Needs: {reading.needs}")
    blocks.append(Bullets(tuple(lines)))
    if experiment is not None:
        blocks.append(Paragraph(counts(experiment, rows)))
    blocks += _runs_made(rows)
    blocks.append(Paragraph(judgement.sentence()))
    if judgement.helped or judgement.hurt:
        blocks.append(
            Bullets(
                (
                    "Brought within: " + (", ".join(c.cell for c in judgement.helped) or "none"),
                    "Taken out: " + (", ".join(c.cell for c in judgement.hurt) or "none"),
                )
            )
        )
    blocks += [
        Paragraph(
            "One row per cell read: the paper, ours under the paper's protocol (the "
            "experiment's runs) and under the reading (mean ± standard deviation of the final "
            f"test error, %, over seeds); within {TOLERANCE:.2f}: of the paper; difference = "
            "reading − paper; the last columns give the reading's mean final training error "
            "and, per seed, the first epoch its training error is below 0.01% (the paper's "
            "criterion; — never, or no per-epoch history)."
        ),
        reading_table(judgement),
    ]
    name = experiment.cell if experiment is not None else None
    found = facts_module.run_facts(
        reading.name,
        rows,
        order=cells_of(experiment) if experiment is not None else (),
        **({"name": name} if name is not None else {}),
    )
    blocks += [Heading(2, "Facts"), *facts_module.facts_blocks(found)]
    return blocks


def _studies_for(names: Sequence[str]) -> list[Study]:
    """The studies addressing a cell of ``names``, or named among them."""
    return [s for s in studies() if s.name in names or any(e in names for e, _c in s.cells)]


def collect_facts(
    names: Sequence[str],
    store,
    runs_dir: str | Path | None = None,
    tune_dir: str | Path | None = None,
) -> list[facts_module.Fact]:
    """Every fact the report on ``names`` (experiments, sensitivity studies and readings)
    computes: the tables' numbers, each run's and each activation's (``gfalign.report.facts``),
    each study configuration's, each reading's, the compute of each, and with ``tune_dir`` (or
    ``tune:*`` runs in the store) the beyond page's, to check a page against with
    ``gfalign.report.facts.unmatched``."""
    runs = None if runs_dir is None else Path(runs_dir)
    baselines = store.list(BASELINES)
    out: list[facts_module.Fact] = []
    experiments = [preset(n) for n in names if n in EXPERIMENTS or n in STUDIES]
    rows = {e.name: with_environment(experiment_rows(store, e), runs) for e in experiments}
    everything = _distinct(r for mine in rows.values() for r in done(mine))
    for name, mine in [*rows.items(), ("all", everything)]:
        if done(mine):
            out.append(_compute_fact(name, done(mine)))
    for name in names:
        out += _preset_facts(name)
    for experiment in experiments:
        for (name, stacked), seconds in cost_medians(
            done(rows[experiment.name]), experiment.cell
        ).items():
            quantity = "s per epoch, stacked" if stacked else "s per epoch"
            out.append(facts_module.Fact(experiment.name, name, quantity, seconds, 1))
    for experiment in experiments:
        others = None if experiment.name == BASELINES else baselines
        dataset = experiment.base.dataset
        summary = summarize(
            experiment, rows[experiment.name], _dataset_rows(others, dataset) if others else None
        )
        digits = _digits(experiment)
        own = (experiment.base.train.epochs, experiment.base.train_subset)
        out += facts_module.cell_facts(experiment.name, summary, digits)
        out += facts_module.group_facts(experiment.name, rows[experiment.name], digits=digits)
        out += facts_module.run_facts(
            experiment.name,
            rows[experiment.name],
            experiment.metric,
            digits,
            own,
            cells_of(experiment),
            experiment.cell,
        )
    out += _across(experiments, rows)
    for study in studies([n for n in names if n in STUDIES]):
        for variant in evaluate(study, rows.get(study.name) or store.list(study.name)):
            subject = f"{variant.cell} {'; '.join(variant.changes)}"
            stats = variant.stats
            out += [
                facts_module.Fact(study.name, subject, "mean", stats.mean),
                facts_module.Fact(study.name, subject, "std", stats.std),
                facts_module.Fact(study.name, subject, "difference", stats.mean - variant.paper),
            ]
            if stats.ci is not None:
                out += [
                    facts_module.Fact(study.name, subject, "95% CI low", stats.ci[0]),
                    facts_module.Fact(study.name, subject, "95% CI high", stats.ci[1]),
                ]
    read = readings([n for n in names if n in READINGS])
    for reading in read:
        rows[reading.name] = _reading_rows(store, reading, runs)
    for judgement in _judgements(read, rows, store, baselines):
        out += _reading_facts(judgement, rows[judgement.reading.name])
    if tune_dir is not None or any(
        (r.get("experiment") or "").startswith(PREFIX) for r in store.list()
    ):
        out += beyond_facts(store, read_studies(tune_dir) if tune_dir is not None else {})
    return out


def _preset_facts(name: str) -> list[facts_module.Fact]:
    """The numbers a preset's own text states (its description, question and cost), which its
    page quotes: the protocol it defines and the compute it plans, not results."""
    data = preset_data(name)
    text = " ".join(str(data.get(k, "")) for k in ("description", "question", "cost"))
    return [
        facts_module.Fact(name, "preset", "text", quote.value, len(quote.text.split(".")[1]))
        for quote in facts_module.quoted_numbers(text)
        if "e" not in quote.text
    ]


def _distinct(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each run once: a screening, a study or a reading shares the runs of the configurations
    another experiment ran (the store keeps one row per configuration)."""
    return list({r["key"]: r for r in rows}.values())


def _compute_fact(name: str, rows: Sequence[Mapping[str, Any]]) -> facts_module.Fact:
    """The compute the pages print for ``rows`` (``compute``: ``"8.8 h of training in 87
    runs"``), as a fact of one decimal."""
    return facts_module.Fact(name, "compute", "training time", float(compute(rows).split()[0]), 1)


def _reading_facts(
    judgement: Judgement, rows: Sequence[Mapping[str, Any]]
) -> list[facts_module.Fact]:
    """A reading's numbers: per cell read its mean, std, interval, difference and training
    error under the reading, and each of its runs' facts."""
    name = judgement.reading.name
    out = []
    for c in judgement.cells:
        if c.reading is None:
            continue
        s = c.reading
        out += [
            facts_module.Fact(name, c.cell, "mean", s.mean),
            facts_module.Fact(name, c.cell, "std", s.std),
        ]
        if s.ci is not None:
            out += [
                facts_module.Fact(name, c.cell, "95% CI low", s.ci[0]),
                facts_module.Fact(name, c.cell, "95% CI high", s.ci[1]),
            ]
        if c.paper is not None:
            out.append(facts_module.Fact(name, c.cell, "difference", s.mean - c.paper))
        if c.train is not None:
            out.append(facts_module.Fact(name, c.cell, "train, last (mean)", c.train))
    experiment = judgement.reading.experiment
    if experiment is not None:
        out += facts_module.run_facts(name, rows, order=cells_of(experiment), name=experiment.cell)
    if done(rows):
        out.append(_compute_fact(name, done(rows)))
    return out


def write_report(
    names: Sequence[str],
    store,
    output: str | Path,
    *,
    runs_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    tune_dir: str | Path | None = None,
    study_files: str | Path | None = None,
    peers_dir: str | Path | None = None,
) -> list[Path]:
    """Write the index, one page per experiment and study, the HTML page and the figures;
    returns them.

    Args:
        names: the experiments (``exp1`` ... ``baselines``); the studies addressing their
            cells get a page too.
        store: a ``gfalign.store.Store``.
        output: the directory (created); each page and figure is written beside its path and
            renamed into place, so a failed write leaves the previous file whole. A
            ``discussion.md`` there is embedded in ``report.html`` and linked from the index.
        runs_dir: where the run directories are (``<runs_dir>/<key>``), for the autoencoder
            figures and for environments the store lacks.
        data_dir: where the dataset's files are, for the test digits of Figure 6.
        tune_dir: where the ``gfalign tune`` studies' folders are (``summary.json``,
            ``final.json``); with them, or with ``tune:*`` runs in the store, the page
            ``beyond.md`` (tuned configurations beside the paper's protocol) is written too.
        study_files: where the study TOML files are (``tune/``): their ``[expected]`` tables
            give the beyond page's goals and published numbers.
        peers_dir: where the peer libraries' runs are (``results/peers``), for the columns of
            an experiment whose preset names ``[peers]``; ``None``: those show as pending.
    """
    output = Path(output)
    figures = output / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = None if runs_dir is None else Path(runs_dir)
    data = None if data_dir is None else Path(data_dir)
    found = _studies_for(names)
    read = _readings_for(names)
    apart = {s.name for s in found} | {r.name for r in read}
    experiments = [preset(n) for n in names if n not in apart]
    rows = {e.name: with_environment(experiment_rows(store, e), runs) for e in experiments}
    for study in found:
        rows[study.name] = with_environment(store.list(study.name), runs)
    for reading in read:
        rows[reading.name] = _reading_rows(store, reading, runs)
    baselines = store.list(BASELINES)
    variants = [v for s in found for v in evaluate(s, rows[s.name])]
    judgements = _judgements(read, rows, store, baselines)

    summaries: dict[str, list[dict[str, Any]]] = {}
    written: list[Path] = []
    pages: list[Page] = []
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
            judgements=judgements,
            peers_dir=None if peers_dir is None else Path(peers_dir),
        )
        summaries[experiment.name] = _summary(experiment, rows[experiment.name], others, judgements)
        text = render_markdown(
            [blocks[0], Paragraph("[All experiments](README.md)"), *blocks[1:]], output
        )
        page = output / f"{experiment.name}.md"
        _write_text(page, text)
        pages.append(Page(experiment.name, text))
        written += [page, *(b.path for b in blocks if isinstance(b, Image))]
    ours = _ours(found, summaries, store, baselines)
    for study in found:
        blocks = _study_section(
            study,
            rows[study.name],
            [v for v in variants if v.study == study.name],
            ours,
            figures=figures,
            runs_dir=runs,
            data_dir=data,
            references=[
                r
                for name in dict.fromkeys(e for e, _c in study.cells)
                for r in rows.get(name) or store.list(name)
            ],
        )
        text = render_markdown(
            [blocks[0], Paragraph("[All experiments](README.md)"), *blocks[1:]], output
        )
        page = output / f"{study.name}.md"
        _write_text(page, text)
        pages.append(Page(study.name, text))
        written += [page, *(b.path for b in blocks if isinstance(b, Image))]

    for judgement in judgements:
        name = judgement.reading.name
        blocks = _reading_section(judgement, rows[name])
        text = render_markdown(
            [blocks[0], Paragraph("[All experiments](README.md)"), *blocks[1:]], output
        )
        page = output / f"{name}.md"
        _write_text(page, text)
        pages.append(Page(name, text))
        written.append(page)

    tuned = read_studies(tune_dir) if tune_dir is not None else {}
    beyond = None
    if tuned or any((r.get("experiment") or "").startswith(PREFIX) for r in store.list()):
        expected, problems = read_expected(study_files) if study_files is not None else ({}, [])
        if problems:
            raise ConfigError("study files that cannot be read: " + "; ".join(problems))
        blocks = beyond_blocks(store, tuned, figures, expected)
        text = render_markdown(blocks, output)
        beyond = output / f"{PAGE}.md"
        _write_text(beyond, text)
        pages.append(Page(PAGE, text))
        written += [beyond, *(b.path for b in blocks if isinstance(b, Image))]

    discussion = output / DISCUSSION
    has_discussion = discussion.is_file()
    index = output / "README.md"
    blocks = _index(
        experiments,
        rows,
        summaries,
        found,
        html_page=False,
        discussion=has_discussion,
        judgements=judgements,
    )
    if beyond is not None:
        blocks.append(_beyond_link())
    _write_text(index, render_markdown(blocks, output))
    top = _index(
        experiments,
        rows,
        summaries,
        found,
        html_page=True,
        discussion=has_discussion,
        judgements=judgements,
    )
    if beyond is not None:
        top.append(_beyond_link())
    first = [Page("README", render_markdown(top, output), anchor="top")]
    if has_discussion:
        first.append(Page("discussion", discussion.read_text()))
    page = output / "report.html"
    _write_text(page, render_html([*first, *pages], TITLE, output))
    return [index, page, *written]


def _beyond_link() -> Block:
    return Paragraph(
        f"[Beyond the paper]({PAGE}.md): every rule tuned on a validation split with "
        "`gfalign tune`, beside the paper's protocol."
    )


def _summary(
    experiment: Experiment,
    rows: Sequence[Mapping[str, Any]],
    baselines: Sequence[Mapping[str, Any]] | None,
    judgements: Sequence[Judgement],
) -> list[dict[str, Any]]:
    others = None if baselines is None else _dataset_rows(baselines, experiment.base.dataset)
    return explain(experiment, summarize(experiment, rows, others), judgements)


def _judgements(
    read: Sequence[Reading],
    rows: Mapping[str, list[dict[str, Any]]],
    store,
    baselines: Sequence[Mapping[str, Any]],
) -> list[Judgement]:
    """Each reading judged against its experiments' summaries under their own protocol."""
    protocol: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({e for r in read for e, _c in r.cells}):
        experiment = preset(name)
        mine = rows.get(name)
        if mine is None:
            mine = experiment_rows(store, experiment)
        others = None if name == BASELINES else _dataset_rows(baselines, experiment.base.dataset)
        protocol[name] = summarize(experiment, mine, others)
    return [judge(r, rows[r.name], protocol) for r in read]


def _ours(
    found: Sequence[Study],
    summaries: Mapping[str, list[dict[str, Any]]],
    store,
    baselines: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], float | None]:
    """(experiment, cell) -> our mean under the experiment's protocol, for the study pages."""
    out: dict[tuple[str, str], float | None] = {}
    for name in sorted({e for s in found for e, _c in s.cells}):
        experiment = preset(name)
        summary = summaries.get(name)
        if summary is None:
            summary = summarize(experiment, store.list(name))
        for row in summary:
            if row["verdict"] is not None and not row["baseline"]:
                out[name, row["cell"]] = row["mean"]
    return out


def _write_text(path: Path, text: str) -> None:
    """Write a page whole or not at all: beside ``path``, then renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:  # a write names no file: name the page
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _runs_made(rows) -> list[Block]:
    """How the finished runs among ``rows`` were made: protocols, machines and compute."""
    finished = done(rows)
    if not finished:
        return []
    return [
        Bullets(
            tuple(f"Protocol: {p}" for p in protocols(finished))
            + tuple(f"Machine: {m}" for m in machines(finished))
            + (f"Compute: {compute(finished)}",)
        )
    ]
