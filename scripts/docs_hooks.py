"""mkdocs hooks: the documentation's generated pages, made on every build so none can drift.

- ``reference/cli.md`` and ``reference/configuration.md``, from the click commands and the
  configuration classes with the limits their checker enforces (``gfalign.cli.reference``);
- ``results/``: the pages, figures and exports that ``gfalign report`` wrote into the
  repository's ``results/`` folder, served as they are (the one home of every number).

A page under ``docs/`` links a results page as the repository lays it out
(``../results/beyond.md`` from ``docs/protocol.md``), so the link works when the file is read
on its own; in the site ``results/`` sits inside the pages' folder, one level up less.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("*.md", "figures/*.png", "report.html", "runs.csv")


def on_files(files: Files, config) -> Files:
    from gfalign.cli.reference import cli_reference, configuration_reference

    pages = {
        "reference/cli.md": cli_reference(),
        "reference/configuration.md": configuration_reference(),
    }
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    for pattern in RESULTS:
        for path in sorted((ROOT / "results").glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


_TO_RESULTS = re.compile(r"\]\(((?:\.\./)+)results/")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.startswith(("results/", "reference/cli", "reference/configuration")):
        return markdown
    return _TO_RESULTS.sub(lambda m: "](" + m.group(1)[3:] + "results/", markdown)
