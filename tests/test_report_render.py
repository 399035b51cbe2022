"""Markdown to one HTML page through markdown-it: the discussion embedded, every link resolving."""

from __future__ import annotations

import struct
from html.parser import HTMLParser

import pytest

from gfalign.plots import WIDTH
from gfalign.report import broken_links, render_html, render_markdown, write_report
from gfalign.report.render import Heading, Image, Page, Paragraph, Table, slug
from gfalign.store import Store
from test_report_support import fill, presets

DPI = 120  # gfalign.plots writes every PNG at 120 dots per inch

DISCUSSION = """# Discussion: where we meet the paper

[All experiments](README.md) · [the facts of exp1](exp1.md#facts) · [below](#why)

See [Figure 4](figures/exp1-figure4.png) and the [exp4 table](exp4.md), and
[a study](https://example.org/paper) outside the report.

## Why

Raw <b>html</b> stays text; `code` stays code.

| cell | ours |
| --- | ---: |
| 2x800 tanh s1 | 2.05 |
"""


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if "id" in values:
            self.ids.append(values["id"])
        if tag == "a":
            self.links.append(values["href"])
        if tag == "img":
            self.images.append(values["src"])


@pytest.fixture
def report(tmp_path, monkeypatch):
    presets(monkeypatch, tmp_path / "presets")
    store = Store(tmp_path / "runs.sqlite")
    fill(store, "exp1", {f"2x800 tanh {r}": [2.0, 2.1] for r in ("s1", "s2", "s3")}, angles=True)
    fill(store, "exp4", {f"2x800 tanh dfa B{n}": [2.2, 2.3] for n in (1, 4)})
    fill(store, "baselines", {"2x800 tanh bp": [1.9, 2.0]}, curves=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "discussion.md").write_text(DISCUSSION)
    write_report(["exp1", "exp4", "baselines"], store, out)
    store.close()
    return out


def test_every_relative_link_and_image_of_the_report_resolves(report):
    assert broken_links(report) == []
    page = _Page()
    page.feed((report / "report.html").read_text())
    assert len(page.ids) == len(set(page.ids))  # anchors are unique across the pages
    internal = [link for link in page.links if link.startswith("#")]
    assert internal and all(link[1:] in page.ids for link in internal)
    outside = [link for link in page.links if not link.startswith("#")]
    assert outside == ["https://example.org/paper"]
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)


def test_the_discussion_is_embedded_and_its_links_point_into_the_page(report):
    html = (report / "report.html").read_text()
    assert '<h2 id="discussion">Discussion: where we meet the paper</h2>' in html
    assert '<a href="#top">All experiments</a>' in html
    assert '<a href="#exp1-facts">the facts of exp1</a>' in html
    assert '<a href="#discussion-why">below</a>' in html and 'id="discussion-why"' in html
    assert '<a href="#exp4">exp4 table</a>' in html
    assert '<a href="#figure-exp1-figure4">Figure 4</a>' in html
    assert 'id="figure-exp1-figure4"' in html
    assert "Raw &lt;b&gt;html&lt;/b&gt; stays text; <code>code</code> stays code." in html
    assert '<td style="text-align:right">2.05</td>' in html
    assert html.index('id="discussion"') < html.index('id="exp1"')  # after the index
    assert "img { max-width: 100%" in html


def test_a_broken_link_is_named_with_its_page(report):
    (report / "notes.md").write_text(
        "# Notes\n\n[gone](missing.md) [no anchor](exp1.md#nowhere) [fine](exp1.md#figures)\n"
    )
    assert broken_links(report) == ["notes.md: missing.md", "notes.md: exp1.md#nowhere"]
    html = (report / "report.html").read_text()
    (report / "report.html").write_text(html.replace("</body>", '<a href="#lost">x</a></body>'))
    assert "report.html: #lost" in broken_links(report)


def test_no_figure_is_wider_than_the_page(report):
    figures = sorted((report / "figures").glob("*.png"))
    assert {f.name for f in figures} >= {"exp1-figure4.png", "exp4-figure8.png"}
    for figure in figures:
        width, _height = struct.unpack(">II", figure.read_bytes()[16:24])  # the IHDR chunk
        assert width <= WIDTH * DPI, figure.name


def test_table_cells_keep_their_bars_and_headings_get_githubs_anchors(tmp_path):
    text = render_markdown(
        [
            Heading(1, "Figures 6 and 7: autoencoders (exp3)"),
            Table(("a", "b"), (("x | y", "1.0"),), (False, True)),
        ]
    )
    assert "| x \\| y | 1.0 |" in text
    assert slug("Figures 6 and 7: autoencoders (exp3)") == "figures-6-and-7-autoencoders-exp3"
    html = render_html([Page("README", text, anchor="top")], "t")
    assert "<td>x | y</td>" in html and '<h1 id="top">' in html


def test_repeated_headings_get_numbered_anchors_as_on_github():
    text = "# Page\n\n## Facts\n\n## Facts\n\n[second](#facts-1)\n"
    html = render_html([Page("exp1", text)], "t")
    assert 'id="exp1-facts"' in html and 'id="exp1-facts-1"' in html
    assert '<a href="#exp1-facts-1">second</a>' in html


def test_an_image_block_is_embedded_with_its_caption(tmp_path):
    from gfalign.plots import Panel, Series, plot_panels

    path = plot_panels(
        [Panel("p", (Series("s1", curves=(([1, 2], [3.0, 2.0]),)),), "error")],
        tmp_path / "figures" / "x-y.png",
    )
    html = render_html([Paragraph("intro"), Image(path, "Figure 1: a caption")], "t", root=tmp_path)
    assert 'id="figure-x-y"' in html and "<em>Figure 1: a caption</em>" in html
