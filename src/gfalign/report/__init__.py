"""Reports: our numbers beside the paper's, with statistics, verdicts, figures and facts.

Everything comes from the results store (configurations, final metrics, per-epoch histories,
seconds, versions) except the autoencoder figures, which load the trained networks from the run
directories' checkpoints. The package follows the report's steps:

- ``gfalign.report.rows``: the store's rows grouped by cell and protocol;
- ``gfalign.report.tables``: statistics over seeds (mean, std, 95% t interval, t-test against
  the paper, best epoch) and the table of each experiment, with a verdict per published cell;
- ``gfalign.report.studies``: sensitivity-study presets (their ``addresses`` key) and where
  their settings land, cell by cell;
- ``gfalign.report.readings``: readings of the protocol (``reading-*.toml``), each one change
  on every cell it reads, judged by one count against the paper's protocol's, and the cells
  a judged reading explains;
- ``gfalign.report.figures``: the figures each preset's ``[figures]`` table names (drawn by
  ``gfalign.plots``);
- ``gfalign.report.facts``: every number a discussion may cite, and a check of a text's numbers
  against them;
- ``gfalign.report.provenance``: runs done, protocols, machines, compute;
- ``gfalign.report.render``: blocks to Markdown, Markdown to one HTML page (markdown-it-py), and
  a check that every internal link resolves;
- ``gfalign.report.pages``: the pages and ``write_report``.

Example:
    >>> from gfalign.store import Store
    >>> with Store("results/runs.sqlite") as store:  # doctest: +SKIP
    ...     write_report(["exp1", "baselines"], store, "results")
"""

from __future__ import annotations

from gfalign.report.facts import Fact, unmatched
from gfalign.report.pages import TITLE, collect_facts, render_report, section, write_report
from gfalign.report.provenance import compute, machines, protocols
from gfalign.report.render import (
    Bullets,
    Heading,
    Image,
    Page,
    Paragraph,
    Table,
    broken_links,
    render_html,
    render_markdown,
)
from gfalign.report.tables import Statistics, describe, summarize, table

__all__ = [
    "TITLE",
    "Bullets",
    "Fact",
    "Heading",
    "Image",
    "Page",
    "Paragraph",
    "Statistics",
    "Table",
    "broken_links",
    "collect_facts",
    "compute",
    "describe",
    "machines",
    "protocols",
    "render_html",
    "render_markdown",
    "render_report",
    "section",
    "summarize",
    "table",
    "unmatched",
    "write_report",
]
