"""Documents as blocks, written as GitHub Markdown, then as one HTML page through markdown-it.

A report page is a list of blocks (``Heading``, ``Paragraph``, ``Bullets``, ``Table``,
``Image``). ``render_markdown`` writes them as GitHub Markdown; ``render_html`` parses that
Markdown (and any hand-written page, such as the discussion) with markdown-it-py and writes
one self-contained page: headings get ids, links between pages become links to anchors, and
figures are embedded as base64 PNG. ``broken_links`` checks a written report: every relative
link and image of its Markdown pages and of ``report.html`` must point to an existing file or
anchor.

    >>> page = render_markdown([Heading(1, "exp1"), Paragraph("See [the index](README.md).")])
    >>> print(page, end="")
    # exp1
    <BLANKLINE>
    See [the index](README.md).
    >>> index = render_markdown([Heading(1, "Results"), Paragraph("[exp1](exp1.md)")])
    >>> body = render_html([Page("README", index, anchor="top"), Page("exp1", page)], "Report")
    >>> '<h2 id="exp1">exp1</h2>' in body and '<a href="#top">the index</a>' in body
    True
"""

from __future__ import annotations

import base64
import html
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = [
    "Block",
    "Bullets",
    "Heading",
    "Image",
    "Page",
    "Paragraph",
    "Table",
    "broken_links",
    "render_html",
    "render_markdown",
    "slug",
]


@dataclass(frozen=True)
class Heading:
    """A heading; ``anchor`` is kept for callers that name one (the HTML ids come from the
    text, as GitHub makes them)."""

    level: int
    text: str
    anchor: str | None = None


@dataclass(frozen=True)
class Paragraph:
    """Markdown text: `code` spans, [links](page.md), *emphasis*."""

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


