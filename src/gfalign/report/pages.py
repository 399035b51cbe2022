"""The report's pages: one section per experiment, one page per study, the index, the files.

``write_report`` writes

    DIR/README.md        the index: runs done of planned, verdicts, studies, protocol, machine,
                         compute, facts across experiments, the discussion's link
    DIR/<experiment>.md  one page per experiment: its table, figures, notes and facts
    DIR/<study>.md       one page per sensitivity study addressing a cell of those experiments
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

from gfalign.experiments import EXPERIMENTS, STUDIES, Experiment
from gfalign.report import facts as facts_module
from gfalign.report.beyond import PAGE, PREFIX, beyond_blocks, read_expected, read_studies
from gfalign.report.figures import Context, draw, figure_specs
from gfalign.report.peers import attach, declared
from gfalign.report.peers import read_runs as read_peer_runs
from gfalign.report.peers import sentence as peer_sentence
from gfalign.report.provenance import (
    compute,
    cost_table,
    counts,
    machines,
    protocols,
    with_environment,
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
    explain,
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
    variants: Sequence[Variant] = (),
    peers_dir: Path | None = None,
) -> list[Block]:
    """One experiment's blocks: description, runs done, protocol, machine, table, verdicts,
    figures and facts.

    ``figures``: the directory to draw the preset's figures into; ``None`` draws none.
    ``variants``: the sensitivity studies' variants (``gfalign.report.studies.evaluate``), so
    that a cell a study explains says so.
    ``peers_dir``: where the files of the preset's ``[peers]`` are (``gfalign.report.peers``);
    ``None``: their columns show every run as pending.
    """
    rows = with_environment([dict(r) for r in rows], runs_dir)
    baseline_rows = None
    if baselines is not None:  # only those on this experiment's dataset, for tables and figures
        baseline_rows = _dataset_rows(baselines, experiment.base.dataset)
    summary = explain(experiment, summarize(experiment, rows, baseline_rows), variants)
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
                f"sensitivity study, {tally[UNEXPLAINED]} unexplained, {tally[WAITING]} pending."
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
    finished = done(rows)
    if finished:
        blocks.append(
            Bullets(
                tuple(f"Protocol: {p}" for p in protocols(finished))
                + tuple(f"Machine: {m}" for m in machines(finished))
                + (f"Compute: {compute(finished)}",)
            )
        )
    blocks += [
        Paragraph(
            "One row per addressed cell and configuration of the study: the configuration "
            "says how it differs from the experiment's run of that cell; study: the mean ± "
            "standard deviation of the final test error (%) over its seeds; difference = study "
            f"− paper; within {TOLERANCE:.2f}: whether this configuration explains the cell; "
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
) -> list[Block]:
    everything = [r for name in rows for r in done(rows[name])]
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
                "from the paper; *explained* when a sensitivity study's configuration for the "
                f"cell lands within {TOLERANCE:.2f} (the study is named in the cell's row); "
                "*unexplained* otherwise; *pending* without a run."
            ),
            Table(
                (
                    "experiment",
                    "published cells",
                    f"within {TOLERANCE:.2f}",
                    "explained by a study",
                    "unexplained",
                    "pending",
                ),
                tuple(verdict_rows),
                (False, True, True, True, True, True),
            ),
        ]
    if found:
        blocks += [
            Heading(2, "Sensitivity studies"),
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


def _studies_for(names: Sequence[str]) -> list[Study]:
    """The studies addressing a cell of ``names``, or named among them."""
    return [s for s in studies() if s.name in names or any(e in names for e, _c in s.cells)]


def collect_facts(
    names: Sequence[str], store, runs_dir: str | Path | None = None
) -> list[facts_module.Fact]:
    """Every fact the report on ``names`` (experiments and sensitivity studies) computes: the
    tables' numbers, each run's and each activation's (``gfalign.report.facts``), to check a
    discussion against with ``gfalign.report.facts.unmatched``."""
    runs = None if runs_dir is None else Path(runs_dir)
    baselines = store.list(BASELINES)
    out: list[facts_module.Fact] = []
    experiments = [preset(n) for n in names if n in EXPERIMENTS or n in STUDIES]
    rows = {e.name: with_environment(experiment_rows(store, e), runs) for e in experiments}
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
    study_names = {s.name for s in found}
    experiments = [preset(n) for n in names if n not in study_names]
    rows = {e.name: with_environment(experiment_rows(store, e), runs) for e in experiments}
    for study in found:
        rows[study.name] = with_environment(store.list(study.name), runs)
    baselines = store.list(BASELINES)
    variants = [v for s in found for v in evaluate(s, rows[s.name])]

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
            variants=variants,
            peers_dir=None if peers_dir is None else Path(peers_dir),
        )
        summaries[experiment.name] = _summary(experiment, rows[experiment.name], others, variants)
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
    blocks = _index(experiments, rows, summaries, found, html_page=False, discussion=has_discussion)
    if beyond is not None:
        blocks.append(_beyond_link())
    _write_text(index, render_markdown(blocks, output))
    top = _index(experiments, rows, summaries, found, html_page=True, discussion=has_discussion)
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
    variants: Sequence[Variant],
) -> list[dict[str, Any]]:
    others = None if baselines is None else _dataset_rows(baselines, experiment.base.dataset)
    return explain(experiment, summarize(experiment, rows, others), variants)


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
