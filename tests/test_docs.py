"""The README and the documentation pages: their examples run, their rules resolve, their
numbers come from the results store, and their generated parts are what the code generates."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from gfalign.rules import resolve

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# Pages whose numbers are constants of the mathematics and of the protocol's evidence, not
# results: every other page quotes no decimal number the store does not give.
CONSTANTS = {ROOT / "docs" / "DESIGN.md", ROOT / "docs" / "protocol.md"}
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(page.read_text()) if lang == language]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name


def _run_examples(page: Path) -> None:
    """A page's ``python`` blocks, in order, in one namespace, as a reader would paste them."""
    namespace: dict = {"__name__": "__example__"}
    for number, code in enumerate(_blocks(page, "python"), start=1):
        exec(compile(code, f"{_name(page)} example {number}", "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=_name)
def test_every_python_example_runs(page, tmp_path, monkeypatch):
    """In a scratch directory, so an example that writes files leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example"])
    _run_examples(page)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "toml")], ids=_name)
def test_every_toml_example_parses_and_every_rule_resolves(page):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    for code in _blocks(page, "toml"):
        data = tomllib.loads(code)
        if "layers" in data or "template" in data:  # a rule: it resolves at its depth
            depth = len(data["layers"]) if "layers" in data else 3
            assert resolve(data, depth).hidden_layers == depth


def test_the_runner_runs_a_pages_blocks_in_order_and_fails_on_a_broken_one(tmp_path):
    from gfalign.rules import ConfigError

    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport gfalign as gf\n```\n\ntext\n\n"
        "```python\ngf.resolve('no-such-rule', 2)\n```\n"
    )
    with pytest.raises(ConfigError, match="no-such-rule"):
        _run_examples(page)


def test_the_readme_is_short_and_starts_with_the_quick_start():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Quick start", "## As a library", "## The rules"]
    assert "make demo" in text and "make test" in text and "from_modules" in text


def test_the_quick_start_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "lint", "docs"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_every_page_is_in_the_site():
    """mkdocs.yml's navigation names every page under docs/ (the generated ones come from the
    hook), so none is built without a way to reach it."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert page.relative_to(ROOT / "docs").as_posix() in nav, page


# ------------------------------------------------------------------ numbers from the store


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The store exported in results/, imported into a scratch store."""
    from gfalign.store import Store

    export = ROOT / "results" / "runs.jsonl.gz"
    if not export.is_file():
        pytest.skip("no results/runs.jsonl.gz beside the tests")
    store = Store(tmp_path_factory.mktemp("store") / "runs.sqlite")
    store.import_file(export)
    yield store
    store.close()


@pytest.fixture(scope="module")
def facts(exported):
    from gfalign.experiments import EXPERIMENTS, STUDIES
    from gfalign.report import collect_facts

    return collect_facts([*EXPERIMENTS, *STUDIES], exported)


def test_the_readme_headline_is_generated_from_the_store(exported):
    from gfalign.report.headline import headline

    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- headline -->\n(.*?)\n<!-- /headline -->", text, re.S)
    assert found, "README.md has no <!-- headline --> ... <!-- /headline --> block"
    assert found.group(1) == headline(exported), "regenerate it: gfalign.report.headline"


@pytest.mark.parametrize("page", [p for p in PAGES if p not in CONSTANTS], ids=_name)
def test_a_page_quotes_only_numbers_the_store_gives(page, facts):
    """Every decimal number in the text (outside code) is one of the facts the report computes
    from the exported runs: a page links to results/, it does not copy from it."""
    from gfalign.report import unmatched

    assert [q.context for q in unmatched(page.read_text(), facts)] == []


# ------------------------------------------------------------------ the generated reference


def test_the_cli_reference_has_every_command_and_subcommand():
    from gfalign.cli import COMMANDS
    from gfalign.cli.reference import cli_reference

    page = cli_reference()
    for name in COMMANDS:
        assert f"\n## gfalign {name}\n" in page, name
    for sub in ("runs export", "runs import", "data fetch", "feedback show", "rules show"):
        assert f"\n## gfalign {sub}\n" in page, sub
    assert "--overwrite" in page and "--backend" in page  # the options, as --help gives them


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: __import__("gfalign").TrainConfig(lr=0.0), "lr"),
        (lambda: __import__("gfalign").TrainConfig(epochs=0), "epochs"),
        (lambda: __import__("gfalign.config").config.RunConfig(hidden=(0,)), "hidden"),
        (lambda: __import__("gfalign.config").config.RunConfig(activation="elu"), "activation"),
    ],
)
def test_the_configuration_reference_says_what_a_refusal_says(build, key):
    """The allowed column is the checker's own words: a refused value's message ends with
    them."""
    from gfalign.cli.reference import configuration_reference
    from gfalign.rules import ConfigError

    with pytest.raises(ConfigError) as refused:
        build()
    allowed = str(refused.value).split("; allowed: ", 1)[1]
    rows = [
        line for line in configuration_reference().splitlines() if line.startswith(f"| `{key}` |")
    ]
    assert any(row.split(" | ")[2] == allowed for row in rows), (allowed, rows)


def test_the_configuration_reference_has_every_field():
    import dataclasses

    from gfalign.cli.reference import configuration_reference
    from gfalign.config import RunConfig
    from gfalign.train import TrainConfig

    page = configuration_reference()
    for cls in (RunConfig, TrainConfig):
        for item in dataclasses.fields(cls):
            assert f"| `{item.name}` |" in page, item.name
    assert (
        "| `epochs` | `100` | an integer in [1, 100000] | passes over the training set, at most "
        "100000 (a run that could finish). |" in page
    )