def _cell(text: str) -> str:
    """A table cell's text: a ``|`` would end the cell, a line break the row."""
    return text.replace("|", "\\|").replace("\n", " ")


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
                "| " + " | ".join(_cell(h) for h in block.header) + " |",
                "| " + " | ".join("---:" if n else "---" for n in block.numeric) + " |",
            ]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        else:
            where = block.path if root is None else block.path.relative_to(root)
            parts.append(f"![{_alt(block.caption)}]({where.as_posix()})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"


def _alt(caption: str) -> str:
    return caption.split(":")[0].replace("[", "(").replace("]", ")")


# ---------------------------------------------------------------------------- anchors


def slug(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens.

    >>> slug("Figures 6 and 7: autoencoders (exp3)")
    'figures-6-and-7-autoencoders-exp3'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _anchors(texts: Iterable[str]) -> list[str]:
    """GitHub's anchors for a page's headings in order: repeats get ``-1``, ``-2`` ..."""
    seen: dict[str, int] = {}
    out = []
    for text in texts:
        base = slug(text)
        count = seen.get(base, 0)
        out.append(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def _markdown():
    from markdown_it import MarkdownIt

    # Raw HTML in a page is shown as text: the page stays what its Markdown says.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _inline_text(token) -> str:
    """The plain text of an inline token (what GitHub slugs a heading from)."""
    return "".join(
        child.content for child in token.children or () if child.type in ("text", "code_inline")
    )


def markdown_anchors(text: str) -> set[str]:
    """The anchors GitHub makes for the headings of a Markdown page."""
    tokens = _markdown().parse(text)
    titles = [_inline_text(tokens[n + 1]) for n, t in enumerate(tokens) if t.type == "heading_open"]
    return set(_anchors(titles))


# ---------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class Page:
    """A Markdown page of the report: its name (the file ``<name>.md``, or ``README`` for the
    index) and its text; ``anchor`` is the id of its first heading in the HTML page."""

    name: str
    text: str
    anchor: str | None = None

    @property
    def id(self) -> str:
        return self.anchor or self.name


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem;
       margin: 2rem auto; padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; }
th { background: #f6f8fa; }
td[style] { font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { background: #f6f8fa; padding: 0 .2rem; border-radius: 3px; }
"""


def _figure_id(name: str) -> str:
    return "figure-" + slug(Path(name).stem)


def render_html(
    pages: Sequence[Page] | Iterable[Block],
    title: str,
    root: Path | None = None,
) -> str:
    """One self-contained page: inline CSS, figures embedded as base64 PNG, no other file.

    Args:
        pages: the report's Markdown pages, the first one the index (its headings keep their
            level, the others' go one level down); or plain blocks, as one page.
        title: the page's title.
        root: the directory the pages' relative paths start from (their images).

    Every page becomes a ``<section>``; a heading's id is ``<page id>-<GitHub anchor>``, the
    first heading of a page the page's id. A link to ``<page>.md`` or ``<page>.md#anchor`` of
    one of ``pages`` becomes a link to the id, a link to an embedded figure a link to its
    ``<img>``; other relative links are left as written (``broken_links`` checks them).
    """
    pages = list(pages)
    if not pages or not isinstance(pages[0], Page):
        pages = [Page("page", render_markdown(pages, root))]  # type: ignore[arg-type]
    md = _markdown()
    parsed = {page.name: md.parse(page.text) for page in pages}
    ids: dict[str, dict[str, str]] = {}  # page -> GitHub anchor -> HTML id
    for page in pages:
        tokens = parsed[page.name]
        headings = [n for n, t in enumerate(tokens) if t.type == "heading_open"]
        anchors = _anchors(_inline_text(tokens[n + 1]) for n in headings)
        ids[page.name] = {}
        for position, (n, anchor) in enumerate(zip(headings, anchors, strict=True)):
            ident = page.id if position == 0 else f"{page.id}-{anchor}"
            ids[page.name][anchor] = ident
            tokens[n].attrSet("id", ident)
    figures: set[str] = set()
    for page in pages:
        for token in _walk(parsed[page.name]):
            if token.type == "image":
                src = str(token.attrGet("src") or "")
                if _relative(src):
                    figures.add(unquote(src))
    body = []
    for number, page in enumerate(pages):
        tokens = parsed[page.name]
        for token in tokens:
            if token.type in ("heading_open", "heading_close") and number > 0:
                token.tag = f"h{min(int(token.tag[1]) + 1, 6)}"
        for token in _walk(tokens):
            if token.type == "link_open":
                target = str(token.attrGet("href") or "")
                token.attrSet("href", _retarget(target, page, ids, figures))
            elif token.type == "image":
                src = unquote(str(token.attrGet("src") or ""))
                if _relative(src):
                    path = (root or Path(".")) / src
                    data = base64.b64encode(path.read_bytes()).decode("ascii")
                    token.attrSet("src", f"data:image/png;base64,{data}")
                    token.attrSet("id", _figure_id(src))
        rendered = md.renderer.render(tokens, md.options, {})
        body.append(f'<section id="section-{html.escape(page.id)}">\n{rendered}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _walk(tokens):
    for token in tokens:
        yield token
        if token.children:
            yield from _walk(token.children)


def _relative(target: str) -> bool:
    """A link inside the report: no scheme, no host, not only an anchor, not a data URI."""
    parts = urlsplit(target)
    return bool(target) and not parts.scheme and not parts.netloc and not target.startswith("#")


def _retarget(
    target: str, page: Page, ids: Mapping[str, Mapping[str, str]], figures: set[str]
) -> str:
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return target
    path, fragment = unquote(parts.path), unquote(parts.fragment)
    if not path:  # an anchor on the same page
        return "#" + ids[page.name].get(fragment, fragment)
    name = Path(path).stem if path.endswith(".md") else None
    if name in ids:
        if not fragment:
            return "#" + next(iter(ids[name].values()), name)
        return "#" + ids[name].get(fragment, fragment)
    if path in figures:
        return "#" + _figure_id(path)
    return target


# ---------------------------------------------------------------------------- link check


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.targets: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        for name in ("href", "src"):
            if values.get(name):
                self.targets.append((name, str(values[name])))


def broken_links(directory: str | Path) -> list[str]:
    """Every relative link or image in the report under ``directory`` that points nowhere.

    Markdown pages (``*.md``): the file must exist and an ``#anchor`` must be one of the
    target page's heading anchors (GitHub's). ``report.html``: an ``#id`` must exist in the
    page, any other relative ``href``/``src`` must name an existing file. Returns lines
    ``"<page>: <target>"``, empty when every link resolves.
    """
    directory = Path(directory)
    problems = []
    anchors: dict[Path, set[str]] = {}

    def anchors_of(path: Path) -> set[str]:
        if path not in anchors:
            anchors[path] = markdown_anchors(path.read_text())
        return anchors[path]

    for page in sorted(directory.glob("*.md")):
        for token in _walk(_markdown().parse(page.read_text())):
            if token.type == "link_open":
                target = str(token.attrGet("href") or "")
            elif token.type == "image":
                target = str(token.attrGet("src") or "")
            else:
                continue
            parts = urlsplit(target)
            if parts.scheme or parts.netloc:
                continue
            path = (directory / unquote(parts.path)) if parts.path else page
            anchor = unquote(parts.fragment)
            if not path.exists() or (
                anchor and (path.suffix != ".md" or anchor not in anchors_of(path))
            ):
                problems.append(f"{page.name}: {target}")
    page = directory / "report.html"
    if page.exists():
        parser = _Links()
        parser.feed(page.read_text())
        for _kind, target in parser.targets:
            parts = urlsplit(target)
            if parts.scheme or parts.netloc:
                continue
            if not parts.path:
                if unquote(parts.fragment) not in parser.ids:
                    problems.append(f"report.html: {target}")
            elif not (directory / unquote(parts.path)).exists():
                problems.append(f"report.html: {target}")
    return problems
